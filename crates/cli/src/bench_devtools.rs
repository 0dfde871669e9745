//! `smithers bench devtools`: DevTools figures of issue 4 (see docs/benchmarks.md, section
//! "DevTools"): building a snapshot and a delta of a 1,000-node tree, and 100 `streamDevTools`
//! subscribers following one busy run on a `smithers serve` in a separate process.

use crate::bench_gateway::{self as bg, Cpu, R, Table, err};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use smithers_gateway::{devtools_diff, devtools_tree};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Groups × tasks per group (+ the groups and the root) ≈ 1,000 nodes.
const GROUPS: usize = 10;
const TASKS_PER_GROUP: usize = 99;

fn task(g: usize, t: usize, label: &str) -> Value {
    json!({"kind": "element", "tag": "smithers:task",
        "props": {"id": format!("t{g}-{t}"), "kind": "run", "label": label, "retries": "2", "timeoutMs": "60000"},
        "children": [{"kind": "text", "text": "cargo test"}]})
}

/// A frame tree like the engine writes: a sequence of parallel groups of tasks. `changed`
/// relabels ten tasks, drops one and adds one.
fn frame(changed: bool) -> Value {
    let groups: Vec<Value> = (0..GROUPS)
        .map(|g| {
            let mut tasks: Vec<Value> = (0..TASKS_PER_GROUP)
                .map(|t| {
                    let label = if changed && t == 7 {
                        format!("step {g}/{t} (retrying)")
                    } else {
                        format!("step {g}/{t}")
                    };
                    task(g, t, &label)
                })
                .collect();
            if changed && g == 3 {
                tasks.remove(5);
            }
            if changed && g == 7 {
                tasks.push(task(g, 1000, "added"));
            }
            json!({"kind": "element", "tag": "smithers:parallel",
                "props": {"id": format!("g{g}"), "maxConcurrency": "4"}, "children": tasks})
        })
        .collect();
    json!({"kind": "element", "tag": "smithers:sequence", "props": {}, "children": groups})
}

fn count(n: &Value) -> usize {
    1 + n["children"]
        .as_array()
        .map(|c| c.iter().map(count).sum())
        .unwrap_or(0)
}

fn timed(iterations: usize, mut f: impl FnMut()) -> Vec<f64> {
    let mut v: Vec<f64> = (0..iterations)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn row(table: &mut Table, what: &str, sorted: &[f64], target_ms: f64) {
    let p50 = bg::percentile(sorted, 0.5);
    let p99 = bg::percentile(sorted, 0.99);
    table.add(
        what,
        format!("{p50:.2} / {p99:.2} ms"),
        &format!("≤ {target_ms} ms"),
        Some(p99 <= target_ms),
    );
}

fn compute(table: &mut Table, iterations: usize) {
    let a = frame(false);
    let b = frame(true);
    let ta = devtools_tree::build(&a);
    let tb = devtools_tree::build(&b);
    let nodes = count(&ta.to_json());
    println!("\n[compute] tree of {nodes} nodes; p50 / p99 over {iterations} runs");
    let snap = timed(iterations, || {
        let root = devtools_tree::build(&b);
        let json = serde_json::to_string(&root).unwrap_or_default();
        std::hint::black_box(format!(
            r#"{{"version":1,"kind":"snapshot","snapshot":{{"version":1,"frameNo":2,"seq":2,"root":{json}}}}}"#
        ));
    });
    row(
        table,
        "snapshot build (tree + JSON), 1,000 nodes",
        &snap,
        5.0,
    );
    let delta = timed(iterations, || {
        let ops = devtools_diff::ops(&ta, &tb);
        let json = serde_json::to_string(&ops).unwrap_or_default();
        std::hint::black_box(format!(
            r#"{{"version":1,"kind":"delta","delta":{{"version":1,"baseSeq":1,"seq":2,"ops":{json}}}}}"#
        ));
    });
    row(
        table,
        "delta computation (diff + JSON), 1,000 nodes",
        &delta,
        5.0,
    );
    let per_frame = timed(iterations, || {
        let t = devtools_tree::build(&b);
        let ops = devtools_diff::ops(&ta, &t);
        std::hint::black_box(serde_json::to_string(&ops).unwrap_or_default());
    });
    row(
        table,
        "per streamed frame (tree + diff + JSON), 1,000 nodes",
        &per_frame,
        10.0,
    );
    let ops: Vec<Value> = devtools_diff::ops(&ta, &tb)
        .iter()
        .filter_map(|o| serde_json::to_value(o).ok())
        .collect();
    let applied = devtools_diff::apply(&ta.to_json(), &ops);
    let ok = applied.as_ref().is_ok_and(|t| *t == tb.to_json());
    table.add(
        "  delta applied to the old tree gives the new tree",
        format!("{} ops", ops.len()),
        "",
        Some(ok),
    );
}

const BUSY: &str = "name: busy\nsteps:\n  - approval: {id: go, title: go}\n  - loop:\n      id: l\n      max_iterations: ITER\n      steps:\n        - branch:\n            if: \"iteration % 2 == 0\"\n            then: {task: {id: even, run: \"true\", label: even}}\n            else: {task: {id: odd, run: \"true\", label: odd}}\n";

fn write_config(dir: &Path, iterations: usize) -> R<(std::path::PathBuf, String)> {
    std::fs::create_dir_all(dir).map_err(err)?;
    std::fs::write(
        dir.join("busy.yaml"),
        BUSY.replace("ITER", &iterations.to_string()),
    )
    .map_err(err)?;
    let url = format!("sqlite://{}", dir.join("smithers.db").display());
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 5000\n\n[storage]\nurl = {}\n\n\
         [[workflows]]\nkey = \"busy\"\npath = \"busy.yaml\"\n",
        Value::String(url.clone())
    );
    let path = dir.join("smithers.toml");
    std::fs::write(&path, toml).map_err(err)?;
    Ok((path, url))
}

