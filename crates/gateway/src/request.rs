//! Parsing request frames (gateway-protocol §1.3, §1.5): a WebSocket text message or a
//! `POST /rpc` body becomes a [`Request`], or a [`Rejected`] that says which id to answer with
//! and why. Pure functions of the bytes, so they are fuzzed directly (tests/proptest_frames.rs).

use crate::bounds;
use crate::error::RpcError;
use serde_json::{Value, json};

/// A parsed request: its id, a method name that passed the name rules, and its raw params.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: String,
    pub method: String,
    pub params: Value,
}

/// A frame that is not a usable request: the id to answer with (the frame's own whenever it
/// parsed far enough to have a usable one; DESIGN §5) and the error.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: String,
    pub error: RpcError,
}

fn reject(id: impl Into<String>, error: RpcError) -> Rejected {
    Rejected {
        id: id.into(),
        error,
    }
}

fn not_json() -> RpcError {
    RpcError::new("INVALID_INPUT", "Gateway RPC payload must be valid JSON.")
}

/// The frame's own id, if it is a string within the id length limit.
fn own_id(frame: &Value) -> Option<String> {
    frame
        .get("id")
        .and_then(Value::as_str)
        .filter(|i| bounds::check_id_len(i).is_ok())
        .map(str::to_string)
}

/// A WebSocket request frame `{"type":"req","id","method","params"?}`; failures answer with the
/// frame's id, or `"invalid"` when it has none.
pub fn parse_ws(text: &str) -> Result<Request, Rejected> {
    let frame: Value = serde_json::from_str(text).map_err(|_| reject("invalid", not_json()))?;
    let eid = own_id(&frame).unwrap_or_else(|| "invalid".to_string());
    bounds::check_frame_bounds(&frame).map_err(|e| reject(eid.clone(), e))?;
    if frame.get("type").and_then(Value::as_str) != Some("req") {
        return Err(reject(
            eid,
            RpcError::new("INVALID_INPUT", "Gateway frame must be a request object."),
        ));
    }
    let id = bounds::check_frame_id(frame.get("id")).map_err(|e| reject("invalid", e))?;
    let method = bounds::check_method(frame.get("method")).map_err(|e| reject(id.clone(), e))?;
    Ok(Request {
        id,
        method,
        params: take_params(frame),
    })
}

/// A `POST /rpc` body `{"id"?, "method", "params"?}` (`type` is not required); an empty body is
/// `{}`. Failures answer with the body's id, or `request_id` (the `x-request-id` header or a
/// fresh UUID).
pub fn parse_http(body: &[u8], request_id: &str) -> Result<Request, Rejected> {
    let frame: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|_| reject(request_id, not_json()))?
    };
    let id = own_id(&frame).unwrap_or_else(|| request_id.to_string());
    if !frame.is_object() {
        return Err(reject(
            id,
            RpcError::new("INVALID_REQUEST", "RPC body must be a JSON object"),
        ));
    }
    bounds::check_frame_bounds(&frame).map_err(|e| reject(id.clone(), e))?;
    let method = bounds::check_method(frame.get("method")).map_err(|e| reject(id.clone(), e))?;
    if let Some(Value::String(raw)) = frame.get("id") {
        bounds::check_id_len(raw).map_err(|e| reject(request_id, e))?;
    }
    Ok(Request {
        id,
        method,
        params: take_params(frame),
    })
}

fn take_params(frame: Value) -> Value {
    match frame {
        Value::Object(mut m) => m.remove("params").unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_ids_echoed_when_usable() {
        let r = parse_ws(r#"{"type":"req","id":"a","method":"Bad"}"#).unwrap_err();
        assert_eq!(r.id, "a");
        assert_eq!(r.error.message, "Gateway method name is invalid.");
        let r = parse_ws(r#"{"type":"x","id":"a","method":"health"}"#).unwrap_err();
        assert_eq!(r.id, "a");
        let r = parse_ws("{").unwrap_err();
        assert_eq!(r.id, "invalid");
        let r = parse_ws(r#"{"type":"req","id":7,"method":"health"}"#).unwrap_err();
        assert_eq!(
            (r.id.as_str(), r.error.message.as_str()),
            ("invalid", "Gateway frame id must be a string.")
        );
        let ok = parse_ws(r#"{"type":"req","id":"","method":"health","params":[1]}"#).unwrap();
        assert_eq!(ok.params, json!([1]));
    }

    #[test]
    fn http_bodies() {
        assert_eq!(
            parse_http(b"  ", "rq").unwrap_err().error.message,
            "Gateway method name must be a string."
        );
        let r = parse_http(b"[1]", "rq").unwrap_err();
        assert_eq!(
            (r.id.as_str(), r.error.code.as_str()),
            ("rq", "INVALID_REQUEST")
        );
        let ok = parse_http(br#"{"id":"x","method":"runs.list"}"#, "rq").unwrap();
        assert_eq!((ok.id.as_str(), ok.params.clone()), ("x", Value::Null));
        let long = format!(r#"{{"id":"{}","method":"health"}}"#, "i".repeat(129));
        let r = parse_http(long.as_bytes(), "rq").unwrap_err();
        assert_eq!(r.id, "rq");
    }
}
