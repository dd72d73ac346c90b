//! Per-machine cgroups in the cgroup v1 hierarchies of a hybrid host (the
//! controllers `[resources]` needs are bound there, not to cgroup2).
//!
//! The machine's cgroup in each hierarchy is `<mount>/<parent>/<name>`,
//! owned by the host's root: the guest never sees v1 (only its delegated
//! cgroup2 tree is mounted in it) and cannot write these files. `<parent>`
//! is `rmachines` for the default state directory and `rmachines-<hash of
//! the state directory>` otherwise, so that two daemons (test checkouts)
//! never share a machine's v1 cgroup: unlike cgroup2, v1 hierarchies cannot
//! be remounted per cgroup namespace.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::resources::Layout;
use super::{cgroup, RuntimeError};

/// The state directory whose machines live below plain `rmachines`.
const DEFAULT_STATE_DIR: &str = "/run/rmachines";

/// The parent cgroup of the machines of the daemon whose machine
/// directories are `<state-dir>/machines/<name>`.
pub fn parent_name(machine_dir: &Path) -> String {
    let state_dir = machine_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new(""));
    if state_dir == Path::new(DEFAULT_STATE_DIR) {
        return cgroup::CGROUP_PARENT.to_owned();
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for byte in state_dir.as_os_str().as_encoded_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{}-{hash:08x}", cgroup::CGROUP_PARENT)
}

/// The machine's cgroup in every v1 hierarchy it needs one in.
pub(crate) fn machine_dirs(layout: &Layout, machine_dir: &Path, name: &str) -> Vec<PathBuf> {
    let parent = parent_name(machine_dir);
    layout
        .v1_mounts()
        .into_iter()
        .map(|mount| mount.join(&parent).join(name))
        .collect()
}

/// Creates the machine's v1 cgroups; one left by an earlier run is emptied
/// and reused.
pub(crate) fn create(dirs: &[PathBuf]) -> Result<(), RuntimeError> {
    remove(dirs, Duration::from_secs(5))?;
    // Serialised with the removal of the shared parents.
    let _lock = cgroup::parent_lock()?;
    for dir in dirs {
        fs::create_dir_all(dir).map_err(RuntimeError::io(format!(
            "creating cgroup {}",
            dir.display()
        )))?;
    }
    Ok(())
}

/// Moves process `pid` (all its threads) into the machine's v1 cgroups.
pub(crate) fn attach(dirs: &[PathBuf], pid: libc::pid_t) -> Result<(), RuntimeError> {
    for dir in dirs {
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(RuntimeError::io(format!(
            "moving the machine's init (pid {pid}) into {}",
            procs.display()
        )))?;
    }
    Ok(())
}

/// Kills what is left in the machine's v1 cgroups and removes them (and
/// their shared parent once empty). Waits up to `timeout`.
pub(crate) fn remove(dirs: &[PathBuf], timeout: Duration) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + timeout;
    for dir in dirs {
        loop {
            match remove_one(dir) {
                Ok(()) => break,
                Err(err) if Instant::now() < deadline => {
                    tracing::trace!(cgroup = %dir.display(), %err, "v1 cgroup not empty yet");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(RuntimeError::Io {
                        what: format!(
                            "removing cgroup {} (processes still in it: see its cgroup.procs)",
                            dir.display()
                        ),
                        source,
                    })
                }
            }
        }
        if let Some(parent) = dir.parent() {
            if let Ok(_lock) = cgroup::parent_lock() {
                // EBUSY while another machine of this daemon lives there.
                let _ = fs::remove_dir(parent);
            }
        }
    }
    Ok(())
}

fn remove_one(dir: &Path) -> io::Result<()> {
    let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // Host pids, read as the host's root: what is left of the machine
        // (a shell whose cgroup2 membership is elsewhere).
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    match fs::remove_dir(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Moves the calling process into the v1 cgroups (of the hierarchies
/// `layout` uses) that process `pid` is in.
pub(crate) fn join_process_cgroups(layout: &Layout, pid: i32) -> Result<(), RuntimeError> {
    let membership = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(RuntimeError::io(format!("reading /proc/{pid}/cgroup")))?;
    let wanted = layout.v1_mounts();
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            continue;
        }
        let names: Vec<&str> = controllers.split(',').collect();
        let Some(hierarchy) = layout
            .v1
            .iter()
            .find(|m| m.controllers.iter().any(|c| names.contains(&c.as_str())))
        else {
            continue;
        };
        if !wanted.contains(&hierarchy.mount) {
            continue;
        }
        // A machine started without v1 cgroups (by an older rmachined)
        // has its init where the daemon was: nothing to join there.
        let Some(dir) = hierarchy.dir_of(path).filter(|_| path != "/") else {
            tracing::debug!(
                controllers,
                path,
                "the machine has no cgroup of its own here"
            );
            continue;
        };
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string())
            .map_err(RuntimeError::io(format!("joining {}", procs.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_is_unique_per_state_directory() {
        assert_eq!(
            parent_name(Path::new("/run/rmachines/machines/web")),
            "rmachines"
        );
        let a = parent_name(Path::new("/tmp/a/machines/web"));
        let b = parent_name(Path::new("/tmp/b/machines/web"));
        assert!(a.starts_with("rmachines-") && a.len() == "rmachines-".len() + 8);
        assert_ne!(a, b);
        assert_eq!(a, parent_name(Path::new("/tmp/a/machines/db")));
    }
}
