//! Read-only commands: `ps`, `inspect`, `frames`. The printing is split from the fetching so
//! that remote mode (`--url`, see `remote.rs`) prints the same lines from gateway data.

use crate::open_store;
use crate::progress::fmt_ms;
use serde_json::{Value, json};
use smithers_core::{Code, SmithersError};
use smithers_store::{AttemptRow, FrameRow, RunRow, status};

/// Prints lines to stdout. When stdout is a pipe whose reader went away
/// (`smithers ps | head -1`) the command ends quietly instead of panicking in `println!`.
pub fn emit<S: AsRef<str>>(lines: &[S]) -> Result<u8, SmithersError> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for l in lines {
        if let Err(e) = writeln!(out, "{}", l.as_ref()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(0);
            }
            return Err(SmithersError::new(
                Code::IoError,
                format!("cannot write to stdout: {e}"),
            ));
        }
    }
    Ok(0)
}

/// Checks a `--status` filter.
pub fn check_status(status_filter: Option<&str>) -> Result<(), SmithersError> {
    if let Some(s) = status_filter
        && !status::ALL.contains(&s)
    {
        return Err(SmithersError::new(
            Code::InvalidInput,
            format!(
                "--status `{s}` is not a run status; use one of: {}",
                status::ALL.join(", ")
            ),
        ));
    }
    Ok(())
}

pub async fn ps(db: &str, status_filter: Option<&str>, limit: usize) -> Result<u8, SmithersError> {
    check_status(status_filter)?;
    let store = open_store(db).await?;
    let runs = store.list_runs(status_filter, limit).await?;
    print_ps(&runs)
}

