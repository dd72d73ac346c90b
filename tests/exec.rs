//! Commands in machines carry data exactly: `Execute` and `rmachinectl shell`
//! without a pty, `cp`, `logs`, and the robustness of the paths around them
//! (as root, with real machines on a private bus).

mod common;
mod support;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{error_name, write_definition, Harness};
use rmachines::dbus::proxy::ManagerProxy;

const NO_NET: &str = "[network]\nmode = \"none\"\n";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn rmachinectl(h: &Harness) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rmachinectl"));
    command.env("DBUS_SYSTEM_BUS_ADDRESS", h.address());
    command
}

/// `rmachinectl ARGS` with `input` on a pipe as stdin.
fn piped(h: &Harness, args: &[&str], input: &[u8]) -> Output {
    let mut child = rmachinectl(h)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rmachinectl");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for rmachinectl");
    writer.join().expect("writer thread");
    out
}

/// Pseudo-random bytes (xorshift), every value 0..=255 included.
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

fn start(h: &Harness, name: &str) {
    assert_ok(&h.rmachinectl(&["start", name]), &format!("start {name}"));
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Any bytes in, exactly those bytes out; stderr apart; exit statuses; no tty.
#[tokio::test(flavor = "multi_thread")]
async fn shell_without_a_tty_carries_bytes_exactly() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "bytes", &root, NO_NET));
    start(&h, "bytes");

    let binary = random_bytes(100_000, 0x9e37_79b9_7f4a_7c15);
    assert!(binary.contains(&4) && binary.contains(&0) && binary.contains(&3));
    let one_line = vec![b'x'; 100_000];
    for (what, input) in [
        ("random binary", binary),
        ("one 100 kB line", one_line),
        ("empty input", Vec::new()),
    ] {
        let out = piped(&h, &["shell", "bytes", "--", "/bin/cat"], &input);
        assert_ok(&out, what);
        assert_eq!(out.stdout.len(), input.len(), "{what}: length");
        assert!(out.stdout == input, "{what}: the bytes differ");
        assert!(out.stderr.is_empty(), "{what}: {}", text(&out.stderr));
    }

    // 8 MiB through both directions, with -T explicit.
    let big = random_bytes(8 << 20, 7);
    let out = piped(&h, &["shell", "-T", "bytes", "--", "/bin/cat"], &big);
    assert_ok(&out, "8 MiB");
    assert!(out.stdout == big, "8 MiB differ");

    let out = piped(
        &h,
        &[
            "shell",
            "bytes",
            "--",
            "/bin/sh",
            "-c",
            "echo out; echo err >&2",
        ],
        b"",
    );
    assert_ok(&out, "stderr");
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    let script = "if [ -t 0 ] || [ -t 1 ] || [ -t 2 ]; then exit 1; fi";
    let out = piped(&h, &["shell", "bytes", "--", "/bin/sh", "-c", script], b"");
    assert_ok(&out, "the command sees no terminal");

    for (script, code) in [("exit 7", 7), ("kill -TERM $$", 128 + 15), ("exit 0", 0)] {
        let out = piped(&h, &["shell", "bytes", "--", "/bin/sh", "-c", script], b"");
        assert_eq!(out.status.code(), Some(code), "{script}: {out:?}");
    }
    // The command starts with default signal dispositions and nothing
    // blocked, like one run from a shell (the daemon ignores SIGPIPE).
    let out = piped(
        &h,
        &[
            "shell",
            "bytes",
            "--",
            "/bin/grep",
            "-E",
            "^Sig(Ign|Blk)",
            "/proc/self/status",
        ],
        b"",
    );
    assert_ok(&out, "signal state");
    assert_eq!(
        text(&out.stdout),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
        "the command inherited blocked or ignored signals"
    );
    let out = piped(&h, &["shell", "bytes", "--", "/no/such/command"], b"");
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(text(&out.stderr).contains("/no/such/command"), "{out:?}");

    // The environment (and with it a secret) reaches the command...
    let out = piped(
        &h,
        &[
            "shell",
            "bytes",
            "--setenv",
            "SECRET=s3cr3t-value",
            "--",
            "/bin/sh",
            "-c",
            "echo $SECRET",
        ],
        b"",
    );
    assert_eq!(text(&out.stdout), "s3cr3t-value\n");

    // The man page's busctl example: busctl's own fds 0, 1 and 2.
    let out = h.busctl_call(&[
        "/org/rmachines1",
        "org.rmachines1.Manager",
        "Execute",
        "ssasashhh",
        "bytes",
        "",
        "2",
        "/bin/echo",
        "hello",
        "0",
        "0",
        "1",
        "2",
    ]);
    // busctl passes descriptors (`h`) from systemd 257 on; the README says
    // so, and an older busctl must fail the way it says.
    let version = Command::new("busctl")
        .arg("--version")
        .output()
        .map(|o| text(&o.stdout))
        .unwrap_or_default();
    let major: u32 = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("busctl --version: {version:?}"));
    if major >= 257 {
        assert_ok(&out, "busctl Execute");
        assert!(
            text(&out.stdout).contains("hello\n"),
            "{}",
            text(&out.stdout)
        );
    } else {
        assert!(!out.status.success(), "busctl {major} passed descriptors");
        assert!(
            text(&out.stderr).contains("UNIX file descriptor not supported"),
            "{}",
            text(&out.stderr)
        );
    }
    assert_ok(&h.rmachinectl(&["stop", "bytes"]), "stop");
}

