//! A running VM assembled from a [`VmmConfig`]: KVM VM and guest memory, the kernel and boot
//! structures, the port-I/O devices (serial console, i8042, boot timer), virtio-mmio devices
//! (block, vsock, net), one thread per vCPU and one control thread.
//!
//! Ending: a vCPU thread that sees a triple fault (`KVM_EXIT_SHUTDOWN`, what `reboot=t` and
//! `panic=-1` produce), an unhandled exit or a failed ioctl records why and wakes the control
//! thread; so do the i8042's reset line and [`Vm::stop`]. The control thread raises the stop
//! flag, kicks every vCPU thread out of `KVM_RUN` with a real-time signal until it has returned,
//! joins them, records the [`VmExit`] and writes the exit eventfd once. Device threads belong to
//! the virtio devices and end when [`Vm::stop`] (or drop) drops the buses.
//!
//! Every thread the VM has runs under its seccomp filter ([`crate::seccomp`]) unless
//! [`StartOptions::seccomp`] says otherwise, and [`Vm::start`] returns only once each has
//! installed it.
//!
//! - [`config`]: what a VM is made from, and the errors.
//! - `devices`: the buses and the devices on them.
//! - `control`: the control thread and the state the threads share.
//! - `vcpu_thread`: a vCPU thread's loop.

mod config;
mod control;
mod devices;
mod vcpu_thread;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub use self::config::{
    BlockConfig, MIN_MEMORY_MIB, NetConfig, RealModeImage, SetDiskError, StartOptions,
    StartVmError, VmExit, VmmConfig, VsockConfig,
};
use self::control::{RESET_TOKEN, Shared, WAKE_TOKEN, control, lock};
use self::devices::{Devices, MmioDevices, PortDevices, VirtioSpec};
use self::vcpu_thread::{VcpuContext, run_vcpu};
use crate::arch::x86_64 as arch;
use crate::devices::boot_timer::BootTimerState;
use crate::kvm::{GuestRam, KvmVm, vcpu};
use crate::seccomp::{SeccompError, ThreadFilter, ThreadKind};

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
        let vcpu_filter = Arc::new(ThreadFilter::new(ThreadKind::Vcpu, opts.seccomp)?);
        let control_filter = ThreadFilter::new(ThreadKind::Control, opts.seccomp)?;

        let ram = GuestRam::new(u64::from(cfg.memory_mib) << 20)?;
        let regions: Vec<(u64, u64)> = ram.regions().map(|(gpa, size, _)| (gpa, size)).collect();
        let mut kvm = KvmVm::new(ram)?;
        kvm.setup_irqchip();

        let PortDevices {
            bus: io_bus,
            reset_evt,
            boot_timer,
            boot_timer_evt,
        } = devices::port_devices(&kvm, cfg.console, started)?;
        let MmioDevices {
            bus: mmio_bus,
            disks,
            cmdline: cmdline_extra,
        } = devices::mmio_devices(
            &kvm,
            VirtioSpec {
                block: cfg.block.as_ref(),
                spare_disks: cfg.spare_disks,
                vsock: cfg.vsock,
                net: cfg.net,
                extra: opts.mmio_devices,
                seccomp: opts.seccomp,
            },
        )?;

        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        for id in 0..cfg.vcpus {
            vcpus.push(kvm.create_vcpu(id)?);
        }
        let mem = kvm.memory();
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

        let fd = |r: io::Result<EventFd>| r.map_err(StartVmError::Fd);
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

        // Every thread reports whether its filter went in; the VM is running only once all
        // have.
        let (installed_tx, installed) = mpsc::channel::<Result<(), SeccompError>>();
        // The control thread first, so a failure below has it stop whatever vCPU threads
        // already run; it takes their handles from `shared.vcpus` only once all are spawned
        // (this holds the lock until then). All are made here, by an unfiltered thread, so
        // none inherits another's filter.
        let control = {
            let shared = shared.clone();
            let installed = installed_tx.clone();
            std::thread::Builder::new()
                .name("vm-control".into())
                .spawn(move || control(control_filter, installed, epoll, reset_evt, shared))
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
                let filter = vcpu_filter.clone();
                let installed = installed_tx.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("vcpu{}", vcpu.id()))
                    .spawn(move || run_vcpu(vcpu, ctx, &filter, installed))?;
                threads.push(handle);
                Ok(())
            })
        };
        drop((ctx, installed_tx));
        let failed = match spawned {
            Err(e) => Some(StartVmError::Spawn(e)),
            // One report per thread; a thread that ended without one dropped its sender.
            Ok(()) => (0..=usize::from(cfg.vcpus)).find_map(|_| match installed.recv() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(StartVmError::Seccomp(e)),
                Err(_) => Some(StartVmError::ThreadEnded),
            }),
        };
        if let Some(e) = failed {
            shared.end(VmExit::Error("starting the VM threads failed".into()));
            if control.join().is_err() {
                tracing::error!("the VM control thread panicked");
            }
            return Err(e);
        }

        tracing::info!(
            vcpus = cfg.vcpus,
            memory_mib = cfg.memory_mib,
            irqchip = kvm.has_irqchip(),
            seccomp = ?opts.seccomp,
            setup_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
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
            boot_timer,
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

    /// The size of disk `slot`'s backing file in sectors (0 when empty); `None` past the last
    /// slot or once the VM has been stopped.
    pub fn disk_sectors(&self, slot: usize) -> Option<u64> {
        let devices = lock(&self.devices);
        Some(devices.as_ref()?.disks.get(slot)?.handle.capacity())
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
