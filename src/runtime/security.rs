//! The capability bounding set and the seccomp filter every guest process
//! runs under.

use std::collections::HashSet;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use caps::{CapSet, Capability};

use libseccomp::{ScmpAction, ScmpArch, ScmpFilterContext, ScmpSyscall};
use seccompiler::BpfProgram;

use super::{sys, RuntimeError};

/// systemd-nspawn's default bounding set, plus CAP_NET_ADMIN: every machine
/// has a network namespace of its own to administer.
pub const KEPT_CAPABILITIES: &[Capability] = &[
    Capability::CAP_AUDIT_CONTROL,
    Capability::CAP_AUDIT_WRITE,
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_IPC_OWNER,
    Capability::CAP_KILL,
    Capability::CAP_LEASE,
    Capability::CAP_LINUX_IMMUTABLE,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_BROADCAST,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETGID,
    Capability::CAP_SETPCAP,
    Capability::CAP_SETUID,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_BOOT,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_SYS_NICE,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_SYS_RESOURCE,
    Capability::CAP_SYS_TTY_CONFIG,
];

/// System calls a machine may make, in the spirit of systemd-nspawn's
/// allow-list (`nspawn-seccomp.c`): the ordinary process, file, network,
/// IPC, signal, time-reading and memory calls, plus what a container's
/// root uses inside its own namespaces (mount API, namespaces, hostname,
/// chroot) and what the kept capabilities cover (ptrace with
/// CAP_SYS_PTRACE, scheduling and memory policy with CAP_SYS_NICE, reboot
/// with CAP_SYS_BOOT: in a PID namespace it only ends the guest's init,
/// which is how guest `poweroff` and `reboot` reach the supervisor).
/// Names unknown to an architecture are skipped for it.
pub const ALLOWED_SYSCALLS: &[&str] = &[
    // process
    "arch_prctl",
    "capget",
    "capset",
    "clone",
    "clone3",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "fork",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getsid",
    "gettid",
    "kill",
    "pidfd_open",
    "pidfd_send_signal",
    "prctl",
    "prlimit64",
    "getrlimit",
    "setrlimit",
    "ugetrlimit",
    "getrusage",
    "personality",
    "rseq",
    "set_tid_address",
    "set_thread_area",
    "get_thread_area",
    "setpgid",
    "setsid",
    "tgkill",
    "tkill",
    "vfork",
    "wait4",
    "waitid",
    "waitpid",
    "seccomp",
    "restart_syscall",
    "getcpu",
    "times",
    "uname",
    "sysinfo",
    "getrandom",
    "get_robust_list",
    "set_robust_list",
    "membarrier",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "map_shadow_stack",
    "process_mrelease",
    "ioprio_get",
    "ioprio_set",
    "getpriority",
    "setpriority",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    // credentials (inside the user namespace)
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getuid",
    "getuid32",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setuid",
    "setuid32",
    // files
    "access",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "close",
    "close_range",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futimesat",
    "getcwd",
    "getdents",
    "getdents64",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "ioctl",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "memfd_create",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "name_to_handle_at",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pipe",
    "pipe2",
    "pread64",
    "preadv",
    "preadv2",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "rmdir",
    "sendfile",
    "sendfile64",
    "setxattr",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "tee",
    "truncate",
    "truncate64",
    "umask",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vmsplice",
    "write",
    "writev",
    "cachestat",
    // I/O events and asynchronous I/O
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "poll",
    "ppoll",
    "ppoll_time64",
    "pselect6",
    "pselect6_time64",
    "select",
    "_newselect",
    "signalfd",
    "signalfd4",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "io_setup",
    "io_submit",
    // memory
    "brk",
    "madvise",
    "mincore",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mremap",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "remap_file_pages",
    "memfd_secret",
    "mseal",
    "get_mempolicy",
    "set_mempolicy",
    "set_mempolicy_home_node",
    "mbind",
    "migrate_pages",
    "move_pages",
    "process_madvise",
    // signals and time (reading it, sleeping, timers)
    "alarm",
    "getitimer",
    "setitimer",
    "pause",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sigaction",
    "sigaltstack",
    "signal",
    "sigpending",
    "sigprocmask",
    "sigreturn",
    "sigsuspend",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "gettimeofday",
    "nanosleep",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "futex_wait",
    "futex_wake",
    "futex_requeue",
    // network
    "accept",
    "accept4",
    "bind",
    "connect",
    "getpeername",
    "getsockname",
    "getsockopt",
    "listen",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "send",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setsockopt",
    "shutdown",
    "socket",
    "socketcall",
    "socketpair",
    // System V and POSIX IPC (the machine's own IPC namespace)
    "ipc",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    // a container's root in its own namespaces (CAP_SYS_ADMIN, CAP_SYS_CHROOT)
    "chroot",
    "pivot_root",
    "mount",
    "umount",
    "umount2",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "setns",
    "unshare",
    "sethostname",
    "setdomainname",
    "statmount",
    "listmount",
    // CAP_SYS_PTRACE
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    // CAP_SYS_BOOT: ends the machine's init only
    "reboot",
];

