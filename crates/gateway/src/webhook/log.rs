//! Operator log lines for webhook refusals and duplicates. Anyone can send webhooks, so a
//! flood must not become a flood of log lines: the first event of every window is logged at
//! its level, the rest at `debug`, and the next logged line says how many were held back.
//! Lines carry the workflow key, the reason and the delivery id, never the secret or body.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// One logged line per window and level at most.
const WINDOW_MS: u64 = 10_000;

/// Lets the first event of each window through.
struct Throttle {
    /// Milliseconds since `epoch` from which the next event is logged.
    next_at: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    const fn new() -> Self {
        Throttle {
            next_at: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(events held back since the last logged one)` when this event is to be logged.
    fn admit(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_at.load(Ordering::Acquire);
        if now_ms >= next
            && self
                .next_at
                .compare_exchange(
                    next,
                    now_ms + WINDOW_MS,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::AcqRel));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// How much an operator needs to see an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    /// Routine refusals (unknown key, bad signature, bad payload) and duplicates.
    Info,
    /// Something to act on: the unverified budget is full, or the gateway failed.
    Warn,
}

pub(super) struct Throttles {
    epoch: Instant,
    info: Throttle,
    warn: Throttle,
}

impl Default for Throttles {
    fn default() -> Self {
        Throttles {
            epoch: Instant::now(),
            info: Throttle::new(),
            warn: Throttle::new(),
        }
    }
}

/// Delivery ids come from request headers: keep log lines short.
fn short(id: Option<&str>) -> &str {
    match id {
        Some(id) => match id.char_indices().nth(128) {
            Some((cut, _)) => &id[..cut],
            None => id,
        },
        None => "-",
    }
}

impl Throttles {
    fn admit(&self, level: Level) -> Option<u64> {
        let now = self.epoch.elapsed().as_millis() as u64;
        match level {
            Level::Info => self.info.admit(now),
            Level::Warn => self.warn.admit(now),
        }
    }

    /// A delivery answered with an error.
    pub(super) fn rejected(
        &self,
        level: Level,
        workflow: &str,
        reason: &str,
        code: &str,
        delivery_id: Option<&str>,
    ) {
        let delivery_id = short(delivery_id);
        match self.admit(level) {
            Some(held_back) if level == Level::Warn => tracing::warn!(
                workflow,
                reason,
                code,
                delivery_id,
                held_back,
                "webhook refused"
            ),
            Some(held_back) => tracing::info!(
                workflow,
                reason,
                code,
                delivery_id,
                held_back,
                "webhook refused"
            ),
            None => tracing::debug!(workflow, reason, code, delivery_id, "webhook refused"),
        }
    }

    /// A verified delivery whose id was seen inside the dedupe window.
    pub(super) fn duplicate(&self, workflow: &str, delivery_id: &str, in_progress: bool) {
        let delivery_id = short(Some(delivery_id));
        match self.admit(Level::Info) {
            Some(held_back) => tracing::info!(
                workflow,
                delivery_id,
                in_progress,
                held_back,
                "webhook delivery already received; not acted on again"
            ),
            None => tracing::debug!(
                workflow,
                delivery_id,
                in_progress,
                "webhook delivery already received; not acted on again"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_window_and_the_rest_are_counted() {
        let t = Throttle::new();
        assert_eq!(t.admit(0), Some(0));
        assert_eq!(t.admit(1), None);
        assert_eq!(t.admit(WINDOW_MS - 1), None);
        assert_eq!(t.admit(WINDOW_MS), Some(2));
        assert_eq!(t.admit(WINDOW_MS + 1), None);
        assert_eq!(t.admit(10 * WINDOW_MS), Some(1));
    }

    #[test]
    fn long_ids_are_cut() {
        let long = "é".repeat(300);
        assert_eq!(short(Some(&long)).chars().count(), 128);
        assert_eq!(short(Some("abc")), "abc");
        assert_eq!(short(None), "-");
    }
}
