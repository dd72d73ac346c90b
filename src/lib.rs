//! rmachines: a declarative machine manager for full-OS containers.
//!
//! Layers, from the bottom up:
//! - [`definition`], parse and validate `/etc/rmachines/*.toml` into plain data.
//! - [`runtime`], namespaces, mounts, id maps, cgroups, the per-machine supervisor.
//! - [`network`], bridge, veth, addresses and nftables rules for private networking.
//! - [`manager`], machine state and supervision for the daemon.
//! - [`dbus`], the `org.rmachines1` bus face; no container logic.
//! - [`systemd`], scopes and machined registration on a systemd host.
//! - [`daemon`], rmachined's orchestration (bus, sd-notify, signals).
//! - [`cli`], `rmachinectl`.

pub mod cli;
pub mod daemon;
pub mod dbus;
pub mod definition;
pub mod image;
pub mod manager;
pub mod network;
pub mod runtime;
pub mod statefile;
pub mod systemd;
