//! DevTools reads (gateway-protocol §1.12): `getDevToolsSnapshot` and the checks and
//! `runState` view it shares with `streamDevTools`. The trees themselves are built by
//! [`crate::devtools_tree`].

use crate::devtools_tree::{build_frame, empty_root};
use crate::error::RpcError;
use crate::gateway::{Caller, Gateway};
use serde_json::{Value, json};

/// The `runId` of a DevTools request: present, non-empty and matching the id pattern.
pub fn run_id_param(p: &Value) -> Result<&str, RpcError> {
    let run_id = match p.get("runId").and_then(Value::as_str) {
        Some(r) if !r.is_empty() => r,
        _ => return Err(RpcError::new("InvalidRunId", "runId is required")),
    };
    if !crate::node_output::valid_run_id(run_id) {
        return Err(RpcError::new(
            "InvalidRunId",
            crate::node_output::INVALID_RUN_ID,
        ));
    }
    Ok(run_id)
}

/// `getDevToolsSnapshot {runId, frameNo?}`.
pub async fn snapshot(gw: &Gateway, caller: &Caller<'_>, p: &Value) -> Result<Value, RpcError> {
    let run_id = run_id_param(p)?;
    let frame_no = match p.get("frameNo") {
        None => None,
        Some(v) => match v.as_f64() {
            Some(n) if n.fract() == 0.0 && (0.0..=2_147_483_647.0).contains(&n) => Some(n as i64),
            _ => {
                return Err(RpcError::new(
                    "FrameOutOfRange",
                    "frameNo must be an integer between 0 and 2147483647.",
                ));
            }
        },
    };
    check_subscribed(caller, run_id)?;
    let Some(run) = gw.store.get_run(run_id).await? else {
        return Err(RpcError::new(
            "RunNotFound",
            format!("Run not found: {run_id}"),
        ));
    };
    let latest = gw.store.last_frame_no(run_id).await?;
    let (no, root) = if latest == 0 {
        match frame_no {
            None | Some(0) => (0, empty_root()),
            Some(n) => {
                return Err(RpcError::new(
                    "FrameOutOfRange",
                    format!("frameNo must be 0 for runs with no frames (got {n})."),
                ));
            }
        }
    } else {
        let n = frame_no.unwrap_or(latest);
        if n > latest {
            return Err(RpcError::new(
                "FrameOutOfRange",
                format!("frameNo must be between 0 and {latest}."),
            ));
        }
        let f = smithers_engine::frames::read_frame(gw.store.as_ref(), run_id, n)
            .await?
            .ok_or_else(|| {
                RpcError::new(
                    "FrameOutOfRange",
                    format!("Frame {n} is not available for run {run_id}."),
                )
            })?;
        let v: Value = serde_json::from_str(&f.xml_json).unwrap_or(Value::Null);
        (n, build_frame(&v, &run.workflow_name).to_json())
    };
    let state = run_state_of(gw, run_id).await?;
    Ok(
        json!({"version": 1, "runId": run_id, "frameNo": no, "seq": no, "root": root, "runState": state}),
    )
}

/// A connection that narrowed its subscriptions may only look at those runs.
pub fn check_subscribed(caller: &Caller<'_>, run_id: &str) -> Result<(), RpcError> {
    if caller.conn.is_some_and(|c| !c.may_see(run_id)) {
        return Err(RpcError::new(
            "Unauthorized",
            "Connection is not subscribed to this runId.",
        ));
    }
    Ok(())
}

/// The `runState` view appended to snapshots (gateway-protocol §1.11).
pub async fn run_state_of(gw: &Gateway, run_id: &str) -> Result<Value, RpcError> {
    let Some(run) = gw.store.get_run(run_id).await? else {
        return Err(RpcError::new(
            "RunNotFound",
            format!("Run not found: {run_id}"),
        ));
    };
    let nodes = gw.store.list_nodes(&run.run_id).await?;
    crate::run_view::run_state(gw, &run, &nodes).await
}
