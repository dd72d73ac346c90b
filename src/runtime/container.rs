//! One boot of a machine: clone3 into new namespaces, the id-map handshake,
//! the idmapped root, the mount plan, pivot_root, and exec of init.
//!
//! The parent half runs in the (single-threaded) supervisor; the child half
//! runs in the clone until it execs init. They talk over a SEQPACKET socket
//! pair whose messages are protocol steps; the child's end is close-on-exec,
//! so end-of-file tells the parent that exec succeeded.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::socket::{socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

use super::sys::{self, Forked};
use super::{devices, guestfile, paths, security, MachinePlan, RuntimeError};
use crate::definition::{NotifyReady, StopSignal};

/// What kind of init the machine runs; decides the stop signal and whether
/// readiness comes from `READY=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    Systemd,
    Busybox,
    Other,
}

/// A started container: init's host pid and a pidfd for it.
pub struct Container {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
}

/// What the supervisor hands the child besides the plan.
pub struct BootResources<'a> {
    /// The slave of the console pty, bind-mounted at /dev/console.
    pub console_slave: &'a Path,
    /// Directory bind-mounted read-only at /run/host.
    pub host_dir: &'a Path,
    /// What kind of init the root holds.
    pub init: InitKind,
}

/// Device nodes the guest gets, bind-mounted from the host.
const DEVICE_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// /proc files hidden behind /dev/null, after systemd-nspawn and runc.
const PROC_MASKED: &[&str] = &["kcore", "keys", "timer_list", "sched_debug", "kallsyms"];
/// /proc paths made read-only.
const PROC_READ_ONLY: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// Resolves `command[0]` inside the root and classifies the init.
pub fn inspect_init(plan: &MachinePlan) -> Result<InitKind, RuntimeError> {
    let def = &plan.definition;
    let command = def.command.first().cloned().unwrap_or_default();
    let no_init = || RuntimeError::NoInit {
        root: def.root.clone(),
        command: command.clone(),
    };
    let root = File::open(&def.root).map_err(RuntimeError::io(format!(
        "opening machine root {}",
        def.root.display()
    )))?;
    let fd =
        sys::open_in_root(root.as_fd(), Path::new(&command), libc::O_PATH).map_err(
            |err| match err.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => no_init(),
                _ => RuntimeError::io(format!(
                    "resolving {command} in machine root {}",
                    def.root.display()
                ))(err),
            },
        )?;
    let meta = fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|_| no_init())?;
    use std::os::unix::fs::PermissionsExt;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(no_init());
    }
    let target = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default();
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(match file_name.as_str() {
        "systemd" => InitKind::Systemd,
        "busybox" => InitKind::Busybox,
        _ => InitKind::Other,
    })
}

/// Refuses a root that an unprivileged host user can reach: guest uid 0 is
/// on-disk uid 0, so a setuid file the guest makes is a setuid-root file of
/// the host. Reachable means every directory from `/` down to the root can
/// be searched by others (or by a group other than root's).
pub fn check_root_not_exposed(root: &Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::MetadataExt;
    let real = fs::canonicalize(root).map_err(RuntimeError::io(format!(
        "resolving machine root {}",
        root.display()
    )))?;
    for dir in real.ancestors() {
        let meta =
            fs::metadata(dir).map_err(RuntimeError::io(format!("reading {}", dir.display())))?;
        let others = meta.mode() & 0o001 != 0;
        let group = meta.mode() & 0o010 != 0 && meta.gid() != 0;
        if !others && !group {
            return Ok(());
        }
    }
    let suggest = real.parent().unwrap_or(&real).to_path_buf();
    Err(RuntimeError::ExposedRoot {
        root: root.to_owned(),
        open: real,
        suggest,
    })
}

/// The signal that shuts this init down.
pub fn stop_signal(kind: InitKind, configured: StopSignal, boot: bool) -> libc::c_int {
    match configured {
        StopSignal::Signal(sig) => sig,
        StopSignal::Auto if !boot => libc::SIGTERM,
        StopSignal::Auto => match kind {
            InitKind::Systemd => libc::SIGRTMIN() + 3,
            InitKind::Busybox => libc::SIGUSR2,
            InitKind::Other => libc::SIGTERM,
        },
    }
}

/// Whether `running` waits for the guest's `READY=1`.
pub fn waits_for_ready(kind: InitKind, configured: NotifyReady) -> bool {
    match configured {
        NotifyReady::Yes => true,
        NotifyReady::No => false,
        NotifyReady::Auto => kind == InitKind::Systemd,
    }
}

