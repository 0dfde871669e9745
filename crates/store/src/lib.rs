//! Storage for Smithers. The engine talks to a [`Store`]; backends (SQLite and PostgreSQL)
//! implement it and must pass the shared conformance suite in `conformance`.
//!
//! Writes are data: the engine collects [`Write`]s into a [`Batch`] and the backend applies the
//! whole batch in one transaction, so a state change and the events describing it are committed
//! together, before anything acts on them.

pub mod conformance;
pub mod postgres;
pub mod rows;
mod run_query;
pub mod sqlite;

pub use rows::*;
pub use run_query::{RunCursor, RunQuery};

use async_trait::async_trait;
use smithers_core::{Code, Result, SmithersError};
use std::sync::Arc;

/// The input a run started with as a JSON object: `{}` when none was stored or it is not an
/// object (what a rerun starts with and what clients are shown).
pub async fn input_object(store: &dyn Store, run_id: &str) -> Result<serde_json::Value> {
    Ok(store
        .get_input(run_id)
        .await?
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({})))
}

/// One write inside a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Fails the batch with `RUN_EXISTS` if the run id is taken.
    InsertRun(RunRow),
    UpdateRun {
        run_id: String,
        patch: RunPatch,
    },
    /// Stored once per run (`input` table, `payload` column); a second insert is ignored.
    InsertInput {
        run_id: String,
        payload_json: String,
    },
    UpsertNode(NodeRow),
    UpsertAttempt(AttemptRow),
    UpsertOutput(OutputRow),
    DeleteOutput {
        run_id: String,
        node_id: String,
        iteration: i64,
    },
    /// Rewind: deletes the run's node, output and loop rows (they are written again from the
    /// snapshot of the target frame in the same batch).
    ClearRunState {
        run_id: String,
    },
    /// Rewind: deletes frames and snapshots after `frame_no`.
    DeleteFramesAfter {
        run_id: String,
        frame_no: i64,
    },
    /// Rewind: deletes attempts started after `started_after_ms`, and approvals requested or
    /// decided after it (they are asked again).
    DeleteAttemptsAfter {
        run_id: String,
        started_after_ms: i64,
    },
    InsertFrame(FrameRow),
    InsertSnapshot(SnapshotRow),
    /// Appends to the run's event log; the store assigns the next per-run `seq` (from 0).
    AppendEvent {
        run_id: String,
        timestamp_ms: i64,
        event_type: String,
        payload_json: String,
    },
    UpsertLoop(LoopRow),
    UpsertApproval(ApprovalRow),
    /// Inserts a time-travel audit row, or updates its frames, result and duration.
    UpsertAudit(AuditRow),
    UpsertNodeDiff(NodeDiffRow),
    /// Rewind: deletes one attempt and its cached node diffs.
    DeleteAttempt {
        run_id: String,
        node_id: String,
        iteration: i64,
        attempt: i64,
    },
    /// Rewind: deletes cached node diffs of attempts started after `started_after_ms`.
    DeleteNodeDiffsAfter {
        run_id: String,
        started_after_ms: i64,
    },
}

/// Writes applied atomically. With a guard, the batch commits only if the run is still owned
/// by that owner (a takeover by another engine makes the old owner's writes fail with
/// `RUN_LEASE_LOST` instead of clobbering state).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub guard: Option<OwnerGuard>,
    pub writes: Vec<Write>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OwnerGuard {
    pub run_id: String,
    pub owner: String,
}

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }
    /// A batch that commits only while `owner` holds `run_id`. Room is reserved for a
    /// typical engine step (a dozen writes), so it is not regrown write by write.
    pub fn guarded(run_id: &str, owner: &str) -> Self {
        Batch {
            guard: Some(OwnerGuard {
                run_id: run_id.into(),
                owner: owner.into(),
            }),
            writes: Vec::with_capacity(16),
        }
    }
    pub fn push(&mut self, w: Write) -> &mut Self {
        self.writes.push(w);
        self
    }
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// What a committed batch produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// The seq assigned to each `AppendEvent`, in batch order.
    pub event_seqs: Vec<i64>,
}

/// Result of a heartbeat: which runs the owner still holds, and which of those have a durable
/// cancel request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Heartbeat {
    pub owned: Vec<String>,
    pub cancel_requested: Vec<String>,
}

