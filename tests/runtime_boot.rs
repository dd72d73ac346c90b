//! The runtime for real: machines booted as root through the supervisor,
//! without the daemon. Each test shows one property of a running machine.

mod support;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use rmachines::definition::StopSignal;
use rmachines::runtime::protocol::MachineState;
use support::*;

const BOOT: Duration = Duration::from_secs(30);

#[test]
fn busybox_init_is_pid1_in_its_own_namespaces() {
    let root = fixture("busybox");
    let mut m = TestMachine::launch(definition("bb-pid1", &root));
    let status = m.wait_state(MachineState::Running, BOOT);
    assert!(status.leader > 0);
    assert_eq!(m.sh("cat /proc/1/comm").trim(), "init");
    // The guest sees only its own processes: nothing from the host.
    let guest_pids: Vec<u32> = m
        .sh("ls /proc")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(guest_pids.contains(&1));
    assert!(
        guest_pids.len() < 10,
        "guest sees host processes: {guest_pids:?}"
    );
    // Every namespace differs from the host's.
    for ns in ["user", "pid", "mnt", "net", "uts", "ipc", "cgroup"] {
        let host = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let guest = std::fs::read_link(format!("/proc/{}/ns/{ns}", status.leader)).unwrap();
        assert_ne!(host, guest, "{ns} namespace is shared with the host");
    }
    m.stop();
    let end = m.wait_end(BOOT);
    assert_eq!(end.state, MachineState::Stopped, "{end:?}\n{}", m.console());
    assert_nothing_left(&m);
}

#[test]
fn guest_root_is_an_unprivileged_host_uid_and_files_keep_their_owners() {
    let root = fixture("busybox");
    let mut m = TestMachine::launch(definition("bb-uid", &root));
    let status = m.wait_state(MachineState::Running, BOOT);
    let map = std::fs::read_to_string(format!("/proc/{}/uid_map", status.leader)).unwrap();
    let fields: Vec<u64> = map.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!(fields[0], 0, "guest uid 0 is mapped");
    assert!(
        fields[1] >= 65536,
        "guest root maps to host uid {}",
        fields[1]
    );
    assert_eq!(fields[2], 65536);
    let host_uid = std::fs::metadata(format!("/proc/{}", status.leader))
        .unwrap()
        .uid();
    assert_eq!(
        host_uid as u64, fields[1],
        "init runs as the mapped host uid"
    );
    // Inside, the tree looks owned by root and user 1000, as on disk.
    assert_eq!(m.sh("id -u").trim(), "0");
    assert_eq!(m.sh("stat -c %u:%g /etc/passwd").trim(), "0:0");
    assert_eq!(m.sh("stat -c %u /home/user").trim(), "1000");
    // A file created by the guest's root is owned by 0 on disk (idmapped).
    m.sh("echo hi > /root/made-by-guest");
    let made = root.join("root/made-by-guest");
    assert_eq!(std::fs::metadata(&made).unwrap().uid(), 0);
    std::fs::remove_file(made).unwrap();
    // The guest's user 1000 runs as host uid base+1000.
    let out = m.enter("user", &["/bin/sh", "-c", "id -u; echo $HOME $USER"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1000\n/home/user user\n"
    );
    m.stop();
    m.wait_end(BOOT);
    assert_nothing_left(&m);
}

#[test]
fn guest_has_its_hostname_no_host_links_and_protected_proc_and_sys() {
    let root = fixture("busybox");
    let mut def = definition("bb-fs", &root);
    def.hostname = "guest-host".into();
    let mut m = TestMachine::launch(def);
    m.wait_state(MachineState::Running, BOOT);
    assert_eq!(m.sh("hostname").trim(), "guest-host");
    let links = m.sh("ls /sys/class/net");
    assert_eq!(
        links.split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "guest sees host links"
    );
    let out = m.enter("", &["/bin/sh", "-c", "echo x > /sys/kernel/uevent_helper"]);
    assert!(!out.status.success(), "/sys is writable");
    let out = m.enter("", &["/bin/sh", "-c", "echo h > /proc/sysrq-trigger"]);
    assert!(!out.status.success(), "/proc/sysrq-trigger is writable");
    let out = m.enter("", &["/bin/sh", "-c", "echo 1 > /proc/sys/kernel/sysrq"]);
    assert!(!out.status.success(), "/proc/sys is writable");
    // Its own network sysctls stay writable.
    m.sh("echo 1 > /proc/sys/net/ipv4/ip_forward");
    // /dev holds only the listed nodes, a private devpts and the console.
    let dev = m.sh("ls /dev");
    for node in [
        "null", "zero", "full", "random", "urandom", "tty", "console", "ptmx", "pts",
    ] {
        assert!(
            dev.split_whitespace().any(|n| n == node),
            "/dev lacks {node}: {dev}"
        );
    }
    assert!(
        !dev.contains("sda") && !dev.contains("vda") && !dev.contains("mem"),
        "host devices in /dev: {dev}"
    );
    assert_eq!(
        m.sh("cat /sys/fs/cgroup/cgroup.procs | head -1").trim(),
        "1",
        "cgroup root is the machine's"
    );
    assert!(m.sh("cat /run/host/os-release").contains("NAME="));
    let env = std::fs::read(format!("/proc/{}/environ", m.leader())).unwrap();
    let env = String::from_utf8_lossy(&env);
    assert!(env.contains("container=rmachines"));
    assert!(env.contains("NOTIFY_SOCKET=/run/host/notify"));
    assert_eq!(m.sh("cat /etc/machine-id").trim().len(), 32);
    m.stop();
    m.wait_end(BOOT);
    assert_nothing_left(&m);
}

#[test]
fn guest_poweroff_stops_and_reboot_restarts() {
    let root = fixture("busybox");
    let mut m = TestMachine::launch(definition("bb-reboot", &root));
    let first = m.wait_state(MachineState::Running, BOOT);
    let _ = m.enter("", &["/bin/sh", "-c", "reboot"]);
    let again = m
        .client
        .wait_for(BOOT, |s| s.state == MachineState::Running && s.boots == 2)
        .unwrap()
        .expect("machine came back after reboot");
    assert_ne!(first.leader, again.leader, "a new init after reboot");
    let _ = m.enter("", &["/bin/sh", "-c", "poweroff"]);
    let end = m.wait_end(BOOT);
    assert_eq!(end.state, MachineState::Stopped, "{end:?}");
    assert_nothing_left(&m);
}

#[test]
fn stop_times_out_into_sigkill_for_an_init_that_ignores_the_signal() {
    let root = fixture("busybox");
    let mut def = definition("bb-stubborn", &root);
    def.boot = false;
    def.command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "trap '' TERM; while :; do sleep 1; done".into(),
    ];
    def.stop_signal = StopSignal::Signal(libc::SIGTERM);
    def.stop_timeout = Duration::from_secs(2);
    let mut m = TestMachine::launch(def);
    m.wait_state(MachineState::Running, BOOT);
    let started = std::time::Instant::now();
    m.stop();
    let end = m.wait_end(Duration::from_secs(20));
    let took = started.elapsed();
    assert_eq!(end.state, MachineState::Stopped);
    assert!(
        took >= Duration::from_secs(2),
        "stopped before the timeout: {took:?}"
    );
    assert!(
        std::fs::read_to_string(m.plan.machine_dir.join("supervisor.log"))
            .unwrap()
            .contains("SIGKILL")
    );
    assert_nothing_left(&m);
}

