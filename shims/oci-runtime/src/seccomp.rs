//! Why the kernel refused a container's seccomp filter.
//!
//! libseccomp reports every failure of the kernel's `seccomp(2)` as `ECANCELED` ("a system
//! failure beyond the control of libseccomp"), and the container's init tells this process only
//! libcontainer's "failed to load seccomp context". When a create or exec fails that way, this
//! compiles the same filter here (as libcontainer does, without loading it) and names the
//! kernel's refusal that applies: no `no_new_privs` and no `CAP_SYS_ADMIN` where the filter is
//! loaded (`EACCES`), or more BPF instructions than one filter may have (`EINVAL`).

use std::collections::HashSet;

use libseccomp::error::SeccompError;
use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext};
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall};

use crate::spec::FilterLoader;

/// libcontainer's message for a filter the kernel refused (`SeccompError::LoadContext`); the
/// init's error reaches this process as text only.
pub(crate) const LOAD_FAILED: &str = "failed to load seccomp context";

/// The most instructions the kernel takes in one filter (`BPF_MAXINSNS`).
pub const MAX_INSTRUCTIONS: usize = 4096;

/// `CAP_SYS_ADMIN`'s bit in `/proc/self/status`'s `CapEff`.
const CAP_SYS_ADMIN: u32 = 21;

/// Which of the kernel's refusals applies to a filter it did not load.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "it is loaded without no_new_privs and without CAP_SYS_ADMIN, which the kernel refuses (EACCES)"
    )]
    Privilege,
    #[error(
        "it compiles to {instructions} BPF instructions and the kernel takes at most {MAX_INSTRUCTIONS} in one filter (EINVAL): the profile has too many rules"
    )]
    TooLong { instructions: usize },
    #[error(
        "the kernel gave no reason (libseccomp reports every refusal as ECANCELED); the filter compiles to {instructions} BPF instructions"
    )]
    Unknown { instructions: usize },
    #[error("the kernel gave no reason, and the filter could not be compiled here to say more")]
    Compile(#[source] CompileError),
}

/// Why [`instructions`] could not count.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("libseccomp")]
    Libseccomp(#[from] SeccompError),
    #[error("the program's memfd")]
    Memfd(#[from] rustix::io::Errno),
}

impl Refusal {
    /// Whether the profile itself must change (the caller's to fix).
    pub fn is_the_profiles(&self) -> bool {
        matches!(self, Refusal::TooLong { .. })
    }
}

/// Why the kernel refused `seccomp`, loaded by `loader`.
pub fn diagnose(seccomp: &LinuxSeccomp, loader: FilterLoader) -> Refusal {
    let permitted = match loader {
        FilterLoader::NoNewPrivs => true,
        FilterLoader::Runtime { user_ns } => user_ns || has_cap_sys_admin(),
        FilterLoader::Container { cap_sys_admin } => cap_sys_admin,
    };
    if !permitted {
        return Refusal::Privilege;
    }
    match instructions(seccomp) {
        Ok(instructions) if instructions > MAX_INSTRUCTIONS => Refusal::TooLong { instructions },
        Ok(instructions) => Refusal::Unknown { instructions },
        Err(e) => Refusal::Compile(e),
    }
}

/// Whether this process holds `CAP_SYS_ADMIN` in its effective set.
fn has_cap_sys_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:")))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|eff| eff & (1 << CAP_SYS_ADMIN) != 0)
}

/// The length of the BPF program libseccomp makes of `seccomp`.
pub fn instructions(seccomp: &LinuxSeccomp) -> Result<usize, CompileError> {
    let ctx = compile(seccomp)?;
    let fd = rustix::fs::memfd_create(c"yard-seccomp-bpf", rustix::fs::MemfdFlags::CLOEXEC)?;
    ctx.export_bpf(&fd)?;
    let size = rustix::fs::fstat(&fd)?.st_size;
    // One `struct sock_filter` is 8 bytes.
    Ok(usize::try_from(size).unwrap_or(0) / 8)
}

