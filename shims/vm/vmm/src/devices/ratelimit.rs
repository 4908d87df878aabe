//! Rate limiting for logs the guest can trigger: a guest that hammers a bad register or sends
//! malformed requests in a loop must not fill the host's logs or slow the VMM down.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows `burst` events per `period`; the rest are counted and reported with the next allowed
/// one.
pub struct LogLimiter {
    burst: u32,
    period: Duration,
    state: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(burst: u32, period: Duration) -> Self {
        LogLimiter {
            burst,
            period,
            state: Mutex::new(Window {
                start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` if this event may be logged, where `n` events were suppressed since the last
    /// one logged; `None` if it must be dropped.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match w.start {
            Some(start) if now.duration_since(start) < self.period => {}
            _ => {
                w.start = Some(now);
                w.used = 0;
            }
        }
        if w.used < self.burst {
            w.used += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// A `tracing` event at `$level` (`debug`, `info`, `warn`, `error`) through a per-call-site
/// limiter (10 per 5 s), for anything the guest can make us log.
#[macro_export]
macro_rules! guest_log {
    ($level:ident, $($arg:tt)+) => {{
        static LIMITER: $crate::devices::ratelimit::LogLimiter =
            $crate::devices::ratelimit::LogLimiter::new(10, ::std::time::Duration::from_secs(5));
        if let Some(suppressed) = LIMITER.check() {
            ::tracing::$level!(suppressed, $($arg)+);
        }
    }};
}

/// `warn!` through a per-call-site limiter (10 per 5 s).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        $crate::guest_log!(warn, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_per_period_and_counts_the_rest() {
        let l = LogLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0 + Duration::from_millis(500)), None);
        assert_eq!(l.check_at(t0 + Duration::from_millis(600)), None);
        assert_eq!(l.check_at(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(l.check_at(t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(l.check_at(t0 + Duration::from_secs(1)), None);
    }
}
