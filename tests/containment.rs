//! What a guest cannot do: one test per attack, each tried for real from
//! inside a booted guest as its root (or as an unprivileged host user where
//! that is the attacker), each asserting that the attack is refused and that
//! the machine is still usable afterwards. docs/design.md ("What a guest
//! cannot do, and why") maps each test to the mechanism that stops it.

mod support;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rmachines::runtime::protocol::MachineState;
use support::*;

const BOOT: Duration = Duration::from_secs(30);
const SCRATCH: &str = "/var/tmp/rmachines-contain";

/// A private copy of the busybox fixture that a test may plant things in,
/// removed on drop.
struct OwnTree {
    path: PathBuf,
}

impl OwnTree {
    fn new(name: &str) -> OwnTree {
        let path = Path::new(SCRATCH).join("trees").join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        close_scratch();
        let status = Command::new("cp")
            .arg("-a")
            .arg(fixture("busybox"))
            .arg(&path)
            .status()
            .expect("cp");
        assert!(status.success(), "copying the busybox fixture");
        OwnTree { path }
    }
}

impl Drop for OwnTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Machine roots live where host users cannot reach them.
fn close_scratch() {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(SCRATCH, std::fs::Permissions::from_mode(0o700)).unwrap();
}

fn boot(def: rmachines::definition::Definition) -> TestMachine {
    let mut m = TestMachine::launch(def);
    m.wait_state(MachineState::Running, BOOT);
    m
}

/// The machine still answers after an attack.
fn assert_usable(m: &TestMachine) {
    assert_eq!(m.sh("echo alive").trim(), "alive");
}

