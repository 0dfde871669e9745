//! `smithers bench console`: what the web console asks of a gateway holding many runs. Seeds a
//! SQLite file with 100,000 runs, serves it (`smithers serve` in a separate process) and times
//! the `runs.list` pages the runs page asks for: the first, one 50,000 rows deep (paging after
//! a row), and the status, workflow and run-id filters; plus the size of the console's files.
//! First paint is measured in a real browser by the console tests (docs/benchmarks.md).

use crate::bench_devtools::call;
use crate::bench_gateway::{self as bg, R, Table, err};
use serde_json::{Value, json};
use smithers_store::{Batch, RunRow, Write, status};
use std::path::Path;
use std::time::Instant;

const BASE_MS: i64 = 1_700_000_000_000;

/// The i-th seeded run: one a millisecond, every 100th failed, every 7th of workflow `other`.
fn seeded(i: usize) -> RunRow {
    let key = if i.is_multiple_of(7) {
        "other"
    } else {
        "quick"
    };
    let at = BASE_MS + i as i64;
    let mut r = smithers_store::conformance::run_row(&format!("r-{i:06}"), key, at);
    r.status = if i.is_multiple_of(100) {
        status::FAILED
    } else {
        status::FINISHED
    }
    .into();
    r.started_at_ms = Some(at);
    r.finished_at_ms = Some(at + 5);
    r.config_json = Some(json!({"gatewayWorkflowKey": key}).to_string());
    r
}

async fn seed(url: &str, runs: usize) -> R<f64> {
    let store = smithers_store::open(url).await.map_err(err)?;
    let t0 = Instant::now();
    let mut i = 0;
    while i < runs {
        let mut b = Batch::new();
        for j in i..(i + 2_000).min(runs) {
            b.push(Write::InsertRun(seeded(j)));
        }
        store.apply(b).await.map_err(err)?;
        i += 2_000;
    }
    Ok(t0.elapsed().as_secs_f64())
}

fn write_config(dir: &Path) -> R<(std::path::PathBuf, String)> {
    std::fs::create_dir_all(dir).map_err(err)?;
    for key in ["quick", "other"] {
        std::fs::write(
            dir.join(format!("{key}.yaml")),
            format!("name: {key}\nsteps:\n  - task: {{id: v, value: 1}}\n"),
        )
        .map_err(err)?;
    }
    let url = format!("sqlite://{}", dir.join("smithers.db").display());
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[storage]\nurl = {}\n\n\
         [[workflows]]\nkey = \"quick\"\npath = \"quick.yaml\"\n\n\
         [[workflows]]\nkey = \"other\"\npath = \"other.yaml\"\n",
        Value::String(url.clone())
    );
    let path = dir.join("smithers.toml");
    std::fs::write(&path, toml).map_err(err)?;
    Ok((path, url))
}

async fn pages(table: &mut Table, dir: &Path, runs: usize, reps: usize) -> R<()> {
    let (config, url) = write_config(dir)?;
    let seeded_in = seed(&url, runs).await?;
    table.add(
        "runs seeded (one transaction per 2,000)",
        format!("{runs} in {seeded_in:.1} s"),
        "",
        None,
    );
    let exe = std::env::current_exe().map_err(err)?;
    let server = bg::spawn_server(&exe, &config).await?;
    let (mut ws, _) = bg::handshake(server.addr).await?;
    let middle = runs / 2;
    let deep = format!("a page {middle} rows deep (after a row)");
    let cases = [
        ("first page (50 rows)", json!({"limit": 50})),
        (
            deep.as_str(),
            json!({"limit": 50, "beforeCreatedAtMs": BASE_MS + middle as i64, "beforeRunId": format!("r-{middle:06}")}),
        ),
        (
            "status filter (1 run in 100 failed)",
            json!({"limit": 50, "status": "failed"}),
        ),
        (
            "workflow filter (1 run in 7)",
            json!({"limit": 50, "workflow": "other"}),
        ),
        (
            "run id search (a prefix of 10 runs)",
            json!({"limit": 50, "runIdPrefix": format!("r-{:05}", middle / 10)}),
        ),
    ];
    for (what, params) in cases {
        let mut ms = Vec::with_capacity(reps);
        let mut rows = 0;
        for r in 0..reps {
            let t0 = Instant::now();
            let v = call(&mut ws, &format!("l{r}"), "runs.list", params.clone()).await?;
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            rows = v.as_array().map_or(0, Vec::len);
        }
        ms.sort_by(f64::total_cmp);
        let p50 = bg::percentile(&ms, 0.5);
        let p99 = bg::percentile(&ms, 0.99);
        table.add(
            format!("runs.list, {what}: p50 / p99 ({rows} rows)"),
            format!("{p50:.2} / {p99:.2} ms"),
            "p99 ≤ 50 ms",
            Some(p99 <= 50.0),
        );
    }
    server.stop().await
}

fn files(table: &mut Table) {
    let mut total = 0;
    let mut n = 0;
    for (_, bytes) in smithers_gateway::console::files() {
        total += bytes;
        n += 1;
    }
    table.add(
        "console files (uncompressed; the gzip figure is in docs/benchmarks.md)",
        format!("{n} files, {:.1} KB", total as f64 / 1000.0),
        "≤ 200 KB compressed",
        Some(total <= 200_000),
    );
}

/// Entry point.
pub async fn bench_console(runs: usize, quick: bool) -> Result<u8, smithers_core::SmithersError> {
    let tmp = std::env::temp_dir().join(format!("smithers-bench-console-{}", std::process::id()));
    let result = async {
        println!(
            "smithers bench console — {} cores; load average {}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            bg::loadavg()
        );
        let mut table = Table::default();
        files(&mut table);
        let runs = if quick { runs.min(5_000) } else { runs };
        pages(
            &mut table,
            &tmp,
            runs.max(100),
            if quick { 20 } else { 200 },
        )
        .await?;
        table.print();
        Ok::<u8, String>(0)
    }
    .await;
    let _ = std::fs::remove_dir_all(&tmp);
    result.map_err(|e| smithers_core::SmithersError::new(smithers_core::Code::Internal, e))
}
