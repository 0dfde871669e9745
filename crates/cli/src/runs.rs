//! Read-only commands: `ps`, `inspect`, `frames`. The printing is split from the fetching so
//! that remote mode (`--url`, see `remote.rs`) prints the same lines from gateway data.

use crate::open_store;
use crate::progress::fmt_ms;
use serde_json::{Value, json};
use smithers_core::{Code, SmithersError};
use smithers_engine::frames::changes::NodeChange;
use smithers_store::{AttemptRow, FrameRow, RunRow, status};
use std::collections::HashMap;

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

/// Prints one pretty JSON document (the `--json` forms).
pub fn emit_json(doc: &Value) -> Result<u8, SmithersError> {
    let text = serde_json::to_string_pretty(doc).map_err(|e| {
        SmithersError::new(
            Code::Internal,
            format!("cannot encode the JSON output: {e}"),
        )
    })?;
    emit(&[text])
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

pub async fn ps(
    db: &str,
    status_filter: Option<&str>,
    limit: usize,
    as_json: bool,
) -> Result<u8, SmithersError> {
    check_status(status_filter)?;
    let store = open_store(db).await?;
    let runs = store.list_runs(status_filter, limit).await?;
    if as_json {
        // the gateway's `runs.list` rows; locally no workflow is served, so `workflowKey` is
        // the key a gateway created the run under, else null
        let rows: Vec<Value> = runs
            .iter()
            .map(|r| {
                let key = smithers_gateway::shapes::workflow_key(r, &|_| None);
                smithers_gateway::shapes::run_json(r, key)
            })
            .collect();
        return emit_json(&json!({ "runs": rows }));
    }
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
    let tree_pos = match store.last_frame_no(run_id).await? {
        0 => HashMap::new(),
        n => smithers_engine::frames::read_frame(store.as_ref(), run_id, n)
            .await?
            .and_then(|f| serde_json::from_str::<Value>(&f.xml_json).ok())
            .map(|t| tree_order(&t))
            .unwrap_or_default(),
    };
    let states: Vec<(&str, i64, &str)> = nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.iteration, n.state.as_str()))
        .collect();
    lines.extend(node_lines(
        &states,
        &attempts,
        &tree_pos,
        smithers_engine::now_ms(),
    ));
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

/// Position of each node id in the workflow tree (depth first), from a frame's tree JSON: the
/// order `inspect` lists nodes that have not started yet.
pub fn tree_order(tree: &Value) -> HashMap<String, usize> {
    fn walk(el: &Value, out: &mut HashMap<String, usize>) {
        if let Some(id) = el.pointer("/props/id").and_then(Value::as_str) {
            // ids inside loops may carry their iteration (`id::2`)
            let id = match id.rsplit_once("::") {
                Some((base, it)) if it.bytes().all(|b| b.is_ascii_digit()) => base,
                _ => id,
            };
            let next = out.len();
            out.entry(id.to_string()).or_insert(next);
        }
        for c in el
            .get("children")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            walk(c, out);
        }
    }
    let mut out = HashMap::new();
    walk(tree, &mut out);
    out
}

/// The `nodes:` lines of `inspect` in run order: nodes that started, by their first attempt's
/// start, then the others in tree order (`tree_pos`, see [`tree_order`]); each followed by
/// what it waits for or why its wait ended (see [`wait_lines`]). `nodes` are
/// `(node id, iteration, state)`.
pub fn node_lines(
    nodes: &[(&str, i64, &str)],
    attempts: &[AttemptRow],
    tree_pos: &HashMap<String, usize>,
    now_ms: i64,
) -> Vec<String> {
    let mut first_start: HashMap<(&str, i64), i64> = HashMap::new();
    for a in attempts {
        let e = first_start
            .entry((a.node_id.as_str(), a.iteration))
            .or_insert(a.started_at_ms);
        *e = (*e).min(a.started_at_ms);
    }
    let mut order: Vec<&(&str, i64, &str)> = nodes.iter().collect();
    order.sort_by_key(|(id, it, _)| {
        let started = first_start.get(&(*id, *it)).copied();
        (
            started.is_none(),
            started.unwrap_or(0),
            tree_pos.get(*id).copied().unwrap_or(usize::MAX),
            *it,
            *id,
        )
    });
    let mut lines = Vec::new();
    for (id, it, state) in order {
        lines.push(node_line(id, *it, state, attempts));
        let last = attempts
            .iter()
            .filter(|a| a.node_id == *id && a.iteration == *it)
            .max_by_key(|a| a.attempt);
        if let Some(a) = last {
            lines.extend(
                wait_lines(a, now_ms)
                    .into_iter()
                    .map(|l| format!("      {l}")),
            );
        }
    }
    lines
}