#[test]
fn ephemeral_and_read_only_roots_leave_the_tree_untouched() {
    let root = fixture("busybox");
    let mut def = definition("bb-ephemeral", &root);
    def.ephemeral = true;
    let mut m = TestMachine::launch(def);
    m.wait_state(MachineState::Running, BOOT);
    m.sh("echo scratch > /etc/ephemeral-write");
    assert!(
        !root.join("etc/ephemeral-write").exists(),
        "ephemeral write reached the tree"
    );
    m.stop();
    m.wait_end(BOOT);
    assert_nothing_left(&m);

    let mut def = definition("bb-readonly", &root);
    def.read_only = true;
    let mut m = TestMachine::launch(def);
    m.wait_state(MachineState::Running, BOOT);
    let out = m.enter("", &["/bin/sh", "-c", "echo x > /etc/ro-write"]);
    assert!(!out.status.success(), "read-only root is writable");
    m.stop();
    m.wait_end(BOOT);
    assert_nothing_left(&m);
}

#[test]
fn bind_mounts_appear_in_the_guest() {
    let root = fixture("busybox");
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("hello"), "from host\n").unwrap();
    let mut def = definition("bb-bind", &root);
    def.binds.push(rmachines::definition::Bind {
        source: shared.path().into(),
        target: "/srv/shared".into(),
        read_only: true,
    });
    let mut m = TestMachine::launch(def);
    m.wait_state(MachineState::Running, BOOT);
    assert_eq!(m.sh("cat /srv/shared/hello"), "from host\n");
    assert!(!m
        .enter("", &["/bin/sh", "-c", "echo x > /srv/shared/new"])
        .status
        .success());
    m.stop();
    m.wait_end(BOOT);
    assert_nothing_left(&m);
}

#[test]
fn debian_with_systemd_boots_to_running_after_ready_and_stops() {
    // A first boot (empty /etc/machine-id), on a copy: systemd writes the
    // tree's machine id.
    let root = support::FixtureCopy::new("debian", "deb-boot");
    let mut m = TestMachine::launch(definition("deb-boot", &root.path));
    let status = m.wait_state(MachineState::Running, Duration::from_secs(90));
    // Running only comes from READY=1 for systemd: by then it has a state.
    let out = m.enter("", &["systemctl", "is-system-running", "--wait"]);
    let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(
        state,
        "running",
        "failed units: {}\n{}",
        m.sh("systemctl list-units --failed --no-legend --plain"),
        m.console()
    );
    // The machine id is the container_uuid rmachines passes, committed to
    // the tree by systemd (nothing of ours is mounted on /etc/machine-id).
    let env = std::fs::read(format!("/proc/{}/environ", m.leader())).unwrap();
    let env = String::from_utf8_lossy(&env);
    let uuid = env
        .split('\0')
        .find_map(|e| e.strip_prefix("container_uuid="))
        .expect("container_uuid in init's environment")
        .replace('-', "");
    assert_eq!(m.sh("cat /etc/machine-id").trim(), uuid);
    assert_eq!(
        std::fs::read_to_string(root.path.join("etc/machine-id"))
            .unwrap()
            .trim(),
        uuid,
        "the id was not committed to the tree"
    );
    assert_eq!(m.sh("cat /proc/1/comm").trim(), "systemd");
    assert!(status.leader > 0);
    m.stop();
    let end = m.wait_end(Duration::from_secs(60));
    assert_eq!(end.state, MachineState::Stopped, "{end:?}");
    assert!(
        m.console().contains("rmachines") || !m.console().is_empty(),
        "console was logged"
    );
    assert_nothing_left(&m);
}

#[test]
fn bad_roots_fail_with_a_clear_error_and_leave_nothing() {
    let empty = tempfile::tempdir().unwrap();
    let mut m = TestMachine::launch(definition("bad-noinit", empty.path()));
    let end = m.wait_end(BOOT);
    assert_eq!(end.state, MachineState::Failed);
    assert!(end.error.contains("/sbin/init"), "{}", end.error);
    assert_nothing_left(&m);
}
