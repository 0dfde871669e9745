//! `streamDevTools` (gateway-protocol §1.13): a live DevTools tree of one run over a WebSocket,
//! as a snapshot followed by one delta per frame, re-baselined with a fresh snapshot after 49
//! deltas in a row, when a delta would not be smaller, and after a rewind.
//!
//! Each stream owns a bounded queue. Events leave it for the socket only while the
//! connection's unsent bytes stay under the high-water mark, so a client that stops reading
//! ends its streams (`BackpressureDisconnect`) instead of growing the server's memory; the
//! socket and the connection's other streams carry on.
//!
//! Streams are capped per connection and on the server (`[server] max_streams_per_connection`,
//! `max_streams`; the places are reserved before any work and given back when the stream
//! ends). All streams of a run share one poller task, which reads the run's latest frame
//! number every [`POLL_INTERVAL`] and publishes it on a `watch` channel; it exists while the
//! run has streams. A stream with nothing to send sleeps until that number changes.

use crate::devtools;
use crate::error::RpcError;
use crate::gateway::{Caller, ConnShared, Gateway};
use crate::log_rate::LogRate;
use crate::metrics::names;
use crate::outbound::{Outbound, Refused};
use crate::stream_registry::{Built, Latest, StreamCtl};
use serde_json::{Value, json};
use smithers_store::FrameRow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often a run's poller looks for new frames.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How often a stream blocked on a full socket retries.
pub const BLOCKED_RETRY: Duration = Duration::from_millis(10);
/// Events a stream may hold while its socket is above the high-water mark.
pub const QUEUE_LIMIT: usize = 1000;
/// Unsent bytes on a connection above which streams hold their events back (at most half of
/// `[server] max_outbound_bytes`, so streams alone never overflow a connection).
pub const HIGH_WATER_BYTES: usize = 8 * 1024 * 1024;
/// At most this many events in a row without a snapshot (the 50th is a snapshot).
pub const REBASELINE_INTERVAL: u32 = 50;
const MAX_FROM_SEQ: f64 = 9_007_199_254_740_991.0;
/// Fewer bytes than any `runState` object takes (`{"runId":…,"computedAt":…,"state":…}`).
const MIN_RUN_STATE_LEN: usize = 40;

/// Refusals at the server-wide cap logged at most every 10 s.
static CAP_LOG: LogRate = LogRate::new(10_000);

/// A stream's place on its connection and on the server; given back when dropped.
struct Slot {
    gw: Arc<Gateway>,
    conn: Arc<ConnShared>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::AcqRel);
        self.gw.streams.give_back_place();
    }
}

/// Counts one in unless `counter` is at `max` already (atomically: a burst cannot pass it).
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// Reserves a place for a new stream of `conn`, or refuses with `RateLimited`.
fn reserve(gw: &Arc<Gateway>, conn: &Arc<ConnShared>) -> Result<Slot, RpcError> {
    let limits = &gw.config.limits;
    if !take(&conn.streams, limits.max_streams_per_connection) {
        tracing::debug!(
            conn = conn.id,
            max = limits.max_streams_per_connection,
            "streamDevTools refused: connection stream cap"
        );
        return Err(RpcError::new(
            "RateLimited",
            format!(
                "Too many DevTools streams on this connection: {} are open, the limit ([server] max_streams_per_connection). Close one (or the socket) first, or raise the limit.",
                limits.max_streams_per_connection
            ),
        ));
    }
    if !gw.streams.take_place(limits.max_streams) {
        conn.streams.fetch_sub(1, Ordering::AcqRel);
        if let Some(left_out) = CAP_LOG.allow() {
            tracing::warn!(
                max = limits.max_streams,
                similar_left_out = left_out,
                "streamDevTools refused: the server-wide stream cap ([server] max_streams) is reached"
            );
        }
        return Err(RpcError::new(
            "RateLimited",
            format!(
                "Too many DevTools streams on this server: {} are open, the limit ([server] max_streams). Retry later, or raise the limit.",
                limits.max_streams
            ),
        ));
    }
    Ok(Slot {
        gw: gw.clone(),
        conn: conn.clone(),
    })
}

/// A run's poller: one store read per [`POLL_INTERVAL`] however many streams watch the run.
async fn poll_run(gw: Arc<Gateway>, run_id: String, tx: watch::Sender<Latest>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if gw.streams.retire(&gw.metrics, &run_id, &tx) {
            return;
        }
        let latest =
            gw.store.last_frame_no(&run_id).await.map_err(|e| {
                RpcError::new("SERVER_ERROR", format!("stream failed: {}", e.message))
            });
        tx.send_if_modified(|v| {
            if *v == latest {
                return false;
            }
            *v = latest;
            true
        });
    }
}