/// `4m12s`, `2h5m`, `3d4h`: a span for "in …" and "… ago".
pub fn span(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// `2026-12-04T13:13:00Z (in 4m12s)` or `… (3s ago)`.
fn when(at_ms: i64, now_ms: i64) -> String {
    if at_ms >= now_ms {
        format!("{} (in {})", fmt_ms(at_ms), span(at_ms - now_ms))
    } else {
        format!("{} ({} ago)", fmt_ms(at_ms), span(now_ms - at_ms))
    }
}

/// What a waiting attempt waits for, or why its wait ended, from its metadata: a timer's due
/// time; the signal a wait-for-event waits for (and its deadline), the signal that resolved it
/// (name, seq, received time) or its timeout.
pub fn wait_lines(a: &AttemptRow, now_ms: i64) -> Vec<String> {
    let m = parse(&a.meta_json);
    let mut out = Vec::new();
    let t = &m["timer"];
    if let (Some(due), true) = (t["firesAtMs"].as_i64(), t["firedAtMs"].is_null())
        && a.state == smithers_store::node_state::WAITING_TIMER
    {
        out.push(format!("timer due {}", when(due, now_ms)));
    }
    let w = &m["waitForEvent"];
    if !w.is_object() {
        return out;
    }
    let event = w["signalName"].as_str().unwrap_or("?");
    let corr = w["correlationId"]
        .as_str()
        .map(|c| format!(" (correlation {c})"))
        .unwrap_or_default();
    if let Some(seq) = w["resolvedSignalSeq"].as_i64() {
        let received = w["receivedAtMs"]
            .as_i64()
            .map(|r| format!(", received {}", fmt_ms(r)))
            .unwrap_or_default();
        out.push(format!(
            "wait ended by signal `{event}`{corr} seq {seq}{received}"
        ));
    } else if let Some(at) = w["timedOutAtMs"].as_i64() {
        let after = w["timeoutMs"]
            .as_i64()
            .map(|t| format!(" after {}", span(t)))
            .unwrap_or_default();
        let then = w["onTimeout"]
            .as_str()
            .map(|o| format!(" (on_timeout: {o})"))
            .unwrap_or_default();
        out.push(format!(
            "wait timed out at {}{after} with no `{event}` signal{corr}{then}",
            fmt_ms(at)
        ));
    } else if a.state == smithers_store::node_state::WAITING_EVENT {
        let mut line = format!("waiting for signal `{event}`{corr}");
        if let Some(s) = w["startedAtMs"].as_i64() {
            line.push_str(&format!(" since {}", fmt_ms(s)));
        }
        if let (Some(s), Some(t)) = (w["startedAtMs"].as_i64(), w["timeoutMs"].as_i64()) {
            line.push_str(&format!("; times out {}", when(s + t, now_ms)));
        }
        out.push(line);
    }
    out
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
    as_json: bool,
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
    let nos: Vec<i64> = rows.iter().map(|r| r.frame_no).collect();
    let mut changes =
        smithers_engine::frames::changes::for_frames(store.as_ref(), run_id, &nos).await?;
    let listed: Vec<(FrameRow, Option<Vec<NodeChange>>)> = rows
        .into_iter()
        .map(|r| {
            let c = changes.remove(&r.frame_no);
            (r, c)
        })
        .collect();
    print_frame_list(&listed, as_json)
}

/// `frames --frame N`: one frame with its tree, as JSON.
pub fn print_frame(f: &FrameRow) -> Result<u8, SmithersError> {
    let tree: Value = serde_json::from_str(&f.xml_json).unwrap_or(Value::Null);
    emit(&[serde_json::to_string_pretty(&json!({"frameNo": f.frame_no, "createdAtMs": f.created_at_ms, "xmlHash": f.xml_hash, "encoding": f.encoding, "tree": tree})).unwrap_or_default()])
}

/// `frames`: the frame table, each frame with its node state changes since the frame before
/// it (`?` when they are unknown: a frame without a readable snapshot, or a gateway that does
/// not send them); or with `as_json`, `{"frames": [{frameNo, createdAtMs, xmlHash, encoding,
/// nodeChanges, summary}]}`.
pub fn print_frame_list(
    rows: &[(FrameRow, Option<Vec<NodeChange>>)],
    as_json: bool,
) -> Result<u8, SmithersError> {
    let summary = |c: &Option<Vec<NodeChange>>| c.as_deref().map(crate::frame_changes::summary);
    if as_json {
        let frames: Vec<Value> = rows
            .iter()
            .map(|(f, c)| {
                json!({
                    "frameNo": f.frame_no,
                    "createdAtMs": f.created_at_ms,
                    "xmlHash": f.xml_hash,
                    "encoding": f.encoding,
                    "nodeChanges": c,
                    "summary": summary(c),
                })
            })
            .collect();
        return emit_json(&json!({ "frames": frames }));
    }
    let mut lines = vec![format!(
        "{:>6}  {:<21} {:<9} {:<16}  {}",
        "FRAME", "CREATED", "ENCODING", "HASH", "CHANGES"
    )];
    for (f, c) in rows {
        let changes = match summary(c) {
            None => "?".to_string(),
            Some(s) if s.is_empty() => "-".to_string(),
            Some(s) => s,
        };
        lines.push(format!(
            "{:>6}  {:<21} {:<9} {:<16}  {changes}",
            f.frame_no,
            fmt_ms(f.created_at_ms),
            f.encoding,
            f.xml_hash.get(..16).unwrap_or(&f.xml_hash)
        ));
    }
    emit(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(node: &str, started: i64, state: &str, meta: Value) -> AttemptRow {
        AttemptRow {
            run_id: "r".into(),
            node_id: node.into(),
            iteration: 0,
            attempt: 1,
            state: state.into(),
            started_at_ms: started,
            finished_at_ms: None,
            heartbeat_at_ms: None,
            heartbeat_data_json: None,
            error_json: None,
            jj_pointer: None,
            response_text: None,
            jj_cwd: None,
            cached: false,
            meta_json: Some(meta.to_string()),
        }
    }

    #[test]
    fn spans() {
        assert_eq!(span(-5), "0s");
        assert_eq!(span(59_999), "59s");
        assert_eq!(span(252_000), "4m12s");
        assert_eq!(span(7_500_000), "2h5m");
        assert_eq!(span(273_600_000), "3d4h");
    }

    #[test]
    fn nodes_in_run_order_then_tree_order() {
        let tree = json!({"tag": "smithers:workflow", "props": {"name": "w"}, "children": [
            {"tag": "smithers:sequence", "props": {}, "children": [
                {"tag": "smithers:task", "props": {"id": "c"}, "children": []},
                {"tag": "smithers:ralph", "props": {"id": "loop"}, "children": [
                    {"tag": "smithers:task", "props": {"id": "b::1"}, "children": []}]},
                {"tag": "smithers:timer", "props": {"id": "a"}, "children": []},
                {"tag": "smithers:task", "props": {"id": "z"}, "children": []},
                {"tag": "smithers:task", "props": {"id": "y"}, "children": []}]}]});
        let pos = tree_order(&tree);
        assert!(pos["c"] < pos["b"] && pos["b"] < pos["a"] && pos["a"] < pos["z"]);
        let attempts = [
            attempt(
                "a",
                50,
                "waiting-timer",
                json!({"timer": {"firesAtMs": 252_100}}),
            ),
            attempt("c", 10, "finished", json!({})),
            attempt("b", 50, "finished", json!({})),
        ];
        let nodes = [
            ("a", 0, "waiting-timer"),
            ("b", 0, "finished"),
            ("c", 0, "finished"),
            ("y", 0, "pending"),
            ("z", 0, "pending"),
        ];
        let lines = node_lines(&nodes, &attempts, &pos, 100);
        let ids: Vec<&str> = lines
            .iter()
            .filter(|l| !l.starts_with("      "))
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect();
        // c started first; a and b in the same millisecond, b first in the tree; z before y in
        // the tree
        assert_eq!(ids, ["c", "b", "a", "z", "y"]);
        assert_eq!(
            lines[3], "      timer due 1970-01-01T00:04:12Z (in 4m12s)",
            "{lines:?}"
        );
    }

    #[test]
    fn why_a_wait_ended() {
        let signal = attempt(
            "w",
            0,
            "finished",
            json!({"waitForEvent": {"signalName": "ci", "resolvedSignalSeq": 4, "receivedAtMs": 1000}}),
        );
        assert_eq!(
            wait_lines(&signal, 0),
            ["wait ended by signal `ci` seq 4, received 1970-01-01T00:00:01Z"]
        );
        let timeout = attempt(
            "w",
            0,
            "failed",
            json!({"waitForEvent": {"signalName": "ci", "correlationId": "x", "timeoutMs": 90_000,
                "onTimeout": "fail", "timedOutAtMs": 90_000}}),
        );
        assert_eq!(
            wait_lines(&timeout, 0),
            [
                "wait timed out at 1970-01-01T00:01:30Z after 1m30s with no `ci` signal (correlation x) (on_timeout: fail)"
            ]
        );
        let waiting = attempt(
            "w",
            0,
            "waiting-event",
            json!({"waitForEvent": {"signalName": "ci", "startedAtMs": 0}}),
        );
        assert_eq!(
            wait_lines(&waiting, 5000),
            ["waiting for signal `ci` since 1970-01-01T00:00:00Z"]
        );
        // a fired timer and plain tasks say nothing more
        let fired = attempt(
            "t",
            0,
            "finished",
            json!({"timer": {"firesAtMs": 5, "firedAtMs": 6}}),
        );
        assert!(wait_lines(&fired, 0).is_empty());
        assert!(wait_lines(&attempt("t", 0, "finished", json!({"kind": "run"})), 0).is_empty());
    }
}
