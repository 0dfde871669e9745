//! Crashes and storage faults, with real processes, signals, files and databases:
//!
//! * an engine SIGKILLed while a task's grandchild runs must not let that grandchild repeat the
//!   task's side effect beside the resumed attempt (also when it escaped with `setsid`);
//! * a run whose driver stopped on a storage fault (a database locked by another process) is
//!   driven again by the same server once storage works, without a restart;
//! * on PostgreSQL, a node frozen with SIGSTOP loses all its runs to a healthy node within the
//!   lease bound and, thawed, writes nothing more for them.

#[path = "../../store/tests/support/pg_cluster.rs"]
mod pg_cluster;

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn smithers(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run smithers {args:?}: {e}"))
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
        })
        .is_some_and(|st| st != "Z" && st != "X")
}

// ----- item 15: task processes outliving a killed engine ------------------------------------

/// A task whose grandchild performs the side effect 4 s later; the engine is SIGKILLed while
/// the grandchild sleeps, then the run is resumed. The side effect must happen exactly once.
fn side_effect_happens_once_after_sigkill(escape: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (started, pids, effect) = (dir.join("started"), dir.join("pids"), dir.join("effect"));
    // `; echo finished` keeps `sh` from exec-ing bash: bash is the task's grandchild
    let yaml = format!(
        "name: leftover\nsteps:\n  - task:\n      id: side\n      run: |\n        echo go >> {started}; {escape}bash -c 'echo $$ >> {pids}; sleep 4; echo x >> {effect}'; echo finished\n",
        started = started.display(),
        pids = pids.display(),
        effect = effect.display(),
    );
    std::fs::write(dir.join("wf.yaml"), yaml).unwrap();
    let db = format!("sqlite://{}", dir.join("db.sqlite").display());
    let mut engine = Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(["up", "wf.yaml", "--run-id", "leftover-1", "--db", &db])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the grandchild to start", Duration::from_secs(30), || {
        read(&pids).lines().count() == 1
    });
    engine.kill().unwrap(); // SIGKILL: no cleanup of any kind
    engine.wait().unwrap();
    let first: i32 = read(&pids).trim().parse().unwrap();
    assert!(alive(first), "PDEATHSIG does not reach the grandchild");

    let out = smithers(dir, &["resume", "leftover-1", "--db", &db]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "resume failed: {stderr}");
    // every grandchild ever started (the first attempt's and the resumed one's) has ended
    wait_until("every grandchild to end", Duration::from_secs(30), || {
        read(&pids)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .all(|p| !alive(p))
    });
    let effects = read(&effect);
    assert_eq!(
        effects.lines().count(),
        1,
        "the side effect happened {} times (the killed engine's grandchild repeated it); resume said: {stderr}",
        effects.lines().count()
    );
    assert!(
        stderr.contains("killed leftover processes") && stderr.contains(&first.to_string()),
        "the kill is logged with its pid: {stderr}"
    );

    let doc: Value = serde_json::from_slice(
        &smithers(dir, &["inspect", "leftover-1", "--json", "--db", &db]).stdout,
    )
    .unwrap();
    assert_eq!(doc["run"]["status"], "finished");
    let attempts: Vec<&Value> = doc["attempts"].as_array().unwrap().iter().collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    for a in attempts {
        let meta: Value = a["metaJson"]
            .as_str()
            .and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or_else(|| a["metaJson"].clone());
        let p = &meta["process"];
        assert!(
            p["marker"].is_string() && p["bootId"].is_string() && p["pgid"].is_i64(),
            "the attempt records its processes: {a}"
        );
    }
}

#[test]
fn sigkilled_engine_leaves_no_grandchild_to_repeat_a_side_effect() {
    side_effect_happens_once_after_sigkill("");
}

#[test]
fn sigkilled_engine_leaves_no_setsid_escapee_to_repeat_a_side_effect() {
    side_effect_happens_once_after_sigkill("setsid ");
}

#[test]
fn cancelling_a_killed_engines_run_stops_its_leftover_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pids, effect) = (dir.join("pids"), dir.join("effect"));
    let yaml = format!(
        "name: leftover\nsteps:\n  - task:\n      id: side\n      run: |\n        bash -c 'echo $$ >> {pids}; sleep 4; echo x >> {effect}'; echo finished\n",
        pids = pids.display(),
        effect = effect.display(),
    );
    std::fs::write(dir.join("wf.yaml"), yaml).unwrap();
    let db = format!("sqlite://{}", dir.join("db.sqlite").display());
    let mut engine = Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(["up", "wf.yaml", "--run-id", "leftover-2", "--db", &db])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the grandchild to start", Duration::from_secs(30), || {
        read(&pids).lines().count() == 1
    });
    engine.kill().unwrap();
    engine.wait().unwrap();
    let pid: i32 = read(&pids).trim().parse().unwrap();
    let out = smithers(dir, &["cancel", "leftover-2", "--db", &db]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the grandchild to end", Duration::from_secs(30), || {
        !alive(pid)
    });
    assert_eq!(
        read(&effect),
        "",
        "the cancelled run's task went on working"
    );
}

