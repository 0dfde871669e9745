//! `smithers bench gateway --db …`: `runs.create → run.completed` throughput on PostgreSQL,
//! with one `smithers serve` node and then with `--nodes` nodes sharing the database (see
//! docs/benchmarks.md, section "PostgreSQL").
//!
//! The load generator's HTTP connections are spread over the nodes, so each node drives the
//! runs it accepted. One WebSocket listener, connected to the first node only, waits for every
//! `run.completed`: a run driven by another node reaches it through the database's
//! `LISTEN/NOTIFY` feed, which is the contract a client of any node relies on.

use crate::bench_gateway::{
    R, ServerProc, Table, ThroughputResult, cpu_ms, err, handshake, loadavg, next_text,
    raise_nofile, request, rpc_request, sorted, spawn_server, thousands, write_config_for,
};
use crate::bench_pg::{TempCluster, tree_cpu_ms};
use serde_json::{Value, json};
use smithers_core::{Code, SmithersError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// What `--db` names: a throwaway local cluster, or a server at a URL.
pub const TEMP_CLUSTER: &str = "postgres";

struct Sizes {
    runs: usize,
    warmup: usize,
    in_flight: &'static [usize],
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                runs: 200,
                warmup: 50,
                in_flight: &[16, 64],
            }
        } else {
            Sizes {
                runs: 5000,
                warmup: 500,
                in_flight: &[16, 64, 256],
            }
        }
    }
}

