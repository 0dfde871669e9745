//! Webhooks on an open network (issue 9 items 5, 8, 9, 10): every test is an attack, over real
//! sockets against a real gateway, and is named after what it blocks.

mod common;

use common::*;
use serde_json::{Value, json};
use smithers_gateway::server_config::ServerConfig;
use smithers_gateway::webhook::{WebhookConfig, sign};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SIG: &str = "x-hub-signature-256";
const DELIVERY: &str = "x-github-delivery";

/// A run-only webhook for `hello` with secret `s3cret`.
fn hook() -> WebhookConfig {
    let mut t = toml::Table::new();
    t.insert("secret".into(), toml::Value::String("s3cret".into()));
    match WebhookConfig::from_toml(toml::Value::Table(t)) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn config(f: impl FnOnce(&mut ServerConfig)) -> ServerConfig {
    let mut c = ServerConfig::default();
    f(&mut c);
    c
}

async fn hello_server(config: ServerConfig) -> TestServer {
    let mut webhooks = HashMap::new();
    webhooks.insert("hello", hook());
    start(Spec {
        workflows: vec![("hello", HELLO.to_string())],
        webhooks,
        config,
        ..Default::default()
    })
    .await
}

/// Sends a correctly signed delivery to `/webhooks/hello`, with a delivery id when given.
async fn signed(addr: SocketAddr, body: &[u8], delivery: Option<&str>) -> HttpResponse {
    let sig = sign(&hook(), body);
    let mut headers = vec![(SIG, sig.as_str()), ("content-type", "application/json")];
    if let Some(id) = delivery {
        headers.push((DELIVERY, id));
    }
    tokio::time::timeout(
        Duration::from_secs(30),
        http(addr, "POST", "/webhooks/hello", &headers, body),
    )
    .await
    .unwrap_or_else(|_| panic!("a signed webhook got no answer within 30 s"))
}

/// Ids of every run of `hello`.
async fn hello_runs(addr: SocketAddr) -> Vec<String> {
    let r = rpc(addr, "runs.list", json!({"limit": 1000}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["payload"]
        .as_array()
        .map(|runs| {
            runs.iter()
                .filter_map(|run| run["runId"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn started(r: &HttpResponse) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    match r.json()["started"]["runId"].as_str() {
        Some(id) => id.to_string(),
        None => panic!("no run started: {}", r.body),
    }
}

// ---------------------------------------------------------------------------------------------
// Item 9: replay

#[tokio::test]
async fn replayed_signed_delivery_does_not_start_a_second_run() {
    let s = hello_server(ServerConfig::default()).await;
    let body = br#"{"action":"opened","n":1}"#;
    let first = signed(s.addr, body, Some("d-1")).await;
    let run = started(&first);
    assert_eq!(first.json().get("duplicate"), None, "{}", first.body);
    let again = signed(s.addr, body, Some("d-1")).await;
    assert_eq!(again.status, 200, "{}", again.body);
    let j = again.json();
    assert_eq!(j["duplicate"], true, "{}", again.body);
    assert_eq!(j["deliveryId"], "d-1");
    assert_eq!(
        (&j["ok"], &j["verified"], &j["workflow"]),
        (&json!(true), &json!(true), &json!("hello"))
    );
    assert_eq!(j["started"]["runId"], run.as_str(), "the original outcome");
    assert_eq!(hello_runs(s.addr).await, vec![run]);
    let m = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        m.contains(r#"smithers_gateway_messages_sent_total{frameType="response",outcome="duplicate",route="webhook",transport="http",workflow="hello"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn new_delivery_id_with_the_same_body_is_a_new_delivery() {
    let s = hello_server(ServerConfig::default()).await;
    let body = br#"{"same":"body"}"#;
    let a = started(&signed(s.addr, body, Some("d-a")).await);
    let b = started(&signed(s.addr, body, Some("d-b")).await);
    assert_ne!(a, b);
    let mut runs = hello_runs(s.addr).await;
    runs.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(runs, want);
}

#[tokio::test]
async fn replayed_body_without_delivery_id_is_recognised_by_its_hash() {
    let s = hello_server(ServerConfig::default()).await;
    let run = started(&signed(s.addr, br#"{"n":1}"#, None).await);
    let again = signed(s.addr, br#"{"n":1}"#, None).await;
    assert_eq!(again.json()["duplicate"], true, "{}", again.body);
    assert!(
        again.json()["deliveryId"]
            .as_str()
            .is_some_and(|id| id.starts_with("sha256:")),
        "{}",
        again.body
    );
    let other = started(&signed(s.addr, br#"{"n":2}"#, None).await);
    let mut runs = hello_runs(s.addr).await;
    runs.sort();
    let mut want = vec![run, other];
    want.sort();
    assert_eq!(runs, want);
}

#[tokio::test]
async fn replay_after_the_dedupe_window_acts_again() {
    let s = hello_server(config(|c| c.limits.webhook_dedupe_secs = 1)).await;
    let body = br#"{"late":true}"#;
    let first = started(&signed(s.addr, body, Some("late-1")).await);
    let t0 = std::time::Instant::now();
    let again = signed(s.addr, body, Some("late-1")).await;
    if t0.elapsed() < Duration::from_millis(900) {
        assert_eq!(again.json()["duplicate"], true, "{}", again.body);
    }
    // the window is one second: repeats are duplicates until it has passed, then act
    let mut second = None;
    for _ in 0..100 {
        let r = signed(s.addr, body, Some("late-1")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        if r.json().get("duplicate").is_none() {
            second = Some(started(&r));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = second.unwrap_or_else(|| panic!("the delivery was never acted on again"));
    assert_ne!(first, second);
    assert_eq!(hello_runs(s.addr).await.len(), 2);
}

#[tokio::test]
async fn concurrent_replays_start_exactly_one_run() {
    let s = hello_server(ServerConfig::default()).await;
    let body: &'static [u8] = br#"{"burst":true}"#;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let addr = s.addr;
            tokio::spawn(async move { signed(addr, body, Some("burst-1")).await })
        })
        .collect();
    let mut acted = Vec::new();
    let mut duplicates = 0;
    for t in tasks {
        let r = match t.await {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let j = r.json();
        match (r.status, j.get("duplicate")) {
            (200, None) => acted.push(started(&r)),
            (200, Some(_)) => duplicates += 1,
            // the first is still acting: the sender is told to retry, nothing happens
            (409, _) => {
                assert_eq!(j["error"]["code"], "DELIVERY_IN_PROGRESS", "{}", r.body);
                duplicates += 1;
            }
            _ => panic!("unexpected answer {}: {}", r.status, r.body),
        }
    }
    assert_eq!((acted.len(), duplicates), (1, 19));
    assert_eq!(hello_runs(s.addr).await, acted);
}

#[tokio::test]
async fn forged_delivery_cannot_claim_a_real_delivery_id() {
    let s = hello_server(ServerConfig::default()).await;
    let body = br#"{"real":true}"#;
    // an attacker without the secret sends the id first
    let forged = http(
        s.addr,
        "POST",
        "/webhooks/hello",
        &[
            (SIG, &format!("sha256={}", "0".repeat(64))),
            (DELIVERY, "real-1"),
        ],
        body,
    )
    .await;
    assert_eq!(forged.status, 401, "{}", forged.body);
    let real = signed(s.addr, body, Some("real-1")).await;
    started(&real);
    assert_eq!(real.json().get("duplicate"), None, "{}", real.body);
}

#[tokio::test]
async fn failed_delivery_is_not_remembered_as_done() {
    let s = hello_server(ServerConfig::default()).await;
    // a run input nested deeper than 32 containers: starting the run fails
    let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
    let body = format!(r#"{{"x":{deep}}}"#);
    for attempt in 0..2 {
        let r = signed(s.addr, body.as_bytes(), Some("fails-1")).await;
        assert_eq!(r.status, 400, "attempt {attempt}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "INVALID_INPUT", "{}", r.body);
    }
    assert!(hello_runs(s.addr).await.is_empty());
}

#[tokio::test]
async fn dedupe_window_zero_turns_replay_protection_off() {
    let s = hello_server(config(|c| c.limits.webhook_dedupe_secs = 0)).await;
    let a = started(&signed(s.addr, b"{}", Some("same")).await);
    let b = started(&signed(s.addr, b"{}", Some("same")).await);
    assert_ne!(a, b);
}

// ---------------------------------------------------------------------------------------------
// Item 10: metric label cardinality

#[tokio::test]
async fn random_webhook_keys_share_one_metric_series() {
    let s = hello_server(ServerConfig::default()).await;
    for i in 0..50 {
        let key = format!("k{}-{i}", uuid::Uuid::new_v4().simple());
        let r = http(s.addr, "POST", &format!("/webhooks/{key}"), &[], b"{}").await;
        assert_eq!(r.status, 404, "{}", r.body);
    }
    let m = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    let series = |family: &str, needle: &str| -> Vec<String> {
        m.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(needle))
            .map(str::to_string)
            .collect()
    };
    for (family, needle, want) in [
        (
            "smithers_gateway_webhooks_received_total",
            "",
            r#"smithers_gateway_webhooks_received_total{workflow="unknown"} 50"#,
        ),
        (
            "smithers_gateway_webhooks_rejected_total",
            "",
            r#"smithers_gateway_webhooks_rejected_total{reason="workflow_not_found",workflow="unknown"} 50"#,
        ),
        (
            "smithers_gateway_messages_received_total",
            r#"frameType="webhook""#,
            r#"smithers_gateway_messages_received_total{frameType="webhook",transport="http",workflow="unknown"} 50"#,
        ),
        (
            "smithers_gateway_messages_sent_total",
            r#"route="webhook""#,
            r#"smithers_gateway_messages_sent_total{frameType="response",outcome="error",route="webhook",transport="http",workflow="unknown"} 50"#,
        ),
        (
            "smithers_gateway_errors_total",
            r#"kind="webhook""#,
            r#"smithers_gateway_errors_total{code="NOT_FOUND",kind="webhook",workflow="unknown"} 50"#,
        ),
    ] {
        assert_eq!(series(family, needle), vec![want.to_string()], "{m}");
    }
}

// ---------------------------------------------------------------------------------------------
// Items 5 and 8: unverified bodies and the body timeout

/// A raw request head for `/webhooks/hello` declaring `len` body bytes (wrong signature: it is
/// never verified anyway).
fn attack_head(len: usize) -> String {
    format!(
        "POST /webhooks/hello HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n{SIG}: sha256={}\r\n\r\n",
        "0".repeat(64)
    )
}

fn status_of(raw: &str) -> u16 {
    raw.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn body_of(raw: &str) -> Value {
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"))
}

#[tokio::test]
async fn webhook_bodies_beyond_the_unverified_budget_are_refused_at_once() {
    let s = hello_server(config(|c| {
        c.max_body_bytes = 4096;
        c.limits.max_unverified_webhook_bytes = 1000;
    }))
    .await;
    // exactly the budget: fine
    let at = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1000 - 10));
    assert_eq!(at.len(), 1000);
    started(&signed(s.addr, at.as_bytes(), None).await);
    // one byte more than the budget: 503 at once, with Retry-After, and the connection closes
    let over = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1001 - 10));
    let r = signed(s.addr, over.as_bytes(), None).await;
    r.assert_busy();
    let m = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        m.contains(r#"smithers_gateway_webhooks_rejected_total{reason="busy",workflow="hello"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn held_unverified_bodies_make_signed_webhooks_wait_not_hang() {
    let budget = 64 * 1024;
    let s = hello_server(config(|c| {
        c.max_body_bytes = budget;
        c.limits.max_unverified_webhook_bytes = budget;
    }))
    .await;
    // an attacker declares a whole budget's worth and sends all but one byte
    let mut attacker = TcpStream::connect(s.addr).await.unwrap();
    attacker
        .write_all(attack_head(budget).as_bytes())
        .await
        .unwrap();
    attacker.write_all(&vec![b'a'; budget - 1]).await.unwrap();
    // once the server holds those bytes, a signed delivery is refused at once (never waits)
    let mut refused = None;
    for _ in 0..200 {
        let r = signed(s.addr, br#"{"legit":1}"#, None).await;
        if r.status == 503 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let refused = refused.unwrap_or_else(|| panic!("the held bytes never filled the budget"));
    assert_eq!(
        refused.headers.get("retry-after").map(String::as_str),
        Some("5")
    );
    // the attacker hangs up: its bytes go back, and the same delivery is acted on
    drop(attacker);
    let mut ok = false;
    for _ in 0..200 {
        let r = signed(s.addr, br#"{"legit":2}"#, None).await;
        if r.status == 200 {
            started(&r);
            ok = true;
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ok, "the budget never came back after the attacker hung up");
}

#[tokio::test]
async fn slow_webhook_body_is_cut_at_the_body_timeout() {
    let budget = 4096;
    let s = hello_server(config(|c| {
        c.max_body_bytes = budget;
        c.limits.max_unverified_webhook_bytes = budget;
        c.limits.body_timeout_ms = 1000;
    }))
    .await;
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(attack_head(budget).as_bytes())
        .await
        .unwrap();
    slow.write_all(&vec![b'a'; budget - 100]).await.unwrap();
    // one byte every 100 ms keeps any per-read timeout happy, never the body deadline
    let (mut rd, mut wr) = slow.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..99 {
            if wr.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // hold the socket open rather than finish
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut raw)).await;
    trickle.abort();
    assert!(read.is_ok(), "the slow body was never cut off");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    assert_eq!(status_of(&raw), 408, "{raw}");
    assert_eq!(body_of(&raw)["error"]["code"], "REQUEST_TIMEOUT", "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains("connection: close"),
        "{raw}"
    );
    // its bytes are back: a delivery of exactly the budget goes through
    let full = format!(r#"{{"pad":"{}"}}"#, "x".repeat(budget - 10));
    started(&signed(s.addr, full.as_bytes(), None).await);
}

#[tokio::test]
async fn slow_rpc_body_is_cut_at_the_body_timeout() {
    let s = hello_server(config(|c| c.limits.body_timeout_ms = 1000)).await;
    let frame = json!({"id": "slow", "method": "runs.list", "params": {}}).to_string();
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        frame.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = slow.into_split();
    let bytes = frame.into_bytes();
    let trickle = tokio::spawn(async move {
        // all but the last byte, one every 100 ms, then hold
        for b in &bytes[..bytes.len() - 1] {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut raw)).await;
    trickle.abort();
    assert!(read.is_ok(), "the slow body was never cut off");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    assert_eq!(status_of(&raw), 408, "{raw}");
    let j = body_of(&raw);
    assert_eq!(
        (&j["type"], &j["ok"], &j["error"]["code"]),
        (&json!("res"), &json!(false), &json!("REQUEST_TIMEOUT")),
        "{raw}"
    );
    // counted under its own reason
    let m = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        m.contains(
            r#"smithers_gateway_errors_total{code="REQUEST_TIMEOUT",kind="body_timeout",transport="http"} 1"#
        ),
        "{m}"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 8 at scale: 1,000 unfinished 1 MiB bodies against a gateway in its own process

const PROBE_ENV: &str = "SMITHERS_WEBHOOK_MEMORY_PROBE";
const MIB: usize = 1024 * 1024;

/// The gateway under attack in `unfinished_webhook_bodies_cannot_exhaust_memory`, run in a
/// child process (this test binary, this test only) so that its memory is measured alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the server half of unfinished_webhook_bodies_cannot_exhaust_memory, started by it"]
async fn memory_probe_server() {
    // the file to write the server's address to
    let Ok(addr_file) = std::env::var(PROBE_ENV) else {
        return;
    };
    let s = hello_server(ServerConfig::default()).await;
    let tmp = format!("{addr_file}.tmp");
    std::fs::write(&tmp, s.addr.to_string()).unwrap();
    std::fs::rename(&tmp, &addr_file).unwrap();
    // serve until the parent closes our stdin
    let _ = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut buf = [0u8; 64];
        while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
    })
    .await;
}

struct Probe {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Probe {
    fn start() -> Probe {
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let addr_file = dir.path().join("addr");
        let mut child = std::process::Command::new(exe)
            .args([
                "memory_probe_server",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(PROBE_ENV, &addr_file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut addr = None;
        for _ in 0..1200 {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                addr = Some(a.trim().parse().unwrap());
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the probe server exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let addr = addr.unwrap_or_else(|| panic!("the probe server did not start within 60 s"));
        Probe {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The child's resident memory, in MiB.
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_webhook_bodies_cannot_exhaust_memory() {
    let probe = Probe::start();
    let addr = probe.addr;
    // warm up what a first delivery allocates
    started(&signed(addr, br#"{"warm":1}"#, None).await);
    let baseline = probe.rss_mib();

    // 1,000 clients each declare 1 MiB (the largest allowed body), send all but one byte and
    // never finish; each then holds its socket until released
    const CLIENTS: usize = 1000;
    let body: Arc<Vec<u8>> = Arc::new(vec![b'a'; MIB - 1]);
    let head = Arc::new(attack_head(MIB));
    let refused = Arc::new(AtomicUsize::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (body, head, refused, mut released) = (
            body.clone(),
            head.clone(),
            refused.clone(),
            released.clone(),
        );
        clients.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                refused.fetch_add(1, Ordering::AcqRel);
                return;
            };
            let (mut rd, mut wr) = s.split();
            let write = async {
                let _ = wr.write_all(head.as_bytes()).await;
                let _ = wr.write_all(&body).await;
                std::future::pending::<()>().await
            };
            let mut answer = [0u8; 256];
            tokio::select! {
                // an answer or a close before the body is finished is a refusal
                r = rd.read(&mut answer) => {
                    if let Ok(n) = r
                        && n > 0
                    {
                        let text = String::from_utf8_lossy(&answer[..n]);
                        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
                    }
                    refused.fetch_add(1, Ordering::AcqRel);
                }
                _ = write => {}
                _ = released.wait_for(|r| *r) => {}
            }
        }));
    }
    // watch the server's memory while the flood runs, until every client not refused is one
    // the budget can hold: 32 MiB of budget holds at most 32 bodies of 1 MiB - 1 byte
    let max_held = 32;
    let mut peak = baseline;
    let mut settled = false;
    for _ in 0..1200 {
        peak = peak.max(probe.rss_mib());
        if CLIENTS - refused.load(Ordering::Acquire) <= max_held {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..20 {
        peak = peak.max(probe.rss_mib());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = CLIENTS - refused.load(Ordering::Acquire);
    eprintln!(
        "server RSS: baseline {baseline:.0} MiB, peak {peak:.0} MiB; {held} unfinished bodies held"
    );
    assert!(
        settled,
        "{held} unfinished bodies still held (at most {max_held} fit the budget)"
    );
    assert!(
        peak - baseline < 200.0,
        "1,000 unfinished 1 MiB bodies grew the server from {baseline:.0} to {peak:.0} MiB"
    );

    // a signed delivery is answered, not left hanging: 503 while the budget is full, 200 if not
    let r = signed(addr, br#"{"legit":1}"#, None).await;
    assert!(matches!(r.status, 200 | 503), "{} {}", r.status, r.body);
    // once the attackers hang up, the budget is back and signed deliveries go through
    let _ = release.send(true);
    for c in clients {
        let _ = c.await;
    }
    let mut ok = false;
    for _ in 0..200 {
        let r = signed(addr, br#"{"legit":2}"#, None).await;
        if r.status == 200 {
            ok = true;
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the budget never came back after the attackers hung up");
}
