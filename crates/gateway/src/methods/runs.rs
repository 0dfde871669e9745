//! `health` and the `runs.*` methods: list, read, start, cancel, rerun, fork and compare runs.

use super::Call;
use super::params::{ensure_run, non_negative, not_found_run, opt_run_id, req_str, run_id};
use crate::bounds;
use crate::error::RpcError;
use crate::gateway::PROTOCOL;
use crate::shapes;
use serde_json::{Value, json};
use smithers_engine::ops;
use smithers_store::{RunCursor, RunQuery, status};

pub async fn health(c: &Call<'_>) -> Result<Value, RpcError> {
    Ok(json!({
        "protocol": PROTOCOL,
        "features": c.gw.config.features,
        "stateVersion": c.gw.state_version(),
        "uptimeMs": c.gw.uptime_ms(),
    }))
}

/// Newest runs first. Beyond upstream's `limit`/`status`: `workflow` (a served key),
/// `runIdPrefix`, and paging after a row with `beforeCreatedAtMs` + `beforeRunId` (the last
/// row of the page before), so a console can walk 100k runs without offsets.
pub async fn list(c: &Call<'_>) -> Result<Value, RpcError> {
    let p = &c.params;
    let limit = bounds::positive_int(p.get("limit"), "limit")?
        .unwrap_or(50)
        .min(10_000) as usize;
    let status = opt_str(p, "status")?.map(str::to_string);
    let workflow_name = match opt_str(p, "workflow")? {
        None => None,
        Some(key) => Some(
            c.gw.workflows
                .get(key)
                .map(|w| w.workflow.name().to_string())
                .ok_or_else(|| RpcError::new("NOT_FOUND", format!("Unknown workflow: {key}")))?,
        ),
    };
    let run_id_prefix = opt_str(p, "runIdPrefix")?.map(str::to_string);
    if run_id_prefix
        .as_ref()
        .is_some_and(|x| x.chars().count() > 128)
    {
        return Err(RpcError::new(
            "INVALID_INPUT",
            "runIdPrefix exceeds the maximum length of 128 characters.",
        ));
    }
    let before = match non_negative(p.get("beforeCreatedAtMs"), "beforeCreatedAtMs")? {
        Some(created_at_ms) => Some(RunCursor {
            created_at_ms,
            run_id: opt_run_id(p, "beforeRunId")?.map(str::to_string),
        }),
        None if p.get("beforeRunId").is_some_and(|v| !v.is_null()) => {
            return Err(RpcError::new(
                "INVALID_REQUEST",
                "beforeRunId needs beforeCreatedAtMs (both from the last row of the previous page)",
            ));
        }
        None => None,
    };
    let q = RunQuery {
        status,
        workflow_name,
        run_id_prefix,
        before,
        limit,
    };
    let rows = c.gw.store.query_runs(&q).await?;
    Ok(Value::Array(
        rows.iter()
            .map(|r| shapes::run_json(r, c.gw.key_of(r)))
            .collect(),
    ))
}

/// An optional string parameter: absent or null → `None`; another type → `INVALID_REQUEST`.
fn opt_str<'a>(p: &'a Value, key: &str) -> Result<Option<&'a str>, RpcError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::new(
            "INVALID_REQUEST",
            format!("{key} must be a string"),
        )),
    }
}

pub async fn get(c: &Call<'_>) -> Result<Value, RpcError> {
    let gw = c.gw;
    let id = run_id(&c.params, "runId", "runId is required")?;
    let row = ensure_run(gw, id).await?;
    let nodes = gw.store.list_nodes(id).await?;
    let state = crate::run_view::run_state(gw, &row, &nodes).await?;
    let summary = shapes::summary(&nodes);
    let mut v = shapes::run_json(&row, gw.key_of(&row));
    v["summary"] = summary;
    v["runState"] = state;
    if row.status == status::FINISHED {
        v["output"] = shapes::latest_outputs(&gw.store.list_outputs(id).await?);
    }
    // each node's own state (approvals and waits have no attempts to read it from)
    v["nodes"] = Value::Array(
        nodes
            .into_iter()
            .map(|n| {
                json!({"nodeId": n.node_id, "iteration": n.iteration, "state": n.state,
                    "lastAttempt": n.last_attempt, "label": n.label, "updatedAtMs": n.updated_at_ms})
            })
            .collect(),
    );
    // the input the run started with, as a console shows it (`{}` when none was stored)
    v["input"] = smithers_store::input_object(gw.store.as_ref(), id).await?;
    Ok(v)
}

