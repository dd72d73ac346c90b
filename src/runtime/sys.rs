//! Thin wrappers for the kernel calls that neither nix nor libc wrap:
//! clone3, the new mount API, openat2, pidfds. All `unsafe` of the runtime
//! lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

fn cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `struct clone_args` from linux/sched.h (version 2, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The result of a fork-like clone: in the parent, the child's pid and pidfd.
pub enum Forked {
    Parent { pid: libc::pid_t, pidfd: OwnedFd },
    Child,
}

/// Forks into new namespaces with `clone3`, the child starting in `cgroup`
/// (so a new cgroup namespace is rooted there). Like fork(2), both return.
///
/// The caller must be single-threaded (the supervisor is): the child goes on
/// running Rust code that allocates.
pub fn clone3_fork(namespaces: libc::c_int, cgroup: BorrowedFd<'_>) -> io::Result<Forked> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: namespaces as u64 | libc::CLONE_PIDFD as u64 | CLONE_INTO_CGROUP,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3(2) with no stack behaves like fork(2): the child gets a
    // copy of the address space. `args` and `pidfd` outlive the call; the
    // kernel writes only `pidfd`. The caller guarantees single-threadedness.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    let pid = check(ret)?;
    if pid == 0 {
        return Ok(Forked::Child);
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a new, owned descriptor.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Forked::Parent {
        pid: pid as libc::pid_t,
        pidfd,
    })
}

/// `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | AT_RECURSIVE)`: a detached copy
/// of the mount tree at `path`.
pub fn open_tree_clone(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32;
    // SAFETY: open_tree(2) reads the NUL-terminated path; it returns a new fd.
    let ret = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    let fd = check(ret)?;
    // SAFETY: the fd was just returned to us and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `mount_setattr(2)` on a whole detached tree: set `attr_set` (e.g.
/// `MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY`), mapping through `userns` if given,
/// and make every mount of it private.
///
/// A clone of a shared mount joins its peer group (`open_tree(2)` copies
/// the propagation of the source), so on a host whose `/` is shared (every
/// systemd host) whatever the machine later mounts on the tree would
/// propagate back into the host's mount namespace.
pub fn mount_setattr_tree(
    tree: BorrowedFd<'_>,
    attr_set: u64,
    userns: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: userns.map(|fd| fd.as_raw_fd() as u64).unwrap_or(0),
    };
    let empty = c"";
    // SAFETY: `attr` is a valid mount_attr of the size we pass; the path is an
    // empty C string used with AT_EMPTY_PATH on a descriptor we own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &mut attr as *mut libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    check(ret).map(|_| ())
}

/// `move_mount(2)` of a detached tree onto the directory (or file) `target`.
pub fn move_mount_to_fd(tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
    let empty = c"";
    // SAFETY: both descriptors are valid for the call; empty paths with the
    // *_EMPTY_PATH flags refer to the descriptors themselves.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    check(ret).map(|_| ())
}

/// How often [`open_in_root`] retries an `EAGAIN` from openat2.
const OPENAT2_RETRIES: u32 = 1000;

/// `openat2(dir, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: opens
/// `path` as if `dir` were the root, so a guest's symlinks cannot lead outside.
pub fn open_in_root(dir: BorrowedFd<'_>, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let c = cstring(rel)?;
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // EAGAIN: a mount or rename raced with a `..` in the path; openat2(2)
    // says to retry. Bounded, so a host under constant churn still ends.
    let mut attempts = 0;
    let fd = loop {
        // SAFETY: openat2(2) reads `how` (of the size passed) and the path.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                c.as_ptr(),
                &mut how as *mut libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        match check(ret) {
            Err(err) if err.raw_os_error() == Some(libc::EAGAIN) && attempts < OPENAT2_RETRIES => {
                attempts += 1;
            }
            other => break other?,
        }
    };
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_open(2)`.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = check(ret)?;
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`: no pid-reuse race.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall; a null siginfo means "as kill(2)".
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    check(ret).map(|_| ())
}

/// `setns(2)` into every namespace of the process behind `pidfd` in one call.
pub fn setns_pidfd(pidfd: BorrowedFd<'_>, namespaces: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on a valid pidfd.
    let ret = unsafe { libc::setns(pidfd.as_raw_fd(), namespaces) };
    check(ret as libc::c_long).map(|_| ())
}

/// How a process behind a pidfd ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// Shell convention: the code, or 128+N for death by signal N.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(sig) => 128 + sig,
        }
    }
}

