//! `[resources]`: limits written to a machine's cgroups, and the accounting
//! read back from them.
//!
//! Each controller is used where the host has it: on cgroup2 (a unified
//! host, or a hybrid one whose cgroup2 holds it) the limits go on the
//! machine's cgroup2 directory, whose limit files stay owned by the host's
//! root (the guest owns only the delegated `cgroup.procs`,
//! `cgroup.subtree_control` and `cgroup.threads`, so it cannot raise them);
//! on a hybrid host whose controllers are bound to cgroup v1 hierarchies the
//! machine gets a cgroup of its own in each of them ([`super::cgroup_v1`]).
//! Parsing stays in [`crate::definition`]; this module applies plain data.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{cgroup, cgroup_v1, MachinePlan, RuntimeError};
use crate::definition::Resources;

/// The cgroup files a limit goes through: the host's, or a test double.
pub(crate) trait CgroupFs {
    fn read(&self, path: &Path) -> io::Result<String>;
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// The owning uid of a file.
    fn owner(&self, path: &Path) -> io::Result<u32>;
}

/// The real cgroup file systems.
pub(crate) struct HostFs;

impl CgroupFs for HostFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        fs::write(path, value)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn owner(&self, path: &Path) -> io::Result<u32> {
        Ok(fs::metadata(path)?.uid())
    }
}

/// The kernel controllers `[resources]` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Controller {
    Memory,
    Cpu,
    /// CPU usage on cgroup v1 (cgroup2 always has `cpu.stat`).
    Cpuacct,
    Pids,
    Io,
}

impl Controller {
    pub(crate) const ALL: [Controller; 5] = [
        Controller::Memory,
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Pids,
        Controller::Io,
    ];

    /// Its name in cgroup2's `cgroup.controllers`, if it has one there.
    pub(crate) fn v2_name(self) -> Option<&'static str> {
        match self {
            Controller::Memory => Some("memory"),
            Controller::Cpu => Some("cpu"),
            Controller::Cpuacct => None,
            Controller::Pids => Some("pids"),
            Controller::Io => Some("io"),
        }
    }

    /// Its name as a cgroup v1 mount option.
    pub(crate) fn v1_name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Pids => "pids",
            Controller::Io => "blkio",
        }
    }

    /// The `[resources]` keys it enforces that `resources` sets.
    fn keys_set(self, resources: &Resources) -> Vec<&'static str> {
        let candidates: &[(&str, bool)] = match self {
            Controller::Memory => &[
                ("memory", resources.memory.is_some()),
                ("memory_high", resources.memory_high.is_some()),
            ],
            Controller::Cpu => &[
                ("cpus", resources.cpus.is_some()),
                ("cpu_weight", resources.cpu_weight.is_some()),
            ],
            Controller::Cpuacct => &[],
            Controller::Pids => &[("tasks", resources.tasks.is_some())],
            Controller::Io => &[("io_weight", resources.io_weight.is_some())],
        };
        candidates
            .iter()
            .filter(|(_, set)| *set)
            .map(|(key, _)| *key)
            .collect()
    }
}

/// Where the host keeps each controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Home {
    V2,
    /// The mount point of the v1 hierarchy that holds it.
    V1(PathBuf),
    Nowhere,
}

/// The host's cgroup file systems, from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Controllers the cgroup2 root offers (`cgroup.controllers`).
    pub v2_controllers: Vec<String>,
    /// Mounted v1 hierarchies.
    pub v1: Vec<V1Mount>,
}

/// A mounted cgroup v1 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V1Mount {
    pub mount: PathBuf,
    /// The cgroup shown at the mount point, relative to our cgroup
    /// namespace's root (e.g. `/../..` when we live two levels down).
    pub root: String,
    pub controllers: Vec<String>,
}

impl Layout {
    pub(crate) fn detect() -> Result<Layout, RuntimeError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(RuntimeError::io("reading /proc/self/mountinfo"))?;
        let v2_controllers = match cgroup::cgroup2_mount() {
            Ok(mount) => fs::read_to_string(mount.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            Err(_) => Vec::new(),
        };
        Ok(Layout {
            v2_controllers,
            v1: parse_v1_mounts(&mountinfo),
        })
    }

    pub(crate) fn home(&self, controller: Controller) -> Home {
        if let Some(name) = controller.v2_name() {
            if self.v2_controllers.iter().any(|c| c == name) {
                return Home::V2;
            }
        }
        self.v1
            .iter()
            .find(|m| m.controllers.iter().any(|c| c == controller.v1_name()))
            .map_or(Home::Nowhere, |m| Home::V1(m.mount.clone()))
    }

    /// The v1 hierarchies the machine gets a cgroup in: those holding a
    /// controller that is not on cgroup2, each once.
    pub(crate) fn v1_mounts(&self) -> Vec<PathBuf> {
        let mut mounts: Vec<PathBuf> = Vec::new();
        for controller in Controller::ALL {
            if controller == Controller::Cpuacct && self.home(Controller::Cpu) == Home::V2 {
                continue;
            }
            if let Home::V1(mount) = self.home(controller) {
                if !mounts.contains(&mount) {
                    mounts.push(mount);
                }
            }
        }
        mounts
    }
}

