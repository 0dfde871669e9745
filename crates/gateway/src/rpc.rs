//! RPC methods (gateway-protocol §1.10). Every method takes the already authenticated and
//! scope-checked caller and returns a payload or an [`RpcError`].

use crate::bounds;
use crate::error::RpcError;
use crate::gateway::{Caller, Gateway, PROTOCOL};
use crate::shapes;
use serde_json::{Value, json};
use smithers_engine::ops;
use smithers_store::status;
use std::sync::Arc;

/// Transport a call came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Ws,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Ws => "ws",
        }
    }
}

fn obj(params: &Value) -> Value {
    if params.is_object() {
        params.clone()
    } else {
        json!({})
    }
}

fn req_str<'a>(p: &'a Value, key: &str, msg: &str) -> Result<&'a str, RpcError> {
    p.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::new("INVALID_REQUEST", msg))
}

/// The run row, or `NOT_FOUND "Run not found: <id>"`.
async fn ensure_run(gw: &Gateway, id: &str) -> Result<smithers_store::RunRow, RpcError> {
    gw.store.get_run(id).await?.ok_or_else(|| not_found_run(id))
}

fn not_found_run(id: &str) -> RpcError {
    RpcError::new("NOT_FOUND", format!("Run not found: {id}"))
}

/// Non-negative integer parameter (0 allowed; DESIGN §5).
fn non_negative(v: Option<&Value>, field: &str) -> Result<Option<i64>, RpcError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => {
            let n = match x {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match n {
                Some(n)
                    if n.is_finite()
                        && n >= 0.0
                        && n.fract() == 0.0
                        && n <= 9.007_199_254_740_991e15 =>
                {
                    Ok(Some(n as i64))
                }
                Some(n) if n.is_finite() && n >= 0.0 => Err(RpcError::new(
                    "INVALID_INPUT",
                    format!("{field} must be an integer greater than or equal to 0."),
                )),
                _ => Err(RpcError::new(
                    "INVALID_INPUT",
                    format!("{field} must be a finite number greater than or equal to 0."),
                )),
            }
        }
    }
}

