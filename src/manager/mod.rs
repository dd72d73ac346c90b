//! The machine manager: the daemon's core. It keeps each machine's state,
//! starts and stops machines through their supervisors, and tells listeners
//! what changed. It knows nothing of D-Bus.
//!
//! Where things are decided:
//! - [`state`]: the state machine (every snapshot transition, pure);
//! - [`reload`]: the reload diff (definitions → actions, pure);
//! - [`plan`]: definition + registries → `MachinePlan`, and giving back;
//! - [`link`]: the control socket to one supervisor;
//! - `definitions`: reload (reads the directory, applies the diff);
//! - `lifecycle`: start, stop, adoption, a supervisor's end;
//! - `session`: shells and commands in a running machine;
//! - `machined`: registration with the host's systemd-machined;
//! - `images`: the image verbs.
//!
//! The one table (`Inner::machines`) holds each machine's snapshot; every
//! change to it is emitted, with the snapshot, as an [`Event`].

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, oneshot};

use crate::definition::{validate_name, Definition};
use crate::image::{self, ImageError};
use crate::network::{self, NetworkConfig};
use crate::runtime::{self, enter, paths, MachinePlan, RuntimeError};

mod definitions;
mod images;
mod lifecycle;
mod link;
mod machined;
mod plan;
mod reload;
mod session;
mod state;

pub use crate::runtime::protocol::MachineState;
pub use plan::PlanError;
pub use state::MachineInfo;

use link::SupervisorLink;
use state::Change;

/// What the manager tells its listeners. Changes to a machine carry its
/// snapshot before and after, so a listener needs no copy of its own.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A machine's state (and maybe more of its snapshot) changed.
    StateChanged {
        name: String,
        state: MachineState,
        before: Box<MachineInfo>,
        info: Box<MachineInfo>,
    },
    /// A property other than the state changed (addresses, error, ...).
    InfoChanged {
        name: String,
        before: Box<MachineInfo>,
        info: Box<MachineInfo>,
    },
    /// A shell session's process ended; `status` is the exit code or 128+signal.
    ShellExited { session: u32, status: i32 },
    /// `Reload` found a new definition.
    MachineAdded { name: String },
    /// `Reload` found a definition gone (and the machine not running).
    MachineRemoved { name: String },
    /// An image import read `done` of `total` bytes (0: unknown).
    ImportProgress { name: String, done: u64, total: u64 },
}

