//! Network limits under attack (issue 9, items 5, 6, 7 and 14): slow and idle sockets, floods
//! of idle connections, WebSocket upgrade bursts and anonymous WebSockets, oversized bodies and
//! malformed WebSocket frames. Every test speaks raw TCP or WebSocket to a real gateway.

mod common;

use common::*;
use serde_json::json;
use smithers_gateway::server_config::ServerConfig;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any test waits for something that must happen (a hang guard, not a speed check).
const GUARD: Duration = Duration::from_secs(20);

fn config(f: impl FnOnce(&mut ServerConfig)) -> Spec {
    let mut config = ServerConfig::default();
    f(&mut config);
    Spec {
        config,
        ..Default::default()
    }
}

/// Reads until the server closes the socket (EOF or reset); panics if it never does.
async fn wait_closed(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 4096];
    let r = tokio::time::timeout(GUARD, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(r.is_ok(), "{what}: the server never closed the connection");
}

/// Whether the server has closed the socket already (polls without waiting long).
async fn is_closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Reads one HTTP response head (and what came with it) from a keep-alive connection.
async fn read_head(s: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(GUARD, async {
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a response: {raw:?}");
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no response");
    String::from_utf8_lossy(&raw).into_owned()
}

async fn health_ok(addr: SocketAddr) {
    let r = tokio::time::timeout(GUARD, http(addr, "GET", "/health", &[], b""))
        .await
        .expect("/health did not answer");
    assert_eq!(r.status, 200, "/health: {}", r.body);
}

// ------------------------------------------------------------------------------------------
// item 5: timeouts

#[tokio::test]
async fn slowloris_request_head_is_cut_off_at_header_timeout() {
    let t = start(config(|c| c.limits.header_timeout_ms = 300)).await;
    // a socket that never sends anything
    let mut silent = TcpStream::connect(t.addr).await.unwrap();
    // a socket that trickles its head one byte at a time, never finishing it
    let mut trickle = TcpStream::connect(t.addr).await.unwrap();
    let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let started = std::time::Instant::now();
    let mut closed = false;
    for b in head.iter() {
        if trickle.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if started.elapsed() > GUARD {
            break;
        }
    }
    if !closed {
        wait_closed(&mut trickle, "trickling head").await;
    }
    wait_closed(&mut silent, "silent socket").await;
    // the gateway itself is fine
    health_ok(t.addr).await;
    let m = http(t.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        m.contains(r#"smithers_gateway_errors_total{code="HEADER_TIMEOUT",kind="timeout",transport="http"}"#),
        "{m}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let t = start(config(|c| {
        c.limits.header_timeout_ms = 200;
        c.limits.idle_timeout_ms = 3000;
    }))
    .await;
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    let req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    // idle for longer than the header timeout: idle time is not header time
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(req).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    // then, left idle, the connection is closed
    wait_closed(&mut s, "idle keep-alive connection").await;
}

#[tokio::test]
async fn websocket_that_never_connects_is_closed_with_1008() {
    let t = start(config(|c| c.limits.connect_timeout_ms = 300)).await;
    let mut authed = ws(t.addr).await;
    assert_eq!(connect(&mut authed, hello_params()).await["ok"], true);
    let mut anon = raw_ws(t.addr).await;
    let (code, reason) = close_frame(&mut anon).await.expect("no close frame");
    assert_eq!(code, 1008, "reason: {reason}");
    assert!(reason.contains("connect"), "{reason}");
    // the authenticated client is past the same deadline and still served
    let mut evs = Vec::new();
    let r = call(&mut authed, "h", "health", json!({}), &mut evs).await;
    assert_eq!(r["ok"], true, "{r}");
}

// ------------------------------------------------------------------------------------------
// item 7: WebSocket budgets

const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Sends `n` upgrade requests at once on `n` open sockets; returns the sockets and how many
/// got `101` and `503` (checking the 503's upstream body).
async fn upgrade_burst(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize, usize) {
    let mut socks = Vec::new();
    for _ in 0..n {
        socks.push(TcpStream::connect(addr).await.unwrap());
    }
    for s in &mut socks {
        s.write_all(UPGRADE).await.unwrap();
    }
    let (mut ok, mut full) = (0, 0);
    for s in &mut socks {
        let head = read_head(s).await;
        if head.starts_with("HTTP/1.1 101") {
            ok += 1;
        } else if head.starts_with("HTTP/1.1 503") {
            assert!(
                head.contains("Gateway connection limit reached\n"),
                "{head}"
            );
            full += 1;
        } else {
            panic!("unexpected answer: {head}");
        }
    }
    (socks, ok, full)
}

/// Waits until the server counts no open WebSocket.
async fn ws_all_closed(addr: SocketAddr) {
    for _ in 0..400 {
        let m = http(addr, "GET", "/metrics", &[], b"").await.body;
        if m.contains("smithers_gateway_connections_active{transport=\"ws\"} 0\n") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("WebSockets never released");
}

#[tokio::test]
async fn websocket_upgrade_burst_cannot_overshoot_max_connections() {
    let t = start(config(|c| {
        c.max_connections = 40;
        c.limits.max_unauthenticated_ws = 1000;
    }))
    .await;
    // N at once: all in
    let (socks, ok, full) = upgrade_burst(t.addr, 40).await;
    assert_eq!((ok, full), (40, 0));
    drop(socks);
    ws_all_closed(t.addr).await;
    // N + 1 at once: exactly N
    let (socks, ok, full) = upgrade_burst(t.addr, 41).await;
    assert_eq!((ok, full), (40, 1));
    drop(socks);
    ws_all_closed(t.addr).await;
    // 2N at once: still exactly N
    let (_socks, ok, full) = upgrade_burst(t.addr, 80).await;
    assert_eq!((ok, full), (40, 40));
}

#[tokio::test]
async fn anonymous_websockets_cannot_lock_out_authenticating_clients() {
    let t = start(config(|c| {
        c.max_connections = 100;
        c.limits.max_unauthenticated_ws = 4;
        c.limits.connect_timeout_ms = 60_000;
    }))
    .await;
    let mut anon = Vec::new();
    for _ in 0..3 {
        anon.push(raw_ws(t.addr).await);
    }
    // one unauthenticated place left: clients that complete connect keep passing through it
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = ws(t.addr).await;
        assert_eq!(connect(&mut c, hello_params()).await["ok"], true);
        clients.push(c);
    }
    anon.push(raw_ws(t.addr).await);
    // the unauthenticated share is full: the next anonymous upgrade is refused
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    s.write_all(UPGRADE).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    // and every authenticated client is still served
    for (i, c) in clients.iter_mut().enumerate() {
        let mut evs = Vec::new();
        let r = call(c, &format!("h{i}"), "health", json!({}), &mut evs).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let m = http(t.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        m.contains(
            r#"smithers_gateway_errors_total{kind="unauthenticated_limit",transport="ws"} 1"#
        ),
        "{m}"
    );
}

// ------------------------------------------------------------------------------------------
// item 6: the TCP connection cap

#[tokio::test]
async fn idle_socket_flood_evicts_idle_sockets_not_authenticated_clients() {
    let t = start(config(|c| {
        c.limits.max_tcp_connections = Some(32);
        c.limits.header_timeout_ms = 600_000;
        c.limits.idle_timeout_ms = 600_000;
    }))
    .await;
    let mut client = ws(t.addr).await;
    assert_eq!(connect(&mut client, hello_params()).await["ok"], true);
    // a WebSocket that never completes connect is as evictable as an idle socket
    let mut anon = raw_ws(t.addr).await;
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(TcpStream::connect(t.addr).await.unwrap());
    }
    // /health still answers (its socket displaced an idle one)
    health_ok(t.addr).await;
    // the oldest idle sockets were closed to make room; the newest are still open
    assert!(
        is_closed(&mut flood[0]).await,
        "oldest idle socket still open"
    );
    assert!(
        !is_closed(flood.last_mut().unwrap()).await,
        "newest idle socket closed"
    );
    let (code, reason) = close_frame(&mut anon).await.expect("no close frame");
    assert_eq!(code, 1013, "{reason}");
    assert!(
        t.gw.metrics.render().contains(
            r#"smithers_gateway_errors_total{kind="connection_evicted",transport="tcp"}"#
        )
    );
    // the authenticated client still receives events
    let r = rpc(t.addr, "runs.create", json!({"workflow": "hello"}), &[]).await;
    let run_id = r.json()["payload"]["runId"].as_str().unwrap().to_string();
    loop {
        let f = next(&mut client).await;
        if f["event"] == "run.completed" && f["payload"]["runId"] == run_id.as_str() {
            assert_eq!(f["payload"]["status"], "finished");
            break;
        }
    }
}

#[tokio::test]
async fn connection_cap_full_of_authenticated_clients_refuses_new_sockets() {
    let t = start(config(|c| {
        c.limits.max_tcp_connections = Some(20);
    }))
    .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = ws(t.addr).await;
        assert_eq!(connect(&mut c, hello_params()).await["ok"], true);
        clients.push(c);
    }
    // nothing can be evicted: the newcomer is told 503 and closed at once, before it sends
    let mut s = TcpStream::connect(t.addr).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(GUARD, s.read_to_end(&mut answer))
        .await
        .expect("a refused socket must be closed at once")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nGateway connection limit reached\n"),
        "{answer}"
    );
    // the authenticated clients are all still served
    for (i, c) in clients.iter_mut().enumerate() {
        let mut evs = Vec::new();
        let r = call(c, &format!("h{i}"), "health", json!({}), &mut evs).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    // one leaves: there is room again
    clients.pop();
    let mut tries = 0;
    loop {
        let r = http(t.addr, "GET", "/health", &[], b"").await;
        if r.status == 200 {
            break;
        }
        tries += 1;
        assert!(tries < 400, "no room after a client left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------------------------------
// item 14: an oversized body gets its 413; WebSocket close codes

#[tokio::test]
async fn oversized_body_written_before_reading_gets_413_not_reset() {
    let t = start(Spec::default()).await;
    let addr = t.addr;
    // like Python's http.client: the whole body is written before the response is read
    let outcomes = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let body = vec![b'x'; 4 * 1024 * 1024];
        let mut outcomes = Vec::new();
        for _ in 0..10 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(GUARD)).unwrap();
            let head = format!(
                "POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let wrote = s
                .write_all(head.as_bytes())
                .and_then(|_| s.write_all(&body));
            let mut answer = Vec::new();
            let read = s.read_to_end(&mut answer);
            outcomes.push(format!(
                "write {:?}, read {:?}: {}",
                wrote.map_err(|e| e.kind()),
                read.map_err(|e| e.kind()),
                String::from_utf8_lossy(&answer[..answer.len().min(40)])
            ));
        }
        outcomes
    })
    .await
    .unwrap();
    for o in &outcomes {
        assert!(
            o.starts_with("write Ok(()), read Ok(") && o.contains("HTTP/1.1 413"),
            "{outcomes:#?}"
        );
    }
    // each counted under its own reason
    let m = http(t.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        m.contains(
            r#"smithers_gateway_errors_total{code="PAYLOAD_TOO_LARGE",kind="too_large",transport="http"} 10"#
        ),
        "{m}"
    );
}

