//! `jumpToFrame` (gateway-protocol §1.16): a destructive rewind of a run to one of its frames,
//! guarded by owner-or-admin authorization, a per-run lock, an hourly quota and an audit row
//! that is written before anything changes.
//!
//! Deliberate deviations (DESIGN §5): only executed rewinds count against the quota, the owner
//! is whoever created the run (resuming does not transfer it), and a rewind that changed the
//! run without finishing leaves it in the real status `needs-attention`.

use crate::error::RpcError;
use crate::gateway::{Caller, Gateway};
use crate::metrics::names;
use serde_json::{Value, json};
use smithers_engine::now_ms;
use smithers_store::{AuditRow, RunRow, Write, audit_result};
use std::sync::Arc;
use std::time::Instant;

/// Executed rewinds allowed per (run, caller) within [`RATE_WINDOW_MS`].
pub const RATE_LIMIT: usize = 10;
pub const RATE_WINDOW_MS: i64 = 3_600_000;
/// Longest caller name kept in the audit table.
pub const MAX_CALLER_LEN: usize = 256;
const MAX_FRAME_NO: f64 = 2_147_483_647.0;

/// The per-run rewind lock; released when dropped, however the request ends.
pub struct RunLock<'a> {
    gw: &'a Gateway,
    run_id: String,
}

impl Drop for RunLock<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.gw.rewinding.lock() {
            set.remove(&self.run_id);
        }
    }
}

/// Takes the rewind lock of a run; `None` while another rewind of it is in flight.
pub fn lock<'a>(gw: &'a Gateway, run_id: &str) -> Option<RunLock<'a>> {
    let mut set = gw.rewinding.lock().ok()?;
    if !set.insert(run_id.to_string()) {
        return None;
    }
    Some(RunLock {
        gw,
        run_id: run_id.to_string(),
    })
}

