//! DevTools behaving as upstream clients expect (issue 12), over a real server and WebSocket:
//! node ids our snapshots show are accepted, `fromSeq` the window cannot fill, the
//! snapshot-or-delta size rule with `replaceRoot`, the order of additions, `fromSeq: null`,
//! `NodeHasNoOutput`, approvals as task nodes, string correlation keys, and frames stored
//! before frames had a `smithers:workflow` root.

mod common;

use common::*;
use serde_json::{Value, json};
use smithers_gateway::{devtools_diff, devtools_tree};
use smithers_store::{Batch, FrameRow, RunRow, Write, status};
use std::time::Duration;

/// Every task node of a DevTools tree, as upstream's `collectTasks` helper finds them.
fn collect_tasks(n: &Value, out: &mut Vec<Value>) {
    if n["type"] == "task" && n["task"].is_object() {
        out.push(n.clone());
    }
    for c in n["children"].as_array().into_iter().flatten() {
        collect_tasks(c, out);
    }
}

async fn ok(s: &TestServer, method: &str, params: Value) -> Value {
    let r = rpc(s.addr, method, params.clone(), &[]).await;
    assert_eq!(r.status, 200, "{method} {params}: {}", r.body);
    r.json()["payload"].clone()
}

async fn code_of(s: &TestServer, method: &str, params: Value) -> (u16, String, String) {
    let r = rpc(s.addr, method, params, &[]).await;
    let j = r.json();
    (
        r.status,
        j["error"]["code"].as_str().unwrap_or("").to_string(),
        j["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

async fn stream(w: &mut Ws, id: &str, params: Value) -> (Value, Vec<Value>) {
    let mut evs = Vec::new();
    let r = call(w, id, "streamDevTools", params, &mut evs).await;
    (r, evs)
}

/// Next event of a stream (other frames kept aside).
async fn next_of(w: &mut Ws, pending: &mut Vec<Value>, sid: &str) -> Value {
    if let Some(i) = pending.iter().position(|f| f["payload"]["streamId"] == sid) {
        return pending.remove(i);
    }
    loop {
        let f = next(w).await;
        if f["payload"]["streamId"] == sid {
            return f;
        }
        pending.push(f);
    }
}

/// Whether the stream sends anything else within `ms`.
async fn quiet(w: &mut Ws, pending: &mut Vec<Value>, sid: &str, ms: u64) -> Option<Value> {
    if let Some(i) = pending.iter().position(|f| f["payload"]["streamId"] == sid) {
        return Some(pending.remove(i));
    }
    let until = tokio::time::Instant::now() + Duration::from_millis(ms);
    while let Ok(f) = tokio::time::timeout_at(until, next(w)).await {
        if f["payload"]["streamId"] == sid {
            return Some(f);
        }
        pending.push(f);
    }
    None
}

// ----- 1. node ids --------------------------------------------------------------------------

const KINDS: &str = r#"name: kinds
steps:
  - task: {id: lint.check, value: {ok: true}}
  - task: {id: build.v2, run: "true"}
  - parallel:
      id: par.group
      steps:
        - task: {id: p.one, value: 1}
        - task: {id: p-two_2, value: 2}
  - branch:
      if: "true"
      then: {task: {id: br.yes, value: 1}}
  - loop:
      id: outer
      max_iterations: 2
      steps:
        - loop:
            id: in.ner
            max_iterations: 2
            steps:
              - task: {id: work.item, value: {i: "{{ iteration }}"}, output: {type: object}}
  - subflow: {id: sub.flow, workflow: hello}
  - timer: {id: cool.off, duration: 10ms}
  - wait_for_event: {id: ci.wait, event: ci.done}
  - approval: {id: ship.gate, title: "Ship?"}
"#;

#[tokio::test]
async fn ids_of_every_node_kind_and_nesting_are_accepted_by_node_output_and_diff() {
    // the subflow is found as a file next to the workflow
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.yaml"), HELLO).unwrap();
    let s = start_in(
        dir,
        Spec {
            workflows: vec![("kinds", KINDS.into()), ("hello", HELLO.into())],
            ..Default::default()
        },
    )
    .await;
    ok(
        &s,
        "runs.create",
        json!({"workflow": "kinds", "runId": "ids-1"}),
    )
    .await;
    wait_status(s.addr, "ids-1", "waiting-event").await;
    ok(
        &s,
        "signals.send",
        json!({"runId": "ids-1", "signalName": "ci.done", "data": {}}),
    )
    .await;
    wait_status(s.addr, "ids-1", "waiting-approval").await;

    // every node the run has rows for, including the loop-scoped ones
    let nodes = s.gw.store.list_nodes("ids-1").await.unwrap();
    let ids: Vec<(String, i64)> = nodes
        .iter()
        .map(|n| (n.node_id.clone(), n.iteration))
        .collect();
    for want in [
        "lint.check",
        "build.v2",
        "p.one",
        "br.yes",
        "work.item@@outer=0",
        "work.item@@outer=1",
        "sub.flow",
        "cool.off",
        "ci.wait",
        "ship.gate",
    ] {
        assert!(ids.iter().any(|(n, _)| n == want), "{want} in {ids:?}");
    }
    // ... and every task node the snapshot shows
    let snap = ok(&s, "getDevToolsSnapshot", json!({"runId": "ids-1"})).await;
    let mut tasks = Vec::new();
    collect_tasks(&snap["root"], &mut tasks);
    let mut asked: Vec<(String, i64)> = tasks
        .iter()
        .map(|t| {
            (
                t["task"]["nodeId"].as_str().unwrap().to_string(),
                t["task"]["iteration"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert!(asked.iter().any(|(n, _)| n == "ship.gate"), "{asked:?}");
    let stored = ids.len();
    asked.splice(0..0, ids);
    for (i, (node, it)) in asked.into_iter().enumerate() {
        for method in ["getNodeOutput", "getNodeDiff"] {
            let p = json!({"runId": "ids-1", "nodeId": node, "iteration": it});
            let (_, code, msg) = code_of(&s, method, p.clone()).await;
            assert_ne!(code, "InvalidNodeId", "{method} {p}: {msg}");
            if i < stored {
                // a node with rows is found (its output or diff may legitimately be missing)
                assert_ne!(code, "NodeNotFound", "{method} {p}: {msg}");
            }
        }
    }
    let out = ok(
        &s,
        "getNodeOutput",
        json!({"runId": "ids-1", "nodeId": "work.item@@outer=1", "iteration": 1}),
    )
    .await;
    assert_eq!(out["status"], "produced", "{out}");
    // still refused: what no workflow id can be
    for bad in [
        "a b",
        "a/b",
        "x@@",
        "x@@outer",
        "x@@outer=y",
        &"n".repeat(129),
    ] {
        for method in ["getNodeOutput", "getNodeDiff"] {
            let (status, code, _) = code_of(
                &s,
                method,
                json!({"runId": "ids-1", "nodeId": bad, "iteration": 0}),
            )
            .await;
            assert_eq!(
                (status, code.as_str()),
                (400, "InvalidNodeId"),
                "{method} {bad}"
            );
        }
    }
}

// ----- 2. fromSeq the 50-frame window cannot fill ---------------------------------------------

fn flipper(iterations: u32) -> String {
    format!(
        "name: flipper\nsteps:\n  - loop:\n      id: l\n      max_iterations: {iterations}\n      steps:\n        - branch:\n            if: \"iteration % 2 == 0\"\n            then: {{task: {{id: even, value: 1, label: e}}}}\n            else: {{task: {{id: odd, value: 2, label: o}}}}\n"
    )
}

#[tokio::test]
async fn from_seq_the_window_cannot_fill_sends_one_snapshot_of_the_latest_frame() {
    let s = start(Spec {
        workflows: vec![("flipper", flipper(40))],
        ..Default::default()
    })
    .await;
    ok(
        &s,
        "runs.create",
        json!({"workflow": "flipper", "runId": "fs-1"}),
    )
    .await;
    wait_status(s.addr, "fs-1", "finished").await;
    let latest = s.gw.store.last_frame_no("fs-1").await.unwrap();
    assert!(latest > 50, "{latest}");
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    for (i, from) in [0, 1, 7, 49, latest].into_iter().enumerate() {
        let (r, mut pending) = stream(
            &mut w,
            &format!("s{i}"),
            json!({"runId": "fs-1", "fromSeq": from}),
        )
        .await;
        assert_eq!(r["payload"]["fromSeq"], from, "{r}");
        let sid = r["payload"]["streamId"].as_str().unwrap().to_string();
        let first = next_of(&mut w, &mut pending, &sid).await;
        let e = &first["payload"]["event"];
        assert_eq!(
            (e["kind"].as_str(), e["snapshot"]["seq"].as_i64()),
            (Some("snapshot"), Some(latest)),
            "fromSeq {from}: {e}"
        );
        assert_ne!(e["snapshot"]["root"]["name"], "(empty)");
        // and nothing is replayed after it
        assert_eq!(
            quiet(&mut w, &mut pending, &sid, 300).await,
            None,
            "fromSeq {from}"
        );
    }
    // a boundary that exists is still replayed from
    let (r, mut pending) = stream(&mut w, "s50", json!({"runId": "fs-1", "fromSeq": 50})).await;
    let sid = r["payload"]["streamId"].as_str().unwrap().to_string();
    let first = next_of(&mut w, &mut pending, &sid).await;
    assert_eq!(first["payload"]["event"]["snapshot"]["seq"], 50);
    if latest > 50 {
        let second = next_of(&mut w, &mut pending, &sid).await;
        let e = &second["payload"]["event"];
        assert_eq!(
            e["delta"]["seq"].as_i64().or(e["snapshot"]["seq"].as_i64()),
            Some(51)
        );
    }
}

// ----- 5. fromSeq: null -----------------------------------------------------------------------

#[tokio::test]
async fn from_seq_null_is_refused_as_upstream() {
    let s = start(Spec::default()).await;
    ok(
        &s,
        "runs.create",
        json!({"workflow": "hello", "runId": "fn-1"}),
    )
    .await;
    wait_status(s.addr, "fn-1", "finished").await;
    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    let (r, _) = stream(&mut w, "n", json!({"runId": "fn-1", "fromSeq": null})).await;
    assert_eq!(
        (r["error"]["code"].as_str(), r["error"]["message"].as_str()),
        (
            Some("SeqOutOfRange"),
            Some("fromSeq must be a non-negative integer.")
        ),
        "{r}"
    );
    // absent still means "from the latest frame"
    let (r, _) = stream(&mut w, "a", json!({"runId": "fn-1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["payload"]["fromSeq"], Value::Null);
}

// ----- 3, 4, 9. size rule, replaceRoot, addition order, old frames ----------------------------

/// A run row written straight to the store, so the test decides every frame.
fn run_row(run_id: &str, workflow: &str) -> RunRow {
    let mut r = smithers_store::conformance::run_row(run_id, workflow, 1);
    r.status = status::FINISHED.into();
    r.started_at_ms = Some(1);
    r.finished_at_ms = Some(2);
    r
}

async fn write(s: &TestServer, writes: Vec<Write>) {
    s.gw.store
        .apply(Batch {
            guard: None,
            writes,
        })
        .await
        .unwrap();
}

async fn put_frame(s: &TestServer, run_id: &str, frame_no: i64, tree: &Value) {
    let text = tree.to_string();
    write(
        s,
        vec![Write::InsertFrame(FrameRow {
            run_id: run_id.into(),
            frame_no,
            created_at_ms: 10 + frame_no,
            xml_hash: smithers_engine::frames::sha256_hex(&text),
            xml_json: text,
            encoding: "keyframe".into(),
            mounted_task_ids_json: None,
            task_index_json: None,
            note: None,
        })],
    )
    .await;
}

fn task(id: &str, label: &str) -> Value {
    json!({"kind": "element", "tag": "smithers:task", "props": {"id": id, "kind": "value", "label": label}, "children": []})
}

fn steps(tasks: Vec<Value>) -> Value {
    json!({"kind": "element", "tag": "smithers:sequence", "props": {}, "children": tasks})
}

fn workflow(name: &str, tasks: Vec<Value>) -> Value {
    json!({"kind": "element", "tag": "smithers:workflow", "props": {"name": name}, "children": [steps(tasks)]})
}

/// `n` tasks, the first `reversed` of them in reverse order (each of those moves).
fn tasks(n: usize, reversed: usize, width: usize) -> Vec<Value> {
    let mut order: Vec<usize> = (0..n).collect();
    order[..reversed].reverse();
    order
        .into_iter()
        .map(|i| task(&format!("t{i}"), &"x".repeat(width)))
        .collect()
}

/// The byte sizes of the delta event and of the snapshot event for going from tree `a` to
/// tree `b` at frame `seq`, and the size of `b`'s tree, computed as the server does.
fn sizes(a: &Value, b: &Value, seq: i64, run_state: &Value, run_id: &str) -> (usize, usize, usize) {
    let (ta, tb) = (
        devtools_tree::build_frame(a, "wf"),
        devtools_tree::build_frame(b, "wf"),
    );
    let ops = serde_json::to_string(&devtools_diff::ops(&ta, &tb)).unwrap();
    let delta = format!(
        r#"{{"version":1,"kind":"delta","delta":{{"version":1,"baseSeq":{},"seq":{seq},"ops":{ops}}}}}"#,
        seq - 1
    );
    let root = serde_json::to_string(&tb).unwrap();
    let snapshot = json!({"version": 1, "kind": "snapshot", "snapshot": {
        "version": 1, "runId": run_id, "frameNo": seq, "seq": seq,
        "root": serde_json::from_str::<Value>(&root).unwrap(), "runState": run_state}})
    .to_string();
    (delta.len(), snapshot.len(), root.len())
}

#[tokio::test]
async fn snapshot_or_delta_by_event_size_replace_root_addition_order_and_old_frames() {
    let s = start(Spec::default()).await;
    // a long run id makes the snapshot event much larger than its tree
    let run_id = format!("sz-{}", "r".repeat(200));
    write(&s, vec![Write::InsertRun(run_row(&run_id, "wf"))]).await;
    let run_state =
        ok(&s, "getDevToolsSnapshot", json!({"runId": run_id})).await["runState"].clone();
    assert_eq!(run_state["state"], "succeeded");

    // find a reordering whose delta is at least 100 bytes larger than the tree (the old rule
    // sent a snapshot for it) yet smaller than the whole snapshot event (upstream sends the
    // delta)
    let width = 20;
    let (n, changed) = (1..=40usize)
        .flat_map(|n| (2..=n).map(move |c| (n, c)))
        .find(|&(n, c)| {
            let a = workflow("wf", tasks(n, 0, width));
            let b = workflow("wf", tasks(n, c, width));
            let (d, snap, tree) = sizes(&a, &b, 2, &run_state, &run_id);
            d >= tree + 100 && d < snap
        })
        .expect("a reordering between the two thresholds");

    let mut w = ws(s.addr).await;
    connect(&mut w, hello_params()).await;
    let (r, mut pending) = stream(&mut w, "s", json!({"runId": run_id})).await;
    assert_eq!(r["ok"], true, "{r}");
    let sid = r["payload"]["streamId"].as_str().unwrap().to_string();
    let first = next_of(&mut w, &mut pending, &sid).await;
    assert_eq!(
        first["payload"]["event"]["snapshot"]["root"]["name"],
        "(empty)"
    );
    let mut tree = first["payload"]["event"]["snapshot"]["root"].clone();

    // frame 1, stored the old way (no smithers:workflow root): after the empty tree the root
    // changes, so the event is a delta that replaces it; the root shown is the workflow's
    let f1 = steps(tasks(n, 0, width));
    put_frame(&s, &run_id, 1, &f1).await;
    let ev = next_of(&mut w, &mut pending, &sid).await;
    let e = &ev["payload"]["event"];
    assert_eq!(e["kind"], "delta", "{e}");
    assert_eq!(
        (e["delta"]["baseSeq"].as_i64(), e["delta"]["seq"].as_i64()),
        (Some(0), Some(1))
    );
    let ops = e["delta"]["ops"].as_array().unwrap().clone();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0]["op"], "replaceRoot");
    assert_eq!(
        (
            ops[0]["node"]["type"].as_str(),
            ops[0]["node"]["name"].as_str(),
            ops[0]["node"]["id"].as_u64()
        ),
        (Some("workflow"), Some("wf"), Some(1_753_301_139))
    );
    tree = devtools_diff::apply(&tree, &ops).unwrap();
    let snap1 = ok(
        &s,
        "getDevToolsSnapshot",
        json!({"runId": run_id, "frameNo": 1}),
    )
    .await;
    assert_eq!(
        tree, snap1["root"],
        "the old frame renders under the workflow root"
    );

    // frame 2, stored the new way: same root (no replaceRoot), and a delta although it is more
    // than 100 bytes larger than the tree, because it is smaller than the snapshot event
    let f2 = workflow("wf", tasks(n, changed, width));
    put_frame(&s, &run_id, 2, &f2).await;
    let ev = next_of(&mut w, &mut pending, &sid).await;
    let e = &ev["payload"]["event"];
    assert_eq!(e["kind"], "delta", "n={n} changed={changed}: {e}");
    let ops = e["delta"]["ops"].as_array().unwrap().clone();
    assert!(ops.iter().all(|o| o["op"] != "replaceRoot"), "{ops:?}");
    let snap2 = ok(
        &s,
        "getDevToolsSnapshot",
        json!({"runId": run_id, "frameNo": 2}),
    )
    .await;
    assert_eq!(devtools_diff::apply(&tree, &ops).unwrap(), snap2["root"]);

    // frame 3: every task replaced by many new ones: the delta (one addNode each) would be at
    // least as large as the snapshot event, so a snapshot is sent
    let f3 = workflow(
        "wf",
        (0..60)
            .map(|i| task(&format!("u{i}"), &"z".repeat(width)))
            .collect(),
    );
    let (d, snap, _) = sizes(&f2, &f3, 3, &run_state, &run_id);
    assert!(d >= snap, "{d} < {snap}");
    put_frame(&s, &run_id, 3, &f3).await;
    let ev = next_of(&mut w, &mut pending, &sid).await;
    assert_eq!(ev["payload"]["event"]["kind"], "snapshot");
    assert_eq!(ev["payload"]["event"]["snapshot"]["seq"], 3);
    tree = ev["payload"]["event"]["snapshot"]["root"].clone();

    // frames 4 → 5: a and b move, n and m appear: moved nodes first in the old order, then
    // the new ones
    put_frame(
        &s,
        &run_id,
        4,
        &workflow("wf", vec![task("a", "a"), task("b", "b")]),
    )
    .await;
    let ev = next_of(&mut w, &mut pending, &sid).await;
    assert_eq!(
        ev["payload"]["event"]["delta"]["seq"]
            .as_i64()
            .or(ev["payload"]["event"]["snapshot"]["seq"].as_i64()),
        Some(4)
    );
    let e = &ev["payload"]["event"];
    tree = if e["kind"] == "snapshot" {
        e["snapshot"]["root"].clone()
    } else {
        devtools_diff::apply(&tree, e["delta"]["ops"].as_array().unwrap()).unwrap()
    };
    let f5 = workflow(
        "wf",
        vec![
            task("n", "n"),
            task("a", "a"),
            task("m", "m"),
            task("b", "b"),
        ],
    );
    put_frame(&s, &run_id, 5, &f5).await;
    let ev = next_of(&mut w, &mut pending, &sid).await;
    let e = &ev["payload"]["event"];
    assert_eq!(e["kind"], "delta", "{e}");
    let ops = e["delta"]["ops"].as_array().unwrap().clone();
    let added: Vec<(String, u64)> = ops
        .iter()
        .filter(|o| o["op"] == "addNode")
        .map(|o| {
            (
                o["node"]["task"]["nodeId"].as_str().unwrap().to_string(),
                o["index"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        added,
        vec![
            ("a".into(), 1),
            ("b".into(), 3),
            ("n".into(), 0),
            ("m".into(), 2)
        ]
    );
    tree = devtools_diff::apply(&tree, &ops).unwrap();
    let snap5 = ok(&s, "getDevToolsSnapshot", json!({"runId": run_id})).await;
    assert_eq!(tree, snap5["root"]);
}

// ----- 6. NodeHasNoOutput; a pending node's schema from the workflow -------------------------

#[tokio::test]
async fn node_without_output_table_and_pending_schema_from_the_workflow() {
    let wf = "name: out\noutputs:\n  review: {type: object, required: [ok], properties: {ok: {type: boolean}}}\nsteps:\n  - task: {id: plain, value: {n: 1}}\n  - approval: {id: gate, title: go?}\n  - task: {id: later, output: review, value: {ok: true}}\n  - task: {id: inline, output: {type: object, properties: {x: {type: string}}}, value: {x: a}}\n";
    let s = start(Spec {
        workflows: vec![("out", wf.into())],
        ..Default::default()
    })
    .await;
    ok(
        &s,
        "runs.create",
        json!({"workflow": "out", "runId": "no-1"}),
    )
    .await;
    wait_status(s.addr, "no-1", "waiting-approval").await;
    let (status, code, msg) = code_of(
        &s,
        "getNodeOutput",
        json!({"runId": "no-1", "nodeId": "plain", "iteration": 0}),
    )
    .await;
    assert_eq!(
        (status, code.as_str(), msg.as_str()),
        (404, "NodeHasNoOutput", "Node plain has no output table.")
    );
    // never attempted: the schema comes from the workflow (named and inline)
    for (node, field, ty) in [("later", "ok", "boolean"), ("inline", "x", "string")] {
        let p = ok(
            &s,
            "getNodeOutput",
            json!({"runId": "no-1", "nodeId": node, "iteration": 0}),
        )
        .await;
        assert_eq!(p["status"], "pending", "{node}: {p}");
        assert_eq!(p["schema"]["fields"][0]["name"], field, "{node}: {p}");
        assert_eq!(p["schema"]["fields"][0]["type"], ty, "{node}: {p}");
    }
}

// ----- 7. approvals are task nodes -----------------------------------------------------------

#[tokio::test]
async fn approvals_are_task_nodes_with_their_title_as_label() {
    let s = start(Spec {
        workflows: vec![("gated", GATED.into())],
        ..Default::default()
    })
    .await;
    ok(
        &s,
        "runs.create",
        json!({"workflow": "gated", "runId": "ap-1"}),
    )
    .await;
    wait_status(s.addr, "ap-1", "waiting-approval").await;
    let snap = ok(&s, "getDevToolsSnapshot", json!({"runId": "ap-1"})).await;
    let mut tasks = Vec::new();
    collect_tasks(&snap["root"], &mut tasks);
    // as upstream's findNodeById / collectTasks see `<Approval id="gate">`
    let gate = tasks
        .iter()
        .find(|t| t["task"]["nodeId"] == "gate")
        .unwrap_or_else(|| panic!("no gate task in {tasks:?}"));
    assert_eq!(gate["type"], "task");
    assert_eq!(gate["task"]["label"], "ok?");
    assert_eq!(gate["task"]["kind"], "compute");
    let ids: Vec<&str> = tasks
        .iter()
        .filter_map(|t| t["task"]["nodeId"].as_str())
        .collect();
    assert_eq!(ids, vec!["a", "gate", "b"]);
}

// ----- 8. runState.blocked.correlationKey ----------------------------------------------------

#[tokio::test]
async fn a_blocked_wait_has_a_string_correlation_key() {
    let plain = "name: plainwait\nsteps:\n  - wait_for_event: {id: ci, event: ci.done}\n";
    let s = start(Spec {
        workflows: vec![("waiter", WAITER.into()), ("plainwait", plain.into())],
        ..Default::default()
    })
    .await;
    ok(
        &s,
        "runs.create",
        json!({"workflow": "plainwait", "runId": "ck-1"}),
    )
    .await;
    ok(
        &s,
        "runs.create",
        json!({"workflow": "waiter", "runId": "ck-2", "input": {"sha": "abc123"}}),
    )
    .await;
    for (run, key) in [("ck-1", "ci.done"), ("ck-2", "abc123")] {
        wait_status(s.addr, run, "waiting-event").await;
        let snap = ok(&s, "getDevToolsSnapshot", json!({"runId": run})).await;
        assert_eq!(
            snap["runState"]["blocked"],
            json!({"kind": "event", "nodeId": "ci", "correlationKey": key}),
            "{run}"
        );
        let got = ok(&s, "runs.get", json!({"runId": run})).await;
        assert_eq!(got["runState"]["blocked"]["correlationKey"], key, "{run}");
    }
}
