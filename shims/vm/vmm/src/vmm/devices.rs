//! The VM's devices, assembled onto its two buses: the port-I/O devices (serial console,
//! i8042, boot timer) and the virtio-mmio devices (the root disk, the spare disks, vsock, net),
//! with their interrupts and ioeventfds registered with KVM.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::config::{BlockConfig, NetConfig, StartVmError, VsockConfig};
use super::control::lock;
use super::vcpu_thread::register_irq;
use crate::bus::{Bus, SharedDevice};
use crate::devices::boot_timer::{BootTimer, BootTimerState};
use crate::devices::i8042::I8042;
use crate::devices::serial::Serial;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{Block, BlockError, BlockHandle};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::irq::{EventFdInterrupt, Interrupt};
use crate::kvm::KvmVm;
use crate::layout;
use crate::seccomp::Seccomp;

/// Everything the guest's I/O reaches; dropped by `stop` after the vCPU threads are joined, which
/// ends the device threads.
pub(super) struct Devices {
    pub(super) _io: Bus,
    pub(super) _mmio: Bus,
    /// The virtio-blk devices in slot order, for [`Vm::set_disk`](super::Vm::set_disk).
    pub(super) disks: Vec<DiskSlot>,
}

/// One virtio-blk device: its backing file and the transport that announces a change.
pub(super) struct DiskSlot {
    pub(super) handle: BlockHandle,
    transport: Arc<Mutex<MmioTransport>>,
}

impl DiskSlot {
    /// Swaps the backing file, then raises the config-change interrupt so the driver re-reads
    /// the capacity (Linux: `virtblk_config_changed`). The swap waits for a request in flight.
    pub(super) fn set(&self, disk: Option<&BlockConfig>) -> Result<(), BlockError> {
        self.handle
            .set(disk.map(|d| (d.path.as_path(), d.read_only)))?;
        lock(&self.transport).notify_config_change();
        Ok(())
    }
}

/// The port-I/O bus and what the VM keeps of its devices.
pub(super) struct PortDevices {
    pub(super) bus: Bus,
    /// Written by the i8042 when the guest resets.
    pub(super) reset_evt: EventFd,
    pub(super) boot_timer: Arc<BootTimerState>,
    pub(super) boot_timer_evt: EventFd,
}

fn fd(r: io::Result<EventFd>) -> Result<EventFd, StartVmError> {
    r.map_err(StartVmError::Fd)
}

/// Serial console on `console`, the i8042 and the boot timer (which counts from `started`).
pub(super) fn port_devices(
    kvm: &KvmVm,
    console: Box<dyn Write + Send>,
    started: Instant,
) -> Result<PortDevices, StartVmError> {
    let mut bus = Bus::new();
    let serial_irq = Arc::new(EventFdInterrupt::new().map_err(StartVmError::Fd)?);
    register_irq(kvm, &serial_irq, layout::SERIAL_IRQ)?;
    let serial = Serial::new(serial_irq as Arc<dyn Interrupt>, console);
    bus.insert(
        Arc::new(Mutex::new(serial)),
        u64::from(layout::SERIAL_PORT),
        u64::from(layout::SERIAL_PORT_SIZE),
    )?;
    let reset_evt = fd(EventFd::new(libc::EFD_NONBLOCK))?;
    let i8042 = I8042::new(fd(reset_evt.try_clone())?);
    bus.insert(
        Arc::new(Mutex::new(i8042)),
        u64::from(layout::I8042_PORT),
        u64::from(layout::I8042_PORT_SIZE),
    )?;
    let boot_timer_evt = fd(EventFd::new(libc::EFD_NONBLOCK))?;
    let (boot_timer, boot_timer_state) = BootTimer::new(started, fd(boot_timer_evt.try_clone())?);
    bus.insert(
        Arc::new(Mutex::new(boot_timer)),
        u64::from(layout::BOOT_TIMER_PORT),
        1,
    )?;
    Ok(PortDevices {
        bus,
        reset_evt,
        boot_timer: boot_timer_state,
        boot_timer_evt,
    })
}

