//! `smithers bench`: engine overhead figures on durable SQLite (see docs/benchmarks.md).

use serde_json::json;
use smithers_core::{SmithersError, Workflow};
use smithers_engine::{Engine, EngineConfig, StartOptions};
use std::sync::Arc;
use std::time::Instant;

fn chain_yaml(n: usize) -> String {
    let mut s = format!("name: chain-{n}\nsteps:\n");
    for i in 0..n {
        s.push_str(&format!("  - task: {{id: t{i}, value: {{n: {i}}}}}\n"));
    }
    s
}

fn load(src: &str, dir: &std::path::Path) -> Result<Arc<dyn Workflow>, SmithersError> {
    smithers_core::yaml::load_str(src, "bench.yaml", dir)
        .map(|w| Arc::new(w) as Arc<dyn Workflow>)
        .map_err(|p| smithers_core::yaml::invalid(&p))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn engine_in(dir: &std::path::Path) -> Result<Engine, SmithersError> {
    let store =
        smithers_store::open(&format!("sqlite://{}", dir.join("bench.db").display())).await?;
    Ok(Engine::new(
        store,
        EngineConfig {
            default_cwd: Some(dir.to_path_buf()),
            ..Default::default()
        },
    ))
}

/// Median wall time, ms, of `reps` runs of a chain of `n` value tasks (after one warm-up run),
/// on a fresh database in `dir`.
pub async fn chain_median_ms(
    dir: &std::path::Path,
    n: usize,
    reps: usize,
) -> Result<f64, SmithersError> {
    let _ = std::fs::create_dir_all(dir);
    let engine = engine_in(dir).await?;
    let wf = load(&chain_yaml(n), dir)?;
    engine
        .start(wf.clone(), json!({}), StartOptions::default())
        .await?
        .wait()
        .await;
    let mut per_run = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let o = engine
            .start(wf.clone(), json!({}), StartOptions::default())
            .await?
            .wait()
            .await;
        if o.status != "finished" {
            return Err(o.error.unwrap_or_else(|| {
                SmithersError::new(smithers_core::Code::Internal, "bench run did not finish")
            }));
        }
        per_run.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(&mut per_run))
}

/// Runs the benchmarks and prints the figures.
pub async fn bench(
    runs: usize,
    quick: bool,
    lengths: Option<Vec<usize>>,
) -> Result<u8, SmithersError> {
    let tmp =
        std::env::temp_dir().join(format!("smithers-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&tmp)
        .map_err(|e| SmithersError::new(smithers_core::Code::Internal, format!("temp dir: {e}")))?;
    let result = run_all(&tmp, runs, quick, lengths).await;
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

async fn run_all(
    tmp: &std::path::Path,
    runs: usize,
    quick: bool,
    only: Option<Vec<usize>>,
) -> Result<u8, SmithersError> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "smithers bench — durable SQLite (WAL, synchronous=NORMAL) in {}, {cores} cores",
        tmp.display()
    );

    // 1. per-step overhead of a sequential chain of value tasks, for several chain lengths
    let lengths: Vec<usize> = match &only {
        Some(l) => l.clone(),
        None if quick => vec![10, 100],
        None => vec![10, 100, 1000],
    };
    println!(
        "\nsequential chain of value tasks (median of runs; per step = run wall time / steps)"
    );
    println!(
        "{:>7} {:>6} {:>14} {:>14}",
        "steps", "runs", "median ms/run", "median ms/step"
    );
    let mut medians = Vec::new();
    for &n in &lengths {
        let reps = if n >= 1000 { runs.clamp(3, 5) } else { runs };
        let m = chain_median_ms(&tmp.join(format!("chain-{n}")), n, reps).await?;
        println!("{n:>7} {reps:>6} {m:>14.2} {:>14.4}", m / n as f64);
        medians.push((n, m));
    }
    for w in medians.windows(2) {
        let ((a, ma), (b, mb)) = (w[0], w[1]);
        println!(
            "marginal cost of a step from {a} to {b} steps: {:.4} ms",
            (mb - ma) / (b - a) as f64
        );
    }

    if only.is_some() {
        println!(
            "\npeak memory (VmHWM): {:.1} MiB",
            peak_rss_kib() as f64 / 1024.0
        );
        return Ok(0);
    }
    // 2. throughput of 1-task runs, many in flight at once
    let total = if quick { 1000 } else { 5000 };
    let dir = tmp.join("throughput");
    let _ = std::fs::create_dir_all(&dir);
    let engine = engine_in(&dir).await?;
    let wf = load(&chain_yaml(1), &dir)?;
    for in_flight in [1usize, 64] {
        let t0 = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
        let mut joins = Vec::with_capacity(total);
        for _ in 0..total {
            let permit =
                sem.clone().acquire_owned().await.map_err(|e| {
                    SmithersError::new(smithers_core::Code::Internal, e.to_string())
                })?;
            let h = engine
                .start(wf.clone(), json!({}), StartOptions::default())
                .await?;
            joins.push(tokio::spawn(async move {
                let o = h.wait().await;
                drop(permit);
                o.status == "finished"
            }));
        }
        let mut ok = 0;
        for j in joins {
            if j.await.unwrap_or(false) {
                ok += 1;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "\n1-task runs, {in_flight} in flight: {ok}/{total} finished in {secs:.2}s = {:.0} runs/s",
            ok as f64 / secs
        );
    }
    println!(
        "\npeak memory (VmHWM): {:.1} MiB",
        peak_rss_kib() as f64 / 1024.0
    );
    Ok(0)
}