/// Nothing of a request appears on any process's argv (readable by every
/// user in `ps`): the enter helper gets its spec on a descriptor.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_never_appears_on_an_argv() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "argv", &root, NO_NET));
    start(&h, "argv");
    let mut child = rmachinectl(&h)
        .args([
            "shell",
            "argv",
            "--setenv",
            "TOKEN=hunter2-secret",
            "--",
            "/bin/sleep",
            "30",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("run rmachinectl");
    let own = child.id().to_string();
    let mut helpers = 0;
    wait_until("the command runs", Duration::from_secs(20), || {
        helpers = 0;
        let mut sleeping = false;
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            // rmachinectl's own argv holds what its user typed.
            if entry.file_name().to_string_lossy() == own {
                continue;
            }
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            assert!(
                !text(&cmdline).contains("hunter2-secret"),
                "the environment is on the argv of {}: {:?}",
                entry.path().display(),
                text(&cmdline)
            );
            if text(&cmdline).contains("__enter") {
                helpers += 1;
            }
            if text(&cmdline) == "/bin/sleep\x0030\x00" {
                sleeping = true;
            }
        }
        sleeping
    });
    assert!(helpers > 0, "no enter helper seen");
    let _ = child.kill();
    let _ = child.wait();
    assert_ok(&h.rmachinectl(&["stop", "argv"]), "stop");
}

/// Command and environment are bounded: a named error, at once.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_commands_are_refused_at_once() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "big", &root, NO_NET));
    start(&h, "big");
    let conn = h.connection().await;
    let manager = ManagerProxy::new(&conn).await.unwrap();
    let env: Vec<String> = (0..30_000).map(|i| format!("K{i}=v")).collect();
    let env: Vec<&str> = env.iter().map(String::as_str).collect();
    let started = Instant::now();
    let result = manager.shell("big", "", &["/bin/true"], &env).await;
    assert_eq!(error_name(result), "org.rmachines1.TooLarge");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let args: Vec<&str> = std::iter::repeat_n("x", 200_000).collect();
    let null = std::fs::File::open("/dev/null").unwrap();
    let started = Instant::now();
    let result = manager
        .execute(
            "big",
            "",
            &args,
            &[],
            null.as_fd().into(),
            null.as_fd().into(),
            null.as_fd().into(),
        )
        .await;
    assert_eq!(error_name(result), "org.rmachines1.TooLarge");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_ok(&h.rmachinectl(&["stop", "big"]), "stop");
}