/// Runs the PostgreSQL throughput benchmark and prints the figures; exit code 1 when a target
/// is missed.
pub async fn bench_cluster(quick: bool, db: &str, nodes: usize) -> Result<u8, SmithersError> {
    let tmp = std::env::temp_dir().join(format!(
        "smithers-bench-pg-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let result = run(&tmp, quick, db, nodes.max(1)).await;
    let _ = std::fs::remove_dir_all(&tmp);
    result.map_err(|e| SmithersError::new(Code::Internal, format!("bench gateway --db: {e}")))
}

async fn run(tmp: &Path, quick: bool, db: &str, nodes: usize) -> R<u8> {
    let t_all = Instant::now();
    raise_nofile();
    let (cluster, url) = database(db).await?;
    let stats = Stats::connect(&url).await;
    let exe = std::env::current_exe().map_err(err)?;
    let config = write_config_for(tmp, &url)?;
    println!(
        "smithers bench gateway --db — servers: `{} serve` (separate processes); load generator in this process; load average {}",
        exe.display(),
        loadavg()
    );
    match &cluster {
        Some(c) => println!("PostgreSQL: {}", c.describe()),
        None => println!("PostgreSQL: {}", redact(&url)),
    }
    if stats.is_none() {
        println!("note: pg_stat_statements is not available: no statement counts");
    }
    let z = Sizes::new(quick);
    let mut table = Table::default();
    let mut servers: Vec<ServerProc> = Vec::new();
    let mut single: HashMap<usize, f64> = HashMap::new();
    for n in 1..=nodes {
        while servers.len() < n {
            let s = spawn_server(&exe, &config).await?;
            println!(
                "\n[node {}] server pid {} on {}",
                servers.len() + 1,
                s.pid,
                s.addr
            );
            servers.push(s);
        }
        let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        // fills each node's connection pool and statement caches
        throughput_across(&addrs, addrs[0], "one", z.warmup, 16).await?;
        for &in_flight in z.in_flight {
            let label = format!(
                "{n} node{}, {in_flight} in flight",
                if n == 1 { "" } else { "s" }
            );
            let probe = Probe::start(&servers, cluster.as_ref(), stats.as_ref()).await;
            let t = throughput_across(&addrs, addrs[0], "one", z.runs, in_flight).await?;
            let rate = t.completed as f64 / t.secs;
            let (target, pass) = if n == 1 {
                ("≥ 1,000".to_string(), Some(rate >= 1000.0))
            } else {
                let base = single.get(&in_flight).copied().unwrap_or(f64::NAN);
                (
                    format!("≥ {}", thousands(1.6 * base)),
                    Some(rate >= 1.6 * base),
                )
            };
            if n == 1 {
                single.insert(in_flight, rate);
            }
            table.add(
                format!("runs.create → run.completed, 1 task ({label})"),
                format!("{} runs/s", thousands(rate)),
                &target,
                pass,
            );
            table.p50_p99("  create → completed latency p50 / p99", &t.latencies_ms);
            let top = probe.finish(&mut table, t.completed).await;
            if n == nodes && in_flight == 64 {
                print_top(&top, t.completed);
            }
        }
    }
    for s in servers {
        s.stop().await?;
    }
    drop(cluster);
    table.print();
    println!(
        "total time {:.1} s; load average now {}",
        t_all.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(if table.failed() { 1 } else { 0 })
}

/// The cluster the benchmark started (if any) and the database URL to use.
async fn database(db: &str) -> R<(Option<TempCluster>, String)> {
    if db == TEMP_CLUSTER {
        let cluster = tokio::task::spawn_blocking(TempCluster::start)
            .await
            .map_err(err)??;
        let admin = connect(&cluster.url("postgres")).await?;
        admin
            .batch_execute("CREATE DATABASE smithers_bench")
            .await
            .map_err(err)?;
        let url = cluster.url("smithers_bench");
        return Ok((Some(cluster), url));
    }
    if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        return Ok((None, db.to_string()));
    }
    Err(format!(
        "--db takes `{TEMP_CLUSTER}` (a throwaway local cluster) or a postgres:// URL, not `{db}`"
    ))
}

pub(crate) async fn connect(url: &str) -> R<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {}: {e}", redact(url)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// what the database did per run

/// A connection that reads `pg_stat_statements` for the bench database.
struct Stats {
    client: tokio_postgres::Client,
}

/// Statement text, calls and total execution time (ms).
type Top = Vec<(String, i64, f64)>;

impl Stats {
    /// None when the server does not load `pg_stat_statements`.
    async fn connect(url: &str) -> Option<Stats> {
        let client = connect(url).await.ok()?;
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .ok()?;
        let stats = Stats { client };
        stats.reset().await.ok()?;
        Some(stats)
    }

    async fn reset(&self) -> R<()> {
        self.client
            .batch_execute("SELECT pg_stat_statements_reset()")
            .await
            .map_err(err)
    }

    /// Statements run in the bench database since the reset, most frequent first.
    async fn read(&self) -> R<Top> {
        let rows = self
            .client
            .query(
                "SELECT query, calls, total_exec_time FROM pg_stat_statements s
                 JOIN pg_database d ON d.oid = s.dbid
                 WHERE d.datname = current_database() AND query NOT LIKE '%pg_stat_statements%'
                 ORDER BY calls DESC",
                &[],
            )
            .await
            .map_err(err)?;
        let mut top = Vec::with_capacity(rows.len());
        for r in rows {
            top.push((
                r.try_get::<_, String>(0).map_err(err)?,
                r.try_get::<_, i64>(1).map_err(err)?,
                r.try_get::<_, f64>(2).map_err(err)?,
            ));
        }
        Ok(top)
    }
}

/// CPU and database counters at the start of a phase.
struct Probe<'a> {
    servers: Vec<(u32, f64)>,
    postgres: Option<(u32, f64)>,
    stats: Option<&'a Stats>,
}

impl<'a> Probe<'a> {
    async fn start(
        servers: &[ServerProc],
        cluster: Option<&TempCluster>,
        stats: Option<&'a Stats>,
    ) -> Probe<'a> {
        let mut reset = None;
        if let Some(s) = stats
            && s.reset().await.is_ok()
        {
            reset = Some(s);
        }
        Probe {
            servers: servers
                .iter()
                .map(|s| (s.pid, cpu_ms(s.pid).unwrap_or(0.0)))
                .collect(),
            postgres: cluster.map(|c| (c.pid(), tree_cpu_ms(c.pid()))),
            stats: reset,
        }
    }

    /// Adds the CPU and statement rows for `runs` completed runs; returns the statements.
    async fn finish(self, table: &mut Table, runs: usize) -> Top {
        let n = runs.max(1) as f64;
        let per_node: Vec<String> = self
            .servers
            .iter()
            .map(|(pid, t0)| format!("{:.0}", (cpu_ms(*pid).unwrap_or(0.0) - t0) * 1000.0 / n))
            .collect();
        let total: f64 = self
            .servers
            .iter()
            .map(|(pid, t0)| cpu_ms(*pid).unwrap_or(0.0) - t0)
            .sum();
        let postgres = match self.postgres {
            Some((pid, t0)) => format!("{:.0} µs", (tree_cpu_ms(pid) - t0) * 1000.0 / n),
            None => "n/a".into(),
        };
        let split = if per_node.len() > 1 {
            format!(" ({})", per_node.join(" + "))
        } else {
            String::new()
        };
        table.add(
            "  CPU per run: servers / PostgreSQL",
            format!("{:.0}{split} / {postgres}", total * 1000.0 / n),
            "",
            None,
        );
        let Some(stats) = self.stats else {
            return Vec::new();
        };
        let Ok(top) = stats.read().await else {
            return Vec::new();
        };
        let calls: i64 = top.iter().map(|(_, c, _)| c).sum();
        // each transaction ends with one COMMIT (or ROLLBACK) statement
        let commits: i64 = top
            .iter()
            .filter(|(q, _, _)| q.trim().eq_ignore_ascii_case("COMMIT"))
            .map(|(_, c, _)| c)
            .sum();
        table.add(
            "  PostgreSQL statements / transactions per run",
            format!("{:.1} / {:.1}", calls as f64 / n, commits as f64 / n),
            "",
            None,
        );
        top
    }
}

