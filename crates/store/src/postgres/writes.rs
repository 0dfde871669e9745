//! `Write` variants as SQL, applied inside one transaction per group of batches (see
//! [`super::group`]) and sent in one round trip.

use super::claims::{LOCK_EVENTS, lock_key};
use super::{Conn, DbErr, Param, pipeline};
use crate::{Applied, Batch, OwnerGuard, RunPatch, Write, status};
use smithers_core::{Code, SmithersError};
use std::borrow::Cow;
use std::collections::HashMap;
use tokio_postgres::Row;

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

/// A statement of a batch and what its answer must satisfy.
struct Stmt<'a> {
    sql: Cow<'a, str>,
    params: Vec<Param<'a>>,
    check: Check<'a>,
}

/// How a statement's rows (or error) are judged once the whole batch has been answered.
enum Check<'a> {
    /// Any rows; errors pass through.
    Nothing,
    /// The run row locked for a guard: its owner must be the guard's.
    Guard(&'a OwnerGuard),
    /// `INSERT … ON CONFLICT DO NOTHING RETURNING 1` of a run: no row means it exists.
    RunInserted(&'a str),
    /// `UPDATE … RETURNING 1` (or a `SELECT 1`) of a run: no row means there is no such run.
    RunUpdated(&'a str),
    /// The transaction's events appended: rows of run ids and the seqs they got.
    Events(&'a EventCols<'a>),
    /// An insert whose unique violation means the row exists already.
    Unique(&'static str, &'a str, i64),
}

impl<'a> Stmt<'a> {
    fn new(sql: &'static str, params: Vec<Param<'a>>) -> Self {
        Stmt {
            sql: Cow::Borrowed(sql),
            params,
            check: Check::Nothing,
        }
    }

    fn checked(sql: &'static str, params: Vec<Param<'a>>, check: Check<'a>) -> Self {
        Stmt {
            sql: Cow::Borrowed(sql),
            params,
            check,
        }
    }
}

/// The verdict on a locked run row of the guard's run (`None` when there is no such run):
/// a claim that committed first makes the batch fail with `RUN_LEASE_LOST`.
fn check_guard(g: &OwnerGuard, owner: Option<Option<String>>) -> Result<(), DbErr> {
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

impl Check<'_> {
    /// Judges one statement's answer (the events' seqs are read by [`EventCols::seqs`]).
    fn judge(&self, answer: Result<Vec<Row>, DbErr>) -> Result<(), DbErr> {
        let rows = match (self, answer) {
            (Check::Unique(what, run_id, frame_no), Err(e)) => {
                return Err(duplicate(e, || {
                    format!("{what} {frame_no} of run `{run_id}` already exists")
                }));
            }
            (_, Err(e)) => return Err(e),
            (_, Ok(rows)) => rows,
        };
        match self {
            Check::Nothing | Check::Unique(..) | Check::Events(_) => Ok(()),
            Check::Guard(g) => {
                let owner = match rows.first() {
                    Some(r) => Some(r.try_get(0)?),
                    None => None,
                };
                check_guard(g, owner)
            }
            Check::RunInserted(run_id) if rows.is_empty() => Err(DbErr::App(
                SmithersError::new(Code::RunExists, format!("run `{run_id}` already exists"))
                    .terminal(),
            )),
            Check::RunUpdated(run_id) if rows.is_empty() => Err(DbErr::App(
                SmithersError::new(
                    Code::RunNotFound,
                    format!("run `{run_id}` does not exist, so it cannot be updated"),
                )
                .terminal(),
            )),
            Check::RunInserted(_) | Check::RunUpdated(_) => Ok(()),
        }
    }
}

/// Takes the per-run event locks of a transaction (`$1`: their keys, sorted), one after the
/// other in that order.
const LOCKS_SQL: &str = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::BIGINT[]) AS k";

/// Locks a guard's run row and reads its owner (`$1`: the run id). A transaction locks its
/// guards' rows in run id order, as the lease heartbeat does. (One statement for all of them,
/// `run_id = ANY($1) ORDER BY run_id FOR UPDATE`, was measured: two nodes got half as fast.)
const GUARD_SQL: &str = "SELECT runtime_owner_id FROM _smithers_runs WHERE run_id = $1 FOR UPDATE";

/// Appends events in one statement: `$1`–`$4` are their run ids, timestamps, types and
/// payloads, `$5` each event's place among the events of its run in this statement (0, 1, …).
/// An event's seq is its run's last seq + 1 + its place; the statement reads a run's last seq
/// before any of its own rows (a statement does not see what it inserts). The transaction
/// holds the runs' event locks, so the seqs stay gapless and unique.
const APPEND_EVENTS_SQL: &str =
    "INSERT INTO _smithers_events (run_id, seq, timestamp_ms, type, payload_json)
     SELECT e.run_id, last.next + e.place, e.ts, e.ty, e.payload
     FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[])
          AS e(run_id, ts, ty, payload, place)
     CROSS JOIN LATERAL (SELECT COALESCE(MAX(seq) + 1, 0) AS next FROM _smithers_events
                         WHERE run_id = e.run_id) AS last
     RETURNING run_id, seq";

