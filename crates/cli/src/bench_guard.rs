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
//!
//! Timed figures only judge code on a machine like the one that recorded them. Each pass also
//! times a fixed piece of work (`machine.calibration_ms`, never judged itself); when this
//! machine is more than [`MACHINE_TOLERANCE`] faster or slower than the baseline's, the timed
//! figures are shown but not judged. The instructions the server runs per run
//! (`runs_64.server_kinstr`, counted once by callgrind when valgrind is found) do not depend
//! on the machine and are judged everywhere.

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

/// How far this machine's calibration may be from the baseline's before timed figures are
/// no longer judged: past it, a figure's change says more about the machine than the code.
pub const MACHINE_TOLERANCE: f64 = 0.25;

/// The calibration figure: ms for a fixed piece of work (`bench_machine`).
pub const CALIBRATION: &str = "machine.calibration_ms";

/// The instruction figure: thousands of server instructions per run (`bench_instr`).
pub const SERVER_KINSTR: &str = "runs_64.server_kinstr";

/// What a figure says and so when it is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The machine's speed: context for the timed figures, never a regression.
    Machine,
    /// A count that does not depend on the machine: always judged.
    Count,
    /// Time or rate: judged only on a machine like the baseline's.
    Timed,
}

/// The kind of the figure called `name`.
pub fn kind(name: &str) -> Kind {
    if name.starts_with("machine.") {
        Kind::Machine
    } else if name.ends_with("_kinstr") {
        Kind::Count
    } else {
        Kind::Timed
    }
}

/// This machine's calibration over the baseline's (2.0: twice as slow), when both have one.
pub fn machine_ratio(base: &Figures, now: &Figures) -> Option<f64> {
    let (b, _) = base.get(CALIBRATION)?;
    let (n, _) = now.get(CALIBRATION)?;
    (*b > 0.0 && *n > 0.0).then(|| n / b)
}

/// Whether timed figures can be judged against `base`: the machines' speeds are within
/// [`MACHINE_TOLERANCE`], or the baseline has no calibration to tell.
pub fn timed_comparable(base: &Figures, now: &Figures) -> bool {
    machine_ratio(base, now).is_none_or(|r| (r - 1.0).abs() <= MACHINE_TOLERANCE)
}

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
    /// Whether this row counts: it has a baseline, is not the machine's speed, and is not a
    /// timed figure from a machine unlike the baseline's.
    pub judged: bool,
}

impl Verdict {
    /// Judged and more than [`TOLERANCE`] worse.
    pub fn fails(&self) -> bool {
        self.judged && self.worse_by > TOLERANCE
    }
}

/// Compares `now` with `base`; a figure without a baseline is listed but never fails.
pub fn compare(base: &Figures, now: &Figures) -> Vec<Verdict> {
    let timed = timed_comparable(base, now);
    now.iter()
        .map(|(name, &(v, d))| {
            let b = base.get(name).map(|(b, _)| *b);
            let judged = b.is_some()
                && match kind(name) {
                    Kind::Machine => false,
                    Kind::Count => true,
                    Kind::Timed => timed,
                };
            Verdict {
                name: name.clone(),
                base: b,
                now: v,
                worse_by: b.map(|b| d.worse_by(b, v)).unwrap_or(0.0),
                judged,
            }
        })
        .collect()
}

fn put(f: &mut Figures, name: &str, v: f64, d: Better) {
    f.insert(name.to_string(), (v, d));
}

