//! Engine behaviour against a real SQLite file: scheduling, retries, timeouts, approvals,
//! signals, timers, loops, subflows, cancellation and leases.

use serde_json::{Value, json};
use smithers_core::build::{FnWorkflow, par, repeat, seq, shell, value};
use smithers_core::tree::{
    ApprovalMode, ApprovalSpec, Node, OnDeny, OnTimeout, SubflowSpec, TimerSpec, WaitSpec,
};
use smithers_core::{Code, NodeRef, RenderCtx, Task, TaskKind, Workflow};
use smithers_engine::{Engine, EngineConfig, RunOutcome, StartOptions, ops};
use smithers_store::Store;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Env {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    store: Arc<dyn Store>,
    engine: Engine,
}

async fn env() -> Env {
    env_with(EngineConfig::default()).await
}

async fn env_with(cfg: EngineConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let store = smithers_store::open(&format!("sqlite://{}", path.join("db.sqlite").display()))
        .await
        .unwrap();
    let cfg = EngineConfig {
        default_cwd: Some(path.clone()),
        ..cfg
    };
    let engine = Engine::new(store.clone(), cfg);
    Env {
        _dir: dir,
        path,
        store,
        engine,
    }
}

fn wf(
    name: &str,
    f: impl Fn(&RenderCtx) -> smithers_core::Result<NodeRef> + Send + Sync + 'static,
) -> Arc<dyn Workflow> {
    Arc::new(FnWorkflow::new(name, f))
}

async fn run(e: &Env, w: Arc<dyn Workflow>, input: Value) -> RunOutcome {
    e.engine
        .start(w, input, StartOptions::default())
        .await
        .unwrap()
        .wait()
        .await
}

fn approval(id: &str, mode: ApprovalMode, on_deny: OnDeny) -> NodeRef {
    let spec = ApprovalSpec {
        title: format!("ok {id}?"),
        summary: None,
        mode,
        options: vec![
            smithers_core::tree::ApprovalOption {
                key: "a".into(),
                label: "A".into(),
                summary: None,
            },
            smithers_core::tree::ApprovalOption {
                key: "b".into(),
                label: "B".into(),
                summary: None,
            },
        ],
        on_deny,
        allowed_users: vec![],
        allowed_scopes: vec![],
        auto_approve_after: None,
    };
    Task::new(id, TaskKind::Approval(spec)).node()
}

