//! The QEMU backend: one `qemu-system-x86_64 -M microvm` process per VM.
//!
//! Every channel to QEMU is one end of a `socketpair` handed over by fd number (`-chardev
//! socket,fd=N`; QEMU 7.2 takes an already-connected socket in client mode), so no socket file
//! exists and nothing else can connect:
//!
//! | fd | chardev | what |
//! |---|---|---|
//! | 3 | `agent` | the agent's virtio-serial port [`PORT_NAME`](yard_agent_protocol::PORT_NAME) |
//! | 4 | `qmp` | QMP, for `quit` and `query-status` |
//! | 5 (and 1, 2) | `con` | the serial console, plus QEMU's own stdout/stderr, read by [`console`] |
//!
//! QEMU dies with the shim: `PR_SET_PDEATHSIG` (SIGKILL) is armed before exec, and it runs in
//! its own process group so a terminal's signals do not reach it. The process is watched and
//! collected through a pidfd, never `waitpid(pid)` alone, so the shim's subreaper (which runs
//! `waitpid(-1)`) and this module can both be right about it.

pub mod cmdline;
pub mod console;
pub mod qmp;

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use command_fds::{CommandFdExt, FdMapping};
use tokio::io::AsyncReadExt;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use yard_agent_protocol::READY_BANNER;

use crate::hypervisor::{Accel, BootVmError, Hypervisor, Vm, VmConfig, VmError, VmStatus, VmmExit};
use crate::sys::{self, PidFd};
use console::Console;
use qmp::Qmp;

/// Looked up on `PATH` unless configured otherwise.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

const AGENT_FD: RawFd = 3;
const QMP_FD: RawFd = 4;
const CONSOLE_FD: RawFd = 5;
const TAP_FD: RawFd = 6;

/// Console lines quoted in boot errors.
const ERROR_TAIL_LINES: usize = 30;
/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);
/// From QEMU closing its end of the agent socket to its exit.
const EXIT_WAIT: Duration = Duration::from_secs(2);
/// After SIGKILL: QEMU is gone in milliseconds unless the kernel is stuck freeing its memory.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The QEMU hypervisor backend, with its binary: a path, or a name looked up on `PATH`
/// ([`find_binary`]).
#[derive(Clone, Debug)]
pub struct Qemu {
    binary: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu::new(DEFAULT_BINARY)
    }
}

impl Qemu {
    pub fn new(binary: impl Into<PathBuf>) -> Qemu {
        Qemu {
            binary: binary.into(),
        }
    }
}

