//! Machines on a host whose `/` is a shared mount (every systemd host): the
//! daemon runs in a mount namespace of its own made shared, and no mount of
//! a machine may propagate back into it, whether the start succeeds or not.

mod common;
mod support;

use std::path::Path;

use common::{write_definition, Harness};

const NO_NET: &str = "[network]\nmode = \"none\"\n";

/// Mount points in `pid`'s mount namespace at or below `dir`.
fn mounts_below(pid: u32, dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let dir = dir.display().to_string();
    info.lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|point| *point == dir || point.starts_with(&format!("{dir}/")))
        .map(str::to_owned)
        .collect()
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn machine_mounts_never_reach_a_shared_host_root() {
    let root = support::fixture("busybox");
    let bind_source = tempfile::tempdir().expect("bind source");
    std::fs::write(bind_source.path().join("data"), "bound\n").expect("bind data");
    let bind = format!(
        "[[bind]]\nsource = {:?}\ntarget = \"/mnt\"\nread_only = true\n",
        bind_source.path().display().to_string()
    );
    let mut h = Harness::start_in_shared_root(|c| {
        write_definition(c, "plain", &root, &format!("{NO_NET}{bind}"));
        write_definition(c, "eph", &root, &format!("ephemeral = true\n{NO_NET}"));
        write_definition(c, "ro", &root, &format!("read_only = true\n{NO_NET}"));
        // Fails in the child: a read-only root has no /nonexistent to bind on.
        write_definition(
            c,
            "broken",
            &root,
            &format!(
                "read_only = true\n{NO_NET}[[bind]]\nsource = {:?}\ntarget = \"/nonexistent/x\"\n",
                bind_source.path().display().to_string()
            ),
        );
    });
    let daemon = h.daemon_pid();
    let shared = std::fs::read_to_string(format!("/proc/{daemon}/mountinfo")).unwrap();
    let root_line = shared
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("the daemon's / in its mountinfo");
    assert!(
        root_line.contains("shared:"),
        "the daemon's / is not shared, the test proves nothing: {root_line}"
    );

    for round in 0..2 {
        for name in ["plain", "eph", "ro"] {
            assert_ok(
                &h.rmachinectl(&["start", name]),
                &format!("start {name} #{round}"),
            );
        }
        let failed = h.rmachinectl(&["start", "broken"]);
        assert!(!failed.status.success(), "the broken machine started");
        let out = h.rmachinectl(&["shell", "plain", "--", "cat", "/mnt/data"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bound");
        for dir in [&root, bind_source.path()] {
            let leaked = mounts_below(daemon, dir);
            assert!(
                leaked.is_empty(),
                "round {round}: machine mounts appeared in the host's namespace: {leaked:?}"
            );
        }
        for name in ["plain", "eph", "ro"] {
            assert_ok(&h.rmachinectl(&["stop", name]), &format!("stop {name}"));
        }
    }
    h.terminate_daemon();
}