/// Where the daemon keeps things.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub storage_dir: PathBuf,
    /// Bridge, subnets and nftables table for private networking.
    pub network: NetworkConfig,
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
    /// Starting, running a command in or talking to machine `name` failed.
    #[error("machine {name:?}: {source}")]
    Failed {
        name: String,
        #[source]
        source: Failure,
    },
    /// The host refused a file operation.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A blocking task of the daemon's ended without an answer.
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("definitions reloaded, but new limits could not be applied to running machines: {}", .0.join("; "))]
    LimitsNotApplied(Vec<String>),
    #[error("a machine named {0:?} is already defined; pick another name or `rmachinectl remove {0}` first")]
    MachineExists(String),
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// What went wrong with one machine ([`ManagerError::Failed`]).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Enter(#[from] enter::EnterError),
    /// The supervisor's own sentence (it comes over the control socket).
    #[error("{0}")]
    Ended(String),
    #[error("the supervisor went away")]
    SupervisorGone,
    #[error("creating its scope unit: {0}")]
    Scope(#[source] Box<crate::systemd::SystemdError>),
    #[error("moving the supervisor into {}: {source}", .cgroup.display())]
    IntoScope {
        cgroup: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} {}: {source}", .path.display())]
    PlanFile {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Encode(#[from] serde_json::Error),
    #[error("connecting to the supervisor: {0}")]
    Connect(#[source] std::io::Error),
    #[error("starting the command: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("looking the user up in the guest's /etc/passwd: no answer within {0:?}")]
    LookupTimedOut(std::time::Duration),
    #[error("looking the user up: {0}")]
    Lookup(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// The manager handle; cheap to clone, shared by every D-Bus object.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    config: ManagerConfig,
    /// The `rmachined` binary, re-executed for supervisors and shells.
    helper: PathBuf,
    machines: Mutex<BTreeMap<String, Entry>>,
    events: broadcast::Sender<Event>,
    next_session: AtomicU32,
    /// The host's systemd, when PID 1 is systemd (see [`Manager::use_systemd`]).
    systemd: std::sync::OnceLock<crate::systemd::Host>,
    /// Running sessions: a word to their waiter hangs the command up.
    sessions: Mutex<std::collections::HashMap<u32, oneshot::Sender<()>>>,
    /// Names of the images being imported.
    imports: Mutex<std::collections::BTreeSet<String>>,
}

struct Entry {
    info: MachineInfo,
    definition: Result<Definition, String>,
    /// Present while a supervisor runs: commands to it, its statuses.
    supervisor: Option<SupervisorLink>,
    /// The plan the running machine was started with.
    plan: Option<MachinePlan>,
    /// The leader machined knows this machine by (0: not registered).
    registered: u32,
    /// The leader the last registration attempt was for (0: none).
    registration_for: u32,
}

impl Entry {
    fn new(info: MachineInfo, definition: Result<Definition, String>) -> Entry {
        Entry {
            info,
            definition,
            supervisor: None,
            plan: None,
            registered: 0,
            registration_for: 0,
        }
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> ManagerError + '_ {
    move |source| ManagerError::Io {
        what: what.to_owned(),
        source,
    }
}

/// The event a state-machine [`Change`] of `name` makes, if any.
fn change_event(
    name: &str,
    change: Change,
    before: MachineInfo,
    info: &MachineInfo,
) -> Option<Event> {
    match change {
        Change::Nothing => None,
        Change::State => Some(Event::StateChanged {
            name: name.to_owned(),
            state: info.state,
            before: Box::new(before),
            info: Box::new(info.clone()),
        }),
        Change::Info => Some(Event::InfoChanged {
            name: name.to_owned(),
            before: Box::new(before),
            info: Box::new(info.clone()),
        }),
    }
}

impl Manager {
    /// Loads every definition and re-adopts machines whose supervisors still run.
    pub(crate) async fn new(config: ManagerConfig) -> Result<Self, ManagerError> {
        let helper = std::env::current_exe().map_err(io_err("finding the rmachined binary"))?;
        Self::with_helper(config, helper).await
    }

    /// Like [`Manager::new`] with an explicit `rmachined` binary (for tests).
    pub async fn with_helper(config: ManagerConfig, helper: PathBuf) -> Result<Self, ManagerError> {
        for dir in [&config.state_dir, &config.storage_dir] {
            std::fs::create_dir_all(dir).map_err(io_err(&format!("creating {}", dir.display())))?;
            // Machine state, consoles and writable layers are root's alone.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(&format!("chmod 0700 {}", dir.display())))?;
        }
        let (events, _) = broadcast::channel(4096);
        let manager = Manager {
            inner: Arc::new(Inner {
                config,
                helper,
                machines: Mutex::new(BTreeMap::new()),
                events,
                next_session: AtomicU32::new(1),
                systemd: std::sync::OnceLock::new(),
                sessions: Mutex::new(std::collections::HashMap::new()),
                imports: Mutex::new(Default::default()),
            }),
        };
        image::remove_leftovers(&image::images_dir(&manager.inner.config.storage_dir));
        manager.reload().await?;
        let names: Vec<String> = manager.lock().keys().cloned().collect();
        for name in names {
            manager.adopt(&name).await;
        }
        // After adoption: what running supervisors own stays, what a dead
        // instance left behind goes.
        manager.cleanup_network().await;
        Ok(manager)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock leaves plain data behind; go on.
        self.inner
            .machines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: Event) {
        let _ = self.inner.events.send(event);
    }

    /// Runs a state-machine transition on `name`'s snapshot under the lock
    /// and emits what it changed. Returns `None` for an unknown machine.
    fn transition<T>(&self, name: &str, step: impl FnOnce(&mut Entry) -> (Change, T)) -> Option<T> {
        let (event, value) = {
            let mut machines = self.lock();
            let entry = machines.get_mut(name)?;
            let before = entry.info.clone();
            let (change, value) = step(entry);
            (change_event(name, change, before, &entry.info), value)
        };
        if let Some(event) = event {
            self.emit(event);
        }
        Some(value)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Every defined machine, sorted by name.
    pub fn list(&self) -> Vec<MachineInfo> {
        self.lock().values().map(|e| e.info.clone()).collect()
    }

    /// A known machine's snapshot. A definition file whose stem is no valid
    /// name is still known (listed `failed`, with why): it is found too, so
    /// one bad file never breaks listing.
    pub fn get(&self, name: &str) -> Result<MachineInfo, ManagerError> {
        if let Some(entry) = self.lock().get(name) {
            return Ok(entry.info.clone());
        }
        check_name(name)?;
        Err(ManagerError::NoSuchMachine(name.to_owned()))
    }

    /// The machine's console log, opened read-only: the rotated file
    /// (`console.log.1`) first when there is one, then the current one.
    /// Empty when the machine never ran.
    pub(crate) fn console_logs(&self, name: &str) -> Result<Vec<OwnedFd>, ManagerError> {
        self.get(name)?;
        let dir = runtime::machine_dir(&self.inner.config.state_dir, name);
        let mut logs = Vec::new();
        for file in [
            format!("{}.1", paths::CONSOLE_LOG),
            paths::CONSOLE_LOG.to_owned(),
        ] {
            let path = dir.join(file);
            match std::fs::File::open(&path) {
                Ok(log) => logs.push(OwnedFd::from(log)),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_err(&format!("opening {}", path.display()))(err)),
            }
        }
        Ok(logs)
    }

    /// A machine's resource accounting, read from its cgroups now
    /// ([`runtime::resources::Usage::UNKNOWN`] when it is not running).
    pub(crate) fn usage(&self, name: &str) -> runtime::resources::Usage {
        let plan = {
            let machines = self.lock();
            match machines.get(name) {
                Some(entry) if entry.supervisor.is_some() && entry.info.leader != 0 => {
                    entry.plan.clone()
                }
                _ => None,
            }
        };
        plan.map_or(runtime::resources::Usage::UNKNOWN, |plan| {
            runtime::resources::usage(&plan)
        })
    }

    /// Starts every machine with `autostart = true`, without waiting for them.
    pub(crate) fn autostart(&self) {
        let names: Vec<String> = self
            .lock()
            .values()
            .filter(|e| e.info.autostart && e.definition.is_ok() && e.supervisor.is_none())
            .map(|e| e.info.name.clone())
            .collect();
        for name in names {
            let manager = self.clone();
            tokio::spawn(async move {
                if let Err(err) = manager.start(&name).await {
                    tracing::error!(machine = %name, %err, "autostart failed");
                }
            });
        }
    }

    /// Stops every running machine in parallel.
    pub async fn shutdown(&self) {
        let names: Vec<String> = self
            .lock()
            .values()
            .filter(|e| e.supervisor.is_some())
            .map(|e| e.info.name.clone())
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for name in names {
            let manager = self.clone();
            tasks.spawn(async move {
                if let Err(err) = manager.stop(&name).await {
                    tracing::warn!(machine = %name, %err, "stop at shutdown failed");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        self.cleanup_network().await;
    }

    /// Removes network leftovers no running supervisor owns (links, the
    /// table and the bridge when nothing runs, IPv4 forwarding restored).
    async fn cleanup_network(&self) {
        let config = self.inner.config.network.clone();
        let result = tokio::task::spawn_blocking(move || network::firewall::cleanup(&config)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "cleaning up the network"),
            Err(err) => tracing::warn!(%err, "cleaning up the network"),
        }
    }

    /// How many machines have a supervisor (starting, running or stopping).
    pub(crate) fn active_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| e.supervisor.is_some())
            .count()
    }

    /// How many machines are running (for the daemon's status line).
    pub(crate) fn running_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| e.info.state == MachineState::Running)
            .count()
    }
}

fn check_name(name: &str) -> Result<(), ManagerError> {
    validate_name(name).map_err(|err| ManagerError::InvalidName(err.to_string()))
}
