//! The "enter" primitive: run a process inside a running machine, in all its
//! namespaces and its cgroup, as a user of the guest.
//!
//! The caller (possibly the multi-threaded daemon) resolves the user and then
//! runs `rmachined __enter`: a fresh single-threaded process that can safely
//! setns and fork. Its spec (command, environment) comes as JSON in a sealed
//! memfd on fd 3, never on its argv, which every local user can read in
//! `ps`; the helper makes itself non-dumpable before it reads it, so its
//! `/proc/PID/fd/3` and memory stay closed to other users too. It joins the machine through a pidfd of init
//! (one atomic setns for all namespaces), forks so the command is a member of
//! the PID namespace, drops to the user and execs. It waits for the command
//! and exits with its status (128+N for death by signal N).

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use super::{security, sys, MachinePlan, RuntimeError};

/// A user of the guest, from its /etc/passwd and /etc/group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: String,
}

/// What `__enter` does, passed as JSON on fd 3 ([`SPEC_FD`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnterSpec {
    pub leader: i32,
    pub cgroup: PathBuf,
    pub user: GuestUser,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    /// stdin is a terminal to make the controlling tty of the new session.
    pub controlling_tty: bool,
    /// Where the seccomp filter is cached (rmachined's state directory);
    /// without it the helper builds the filter itself.
    #[serde(default)]
    pub seccomp_cache: Option<PathBuf>,
}

/// The descriptor `__enter` reads its spec from.
pub const SPEC_FD: RawFd = 3;

/// Largest spec `__enter` reads (the bus boundary bounds command and
/// environment well below this).
const SPEC_LIMIT: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    #[error("the machine has no user {0:?} in its /etc/passwd")]
    NoSuchUser(String),
    #[error("the machine's user {user:?} has uid/gid {id}, outside the machine's id range 0..{size} (its [users] size); fix the guest's /etc/passwd or /etc/group")]
    OutOfRange { user: String, id: u32, size: u32 },
    #[error("the machine's init (pid {0}) is gone")]
    NotRunning(i32),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

fn read_guest_file(leader: i32, path: &str) -> Result<String, EnterError> {
    let root =
        File::open(format!("/proc/{leader}/root")).map_err(|_| EnterError::NotRunning(leader))?;
    super::guestfile::read_text(root.as_fd(), Path::new(path), super::guestfile::ACCOUNTS)
        .map_err(|e| EnterError::Runtime(e.into()))
}

/// Looks `user` (a name or a numeric uid; empty: root) up in the guest.
pub fn resolve_user(leader: i32, user: &str) -> Result<GuestUser, EnterError> {
    let passwd = read_guest_file(leader, "/etc/passwd")?;
    let group = read_guest_file(leader, "/etc/group").unwrap_or_default();
    parse_user(&passwd, &group, user)
}

/// Looks `user` (a name or a numeric uid; empty: root) up in the text of a
/// guest's /etc/passwd and /etc/group (both the guest's to write).
pub fn parse_user(passwd: &str, group: &str, user: &str) -> Result<GuestUser, EnterError> {
    let user = if user.is_empty() { "root" } else { user };
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .find(|f| f[0] == user || f[2] == user)
        .ok_or_else(|| EnterError::NoSuchUser(user.to_owned()))?;
    let (uid, gid) = match (entry[2].parse(), entry[3].parse()) {
        (Ok(uid), Ok(gid)) => (uid, gid),
        _ => return Err(EnterError::NoSuchUser(user.to_owned())),
    };
    let name = entry[0].to_owned();
    let groups = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m == name))
        .filter_map(|f| f[2].parse().ok())
        .collect();
    Ok(GuestUser {
        name,
        uid,
        gid,
        groups,
        home: entry[5].to_owned(),
        shell: if entry[6].is_empty() {
            "/bin/sh".into()
        } else {
            entry[6].to_owned()
        },
    })
}

/// Refuses a guest user whose uid, gid or groups fall outside the machine's
/// range: the host id `base + id` would belong to another machine (or
/// overflow), and the guest's passwd is the guest's to write.
pub fn check_ids(user: &GuestUser, size: u32) -> Result<(), EnterError> {
    let ids = [user.uid, user.gid]
        .into_iter()
        .chain(user.groups.iter().copied());
    match ids.into_iter().find(|id| *id >= size) {
        Some(id) => Err(EnterError::OutOfRange {
            user: user.name.clone(),
            id,
            size,
        }),
        None => Ok(()),
    }
}