/// Dispatches one method call.
pub async fn call(
    gw: &Arc<Gateway>,
    caller: &Caller<'_>,
    transport: Transport,
    method: &str,
    params: &Value,
) -> Result<Value, RpcError> {
    let p = obj(params);
    match method {
        "health" => Ok(json!({
            "protocol": PROTOCOL,
            "features": gw.config.features,
            "stateVersion": gw.state_version(),
            "uptimeMs": gw.uptime_ms(),
        })),
        "runs.list" => runs_list(gw, &p).await,
        "runs.get" => runs_get(gw, &p).await,
        "runs.create" => {
            let key = req_str(&p, "workflow", "workflow is required")?;
            if !gw.workflows.contains_key(key) {
                return Err(RpcError::new(
                    "NOT_FOUND",
                    format!("Unknown workflow: {key}"),
                ));
            }
            let input = bounds::check_run_input(p.get("input"))?;
            let run_id = p.get("runId").and_then(Value::as_str).map(str::to_string);
            let id = gw.start_run(key, input, run_id, caller, None).await?;
            Ok(json!({"runId": id, "workflow": key}))
        }
        "runs.cancel" => {
            let id = req_str(&p, "runId", "runId is required")?;
            if gw.engine.is_active(id) {
                gw.engine.cancel(id).await?;
                return Ok(json!({"runId": id, "status": "cancelling"}));
            }
            let row = ensure_run(gw, id).await?;
            if status::is_ended(&row.status) {
                return Err(RpcError::new(
                    "RUN_NOT_ACTIVE",
                    "Run is not currently active",
                ));
            }
            match gw.engine.cancel(id).await? {
                ops::CancelOutcome::Cancelled => {
                    gw.run_completed(id, "cancelled", None);
                    Ok(json!({"runId": id, "status": "cancelled"}))
                }
                ops::CancelOutcome::Cancelling => Ok(json!({"runId": id, "status": "cancelling"})),
            }
        }
        "runs.rerun" => {
            let id = req_str(&p, "runId", "runId is required")?;
            let row = ensure_run(gw, id).await?;
            let key = gw.key_of(&row).ok_or_else(|| not_found_run(id))?;
            let input = gw
                .store
                .get_input(id)
                .await?
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            let new_id = p
                .get("newRunId")
                .and_then(Value::as_str)
                .map(str::to_string);
            let run = gw.start_run(&key, input, new_id, caller, None).await?;
            Ok(json!({"runId": run, "workflow": key}))
        }
        "frames.list" => {
            let id = req_str(&p, "runId", "runId is required")?;
            ensure_run(gw, id).await?;
            let limit = bounds::positive_int(p.get("limit"), "limit")?
                .unwrap_or(50)
                .min(10_000) as usize;
            let after = non_negative(p.get("afterFrameNo"), "afterFrameNo")?.unwrap_or(0);
            let rows = gw.store.list_frames(id, after, limit).await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                if let Some(f) =
                    smithers_engine::frames::read_frame(gw.store.as_ref(), id, r.frame_no).await?
                {
                    out.push(serde_json::to_value(f).unwrap_or(Value::Null));
                }
            }
            Ok(Value::Array(out))
        }
        "frames.get" => {
            let id = req_str(&p, "runId", "runId is required")?;
            ensure_run(gw, id).await?;
            let no = match non_negative(p.get("frameNo"), "frameNo")? {
                Some(n) => n,
                None => gw.store.last_frame_no(id).await?,
            };
            let f = smithers_engine::frames::read_frame(gw.store.as_ref(), id, no)
                .await?
                .ok_or_else(|| RpcError::new("NOT_FOUND", "Frame not found"))?;
            Ok(serde_json::to_value(f).unwrap_or(Value::Null))
        }
        "attempts.list" => {
            let id = req_str(&p, "runId", "runId is required")?;
            ensure_run(gw, id).await?;
            let rows = match p
                .get("nodeId")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            {
                Some(node) => {
                    let it = p
                        .get("iteration")
                        .and_then(Value::as_f64)
                        .filter(|f| f.is_finite())
                        .unwrap_or(0.0) as i64;
                    gw.store.list_node_attempts(id, node, it).await?
                }
                None => gw.store.list_attempts(id).await?,
            };
            Ok(serde_json::to_value(rows).unwrap_or(Value::Null))
        }
        "attempts.get" => {
            let (Some(id), Some(node), Some(it), Some(at)) = (
                p.get("runId").and_then(Value::as_str),
                p.get("nodeId").and_then(Value::as_str),
                p.get("iteration")
                    .and_then(Value::as_f64)
                    .filter(|f| f.is_finite()),
                p.get("attempt")
                    .and_then(Value::as_f64)
                    .filter(|f| f.is_finite()),
            ) else {
                return Err(RpcError::new(
                    "INVALID_REQUEST",
                    "runId, nodeId, iteration, and attempt are required",
                ));
            };
            ensure_run(gw, id).await?;
            let a = gw
                .store
                .get_attempt(id, node, it as i64, at as i64)
                .await?
                .ok_or_else(|| RpcError::new("NOT_FOUND", "Attempt not found"))?;
            Ok(serde_json::to_value(a).unwrap_or(Value::Null))
        }
        "approvals.list" => approvals_list(gw).await,
        "approvals.decide" => approvals_decide(gw, caller, &p).await,
        "signals.send" => {
            let (Some(id), Some(name)) = (
                p.get("runId").and_then(Value::as_str),
                p.get("signalName").and_then(Value::as_str),
            ) else {
                return Err(RpcError::new(
                    "INVALID_REQUEST",
                    "runId and signalName are required",
                ));
            };
            if name.trim().is_empty() {
                return Err(RpcError::new(
                    "INVALID_INPUT",
                    "Signal name must be a non-empty string.",
                ));
            }
            ensure_run(gw, id).await?;
            let data = p
                .get("data")
                .cloned()
                .filter(|d| !d.is_null())
                .unwrap_or_else(|| json!({}));
            let corr = p.get("correlationId").and_then(Value::as_str);
            let d = ops::send_signal(
                gw.store.as_ref(),
                id,
                name,
                data,
                corr,
                caller.grant.user_id.as_deref(),
            )
            .await?;
            gw.metrics
                .inc("smithers_gateway_signals_total", &[("outcome", "sent")]);
            gw.continue_run(id, Some(caller)).await?;
            Ok(
                json!({"runId": d.run_id, "seq": d.seq, "signalName": d.signal_name, "correlationId": d.correlation_id, "receivedAtMs": d.received_at_ms}),
            )
        }
        "getNodeOutput" | "devtools.getNodeOutput" => crate::node_output::get(gw, &p).await,
        "getNodeDiff" | "devtools.getNodeDiff" => crate::node_diff::get(gw, &p).await,
        "getDevToolsSnapshot" => crate::devtools::snapshot(gw, caller, &p).await,
        "streamDevTools" => crate::stream::start(gw, caller, transport == Transport::Ws, &p).await,
        "jumpToFrame" | "devtools.jumpToFrame" => crate::jump::jump_to_frame(gw, caller, &p).await,
        "runs.fork" => {
            let id = req_str(&p, "runId", "runId is required")?;
            let frame = non_negative(p.get("frameNo"), "frameNo")?
                .ok_or_else(|| RpcError::new("INVALID_REQUEST", "frameNo is required"))?;
            let row = ensure_run(gw, id).await?;
            let key = gw.key_of(&row).ok_or_else(|| not_found_run(id))?;
            let wf = gw.workflow_of(&row).ok_or_else(|| not_found_run(id))?;
            let input = match p.get("input") {
                None | Some(Value::Null) => None,
                some => Some(bounds::check_run_input(some)?),
            };
            let new_id = p
                .get("newRunId")
                .and_then(Value::as_str)
                .map(str::to_string);
            let h = gw.engine.fork(wf, id, frame, input, new_id).await?;
            let run = h.run_id.clone();
            if let Some(c) = caller.conn {
                c.subscribe(&run);
            }
            drop(h);
            Ok(json!({"runId": run, "workflow": key, "parentRunId": id, "frameNo": frame}))
        }
        "runs.diff" => {
            let (Some(l), Some(r)) = (
                p.get("leftRunId").and_then(Value::as_str),
                p.get("rightRunId").and_then(Value::as_str),
            ) else {
                return Err(RpcError::new(
                    "INVALID_REQUEST",
                    "leftRunId and rightRunId are required",
                ));
            };
            if gw.store.get_run(l).await?.is_none() || gw.store.get_run(r).await?.is_none() {
                return Err(RpcError::new("NOT_FOUND", "Both runs must exist"));
            }
            use smithers_engine::frames::snapshot;
            let (Some(a), Some(b)) = (
                snapshot::latest(gw.store.as_ref(), l).await?,
                snapshot::latest(gw.store.as_ref(), r).await?,
            ) else {
                return Err(RpcError::new(
                    "NOT_FOUND",
                    "Snapshots not found for both runs",
                ));
            };
            Ok(snapshot::diff(&a, &b))
        }
        "cron.list" => {
            let rows = gw.store.list_crons().await?;
            Ok(Value::Array(
                rows.iter().map(crate::cron::cron_json).collect(),
            ))
        }
        "cron.add" => {
            let (Some(key), Some(pattern)) = (
                p.get("workflow").and_then(Value::as_str),
                p.get("pattern").and_then(Value::as_str),
            ) else {
                return Err(RpcError::new(
                    "INVALID_REQUEST",
                    "workflow and pattern are required",
                ));
            };
            if !gw.workflows.contains_key(key) {
                return Err(RpcError::new(
                    "NOT_FOUND",
                    format!("Unknown workflow: {key}"),
                ));
            }
            let id = p
                .get("cronId")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let enabled = p.get("enabled").and_then(Value::as_bool).unwrap_or(true);
            let row = crate::cron::new_row(&id, key, pattern, enabled, smithers_engine::now_ms())
                .map_err(|e| RpcError::new("INVALID_INPUT", e))?;
            gw.store.upsert_cron(row).await?;
            let stored = gw.store.get_cron(&id).await?.ok_or_else(|| {
                RpcError::new("SERVER_ERROR", "cron vanished after it was written")
            })?;
            Ok(crate::cron::cron_json(&stored))
        }
        "cron.remove" => {
            let id = req_str(&p, "cronId", "cronId is required")?;
            if !gw.store.delete_cron(id).await? {
                return Err(RpcError::new("NOT_FOUND", format!("Cron not found: {id}")));
            }
            Ok(json!({"cronId": id, "removed": true}))
        }
        "cron.trigger" => {
            let cron = match p.get("cronId").and_then(Value::as_str) {
                Some(id) => gw.store.get_cron(id).await?,
                None => None,
            };
            let key = match (&cron, p.get("workflow").and_then(Value::as_str)) {
                (Some(c), _) => crate::cron::workflow_key(&c.workflow_path).map(str::to_string),
                (None, Some(k)) => Some(k.to_string()),
                (None, None) => None,
            }
            .ok_or_else(|| RpcError::new("INVALID_REQUEST", "cronId or workflow is required"))?;
            if !gw.workflows.contains_key(&key) {
                return Err(RpcError::new(
                    "NOT_FOUND",
                    format!("Unknown workflow: {key}"),
                ));
            }
            if let Some(c) = &cron {
                let now = smithers_engine::now_ms();
                let next = crate::cron::next_after(&c.pattern, now).ok();
                gw.store
                    .update_cron_run(&c.cron_id, Some(now), next, None)
                    .await?;
            }
            let input = bounds::check_run_input(p.get("input"))?;
            let run = gw.start_run(&key, input, None, caller, None).await?;
            gw.metrics.inc(
                "smithers_gateway_cron_triggers_total",
                &[("source", "manual")],
            );
            Ok(json!({"runId": run, "workflow": key}))
        }
        _ => {
            let _ = transport;
            Err(RpcError::new(
                "METHOD_NOT_FOUND",
                format!("Unknown method: {method}"),
            ))
        }
    }
}