/// `streamDevTools {runId, fromSeq?}`: validates, starts the stream and returns its id.
pub async fn start(
    gw: &Arc<Gateway>,
    caller: &Caller<'_>,
    ws: bool,
    p: &Value,
) -> Result<Value, RpcError> {
    let r = async {
        let conn = match (ws, caller.conn) {
            (true, Some(c)) => c.clone(),
            _ => {
                return Err(RpcError::new(
                    "INVALID_REQUEST",
                    "streamDevTools is only supported over websocket connections",
                ));
            }
        };
        // reserved before any work, and given back if the request fails
        let slot = reserve(gw, &conn)?;
        let (run_id, from_seq, workflow_name) = validate(gw, caller, p).await?;
        Ok((run_id, from_seq, workflow_name, conn, slot))
    }
    .await;
    let outcome = if r.is_ok() { "ok" } else { "error" };
    gw.metrics
        .inc(names::DEVTOOLS_SUBSCRIBE_TOTAL, &[("result", outcome)]);
    let (run_id, from_seq, workflow_name, conn, slot) = r?;
    let ctl = Arc::new(StreamCtl::new(&run_id, conn.id));
    gw.streams.add(&gw.metrics, ctl.clone());
    let reply = json!({"streamId": ctl.id, "runId": run_id, "fromSeq": from_seq});
    let latest = gw.streams.watch(&gw.metrics, &run_id, |tx| {
        tokio::spawn(poll_run(gw.clone(), run_id.clone(), tx));
    });
    let producer = Producer {
        gw: gw.clone(),
        conn,
        ctl,
        workflow_name,
        latest,
        _slot: slot,
        queue: VecDeque::new(),
        last_seen: 0,
        last_tree: None,
        doc: None,
        in_a_row: 0,
    };
    tokio::spawn(producer.run(from_seq));
    Ok(reply)
}

async fn validate(
    gw: &Arc<Gateway>,
    caller: &Caller<'_>,
    p: &Value,
) -> Result<(String, Option<i64>, String), RpcError> {
    let run_id = devtools::run_id_param(p)?.to_string();
    // `null` is a value like any other and refused, as upstream: only absence means "latest"
    let from_seq = match p.get("fromSeq") {
        None => None,
        Some(v) => match v.as_f64() {
            Some(n) if n.fract() == 0.0 && (0.0..=MAX_FROM_SEQ).contains(&n) => Some(n as i64),
            _ => {
                return Err(RpcError::new(
                    "SeqOutOfRange",
                    "fromSeq must be a non-negative integer.",
                ));
            }
        },
    };
    devtools::check_subscribed(caller, &run_id)?;
    let Some(run) = gw.store.get_run(&run_id).await? else {
        return Err(RpcError::new(
            "RunNotFound",
            format!("Run not found: {run_id}"),
        ));
    };
    if let Some(f) = from_seq {
        let latest = gw.store.last_frame_no(&run_id).await?;
        if f > latest {
            return Err(RpcError::new(
                "SeqOutOfRange",
                format!("fromSeq {f} is newer than current seq {latest}"),
            ));
        }
    }
    Ok((run_id, from_seq, run.workflow_name))
}

/// A snapshot event's text (`run_id` already JSON-encoded).
fn snapshot_event(run_id: &str, n: i64, root: &str, state: &str) -> String {
    format!(
        r#"{{"version":1,"kind":"snapshot","snapshot":{{"version":1,"runId":{run_id},"frameNo":{n},"seq":{n},"root":{root},"runState":{state}}}}}"#
    )
}

/// The length of [`snapshot_event`]'s text, without building it (the tree may be large).
fn snapshot_event_len(run_id_len: usize, n: i64, root_len: usize, state_len: usize) -> usize {
    const FIXED: usize = r#"{"version":1,"kind":"snapshot","snapshot":{"version":1,"runId":,"frameNo":,"seq":,"root":,"runState":}}"#.len();
    FIXED + run_id_len + 2 * n.to_string().len() + root_len + state_len
}

/// Why a stream ended early.
enum End {
    /// The socket closed or went away: nothing to tell anyone.
    Closed,
    /// Report to the client as `devtools.error`.
    Error(RpcError),
}

impl From<smithers_core::SmithersError> for End {
    fn from(e: smithers_core::SmithersError) -> Self {
        End::Error(RpcError::new(
            "SERVER_ERROR",
            format!("stream failed: {}", e.message),
        ))
    }
}