/// A signal to record; `seq` is assigned by the store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSignal {
    pub run_id: String,
    pub signal_name: String,
    pub correlation_id: Option<String>,
    pub payload_json: String,
    pub received_at_ms: i64,
    pub received_by: Option<String>,
}

/// A claim on a webhook delivery id ([`Store::claim_webhook_delivery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryClaim {
    /// The workflow key the delivery was sent to (ids are scoped per workflow).
    pub workflow: String,
    pub delivery_id: String,
    /// Unique per attempt to act on the delivery.
    pub claim_id: String,
    pub now_ms: i64,
    /// When the delivery id is forgotten (the end of the dedupe window).
    pub expires_at_ms: i64,
    /// A claim still without an outcome taken before this time is abandoned (its claimer
    /// died while acting) and may be claimed again.
    pub stale_before_ms: i64,
}

/// Events another process committed to a run's log: seqs `first_seq..=last_seq` (one batch).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRef {
    pub run_id: String,
    pub first_seq: i64,
    pub last_seq: i64,
    /// The events themselves, in seq order, when the notice could carry them (most batches);
    /// empty when they must be read with [`Store::list_events`].
    pub events: Vec<EventRow>,
}

/// Durable storage of runs. All methods are safe to call concurrently from many tasks and
/// from several processes sharing the same database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a batch in one transaction (all or nothing).
    async fn apply(&self, batch: Batch) -> Result<Applied>;

    /// Takes ownership of a run: succeeds when the run has no owner, its heartbeat is older
    /// than `stale_before_ms` (or missing), or its owner is `dead_owner` (an owner the caller
    /// has proven dead). Sets owner and heartbeat to `now_ms`. Returns false when not claimed,
    /// also when another transaction holds the run's row at that moment (PostgreSQL: the claim
    /// never waits behind a possibly frozen owner; the caller tries again later).
    async fn claim_run(
        &self,
        run_id: &str,
        owner: &str,
        now_ms: i64,
        stale_before_ms: i64,
        dead_owner: Option<&str>,
    ) -> Result<bool>;
    /// Refreshes the heartbeat of every run held by `owner`.
    async fn heartbeat(&self, owner: &str, now_ms: i64) -> Result<Heartbeat>;
    /// Records a durable cancel request; false when the run does not exist.
    async fn request_cancel(&self, run_id: &str, now_ms: i64) -> Result<bool>;
    /// Records a signal (idempotent on identical rows) and returns its per-run seq (from 0).
    async fn insert_signal(&self, signal: NewSignal) -> Result<i64>;

    async fn get_run(&self, run_id: &str) -> Result<Option<RunRow>>;
    /// Newest first. `status = "running"` also matches `continued`.
    async fn list_runs(&self, status: Option<&str>, limit: usize) -> Result<Vec<RunRow>> {
        self.query_runs(&RunQuery {
            status: status.map(str::to_string),
            limit,
            ..RunQuery::default()
        })
        .await
    }
    /// One page of runs, newest first, filtered and positioned by `q`.
    async fn query_runs(&self, q: &RunQuery) -> Result<Vec<RunRow>>;
    /// Runs in status `running` whose owner is missing or whose heartbeat is older than
    /// `stale_before_ms`, oldest heartbeat first.
    async fn list_stale_runs(&self, stale_before_ms: i64, limit: usize) -> Result<Vec<RunRow>>;
    async fn get_input(&self, run_id: &str) -> Result<Option<String>>;

    async fn list_nodes(&self, run_id: &str) -> Result<Vec<NodeRow>>;
    async fn get_node(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Option<NodeRow>>;

    /// All attempts of a run ordered by `started_at_ms, node_id, iteration, attempt`.
    async fn list_attempts(&self, run_id: &str) -> Result<Vec<AttemptRow>>;
    /// Attempts of one (node, iteration), newest attempt first.
    async fn list_node_attempts(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Vec<AttemptRow>>;
    async fn get_attempt(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
        attempt: i64,
    ) -> Result<Option<AttemptRow>>;

    /// Ordered by node_id, iteration.
    async fn list_outputs(&self, run_id: &str) -> Result<Vec<OutputRow>>;
    async fn get_output(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Option<OutputRow>>;

    /// 0 when the run has no frame.
    async fn last_frame_no(&self, run_id: &str) -> Result<i64>;
    /// Stored (possibly delta-encoded) frame row.
    async fn get_frame(&self, run_id: &str, frame_no: i64) -> Result<Option<FrameRow>>;
    /// Stored frame rows with `frame_no > after`, newest first, at most `limit`.
    async fn list_frames(
        &self,
        run_id: &str,
        after_frame_no: i64,
        limit: usize,
    ) -> Result<Vec<FrameRow>>;
    /// Stored frame rows with `from <= frame_no <= to`, ascending.
    async fn frames_between(&self, run_id: &str, from: i64, to: i64) -> Result<Vec<FrameRow>>;
    async fn get_snapshot(&self, run_id: &str, frame_no: i64) -> Result<Option<SnapshotRow>>;
    /// Stored snapshot rows from the latest keyframe at or before `base` through `to`,
    /// ascending: what rebuilding the snapshots of frames `base..=to` needs, however far back
    /// that keyframe is. Rows from frame 0 when no keyframe is that early.
    async fn snapshots_from_keyframe(
        &self,
        run_id: &str,
        base: i64,
        to: i64,
    ) -> Result<Vec<SnapshotRow>>;

    /// Events with `seq > after_seq` (None = from the start), ascending, at most `limit`.
    async fn list_events(
        &self,
        run_id: &str,
        after_seq: Option<i64>,
        limit: usize,
    ) -> Result<Vec<EventRow>>;
    /// -1 when the run has no events.
    async fn last_event_seq(&self, run_id: &str) -> Result<i64>;

    async fn list_loops(&self, run_id: &str) -> Result<Vec<LoopRow>>;

    async fn get_approval(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Option<ApprovalRow>>;
    async fn list_approvals(&self, run_id: &str) -> Result<Vec<ApprovalRow>>;
    /// Approvals in status `requested` across runs, oldest request first.
    async fn list_pending_approvals(&self, limit: usize) -> Result<Vec<ApprovalRow>>;
    /// Decided approvals of `node_id` in other runs of `workflow_name`, newest run first.
    async fn approval_history(
        &self,
        workflow_name: &str,
        node_id: &str,
        exclude_run_id: &str,
        limit: usize,
    ) -> Result<Vec<ApprovalRow>>;

    /// Signals of a run with this name and correlation id (None matches only NULL) received at
    /// or after `received_after_ms`, ascending by seq.
    async fn list_signals(
        &self,
        run_id: &str,
        signal_name: &str,
        correlation_id: Option<&str>,
        received_after_ms: i64,
    ) -> Result<Vec<SignalRow>>;

    /// Time-travel audit rows, oldest first: of one run (or all runs), optionally only those
    /// with one result.
    async fn list_audits(
        &self,
        run_id: Option<&str>,
        result: Option<&str>,
    ) -> Result<Vec<AuditRow>>;

    /// The cached diff of one attempt against `base_ref`.
    async fn get_node_diff(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
        attempt: i64,
        base_ref: &str,
    ) -> Result<Option<NodeDiffRow>>;
    /// How many cached diffs belong to attempts started after `started_after_ms`.
    async fn count_node_diffs_after(&self, run_id: &str, started_after_ms: i64) -> Result<i64>;
    /// Cached diffs across all runs (the `smithers_node_diff_cache_rows` gauge).
    async fn count_all_node_diffs(&self) -> Result<i64>;
    /// `(node_id, iteration, attempt)` of every cached diff of a run (one entry per diff row).
    async fn list_node_diff_attempts(&self, run_id: &str) -> Result<Vec<(String, i64, i64)>>;

    /// Inserts a cron, or on an existing `cron_id` updates only `pattern`, `workflow_path`,
    /// `enabled` and `next_run_at_ms` (creation time, last run and error are kept).
    async fn upsert_cron(&self, row: CronRow) -> Result<()>;
    /// All crons (enabled or not), oldest `created_at_ms` first.
    async fn list_crons(&self) -> Result<Vec<CronRow>>;
    async fn get_cron(&self, cron_id: &str) -> Result<Option<CronRow>>;
    /// Removes a cron; false when it did not exist.
    async fn delete_cron(&self, cron_id: &str) -> Result<bool>;
    /// Records the outcome of a fire (all three columns are written, `None` sets NULL);
    /// false when the cron does not exist.
    async fn update_cron_run(
        &self,
        cron_id: &str,
        last_run_at_ms: Option<i64>,
        next_run_at_ms: Option<i64>,
        error_json: Option<String>,
    ) -> Result<bool>;
    /// Compare-and-set for firing a due cron exactly once across processes: when the cron is
    /// enabled and its `next_run_at_ms` still equals `expected_next_run_at_ms` (`None` matches
    /// NULL), sets `next_run_at_ms = new_next_run_at_ms` and `last_run_at_ms = now_ms` and
    /// returns true; otherwise changes nothing and returns false.
    async fn claim_due_cron(
        &self,
        cron_id: &str,
        expected_next_run_at_ms: Option<i64>,
        new_next_run_at_ms: i64,
        now_ms: i64,
    ) -> Result<bool>;

    /// Claims a webhook delivery so that it is acted on once, atomically across processes:
    /// inserts the row and returns true when `(workflow, delivery_id)` has no row, its row
    /// expired (`expires_at_ms <= now_ms`), or its row is a claim without outcome taken before
    /// `stale_before_ms`; otherwise changes nothing and returns false (a duplicate).
    async fn claim_webhook_delivery(&self, claim: &DeliveryClaim) -> Result<bool>;
    async fn get_webhook_delivery(
        &self,
        workflow: &str,
        delivery_id: &str,
    ) -> Result<Option<WebhookDeliveryRow>>;
    /// Records what a claimed delivery did (answered to repeats); false when `claim_id` no
    /// longer holds the delivery.
    async fn finish_webhook_delivery(
        &self,
        workflow: &str,
        delivery_id: &str,
        claim_id: &str,
        outcome_json: &str,
    ) -> Result<bool>;
    /// Forgets a claim whose action failed, so that a retry of the delivery may act; false
    /// when `claim_id` no longer holds the delivery.
    async fn release_webhook_delivery(
        &self,
        workflow: &str,
        delivery_id: &str,
        claim_id: &str,
    ) -> Result<bool>;
    /// Deletes deliveries with `expires_at_ms <= now_ms`; returns how many.
    async fn prune_webhook_deliveries(&self, now_ms: i64) -> Result<u64>;

    /// A feed of events committed by other processes sharing this database (other nodes),
    /// so a gateway can show runs it does not execute. `None` when the backend has no such
    /// feed (SQLite). Delivery is best effort: notices sent while the feed was reconnecting
    /// are lost, and a lagging receiver skips some; the log itself stays complete.
    async fn foreign_events(&self) -> Option<tokio::sync::broadcast::Receiver<EventRef>> {
        None
    }
}

/// Opens a store from a URL (`sqlite://path`, `sqlite::memory:`,
/// `postgres://user:password@host:port/dbname`); the error says which schemes are supported.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    let url = &storage_url(url);
    if let Some(rest) = url.strip_prefix("sqlite://") {
        let (path, options) = sqlite_url(rest)?;
        let store = sqlite::SqliteStore::open_with(std::path::Path::new(path), options)?;
        return Ok(Arc::new(store));
    }
    if url == "sqlite::memory:" {
        return Ok(Arc::new(sqlite::SqliteStore::open_memory()?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(postgres::PgStore::open(url).await?));
    }
    Err(SmithersError::new(
        Code::InvalidUrl,
        format!(
            "storage url `{url}` is not supported; use sqlite://PATH (e.g. sqlite://.smithers/smithers.db) or postgres://USER:PASSWORD@HOST:PORT/DBNAME"
        ),
    ))
}

/// A storage URL as given by a user: `my.db` or `./data/runs.sqlite` (no `scheme://`) is a
/// SQLite path, so `--db my.db` does what it says; anything else is kept as written.
pub fn storage_url(given: &str) -> String {
    if given.contains("://") || given.starts_with("sqlite:") || given.starts_with("postgres") {
        given.to_string()
    } else {
        format!("sqlite://{given}")
    }
}

/// A storage URL fit for logs and errors: the password of `postgres://user:PASSWORD@host/db`
/// (and of a `password=` option) is replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let auth_start = scheme_end + 3;
        let rest = &out[auth_start..];
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..auth_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            out.replace_range(auth_start + colon + 1..auth_start + at, "***");
        }
    }
    if let Some(i) = out.find("password=") {
        let start = i + "password=".len();
        let end = out[start..]
            .find(['&', ' '])
            .map_or(out.len(), |n| start + n);
        out.replace_range(start..end, "***");
    }
    out
}