pub(crate) async fn call(ws: &mut bg::Ws, id: &str, method: &str, params: Value) -> R<Value> {
    let frame = json!({"type": "req", "id": id, "method": method, "params": params});
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .map_err(err)?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| format!("no answer to {method} within 30 s"))?;
        let Some(Ok(Message::Text(t))) = m else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).map_err(err)?;
        if v["type"] == "res" && v["id"] == id {
            if v["ok"] != true {
                return Err(format!("{method} failed: {t}"));
            }
            return Ok(v["payload"].clone());
        }
    }
}

/// What one subscriber saw: (frame seq, wall-clock ms at receipt) per event.
type Seen = Vec<(i64, i64)>;

async fn subscriber(mut ws: bg::Ws, run_id: String, done_at: Arc<AtomicI64>) -> R<Seen> {
    let r = call(&mut ws, "s", "streamDevTools", json!({"runId": run_id})).await?;
    let stream_id = r["streamId"].as_str().unwrap_or_default().to_string();
    let mut seen = Vec::new();
    loop {
        let target = done_at.load(Ordering::Acquire);
        if target > 0 && seen.last().is_some_and(|(s, _)| *s >= target) {
            return Ok(seen);
        }
        let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .map_err(|_| "a subscriber got nothing for 60 s".to_string())?;
        let Some(Ok(Message::Text(t))) = m else {
            return Err("a subscriber's socket closed".into());
        };
        let now = smithers_engine::now_ms();
        let v: Value = serde_json::from_str(&t).map_err(err)?;
        if v["event"] == "devtools.error" {
            return Err(format!("stream failed: {t}"));
        }
        if v["event"] != "devtools.event" || v["payload"]["streamId"] != stream_id.as_str() {
            continue;
        }
        let e = &v["payload"]["event"];
        let seq = e["snapshot"]["seq"]
            .as_i64()
            .or_else(|| e["delta"]["seq"].as_i64())
            .unwrap_or(-1);
        seen.push((seq, now));
    }
}

