//! Operations on runs that do not need the run's engine: approval decisions, signals and
//! cancellation. They only write durable rows; the run picks them up when it is resumed (or,
//! for a live engine, on its next heartbeat).

use crate::{events, now_ms, owner};
use serde_json::{Value, json};
use smithers_core::{Code, Result, SmithersError};
use smithers_store::{ApprovalRow, Batch, NewSignal, RunPatch, Store, Write, node_state, status};

/// What `cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The run was driven by a live engine, which is stopping it.
    Cancelling,
    /// The run was not being driven; it is now `cancelled`.
    Cancelled,
}

fn event(batch: &mut Batch, run_id: &str, t: &'static str, fields: Value) {
    let ev = events::make(run_id, t, now_ms(), fields);
    batch.push(Write::AppendEvent {
        run_id: run_id.to_string(),
        timestamp_ms: ev.timestamp_ms,
        event_type: t.to_string(),
        payload_json: ev.payload.to_string(),
    });
}

async fn run_row(store: &dyn Store, run_id: &str) -> Result<smithers_store::RunRow> {
    store.get_run(run_id).await?.ok_or_else(|| {
        SmithersError::new(
            Code::RunNotFound,
            format!("run `{run_id}` not found; `smithers ps` lists runs"),
        )
    })
}

/// Cancels a run that this process does not drive.
pub async fn cancel_run(
    store: &dyn Store,
    run_id: &str,
    lease_timeout_ms: i64,
) -> Result<CancelOutcome> {
    let row = run_row(store, run_id).await?;
    if status::is_ended(&row.status) {
        return Err(SmithersError::new(
            Code::RunNotActive,
            format!("run `{run_id}` is already `{}`", row.status),
        ));
    }
    let now = now_ms();
    if let Some(o) = &row.runtime_owner_id {
        let fresh = row
            .heartbeat_at_ms
            .is_some_and(|h| now - h < lease_timeout_ms);
        if fresh && owner::liveness(o) != owner::OwnerLiveness::Dead {
            store.request_cancel(run_id, now).await?;
            return Ok(CancelOutcome::Cancelling);
        }
    }
    let mut batch = Batch::new();
    for n in store.list_nodes(run_id).await? {
        let open = matches!(
            n.state.as_str(),
            node_state::IN_PROGRESS
                | node_state::WAITING_APPROVAL
                | node_state::WAITING_EVENT
                | node_state::WAITING_TIMER
                | node_state::PENDING
        );
        if !open || n.state == node_state::PENDING {
            continue;
        }
        if n.state == node_state::WAITING_TIMER {
            event(
                &mut batch,
                run_id,
                events::kind::TIMER_CANCELLED,
                json!({"timerId": n.node_id}),
            );
        }
        let mut row = n.clone();
        row.state = node_state::CANCELLED.into();
        row.updated_at_ms = now;
        batch.push(Write::UpsertNode(row));
        event(
            &mut batch,
            run_id,
            events::kind::NODE_CANCELLED,
            json!({"nodeId": n.node_id, "iteration": n.iteration, "reason": "run-cancelled"}),
        );
    }
    let attempts = store.list_attempts(run_id).await?;
    // the dead engine's task processes must not go on working for a cancelled run
    crate::leftovers::kill_for_attempts(run_id, &attempts).await;
    for a in attempts {
        if matches!(
            a.state.as_str(),
            node_state::IN_PROGRESS | node_state::WAITING_EVENT | node_state::WAITING_TIMER
        ) {
            let mut c = a.clone();
            c.state = node_state::CANCELLED.into();
            c.finished_at_ms = Some(now);
            batch.push(Write::UpsertAttempt(c));
        }
    }
    batch.push(Write::UpdateRun {
        run_id: run_id.to_string(),
        patch: RunPatch {
            status: Some(status::CANCELLED.into()),
            finished_at_ms: Some(Some(now)),
            runtime_owner_id: Some(None),
            heartbeat_at_ms: Some(None),
            cancel_requested_at_ms: Some(Some(now)),
            ..Default::default()
        },
    });
    event(&mut batch, run_id, events::kind::RUN_CANCELLED, json!({}));
    store.apply(batch).await?;
    tracing::info!(run_id, "run cancelled (it was parked, not being driven)");
    Ok(CancelOutcome::Cancelled)
}

