//! `getNodeOutput` (gateway-protocol §1.14): a node's output for one iteration, whether it is
//! produced, pending or failed, and a field list derived from its JSON Schema.

use crate::error::RpcError;
use crate::gateway::Gateway;
use serde_json::{Map, Value, json};

/// Largest output returned (bytes of JSON).
pub const MAX_OUTPUT_BYTES: usize = 104_857_600;

/// The run-id rule of every method ([`smithers_core::ids`]); upstream's DevTools pattern
/// `^[a-z0-9_-]{1,64}$` is a subset of it.
pub(crate) fn valid_run_id(s: &str) -> bool {
    smithers_core::ids::is_run_id(s)
}

/// The `InvalidRunId` message for an id outside the rule.
pub(crate) const INVALID_RUN_ID: &str =
    "runId must be 1 to 256 characters of letters, digits, `-`, `_`, `.` and `:`.";

/// The node-id rule of `getNodeOutput` and `getNodeDiff`: every id a frame or a snapshot of
/// ours can show ([`smithers_core::ids::is_node_id`]), not upstream's narrower
/// `^[a-zA-Z0-9:_-]{1,128}$`, which refuses dotted and loop-scoped ids.
pub(crate) fn valid_node_id(s: &str) -> bool {
    smithers_core::ids::is_node_id(s)
}

/// The `InvalidNodeId` message for an id outside the rule.
pub(crate) const INVALID_NODE_ID: &str = "nodeId must be 1 to 128 characters of letters, digits, `_`, `.`, `-` and `:`, optionally followed by loop scopes (`id@@loop=1,inner=0`).";

fn iteration(v: Option<&Value>) -> Option<i64> {
    let n = match v? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) if !s.trim().is_empty() => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (n.fract() == 0.0 && (0.0..=2_147_483_647.0).contains(&n)).then_some(n as i64)
}

/// Handles the method.
pub async fn get(gw: &Gateway, p: &Value) -> Result<Value, RpcError> {
    let run_id = p
        .get("runId")
        .and_then(Value::as_str)
        .filter(|r| valid_run_id(r));
    let Some(run_id) = run_id else {
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
        return Err(RpcError::new("InvalidNodeId", INVALID_NODE_ID));
    };
    let Some(it) = iteration(p.get("iteration")) else {
        return Err(RpcError::new(
            "InvalidIteration",
            "iteration must be a non-negative 32-bit integer.",
        ));
    };
    let run = gw.store.get_run(run_id).await?;
    if run.is_none() {
        return Err(RpcError::new(
            "RunNotFound",
            format!("Run not found: {run_id}"),
        ));
    }
    let nodes: Vec<_> = gw
        .store
        .list_nodes(run_id)
        .await?
        .into_iter()
        .filter(|n| n.node_id == node_id)
        .collect();
    if nodes.is_empty() {
        return Err(RpcError::new(
            "NodeNotFound",
            format!("Node not found: {node_id}"),
        ));
    }
    let Some(node) = nodes.into_iter().find(|n| n.iteration == it) else {
        return Err(RpcError::new(
            "IterationNotFound",
            format!("Iteration not found: {it}"),
        ));
    };
    let attempts = gw.store.list_node_attempts(run_id, node_id, it).await?;
    let latest = attempts.first();
    // the schema the latest attempt ran with; before any attempt, the workflow's
    let schema_json = match latest
        .and_then(|a| a.meta_json.as_deref())
        .and_then(|m| serde_json::from_str::<Value>(m).ok())
        .and_then(|m| m.get("outputSchema").cloned())
        .filter(|s| !s.is_null())
    {
        Some(s) => Some(s),
        None => run
            .as_ref()
            .and_then(|r| gw.workflow_of(r))
            .and_then(|w| w.output_schema(node_id))
            .map(|s| (*s).clone()),
    };
    // as upstream: a node without an output table (here: a task that declares no output
    // schema, named or inline) has no output to show
    if node.output_table.is_empty() && schema_json.is_none() {
        gw.metrics
            .inc("smithers_node_output_request_total", &[("status", "error")]);
        return Err(RpcError::new(
            "NodeHasNoOutput",
            format!("Node {node_id} has no output table."),
        ));
    }
    let schema = describe(schema_json.as_ref(), gw);
    if let Some(row) = gw.store.get_output(run_id, node_id, it).await? {
        if row.payload_json.len() > MAX_OUTPUT_BYTES {
            gw.metrics
                .inc("smithers_node_output_request_total", &[("status", "error")]);
            return Err(RpcError::new(
                "PayloadTooLarge",
                format!("Output payload exceeds {MAX_OUTPUT_BYTES} bytes."),
            ));
        }
        let value: Value = serde_json::from_str(&row.payload_json).map_err(|_| {
            RpcError::new("MalformedOutputRow", "Output row is not parseable JSON.")
        })?;
        gw.metrics.inc(
            "smithers_node_output_request_total",
            &[("status", "produced")],
        );
        gw.metrics.observe(
            "smithers_node_output_bytes",
            &[],
            row.payload_json.len() as f64,
        );
        return Ok(json!({"status": "produced", "row": value, "schema": schema}));
    }
    let failed = node.state == "failed"
        || latest.is_some_and(|a| {
            a.state == "failed" || a.error_json.as_deref().is_some_and(|e| !e.is_empty())
        });
    if failed {
        let partial = latest
            .and_then(|a| a.heartbeat_data_json.as_deref())
            .and_then(|h| serde_json::from_str::<Value>(h).ok())
            .filter(Value::is_object);
        gw.metrics.inc(
            "smithers_node_output_request_total",
            &[("status", "failed")],
        );
        return Ok(
            json!({"status": "failed", "row": Value::Null, "schema": schema, "partial": partial}),
        );
    }
    gw.metrics.inc(
        "smithers_node_output_request_total",
        &[("status", "pending")],
    );
    Ok(json!({"status": "pending", "row": Value::Null, "schema": schema}))
}

