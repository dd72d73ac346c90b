//! Test harness: a private system-like `dbus-daemon` whose policy includes
//! the project's `dbus/org.rmachines1.conf`, and the built `rmachined` on it
//! with temporary config, state and storage directories. Both are killed and
//! the directories removed on drop. Needs root; panics (never skips) if not.
//!
//! The daemon runs with `--stop-machines-on-exit`, so SIGTERM to it (its
//! parent-death signal, `terminate_daemon`, drop) stops its machines, as
//! tests of "nothing is left after the daemon" expect. A harness from
//! [`Harness::start_keeping_machines`] runs it as a host does (machines
//! outlive the daemon); its drop stops what is left through the
//! supervisors' control sockets (a test process killed outright runs no
//! drop: its machines then stay until the next daemon on that state
//! directory, or `rmachinectl stop`).

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(15);

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests drive a real bus and a real rmachined and must run as root \
         (CI runs them as root); run `sudo -E cargo test`"
    );
}

/// Which rmachined, rmachinectl and bus policy a harness uses.
#[derive(Clone)]
pub struct Install {
    pub rmachined: PathBuf,
    pub rmachinectl: PathBuf,
    pub policy: PathBuf,
}

impl Install {
    /// The binaries cargo built and the policy in the source tree.
    pub fn built() -> Self {
        Install {
            rmachined: env!("CARGO_BIN_EXE_rmachined").into(),
            rmachinectl: env!("CARGO_BIN_EXE_rmachinectl").into(),
            policy: Path::new(env!("CARGO_MANIFEST_DIR")).join("dbus/org.rmachines1.conf"),
        }
    }

    /// What the package installed, where the SPEC says.
    pub fn system() -> Self {
        Install {
            rmachined: "/usr/bin/rmachined".into(),
            rmachinectl: "/usr/bin/rmachinectl".into(),
            policy: "/usr/share/dbus-1/system.d/org.rmachines1.conf".into(),
        }
    }
}

pub struct Harness {
    install: Install,
    dir: TempDir,
    bus: Child,
    daemon: Option<Child>,
    address: String,
    notify: UnixDatagram,
    notifications: Vec<String>,
    network_args: Vec<String>,
    shared_root: bool,
    stop_machines_on_exit: bool,
    wrapper: Vec<String>,
}

impl Harness {
    /// A bus and a daemon with an empty config directory.
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// A bus and a daemon; `setup` fills the config directory first.
    pub fn start_with(setup: impl FnOnce(&Path)) -> Self {
        Self::start_installed(Install::built(), setup)
    }

    /// A bus and a daemon in a mount namespace of its own whose `/` is a
    /// shared mount, as on every systemd host; `setup` fills the config
    /// directory first.
    pub fn start_in_shared_root(setup: impl FnOnce(&Path)) -> Self {
        Self::start_inner(Install::built(), setup, true)
    }

    /// A bus and a daemon from `install`; `setup` fills the config directory.
    pub fn start_installed(install: Install, setup: impl FnOnce(&Path)) -> Self {
        Self::start_inner(install, setup, false)
    }

    /// A bus and a daemon run as on a host: without
    /// `--stop-machines-on-exit`, so its machines outlive SIGTERM and a new
    /// daemon (`spawn_daemon`) re-adopts them. Drop stops what is left.
    pub fn start_keeping_machines(setup: impl FnOnce(&Path)) -> Self {
        Self::start_configured(Install::built(), setup, false, false, Vec::new())
    }

    /// A bus and a daemon started through `wrapper` (a command that execs
    /// its arguments in place, e.g. `nsenter --net=...`): a test host of
    /// its own (tests/fleet.rs).
    pub fn start_wrapped(wrapper: Vec<String>, setup: impl FnOnce(&Path)) -> Self {
        Self::start_configured(Install::built(), setup, false, true, wrapper)
    }

    fn start_inner(install: Install, setup: impl FnOnce(&Path), shared_root: bool) -> Self {
        Self::start_configured(install, setup, shared_root, true, Vec::new())
    }

    fn start_configured(
        install: Install,
        setup: impl FnOnce(&Path),
        shared_root: bool,
        stop_machines_on_exit: bool,
        wrapper: Vec<String>,
    ) -> Self {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("rmachines-test-")
            .tempdir()
            .expect("create a temporary directory");
        // Unprivileged test callers must reach the bus socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temporary directory");
        for sub in ["config", "state", "storage"] {
            std::fs::create_dir(dir.path().join(sub)).expect("create a test directory");
        }
        setup(&dir.path().join("config"));

        let socket = dir.path().join("bus");
        let bus_config = dir.path().join("bus.conf");
        std::fs::write(&bus_config, bus_config_xml(&socket, &install.policy))
            .expect("write the bus config");
        let mut bus = Command::new("/usr/bin/dbus-daemon");
        bus.arg(format!("--config-file={}", bus_config.display()))
            .args(["--nofork", "--nopidfile", "--print-address"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; nothing else runs between
        // fork and exec. The bus goes with a test process that dies.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut bus, || {
                rmachines::runtime::sys::set_parent_death_signal(libc::SIGTERM)
            });
        }
        let mut bus = bus.spawn().expect("start dbus-daemon");
        let mut line = String::new();
        BufReader::new(bus.stdout.take().expect("dbus-daemon stdout"))
            .read_line(&mut line)
            .expect("read the bus address");
        let address = line.trim().to_owned();
        assert!(!address.is_empty(), "dbus-daemon printed no address");