/// Resolve a binary name on `PATH` (then `/usr/bin`, `/usr/local/bin`: shims may run with a
/// minimal environment); a name with a `/` is taken as a path.
pub fn find_binary(binary: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if binary.as_os_str().is_empty() {
        return None;
    }
    if binary.components().count() > 1 || binary.is_absolute() {
        return executable(binary).then(|| binary.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join(binary))
        .find(|p| executable(p))
}

/// `7.2.19` from `qemu-system-x86_64 --version`.
pub fn version(binary: &Path) -> Option<String> {
    use std::io::Read;
    let mut child = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut text = String::new();
    let read = child.stdout.take()?.read_to_string(&mut text);
    // Its status does not matter (and a subreaper may collect it first).
    let _ = child.wait();
    read.ok()?;
    let rest = text.lines().next()?.split("version ").nth(1)?;
    Some(rest.split_whitespace().next()?.to_owned())
}

/// Where the measured host TSC rate is kept, with the kernel's boot id: the rate is constant
/// for a boot (it is only used when the TSC is), so only the first VM after a boot pays for the
/// measurement (25 ms, ~45 ms of a VM's start here), not every shim.
const TSC_CACHE: &str = "/run/switchyard/host-tsc-khz";
/// A cached rate outside this range (kHz) is not believed.
const TSC_KHZ_RANGE: std::ops::RangeInclusive<u64> = 100_000..=10_000_000;

/// The host TSC rate, for TCG guests (see [`cmdline::Tuning::tsc_khz`]): from [`TSC_CACHE`], or
/// measured once per process (25 ms) and cached; only when the TSC ticks at a constant rate in
/// every power state (`constant_tsc`, `nonstop_tsc`): otherwise the guest calibrates on its own.
async fn host_tsc_khz() -> Option<u64> {
    static KHZ: tokio::sync::OnceCell<Option<u64>> = tokio::sync::OnceCell::const_new();
    *KHZ.get_or_init(|| async {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        if !(has("constant_tsc") && has("nonstop_tsc")) {
            return None;
        }
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok();
        let boot = boot.as_deref().map(str::trim).filter(|b| !b.is_empty());
        let cache = Path::new(TSC_CACHE);
        if let Some(khz) = boot.and_then(|b| read_tsc_cache(cache, b)) {
            return Some(khz);
        }
        let khz = sys::measure_tsc_khz(Duration::from_millis(25)).await?;
        tracing::debug!(khz, "measured the host TSC");
        if let Some(b) = boot
            && let Err(e) = write_tsc_cache(cache, b, khz)
        {
            tracing::debug!(path = %cache.display(), error = %e, "the TSC rate is not cached");
        }
        Some(khz)
    })
    .await
}

/// The rate [`write_tsc_cache`] kept at `path` during boot `boot`, if it is that boot's and
/// believable.
fn read_tsc_cache(path: &Path, boot: &str) -> Option<u64> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(256)
        .read_to_string(&mut text)
        .ok()?;
    let (cached_boot, khz) = text.trim().split_once(' ')?;
    let khz: u64 = khz.parse().ok()?;
    (cached_boot == boot && TSC_KHZ_RANGE.contains(&khz)).then_some(khz)
}

/// Keeps `khz` for boot `boot` at `path` (written aside, then renamed: readers never see half).
fn write_tsc_cache(path: &Path, boot: &str, khz: u64) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let aside = path.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&aside, format!("{boot} {khz}\n"))?;
    std::fs::rename(&aside, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&aside);
    })
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn boot(&self, cfg: VmConfig) -> Result<Box<dyn Vm>, BootVmError> {
        Ok(Box::new(self.boot_qemu(cfg).await?))
    }
}

