//! The .deb and .rpm for real (as root): built by scripts/package.sh, the
//! .deb installed on this host with apt-get, used, and purged; the .rpm
//! inspected and installed into a scratch root. Units checked with
//! systemd-analyze.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use common::{write_definition, Harness, Install};

/// Every file the SPEC puts on a host, plus docs the package ships.
const DEB_FILES: &[&str] = &[
    "/usr/bin/rmachined",
    "/usr/bin/rmachinectl",
    "/lib/systemd/system/rmachined.service",
    "/lib/systemd/system/rmachine@.service",
    "/usr/share/dbus-1/system.d/org.rmachines1.conf",
    "/usr/share/dbus-1/system-services/org.rmachines1.service",
    "/usr/share/polkit-1/actions/org.rmachines1.policy",
    "/etc/rmachines/README",
    "/usr/share/man/man1/rmachinectl.1.gz",
    "/usr/share/man/man8/rmachined.8.gz",
    "/usr/share/man/man5/rmachines.toml.5.gz",
    "/usr/share/bash-completion/completions/rmachinectl",
    "/usr/share/zsh/vendor-completions/_rmachinectl",
    "/usr/share/fish/vendor_completions.d/rmachinectl.fish",
];

fn root_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds both packages once per test run; returns (deb, rpm).
fn packages() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        support::require_root();
        run(Command::new(root_dir().join("scripts/package.sh")).current_dir(root_dir()));
        let find = |dir: &str, ext: &str| {
            std::fs::read_dir(root_dir().join(dir))
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == ext))
                .unwrap_or_else(|| panic!("no .{ext} in {dir}"))
        };
        (
            find("target/debian", "deb"),
            find("target/generate-rpm", "rpm"),
        )
    })
}

/// Tests that install into the host's /usr run one at a time.
fn host_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Purges the package even when the test fails half-way.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("apt-get")
            .args(["purge", "-y", "-qq", "rmachines"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
    }
}

#[test]
fn deb_installs_where_the_spec_says_boots_a_machine_and_purges_cleanly() {
    let (deb, _) = packages();
    let _lock = host_lock();
    let _ = Command::new("apt-get")
        .args(["purge", "-y", "-qq", "rmachines"])
        .output();
    let installed = Installed;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .arg(deb)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    for file in DEB_FILES {
        assert!(Path::new(file).exists(), "{file} not installed");
    }
    // The package enables the service the Debian way even without systemd running.
    assert!(Path::new("/etc/systemd/system/multi-user.target.wants/rmachined.service").exists());
    let control = run(Command::new("dpkg-query").args(["-W", "-f=${Depends}", "rmachines"]));
    assert!(
        control.contains("dbus") && control.contains("nftables"),
        "{control}"
    );

    // The installed units verify.
    let template = tempfile::tempdir().unwrap();
    let instance = template.path().join("rmachine@demo.service");
    std::fs::copy("/lib/systemd/system/rmachine@.service", &instance).unwrap();
    run(Command::new("systemd-analyze")
        .arg("verify")
        .arg("/lib/systemd/system/rmachined.service")
        .arg(&instance));

    // The installed daemon, on a bus with the installed policy, boots a machine
    // driven by the installed rmachinectl.
    {
        let root = support::fixture("busybox");
        let h = Harness::start_installed(Install::system(), |c| {
            write_definition(c, "pkg-demo", &root, "[network]\nmode = \"none\"\n")
        });
        let out = h.rmachinectl(&["start", "pkg-demo"]);
        assert!(out.status.success(), "{out:?}\n{}", h.daemon_log());
        let out = h.rmachinectl(&[
            "shell",
            "pkg-demo",
            "--",
            "/bin/sh",
            "-c",
            "echo from-package; exit 4",
        ]);
        assert_eq!(out.status.code(), Some(4));
        assert!(String::from_utf8_lossy(&out.stdout).contains("from-package"));
        assert!(h.rmachinectl(&["stop", "pkg-demo"]).status.success());
    }

    drop(installed);
    let status = Command::new("dpkg-query")
        .args(["-W", "rmachines"])
        .output()
        .unwrap();
    assert!(!status.status.success(), "still installed after purge");
    for file in DEB_FILES.iter().chain(&[
        "/etc/rmachines",
        "/var/lib/rmachines",
        "/etc/systemd/system/multi-user.target.wants/rmachined.service",
    ]) {
        assert!(!Path::new(file).exists(), "{file} left after purge");
    }
}

#[test]
fn rpm_carries_the_files_requires_and_scripts_and_installs_into_a_scratch_root() {
    let (_, rpm) = packages();
    let files = run(Command::new("rpm").arg("-qlp").arg(rpm));
    for file in [
        "/usr/bin/rmachined",
        "/usr/bin/rmachinectl",
        "/usr/lib/systemd/system/rmachined.service",
        "/usr/share/dbus-1/system.d/org.rmachines1.conf",
        "/usr/share/dbus-1/system-services/org.rmachines1.service",
        "/usr/share/polkit-1/actions/org.rmachines1.policy",
        "/usr/share/man/man1/rmachinectl.1",
        "/etc/rmachines/README",
    ] {
        assert!(
            files.lines().any(|l| l == file),
            "{file} not in the rpm:\n{files}"
        );
    }
    let requires = run(Command::new("rpm").args(["-qp", "--requires"]).arg(rpm));
    assert!(
        requires.lines().any(|l| l.starts_with("dbus")),
        "{requires}"
    );
    assert!(
        requires.lines().any(|l| l.starts_with("nftables")),
        "{requires}"
    );
    let scripts = run(Command::new("rpm").args(["-qp", "--scripts"]).arg(rpm));
    assert!(
        scripts.contains("daemon-reload") && scripts.contains("/run/systemd/system"),
        "{scripts}"
    );

    // A scratch root with only a busybox shell, no systemd, no bus: the
    // scriptlets must not fail there.
    let scratch = tempfile::tempdir().unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(support::fixture("busybox"))
        .arg(scratch.path().join("root")));
    let root = scratch.path().join("root");
    run(Command::new("rpm").arg("--root").arg(&root).arg("--initdb"));
    run(Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["-i", "--nodeps"])
        .arg(rpm));
    assert!(root.join("usr/bin/rmachined").exists());
    assert!(root.join("var/lib/rmachines").is_dir(), "%post did not run");
    let listed = run(Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["-q", "rmachines"]));
    assert!(listed.starts_with("rmachines-0.1.0"), "{listed}");
    run(Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["-e", "--nodeps", "rmachines"]));
    assert!(!root.join("usr/bin/rmachined").exists());
}
