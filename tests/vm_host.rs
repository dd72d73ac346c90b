//! The VM test bed (scripts/vm/run.sh): a Debian 12 VM under qemu, a real
//! systemd host with unified cgroup2, the freshly built .deb installed, two
//! boots, checks inside (autostart, a systemd guest, no mounts leaking into
//! the host, unit ordering, polkit, graceful stop at shutdown). This test
//! builds the .deb when the sources are newer than it, drives run.sh and
//! asserts that every enabled check reported and passed. It never skips: no
//! qemu, no image, no .deb is a failure with the reason.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

fn root_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The newest modification time of anything under `path` (files and dirs).
fn newest(path: &Path) -> SystemTime {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return SystemTime::UNIX_EPOCH;
    };
    let mut time = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            time = time.max(newest(&entry.path()));
        }
    }
    time
}

fn newest_deb() -> Option<PathBuf> {
    std::fs::read_dir(root_dir().join("target/debian"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .max_by_key(|p| newest(p))
}

/// The .deb of the sources in this checkout: scripts/package.sh runs when
/// there is none or anything it is made from changed since.
fn fresh_deb() -> PathBuf {
    let inputs = [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "units",
        "dbus",
        "polkit",
        "config",
        "packaging",
        "man",
        "examples",
    ];
    let sources = inputs
        .iter()
        .map(|p| newest(&root_dir().join(p)))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if let Some(deb) = newest_deb() {
        if newest(&deb) >= sources {
            return deb;
        }
    }
    let out = Command::new(root_dir().join("scripts/package.sh"))
        .current_dir(root_dir())
        .output()
        .unwrap_or_else(|e| panic!("running scripts/package.sh: {e}"));
    assert!(
        out.status.success(),
        "scripts/package.sh failed (the VM stage needs the .deb):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    newest_deb().expect("scripts/package.sh succeeded but target/debian holds no .deb")
}

/// The checks run.sh is expected to report: (boot, name) for every check in
/// scripts/vm/checks (and the enabled pending ones) and its `# boots:` line,
/// plus run.sh's own vm-powers-off per boot.
fn expected_checks() -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root_dir().join("scripts/vm/checks"))
        .expect("reading scripts/vm/checks")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    match std::env::var("RMACHINES_VM_PENDING").as_deref() {
        Ok("all") => files.extend(
            std::fs::read_dir(root_dir().join("scripts/vm/checks/pending"))
                .expect("reading scripts/vm/checks/pending")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sh")),
        ),
        Ok(list) if !list.is_empty() => files.extend(list.split(',').map(|name| {
            root_dir()
                .join("scripts/vm/checks/pending")
                .join(format!("{}.sh", name.trim_end_matches(".sh")))
        })),
        _ => {}
    }
    let mut expected = vec![
        ("1".to_owned(), "vm-powers-off".to_owned()),
        ("2".to_owned(), "vm-powers-off".to_owned()),
    ];
    for file in files {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        let boots = text
            .lines()
            .find_map(|l| l.strip_prefix("# boots:"))
            .unwrap_or_else(|| panic!("{} has no `# boots:` line", file.display()));
        for boot in boots.split_whitespace() {
            expected.push((boot.to_owned(), name.clone()));
        }
    }
    expected
}

#[test]
fn vm_host_boots_with_the_package_and_every_check_passes() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the VM stage builds an image with mmdebstrap and must run as root (CI runs it as root)"
    );
    let deb = fresh_deb();
    let expected = expected_checks();
    let began = Instant::now();
    let out = Command::new(root_dir().join("scripts/vm/run.sh"))
        .arg(&deb)
        .current_dir(root_dir())
        .output()
        .unwrap_or_else(|e| panic!("running scripts/vm/run.sh: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("{stdout}\n--- stderr of run.sh\n{stderr}");
    eprintln!(
        "VM stage took {:.0}s\n{}",
        began.elapsed().as_secs_f64(),
        stdout
            .lines()
            .filter(|l| l.starts_with("RMVM-RESULT") || l.starts_with("run.sh:"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let results: Vec<(&str, String, &str)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RMVM-RESULT "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let status = words.next()?;
            let boot = words.next()?.strip_prefix("boot=")?.to_owned();
            Some((status, boot, words.next()?))
        })
        .collect();
    let failed: Vec<String> = results
        .iter()
        .filter(|(status, _, _)| *status != "PASS")
        .map(|(_, boot, name)| format!("{name} (boot {boot})"))
        .collect();
    assert!(
        failed.is_empty() && out.status.success(),
        "VM checks failed: {failed:?} (run.sh {})\n{report}",
        out.status
    );
    for (boot, name) in &expected {
        assert!(
            results.iter().any(|(_, b, n)| b == boot && n == name),
            "check {name} did not report for boot {boot}\n{report}"
        );
    }
}