        let notify_path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("notify socket timeout");

        let mut harness = Harness {
            install,
            dir,
            bus,
            daemon: None,
            address,
            notify,
            notifications: Vec::new(),
            network_args: test_network_args(),
            shared_root,
            stop_machines_on_exit,
            wrapper,
        };
        harness.spawn_daemon();
        harness
    }

    /// Starts rmachined (again) on this harness's bus and directories and
    /// waits for its READY=1.
    pub fn spawn_daemon(&mut self) {
        assert!(self.daemon.is_none(), "rmachined already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("rmachined.log"))
            .expect("open log");
        let dir = self.dir.path();
        let mut daemon = if self.shared_root {
            // unshare execs rmachined in place: the pid stays the daemon's.
            let mut unshare = Command::new("unshare");
            unshare
                .args(["--mount", "--propagation", "shared", "--"])
                .arg(&self.install.rmachined);
            unshare
        } else if let Some((program, args)) = self.wrapper.split_first() {
            // The wrapper execs rmachined in place: the pid stays the daemon's.
            let mut wrapped = Command::new(program);
            wrapped.args(args).arg(&self.install.rmachined);
            wrapped
        } else {
            Command::new(&self.install.rmachined)
        };
        daemon
            .arg("--config-dir")
            .arg(dir.join("config"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--storage-dir")
            .arg(dir.join("storage"))
            .args(&self.network_args)
            .args(
                self.stop_machines_on_exit
                    .then_some("--stop-machines-on-exit"),
            )
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .env("NOTIFY_SOCKET", dir.join("notify"))
            .env("RUST_LOG", "debug")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .stdout(Stdio::null())
            .stderr(log);
        // A test process that dies (killed, aborted) takes its daemon along
        // the graceful way: SIGTERM (with --stop-machines-on-exit) stops the
        // machines and removes the bridge and rules, instead of leaving them
        // to nobody.
        // SAFETY: prctl is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut daemon, || {
                rmachines::runtime::sys::set_parent_death_signal(libc::SIGTERM)
            });
        }
        let daemon = daemon.spawn().expect("start rmachined");
        self.daemon = Some(daemon);
        self.notifications.clear();
        self.wait_for_notification("READY=1", START_TIMEOUT);
    }

    /// SIGKILL to rmachined: a crash. Its supervisors live on.
    pub fn kill_daemon(&mut self) {
        let mut daemon = self.daemon.take().expect("rmachined is running");
        let _ = daemon.kill();
        let _ = daemon.wait();
    }

    /// This harness's own bridge and nftables table names.
    pub fn bridge(&self) -> String {
        self.flag("--bridge=")
    }

    pub fn nft_table(&self) -> String {
        self.flag("--nft-table=")
    }

    fn flag(&self, prefix: &str) -> String {
        self.network_args
            .iter()
            .find_map(|a| a.strip_prefix(prefix))
            .unwrap_or_default()
            .to_owned()
    }

    /// The daemon's host pid (0 once it was terminated).
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().map(|d| d.id()).unwrap_or(0)
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rmachined.log")).unwrap_or_default()
    }

    /// A client connection to the test bus.
    pub async fn connection(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .expect("a valid bus address")
            .build()
            .await
            .expect("connect to the test bus")
    }

    /// `rmachinectl ARGS` on this harness's bus, stdin empty and stdout
    /// and stderr piped, not yet spawned.
    pub fn rmachinectl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.install.rmachinectl);
        command
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    pub fn rmachinectl(&self, args: &[&str]) -> Output {
        Command::new(&self.install.rmachinectl)
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .stdin(Stdio::null())
            .output()
            .expect("run rmachinectl")
    }

    /// `busctl call` on the test bus; the debug log level makes busctl print
    /// the error name of a failed call on stderr.
    pub fn busctl_call(&self, args: &[&str]) -> Output {
        self.busctl_command(&[])
            .args(args)
            .output()
            .expect("run busctl")
    }

    /// `busctl call` as uid/gid 65534 without groups.
    pub fn busctl_call_as_nobody(&self, args: &[&str]) -> Output {
        self.busctl_command(&[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
        ])
        .args(args)
        .output()
        .expect("run busctl through setpriv")
    }

    fn busctl_command(&self, wrapper: &[&str]) -> Command {
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg("busctl");
                command
            }
            None => Command::new("busctl"),
        };
        command
            .arg(format!("--address={}", self.address))
            .args(["call", "org.rmachines1"])
            .env("SYSTEMD_LOG_LEVEL", "debug")
            .stdin(Stdio::null());
        command
    }

    /// Waits until rmachined has sent `message` (e.g. `READY=1`) to the
    /// notify socket; panics with the daemon's log after `timeout`.
    pub fn wait_for_notification(&mut self, message: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .notifications
                .iter()
                .any(|datagram| datagram.lines().any(|line| line == message))
            {
                return;
            }
            let mut buffer = [0u8; 4096];
            if let Ok(n) = self.notify.recv(&mut buffer) {
                self.notifications
                    .push(String::from_utf8_lossy(&buffer[..n]).into_owned());
            }
            if let Some(daemon) = self.daemon.as_mut() {
                if let Ok(Some(status)) = daemon.try_wait() {
                    panic!(
                        "rmachined exited ({status}) before sending {message}; log:\n{}",
                        self.daemon_log()
                    );
                }
            }
        }
        panic!(
            "rmachined did not send {message} within {timeout:?}; got {:?}; log:\n{}",
            self.notifications,
            self.daemon_log()
        );
    }

    pub fn notifications(&self) -> &[String] {
        &self.notifications
    }

    /// Sends SIGTERM to rmachined and waits for it to exit.
    pub fn terminate_daemon(&mut self) -> ExitStatus {
        let mut daemon = self.daemon.take().expect("rmachined is running");
        terminate(&mut daemon, Duration::from_secs(30))
    }

    /// Stops every machine whose supervisor still runs, through its control
    /// socket (no daemon needed), and waits until each is gone: SIGKILL
    /// after `grace`. Returns the names of the machines it stopped.
    pub fn stop_supervised_machines(&self, grace: Duration) -> Vec<String> {
        use rmachines::runtime::protocol::{Client, Command as SupervisorCommand};
        let mut stopped = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.state_dir().join("machines")) else {
            return stopped;
        };
        for entry in entries.flatten() {
            let Ok(mut client) = Client::connect(&entry.path().join("control")) else {
                continue;
            };
            let _ = client.send(SupervisorCommand::Stop);
            if !matches!(client.wait_for(grace, |_| false), Ok(None)) {
                let _ = client.send(SupervisorCommand::Kill);
                let _ = client.wait_for(Duration::from_secs(10), |_| false);
            }
            stopped.push(entry.file_name().to_string_lossy().into_owned());
        }
        stopped
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            terminate(&mut daemon, Duration::from_secs(10));
        }
        // What the daemon left running (a harness keeping machines, or a
        // daemon that did not stop in time).
        self.stop_supervised_machines(Duration::from_secs(10));
        if !self.stop_machines_on_exit {
            // The machines' bridge and rules go with a daemon that finds
            // nothing running, as at any daemon start.
            self.spawn_daemon_quietly_and_stop();
        }
        let _ = self.bus.kill();
        let _ = self.bus.wait();
        if std::thread::panicking() {
            eprintln!("--- rmachined log ---\n{}", self.daemon_log());
        }
    }
}

