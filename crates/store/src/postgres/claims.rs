//! Write operations other than batches (leases, heartbeats, cancel, signals, crons), and the
//! dispatch of every write to its SQL. Each runs inside the transaction opened by the caller.

use super::reads::Cols;
use super::{Conn, DbErr, writes};
use crate::{Applied, Batch, CronRow, Heartbeat, NewSignal};

pub(crate) enum Op<'a> {
    /// Batches applied together, and the id this store signs its event notices with.
    Apply(&'a [&'a Batch], &'a str),
    Claim {
        run_id: &'a str,
        owner: &'a str,
        now_ms: i64,
        stale_before_ms: i64,
        dead_owner: Option<&'a str>,
    },
    Heartbeat {
        owner: &'a str,
        now_ms: i64,
    },
    Cancel {
        run_id: &'a str,
        now_ms: i64,
    },
    Signal(&'a NewSignal),
    UpsertCron(&'a CronRow),
    DeleteCron(&'a str),
    UpdateCronRun {
        cron_id: &'a str,
        last_run_at_ms: Option<i64>,
        next_run_at_ms: Option<i64>,
        error_json: Option<&'a str>,
    },
    ClaimCron {
        cron_id: &'a str,
        expected: Option<i64>,
        new_next: i64,
        now_ms: i64,
    },
    Delivery(super::deliveries::Write<'a>),
}

impl Op<'_> {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Op::Apply(..) => "apply",
            Op::Claim { .. } => "claim_run",
            Op::Heartbeat { .. } => "heartbeat",
            Op::Cancel { .. } => "request_cancel",
            Op::Signal(_) => "insert_signal",
            Op::UpsertCron(_) => "upsert_cron",
            Op::DeleteCron(_) => "delete_cron",
            Op::UpdateCronRun { .. } => "update_cron_run",
            Op::ClaimCron { .. } => "claim_due_cron",
            Op::Delivery(w) => w.name(),
        }
    }
}

pub(crate) enum Out {
    /// What each batch of an `Apply` produced, in its order.
    Applied(Vec<Applied>),
    Flag(bool),
    Seq(i64),
    Heartbeat(Heartbeat),
    Count(u64),
}

/// Advisory-lock key classes (first half of the two-key form is not used: one 64-bit key made
/// of a class tag and a hash of the run id keeps the lock space of other applications free).
pub(crate) const LOCK_EVENTS: &str = "smithers:events:";
pub(crate) const LOCK_SIGNALS: &str = "smithers:signals:";

