//! PostgreSQL backend (`postgres://user:password@host:port/dbname`).
//!
//! Same schema as SQLite (see [`schema`]). Every [`Store`] write runs in a transaction on a
//! pooled connection; batches that arrive while others are being written share one (see
//! [`group`]). The parts that must hold across processes rely on PostgreSQL locks:
//!
//! * a guarded batch locks its run row (`SELECT … FOR UPDATE`) before checking the owner, so a
//!   concurrent `claim_run` by another node waits for the batch to commit (or sees its result);
//! * per-run event and signal seqs are assigned under a per-run transaction-level advisory
//!   lock, so concurrent batches from several processes get gapless, unique seqs;
//! * `claim_run` and `claim_due_cron` are single conditional `UPDATE`s (compare-and-set).
//!
//! Serialization failures, deadlocks and connections lost before a commit are retried a
//! bounded number of times. Connections are plain TCP or Unix sockets without TLS (`NoTls`):
//! reach a TLS-only server through a local proxy.

mod claims;
mod deliveries;
mod feed;
mod group;
mod pipeline;
mod reads;
pub mod schema;
mod writes;

pub use schema::{MIGRATIONS, SCHEMA_VERSION};

use crate::{
    Applied, ApprovalRow, AttemptRow, AuditRow, Batch, CronRow, DeliveryClaim, EventRow, FrameRow,
    Heartbeat, LoopRow, NewSignal, NodeDiffRow, NodeRow, OutputRow, RunRow, SignalRow, SnapshotRow,
    Store, WebhookDeliveryRow,
};
use async_trait::async_trait;
use smithers_core::{Code, Result, SmithersError};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

/// Connections per store (each node keeps at most this many open).
const POOL_SIZE: usize = 8;
/// Attempts of a write transaction that hit a serialization failure, a deadlock or a lost
/// connection (before its commit was sent).
const WRITE_ATTEMPTS: u32 = 8;
/// Attempts of a read whose connection was lost.
const READ_ATTEMPTS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings every session gets unless the URL's `options` parameter sets them already
/// (`?options=-c%20lock_timeout%3D10s`). They keep a node that stops responding (frozen,
/// swapped out, partitioned) from holding row locks that block the other nodes' takeovers:
/// PostgreSQL ends its idle transactions, and no statement waits on a lock, or runs, forever.
pub const SESSION_DEFAULTS: &[(&str, &str)] = &[
    ("idle_in_transaction_session_timeout", "10s"),
    ("lock_timeout", "5s"),
    ("statement_timeout", "30s"),
];

/// The URL's `options` with [`SESSION_DEFAULTS`] added for every setting it does not name.
fn session_options(given: Option<&str>) -> String {
    let mut out = given.unwrap_or_default().trim().to_string();
    for (name, value) in SESSION_DEFAULTS {
        let named = out
            .split(|c: char| c.is_whitespace() || c == '=')
            .any(|w| w == *name || w.strip_prefix("--") == Some(name));
        if !named {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&format!("-c {name}={value}"));
        }
    }
    out
}

pub(crate) type Param<'a> = &'a (dyn ToSql + Sync);

// ---------------------------------------------------------------------------------------------
// Errors

/// Internal error: keeps the driver error so transient failures can be retried before it
/// becomes a [`SmithersError`].
#[derive(Debug)]
pub(crate) enum DbErr {
    Pg(tokio_postgres::Error),
    App(SmithersError),
    /// The error of one batch (by index) of a transaction that applied several.
    InBatch(usize, Box<DbErr>),
}

impl From<tokio_postgres::Error> for DbErr {
    fn from(e: tokio_postgres::Error) -> Self {
        DbErr::Pg(e)
    }
}

impl From<SmithersError> for DbErr {
    fn from(e: SmithersError) -> Self {
        DbErr::App(e)
    }
}

impl DbErr {
    fn sql_state(&self) -> Option<&SqlState> {
        match self {
            DbErr::Pg(e) => e.code(),
            DbErr::App(_) => None,
            DbErr::InBatch(_, e) => e.sql_state(),
        }
    }

    /// Marks the error as caused by batch `index` of a transaction.
    pub(crate) fn in_batch(self, index: usize) -> DbErr {
        match self {
            DbErr::InBatch(..) => self,
            e => DbErr::InBatch(index, Box::new(e)),
        }
    }

