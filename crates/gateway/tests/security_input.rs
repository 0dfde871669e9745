//! Hostile identifiers and method names over real sockets (issue 9 items 10 and 18): one
//! identifier rule for every method, NUL bytes refused as bad input before they reach storage,
//! and made-up method names that cannot blow up the metrics.

mod common;

use common::*;
use serde_json::{Value, json};

/// `(status, code)` of a failed `/rpc` call, or `(200, "")`.
async fn outcome(s: &TestServer, method: &str, params: Value) -> (u16, String) {
    let r = rpc(s.addr, method, params, &[]).await;
    let code = r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (r.status, code)
}

#[tokio::test]
async fn run_id_accepted_at_create_is_not_refused_by_any_method() {
    let s = start(Spec::default()).await;
    let id = "Run.Upper:1";
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "runId": id}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_status(s.addr, id, "finished").await;
    let latest = rpc(s.addr, "frames.get", json!({"runId": id}), &[])
        .await
        .json()["payload"]["frameNo"]
        .as_i64()
        .expect("a frame");
    let by_id = [
        ("runs.get", json!({"runId": id})),
        ("frames.list", json!({"runId": id})),
        ("frames.get", json!({"runId": id, "frameNo": 1})),
        ("attempts.list", json!({"runId": id})),
        (
            "attempts.get",
            json!({"runId": id, "nodeId": "a", "iteration": 0, "attempt": 1}),
        ),
        ("getDevToolsSnapshot", json!({"runId": id})),
        (
            "jumpToFrame",
            json!({"runId": id, "frameNo": latest, "confirm": true}),
        ),
        ("runs.diff", json!({"leftRunId": id, "rightRunId": id})),
        (
            "runs.rerun",
            json!({"runId": id, "newRunId": "Run.Upper:2"}),
        ),
        (
            "runs.fork",
            json!({"runId": id, "frameNo": 1, "newRunId": "Run.Upper:3"}),
        ),
    ];
    for (method, params) in by_id {
        let r = rpc(s.addr, method, params.clone(), &[]).await;
        assert_eq!(r.status, 200, "{method} {params}: {}", r.body);
    }
    // methods whose other checks answer first must still not call the id invalid (`a` has
    // no output schema: getNodeOutput answers NodeHasNoOutput once it found run and node)
    for (method, params) in [
        (
            "getNodeOutput",
            json!({"runId": id, "nodeId": "a", "iteration": 0}),
        ),
        (
            "devtools.getNodeOutput",
            json!({"runId": id, "nodeId": "a", "iteration": 0}),
        ),
        (
            "getNodeDiff",
            json!({"runId": id, "nodeId": "a", "iteration": 0}),
        ),
        ("runs.cancel", json!({"runId": id})),
        (
            "signals.send",
            json!({"runId": id, "signalName": "nobody.waits"}),
        ),
    ] {
        let (status, code) = outcome(&s, method, params.clone()).await;
        assert!(
            !matches!(
                code.as_str(),
                "InvalidRunId" | "INVALID_INPUT" | "NOT_FOUND"
            ),
            "{method} {params}: {status} {code}"
        );
    }
    // getNodeOutput got past the run and node lookups
    for method in ["getNodeOutput", "devtools.getNodeOutput"] {
        let (status, code) = outcome(
            &s,
            method,
            json!({"runId": id, "nodeId": "a", "iteration": 0}),
        )
        .await;
        assert_eq!(
            (status, code.as_str()),
            (404, "NodeHasNoOutput"),
            "{method}"
        );
    }
    // and over WebSocket, where streamDevTools lives
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    let mut evs = Vec::new();
    let r = call(
        &mut w,
        "s",
        "streamDevTools",
        json!({"runId": id}),
        &mut evs,
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    wait_status(s.addr, "Run.Upper:2", "finished").await;
}

