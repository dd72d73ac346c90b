//! The machine's device policy: which device nodes its processes may open,
//! enforced by the kernel for every node whatever its path.
//!
//! A `BPF_PROG_TYPE_CGROUP_DEVICE` program is attached to the machine's
//! cgroup on the unified (cgroup2) hierarchy, as systemd, runc and crun do.
//! The kernel runs the programs of a task's cgroup on the default hierarchy
//! for every open and mknod of a device node, on a unified host and on a
//! hybrid one alike (cgroup-bpf lives on the default hierarchy; the v1
//! `devices` controller, where mounted, is checked in addition). The guest
//! cannot detach or replace it: `bpf(2)` needs privileges of the host's
//! user namespace, the seccomp filter refuses it anyway, and a program
//! attached below the machine's cgroup can only narrow what this one allows
//! (`BPF_F_ALLOW_MULTI`: every program on the path must allow).

use std::os::fd::BorrowedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::sys::{self, BpfInsn};
use super::RuntimeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    Block,
    Char,
}

/// Devices of one type whose major lies in `majors` and whose minor is
/// `minor` (any when None).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub kind: DeviceType,
    pub majors: (u32, u32),
    pub minor: Option<u32>,
}

const fn char_dev(major: u32, minor: u32) -> DeviceRule {
    DeviceRule {
        kind: DeviceType::Char,
        majors: (major, major),
        minor: Some(minor),
    }
}

/// What every machine may open: the nodes of its own /dev.
pub const DEFAULT_ALLOWED: &[DeviceRule] = &[
    char_dev(1, 3), // null
    char_dev(1, 5), // zero
    char_dev(1, 7), // full
    char_dev(1, 8), // random
    char_dev(1, 9), // urandom
    char_dev(5, 0), // tty
    char_dev(5, 1), // console
    char_dev(5, 2), // ptmx
    // Unix98 pty slaves: the machine's devpts and its console (a slave of
    // the host's devpts, whose master rmachined holds).
    DeviceRule {
        kind: DeviceType::Char,
        majors: (136, 143),
        minor: None,
    },
];

/// The rule for a host device node named in `[devices] allow`.
pub fn rule_for(path: &Path) -> Result<DeviceRule, RuntimeError> {
    let meta = std::fs::metadata(path).map_err(RuntimeError::io(format!(
        "looking up the allowed device {} on the host",
        path.display()
    )))?;
    let kind = if meta.file_type().is_char_device() {
        DeviceType::Char
    } else if meta.file_type().is_block_device() {
        DeviceType::Block
    } else {
        return Err(RuntimeError::Setup {
            step: format!("allowing device {}", path.display()),
            message: "it is not a device node on the host; fix [devices] allow".into(),
        });
    };
    let rdev = meta.rdev();
    let major = libc::major(rdev);
    Ok(DeviceRule {
        kind,
        majors: (major, major),
        minor: Some(libc::minor(rdev)),
    })
}

/// Attaches the machine's device policy to its cgroup: the defaults plus
/// the host nodes of `extra`.
pub fn restrict(cgroup: BorrowedFd<'_>, extra: &[PathBuf]) -> Result<(), RuntimeError> {
    let mut rules = DEFAULT_ALLOWED.to_vec();
    for path in extra {
        rules.push(rule_for(path)?);
    }
    sys::attach_device_program(cgroup, &program(&rules)).map_err(RuntimeError::io(
        "attaching the device policy (BPF_CGROUP_DEVICE) to the machine's cgroup",
    ))
}