    /// The batch that caused the error, when one did.
    fn culprit(&self) -> Option<usize> {
        match self {
            DbErr::InBatch(i, _) => Some(*i),
            _ => None,
        }
    }

    /// Worth running the whole transaction again (a lock wait that ran past `lock_timeout`
    /// included: the holder may be gone by now).
    fn is_transient(&self) -> bool {
        matches!(
            self.sql_state(),
            Some(&SqlState::T_R_SERIALIZATION_FAILURE)
                | Some(&SqlState::T_R_DEADLOCK_DETECTED)
                | Some(&SqlState::LOCK_NOT_AVAILABLE)
        )
    }

    /// The connection broke (server restart, backend terminated, network): the statement may
    /// be retried on a fresh connection when it is known not to have committed.
    fn is_connection_lost(&self) -> bool {
        match self {
            DbErr::Pg(e) => {
                e.is_closed()
                    || matches!(
                        e.code(),
                        Some(&SqlState::ADMIN_SHUTDOWN)
                            | Some(&SqlState::CRASH_SHUTDOWN)
                            | Some(&SqlState::CANNOT_CONNECT_NOW)
                    )
            }
            DbErr::App(_) => false,
            DbErr::InBatch(_, e) => e.is_connection_lost(),
        }
    }

    pub(crate) fn is_unique_violation(&self) -> bool {
        self.sql_state() == Some(&SqlState::UNIQUE_VIOLATION)
    }

    pub(crate) fn into_smithers(self, code: Code, ctx: &str) -> SmithersError {
        match self {
            DbErr::App(e) => e,
            DbErr::InBatch(_, e) => e.into_smithers(code, ctx),
            DbErr::Pg(e) => {
                let detail = describe(&e);
                match e.code() {
                    Some(&SqlState::DATA_CORRUPTED) | Some(&SqlState::INDEX_CORRUPTED) => {
                        SmithersError::new(
                            Code::DbCorrupt,
                            format!(
                                "{ctx}: the database reports damaged data ({detail}); restore it from a backup"
                            ),
                        )
                        .terminal()
                    }
                    // text PostgreSQL cannot store (a NUL byte): bad input from the caller,
                    // not a fault of the server
                    Some(&SqlState::CHARACTER_NOT_IN_REPERTOIRE)
                    | Some(&SqlState::UNTRANSLATABLE_CHARACTER) => SmithersError::new(
                        Code::InvalidInput,
                        format!("{ctx}: text must not contain NUL bytes ({detail})"),
                    ),
                    _ if e.is_closed() || e.code().is_none() => SmithersError::new(
                        code,
                        format!("{ctx}: lost the connection to PostgreSQL ({detail}); retry later"),
                    ),
                    // data exceptions (a NUL byte in text, a value out of range), integrity
                    // violations and rejected statements fail the same way every time: retrying
                    // (or driving the run again) cannot help
                    Some(state)
                        if ["22", "23", "42"].iter().any(|c| state.code().starts_with(c)) =>
                    {
                        SmithersError::new(code, format!("{ctx}: {detail}")).terminal()
                    }
                    _ => SmithersError::new(code, format!("{ctx}: {detail}")),
                }
            }
        }
    }
}

/// The server's message and SQLSTATE when there is one, else the driver's error chain.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(d) = db.detail() {
            s.push_str(": ");
            s.push_str(d);
        }
        return s;
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Connections

/// One connection with its prepared statements.
pub(crate) struct Conn {
    pub(crate) client: Client,
    statements: HashMap<String, Statement>,
    /// A transaction was opened and not yet finished: such a connection is never reused.
    in_tx: bool,
}