/// SIGTERM ends `rmachinectl shell` while its call is still pending, and a
/// command whose caller went away is hung up (`timeout` works).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_a_pending_shell_and_its_command() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "term", &root, NO_NET));
    start(&h, "term");
    let daemon = nix::unistd::Pid::from_raw(h.daemon_pid() as i32);
    for mode in ["-T", "-t"] {
        nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let mut child = rmachinectl(&h)
            .args(["shell", mode, "term", "--", "/bin/true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("run rmachinectl");
        std::thread::sleep(Duration::from_millis(700));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut status = None;
        for _ in 0..50 {
            status = child.try_wait().unwrap();
            if status.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGCONT).unwrap();
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rmachinectl shell {mode} ignored SIGTERM while its call was pending");
        };
        assert_eq!(status.code(), Some(128 + 15), "{mode}");
    }

    // `timeout`: rmachinectl goes, and so does the command.
    let out = Command::new("timeout")
        .args([
            "2",
            env!("CARGO_BIN_EXE_rmachinectl"),
            "shell",
            "term",
            "--",
            "/bin/sleep",
            "4321",
        ])
        .env("DBUS_SYSTEM_BUS_ADDRESS", h.address())
        .stdin(Stdio::null())
        .output()
        .expect("timeout");
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    wait_until("the command is hung up", Duration::from_secs(10), || {
        let ps = h.rmachinectl(&["shell", "term", "--", "/bin/ps"]);
        !text(&ps.stdout).contains("4321")
    });
    assert_ok(&h.rmachinectl(&["stop", "term"]), "stop");
}

