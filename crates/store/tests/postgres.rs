//! PostgreSQL backend: the shared conformance suite against a real temporary cluster started by
//! this test binary, plus PostgreSQL-specific behaviour (several stores on one database as
//! several nodes would be, migrations, corruption, URLs).

mod support;

use smithers_core::Code;
use smithers_store::conformance::run_row;
use smithers_store::postgres::{PgStore, SCHEMA_VERSION};
use smithers_store::{Batch, Store, Write};
use std::sync::Arc;
use support::pg_cluster::{fresh_database_url, raw_client};

async fn open(url: &str) -> PgStore {
    match PgStore::open(url).await {
        Ok(s) => s,
        Err(e) => panic!("open {url}: {e}"),
    }
}

async fn pg_store() -> Arc<dyn Store> {
    let url = fresh_database_url().await;
    Arc::new(open(&url).await)
}

mod conformance {
    use super::*;
    smithers_store::store_conformance_tests!(pg_store());
}

fn event(run: &str, i: usize) -> Write {
    Write::AppendEvent {
        run_id: run.into(),
        timestamp_ms: i as i64,
        event_type: "E".into(),
        payload_json: format!("{{\"i\":{i}}}"),
    }
}

async fn apply(store: &dyn Store, writes: Vec<Write>) {
    let mut b = Batch::new();
    for w in writes {
        b.push(w);
    }
    if let Err(e) = store.apply(b).await {
        panic!("apply: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_race_claim_run_exactly_one_wins() {
    let url = fresh_database_url().await;
    let a = Arc::new(open(&url).await);
    let b = Arc::new(open(&url).await);
    for round in 0..20 {
        let run = format!("race{round}");
        apply(&*a, vec![Write::InsertRun(run_row(&run, "wf", 1))]).await;
        let (ra, rb) = {
            let (a, b, run1, run2) = (a.clone(), b.clone(), run.clone(), run.clone());
            let ta =
                tokio::spawn(async move { a.claim_run(&run1, "owner-a", 1_000, 500, None).await });
            let tb =
                tokio::spawn(async move { b.claim_run(&run2, "owner-b", 1_000, 500, None).await });
            (ta.await, tb.await)
        };
        let (ra, rb) = match (ra, rb) {
            (Ok(Ok(x)), Ok(Ok(y))) => (x, y),
            other => panic!("claim failed: {other:?}"),
        };
        assert!(ra ^ rb, "round {round}: exactly one wins (a={ra}, b={rb})");
        let winner = if ra { "owner-a" } else { "owner-b" };
        let row = b.get_run(&run).await.ok().flatten();
        assert_eq!(
            row.and_then(|r| r.runtime_owner_id).as_deref(),
            Some(winner)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_race_claim_due_cron_exactly_one_wins() {
    let url = fresh_database_url().await;
    let a = Arc::new(open(&url).await);
    let b = Arc::new(open(&url).await);
    for round in 0..20 {
        let id = format!("cron{round}");
        let row = smithers_store::conformance::cron_row(&id, "wf", round);
        let expected = row.next_run_at_ms;
        assert!(a.upsert_cron(row).await.is_ok());
        let (ra, rb) = {
            let (a, b, id1, id2) = (a.clone(), b.clone(), id.clone(), id.clone());
            let ta = tokio::spawn(async move { a.claim_due_cron(&id1, expected, 7, 5).await });
            let tb = tokio::spawn(async move { b.claim_due_cron(&id2, expected, 8, 5).await });
            (ta.await, tb.await)
        };
        let (ra, rb) = match (ra, rb) {
            (Ok(Ok(x)), Ok(Ok(y))) => (x, y),
            other => panic!("claim failed: {other:?}"),
        };
        assert!(ra ^ rb, "round {round}: exactly one wins (a={ra}, b={rb})");
        let next = b
            .get_cron(&id)
            .await
            .ok()
            .flatten()
            .and_then(|c| c.next_run_at_ms);
        assert_eq!(next, Some(if ra { 7 } else { 8 }));
    }
}

/// Several stores (as several nodes) append to the same runs at once: seqs stay unique and
/// gapless per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_on_one_database_append_gapless_seqs() {
    let url = fresh_database_url().await;
    let stores: Vec<Arc<PgStore>> = vec![
        Arc::new(open(&url).await),
        Arc::new(open(&url).await),
        Arc::new(open(&url).await),
    ];
    let mut tasks = Vec::new();
    for w in 0..12 {
        let store = stores[w % stores.len()].clone();
        tasks.push(tokio::spawn(async move {
            let run = format!("run{}", w % 3);
            let mut seqs = Vec::new();
            for i in 0..15 {
                let mut b = Batch::new();
                b.push(event(&run, i)).push(event(&run, i));
                match store.apply(b).await {
                    Ok(a) => seqs.extend(a.event_seqs),
                    Err(e) => panic!("apply: {e}"),
                }
            }
            (run, seqs)
        }));
    }
    let mut per_run: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for t in tasks {
        match t.await {
            Ok((run, seqs)) => per_run.entry(run).or_default().extend(seqs),
            Err(e) => panic!("task: {e}"),
        }
    }
    for (run, mut seqs) in per_run {
        seqs.sort_unstable();
        assert_eq!(seqs, (0..120).collect::<Vec<i64>>(), "{run}");
        let listed = stores[0]
            .list_events(&run, None, 1000)
            .await
            .map(|v| v.into_iter().map(|e| e.seq).collect::<Vec<_>>())
            .ok();
        assert_eq!(listed, Some((0..120).collect::<Vec<i64>>()));
    }
}

/// A takeover by another node is never interleaved with the old owner's guarded batches: once
/// the claim has returned, no batch of the old owner commits. Several rounds, each with two
/// concurrent writers of the old owner, to give an unfenced implementation a chance to fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_fences_the_old_owner() {
    let url = fresh_database_url().await;
    let a = Arc::new(open(&url).await);
    let b = Arc::new(open(&url).await);
    for round in 0..6 {
        let run = format!("r{round}");
        let mut r = run_row(&run, "wf", 1);
        r.runtime_owner_id = Some("node-a".into());
        r.heartbeat_at_ms = Some(1);
        apply(&*a, vec![Write::InsertRun(r)]).await;
        let mut writers = Vec::new();
        for _ in 0..2 {
            let (a, run) = (a.clone(), run.clone());
            writers.push(tokio::spawn(async move {
                let mut committed = Vec::new();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                for i in 0.. {
                    let mut batch = Batch::guarded(&run, "node-a");
                    batch.push(event(&run, i));
                    match a.apply(batch).await {
                        Ok(applied) => committed.extend(applied.event_seqs),
                        Err(e) if e.code == Code::RunLeaseLost => return (committed, true),
                        Err(e) => panic!("apply: {e}"),
                    }
                    if std::time::Instant::now() > deadline {
                        break;
                    }
                }
                (committed, false)
            }));
        }
        // Take over while the old owner is busy writing.
        let t0 = std::time::Instant::now();
        while b.last_event_seq(&run).await.unwrap_or(-1) < 10 {
            assert!(t0.elapsed().as_secs() < 30, "the old owner never wrote");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // A claim does not wait for the row while a batch holds it (it reports false and is
        // tried again), so it lands in a gap between the old owner's batches.
        let t0 = std::time::Instant::now();
        while !b
            .claim_run(&run, "node-b", 10, 5, Some("node-a"))
            .await
            .unwrap_or_else(|e| panic!("claim: {e}"))
        {
            assert!(t0.elapsed().as_secs() < 30, "the claim never got the row");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Everything the old owner will ever commit is visible once the claim returned.
        let seq_at_claim = b.last_event_seq(&run).await.unwrap_or(-2);
        let mut batch = Batch::guarded(&run, "node-b");
        batch.push(event(&run, 9999));
        let b_seq = match b.apply(batch).await {
            Ok(a) => a.event_seqs[0],
            Err(e) => panic!("new owner's batch: {e}"),
        };
        for w in writers {
            let (committed, lost) = match w.await {
                Ok(v) => v,
                Err(e) => panic!("writer: {e}"),
            };
            assert!(lost, "round {round}: the old owner must see RUN_LEASE_LOST");
            assert!(
                committed.iter().all(|s| *s <= seq_at_claim),
                "round {round}: a batch of the old owner committed after the claim returned \
                 (seq_at_claim={seq_at_claim}, a max={:?})",
                committed.iter().max()
            );
        }
        assert_eq!(b_seq, seq_at_claim + 1, "round {round}");
        assert_eq!(b.last_event_seq(&run).await.ok(), Some(b_seq));
    }
}

async fn schema_versions(url: &str) -> Vec<i64> {
    let c = raw_client(url).await;
    match c
        .query(
            "SELECT version FROM _smithers_schema_version ORDER BY version",
            &[],
        )
        .await
    {
        Ok(rows) => rows.iter().map(|r| r.get::<_, i64>(0)).collect(),
        Err(e) => panic!("{e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_opens_migrate_once() {
    let url = fresh_database_url().await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        tasks.push(tokio::spawn(
            async move { PgStore::open(&url).await.map(drop) },
        ));
    }
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("concurrent open failed: {e}"),
            Err(e) => panic!("open task: {e}"),
        }
    }
    drop(open(&url).await);
    assert_eq!(
        schema_versions(&url).await,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
}

/// As on SQLite: the run indexes a migrated database keeps, none that no query uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_keep_only_the_indexes_queries_use() {
    let url = fresh_database_url().await;
    drop(open(&url).await);
    let c = raw_client(&url).await;
    let rows = c
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = '_smithers_runs'
             AND indexname <> '_smithers_runs_pkey' ORDER BY indexname",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, smithers_store::conformance::RUN_INDEXES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_is_refused() {
    let url = fresh_database_url().await;
    drop(open(&url).await);
    let c = raw_client(&url).await;
    if let Err(e) = c
        .batch_execute(
            "INSERT INTO _smithers_schema_version (version, applied_at_ms) VALUES (9999, 0)",
        )
        .await
    {
        panic!("{e:?}");
    }
    match PgStore::open(&url).await {
        Ok(_) => panic!("a newer schema must be refused"),
        Err(e) => {
            assert_eq!(e.code, Code::StorageError, "{e}");
            assert!(e.message.contains("newer"), "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_rows_give_db_corrupt() {
    let url = fresh_database_url().await;
    let store = open(&url).await;
    apply(
        &store,
        vec![
            Write::InsertRun(run_row("bad-status", "wf", 1)),
            Write::InsertRun(run_row("ok", "wf", 1)),
            Write::UpsertLoop(smithers_store::LoopRow {
                run_id: "ok".into(),
                ralph_id: "l".into(),
                iteration: 0,
                done: false,
                updated_at_ms: 1,
            }),
        ],
    )
    .await;
    let c = raw_client(&url).await;
    for sql in [
        "UPDATE _smithers_runs SET status = 'exploded' WHERE run_id = 'bad-status'",
        "UPDATE _smithers_ralph SET done = 7 WHERE run_id = 'ok'",
    ] {
        if let Err(e) = c.batch_execute(sql).await {
            panic!("{sql}: {e:?}");
        }
    }
    let e = store
        .get_run("bad-status")
        .await
        .err()
        .unwrap_or_else(|| panic!("expected DB_CORRUPT for bad status"));
    assert_eq!(e.code, Code::DbCorrupt, "{e}");
    assert!(
        e.message.contains("_smithers_runs")
            && e.message.contains("bad-status")
            && e.message.contains("exploded")
            && e.message.contains("backup"),
        "{e}"
    );
    let e = store.list_runs(None, 10).await.err().map(|e| e.code);
    assert_eq!(e, Some(Code::DbCorrupt));
    let e = store
        .list_loops("ok")
        .await
        .err()
        .unwrap_or_else(|| panic!("expected DB_CORRUPT for done = 7"));
    assert_eq!(e.code, Code::DbCorrupt, "{e}");
    assert!(
        e.message.contains("_smithers_ralph") && e.message.contains("done"),
        "{e}"
    );
    assert!(store.get_run("ok").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_by_url_and_errors() {
    let url = fresh_database_url().await;
    let store = match smithers_store::open(&url).await {
        Ok(s) => s,
        Err(e) => panic!("open {url}: {e}"),
    };
    apply(&*store, vec![Write::InsertRun(run_row("r1", "wf", 1))]).await;
    // postgresql:// is accepted too, and a second store sees the same rows.
    let alt = url.replacen("postgres://", "postgresql://", 1);
    let other = match smithers_store::open(&alt).await {
        Ok(s) => s,
        Err(e) => panic!("open {alt}: {e}"),
    };
    assert!(other.get_run("r1").await.ok().flatten().is_some());

    let bad = smithers_store::open("postgres://x@127.0.0.1:notaport/db")
        .await
        .err()
        .map(|e| e.code);
    assert_eq!(bad, Some(Code::InvalidUrl));

    let c = support::pg_cluster::cluster();
    let missing = format!("postgres://postgres@127.0.0.1:{}/no_such_database", c.port);
    let e = smithers_store::open(&missing)
        .await
        .err()
        .unwrap_or_else(|| panic!("a missing database must fail"));
    assert_eq!(e.code, Code::StorageError, "{e}");
    assert!(e.message.contains("no_such_database"), "{e}");

    let port = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l.local_addr().map(|a| a.port()).unwrap_or(1),
        Err(e) => panic!("{e}"),
    };
    let e = smithers_store::open(&format!("postgres://u@127.0.0.1:{port}/db"))
        .await
        .err()
        .map(|e| e.code);
    assert_eq!(e, Some(Code::StorageError));
}

/// The server drops every connection of the store (as on a restart or an idle-connection
/// killer): reads and writes right after succeed on fresh connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_recovers_when_the_server_drops_its_connections() {
    let url = fresh_database_url().await;
    let store = Arc::new(open(&url).await);
    apply(&*store, vec![Write::InsertRun(run_row("r1", "wf", 1))]).await;
    // Several pooled connections.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.get_run("r1").await.map(|r| r.is_some())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.ok().and_then(|r| r.ok()), Some(true));
    }
    let db = url.rsplit('/').next().unwrap_or_default().to_string();
    let admin = support::pg_cluster::admin_client(support::pg_cluster::cluster()).await;
    for round in 0..3 {
        let killed = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db],
            )
            .await
            .map(|rows| rows.len());
        assert!(
            matches!(killed, Ok(n) if n > 0),
            "round {round}: {killed:?}"
        );
        let read = store.get_run("r1").await;
        assert!(matches!(read, Ok(Some(_))), "round {round}: {read:?}");
        let mut b = Batch::new();
        b.push(event("r1", round));
        let written = store.apply(b).await.map(|a| a.event_seqs);
        assert_eq!(written.ok(), Some(vec![round as i64]), "round {round}");
    }
}

/// Throughput check, run by hand:
/// `cargo test -p smithers-store --release --test postgres -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_small_batches() {
    let url = fresh_database_url().await;
    let store = Arc::new(open(&url).await);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for w in 0..100 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let run = format!("run{w}");
            for i in 0..100 {
                let mut b = Batch::new();
                b.push(event(&run, i))
                    .push(Write::UpsertNode(smithers_store::NodeRow {
                        run_id: run.clone(),
                        node_id: "n".into(),
                        iteration: 0,
                        state: "in-progress".into(),
                        last_attempt: Some(1),
                        updated_at_ms: i as i64,
                        output_table: "t".into(),
                        label: None,
                    }));
                if let Err(e) = store.apply(b).await {
                    panic!("{e}");
                }
            }
        }));
    }
    for t in tasks {
        assert!(t.await.is_ok());
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "10000 batches in {secs:.2}s = {:.0} batches/s",
        10_000.0 / secs
    );
}

