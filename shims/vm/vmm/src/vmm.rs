//! A running VM assembled from a [`VmmConfig`]: KVM VM and guest memory, the kernel and boot
//! structures, the port-I/O devices (serial console, i8042, boot timer), virtio-mmio devices
//! (block, vsock), one thread per vCPU and one control thread.
//!
//! Ending: a vCPU thread that sees a triple fault (`KVM_EXIT_SHUTDOWN`, what `reboot=t` and
//! `panic=-1` produce), an unhandled exit or a failed ioctl records why and wakes the control
//! thread; so do the i8042's reset line and [`Vm::stop`]. The control thread raises the stop
//! flag, kicks every vCPU thread out of `KVM_RUN` with a real-time signal until it has returned,
//! joins them, records the [`VmExit`] and writes the exit eventfd once. Device threads belong to
//! the virtio transports and end when [`Vm::stop`] (or drop) drops the buses.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64 as arch;
use crate::bus::{Bus, BusError, SharedDevice};
use crate::devices::boot_timer::{BootTimer, BootTimerState};
use crate::devices::i8042::I8042;
use crate::devices::ratelimit::LogLimiter;
use crate::devices::serial::Serial;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockError, BlockHandle};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::irq::{EventFdInterrupt, Interrupt};
use crate::kvm::vm::{CreateVcpuError, CreateVmError, IrqError};
use crate::kvm::{GuestRam, GuestRamError, KvmVm, Vcpu, vcpu};
use crate::layout;

/// The smallest VM: boot structures below 1 MiB, the kernel from 2 MiB (a test program) or
/// 16 MiB (vmlinux).
pub const MIN_MEMORY_MIB: u32 = 8;
/// Offset of the virtio-mmio `QueueNotify` register (the ioeventfd address).
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

pub struct VsockConfig {
    pub guest_cid: u32,
    /// The host side: a Unix socket speaking firecracker's hybrid-vsock `CONNECT <port>`.
    pub uds_path: PathBuf,
}

pub struct VmmConfig {
    /// An ELF: vmlinux, or a static test program linked at a physical address, entered in
    /// 64-bit mode with the first 4 GiB identity mapped.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The VMM appends one `virtio_mmio.device=` per device.
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// Serial output (the guest console).
    pub console: Box<dyn Write + Send>,
    /// The first virtio-blk disk (`/dev/vda` in a Linux guest).
    pub block: Option<BlockConfig>,
    /// Read-only virtio-blk devices without a backing file (capacity 0) after `block`, for
    /// [`Vm::set_disk`] to fill at run time. They are probed in MMIO order, which is
    /// command-line order: `block`, then the spares, then vsock, so a Linux guest names them
    /// `vda`, `vdb`, ... in disk-slot order.
    pub spare_disks: u8,
    pub vsock: Option<VsockConfig>,
}

/// Lower-level knobs for tests and tooling; [`Vm::start`] uses the defaults.
#[derive(Default)]
pub struct StartOptions {
    /// Run this real-mode code instead of loading `kernel` (which is then ignored): copied to
    /// `load_addr` and entered there with every segment at 0, on a VM without boot structures.
    pub real_mode: Option<RealModeImage>,
    /// Extra devices on the MMIO bus: (device, base, length).
    pub mmio_devices: Vec<(SharedDevice, u64, u64)>,
}

