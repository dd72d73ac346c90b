//! Shared helpers for the tests that boot real machines (as root).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use rmachines::definition::*;
use rmachines::network::{self, NetworkConfig};
use rmachines::runtime::idrange::IdRange;
use rmachines::runtime::protocol::{Client, Command as Control, MachineState, Status};
use rmachines::runtime::{self, paths, MachinePlan};

/// Where the tests keep the address registry (shared by all test machines,
/// so parallel tests get distinct addresses).
pub const TEST_NET_STORAGE: &str = "/run/rmachines-test/storage";

/// The daemon network configuration the tests use: its own bridge, subnets,
/// table and registry, so tests never touch a real rmachined's.
pub fn test_network_config() -> NetworkConfig {
    NetworkConfig {
        bridge: "rmt-br0".into(),
        ipv4_subnet: "10.219.0.0/16".parse().unwrap(),
        ipv6_subnet: Some("fd6d:7465:7374::/64".parse().unwrap()),
        table: "rmachines_test".into(),
        runtime_dir: PathBuf::from("/run/rmachines-test/network"),
    }
}

/// A definition with private networking on the test bridge.
pub fn private_definition(name: &str, root: &Path) -> Definition {
    let mut def = definition(name, root);
    def.network.mode = NetworkMode::Private;
    def
}

pub const FIXTURES: &str = "/var/tmp/rmachines-fixtures";

/// Fails loudly (never skips) when not root: these tests need real namespaces.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test boots real machines and must run as root (CI runs it as root)"
    );
}

/// Builds (once, cached across runs) and returns a guest tree: "busybox" or "debian".
pub fn fixture(kind: &str) -> PathBuf {
    let dest = Path::new(FIXTURES).join(kind);
    if dest.is_dir() {
        close_fixtures();
        return dest;
    }
    std::fs::create_dir_all(FIXTURES).expect("fixture dir");
    let lock =
        std::fs::File::create(Path::new(FIXTURES).join(format!(".{kind}.lock"))).expect("lock");
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).expect("flock");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make-rootfs.sh");
    let status = Command::new(script)
        .arg(kind)
        .arg(&dest)
        .status()
        .expect("run make-rootfs.sh");
    assert!(status.success(), "building the {kind} fixture failed");
    close_fixtures();
    dest
}

/// Machine roots must not be reachable by unprivileged host users (their
/// setuid files would be host setuid-root files): rmachined refuses to boot
/// one that is, so the fixtures' directory is root's alone.
fn close_fixtures() {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(FIXTURES, std::fs::Permissions::from_mode(0o700))
        .expect("chmod 0700 the fixtures' directory");
}

/// A private, writable copy of a fixture as it was built (its machine id
/// empty: the guest's first boot), removed on drop. For tests that change
/// the tree, or whose guest writes to it on first boot.
pub struct FixtureCopy {
    pub path: PathBuf,
}

impl FixtureCopy {
    pub fn new(kind: &str, name: &str) -> FixtureCopy {
        let source = fixture(kind);
        let path = Path::new(FIXTURES)
            .join(".copies")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("create .copies");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&source)
            .arg(&path)
            .status()
            .expect("run cp -a");
        assert!(status.success(), "copying the {kind} fixture failed");
        let id = path.join("etc/machine-id");
        if id.exists() {
            std::fs::write(&id, "").expect("empty the copy's /etc/machine-id");
        }
        FixtureCopy { path }
    }
}

impl Drop for FixtureCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub fn helper_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rmachined"))
}

/// A definition with the SPEC's defaults.
pub fn definition(name: &str, root: &Path) -> Definition {
    let file = PathBuf::from(format!("/nonexistent/{name}.toml"));
    let text = format!(
        "root = {:?}\n[network]\nmode = \"none\"\n",
        root.display().to_string()
    );
    parse_definition(name, &file, &text).expect("the test definition parses")
}

/// A machine booted straight through the runtime (no daemon), torn down on drop.
pub struct TestMachine {
    pub plan: MachinePlan,
    pub supervisor: Child,
    pub client: Client,
    pub state_dir: tempfile::TempDir,
}

/// A host uid range per test machine name, far from anything real.
fn test_ids(name: &str) -> IdRange {
    let hash = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    IdRange {
        base: 0x4000_0000 + ((hash % 4096) as u32) * 65536,
        size: 65536,
    }
}

