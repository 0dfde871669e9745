//! SQLite backend.
//!
//! Writes go through one dedicated writer thread that owns the only read-write connection:
//! callers send requests over a channel and the writer commits everything that queued up in
//! one `BEGIN IMMEDIATE` transaction (group commit), each request isolated in its own
//! savepoint so one failing request does not take the others down. Reads use a small pool of
//! query-only connections on blocking threads; in WAL mode they never wait for the writer.

use crate::rows::*;
use crate::{
    Applied, Batch, DeliveryClaim, Heartbeat, NewSignal, OwnerGuard, RunQuery, Store,
    WebhookDeliveryRow, Write,
};
use async_trait::async_trait;
use prepared::Prepared;
use rusqlite::types::{FromSql, Value, ValueRef};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Params, Row, params};
use smithers_core::{Code, Result, SmithersError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use tokio::sync::{Semaphore, oneshot};

pub mod checkpoint;
mod deliveries;
mod prepared;

/// Read connections kept per store; WAL readers are cheap and run in parallel.
const READERS: usize = 4;
/// Upper bound on requests committed together, so one transaction stays short.
const MAX_GROUP: usize = 1024;
/// Attempts of a whole group transaction when another connection holds the lock.
const WRITE_ATTEMPTS: u32 = 12;
/// Attempts of a read when the database is momentarily locked (shared-cache memory mode).
const READ_ATTEMPTS: u32 = 60;
const BUSY_TIMEOUT: Duration = Duration::from_millis(crate::SQLITE_BUSY_TIMEOUT_MS);

/// Ordered schema migrations; entry `i` brings the schema to version `i + 1`. Never edit an
/// entry that has shipped: append a new one.
pub const MIGRATIONS: &[&str] = &[
    MIGRATION_1,
    MIGRATION_2,
    MIGRATION_3,
    MIGRATION_4,
    MIGRATION_5,
    MIGRATION_6,
    MIGRATION_7,
    MIGRATION_8,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const MIGRATION_1: &str = r#"
CREATE TABLE IF NOT EXISTS _smithers_runs (
    run_id TEXT PRIMARY KEY NOT NULL,
    parent_run_id TEXT,
    workflow_name TEXT NOT NULL,
    workflow_path TEXT,
    workflow_hash TEXT,
    status TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    started_at_ms INTEGER,
    finished_at_ms INTEGER,
    heartbeat_at_ms INTEGER,
    runtime_owner_id TEXT,
    cancel_requested_at_ms INTEGER,
    hijack_requested_at_ms INTEGER,
    hijack_target TEXT,
    vcs_type TEXT,
    vcs_root TEXT,
    vcs_revision TEXT,
    error_json TEXT,
    config_json TEXT
);
CREATE INDEX IF NOT EXISTS _smithers_runs_status_heartbeat_idx ON _smithers_runs (status, heartbeat_at_ms);
CREATE INDEX IF NOT EXISTS _smithers_runs_parent_idx ON _smithers_runs (parent_run_id);
CREATE INDEX IF NOT EXISTS _smithers_runs_created_idx ON _smithers_runs (created_at_ms);
CREATE INDEX IF NOT EXISTS _smithers_runs_owner_idx ON _smithers_runs (runtime_owner_id);

CREATE TABLE IF NOT EXISTS _smithers_nodes (
    run_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    iteration INTEGER NOT NULL,
    state TEXT NOT NULL,
    last_attempt INTEGER,
    updated_at_ms INTEGER NOT NULL,
    output_table TEXT NOT NULL,
    label TEXT,
    PRIMARY KEY (run_id, node_id, iteration)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS _smithers_attempts (
    run_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    iteration INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    heartbeat_at_ms INTEGER,
    heartbeat_data_json TEXT,
    error_json TEXT,
    jj_pointer TEXT,
    response_text TEXT,
    jj_cwd TEXT,
    cached INTEGER NOT NULL DEFAULT 0,
    meta_json TEXT,
    PRIMARY KEY (run_id, node_id, iteration, attempt)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS _smithers_outputs (
    run_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    iteration INTEGER NOT NULL,
    output_table TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, node_id, iteration)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS input (
    run_id TEXT PRIMARY KEY NOT NULL,
    payload TEXT
);

CREATE TABLE IF NOT EXISTS _smithers_frames (
    run_id TEXT NOT NULL,
    frame_no INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    xml_json TEXT NOT NULL,
    xml_hash TEXT NOT NULL,
    encoding TEXT NOT NULL DEFAULT 'full',
    mounted_task_ids_json TEXT,
    task_index_json TEXT,
    note TEXT,
    PRIMARY KEY (run_id, frame_no)
);

CREATE TABLE IF NOT EXISTS _smithers_snapshots (
    run_id TEXT NOT NULL,
    frame_no INTEGER NOT NULL,
    encoding TEXT NOT NULL DEFAULT 'keyframe',
    nodes_json TEXT NOT NULL,
    outputs_json TEXT NOT NULL,
    ralph_json TEXT NOT NULL,
    input_json TEXT NOT NULL,
    vcs_pointer TEXT,
    workflow_hash TEXT,
    content_hash TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, frame_no)
);

CREATE TABLE IF NOT EXISTS _smithers_events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    type TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS _smithers_ralph (
    run_id TEXT NOT NULL,
    ralph_id TEXT NOT NULL,
    iteration INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, ralph_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS _smithers_approvals (
    run_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    iteration INTEGER NOT NULL,
    status TEXT NOT NULL,
    requested_at_ms INTEGER,
    decided_at_ms INTEGER,
    note TEXT,
    decided_by TEXT,
    request_json TEXT,
    decision_json TEXT,
    auto_approved INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, node_id, iteration)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _smithers_approvals_status_idx ON _smithers_approvals (status);

CREATE TABLE IF NOT EXISTS _smithers_signals (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    signal_name TEXT NOT NULL,
    correlation_id TEXT,
    payload_json TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    received_by TEXT,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _smithers_signals_lookup_idx
    ON _smithers_signals (run_id, signal_name, correlation_id, received_at_ms);
"#;

/// Cron schedules (`_smithers_cron`).
const MIGRATION_2: &str = r#"
CREATE TABLE IF NOT EXISTS _smithers_cron (
    cron_id TEXT PRIMARY KEY NOT NULL,
    pattern TEXT NOT NULL,
    workflow_path TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at_ms INTEGER NOT NULL,
    last_run_at_ms INTEGER,
    next_run_at_ms INTEGER,
    error_json TEXT
);
"#;

const MIGRATION_3: &str = r#"
CREATE TABLE IF NOT EXISTS _smithers_time_travel_audit (
    id TEXT PRIMARY KEY NOT NULL,
    run_id TEXT NOT NULL,
    from_frame_no INTEGER NOT NULL,
    to_frame_no INTEGER NOT NULL,
    caller TEXT NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    result TEXT NOT NULL,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS _smithers_time_travel_audit_run_idx ON _smithers_time_travel_audit (run_id, caller, timestamp_ms);
CREATE INDEX IF NOT EXISTS _smithers_time_travel_audit_result_idx ON _smithers_time_travel_audit (result);

CREATE TABLE IF NOT EXISTS _smithers_node_diffs (
    run_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    iteration INTEGER NOT NULL,
    base_ref TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    attempt_started_at_ms INTEGER NOT NULL,
    bundle_json TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, node_id, iteration, attempt, base_ref)
) WITHOUT ROWID;
"#;

/// The stale-run and owner indexes keep only the runs they are searched for: running runs, and
/// runs with a live owner. A finished run then leaves both instead of moving to a new key in
/// each, and the two indexes stay as small as the work in flight. PostgreSQL runs the same
/// statements as its migration 8.
pub(crate) const MIGRATION_8: &str = r#"
DROP INDEX IF EXISTS _smithers_runs_status_heartbeat_idx;
DROP INDEX IF EXISTS _smithers_runs_owner_idx;
CREATE INDEX IF NOT EXISTS _smithers_runs_stale_idx ON _smithers_runs (heartbeat_at_ms, run_id)
    WHERE status = 'running';
CREATE INDEX IF NOT EXISTS _smithers_runs_live_owner_idx ON _smithers_runs (runtime_owner_id)
    WHERE runtime_owner_id IS NOT NULL;
"#;

/// No query looks runs up by their parent, so the parent index only cost one more B-tree
/// write for every run created.
const MIGRATION_7: &str = r#"
DROP INDEX IF EXISTS _smithers_runs_parent_idx;
"#;

/// Webhook delivery ids remembered for the dedupe window (`_smithers_webhook_deliveries`).
/// Schedules carry the input of the runs they start.
/// Indexes for the run list's pages and filters (newest first, ties by run id); the
/// `created_at_ms` index they make redundant goes.
const MIGRATION_6: &str = r#"
CREATE INDEX IF NOT EXISTS _smithers_runs_list_idx ON _smithers_runs (created_at_ms, run_id);
CREATE INDEX IF NOT EXISTS _smithers_runs_status_list_idx ON _smithers_runs (status, created_at_ms, run_id);
CREATE INDEX IF NOT EXISTS _smithers_runs_workflow_list_idx ON _smithers_runs (workflow_name, created_at_ms, run_id);
DROP INDEX IF EXISTS _smithers_runs_created_idx;
"#;

const MIGRATION_5: &str = r#"
ALTER TABLE _smithers_cron ADD COLUMN input_json TEXT;
"#;

const MIGRATION_4: &str = r#"
CREATE TABLE IF NOT EXISTS _smithers_webhook_deliveries (
    workflow TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    claim_id TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    outcome_json TEXT,
    PRIMARY KEY (workflow, delivery_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS _smithers_webhook_deliveries_expiry_idx
    ON _smithers_webhook_deliveries (expires_at_ms);
"#;

// ---------------------------------------------------------------------------------------------
// Errors

/// Internal error: keeps the raw SQLite error around so busy/locked can be retried before it
/// becomes a [`SmithersError`].
#[derive(Debug)]
enum DbErr {
    Sqlite(rusqlite::Error),
    App(SmithersError),
}

impl From<rusqlite::Error> for DbErr {
    fn from(e: rusqlite::Error) -> Self {
        DbErr::Sqlite(e)
    }
}

impl From<SmithersError> for DbErr {
    fn from(e: SmithersError) -> Self {
        DbErr::App(e)
    }
}

fn is_transient_sqlite(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

impl DbErr {
    fn is_transient(&self) -> bool {
        match self {
            DbErr::Sqlite(e) => is_transient_sqlite(e),
            DbErr::App(_) => false,
        }
    }

    fn into_smithers(self, code: Code, ctx: &str) -> SmithersError {
        match self {
            DbErr::App(e) => e,
            DbErr::Sqlite(e) => match e.sqlite_error_code() {
                Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => SmithersError::new(
                    Code::DbCorrupt,
                    format!("{ctx}: the database file is damaged ({e}); restore it from a backup"),
                )
                .terminal(),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => SmithersError::new(
                    code,
                    format!(
                        "{ctx}: the database stayed locked by another connection or process ({e}); retry later"
                    ),
                ),
                // fails the same way every time: retrying (or driving the run again) cannot help
                Some(
                    ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch,
                ) => SmithersError::new(code, format!("{ctx}: {e}")).terminal(),
                _ => SmithersError::new(code, format!("{ctx}: {e}")),
            },
        }
    }
}

fn stopped() -> SmithersError {
    SmithersError::new(
        Code::StorageError,
        "the SQLite writer thread has stopped; reopen the store",
    )
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

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

// ---------------------------------------------------------------------------------------------
// Connections

/// Where the database lives; readers reopen it from here.
#[derive(Debug, Clone)]
enum Target {
    /// A file, and how long a statement waits for another connection's lock.
    File(PathBuf, Duration),
    /// URI of a named shared-cache in-memory database.
    Memory(String),
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::File(p, _) => format!("`{}`", p.display()),
            Target::Memory(_) => "in-memory database".to_string(),
        }
    }

    fn connect(&self, writer: bool) -> rusqlite::Result<Connection> {
        let base = OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let conn = match self {
            Target::File(p, _) => {
                let mode = if writer {
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
                } else {
                    OpenFlags::SQLITE_OPEN_READ_ONLY
                };
                Connection::open_with_flags(p, base | mode)?
            }
            Target::Memory(uri) => Connection::open_with_flags(
                uri,
                base | OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_SHARED_CACHE,
            )?,
        };
        conn.busy_timeout(match self {
            Target::File(_, busy) => *busy,
            Target::Memory(_) => BUSY_TIMEOUT,
        })?;
        conn.set_prepared_statement_cache_capacity(128);
        if !writer {
            conn.execute_batch("PRAGMA query_only = ON")?;
        }
        Ok(conn)
    }
}

/// Runs `f` again while SQLite reports busy/locked, with exponential backoff.
fn with_retry<T>(
    attempts: u32,
    max_delay: Duration,
    mut f: impl FnMut() -> Result<T, DbErr>,
) -> Result<T, DbErr> {
    let mut delay = Duration::from_millis(1);
    let mut attempt = 1;
    loop {
        match f() {
            Err(e) if e.is_transient() && attempt < attempts => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(max_delay);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Starts the background checkpointer ([`checkpoint`]) with its own connection. If it cannot
/// start, the writer's automatic checkpoint (kept on) still bounds the WAL.
fn spawn_checkpointer(
    target: &Target,
    policy: checkpoint::Policy,
    gate: Arc<checkpoint::ResetGate>,
) -> Option<Checkpointer> {
    let conn = target.connect(true).ok()?;
    let (stop, wake) = mpsc::channel::<()>();
    let (thread, counts) = checkpoint::spawn(conn, wake, policy, gate).ok()?;
    Some(Checkpointer {
        stop,
        thread,
        counts,
    })
}

/// The background checkpoint thread of a file store.
struct Checkpointer {
    /// Dropping it stops the thread.
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
    counts: Arc<checkpoint::Counts>,
}

fn configure_writer(conn: &Connection, synchronous: crate::Synchronous) -> Result<(), DbErr> {
    with_retry(WRITE_ATTEMPTS, Duration::from_millis(500), || {
        // In-memory databases answer "memory"; that is fine.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {}; PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 10000",
            synchronous.pragma()
        ))?;
        Ok(())
    })
}

/// Applies missing migrations, each in its own `BEGIN IMMEDIATE` transaction with the version
/// re-read under the lock, so concurrent openers apply every migration exactly once.
fn migrate(conn: &Connection) -> Result<(), DbErr> {
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        with_retry(WRITE_ATTEMPTS, Duration::from_millis(500), || {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            let step = || -> Result<(), DbErr> {
                conn.execute_batch(
                    "CREATE TABLE IF NOT EXISTS _smithers_schema_version (
                        version INTEGER PRIMARY KEY NOT NULL,
                        applied_at_ms INTEGER NOT NULL
                    )",
                )?;
                let current: i64 = conn.query_row(
                    "SELECT COALESCE(MAX(version), 0) FROM _smithers_schema_version",
                    [],
                    |r| r.get(0),
                )?;
                if current > SCHEMA_VERSION {
                    return Err(DbErr::App(
                        SmithersError::new(
                            Code::StorageError,
                            format!(
                                "database schema version {current} is newer than this build supports ({SCHEMA_VERSION}); upgrade smithers"
                            ),
                        )
                        .terminal(),
                    ));
                }
                if current < version {
                    conn.execute_batch(sql)?;
                    conn.execute(
                        "INSERT INTO _smithers_schema_version (version, applied_at_ms) VALUES (?1, ?2)",
                        params![version, now_ms()],
                    )?;
                }
                Ok(())
            };
            match step() {
                Ok(()) => match conn.execute_batch("COMMIT") {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        rollback(conn);
                        Err(e.into())
                    }
                },
                Err(e) => {
                    rollback(conn);
                    Err(e)
                }
            }
        })?;
    }
    Ok(())
}

fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

fn open_error(target: &Target, e: DbErr) -> SmithersError {
    match e {
        DbErr::App(e) => e,
        DbErr::Sqlite(e) => {
            let what = target.describe();
            match e.sqlite_error_code() {
                Some(ErrorCode::NotADatabase) => SmithersError::new(
                    Code::StorageError,
                    format!("{what} is not a SQLite database (it may be another kind of file or encrypted); point --db at a Smithers database or a new path"),
                ),
                Some(ErrorCode::DatabaseCorrupt) => SmithersError::new(
                    Code::StorageError,
                    format!("{what} is a damaged SQLite database ({e}); restore it from a backup"),
                ),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => SmithersError::new(
                    Code::StorageError,
                    format!("cannot open {what}: the database stayed locked by another process ({e})"),
                ),
                _ => SmithersError::new(Code::StorageError, format!("cannot open SQLite database {what}: {e}")),
            }
            .terminal()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The store

/// Counters exposed for tests and metrics.
#[derive(Debug, Default)]
struct Stats {
    transactions: AtomicU64,
    requests: AtomicU64,
}

/// SQLite implementation of [`Store`]. Cheap to share behind an `Arc`; dropping it waits for
/// queued writes to commit and closes the file. A write whose caller stops waiting (future
/// dropped) may still commit: once queued it belongs to the writer thread.
pub struct SqliteStore {
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<std::thread::JoinHandle<()>>,
    checkpointer: Option<Checkpointer>,
    readers: Arc<ReaderPool>,
    stats: Arc<Stats>,
    /// The writer's `PRAGMA synchronous` as SQLite reports it back.
    synchronous_level: i64,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("target", &self.readers.target)
            .finish_non_exhaustive()
    }
}

static MEMORY_COUNTER: AtomicU64 = AtomicU64::new(0);

impl SqliteStore {
    /// Opens (creating if needed, with its parent directories) a database file and migrates it.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, crate::SqliteOptions::default())
    }

    /// Like [`SqliteStore::open`], with the settings a `sqlite://` URL's parameters give:
    /// how long one statement waits for a lock held by another connection before the write is
    /// retried (`busy_timeout_ms`, default 30 s; a write fails after 12 such waits) and when
    /// commits reach the disk (`synchronous`).
    pub fn open_with(path: &Path, options: crate::SqliteOptions) -> Result<Self> {
        Self::open_with_checkpoints(path, options, checkpoint::Policy::DEFAULT)
    }

    /// Like [`SqliteStore::open_with`], with the background checkpointer's timings (tests
    /// use small ones to reach its limits quickly).
    #[doc(hidden)]
    pub fn open_with_checkpoints(
        path: &Path,
        options: crate::SqliteOptions,
        policy: checkpoint::Policy,
    ) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                SmithersError::new(
                    Code::StorageError,
                    format!(
                        "cannot create directory `{}` for the database: {e}",
                        parent.display()
                    ),
                )
            })?;
        }
        Self::start(
            Target::File(path.to_path_buf(), options.busy_timeout),
            options.synchronous,
            policy,
        )
    }

    /// Opens a fresh private in-memory database (gone when the store is dropped).
    pub fn open_memory() -> Result<Self> {
        let n = MEMORY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let uri = format!(
            "file:smithers-mem-{}-{n}-{}?mode=memory&cache=shared",
            std::process::id(),
            now_ms()
        );
        Self::start(
            Target::Memory(uri),
            crate::Synchronous::Normal,
            checkpoint::Policy::DEFAULT,
        )
    }

    fn start(
        target: Target,
        synchronous: crate::Synchronous,
        policy: checkpoint::Policy,
    ) -> Result<Self> {
        let conn = target
            .connect(true)
            .map_err(|e| open_error(&target, e.into()))?;
        configure_writer(&conn, synchronous).map_err(|e| open_error(&target, e))?;
        let synchronous_level: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .map_err(|e| open_error(&target, e.into()))?;
        migrate(&conn).map_err(|e| open_error(&target, e))?;
        let gate = Arc::new(checkpoint::ResetGate::new(&policy));
        let checkpointer = match &target {
            Target::File(..) => spawn_checkpointer(&target, policy, gate.clone()),
            Target::Memory(_) => None,
        };
        if checkpointer.is_some() {
            // checkpoints happen on their own thread, never on the commit path
            conn.execute_batch("PRAGMA wal_autocheckpoint = 0")
                .map_err(|e| open_error(&target, e.into()))?;
        }
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let writer_stats = stats.clone();
        let writer = std::thread::Builder::new()
            .name("smithers-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, &writer_stats, &gate))
            .map_err(|e| {
                SmithersError::new(
                    Code::StorageError,
                    format!("cannot start the SQLite writer thread: {e}"),
                )
            })?;
        let readers = Arc::new(ReaderPool {
            target,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(READERS)),
        });
        Ok(SqliteStore {
            tx: Some(tx),
            writer: Some(writer),
            checkpointer,
            readers,
            stats,
            synchronous_level,
        })
    }

    /// The writer connection's `PRAGMA synchronous` as SQLite reports it (1 = `NORMAL`,
    /// 2 = `FULL`): what the commits actually do, whatever the URL asked for.
    pub fn synchronous_level(&self) -> i64 {
        self.synchronous_level
    }

    /// WAL resets the checkpointer forced so far (the log had grown past its limit under
    /// sustained commits).
    pub fn forced_wal_resets(&self) -> u64 {
        self.checkpointer
            .as_ref()
            .map_or(0, |c| c.counts.forced_resets.load(Ordering::Relaxed))
    }

    /// Number of write transactions committed so far; with group commit this is usually far
    /// below the number of write requests.
    pub fn transactions_committed(&self) -> u64 {
        self.stats.transactions.load(Ordering::Relaxed)
    }

    /// Number of write requests (batches, claims, heartbeats, ...) processed so far.
    pub fn write_requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    async fn call(&self, op: Op) -> Result<Out> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        tx.send(Request { op, reply }).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    async fn read<T, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, DbErr> + Send + 'static,
    {
        let pool = self.readers.clone();
        let permit = pool
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| stopped())?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            pool.run(what, f)
        })
        .await
        .map_err(|e| SmithersError::new(Code::Internal, format!("{what}: read task failed: {e}")))?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and exit.
        self.tx.take();
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
        if let Some(c) = self.checkpointer.take() {
            drop(c.stop);
            let _ = c.thread.join();
        }
    }
}

