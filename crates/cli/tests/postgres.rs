//! The real `smithers` binary on PostgreSQL (`--db postgres://…`), against a temporary
//! cluster started by this test binary (see `crates/store/tests/support/pg_cluster.rs`).

#[path = "../../store/tests/support/pg_cluster.rs"]
mod pg_cluster;

use smithers_store::Store;
use smithers_store::postgres::PgStore;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn smithers(dir: &Path, args: &[&str]) -> std::process::Output {
    match Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("run smithers {args:?}: {e}"),
    }
}

fn wait_for(path: &Path, needle: &str, limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            t0.elapsed() < limit,
            "timed out waiting for `{needle}` in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tempdir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    }
}

fn write(path: &Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        panic!("write {}: {e}", path.display());
    }
}

async fn store(url: &str) -> PgStore {
    match PgStore::open(url).await {
        Ok(s) => s,
        Err(e) => panic!("open {url}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_a_workflow_on_postgres() {
    let db = pg_cluster::fresh_database_url().await;
    let tmp = tempdir();
    let dir = tmp.path().to_path_buf();
    write(
        &dir.join("wf.yaml"),
        "name: pg-hello\nsteps:\n  - task: {id: a, run: \"echo '{\\\"n\\\": 1}'\", output: {type: object}}\n  - task: {id: b, run: \"echo '{\\\"n\\\": 2}'\", output: {type: object}}\n",
    );
    let out = {
        let (dir, db) = (dir.clone(), db.clone());
        tokio::task::spawn_blocking(move || {
            smithers(&dir, &["up", "wf.yaml", "--run-id", "pg-1", "--db", &db])
        })
        .await
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let s = store(&db).await;
    let run = s.get_run("pg-1").await.ok().flatten();
    assert_eq!(
        run.as_ref().map(|r| r.status.as_str()),
        Some("finished"),
        "{run:?}"
    );
    assert_eq!(run.and_then(|r| r.runtime_owner_id), None, "lease released");
    let outputs = s.list_outputs("pg-1").await.ok().unwrap_or_default();
    let ids: Vec<&str> = outputs.iter().map(|o| o.node_id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b"]);
    let events = s
        .list_events("pg-1", None, 10_000)
        .await
        .ok()
        .unwrap_or_default();
    assert!(!events.is_empty());
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..events.len() as i64).collect::<Vec<_>>());

    // The CLI reads it back from the same database.
    let ps = smithers(&dir, &["ps", "--db", &db]);
    assert_eq!(ps.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&ps.stdout).contains("pg-1"));
}

/// Two processes on one database: the first `smithers up` is SIGKILLed mid-run, and
/// `smithers resume --orphans` from another process takes the run over through the lease and
/// finishes it without re-running finished tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_engine_is_taken_over_by_another_process() {
    let db = pg_cluster::fresh_database_url().await;
    let tmp = tempdir();
    let dir = tmp.path().to_path_buf();
    let log = dir.join("log");
    write(
        &dir.join("wf.yaml"),
        &format!(
            "name: pg-orphan\nsteps:\n  - task: {{id: a, run: \"echo a >> {l}\"}}\n  - task: {{id: slow, run: \"echo slow >> {l}; sleep 0.5\"}}\n  - task: {{id: b, run: \"echo b >> {l}\"}}\n",
            l = log.display()
        ),
    );
    let (dir2, db2, log2) = (dir.clone(), db.clone(), log.clone());
    let result = tokio::task::spawn_blocking(move || {
        let (dir, db, log) = (dir2, db2, log2);
        let mut child = match Command::new(env!("CARGO_BIN_EXE_smithers"))
            .current_dir(&dir)
            .args(["up", "wf.yaml", "--run-id", "orphan-pg", "--db", &db])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("spawn: {e}"),
        };
        wait_for(&log, "slow", Duration::from_secs(30));
        // SIGKILL: no cleanup, the lease stays with the dead process.
        let _ = child.kill();
        let _ = child.wait();
        let out = smithers(&dir, &["resume", "--orphans", "--db", &db]);
        let again = smithers(&dir, &["resume", "--orphans", "--db", &db]);
        (out, again)
    })
    .await;
    let (out, again) = match result {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("taking over run orphan-pg"), "{stderr}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(text.lines().filter(|l| *l == "a").count(), 1, "{text}");
    assert_eq!(text.lines().filter(|l| *l == "b").count(), 1, "{text}");
    assert_eq!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no orphaned runs"));

    let s = store(&db).await;
    let run = s.get_run("orphan-pg").await.ok().flatten();
    assert_eq!(run.map(|r| r.status), Some("finished".to_string()));
}

