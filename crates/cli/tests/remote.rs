//! Remote mode: the `smithers` binary with `--url` against a real gateway started in-process on
//! a free port.

use serde_json::{Value, json};
use smithers_engine::{Engine, EngineConfig};
use smithers_gateway::auth::{AuthConfig, Grant};
use smithers_gateway::gateway::{Gateway, Registered};
use smithers_gateway::metrics::Metrics;
use smithers_gateway::server_config::ServerConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HELLO: &str = "name: hello\nsteps:\n  - task: {id: a, value: {n: 1}}\n  - task: {id: b, value: \"{{ outputs.a.n + 1 }}\"}\n";
const GATED: &str = "name: gated\nsteps:\n  - task: {id: a, value: 1}\n  - approval: {id: gate, title: ok?}\n  - task: {id: b, value: 2}\n";
const PICK: &str = "name: pick\nsteps:\n  - approval: {id: choose, title: which?, mode: select, options: [{key: x, label: X}, {key: y, label: Y}]}\n";
const WAITER: &str = "name: waiter\nsteps:\n  - wait_for_event: {id: ci, event: ci.done, correlation_id: \"{{ input.sha }}\"}\n  - task: {id: after, value: \"{{ outputs.ci.ok }}\"}\n";
const SLOW: &str = "name: slow\nsteps:\n  - task: {id: s, run: \"sleep 30\"}\n";

