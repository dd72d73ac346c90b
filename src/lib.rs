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

/// Thin forwarders to crate-private checks, for the fuzz targets in `fuzz/`
/// (docs/fuzzing.md); not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// The bus's checks of a machine name, a user, a command and its
    /// environment, as `Manager` methods run them; the error's sentence.
    pub fn dbus_machine_name(name: &str) -> Result<(), String> {
        crate::dbus::validate::machine_name(name).map_err(|e| e.to_string())
    }
    pub fn dbus_user_name(user: &str) -> Result<(), String> {
        crate::dbus::validate::user_name(user).map_err(|e| e.to_string())
    }
    pub fn dbus_command(command: &[String], environment: &[String]) -> Result<(), String> {
        crate::dbus::validate::command_size(command, environment).map_err(|e| e.to_string())?;
        crate::dbus::validate::environment(environment).map_err(|e| e.to_string())
    }
}