impl From<RpcError> for End {
    fn from(e: RpcError) -> Self {
        End::Error(e)
    }
}

struct Producer {
    gw: Arc<Gateway>,
    conn: Arc<ConnShared>,
    ctl: Arc<StreamCtl>,
    /// Names the root of frames stored without a workflow root.
    workflow_name: String,
    /// The run's latest frame number, from its poller.
    latest: watch::Receiver<Latest>,
    /// Given back when the stream ends.
    _slot: Slot,
    /// Serialized `devtools.event` payloads not yet handed to the socket.
    queue: VecDeque<Arc<str>>,
    /// Frame number of the last event produced.
    last_seen: i64,
    /// Tree of that frame (the base of the next delta).
    last_tree: Option<Arc<Built>>,
    /// Inflated frame JSON of the last frame read, to apply the next stored delta to.
    doc: Option<(i64, Arc<Value>)>,
    /// Events since the last snapshot.
    in_a_row: u32,
}

impl Producer {
    async fn run(mut self, from_seq: Option<i64>) {
        let end = self.drive(from_seq).await;
        if let Err(End::Error(e)) = end {
            let payload = json!({
                "streamId": self.ctl.id,
                "runId": self.ctl.run_id,
                "error": {"code": e.code, "message": e.message},
            });
            let _ = self.conn.out.push(Outbound::Event {
                event: "devtools.error",
                payload_json: payload.to_string().into(),
                state_version: self.gw.state_version(),
            });
        }
        self.gw.streams.remove(&self.gw.metrics, &self.ctl);
    }

    async fn drive(&mut self, from_seq: Option<i64>) -> Result<(), End> {
        self.initial(from_seq).await?;
        loop {
            self.flush()?;
            if self.ctl.stopped.load(Ordering::Acquire) || self.conn.out.is_closed() {
                return Err(End::Closed);
            }
            let blocked = !self.queue.is_empty();
            tokio::select! {
                _ = self.ctl.wake.notified() => {}
                changed = self.latest.changed() => {
                    if changed.is_err() {
                        return Err(End::Closed);
                    }
                }
                _ = tokio::time::sleep(BLOCKED_RETRY), if blocked => {}
            }
            if self.ctl.stopped.load(Ordering::Acquire) {
                return Err(End::Closed);
            }
            self.poll().await?;
        }
    }

    async fn initial(&mut self, from_seq: Option<i64>) -> Result<(), End> {
        let latest = self.gw.store.last_frame_no(&self.ctl.run_id).await?;
        if latest == 0 {
            return self.snapshot_of(0).await;
        }
        let Some(f) = from_seq else {
            return self.snapshot_of(latest).await;
        };
        let base = (f / i64::from(REBASELINE_INTERVAL)) * i64::from(REBASELINE_INTERVAL);
        let initial = base.min(latest);
        // As upstream: replay only from a 50-frame boundary that exists. Frames start at 1, so
        // `fromSeq` 0–49 has no such frame, and neither does a missing (rewound) one; a client
        // already at the latest frame has nothing to replay. Each gets one snapshot of the
        // latest frame and continues from there.
        if initial == 0
            || f == latest
            || self
                .gw
                .store
                .get_frame(&self.ctl.run_id, initial)
                .await?
                .is_none()
        {
            return self.snapshot_of(latest).await;
        }
        self.snapshot_of(initial).await?;
        self.advance_to(latest).await
    }

    /// One poll of the live loop.
    async fn poll(&mut self) -> Result<(), End> {
        let rebase = self.ctl.rebase_to.swap(-1, Ordering::AcqRel);
        if rebase >= 0 {
            self.doc = None;
            self.snapshot_of(rebase).await?;
        }
        let latest = if rebase >= 0 || self.ctl.invalidated.load(Ordering::Acquire) {
            // after a rewind the poller's figure may predate it: read it now
            self.gw.store.last_frame_no(&self.ctl.run_id).await?
        } else {
            let watched = self.latest.borrow_and_update().clone();
            match watched {
                Ok(n) if n >= 0 => n,
                Ok(_) => self.last_seen,
                Err(e) => return Err(End::Error(e)),
            }
        };
        if latest < self.last_seen {
            // frames were removed (a rewind): start again from what is there now
            self.doc = None;
            return self.snapshot_of(latest).await;
        }
        if self.ctl.invalidated.load(Ordering::Acquire) && latest == self.last_seen {
            return self.snapshot_of(latest).await;
        }
        self.advance_to(latest).await
    }

