//! The worker's confinement, entered once at its start, before any thread exists, so that
//! everything it then runs (wasmtime, the guests, their WASI calls) inherits it:
//!
//! - a private mount namespace whose root is an empty read-only tmpfs (the host's tree is
//!   detached from it): the worker reaches files only through the detached, `nodev`,
//!   `nosuid`, `noexec` mount trees the parent hands it, one per task, where `..` stops at the
//!   task's root;
//! - a private IPC namespace (no SysV objects of the host);
//! - no capabilities in any set (bounding and ambient included), `no_new_privs`, not dumpable
//!   (no ptrace or `/proc/<pid>/mem` from processes of the same uid), no core dumps;
//! - a seccomp allow-list of the system calls wasmtime, tokio and WASI need; no `execve`, no new
//!   processes or namespaces, signals and resource calls only on itself; `socket` only for a
//!   worker in a pod's network namespace whose guests may use the network, and then only IPv4
//!   and IPv6 streams and datagrams (no unix, netlink, packet or raw sockets);
//! - death with the parent.
//!
//! - a user namespace of its own (unless the runtime's `worker_uid` is 0), in which it is uid
//!   and gid 0 while on the host it is the unprivileged `worker_uid`/`worker_gid` with no
//!   supplementary groups; the parent writes the mapping and idmaps each task's root to it, so
//!   the task's root-owned files are the worker's own (`idmap.rs` for overlay roots).
//!
//! The steps run in this order: [`isolate`] (the namespaces and the empty root, as host root),
//! then, in a user namespace, [`unshare_user`] and, once the parent has mapped it,
//! [`become_mapped_root`]; then [`drop_privileges`]. docs/security.md has the reasoning and
//! what this does not cover.

use std::collections::BTreeMap;
use std::path::Path;

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::{CapabilitySet, CapabilitySets, UnshareFlags};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule,
};

