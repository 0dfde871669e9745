//! HTTP routes: `GET /health`, `GET /metrics`, `POST /rpc`, `POST /webhooks/<key>`, the
//! WebSocket upgrade on any path, and the JSON 404 for everything else.

use crate::auth;
use crate::bounds;
use crate::error::RpcError;
use crate::frames;
use crate::gateway::{Caller, Gateway, PROTOCOL};
use crate::rpc::{self, Transport};
use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The router: one entry point, because routing depends on exact paths and methods.
pub fn router(gw: Arc<Gateway>) -> axum::Router {
    axum::Router::new().fallback(entry).with_state(gw)
}

/// A JSON response with the protocol's headers.
pub fn json_response(status: u16, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn not_found() -> Response {
    json_response(
        404,
        r#"{"error":{"code":"NOT_FOUND","message":"Route not found"}}"#.to_string(),
    )
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn entry(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    if is_upgrade(&parts.headers) {
        if gw.open_sockets.load(Ordering::Acquire) >= gw.config.max_connections {
            gw.metrics.inc(
                "smithers_gateway_errors_total",
                &[("kind", "connection_limit"), ("transport", "ws")],
            );
            let mut r = Response::new(Body::from("Gateway connection limit reached\n"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        return match WebSocketUpgrade::from_request_parts(&mut parts, &gw).await {
            Ok(up) => {
                let peer = parts
                    .extensions
                    .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                    .map(|c| c.0);
                crate::ws::upgrade(gw, up, parts.headers, peer)
            }
            Err(rej) => rej.into_response(),
        };
    }
    let path = parts.uri.path().to_string();
    let has_query = parts.uri.query().is_some();
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/health") if !has_query => json_response(
            200,
            json!({"ok": true, "protocol": PROTOCOL, "features": gw.config.features, "stateVersion": gw.state_version()}).to_string(),
        ),
        (&Method::GET, "/metrics") if !has_query => metrics(&gw, &parts.headers),
        (&Method::POST, "/rpc") if !has_query => rpc_http(gw, parts.headers, body).await,
        (&Method::POST, p) if p.starts_with("/webhooks/") => {
            let key = &p["/webhooks/".len()..];
            if key.is_empty() || key.contains('/') {
                return not_found();
            }
            let key = percent_decode(key);
            crate::webhooks::handle(gw, &key, parts.headers, body).await
        }
        _ => not_found(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn metrics(gw: &Gateway, headers: &HeaderMap) -> Response {
    if gw.config.metrics_auth {
        let token = auth::http_token(headers);
        if let Err(e) = gw.auth.authenticate(token.as_deref(), headers, now_secs()) {
            return json_response(401, json!({"error": e.to_json()}).to_string());
        }
    }
    let mut r = Response::new(Body::from(gw.metrics.render()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

pub fn now_secs() -> i64 {
    smithers_engine::now_ms() / 1000
}

/// Reads a body up to `limit` bytes; a larger one is `PAYLOAD_TOO_LARGE` (413).
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, RpcError> {
    let too_big = || {
        RpcError::new(
            "PAYLOAD_TOO_LARGE",
            format!("Gateway request payload exceeds {limit} bytes."),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_big());
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_big())
}

async fn rpc_http(gw: Arc<Gateway>, headers: HeaderMap, body: Body) -> Response {
    let t0 = Instant::now();
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    gw.metrics.inc(
        "smithers_gateway_messages_received_total",
        &[("frameType", "request"), ("transport", "http")],
    );
    let mode = gw.auth.mode_name();
    let token = auth::http_token(&headers);
    let grant = match gw.auth.authenticate(token.as_deref(), &headers, now_secs()) {
        Ok(g) => {
            gw.metrics.inc(
                "smithers_gateway_auth_events_total",
                &[
                    ("mode", mode),
                    ("outcome", "success"),
                    ("transport", "http"),
                ],
            );
            g
        }
        Err(e) => {
            gw.metrics.inc(
                "smithers_gateway_auth_events_total",
                &[
                    ("mode", mode),
                    ("outcome", "failure"),
                    ("transport", "http"),
                ],
            );
            gw.metrics.inc(
                "smithers_gateway_errors_total",
                &[("code", &e.code), ("kind", "auth"), ("transport", "http")],
            );
            return respond_err(&gw, &request_id, &e);
        }
    };
    let bytes = match read_body(&headers, body, gw.config.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return respond_err(&gw, &request_id, &e),
    };
    let frame: Value = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        json!({})
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(_) => {
                return respond_err(
                    &gw,
                    &request_id,
                    &RpcError::new("INVALID_INPUT", "Gateway RPC payload must be valid JSON."),
                );
            }
        }
    };
    // from here on the request's own id is echoed whenever it has one (DESIGN §5)
    let own_id = frame
        .get("id")
        .and_then(Value::as_str)
        .filter(|i| i.chars().count() <= 128)
        .map(str::to_string);
    let id = own_id.clone().unwrap_or_else(|| request_id.clone());
    if !frame.is_object() {
        return respond_err(
            &gw,
            &id,
            &RpcError::new("INVALID_REQUEST", "RPC body must be a JSON object"),
        );
    }
    if let Err(e) = bounds::check_frame_bounds(&frame) {
        return respond_err(&gw, &id, &e);
    }
    let method = match bounds::check_method(frame.get("method")) {
        Ok(m) => m,
        Err(e) => return respond_err(&gw, &id, &e),
    };
    if let Some(Value::String(raw)) = frame.get("id")
        && let Err(e) = bounds::check_id_len(raw)
    {
        return respond_err(&gw, &request_id, &e);
    }
    gw.metrics.inc(
        "smithers_gateway_rpc_calls_total",
        &[("method", &method), ("transport", "http")],
    );
    if !auth::has_scope(&grant.scopes, &method) {
        let e = RpcError::new("FORBIDDEN", format!("Missing scope for {method}"));
        return respond_err(&gw, &id, &e);
    }
    let params = frame.get("params").cloned().unwrap_or(Value::Null);
    let caller = Caller {
        grant: &grant,
        conn: None,
    };
    let result = match method.as_str() {
        "connect" => Err(RpcError::new("METHOD_NOT_FOUND", "Unknown method: connect")),
        "streamDevTools" => Err(RpcError::new(
            "INVALID_REQUEST",
            "streamDevTools is only supported over websocket connections",
        )),
        m => rpc::call(&gw, &caller, Transport::Http, m, &params).await,
    };
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    gw.metrics.observe(
        "smithers_gateway_rpc_duration_ms",
        &[("method", &method), ("transport", "http")],
        ms,
    );
    match result {
        Ok(payload) => {
            gw.metrics.inc(
                "smithers_gateway_messages_sent_total",
                &[
                    ("frameType", "response"),
                    ("outcome", "ok"),
                    ("transport", "http"),
                ],
            );
            json_response(200, frames::ok(&id, Some(&payload)))
        }
        Err(e) => {
            gw.metrics.inc(
                "smithers_gateway_errors_total",
                &[
                    ("code", &e.code),
                    ("kind", "rpc"),
                    ("method", &method),
                    ("transport", "http"),
                ],
            );
            respond_err(&gw, &id, &e)
        }
    }
}

fn respond_err(gw: &Gateway, id: &str, e: &RpcError) -> Response {
    gw.metrics.inc(
        "smithers_gateway_messages_sent_total",
        &[
            ("frameType", "response"),
            ("outcome", "error"),
            ("transport", "http"),
        ],
    );
    json_response(e.status(), frames::err(id, e))
}