#[tokio::test]
async fn nul_byte_in_an_id_is_bad_input_not_a_server_error() {
    let s = start(Spec {
        workflows: vec![("hello", HELLO.to_string()), ("gated", GATED.to_string())],
        ..Default::default()
    })
    .await;
    let nul = "run\u{0}1";
    for (method, params) in [
        ("runs.get", json!({"runId": nul})),
        ("runs.cancel", json!({"runId": nul})),
        ("runs.rerun", json!({"runId": nul})),
        ("runs.create", json!({"workflow": "hello", "runId": nul})),
        ("runs.create", json!({"workflow": "hel\u{0}lo"})),
        ("frames.list", json!({"runId": nul})),
        ("frames.get", json!({"runId": nul})),
        ("attempts.list", json!({"runId": nul})),
        (
            "attempts.get",
            json!({"runId": "r", "nodeId": "a\u{0}", "iteration": 0, "attempt": 1}),
        ),
        (
            "approvals.decide",
            json!({"runId": "r", "nodeId": "gate", "approved": true, "note": "ok\u{0}"}),
        ),
        (
            "signals.send",
            json!({"runId": "r", "signalName": "x", "correlationId": "c\u{0}"}),
        ),
        ("signals.send", json!({"runId": nul, "signalName": "x"})),
        (
            "cron.add",
            json!({"workflow": "hello", "pattern": "@daily", "cronId": "c\u{0}"}),
        ),
        ("cron.remove", json!({"cronId": "c\u{0}"})),
        ("cron.trigger", json!({"cronId": "c\u{0}"})),
        ("runs.diff", json!({"leftRunId": nul, "rightRunId": "x"})),
        ("runs.fork", json!({"runId": nul, "frameNo": 0})),
        (
            "getNodeOutput",
            json!({"runId": nul, "nodeId": "a", "iteration": 0}),
        ),
        ("getDevToolsSnapshot", json!({"runId": nul})),
        (
            "jumpToFrame",
            json!({"runId": nul, "frameNo": 0, "confirm": true}),
        ),
    ] {
        let r = rpc(s.addr, method, params.clone(), &[]).await;
        assert_eq!(r.status, 400, "{method} {params}: {}", r.body);
        assert_eq!(
            r.json()["error"]["code"],
            "INVALID_INPUT",
            "{method}: {}",
            r.body
        );
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("NUL")),
            "{method}: {}",
            r.body
        );
    }
    // JSON documents may carry any string: a NUL in run input is data, stored escaped
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "input": {"text": "a\u{0}b"}}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn ids_outside_the_rule_are_refused_with_a_clear_error() {
    let s = start(Spec::default()).await;
    for (method, params) in [
        ("runs.create", json!({"workflow": "hello", "runId": "a b"})),
        (
            "runs.create",
            json!({"workflow": "hello", "runId": "x".repeat(257)}),
        ),
        ("runs.get", json!({"runId": "../etc/passwd"})),
        (
            "cron.add",
            json!({"workflow": "hello", "pattern": "@daily", "cronId": "a/b"}),
        ),
        (
            "cron.add",
            json!({"workflow": "hello", "pattern": "@daily", "cronId": ""}),
        ),
        ("cron.remove", json!({"cronId": "a b"})),
        (
            "cron.trigger",
            json!({"cronId": "a b", "workflow": "hello"}),
        ),
    ] {
        let r = rpc(s.addr, method, params.clone(), &[]).await;
        assert_eq!(r.status, 400, "{method} {params}: {}", r.body);
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(msg.contains("letters, digits"), "{method}: {msg}");
    }
    // the longest id the rule allows works end to end
    let long = "L".repeat(256);
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": "hello", "runId": long}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_status(s.addr, &long, "finished").await;
    let r = rpc(
        s.addr,
        "cron.add",
        json!({"workflow": "hello", "pattern": "@daily", "cronId": "nightly:Build.1"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn made_up_method_names_share_one_metric_series() {
    let s = start(Spec::default()).await;
    for i in 0..50 {
        let method = format!("made.up{i}");
        let (status, code) = outcome(&s, &method, json!({})).await;
        assert_eq!((status, code.as_str()), (404, "METHOD_NOT_FOUND"));
    }
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    let mut evs = Vec::new();
    for i in 0..20 {
        let r = call(
            &mut w,
            &format!("q{i}"),
            &format!("ws.madeUp{i}"),
            json!({}),
            &mut evs,
        )
        .await;
        assert_eq!(r["error"]["code"], "METHOD_NOT_FOUND");
    }
    let text = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(!text.contains("made.up"), "a series per made-up name");
    assert!(!text.contains("madeUp"), "a series per made-up name");
    assert!(
        text.contains(r#"smithers_gateway_rpc_calls_total{method="unknown",transport="http"} 50"#),
        "{text}"
    );
    assert!(
        text.contains(r#"smithers_gateway_rpc_calls_total{method="unknown",transport="ws"} 20"#),
        "{text}"
    );
    // real methods keep their own label
    assert!(text.contains(r#"method="connect""#));
}
