//! Frame encoding with the protocol's key order (`type,id,ok,payload|error` and
//! `type,event,payload,seq,stateVersion`).

use crate::error::RpcError;
use serde_json::Value;

fn s(v: &str) -> String {
    Value::String(v.to_string()).to_string()
}

/// `{"type":"res","id":…,"ok":true[,"payload":…]}` (payload omitted when `None`).
pub fn ok(id: &str, payload: Option<&Value>) -> String {
    match payload {
        Some(p) => format!(
            r#"{{"type":"res","id":{},"ok":true,"payload":{}}}"#,
            s(id),
            p
        ),
        None => format!(r#"{{"type":"res","id":{},"ok":true}}"#, s(id)),
    }
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
    format!(
        r#"{{"type":"event","event":{},"payload":{},"seq":{},"stateVersion":{}}}"#,
        s(name),
        payload_json,
        seq,
        state_version
    )
}

/// `{"type":"event","event":…,"payload":…,"seq":…,"stateVersion":…}`.
pub fn event(name: &str, payload: &Value, seq: u64, state_version: u64) -> String {
    format!(
        r#"{{"type":"event","event":{},"payload":{},"seq":{},"stateVersion":{}}}"#,
        s(name),
        payload,
        seq,
        state_version
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