/// What the virtio devices are made from.
pub(super) struct VirtioSpec<'a> {
    pub(super) block: Option<&'a BlockConfig>,
    pub(super) spare_disks: u8,
    pub(super) vsock: Option<VsockConfig>,
    pub(super) net: Option<NetConfig>,
    /// Test and tooling devices, after the virtio ones.
    pub(super) extra: Vec<(SharedDevice, u64, u64)>,
    pub(super) seccomp: Seccomp,
}

/// The MMIO bus, the disk slots, and the kernel command-line entries that announce the devices.
pub(super) struct MmioDevices {
    pub(super) bus: Bus,
    pub(super) disks: Vec<DiskSlot>,
    pub(super) cmdline: Vec<String>,
}

/// The virtio devices in MMIO (and so probe) order: the root disk, the spare disks, vsock,
/// net.
pub(super) fn mmio_devices(kvm: &KvmVm, spec: VirtioSpec<'_>) -> Result<MmioDevices, StartVmError> {
    let mut virtio: Vec<(Box<dyn VirtioDevice>, Option<BlockHandle>)> = Vec::new();
    let count = usize::from(spec.block.is_some())
        + usize::from(spec.spare_disks)
        + usize::from(spec.vsock.is_some())
        + usize::from(spec.net.is_some());
    if u32::try_from(count).map_or(true, |n| n > layout::VIRTIO_MAX_DEVICES) {
        return Err(StartVmError::TooManyDevices);
    }
    if let Some(block) = spec.block {
        let dev =
            Block::new(&block.path, block.read_only, spec.seccomp).map_err(StartVmError::Block)?;
        let handle = dev.handle();
        virtio.push((Box::new(dev), Some(handle)));
    }
    for _ in 0..spec.spare_disks {
        let dev = Block::empty(true, spec.seccomp).map_err(StartVmError::Block)?;
        let handle = dev.handle();
        virtio.push((Box::new(dev), Some(handle)));
    }
    if let Some(vsock) = spec.vsock {
        let dev = Vsock::new(u64::from(vsock.guest_cid), vsock.uds_path, spec.seccomp)
            .map_err(StartVmError::Vsock)?;
        virtio.push((Box::new(dev), None));
    }
    if let Some(net) = spec.net {
        let dev = Net::new(net.tap, net.mac, net.mtu, spec.seccomp).map_err(StartVmError::Net)?;
        virtio.push((Box::new(dev), None));
    }
    let mem = kvm.memory();
    let mut bus = Bus::new();
    let mut cmdline = Vec::new();
    let mut disks = Vec::new();
    for (index, (device, disk)) in (0u32..).zip(virtio) {
        let base = layout::VIRTIO_MMIO_BASE + u64::from(index) * layout::VIRTIO_MMIO_SIZE;
        let irq = Arc::new(EventFdInterrupt::new().map_err(StartVmError::Fd)?);
        register_irq(kvm, &irq, layout::VIRTIO_IRQ_BASE + index)?;
        let transport = MmioTransport::new(mem.clone(), device, irq as Arc<dyn Interrupt>)
            .map_err(|source| StartVmError::Transport { index, source })?;
        for (queue, evt) in (0u32..).zip(transport.queue_evts()) {
            // Without the ioeventfd a notify is an MMIO exit the transport turns into the
            // same eventfd signal: slower, not different.
            let addr = base + REG_QUEUE_NOTIFY;
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
        bus.insert(transport as SharedDevice, base, layout::VIRTIO_MMIO_SIZE)?;
        cmdline.push(layout::virtio_mmio_cmdline(index));
    }
    for (device, base, len) in spec.extra {
        bus.insert(device, base, len)?;
    }
    Ok(MmioDevices {
        bus,
        disks,
        cmdline,
    })
}
