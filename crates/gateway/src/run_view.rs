//! A run as clients see it, read from the store: its `runState` (gateway-protocol §1.11),
//! which needs the run's nodes, approvals and earliest due timer.

use crate::error::RpcError;
use crate::gateway::Gateway;
use serde_json::Value;
use smithers_store::{NodeRow, RunRow, status};

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

/// The `correlationKey` of a run's first waiting `wait_for_event` node (the one `runState`
/// reports): its correlation id, or the event name when the wait has none, from the waiting
/// attempt's metadata.
pub async fn wait_key(
    gw: &Gateway,
    run_id: &str,
    nodes: &[NodeRow],
) -> Result<Option<String>, RpcError> {
    let Some(n) = nodes.iter().find(|n| n.state == "waiting-event") else {
        return Ok(None);
    };
    let attempts = gw
        .store
        .list_node_attempts(run_id, &n.node_id, n.iteration)
        .await?;
    let meta = attempts
        .iter()
        .find_map(|a| a.meta_json.as_deref())
        .and_then(|m| serde_json::from_str::<Value>(m).ok());
    let wait = meta.as_ref().and_then(|m| m.get("waitForEvent"));
    let field = |k: &str| {
        wait.and_then(|w| w.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    Ok(field("correlationId").or_else(|| field("signalName")))
}

/// The `runState` of a stored run whose nodes the caller has already read (`runs.get` shows
/// them too, so they are read once).
pub async fn run_state(gw: &Gateway, run: &RunRow, nodes: &[NodeRow]) -> Result<Value, RpcError> {
    let approvals = gw.store.list_approvals(&run.run_id).await?;
    let timer = if run.status == status::WAITING_TIMER {
        next_timer(gw, &run.run_id).await?
    } else {
        None
    };
    let wait = if run.status == status::WAITING_EVENT {
        wait_key(gw, &run.run_id, nodes).await?
    } else {
        None
    };
    Ok(crate::shapes::run_state(
        run,
        nodes,
        &approvals,
        timer,
        wait,
        smithers_engine::now_ms(),
    ))
}