/// A WebSocket over a raw socket: handshake done, nothing else.
async fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(UPGRADE).await.unwrap();
    // read the head byte by byte so that no frame bytes are consumed with it
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(GUARD, s.read(&mut b))
            .await
            .expect("no upgrade answer")
            .unwrap();
        assert!(n == 1, "closed during the handshake");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// Writes one masked client frame (first byte given: FIN, RSV bits, opcode).
async fn send_frame(s: &mut TcpStream, first: u8, payload: &[u8]) {
    let mut f = vec![first];
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    // the server may close before reading it all; what it answered is what matters
    let _ = s.write_all(&f).await;
}

/// Reads server frames until a close frame; returns its code and reason (`None` if the socket
/// ended without one).
async fn close_frame(s: &mut TcpStream) -> Option<(u16, String)> {
    tokio::time::timeout(GUARD, async {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.ok()?;
            let mut len = (h[1] & 0x7f) as u64;
            if len == 126 {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.ok()?;
                len = u16::from_be_bytes(b) as u64;
            } else if len == 127 {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await.ok()?;
                len = u64::from_be_bytes(b);
            }
            let mut p = vec![0u8; len as usize];
            s.read_exact(&mut p).await.ok()?;
            if h[0] & 0x0f == 0x8 {
                let code = u16::from_be_bytes([*p.first()?, *p.get(1)?]);
                return Some((code, String::from_utf8_lossy(&p[2..]).into_owned()));
            }
        }
    })
    .await
    .expect("no close frame within the guard")
}