#[tokio::test]
async fn value_chain_finishes_with_frames_and_ordered_events() {
    let e = env().await;
    let w = wf("chain", |_| {
        Ok(seq((0..10)
            .map(|i| value(&format!("t{i}"), json!(i)))
            .map(|t| t.node())
            .collect()))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(o.output.unwrap()["t9"], json!(9));
    let frames = e.store.last_frame_no(&o.run_id).await.unwrap();
    assert!(frames >= 10, "one frame per render, got {frames}");
    let evs = e.store.list_events(&o.run_id, None, 10_000).await.unwrap();
    for (i, ev) in evs.iter().enumerate() {
        assert_eq!(ev.seq, i as i64);
    }
    assert_eq!(
        evs.iter()
            .filter(|e| e.event_type == "NodeFinished")
            .count(),
        10
    );
    assert_eq!(evs.last().unwrap().event_type, "RunFinished");
    let run = e.store.get_run(&o.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, "finished");
    assert!(run.runtime_owner_id.is_none());
    // every frame can be rebuilt
    for f in 1..=frames {
        let fr = smithers_engine::frames::read_frame(e.store.as_ref(), &o.run_id, f)
            .await
            .unwrap()
            .unwrap();
        let tree: Value = serde_json::from_str(&fr.xml_json).unwrap();
        assert_eq!(tree["tag"], "smithers:workflow");
        assert_eq!(tree["children"][0]["tag"], "smithers:sequence");
    }
}

/// Steps that only record values commit together with the step that ends the run. (A step that
/// starts a process still commits before the process runs: `leftovers` and the crash tests.)
#[tokio::test]
async fn value_steps_share_one_commit_with_the_end_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(smithers_store::sqlite::SqliteStore::open(&dir.path().join("db.sqlite")).unwrap());
    let cfg = EngineConfig {
        default_cwd: Some(dir.path().to_path_buf()),
        // no heartbeat write lands inside the measured runs
        heartbeat_interval_ms: 600_000,
        ..EngineConfig::default()
    };
    let engine = Engine::new(store.clone(), cfg);
    let commits_of = |w: Arc<dyn Workflow>| {
        let (engine, store) = (&engine, store.clone());
        async move {
            let before = store.write_requests();
            let o = engine
                .start(w, json!({}), StartOptions::default())
                .await
                .unwrap()
                .wait()
                .await;
            assert_eq!(o.status, "finished", "{:?}", o.error);
            (o, store.write_requests() - before)
        }
    };
    let (_, one) = commits_of(wf("one", |_| Ok(seq(vec![value("t", json!(1)).node()])))).await;
    assert_eq!(one, 2, "a one-task run: the start, then everything else");
    let (o, chain) = commits_of(wf("chain", |_| {
        Ok(seq((0..10)
            .map(|i| value(&format!("t{i}"), json!(i)).node())
            .collect()))
    }))
    .await;
    assert_eq!(chain, 2, "ten value steps, one commit after the start");
    // nothing was lost by committing later: every step's frame, row and event is there
    assert!(store.last_frame_no(&o.run_id).await.unwrap() >= 11);
    assert_eq!(store.list_outputs(&o.run_id).await.unwrap().len(), 10);
    // a long chain still commits in bounded transactions, not one per step
    let (o, long) = commits_of(wf("long", |_| {
        Ok(seq((0..150)
            .map(|i| value(&format!("t{i}"), json!(i)).node())
            .collect()))
    }))
    .await;
    assert!(
        (3..30).contains(&long),
        "150 value steps took {long} commits"
    );
    assert_eq!(store.list_outputs(&o.run_id).await.unwrap().len(), 150);
}

#[tokio::test]
async fn later_steps_see_earlier_outputs() {
    let e = env().await;
    let w = wf("dyn", |ctx| {
        let a = ctx
            .outputs
            .latest("a")
            .and_then(|v| v["n"].as_i64())
            .unwrap_or(0);
        Ok(seq(vec![
            value("a", json!({"n": 20})).node(),
            value("b", json!({"double": a * 2})).node(),
        ]))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.output.unwrap()["b"], json!({"double": 40}));
}

#[tokio::test]
async fn parallel_respects_max_concurrency() {
    let e = env().await;
    let log = e.path.join("log");
    let l = log.display().to_string();
    let w = wf("par", move |_| {
        let kids = (0..5)
            .map(|i| {
                shell(
                    &format!("p{i}"),
                    &format!("echo start >> {l}; sleep 0.3; echo end >> {l}"),
                )
                .node()
            })
            .collect();
        Ok(par(Some(2), kids))
    });
    let t0 = Instant::now();
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let text = std::fs::read_to_string(&log).unwrap();
    let (mut cur, mut max) = (0, 0);
    for line in text.lines() {
        if line == "start" {
            cur += 1;
            max = max.max(cur)
        } else {
            cur -= 1
        }
    }
    assert_eq!(max, 2, "{text}");
    assert!(t0.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn retries_with_backoff_then_succeeds() {
    let e = env().await;
    let counter = e.path.join("count");
    let c = counter.display().to_string();
    let w = wf("retry", move |_| {
        let cmd = format!(
            "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; [ $n -ge 3 ] || {{ echo fail$n >&2; exit 1; }}; echo '{{\"n\": '$n'}}'"
        );
        Ok(seq(vec![
            shell("flaky", &cmd)
                .retries(2, 50)
                .output_schema(json!({"type": "object"}))
                .node(),
        ]))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(o.output.unwrap()["flaky"], json!({"n": 3}));
    let att = e
        .store
        .list_node_attempts(&o.run_id, "flaky", 0)
        .await
        .unwrap();
    assert_eq!(att.len(), 3);
    assert_eq!(att[0].state, "finished");
    assert!(att[1].error_json.as_deref().unwrap().contains("fail2"));
}

#[tokio::test]
async fn exhausted_retries_fail_the_run_with_stderr() {
    let e = env().await;
    let w = wf("fail", |_| {
        Ok(seq(vec![
            shell("bad", "echo broken-thing >&2; exit 4")
                .retries(1, 10)
                .node(),
        ]))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "failed");
    let err = o.error.unwrap();
    assert!(
        err.message.contains("exited with 4") && err.message.contains("broken-thing"),
        "{}",
        err.message
    );
    assert_eq!(err.node.as_deref(), Some("bad"));
    assert_eq!(
        e.store
            .list_node_attempts(&o.run_id, "bad", 0)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn timeout_fails_attempt_quickly() {
    let e = env().await;
    let w = wf("slow", |_| {
        Ok(seq(vec![shell("slow", "sleep 10").timeout_ms(200).node()]))
    });
    let t0 = Instant::now();
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "failed");
    assert_eq!(o.error.unwrap().code, Code::TaskTimeout);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn invalid_output_names_path_and_rule() {
    let e = env().await;
    let w = wf("schema", |_| {
        Ok(seq(vec![
            value("v", json!({"ok": "yes"}))
                .output_schema(json!({"type": "object", "properties": {"ok": {"type": "boolean"}}}))
                .node(),
        ]))
    });
    let o = run(&e, w, json!({})).await;
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::InvalidOutput);
    assert!(
        err.message.contains("/ok") && err.message.contains("type"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn skip_continue_on_fail_and_depends_on() {
    let e = env().await;
    let w = wf("flags", |_| {
        Ok(par(
            None,
            vec![
                shell("broken", "exit 1").continue_on_fail().node(),
                value("after", json!(1)).depends_on(&["broken"]).node(),
                value("skipped", json!(2)).skip(true).node(),
            ],
        ))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let out = o.output.unwrap();
    assert_eq!(out["after"], json!(1));
    assert!(out.get("skipped").is_none());
    let n = e
        .store
        .get_node(&o.run_id, "skipped", 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.state, "skipped");
}

#[tokio::test]
async fn unmounted_dependency_is_a_clear_error() {
    let e = env().await;
    let w = wf("deps", |_| {
        Ok(seq(vec![
            value("a", json!(1)).depends_on(&["ghost"]).node(),
        ]))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "failed");
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::SchedulerError);
    assert!(err.message.contains("ghost"));
}

#[tokio::test]
async fn render_error_fails_run_and_names_node() {
    let e = env().await;
    let w = wf("err", |_| {
        Err(smithers_core::SmithersError::new(
            Code::ExpressionError,
            "node `x`: expression `1 +` failed",
        )
        .with_node("x"))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "failed");
    assert_eq!(o.error.unwrap().code, Code::ExpressionError);
}

#[tokio::test]
async fn loop_runs_until_condition() {
    let e = env().await;
    let w = wf("loop", |ctx| {
        let done = ctx
            .outputs
            .latest("step")
            .and_then(|v| v.as_i64())
            .unwrap_or(-1)
            >= 2;
        let it = ctx.iteration_of("l") as i64;
        Ok(seq(vec![
            repeat("l", done, 10, vec![value("step", json!(it)).node()]),
            value("after", json!("done")).node(),
        ]))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let outs = e.store.list_outputs(&o.run_id).await.unwrap();
    assert_eq!(outs.iter().filter(|o| o.node_id == "step").count(), 3);
    assert_eq!(o.output.unwrap()["step"], json!(2));
}

#[tokio::test]
async fn loop_max_iterations_returns_last_or_fails() {
    let e = env().await;
    let w = wf("loopmax", |ctx| {
        let it = ctx.iteration_of("l") as i64;
        Ok(seq(vec![repeat(
            "l",
            false,
            3,
            vec![value("s", json!(it)).node()],
        )]))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished");
    assert_eq!(o.output.unwrap()["s"], json!(2));
    let w = wf("loopfail", |ctx| {
        let it = ctx.iteration_of("l") as i64;
        let mut l = match &*repeat("l", false, 2, vec![value("s", json!(it)).node()]) {
            Node::Loop(l) => l.clone(),
            _ => unreachable!(),
        };
        l.on_max_reached = smithers_core::tree::OnMaxReached::Fail;
        Ok(seq(vec![Arc::new(Node::Loop(l))]))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "failed");
    assert_eq!(o.error.unwrap().code, Code::RalphMaxReached);
}

#[tokio::test]
async fn approval_parks_and_resumes_without_rerunning_finished_work() {
    let e = env().await;
    let log = e.path.join("log");
    let l = log.display().to_string();
    let w = wf("appr", move |_| {
        Ok(seq(vec![
            shell("before", &format!("echo before >> {l}")).node(),
            approval("gate", ApprovalMode::Approve, OnDeny::Fail),
            shell("after", &format!("echo after >> {l}")).node(),
        ]))
    });
    let o = run(&e, w.clone(), json!({})).await;
    assert_eq!(o.status, "waiting-approval");
    let row = e.store.get_run(&o.run_id).await.unwrap().unwrap();
    assert_eq!(row.status, "waiting-approval");
    assert!(row.runtime_owner_id.is_none());
    // resuming without a decision parks again
    let o2 = e
        .engine
        .resume(w.clone(), &o.run_id, false)
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(o2.status, "waiting-approval");
    ops::decide(
        e.store.as_ref(),
        &o.run_id,
        "gate",
        0,
        ops::Decision {
            approved: true,
            note: Some("lgtm".into()),
            decided_by: Some("ann".into()),
            decision: None,
        },
    )
    .await
    .unwrap();
    // a second decision is refused
    let again = ops::decide(
        e.store.as_ref(),
        &o.run_id,
        "gate",
        0,
        ops::Decision::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(again.code, Code::NotWaitingApproval);
    let o3 = e
        .engine
        .resume(w, &o.run_id, false)
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(o3.status, "finished", "{:?}", o3.error);
    let out = o3.output.unwrap();
    assert_eq!(out["gate"]["approved"], json!(true));
    assert_eq!(out["gate"]["decidedBy"], json!("ann"));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "before\nafter\n");
}

#[tokio::test]
async fn denied_approval_fails_or_continues() {
    let e = env().await;
    for (on_deny, expect) in [
        (OnDeny::Fail, "failed"),
        (OnDeny::Continue, "finished"),
        (OnDeny::Skip, "finished"),
    ] {
        let w = wf("deny", move |_| {
            Ok(seq(vec![
                approval("g", ApprovalMode::Approve, on_deny),
                value("z", json!(1)).node(),
            ]))
        });
        let o = run(&e, w.clone(), json!({})).await;
        assert_eq!(o.status, "waiting-approval");
        ops::decide(
            e.store.as_ref(),
            &o.run_id,
            "g",
            0,
            ops::Decision {
                approved: false,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let o = e
            .engine
            .resume(w, &o.run_id, false)
            .await
            .unwrap()
            .wait()
            .await;
        assert_eq!(o.status, expect, "{on_deny:?} {:?}", o.error);
        if on_deny == OnDeny::Fail {
            assert_eq!(o.error.unwrap().code, Code::ApprovalDenied);
        }
        if on_deny == OnDeny::Continue {
            assert_eq!(o.output.unwrap()["g"]["approved"], json!(false));
        }
    }
}

#[tokio::test]
async fn select_and_rank_decisions_are_validated() {
    let e = env().await;
    let w = wf("sel", |_| {
        Ok(seq(vec![
            approval("pick", ApprovalMode::Select, OnDeny::Fail),
            approval("order", ApprovalMode::Rank, OnDeny::Fail),
        ]))
    });
    let o = run(&e, w.clone(), json!({})).await;
    let d = |v: Value| ops::Decision {
        approved: true,
        decision: Some(v),
        ..Default::default()
    };
    let bad = ops::decide(
        e.store.as_ref(),
        &o.run_id,
        "pick",
        0,
        d(json!({"selected": "zzz"})),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code, Code::InvalidInput);
    let bad = ops::decide(e.store.as_ref(), &o.run_id, "pick", 0, d(json!({})))
        .await
        .unwrap_err();
    assert_eq!(bad.code, Code::InvalidInput);
    ops::decide(
        e.store.as_ref(),
        &o.run_id,
        "pick",
        0,
        d(json!({"selected": "b"})),
    )
    .await
    .unwrap();
    let o = e
        .engine
        .resume(w.clone(), &o.run_id, false)
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(o.status, "waiting-approval");
    let bad = ops::decide(
        e.store.as_ref(),
        &o.run_id,
        "order",
        0,
        d(json!({"ranked": []})),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code, Code::InvalidInput);
    let bad = ops::decide(
        e.store.as_ref(),
        &o.run_id,
        "order",
        0,
        d(json!({"ranked": ["a", "q"]})),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code, Code::InvalidInput);
    ops::decide(
        e.store.as_ref(),
        &o.run_id,
        "order",
        0,
        d(json!({"ranked": ["b", "a"]})),
    )
    .await
    .unwrap();
    let o = e
        .engine
        .resume(w, &o.run_id, false)
        .await
        .unwrap()
        .wait()
        .await;
    let out = o.output.unwrap();
    assert_eq!(out["pick"]["selected"], json!("b"));
    assert_eq!(out["order"]["ranked"], json!(["b", "a"]));
}

#[tokio::test]
async fn auto_approve_after_consecutive_approvals() {
    let e = env().await;
    let w = wf("auto", |_| {
        let mut t = match &*approval("g", ApprovalMode::Approve, OnDeny::Fail) {
            Node::Task(t) => (**t).clone(),
            _ => unreachable!(),
        };
        if let TaskKind::Approval(a) = &mut t.kind {
            a.auto_approve_after = Some(2);
        }
        Ok(seq(vec![t.node()]))
    });
    for _ in 0..2 {
        let o = run(&e, w.clone(), json!({})).await;
        assert_eq!(o.status, "waiting-approval");
        ops::decide(
            e.store.as_ref(),
            &o.run_id,
            "g",
            0,
            ops::Decision {
                approved: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(
            e.engine
                .resume(w.clone(), &o.run_id, false)
                .await
                .unwrap()
                .wait()
                .await
                .status,
            "finished"
        );
    }
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished", "third run is auto-approved");
    let a = e
        .store
        .get_approval(&o.run_id, "g", 0)
        .await
        .unwrap()
        .unwrap();
    assert!(a.auto_approved);
}

fn waiter(
    id: &str,
    event: &str,
    corr: Option<&str>,
    timeout_ms: Option<u64>,
    on_timeout: OnTimeout,
) -> NodeRef {
    Task::new(
        id,
        TaskKind::WaitForEvent(WaitSpec {
            event: event.into(),
            correlation_id: corr.map(str::to_string),
            timeout_ms,
            on_timeout,
        }),
    )
    .node()
}

#[tokio::test]
async fn wait_for_event_matches_name_and_correlation() {
    let e = env().await;
    let w = wf("wait", |_| {
        Ok(seq(vec![
            waiter("ci", "ci.finished", Some("abc"), None, OnTimeout::Fail),
            value("z", json!(1)).node(),
        ]))
    });
    let o = run(&e, w.clone(), json!({})).await;
    assert_eq!(o.status, "waiting-event");
    // wrong correlation and wrong name do not match
    ops::send_signal(
        e.store.as_ref(),
        &o.run_id,
        "ci.finished",
        json!({"ok": false}),
        Some("other"),
        None,
    )
    .await
    .unwrap();
    ops::send_signal(
        e.store.as_ref(),
        &o.run_id,
        "ci.started",
        json!({"ok": false}),
        Some("abc"),
        None,
    )
    .await
    .unwrap();
    let o = e
        .engine
        .resume(w.clone(), &o.run_id, false)
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(o.status, "waiting-event");
    let d = ops::send_signal(
        e.store.as_ref(),
        &o.run_id,
        "ci.finished",
        json!({"ok": true}),
        Some("abc"),
        Some("bot"),
    )
    .await
    .unwrap();
    assert_eq!(d.seq, 2);
    let o = e
        .engine
        .resume(w, &o.run_id, false)
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(o.output.unwrap()["ci"], json!({"ok": true}));
    let bad = ops::send_signal(e.store.as_ref(), &o.run_id, "  ", json!({}), None, None)
        .await
        .unwrap_err();
    assert_eq!(bad.code, Code::InvalidInput);
}

#[tokio::test]
async fn wait_timeout_actions() {
    let e = env().await;
    for (on, expect) in [
        (OnTimeout::Fail, "failed"),
        (OnTimeout::Skip, "finished"),
        (OnTimeout::Continue, "finished"),
    ] {
        let w = wf("wt", move |_| {
            Ok(seq(vec![waiter("w", "never", None, Some(100), on)]))
        });
        let o = run(&e, w, json!({})).await;
        assert_eq!(o.status, expect, "{on:?}");
        // the closed attempt says that the timeout, not a signal, ended the wait
        let attempts = e.store.list_attempts(&o.run_id).await.unwrap();
        let meta: Value = serde_json::from_str(attempts[0].meta_json.as_deref().unwrap()).unwrap();
        let wait = &meta["waitForEvent"];
        assert!(wait["timedOutAtMs"].is_i64(), "{on:?}: {meta}");
        assert_eq!(wait["timeoutMs"], 100, "{on:?}: {meta}");
        assert!(wait["resolvedSignalSeq"].is_null(), "{on:?}: {meta}");
    }
}

#[tokio::test]
async fn short_timer_waits_inline_long_timer_parks() {
    let e = env().await;
    let w = wf("timer", |_| {
        Ok(seq(vec![
            Task::new("t", TaskKind::Timer(TimerSpec::DurationMs(150))).node(),
            value("z", json!(1)).node(),
        ]))
    });
    let t0 = Instant::now();
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished");
    assert!(t0.elapsed() >= Duration::from_millis(150));
    assert!(o.output.unwrap()["t"]["firedAtMs"].is_i64());
    let w = wf("timer2", |_| {
        Ok(seq(vec![
            Task::new("t", TaskKind::Timer(TimerSpec::DurationMs(3_600_000))).node(),
        ]))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "waiting-timer");
}

#[tokio::test]
async fn subflow_runs_child_and_returns_its_outputs() {
    let e = env().await;
    let child: Arc<dyn Workflow> = wf("child", |ctx| {
        Ok(seq(vec![
            value("echo", json!({"got": ctx.input["text"]})).node(),
        ]))
    });
    let parent: Arc<dyn Workflow> = Arc::new(
        FnWorkflow::new("parent", |_| {
            Ok(seq(vec![
                Task::new(
                    "notify",
                    TaskKind::Subflow(SubflowSpec {
                        workflow: "child".into(),
                        input: json!({"text": "hi"}),
                    }),
                )
                .node(),
            ]))
        })
        .with_subflow("child", child),
    );
    let o = run(&e, parent, json!({})).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(o.output.unwrap()["notify"], json!({"echo": {"got": "hi"}}));
    let kid = e
        .store
        .get_run(&format!("{}:child:notify:0", o.run_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kid.parent_run_id.as_deref(), Some(o.run_id.as_str()));
    assert_eq!(kid.status, "finished");
}

#[tokio::test]
async fn cancel_kills_running_task() {
    let e = env().await;
    let marker = e.path.join("after");
    let m = marker.display().to_string();
    let w = wf("cancel", move |_| {
        Ok(seq(vec![
            shell("long", &format!("sleep 3; touch {m}")).node(),
        ]))
    });
    let h = e
        .engine
        .start(w, json!({}), StartOptions::default())
        .await
        .unwrap();
    let id = h.run_id.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    e.engine.cancel(&id).await.unwrap();
    let o = h.wait().await;
    assert_eq!(o.status, "cancelled");
    let n = e.store.get_node(&id, "long", 0).await.unwrap().unwrap();
    assert_eq!(n.state, "cancelled");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!marker.exists(), "the cancelled process kept running");
}

#[tokio::test]
async fn input_is_checked() {
    let e = env().await;
    let w: Arc<dyn Workflow> = Arc::new(
        FnWorkflow::new("in", |_| Ok(seq(vec![])))
            .with_input_schema(json!({"type": "object", "required": ["repo"]})),
    );
    let err = e
        .engine
        .start(w.clone(), json!([1]), StartOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, Code::InvalidInput);
    let err = e
        .engine
        .start(w.clone(), json!({}), StartOptions::default())
        .await
        .err()
        .unwrap();
    assert!(err.message.contains("repo"), "{}", err.message);
    let o = run(&e, w.clone(), json!({"repo": "x"})).await;
    assert_eq!(o.status, "finished");
    let dup = e
        .engine
        .start(
            w,
            json!({"repo": "x"}),
            StartOptions {
                run_id: Some(o.run_id.clone()),
                ..Default::default()
            },
        )
        .await
        .err()
        .unwrap();
    assert_eq!(dup.code, Code::RunExists);
}

#[tokio::test]
async fn a_stolen_lease_stops_the_old_owner() {
    let e = env_with(EngineConfig {
        heartbeat_interval_ms: 50,
        ..Default::default()
    })
    .await;
    let w = wf("lease", |_| {
        Ok(seq(vec![
            shell("a", "sleep 1").node(),
            value("b", json!(1)).node(),
        ]))
    });
    let h = e
        .engine
        .start(w, json!({}), StartOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // another engine takes the run over (as if our heartbeat had gone stale)
    let now = smithers_engine::now_ms();
    assert!(
        e.store
            .claim_run(&h.run_id, "pid:1:other:elsewhere", now, now + 1, None)
            .await
            .unwrap()
    );
    let o = h.wait().await;
    assert_eq!(o.status, "lease-lost");
    let row = e.store.get_run(&o.run_id).await.unwrap().unwrap();
    assert_eq!(
        row.runtime_owner_id.as_deref(),
        Some("pid:1:other:elsewhere")
    );
    assert!(
        e.store
            .get_output(&o.run_id, "b", 0)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn orphaned_runs_are_taken_over() {
    let e = env().await;
    let w = wf("orphan", |_| Ok(seq(vec![value("a", json!(1)).node()])));
    // a run left `running` by an engine whose process is gone
    let h = e
        .engine
        .start(w.clone(), json!({}), StartOptions::default())
        .await
        .unwrap();
    let id = h.run_id.clone();
    h.wait().await;
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        format!("pid:{pid}:x:{}", host.trim())
    };
    let mut b = smithers_store::Batch::new();
    b.push(smithers_store::Write::UpdateRun {
        run_id: id.clone(),
        patch: smithers_store::RunPatch {
            status: Some("running".into()),
            runtime_owner_id: Some(Some(dead)),
            heartbeat_at_ms: Some(Some(smithers_engine::now_ms())),
            ..Default::default()
        },
    });
    e.store.apply(b).await.unwrap();
    let handles = e
        .engine
        .take_over_orphans(&|_| Some(w.clone()))
        .await
        .unwrap();
    assert_eq!(handles.len(), 1);
    for h in handles {
        assert_eq!(h.wait().await.status, "finished");
    }
}

#[tokio::test]
async fn a_live_run_sees_a_decision_when_woken() {
    let e = env().await;
    let w = wf("wake", |_| {
        Ok(par(
            None,
            vec![
                approval("gate", ApprovalMode::Approve, OnDeny::Fail),
                shell("busy", "sleep 1").node(),
            ],
        ))
    });
    let h = e
        .engine
        .start(w, json!({}), StartOptions::default())
        .await
        .unwrap();
    let id = h.run_id.clone();
    // wait until the approval is requested while `busy` still runs
    let t0 = Instant::now();
    while e
        .store
        .get_approval(&id, "gate", 0)
        .await
        .unwrap()
        .is_none()
    {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ops::decide(
        e.store.as_ref(),
        &id,
        "gate",
        0,
        ops::Decision {
            approved: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(e.engine.wake(&id));
    let o = h.wait().await;
    assert_eq!(o.status, "finished", "the run never parked: {:?}", o.error);
    assert_eq!(o.output.unwrap()["gate"]["approved"], json!(true));
}

#[tokio::test]
async fn fork_starts_a_new_run_from_a_frame_and_leaves_the_original_alone() {
    let e = env().await;
    let log = e.path.join("log");
    let l = log.display().to_string();
    let w = wf("forky", move |ctx| {
        let tag = ctx.input["tag"].as_str().unwrap_or("x").to_string();
        Ok(seq(vec![
            shell("a", &format!("echo a >> {l}")).node(),
            shell("b", &format!("echo b-{tag} >> {l}")).node(),
            shell("c", &format!("echo c >> {l}")).node(),
        ]))
    });
    let o = run(&e, w.clone(), json!({"tag": "one"})).await;
    assert_eq!(o.status, "finished");
    let frames_before = e.store.last_frame_no(&o.run_id).await.unwrap();
    // frame 2: `a` finished, `b` not started yet
    let f = e
        .engine
        .fork(
            w.clone(),
            &o.run_id,
            2,
            Some(json!({"tag": "two"})),
            Some("forked-1".into()),
        )
        .await
        .unwrap();
    let fo = f.wait().await;
    assert_eq!(fo.status, "finished", "{:?}", fo.error);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.lines().filter(|l| *l == "a").count(),
        1,
        "a is not run again:\n{text}"
    );
    assert!(text.contains("b-one") && text.contains("b-two"), "{text}");
    assert_eq!(text.lines().filter(|l| *l == "c").count(), 2);
    let child = e.store.get_run("forked-1").await.unwrap().unwrap();
    assert_eq!(child.parent_run_id.as_deref(), Some(o.run_id.as_str()));
    assert_eq!(
        e.store.last_frame_no(&o.run_id).await.unwrap(),
        frames_before,
        "original untouched"
    );
    let bad = e
        .engine
        .fork(w, &o.run_id, 999, None, None)
        .await
        .err()
        .unwrap();
    assert_eq!(bad.code, Code::InvalidInput);
}

#[tokio::test]
async fn nested_yaml_loops_run_every_inner_iteration_and_read_their_outputs() {
    let e = env().await;
    let src = r#"
name: nested
steps:
  - loop:
      id: outer
      max_iterations: 2
      steps:
        - loop:
            id: inner
            max_iterations: 2
            steps:
              - task: {id: work, value: {o: "{{ iteration }}"}}
        - task: {id: seen, value: "{{ outputs.work }}"}
"#;
    let w: Arc<dyn Workflow> =
        Arc::new(smithers_core::yaml::load_str(src, "nested.yaml", &e.path).unwrap());
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let outs = e.store.list_outputs(&o.run_id).await.unwrap();
    let work: Vec<_> = outs
        .iter()
        .filter(|r| r.node_id.starts_with("work"))
        .collect();
    assert_eq!(
        work.len(),
        4,
        "2 outer × 2 inner iterations: {:?}",
        outs.iter()
            .map(|r| (&r.node_id, r.iteration))
            .collect::<Vec<_>>()
    );
    assert!(
        work.iter().all(|r| r.node_id.matches("@@").count() == 1),
        "scoped once"
    );
    let seen: Vec<_> = outs.iter().filter(|r| r.node_id == "seen").collect();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|r| r.payload_json != "null"),
        "the outer step reads the inner output"
    );
}

#[tokio::test]
async fn rewind_restores_a_frame_and_resume_reruns_what_came_after() {
    let e = env().await;
    let log = e.path.join("log");
    let l = log.display().to_string();
    let w = wf("rew", move |_| {
        Ok(seq(vec![
            shell("a", &format!("echo a >> {l}")).node(),
            approval("gate", ApprovalMode::Approve, OnDeny::Fail),
            shell("b", &format!("echo b >> {l}")).node(),
        ]))
    });
    let o = run(&e, w.clone(), json!({})).await;
    assert_eq!(o.status, "waiting-approval");
    ops::decide(
        e.store.as_ref(),
        &o.run_id,
        "gate",
        0,
        ops::Decision {
            approved: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let o = e
        .engine
        .resume(w.clone(), &o.run_id, false)
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(o.status, "finished");
    let latest = e.store.last_frame_no(&o.run_id).await.unwrap();
    // frame 2: `a` finished, nothing decided yet
    let r = e.engine.rewind(&o.run_id, 2, "tester").await.unwrap();
    assert_eq!(
        (r.from_frame_no, r.to_frame_no, r.deleted_frames),
        (latest, 2, latest - 2)
    );
    assert_eq!(e.store.last_frame_no(&o.run_id).await.unwrap(), 2);
    let run = e.store.get_run(&o.run_id).await.unwrap().unwrap();
    assert_eq!(run.status, "running");
    assert!(run.runtime_owner_id.is_none());
    let outs = e.store.list_outputs(&o.run_id).await.unwrap();
    assert_eq!(
        outs.iter().map(|o| o.node_id.as_str()).collect::<Vec<_>>(),
        vec!["a"]
    );
    assert!(
        e.store
            .get_approval(&o.run_id, "gate", 0)
            .await
            .unwrap()
            .is_none(),
        "the decision is asked again"
    );
    let evs = e.store.list_events(&o.run_id, None, 10_000).await.unwrap();
    assert!(evs.iter().any(|ev| ev.event_type == "TimeTravelJumped"));
    // resuming asks for the approval again, then runs `b` again; `a` is not repeated
    let p = e
        .engine
        .resume(w.clone(), &o.run_id, false)
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(p.status, "waiting-approval");
    ops::decide(
        e.store.as_ref(),
        &o.run_id,
        "gate",
        0,
        ops::Decision {
            approved: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let done = e
        .engine
        .resume(w.clone(), &o.run_id, false)
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(done.status, "finished", "{:?}", done.error);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\nb\n");
    // the same frame again is a no-op; out of range is refused
    let last = e.store.last_frame_no(&o.run_id).await.unwrap();
    assert!(
        !e.engine
            .rewind(&o.run_id, last, "tester")
            .await
            .unwrap()
            .changed
    );
    assert_eq!(
        e.engine
            .rewind(&o.run_id, last + 5, "tester")
            .await
            .unwrap_err()
            .code,
        Code::InvalidInput
    );
}

#[tokio::test]
async fn rewind_stops_a_live_run_first() {
    let e = env().await;
    let w = wf("live", |_| {
        Ok(seq(vec![
            value("a", json!(1)).node(),
            shell("slow", "sleep 20").node(),
        ]))
    });
    let h = e
        .engine
        .start(w.clone(), json!({}), StartOptions::default())
        .await
        .unwrap();
    let id = h.run_id.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let r = e.engine.rewind(&id, 1, "tester").await.unwrap();
    assert!(r.changed);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the live task was killed, not waited for"
    );
    let _ = h.wait().await;
    assert_eq!(
        e.store.get_run(&id).await.unwrap().unwrap().status,
        "running",
        "ready to resume"
    );
}

/// A loop keeps every iteration's output in the run's state, so its snapshot keyframes grow
/// apart (they are paced by delta bytes). Every frame must still be rebuilt, also those whose
/// keyframe is more than 50 frames back, and the last one must hold what the run stored.
#[tokio::test]
async fn snapshots_far_from_their_keyframe_are_rebuilt() {
    use smithers_engine::frames::{changes, snapshot};
    let e = env().await;
    let w = wf("grower", |ctx| {
        let it = ctx.iteration_of("l") as i64;
        let big = format!("{it}:{}", "x".repeat(4096));
        Ok(seq(vec![repeat(
            "l",
            false,
            150,
            vec![value("step", json!(big)).node()],
        )]))
    });
    let o = run(&e, w, json!({})).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let last = e.store.last_frame_no(&o.run_id).await.unwrap();
    let rows = e
        .store
        .snapshots_from_keyframe(&o.run_id, last, last)
        .await
        .unwrap();
    assert!(
        rows.len() > 51,
        "the last keyframe is {} rows back: the test needs one more than 50 back",
        rows.len()
    );
    let mut prev: Option<snapshot::FullSnapshot> = None;
    for f in 1..=last {
        let s = snapshot::at_frame(e.store.as_ref(), &o.run_id, f)
            .await
            .unwrap_or_else(|err| panic!("frame {f}: {err}"));
        assert_eq!(s.frame_no, f);
        if let Some(p) = &prev {
            // outputs only accumulate: every earlier one is still there, unchanged
            for (k, v) in &p.outputs {
                assert_eq!(s.outputs.get(k), Some(v), "frame {f}: output {k}");
            }
        }
        prev = Some(s);
    }
    let stored = e.store.list_outputs(&o.run_id).await.unwrap();
    let full = prev.unwrap();
    assert_eq!(full.outputs.len(), stored.len());
    assert_eq!(stored.len(), 150);
    let all: Vec<i64> = (1..=last).collect();
    let changed = changes::for_frames(e.store.as_ref(), &o.run_id, &all)
        .await
        .unwrap();
    assert_eq!(changed.len(), all.len(), "every frame has its changes");
}
