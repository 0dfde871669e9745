//! The gateway over real sockets: routes, RPC over HTTP and WebSocket, the handshake,
//! events, approvals, signals, cancellation, limits and restarts.

mod common;

use common::*;
use serde_json::{Value, json};
use smithers_gateway::auth::{AuthConfig, Grant};
use smithers_gateway::server_config::ServerConfig;
use std::collections::HashMap;
use std::time::Duration;

fn token_auth() -> AuthConfig {
    let mut tokens = HashMap::new();
    tokens.insert(
        "admin-token".to_string(),
        Grant {
            role: "admin".into(),
            scopes: vec!["*".into()],
            user_id: Some("ann".into()),
        },
    );
    tokens.insert(
        "reader".to_string(),
        Grant {
            role: "operator".into(),
            scopes: vec!["read".into()],
            user_id: Some("rita".into()),
        },
    );
    AuthConfig::Token { tokens }
}

#[tokio::test]
async fn routes_and_headers() {
    let s = start(Spec::default()).await;
    let r = http(s.addr, "GET", "/health", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"ok": true, "protocol": 1, "features": ["streaming", "runs"], "stateVersion": 0})
    );
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    for (m, p) in [
        ("GET", "/health?x=1"),
        ("POST", "/health"),
        ("GET", "/rpc"),
        ("GET", "/nope"),
        ("POST", "/rpc?x"),
    ] {
        let r = http(s.addr, m, p, &[], b"").await;
        assert_eq!(r.status, 404, "{m} {p}");
        assert_eq!(
            r.json(),
            json!({"error": {"code": "NOT_FOUND", "message": "Route not found"}})
        );
    }
    let m = http(s.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    assert!(m.body.contains("smithers_gateway_rpc_calls_total"));
}

#[tokio::test]
async fn http_rpc_frame_errors_echo_the_request_id() {
    let s = start(Spec::default()).await;
    let bad = http(
        s.addr,
        "POST",
        "/rpc",
        &[("x-request-id", "req-9")],
        b"{not json",
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["id"], "req-9");
    assert_eq!(
        bad.json()["error"]["message"],
        "Gateway RPC payload must be valid JSON."
    );
    let arr = http(s.addr, "POST", "/rpc", &[], b"[1]").await;
    assert_eq!(
        (arr.status, arr.json()["error"]["code"].clone()),
        (400, json!("INVALID_REQUEST"))
    );
    let m = http(
        s.addr,
        "POST",
        "/rpc",
        &[],
        br#"{"id":"mine","method":"Runs.list"}"#,
    )
    .await;
    assert_eq!(m.status, 400);
    assert_eq!(
        m.json()["id"],
        "mine",
        "the body's id is echoed (DESIGN §5)"
    );
    assert_eq!(
        m.json()["error"]["message"],
        "Gateway method name is invalid."
    );
    let unknown = rpc(s.addr, "no.such", json!({}), &[]).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.json()["error"],
        json!({"code": "METHOD_NOT_FOUND", "message": "Unknown method: no.such"})
    );
    let health = rpc(s.addr, "health", json!({}), &[]).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["ok"], true);
    assert_eq!(health.json()["id"], "t1");
    // body over the limit: 413 PAYLOAD_TOO_LARGE (DESIGN §5)
    let big = vec![b' '; 1_048_577];
    let r = http(s.addr, "POST", "/rpc", &[], &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "PAYLOAD_TOO_LARGE");
    // exactly at the limit is read (and then fails as JSON, not as size)
    let mut at = vec![b' '; 1_048_576 - 2];
    at.extend_from_slice(b"{}");
    let r = http(s.addr, "POST", "/rpc", &[], &at).await;
    assert_eq!(
        r.json()["error"]["message"],
        "Gateway method name must be a string."
    );
}

#[tokio::test]
async fn token_auth_and_scopes() {
    let s = start(Spec {
        auth: token_auth(),
        ..Default::default()
    })
    .await;
    let r = rpc(s.addr, "health", json!({}), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json()["error"],
        json!({"code": "UNAUTHORIZED", "message": "A bearer token is required"})
    );
    let r = rpc(
        s.addr,
        "health",
        json!({}),
        &[("authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (401, json!("Invalid token"))
    );
    let r = rpc(s.addr, "health", json!({}), &[("x-smithers-key", "reader")]).await;
    assert_eq!(r.status, 200);
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello"}),
        &[("authorization", "Bearer reader")],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["error"],
        json!({"code": "FORBIDDEN", "message": "Missing scope for runs.create"})
    );
    // an unknown method needs read, and is checked after the scope
    let r = rpc(
        s.addr,
        "config.reload",
        json!({}),
        &[("authorization", "Bearer reader")],
    )
    .await;
    assert_eq!(r.status, 403);
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello"}),
        &[("authorization", "Bearer admin-token")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn runs_over_http() {
    let s = start(Spec::default()).await;
    let r = rpc(s.addr, "runs.create", json!({"workflow": "nope"}), &[]).await;
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (404, json!("Unknown workflow: nope"))
    );
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "input": [1]}),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (400, json!("input must be a JSON object"))
    );
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "input": {"x": 1}}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["payload"]["runId"].as_str().unwrap().to_string();
    assert_eq!(r.json()["payload"]["workflow"], "hello");
    let run = wait_status(s.addr, &id, "finished").await;
    assert_eq!(run["workflowKey"], "hello");
    assert_eq!(run["input"], json!({"x": 1}), "runs.get carries the input");
    let nodes: Vec<(String, String)> = run["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["nodeId"].as_str().unwrap().to_string(),
                n["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        vec![
            ("a".into(), "finished".into()),
            ("b".into(), "finished".into())
        ],
        "runs.get carries each node's state"
    );
    assert_eq!(run["summary"]["finished"], 2);
    assert_eq!(run["runState"]["state"], "succeeded");
    let list = rpc(s.addr, "runs.list", json!({"limit": "10"}), &[])
        .await
        .json();
    assert_eq!(list["payload"][0]["runId"], id.as_str());
    let bad = rpc(s.addr, "runs.list", json!({"limit": 0}), &[]).await;
    assert_eq!(
        bad.json()["error"]["message"],
        "limit must be a finite number greater than 0."
    );
    let frames = rpc(
        s.addr,
        "frames.list",
        json!({"runId": id, "afterFrameNo": 0}),
        &[],
    )
    .await
    .json();
    let frames = frames["payload"].as_array().unwrap().clone();
    assert!(!frames.is_empty());
    assert!(
        frames[0]["frameNo"].as_i64() > frames[frames.len() - 1]["frameNo"].as_i64(),
        "newest first"
    );
    let tree: Value = serde_json::from_str(frames[0]["xmlJson"].as_str().unwrap()).unwrap();
    assert_eq!(tree["tag"], "smithers:workflow");
    assert_eq!(tree["props"]["name"], "hello");
    assert_eq!(tree["children"][0]["tag"], "smithers:sequence");
    // an addition: each frame says which nodes changed state since the frame before it
    let oldest = &frames[frames.len() - 1];
    assert_eq!(oldest["frameNo"], 1);
    assert!(
        oldest["nodeChanges"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["from"].is_null()),
        "frame 1 only adds nodes: {oldest}"
    );
    let mut finished: Vec<&str> = frames
        .iter()
        .flat_map(|f| f["nodeChanges"].as_array().unwrap())
        .filter(|c| c["to"] == "finished")
        .map(|c| c["nodeId"].as_str().unwrap())
        .collect();
    finished.sort();
    assert_eq!(finished, ["a", "b"], "{frames:?}");
    let f1 = rpc(
        s.addr,
        "frames.get",
        json!({"runId": id, "frameNo": 1}),
        &[],
    )
    .await
    .json();
    assert_eq!(f1["payload"]["frameNo"], 1);
    let f0 = rpc(
        s.addr,
        "frames.get",
        json!({"runId": id, "frameNo": 0}),
        &[],
    )
    .await;
    assert_eq!(
        f0.status, 404,
        "frame 0 is accepted and is before the first frame"
    );
    let atts = rpc(s.addr, "attempts.list", json!({"runId": id}), &[])
        .await
        .json();
    assert_eq!(atts["payload"].as_array().unwrap().len(), 2);
    let a = rpc(
        s.addr,
        "attempts.get",
        json!({"runId": id, "nodeId": "b", "iteration": 0, "attempt": 1}),
        &[],
    )
    .await
    .json();
    assert_eq!(a["payload"]["state"], "finished");
    assert_eq!(a["payload"]["cached"], false);
    let miss = rpc(
        s.addr,
        "attempts.get",
        json!({"runId": id, "nodeId": "b", "iteration": 0}),
        &[],
    )
    .await;
    assert_eq!(
        miss.json()["error"]["message"],
        "runId, nodeId, iteration, and attempt are required"
    );
    let rerun = rpc(
        s.addr,
        "runs.rerun",
        json!({"runId": id, "newRunId": "again-1"}),
        &[],
    )
    .await
    .json();
    assert_eq!(rerun["payload"]["runId"], "again-1");
    wait_status(s.addr, "again-1", "finished").await;
    let gone = rpc(s.addr, "runs.get", json!({"runId": "zzz"}), &[]).await;
    assert_eq!(
        (gone.status, gone.json()["error"]["message"].clone()),
        (404, json!("Run not found: zzz"))
    );
    let done = rpc(s.addr, "runs.cancel", json!({"runId": id}), &[]).await;
    assert_eq!(
        (done.status, done.json()["error"]["code"].clone()),
        (409, json!("RUN_NOT_ACTIVE"))
    );
}

