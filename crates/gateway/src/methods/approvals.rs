//! `approvals.list` and `approvals.decide`: pending human decisions across runs, and deciding
//! one (with the approval's own `allowedUsers` / `allowedScopes` checked against the caller).

use super::Call;
use super::params::ensure_run;
use crate::error::RpcError;
use crate::gateway::Gateway;
use crate::shapes;
use serde_json::{Value, json};
use smithers_engine::ops;

pub async fn list(c: &Call<'_>) -> Result<Value, RpcError> {
    pending(c.gw).await
}

/// Every pending approval, oldest first (also the hello snapshot's `approvals`).
pub async fn pending(gw: &Gateway) -> Result<Value, RpcError> {
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

pub async fn decide(c: &Call<'_>) -> Result<Value, RpcError> {
    let (gw, caller, p) = (c.gw, c.caller, &c.params);
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
    super::params::check_run_id("runId", id)?;
    ensure_run(gw, id).await?;
    let row = gw.store.get_approval(id, node, iteration).await?;
    let request: Value = row
        .as_ref()
        .and_then(|r| r.request_json.as_deref())
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(json!({}));
    let strings = |k: &str| crate::shapes::string_list(&request, k);
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