/// The run's owner: who created it (`configJson.auth.triggeredBy`).
fn owner_of(run: &RunRow) -> Option<String> {
    let cfg: Value = serde_json::from_str(run.config_json.as_deref()?).ok()?;
    cfg.pointer("/auth/triggeredBy")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The caller's name in audit rows: the user id, else `gateway`; trimmed and bounded.
fn caller_name(user_id: Option<&str>) -> String {
    let raw = user_id.unwrap_or("gateway").trim();
    let name: String = raw.chars().take(MAX_CALLER_LEN).collect();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

/// One audit row for one request, written first as `in_progress` (or directly with its final
/// result when the request fails before anything could change).
struct Audit<'a> {
    gw: &'a Gateway,
    row: AuditRow,
    started: Instant,
}

impl<'a> Audit<'a> {
    fn new(gw: &'a Gateway, run_id: &str, to_frame_no: i64, caller: &str) -> Self {
        Audit {
            gw,
            row: AuditRow {
                id: uuid::Uuid::new_v4().to_string(),
                run_id: run_id.to_string(),
                from_frame_no: -1,
                to_frame_no,
                caller: caller.to_string(),
                timestamp_ms: now_ms(),
                result: audit_result::IN_PROGRESS.into(),
                duration_ms: 0,
            },
            started: Instant::now(),
        }
    }

    fn finished(&self, result: &str) -> AuditRow {
        let mut row = self.row.clone();
        row.result = result.into();
        row.duration_ms = self.started.elapsed().as_millis() as i64;
        row
    }

    async fn write(&self, result: &str) -> Result<(), RpcError> {
        self.gw.engine.record_audit(self.finished(result)).await?;
        Ok(())
    }

    /// Records a failure and returns the error to send.
    async fn fail(&self, metric: &str, e: RpcError) -> RpcError {
        if let Err(w) = self.write(audit_result::FAILED).await {
            log_audit_error(&w);
        }
        self.gw
            .metrics
            .inc(names::REWIND_TOTAL, &[("result", metric)]);
        e
    }
}

/// The audit write failing must not hide the original error; it is reported on stderr.
fn log_audit_error(e: &RpcError) {
    eprintln!("smithers: could not write the time-travel audit row: {e}");
}

/// `jumpToFrame {runId, frameNo, confirm}` / `devtools.jumpToFrame`.
pub async fn jump_to_frame(
    gw: &Arc<Gateway>,
    caller: &Caller<'_>,
    p: &Value,
) -> Result<Value, RpcError> {
    // gateway-level checks: no audit row for these
    let run_id = match p.get("runId").and_then(Value::as_str) {
        Some(r) if !r.is_empty() => r,
        _ => return Err(RpcError::new("InvalidRunId", "runId is required")),
    };
    let frame_raw = match p.get("frameNo").and_then(Value::as_f64) {
        Some(n) if n.is_finite() => n,
        _ => return Err(RpcError::new("InvalidFrameNo", "frameNo is required")),
    };
    let Some(run) = gw.store.get_run(run_id).await? else {
        return Err(RpcError::new(
            "RunNotFound",
            format!("Run not found: {run_id}"),
        ));
    };
    let frame_int = (frame_raw.fract() == 0.0 && (0.0..=MAX_FRAME_NO).contains(&frame_raw))
        .then_some(frame_raw as i64);
    let user = caller.grant.user_id.as_deref();
    let who = caller_name(user);

    // with authentication off every caller is trusted, as for every other method
    let is_admin = caller.grant.role.eq_ignore_ascii_case("admin")
        || matches!(gw.auth, crate::auth::AuthConfig::None);
    let is_owner = match (owner_of(&run), user) {
        (Some(owner), Some(u)) => owner == u,
        _ => false,
    };
    let audit = Audit::new(gw, run_id, frame_int.unwrap_or(-1), &who);
    if !is_admin && !is_owner {
        if let Err(w) = audit.write(audit_result::FAILED).await {
            log_audit_error(&w);
        }
        return Err(RpcError::new(
            "Unauthorized",
            "Only the run owner or an admin may rewind this run.",
        ));
    }

    if !crate::node_output::valid_run_id(run_id) {
        let e = RpcError::new("InvalidRunId", crate::node_output::INVALID_RUN_ID);
        return Err(audit.fail("failed", e).await);
    }
    let Some(frame_no) = frame_int else {
        let e = RpcError::new(
            "InvalidFrameNo",
            "frameNo must be a non-negative i32 integer.",
        );
        return Err(audit.fail("failed", e).await);
    };
    // an addition: `preview: true` (without `confirm`) answers what the rewind would delete,
    // by the engine's own rule, and changes nothing (no audit row, no quota)
    if p.get("preview") == Some(&Value::Bool(true)) && p.get("confirm") != Some(&Value::Bool(true))
    {
        let plan = gw
            .engine
            .rewind_preview(run_id, frame_no)
            .await
            .map_err(|e| {
                if e.code == smithers_core::Code::InvalidInput {
                    RpcError::new("FrameOutOfRange", e.message)
                } else {
                    RpcError::from(e)
                }
            })?;
        let attempts: Vec<Value> = plan
            .attempts
            .iter()
            .map(|(n, i, a)| json!({"nodeId": n, "iteration": i, "attempt": a}))
            .collect();
        return Ok(json!({
            "preview": true,
            "runId": run_id,
            "frameNo": frame_no,
            "latestFrameNo": plan.latest_frame_no,
            "deletedFrames": plan.latest_frame_no - frame_no,
            "deletedAttempts": attempts.len(),
            "attempts": attempts,
        }));
    }
    if p.get("confirm") != Some(&Value::Bool(true)) {
        let e = RpcError::new(
            "ConfirmationRequired",
            "jumpToFrame is destructive; pass confirm: true to proceed.",
        );
        return Err(audit.fail("failed", e).await);
    }
    let Some(_lock) = lock(gw, run_id) else {
        let e = RpcError::new(
            "Busy",
            format!("Another jumpToFrame is already running for {run_id}."),
        );
        return Err(audit.fail("busy", e).await);
    };
    // only rewinds that changed the run count (DESIGN §5)
    let since = now_ms() - RATE_WINDOW_MS;
    let executed = gw
        .store
        .list_audits(Some(run_id), None)
        .await?
        .iter()
        .filter(|a| {
            a.caller == who
                && a.timestamp_ms > since
                && a.from_frame_no != a.to_frame_no
                && a.from_frame_no >= 0
                && (a.result == audit_result::SUCCESS || a.result == audit_result::PARTIAL)
        })
        .count();
    if executed >= RATE_LIMIT {
        let e = RpcError::new(
            "RateLimited",
            format!("Rewind quota exceeded for {run_id}; max {RATE_LIMIT} per 60m."),
        );
        return Err(audit.fail("rate_limited", e).await);
    }

    // from here on a crash leaves an in_progress row that startup turns into `partial`
    audit.write(audit_result::IN_PROGRESS).await?;
    let latest = gw.store.last_frame_no(run_id).await?;
    let mut audit = audit;
    audit.row.from_frame_no = latest;
    if latest == 0 {
        let e = RpcError::new("FrameOutOfRange", format!("Run {run_id} has no frames."));
        return Err(audit.fail("failed", e).await);
    }
    if frame_no > latest {
        let e = RpcError::new(
            "FrameOutOfRange",
            format!("frameNo must be between 0 and {latest}."),
        );
        return Err(audit.fail("failed", e).await);
    }
    if gw.store.get_frame(run_id, frame_no).await?.is_none() {
        let e = RpcError::new(
            "FrameOutOfRange",
            format!("Frame {frame_no} does not exist for run {run_id}."),
        );
        return Err(audit.fail("failed", e).await);
    }
    if frame_no == latest {
        audit.write(audit_result::SUCCESS).await?;
        gw.metrics
            .inc(names::REWIND_TOTAL, &[("result", audit_result::SUCCESS)]);
        return Ok(json!({
            "ok": true, "newFrameNo": frame_no, "revertedSandboxes": 0, "deletedFrames": 0,
            "deletedAttempts": 0, "invalidatedDiffs": 0,
            "durationMs": audit.started.elapsed().as_millis() as u64,
        }));
    }

    let was_active = gw.engine.is_active(run_id);
    let result = gw
        .engine
        .rewind_with(run_id, frame_no, &who, |_| {
            vec![Write::UpsertAudit(audit.finished(audit_result::SUCCESS))]
        })
        .await;
    let done = match result {
        Ok(done) => done,
        Err(e) => {
            // the run was stopped for the rewind but not rewound: it needs a person
            let stopped = was_active && !gw.engine.is_active(run_id);
            if stopped {
                if let Err(w) = audit.write(audit_result::PARTIAL).await {
                    log_audit_error(&w);
                }
                let _ = gw
                    .engine
                    .mark_needs_attention(run_id, &format!("Rewind failed: {}", e.message))
                    .await;
                gw.metrics
                    .inc(names::REWIND_TOTAL, &[("result", audit_result::PARTIAL)]);
                gw.metrics.inc(names::REWIND_ROLLBACK_TOTAL, &[]);
                return Err(RpcError::new(
                    "RewindFailed",
                    "Rewind failed and rollback was only partial; run needs attention.",
                ));
            }
            let msg = if e.code == smithers_core::Code::RunStillRunning {
                format!(
                    "Run {run_id} did not stop within 10s of abort; refusing to rewind a live task."
                )
            } else {
                e.message
            };
            return Err(audit
                .fail("failed", RpcError::new("RewindFailed", msg))
                .await);
        }
    };
    let duration = audit.started.elapsed();
    gw.metrics
        .inc(names::REWIND_TOTAL, &[("result", audit_result::SUCCESS)]);
    gw.metrics
        .observe_duration(names::REWIND_DURATION_MS, &[], duration);
    gw.metrics.observe(
        names::REWIND_FRAMES_DELETED,
        &[],
        done.deleted_frames as f64,
    );
    gw.metrics
        .observe(names::REWIND_SANDBOXES_REVERTED, &[], 0.0);
    // the engine published TimeTravelJumped (broadcast as run.time_travel_jumped); open
    // DevTools streams of the run start again from a snapshot
    gw.streams.invalidate(run_id, frame_no);
    gw.continue_run(run_id, Some(caller)).await?;
    Ok(json!({
        "ok": true,
        "newFrameNo": frame_no,
        "revertedSandboxes": 0,
        "deletedFrames": done.deleted_frames,
        "deletedAttempts": done.deleted_attempts,
        "invalidatedDiffs": done.invalidated_diffs,
        "durationMs": duration.as_millis() as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_names_are_trimmed_bounded_and_never_empty() {
        assert_eq!(caller_name(None), "gateway");
        assert_eq!(caller_name(Some("  bob ")), "bob");
        assert_eq!(caller_name(Some("   ")), "unknown");
        assert_eq!(caller_name(Some(&"x".repeat(300))).len(), MAX_CALLER_LEN);
    }

    #[test]
    fn owner_comes_from_the_creating_auth_context() {
        let mut run: RunRow = serde_json::from_value(json!({
            "runId": "r", "parentRunId": null, "workflowName": "w", "workflowPath": null,
            "workflowHash": null, "status": "running", "createdAtMs": 0, "startedAtMs": null,
            "finishedAtMs": null, "heartbeatAtMs": null, "runtimeOwnerId": null,
            "cancelRequestedAtMs": null, "hijackRequestedAtMs": null, "hijackTarget": null,
            "vcsType": null, "vcsRoot": null, "vcsRevision": null, "errorJson": null,
            "configJson": "{\"auth\":{\"triggeredBy\":\"alice\"}}"
        }))
        .unwrap();
        assert_eq!(owner_of(&run).as_deref(), Some("alice"));
        run.config_json = Some("not json".into());
        assert_eq!(owner_of(&run), None);
    }
}
