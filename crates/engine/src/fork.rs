//! Forking: a new run that starts from the state another run had at one of its frames. The
//! original run and its history are left untouched.

use crate::frames::snapshot;
use crate::{Engine, RunHandle, events, now_ms};
use serde_json::{Value, json};
use smithers_core::{Code, Result, SmithersError, Workflow, bounds};
use smithers_store::{Batch, RunRow, Write, node_state, status};
use std::sync::Arc;

impl Engine {
    /// Starts a new run from the state of `run_id` at `frame_no`: finished and skipped steps
    /// keep their outputs and are not run again; everything after runs anew. `input` replaces
    /// the original input when given.
    pub async fn fork(
        &self,
        workflow: Arc<dyn Workflow>,
        run_id: &str,
        frame_no: i64,
        input: Option<Value>,
        new_run_id: Option<String>,
    ) -> Result<RunHandle> {
        let store = self.store().clone();
        let parent = store.get_run(run_id).await?.ok_or_else(|| {
            SmithersError::new(Code::RunNotFound, format!("run `{run_id}` not found"))
        })?;
        let last = store.last_frame_no(run_id).await?;
        if frame_no < 1 || frame_no > last {
            return Err(SmithersError::new(
                Code::InvalidInput,
                format!("run `{run_id}` has frames 1 to {last}; frame {frame_no} cannot be forked"),
            ));
        }
        let snap = snapshot::at_frame(store.as_ref(), run_id, frame_no).await?;
        let input = match input {
            Some(i) => i,
            None => snap.input.clone(),
        };
        bounds::check_run_input(&input)?;
        let id = new_run_id.unwrap_or_else(crate::new_run_id);
        bounds::check_run_id(&id)?;
        let reservation = self.sh.reserve(&id).ok_or_else(|| {
            SmithersError::new(
                Code::RunExists,
                format!("run `{id}` is already being started or driven by this engine"),
            )
        })?;
        let vcs = self.run_vcs(&*workflow).await;
        let now = now_ms();
        let config = json!({"fork": {"parentRunId": run_id, "frameNo": frame_no}});
        let mut batch = Batch::new();
        batch.push(Write::InsertRun(RunRow {
            run_id: id.clone(),
            parent_run_id: Some(run_id.to_string()),
            workflow_name: parent.workflow_name.clone(),
            workflow_path: workflow.path().map(|p| p.display().to_string()),
            workflow_hash: workflow.source_hash().map(str::to_string),
            status: status::RUNNING.into(),
            created_at_ms: now,
            started_at_ms: Some(now),
            finished_at_ms: None,
            heartbeat_at_ms: Some(now),
            runtime_owner_id: Some(self.owner_id().to_string()),
            cancel_requested_at_ms: None,
            hijack_requested_at_ms: None,
            hijack_target: None,
            vcs_type: vcs.as_ref().map(|_| crate::vcs::GIT.to_string()),
            vcs_root: vcs.as_ref().map(|v| v.root.clone()),
            vcs_revision: vcs.and_then(|v| v.revision),
            error_json: None,
            config_json: Some(config.to_string()),
        }));
        batch.push(Write::InsertInput {
            run_id: id.clone(),
            payload_json: input.to_string(),
        });
        // a fork keeps what had finished (or been skipped) by then; the rest runs anew
        let restore = snapshot::restore_writes(&snap, &id, now, |st, has_output| match st {
            node_state::SKIPPED => Some(node_state::SKIPPED),
            node_state::FINISHED if has_output => Some(node_state::FINISHED),
            _ => None,
        });
        for w in restore {
            batch.push(w);
        }
        let ev = events::make(
            &id,
            events::kind::RUN_FORKED,
            now,
            json!({"parentRunId": run_id, "parentFrameNo": frame_no}),
        );
        batch.push(Write::AppendEvent {
            run_id: id.clone(),
            timestamp_ms: now,
            event_type: ev.event_type.to_string(),
            payload_json: ev.payload.to_string(),
        });
        let applied = store.apply(batch).await?;
        if let Some(seq) = applied.event_seqs.first() {
            self.sh.publish(&Arc::from(id.as_str()), *seq, ev);
        }
        tracing::info!(run_id = %id, workflow = %workflow.name(), "run forked");
        Ok(self.spawn_driver(reservation, workflow, input, true, 0, now))
    }
}
