//! The control thread and the state it shares with the vCPU threads and the [`Vm`] handle:
//! whoever ends the VM records why and wakes the control thread, which stops and joins the
//! vCPU threads and publishes the exit.
//!
//! [`Vm`]: super::Vm

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use super::VmExit;
use crate::kvm::vcpu;
use crate::seccomp::{SeccompError, ThreadFilter};

/// State shared by the vCPU threads, the control thread and the [`Vm`] handle.
pub(super) struct Shared {
    /// Raised by the control thread; vCPU threads leave their loop when they see it.
    pub(super) stop: AtomicBool,
    /// The first reason given for ending (by a vCPU, the i8042, or `stop`).
    pub(super) reason: Mutex<Option<VmExit>>,
    /// Written to wake the control thread once a reason is recorded.
    pub(super) wake: EventFd,
    /// Set by the control thread once every vCPU thread is joined.
    pub(super) ended: Mutex<Option<VmExit>>,
    pub(super) ended_cond: Condvar,
    pub(super) exit_evt: EventFd,
    /// The vCPU threads, for the control thread to join.
    pub(super) vcpus: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// Records why the VM ends (the first reason wins) and wakes the control thread.
    pub(super) fn end(&self, exit: VmExit) {
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

    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The control thread's epoll tokens: `Shared::wake`, and the i8042's reset line.
pub(super) const WAKE_TOKEN: u64 = 0;
pub(super) const RESET_TOKEN: u64 = 1;

/// The control thread: installs its filter (reporting the result on `installed`), waits for a
/// reason to end, then stops and joins the vCPU threads. It goes on without its filter if that
/// failed: the VM's start then fails, and this thread is what ends it.
pub(super) fn control(
    filter: ThreadFilter,
    installed: mpsc::Sender<Result<(), SeccompError>>,
    epoll: Epoll,
    reset: EventFd,
    shared: Arc<Shared>,
) {
    let _ = installed.send(filter.install());
    drop(installed);
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
