//! Rewind: puts a run back to the state it had at one of its frames. Frames, attempts and
//! decisions after that frame are removed and the run's nodes, outputs and loops are restored
//! from the frame's snapshot, all in one transaction; the run is then ready to resume.

use crate::frames::snapshot;
use crate::{Engine, events, now_ms, owner};
use serde_json::json;
use smithers_core::{Code, Result, SmithersError};
use smithers_store::{AuditRow, Batch, RunPatch, Write, audit_result, node_state, status};
use std::sync::Arc;
use std::time::Duration;

/// What a rewind did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewound {
    pub from_frame_no: i64,
    pub to_frame_no: i64,
    pub deleted_frames: i64,
    pub deleted_attempts: i64,
    /// Cached node diffs of the removed attempts.
    pub invalidated_diffs: i64,
    /// False when the run already was at that frame (nothing changed).
    pub changed: bool,
}

impl Engine {
    /// Rewinds `run_id` to `frame_no`. A run driven by this engine is stopped first; a run
    /// driven by another live engine is refused (`RUN_STILL_RUNNING`).
    pub async fn rewind(&self, run_id: &str, frame_no: i64, caller: &str) -> Result<Rewound> {
        self.rewind_with(run_id, frame_no, caller, |_| Vec::new())
            .await
    }