    /// Produces one event per frame after `last_seen` up to `latest`.
    async fn advance_to(&mut self, latest: i64) -> Result<(), End> {
        let mut n = self.last_seen + 1;
        while n <= latest {
            // read in bounded pages so a long replay does not load every frame at once
            let to = (n + 63).min(latest);
            let rows = self
                .gw
                .store
                .frames_between(&self.ctl.run_id, n, to)
                .await?;
            for row in rows {
                if row.frame_no != n {
                    // a gap: re-baseline on the newest frame and stop replaying
                    let newest = self.gw.store.last_frame_no(&self.ctl.run_id).await?;
                    return self.snapshot_of(newest).await;
                }
                let built = self.built(row).await?;
                self.event_for(n, built).await?;
                n += 1;
                self.flush()?;
            }
            if n <= to {
                let newest = self.gw.store.last_frame_no(&self.ctl.run_id).await?;
                return self.snapshot_of(newest).await;
            }
        }
        Ok(())
    }

    /// The tree of a stored frame: from the run's shared cache, or built here (applying a
    /// delta row to the previous frame) and shared.
    async fn built(&mut self, row: FrameRow) -> Result<Arc<Built>, End> {
        let n = row.frame_no;
        if let Some(b) = self.gw.streams.cached(&row.xml_hash) {
            self.doc = Some((n, b.doc.clone()));
            return Ok(b);
        }
        let doc = if row.encoding == "delta" {
            match self.doc.take() {
                Some((prev, base)) if prev == n - 1 => {
                    let d: Value = serde_json::from_str(&row.xml_json).unwrap_or(Value::Null);
                    smithers_engine::frames::delta::apply(&base, &d).map_err(|e| {
                        RpcError::new("SERVER_ERROR", format!("stream failed: frame {n}: {e}"))
                    })?
                }
                _ => self.read_full(n).await?.unwrap_or(Value::Null),
            }
        } else {
            serde_json::from_str(&row.xml_json).unwrap_or(Value::Null)
        };
        let t0 = Instant::now();
        let b = Arc::new(Built::new(
            &row.xml_hash,
            Arc::new(doc),
            &self.workflow_name,
        ));
        self.gw.metrics.observe(
            names::DEVTOOLS_SNAPSHOT_BUILD_MS,
            &[],
            t0.elapsed().as_secs_f64() * 1000.0,
        );
        self.gw.streams.share(b.clone());
        self.doc = Some((n, b.doc.clone()));
        Ok(b)
    }

    async fn read_full(&self, n: i64) -> Result<Option<Value>, End> {
        let row = smithers_engine::frames::read_frame(self.gw.store.as_ref(), &self.ctl.run_id, n)
            .await?;
        Ok(row.map(|r| serde_json::from_str(&r.xml_json).unwrap_or(Value::Null)))
    }

    /// Emits a snapshot of frame `n` (0 = the empty tree).
    async fn snapshot_of(&mut self, n: i64) -> Result<(), End> {
        let built = if n == 0 {
            Arc::new(Built::new("", Arc::new(Value::Null), ""))
        } else {
            let row = self.gw.store.get_frame(&self.ctl.run_id, n).await?;
            match row {
                Some(row) if row.encoding != "delta" => self.built(row).await?,
                Some(row) => match self.gw.streams.cached(&row.xml_hash) {
                    Some(b) => b,
                    None => {
                        let doc = self.read_full(n).await?.unwrap_or(Value::Null);
                        let b = Arc::new(Built::new(
                            &row.xml_hash,
                            Arc::new(doc),
                            &self.workflow_name,
                        ));
                        self.gw.streams.share(b.clone());
                        b
                    }
                },
                None => Arc::new(Built::new("", Arc::new(Value::Null), "")),
            }
        };
        self.doc = (n > 0).then(|| (n, built.doc.clone()));
        self.emit_snapshot(n, built).await
    }

    async fn emit_snapshot(&mut self, n: i64, built: Arc<Built>) -> Result<(), End> {
        let state = devtools::run_state_of(&self.gw, &self.ctl.run_id).await?;
        self.emit_snapshot_with(n, built, &state.to_string())
    }

    fn emit_snapshot_with(&mut self, n: i64, built: Arc<Built>, state: &str) -> Result<(), End> {
        let run_id = Value::String(self.ctl.run_id.clone()).to_string();
        let event = snapshot_event(&run_id, n, &built.root_json, state);
        self.push("snapshot", &event);
        self.ctl.invalidated.store(false, Ordering::Release);
        self.last_seen = n;
        self.last_tree = Some(built);
        self.in_a_row = 0;
        Ok(())
    }

