//! From engine events to trace spans: one span per run (from its creation to its end) and one
//! per task attempt (a child of its run's span), with the run id, node id, iteration, attempt,
//! status and agent token usage as attributes.
//!
//! Ids are derived from the run id, so that every node and every restart agrees on a run's
//! trace without storing anything: the trace id and the run's span id are the first 24 bytes
//! of SHA-256(run id), an attempt's span id the first 8 of SHA-256(run id, node, iteration,
//! attempt).

use serde_json::{Value, json};
use sha2_010::{Digest, Sha256};
use std::collections::HashMap;

/// One finished span, ready to encode.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Some(message)` for an error status, `None` for ok.
    pub error: Option<String>,
    pub ok: bool,
}

/// A run's trace id and its span id.
pub fn run_ids(run_id: &str) -> ([u8; 16], [u8; 8]) {
    let h = Sha256::digest(run_id.as_bytes());
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    trace.copy_from_slice(&h[..16]);
    span.copy_from_slice(&h[16..24]);
    (trace, span)
}

fn attempt_span_id(run_id: &str, node: &str, iteration: i64, attempt: i64) -> [u8; 8] {
    let mut h = Sha256::new();
    for part in [run_id, node, &iteration.to_string(), &attempt.to_string()] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

/// What a run's span needs from the store when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEnd {
    pub run_id: String,
    pub status: &'static str,
    pub end_ms: i64,
    pub error: Option<String>,
}

/// Most attempts whose token usage is kept until the attempt ends (usage is reported just
/// before the end, so this holds only attempts in flight).
const MAX_PENDING_USAGE: usize = 10_000;

/// Turns events into attempt spans and run ends; keeps the token usage of attempts in flight.
#[derive(Default)]
pub struct Tracker {
    usage: HashMap<(String, String, i64, i64), Value>,
}

/// What one event produced.
#[derive(Debug, PartialEq)]
pub enum Produced {
    Nothing,
    Attempt(Span),
    Run(RunEnd),
}

impl Tracker {
    pub fn on_event(&mut self, kind: &str, run_id: &str, timestamp_ms: i64, p: &Value) -> Produced {
        let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let n = |k: &str| p.get(k).and_then(Value::as_i64).unwrap_or(0);
        let key = || {
            (
                run_id.to_string(),
                s("nodeId"),
                n("iteration"),
                n("attempt"),
            )
        };
        match kind {
            "TokenUsageReported" => {
                if self.usage.len() >= MAX_PENDING_USAGE {
                    self.usage.clear();
                }
                self.usage.insert(key(), p.clone());
                Produced::Nothing
            }
            "NodeFinished" | "NodeFailed" => {
                let usage = self.usage.remove(&key());
                let failed = kind == "NodeFailed";
                let error = failed.then(|| {
                    p.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("failed")
                        .to_string()
                });
                Produced::Attempt(attempt_span(
                    run_id,
                    timestamp_ms,
                    p,
                    if failed { "failed" } else { "finished" },
                    error,
                    usage.as_ref(),
                ))
            }
            "RunFinished" => Produced::Run(RunEnd {
                run_id: run_id.to_string(),
                status: "finished",
                end_ms: timestamp_ms,
                error: None,
            }),
            "RunFailed" => Produced::Run(RunEnd {
                run_id: run_id.to_string(),
                status: "failed",
                end_ms: timestamp_ms,
                error: Some(
                    p.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("failed")
                        .to_string(),
                ),
            }),
            "RunCancelled" => Produced::Run(RunEnd {
                run_id: run_id.to_string(),
                status: "cancelled",
                end_ms: timestamp_ms,
                error: None,
            }),
            _ => Produced::Nothing,
        }
    }
}

fn attempt_span(
    run_id: &str,
    end_ms: i64,
    p: &Value,
    status: &'static str,
    error: Option<String>,
    usage: Option<&Value>,
) -> Span {
    let node = p.get("nodeId").and_then(Value::as_str).unwrap_or("");
    let iteration = p.get("iteration").and_then(Value::as_i64).unwrap_or(0);
    let attempt = p.get("attempt").and_then(Value::as_i64).unwrap_or(0);
    let duration = p.get("durationMs").and_then(Value::as_i64).unwrap_or(0);
    let (trace_id, run_span) = run_ids(run_id);
    let mut attributes = vec![
        ("smithers.run_id", json!(run_id)),
        ("smithers.node_id", json!(node)),
        ("smithers.iteration", json!(iteration)),
        ("smithers.attempt", json!(attempt)),
        ("smithers.status", json!(status)),
    ];
    if let Some(u) = usage {
        for (field, attr) in [
            ("inputTokens", "gen_ai.usage.input_tokens"),
            ("outputTokens", "gen_ai.usage.output_tokens"),
            ("cacheReadTokens", "smithers.usage.cache_read_tokens"),
            ("cacheWriteTokens", "smithers.usage.cache_write_tokens"),
            ("costUsd", "smithers.usage.cost_usd"),
        ] {
            if let Some(v) = u.get(field).filter(|v| v.is_number()) {
                attributes.push((attr, v.clone()));
            }
        }
    }
    Span {
        trace_id,
        span_id: attempt_span_id(run_id, node, iteration, attempt),
        parent: Some(run_span),
        name: if iteration > 0 {
            format!("attempt {node}[{iteration}]")
        } else {
            format!("attempt {node}")
        },
        start_ms: end_ms - duration.max(0),
        end_ms,
        attributes,
        ok: error.is_none(),
        error,
    }
}