/// A stable machine id derived from the name (32 lowercase hex digits).
pub fn derived_machine_id(name: &str) -> String {
    let fnv = |seed: u64| {
        name.bytes().fold(seed, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    format!(
        "{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x6c62_272e_07bb_0142)
    )
}

/// The machine id the guest will see: its own if it has one, else derived.
/// The guest's file is read as untrusted input (inside its root, regular
/// file, size-capped).
pub fn machine_id(plan: &MachinePlan) -> String {
    let own = File::open(&plan.definition.root)
        .ok()
        .and_then(|root| {
            guestfile::read_text(root.as_fd(), Path::new("/etc/machine-id"), guestfile::SMALL).ok()
        })
        .unwrap_or_default();
    let own = own.trim();
    if own.len() == 32 && own.bytes().all(|b| b.is_ascii_hexdigit()) {
        own.to_owned()
    } else {
        derived_machine_id(plan.name())
    }
}

fn uuid_form(id: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &id[0..8],
        &id[8..12],
        &id[12..16],
        &id[16..20],
        &id[20..32]
    )
}

/// Boots the container: returns once init is executing (or failed to).
///
/// The mounts are made so that the kernel locks them (after
/// systemd-nspawn's outer and inner child). Init is cloned into new user,
/// PID, network, UTS, IPC and cgroup namespaces, as the guest needs them
/// owned by its user namespace. A second process, the mount setup, starts as
/// host root in a new mount namespace owned by the host's user namespace,
/// joins init's PID (as a member), network, UTS, IPC and cgroup namespaces,
/// mounts everything and pivots; then it joins the machine's user namespace
/// and unshares its mount namespace. That copy is owned by a less privileged
/// user namespace, so the kernel locks every flag of every mount in it (ro,
/// nodev, nosuid, noexec) and every submount (no umount to reveal what lies
/// below). It hands the copy to init (setns) and exits.
pub fn spawn(plan: &MachinePlan, res: &BootResources<'_>) -> Result<Container, RuntimeError> {
    inspect_init(plan)?;
    if !plan.definition.allow_exposed_root {
        check_root_not_exposed(&plan.definition.root)?;
    }
    let cgroup_dir = File::open(&plan.cgroup).map_err(RuntimeError::io(format!(
        "opening cgroup {}",
        plan.cgroup.display()
    )))?;
    devices::restrict(cgroup_dir.as_fd(), &plan.definition.devices)?;
    let pair = || {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| RuntimeError::io("creating the setup socket pair")(e.into()))
    };
    let (parent_sock, child_sock) = pair()?;
    let (setup_sock, init_mnt_sock) = pair()?;

    match sys::clone3_fork(NAMESPACES, cgroup_dir.as_fd())
        .map_err(RuntimeError::io("clone3 into new namespaces"))?
    {
        Forked::Child => {
            drop(parent_sock);
            drop(setup_sock);
            let result = child_main(plan, child_sock.as_fd(), init_mnt_sock.as_fd());
            // Only reached on failure: exec does not return.
            let message = match result {
                Err(err) => err.to_string(),
                Ok(never) => match never {},
            };
            let _ = nix::sys::socket::send(
                child_sock.as_raw_fd(),
                message.as_bytes(),
                MsgFlags::empty(),
            );
            // SAFETY: _exit in the forked child skips the parent's atexit
            // handlers and buffered state, which belong to the supervisor.
            unsafe { libc::_exit(127) }
        }
        Forked::Parent { pid, pidfd } => {
            drop(child_sock);
            drop(init_mnt_sock);
            let container = Container { pid, pidfd };
            let setup = Setup {
                cgroup: cgroup_dir.as_fd(),
                sock: setup_sock,
            };
            match parent_setup(plan, res, pid, parent_sock.as_fd(), setup) {
                Ok(()) => Ok(container),
                Err(err) => {
                    // A child that died before exec is why a later step of
                    // ours failed (no such process, a closed socket): its
                    // own message is the one to report.
                    let err = child_error(parent_sock.as_fd()).unwrap_or(err);
                    let _ = sys::pidfd_send_signal(container.pidfd.as_fd(), libc::SIGKILL);
                    let _ = sys::waitid_pidfd(container.pidfd.as_fd(), false);
                    Err(err)
                }
            }
        }
    }
}

const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

/// What the mount setup process is started with.
struct Setup<'a> {
    cgroup: BorrowedFd<'a>,
    /// Its end of the socket to init: the locked mount namespace, or an error.
    sock: OwnedFd,
}

/// The error message a failed child left on the setup socket, if any.
fn child_error(sock: BorrowedFd<'_>) -> Option<RuntimeError> {
    let mut buf = vec![0u8; 4096];
    match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
        Ok(n) if n > 0 => Some(RuntimeError::Child(
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        )),
        _ => None,
    }
}

/// The parent's half: id maps, idmapped trees, the mount setup process,
/// the network, then RUN and wait for exec.
fn parent_setup(
    plan: &MachinePlan,
    res: &BootResources<'_>,
    pid: libc::pid_t,
    sock: BorrowedFd<'_>,
    setup: Setup<'_>,
) -> Result<(), RuntimeError> {
    let started = std::time::Instant::now();
    let step = |what: &str| {
        tracing::debug!(
            machine = plan.name(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "{what}"
        )
    };
    let ids = plan.ids;
    let map = format!("0 {} {}\n", ids.base, ids.size);
    for file in ["uid_map", "gid_map"] {
        fs::write(format!("/proc/{pid}/{file}"), &map).map_err(RuntimeError::io(format!(
            "writing /proc/{pid}/{file} ({map:?})"
        )))?;
    }
    let open_ns = |name: &str| -> Result<OwnedFd, RuntimeError> {
        File::open(format!("/proc/{pid}/ns/{name}"))
            .map(OwnedFd::from)
            .map_err(RuntimeError::io(format!(
                "opening the machine's {name} namespace"
            )))
    };
    let ns = MachineNamespaces {
        user: open_ns("user")?,
        pid: open_ns("pid")?,
        others: OWNED_NAMESPACES
            .iter()
            .map(|(name, flag)| open_ns(name).map(|fd| (fd, *flag)))
            .collect::<Result<_, _>>()?,
    };

    let def = &plan.definition;
    // An image is never written: it is only ever a read-only lower layer.
    let root_read_only = def.read_only || def.image.is_some();
    let mut trees = vec![idmapped_tree(&def.root, root_read_only, ns.user.as_fd())?];
    for bind in &def.binds {
        trees.push(idmapped_tree(
            &bind.source,
            bind.read_only,
            ns.user.as_fd(),
        )?);
    }
    if let Some(layer) = persistent_layer(plan) {
        trees.push(idmapped_tree(layer, false, ns.user.as_fd())?);
    }
    let mount_setup = start_mount_setup(plan, res, &ns, trees, setup)?;
    step("mount setup started");
    // Only now, with the mount setup cloned: a clone of a process with a
    // second thread may inherit a lock that thread held, and hang.
    let attaching = super::resources::start_attach(plan, pid);

    // The mounts are made while the network is wired here; init execs only
    // after RUN, so it never runs before its network is in place.
    let wired = match &plan.network {
        Some(net) => {
            crate::network::firewall::join(net, || crate::network::link::setup_private(net, pid))
        }
        None => crate::network::link::setup_loopback_only(plan.name(), pid),
    };
    // Reaped in any case: it has handed init the mounts or its error.
    let _ = sys::waitid_pidfd(mount_setup.as_fd(), false);
    wired?;
    step("network ready");
    attaching.finish()?;
    // A child that failed meanwhile has closed its end: its message is
    // read below.
    let _ = nix::sys::socket::send(sock.as_raw_fd(), RUN, MsgFlags::MSG_NOSIGNAL);

    // The child's end closes on exec (EOF) or carries an error message.
    let mut buf = vec![0u8; 4096];
    loop {
        match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => {
                step("init executing");
                return Ok(());
            }
            Ok(n) => {
                return Err(RuntimeError::Child(
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ))
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(RuntimeError::io("waiting for the container's init")(
                    e.into(),
                ))
            }
        }
    }
}

