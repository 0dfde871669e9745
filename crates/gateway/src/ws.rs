//! WebSocket connections: challenge, `connect` handshake, per-connection `seq`, heartbeat
//! ticks, request frames and broadcast delivery (gateway-protocol §1.4–§1.8).

use crate::auth::{self, Grant};
use crate::bounds;
use crate::error::RpcError;
use crate::frames;
use crate::gateway::{Caller, ConnShared, Gateway, Outbound, PROTOCOL};
use crate::rpc::{self, Transport};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};
use smithers_store::status;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Accepts the upgrade; the socket is served by [`serve`].
pub fn upgrade(gw: Arc<Gateway>, up: WebSocketUpgrade, headers: HeaderMap) -> Response {
    let limit = gw.config.max_body_bytes;
    // one byte over the limit is enough for the library to refuse a larger frame; we close with 1009
    up.max_message_size(limit + 1)
        .max_frame_size(limit + 1)
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .on_upgrade(move |socket| serve(gw, socket, headers))
}

async fn serve(gw: Arc<Gateway>, socket: WebSocket, headers: HeaderMap) {
    gw.open_sockets.fetch_add(1, Ordering::AcqRel);
    gw.metrics
        .inc("smithers_gateway_connections_total", &[("transport", "ws")]);
    gw.metrics.gauge_add(
        "smithers_gateway_connections_active",
        &[("transport", "ws")],
        1.0,
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = gw.register_conn(tx.clone());
    let (sink, mut stream) = futures_split(socket);
    let writer = tokio::spawn(write_loop(sink, rx));
    let _ = tx.send(Outbound::Event {
        event: "connect.challenge",
        payload: Arc::new(
            json!({"nonce": uuid::Uuid::new_v4().to_string(), "ts": smithers_engine::now_ms()}),
        ),
        state_version: gw.state_version(),
    });
    let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
    let mut reason = "close";
    loop {
        let msg = match stream.recv().await {
            Some(Ok(m)) => m,
            Some(Err(_)) => {
                // most often a message over the size limit
                let _ = tx.send(Outbound::Close(1009, "message too big"));
                reason = "error";
                break;
            }
            None => break,
        };
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if text.len() > gw.config.max_body_bytes {
            let _ = tx.send(Outbound::Close(1009, "message too big"));
            break;
        }
        gw.metrics.inc(
            "smithers_gateway_messages_received_total",
            &[("frameType", "request"), ("transport", "ws")],
        );
        if let Some(hb) = handle_frame(&gw, &conn, &headers, &text).await
            && let Some(old) = heartbeat.replace(hb)
        {
            old.abort();
        }
    }
    if let Some(hb) = heartbeat {
        hb.abort();
    }
    gw.unregister_conn(conn.id);
    drop(tx);
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    gw.open_sockets.fetch_sub(1, Ordering::AcqRel);
    gw.metrics.gauge_add(
        "smithers_gateway_connections_active",
        &[("transport", "ws")],
        -1.0,
    );
    gw.metrics.inc(
        "smithers_gateway_connections_closed_total",
        &[("reason", reason), ("transport", "ws")],
    );
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// Splits the socket into a sink and a receiver of inbound messages.
fn futures_split(socket: WebSocket) -> (Sink, mpsc::Receiver<Result<Message, axum::Error>>) {
    use futures_util::StreamExt;
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(m) = stream.next().await {
            let stop = m.is_err();
            if tx.send(m).await.is_err() || stop {
                break;
            }
        }
    });
    (sink, rx)
}

async fn write_loop(mut sink: Sink, mut rx: mpsc::UnboundedReceiver<Outbound>) {
    use futures_util::SinkExt;
    let mut seq: u64 = 0;
    while let Some(out) = rx.recv().await {
        let text = match out {
            Outbound::Response(v) => v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string()),
            Outbound::Event {
                event,
                payload,
                state_version,
            } => {
                seq += 1;
                frames::event(event, &payload, seq, state_version)
            }
            Outbound::NamedEvent {
                event,
                payload,
                state_version,
            } => {
                seq += 1;
                frames::event(&event, &payload, seq, state_version)
            }
            Outbound::Close(code, why) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: why.into(),
                    })))
                    .await;
                break;
            }
        };
        if sink.send(Message::Text(text.into())).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