/// The run's span, once its end and its stored row (workflow, creation time) are known.
pub fn run_span(end: &RunEnd, workflow: &str, created_at_ms: i64) -> Span {
    let (trace_id, span_id) = run_ids(&end.run_id);
    Span {
        trace_id,
        span_id,
        parent: None,
        name: format!("run {workflow}"),
        start_ms: created_at_ms.min(end.end_ms),
        end_ms: end.end_ms,
        attributes: vec![
            ("smithers.run_id", json!(end.run_id)),
            ("smithers.workflow", json!(workflow)),
            ("smithers.status", json!(end.status)),
        ],
        ok: end.error.is_none(),
        error: end.error.clone(),
    }
}

/// OTLP/JSON (`ExportTraceServiceRequest`) for a batch of spans.
pub fn encode(spans: &[Span], service_name: &str) -> Value {
    let encoded: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut v = json!({
                "traceId": hex::encode(s.trace_id),
                "spanId": hex::encode(s.span_id),
                "name": s.name,
                "kind": 1,
                "startTimeUnixNano": (s.start_ms.max(0) as u64 * 1_000_000).to_string(),
                "endTimeUnixNano": (s.end_ms.max(0) as u64 * 1_000_000).to_string(),
                "attributes": s.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
                "status": match &s.error {
                    Some(m) => json!({"code": 2, "message": m}),
                    None if s.ok => json!({"code": 1}),
                    None => json!({"code": 0}),
                },
            });
            if let Some(p) = s.parent {
                v["parentSpanId"] = json!(hex::encode(p));
            }
            v
        })
        .collect();
    json!({"resourceSpans": [{
        "resource": {"attributes": [attribute("service.name", &json!(service_name))]},
        "scopeSpans": [{
            "scope": {"name": "smithers", "version": env!("CARGO_PKG_VERSION")},
            "spans": encoded,
        }],
    }]})
}

fn attribute(key: &str, v: &Value) -> Value {
    let value = match v {
        Value::String(s) => json!({"stringValue": s}),
        Value::Bool(b) => json!({"boolValue": b}),
        Value::Number(n) if n.is_i64() || n.is_u64() => json!({"intValue": n.to_string()}),
        Value::Number(n) => json!({"doubleValue": n.as_f64().unwrap_or(0.0)}),
        other => json!({"stringValue": other.to_string()}),
    };
    json!({"key": key, "value": value})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_carry_usage_and_their_run_as_parent() {
        let mut t = Tracker::default();
        let usage = json!({"nodeId": "review", "iteration": 0, "attempt": 1, "inputTokens": 11, "outputTokens": 3, "costUsd": 0.5});
        assert_eq!(
            t.on_event("TokenUsageReported", "r1", 90, &usage),
            Produced::Nothing
        );
        let done = json!({"nodeId": "review", "iteration": 0, "attempt": 1, "durationMs": 40});
        let Produced::Attempt(span) = t.on_event("NodeFinished", "r1", 100, &done) else {
            panic!("no span");
        };
        let (trace, run_span) = run_ids("r1");
        assert_eq!((span.trace_id, span.parent), (trace, Some(run_span)));
        assert_eq!((span.start_ms, span.end_ms), (60, 100));
        assert!(
            span.attributes
                .contains(&("gen_ai.usage.input_tokens", json!(11)))
        );
        assert!(
            span.attributes
                .contains(&("smithers.usage.cost_usd", json!(0.5)))
        );
        assert!(t.usage.is_empty(), "usage is dropped once used");

        let failed = json!({"nodeId": "x", "iteration": 2, "attempt": 3, "durationMs": 5, "error": {"message": "boom"}});
        let Produced::Attempt(span) = t.on_event("NodeFailed", "r1", 10, &failed) else {
            panic!("no span");
        };
        assert_eq!(span.name, "attempt x[2]");
        assert_eq!(span.error.as_deref(), Some("boom"));

        let doc = encode(&[span], "svc");
        let s = &doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"].as_str().map(str::len), Some(32));
        assert_eq!(s["parentSpanId"], json!(hex::encode(run_span)));
        assert_eq!(s["status"], json!({"code": 2, "message": "boom"}));
        assert_eq!(s["startTimeUnixNano"], "5000000");
        assert!(
            s["attributes"]
                .as_array()
                .unwrap()
                .contains(&json!({"key": "smithers.attempt", "value": {"intValue": "3"}}))
        );
    }
}