async fn next_ref(
    rx: &mut tokio::sync::broadcast::Receiver<smithers_store::EventRef>,
) -> smithers_store::EventRef {
    match tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await {
        Ok(Ok(r)) => r,
        other => panic!("no event notice: {other:?}"),
    }
}

/// Events committed through one store reach the other store's `foreign_events` (one notice per
/// batch and run, with its seqs), never the store that committed them, and a batch that rolled
/// back announces nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_by_one_store_reach_the_other() {
    use smithers_store::EventRef;
    let url = fresh_database_url().await;
    let a = open(&url).await;
    let b = open(&url).await;
    let (Some(mut from_b), Some(mut from_a)) = (a.foreign_events().await, b.foreign_events().await)
    else {
        panic!("PostgreSQL stores offer a feed");
    };
    apply(
        &a,
        vec![
            Write::InsertRun(run_row("n1", "wf", 1)),
            event("n1", 0),
            event("n1", 1),
        ],
    )
    .await;
    // rolls back (the run exists): no notice
    let mut dup = Batch::new();
    dup.push(Write::InsertRun(run_row("n1", "wf", 1)));
    dup.push(event("n1", 9));
    assert!(a.apply(dup).await.is_err());
    apply(&a, vec![event("n1", 2)]).await;
    // each notice carries its batch's events, as stored
    let stored = match a.list_events("n1", None, 10).await {
        Ok(e) => e,
        Err(e) => panic!("{e}"),
    };
    let want = |first_seq: i64, last_seq: i64, stored: &[smithers_store::EventRow]| EventRef {
        run_id: "n1".into(),
        first_seq,
        last_seq,
        events: stored[first_seq as usize..=last_seq as usize].to_vec(),
    };
    assert_eq!(next_ref(&mut from_a).await, want(0, 1, &stored));
    assert_eq!(next_ref(&mut from_a).await, want(2, 2, &stored));

    apply(&b, vec![event("n1", 3)]).await;
    let stored = match a.list_events("n1", None, 10).await {
        Ok(e) => e,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(next_ref(&mut from_b).await, want(3, 3, &stored));
    // a batch whose events do not fit in a notice announces their seqs only
    let big = Write::AppendEvent {
        run_id: "n1".into(),
        timestamp_ms: 7,
        event_type: "E".into(),
        payload_json: format!("{{\"pad\":\"{}\"}}", "x".repeat(8000)),
    };
    apply(&a, vec![big]).await;
    let r = next_ref(&mut from_a).await;
    assert_eq!(
        (r.first_seq, r.last_seq, r.events.len()),
        (4, 4, 0),
        "{r:?}"
    );
    // a heard nothing of its own batches, b nothing of its own
    assert!(from_b.try_recv().is_err());
    assert!(from_a.try_recv().is_err());
}