    /// The event for frame `n`: a delta against the previous event's tree, or a snapshot when
    /// the rules say so.
    async fn event_for(&mut self, n: i64, built: Arc<Built>) -> Result<(), End> {
        let must_snapshot = self.ctl.invalidated.load(Ordering::Acquire)
            || self.in_a_row + 1 >= REBASELINE_INTERVAL;
        let Some(prev) = self.last_tree.clone().filter(|_| !must_snapshot) else {
            return self.emit_snapshot(n, built).await;
        };
        let base = self.last_seen;
        let delta = match self.gw.streams.cached_delta(&prev, &built, base, n) {
            Some(d) => d,
            None => {
                let t0 = Instant::now();
                let ops = if Arc::ptr_eq(&prev, &built) || prev.root_json == built.root_json {
                    "[]".to_string()
                } else {
                    serde_json::to_string(&crate::devtools_diff::ops(&prev.root, &built.root))
                        .unwrap_or_else(|_| "[]".into())
                };
                let d: Arc<str> = format!(
                    r#"{{"version":1,"kind":"delta","delta":{{"version":1,"baseSeq":{base},"seq":{n},"ops":{ops}}}}}"#
                )
                .into();
                self.gw.metrics.observe(
                    names::DEVTOOLS_DELTA_BUILD_MS,
                    &[],
                    t0.elapsed().as_secs_f64() * 1000.0,
                );
                self.gw
                    .streams
                    .share_delta(&prev, &built, base, n, d.clone());
                d
            }
        };
        // As upstream: the snapshot replaces the delta when the delta event is at least as large
        // as the whole snapshot event (runId, frameNo, seq and runState included). The snapshot
        // without its runState is a lower bound, so the run's state is only read when the delta
        // is large enough for the answer to depend on it.
        let run_id_len = Value::String(self.ctl.run_id.clone()).to_string().len();
        let without_state = snapshot_event_len(run_id_len, n, built.root_json.len(), 0);
        if delta.len() >= without_state + MIN_RUN_STATE_LEN {
            let state = devtools::run_state_of(&self.gw, &self.ctl.run_id)
                .await?
                .to_string();
            if delta.len() >= without_state + state.len() {
                return self.emit_snapshot_with(n, built, &state);
            }
        }
        self.push("delta", &delta);
        self.last_seen = n;
        self.last_tree = Some(built);
        self.in_a_row += 1;
        Ok(())
    }

    fn push(&mut self, kind: &'static str, event: &str) {
        let text: Arc<str> = format!(
            r#"{{"streamId":{},"runId":{},"event":{event}}}"#,
            Value::String(self.ctl.id.clone()),
            Value::String(self.ctl.run_id.clone())
        )
        .into();
        self.gw
            .metrics
            .inc(names::DEVTOOLS_EVENT_TOTAL, &[("kind", kind)]);
        self.gw
            .metrics
            .observe(names::DEVTOOLS_EVENT_BYTES, &[], text.len() as f64);
        self.queue.push_back(text);
    }

    /// Hands queued events to the socket while it is under the high-water mark.
    fn flush(&mut self) -> Result<(), End> {
        let limits = &self.gw.config.limits;
        let (max_frames, max_bytes) = (
            limits.max_outbound_frames / 2,
            HIGH_WATER_BYTES.min(limits.max_outbound_bytes / 2),
        );
        while let Some(front) = self.queue.front() {
            let out = Outbound::Event {
                event: "devtools.event",
                payload_json: front.clone(),
                state_version: self.gw.state_version(),
            };
            match self.conn.out.offer(out, max_frames, max_bytes) {
                Ok(()) => {}
                Err(Refused::Full) => break,
                Err(Refused::Closed) => return Err(End::Closed),
            }
            self.queue.pop_front();
        }
        if self.queue.len() > QUEUE_LIMIT {
            self.gw
                .metrics
                .inc(names::DEVTOOLS_BACKPRESSURE_DISCONNECT_TOTAL, &[]);
            return Err(End::Error(RpcError::new(
                "BackpressureDisconnect",
                format!("Subscriber outbound queue exceeded {QUEUE_LIMIT} events."),
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_event_length_is_computed_without_building_the_event() {
        for (id, n, root, state) in [
            (r#""r""#, 0, "{}", ""),
            (
                r#""run-1""#,
                12_345,
                r#"{"id":1,"children":[]}"#,
                r#"{"state":"running"}"#,
            ),
        ] {
            assert_eq!(
                snapshot_event(id, n, root, state).len(),
                snapshot_event_len(id.len(), n, root.len(), state.len())
            );
        }
    }
}
