//! Events of runs executed by other nodes sharing the database (PostgreSQL): the store says
//! which events another process committed, this loop reads them from the run's log and
//! broadcasts them like the local engine's, each once.

use crate::gateway::Gateway;
use smithers_store::EventRef;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Runs whose last broadcast seq is remembered; the oldest is forgotten beyond this.
const REMEMBERED_RUNS: usize = 10_000;
/// Events read from the log per query.
const PAGE: usize = 500;

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

/// Forwards other nodes' events until the feed closes.
pub async fn run(gw: Arc<Gateway>, mut feed: broadcast::Receiver<EventRef>) {
    loop {
        match feed.recv().await {
            Ok(r) => forward(&gw, &r).await,
            // Missed notices: the next notice of each run fills its gap from the log.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Broadcasts the events of `r.run_id` not broadcast yet, up to the end of its log: from the
/// last one broadcast, or from the notice's first seq for a run not seen before.
async fn forward(gw: &Gateway, r: &EventRef) {
    let mut after = match gw.last_broadcast_seq(&r.run_id) {
        Some(last) if last >= r.last_seq => return,
        Some(last) => last,
        None => r.first_seq - 1,
    };
    loop {
        let Ok(page) = gw.store.list_events(&r.run_id, Some(after), PAGE).await else {
            // The log is unreadable now; the run's next notice retries from the same point.
            return;
        };
        for ev in &page {
            let payload = serde_json::from_str(&ev.payload_json).unwrap_or_default();
            gw.on_stored_event(&ev.run_id, ev.seq, &ev.event_type, &payload);
            after = ev.seq;
        }
        if page.len() < PAGE {
            return;
        }
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
