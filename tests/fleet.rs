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
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    cgroup: Option<PathBuf>,
}

/// sshd (`-f $2`) with `$1` as /etc/passwd; each step execs, so the pid
/// is sshd's.
const SSHD_WITH_PASSWD: &str = r#"set -e
mount --bind "$1" /etc/passwd
exec /usr/sbin/sshd -D -e -f "$2"
"#;

/// Runs `$3...` (rmachined) in cgroup `$2`, in new mount and cgroup
/// namespaces where the cgroup2 mount shows that cgroup as its root, as
/// scripts/isolated.sh does. Each step execs: the pid stays the daemon's.
const OWN_CGROUP_TREE: &str = r#"set -e
mount=$1
cgroup=$2
shift 2
echo $$ >"$cgroup/cgroup.procs"
exec unshare -m -C --propagation private -- /bin/sh -c '
	set -e
	umount -l "$1"
	mount -t cgroup2 cgroup2 "$1"
	shift
	exec "$@"
' sh "$mount" "$@"
"#;

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
        if let Some(cgroup) = self.cgroup.take() {
            // Empty once the daemon and its machines are gone.
            let _ = std::fs::remove_dir(&cgroup);
            if cgroup.exists() {
                eprintln!("{} is not empty", cgroup.display());
            }
        }
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
        // nobody's sshd reads its authorized_keys here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the fleet directory");
        let key = dir.path().join("client_key");
        keygen(&key);
        // sshd wants its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let mut fleet = Fleet {
            dir,
            hosts: Vec::new(),
        };
        let mut known_hosts = String::new();
        // A /24 and link names per host, distinct across the fleets of
        // this process and of concurrent runs of this file.
        static FLEETS: AtomicUsize = AtomicUsize::new(0);
        let fleet_id = FLEETS.fetch_add(1, Ordering::Relaxed);
        assert!(fleet_id < 8, "at most 8 fleets per test process");
        assert!(count <= 4, "at most 4 hosts per fleet");
        let base = std::process::id() as usize % 7 * 32 + fleet_id * 4;
        for index in 0..count {
            let tag = format!("{}{fleet_id}{index}", std::process::id() % 10_000);
            let host = fleet.start_host(index, base + index, &tag, &setup);
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

    fn start_host(
        &self,
        index: usize,
        subnet: usize,
        tag: &str,
        setup: &impl Fn(usize, &Path),
    ) -> TestHost {
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
            cgroup: None,
        };
        wait_for_own_netns(&netns);

        let outside = format!("rmf{tag}a");
        let inside = format!("rmf{tag}b");
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

        // A host of its own has its own cgroup tree: machines of the same
        // name on two hosts must not share a cgroup.
        let mount = rmachines::runtime::cgroup::cgroup2_mount().expect("the cgroup2 mount");
        let cgroup = mount.join(format!("rmachines-fleet-{}-{tag}", std::process::id()));
        std::fs::create_dir(&cgroup).expect("create the host's cgroup");
        host.cgroup = Some(cgroup.clone());
        let wrapper = vec![
            "nsenter".to_owned(),
            net.clone(),
            "--".to_owned(),
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            OWN_CGROUP_TREE.to_owned(),
            "sh".to_owned(),
            mount.display().to_string(),
            cgroup.display().to_string(),
        ];
        host.harness = Some(Harness::start_wrapped(wrapper, |config| {
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
        // An unprivileged login too: nobody, with a shell, in the host's
        // own view of /etc/passwd (its mount namespace).
        let passwd = dir.join("passwd");
        let users: String = std::fs::read_to_string("/etc/passwd")
            .expect("read /etc/passwd")
            .lines()
            .map(|line| match line.strip_prefix("nobody:") {
                Some(rest) => {
                    let fields: Vec<&str> = rest.split(':').collect();
                    format!("nobody:{}:/bin/sh\n", fields[..fields.len() - 1].join(":"))
                }
                None => format!("{line}\n"),
            })
            .collect();
        std::fs::write(&passwd, users).expect("write the host's passwd");
        let mut sshd = Command::new("nsenter");
        sshd.arg(&net)
            .args(["--", "unshare", "-m", "--propagation", "private", "--"])
            .args(["/bin/sh", "-c", SSHD_WITH_PASSWD, "sh"])
            .arg(&passwd)
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
        self.rmachinectl_as("root", host, args)
    }

    /// `rmachinectl -H USER@HOST ARGS...`.
    fn rmachinectl_as(&self, user: &str, host: usize, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rmachinectl"));
        command
            .arg("-H")
            .arg(format!("{user}@{}", self.hosts[host].address))
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

/// The state of `name` as the host's own (local) rmachinectl sees it, and
/// its error when there is one.
fn local_state(host: &TestHost, name: &str) -> String {
    let out = host.harness().rmachinectl(&["status", name, "--json"]);
    assert_ok(&out, "local status");
    let status = json(&out);
    let state = status["state"].as_str().unwrap_or_default();
    match status["error"].as_str() {
        Some(error) if !error.is_empty() => format!("{state}: {error}"),
        _ => state.to_owned(),
    }
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

        // On a terminal (script(1) gives one): ssh -tt, and the remote
        // rmachinectl relays a pty of the machine's.
        let command_line = format!(
            "{} -H {dest} shell web -- /bin/sh -c 'tty; exit 4'",
            env!("CARGO_BIN_EXE_rmachinectl")
        );
        let out = Command::new("script")
            .args(["-qec", &command_line, "/dev/null"])
            .env("RMACHINES_SSH", fleet.ssh())
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
            .stdin(Stdio::null())
            .output()
            .expect("run script");
        assert_eq!(out.status.code(), Some(4), "shell on a terminal: {out:?}");
        assert!(
            text(&out.stdout).contains("/dev/pts/"),
            "the command had a terminal: {:?}",
            text(&out.stdout)
        );

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

/// A playbook run: its exit status, output, and each host's recap.
struct PlaybookRun {
    output: Output,
}

impl PlaybookRun {
    fn log(&self) -> String {
        format!("{}{}", text(&self.output.stdout), text(&self.output.stderr))
    }

    /// `changed=N` of `host` in the PLAY RECAP.
    fn changed(&self, host: &str) -> u32 {
        self.recap(host, "changed")
    }

    fn recap(&self, host: &str, key: &str) -> u32 {
        let log = self.log();
        let line = log
            .lines()
            .skip_while(|line| !line.starts_with("PLAY RECAP"))
            .find(|line| line.split_whitespace().next() == Some(host))
            .unwrap_or_else(|| panic!("no recap for {host}:\n{log}"));
        line.split_whitespace()
            .find_map(|field| field.strip_prefix(&format!("{key}=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= for {host} in {line:?}"))
    }

    fn assert_ok(&self, what: &str) {
        assert!(self.output.status.success(), "{what}:\n{}", self.log());
    }
}

impl Fleet {
    /// An INI inventory of every host, with its rmachined's config dir.
    fn write_inventory(&self) -> PathBuf {
        let mut inventory = String::from("[machines]\n");
        for (index, host) in self.hosts.iter().enumerate() {
            inventory.push_str(&format!(
                "host{index} ansible_host={} rm_config_dir={} rm_site_dir={}\n",
                host.address,
                host.harness().config_dir().display(),
                self.dir.path().join(format!("host{index}/site")).display()
            ));
        }
        inventory.push_str(
            "\n[machines:vars]\nansible_user=root\nansible_python_interpreter=/usr/bin/python3\n",
        );
        let path = self.dir.path().join("inventory");
        std::fs::write(&path, inventory).expect("write the inventory");
        path
    }

    fn ansible_playbook(&self, playbook: &str, extra: &[&str]) -> PlaybookRun {
        let path = self.dir.path().join("playbook.yml");
        std::fs::write(&path, playbook).expect("write the playbook");
        let inventory = self.write_inventory();
        let home = self.dir.path().join("ansible");
        // Only this run's settings: no ansible.cfg of the machine's.
        let config = self.dir.path().join("ansible.cfg");
        std::fs::write(&config, "[defaults]\n").expect("write ansible.cfg");
        let output = Command::new("ansible-playbook")
            .arg("-i")
            .arg(&inventory)
            .args(extra)
            .arg(&path)
            .env(
                "ANSIBLE_COLLECTIONS_PATH",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ansible"),
            )
            .env("ANSIBLE_HOME", &home)
            .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
            .env("ANSIBLE_REMOTE_TMP", home.join("remote-tmp"))
            // No ControlPersist master left behind after the run.
            .env(
                "ANSIBLE_SSH_ARGS",
                format!(
                    "-F {} -o ControlMaster=no",
                    self.dir.path().join("ssh_config").display()
                ),
            )
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("ANSIBLE_CONFIG", &config)
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
            .stdin(Stdio::null())
            .output()
            .expect("run ansible-playbook (Debian package ansible-core)");
        PlaybookRun { output }
    }
}

/// The fleet's declared state: `web` runs everywhere, `db` is defined but
/// stopped.
fn site_playbook(root: &Path, web_extra: &str) -> String {
    format!(
        r#"- hosts: machines
  gather_facts: false
  tasks:
    - name: web runs on every host
      rmachines.core.machine:
        name: web
        config_dir: "{{{{ rm_config_dir }}}}"
        state: started
        definition:
          root: {root}
          stop_timeout: 10s
          network:
            mode: none
{web_extra}
    - name: db is defined and stopped
      rmachines.core.machine:
        name: db
        config_dir: "{{{{ rm_config_dir }}}}"
        state: stopped
        definition:
          root: {root}
          network:
            mode: none
"#,
        root = root.display()
    )
}

const ABSENT_PLAYBOOK: &str = r#"- hosts: machines
  gather_facts: false
  tasks:
    - name: no web, no db
      rmachines.core.machine:
        name: "{{ item }}"
        config_dir: "{{ rm_config_dir }}"
        state: absent
      loop: [web, db]
"#;

#[test]
fn ansible_declares_machines_on_two_hosts() {
    let root = support::fixture("busybox");
    let fleet = Fleet::start(2, |_, _| {});
    let hosts = ["host0", "host1"];
    let site = site_playbook(&root, "");

    // Check mode: what would change, with the file as a diff; nothing done.
    let run = fleet.ansible_playbook(&site, &["--check", "--diff"]);
    run.assert_ok("check run");
    for (index, name) in hosts.iter().enumerate() {
        assert_eq!(run.changed(name), 2, "check run on {name}:\n{}", run.log());
        let config = fleet.hosts[index].harness().config_dir();
        assert!(!config.join("web.toml").exists(), "check mode wrote a file");
    }
    assert!(
        run.log()
            .contains(&format!("+root = \"{}\"", root.display())),
        "diff shows the definition:\n{}",
        run.log()
    );

    // The real run brings every host to the declared state.
    let run = fleet.ansible_playbook(&site, &[]);
    run.assert_ok("first run");
    for (index, name) in hosts.iter().enumerate() {
        assert_eq!(run.changed(name), 2, "first run on {name}:\n{}", run.log());
        let host = &fleet.hosts[index];
        assert_eq!(local_state(host, "web"), "running", "web on {name}");
        assert_eq!(local_state(host, "db"), "stopped", "db on {name}");
        let file = std::fs::read_to_string(host.harness().config_dir().join("web.toml"))
            .expect("web.toml was written");
        assert!(file.contains("[network]\nmode = \"none\""), "{file}");
    }

    // Again: nothing to do, in check mode or not.
    for extra in [&["--check"][..], &[]] {
        let run = fleet.ansible_playbook(&site, extra);
        run.assert_ok("second run");
        for name in hosts {
            assert_eq!(
                run.changed(name),
                0,
                "second run {extra:?} on {name}:\n{}",
                run.log()
            );
        }
    }

    // A definition rmachined refuses: the task fails with its error text.
    let bad = site_playbook(&root, "          colour: red");
    let run = fleet.ansible_playbook(&bad, &[]);
    assert!(
        !run.output.status.success(),
        "a bad definition passed:\n{}",
        run.log()
    );
    assert!(
        run.log().contains("colour") && run.log().contains("web.toml"),
        "rmachined's error (file, key) in the failure:\n{}",
        run.log()
    );
    for (index, name) in hosts.iter().enumerate() {
        let host = &fleet.hosts[index];
        assert_eq!(
            local_state(host, "web"),
            "running",
            "web disturbed on {name}"
        );
        let file = std::fs::read_to_string(host.harness().config_dir().join("web.toml"))
            .expect("web.toml");
        assert!(
            !file.contains("colour"),
            "the refused file was kept: {file}"
        );
    }

    // state: absent stops and removes both, once.
    let run = fleet.ansible_playbook(ABSENT_PLAYBOOK, &[]);
    run.assert_ok("absent run");
    for (index, name) in hosts.iter().enumerate() {
        assert_eq!(run.changed(name), 1, "absent run on {name}:\n{}", run.log());
        let host = &fleet.hosts[index];
        let out = host.harness().rmachinectl(&["list", "--json"]);
        assert_ok(&out, "local list");
        assert_eq!(json(&out), serde_json::json!([]), "machines left on {name}");
        assert!(!host.harness().config_dir().join("web.toml").exists());
    }
    let run = fleet.ansible_playbook(ABSENT_PLAYBOOK, &[]);
    run.assert_ok("second absent run");
    for name in hosts {
        assert_eq!(
            run.changed(name),
            0,
            "second absent run on {name}:\n{}",
            run.log()
        );
    }
}

/// The playbook of docs/many-hosts.md, with this test's paths and hosts.
fn docs_playbook(root: &Path) -> String {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/many-hosts.md"))
            .expect("read docs/many-hosts.md");
    let start = doc
        .find("<!-- playbook")
        .expect("the playbook's start marker");
    let end = doc
        .find("<!-- /playbook -->")
        .expect("the playbook's end marker");
    let block = &doc[start..end];
    let yaml = block
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(yaml, _)| yaml)
        .expect("a yaml block between the markers");
    let replaced = yaml
        .replace("hosts: web\n", "hosts: machines\n")
        .replace("/var/lib/machines/web", &root.display().to_string())
        .replace(
            "dest: /srv/web/index.html",
            "dest: \"{{ rm_site_dir }}/index.html\"",
        )
        .replace("source: /srv/web\n", "source: \"{{ rm_site_dir }}\"\n")
        .replace("target: /srv/www", "target: /mnt")
        .replace("-h, /srv/www]", "-h, /mnt]")
        .replace(
            "        name: web\n",
            "        name: web\n        config_dir: \"{{ rm_config_dir }}\"\n",
        );
    assert!(
        replaced.contains("config_dir") && replaced.contains("rm_site_dir"),
        "the docs' playbook changed shape:\n{yaml}"
    );
    replaced
}

#[test]
fn docs_playbook_puts_web_on_three_hosts_with_a_published_port() {
    use std::io::Read;
    let root = support::fixture("busybox");
    let fleet = Fleet::start(3, |_, _| {});
    for index in 0..3 {
        std::fs::create_dir(fleet.dir.path().join(format!("host{index}/site")))
            .expect("create the site directory");
    }
    let playbook = docs_playbook(&root);
    let mut runs = Vec::new();
    for round in ["first", "second"] {
        let run = fleet.ansible_playbook(&playbook, &[]);
        println!("--- {round} run ---\n{}", text(&run.output.stdout));
        run.assert_ok(round);
        runs.push(run);
    }
    for index in 0..3 {
        let name = format!("host{index}");
        assert_eq!(runs[0].changed(&name), 2, "first run on {name}");
        assert_eq!(runs[1].changed(&name), 0, "second run on {name}");
        // The published port answers on the host's address, from outside.
        let address = &fleet.hosts[index].address;
        let mut stream = TcpStream::connect((address.as_str(), 8080))
            .unwrap_or_else(|error| panic!("connect to {address}:8080: {error}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        stream
            .write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
            .expect("send a request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read the response");
        assert!(
            response.starts_with("HTTP/1.") && response.ends_with(&format!("hello from {name}\n")),
            "{address}:8080 answered {response:?}"
        );
        // What docs/many-hosts.md shows.
        let out = fleet.rmachinectl(index, &["list"]);
        assert_ok(&out, "list over -H");
        println!(
            "$ rmachinectl -H {} list\n{}$ curl http://{address}:8080/\n{}",
            fleet.hosts[index].destination(),
            text(&out.stdout),
            response.rsplit("\r\n\r\n").next().unwrap_or_default()
        );
    }
}

/// Every byte value, and end of file, through `shell -T` over ssh; the
/// exit status comes back too.
#[test]
fn shell_dash_t_over_ssh_relays_binary_stdin_exactly() {
    let root = support::fixture("busybox");
    let fleet = Fleet::start(1, |_, config| {
        write_definition(config, "web", &root, NO_NET)
    });
    assert_ok(&fleet.rmachinectl(0, &["start", "web"]), "start over -H");
    let input: Vec<u8> = (0..=255u8).cycle().take(256 * 64).collect();
    let mut cat = fleet
        .rmachinectl_command(
            0,
            &["shell", "-T", "web", "--", "/bin/sh", "-c", "cat; exit 5"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rmachinectl shell -T");
    let mut stdin = cat.stdin.take().expect("stdin");
    let writer = {
        let input = input.clone();
        std::thread::spawn(move || stdin.write_all(&input))
    };
    let out = cat.wait_with_output().expect("wait for the shell");
    writer.join().expect("writer").expect("write stdin");
    assert_eq!(out.status.code(), Some(5), "{:?}", text(&out.stderr));
    assert!(
        out.stdout == input,
        "{} bytes came back, not the same",
        out.stdout.len()
    );
}

/// `-H` gives the remote user's rights: nobody may list but not start.
#[test]
fn h_has_the_remote_users_rights() {
    let root = support::fixture("busybox");
    let fleet = Fleet::start(1, |_, config| {
        write_definition(config, "web", &root, NO_NET)
    });
    let nobody = format!("nobody@{}", fleet.hosts[0].address);
    let out = fleet
        .rmachinectl_as("nobody", 0, &["list", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("run rmachinectl");
    assert_ok(&out, "list as nobody");
    assert_eq!(json(&out)[0]["name"], "web");
    let out = fleet
        .rmachinectl_as("nobody", 0, &["start", "web"])
        .stdin(Stdio::null())
        .output()
        .expect("run rmachinectl");
    assert!(!out.status.success(), "nobody started a machine");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("rmachinectl: {nobody}: "))
            && (stderr.contains("not allowed for uid 65534")
                || stderr.contains("only allowed to root")),
        "denied with the host named: {stderr:?}"
    );
    assert_eq!(local_state(&fleet.hosts[0], "web"), "stopped");
    assert!(
        fleet.sshd_log(0).contains("Accepted publickey for nobody"),
        "{}",
        fleet.sshd_log(0)
    );
}