#[tokio::test]
async fn websocket_handshake_events_and_exactly_one_completion() {
    let s = start(Spec::default()).await;
    let mut w = ws(s.addr).await;
    let challenge = next(&mut w).await;
    assert_eq!(challenge["event"], "connect.challenge");
    assert_eq!(challenge["seq"], 1);
    let mut evs = Vec::new();
    let early = call(&mut w, "x", "health", json!({}), &mut evs).await;
    assert_eq!(
        early["error"],
        json!({"code": "UNAUTHORIZED", "message": "Connect first"})
    );
    let bad = call(
        &mut w,
        "p",
        "connect",
        json!({"minProtocol": 2, "maxProtocol": 3}),
        &mut evs,
    )
    .await;
    assert_eq!(bad["error"]["code"], "PROTOCOL_UNSUPPORTED");
    // `client` is optional (DESIGN §5)
    let hello = call(
        &mut w,
        "c",
        "connect",
        json!({"minProtocol": 1, "maxProtocol": 1}),
        &mut evs,
    )
    .await;
    assert_eq!(hello["ok"], true, "{hello}");
    let p = &hello["payload"];
    assert_eq!(p["protocol"], 1);
    assert_eq!(p["policy"]["heartbeatMs"], 15000);
    assert_eq!(p["auth"]["role"], "operator");
    assert!(p["snapshot"]["runs"].is_array());
    let created = call(
        &mut w,
        "r",
        "runs.create",
        json!({"workflow": "hello"}),
        &mut evs,
    )
    .await;
    let run_id = created["payload"]["runId"].as_str().unwrap().to_string();
    let mut completions = 0;
    let mut seqs = vec![];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut names = vec![];
    while tokio::time::Instant::now() < deadline {
        let f = match tokio::time::timeout(Duration::from_millis(500), next(&mut w)).await {
            Ok(f) => f,
            Err(_) => break,
        };
        if f["type"] == "event" {
            seqs.push(f["seq"].as_u64().unwrap());
            names.push(f["event"].as_str().unwrap().to_string());
            if f["event"] == "run.completed" {
                assert_eq!(
                    (
                        f["payload"]["runId"].as_str(),
                        f["payload"]["status"].as_str()
                    ),
                    (Some(run_id.as_str()), Some("finished"))
                );
                assert!(f["payload"]["eventSeq"].is_i64());
                completions += 1;
            }
        }
    }
    for e in &evs {
        if e["type"] == "event" {
            names.push(e["event"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(completions, 1, "run.completed exactly once: {names:?}");
    assert!(
        names.iter().any(|n| n == "node.started") && names.iter().any(|n| n == "node.finished"),
        "{names:?}"
    );
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "per-connection seq has no gaps");
    }
}

#[tokio::test]
async fn approvals_over_the_protocol() {
    let s = start(Spec {
        workflows: vec![("gated", GATED.into())],
        ..Default::default()
    })
    .await;
    let r = rpc(s.addr, "runs.create", json!({"workflow": "gated"}), &[])
        .await
        .json();
    let id = r["payload"]["runId"].as_str().unwrap().to_string();
    let run = wait_status(s.addr, &id, "waiting-approval").await;
    assert_eq!(run["runState"]["blocked"]["kind"], "approval");
    let list = rpc(s.addr, "approvals.list", json!({}), &[]).await.json();
    let a = &list["payload"][0];
    assert_eq!(
        (a["runId"].as_str(), a["nodeId"].as_str()),
        (Some(id.as_str()), Some("gate"))
    );
    assert_eq!(a["requestTitle"], "ok?");
    assert_eq!(a["approvalMode"], "decision");
    let bad = rpc(
        s.addr,
        "approvals.decide",
        json!({"runId": id, "nodeId": "gate", "approved": "yes"}),
        &[],
    )
    .await;
    assert_eq!(
        bad.json()["error"]["message"],
        "runId, nodeId, and approved are required"
    );
    let ok = rpc(
        s.addr,
        "approvals.decide",
        json!({"runId": id, "nodeId": "gate", "approved": true, "note": "fine"}),
        &[],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        ok.json()["payload"],
        json!({"runId": id, "nodeId": "gate", "iteration": 0, "approved": true})
    );
    let done = wait_status(s.addr, &id, "finished").await;
    assert_eq!(done["summary"]["finished"], 3);
    let again = rpc(
        s.addr,
        "approvals.decide",
        json!({"runId": id, "nodeId": "gate", "approved": true}),
        &[],
    )
    .await;
    assert_ne!(again.status, 200);
}

#[tokio::test]
async fn signals_wake_waiting_runs() {
    let s = start(Spec {
        workflows: vec![("waiter", WAITER.into())],
        ..Default::default()
    })
    .await;
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "waiter", "input": {"sha": "abc"}}),
        &[],
    )
    .await
    .json();
    let id = r["payload"]["runId"].as_str().unwrap().to_string();
    wait_status(s.addr, &id, "waiting-event").await;
    let bad = rpc(s.addr, "signals.send", json!({"runId": id}), &[]).await;
    assert_eq!(
        bad.json()["error"]["message"],
        "runId and signalName are required"
    );
    let blank = rpc(
        s.addr,
        "signals.send",
        json!({"runId": id, "signalName": "  "}),
        &[],
    )
    .await;
    assert_eq!(
        blank.json()["error"]["message"],
        "Signal name must be a non-empty string."
    );
    let sent = rpc(
        s.addr,
        "signals.send",
        json!({"runId": id, "signalName": "ci.done", "data": {"ok": true}, "correlationId": "abc"}),
        &[],
    )
    .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let p = sent.json()["payload"].clone();
    assert_eq!(
        (
            p["seq"].as_i64(),
            p["signalName"].as_str(),
            p["correlationId"].as_str()
        ),
        (Some(0), Some("ci.done"), Some("abc"))
    );
    wait_status(s.addr, &id, "finished").await;
}

