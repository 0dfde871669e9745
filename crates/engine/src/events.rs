//! Engine events: appended to the run's durable event log in the same transaction as the state
//! change they describe, then published on the in-process bus (for `smithers up` progress and
//! the gateway). Type names follow the reference (`NodeStarted`, `RunFinished`, …).

use serde_json::{Map, Value};
use std::sync::Arc;

/// An event after it was committed: it has its per-run `seq`.
#[derive(Debug, Clone)]
pub struct EngineEvent {
    pub run_id: Arc<str>,
    pub seq: i64,
    pub event_type: &'static str,
    pub timestamp_ms: i64,
    /// The whole event JSON, as stored in `payload_json`.
    pub payload: Arc<Value>,
}

impl EngineEvent {
    /// A field of the payload, e.g. `nodeId`.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.payload.get(name)
    }
}

/// An event not yet committed.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub event_type: &'static str,
    pub timestamp_ms: i64,
    pub payload: Value,
}

/// Builds the event JSON: `{type, runId, timestampMs, ...fields}`.
pub fn make(
    run_id: &str,
    event_type: &'static str,
    timestamp_ms: i64,
    fields: Value,
) -> PendingEvent {
    let mut m = Map::new();
    m.insert("type".into(), Value::String(event_type.into()));
    m.insert("runId".into(), Value::String(run_id.into()));
    m.insert("timestampMs".into(), Value::from(timestamp_ms));
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    PendingEvent {
        event_type,
        timestamp_ms,
        payload: Value::Object(m),
    }
}

/// Event type names (the reference's `SmithersEvent` union).
pub mod kind {
    pub const RUN_STARTED: &str = "RunStarted";
    pub const RUN_RESUMED: &str = "RunResumed";
    pub const RUN_FORKED: &str = "RunForked";
    pub const TIME_TRAVEL_JUMPED: &str = "TimeTravelJumped";
    pub const RUN_STATUS_CHANGED: &str = "RunStatusChanged";
    pub const RUN_FINISHED: &str = "RunFinished";
    pub const RUN_FAILED: &str = "RunFailed";
    pub const RUN_CANCELLED: &str = "RunCancelled";
    pub const FRAME_COMMITTED: &str = "FrameCommitted";
    pub const SNAPSHOT_CAPTURED: &str = "SnapshotCaptured";
    pub const NODE_PENDING: &str = "NodePending";
    pub const NODE_STARTED: &str = "NodeStarted";
    pub const NODE_FINISHED: &str = "NodeFinished";
    pub const NODE_FAILED: &str = "NodeFailed";
    pub const NODE_CANCELLED: &str = "NodeCancelled";
    pub const NODE_SKIPPED: &str = "NodeSkipped";
    pub const NODE_RETRYING: &str = "NodeRetrying";
    pub const NODE_WAITING_APPROVAL: &str = "NodeWaitingApproval";
    pub const NODE_WAITING_EVENT: &str = "NodeWaitingEvent";
    pub const NODE_WAITING_TIMER: &str = "NodeWaitingTimer";
    pub const NODE_OUTPUT: &str = "NodeOutput";
    pub const TASK_HEARTBEAT: &str = "TaskHeartbeat";
    pub const TOKEN_USAGE_REPORTED: &str = "TokenUsageReported";
    pub const APPROVAL_REQUESTED: &str = "ApprovalRequested";
    pub const APPROVAL_GRANTED: &str = "ApprovalGranted";
    pub const APPROVAL_DENIED: &str = "ApprovalDenied";
    pub const APPROVAL_AUTO_APPROVED: &str = "ApprovalAutoApproved";
    pub const TIMER_CREATED: &str = "TimerCreated";
    pub const TIMER_FIRED: &str = "TimerFired";
    pub const TIMER_CANCELLED: &str = "TimerCancelled";
    pub const SIGNAL_RECEIVED: &str = "SignalReceived";
    pub const LOOP_ADVANCED: &str = "LoopAdvanced";
}
