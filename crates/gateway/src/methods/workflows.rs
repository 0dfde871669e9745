//! `workflows.list` (an addition to the protocol): what this gateway serves, so clients and
//! `smithers workflows` can offer it without reading its config.

use super::Call;
use crate::error::RpcError;
use serde_json::{Value, json};

/// Every served workflow, by key: its name, description, input JSON Schema and cron schedule.
pub async fn list(c: &Call<'_>) -> Result<Value, RpcError> {
    let workflows: Vec<Value> = c
        .gw
        .workflows
        .values()
        .map(|w| crate::shapes::workflow_json(&w.key, w.workflow.as_ref(), w.schedule.as_deref()))
        .collect();
    Ok(json!({ "workflows": workflows }))
}