// ----- smithers serve with [storage] url = "postgres://…" ----------------------------------------

struct Served {
    child: std::process::Child,
    addr: String,
}

impl Drop for Served {
    /// A test that fails half-way must not leave a server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, config: &str) -> Served {
    use std::io::BufRead;
    let child = match Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(["serve", "--config", config])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("spawn serve: {e}"),
    };
    let mut served = Served {
        child,
        addr: String::new(),
    };
    let Some(stderr) = served.child.stderr.take() else {
        panic!("no stderr pipe");
    };
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut seen = String::new();
    loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => panic!("serve exited before listening:\n{seen}"),
        };
        if let Some(rest) = line.split("listening on http://").nth(1) {
            served.addr = rest.split_whitespace().next().unwrap_or("").to_string();
            std::thread::spawn(move || for _ in lines {});
            return served;
        }
        seen.push_str(&line);
        seen.push('\n');
    }
}

fn rpc(addr: &str, method: &str, params: serde_json::Value) -> serde_json::Value {
    use std::io::{Read, Write};
    let body = serde_json::json!({"id": "1", "method": method, "params": params}).to_string();
    let mut s = match std::net::TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => panic!("connect {addr}: {e}"),
    };
    let req = format!(
        "POST /rpc HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        panic!("write: {e}");
    }
    let mut text = String::new();
    if let Err(e) = s.read_to_string(&mut text) {
        panic!("read: {e}");
    }
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn wait_status(addr: &str, run: &str, want: &str) {
    let t0 = Instant::now();
    loop {
        let r = rpc(addr, "runs.get", serde_json::json!({"runId": run}));
        if r["payload"]["status"] == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "run never became {want}: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(mut s: Served) -> i32 {
    let pid = nix::unistd::Pid::from_raw(s.child.id() as i32);
    if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
        panic!("kill: {e}");
    }
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = s.child.try_wait() {
            return st.code().unwrap_or(-1);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two `smithers serve` nodes on one PostgreSQL database: a run created on one is visible on
/// the other, survives a restart of its node, and an approval decided there finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_nodes_share_a_postgres_database() {
    let db = pg_cluster::fresh_database_url().await;
    let tmp = tempdir();
    let dir = tmp.path().to_path_buf();
    write(
        &dir.join("gated.yaml"),
        "name: gated\nsteps:\n  - task: {id: a, value: 1}\n  - approval: {id: gate, title: ok?}\n  - task: {id: b, value: 2}\n",
    );
    write(
        &dir.join("smithers.toml"),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"{db}\"\n[[workflows]]\nkey = \"gate\"\npath = \"gated.yaml\"\n"
        ),
    );
    let result = tokio::task::spawn_blocking(move || {
        let a = serve(&dir, "smithers.toml");
        let b = serve(&dir, "smithers.toml");
        let created = rpc(
            &a.addr,
            "runs.create",
            serde_json::json!({"workflow": "gate"}),
        );
        let run = created["payload"]["runId"]
            .as_str()
            .unwrap_or_else(|| panic!("runs.create: {created}"))
            .to_string();
        wait_status(&a.addr, &run, "waiting-approval");
        // The other node reads the same database.
        wait_status(&b.addr, &run, "waiting-approval");
        assert_eq!(sigterm(a), 0, "a clean stop");
        let a = serve(&dir, "smithers.toml");
        let d = rpc(
            &a.addr,
            "approvals.decide",
            serde_json::json!({"runId": run, "nodeId": "gate", "approved": true}),
        );
        assert_eq!(d["ok"], true, "{d}");
        wait_status(&a.addr, &run, "finished");
        wait_status(&b.addr, &run, "finished");
        sigterm(a);
        sigterm(b);
        run
    })
    .await;
    let run = match result {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let s = store(&db).await;
    let outputs = s.list_outputs(&run).await.ok().unwrap_or_default();
    let ids: Vec<&str> = outputs.iter().map(|o| o.node_id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b", "gate"]);
    for node in ["a", "b"] {
        let attempts = s
            .list_node_attempts(&run, node, 0)
            .await
            .ok()
            .map(|v| v.len());
        assert_eq!(attempts, Some(1), "{node} ran once");
    }
}

/// Two `smithers serve` nodes on one database with a schedule due every second: the schedule
/// fires, and never more than once per second in total. (Whether two nodes whose ticks
/// coincide both fire is a race this test rarely provokes; the compare-and-set that prevents
/// it is raced directly in the store tests, `two_stores_race_claim_due_cron_exactly_one_wins`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_fires_from_serve_nodes_sharing_postgres() {
    let db = pg_cluster::fresh_database_url().await;
    let tmp = tempdir();
    let dir = tmp.path().to_path_buf();
    write(
        &dir.join("hello.yaml"),
        "name: hello\nsteps:\n  - task: {id: a, value: 1}\n",
    );
    write(
        &dir.join("smithers.toml"),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nheartbeat_ms = 1000\n[storage]\nurl = \"{db}\"\n[[workflows]]\nkey = \"hello\"\npath = \"hello.yaml\"\n"
        ),
    );
    let (dir2, db2) = (dir.clone(), db.clone());
    let elapsed = tokio::task::spawn_blocking(move || {
        let (dir, db) = (dir2, db2);
        let add = smithers(
            &dir,
            &[
                "cron",
                "add",
                "hello",
                "* * * * * *",
                "--cron-id",
                "every-second",
                "--db",
                &db,
            ],
        );
        assert_eq!(
            add.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&add.stderr)
        );
        let t0 = Instant::now();
        let a = serve(&dir, "smithers.toml");
        let b = serve(&dir, "smithers.toml");
        std::thread::sleep(Duration::from_millis(4_500));
        assert_eq!(sigterm(a), 0);
        assert_eq!(sigterm(b), 0);
        t0.elapsed()
    })
    .await;
    let elapsed = match elapsed {
        Ok(e) => e,
        Err(e) => panic!("{e}"),
    };
    let s = store(&db).await;
    let runs = s.list_runs(None, 1000).await.ok().unwrap_or_default();
    let fired = runs.iter().filter(|r| r.workflow_name == "hello").count();
    let bound = elapsed.as_secs() as usize + 1;
    assert!(
        (2..=bound).contains(&fired),
        "{fired} runs in {elapsed:?} (at most one per second); runs: {:?}; cron: {:?}",
        runs.iter()
            .map(|r| (&r.workflow_name, &r.status))
            .collect::<Vec<_>>(),
        s.get_cron("every-second").await
    );
}

