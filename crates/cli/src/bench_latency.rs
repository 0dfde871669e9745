//! `smithers bench gateway --only latency`: how long `runs.create` takes to answer over
//! WebSocket, and how long a run takes from `runs.create` to its `run.completed` (issue 13,
//! items 1 and 2).
//!
//! Two shapes of load. *Runs in flight*: each slot creates a run and waits for that run's
//! `run.completed` before creating the next, so exactly N runs exist at a time; this is how a
//! client that waits for its work behaves, and what "N in flight" means for an engine.
//! *Creates in flight*: each slot sends the next `runs.create` as soon as the previous one
//! answers, so runs pile up executing behind the responses; it measures the create path while
//! the server is saturated.

use crate::bench_gateway::{R, Table, err, handshake, next_text, percentile};
use futures_util::SinkExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// What one runs-in-flight measurement saw; latencies in ms, sorted.
pub struct RunsInFlight {
    pub create_ms: Vec<f64>,
    pub complete_ms: Vec<f64>,
    pub secs: f64,
    /// Runs whose `run.completed` arrived before their `runs.create` response.
    pub completed_first: usize,
}

fn create_frame(id: &str, workflow: &str, run_id: Option<&str>) -> Message {
    let mut params = json!({"workflow": workflow});
    if let Some(r) = run_id {
        params["runId"] = json!(r);
    }
    let f = json!({"type": "req", "id": id, "method": "runs.create", "params": params});
    Message::Text(f.to_string().into())
}

/// `total` runs of `workflow` over `conns` WebSocket connections with `per_conn` runs in flight
/// on each. A connection that creates a run is subscribed to it (protocol §1.8), so each one
/// reads its own runs' `run.completed`.
pub async fn runs_in_flight(
    addr: SocketAddr,
    workflow: &str,
    conns: usize,
    per_conn: usize,
    total: usize,
) -> R<RunsInFlight> {
    let mut sockets = Vec::with_capacity(conns);
    for _ in 0..conns {
        sockets.push(handshake(addr).await?.0);
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for mut ws in sockets {
        let workflow = workflow.to_string();
        let mine = total / conns;
        tasks.push(tokio::spawn(async move {
            // run id → (sent at, answered, completed at)
            let mut open: HashMap<String, (Instant, bool, Option<Instant>)> = HashMap::new();
            let mut create_ms = Vec::with_capacity(mine);
            let mut complete_ms = Vec::with_capacity(mine);
            let mut early = 0usize;
            let mut sent = 0usize;
            while complete_ms.len() < mine {
                if sent < mine && open.len() < per_conn {
                    let run = smithers_engine::new_run_id();
                    open.insert(run.clone(), (Instant::now(), false, None));
                    ws.send(create_frame(&run, &workflow, Some(&run)))
                        .await
                        .map_err(err)?;
                    sent += 1;
                    continue;
                }
                let text = next_text(&mut ws).await?;
                let at = Instant::now();
                let v: Value = serde_json::from_str(&text).map_err(err)?;
                let run = if v["type"] == "res" {
                    if v["ok"] != true {
                        return Err(format!("runs.create failed: {text}"));
                    }
                    let Some(run) = v["id"].as_str() else {
                        continue;
                    };
                    let Some(slot) = open.get_mut(run) else {
                        continue;
                    };
                    slot.1 = true;
                    create_ms.push((at - slot.0).as_secs_f64() * 1000.0);
                    run
                } else if v["event"] == "run.completed" {
                    let Some(run) = v["payload"]["runId"].as_str() else {
                        continue;
                    };
                    if v["payload"]["status"] != "finished" {
                        return Err(format!("run {run} ended {}", v["payload"]["status"]));
                    }
                    let Some(slot) = open.get_mut(run) else {
                        continue;
                    };
                    early += usize::from(!slot.1);
                    slot.2 = Some(at);
                    run
                } else {
                    continue;
                };
                if let Some(&(t0, true, Some(done))) = open.get(run) {
                    complete_ms.push((done - t0).as_secs_f64() * 1000.0);
                    open.remove(run);
                }
            }
            Ok::<_, String>((create_ms, complete_ms, early))
        }));
    }
    let (mut create_ms, mut complete_ms, mut completed_first) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        let (a, b, early) = t.await.map_err(err)??;
        create_ms.extend(a);
        complete_ms.extend(b);
        completed_first += early;
    }
    let secs = t0.elapsed().as_secs_f64();
    create_ms.sort_by(f64::total_cmp);
    complete_ms.sort_by(f64::total_cmp);
    Ok(RunsInFlight {
        create_ms,
        complete_ms,
        secs,
        completed_first,
    })
}