struct Server {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    _server: smithers_gateway::serve::Server,
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn start(auth: AuthConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
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
    for (key, src) in [
        ("hello", HELLO),
        ("gated", GATED),
        ("pick", PICK),
        ("waiter", WAITER),
        ("slow", SLOW),
    ] {
        let wf = smithers_core::yaml::load_str(src, &format!("{key}.yaml"), dir.path()).unwrap();
        regs.push(Registered {
            key: key.to_string(),
            workflow: Arc::new(wf),
            schedule: None,
            webhook: None,
        });
    }
    let gw = Gateway::new(
        engine,
        regs,
        auth,
        ServerConfig::default(),
        Arc::new(Metrics::new()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = smithers_gateway::serve::start(gw, listener).await.unwrap();
    Server {
        addr: server.local_addr,
        _dir: dir,
        _server: server,
    }
}

fn token_auth() -> AuthConfig {
    let mut tokens = HashMap::new();
    tokens.insert(
        "op-secret".to_string(),
        Grant {
            role: "operator".into(),
            scopes: vec!["*".into()],
            user_id: Some("ann".into()),
        },
    );
    tokens.insert(
        "read-secret".to_string(),
        Grant {
            role: "operator".into(),
            scopes: vec!["read".into()],
            user_id: Some("rita".into()),
        },
    );
    AuthConfig::Token { tokens }
}

/// A raw RPC call (test setup and checks), with an optional bearer token.
async fn rpc(addr: SocketAddr, method: &str, params: Value, token: Option<&str>) -> Value {
    let body = json!({"id": "t", "method": method, "params": params}).to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /rpc HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap()
}

async fn create(s: &Server, workflow: &str, input: Value, token: Option<&str>) -> String {
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": workflow, "input": input}),
        token,
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    r["payload"]["runId"].as_str().unwrap().to_string()
}

async fn wait_status(s: &Server, run_id: &str, want: &str, token: Option<&str>) {
    let mut last = Value::Null;
    for _ in 0..200 {
        last = rpc(s.addr, "runs.get", json!({"runId": run_id}), token).await;
        if last["payload"]["status"] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run_id} never became {want}: {last}");
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the CLI with `args` (and `SMITHERS_TOKEN` = `env_token` when given) in a scratch
/// directory, so a stray local database would be noticed.
async fn cli(args: &[&str], env_token: Option<&str>) -> Out {
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_smithers"));
    cmd.args(args)
        .current_dir(cwd.path())
        .env_remove("SMITHERS_TOKEN");
    if let Some(t) = env_token {
        cmd.env("SMITHERS_TOKEN", t);
    }
    let o = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the CLI hung")
        .unwrap();
    assert!(
        !cwd.path().join(".smithers").exists(),
        "remote mode touched a local database: {args:?}"
    );
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Asserts a one-line `error[CODE]: …` and exit 1.
fn assert_error(o: &Out, code: &str) {
    assert_eq!(o.code, 1, "stdout: {}\nstderr: {}", o.stdout, o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "stderr: {}", o.stderr);
    assert!(
        o.stderr.starts_with(&format!("error[{code}]: ")),
        "stderr: {}",
        o.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ps_inspect_frames() {
    let s = start(AuthConfig::None).await;
    let url = s.url();
    let id = create(&s, "hello", json!({}), None).await;
    wait_status(&s, &id, "finished", None).await;

    let o = cli(&["ps", "--url", &url], None).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mut lines = o.stdout.lines();
    assert!(lines.next().unwrap().starts_with("RUN ID"), "{}", o.stdout);
    let row = lines.next().unwrap();
    assert!(
        row.starts_with(&id) && row.contains("hello") && row.contains("finished"),
        "{row}"
    );
    let o = cli(&["ps", "--url", &url, "--status", "running"], None).await;
    assert_eq!((o.code, o.stdout.as_str()), (0, ""));
    assert_eq!(o.stderr.trim(), "no runs");
    let o = cli(&["ps", "--url", &url, "--status", "bogus"], None).await;
    assert_error(&o, "INVALID_INPUT");

    let o = cli(&["inspect", &id, "--url", &url], None).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.starts_with(&format!("run       {id}\n")),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("status    finished"), "{}", o.stdout);
    assert!(o.stdout.contains("nodes: finished 2"), "{}", o.stdout);
    assert!(
        o.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("a ") && l.contains("attempts 1")),
        "{}",
        o.stdout
    );

    let o = cli(&["inspect", &id, "--json", "--url", &url], None).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let doc: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(doc["run"]["runId"], id.as_str());
    assert_eq!(doc["run"]["status"], "finished");
    assert_eq!(doc["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(doc["attempts"][0]["runId"], id.as_str());
    assert_eq!(doc["approvals"], json!([]));

    let o = cli(&["inspect", "no-such-run", "--url", &url], None).await;
    assert_error(&o, "RUN_NOT_FOUND");

    let o = cli(&["frames", &id, "--url", &url], None).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mut lines = o.stdout.lines();
    assert!(lines.next().unwrap().trim_start().starts_with("FRAME"));
    let first: i64 = lines
        .next()
        .expect("at least one frame")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let o = cli(
        &["frames", &id, "--frame", &first.to_string(), "--url", &url],
        None,
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let f: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(f["frameNo"], first);
    assert!(f["tree"].is_object(), "{f}");
    let o = cli(&["frames", &id, "--frame", "9999", "--url", &url], None).await;
    assert_error(&o, "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_and_deny_with_tokens() {
    let s = start(token_auth()).await;
    let url = s.url();
    let op = Some("op-secret");
    let a = create(&s, "gated", json!({}), op).await;
    let b = create(&s, "gated", json!({}), op).await;
    wait_status(&s, &a, "waiting-approval", op).await;
    wait_status(&s, &b, "waiting-approval", op).await;

    // no token, wrong token, read-only token
    let o = cli(&["approve", &a, "--node", "gate", "--url", &url], None).await;
    assert_error(&o, "UNAUTHORIZED");
    let o = cli(
        &[
            "approve", &a, "--node", "gate", "--url", &url, "--token", "nope",
        ],
        None,
    )
    .await;
    assert_error(&o, "UNAUTHORIZED");
    assert!(!o.stderr.contains("nope"));
    let o = cli(
        &["approve", &a, "--node", "gate", "--url", &url],
        Some("read-secret"),
    )
    .await;
    assert_error(&o, "FORBIDDEN");
    assert!(!o.stderr.contains("read-secret"));

    // a read-only token can look
    let o = cli(&["inspect", &a, "--url", &url], Some("read-secret")).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("status    waiting-approval"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("\napprovals:\n"), "{}", o.stdout);
    assert!(o.stdout.contains("requested: ok?"), "{}", o.stdout);
    let o = cli(
        &["inspect", &a, "--json", "--url", &url],
        Some("read-secret"),
    )
    .await;
    let doc: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(doc["approvals"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(doc["approvals"][0]["nodeId"], "gate");
    assert_eq!(doc["approvals"][0]["status"], "requested");

    // right token: --token, then SMITHERS_TOKEN
    let o = cli(
        &[
            "approve",
            &a,
            "--node",
            "gate",
            "--note",
            "lgtm",
            "--url",
            &url,
            "--token",
            "op-secret",
        ],
        None,
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("approved `gate`"), "{}", o.stderr);
    assert!(!o.stderr.contains("op-secret") && !o.stdout.contains("op-secret"));
    wait_status(&s, &a, "finished", op).await;

    let o = cli(&["deny", &b, "--node", "gate", "--url", &url], op).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("denied `gate`"), "{}", o.stderr);
    let r = rpc(s.addr, "runs.get", json!({"runId": b}), op).await;
    assert_ne!(r["payload"]["status"], "waiting-approval", "{r}");

    // deciding again: the gateway's code
    let o = cli(&["approve", &a, "--node", "gate", "--url", &url], op).await;
    assert_eq!(o.code, 1);
    assert!(o.stderr.starts_with("error["), "{}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);

    // select approvals send the decision
    let p = create(&s, "pick", json!({}), op).await;
    wait_status(&s, &p, "waiting-approval", op).await;
    let o = cli(&["approve", &p, "--node", "choose", "--url", &url], op).await;
    assert_error(&o, "INVALID_INPUT");
    let o = cli(
        &[
            "approve", &p, "--node", "choose", "--select", "y", "--url", &url,
        ],
        op,
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    wait_status(&s, &p, "finished", op).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_wakes_a_waiting_run() {
    let s = start(AuthConfig::None).await;
    let url = s.url();
    let id = create(&s, "waiter", json!({"sha": "abc"}), None).await;
    wait_status(&s, &id, "waiting-event", None).await;
    let o = cli(
        &[
            "signal",
            &id,
            "ci.done",
            "--data",
            r#"{"ok": true}"#,
            "--correlation-id",
            "abc",
            "--url",
            &url,
        ],
        None,
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let line: Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(line["runId"], id.as_str());
    assert_eq!(line["signalName"], "ci.done");
    assert_eq!(line["correlationId"], "abc");
    assert!(
        line["seq"].is_i64() && line["receivedAtMs"].is_i64(),
        "{line}"
    );
    wait_status(&s, &id, "finished", None).await;

    let o = cli(
        &["signal", &id, "x", "--data", "{not json", "--url", &url],
        None,
    )
    .await;
    assert_error(&o, "INVALID_INPUT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_run() {
    let s = start(AuthConfig::None).await;
    let url = s.url();
    let id = create(&s, "slow", json!({}), None).await;
    wait_status(&s, &id, "running", None).await;
    let o = cli(&["cancel", &id, "--url", &url], None).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains(&format!("run {id}")), "{}", o.stderr);
    wait_status(&s, &id, "cancelled", None).await;
    let o = cli(&["cancel", &id, "--url", &url], None).await;
    assert_error(&o, "RUN_NOT_ACTIVE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_and_fork_on_the_gateway() {
    let s = start(token_auth()).await;
    let url = s.url();
    let id = create(&s, "hello", json!({"x": 1}), Some("op-secret")).await;
    wait_status(&s, &id, "finished", Some("op-secret")).await;
    // without --yes the gateway refuses (ConfirmationRequired)
    let o = cli(
        &["rewind", &id, "--frame", "1", "--url", &url],
        Some("op-secret"),
    )
    .await;
    assert_error(&o, "CONFIRMATION_REQUIRED");
    // only the owner (ann) or an admin may rewind
    let o = cli(
        &["rewind", &id, "--frame", "1", "--yes", "--url", &url],
        Some("read-secret"),
    )
    .await;
    assert_error(&o, "FORBIDDEN");
    let o = cli(
        &["rewind", &id, "--frame", "1", "--yes", "--url", &url],
        Some("op-secret"),
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r: Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(
        (r["ok"].clone(), r["newFrameNo"].clone()),
        (json!(true), json!(1))
    );
    assert!(o.stderr.contains("back at frame 1"), "{}", o.stderr);
    wait_status(&s, &id, "finished", Some("op-secret")).await;

    let o = cli(
        &[
            "fork",
            &id,
            "--frame",
            "1",
            "--input",
            r#"{"x": 2}"#,
            "--new-run-id",
            "forked-1",
            "--url",
            &url,
        ],
        Some("op-secret"),
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r: Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(
        (r["runId"].as_str(), r["parentRunId"].as_str()),
        (Some("forked-1"), Some(id.as_str()))
    );
    wait_status(&s, "forked-1", "finished", Some("op-secret")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_asks_the_gateway() {
    let s = start(AuthConfig::None).await;
    let url = s.url();
    let id = create(&s, "slow", json!({}), None).await;
    wait_status(&s, &id, "running", None).await;
    // the task is still running: its attempt has no diff yet
    let o = cli(&["diff", &id, "--node", "s", "--url", &url], None).await;
    assert_error(&o, "ATTEMPT_NOT_FINISHED");
    let o = cli(&["diff", &id, "--node", "nope", "--url", &url], None).await;
    assert_error(&o, "NODE_NOT_FOUND");
    let _ = rpc(s.addr, "runs.cancel", json!({"runId": id}), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_addresses() {
    // nothing listening
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let o = cli(&["ps", "--url", &url], None).await;
    assert_error(&o, "GATEWAY_UNREACHABLE");
    assert!(o.stderr.contains("connection refused"), "{}", o.stderr);

    let o = cli(&["ps", "--url", "https://127.0.0.1:7331"], None).await;
    assert_error(&o, "INVALID_URL");
    assert!(o.stderr.contains("TLS"), "{}", o.stderr);
    let o = cli(&["cancel", "r", "--url", "127.0.0.1:7331"], None).await;
    assert_error(&o, "INVALID_URL");

    // --url with --db
    let o = cli(&["ps", "--url", &url, "--db", "sqlite://x.db"], None).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("cannot be used with"), "{}", o.stderr);
    // --token without --url
    let o = cli(&["ps", "--token", "t"], None).await;
    assert_ne!(o.code, 0);

    // something that is not a gateway
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf).await;
            let _ = c
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                .await;
        }
    });
    let o = cli(&["ps", "--url", &format!("http://{addr}")], None).await;
    assert_error(&o, "GATEWAY_UNREACHABLE");
    assert!(o.stderr.contains("not JSON"), "{}", o.stderr);

    // a gateway, but the URL has a path below which there is no /rpc
    let s = start(AuthConfig::None).await;
    let o = cli(&["ps", "--url", &format!("{}/nope", s.url())], None).await;
    assert_error(&o, "NOT_FOUND");
}
