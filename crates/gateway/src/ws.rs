//! WebSocket connections: challenge, `connect` handshake, per-connection `seq`, heartbeat
//! ticks, request frames and broadcast delivery (gateway-protocol §1.4–§1.8).

use crate::auth::{self, Grant};
use crate::bounds;
use crate::error::RpcError;
use crate::frames;
use crate::gateway::{Caller, ConnShared, Gateway, Outbound, PROTOCOL};
use crate::log_rate::LogRate;
use crate::methods::{self, Transport};
use crate::metrics::names;
use crate::outbound;
use crate::ws_budget::WsSlot;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};
use smithers_store::status;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Accepts the upgrade (its place in the WebSocket budgets already reserved); the socket is
/// served by [`serve`].
pub fn upgrade(
    gw: Arc<Gateway>,
    up: WebSocketUpgrade,
    headers: HeaderMap,
    slot: WsSlot,
) -> Response {
    let limit = gw.config.max_body_bytes;
    // one byte over the limit is enough for the library to refuse a larger frame; we close with 1009
    up.max_message_size(limit + 1)
        .max_frame_size(limit + 1)
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .on_upgrade(move |socket| serve(gw, socket, owned_headers(&headers), slot))
}

/// A copy of the upgrade request's headers that owns its bytes. Header values parsed by hyper
/// share the connection's whole read buffer (16 KiB); keeping the originals for the life of the
/// socket (they are needed for authentication at `connect`) would keep that buffer too.
fn owned_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let Ok(v) = axum::http::HeaderValue::from_bytes(value.as_bytes()) {
            out.append(name.clone(), v);
        }
    }
    out
}