/// An approval decision.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    pub approved: bool,
    pub note: Option<String>,
    pub decided_by: Option<String>,
    /// `{selected}` for select approvals, `{ranked: [...]}` for rank approvals.
    pub decision: Option<Value>,
}

/// The pending approval request of a node, as stored.
pub async fn pending_approval(
    store: &dyn Store,
    run_id: &str,
    node_id: &str,
    iteration: i64,
) -> Result<ApprovalRow> {
    let run = run_row(store, run_id).await?;
    if status::is_ended(&run.status) {
        return Err(SmithersError::new(
            Code::RunNotActive,
            format!(
                "run `{run_id}` is `{}`; its approvals can no longer be decided",
                run.status
            ),
        ));
    }
    let row = store.get_approval(run_id, node_id, iteration).await?.ok_or_else(|| {
        SmithersError::new(
            Code::NodeNotFound,
            format!("run `{run_id}` has no approval `{node_id}` (iteration {iteration}); `smithers inspect {run_id}` lists them"),
        )
    })?;
    let waiting = store
        .get_node(run_id, node_id, iteration)
        .await?
        .is_some_and(|n| n.state == node_state::WAITING_APPROVAL);
    if row.status != "requested" || !waiting {
        return Err(SmithersError::new(
            Code::NotWaitingApproval,
            if row.status == "requested" {
                format!("approval `{node_id}` of run `{run_id}` is not waiting for a decision")
            } else {
                format!(
                    "approval `{node_id}` of run `{run_id}` was already {}",
                    row.status
                )
            },
        ));
    }
    Ok(row)
}

/// Records an approval decision after validating it against the request (select needs a known
/// option, rank a non-empty list of known options).
pub async fn decide(
    store: &dyn Store,
    run_id: &str,
    node_id: &str,
    iteration: i64,
    d: Decision,
) -> Result<()> {
    let row = pending_approval(store, run_id, node_id, iteration).await?;
    let request: Value = row
        .request_json
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(json!({}));
    let mut decision = d.decision.clone();
    if d.approved {
        check_decision(&request, decision.as_ref()).map_err(|p| {
            let options = p.options().join(", ");
            let message = match &p {
                DecisionProblem::SelectionMissing { .. } => {
                    format!("approval `{node_id}` is a select approval; choose one of: {options}")
                }
                DecisionProblem::UnknownSelection { selected, .. } => {
                    format!("unknown selection `{selected}`; choose one of: {options}")
                }
                DecisionProblem::RankMissing { .. } => {
                    format!("approval `{node_id}` is a rank approval; give an order of: {options}")
                }
                DecisionProblem::UnknownRanked { key, .. } => {
                    format!("rank includes unknown option `{key}`; options are: {options}")
                }
            };
            SmithersError::new(Code::InvalidInput, message)
        })?;
    }
    if let (Some(Value::Object(m)), Some(n)) = (&mut decision, &d.note) {
        m.entry("notes").or_insert(Value::String(n.clone()));
    }
    let now = now_ms();
    let mut batch = Batch::new();
    batch.push(Write::UpsertApproval(ApprovalRow {
        status: if d.approved { "approved" } else { "denied" }.into(),
        decided_at_ms: Some(now),
        note: d.note.clone(),
        decided_by: d.decided_by.clone(),
        decision_json: decision
            .map(|x| x.to_string())
            .or(row.decision_json.clone()),
        ..row
    }));
    if let Some(mut n) = store.get_node(run_id, node_id, iteration).await? {
        n.state = node_state::PENDING.into();
        n.updated_at_ms = now;
        batch.push(Write::UpsertNode(n));
    }
    let t = if d.approved {
        events::kind::APPROVAL_GRANTED
    } else {
        events::kind::APPROVAL_DENIED
    };
    event(
        &mut batch,
        run_id,
        t,
        json!({"nodeId": node_id, "iteration": iteration, "decidedBy": d.decided_by, "note": d.note}),
    );
    store.apply(batch).await?;
    Ok(())
}