struct ReaderPool {
    target: Target,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReaderPool {
    fn run<T>(&self, what: &'static str, f: impl Fn(&Connection) -> Result<T, DbErr>) -> Result<T> {
        let pooled = self
            .idle
            .lock()
            .map_err(|_| SmithersError::new(Code::Internal, "sqlite reader pool lock poisoned"))?
            .pop();
        let conn = match pooled {
            Some(c) => c,
            None => self
                .target
                .connect(false)
                .map_err(|e| DbErr::from(e).into_smithers(Code::DbQueryFailed, what))?,
        };
        let result = with_retry(READ_ATTEMPTS, Duration::from_millis(50), || f(&conn));
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        result.map_err(|e| e.into_smithers(Code::DbQueryFailed, what))
    }
}

// ---------------------------------------------------------------------------------------------
// Writer thread

enum Op {
    Apply(Batch),
    Claim {
        run_id: String,
        owner: String,
        now_ms: i64,
        stale_before_ms: i64,
        dead_owner: Option<String>,
    },
    Heartbeat {
        owner: String,
        now_ms: i64,
    },
    Cancel {
        run_id: String,
        now_ms: i64,
    },
    Signal(NewSignal),
    UpsertCron(CronRow),
    DeleteCron(String),
    UpdateCronRun {
        cron_id: String,
        last_run_at_ms: Option<i64>,
        next_run_at_ms: Option<i64>,
        error_json: Option<String>,
    },
    ClaimCron {
        cron_id: String,
        expected: Option<i64>,
        new_next: i64,
        now_ms: i64,
    },
    Delivery(deliveries::Write),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Apply(_) => "apply batch",
            Op::Claim { .. } => "claim run",
            Op::Heartbeat { .. } => "heartbeat",
            Op::Cancel { .. } => "request cancel",
            Op::Signal(_) => "insert signal",
            Op::UpsertCron(_) => "upsert cron",
            Op::DeleteCron(_) => "delete cron",
            Op::UpdateCronRun { .. } => "update cron run",
            Op::ClaimCron { .. } => "claim due cron",
            Op::Delivery(w) => w.name(),
        }
    }
}

