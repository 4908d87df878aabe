//! The built-in backend: the guest runs in this process on [`yard_vmm`] (KVM, no QEMU), the
//! fast path where `/dev/kvm` has hardware virtualization.
//!
//! The agent channel is virtio-vsock: the VMM's hybrid-vsock device listens on `vsock.sock` in
//! the VM's state directory, and the host side reaches the agent's port with firecracker's
//! `CONNECT <port>\n` / `OK <host port>\n` handshake; after that the stream carries the agent's
//! ready banner and then ttrpc, exactly as the QEMU backend's virtio-serial port does. The
//! guest's agent writes the boot-timer magic when it serves, so [`Vm::boot_time`] is the VMM's
//! own measurement.
//!
//! No 9p ([`Hypervisor::shares_files`] is false): later containers of a sandbox get their
//! images as disks. The VM boots with [`SPARE_DISKS`] empty read-only virtio-blk devices after
//! the root disk (`/dev/vdb` ...); [`Vm::attach_disk`] swaps an image into a free one and
//! raises a config-change interrupt, so the guest's driver picks up the new capacity, and
//! [`Vm::detach_disk`] empties it again (firecracker's "update a drive's backing file").
//! virtio-mmio has no hotplug, so the spares are the limit on containers per sandbox.
//!
//! A pod network's tap ([`VmConfig::net`](crate::hypervisor::VmConfig)) becomes the VMM's
//! virtio-net device, after the disks and vsock (the guest's `eth0`).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use yard_agent_protocol::{CMDLINE_BOOT_TIMER, CMDLINE_CHANNEL, READY_BANNER, VSOCK_PORT};
use yard_vmm::vmm::{BlockConfig, NetConfig, SetDiskError, VmExit, VmmConfig, VsockConfig};

use crate::hypervisor::{Accel, BootVmError, Hypervisor, Vm, VmConfig, VmError, VmStatus, VmmExit};
use crate::qemu::cmdline::BASE_KERNEL_ARGS;
use crate::qemu::console::{BoundedLog, LOG_CAP_BYTES, TAIL_LINES};

/// The guest's vsock context id (2 is the host; 3 is the first guest id, as firecracker uses).
const GUEST_CID: u32 = 3;
/// Console lines quoted in boot errors.
const ERROR_TAIL_LINES: usize = 30;
/// Between attempts to reach the agent while the guest boots.
const CONNECT_RETRY: Duration = Duration::from_millis(5);
/// One attempt: connect, handshake, banner.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Empty disk slots a VM boots with, for later containers of its sandbox: with the root disk,
/// a sandbox runs up to `1 + SPARE_DISKS` containers at once. Each costs an MMIO page, an IRQ
/// line and, once the guest's driver set it up, an idle worker thread.
pub const SPARE_DISKS: u8 = 4;

/// The built-in KVM backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Builtin;

