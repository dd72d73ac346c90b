//! The per-machine supervisor: `rmachined __supervise <machine-dir>`.
//!
//! The daemon is a multi-threaded tokio process, where fork is unsafe; it
//! re-executes its own binary in this single-threaded role instead (as runc
//! and youki do). The supervisor is init's parent for the machine's whole
//! life: it boots the container, holds the console pty master and logs the
//! console, reads `READY=1` from the notify socket, stops the guest, reaps
//! init, restarts on guest reboot, and cleans up. It runs in its own session
//! and outlives a crash of the daemon, which re-adopts it through the
//! `control` socket and `state.json`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as ProcessCommand, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixCredentials,
};

use super::container::{self, BootResources, Container, InitKind};
use super::protocol::{self, now_usec, Command, MachineState, Status};
use super::sys::{self, ExitStatus};
use super::{cgroup, paths, MachinePlan, RuntimeError};
use crate::definition::RestartPolicy;

/// The control socket is handed to the supervisor as this descriptor.
const LISTEN_FD: i32 = 3;
/// A held supervisor (see [`launch_held`]) waits on this pipe.
const HOLD_FD: i32 = 4;
/// The argument after the machine directory that says so.
const HELD_ARG: &str = "--held";
/// How often a stop signal is re-checked until init has a handler for it.
const STOP_TICK: Duration = Duration::from_millis(50);
/// How often the stop signal is re-sent to an init that shows no handler.
const STOP_RESEND: Duration = Duration::from_secs(1);
/// At most this many restarts (reboots, restart policy) within the window.
const RESTART_BURST: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(10);
/// console.log rotates to console.log.1 past this size: a guest writing
/// to its console in a loop cannot fill the host's /run.
pub const CONSOLE_LOG_MAX: u64 = 4 << 20;
/// Console reads and notify messages handled per wakeup of the loop.
const READS_PER_WAKEUP: usize = 64;

/// A supervisor just launched: the launcher child (it exits at once, as the
/// supervisor forks away from it; reap it) and a connection to the control
/// socket, made before the supervisor ran, so even a supervisor that fails
/// and exits at once is heard.
pub struct Launched {
    pub child: Child,
    pub control: UnixStream,
    /// The write end a held supervisor waits on; see [`Launched::release`].
    pub hold: Option<File>,
}

impl Launched {
    /// Lets a held supervisor go on: it reads its plan (as it is on disk
    /// now) and boots. Dropping an unreleased `Launched` makes it exit.
    pub fn release(&mut self) -> Result<(), RuntimeError> {
        if let Some(mut hold) = self.hold.take() {
            hold.write_all(b"1")
                .map_err(RuntimeError::io("releasing the held supervisor"))?;
        }
        Ok(())
    }
}

/// Writes the plan, binds the control socket and starts
/// `helper __supervise <machine-dir>` in a session of its own.
pub fn launch(helper: &Path, plan: &MachinePlan) -> Result<Launched, RuntimeError> {
    launch_inner(helper, plan, false)
}

/// Like [`launch`], but the process waits, before it reads its plan or
/// forks, until [`Launched::release`]: time for the daemon to put it in a
/// scope unit and rewrite the plan (see `crate::systemd`). `child.id()` is
/// the process to move.
pub fn launch_held(helper: &Path, plan: &MachinePlan) -> Result<Launched, RuntimeError> {
    launch_inner(helper, plan, true)
}