/// `{fields: [{name, type, optional, nullable, description?, enum?}]}` from an object schema.
/// Constructs with no single type (unions) become `unknown` and are counted, never an error.
pub fn describe(schema: Option<&Value>, gw: &Gateway) -> Value {
    let Some(props) = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
    else {
        return json!({"fields": []});
    };
    let required: Vec<&str> = schema
        .and_then(|s| s.get("required"))
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let fields: Vec<Value> = props
        .iter()
        .map(|(name, prop)| {
            let mut f = Map::new();
            let (ty, nullable) = field_type(prop);
            if ty == "unknown" {
                gw.metrics
                    .inc("smithers_node_output_schema_conversion_error_total", &[]);
            }
            f.insert("name".into(), json!(name));
            f.insert("type".into(), json!(ty));
            f.insert("optional".into(), json!(!required.contains(&name.as_str())));
            f.insert("nullable".into(), json!(nullable));
            if let Some(d) = prop.get("description").and_then(Value::as_str) {
                f.insert("description".into(), json!(d));
            }
            if let Some(e) = prop.get("enum").and_then(Value::as_array) {
                f.insert("enum".into(), Value::Array(e.clone()));
            } else if let Some(c) = prop.get("const") {
                f.insert("enum".into(), json!([c]));
            }
            Value::Object(f)
        })
        .collect();
    json!({"fields": fields})
}

fn field_type(prop: &Value) -> (&'static str, bool) {
    let one = |t: &str| match t {
        "string" => "string",
        "number" | "integer" => "number",
        "boolean" => "boolean",
        "object" => "object",
        "array" => "array",
        "null" => "null",
        _ => "unknown",
    };
    match prop.get("type") {
        Some(Value::String(t)) => (one(t), false),
        Some(Value::Array(ts)) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            let nullable = names.contains(&"null");
            let rest: Vec<&str> = names.into_iter().filter(|t| *t != "null").collect();
            match rest.as_slice() {
                [t] => (one(t), nullable),
                [] => ("null", true),
                _ => ("unknown", nullable),
            }
        }
        _ if prop.get("enum").is_some() => ("string", false),
        _ if prop.get("const").is_some_and(Value::is_string) => ("string", false),
        _ => ("unknown", false),
    }
}
