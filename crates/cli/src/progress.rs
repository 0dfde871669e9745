//! Live progress for foreground runs: one line per node start, finish, failure, retry or wait.

use smithers_engine::{Engine, EngineEvent};
use tokio::sync::broadcast::error::RecvError;

pub struct Progress {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Progress {
    pub fn start(engine: &Engine) -> Progress {
        let mut rx = engine.subscribe();
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Ok(ev) => line(&ev),
                        Err(RecvError::Lagged(n)) => eprintln!("  … {n} events not shown"),
                        Err(RecvError::Closed) => return,
                    },
                    _ = &mut stop_rx => {
                        // print what is already queued, then stop
                        while let Ok(ev) = rx.try_recv() { line(&ev); }
                        return;
                    }
                }
            }
        });
        Progress { task, stop }
    }

    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
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

fn line(ev: &EngineEvent) {
    let s = |k: &str| {
        ev.field(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let n = |k: &str| ev.field(k).and_then(|v| v.as_i64()).unwrap_or(0);
    let node = {
        let id = s("nodeId");
        let it = n("iteration");
        if it > 0 { format!("{id}[{it}]") } else { id }
    };
    let run = &ev.run_id;
    let child = if run.contains(":child:") {
        format!("{run} ")
    } else {
        String::new()
    };
    match ev.event_type {
        "NodeStarted" => eprintln!("  {child}▶ {node} started (attempt {})", n("attempt")),
        "NodeFinished" => eprintln!(
            "  {child}✓ {node} finished in {} (attempt {})",
            dur(n("durationMs")),
            n("attempt")
        ),
        "NodeFailed" => {
            let msg = ev
                .field("error")
                .and_then(|e| e.get("message"))
                .and_then(|m| m.as_str())
                .unwrap_or("");
            eprintln!(
                "  {child}✗ {node} failed after {} (attempt {}): {msg}",
                dur(n("durationMs")),
                n("attempt")
            )
        }
        "NodeRetrying" => eprintln!(
            "  {child}↻ {node} retries in {} (attempt {})",
            dur(n("delayMs")),
            n("attempt")
        ),
        "NodeSkipped" => eprintln!("  {child}- {node} skipped"),
        "NodeCancelled" => eprintln!("  {child}■ {node} cancelled ({})", s("reason")),
        "ApprovalRequested" => eprintln!(
            "  {child}⏸ {node} needs approval: {} — `{}`{}",
            s("title"),
            approve_hint(run, ev),
            choices(ev)
        ),
        "ApprovalAutoApproved" => eprintln!("  {child}✓ {node} auto-approved"),
        "NodeWaitingEvent" => {
            let corr = ev.field("correlationId").and_then(|c| c.as_str());
            let mut hint = format!(
                "smithers signal {} {}",
                shell_word(run),
                shell_word(&s("event"))
            );
            if let Some(c) = corr {
                hint.push_str(&format!(" --correlation-id {}", shell_word(c)));
            }
            eprintln!(
                "  {child}⏸ {node} waits for event `{}`{} — `{hint}`",
                s("event"),
                corr.map(|c| format!(" (correlation {c})"))
                    .unwrap_or_default(),
            )
        }
        "NodeWaitingTimer" => eprintln!("  {child}⏲ {node} waits until {}", fmt_ms(n("firesAtMs"))),
        "TimerFired" => eprintln!("  {child}⏲ {} fired", s("timerId")),
        "LoopAdvanced" => eprintln!(
            "  {child}⟳ loop {} → iteration {}{}",
            s("loopId"),
            n("iteration"),
            if ev.field("done").and_then(|d| d.as_bool()) == Some(true) {
                " (done)"
            } else {
                ""
            }
        ),
        _ => {}
    }
}

/// Epoch ms as a UTC timestamp (`2026-11-25T08:00:00Z`).
pub fn fmt_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The command that decides an approval, ready to paste: `--iteration` inside loops, `--select`
/// with the first choice of a select approval (see [`choices`]), `--rank` with the keys of a
/// rank approval.
fn approve_hint(run: &str, ev: &EngineEvent) -> String {
    let node = ev.field("nodeId").and_then(|v| v.as_str()).unwrap_or("");
    let mut hint = format!(
        "smithers approve {} --node {}",
        shell_word(run),
        shell_word(node)
    );
    if let Some(it) = ev.field("iteration").and_then(|v| v.as_i64())
        && it > 0
    {
        hint.push_str(&format!(" --iteration {it}"));
    }
    let keys: Vec<String> = ev
        .field("options")
        .and_then(|o| o.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str())
                .map(shell_word)
                .collect()
        })
        .unwrap_or_default();
    match ev.field("mode").and_then(|m| m.as_str()) {
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
fn shell_word(w: &str) -> String {
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
fn choices(ev: &EngineEvent) -> String {
    if ev.field("mode").and_then(|m| m.as_str()) != Some("select") {
        return String::new();
    }
    let keys: Vec<&str> = ev
        .field("options")
        .and_then(|o| o.as_array())
        .map(|a| a.iter().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    if keys.is_empty() {
        String::new()
    } else {
        format!(" (choices: {})", keys.join(", "))
    }
}

#[cfg(test)]
mod tests {
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
