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

/// A span id from the first 8 bytes of SHA-256 over `parts` (each followed by a NUL byte).
fn span_id(parts: &[&str]) -> [u8; 8] {
    let mut h = Sha256::new();
    for part in parts {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

fn attempt_span_id(run_id: &str, node: &str, iteration: i64, attempt: i64) -> [u8; 8] {
    span_id(&[run_id, node, &iteration.to_string(), &attempt.to_string()])
}

/// The span id of the `ordinal`-th (1, 2, …) later execution of a run: one resumed after it
/// had already ended (failed, cancelled or finished) and been exported once.
fn resumed_span_id(run_id: &str, ordinal: i64) -> [u8; 8] {
    span_id(&[run_id, "resumed", &ordinal.to_string()])
}

/// What a run's span needs from the store when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEnd {
    pub run_id: String,
    pub status: &'static str,
    pub end_ms: i64,
    pub error: Option<String>,
    /// When this process last resumed the run (`RunResumed`): the run may have ended before,
    /// and then this end is a later execution's, not the run's first.
    pub resumed_at_ms: Option<i64>,
}

/// How many times a run had ended before the end being exported, and when the execution that
/// ends now began (found in the run's events).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlierEnds {
    pub count: i64,
    pub resumed_at_ms: i64,
}

/// Most runs whose resume time is remembered until they end.
const MAX_RESUMED: usize = 10_000;

/// Most attempts whose token usage is kept until the attempt ends (usage is reported just
/// before the end, so this holds only attempts in flight).
const MAX_PENDING_USAGE: usize = 10_000;

/// Turns events into attempt spans and run ends; keeps the token usage of attempts in flight.
#[derive(Default)]
pub struct Tracker {
    usage: HashMap<(String, String, i64, i64), Value>,
    /// Runs resumed by this process that have not ended since, with the resume time.
    resumed: HashMap<String, i64>,
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
        let end = |status: &'static str, error: Option<String>, resumed: &mut HashMap<_, _>| {
            Produced::Run(RunEnd {
                run_id: run_id.to_string(),
                status,
                end_ms: timestamp_ms,
                error,
                resumed_at_ms: resumed.remove(run_id),
            })
        };
        match kind {
            "RunResumed" => {
                if self.resumed.len() >= MAX_RESUMED {
                    self.resumed.clear();
                }
                self.resumed.insert(run_id.to_string(), timestamp_ms);
                Produced::Nothing
            }
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
            "RunFinished" => end("finished", None, &mut self.resumed),
            "RunFailed" => end(
                "failed",
                Some(
                    p.pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("failed")
                        .to_string(),
                ),
                &mut self.resumed,
            ),
            "RunCancelled" => end("cancelled", None, &mut self.resumed),
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

/// The run's span, once its end and its stored row (workflow, creation time) are known. The
/// run's first end gives the run's own span, from its creation; an end after the run had
/// already ended and been resumed (`earlier`) gives a span of that later execution, from its
/// resume, as a child of the run's span (whose id it would otherwise repeat).
pub fn run_span(
    end: &RunEnd,
    workflow: &str,
    created_at_ms: i64,
    earlier: Option<EarlierEnds>,
) -> Span {
    let (trace_id, run_span_id) = run_ids(&end.run_id);
    let mut attributes = vec![
        ("smithers.run_id", json!(end.run_id)),
        ("smithers.workflow", json!(workflow)),
        ("smithers.status", json!(end.status)),
    ];
    let (span_id, parent, name, start_ms) = match earlier.filter(|e| e.count > 0) {
        None => (run_span_id, None, format!("run {workflow}"), created_at_ms),
        Some(e) => {
            attributes.push(("smithers.execution", json!(e.count + 1)));
            (
                resumed_span_id(&end.run_id, e.count),
                Some(run_span_id),
                format!("run {workflow} (resumed)"),
                e.resumed_at_ms,
            )
        }
    };
    Span {
        trace_id,
        span_id,
        parent,
        name,
        start_ms: start_ms.min(end.end_ms),
        end_ms: end.end_ms,
        attributes,
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

    #[test]
    fn a_run_resumed_here_carries_its_resume_time_to_its_end() {
        let mut t = Tracker::default();
        let Produced::Run(end) = t.on_event("RunFinished", "r1", 50, &json!({})) else {
            panic!("no end");
        };
        assert_eq!(end.resumed_at_ms, None, "never resumed here");
        t.on_event("RunResumed", "r2", 70, &json!({"previousStatus": "failed"}));
        let Produced::Run(end) = t.on_event("RunFailed", "r2", 90, &json!({})) else {
            panic!("no end");
        };
        assert_eq!(end.resumed_at_ms, Some(70));
        assert!(t.resumed.is_empty(), "forgotten once the run ends");

        // the first end is the run's own span; a later one is a child with an id of its own
        let own = run_span(&end, "wf", 10, None);
        let first_end = Some(EarlierEnds {
            count: 0,
            resumed_at_ms: 70,
        });
        assert_eq!(run_span(&end, "wf", 10, first_end), own);
        assert_eq!((own.parent, own.start_ms), (None, 10));
        let later = run_span(
            &end,
            "wf",
            10,
            Some(EarlierEnds {
                count: 1,
                resumed_at_ms: 70,
            }),
        );
        assert_eq!(later.parent, Some(own.span_id));
        assert_ne!(later.span_id, own.span_id);
        assert_eq!(
            (later.name.as_str(), later.start_ms),
            ("run wf (resumed)", 70)
        );
        let third = run_span(
            &end,
            "wf",
            10,
            Some(EarlierEnds {
                count: 2,
                resumed_at_ms: 80,
            }),
        );
        assert_ne!(third.span_id, later.span_id);
    }
}
