//! The capability bounding set and the seccomp filter every guest process
//! runs under.

use std::collections::{BTreeMap, HashSet};

use caps::{CapSet, Capability};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

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

/// System calls no container may make. `reboot` is not here: in a PID
/// namespace it only ends the guest's init (SIGHUP: reboot, SIGINT: power off),
/// which is how guest `poweroff` and `reboot` reach the supervisor.
pub const DENIED_SYSCALLS: &[(&str, libc::c_long)] = &[
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("syslog", libc::SYS_syslog),
    ("quotactl", libc::SYS_quotactl),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("vhangup", libc::SYS_vhangup),
];

/// Builds the filter: the denied calls fail with EPERM, all else is allowed.
pub fn seccomp_program() -> Result<BpfProgram, RuntimeError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = DENIED_SYSCALLS
        .iter()
        .map(|(_, nr)| (*nr, Vec::new()))
        .collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|err| RuntimeError::Setup {
        step: "building the seccomp filter".into(),
        message: format!("unsupported architecture: {err}"),
    })?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|err| RuntimeError::Setup {
        step: "building the seccomp filter".into(),
        message: err.to_string(),
    })?;
    filter
        .try_into()
        .map_err(|err: seccompiler::BackendError| RuntimeError::Setup {
            step: "compiling the seccomp filter".into(),
            message: err.to_string(),
        })
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
    fn filter_compiles_and_denies_the_listed_calls() {
        let program = seccomp_program().expect("filter builds");
        assert!(program.len() > DENIED_SYSCALLS.len());
        let numbers: HashSet<i64> = DENIED_SYSCALLS.iter().map(|(_, nr)| *nr).collect();
        assert_eq!(numbers.len(), DENIED_SYSCALLS.len(), "no call listed twice");
        assert!(
            !numbers.contains(&libc::SYS_reboot),
            "reboot must stay allowed"
        );
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