// ----- events across nodes ------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON text frame, or None when none came within `limit`.
async fn next_frame(ws: &mut Ws, limit: Duration) -> Option<serde_json::Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(limit, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Text(t)))) => {
                return Some(serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")));
            }
            Ok(Some(Ok(Message::Close(c)))) => panic!("socket closed: {c:?}"),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("socket ended: {other:?}"),
        }
    }
}

/// A WebSocket client past the handshake.
async fn ws_client(addr: &str) -> Ws {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = match tokio_tungstenite::connect_async(format!("ws://{addr}/")).await {
        Ok((ws, _)) => ws,
        Err(e) => panic!("ws connect {addr}: {e}"),
    };
    let challenge = next_frame(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(
        challenge.as_ref().map(|c| c["event"].clone()),
        Some(serde_json::json!("connect.challenge"))
    );
    let hello = serde_json::json!({"type": "req", "id": "c", "method": "connect", "params": {
        "minProtocol": 1, "maxProtocol": 1,
        "client": {"id": "test", "version": "0", "platform": "rust"}}});
    if let Err(e) = ws.send(Message::Text(hello.to_string().into())).await {
        panic!("ws send: {e}");
    }
    loop {
        let Some(f) = next_frame(&mut ws, Duration::from_secs(10)).await else {
            panic!("no connect response");
        };
        if f["type"] == "res" {
            assert_eq!(f["ok"], true, "{f}");
            return ws;
        }
    }
}

/// Parallel tasks whose events, committed in one batch, are far too many for one notice.
const WIDE: usize = 60;

fn wide_node(i: usize) -> String {
    format!("a-parallel-task-with-a-long-enough-name-{i:02}")
}

/// Two `smithers serve` nodes on one database: a WebSocket client of node A sees, once each and
/// with their log seqs, the events of a run created on and executed by node B: those that
/// arrive inside PostgreSQL notices (tasks `a`, `b`) and those of batches too large for a
/// notice, which node A reads from the log (the parallel tasks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_on_one_node_sees_a_run_executed_on_another() {
    let db = pg_cluster::fresh_database_url().await;
    let tmp = tempdir();
    let dir = tmp.path().to_path_buf();
    let wide: String = (0..WIDE)
        .map(|i| format!("        - task: {{id: {}, value: {i}}}\n", wide_node(i)))
        .collect();
    write(
        &dir.join("two.yaml"),
        &format!(
            "name: two\nsteps:\n  - task: {{id: a, value: 1}}\n  - task: {{id: b, value: 2}}\n  - parallel:\n      steps:\n{wide}"
        ),
    );
    write(
        &dir.join("smithers.toml"),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"{db}\"\n[[workflows]]\nkey = \"two\"\npath = \"two.yaml\"\n"
        ),
    );
    let nodes = tokio::task::spawn_blocking(move || {
        (serve(&dir, "smithers.toml"), serve(&dir, "smithers.toml"))
    })
    .await;
    let (a, b) = nodes.unwrap_or_else(|e| panic!("{e}"));
    let mut ws = ws_client(&a.addr).await;
    let b_addr = b.addr.clone();
    let created = tokio::task::spawn_blocking(move || {
        rpc(
            &b_addr,
            "runs.create",
            serde_json::json!({"workflow": "two"}),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let Some(run) = created["payload"]["runId"].as_str().map(str::to_string) else {
        panic!("runs.create: {created}");
    };

    // Everything A broadcasts about the run until it completes, then a little longer (to see
    // that nothing comes twice).
    let mut seen: Vec<(String, String, i64)> = Vec::new();
    // (Other frames, e.g. ticks, keep coming: the wait has a deadline.)
    let mut deadline = Instant::now() + Duration::from_secs(15);
    while let Some(f) =
        next_frame(&mut ws, deadline.saturating_duration_since(Instant::now())).await
    {
        if f["type"] != "event" || f["payload"]["runId"] != run.as_str() {
            continue;
        }
        let event = f["event"].as_str().unwrap_or("").to_string();
        let node = f["payload"]["nodeId"].as_str().unwrap_or("").to_string();
        let Some(seq) = f["payload"]["eventSeq"].as_i64() else {
            panic!("no eventSeq: {f}");
        };
        if event == "run.completed" {
            assert_eq!(f["payload"]["status"], "finished", "{f}");
            deadline = Instant::now() + Duration::from_millis(500);
        }
        seen.push((event, node, seq));
    }
    let completed: Vec<&(String, String, i64)> =
        seen.iter().filter(|e| e.0 == "run.completed").collect();
    assert_eq!(completed.len(), 1, "run.completed once: {seen:?}");
    let nodes = ["a".to_string(), "b".to_string()]
        .into_iter()
        .chain((0..WIDE).map(wide_node));
    for node in nodes {
        for event in ["node.started", "node.finished"] {
            let n = seen.iter().filter(|e| e.0 == event && e.1 == node).count();
            assert_eq!(n, 1, "{event} {node} once: {seen:?}");
        }
    }
    let seqs: Vec<i64> = seen.iter().map(|e| e.2).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in log order: {seen:?}"
    );

    // The seqs are the log's.
    let s = store(&db).await;
    let events = s.list_events(&run, None, 1000).await.unwrap_or_default();
    let finished = events.iter().find(|e| e.event_type == "RunFinished");
    assert_eq!(finished.map(|e| e.seq), completed.first().map(|e| e.2));
    // the parallel tasks' events really were too many for one notice (7,900 bytes)
    let wide_bytes: usize = events
        .iter()
        .filter(|e| e.payload_json.contains("a-parallel-task-with"))
        .map(|e| e.payload_json.len())
        .sum();
    assert!(wide_bytes > 4 * 7_900, "{wide_bytes} bytes");
    drop((a, b));
}

/// `smithers bench gateway --db postgres --nodes 2 --quick`: its own throwaway cluster, two
/// `serve` processes on one database, a listener on the first node seeing every run finish.
/// Only that it runs end to end is checked (a quick run's figures are not the targets').
#[test]
fn the_postgres_bench_runs_end_to_end_on_two_nodes() {
    let dir = tempdir();
    let out = smithers(
        dir.path(),
        &[
            "bench", "gateway", "--db", "postgres", "--nodes", "2", "--quick",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    for row in [
        "runs.create → run.completed, 1 task (1 node, 16 in flight)",
        "runs.create → run.completed, 1 task (2 nodes, 64 in flight)",
        "CPU per run: servers / PostgreSQL",
        "PostgreSQL statements / transactions per run",
    ] {
        assert!(stdout.contains(row), "no `{row}` in:\n{stdout}");
    }
}

#[test]
fn the_bench_refuses_nodes_without_a_database_and_bad_db_values() {
    let dir = tempdir();
    let out = smithers(dir.path(), &["bench", "gateway", "--nodes", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nodes needs --db"));
    let out = smithers(dir.path(), &["bench", "gateway", "--db", "mysql://x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgres:// URL"));
    let out = smithers(
        dir.path(),
        &[
            "bench",
            "gateway",
            "--db",
            "postgres",
            "--synchronous",
            "full",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--synchronous is for SQLite"));
}
