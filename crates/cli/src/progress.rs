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
            "  {child}⏸ {node} needs approval: {} — `smithers approve {run} --node {}`",
            s("title"),
            s("nodeId")
        ),
        "ApprovalAutoApproved" => eprintln!("  {child}✓ {node} auto-approved"),
        "NodeWaitingEvent" => {
            let corr = ev
                .field("correlationId")
                .and_then(|c| c.as_str())
                .map(|c| format!(" (correlation {c})"))
                .unwrap_or_default();
            eprintln!(
                "  {child}⏸ {node} waits for event `{}`{corr} — `smithers signal {run} {}`",
                s("event"),
                s("event")
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

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc() {
        assert_eq!(super::fmt_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::fmt_ms(1_795_593_600_000), "2026-11-25T08:00:00Z");
    }
}
