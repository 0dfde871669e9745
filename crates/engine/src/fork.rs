//! Forking: a new run that starts from the state another run had at one of its frames. The
//! original run and its history are left untouched.

use crate::frames::snapshot;
use crate::{Engine, RunHandle, events, now_ms};
use serde_json::{Value, json};
use smithers_core::{Code, Result, SmithersError, Workflow, bounds};
use smithers_store::{Batch, LoopRow, NodeRow, OutputRow, RunRow, Write, node_state, status};
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
        let rows = store
            .snapshots_between(
                run_id,
                (frame_no - crate::frames::KEYFRAME_INTERVAL).max(0),
                frame_no,
            )
            .await?;
        let snap = snapshot::inflate(&rows).map_err(|why| {
            SmithersError::new(
                Code::DbCorrupt,
                format!(
                    "the snapshot of run `{run_id}` at frame {frame_no} cannot be rebuilt ({why})"
                ),
            )
        })?;
        let input = match input {
            Some(i) => i,
            None => snap.input.clone(),
        };
        bounds::check_run_input(&input)?;
        let id = new_run_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        bounds::check_run_id(&id)?;
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
            vcs_type: None,
            vcs_root: None,
            vcs_revision: None,
            error_json: None,
            config_json: Some(config.to_string()),
        }));
        batch.push(Write::InsertInput {
            run_id: id.clone(),
            payload_json: input.to_string(),
        });
        for (key, node) in &snap.nodes {
            let st = node.get("state").and_then(Value::as_str).unwrap_or("");
            let keep = st == node_state::SKIPPED
                || (st == node_state::FINISHED && snap.outputs.contains_key(key));
            if !keep {
                continue;
            }
            let node_id = node
                .get("nodeId")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let iteration = node.get("iteration").and_then(Value::as_i64).unwrap_or(0);
            let table = node
                .get("outputTable")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            batch.push(Write::UpsertNode(NodeRow {
                run_id: id.clone(),
                node_id: node_id.clone(),
                iteration,
                state: st.to_string(),
                last_attempt: None,
                updated_at_ms: now,
                output_table: table.clone(),
                label: node
                    .get("label")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            }));
            if let Some(out) = snap.outputs.get(key) {
                batch.push(Write::UpsertOutput(OutputRow {
                    run_id: id.clone(),
                    node_id,
                    iteration,
                    output_table: table,
                    payload_json: out.to_string(),
                    created_at_ms: now,
                }));
            }
        }
        for (loop_id, l) in &snap.ralph {
            batch.push(Write::UpsertLoop(LoopRow {
                run_id: id.clone(),
                ralph_id: loop_id.clone(),
                iteration: l.get("iteration").and_then(Value::as_i64).unwrap_or(0),
                done: l.get("done").and_then(Value::as_bool).unwrap_or(false),
                updated_at_ms: now,
            }));
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
        Ok(self.spawn_driver(workflow, id, input, true, 0))
    }
}
