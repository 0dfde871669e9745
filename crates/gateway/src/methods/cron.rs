//! `cron.list`, `cron.add`, `cron.remove`, `cron.trigger`: schedules that start runs.

use super::Call;
use super::params::{check_cron_id, req_str};
use crate::bounds;
use crate::error::RpcError;
use serde_json::{Value, json};

pub async fn list(c: &Call<'_>) -> Result<Value, RpcError> {
    let rows = c.gw.store.list_crons().await?;
    Ok(Value::Array(
        rows.iter().map(crate::cron::cron_json).collect(),
    ))
}

pub async fn add(c: &Call<'_>) -> Result<Value, RpcError> {
    let (gw, p) = (c.gw, &c.params);
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
    let id = match p.get("cronId").and_then(Value::as_str) {
        Some(id) => {
            check_cron_id("cronId", id)?;
            id.to_string()
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    let enabled = p.get("enabled").and_then(Value::as_bool).unwrap_or(true);
    // the input its runs start with, checked now rather than at every fire
    let input = match p.get("input") {
        None | Some(Value::Null) => None,
        some => Some(bounds::check_run_input(some)?),
    };
    if let Some(reg) = gw.workflows.get(key) {
        let check = input.clone().unwrap_or_else(|| json!({}));
        smithers_engine::check_input(reg.workflow.as_ref(), &check).map_err(|e| {
            RpcError::new(
                "INVALID_INPUT",
                format!("the schedule's runs could not start: {}", e.message),
            )
        })?;
    }
    let row = crate::cron::new_row(
        &id,
        key,
        pattern,
        enabled,
        smithers_engine::now_ms(),
        input.as_ref(),
    )
    .map_err(|e| RpcError::new("INVALID_INPUT", e))?;
    gw.store.upsert_cron(row).await?;
    let stored = gw
        .store
        .get_cron(&id)
        .await?
        .ok_or_else(|| RpcError::new("SERVER_ERROR", "cron vanished after it was written"))?;
    Ok(crate::cron::cron_json(&stored))
}

pub async fn remove(c: &Call<'_>) -> Result<Value, RpcError> {
    let id = req_str(&c.params, "cronId", "cronId is required")?;
    check_cron_id("cronId", id)?;
    if !c.gw.store.delete_cron(id).await? {
        return Err(RpcError::new("NOT_FOUND", format!("Cron not found: {id}")));
    }
    Ok(json!({"cronId": id, "removed": true}))
}

pub async fn trigger(c: &Call<'_>) -> Result<Value, RpcError> {
    let (gw, p) = (c.gw, &c.params);
    let cron = match p.get("cronId").and_then(Value::as_str) {
        Some(id) => {
            check_cron_id("cronId", id)?;
            gw.store.get_cron(id).await?
        }
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
    if let Some(cr) = &cron {
        let now = smithers_engine::now_ms();
        let next = crate::cron::next_after(&cr.pattern, now).ok();
        gw.store
            .update_cron_run(&cr.cron_id, Some(now), next, None)
            .await?;
    }
    // an explicit input wins; else the schedule's own
    let input = match (p.get("input"), &cron) {
        (None | Some(Value::Null), Some(cr)) => crate::cron::input_of(cr),
        (given, _) => bounds::check_run_input(given)?,
    };
    let run = gw.start_run(&key, input, None, c.caller, None).await?;
    gw.metrics.inc(
        "smithers_gateway_cron_triggers_total",
        &[("source", "manual")],
    );
    Ok(json!({"runId": run, "workflow": key}))
}