fn print_top(top: &Top, runs: usize) {
    let n = runs.max(1) as f64;
    println!("\n  statements per run (pg_stat_statements), most frequent first:");
    for (query, calls, ms) in top.iter().take(16) {
        let one_line: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
        let short: String = one_line.chars().take(110).collect();
        println!(
            "  {:>6.2}  {:>7.3} ms  {short}",
            *calls as f64 / n,
            ms / (*calls).max(1) as f64
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// runs.create → run.completed over one or more nodes

enum Slot {
    Waiting(tokio::sync::oneshot::Sender<String>),
    Done(String),
}

/// `total` runs of `workflow`, `in_flight` at a time: each of `in_flight` keep-alive HTTP
/// connections (spread round-robin over `create_on`) sends `runs.create` with its own run id
/// and waits until a WebSocket client of `listen_on` (no filter) receives that run's
/// `run.completed`, then starts the next.
pub async fn throughput_across(
    create_on: &[SocketAddr],
    listen_on: SocketAddr,
    workflow: &str,
    total: usize,
    in_flight: usize,
) -> R<ThroughputResult> {
    let slots: Arc<Mutex<HashMap<String, Slot>>> = Arc::new(Mutex::new(HashMap::new()));
    let (mut listener, _) = handshake(listen_on).await?;
    let listen = {
        let slots = slots.clone();
        tokio::spawn(async move {
            let mut n = 0usize;
            while n < total {
                let text = next_text(&mut listener).await?;
                if !text.contains("\"run.completed\"") {
                    continue;
                }
                let v: Value = serde_json::from_str(&text).map_err(err)?;
                let (Some(id), Some(st)) = (
                    v["payload"]["runId"].as_str(),
                    v["payload"]["status"].as_str(),
                ) else {
                    continue;
                };
                n += 1;
                let mut m = slots.lock().map_err(err)?;
                match m.remove(id) {
                    Some(Slot::Waiting(tx)) => {
                        let _ = tx.send(st.to_string());
                    }
                    _ => {
                        m.insert(id.to_string(), Slot::Done(st.to_string()));
                    }
                }
            }
            Ok::<_, String>(())
        })
    };
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..in_flight {
        let addr = create_on
            .get(c % create_on.len().max(1))
            .copied()
            .unwrap_or(listen_on);
        let (slots, next, workflow) = (slots.clone(), next.clone(), workflow.to_string());
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.map_err(err)?;
            s.set_nodelay(true).map_err(err)?;
            let mut buf = Vec::new();
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::AcqRel) as usize;
                if i >= total {
                    break;
                }
                // ids of the kind the server gives runs created without one (time-ordered)
                let id = smithers_engine::new_run_id();
                let (tx, rx) = tokio::sync::oneshot::channel();
                let t = Instant::now();
                let req = rpc_request("runs.create", &json!({"workflow": workflow, "runId": id}));
                let (status, body) = request(&mut s, &mut buf, &req).await?;
                if status != 200 {
                    return Err(format!(
                        "runs.create: HTTP {status}: {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
                let done = {
                    let mut m = slots.lock().map_err(err)?;
                    match m.remove(&id) {
                        Some(Slot::Done(st)) => Some(st),
                        _ => {
                            m.insert(id.clone(), Slot::Waiting(tx));
                            None
                        }
                    }
                };
                let st = match done {
                    Some(st) => st,
                    None => tokio::time::timeout(Duration::from_secs(30), rx)
                        .await
                        .map_err(|_| format!("run {id} did not complete within 30 s"))?
                        .map_err(err)?,
                };
                if st != "finished" {
                    return Err(format!("run {id} ended {st}"));
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, String>(lat)
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r.map_err(err)??);
    }
    let secs = t0.elapsed().as_secs_f64();
    listen.abort();
    Ok(ThroughputResult {
        completed: lat.len(),
        secs,
        latencies_ms: sorted(lat),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_left_out_of_printed_urls() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