/// The machine's namespaces, held open by descriptors.
struct MachineNamespaces {
    user: OwnedFd,
    /// Init's PID namespace, which the mount setup is cloned into.
    pid: OwnedFd,
    /// Network, UTS, IPC and cgroup namespaces, with their setns flags.
    others: Vec<(OwnedFd, libc::c_int)>,
}

const OWNED_NAMESPACES: &[(&str, libc::c_int)] = &[
    ("net", libc::CLONE_NEWNET),
    ("uts", libc::CLONE_NEWUTS),
    ("ipc", libc::CLONE_NEWIPC),
    ("cgroup", libc::CLONE_NEWCGROUP),
];

/// Clones the mount setup process: a member of init's PID namespace (so
/// the /proc it mounts is the machine's), in a new mount namespace owned by
/// the host's user namespace. Returns its pidfd.
fn start_mount_setup(
    plan: &MachinePlan,
    res: &BootResources<'_>,
    ns: &MachineNamespaces,
    trees: Vec<OwnedFd>,
    setup: Setup<'_>,
) -> Result<OwnedFd, RuntimeError> {
    // Our PID namespace is switched for our children only, and back right
    // after the clone.
    let own_pid_ns =
        File::open("/proc/self/ns/pid").map_err(RuntimeError::io("opening our PID namespace"))?;
    sys::setns(ns.pid.as_fd(), libc::CLONE_NEWPID).map_err(RuntimeError::io(
        "entering the machine's PID namespace for the mount setup",
    ))?;
    let forked = sys::clone3_fork(libc::CLONE_NEWNS, setup.cgroup);
    if !matches!(forked, Ok(Forked::Child)) {
        sys::setns(own_pid_ns.as_fd(), libc::CLONE_NEWPID)
            .map_err(RuntimeError::io("returning to our PID namespace"))?;
    }
    match forked.map_err(RuntimeError::io("clone3 of the mount setup (CLONE_NEWNS)"))? {
        Forked::Child => {
            let sock = setup.sock.as_fd();
            let result = mount_setup_main(plan, res, ns, trees, sock);
            // Only reached on failure.
            let message = match result {
                Err(err) => format!("setting up the machine's mounts: {err}"),
                Ok(never) => match never {},
            };
            let _ = nix::sys::socket::send(sock.as_raw_fd(), message.as_bytes(), MsgFlags::empty());
            // SAFETY: leave the forked child without the parent's exit
            // handlers.
            unsafe { libc::_exit(127) }
        }
        Forked::Parent { pidfd, .. } => Ok(pidfd),
    }
}

/// A detached copy of `path`'s mount tree, idmapped through `userns`.
fn idmapped_tree(
    path: &Path,
    read_only: bool,
    userns: BorrowedFd<'_>,
) -> Result<OwnedFd, RuntimeError> {
    let tree = sys::open_tree_clone(path).map_err(RuntimeError::io(format!(
        "cloning the mount tree of {}",
        path.display()
    )))?;
    // Device nodes in a guest tree (an imported image can carry any) are
    // never live; the device policy refuses them anyway.
    let mut attrs = libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_NODEV;
    if read_only {
        attrs |= libc::MOUNT_ATTR_RDONLY;
    }
    sys::mount_setattr_tree(tree.as_fd(), attrs, Some(userns)).map_err(|source| {
        let (path, fs_type) = (path.to_owned(), fs_type_name(path));
        if source.raw_os_error() == Some(libc::EPERM) {
            RuntimeError::IdmapRefused {
                path,
                fs_type,
                source,
            }
        } else {
            RuntimeError::NoIdmap {
                path,
                fs_type,
                source,
            }
        }
    })?;
    Ok(tree)
}

fn fs_type_name(path: &Path) -> String {
    match nix::sys::statfs::statfs(path) {
        Ok(st) => {
            let magic = st.filesystem_type().0;
            let name = match magic {
                0xEF53 => "ext4",
                0x5846_5342 => "xfs",
                0x9123_683E => "btrfs",
                0x0102_1994 => "tmpfs",
                0x794c_7630 => "overlayfs",
                0x6969 => "nfs",
                0x6573_5546 => "fuse",
                0x0102_1997 => "9p",
                0x6a65_6a6a | 0x5346_414F => "fat/vfat",
                _ => "",
            };
            if name.is_empty() {
                format!("file system magic {magic:#x}")
            } else {
                name.to_owned()
            }
        }
        Err(err) => format!("unknown file system: {err}"),
    }
}

enum Never {}