// eBPF opcodes (linux/bpf_common.h, linux/bpf.h).
const LDX_MEM_W: u8 = 0x61;
const ALU32_AND_K: u8 = 0x54;
const ALU32_RSH_K: u8 = 0x74;
const JMP_JNE_K: u8 = 0x55;
const JMP_JLT_K: u8 = 0xa5;
const JMP_JGT_K: u8 = 0x25;
const ALU64_MOV_K: u8 = 0xb7;
const JMP_EXIT: u8 = 0x95;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The program: `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major;
/// u32 minor; }` in r1, the device type in the low 16 bits of access_type.
/// Returns 1 (allow) when a rule matches, else 0.
pub fn program(rules: &[DeviceRule]) -> Vec<BpfInsn> {
    let mut out = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0), // r2 = access_type
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0), // r3 = access (unused: all allowed)
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0), // r4 = major
        insn(LDX_MEM_W, 5, 1, 8, 0), // r5 = minor
    ];
    for rule in rules {
        let kind = match rule.kind {
            DeviceType::Block => 1,
            DeviceType::Char => 2,
        };
        let mut tests = vec![(JMP_JNE_K, 2, kind)];
        if rule.majors.0 == rule.majors.1 {
            tests.push((JMP_JNE_K, 4, rule.majors.0 as i32));
        } else {
            tests.push((JMP_JLT_K, 4, rule.majors.0 as i32));
            tests.push((JMP_JGT_K, 4, rule.majors.1 as i32));
        }
        if let Some(minor) = rule.minor {
            tests.push((JMP_JNE_K, 5, minor as i32));
        }
        // Each failed test skips the rest of this rule: its remaining
        // tests and the two instructions that allow.
        let count = tests.len();
        for (i, (code, reg, imm)) in tests.into_iter().enumerate() {
            let skip = (count - i - 1 + 2) as i16;
            out.push(insn(code, reg, 0, skip, imm));
        }
        out.push(insn(ALU64_MOV_K, 0, 0, 0, 1));
        out.push(insn(JMP_EXIT, 0, 0, 0, 0));
    }
    out.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    out.push(insn(JMP_EXIT, 0, 0, 0, 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter of exactly the instructions [`program`] emits.
    fn run(prog: &[BpfInsn], kind: u32, major: u32, minor: u32) -> u64 {
        let ctx = [kind | (6 << 16), major, minor];
        let mut reg = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            assert_eq!(src == 1, i.code == LDX_MEM_W, "only loads read r1");
            let mut next = pc + 1;
            let taken = |cond: bool| if cond { i.off as usize } else { 0 };
            match i.code {
                LDX_MEM_W => reg[dst] = ctx[i.off as usize / 4] as u64,
                ALU32_AND_K => reg[dst] &= i.imm as u64,
                ALU32_RSH_K => reg[dst] >>= i.imm,
                ALU64_MOV_K => reg[dst] = i.imm as u64,
                JMP_JNE_K => next += taken(reg[dst] != i.imm as u64),
                JMP_JLT_K => next += taken(reg[dst] < i.imm as u64),
                JMP_JGT_K => next += taken(reg[dst] > i.imm as u64),
                JMP_EXIT => return reg[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc = next;
        }
    }

    #[test]
    fn the_program_allows_exactly_the_default_nodes() {
        let prog = program(DEFAULT_ALLOWED);
        for (major, minor) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 1),
            (5, 2),
        ] {
            assert_eq!(run(&prog, 2, major, minor), 1, "c {major}:{minor}");
            assert_eq!(run(&prog, 1, major, minor), 0, "b {major}:{minor}");
        }
        for major in 136..=143 {
            assert_eq!(run(&prog, 2, major, 77), 1, "pty slave {major}");
        }
        for (kind, major, minor) in [
            (1, 8, 0),    // sda
            (1, 253, 0),  // a virtio disk
            (2, 1, 1),    // /dev/mem
            (2, 1, 2),    // /dev/kmem
            (2, 10, 229), // fuse, not asked for
            (2, 4, 1),    // a host tty
            (2, 135, 0),
            (2, 144, 0),
        ] {
            assert_eq!(run(&prog, kind, major, minor), 0, "{kind} {major}:{minor}");
        }
    }

    #[test]
    fn extra_rules_add_their_node_only() {
        let mut rules = DEFAULT_ALLOWED.to_vec();
        rules.push(char_dev(10, 229));
        let prog = program(&rules);
        assert_eq!(run(&prog, 2, 10, 229), 1);
        assert_eq!(run(&prog, 2, 10, 200), 0);
        assert_eq!(run(&prog, 1, 10, 229), 0);
    }

    #[test]
    fn a_host_node_maps_to_its_numbers() {
        let rule = rule_for(Path::new("/dev/null")).unwrap();
        assert_eq!(rule, char_dev(1, 3));
        assert!(rule_for(Path::new("/etc/hostname")).is_err());
    }
}
