//! Acting on a verified webhook delivery: signal the runs waiting for it, or start a run.

use super::paths::{read_path_value, run_input, scalar_id};
use crate::auth::Grant;
use crate::error::RpcError;
use crate::gateway::{Caller, Gateway};
use serde_json::{Value, json};
use smithers_engine::ops;
use smithers_store::status;
use std::sync::Arc;

/// Acts on a verified delivery (gateway-protocol §3 steps 8–12): delivers the configured
/// signal to every run waiting for it, or else starts a run; returns the success body.
pub(super) async fn deliver(
    gw: &Arc<Gateway>,
    key: &str,
    payload: &Value,
) -> Result<Value, RpcError> {
    let Some(cfg) = gw.workflows.get(key).and_then(|r| r.webhook.as_ref()) else {
        return Err(RpcError::new(
            "NOT_FOUND",
            format!("Webhook not configured for workflow: {key}"),
        ));
    };
    let system = Grant {
        role: "system".into(),
        scopes: vec!["*".into()],
        user_id: Some(format!("webhook:{key}")),
    };
    let caller = Caller {
        grant: &system,
        conn: None,
        answering: None,
    };
    let mut delivered = Vec::new();
    let mut matched = Vec::new();
    if let Some(sig) = &cfg.signal {
        let explicit = scalar_id(read_path_value(payload, sig.run_id_path.as_deref()));
        let correlation = scalar_id(read_path_value(payload, sig.correlation_id_path.as_deref()));
        let data = read_path_value(payload, sig.payload_path.as_deref())
            .cloned()
            .unwrap_or(Value::Null);
        let candidates: Vec<String> = match explicit {
            Some(id) => match gw.store.get_run(&id).await? {
                Some(r) if !status::is_ended(&r.status) => vec![id],
                _ => Vec::new(),
            },
            None => {
                let mut ids = Vec::new();
                for st in [status::WAITING_EVENT, status::RUNNING] {
                    for r in gw.store.list_runs(Some(st), 1000).await? {
                        if r.status == st && gw.key_of(&r).as_deref() == Some(key) {
                            ids.push(r.run_id);
                        }
                    }
                }
                ids
            }
        };
        for run_id in candidates {
            if !waits_for(gw, &run_id, &sig.name, correlation.as_deref()).await? {
                continue;
            }
            let d = ops::send_signal(
                gw.store.as_ref(),
                &run_id,
                &sig.name,
                data.clone(),
                correlation.as_deref(),
                Some(&format!("webhook:{key}")),
            )
            .await?;
            matched.push(json!(run_id));
            delivered.push(json!({"runId": d.run_id, "seq": d.seq, "signalName": d.signal_name, "correlationId": d.correlation_id, "receivedAtMs": d.received_at_ms}));
            gw.continue_run(&run_id, None).await?;
        }
    }
    let mut started = Value::Null;
    if delivered.is_empty() && cfg.run_enabled {
        let input = run_input(read_path_value(payload, cfg.input_path.as_deref()));
        let input = crate::bounds::check_run_input(Some(&input))?;
        let run_id = gw
            .start_run(key, input, None, &caller, Some(&format!("webhook:{key}")))
            .await?;
        started = json!({"runId": run_id, "workflow": key});
    }
    Ok(
        json!({"ok": true, "workflow": key, "verified": true, "delivered": delivered, "matchedRunIds": matched, "started": started}),
    )
}

/// Whether a run has a node waiting for this signal name and correlation id.
async fn waits_for(
    gw: &Gateway,
    run_id: &str,
    name: &str,
    correlation: Option<&str>,
) -> Result<bool, RpcError> {
    for a in gw.store.list_attempts(run_id).await? {
        if a.state != "waiting-event" {
            continue;
        }
        let Some(meta) = a
            .meta_json
            .as_deref()
            .and_then(|m| serde_json::from_str::<Value>(m).ok())
        else {
            continue;
        };
        let w = &meta["waitForEvent"];
        let n = w["signalName"].as_str().map(str::trim);
        let c = w["correlationId"]
            .as_str()
            .map(str::trim)
            .filter(|c| !c.is_empty());
        if n == Some(name) && c == correlation {
            return Ok(true);
        }
    }
    Ok(false)
}