/// The `AppendEvent` writes of a transaction's batches as columns, batch after batch, for
/// [`APPEND_EVENTS_SQL`].
struct EventCols<'a> {
    run_ids: Vec<&'a str>,
    timestamps: Vec<i64>,
    types: Vec<&'a str>,
    payloads: Vec<&'a str>,
    places: Vec<i64>,
    /// The batch of each event.
    batch: Vec<usize>,
}

impl<'a> EventCols<'a> {
    fn of(batches: &[&'a Batch]) -> Self {
        let mut cols = EventCols {
            run_ids: Vec::new(),
            timestamps: Vec::new(),
            types: Vec::new(),
            payloads: Vec::new(),
            places: Vec::new(),
            batch: Vec::new(),
        };
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for (b, batch) in batches.iter().enumerate() {
            for w in &batch.writes {
                if let Write::AppendEvent {
                    run_id,
                    timestamp_ms,
                    event_type,
                    payload_json,
                } = w
                {
                    let n = counts.entry(run_id.as_str()).or_insert(0);
                    cols.places.push(*n);
                    *n += 1;
                    cols.run_ids.push(run_id);
                    cols.timestamps.push(*timestamp_ms);
                    cols.types.push(event_type);
                    cols.payloads.push(payload_json);
                    cols.batch.push(b);
                }
            }
        }
        cols
    }

    /// How many events each run gets, by run id.
    fn per_run(&self) -> Vec<(&'a str, i64)> {
        let mut n: HashMap<&'a str, i64> = HashMap::new();
        for r in &self.run_ids {
            *n.entry(r).or_insert(0) += 1;
        }
        let mut out: Vec<(&'a str, i64)> = n.into_iter().collect();
        out.sort_unstable();
        out
    }

    /// Each event's seq, in order, from the rows the statement returned: a run's first seq is
    /// the smallest it got, and its other events follow by their places.
    fn seqs(&self, rows: &[Row]) -> Result<Vec<i64>, DbErr> {
        if rows.len() != self.run_ids.len() {
            return Err(DbErr::App(SmithersError::new(
                Code::Internal,
                format!(
                    "appending {} events stored {} rows",
                    self.run_ids.len(),
                    rows.len()
                ),
            )));
        }
        let mut first: HashMap<&str, i64> = HashMap::new();
        for row in rows {
            let run_id: &str = row.try_get(0)?;
            let seq: i64 = row.try_get(1)?;
            let s = first.entry(run_id).or_insert(seq);
            *s = (*s).min(seq);
        }
        self.run_ids
            .iter()
            .zip(&self.places)
            .map(|(run_id, place)| {
                first.get(run_id).map(|s| s + place).ok_or_else(|| {
                    DbErr::App(SmithersError::new(
                        Code::Internal,
                        format!("appending events of run `{run_id}` returned no seq for it"),
                    ))
                })
            })
            .collect()
    }
}

/// Applies batches in the open transaction (opening it first when `begin` is set), all their
/// statements in one round trip (see [`super::pipeline`]). In order: the per-run event locks,
/// the guards' run rows locked (`SELECT … FOR UPDATE`, so a concurrent `claim_run` by another
/// node waits for this transaction and then sees what it wrote), each batch's writes other
/// than events, all the events in one statement ([`APPEND_EVENTS_SQL`]: with many batches per
/// transaction, statements cost more than rows), and for each run with new events a notice to
/// other nodes sent on commit (see [`super::feed`]), signed with `instance`. Seqs are computed
/// in the `INSERT` (the run's last seq + 1 + the event's place) under the runs' event locks, so
/// they stay gapless and unique across processes.
///
/// Locks of several batches are taken in one order (event locks by key, run rows by run id),
/// the order the heartbeat locks run rows in too, so two transactions never wait on each other
/// in opposite orders. Returns what each batch produced, in the order given. Any error fails
/// them all (the caller rolls back); one that a batch's own write or lease check raised names
/// that batch ([`DbErr::InBatch`]), so the caller can fail it alone and apply the others again.
pub(crate) async fn exec_batches(
    conn: &mut Conn,
    batches: &[&Batch],
    instance: &str,
    begin: bool,
) -> Result<Vec<Applied>, DbErr> {
    let writes: usize = batches.iter().map(|b| b.writes.len()).sum();
    let events = EventCols::of(batches);
    let appended = events.per_run();
    let mut keys: Vec<i64> = appended
        .iter()
        .map(|(r, _)| lock_key(LOCK_EVENTS, r))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    // each guard with its batch, in run id order
    let mut guards: Vec<(&OwnerGuard, usize)> = batches
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.guard.as_ref().map(|g| (g, i)))
        .collect();
    guards.sort_unstable_by(|a, b| a.0.run_id.cmp(&b.0.run_id));
    let mut plan: Vec<Stmt<'_>> =
        Vec::with_capacity(writes + keys.len() + guards.len() + appended.len());
    // `owner[i]`: the batch statement i checks or writes for (None for the shared locks and
    // notices), so that an error can be pinned on its batch
    let mut owner: Vec<Option<usize>> = Vec::with_capacity(plan.capacity());
    if !keys.is_empty() {
        plan.push(Stmt::new(LOCKS_SQL, vec![&keys]));
        owner.push(None);
    }
    for (g, i) in &guards {
        plan.push(Stmt::checked(GUARD_SQL, vec![&g.run_id], Check::Guard(g)));
        owner.push(Some(*i));
    }
    for (i, b) in batches.iter().enumerate() {
        for w in &b.writes {
            plan_write(w, &mut plan).map_err(|e| e.in_batch(i))?;
        }
        owner.resize(plan.len(), Some(i));
    }
    if !events.run_ids.is_empty() {
        plan.push(Stmt::checked(
            APPEND_EVENTS_SQL,
            vec![
                &events.run_ids,
                &events.timestamps,
                &events.types,
                &events.payloads,
                &events.places,
            ],
            Check::Events(&events),
        ));
        owner.push(None);
    }
    let instance = instance.to_string();
    let mut notices: (Vec<&str>, Vec<i64>, Vec<bool>) = Default::default();
    for (run_id, n) in &appended {
        if super::feed::fits(&instance, run_id) {
            notices.0.push(run_id);
            notices.1.push(*n);
            notices.2.push(super::feed::may_carry(run_id));
        }
    }
    if !notices.0.is_empty() {
        plan.push(Stmt::new(
            super::feed::NOTIFY_SQL,
            vec![&instance, &notices.0, &notices.1, &notices.2],
        ));
    }
    owner.resize(plan.len(), None);
    let sent: Vec<(&str, &[Param<'_>])> = plan
        .iter()
        .map(|s| (s.sql.as_ref(), s.params.as_slice()))
        .collect();
    let answers = pipeline::send_all(conn, begin, &sent).await?;
    let mut applied = vec![Applied::default(); batches.len()];
    for ((stmt, answer), i) in plan.iter().zip(answers).zip(owner) {
        if let Check::Events(events) = stmt.check {
            let rows = answer?;
            for (seq, b) in events.seqs(&rows)?.into_iter().zip(&events.batch) {
                if let Some(a) = applied.get_mut(*b) {
                    a.event_seqs.push(seq);
                }
            }
            continue;
        }
        stmt.check.judge(answer).map_err(|e| match i {
            Some(i) => e.in_batch(i),
            None => e,
        })?;
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

/// Adds the statements of one write to `plan`.
fn plan_write<'a>(w: &'a Write, plan: &mut Vec<Stmt<'a>>) -> Result<(), DbErr> {
    match w {
        Write::InsertRun(r) => {
            validate_run_status(&r.run_id, &r.status)?;
            plan.push(Stmt::checked(
                "INSERT INTO _smithers_runs (run_id, parent_run_id, workflow_name, workflow_path, workflow_hash,
                        status, created_at_ms, started_at_ms, finished_at_ms, heartbeat_at_ms, runtime_owner_id,
                        cancel_requested_at_ms, hijack_requested_at_ms, hijack_target, vcs_type, vcs_root,
                        vcs_revision, error_json, config_json)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
                     ON CONFLICT (run_id) DO NOTHING RETURNING 1",
                vec![
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
                Check::RunInserted(&r.run_id),
            ));
        }
        Write::UpdateRun { run_id, patch } => plan.push(update_run(run_id, patch)?),
        Write::InsertInput {
            run_id,
            payload_json,
        } => {
            plan.push(Stmt::new("INSERT INTO input (run_id, payload) VALUES ($1, $2) ON CONFLICT (run_id) DO NOTHING", vec![run_id, payload_json]));
        }
        Write::UpsertNode(n) => {
            plan.push(Stmt::new("INSERT INTO _smithers_nodes (run_id, node_id, iteration, state, last_attempt, updated_at_ms, output_table, label)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (run_id, node_id, iteration) DO UPDATE SET
                    state = excluded.state, last_attempt = excluded.last_attempt,
                    updated_at_ms = excluded.updated_at_ms, output_table = excluded.output_table,
                    label = excluded.label", vec![
                    &n.run_id,
                    &n.node_id,
                    &n.iteration,
                    &n.state,
                    &n.last_attempt,
                    &n.updated_at_ms,
                    &n.output_table,
                    &n.label,
                ]));
        }
        Write::UpsertAttempt(a) => {
            plan.push(Stmt::new("INSERT INTO _smithers_attempts (run_id, node_id, iteration, attempt, state, started_at_ms,
                    finished_at_ms, heartbeat_at_ms, heartbeat_data_json, error_json, jj_pointer, response_text,
                    jj_cwd, cached, meta_json)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                    CASE WHEN $14::BOOLEAN THEN 1 ELSE 0 END, $15)
                 ON CONFLICT (run_id, node_id, iteration, attempt) DO UPDATE SET
                    state = excluded.state, started_at_ms = excluded.started_at_ms,
                    finished_at_ms = excluded.finished_at_ms, heartbeat_at_ms = excluded.heartbeat_at_ms,
                    heartbeat_data_json = excluded.heartbeat_data_json, error_json = excluded.error_json,
                    jj_pointer = excluded.jj_pointer, response_text = excluded.response_text,
                    jj_cwd = excluded.jj_cwd, cached = excluded.cached, meta_json = excluded.meta_json", vec![
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
                    &a.cached,
                    &a.meta_json,
                ]));
        }
        Write::UpsertOutput(o) => {
            plan.push(Stmt::new("INSERT INTO _smithers_outputs (run_id, node_id, iteration, output_table, payload_json, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (run_id, node_id, iteration) DO UPDATE SET
                    output_table = excluded.output_table, payload_json = excluded.payload_json,
                    created_at_ms = excluded.created_at_ms", vec![
                    &o.run_id,
                    &o.node_id,
                    &o.iteration,
                    &o.output_table,
                    &o.payload_json,
                    &o.created_at_ms,
                ]));
        }
        Write::DeleteOutput {
            run_id,
            node_id,
            iteration,
        } => {
            plan.push(Stmt::new("DELETE FROM _smithers_outputs WHERE run_id = $1 AND node_id = $2 AND iteration = $3", vec![run_id, node_id, iteration]));
        }
        Write::ClearRunState { run_id } => {
            for sql in [
                "DELETE FROM _smithers_nodes WHERE run_id = $1",
                "DELETE FROM _smithers_outputs WHERE run_id = $1",
                "DELETE FROM _smithers_ralph WHERE run_id = $1",
            ] {
                plan.push(Stmt::new(sql, vec![run_id]));
            }
        }
        Write::DeleteFramesAfter { run_id, frame_no } => {
            for sql in [
                "DELETE FROM _smithers_frames WHERE run_id = $1 AND frame_no > $2",
                "DELETE FROM _smithers_snapshots WHERE run_id = $1 AND frame_no > $2",
            ] {
                plan.push(Stmt::new(sql, vec![run_id, frame_no]));
            }
        }
        Write::DeleteAttemptsAfter {
            run_id,
            started_after_ms,
        } => {
            plan.push(Stmt::new(
                "DELETE FROM _smithers_attempts WHERE run_id = $1 AND started_at_ms > $2",
                vec![run_id, started_after_ms],
            ));
            plan.push(Stmt::new("DELETE FROM _smithers_approvals WHERE run_id = $1 AND COALESCE(decided_at_ms, requested_at_ms, 0) > $2", vec![run_id, started_after_ms]));
        }
        Write::InsertFrame(f) => {
            plan.push(Stmt::checked(
                "INSERT INTO _smithers_frames (run_id, frame_no, created_at_ms, xml_json, xml_hash, encoding,
                    mounted_task_ids_json, task_index_json, note)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                vec![
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
                Check::Unique("frame", &f.run_id, f.frame_no),
            ));
        }
        Write::InsertSnapshot(s) => {
            plan.push(Stmt::checked(
                "INSERT INTO _smithers_snapshots (run_id, frame_no, encoding, nodes_json, outputs_json, ralph_json,
                    input_json, vcs_pointer, workflow_hash, content_hash, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                vec![
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
                Check::Unique("snapshot of frame", &s.run_id, s.frame_no),
            ));
        }
        // appended together, after all the batches' other writes (see `EventCols`)
        Write::AppendEvent { .. } => {}
        Write::UpsertAudit(a) => {
            plan.push(Stmt::new(
                "INSERT INTO _smithers_time_travel_audit (id, run_id, from_frame_no, to_frame_no, caller,
                    timestamp_ms, result, duration_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (id) DO UPDATE SET
                    from_frame_no = excluded.from_frame_no, to_frame_no = excluded.to_frame_no,
                    result = excluded.result, duration_ms = excluded.duration_ms",
                vec![
                    &a.id,
                    &a.run_id,
                    &a.from_frame_no,
                    &a.to_frame_no,
                    &a.caller,
                    &a.timestamp_ms,
                    &a.result,
                    &a.duration_ms,
                ],
            ));
        }
        Write::UpsertNodeDiff(d) => {
            plan.push(Stmt::new(
                "INSERT INTO _smithers_node_diffs (run_id, node_id, iteration, base_ref, attempt,
                    attempt_started_at_ms, bundle_json, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (run_id, node_id, iteration, attempt, base_ref) DO UPDATE SET
                    attempt_started_at_ms = excluded.attempt_started_at_ms,
                    bundle_json = excluded.bundle_json, created_at_ms = excluded.created_at_ms",
                vec![
                    &d.run_id,
                    &d.node_id,
                    &d.iteration,
                    &d.base_ref,
                    &d.attempt,
                    &d.attempt_started_at_ms,
                    &d.bundle_json,
                    &d.created_at_ms,
                ],
            ));
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
                plan.push(Stmt::new(sql, vec![run_id, node_id, iteration, attempt]));
            }
        }
        Write::DeleteNodeDiffsAfter {
            run_id,
            started_after_ms,
        } => {
            plan.push(Stmt::new(
                "DELETE FROM _smithers_node_diffs WHERE run_id = $1 AND attempt_started_at_ms > $2",
                vec![run_id, started_after_ms],
            ));
        }
        Write::UpsertLoop(l) => {
            plan.push(Stmt::new("INSERT INTO _smithers_ralph (run_id, ralph_id, iteration, done, updated_at_ms)
                 VALUES ($1, $2, $3, CASE WHEN $4::BOOLEAN THEN 1 ELSE 0 END, $5)
                 ON CONFLICT (run_id, ralph_id) DO UPDATE SET
                    iteration = excluded.iteration, done = excluded.done, updated_at_ms = excluded.updated_at_ms", vec![
                    &l.run_id,
                    &l.ralph_id,
                    &l.iteration,
                    &l.done,
                    &l.updated_at_ms,
                ]));
        }
        Write::UpsertApproval(a) => {
            plan.push(Stmt::new("INSERT INTO _smithers_approvals (run_id, node_id, iteration, status, requested_at_ms, decided_at_ms,
                    note, decided_by, request_json, decision_json, auto_approved)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                    CASE WHEN $11::BOOLEAN THEN 1 ELSE 0 END)
                 ON CONFLICT (run_id, node_id, iteration) DO UPDATE SET
                    status = excluded.status, requested_at_ms = excluded.requested_at_ms,
                    decided_at_ms = excluded.decided_at_ms, note = excluded.note, decided_by = excluded.decided_by,
                    request_json = excluded.request_json, decision_json = excluded.decision_json,
                    auto_approved = excluded.auto_approved", vec![
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
                    &a.auto_approved,
                ]));
        }
    }
    Ok(())
}

