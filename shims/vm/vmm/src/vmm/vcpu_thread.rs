//! A vCPU thread: installs the vCPU filter, then runs `KVM_RUN` and routes each exit to the
//! port-I/O or MMIO bus until the VM stops.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use kvm_ioctls::VcpuExit;

use super::VmExit;
use super::control::Shared;
use crate::bus::Bus;
use crate::devices::ratelimit::LogLimiter;
use crate::irq::EventFdInterrupt;
use crate::kvm::vm::IrqError;
use crate::kvm::{KvmVm, Vcpu, vcpu};
use crate::seccomp::{SeccompError, ThreadFilter};

#[derive(Clone)]
pub(super) struct VcpuContext {
    pub(super) shared: Arc<Shared>,
    pub(super) io: Bus,
    pub(super) mmio: Bus,
    pub(super) irqchip: bool,
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

/// Runs vCPU `vcpu` until the VM stops. The filter goes in after the kick signal is unblocked
/// and before the guest first runs; its result is reported on `installed`, and without it the
/// guest does not run.
pub(super) fn run_vcpu(
    mut vcpu: Vcpu,
    ctx: VcpuContext,
    filter: &ThreadFilter,
    installed: mpsc::Sender<Result<(), SeccompError>>,
) {
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
    let result = filter.install();
    let ok = result.is_ok();
    let _ = installed.send(result);
    drop(installed);
    if !ok {
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

pub(super) fn register_irq(kvm: &KvmVm, irq: &EventFdInterrupt, gsi: u32) -> Result<(), IrqError> {
    if kvm.has_irqchip() {
        kvm.register_irqfd(irq, gsi)
    } else {
        // Nobody can deliver it: the device's triggers only count up the eventfd.
        Ok(())
    }
}