/// Network flags of a bridge, subnets and table of this harness's own, so
/// a test daemon never touches a real rmachined's (`rm-br0`, `rmachines`)
/// nor another test daemon's: its cleanup at start removes what is on its
/// bridge and in its table.
fn test_network_args() -> Vec<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = std::process::id()
        .wrapping_mul(16)
        .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed));
    // /20 each (4094 machines: room for the benchmark's density sweep).
    let id = n % 1024;
    vec![
        format!("--bridge=rmh-{id:x}"),
        format!("--ipv4-subnet=10.{}.{}.0/20", 160 + id / 16, (id % 16) * 16),
        format!("--ipv6-subnet=fd6d:7465:7376:{id:x}::/64"),
        format!("--nft-table=rmachines_harness_{id:x}"),
    ]
}

impl Harness {
    /// Starts a daemon that stops machines on exit and terminates it: its
    /// start cleans the network the last machine left, its exit removes the
    /// bridge and table. For drop; never panics.
    fn spawn_daemon_quietly_and_stop(&mut self) {
        self.stop_machines_on_exit = true;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.spawn_daemon();
        }));
        if let Some(mut daemon) = self.daemon.take() {
            terminate(&mut daemon, Duration::from_secs(10));
        }
        if result.is_err() {
            eprintln!("the clean-up daemon of a harness did not start");
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`.
fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().expect("wait for the child")
}

/// A system-bus-like policy (deny by default, as the real system bus does)
/// plus the project's own policy file, so the test exercises it.
fn bus_config_xml(socket: &Path, project_policy: &Path) -> String {
    include_str!("../../dbus/private-bus.conf.in")
        .replace("@LISTEN@", &format!("unix:path={}", socket.display()))
        .replace("@POLICY@", &project_policy.display().to_string())
}

/// Writes `<config>/<name>.toml` with `root` and any extra TOML lines.
pub fn write_definition(config: &Path, name: &str, root: &Path, extra: &str) {
    std::fs::write(
        config.join(format!("{name}.toml")),
        format!("root = {:?}\n{extra}", root.display().to_string()),
    )
    .expect("write a definition");
}

/// The D-Bus error name of a failed zbus call.
pub fn error_name(result: Result<impl std::fmt::Debug, zbus::Error>) -> String {
    match result {
        Err(zbus::Error::MethodError(name, _, _)) => name.to_string(),
        other => panic!("expected a D-Bus method error, got {other:?}"),
    }
}
