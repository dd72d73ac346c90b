//! The machine manager: the daemon's core. It keeps each machine's state, starts
//! and stops machines through their supervisor processes, and tells listeners
//! what changed. It knows nothing of D-Bus.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::definition::{load_dir, validate_name, Definition};
use crate::image::{self, ImageError};
use crate::network::{self, NetworkConfig};
use crate::runtime::idrange::{self, HostIdFiles};
use crate::runtime::protocol::{self, now_usec, Command, Status};
use crate::runtime::{self, cgroup, enter, paths, supervisor, MachinePlan, RuntimeError};

/// How long a shell waits for the guest's account files.
const GUEST_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub use crate::runtime::protocol::MachineState;

mod images;
pub use images::ImageUse;

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

/// A running machine and the guest user a session runs as.
struct SessionTarget {
    plan: MachinePlan,
    leader: u32,
    user: enter::GuestUser,
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
    InvalidArgument(String),
    #[error("{0}")]
    Io(String),
    #[error("a machine named {0:?} is already defined; pick another name or `rmachinectl remove {0}` first")]
    MachineExists(String),
    #[error(transparent)]
    Image(#[from] ImageError),
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

#[derive(Clone)]
struct SupervisorLink {
    commands: mpsc::UnboundedSender<Command>,
    status: watch::Receiver<Option<Status>>,
}

fn info_from(name: &str, file: &Path, definition: &Result<Definition, String>) -> MachineInfo {
    let (root, autostart, error, state) = match definition {
        Ok(def) => (
            def.root.display().to_string(),
            def.autostart,
            String::new(),
            MachineState::Stopped,
        ),
        Err(err) => (String::new(), false, err.clone(), MachineState::Failed),
    };
    MachineInfo {
        name: name.to_owned(),
        state,
        leader: 0,
        root,
        definition: file.display().to_string(),
        addresses: Vec::new(),
        autostart,
        since: now_usec(),
        error,
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> ManagerError + '_ {
    move |err| ManagerError::Io(format!("{what}: {err}"))
}

impl Manager {
    /// Loads every definition and re-adopts machines whose supervisors still run.
    pub async fn new(config: ManagerConfig) -> Result<Self, ManagerError> {
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

    /// Connects to a supervisor left by an earlier daemon, if one runs.
    async fn adopt(&self, name: &str) {
        let dir = runtime::machine_dir(&self.inner.config.state_dir, name);
        let Ok(stream) = UnixStream::connect(dir.join(paths::CONTROL)).await else {
            // No supervisor: whatever a dead one left (its cgroup, host
            // directory, socket) goes now.
            let dir_for_cleanup = dir.clone();
            let name = name.to_owned();
            let _ = tokio::task::spawn_blocking(move || {
                supervisor::remove_leftovers(&dir_for_cleanup, &name)
            })
            .await;
            return;
        };
        let plan = std::fs::read(dir.join(paths::PLAN))
            .ok()
            .and_then(|d| serde_json::from_slice::<MachinePlan>(&d).ok());
        tracing::info!(machine = name, "re-adopting a running machine");
        if let Some(entry) = self.lock().get_mut(name) {
            entry.plan = plan;
        }
        let link = self.follow(name, stream);
        let mut status = link.status.clone();
        if let Some(entry) = self.lock().get_mut(name) {
            entry.supervisor = Some(link);
        }
        // The supervisor greets with its status: have it before serving.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), status.changed()).await;
    }

    /// Starts a task that reads the supervisor's statuses into the entry.
    fn follow(&self, name: &str, stream: UnixStream) -> SupervisorLink {
        let (commands, mut command_rx) = mpsc::unbounded_channel::<Command>();
        let (status_tx, status) = watch::channel(None);
        let manager = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            loop {
                tokio::select! {
                    line = lines.next_line() => match line {
                        Ok(Some(line)) => match protocol::decode_line::<Status>(line.as_bytes()) {
                            Ok(st) => {
                                manager.apply_status(&name, &st);
                                let _ = status_tx.send(Some(st.clone()));
                                manager.sync_registration(&name, &st).await;
                            }
                            Err(err) => tracing::warn!(machine = %name, %err, "bad status from supervisor"),
                        },
                        _ => break,
                    },
                    Some(command) = command_rx.recv() => {
                        let Ok(line) = protocol::encode_line(&command) else { break };
                        if write.write_all(&line).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // The supervisor is gone: its last word is in state.json.
            let dir = runtime::machine_dir(&manager.inner.config.state_dir, &name);
            let mut last = supervisor::read_state(&dir).unwrap_or(Status {
                state: MachineState::Failed,
                leader: 0,
                supervisor: 0,
                since: now_usec(),
                error: "the supervisor exited without a final state".into(),
                boots: 0,
            });
            let died = last.state.is_active();
            if died {
                last.state = MachineState::Failed;
                last.error = format!(
                    "the supervisor died unexpectedly; see {}",
                    dir.join(paths::SUPERVISOR_LOG).display()
                );
            }
            last.leader = 0;
            manager.sync_registration(&name, &last).await;
            let (plan, restart) = match manager.lock().get_mut(&name) {
                Some(entry) => {
                    entry.supervisor = None;
                    let restart = entry.definition.as_ref().map(|d| d.restart).ok();
                    (entry.plan.take(), restart)
                }
                None => (None, None),
            };
            if died {
                // Its machine died with it (PDEATHSIG); what it would have
                // cleaned up is cleaned here, before anyone starts it again.
                let cleanup_name = name.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    supervisor::remove_leftovers(&dir, &cleanup_name);
                    if let Some(net) = plan.as_ref().and_then(|p| p.network.as_ref()) {
                        if let Err(err) = network::firewall::leave(net) {
                            tracing::warn!(machine = %cleanup_name, %err, "removing a dead supervisor's network");
                        }
                    }
                })
                .await;
            }
            manager.apply_status(&name, &last);
            let _ = status_tx.send(Some(last));
            manager.forget_if_undefined(&name);
            let restart_policy = restart.is_some_and(|r| r != crate::definition::RestartPolicy::No);
            if died && restart_policy {
                tracing::warn!(machine = %name, "the supervisor died; restarting the machine (restart policy)");
                let manager = manager.clone();
                tokio::spawn(async move {
                    if let Err(err) = manager.start(&name).await {
                        tracing::error!(machine = %name, %err, "restart after the supervisor's death failed");
                    }
                });
            }
        });
        SupervisorLink { commands, status }
    }

    fn apply_status(&self, name: &str, status: &Status) {
        let event = {
            let mut machines = self.lock();
            let Some(entry) = machines.get_mut(name) else {
                return;
            };
            let addresses = match (&entry.plan, status.state.is_active()) {
                (Some(plan), true) => plan
                    .network
                    .as_ref()
                    .map(|net| net.addresses())
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            let info = &mut entry.info;
            let changed_state = info.state != status.state;
            let changed_other = info.leader != status.leader
                || info.error != status.error
                || info.addresses != addresses;
            info.addresses = addresses;
            info.state = status.state;
            info.leader = status.leader;
            if status.state != MachineState::Stopped || info.error.is_empty() || changed_state {
                info.error = status.error.clone();
            }
            if changed_state {
                info.since = status.since;
                Some(Event::StateChanged {
                    name: name.to_owned(),
                    state: status.state,
                })
            } else if changed_other {
                Some(Event::InfoChanged {
                    name: name.to_owned(),
                })
            } else {
                None
            }
        };
        if let Some(event) = event {
            self.emit(event);
        }
    }

    fn set_state(&self, name: &str, state: MachineState, error: String) {
        let changed = {
            let mut machines = self.lock();
            let Some(entry) = machines.get_mut(name) else {
                return;
            };
            let changed = entry.info.state != state || entry.info.error != error;
            if entry.info.state != state {
                entry.info.since = now_usec();
            }
            entry.info.state = state;
            entry.info.error = error;
            changed
        };
        if changed {
            self.emit(Event::StateChanged {
                name: name.to_owned(),
                state,
            });
        }
    }

    /// Returns once init is executing; the state then goes on to `running`.
    pub async fn start(&self, name: &str) -> Result<(), ManagerError> {
        check_name(name)?;
        let definition = {
            let mut machines = self.lock();
            let entry = machines
                .get_mut(name)
                .ok_or_else(|| ManagerError::NoSuchMachine(name.to_owned()))?;
            let definition =
                entry
                    .definition
                    .clone()
                    .map_err(|error| ManagerError::InvalidDefinition {
                        name: name.to_owned(),
                        error,
                    })?;
            if entry.supervisor.is_some() || entry.info.state.is_active() {
                return Err(ManagerError::AlreadyRunning(name.to_owned()));
            }
            entry.info.state = MachineState::Starting;
            entry.info.since = now_usec();
            entry.info.error.clear();
            definition
        };
        self.emit(Event::StateChanged {
            name: name.to_owned(),
            state: MachineState::Starting,
        });
        match self.launch(name, definition).await {
            Ok(mut status) => {
                // Wait until init executes (leader known) or the boot failed.
                loop {
                    let current = status.borrow_and_update().clone();
                    if let Some(st) = current {
                        // `boots`: init was executed, even if it ended
                        // before we looked (a command that exits at once).
                        if st.leader != 0 || st.state == MachineState::Running || st.boots > 0 {
                            return Ok(());
                        }
                        if !st.state.is_active() {
                            return Err(ManagerError::Failed {
                                name: name.to_owned(),
                                message: if st.error.is_empty() {
                                    format!("machine ended while starting ({})", st.state)
                                } else {
                                    st.error
                                },
                            });
                        }
                    }
                    if status.changed().await.is_err() {
                        return Err(ManagerError::Failed {
                            name: name.to_owned(),
                            message: "the supervisor went away".into(),
                        });
                    }
                }
            }
            Err(err) => {
                self.set_state(name, MachineState::Failed, err.to_string());
                Err(err)
            }
        }
    }

    async fn launch(
        &self,
        name: &str,
        definition: Definition,
    ) -> Result<watch::Receiver<Option<Status>>, ManagerError> {
        let config = self.inner.config.clone();
        let helper = self.inner.helper.clone();
        let owned_name = name.to_owned();
        let failed = |message: String| ManagerError::Failed {
            name: name.to_owned(),
            message,
        };
        let systemd = self.inner.systemd.get().cloned();
        let held = systemd.is_some();
        let stop_timeout = definition.stop_timeout;
        let (plan, launched) = tokio::task::spawn_blocking(
            move || -> Result<(MachinePlan, supervisor::Launched), String> {
                let layer = match &definition.image {
                    Some(_) if !definition.ephemeral && !definition.read_only => Some(
                        image::prepare_layer(&config.storage_dir, &owned_name, &definition.root)
                            .map_err(|e| e.to_string())?,
                    ),
                    _ => None,
                };
                let ids = idrange::assign_range(
                    &config.storage_dir,
                    &owned_name,
                    &definition.users,
                    &HostIdFiles::default(),
                )
                .map_err(|e| e.to_string())?;
                let network =
                    network::plan_network(&definition, &config.network, &config.storage_dir)
                        .map_err(|e| e.to_string())?;
                let plan = MachinePlan {
                    ids,
                    machine_dir: runtime::machine_dir(&config.state_dir, &owned_name),
                    cgroup: cgroup::machine_cgroup_path(&owned_name).map_err(|e| e.to_string())?,
                    layer,
                    definition,
                    network,
                };
                // A machine root without init fails here with a clear sentence.
                runtime::container::inspect_init(&plan).map_err(|e| e.to_string())?;
                let launched = if held {
                    supervisor::launch_held(&helper, &plan)
                } else {
                    supervisor::launch(&helper, &plan)
                };
                Ok((plan, launched.map_err(|e| e.to_string())?))
            },
        )
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(failed)?;
        let (plan, control) = match systemd {
            Some(host) => self
                .enter_scope(&host, name, plan, launched, stop_timeout)
                .await
                .map_err(failed)?,
            None => tokio::task::spawn_blocking(move || finish_launch(plan, launched))
                .await
                .map_err(|e| failed(e.to_string()))?
                .map_err(failed)?,
        };
        let stream = UnixStream::from_std(control)
            .map_err(|e| failed(format!("connecting to the supervisor: {e}")))?;
        // The plan goes in first so the first status already shows the addresses.
        if let Some(entry) = self.lock().get_mut(name) {
            entry.plan = Some(plan);
        }
        let link = self.follow(name, stream);
        let status = link.status.clone();
        if let Some(entry) = self.lock().get_mut(name) {
            entry.supervisor = Some(link);
        }
        Ok(status)
    }

    /// On a systemd host: puts the held supervisor in the machine's new
    /// scope (in the scope's `supervisor` cgroup), plans the machine's
    /// cgroup below the scope, and releases the supervisor.
    async fn enter_scope(
        &self,
        host: &crate::systemd::Host,
        name: &str,
        mut plan: MachinePlan,
        mut launched: supervisor::Launched,
        stop_timeout: std::time::Duration,
    ) -> Result<(MachinePlan, std::os::unix::net::UnixStream), String> {
        let pid = launched.child.id();
        let scope = match host.start_scope(name, pid, stop_timeout).await {
            Ok(scope) => scope,
            Err(err) => {
                // Unreleased, the held process exits at once.
                drop(launched.hold.take());
                let _ = tokio::task::spawn_blocking(move || launched.child.wait()).await;
                return Err(format!("creating its scope unit: {err}"));
            }
        };
        tracing::info!(machine = name, unit = %scope.unit, cgroup = %scope.cgroup.display(), "machine scope started");
        plan.cgroup = crate::systemd::payload_cgroup(&scope.cgroup);
        tokio::task::spawn_blocking(move || {
            let supervisor_cgroup = crate::systemd::supervisor_cgroup(&scope.cgroup);
            crate::systemd::move_into(&supervisor_cgroup, pid).map_err(|e| {
                format!(
                    "moving the supervisor into {}: {e}",
                    supervisor_cgroup.display()
                )
            })?;
            let plan_file = plan.machine_dir.join(paths::PLAN);
            let data = serde_json::to_vec_pretty(&plan).map_err(|e| e.to_string())?;
            crate::statefile::write_atomic(&plan_file, &data)
                .map_err(|e| format!("{} {}: {}", e.action, e.path.display(), e.source))?;
            launched.release().map_err(|e| e.to_string())?;
            finish_launch(plan, launched)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Graceful stop, SIGKILL after the stop timeout; returns once stopped.
    pub async fn stop(&self, name: &str) -> Result<(), ManagerError> {
        check_name(name)?;
        let link = {
            let machines = self.lock();
            let entry = machines
                .get(name)
                .ok_or_else(|| ManagerError::NoSuchMachine(name.to_owned()))?;
            entry
                .supervisor
                .clone()
                .ok_or_else(|| ManagerError::NotRunning(name.to_owned()))?
        };
        let mut status = link.status;
        let _ = link.commands.send(Command::Stop);
        loop {
            let done = status
                .borrow_and_update()
                .as_ref()
                .is_some_and(|st| !st.state.is_active());
            if done {
                break;
            }
            if status.changed().await.is_err() {
                break;
            }
        }
        // The follower clears the link after the supervisor's exit, then
        // drops the sender: that ends the wait, without polling.
        while status.changed().await.is_ok() {}
        Ok(())
    }

    /// Starts `command` (empty: the user's login shell) as `user` (empty: root)
    /// on a new pty inside the machine. `environment` holds `K=V` strings.
    pub async fn shell(
        &self,
        name: &str,
        user: &str,
        command: Vec<String>,
        environment: Vec<String>,
    ) -> Result<ShellSession, ManagerError> {
        let target = self.session_target(name, user, &environment).await?;
        let failed = |message: String| ManagerError::Failed {
            name: name.to_owned(),
            message,
        };
        let (master, slave) = enter::open_guest_pty(
            target.leader as i32,
            target.plan.ids.base + target.user.uid,
            target.plan.ids.base + 5,
        )
        .map_err(|e| failed(e.to_string()))?;
        let term = environment
            .iter()
            .find_map(|e| e.strip_prefix("TERM="))
            .unwrap_or("xterm-256color")
            .to_owned();
        let stdio = || slave.try_clone().map_err(|e| failed(e.to_string()));
        let stdio = [stdio()?, stdio()?, stdio()?];
        drop(slave);
        let session = self.spawn_session(name, target, &term, command, environment, stdio, true)?;
        Ok(ShellSession {
            pty_master: master,
            session,
        })
    }

    /// Starts `command` (empty: the user's login shell) as `user` (empty:
    /// root) inside the machine with `stdio` (the caller's descriptors) as
    /// its fd 0, 1 and 2: no pty, no relay. Returns the session number that
    /// [`Event::ShellExited`] reports.
    pub async fn execute(
        &self,
        name: &str,
        user: &str,
        command: Vec<String>,
        environment: Vec<String>,
        stdio: [OwnedFd; 3],
    ) -> Result<u32, ManagerError> {
        let target = self.session_target(name, user, &environment).await?;
        let term = environment
            .iter()
            .find_map(|e| e.strip_prefix("TERM="))
            .unwrap_or("dumb")
            .to_owned();
        self.spawn_session(name, target, &term, command, environment, stdio, false)
    }

    fn sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u32, oneshot::Sender<()>>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a session whose caller went away: its command gets SIGHUP (as
    /// from a terminal hangup), the helpers SIGKILL. Returns whether it ran.
    pub fn hang_up(&self, session: u32) -> bool {
        self.sessions()
            .remove(&session)
            .is_some_and(|hang_up| hang_up.send(()).is_ok())
    }

    /// Whether a session is still running.
    pub fn session_running(&self, session: u32) -> bool {
        self.sessions().contains_key(&session)
    }

    /// Checks what a shell session needs: a running machine, the user in it.
    async fn session_target(
        &self,
        name: &str,
        user: &str,
        environment: &[String],
    ) -> Result<SessionTarget, ManagerError> {
        check_name(name)?;
        if let Some(bad) = environment
            .iter()
            .find(|e| !e.contains('=') || e.starts_with('='))
        {
            return Err(ManagerError::InvalidArgument(format!(
                "environment entry {bad:?} is not of the form KEY=VALUE"
            )));
        }
        let (plan, leader) = {
            let machines = self.lock();
            let entry = machines
                .get(name)
                .ok_or_else(|| ManagerError::NoSuchMachine(name.to_owned()))?;
            match (&entry.plan, entry.info.leader) {
                (Some(plan), leader) if leader != 0 && entry.info.state.is_active() => {
                    (plan.clone(), leader)
                }
                _ => return Err(ManagerError::NotRunning(name.to_owned())),
            }
        };
        // The guest's passwd is untrusted: read off the async workers, with
        // a deadline, and its ids checked against the machine's range.
        let lookup = {
            let (user, size) = (user.to_owned(), plan.ids.size);
            tokio::task::spawn_blocking(move || {
                let found = enter::resolve_user(leader as i32, &user)?;
                enter::check_ids(&found, size).map(|()| found)
            })
        };
        let lookup = match tokio::time::timeout(GUEST_LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(enter::EnterError::Runtime(RuntimeError::Setup {
                step: "looking the user up".into(),
                message: join.to_string(),
            })),
            Err(_) => Err(enter::EnterError::Runtime(RuntimeError::Setup {
                step: "looking the user up in the guest's /etc/passwd".into(),
                message: format!("no answer within {GUEST_LOOKUP_TIMEOUT:?}"),
            })),
        };
        let user = lookup.map_err(|err| match err {
            enter::EnterError::NoSuchUser(user) => ManagerError::NoSuchUser {
                machine: name.to_owned(),
                user,
            },
            enter::EnterError::NotRunning(_) => ManagerError::NotRunning(name.to_owned()),
            other => ManagerError::Failed {
                name: name.to_owned(),
                message: other.to_string(),
            },
        })?;
        Ok(SessionTarget { plan, leader, user })
    }

    /// Runs the enter helper with `stdio` and reports its end as
    /// [`Event::ShellExited`].
    #[allow(clippy::too_many_arguments)]
    fn spawn_session(
        &self,
        name: &str,
        target: SessionTarget,
        term: &str,
        command: Vec<String>,
        environment: Vec<String>,
        stdio: [OwnedFd; 3],
        controlling_tty: bool,
    ) -> Result<u32, ManagerError> {
        let failed = |message: String| ManagerError::Failed {
            name: name.to_owned(),
            message,
        };
        let spec = enter::EnterSpec {
            leader: target.leader as i32,
            cgroup: target.plan.cgroup.clone(),
            env: enter::environment(&target.user, term, &environment),
            argv: command,
            user: target.user,
            controlling_tty,
            seccomp_cache: Some(self.inner.config.state_dir.clone()),
        };
        let mut std_command =
            enter::spec_command(&self.inner.helper, &spec).map_err(|e| failed(e.to_string()))?;
        let [stdin, stdout, stderr] = stdio;
        std_command
            .stdin(std::process::Stdio::from(stdin))
            .stdout(std::process::Stdio::from(stdout))
            .stderr(std::process::Stdio::from(stderr));
        let mut child = tokio::process::Command::from(std_command)
            .spawn()
            .map_err(|e| failed(format!("starting the command: {e}")))?;
        // The Command (and with it our copies of the caller's descriptors
        // and the spec memfd) is gone once spawned.
        let session = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let (hang_up, mut hung_up) = oneshot::channel();
        self.sessions().insert(session, hang_up);
        let manager = self.clone();
        tokio::spawn(async move {
            let waited = tokio::select! {
                waited = child.wait() => waited,
                Ok(()) = &mut hung_up => {
                    // The helper's death takes the command along
                    // (PDEATHSIG, see runtime::enter).
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let status = match waited {
                Ok(st) => st.code().unwrap_or_else(|| {
                    128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)
                }),
                Err(_) => 255,
            };
            manager.sessions().remove(&session);
            manager.emit(Event::ShellExited { session, status });
        });
        Ok(session)
    }

    /// The machine's console log, opened read-only: the rotated file
    /// (`console.log.1`) first when there is one, then the current one.
    /// Empty when the machine never ran.
    pub fn console_logs(&self, name: &str) -> Result<Vec<OwnedFd>, ManagerError> {
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
                Err(err) => {
                    return Err(ManagerError::Io(format!(
                        "opening {}: {err}",
                        path.display()
                    )))
                }
            }
        }
        Ok(logs)
    }

    /// Re-reads the definitions; running machines are not disturbed.
    pub async fn reload(&self) -> Result<ReloadSummary, ManagerError> {
        let dir = self.inner.config.config_dir.clone();
        let images = crate::image::images_dir(&self.inner.config.storage_dir);
        let loaded = tokio::task::spawn_blocking(move || load_dir(&dir, &images))
            .await
            .map_err(|e| ManagerError::Io(e.to_string()))?;
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => {
                return Err(ManagerError::Io(format!(
                    "reading {}: {err}",
                    self.inner.config.config_dir.display()
                )))
            }
        };
        let mut summary = ReloadSummary::default();
        let mut events = Vec::new();
        let mut changed_limits = Vec::new();
        {
            let mut machines = self.lock();
            let mut seen = std::collections::BTreeSet::new();
            for item in loaded {
                seen.insert(item.name.clone());
                let definition = item.result.map_err(|e| e.to_string());
                let fresh = info_from(&item.name, &item.file, &definition);
                match machines.get_mut(&item.name) {
                    Some(entry) => {
                        let info = &mut entry.info;
                        let before = info.clone();
                        info.root = fresh.root;
                        info.autostart = fresh.autostart;
                        info.definition = fresh.definition;
                        if let (Some(link), Some(plan), Ok(new)) =
                            (&entry.supervisor, &entry.plan, &definition)
                        {
                            if plan.definition.resources != new.resources {
                                changed_limits.push((
                                    item.name.clone(),
                                    plan.clone(),
                                    new.resources,
                                    link.commands.clone(),
                                ));
                            }
                        }
                        if entry.supervisor.is_none() {
                            match (&entry.definition, &definition) {
                                // Newly broken: shown as failed with why.
                                (_, Err(_)) => {
                                    info.state = MachineState::Failed;
                                    info.error = fresh.error;
                                }
                                // Repaired: back to stopped.
                                (Err(_), Ok(_)) => {
                                    info.state = MachineState::Stopped;
                                    info.error.clear();
                                }
                                (Ok(_), Ok(_)) => {}
                            }
                        } else {
                            // A running machine keeps what it was started
                            // with; its Error shows a file it could not
                            // start again with, until the file is fixed.
                            match (&entry.definition, &definition) {
                                (_, Err(error)) => info.error = error.clone(),
                                (Err(old), Ok(_)) if *old == info.error => info.error.clear(),
                                _ => {}
                            }
                        }
                        if before.state != info.state {
                            events.push(Event::StateChanged {
                                name: item.name.clone(),
                                state: info.state,
                            });
                        } else if *info != before {
                            events.push(Event::InfoChanged {
                                name: item.name.clone(),
                            });
                        }
                        entry.definition = definition;
                    }
                    None => {
                        summary.added.push(item.name.clone());
                        events.push(Event::MachineAdded {
                            name: item.name.clone(),
                        });
                        machines.insert(
                            item.name.clone(),
                            Entry {
                                info: fresh,
                                definition,
                                supervisor: None,
                                plan: None,
                                registered: 0,
                                registration_for: 0,
                            },
                        );
                    }
                }
            }
            let gone: Vec<String> = machines
                .keys()
                .filter(|n| !seen.contains(*n))
                .cloned()
                .collect();
            for name in gone {
                let Some(entry) = machines.get_mut(&name) else {
                    continue;
                };
                if entry.supervisor.is_some() {
                    // Keeps running; forgotten when it stops.
                    entry.definition = Err("the definition file was removed".into());
                    continue;
                }
                machines.remove(&name);
                summary.removed.push(name.clone());
                events.push(Event::MachineRemoved { name });
            }
        }
        for event in events {
            self.emit(event);
        }
        // The file is the truth: a running machine takes its new limits now.
        let mut failures = Vec::new();
        for (name, plan, resources, commands) in changed_limits {
            let applied = tokio::task::spawn_blocking(move || {
                runtime::resources::update(&plan, &resources).map(|()| resources)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
            match applied {
                Ok(resources) => {
                    tracing::info!(machine = name, "applied the new [resources]");
                    if let Some(plan) = self.lock().get_mut(&name).and_then(|e| e.plan.as_mut()) {
                        plan.definition.resources = resources;
                    }
                    let _ = commands.send(Command::SetResources(resources));
                }
                Err(message) => {
                    tracing::warn!(machine = name, "{message}");
                    failures.push(format!("{name}: {message}"));
                }
            }
        }
        if !failures.is_empty() {
            return Err(ManagerError::Io(format!(
                "definitions reloaded, but new limits could not be applied to running machines: {}",
                failures.join("; ")
            )));
        }
        Ok(summary)
    }

    /// A machine's resource accounting, read from its cgroups now
    /// ([`runtime::resources::Usage::UNKNOWN`] when it is not running).
    pub fn usage(&self, name: &str) -> runtime::resources::Usage {
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

    fn forget_if_undefined(&self, name: &str) {
        let removed = {
            let mut machines = self.lock();
            let file = machines
                .get(name)
                .map(|e| PathBuf::from(&e.info.definition));
            match file {
                Some(file) if !file.exists() => machines.remove(name).is_some(),
                _ => false,
            }
        };
        if removed {
            self.emit(Event::MachineRemoved {
                name: name.to_owned(),
            });
        }
    }

    /// Starts every machine with `autostart = true`, without waiting for them.
    pub fn autostart(&self) {
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

    /// Uses the host's systemd from now on: machines start in scopes and
    /// are registered with machined; running (re-adopted) machines are
    /// registered now if they are not yet.
    pub async fn use_systemd(&self, host: crate::systemd::Host) {
        if self.inner.systemd.set(host).is_err() {
            return;
        }
        let running: Vec<(String, MachineState, u32)> = self
            .lock()
            .values()
            .filter(|e| e.supervisor.is_some())
            .map(|e| (e.info.name.clone(), e.info.state, e.info.leader))
            .collect();
        for (name, state, leader) in running {
            let status = Status {
                state,
                leader,
                supervisor: 0,
                since: 0,
                error: String::new(),
                boots: 0,
            };
            self.sync_registration(&name, &status).await;
        }
    }

    /// Keeps machined's record of `name` in line with its supervisor's
    /// `status`: registered with the current leader while it is active,
    /// unregistered when it stops. Failures are warnings: machined is not
    /// needed for a machine to run.
    async fn sync_registration(&self, name: &str, status: &Status) {
        let Some(host) = self.inner.systemd.get() else {
            return;
        };
        let wanted = if status.state.is_active() {
            status.leader
        } else {
            0
        };
        let (registered, plan) = {
            let mut machines = self.lock();
            let Some(entry) = machines.get_mut(name) else {
                return;
            };
            if entry.registration_for == wanted {
                return;
            }
            entry.registration_for = wanted;
            (entry.registered, entry.plan.clone())
        };
        if registered != 0 {
            match host.unregister(name).await {
                Ok(()) => tracing::debug!(machine = name, "unregistered from machined"),
                Err(err) => tracing::warn!(machine = name, %err, "cannot unregister from machined"),
            }
        }
        let mut now = 0;
        if let (Some(plan), true) = (plan, wanted != 0) {
            let registration = {
                let name = name.to_owned();
                tokio::task::spawn_blocking(move || registration(&name, &plan, wanted)).await
            };
            let outcome = match registration {
                Ok(registration) => host.register(&registration).await,
                Err(err) => {
                    tracing::warn!(machine = name, %err, "cannot register with machined");
                    return;
                }
            };
            match outcome {
                Ok(crate::systemd::Registered::Yes) => {
                    tracing::info!(machine = name, leader = wanted, "registered with machined");
                    now = wanted;
                }
                Ok(crate::systemd::Registered::Already) => now = wanted,
                Ok(crate::systemd::Registered::Clash(why)) => tracing::warn!(
                    machine = name,
                    "not registered with machined: {why}; the machine runs anyway"
                ),
                Ok(crate::systemd::Registered::NoMachined) => tracing::debug!(
                    machine = name,
                    "systemd-machined is not on the bus; not registered"
                ),
                Err(err) => tracing::warn!(
                    machine = name,
                    %err,
                    "cannot register with machined; the machine runs anyway"
                ),
            }
        }
        if let Some(entry) = self.lock().get_mut(name) {
            entry.registered = now;
        }
    }

    /// How many machines have a supervisor (starting, running or stopping).
    pub fn active_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| e.supervisor.is_some())
            .count()
    }

    /// How many machines are running (for the daemon's status line).
    pub fn running_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| e.info.state == MachineState::Running)
            .count()
    }
}

/// Reaps the launcher (it exits as soon as the supervisor forked away) and
/// readies the control connection for tokio.
fn finish_launch(
    plan: MachinePlan,
    mut launched: supervisor::Launched,
) -> Result<(MachinePlan, std::os::unix::net::UnixStream), String> {
    let _ = launched.child.wait();
    launched
        .control
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    Ok((plan, launched.control))
}

/// What machined is told about a machine with `leader` as init.
fn registration(name: &str, plan: &MachinePlan, leader: u32) -> crate::systemd::Registration {
    let id =
        crate::systemd::machine_id_bytes(&runtime::container::machine_id(plan)).unwrap_or_default();
    let ifindex = plan.network.as_ref().and_then(|net| {
        nix::net::if_::if_nametoindex(net.host_veth.as_str())
            .ok()
            .and_then(|index| i32::try_from(index).ok())
    });
    crate::systemd::Registration {
        name: name.to_owned(),
        id,
        leader,
        root: plan.definition.root.display().to_string(),
        ifindex,
    }
}

fn check_name(name: &str) -> Result<(), ManagerError> {
    validate_name(name).map_err(|err| ManagerError::InvalidName(err.to_string()))
}