fn respond(conn: &ConnShared, gw: &Gateway, text: String, ok: bool) {
    gw.metrics.inc(
        "smithers_gateway_messages_sent_total",
        &[
            ("frameType", "response"),
            ("outcome", if ok { "ok" } else { "error" }),
            ("transport", "ws"),
        ],
    );
    let _ = conn.tx.send(Outbound::Response(Value::String(text)));
}

/// Handles one inbound frame. Returns a new heartbeat task after a successful `connect`.
async fn handle_frame(
    gw: &Arc<Gateway>,
    conn: &Arc<ConnShared>,
    headers: &HeaderMap,
    text: &str,
) -> Option<tokio::task::JoinHandle<()>> {
    let fail = |id: &str, e: RpcError| {
        gw.metrics.inc(
            "smithers_gateway_errors_total",
            &[("code", &e.code), ("kind", "frame"), ("transport", "ws")],
        );
        respond(conn, gw, frames::err(id, &e), false);
    };
    let frame: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => {
            fail(
                "invalid",
                RpcError::new("INVALID_INPUT", "Gateway RPC payload must be valid JSON."),
            );
            return None;
        }
    };
    // echo the frame's own id whenever it has a usable one (DESIGN §5)
    let own_id = frame
        .get("id")
        .and_then(Value::as_str)
        .filter(|i| i.chars().count() <= 128)
        .map(str::to_string);
    let eid = own_id.clone().unwrap_or_else(|| "invalid".to_string());
    if let Err(e) = bounds::check_frame_bounds(&frame) {
        fail(&eid, e);
        return None;
    }
    if !frame.is_object() || frame.get("type").and_then(Value::as_str) != Some("req") {
        fail(
            &eid,
            RpcError::new("INVALID_INPUT", "Gateway frame must be a request object."),
        );
        return None;
    }
    let id = match bounds::check_frame_id(frame.get("id")) {
        Ok(id) => id,
        Err(e) => {
            fail("invalid", e);
            return None;
        }
    };
    let method = match bounds::check_method(frame.get("method")) {
        Ok(m) => m,
        Err(e) => {
            fail(&id, e);
            return None;
        }
    };
    let params = frame.get("params").cloned().unwrap_or(Value::Null);
    gw.metrics.inc(
        "smithers_gateway_rpc_calls_total",
        &[("method", &method), ("transport", "ws")],
    );
    let t0 = Instant::now();
    if method == "connect" {
        let (result, hb) = connect(gw, conn, headers, &params).await;
        finish(gw, conn, &id, &method, t0, result);
        return hb;
    }
    let grant = match conn.grant.read().ok().and_then(|g| g.clone()) {
        Some(g) if conn.authed.load(Ordering::Acquire) => g,
        _ => {
            finish(
                gw,
                conn,
                &id,
                &method,
                t0,
                Err(RpcError::new("UNAUTHORIZED", "Connect first")),
            );
            return None;
        }
    };
    let result = if !auth::has_scope(&grant.scopes, &method) {
        Err(RpcError::new(
            "FORBIDDEN",
            format!("Missing scope for {method}"),
        ))
    } else {
        let caller = Caller {
            grant: &grant,
            conn: Some(conn),
        };
        rpc::call(gw, &caller, Transport::Ws, &method, &params).await
    };
    finish(gw, conn, &id, &method, t0, result);
    None
}

fn finish(
    gw: &Gateway,
    conn: &ConnShared,
    id: &str,
    method: &str,
    t0: Instant,
    result: Result<Value, RpcError>,
) {
    gw.metrics.observe(
        "smithers_gateway_rpc_duration_ms",
        &[("method", method), ("transport", "ws")],
        t0.elapsed().as_secs_f64() * 1000.0,
    );
    match result {
        Ok(p) => respond(conn, gw, frames::ok(id, Some(&p)), true),
        Err(e) => {
            gw.metrics.inc(
                "smithers_gateway_errors_total",
                &[
                    ("code", &e.code),
                    ("kind", "rpc"),
                    ("method", method),
                    ("transport", "ws"),
                ],
            );
            respond(conn, gw, frames::err(id, &e), false)
        }
    }
}