/// The mount setup's half: host root until the end, then the guest's root
/// in a mount namespace of the guest's user namespace, where every mount
/// is locked. Sends that namespace to init; returns only on error.
fn mount_setup_main(
    plan: &MachinePlan,
    res: &BootResources<'_>,
    ns: &MachineNamespaces,
    trees: Vec<OwnedFd>,
    sock: BorrowedFd<'_>,
) -> Result<Never, RuntimeError> {
    sys::set_parent_death_signal(libc::SIGKILL).map_err(RuntimeError::io("setting PDEATHSIG"))?;
    sys::set_non_dumpable().map_err(RuntimeError::io("PR_SET_DUMPABLE"))?;
    for (fd, flag) in &ns.others {
        sys::setns(fd.as_fd(), *flag).map_err(RuntimeError::io(format!(
            "joining the machine's namespace ({flag:#x})"
        )))?;
    }
    GUEST_ROOT.store(plan.ids.base, std::sync::atomic::Ordering::Relaxed);
    let mut trees = trees;
    let layer = persistent_layer(plan).and_then(|_| trees.pop());

    let new_root = plan.machine_dir.join(paths::ROOT_MOUNT);
    let mut trees = trees.into_iter();
    let root_tree = trees
        .next()
        .ok_or_else(|| RuntimeError::Child("no root tree".into()))?;
    mount_root(plan, root_tree, layer, &new_root)?;
    let root = File::open(&new_root).map_err(RuntimeError::io("opening the new root"))?;
    let root = root.as_fd();

    for (bind, tree) in plan.definition.binds.iter().zip(trees) {
        let source_is_dir = bind.source.is_dir();
        if plan.definition.read_only && sys::open_in_root(root, &bind.target, libc::O_PATH).is_err()
        {
            // Like systemd-nspawn on a read-only root: no mount point is
            // made up; the tree must have it.
            return Err(RuntimeError::Child(format!(
                "bind target {} does not exist in the read-only root {}: create it in the tree (as a {}) or set read_only = false",
                bind.target.display(),
                plan.definition.root.display(),
                if source_is_dir { "directory" } else { "file" }
            )));
        }
        let target = ensure_in_root(root, &bind.target, source_is_dir)?;
        sys::move_mount_to_fd(tree.as_fd(), target.as_fd()).map_err(RuntimeError::io(format!(
            "mounting bind {} on {}",
            bind.source.display(),
            bind.target.display()
        )))?;
    }

    mount_proc(root)?;
    mount_sys(root)?;
    mount_dev(root, res.console_slave, &plan.definition.devices)?;
    mount_run(root, res.host_dir)?;
    set_machine_id(plan, res.init, root)?;
    set_resolv_conf(plan, root)?;
    // pivot_root refuses a locked new root: pivot first.
    pivot_into(&new_root)?;

    // Copy the mount namespace into one owned by the guest's user
    // namespace: the kernel locks every mount in the copy.
    sys::setns(ns.user.as_fd(), libc::CLONE_NEWUSER)
        .map_err(RuntimeError::io("joining the machine's user namespace"))?;
    sys::switch_ids(0, 0, &[]).map_err(RuntimeError::io(
        "becoming the guest's root (setgroups, setresgid, setresuid)",
    ))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| RuntimeError::io("unsharing the locked mount namespace")(e.into()))?;
    let mnt = File::open("/proc/self/ns/mnt")
        .map_err(RuntimeError::io("opening the locked mount namespace"))?;
    let raw = [mnt.as_raw_fd()];
    nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(b"mnt")],
        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| RuntimeError::io("handing the mounts to init")(e.into()))?;
    // SAFETY: done; leave without the parent's exit handlers.
    unsafe { libc::_exit(0) }
}

/// Init's half. Returns only on error.
fn child_main(
    plan: &MachinePlan,
    sock: BorrowedFd<'_>,
    mnt_sock: BorrowedFd<'_>,
) -> Result<Never, RuntimeError> {
    // A crashed supervisor takes its machine along rather than orphan it.
    sys::set_parent_death_signal(libc::SIGKILL).map_err(RuntimeError::io("setting PDEATHSIG"))?;
    sys::set_non_dumpable().map_err(RuntimeError::io("PR_SET_DUMPABLE"))?;

    // The supervisor blocks the signals it reads from a signalfd and
    // ignores SIGPIPE; both would survive exec and reach init.
    sys::reset_signals().map_err(RuntimeError::io("resetting signal dispositions and mask"))?;
    let mnt = receive_mount_namespace(mnt_sock)?;

    // Become the guest's root now that the maps exist.
    sys::switch_ids(0, 0, &[]).map_err(RuntimeError::io(
        "becoming the guest's root (setgroups, setresgid, setresuid)",
    ))?;
    // The credential change cleared both.
    sys::set_parent_death_signal(libc::SIGKILL).map_err(RuntimeError::io("setting PDEATHSIG"))?;
    sys::set_non_dumpable().map_err(RuntimeError::io("PR_SET_DUMPABLE"))?;
    if supervisor_gone(sock) {
        return Err(RuntimeError::Child("the supervisor is gone".into()));
    }
    sys::setns(mnt.as_fd(), libc::CLONE_NEWNS).map_err(RuntimeError::io(
        "joining the machine's locked mount namespace",
    ))?;
    drop(mnt);
    nix::unistd::chdir("/").map_err(mount_err("chdir /".into()))?;
    nix::unistd::sethostname(&plan.definition.hostname)
        .map_err(|e| RuntimeError::io("sethostname")(e.into()))?;
    // Not rmachined's session keyring: one of the machine's own.
    sys::join_new_session_keyring().map_err(RuntimeError::io("joining a new session keyring"))?;
    attach_console()?;

    let program = security::seccomp_program()?;
    let argv: Vec<CString> = plan
        .definition
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| RuntimeError::Child("command contains a NUL byte".into()))?;
    let env = guest_environment(plan)?;
    if let Some(dir) = &plan.definition.working_directory {
        nix::unistd::chdir(dir).map_err(mount_err(format!(
            "changing to the working directory {}",
            dir.display()
        )))?;
    }
    wait_for_run(sock)?;
    sys::close_fds_from(3, &[sock.as_raw_fd()]);
    security::confine(&program)?;
    become_user(plan.definition.user)?;
    let err = nix::unistd::execve(&argv[0], &argv, &env).unwrap_err();
    Err(RuntimeError::io(format!(
        "executing {}",
        plan.definition.command[0]
    ))(err.into()))
}

/// The locked mount namespace from the mount setup, or its error.
fn receive_mount_namespace(sock: BorrowedFd<'_>) -> Result<OwnedFd, RuntimeError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    let mut buf = vec![0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    }
    .map_err(|e| RuntimeError::io("waiting for the machine's mounts")(e.into()))?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: SCM_RIGHTS installed these descriptors in our
                // table just now; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    let len = msg.bytes;
    match (fds.pop(), len) {
        (Some(fd), _) => Ok(fd),
        (None, 0) => Err(RuntimeError::Child(
            "the mount setup ended without handing over the machine's mounts".into(),
        )),
        (None, n) => Err(RuntimeError::Child(
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        )),
    }
}

