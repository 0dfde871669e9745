//! Row shapes. Field names are the snake_case column names of the reference schema; the
//! gateway serializes them as camelCase (`#[serde(rename_all = "camelCase")]`).

use serde::{Deserialize, Serialize};

/// Run statuses.
pub mod status {
    pub const RUNNING: &str = "running";
    pub const WAITING_APPROVAL: &str = "waiting-approval";
    pub const WAITING_EVENT: &str = "waiting-event";
    pub const WAITING_TIMER: &str = "waiting-timer";
    pub const FINISHED: &str = "finished";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
    pub const CONTINUED: &str = "continued";
    pub const NEEDS_ATTENTION: &str = "needs-attention";
    /// Whether a run in this status has ended for good (it takes no decisions or signals).
    pub fn is_ended(s: &str) -> bool {
        matches!(s, FINISHED | FAILED | CANCELLED | CONTINUED)
    }

    pub const ALL: &[&str] = &[
        RUNNING,
        WAITING_APPROVAL,
        WAITING_EVENT,
        WAITING_TIMER,
        FINISHED,
        FAILED,
        CANCELLED,
        CONTINUED,
        NEEDS_ATTENTION,
    ];
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRow {
    pub run_id: String,
    pub parent_run_id: Option<String>,
    pub workflow_name: String,
    pub workflow_path: Option<String>,
    pub workflow_hash: Option<String>,
    pub status: String,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub heartbeat_at_ms: Option<i64>,
    pub runtime_owner_id: Option<String>,
    pub cancel_requested_at_ms: Option<i64>,
    pub hijack_requested_at_ms: Option<i64>,
    pub hijack_target: Option<String>,
    pub vcs_type: Option<String>,
    pub vcs_root: Option<String>,
    pub vcs_revision: Option<String>,
    pub error_json: Option<String>,
    pub config_json: Option<String>,
}

/// Partial update of a run row: `None` leaves a column alone, `Some(None)` sets NULL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunPatch {
    pub status: Option<String>,
    pub workflow_name: Option<String>,
    pub started_at_ms: Option<Option<i64>>,
    pub finished_at_ms: Option<Option<i64>>,
    pub heartbeat_at_ms: Option<Option<i64>>,
    pub runtime_owner_id: Option<Option<String>>,
    pub cancel_requested_at_ms: Option<Option<i64>>,
    pub error_json: Option<Option<String>>,
    pub config_json: Option<Option<String>>,
}