/// cgroup v1 mounts, each hierarchy once, with their controllers.
fn parse_v1_mounts(mountinfo: &str) -> Vec<V1Mount> {
    let mut found: Vec<V1Mount> = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut right = right.split_whitespace();
        if right.next() != Some("cgroup") {
            continue;
        }
        let super_options = right.nth(1).unwrap_or("");
        let mut fields = left.split_whitespace();
        let (Some(root), Some(mount_point)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        let known: Vec<String> = super_options
            .split(',')
            .filter(|o| Controller::ALL.iter().any(|c| c.v1_name() == *o))
            .map(str::to_owned)
            .collect();
        if known.is_empty() || found.iter().any(|m| m.controllers == known) {
            continue;
        }
        found.push(V1Mount {
            mount: PathBuf::from(unescape_mount_path(mount_point)),
            root: unescape_mount_path(root),
            controllers: known,
        });
    }
    found
}

impl V1Mount {
    /// The directory of the cgroup at `path` (as /proc/PID/cgroup shows it,
    /// relative to our cgroup namespace), if this mount shows it.
    pub(crate) fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let root: Vec<&str> = self.root.split('/').filter(|c| !c.is_empty()).collect();
        let path: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let below = path.strip_prefix(root.as_slice())?;
        if below.iter().any(|c| *c == ".." || *c == ".") {
            return None;
        }
        Some(below.iter().fold(self.mount.clone(), |dir, c| dir.join(c)))
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(path: &str) -> String {
    path.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Why a `[resources]` key could not be applied.
fn limit_error(key: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Limit {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// One limit file to write: the key it enforces (None: the key is unset and
/// the default is written back, which only matters to a live update).
struct Write {
    key: &'static str,
    set: bool,
    file: &'static str,
    value: String,
}

fn write(key: &'static str, set: bool, file: &'static str, value: String) -> Write {
    Write {
        key,
        set,
        file,
        value,
    }
}

/// `cpu.max` / `cpu.cfs_quota_us` period, microseconds.
const CPU_PERIOD_US: u64 = 100_000;

fn cpu_quota_us(cpus: f64) -> u64 {
    // The kernel's minimum quota is 1 ms.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let quota = (cpus * CPU_PERIOD_US as f64).round() as u64;
    quota.max(1000)
}

/// The cgroup2 files of `controller` for `resources`.
fn v2_writes(controller: Controller, r: &Resources, fs: &dyn CgroupFs, dir: &Path) -> Vec<Write> {
    let or_max = |v: Option<u64>| v.map_or_else(|| "max".to_owned(), |v| v.to_string());
    match controller {
        Controller::Memory => vec![
            write("memory", r.memory.is_some(), "memory.max", or_max(r.memory)),
            write(
                "memory_high",
                r.memory_high.is_some(),
                "memory.high",
                or_max(r.memory_high),
            ),
        ],
        Controller::Cpu => vec![
            write(
                "cpus",
                r.cpus.is_some(),
                "cpu.max",
                match r.cpus {
                    Some(cpus) => format!("{} {CPU_PERIOD_US}", cpu_quota_us(cpus)),
                    None => format!("max {CPU_PERIOD_US}"),
                },
            ),
            write(
                "cpu_weight",
                r.cpu_weight.is_some(),
                "cpu.weight",
                r.cpu_weight.unwrap_or(100).to_string(),
            ),
        ],
        Controller::Cpuacct => vec![],
        Controller::Pids => vec![write(
            "tasks",
            r.tasks.is_some(),
            "pids.max",
            or_max(r.tasks),
        )],
        Controller::Io => {
            let weight = r.io_weight.unwrap_or(100);
            // blk-iocost's io.weight, else BFQ's (1..=1000).
            if fs.exists(&dir.join("io.weight")) || !fs.exists(&dir.join("io.bfq.weight")) {
                vec![write(
                    "io_weight",
                    r.io_weight.is_some(),
                    "io.weight",
                    format!("default {weight}"),
                )]
            } else {
                vec![write(
                    "io_weight",
                    r.io_weight.is_some(),
                    "io.bfq.weight",
                    weight.clamp(1, 1000).to_string(),
                )]
            }
        }
    }
}

/// The cgroup v1 files of `controller` for `resources`.
fn v1_writes(controller: Controller, r: &Resources, fs: &dyn CgroupFs, dir: &Path) -> Vec<Write> {
    let or_unlimited = |v: Option<u64>| v.map_or_else(|| "-1".to_owned(), |v| v.to_string());
    match controller {
        Controller::Memory => vec![
            write(
                "memory",
                r.memory.is_some(),
                "memory.limit_in_bytes",
                or_unlimited(r.memory),
            ),
            // v1 has no throttle: the soft limit is what the kernel reclaims
            // first from when the host runs short.
            write(
                "memory_high",
                r.memory_high.is_some(),
                "memory.soft_limit_in_bytes",
                or_unlimited(r.memory_high),
            ),
        ],
        Controller::Cpu => vec![
            write(
                "cpus",
                r.cpus.is_some(),
                "cpu.cfs_period_us",
                CPU_PERIOD_US.to_string(),
            ),
            write(
                "cpus",
                r.cpus.is_some(),
                "cpu.cfs_quota_us",
                r.cpus
                    .map_or_else(|| "-1".to_owned(), |c| cpu_quota_us(c).to_string()),
            ),
            // systemd's conversion: weight 100 = 1024 shares.
            write(
                "cpu_weight",
                r.cpu_weight.is_some(),
                "cpu.shares",
                (u64::from(r.cpu_weight.unwrap_or(100)) * 1024 / 100)
                    .clamp(2, 262_144)
                    .to_string(),
            ),
        ],
        Controller::Cpuacct => vec![],
        Controller::Pids => vec![write(
            "tasks",
            r.tasks.is_some(),
            "pids.max",
            r.tasks.map_or_else(|| "max".to_owned(), |t| t.to_string()),
        )],
        Controller::Io => {
            let weight = r.io_weight.unwrap_or(100);
            if fs.exists(&dir.join("blkio.weight")) && !fs.exists(&dir.join("blkio.bfq.weight")) {
                vec![write(
                    "io_weight",
                    r.io_weight.is_some(),
                    "blkio.weight",
                    weight.clamp(10, 1000).to_string(),
                )]
            } else {
                vec![write(
                    "io_weight",
                    r.io_weight.is_some(),
                    "blkio.bfq.weight",
                    weight.clamp(1, 1000).to_string(),
                )]
            }
        }
    }
}

/// Enables the cgroup2 controllers the machine needs on every ancestor of
/// its cgroup (`cgroup.subtree_control`), from the mount down. A controller
/// an ancestor does not offer fails the keys that need it; one nobody needs
/// is skipped (only its accounting is lost).
pub(crate) fn enable_v2_controllers(
    fs: &dyn CgroupFs,
    mount: &Path,
    cgroup: &Path,
    wanted: &[(Controller, Vec<&'static str>)],
) -> Result<(), RuntimeError> {
    let relative = cgroup
        .strip_prefix(mount)
        .map_err(|_| RuntimeError::Setup {
            step: "enabling cgroup controllers".into(),
            message: format!(
                "the machine's cgroup {} is not below the cgroup2 mount {}",
                cgroup.display(),
                mount.display()
            ),
        })?;
    let mut enabled: Vec<&(Controller, Vec<&'static str>)> = wanted.iter().collect();
    let mut ancestor = mount.to_path_buf();
    let components: Vec<_> = relative.components().collect();
    for (depth, component) in components.iter().enumerate() {
        let offered = fs
            .read(&ancestor.join("cgroup.controllers"))
            .unwrap_or_default();
        let active = fs
            .read(&ancestor.join("cgroup.subtree_control"))
            .unwrap_or_default();
        let mut kept = Vec::new();
        for entry in enabled {
            let (controller, keys) = entry;
            let Some(name) = controller.v2_name() else {
                continue;
            };
            let result = if !offered.split_whitespace().any(|c| c == name) {
                Err(format!(
                    "the {name} controller is not available in {} (its cgroup.controllers: {:?})",
                    ancestor.display(),
                    offered.trim()
                ))
            } else if active.split_whitespace().any(|c| c == name) {
                Ok(())
            } else {
                let file = ancestor.join("cgroup.subtree_control");
                fs.write(&file, &format!("+{name}"))
                    .map_err(|err| format!("enabling {name} in {}: {err}", file.display()))
            };
            match (result, keys.first()) {
                (Ok(()), _) => kept.push(entry),
                (Err(reason), Some(key)) => return Err(limit_error(key, reason)),
                (Err(reason), None) => {
                    tracing::debug!(
                        depth,
                        "{reason}; no limit needs it, only its accounting is lost"
                    )
                }
            }
        }
        enabled = kept;
        ancestor.push(component);
    }
    Ok(())
}

/// Writes `writes` into `dir`, checking that the guest's root (host uid
/// `guest_root`) cannot rewrite what was written.
fn apply_writes(
    fs: &dyn CgroupFs,
    dir: &Path,
    writes: &[Write],
    guest_root: Option<u32>,
) -> Result<(), RuntimeError> {
    for w in writes {
        let path = dir.join(w.file);
        match fs.write(&path, &w.value) {
            Ok(()) => {}
            Err(err) if !w.set => {
                // A default nobody asked for (e.g. a weight file this
                // kernel lacks): nothing is lost.
                tracing::debug!(file = %path.display(), %err, "cannot reset a limit to its default");
                continue;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(limit_error(
                    w.key,
                    format!(
                        "{} does not exist: the kernel does not offer this limit here{}",
                        path.display(),
                        if w.key == "io_weight" {
                            " (I/O weights need the bfq scheduler or blk-iocost on the disks)"
                        } else {
                            ""
                        }
                    ),
                ))
            }
            Err(err) => {
                return Err(limit_error(
                    w.key,
                    format!("writing {:?} to {}: {err}", w.value, path.display()),
                ))
            }
        }
        if let Some(uid) = guest_root {
            if fs.owner(&path).ok() == Some(uid) {
                return Err(limit_error(
                    w.key,
                    format!(
                        "{} belongs to the machine's root (host uid {uid}), who could raise it",
                        path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The machine's cgroups: its cgroup2 directory and one per v1 hierarchy.
pub(crate) struct MachineCgroups {
    layout: Layout,
    v2: PathBuf,
    v1: Vec<PathBuf>,
}

impl MachineCgroups {
    pub(crate) fn of(plan: &MachinePlan) -> Result<MachineCgroups, RuntimeError> {
        let layout = Layout::detect()?;
        let v1 = cgroup_v1::machine_dirs(&layout, &plan.machine_dir, plan.name());
        Ok(MachineCgroups {
            layout,
            v2: plan.cgroup.clone(),
            v1,
        })
    }

    /// The directory holding `controller`'s files for this machine.
    fn dir_of(&self, controller: Controller) -> Option<PathBuf> {
        match self.layout.home(controller) {
            Home::V2 => Some(self.v2.clone()),
            Home::V1(mount) => self.v1.iter().find(|d| d.starts_with(&mount)).cloned(),
            Home::Nowhere => None,
        }
    }
}

/// Writes every limit of `resources` (unset ones back to their defaults).
pub(crate) fn write_limits(
    fs: &dyn CgroupFs,
    layout: &Layout,
    dirs: &dyn Fn(Controller) -> Option<PathBuf>,
    resources: &Resources,
    guest_root: u32,
) -> Result<(), RuntimeError> {
    for controller in Controller::ALL {
        let home = layout.home(controller);
        let Some(dir) = dirs(controller) else {
            if let Some(key) = controller.keys_set(resources).first() {
                return Err(limit_error(
                    key,
                    format!(
                        "no cgroup hierarchy of this host holds the {} controller (neither cgroup2's cgroup.controllers nor a cgroup v1 mount)",
                        controller.v1_name()
                    ),
                ));
            }
            continue;
        };
        let writes = match home {
            Home::V2 => v2_writes(controller, resources, fs, &dir),
            _ => v1_writes(controller, resources, fs, &dir),
        };
        apply_writes(fs, &dir, &writes, Some(guest_root))?;
    }
    Ok(())
}

/// At boot, before the container is cloned: the cgroup2 controllers
/// enabled down to the machine's (already created) cgroup, its v1 cgroups
/// created, every limit written.
pub fn setup(plan: &MachinePlan) -> Result<(), RuntimeError> {
    let cgroups = MachineCgroups::of(plan)?;
    let resources = &plan.definition.resources;
    let wanted: Vec<(Controller, Vec<&'static str>)> = Controller::ALL
        .into_iter()
        .filter(|c| cgroups.layout.home(*c) == Home::V2)
        .map(|c| (c, c.keys_set(resources)))
        .collect();
    if !wanted.is_empty() {
        let mount = cgroup::cgroup2_mount()?;
        enable_v2_controllers(&HostFs, &mount, &cgroups.v2, &wanted)?;
    }
    cgroup_v1::create(&cgroups.v1)?;
    write_limits(
        &HostFs,
        &cgroups.layout,
        &|c| cgroups.dir_of(c),
        resources,
        plan.ids.base,
    )
}

/// Puts the container's first process in the machine's v1 cgroups (it must
/// be there before it execs init; cgroup2 membership comes with clone3).
/// Each move waits for an RCU grace period, so it runs on a thread of its
/// own while the caller wires the container up; [`Attaching::finish`]
/// before letting the child run.
pub fn start_attach(plan: &MachinePlan, pid: libc::pid_t) -> Attaching {
    let plan = plan.clone();
    Attaching(Some(std::thread::spawn(move || {
        let cgroups = MachineCgroups::of(&plan)?;
        cgroup_v1::attach(&cgroups.v1, pid)
    })))
}

/// A move into the v1 cgroups under way; joined when dropped, so the
/// supervisor is single-threaded again before it clones anew.
pub struct Attaching(Option<std::thread::JoinHandle<Result<(), RuntimeError>>>);

impl Drop for Attaching {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

impl Attaching {
    pub fn finish(mut self) -> Result<(), RuntimeError> {
        match self.0.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(RuntimeError::Setup {
                step: "moving the machine into its cgroups".into(),
                message: "the thread doing it panicked".into(),
            }),
            None => Ok(()),
        }
    }
}

/// A live update of a running machine's limits.
pub fn update(plan: &MachinePlan, resources: &Resources) -> Result<(), RuntimeError> {
    let cgroups = MachineCgroups::of(plan)?;
    write_limits(
        &HostFs,
        &cgroups.layout,
        &|c| cgroups.dir_of(c),
        resources,
        plan.ids.base,
    )
}

/// Removes the machine's v1 cgroups (its cgroup2 one is
/// [`cgroup::remove_machine_cgroup`]'s).
pub fn remove_v1(machine_dir: &Path, name: &str, timeout: Duration) -> Result<(), RuntimeError> {
    let layout = Layout::detect()?;
    cgroup_v1::remove(
        &cgroup_v1::machine_dirs(&layout, machine_dir, name),
        timeout,
    )
}

/// A running machine's consumption and limits; `u64::MAX` where unknown or
/// unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub memory_current: u64,
    pub memory_max: u64,
    pub cpu_usage_nsec: u64,
    pub tasks_current: u64,
    pub tasks_max: u64,
    /// Processes the kernel's OOM killer killed in the machine.
    pub oom_kills: u64,
}

impl Usage {
    pub const UNKNOWN: Usage = Usage {
        memory_current: u64::MAX,
        memory_max: u64::MAX,
        cpu_usage_nsec: u64::MAX,
        tasks_current: u64::MAX,
        tasks_max: u64::MAX,
        oom_kills: u64::MAX,
    };
}

/// A number, "max" (cgroup2's unlimited) or v1's page-rounded i64::MAX.
fn parse_amount(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return Some(u64::MAX);
    }
    let n: u64 = text.parse().ok()?;
    Some(if n >= 1 << 62 { u64::MAX } else { n })
}

/// The value of `key` in a flat-keyed file (`memory.events`, `cpu.stat`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// Reads the accounting files wherever each controller lives.
pub(crate) fn read_usage(
    fs: &dyn CgroupFs,
    layout: &Layout,
    dirs: &dyn Fn(Controller) -> Option<PathBuf>,
    v2: &Path,
) -> Usage {
    let mut usage = Usage::UNKNOWN;
    let read = |dir: &Path, file: &str| fs.read(&dir.join(file)).ok();
    if let Some(dir) = dirs(Controller::Memory) {
        if layout.home(Controller::Memory) == Home::V2 {
            usage.memory_current = read(&dir, "memory.current")
                .and_then(|t| parse_amount(&t))
                .unwrap_or(u64::MAX);
            usage.memory_max = read(&dir, "memory.max")
                .and_then(|t| parse_amount(&t))
                .unwrap_or(u64::MAX);
            usage.oom_kills = read(&dir, "memory.events")
                .and_then(|t| keyed(&t, "oom_kill"))
                .unwrap_or(u64::MAX);
        } else {
            usage.memory_current = read(&dir, "memory.usage_in_bytes")
                .and_then(|t| parse_amount(&t))
                .unwrap_or(u64::MAX);
            usage.memory_max = read(&dir, "memory.limit_in_bytes")
                .and_then(|t| parse_amount(&t))
                .unwrap_or(u64::MAX);
            usage.oom_kills = read(&dir, "memory.oom_control")
                .and_then(|t| keyed(&t, "oom_kill"))
                .unwrap_or(u64::MAX);
        }
    }
    let v2_cpu = read(v2, "cpu.stat").and_then(|t| keyed(&t, "usage_usec"));
    usage.cpu_usage_nsec = match (layout.home(Controller::Cpu), dirs(Controller::Cpuacct)) {
        (Home::V2, _) | (_, None) => v2_cpu.map(|us| us.saturating_mul(1000)),
        (_, Some(dir)) => read(&dir, "cpuacct.usage").and_then(|t| t.trim().parse().ok()),
    }
    .unwrap_or(u64::MAX);
    if let Some(dir) = dirs(Controller::Pids) {
        usage.tasks_current = read(&dir, "pids.current")
            .and_then(|t| parse_amount(&t))
            .unwrap_or(u64::MAX);
        usage.tasks_max = read(&dir, "pids.max")
            .and_then(|t| parse_amount(&t))
            .unwrap_or(u64::MAX);
    }
    usage
}

/// A running machine's accounting, read from its cgroup files now.
pub fn usage(plan: &MachinePlan) -> Usage {
    match MachineCgroups::of(plan) {
        Ok(cgroups) => read_usage(
            &HostFs,
            &cgroups.layout,
            &|c| cgroups.dir_of(c),
            &cgroups.v2,
        ),
        Err(_) => Usage::UNKNOWN,
    }
}

/// Makes the calling process a member of the v1 cgroups `leader` is in
/// (for a shell: its command then counts against the machine's limits).
pub fn join_leader_v1(leader: i32) -> Result<(), RuntimeError> {
    let layout = Layout::detect()?;
    cgroup_v1::join_process_cgroups(&layout, leader)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Files in memory; every write recorded in order.
    #[derive(Default)]
    struct Recorder {
        files: RefCell<BTreeMap<PathBuf, String>>,
        owners: BTreeMap<PathBuf, u32>,
        writes: RefCell<Vec<(String, String)>>,
    }

    impl Recorder {
        fn with(files: &[(&str, &str)]) -> Recorder {
            let recorder = Recorder::default();
            for (path, text) in files {
                recorder
                    .files
                    .borrow_mut()
                    .insert(PathBuf::from(path), (*text).to_owned());
            }
            recorder
        }
        fn writes(&self) -> Vec<(String, String)> {
            self.writes.borrow().clone()
        }
    }

    impl CgroupFs for Recorder {
        fn read(&self, path: &Path) -> io::Result<String> {
            self.files
                .borrow()
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn write(&self, path: &Path, value: &str) -> io::Result<()> {
            let mut files = self.files.borrow_mut();
            let Some(file) = files.get_mut(path) else {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            };
            *file = value.to_owned();
            self.writes
                .borrow_mut()
                .push((path.display().to_string(), value.to_owned()));
            Ok(())
        }
        fn exists(&self, path: &Path) -> bool {
            self.files.borrow().contains_key(path)
        }
        fn owner(&self, path: &Path) -> io::Result<u32> {
            Ok(self.owners.get(path).copied().unwrap_or(0))
        }
    }

    const CG: &str = "/cg";
    const MACHINE: &str = "/cg/rmachines/web";
    const GUEST_ROOT: u32 = 655_360;

    fn unified() -> Layout {
        Layout {
            v2_controllers: ["cpuset", "cpu", "io", "memory", "pids"]
                .map(String::from)
                .to_vec(),
            v1: vec![],
        }
    }

    /// A unified host: the root offers everything, nothing enabled yet.
    fn unified_files() -> Recorder {
        let all = "cpuset cpu io memory pids";
        let mut files = vec![
            ("/cg/cgroup.controllers", all),
            ("/cg/cgroup.subtree_control", ""),
            ("/cg/rmachines/cgroup.controllers", ""),
            ("/cg/rmachines/cgroup.subtree_control", ""),
        ];
        for file in [
            "memory.max",
            "memory.high",
            "cpu.max",
            "cpu.weight",
            "pids.max",
            "io.weight",
        ] {
            files.push((Box::leak(format!("{MACHINE}/{file}").into_boxed_str()), ""));
        }
        Recorder::with(&files)
    }

    fn all_limits() -> Resources {
        Resources {
            memory: Some(512 << 20),
            memory_high: Some(384 << 20),
            cpus: Some(0.5),
            cpu_weight: Some(200),
            tasks: Some(512),
            io_weight: Some(300),
        }
    }

    fn wanted(r: &Resources) -> Vec<(Controller, Vec<&'static str>)> {
        [
            Controller::Memory,
            Controller::Cpu,
            Controller::Pids,
            Controller::Io,
        ]
        .into_iter()
        .map(|c| (c, c.keys_set(r)))
        .collect()
    }

    #[test]
    fn cgroup2_controllers_are_enabled_on_every_ancestor_not_on_the_machine() {
        let fs = unified_files();
        // The kernel would make the child offer what the parent enabled.
        fs.files.borrow_mut().insert(
            PathBuf::from("/cg/rmachines/cgroup.controllers"),
            "cpu io memory pids".into(),
        );
        enable_v2_controllers(
            &fs,
            Path::new(CG),
            Path::new(MACHINE),
            &wanted(&all_limits()),
        )
        .unwrap();
        let enabled: Vec<(String, String)> = fs.writes();
        let expect = |dir: &str| {
            ["memory", "cpu", "pids", "io"]
                .map(|c| (format!("{dir}/cgroup.subtree_control"), format!("+{c}")))
                .to_vec()
        };
        assert_eq!(enabled, [expect("/cg"), expect("/cg/rmachines")].concat());
    }

    #[test]
    fn an_ancestor_without_the_controller_fails_the_key_that_needs_it() {
        let fs = unified_files();
        fs.files.borrow_mut().insert(
            PathBuf::from("/cg/rmachines/cgroup.controllers"),
            "cpu io memory".into(),
        );
        let err = enable_v2_controllers(
            &fs,
            Path::new(CG),
            Path::new(MACHINE),
            &wanted(&all_limits()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("cannot apply resources.tasks: the pids controller is not available in /cg/rmachines"), "{err}");
        // Without a pids limit, a missing pids controller only loses accounting.
        let fs = unified_files();
        fs.files.borrow_mut().insert(
            PathBuf::from("/cg/rmachines/cgroup.controllers"),
            "cpu io memory".into(),
        );
        let r = Resources {
            tasks: None,
            ..all_limits()
        };
        enable_v2_controllers(&fs, Path::new(CG), Path::new(MACHINE), &wanted(&r)).unwrap();
        assert!(!fs.writes().contains(&(
            "/cg/rmachines/cgroup.subtree_control".into(),
            "+pids".into()
        )));
    }

    #[test]
    fn already_enabled_controllers_are_not_written_again() {
        let fs = unified_files();
        for dir in ["/cg", "/cg/rmachines"] {
            let mut files = fs.files.borrow_mut();
            files.insert(
                PathBuf::from(format!("{dir}/cgroup.controllers")),
                "cpu io memory pids".into(),
            );
            files.insert(
                PathBuf::from(format!("{dir}/cgroup.subtree_control")),
                "cpu io memory pids".into(),
            );
        }
        enable_v2_controllers(
            &fs,
            Path::new(CG),
            Path::new(MACHINE),
            &wanted(&all_limits()),
        )
        .unwrap();
        assert!(fs.writes().is_empty(), "{:?}", fs.writes());
    }

    #[test]
    fn cgroup2_limits_go_on_the_machines_cgroup() {
        let fs = unified_files();
        let layout = unified();
        write_limits(
            &fs,
            &layout,
            &|_| Some(PathBuf::from(MACHINE)),
            &all_limits(),
            GUEST_ROOT,
        )
        .unwrap();
        let files = fs.files.borrow();
        let get = |f: &str| files[&PathBuf::from(format!("{MACHINE}/{f}"))].clone();
        assert_eq!(get("memory.max"), "536870912");
        assert_eq!(get("memory.high"), "402653184");
        assert_eq!(get("cpu.max"), "50000 100000");
        assert_eq!(get("cpu.weight"), "200");
        assert_eq!(get("pids.max"), "512");
        assert_eq!(get("io.weight"), "default 300");
    }

    #[test]
    fn unset_keys_write_the_defaults_back() {
        let fs = unified_files();
        write_limits(
            &fs,
            &unified(),
            &|_| Some(PathBuf::from(MACHINE)),
            &Resources::default(),
            GUEST_ROOT,
        )
        .unwrap();
        let files = fs.files.borrow();
        let get = |f: &str| files[&PathBuf::from(format!("{MACHINE}/{f}"))].clone();
        assert_eq!(get("memory.max"), "max");
        assert_eq!(get("memory.high"), "max");
        assert_eq!(get("cpu.max"), "max 100000");
        assert_eq!(get("cpu.weight"), "100");
        assert_eq!(get("pids.max"), "max");
        assert_eq!(get("io.weight"), "default 100");
    }

    #[test]
    fn a_limit_file_the_guest_owns_is_refused() {
        let mut fs = unified_files();
        fs.owners
            .insert(PathBuf::from(format!("{MACHINE}/memory.max")), GUEST_ROOT);
        let err = write_limits(
            &fs,
            &unified(),
            &|_| Some(PathBuf::from(MACHINE)),
            &all_limits(),
            GUEST_ROOT,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("resources.memory") && err.contains("could raise it"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_limit_file_names_the_key() {
        let fs = unified_files();
        fs.files
            .borrow_mut()
            .remove(&PathBuf::from(format!("{MACHINE}/io.weight")));
        let r = Resources {
            io_weight: Some(50),
            ..Resources::default()
        };
        let err = write_limits(&fs, &unified(), &|_| Some(PathBuf::from(MACHINE)), &r, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot apply resources.io_weight:"),
            "{err}"
        );
        // Unset, the same missing file is no error.
        write_limits(
            &fs,
            &unified(),
            &|_| Some(PathBuf::from(MACHINE)),
            &Resources::default(),
            1,
        )
        .unwrap();
    }

    #[test]
    fn bfq_weight_is_used_without_io_weight() {
        let fs = unified_files();
        {
            let mut files = fs.files.borrow_mut();
            files.remove(&PathBuf::from(format!("{MACHINE}/io.weight")));
            files.insert(
                PathBuf::from(format!("{MACHINE}/io.bfq.weight")),
                String::new(),
            );
        }
        let r = Resources {
            io_weight: Some(5000),
            ..Resources::default()
        };
        write_limits(&fs, &unified(), &|_| Some(PathBuf::from(MACHINE)), &r, 1).unwrap();
        assert_eq!(
            fs.files.borrow()[&PathBuf::from(format!("{MACHINE}/io.bfq.weight"))],
            "1000"
        );
    }

    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 31 0:32 /sub /mnt/memory-again rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn cgroup_paths_map_to_the_mount_of_their_hierarchy() {
        let mount = |root: &str| V1Mount {
            mount: "/sys/fs/cgroup/memory".into(),
            root: root.into(),
            controllers: vec!["memory".into()],
        };
        let m = mount("/");
        assert_eq!(
            m.dir_of("/rmachines/web"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/rmachines/web"))
        );
        // In a cgroup namespace two levels below the hierarchy's root.
        let m = mount("/../..");
        assert_eq!(
            m.dir_of("/../../rmachines/web"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/rmachines/web"))
        );
        assert_eq!(m.dir_of("/"), None);
        // Outside what the mount shows.
        assert_eq!(mount("/sub").dir_of("/other"), None);
    }

    #[test]
    fn v1_hierarchies_are_found_once_with_their_controllers() {
        let layout = Layout {
            v2_controllers: vec![],
            v1: parse_v1_mounts(HYBRID_MOUNTINFO),
        };
        assert_eq!(
            layout.v1_mounts(),
            ["memory", "cpu", "cpuacct", "pids", "blkio"]
                .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}")))
                .to_vec()
        );
        assert_eq!(
            layout.home(Controller::Memory),
            Home::V1("/sys/fs/cgroup/memory".into())
        );
        // Co-mounted cpu,cpuacct is one hierarchy.
        let comounted =
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let layout = Layout {
            v2_controllers: vec![],
            v1: parse_v1_mounts(comounted),
        };
        assert_eq!(
            layout.v1_mounts(),
            vec![PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")]
        );
        // A controller on cgroup2 wins over v1.
        let layout = Layout {
            v2_controllers: vec!["memory".into()],
            v1: parse_v1_mounts(HYBRID_MOUNTINFO),
        };
        assert_eq!(layout.home(Controller::Memory), Home::V2);
        assert!(!layout
            .v1_mounts()
            .contains(&PathBuf::from("/sys/fs/cgroup/memory")));
    }

    #[test]
    fn v1_limits_go_to_each_hierarchy() {
        let layout = Layout {
            v2_controllers: vec![],
            v1: parse_v1_mounts(HYBRID_MOUNTINFO),
        };
        let dir = |c: Controller| Some(PathBuf::from(format!("/v1/{}/m", c.v1_name())));
        let mut files = Vec::new();
        for f in [
            "memory/m/memory.limit_in_bytes",
            "memory/m/memory.soft_limit_in_bytes",
            "cpu/m/cpu.cfs_period_us",
            "cpu/m/cpu.cfs_quota_us",
            "cpu/m/cpu.shares",
            "pids/m/pids.max",
            "blkio/m/blkio.bfq.weight",
        ] {
            files.push((Box::leak(format!("/v1/{f}").into_boxed_str()) as &str, ""));
        }
        let fs = Recorder::with(&files);
        write_limits(&fs, &layout, &dir, &all_limits(), GUEST_ROOT).unwrap();
        let files = fs.files.borrow();
        let get = |f: &str| files[&PathBuf::from(format!("/v1/{f}"))].clone();
        assert_eq!(get("memory/m/memory.limit_in_bytes"), "536870912");
        assert_eq!(get("memory/m/memory.soft_limit_in_bytes"), "402653184");
        assert_eq!(get("cpu/m/cpu.cfs_quota_us"), "50000");
        assert_eq!(get("cpu/m/cpu.shares"), "2048");
        assert_eq!(get("pids/m/pids.max"), "512");
        assert_eq!(get("blkio/m/blkio.bfq.weight"), "300");
    }

    #[test]
    fn usage_is_read_from_cgroup2_and_v1_files() {
        let fs = Recorder::with(&[
            ("/m/memory.current", "32768000\n"),
            ("/m/memory.max", "max\n"),
            (
                "/m/memory.events",
                "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
            ),
            ("/m/cpu.stat", "usage_usec 1204000\nuser_usec 1000\n"),
            ("/m/pids.current", "12\n"),
            ("/m/pids.max", "512\n"),
        ]);
        let usage = read_usage(&fs, &unified(), &|_| Some("/m".into()), Path::new("/m"));
        assert_eq!(
            usage,
            Usage {
                memory_current: 32_768_000,
                memory_max: u64::MAX,
                cpu_usage_nsec: 1_204_000_000,
                tasks_current: 12,
                tasks_max: 512,
                oom_kills: 1,
            }
        );
        let layout = Layout {
            v2_controllers: vec![],
            v1: parse_v1_mounts(HYBRID_MOUNTINFO),
        };
        let fs = Recorder::with(&[
            ("/v1/memory/memory.usage_in_bytes", "1000\n"),
            ("/v1/memory/memory.limit_in_bytes", "9223372036854771712\n"),
            (
                "/v1/memory/memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
            ("/v1/cpuacct/cpuacct.usage", "5000\n"),
            ("/v1/pids/pids.current", "3\n"),
            ("/v1/pids/pids.max", "max\n"),
        ]);
        let dir = |c: Controller| Some(PathBuf::from(format!("/v1/{}", c.v1_name())));
        let usage = read_usage(&fs, &layout, &dir, Path::new("/v2"));
        assert_eq!(
            usage,
            Usage {
                memory_current: 1000,
                memory_max: u64::MAX,
                cpu_usage_nsec: 5000,
                tasks_current: 3,
                tasks_max: u64::MAX,
                oom_kills: 2,
            }
        );
    }
}
