//! `smithers up` and `smithers resume`: drive a run in the foreground.

use crate::progress::Progress;
use crate::{json_arg, open_store};
use smithers_core::{Code, SmithersError, Workflow};
use smithers_engine::{Engine, EngineConfig, RunHandle, RunOutcome, StartOptions};
use std::sync::Arc;

fn load(path: &str) -> Result<Arc<dyn Workflow>, SmithersError> {
    match smithers_core::yaml::load_file(path) {
        Ok(wf) => Ok(wf),
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            Err(smithers_core::yaml::invalid(&problems))
        }
    }
}

pub async fn up(
    workflow: &str,
    input: Option<&str>,
    run_id: Option<String>,
    db: &str,
) -> Result<u8, SmithersError> {
    let wf = load(workflow)?;
    let input = match input {
        Some(t) => json_arg("--input", t)?,
        None => serde_json::json!({}),
    };
    let store = open_store(db).await?;
    start_foreground(
        store,
        wf,
        input,
        StartOptions {
            run_id,
            ..Default::default()
        },
    )
    .await
}

/// Starts a run and drives it in the foreground with live progress.
async fn start_foreground(
    store: Arc<dyn smithers_store::Store>,
    wf: Arc<dyn Workflow>,
    input: serde_json::Value,
    opts: StartOptions,
) -> Result<u8, SmithersError> {
    let engine = Engine::new(store, EngineConfig::default());
    let term = watch_term()?;
    let progress = Progress::start(&engine);
    let handle = engine.start(wf, input, opts).await?;
    drive(&engine, handle, progress, term).await
}

/// Loads the workflow file a stored run was started from.
async fn run_workflow(
    store: &dyn smithers_store::Store,
    run_id: &str,
    verb: &str,
) -> Result<Arc<dyn Workflow>, SmithersError> {
    let row = store.get_run(run_id).await?.ok_or_else(|| {
        SmithersError::new(
            Code::RunNotFound,
            format!("run `{run_id}` not found; `smithers ps` lists runs"),
        )
    })?;
    let path = row.workflow_path.ok_or_else(|| {
        SmithersError::new(
            Code::WorkflowNotFound,
            format!("run `{run_id}` was started from code, not a workflow file; {verb} it from the program that defines it"),
        )
    })?;
    load(&path)
}

pub async fn resume(run_id: &str, db: &str, force: bool) -> Result<u8, SmithersError> {
    let store = open_store(db).await?;
    let wf = run_workflow(store.as_ref(), run_id, "resume").await?;
    let engine = Engine::new(store, EngineConfig::default());
    let term = watch_term()?;
    let progress = Progress::start(&engine);
    let handle = engine.resume(wf, run_id, force).await?;
    drive(&engine, handle, progress, term).await
}

/// `smithers rerun`: a new run of the workflow file and input of `run_id`, in the foreground.
pub async fn rerun(
    run_id: &str,
    new_run_id: Option<String>,
    db: &str,
) -> Result<u8, SmithersError> {
    let store = open_store(db).await?;
    let wf = run_workflow(store.as_ref(), run_id, "rerun").await?;
    let input = smithers_store::input_object(store.as_ref(), run_id).await?;
    start_foreground(
        store,
        wf,
        input,
        StartOptions {
            run_id: new_run_id,
            ..Default::default()
        },
    )
    .await
}

/// `smithers fork`: a new run from the state of `run_id` at `frame`, driven in the foreground.
pub async fn fork(
    run_id: &str,
    frame: i64,
    input: Option<&str>,
    new_run_id: Option<String>,
    db: &str,
) -> Result<u8, SmithersError> {
    let input = input.map(|t| json_arg("--input", t)).transpose()?;
    let store = open_store(db).await?;
    let wf = run_workflow(store.as_ref(), run_id, "fork").await?;
    let engine = Engine::new(store, EngineConfig::default());
    let term = watch_term()?;
    let progress = Progress::start(&engine);
    let handle = engine.fork(wf, run_id, frame, input, new_run_id).await?;
    drive(&engine, handle, progress, term).await
}