/// Node (task instance) states.
pub mod node_state {
    pub const PENDING: &str = "pending";
    pub const IN_PROGRESS: &str = "in-progress";
    pub const FINISHED: &str = "finished";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
    pub const SKIPPED: &str = "skipped";
    pub const WAITING_APPROVAL: &str = "waiting-approval";
    pub const WAITING_EVENT: &str = "waiting-event";
    pub const WAITING_TIMER: &str = "waiting-timer";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub run_id: String,
    pub node_id: String,
    pub iteration: i64,
    pub state: String,
    pub last_attempt: Option<i64>,
    pub updated_at_ms: i64,
    pub output_table: String,
    pub label: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRow {
    pub run_id: String,
    pub node_id: String,
    pub iteration: i64,
    pub attempt: i64,
    pub state: String,
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub heartbeat_at_ms: Option<i64>,
    pub heartbeat_data_json: Option<String>,
    pub error_json: Option<String>,
    pub jj_pointer: Option<String>,
    pub response_text: Option<String>,
    pub jj_cwd: Option<String>,
    pub cached: bool,
    pub meta_json: Option<String>,
}

/// A validated task output (one per run, node, iteration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutputRow {
    pub run_id: String,
    pub node_id: String,
    pub iteration: i64,
    pub output_table: String,
    pub payload_json: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FrameRow {
    pub run_id: String,
    pub frame_no: i64,
    pub created_at_ms: i64,
    /// Full tree JSON (`keyframe`) or a delta (`delta`), per `encoding`.
    pub xml_json: String,
    pub xml_hash: String,
    pub encoding: String,
    pub mounted_task_ids_json: Option<String>,
    pub task_index_json: Option<String>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRow {
    pub run_id: String,
    pub frame_no: i64,
    /// Keyframes hold the full state; deltas hold only what changed since the previous frame.
    pub encoding: String,
    pub nodes_json: String,
    pub outputs_json: String,
    pub ralph_json: String,
    pub input_json: String,
    pub vcs_pointer: Option<String>,
    pub workflow_hash: Option<String>,
    pub content_hash: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRow {
    pub run_id: String,
    pub seq: i64,
    pub timestamp_ms: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload_json: String,
}

/// Loop state (`_smithers_ralph`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoopRow {
    pub run_id: String,
    pub ralph_id: String,
    pub iteration: i64,
    pub done: bool,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalRow {
    pub run_id: String,
    pub node_id: String,
    pub iteration: i64,
    /// `requested | approved | denied`
    pub status: String,
    pub requested_at_ms: Option<i64>,
    pub decided_at_ms: Option<i64>,
    pub note: Option<String>,
    pub decided_by: Option<String>,
    pub request_json: Option<String>,
    pub decision_json: Option<String>,
    pub auto_approved: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignalRow {
    pub run_id: String,
    pub seq: i64,
    pub signal_name: String,
    pub correlation_id: Option<String>,
    pub payload_json: String,
    pub received_at_ms: i64,
    pub received_by: Option<String>,
}

/// A remembered webhook delivery (`_smithers_webhook_deliveries`), so a repeat is answered as a
/// duplicate instead of acting twice. `outcome_json` is `None` while the claimer is still acting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDeliveryRow {
    pub workflow: String,
    pub delivery_id: String,
    /// Who holds the claim; only that claimer may record the outcome or release it.
    pub claim_id: String,
    pub received_at_ms: i64,
    pub expires_at_ms: i64,
    pub outcome_json: Option<String>,
}

/// A cron schedule (`_smithers_cron`). Gateway crons have `workflow_path = "gateway:<key>"`;
/// `error_json` holds the plain message of the last failed fire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CronRow {
    pub cron_id: String,
    pub pattern: String,
    pub workflow_path: String,
    pub enabled: bool,
    pub created_at_ms: i64,
    pub last_run_at_ms: Option<i64>,
    pub next_run_at_ms: Option<i64>,
    pub error_json: Option<String>,
    /// The input of the runs it starts (a JSON object; `None` means `{}`).
    #[serde(default)]
    pub input_json: Option<String>,
}

/// Outcomes of a time-travel (rewind) request in the audit table.
pub mod audit_result {
    pub const IN_PROGRESS: &str = "in_progress";
    pub const SUCCESS: &str = "success";
    pub const FAILED: &str = "failed";
    /// The rewind started changing state and did not finish; the run needs attention.
    pub const PARTIAL: &str = "partial";
}

/// One rewind request (`_smithers_time_travel_audit`). The row is written `in_progress` before
/// anything changes and updated in place with the outcome, so a crash leaves a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRow {
    pub id: String,
    pub run_id: String,
    /// -1 when the request failed before the run's latest frame was known.
    pub from_frame_no: i64,
    pub to_frame_no: i64,
    pub caller: String,
    pub timestamp_ms: i64,
    /// One of [`audit_result`].
    pub result: String,
    pub duration_ms: i64,
}

/// A cached node diff (`_smithers_node_diffs`): the serialized diff bundle of one attempt
/// against `base_ref`. Rows of attempts removed by a rewind are removed with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDiffRow {
    pub run_id: String,
    pub node_id: String,
    pub iteration: i64,
    pub base_ref: String,
    pub attempt: i64,
    pub attempt_started_at_ms: i64,
    pub bundle_json: String,
    pub created_at_ms: i64,
}