impl Qemu {
    /// [`Hypervisor::boot`], with the concrete VM type.
    pub async fn boot_qemu(&self, cfg: VmConfig) -> Result<QemuVm, BootVmError> {
        if !cfg.kernel.is_file() {
            return Err(BootVmError::KernelMissing { path: cfg.kernel });
        }
        if !cfg.initrd.is_file() {
            return Err(BootVmError::InitrdMissing { path: cfg.initrd });
        }
        if let Some(disk) = cfg.root_disk.as_ref().filter(|d| !d.is_file()) {
            return Err(BootVmError::RootDiskMissing { path: disk.clone() });
        }
        if let Some(dir) = cfg.share_dir.as_ref().filter(|d| !d.is_dir()) {
            return Err(BootVmError::ShareDirMissing { path: dir.clone() });
        }
        if let Some(dir) = cfg.volume_dir.as_ref().filter(|d| !d.is_dir()) {
            return Err(BootVmError::ShareDirMissing { path: dir.clone() });
        }
        let binary = find_binary(&self.binary).ok_or_else(|| BootVmError::QemuMissing {
            path: self.binary.clone(),
        })?;

        let (agent, agent_child) = StdUnixStream::pair().map_err(BootVmError::io("socketpair"))?;
        let (qmp, qmp_child) = StdUnixStream::pair().map_err(BootVmError::io("socketpair"))?;
        let (console, console_child) =
            StdUnixStream::pair().map_err(BootVmError::io("socketpair"))?;
        let log = cfg.state_dir.join("console.log");
        let console = Console::start(console, &log)
            .map_err(|source| BootVmError::ConsoleLog { path: log, source })?;
        let agent = async_stream(agent)?;
        let qmp = async_stream(qmp)?;
        let console_child = OwnedFd::from(console_child);
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(BootVmError::io("dup"));

        let tuning = match cfg.accel {
            Accel::Tcg => cmdline::Tuning {
                tsc_khz: host_tsc_khz().await,
            },
            Accel::Kvm => cmdline::Tuning::default(),
        };
        let args = cmdline::args(
            &cfg,
            cmdline::ChildFds {
                agent: AGENT_FD,
                qmp: QMP_FD,
                console: CONSOLE_FD,
                tap: cfg.net.as_ref().map(|_| TAP_FD),
            },
            tuning,
        );
        tracing::debug!(vm = %cfg.id, binary = %binary.display(), ?args, "starting QEMU");
        let mut cmd = Command::new(&binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(dup(&console_child)?)
            .stderr(dup(&console_child)?)
            .process_group(0);
        let mut mappings = Vec::new();
        if let Some(net) = &cfg.net {
            mappings.push(FdMapping {
                parent_fd: net
                    .tap
                    .try_clone()
                    .map_err(BootVmError::io("dup the tap"))?,
                child_fd: TAP_FD,
            });
        }
        mappings.extend([
            FdMapping {
                parent_fd: agent_child.into(),
                child_fd: AGENT_FD,
            },
            FdMapping {
                parent_fd: qmp_child.into(),
                child_fd: QMP_FD,
            },
            FdMapping {
                parent_fd: console_child,
                child_fd: CONSOLE_FD,
            },
        ]);
        cmd.fd_mappings(mappings).map_err(|_| BootVmError::Io {
            what: "map fds",
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        sys::kill_with_parent(&mut cmd);

        let started = Instant::now();
        let child = cmd.spawn().map_err(|source| BootVmError::Spawn {
            binary: binary.clone(),
            source,
        })?;
        // The child's ends close here, in this process: EOF on our ends then means QEMU is gone.
        drop(cmd);
        let pid = child.id();
        // The pidfd watches and collects the child, not the std handle: a subreaper may collect
        // it first.
        let process = Process::open(child)?;
        // No `?` between here and `vm`: dropping the VM is what kills QEMU on an error.
        let mut vm = QemuVm {
            id: cfg.id.clone(),
            process: Arc::new(process),
            agent: None,
            qmp: tokio::sync::Mutex::new(Qmp::new(qmp)),
            console,
            boot_time: Duration::ZERO,
            accel: cfg.accel,
        };
        match vm.wait_for_banner(agent, cfg.boot_timeout).await {
            Ok(agent) => {
                vm.agent = Some(agent);
                vm.boot_time = started.elapsed();
                tracing::info!(
                    vm = %cfg.id,
                    pid,
                    accel = %cfg.accel,
                    boot_ms = vm.boot_time.as_millis() as u64,
                    "VM booted"
                );
                Ok(vm)
            }
            Err(e) => {
                if matches!(e, BannerWait::Exited) {
                    // Closing its sockets is part of QEMU's exit: let it finish, so the status
                    // is its own and not our SIGKILL.
                    let _ = tokio::time::timeout(EXIT_WAIT, vm.process.exited()).await;
                }
                vm.kill_and_collect().await;
                let console = vm.console.tail(ERROR_TAIL_LINES);
                Err(match e {
                    BannerWait::Timeout => BootVmError::Timeout {
                        timeout_ms: u64::try_from(cfg.boot_timeout.as_millis()).unwrap_or(u64::MAX),
                        console,
                    },
                    BannerWait::Exited => BootVmError::ExitedDuringBoot {
                        status: vm.exit_status().unwrap_or(VmmExit::Unknown),
                        console,
                    },
                    BannerWait::Mismatch(got) => BootVmError::BannerMismatch {
                        got: String::from_utf8_lossy(&got).into_owned(),
                    },
                    BannerWait::Io(source) => BootVmError::Io {
                        what: "read the agent's ready banner",
                        source,
                    },
                })
            }
        }
    }
}

fn async_stream(stream: StdUnixStream) -> Result<UnixStream, BootVmError> {
    stream
        .set_nonblocking(true)
        .map_err(BootVmError::io("set nonblocking"))?;
    UnixStream::from_std(stream).map_err(BootVmError::io("register a socket"))
}

enum BannerWait {
    Timeout,
    Exited,
    Mismatch(Vec<u8>),
    Io(std::io::Error),
}

/// The VMM process, watched through its pidfd.
struct Process {
    fd: AsyncFd<PidFd>,
    exit: OnceLock<VmmExit>,
}

impl Process {
    fn open(mut child: std::process::Child) -> Result<Process, BootVmError> {
        let pidfd = PidFd::open(child.id()).map_err(|source| {
            // Not collected by anyone yet, so the pid is still this child.
            let _ = child.kill();
            let _ = child.wait();
            BootVmError::Io {
                what: "open a pidfd for QEMU",
                source,
            }
        })?;
        let fd = sys::watch(pidfd).map_err(|(pidfd, source)| {
            // Nothing would watch it: do not leave it running.
            let _ = pidfd.kill();
            pidfd.reap_blocking();
            BootVmError::Io {
                what: "watch the QEMU pidfd",
                source,
            }
        })?;
        Ok(Process {
            fd,
            exit: OnceLock::new(),
        })
    }

    fn pidfd(&self) -> &PidFd {
        self.fd.get_ref()
    }

    /// Resolves once the process has exited (a pidfd turns readable then).
    async fn exited(&self) {
        if self.exit.get().is_some() {
            return;
        }
        if let Err(e) = self.fd.readable().await {
            tracing::warn!(error = %e, "pidfd poll failed; taking QEMU as exited");
        }
    }

    /// The exit, collected if it happened: `None` while the process runs.
    fn try_reap(&self) -> Option<VmmExit> {
        if let Some(exit) = self.exit.get() {
            return Some(*exit);
        }
        let exit = self.pidfd().try_reap()?;
        Some(*self.exit.get_or_init(|| exit))
    }
}

/// A VM run by QEMU.
pub struct QemuVm {
    id: String,
    process: Arc<Process>,
    agent: Option<UnixStream>,
    qmp: tokio::sync::Mutex<Qmp>,
    console: Arc<Console>,
    boot_time: Duration,
    accel: Accel,
}

impl QemuVm {
    async fn wait_for_banner(
        &self,
        mut agent: UnixStream,
        timeout: Duration,
    ) -> Result<UnixStream, BannerWait> {
        let mut banner = [0u8; READY_BANNER.len()];
        let read = tokio::time::timeout(timeout, agent.read_exact(&mut banner));
        tokio::select! {
            biased;
            r = read => match r {
                Err(_) => Err(BannerWait::Timeout),
                // QEMU closed its end: it is exiting.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Err(BannerWait::Exited)
                }
                Ok(Err(e)) => Err(BannerWait::Io(e)),
                Ok(Ok(_)) if banner[..] != *READY_BANNER => {
                    Err(BannerWait::Mismatch(banner.to_vec()))
                }
                Ok(Ok(_)) => Ok(agent),
            },
            () = self.process.exited() => Err(BannerWait::Exited),
        }
    }

    /// SIGKILL, wait for the exit, collect it, and let the console drain.
    async fn kill_and_collect(&self) {
        if let Err(e) = self.process.pidfd().kill() {
            tracing::warn!(vm = %self.id, error = %e, "SIGKILL QEMU");
        }
        self.collect(KILL_WAIT).await;
    }

    async fn collect(&self, limit: Duration) {
        if tokio::time::timeout(limit, self.process.exited())
            .await
            .is_err()
        {
            tracing::error!(vm = %self.id, "QEMU has not exited {limit:?} after SIGKILL");
            return;
        }
        if self.process.try_reap().is_none() {
            // Readable pidfd but not collectable yet cannot happen; collect without NOHANG.
            let exit = self.process.pidfd().reap_blocking();
            let _ = self.process.exit.set(exit);
        }
        self.console.drained(Duration::from_secs(1)).await;
    }

    async fn qmp<T>(
        &self,
        what: &'static str,
        limit: Duration,
        f: impl AsyncFnOnce(&mut Qmp) -> Result<T, qmp::QmpError>,
    ) -> Result<T, VmError> {
        let call = async {
            let mut qmp = self.qmp.lock().await;
            f(&mut qmp).await
        };
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(VmError::Backend {
                what,
                source: Box::new(e),
            }),
            Err(e) => Err(VmError::Backend {
                what,
                source: Box::new(e),
            }),
        }
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> Option<u32> {
        Some(self.process.pidfd().pid())
    }

    fn take_agent_stream(&mut self) -> Option<UnixStream> {
        self.agent.take()
    }

    fn boot_time(&self) -> Duration {
        self.boot_time
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn console_tail(&self, max_lines: usize) -> String {
        self.console.tail(max_lines)
    }

    async fn status(&self) -> Result<VmStatus, VmError> {
        if self.process.try_reap().is_some() {
            return Err(VmError::Exited);
        }
        let v = self
            .qmp("QMP query-status", QMP_TIMEOUT, async |q| {
                q.execute("query-status").await
            })
            .await?;
        Ok(VmStatus {
            state: v
                .get("status")
                .and_then(|s| s.as_str())
                .unwrap_or("unknown")
                .to_owned(),
            running: v.get("running").and_then(|r| r.as_bool()).unwrap_or(false),
        })
    }

    async fn stop(&self, grace: Duration) {
        if self.process.try_reap().is_some() {
            self.collect(KILL_WAIT).await;
            return;
        }
        let started = Instant::now();
        let quit = match grace.min(QMP_TIMEOUT) {
            Duration::ZERO => Ok(()),
            limit => self.qmp("QMP quit", limit, async |q| q.quit().await).await,
        };
        match quit {
            Ok(()) => {}
            Err(e) => {
                tracing::debug!(vm = %self.id, error = %e, "QMP quit failed; SIGTERM");
                if let Err(e) = self.process.pidfd().terminate() {
                    tracing::warn!(vm = %self.id, error = %e, "SIGTERM QEMU");
                }
            }
        }
        let rest = grace.saturating_sub(started.elapsed());
        if tokio::time::timeout(rest, self.process.exited())
            .await
            .is_err()
        {
            tracing::warn!(vm = %self.id, ?grace, "QEMU did not quit in time; SIGKILL");
            self.kill_and_collect().await;
        } else {
            self.collect(KILL_WAIT).await;
        }
        tracing::debug!(vm = %self.id, exit = ?self.process.exit.get(), "QEMU stopped");
    }

    async fn exited(&self) {
        self.process.exited().await;
    }

    fn exit_status(&self) -> Option<VmmExit> {
        self.process.try_reap()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.process.try_reap().is_some() {
            return;
        }
        tracing::warn!(vm = %self.id, "VM dropped without stop; killing QEMU");
        let pidfd = self.process.pidfd();
        if let Err(e) = pidfd.kill() {
            tracing::error!(vm = %self.id, error = %e, "SIGKILL QEMU");
            return;
        }
        // Collect it off this thread (it may be a runtime's): it is gone in milliseconds.
        match pidfd.try_clone() {
            Ok(fd) => {
                let _ = std::thread::Builder::new()
                    .name("vm-reap".into())
                    .spawn(move || fd.reap_blocking());
            }
            Err(e) => tracing::warn!(vm = %self.id, error = %e, "dup pidfd"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_cache_holds_one_boots_believable_rate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("host-tsc-khz");
        assert_eq!(read_tsc_cache(&path, "boot-a"), None, "nothing cached yet");
        write_tsc_cache(&path, "boot-a", 2_100_007).unwrap();
        assert_eq!(read_tsc_cache(&path, "boot-a"), Some(2_100_007));
        assert_eq!(read_tsc_cache(&path, "boot-b"), None, "another boot's rate");
        std::fs::write(&path, "boot-a 7\n").unwrap();
        assert_eq!(
            read_tsc_cache(&path, "boot-a"),
            None,
            "an unbelievable rate"
        );
        std::fs::write(&path, "boot-a many\n").unwrap();
        assert_eq!(read_tsc_cache(&path, "boot-a"), None, "not a number");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["host-tsc-khz"], "nothing left aside");
    }
}
