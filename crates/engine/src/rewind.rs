//! Rewind: puts a run back to the state it had at one of its frames. Frames, attempts and
//! decisions after that frame are removed and the run's nodes, outputs and loops are restored
//! from the frame's snapshot, all in one transaction; the run is then ready to resume.

use crate::frames::snapshot;
use crate::{Engine, events, now_ms, owner};
use serde_json::json;
use smithers_core::{Code, Result, SmithersError};
use smithers_store::{Batch, RunPatch, Write, node_state, status};
use std::sync::Arc;
use std::time::Duration;

/// What a rewind did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewound {
    pub from_frame_no: i64,
    pub to_frame_no: i64,
    pub deleted_frames: i64,
    /// False when the run already was at that frame (nothing changed).
    pub changed: bool,
}

impl Engine {
    /// Rewinds `run_id` to `frame_no`. A run driven by this engine is stopped first; a run
    /// driven by another live engine is refused (`RUN_STILL_RUNNING`).
    pub async fn rewind(&self, run_id: &str, frame_no: i64, caller: &str) -> Result<Rewound> {
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
        let frame = store.get_frame(run_id, frame_no).await?.ok_or_else(|| {
            SmithersError::new(
                Code::InvalidInput,
                format!("frame {frame_no} of run `{run_id}` does not exist"),
            )
        })?;
        let snap = snapshot::at_frame(store.as_ref(), run_id, frame_no).await?;
        let now = now_ms();
        let mut b = Batch::new();
        b.push(Write::ClearRunState {
            run_id: run_id.to_string(),
        });
        b.push(Write::DeleteFramesAfter {
            run_id: run_id.to_string(),
            frame_no,
        });
        b.push(Write::DeleteAttemptsAfter {
            run_id: run_id.to_string(),
            started_after_ms: frame.created_at_ms,
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
        let applied = store.apply(b).await?;
        if let Some(seq) = applied.event_seqs.first() {
            self.sh.publish(&Arc::from(run_id), *seq, ev);
        }
        Ok(Rewound {
            from_frame_no: latest,
            to_frame_no: frame_no,
            deleted_frames: latest - frame_no,
            changed: true,
        })
    }
}
