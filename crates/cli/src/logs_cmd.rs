//! `smithers logs RUN [--node ID] [--follow]`: a run's task output in the order it was written,
//! read from the run's durable event log (locally), or from `runs.events` and the WebSocket
//! (with `--url`). With `--node` the text is written as the task wrote it; without, each line
//! is prefixed with its node (`build | compiling…`).

use crate::follow::Conn;
use crate::progress::OutputLines;
use crate::remote::{Gateway, RemoteError};
use serde_json::{Value, json};
use smithers_core::{Code, SmithersError};
use std::io::Write as _;
use std::time::Duration;

/// How often a followed local run's log is read again.
const POLL: Duration = Duration::from_millis(200);
/// Log entries read per page.
const PAGE: usize = 1000;

/// Where the output goes: raw for one node, prefixed lines for all.
struct Sink {
    node: Option<String>,
    lines: OutputLines,
}

impl Sink {
    fn new(node: Option<&str>) -> Sink {
        Sink {
            node: node.map(str::to_string),
            lines: OutputLines::default(),
        }
    }

    /// One event in engine terms (`NodeOutput` with `text`, or the end of a node).
    fn on(&mut self, kind: &str, p: &Value) -> Result<(), SmithersError> {
        let id = p.get("nodeId").and_then(Value::as_str).unwrap_or("");
        if self.node.as_deref().is_some_and(|n| n != id) {
            return Ok(());
        }
        let it = p.get("iteration").and_then(Value::as_i64).unwrap_or(0);
        let label = if it > 0 {
            format!("{id}[{it}]")
        } else {
            id.to_string()
        };
        match kind {
            "NodeOutput" => {
                let text = p.get("text").and_then(Value::as_str).unwrap_or("");
                if self.node.is_some() {
                    return write(text.as_bytes());
                }
                let stream = p.get("stream").and_then(Value::as_str).unwrap_or("");
                for l in self.lines.push(&label, stream, text) {
                    write(format!("{label} | {l}\n").as_bytes())?;
                }
            }
            "NodeFinished" | "NodeFailed" | "NodeCancelled" | "NodeRetrying" => {
                for l in self.lines.flush(&label) {
                    write(format!("{label} | {l}\n").as_bytes())?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn done(&mut self) -> Result<u8, SmithersError> {
        for (label, l) in self.lines.flush_all() {
            write(format!("{label} | {l}\n").as_bytes())?;
        }
        Ok(0)
    }
}

/// Writes to stdout; a reader that went away (`| head`) ends the command quietly.
fn write(bytes: &[u8]) -> Result<(), SmithersError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(SmithersError::new(
            Code::IoError,
            format!("cannot write to stdout: {e}"),
        )),
    }
}

/// `smithers logs` on a database.
pub async fn local(
    db: &str,
    run_id: &str,
    node: Option<&str>,
    follow: bool,
) -> Result<u8, SmithersError> {
    let store = crate::open_store(db).await?;
    let mut stop = crate::up::watch_term()?;
    let mut sink = Sink::new(node);
    let mut after: Option<i64> = None;
    loop {
        // read the status first: once it has ended, the log read next holds every event
        let run = store.get_run(run_id).await?.ok_or_else(|| {
            SmithersError::new(
                Code::RunNotFound,
                format!("run `{run_id}` not found; `smithers ps` lists runs"),
            )
        })?;
        loop {
            let rows = store.list_events(run_id, after, PAGE).await?;
            for r in &rows {
                let p: Value = serde_json::from_str(&r.payload_json).unwrap_or(Value::Null);
                sink.on(&r.event_type, &p)?;
            }
            if let Some(last) = rows.last() {
                after = Some(last.seq);
            }
            if rows.len() < PAGE {
                break;
            }
        }
        if !follow || smithers_store::status::is_ended(&run.status) {
            return sink.done();
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.int.recv() => return sink.done(),
            _ = stop.term.recv() => return sink.done(),
        }
    }
}

/// `smithers logs --url`: pages of `runs.events`, then (with `follow`) the live events over
/// the WebSocket from where the pages ended, until the run completes.
pub async fn remote(
    gw: &Gateway,
    run_id: &str,
    node: Option<&str>,
    follow: bool,
) -> Result<u8, RemoteError> {
    let mut sink = Sink::new(node);
    let mut after = -1i64;
    let mut completed = false;
    loop {
        let mut params = json!({"runId": run_id, "afterSeq": after, "limit": PAGE});
        if let Some(n) = node {
            params["nodeId"] = json!(n);
        }
        let page = gw.call("runs.events", params).await?;
        for e in page
            .get("events")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let event = e.get("event").and_then(Value::as_str).unwrap_or("");
            let p = e.get("payload").cloned().unwrap_or(Value::Null);
            completed |= event == "run.completed";
            on_protocol_event(&mut sink, event, p)?;
        }
        after = page.get("lastSeq").and_then(Value::as_i64).unwrap_or(after);
        if page.get("more") != Some(&Value::Bool(true)) {
            break;
        }
    }
    if !follow || completed {
        return Ok(sink.done()?);
    }
    let mut stop = crate::up::watch_term().map_err(RemoteError::from)?;
    let mut conn = Conn::open(gw, run_id, Some(after)).await?;
    loop {
        tokio::select! {
            frame = conn.next() => {
                let v = match frame {
                    Ok(v) => v,
                    Err(why) => {
                        // reopen from the last event written out
                        eprintln!("connection to {} lost ({why}); reconnecting", gw.base());
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        conn = Conn::open(gw, run_id, Some(after)).await?;
                        continue;
                    }
                };
                if v.get("type").and_then(Value::as_str) != Some("event") {
                    continue;
                }
                let event = v.get("event").and_then(Value::as_str).unwrap_or("");
                let p = v.get("payload").cloned().unwrap_or(Value::Null);
                if p.get("runId").and_then(Value::as_str) != Some(run_id) {
                    continue;
                }
                if event == "replay.truncated" {
                    // the replay stops at its window (1,000 events): ask again from there
                    if let Some(last) = p.get("lastEventSeq").and_then(Value::as_i64) {
                        after = after.max(last);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    conn = Conn::open(gw, run_id, Some(after)).await?;
                    continue;
                }
                if let Some(seq) = p.get("eventSeq").and_then(Value::as_i64) {
                    if seq <= after {
                        continue;
                    }
                    after = seq;
                }
                let end = event == "run.completed";
                on_protocol_event(&mut sink, event, p)?;
                if end {
                    return Ok(sink.done()?);
                }
            }
            _ = stop.int.recv() => return Ok(sink.done()?),
            _ = stop.term.recv() => return Ok(sink.done()?),
        }
    }
}

/// A protocol event in the engine terms [`Sink`] reads.
fn on_protocol_event(sink: &mut Sink, event: &str, mut p: Value) -> Result<(), SmithersError> {
    let kind = match event {
        "task.output" => {
            p["text"] = p.get("output").cloned().unwrap_or(Value::Null);
            "NodeOutput"
        }
        "node.finished" => "NodeFinished",
        "node.failed" => "NodeFailed",
        "node.retrying" => "NodeRetrying",
        _ => return Ok(()),
    };
    sink.on(kind, &p)
}