async fn runs_list(gw: &Arc<Gateway>, p: &Value) -> Result<Value, RpcError> {
    let limit = bounds::positive_int(p.get("limit"), "limit")?
        .unwrap_or(50)
        .min(10_000) as usize;
    let st = p.get("status").and_then(Value::as_str);
    let rows = gw.store.list_runs(st, limit).await?;
    Ok(Value::Array(
        rows.iter()
            .map(|r| shapes::run_json(r, gw.key_of(r)))
            .collect(),
    ))
}

async fn runs_get(gw: &Arc<Gateway>, p: &Value) -> Result<Value, RpcError> {
    let id = req_str(p, "runId", "runId is required")?;
    let row = ensure_run(gw, id).await?;
    let nodes = gw.store.list_nodes(id).await?;
    let approvals = gw.store.list_approvals(id).await?;
    let timer = if row.status == status::WAITING_TIMER {
        next_timer(gw, id).await?
    } else {
        None
    };
    let mut v = shapes::run_json(&row, gw.key_of(&row));
    v["summary"] = shapes::summary(&nodes);
    v["runState"] = shapes::run_state(&row, &nodes, &approvals, timer, smithers_engine::now_ms());
    Ok(v)
}

/// The earliest waiting timer of a run: (node, fires at).
pub async fn next_timer(gw: &Gateway, run_id: &str) -> Result<Option<(String, i64)>, RpcError> {
    let mut best: Option<(String, i64)> = None;
    for a in gw.store.list_attempts(run_id).await? {
        if a.state != "waiting-timer" {
            continue;
        }
        let at = a
            .meta_json
            .as_deref()
            .and_then(|m| serde_json::from_str::<Value>(m).ok())
            .and_then(|m| m.pointer("/timer/firesAtMs").and_then(Value::as_i64));
        if let Some(at) = at
            && best.as_ref().is_none_or(|(_, b)| at < *b)
        {
            best = Some((a.node_id.clone(), at));
        }
    }
    Ok(best)
}