/// Runs `script` as the guest's root; returns (success, stdout+stderr).
fn try_sh(m: &TestMachine, script: &str) -> (bool, String) {
    let out = m.enter("", &["/bin/sh", "-c", script]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The enter primitive without the harness's `expect`: the lookup's error
/// is the assertion's subject.
fn try_enter(m: &TestMachine, user: &str, argv: &[&str]) -> Result<std::process::Output, String> {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let mut command =
        rmachines::runtime::enter::command(helper_binary(), &m.plan, m.leader(), user, &argv, &[])
            .map_err(|e| e.to_string())?;
    Ok(command.output().expect("run enter"))
}

fn guest_init_environment(m: &TestMachine) -> String {
    let raw = std::fs::read(format!("/proc/{}/environ", m.leader())).unwrap();
    String::from_utf8_lossy(&raw).replace('\0', "\n")
}

// ---- guest files are untrusted input ------------------------------------

#[test]
fn a_guest_machine_id_symlink_does_not_reveal_a_host_file() {
    let tree = OwnTree::new("mid-link");
    let secret = Path::new(SCRATCH).join("host-secret-machine-id");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let id = tree.path.join("etc/machine-id");
    std::fs::remove_file(&id).unwrap();
    symlink(&secret, &id).unwrap();
    let m = boot(definition("ct-mid-link", &tree.path));
    let seen = m.sh("cat /run/host/machine-id");
    assert!(
        !seen.contains("0123456789abcdef"),
        "host file leaked: {seen}"
    );
    let env = guest_init_environment(&m);
    assert!(
        !env.contains("01234567-89ab-cdef"),
        "host file leaked into container_uuid: {env}"
    );
    assert_usable(&m);
}

#[test]
fn a_dangling_guest_machine_id_symlink_creates_nothing_on_the_host() {
    let tree = OwnTree::new("mid-dangling");
    let target = Path::new(SCRATCH).join("created-by-guest");
    let _ = std::fs::remove_file(&target);
    let id = tree.path.join("etc/machine-id");
    std::fs::remove_file(&id).unwrap();
    symlink(&target, &id).unwrap();
    let m = boot(definition("ct-mid-dangling", &tree.path));
    assert!(
        !target.exists(),
        "setup created {} on the host",
        target.display()
    );
    assert_usable(&m);
}

#[test]
fn a_guest_machine_id_device_or_fifo_neither_hangs_nor_exhausts_memory() {
    let tree = OwnTree::new("mid-dev");
    let id = tree.path.join("etc/machine-id");
    std::fs::remove_file(&id).unwrap();
    nix::sys::stat::mknod(
        &id,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        nix::sys::stat::makedev(1, 5), // /dev/zero
    )
    .unwrap();
    let started = Instant::now();
    let m = boot(definition("ct-mid-dev", &tree.path));
    assert!(started.elapsed() < BOOT);
    assert_usable(&m);
    drop(m);
    std::fs::remove_file(&id).unwrap();
    nix::unistd::mkfifo(&id, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let m = boot(definition("ct-mid-fifo", &tree.path));
    assert_usable(&m);
}

#[test]
fn a_fifo_as_the_guest_passwd_does_not_wedge_a_shell() {
    let tree = OwnTree::new("passwd-fifo");
    let m = boot(definition("ct-passwd-fifo", &tree.path));
    m.sh("cp /etc/passwd /etc/passwd.real && rm /etc/passwd && mkfifo /etc/passwd");
    let started = Instant::now();
    let err = try_enter(&m, "", &["/bin/true"]).expect_err("a shell ran without a passwd");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the lookup blocked"
    );
    assert!(err.contains("FIFO, not a regular file"), "{err}");
    // Restored from the host side: the machine is still usable.
    std::fs::remove_file(tree.path.join("etc/passwd")).unwrap();
    std::fs::rename(
        tree.path.join("etc/passwd.real"),
        tree.path.join("etc/passwd"),
    )
    .unwrap();
    assert_usable(&m);
}

#[test]
fn a_guest_passwd_uid_outside_the_range_is_refused_at_shell_time() {
    let tree = OwnTree::new("passwd-range");
    let m = boot(definition("ct-passwd-range", &tree.path));
    m.sh("echo 'evil:x:4294967295:0::/:/bin/sh' >> /etc/passwd");
    m.sh("echo 'evil2:x:70000:0::/:/bin/sh' >> /etc/passwd");
    for user in ["evil", "evil2"] {
        let err = try_enter(&m, user, &["/bin/id", "-u"]).expect_err("ran out of range");
        assert!(err.contains("outside the machine's id range"), "{err}");
    }
    assert_usable(&m);
}

// ---- device policy ----------------------------------------------------------

/// The host's root file system's block device, as major:minor.
fn host_root_device() -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata("/").unwrap().dev();
    (nix::sys::stat::major(dev), nix::sys::stat::minor(dev))
}

#[test]
fn a_block_device_node_in_the_tree_is_dead_even_after_a_remount() {
    let tree = OwnTree::new("blockdev");
    let (major, minor) = host_root_device();
    nix::sys::stat::mknod(
        &tree.path.join("srv/disk"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(major, minor),
    )
    .unwrap();
    let m = boot(definition("ct-blockdev", &tree.path));
    let read = "head -c 512 /srv/disk 2>/dev/null | wc -c";
    assert_eq!(m.sh(read).trim(), "0", "read the host disk");
    // Guest root clears nodev where it can: the device policy still holds.
    let (_, out) = try_sh(
        &m,
        "mount -o remount,bind,dev /; grep ' / / ' /proc/self/mountinfo",
    );
    eprintln!("after the remount attempt: {out}");
    assert_eq!(m.sh(read).trim(), "0", "read the host disk after a remount");
    let (_, out) = try_sh(&m, "head -c 1 /srv/disk 2>&1 >/dev/null");
    assert!(
        out.contains("not permitted") || out.contains("denied"),
        "{out}"
    );
    // Its own /dev still works.
    assert_eq!(m.sh("head -c 4 /dev/zero | wc -c").trim(), "4");
    assert_usable(&m);
}

#[test]
fn the_device_policy_is_enforced_by_the_kernel_on_this_host() {
    // The program alone, on a scratch cgroup of the unified hierarchy: on a
    // hybrid host too, the kernel runs it for a task's default-hierarchy
    // cgroup.
    require_root();
    let cgroup = rmachines::runtime::cgroup::cgroup2_mount()
        .unwrap()
        .join(format!("rmachines-contain-devtest-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).unwrap();
    let dir = std::fs::File::open(&cgroup).unwrap();
    rmachines::runtime::devices::restrict(std::os::fd::AsFd::as_fd(&dir), &[]).unwrap();
    let (major, minor) = host_root_device();
    let node = Path::new(SCRATCH).join(format!("disk-{}", std::process::id()));
    let _ = std::fs::remove_file(&node);
    std::fs::create_dir_all(SCRATCH).unwrap();
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(major, minor),
    )
    .unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs; head -c 1 /dev/null && echo null-ok; head -c 1 {} >/dev/null",
        cgroup.display(),
        node.display()
    );
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&node);
    let _ = std::fs::remove_dir(&cgroup);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("null-ok"), "{stdout}{stderr}");
    assert!(
        !out.status.success(),
        "host root read the disk inside the policy"
    );
    assert!(stderr.contains("not permitted"), "{stderr}");
}