/// `waitid(P_PIDFD, WEXITED | WNOHANG)`: `None` while the child runs.
pub fn waitid_pidfd(pidfd: BorrowedFd<'_>, nohang: bool) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data; waitid fills it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: `info` is a valid siginfo_t for the kernel to write.
        let ret = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                flags,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        break;
    }
    // SAFETY: after a successful waitid the pid/status fields are initialised.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        ExitStatus::Exited(status)
    } else {
        ExitStatus::Signaled(status)
    }))
}

/// Installs a classic BPF seccomp filter without setting `no_new_privs`
/// (allowed because the caller holds CAP_SYS_ADMIN in its user namespace).
pub fn seccomp_install(filter: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as libc::c_ushort,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel
    // copies the program.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    check(ret).map(|_| ())
}

/// `TIOCGPTPEER`: opens the slave of a pty master without a path lookup.
pub fn open_pty_peer(master: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    const TIOCGPTPEER: libc::c_ulong = 0x5441;
    // SAFETY: ioctl on a valid pty master; returns a new descriptor.
    let ret = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let fd = check(ret as libc::c_long)?;
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `unlockpt(3)` by ioctl, on a master opened from some devpts' ptmx.
pub fn unlock_pty(master: BorrowedFd<'_>) -> io::Result<()> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer.
    let ret = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) };
    check(ret as libc::c_long).map(|_| ())
}

/// Makes `fd` the controlling terminal of the calling session leader.
pub fn set_controlling_tty(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal).
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) };
    check(ret as libc::c_long).map(|_| ())
}

/// Sets the window size of a terminal.
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    check(ret as libc::c_long).map(|_| ())
}

/// `prctl(PR_SET_DUMPABLE, 0)`: keeps a guest from opening our /proc files
/// (and through /proc/PID/exe our binary) while we work inside its namespaces.
pub fn set_non_dumpable() -> io::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    let ret = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    check(ret as libc::c_long).map(|_| ())
}

/// Gives the process the signal state a freshly started program expects:
/// every disposition the default and nothing blocked. Our binary starts
/// with SIGPIPE ignored (Rust's runtime does that) and the supervisor
/// blocks what it reads from a signalfd; both survive exec, and a guest
/// command that ignores SIGPIPE spins on EPIPE instead of ending when its
/// reader goes away (`yes | head -1`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn reset_signals() -> io::Result<()> {
    // The kernel's struct sigaction (x86-64 and aarch64 layout): the raw
    // call reaches the real-time signals glibc reserves for itself, which
    // a parent may have left ignored as well.
    #[repr(C)]
    struct KernelSigaction {
        handler: libc::sighandler_t,
        flags: libc::c_ulong,
        restorer: libc::c_ulong,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads one kernel sigaction of the size
        // passed (8 bytes of mask); SIG_DFL refers to no handler code.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
    nix::sys::signal::SigSet::empty()
        .thread_set_mask()
        .map_err(io::Error::from)
}

/// See the x86-64 version; here only the signals glibc lets us reset.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn reset_signals() -> io::Result<()> {
    for sig in 1..libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: SIG_DFL refers to no handler code; numbers glibc
            // reserves fail with EINVAL and stay as they are.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    nix::sys::signal::SigSet::empty()
        .thread_set_mask()
        .map_err(io::Error::from)
}

/// `prctl(PR_SET_PDEATHSIG, sig)`.
pub fn set_parent_death_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    let ret = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) };
    check(ret as libc::c_long).map(|_| ())
}

/// Closes every descriptor from `first` up, except those in `keep`.
pub fn close_fds_from(first: RawFd, keep: &[RawFd]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first && !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: closing descriptors this process will never use again; the
        // read_dir handle is already dropped.
        unsafe { libc::close(fd) };
    }
}

/// Opens the inode behind an `O_PATH` descriptor for I/O, without a new
/// path lookup (through the descriptor's /proc/self/fd entry).
pub fn reopen(handle: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = CString::new(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "fd path"))?;
    // SAFETY: open(2) reads the NUL-terminated path; it returns a new fd.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    check(fd as libc::c_long)?;
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BpfProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BpfProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `BPF_PROG_LOAD` of a cgroup device program; with `log`, the verifier
/// writes its reasons there.
fn load_device_program(insns: &[BpfInsn], log: Option<&mut [u8]>) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let (log_level, log_size, log_buf) = match log {
        Some(log) => (1, log.len() as u32, log.as_mut_ptr() as u64),
        None => (0, 0, 0),
    };
    let load = BpfProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level,
        log_size,
        log_buf,
        ..BpfProgLoad::default()
    };
    // SAFETY: bpf(2) reads `load` (of the size passed), the instructions and
    // the license it points at, and writes at most log_size bytes of log
    // (none when log_buf is null).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &load as *const BpfProgLoad,
            std::mem::size_of::<BpfProgLoad>(),
        )
    };
    // SAFETY: a new descriptor owned by nobody else.
    check(ret).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Loads `insns` as a `BPF_PROG_TYPE_CGROUP_DEVICE` program and attaches it