/// The environment a shell gets: TERM, HOME, USER, LOGNAME, SHELL, PATH, then
/// the caller's `K=V` entries (which win; of several with one key, the last).
/// Linear in the number of entries.
pub fn environment(user: &GuestUser, term: &str, extra: &[String]) -> Vec<String> {
    let path = if user.uid == 0 {
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    } else {
        "/usr/local/bin:/usr/bin:/bin"
    };
    let defaults = [
        format!("TERM={term}"),
        format!("HOME={}", user.home),
        format!("USER={}", user.name),
        format!("LOGNAME={}", user.name),
        format!("SHELL={}", user.shell),
        format!("PATH={path}"),
        "container=rmachines".to_owned(),
    ];
    let key = |entry: &str| entry.split('=').next().unwrap_or_default().to_owned();
    let mut position = std::collections::HashMap::new();
    let mut env: Vec<Option<String>> = Vec::with_capacity(defaults.len() + extra.len());
    for entry in defaults.into_iter().chain(extra.iter().cloned()) {
        if let Some(old) = position.insert(key(&entry), env.len()) {
            env[old] = None;
        }
        env.push(Some(entry));
    }
    env.into_iter().flatten().collect()
}

/// Builds the `__enter` command for `argv` (empty: the user's login shell).
/// The caller sets stdio (a pty slave, pipes) and spawns it.
pub fn command(
    helper: &Path,
    plan: &MachinePlan,
    leader: u32,
    user: &str,
    argv: &[String],
    extra_env: &[String],
) -> Result<Command, EnterError> {
    let user = resolve_user(leader as i32, user)?;
    check_ids(&user, plan.ids.size)?;
    let spec = EnterSpec {
        leader: leader as i32,
        cgroup: plan.cgroup.clone(),
        env: environment(&user, "dumb", extra_env),
        argv: argv.to_vec(),
        user,
        controlling_tty: false,
        seccomp_cache: None,
    };
    Ok(spec_command(helper, &spec)?)
}