enum Out {
    Applied(Applied),
    Flag(bool),
    Heartbeat(Heartbeat),
    Seq(i64),
    Count(u64),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Out>>,
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Request>,
    stats: &Stats,
    gate: &checkpoint::ResetGate,
) {
    let mut db = Prepared::new(&conn);
    while let Ok(first) = rx.recv() {
        // holding no transaction: the moment a forced WAL reset needs (checkpoint.rs)
        gate.pause_if_wanted();
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let results = commit_group(&mut db, &group, stats);
        stats
            .requests
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        for (req, res) in group.into_iter().zip(results) {
            // The caller may have given up waiting; nothing to do then.
            let _ = req.reply.send(res);
        }
        db.release();
    }
}

/// Commits a group, retrying the whole transaction while the database is locked.
fn commit_group(db: &mut Prepared<'_>, group: &[Request], stats: &Stats) -> Vec<Result<Out>> {
    match with_retry(WRITE_ATTEMPTS, Duration::from_millis(500), || {
        try_group(db, group)
    }) {
        Ok(results) => {
            stats.transactions.fetch_add(1, Ordering::Relaxed);
            results
        }
        Err(e) => {
            let err = e.into_smithers(Code::DbWriteFailed, "write transaction");
            group.iter().map(|_| Err(err.clone())).collect()
        }
    }
}

fn exec_sql(db: &mut Prepared<'_>, sql: &'static str) -> rusqlite::Result<()> {
    db.get(sql)?.execute([])?;
    Ok(())
}

fn try_group(db: &mut Prepared<'_>, group: &[Request]) -> Result<Vec<Result<Out>>, DbErr> {
    if let Some(results) = try_group_whole(db, group)? {
        return Ok(results);
    }
    exec_sql(db, "BEGIN IMMEDIATE")?;
    let mut body = || -> Result<Vec<Result<Out>>, DbErr> {
        let mut results = Vec::with_capacity(group.len());
        for req in group {
            exec_sql(db, "SAVEPOINT smithers_request")?;
            match exec_op(db, &req.op) {
                Ok(out) => {
                    exec_sql(db, "RELEASE smithers_request")?;
                    results.push(Ok(out));
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    exec_sql(db, "ROLLBACK TO smithers_request")?;
                    exec_sql(db, "RELEASE smithers_request")?;
                    results.push(Err(e.into_smithers(Code::DbWriteFailed, req.op.name())));
                }
            }
        }
        exec_sql(db, "COMMIT")?;
        Ok(results)
    };
    let outcome = body();
    match outcome {
        Ok(r) => Ok(r),
        Err(e) => {
            rollback(db.conn());
            Err(e)
        }
    }
}

/// A group without a savepoint per request: a savepoint makes SQLite copy every page a
/// request touches first into a statement journal, about 7 % of the writer thread's time with
/// 256 runs in flight. When a request fails, the whole transaction is rolled back: a lone
/// request gets its error; for a larger group `None` tells the caller to run it again with
/// savepoints, so only the failing request fails.
fn try_group_whole(
    db: &mut Prepared<'_>,
    group: &[Request],
) -> Result<Option<Vec<Result<Out>>>, DbErr> {
    exec_sql(db, "BEGIN IMMEDIATE")?;
    let mut results = Vec::with_capacity(group.len());
    for req in group {
        match exec_op(db, &req.op) {
            Ok(out) => results.push(Ok(out)),
            Err(e) => {
                rollback(db.conn());
                if e.is_transient() {
                    return Err(e);
                }
                if group.len() == 1 {
                    return Ok(Some(vec![Err(
                        e.into_smithers(Code::DbWriteFailed, req.op.name())
                    )]));
                }
                tracing::debug!(
                    requests = group.len(),
                    failed = req.op.name(),
                    "a request of a write group failed; running the group again with savepoints"
                );
                return Ok(None);
            }
        }
    }
    if let Err(e) = exec_sql(db, "COMMIT") {
        rollback(db.conn());
        return Err(e.into());
    }
    Ok(Some(results))
}

