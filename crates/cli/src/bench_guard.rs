//! `smithers bench check`: the regression guard. Measures the figures that issue 13 set
//! targets for and compares each with the baseline kept in `docs/benchmarks.md`, reporting
//! every figure more than 10 % worse (exit code 1). `--record` writes the measured figures as
//! the new baseline instead.
//!
//! When PostgreSQL's binaries are found (as for `bench gateway --db postgres`), one throwaway
//! cluster is started once the other passes are done, and `pg_runs_64.per_s` (one node, 64
//! runs in flight) is measured in as many passes on it; without them that figure is left out,
//! and said so.
//!
//! Each figure is the best of several passes (lowest latency, highest rate): on a shared
//! 2-core machine the noise is all on the slow side, so the best pass is the stable one.

use crate::bench_cluster::{connect, throughput_across};
use crate::bench_gateway::{
    Cpu, R, err, fanout, percentile, spawn_server, throughput, wait_ws_closed, write_config,
    write_config_for,
};
use crate::bench_latency::runs_in_flight;
use crate::bench_pg::TempCluster;
use smithers_core::{Code, SmithersError};
use std::collections::BTreeMap;
use std::path::Path;

/// The line that introduces the baseline block in docs/benchmarks.md.
pub const MARKER: &str = "<!-- smithers bench check: baseline -->";

/// How much worse than its baseline a figure may get before it is reported.
pub const TOLERANCE: f64 = 0.10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

impl Better {
    fn word(self) -> &'static str {
        match self {
            Better::Lower => "lower",
            Better::Higher => "higher",
        }
    }

    fn parse(s: &str) -> Option<Better> {
        match s {
            "lower" => Some(Better::Lower),
            "higher" => Some(Better::Higher),
            _ => None,
        }
    }

    /// The better of two measurements.
    fn best(self, a: f64, b: f64) -> f64 {
        match self {
            Better::Lower => a.min(b),
            Better::Higher => a.max(b),
        }
    }

    /// How much worse `now` is than `base`, as a fraction (negative when better).
    pub fn worse_by(self, base: f64, now: f64) -> f64 {
        if base == 0.0 {
            return 0.0;
        }
        match self {
            Better::Lower => (now - base) / base,
            Better::Higher => (base - now) / base,
        }
    }
}

/// Figures by name: value and direction.
pub type Figures = BTreeMap<String, (f64, Better)>;

