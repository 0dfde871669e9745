//! The gate a run's live events pass on a connection that is replaying the run
//! (`connect.params.afterSeq`): held while the replay runs, deduplicated after it, dropped once
//! it stopped early. Kept apart from the replay driver ([`crate::replay`]) because every
//! connection's view holds one per replayed run.

use crate::outbound::{Outbound, Queue};
use std::sync::Mutex;

/// How a connection treats the live events of a run it asked to replay.
pub enum Gate {
    /// The replay (of the events after `after`) is running: live events wait in `held`, with
    /// their `eventSeq`.
    Replaying {
        after: i64,
        held: Mutex<Vec<(Option<i64>, Outbound)>>,
    },
    /// The replay sent the log up to `eventSeq` `through`: live events up to it are
    /// duplicates.
    Done(i64),
    /// The replay stopped early (`replay.truncated`): no live events of the run.
    Stopped,
    /// The request that started the run on this connection has not been answered yet: its
    /// events wait, so that the client reads the response (and the run id) first, as from
    /// upstream. Opened by [`crate::gateway::ConnShared::answered`].
    Unanswered(Mutex<Vec<Outbound>>),
}

impl Gate {
    /// Whether a live event of the gated run goes to the queue now (`Some(out)`) or was held
    /// or dropped here (`None`). Called under the connection's view lock (read).
    pub fn admit(&self, seq: Option<i64>, out: Outbound, queue: &Queue) -> Option<Outbound> {
        match self {
            Gate::Replaying { held, .. } => {
                // counted as if queued: a slow client cannot grow the server through its gate
                let cost = out.cost();
                if queue.reserve(cost) {
                    match held.lock() {
                        Ok(mut held) => held.push((seq, out)),
                        Err(_) => queue.unreserve(cost),
                    }
                }
                None
            }
            Gate::Done(through) => match seq {
                Some(s) if s <= *through => None,
                _ => Some(out),
            },
            Gate::Stopped => None,
            Gate::Unanswered(held) => {
                let cost = out.cost();
                if queue.reserve(cost) {
                    match held.lock() {
                        Ok(mut held) => held.push(out),
                        Err(_) => queue.unreserve(cost),
                    }
                }
                None
            }
        }
    }
}