#[tokio::test]
async fn invalid_utf8_text_frame_is_closed_with_1007() {
    let t = start(Spec::default()).await;
    let mut s = raw_ws(t.addr).await;
    // FIN + text, bytes that are not UTF-8
    send_frame(&mut s, 0x81, &[b'{', 0xff, 0xfe, b'}']).await;
    let (code, reason) = close_frame(&mut s).await.expect("no close frame");
    assert_eq!(code, 1007, "{reason}");
}

#[tokio::test]
async fn websocket_protocol_violation_is_closed_with_1002() {
    let t = start(Spec::default()).await;
    let mut s = raw_ws(t.addr).await;
    // FIN + RSV1 (no extension was negotiated) + text
    send_frame(&mut s, 0xC1, b"{}").await;
    let (code, reason) = close_frame(&mut s).await.expect("no close frame");
    assert_eq!(code, 1002, "{reason}");
    // an unmasked client frame is a protocol error too
    let mut s = raw_ws(t.addr).await;
    s.write_all(&[0x81, 0x02, b'{', b'}']).await.unwrap();
    let (code, reason) = close_frame(&mut s).await.expect("no close frame");
    assert_eq!(code, 1002, "{reason}");
}

#[tokio::test]
async fn oversized_websocket_message_is_closed_with_1009() {
    let t = start(config(|c| c.max_body_bytes = 1024)).await;
    let mut s = raw_ws(t.addr).await;
    send_frame(&mut s, 0x81, &vec![b' '; 2048]).await;
    let (code, reason) = close_frame(&mut s).await.expect("no close frame");
    assert_eq!(code, 1009, "{reason}");
    // exactly at the limit is fine: answered, not closed
    let mut s = raw_ws(t.addr).await;
    let mut frame = json!({"type": "req", "id": "a", "method": "health", "params": {}}).to_string();
    frame.push_str(&" ".repeat(1024 - frame.len()));
    send_frame(&mut s, 0x81, frame.as_bytes()).await;
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    while !String::from_utf8_lossy(&got).contains("UNAUTHORIZED") {
        let n = tokio::time::timeout(GUARD, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
}

// ------------------------------------------------------------------------------------------
// `/rpc` bodies with auth `none` share a byte budget (`max_anonymous_rpc_bytes`)

/// A `health` request whose body is exactly `len` bytes.
fn health_body(len: usize) -> Vec<u8> {
    let head = r#"{"method":"health","params":{"pad":""#;
    let tail = r#""}}"#;
    let mut b = head.as_bytes().to_vec();
    b.extend(std::iter::repeat_n(b'x', len - head.len() - tail.len()));
    b.extend_from_slice(tail.as_bytes());
    assert_eq!(b.len(), len);
    b
}

#[tokio::test]
async fn anonymous_rpc_bodies_beyond_their_budget_are_refused_at_once() {
    let t = start(config(|c| {
        c.max_body_bytes = 4096;
        c.limits.max_anonymous_rpc_bytes = 1000;
    }))
    .await;
    let json = [("content-type", "application/json")];
    // exactly the budget: answered
    let r = http(t.addr, "POST", "/rpc", &json, &health_body(1000)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // one byte more: 503 at once, with Retry-After, and the connection closes
    let r = http(t.addr, "POST", "/rpc", &json, &health_body(1001)).await;
    r.assert_busy();
    let m = http(t.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        m.contains(
            r#"smithers_gateway_errors_total{code="SERVICE_UNAVAILABLE",kind="busy",transport="http"} 1"#
        ),
        "{m}"
    );
}

#[tokio::test]
async fn held_anonymous_rpc_bodies_make_others_wait_until_they_go() {
    let budget = 64 * 1024;
    let t = start(config(|c| {
        c.max_body_bytes = budget;
        c.limits.max_anonymous_rpc_bytes = budget;
    }))
    .await;
    // a client declares a whole budget's worth and sends all but one byte
    let mut holder = TcpStream::connect(t.addr).await.unwrap();
    let head = format!(
        "POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {budget}\r\n\r\n"
    );
    holder.write_all(head.as_bytes()).await.unwrap();
    holder.write_all(&vec![b'a'; budget - 1]).await.unwrap();
    // once the server holds those bytes, another request is refused at once (never waits)
    let json = [("content-type", "application/json")];
    let t0 = std::time::Instant::now();
    loop {
        let r = http(t.addr, "POST", "/rpc", &json, &health_body(200)).await;
        if r.status == 503 {
            assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("5"));
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            t0.elapsed() < GUARD,
            "the held bytes never filled the budget"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // it hangs up: its bytes go back, and the same request is answered
    drop(holder);
    let t0 = std::time::Instant::now();
    loop {
        let r = http(t.addr, "POST", "/rpc", &json, &health_body(200)).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(t0.elapsed() < GUARD, "the budget never came back");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn authenticated_rpc_bodies_do_not_use_the_anonymous_budget() {
    use smithers_gateway::auth::{AuthConfig, Grant};
    let mut tokens = std::collections::HashMap::new();
    tokens.insert(
        "tok".to_string(),
        Grant {
            role: "operator".into(),
            scopes: vec!["*".into()],
            user_id: Some("ann".into()),
        },
    );
    let mut spec = config(|c| {
        c.max_body_bytes = 4096;
        c.limits.max_anonymous_rpc_bytes = 100;
    });
    spec.auth = AuthConfig::Token { tokens };
    let t = start(spec).await;
    let headers = [
        ("content-type", "application/json"),
        ("authorization", "Bearer tok"),
    ];
    let r = http(t.addr, "POST", "/rpc", &headers, &health_body(3000)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["ok"], true, "{}", r.body);
}
