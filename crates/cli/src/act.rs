//! Commands that act on runs: `approve`, `deny`, `signal`, `cancel`.

use crate::{json_arg, open_store};
use serde_json::json;
use smithers_core::SmithersError;
use smithers_engine::ops::{self, CancelOutcome, Decision};

fn user() -> Option<String> {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| Some("cli".into()))
}

pub async fn approve(
    db: &str,
    run_id: &str,
    node: &str,
    iteration: i64,
    note: Option<String>,
    select: Option<String>,
    rank: Option<Vec<String>>,
) -> Result<u8, SmithersError> {
    let store = open_store(db).await?;
    let decision = match (select, rank) {
        (Some(s), _) => Some(json!({"selected": s})),
        (None, Some(r)) => Some(json!({"ranked": r})),
        _ => None,
    };
    ops::decide(
        store.as_ref(),
        run_id,
        node,
        iteration,
        Decision {
            approved: true,
            note,
            decided_by: user(),
            decision,
        },
    )
    .await?;
    eprintln!("approved `{node}`; continue the run with `smithers resume {run_id}`");
    Ok(0)
}

pub async fn deny(
    db: &str,
    run_id: &str,
    node: &str,
    iteration: i64,
    note: Option<String>,
) -> Result<u8, SmithersError> {
    let store = open_store(db).await?;
    ops::decide(
        store.as_ref(),
        run_id,
        node,
        iteration,
        Decision {
            approved: false,
            note,
            decided_by: user(),
            decision: None,
        },
    )
    .await?;
    eprintln!("denied `{node}`; continue the run with `smithers resume {run_id}`");
    Ok(0)
}

pub async fn signal(
    db: &str,
    run_id: &str,
    name: &str,
    data: Option<&str>,
    correlation: Option<&str>,
) -> Result<u8, SmithersError> {
    let payload = match data {
        Some(d) => json_arg("--data", d)?,
        None => json!({}),
    };
    let store = open_store(db).await?;
    // a live run whose workflow file still loads: refuse names none of its waits listen for
    // (an ended run and a blank name get their own errors below)
    if let Some(row) = store.get_run(run_id).await?
        && !smithers_store::status::is_ended(&row.status)
        && !name.trim().is_empty()
        && let Some(path) = row.workflow_path.as_deref()
        && let Ok(wf) = smithers_core::yaml::load_file(path)
    {
        smithers_core::check_signal_name(wf.as_ref(), run_id, name.trim())?;
    }
    let d = ops::send_signal(
        store.as_ref(),
        run_id,
        name,
        payload,
        correlation,
        user().as_deref(),
    )
    .await?;
    println!(
        "{}",
        json!({"runId": d.run_id, "seq": d.seq, "signalName": d.signal_name, "correlationId": d.correlation_id, "receivedAtMs": d.received_at_ms})
    );
    eprintln!("signal `{name}` recorded; continue the run with `smithers resume {run_id}`");
    Ok(0)
}

pub async fn cancel(db: &str, run_id: &str) -> Result<u8, SmithersError> {
    let store = open_store(db).await?;
    match ops::cancel_run(
        store.as_ref(),
        run_id,
        smithers_engine::EngineConfig::default().lease_timeout_ms,
    )
    .await?
    {
        CancelOutcome::Cancelled => eprintln!("run {run_id} cancelled"),
        CancelOutcome::Cancelling => {
            eprintln!("run {run_id} is running elsewhere; its engine has been asked to cancel it")
        }
    }
    Ok(0)
}

pub async fn rewind(db: &str, run_id: &str, frame: i64, yes: bool) -> Result<u8, SmithersError> {
    if !yes {
        return Err(SmithersError::new(
            smithers_core::Code::InvalidInput,
            format!(
                "rewinding deletes everything run `{run_id}` did after frame {frame}; add --yes to confirm"
            ),
        ));
    }
    let store = open_store(db).await?;
    let engine = smithers_engine::Engine::new(store, smithers_engine::EngineConfig::default());
    let caller = user().unwrap_or_else(|| "cli".into());
    let r = engine.rewind(run_id, frame, &caller).await?;
    println!(
        "{}",
        json!({"runId": run_id, "fromFrameNo": r.from_frame_no, "toFrameNo": r.to_frame_no, "deletedFrames": r.deleted_frames})
    );
    if r.changed {
        eprintln!(
            "run {run_id} is back at frame {frame}; continue it with `smithers resume {run_id}`"
        );
    } else {
        eprintln!("run {run_id} already is at frame {frame}; nothing changed");
    }
    Ok(0)
}
