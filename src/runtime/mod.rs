//! The container runtime: namespaces, mounts, id maps, cgroups, and the
//! per-machine supervisor process. It applies plain data ([`MachinePlan`]) and
//! knows nothing of TOML or D-Bus.

pub mod cgroup;
pub mod cgroup_v1;
pub mod container;
pub mod devices;
pub mod enter;
pub mod guestfile;
pub mod idrange;
pub mod protocol;
pub mod resources;
pub mod security;
pub mod supervisor;
pub mod sys;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::definition::Definition;
use crate::network::NetworkPlan;
use idrange::IdRange;

/// Everything a supervisor needs to boot one machine, written by the manager
/// as `plan.json` in the machine's state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachinePlan {
    pub definition: Definition,
    pub ids: IdRange,
    /// `<state-dir>/machines/<name>`: control socket, state, console log.
    pub machine_dir: PathBuf,
    /// The machine's cgroup directory in the cgroup2 hierarchy.
    pub cgroup: PathBuf,
    /// Private networking; None for `mode = "none"` (only `lo`).
    #[serde(default)]
    pub network: Option<NetworkPlan>,
    /// For a machine made from an image: `<storage-dir>/machines/<name>`,
    /// its writable layer (`upper/`, `work/`), used unless it is ephemeral.
    #[serde(default)]
    pub layer: Option<PathBuf>,
}

impl MachinePlan {
    pub fn name(&self) -> &str {
        &self.definition.name
    }
}

/// File names inside a machine's state directory.
pub mod paths {
    pub const PLAN: &str = "plan.json";
    pub const STATE: &str = "state.json";
    pub const CONTROL: &str = "control";
    pub const CONSOLE_LOG: &str = "console.log";
    /// The previous console log, after one rotation.
    pub const CONSOLE_LOG_ROTATED: &str = "console.log.1";
    pub const SUPERVISOR_LOG: &str = "supervisor.log";
    /// Bind-mounted read-only at `/run/host` in the guest.
    pub const HOST_DIR: &str = "host";
    pub const NOTIFY: &str = "notify";
    /// The (empty) directory the new root is assembled on.
    pub const ROOT_MOUNT: &str = "root";
    /// Generated resolver configuration in the host dir, bind-mounted on a
    /// guest's missing or empty /etc/resolv.conf.
    pub const RESOLV_CONF: &str = "resolv.conf";
}

/// `<state_dir>/machines/<name>`.
pub fn machine_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("machines").join(name)
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {message}")]
    Setup { step: String, message: String },
    #[error("the file system of {path} ({fs_type}) cannot be idmapped: {source}; put the machine's root on a file system that supports idmapped mounts (ext4, xfs, btrfs, tmpfs, overlayfs)")]
    NoIdmap {
        path: PathBuf,
        fs_type: String,
        #[source]
        source: std::io::Error,
    },
    #[error("idmapping {path} ({fs_type}) was refused: {source}; only the user namespace that owns the file system (the host's, for a disk file system) may idmap it, so rmachined cannot boot machines from it while running inside a container itself")]
    IdmapRefused {
        path: PathBuf,
        fs_type: String,
        #[source]
        source: std::io::Error,
    },
    #[error("machine root {root} has no executable {command} (the machine's command[0]); install an init there or set `command` in the definition")]
    NoInit { root: PathBuf, command: String },
    #[error("cannot apply resources.{key}: {reason}")]
    Limit { key: String, reason: String },
    #[error("machine root {root} is reachable by unprivileged host users ({open} and every directory above it can be searched by others), so a setuid file the guest makes would be theirs to run; run `chmod 0700 {suggest}` (a directory that holds the root), or set `allow_exposed_root = true` in the definition if every host user may be trusted with that")]
    ExposedRoot {
        root: PathBuf,
        open: PathBuf,
        suggest: PathBuf,
    },
    #[error("the container's init failed before exec: {0}")]
    Child(String),
    #[error(transparent)]
    GuestFile(#[from] guestfile::GuestFileError),
    #[error(transparent)]
    IdRange(#[from] idrange::IdRangeError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
}

impl RuntimeError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
        let what = what.into();
        move |source| RuntimeError::Io { what, source }
    }
}

/// Entry point for the internal roles the `rmachined` binary is re-executed
/// in (`__supervise`, `__enter`). Called before any thread is started.
pub fn internal_main(args: Vec<String>) -> i32 {
    match args.get(1).map(String::as_str) {
        Some("__supervise") => supervisor::main(&args[2..]),
        Some("__enter") => enter::main(&args[2..]),
        other => {
            eprintln!("rmachined: unknown internal role {other:?}");
            2
        }
    }
}
