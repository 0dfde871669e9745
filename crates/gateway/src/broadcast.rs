//! From committed engine events to protocol broadcasts: the one place events fan out to
//! connections, the global state version moves and completions are counted.

use crate::gateway::{Gateway, Outbound};
use serde_json::{Value, json};
use smithers_engine::EngineEvent;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Gateway {
    /// Sends an event to every authenticated connection that wants it; bumps the global state
    /// version by exactly one, whether or not anyone receives it.
    pub fn broadcast(&self, event: &'static str, payload: Value) {
        let sv = self.state_version.fetch_add(1, Ordering::AcqRel) + 1;
        let run = payload.get("runId").and_then(Value::as_str);
        let event_seq = payload.get("eventSeq").and_then(Value::as_i64);
        // serialized once here rather than once per connection; each writer adds its own seq
        let payload_json: Arc<str> = smithers_core::json::text(&payload).into();
        let mut sent: u64 = 0;
        if let Ok(conns) = self.conns.read() {
            for c in conns.values() {
                let out = || Outbound::Event {
                    event,
                    payload_json: payload_json.clone(),
                    state_version: sv,
                };
                // never waits: a connection whose queue is full is closed as too slow
                if c.deliver(run, event_seq, out) {
                    sent += 1;
                }
            }
        }
        if sent > 0 {
            self.metrics.add(
                "smithers_gateway_messages_sent_total",
                &[
                    ("event", event),
                    ("frameType", "event"),
                    ("transport", "ws"),
                ],
                sent as f64,
            );
        }
    }

    /// Maps committed engine events to protocol broadcasts (gateway-protocol §1.8).
    pub fn on_engine_event(&self, ev: &EngineEvent) {
        if self.forwards_foreign.load(Ordering::Acquire) {
            self.advance_seq(&ev.run_id, ev.seq);
        }
        self.broadcast_event(ev.event_type, &ev.run_id, ev.seq, &ev.payload);
    }

    /// Broadcasts an event read from the run's log (committed by another node), unless an
    /// event of that run with this seq or a later one was broadcast already.
    pub fn on_stored_event(&self, run_id: &str, seq: i64, event_type: &str, payload: &Value) {
        if self.advance_seq(run_id, seq) {
            self.broadcast_event(event_type, run_id, seq, payload);
        }
    }

    /// The last event seq of a run this gateway broadcast, if it remembers one.
    pub fn last_broadcast_seq(&self, run_id: &str) -> Option<i64> {
        self.last_seqs.lock().ok().and_then(|s| s.get(run_id))
    }

    /// Records a broadcast seq; false when it (or a later one) was recorded already.
    fn advance_seq(&self, run_id: &str, seq: i64) -> bool {
        self.last_seqs
            .lock()
            .map(|mut s| s.advance(run_id, seq))
            .unwrap_or(true)
    }

    fn broadcast_event(&self, event_type: &str, run_id: &str, seq: i64, payload: &Value) {
        let Some((event, payload)) = map_event(event_type, run_id, seq, payload) else {
            return;
        };
        if event == "run.completed" {
            let st = payload
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            self.count_completion(run_id, &st);
        }
        self.broadcast(event, payload);
    }

    /// Broadcasts `run.completed`. It is called once per completion: from the engine event that
    /// recorded it, or by the gateway for a parked run it cancelled itself.
    pub fn run_completed(&self, run_id: &str, st: &str, error: Option<Value>) {
        let mut payload = json!({"runId": run_id, "status": st});
        if let Some(e) = error {
            payload["error"] = e;
        }
        self.broadcast("run.completed", payload);
        self.count_completion(run_id, st);
    }

    fn count_completion(&self, run_id: &str, st: &str) {
        let workflow = self
            .run_keys
            .lock()
            .ok()
            .and_then(|mut m| m.remove(run_id))
            .unwrap_or_default();
        self.metrics.inc(
            "smithers_gateway_runs_completed_total",
            &[("status", st), ("workflow", &workflow)],
        );
    }
}

/// Maps an engine event (as committed, with its per-run `seq`) to a protocol event (gateway-protocol
/// §1.8). Payloads carry `eventSeq`, the event's position in the run's durable log, which a
/// reconnecting client passes back as `afterSeq` to replay what it missed. Beyond upstream's
/// fields, node events carry `iteration`, `attempt` and `durationMs`, approval requests their
/// `title`, `mode` and `options`, and `node.retrying`, `node.waiting` and `run.waiting` exist,
/// so that a follower (`smithers run`) can print what `smithers up` prints.
pub fn map_event(
    event_type: &str,
    run_id: &str,
    seq: i64,
    p: &Value,
) -> Option<(&'static str, Value)> {
    let node = p.get("nodeId").cloned().unwrap_or(Value::Null);
    let iteration = p.get("iteration").cloned().unwrap_or(json!(0));
    let field = |k: &str| p.get(k).cloned().unwrap_or(Value::Null);
    let (event, mut payload) = match event_type {
        "NodeStarted" => (
            "node.started",
            json!({"runId": run_id, "nodeId": node, "state": "in-progress", "iteration": iteration, "attempt": field("attempt")}),
        ),
        "NodeFinished" => (
            "node.finished",
            json!({"runId": run_id, "nodeId": node, "state": "finished", "iteration": iteration, "attempt": field("attempt"), "durationMs": field("durationMs")}),
        ),
        "NodeFailed" => (
            "node.failed",
            json!({"runId": run_id, "nodeId": node, "state": "failed", "error": field("error"), "iteration": iteration, "attempt": field("attempt"), "durationMs": field("durationMs")}),
        ),
        "NodeRetrying" => (
            "node.retrying",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration, "attempt": field("attempt"), "delayMs": field("delayMs")}),
        ),
        "NodeWaitingEvent" => (
            "node.waiting",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration, "kind": "event", "event": field("event"), "correlationId": field("correlationId")}),
        ),
        "NodeWaitingTimer" => (
            "node.waiting",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration, "kind": "timer", "firesAtMs": field("firesAtMs")}),
        ),
        "RunStatusChanged" => (
            "run.waiting",
            json!({"runId": run_id, "status": field("status")}),
        ),
        "NodeOutput" => (
            "task.output",
            json!({"runId": run_id, "nodeId": node, "output": field("text"), "stream": field("stream"), "iteration": iteration}),
        ),
        "TaskHeartbeat" => (
            "task.heartbeat",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration, "attempt": field("attempt")}),
        ),
        "ApprovalRequested" => (
            "approval.requested",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration, "title": field("title"), "mode": field("mode"), "options": field("options")}),
        ),
        "ApprovalGranted" | "ApprovalDenied" => (
            "approval.decided",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration, "approved": event_type == "ApprovalGranted"}),
        ),
        "ApprovalAutoApproved" => (
            "approval.auto_approved",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration}),
        ),
        "RunFinished" => (
            "run.completed",
            json!({"runId": run_id, "status": "finished"}),
        ),
        "RunFailed" => (
            "run.completed",
            json!({"runId": run_id, "status": "failed", "error": field("error")}),
        ),
        "RunCancelled" => (
            "run.completed",
            json!({"runId": run_id, "status": "cancelled"}),
        ),
        "TimeTravelJumped" => (
            "run.time_travel_jumped",
            json!({"runId": run_id, "fromFrameNo": field("fromFrameNo"), "toFrameNo": field("toFrameNo"), "caller": field("caller")}),
        ),
        _ => return None,
    };
    payload["eventSeq"] = json!(seq);
    Some((event, payload))
}