async fn connect(
    gw: &Arc<Gateway>,
    conn: &Arc<ConnShared>,
    headers: &HeaderMap,
    params: &Value,
) -> (Result<Value, RpcError>, Option<tokio::task::JoinHandle<()>>) {
    if !params.is_object() {
        return (
            Err(RpcError::new(
                "INVALID_REQUEST",
                "Connect params must be an object",
            )),
            None,
        );
    }
    let (min, max) = (params.get("minProtocol"), params.get("maxProtocol"));
    if !min.is_some_and(Value::is_number) || !max.is_some_and(Value::is_number) {
        return (
            Err(RpcError::new(
                "INVALID_REQUEST",
                "Connect request is missing protocol negotiation fields",
            )),
            None,
        );
    }
    let min = match bounds::positive_int(min, "minProtocol") {
        Ok(v) => v.unwrap_or(0),
        Err(e) => return (Err(e), None),
    };
    let max = match bounds::positive_int(max, "maxProtocol") {
        Ok(v) => v.unwrap_or(0),
        Err(e) => return (Err(e), None),
    };
    if min > PROTOCOL || max < PROTOCOL {
        return (
            Err(RpcError::new(
                "PROTOCOL_UNSUPPORTED",
                format!("Gateway protocol {PROTOCOL} is not supported by the client"),
            )),
            None,
        );
    }
    let token = params
        .get("auth")
        .and_then(|a| a.get("token"))
        .and_then(Value::as_str);
    let mode = gw.auth.mode_name();
    let grant: Grant = match gw
        .auth
        .authenticate(token, headers, crate::http::now_secs())
    {
        Ok(g) => {
            gw.metrics.inc(
                "smithers_gateway_auth_events_total",
                &[("mode", mode), ("outcome", "success"), ("transport", "ws")],
            );
            g
        }
        Err(e) => {
            gw.metrics.inc(
                "smithers_gateway_auth_events_total",
                &[("mode", mode), ("outcome", "failure"), ("transport", "ws")],
            );
            return (Err(e), None);
        }
    };
    let filter: Option<HashSet<String>> =
        params.get("subscribe").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        });
    if let Ok(mut g) = conn.grant.write() {
        *g = Some(grant.clone());
    }
    if let Ok(mut f) = conn.filter.write() {
        *f = filter;
    }
    let snapshot = match hello_snapshot(gw).await {
        Ok(s) => s,
        Err(e) => return (Err(e), None),
    };
    conn.authed.store(true, Ordering::Release);
    let hello = json!({
        "protocol": PROTOCOL,
        "features": gw.config.features,
        "policy": {"heartbeatMs": gw.config.heartbeat_ms},
        "auth": {"sessionToken": uuid::Uuid::new_v4().to_string(), "role": grant.role, "scopes": grant.scopes, "userId": grant.user_id},
        "snapshot": snapshot,
    });
    let hb = {
        let gw = gw.clone();
        let tx = conn.tx.clone();
        let every = Duration::from_millis(gw.config.heartbeat_ms.max(10));
        tokio::spawn(async move {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                t.tick().await;
                let ev = Outbound::Event {
                    event: "tick",
                    payload: Arc::new(json!({"ts": smithers_engine::now_ms()})),
                    state_version: gw.state_version(),
                };
                if tx.send(ev).is_err() {
                    return;
                }
                gw.metrics
                    .inc("smithers_gateway_heartbeat_ticks_total", &[]);
            }
        })
    };
    (Ok(hello), Some(hb))
}

/// Active runs (never the finished ones: each status is read through its index) and pending
/// approvals.
async fn hello_snapshot(gw: &Arc<Gateway>) -> Result<Value, RpcError> {
    let mut runs = Vec::new();
    for st in [
        status::RUNNING,
        status::WAITING_APPROVAL,
        status::WAITING_EVENT,
        status::WAITING_TIMER,
    ] {
        for r in gw.store.list_runs(Some(st), 1000).await? {
            if r.status == st {
                runs.push(r);
            }
        }
    }
    runs.sort_by_key(|r| std::cmp::Reverse(r.created_at_ms));
    runs.truncate(1000);
    let runs: Vec<Value> = runs
        .iter()
        .map(|r| crate::shapes::run_json(r, gw.key_of(r)))
        .collect();
    let approvals = rpc::call(
        gw,
        &Caller {
            grant: &Grant {
                role: "admin".into(),
                scopes: vec!["*".into()],
                user_id: None,
            },
            conn: None,
        },
        Transport::Ws,
        "approvals.list",
        &json!({}),
    )
    .await?;
    Ok(json!({"runs": runs, "approvals": approvals, "stateVersion": gw.state_version()}))
}
