//! The last event seq broadcast per run, so that an event committed by another node (read
//! back from the log) and one broadcast locally reach clients once. Bounded: the runs seen
//! longest ago are forgotten first.

use std::collections::{HashMap, VecDeque};

/// Runs whose last broadcast seq is remembered; the oldest is forgotten beyond this.
const REMEMBERED_RUNS: usize = 10_000;

/// The last seq broadcast per run (bounded, oldest run forgotten first).
#[derive(Debug, Default)]
pub struct LastSeqs {
    seqs: HashMap<String, i64>,
    order: VecDeque<String>,
}

impl LastSeqs {
    pub fn get(&self, run_id: &str) -> Option<i64> {
        self.seqs.get(run_id).copied()
    }

    /// Records `seq` as broadcast; false when it (or a later one) already was.
    pub fn advance(&mut self, run_id: &str, seq: i64) -> bool {
        if let Some(last) = self.seqs.get_mut(run_id) {
            if *last >= seq {
                return false;
            }
            *last = seq;
            return true;
        }
        if self.order.len() >= REMEMBERED_RUNS
            && let Some(old) = self.order.pop_front()
        {
            self.seqs.remove(&old);
        }
        self.order.push_back(run_id.to_string());
        self.seqs.insert(run_id.to_string(), seq);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seqs_advance_once_and_forget_the_oldest_run() {
        let mut s = LastSeqs::default();
        assert!(s.advance("a", 0));
        assert!(!s.advance("a", 0));
        assert!(s.advance("a", 2));
        assert!(!s.advance("a", 1));
        assert_eq!(s.get("a"), Some(2));
        for i in 0..REMEMBERED_RUNS {
            s.advance(&format!("r{i}"), 0);
        }
        assert_eq!(s.get("a"), None);
        assert_eq!(s.get("r1"), Some(0));
        assert_eq!(s.seqs.len(), REMEMBERED_RUNS);
    }
}