/// Default of `busy_timeout_ms` in `sqlite://PATH?busy_timeout_ms=N`.
pub const SQLITE_BUSY_TIMEOUT_MS: u64 = 30_000;

/// When a SQLite commit reaches the disk (`sqlite://PATH?synchronous=normal|full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// The WAL is synced at checkpoints, not at each commit: a commit survives the process
    /// being killed, and a power loss or kernel crash can lose the last few (the default, as
    /// upstream).
    #[default]
    Normal,
    /// Each commit syncs the WAL before it returns: commits also survive a power loss. Costs
    /// about one disk flush per group of concurrent commits.
    Full,
}

impl Synchronous {
    /// The `PRAGMA synchronous` value.
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

/// Settings of a SQLite file store, from its URL's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteOptions {
    /// How long one statement waits for a lock held by another connection.
    pub busy_timeout: std::time::Duration,
    pub synchronous: Synchronous,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: std::time::Duration::from_millis(SQLITE_BUSY_TIMEOUT_MS),
            synchronous: Synchronous::Normal,
        }
    }
}

/// Splits `PATH[?busy_timeout_ms=N][&synchronous=normal|full]` (the part of a sqlite URL after
/// `sqlite://`).
fn sqlite_url(rest: &str) -> Result<(&str, SqliteOptions)> {
    let bad = |why: String| {
        SmithersError::new(
            Code::InvalidUrl,
            format!("storage url `sqlite://{rest}`: {why}; the form is sqlite://PATH or sqlite://PATH?busy_timeout_ms=N&synchronous=normal|full"),
        )
        .terminal()
    };
    let mut options = SqliteOptions::default();
    let Some((path, query)) = rest.rsplit_once('?') else {
        return Ok((rest, options));
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("busy_timeout_ms", v)) => {
                let ms = v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    bad(format!("busy_timeout_ms `{v}` is not a positive integer"))
                })?;
                options.busy_timeout = std::time::Duration::from_millis(ms);
            }
            Some(("synchronous", v)) => {
                options.synchronous = match v {
                    "normal" => Synchronous::Normal,
                    "full" => Synchronous::Full,
                    _ => {
                        return Err(bad(format!("synchronous `{v}` is not `normal` or `full`")));
                    }
                };
            }
            _ => return Err(bad(format!("unknown parameter `{pair}`"))),
        }
    }
    Ok((path, options))
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn a_bare_path_is_a_sqlite_database() {
        assert_eq!(storage_url("my.db"), "sqlite://my.db");
        assert_eq!(storage_url("./d/runs.sqlite"), "sqlite://./d/runs.sqlite");
        assert_eq!(storage_url("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(storage_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(storage_url("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(storage_url("mysql://h/d"), "mysql://h/d");
    }

    #[test]
    fn passwords_never_reach_a_log() {
        assert_eq!(
            redact_url("postgres://smithers:s3cr:et@db.example:5432/runs?sslmode=disable"),
            "postgres://smithers:***@db.example:5432/runs?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://smithers@h/d"),
            "postgres://smithers@h/d"
        );
        assert_eq!(
            redact_url("postgres://h/d?user=u&password=p4ss&x=1"),
            "postgres://h/d?user=u&password=***&x=1"
        );
        assert_eq!(
            redact_url("sqlite://.smithers/smithers.db"),
            "sqlite://.smithers/smithers.db"
        );
    }

    #[test]
    fn sqlite_url_takes_an_optional_busy_timeout_and_synchronous() {
        let (p, o) = sqlite_url("/tmp/x.db").unwrap();
        assert_eq!(
            (p, o.busy_timeout.as_millis(), o.synchronous),
            ("/tmp/x.db", 30_000, Synchronous::Normal)
        );
        let (p, o) = sqlite_url("x.db?busy_timeout_ms=250").unwrap();
        assert_eq!((p, o.busy_timeout.as_millis()), ("x.db", 250));
        let (p, o) = sqlite_url("x.db?synchronous=full&busy_timeout_ms=7").unwrap();
        assert_eq!(
            (p, o.busy_timeout.as_millis(), o.synchronous),
            ("x.db", 7, Synchronous::Full)
        );
        let (_, o) = sqlite_url("x.db?synchronous=normal").unwrap();
        assert_eq!(o.synchronous, Synchronous::Normal);
        for bad in [
            "x.db?busy_timeout_ms=0",
            "x.db?busy_timeout_ms=abc",
            "x.db?mode=ro",
            "x.db?synchronous=FULL",
            "x.db?synchronous=off",
            "x.db?synchronous=",
        ] {
            assert_eq!(sqlite_url(bad).unwrap_err().code, Code::InvalidUrl, "{bad}");
        }
    }
}
