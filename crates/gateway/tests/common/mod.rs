//! Test harness: a real gateway on a free port with a temp SQLite file, a raw HTTP/1.1 client
//! and a WebSocket client.

#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use smithers_engine::{Engine, EngineConfig};
use smithers_gateway::auth::AuthConfig;
use smithers_gateway::gateway::{Gateway, Registered};
use smithers_gateway::metrics::Metrics;
use smithers_gateway::server_config::ServerConfig;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub addr: std::net::SocketAddr,
    pub gw: Arc<Gateway>,
    pub server: Option<smithers_gateway::serve::Server>,
}

pub struct Spec {
    pub workflows: Vec<(&'static str, String)>,
    pub auth: AuthConfig,
    pub config: ServerConfig,
    pub webhooks: HashMap<&'static str, smithers_gateway::webhook::WebhookConfig>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            workflows: vec![("hello", HELLO.to_string())],
            auth: AuthConfig::None,
            config: ServerConfig::default(),
            webhooks: HashMap::new(),
        }
    }
}

pub const HELLO: &str = "name: hello\nsteps:\n  - task: {id: a, value: {n: 1}}\n  - task: {id: b, value: \"{{ outputs.a.n + 1 }}\"}\n";
pub const GATED: &str = "name: gated\nsteps:\n  - task: {id: a, value: 1}\n  - approval: {id: gate, title: ok?}\n  - task: {id: b, value: 2}\n";
pub const WAITER: &str = "name: waiter\nsteps:\n  - wait_for_event: {id: ci, event: ci.done, correlation_id: \"{{ input.sha }}\"}\n  - task: {id: after, value: \"{{ outputs.ci.ok }}\"}\n";
pub const SLOW: &str = "name: slow\nsteps:\n  - task: {id: s, run: \"sleep 30\"}\n";

pub async fn start(spec: Spec) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, spec).await
}

pub async fn start_in(dir: tempfile::TempDir, spec: Spec) -> TestServer {
    let store = smithers_store::open(&format!(
        "sqlite://{}",
        dir.path().join("db.sqlite").display()
    ))
    .await
    .unwrap();
    let engine = Engine::new(
        store,
        EngineConfig {
            default_cwd: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    );
    let mut regs = Vec::new();
    for (key, src) in &spec.workflows {
        let wf = smithers_core::yaml::load_str(src, &format!("{key}.yaml"), dir.path()).unwrap();
        regs.push(Registered {
            key: key.to_string(),
            workflow: Arc::new(wf),
            schedule: None,
            webhook: spec.webhooks.get(key).cloned(),
        });
    }
    let gw = Gateway::new(
        engine,
        regs,
        spec.auth,
        spec.config,
        Arc::new(Metrics::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = smithers_gateway::serve::start(gw.clone(), listener)
        .await
        .unwrap();
    TestServer {
        addr: server.local_addr,
        dir,
        gw,
        server: Some(server),
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl HttpResponse {
    /// Asserts the answer to a body refused for a full byte budget: `503 SERVICE_UNAVAILABLE`,
    /// `Retry-After: 5`, and the connection closed (the rest of the body is never read).
    pub fn assert_busy(&self) {
        assert_eq!(self.status, 503, "{}", self.body);
        assert_eq!(
            self.json()["error"]["code"],
            "SERVICE_UNAVAILABLE",
            "{}",
            self.body
        );
        assert_eq!(
            self.headers.get("retry-after").map(String::as_str),
            Some("5")
        );
        assert_eq!(
            self.headers.get("connection").map(String::as_str),
            Some("close")
        );
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

pub async fn rpc(
    addr: std::net::SocketAddr,
    method: &str,
    params: Value,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let body = json!({"id": "t1", "method": method, "params": params}).to_string();
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    http(addr, "POST", "/rpc", &h, body.as_bytes()).await
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn ws(addr: std::net::SocketAddr) -> Ws {
    let (s, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .unwrap();
    s
}

/// Next JSON text frame (panics after 10 s).
pub async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s");
        match m {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(c))) => panic!("closed: {c:?}"),
            Some(Ok(_)) => continue,
            other => panic!("socket ended: {other:?}"),
        }
    }
}

pub async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

/// Sends a request and returns its response, collecting events seen meanwhile.
pub async fn call(
    ws: &mut Ws,
    id: &str,
    method: &str,
    params: Value,
    events: &mut Vec<Value>,
) -> Value {
    send(
        ws,
        json!({"type": "req", "id": id, "method": method, "params": params}),
    )
    .await;
    loop {
        let f = next(ws).await;
        if f["type"] == "res" && f["id"] == id {
            return f;
        }
        events.push(f);
    }
}

pub async fn connect(ws: &mut Ws, params: Value) -> Value {
    let challenge = next(ws).await;
    assert_eq!(challenge["event"], "connect.challenge");
    let mut evs = Vec::new();
    call(ws, "c", "connect", params, &mut evs).await
}

pub fn hello_params() -> Value {
    json!({"minProtocol": 1, "maxProtocol": 1, "client": {"id": "test", "version": "0", "platform": "rust"}})
}

/// Waits until the run reached a state (polls runs.get over HTTP).
pub async fn wait_status(addr: std::net::SocketAddr, run_id: &str, want: &str) -> Value {
    wait_status_auth(addr, run_id, want, &[]).await
}

/// [`wait_status`] with request headers (a token).
pub async fn wait_status_auth(
    addr: std::net::SocketAddr,
    run_id: &str,
    want: &str,
    headers: &[(&str, &str)],
) -> Value {
    for _ in 0..200 {
        let r = rpc(addr, "runs.get", json!({"runId": run_id}), headers).await;
        if r.status == 200 && r.json()["payload"]["status"] == want {
            return r.json()["payload"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run_id} never became {want}");
}

/// A WebSocket client with a small receive buffer, so what the kernel holds for a client that
/// stops reading does not depend on the machine's TCP autotuning.
pub async fn ws_small_receive_buffer(addr: std::net::SocketAddr) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (w, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/"),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    w
}

/// The value of one sample of `GET /metrics` (`name` or `name{labels}` exactly as rendered);
/// 0 when the sample is absent.
pub async fn metric(addr: std::net::SocketAddr, sample: &str) -> f64 {
    let text = http(addr, "GET", "/metrics", &[], b"").await.body;
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// This process's resident memory (VmRSS), in KiB, after handing the allocator's free pages
/// back to the system: what the process holds, not what glibc keeps cached from earlier work
/// (that part varies by tens of MiB from one run to the next after heavy traffic).
pub fn live_rss_kib() -> u64 {
    unsafe extern "C" {
        // glibc; the test targets are Linux
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        malloc_trim(0);
    }
    rss_kib()
}

/// This process's resident memory (VmRSS), in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// CPU time this process used so far (user + system), in clock ticks (usually 10 ms).
pub fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // fields after the parenthesized command name; utime and stime are fields 14 and 15
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