fn launch_inner(helper: &Path, plan: &MachinePlan, held: bool) -> Result<Launched, RuntimeError> {
    let dir = &plan.machine_dir;
    fs::create_dir_all(dir).map_err(RuntimeError::io(format!("creating {}", dir.display())))?;
    // Only root may reach a machine's state: its plan (environment), its
    // console, its control socket.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(RuntimeError::io(format!("chmod {}", dir.display())))?;
    let plan_json = serde_json::to_vec_pretty(plan).map_err(|err| RuntimeError::Setup {
        step: "writing the plan".into(),
        message: err.to_string(),
    })?;
    write_atomic(&dir.join(paths::PLAN), &plan_json)?;
    let _ = fs::remove_file(dir.join(paths::STATE));
    let control = dir.join(paths::CONTROL);
    let _ = fs::remove_file(&control);
    let listener = UnixListener::bind(&control)
        .map_err(RuntimeError::io(format!("binding {}", control.display())))?;
    fs::set_permissions(&control, fs::Permissions::from_mode(0o600))
        .map_err(RuntimeError::io("chmod control socket"))?;
    // Queued in the backlog until the supervisor accepts it.
    let client = UnixStream::connect(&control).map_err(RuntimeError::io(format!(
        "connecting to {}",
        control.display()
    )))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(paths::SUPERVISOR_LOG))
        .map_err(RuntimeError::io("opening the supervisor log"))?;
    let log_err = log.try_clone().map_err(RuntimeError::io("dup log"))?;
    let listen_raw = listener.as_raw_fd();
    let (hold_read, hold_write) = if held {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| RuntimeError::io("creating the hold pipe")(e.into()))?;
        (Some(read), Some(File::from(write)))
    } else {
        (None, None)
    };
    let hold_raw = hold_read.as_ref().map(|fd| fd.as_raw_fd());
    let mut command = ProcessCommand::new(helper);
    command.arg("__supervise").arg(dir);
    if held {
        command.arg(HELD_ARG);
    }
    command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("WATCHDOG_USEC");
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (setsid, dup2, fcntl).
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Out of the way of LISTEN_FD first (a close-on-exec copy).
            let hold_high = match hold_raw {
                Some(raw) => {
                    let high = libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 10);
                    if high < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Some(high)
                }
                None => None,
            };
            if listen_raw == LISTEN_FD {
                let flags = libc::fcntl(LISTEN_FD, libc::F_GETFD);
                libc::fcntl(LISTEN_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(listen_raw, LISTEN_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(high) = hold_high {
                if libc::dup2(high, HOLD_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(RuntimeError::io(format!(
        "starting supervisor {}",
        helper.display()
    )))?;
    drop(listener);
    drop(hold_read);
    Ok(Launched {
        child,
        control: client,
        hold: hold_write,
    })
}

/// A held supervisor waits for the daemon's go: one byte on [`HOLD_FD`].
/// End of file (the daemon gave up this start) means exit.
fn wait_until_released() -> bool {
    // SAFETY: HOLD_FD was handed to us by `launch_held`; we own it now.
    let mut hold = unsafe { File::from_raw_fd(HOLD_FD) };
    let mut byte = [0u8; 1];
    loop {
        match hold.read(&mut byte) {
            Ok(1) => return true,
            Ok(_) => return false,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), RuntimeError> {
    crate::statefile::write_atomic(path, data)
        .map_err(|e| RuntimeError::io(format!("{} {}", e.action, e.path.display()))(e.source))
}

/// Removes what a supervisor that died without cleaning up (SIGKILL, a
/// crash of the host's OOM killer) left: its machine's cgroup, the host
/// directory, the root mount point and the stale control socket. Called for
/// machines no live supervisor answers for.
pub fn remove_leftovers(machine_dir: &Path, name: &str) {
    // The planned cgroup (below a scope on a systemd host), and rmachined's own.
    let planned = fs::read(machine_dir.join(paths::PLAN))
        .ok()
        .and_then(|data| serde_json::from_slice::<MachinePlan>(&data).ok())
        .map(|plan| plan.cgroup);
    for cgroup in planned
        .into_iter()
        .chain(cgroup::machine_cgroup_path(name).ok())
    {
        if cgroup.exists() {
            tracing::info!(machine = name, cgroup = %cgroup.display(), "removing a dead supervisor's cgroup");
            if let Err(err) = cgroup::remove_machine_cgroup(&cgroup, Duration::from_secs(5)) {
                tracing::warn!(machine = name, %err, "cannot remove a leftover cgroup");
            }
        }
    }
    if let Err(err) = super::resources::remove_v1(machine_dir, name, Duration::from_secs(5)) {
        tracing::warn!(machine = name, %err, "cannot remove a leftover v1 cgroup");
    }
    let _ = fs::remove_dir_all(machine_dir.join(paths::HOST_DIR));
    let _ = fs::remove_dir(machine_dir.join(paths::ROOT_MOUNT));
    let _ = fs::remove_file(machine_dir.join(paths::CONTROL));
}

/// Reads the last state a supervisor wrote (for re-adoption and for tests).
pub fn read_state(machine_dir: &Path) -> Option<Status> {
    let data = fs::read(machine_dir.join(paths::STATE)).ok()?;
    serde_json::from_slice(&data).ok()
}

/// `rmachined __supervise <machine-dir>`.
pub fn main(args: &[String]) -> i32 {
    let Some(dir) = args.first() else {
        eprintln!("usage: rmachined __supervise MACHINE-DIR");
        return 2;
    };
    let dir = PathBuf::from(dir);
    if args.get(1).map(String::as_str) == Some(HELD_ARG) && !wait_until_released() {
        eprintln!("rmachined supervisor: the daemon did not release this start; exiting");
        return 1;
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let plan: MachinePlan = match fs::read(dir.join(paths::PLAN))
        .map_err(|e| e.to_string())
        .and_then(|d| serde_json::from_slice(&d).map_err(|e| e.to_string()))
    {
        Ok(plan) => plan,
        Err(err) => {
            eprintln!(
                "rmachined supervisor: cannot read {}: {err}",
                dir.join(paths::PLAN).display()
            );
            return 1;
        }
    };
    // The seccomp filter from rmachined's cache (state/machines/NAME/../..),
    // before any clone: the container child inherits it.
    if let Some(state) = dir.parent().and_then(Path::parent) {
        if let Err(err) = super::security::preload_seccomp(state) {
            eprintln!("rmachined supervisor: {err}");
            return 1;
        }
    }
    // Detach: the launcher's child exits at once, so the daemon never has
    // to reap (or keep a thread waiting for) a supervisor, and the real
    // supervisor is nobody's child but init's (or a subreaper's).
    // SAFETY: still single-threaded here (no thread was started yet).
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => return 0,
        Ok(nix::unistd::ForkResult::Child) => {}
        Err(err) => {
            eprintln!("rmachined supervisor: fork: {err}");
            return 1;
        }
    }
    // SAFETY: fd 3 was handed to us by `launch` as the listening socket.
    let listener = unsafe { UnixListener::from_raw_fd(LISTEN_FD) };
    let mut supervisor = match Supervisor::new(plan, listener) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("rmachined supervisor: {err}");
            return 1;
        }
    };
    supervisor.run();
    0
}

/// How one boot ended.
enum Outcome {
    Reboot,
    Stopped,
    Failed(String),
}

struct Console {
    master: OwnedFd,
    /// Kept open so the master never sees EIO between guest opens.
    _slave: OwnedFd,
    slave_path: PathBuf,
}

struct Supervisor {
    plan: MachinePlan,
    listener: UnixListener,
    clients: Vec<Client>,
    signals: SignalFd,
    status: Status,
    stop_requested: bool,
    restarts: Vec<Instant>,
    console_log: File,
    /// Bytes in the current console log.
    console_logged: u64,
}

struct Client {
    stream: UnixStream,
    buffer: Vec<u8>,
}

impl Supervisor {
    fn new(plan: MachinePlan, listener: UnixListener) -> Result<Self, RuntimeError> {
        listener
            .set_nonblocking(true)
            .map_err(RuntimeError::io("control socket"))?;
        let mut mask = SigSet::empty();
        for sig in [
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGPIPE,
            // The stop of the machine's scope (crate::systemd); blocking it
            // does not keep it from continuing a stopped process.
            Signal::SIGCONT,
        ] {
            mask.add(sig);
        }
        mask.thread_block()
            .map_err(|e| RuntimeError::io("blocking signals")(e.into()))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(|e| RuntimeError::io("signalfd")(e.into()))?;
        let console_log = open_console_log(&plan.machine_dir)?;
        let status = Status {
            state: MachineState::Starting,
            leader: 0,
            supervisor: std::process::id(),
            since: now_usec(),
            error: String::new(),
            boots: 0,
        };
        Ok(Supervisor {
            plan,
            listener,
            clients: Vec::new(),
            signals,
            status,
            stop_requested: false,
            restarts: Vec::new(),
            console_log,
            console_logged: 0,
        })
    }

    fn dir(&self) -> &Path {
        &self.plan.machine_dir
    }

    fn set_status(&mut self, state: MachineState, leader: u32, error: String) {
        if state != self.status.state {
            self.status.since = now_usec();
        }
        self.status.state = state;
        self.status.leader = leader;
        self.status.error = error;
        let _ = write_atomic(
            &self.dir().join(paths::STATE),
            &serde_json::to_vec(&self.status).unwrap_or_default(),
        );
        tracing::info!(machine = self.plan.name(), state = %state, leader, "state");
        let line = protocol::encode_line(&self.status).unwrap_or_default();
        self.clients
            .retain_mut(|c| c.stream.write_all(&line).is_ok());
    }

    fn run(&mut self) {
        self.set_status(MachineState::Starting, 0, String::new());
        let host_dir = self.dir().join(paths::HOST_DIR);
        let final_state = loop {
            self.accept_clients();
            self.read_clients();
            if self.stop_requested {
                break (MachineState::Stopped, String::new());
            }
            let outcome = match self.boot_once(&host_dir) {
                Ok(outcome) => outcome,
                Err(err) => Outcome::Failed(err.to_string()),
            };
            let restart = match &outcome {
                _ if self.stop_requested => false,
                Outcome::Reboot => true,
                Outcome::Stopped => self.plan.definition.restart == RestartPolicy::Always,
                Outcome::Failed(_) => self.plan.definition.restart != RestartPolicy::No,
            };
            if restart && self.restart_allowed() {
                self.set_status(MachineState::Starting, 0, String::new());
                continue;
            }
            break match outcome {
                Outcome::Failed(err) if !self.stop_requested => (MachineState::Failed, err),
                _ => (MachineState::Stopped, String::new()),
            };
        };
        let _ = fs::remove_dir_all(&host_dir);
        let _ = fs::remove_dir(self.dir().join(paths::ROOT_MOUNT));
        let _ = fs::remove_file(self.dir().join(paths::CONTROL));
        self.set_status(final_state.0, 0, final_state.1);
    }

    fn restart_allowed(&mut self) -> bool {
        let now = Instant::now();
        self.restarts
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        self.restarts.push(now);
        self.restarts.len() <= RESTART_BURST
    }

    fn boot_once(&mut self, host_dir: &Path) -> Result<Outcome, RuntimeError> {
        let kind = container::inspect_init(&self.plan)?;
        prepare_host_dir(&self.plan, host_dir)?;
        let notify = bind_notify_socket(&host_dir.join(paths::NOTIFY), self.plan.ids.base)?;
        let console = open_console(self.plan.ids.base)?;
        fs::create_dir_all(self.dir().join(paths::ROOT_MOUNT))
            .map_err(RuntimeError::io("creating the root mount point"))?;
        cgroup::create_machine_cgroup(&self.plan.cgroup, self.plan.ids.base)?;
        let limited = super::resources::setup(&self.plan);
        let res = BootResources {
            console_slave: &console.slave_path,
            host_dir,
            init: kind,
        };
        let spawned = limited.and_then(|()| container::spawn(&self.plan, &res));
        let outcome = match spawned {
            Ok(container) => {
                self.status.boots += 1;
                let ready_needed =
                    container::waits_for_ready(kind, self.plan.definition.notify_ready);
                let state = if ready_needed {
                    MachineState::Starting
                } else {
                    MachineState::Running
                };
                self.set_status(state, container.pid as u32, String::new());
                // Started only now that the container is cloned, and
                // stopped (joined) when this boot ends: the supervisor is
                // single-threaded whenever it clones (see network::relay).
                let relay = self.start_loopback_relay();
                let outcome = self.watch(&container, kind, &console, &notify);
                drop(relay);
                Ok(outcome)
            }
            Err(err) => Err(err),
        };
        drop(notify);
        let ended = Instant::now();
        let _ = fs::remove_file(host_dir.join(paths::NOTIFY));
        let cleanup =
            cgroup::remove_machine_cgroup(&self.plan.cgroup, Duration::from_secs(10)).and(
                super::resources::remove_v1(self.dir(), self.plan.name(), Duration::from_secs(10)),
            );
        tracing::debug!(
            machine = self.plan.name(),
            elapsed_us = ended.elapsed().as_micros() as u64,
            "cgroup removed"
        );
        if let Some(net) = &self.plan.network {
            // Idempotent: also right when the boot failed before or while
            // the network was joined.
            if let Err(err) = crate::network::firewall::leave(net) {
                tracing::warn!(machine = self.plan.name(), %err, "removing the machine's network");
            }
            tracing::debug!(
                machine = self.plan.name(),
                elapsed_us = ended.elapsed().as_micros() as u64,
                "network removed"
            );
        }
        drop(console);
        let outcome = outcome?;
        cleanup?;
        Ok(outcome)
    }

    /// Relays the published ports from `[::1]`; a failure costs only that.
    fn start_loopback_relay(&self) -> Option<crate::network::relay::LoopbackRelay> {
        let net = self.plan.network.as_ref()?;
        match crate::network::relay::LoopbackRelay::start(net) {
            Ok(relay) => relay,
            Err(err) => {
                tracing::warn!(machine = self.plan.name(), %err, "starting the loopback relay");
                None
            }
        }
    }

    /// The event loop of one boot; returns when init is gone.
    fn watch(
        &mut self,
        container: &Container,
        kind: InitKind,
        console: &Console,
        notify: &UnixDatagram,
    ) -> Outcome {
        let signal = container::stop_signal(
            kind,
            self.plan.definition.stop_signal,
            self.plan.definition.boot,
        );
        let mut stop: Option<StopProgress> = None;
        let mut killed = false;
        let mut withdrawn = false;
        let mut buf = vec![0u8; 16384];
        loop {
            if self.stop_requested && stop.is_none() {
                stop = Some(StopProgress {
                    deadline: Instant::now() + self.plan.definition.stop_timeout,
                    delivered: false,
                    last_sent: None,
                });
                self.set_status(MachineState::Stopping, container.pid as u32, String::new());
            }
            if let Some(progress) = stop.as_mut() {
                // An init with a handler gets the signal once. One that only
                // reads it with sigtimedwait (busybox) cannot be told apart
                // from one that would drop it, so it gets it again every
                // RESEND until it reacts: a signal sent too early in boot is
                // not lost (the hang systemd-nspawn and Incus have).
                let due = progress
                    .last_sent
                    .is_none_or(|t| t.elapsed() >= STOP_RESEND);
                if !progress.delivered && due {
                    progress.delivered = signal_caught(container.pid, signal);
                    let _ = sys::pidfd_send_signal(container.pidfd.as_fd(), signal);
                    progress.last_sent = Some(Instant::now());
                    tracing::info!(
                        machine = self.plan.name(),
                        signal,
                        handled = progress.delivered,
                        "stop signal sent"
                    );
                }
                if !killed && Instant::now() >= progress.deadline {
                    tracing::warn!(
                        machine = self.plan.name(),
                        "stop timeout reached, sending SIGKILL"
                    );
                    let _ = sys::pidfd_send_signal(container.pidfd.as_fd(), libc::SIGKILL);
                    killed = true;
                }
            }
            // Once the stop signal is on its way, the machine leaves the
            // rules while its guest shuts down (see firewall::withdraw).
            if !withdrawn && stop.as_ref().is_some_and(|p| p.last_sent.is_some()) {
                withdrawn = true;
                if let Some(net) = &self.plan.network {
                    if let Err(err) = crate::network::firewall::withdraw(net) {
                        tracing::warn!(machine = self.plan.name(), %err, "withdrawing the machine's rules");
                    }
                }
            }
            let timeout = if stop.is_some() {
                PollTimeout::from(STOP_TICK.as_millis() as u16)
            } else {
                PollTimeout::NONE
            };
            let client_fds: Vec<BorrowedFd<'_>> =
                self.clients.iter().map(|c| c.stream.as_fd()).collect();
            let mut fds = vec![
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(container.pidfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(console.master.as_fd(), PollFlags::POLLIN),
                PollFd::new(notify.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
            ];
            fds.extend(
                client_fds
                    .iter()
                    .map(|fd| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(err) => {
                    tracing::error!(%err, "poll failed");
                    std::thread::sleep(STOP_TICK);
                }
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            drop(fds);
            drop(client_fds);
            if ready[0] {
                self.handle_signals();
            }
            if ready[2] {
                self.drain_console(console, &mut buf);
            }
            if ready[3] {
                self.read_notify(notify, container.pid, &mut buf);
            }
            if ready[4] {
                self.accept_clients();
            }
            if ready[5..].iter().any(|r| *r) {
                self.read_clients();
            }
            if ready[1] {
                match sys::waitid_pidfd(container.pidfd.as_fd(), true) {
                    Ok(Some(status)) => {
                        self.drain_console(console, &mut buf);
                        return self.interpret_exit(status, killed);
                    }
                    Ok(None) => {}
                    Err(err) => return Outcome::Failed(format!("waiting for init: {err}")),
                }
            }
        }
    }

    fn interpret_exit(&self, status: ExitStatus, killed: bool) -> Outcome {
        tracing::info!(machine = self.plan.name(), ?status, killed, "init exited");
        if self.stop_requested {
            return Outcome::Stopped;
        }
        match status {
            ExitStatus::Signaled(libc::SIGHUP) => Outcome::Reboot,
            ExitStatus::Signaled(libc::SIGINT) | ExitStatus::Exited(0) => Outcome::Stopped,
            ExitStatus::Exited(code) => Outcome::Failed(format!("init exited with status {code}")),
            ExitStatus::Signaled(sig) => Outcome::Failed(format!(
                "init was killed by signal {}",
                Signal::try_from(sig)
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|_| sig.to_string())
            )),
        }
    }

    fn handle_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match info.ssi_signo as i32 {
                libc::SIGTERM | libc::SIGINT => self.stop_requested = true,
                signal if crate::systemd::is_scope_stop(signal, info.ssi_pid) => {
                    tracing::info!(
                        machine = self.plan.name(),
                        "the machine's scope is stopping"
                    );
                    self.stop_requested = true;
                }
                _ => {}
            }
        }
    }

    /// Reads what the console has, a bounded amount per wakeup so a guest
    /// writing without pause cannot starve the rest of the loop.
    fn drain_console(&mut self, console: &Console, buf: &mut [u8]) {
        for _ in 0..READS_PER_WAKEUP {
            match nix::unistd::read(&console.master, buf) {
                Ok(0) => break,
                Ok(n) => self.log_console(&buf[..n]),
                Err(_) => break,
            }
        }
    }

    /// Appends to console.log; past [`CONSOLE_LOG_MAX`] bytes it becomes
    /// console.log.1 (replacing the previous one) and a new log starts.
    fn log_console(&mut self, data: &[u8]) {
        if self.console_logged + data.len() as u64 > CONSOLE_LOG_MAX {
            let log = self.dir().join(paths::CONSOLE_LOG);
            let _ = fs::rename(&log, self.dir().join(paths::CONSOLE_LOG_ROTATED));
            match open_console_log(self.dir()) {
                Ok(file) => {
                    self.console_log = file;
                    self.console_logged = 0;
                }
                Err(err) => {
                    tracing::warn!(machine = self.plan.name(), %err, "rotating the console log");
                    return;
                }
            }
        }
        if self.console_log.write_all(data).is_ok() {
            self.console_logged += data.len() as u64;
        }
    }

    fn read_notify(&mut self, notify: &UnixDatagram, leader: libc::pid_t, buf: &mut [u8]) {
        for _ in 0..READS_PER_WAKEUP {
            let mut iov = [IoSliceMut::new(buf)];
            let mut space = nix::cmsg_space!(UnixCredentials, [i32; 16]);
            let Ok(msg) = recvmsg::<()>(
                notify.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                return;
            };
            let mut sender = 0;
            if let Ok(cmsgs) = msg.cmsgs() {
                for cmsg in cmsgs {
                    match cmsg {
                        ControlMessageOwned::ScmCredentials(creds) => sender = creds.pid(),
                        ControlMessageOwned::ScmRights(fds) => {
                            for fd in fds {
                                // SAFETY: passed to us just now; we do not keep them.
                                drop(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                        _ => {}
                    }
                }
            }
            let len = msg.bytes;
            if sender != leader {
                tracing::debug!(sender, "ignoring notify message not from init");
                continue;
            }
            for next in notify_transitions(self.status.state, &iov_bytes(buf, len)) {
                self.set_status(next, leader as u32, String::new());
            }
        }
    }

    fn accept_clients(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let _ = stream.set_nonblocking(true);
            let mut line = serde_json::to_vec(&self.status).unwrap_or_default();
            line.push(b'\n');
            let mut client = Client {
                stream,
                buffer: Vec::new(),
            };
            if client.stream.write_all(&line).is_ok() {
                self.clients.push(client);
            }
        }
    }

    fn read_clients(&mut self) {
        let mut commands = Vec::new();
        self.clients.retain_mut(|client| {
            let mut chunk = [0u8; 512];
            loop {
                match client.stream.read(&mut chunk) {
                    Ok(0) => return false,
                    Ok(n) => client.buffer.extend_from_slice(&chunk[..n]),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
            while let Some(pos) = client.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = client.buffer.drain(..=pos).collect();
                match protocol::decode_line::<Command>(&line) {
                    Ok(command) => commands.push(command),
                    Err(err) => tracing::warn!(%err, "bad control message"),
                }
            }
            true
        });
        for command in commands {
            match command {
                Command::Stop => self.stop_requested = true,
                Command::SetResources(resources) => {
                    // Already written to the cgroups by the daemon: kept for
                    // the next boot (reboot, restart policy) and re-adoption.
                    self.plan.definition.resources = resources;
                    match serde_json::to_vec_pretty(&self.plan) {
                        Ok(json) => {
                            if let Err(err) = write_atomic(&self.dir().join(paths::PLAN), &json) {
                                tracing::warn!(%err, "cannot record the new resources");
                            }
                        }
                        Err(err) => tracing::warn!(%err, "cannot record the new resources"),
                    }
                }
                Command::Kill => {
                    self.stop_requested = true;
                    let _ = cgroup::remove_machine_cgroup(&self.plan.cgroup, Duration::ZERO);
                    if self.status.leader != 0 {
                        if let Ok(pidfd) = sys::pidfd_open(self.status.leader as i32) {
                            let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
                        }
                    }
                }
            }
        }
    }
}

/// The states a notify message from init moves a machine in `state`
/// through, in order: `READY=1` makes a starting machine running,
/// `STOPPING=1` makes any machine not already stopping stopping; every
/// other line (and invalid UTF-8) is ignored. The message is the guest's.
pub fn notify_transitions(mut state: MachineState, message: &[u8]) -> Vec<MachineState> {
    let text = String::from_utf8_lossy(message);
    let mut states = Vec::new();
    for line in text.lines() {
        let next = match line {
            "READY=1" if state == MachineState::Starting => MachineState::Running,
            "STOPPING=1" if state != MachineState::Stopping => MachineState::Stopping,
            _ => continue,
        };
        state = next;
        states.push(next);
    }
    states
}

fn iov_bytes(buf: &[u8], len: usize) -> Vec<u8> {
    buf[..len.min(buf.len())].to_vec()
}

struct StopProgress {
    deadline: Instant,
    /// Init has a handler for the signal and was sent it.
    delivered: bool,
    last_sent: Option<Instant>,
}

/// Whether process `pid` would receive `signal`: it has a handler for it
/// (SigCgt) or blocks it to read it later (SigBlk, as busybox init does).
/// The kernel drops any other signal to a PID namespace's init, so the stop
/// signal is sent only once init can receive it.
fn signal_caught(pid: libc::pid_t, signal: libc::c_int) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let bit = 1u64 << (signal - 1);
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigCgt:")
                .or_else(|| l.strip_prefix("SigBlk:"))
        })
        .filter_map(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .any(|mask| mask & bit != 0)
}

/// The console log is the guest's output: only root reads it.
fn open_console_log(machine_dir: &Path) -> Result<File, RuntimeError> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(machine_dir.join(paths::CONSOLE_LOG))
        .map_err(RuntimeError::io("opening the console log"))
}

fn prepare_host_dir(plan: &MachinePlan, host_dir: &Path) -> Result<(), RuntimeError> {
    fs::create_dir_all(host_dir)
        .map_err(RuntimeError::io(format!("creating {}", host_dir.display())))?;
    fs::set_permissions(host_dir, fs::Permissions::from_mode(0o755))
        .map_err(RuntimeError::io("chmod host dir"))?;
    let os_release = ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| fs::read(p).ok())
        .unwrap_or_default();
    fs::write(host_dir.join("os-release"), os_release)
        .map_err(RuntimeError::io("writing os-release"))?;
    let id = container::machine_id(plan);
    fs::write(host_dir.join("machine-id"), format!("{id}\n"))
        .map_err(RuntimeError::io("writing machine-id"))?;
    if plan.network.is_some() {
        fs::write(
            host_dir.join(paths::RESOLV_CONF),
            crate::network::resolv_conf(),
        )
        .map_err(RuntimeError::io("writing resolv.conf"))?;
    }
    Ok(())
}

fn bind_notify_socket(path: &Path, guest_root: u32) -> Result<UnixDatagram, RuntimeError> {
    let _ = fs::remove_file(path);
    let sock = UnixDatagram::bind(path)
        .map_err(RuntimeError::io(format!("binding {}", path.display())))?;
    // The guest's root (an unprivileged host uid) sends; its other users
    // and the host's do not.
    std::os::unix::fs::chown(path, Some(guest_root), Some(guest_root))
        .map_err(RuntimeError::io("chown notify socket"))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(RuntimeError::io("chmod notify socket"))?;
    setsockopt(&sock, sockopt::PassCred, &true)
        .map_err(|e| RuntimeError::io("SO_PASSCRED")(e.into()))?;
    sock.set_nonblocking(true)
        .map_err(RuntimeError::io("notify socket"))?;
    Ok(sock)
}

fn open_console(guest_root: u32) -> Result<Console, RuntimeError> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
    )
    .map_err(|e| RuntimeError::io("opening /dev/ptmx for the console")(e.into()))?;
    nix::pty::grantpt(&master).map_err(|e| RuntimeError::io("grantpt")(e.into()))?;
    nix::pty::unlockpt(&master).map_err(|e| RuntimeError::io("unlockpt")(e.into()))?;
    let slave_path = PathBuf::from(
        nix::pty::ptsname_r(&master).map_err(|e| RuntimeError::io("ptsname")(e.into()))?,
    );
    // SAFETY: PtyMaster owns a plain descriptor; we take it over.
    let master: OwnedFd =
        unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(master)) };
    let slave = sys::open_pty_peer(master.as_fd())
        .map_err(RuntimeError::io("opening the console's slave"))?;
    // The guest's root owns its console, as on a real machine (tty group 5).
    nix::unistd::fchown(
        &slave,
        Some(guest_root.into()),
        Some((guest_root + 5).into()),
    )
    .map_err(|e| RuntimeError::io("chown console")(e.into()))?;
    Ok(Console {
        master,
        _slave: slave,
        slave_path,
    })
}
