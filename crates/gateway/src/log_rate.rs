//! Log lines an attacker could provoke at will (a client that never reads, a flood of
//! refused requests) are let through at most once per interval; the next line says how many
//! were left out meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A limiter for one kind of log line.
pub struct LogRate {
    every_ms: u64,
    /// Milliseconds since [`epoch`] before which lines are left out.
    next_ms: AtomicU64,
    left_out: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogRate {
    pub const fn new(every_ms: u64) -> LogRate {
        LogRate {
            every_ms,
            next_ms: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.every_ms,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.left_out.swap(0, Ordering::AcqRel));
        }
        self.left_out.fetch_add(1, Ordering::AcqRel);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_count_of_the_rest() {
        let r = LogRate::new(60_000);
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(r.allow(), Some(2));
    }
}
