//! A vCPU and the signal that kicks its thread out of `KVM_RUN`.

use std::sync::{Arc, OnceLock};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use super::memory::GuestRam;

/// One vCPU. Closed on drop.
pub struct Vcpu {
    id: u8,
    // Closed (with its `kvm_run` mapping) before `_ram` is released (field order): the kernel
    // VM, and so its memory slots, live as long as this fd.
    fd: VcpuFd,
    _ram: Arc<GuestRam>,
}

impl Vcpu {
    pub(super) fn new(id: u8, fd: VcpuFd, ram: Arc<GuestRam>) -> Vcpu {
        Vcpu { id, fd, _ram: ram }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// For register setup (the arch module's `set_*` calls).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Enters the guest until the next exit that needs userspace.
    pub fn run(&mut self) -> Result<VcpuExit<'_>, kvm_ioctls::Error> {
        self.fd.run()
    }

    /// With `true`, the next `KVM_RUN` returns `EINTR` at once instead of entering the guest:
    /// set by the vCPU thread when it sees the stop flag, so a kick that raced with the flag
    /// check cannot leave it in the guest.
    pub fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }
}

/// The real-time signal that interrupts `KVM_RUN` on a vCPU thread.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the (empty) handler for [`kick_signal`] once per process: a signal with a handler
/// makes a blocking `KVM_RUN` return `EINTR`, where the default action would kill the process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    *INSTALLED.get_or_init(|| register_signal_handler(kick_signal(), on_kick))
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
