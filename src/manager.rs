//! The machine manager: the daemon's core. It keeps each machine's state, starts
//! and stops machines through their supervisor processes, and tells listeners
//! what changed. It knows nothing of D-Bus.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use crate::runtime::protocol::MachineState;

/// A snapshot of one machine, everything the Machine object exposes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub name: String,
    pub state: MachineState,
    /// Host PID of the machine's init; 0 when not running.
    pub leader: u32,
    pub root: String,
    /// Path of the definition file.
    pub definition: String,
    pub addresses: Vec<String>,
    pub autostart: bool,
    /// Realtime microseconds of the last state change.
    pub since: u64,
    /// Why the definition is invalid or the last start/run failed; empty if none.
    pub error: String,
}

/// What the manager tells its listeners.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A machine's state (and with it its snapshot) changed.
    StateChanged { name: String, state: MachineState },
    /// A property other than the state changed (addresses, error, ...).
    InfoChanged { name: String },
    /// A shell session's process ended; `status` is the exit code or 128+signal.
    ShellExited { session: u32, status: i32 },
    /// `Reload` found a new definition.
    MachineAdded { name: String },
    /// `Reload` found a definition gone (and the machine not running).
    MachineRemoved { name: String },
}

/// Where the daemon keeps things.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub storage_dir: PathBuf,
}

/// A shell session started by [`Manager::shell`].
#[derive(Debug)]
pub struct ShellSession {
    pub pty_master: OwnedFd,
    pub session: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    InvalidName(String),
    #[error("no machine named {0:?} is defined (definitions live in the config directory)")]
    NoSuchMachine(String),
    #[error("machine {name:?} has an invalid definition: {error}")]
    InvalidDefinition { name: String, error: String },
    #[error("machine {0:?} is already running")]
    AlreadyRunning(String),
    #[error("machine {0:?} is not running")]
    NotRunning(String),
    #[error("machine {machine:?} has no user {user:?} in its /etc/passwd")]
    NoSuchUser { machine: String, user: String },
    #[error("machine {name:?}: {message}")]
    Failed { name: String, message: String },
    #[error("{0}")]
    Io(String),
}

/// The manager handle; cheap to clone, shared by every D-Bus object.
#[derive(Clone)]
pub struct Manager {
    events: broadcast::Sender<Event>,
}

impl Manager {
    /// Loads every definition and re-adopts machines whose supervisors still run.
    pub async fn new(_config: ManagerConfig) -> Result<Self, ManagerError> {
        let (events, _) = broadcast::channel(1024);
        Ok(Manager { events })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Every defined machine, sorted by name.
    pub fn list(&self) -> Vec<MachineInfo> {
        Vec::new()
    }

    pub fn get(&self, name: &str) -> Result<MachineInfo, ManagerError> {
        Err(ManagerError::NoSuchMachine(name.to_owned()))
    }

    /// Returns once init is executing; the state then goes on to `running`.
    pub async fn start(&self, name: &str) -> Result<(), ManagerError> {
        Err(ManagerError::NoSuchMachine(name.to_owned()))
    }

    /// Graceful stop, SIGKILL after the stop timeout; returns once stopped.
    pub async fn stop(&self, name: &str) -> Result<(), ManagerError> {
        Err(ManagerError::NoSuchMachine(name.to_owned()))
    }

    /// Starts `command` (empty: the user's login shell) as `user` (empty: root)
    /// on a new pty inside the machine. `environment` holds `K=V` strings.
    pub async fn shell(
        &self,
        name: &str,
        _user: &str,
        _command: Vec<String>,
        _environment: Vec<String>,
    ) -> Result<ShellSession, ManagerError> {
        Err(ManagerError::NoSuchMachine(name.to_owned()))
    }

    /// Re-reads the definitions; running machines are not disturbed.
    pub async fn reload(&self) -> Result<ReloadSummary, ManagerError> {
        Ok(ReloadSummary::default())
    }

    /// Starts every machine with `autostart = true`, without waiting for them.
    pub fn autostart(&self) {}

    /// Stops every running machine in parallel.
    pub async fn shutdown(&self) {}

    /// How many machines are running (for the daemon's status line).
    pub fn running_count(&self) -> usize {
        0
    }
}
