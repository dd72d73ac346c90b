//! More than one host: `rmachinectl -H` over real ssh, and the Ansible
//! module (contrib/ansible) through real `ansible-playbook`.
//!
//! Each test host is a network namespace made here, with its own `sshd`
//! (its own host key, the test's client key, listening on the namespace's
//! address) and its own rmachined on its own private bus, which sshd gives
//! every session as `DBUS_SYSTEM_BUS_ADDRESS`. Everything goes when the
//! fleet is dropped, and with a test process that dies (PDEATHSIG).
//! Run as root through `scripts/isolated.sh fleet cargo test --test fleet`.

mod common;
mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{write_definition, Harness};
use tempfile::TempDir;

const NO_NET: &str = "[network]\nmode = \"none\"\n";

/// One test host: a network namespace (held by a `sleep`), an sshd and a
/// rmachined in it.
struct TestHost {
    address: String,
    holder: Child,
    sshd: Option<Child>,
    harness: Option<Harness>,
}

impl TestHost {
    fn harness(&self) -> &Harness {
        self.harness.as_ref().expect("the host's rmachined")
    }

    fn destination(&self) -> String {
        format!("root@{}", self.address)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut sshd) = self.sshd.take() {
            let _ = sshd.kill();
            let _ = sshd.wait();
        }
        // The daemon stops its machines and removes its bridge and table.
        drop(self.harness.take());
        // The namespace, and the veth pair with it, go with its last process.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Hosts that share the test's client key and known_hosts file.
struct Fleet {
    dir: TempDir,
    hosts: Vec<TestHost>,
}

impl Fleet {
    /// `count` hosts; `setup(index, config_dir)` writes each host's definitions.
    fn start(count: usize, setup: impl Fn(usize, &Path)) -> Fleet {
        common::require_root();
        let dir = tempfile::Builder::new()
            .prefix("rmachines-fleet-")
            .tempdir()
            .expect("create a temporary directory");
        let key = dir.path().join("client_key");
        keygen(&key);
        // sshd wants its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let mut fleet = Fleet {
            dir,
            hosts: Vec::new(),
        };
        let mut known_hosts = String::new();
        // A /24 per host, distinct across concurrent runs of this file.
        let base = std::process::id() % 50 * 4;
        for index in 0..count {
            let host = fleet.start_host(index, base as usize + index, &setup);
            let host_key = std::fs::read_to_string(
                fleet
                    .dir
                    .path()
                    .join(format!("host{index}"))
                    .join("host_key.pub"),
            )
            .expect("read the host key");
            known_hosts.push_str(&format!("{} {host_key}", host.address));
            fleet.hosts.push(host);
        }
        std::fs::write(fleet.dir.path().join("known_hosts"), known_hosts)
            .expect("write known_hosts");
        std::fs::write(
            fleet.dir.path().join("ssh_config"),
            format!(
                "Host *\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  \
                 UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n  \
                 StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 10\n",
                key = key.display(),
                known = fleet.dir.path().join("known_hosts").display()
            ),
        )
        .expect("write ssh_config");
        write_executable(
            &fleet.ssh(),
            &format!(
                "#!/bin/sh\nexec ssh -F {} \"$@\"\n",
                fleet.dir.path().join("ssh_config").display()
            ),
        );
        for host in &fleet.hosts {
            wait_for_port(&host.address);
        }
        fleet
    }