// ---- locked mount flags -----------------------------------------------------

/// The per-mount options of the guest's mount at `path` (mountinfo field 6).
fn mount_options(m: &TestMachine, path: &str) -> String {
    let info = m.sh("cat /proc/self/mountinfo");
    info.lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some(path))
        .and_then(|l| l.split_whitespace().nth(5).map(str::to_owned))
        .unwrap_or_else(|| panic!("no mount at {path} in the guest:\n{info}"))
}

fn has_flag(options: &str, flag: &str) -> bool {
    options.split(',').any(|o| o == flag)
}

/// Every restrictive flag rmachines sets on a mount survives guest root's
/// bind remount and plain remount.
#[test]
fn guest_root_cannot_clear_the_flags_rmachines_sets() {
    let m = boot(definition("ct-flags", &fixture("busybox")));
    let mounts = [
        ("/", &["nodev"][..]),
        ("/proc", &["nosuid", "nodev", "noexec"][..]),
        ("/proc/sys", &["ro", "nosuid", "nodev", "noexec"][..]),
        ("/sys", &["ro", "nosuid", "nodev", "noexec"][..]),
        ("/sys/fs/cgroup", &["nosuid", "nodev", "noexec"][..]),
        ("/dev", &["nosuid", "noexec"][..]),
        ("/dev/pts", &["nosuid", "noexec"][..]),
        ("/dev/shm", &["nosuid", "nodev", "noexec"][..]),
        ("/dev/mqueue", &["nosuid", "nodev", "noexec"][..]),
        ("/run", &["nosuid", "nodev"][..]),
        ("/run/host", &["ro", "nosuid", "nodev", "noexec"][..]),
    ];
    for (path, flags) in mounts {
        let before = mount_options(&m, path);
        for flag in flags {
            assert!(has_flag(&before, flag), "{path} lacks {flag}: {before}");
        }
        let (ok_bind, out_bind) = try_sh(
            &m,
            &format!("mount -o remount,bind,rw,suid,dev,exec {path}"),
        );
        let (_, out_plain) = try_sh(&m, &format!("mount -o remount,rw,suid,dev,exec {path}"));
        let after = mount_options(&m, path);
        for flag in flags {
            assert!(
                has_flag(&after, flag),
                "guest root cleared {flag} on {path}: {after} (bind remount ok={ok_bind}: {out_bind}; plain: {out_plain})"
            );
        }
    }
    // The masks and read-only views over /proc cannot be written through.
    let (ok, _) = try_sh(&m, "echo 1 > /proc/sys/kernel/sysrq");
    assert!(!ok, "wrote /proc/sys");
    assert_usable(&m);
}

