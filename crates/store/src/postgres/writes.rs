//! `Write` variants as SQL, applied inside one transaction per batch.

use super::claims::{LOCK_EVENTS, lock_key, xact_lock};
use super::{Conn, DbErr, Param};
use crate::{Applied, Batch, OwnerGuard, RunPatch, Write, status};
use smithers_core::{Code, SmithersError};
use std::collections::HashMap;
use tokio_postgres::types::ToSql;

fn validate_run_status(run_id: &str, s: &str) -> Result<(), DbErr> {
    if status::ALL.contains(&s) {
        Ok(())
    } else {
        Err(DbErr::App(
            SmithersError::new(
                Code::InvalidInput,
                format!(
                    "run `{run_id}`: status `{s}` is not one of {}",
                    status::ALL.join(", ")
                ),
            )
            .terminal(),
        ))
    }
}

/// Locks the run row until commit and checks its owner: a concurrent `claim_run` by another
/// node waits for this batch (and then sees the state it wrote), and a claim that committed
/// first makes this batch fail with `RUN_LEASE_LOST`.
async fn check_guard(conn: &mut Conn, g: &OwnerGuard) -> Result<(), DbErr> {
    let row = conn
        .query_opt(
            "SELECT runtime_owner_id FROM _smithers_runs WHERE run_id = $1 FOR UPDATE",
            &[&g.run_id],
        )
        .await?;
    let owner: Option<Option<String>> = match row {
        Some(r) => Some(r.try_get(0)?),
        None => None,
    };
    let msg = match owner {
        Some(Some(o)) if o == g.owner => return Ok(()),
        Some(Some(o)) => format!(
            "run `{}` is now owned by `{o}`, not `{}`; another engine took it over, so this batch was discarded",
            g.run_id, g.owner
        ),
        Some(None) => format!(
            "run `{}` has no owner any more (`{}` lost it); this batch was discarded",
            g.run_id, g.owner
        ),
        None => format!(
            "run `{}` does not exist, so `{}` cannot own it; this batch was discarded",
            g.run_id, g.owner
        ),
    };
    Err(DbErr::App(
        SmithersError::new(Code::RunLeaseLost, msg).terminal(),
    ))
}

/// Applies a batch; the events it appends are announced to other nodes with a notice sent
/// on commit (see [`super::feed`]), signed with `instance`.
pub(crate) async fn exec_batch(
    conn: &mut Conn,
    batch: &Batch,
    instance: &str,
) -> Result<Applied, DbErr> {
    // Per-run event locks first, in a fixed order, so two batches touching the same runs
    // never wait on each other in opposite orders.
    let mut event_runs: Vec<&str> = batch
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::AppendEvent { run_id, .. } => Some(run_id.as_str()),
            _ => None,
        })
        .collect();
    event_runs.sort_unstable();
    event_runs.dedup();
    let mut keys: Vec<i64> = event_runs
        .iter()
        .map(|r| lock_key(LOCK_EVENTS, r))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        xact_lock(conn, key).await?;
    }
    if let Some(g) = &batch.guard {
        check_guard(conn, g).await?;
    }
    let mut first_seq: HashMap<&str, i64> = HashMap::new();
    let mut next_seq: HashMap<&str, i64> = HashMap::new();
    let mut applied = Applied::default();
    for w in &batch.writes {
        if let Write::AppendEvent {
            run_id,
            timestamp_ms,
            event_type,
            payload_json,
        } = w
        {
            let seq = match next_seq.get(run_id.as_str()) {
                Some(s) => *s,
                None => {
                    conn.query_i64(
                        "SELECT COALESCE(MAX(seq) + 1, 0)::BIGINT FROM _smithers_events WHERE run_id = $1",
                        &[run_id],
                    )
                    .await?
                }
            };
            conn.execute(
                "INSERT INTO _smithers_events (run_id, seq, timestamp_ms, type, payload_json)
                 VALUES ($1, $2, $3, $4, $5)",
                &[run_id, &seq, timestamp_ms, event_type, payload_json],
            )
            .await?;
            first_seq.entry(run_id.as_str()).or_insert(seq);
            next_seq.insert(run_id.as_str(), seq + 1);
            applied.event_seqs.push(seq);
        } else {
            exec_write(conn, w).await?;
        }
    }
    for (run_id, first) in first_seq {
        let last = next_seq.get(run_id).map_or(first, |n| n - 1);
        if let Some(notice) = super::feed::notice(instance, run_id, first, last) {
            conn.execute(super::feed::NOTIFY_SQL, &[&notice]).await?;
        }
    }
    Ok(applied)
}

fn duplicate(e: DbErr, msg: impl FnOnce() -> String) -> DbErr {
    if e.is_unique_violation() {
        DbErr::App(SmithersError::new(Code::DbWriteFailed, msg()).terminal())
    } else {
        e
    }
}

