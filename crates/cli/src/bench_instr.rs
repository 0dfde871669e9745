//! Instructions the server runs per one-task run, counted by valgrind's callgrind: the one
//! `bench check` figure that does not move with the machine or with its neighbours, so a
//! baseline recorded on one machine still judges the code on another.
//!
//! Two servers, each on a fresh database, run `small` and `large` runs (64 in flight); the
//! difference of their totals over the difference of the runs is the cost of a run, with the
//! start-up, the first connections and the shutdown taken out.

use crate::bench_gateway::{R, err, spawn_server_under, throughput, write_config};
use std::path::{Path, PathBuf};

/// Runs in flight while counting, as for `runs_64` in the timed passes.
const IN_FLIGHT: usize = 64;

/// `valgrind` on `PATH`, if it is there and runs.
pub fn find_valgrind() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let exe = std::env::split_paths(&path)
        .map(|d| d.join("valgrind"))
        .find(|p| p.is_file())?;
    let ok = std::process::Command::new(&exe)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(exe)
}

/// Thousands of instructions the server runs per one-task run (user space only: the kernel's
/// share — sockets, writes, `fsync` — is not counted).
pub async fn server_kinstr_per_run(valgrind: &Path, tmp: &Path, quick: bool) -> R<f64> {
    let (small, large) = if quick { (50, 250) } else { (100, 600) };
    let a = count(valgrind, &tmp.join("instr-small"), small).await?;
    let b = count(valgrind, &tmp.join("instr-large"), large).await?;
    per_run_kinstr(a, b, small, large)
}

/// The cost of one run from two totals: `(b − a) / (large − small)`, in thousands.
fn per_run_kinstr(a: u64, b: u64, small: usize, large: usize) -> R<f64> {
    if large <= small || b <= a {
        return Err(format!(
            "instruction counts do not grow with the runs ({a} for {small} runs, {b} for {large})"
        ));
    }
    Ok((b - a) as f64 / (large - small) as f64 / 1000.0)
}

/// Total instructions of one server process that ran `runs` runs, then stopped.
async fn count(valgrind: &Path, dir: &Path, runs: usize) -> R<u64> {
    let (config, _) = write_config(dir, smithers_store::Synchronous::Full)?;
    let out = dir.join("callgrind.out");
    let prefix = [
        valgrind.display().to_string(),
        "--quiet".into(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}", out.display()),
        "--".into(),
    ];
    let exe = std::env::current_exe().map_err(err)?;
    let server = spawn_server_under(&prefix, &exe, &config).await?;
    let t = throughput(server.addr, "one", runs, IN_FLIGHT).await;
    server.stop().await?;
    let t = t?;
    if t.completed != runs {
        return Err(format!(
            "under valgrind only {} of {runs} runs completed",
            t.completed
        ));
    }
    let text = std::fs::read_to_string(&out)
        .map_err(|e| format!("callgrind wrote no {}: {e}", out.display()))?;
    total_instructions(&text)
        .ok_or_else(|| format!("{} has no `summary:` or `totals:` line", out.display()))
}

/// The total of a callgrind output file: its `summary:` line, else its `totals:` line.
fn total_instructions(text: &str) -> Option<u64> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    field("summary:").or_else(|| field("totals:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_read_from_summary_or_totals() {
        let file = "version: 1\ncmd: smithers serve\nevents: Ir\nfn=(1) main\n3 7\nsummary: 579214 \ntotals: 1\n";
        assert_eq!(total_instructions(file), Some(579_214));
        assert_eq!(total_instructions("events: Ir\ntotals: 42\n"), Some(42));
        assert_eq!(total_instructions("events: Ir\nfn=(1) main\n"), None);
        assert_eq!(total_instructions("summary: many\n"), None);
    }

    #[test]
    fn a_run_costs_the_difference_over_the_extra_runs() {
        // 100 runs: 20 M of start-up and 58 M of runs; 600 runs: 20 M and 348 M
        let per = per_run_kinstr(78_000_000, 368_000_000, 100, 600).unwrap();
        assert!((per - 580.0).abs() < 1e-9, "{per}");
        assert!(per_run_kinstr(10, 10, 100, 600).is_err());
        assert!(per_run_kinstr(10, 20, 600, 600).is_err());
    }
}