/// A step of the confinement that failed; the worker refuses to run guests without it.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("wasm worker sandbox: {step}: {source}")]
    Step {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("wasm worker sandbox: seccomp filter: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("wasm worker sandbox: seccomp filter: {0}")]
    SeccompBuild(#[from] seccompiler::BackendError),
}

fn step(step: &'static str) -> impl FnOnce(rustix::io::Errno) -> SandboxError {
    move |e| SandboxError::Step {
        step,
        source: e.into(),
    }
}

/// The first step: private mount and IPC namespaces whose root is an empty read-only tmpfs
/// mounted on `scratch` (an existing directory), with the host's tree detached. Needs host root
/// (it runs before the user namespace, so the mounts stay out of the worker's reach).
pub fn isolate(scratch: &Path) -> Result<(), SandboxError> {
    // SAFETY: no other thread exists yet, so no thread can observe the unshared state.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS | UnshareFlags::NEWIPC) }
        .map_err(step("new mount and IPC namespaces"))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(step("make mounts private"))?;
    rustix::mount::mount(
        "none",
        scratch,
        "tmpfs",
        MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC,
        c"size=4k,mode=0555",
    )
    .map_err(step("mount the empty root"))?;
    rustix::process::chdir(scratch).map_err(step("enter the empty root"))?;
    rustix::process::pivot_root(".", ".").map_err(step("pivot_root"))?;
    // The old root now sits under the new one at "."; detach it from this namespace.
    rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(step("detach the host tree"))?;
    rustix::process::chdir("/").map_err(step("chdir /"))?;
    Ok(())
}

/// Enter a new user namespace, still single-threaded. Until the parent writes its mapping this
/// process has no ids in it; [`become_mapped_root`] takes them.
pub fn unshare_user() -> Result<(), SandboxError> {
    // SAFETY: no other thread exists yet, so no thread can observe the unshared state.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) }
        .map_err(step("new user namespace"))
}

/// Once the parent has mapped the user namespace: become its uid and gid 0 (the unprivileged
/// host ids the parent mapped them to) with no supplementary groups (host root's would stay).
pub fn become_mapped_root() -> Result<(), SandboxError> {
    let root_uid = rustix::process::Uid::ROOT;
    let root_gid = rustix::process::Gid::ROOT;
    rustix::thread::set_thread_groups(&[]).map_err(step("drop supplementary groups"))?;
    rustix::thread::set_thread_res_gid(root_gid, root_gid, root_gid)
        .map_err(step("take the mapped gid"))?;
    rustix::thread::set_thread_res_uid(root_uid, root_uid, root_uid)
        .map_err(step("take the mapped uid"))?;
    Ok(())
}

/// The last step: death with the parent, no core dumps, not dumpable, no capabilities,
/// `no_new_privs`, the seccomp filters (with `network`, the socket calls of [`filters`]).
/// After a change of ids (the kernel clears the death signal and the dumpable flag on one).
pub fn drop_privileges(network: bool) -> Result<(), SandboxError> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(step("die with the parent"))?;
    // No core dumps (they would hold guests' memory) and no ptrace from the same uid.
    rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(step("RLIMIT_CORE"))?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(step("not dumpable"))?;
    drop_capabilities()?;
    rustix::thread::set_no_new_privs(true).map_err(step("no_new_privs"))?;
    for f in filters(rustix::process::getpid().as_raw_nonzero().get(), network)? {
        seccompiler::apply_filter(&f)?;
    }
    Ok(())
}

/// Empty every capability set, the bounding and ambient sets first (dropping from the
/// bounding set needs CAP_SETPCAP, which goes last with the rest).
fn drop_capabilities() -> Result<(), SandboxError> {
    use rustix::thread::CapabilitiesSecureBits as B;
    // uid 0 must not regain capabilities through execve or a uid change.
    rustix::thread::set_capabilities_secure_bits(
        B::NO_ROOT
            | B::NO_ROOT_LOCKED
            | B::NO_SETUID_FIXUP
            | B::NO_SETUID_FIXUP_LOCKED
            | B::KEEP_CAPS_LOCKED
            | B::NO_CAP_AMBIENT_RAISE
            | B::NO_CAP_AMBIENT_RAISE_LOCKED,
    )
    .map_err(step("securebits"))?;
    for cap in 0..64 {
        match rustix::thread::remove_capability_from_bounding_set(CapabilitySet::from_bits_retain(
            1 << cap,
        )) {
            Ok(()) => {}
            // Past the kernel's last capability.
            Err(rustix::io::Errno::INVAL) => break,
            Err(e) => return Err(step("drop the bounding set")(e)),
        }
    }
    rustix::thread::clear_ambient_capability_set().map_err(step("clear ambient capabilities"))?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(step("drop capabilities"))?;
    Ok(())
}

/// The worker's system calls, as two programs to install in order. Everything else fails with
/// EPERM (clone3 with ENOSYS). With `network` (a worker in a pod's network namespace whose
/// guests may use it), IPv4 and IPv6 stream and datagram sockets, and `bind`, `listen` and
/// `connect` on them.
pub fn filters(pid: i32, network: bool) -> Result<[BpfProgram; 2], SandboxError> {
    let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in ALLOWED {
        rules.insert(*nr, Vec::new());
    }
    let pid = u64::try_from(pid).unwrap_or_default();
    let eq = |arg: u8, len: Len, v: u64| Cond::new(arg, len, Op::Eq, v);
    let one = |c: Vec<Cond>| SeccompRule::new(c);
    // Threads only: CLONE_THREAD set and no namespace flag.
    let ns = (libc::CLONE_NEWNS
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET) as u64;
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![one(vec![Cond::new(
            0,
            Len::Qword,
            Op::MaskedEq(thread | ns),
            thread,
        )?])?],
    );
    // A connected pair inside the process (tokio's signal driver makes one) reaches nothing
    // outside; sockets that could are not allowed.
    rules.insert(
        libc::SYS_socketpair,
        vec![one(vec![eq(0, Len::Dword, libc::AF_UNIX as u64)?])?],
    );
    if network {
        // The socket type's low bits; the rest are SOCK_NONBLOCK and SOCK_CLOEXEC.
        let kind = |t: i32| Cond::new(1, Len::Dword, Op::MaskedEq(0xf), t as u64);
        let mut socket = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            for t in [libc::SOCK_STREAM, libc::SOCK_DGRAM] {
                socket.push(one(vec![eq(0, Len::Dword, family as u64)?, kind(t)?])?);
            }
        }
        rules.insert(libc::SYS_socket, socket);
        for nr in [libc::SYS_bind, libc::SYS_listen, libc::SYS_connect] {
            rules.insert(nr, Vec::new());
        }
    }
    // Signals and resource limits only on this process.
    rules.insert(libc::SYS_tgkill, vec![one(vec![eq(0, Len::Dword, pid)?])?]);
    rules.insert(
        libc::SYS_prlimit64,
        vec![
            one(vec![eq(0, Len::Dword, 0)?])?,
            one(vec![eq(0, Len::Dword, pid)?])?,
        ],
    );
    rules.insert(
        libc::SYS_sched_getaffinity,
        vec![
            one(vec![eq(0, Len::Dword, 0)?])?,
            one(vec![eq(0, Len::Dword, pid)?])?,
        ],
    );
    // Thread names, named anonymous mappings, and no_new_privs (which only tightens; seccomp
    // filters may likewise only be added, as the second one below is).
    rules.insert(
        libc::SYS_prctl,
        [
            libc::PR_SET_NAME,
            libc::PR_GET_NAME,
            0x5356_4d41, // PR_SET_VMA
            libc::PR_SET_NO_NEW_PRIVS,
        ]
        .into_iter()
        .map(|op| one(vec![eq(0, Len::Dword, op as u64)?]))
        .collect::<Result<_, _>>()?,
    );
    // Terminal and non-blocking queries on descriptors it holds.
    rules.insert(
        libc::SYS_ioctl,
        [
            libc::FIONBIO,
            libc::FIOCLEX,
            libc::FIONCLEX,
            libc::FIONREAD,
            libc::TCGETS,
            libc::TIOCGWINSZ,
        ]
        .into_iter()
        // The request type is `c_ulong` (u64 here) or `c_int`, by target.
        .map(|op| {
            #[allow(clippy::unnecessary_cast)]
            one(vec![eq(1, Len::Dword, op as u64)?])
        })
        .collect::<Result<_, _>>()?,
    );
    let allow = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )?;
    // clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes the C library
    // fall back to clone. Installed after the allow-list, this filter's verdict wins for clone3
    // (of two errno verdicts, the newer filter's stands).
    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, Vec::new());
    let enosys = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok([allow.try_into()?, enosys.try_into()?])
}