fn supervisor_gone(sock: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// The host uid of the guest's root, for what setup creates in the guest's
/// tree (set once in the child).
static GUEST_ROOT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Runs `create` with the file system ids of the guest's root, so what it
/// creates on the (idmapped) tree is the guest's and host root's own ids,
/// which the idmapping cannot represent, are never needed.
fn as_guest_root<T>(create: impl FnOnce() -> T) -> T {
    let id = GUEST_ROOT.load(std::sync::atomic::Ordering::Relaxed);
    let _ = nix::unistd::setfsgid(id.into());
    let _ = nix::unistd::setfsuid(id.into());
    let result = create();
    let _ = nix::unistd::setfsuid(0.into());
    let _ = nix::unistd::setfsgid(0.into());
    result
}

/// Drops from the machine's root to `user = "UID:GID"` (an OCI image's
/// `User`), with no supplementary groups.
fn become_user(user: Option<(u32, u32)>) -> Result<(), RuntimeError> {
    let Some((uid, gid)) = user else {
        return Ok(());
    };
    sys::switch_ids(uid, gid, &[]).map_err(RuntimeError::io(format!(
        "becoming the image's user {uid}:{gid} (setgroups, setresgid, setresuid)"
    )))
}

/// The supervisor wires the network while the child mounts; init runs
/// only once it says so.
fn wait_for_run(sock: BorrowedFd<'_>) -> Result<(), RuntimeError> {
    let mut buf = [0u8; 8];
    loop {
        match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) if &buf[..n] == RUN => return Ok(()),
            Ok(_) => {
                return Err(RuntimeError::Child(
                    "the supervisor gave up before init could run".into(),
                ))
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(RuntimeError::io("waiting for the network")(e.into())),
        }
    }
}

/// The message that lets the child exec init.
const RUN: &[u8] = b"run";

fn mount_err(what: String) -> impl FnOnce(nix::errno::Errno) -> RuntimeError {
    move |e| RuntimeError::io(what)(e.into())
}

fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Puts the (idmapped) root on `new_root`; for an ephemeral machine or one
/// made from an image, as the lower layer of an overlay (see
/// [`mount_overlay_root`]).
fn mount_root(
    plan: &MachinePlan,
    tree: OwnedFd,
    layer: Option<OwnedFd>,
    new_root: &Path,
) -> Result<(), RuntimeError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(mount_err("making the mount namespace private".into()))?;
    if layer.is_none() && !plan.definition.ephemeral {
        let target = File::open(new_root)
            .map_err(RuntimeError::io(format!("opening {}", new_root.display())))?;
        return sys::move_mount_to_fd(tree.as_fd(), target.as_fd())
            .map_err(RuntimeError::io("mounting the idmapped root"));
    }
    mount_overlay_root(tree, layer, new_root)
}

/// The machine's writable layer on disk (`upper/` and `work/`), for a
/// machine made from an image that keeps its changes; None when the root is
/// the tree itself, a read-only image, or an ephemeral overlay on a tmpfs.
pub fn persistent_layer(plan: &MachinePlan) -> Option<&Path> {
    let def = &plan.definition;
    match (
        &plan.layer,
        def.image.is_some(),
        def.ephemeral,
        def.read_only,
    ) {
        (Some(layer), true, false, false) => Some(layer),
        _ => None,
    }
}

/// Switches the file system ids to the guest's root (host id
/// [`GUEST_ROOT`]) keeping every capability in effect, or back to root.
/// Changing the fsuid away from 0 drops the file capabilities from the
/// effective set; they come back from the permitted set.
fn act_as_guest_root(on: bool) -> Result<(), RuntimeError> {
    let id = if on {
        GUEST_ROOT.load(std::sync::atomic::Ordering::Relaxed)
    } else {
        0
    };
    let _ = nix::unistd::setfsgid(id.into());
    let _ = nix::unistd::setfsuid(id.into());
    if nix::unistd::setfsuid(u32::MAX.into()) != id.into() {
        return Err(RuntimeError::Child(format!(
            "setfsuid({id}) did not take effect"
        )));
    }
    let permitted = caps::read(None, caps::CapSet::Permitted).map_err(|e| RuntimeError::Setup {
        step: "reading our capabilities".into(),
        message: e.to_string(),
    })?;
    caps::set(None, caps::CapSet::Effective, &permitted).map_err(|e| RuntimeError::Setup {
        step: "raising our capabilities for the overlay mount".into(),
        message: e.to_string(),
    })
}

/// Mounts an overlay on `new_root`: the idmapped tree `lower` as its
/// read-only lower layer, and as its upper layer either `layer` (an idmapped
/// mount of the machine's layer directory holding `upper/` and `work/`) or,
/// without one, a tmpfs that dies with the mount namespace.
///
/// The overlay is mounted inside the machine's user namespace, where the
/// kernel refuses `trusted.*` xattrs; without `userxattr` overlayfs then runs
/// without xattrs and fails with EIO whatever needs one (a directory made
/// where a lower one was removed needs the opaque mark: systemd-tmpfiles'
/// `D! /tmp/.X11-unix`). With `userxattr` it keeps its marks in
/// `user.overlay.*`, which tmpfs (Linux >= 6.6) and disk file systems store.
fn mount_overlay_root(
    lower: OwnedFd,
    layer: Option<OwnedFd>,
    new_root: &Path,
) -> Result<(), RuntimeError> {
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(mount_err("mounting the overlay's scratch tmpfs".into()))?;
    for dir in ["lower", "layer", "merged"] {
        fs::create_dir(new_root.join(dir)).map_err(RuntimeError::io("preparing the overlay"))?;
    }
    let place = |tree: &OwnedFd, dir: &str, what: &str| {
        let target =
            File::open(new_root.join(dir)).map_err(RuntimeError::io(format!("opening {dir}")))?;
        sys::move_mount_to_fd(tree.as_fd(), target.as_fd()).map_err(RuntimeError::io(what))
    };
    place(
        &lower,
        "lower",
        "mounting the idmapped root as the overlay's lower layer",
    )?;
    match &layer {
        Some(layer) => place(
            layer,
            "layer",
            "mounting the machine's idmapped writable layer",
        )?,
        None => {
            // The merged root takes its owner from the upper layer: the
            // guest's root.
            let owner = GUEST_ROOT.load(std::sync::atomic::Ordering::Relaxed);
            for dir in ["layer/upper", "layer/work"] {
                fs::create_dir(new_root.join(dir))
                    .map_err(RuntimeError::io("preparing the overlay"))?;
                std::os::unix::fs::chown(new_root.join(dir), Some(owner), Some(owner))
                    .map_err(RuntimeError::io("preparing the overlay"))?;
            }
        }
    }
    // Relative paths: the state directory's path may hold characters the
    // option parser splits on (`,`, `:`).
    nix::unistd::chdir(new_root).map_err(mount_err(format!("chdir {}", new_root.display())))?;
    // overlayfs makes its work directories and copy-up files with the
    // mounter's credentials. Ours are host root's, which the idmapped layer
    // cannot map (EOVERFLOW: the kernel then mounts the overlay read-only,
    // saying so only in its log); as the guest's root (fsuid) they map.
    let as_guest_root = layer.is_some();
    if as_guest_root {
        act_as_guest_root(true)?;
    }
    let mounted = mount(
        Some("overlay"),
        "merged",
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some("lowerdir=lower,upperdir=layer/upper,workdir=layer/work,userxattr"),
    );
    if as_guest_root {
        act_as_guest_root(false)?;
    }
    mounted.map_err(|errno| {
        let source: std::io::Error = errno.into();
        let upper = if layer.is_some() {
            "the machine's layer directory (idmapped)"
        } else {
            "a tmpfs"
        };
        RuntimeError::Setup {
            step: "mounting the overlay root".into(),
            message: format!(
                "overlayfs refused an idmapped lower layer with {upper} as upper layer in the \
                 machine's user namespace ({source}); this needs Linux >= 5.19 (idmapped \
                 layers), >= 6.6 for a tmpfs upper layer (user xattrs), and a layer file \
                 system with user xattrs; see the kernel log (dmesg) for overlayfs' reason"
            ),
        }
    })?;
    // overlayfs falls back to a read-only mount when it cannot use its
    // upper layer, and says why only in the kernel log.
    let flags = nix::sys::statvfs::statvfs("merged")
        .map_err(|e| RuntimeError::io("statvfs of the overlay root")(e.into()))?
        .flags();
    if flags.contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Err(RuntimeError::Setup {
            step: "mounting the overlay root".into(),
            message: "overlayfs mounted the root read-only: it could not use the upper layer; \
                      see the kernel log (dmesg) for its reason"
                .into(),
        });
    }
    // Stack the merged tree on new_root itself so pivot_root finds it there.
    mount(
        Some("merged"),
        new_root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("placing the overlay root".into()))
}