#[async_trait]
impl Hypervisor for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn shares_files(&self) -> bool {
        false
    }

    async fn boot(&self, cfg: VmConfig) -> Result<Box<dyn Vm>, BootVmError> {
        if !cfg.kernel.is_file() {
            return Err(BootVmError::KernelMissing { path: cfg.kernel });
        }
        if !cfg.initrd.is_file() {
            return Err(BootVmError::InitrdMissing { path: cfg.initrd });
        }
        if let Some(disk) = cfg.root_disk.as_ref().filter(|d| !d.is_file()) {
            return Err(BootVmError::RootDiskMissing { path: disk.clone() });
        }
        // The VMM owns its descriptor of the tap (the device lives while one is open); ours
        // stays with the engine's config.
        let net = match &cfg.net {
            Some(net) => Some(NetConfig {
                tap: net
                    .tap
                    .try_clone()
                    .map_err(BootVmError::io("duplicate the tap's descriptor"))?,
                mac: net.mac,
                mtu: net.mtu,
            }),
            None => None,
        };
        let log_path = cfg.state_dir.join("console.log");
        let file = File::create(&log_path).map_err(|source| BootVmError::ConsoleLog {
            path: log_path.clone(),
            source,
        })?;
        let console = Arc::new(Mutex::new(BoundedLog::new(
            Some(file),
            LOG_CAP_BYTES,
            TAIL_LINES,
        )));
        let uds_path = cfg.state_dir.join("vsock.sock");
        let _ = std::fs::remove_file(&uds_path);
        let vmm_cfg = VmmConfig {
            kernel: cfg.kernel.clone(),
            initrd: Some(cfg.initrd.clone()),
            cmdline: kernel_cmdline(&cfg.kernel_args),
            vcpus: u8::try_from(cfg.vcpus).unwrap_or(u8::MAX),
            memory_mib: cfg.memory_mib,
            console: Box::new(ConsoleWriter(console.clone())),
            block: cfg.root_disk.clone().map(|path| BlockConfig {
                path,
                read_only: true,
            }),
            spare_disks: SPARE_DISKS,
            vsock: Some(VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: uds_path.clone(),
            }),
            net,
        };
        let first_spare = usize::from(cfg.root_disk.is_some());
        let started = Instant::now();
        let vm = tokio::task::spawn_blocking(move || yard_vmm::vmm::Vm::start(vmm_cfg))
            .await
            .map_err(|e| BootVmError::Io {
                what: "VMM start task",
                source: io::Error::other(e.to_string()),
            })?
            .map_err(|source| BootVmError::Vmm { source })?;
        let exit_fd = vm
            .exit_fd()
            .try_clone_to_owned()
            .and_then(crate::sys::watch_fd)
            .map_err(BootVmError::io("watch the VM's exit"));
        let vm = BuiltinVm {
            id: cfg.id.clone(),
            vm: Arc::new(vm),
            exit_fd: match exit_fd {
                Ok(fd) => fd,
                Err(e) => {
                    // The VM is dropped (and stopped) with this scope.
                    return Err(e);
                }
            },
            console,
            agent: None,
            banner_at: Duration::ZERO,
            first_spare,
            spares: Mutex::new(vec![false; usize::from(SPARE_DISKS)]),
        };
        let tail = |vm: &BuiltinVm| vm.console_tail(ERROR_TAIL_LINES);
        let reached = tokio::select! {
            biased;
            () = vm.exited() => Err(BootVmError::ExitedDuringBoot {
                status: vm.exit_status().unwrap_or(VmmExit::Unknown),
                console: tail(&vm),
            }),
            r = tokio::time::timeout(cfg.boot_timeout, connect_agent(&uds_path)) => match r {
                Ok(r) => r,
                Err(_) => Err(BootVmError::Timeout {
                    timeout_ms: cfg.boot_timeout.as_millis() as u64,
                    console: tail(&vm),
                }),
            },
        };
        let mut vm = vm;
        match reached {
            Ok(stream) => {
                vm.agent = Some(stream);
                vm.banner_at = started.elapsed();
                Ok(Box::new(vm))
            }
            Err(e) => {
                vm.stop(Duration::ZERO).await;
                Err(e)
            }
        }
    }
}

/// The kernel command line: the QEMU backend's base arguments (console, panic and reboot
/// behaviour), the agent's vsock-only channel and boot timer, then the user's.
pub fn kernel_cmdline(extra: &[String]) -> String {
    let mut args: Vec<String> = BASE_KERNEL_ARGS.iter().map(|a| (*a).to_owned()).collect();
    args.push(format!("{CMDLINE_CHANNEL}=vsock"));
    args.push(format!("{CMDLINE_BOOT_TIMER}=1"));
    args.extend(extra.iter().cloned());
    args.join(" ")
}