// ----- smithers serve, with its log kept --------------------------------------------------------

struct Served {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Served {
    fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, config: &str) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smithers"))
        .current_dir(dir)
        .args(["serve", "--config", config])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn serve: {e}"));
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on http://").nth(1)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
            if let Ok(mut l) = sink.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("serve did not start:\n{}", log.lock().unwrap()));
    Served { child, addr, log }
}

fn rpc(addr: &str, method: &str, params: Value) -> Value {
    use std::io::{Read, Write};
    let body = json!({"id": "1", "method": method, "params": params}).to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    let req = format!(
        "POST /rpc HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn create_run(addr: &str, workflow: &str, input: Value) -> String {
    let r = rpc(
        addr,
        "runs.create",
        json!({"workflow": workflow, "input": input}),
    );
    r["payload"]["runId"]
        .as_str()
        .unwrap_or_else(|| panic!("runs.create: {r}"))
        .to_string()
}

// ----- item 16: a run stopped by a storage fault is driven again -------------------------------

#[test]
fn locked_database_does_not_strand_a_run_until_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let started = dir.join("started");
    std::fs::write(
        dir.join("wf.yaml"),
        format!(
            "name: stall\nsteps:\n  - task: {{id: slow, run: \"echo go >> {}; sleep 1\"}}\n  - task: {{id: after, value: 1}}\n",
            started.display()
        ),
    )
    .unwrap();
    let db_path = dir.join("db.sqlite");
    // a short busy timeout makes a locked database fail writes within seconds, not minutes
    std::fs::write(
        dir.join("smithers.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"sqlite://{}?busy_timeout_ms=100\"\n[[workflows]]\nkey = \"stall\"\npath = \"wf.yaml\"\n",
            db_path.display()
        ),
    )
    .unwrap();
    let server = serve(dir, "smithers.toml");
    let run = create_run(&server.addr, "stall", json!({}));
    wait_until("the task to start", Duration::from_secs(30), || {
        read(&started).contains("go")
    });

    // another process (this one) takes the database's write lock and holds it while the task
    // finishes and the driver tries to record that
    let locker = rusqlite::Connection::open(&db_path).unwrap();
    locker.busy_timeout(Duration::from_secs(30)).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let t0 = Instant::now();
    while !server.log().contains("stopped on a storage error")
        && t0.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);

    let t0 = Instant::now();
    loop {
        let r = rpc(&server.addr, "runs.get", json!({"runId": run}));
        if r["payload"]["status"] == "finished" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the run never finished after the lock was released: {r}\nserver log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = server.log();
    assert!(
        log.contains("stopped on a storage error") && log.contains(&run),
        "the failure is logged with the run id:\n{log}"
    );
    assert!(
        log.contains("driving the run again"),
        "the re-drive is logged:\n{log}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = smithers_store::open(&format!("sqlite://{}", db_path.display()))
            .await
            .unwrap();
        let outs: Vec<String> = s
            .list_outputs(&run)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.node_id)
            .collect();
        assert_eq!(outs, vec!["after", "slow"]);
        let events = s.list_events(&run, None, 100_000).await.unwrap();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (0..events.len() as i64).collect::<Vec<_>>());
        let finished = events
            .iter()
            .filter(|e| e.event_type == "RunFinished")
            .count();
        assert_eq!(finished, 1, "finished exactly once");
    });
}

// ----- item 17: PostgreSQL, a frozen node and a healthy one ------------------------------------