/// The filter as libcontainer 0.7's `initialize_seccomp` builds it before loading it: rules with
/// the default action and calls libseccomp does not know are skipped, conditions on the same
/// argument become separate rules (as runc does). Load flags do not change the program.
fn compile(seccomp: &LinuxSeccomp) -> Result<ScmpFilterContext, SeccompError> {
    let default = action(seccomp.default_action(), seccomp.default_errno_ret());
    let mut ctx = ScmpFilterContext::new(default)?;
    for arch in seccomp.architectures().iter().flatten() {
        if let Ok(arch) = arch.to_string().parse::<ScmpArch>() {
            ctx.add_arch(arch)?;
        }
    }
    for call in seccomp.syscalls().iter().flatten() {
        let act = action(call.action(), call.errno_ret());
        if act == default {
            continue;
        }
        let conditions = conditions(call);
        let mut indexes = HashSet::new();
        let separate = !call
            .args()
            .iter()
            .flatten()
            .all(|a| indexes.insert(a.index()));
        for name in call.names() {
            let Ok(sc) = libseccomp::ScmpSyscall::from_name(name) else {
                continue;
            };
            if conditions.is_empty() {
                ctx.add_rule(act, sc)?;
            } else if separate {
                for c in &conditions {
                    ctx.add_rule_conditional(act, sc, std::slice::from_ref(c))?;
                }
            } else {
                ctx.add_rule_conditional(act, sc, &conditions)?;
            }
        }
    }
    Ok(ctx)
}

fn conditions(call: &LinuxSyscall) -> Vec<ScmpArgCompare> {
    call.args()
        .iter()
        .flatten()
        .map(|a| {
            let op = match a.op() {
                LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
                LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
                LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
                LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
                LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
                LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
                // libcontainer's reading: `valueTwo` is the mask (see `spec.rs`).
                LinuxSeccompOperator::ScmpCmpMaskedEq => {
                    ScmpCompareOp::MaskedEqual(a.value_two().unwrap_or(0))
                }
            };
            let index = u32::try_from(a.index()).unwrap_or(u32::MAX);
            ScmpArgCompare::new(index, op, a.value())
        })
        .collect()
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> ScmpAction {
    // EPERM (1) without `errnoRet`, as libcontainer and runc return.
    let errno = errno.map_or(1, |e| e as i32);
    match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(errno as u16),
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActNotify => ScmpAction::Notify,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mmap` refused for `n` combinations of its six arguments: a filter that grows with `n`.
    fn profile(n: u64) -> LinuxSeccomp {
        let syscalls: Vec<_> = (0..n)
            .map(|v| {
                let args: Vec<_> = (0..6)
                    .map(|i| serde_json::json!({"index": i, "value": v + i, "op": "SCMP_CMP_EQ"}))
                    .collect();
                serde_json::json!({"names": ["mmap"], "action": "SCMP_ACT_ERRNO", "args": args})
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW", "syscalls": syscalls
        }))
        .unwrap()
    }

    #[test]
    fn a_filter_over_the_kernels_limit_is_named_with_its_length() {
        let small = instructions(&profile(3)).unwrap();
        assert!((4..100).contains(&small), "{small}");
        match diagnose(&profile(3), FilterLoader::NoNewPrivs) {
            Refusal::Unknown { instructions } => assert_eq!(instructions, small),
            other => panic!("{other:?}"),
        }
        let refusal = diagnose(&profile(300), FilterLoader::NoNewPrivs);
        assert!(refusal.is_the_profiles(), "{refusal:?}");
        let Refusal::TooLong { instructions } = refusal else {
            unreachable!()
        };
        assert!(instructions > MAX_INSTRUCTIONS, "{instructions}");
        let text = refusal.to_string();
        assert!(
            text.contains(&format!("{instructions} BPF instructions")),
            "{text}"
        );
    }

    #[test]
    fn libcontainers_message_for_a_refused_filter_is_the_one_matched() {
        // Too long for the kernel, so nothing is loaded into this test process.
        let e = libcontainer::seccomp::initialize_seccomp(&profile(300)).unwrap_err();
        assert!(
            switchyard_base::chain(&e).contains(LOAD_FAILED),
            "{}",
            switchyard_base::chain(&e)
        );
    }
}