async fn subscribers(table: &mut Table, tmp: &Path, n: usize, iterations: usize) -> R<()> {
    let exe = std::env::current_exe().map_err(err)?;
    let (config, url) = write_config(&tmp.join("devtools"), iterations)?;
    let server = bg::spawn_server(&exe, &config).await?;
    println!(
        "\n[subscribers] server pid {} on {}; {n} streams on one run of {iterations} loop iterations (a shell task each)",
        server.pid, server.addr
    );
    let (mut control, _) = bg::handshake(server.addr).await?;
    let run_id = "busy-1".to_string();
    call(
        &mut control,
        "r",
        "runs.create",
        json!({"workflow": "busy", "runId": run_id}),
    )
    .await?;
    // the run waits at its approval while every subscriber attaches
    let done_at = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (ws, _) = bg::handshake(server.addr).await?;
        tasks.push(tokio::spawn(subscriber(
            ws,
            run_id.clone(),
            done_at.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = Cpu::start(server.pid);
    let t0 = Instant::now();
    call(
        &mut control,
        "a",
        "approvals.decide",
        json!({"runId": run_id, "nodeId": "go", "approved": true}),
    )
    .await?;
    // wait for the run to finish
    loop {
        let m = tokio::time::timeout(Duration::from_secs(120), control.next())
            .await
            .map_err(|_| "the busy run did not finish within 120 s".to_string())?;
        let Some(Ok(Message::Text(t))) = m else {
            return Err("the control socket closed".into());
        };
        if t.contains("\"run.completed\"") && t.contains(&run_id) {
            break;
        }
    }
    let run_secs = t0.elapsed().as_secs_f64();
    let store = smithers_store::open(&url).await.map_err(|e| e.message)?;
    let latest = store.last_frame_no(&run_id).await.map_err(|e| e.message)?;
    done_at.store(latest, Ordering::Release);
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.map_err(err)??);
    }
    let all_secs = t0.elapsed().as_secs_f64();
    let (server_cpu, _) = cpu.used();
    let rss = server.rss_kib()?;
    let frames = store
        .frames_between(&run_id, 1, latest)
        .await
        .map_err(|e| e.message)?;
    let created: HashMap<i64, i64> = frames
        .iter()
        .map(|f| (f.frame_no, f.created_at_ms))
        .collect();
    let mut lat = Vec::new();
    let mut complete = 0;
    let mut events = 0;
    for s in &seen {
        events += s.len();
        let mut last = -1;
        let mut contiguous = true;
        for (seq, at) in s {
            if let Some(c) = created.get(seq) {
                lat.push((*at - *c) as f64);
            }
            if last >= 0 && *seq != last + 1 {
                contiguous = false;
            }
            last = *seq;
        }
        if contiguous && last == latest {
            complete += 1;
        }
    }
    lat.sort_by(f64::total_cmp);
    table.add(
        "frames of the run / run time",
        format!("{latest} / {run_secs:.2} s"),
        "",
        None,
    );
    table.add(
        "subscribers that got every frame in order",
        format!("{complete} / {n}"),
        &format!("{n}"),
        Some(complete == n),
    );
    table.add(
        "events delivered (all subscribers)",
        format!("{events} in {all_secs:.2} s"),
        "",
        None,
    );
    table.add(
        "stream throughput (events delivered / s)",
        format!("{:.0} /s", events as f64 / all_secs),
        "",
        None,
    );
    table.add(
        "frame commit → event received, p50 / p99",
        format!(
            "{:.0} / {:.0} ms",
            bg::percentile(&lat, 0.5),
            bg::percentile(&lat, 0.99)
        ),
        "",
        None,
    );
    table.add(
        "server CPU while streaming",
        format!("{:.0}% of one core", server_cpu / 10.0 / all_secs),
        "",
        None,
    );
    table.add(
        "server memory (VmRSS) after",
        format!("{:.1} MiB", rss as f64 / 1024.0),
        "",
        None,
    );
    snapshot_latency(
        table,
        &mut control,
        &run_id,
        if n >= 100 { 500 } else { 100 },
    )
    .await?;
    server.stop().await
}

/// `getDevToolsSnapshot` of the finished run's latest frame, one request at a time over one
/// WebSocket: the round trip a DevTools client waits for when it opens a run.
async fn snapshot_latency(table: &mut Table, ws: &mut bg::Ws, run_id: &str, calls: usize) -> R<()> {
    let mut ms = Vec::with_capacity(calls);
    for i in 0..calls {
        let t0 = Instant::now();
        let snap = call(
            ws,
            &format!("g{i}"),
            "getDevToolsSnapshot",
            json!({"runId": run_id}),
        )
        .await?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        std::hint::black_box(snap);
    }
    ms.sort_by(f64::total_cmp);
    table.add(
        format!("getDevToolsSnapshot latency, p50 / p99 ({calls} calls)"),
        format!(
            "{:.2} / {:.2} ms",
            bg::percentile(&ms, 0.5),
            bg::percentile(&ms, 0.99)
        ),
        "",
        None,
    );
    Ok(())
}

/// Entry point.
pub async fn bench_devtools(quick: bool) -> Result<u8, smithers_core::SmithersError> {
    let tmp = std::env::temp_dir().join(format!("smithers-bench-devtools-{}", std::process::id()));
    let result = async {
        println!(
            "smithers bench devtools — {} cores; load average {}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            bg::loadavg()
        );
        let mut table = Table::default();
        compute(&mut table, if quick { 50 } else { 300 });
        let (n, iterations) = if quick { (10, 50) } else { (100, 400) };
        subscribers(&mut table, &tmp, n, iterations).await?;
        table.print();
        Ok::<u8, String>(0)
    }
    .await;
    let _ = std::fs::remove_dir_all(&tmp);
    result.map_err(|e| smithers_core::SmithersError::new(smithers_core::Code::Internal, e))
}