/// Executes one write other than `AppendEvent`.
async fn exec_write(conn: &mut Conn, w: &Write) -> Result<(), DbErr> {
    match w {
        Write::InsertRun(r) => {
            validate_run_status(&r.run_id, &r.status)?;
            let n = conn
                .execute(
                    "INSERT INTO _smithers_runs (run_id, parent_run_id, workflow_name, workflow_path, workflow_hash,
                        status, created_at_ms, started_at_ms, finished_at_ms, heartbeat_at_ms, runtime_owner_id,
                        cancel_requested_at_ms, hijack_requested_at_ms, hijack_target, vcs_type, vcs_root,
                        vcs_revision, error_json, config_json)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
                     ON CONFLICT (run_id) DO NOTHING",
                    &[
                        &r.run_id,
                        &r.parent_run_id,
                        &r.workflow_name,
                        &r.workflow_path,
                        &r.workflow_hash,
                        &r.status,
                        &r.created_at_ms,
                        &r.started_at_ms,
                        &r.finished_at_ms,
                        &r.heartbeat_at_ms,
                        &r.runtime_owner_id,
                        &r.cancel_requested_at_ms,
                        &r.hijack_requested_at_ms,
                        &r.hijack_target,
                        &r.vcs_type,
                        &r.vcs_root,
                        &r.vcs_revision,
                        &r.error_json,
                        &r.config_json,
                    ],
                )
                .await?;
            if n == 0 {
                return Err(DbErr::App(
                    SmithersError::new(
                        Code::RunExists,
                        format!("run `{}` already exists", r.run_id),
                    )
                    .terminal(),
                ));
            }
        }
        Write::UpdateRun { run_id, patch } => update_run(conn, run_id, patch).await?,
        Write::InsertInput {
            run_id,
            payload_json,
        } => {
            conn.execute(
                "INSERT INTO input (run_id, payload) VALUES ($1, $2) ON CONFLICT (run_id) DO NOTHING",
                &[run_id, payload_json],
            )
            .await?;
        }
        Write::UpsertNode(n) => {
            conn.execute(
                "INSERT INTO _smithers_nodes (run_id, node_id, iteration, state, last_attempt, updated_at_ms, output_table, label)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (run_id, node_id, iteration) DO UPDATE SET
                    state = excluded.state, last_attempt = excluded.last_attempt,
                    updated_at_ms = excluded.updated_at_ms, output_table = excluded.output_table,
                    label = excluded.label",
                &[
                    &n.run_id,
                    &n.node_id,
                    &n.iteration,
                    &n.state,
                    &n.last_attempt,
                    &n.updated_at_ms,
                    &n.output_table,
                    &n.label,
                ],
            )
            .await?;
        }
        Write::UpsertAttempt(a) => {
            conn.execute(
                "INSERT INTO _smithers_attempts (run_id, node_id, iteration, attempt, state, started_at_ms,
                    finished_at_ms, heartbeat_at_ms, heartbeat_data_json, error_json, jj_pointer, response_text,
                    jj_cwd, cached, meta_json)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                 ON CONFLICT (run_id, node_id, iteration, attempt) DO UPDATE SET
                    state = excluded.state, started_at_ms = excluded.started_at_ms,
                    finished_at_ms = excluded.finished_at_ms, heartbeat_at_ms = excluded.heartbeat_at_ms,
                    heartbeat_data_json = excluded.heartbeat_data_json, error_json = excluded.error_json,
                    jj_pointer = excluded.jj_pointer, response_text = excluded.response_text,
                    jj_cwd = excluded.jj_cwd, cached = excluded.cached, meta_json = excluded.meta_json",
                &[
                    &a.run_id,
                    &a.node_id,
                    &a.iteration,
                    &a.attempt,
                    &a.state,
                    &a.started_at_ms,
                    &a.finished_at_ms,
                    &a.heartbeat_at_ms,
                    &a.heartbeat_data_json,
                    &a.error_json,
                    &a.jj_pointer,
                    &a.response_text,
                    &a.jj_cwd,
                    &i64::from(a.cached),
                    &a.meta_json,
                ],
            )
            .await?;
        }
        Write::UpsertOutput(o) => {
            conn.execute(
                "INSERT INTO _smithers_outputs (run_id, node_id, iteration, output_table, payload_json, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (run_id, node_id, iteration) DO UPDATE SET
                    output_table = excluded.output_table, payload_json = excluded.payload_json,
                    created_at_ms = excluded.created_at_ms",
                &[
                    &o.run_id,
                    &o.node_id,
                    &o.iteration,
                    &o.output_table,
                    &o.payload_json,
                    &o.created_at_ms,
                ],
            )
            .await?;
        }
        Write::DeleteOutput {
            run_id,
            node_id,
            iteration,
        } => {
            conn.execute(
                "DELETE FROM _smithers_outputs WHERE run_id = $1 AND node_id = $2 AND iteration = $3",
                &[run_id, node_id, iteration],
            )
            .await?;
        }
        Write::ClearRunState { run_id } => {
            for sql in [
                "DELETE FROM _smithers_nodes WHERE run_id = $1",
                "DELETE FROM _smithers_outputs WHERE run_id = $1",
                "DELETE FROM _smithers_ralph WHERE run_id = $1",
            ] {
                conn.execute(sql, &[run_id]).await?;
            }
        }
        Write::DeleteFramesAfter { run_id, frame_no } => {
            for sql in [
                "DELETE FROM _smithers_frames WHERE run_id = $1 AND frame_no > $2",
                "DELETE FROM _smithers_snapshots WHERE run_id = $1 AND frame_no > $2",
            ] {
                conn.execute(sql, &[run_id, frame_no]).await?;
            }
        }
        Write::DeleteAttemptsAfter {
            run_id,
            started_after_ms,
        } => {
            conn.execute(
                "DELETE FROM _smithers_attempts WHERE run_id = $1 AND started_at_ms > $2",
                &[run_id, started_after_ms],
            )
            .await?;
            conn.execute(
                "DELETE FROM _smithers_approvals WHERE run_id = $1 AND COALESCE(decided_at_ms, requested_at_ms, 0) > $2",
                &[run_id, started_after_ms],
            )
            .await?;
        }
        Write::InsertFrame(f) => {
            conn.execute(
                "INSERT INTO _smithers_frames (run_id, frame_no, created_at_ms, xml_json, xml_hash, encoding,
                    mounted_task_ids_json, task_index_json, note)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &f.run_id,
                    &f.frame_no,
                    &f.created_at_ms,
                    &f.xml_json,
                    &f.xml_hash,
                    &f.encoding,
                    &f.mounted_task_ids_json,
                    &f.task_index_json,
                    &f.note,
                ],
            )
            .await
            .map_err(|e| {
                duplicate(e, || {
                    format!(
                        "frame {} of run `{}` already exists",
                        f.frame_no, f.run_id
                    )
                })
            })?;
        }
        Write::InsertSnapshot(s) => {
            conn.execute(
                "INSERT INTO _smithers_snapshots (run_id, frame_no, encoding, nodes_json, outputs_json, ralph_json,
                    input_json, vcs_pointer, workflow_hash, content_hash, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    &s.run_id,
                    &s.frame_no,
                    &s.encoding,
                    &s.nodes_json,
                    &s.outputs_json,
                    &s.ralph_json,
                    &s.input_json,
                    &s.vcs_pointer,
                    &s.workflow_hash,
                    &s.content_hash,
                    &s.created_at_ms,
                ],
            )
            .await
            .map_err(|e| {
                duplicate(e, || {
                    format!(
                        "snapshot of frame {} of run `{}` already exists",
                        s.frame_no, s.run_id
                    )
                })
            })?;
        }
        Write::AppendEvent { .. } => {
            // Handled by `exec_batch`, which assigns the seq.
            return Err(DbErr::App(SmithersError::new(
                Code::Internal,
                "AppendEvent reached exec_write",
            )));
        }
        Write::UpsertAudit(a) => {
            conn.execute(
                "INSERT INTO _smithers_time_travel_audit (id, run_id, from_frame_no, to_frame_no, caller,
                    timestamp_ms, result, duration_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (id) DO UPDATE SET
                    from_frame_no = excluded.from_frame_no, to_frame_no = excluded.to_frame_no,
                    result = excluded.result, duration_ms = excluded.duration_ms",
                &[
                    &a.id,
                    &a.run_id,
                    &a.from_frame_no,
                    &a.to_frame_no,
                    &a.caller,
                    &a.timestamp_ms,
                    &a.result,
                    &a.duration_ms,
                ],
            )
            .await?;
        }
        Write::UpsertNodeDiff(d) => {
            conn.execute(
                "INSERT INTO _smithers_node_diffs (run_id, node_id, iteration, base_ref, attempt,
                    attempt_started_at_ms, bundle_json, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (run_id, node_id, iteration, attempt, base_ref) DO UPDATE SET
                    attempt_started_at_ms = excluded.attempt_started_at_ms,
                    bundle_json = excluded.bundle_json, created_at_ms = excluded.created_at_ms",
                &[
                    &d.run_id,
                    &d.node_id,
                    &d.iteration,
                    &d.base_ref,
                    &d.attempt,
                    &d.attempt_started_at_ms,
                    &d.bundle_json,
                    &d.created_at_ms,
                ],
            )
            .await?;
        }
        Write::DeleteAttempt {
            run_id,
            node_id,
            iteration,
            attempt,
        } => {
            for sql in [
                "DELETE FROM _smithers_attempts WHERE run_id = $1 AND node_id = $2 AND iteration = $3 AND attempt = $4",
                "DELETE FROM _smithers_node_diffs WHERE run_id = $1 AND node_id = $2 AND iteration = $3 AND attempt = $4",
            ] {
                conn.execute(sql, &[run_id, node_id, iteration, attempt])
                    .await?;
            }
        }
        Write::DeleteNodeDiffsAfter {
            run_id,
            started_after_ms,
        } => {
            conn.execute(
                "DELETE FROM _smithers_node_diffs WHERE run_id = $1 AND attempt_started_at_ms > $2",
                &[run_id, started_after_ms],
            )
            .await?;
        }
        Write::UpsertLoop(l) => {
            conn.execute(
                "INSERT INTO _smithers_ralph (run_id, ralph_id, iteration, done, updated_at_ms)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (run_id, ralph_id) DO UPDATE SET
                    iteration = excluded.iteration, done = excluded.done, updated_at_ms = excluded.updated_at_ms",
                &[
                    &l.run_id,
                    &l.ralph_id,
                    &l.iteration,
                    &i64::from(l.done),
                    &l.updated_at_ms,
                ],
            )
            .await?;
        }
        Write::UpsertApproval(a) => {
            conn.execute(
                "INSERT INTO _smithers_approvals (run_id, node_id, iteration, status, requested_at_ms, decided_at_ms,
                    note, decided_by, request_json, decision_json, auto_approved)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (run_id, node_id, iteration) DO UPDATE SET
                    status = excluded.status, requested_at_ms = excluded.requested_at_ms,
                    decided_at_ms = excluded.decided_at_ms, note = excluded.note, decided_by = excluded.decided_by,
                    request_json = excluded.request_json, decision_json = excluded.decision_json,
                    auto_approved = excluded.auto_approved",
                &[
                    &a.run_id,
                    &a.node_id,
                    &a.iteration,
                    &a.status,
                    &a.requested_at_ms,
                    &a.decided_at_ms,
                    &a.note,
                    &a.decided_by,
                    &a.request_json,
                    &a.decision_json,
                    &i64::from(a.auto_approved),
                ],
            )
            .await?;
        }
    }
    Ok(())
}