async fn serve(gw: Arc<Gateway>, socket: WebSocket, headers: HeaderMap, mut slot: WsSlot) {
    let peer: Option<SocketAddr> = slot.tcp().map(|t| t.peer());
    gw.metrics
        .inc("smithers_gateway_connections_total", &[("transport", "ws")]);
    gw.metrics.gauge_add(
        "smithers_gateway_connections_active",
        &[("transport", "ws")],
        1.0,
    );
    let limits = &gw.config.limits;
    let (queue, rx) = outbound::queue(limits.max_outbound_frames, limits.max_outbound_bytes);
    let conn = gw.register_conn(queue, peer);
    let (sink, mut stream) = socket.split();
    let mut writer = tokio::spawn(write_loop(sink, rx, Writer::new(&gw, &conn)));
    let mut writer_done = false;
    let _ = conn.out.push(event(
        "connect.challenge",
        &json!({"nonce": uuid::Uuid::new_v4().to_string(), "ts": smithers_engine::now_ms()}),
        gw.state_version(),
    ));
    let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
    let mut reason = "close";
    let connect_by = tokio::time::sleep(Duration::from_millis(gw.config.limits.connect_timeout_ms));
    tokio::pin!(connect_by);
    let tcp = slot.tcp().cloned();
    let evicted = async {
        match &tcp {
            Some(t) => t.evicted().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(evicted);
    // requests being answered: each runs on this connection's task, and the socket is not read
    // while `MAX_IN_FLIGHT` are, or while their frames hold `max_body_bytes` (so one connection
    // holds at most about two frames' worth, as when it was answered one request at a time).
    // Declared after everything they borrow, so dropped first.
    let mut in_flight: FuturesUnordered<Handling<'_>> = FuturesUnordered::new();
    let mut in_flight_bytes = 0usize;
    let (gw_ref, conn_ref, headers_ref) = (&gw, &conn, &headers);
    loop {
        let next = tokio::select! {
            // in this order: a request just taken gets going (its first poll) before the next
            // frame is read
            biased;
            Some((hb, bytes)) = in_flight.next(), if !in_flight.is_empty() => {
                in_flight_bytes -= bytes;
                if let Some(hb) = hb
                    && let Some(old) = heartbeat.replace(hb)
                {
                    old.abort();
                }
                continue;
            }
            _ = &mut connect_by, if !slot.authenticated() => {
                gw.metrics.inc(
                    "smithers_gateway_errors_total",
                    &[("code", "CONNECT_TIMEOUT"), ("kind", "timeout"), ("transport", "ws")],
                );
                tracing::debug!(peer = ?peer, "closed a WebSocket that did not complete connect in time");
                conn.out.close(1008, "connect not completed in time");
                reason = "timeout";
                break;
            }
            // only unauthenticated sockets are ever evicted (to make room at the TCP cap)
            _ = &mut evicted => {
                conn.out.close(1013, "server at connection capacity");
                reason = "evicted";
                break;
            }
            // the writer gave up on a client too slow to read (or the socket broke)
            end = &mut writer => {
                writer_done = true;
                if matches!(end, Ok(Some(_))) {
                    reason = "slow_consumer";
                }
                break;
            }
            // last: a client that keeps sending cannot hold off the branches above
            m = stream.next(), if in_flight.len() < MAX_IN_FLIGHT
                && in_flight_bytes < gw.config.max_body_bytes => m,
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                if let Some((code, why)) = read_error_close(e) {
                    conn.out.close(code, why);
                }
                gw.metrics.inc(
                    "smithers_gateway_errors_total",
                    &[("kind", "socket"), ("transport", "ws")],
                );
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
            conn.out.close(1009, "message too big");
            break;
        }
        gw.metrics.inc(
            "smithers_gateway_messages_received_total",
            &[("frameType", "request"), ("transport", "ws")],
        );
        let req = match crate::request::parse_ws(&text) {
            Ok(r) => r,
            Err(r) => {
                frame_failed(&gw, &conn, &r.id, r.error);
                continue;
            }
        };
        // `connect` changes the connection's grant: it is never answered beside other requests
        let alone = req.method == "connect" || !conn.authed.load(Ordering::Acquire);
        // boxed: the request future is large and only lives while a frame is handled, whereas
        // this task lives as long as the (mostly idle) connection
        let bytes = text.len();
        drop(text);
        let handling: Handling<'_> = Box::pin(async move {
            let hb = handle_request(gw_ref, conn_ref, headers_ref, req).await;
            (hb, bytes)
        });
        if !alone {
            in_flight_bytes += bytes;
            in_flight.push(handling);
            continue;
        }
        // `connect`, and anything before it, is answered alone and in order: the requests in
        // flight finish first, and nothing more is read until it is done
        while let Some((hb, bytes)) = in_flight.next().await {
            in_flight_bytes -= bytes;
            if let Some(hb) = hb
                && let Some(old) = heartbeat.replace(hb)
            {
                old.abort();
            }
        }
        if let (Some(hb), _) = handling.await
            && let Some(old) = heartbeat.replace(hb)
        {
            old.abort();
        }
        if !slot.authenticated() && conn.authed.load(Ordering::Acquire) {
            slot.promote();
        }
    }
    // requests already taken are finished, as if the socket were still open: one cut short
    // could leave work half done (a run stored but never driven); their answers go nowhere
    while let Some((hb, _)) = in_flight.next().await {
        if let Some(hb) = hb {
            hb.abort();
        }
    }
    drop(in_flight);
    if let Some(hb) = heartbeat {
        hb.abort();
    }
    gw.unregister_conn(conn.id);
    gw.streams.close_conn(conn.id);
    drop(conn);
    if !writer_done {
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    }
    // the socket (and its places in the budgets) is released when the writer ends
    drop(slot);
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

/// The close frame owed to a client whose frame could not be read (RFC 6455 §7.4.1); `None`
/// when the connection itself is gone.
fn read_error_close(e: axum::Error) -> Option<(u16, &'static str)> {
    use tungstenite::error::{Error as E, ProtocolError};
    let e = e.into_inner().downcast::<E>().ok()?;
    match *e {
        E::Capacity(_) => Some((1009, "message too big")),
        E::Utf8(_) => Some((1007, "invalid UTF-8 in a text message")),
        E::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        E::Protocol(_) | E::AttackAttempt => Some((1002, "protocol error")),
        _ => None,
    }
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// Most frames written before one flush: what queued up while the socket was busy goes out in
/// a few large writes instead of one system call per frame, without letting one busy connection
/// hold its worker for long.
const WRITE_BATCH: usize = 64;

/// Longest wait for a close frame to reach a client being disconnected; then the TCP
/// connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Slow-consumer disconnects logged at most once a second (a client can provoke them).
static SLOW_LOG: LogRate = LogRate::new(1000);

/// What a writer needs besides its socket and queue.
struct Writer {
    gw: Arc<Gateway>,
    conn_id: u64,
    peer: Option<SocketAddr>,
    timeout: Duration,
}

impl Writer {
    fn new(gw: &Arc<Gateway>, conn: &ConnShared) -> Writer {
        Writer {
            gw: gw.clone(),
            conn_id: conn.id,
            peer: conn.peer,
            timeout: Duration::from_millis(gw.config.limits.write_timeout_ms.max(1)),
        }
    }

    /// Counts and logs a client disconnected as too slow.
    fn too_slow(&self, why: Slow, rx: &outbound::Receiver) {
        let reason = match why {
            Slow::QueueFull => "queue_full",
            Slow::WriteTimeout => "write_timeout",
        };
        self.gw.metrics.inc(
            names::SLOW_CONSUMER_DISCONNECTS_TOTAL,
            &[("reason", reason)],
        );
        if let Some(left_out) = SLOW_LOG.allow() {
            let (frames, bytes) = rx.queued();
            let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
            tracing::warn!(
                conn = self.conn_id,
                peer = %peer,
                reason,
                queued_frames = frames,
                queued_bytes = bytes,
                max_frames = self.gw.config.limits.max_outbound_frames,
                max_bytes = self.gw.config.limits.max_outbound_bytes,
                write_timeout_ms = self.gw.config.limits.write_timeout_ms,
                similar_left_out = left_out,
                "WebSocket client disconnected: too slow to read its events (close 1008)"
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slow {
    QueueFull,
    WriteTimeout,
}

/// Why a socket operation of the writer did not complete.
enum Stop {
    /// The socket is gone.
    Gone,
    Slow(Slow),
}

/// Runs one socket operation with the write timeout, ending early when the queue overflows.
/// When the socket is ready at once (the usual case) no timer is armed.
async fn bounded<E>(
    op: impl std::future::Future<Output = Result<(), E>>,
    rx: &outbound::Receiver,
    limit: Duration,
) -> Result<(), Stop> {
    let mut op = std::pin::pin!(op);
    if let std::task::Poll::Ready(r) =
        std::future::poll_fn(|cx| std::task::Poll::Ready(op.as_mut().poll(cx))).await
    {
        return r.map_err(|_| Stop::Gone);
    }
    tokio::select! {
        r = &mut op => r.map_err(|_| Stop::Gone),
        _ = tokio::time::sleep(limit) => Err(Stop::Slow(Slow::WriteTimeout)),
        _ = rx.kicked() => Err(Stop::Slow(Slow::QueueFull)),
    }
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Writes queued frames to the socket, giving each event its per-connection `seq`. A client
/// that falls behind by more than the queue holds, or that leaves one write waiting past the
/// write timeout, is sent close code 1008 (if the socket still takes it within
/// [`CLOSE_GRACE`]) and dropped; the writer then returns why.
async fn write_loop(mut sink: Sink, mut rx: outbound::Receiver, w: Writer) -> Option<Slow> {
    use futures_util::SinkExt;
    let mut seq: u64 = 0;
    let stop = 'outer: loop {
        let Some(first) = rx.recv().await else {
            break None;
        };
        let mut next = Some(first);
        let mut written = 0;
        while let Some(out) = next.take() {
            if rx.overflowed() {
                break 'outer Some(Stop::Slow(Slow::QueueFull));
            }
            let cost = out.cost();
            let text = match out {
                Outbound::Response(s) => s,
                Outbound::Event {
                    event,
                    payload_json,
                    state_version,
                } => {
                    seq += 1;
                    frames::event_json(event, &payload_json, seq, state_version)
                }
                Outbound::Close(code, why) => {
                    let _ = bounded(sink.send(close_frame(code, why)), &rx, w.timeout).await;
                    break 'outer None;
                }
            };
            if let Err(e) = bounded(sink.feed(Message::Text(text.into())), &rx, w.timeout).await {
                break 'outer Some(e);
            }
            rx.written(cost);
            written += 1;
            if written < WRITE_BATCH {
                next = rx.try_recv();
            }
        }
        if let Err(e) = bounded(sink.flush(), &rx, w.timeout).await {
            break Some(e);
        }
    };
    let slow = match stop {
        Some(Stop::Slow(why)) => Some(why),
        _ => None,
    };
    if let Some(why) = slow {
        w.too_slow(why, &rx);
        // what is queued will never be sent: free it now
        rx.discard();
        let (code, reason) = match why {
            Slow::QueueFull => outbound::OVERFLOW_CLOSE,
            Slow::WriteTimeout => outbound::STALLED_CLOSE,
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(close_frame(code, reason))).await;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
    slow
}

/// An event frame with a payload serialized here.
fn event(name: &'static str, payload: &Value, state_version: u64) -> Outbound {
    Outbound::Event {
        event: name,
        payload_json: smithers_core::json::text(payload).into(),
        state_version,
    }
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
    // a client that sends requests and never reads the answers fills its queue like any other
    let _ = conn.out.push(Outbound::Response(text));
}

/// A request frame being answered; it yields the heartbeat task a successful `connect` starts,
/// and the frame's size.
type Handling<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Option<tokio::task::JoinHandle<()>>, usize)> + Send + 'a>,
>;

/// Most requests of one connection answered at a time. Responses carry the request's id and
/// may come in any order; past this many (or past `max_body_bytes` of request frames), the
/// connection's next frames wait unread, so a client that floods requests slows only itself.
pub const MAX_IN_FLIGHT: usize = 32;

/// Answers a frame that is not a valid request.
fn frame_failed(gw: &Gateway, conn: &ConnShared, id: &str, e: RpcError) {
    gw.metrics.inc(
        "smithers_gateway_errors_total",
        &[("code", &e.code), ("kind", "frame"), ("transport", "ws")],
    );
    respond(conn, gw, frames::err(id, &e), false);
}

/// Answers one request. Returns a new heartbeat task after a successful `connect`.
async fn handle_request(
    gw: &Arc<Gateway>,
    conn: &Arc<ConnShared>,
    headers: &HeaderMap,
    req: crate::request::Request,
) -> Option<tokio::task::JoinHandle<()>> {
    let (id, method, params) = (req.id, req.method, req.params);
    gw.metrics.inc(
        "smithers_gateway_rpc_calls_total",
        &[
            ("method", methods::metric_label(&method)),
            ("transport", "ws"),
        ],
    );
    let t0 = Instant::now();
    if method == "connect" {
        let (result, hb) = connect(gw, conn, headers, &params).await;
        let ok = result.is_ok();
        finish(gw, conn, &id, &method, t0, result);
        if ok {
            crate::replay::run(gw, conn).await;
        }
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
    // runs this request starts: their events follow its response (ConnShared::answered)
    let answering = std::sync::Mutex::new(Vec::new());
    let result = if !auth::has_scope(&grant.scopes, &method) {
        Err(RpcError::new(
            "FORBIDDEN",
            format!("Missing scope for {method}"),
        ))
    } else {
        let caller = Caller {
            grant: &grant,
            conn: Some(conn),
            answering: Some(&answering),
        };
        methods::call(gw, &caller, Transport::Ws, &method, &params).await
    };
    finish(gw, conn, &id, &method, t0, result);
    conn.answered(&answering.into_inner().unwrap_or_default());
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
        &[
            ("method", methods::metric_label(method)),
            ("transport", "ws"),
        ],
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
                    ("method", methods::metric_label(method)),
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
        .authenticate_async("ws", token, headers, crate::clock::now_secs())
        .await
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
    let replay = match crate::replay::after_seq(params) {
        Ok(r) => r,
        Err(e) => return (Err(e), None),
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
    if let Ok(mut v) = conn.view.write() {
        v.runs = filter;
    }
    let snapshot = match gw.hello_snapshots.get(|| hello_snapshot(gw)).await {
        Ok(s) => s,
        Err(e) => return (Err(e), None),
    };
    // before any broadcast reaches the connection, so live events of replayed runs wait
    crate::replay::open_gates(conn, replay);
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
        let conn = conn.clone();
        let every = Duration::from_millis(gw.config.heartbeat_ms.max(10));
        tokio::spawn(async move {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                t.tick().await;
                let ev = event(
                    "tick",
                    &json!({"ts": smithers_engine::now_ms()}),
                    gw.state_version(),
                );
                if conn.out.push(ev).is_err() {
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
    let approvals = methods::pending_approvals(gw).await?;
    Ok(json!({"runs": runs, "approvals": approvals, "stateVersion": gw.state_version()}))
}