/// The `__enter` command for `spec`: the spec goes in a sealed memfd that
/// becomes the helper's fd 3. The caller sets stdio and spawns it.
pub fn spec_command(helper: &Path, spec: &EnterSpec) -> Result<Command, RuntimeError> {
    let json = serde_json::to_vec(spec)
        .map_err(|e| RuntimeError::Child(format!("encoding the enter spec: {e}")))?;
    let memfd = nix::sys::memfd::memfd_create(
        c"rmachines-enter-spec",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| RuntimeError::io("memfd_create for the enter spec")(e.into()))?;
    let mut file = File::from(memfd);
    file.write_all(&json)
        .and_then(|()| file.rewind())
        .map_err(RuntimeError::io("writing the enter spec"))?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::from_bits_truncate(seals)),
    )
    .map_err(|e| RuntimeError::io("sealing the enter spec")(e.into()))?;
    let spec_fd = OwnedFd::from(file);
    let mut command = Command::new(helper);
    command.arg("__enter").env_clear();
    // SAFETY: the closure runs in the forked child before exec and only
    // calls dup2(2) and fcntl(2), which are async-signal-safe; `spec_fd`
    // is open (moved into the closure, it lives as long as the Command).
    unsafe {
        command.pre_exec(move || {
            let raw = spec_fd.as_raw_fd();
            if raw == SPEC_FD {
                // dup2 onto itself keeps FD_CLOEXEC: clear it instead.
                if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, SPEC_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    Ok(command)
}

/// Reads the spec from fd 3 (see [`spec_command`]).
fn read_spec() -> Result<EnterSpec, String> {
    // SAFETY: fd 3 is the spec memfd `spec_command` placed there; nothing
    // else in this fresh process owns it.
    let file = unsafe { File::from_raw_fd(SPEC_FD) };
    let mut json = Vec::new();
    file.take(SPEC_LIMIT)
        .read_to_end(&mut json)
        .map_err(|e| format!("reading the spec on fd {SPEC_FD}: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("parsing the spec on fd {SPEC_FD}: {e}"))
}

/// `rmachined __enter` (spec on fd 3).
pub fn main(_args: &[String]) -> i32 {
    // Before the spec is read: no other user may read this process.
    if let Err(err) = sys::set_non_dumpable() {
        eprintln!("rmachined: entering the machine: PR_SET_DUMPABLE: {err}");
        return 127;
    }
    let spec = match read_spec() {
        Ok(spec) => spec,
        Err(err) => {
            eprintln!(
                "rmachined __enter: {err} (the daemon runs this helper; it takes no arguments)"
            );
            return 2;
        }
    };
    match enter(&spec) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("rmachined: entering the machine: {err}");
            127
        }
    }
}

fn enter(spec: &EnterSpec) -> Result<i32, RuntimeError> {
    // A host path: read before entering the machine's mount namespace.
    if let Some(dir) = &spec.seccomp_cache {
        security::preload_seccomp(dir)?;
    }
    let pidfd = sys::pidfd_open(spec.leader).map_err(RuntimeError::io(format!(
        "pidfd_open of the machine's init (pid {})",
        spec.leader
    )))?;
    // On a hybrid host the machine's limits are in its v1 cgroups too.
    super::resources::join_leader_v1(spec.leader)?;
    // Born in the machine's cgroup (clone3 CLONE_INTO_CGROUP) rather than
    // moved there: moving a process between cgroups waits for an RCU grace
    // period (20 ms here), which every shell would pay.
    // The machine's cgroup; if the guest made it a domain with controllers
    // (no process may live there) or it refuses us, the leader's own.
    let helper = nix::unistd::getpid();
    let forked = cgroup_candidates(&spec.cgroup, spec.leader)
        .into_iter()
        .find_map(|dir| sys::clone3_fork(0, dir.as_fd()).ok());
    let child = match forked {
        Some(sys::Forked::Child) => {
            // The daemon hangs a session up by killing this helper: the
            // intermediate goes with it (and the command gets SIGHUP).
            let code = if sys::set_parent_death_signal(libc::SIGKILL).is_err()
                || nix::unistd::getppid() != helper
            {
                127
            } else {
                enter_namespaces(spec, pidfd)
            };
            // SAFETY: leave the forked child without running the parent's
            // exit handlers.
            unsafe { libc::_exit(code) }
        }
        Some(sys::Forked::Parent { pid, .. }) => {
            release_stdio();
            Pid::from_raw(pid)
        }
        // No cgroup takes us: enter from here, in our own cgroup.
        None => return Ok(enter_namespaces(spec, pidfd)),
    };
    drop(pidfd);
    wait_exit_code(child)
}

/// The cgroups a command may be born in, best first: the machine's, then
/// the one its init lives in.
fn cgroup_candidates(cgroup: &Path, leader: i32) -> Vec<File> {
    let leader_cgroup = || {
        let rel = fs::read_to_string(format!("/proc/{leader}/cgroup"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))?;
        let mount = super::cgroup::cgroup2_mount().ok()?;
        File::open(mount.join(rel.trim_start_matches('/'))).ok()
    };
    File::open(cgroup)
        .ok()
        .into_iter()
        .chain(leader_cgroup())
        .collect()
}

/// Joins the machine's namespaces, forks into its PID namespace, runs the
/// command there and returns its exit code (128+N for signal N).
fn enter_namespaces(spec: &EnterSpec, pidfd: std::os::fd::OwnedFd) -> i32 {
    let result = (|| -> Result<i32, RuntimeError> {
        let namespaces = libc::CLONE_NEWUSER
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWCGROUP;
        sys::setns_pidfd(pidfd.as_fd(), namespaces)
            .map_err(RuntimeError::io("setns into the machine"))?;
        drop(pidfd);
        let program = security::seccomp_program()?;
        // SAFETY: this process is single-threaded (a fresh exec of the
        // helper, or its clone3 child), so the child may run ordinary Rust
        // code before exec.
        match unsafe { fork() }
            .map_err(|e| RuntimeError::io("fork into the PID namespace")(e.into()))?
        {
            ForkResult::Child => {
                let err = exec_as_user(spec, &program);
                eprintln!("rmachined: {err}");
                // SAFETY: leave the forked child without running the
                // parent's exit handlers.
                unsafe { libc::_exit(127) }
            }
            ForkResult::Parent { child } => {
                release_stdio();
                wait_exit_code(child)
            }
        }
    })();
    result.unwrap_or_else(|err| {
        eprintln!("rmachined: entering the machine: {err}");
        127
    })
}

/// A process that only waits lets go of the caller's descriptors, so the
/// command alone holds them: the reader of its stdout sees end of file when
/// the command closes it, as in a local pipe.
fn release_stdio() {
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2(2) onto the standard descriptors, which this
            // process owns; `null` stays open across the calls.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn wait_exit_code(child: Pid) -> Result<i32, RuntimeError> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(RuntimeError::io("waiting for the command")(e.into())),
        }
    }
}

fn exec_as_user(spec: &EnterSpec, program: &seccompiler::BpfProgram) -> RuntimeError {
    let result = (|| -> Result<std::convert::Infallible, RuntimeError> {
        let errno =
            |what: &'static str| move |e: nix::errno::Errno| RuntimeError::io(what)(e.into());
        nix::unistd::setsid().map_err(errno("setsid"))?;
        if spec.controlling_tty {
            sys::set_controlling_tty(stdin()).map_err(RuntimeError::io("TIOCSCTTY"))?;
        }
        let user = &spec.user;
        let groups: Vec<nix::unistd::Gid> = spec.user.groups.iter().map(|g| (*g).into()).collect();
        nix::unistd::setgroups(&groups).map_err(errno("setgroups"))?;
        nix::unistd::setresgid(user.gid.into(), user.gid.into(), user.gid.into())
            .map_err(errno("setresgid"))?;
        nix::unistd::setresuid(user.uid.into(), user.uid.into(), user.uid.into())
            .map_err(errno("setresuid"))?;
        // A session keyring of its own, not the daemon's.
        sys::join_new_session_keyring()
            .map_err(RuntimeError::io("joining a new session keyring"))?;
        // After the credential change, which clears it (prctl(2)): the
        // command is hung up when the helper above it dies.
        sys::set_parent_death_signal(libc::SIGHUP).map_err(RuntimeError::io("PR_SET_PDEATHSIG"))?;
        if nix::unistd::chdir(Path::new(&user.home)).is_err() {
            nix::unistd::chdir("/").map_err(errno("chdir /"))?;
        }
        // This helper ignores SIGPIPE (as every Rust program does): the
        // command starts with the default dispositions, like one run from
        // a shell, so `yes | head -1` ends.
        sys::reset_signals().map_err(RuntimeError::io("resetting signal dispositions"))?;
        security::confine(program)?;
        let login_shell = spec.argv.is_empty();
        let argv: Vec<String> = if login_shell {
            let base = Path::new(&user.shell)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            vec![format!("-{base}")]
        } else {
            spec.argv.clone()
        };
        let program_path = if login_shell {
            user.shell.clone()
        } else {
            argv[0].clone()
        };
        let to_c = |s: &String| {
            CString::new(s.as_bytes())
                .map_err(|_| RuntimeError::Child(format!("{s:?} contains a NUL byte")))
        };
        let c_argv = argv.iter().map(to_c).collect::<Result<Vec<_>, _>>()?;
        let c_env = spec.env.iter().map(to_c).collect::<Result<Vec<_>, _>>()?;
        let c_program = to_c(&program_path)?;
        if program_path.contains('/') {
            nix::unistd::execve(&c_program, &c_argv, &c_env)
        } else {
            nix::unistd::execvpe(&c_program, &c_argv, &c_env)
        }
        .map_err(|e| RuntimeError::io(format!("executing {program_path}"))(e.into()))
    })();
    match result {
        Err(err) => err,
        Ok(never) => match never {},
    }
}

fn stdin() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(0) }
}

/// Opens a new pty from the machine's own devpts (through its /dev/ptmx) and
/// gives the slave to the guest user (host ids `uid`, `tty_gid`).
/// Returns (master, slave).
pub fn open_guest_pty(
    leader: i32,
    uid: u32,
    tty_gid: u32,
) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), RuntimeError> {
    let root = File::open(format!("/proc/{leader}/root"))
        .map_err(RuntimeError::io("opening the machine's root"))?;
    let master = sys::open_in_root(
        root.as_fd(),
        Path::new("/dev/ptmx"),
        libc::O_RDWR | libc::O_NOCTTY,
    )
    .map_err(RuntimeError::io("opening the machine's /dev/ptmx"))?;
    sys::unlock_pty(master.as_fd()).map_err(RuntimeError::io("unlocking the pty"))?;
    let slave =
        sys::open_pty_peer(master.as_fd()).map_err(RuntimeError::io("opening the pty's slave"))?;
    nix::unistd::fchown(&slave, Some(uid.into()), Some(tty_gid.into()))
        .map_err(|e| RuntimeError::io("giving the pty to the user")(e.into()))?;
    Ok((master, slave))
}