/// Takes over every orphaned run (its engine died or stopped heart-beating) and drives each to
/// its next stop. Exit code: 1 if any failed, else 2 if any was cancelled, else 3 if any is
/// waiting, else 0.
pub async fn resume_orphans(db: &str) -> Result<u8, SmithersError> {
    let store = open_store(db).await?;
    let engine = Engine::new(store, EngineConfig::default());
    let progress = Progress::start(&engine);
    let resolve = |row: &smithers_store::RunRow| -> Option<Arc<dyn Workflow>> {
        let path = row.workflow_path.as_deref()?;
        match smithers_core::yaml::load_file(path) {
            Ok(wf) => Some(wf as Arc<dyn Workflow>),
            Err(_) => {
                eprintln!(
                    "run {} left alone: its workflow `{path}` no longer loads",
                    row.run_id
                );
                None
            }
        }
    };
    let handles = engine.take_over_orphans(&resolve).await?;
    if handles.is_empty() {
        progress.finish().await;
        eprintln!("no orphaned runs");
        return Ok(0);
    }
    for h in &handles {
        eprintln!("taking over run {}", h.run_id);
    }
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.wait().await);
    }
    progress.finish().await;
    let codes: Vec<u8> = outcomes.iter().map(report).collect();
    Ok([1u8, 2, 3]
        .into_iter()
        .find(|c| codes.contains(c))
        .unwrap_or(0))
}

/// Installs the SIGTERM and SIGINT handlers before the run starts, so a signal at any moment
/// cancels the run cleanly instead of killing the process.
pub(crate) fn watch_term() -> Result<StopSignals, SmithersError> {
    use tokio::signal::unix::{SignalKind, signal};
    let err =
        |e: std::io::Error| SmithersError::new(Code::IoError, format!("cannot watch signals: {e}"));
    Ok(StopSignals {
        term: signal(SignalKind::terminate()).map_err(err)?,
        int: signal(SignalKind::interrupt()).map_err(err)?,
    })
}

/// SIGTERM and SIGINT (Ctrl-C), both of which cancel the foreground run.
pub(crate) struct StopSignals {
    pub term: tokio::signal::unix::Signal,
    pub int: tokio::signal::unix::Signal,
}

/// How long a cancelled run may take to stop before `up` leaves it as it is and exits.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for the run, cancelling it on Ctrl-C / SIGTERM, and prints the result. A run that has
/// not stopped [`STOP_GRACE`] after the signal (its cancellation cannot be recorded while
/// storage fails), or a second signal, ends the command at once; the run is left as storage
/// last recorded it, for `smithers resume`.
async fn drive(
    engine: &Engine,
    handle: RunHandle,
    progress: Progress,
    mut stop: StopSignals,
) -> Result<u8, SmithersError> {
    let run_id = handle.run_id.clone();
    eprintln!("run {run_id}");
    let wait = handle.wait();
    tokio::pin!(wait);
    let mut deadline: Option<tokio::time::Instant> = None;
    let outcome: RunOutcome = loop {
        let signal = tokio::select! {
            o = &mut wait => break o,
            _ = stop.int.recv() => "Ctrl-C",
            _ = stop.term.recv() => "SIGTERM",
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                progress.finish().await;
                let why = format!("it did not stop within {} s of the signal", STOP_GRACE.as_secs());
                return Ok(left_running(&run_id, &why));
            }
        };
        if deadline.is_some() {
            progress.finish().await;
            return Ok(left_running(&run_id, &format!("a second {signal}")));
        }
        deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
        eprintln!(
            "stopping ({signal}): cancelling run {run_id} (resume it later with `smithers resume {run_id}`; {signal} again quits without waiting)"
        );
        let _ = engine.cancel(&run_id).await;
    };
    progress.finish().await;
    Ok(report(&outcome))
}

/// Ends the command without the run having stopped: says why and how to continue it.
fn left_running(run_id: &str, why: &str) -> u8 {
    tracing::warn!(
        run_id,
        reason = why,
        "leaving the run without recording its cancellation"
    );
    eprintln!(
        "run {run_id} left as storage last recorded it ({why}); `smithers resume {run_id}` continues it"
    );
    1
}

/// Prints the outcome and returns the documented exit code.
fn report(o: &RunOutcome) -> u8 {
    match o.status.as_str() {
        "finished" => {
            eprintln!("run {} finished", o.run_id);
            let out = o.output.clone().unwrap_or(serde_json::Value::Null);
            println!(
                "{}",
                serde_json::to_string_pretty(&out).unwrap_or_else(|_| out.to_string())
            );
            0
        }
        s if s.starts_with("waiting-") => {
            eprintln!(
                "run {} is {s}; it continues with `smithers resume {}` once that is resolved",
                o.run_id, o.run_id
            );
            3
        }
        "cancelled" => {
            eprintln!("run {} cancelled", o.run_id);
            2
        }
        _ => {
            let e = o
                .error
                .as_ref()
                .map(|e| format!("[{}] {}", e.code, e.message))
                .unwrap_or_default();
            eprintln!("run {} {}: {e}", o.run_id, o.status);
            1
        }
    }
}