/// Creates in flight: `runs.create` (workflow `workflow`) over `conns` WebSocket connections,
/// `per_conn` requests in flight on each, `total` in all: the time from sending a request to reading its
/// response, ms, sorted.
pub async fn create_latency(
    addr: SocketAddr,
    workflow: &str,
    conns: usize,
    per_conn: usize,
    total: usize,
) -> R<Vec<f64>> {
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (mut ws, _) = handshake(addr).await?;
        let workflow = workflow.to_string();
        let mine = total / conns;
        tasks.push(tokio::spawn(async move {
            let mut sent_at: HashMap<String, Instant> = HashMap::new();
            let mut out = Vec::with_capacity(mine);
            let mut sent = 0usize;
            let frame = |n: usize| {
                let id = format!("l{c}-{n}");
                let f = json!({"type": "req", "id": id, "method": "runs.create",
                    "params": {"workflow": workflow}});
                (id, Message::Text(f.to_string().into()))
            };
            while sent < per_conn.min(mine) {
                let (id, m) = frame(sent);
                sent_at.insert(id, Instant::now());
                ws.send(m).await.map_err(err)?;
                sent += 1;
            }
            while out.len() < mine {
                let text = next_text(&mut ws).await?;
                if !text.contains("\"type\":\"res\"") {
                    continue;
                }
                let v: Value = serde_json::from_str(&text).map_err(err)?;
                let Some(t0) = v["id"].as_str().and_then(|id| sent_at.remove(id)) else {
                    continue;
                };
                out.push(t0.elapsed().as_secs_f64() * 1000.0);
                if v["ok"] != true {
                    return Err(format!("runs.create failed: {text}"));
                }
                if sent < mine {
                    let (id, m) = frame(sent);
                    sent_at.insert(id, Instant::now());
                    ws.send(m).await.map_err(err)?;
                    sent += 1;
                }
            }
            Ok::<Vec<f64>, String>(out)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.map_err(err)??);
    }
    all.sort_by(f64::total_cmp);
    Ok(all)
}

/// The latency rows of `smithers bench gateway`: one run at a time, 16 runs in flight over 4
/// connections, and 16 creates in flight (runs piling up), `total` runs each.
pub async fn measure(addr: SocketAddr, total: usize, table: &mut Table) -> R<()> {
    for (conns, per) in [(1, 1), (4, 4)] {
        let r = runs_in_flight(addr, "one", conns, per, total).await?;
        let n = conns * per;
        let (p50, p99) = (
            percentile(&r.create_ms, 0.5),
            percentile(&r.create_ms, 0.99),
        );
        table.add(
            format!("runs.create response (WebSocket), {n} runs in flight: p50 / p99"),
            format!("{p50:.2} / {p99:.2} ms"),
            "≤ 1 / ≤ 5 ms",
            Some(p50 <= 1.0 && p99 <= 5.0),
        );
        let (p50, p99) = (
            percentile(&r.complete_ms, 0.5),
            percentile(&r.complete_ms, 0.99),
        );
        let target = if n == 16 { "≤ 5 ms p50" } else { "" };
        table.add(
            format!("  runs.create → run.completed, {n} in flight: p50 / p99"),
            format!("{p50:.2} / {p99:.2} ms"),
            target,
            (n == 16).then_some(p50 <= 5.0),
        );
        let rate = r.complete_ms.len() as f64 / r.secs;
        let (target, pass) = if n == 16 {
            ("≥ 3,000", Some(rate >= 3000.0))
        } else {
            ("", None)
        };
        table.add(
            format!("  runs per second, {n} in flight"),
            format!("{rate:.0} runs/s"),
            target,
            pass,
        );
        if r.completed_first > 0 {
            table.add(
                format!("  runs whose run.completed came before the response, {n} in flight"),
                r.completed_first.to_string(),
                "",
                None,
            );
        }
    }
    let lat = create_latency(addr, "one", 4, 4, total).await?;
    table.p50_p99(
        "  runs.create response, 16 creates in flight (runs pile up): p50 / p99",
        &lat,
    );
    Ok(())
}