/// A stable 64-bit key for a transaction-level advisory lock (FNV-1a: the same in every
/// process and build, unlike a randomly seeded hasher).
pub(crate) fn lock_key(class: &str, id: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in class.bytes().chain(id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// Takes a transaction-level advisory lock (`$1`: the key).
pub(crate) const XACT_LOCK_SQL: &str = "SELECT pg_advisory_xact_lock($1)";

/// Holds `key` until the transaction ends.
pub(crate) async fn xact_lock(conn: &mut Conn, key: i64) -> Result<(), DbErr> {
    conn.execute(XACT_LOCK_SQL, &[&key]).await?;
    Ok(())
}

pub(crate) async fn exec_op(conn: &mut Conn, op: &Op<'_>) -> Result<Out, DbErr> {
    match op {
        Op::Apply(batches, instance) => writes::exec_batches(conn, batches, instance, true)
            .await
            .map(Out::Applied),
        Op::Claim {
            run_id,
            owner,
            now_ms,
            stale_before_ms,
            dead_owner,
        } => {
            // One conditional UPDATE of a row locked without waiting: a row locked by another
            // transaction (a concurrent claim, or the batch or heartbeat of an owner that may be
            // frozen with its transaction open) is not claimed now, and a later pass tries
            // again, instead of this node queueing behind it. Concurrent claims of a free row
            // serialize on the lock; the loser skips it.
            let n = conn
                .execute(
                    "UPDATE _smithers_runs SET runtime_owner_id = $2, heartbeat_at_ms = $3
                     WHERE run_id = (SELECT run_id FROM _smithers_runs WHERE run_id = $1
                                     FOR UPDATE SKIP LOCKED)
                       AND (runtime_owner_id IS NULL
                            OR heartbeat_at_ms IS NULL
                            OR heartbeat_at_ms < $4
                            OR ($5::TEXT IS NOT NULL AND runtime_owner_id = $5::TEXT))",
                    &[run_id, owner, now_ms, stale_before_ms, dead_owner],
                )
                .await?;
            Ok(Out::Flag(n == 1))
        }
        Op::Heartbeat { owner, now_ms } => {
            let rows = conn
                .query(
                    // rows locked in run id order, as a transaction of several batches locks
                    // its guards' rows: the two never wait on each other in opposite orders
                    "UPDATE _smithers_runs SET heartbeat_at_ms = $2
                     WHERE run_id IN (SELECT run_id FROM _smithers_runs WHERE runtime_owner_id = $1
                                      ORDER BY run_id FOR UPDATE)
                       AND runtime_owner_id = $1
                     RETURNING run_id, cancel_requested_at_ms",
                    &[owner, now_ms],
                )
                .await?;
            let mut hb = Heartbeat::default();
            for row in &rows {
                let c = Cols::new(row, "_smithers_runs", &["run_id"]);
                let run_id: String = c.get("run_id")?;
                let cancel: Option<i64> = c.get("cancel_requested_at_ms")?;
                if cancel.is_some() {
                    hb.cancel_requested.push(run_id.clone());
                }
                hb.owned.push(run_id);
            }
            hb.owned.sort();
            hb.cancel_requested.sort();
            Ok(Out::Heartbeat(hb))
        }
        Op::Cancel { run_id, now_ms } => {
            // The first request wins: repeating a cancel does not move its timestamp.
            let n = conn
                .execute(
                    "UPDATE _smithers_runs SET cancel_requested_at_ms = COALESCE(cancel_requested_at_ms, $2)
                     WHERE run_id = $1",
                    &[run_id, now_ms],
                )
                .await?;
            Ok(Out::Flag(n == 1))
        }
        Op::Signal(s) => {
            xact_lock(conn, lock_key(LOCK_SIGNALS, &s.run_id)).await?;
            let existing = conn
                .query_opt(
                    "SELECT seq FROM _smithers_signals
                     WHERE run_id = $1 AND signal_name = $2 AND correlation_id IS NOT DISTINCT FROM $3
                       AND payload_json = $4 AND received_at_ms = $5 AND received_by IS NOT DISTINCT FROM $6
                     ORDER BY seq LIMIT 1",
                    &[
                        &s.run_id,
                        &s.signal_name,
                        &s.correlation_id,
                        &s.payload_json,
                        &s.received_at_ms,
                        &s.received_by,
                    ],
                )
                .await?;
            if let Some(row) = existing {
                let seq: i64 = Cols::new(&row, "_smithers_signals", &["seq"]).get("seq")?;
                return Ok(Out::Seq(seq));
            }
            let seq = conn
                .query_i64(
                    "SELECT COALESCE(MAX(seq) + 1, 0)::BIGINT FROM _smithers_signals WHERE run_id = $1",
                    &[&s.run_id],
                )
                .await?;
            conn.execute(
                "INSERT INTO _smithers_signals
                    (run_id, seq, signal_name, correlation_id, payload_json, received_at_ms, received_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &s.run_id,
                    &seq,
                    &s.signal_name,
                    &s.correlation_id,
                    &s.payload_json,
                    &s.received_at_ms,
                    &s.received_by,
                ],
            )
            .await?;
            Ok(Out::Seq(seq))
        }
        Op::UpsertCron(r) => {
            conn.execute(
                "INSERT INTO _smithers_cron (cron_id, pattern, workflow_path, enabled, created_at_ms,
                    last_run_at_ms, next_run_at_ms, error_json, input_json)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (cron_id) DO UPDATE SET pattern = excluded.pattern,
                    workflow_path = excluded.workflow_path, enabled = excluded.enabled,
                    next_run_at_ms = excluded.next_run_at_ms, input_json = excluded.input_json",
                &[
                    &r.cron_id,
                    &r.pattern,
                    &r.workflow_path,
                    &i64::from(r.enabled),
                    &r.created_at_ms,
                    &r.last_run_at_ms,
                    &r.next_run_at_ms,
                    &r.error_json,
                    &r.input_json,
                ],
            )
            .await?;
            Ok(Out::Flag(true))
        }
        Op::DeleteCron(id) => {
            let n = conn
                .execute("DELETE FROM _smithers_cron WHERE cron_id = $1", &[id])
                .await?;
            Ok(Out::Flag(n == 1))
        }
        Op::UpdateCronRun {
            cron_id,
            last_run_at_ms,
            next_run_at_ms,
            error_json,
        } => {
            let n = conn
                .execute(
                    "UPDATE _smithers_cron SET last_run_at_ms = $2, next_run_at_ms = $3, error_json = $4
                     WHERE cron_id = $1",
                    &[cron_id, last_run_at_ms, next_run_at_ms, error_json],
                )
                .await?;
            Ok(Out::Flag(n == 1))
        }
        Op::ClaimCron {
            cron_id,
            expected,
            new_next,
            now_ms,
        } => {
            // Compare-and-set; `IS NOT DISTINCT FROM` compares NULL-safely, so a never-scheduled
            // cron can be claimed once too. A row locked by a concurrent claimer is skipped
            // (that claimer fires it; if its transaction is rolled back, a later tick claims).
            let n = conn
                .execute(
                    "UPDATE _smithers_cron SET next_run_at_ms = $3, last_run_at_ms = $4
                     WHERE cron_id = (SELECT cron_id FROM _smithers_cron WHERE cron_id = $1
                                      FOR UPDATE SKIP LOCKED)
                       AND enabled = 1 AND next_run_at_ms IS NOT DISTINCT FROM $2",
                    &[cron_id, expected, new_next, now_ms],
                )
                .await?;
            Ok(Out::Flag(n == 1))
        }
        Op::Delivery(w) => super::deliveries::exec(conn, w).await,
    }
}