/// Opens `path` inside `root` (symlinks resolved as if `root` were `/`),
/// creating missing directories, and the last component as a directory or
/// an empty file.
fn ensure_in_root(
    root: BorrowedFd<'_>,
    path: &Path,
    directory: bool,
) -> Result<OwnedFd, RuntimeError> {
    let err = |what: &str| RuntimeError::io(format!("{what} {} in the machine", path.display()));
    if let Ok(fd) = sys::open_in_root(root, path, libc::O_PATH) {
        return Ok(fd);
    }
    let mut current = sys::open_in_root(root, Path::new("/"), libc::O_PATH | libc::O_DIRECTORY)
        .map_err(err("opening the root for"))?;
    let components: Vec<_> = path
        .components()
        .skip_while(|c| c.as_os_str() == "/")
        .collect();
    for (i, component) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let name = Path::new(component.as_os_str());
        match sys::open_in_root(current.as_fd(), name, libc::O_PATH) {
            Ok(fd) => {
                // Resolve relative to the machine root, not `current`, so an
                // absolute symlink inside the guest stays inside it.
                let so_far: PathBuf = components[..=i].iter().collect();
                current = sys::open_in_root(root, &so_far, libc::O_PATH).unwrap_or(fd);
            }
            Err(_) => {
                let cname = CString::new(name.as_os_str().as_bytes())
                    .map_err(|_| RuntimeError::Child("path contains NUL".into()))?;
                let parent = sys::open_in_root(
                    current.as_fd(),
                    Path::new("."),
                    libc::O_DIRECTORY | libc::O_RDONLY,
                )
                .map_err(err("opening the parent of"))?;
                if last && !directory {
                    as_guest_root(|| {
                        nix::fcntl::openat(
                            parent.as_fd(),
                            cname.as_c_str(),
                            // O_EXCL: a dangling guest symlink is not followed
                            // (it would create its target on the host).
                            nix::fcntl::OFlag::O_CREAT
                                | nix::fcntl::OFlag::O_EXCL
                                | nix::fcntl::OFlag::O_NOFOLLOW
                                | nix::fcntl::OFlag::O_WRONLY
                                | nix::fcntl::OFlag::O_CLOEXEC,
                            nix::sys::stat::Mode::from_bits_truncate(0o644),
                        )
                    })
                    .map(drop)
                    .map_err(|e| err("creating")(e.into()))?;
                } else {
                    match as_guest_root(|| {
                        nix::sys::stat::mkdirat(
                            parent.as_fd(),
                            cname.as_c_str(),
                            nix::sys::stat::Mode::from_bits_truncate(0o755),
                        )
                    }) {
                        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                        Err(e) => return Err(err("creating")(e.into())),
                    }
                }
                current = sys::open_in_root(parent.as_fd(), name, libc::O_PATH)
                    .map_err(err("opening"))?;
            }
        }
    }
    Ok(current)
}

fn mount_fs(
    root: BorrowedFd<'_>,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RuntimeError> {
    let fd = ensure_in_root(root, Path::new(target), true)?;
    mount(
        Some(fstype),
        &fd_path(fd.as_fd()),
        Some(fstype),
        flags,
        data,
    )
    .map_err(mount_err(format!("mounting {fstype} on {target}")))
}

fn bind(
    root: BorrowedFd<'_>,
    source: &Path,
    target: &str,
    directory: bool,
    read_only: bool,
) -> Result<(), RuntimeError> {
    let fd = ensure_in_root(root, Path::new(target), directory)?;
    let path = fd_path(fd.as_fd());
    mount(
        Some(source),
        &path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err(format!(
        "binding {} on {target}",
        source.display()
    )))?;
    if read_only {
        remount_read_only(root, target)?;
    }
    Ok(())
}

/// Bind-remounts `target` read-only, keeping the flags the kernel locked.
fn remount_read_only(root: BorrowedFd<'_>, target: &str) -> Result<(), RuntimeError> {
    let fd = sys::open_in_root(root, Path::new(target), libc::O_PATH)
        .map_err(RuntimeError::io(format!("opening {target}")))?;
    let path = fd_path(fd.as_fd());
    let st = nix::sys::statvfs::statvfs(&path).map_err(mount_err(format!("statvfs {target}")))?;
    // Nothing read-only the host hands in is a place to run or find
    // setuid files or devices (but a /dev/null mask stays a device).
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NOEXEC;
    let is_device =
        nix::sys::stat::fstat(&fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFCHR);
    if !is_device {
        flags |= MsFlags::MS_NODEV;
    }
    use nix::sys::statvfs::FsFlags;
    for (have, set) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if st.flags().contains(have) {
            flags |= set;
        }
    }
    mount(None::<&str>, &path, None::<&str>, flags, None::<&str>)
        .map_err(mount_err(format!("remounting {target} read-only")))
}