pub async fn create(c: &Call<'_>) -> Result<Value, RpcError> {
    let p = &c.params;
    let key = req_str(p, "workflow", "workflow is required")?;
    if !c.gw.workflows.contains_key(key) {
        return Err(RpcError::new(
            "NOT_FOUND",
            format!("Unknown workflow: {key}"),
        ));
    }
    let input = bounds::check_run_input(p.get("input"))?;
    let new_id = opt_run_id(p, "runId")?.map(str::to_string);
    let id = c.gw.start_run(key, input, new_id, c.caller, None).await?;
    Ok(json!({"runId": id, "workflow": key}))
}

pub async fn cancel(c: &Call<'_>) -> Result<Value, RpcError> {
    let gw = c.gw;
    let id = run_id(&c.params, "runId", "runId is required")?;
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

pub async fn rerun(c: &Call<'_>) -> Result<Value, RpcError> {
    let gw = c.gw;
    let p = &c.params;
    let id = run_id(p, "runId", "runId is required")?;
    let new_id = opt_run_id(p, "newRunId")?.map(str::to_string);
    let row = ensure_run(gw, id).await?;
    let key = gw.key_of(&row).ok_or_else(|| not_found_run(id))?;
    let input = smithers_store::input_object(gw.store.as_ref(), id).await?;
    let run = gw.start_run(&key, input, new_id, c.caller, None).await?;
    Ok(json!({"runId": run, "workflow": key}))
}

/// `runs.resume` (an addition): continues a run that is parked, cancelled, failed or left by a
/// dead engine, with the workflow this gateway serves for it. `force` accepts a workflow file
/// that changed since the run started. A run already driven here answers `running` unchanged.
pub async fn resume(c: &Call<'_>) -> Result<Value, RpcError> {
    let gw = c.gw;
    let p = &c.params;
    let id = run_id(p, "runId", "runId is required")?;
    let force = match p.get("force") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(RpcError::new("INVALID_REQUEST", "force must be a boolean"));
        }
    };
    c.caller.follow(id);
    if gw.engine.is_active(id) {
        return Ok(json!({"runId": id, "status": "running", "resumed": false}));
    }
    let row = ensure_run(gw, id).await?;
    let key = gw.key_of(&row);
    let wf = gw.workflow_of(&row).ok_or_else(|| {
        RpcError::new(
            "WORKFLOW_NOT_FOUND",
            format!(
                "Run {id} belongs to workflow `{}`, which this gateway does not serve",
                row.workflow_name
            ),
        )
    })?;
    let h = gw.engine.resume(wf, id, force).await?;
    drop(h);
    let key = key.unwrap_or_default();
    gw.note_resumed(id, &key, c.caller);
    Ok(json!({"runId": id, "status": "running", "resumed": true, "workflow": key}))
}

pub async fn fork(c: &Call<'_>) -> Result<Value, RpcError> {
    let gw = c.gw;
    let p = &c.params;
    let id = run_id(p, "runId", "runId is required")?;
    let frame = non_negative(p.get("frameNo"), "frameNo")?
        .ok_or_else(|| RpcError::new("INVALID_REQUEST", "frameNo is required"))?;
    let new_id = opt_run_id(p, "newRunId")?.map(str::to_string);
    let row = ensure_run(gw, id).await?;
    let key = gw.key_of(&row).ok_or_else(|| not_found_run(id))?;
    let wf = gw.workflow_of(&row).ok_or_else(|| not_found_run(id))?;
    let input = match p.get("input") {
        None | Some(Value::Null) => None,
        some => Some(bounds::check_run_input(some)?),
    };
    let h = gw.engine.fork(wf, id, frame, input, new_id).await?;
    let run = h.run_id.clone();
    c.caller.follow(&run);
    drop(h);
    Ok(json!({"runId": run, "workflow": key, "parentRunId": id, "frameNo": frame}))
}

pub async fn diff(c: &Call<'_>) -> Result<Value, RpcError> {
    let gw = c.gw;
    let p = &c.params;
    let (Some(l), Some(r)) = (
        p.get("leftRunId").and_then(Value::as_str),
        p.get("rightRunId").and_then(Value::as_str),
    ) else {
        return Err(RpcError::new(
            "INVALID_REQUEST",
            "leftRunId and rightRunId are required",
        ));
    };
    super::params::check_run_id("leftRunId", l)?;
    super::params::check_run_id("rightRunId", r)?;
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