/// The `ps` table (or "no runs" on stderr).
pub fn print_ps(runs: &[RunRow]) -> Result<u8, SmithersError> {
    if runs.is_empty() {
        eprintln!("no runs");
        return Ok(0);
    }
    let mut lines = vec![format!(
        "{:<38} {:<24} {:<17} {:<21} {:>9}",
        "RUN ID", "WORKFLOW", "STATUS", "STARTED", "DURATION"
    )];
    let now = smithers_engine::now_ms();
    for r in runs {
        let started = r.started_at_ms.unwrap_or(r.created_at_ms);
        let end = r.finished_at_ms.unwrap_or(now);
        lines.push(format!(
            "{:<38} {:<24} {:<17} {:<21} {:>9}",
            r.run_id,
            truncate(&r.workflow_name, 24),
            r.status,
            fmt_ms(started),
            format!("{:.1}s", (end - started).max(0) as f64 / 1000.0)
        ));
    }
    emit(&lines)
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

fn parse(s: &Option<String>) -> Value {
    s.as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

pub async fn inspect(db: &str, run_id: &str, as_json: bool) -> Result<u8, SmithersError> {
    let store = open_store(db).await?;
    let run = store.get_run(run_id).await?.ok_or_else(|| {
        SmithersError::new(
            Code::RunNotFound,
            format!("run `{run_id}` not found; `smithers ps` lists runs"),
        )
    })?;
    let nodes = store.list_nodes(run_id).await?;
    let attempts = store.list_attempts(run_id).await?;
    let approvals = store.list_approvals(run_id).await?;
    let outputs = store.list_outputs(run_id).await?;
    if as_json {
        let doc = json!({
            "run": run,
            "nodes": nodes,
            "attempts": attempts,
            "approvals": approvals,
            "outputs": outputs.iter().map(|o| json!({"nodeId": o.node_id, "iteration": o.iteration, "output": serde_json::from_str::<Value>(&o.payload_json).unwrap_or(Value::Null)})).collect::<Vec<_>>(),
        });
        return emit(&[serde_json::to_string_pretty(&doc).unwrap_or_default()]);
    }
    let mut lines = run_lines(&run);
    lines.push("\nnodes:".into());
    for n in &nodes {
        lines.push(node_line(&n.node_id, n.iteration, &n.state, &attempts));
    }
    lines.extend(agent_lines(&attempts));
    if !approvals.is_empty() {
        lines.push("\napprovals:".into());
        for a in &approvals {
            lines.push(approval_line(
                &a.node_id,
                a.iteration,
                &a.status,
                a.decided_by.as_deref(),
                a.note.as_deref(),
            ));
        }
    }
    if !outputs.is_empty() {
        lines.push("\noutputs:".into());
        for o in &outputs {
            let mut text = o.payload_json.clone();
            if text.len() > 200 {
                text = format!(
                    "{}… ({} bytes)",
                    text.chars().take(200).collect::<String>(),
                    o.payload_json.len()
                );
            }
            lines.push(format!(
                "  {:<24} iter {:<3} {text}",
                o.node_id, o.iteration
            ));
        }
    }
    emit(&lines)
}

/// The head of `inspect`: run id, workflow, status, times, owner, error.
pub fn run_lines(run: &RunRow) -> Vec<String> {
    let mut lines = vec![
        format!("run       {}", run.run_id),
        format!(
            "workflow  {}{}",
            run.workflow_name,
            run.workflow_path
                .as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default()
        ),
        format!("status    {}", run.status),
    ];
    if let Some(p) = &run.parent_run_id {
        lines.push(format!("parent    {p}"));
    }
    lines.push(format!("created   {}", fmt_ms(run.created_at_ms)));
    if let Some(f) = run.finished_at_ms {
        lines.push(format!("finished  {}", fmt_ms(f)));
    }
    if let Some(o) = &run.runtime_owner_id {
        lines.push(format!(
            "owner     {o} (heartbeat {})",
            run.heartbeat_at_ms
                .map(fmt_ms)
                .unwrap_or_else(|| "never".into())
        ));
    }
    let err = parse(&run.error_json);
    if !err.is_null() {
        lines.push(format!(
            "error     [{}] {}",
            err["code"].as_str().unwrap_or("?"),
            err["message"].as_str().unwrap_or("")
        ));
    }
    lines
}

/// One node of `inspect`: state, number of attempts, last duration and last error.
pub fn node_line(node_id: &str, iteration: i64, state: &str, attempts: &[AttemptRow]) -> String {
    let tries: Vec<_> = attempts
        .iter()
        .filter(|a| a.node_id == node_id && a.iteration == iteration)
        .collect();
    let last = tries.iter().max_by_key(|a| a.attempt);
    let dur = last
        .and_then(|a| {
            a.finished_at_ms
                .map(|f| format!(" {}ms", f - a.started_at_ms))
        })
        .unwrap_or_default();
    let e = last.map(|a| parse(&a.error_json)).unwrap_or(Value::Null);
    let why = e["message"]
        .as_str()
        .map(|m| format!(" — {m}"))
        .unwrap_or_default();
    format!(
        "  {:<24} iter {:<3} {:<17} attempts {}{dur}{why}",
        node_id,
        iteration,
        state,
        tries.len()
    )
}

/// The `agents:` section of `inspect`: one line per agent attempt with its engine, repair
/// turns, tokens and cost (when the agent reported them). Empty when the run called no agent.
pub fn agent_lines(attempts: &[AttemptRow]) -> Vec<String> {
    let mut lines = Vec::new();
    for a in attempts {
        let m = parse(&a.meta_json);
        if m["kind"] != "agent" {
            continue;
        }
        if lines.is_empty() {
            lines.push("\nagents:".to_string());
        }
        let engine = m["agentEngine"].as_str().unwrap_or("?");
        let mut line = format!(
            "  {:<24} iter {:<3} attempt {:<3} {engine} `{}`",
            a.node_id,
            a.iteration,
            a.attempt,
            m["agentId"].as_str().unwrap_or("?")
        );
        if let Some(model) = m["agentModel"].as_str() {
            line.push_str(&format!(" ({model})"));
        }
        let u = &m["usage"];
        if u.is_object() {
            let n = |k: &str| u[k].as_u64();
            line.push_str(&format!(
                " tokens in {} out {}",
                n("inputTokens").unwrap_or(0),
                n("outputTokens").unwrap_or(0)
            ));
            for (k, label) in [
                ("cacheReadTokens", "cache-read"),
                ("cacheWriteTokens", "cache-write"),
                ("reasoningTokens", "reasoning"),
            ] {
                if let Some(v) = n(k) {
                    line.push_str(&format!(" {label} {v}"));
                }
            }
            if let Some(c) = u["costUsd"].as_f64() {
                line.push_str(&format!(" ${c:.4}"));
            }
        } else {
            line.push_str(" tokens not reported");
        }
        match m["repairTurns"].as_u64() {
            Some(1) => line.push_str(", 1 repair turn"),
            Some(n) if n > 1 => line.push_str(&format!(", {n} repair turns")),
            _ => {}
        }
        lines.push(line);
    }
    lines
}

/// One approval of `inspect`.
pub fn approval_line(
    node_id: &str,
    iteration: i64,
    status: &str,
    decided_by: Option<&str>,
    note: Option<&str>,
) -> String {
    let by = decided_by.map(|b| format!(" by {b}")).unwrap_or_default();
    format!(
        "  {:<24} iter {:<3} {status}{by}{}",
        node_id,
        iteration,
        note.map(|n| format!(": {n}")).unwrap_or_default()
    )
}

pub async fn frames(
    db: &str,
    run_id: &str,
    frame: Option<i64>,
    limit: usize,
) -> Result<u8, SmithersError> {
    let store = open_store(db).await?;
    if store.get_run(run_id).await?.is_none() {
        return Err(SmithersError::new(
            Code::RunNotFound,
            format!("run `{run_id}` not found; `smithers ps` lists runs"),
        ));
    }
    if let Some(n) = frame {
        let f = smithers_engine::frames::read_frame(store.as_ref(), run_id, n)
            .await?
            .ok_or_else(|| {
                SmithersError::new(
                    Code::NodeNotFound,
                    format!("run `{run_id}` has no frame {n}"),
                )
            })?;
        return print_frame(&f);
    }
    let rows = store.list_frames(run_id, 0, limit).await?;
    print_frame_list(&rows)
}

/// `frames --frame N`: one frame with its tree, as JSON.
pub fn print_frame(f: &FrameRow) -> Result<u8, SmithersError> {
    let tree: Value = serde_json::from_str(&f.xml_json).unwrap_or(Value::Null);
    emit(&[serde_json::to_string_pretty(&json!({"frameNo": f.frame_no, "createdAtMs": f.created_at_ms, "xmlHash": f.xml_hash, "encoding": f.encoding, "tree": tree})).unwrap_or_default()])
}

/// `frames`: the frame table.
pub fn print_frame_list(rows: &[FrameRow]) -> Result<u8, SmithersError> {
    let mut lines = vec![format!(
        "{:>6}  {:<21} {:<9} {}",
        "FRAME", "CREATED", "ENCODING", "HASH"
    )];
    for f in rows {
        lines.push(format!(
            "{:>6}  {:<21} {:<9} {}",
            f.frame_no,
            fmt_ms(f.created_at_ms),
            f.encoding,
            f.xml_hash.get(..16).unwrap_or(&f.xml_hash)
        ));
    }
    emit(&lines)
}