/// `cp` into and out of a machine keeps bytes, modes, symlinks and
/// ownership; a guest symlink is resolved inside the guest.
#[tokio::test(flavor = "multi_thread")]
async fn cp_round_trips_a_tree() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "copy", &root, NO_NET));
    start(&h, "copy");
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    let data = random_bytes(300_000, 42);
    std::fs::write(tree.join("data.bin"), &data).unwrap();
    std::fs::write(tree.join("sub/deeper/script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(tree.join("sub/owned"), "mine").unwrap();
    std::fs::write(tree.join("empty"), "").unwrap();
    std::os::unix::fs::symlink("sub/deeper/script.sh", tree.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", tree.join("abs-link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str, m: u32| {
        std::fs::set_permissions(tree.join(p), std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode("data.bin", 0o640);
    mode("sub/deeper/script.sh", 0o750);
    mode("sub", 0o711);
    std::os::unix::fs::chown(tree.join("sub/owned"), Some(1000), Some(1001)).unwrap();

    // In: into an existing directory (/run is the machine's tmpfs).
    let tree_arg = tree.display().to_string();
    assert_ok(&h.rmachinectl(&["cp", &tree_arg, "copy:/run"]), "cp in");
    let seen = h.rmachinectl(&[
        "shell", "copy", "--", "/bin/sh", "-c",
        "cd /run/tree && stat -c '%n %a %u:%g' data.bin sub sub/deeper/script.sh sub/owned && readlink link && readlink abs-link",
    ]);
    assert_ok(&seen, "look inside");
    let seen = text(&seen.stdout);
    for expected in [
        "data.bin 640 0:0",
        "sub 711 0:0",
        "sub/deeper/script.sh 750 0:0",
        "sub/owned 644 1000:1001",
        "sub/deeper/script.sh\n/etc/hostname\n",
    ] {
        assert!(seen.contains(expected), "{expected:?} not in {seen}");
    }
    // In under another name, and out again under another name.
    assert_ok(
        &h.rmachinectl(&["cp", &tree_arg, "copy:/run/renamed"]),
        "cp in (renamed)",
    );
    let back = work.path().join("back");
    assert_ok(
        &h.rmachinectl(&["cp", "copy:/run/renamed", &back.display().to_string()]),
        "cp out",
    );
    let listing = |dir: &std::path::Path| {
        let out = Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && find . -printf '%p %y %m %U:%G %s %l\\n' | sort && find . -type f -exec md5sum {} + | sort")
            .arg("sh")
            .arg(dir)
            .output()
            .unwrap();
        text(&out.stdout)
    };
    assert_eq!(
        listing(&tree),
        listing(&back),
        "the tree came back different"
    );

    // A guest symlink never leads to a host file.
    let _ = h.rmachinectl(&[
        "shell",
        "copy",
        "--",
        "/bin/sh",
        "-c",
        "ln -s /etc /run/etc-link",
    ]);
    let file = work.path().join("passwd-copy");
    assert_ok(
        &h.rmachinectl(&[
            "cp",
            "copy:/run/etc-link/passwd",
            &file.display().to_string(),
        ]),
        "cp through a guest symlink",
    );
    let guest_passwd = text(
        &h.rmachinectl(&["shell", "copy", "--", "/bin/cat", "/etc/passwd"])
            .stdout,
    );
    let copied = text(&std::fs::read(&file).unwrap());
    assert_eq!(copied, guest_passwd);
    assert_ne!(
        copied,
        text(&std::fs::read("/etc/passwd").unwrap()),
        "the host's file came"
    );
    let link_copy = work.path().join("link-copy");
    assert_ok(
        &h.rmachinectl(&["cp", "copy:/run/etc-link", &link_copy.display().to_string()]),
        "cp of a guest symlink",
    );
    assert_eq!(
        std::fs::read_link(&link_copy).unwrap(),
        std::path::Path::new("/etc")
    );
    let missing = h.rmachinectl(&[
        "cp",
        "copy:/run/no-such-file",
        &work.path().join("x").display().to_string(),
    ]);
    assert!(!missing.status.success());
    assert_ok(&h.rmachinectl(&["stop", "copy"]), "stop");
}

/// `logs` prints the console log (rotated part first), `-n` its tail, `-f`
/// follows it.
#[tokio::test(flavor = "multi_thread")]
async fn logs_prints_and_follows_the_console() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| {
        write_definition(
            c,
            "talk",
            &root,
            &format!(
                "boot = false\ncommand = [\"/bin/sh\", \"-c\", \"i=0; while true; do i=$((i+1)); echo line-$i; sleep 0.2; done\"]\nstop_timeout = \"1s\"\n{NO_NET}"
            ),
        )
    });
    start(&h, "talk");
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !last.contains("line-3\n") {
        let out = h.rmachinectl(&["logs", "talk"]);
        // The console is a terminal: its lines end in \r\n.
        last = format!("{}{}", text(&out.stdout), text(&out.stderr)).replace("\r\n", "\n");
        assert!(Instant::now() < deadline, "no console lines: {last:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = h.rmachinectl(&["logs", "talk", "-n", "1"]);
    assert_ok(&out, "logs -n 1");
    let last = text(&out.stdout).replace("\r\n", "\n");
    assert_eq!(last.lines().count(), 1, "{last:?}");
    assert!(last.starts_with("line-"), "{last:?}");

    // The rotated part comes first.
    let dir = h.state_dir().join("machines/talk");
    std::fs::write(dir.join("console.log.1"), "older-line\n").unwrap();
    let all = text(&h.rmachinectl(&["logs", "talk"]).stdout).replace("\r\n", "\n");
    assert!(all.starts_with("older-line\nline-1\n"), "{all:?}");
    std::fs::remove_file(dir.join("console.log.1")).unwrap();

    let mut follow = rmachinectl(&h)
        .args(["logs", "talk", "-f", "-n", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("logs -f");
    let mut stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buffer) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buffer[..n]);
            if tx
                .send(String::from_utf8_lossy(&seen).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut lines = 0;
    while lines < 6 {
        let seen = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("logs -f printed new lines");
        lines = seen.lines().count();
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let denied = h.busctl_call_as_nobody(&[
        "/org/rmachines1",
        "org.rmachines1.Manager",
        "OpenConsoleLog",
        "s",
        "talk",
    ]);
    assert!(!denied.status.success());
    assert!(
        text(&denied.stderr).contains("AccessDenied"),
        "{}",
        text(&denied.stderr)
    );
    assert_ok(&h.rmachinectl(&["stop", "talk"]), "stop");
}

fn state_of(h: &Harness, name: &str) -> String {
    let out = h.rmachinectl(&["status", name, "--json"]);
    assert_ok(&out, "status --json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["state"].as_str().unwrap_or_default().to_owned()
}

fn leader_of(h: &Harness, name: &str) -> u32 {
    let out = h.rmachinectl(&["status", name, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["leader"].as_u64().unwrap_or(0) as u32
}

/// Through netlink (`ip`): /sys/class/net shows the netns /sys was mounted in.
fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn process_exists(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A `boot = false` machine whose command exits at once ran: its start
/// succeeded, every time.
#[tokio::test(flavor = "multi_thread")]
async fn a_machine_that_ran_and_ended_started() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| {
        write_definition(
            c,
            "quick",
            &root,
            &format!("boot = false\ncommand = [\"/bin/true\"]\n{NO_NET}"),
        )
    });
    for round in 0..40 {
        let out = h.rmachinectl(&["start", "quick"]);
        assert_ok(&out, &format!("start, round {round}"));
        wait_until("the machine ended", Duration::from_secs(10), || {
            state_of(&h, "quick") == "stopped"
        });
    }
}

/// A definition file whose stem is no machine name is listed as failed;
/// the others still list.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_definition_name_never_breaks_list() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| {
        write_definition(c, "good", &root, NO_NET);
        write_definition(c, "Bad_Name", &root, NO_NET);
    });
    let out = h.rmachinectl(&["list"]);
    assert_ok(&out, "list");
    assert!(text(&out.stdout).contains("good"), "{}", text(&out.stdout));
    let out = h.rmachinectl(&["list", "--json"]);
    assert_ok(&out, "list --json");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "Bad_Name")
        .expect("the bad file is listed");
    assert_eq!(bad["state"], "failed");
}

/// Many machines on one tree (busybox's /sbin/init is `../bin/busybox`),
/// started together, round after round: openat2's EAGAIN is retried.
#[tokio::test(flavor = "multi_thread")]
async fn many_machines_on_one_tree_start_together_round_after_round() {
    let root = support::fixture("busybox");
    let names: Vec<String> = (0..20).map(|i| format!("same{i}")).collect();
    let h = Harness::start_with(|c| {
        for name in &names {
            write_definition(c, name, &root, NO_NET);
        }
    });
    let mut start = vec!["start"];
    start.extend(names.iter().map(String::as_str));
    let mut stop = vec!["stop"];
    stop.extend(names.iter().map(String::as_str));
    for round in 0..6 {
        let out = h.rmachinectl(&start);
        assert_ok(&out, &format!("start, round {round}"));
        assert_ok(&h.rmachinectl(&stop), &format!("stop, round {round}"));
    }
}

/// The child's own error is reported when it dies before exec: a bind
/// target missing in a read-only root is named as such (not a later step's
/// "no such process" of the network setup).
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_bind_target_on_a_read_only_root_is_named() {
    let root = support::fixture("busybox");
    let source = tempfile::tempdir().unwrap();
    let source_path = source.path().display().to_string();
    let h = Harness::start_with(|c| {
        write_definition(
            c,
            "robind",
            &root,
            &format!("read_only = true\n[[bind]]\nsource = {source_path:?}\ntarget = \"/no-such-target\"\n"),
        )
    });
    let out = h.rmachinectl(&["start", "robind"]);
    assert!(!out.status.success());
    let error = text(&out.stderr);
    assert!(
        error.contains("bind target /no-such-target does not exist in the read-only root"),
        "{error}"
    );
    assert!(!error.contains("veth"), "{error}");
}

/// A supervisor killed with SIGKILL takes its machine along (init, veth,
/// cgroup); `restart = "always"` starts it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_supervisor_leaves_nothing_and_always_restarts() {
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| {
        write_definition(c, "orphan", &root, "");
        write_definition(c, "phoenix", &root, "restart = \"always\"\n");
    });
    for name in ["orphan", "phoenix"] {
        start(&h, name);
    }
    let supervisor_of = |name: &str| -> u32 {
        let dir = h.state_dir().join("machines").join(name);
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
        state["supervisor"].as_u64().unwrap() as u32
    };
    let kill9 = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap()
    };

    let leader = leader_of(&h, "orphan");
    assert!(process_exists(leader));
    let plan: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.state_dir().join("machines/orphan/plan.json")).unwrap(),
    )
    .unwrap();
    let cgroup = std::path::PathBuf::from(plan["cgroup"].as_str().unwrap());
    let veth = rmachines::network::host_veth_name("orphan");
    assert!(cgroup.exists(), "{}", cgroup.display());
    assert!(link_exists(&veth), "{veth}");
    kill9(supervisor_of("orphan"));
    wait_until("init is gone", Duration::from_secs(10), || {
        !process_exists(leader)
    });
    wait_until("the machine is failed", Duration::from_secs(10), || {
        state_of(&h, "orphan") == "failed"
    });
    wait_until("cgroup and veth are gone", Duration::from_secs(10), || {
        !cgroup.exists() && !link_exists(&veth)
    });
    start(&h, "orphan");
    let inits = h.rmachinectl(&["shell", "orphan", "--", "/bin/ps"]);
    assert_eq!(
        text(&inits.stdout)
            .lines()
            .filter(|l| l.trim_end().ends_with(" init"))
            .count(),
        1,
        "{}",
        text(&inits.stdout)
    );

    let leader = leader_of(&h, "phoenix");
    kill9(supervisor_of("phoenix"));
    wait_until("init is gone", Duration::from_secs(10), || {
        !process_exists(leader)
    });
    wait_until("the machine runs again", Duration::from_secs(20), || {
        state_of(&h, "phoenix") == "running" && leader_of(&h, "phoenix") != leader
    });
    for name in ["orphan", "phoenix"] {
        assert_ok(&h.rmachinectl(&["stop", name]), "stop");
    }
}