/// Reaches the agent through the hybrid-vsock socket, retrying while the guest boots (the
/// device closes the connection while nothing listens on the guest's port yet).
async fn connect_agent(uds_path: &std::path::Path) -> Result<UnixStream, BootVmError> {
    loop {
        match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(uds_path)).await {
            Ok(Ok(Some(stream))) => return Ok(stream),
            Ok(Err(e @ BootVmError::BannerMismatch { .. })) => return Err(e),
            // Not there yet: no socket, refused, reset, or closed before `OK`.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {}
        }
        tokio::time::sleep(CONNECT_RETRY).await;
    }
}

/// One attempt; `Ok(None)` when the agent is not listening yet.
async fn attempt(uds_path: &std::path::Path) -> Result<Option<UnixStream>, BootVmError> {
    let Ok(mut stream) = UnixStream::connect(uds_path).await else {
        return Ok(None);
    };
    stream
        .write_all(format!("CONNECT {VSOCK_PORT}\n").as_bytes())
        .await
        .map_err(BootVmError::io("write the vsock CONNECT"))?;
    // Read the `OK <port>\n` line byte by byte: nothing after it may be buffered away.
    let mut reader = BufReader::with_capacity(1, &mut stream);
    let mut line = String::new();
    if reader.read_line(&mut line).await.unwrap_or(0) == 0 || !line.starts_with("OK ") {
        return Ok(None);
    }
    drop(reader);
    let mut banner = [0u8; READY_BANNER.len()];
    match stream.read_exact(&mut banner).await {
        Ok(_) if banner[..] == *READY_BANNER => Ok(Some(stream)),
        Ok(_) => Err(BootVmError::BannerMismatch {
            got: String::from_utf8_lossy(&banner).into_owned(),
        }),
        Err(_) => Ok(None),
    }
}

