//! Wire shapes built from store rows: run rows with `workflowKey`, `summary` and `runState`,
//! pending approvals, frames.

use serde_json::{Map, Value, json};
use smithers_store::{ApprovalRow, NodeRow, RunRow, status};

/// Milliseconds to an ISO-8601 UTC timestamp.
pub fn iso(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The gateway key a run belongs to: the key it was created under, else the registered key
/// whose workflow has the run's name.
pub fn workflow_key(run: &RunRow, key_for_name: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    run.config_json
        .as_deref()
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .and_then(|c| {
            c.get("gatewayWorkflowKey")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .or_else(|| key_for_name(&run.workflow_name))
}

/// A run row as JSON (camelCase) plus `workflowKey`.
pub fn run_json(run: &RunRow, key: Option<String>) -> Value {
    let mut v = serde_json::to_value(run).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert(
            "workflowKey".into(),
            key.map(Value::String).unwrap_or(Value::Null),
        );
    }
    v
}

/// A finished run's output as `smithers up` prints it: `{nodeId: output of its latest
/// iteration}`.
pub fn latest_outputs(rows: &[smithers_store::OutputRow]) -> Value {
    let mut latest: std::collections::BTreeMap<&str, &smithers_store::OutputRow> =
        std::collections::BTreeMap::new();
    for r in rows {
        let slot = latest.entry(r.node_id.as_str()).or_insert(r);
        if r.iteration > slot.iteration {
            *slot = r;
        }
    }
    Value::Object(
        latest
            .into_iter()
            .map(|(k, r)| {
                let v = serde_json::from_str(&r.payload_json).unwrap_or(Value::Null);
                (k.to_string(), v)
            })
            .collect(),
    )
}

/// `{<node state>: count}`.
pub fn summary(nodes: &[NodeRow]) -> Value {
    let mut m = Map::new();
    for n in nodes {
        let c = m.get(&n.state).and_then(Value::as_u64).unwrap_or(0);
        m.insert(n.state.clone(), json!(c + 1));
    }
    Value::Object(m)
}

/// The derived run state (gateway-protocol §1.11 RunStateView).
pub fn run_state(
    run: &RunRow,
    nodes: &[NodeRow],
    approvals: &[ApprovalRow],
    timer_due: Option<(String, i64)>,
    wait_key: Option<String>,
    now_ms: i64,
) -> Value {
    let mut v = json!({"runId": run.run_id, "computedAt": iso(now_ms)});
    let state = match run.status.as_str() {
        status::FINISHED | status::CONTINUED => "succeeded",
        status::FAILED => "failed",
        status::CANCELLED => "cancelled",
        status::NEEDS_ATTENTION => "needs-attention",
        status::WAITING_APPROVAL => {
            if let Some(a) = approvals
                .iter()
                .filter(|a| a.status == "requested" && a.requested_at_ms.is_some())
                .min_by_key(|a| a.requested_at_ms)
            {
                v["blocked"] = json!({"kind": "approval", "nodeId": a.node_id, "requestedAt": iso(a.requested_at_ms.unwrap_or(0))});
            }
            "waiting-approval"
        }
        status::WAITING_TIMER => {
            if let Some((node, at)) = timer_due {
                v["blocked"] = json!({"kind": "timer", "nodeId": node, "wakeAt": iso(at)});
            }
            "waiting-timer"
        }
        status::WAITING_EVENT => {
            if let Some(n) = nodes.iter().find(|n| n.state == "waiting-event") {
                // a string, as upstream: the correlation id, else the event name
                let key = wait_key.unwrap_or_default();
                v["blocked"] = json!({"kind": "event", "nodeId": n.node_id, "correlationKey": key});
            }
            "waiting-event"
        }
        status::RUNNING => {
            let last = run
                .heartbeat_at_ms
                .unwrap_or(0)
                .max(run.started_at_ms.unwrap_or(0));
            if last == 0 {
                "unknown"
            } else if now_ms - last <= 30_000 {
                "running"
            } else {
                v["unhealthy"] =
                    json!({"kind": "engine-heartbeat-stale", "lastHeartbeatAt": iso(last)});
                if run.runtime_owner_id.is_some() {
                    "stale"
                } else {
                    "orphaned"
                }
            }
        }
        _ => "unknown",
    };
    v["state"] = json!(state);
    v
}

/// A pending approval in the `approvals.list` shape.
pub fn approval_json(a: &ApprovalRow, label: Option<&str>) -> Value {
    let req: Value = a
        .request_json
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(json!({}));
    let mode = req.get("mode").and_then(Value::as_str).unwrap_or("gate");
    let options: Vec<Value> = req
        .get("options")
        .and_then(Value::as_array)
        .map(|opts| {
            opts.iter()
                .filter_map(|o| {
                    let key = o
                        .get("key")
                        .and_then(Value::as_str)
                        .filter(|k| !k.is_empty())?;
                    let label = o
                        .get("label")
                        .and_then(Value::as_str)
                        .filter(|l| !l.is_empty())?;
                    let mut m = json!({"key": key, "label": label});
                    if let Some(s) = o.get("summary").and_then(Value::as_str) {
                        m["summary"] = json!(s);
                    }
                    Some(m)
                })
                .collect()
        })
        .unwrap_or_default();
    let strings = |k: &str| string_list(&req, k);
    json!({
        "runId": a.run_id,
        "nodeId": a.node_id,
        "iteration": a.iteration,
        "requestTitle": req.get("title").and_then(Value::as_str).or(label).unwrap_or(&a.node_id),
        "requestSummary": req.get("summary").cloned().filter(|s| !s.is_null()),
        "requestedAtMs": a.requested_at_ms,
        "approvalMode": mode,
        "options": options,
        "allowedScopes": strings("allowedScopes"),
        "allowedUsers": strings("allowedUsers"),
        "autoApprove": req.get("autoApprove").cloned().filter(Value::is_object),
    })
}

/// The strings of an array field (`allowedUsers`, `allowedScopes`); anything else is skipped.
pub fn string_list(obj: &Value, key: &str) -> Vec<String> {
    obj.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A served workflow as `workflows.list` describes it.
pub fn workflow_json(key: &str, wf: &dyn smithers_core::Workflow, schedule: Option<&str>) -> Value {
    json!({
        "key": key,
        "name": wf.name(),
        "description": wf.description(),
        "inputSchema": wf.input_schema(),
        "schedule": schedule,
    })
}
