//! The bookkeeping of open `streamDevTools` streams, kept in the gateway's state: which
//! streams are open (for gauges, rewinds and closed sockets), the server-wide stream count,
//! one frame poller per watched run, and the trees and deltas the streams share. The streams
//! themselves are driven by [`crate::stream`].

use crate::devtools_tree::{self, DevNode};
use crate::error::RpcError;
use crate::metrics::{Metrics, names};
use serde_json::Value;
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, watch};

/// One open stream, as the registry sees it.
pub struct StreamCtl {
    pub id: String,
    pub run_id: String,
    pub conn_id: u64,
    /// A rewind happened: the next event is a snapshot.
    pub(crate) invalidated: AtomicBool,
    /// Frame a rewind went back to (-1: none pending): the next event is its snapshot.
    pub(crate) rebase_to: AtomicI64,
    /// The socket went away: the stream ends.
    pub(crate) stopped: AtomicBool,
    /// Wakes the stream's producer after any of the above.
    pub(crate) wake: Notify,
}

impl StreamCtl {
    /// A new stream of `run_id` on connection `conn_id`, with a fresh id.
    pub fn new(run_id: &str, conn_id: u64) -> StreamCtl {
        StreamCtl {
            id: uuid::Uuid::new_v4().to_string(),
            run_id: run_id.to_string(),
            conn_id,
            invalidated: AtomicBool::new(false),
            rebase_to: AtomicI64::new(-1),
            stopped: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }
}

/// A frame made ready for streaming: its full JSON, DevTools tree and serialized tree.
pub struct Built {
    /// Content hash of the frame (`xml_hash`); empty for the empty tree.
    pub hash: String,
    pub doc: Arc<Value>,
    pub root: DevNode,
    pub root_json: String,
}

impl Built {
    /// Builds the tree of a frame document (`null` = the empty tree) of a run of workflow
    /// `workflow_name`. A frame stored without the workflow root is shown under one named after
    /// the workflow, so its tree is keyed by hash and name (two workflows' frames may be equal).
    pub fn new(hash: &str, doc: Arc<Value>, workflow_name: &str) -> Built {
        let legacy = !doc.is_null()
            && doc.get("tag").and_then(Value::as_str) != Some(devtools_tree::WORKFLOW_TAG);
        let root = if doc.is_null() {
            devtools_tree::empty_node()
        } else {
            devtools_tree::build_frame(&doc, workflow_name)
        };
        let root_json = serde_json::to_string(&root).unwrap_or_else(|_| "null".into());
        let hash = if legacy && !hash.is_empty() {
            format!("{hash}\u{0}{workflow_name}")
        } else {
            hash.to_string()
        };
        Built {
            hash,
            doc,
            root,
            root_json,
        }
    }
}

/// Work shared by all streams: trees keyed by the frame's content hash (so a rewind that
/// reuses frame numbers cannot serve a stale tree) and deltas keyed by both trees and seqs.
/// Bounded; cleared when full.
#[derive(Default)]
struct Shared {
    trees: HashMap<String, Arc<Built>>,
    deltas: HashMap<(String, String, i64, i64), Arc<str>>,
    /// Rough size of what `trees` and `deltas` hold.
    bytes: usize,
}

/// Most entries of each kind kept.
const SHARED_LIMIT: usize = 256;
/// Most bytes kept (a 1,000-node frame is a few hundred KiB as document, tree and text).
const SHARED_BYTES: usize = 32 * 1024 * 1024;

/// What a run's poller publishes: the latest frame number (-1 before the first read), or why
/// it could not be read.
pub type Latest = Result<i64, RpcError>;

/// Open streams of every connection: for subscriber gauges, rewind re-baselines and closing
/// the streams of a socket that went away; and the work the streams share.
#[derive(Default)]
pub struct Registry {
    streams: Mutex<HashMap<String, Arc<StreamCtl>>>,
    shared: Mutex<Shared>,
    /// Streams open on the server (at most `[server] max_streams`).
    open: AtomicUsize,
    /// One poller per run with streams.
    pollers: Mutex<HashMap<String, watch::Sender<Latest>>>,
}

/// The gauge label of a run: the first 12 hex digits of sha1(runId), as upstream.
pub fn run_label(run_id: &str) -> String {
    let d = Sha1::digest(run_id.as_bytes());
    hex::encode(d)[..12].to_string()
}

impl Registry {
    /// The tree of a frame by content hash, if some stream built it lately.
    pub(crate) fn cached(&self, hash: &str) -> Option<Arc<Built>> {
        self.shared.lock().ok()?.trees.get(hash).cloned()
    }

    /// Keeps a built tree for the other streams, under its key ([`Built::hash`]).
    pub(crate) fn share(&self, b: Arc<Built>) {
        let hash = b.hash.clone();
        if let Ok(mut s) = self.shared.lock() {
            // the document, the tree and its text are each about as large as the text
            let size = b.root_json.len() * 3;
            if s.trees.len() >= SHARED_LIMIT || s.bytes + size > SHARED_BYTES {
                s.trees.clear();
                s.deltas.clear();
                s.bytes = 0;
            }
            s.bytes += size;
            s.trees.insert(hash, b);
        }
    }