/// The serial console's writer: the bounded `console.log` plus the in-memory tail.
struct ConsoleWriter(Arc<Mutex<BoundedLog<File>>>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct BuiltinVm {
    id: String,
    vm: Arc<yard_vmm::vmm::Vm>,
    /// A dup of the VM's exit eventfd: readable once the VM has ended.
    exit_fd: AsyncFd<OwnedFd>,
    console: Arc<Mutex<BoundedLog<File>>>,
    agent: Option<UnixStream>,
    /// From `boot` to the banner, when the VMM's boot timer did not fire.
    banner_at: Duration,
    /// The VMM's disk slot of the first spare (after the root disk).
    first_spare: usize,
    /// Which spares hold an image.
    spares: Mutex<Vec<bool>>,
}

/// The guest's name for virtio-blk disk `slot`: Linux names them in probe order, which is the
/// VMM's slot order.
fn guest_device(slot: usize) -> Option<String> {
    let letter = u8::try_from(slot).ok().filter(|s| *s < 26)?;
    Some(format!("/dev/vd{}", char::from(b'a' + letter)))
}

/// The inverse of [`guest_device`].
fn device_slot(device: &str) -> Option<usize> {
    match device.strip_prefix("/dev/vd")?.as_bytes() {
        [c @ b'a'..=b'z'] => Some(usize::from(c - b'a')),
        _ => None,
    }
}

impl BuiltinVm {
    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `set_disk` off the async threads: it opens a file and waits for a request in flight.
    async fn set_disk(&self, slot: usize, disk: Option<BlockConfig>) -> Result<(), SetDiskError> {
        let vm = self.vm.clone();
        tokio::task::spawn_blocking(move || vm.set_disk(slot, disk))
            .await
            .unwrap_or(Err(SetDiskError::Ended))
    }
}

fn disk_error(what: &'static str, e: SetDiskError) -> VmError {
    match e {
        SetDiskError::Ended => VmError::Exited,
        e => VmError::Backend {
            what,
            source: Box::new(e),
        },
    }
}

#[async_trait]
impl Vm for BuiltinVm {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn take_agent_stream(&mut self) -> Option<UnixStream> {
        self.agent.take()
    }

    fn boot_time(&self) -> Duration {
        self.vm.boot_time().unwrap_or(self.banner_at)
    }

    fn accel(&self) -> Accel {
        Accel::Kvm
    }

    fn console_tail(&self, max_lines: usize) -> String {
        self.console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tail(max_lines)
    }

    async fn status(&self) -> Result<VmStatus, VmError> {
        Ok(match self.vm.exit() {
            None => VmStatus {
                state: "running".into(),
                running: true,
            },
            Some(VmExit::Error(_)) => VmStatus {
                state: "internal-error".into(),
                running: false,
            },
            Some(_) => VmStatus {
                state: "shutdown".into(),
                running: false,
            },
        })
    }

    /// The VMM runs in this process: there is nothing to ask; the vCPUs and devices stop and
    /// their threads are joined (the guest had its chance: the engine asked the agent to shut
    /// down first).
    async fn stop(&self, _grace: Duration) {
        let vm = self.vm.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || vm.stop()).await {
            tracing::error!(vm = %self.id, error = %e, "stop the VM");
        }
    }

    async fn exited(&self) {
        // The eventfd stays readable once written (nobody reads it), so every waiter wakes.
        if let Err(e) = self.exit_fd.readable().await {
            tracing::error!(vm = %self.id, error = %e, "wait for the VM's exit");
            std::future::pending::<()>().await;
        }
    }

    fn exit_status(&self) -> Option<VmmExit> {
        self.vm.exit().map(|e| match e {
            VmExit::Reset | VmExit::Stopped => VmmExit::Code(0),
            VmExit::Error(e) => {
                tracing::warn!(vm = %self.id, error = %e, "the VMM failed");
                VmmExit::Code(1)
            }
        })
    }

    async fn attach_disk(&self, image: &Path) -> Result<String, VmError> {
        let spare = {
            let mut spares = self.spares();
            let Some(i) = spares.iter().position(|used| !used) else {
                return Err(VmError::NoFreeDisk {
                    slots: spares.len(),
                });
            };
            spares[i] = true;
            i
        };
        let slot = self.first_spare + spare;
        let Some(device) = guest_device(slot) else {
            self.spares()[spare] = false;
            return Err(VmError::Unsupported("disk name past /dev/vdz"));
        };
        let disk = BlockConfig {
            path: image.to_owned(),
            read_only: true,
        };
        if let Err(e) = self.set_disk(slot, Some(disk)).await {
            self.spares()[spare] = false;
            return Err(disk_error("attach a disk", e));
        }
        tracing::debug!(vm = %self.id, image = %image.display(), device, "disk attached");
        Ok(device)
    }

    async fn detach_disk(&self, guest_device: &str) -> Result<(), VmError> {
        let spare = device_slot(guest_device)
            .and_then(|slot| slot.checked_sub(self.first_spare))
            .filter(|&i| self.spares().get(i).copied().unwrap_or(false))
            .ok_or_else(|| VmError::UnknownDisk(guest_device.to_owned()))?;
        match self.set_disk(self.first_spare + spare, None).await {
            // Nothing is attached to a VM that ended.
            Ok(()) | Err(SetDiskError::Ended) => {}
            Err(e) => return Err(disk_error("detach a disk", e)),
        }
        self.spares()[spare] = false;
        tracing::debug!(vm = %self.id, device = guest_device, "disk detached");
        Ok(())
    }
}

impl Drop for BuiltinVm {
    fn drop(&mut self) {
        // Joins the vCPU and device threads; quick, because they only wait on KVM_RUN and
        // epoll, both of which `stop` interrupts.
        self.vm.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_device_names_follow_slots() {
        assert_eq!(guest_device(0).as_deref(), Some("/dev/vda"));
        assert_eq!(guest_device(4).as_deref(), Some("/dev/vde"));
        assert_eq!(guest_device(26), None);
        for slot in 0..26 {
            assert_eq!(
                device_slot(&guest_device(slot).unwrap_or_default()),
                Some(slot)
            );
        }
        for bad in ["/dev/vd", "/dev/vdaa", "/dev/sda", "vdb", "/dev/vdB"] {
            assert_eq!(device_slot(bad), None, "{bad}");
        }
    }
}
