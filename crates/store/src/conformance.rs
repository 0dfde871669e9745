//! Backend-independent conformance suite. Every case is written against `&dyn Store` only, so
//! each backend proves the same contract with [`store_conformance_tests!`](crate::store_conformance_tests).
//!
//! Each case expects a fresh, empty store (list queries span all runs) and panics on failure.

use crate::{Applied, Batch, DeliveryClaim, NewSignal, RunCursor, RunQuery, Store, Write, rows::*};
use smithers_core::{Code, SmithersError};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

/// The secondary indexes of `_smithers_runs` after every migration, by name, on both
/// backends: one per run-list filter and lookup, none that no query uses (each costs a B-tree
/// write per run created). The owner and stale-run indexes are partial: only live runs.
pub const RUN_INDEXES: &[&str] = &[
    "_smithers_runs_list_idx",
    "_smithers_runs_live_owner_idx",
    "_smithers_runs_stale_idx",
    "_smithers_runs_status_list_idx",
    "_smithers_runs_workflow_list_idx",
];

/// What a conformance factory yields: the store, optionally with something that must live as
/// long as the test (for example the temporary directory holding the database file).
pub trait Fixture {
    fn store(&self) -> Arc<dyn Store>;
}

impl Fixture for Arc<dyn Store> {
    fn store(&self) -> Arc<dyn Store> {
        self.clone()
    }
}

impl<G> Fixture for (Arc<dyn Store>, G) {
    fn store(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
}

/// Expands to one `#[tokio::test]` per conformance case.
///
/// `$factory` is an expression evaluated once per test that yields a future (e.g. an `async`
/// block) resolving to a [`Fixture`]: either `Arc<dyn Store>` or `(Arc<dyn Store>, guard)`
/// where `guard` is kept alive until the test ends. Each evaluation must give an empty store.
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
///
/// ```ignore
/// smithers_store::store_conformance_tests!(async {
///     let store: Arc<dyn Store> = Arc::new(SqliteStore::open_memory().unwrap());
///     store
/// });
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@cases $factory;
            run_insert_and_get,
            run_exists,
            invalid_run_status_rejected,
            batch_is_atomic,
            failing_batch_does_not_affect_concurrent_batches,
            update_run_patch,
            update_missing_run_not_found,
            guard_allows_owner,
            guard_lease_lost,
            input_stored_once,
            nodes_upsert_get_list,
            attempts_upsert_get_list,
            outputs_upsert_get_list_delete,
            frames_insert_get_list_ranges,
            duplicate_frame_rejected,
            snapshots_insert_get_ranges,
            events_seq_from_zero_per_run,
            events_concurrent_appends_unique,
            events_list_after_and_limit,
            loops_upsert_list,
            approvals_get_list_pending,
            approval_history_other_runs_newest_first,
            signals_seq_and_idempotency,
            signals_filter,
            claim_unowned_run,
            claim_stale_run,
            claim_dead_owner,
            claim_fresh_owner_refused,
            claim_missing_run,
            heartbeat_owned_and_cancel_requested,
            request_cancel_existing_and_missing,
            list_runs_order_limit_status,
            query_runs_filters_and_pages,
            list_stale_runs_order_limit,
            cron_upsert_get_list,
            cron_upsert_conflict_keeps_history,
            cron_delete,
            cron_update_run,
            cron_claim_compare_and_set,
            cron_claim_race_exactly_one_wins,
            rewind_writes_remove_what_came_later,
            audit_rows_upsert_and_filter,
            node_diffs_cache_and_rewind,
            webhook_delivery_claimed_once,
            webhook_delivery_expires_and_is_pruned,
            webhook_delivery_release_and_abandoned_claims,
            webhook_delivery_concurrent_claims_exactly_one_wins,
        );
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $factory.await;
                let store = $crate::conformance::Fixture::store(&fixture);
                $crate::conformance::$case(&*store).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A minimal run row.
pub fn run_row(run_id: &str, workflow: &str, created_at_ms: i64) -> RunRow {
    RunRow {
        run_id: run_id.into(),
        parent_run_id: None,
        workflow_name: workflow.into(),
        workflow_path: None,
        workflow_hash: None,
        status: status::RUNNING.into(),
        created_at_ms,
        started_at_ms: None,
        finished_at_ms: None,
        heartbeat_at_ms: None,
        runtime_owner_id: None,
        cancel_requested_at_ms: None,
        hijack_requested_at_ms: None,
        hijack_target: None,
        vcs_type: None,
        vcs_root: None,
        vcs_revision: None,
        error_json: None,
        config_json: None,
    }
}

fn node(run: &str, node_id: &str, iteration: i64, state: &str) -> NodeRow {
    NodeRow {
        run_id: run.into(),
        node_id: node_id.into(),
        iteration,
        state: state.into(),
        last_attempt: None,
        updated_at_ms: 10,
        output_table: "out".into(),
        label: None,
    }
}

fn attempt(
    run: &str,
    node_id: &str,
    iteration: i64,
    attempt: i64,
    started_at_ms: i64,
) -> AttemptRow {
    AttemptRow {
        run_id: run.into(),
        node_id: node_id.into(),
        iteration,
        attempt,
        state: node_state::IN_PROGRESS.into(),
        started_at_ms,
        finished_at_ms: None,
        heartbeat_at_ms: None,
        heartbeat_data_json: None,
        error_json: None,
        jj_pointer: None,
        response_text: None,
        jj_cwd: None,
        cached: false,
        meta_json: None,
    }
}

fn frame(run: &str, frame_no: i64) -> FrameRow {
    FrameRow {
        run_id: run.into(),
        frame_no,
        created_at_ms: 100 + frame_no,
        xml_json: format!("{{\"frame\":{frame_no}}}"),
        xml_hash: format!("hash{frame_no}"),
        encoding: if frame_no == 1 {
            "keyframe".into()
        } else {
            "delta".into()
        },
        mounted_task_ids_json: Some("[\"a::0\"]".into()),
        task_index_json: None,
        note: Some("react-driver".into()),
    }
}

fn snapshot(run: &str, frame_no: i64) -> SnapshotRow {
    SnapshotRow {
        run_id: run.into(),
        frame_no,
        encoding: "keyframe".into(),
        nodes_json: "[]".into(),
        outputs_json: "{}".into(),
        ralph_json: "{}".into(),
        input_json: format!("{{\"n\":{frame_no}}}"),
        vcs_pointer: None,
        workflow_hash: Some("wh".into()),
        content_hash: format!("c{frame_no}"),
        created_at_ms: 200 + frame_no,
    }
}

fn approval(
    run: &str,
    node_id: &str,
    iteration: i64,
    status: &str,
    requested_at_ms: i64,
) -> ApprovalRow {
    let decided = status != "requested";
    ApprovalRow {
        run_id: run.into(),
        node_id: node_id.into(),
        iteration,
        status: status.into(),
        requested_at_ms: Some(requested_at_ms),
        decided_at_ms: decided.then_some(requested_at_ms + 1),
        note: None,
        decided_by: decided.then(|| "alice".to_string()),
        request_json: None,
        decision_json: None,
        auto_approved: false,
    }
}

fn event(run: &str, ty: &str) -> Write {
    Write::AppendEvent {
        run_id: run.into(),
        timestamp_ms: 1,
        event_type: ty.into(),
        payload_json: format!("{{\"type\":\"{ty}\"}}"),
    }
}

fn signal(run: &str, name: &str, corr: Option<&str>, payload: &str, at: i64) -> NewSignal {
    NewSignal {
        run_id: run.into(),
        signal_name: name.into(),
        correlation_id: corr.map(str::to_string),
        payload_json: payload.into(),
        received_at_ms: at,
        received_by: None,
    }
}

async fn apply(store: &dyn Store, writes: Vec<Write>) -> Applied {
    match store
        .apply(Batch {
            guard: None,
            writes,
        })
        .await
    {
        Ok(a) => a,
        Err(e) => panic!("apply failed: {e}"),
    }
}

async fn insert_runs(store: &dyn Store, runs: Vec<RunRow>) {
    apply(store, runs.into_iter().map(Write::InsertRun).collect()).await;
}