    fn start_host(&self, index: usize, subnet: usize, setup: &impl Fn(usize, &Path)) -> TestHost {
        let dir = self.dir.path().join(format!("host{index}"));
        std::fs::create_dir(&dir).expect("create the host's directory");
        let mut holder = Command::new("unshare");
        holder.args(["--net", "--", "sleep", "infinity"]);
        let holder = spawn_with_parent(holder, "unshare --net sleep");
        let netns = PathBuf::from(format!("/proc/{}/ns/net", holder.id()));
        let mut host = TestHost {
            address: format!("10.254.{subnet}.2"),
            holder,
            sshd: None,
            harness: None,
        };
        wait_for_own_netns(&netns);

        let outside = format!("rmf{}a{index}", std::process::id() % 100_000);
        let inside = format!("rmf{}b{index}", std::process::id() % 100_000);
        let pid = host.holder.id().to_string();
        run(&[
            "ip", "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &pid,
        ]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("10.254.{subnet}.1/24"),
            "dev",
            &outside,
        ]);
        run(&["ip", "link", "set", &outside, "up"]);
        let net = format!("--net={}", netns.display());
        run(&["nsenter", &net, "ip", "link", "set", "lo", "up"]);
        run(&[
            "nsenter",
            &net,
            "ip",
            "addr",
            "add",
            &format!("{}/24", host.address),
            "dev",
            &inside,
        ]);
        run(&["nsenter", &net, "ip", "link", "set", &inside, "up"]);

        host.harness = Some(Harness::start_in_netns(&netns, |config| {
            setup(index, config)
        }));

        keygen(&dir.join("host_key"));
        std::fs::copy(
            self.dir.path().join("client_key.pub"),
            dir.join("authorized_keys"),
        )
        .expect("authorize the client key");
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_rmachinectl"))
            .parent()
            .expect("the binaries' directory");
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {address}\nHostKey {dir}/host_key\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPidFile none\nUsePAM no\n\
                 StrictModes no\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 Subsystem sftp internal-sftp\n\
                 SetEnv DBUS_SYSTEM_BUS_ADDRESS={bus} PATH={bin}:/usr/sbin:/usr/bin:/sbin:/bin\n",
                address = host.address,
                dir = dir.display(),
                bus = host.harness().address(),
                bin = bin_dir.display(),
            ),
        )
        .expect("write sshd_config");
        let mut sshd = Command::new("nsenter");
        sshd.arg(&net)
            .arg("--")
            .arg("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stderr(std::fs::File::create(dir.join("sshd.log")).expect("create the sshd log"));
        host.sshd = Some(spawn_with_parent(sshd, "sshd"));
        host
    }

    /// The ssh wrapper rmachinectl and Ansible use (`RMACHINES_SSH`).
    fn ssh(&self) -> PathBuf {
        self.dir.path().join("ssh")
    }

    /// `rmachinectl -H root@HOST ARGS...`; the local bus address points
    /// nowhere, so nothing here can succeed without ssh.
    fn rmachinectl(&self, host: usize, args: &[&str]) -> Output {
        self.rmachinectl_command(host, args)
            .stdin(Stdio::null())
            .output()
            .expect("run rmachinectl")
    }

    fn rmachinectl_command(&self, host: usize, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rmachinectl"));
        command
            .arg("-H")
            .arg(self.hosts[host].destination())
            .args(args)
            .env("RMACHINES_SSH", self.ssh())
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
            .env_remove("RMACHINES_HOST");
        command
    }

    fn sshd_log(&self, host: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("host{host}/sshd.log")))
            .unwrap_or_default()
    }
}

fn spawn_with_parent(mut command: Command, what: &str) -> Child {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec. The process goes with a test process that dies.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            rmachines::runtime::sys::set_parent_death_signal(libc::SIGTERM)
        });
    }
    command
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("start {what}: {error}"))
}

fn wait_for_own_netns(netns: &Path) {
    let ours = std::fs::read_link("/proc/self/ns/net").expect("our netns");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::fs::read_link(netns).is_ok_and(|theirs| theirs != ours) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "{} did not get a network namespace of its own",
        netns.display()
    );
}

fn wait_for_port(address: &str) {
    let target: SocketAddr = format!("{address}:22").parse().expect("a socket address");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("sshd on {target} did not listen within 20 s");
}