impl TestMachine {
    pub fn launch(def: Definition) -> TestMachine {
        require_root();
        let state_dir = tempfile::Builder::new()
            .prefix("rmachines-test-")
            .tempdir()
            .expect("tempdir");
        let name = def.name.clone();
        let plan = MachinePlan {
            ids: test_ids(&name),
            machine_dir: runtime::machine_dir(state_dir.path(), &name),
            cgroup: runtime::cgroup::machine_cgroup_path(&format!("test-{name}")).expect("cgroup2"),
            network: network::plan_network(
                &def,
                &test_network_config(),
                Path::new(TEST_NET_STORAGE),
            )
            .expect("network plan"),
            definition: def,
            layer: None,
        };
        let launched =
            runtime::supervisor::launch(helper_binary(), &plan).expect("launch supervisor");
        let supervisor = launched.child;
        let client = Client::from_stream(launched.control).expect("control connection");
        TestMachine {
            plan,
            supervisor,
            client,
            state_dir,
        }
    }

    pub fn wait_state(&mut self, state: MachineState, timeout: Duration) -> Status {
        match self.client.wait_for(timeout, |s| s.state == state) {
            Ok(Some(status)) => status,
            other => panic!(
                "machine {} never reached {state}: {other:?} (last {:?})\nconsole:\n{}\nsupervisor log:\n{}",
                self.plan.name(),
                self.client.last,
                self.console(),
                std::fs::read_to_string(self.plan.machine_dir.join(paths::SUPERVISOR_LOG))
                    .unwrap_or_default()
            ),
        }
    }

    /// Waits until the supervisor has exited and returns its final status.
    pub fn wait_end(&mut self, timeout: Duration) -> Status {
        loop {
            match self.client.next(timeout) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(err) => panic!(
                    "waiting for the supervisor to end: {err}; last {:?}",
                    self.client.last
                ),
            }
        }
        let _ = self.supervisor.wait();
        runtime::supervisor::read_state(&self.plan.machine_dir).expect("final state.json")
    }

    pub fn leader(&self) -> u32 {
        self.client.last.as_ref().map(|s| s.leader).unwrap_or(0)
    }

    pub fn stop(&mut self) {
        self.client.send(Control::Stop).expect("send stop");
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.plan.machine_dir.join(paths::CONSOLE_LOG)).unwrap_or_default()
    }

    /// Runs a command inside the machine as `user` through the enter primitive.
    pub fn enter(&self, user: &str, argv: &[&str]) -> std::process::Output {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        runtime::enter::command(helper_binary(), &self.plan, self.leader(), user, &argv, &[])
            .expect("build enter command")
            .output()
            .expect("run enter")
    }

    /// Enters and returns stdout, asserting success.
    pub fn sh(&self, script: &str) -> String {
        let out = self.enter("", &["/bin/sh", "-c", script]);
        assert!(
            out.status.success(),
            "{script:?} failed: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestMachine {
    fn drop(&mut self) {
        let _ = self.client.send(Control::Kill);
        let _ = self.supervisor.wait();
        // The supervisor is done when it closes the control connection.
        while let Ok(Some(_)) = self.client.next(Duration::from_secs(10)) {}
        let _ = runtime::cgroup::remove_machine_cgroup(&self.plan.cgroup, Duration::from_secs(5));
        // Machines leave the shared test bridge in place for the next one, as
        // under a daemon; without one, the last machine's drop removes it.
        let _ = rmachines::network::firewall::cleanup(&test_network_config());
    }
}

/// Everything a machine might leave on the host, for "nothing left behind".
pub fn assert_nothing_left(machine: &TestMachine) {
    assert!(
        !machine.plan.cgroup.exists(),
        "cgroup {} left behind",
        machine.plan.cgroup.display()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = machine.plan.machine_dir.to_string_lossy().into_owned();
    assert!(!mounts.contains(&dir), "mounts under {dir} left behind");
    assert!(
        !machine.plan.machine_dir.join(paths::HOST_DIR).exists(),
        "host dir left behind"
    );
    assert!(
        !machine.plan.machine_dir.join(paths::CONTROL).exists(),
        "control socket left behind"
    );
    let pids = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok());
    for pid in pids {
        if let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            assert!(
                !cg.contains(&format!("/rmachines/test-{}", machine.plan.name())),
                "process {pid} left in the machine's cgroup"
            );
        }
    }
}
