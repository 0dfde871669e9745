//! `jumpToFrame` and `streamDevTools` over real sockets (gateway-protocol §1.13, §1.16).

mod common;

use common::*;
use serde_json::{Value, json};
use smithers_gateway::auth::{AuthConfig, Grant};
use smithers_store::audit_result;
use std::collections::HashMap;
use std::time::Duration;

const STEPS: &str = "name: steps\nsteps:\n  - task: {id: a, value: 1, label: first}\n  - task: {id: b, value: 2, label: \"b {{ outputs.a }}\"}\n  - task: {id: c, value: 3, label: \"c {{ outputs.b }}\"}\n  - task: {id: d, value: 4, label: \"d {{ outputs.c }}\"}\n";

/// A loop whose body flips between two branch sides each iteration, each side a task with a
/// `pad`-byte label: every other frame replaces a large node.
fn flipper(iterations: u32, pad: usize) -> String {
    let label = "x".repeat(pad);
    format!(
        "name: flipper\nsteps:\n  - loop:\n      id: l\n      max_iterations: {iterations}\n      steps:\n        - branch:\n            if: \"iteration % 2 == 0\"\n            then: {{task: {{id: even, value: 1, label: \"{label}\"}}}}\n            else: {{task: {{id: odd, value: 2, label: \"{label}\"}}}}\n"
    )
}

fn users() -> AuthConfig {
    let mut tokens = HashMap::new();
    let mut add = |token: &str, user: &str, role: &str| {
        tokens.insert(
            token.to_string(),
            Grant {
                role: role.into(),
                scopes: vec!["*".into()],
                user_id: Some(user.into()),
            },
        );
    };
    add("ann", "ann", "Admin");
    add("bob", "bob", "operator");
    add("carl", "carl", "operator");
    AuthConfig::Token { tokens }
}

fn bearer(t: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {t}"))
}

async fn rpc_as(s: &TestServer, who: &str, method: &str, params: Value) -> HttpResponse {
    let (k, v) = bearer(who);
    rpc(s.addr, method, params, &[(k, v.as_str())]).await
}