/// Calls refused with EPERM, not just left out (those get ENOSYS, so that
/// a program falls back as on an older kernel): the host's kernel state,
/// not namespaced, or a channel between machines.
pub const REFUSED_SYSCALLS: &[&str] = &[
    // the keyring is not namespaced: a channel to the host and between
    // machines; request_key would run the host's /sbin/request-key
    "add_key",
    "keyctl",
    "request_key",
    // kernel programs, tracing and whole-system monitoring
    "bpf",
    "perf_event_open",
    "fanotify_init",
    "fanotify_mark",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // the host's kernel, devices, clock and accounting
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "swapon",
    "swapoff",
    "acct",
    "iopl",
    "ioperm",
    "open_by_handle_at",
    "lookup_dcookie",
    "syslog",
    "quotactl",
    "quotactl_fd",
    "settimeofday",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    "vhangup",
    "nfsservctl",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "modify_ldt",
    "vm86",
    "vm86old",
];

/// Bumped whenever [`build_program`] changes what it makes of the same lists
/// (the lists themselves and libseccomp's version are in the cache key).
const FILTER_BUILD: u32 = 2;

/// The largest cached filter accepted (the real one is about 8 KiB).
const MAX_CACHED_FILTER: u64 = 256 * 1024;

static PRELOADED: OnceLock<BpfProgram> = OnceLock::new();

/// The filter every guest process gets: the one [`preload_seccomp`] loaded
/// into this process (or the process it was forked or cloned from), else
/// built now.
pub fn seccomp_program() -> Result<BpfProgram, RuntimeError> {
    match PRELOADED.get() {
        Some(program) => Ok(program.clone()),
        None => build_program(),
    }
}

/// Loads the filter for this process from the cache in `dir` (rmachined's
/// state directory), building it and writing the cache if it is missing or
/// unusable. libseccomp takes 6 to 9 ms to build the filter, which every
/// start and every shell paid; reading the cache costs tens of
/// microseconds. Call it before entering a machine's mount namespace (the
/// cache is a host path). A cache that cannot be read or written only costs
/// the build.
pub fn preload_seccomp(dir: &Path) -> Result<(), RuntimeError> {
    if PRELOADED.get().is_some() {
        return Ok(());
    }
    let path = cache_path(dir);
    let program = match read_cached(&path) {
        Some(program) => program,
        None => {
            let program = build_program()?;
            if let Err(err) = write_cached(dir, &path, &program) {
                tracing::debug!(path = %path.display(), %err, "cannot cache the seccomp filter");
            }
            program
        }
    };
    let _ = PRELOADED.set(program);
    Ok(())
}

/// `DIR/seccomp-KEY.bpf`, KEY a hash of everything the filter is made of.
fn cache_path(dir: &Path) -> PathBuf {
    let mut hasher = std::hash::DefaultHasher::new();
    FILTER_BUILD.hash(&mut hasher);
    ALLOWED_SYSCALLS.hash(&mut hasher);
    REFUSED_SYSCALLS.hash(&mut hasher);
    format!("{:?}", ScmpArch::native()).hash(&mut hasher);
    if let Ok(version) = libseccomp::ScmpVersion::current() {
        (version.major, version.minor, version.micro).hash(&mut hasher);
    }
    dir.join(format!("seccomp-{:016x}.bpf", hasher.finish()))
}