fn exec_op(db: &mut Prepared<'_>, op: &Op) -> Result<Out, DbErr> {
    match op {
        Op::Apply(batch) => exec_batch(db, batch).map(Out::Applied),
        Op::Claim {
            run_id,
            owner,
            now_ms,
            stale_before_ms,
            dead_owner,
        } => {
            let n = db
                .get(
                    "UPDATE _smithers_runs SET runtime_owner_id = ?2, heartbeat_at_ms = ?3
                     WHERE run_id = ?1
                       AND (runtime_owner_id IS NULL
                            OR heartbeat_at_ms IS NULL
                            OR heartbeat_at_ms < ?4
                            OR (?5 IS NOT NULL AND runtime_owner_id = ?5))",
                )?
                .execute(params![run_id, owner, now_ms, stale_before_ms, dead_owner])?;
            Ok(Out::Flag(n == 1))
        }
        Op::Heartbeat { owner, now_ms } => {
            let stmt = db.get(
                "UPDATE _smithers_runs SET heartbeat_at_ms = ?2 WHERE runtime_owner_id = ?1
                 RETURNING run_id, cancel_requested_at_ms",
            )?;
            let mut rows = stmt.query(params![owner, now_ms])?;
            let mut hb = Heartbeat::default();
            while let Some(row) = rows.next()? {
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
            let n = db
                .get(
                    "UPDATE _smithers_runs SET cancel_requested_at_ms = COALESCE(cancel_requested_at_ms, ?2)
                     WHERE run_id = ?1",
                )?
                .execute(params![run_id, now_ms])?;
            Ok(Out::Flag(n == 1))
        }
        Op::Signal(s) => {
            let existing: Option<i64> = db
                .get(
                    "SELECT seq FROM _smithers_signals
                     WHERE run_id = ?1 AND signal_name = ?2 AND correlation_id IS ?3 AND payload_json = ?4
                       AND received_at_ms = ?5 AND received_by IS ?6
                     ORDER BY seq LIMIT 1",
                )?
                .query_row(
                    params![s.run_id, s.signal_name, s.correlation_id, s.payload_json, s.received_at_ms, s.received_by],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(seq) = existing {
                return Ok(Out::Seq(seq));
            }
            let seq: i64 = db
                .get("SELECT COALESCE(MAX(seq) + 1, 0) FROM _smithers_signals WHERE run_id = (?1 || '')")?
                .query_row(params![s.run_id], |r| r.get(0))?;
            db.get(
                "INSERT INTO _smithers_signals
                    (run_id, seq, signal_name, correlation_id, payload_json, received_at_ms, received_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![s.run_id, seq, s.signal_name, s.correlation_id, s.payload_json, s.received_at_ms, s.received_by])?;
            Ok(Out::Seq(seq))
        }
        Op::UpsertCron(r) => {
            db.get(
                "INSERT INTO _smithers_cron (cron_id, pattern, workflow_path, enabled, created_at_ms,
                    last_run_at_ms, next_run_at_ms, error_json, input_json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (cron_id) DO UPDATE SET pattern = excluded.pattern,
                    workflow_path = excluded.workflow_path, enabled = excluded.enabled,
                    next_run_at_ms = excluded.next_run_at_ms, input_json = excluded.input_json",
            )?
            .execute(params![
                r.cron_id,
                r.pattern,
                r.workflow_path,
                r.enabled,
                r.created_at_ms,
                r.last_run_at_ms,
                r.next_run_at_ms,
                r.error_json,
                r.input_json
            ])?;
            Ok(Out::Flag(true))
        }
        Op::DeleteCron(id) => {
            let n = db
                .get("DELETE FROM _smithers_cron WHERE cron_id = ?1")?
                .execute(params![id])?;
            Ok(Out::Flag(n == 1))
        }
        Op::UpdateCronRun {
            cron_id,
            last_run_at_ms,
            next_run_at_ms,
            error_json,
        } => {
            let n = db
                .get(
                    "UPDATE _smithers_cron SET last_run_at_ms = ?2, next_run_at_ms = ?3, error_json = ?4
                     WHERE cron_id = ?1",
                )?
                .execute(params![cron_id, last_run_at_ms, next_run_at_ms, error_json])?;
            Ok(Out::Flag(n == 1))
        }
        Op::ClaimCron {
            cron_id,
            expected,
            new_next,
            now_ms,
        } => {
            // `IS` compares NULL-safely, so a never-scheduled cron can be claimed once too.
            let n = db
                .get(
                    "UPDATE _smithers_cron SET next_run_at_ms = ?3, last_run_at_ms = ?4
                     WHERE cron_id = ?1 AND enabled = 1 AND next_run_at_ms IS ?2",
                )?
                .execute(params![cron_id, expected, new_next, now_ms])?;
            Ok(Out::Flag(n == 1))
        }
        Op::Delivery(w) => deliveries::exec(db, w),
    }
}

fn check_guard(db: &mut Prepared<'_>, g: &OwnerGuard) -> Result<(), DbErr> {
    let owner: Option<Option<String>> = db
        .get("SELECT runtime_owner_id FROM _smithers_runs WHERE run_id = ?1")?
        .query_row(params![g.run_id], |r| r.get(0))
        .optional()?;
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

fn exec_batch(db: &mut Prepared<'_>, batch: &Batch) -> Result<Applied, DbErr> {
    if let Some(g) = &batch.guard {
        check_guard(db, g)?;
    }
    let mut applied = Applied::default();
    let mut next_seq = None;
    for w in &batch.writes {
        if let Some(seq) = exec_write(db, w, &mut next_seq)? {
            applied.event_seqs.push(seq);
        }
    }
    Ok(applied)
}

/// Executes one write; returns the event seq for `AppendEvent`. `next_seq` carries the next
/// seq of the run whose event the batch appended last: the transaction is the only writer, so
/// a run of events for one run reads the log's end once, not once per event.
fn exec_write<'b>(
    db: &mut Prepared<'_>,
    w: &'b Write,
    next_seq: &mut Option<(&'b str, i64)>,
) -> Result<Option<i64>, DbErr> {
    match w {
        Write::InsertRun(r) => {
            validate_run_status(&r.run_id, &r.status)?;
            let n = db
                .get(
                    "INSERT INTO _smithers_runs (run_id, parent_run_id, workflow_name, workflow_path, workflow_hash,
                        status, created_at_ms, started_at_ms, finished_at_ms, heartbeat_at_ms, runtime_owner_id,
                        cancel_requested_at_ms, hijack_requested_at_ms, hijack_target, vcs_type, vcs_root,
                        vcs_revision, error_json, config_json)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)
                     ON CONFLICT (run_id) DO NOTHING",
                )?
                .execute(params![
                    r.run_id,
                    r.parent_run_id,
                    r.workflow_name,
                    r.workflow_path,
                    r.workflow_hash,
                    r.status,
                    r.created_at_ms,
                    r.started_at_ms,
                    r.finished_at_ms,
                    r.heartbeat_at_ms,
                    r.runtime_owner_id,
                    r.cancel_requested_at_ms,
                    r.hijack_requested_at_ms,
                    r.hijack_target,
                    r.vcs_type,
                    r.vcs_root,
                    r.vcs_revision,
                    r.error_json,
                    r.config_json,
                ])?;
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
        Write::UpdateRun { run_id, patch } => update_run(db, run_id, patch)?,
        Write::InsertInput {
            run_id,
            payload_json,
        } => {
            db.get("INSERT INTO input (run_id, payload) VALUES (?1, ?2) ON CONFLICT (run_id) DO NOTHING")?
                .execute(params![run_id, payload_json])?;
        }
        Write::UpsertNode(n) => {
            db.get(
                "INSERT INTO _smithers_nodes (run_id, node_id, iteration, state, last_attempt, updated_at_ms, output_table, label)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (run_id, node_id, iteration) DO UPDATE SET
                    state = excluded.state, last_attempt = excluded.last_attempt,
                    updated_at_ms = excluded.updated_at_ms, output_table = excluded.output_table,
                    label = excluded.label",
            )?
            .execute(params![n.run_id, n.node_id, n.iteration, n.state, n.last_attempt, n.updated_at_ms, n.output_table, n.label])?;
        }
        Write::UpsertAttempt(a) => {
            db.get(
                "INSERT INTO _smithers_attempts (run_id, node_id, iteration, attempt, state, started_at_ms,
                    finished_at_ms, heartbeat_at_ms, heartbeat_data_json, error_json, jj_pointer, response_text,
                    jj_cwd, cached, meta_json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 ON CONFLICT (run_id, node_id, iteration, attempt) DO UPDATE SET
                    state = excluded.state, started_at_ms = excluded.started_at_ms,
                    finished_at_ms = excluded.finished_at_ms, heartbeat_at_ms = excluded.heartbeat_at_ms,
                    heartbeat_data_json = excluded.heartbeat_data_json, error_json = excluded.error_json,
                    jj_pointer = excluded.jj_pointer, response_text = excluded.response_text,
                    jj_cwd = excluded.jj_cwd, cached = excluded.cached, meta_json = excluded.meta_json",
            )?
            .execute(params![
                a.run_id,
                a.node_id,
                a.iteration,
                a.attempt,
                a.state,
                a.started_at_ms,
                a.finished_at_ms,
                a.heartbeat_at_ms,
                a.heartbeat_data_json,
                a.error_json,
                a.jj_pointer,
                a.response_text,
                a.jj_cwd,
                a.cached,
                a.meta_json,
            ])?;
        }
        Write::UpsertOutput(o) => {
            db.get(
                "INSERT INTO _smithers_outputs (run_id, node_id, iteration, output_table, payload_json, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (run_id, node_id, iteration) DO UPDATE SET
                    output_table = excluded.output_table, payload_json = excluded.payload_json,
                    created_at_ms = excluded.created_at_ms",
            )?
            .execute(params![o.run_id, o.node_id, o.iteration, o.output_table, o.payload_json, o.created_at_ms])?;
        }
        Write::DeleteOutput {
            run_id,
            node_id,
            iteration,
        } => {
            db.get("DELETE FROM _smithers_outputs WHERE run_id = ?1 AND node_id = ?2 AND iteration = ?3")?
                .execute(params![run_id, node_id, iteration])?;
        }
        Write::ClearRunState { run_id } => {
            for sql in [
                "DELETE FROM _smithers_nodes WHERE run_id = ?1",
                "DELETE FROM _smithers_outputs WHERE run_id = ?1",
                "DELETE FROM _smithers_ralph WHERE run_id = ?1",
            ] {
                db.get(sql)?.execute(params![run_id])?;
            }
        }
        Write::DeleteFramesAfter { run_id, frame_no } => {
            for sql in [
                "DELETE FROM _smithers_frames WHERE run_id = ?1 AND frame_no > ?2",
                "DELETE FROM _smithers_snapshots WHERE run_id = ?1 AND frame_no > ?2",
            ] {
                db.get(sql)?.execute(params![run_id, frame_no])?;
            }
        }
        Write::DeleteAttemptsAfter {
            run_id,
            started_after_ms,
        } => {
            db.get("DELETE FROM _smithers_attempts WHERE run_id = ?1 AND started_at_ms > ?2")?
                .execute(params![run_id, started_after_ms])?;
            db.get(
                "DELETE FROM _smithers_approvals WHERE run_id = ?1 AND COALESCE(decided_at_ms, requested_at_ms, 0) > ?2",
            )?
            .execute(params![run_id, started_after_ms])?;
        }
        Write::InsertFrame(f) => {
            db.get(
                "INSERT INTO _smithers_frames (run_id, frame_no, created_at_ms, xml_json, xml_hash, encoding,
                    mounted_task_ids_json, task_index_json, note)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                f.run_id,
                f.frame_no,
                f.created_at_ms,
                f.xml_json,
                f.xml_hash,
                f.encoding,
                f.mounted_task_ids_json,
                f.task_index_json,
                f.note,
            ])
            .map_err(|e| duplicate(e, || format!("frame {} of run `{}` already exists", f.frame_no, f.run_id)))?;
        }
        Write::InsertSnapshot(s) => {
            db.get(
                "INSERT INTO _smithers_snapshots (run_id, frame_no, encoding, nodes_json, outputs_json, ralph_json,
                    input_json, vcs_pointer, workflow_hash, content_hash, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                s.run_id,
                s.frame_no,
                s.encoding,
                s.nodes_json,
                s.outputs_json,
                s.ralph_json,
                s.input_json,
                s.vcs_pointer,
                s.workflow_hash,
                s.content_hash,
                s.created_at_ms,
            ])
            .map_err(|e| duplicate(e, || format!("snapshot of frame {} of run `{}` already exists", s.frame_no, s.run_id)))?;
        }
        Write::AppendEvent {
            run_id,
            timestamp_ms,
            event_type,
            payload_json,
        } => {
            // Two plain cached statements. `(?1 || '')` is deliberate: with a bare `?1` SQLite
            // re-prepares this statement on every execution (the plan is marked as depending on
            // the bound value), which cost more than the insert itself.
            let seq: i64 = match *next_seq {
                Some((r, seq)) if r == run_id.as_str() => seq,
                _ => db
                    .get("SELECT COALESCE(MAX(seq) + 1, 0) FROM _smithers_events WHERE run_id = (?1 || '')")?
                    .query_row(params![run_id], |r| r.get(0))?,
            };
            db.get(
                "INSERT INTO _smithers_events (run_id, seq, timestamp_ms, type, payload_json)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![run_id, seq, timestamp_ms, event_type, payload_json])?;
            *next_seq = Some((run_id.as_str(), seq + 1));
            return Ok(Some(seq));
        }
        Write::UpsertAudit(a) => {
            db.get(
                "INSERT INTO _smithers_time_travel_audit (id, run_id, from_frame_no, to_frame_no, caller,
                    timestamp_ms, result, duration_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (id) DO UPDATE SET
                    from_frame_no = excluded.from_frame_no, to_frame_no = excluded.to_frame_no,
                    result = excluded.result, duration_ms = excluded.duration_ms",
            )?
            .execute(params![
                a.id,
                a.run_id,
                a.from_frame_no,
                a.to_frame_no,
                a.caller,
                a.timestamp_ms,
                a.result,
                a.duration_ms
            ])?;
        }
        Write::UpsertNodeDiff(d) => {
            db.get(
                "INSERT INTO _smithers_node_diffs (run_id, node_id, iteration, base_ref, attempt,
                    attempt_started_at_ms, bundle_json, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (run_id, node_id, iteration, attempt, base_ref) DO UPDATE SET
                    attempt_started_at_ms = excluded.attempt_started_at_ms,
                    bundle_json = excluded.bundle_json, created_at_ms = excluded.created_at_ms",
            )?
            .execute(params![
                d.run_id,
                d.node_id,
                d.iteration,
                d.base_ref,
                d.attempt,
                d.attempt_started_at_ms,
                d.bundle_json,
                d.created_at_ms
            ])?;
        }
        Write::DeleteAttempt {
            run_id,
            node_id,
            iteration,
            attempt,
        } => {
            db.get(
                "DELETE FROM _smithers_attempts WHERE run_id = ?1 AND node_id = ?2 AND iteration = ?3 AND attempt = ?4",
            )?
            .execute(params![run_id, node_id, iteration, attempt])?;
            db.get(
                "DELETE FROM _smithers_node_diffs WHERE run_id = ?1 AND node_id = ?2 AND iteration = ?3 AND attempt = ?4",
            )?
            .execute(params![run_id, node_id, iteration, attempt])?;
        }
        Write::DeleteNodeDiffsAfter {
            run_id,
            started_after_ms,
        } => {
            db.get(
                "DELETE FROM _smithers_node_diffs WHERE run_id = ?1 AND attempt_started_at_ms > ?2",
            )?
            .execute(params![run_id, started_after_ms])?;
        }
        Write::UpsertLoop(l) => {
            db.get(
                "INSERT INTO _smithers_ralph (run_id, ralph_id, iteration, done, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (run_id, ralph_id) DO UPDATE SET
                    iteration = excluded.iteration, done = excluded.done, updated_at_ms = excluded.updated_at_ms",
            )?
            .execute(params![l.run_id, l.ralph_id, l.iteration, l.done, l.updated_at_ms])?;
        }
        Write::UpsertApproval(a) => {
            db.get(
                "INSERT INTO _smithers_approvals (run_id, node_id, iteration, status, requested_at_ms, decided_at_ms,
                    note, decided_by, request_json, decision_json, auto_approved)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (run_id, node_id, iteration) DO UPDATE SET
                    status = excluded.status, requested_at_ms = excluded.requested_at_ms,
                    decided_at_ms = excluded.decided_at_ms, note = excluded.note, decided_by = excluded.decided_by,
                    request_json = excluded.request_json, decision_json = excluded.decision_json,
                    auto_approved = excluded.auto_approved",
            )?
            .execute(params![
                a.run_id,
                a.node_id,
                a.iteration,
                a.status,
                a.requested_at_ms,
                a.decided_at_ms,
                a.note,
                a.decided_by,
                a.request_json,
                a.decision_json,
                a.auto_approved,
            ])?;
        }
    }
    Ok(None)
}