#[tokio::test]
async fn cancel_stops_an_active_run_and_a_parked_one() {
    let s = start(Spec {
        workflows: vec![("slow", SLOW.into()), ("gated", GATED.into())],
        ..Default::default()
    })
    .await;
    let id = rpc(s.addr, "runs.create", json!({"workflow": "slow"}), &[])
        .await
        .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = rpc(s.addr, "runs.cancel", json!({"runId": id}), &[]).await;
    assert_eq!(
        c.json()["payload"],
        json!({"runId": id, "status": "cancelling"})
    );
    wait_status(s.addr, &id, "cancelled").await;
    let id = rpc(s.addr, "runs.create", json!({"workflow": "gated"}), &[])
        .await
        .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status(s.addr, &id, "waiting-approval").await;
    let c = rpc(s.addr, "runs.cancel", json!({"runId": id}), &[]).await;
    assert_eq!(c.json()["payload"]["status"], "cancelled");
    wait_status(s.addr, &id, "cancelled").await;
}

#[tokio::test]
async fn connection_limit_and_oversized_frames() {
    let s = start(Spec {
        config: ServerConfig {
            max_connections: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let mut first = ws(s.addr).await;
    let _ = next(&mut first).await;
    let second = tokio_tungstenite::connect_async(format!("ws://{}/", s.addr)).await;
    match second {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503)
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // a frame over 1 MiB closes the socket with 1009
    use futures_util::{SinkExt, StreamExt};
    let big = "x".repeat(1_048_577);
    first
        .send(tokio_tungstenite::tungstenite::Message::Text(big.into()))
        .await
        .unwrap();
    let mut code = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), first.next()).await {
        if let Ok(tokio_tungstenite::tungstenite::Message::Close(Some(c))) = m {
            code = Some(u16::from(c.code));
            break;
        }
        if m.is_err() {
            break;
        }
    }
    assert_eq!(code, Some(1009));
}

#[tokio::test]
async fn runs_resume_after_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let s = start_in(
        dir,
        Spec {
            workflows: vec![("gated", GATED.into())],
            ..Default::default()
        },
    )
    .await;
    let id = rpc(s.addr, "runs.create", json!({"workflow": "gated"}), &[])
        .await
        .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status(s.addr, &id, "waiting-approval").await;
    let TestServer {
        dir, server, gw, ..
    } = s;
    server.unwrap().shutdown().await.unwrap();
    drop(gw);
    assert!(path.exists());
    let s = start_in(
        dir,
        Spec {
            workflows: vec![("gated", GATED.into())],
            ..Default::default()
        },
    )
    .await;
    let ok = rpc(
        s.addr,
        "approvals.decide",
        json!({"runId": id, "nodeId": "gate", "approved": true}),
        &[],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    wait_status(s.addr, &id, "finished").await;
}

#[tokio::test]
async fn cron_methods_and_scheduled_firing() {
    let s = start(Spec::default()).await;
    let r = rpc(s.addr, "cron.add", json!({"workflow": "hello"}), &[]).await;
    assert_eq!(
        r.json()["error"]["message"],
        "workflow and pattern are required"
    );
    let r = rpc(
        s.addr,
        "cron.add",
        json!({"workflow": "nope", "pattern": "* * * * *"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 404);
    let r = rpc(
        s.addr,
        "cron.add",
        json!({"workflow": "hello", "pattern": "a b c"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = rpc(
        s.addr,
        "cron.add",
        json!({"workflow": "hello", "pattern": "*/5 * * * *", "cronId": "c1"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let row = r.json()["payload"].clone();
    assert_eq!(
        (
            row["cronId"].as_str(),
            row["workflowPath"].as_str(),
            row["workflow"].as_str()
        ),
        (Some("c1"), Some("gateway:hello"), Some("hello"))
    );
    assert!(row["nextRunAtMs"].as_i64().unwrap() > smithers_engine::now_ms());
    let list = rpc(s.addr, "cron.list", json!({}), &[]).await.json();
    assert_eq!(list["payload"].as_array().unwrap().len(), 1);
    let t = rpc(s.addr, "cron.trigger", json!({"cronId": "c1"}), &[]).await;
    assert_eq!(t.status, 200, "{}", t.body);
    let run = t.json()["payload"]["runId"].as_str().unwrap().to_string();
    wait_status(s.addr, &run, "finished").await;
    let after = rpc(s.addr, "cron.list", json!({}), &[]).await.json();
    assert!(after["payload"][0]["lastRunAtMs"].is_i64());
    let r = rpc(s.addr, "cron.trigger", json!({}), &[]).await;
    assert_eq!(
        r.json()["error"]["message"],
        "cronId or workflow is required"
    );
    // a due schedule fires once and is broadcast as cron.triggered
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    let mut due =
        smithers_gateway::cron::new_row("gateway:hello", "hello", "* * * * *", true, 0, None)
            .unwrap();
    due.next_run_at_ms = Some(1);
    s.gw.store.upsert_cron(due).await.unwrap();
    smithers_gateway::cron_loop::tick_once(&s.gw).await;
    smithers_gateway::cron_loop::tick_once(&s.gw).await;
    let mut fired = 0;
    while let Ok(f) = tokio::time::timeout(Duration::from_millis(700), next(&mut w)).await {
        if f["event"] == "cron.triggered" {
            assert_eq!(f["payload"]["cronId"], "gateway:hello");
            fired += 1;
        }
    }
    assert_eq!(fired, 1, "a due cron fires once");
    let r = rpc(s.addr, "cron.remove", json!({"cronId": "c1"}), &[])
        .await
        .json();
    assert_eq!(r["payload"], json!({"cronId": "c1", "removed": true}));
    let r = rpc(s.addr, "cron.remove", json!({"cronId": "c1"}), &[]).await;
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (404, json!("Cron not found: c1"))
    );
}

fn webhook(signal: bool) -> smithers_gateway::webhook::WebhookConfig {
    let mut t = toml::Table::new();
    t.insert("secret".into(), toml::Value::String("s3cret".into()));
    if signal {
        let mut sig = toml::Table::new();
        sig.insert("name".into(), "ci.done".into());
        sig.insert("correlation_id_path".into(), "commit.sha".into());
        sig.insert("payload_path".into(), "result".into());
        t.insert("signal".into(), toml::Value::Table(sig));
    }
    smithers_gateway::webhook::WebhookConfig::from_toml(toml::Value::Table(t)).unwrap()
}

#[tokio::test]
async fn webhooks_verify_signatures_and_deliver_or_start() {
    let mut hooks = HashMap::new();
    hooks.insert("waiter", webhook(true));
    hooks.insert("hello", webhook(false));
    let s = start(Spec {
        workflows: vec![("waiter", WAITER.into()), ("hello", HELLO.into())],
        webhooks: hooks,
        ..Default::default()
    })
    .await;
    let cfg = webhook(true);
    let body = br#"{"commit":{"sha":"abc"},"result":{"ok":true}}"#;
    let sig = smithers_gateway::webhook::sign(&cfg, body);
    // wrong signature: rejected before parsing
    let r = http(
        s.addr,
        "POST",
        "/webhooks/waiter",
        &[("x-hub-signature-256", "sha256=00")],
        body,
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json(),
        json!({"ok": false, "error": {"code": "UNAUTHORIZED", "message": "Webhook signature verification failed"}})
    );
    let r = http(s.addr, "POST", "/webhooks/nope", &[], body).await;
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (404, json!("Unknown workflow: nope"))
    );
    // a waiting run gets the signal
    let id = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "waiter", "input": {"sha": "abc"}}),
        &[],
    )
    .await
    .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status(s.addr, &id, "waiting-event").await;
    let r = http(
        s.addr,
        "POST",
        "/webhooks/waiter",
        &[("x-hub-signature-256", &sig), ("x-github-delivery", "d1")],
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["matchedRunIds"], json!([id]));
    assert_eq!(j["delivered"][0]["correlationId"], "abc");
    assert_eq!(j["started"], Value::Null);
    wait_status(s.addr, &id, "finished").await;
    // nothing waits: the waiter workflow starts a new run with the payload as input (the same
    // body as a new delivery; a repeat of "d1" would be a duplicate)
    let r = http(
        s.addr,
        "POST",
        "/webhooks/waiter",
        &[("x-hub-signature-256", &sig), ("x-github-delivery", "d2")],
        body,
    )
    .await;
    assert_eq!(r.json()["delivered"], json!([]));
    assert_eq!(r.json()["started"]["workflow"], "waiter");
    // run-only webhook with a non-object payload wraps it
    let hello_cfg = webhook(false);
    let sig2 = smithers_gateway::webhook::sign(&hello_cfg, b"[1,2]");
    let r = http(
        s.addr,
        "POST",
        "/webhooks/hello",
        &[("x-hub-signature-256", &sig2)],
        b"[1,2]",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let started = r.json()["started"]["runId"].as_str().unwrap().to_string();
    wait_status(s.addr, &started, "finished").await;
    let bad = smithers_gateway::webhook::sign(&hello_cfg, b"{oops");
    let r = http(
        s.addr,
        "POST",
        "/webhooks/hello",
        &[("x-hub-signature-256", &bad)],
        b"{oops",
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (400, json!("Webhook payload must be valid JSON."))
    );
    let m = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(m.contains(r#"smithers_gateway_webhooks_rejected_total{reason="invalid_signature",workflow="waiter"} 1"#), "{m}");
}

#[tokio::test]
async fn websocket_auth_modes() {
    let s = start(Spec {
        auth: token_auth(),
        ..Default::default()
    })
    .await;
    let mut w = ws(s.addr).await;
    let r = connect(&mut w, hello_params()).await;
    assert_eq!(
        r["error"],
        json!({"code": "UNAUTHORIZED", "message": "A bearer token is required"})
    );
    let mut p = hello_params();
    p["auth"] = json!({"token": "reader"});
    let mut evs = vec![];
    let r = call(&mut w, "c2", "connect", p, &mut evs).await;
    assert_eq!(r["payload"]["auth"]["userId"], "rita");
    let r = call(
        &mut w,
        "x",
        "runs.create",
        json!({"workflow": "hello"}),
        &mut evs,
    )
    .await;
    assert_eq!(
        r["error"],
        json!({"code": "FORBIDDEN", "message": "Missing scope for runs.create"})
    );
    let r = call(&mut w, "y", "runs.list", json!({}), &mut evs).await;
    assert_eq!(r["ok"], true);
}

fn jwt(secret: &[u8], claims: Value) -> String {
    use base64::Engine as _;
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let head = b64.encode(json!({"alg": "HS256", "typ": "JWT"}).to_string());
    let body = b64.encode(claims.to_string());
    let mut mac = hmac::Hmac::<sha2_010::Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{head}.{body}").as_bytes());
    format!("{head}.{body}.{}", b64.encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn jwt_auth_over_http_and_websocket() {
    use smithers_gateway::auth::JwtConfig;
    let auth = AuthConfig::Jwt(JwtConfig::new(
        "smithers-test",
        vec!["gw".into()],
        b"k3y".to_vec(),
    ));
    let s = start(Spec {
        auth,
        ..Default::default()
    })
    .await;
    let now = smithers_engine::now_ms() / 1000;
    let good = jwt(
        b"k3y",
        json!({"iss": "smithers-test", "aud": "gw", "sub": "joe", "scope": "read execute", "exp": now + 60}),
    );
    let bearer = format!("Bearer {good}");
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello"}),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = rpc(
        s.addr,
        "approvals.decide",
        json!({}),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(r.status, 403, "execute does not cover approve");
    for (token, msg) in [
        (
            jwt(b"wrong", json!({"iss": "smithers-test", "aud": "gw"})),
            "JWT signature verification failed",
        ),
        (
            jwt(b"k3y", json!({"iss": "other", "aud": "gw"})),
            "JWT issuer did not match",
        ),
        (
            jwt(
                b"k3y",
                json!({"iss": "smithers-test", "aud": "gw", "exp": now - 120}),
            ),
            "JWT has expired",
        ),
        (format!("{good}.extra"), "JWT must have three segments"),
    ] {
        let b = format!("Bearer {token}");
        let r = rpc(s.addr, "health", json!({}), &[("authorization", &b)]).await;
        assert_eq!(
            (r.status, r.json()["error"]["message"].clone()),
            (401, json!(msg))
        );
    }
    let mut w = ws(s.addr).await;
    let mut p = hello_params();
    p["auth"] = json!({"token": good});
    let hello = connect(&mut w, p).await;
    assert_eq!(hello["payload"]["auth"]["userId"], "joe");
    assert_eq!(
        hello["payload"]["auth"]["scopes"],
        json!(["read", "execute"])
    );
}

#[tokio::test]
async fn trusted_proxy_reads_the_upgrade_headers() {
    use smithers_gateway::auth::ProxyConfig;
    let auth = AuthConfig::TrustedProxy(ProxyConfig {
        allowed_origins: vec!["https://app.example".into()],
        ..Default::default()
    });
    let s = start(Spec {
        auth,
        ..Default::default()
    })
    .await;
    let r = rpc(
        s.addr,
        "health",
        json!({}),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (401, json!("Origin is not allowed"))
    );
    let r = rpc(
        s.addr,
        "runs.list",
        json!({}),
        &[
            ("origin", "https://app.example"),
            ("x-user-id", "pat"),
            ("x-user-scopes", "read"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/", s.addr).into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://app.example".parse().unwrap());
    req.headers_mut()
        .insert("x-user-id", "pat".parse().unwrap());
    req.headers_mut()
        .insert("x-user-scopes", "read, approve".parse().unwrap());
    let (mut w, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = connect(&mut w, hello_params()).await;
    assert_eq!(hello["payload"]["auth"]["userId"], "pat");
    assert_eq!(
        hello["payload"]["auth"]["scopes"],
        json!(["read", "approve"])
    );
}

#[tokio::test]
async fn subscriptions_filter_broadcasts_and_ticks_arrive() {
    let s = start(Spec {
        config: ServerConfig {
            heartbeat_ms: 200,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // a watcher subscribed to one run id sees nothing of other runs, but does get ticks
    let mut watcher = ws(s.addr).await;
    let mut p = hello_params();
    p["subscribe"] = json!(["only-this"]);
    let hello = connect(&mut watcher, p).await;
    assert_eq!(hello["payload"]["policy"]["heartbeatMs"], 200);
    let other = rpc(s.addr, "runs.create", json!({"workflow": "hello"}), &[])
        .await
        .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status(s.addr, &other, "finished").await;
    let mine = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "runId": "only-this"}),
        &[],
    )
    .await;
    assert_eq!(mine.status, 200);
    wait_status(s.addr, "only-this", "finished").await;
    let (mut ticks, mut runs) = (0, std::collections::HashSet::new());
    let mut last_seq = 1;
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(900) {
        let Ok(f) = tokio::time::timeout(Duration::from_millis(300), next(&mut watcher)).await
        else {
            continue;
        };
        let seq = f["seq"].as_u64().unwrap();
        assert_eq!(seq, last_seq + 1, "seq increments by one per event");
        last_seq = seq;
        if f["event"] == "tick" {
            ticks += 1;
        } else if let Some(r) = f["payload"]["runId"].as_str() {
            runs.insert(r.to_string());
        }
    }
    assert!(ticks >= 2, "ticks every heartbeatMs");
    assert_eq!(
        runs,
        std::collections::HashSet::from(["only-this".to_string()]),
        "only the subscribed run's events"
    );
    // health reports the global state version, which counted every broadcast
    let h = rpc(s.addr, "health", json!({}), &[]).await.json();
    assert!(h["payload"]["stateVersion"].as_u64().unwrap() >= 6);
}

#[tokio::test]
async fn metrics_render_as_valid_prometheus_text() {
    let s = start(Spec::default()).await;
    let _ = rpc(s.addr, "health", json!({}), &[]).await;
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    let text = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    let mut families = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            families.insert(parts.next().unwrap().to_string());
            assert!(
                matches!(parts.next(), Some("counter" | "gauge" | "histogram")),
                "{line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (name_labels, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample: {line}"));
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let name = name_labels.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        assert!(!line.contains("Infinity"), "{line}");
    }
    for f in [
        "smithers_gateway_connections_active",
        "smithers_gateway_rpc_duration_ms",
        "smithers_node_diff_compute_ms",
        "smithers_node_diff_bytes",
    ] {
        assert!(families.contains(f), "{f} renders");
    }
    assert!(
        text.contains(r#"smithers_gateway_connections_active{transport="ws"} 1"#),
        "a real count"
    );
    assert!(text.contains(
        r#"smithers_gateway_auth_events_total{mode="none",outcome="success",transport="ws"} 1"#
    ));
}

#[tokio::test]
async fn shutdown_closes_websockets_with_1001() {
    let mut s = start(Spec::default()).await;
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    s.server.take().unwrap().shutdown().await.unwrap();
    use futures_util::StreamExt;
    let mut code = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), w.next()).await {
        match m {
            Ok(tokio_tungstenite::tungstenite::Message::Close(Some(c))) => {
                code = Some(u16::from(c.code));
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert_eq!(code, Some(1001));
    assert!(
        tokio::net::TcpStream::connect(s.addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn task_output_and_heartbeats_are_broadcast() {
    let chatty = "name: chatty\nsteps:\n  - task: {id: talk, run: \"for i in 1 2 3 4; do echo line$i; sleep 0.3; done\"}\n";
    let s = start(Spec {
        workflows: vec![("chatty", chatty.into())],
        ..Default::default()
    })
    .await;
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    let mut evs = Vec::new();
    let r = call(
        &mut w,
        "r",
        "runs.create",
        json!({"workflow": "chatty"}),
        &mut evs,
    )
    .await;
    let run = r["payload"]["runId"].as_str().unwrap().to_string();
    let (mut output, mut beats) = (String::new(), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let f = next(&mut w).await;
        match f["event"].as_str() {
            Some("task.output") => output.push_str(f["payload"]["output"].as_str().unwrap()),
            Some("task.heartbeat") => {
                assert_eq!(f["payload"]["nodeId"], "talk");
                beats += 1;
            }
            Some("run.completed") => break,
            _ => {}
        }
    }
    assert!(
        output.contains("line1") && output.contains("line4"),
        "{output}"
    );
    assert!(beats >= 1, "heartbeats while the task talks");
    let a = rpc(
        s.addr,
        "attempts.get",
        json!({"runId": run, "nodeId": "talk", "iteration": 0, "attempt": 1}),
        &[],
    )
    .await
    .json();
    assert!(a["payload"]["heartbeatAtMs"].is_i64());
}

#[tokio::test]
async fn select_approvals_validate_the_decision() {
    let pick = "name: pick\nsteps:\n  - approval: {id: choose, title: which?, mode: select, options: [{key: a, label: A}, {key: b, label: B}]}\n";
    let s = start(Spec {
        workflows: vec![("pick", pick.into())],
        ..Default::default()
    })
    .await;
    let id = rpc(s.addr, "runs.create", json!({"workflow": "pick"}), &[])
        .await
        .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status(s.addr, &id, "waiting-approval").await;
    let list = rpc(s.addr, "approvals.list", json!({}), &[]).await.json();
    assert_eq!(
        list["payload"][0]["options"],
        json!([{"key": "a", "label": "A"}, {"key": "b", "label": "B"}])
    );
    let d = |decision: Value| json!({"runId": id, "nodeId": "choose", "approved": true, "decision": decision});
    let r = rpc(s.addr, "approvals.decide", d(json!({})), &[]).await;
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (400, json!("select approvals require decision.selected"))
    );
    let r = rpc(s.addr, "approvals.decide", d(json!({"selected": "z"})), &[]).await;
    assert_eq!(r.json()["error"]["message"], "Unknown selection: z");
    let r = rpc(s.addr, "approvals.decide", d(json!({"selected": "b"})), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let done = wait_status(s.addr, &id, "finished").await;
    assert_eq!(done["status"], "finished");
}

#[tokio::test]
async fn runs_diff_compares_latest_snapshots() {
    let s = start(Spec::default()).await;
    let a = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "input": {"v": 1}}),
        &[],
    )
    .await
    .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    let b = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "input": {"v": 2}}),
        &[],
    )
    .await
    .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status(s.addr, &a, "finished").await;
    wait_status(s.addr, &b, "finished").await;
    let d = rpc(
        s.addr,
        "runs.diff",
        json!({"leftRunId": a, "rightRunId": b}),
        &[],
    )
    .await;
    assert_eq!(d.status, 200, "{}", d.body);
    let p = d.json()["payload"].clone();
    assert_eq!(p["inputChanged"], true);
    assert_eq!(p["nodesAdded"], json!([]));
    assert_eq!(p["outputsChanged"], json!([]), "same outputs");
    let same = rpc(
        s.addr,
        "runs.diff",
        json!({"leftRunId": a, "rightRunId": a}),
        &[],
    )
    .await
    .json();
    assert_eq!(same["payload"]["inputChanged"], false);
    let r = rpc(s.addr, "runs.diff", json!({"leftRunId": a}), &[]).await;
    assert_eq!(
        r.json()["error"]["message"],
        "leftRunId and rightRunId are required"
    );
    let r = rpc(
        s.addr,
        "runs.diff",
        json!({"leftRunId": a, "rightRunId": "nope"}),
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["message"].clone()),
        (404, json!("Both runs must exist"))
    );
}

#[tokio::test]
async fn reconnecting_clients_replay_missed_events() {
    let s = start(Spec::default()).await;
    let id = rpc(s.addr, "runs.create", json!({"workflow": "hello"}), &[])
        .await
        .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status(s.addr, &id, "finished").await;
    let collect = |mut w: Ws| async move {
        let mut got = Vec::new();
        while let Ok(f) = tokio::time::timeout(Duration::from_millis(400), next(&mut w)).await {
            if f["type"] == "event" && f["event"] != "tick" {
                got.push(f);
            }
        }
        got
    };
    let mut w = ws(s.addr).await;
    let mut p = hello_params();
    p["afterSeq"] = json!({ id.clone(): -1 });
    assert_eq!(connect(&mut w, p).await["ok"], true);
    let all = collect(w).await;
    let names: Vec<&str> = all.iter().map(|f| f["event"].as_str().unwrap()).collect();
    assert_eq!(names.first(), Some(&"node.started"), "{names:?}");
    assert_eq!(names.last(), Some(&"run.completed"), "{names:?}");
    let seqs: Vec<i64> = all
        .iter()
        .map(|f| f["payload"]["eventSeq"].as_i64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {seqs:?}"
    );
    // from the middle: only what came after
    let mid = seqs[1];
    let mut w = ws(s.addr).await;
    let mut p = hello_params();
    p["afterSeq"] = json!({ id.clone(): mid });
    connect(&mut w, p).await;
    let rest = collect(w).await;
    assert_eq!(rest.len(), all.len() - 2);
    assert!(
        rest.iter()
            .all(|f| f["payload"]["eventSeq"].as_i64().unwrap() > mid)
    );
    // malformed afterSeq
    let mut w = ws(s.addr).await;
    let mut p = hello_params();
    p["afterSeq"] = json!({ id: "x" });
    let r = connect(&mut w, p).await;
    assert_eq!(r["error"]["code"], "INVALID_INPUT");
}

#[tokio::test]
async fn node_output_produced_pending_failed() {
    let wf = "name: out\noutputs:\n  review: {type: object, required: [ok], properties: {ok: {type: boolean, description: verdict}, note: {type: [string, 'null']}, level: {enum: [low, high]}}}\nsteps:\n  - task: {id: r, output: review, value: {ok: true, note: null, level: low}}\n  - task: {id: broken, run: \"exit 3\", continue_on_fail: true, output: {type: object}}\n  - approval: {id: gate, title: go?}\n  - task: {id: later, output: review, value: {ok: true}}\n";
    let s = start(Spec {
        workflows: vec![("out", wf.into())],
        ..Default::default()
    })
    .await;
    let id = rpc(s.addr, "runs.create", json!({"workflow": "out"}), &[])
        .await
        .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status(s.addr, &id, "waiting-approval").await;
    let get = |node: &str, it: Value| {
        rpc(
            s.addr,
            "getNodeOutput",
            json!({"runId": id, "nodeId": node, "iteration": it}),
            &[],
        )
    };
    let r = get("r", json!(0)).await.json();
    assert_eq!(r["payload"]["status"], "produced");
    assert_eq!(
        r["payload"]["row"],
        json!({"ok": true, "note": null, "level": "low"})
    );
    let fields = r["payload"]["schema"]["fields"].as_array().unwrap().clone();
    let f = |n: &str| fields.iter().find(|f| f["name"] == n).unwrap().clone();
    assert_eq!(
        f("ok"),
        json!({"name": "ok", "type": "boolean", "optional": false, "nullable": false, "description": "verdict"})
    );
    assert_eq!(
        (f("note")["type"].clone(), f("note")["nullable"].clone()),
        (json!("string"), json!(true))
    );
    assert_eq!(f("level")["enum"], json!(["low", "high"]));
    let b = get("broken", json!("0")).await.json();
    assert_eq!(b["payload"]["status"], "failed");
    assert_eq!(b["payload"]["partial"], Value::Null);
    let later = get("later", json!(0)).await.json();
    assert_eq!(later["payload"]["status"], "pending");
    // never attempted: the schema is the workflow's
    assert_eq!(later["payload"]["schema"], r["payload"]["schema"]);
    for (params, code, status) in [
        (
            json!({"runId": "BAD!", "nodeId": "r", "iteration": 0}),
            "InvalidRunId",
            400,
        ),
        (
            json!({"runId": id, "nodeId": "r r", "iteration": 0}),
            "InvalidNodeId",
            400,
        ),
        (json!({"runId": id, "nodeId": "r"}), "InvalidIteration", 400),
        (
            json!({"runId": id, "nodeId": "r", "iteration": 1.5}),
            "InvalidIteration",
            400,
        ),
        (
            json!({"runId": id, "nodeId": "r", "iteration": 2_147_483_648u64}),
            "InvalidIteration",
            400,
        ),
        (
            json!({"runId": "nope", "nodeId": "r", "iteration": 0}),
            "RunNotFound",
            404,
        ),
        (
            json!({"runId": id, "nodeId": "zz", "iteration": 0}),
            "NodeNotFound",
            404,
        ),
        (
            json!({"runId": id, "nodeId": "r", "iteration": 3}),
            "IterationNotFound",
            404,
        ),
    ] {
        let r = rpc(s.addr, "devtools.getNodeOutput", params.clone(), &[]).await;
        assert_eq!(
            (
                r.status,
                r.json()["error"]["code"].as_str().unwrap().to_string()
            ),
            (status, code.to_string()),
            "{params}"
        );
    }
}

#[tokio::test]
async fn devtools_snapshot_of_a_frame() {
    let s = start(Spec::default()).await;
    let id = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "runId": "dev-1"}),
        &[],
    )
    .await
    .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status(s.addr, &id, "finished").await;
    let snap = rpc(s.addr, "getDevToolsSnapshot", json!({"runId": id}), &[]).await;
    assert_eq!(snap.status, 200, "{}", snap.body);
    let p = snap.json()["payload"].clone();
    assert_eq!(p["version"], 1);
    assert_eq!(p["seq"], p["frameNo"]);
    // the root is the workflow, named and with the upstream id of `smithers:workflow`
    assert_eq!(
        (
            p["root"]["type"].clone(),
            p["root"]["name"].clone(),
            p["root"]["id"].clone()
        ),
        (json!("workflow"), json!("hello"), json!(1_753_301_139))
    );
    assert_eq!(p["root"]["children"][0]["type"], "sequence");
    assert_eq!(
        p["root"]["children"][0]["children"][0]["task"]["nodeId"],
        "a"
    );
    assert_eq!(p["runState"]["state"], "succeeded");
    let first = rpc(
        s.addr,
        "getDevToolsSnapshot",
        json!({"runId": id, "frameNo": 1}),
        &[],
    )
    .await
    .json();
    assert_eq!(
        first["payload"]["root"]["id"], p["root"]["id"],
        "stable ids across frames"
    );
    for (params, code, msg) in [
        (json!({}), "InvalidRunId", "runId is required"),
        (
            json!({"runId": "Bad Id"}),
            "InvalidRunId",
            "runId must be 1 to 256 characters of letters, digits, `-`, `_`, `.` and `:`.",
        ),
        (
            json!({"runId": id, "frameNo": -1}),
            "FrameOutOfRange",
            "frameNo must be an integer between 0 and 2147483647.",
        ),
        (
            json!({"runId": id, "frameNo": 99999}),
            "FrameOutOfRange",
            "",
        ),
        (
            json!({"runId": "no-such-run"}),
            "RunNotFound",
            "Run not found: no-such-run",
        ),
    ] {
        let r = rpc(s.addr, "getDevToolsSnapshot", params.clone(), &[])
            .await
            .json();
        assert_eq!(r["error"]["code"], code, "{params}");
        if !msg.is_empty() {
            assert_eq!(r["error"]["message"], msg);
        }
    }
    // a connection subscribed to other runs may not read this one
    let mut w = ws(s.addr).await;
    let mut hp = hello_params();
    hp["subscribe"] = json!(["other"]);
    connect(&mut w, hp).await;
    let mut evs = vec![];
    let r = call(
        &mut w,
        "d",
        "getDevToolsSnapshot",
        json!({"runId": id}),
        &mut evs,
    )
    .await;
    assert_eq!(r["error"]["code"], "Unauthorized");
}

#[tokio::test]
async fn runs_fork_branches_from_a_frame() {
    let s = start(Spec {
        auth: token_auth(),
        ..Default::default()
    })
    .await;
    let admin = [("authorization", "Bearer admin-token")];
    let id = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "input": {"v": 1}}),
        &admin,
    )
    .await
    .json()["payload"]["runId"]
        .as_str()
        .unwrap()
        .to_string();
    wait_status_auth(s.addr, &id, "finished", &admin).await;
    let r = rpc(
        s.addr,
        "runs.fork",
        json!({"runId": id, "frameNo": 1}),
        &[("authorization", "Bearer reader")],
    )
    .await;
    assert_eq!(r.status, 403, "forking needs execute");
    let r = rpc(
        s.addr,
        "runs.fork",
        json!({"runId": id, "frameNo": 1, "input": {"v": 2}}),
        &admin,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json()["payload"].clone();
    assert_eq!(
        (
            p["parentRunId"].as_str(),
            p["frameNo"].as_i64(),
            p["workflow"].as_str()
        ),
        (Some(id.as_str()), Some(1), Some("hello"))
    );
    let forked = wait_status_auth(s.addr, p["runId"].as_str().unwrap(), "finished", &admin).await;
    assert_eq!(forked["parentRunId"], id.as_str());
    let r = rpc(
        s.addr,
        "runs.fork",
        json!({"runId": id, "frameNo": 9999}),
        &admin,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = rpc(s.addr, "runs.fork", json!({"runId": id}), &admin).await;
    assert_eq!(r.json()["error"]["message"], "frameNo is required");
}

#[tokio::test]
async fn a_filtered_connection_sees_every_event_of_a_run_it_creates() {
    let s = start(Spec::default()).await;
    let mut w = ws(s.addr).await;
    let mut p = hello_params();
    p["subscribe"] = json!(["something-else"]);
    connect(&mut w, p).await;
    let mut evs = Vec::new();
    let r = call(
        &mut w,
        "r",
        "runs.create",
        json!({"workflow": "hello"}),
        &mut evs,
    )
    .await;
    let run = r["payload"]["runId"].as_str().unwrap().to_string();
    while let Ok(f) = tokio::time::timeout(Duration::from_millis(500), next(&mut w)).await {
        evs.push(f);
    }
    let mine: Vec<String> = evs
        .iter()
        .filter(|f| f["payload"]["runId"] == run.as_str())
        .map(|f| {
            format!(
                "{}:{}",
                f["event"].as_str().unwrap(),
                f["payload"]["nodeId"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        mine.first().map(String::as_str),
        Some("node.started:a"),
        "{mine:?}"
    );
    assert!(
        mine.iter().any(|m| m.starts_with("run.completed")),
        "{mine:?}"
    );
}

/// `runs.list` additions for the console: `workflow`, `runIdPrefix` and paging after the last
/// row of the previous page (`beforeCreatedAtMs` + `beforeRunId`) walk every run exactly once.
#[tokio::test]
async fn runs_list_filters_and_pages_after_a_row() {
    let s = start(Spec {
        workflows: vec![("hello", HELLO.into()), ("gated", GATED.into())],
        ..Spec::default()
    })
    .await;
    let mut made = Vec::new();
    for (i, wf) in [
        "hello", "gated", "hello", "hello", "gated", "hello", "hello",
    ]
    .iter()
    .enumerate()
    {
        let id = format!("{}-{i}", if *wf == "hello" { "h" } else { "g" });
        let r = rpc(
            s.addr,
            "runs.create",
            json!({"workflow": wf, "runId": id}),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        made.push(id);
    }
    for id in &made {
        let want = if id.starts_with('h') {
            "finished"
        } else {
            "waiting-approval"
        };
        wait_status(s.addr, id, want).await;
    }
    let list = |params: Value| async move {
        let r = rpc(s.addr, "runs.list", params, &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["payload"].as_array().cloned().unwrap_or_default()
    };
    let ids = |rows: &[Value]| -> Vec<String> {
        rows.iter()
            .map(|r| r["runId"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let all = ids(&list(json!({"limit": 100})).await);
    assert_eq!(all.len(), 7);
    let mut paged = Vec::new();
    let mut after: Option<Value> = None;
    loop {
        let mut params = json!({"limit": 3});
        if let Some(last) = &after {
            params["beforeCreatedAtMs"] = last["createdAtMs"].clone();
            params["beforeRunId"] = last["runId"].clone();
        }
        let page = list(params).await;
        assert!(page.len() <= 3);
        let Some(last) = page.last().cloned() else {
            break;
        };
        paged.extend(ids(&page));
        after = Some(last);
    }
    assert_eq!(paged, all, "pages of 3 give the whole list once, in order");

    let gated = ids(&list(json!({"workflow": "gated"})).await);
    assert_eq!(gated.len(), 2);
    assert!(gated.iter().all(|id| id.starts_with("g-")), "{gated:?}");
    let waiting = list(json!({"workflow": "hello", "status": "waiting-approval"})).await;
    assert!(waiting.is_empty());
    let prefixed = ids(&list(json!({"runIdPrefix": "h-"})).await);
    assert_eq!(prefixed.len(), 5);
    assert!(prefixed.iter().all(|id| id.starts_with("h-")));

    let bad = rpc(s.addr, "runs.list", json!({"workflow": "nope"}), &[]).await;
    assert_eq!(
        (bad.status, bad.json()["error"]["code"].clone()),
        (404, json!("NOT_FOUND"))
    );
    let bad = rpc(s.addr, "runs.list", json!({"beforeRunId": "h-1"}), &[]).await;
    assert_eq!(
        bad.json()["error"]["code"],
        "INVALID_REQUEST",
        "{}",
        bad.body
    );
    let bad = rpc(s.addr, "runs.list", json!({"status": 3}), &[]).await;
    assert_eq!(
        bad.json()["error"]["code"],
        "INVALID_REQUEST",
        "{}",
        bad.body
    );
    let bad = rpc(
        s.addr,
        "runs.list",
        json!({"runIdPrefix": "x".repeat(129)}),
        &[],
    )
    .await;
    assert_eq!(bad.json()["error"]["code"], "INVALID_INPUT", "{}", bad.body);
    let ok = list(json!({"runIdPrefix": "x".repeat(128)})).await;
    assert!(ok.is_empty());
    let bad = rpc(s.addr, "runs.list", json!({"beforeCreatedAtMs": -1}), &[]).await;
    assert_eq!(bad.json()["error"]["code"], "INVALID_INPUT", "{}", bad.body);
}

/// A client reads the `runs.create` response (its run id) before any event of that run, as
/// from upstream, even when the run starts and finishes faster than the response is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_create_is_answered_before_any_event_of_its_run() {
    let spec = Spec {
        workflows: vec![(
            "one",
            "name: one\nsteps:\n  - task: {id: t, value: 1}\n".into(),
        )],
        ..Spec::default()
    };
    let srv = start(spec).await;
    let mut ws = ws(srv.addr).await;
    assert_eq!(connect(&mut ws, hello_params()).await["ok"], true);
    let total = 1000;
    let mut answered = std::collections::HashSet::new();
    let mut completed = 0;
    let mut sent = 0;
    let create = |i: usize| {
        json!({"type": "req", "id": format!("r{i}"), "method": "runs.create",
            "params": {"workflow": "one", "runId": format!("r{i}")}})
    };
    while sent < 8 {
        send(&mut ws, create(sent)).await;
        sent += 1;
    }
    while completed < total {
        let f = next(&mut ws).await;
        if f["type"] == "res" {
            assert_eq!(f["ok"], true, "{f}");
            answered.insert(f["id"].as_str().unwrap_or_default().to_string());
            continue;
        }
        let Some(run) = f["payload"]["runId"].as_str() else {
            continue;
        };
        assert!(
            answered.contains(run),
            "event {} of run {run} arrived before the runs.create response",
            f["event"]
        );
        if f["event"] == "run.completed" {
            completed += 1;
            if sent < total {
                send(&mut ws, create(sent)).await;
                sent += 1;
            }
        }
    }
}

/// A run resumed by a WebSocket request (here `approvals.decide`) sends that connection no
/// event of its own before the response; `approval.decided` is broadcast by the decision
/// itself and may come first, as from upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_resumed_over_websocket_is_answered_before_its_events() {
    let s = start(Spec {
        workflows: vec![("gated", GATED.into())],
        ..Default::default()
    })
    .await;
    for round in 0..20 {
        let r = rpc(s.addr, "runs.create", json!({"workflow": "gated"}), &[])
            .await
            .json();
        let id = r["payload"]["runId"].as_str().unwrap().to_string();
        wait_status(s.addr, &id, "waiting-approval").await;
        let mut ws = ws(s.addr).await;
        assert_eq!(connect(&mut ws, hello_params()).await["ok"], true);
        let mut before = Vec::new();
        let res = call(
            &mut ws,
            "d",
            "approvals.decide",
            json!({"runId": id, "nodeId": "gate", "approved": true}),
            &mut before,
        )
        .await;
        assert_eq!(res["ok"], true, "{res}");
        let early: Vec<&Value> = before
            .iter()
            .filter(|f| f["payload"]["runId"] == id.as_str() && f["event"] != "approval.decided")
            .collect();
        assert!(
            early.is_empty(),
            "round {round}: before the response: {early:?}"
        );
        loop {
            let f = next(&mut ws).await;
            if f["event"] == "run.completed" && f["payload"]["runId"] == id.as_str() {
                break;
            }
        }
    }
}

/// The next response frame, skipping events.
async fn next_response(ws: &mut Ws) -> Value {
    loop {
        let f = next(ws).await;
        if f["type"] == "res" {
            return f;
        }
    }
}

/// The ids of the next `n` responses, each of which must be a success.
async fn answered(ws: &mut Ws, n: usize) -> std::collections::HashSet<String> {
    let mut ids = std::collections::HashSet::new();
    for _ in 0..n {
        let r = next_response(ws).await;
        assert_eq!(r["ok"], true, "{r}");
        ids.insert(r["id"].as_str().unwrap_or_default().to_string());
    }
    ids
}

/// Requests on one connection are answered side by side: one waiting for the database does
/// not hold up the next, and past `MAX_IN_FLIGHT` the connection's frames wait unread.
#[tokio::test]
async fn requests_on_one_connection_do_not_wait_for_each_other() {
    let s = start(Spec::default()).await;
    let mut ws = ws(s.addr).await;
    connect(&mut ws, hello_params()).await;
    // another connection holds the database's write lock: a create waits for it
    let db = rusqlite::Connection::open(s.dir.path().join("db.sqlite")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let create = |id: String| json!({"type": "req", "id": id, "method": "runs.create", "params": {"workflow": "hello"}});
    send(&mut ws, create("c0".into())).await;
    send(
        &mut ws,
        json!({"type": "req", "id": "h", "method": "health"}),
    )
    .await;
    let first = next_response(&mut ws).await;
    assert_eq!(
        first["id"], "h",
        "health answered while the create waits: {first}"
    );
    assert_eq!(first["ok"], true);
    // fill the connection's places: the frame after them is not read while they wait
    let max = smithers_gateway::ws::MAX_IN_FLIGHT;
    for i in 1..max {
        send(&mut ws, create(format!("c{i}"))).await;
    }
    send(
        &mut ws,
        json!({"type": "req", "id": "h2", "method": "health"}),
    )
    .await;
    let early = tokio::time::timeout(Duration::from_millis(500), next_response(&mut ws)).await;
    assert!(early.is_err(), "answered past the cap: {early:?}");
    db.execute_batch("COMMIT").unwrap();
    let ids = answered(&mut ws, max + 1).await;
    assert_eq!(ids.len(), max + 1);
    assert!(ids.contains("h2") && ids.contains("c0") && ids.contains(&format!("c{}", max - 1)));
}

/// Besides their number, the size of a connection's unanswered requests is bounded: once their
/// frames hold `max_body_bytes`, the next frame waits unread.
#[tokio::test]
async fn unanswered_requests_hold_at_most_about_two_frames() {
    let s = start(Spec {
        config: ServerConfig {
            max_body_bytes: 10_000,
            ..ServerConfig::default()
        },
        ..Spec::default()
    })
    .await;
    let mut ws = ws(s.addr).await;
    connect(&mut ws, hello_params()).await;
    let db = rusqlite::Connection::open(s.dir.path().join("db.sqlite")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let pad = "x".repeat(6_000);
    for id in ["big1", "big2"] {
        let f = json!({"type": "req", "id": id, "method": "runs.create", "params": {"workflow": "hello", "input": {"pad": pad}}});
        send(&mut ws, f).await;
    }
    send(
        &mut ws,
        json!({"type": "req", "id": "h", "method": "health"}),
    )
    .await;
    let early = tokio::time::timeout(Duration::from_millis(500), next_response(&mut ws)).await;
    assert!(early.is_err(), "read past the byte budget: {early:?}");
    db.execute_batch("COMMIT").unwrap();
    assert_eq!(answered(&mut ws, 3).await.len(), 3);
}

/// A request taken from a socket is finished even when the client goes away meanwhile: a
/// create waiting for the database still stores its run, and the run is driven to the end.
#[tokio::test]
async fn a_create_taken_before_the_client_left_still_runs() {
    let s = start(Spec::default()).await;
    let mut ws = ws(s.addr).await;
    connect(&mut ws, hello_params()).await;
    let db = rusqlite::Connection::open(s.dir.path().join("db.sqlite")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    send(&mut ws, json!({"type": "req", "id": "c", "method": "runs.create", "params": {"workflow": "hello", "runId": "left-behind"}})).await;
    // the frame is read before the socket closes: health on the same socket is answered
    send(
        &mut ws,
        json!({"type": "req", "id": "h", "method": "health"}),
    )
    .await;
    assert_eq!(next_response(&mut ws).await["id"], "h");
    drop(ws);
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.execute_batch("COMMIT").unwrap();
    wait_status(s.addr, "left-behind", "finished").await;
}
