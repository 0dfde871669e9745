//! `getNodeDiff` (gateway-protocol §1.15): what a task changed on disk, as a diff bundle. The
//! engine computes and caches it ([`smithers_engine::Engine::node_diff`]); this module
//! validates the parameters, maps errors to wire codes and records the metrics.

use crate::error::RpcError;
use crate::gateway::Gateway;
use crate::metrics::names;
use crate::node_output::{valid_node_id, valid_run_id};
use serde_json::Value;
use smithers_engine::node_diff::NodeDiffError;

/// `iteration` must be a JSON number holding an integer in `[0, 2147483647]` (numeric strings
/// are rejected, unlike `getNodeOutput`).
fn iteration(v: Option<&Value>) -> Option<i64> {
    let n = v?.as_number()?;
    if let Some(i) = n.as_i64() {
        return (0..=i64::from(i32::MAX)).contains(&i).then_some(i);
    }
    let f = n.as_f64()?;
    (f.fract() == 0.0 && (0.0..=f64::from(i32::MAX)).contains(&f)).then_some(f as i64)
}

/// Handles the method.
pub async fn get(gw: &Gateway, p: &Value) -> Result<Value, RpcError> {
    let result = diff(gw, p).await;
    if result.is_err() {
        gw.metrics
            .inc(names::NODE_DIFF_REQUEST_TOTAL, &[("result", "error")]);
    }
    result
}

async fn diff(gw: &Gateway, p: &Value) -> Result<Value, RpcError> {
    let Some(run_id) = p
        .get("runId")
        .and_then(Value::as_str)
        .filter(|r| valid_run_id(r))
    else {
        return Err(RpcError::new(
            "InvalidRunId",
            crate::node_output::INVALID_RUN_ID,
        ));
    };
    let Some(node_id) = p
        .get("nodeId")
        .and_then(Value::as_str)
        .filter(|n| valid_node_id(n))
    else {
        return Err(RpcError::new(
            "InvalidNodeId",
            crate::node_output::INVALID_NODE_ID,
        ));
    };
    let Some(it) = iteration(p.get("iteration")) else {
        return Err(RpcError::new(
            "InvalidIteration",
            "iteration must be an i32 non-negative integer.",
        ));
    };
    let d = gw
        .engine
        .node_diff(run_id, node_id, it)
        .await
        .map_err(|e| match e {
            NodeDiffError::Store(e) => RpcError::from(e),
            e => RpcError::new(e.code(), e.message()),
        })?;
    let outcome = if d.cached { "hit" } else { "miss" };
    gw.metrics
        .inc(names::NODE_DIFF_REQUEST_TOTAL, &[("result", outcome)]);
    gw.metrics
        .inc(names::NODE_DIFF_CACHE_TOTAL, &[("result", outcome)]);
    gw.metrics
        .observe(names::NODE_DIFF_BYTES, &[], d.bytes as f64);
    if let Some(ms) = d.compute_ms {
        gw.metrics.observe(names::NODE_DIFF_COMPUTE_MS, &[], ms);
        // a miss added a row
        if let Ok(rows) = gw.store.count_all_node_diffs().await {
            gw.metrics
                .set_gauge(names::NODE_DIFF_CACHE_ROWS, &[], rows as f64);
        }
    }
    serde_json::to_value(&d.bundle)
        .map_err(|e| RpcError::new("SERVER_ERROR", format!("cannot encode the diff: {e}")))
}

#[cfg(test)]
mod tests {
    use super::iteration;
    use serde_json::json;

    #[test]
    fn iteration_is_a_json_integer_in_i32_range() {
        for ok in [json!(0), json!(7), json!(2_147_483_647), json!(3.0)] {
            assert!(iteration(Some(&ok)).is_some(), "{ok}");
        }
        for bad in [
            json!("1"),
            json!(-1),
            json!(1.5),
            json!(2_147_483_648i64),
            json!(null),
            json!(true),
            json!([1]),
        ] {
            assert_eq!(iteration(Some(&bad)), None, "{bad}");
        }
        assert_eq!(iteration(None), None);
    }
}