    /// The delta between two trees (at seqs `base` and `seq`), if some stream made it lately.
    pub(crate) fn cached_delta(
        &self,
        a: &Arc<Built>,
        b: &Arc<Built>,
        base: i64,
        seq: i64,
    ) -> Option<Arc<str>> {
        self.shared
            .lock()
            .ok()?
            .deltas
            .get(&(a.hash.clone(), b.hash.clone(), base, seq))
            .cloned()
    }

    /// Keeps a delta for the other streams.
    pub(crate) fn share_delta(
        &self,
        a: &Arc<Built>,
        b: &Arc<Built>,
        base: i64,
        seq: i64,
        d: Arc<str>,
    ) {
        if let Ok(mut s) = self.shared.lock() {
            if s.deltas.len() >= SHARED_LIMIT || s.bytes + d.len() > SHARED_BYTES {
                s.trees.clear();
                s.deltas.clear();
                s.bytes = 0;
            }
            s.bytes += d.len();
            s.deltas
                .insert((a.hash.clone(), b.hash.clone(), base, seq), d);
        }
    }

    fn count(&self, run_id: &str) -> usize {
        self.streams
            .lock()
            .map(|m| m.values().filter(|s| s.run_id == run_id).count())
            .unwrap_or(0)
    }

    /// Registers an open stream (and updates its run's subscriber gauge).
    pub(crate) fn add(&self, metrics: &Metrics, ctl: Arc<StreamCtl>) {
        if let Ok(mut m) = self.streams.lock() {
            m.insert(ctl.id.clone(), ctl.clone());
            Self::publish_count(metrics, &m, &ctl.run_id);
        }
    }

    /// Unregisters an ended stream (and updates its run's subscriber gauge).
    pub(crate) fn remove(&self, metrics: &Metrics, ctl: &StreamCtl) {
        if let Ok(mut m) = self.streams.lock() {
            m.remove(&ctl.id);
            Self::publish_count(metrics, &m, &ctl.run_id);
        }
    }

    /// Sets a run's gauge; under the registry lock, so two streams ending at once cannot
    /// leave a stale count behind.
    fn publish_count(metrics: &Metrics, m: &HashMap<String, Arc<StreamCtl>>, run_id: &str) {
        let n = m.values().filter(|s| s.run_id == run_id).count();
        metrics.set_gauge(
            names::DEVTOOLS_ACTIVE_SUBSCRIBERS,
            &[("runId", &run_label(run_id))],
            n as f64,
        );
    }

    /// After a rewind to `frame_no`: every open stream of the run sends that frame's snapshot
    /// next, then carries on from there.
    pub fn invalidate(&self, run_id: &str, frame_no: i64) {
        if let Ok(m) = self.streams.lock() {
            for s in m.values().filter(|s| s.run_id == run_id) {
                s.invalidated.store(true, Ordering::Release);
                s.rebase_to.store(frame_no, Ordering::Release);
                s.wake.notify_one();
            }
        }
    }

    /// The socket closed: its streams end.
    pub fn close_conn(&self, conn_id: u64) {
        if let Ok(m) = self.streams.lock() {
            for s in m.values().filter(|s| s.conn_id == conn_id) {
                s.stopped.store(true, Ordering::Release);
                s.wake.notify_one();
            }
        }
    }

    /// Open streams of a run (for tests and metrics).
    pub fn active(&self, run_id: &str) -> usize {
        self.count(run_id)
    }

    /// Open streams on the server.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Takes one of `max` server-wide stream places; false if all are taken (atomically: a
    /// burst cannot pass the cap).
    pub(crate) fn take_place(&self, max: usize) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back a place taken by [`Registry::take_place`].
    pub(crate) fn give_back_place(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Runs with a poller.
    pub fn pollers(&self) -> usize {
        self.pollers.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// The latest frame number of a run, kept current by the run's poller; if the run has
    /// none, `start_poller` is called (under the registry's lock) with the sender a new poller
    /// publishes on.
    pub(crate) fn watch(
        &self,
        metrics: &Metrics,
        run_id: &str,
        start_poller: impl FnOnce(watch::Sender<Latest>),
    ) -> watch::Receiver<Latest> {
        let Ok(mut m) = self.pollers.lock() else {
            // cannot happen (nothing panics under this lock); a dead channel ends the stream
            return watch::channel(Ok(-1)).1;
        };
        if let Some(tx) = m.get(run_id) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Ok(-1));
        m.insert(run_id.to_string(), tx.clone());
        metrics.set_gauge(names::DEVTOOLS_RUN_POLLERS, &[], m.len() as f64);
        start_poller(tx);
        rx
    }

    /// Whether a run's poller should stop (its last stream ended); unregisters it if so.
    pub(crate) fn retire(
        &self,
        metrics: &Metrics,
        run_id: &str,
        tx: &watch::Sender<Latest>,
    ) -> bool {
        let Ok(mut m) = self.pollers.lock() else {
            return true;
        };
        // under the lock that `watch` subscribes under: no stream can join in between
        if tx.receiver_count() > 0 {
            return false;
        }
        if m.get(run_id).is_some_and(|t| t.same_channel(tx)) {
            m.remove(run_id);
        }
        metrics.set_gauge(names::DEVTOOLS_RUN_POLLERS, &[], m.len() as f64);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_label_is_sha1_prefix() {
        assert_eq!(run_label("run-stream-3"), "78f44d0d2ef8");
    }
}