/// Why a decision does not fit its approval request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionProblem {
    SelectionMissing {
        options: Vec<String>,
    },
    UnknownSelection {
        selected: String,
        options: Vec<String>,
    },
    RankMissing {
        options: Vec<String>,
    },
    UnknownRanked {
        key: String,
        options: Vec<String>,
    },
}

impl DecisionProblem {
    /// The option keys of the request.
    pub fn options(&self) -> &[String] {
        match self {
            DecisionProblem::SelectionMissing { options }
            | DecisionProblem::UnknownSelection { options, .. }
            | DecisionProblem::RankMissing { options }
            | DecisionProblem::UnknownRanked { options, .. } => options,
        }
    }
}

/// Checks an approving decision against the stored request: a select approval needs
/// `decision.selected` naming an option, a rank approval a non-empty `decision.ranked` of option
/// keys. Callers word the problem for their audience (CLI or protocol).
pub fn check_decision(
    request: &Value,
    decision: Option<&Value>,
) -> std::result::Result<(), DecisionProblem> {
    let options: Vec<String> = request
        .get("options")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|o| o.get("key").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    match request.get("mode").and_then(Value::as_str) {
        Some("select") => {
            let Some(sel) = decision
                .and_then(|d| d.get("selected"))
                .and_then(Value::as_str)
            else {
                return Err(DecisionProblem::SelectionMissing { options });
            };
            if !options.is_empty() && !options.iter().any(|k| k == sel) {
                return Err(DecisionProblem::UnknownSelection {
                    selected: sel.to_string(),
                    options,
                });
            }
        }
        Some("rank") => {
            let ranked: Option<Vec<&str>> = decision
                .and_then(|d| d.get("ranked"))
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_str).collect());
            let Some(ranked) = ranked.filter(|r| !r.is_empty()) else {
                return Err(DecisionProblem::RankMissing { options });
            };
            if let Some(bad) = ranked.iter().find(|r| !options.iter().any(|k| k == *r)) {
                return Err(DecisionProblem::UnknownRanked {
                    key: bad.to_string(),
                    options,
                });
            }
        }
        _ => {}
    }
    Ok(())
}

/// A delivered signal (`signals.send` response shape).
#[derive(Debug, Clone, PartialEq)]
pub struct SignalDelivery {
    pub run_id: String,
    pub seq: i64,
    pub signal_name: String,
    pub correlation_id: Option<String>,
    pub received_at_ms: i64,
}

/// Records a signal for a run. Waiting nodes whose event name and correlation id match consume
/// it when the run is next evaluated.
pub async fn send_signal(
    store: &dyn Store,
    run_id: &str,
    name: &str,
    payload: Value,
    correlation_id: Option<&str>,
    received_by: Option<&str>,
) -> Result<SignalDelivery> {
    let name = name.trim();
    if name.is_empty() {
        return Err(SmithersError::new(
            Code::InvalidInput,
            "signal name must be a non-empty string",
        ));
    }
    let correlation = correlation_id
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    let row = run_row(store, run_id).await?;
    if status::is_ended(&row.status) {
        return Err(SmithersError::new(
            Code::RunNotActive,
            format!(
                "run `{run_id}` is `{}` and no longer takes signals",
                row.status
            ),
        ));
    }
    let now = now_ms();
    let seq = store
        .insert_signal(NewSignal {
            run_id: run_id.to_string(),
            signal_name: name.to_string(),
            correlation_id: correlation.clone(),
            payload_json: payload.to_string(),
            received_at_ms: now,
            received_by: received_by.map(str::to_string),
        })
        .await?;
    let mut batch = Batch::new();
    event(
        &mut batch,
        run_id,
        events::kind::SIGNAL_RECEIVED,
        json!({"signalName": name, "correlationId": correlation, "seq": seq}),
    );
    store.apply(batch).await?;
    Ok(SignalDelivery {
        run_id: run_id.to_string(),
        seq,
        signal_name: name.to_string(),
        correlation_id: correlation,
        received_at_ms: now,
    })
}