const SAFE: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// tmpfs options that make the guest's root own a file system the host's
/// root mounts for it.
fn guest_owner() -> String {
    let id = GUEST_ROOT.load(std::sync::atomic::Ordering::Relaxed);
    format!("uid={id},gid={id}")
}

fn mount_proc(root: BorrowedFd<'_>) -> Result<(), RuntimeError> {
    mount_fs(root, "/proc", "proc", SAFE, None)?;
    // The machine has its own network namespace, so its net sysctls stay
    // writable: bound on itself first, it survives as a writable submount
    // when /proc/sys is made read-only below.
    bind_onto_itself(root, "/proc/sys/net")?;
    for path in PROC_READ_ONLY {
        let target = format!("/proc/{path}");
        if bind_onto_itself(root, &target)? {
            remount_read_only(root, &target)?;
        }
    }
    for path in PROC_MASKED {
        let target = format!("/proc/{path}");
        if sys::open_in_root(root, Path::new(&target), libc::O_PATH).is_ok() {
            bind(root, Path::new("/dev/null"), &target, false, true)?;
        }
    }
    Ok(())
}

/// Bind-mounts an existing path on itself (so it can get its own flags).
/// Returns false when the path does not exist.
fn bind_onto_itself(root: BorrowedFd<'_>, target: &str) -> Result<bool, RuntimeError> {
    let Ok(fd) = sys::open_in_root(root, Path::new(target), libc::O_PATH) else {
        return Ok(false);
    };
    let path = fd_path(fd.as_fd());
    mount(
        Some(&path),
        &path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err(format!("binding {target} on itself")))?;
    Ok(true)
}

fn mount_sys(root: BorrowedFd<'_>) -> Result<(), RuntimeError> {
    mount_fs(root, "/sys", "sysfs", SAFE | MsFlags::MS_RDONLY, None)?;
    // systemd needs a writable, delegated cgroup2 tree; the cgroup namespace
    // makes the machine's own cgroup its root.
    mount_fs(root, "/sys/fs/cgroup", "cgroup2", SAFE, Some("nsdelegate"))
        .or_else(|_| mount_fs(root, "/sys/fs/cgroup", "cgroup2", SAFE, None))
}

fn mount_dev(
    root: BorrowedFd<'_>,
    console_slave: &Path,
    allowed: &[PathBuf],
) -> Result<(), RuntimeError> {
    mount_fs(
        root,
        "/dev",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(format!("mode=0755,size=4m,{}", guest_owner()).as_str()),
    )?;
    for node in DEVICE_NODES {
        bind(
            root,
            &Path::new("/dev").join(node),
            &format!("/dev/{node}"),
            false,
            false,
        )?;
    }
    mount_fs(
        root,
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        // Owner ids are the mounter's (host) ids: the guest's tty group.
        Some(
            format!(
                "newinstance,ptmxmode=0666,mode=0620,gid={}",
                GUEST_ROOT.load(std::sync::atomic::Ordering::Relaxed) + 5
            )
            .as_str(),
        ),
    )?;
    mount_fs(
        root,
        "/dev/shm",
        "tmpfs",
        SAFE,
        Some(format!("mode=1777,{}", guest_owner()).as_str()),
    )?;
    mount_fs(root, "/dev/mqueue", "mqueue", SAFE, None)?;
    bind(root, console_slave, "/dev/console", false, false)?;
    for node in allowed {
        add_device_node(root, node)?;
    }
    let dev = sys::open_in_root(root, Path::new("/dev"), libc::O_DIRECTORY | libc::O_RDONLY)
        .map_err(RuntimeError::io("opening /dev"))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        as_guest_root(|| nix::unistd::symlinkat(target, dev.as_fd(), link))
            .map_err(mount_err(format!("creating /dev/{link}")))?;
    }
    Ok(())
}

/// Makes a node like the host's `node` at the same path in the machine's
/// /dev (a tmpfs of the host's user namespace, where nodes are live),
/// owned by the guest's root with the host node's mode.
fn add_device_node(root: BorrowedFd<'_>, node: &Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::MetadataExt;
    let err = |what: &str| RuntimeError::io(format!("{what} device {}", node.display()));
    let meta = fs::metadata(node).map_err(err("looking up"))?;
    let (Some(parent), Some(name)) = (node.parent(), node.file_name()) else {
        return Err(RuntimeError::Child(format!(
            "bad device path {}",
            node.display()
        )));
    };
    let dir = ensure_in_root(root, parent, true)?;
    let dir = sys::reopen(dir.as_fd(), libc::O_DIRECTORY | libc::O_RDONLY)
        .map_err(err("opening the directory of"))?;
    let kind = nix::sys::stat::SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
    let perm = nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o777);
    nix::sys::stat::mknodat(dir.as_fd(), name, kind, perm, meta.rdev())
        .map_err(|e| err("creating")(e.into()))?;
    let owner = GUEST_ROOT.load(std::sync::atomic::Ordering::Relaxed);
    nix::unistd::fchownat(
        dir.as_fd(),
        name,
        Some(owner.into()),
        Some(owner.into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| err("giving the guest")(e.into()))
}

fn mount_run(root: BorrowedFd<'_>, host_dir: &Path) -> Result<(), RuntimeError> {
    mount_fs(
        root,
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("mode=0755,{}", guest_owner()).as_str()),
    )?;
    bind(root, host_dir, "/run/host", true, true)?;
    // Some guests expect /run/lock; systemd creates the rest itself.
    ensure_in_root(root, Path::new("/run/lock"), true).map(drop)
}

