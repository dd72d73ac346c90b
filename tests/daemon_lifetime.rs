//! Daemon lifetime (SPEC "Daemon lifetime and machines"), as root on this
//! host: SIGTERM to rmachined (a restart, an upgrade) leaves the machines
//! running and the next daemon re-adopts them; SIGTERM to a machine's
//! supervisor (sysvinit's killall5 at shutdown, a scope stop) stops the
//! machine gracefully.

mod common;
mod support;

use std::time::{Duration, Instant};

use common::{write_definition, Harness};

const WITH_PORT: &str = "[network]\nports = [\"tcp:18392:80\"]\n";

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn status_json(h: &Harness, name: &str) -> serde_json::Value {
    let out = h.rmachinectl(&["status", name, "--json"]);
    assert_ok(&out, "status --json");
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn wait_state(h: &Harness, name: &str, state: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let info = status_json(h, name);
        if info["state"] == state {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not {state} within {timeout:?}: {info}\n{}",
            h.daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process that exists and is not a zombie.
fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_dead(pid: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn sigterm_to_the_daemon_keeps_machines_and_a_new_daemon_readopts_them() {
    let root = support::fixture("busybox");
    let mut h = Harness::start_keeping_machines(|c| {
        write_definition(c, "kept", &root, WITH_PORT);
        write_definition(c, "kept2", &root, "[network]\nmode = \"none\"\n");
    });
    for name in ["kept", "kept2"] {
        assert_ok(&h.rmachinectl(&["start", name]), "start");
    }
    let before: Vec<serde_json::Value> = ["kept", "kept2"]
        .iter()
        .map(|name| wait_state(&h, name, "running", Duration::from_secs(30)))
        .collect();
    let addresses = before[0]["addresses"].clone();
    assert!(!addresses.as_array().unwrap().is_empty(), "{}", before[0]);

    let exit = h.terminate_daemon();
    assert!(exit.success(), "rmachined exits 0 on SIGTERM: {exit:?}");
    assert!(
        h.daemon_log().contains("2 machines keep running"),
        "{}",
        h.daemon_log()
    );
    for info in &before {
        let leader = info["leader"].as_u64().unwrap();
        assert!(
            alive(leader),
            "init {leader} of {} died with the daemon",
            info["name"]
        );
    }
    assert!(
        link_exists("ve-kept"),
        "the machine's veth went with the daemon"
    );
    assert!(link_exists(&h.bridge()), "the bridge went with the daemon");

    h.spawn_daemon();
    for info in &before {
        let name = info["name"].as_str().unwrap();
        let now = status_json(&h, name);
        assert_eq!(now["state"], "running", "{now}");
        assert_eq!(now["leader"], info["leader"], "{name} was not re-adopted");
    }
    assert_eq!(status_json(&h, "kept")["addresses"], addresses);
    // The re-adopted machine is fully managed: a shell reaches it and a
    // stop through the new daemon is graceful.
    let out = h.rmachinectl(&["shell", "kept", "--", "/bin/echo", "inside"]);
    assert_ok(&out, "shell in a re-adopted machine");
    assert!(String::from_utf8_lossy(&out.stdout).contains("inside"));
    for name in ["kept", "kept2"] {
        assert_ok(&h.rmachinectl(&["stop", name]), "stop");
        assert_eq!(status_json(&h, name)["state"], "stopped");
    }
    assert!(!link_exists("ve-kept"), "veth left after stop");
}

#[test]
fn with_stop_machines_on_exit_sigterm_stops_every_machine() {
    let root = support::fixture("busybox");
    let mut h = Harness::start_with(|c| write_definition(c, "gone", &root, WITH_PORT));
    assert_ok(&h.rmachinectl(&["start", "gone"]), "start");
    let leader = wait_state(&h, "gone", "running", Duration::from_secs(30))["leader"]
        .as_u64()
        .unwrap();
    assert!(h.terminate_daemon().success());
    assert!(
        wait_dead(leader, Duration::from_secs(10)),
        "init survived --stop-machines-on-exit"
    );
    assert!(!link_exists(&h.bridge()), "bridge left");
    assert!(
        h.stop_supervised_machines(Duration::from_secs(5))
            .is_empty(),
        "a supervisor outlived the daemon"
    );
}

/// The init traps the stop signal (SIGUSR2 here) and says so on the
/// console, then exits 0; a supervisor given SIGTERM must deliver it, wait,
/// and never escalate to SIGKILL.
#[test]
fn sigterm_to_a_supervisor_stops_its_machine_gracefully() {
    let root = support::fixture("busybox");
    let script = "trap 'echo stop-signal-reached-init; exit 0' USR2; \
                  echo trap-installed; while :; do sleep 0.1; done";
    let extra = format!(
        "boot = false\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n\
         stop_signal = \"SIGUSR2\"\nstop_timeout = \"20s\"\n[network]\nmode = \"none\"\n"
    );
    let h = Harness::start_keeping_machines(|c| write_definition(c, "termed", &root, &extra));
    assert_ok(&h.rmachinectl(&["start", "termed"]), "start");
    wait_state(&h, "termed", "running", Duration::from_secs(30));
    let machine_dir = h.state_dir().join("machines/termed");
    let console = || std::fs::read_to_string(machine_dir.join("console.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !console().contains("trap-installed") {
        assert!(Instant::now() < deadline, "init never ran: {}", console());
        std::thread::sleep(Duration::from_millis(20));
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(machine_dir.join("state.json")).unwrap()).unwrap();
    let supervisor = state["supervisor"].as_i64().unwrap() as i32;

    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let info = wait_state(&h, "termed", "stopped", Duration::from_secs(30));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the stop waited for the timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(info["error"], "", "{info}");
    assert!(
        console().contains("stop-signal-reached-init"),
        "the stop signal did not reach init: {}",
        console()
    );
    let log = std::fs::read_to_string(machine_dir.join("supervisor.log")).unwrap();
    assert!(!log.contains("SIGKILL"), "escalated to SIGKILL:\n{log}");
    assert!(
        wait_dead(supervisor as u64, Duration::from_secs(10)),
        "the supervisor did not exit"
    );
}

/// The scope layout without systemd: what the daemon does with a held
/// supervisor on a systemd host (crate::systemd), here with a plain
/// directory standing in for the scope's cgroup. The supervisor must run in
/// `<scope>/supervisor` and init in `<scope>/payload`, the cgroup written
/// into the plan after the launch.
#[test]
fn a_held_supervisor_boots_below_the_scope_it_was_moved_into() {
    use rmachines::runtime::{self, cgroup, protocol, supervisor};
    use rmachines::systemd;
    support::require_root();
    let state = tempfile::tempdir().unwrap();
    let def = support::definition("held", &support::fixture("busybox"));
    let mut plan = runtime::MachinePlan {
        layer: None,
        ids: runtime::idrange::IdRange {
            base: 0x4000_0000 + 4099 * 65536,
            size: 65536,
        },
        machine_dir: runtime::machine_dir(state.path(), "held"),
        cgroup: cgroup::machine_cgroup_path("test-held-unused").unwrap(),
        network: None,
        definition: def,
    };
    let scope = cgroup::cgroup2_mount()
        .unwrap()
        .join(format!("rmachines-test-scope-{}", std::process::id()));
    std::fs::create_dir_all(&scope).unwrap();
    let mut launched = supervisor::launch_held(support::helper_binary(), &plan).unwrap();
    let pid = launched.child.id();
    systemd::move_into(&systemd::supervisor_cgroup(&scope), pid).unwrap();
    plan.cgroup = systemd::payload_cgroup(&scope);
    rmachines::statefile::write_atomic(
        &plan.machine_dir.join("plan.json"),
        &serde_json::to_vec(&plan).unwrap(),
    )
    .unwrap();
    launched.release().unwrap();
    let _ = launched.child.wait();
    let mut client = protocol::Client::from_stream(launched.control).unwrap();
    let running = client
        .wait_for(Duration::from_secs(30), |s| {
            s.state == protocol::MachineState::Running
        })
        .unwrap()
        .expect("the released supervisor booted");
    let cgroup_of = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let scope_name = scope.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        cgroup_of(running.supervisor).ends_with(&format!("/{scope_name}/supervisor\n")),
        "supervisor in {}",
        cgroup_of(running.supervisor)
    );
    let procs = std::fs::read_to_string(plan.cgroup.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p == running.leader.to_string()),
        "init {} not in {}: {procs:?}",
        running.leader,
        plan.cgroup.display()
    );
    client.send(protocol::Command::Stop).unwrap();
    let end = client.wait_for(Duration::from_secs(30), |s| !s.state.is_active());
    assert!(
        matches!(&end, Ok(Some(s)) if s.state == protocol::MachineState::Stopped),
        "{end:?}"
    );
    // The supervisor removed the payload cgroup; the stand-in scope is ours.
    assert!(wait_dead(
        running.supervisor as u64,
        Duration::from_secs(10)
    ));
    assert!(!plan.cgroup.exists(), "payload cgroup left");
    std::fs::remove_dir(systemd::supervisor_cgroup(&scope)).unwrap();
    std::fs::remove_dir(&scope).unwrap();
}

/// A held supervisor that is never released (the scope could not be made)
/// exits without booting anything.
#[test]
fn an_unreleased_supervisor_exits_without_booting() {
    use rmachines::runtime::{self, cgroup, supervisor};
    support::require_root();
    let state = tempfile::tempdir().unwrap();
    let plan = runtime::MachinePlan {
        layer: None,
        ids: runtime::idrange::IdRange {
            base: 0x4000_0000 + 4098 * 65536,
            size: 65536,
        },
        machine_dir: runtime::machine_dir(state.path(), "unreleased"),
        cgroup: cgroup::machine_cgroup_path("test-unreleased").unwrap(),
        network: None,
        definition: support::definition("unreleased", &support::fixture("busybox")),
    };
    let mut launched = supervisor::launch_held(support::helper_binary(), &plan).unwrap();
    drop(launched.hold.take());
    let status = launched.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
    assert!(!plan.machine_dir.join("state.json").exists());
    assert!(!plan.cgroup.exists());
}