/// Always allowed: no arguments reach anything outside the process or the descriptors it
/// holds.
const ALLOWED: &[i64] = &[
    // memory
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    // threads and time
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_sched_yield,
    // a read of a CPU mask (threads ask with their own id)
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_seccomp,
    // signals (handlers for traps; delivery only through tgkill on itself)
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    // descriptors it holds
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_fchdir,
    libc::SYS_chdir,
    libc::SYS_getcwd,
    // paths under a task's root (WASI), resolved from its descriptor
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_utimensat,
    // event loop, the parent's channel, HTTP connections on the listener it was given
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_ppoll,
    libc::SYS_pipe2,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    // identity and host facts it may read
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_capget,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrusage,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_accept,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_time,
];

/// Check from inside that the confinement holds (`containerd-shim-yard-wasm-v1 worker
/// --self-test`, run by the integration tests): every line is a finding, none means it holds.
pub fn self_test() -> Vec<String> {
    use rustix::io::Errno;
    let mut bad = Vec::new();
    let mut expect = |what: &str, r: Result<(), Errno>, want: Errno| match r {
        Err(e) if e == want => {}
        other => bad.push(format!("{what}: {other:?}, want {want:?}")),
    };
    expect(
        "socket(AF_UNIX)",
        rustix::net::socket(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            None,
        )
        .map(drop),
        Errno::PERM,
    );
    expect(
        "socket(AF_INET)",
        rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .map(drop),
        Errno::PERM,
    );
    let Some(init) = rustix::process::Pid::from_raw(1) else {
        return vec!["pid 1 is not a pid".into()];
    };
    expect(
        "kill(1, 0)",
        rustix::process::test_kill_process(init),
        Errno::PERM,
    );
    expect(
        "pidfd_open(1)",
        rustix::process::pidfd_open(init, rustix::process::PidfdFlags::empty()).map(drop),
        Errno::PERM,
    );
    // SAFETY: the call fails (that is the check); were it to succeed, only this thread would be
    // in the new namespace and it touches no shared state before the process exits.
    let unshared = unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) };
    expect("unshare(CLONE_NEWUSER)", unshared, Errno::PERM);
    expect(
        "open /etc/passwd",
        rustix::fs::open(
            "/etc/passwd",
            rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .map(drop),
        Errno::NOENT,
    );
    expect(
        "mknod",
        rustix::fs::mknodat(
            rustix::fs::CWD,
            "/x",
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::RUSR,
            rustix::fs::makedev(1, 5),
        ),
        Errno::PERM,
    );
    match rustix::thread::capabilities(None) {
        Ok(c) if c.effective.is_empty() && c.permitted.is_empty() => {}
        other => bad.push(format!("capabilities: {other:?}")),
    }
    if std::thread::spawn(|| 7).join().ok() != Some(7) {
        bad.push("a thread did not start".into());
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filter compiles for this host and stays within the kernel's program size.
    #[test]
    fn filter_builds() {
        for network in [false, true] {
            for p in filters(1234, network).unwrap_or_else(|e| panic!("{e}")) {
                assert!(!p.is_empty() && p.len() < 4096, "{} instructions", p.len());
            }
        }
    }
}