/// Gives a private machine whose /etc/resolv.conf is missing or empty the
/// generated one from /run/host (read-only). A symlink, even a dangling
/// one, belongs to the guest's own resolver and is left alone.
fn set_resolv_conf(plan: &MachinePlan, root: BorrowedFd<'_>) -> Result<(), RuntimeError> {
    if plan.network.is_none() {
        return Ok(());
    }
    let Ok(etc) = sys::open_in_root(root, Path::new("/etc"), libc::O_PATH | libc::O_DIRECTORY)
    else {
        return Ok(());
    };
    match guestfile::entry_kind(etc.as_fd(), "resolv.conf") {
        None if plan.definition.read_only => return Ok(()),
        None => {}
        Some("regular file") => {
            let empty = guestfile::read(root, Path::new("/etc/resolv.conf"), 1)
                .map(|d| d.is_empty())
                .unwrap_or(false);
            if !empty {
                return Ok(());
            }
        }
        // A symlink or anything else is the guest's own business.
        Some(_) => return Ok(()),
    }
    let file = plan
        .machine_dir
        .join(paths::HOST_DIR)
        .join(paths::RESOLV_CONF);
    bind(root, &file, "/etc/resolv.conf", false, true)
}

/// Gives a guest whose /etc/machine-id is missing or empty the id of
/// [`machine_id`] (also its `container_uuid`), bind-mounted over it without
/// writing the image; a guest symlink there is never followed (nor created
/// through). Except where systemd is init on a writable root.
/// There, as under systemd-nspawn, nothing is mounted: systemd takes
/// `container_uuid` on its first boot and systemd-machine-id-commit writes
/// it to the tree, which it cannot do through a mount it may not unmount
/// (ours is locked: the unit failed with EINVAL and the guest came up
/// degraded).
fn set_machine_id(
    plan: &MachinePlan,
    init: InitKind,
    root: BorrowedFd<'_>,
) -> Result<(), RuntimeError> {
    // An image is only ever a lower layer: its machines' roots are
    // writable overlays unless read_only.
    if init == InitKind::Systemd && !plan.definition.read_only {
        return Ok(());
    }
    let Ok(etc) = sys::open_in_root(root, Path::new("/etc"), libc::O_PATH | libc::O_DIRECTORY)
    else {
        return Ok(());
    };
    match guestfile::entry_kind(etc.as_fd(), "machine-id") {
        Some("regular file") => {
            let current =
                guestfile::read_text(root, Path::new("/etc/machine-id"), guestfile::SMALL)
                    .unwrap_or_default();
            if current.trim().len() == 32 {
                return Ok(());
            }
        }
        // Nowhere to mount it; the guest gets `container_uuid` instead.
        None if plan.definition.read_only => return Ok(()),
        None => {}
        Some(_) => return Ok(()),
    }
    let file = plan.machine_dir.join(paths::HOST_DIR).join("machine-id");
    bind(root, &file, "/etc/machine-id", false, true)
}

fn pivot_into(new_root: &Path) -> Result<(), RuntimeError> {
    nix::unistd::chdir(new_root).map_err(mount_err("chdir to the new root".into()))?;
    nix::unistd::pivot_root(".", ".").map_err(mount_err("pivot_root".into()))?;
    nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)
        .map_err(mount_err("detaching the old root".into()))?;
    nix::unistd::chdir("/").map_err(mount_err("chdir /".into()))
}

fn attach_console() -> Result<(), RuntimeError> {
    nix::unistd::setsid().map_err(mount_err("setsid".into()))?;
    let console = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(RuntimeError::io("opening /dev/console"))?;
    sys::set_controlling_tty(console.as_fd())
        .map_err(RuntimeError::io("TIOCSCTTY on /dev/console"))?;
    nix::unistd::dup2_stdin(&console)
        .and_then(|()| nix::unistd::dup2_stdout(&console))
        .and_then(|()| nix::unistd::dup2_stderr(&console))
        .map_err(mount_err("dup2 console".into()))?;
    Ok(())
}

fn guest_environment(plan: &MachinePlan) -> Result<Vec<CString>, RuntimeError> {
    let id = machine_id(plan);
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("container".into(), "rmachines".into()),
        ("container_uuid".into(), uuid_form(&id)),
        ("NOTIFY_SOCKET".into(), "/run/host/notify".into()),
        ("HOME".into(), "/root".into()),
        ("TERM".into(), "vt220".into()),
    ];
    for (key, value) in &plan.definition.environment {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env.into_iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<_, _>>()
        .map_err(|_| RuntimeError::Child("environment contains a NUL byte".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_machine_id_is_stable_hex_and_differs_by_name() {
        let a = derived_machine_id("web");
        assert_eq!(a, derived_machine_id("web"));
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, derived_machine_id("web2"));
        assert_eq!(uuid_form(&a).len(), 36);
    }

    #[test]
    fn stop_signal_fits_the_init() {
        let rtmin3 = libc::SIGRTMIN() + 3;
        assert_eq!(
            stop_signal(InitKind::Systemd, StopSignal::Auto, true),
            rtmin3
        );
        assert_eq!(
            stop_signal(InitKind::Busybox, StopSignal::Auto, true),
            libc::SIGUSR2
        );
        assert_eq!(
            stop_signal(InitKind::Other, StopSignal::Auto, true),
            libc::SIGTERM
        );
        assert_eq!(
            stop_signal(InitKind::Systemd, StopSignal::Auto, false),
            libc::SIGTERM
        );
        assert_eq!(
            stop_signal(InitKind::Busybox, StopSignal::Signal(9), true),
            9
        );
    }

    #[test]
    fn a_root_under_a_closed_directory_is_not_exposed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("machines/web");
        fs::create_dir_all(&root).unwrap();
        let mode = |p: &Path, m| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        mode(dir.path(), 0o755);
        mode(&dir.path().join("machines"), 0o755);
        if dir
            .path()
            .ancestors()
            .skip(1)
            .all(|a| fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
        {
            let err = check_root_not_exposed(&root).unwrap_err();
            assert!(err.to_string().contains("chmod 0700"), "{err}");
        }
        mode(&dir.path().join("machines"), 0o700);
        check_root_not_exposed(&root).unwrap();
    }

    #[test]
    fn readiness_waits_only_for_systemd_on_auto() {
        assert!(waits_for_ready(InitKind::Systemd, NotifyReady::Auto));
        assert!(!waits_for_ready(InitKind::Busybox, NotifyReady::Auto));
        assert!(waits_for_ready(InitKind::Other, NotifyReady::Yes));
        assert!(!waits_for_ready(InitKind::Systemd, NotifyReady::No));
    }
}