/// Reads the baseline block (the fenced block after [`MARKER`]): one `name value lower|higher`
/// per line.
pub fn parse_baseline(doc: &str) -> Result<Figures, String> {
    let Some(at) = doc.find(MARKER) else {
        return Err(format!("no line `{MARKER}` found"));
    };
    let mut lines = doc[at..]
        .lines()
        .skip(1)
        .skip_while(|l| l.trim().is_empty());
    if !lines.next().is_some_and(|l| l.starts_with("```")) {
        return Err(format!("`{MARKER}` must be followed by a fenced block"));
    }
    let mut out = Figures::new();
    for (i, line) in lines.enumerate() {
        if line.starts_with("```") {
            return Ok(out);
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let parsed = match parts.as_slice() {
            [name, value, dir] => value
                .parse::<f64>()
                .ok()
                .zip(Better::parse(dir))
                .map(|(v, d)| (name.to_string(), (v, d))),
            _ => None,
        };
        let Some((name, fig)) = parsed else {
            return Err(format!(
                "baseline line {}: `{line}` is not `name value lower|higher`",
                i + 1
            ));
        };
        out.insert(name, fig);
    }
    Err("the baseline block is not closed with ```".into())
}

/// The baseline block for `figures`, fenced.
pub fn render_baseline(figures: &Figures) -> String {
    let mut s = String::from("```text\n");
    for (name, (v, d)) in figures {
        s.push_str(&format!("{name:<32} {v:>10.3} {}\n", d.word()));
    }
    s.push_str("```\n");
    s
}

/// `doc` with its baseline block replaced by (or, without one, followed by) `figures`.
pub fn replace_baseline(doc: &str, figures: &Figures) -> String {
    let block = render_baseline(figures);
    let Some(at) = doc.find(MARKER) else {
        return format!("{doc}\n{MARKER}\n{block}");
    };
    let head = &doc[..at + MARKER.len()];
    let rest = &doc[at + MARKER.len()..];
    // skip the old fenced block: the opening fence and everything up to the closing one
    let tail = rest
        .find("```")
        .and_then(|open| {
            let after = open + 3;
            rest[after..]
                .find("\n```")
                .map(|close| &rest[after + close + 4..])
        })
        .map(|t| t.strip_prefix('\n').unwrap_or(t))
        .unwrap_or(rest);
    format!("{head}\n{block}{tail}")
}

/// One comparison row.
pub struct Verdict {
    pub name: String,
    pub base: Option<f64>,
    pub now: f64,
    pub worse_by: f64,
}

/// Compares `now` with `base`; a figure without a baseline is listed but never fails.
pub fn compare(base: &Figures, now: &Figures) -> Vec<Verdict> {
    now.iter()
        .map(|(name, &(v, d))| {
            let b = base.get(name).map(|(b, _)| *b);
            Verdict {
                name: name.clone(),
                base: b,
                now: v,
                worse_by: b.map(|b| d.worse_by(b, v)).unwrap_or(0.0),
            }
        })
        .collect()
}

fn put(f: &mut Figures, name: &str, v: f64, d: Better) {
    f.insert(name.to_string(), (v, d));
}

/// The passes' figures in one: each figure's best value (`best`), or its median (a recorded
/// baseline is typical, a check is the best the code did, so noise alone rarely fails it
/// while a real slowdown shows in every pass).
pub fn summarize(passes: &[Figures], best: bool) -> Figures {
    let mut all: BTreeMap<&str, (Vec<f64>, Better)> = BTreeMap::new();
    for p in passes {
        for (name, &(v, d)) in p {
            all.entry(name).or_insert_with(|| (Vec::new(), d)).0.push(v);
        }
    }
    all.into_iter()
        .map(|(name, (mut vs, d))| {
            vs.sort_by(f64::total_cmp);
            let v = if best {
                vs.iter()
                    .copied()
                    .reduce(|a, b| d.best(a, b))
                    .unwrap_or(0.0)
            } else {
                vs[vs.len() / 2]
            };
            (name.to_string(), (v, d))
        })
        .collect()
}

/// One pass over every figure, into `f`.
async fn pass(tmp: &Path, i: usize, quick: bool, f: &mut Figures) -> R<()> {
    let (short, long, runs) = if quick { (3, 20, 300) } else { (10, 100, 3000) };
    let dir = tmp.join(format!("engine-{i}"));
    let reps = if quick { 3 } else { 20 };
    let a = crate::bench::chain_median_ms(&dir.join("a"), short, reps)
        .await
        .map_err(|e| e.message)?;
    let b = crate::bench::chain_median_ms(&dir.join("b"), long, reps)
        .await
        .map_err(|e| e.message)?;
    put(
        f,
        "engine.step_ms",
        (b - a) / (long - short) as f64,
        Better::Lower,
    );

    let exe = std::env::current_exe().map_err(err)?;
    // durable commits, as the issue's figures are defined
    let (config, _) = write_config(
        &tmp.join(format!("gateway-{i}")),
        smithers_store::Synchronous::Full,
    )?;
    let server = spawn_server(&exe, &config).await?;
    let addr = server.addr;
    for (conns, per) in [(1, 1), (4, 4)] {
        let n = conns * per;
        let r = runs_in_flight(addr, "one", conns, per, runs).await?;
        put(
            f,
            &format!("create_{n}.p50_ms"),
            percentile(&r.create_ms, 0.5),
            Better::Lower,
        );
        put(
            f,
            &format!("create_{n}.p99_ms"),
            percentile(&r.create_ms, 0.99),
            Better::Lower,
        );
        put(
            f,
            &format!("completed_{n}.p50_ms"),
            percentile(&r.complete_ms, 0.5),
            Better::Lower,
        );
        put(
            f,
            &format!("runs_{n}.per_s"),
            r.complete_ms.len() as f64 / r.secs,
            Better::Higher,
        );
    }
    wait_ws_closed(addr).await?;
    let cpu = Cpu::start(server.pid);
    let t = throughput(addr, "one", runs, 64).await?;
    let (server_ms, _) = cpu.used();
    put(
        f,
        "runs_64.per_s",
        t.completed as f64 / t.secs,
        Better::Higher,
    );
    put(
        f,
        "runs_64.server_cpu_us",
        server_ms * 1000.0 / t.completed.max(1) as f64,
        Better::Lower,
    );
    let clients = if quick { 20 } else { 200 };
    let fan = fanout(addr, clients, if quick { 3 } else { 20 }, "one", 64).await?;
    put(
        f,
        &format!("fanout_{clients}.p99_ms"),
        percentile(&fan.completion_delays()?, 0.99),
        Better::Lower,
    );
    server.stop().await?;
    Ok(())
}

/// One pass of the PostgreSQL figure on `cluster`, into `f`. These passes run after all the
/// others, so the cluster's background work (autovacuum, checkpoints) does not land in them.
async fn pg_pass(
    tmp: &Path,
    i: usize,
    quick: bool,
    cluster: &TempCluster,
    f: &mut Figures,
) -> R<()> {
    let runs = if quick { 300 } else { 3000 };
    let exe = std::env::current_exe().map_err(err)?;
    // a fresh database per pass, so each starts from the same empty tables
    let db = format!("smithers_check_{i}");
    let admin = connect(&cluster.url("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .map_err(|e| format!("create database {db}: {e}"))?;
    let config = write_config_for(&tmp.join(format!("pg-{i}")), &cluster.url(&db))?;
    let server = spawn_server(&exe, &config).await?;
    let addr = [server.addr];
    // fills the node's connection pool and statement caches
    throughput_across(&addr, addr[0], "one", runs / 10, 16).await?;
    let t = throughput_across(&addr, addr[0], "one", runs, 64).await?;
    put(
        f,
        "pg_runs_64.per_s",
        t.completed as f64 / t.secs,
        Better::Higher,
    );
    server.stop().await?;
    Ok(())
}

/// Runs `passes` passes and compares with (or, with `record`, writes) the baseline in `doc`.
pub async fn bench_check(
    doc: &Path,
    passes: usize,
    quick: bool,
    record: bool,
) -> Result<u8, SmithersError> {
    let fail = |m: String| SmithersError::new(Code::Internal, format!("bench check: {m}"));
    let text = std::fs::read_to_string(doc)
        .map_err(|e| fail(format!("cannot read {}: {e}", doc.display())))?;
    let base = if record {
        Figures::new()
    } else {
        parse_baseline(&text).map_err(|m| fail(format!("{}: {m}", doc.display())))?
    };
    let tmp =
        std::env::temp_dir().join(format!("smithers-check-{}", uuid::Uuid::new_v4().simple()));
    let mut runs = Vec::new();
    let mut result = Ok(());
    for i in 0..passes.max(1) {
        println!("pass {} of {} …", i + 1, passes.max(1));
        let mut f = Figures::new();
        result = pass(&tmp, i, quick, &mut f).await;
        if result.is_err() {
            break;
        }
        runs.push(f);
    }
    // PostgreSQL after the rest: its cluster's work does not land in the other figures
    let pg = if result.is_ok() {
        match tokio::task::spawn_blocking(TempCluster::start).await {
            Ok(Ok(c)) => {
                println!("PostgreSQL: {}", c.describe());
                Some(c)
            }
            Ok(Err(e)) => {
                println!("note: no PostgreSQL figure this time ({e})");
                None
            }
            Err(e) => {
                result = Err(format!("starting PostgreSQL: {e}"));
                None
            }
        }
    } else {
        None
    };
    if let Some(cluster) = &pg {
        for (i, f) in runs.iter_mut().enumerate() {
            if result.is_err() {
                break;
            }
            println!("PostgreSQL pass {} of {} …", i + 1, passes.max(1));
            result = pg_pass(&tmp, i, quick, cluster, f).await;
        }
    }
    drop(pg);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map_err(fail)?;
    let now = summarize(&runs, !record);
    if record {
        std::fs::write(doc, replace_baseline(&text, &now))
            .map_err(|e| fail(format!("cannot write {}: {e}", doc.display())))?;
        print!("{}", render_baseline(&now));
        println!("recorded as the baseline in {}", doc.display());
        return Ok(0);
    }
    println!(
        "\n{:<32} {:>10} {:>10} {:>8}",
        "figure", "baseline", "now", "change"
    );
    let mut worse = 0;
    for v in compare(&base, &now) {
        let flag = if v.worse_by > TOLERANCE {
            worse += 1;
            "WORSE"
        } else {
            ""
        };
        let base = v
            .base
            .map(|b| format!("{b:.3}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:>10} {:>10.3} {:>+7.1}% {flag}",
            v.name,
            base,
            v.now,
            v.worse_by * 100.0
        );
    }
    for name in base.keys().filter(|n| !now.contains_key(*n)) {
        println!("{name:<32} not measured this time");
    }
    println!(
        "\n{worse} figure(s) more than {:.0} % worse than the baseline (best of {} passes)",
        TOLERANCE * 100.0,
        passes.max(1)
    );
    Ok(if worse > 0 { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_round_trips_through_the_document() {
        let mut f = Figures::new();
        f.insert("a.p50_ms".into(), (1.25, Better::Lower));
        f.insert("b.per_s".into(), (3000.0, Better::Higher));
        let doc = "# Benchmarks\n\ntext\n";
        let written = replace_baseline(doc, &f);
        assert!(written.starts_with(doc));
        assert_eq!(parse_baseline(&written), Ok(f.clone()));
        // recording again replaces the block and keeps what follows it
        let with_tail = format!("{written}\n## Later section\n");
        f.insert("a.p50_ms".into(), (1.5, Better::Lower));
        let again = replace_baseline(&with_tail, &f);
        assert_eq!(parse_baseline(&again), Ok(f));
        assert_eq!(again.matches(MARKER).count(), 1);
        assert_eq!(again.matches("```text").count(), 1);
        assert!(again.ends_with("## Later section\n"), "{again}");
    }

    /// How much worse each figure of `now` is than `base`, by name.
    fn worse_by(base: &Figures, now: &Figures) -> BTreeMap<String, f64> {
        compare(base, now)
            .into_iter()
            .map(|v| (v.name, v.worse_by))
            .collect()
    }

    #[test]
    fn a_figure_more_than_ten_percent_worse_is_reported_either_way() {
        let mut base = Figures::new();
        base.insert("lat".into(), (1.0, Better::Lower));
        base.insert("rate".into(), (1000.0, Better::Higher));
        let mut now = Figures::new();
        now.insert("lat".into(), (1.11, Better::Lower));
        now.insert("rate".into(), (905.0, Better::Higher));
        now.insert("new".into(), (5.0, Better::Lower));
        let by = worse_by(&base, &now);
        assert!(by["lat"] > TOLERANCE && by["rate"] < TOLERANCE && by["new"] == 0.0);
        now.insert("rate".into(), (899.0, Better::Higher));
        now.insert("lat".into(), (0.5, Better::Lower));
        let by = worse_by(&base, &now);
        assert!(by["rate"] > TOLERANCE && by["lat"] < 0.0);
    }

    #[test]
    fn a_baseline_is_the_median_pass_and_a_check_the_best() {
        let pass = |lat: f64, rate: f64| {
            let mut f = Figures::new();
            f.insert("lat".into(), (lat, Better::Lower));
            f.insert("rate".into(), (rate, Better::Higher));
            f
        };
        let passes = [pass(3.0, 100.0), pass(1.0, 300.0), pass(2.0, 200.0)];
        let median = summarize(&passes, false);
        let best = summarize(&passes, true);
        assert_eq!((median["lat"].0, median["rate"].0), (2.0, 200.0));
        assert_eq!((best["lat"].0, best["rate"].0), (1.0, 300.0));
    }

    #[test]
    fn a_malformed_baseline_names_the_line() {
        let doc = format!("{MARKER}\n```text\na 1.0 lower\nb fast higher\n```\n");
        let e = parse_baseline(&doc).unwrap_err();
        assert!(e.contains("line 2") && e.contains("b fast higher"), "{e}");
        assert!(parse_baseline("nothing here").is_err());
    }
}
