//! Starting and continuing runs on behalf of callers (RPC, cron, webhooks): the gateway's
//! only way into the engine's run lifecycle.

use crate::error::RpcError;
use crate::gateway::{Caller, Gateway};
use serde_json::{Value, json};
use smithers_core::Workflow;
use smithers_engine::StartOptions;
use smithers_store::{RunRow, status};
use std::sync::Arc;

impl Gateway {
    fn remember_key(&self, run_id: &str, key: &str) {
        if let Ok(mut m) = self.run_keys.lock() {
            m.insert(run_id.to_string(), key.to_string());
        }
    }

    /// The registered key a stored run belongs to.
    pub fn key_of(&self, run: &RunRow) -> Option<String> {
        crate::shapes::workflow_key(run, &|name| {
            self.workflows
                .values()
                .find(|w| w.workflow.name() == name)
                .map(|w| w.key.clone())
        })
    }

    /// The workflow a stored run belongs to (for resuming it).
    pub fn workflow_of(&self, run: &RunRow) -> Option<Arc<dyn Workflow>> {
        let key = self.key_of(run)?;
        self.workflows.get(&key).map(|w| w.workflow.clone())
    }

    /// Starts a run of a registered workflow on behalf of a caller.
    pub async fn start_run(
        &self,
        key: &str,
        input: Value,
        run_id: Option<String>,
        caller: &Caller<'_>,
        triggered_by: Option<&str>,
    ) -> Result<String, RpcError> {
        let reg = self
            .workflows
            .get(key)
            .ok_or_else(|| RpcError::new("NOT_FOUND", format!("Unknown workflow: {key}")))?;
        let triggered = triggered_by
            .map(str::to_string)
            .or_else(|| caller.grant.user_id.clone())
            .unwrap_or_else(|| "gateway".into());
        let config = json!({
            "auth": {
                "triggeredBy": triggered,
                "scopes": caller.grant.scopes,
                "role": caller.grant.role,
                "createdAt": crate::shapes::iso(smithers_engine::now_ms()),
            },
            "gatewayWorkflowKey": key,
            "gatewayTriggeredBy": triggered,
        });
        // subscribe before the run starts, so its first events reach this connection too
        let run_id = run_id.unwrap_or_else(smithers_engine::new_run_id);
        caller.follow(&run_id);
        self.remember_key(&run_id, key);
        let handle = self
            .engine
            .start(
                reg.workflow.clone(),
                input,
                StartOptions {
                    run_id: Some(run_id.clone()),
                    parent_run_id: None,
                    config: Some(config),
                },
            )
            .await?;
        let source = source_of(&triggered);
        self.metrics.inc(
            "smithers_gateway_runs_started_total",
            &[("resume", "false"), ("source", source), ("workflow", key)],
        );
        // the driver runs on; completion is broadcast from its RunFinished/RunFailed event
        drop(handle);
        Ok(run_id)
    }

    /// Bookkeeping after a caller resumed a run explicitly (`runs.resume`).
    pub fn note_resumed(&self, run_id: &str, key: &str, caller: &Caller<'_>) {
        self.remember_key(run_id, key);
        let who = caller.grant.user_id.as_deref().unwrap_or("gateway");
        self.count_resume(key, source_of(who));
    }

    fn count_resume(&self, key: &str, source: &str) {
        self.metrics.inc(
            "smithers_gateway_runs_started_total",
            &[("resume", "true"), ("source", source), ("workflow", key)],
        );
    }

    /// After a decision or a signal: wake the run if it is driven here, else resume it unless it
    /// has ended (gateway-protocol §4 resume rule). A run of a workflow not served here is left
    /// parked (the caller's change is committed already, so that is not an error).
    pub async fn continue_run(
        &self,
        run_id: &str,
        caller: Option<&Caller<'_>>,
    ) -> Result<(), RpcError> {
        if let Some(c) = caller {
            c.follow(run_id);
        }
        for _ in 0..20 {
            if self.engine.wake(run_id) {
                return Ok(());
            }
            let Some(row) = self.store.get_run(run_id).await? else {
                return Ok(());
            };
            if status::is_ended(&row.status) {
                return Ok(());
            }
            let Some(wf) = self.workflow_of(&row) else {
                // the decision or signal is committed; whoever serves this workflow (another
                // node, or `smithers resume` with its file) continues the run
                tracing::warn!(
                    run_id,
                    workflow = %row.workflow_name,
                    "recorded for a run of a workflow this gateway does not serve; it continues when a node serving it (or `smithers resume`) resumes it"
                );
                return Ok(());
            };
            match self.engine.resume(wf, run_id, false).await {
                Ok(h) => {
                    let key = self.key_of(&row).unwrap_or_default();
                    self.remember_key(run_id, &key);
                    self.count_resume(&key, "gateway");
                    drop(h);
                    return Ok(());
                }
                Err(e) if e.code == smithers_core::Code::RunStillRunning => {
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// `source` label of runs_started_total from the `triggeredBy` value.
pub fn source_of(triggered_by: &str) -> &'static str {
    if triggered_by.starts_with("cron:") {
        "cron"
    } else if triggered_by.starts_with("webhook:") {
        "webhook"
    } else if triggered_by == "gateway" {
        "gateway"
    } else {
        "user"
    }
}
