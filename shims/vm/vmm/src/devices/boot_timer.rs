//! The boot-timer pseudo device: the guest agent writes [`BOOT_TIMER_MAGIC`] to
//! [`crate::layout::BOOT_TIMER_PORT`] once it is ready, and the VMM records how long the boot
//! took, measured by itself rather than reported by the guest.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::layout::BOOT_TIMER_MAGIC;

/// The recorded boot time, shared with whoever waits for the guest.
#[derive(Default)]
pub struct BootTimerState {
    elapsed: OnceLock<Duration>,
}

impl BootTimerState {
    /// Time from the VM's start to the guest's first magic write, once it happened.
    pub fn get(&self) -> Option<Duration> {
        self.elapsed.get().copied()
    }
}

pub struct BootTimer {
    start: Instant,
    fired: EventFd,
    state: Arc<BootTimerState>,
}

impl BootTimer {
    /// `fired` is written once, when the guest first reports ready.
    pub fn new(start: Instant, fired: EventFd) -> (BootTimer, Arc<BootTimerState>) {
        let state = Arc::new(BootTimerState::default());
        (
            BootTimer {
                start,
                fired,
                state: state.clone(),
            },
            state,
        )
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let elapsed = self.start.elapsed();
        if self.state.elapsed.set(elapsed).is_ok() {
            tracing::info!(boot_ms = elapsed.as_secs_f64() * 1e3, "guest ready");
            if let Err(e) = self.fired.write(1) {
                tracing::warn!("boot timer: signalling ready: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_magic_write_only() {
        let fired = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let start = Instant::now() - Duration::from_millis(50);
        let (mut t, state) = BootTimer::new(start, fired.try_clone().unwrap());
        t.write(0, 0, &[BOOT_TIMER_MAGIC - 1]);
        assert_eq!(state.get(), None);
        assert!(fired.read().is_err(), "not fired by another value");
        t.write(0, 0, &[BOOT_TIMER_MAGIC]);
        let first = state.get().unwrap();
        assert!(first >= Duration::from_millis(50));
        assert_eq!(fired.read().unwrap(), 1);
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, 0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(state.get(), Some(first));
        assert!(fired.read().is_err(), "fired once");
        let mut b = [7u8];
        t.read(0, 0, &mut b);
        assert_eq!(b, [0]);
    }
}