/// One column value of a run patch.
enum Val {
    Int(Option<i64>),
    Text(Option<String>),
}

async fn update_run(conn: &mut Conn, run_id: &str, p: &RunPatch) -> Result<(), DbErr> {
    let mut sets: Vec<(&str, Val)> = Vec::new();
    if let Some(s) = &p.status {
        validate_run_status(run_id, s)?;
        sets.push(("status", Val::Text(Some(s.clone()))));
    }
    if let Some(v) = &p.workflow_name {
        sets.push(("workflow_name", Val::Text(Some(v.clone()))));
    }
    if let Some(v) = p.started_at_ms {
        sets.push(("started_at_ms", Val::Int(v)));
    }
    if let Some(v) = p.finished_at_ms {
        sets.push(("finished_at_ms", Val::Int(v)));
    }
    if let Some(v) = p.heartbeat_at_ms {
        sets.push(("heartbeat_at_ms", Val::Int(v)));
    }
    if let Some(v) = &p.runtime_owner_id {
        sets.push(("runtime_owner_id", Val::Text(v.clone())));
    }
    if let Some(v) = p.cancel_requested_at_ms {
        sets.push(("cancel_requested_at_ms", Val::Int(v)));
    }
    if let Some(v) = &p.error_json {
        sets.push(("error_json", Val::Text(v.clone())));
    }
    if let Some(v) = &p.config_json {
        sets.push(("config_json", Val::Text(v.clone())));
    }
    let n = if sets.is_empty() {
        let found = conn
            .query_opt("SELECT 1 FROM _smithers_runs WHERE run_id = $1", &[&run_id])
            .await?;
        u64::from(found.is_some())
    } else {
        let assignments: Vec<String> = sets
            .iter()
            .enumerate()
            .map(|(i, (col, _))| format!("{col} = ${}", i + 2))
            .collect();
        let sql = format!(
            "UPDATE _smithers_runs SET {} WHERE run_id = $1",
            assignments.join(", ")
        );
        let mut params: Vec<Param<'_>> = Vec::with_capacity(sets.len() + 1);
        params.push(&run_id);
        for (_, v) in &sets {
            params.push(match v {
                Val::Int(i) => i as &(dyn ToSql + Sync),
                Val::Text(t) => t as &(dyn ToSql + Sync),
            });
        }
        conn.execute(&sql, &params).await?
    };
    if n == 0 {
        return Err(DbErr::App(
            SmithersError::new(
                Code::RunNotFound,
                format!("run `{run_id}` does not exist, so it cannot be updated"),
            )
            .terminal(),
        ));
    }
    Ok(())
}
