//! `signals.send`: deliver a named signal (with optional correlation id and data) to a run and
//! wake it.

use super::Call;
use super::params::ensure_run;
use crate::error::RpcError;
use serde_json::{Value, json};
use smithers_engine::ops;

pub async fn send(c: &Call<'_>) -> Result<Value, RpcError> {
    let (gw, p) = (c.gw, &c.params);
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
    super::params::check_run_id("runId", id)?;
    let row = ensure_run(gw, id).await?;
    if !smithers_store::status::is_ended(&row.status)
        && let Some(wf) = gw.workflow_of(&row)
    {
        smithers_core::check_signal_name(wf.as_ref(), id, name.trim())?;
    }
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
        c.caller.grant.user_id.as_deref(),
    )
    .await?;
    gw.metrics
        .inc("smithers_gateway_signals_total", &[("outcome", "sent")]);
    gw.continue_run(id, Some(c.caller)).await?;
    Ok(
        json!({"runId": d.run_id, "seq": d.seq, "signalName": d.signal_name, "correlationId": d.correlation_id, "receivedAtMs": d.received_at_ms}),
    )
}