impl Conn {
    async fn statement(&mut self, sql: &str) -> Result<Statement, DbErr> {
        if let Some(st) = self.statements.get(sql) {
            return Ok(st.clone());
        }
        let st = self.client.prepare(sql).await?;
        self.statements.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    pub(crate) async fn query(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, DbErr> {
        let st = self.statement(sql).await?;
        Ok(self.client.query(&st, params).await?)
    }

    pub(crate) async fn query_opt(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<Row>, DbErr> {
        let st = self.statement(sql).await?;
        Ok(self.client.query_opt(&st, params).await?)
    }

    pub(crate) async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, DbErr> {
        let st = self.statement(sql).await?;
        Ok(self.client.execute(&st, params).await?)
    }

    /// A single BIGINT from a query that returns exactly one row.
    pub(crate) async fn query_i64(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<i64, DbErr> {
        let st = self.statement(sql).await?;
        let row = self.client.query_one(&st, params).await?;
        Ok(row.try_get(0)?)
    }

    pub(crate) async fn begin(&mut self) -> Result<(), DbErr> {
        self.in_tx = true;
        self.client.batch_execute("BEGIN").await?;
        Ok(())
    }

    pub(crate) async fn commit(&mut self) -> Result<(), DbErr> {
        self.client.batch_execute("COMMIT").await?;
        self.in_tx = false;
        Ok(())
    }

    pub(crate) async fn rollback(&mut self) {
        if self.client.batch_execute("ROLLBACK").await.is_ok() {
            self.in_tx = false;
        }
    }
}

/// Where the store connects, without the password (for messages).
fn describe_target(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "PostgreSQL database `{}` on {}{}{}",
        config.get_dbname().unwrap_or("(default)"),
        if hosts.is_empty() {
            "localhost".to_string()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() { "" } else { ":" },
        ports.join(",")
    )
}

pub(crate) struct Pool {
    config: Config,
    target: String,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
}

/// A checked-out connection; goes back to the pool on drop unless it is broken or was left
/// inside a transaction (a cancelled future), in which case it is closed.
pub(crate) struct Pooled {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        // Invariant: `conn` is Some until drop.
        match &self.conn {
            Some(c) => c,
            None => unreachable!("pooled connection used after release"),
        }
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Conn {
        match &mut self.conn {
            Some(c) => c,
            None => unreachable!("pooled connection used after release"),
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !conn.in_tx
            && !conn.client.is_closed()
            && let Ok(mut idle) = self.pool.idle.lock()
        {
            idle.push(conn);
        }
    }
}

impl Pool {
    async fn connect(&self) -> Result<Conn, DbErr> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            // Ends when the client is dropped or the server closes the connection.
            let _ = connection.await;
        });
        Ok(Conn {
            client,
            statements: HashMap::new(),
            in_tx: false,
        })
    }

    /// Closes every idle connection: after one connection was lost (server restart, backends
    /// terminated), the others most likely were too.
    fn clear_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// A connection for `what`; failing to connect reports `code`.
    async fn get(self: &Arc<Self>, what: &str, code: Code) -> Result<Pooled> {
        let permit =
            self.permits.clone().acquire_owned().await.map_err(|_| {
                SmithersError::new(Code::StorageError, "the PostgreSQL pool is closed")
            })?;
        let mut reused = None;
        if let Ok(mut idle) = self.idle.lock() {
            while let Some(c) = idle.pop() {
                if !c.client.is_closed() {
                    reused = Some(c);
                    break;
                }
            }
        }
        let conn = match reused {
            Some(c) => c,
            None => self.connect().await.map_err(|e| {
                e.into_smithers(code, &format!("{what}: cannot connect to {}", self.target))
            })?,
        };
        Ok(Pooled {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The store

/// PostgreSQL implementation of [`Store`]. Cheap to share behind an `Arc`; several processes
/// (nodes) may open the same database.
pub struct PgStore {
    pool: Arc<Pool>,
    feed: Arc<feed::Feed>,
    grouped: group::Grouper,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.pool.target)
            .finish()
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://` or `postgresql://`, or a libpq key/value string) and
    /// migrates the schema. The first connection is made here, so a wrong address, password or
    /// database fails now with `STORAGE_ERROR`.
    pub async fn open(url: &str) -> Result<Self> {
        let mut config = Config::from_str(url).map_err(|e| {
            SmithersError::new(
                Code::InvalidUrl,
                format!(
                    "storage url is not a valid PostgreSQL connection string ({e}); use postgres://USER:PASSWORD@HOST:PORT/DBNAME"
                ),
            )
            .terminal()
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("smithers");
        }
        let options = session_options(config.get_options());
        config.options(options);
        let target = describe_target(&config);
        let feed = Arc::new(feed::Feed::new(config.clone()));
        let pool = Arc::new(Pool {
            config,
            target: target.clone(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(POOL_SIZE)),
        });
        let open_err = |e: DbErr| match e {
            DbErr::App(e) => e,
            DbErr::InBatch(_, e) => e.into_smithers(Code::StorageError, &target),
            DbErr::Pg(e) => SmithersError::new(
                Code::StorageError,
                format!("cannot open {target}: {}", describe(&e)),
            )
            .terminal(),
        };
        let mut conn = pool.connect().await.map_err(open_err)?;
        schema::migrate(&mut conn).await.map_err(open_err)?;
        if let Ok(mut idle) = pool.idle.lock() {
            idle.push(conn);
        }
        let grouped = group::Grouper::new(pool.clone(), feed.instance.clone());
        Ok(PgStore {
            pool,
            feed,
            grouped,
        })
    }

    /// Runs one write operation in its own transaction, retrying serialization failures,
    /// deadlocks and connections lost before the commit.
    async fn write(&self, op: claims::Op<'_>) -> Result<claims::Out> {
        write_tx(&self.pool, &op).await.map_err(|f| f.error)
    }

    /// A checked-out connection for reads.
    async fn reader(&self, what: &str) -> Result<Pooled> {
        self.pool.get(what, Code::DbQueryFailed).await
    }
}

/// A write that failed, and whether its transaction is known not to have committed.
pub(crate) struct WriteFailed {
    pub(crate) error: SmithersError,
    /// False when the connection was lost while committing: the outcome is unknown.
    pub(crate) rolled_back: bool,
    /// For a transaction of several batches: the one whose write or lease check failed.
    pub(crate) culprit: Option<usize>,
}

/// Runs one write operation in its own transaction, retrying serialization failures,
/// deadlocks and connections lost before the commit.
pub(crate) async fn write_tx(
    pool: &Arc<Pool>,
    op: &claims::Op<'_>,
) -> std::result::Result<claims::Out, WriteFailed> {
    let what = op.name();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut conn = pool
            .get(what, Code::DbWriteFailed)
            .await
            .map_err(|error| WriteFailed {
                error,
                rolled_back: true,
                culprit: None,
            })?;
        match run_in_tx(&mut conn, op).await {
            Ok(out) => return Ok(out),
            Err((e, committing)) => {
                // A connection lost while committing leaves the outcome unknown: never
                // retried (the caller gets a retryable DB_WRITE_FAILED).
                let retry = e.is_transient() || (e.is_connection_lost() && !committing);
                if e.is_connection_lost() {
                    pool.clear_idle();
                }
                if !retry || attempt >= WRITE_ATTEMPTS {
                    return Err(WriteFailed {
                        culprit: e.culprit(),
                        error: e.into_smithers(Code::DbWriteFailed, what),
                        rolled_back: !committing,
                    });
                }
                drop(conn);
                let backoff = 5u64 << attempt.min(6);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
        }
    }
}

/// Runs `op` in a transaction. On failure, also says whether the error came from the commit
/// itself (then whether it committed is unknown).
async fn run_in_tx(
    conn: &mut Conn,
    op: &claims::Op<'_>,
) -> std::result::Result<claims::Out, (DbErr, bool)> {
    if let claims::Op::Apply(..) = op {
        // a batch sends its BEGIN together with its statements
        conn.in_tx = true;
    } else {
        conn.begin().await.map_err(|e| (e, false))?;
    }
    match claims::exec_op(conn, op).await {
        Ok(out) => {
            conn.commit().await.map_err(|e| (e, true))?;
            Ok(out)
        }
        Err(e) => {
            conn.rollback().await;
            Err((e, false))
        }
    }
}

pub(crate) fn unexpected(what: &str) -> SmithersError {
    SmithersError::new(
        Code::Internal,
        format!("{what}: the PostgreSQL backend produced an unexpected result"),
    )
}

/// Runs a read on a pooled connection; a read that failed because the connection was lost
/// (server restart, idle connection killed) is run again on a fresh one.
macro_rules! read {
    ($self:ident, $what:literal, |$c:ident| $body:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut $c = $self.reader($what).await?;
            let $c = &mut *$c;
            let result = $body.await;
            match result {
                Ok(v) => break Ok(v),
                Err(e) if e.is_connection_lost() && attempt < READ_ATTEMPTS => {
                    $self.pool.clear_idle();
                    continue;
                }
                Err(e) => break Err(e.into_smithers(Code::DbQueryFailed, $what)),
            }
        }
    }};
}

use claims::{Op, Out};

#[async_trait]
impl Store for PgStore {
    async fn apply(&self, batch: Batch) -> Result<Applied> {
        self.grouped.apply(batch).await
    }

    async fn claim_run(
        &self,
        run_id: &str,
        owner: &str,
        now_ms: i64,
        stale_before_ms: i64,
        dead_owner: Option<&str>,
    ) -> Result<bool> {
        match self
            .write(Op::Claim {
                run_id,
                owner,
                now_ms,
                stale_before_ms,
                dead_owner,
            })
            .await?
        {
            Out::Flag(f) => Ok(f),
            _ => Err(unexpected("claim_run")),
        }
    }

    async fn heartbeat(&self, owner: &str, now_ms: i64) -> Result<Heartbeat> {
        match self.write(Op::Heartbeat { owner, now_ms }).await? {
            Out::Heartbeat(h) => Ok(h),
            _ => Err(unexpected("heartbeat")),
        }
    }

    async fn request_cancel(&self, run_id: &str, now_ms: i64) -> Result<bool> {
        match self.write(Op::Cancel { run_id, now_ms }).await? {
            Out::Flag(f) => Ok(f),
            _ => Err(unexpected("request_cancel")),
        }
    }

    async fn insert_signal(&self, signal: NewSignal) -> Result<i64> {
        match self.write(Op::Signal(&signal)).await? {
            Out::Seq(s) => Ok(s),
            _ => Err(unexpected("insert_signal")),
        }
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<RunRow>> {
        read!(self, "get_run", |c| reads::get_run(c, run_id))
    }

    async fn query_runs(&self, q: &crate::RunQuery) -> Result<Vec<RunRow>> {
        read!(self, "query_runs", |c| reads::query_runs(c, q))
    }

    async fn list_stale_runs(&self, stale_before_ms: i64, limit: usize) -> Result<Vec<RunRow>> {
        read!(self, "list_stale_runs", |c| reads::list_stale_runs(
            c,
            stale_before_ms,
            limit
        ))
    }

    async fn get_input(&self, run_id: &str) -> Result<Option<String>> {
        read!(self, "get_input", |c| reads::get_input(c, run_id))
    }

    async fn list_nodes(&self, run_id: &str) -> Result<Vec<NodeRow>> {
        read!(self, "list_nodes", |c| reads::list_nodes(c, run_id))
    }

    async fn get_node(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Option<NodeRow>> {
        read!(self, "get_node", |c| reads::get_node(
            c, run_id, node_id, iteration
        ))
    }

    async fn list_attempts(&self, run_id: &str) -> Result<Vec<AttemptRow>> {
        read!(self, "list_attempts", |c| reads::list_attempts(c, run_id))
    }

    async fn list_node_attempts(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Vec<AttemptRow>> {
        read!(self, "list_node_attempts", |c| reads::list_node_attempts(
            c, run_id, node_id, iteration
        ))
    }

    async fn get_attempt(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
        attempt: i64,
    ) -> Result<Option<AttemptRow>> {
        read!(self, "get_attempt", |c| reads::get_attempt(
            c, run_id, node_id, iteration, attempt
        ))
    }

    async fn list_outputs(&self, run_id: &str) -> Result<Vec<OutputRow>> {
        read!(self, "list_outputs", |c| reads::list_outputs(c, run_id))
    }

    async fn get_output(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Option<OutputRow>> {
        read!(self, "get_output", |c| reads::get_output(
            c, run_id, node_id, iteration
        ))
    }

    async fn last_frame_no(&self, run_id: &str) -> Result<i64> {
        read!(self, "last_frame_no", |c| c.query_i64(
            "SELECT COALESCE(MAX(frame_no), 0)::BIGINT FROM _smithers_frames WHERE run_id = $1",
            &[&run_id],
        ))
    }

    async fn get_frame(&self, run_id: &str, frame_no: i64) -> Result<Option<FrameRow>> {
        read!(self, "get_frame", |c| reads::get_frame(c, run_id, frame_no))
    }

    async fn list_frames(
        &self,
        run_id: &str,
        after_frame_no: i64,
        limit: usize,
    ) -> Result<Vec<FrameRow>> {
        read!(self, "list_frames", |c| reads::list_frames(
            c,
            run_id,
            after_frame_no,
            limit
        ))
    }

    async fn frames_between(&self, run_id: &str, from: i64, to: i64) -> Result<Vec<FrameRow>> {
        read!(self, "frames_between", |c| reads::frames_between(
            c, run_id, from, to
        ))
    }

    async fn get_snapshot(&self, run_id: &str, frame_no: i64) -> Result<Option<SnapshotRow>> {
        read!(self, "get_snapshot", |c| reads::get_snapshot(
            c, run_id, frame_no
        ))
    }

    async fn snapshots_from_keyframe(
        &self,
        run_id: &str,
        base: i64,
        to: i64,
    ) -> Result<Vec<SnapshotRow>> {
        read!(self, "snapshots_from_keyframe", |c| {
            reads::snapshots_from_keyframe(c, run_id, base, to)
        })
    }

    async fn list_events(
        &self,
        run_id: &str,
        after_seq: Option<i64>,
        limit: usize,
    ) -> Result<Vec<EventRow>> {
        read!(self, "list_events", |c| reads::list_events(
            c, run_id, after_seq, limit
        ))
    }

    async fn last_event_seq(&self, run_id: &str) -> Result<i64> {
        read!(self, "last_event_seq", |c| c.query_i64(
            "SELECT COALESCE(MAX(seq), -1)::BIGINT FROM _smithers_events WHERE run_id = $1",
            &[&run_id],
        ))
    }

    async fn list_loops(&self, run_id: &str) -> Result<Vec<LoopRow>> {
        read!(self, "list_loops", |c| reads::list_loops(c, run_id))
    }

    async fn get_approval(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<Option<ApprovalRow>> {
        read!(self, "get_approval", |c| reads::get_approval(
            c, run_id, node_id, iteration
        ))
    }

    async fn list_approvals(&self, run_id: &str) -> Result<Vec<ApprovalRow>> {
        read!(self, "list_approvals", |c| reads::list_approvals(c, run_id))
    }

    async fn list_pending_approvals(&self, limit: usize) -> Result<Vec<ApprovalRow>> {
        read!(self, "list_pending_approvals", |c| {
            reads::list_pending_approvals(c, limit)
        })
    }

    async fn approval_history(
        &self,
        workflow_name: &str,
        node_id: &str,
        exclude_run_id: &str,
        limit: usize,
    ) -> Result<Vec<ApprovalRow>> {
        read!(self, "approval_history", |c| reads::approval_history(
            c,
            workflow_name,
            node_id,
            exclude_run_id,
            limit
        ))
    }

    async fn list_signals(
        &self,
        run_id: &str,
        signal_name: &str,
        correlation_id: Option<&str>,
        received_after_ms: i64,
    ) -> Result<Vec<SignalRow>> {
        read!(self, "list_signals", |c| reads::list_signals(
            c,
            run_id,
            signal_name,
            correlation_id,
            received_after_ms,
        ))
    }

    async fn list_audits(
        &self,
        run_id: Option<&str>,
        result: Option<&str>,
    ) -> Result<Vec<AuditRow>> {
        read!(self, "list_audits", |c| reads::list_audits(
            c, run_id, result
        ))
    }

    async fn get_node_diff(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
        attempt: i64,
        base_ref: &str,
    ) -> Result<Option<NodeDiffRow>> {
        read!(self, "get_node_diff", |c| reads::get_node_diff(
            c, run_id, node_id, iteration, attempt, base_ref
        ))
    }

    async fn count_node_diffs_after(&self, run_id: &str, started_after_ms: i64) -> Result<i64> {
        const SQL: &str = "SELECT COUNT(*)::BIGINT FROM _smithers_node_diffs
                           WHERE run_id = $1 AND attempt_started_at_ms > $2";
        read!(self, "count_node_diffs_after", |c| c
            .query_i64(SQL, &[&run_id, &started_after_ms]))
    }

    async fn count_all_node_diffs(&self) -> Result<i64> {
        read!(self, "count_all_node_diffs", |c| c.query_i64(
            "SELECT COUNT(*)::BIGINT FROM _smithers_node_diffs",
            &[]
        ))
    }

    async fn list_node_diff_attempts(&self, run_id: &str) -> Result<Vec<(String, i64, i64)>> {
        read!(self, "list_node_diff_attempts", |c| {
            reads::list_node_diff_attempts(c, run_id)
        })
    }

    async fn upsert_cron(&self, row: CronRow) -> Result<()> {
        match self.write(Op::UpsertCron(&row)).await? {
            Out::Flag(_) => Ok(()),
            _ => Err(unexpected("upsert_cron")),
        }
    }

    async fn list_crons(&self) -> Result<Vec<CronRow>> {
        read!(self, "list_crons", |c| reads::list_crons(c))
    }

    async fn get_cron(&self, cron_id: &str) -> Result<Option<CronRow>> {
        read!(self, "get_cron", |c| reads::get_cron(c, cron_id))
    }

    async fn delete_cron(&self, cron_id: &str) -> Result<bool> {
        match self.write(Op::DeleteCron(cron_id)).await? {
            Out::Flag(f) => Ok(f),
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
        match self
            .write(Op::UpdateCronRun {
                cron_id,
                last_run_at_ms,
                next_run_at_ms,
                error_json: error_json.as_deref(),
            })
            .await?
        {
            Out::Flag(f) => Ok(f),
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
        match self
            .write(Op::ClaimCron {
                cron_id,
                expected: expected_next_run_at_ms,
                new_next: new_next_run_at_ms,
                now_ms,
            })
            .await?
        {
            Out::Flag(f) => Ok(f),
            _ => Err(unexpected("claim_due_cron")),
        }
    }

    async fn claim_webhook_delivery(&self, claim: &DeliveryClaim) -> Result<bool> {
        match self
            .write(Op::Delivery(deliveries::Write::Claim(claim)))
            .await?
        {
            Out::Flag(f) => Ok(f),
            _ => Err(unexpected("claim_webhook_delivery")),
        }
    }

    async fn get_webhook_delivery(
        &self,
        workflow: &str,
        delivery_id: &str,
    ) -> Result<Option<WebhookDeliveryRow>> {
        read!(self, "get_webhook_delivery", |c| deliveries::get(
            c,
            workflow,
            delivery_id
        ))
    }

    async fn finish_webhook_delivery(
        &self,
        workflow: &str,
        delivery_id: &str,
        claim_id: &str,
        outcome_json: &str,
    ) -> Result<bool> {
        let w = deliveries::Write::Finish {
            workflow,
            delivery_id,
            claim_id,
            outcome_json,
        };
        match self.write(Op::Delivery(w)).await? {
            Out::Flag(f) => Ok(f),
            _ => Err(unexpected("finish_webhook_delivery")),
        }
    }

    async fn release_webhook_delivery(
        &self,
        workflow: &str,
        delivery_id: &str,
        claim_id: &str,
    ) -> Result<bool> {
        let w = deliveries::Write::Release {
            workflow,
            delivery_id,
            claim_id,
        };
        match self.write(Op::Delivery(w)).await? {
            Out::Flag(f) => Ok(f),
            _ => Err(unexpected("release_webhook_delivery")),
        }
    }

    async fn prune_webhook_deliveries(&self, now_ms: i64) -> Result<u64> {
        match self
            .write(Op::Delivery(deliveries::Write::Prune { now_ms }))
            .await?
        {
            Out::Count(n) => Ok(n),
            _ => Err(unexpected("prune_webhook_deliveries")),
        }
    }

    async fn foreign_events(&self) -> Option<tokio::sync::broadcast::Receiver<crate::EventRef>> {
        Some(self.feed.subscribe().await)
    }
}

#[cfg(test)]
mod tests {
    use super::session_options;

    #[test]
    fn session_defaults_fill_in_what_the_url_does_not_set() {
        assert_eq!(
            session_options(None),
            "-c idle_in_transaction_session_timeout=10s -c lock_timeout=5s -c statement_timeout=30s"
        );
        assert_eq!(
            session_options(Some("-c lock_timeout=1s --statement_timeout=0")),
            "-c lock_timeout=1s --statement_timeout=0 -c idle_in_transaction_session_timeout=10s"
        );
    }
}
