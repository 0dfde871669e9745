//! Events of runs executed by other nodes sharing the database (PostgreSQL): the store says
//! which events another process committed, usually with the events themselves; this loop
//! broadcasts them like the local engine's, each once, reading from the run's log only what a
//! notice did not carry or what lost notices left out.

use crate::gateway::Gateway;
use smithers_store::{EventRef, EventRow};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events read from the log per query.
const PAGE: usize = 500;

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
    // what the notice carried follows on from what was broadcast: no read
    if !r.events.is_empty() && after >= r.first_seq - 1 {
        r.events
            .iter()
            .filter(|e| e.seq > after)
            .for_each(|ev| broadcast(gw, ev));
        return;
    }
    loop {
        let Ok(page) = gw.store.list_events(&r.run_id, Some(after), PAGE).await else {
            // The log is unreadable now; the run's next notice retries from the same point.
            return;
        };
        for ev in &page {
            broadcast(gw, ev);
            after = ev.seq;
        }
        if page.len() < PAGE {
            return;
        }
    }
}

/// Broadcasts one stored event like the local engine's.
fn broadcast(gw: &Gateway, ev: &EventRow) {
    let payload = serde_json::from_str(&ev.payload_json).unwrap_or_default();
    gw.on_stored_event(&ev.run_id, ev.seq, &ev.event_type, &payload);
}