async fn create(s: &TestServer, who: &str, workflow: &str, run_id: &str, input: Value) {
    let r = rpc_as(
        s,
        who,
        "runs.create",
        json!({"workflow": workflow, "runId": run_id, "input": input}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// `runs.create` without credentials (servers with auth off).
async fn create_anonymous(s: &TestServer, workflow: &str, run_id: &str) {
    let r = rpc(
        s.addr,
        "runs.create",
        json!({"workflow": workflow, "runId": run_id}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn wait_for(s: &TestServer, who: &str, run_id: &str, want: &str) -> Value {
    let (k, v) = bearer(who);
    wait_status_auth(s.addr, run_id, want, &[(k, v.as_str())]).await
}

/// Waits for a run's status through `runs.list`, whose rows leave out the nodes: `runs.get`
/// of a run with thousands of large nodes costs more with every poll, and the polls would take
/// the CPU the run needs.
async fn wait_listed(addr: std::net::SocketAddr, run_id: &str, want: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let r = rpc(
            addr,
            "runs.list",
            json!({"runIdPrefix": run_id, "status": want, "limit": 1}),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        if r.json()["payload"][0]["runId"] == run_id {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "run {run_id} never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn err(r: &HttpResponse) -> (u16, String, String) {
    let j = r.json();
    (
        r.status,
        j["error"]["code"].as_str().unwrap_or("").to_string(),
        j["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn jump_to_frame_checks_authorizes_audits_and_rewinds() {
    let s = start(Spec {
        workflows: vec![("steps", STEPS.to_string())],
        auth: users(),
        ..Default::default()
    })
    .await;
    create(&s, "bob", "steps", "tt-1", json!({})).await;
    wait_for(&s, "bob", "tt-1", "finished").await;
    let latest = s.gw.store.last_frame_no("tt-1").await.unwrap();
    assert!(latest >= 4, "one frame per step at least, got {latest}");
    let attempts_before = s.gw.store.list_attempts("tt-1").await.unwrap();

    // gateway-level checks: no audit row
    for (params, code, msg) in [
        (json!({}), "InvalidRunId", "runId is required"),
        (json!({"runId": ""}), "InvalidRunId", "runId is required"),
        (
            json!({"runId": "tt-1"}),
            "InvalidFrameNo",
            "frameNo is required",
        ),
        (
            json!({"runId": "tt-1", "frameNo": "2"}),
            "InvalidFrameNo",
            "frameNo is required",
        ),
        (
            json!({"runId": "../x", "frameNo": 1}),
            "RunNotFound",
            "Run not found: ../x",
        ),
    ] {
        let r = rpc_as(&s, "bob", "jumpToFrame", params.clone()).await;
        let (status, c, m) = err(&r);
        assert_eq!((c.as_str(), m.as_str()), (code, msg), "{params}");
        assert_eq!(status, if code == "RunNotFound" { 404 } else { 400 });
    }
    assert!(
        s.gw.store
            .list_audits(Some("tt-1"), None)
            .await
            .unwrap()
            .is_empty()
    );

    // someone else's run: refused, and audited
    let r = rpc_as(
        &s,
        "carl",
        "jumpToFrame",
        json!({"runId": "tt-1", "frameNo": 1, "confirm": true}),
    )
    .await;
    assert_eq!(
        err(&r),
        (
            401,
            "Unauthorized".into(),
            "Only the run owner or an admin may rewind this run.".into()
        )
    );
    let audits = s.gw.store.list_audits(Some("tt-1"), None).await.unwrap();
    assert_eq!(audits.len(), 1);
    assert_eq!(
        (
            audits[0].caller.as_str(),
            audits[0].result.as_str(),
            audits[0].from_frame_no
        ),
        ("carl", audit_result::FAILED, -1)
    );

    // the owner's malformed requests: each audited as failed
    for (params, code, msg) in [
        (
            json!({"runId": "tt-1", "frameNo": -1, "confirm": true}),
            "InvalidFrameNo",
            "frameNo must be a non-negative i32 integer.".to_string(),
        ),
        (
            json!({"runId": "tt-1", "frameNo": 1.5, "confirm": true}),
            "InvalidFrameNo",
            "frameNo must be a non-negative i32 integer.".to_string(),
        ),
        (
            json!({"runId": "tt-1", "frameNo": 2147483648.0, "confirm": true}),
            "InvalidFrameNo",
            "frameNo must be a non-negative i32 integer.".to_string(),
        ),
        (
            json!({"runId": "tt-1", "frameNo": 1}),
            "ConfirmationRequired",
            "jumpToFrame is destructive; pass confirm: true to proceed.".to_string(),
        ),
        (
            json!({"runId": "tt-1", "frameNo": 1, "confirm": "true"}),
            "ConfirmationRequired",
            "jumpToFrame is destructive; pass confirm: true to proceed.".to_string(),
        ),
        (
            json!({"runId": "tt-1", "frameNo": latest + 1, "confirm": true}),
            "FrameOutOfRange",
            format!("frameNo must be between 0 and {latest}."),
        ),
        (
            json!({"runId": "tt-1", "frameNo": 0, "confirm": true}),
            "FrameOutOfRange",
            "Frame 0 does not exist for run tt-1.".to_string(),
        ),
    ] {
        let r = rpc_as(&s, "bob", "jumpToFrame", params.clone()).await;
        let (status, c, m) = err(&r);
        assert_eq!((status, c.as_str(), m), (400, code, msg), "{params}");
    }
    let audits = s.gw.store.list_audits(Some("tt-1"), None).await.unwrap();
    assert_eq!(
        audits.len(),
        8,
        "one row per request past the gateway checks"
    );
    assert!(audits.iter().all(|a| a.result == audit_result::FAILED));

    // jumping to the latest frame changes nothing
    let r = rpc_as(
        &s,
        "bob",
        "jumpToFrame",
        json!({"runId": "tt-1", "frameNo": latest, "confirm": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json()["payload"].clone();
    assert_eq!(
        (
            p["ok"].clone(),
            p["newFrameNo"].clone(),
            p["deletedFrames"].clone()
        ),
        (json!(true), json!(latest), json!(0))
    );

    // a watcher sees the jump
    let mut w = ws(s.addr).await;
    let mut hp = hello_params();
    hp["auth"] = json!({"token": "ann"});
    let hello = connect(&mut w, hp).await;
    assert_eq!(hello["ok"], true, "{hello}");

    // the real thing: back to frame 2, then the run finishes again
    let r = rpc_as(
        &s,
        "bob",
        "jumpToFrame",
        json!({"runId": "tt-1", "frameNo": 2, "confirm": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json()["payload"].clone();
    assert_eq!(p["ok"], true);
    assert_eq!(p["newFrameNo"], 2);
    assert_eq!(p["deletedFrames"], latest - 2);
    assert_eq!(p["revertedSandboxes"], 0);
    assert!(p["deletedAttempts"].as_i64().unwrap() >= 1, "{p}");
    assert_eq!(p["invalidatedDiffs"], 0);
    assert!(p["durationMs"].is_u64());
    let jumped = loop {
        let f = next(&mut w).await;
        if f["event"] == "run.time_travel_jumped" {
            break f;
        }
    };
    assert_eq!(
        (
            jumped["payload"]["runId"].clone(),
            jumped["payload"]["fromFrameNo"].clone(),
            jumped["payload"]["toFrameNo"].clone(),
            jumped["payload"]["caller"].clone()
        ),
        (json!("tt-1"), json!(latest), json!(2), json!("bob"))
    );
    wait_for(&s, "bob", "tt-1", "finished").await;
    let attempts_after = s.gw.store.list_attempts("tt-1").await.unwrap();
    assert_eq!(
        attempts_after.len(),
        attempts_before.len(),
        "steps after the frame ran once more, replacing the removed attempts: {:?} {:?}",
        attempts_before
            .iter()
            .map(|a| (&a.node_id, a.attempt, a.started_at_ms))
            .collect::<Vec<_>>(),
        attempts_after
            .iter()
            .map(|a| (&a.node_id, a.attempt, a.started_at_ms))
            .collect::<Vec<_>>()
    );
    let audits = s.gw.store.list_audits(Some("tt-1"), None).await.unwrap();
    let last = audits.last().unwrap();
    assert_eq!(
        (
            last.result.as_str(),
            last.from_frame_no,
            last.to_frame_no,
            last.caller.as_str()
        ),
        (audit_result::SUCCESS, latest, 2, "bob")
    );
    assert!(audits.iter().all(|a| a.result != audit_result::IN_PROGRESS));

    // an admin may rewind someone else's run
    let r = rpc_as(
        &s,
        "ann",
        "devtools.jumpToFrame",
        json!({"runId": "tt-1", "frameNo": 1, "confirm": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for(&s, "bob", "tt-1", "finished").await;

    // another rewind of the same run in flight: Busy
    {
        let _held = smithers_gateway::jump::lock(&s.gw, "tt-1").unwrap();
        let r = rpc_as(
            &s,
            "bob",
            "jumpToFrame",
            json!({"runId": "tt-1", "frameNo": 1, "confirm": true}),
        )
        .await;
        assert_eq!(
            err(&r),
            (
                409,
                "Busy".into(),
                "Another jumpToFrame is already running for tt-1.".into()
            )
        );
    }

    // quota: 10 executed rewinds per caller per hour; failed requests do not count
    let mut executed = 1; // bob's jump to frame 2 above
    while executed < 10 {
        let r = rpc_as(
            &s,
            "bob",
            "jumpToFrame",
            json!({"runId": "tt-1", "frameNo": 1, "confirm": true}),
        )
        .await;
        assert_eq!(r.status, 200, "rewind {executed}: {}", r.body);
        executed += 1;
        wait_for(&s, "bob", "tt-1", "finished").await;
    }
    let r = rpc_as(
        &s,
        "bob",
        "jumpToFrame",
        json!({"runId": "tt-1", "frameNo": 1, "confirm": true}),
    )
    .await;
    assert_eq!(
        err(&r),
        (
            429,
            "RateLimited".into(),
            "Rewind quota exceeded for tt-1; max 10 per 60m.".into()
        )
    );
    // the quota is per caller: the admin still may
    let r = rpc_as(
        &s,
        "ann",
        "jumpToFrame",
        json!({"runId": "tt-1", "frameNo": 1, "confirm": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let metrics = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        metrics.contains("smithers_rewind_total{result=\"rate_limited\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("smithers_rewind_total{result=\"busy\"} 1"));
}

#[tokio::test]
async fn jump_during_a_running_task_stops_it_and_runs_it_again() {
    let slow = "name: slowstep\nsteps:\n  - task: {id: a, value: 1}\n  - task: {id: s, run: \"echo $$ >> pids; sleep 30\"}\n";
    let s = start(Spec {
        workflows: vec![("slowstep", slow.to_string())],
        ..Default::default()
    })
    .await;
    create_anonymous(&s, "slowstep", "tt-live").await;
    let pids = s.dir.path().join("pids");
    let first_pid = wait_pid(&pids, 1).await;
    let r = rpc(
        s.addr,
        "jumpToFrame",
        json!({"runId": "tt-live", "frameNo": 1, "confirm": true}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["payload"]["deletedAttempts"].as_i64().unwrap() >= 1);
    // the old process is gone and the step runs again under the resumed run
    assert!(!alive(first_pid), "the rewound task's process was killed");
    let second_pid = wait_pid(&pids, 2).await;
    assert_ne!(first_pid, second_pid);
    let run = wait_status(s.addr, "tt-live", "running").await;
    assert_eq!(run["runId"], "tt-live");
    let attempts = s.gw.store.list_attempts("tt-live").await.unwrap();
    let s_attempts: Vec<_> = attempts.iter().filter(|a| a.node_id == "s").collect();
    assert_eq!(s_attempts.len(), 1, "the killed attempt was removed");
    assert_eq!(s_attempts[0].state, "in-progress");
    let r = rpc(s.addr, "runs.cancel", json!({"runId": "tt-live"}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_status(s.addr, "tt-live", "cancelled").await;
}

async fn wait_pid(path: &std::path::Path, n: usize) -> i32 {
    for _ in 0..200 {
        if let Ok(t) = std::fs::read_to_string(path) {
            let pids: Vec<i32> = t.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.len() >= n {
                return pids[n - 1];
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {n} never started");
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

#[tokio::test]
async fn interrupted_rewinds_leave_the_run_needing_attention() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    // a store with a finished run and an audit row a crash left in_progress
    {
        let store = smithers_store::open(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let engine =
            smithers_engine::Engine::new(store.clone(), smithers_engine::EngineConfig::default());
        let wf = std::sync::Arc::new(
            smithers_core::yaml::load_str(STEPS, "steps.yaml", dir.path()).unwrap(),
        );
        let h = engine
            .start(
                wf,
                json!({}),
                smithers_engine::StartOptions {
                    run_id: Some("tt-crash".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        h.wait().await;
        engine
            .record_audit(smithers_store::AuditRow {
                id: "a-1".into(),
                run_id: "tt-crash".into(),
                from_frame_no: 4,
                to_frame_no: 1,
                caller: "bob".into(),
                timestamp_ms: smithers_engine::now_ms(),
                result: audit_result::IN_PROGRESS.into(),
                duration_ms: 0,
            })
            .await
            .unwrap();
    }
    let s = start_in(
        dir,
        Spec {
            workflows: vec![("steps", STEPS.to_string())],
            ..Default::default()
        },
    )
    .await;
    let run = wait_status(s.addr, "tt-crash", "needs-attention").await;
    let e: Value = serde_json::from_str(run["errorJson"].as_str().unwrap()).unwrap();
    assert_eq!(
        (e["code"].clone(), e["needsAttention"].clone()),
        (json!("RewindFailed"), json!(true))
    );
    let audits =
        s.gw.store
            .list_audits(Some("tt-crash"), None)
            .await
            .unwrap();
    assert_eq!(audits[0].result, audit_result::PARTIAL);
    // listed, and a rewind brings it back
    let listed = rpc(s.addr, "runs.list", json!({}), &[]).await.json();
    assert!(
        listed["payload"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["runId"] == "tt-crash" && r["status"] == "needs-attention")
    );
    let r = rpc(
        s.addr,
        "jumpToFrame",
        json!({"runId": "tt-crash", "frameNo": 1, "confirm": true}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_status(s.addr, "tt-crash", "finished").await;
}

// ----- streamDevTools ------------------------------------------------------------------------

async fn stream(w: &mut Ws, id: &str, params: Value) -> (Value, Vec<Value>) {
    let mut evs = Vec::new();
    let r = call(w, id, "streamDevTools", params, &mut evs).await;
    (r, evs)
}

/// Next `devtools.*` event of a stream (other frames are skipped).
async fn next_devtools(w: &mut Ws, pending: &mut Vec<Value>, stream_id: &str) -> Value {
    if let Some(i) = pending
        .iter()
        .position(|f| f["payload"]["streamId"] == stream_id)
    {
        return pending.remove(i);
    }
    loop {
        let f = next(w).await;
        if f["payload"]["streamId"] == stream_id {
            return f;
        }
        // another stream's event: keep it for that stream's reader
        pending.push(f);
    }
}

/// Applies a devtools event to a client-side tree, returning the event's seq.
fn follow(tree: &mut Value, ev: &Value) -> i64 {
    let e = &ev["payload"]["event"];
    match e["kind"].as_str() {
        Some("snapshot") => {
            *tree = e["snapshot"]["root"].clone();
            e["snapshot"]["seq"].as_i64().unwrap()
        }
        Some("delta") => {
            let ops = e["delta"]["ops"].as_array().unwrap();
            *tree = smithers_gateway::devtools_diff::apply(tree, ops).unwrap();
            e["delta"]["seq"].as_i64().unwrap()
        }
        _ => panic!("not a devtools event: {ev}"),
    }
}

#[tokio::test]
async fn stream_devtools_validates_its_parameters() {
    let s = start(Spec {
        workflows: vec![("steps", STEPS.to_string())],
        ..Default::default()
    })
    .await;
    create_anonymous(&s, "steps", "sv-1").await;
    wait_status(s.addr, "sv-1", "finished").await;
    let latest = s.gw.store.last_frame_no("sv-1").await.unwrap();
    let r = rpc(s.addr, "streamDevTools", json!({"runId": "sv-1"}), &[]).await;
    assert_eq!(
        err(&r),
        (
            400,
            "INVALID_REQUEST".into(),
            "streamDevTools is only supported over websocket connections".into()
        )
    );
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    for (params, code, msg) in [
        (json!({}), "InvalidRunId", "runId is required".to_string()),
        (
            json!({"runId": "bad/id"}),
            "InvalidRunId",
            "runId must be 1 to 256 characters of letters, digits, `-`, `_`, `.` and `:`.".into(),
        ),
        (
            json!({"runId": "sv-1", "fromSeq": -1}),
            "SeqOutOfRange",
            "fromSeq must be a non-negative integer.".into(),
        ),
        (
            json!({"runId": "sv-1", "fromSeq": "3"}),
            "SeqOutOfRange",
            "fromSeq must be a non-negative integer.".into(),
        ),
        (
            json!({"runId": "nope"}),
            "RunNotFound",
            "Run not found: nope".into(),
        ),
        (
            json!({"runId": "sv-1", "fromSeq": latest + 1}),
            "SeqOutOfRange",
            format!("fromSeq {} is newer than current seq {latest}", latest + 1),
        ),
    ] {
        let (r, _) = stream(&mut w, "s", params.clone()).await;
        assert_eq!(
            (r["error"]["code"].as_str(), r["error"]["message"].as_str()),
            (Some(code), Some(msg.as_str())),
            "{params}"
        );
    }
    let mut narrowed = ws(s.addr).await;
    let mut hp = hello_params();
    hp["subscribe"] = json!(["other"]);
    connect(&mut narrowed, hp).await;
    let (r, _) = stream(&mut narrowed, "s", json!({"runId": "sv-1"})).await;
    assert_eq!(r["error"]["code"], "Unauthorized");
    let metrics = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(metrics.contains("smithers_devtools_subscribe_total{result=\"error\"} 7"));
}

#[tokio::test]
async fn stream_replays_then_follows_and_rebaselines_after_a_rewind() {
    let s = start(Spec {
        workflows: vec![("flipper", flipper(70, 8))],
        ..Default::default()
    })
    .await;
    create_anonymous(&s, "flipper", "sl-1").await;
    wait_status(s.addr, "sl-1", "finished").await;
    let latest = s.gw.store.last_frame_no("sl-1").await.unwrap();
    assert!(latest > 100, "a frame per iteration at least: {latest}");

    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    // replay from a 50-frame boundary: its snapshot, then one event per later frame (a
    // `fromSeq` below 50 has no boundary frame: see devtools_upstream.rs)
    let (r, mut pending) = stream(&mut w, "s1", json!({"runId": "sl-1", "fromSeq": 50})).await;
    assert_eq!(r["ok"], true, "{r}");
    let sid = r["payload"]["streamId"].as_str().unwrap().to_string();
    assert_eq!(r["payload"]["runId"], "sl-1");
    assert_eq!(r["payload"]["fromSeq"], 50);
    let mut tree = Value::Null;
    let first = next_devtools(&mut w, &mut pending, &sid).await;
    assert_eq!(first["event"], "devtools.event");
    assert_eq!(first["payload"]["event"]["kind"], "snapshot");
    assert_eq!(first["payload"]["event"]["snapshot"]["seq"], 50);
    assert_eq!(
        first["payload"]["event"]["snapshot"]["root"]["name"],
        "flipper"
    );
    assert_eq!(follow(&mut tree, &first), 50);
    let (mut in_a_row, mut longest, mut deltas, mut saw_ops) = (0, 0, 0, false);
    for n in 51..=latest {
        let ev = next_devtools(&mut w, &mut pending, &sid).await;
        assert_eq!(follow(&mut tree, &ev), n, "one event per frame, in order");
        if ev["payload"]["event"]["kind"] == "delta" {
            assert_eq!(ev["payload"]["event"]["delta"]["baseSeq"], n - 1);
            saw_ops |= ev["payload"]["event"]["delta"]["ops"]
                .as_array()
                .is_some_and(|o| o.iter().any(|op| op["op"] == "addNode"));
            in_a_row += 1;
            deltas += 1;
            longest = longest.max(in_a_row);
        } else {
            in_a_row = 0;
        }
    }
    assert!(deltas > 50, "mostly deltas: {deltas}");
    assert!(saw_ops, "deltas carried real changes");
    assert_eq!(longest, 49, "a snapshot at least every 50 events");
    // the client-side tree built from deltas equals the server's snapshot
    let snap = rpc(s.addr, "getDevToolsSnapshot", json!({"runId": "sl-1"}), &[])
        .await
        .json();
    assert_eq!(tree, snap["payload"]["root"]);

    // fromSeq mid-run starts at the keyframe boundary below it
    let (r, mut pending2) = stream(&mut w, "s2", json!({"runId": "sl-1", "fromSeq": 73})).await;
    let sid2 = r["payload"]["streamId"].as_str().unwrap().to_string();
    let ev = next_devtools(&mut w, &mut pending2, &sid2).await;
    assert_eq!(ev["payload"]["event"]["snapshot"]["seq"], 50);

    // a rewind re-baselines every open stream with a snapshot at or before the target
    let r = rpc(
        s.addr,
        "jumpToFrame",
        json!({"runId": "sl-1", "frameNo": 10, "confirm": true}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut pending = pending2;
    // skip what stream 2 replayed before the rewind
    loop {
        let ev = next_devtools(&mut w, &mut pending, &sid2).await;
        let e = &ev["payload"]["event"];
        if e["kind"] == "snapshot" && e["snapshot"]["seq"].as_i64().unwrap() <= 10 {
            break;
        }
    }
    // stream 1 was idle: its next event is that snapshot
    let ev = next_devtools(&mut w, &mut pending, &sid).await;
    assert_eq!(ev["payload"]["event"]["kind"], "snapshot", "{ev}");
    assert_eq!(ev["payload"]["event"]["snapshot"]["seq"], 10);
    // and then it follows the resumed run to the end
    let mut tree = ev["payload"]["event"]["snapshot"]["root"].clone();
    wait_status(s.addr, "sl-1", "finished").await;
    let latest = s.gw.store.last_frame_no("sl-1").await.unwrap();
    let mut seq = 10;
    while seq < latest {
        let ev = next_devtools(&mut w, &mut pending, &sid).await;
        seq = follow(&mut tree, &ev);
    }
    let snap = rpc(s.addr, "getDevToolsSnapshot", json!({"runId": "sl-1"}), &[])
        .await
        .json();
    assert_eq!(tree, snap["payload"]["root"]);

    // gauge: two streams on this run; closing the socket ends both
    let label = smithers_gateway::stream_registry::run_label("sl-1");
    let gauge = format!("smithers_devtools_active_subscribers{{runId=\"{label}\"}}");
    let metrics = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(metrics.contains(&format!("{gauge} 2")), "{metrics}");
    drop(w);
    for _ in 0..100 {
        if s.gw.streams.active("sl-1") == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.gw.streams.active("sl-1"), 0);
    let metrics = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(metrics.contains(&format!("{gauge} 0")), "{metrics}");
}

#[tokio::test]
async fn stream_follows_a_live_run() {
    let s = start(Spec {
        workflows: vec![("gated", GATED.to_string())],
        ..Default::default()
    })
    .await;
    create_anonymous(&s, "gated", "sg-1").await;
    wait_status(s.addr, "sg-1", "waiting-approval").await;
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    let (r, mut pending) = stream(&mut w, "s", json!({"runId": "sg-1"})).await;
    let sid = r["payload"]["streamId"].as_str().unwrap().to_string();
    assert_eq!(r["payload"]["fromSeq"], Value::Null);
    let first = next_devtools(&mut w, &mut pending, &sid).await;
    let snap = &first["payload"]["event"]["snapshot"];
    let at = snap["seq"].as_i64().unwrap();
    assert_eq!(at, s.gw.store.last_frame_no("sg-1").await.unwrap());
    assert_eq!(snap["runState"]["state"], "waiting-approval");
    let r = rpc(
        s.addr,
        "approvals.decide",
        json!({"runId": "sg-1", "nodeId": "gate", "approved": true}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_status(s.addr, "sg-1", "finished").await;
    let latest = s.gw.store.last_frame_no("sg-1").await.unwrap();
    let mut tree = snap["root"].clone();
    let mut seq = at;
    while seq < latest {
        let ev = next_devtools(&mut w, &mut pending, &sid).await;
        let n = follow(&mut tree, &ev);
        assert_eq!(n, seq + 1);
        seq = n;
    }
}

#[tokio::test]
async fn a_stream_nobody_reads_is_cut_off_alone() {
    let s = start(Spec {
        workflows: vec![
            ("flipper", flipper(1600, 16 * 1024)),
            ("gated", GATED.to_string()),
        ],
        ..Default::default()
    })
    .await;
    // every other frame swaps a node with a 16 KiB label, so the replay is far larger than
    // the socket buffers and the high-water mark together
    create_anonymous(&s, "flipper", "bp-big").await;
    create_anonymous(&s, "gated", "bp-quiet").await;
    wait_listed(s.addr, "bp-big", "finished").await;
    wait_status(s.addr, "bp-quiet", "waiting-approval").await;

    // a small receive buffer, so what the kernel holds for this client does not depend on the
    // machine's TCP autotuning
    let mut w = ws_small_receive_buffer(s.addr).await;
    connect(&mut w, hello_params()).await;
    let (quiet, mut pending) = stream(&mut w, "q", json!({"runId": "bp-quiet"})).await;
    let quiet_id = quiet["payload"]["streamId"].as_str().unwrap().to_string();
    let _ = next_devtools(&mut w, &mut pending, &quiet_id).await;
    // ask for a long replay (everything after frame 50: a fromSeq below 50 would start at the
    // latest frame) and stop reading until the server gives up on the stream
    send(
        &mut w,
        json!({"type": "req", "id": "big", "method": "streamDevTools", "params": {"runId": "bp-big", "fromSeq": 50}}),
    )
    .await;
    let mut waited = 0;
    while s.gw.streams.active("bp-big") > 0 || waited < 2 {
        assert!(waited < 600, "the unread stream was never cut off");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    // now read: buffered events, then the error for that stream only
    let big_id = loop {
        let f = next(&mut w).await;
        if f["id"] == "big" {
            break f["payload"]["streamId"].as_str().unwrap().to_string();
        }
    };
    let error = loop {
        let f = next(&mut w).await;
        if f["event"] == "devtools.error" {
            break f;
        }
        assert_eq!(f["event"], "devtools.event");
    };
    assert_eq!(
        error["payload"],
        json!({"streamId": big_id, "runId": "bp-big", "error": {"code": "BackpressureDisconnect",
            "message": "Subscriber outbound queue exceeded 1000 events."}})
    );
    // the socket still answers, and the other stream still delivers
    let mut evs = Vec::new();
    let h = call(&mut w, "h", "health", json!({}), &mut evs).await;
    assert_eq!(h["ok"], true);
    let r = rpc(
        s.addr,
        "approvals.decide",
        json!({"runId": "bp-quiet", "nodeId": "gate", "approved": true}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = next_devtools(&mut w, &mut evs, &quiet_id).await;
    assert_eq!(ev["event"], "devtools.event");
    let metrics = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        metrics.contains("smithers_devtools_backpressure_disconnect_total 1"),
        "{metrics}"
    );
    assert_eq!(s.gw.streams.active("bp-quiet"), 1);
}

/// `jumpToFrame {preview: true}` (an addition for confirmations): the owner or an admin learns
/// exactly what a rewind would delete (the same frames and attempts the rewind then deletes),
/// nothing changes and no quota is used; others are refused as for the rewind itself.
#[tokio::test]
async fn a_rewind_preview_names_what_the_rewind_deletes() {
    let s = start(Spec {
        workflows: vec![("steps", STEPS.to_string())],
        auth: users(),
        ..Default::default()
    })
    .await;
    create(&s, "bob", "steps", "pv-1", json!({})).await;
    wait_for(&s, "bob", "pv-1", "finished").await;
    let latest = s.gw.store.last_frame_no("pv-1").await.unwrap();
    let before = s.gw.store.list_attempts("pv-1").await.unwrap();
    let r = rpc_as(
        &s,
        "carl",
        "jumpToFrame",
        json!({"runId": "pv-1", "frameNo": 1, "preview": true}),
    )
    .await;
    assert_eq!(err(&r).1, "Unauthorized", "{}", r.body);
    for _ in 0..12 {
        // more previews than the hourly quota of rewinds: none counts
        let r = rpc_as(
            &s,
            "bob",
            "jumpToFrame",
            json!({"runId": "pv-1", "frameNo": 1, "preview": true}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let plan = rpc_as(
        &s,
        "bob",
        "jumpToFrame",
        json!({"runId": "pv-1", "frameNo": 1, "preview": true}),
    )
    .await
    .json()["payload"]
        .clone();
    assert_eq!(plan["deletedFrames"], json!(latest - 1), "{plan}");
    assert_eq!(plan["latestFrameNo"], json!(latest));
    assert_eq!(s.gw.store.last_frame_no("pv-1").await.unwrap(), latest);
    assert_eq!(s.gw.store.list_attempts("pv-1").await.unwrap(), before);
    let bad = rpc_as(
        &s,
        "bob",
        "jumpToFrame",
        json!({"runId": "pv-1", "frameNo": latest + 5, "preview": true}),
    )
    .await;
    assert_eq!(err(&bad).1, "FrameOutOfRange", "{}", bad.body);

    let done = rpc_as(
        &s,
        "bob",
        "jumpToFrame",
        json!({"runId": "pv-1", "frameNo": 1, "confirm": true}),
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.body);
    let done = done.json()["payload"].clone();
    assert_eq!(done["deletedFrames"], plan["deletedFrames"]);
    assert_eq!(
        done["deletedAttempts"], plan["deletedAttempts"],
        "{done} vs {plan}"
    );
    let previewed: Vec<(String, i64)> = plan["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["nodeId"].as_str().unwrap().to_string(),
                a["attempt"].as_i64().unwrap(),
            )
        })
        .collect();
    let kept: Vec<(String, i64)> =
        s.gw.store
            .list_attempts("pv-1")
            .await
            .unwrap()
            .into_iter()
            .filter(|a| {
                before.iter().any(|b| {
                    b.node_id == a.node_id
                        && b.attempt == a.attempt
                        && b.started_at_ms == a.started_at_ms
                })
            })
            .map(|a| (a.node_id, a.attempt))
            .collect();
    for p in &previewed {
        assert!(
            !kept.contains(p),
            "{p:?} was previewed as deleted but survived"
        );
    }
    assert_eq!(kept.len() + previewed.len(), before.len());
}