/// The `UPDATE` of a run patch (a `SELECT 1` for an empty patch): either must find the run.
fn update_run<'a>(run_id: &'a String, p: &'a RunPatch) -> Result<Stmt<'a>, DbErr> {
    let mut sets: Vec<(&str, Param<'a>)> = Vec::new();
    if let Some(s) = &p.status {
        validate_run_status(run_id, s)?;
        sets.push(("status", s));
    }
    if let Some(v) = &p.workflow_name {
        sets.push(("workflow_name", v));
    }
    if let Some(v) = &p.started_at_ms {
        sets.push(("started_at_ms", v));
    }
    if let Some(v) = &p.finished_at_ms {
        sets.push(("finished_at_ms", v));
    }
    if let Some(v) = &p.heartbeat_at_ms {
        sets.push(("heartbeat_at_ms", v));
    }
    if let Some(v) = &p.runtime_owner_id {
        sets.push(("runtime_owner_id", v));
    }
    if let Some(v) = &p.cancel_requested_at_ms {
        sets.push(("cancel_requested_at_ms", v));
    }
    if let Some(v) = &p.error_json {
        sets.push(("error_json", v));
    }
    if let Some(v) = &p.config_json {
        sets.push(("config_json", v));
    }
    let check = Check::RunUpdated(run_id);
    if sets.is_empty() {
        return Ok(Stmt::checked(
            "SELECT 1 FROM _smithers_runs WHERE run_id = $1",
            vec![run_id],
            check,
        ));
    }
    let assignments: Vec<String> = sets
        .iter()
        .enumerate()
        .map(|(i, (col, _))| format!("{col} = ${}", i + 2))
        .collect();
    let sql = format!(
        "UPDATE _smithers_runs SET {} WHERE run_id = $1 RETURNING 1",
        assignments.join(", ")
    );
    let mut params: Vec<Param<'a>> = Vec::with_capacity(sets.len() + 1);
    params.push(run_id);
    params.extend(sets.into_iter().map(|(_, v)| v));
    Ok(Stmt {
        sql: Cow::Owned(sql),
        params,
        check,
    })
}