/// The owner id a server writes on its runs (`pid:<pid>:…`).
fn owned_by(row: &smithers_store::RunRow, pid: u32) -> bool {
    row.runtime_owner_id
        .as_deref()
        .is_some_and(|o| o.starts_with(&format!("pid:{pid}:")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_node_loses_its_runs_and_writes_nothing_after_thawing() {
    const RUNS: usize = 24;
    let db = pg_cluster::fresh_database_url().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().to_path_buf();
    let (delay, done) = (dir.join("delay"), dir.join("done"));
    // the frozen node's attempts print without end (so it is busy writing, with transactions
    // open, when it freezes); the attempts of the node that takes over see the switch turned
    // and do their side effect at once
    std::fs::write(&delay, "1").unwrap();
    std::fs::write(
        dir.join("wf.yaml"),
        format!(
            "name: frozen\nsteps:\n  - task:\n      id: work\n      env: {{TAG: \"{{{{ input.tag }}}}\"}}\n      run: |\n        if [ \"$(cat {d})\" = 0 ]; then echo $TAG >> {done}; else while :; do echo tick; sleep 0.05; done; fi\n",
            d = delay.display(),
            done = done.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("smithers.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"{db}\"\n[[workflows]]\nkey = \"frozen\"\npath = \"wf.yaml\"\n"
        ),
    )
    .unwrap();
    let store = smithers_store::open(&db).await.unwrap();

    let d = dir.clone();
    let a = tokio::task::spawn_blocking(move || serve(&d, "smithers.toml"))
        .await
        .unwrap();
    let mut runs = Vec::new();
    for i in 0..RUNS {
        let addr = a.addr.clone();
        let id = tokio::task::spawn_blocking(move || {
            create_run(&addr, "frozen", json!({"tag": format!("t{i}")}))
        })
        .await
        .unwrap();
        runs.push(id);
    }
    // every run has its task in progress on A (8 processes, the others wait for a slot)
    let t0 = Instant::now();
    loop {
        let mut ready = 0;
        for r in &runs {
            let n = store.get_node(r, "work", 0).await.unwrap();
            if n.is_some_and(|n| n.state == "in-progress") {
                ready += 1;
            }
        }
        if ready == RUNS {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{ready} of {RUNS} started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a_pid = a.child.id();
    // freeze A: its open transactions and row locks stay where they are
    nix::sys::signal::kill(a.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let frozen_at = Instant::now();
    std::fs::write(&delay, "0").unwrap();
    let d = dir.clone();
    let b = tokio::task::spawn_blocking(move || serve(&d, "smithers.toml"))
        .await
        .unwrap();
    let b_pid = b.child.id();

    // B takes every run over within the lease bound (30 s lease, a takeover pass every 10 s)
    let bound = Duration::from_secs(30 + 10 + 20);
    loop {
        let mut left = Vec::new();
        for r in &runs {
            let row = store.get_run(r).await.unwrap().unwrap();
            if owned_by(&row, a_pid) || (row.status == "running" && !owned_by(&row, b_pid)) {
                left.push(r.clone());
            }
        }
        if left.is_empty() {
            break;
        }
        assert!(
            frozen_at.elapsed() < bound,
            "after {:?}, {} of {RUNS} runs were not taken over: {left:?}\nB's log:\n{}",
            frozen_at.elapsed(),
            left.len(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // and finishes them
    let t0 = Instant::now();
    loop {
        let mut finished = 0;
        for r in &runs {
            if store.get_run(r).await.unwrap().unwrap().status == "finished" {
                finished += 1;
            }
        }
        if finished == RUNS {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{finished} of {RUNS} finished\nB's log:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut before: BTreeMap<String, (i64, usize)> = BTreeMap::new();
    for r in &runs {
        let seq = store.last_event_seq(r).await.unwrap();
        let attempts = store.list_attempts(r).await.unwrap().len();
        before.insert(r.clone(), (seq, attempts));
    }

    // thaw A: it must notice it lost every run (and log it) and write nothing for them
    nix::sys::signal::kill(a.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    let fenced = |log: &str| {
        runs.iter()
            .filter(|r| {
                log.lines().any(|l| {
                    l.contains(r.as_str()) && (l.contains("fenced") || l.contains("lease lost"))
                })
            })
            .count()
    };
    let t0 = Instant::now();
    while fenced(&a.log()) < RUNS && t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // then a little longer: anything A still does would show in the database now
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for r in &runs {
        let seq = store.last_event_seq(r).await.unwrap();
        let attempts = store.list_attempts(r).await.unwrap().len();
        assert_eq!(before[r], (seq, attempts), "A wrote for lost run {r}");
        let events = store.list_events(r, None, 100_000).await.unwrap();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (0..events.len() as i64).collect::<Vec<_>>(), "{r}");
        let finished = events
            .iter()
            .filter(|e| e.event_type == "RunFinished")
            .count();
        assert_eq!(finished, 1, "run {r} finished {finished} times");
        assert_eq!(
            events.last().map(|e| e.event_type.as_str()),
            Some("RunFinished"),
            "{r}"
        );
    }
    // each run's side effect happened exactly once
    let text = read(&done);
    for i in 0..RUNS {
        let n = text.lines().filter(|l| *l == format!("t{i}")).count();
        assert_eq!(n, 1, "t{i} side effect {n} times:\n{text}");
    }
    let log = a.log();
    assert_eq!(fenced(&log), RUNS, "A logs the loss of every run:\n{log}");
    let log = b.log();
    assert!(log.contains("took over"), "B logs its takeovers:\n{log}");
    drop((a, b));
}