/// to `cgroup` (cgroup2) with `BPF_F_ALLOW_MULTI`, so programs attached
/// above and below all have to allow an access.
pub fn attach_device_program(cgroup: BorrowedFd<'_>, insns: &[BpfInsn]) -> io::Result<()> {
    // Without a log first: the verifier's log (level 1) prints its state at
    // every instruction, which made the load cost about a millisecond per
    // start. Only a refused program is loaded again, for the log's reason.
    let prog = match load_device_program(insns, None) {
        Ok(prog) => prog,
        Err(err) => {
            let mut log = vec![0u8; 4096];
            let text = match load_device_program(insns, Some(&mut log)) {
                Ok(_) => String::new(),
                Err(_) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    String::from_utf8_lossy(&log[..end]).into_owned()
                }
            };
            return Err(io::Error::new(
                err.kind(),
                format!("loading the device program: {err}; verifier: {text}"),
            ));
        }
    };
    let attach = BpfProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    // SAFETY: bpf(2) reads `attach`; both descriptors are valid for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attach as *const BpfProgAttach,
            std::mem::size_of::<BpfProgAttach>(),
        )
    };
    check(ret).map(|_| ())
}

/// `setns(2)` with a namespace descriptor.
pub fn setns(ns: BorrowedFd<'_>, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    let ret = unsafe { libc::setns(ns.as_raw_fd(), nstype) };
    check(ret as libc::c_long).map(|_| ())
}

/// Becomes `uid`/`gid` with `groups`, for the calling thread only, by the
/// raw system calls. glibc's wrappers change every thread of the process
/// (POSIX), signalling each one in its thread list and waiting for it; in
/// a child cloned from a multi-threaded parent that list still names the
/// parent's threads, which never answer, and the child hangs for ever.
/// Our clone children are single-threaded, so the raw calls are exact.
/// It allocates nothing, so a child of a multi-threaded parent may call it.
pub fn switch_ids(uid: u32, gid: u32, groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: setgroups reads `groups.len()` gids from the pointer, which
    // points at that many (and is unused when the length is 0).
    check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })?;
    // SAFETY: plain system calls with integer arguments.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) })?;
    // SAFETY: as above.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) })?;
    Ok(())
}

/// `keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`: a new anonymous session
/// keyring of the calling process's own, instead of the inherited one.
pub fn join_new_session_keyring() -> io::Result<()> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: a null name asks for a new anonymous keyring.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    check(ret).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Children forked by a raw clone while another thread of the parent
    /// is starting threads (as the supervisor may be, starting its cgroup
    /// attach thread) change their ids and go on. glibc's setgroups waits
    /// for every thread it knows to have started: in such a child, one
    /// caught half-created in the parent never does, and the child hung.
    #[test]
    fn switch_ids_returns_in_a_raw_clone_of_a_threaded_parent() {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::{Duration, Instant};
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test runs as root (setgroups needs CAP_SETGID)"
        );
        static STOP: AtomicBool = AtomicBool::new(false);
        let spawner = std::thread::spawn(|| {
            while !STOP.load(Ordering::Relaxed) {
                let _ = std::thread::spawn(|| {}).join();
            }
        });
        let mut children = Vec::new();
        for _ in 0..300 {
            // SAFETY: a raw fork (no glibc fork handlers): the child only
            // makes system calls and leaves with _exit, touching no lock.
            let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            if pid == 0 {
                let code = i32::from(switch_ids(0, 0, &[0]).is_err());
                // SAFETY: leave the child without the parent's handlers.
                unsafe { libc::_exit(code) }
            }
            assert!(pid > 0, "clone: {}", io::Error::last_os_error());
            children.push(nix::unistd::Pid::from_raw(pid as libc::pid_t));
        }
        STOP.store(true, Ordering::Relaxed);
        let _ = spawner.join();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut hung = 0;
        for pid in children {
            let status = loop {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Ok(WaitStatus::StillAlive) => {
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        let _ = waitpid(pid, None);
                        hung += 1;
                        break Ok(WaitStatus::StillAlive);
                    }
                    other => break other,
                }
            };
            if status != Ok(WaitStatus::StillAlive) {
                assert_eq!(status, Ok(WaitStatus::Exited(pid, 0)));
            }
        }
        assert_eq!(hung, 0, "children hung changing their ids");
    }
}