fn duplicate(e: rusqlite::Error, msg: impl FnOnce() -> String) -> DbErr {
    if is_constraint(&e) {
        DbErr::App(SmithersError::new(Code::DbWriteFailed, msg()).terminal())
    } else {
        DbErr::Sqlite(e)
    }
}

fn update_run(db: &mut Prepared<'_>, run_id: &str, p: &RunPatch) -> Result<(), DbErr> {
    // The columns a patch may set, each with its value bound by reference. A statement is kept
    // per set of columns, so building its text happens once per shape, not once per update.
    let cols: [(&str, Option<&dyn rusqlite::ToSql>); 9] = [
        ("status", p.status.as_ref().map(|v| v as _)),
        ("workflow_name", p.workflow_name.as_ref().map(|v| v as _)),
        ("started_at_ms", p.started_at_ms.as_ref().map(|v| v as _)),
        ("finished_at_ms", p.finished_at_ms.as_ref().map(|v| v as _)),
        (
            "heartbeat_at_ms",
            p.heartbeat_at_ms.as_ref().map(|v| v as _),
        ),
        (
            "runtime_owner_id",
            p.runtime_owner_id.as_ref().map(|v| v as _),
        ),
        (
            "cancel_requested_at_ms",
            p.cancel_requested_at_ms.as_ref().map(|v| v as _),
        ),
        ("error_json", p.error_json.as_ref().map(|v| v as _)),
        ("config_json", p.config_json.as_ref().map(|v| v as _)),
    ];
    if let Some(s) = &p.status {
        validate_run_status(run_id, s)?;
    }
    let mut mask = 0u16;
    let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(cols.len() + 1);
    values.push(&run_id);
    for (i, (_, v)) in cols.iter().enumerate() {
        if let Some(v) = v {
            mask |= 1 << i;
            values.push(*v);
        }
    }
    let n = if mask == 0 {
        db.get("SELECT 1 FROM _smithers_runs WHERE run_id = ?1")?
            .query_row(params![run_id], |_| Ok(()))
            .optional()?
            .map_or(0, |_| 1)
    } else {
        let build = || {
            let assignments: Vec<String> = cols
                .iter()
                .filter(|(_, v)| v.is_some())
                .enumerate()
                .map(|(i, (col, _))| format!("{col} = ?{}", i + 2))
                .collect();
            format!(
                "UPDATE _smithers_runs SET {} WHERE run_id = ?1",
                assignments.join(", ")
            )
        };
        db.get_or(prepared::Key::RunPatch(mask), build)?
            .execute(values.as_slice())?
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

// ---------------------------------------------------------------------------------------------
// Row decoding

/// Typed access to one row that turns unusable content into `DB_CORRUPT` naming the table,
/// the row's key and the column, instead of panicking or returning garbage.
struct Cols<'a, 'b> {
    row: &'a Row<'b>,
    table: &'static str,
    key: &'static [&'static str],
}

impl<'a, 'b> Cols<'a, 'b> {
    fn new(row: &'a Row<'b>, table: &'static str, key: &'static [&'static str]) -> Self {
        Cols { row, table, key }
    }

    fn key_text(&self) -> String {
        let parts: Vec<String> = self
            .key
            .iter()
            .map(|k| match self.row.get_ref(*k) {
                Ok(ValueRef::Text(t)) => format!("{k}=`{}`", String::from_utf8_lossy(t)),
                Ok(ValueRef::Integer(i)) => format!("{k}={i}"),
                Ok(ValueRef::Real(f)) => format!("{k}={f}"),
                Ok(ValueRef::Null) => format!("{k}=NULL"),
                Ok(ValueRef::Blob(_)) => format!("{k}=<blob>"),
                Err(_) => format!("{k}=?"),
            })
            .collect();
        parts.join(", ")
    }

    fn corrupt(&self, col: &str, detail: impl std::fmt::Display) -> DbErr {
        DbErr::App(
            SmithersError::new(
                Code::DbCorrupt,
                format!(
                    "corrupt row in table `{}` ({}): column `{col}`: {detail}; the database may be damaged: restore it from a backup or repair the row",
                    self.table,
                    self.key_text()
                ),
            )
            .terminal(),
        )
    }

    fn get<T: FromSql>(&self, col: &'static str) -> Result<T, DbErr> {
        match self.row.get::<_, T>(col) {
            Ok(v) => Ok(v),
            Err(e @ rusqlite::Error::InvalidColumnType(..))
            | Err(e @ rusqlite::Error::FromSqlConversionFailure(..))
            | Err(e @ rusqlite::Error::IntegralValueOutOfRange(..))
            | Err(e @ rusqlite::Error::Utf8Error(..)) => {
                let found = match self.row.get_ref(col) {
                    Ok(ValueRef::Null) => "NULL".to_string(),
                    Ok(v) => format!("a value of type {}", v.data_type()),
                    Err(_) => "an unreadable value".to_string(),
                };
                Err(self.corrupt(col, format!("unexpected {found} ({e})")))
            }
            Err(e) => Err(DbErr::Sqlite(e)),
        }
    }

    fn flag(&self, col: &'static str) -> Result<bool, DbErr> {
        match self.get::<i64>(col)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.corrupt(col, format!("expected 0 or 1, found {other}"))),
        }
    }
}

macro_rules! run_cols {
    () => {
        "run_id, parent_run_id, workflow_name, workflow_path, workflow_hash, status, created_at_ms, started_at_ms, \
         finished_at_ms, heartbeat_at_ms, runtime_owner_id, cancel_requested_at_ms, hijack_requested_at_ms, \
         hijack_target, vcs_type, vcs_root, vcs_revision, error_json, config_json"
    };
}
macro_rules! node_cols {
    () => {
        "run_id, node_id, iteration, state, last_attempt, updated_at_ms, output_table, label"
    };
}
macro_rules! attempt_cols {
    () => {
        "run_id, node_id, iteration, attempt, state, started_at_ms, finished_at_ms, heartbeat_at_ms, \
         heartbeat_data_json, error_json, jj_pointer, response_text, jj_cwd, cached, meta_json"
    };
}
macro_rules! output_cols {
    () => {
        "run_id, node_id, iteration, output_table, payload_json, created_at_ms"
    };
}
macro_rules! frame_cols {
    () => {
        "run_id, frame_no, created_at_ms, xml_json, xml_hash, encoding, mounted_task_ids_json, task_index_json, note"
    };
}
macro_rules! snapshot_cols {
    () => {
        "run_id, frame_no, encoding, nodes_json, outputs_json, ralph_json, input_json, vcs_pointer, workflow_hash, \
         content_hash, created_at_ms"
    };
}
macro_rules! event_cols {
    () => {
        "run_id, seq, timestamp_ms, type, payload_json"
    };
}
macro_rules! loop_cols {
    () => {
        "run_id, ralph_id, iteration, done, updated_at_ms"
    };
}
macro_rules! approval_cols {
    () => {
        "run_id, node_id, iteration, status, requested_at_ms, decided_at_ms, note, decided_by, request_json, \
         decision_json, auto_approved"
    };
}
macro_rules! signal_cols {
    () => {
        "run_id, seq, signal_name, correlation_id, payload_json, received_at_ms, received_by"
    };
}