/// The passes' figures in one: each figure's best value (`best`), or its median (a recorded
/// baseline is typical, a check is the best the code did, so noise alone rarely fails it
/// while a real slowdown shows in every pass). The machine's calibration is always its best.
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
            // the machine's speed is what it can do: a slow pass is a busy moment, not the
            // machine, so its best pass counts in a recording too
            let v = if best || kind(name) == Kind::Machine {
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
    let calibration = tokio::task::spawn_blocking(crate::bench_machine::calibration_ms)
        .await
        .map_err(err)?;
    put(f, CALIBRATION, calibration, Better::Lower);
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
    // one count: it does not change from pass to pass
    let mut kinstr = None;
    if result.is_ok() {
        match crate::bench_instr::find_valgrind() {
            Some(valgrind) => {
                println!("server instructions per run, under callgrind …");
                match crate::bench_instr::server_kinstr_per_run(&valgrind, &tmp, quick).await {
                    Ok(k) => kinstr = Some(k),
                    Err(e) => result = Err(format!("counting instructions: {e}")),
                }
            }
            None => println!(
                "note: no instruction count this time (valgrind not found; Debian package `valgrind`)"
            ),
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    result.map_err(fail)?;
    let mut now = summarize(&runs, !record);
    if let Some(k) = kinstr {
        put(&mut now, SERVER_KINSTR, k, Better::Lower);
    }
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
        let flag = if v.fails() {
            worse += 1;
            "WORSE"
        } else if v.base.is_some() && !v.judged && kind(&v.name) == Kind::Timed {
            "(not judged)"
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
    if let Some(r) = machine_ratio(&base, &now) {
        let (how, by) = if r >= 1.0 {
            ("slower", r)
        } else {
            ("faster", 1.0 / r)
        };
        println!("\nthis machine ran the calibration work {by:.2}× {how} than the baseline's");
        if !timed_comparable(&base, &now) {
            println!(
                "so the timed figures are shown but not judged (more than {:.0} % apart); only \
                 the instruction count is. To judge them here, record a baseline on this \
                 machine first: `smithers bench check --record` on the code before the change.",
                MACHINE_TOLERANCE * 100.0
            );
        }
    }
    if kinstr.is_none() && base.contains_key(SERVER_KINSTR) {
        println!("the instruction count was not measured, so it was not judged");
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
        let mut passes = [pass(3.0, 100.0), pass(1.0, 300.0), pass(2.0, 200.0)];
        for (p, calib) in passes.iter_mut().zip([7.5, 4.6, 4.7]) {
            p.insert(CALIBRATION.into(), (calib, Better::Lower));
        }
        let median = summarize(&passes, false);
        let best = summarize(&passes, true);
        assert_eq!((median["lat"].0, median["rate"].0), (2.0, 200.0));
        assert_eq!((best["lat"].0, best["rate"].0), (1.0, 300.0));
        assert_eq!((median[CALIBRATION].0, best[CALIBRATION].0), (4.6, 4.6));
    }

    #[test]
    fn on_a_machine_unlike_the_baselines_only_counts_are_judged() {
        let figs = |calib: f64, lat: f64, kinstr: f64| {
            let mut f = Figures::new();
            f.insert(CALIBRATION.into(), (calib, Better::Lower));
            f.insert("create_1.p50_ms".into(), (lat, Better::Lower));
            f.insert(SERVER_KINSTR.into(), (kinstr, Better::Lower));
            f
        };
        let base = figs(10.0, 1.0, 580.0);
        let fails = |now: &Figures| -> Vec<String> {
            compare(&base, now)
                .into_iter()
                .filter(|v| v.fails())
                .map(|v| v.name)
                .collect()
        };
        // same machine (within 25 %): a slower latency and more instructions both fail; a
        // slower calibration alone never does
        assert_eq!(
            fails(&figs(12.4, 1.2, 650.0)),
            ["create_1.p50_ms", SERVER_KINSTR]
        );
        assert!(fails(&figs(12.4, 1.0, 580.0)).is_empty());
        // a machine 2.7× slower: three times the latency is not judged, the count still is
        let slow = figs(27.0, 3.0, 580.0);
        assert!(!timed_comparable(&base, &slow));
        assert!(fails(&slow).is_empty());
        assert_eq!(fails(&figs(27.0, 3.0, 700.0)), [SERVER_KINSTR]);
        // and so on a much faster one
        assert_eq!(fails(&figs(4.0, 1.5, 580.0)), Vec::<String>::new());
        // a baseline without a calibration judges every figure, as before
        let mut old = base.clone();
        old.remove(CALIBRATION);
        assert!(timed_comparable(&old, &slow));
        assert_eq!(
            compare(&old, &slow)
                .into_iter()
                .filter(|v| v.fails())
                .count(),
            1
        );
        assert_eq!(kind(CALIBRATION), Kind::Machine);
        assert_eq!(kind("runs_64.per_s"), Kind::Timed);
    }

    #[test]
    fn a_malformed_baseline_names_the_line() {
        let doc = format!("{MARKER}\n```text\na 1.0 lower\nb fast higher\n```\n");
        let e = parse_baseline(&doc).unwrap_err();
        assert!(e.contains("line 2") && e.contains("b fast higher"), "{e}");
        assert!(parse_baseline("nothing here").is_err());
    }
}
