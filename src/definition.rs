//! Machine definitions: `/etc/rmachines/<name>.toml` parsed and validated into
//! plain data. Nothing outside this module sees TOML.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A validated machine definition. Every field has its default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub name: String,
    /// The file this definition was read from.
    pub file: PathBuf,
    pub root: PathBuf,
    pub boot: bool,
    pub command: Vec<String>,
    pub hostname: String,
    pub autostart: bool,
    pub restart: RestartPolicy,
    pub environment: BTreeMap<String, String>,
    pub stop_timeout: Duration,
    pub stop_signal: StopSignal,
    pub notify_ready: NotifyReady,
    pub read_only: bool,
    pub ephemeral: bool,
    pub users: Users,
    pub network: Network,
    pub resources: Resources,
    pub binds: Vec<Bind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    No,
    OnFailure,
    Always,
}

/// The signal that asks the guest's init to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopSignal {
    /// Chosen from the init: SIGRTMIN+3 for systemd, SIGUSR2 for busybox init,
    /// SIGTERM otherwise.
    Auto,
    /// A signal number.
    Signal(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotifyReady {
    Auto,
    Yes,
    No,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Users {
    pub base: UidBase,
    pub size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UidBase {
    Pick,
    Fixed(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub mode: NetworkMode,
    pub address: AddressSpec,
    pub nat: bool,
    pub ports: Vec<PortSpec>,
    /// Empty: the bridge rmachined manages.
    pub bridge: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    Private,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressSpec {
    Auto,
    /// An explicit address with its prefix length.
    Cidr(std::net::IpAddr, u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub host_port: u16,
    pub machine_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// Bytes.
    pub memory: Option<u64>,
    /// CPUs, e.g. 1.5.
    pub cpus: Option<f64>,
    pub tasks: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}