#[test]
fn a_read_only_root_and_read_only_binds_stay_read_only() {
    let tree = OwnTree::new("ro");
    let shared = Path::new(SCRATCH).join("ro-bind");
    std::fs::create_dir_all(&shared).unwrap();
    let mut def = definition("ct-ro", &tree.path);
    def.read_only = true;
    def.binds.push(rmachines::definition::Bind {
        source: shared.clone(),
        target: PathBuf::from("/srv/shared"),
        read_only: true,
    });
    let m = boot(def);
    for (path, probe) in [("/", "/etc/pwned"), ("/srv/shared", "/srv/shared/pwned")] {
        let script = format!(
            "mount -o remount,bind,rw {path}; mount -o remount,rw {path}; echo x > {probe}"
        );
        let (ok, out) = try_sh(&m, &script);
        assert!(!ok, "wrote {probe} after remounting {path}: {out}");
        assert!(has_flag(&mount_options(&m, path), "ro"));
        // A new bind of it inherits the lock (or is refused outright).
        let script = format!(
            "mkdir -p /run/over && mount --rbind {path} /run/over || {{ echo refused; exit 0; }}; mount -o remount,bind,rw /run/over; echo x > /run/over/pwned-by-bind"
        );
        let (ok, out) = try_sh(&m, &script);
        assert!(
            !ok || out.contains("refused"),
            "wrote through a new bind of {path}: {out}"
        );
        let _ = try_sh(&m, "umount /run/over");
    }
    assert!(!tree.path.join("etc/pwned").exists());
    assert!(!shared.join("pwned").exists());
    assert!(!shared.join("pwned-by-bind").exists());
    assert_usable(&m);
}

#[test]
fn guest_root_cannot_umount_to_reveal_what_lies_below() {
    let m = boot(definition("ct-umount", &fixture("busybox")));
    for path in [
        "/proc/kcore",
        "/proc/sys",
        "/proc/sysrq-trigger",
        "/run/host",
        "/dev/console",
        "/sys/fs/cgroup",
        "/dev/shm",
    ] {
        let present = m.sh(&format!("grep -c ' {path} ' /proc/self/mountinfo || true"));
        if present.trim() == "0" {
            continue;
        }
        let (ok, out) = try_sh(&m, &format!("umount {path} || umount -l {path}"));
        assert!(!ok, "guest root unmounted {path}: {out}");
    }
    // Nor mount a fresh proc or sysfs without the masks and read-only views.
    for (fstype, target) in [("proc", "/mnt"), ("sysfs", "/mnt")] {
        let (ok, out) = try_sh(
            &m,
            &format!(
                "mount -t {fstype} {fstype} {target} && grep ' {target} ' /proc/self/mountinfo"
            ),
        );
        if ok {
            assert!(
                out.contains(" ro,") && fstype == "sysfs",
                "a fresh {fstype} was mounted writable: {out}"
            );
            let _ = try_sh(&m, &format!("umount {target}"));
        }
    }
    assert_usable(&m);
}

// ---- seccomp and keyring ------------------------------------------------------

/// A static x86-64 ELF whose code is `code`.
fn elf64(code: &[u8]) -> Vec<u8> {
    let base: u64 = 0x40_0000;
    let total = (64 + 56 + code.len()) as u64;
    let mut f = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend((base + 120).to_le_bytes()); // entry
    f.extend(64u64.to_le_bytes()); // phoff
    f.extend(0u64.to_le_bytes());
    f.extend(0u32.to_le_bytes());
    for v in [64u16, 56, 1, 0, 0, 0] {
        f.extend(v.to_le_bytes());
    }
    f.extend(1u32.to_le_bytes()); // PT_LOAD
    f.extend(5u32.to_le_bytes()); // R+X
    f.extend(0u64.to_le_bytes());
    f.extend(base.to_le_bytes());
    f.extend(base.to_le_bytes());
    f.extend(total.to_le_bytes());
    f.extend(total.to_le_bytes());
    f.extend(0x1000u64.to_le_bytes());
    f.extend(code);
    f
}