macro_rules! cron_cols {
    () => {
        "cron_id, pattern, workflow_path, enabled, created_at_ms, last_run_at_ms, next_run_at_ms, error_json, input_json"
    };
}

fn cron_row(row: &Row) -> Result<CronRow, DbErr> {
    let c = Cols::new(row, "_smithers_cron", &["cron_id"]);
    Ok(CronRow {
        cron_id: c.get("cron_id")?,
        pattern: c.get("pattern")?,
        workflow_path: c.get("workflow_path")?,
        enabled: c.flag("enabled")?,
        created_at_ms: c.get("created_at_ms")?,
        last_run_at_ms: c.get("last_run_at_ms")?,
        next_run_at_ms: c.get("next_run_at_ms")?,
        error_json: c.get("error_json")?,
        input_json: c.get("input_json")?,
    })
}

fn run_row(row: &Row) -> Result<RunRow, DbErr> {
    let c = Cols::new(row, "_smithers_runs", &["run_id"]);
    let status: String = c.get("status")?;
    if !status::ALL.contains(&status.as_str()) {
        return Err(c.corrupt("status", format!("unknown run status `{status}`")));
    }
    Ok(RunRow {
        run_id: c.get("run_id")?,
        parent_run_id: c.get("parent_run_id")?,
        workflow_name: c.get("workflow_name")?,
        workflow_path: c.get("workflow_path")?,
        workflow_hash: c.get("workflow_hash")?,
        status,
        created_at_ms: c.get("created_at_ms")?,
        started_at_ms: c.get("started_at_ms")?,
        finished_at_ms: c.get("finished_at_ms")?,
        heartbeat_at_ms: c.get("heartbeat_at_ms")?,
        runtime_owner_id: c.get("runtime_owner_id")?,
        cancel_requested_at_ms: c.get("cancel_requested_at_ms")?,
        hijack_requested_at_ms: c.get("hijack_requested_at_ms")?,
        hijack_target: c.get("hijack_target")?,
        vcs_type: c.get("vcs_type")?,
        vcs_root: c.get("vcs_root")?,
        vcs_revision: c.get("vcs_revision")?,
        error_json: c.get("error_json")?,
        config_json: c.get("config_json")?,
    })
}

fn node_row(row: &Row) -> Result<NodeRow, DbErr> {
    let c = Cols::new(row, "_smithers_nodes", &["run_id", "node_id", "iteration"]);
    Ok(NodeRow {
        run_id: c.get("run_id")?,
        node_id: c.get("node_id")?,
        iteration: c.get("iteration")?,
        state: c.get("state")?,
        last_attempt: c.get("last_attempt")?,
        updated_at_ms: c.get("updated_at_ms")?,
        output_table: c.get("output_table")?,
        label: c.get("label")?,
    })
}

fn attempt_row(row: &Row) -> Result<AttemptRow, DbErr> {
    let c = Cols::new(
        row,
        "_smithers_attempts",
        &["run_id", "node_id", "iteration", "attempt"],
    );
    Ok(AttemptRow {
        run_id: c.get("run_id")?,
        node_id: c.get("node_id")?,
        iteration: c.get("iteration")?,
        attempt: c.get("attempt")?,
        state: c.get("state")?,
        started_at_ms: c.get("started_at_ms")?,
        finished_at_ms: c.get("finished_at_ms")?,
        heartbeat_at_ms: c.get("heartbeat_at_ms")?,
        heartbeat_data_json: c.get("heartbeat_data_json")?,
        error_json: c.get("error_json")?,
        jj_pointer: c.get("jj_pointer")?,
        response_text: c.get("response_text")?,
        jj_cwd: c.get("jj_cwd")?,
        cached: c.flag("cached")?,
        meta_json: c.get("meta_json")?,
    })
}

fn output_row(row: &Row) -> Result<OutputRow, DbErr> {
    let c = Cols::new(
        row,
        "_smithers_outputs",
        &["run_id", "node_id", "iteration"],
    );
    Ok(OutputRow {
        run_id: c.get("run_id")?,
        node_id: c.get("node_id")?,
        iteration: c.get("iteration")?,
        output_table: c.get("output_table")?,
        payload_json: c.get("payload_json")?,
        created_at_ms: c.get("created_at_ms")?,
    })
}

fn frame_row(row: &Row) -> Result<FrameRow, DbErr> {
    let c = Cols::new(row, "_smithers_frames", &["run_id", "frame_no"]);
    Ok(FrameRow {
        run_id: c.get("run_id")?,
        frame_no: c.get("frame_no")?,
        created_at_ms: c.get("created_at_ms")?,
        xml_json: c.get("xml_json")?,
        xml_hash: c.get("xml_hash")?,
        encoding: c.get("encoding")?,
        mounted_task_ids_json: c.get("mounted_task_ids_json")?,
        task_index_json: c.get("task_index_json")?,
        note: c.get("note")?,
    })
}

fn snapshot_row(row: &Row) -> Result<SnapshotRow, DbErr> {
    let c = Cols::new(row, "_smithers_snapshots", &["run_id", "frame_no"]);
    Ok(SnapshotRow {
        run_id: c.get("run_id")?,
        frame_no: c.get("frame_no")?,
        encoding: c.get("encoding")?,
        nodes_json: c.get("nodes_json")?,
        outputs_json: c.get("outputs_json")?,
        ralph_json: c.get("ralph_json")?,
        input_json: c.get("input_json")?,
        vcs_pointer: c.get("vcs_pointer")?,
        workflow_hash: c.get("workflow_hash")?,
        content_hash: c.get("content_hash")?,
        created_at_ms: c.get("created_at_ms")?,
    })
}

fn event_row(row: &Row) -> Result<EventRow, DbErr> {
    let c = Cols::new(row, "_smithers_events", &["run_id", "seq"]);
    Ok(EventRow {
        run_id: c.get("run_id")?,
        seq: c.get("seq")?,
        timestamp_ms: c.get("timestamp_ms")?,
        event_type: c.get("type")?,
        payload_json: c.get("payload_json")?,
    })
}

fn audit_row(row: &Row) -> Result<AuditRow, DbErr> {
    let c = Cols::new(row, "_smithers_time_travel_audit", &["id"]);
    Ok(AuditRow {
        id: c.get("id")?,
        run_id: c.get("run_id")?,
        from_frame_no: c.get("from_frame_no")?,
        to_frame_no: c.get("to_frame_no")?,
        caller: c.get("caller")?,
        timestamp_ms: c.get("timestamp_ms")?,
        result: c.get("result")?,
        duration_ms: c.get("duration_ms")?,
    })
}

fn node_diff_row(row: &Row) -> Result<NodeDiffRow, DbErr> {
    let c = Cols::new(
        row,
        "_smithers_node_diffs",
        &["run_id", "node_id", "iteration", "attempt", "base_ref"],
    );
    Ok(NodeDiffRow {
        run_id: c.get("run_id")?,
        node_id: c.get("node_id")?,
        iteration: c.get("iteration")?,
        base_ref: c.get("base_ref")?,
        attempt: c.get("attempt")?,
        attempt_started_at_ms: c.get("attempt_started_at_ms")?,
        bundle_json: c.get("bundle_json")?,
        created_at_ms: c.get("created_at_ms")?,
    })
}

fn loop_row(row: &Row) -> Result<LoopRow, DbErr> {
    let c = Cols::new(row, "_smithers_ralph", &["run_id", "ralph_id"]);
    Ok(LoopRow {
        run_id: c.get("run_id")?,
        ralph_id: c.get("ralph_id")?,
        iteration: c.get("iteration")?,
        done: c.flag("done")?,
        updated_at_ms: c.get("updated_at_ms")?,
    })
}

fn approval_row(row: &Row) -> Result<ApprovalRow, DbErr> {
    let c = Cols::new(
        row,
        "_smithers_approvals",
        &["run_id", "node_id", "iteration"],
    );
    Ok(ApprovalRow {
        run_id: c.get("run_id")?,
        node_id: c.get("node_id")?,
        iteration: c.get("iteration")?,
        status: c.get("status")?,
        requested_at_ms: c.get("requested_at_ms")?,
        decided_at_ms: c.get("decided_at_ms")?,
        note: c.get("note")?,
        decided_by: c.get("decided_by")?,
        request_json: c.get("request_json")?,
        decision_json: c.get("decision_json")?,
        auto_approved: c.flag("auto_approved")?,
    })
}

fn signal_row(row: &Row) -> Result<SignalRow, DbErr> {
    let c = Cols::new(row, "_smithers_signals", &["run_id", "seq"]);
    Ok(SignalRow {
        run_id: c.get("run_id")?,
        seq: c.get("seq")?,
        signal_name: c.get("signal_name")?,
        correlation_id: c.get("correlation_id")?,
        payload_json: c.get("payload_json")?,
        received_at_ms: c.get("received_at_ms")?,
        received_by: c.get("received_by")?,
    })
}

type Decode<T> = fn(&Row) -> Result<T, DbErr>;

fn query_all<T, P: Params>(
    conn: &Connection,
    sql: &str,
    p: P,
    decode: Decode<T>,
) -> Result<Vec<T>, DbErr> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(p)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(decode(row)?);
    }
    Ok(out)
}

fn query_one<T, P: Params>(
    conn: &Connection,
    sql: &str,
    p: P,
    decode: Decode<T>,
) -> Result<Option<T>, DbErr> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(p)?;
    match rows.next()? {
        Some(row) => Ok(Some(decode(row)?)),
        None => Ok(None),
    }
}

fn query_i64<P: Params>(conn: &Connection, sql: &str, p: P) -> Result<i64, DbErr> {
    Ok(conn.prepare_cached(sql)?.query_row(p, |r| r.get(0))?)
}

// ---------------------------------------------------------------------------------------------
// Store implementation

fn unexpected(what: &str) -> SmithersError {
    SmithersError::new(
        Code::Internal,
        format!("{what}: the SQLite writer sent an unexpected reply"),
    )
}

#[async_trait]
impl Store for SqliteStore {
    async fn apply(&self, batch: Batch) -> Result<Applied> {
        if batch.guard.is_none() && batch.writes.is_empty() {
            return Ok(Applied::default());
        }
        match self.call(Op::Apply(batch)).await? {
            Out::Applied(a) => Ok(a),
            _ => Err(unexpected("apply")),
        }
    }