fn keygen(path: &Path) {
    run(&[
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "rmachines-fleet-test",
        "-f",
        &path.display().to_string(),
    ]);
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write a script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod a script");
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("run {argv:?}: {error}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout {:?} stderr {:?}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|error| {
        panic!(
            "not JSON ({error}): {:?} {:?}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

/// The state of `name` as the host's own (local) rmachinectl sees it.
fn local_state(host: &TestHost, name: &str) -> String {
    let out = host.harness().rmachinectl(&["status", name, "--json"]);
    assert_ok(&out, "local status");
    json(&out)["state"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn rmachinectl_h_drives_two_hosts() {
    let root = support::fixture("busybox");
    let fleet = Fleet::start(2, |index, config| {
        write_definition(config, "web", &root, NO_NET);
        write_definition(config, &format!("only{index}"), &root, NO_NET);
    });

    for (index, host) in fleet.hosts.iter().enumerate() {
        let dest = host.destination();
        // list: each host's own machines.
        let out = fleet.rmachinectl(index, &["list", "--json"]);
        assert_ok(&out, &format!("list on {dest}"));
        let names: Vec<String> = json(&out)
            .as_array()
            .expect("a JSON array")
            .iter()
            .map(|m| m["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        let mut expected = vec![format!("only{index}"), "web".to_owned()];
        expected.sort();
        assert_eq!(names, expected, "list over -H on {dest}");

        // start waits for `running` through the signals the bridge relays.
        assert_ok(
            &fleet.rmachinectl(index, &["start", "web"]),
            "start over -H",
        );
        assert_eq!(local_state(host, "web"), "running", "web runs on {dest}");
        let out = fleet.rmachinectl(index, &["status", "web", "--json"]);
        assert_ok(&out, "status over -H");
        assert_eq!(json(&out)["state"], "running");

        // shell: the command's exit status comes back through ssh.
        let out = fleet.rmachinectl(index, &["shell", "web", "--", "/bin/sh", "-c", "exit 7"]);
        assert_eq!(
            out.status.code(),
            Some(7),
            "shell exit status on {dest}: {out:?}"
        );
        // Piped stdin and stdout (ssh -T, the remote rmachinectl's pipe mode).
        let mut cat = fleet
            .rmachinectl_command(
                index,
                &["shell", "web", "--", "/bin/sh", "-c", "cat; hostname"],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run rmachinectl shell");
        cat.stdin
            .take()
            .expect("stdin")
            .write_all(b"through ssh\nand back\n")
            .expect("write to the shell");
        let out = cat.wait_with_output().expect("wait for the shell");
        assert_ok(&out, "piped shell over -H");
        assert_eq!(text(&out.stdout), "through ssh\nand back\nweb\n");

        // Errors name the host and carry rmachined's sentence.
        let out = fleet.rmachinectl(index, &["start", "web"]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&dest) && stderr.contains("already running"),
            "error on {dest}: {stderr:?}"
        );

        assert_ok(&fleet.rmachinectl(index, &["stop", "web"]), "stop over -H");
        assert_eq!(local_state(host, "web"), "stopped", "web stopped on {dest}");
    }

    // RMACHINES_HOST instead of -H.
    let out = Command::new(env!("CARGO_BIN_EXE_rmachinectl"))
        .args(["status", "only1", "--json"])
        .env("RMACHINES_HOST", fleet.hosts[1].destination())
        .env("RMACHINES_SSH", fleet.ssh())
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .stdin(Stdio::null())
        .output()
        .expect("run rmachinectl");
    assert_ok(&out, "status with RMACHINES_HOST");
    assert_eq!(json(&out)["name"], "only1");

    // A host nobody answers on: the error names it.
    let unreachable = format!("root@{}:2222", fleet.hosts[0].address);
    let out = Command::new(env!("CARGO_BIN_EXE_rmachinectl"))
        .args(["-H", &unreachable, "list"])
        .env("RMACHINES_SSH", fleet.ssh())
        .stdin(Stdio::null())
        .output()
        .expect("run rmachinectl");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!(
            "rmachinectl: {unreachable}: cannot reach rmachined"
        )),
        "unreachable host: {:?}",
        text(&out.stderr)
    );
    for index in 0..fleet.hosts.len() {
        assert!(
            fleet.sshd_log(index).contains("Accepted publickey"),
            "sshd on host {index} saw the key login: {}",
            fleet.sshd_log(index)
        );
    }
}
