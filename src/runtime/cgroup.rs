//! Per-machine cgroups in the host's cgroup2 hierarchy, delegated to the
//! machine's root user.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::RuntimeError;

/// Where machine cgroups live below the cgroup2 mount.
pub const CGROUP_PARENT: &str = "rmachines";

/// Files a delegate may write, after cgroups(7) "Cgroups v2 delegation".
const DELEGATED_FILES: &[&str] = &["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"];

/// The cgroup2 mount point: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount() -> Result<PathBuf, RuntimeError> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|source| RuntimeError::Io {
        what: "reading /proc/self/mountinfo".into(),
        source,
    })?;
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .collect();
    found.sort_by_key(|p| p.as_os_str().len());
    found.into_iter().next().ok_or_else(|| RuntimeError::Setup {
        step: "finding the cgroup2 hierarchy".into(),
        message: "no cgroup2 file system is mounted; mount one (e.g. at /sys/fs/cgroup/unified)"
            .into(),
    })
}

/// The cgroup directory of machine `name`.
pub fn machine_cgroup_path(name: &str) -> Result<PathBuf, RuntimeError> {
    Ok(cgroup2_mount()?.join(CGROUP_PARENT).join(name))
}

/// Creates the machine's cgroup, owned by the machine's root (host uid and
/// gid `owner`), so that the guest manages its own subtree. A cgroup left
/// from an earlier run is emptied and reused.
pub fn create_machine_cgroup(path: &Path, owner: u32) -> Result<(), RuntimeError> {
    if path.exists() {
        remove_machine_cgroup(path, Duration::from_secs(5))?;
    }
    // Serialised with the removal of the shared parent (see below).
    let _lock = parent_lock()?;
    fs::create_dir_all(path).map_err(|source| RuntimeError::Io {
        what: format!("creating cgroup {}", path.display()),
        source,
    })?;
    let chown = |p: &Path| {
        std::os::unix::fs::chown(p, Some(owner), Some(owner)).map_err(|source| RuntimeError::Io {
            what: format!("delegating {} to host uid {owner}", p.display()),
            source,
        })
    };
    chown(path)?;
    for file in DELEGATED_FILES {
        let p = path.join(file);
        if p.exists() {
            chown(&p)?;
        }
    }
    Ok(())
}

/// Host-wide lock for creating and removing the shared parent cgroup.
const PARENT_LOCK: &str = "/run/lock/rmachines-cgroup.lock";

pub(crate) fn parent_lock() -> Result<nix::fcntl::Flock<fs::File>, RuntimeError> {
    let lock_path = Path::new(PARENT_LOCK);
    if let Some(dir) = lock_path.parent() {
        let _ = fs::create_dir_all(dir);
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)
        .map_err(RuntimeError::io(format!("opening {PARENT_LOCK}")))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| RuntimeError::io(format!("locking {PARENT_LOCK}"))(errno.into()))
}

/// Kills everything in the cgroup tree and removes it, innermost first.
/// Waits up to `timeout` for the kernel to empty it.
pub fn remove_machine_cgroup(path: &Path, timeout: Duration) -> Result<(), RuntimeError> {
    if !path.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    // cgroup.kill (Linux 5.14) kills the whole subtree at once.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    loop {
        match remove_tree(path) {
            Ok(()) => {
                // The shared parent goes with the last machine (EBUSY
                // otherwise), under a lock so that it never disappears
                // between another machine's two mkdirs.
                if let Some(parent) = path.parent().filter(|p| p.ends_with(CGROUP_PARENT)) {
                    if let Ok(_lock) = parent_lock() {
                        let _ = fs::remove_dir(parent);
                    }
                }
                return Ok(());
            }
            Err(err) if Instant::now() < deadline => {
                tracing::trace!(cgroup = %path.display(), %err, "cgroup not empty yet");
                let _ = fs::write(path.join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(RuntimeError::Io {
                    what: format!(
                        "removing cgroup {} (processes still in it: see its cgroup.procs)",
                        path.display()
                    ),
                    source,
                })
            }
        }
    }
}

fn remove_tree(path: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