/// The listening connection is opened again after the server dropped it: notices of batches
/// committed after that arrive again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_feed_survives_dropped_connections() {
    let url = fresh_database_url().await;
    let a = open(&url).await;
    let b = open(&url).await;
    let Some(mut feed) = b.foreign_events().await else {
        panic!("PostgreSQL stores offer a feed");
    };
    apply(&a, vec![Write::InsertRun(run_row("f1", "wf", 1))]).await;
    let db = url.rsplit('/').next().unwrap_or_default().to_string();
    let admin = support::pg_cluster::admin_client(support::pg_cluster::cluster()).await;
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db],
        )
        .await
        .map(|rows| rows.len());
    assert!(matches!(killed, Ok(n) if n > 0), "{killed:?}");
    // Notices sent before the listener is back are lost: keep writing until one arrives.
    let t0 = std::time::Instant::now();
    for i in 0.. {
        apply(&a, vec![event("f1", i)]).await;
        let got = tokio::time::timeout(std::time::Duration::from_millis(200), feed.recv()).await;
        if let Ok(Ok(r)) = got {
            assert_eq!(r.run_id, "f1");
            assert!(r.first_seq == r.last_seq && r.last_seq <= i as i64, "{r:?}");
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "no notice after the listener's connection was dropped: {got:?}"
        );
    }
}

