//! rmachined with real machines, driven through the bus with rmachinectl,
//! busctl and zbus (as root). The D-Bus surface itself is in dbus_api.rs.

mod common;
mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{error_name, write_definition, Harness};
use futures_util::StreamExt;
use rmachines::dbus::proxy::ManagerProxy;

const NO_NET: &str = "[network]\nmode = \"none\"\n";

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}{}",
        out.status,
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn state_of(h: &Harness, name: &str) -> String {
    let out = h.rmachinectl(&["status", name, "--json"]);
    assert_ok(&out, "status --json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["state"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn start_shell_stop_through_rmachinectl_with_signals_in_order() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "bb", &root, NO_NET));
    let conn = h.connection().await;
    let manager = ManagerProxy::new(&conn).await.unwrap();
    let mut changes = manager.receive_state_changed().await.unwrap();

    assert_ok(&h.rmachinectl(&["start", "bb"]), "rmachinectl start");
    assert_eq!(state_of(&h, "bb"), "running", "start returns once running");
    let again = h.rmachinectl(&["start", "bb"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    // Exit status and piped input through the shell.
    let out = h.rmachinectl(&["shell", "bb", "--", "/bin/sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let mut cat = Command::new(env!("CARGO_BIN_EXE_rmachinectl"))
        .args(["shell", "bb", "--", "cat"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", h.address())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin
        .take()
        .unwrap()
        .write_all(b"hi through the pipe\n")
        .unwrap();
    let out = cat.wait_with_output().unwrap();
    assert_ok(&out, "piped shell");
    assert_eq!(stdout(&out).trim_end(), "hi through the pipe");
    let out = h.rmachinectl(&[
        "shell",
        "bb",
        "--uid",
        "user",
        "--setenv",
        "GREETING=hello",
        "--",
        "/bin/sh",
        "-c",
        "echo $(id -u) $GREETING $HOME",
    ]);
    assert_ok(&out, "shell --uid");
    assert_eq!(stdout(&out).trim(), "1000 hello /home/user");

    assert_ok(&h.rmachinectl(&["stop", "bb"]), "rmachinectl stop");
    assert_eq!(state_of(&h, "bb"), "stopped");
    let stopped_again = h.rmachinectl(&["stop", "bb"]);
    assert!(!stopped_again.status.success());

    let mut seen = Vec::new();
    while let Ok(Some(signal)) =
        tokio::time::timeout(Duration::from_millis(500), changes.next()).await
    {
        let args = signal.args().unwrap();
        assert_eq!(args.name(), "bb");
        if seen.last() != Some(args.state()) {
            seen.push(args.state().to_owned());
        }
    }
    assert_eq!(seen, ["starting", "running", "stopping", "stopped"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn busctl_drives_list_start_shell_errors_stop_and_reload() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "viabus", &root, NO_NET));
    let out = h.busctl_call(&[
        "/org/rmachines1",
        "org.rmachines1.Manager",
        "Start",
        "s",
        "viabus",
    ]);
    assert_ok(&out, "busctl Start");
    assert!(stdout(&out).contains("/org/rmachines1/machine/viabus"));
    let out = h.busctl_call(&["/org/rmachines1", "org.rmachines1.Manager", "List"]);
    assert_ok(&out, "busctl List");
    assert!(stdout(&out).contains("\"viabus\""), "{}", stdout(&out));

    let conn = h.connection().await;
    let manager = ManagerProxy::new(&conn).await.unwrap();
    assert_eq!(
        error_name(manager.start("viabus").await),
        "org.rmachines1.AlreadyRunning"
    );
    assert_eq!(
        error_name(manager.shell("viabus", "nosuchuser", &[], &[]).await),
        "org.rmachines1.NoSuchUser"
    );
    assert_eq!(
        error_name(manager.start("../x").await),
        "org.rmachines1.InvalidArgument"
    );
    assert_eq!(
        error_name(manager.stop("unknown").await),
        "org.rmachines1.NoSuchMachine"
    );

    assert_ok(
        &h.busctl_call(&[
            "/org/rmachines1",
            "org.rmachines1.Manager",
            "Stop",
            "s",
            "viabus",
        ]),
        "busctl Stop",
    );
    assert_eq!(
        error_name(manager.stop("viabus").await),
        "org.rmachines1.NotRunning"
    );

    // Reload: a new definition appears as an object, a removed one goes.
    write_definition(&h.config_dir(), "later", &root, NO_NET);
    assert_ok(
        &h.busctl_call(&["/org/rmachines1", "org.rmachines1.Manager", "Reload"]),
        "busctl Reload",
    );
    manager.get_machine("later").await.expect("added by Reload");
    std::fs::remove_file(h.config_dir().join("later.toml")).unwrap();
    assert_ok(&h.rmachinectl(&["reload"]), "rmachinectl reload");
    assert_eq!(
        error_name(manager.get_machine("later").await),
        "org.rmachines1.NoSuchMachine"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_debian_guest_is_running_only_after_ready() {
    let root = support::fixture("debian");
    // Ephemeral: the guest's first boot writes its machine id, never to
    // the shared fixture.
    let h = Harness::start_with(|c| {
        write_definition(c, "deb", &root, &format!("ephemeral = true\n{NO_NET}"))
    });
    let conn = h.connection().await;
    let manager = ManagerProxy::new(&conn).await.unwrap();
    // Start returns once init executes; systemd is not ready by then.
    manager.start("deb").await.unwrap();
    assert_eq!(state_of(&h, "deb"), "starting");
    let mut running = false;
    for _ in 0..600 {
        if state_of(&h, "deb") == "running" {
            running = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(running, "deb never reached running:\n{}", h.daemon_log());
    // READY=1 comes when startup is complete: no longer "starting".
    let out = h.rmachinectl(&["shell", "deb", "--", "systemctl", "is-system-running"]);
    let state = stdout(&out).trim().to_owned();
    assert!(
        state == "running" || state == "degraded",
        "is-system-running right after READY: {state}"
    );
    let out = h.rmachinectl(&["shell", "deb", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_ok(&h.rmachinectl(&["stop", "deb"]), "stop deb");
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_machines_start_concurrently_and_sigterm_stops_them_all() {
    let root = support::fixture("busybox");
    let names: Vec<String> = (0..20).map(|i| format!("crowd-{i:02}")).collect();
    let mut h = Harness::start_with(|c| {
        for name in &names {
            write_definition(c, name, &root, NO_NET);
        }
        write_definition(
            c,
            "broken",
            std::path::Path::new("/nonexistent"),
            "bogus = 1\n",
        );
    });
    let mut args = vec!["start"];
    args.extend(names.iter().map(String::as_str));
    assert_ok(&h.rmachinectl(&args), "start 20");
    let out = h.rmachinectl(&["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 21);
    for entry in list {
        let name = entry["name"].as_str().unwrap();
        let expected = if name == "broken" {
            "failed"
        } else {
            "running"
        };
        assert_eq!(entry["state"], expected, "{entry}");
    }
    let status = h.rmachinectl(&["status", "broken"]);
    assert!(
        stdout(&status).contains("broken.toml"),
        "{}",
        stdout(&status)
    );
    let leaders: Vec<u64> = list
        .iter()
        .filter_map(|e| e["leader"].as_u64())
        .filter(|l| *l > 0)
        .collect();
    assert_eq!(leaders.len(), 20);

    let exit = h.terminate_daemon();
    assert!(exit.success(), "rmachined exit: {exit:?}");
    for pid in leaders {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "init {pid} survived"
        );
    }
    for name in &names {
        let cg = rmachines::runtime::cgroup::machine_cgroup_path(name).unwrap();
        assert!(!cg.exists(), "{} left behind", cg.display());
    }
}

/// Runs rmachinectl with a pty as its terminal; returns what it printed and
/// the terminal's modes after it exited.
fn shell_on_a_tty(
    h: &Harness,
    args: &[&str],
    rows: u16,
    cols: u16,
    resize_to: Option<(u16, u16)>,
) -> (String, nix::sys::termios::Termios, Option<i32>) {
    use nix::pty::{openpty, Winsize};
    use std::io::Read;
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&size), None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut child = Command::new(env!("CARGO_BIN_EXE_rmachinectl"))
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", h.address())
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .unwrap();
    // The output is read as it comes: a resize waits for the command's
    // "ready" (by then rmachinectl relays, its SIGWINCH handler in place).
    let mut master = std::fs::File::from(pty.master);
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        // A pty whose other side closed reads EIO: that is the end.
        while let Ok(n @ 1..) = master.read(&mut chunk) {
            if seen_tx.send(chunk[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    if let Some((rows, cols)) = resize_to {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !String::from_utf8_lossy(&out).contains("ready") {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match seen_rx.recv_timeout(left) {
                Ok(bytes) => out.extend(bytes),
                Err(_) => panic!(
                    "the command never printed ready: {:?}",
                    String::from_utf8_lossy(&out)
                ),
            }
        }
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&slave),
                libc::TIOCSWINSZ,
                &size,
            )
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGWINCH,
        )
        .unwrap();
    }
    let status = child.wait().unwrap();
    let modes = nix::sys::termios::tcgetattr(&slave).unwrap();
    drop(slave);
    reader.join().expect("the pty reader panicked");
    out.extend(seen_rx.try_iter().flatten());
    (
        String::from_utf8_lossy(&out).into_owned(),
        modes,
        status.code(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_on_a_terminal_passes_the_window_size_and_restores_the_mode() {
    use nix::sys::termios::LocalFlags;
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "tty", &root, NO_NET));
    assert_ok(&h.rmachinectl(&["start", "tty"]), "start");
    let (out, modes, code) =
        shell_on_a_tty(&h, &["shell", "tty", "--", "stty", "size"], 33, 111, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("33 111"), "window size not passed on: {out:?}");
    assert!(
        modes
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO),
        "terminal left in raw mode"
    );

    let (out, modes, code) = shell_on_a_tty(
        &h,
        &[
            "shell",
            "tty",
            "--",
            "/bin/sh",
            "-c",
            // Waits (bounded) for the new size rather than for a guess of time.
            "echo ready; i=0; while [ \"$(stty size)\" = \"24 80\" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; stty size; exit 3",
        ],
        24,
        80,
        Some((40, 120)),
    );
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("40 120"), "SIGWINCH not passed on: {out:?}");
    assert!(
        modes
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO),
        "terminal left in raw mode"
    );
    assert_ok(&h.rmachinectl(&["stop", "tty"]), "stop");
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn nft_table_exists(table: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", table])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

const WITH_PORT: &str = "[network]\nports = [\"tcp:18391:80\"]\n";

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_leaves_no_link_rule_address_or_cgroup_when_it_exits() {
    let root = support::fixture("busybox");
    let mut h = Harness::start_with(|c| write_definition(c, "netexit", &root, WITH_PORT));
    assert_ok(&h.rmachinectl(&["start", "netexit"]), "start");
    let (bridge, table) = (h.bridge(), h.nft_table());
    assert!(
        link_exists("ve-netexit") && link_exists(&bridge),
        "machine links missing"
    );
    assert!(nft_table_exists(&table), "rules missing");
    let status = h.rmachinectl(&["status", "netexit", "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(!info["addresses"].as_array().unwrap().is_empty(), "{info}");

    assert!(h.terminate_daemon().success());
    assert!(
        !link_exists("ve-netexit"),
        "veth left after the daemon exited"
    );
    assert!(
        !link_exists(&bridge),
        "bridge (with the gateway address) left"
    );
    assert!(!nft_table_exists(&table), "nftables table left");
    assert!(!rmachines::runtime::cgroup::machine_cgroup_path("netexit")
        .unwrap()
        .exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_after_a_crash_removes_what_the_dead_instance_left() {
    let root = support::fixture("busybox");
    let mut h = Harness::start_with(|c| write_definition(c, "crashed", &root, WITH_PORT));
    assert_ok(&h.rmachinectl(&["start", "crashed"]), "start");
    let (bridge, table) = (h.bridge(), h.nft_table());
    let state = std::fs::read(h.state_dir().join("machines/crashed/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state).unwrap();
    let supervisor = state["supervisor"].as_i64().unwrap() as i32;
    // A crash of everything: the daemon and the machine's supervisor die
    // without cleaning up (init follows its supervisor: PDEATHSIG).
    h.kill_daemon();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let cgroup = rmachines::runtime::cgroup::machine_cgroup_path("crashed").unwrap();
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{supervisor}")).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        link_exists(&bridge) && nft_table_exists(&table) && cgroup.exists(),
        "the crash left nothing to clean up"
    );

    h.spawn_daemon();
    assert!(!link_exists(&bridge), "bridge of the dead instance left");
    assert!(!nft_table_exists(&table), "rules of the dead instance left");
    assert!(!cgroup.exists(), "cgroup of the dead instance left");
    assert_eq!(state_of(&h, "crashed"), "stopped");
    // And the machine starts again cleanly.
    assert_ok(
        &h.rmachinectl(&["start", "crashed"]),
        "start after the crash",
    );
    assert_ok(&h.rmachinectl(&["stop", "crashed"]), "stop");
}

/// The addresses in the table's NAT set for the daemon's bridge.
fn nat_elements(table: &str, bridge: &str) -> BTreeSet<String> {
    let out = Command::new("nft")
        .args([
            "-j",
            "list",
            "set",
            "inet",
            table,
            &format!("nat4-{bridge}"),
        ])
        .output()
        .expect("run nft");
    if !out.status.success() {
        return BTreeSet::new();
    }
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["set"]["elem"].as_array())
        .flatten()
        .filter_map(|elem| elem.as_str().map(str::to_owned))
        .collect()
}

fn ipv4_of(h: &Harness, name: &str) -> String {
    let status = h.rmachinectl(&["status", name, "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status --json");
    info["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .find(|a| !a.contains(':'))
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("{name} has no IPv4 address: {info}"))
        .to_owned()
}

/// A machine adds or removes only its own NAT address (an element of one
/// set, not a rebuild of the table), and a table removed behind the
/// daemon's back is rebuilt whole, with every running machine, at the next
/// change.
#[tokio::test(flavor = "multi_thread")]
async fn nat_set_follows_the_running_machines_and_a_lost_table_is_rebuilt() {
    let root = support::fixture("busybox");
    let names = ["nat1", "nat2", "nat3"];
    let h = Harness::start_with(|c| {
        for name in names {
            write_definition(c, name, &root, "");
        }
    });
    let (bridge, table) = (h.bridge(), h.nft_table());
    assert_ok(&h.rmachinectl(&["start", "nat1"]), "start nat1");
    assert_ok(&h.rmachinectl(&["start", "nat2"]), "start nat2");
    let (a1, a2) = (ipv4_of(&h, "nat1"), ipv4_of(&h, "nat2"));
    assert_eq!(
        nat_elements(&table, &bridge),
        BTreeSet::from([a1.clone(), a2.clone()])
    );
    // The rule masquerades the set's addresses.
    let listing = Command::new("nft")
        .args(["list", "chain", "inet", &table, "postrouting"])
        .output()
        .expect("nft");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains(&format!(
            "ip saddr @nat4-{bridge} oifname != \"{bridge}\" masquerade"
        )),
        "{listing}"
    );

    assert_ok(&h.rmachinectl(&["stop", "nat1"]), "stop nat1");
    assert_eq!(nat_elements(&table, &bridge), BTreeSet::from([a2.clone()]));

    // Somebody flushes our table; the next start puts all of it back.
    let deleted = Command::new("nft")
        .args(["delete", "table", "inet", &table])
        .status()
        .expect("nft");
    assert!(deleted.success());
    assert_ok(&h.rmachinectl(&["start", "nat3"]), "start nat3");
    let a3 = ipv4_of(&h, "nat3");
    assert_eq!(
        nat_elements(&table, &bridge),
        BTreeSet::from([a2.clone(), a3.clone()])
    );
    assert_ok(&h.rmachinectl(&["stop", "nat2"]), "stop nat2");
    assert_ok(&h.rmachinectl(&["stop", "nat3"]), "stop nat3");
    // Like the bridge, the table waits for the next machine ...
    assert!(
        nft_table_exists(&table),
        "table removed with the last machine"
    );
    assert!(nat_elements(&table, &bridge).is_empty());
    // ... and goes with the daemon.
    let mut h = h;
    assert!(h.terminate_daemon().success());
    assert!(
        !nft_table_exists(&table),
        "table left after the daemon exited"
    );
}

/// `rmachinectl shell M -- yes | head -1`: when the reader goes away,
/// rmachinectl ends like a process killed by SIGPIPE (141) instead of
/// waiting forever, and the command in the machine is hung up.
#[tokio::test(flavor = "multi_thread")]
async fn shell_ends_when_its_reader_goes_away() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "pipe", &root, NO_NET));
    assert_ok(&h.rmachinectl(&["start", "pipe"]), "start");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rmachinectl"))
        .args(["shell", "pipe", "--", "/bin/sh", "-c", "exec yes marker"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", h.address())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run rmachinectl");
    let mut out = child.stdout.take().expect("stdout");
    let mut first = [0u8; 7];
    std::io::Read::read_exact(&mut out, &mut first).expect("read the first output");
    assert_eq!(&first, b"marker\n");
    drop(out);
    let mut status = None;
    for _ in 0..100 {
        if let Some(st) = child.try_wait().expect("wait") {
            status = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("rmachinectl kept running after its reader went away");
    };
    assert_eq!(status.code(), Some(141));
    // The command lost its terminal and went with it.
    let mut gone = false;
    for _ in 0..50 {
        let ps = h.rmachinectl(&["shell", "pipe", "--", "/bin/ps"]);
        if !stdout(&ps).contains("yes marker") {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gone, "yes still runs in the machine");
    assert_ok(&h.rmachinectl(&["stop", "pipe"]), "stop");
}

/// A shell's command lives in the machine's cgroup (the root of its cgroup
/// namespace), like everything else of the machine.
#[tokio::test(flavor = "multi_thread")]
async fn shell_commands_run_in_the_machines_cgroup() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "cg", &root, NO_NET));
    assert_ok(&h.rmachinectl(&["start", "cg"]), "start");
    let out = h.rmachinectl(&["shell", "cg", "--", "/bin/cat", "/proc/self/cgroup"]);
    assert_ok(&out, "shell");
    let unified = stdout(&out)
        .lines()
        .find(|l| l.starts_with("0::"))
        .map(|l| l.trim_end().to_owned());
    assert_eq!(unified.as_deref(), Some("0::/"), "{}", stdout(&out));
    assert_ok(&h.rmachinectl(&["stop", "cg"]), "stop");
}

/// Two rmachined instances on one host (two harnesses: own bridge, own nft
/// tables): each one's machine reaches its own gateway. The bridge table's
/// catch-all for unknown machine ports once matched `ve-*` ports on every
/// bridge, so one instance (or a table a killed one left) cut every other
/// instance's machines off.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_do_not_cut_each_others_machines_off() {
    let root = support::fixture("busybox");
    let a = Harness::start_with(|c| write_definition(c, "inst-a", &root, ""));
    let b = Harness::start_with(|c| write_definition(c, "inst-b", &root, ""));
    assert_ok(&a.rmachinectl(&["start", "inst-a"]), "start inst-a");
    assert_ok(&b.rmachinectl(&["start", "inst-b"]), "start inst-b");
    let ping_gateway = "gw=$(ip route | awk '/^default/ {print $3}'); ping -c 1 -W 3 \"$gw\"";
    for (h, name) in [(&a, "inst-a"), (&b, "inst-b")] {
        let out = h.rmachinectl(&["shell", name, "--", "/bin/sh", "-c", ping_gateway]);
        assert_ok(&out, &format!("{name} pings its gateway"));
    }
    assert_ok(&a.rmachinectl(&["stop", "inst-a"]), "stop inst-a");
    assert_ok(&b.rmachinectl(&["stop", "inst-b"]), "stop inst-b");
}