async fn approvals_list(gw: &Arc<Gateway>) -> Result<Value, RpcError> {
    let rows = gw
        .store
        .list_pending_approvals(1000 * gw.workflows.len().max(1))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for a in &rows {
        let label = gw
            .store
            .get_node(&a.run_id, &a.node_id, a.iteration)
            .await?
            .and_then(|n| n.label);
        out.push(shapes::approval_json(a, label.as_deref()));
    }
    out.sort_by_key(|a| a.get("requestedAtMs").and_then(Value::as_i64).unwrap_or(0));
    Ok(Value::Array(out))
}

async fn approvals_decide(
    gw: &Arc<Gateway>,
    caller: &Caller<'_>,
    p: &Value,
) -> Result<Value, RpcError> {
    let (Some(id), Some(node), Some(approved)) = (
        p.get("runId").and_then(Value::as_str),
        p.get("nodeId").and_then(Value::as_str),
        p.get("approved").and_then(Value::as_bool),
    ) else {
        return Err(RpcError::new(
            "INVALID_REQUEST",
            "runId, nodeId, and approved are required",
        ));
    };
    let iteration = p
        .get("iteration")
        .and_then(Value::as_f64)
        .filter(|f| f.is_finite())
        .unwrap_or(0.0) as i64;
    let note = p.get("note").and_then(Value::as_str).map(str::to_string);
    let decision = p.get("decision").cloned().filter(|d| !d.is_null());
    ensure_run(gw, id).await?;
    let row = gw.store.get_approval(id, node, iteration).await?;
    let request: Value = row
        .as_ref()
        .and_then(|r| r.request_json.as_deref())
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(json!({}));
    let strings = |k: &str| -> Vec<String> {
        request
            .get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let users = strings("allowedUsers");
    if !users.is_empty()
        && !caller
            .grant
            .user_id
            .as_ref()
            .is_some_and(|u| users.contains(u))
    {
        return Err(RpcError::new(
            "FORBIDDEN",
            "User is not allowed to decide this approval",
        ));
    }
    let scopes = strings("allowedScopes");
    if !crate::auth::approval_scope_allows(&caller.grant.scopes, &scopes) {
        return Err(RpcError::new(
            "FORBIDDEN",
            "Connection is missing required approval scope",
        ));
    }
    if approved && let Err(p) = ops::check_decision(&request, decision.as_ref()) {
        let message = match p {
            ops::DecisionProblem::SelectionMissing { .. } => {
                "select approvals require decision.selected".to_string()
            }
            ops::DecisionProblem::UnknownSelection { selected, .. } => {
                format!("Unknown selection: {selected}")
            }
            ops::DecisionProblem::RankMissing { .. } => {
                "rank approvals require decision.ranked".to_string()
            }
            ops::DecisionProblem::UnknownRanked { .. } => {
                "rank approval included unknown options".to_string()
            }
        };
        return Err(RpcError::new("INVALID_REQUEST", message));
    }
    ops::decide(
        gw.store.as_ref(),
        id,
        node,
        iteration,
        ops::Decision {
            approved,
            note,
            decided_by: caller.grant.user_id.clone(),
            decision,
        },
    )
    .await?;
    gw.metrics.inc(
        "smithers_gateway_approval_decisions_total",
        &[("outcome", if approved { "approved" } else { "denied" })],
    );
    gw.broadcast(
        "approval.decided",
        json!({"runId": id, "nodeId": node, "iteration": iteration, "approved": approved}),
    );
    gw.continue_run(id, Some(caller)).await?;
    Ok(json!({"runId": id, "nodeId": node, "iteration": iteration, "approved": approved}))
}