/// A static i386 ELF whose code is `code`.
fn elf32(code: &[u8]) -> Vec<u8> {
    let base: u32 = 0x0804_8000;
    let total = (52 + 32 + code.len()) as u32;
    let mut f = vec![0x7f, b'E', b'L', b'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    f.extend(2u16.to_le_bytes());
    f.extend(3u16.to_le_bytes()); // i386
    f.extend(1u32.to_le_bytes());
    f.extend((base + 84).to_le_bytes());
    f.extend(52u32.to_le_bytes());
    f.extend(0u32.to_le_bytes());
    f.extend(0u32.to_le_bytes());
    for v in [52u16, 32, 1, 0, 0, 0] {
        f.extend(v.to_le_bytes());
    }
    for v in [1u32, 0, base, base, total, total, 5, 0x1000] {
        f.extend(v.to_le_bytes());
    }
    f.extend(code);
    f
}

/// x86-64: `syscall(nr, a1, a2, 0)`, then exit with its errno (0 on success).
fn call64(nr: u32, a1: u32, a2: u32) -> Vec<u8> {
    let mut c = vec![0xb8];
    c.extend(nr.to_le_bytes());
    c.push(0xbf);
    c.extend(a1.to_le_bytes());
    c.push(0xbe);
    c.extend(a2.to_le_bytes());
    c.extend([0x31, 0xd2, 0x0f, 0x05]); // xor edx,edx; syscall
    c.extend([
        0x48, 0x85, 0xc0, 0x79, 0x04, 0xf7, 0xd8, 0xeb, 0x02, 0x31, 0xc0,
    ]);
    c.extend([0x89, 0xc7, 0xb8, 60, 0, 0, 0, 0x0f, 0x05]); // exit(eax)
    c
}

/// i386: `int 0x80` call `nr(a1, a2, 0)`, then exit with its errno.
fn call32(nr: u32, a1: u32, a2: u32) -> Vec<u8> {
    let mut c = vec![0xb8];
    c.extend(nr.to_le_bytes());
    c.push(0xbb);
    c.extend(a1.to_le_bytes());
    c.push(0xb9);
    c.extend(a2.to_le_bytes());
    c.extend([0x31, 0xd2, 0xcd, 0x80]); // xor edx,edx; int 0x80
    c.extend([0x85, 0xc0, 0x79, 0x04, 0xf7, 0xd8, 0xeb, 0x02, 0x31, 0xc0]);
    c.extend([0x89, 0xc3, 0xb8, 1, 0, 0, 0, 0xcd, 0x80]); // exit(eax)
    c
}

const KEY_SPEC_SESSION_KEYRING: u32 = -3i32 as u32;

#[test]
fn the_keyring_bpf_and_perf_are_refused_in_every_abi_and_i386_works() {
    use std::os::unix::fs::PermissionsExt;
    let tree = OwnTree::new("seccomp");
    let programs: [(&str, Vec<u8>, i32); 6] = [
        // keyctl(KEYCTL_GET_KEYRING_ID, session): refused, EPERM
        (
            "keyctl64",
            elf64(&call64(250, 0, KEY_SPEC_SESSION_KEYRING)),
            libc::EPERM,
        ),
        // add_key / request_key with bad pointers: refused before the kernel looks
        ("request_key64", elf64(&call64(249, 0, 0)), libc::EPERM),
        ("perf64", elf64(&call64(298, 0, 0)), libc::EPERM),
        // i386 is filtered like native, not killed: getpid works...
        ("getpid32", elf32(&call32(20, 0, 0)), 0),
        // ...and keyctl (i386 number 288) is refused there too
        (
            "keyctl32",
            elf32(&call32(288, 0, KEY_SPEC_SESSION_KEYRING)),
            libc::EPERM,
        ),
        // x32 (getpid with __X32_SYSCALL_BIT): denied
        ("x32", elf64(&call64(0x4000_0000 | 39, 0, 0)), libc::ENOSYS),
    ];
    for (name, bytes, _) in &programs {
        let path = tree.path.join("bin").join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let m = boot(definition("ct-seccomp", &tree.path));
    for (name, _, errno) in &programs {
        let out = try_enter(&m, "", &[&format!("/bin/{name}")]).unwrap();
        assert_eq!(
            out.status.code(),
            Some(*errno),
            "{name}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Init too runs under the filter, with a session keyring not the
    // daemon's: the host's keyring is out of reach either way.
    let status = std::fs::read_to_string(format!("/proc/{}/status", m.leader())).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert_usable(&m);
}

// ---- no host-exposed guest trees ----------------------------------------------

#[test]
fn a_reachable_root_is_refused_with_the_directory_to_chmod() {
    use std::os::unix::fs::PermissionsExt;
    let open = Path::new("/var/tmp/rmachines-contain-open");
    let _ = std::fs::remove_dir_all(open);
    std::fs::create_dir_all(open).unwrap();
    std::fs::set_permissions(open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = open.join("web");
    let status = Command::new("cp")
        .arg("-a")
        .arg(fixture("busybox"))
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success());
    let mut m = TestMachine::launch(definition("ct-exposed", &root));
    let status = m.wait_state(MachineState::Failed, BOOT);
    assert!(
        status
            .error
            .contains("reachable by unprivileged host users")
            && status
                .error
                .contains(&format!("chmod 0700 {}", open.display())),
        "{}",
        status.error
    );
    drop(m);
    // The opt-out boots it.
    let mut def = definition("ct-exposed-ok", &root);
    def.allow_exposed_root = true;
    let m = boot(def);
    assert_usable(&m);
    drop(m);
    let _ = std::fs::remove_dir_all(open);
}

#[test]
fn a_guest_setuid_file_is_out_of_reach_of_host_users() {
    let tree = OwnTree::new("setuid");
    let m = boot(definition("ct-setuid", &tree.path));
    m.sh("cp /bin/busybox /srv/suid && chmod 4755 /srv/suid");
    // The attacker: an unprivileged host user.
    let out = {
        use std::os::unix::process::CommandExt;
        Command::new(tree.path.join("srv/suid"))
            .args(["id", "-u"])
            .uid(65534)
            .gid(65534)
            .output()
    };
    match out {
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}"),
        Ok(out) => panic!(
            "a host user ran the guest's setuid file: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        ),
    }
    assert_usable(&m);
}

// ---- console log and host files -------------------------------------------------

#[test]
fn a_guest_flooding_its_console_fills_no_more_than_the_cap() {
    use std::os::unix::fs::PermissionsExt;
    let m = boot(definition("ct-console", &fixture("busybox")));
    let dir = &m.plan.machine_dir;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir), 0o700, "machine directory");
    assert_eq!(mode(&dir.join("console.log")), 0o600, "console log");
    // 3 x the cap through the console.
    let cap = rmachines::runtime::supervisor::CONSOLE_LOG_MAX;
    let blocks = 3 * cap / 65536;
    m.sh(&format!(
        "dd if=/dev/zero bs=65536 count={blocks} 2>/dev/null | tr '\\0' x > /dev/console"
    ));
    std::thread::sleep(Duration::from_millis(500));
    let log = std::fs::metadata(dir.join("console.log")).unwrap().len();
    let rotated = std::fs::metadata(dir.join("console.log.1"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(
        log <= cap && rotated <= cap,
        "log {log}, rotated {rotated}, cap {cap}"
    );
    assert!(rotated > 0, "never rotated");
    assert_eq!(mode(&dir.join("console.log.1")), 0o600);
    // The notify socket is the guest root's alone.
    let notify = dir.join("host/notify");
    assert_eq!(mode(&notify), 0o600);
    let (ok, _) = {
        let out = try_enter(
            &m,
            "user",
            &["/bin/sh", "-c", "echo READY=1 | nc -U -u /run/host/notify"],
        );
        (out.map(|o| o.status.success()).unwrap_or(false), ())
    };
    assert!(!ok, "a guest user could write the notify socket");
    assert_usable(&m);
}

// ---- uid ranges -----------------------------------------------------------------

#[test]
fn a_picked_range_avoids_ids_host_processes_run_with() {
    use rmachines::runtime::idrange::{assign_range, release_range, HostIdFiles};
    use std::os::unix::process::CommandExt;
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let host = HostIdFiles {
        passwd: empty.clone(),
        group: empty.clone(),
        subuid: empty.clone(),
        subgid: empty,
    };
    let storage = dir.path().join("storage");
    let users = rmachines::definition::Users {
        base: rmachines::definition::UidBase::Pick,
        size: 65536,
    };
    let name = "ct-range-probe";
    let natural = assign_range(&storage, name, &users, &host).unwrap();
    release_range(&storage, name).unwrap();
    // Another container manager's process runs in that range, unrecorded.
    let mut squatter = Command::new("sleep")
        .arg("30")
        .uid(natural.base + 1000)
        .gid(natural.base + 1000)
        .spawn()
        .unwrap();
    let picked = assign_range(&storage, name, &users, &host);
    let _ = squatter.kill();
    let _ = squatter.wait();
    let picked = picked.unwrap();
    assert_ne!(
        picked.base, natural.base,
        "picked a range a host process runs in"
    );
}