#[tokio::test]
async fn nul_byte_in_text_is_invalid_input_not_a_server_error() {
    let store = pg_store().await;
    let e = match store.get_run("run\u{0}1").await {
        Err(e) => e,
        Ok(r) => panic!("expected an error, got {r:?}"),
    };
    assert_eq!(e.code, Code::InvalidInput, "{e}");
    assert!(e.message.contains("NUL"), "{e}");
    let mut b = Batch::new();
    b.push(Write::InsertRun(run_row("nul\u{0}run", "wf", 1)));
    let e = match store.apply(b).await {
        Err(e) => e,
        Ok(_) => panic!("a NUL run id was stored"),
    };
    assert_eq!(e.code, Code::InvalidInput, "{e}");
    // the store keeps working
    apply(&*store, vec![Write::InsertRun(run_row("clean", "wf", 1))]).await;
    assert!(store.get_run("clean").await.is_ok_and(|r| r.is_some()));
}

/// An owner frozen in the middle of a transaction (SIGSTOP, swap, partition) holds its run's
/// row lock: a claim by another node must not queue behind it, and PostgreSQL ends the frozen
/// session after `idle_in_transaction_session_timeout`, so the run can be claimed then.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_does_not_wait_behind_a_frozen_owners_transaction() {
    let base = fresh_database_url().await;
    let b = open(&base).await;
    let mut r = run_row("frozen", "wf", 1);
    r.runtime_owner_id = Some("node-a".into());
    r.heartbeat_at_ms = Some(1);
    apply(&b, vec![Write::InsertRun(r)]).await;
    // the frozen node: a session of the store's own kind, idle inside a transaction that holds
    // the row (its idle timeout shortened so the test does not wait 10 s)
    let frozen_url = format!(
        "{base}?options=-c%20idle_in_transaction_session_timeout%3D1500&application_name=frozen"
    );
    let frozen = raw_client(&frozen_url).await;
    frozen
        .batch_execute("BEGIN; SELECT 1 FROM _smithers_runs WHERE run_id = 'frozen' FOR UPDATE")
        .await
        .unwrap_or_else(|e| panic!("lock: {e}"));
    let t0 = std::time::Instant::now();
    let first = b.claim_run("frozen", "node-b", 10, 5, None).await;
    assert_eq!(first.ok(), Some(false), "a locked row is not claimed");
    assert!(
        // well below lock_timeout (5 s), which is what a claim that waited would take
        t0.elapsed() < std::time::Duration::from_secs(3),
        "the claim waited on the lock ({:?})",
        t0.elapsed()
    );
    // once the server has ended the idle transaction, the claim succeeds
    let t0 = std::time::Instant::now();
    while !b
        .claim_run("frozen", "node-b", 10, 5, None)
        .await
        .unwrap_or(false)
    {
        assert!(
            t0.elapsed().as_secs() < 30,
            "the frozen session was never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let owner = b
        .get_run("frozen")
        .await
        .ok()
        .flatten()
        .and_then(|r| r.runtime_owner_id);
    assert_eq!(owner.as_deref(), Some("node-b"));
    // the thawed session cannot commit anything any more
    assert!(frozen.batch_execute("COMMIT").await.is_err());
}

/// Sessions of the test's database waiting on a lock.
async fn lock_waiters(client: &tokio_postgres::Client) -> i64 {
    match client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
    {
        Ok(row) => row.get(0),
        Err(e) => panic!("pg_stat_activity: {e}"),
    }
}

/// A batch that creates run `run` with `events` events.
fn create_batch(run: &str, events: usize) -> Batch {
    let mut b = Batch::new();
    b.push(Write::InsertRun(run_row(run, "wf", 1)));
    for i in 0..events {
        b.push(event(run, i));
    }
    b
}

/// Applies `queued` while every writer of `store` is stuck behind a lock on the events table,
/// so they all wait in the store's queue; then lets them go. Returns each batch's outcome, in
/// order.
async fn apply_while_writers_wait(
    store: &Arc<PgStore>,
    url: &str,
    queued: Vec<Batch>,
) -> Vec<smithers_core::Result<smithers_store::Applied>> {
    let locker = raw_client(url).await;
    let watcher = raw_client(url).await;
    if let Err(e) = locker
        .batch_execute("BEGIN; LOCK TABLE _smithers_events IN EXCLUSIVE MODE")
        .await
    {
        panic!("lock: {e}");
    }
    // one blocked transaction per writer the store may run at once (4)
    let mut blocked = Vec::new();
    for i in 0..4 {
        let s = store.clone();
        blocked.push(tokio::spawn(async move {
            s.apply(create_batch(&format!("blocker{i}"), 1)).await
        }));
        let t0 = std::time::Instant::now();
        while lock_waiters(&watcher).await < i + 1 {
            assert!(
                t0.elapsed().as_secs() < 20,
                "writer {i} never reached the lock"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    // each batch is polled once here, which puts it in the store's queue, before the next is
    // made: spawned tasks may first run in any order (tokio runs the newest spawn first)
    let mut waiting = Vec::new();
    for b in queued {
        let s = store.clone();
        let mut apply = Box::pin(async move { s.apply(b).await });
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let polled = apply.as_mut().poll(&mut cx);
        assert!(
            polled.is_pending(),
            "a queued batch was written while the writers were busy"
        );
        waiting.push(tokio::spawn(apply));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        lock_waiters(&watcher).await,
        4,
        "no writer beyond the four may start while they are busy"
    );
    if let Err(e) = locker.batch_execute("COMMIT").await {
        panic!("unlock: {e}");
    }
    for t in blocked {
        assert!(matches!(t.await, Ok(Ok(_))), "a blocked batch failed");
    }
    let mut out = Vec::new();
    for t in waiting {
        match t.await {
            Ok(r) => out.push(r),
            Err(e) => panic!("apply task: {e}"),
        }
    }
    out
}

/// How many runs with ids `LIKE pattern` there are, and how many transactions wrote them
/// (distinct `xmin`).
async fn runs_and_transactions(url: &str, pattern: &str) -> (i64, i64) {
    let client = raw_client(url).await;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT xmin::TEXT) FROM _smithers_runs WHERE run_id LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap_or_else(|e| panic!("count: {e}"));
    (row.get(0), row.get(1))
}

/// Batches that queue while the writers are busy are committed together, in one transaction
/// (their rows share a transaction id), and each still gets its own event seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_batches_share_one_transaction() {
    let url = fresh_database_url().await;
    let store = Arc::new(open(&url).await);
    let mut batches: Vec<Batch> = (0..10).map(|i| create_batch(&format!("g{i}"), 3)).collect();
    // two more batches appending to a run created earlier in the same transaction: their seqs
    // follow its events, in batch order
    for _ in 0..2 {
        let mut b = Batch::new();
        b.push(event("g0", 7));
        b.push(event("g0", 8));
        batches.push(b);
    }
    let results = apply_while_writers_wait(&store, &url, batches).await;
    for (i, r) in results.iter().enumerate() {
        let want = match i {
            10 => vec![3, 4],
            11 => vec![5, 6],
            _ => vec![0, 1, 2],
        };
        match r {
            Ok(a) => assert_eq!(a.event_seqs, want, "batch {i}"),
            Err(e) => panic!("batch {i}: {e}"),
        }
    }
    assert_eq!(runs_and_transactions(&url, "g%").await, (10, 1));
    for i in 0..10 {
        let events = store.list_events(&format!("g{i}"), None, 100).await;
        let seqs: Vec<i64> = events.unwrap_or_default().iter().map(|e| e.seq).collect();
        let want: Vec<i64> = if i == 0 {
            (0..7).collect()
        } else {
            vec![0, 1, 2]
        };
        assert_eq!(seqs, want, "run g{i}");
    }
}

/// A batch that fails inside a shared transaction fails alone: the others are written again
/// without it, still together, and the failing one leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_batch_in_a_group_fails_alone() {
    let url = fresh_database_url().await;
    let store = Arc::new(open(&url).await);
    apply(
        &*store,
        vec![
            Write::InsertRun(run_row("taken", "wf", 1)),
            event("taken", 0),
        ],
    )
    .await;
    let mut owned = run_row("owned", "wf", 1);
    owned.runtime_owner_id = Some("node-x".into());
    apply(&*store, vec![Write::InsertRun(owned)]).await;
    let mut batches: Vec<Batch> = (0..6).map(|i| create_batch(&format!("h{i}"), 2)).collect();
    batches.insert(3, create_batch("taken", 2));
    // a batch of an engine that lost the run's lease
    let mut fenced = Batch::new();
    fenced.guard = Some(smithers_store::OwnerGuard {
        run_id: "owned".into(),
        owner: "node-y".into(),
    });
    fenced.push(event("owned", 0));
    batches.insert(5, fenced);
    let results = apply_while_writers_wait(&store, &url, batches).await;
    expect_outcomes(
        &results,
        &[
            (3, Code::RunExists, "creating an existing run succeeded"),
            (
                5,
                Code::RunLeaseLost,
                "a batch without the lease was written",
            ),
        ],
    );
    for i in 0..6 {
        let n = store
            .list_events(&format!("h{i}"), None, 100)
            .await
            .map(|e| e.len());
        assert_eq!(n.ok(), Some(2), "run h{i}");
    }
    let n = store.list_events("taken", None, 100).await.map(|e| e.len());
    assert_eq!(n.ok(), Some(1), "the failed batch appended nothing");
    let n = store.list_events("owned", None, 100).await.map(|e| e.len());
    assert_eq!(n.ok(), Some(0), "the fenced batch appended nothing");
    assert_eq!(
        runs_and_transactions(&url, "h%").await,
        (6, 1),
        "the others share one transaction"
    );
}

/// Each batch listed in `failing` failed with its code (the message says what succeeding
/// would mean); every other batch appended its two events at seqs 0 and 1.
fn expect_outcomes(
    results: &[smithers_core::Result<smithers_store::Applied>],
    failing: &[(usize, Code, &str)],
) {
    for (i, r) in results.iter().enumerate() {
        match (failing.iter().find(|f| f.0 == i), r) {
            (Some((_, code, _)), Err(e)) => assert_eq!(e.code, *code, "{e}"),
            (Some((_, _, wrong)), Ok(_)) => panic!("{wrong}"),
            (None, Ok(a)) => assert_eq!(a.event_seqs, vec![0, 1], "batch {i}"),
            (None, Err(e)) => panic!("batch {i} failed with its neighbour: {e}"),
        }
    }
}

/// A failure no batch's own statement can be blamed for (here a NUL byte in one event payload,
/// which fails the statement that appends every batch's events) is retried batch by batch:
/// only the batch with the bad payload fails, with `INVALID_INPUT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_no_batch_is_blamed_for_is_retried_batch_by_batch() {
    let url = fresh_database_url().await;
    let store = Arc::new(open(&url).await);
    let mut batches: Vec<Batch> = (0..4).map(|i| create_batch(&format!("k{i}"), 2)).collect();
    let mut bad = Batch::new();
    bad.push(Write::InsertRun(run_row("knul", "wf", 1)));
    bad.push(Write::AppendEvent {
        run_id: "knul".into(),
        timestamp_ms: 1,
        event_type: "E".into(),
        payload_json: "{\"s\":\"a\u{0}b\"}".into(),
    });
    batches.insert(2, bad);
    let results = apply_while_writers_wait(&store, &url, batches).await;
    expect_outcomes(
        &results,
        &[(
            2,
            Code::InvalidInput,
            "a payload with a NUL byte was stored",
        )],
    );
    assert!(
        store.get_run("knul").await.ok().flatten().is_none(),
        "the failed batch left its run behind"
    );
    // written one by one: a transaction each
    assert_eq!(runs_and_transactions(&url, "k%").await, (4, 4));
}
