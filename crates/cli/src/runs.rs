//! Read-only commands: `ps`, `inspect`, `frames`.

use crate::open_store;
use crate::progress::fmt_ms;
use serde_json::{Value, json};
use smithers_core::{Code, SmithersError};
use smithers_store::status;

/// Prints a line to stdout. When stdout is a pipe whose reader went away
/// (`smithers ps | head -1`) the command ends quietly instead of panicking in `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(0);
            }
            return Err(SmithersError::new(
                Code::Internal,
                format!("cannot write to stdout: {e}"),
            ));
        }
    }};
}

pub async fn ps(db: &str, status_filter: Option<&str>, limit: usize) -> Result<u8, SmithersError> {
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
    let store = open_store(db).await?;
    let runs = store.list_runs(status_filter, limit).await?;
    if runs.is_empty() {
        eprintln!("no runs");
        return Ok(0);
    }
    out!(
        "{:<38} {:<24} {:<17} {:<21} {:>9}",
        "RUN ID",
        "WORKFLOW",
        "STATUS",
        "STARTED",
        "DURATION"
    );
    let now = smithers_engine::now_ms();
    for r in runs {
        let started = r.started_at_ms.unwrap_or(r.created_at_ms);
        let end = r.finished_at_ms.unwrap_or(now);
        out!(
            "{:<38} {:<24} {:<17} {:<21} {:>9}",
            r.run_id,
            truncate(&r.workflow_name, 24),
            r.status,
            fmt_ms(started),
            format!("{:.1}s", (end - started).max(0) as f64 / 1000.0)
        );
    }
    Ok(0)
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
        out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Ok(0);
    }
    out!("run       {}", run.run_id);
    out!(
        "workflow  {}{}",
        run.workflow_name,
        run.workflow_path
            .as_deref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default()
    );
    out!("status    {}", run.status);
    if let Some(p) = &run.parent_run_id {
        out!("parent    {p}");
    }
    out!("created   {}", fmt_ms(run.created_at_ms));
    if let Some(f) = run.finished_at_ms {
        out!("finished  {}", fmt_ms(f));
    }
    if let Some(o) = &run.runtime_owner_id {
        out!(
            "owner     {o} (heartbeat {})",
            run.heartbeat_at_ms
                .map(fmt_ms)
                .unwrap_or_else(|| "never".into())
        );
    }
    let err = parse(&run.error_json);
    if !err.is_null() {
        out!(
            "error     [{}] {}",
            err["code"].as_str().unwrap_or("?"),
            err["message"].as_str().unwrap_or("")
        );
    }
    out!("\nnodes:");
    for n in &nodes {
        let tries: Vec<_> = attempts
            .iter()
            .filter(|a| a.node_id == n.node_id && a.iteration == n.iteration)
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
        out!(
            "  {:<24} iter {:<3} {:<17} attempts {}{dur}{why}",
            n.node_id,
            n.iteration,
            n.state,
            tries.len()
        );
    }
    if !approvals.is_empty() {
        out!("\napprovals:");
        for a in &approvals {
            let by = a
                .decided_by
                .as_deref()
                .map(|b| format!(" by {b}"))
                .unwrap_or_default();
            out!(
                "  {:<24} iter {:<3} {}{by}{}",
                a.node_id,
                a.iteration,
                a.status,
                a.note
                    .as_deref()
                    .map(|n| format!(": {n}"))
                    .unwrap_or_default()
            );
        }
    }
    if !outputs.is_empty() {
        out!("\noutputs:");
        for o in &outputs {
            let mut text = o.payload_json.clone();
            if text.len() > 200 {
                text = format!(
                    "{}… ({} bytes)",
                    text.chars().take(200).collect::<String>(),
                    o.payload_json.len()
                );
            }
            out!("  {:<24} iter {:<3} {text}", o.node_id, o.iteration);
        }
    }
    Ok(0)
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
        let tree: Value = serde_json::from_str(&f.xml_json).unwrap_or(Value::Null);
        out!("{}", serde_json::to_string_pretty(&json!({"frameNo": f.frame_no, "createdAtMs": f.created_at_ms, "xmlHash": f.xml_hash, "encoding": f.encoding, "tree": tree})).unwrap_or_default());
        return Ok(0);
    }
    let rows = store.list_frames(run_id, 0, limit).await?;
    out!(
        "{:>6}  {:<21} {:<9} {}",
        "FRAME",
        "CREATED",
        "ENCODING",
        "HASH"
    );
    for f in rows {
        out!(
            "{:>6}  {:<21} {:<9} {}",
            f.frame_no,
            fmt_ms(f.created_at_ms),
            f.encoding,
            &f.xml_hash[..f.xml_hash.len().min(16)]
        );
    }
    Ok(0)
}