/// A `Shell` caller whose connection did not negotiate Unix fd passing gets
/// an error reply (not silence), and no session runs for it.
#[tokio::test(flavor = "multi_thread")]
async fn shell_without_fd_passing_gets_an_error_reply() {
    use std::os::unix::net::UnixStream;
    let root = support::fixture("busybox");
    let h = Harness::start_with(|c| write_definition(c, "nofd", &root, NO_NET));
    start(&h, "nofd");
    let path = h
        .address()
        .strip_prefix("unix:path=")
        .and_then(|rest| rest.split(',').next())
        .expect("a unix:path= bus address")
        .to_owned();
    let mut socket = UnixStream::connect(&path).expect("connect to the bus");
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // SASL without NEGOTIATE_UNIX_FD.
    let uid_hex: String = nix::unistd::getuid()
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    socket
        .write_all(format!("\0AUTH EXTERNAL {uid_hex}\r\n").as_bytes())
        .unwrap();
    let mut line = [0u8; 256];
    let n = socket.read(&mut line).unwrap();
    assert!(line[..n].starts_with(b"OK "), "{}", text(&line[..n]));
    socket.write_all(b"BEGIN\r\n").unwrap();
    let hello = zbus::Message::method_call("/org/freedesktop/DBus", "Hello")
        .unwrap()
        .destination("org.freedesktop.DBus")
        .unwrap()
        .interface("org.freedesktop.DBus")
        .unwrap()
        .build(&())
        .unwrap();
    socket.write_all(&hello.data()[..]).unwrap();
    let shell = zbus::Message::method_call("/org/rmachines1", "Shell")
        .unwrap()
        .destination("org.rmachines1")
        .unwrap()
        .interface("org.rmachines1.Manager")
        .unwrap()
        .build(&("nofd", "", vec!["/bin/sleep", "777"], Vec::<String>::new()))
        .unwrap();
    socket.write_all(&shell.data()[..]).unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let wanted = b"org.rmachines1.FdPassingUnsupported";
    while !received.windows(wanted.len()).any(|w| w == wanted) {
        match socket.read(&mut buffer) {
            Ok(0) => panic!("the bus closed the connection: {}", text(&received)),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(err) => panic!("no error reply ({err}): {}", text(&received)),
        }
    }
    let ps = h.rmachinectl(&["shell", "nofd", "--", "/bin/ps"]);
    assert!(!text(&ps.stdout).contains("777"), "{}", text(&ps.stdout));
    assert_ok(&h.rmachinectl(&["stop", "nofd"]), "stop");
}