fn ok<T>(r: smithers_core::Result<T>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

fn expect_err<T: std::fmt::Debug>(
    r: smithers_core::Result<T>,
    code: Code,
    what: &str,
) -> SmithersError {
    match r {
        Ok(v) => panic!("{what}: expected {code}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.code, code, "{what}: wrong code in {e}");
            e
        }
    }
}

/// Polls all futures concurrently on the current task (no spawning, so they may borrow).
async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futs.iter_mut().zip(outs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outs.into_iter().flatten().collect()
}

fn ids(runs: &[RunRow]) -> Vec<&str> {
    runs.iter().map(|r| r.run_id.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// Runs

/// Every run column round-trips; a missing run reads as `None`.
pub async fn run_insert_and_get(store: &dyn Store) {
    let full = RunRow {
        run_id: "r1".into(),
        parent_run_id: Some("p".into()),
        workflow_name: "wf".into(),
        workflow_path: Some("/w.yaml".into()),
        workflow_hash: Some("h".into()),
        status: status::WAITING_APPROVAL.into(),
        created_at_ms: 1,
        started_at_ms: Some(2),
        finished_at_ms: Some(3),
        heartbeat_at_ms: Some(4),
        runtime_owner_id: Some("pid:1:x".into()),
        cancel_requested_at_ms: Some(5),
        hijack_requested_at_ms: Some(6),
        hijack_target: Some("claude".into()),
        vcs_type: Some("git".into()),
        vcs_root: Some("/repo".into()),
        vcs_revision: Some("abc".into()),
        error_json: Some("{\"code\":\"X\"}".into()),
        config_json: Some("{\"maxConcurrency\":4}".into()),
    };
    insert_runs(store, vec![full.clone(), run_row("r2", "wf", 2)]).await;
    assert_eq!(ok(store.get_run("r1").await, "get_run"), Some(full));
    assert_eq!(
        ok(store.get_run("r2").await, "get_run"),
        Some(run_row("r2", "wf", 2))
    );
    assert_eq!(ok(store.get_run("missing").await, "get_run"), None);
}

/// Inserting a taken run id fails with `RUN_EXISTS` and leaves the row alone.
pub async fn run_exists(store: &dyn Store) {
    insert_runs(store, vec![run_row("r1", "wf", 1)]).await;
    let mut again = run_row("r1", "other", 9);
    again.status = status::FAILED.into();
    let e = expect_err(
        store
            .apply(Batch {
                guard: None,
                writes: vec![Write::InsertRun(again)],
            })
            .await,
        Code::RunExists,
        "insert twice",
    );
    assert!(e.message.contains("`r1`"), "message names the run: {e}");
    assert_eq!(
        ok(store.get_run("r1").await, "get_run"),
        Some(run_row("r1", "wf", 1)),
        "original untouched"
    );
}

/// Run statuses outside `status::ALL` are refused on insert and update.
pub async fn invalid_run_status_rejected(store: &dyn Store) {
    let mut bad = run_row("r1", "wf", 1);
    bad.status = "bogus".into();
    let r = store
        .apply(Batch {
            guard: None,
            writes: vec![Write::InsertRun(bad)],
        })
        .await;
    assert!(r.is_err(), "unknown status must be rejected");
    assert_eq!(ok(store.get_run("r1").await, "get_run"), None);
    insert_runs(store, vec![run_row("r2", "wf", 1)]).await;
    let patch = RunPatch {
        status: Some("nope".into()),
        ..Default::default()
    };
    let r = store
        .apply(Batch {
            guard: None,
            writes: vec![Write::UpdateRun {
                run_id: "r2".into(),
                patch,
            }],
        })
        .await;
    assert!(r.is_err(), "unknown status in a patch must be rejected");
    assert_eq!(
        ok(store.get_run("r2").await, "get_run").map(|r| r.status),
        Some(status::RUNNING.to_string())
    );
}

/// A failing write rolls back the whole batch, including event seqs.
pub async fn batch_is_atomic(store: &dyn Store) {
    insert_runs(store, vec![run_row("existing", "wf", 1)]).await;
    let writes = vec![
        Write::InsertRun(run_row("new", "wf", 2)),
        Write::InsertInput {
            run_id: "new".into(),
            payload_json: "{}".into(),
        },
        Write::UpsertNode(node("new", "a", 0, node_state::PENDING)),
        event("new", "RunStarted"),
        Write::InsertRun(run_row("existing", "wf", 3)),
    ];
    expect_err(
        store
            .apply(Batch {
                guard: None,
                writes,
            })
            .await,
        Code::RunExists,
        "batch with duplicate run",
    );
    assert_eq!(
        ok(store.get_run("new").await, "get_run"),
        None,
        "run insert rolled back"
    );
    assert_eq!(
        ok(store.get_input("new").await, "get_input"),
        None,
        "input rolled back"
    );
    assert!(
        ok(store.list_nodes("new").await, "list_nodes").is_empty(),
        "node rolled back"
    );
    assert_eq!(
        ok(store.last_event_seq("new").await, "last_event_seq"),
        -1,
        "event rolled back"
    );
    // The rolled-back event did not consume a seq.
    let a = apply(store, vec![event("new", "E")]).await;
    assert_eq!(a.event_seqs, vec![0]);
}

/// Concurrent batches commit or fail independently of each other.
pub async fn failing_batch_does_not_affect_concurrent_batches(store: &dyn Store) {
    insert_runs(store, vec![run_row("dup", "wf", 1)]).await;
    let batches: Vec<Batch> = (0..12)
        .map(|i| {
            let writes = if i % 3 == 1 {
                vec![
                    Write::InsertRun(run_row(&format!("bad{i}"), "wf", 2)),
                    Write::InsertRun(run_row("dup", "wf", 2)),
                ]
            } else {
                vec![
                    Write::InsertRun(run_row(&format!("good{i}"), "wf", 2)),
                    event(&format!("good{i}"), "E"),
                ]
            };
            Batch {
                guard: None,
                writes,
            }
        })
        .collect();
    let results = join_all(batches.into_iter().map(|b| store.apply(b)).collect()).await;
    for (i, r) in results.into_iter().enumerate() {
        if i % 3 == 1 {
            expect_err(r, Code::RunExists, "bad batch");
            assert_eq!(ok(store.get_run(&format!("bad{i}")).await, "get_run"), None);
        } else {
            assert_eq!(ok(r, "good batch").event_seqs, vec![0]);
            assert!(ok(store.get_run(&format!("good{i}")).await, "get_run").is_some());
        }
    }
}

/// `RunPatch`: `None` keeps a column, `Some(None)` clears it, `Some(Some(v))` sets it.
pub async fn update_run_patch(store: &dyn Store) {
    let mut r = run_row("r1", "workflow", 1);
    r.started_at_ms = Some(5);
    r.error_json = Some("{}".into());
    r.config_json = Some("{\"a\":1}".into());
    r.runtime_owner_id = Some("o".into());
    insert_runs(store, vec![r.clone()]).await;

    let patch = RunPatch {
        status: Some(status::FINISHED.into()),
        workflow_name: Some("renamed".into()),
        finished_at_ms: Some(Some(9)),
        error_json: Some(None),
        runtime_owner_id: Some(None),
        ..Default::default()
    };
    apply(
        store,
        vec![Write::UpdateRun {
            run_id: "r1".into(),
            patch,
        }],
    )
    .await;
    let got = ok(store.get_run("r1").await, "get_run");
    let mut want = r.clone();
    want.status = status::FINISHED.into();
    want.workflow_name = "renamed".into();
    want.finished_at_ms = Some(9);
    want.error_json = None;
    want.runtime_owner_id = None;
    assert_eq!(
        got,
        Some(want.clone()),
        "only Some fields change; Some(None) sets NULL"
    );

    // An empty patch on an existing run is a no-op.
    apply(
        store,
        vec![Write::UpdateRun {
            run_id: "r1".into(),
            patch: RunPatch::default(),
        }],
    )
    .await;
    assert_eq!(ok(store.get_run("r1").await, "get_run"), Some(want.clone()));

    let patch = RunPatch {
        started_at_ms: Some(None),
        heartbeat_at_ms: Some(Some(77)),
        cancel_requested_at_ms: Some(Some(78)),
        config_json: Some(Some("{\"b\":2}".into())),
        ..Default::default()
    };
    apply(
        store,
        vec![Write::UpdateRun {
            run_id: "r1".into(),
            patch,
        }],
    )
    .await;
    want.started_at_ms = None;
    want.heartbeat_at_ms = Some(77);
    want.cancel_requested_at_ms = Some(78);
    want.config_json = Some("{\"b\":2}".into());
    assert_eq!(ok(store.get_run("r1").await, "get_run"), Some(want));
}

/// Updating a missing run fails with `RUN_NOT_FOUND` (and rolls back its batch).
pub async fn update_missing_run_not_found(store: &dyn Store) {
    let patch = RunPatch {
        status: Some(status::FAILED.into()),
        ..Default::default()
    };
    let writes = vec![
        Write::InsertRun(run_row("r1", "wf", 1)),
        Write::UpdateRun {
            run_id: "ghost".into(),
            patch,
        },
    ];
    let e = expect_err(
        store
            .apply(Batch {
                guard: None,
                writes,
            })
            .await,
        Code::RunNotFound,
        "update missing",
    );
    assert!(e.message.contains("ghost"), "{e}");
    assert_eq!(
        ok(store.get_run("r1").await, "get_run"),
        None,
        "batch rolled back"
    );
    let writes = vec![Write::UpdateRun {
        run_id: "ghost".into(),
        patch: RunPatch::default(),
    }];
    expect_err(
        store
            .apply(Batch {
                guard: None,
                writes,
            })
            .await,
        Code::RunNotFound,
        "empty patch on missing run",
    );
}

/// A guarded batch from the current owner commits.
pub async fn guard_allows_owner(store: &dyn Store) {
    insert_runs(store, vec![run_row("r1", "wf", 1)]).await;
    assert!(ok(
        store.claim_run("r1", "owner-a", 100, 50, None).await,
        "claim"
    ));
    let mut b = Batch::guarded("r1", "owner-a");
    b.push(Write::UpsertNode(node(
        "r1",
        "a",
        0,
        node_state::IN_PROGRESS,
    )))
    .push(event("r1", "NodeStarted"));
    let a = ok(store.apply(b).await, "guarded apply");
    assert_eq!(a.event_seqs, vec![0]);
    assert_eq!(ok(store.list_nodes("r1").await, "list_nodes").len(), 1);
    // A guarded batch with no writes is a lease check.
    ok(
        store.apply(Batch::guarded("r1", "owner-a")).await,
        "empty guarded batch",
    );
}

/// A guarded batch from a former owner fails with `RUN_LEASE_LOST` and writes nothing.
pub async fn guard_lease_lost(store: &dyn Store) {
    insert_runs(
        store,
        vec![run_row("r1", "wf", 1), run_row("free", "wf", 1)],
    )
    .await;
    assert!(ok(
        store.claim_run("r1", "owner-a", 100, 50, None).await,
        "claim a"
    ));
    assert!(ok(
        store
            .claim_run("r1", "owner-b", 101, 50, Some("owner-a"))
            .await,
        "takeover by b"
    ));

    let mut b = Batch::guarded("r1", "owner-a");
    b.push(Write::UpsertNode(node("r1", "a", 0, node_state::FINISHED)))
        .push(event("r1", "NodeFinished"))
        .push(Write::UpdateRun {
            run_id: "r1".into(),
            patch: RunPatch {
                status: Some(status::FINISHED.into()),
                ..Default::default()
            },
        });
    let e = expect_err(store.apply(b).await, Code::RunLeaseLost, "stale owner");
    assert!(e.message.contains("r1"), "{e}");
    assert!(
        ok(store.list_nodes("r1").await, "list_nodes").is_empty(),
        "nothing written"
    );
    assert_eq!(ok(store.last_event_seq("r1").await, "last_event_seq"), -1);
    let run = ok(store.get_run("r1").await, "get_run");
    assert_eq!(
        run.as_ref().map(|r| r.status.as_str()),
        Some(status::RUNNING)
    );
    assert_eq!(
        run.and_then(|r| r.runtime_owner_id).as_deref(),
        Some("owner-b")
    );

    // Unowned run and missing run also fail the guard.
    expect_err(
        store.apply(Batch::guarded("free", "owner-a")).await,
        Code::RunLeaseLost,
        "unowned run",
    );
    expect_err(
        store.apply(Batch::guarded("ghost", "owner-a")).await,
        Code::RunLeaseLost,
        "missing run",
    );

    // The new owner writes fine.
    let mut b = Batch::guarded("r1", "owner-b");
    b.push(event("r1", "X"));
    assert_eq!(ok(store.apply(b).await, "new owner").event_seqs, vec![0]);
}

/// The run input is stored once; a second insert is ignored.
pub async fn input_stored_once(store: &dyn Store) {
    assert_eq!(ok(store.get_input("r1").await, "get_input"), None);
    apply(
        store,
        vec![Write::InsertInput {
            run_id: "r1".into(),
            payload_json: "{\"a\":1}".into(),
        }],
    )
    .await;
    apply(
        store,
        vec![Write::InsertInput {
            run_id: "r1".into(),
            payload_json: "{\"a\":2}".into(),
        }],
    )
    .await;
    assert_eq!(
        ok(store.get_input("r1").await, "get_input").as_deref(),
        Some("{\"a\":1}")
    );
}

// ---------------------------------------------------------------------------------------------
// Nodes, attempts, outputs

/// Nodes upsert by key and list by `node_id, iteration`.
pub async fn nodes_upsert_get_list(store: &dyn Store) {
    let mut b1 = node("r1", "b", 1, node_state::PENDING);
    b1.label = Some("B".into());
    apply(
        store,
        vec![
            Write::UpsertNode(b1.clone()),
            Write::UpsertNode(node("r1", "b", 0, node_state::FINISHED)),
            Write::UpsertNode(node("r1", "a", 0, node_state::PENDING)),
            Write::UpsertNode(node("r2", "a", 0, node_state::PENDING)),
        ],
    )
    .await;
    let mut updated = b1.clone();
    updated.state = node_state::IN_PROGRESS.into();
    updated.last_attempt = Some(1);
    updated.updated_at_ms = 20;
    updated.label = None;
    apply(store, vec![Write::UpsertNode(updated.clone())]).await;

    let list = ok(store.list_nodes("r1").await, "list_nodes");
    let keys: Vec<(&str, i64)> = list
        .iter()
        .map(|n| (n.node_id.as_str(), n.iteration))
        .collect();
    assert_eq!(keys, vec![("a", 0), ("b", 0), ("b", 1)]);
    assert_eq!(
        ok(store.get_node("r1", "b", 1).await, "get_node"),
        Some(updated)
    );
    assert_eq!(ok(store.get_node("r1", "b", 2).await, "get_node"), None);
    assert!(ok(store.list_nodes("nope").await, "list_nodes").is_empty());
}

/// Attempt orderings, upserts and the `cached` flag.
pub async fn attempts_upsert_get_list(store: &dyn Store) {
    let mut full = attempt("r1", "a", 0, 1, 10);
    full.finished_at_ms = Some(11);
    full.heartbeat_at_ms = Some(12);
    full.heartbeat_data_json = Some("{\"p\":1}".into());
    full.error_json = Some("{}".into());
    full.jj_pointer = Some("jj".into());
    full.response_text = Some("done".into());
    full.jj_cwd = Some("/tmp".into());
    full.cached = true;
    full.meta_json = Some("{\"m\":1}".into());
    apply(
        store,
        vec![
            Write::UpsertAttempt(full.clone()),
            Write::UpsertAttempt(attempt("r1", "a", 0, 2, 30)),
            Write::UpsertAttempt(attempt("r1", "b", 0, 1, 10)),
            Write::UpsertAttempt(attempt("r1", "a", 1, 1, 20)),
            Write::UpsertAttempt(attempt("r2", "a", 0, 1, 1)),
        ],
    )
    .await;
    let mut a2 = attempt("r1", "a", 0, 2, 30);
    a2.state = node_state::FAILED.into();
    a2.finished_at_ms = Some(40);
    apply(store, vec![Write::UpsertAttempt(a2.clone())]).await;

    let all = ok(store.list_attempts("r1").await, "list_attempts");
    let keys: Vec<(i64, &str, i64, i64)> = all
        .iter()
        .map(|a| (a.started_at_ms, a.node_id.as_str(), a.iteration, a.attempt))
        .collect();
    assert_eq!(
        keys,
        vec![
            (10, "a", 0, 1),
            (10, "b", 0, 1),
            (20, "a", 1, 1),
            (30, "a", 0, 2)
        ]
    );
    assert_eq!(all[0], full, "all columns round-trip, cached = true");

    let node_attempts = ok(
        store.list_node_attempts("r1", "a", 0).await,
        "list_node_attempts",
    );
    assert_eq!(
        node_attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        vec![2, 1],
        "newest first"
    );
    assert_eq!(
        ok(store.get_attempt("r1", "a", 0, 2).await, "get_attempt"),
        Some(a2)
    );
    assert_eq!(
        ok(store.get_attempt("r1", "a", 0, 3).await, "get_attempt"),
        None
    );
    assert_eq!(
        ok(store.get_attempt("r1", "b", 0, 1).await, "get_attempt").map(|a| a.cached),
        Some(false)
    );
}

/// Outputs upsert, list by key, and delete (missing is fine).
pub async fn outputs_upsert_get_list_delete(store: &dyn Store) {
    let out = |node_id: &str, it: i64, payload: &str| OutputRow {
        run_id: "r1".into(),
        node_id: node_id.into(),
        iteration: it,
        output_table: "t".into(),
        payload_json: payload.into(),
        created_at_ms: 5,
    };
    apply(
        store,
        vec![
            Write::UpsertOutput(out("b", 0, "{}")),
            Write::UpsertOutput(out("a", 1, "{}")),
            Write::UpsertOutput(out("a", 0, "{\"v\":1}")),
        ],
    )
    .await;
    apply(store, vec![Write::UpsertOutput(out("a", 0, "{\"v\":2}"))]).await;
    let list = ok(store.list_outputs("r1").await, "list_outputs");
    let keys: Vec<(&str, i64)> = list
        .iter()
        .map(|o| (o.node_id.as_str(), o.iteration))
        .collect();
    assert_eq!(keys, vec![("a", 0), ("a", 1), ("b", 0)]);
    assert_eq!(
        ok(store.get_output("r1", "a", 0).await, "get_output"),
        Some(out("a", 0, "{\"v\":2}"))
    );
    apply(
        store,
        vec![Write::DeleteOutput {
            run_id: "r1".into(),
            node_id: "a".into(),
            iteration: 0,
        }],
    )
    .await;
    assert_eq!(ok(store.get_output("r1", "a", 0).await, "get_output"), None);
    assert_eq!(ok(store.list_outputs("r1").await, "list_outputs").len(), 2);
    // Deleting a missing output is not an error.
    apply(
        store,
        vec![Write::DeleteOutput {
            run_id: "r1".into(),
            node_id: "zz".into(),
            iteration: 0,
        }],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Frames, snapshots

/// Frame lookups, newest-first listing with limit, inclusive ranges.
pub async fn frames_insert_get_list_ranges(store: &dyn Store) {
    assert_eq!(ok(store.last_frame_no("r1").await, "last_frame_no"), 0);
    apply(
        store,
        (1..=5)
            .map(|n| Write::InsertFrame(frame("r1", n)))
            .collect(),
    )
    .await;
    apply(store, vec![Write::InsertFrame(frame("r2", 1))]).await;
    assert_eq!(ok(store.last_frame_no("r1").await, "last_frame_no"), 5);
    assert_eq!(ok(store.last_frame_no("r2").await, "last_frame_no"), 1);
    assert_eq!(
        ok(store.get_frame("r1", 3).await, "get_frame"),
        Some(frame("r1", 3))
    );
    assert_eq!(ok(store.get_frame("r1", 9).await, "get_frame"), None);

    let nos = |v: Vec<FrameRow>| v.into_iter().map(|f| f.frame_no).collect::<Vec<_>>();
    assert_eq!(
        nos(ok(store.list_frames("r1", 2, 2).await, "list_frames")),
        vec![5, 4],
        "newest first, limited"
    );
    assert_eq!(
        nos(ok(store.list_frames("r1", 0, 100).await, "list_frames")),
        vec![5, 4, 3, 2, 1]
    );
    assert_eq!(
        nos(ok(store.list_frames("r1", 5, 100).await, "list_frames")),
        Vec::<i64>::new()
    );
    assert_eq!(
        nos(ok(store.frames_between("r1", 2, 4).await, "frames_between")),
        vec![2, 3, 4],
        "inclusive, ascending"
    );
    assert_eq!(
        nos(ok(store.frames_between("r1", 4, 2).await, "frames_between")),
        Vec::<i64>::new()
    );
}

/// Re-inserting a frame number fails the batch.
pub async fn duplicate_frame_rejected(store: &dyn Store) {
    apply(store, vec![Write::InsertFrame(frame("r1", 1))]).await;
    let r = store
        .apply(Batch {
            guard: None,
            writes: vec![
                Write::InsertFrame(frame("r1", 2)),
                Write::InsertFrame(frame("r1", 1)),
            ],
        })
        .await;
    assert!(r.is_err(), "inserting an existing frame fails");
    assert_eq!(
        ok(store.last_frame_no("r1").await, "last_frame_no"),
        1,
        "batch rolled back"
    );
}

/// Snapshot lookups, and ranges that reach back to the keyframe they start from.
pub async fn snapshots_insert_get_ranges(store: &dyn Store) {
    apply(
        store,
        (1..=4)
            .map(|n| Write::InsertSnapshot(snapshot("r1", n)))
            .collect(),
    )
    .await;
    apply(store, vec![Write::InsertSnapshot(snapshot("r2", 2))]).await;
    assert_eq!(
        ok(store.get_snapshot("r1", 2).await, "get_snapshot"),
        Some(snapshot("r1", 2))
    );
    assert_eq!(ok(store.get_snapshot("r1", 7).await, "get_snapshot"), None);
    let frames = |rows: Vec<SnapshotRow>| rows.iter().map(|s| s.frame_no).collect::<Vec<_>>();
    // every row is a keyframe: the range starts at `base`
    let got = ok(
        store.snapshots_from_keyframe("r1", 2, 3).await,
        "snapshots_from_keyframe",
    );
    assert_eq!(got, vec![snapshot("r1", 2), snapshot("r1", 3)]);
    let got = ok(
        store.snapshots_from_keyframe("r1", 100, 100).await,
        "snapshots_from_keyframe",
    );
    assert_eq!(frames(got), vec![4]);

    // run r3: keyframes at 1 and 60 with deltas between and after; a keyframe far back
    let delta = |n: i64| SnapshotRow {
        encoding: "delta".into(),
        ..snapshot("r3", n)
    };
    let rows = (1..=70)
        .map(|n| {
            if n == 1 || n == 60 {
                snapshot("r3", n)
            } else {
                delta(n)
            }
        })
        .map(Write::InsertSnapshot)
        .collect();
    apply(store, rows).await;
    let got = ok(store.snapshots_from_keyframe("r3", 59, 59).await, "range");
    assert_eq!(frames(got), (1..=59).collect::<Vec<_>>());
    let got = ok(store.snapshots_from_keyframe("r3", 60, 62).await, "range");
    assert_eq!(frames(got), vec![60, 61, 62]);
    let got = ok(store.snapshots_from_keyframe("r3", 65, 200).await, "range");
    assert_eq!(frames(got), (60..=70).collect::<Vec<_>>());
    let got = ok(store.snapshots_from_keyframe("r3", 30, 61).await, "range");
    assert_eq!(frames(got), (1..=61).collect::<Vec<_>>());
    // another run's rows never count, and a run without rows has none
    let got = ok(store.snapshots_from_keyframe("r2", 5, 5).await, "range");
    assert_eq!(frames(got), vec![2]);
    let got = ok(store.snapshots_from_keyframe("none", 5, 5).await, "range");
    assert!(got.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Events

/// Event seqs start at 0 per run and come back in batch order.
pub async fn events_seq_from_zero_per_run(store: &dyn Store) {
    assert_eq!(ok(store.last_event_seq("r1").await, "last_event_seq"), -1);
    let a = apply(
        store,
        vec![
            event("r1", "A"),
            Write::UpsertNode(node("r1", "n", 0, node_state::PENDING)),
            event("r1", "B"),
            event("r1", "C"),
        ],
    )
    .await;
    assert_eq!(a.event_seqs, vec![0, 1, 2], "batch order");
    let a = apply(store, vec![event("r2", "A"), event("r1", "D")]).await;
    assert_eq!(a.event_seqs, vec![0, 3], "per-run seqs");
    assert_eq!(ok(store.last_event_seq("r1").await, "last_event_seq"), 3);
    assert_eq!(ok(store.last_event_seq("r2").await, "last_event_seq"), 0);
    let a = apply(
        store,
        vec![Write::UpsertNode(node("r1", "n", 0, node_state::FINISHED))],
    )
    .await;
    assert!(a.event_seqs.is_empty());
    // runs interleaved in one batch: each event's seq in batch order, each run's log in order
    let a = apply(
        store,
        vec![
            event("r1", "E"),
            event("r2", "B"),
            Write::UpsertNode(node("r3", "n", 0, node_state::PENDING)),
            event("r1", "F"),
            event("r3", "A"),
            event("r2", "C"),
        ],
    )
    .await;
    assert_eq!(a.event_seqs, vec![4, 1, 5, 0, 2], "interleaved runs");
    for (run, want) in [("r1", "ABCDEF"), ("r2", "ABC"), ("r3", "A")] {
        let got: Vec<(i64, String, String)> = ok(store.list_events(run, None, 100).await, run)
            .into_iter()
            .map(|e| (e.seq, e.event_type, e.payload_json))
            .collect();
        let want: Vec<(i64, String, String)> = want
            .chars()
            .enumerate()
            .map(|(i, c)| (i as i64, c.to_string(), format!("{{\"type\":\"{c}\"}}")))
            .collect();
        assert_eq!(got, want, "{run}");
    }
}

/// Concurrent appends to one run get unique, gap-free seqs.
pub async fn events_concurrent_appends_unique(store: &dyn Store) {
    let futs: Vec<_> = (0..50)
        .map(|i| {
            store.apply(Batch {
                guard: None,
                writes: vec![event("r1", &format!("E{i}"))],
            })
        })
        .collect();
    let mut seqs: Vec<i64> = join_all(futs)
        .await
        .into_iter()
        .flat_map(|r| ok(r, "apply").event_seqs)
        .collect();
    seqs.sort();
    assert_eq!(seqs, (0..50).collect::<Vec<_>>());
    let events = ok(store.list_events("r1", None, 1000).await, "list_events");
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (0..50).collect::<Vec<_>>()
    );
}

/// `list_events`: exclusive `after_seq`, ascending, limited.
pub async fn events_list_after_and_limit(store: &dyn Store) {
    apply(
        store,
        (0..6).map(|i| event("r1", &format!("E{i}"))).collect(),
    )
    .await;
    apply(store, vec![event("r2", "Other")]).await;
    let all = ok(store.list_events("r1", None, 100).await, "list_events");
    assert_eq!(all.len(), 6);
    assert_eq!(
        all[2],
        EventRow {
            run_id: "r1".into(),
            seq: 2,
            timestamp_ms: 1,
            event_type: "E2".into(),
            payload_json: "{\"type\":\"E2\"}".into()
        }
    );
    let seqs = |v: Vec<EventRow>| v.into_iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(ok(store.list_events("r1", Some(2), 2).await, "list_events")),
        vec![3, 4],
        "after is exclusive, limited"
    );
    assert_eq!(
        seqs(ok(store.list_events("r1", None, 2).await, "list_events")),
        vec![0, 1]
    );
    assert_eq!(
        seqs(ok(
            store.list_events("r1", Some(-1), 100).await,
            "list_events"
        )),
        vec![0, 1, 2, 3, 4, 5]
    );
    assert_eq!(
        seqs(ok(
            store.list_events("r1", Some(5), 100).await,
            "list_events"
        )),
        Vec::<i64>::new()
    );
    assert!(ok(store.list_events("none", None, 10).await, "list_events").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Loops, approvals

/// Loop state upserts and lists by `ralph_id`.
pub async fn loops_upsert_list(store: &dyn Store) {
    let l = |id: &str, it: i64, done: bool| LoopRow {
        run_id: "r1".into(),
        ralph_id: id.into(),
        iteration: it,
        done,
        updated_at_ms: 3,
    };
    apply(
        store,
        vec![
            Write::UpsertLoop(l("z", 0, false)),
            Write::UpsertLoop(l("a", 1, false)),
        ],
    )
    .await;
    apply(store, vec![Write::UpsertLoop(l("z", 4, true))]).await;
    assert_eq!(
        ok(store.list_loops("r1").await, "list_loops"),
        vec![l("a", 1, false), l("z", 4, true)]
    );
    assert!(ok(store.list_loops("r2").await, "list_loops").is_empty());
}

/// Approval lookups and the cross-run pending list (oldest request first).
pub async fn approvals_get_list_pending(store: &dyn Store) {
    let mut full = approval("r1", "gate", 0, "requested", 30);
    full.note = Some("please".into());
    full.request_json = Some("{\"q\":1}".into());
    apply(
        store,
        vec![
            Write::UpsertApproval(full.clone()),
            Write::UpsertApproval(approval("r1", "other", 0, "approved", 5)),
            Write::UpsertApproval(approval("r2", "gate", 0, "requested", 10)),
            Write::UpsertApproval(approval("r3", "gate", 1, "requested", 20)),
        ],
    )
    .await;
    assert_eq!(
        ok(store.get_approval("r1", "gate", 0).await, "get_approval"),
        Some(full.clone())
    );
    assert_eq!(
        ok(store.get_approval("r1", "gate", 1).await, "get_approval"),
        None
    );
    let list = ok(store.list_approvals("r1").await, "list_approvals");
    assert_eq!(
        list.iter().map(|a| a.node_id.as_str()).collect::<Vec<_>>(),
        vec!["gate", "other"]
    );

    let pending = ok(
        store.list_pending_approvals(10).await,
        "list_pending_approvals",
    );
    assert_eq!(
        pending
            .iter()
            .map(|a| a.run_id.as_str())
            .collect::<Vec<_>>(),
        vec!["r2", "r3", "r1"],
        "oldest request first"
    );
    let pending = ok(
        store.list_pending_approvals(2).await,
        "list_pending_approvals",
    );
    assert_eq!(pending.len(), 2);

    // Deciding removes it from the pending list.
    let mut decided = approval("r2", "gate", 0, "denied", 10);
    decided.auto_approved = true;
    decided.decision_json = Some("{\"ok\":false}".into());
    apply(store, vec![Write::UpsertApproval(decided.clone())]).await;
    assert_eq!(
        ok(store.get_approval("r2", "gate", 0).await, "get_approval"),
        Some(decided)
    );
    let pending = ok(
        store.list_pending_approvals(10).await,
        "list_pending_approvals",
    );
    assert_eq!(
        pending
            .iter()
            .map(|a| a.run_id.as_str())
            .collect::<Vec<_>>(),
        vec!["r3", "r1"]
    );
}

/// History: decided rows of the same workflow and node in other runs, newest run first.
pub async fn approval_history_other_runs_newest_first(store: &dyn Store) {
    insert_runs(
        store,
        vec![
            run_row("old", "deploy", 10),
            run_row("mid", "deploy", 20),
            run_row("new", "deploy", 30),
            run_row("current", "deploy", 40),
            run_row("foreign", "other-wf", 50),
        ],
    )
    .await;
    apply(
        store,
        vec![
            Write::UpsertApproval(approval("old", "gate", 0, "approved", 1)),
            Write::UpsertApproval(approval("mid", "gate", 0, "denied", 2)),
            Write::UpsertApproval(approval("mid", "elsewhere", 0, "approved", 2)),
            Write::UpsertApproval(approval("new", "gate", 0, "requested", 3)),
            Write::UpsertApproval(approval("current", "gate", 0, "approved", 4)),
            Write::UpsertApproval(approval("foreign", "gate", 0, "approved", 5)),
        ],
    )
    .await;
    let hist = ok(
        store
            .approval_history("deploy", "gate", "current", 10)
            .await,
        "approval_history",
    );
    let got: Vec<(&str, &str)> = hist
        .iter()
        .map(|a| (a.run_id.as_str(), a.status.as_str()))
        .collect();
    assert_eq!(got, vec![("mid", "denied"), ("old", "approved")]);
    let hist = ok(
        store.approval_history("deploy", "gate", "current", 1).await,
        "approval_history",
    );
    assert_eq!(
        hist.iter().map(|a| a.run_id.as_str()).collect::<Vec<_>>(),
        vec!["mid"]
    );
    let hist = ok(
        store.approval_history("deploy", "gate", "mid", 10).await,
        "approval_history",
    );
    assert_eq!(
        hist.iter().map(|a| a.run_id.as_str()).collect::<Vec<_>>(),
        vec!["current", "old"]
    );
    assert!(
        ok(
            store.approval_history("nope", "gate", "x", 10).await,
            "approval_history"
        )
        .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// Signals

/// Signal seqs per run from 0; identical rows return the existing seq.
pub async fn signals_seq_and_idempotency(store: &dyn Store) {
    let s0 = signal("r1", "go", None, "{}", 10);
    assert_eq!(
        ok(store.insert_signal(s0.clone()).await, "insert_signal"),
        0
    );
    assert_eq!(
        ok(
            store
                .insert_signal(signal("r1", "go", None, "{\"x\":1}", 10))
                .await,
            "insert_signal"
        ),
        1
    );
    assert_eq!(
        ok(store.insert_signal(s0.clone()).await, "insert_signal"),
        0,
        "identical row returns its seq"
    );
    let mut by = s0.clone();
    by.received_by = Some("alice".into());
    assert_eq!(
        ok(store.insert_signal(by.clone()).await, "insert_signal"),
        2,
        "different received_by is a new signal"
    );
    assert_eq!(ok(store.insert_signal(by).await, "insert_signal"), 2);
    assert_eq!(
        ok(
            store
                .insert_signal(signal("r1", "go", Some("c"), "{}", 10))
                .await,
            "insert_signal"
        ),
        3
    );
    assert_eq!(
        ok(
            store
                .insert_signal(signal("r1", "go", None, "{}", 11))
                .await,
            "insert_signal"
        ),
        4
    );
    assert_eq!(
        ok(
            store
                .insert_signal(signal("r2", "go", None, "{}", 10))
                .await,
            "insert_signal"
        ),
        0,
        "per run"
    );
    let all = ok(
        store.list_signals("r1", "go", None, 0).await,
        "list_signals",
    );
    assert_eq!(
        all.iter().map(|s| s.seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 4]
    );
    assert_eq!(
        all[2],
        SignalRow {
            run_id: "r1".into(),
            seq: 2,
            signal_name: "go".into(),
            correlation_id: None,
            payload_json: "{}".into(),
            received_at_ms: 10,
            received_by: Some("alice".into()),
        }
    );
}

/// Signal filters: name, correlation (`None` = NULL only), inclusive `received_after_ms`.
pub async fn signals_filter(store: &dyn Store) {
    let inserts = vec![
        signal("r1", "go", None, "0", 10),
        signal("r1", "go", Some("c1"), "1", 20),
        signal("r1", "go", Some("c2"), "2", 30),
        signal("r1", "stop", None, "3", 40),
        signal("r1", "go", None, "4", 50),
        signal("r1", "go", Some("c1"), "5", 60),
        signal("r2", "go", None, "6", 70),
    ];
    for s in inserts {
        ok(store.insert_signal(s).await, "insert_signal");
    }
    let payloads = |v: Vec<SignalRow>| v.into_iter().map(|s| s.payload_json).collect::<Vec<_>>();
    assert_eq!(
        payloads(ok(
            store.list_signals("r1", "go", None, 0).await,
            "list_signals"
        )),
        vec!["0", "4"],
        "None matches only NULL"
    );
    assert_eq!(
        payloads(ok(
            store.list_signals("r1", "go", Some("c1"), 0).await,
            "list_signals"
        )),
        vec!["1", "5"]
    );
    assert_eq!(
        payloads(ok(
            store.list_signals("r1", "go", Some("c1"), 60).await,
            "list_signals"
        )),
        vec!["5"],
        "inclusive"
    );
    assert_eq!(
        payloads(ok(
            store.list_signals("r1", "go", Some("c1"), 61).await,
            "list_signals"
        )),
        Vec::<String>::new()
    );
    assert_eq!(
        payloads(ok(
            store.list_signals("r1", "go", None, 50).await,
            "list_signals"
        )),
        vec!["4"]
    );
    assert_eq!(
        payloads(ok(
            store.list_signals("r1", "stop", None, 0).await,
            "list_signals"
        )),
        vec!["3"]
    );
    assert_eq!(
        payloads(ok(
            store.list_signals("r2", "go", None, 0).await,
            "list_signals"
        )),
        vec!["6"]
    );
    assert!(
        ok(
            store.list_signals("r1", "nope", None, 0).await,
            "list_signals"
        )
        .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// Ownership

async fn owner_of(store: &dyn Store, run: &str) -> (Option<String>, Option<i64>) {
    let r = ok(store.get_run(run).await, "get_run");
    match r {
        Some(r) => (r.runtime_owner_id, r.heartbeat_at_ms),
        None => panic!("run {run} missing"),
    }
}

/// An unowned run is claimed even with a fresh heartbeat.
pub async fn claim_unowned_run(store: &dyn Store) {
    let mut r = run_row("r1", "wf", 1);
    r.heartbeat_at_ms = Some(1_000); // fresh heartbeat but nobody owns it
    insert_runs(store, vec![r, run_row("r2", "wf", 1)]).await;
    assert!(ok(
        store.claim_run("r1", "me", 1_001, 500, None).await,
        "claim"
    ));
    assert_eq!(
        owner_of(store, "r1").await,
        (Some("me".into()), Some(1_001))
    );
    assert!(ok(
        store.claim_run("r2", "me", 5, 0, None).await,
        "claim without heartbeat"
    ));
    assert_eq!(owner_of(store, "r2").await, (Some("me".into()), Some(5)));
}

/// A heartbeat strictly older than `stale_before_ms` (or missing) can be taken over.
pub async fn claim_stale_run(store: &dyn Store) {
    let mut r = run_row("r1", "wf", 1);
    r.runtime_owner_id = Some("old".into());
    r.heartbeat_at_ms = Some(100);
    let mut r2 = run_row("r2", "wf", 1);
    r2.runtime_owner_id = Some("old".into());
    insert_runs(store, vec![r, r2]).await;
    assert!(!ok(
        store.claim_run("r1", "me", 1_000, 100, None).await,
        "heartbeat == stale_before is not stale"
    ));
    assert!(ok(
        store.claim_run("r1", "me", 1_000, 101, None).await,
        "stale claim"
    ));
    assert_eq!(
        owner_of(store, "r1").await,
        (Some("me".into()), Some(1_000))
    );
    assert!(ok(
        store.claim_run("r2", "me", 1_000, 0, None).await,
        "owner without heartbeat is stale"
    ));
}

/// A run whose owner is the proven-dead owner can be taken over.
pub async fn claim_dead_owner(store: &dyn Store) {
    let mut r = run_row("r1", "wf", 1);
    r.runtime_owner_id = Some("dead".into());
    r.heartbeat_at_ms = Some(10_000);
    insert_runs(store, vec![r]).await;
    assert!(!ok(
        store
            .claim_run("r1", "me", 10_001, 5_000, Some("someone-else"))
            .await,
        "wrong dead owner"
    ));
    assert!(ok(
        store
            .claim_run("r1", "me", 10_001, 5_000, Some("dead"))
            .await,
        "dead owner"
    ));
    assert_eq!(
        owner_of(store, "r1").await,
        (Some("me".into()), Some(10_001))
    );
}

/// A live owner with a fresh heartbeat keeps its run.
pub async fn claim_fresh_owner_refused(store: &dyn Store) {
    let mut r = run_row("r1", "wf", 1);
    r.runtime_owner_id = Some("alive".into());
    r.heartbeat_at_ms = Some(10_000);
    insert_runs(store, vec![r]).await;
    assert!(!ok(
        store.claim_run("r1", "me", 10_001, 5_000, None).await,
        "fresh owner"
    ));
    assert_eq!(
        owner_of(store, "r1").await,
        (Some("alive".into()), Some(10_000)),
        "unchanged"
    );
}

/// Claiming a missing run returns false.
pub async fn claim_missing_run(store: &dyn Store) {
    assert!(!ok(
        store.claim_run("ghost", "me", 1, 1, None).await,
        "missing run"
    ));
    assert_eq!(ok(store.get_run("ghost").await, "get_run"), None);
}

/// Heartbeat refreshes only the owner's runs and reports cancel requests.
pub async fn heartbeat_owned_and_cancel_requested(store: &dyn Store) {
    insert_runs(
        store,
        vec![
            run_row("b", "wf", 1),
            run_row("a", "wf", 1),
            run_row("c", "wf", 1),
            run_row("d", "wf", 1),
        ],
    )
    .await;
    for id in ["a", "b", "d"] {
        assert!(ok(store.claim_run(id, "me", 100, 0, None).await, "claim"));
    }
    assert!(ok(
        store.claim_run("c", "other", 100, 0, None).await,
        "claim"
    ));
    assert!(ok(store.request_cancel("b", 150).await, "cancel"));
    assert!(ok(store.request_cancel("c", 150).await, "cancel"));
    // "d" was released by its owner.
    apply(
        store,
        vec![Write::UpdateRun {
            run_id: "d".into(),
            patch: RunPatch {
                runtime_owner_id: Some(None),
                ..Default::default()
            },
        }],
    )
    .await;

    let hb = ok(store.heartbeat("me", 200).await, "heartbeat");
    assert_eq!(hb.owned, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(hb.cancel_requested, vec!["b".to_string()]);
    assert_eq!(owner_of(store, "a").await.1, Some(200));
    assert_eq!(owner_of(store, "b").await.1, Some(200));
    assert_eq!(
        owner_of(store, "c").await.1,
        Some(100),
        "other owner untouched"
    );
    assert_eq!(
        owner_of(store, "d").await.1,
        Some(100),
        "released run untouched"
    );
    let hb = ok(store.heartbeat("nobody", 200).await, "heartbeat");
    assert!(hb.owned.is_empty() && hb.cancel_requested.is_empty());
}

/// Cancel requests are durable; a missing run returns false.
pub async fn request_cancel_existing_and_missing(store: &dyn Store) {
    insert_runs(store, vec![run_row("r1", "wf", 1)]).await;
    assert!(ok(store.request_cancel("r1", 42).await, "cancel"));
    let r = ok(store.get_run("r1").await, "get_run");
    assert_eq!(r.and_then(|r| r.cancel_requested_at_ms), Some(42));
    assert!(ok(store.request_cancel("r1", 50).await, "cancel again"));
    let r = ok(store.get_run("r1").await, "get_run");
    assert!(r.and_then(|r| r.cancel_requested_at_ms).is_some());
    assert!(!ok(
        store.request_cancel("ghost", 42).await,
        "cancel missing"
    ));
}

// ---------------------------------------------------------------------------------------------
// Listing runs

/// `list_runs`: newest first, limited, `running` also matches `continued`.
pub async fn list_runs_order_limit_status(store: &dyn Store) {
    let with = |id: &str, created: i64, st: &str| {
        let mut r = run_row(id, "wf", created);
        r.status = st.into();
        r
    };
    insert_runs(
        store,
        vec![
            with("r1", 10, status::RUNNING),
            with("r2", 30, status::FINISHED),
            with("r3", 20, status::CONTINUED),
            with("r4", 40, status::RUNNING),
            with("r5", 50, status::FAILED),
        ],
    )
    .await;
    assert_eq!(
        ids(&ok(store.list_runs(None, 100).await, "list_runs")),
        vec!["r5", "r4", "r2", "r3", "r1"]
    );
    assert_eq!(
        ids(&ok(store.list_runs(None, 2).await, "list_runs")),
        vec!["r5", "r4"]
    );
    assert_eq!(
        ids(&ok(
            store.list_runs(Some(status::RUNNING), 100).await,
            "list_runs"
        )),
        vec!["r4", "r3", "r1"],
        "running includes continued"
    );
    assert_eq!(
        ids(&ok(
            store.list_runs(Some(status::CONTINUED), 100).await,
            "list_runs"
        )),
        vec!["r3"]
    );
    assert_eq!(
        ids(&ok(
            store.list_runs(Some(status::FINISHED), 100).await,
            "list_runs"
        )),
        vec!["r2"]
    );
    assert!(
        ok(
            store.list_runs(Some(status::CANCELLED), 100).await,
            "list_runs"
        )
        .is_empty()
    );
    assert!(ok(store.list_runs(None, 0).await, "list_runs").is_empty());
}

/// `query_runs`: workflow and run-id-prefix filters, and paging from a position (ties on
/// `created_at_ms` broken by run id), give the same rows on every backend.
pub async fn query_runs_filters_and_pages(store: &dyn Store) {
    let with = |id: &str, wf: &str, created: i64, st: &str| {
        let mut r = run_row(id, wf, created);
        r.status = st.into();
        r
    };
    insert_runs(
        store,
        vec![
            with("ab-1", "alpha", 10, status::RUNNING),
            with("ab-2", "beta", 20, status::FINISHED),
            with("cd-1", "alpha", 20, status::FINISHED),
            with("cd-2", "alpha", 30, status::CONTINUED),
            with("ab-3", "alpha", 40, status::FAILED),
        ],
    )
    .await;
    let q = |f: &dyn Fn(&mut RunQuery)| {
        let mut q = RunQuery {
            limit: 100,
            ..RunQuery::default()
        };
        f(&mut q);
        q
    };
    let list = |q: RunQuery| async move { ok(store.query_runs(&q).await, "query_runs") };
    assert_eq!(
        ids(&list(q(&|q| q.workflow_name = Some("alpha".into()))).await),
        vec!["ab-3", "cd-2", "cd-1", "ab-1"]
    );
    assert_eq!(
        ids(&list(q(&|q| q.run_id_prefix = Some("ab-".into()))).await),
        vec!["ab-3", "ab-2", "ab-1"]
    );
    assert_eq!(
        ids(&list(q(&|q| {
            q.workflow_name = Some("alpha".into());
            q.status = Some(status::RUNNING.into());
        }))
        .await),
        vec!["cd-2", "ab-1"]
    );
    // Pages of two from the top, each continuing after the last row of the one before.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = list(RunQuery {
            limit: 2,
            before: before.clone(),
            ..RunQuery::default()
        })
        .await;
        let Some(last) = page.last() else { break };
        before = Some(RunCursor {
            created_at_ms: last.created_at_ms,
            run_id: Some(last.run_id.clone()),
        });
        seen.extend(page.iter().map(|r| r.run_id.clone()));
    }
    assert_eq!(seen, vec!["ab-3", "cd-2", "cd-1", "ab-2", "ab-1"]);
    // A position without a run id skips every run created at that time.
    assert_eq!(
        ids(&list(q(&|q| {
            q.before = Some(RunCursor {
                created_at_ms: 20,
                run_id: None,
            })
        }))
        .await),
        vec!["ab-1"]
    );
    // Quotes and wildcards in a prefix are data, not SQL.
    assert!(
        list(q(&|q| q.run_id_prefix = Some("%' OR 1=1 --".into())))
            .await
            .is_empty()
    );
}

/// `list_stale_runs`: running runs without a live owner, oldest heartbeat first.
pub async fn list_stale_runs_order_limit(store: &dyn Store) {
    let with = |id: &str, st: &str, owner: Option<&str>, hb: Option<i64>| {
        let mut r = run_row(id, "wf", 1);
        r.status = st.into();
        r.runtime_owner_id = owner.map(str::to_string);
        r.heartbeat_at_ms = hb;
        r
    };
    insert_runs(
        store,
        vec![
            with("fresh", status::RUNNING, Some("o"), Some(1_000)),
            with("stale-new", status::RUNNING, Some("o"), Some(400)),
            with("stale-old", status::RUNNING, Some("o"), Some(100)),
            with("unowned", status::RUNNING, None, Some(900)),
            with("finished", status::FINISHED, Some("o"), Some(10)),
            with("waiting", status::WAITING_APPROVAL, None, None),
        ],
    )
    .await;
    let stale = ok(store.list_stale_runs(500, 100).await, "list_stale_runs");
    assert_eq!(
        ids(&stale),
        vec!["stale-old", "stale-new", "unowned"],
        "oldest heartbeat first"
    );
    let stale = ok(store.list_stale_runs(500, 1).await, "list_stale_runs");
    assert_eq!(ids(&stale), vec!["stale-old"]);
    let stale = ok(store.list_stale_runs(0, 100).await, "list_stale_runs");
    assert_eq!(ids(&stale), vec!["unowned"]);
}

// ---------------------------------------------------------------------------------------------
// Cron

/// A gateway cron row for `key`.
pub fn cron_row(cron_id: &str, key: &str, created_at_ms: i64) -> CronRow {
    CronRow {
        cron_id: cron_id.into(),
        pattern: "*/5 * * * *".into(),
        workflow_path: format!("gateway:{key}"),
        enabled: true,
        created_at_ms,
        last_run_at_ms: None,
        next_run_at_ms: Some(created_at_ms + 1_000),
        error_json: None,
        input_json: None,
    }
}

async fn get_cron(store: &dyn Store, id: &str) -> Option<CronRow> {
    ok(store.get_cron(id).await, "get_cron")
}

/// Every column round-trips; listing is by creation time ascending; missing reads as `None`.
pub async fn cron_upsert_get_list(store: &dyn Store) {
    assert!(ok(store.list_crons().await, "list_crons").is_empty());
    let full = CronRow {
        cron_id: "full".into(),
        pattern: "0 8 * * 1-5".into(),
        workflow_path: "gateway:github".into(),
        enabled: false,
        created_at_ms: 30,
        last_run_at_ms: Some(20),
        next_run_at_ms: Some(40),
        error_json: Some("boom".into()),
        input_json: Some(r#"{"repo":"smithers"}"#.into()),
    };
    ok(store.upsert_cron(full.clone()).await, "upsert_cron");
    let mut bare = cron_row("bare", "wf", 10);
    bare.next_run_at_ms = None;
    ok(store.upsert_cron(bare.clone()).await, "upsert_cron");
    ok(
        store.upsert_cron(cron_row("mid", "wf", 20)).await,
        "upsert_cron",
    );
    assert_eq!(get_cron(store, "full").await, Some(full));
    assert_eq!(get_cron(store, "bare").await, Some(bare));
    assert_eq!(get_cron(store, "missing").await, None);
    let listed: Vec<String> = ok(store.list_crons().await, "list_crons")
        .into_iter()
        .map(|c| c.cron_id)
        .collect();
    assert_eq!(
        listed,
        vec!["bare", "mid", "full"],
        "oldest first, disabled included"
    );
}

/// An upsert on an existing id updates pattern, path, enabled, next run and input only.
pub async fn cron_upsert_conflict_keeps_history(store: &dyn Store) {
    let mut first = cron_row("c", "a", 10);
    first.last_run_at_ms = Some(11);
    first.error_json = Some("old error".into());
    ok(store.upsert_cron(first).await, "upsert_cron");
    let second = CronRow {
        cron_id: "c".into(),
        pattern: "@daily".into(),
        workflow_path: "gateway:b".into(),
        enabled: false,
        created_at_ms: 99,
        last_run_at_ms: None,
        next_run_at_ms: None,
        error_json: None,
        input_json: Some(r#"{"n":2}"#.into()),
    };
    ok(store.upsert_cron(second).await, "upsert_cron");
    assert_eq!(
        get_cron(store, "c").await,
        Some(CronRow {
            cron_id: "c".into(),
            pattern: "@daily".into(),
            workflow_path: "gateway:b".into(),
            enabled: false,
            created_at_ms: 10,
            last_run_at_ms: Some(11),
            next_run_at_ms: None,
            error_json: Some("old error".into()),
            input_json: Some(r#"{"n":2}"#.into()),
        })
    );
    assert_eq!(ok(store.list_crons().await, "list_crons").len(), 1);
}

/// `delete_cron` removes one row and reports whether it existed.
pub async fn cron_delete(store: &dyn Store) {
    ok(
        store.upsert_cron(cron_row("a", "wf", 1)).await,
        "upsert_cron",
    );
    ok(
        store.upsert_cron(cron_row("b", "wf", 2)).await,
        "upsert_cron",
    );
    assert!(ok(store.delete_cron("a").await, "delete_cron"));
    assert!(!ok(store.delete_cron("a").await, "delete_cron again"));
    assert!(!ok(
        store.delete_cron("missing").await,
        "delete_cron missing"
    ));
    assert_eq!(get_cron(store, "a").await, None);
    assert!(get_cron(store, "b").await.is_some());
}

/// `update_cron_run` writes last run, next run and error (NULLs included) and nothing else.
pub async fn cron_update_run(store: &dyn Store) {
    let row = cron_row("c", "wf", 5);
    ok(store.upsert_cron(row.clone()).await, "upsert_cron");
    assert!(ok(
        store
            .update_cron_run("c", Some(100), Some(200), Some("failed: x".into()))
            .await,
        "update_cron_run"
    ));
    let mut expected = row.clone();
    expected.last_run_at_ms = Some(100);
    expected.next_run_at_ms = Some(200);
    expected.error_json = Some("failed: x".into());
    assert_eq!(get_cron(store, "c").await, Some(expected.clone()));
    assert!(ok(
        store.update_cron_run("c", Some(300), None, None).await,
        "update_cron_run"
    ));
    expected.last_run_at_ms = Some(300);
    expected.next_run_at_ms = None;
    expected.error_json = None;
    assert_eq!(get_cron(store, "c").await, Some(expected));
    assert!(!ok(
        store
            .update_cron_run("missing", Some(1), Some(2), None)
            .await,
        "update_cron_run missing"
    ));
}

/// `claim_due_cron` advances the next run only when it still equals the expectation (NULL
/// included) and the cron is enabled.
pub async fn cron_claim_compare_and_set(store: &dyn Store) {
    let mut row = cron_row("c", "wf", 1);
    row.next_run_at_ms = Some(1_000);
    ok(store.upsert_cron(row.clone()).await, "upsert_cron");

    assert!(!ok(
        store.claim_due_cron("c", Some(999), 2_000, 1_500).await,
        "claim stale expectation"
    ));
    assert!(!ok(
        store.claim_due_cron("c", None, 2_000, 1_500).await,
        "claim NULL expectation on non-NULL"
    ));
    assert_eq!(get_cron(store, "c").await, Some(row.clone()), "unchanged");

    assert!(ok(
        store.claim_due_cron("c", Some(1_000), 2_000, 1_500).await,
        "claim"
    ));
    let got = get_cron(store, "c").await;
    assert_eq!(
        got.as_ref().map(|c| (c.last_run_at_ms, c.next_run_at_ms)),
        Some((Some(1_500), Some(2_000)))
    );
    assert!(!ok(
        store.claim_due_cron("c", Some(1_000), 3_000, 1_600).await,
        "second claim with the old expectation"
    ));

    let mut never = cron_row("never", "wf", 2);
    never.next_run_at_ms = None;
    ok(store.upsert_cron(never).await, "upsert_cron");
    assert!(ok(
        store.claim_due_cron("never", None, 5_000, 4_000).await,
        "claim NULL next run"
    ));
    assert_eq!(
        get_cron(store, "never")
            .await
            .and_then(|c| c.next_run_at_ms),
        Some(5_000)
    );

    let mut off = cron_row("off", "wf", 3);
    off.enabled = false;
    ok(store.upsert_cron(off.clone()).await, "upsert_cron");
    assert!(!ok(
        store
            .claim_due_cron("off", off.next_run_at_ms, 9_000, 8_000)
            .await,
        "claim disabled"
    ));
    assert!(!ok(
        store.claim_due_cron("missing", None, 9_000, 8_000).await,
        "claim missing"
    ));
}

/// Concurrent claims with the same expectation: exactly one wins, every round.
pub async fn cron_claim_race_exactly_one_wins(store: &dyn Store) {
    for round in 0..10i64 {
        let id = format!("race{round}");
        let mut row = cron_row(&id, "wf", round);
        row.next_run_at_ms = Some(100 + round);
        ok(store.upsert_cron(row).await, "upsert_cron");
        let claims = (0..4)
            .map(|i| store.claim_due_cron(&id, Some(100 + round), 1_000 + i, 500))
            .collect();
        let wins = join_all(claims)
            .await
            .into_iter()
            .map(|r| ok(r, "claim_due_cron"))
            .filter(|won| *won)
            .count();
        assert_eq!(wins, 1, "round {round}: exactly one claim wins");
    }
}

/// The writes a rewind uses: clearing a run's state, dropping later frames and snapshots, and
/// dropping attempts and decisions after a time — for that run only.
pub async fn rewind_writes_remove_what_came_later(store: &dyn Store) {
    let out = |run: &str, node_id: &str| OutputRow {
        run_id: run.into(),
        node_id: node_id.into(),
        iteration: 0,
        output_table: "".into(),
        payload_json: "1".into(),
        created_at_ms: 1,
    };
    let mut setup = Vec::new();
    for run in ["r1", "r2"] {
        for n in 1..=3 {
            setup.push(Write::InsertFrame(frame(run, n)));
            setup.push(Write::InsertSnapshot(snapshot(run, n)));
        }
        setup.push(Write::UpsertNode(node(run, "a", 0, "finished")));
        setup.push(Write::UpsertOutput(out(run, "a")));
        setup.push(Write::UpsertAttempt(attempt(run, "a", 0, 1, 10)));
        setup.push(Write::UpsertAttempt(attempt(run, "b", 0, 1, 50)));
        setup.push(Write::UpsertApproval(approval(
            run, "early", 0, "approved", 5,
        )));
        setup.push(Write::UpsertApproval(approval(
            run,
            "late",
            0,
            "requested",
            60,
        )));
    }
    apply(store, setup).await;
    apply(
        store,
        vec![
            Write::ClearRunState {
                run_id: "r1".into(),
            },
            Write::DeleteFramesAfter {
                run_id: "r1".into(),
                frame_no: 1,
            },
            Write::DeleteAttemptsAfter {
                run_id: "r1".into(),
                started_after_ms: 20,
            },
        ],
    )
    .await;
    assert_eq!(ok(store.last_frame_no("r1").await, "last_frame_no"), 1);
    assert_eq!(
        ok(
            store.snapshots_from_keyframe("r1", 10, 10).await,
            "snapshots"
        )
        .len(),
        1
    );
    assert!(ok(store.list_nodes("r1").await, "nodes").is_empty());
    assert!(ok(store.list_outputs("r1").await, "outputs").is_empty());
    let attempts = ok(store.list_attempts("r1").await, "attempts");
    assert_eq!(
        attempts
            .iter()
            .map(|a| a.node_id.as_str())
            .collect::<Vec<_>>(),
        vec!["a"]
    );
    assert!(ok(store.get_approval("r1", "early", 0).await, "approval").is_some());
    assert!(ok(store.get_approval("r1", "late", 0).await, "approval").is_none());
    // the other run is untouched
    assert_eq!(ok(store.last_frame_no("r2").await, "last_frame_no"), 3);
    assert_eq!(ok(store.list_attempts("r2").await, "attempts").len(), 2);
    assert_eq!(ok(store.list_outputs("r2").await, "outputs").len(), 1);
}

fn audit(id: &str, run: &str, result: &str, ts: i64) -> AuditRow {
    AuditRow {
        id: id.into(),
        run_id: run.into(),
        from_frame_no: -1,
        to_frame_no: 2,
        caller: "alice".into(),
        timestamp_ms: ts,
        result: result.into(),
        duration_ms: 0,
    }
}

pub async fn audit_rows_upsert_and_filter(store: &dyn Store) {
    apply(
        store,
        vec![
            Write::UpsertAudit(audit("a1", "r1", audit_result::IN_PROGRESS, 10)),
            Write::UpsertAudit(audit("a2", "r1", audit_result::FAILED, 5)),
            Write::UpsertAudit(audit("a3", "r2", audit_result::IN_PROGRESS, 7)),
        ],
    )
    .await;
    // updated in place: frames, result and duration change, identity and time stay
    let mut done = audit("a1", "other-run", audit_result::SUCCESS, 99);
    done.from_frame_no = 5;
    done.duration_ms = 12;
    apply(store, vec![Write::UpsertAudit(done)]).await;
    let r1 = ok(store.list_audits(Some("r1"), None).await, "list_audits");
    assert_eq!(
        r1.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        vec!["a2", "a1"],
        "oldest first"
    );
    assert_eq!(r1[1].result, audit_result::SUCCESS);
    assert_eq!((r1[1].from_frame_no, r1[1].duration_ms), (5, 12));
    assert_eq!((r1[1].run_id.as_str(), r1[1].timestamp_ms), ("r1", 10));
    let open = ok(
        store
            .list_audits(None, Some(audit_result::IN_PROGRESS))
            .await,
        "list_audits",
    );
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, "a3");
}

pub async fn node_diffs_cache_and_rewind(store: &dyn Store) {
    let row = |node: &str, attempt: i64, started: i64| NodeDiffRow {
        run_id: "r1".into(),
        node_id: node.into(),
        iteration: 0,
        base_ref: "base".into(),
        attempt,
        attempt_started_at_ms: started,
        bundle_json: format!("{{\"seq\":{attempt}}}"),
        created_at_ms: 1,
    };
    apply(
        store,
        vec![
            Write::UpsertNodeDiff(row("a", 1, 10)),
            Write::UpsertNodeDiff(row("a", 2, 30)),
            Write::UpsertNodeDiff(row("b", 1, 40)),
        ],
    )
    .await;
    let got = ok(
        store.get_node_diff("r1", "a", 0, 2, "base").await,
        "get_node_diff",
    );
    assert_eq!(got.map(|r| r.bundle_json), Some("{\"seq\":2}".to_string()));
    assert!(ok(store.get_node_diff("r1", "a", 0, 2, "other").await, "get").is_none());
    assert_eq!(ok(store.count_node_diffs_after("r1", 20).await, "count"), 2);
    assert_eq!(ok(store.count_all_node_diffs().await, "count all"), 3);
    apply(
        store,
        vec![Write::DeleteNodeDiffsAfter {
            run_id: "r1".into(),
            started_after_ms: 20,
        }],
    )
    .await;
    assert_eq!(ok(store.count_node_diffs_after("r1", 0).await, "count"), 1);
    assert!(ok(store.get_node_diff("r1", "a", 0, 1, "base").await, "get").is_some());
    // deleting one attempt takes its diffs with it
    apply(
        store,
        vec![
            Write::UpsertAttempt(attempt("r1", "a", 0, 1, 10)),
            Write::UpsertAttempt(attempt("r1", "a", 0, 2, 30)),
            Write::UpsertNodeDiff(row("a", 2, 30)),
        ],
    )
    .await;
    assert_eq!(
        ok(store.list_node_diff_attempts("r1").await, "list"),
        vec![("a".to_string(), 0, 1), ("a".to_string(), 0, 2)]
    );
    apply(
        store,
        vec![Write::DeleteAttempt {
            run_id: "r1".into(),
            node_id: "a".into(),
            iteration: 0,
            attempt: 2,
        }],
    )
    .await;
    assert_eq!(
        ok(store.list_node_diff_attempts("r1").await, "list"),
        vec![("a".to_string(), 0, 1)]
    );
    let left = ok(store.list_attempts("r1").await, "attempts");
    assert_eq!(left.iter().map(|a| a.attempt).collect::<Vec<_>>(), vec![1]);
}

// ---------------------------------------------------------------------------------------------
// Webhook delivery dedupe

/// A claim of `id` for workflow `wf` by `claim` at `now`, remembered until `expires`; claims
/// without outcome taken before `stale_before` count as abandoned.
pub fn delivery_claim(
    wf: &str,
    id: &str,
    claim: &str,
    now: i64,
    expires: i64,
    stale_before: i64,
) -> DeliveryClaim {
    DeliveryClaim {
        workflow: wf.into(),
        delivery_id: id.into(),
        claim_id: claim.into(),
        now_ms: now,
        expires_at_ms: expires,
        stale_before_ms: stale_before,
    }
}

async fn claim_delivery(store: &dyn Store, c: DeliveryClaim) -> bool {
    ok(
        store.claim_webhook_delivery(&c).await,
        "claim_webhook_delivery",
    )
}

async fn get_delivery(store: &dyn Store, wf: &str, id: &str) -> Option<WebhookDeliveryRow> {
    ok(
        store.get_webhook_delivery(wf, id).await,
        "get_webhook_delivery",
    )
}

/// The first claim wins; a repeat inside the window is refused whether or not the first has
/// recorded its outcome; only the claimer records the outcome; ids are per workflow.
pub async fn webhook_delivery_claimed_once(store: &dyn Store) {
    assert_eq!(get_delivery(store, "wf", "d1").await, None);
    assert!(claim_delivery(store, delivery_claim("wf", "d1", "a", 1_000, 5_000, 0)).await);
    assert_eq!(
        get_delivery(store, "wf", "d1").await,
        Some(WebhookDeliveryRow {
            workflow: "wf".into(),
            delivery_id: "d1".into(),
            claim_id: "a".into(),
            received_at_ms: 1_000,
            expires_at_ms: 5_000,
            outcome_json: None,
        })
    );
    assert!(
        !claim_delivery(store, delivery_claim("wf", "d1", "b", 1_100, 5_100, 0)).await,
        "a repeat while the first is acting"
    );
    assert!(!ok(
        store
            .finish_webhook_delivery("wf", "d1", "b", "{\"x\":1}")
            .await,
        "finish by another claimer"
    ));
    assert!(ok(
        store
            .finish_webhook_delivery("wf", "d1", "a", "{\"ok\":true}")
            .await,
        "finish"
    ));
    let row = get_delivery(store, "wf", "d1").await;
    assert_eq!(
        row.as_ref()
            .map(|r| (r.claim_id.as_str(), r.outcome_json.as_deref())),
        Some(("a", Some("{\"ok\":true}")))
    );
    assert!(
        !claim_delivery(store, delivery_claim("wf", "d1", "c", 4_999, 9_000, 4_999)).await,
        "a finished delivery is a duplicate until it expires, however old"
    );
    assert!(
        claim_delivery(store, delivery_claim("other", "d1", "d", 1_200, 5_000, 0)).await,
        "the same id under another workflow is another delivery"
    );
    assert!(claim_delivery(store, delivery_claim("wf", "d2", "e", 1_200, 5_000, 0)).await);
    assert!(!ok(
        store
            .finish_webhook_delivery("wf", "missing", "a", "{}")
            .await,
        "finish missing"
    ));
}

/// At its expiry a delivery may be claimed again (even before it is pruned); pruning deletes
/// exactly the expired rows.
pub async fn webhook_delivery_expires_and_is_pruned(store: &dyn Store) {
    assert!(claim_delivery(store, delivery_claim("wf", "d", "a", 1_000, 2_000, 0)).await);
    ok(
        store.finish_webhook_delivery("wf", "d", "a", "{}").await,
        "finish",
    );
    assert!(claim_delivery(store, delivery_claim("wf", "e", "x", 1_000, 3_000, 0)).await);
    assert!(!claim_delivery(store, delivery_claim("wf", "d", "b", 1_999, 2_999, 0)).await);
    assert!(
        claim_delivery(store, delivery_claim("wf", "d", "c", 2_000, 4_000, 0)).await,
        "expired"
    );
    assert_eq!(
        get_delivery(store, "wf", "d").await,
        Some(WebhookDeliveryRow {
            workflow: "wf".into(),
            delivery_id: "d".into(),
            claim_id: "c".into(),
            received_at_ms: 2_000,
            expires_at_ms: 4_000,
            outcome_json: None,
        }),
        "the new claim replaces the old row and its outcome"
    );
    assert_eq!(ok(store.prune_webhook_deliveries(2_999).await, "prune"), 0);
    assert_eq!(ok(store.prune_webhook_deliveries(3_000).await, "prune"), 1);
    assert_eq!(get_delivery(store, "wf", "e").await, None);
    assert!(get_delivery(store, "wf", "d").await.is_some());
    assert_eq!(ok(store.prune_webhook_deliveries(10_000).await, "prune"), 1);
    assert_eq!(get_delivery(store, "wf", "d").await, None);
    assert_eq!(ok(store.prune_webhook_deliveries(10_000).await, "prune"), 0);
}

/// A released claim (its action failed) lets a retry act; an abandoned claim (no outcome,
/// taken before `stale_before_ms`) may be taken over, after which the old claimer can neither
/// record an outcome nor release it.
pub async fn webhook_delivery_release_and_abandoned_claims(store: &dyn Store) {
    assert!(claim_delivery(store, delivery_claim("wf", "d", "a", 1_000, 9_000, 0)).await);
    assert!(!ok(
        store.release_webhook_delivery("wf", "d", "b").await,
        "release by another claimer"
    ));
    assert!(ok(
        store.release_webhook_delivery("wf", "d", "a").await,
        "release"
    ));
    assert_eq!(get_delivery(store, "wf", "d").await, None);
    assert!(!ok(
        store.release_webhook_delivery("wf", "d", "a").await,
        "release again"
    ));
    assert!(claim_delivery(store, delivery_claim("wf", "d", "b", 1_000, 9_000, 0)).await);
    assert!(
        !claim_delivery(store, delivery_claim("wf", "d", "c", 1_500, 9_500, 1_000)).await,
        "claimed at the stale bound: still live"
    );
    assert!(
        claim_delivery(store, delivery_claim("wf", "d", "c", 1_500, 9_500, 1_001)).await,
        "claimed before the stale bound: abandoned"
    );
    assert!(!ok(
        store.finish_webhook_delivery("wf", "d", "b", "{}").await,
        "the old claimer lost the delivery"
    ));
    assert!(!ok(
        store.release_webhook_delivery("wf", "d", "b").await,
        "the old claimer cannot release it"
    ));
    assert!(ok(
        store.finish_webhook_delivery("wf", "d", "c", "{}").await,
        "finish"
    ));
    assert!(
        !claim_delivery(store, delivery_claim("wf", "d", "e", 2_000, 9_000, 2_000)).await,
        "a finished delivery is never abandoned"
    );
}

/// Concurrent claims of one delivery: exactly one wins, every round.
pub async fn webhook_delivery_concurrent_claims_exactly_one_wins(store: &dyn Store) {
    for round in 0..5i64 {
        let id = format!("race{round}");
        let claims: Vec<DeliveryClaim> = (0..20)
            .map(|i| delivery_claim("wf", &id, &format!("c{i}"), 1_000, 9_000, 0))
            .collect();
        let wins = join_all(
            claims
                .iter()
                .map(|c| store.claim_webhook_delivery(c))
                .collect(),
        )
        .await
        .into_iter()
        .map(|r| ok(r, "claim_webhook_delivery"))
        .filter(|won| *won)
        .count();
        assert_eq!(wins, 1, "round {round}: exactly one claim wins");
    }
}