/// The cached filter, if it is a plain file that only this user can have
/// written, of a plausible size: anything else is rebuilt.
fn read_cached(path: &Path) -> Option<BpfProgram> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    let trusted = meta.is_file()
        && meta.uid() == nix::unistd::geteuid().as_raw()
        && meta.mode() & 0o022 == 0
        && meta.len() > 0
        && meta.len() <= MAX_CACHED_FILTER
        && meta.len() % 8 == 0;
    if !trusted {
        return None;
    }
    let mut bytes = Vec::new();
    Read::by_ref(&mut file)
        .take(MAX_CACHED_FILTER + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (bytes.len() as u64 == meta.len()).then(|| to_program(&bytes))
}

/// Writes the cache atomically (0600) and removes the caches of other keys
/// (an older build or libseccomp).
fn write_cached(dir: &Path, path: &Path, program: &BpfProgram) -> std::io::Result<()> {
    let mut temp = tempfile::Builder::new()
        .prefix(".seccomp-")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    let bytes: Vec<u8> = program
        .iter()
        .flat_map(|insn| {
            let mut raw = [0u8; 8];
            raw[0..2].copy_from_slice(&insn.code.to_ne_bytes());
            raw[2] = insn.jt;
            raw[3] = insn.jf;
            raw[4..8].copy_from_slice(&insn.k.to_ne_bytes());
            raw
        })
        .collect();
    temp.write_all(&bytes)?;
    temp.persist(path).map_err(|e| e.error)?;
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("seccomp-") && name.ends_with(".bpf") && entry.path() != path {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn to_program(bytes: &[u8]) -> BpfProgram {
    bytes
        .chunks_exact(8)
        .map(|insn| seccompiler::sock_filter {
            code: u16::from_ne_bytes([insn[0], insn[1]]),
            jt: insn[2],
            jf: insn[3],
            k: u32::from_ne_bytes([insn[4], insn[5], insn[6], insn[7]]),
        })
        .collect()
}

/// Builds the filter with libseccomp: the native ABI and, on x86_64, the
/// i386 one, each filtered by name (a 32-bit guest binary works as a 64-bit
/// one does); x32 calls, and those of any other ABI, fail with ENOSYS.
/// Rules are laid out as a binary tree (libseccomp's optimize level 2): a
/// guest system call passes about ten comparisons rather than up to
/// several hundred.
fn build_program() -> Result<BpfProgram, RuntimeError> {
    let err = |step: &str| {
        let step = step.to_owned();
        move |e: libseccomp::error::SeccompError| RuntimeError::Setup {
            step,
            message: e.to_string(),
        }
    };
    let mut ctx = ScmpFilterContext::new(ScmpAction::Errno(libc::ENOSYS))
        .map_err(err("creating the seccomp filter"))?;
    // Installed by us without no_new_privs (see confine).
    ctx.set_ctl_nnp(false)
        .map_err(err("seccomp filter attributes"))?;
    ctx.set_act_badarch(ScmpAction::Errno(libc::ENOSYS))
        .map_err(err("seccomp filter attributes"))?;
    ctx.set_filter_attr(libseccomp::ScmpFilterAttr::CtlOptimize, 2)
        .map_err(err("seccomp filter attributes"))?;
    if ScmpArch::native() == ScmpArch::X8664 {
        ctx.add_arch(ScmpArch::X86)
            .map_err(err("adding the i386 ABI to the seccomp filter"))?;
    }
    for (names, action) in [
        (ALLOWED_SYSCALLS, ScmpAction::Allow),
        (REFUSED_SYSCALLS, ScmpAction::Errno(libc::EPERM)),
    ] {
        for name in names {
            // Unknown to this libseccomp, or to every ABI of the filter.
            let Ok(call) = ScmpSyscall::from_name(name) else {
                continue;
            };
            ctx.add_rule(action, call)
                .map_err(err(&format!("adding {name} to the seccomp filter")))?;
        }
    }
    Ok(to_program(&export(&ctx)?))
}

/// The filter as classic BPF (libseccomp 2.5 exports only to a descriptor).
fn export(ctx: &ScmpFilterContext) -> Result<Vec<u8>, RuntimeError> {
    use std::io::Seek;
    let fd = nix::sys::memfd::memfd_create(c"seccomp", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| RuntimeError::io("memfd for the seccomp filter")(e.into()))?;
    ctx.export_bpf(fd.as_fd())
        .map_err(|e| RuntimeError::Setup {
            step: "exporting the seccomp filter".into(),
            message: e.to_string(),
        })?;
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(RuntimeError::io("reading the seccomp filter"))?;
    Ok(bytes)
}

/// Drops every capability outside [`KEPT_CAPABILITIES`] from the bounding
/// set, clears the ambient and inheritable sets, and installs the seccomp
/// filter. `no_new_privs` stays off: a booted init needs setuid tools.
pub fn confine(program: &BpfProgram) -> Result<(), RuntimeError> {
    let keep: HashSet<Capability> = KEPT_CAPABILITIES.iter().copied().collect();
    for cap in caps::all() {
        if keep.contains(&cap) {
            continue;
        }
        caps::drop(None, CapSet::Bounding, cap).map_err(|err| RuntimeError::Setup {
            step: format!("dropping {cap} from the bounding set"),
            message: err.to_string(),
        })?;
    }
    caps::clear(None, CapSet::Ambient).map_err(|err| RuntimeError::Setup {
        step: "clearing ambient capabilities".into(),
        message: err.to_string(),
    })?;
    caps::clear(None, CapSet::Inheritable).map_err(|err| RuntimeError::Setup {
        step: "clearing inheritable capabilities".into(),
        message: err.to_string(),
    })?;
    let filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|insn| libc::sock_filter {
            code: insn.code,
            jt: insn.jt,
            jf: insn.jf,
            k: insn.k,
        })
        .collect();
    sys::seccomp_install(&filter).map_err(RuntimeError::io("installing the seccomp filter"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles_allows_and_refuses_on_purpose() {
        let program = build_program().expect("filter builds");
        assert!(program.len() > ALLOWED_SYSCALLS.len() / 2);
        let allowed: HashSet<&str> = ALLOWED_SYSCALLS.iter().copied().collect();
        let refused: HashSet<&str> = REFUSED_SYSCALLS.iter().copied().collect();
        assert_eq!(
            allowed.len(),
            ALLOWED_SYSCALLS.len(),
            "no call listed twice"
        );
        assert_eq!(
            refused.len(),
            REFUSED_SYSCALLS.len(),
            "no call listed twice"
        );
        assert!(allowed.is_disjoint(&refused));
        assert!(allowed.contains("reboot"), "reboot must stay allowed");
        for call in ["keyctl", "add_key", "request_key", "bpf", "perf_event_open"] {
            assert!(refused.contains(call), "{call}");
        }
    }

    #[test]
    fn the_cached_filter_is_the_built_one_and_a_bad_cache_is_rebuilt() {
        let dir = tempfile::tempdir().expect("temp dir");
        let built = build_program().expect("filter builds");
        let path = cache_path(dir.path());
        assert!(read_cached(&path).is_none());
        write_cached(dir.path(), &path, &built).expect("cache written");
        let meta = fs::metadata(&path).expect("cache file");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(read_cached(&path).as_ref(), Some(&built));
        // Writable by others, truncated, or a symlink: not used.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(read_cached(&path).is_none());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let bytes = fs::read(&path).expect("read");
        fs::write(&path, &bytes[..bytes.len() - 3]).expect("truncate");
        assert!(read_cached(&path).is_none());
        fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink("/etc/passwd", &path).expect("symlink");
        assert!(read_cached(&path).is_none());
        // A cache of another key goes when this one is written.
        let stale = dir.path().join("seccomp-0000000000000000.bpf");
        fs::write(&stale, b"12345678").expect("stale cache");
        fs::remove_file(&path).expect("rm");
        write_cached(dir.path(), &path, &built).expect("cache written");
        assert!(!stale.exists());
    }

    #[test]
    fn bounding_set_keeps_what_init_needs_and_not_module_loading() {
        assert!(KEPT_CAPABILITIES.contains(&Capability::CAP_SYS_ADMIN));
        assert!(KEPT_CAPABILITIES.contains(&Capability::CAP_SETUID));
        assert!(!KEPT_CAPABILITIES.contains(&Capability::CAP_SYS_MODULE));
        assert!(!KEPT_CAPABILITIES.contains(&Capability::CAP_SYS_RAWIO));
        assert!(!KEPT_CAPABILITIES.contains(&Capability::CAP_SYS_TIME));
    }
}
