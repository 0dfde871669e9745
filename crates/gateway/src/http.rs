//! HTTP routes: `GET /health`, `GET /metrics`, `POST /rpc`, `POST /webhooks/<key>`, the
//! WebSocket upgrade on any path, and the JSON 404 for everything else.

use crate::auth;
use crate::clock::now_secs;

use crate::error::RpcError;
use crate::frames;
use crate::gateway::{Caller, Gateway, PROTOCOL};
use crate::methods::{self, Transport};
use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;
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
        let up = match WebSocketUpgrade::from_request_parts(&mut parts, &gw).await {
            Ok(up) => up,
            Err(rej) => return rej.into_response(),
        };
        let tcp = parts
            .extensions
            .get::<crate::listener::ConnHandle>()
            .map(|h| h.0.clone());
        // both budgets are reserved here, before the 101: a burst cannot overshoot them
        let reserved = gw.ws_budget.reserve(
            gw.config.max_connections,
            gw.config.limits.max_unauthenticated_ws,
            tcp,
        );
        return match reserved {
            Ok(slot) => {
                if let Some(t) = slot.tcp() {
                    t.upgraded();
                }
                crate::ws::upgrade(gw, up, parts.headers, slot)
            }
            Err(refusal) => ws_refused(&gw, refusal),
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
        (&Method::GET, p) if gw.config.console => {
            crate::console::asset(p).unwrap_or_else(not_found)
        }
        (&Method::POST, "/rpc") if !has_query => rpc_http(gw, parts.headers, body).await,
        (&Method::POST, p) if p.starts_with("/webhooks/") => {
            let key = &p["/webhooks/".len()..];
            if key.is_empty() || key.contains('/') {
                return not_found();
            }
            let key = percent_decode(key);
            crate::webhook::handle(gw, &key, parts.headers, body).await
        }
        _ => not_found(),
    }
}

/// The `503` of a refused upgrade (gateway-protocol §1.4: this body and these headers for the
/// connection limit; the unauthenticated limit says which limit it was).
fn ws_refused(gw: &Gateway, refusal: crate::ws_budget::WsRefusal) -> Response {
    use crate::ws_budget::WsRefusal;
    let (kind, body) = match refusal {
        WsRefusal::Full => ("connection_limit", "Gateway connection limit reached\n"),
        WsRefusal::Unauthenticated => (
            "unauthenticated_limit",
            "Gateway connection limit reached (connections that have not completed connect)\n",
        ),
    };
    gw.metrics.inc(
        "smithers_gateway_errors_total",
        &[("kind", kind), ("transport", "ws")],
    );
    static WARNINGS: crate::conn_limit::Throttle =
        crate::conn_limit::Throttle::new(crate::conn_limit::WARN_EVERY);
    tracing::debug!(limit = kind, "refused a WebSocket upgrade");
    if let Some(more) = WARNINGS.hit() {
        tracing::warn!(
            open = gw.ws_budget.open(),
            unauthenticated = gw.ws_budget.unauthenticated(),
            max_connections = gw.config.max_connections,
            max_unauthenticated_ws = gw.config.limits.max_unauthenticated_ws,
            events_since_last_warning = more,
            "WebSocket limit reached ({kind}): refusing upgrades with 503 (server.max_connections / server.max_unauthenticated_ws)"
        );
    }
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
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

/// `GET /metrics`: when `metrics_auth` is on (the default whenever an auth mode other than
/// `none` is configured) it needs the same credentials as `/rpc` and a `read`-level grant
/// (`read` or higher, `*`, or the scope `metrics`): no credential is `401`, a grant without
/// scopes `403`, each with the protocol's error body.
fn metrics(gw: &Gateway, headers: &HeaderMap) -> Response {
    if gw.config.metrics_auth {
        let token = auth::http_token(headers);
        let refusal =
            match gw
                .auth
                .authenticate_on("metrics", token.as_deref(), headers, now_secs())
            {
                Err(e) => Some(e),
                Ok(grant) if !auth::has_scope(&grant.scopes, "metrics") => {
                    Some(RpcError::new("FORBIDDEN", "Missing scope for metrics"))
                }
                Ok(_) => None,
            };
        if let Some(e) = refusal {
            return json_response(e.status(), json!({"error": e.to_json()}).to_string());
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
    let grant = match gw
        .auth
        .authenticate_async("http", token.as_deref(), &headers, now_secs())
        .await
    {
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
    let mut limits = crate::body::Limits::for_request(&gw.config, t0);
    if matches!(gw.auth, auth::AuthConfig::None) {
        // nobody has vouched for this client: its bytes come out of the anonymous budget
        limits = limits.with_budget(&gw.anonymous_rpc_bodies);
    }
    let bytes = match crate::body::read(&headers, body, limits).await {
        Ok(b) => b.bytes,
        Err(e) => {
            let rpc = e.to_rpc();
            body_refused(&gw, &e, &rpc);
            return e.respond(respond_err(&gw, &request_id, &rpc));
        }
    };
    let crate::request::Request { id, method, params } =
        match crate::request::parse_http(&bytes, &request_id) {
            Ok(r) => r,
            Err(r) => return respond_err(&gw, &r.id, &r.error),
        };
    gw.metrics.inc(
        "smithers_gateway_rpc_calls_total",
        &[
            ("method", methods::metric_label(&method)),
            ("transport", "http"),
        ],
    );
    if !auth::has_scope(&grant.scopes, &method) {
        let e = RpcError::new("FORBIDDEN", format!("Missing scope for {method}"));
        return respond_err(&gw, &id, &e);
    }
    let caller = Caller {
        grant: &grant,
        conn: None,
        answering: None,
    };
    let result = match method.as_str() {
        "connect" => Err(RpcError::new("METHOD_NOT_FOUND", "Unknown method: connect")),
        "streamDevTools" => Err(RpcError::new(
            "INVALID_REQUEST",
            "streamDevTools is only supported over websocket connections",
        )),
        m => methods::call(&gw, &caller, Transport::Http, m, &params).await,
    };
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    gw.metrics.observe(
        "smithers_gateway_rpc_duration_ms",
        &[
            ("method", methods::metric_label(&method)),
            ("transport", "http"),
        ],
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
                    ("method", methods::metric_label(&method)),
                    ("transport", "http"),
                ],
            );
            respond_err(&gw, &id, &e)
        }
    }
}

/// Counts and logs a `POST /rpc` body that was not read (a busy budget at most once a
/// [`crate::conn_limit::WARN_EVERY`] at `warn`; the rest at `debug`: each one only hurts its
/// own client).
fn body_refused(gw: &Gateway, e: &crate::body::BodyError, rpc: &RpcError) {
    gw.metrics.inc(
        "smithers_gateway_errors_total",
        &[
            ("code", &rpc.code),
            ("kind", e.reason()),
            ("transport", "http"),
        ],
    );
    static WARNINGS: crate::conn_limit::Throttle =
        crate::conn_limit::Throttle::new(crate::conn_limit::WARN_EVERY);
    tracing::debug!(reason = e.reason(), "refused a POST /rpc body");
    if *e == crate::body::BodyError::Busy
        && let Some(more) = WARNINGS.hit()
    {
        tracing::warn!(
            available_bytes = gw.anonymous_rpc_bodies.available(),
            max_anonymous_rpc_bytes = gw.config.limits.max_anonymous_rpc_bytes,
            events_since_last_warning = more,
            "anonymous POST /rpc bodies fill their byte budget: answering 503 (server.max_anonymous_rpc_bytes; or turn on auth)"
        );
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
