//! Frame encoding with the protocol's key order (`type,id,ok,payload|error` and
//! `type,event,payload,seq,stateVersion`).

use crate::error::RpcError;
use serde_json::Value;
use std::fmt::Write;

/// Appends `v` as a JSON string (quoted and escaped).
fn push_str(out: &mut String, v: &str) {
    match serde_json::to_string(v) {
        Ok(quoted) => out.push_str(&quoted),
        // serializing a `str` cannot fail; this keeps the frame valid JSON regardless
        Err(_) => out.push_str(r#""""#),
    }
}

/// Appends the compact JSON text of `v`.
fn push_value(out: &mut String, v: &Value) {
    out.push_str(&smithers_core::json::text(v));
}

fn s(v: &str) -> String {
    // serializing a `str` cannot fail; the fallback keeps the frame valid JSON regardless
    serde_json::to_string(v).unwrap_or_else(|_| r#""""#.to_string())
}

/// `{"type":"res","id":…,"ok":true[,"payload":…]}` (payload omitted when `None`).
pub fn ok(id: &str, payload: Option<&Value>) -> String {
    let mut out = String::with_capacity(64);
    out.push_str(r#"{"type":"res","id":"#);
    push_str(&mut out, id);
    out.push_str(r#","ok":true"#);
    if let Some(p) = payload {
        out.push_str(r#","payload":"#);
        push_value(&mut out, p);
    }
    out.push('}');
    out
}

/// `{"type":"res","id":…,"ok":false,"error":{"code":…,"message":…}}`.
pub fn err(id: &str, e: &RpcError) -> String {
    format!(
        r#"{{"type":"res","id":{},"ok":false,"error":{{"code":{},"message":{}}}}}"#,
        s(id),
        s(&e.code),
        s(&e.message)
    )
}

/// [`event`] with the payload already serialized as JSON.
pub fn event_json(name: &str, payload_json: &str, seq: u64, state_version: u64) -> String {
    let mut out = String::with_capacity(payload_json.len() + name.len() + 80);
    out.push_str(r#"{"type":"event","event":"#);
    push_str(&mut out, name);
    out.push_str(r#","payload":"#);
    out.push_str(payload_json);
    // writing into a `String` cannot fail
    let _ = write!(out, r#","seq":{seq},"stateVersion":{state_version}}}"#);
    out
}

/// `{"type":"event","event":…,"payload":…,"seq":…,"stateVersion":…}`.
pub fn event(name: &str, payload: &Value, seq: u64, state_version: u64) -> String {
    event_json(
        name,
        &smithers_core::json::text(payload),
        seq,
        state_version,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_escaping() {
        assert_eq!(
            ok("1", Some(&json!({"a": 1}))),
            r#"{"type":"res","id":"1","ok":true,"payload":{"a":1}}"#
        );
        assert_eq!(ok("x\"", None), r#"{"type":"res","id":"x\"","ok":true}"#);
        let e = RpcError::new("FORBIDDEN", "Missing scope for runs.create");
        let text = err("r", &e);
        assert!(
            text.starts_with(r#"{"type":"res","id":"r","ok":false,"error":{"code":"FORBIDDEN""#)
        );
        let ev = event("tick", &json!({"ts": 5}), 3, 9);
        assert_eq!(
            ev,
            r#"{"type":"event","event":"tick","payload":{"ts":5},"seq":3,"stateVersion":9}"#
        );
        let p = json!({"runId": "r\"1", "n": [1, 2]});
        assert_eq!(
            event_json("node.started", &p.to_string(), 4, 2),
            event("node.started", &p, 4, 2)
        );
        for t in [ok("1", Some(&json!(null))), text, ev] {
            serde_json::from_str::<Value>(&t).unwrap();
        }
    }
}