    /// [`Engine::rewind`], committing `extra(&outcome)` (e.g. the audit row's final state) in
    /// the same transaction as the rewind itself, so the two cannot disagree after a crash.
    pub async fn rewind_with(
        &self,
        run_id: &str,
        frame_no: i64,
        caller: &str,
        extra: impl FnOnce(&Rewound) -> Vec<Write>,
    ) -> Result<Rewound> {
        let store = self.store().clone();
        let run = store.get_run(run_id).await?.ok_or_else(|| {
            SmithersError::new(Code::RunNotFound, format!("run `{run_id}` not found"))
        })?;
        let latest = store.last_frame_no(run_id).await?;
        if latest == 0 {
            return Err(SmithersError::new(
                Code::InvalidInput,
                format!("run `{run_id}` has no frames to rewind to"),
            ));
        }
        if frame_no < 1 || frame_no > latest {
            return Err(SmithersError::new(
                Code::InvalidInput,
                format!("frame must be between 1 and {latest} for run `{run_id}` (got {frame_no})"),
            ));
        }
        if frame_no == latest {
            return Ok(Rewound {
                from_frame_no: latest,
                to_frame_no: frame_no,
                deleted_frames: 0,
                deleted_attempts: 0,
                invalidated_diffs: 0,
                changed: false,
            });
        }
        if self.is_active(run_id) {
            self.sh.cancel_local(run_id);
            let mut waited = 0;
            while self.is_active(run_id) {
                if waited >= 10_000 {
                    return Err(SmithersError::new(
                        Code::RunStillRunning,
                        format!(
                            "run `{run_id}` did not stop within 10 s; refusing to rewind a live task"
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
                waited += 25;
            }
        } else if let Some(o) = &run.runtime_owner_id {
            let fresh = run
                .heartbeat_at_ms
                .is_some_and(|h| now_ms() - h < self.config().lease_timeout_ms);
            if fresh
                && owner::liveness(o) != owner::OwnerLiveness::Dead
                && run.status == status::RUNNING
            {
                return Err(SmithersError::new(
                    Code::RunStillRunning,
                    format!(
                        "run `{run_id}` is being driven by another engine ({o}); cancel it there first"
                    ),
                ));
            }
        }
        let (cutoff, snap, doomed) = doomed_attempts(store.as_ref(), run_id, frame_no).await?;
        let deleted_attempts = doomed.len() as i64;
        let invalidated_diffs = store
            .list_node_diff_attempts(run_id)
            .await?
            .iter()
            .filter(|k| doomed.contains(k))
            .count() as i64;
        let outcome = Rewound {
            from_frame_no: latest,
            to_frame_no: frame_no,
            deleted_frames: latest - frame_no,
            deleted_attempts,
            invalidated_diffs,
            changed: true,
        };
        let now = now_ms();
        let mut b = Batch::new();
        b.push(Write::ClearRunState {
            run_id: run_id.to_string(),
        });
        b.push(Write::DeleteFramesAfter {
            run_id: run_id.to_string(),
            frame_no,
        });
        for (node_id, iteration, attempt) in doomed {
            b.push(Write::DeleteAttempt {
                run_id: run_id.to_string(),
                node_id,
                iteration,
                attempt,
            });
        }
        b.push(Write::DeleteAttemptsAfter {
            run_id: run_id.to_string(),
            started_after_ms: cutoff,
        });
        // finished, skipped and failed steps stay as they were; anything in motion is asked again
        let restore = snapshot::restore_writes(&snap, run_id, now, |st, has_output| {
            Some(match st {
                node_state::FINISHED if has_output => node_state::FINISHED,
                node_state::SKIPPED => node_state::SKIPPED,
                node_state::FAILED => node_state::FAILED,
                _ => node_state::PENDING,
            })
        });
        for w in restore {
            b.push(w);
        }
        b.push(Write::UpdateRun {
            run_id: run_id.to_string(),
            patch: RunPatch {
                status: Some(status::RUNNING.into()),
                finished_at_ms: Some(None),
                heartbeat_at_ms: Some(None),
                runtime_owner_id: Some(None),
                cancel_requested_at_ms: Some(None),
                error_json: Some(None),
                ..Default::default()
            },
        });
        let ev = events::make(
            run_id,
            events::kind::TIME_TRAVEL_JUMPED,
            now,
            json!({"fromFrameNo": latest, "toFrameNo": frame_no, "caller": caller}),
        );
        b.push(Write::AppendEvent {
            run_id: run_id.to_string(),
            timestamp_ms: now,
            event_type: ev.event_type.to_string(),
            payload_json: ev.payload.to_string(),
        });
        for w in extra(&outcome) {
            b.push(w);
        }
        let applied = store.apply(b).await?;
        if let Some(seq) = applied.event_seqs.first() {
            self.sh.publish(&Arc::from(run_id), *seq, ev);
        }
        Ok(outcome)
    }

    /// Writes a time-travel audit row (insert, or update of the same id).
    pub async fn record_audit(&self, row: AuditRow) -> Result<()> {
        let mut b = Batch::new();
        b.push(Write::UpsertAudit(row));
        self.store().apply(b).await.map(|_| ())
    }

    /// Marks a run `needs-attention` after a rewind that changed it but did not finish: it is
    /// neither resumed automatically nor treated as ended, so a person looks at it.
    pub async fn mark_needs_attention(&self, run_id: &str, message: &str) -> Result<()> {
        let now = now_ms();
        let mut b = Batch::new();
        b.push(Write::UpdateRun {
            run_id: run_id.to_string(),
            patch: RunPatch {
                status: Some(status::NEEDS_ATTENTION.into()),
                runtime_owner_id: Some(None),
                error_json: Some(Some(
                    json!({
                        "code": "RewindFailed",
                        "needsAttention": true,
                        "message": message,
                        "timestampMs": now,
                    })
                    .to_string(),
                )),
                ..Default::default()
            },
        });
        self.store().apply(b).await.map(|_| ())
    }

    /// At startup: audit rows left `in_progress` by a crash become `partial`, and their runs
    /// `needs-attention`. Returns the affected run ids.
    pub async fn recover_interrupted_rewinds(&self) -> Result<Vec<String>> {
        let open = self
            .store()
            .list_audits(None, Some(audit_result::IN_PROGRESS))
            .await?;
        let mut runs = Vec::new();
        for mut a in open {
            a.result = audit_result::PARTIAL.into();
            a.duration_ms = (now_ms() - a.timestamp_ms).max(0);
            let run_id = a.run_id.clone();
            self.record_audit(a).await?;
            if self.store().get_run(&run_id).await?.is_some() {
                self.mark_needs_attention(&run_id, "Rewind was in_progress at startup.")
                    .await?;
                runs.push(run_id);
            }
        }
        Ok(runs)
    }
}

/// What rewinding to a frame would delete: the frames after it and these attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewindPreview {
    pub latest_frame_no: i64,
    /// `(node id, iteration, attempt)`, in start order.
    pub attempts: Vec<(String, i64, i64)>,
}

impl Engine {
    /// What [`Engine::rewind`] to `frame_no` would delete, by the same rule, without changing
    /// anything (so a confirmation can say it exactly).
    pub async fn rewind_preview(&self, run_id: &str, frame_no: i64) -> Result<RewindPreview> {
        let store = self.store().clone();
        let latest = store.last_frame_no(run_id).await?;
        if frame_no < 1 || frame_no > latest {
            return Err(SmithersError::new(
                Code::InvalidInput,
                format!("frame must be between 1 and {latest} for run `{run_id}` (got {frame_no})"),
            ));
        }
        let attempts = if frame_no == latest {
            Vec::new()
        } else {
            doomed_attempts(store.as_ref(), run_id, frame_no).await?.2
        };
        Ok(RewindPreview {
            latest_frame_no: latest,
            attempts,
        })
    }
}

/// The frame's time, its snapshot, and the attempts that belong to its future.
async fn doomed_attempts(
    store: &dyn smithers_store::Store,
    run_id: &str,
    frame_no: i64,
) -> Result<(i64, snapshot::FullSnapshot, Vec<(String, i64, i64)>)> {
    let frame = store.get_frame(run_id, frame_no).await?.ok_or_else(|| {
        SmithersError::new(
            Code::InvalidInput,
            format!("frame {frame_no} of run `{run_id}` does not exist"),
        )
    })?;
    let snap = snapshot::at_frame(store, run_id, frame_no).await?;
    // the run is stopped, so nothing adds attempts or diffs between these reads and the
    // commit. An attempt belongs to the future when the frame's snapshot does not know it:
    // started after the frame, or in the same millisecond but after the render.
    let cutoff = frame.created_at_ms;
    let known = |node: &str, iteration: i64| {
        snap.nodes
            .get(&format!("{node}::{iteration}"))
            .and_then(|n| n.get("lastAttempt"))
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0)
    };
    let doomed: Vec<(String, i64, i64)> = store
        .list_attempts(run_id)
        .await?
        .into_iter()
        .filter(|a| a.started_at_ms > cutoff || a.attempt > known(&a.node_id, a.iteration))
        .map(|a| (a.node_id, a.iteration, a.attempt))
        .collect();
    Ok((cutoff, snap, doomed))
}
