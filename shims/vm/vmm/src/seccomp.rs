//! Per-thread seccomp filters for the VMM's own threads, on the `seccompiler` crate as in
//! firecracker: each vCPU thread, the VM control thread and each device worker installs the
//! filter of its kind before it handles anything the guest controls, and from then on can make
//! only the system calls that kind needs.
//!
//! The filters are per thread, never process-wide (no `TSYNC`): the VMM runs inside the vm shim,
//! whose other threads (tokio, ttrpc) are not ours to restrict. `PR_SET_NO_NEW_PRIVS`, which
//! installing a filter needs, is per thread too. A thread inherits its creator's filter, so the
//! VMM creates every filtered thread from an unfiltered one (the caller of [`Vm::start`]): a
//! guest activating a device hands work to a worker that already exists, it never makes a
//! thread.
//!
//! A system call outside the list kills the whole process (`SECCOMP_RET_KILL_PROCESS`), not
//! just the thread: a thread killed alone leaves behind the locks it held and never reports its
//! end, so the VM would hang half-stopped inside a shim that looks alive. A dead shim is what
//! containerd already knows how to handle (the task exits, the sandbox is cleaned up), and the
//! kernel logs the offending system call (audit type 1326).
//!
//! One exception keeps a panic's report intact: with `RUST_BACKTRACE` set, std symbolizes the
//! backtrace by opening the executable and `/proc/self/maps`. Those file look-ups ([`LOOKUPS`])
//! fail with `EACCES` instead of killing: a second filter, installed first, answers them, and
//! the kill filter lets them through to it. They open nothing either way.
//!
//! [`Vm::start`]: crate::vmm::Vm::start

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Whether the VMM's threads run under their filters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// Every VMM thread installs its filter before it handles guest input; a system call
    /// outside it kills the process.
    #[default]
    Enforce,
    /// No filters: for fuzzing under sanitizers (whose reports need files and processes) and
    /// for debugging a VMM thread under tools that need more.
    Off,
}

/// The kinds of VMM thread, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs `KVM_RUN` and the device emulation of its exits (port I/O, MMIO).
    Vcpu,
    /// Waits for the VM to end, then kicks and joins the vCPU threads.
    Control,
    /// Serves virtio-blk requests against the backing file.
    BlockWorker,
    /// Moves vsock packets between the guest's queues and Unix sockets.
    VsockWorker,
    /// Moves frames between the guest's virtio-net queues and a tap.
    NetWorker,
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Control => "VM control",
            ThreadKind::BlockWorker => "virtio-blk worker",
            ThreadKind::VsockWorker => "virtio-vsock worker",
            ThreadKind::NetWorker => "virtio-net worker",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter of the {kind} thread")]
    Build {
        kind: ThreadKind,
        #[source]
        source: BackendError,
    },
    #[error("installing the seccomp filter of the {kind} thread")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
}

/// The file look-ups a panic's backtrace makes: refused with `EACCES`, not fatal.
pub const LOOKUPS: &[i64] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
];

/// `KVM_RUN`, `_IO(KVMIO, 0x80)`: the one ioctl a vCPU thread makes once running.
pub const KVM_RUN: u64 = (kvm_bindings::KVMIO as u64) << 8 | 0x80;

/// A thread kind's compiled filters, ready to install (or nothing, under [`Seccomp::Off`]).
pub struct ThreadFilter {
    kind: ThreadKind,
    /// The `EACCES` filter for [`LOOKUPS`], then the kill filter.
    programs: Option<(BpfProgram, BpfProgram)>,
}

impl ThreadFilter {
    /// Compiles `kind`'s filters (in the creating thread, so a mistake in a list is an error
    /// there, before any thread runs).
    pub fn new(kind: ThreadKind, mode: Seccomp) -> Result<ThreadFilter, SeccompError> {
        let programs = match mode {
            Seccomp::Off => None,
            Seccomp::Enforce => {
                Some(compile(kind).map_err(|source| SeccompError::Build { kind, source })?)
            }
        };
        Ok(ThreadFilter { kind, programs })
    }

    pub fn kind(&self) -> ThreadKind {
        self.kind
    }

    /// Installs the filters into the calling thread, for the rest of its life.
    pub fn install(&self) -> Result<(), SeccompError> {
        let Some((lookups, allowed)) = &self.programs else {
            return Ok(());
        };
        let kind = self.kind;
        // The lookup filter allows everything else, so installing the second one (prctl and
        // seccomp, which the kill filter does not list) still works.
        for program in [lookups, allowed] {
            seccompiler::apply_filter(program)
                .map_err(|source| SeccompError::Install { kind, source })?;
        }
        Ok(())
    }
}

fn compile(kind: ThreadKind) -> Result<(BpfProgram, BpfProgram), BackendError> {
    let lookups = SeccompFilter::new(
        LOOKUPS.iter().map(|&nr| (nr, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES.unsigned_abs()),
        TargetArch::x86_64,
    )?;
    let mut rules = allowed(kind)?;
    for &nr in LOOKUPS {
        rules.insert(nr, Vec::new());
    }
    let allowed = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok((lookups.try_into()?, allowed.try_into()?))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Allowed when argument `index` (32 bits) equals one of `values`.
fn arg_is(index: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![SeccompCondition::new(
                index,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )?])
        })
        .collect()
}

/// Allowed when argument `index` has none of the bits in `mask`.
fn arg_lacks(index: u8, mask: u64) -> Result<Vec<SeccompRule>, BackendError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )?])?])
}

