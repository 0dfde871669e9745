//! Live progress for foreground runs: one line per node start, finish, failure, retry or wait.
//! The same lines are printed for a local run (`up`, from engine events) and for a run followed
//! on a gateway (`run`, from protocol events, see `follow.rs`), whose payloads carry the same
//! field names.

use serde_json::Value;
use smithers_engine::Engine;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--quiet`: hide task output lines (a presentation setting for the whole command, like
/// `NO_COLOR`).
pub fn set_quiet(on: bool) {
    QUIET.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

/// How often the elapsed-time line is redrawn on a terminal.
pub const TICK: Duration = Duration::from_secs(1);

pub struct Progress {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Progress {
    /// Prints the engine's events as progress lines until [`Progress::finish`].
    pub fn start(engine: &Engine) -> Progress {
        let mut rx = engine.subscribe();
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel();
        let mut printer = Printer::new(Style::detect(), quiet(), None);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Ok(ev) => printer.on(ev.event_type, &ev.run_id, &ev.payload),
                        Err(RecvError::Lagged(n)) => printer.line(&format!("  {} {n} events not shown", printer.style.pick("…", "..."))),
                        Err(RecvError::Closed) => break,
                    },
                    _ = tick.tick() => printer.tick(),
                    _ = &mut stop_rx => {
                        // print what is already queued, then stop
                        while let Ok(ev) = rx.try_recv() {
                            printer.on(ev.event_type, &ev.run_id, &ev.payload);
                        }
                        break;
                    }
                }
            }
            printer.done();
        });
        Progress { task, stop }
    }

    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Turns a run's events into what a person watching it sees on stderr: progress lines, task
/// output as whole lines (`    build | compiling…`) and, on a terminal, one status line with
/// the elapsed time and the running nodes, redrawn in place.
pub struct Printer {
    pub style: Style,
    quiet: bool,
    /// The gateway a followed run lives on (hints name it).
    url: Option<String>,
    lines: OutputLines,
    started: Instant,
    running: BTreeSet<String>,
    status_shown: bool,
}

impl Printer {
    pub fn new(style: Style, quiet: bool, url: Option<String>) -> Printer {
        Printer {
            style,
            quiet,
            url,
            lines: OutputLines::default(),
            started: Instant::now(),
            running: BTreeSet::new(),
            status_shown: false,
        }
    }

    /// One event, by its engine name (`NodeStarted`, `NodeOutput`, …).
    pub fn on(&mut self, kind: &str, run: &str, payload: &Value) {
        let label = node_label(run, payload);
        match kind {
            "NodeOutput" => {
                if self.quiet {
                    return;
                }
                let stream = payload.get("stream").and_then(Value::as_str).unwrap_or("");
                let text = payload.get("text").and_then(Value::as_str).unwrap_or("");
                for l in self.lines.push(&label, stream, text) {
                    self.output_line(&label, &l);
                }
                return;
            }
            "NodeStarted" => {
                self.running.insert(label.clone());
            }
            "NodeFinished" | "NodeFailed" | "NodeCancelled" | "NodeRetrying" => {
                self.running.remove(&label);
                for l in self.lines.flush(&label) {
                    self.output_line(&label, &l);
                }
            }
            _ => {}
        }
        if let Some(l) = describe(self.style, kind, run, payload, self.url.as_deref()) {
            self.line(&l);
        }
    }

    fn output_line(&mut self, label: &str, text: &str) {
        let bar = self.style.pick("│", "|");
        self.line(&format!("    {label} {bar} {text}"));
    }

    /// Prints a line above the status line.
    pub fn line(&mut self, text: &str) {
        self.clear_status();
        eprintln!("{text}");
    }

    /// Redraws the status line (terminals only).
    pub fn tick(&mut self) {
        if !self.style.unicode {
            return;
        }
        let secs = self.started.elapsed().as_secs();
        let elapsed = if secs < 60 {
            format!("{secs}s")
        } else {
            format!("{}m{:02}s", secs / 60, secs % 60)
        };
        let running = if self.running.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = self.running.iter().map(String::as_str).take(5).collect();
            format!(" · running {}", names.join(", "))
        };
        eprint!("\r\x1b[2K  ⏱ {elapsed}{running}");
        self.status_shown = true;
    }

    fn clear_status(&mut self) {
        if self.status_shown {
            eprint!("\r\x1b[2K");
            self.status_shown = false;
        }
    }

    /// The end: the rest of any unfinished output line, and no status line left behind.
    pub fn done(&mut self) {
        for (label, l) in self.lines.flush_all() {
            self.output_line(&label, &l);
        }
        self.clear_status();
    }
}

/// `id`, `id[iteration]` inside loops, prefixed by the run id for a child run's nodes.
fn node_label(run: &str, payload: &Value) -> String {
    let id = payload.get("nodeId").and_then(Value::as_str).unwrap_or("");
    let it = payload
        .get("iteration")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let node = if it > 0 {
        format!("{id}[{it}]")
    } else {
        id.to_string()
    };
    if run.contains(":child:") {
        format!("{run} {node}")
    } else {
        node
    }
}

/// Task output cut into whole lines. A process writes in chunks that need not end at a line
/// break; the rest of a line waits for its newline, or for the node to end.
#[derive(Default)]
pub struct OutputLines {
    partial: BTreeMap<(String, String), String>,
}

/// A line longer than this is printed in pieces rather than held without bound.
const MAX_PARTIAL: usize = 64 * 1024;

impl OutputLines {
    /// Adds a chunk of `node`'s `stream`; returns the lines it completed.
    pub fn push(&mut self, node: &str, stream: &str, text: &str) -> Vec<String> {
        let buf = self
            .partial
            .entry((node.to_string(), stream.to_string()))
            .or_default();
        buf.push_str(text);
        let mut out = Vec::new();
        while let Some(i) = buf.find('\n') {
            let line: String = buf.drain(..=i).collect();
            out.push(line.trim_end_matches(['\n', '\r']).to_string());
        }
        if buf.len() > MAX_PARTIAL {
            out.push(std::mem::take(buf));
        }
        out
    }

    /// What is left of `node`'s lines (it ended).
    pub fn flush(&mut self, node: &str) -> Vec<String> {
        let keys: Vec<(String, String)> = self
            .partial
            .keys()
            .filter(|(n, _)| n == node)
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|k| self.partial.remove(&k))
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// What is left of every node's lines, as `(node, rest)`.
    pub fn flush_all(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.partial)
            .into_iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|((n, _), s)| (n, s))
            .collect()
    }
}

/// How progress lines look: Unicode symbols only on a terminal, colours only on a terminal
/// that wants them (`NO_COLOR` unset, `TERM` not `dumb`), so logs and pipes get plain ASCII.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    pub unicode: bool,
    pub color: bool,
}

impl Style {
    pub fn detect() -> Style {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            unicode: terminal && !dumb,
            color: terminal && !dumb && !no_color,
        }
    }

    pub fn pick(self, unicode: &'static str, ascii: &'static str) -> &'static str {
        if self.unicode { unicode } else { ascii }
    }

    /// `symbol` in an ANSI colour (green 32, red 31, yellow 33, cyan 36) when colours are on.
    fn mark(self, unicode: &'static str, ascii: &'static str, colour: u8) -> String {
        let s = self.pick(unicode, ascii);
        if self.color {
            format!("\x1b[{colour}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    /// The separator before a command to paste.
    fn dash(self) -> &'static str {
        self.pick("—", "--")
    }
}

fn dur(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// The progress line of one event (`kind` is the engine's event name), or `None` for events
/// that get no line. `url` is the gateway a followed run lives on: the hints then name it.
pub fn describe(
    style: Style,
    kind: &str,
    run: &str,
    payload: &Value,
    url: Option<&str>,
) -> Option<String> {
    let s = |k: &str| {
        payload
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let n = |k: &str| payload.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
    let node = {
        let id = s("nodeId");
        let it = n("iteration");
        if it > 0 { format!("{id}[{it}]") } else { id }
    };
    let child = if run.contains(":child:") {
        format!("{run} ")
    } else {
        String::new()
    };
    let at = |url: Option<&str>| {
        url.map(|u| format!(" --url {}", shell_word(u)))
            .unwrap_or_default()
    };
    let line = match kind {
        "NodeStarted" => format!(
            "{} {node} started (attempt {})",
            style.mark("▶", ">", 36),
            n("attempt")
        ),
        "NodeFinished" => format!(
            "{} {node} finished in {} (attempt {})",
            style.mark("✓", "+", 32),
            dur(n("durationMs")),
            n("attempt")
        ),
        "NodeFailed" => {
            let msg = payload
                .get("error")
                .and_then(|e| e.get("message"))
                .and_then(|m| m.as_str())
                .unwrap_or("");
            format!(
                "{} {node} failed after {} (attempt {}): {msg}",
                style.mark("✗", "!", 31),
                dur(n("durationMs")),
                n("attempt")
            )
        }
        "NodeRetrying" => format!(
            "{} {node} retries in {} (attempt {})",
            style.mark("↻", "~", 33),
            dur(n("delayMs")),
            n("attempt")
        ),
        "NodeSkipped" => format!("- {node} skipped"),
        "NodeCancelled" => format!(
            "{} {node} cancelled ({})",
            style.mark("■", "#", 33),
            s("reason")
        ),
        "ApprovalRequested" => format!(
            "{} {node} needs approval: {} {} `{}{}`{}",
            style.mark("⏸", "?", 33),
            s("title"),
            style.dash(),
            approve_hint(run, payload),
            at(url),
            choices(payload)
        ),
        "ApprovalAutoApproved" => format!("{} {node} auto-approved", style.mark("✓", "+", 32)),
        "NodeWaitingEvent" => {
            let corr = payload.get("correlationId").and_then(|c| c.as_str());
            let mut hint = format!(
                "smithers signal {} {}",
                shell_word(run),
                shell_word(&s("event"))
            );
            if let Some(c) = corr {
                hint.push_str(&format!(" --correlation-id {}", shell_word(c)));
            }
            hint.push_str(&at(url));
            format!(
                "{} {node} waits for event `{}`{} {} `{hint}`",
                style.mark("⏸", "?", 33),
                s("event"),
                corr.map(|c| format!(" (correlation {c})"))
                    .unwrap_or_default(),
                style.dash(),
            )
        }
        "NodeWaitingTimer" => format!(
            "{} {node} waits until {}",
            style.mark("⏲", "@", 33),
            fmt_ms(n("firesAtMs"))
        ),
        "TimerFired" => format!("{} {} fired", style.mark("⏲", "@", 33), s("timerId")),
        "LoopAdvanced" => format!(
            "{} loop {} {} iteration {}{}",
            style.mark("⟳", "*", 36),
            s("loopId"),
            style.pick("→", "->"),
            n("iteration"),
            if payload.get("done").and_then(|d| d.as_bool()) == Some(true) {
                " (done)"
            } else {
                ""
            }
        ),
        _ => return None,
    };
    Some(format!("  {child}{line}"))
}

/// Epoch ms as a UTC timestamp (`2026-11-25T08:00:00Z`).
pub fn fmt_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The command that decides an approval, ready to paste: `--iteration` inside loops, `--select`
/// with the first choice of a select approval (see [`choices`]), `--rank` with the keys of a
/// rank approval.
fn approve_hint(run: &str, ev: &Value) -> String {
    let node = ev.get("nodeId").and_then(|v| v.as_str()).unwrap_or("");
    let mut hint = format!(
        "smithers approve {} --node {}",
        shell_word(run),
        shell_word(node)
    );
    if let Some(it) = ev.get("iteration").and_then(|v| v.as_i64())
        && it > 0
    {
        hint.push_str(&format!(" --iteration {it}"));
    }
    let keys: Vec<String> = option_keys(ev).into_iter().map(shell_word).collect();
    match ev.get("mode").and_then(|m| m.as_str()) {
        Some("select") if !keys.is_empty() => {
            hint.push_str(&format!(" --select {}", keys[0]));
        }
        Some("rank") if !keys.is_empty() => {
            hint.push_str(&format!(" --rank {}", keys.join(",")));
        }
        _ => {}
    }
    hint
}

/// A word a POSIX shell reads back unchanged: as is when it is plain, else single-quoted.
pub fn shell_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@%+=,".contains(c));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// ` (choices: a, b, c)` after the hint of a select approval.
/// The option keys of an approval event (`options`: a list of keys).
fn option_keys(ev: &Value) -> Vec<&str> {
    ev.get("options")
        .and_then(|o| o.as_array())
        .map(|a| a.iter().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default()
}

fn choices(ev: &Value) -> String {
    if ev.get("mode").and_then(|m| m.as_str()) != Some("select") {
        return String::new();
    }
    let keys = option_keys(ev);
    if keys.is_empty() {
        String::new()
    } else {
        format!(" (choices: {})", keys.join(", "))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn output_chunks_become_whole_lines() {
        let mut l = super::OutputLines::default();
        assert!(l.push("a", "stdout", "hel").is_empty());
        assert_eq!(l.push("a", "stdout", "lo\nwor"), ["hello"]);
        assert_eq!(l.push("b", "stdout", "x\r\ny\n"), ["x", "y"]);
        assert_eq!(l.push("a", "stderr", "e"), Vec::<String>::new());
        assert_eq!(l.flush("a"), ["e", "wor"]);
        assert!(l.flush_all().is_empty());
        let long = "z".repeat(super::MAX_PARTIAL + 1);
        assert_eq!(l.push("c", "stdout", &long), vec![long]);
    }

    #[test]
    fn formats_utc() {
        assert_eq!(super::fmt_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::fmt_ms(1_795_593_600_000), "2026-11-25T08:00:00Z");
    }

    #[test]
    fn hints_paste_into_a_shell_unchanged() {
        assert_eq!(super::shell_word("run-1:a.b"), "run-1:a.b");
        assert_eq!(super::shell_word("issue 42"), "'issue 42'");
        assert_eq!(super::shell_word("it's"), "'it'\\''s'");
        assert_eq!(super::shell_word(""), "''");
    }
}