    async fn claim_run(
        &self,
        run_id: &str,
        owner: &str,
        now_ms: i64,
        stale_before_ms: i64,
        dead_owner: Option<&str>,
    ) -> Result<bool> {
        let op = Op::Claim {
            run_id: run_id.to_string(),
            owner: owner.to_string(),
            now_ms,
            stale_before_ms,
            dead_owner: dead_owner.map(str::to_string),
        };
        match self.call(op).await? {
            Out::Flag(b) => Ok(b),
            _ => Err(unexpected("claim_run")),
        }
    }

    async fn heartbeat(&self, owner: &str, now_ms: i64) -> Result<Heartbeat> {
        match self
            .call(Op::Heartbeat {
                owner: owner.to_string(),
                now_ms,
            })
            .await?
        {
            Out::Heartbeat(h) => Ok(h),
            _ => Err(unexpected("heartbeat")),
        }
    }

    async fn request_cancel(&self, run_id: &str, now_ms: i64) -> Result<bool> {
        match self
            .call(Op::Cancel {
                run_id: run_id.to_string(),
                now_ms,
            })
            .await?
        {
            Out::Flag(b) => Ok(b),
            _ => Err(unexpected("request_cancel")),
        }
    }

    async fn insert_signal(&self, signal: NewSignal) -> Result<i64> {
        match self.call(Op::Signal(signal)).await? {
            Out::Seq(s) => Ok(s),
            _ => Err(unexpected("insert_signal")),
        }
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<RunRow>> {
        let id = run_id.to_string();
        self.read("get_run", move |c| {
            query_one(
                c,
                concat!(
                    "SELECT ",
                    run_cols!(),
                    " FROM _smithers_runs WHERE run_id = ?1"
                ),
                params![id],
                run_row,
            )
        })
        .await
    }

    async fn query_runs(&self, q: &RunQuery) -> Result<Vec<RunRow>> {
        let (tail, args) = crate::run_query::run_query_sql(q, |n| format!("?{n}"), true);
        let sql = format!(
            concat!("SELECT ", run_cols!(), " FROM _smithers_runs{}"),
            tail
        );
        let args: Vec<Value> = args
            .into_iter()
            .map(|a| match a {
                crate::run_query::Arg::Text(t) => Value::Text(t),
                crate::run_query::Arg::Int(i) => Value::Integer(i),
            })
            .collect();
        self.read("query_runs", move |c| {
            query_all(c, &sql, rusqlite::params_from_iter(args.iter()), run_row)
        })
        .await
    }

    async fn list_stale_runs(&self, stale_before_ms: i64, limit: usize) -> Result<Vec<RunRow>> {
        let limit = limit_param(limit);
        self.read("list_stale_runs", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    run_cols!(),
                    " FROM _smithers_runs INDEXED BY _smithers_runs_stale_idx
                     WHERE status = 'running'
                       AND (runtime_owner_id IS NULL OR heartbeat_at_ms IS NULL OR heartbeat_at_ms < ?1)
                     ORDER BY heartbeat_at_ms ASC, run_id ASC LIMIT ?2"
                ),
                params![stale_before_ms, limit],
                run_row,
            )
        })
        .await
    }

    async fn get_input(&self, run_id: &str) -> Result<Option<String>> {
        let id = run_id.to_string();
        self.read("get_input", move |c| {
            query_one(
                c,
                "SELECT run_id, payload FROM input WHERE run_id = ?1",
                params![id],
                |row| Cols::new(row, "input", &["run_id"]).get("payload"),
            )
        })
        .await
    }

    async fn list_nodes(&self, run_id: &str) -> Result<Vec<NodeRow>> {
        let id = run_id.to_string();
        self.read("list_nodes", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    node_cols!(),
                    " FROM _smithers_nodes WHERE run_id = ?1 ORDER BY node_id, iteration"
                ),
                params![id],
                node_row,
            )
        })
        .await
    }

    async fn get_node(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Option<NodeRow>> {
        let (id, node) = (run_id.to_string(), node_id.to_string());
        self.read("get_node", move |c| {
            query_one(
                c,
                concat!(
                    "SELECT ",
                    node_cols!(),
                    " FROM _smithers_nodes WHERE run_id = ?1 AND node_id = ?2 AND iteration = ?3"
                ),
                params![id, node, iteration],
                node_row,
            )
        })
        .await
    }

    async fn list_attempts(&self, run_id: &str) -> Result<Vec<AttemptRow>> {
        let id = run_id.to_string();
        self.read("list_attempts", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    attempt_cols!(),
                    " FROM _smithers_attempts WHERE run_id = ?1 ORDER BY started_at_ms, node_id, iteration, attempt"
                ),
                params![id],
                attempt_row,
            )
        })
        .await
    }

    async fn list_node_attempts(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Vec<AttemptRow>> {
        let (id, node) = (run_id.to_string(), node_id.to_string());
        self.read("list_node_attempts", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    attempt_cols!(),
                    " FROM _smithers_attempts WHERE run_id = ?1 AND node_id = ?2 AND iteration = ?3 ORDER BY attempt DESC"
                ),
                params![id, node, iteration],
                attempt_row,
            )
        })
        .await
    }

    async fn get_attempt(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
        attempt: i64,
    ) -> Result<Option<AttemptRow>> {
        let (id, node) = (run_id.to_string(), node_id.to_string());
        self.read("get_attempt", move |c| {
            query_one(
                c,
                concat!(
                    "SELECT ",
                    attempt_cols!(),
                    " FROM _smithers_attempts WHERE run_id = ?1 AND node_id = ?2 AND iteration = ?3 AND attempt = ?4"
                ),
                params![id, node, iteration, attempt],
                attempt_row,
            )
        })
        .await
    }

    async fn list_outputs(&self, run_id: &str) -> Result<Vec<OutputRow>> {
        let id = run_id.to_string();
        self.read("list_outputs", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    output_cols!(),
                    " FROM _smithers_outputs WHERE run_id = ?1 ORDER BY node_id, iteration"
                ),
                params![id],
                output_row,
            )
        })
        .await
    }

    async fn get_output(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Option<OutputRow>> {
        let (id, node) = (run_id.to_string(), node_id.to_string());
        self.read("get_output", move |c| {
            query_one(
                c,
                concat!(
                    "SELECT ",
                    output_cols!(),
                    " FROM _smithers_outputs WHERE run_id = ?1 AND node_id = ?2 AND iteration = ?3"
                ),
                params![id, node, iteration],
                output_row,
            )
        })
        .await
    }

    async fn last_frame_no(&self, run_id: &str) -> Result<i64> {
        let id = run_id.to_string();
        self.read("last_frame_no", move |c| {
            query_i64(
                c,
                "SELECT COALESCE(MAX(frame_no), 0) FROM _smithers_frames WHERE run_id = ?1",
                params![id],
            )
        })
        .await
    }

    async fn get_frame(&self, run_id: &str, frame_no: i64) -> Result<Option<FrameRow>> {
        let id = run_id.to_string();
        self.read("get_frame", move |c| {
            query_one(
                c,
                concat!(
                    "SELECT ",
                    frame_cols!(),
                    " FROM _smithers_frames WHERE run_id = ?1 AND frame_no = ?2"
                ),
                params![id, frame_no],
                frame_row,
            )
        })
        .await
    }

    async fn list_frames(
        &self,
        run_id: &str,
        after_frame_no: i64,
        limit: usize,
    ) -> Result<Vec<FrameRow>> {
        let id = run_id.to_string();
        let limit = limit_param(limit);
        self.read("list_frames", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    frame_cols!(),
                    " FROM _smithers_frames WHERE run_id = ?1 AND frame_no > ?2 ORDER BY frame_no DESC LIMIT ?3"
                ),
                params![id, after_frame_no, limit],
                frame_row,
            )
        })
        .await
    }

    async fn frames_between(&self, run_id: &str, from: i64, to: i64) -> Result<Vec<FrameRow>> {
        let id = run_id.to_string();
        self.read("frames_between", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    frame_cols!(),
                    " FROM _smithers_frames WHERE run_id = ?1 AND frame_no >= ?2 AND frame_no <= ?3 ORDER BY frame_no ASC"
                ),
                params![id, from, to],
                frame_row,
            )
        })
        .await
    }

    async fn get_snapshot(&self, run_id: &str, frame_no: i64) -> Result<Option<SnapshotRow>> {
        let id = run_id.to_string();
        self.read("get_snapshot", move |c| {
            query_one(
                c,
                concat!(
                    "SELECT ",
                    snapshot_cols!(),
                    " FROM _smithers_snapshots WHERE run_id = ?1 AND frame_no = ?2"
                ),
                params![id, frame_no],
                snapshot_row,
            )
        })
        .await
    }

    async fn snapshots_from_keyframe(
        &self,
        run_id: &str,
        base: i64,
        to: i64,
    ) -> Result<Vec<SnapshotRow>> {
        let id = run_id.to_string();
        self.read("snapshots_from_keyframe", move |c| {
            // the inner query walks the primary key backwards from `base` and stops at the
            // first keyframe; `encoding` sits before the large columns, so it reads no overflow
            query_all(
                c,
                concat!(
                    "SELECT ",
                    snapshot_cols!(),
                    " FROM _smithers_snapshots WHERE run_id = ?1 AND frame_no <= ?3 AND frame_no >= ",
                    "COALESCE((SELECT frame_no FROM _smithers_snapshots WHERE run_id = ?1 AND frame_no <= ?2 ",
                    "AND encoding <> 'delta' ORDER BY frame_no DESC LIMIT 1), 0) ORDER BY frame_no ASC"
                ),
                params![id, base, to],
                snapshot_row,
            )
        })
        .await
    }

    async fn list_events(
        &self,
        run_id: &str,
        after_seq: Option<i64>,
        limit: usize,
    ) -> Result<Vec<EventRow>> {
        let id = run_id.to_string();
        let limit = limit_param(limit);
        // A plain range on the primary key (seqs start at 0).
        let after = after_seq.unwrap_or(i64::MIN);
        self.read("list_events", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    event_cols!(),
                    " FROM _smithers_events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq ASC LIMIT ?3"
                ),
                params![id, after, limit],
                event_row,
            )
        })
        .await
    }

    async fn last_event_seq(&self, run_id: &str) -> Result<i64> {
        let id = run_id.to_string();
        self.read("last_event_seq", move |c| {
            query_i64(
                c,
                "SELECT COALESCE(MAX(seq), -1) FROM _smithers_events WHERE run_id = ?1",
                params![id],
            )
        })
        .await
    }

    async fn list_loops(&self, run_id: &str) -> Result<Vec<LoopRow>> {
        let id = run_id.to_string();
        self.read("list_loops", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    loop_cols!(),
                    " FROM _smithers_ralph WHERE run_id = ?1 ORDER BY ralph_id"
                ),
                params![id],
                loop_row,
            )
        })
        .await
    }

    async fn get_approval(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Option<ApprovalRow>> {
        let (id, node) = (run_id.to_string(), node_id.to_string());
        self.read("get_approval", move |c| {
            query_one(
                c,
                concat!(
                    "SELECT ",
                    approval_cols!(),
                    " FROM _smithers_approvals WHERE run_id = ?1 AND node_id = ?2 AND iteration = ?3"
                ),
                params![id, node, iteration],
                approval_row,
            )
        })
        .await
    }

    async fn list_approvals(&self, run_id: &str) -> Result<Vec<ApprovalRow>> {
        let id = run_id.to_string();
        self.read("list_approvals", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    approval_cols!(),
                    " FROM _smithers_approvals WHERE run_id = ?1 ORDER BY node_id, iteration"
                ),
                params![id],
                approval_row,
            )
        })
        .await
    }

    async fn list_pending_approvals(&self, limit: usize) -> Result<Vec<ApprovalRow>> {
        let limit = limit_param(limit);
        self.read("list_pending_approvals", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    approval_cols!(),
                    " FROM _smithers_approvals WHERE status = 'requested'
                     ORDER BY requested_at_ms IS NULL, requested_at_ms ASC, run_id, node_id, iteration LIMIT ?1"
                ),
                params![limit],
                approval_row,
            )
        })
        .await
    }

    async fn approval_history(
        &self,
        workflow_name: &str,
        node_id: &str,
        exclude_run_id: &str,
        limit: usize,
    ) -> Result<Vec<ApprovalRow>> {
        let (wf, node, exclude) = (
            workflow_name.to_string(),
            node_id.to_string(),
            exclude_run_id.to_string(),
        );
        let limit = limit_param(limit);
        self.read("approval_history", move |c| {
            query_all(
                c,
                "SELECT a.run_id, a.node_id, a.iteration, a.status, a.requested_at_ms, a.decided_at_ms, a.note,
                        a.decided_by, a.request_json, a.decision_json, a.auto_approved
                 FROM _smithers_approvals a JOIN _smithers_runs r ON r.run_id = a.run_id
                 WHERE r.workflow_name = ?1 AND a.node_id = ?2 AND a.run_id <> ?3
                   AND a.status IN ('approved', 'denied')
                 ORDER BY r.created_at_ms DESC, a.run_id DESC, a.iteration DESC
                 LIMIT ?4",
                params![wf, node, exclude, limit],
                approval_row,
            )
        })
        .await
    }

    async fn list_signals(
        &self,
        run_id: &str,
        signal_name: &str,
        correlation_id: Option<&str>,
        received_after_ms: i64,
    ) -> Result<Vec<SignalRow>> {
        let (id, name, corr) = (
            run_id.to_string(),
            signal_name.to_string(),
            correlation_id.map(str::to_string),
        );
        self.read("list_signals", move |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    signal_cols!(),
                    " FROM _smithers_signals
                     WHERE run_id = ?1 AND signal_name = ?2 AND correlation_id IS ?3 AND received_at_ms >= ?4
                     ORDER BY seq ASC"
                ),
                params![id, name, corr, received_after_ms],
                signal_row,
            )
        })
        .await
    }

    async fn upsert_cron(&self, row: CronRow) -> Result<()> {
        match self.call(Op::UpsertCron(row)).await? {
            Out::Flag(_) => Ok(()),
            _ => Err(unexpected("upsert_cron")),
        }
    }

    async fn list_audits(
        &self,
        run_id: Option<&str>,
        result: Option<&str>,
    ) -> Result<Vec<AuditRow>> {
        let run = run_id.map(str::to_string);
        let result = result.map(str::to_string);
        self.read("list_audits", move |c| {
            query_all(
                c,
                "SELECT id, run_id, from_frame_no, to_frame_no, caller, timestamp_ms, result, duration_ms
                 FROM _smithers_time_travel_audit
                 WHERE (?1 IS NULL OR run_id = ?1) AND (?2 IS NULL OR result = ?2)
                 ORDER BY timestamp_ms ASC, id ASC",
                params![run, result],
                audit_row,
            )
        })
        .await
    }

    async fn get_node_diff(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
        attempt: i64,
        base_ref: &str,
    ) -> Result<Option<NodeDiffRow>> {
        let (run, node, base) = (
            run_id.to_string(),
            node_id.to_string(),
            base_ref.to_string(),
        );
        self.read("get_node_diff", move |c| {
            query_one(
                c,
                "SELECT run_id, node_id, iteration, base_ref, attempt, attempt_started_at_ms,
                    bundle_json, created_at_ms
                 FROM _smithers_node_diffs
                 WHERE run_id = ?1 AND node_id = ?2 AND iteration = ?3 AND attempt = ?4 AND base_ref = ?5",
                params![run, node, iteration, attempt, base],
                node_diff_row,
            )
        })
        .await
    }

    async fn count_node_diffs_after(&self, run_id: &str, started_after_ms: i64) -> Result<i64> {
        let run = run_id.to_string();
        self.read("count_node_diffs_after", move |c| {
            Ok(c.prepare_cached(
                "SELECT COUNT(*) FROM _smithers_node_diffs WHERE run_id = ?1 AND attempt_started_at_ms > ?2",
            )?
            .query_row(params![run, started_after_ms], |r| r.get::<_, i64>(0))?)
        })
        .await
    }

    async fn count_all_node_diffs(&self) -> Result<i64> {
        self.read("count_all_node_diffs", |c| {
            Ok(
                c.prepare_cached("SELECT COUNT(*) FROM _smithers_node_diffs")?
                    .query_row([], |r| r.get::<_, i64>(0))?,
            )
        })
        .await
    }

    async fn list_node_diff_attempts(&self, run_id: &str) -> Result<Vec<(String, i64, i64)>> {
        let run = run_id.to_string();
        self.read("list_node_diff_attempts", move |c| {
            let mut st = c.prepare_cached(
                "SELECT node_id, iteration, attempt FROM _smithers_node_diffs WHERE run_id = ?1
                 ORDER BY node_id, iteration, attempt",
            )?;
            let rows = st.query_map(params![run], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn list_crons(&self) -> Result<Vec<CronRow>> {
        self.read("list_crons", |c| {
            query_all(
                c,
                concat!(
                    "SELECT ",
                    cron_cols!(),
                    " FROM _smithers_cron ORDER BY created_at_ms ASC, cron_id ASC"
                ),
                [],
                cron_row,
            )
        })
        .await
    }

    async fn get_cron(&self, cron_id: &str) -> Result<Option<CronRow>> {
        let id = cron_id.to_string();
        self.read("get_cron", move |c| {
            query_one(
                c,
                concat!(
                    "SELECT ",
                    cron_cols!(),
                    " FROM _smithers_cron WHERE cron_id = ?1"
                ),
                params![id],
                cron_row,
            )
        })
        .await
    }

    async fn delete_cron(&self, cron_id: &str) -> Result<bool> {
        match self.call(Op::DeleteCron(cron_id.to_string())).await? {
            Out::Flag(b) => Ok(b),
            _ => Err(unexpected("delete_cron")),
        }
    }

    async fn update_cron_run(
        &self,
        cron_id: &str,
        last_run_at_ms: Option<i64>,
        next_run_at_ms: Option<i64>,
        error_json: Option<String>,
    ) -> Result<bool> {
        let op = Op::UpdateCronRun {
            cron_id: cron_id.to_string(),
            last_run_at_ms,
            next_run_at_ms,
            error_json,
        };
        match self.call(op).await? {
            Out::Flag(b) => Ok(b),
            _ => Err(unexpected("update_cron_run")),
        }
    }

    async fn claim_due_cron(
        &self,
        cron_id: &str,
        expected_next_run_at_ms: Option<i64>,
        new_next_run_at_ms: i64,
        now_ms: i64,
    ) -> Result<bool> {
        let op = Op::ClaimCron {
            cron_id: cron_id.to_string(),
            expected: expected_next_run_at_ms,
            new_next: new_next_run_at_ms,
            now_ms,
        };
        match self.call(op).await? {
            Out::Flag(b) => Ok(b),
            _ => Err(unexpected("claim_due_cron")),
        }
    }

    async fn claim_webhook_delivery(&self, claim: &DeliveryClaim) -> Result<bool> {
        let op = Op::Delivery(deliveries::Write::Claim(claim.clone()));
        match self.call(op).await? {
            Out::Flag(b) => Ok(b),
            _ => Err(unexpected("claim_webhook_delivery")),
        }
    }

    async fn get_webhook_delivery(
        &self,
        workflow: &str,
        delivery_id: &str,
    ) -> Result<Option<WebhookDeliveryRow>> {
        let (workflow, delivery_id) = (workflow.to_string(), delivery_id.to_string());
        self.read("get_webhook_delivery", move |c| {
            deliveries::get(c, &workflow, &delivery_id)
        })
        .await
    }

    async fn finish_webhook_delivery(
        &self,
        workflow: &str,
        delivery_id: &str,
        claim_id: &str,
        outcome_json: &str,
    ) -> Result<bool> {
        let op = Op::Delivery(deliveries::Write::Finish {
            workflow: workflow.to_string(),
            delivery_id: delivery_id.to_string(),
            claim_id: claim_id.to_string(),
            outcome_json: outcome_json.to_string(),
        });
        match self.call(op).await? {
            Out::Flag(b) => Ok(b),
            _ => Err(unexpected("finish_webhook_delivery")),
        }
    }

    async fn release_webhook_delivery(
        &self,
        workflow: &str,
        delivery_id: &str,
        claim_id: &str,
    ) -> Result<bool> {
        let op = Op::Delivery(deliveries::Write::Release {
            workflow: workflow.to_string(),
            delivery_id: delivery_id.to_string(),
            claim_id: claim_id.to_string(),
        });
        match self.call(op).await? {
            Out::Flag(b) => Ok(b),
            _ => Err(unexpected("release_webhook_delivery")),
        }
    }

    async fn prune_webhook_deliveries(&self, now_ms: i64) -> Result<u64> {
        let op = Op::Delivery(deliveries::Write::Prune { now_ms });
        match self.call(op).await? {
            Out::Count(n) => Ok(n),
            _ => Err(unexpected("prune_webhook_deliveries")),
        }
    }
}