fn any(nrs: &[i64]) -> impl Iterator<Item = (i64, Vec<SeccompRule>)> + '_ {
    nrs.iter().map(|&nr| (nr, Vec::new()))
}

/// What every VMM thread needs: found by running the VMM's tests (tiny guests, the virtio test
/// guest, the device tests) under `strace -f` and reading the code paths they do not reach.
fn common() -> Result<Rules, BackendError> {
    let mut rules: Rules = any(&[
        // The allocator and thread stacks.
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        // Locks, channels, sleeps and clocks (clock_gettime is the vDSO's fallback).
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // Descriptors the thread was handed: eventfds, the console, the log.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        // A thread's end (std removes its signal stack, glibc blocks signals and frees the
        // stack) and the return from the vCPU kick handler.
        libc::SYS_exit,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        // What std asks for: the thread id in a panic message, HashMap keys.
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
    ])
    .collect();
    // No new executable memory.
    let prot_exec = u64::from(libc::PROT_EXEC.unsigned_abs());
    rules.insert(libc::SYS_mmap, arg_lacks(2, prot_exec)?);
    rules.insert(libc::SYS_mprotect, arg_lacks(2, prot_exec)?);
    // std checks that a descriptor is open before it closes it (debug assertions).
    rules.insert(libc::SYS_fcntl, arg_is(1, &[fcntl(libc::F_GETFD)])?);
    Ok(rules)
}

fn fcntl(cmd: libc::c_int) -> u64 {
    u64::from(cmd.unsigned_abs())
}

fn allowed(kind: ThreadKind) -> Result<Rules, BackendError> {
    let mut rules = common()?;
    let epoll = [
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_create1,
    ];
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(libc::SYS_ioctl, arg_is(1, &[KVM_RUN])?);
            // Activating a device clones its queue eventfds (and vsock's listener) for the
            // worker.
            rules.insert(
                libc::SYS_fcntl,
                arg_is(1, &[fcntl(libc::F_GETFD), fcntl(libc::F_DUPFD_CLOEXEC)])?,
            );
        }
        ThreadKind::Control => {
            rules.extend(any(&[libc::SYS_epoll_wait, libc::SYS_epoll_pwait]));
            // Kicking vCPU threads out of KVM_RUN, and nothing else.
            let kick = u64::from(crate::kvm::vcpu::kick_signal().unsigned_abs());
            rules.insert(libc::SYS_tgkill, arg_is(2, &[kick])?);
        }
        ThreadKind::BlockWorker => {
            rules.extend(any(&epoll));
            rules.extend(any(&[
                libc::SYS_pread64,
                libc::SYS_pwrite64,
                libc::SYS_fdatasync,
                libc::SYS_fsync,
            ]));
        }
        ThreadKind::VsockWorker => {
            rules.extend(any(&epoll));
            rules.extend(any(&[
                libc::SYS_accept4,
                libc::SYS_connect,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_shutdown,
            ]));
            // Dialing `<uds_path>_<port>`: Unix sockets only.
            let unix = u64::from(libc::AF_UNIX.unsigned_abs());
            rules.insert(libc::SYS_socket, arg_is(0, &[unix])?);
            // std's set_nonblocking on an accepted stream.
            rules.insert(libc::SYS_ioctl, arg_is(1, &[libc::FIONBIO])?);
        }
        ThreadKind::NetWorker => {
            // read/write (common) on the tap and the eventfds; nothing else but the offload
            // switch, set once per activation.
            rules.extend(any(&epoll));
            rules.insert(libc::SYS_ioctl, arg_is(1, &[libc::TUNSETOFFLOAD])?);
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_off_installs_nothing() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Control,
            ThreadKind::BlockWorker,
            ThreadKind::VsockWorker,
            ThreadKind::NetWorker,
        ] {
            let f = ThreadFilter::new(kind, Seccomp::Enforce).unwrap();
            assert!(f.programs.is_some(), "{kind}");
            let off = ThreadFilter::new(kind, Seccomp::Off).unwrap();
            assert!(off.programs.is_none());
            off.install().unwrap();
        }
    }

    #[test]
    fn kvm_run_is_the_ioctl_number_kvm_ioctls_uses() {
        assert_eq!(KVM_RUN, 0xae80);
    }

    #[test]
    fn only_the_vcpu_may_run_the_guest_and_only_vsock_may_make_sockets() {
        let has = |kind, nr| allowed(kind).unwrap().contains_key(&nr);
        assert!(has(ThreadKind::Vcpu, libc::SYS_ioctl));
        assert!(!has(ThreadKind::BlockWorker, libc::SYS_ioctl));
        assert!(!has(ThreadKind::Control, libc::SYS_ioctl));
        assert!(has(ThreadKind::VsockWorker, libc::SYS_socket));
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Control,
            ThreadKind::BlockWorker,
            ThreadKind::NetWorker,
        ] {
            assert!(!has(kind, libc::SYS_socket), "{kind}");
            assert!(!has(kind, libc::SYS_connect), "{kind}");
        }
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Control,
            ThreadKind::BlockWorker,
            ThreadKind::VsockWorker,
            ThreadKind::NetWorker,
        ] {
            for nr in [
                libc::SYS_execve,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_ptrace,
                libc::SYS_kill,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
            ] {
                assert!(!has(kind, nr), "{kind} may make syscall {nr}");
            }
        }
    }
}