pub struct RealModeImage {
    pub code: Vec<u8>,
    pub load_addr: u16,
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset: i8042 reset command, or a triple fault (`KVM_EXIT_SHUTDOWN`, which is
    /// how `reboot=t` and `panic=-1` end a guest).
    Reset,
    /// [`Vm::stop`] was called.
    Stopped,
    /// An unhandled vCPU exit or a failed ioctl.
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    #[error("{0} vCPUs requested; 1 to {max} are supported", max = arch::mptable::max_cpus())]
    Vcpus(u8),
    #[error("{0} MiB of memory requested; at least {MIN_MEMORY_MIB} MiB are needed")]
    Memory(u32),
    #[error("too many virtio devices")]
    TooManyDevices,
    #[error("installing the vCPU kick signal handler")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
    #[error(transparent)]
    CreateVm(#[from] CreateVmError),
    #[error(transparent)]
    GuestRam(#[from] GuestRamError),
    #[error(transparent)]
    Irq(#[from] IrqError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("creating an eventfd or epoll")]
    Fd(#[source] io::Error),
    #[error("creating the virtio-block device")]
    Block(#[source] BlockError),
    #[error("creating the virtio-vsock device")]
    Vsock(#[source] VsockError),
    #[error("creating the virtio-mmio transport for device {index}")]
    Transport {
        index: u32,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Boot(#[from] arch::ConfigureMemoryError),
    #[error("building the kernel command line")]
    Cmdline(#[from] arch::boot::CmdlineError),
    #[error("loading the real-mode image")]
    RealMode(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    CreateVcpu(#[from] CreateVcpuError),
    #[error(transparent)]
    ConfigureVcpu(#[from] arch::ConfigureVcpuError),
    #[error("spawning a VM thread")]
    Spawn(#[source] io::Error),
}

/// Why [`Vm::set_disk`] failed; the slot keeps its old backing file.
#[derive(Debug, thiserror::Error)]
pub enum SetDiskError {
    #[error("no disk slot {slot}: the VM has {count}")]
    NoSlot { slot: usize, count: usize },
    #[error("the VM has ended")]
    Ended,
    #[error(transparent)]
    Open(#[from] BlockError),
}

/// State shared by the vCPU threads, the control thread and the [`Vm`] handle.
struct Shared {
    /// Raised by the control thread; vCPU threads leave their loop when they see it.
    stop: AtomicBool,
    /// The first reason given for ending (by a vCPU, the i8042, or `stop`).
    reason: Mutex<Option<VmExit>>,
    /// Written to wake the control thread once a reason is recorded.
    wake: EventFd,
    /// Set by the control thread once every vCPU thread is joined.
    ended: Mutex<Option<VmExit>>,
    ended_cond: Condvar,
    exit_evt: EventFd,
    /// The vCPU threads, for the control thread to join.
    vcpus: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// Records why the VM ends (the first reason wins) and wakes the control thread.
    fn end(&self, exit: VmExit) {
        {
            let mut reason = lock(&self.reason);
            if reason.is_none() {
                *reason = Some(exit);
            }
        }
        if let Err(e) = self.wake.write(1) {
            tracing::error!(error = %e, "waking the VM control thread");
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything the guest's I/O reaches; dropped by `stop` after the vCPU threads are joined, which
/// ends the device threads.
struct Devices {
    _io: Bus,
    _mmio: Bus,
    /// The virtio-blk devices in slot order, for [`Vm::set_disk`].
    disks: Vec<DiskSlot>,
}

/// One virtio-blk device: its backing file and the transport that announces a change.
struct DiskSlot {
    handle: BlockHandle,
    transport: Arc<Mutex<MmioTransport>>,
}

impl DiskSlot {
    /// Swaps the backing file, then raises the config-change interrupt so the driver re-reads
    /// the capacity (Linux: `virtblk_config_changed`). The swap waits for a request in flight.
    fn set(&self, disk: Option<&BlockConfig>) -> Result<(), BlockError> {
        self.handle
            .set(disk.map(|d| (d.path.as_path(), d.read_only)))?;
        lock(&self.transport).notify_config_change();
        Ok(())
    }
}

/// A running VM.
pub struct Vm {
    shared: Arc<Shared>,
    control: Mutex<Option<JoinHandle<()>>>,
    devices: Mutex<Option<Devices>>,
    boot_timer: Arc<BootTimerState>,
    boot_timer_evt: EventFd,
    // Closed after the threads that use it are joined (`Drop` runs `stop` first); it owns the
    // guest memory and unmaps it only after the VM's last fd is closed.
    kvm: KvmVm,
}

impl Vm {
    /// Builds and starts a VM. On error nothing is left running.
    pub fn start(cfg: VmmConfig) -> Result<Vm, StartVmError> {
        Vm::start_with(cfg, StartOptions::default())
    }

    /// [`Vm::start`] with test and tooling options.
    pub fn start_with(cfg: VmmConfig, opts: StartOptions) -> Result<Vm, StartVmError> {
        let started = Instant::now();
        let max_cpus = arch::mptable::max_cpus();
        if cfg.vcpus == 0 || usize::from(cfg.vcpus) > max_cpus {
            return Err(StartVmError::Vcpus(cfg.vcpus));
        }
        if cfg.memory_mib < MIN_MEMORY_MIB {
            return Err(StartVmError::Memory(cfg.memory_mib));
        }
        vcpu::install_kick_handler().map_err(StartVmError::KickSignal)?;

        let ram = GuestRam::new(u64::from(cfg.memory_mib) << 20)?;
        let regions: Vec<(u64, u64)> = ram.regions().map(|(gpa, size, _)| (gpa, size)).collect();
        let mut kvm = KvmVm::new(ram)?;
        kvm.setup_irqchip();
        let mem = &kvm.memory().clone();

        let fd = |r: io::Result<EventFd>| r.map_err(StartVmError::Fd);
        let mut io_bus = Bus::new();
        let serial_irq = Arc::new(EventFdInterrupt::new().map_err(StartVmError::Fd)?);
        register_irq(&kvm, &serial_irq, layout::SERIAL_IRQ)?;
        let serial = Serial::new(serial_irq as Arc<dyn Interrupt>, cfg.console);
        io_bus.insert(
            Arc::new(Mutex::new(serial)),
            u64::from(layout::SERIAL_PORT),
            u64::from(layout::SERIAL_PORT_SIZE),
        )?;
        let reset_evt = fd(EventFd::new(libc::EFD_NONBLOCK))?;
        let i8042 = I8042::new(fd(reset_evt.try_clone())?);
        io_bus.insert(
            Arc::new(Mutex::new(i8042)),
            u64::from(layout::I8042_PORT),
            u64::from(layout::I8042_PORT_SIZE),
        )?;
        let boot_timer_evt = fd(EventFd::new(libc::EFD_NONBLOCK))?;
        let (boot_timer, boot_timer_state) =
            BootTimer::new(started, fd(boot_timer_evt.try_clone())?);
        io_bus.insert(
            Arc::new(Mutex::new(boot_timer)),
            u64::from(layout::BOOT_TIMER_PORT),
            1,
        )?;

        // MMIO (and so probe) order: the root disk, the spare disks, vsock.
        let mut virtio: Vec<(Box<dyn VirtioDevice>, Option<BlockHandle>)> = Vec::new();
        let count = usize::from(cfg.block.is_some())
            + usize::from(cfg.spare_disks)
            + usize::from(cfg.vsock.is_some());
        if count > layout::VIRTIO_MAX_DEVICES as usize {
            return Err(StartVmError::TooManyDevices);
        }
        if let Some(block) = &cfg.block {
            let dev = Block::new(&block.path, block.read_only).map_err(StartVmError::Block)?;
            let handle = dev.handle();
            virtio.push((Box::new(dev), Some(handle)));
        }
        for _ in 0..cfg.spare_disks {
            let dev = Block::empty(true);
            let handle = dev.handle();
            virtio.push((Box::new(dev), Some(handle)));
        }
        if let Some(vsock) = cfg.vsock {
            virtio.push((
                Box::new(
                    Vsock::new(u64::from(vsock.guest_cid), vsock.uds_path)
                        .map_err(StartVmError::Vsock)?,
                ),
                None,
            ));
        }
        let mut mmio_bus = Bus::new();
        let mut cmdline_extra = Vec::new();
        let mut disks = Vec::new();
        for (index, (device, disk)) in (0u32..).zip(virtio) {
            let base = layout::VIRTIO_MMIO_BASE + u64::from(index) * layout::VIRTIO_MMIO_SIZE;
            let irq = Arc::new(EventFdInterrupt::new().map_err(StartVmError::Fd)?);
            register_irq(&kvm, &irq, layout::VIRTIO_IRQ_BASE + index)?;
            let transport = MmioTransport::new(mem.clone(), device, irq as Arc<dyn Interrupt>)
                .map_err(|source| StartVmError::Transport { index, source })?;
            for (queue, evt) in (0u32..).zip(transport.queue_evts()) {
                // Without the ioeventfd a notify is an MMIO exit the transport turns into the
                // same eventfd signal: slower, not different.
                let addr = base + VIRTIO_MMIO_QUEUE_NOTIFY;
                if let Err(e) = kvm.register_ioevent(evt, addr, queue) {
                    tracing::debug!(error = %e, queue, "no ioeventfd; queue notifies exit to the VMM");
                }
            }
            let transport = Arc::new(Mutex::new(transport));
            if let Some(handle) = disk {
                disks.push(DiskSlot {
                    handle,
                    transport: transport.clone(),
                });
            }
            mmio_bus.insert(transport, base, layout::VIRTIO_MMIO_SIZE)?;
            cmdline_extra.push(layout::virtio_mmio_cmdline(index));
        }
        for (device, base, len) in opts.mmio_devices {
            mmio_bus.insert(device, base, len)?;
        }

        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        for id in 0..cfg.vcpus {
            vcpus.push(kvm.create_vcpu(id)?);
        }
        match &opts.real_mode {
            Some(image) => {
                mem.write_slice(&image.code, GuestAddress(u64::from(image.load_addr)))
                    .map_err(StartVmError::RealMode)?;
                for vcpu in &vcpus {
                    arch::configure_vcpu_real_mode(&kvm, vcpu, cfg.vcpus, image.load_addr)?;
                }
            }
            None => {
                let cmdline = arch::boot::build_cmdline(&cfg.cmdline, &cmdline_extra)?;
                let images = arch::BootImages {
                    kernel: &cfg.kernel,
                    initrd: cfg.initrd.as_deref(),
                    cmdline: &cmdline,
                    vcpus: cfg.vcpus,
                };
                let kernel = arch::configure_memory(mem, &regions, &images)?;
                for vcpu in &vcpus {
                    arch::configure_vcpu(&kvm, vcpu, cfg.vcpus, kernel.entry)?;
                }
            }
        }

        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            reason: Mutex::new(None),
            wake: fd(EventFd::new(libc::EFD_NONBLOCK))?,
            ended: Mutex::new(None),
            ended_cond: Condvar::new(),
            exit_evt: fd(EventFd::new(libc::EFD_NONBLOCK))?,
            vcpus: Mutex::new(Vec::new()),
        });
        let epoll = Epoll::new().map_err(StartVmError::Fd)?;
        for (token, evt) in [(WAKE_TOKEN, &shared.wake), (RESET_TOKEN, &reset_evt)] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(StartVmError::Fd)?;
        }

        // The control thread first, so a failure below has it stop whatever vCPU threads
        // already run; it takes their handles from `shared.vcpus` only once all are spawned
        // (this holds the lock until then).
        let control = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("vm-control".into())
                .spawn(move || control(epoll, reset_evt, shared))
                .map_err(StartVmError::Spawn)?
        };
        let ctx = VcpuContext {
            shared: shared.clone(),
            io: io_bus.clone(),
            mmio: mmio_bus.clone(),
            irqchip: kvm.has_irqchip(),
        };
        let spawned = {
            let mut threads = lock(&shared.vcpus);
            vcpus.into_iter().try_for_each(|vcpu| {
                let ctx = ctx.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("vcpu{}", vcpu.id()))
                    .spawn(move || run_vcpu(vcpu, ctx))?;
                threads.push(handle);
                Ok(())
            })
        };
        drop(ctx);
        if let Err(e) = spawned {
            shared.end(VmExit::Error("starting the vCPU threads failed".into()));
            if control.join().is_err() {
                tracing::error!("the VM control thread panicked");
            }
            return Err(StartVmError::Spawn(e));
        }

        tracing::info!(
            vcpus = cfg.vcpus,
            memory_mib = cfg.memory_mib,
            irqchip = kvm.has_irqchip(),
            setup_us = started.elapsed().as_micros() as u64,
            "VM started"
        );
        Ok(Vm {
            shared,
            control: Mutex::new(Some(control)),
            devices: Mutex::new(Some(Devices {
                _io: io_bus,
                _mmio: mmio_bus,
                disks,
            })),
            boot_timer: boot_timer_state,
            boot_timer_evt,
            kvm,
        })
    }

    /// The guest's memory (for inspection; it stays mapped until the `Vm` is dropped).
    pub fn memory(&self) -> &crate::GuestMemory {
        self.kvm.memory()
    }

    /// Whether KVM gave the VM an in-kernel irqchip (so interrupts reach the guest).
    pub fn has_irqchip(&self) -> bool {
        self.kvm.has_irqchip()
    }

    /// From [`Vm::start`] to the guest's boot-timer write, once it happened.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_timer.get()
    }

    /// Readable once the boot timer fired.
    pub fn boot_timer_fd(&self) -> BorrowedFd<'_> {
        borrow_fd(&self.boot_timer_evt)
    }

    /// Readable once the VM has ended (all vCPU threads joined).
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        borrow_fd(&self.shared.exit_evt)
    }

    /// Why the VM ended; `None` while it runs.
    pub fn exit(&self) -> Option<VmExit> {
        lock(&self.shared.ended).clone()
    }

    /// Blocks until the VM has ended.
    pub fn wait(&self) -> VmExit {
        let mut ended = lock(&self.shared.ended);
        loop {
            if let Some(exit) = ended.as_ref() {
                return exit.clone();
            }
            ended = self
                .shared
                .ended_cond
                .wait(ended)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Gives virtio-blk disk `slot` (0 is [`VmmConfig::block`] when there is one, then the
    /// spares in order) a new backing file, or empties it with `None`, and tells the guest's
    /// driver with a config-change interrupt. The guest must not be using the old file (a
    /// Linux guest: nothing mounted from it).
    pub fn set_disk(&self, slot: usize, disk: Option<BlockConfig>) -> Result<(), SetDiskError> {
        if self.exit().is_some() {
            return Err(SetDiskError::Ended);
        }
        let devices = lock(&self.devices);
        let Some(devices) = devices.as_ref() else {
            return Err(SetDiskError::Ended);
        };
        let count = devices.disks.len();
        let target = devices
            .disks
            .get(slot)
            .ok_or(SetDiskError::NoSlot { slot, count })?;
        target.set(disk.as_ref())?;
        tracing::info!(
            slot,
            path = ?disk.as_ref().map(|d| &d.path),
            sectors = target.handle.capacity(),
            "disk backing file set"
        );
        Ok(())
    }

    /// Stops the vCPUs and the devices and joins their threads. Idempotent; a VM that already
    /// ended keeps its exit reason. Concurrent calls all return once the VM has ended.
    pub fn stop(&self) {
        // Held until the control thread is joined, so a second caller waits for the first.
        let mut control = lock(&self.control);
        if let Some(control) = control.take() {
            self.shared.end(VmExit::Stopped);
            if control.join().is_err() {
                tracing::error!("the VM control thread panicked");
            }
        }
        drop(control);
        // The vCPU threads' bus clones are gone: this drops the devices and joins their threads.
        drop(lock(&self.devices).take());
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `EventFd` predates `AsFd`.
fn borrow_fd(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is open and owned by `evt`, and the returned borrow cannot outlive
    // `evt` (same lifetime).
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

const WAKE_TOKEN: u64 = 0;
const RESET_TOKEN: u64 = 1;

/// The control thread: waits for a reason to end, then stops and joins the vCPU threads.
fn control(epoll: Epoll, reset: EventFd, shared: Arc<Shared>) {
    let mut events = [EpollEvent::default(); 2];
    loop {
        match epoll.wait(-1, &mut events) {
            Ok(n) => {
                if events[..n].iter().any(|e| e.data() == RESET_TOKEN) {
                    tracing::info!("guest reset through the i8042");
                    shared.end(VmExit::Reset);
                }
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                shared.end(VmExit::Error(format!("waiting for VM events: {e}")));
                break;
            }
        }
    }
    drop(reset);
    let vcpus = std::mem::take(&mut *lock(&shared.vcpus));
    stop_vcpus(&shared, vcpus);
    let exit = lock(&shared.reason)
        .clone()
        .unwrap_or_else(|| VmExit::Error("ended without a reason".into()));
    tracing::info!(exit = ?exit, "VM ended");
    *lock(&shared.ended) = Some(exit);
    shared.ended_cond.notify_all();
    if let Err(e) = shared.exit_evt.write(1) {
        tracing::error!(error = %e, "signalling the VM exit");
    }
}

/// Raises the stop flag and kicks each vCPU thread until it has left `KVM_RUN`, then joins it.
/// A kick can land just before the thread re-enters the guest (after its flag check), so it is
/// repeated until the thread is done.
fn stop_vcpus(shared: &Shared, vcpus: Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::Release);
    for handle in vcpus {
        while !handle.is_finished() {
            if let Err(e) = handle.kill(vcpu::kick_signal()) {
                tracing::error!(error = %e, "kicking a vCPU thread");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if handle.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

#[derive(Clone)]
struct VcpuContext {
    shared: Arc<Shared>,
    io: Bus,
    mmio: Bus,
    irqchip: bool,
}

/// Accesses to addresses no device claims: the guest controls how many.
static UNCLAIMED: LogLimiter = LogLimiter::new(10, Duration::from_secs(5));

fn unclaimed(kind: &str, addr: u64, len: usize) {
    if let Some(suppressed) = UNCLAIMED.check() {
        tracing::debug!(
            kind,
            addr = format_args!("{addr:#x}"),
            len,
            suppressed,
            "unclaimed guest access"
        );
    }
}

/// Ends the VM if its vCPU thread unwinds (a device model panicking in an exit handler), so
/// the control thread still stops the other vCPUs and `wait` returns.
struct EndOnPanic<'a> {
    shared: &'a Shared,
    id: u8,
}

impl Drop for EndOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared
                .end(VmExit::Error(format!("vCPU {} panicked", self.id)));
        }
    }
}

fn run_vcpu(mut vcpu: Vcpu, ctx: VcpuContext) {
    let id = vcpu.id();
    let _end_on_panic = EndOnPanic {
        shared: &ctx.shared,
        id,
    };
    if let Err(e) = vmm_sys_util::signal::unblock_signal(vcpu::kick_signal()) {
        ctx.shared.end(VmExit::Error(format!(
            "vCPU {id}: unblocking the kick signal: {e}"
        )));
        return;
    }
    let exit = loop {
        if ctx.shared.stopping() {
            break None;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.io.read(u64::from(port), data) {
                    data.fill(0xff);
                    unclaimed("port read", u64::from(port), data.len());
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.io.write(u64::from(port), data) {
                    unclaimed("port write", u64::from(port), data.len());
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                    unclaimed("mmio read", addr, data.len());
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    unclaimed("mmio write", addr, data.len());
                }
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel irqchip KVM waits for the interrupt itself and this exit
                // does not happen. Without one nothing can ever wake the vCPU: the boot vCPU
                // halting means the guest is done (tiny test guests end this way); another
                // vCPU just stays parked.
                if ctx.irqchip {
                    continue;
                }
                if id == 0 {
                    break Some(VmExit::Error(
                        "vCPU 0 halted with no interrupt controller".into(),
                    ));
                }
                park(&ctx.shared);
                break None;
            }
            Ok(VcpuExit::Shutdown) => break Some(VmExit::Reset),
            Ok(other) => {
                break Some(VmExit::Error(format!(
                    "vCPU {id}: unhandled exit {other:?}"
                )));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => break Some(VmExit::Error(format!("vCPU {id}: KVM_RUN: {e}"))),
        }
    };
    if let Some(exit) = exit {
        ctx.shared.end(exit);
    }
}

/// Sleeps until the VM stops (kicks interrupt the sleep).
fn park(shared: &Shared) {
    while !shared.stopping() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn register_irq(kvm: &KvmVm, irq: &EventFdInterrupt, gsi: u32) -> Result<(), IrqError> {
    if kvm.has_irqchip() {
        kvm.register_irqfd(irq, gsi)
    } else {
        // Nobody can deliver it: the device's triggers only count up the eventfd.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::print_stderr)]

    use super::*;

    /// Skips (printing why) without root and /dev/kvm, unless `SWITCHYARD_REQUIRE_ALL=1`.
    fn have_kvm() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if root && kvm {
            return true;
        }
        let reason = if root { "needs /dev/kvm" } else { "needs root" };
        if std::env::var_os("SWITCHYARD_REQUIRE_ALL").is_some_and(|v| v == "1") {
            panic!("required prerequisite missing: {reason}");
        }
        eprintln!("SKIP: {reason}");
        false
    }

    fn disk(path: &std::path::Path) -> Option<BlockConfig> {
        Some(BlockConfig {
            path: path.to_owned(),
            read_only: true,
        })
    }

    /// A spinning real-mode guest with a root disk and two spares: set_disk reaches every slot
    /// and refuses a bad slot, a missing file and a VM that ended.
    #[test]
    fn set_disk_swaps_slots_and_refuses_what_it_cannot() {
        if !have_kvm() {
            return;
        }
        let root = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(root.path(), [0u8; 4096]).unwrap();
        let image = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(image.path(), [1u8; 8192]).unwrap();
        let vm = Vm::start_with(
            VmmConfig {
                kernel: PathBuf::new(),
                initrd: None,
                cmdline: String::new(),
                vcpus: 1,
                memory_mib: 16,
                console: Box::new(io::sink()),
                block: disk(root.path()),
                spare_disks: 2,
                vsock: None,
            },
            StartOptions {
                // jmp $
                real_mode: Some(RealModeImage {
                    code: vec![0xeb, 0xfe],
                    load_addr: 0x1000,
                }),
                ..Default::default()
            },
        )
        .unwrap();
        let capacity = |slot: usize| {
            let devices = lock(&vm.devices);
            devices.as_ref().unwrap().disks[slot].handle.capacity()
        };
        assert_eq!((capacity(0), capacity(1), capacity(2)), (8, 0, 0));
        vm.set_disk(2, disk(image.path())).unwrap();
        assert_eq!((capacity(1), capacity(2)), (0, 16));
        vm.set_disk(0, None).unwrap();
        assert_eq!(capacity(0), 0);
        assert!(matches!(
            vm.set_disk(3, disk(image.path())),
            Err(SetDiskError::NoSlot { slot: 3, count: 3 })
        ));
        let missing = vm.set_disk(1, disk(std::path::Path::new("/nonexistent.img")));
        assert!(matches!(missing, Err(SetDiskError::Open(_))), "{missing:?}");
        assert_eq!(capacity(1), 0);
        vm.set_disk(2, None).unwrap();
        vm.stop();
        assert!(matches!(
            vm.set_disk(1, disk(image.path())),
            Err(SetDiskError::Ended)
        ));
    }
}
