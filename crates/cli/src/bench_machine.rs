//! How fast this machine runs a fixed piece of work on one core, so that `bench check` can
//! tell a slower machine from slower code: the timed figures of a baseline only judge code on
//! a machine about as fast as the one that recorded them.

use std::time::{Duration, Instant};

/// Repetitions; the best one counts (noise from other work only ever slows a repetition).
const REPS: usize = 15;

/// Pause between repetitions, so they span a few tenths of a second: on a shared virtual
/// machine a core can be 60 % slower for a tenth of a second at a time.
const PAUSE: Duration = Duration::from_millis(15);

/// Milliseconds of the best of [`REPS`] repetitions of [`work`]. Blocks for about 0.3 s.
pub fn calibration_ms() -> f64 {
    (0..REPS)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(PAUSE);
            }
            let t = Instant::now();
            std::hint::black_box(work(std::hint::black_box(2_000)));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min)
}

/// What the server does most per run, in small: build, write and read back JSON objects
/// like event payloads, and keep them in an ordered map. Returns a checksum so nothing is
/// optimised away.
fn work(n: usize) -> usize {
    let mut map = std::collections::BTreeMap::new();
    let mut sum = 0usize;
    for i in 0..n {
        let v = serde_json::json!({
            "runId": format!("0193a2b4-{i:04x}-7000-8000-00000000{:04x}", i * 7 % 65_536),
            "seq": i,
            "type": "NodeFinished",
            "nodeId": "task",
            "iteration": 0,
            "attempt": 1,
            "timestampMs": 1_796_490_457_421u64 + i as u64,
        });
        let text = serde_json::to_string(&v).unwrap_or_default();
        let back: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        sum += text.len() + back.as_object().map_or(0, |o| o.len());
        map.insert(text, i);
    }
    sum + map.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_is_the_same_every_time() {
        assert_eq!(work(50), work(50));
        assert!(work(50) > work(10));
        let ms = calibration_ms();
        assert!(ms.is_finite() && ms > 0.0, "{ms}");
    }
}
