//! PostgreSQL schema: the same tables and columns as the SQLite backend (`crate::sqlite`),
//! with `BIGINT` for integers and 0/1 `BIGINT` flags, so rows round-trip identically. Text
//! columns that take part in keys or orderings use the `"C"` collation: byte order, as SQLite
//! compares, whatever the database's default locale.
//!
//! Migrations are applied once, in one transaction under a transaction-level advisory lock,
//! so several nodes opening the same database at the same time are safe.

use super::{Conn, DbErr, now_ms};
use smithers_core::{Code, SmithersError};

/// Ordered migrations; entry `i` brings the schema to version `i + 1`. They match the SQLite
/// migrations one for one (same version numbers). Never edit an entry that has shipped.
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

/// Key of the advisory lock held while migrating (an arbitrary constant: "smithers" in ASCII).
const MIGRATION_LOCK: i64 = 0x736d_6974_6865_7273;

const MIGRATION_1: &str = r#"
CREATE TABLE IF NOT EXISTS _smithers_runs (
    run_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    parent_run_id TEXT COLLATE "C",
    workflow_name TEXT COLLATE "C" NOT NULL,
    workflow_path TEXT,
    workflow_hash TEXT,
    status TEXT COLLATE "C" NOT NULL,
    created_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT,
    finished_at_ms BIGINT,
    heartbeat_at_ms BIGINT,
    runtime_owner_id TEXT COLLATE "C",
    cancel_requested_at_ms BIGINT,
    hijack_requested_at_ms BIGINT,
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
    run_id TEXT COLLATE "C" NOT NULL,
    node_id TEXT COLLATE "C" NOT NULL,
    iteration BIGINT NOT NULL,
    state TEXT NOT NULL,
    last_attempt BIGINT,
    updated_at_ms BIGINT NOT NULL,
    output_table TEXT NOT NULL,
    label TEXT,
    PRIMARY KEY (run_id, node_id, iteration)
);

CREATE TABLE IF NOT EXISTS _smithers_attempts (
    run_id TEXT COLLATE "C" NOT NULL,
    node_id TEXT COLLATE "C" NOT NULL,
    iteration BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    state TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT,
    heartbeat_at_ms BIGINT,
    heartbeat_data_json TEXT,
    error_json TEXT,
    jj_pointer TEXT,
    response_text TEXT,
    jj_cwd TEXT,
    cached BIGINT NOT NULL DEFAULT 0,
    meta_json TEXT,
    PRIMARY KEY (run_id, node_id, iteration, attempt)
);

CREATE TABLE IF NOT EXISTS _smithers_outputs (
    run_id TEXT COLLATE "C" NOT NULL,
    node_id TEXT COLLATE "C" NOT NULL,
    iteration BIGINT NOT NULL,
    output_table TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, node_id, iteration)
);

CREATE TABLE IF NOT EXISTS input (
    run_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    payload TEXT
);

CREATE TABLE IF NOT EXISTS _smithers_frames (
    run_id TEXT COLLATE "C" NOT NULL,
    frame_no BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    xml_json TEXT NOT NULL,
    xml_hash TEXT NOT NULL,
    encoding TEXT NOT NULL DEFAULT 'full',
    mounted_task_ids_json TEXT,
    task_index_json TEXT,
    note TEXT,
    PRIMARY KEY (run_id, frame_no)
);

CREATE TABLE IF NOT EXISTS _smithers_snapshots (
    run_id TEXT COLLATE "C" NOT NULL,
    frame_no BIGINT NOT NULL,
    encoding TEXT NOT NULL DEFAULT 'keyframe',
    nodes_json TEXT NOT NULL,
    outputs_json TEXT NOT NULL,
    ralph_json TEXT NOT NULL,
    input_json TEXT NOT NULL,
    vcs_pointer TEXT,
    workflow_hash TEXT,
    content_hash TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, frame_no)
);

CREATE TABLE IF NOT EXISTS _smithers_events (
    run_id TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    type TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE IF NOT EXISTS _smithers_ralph (
    run_id TEXT COLLATE "C" NOT NULL,
    ralph_id TEXT COLLATE "C" NOT NULL,
    iteration BIGINT NOT NULL DEFAULT 0,
    done BIGINT NOT NULL DEFAULT 0,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, ralph_id)
);

CREATE TABLE IF NOT EXISTS _smithers_approvals (
    run_id TEXT COLLATE "C" NOT NULL,
    node_id TEXT COLLATE "C" NOT NULL,
    iteration BIGINT NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    requested_at_ms BIGINT,
    decided_at_ms BIGINT,
    note TEXT,
    decided_by TEXT,
    request_json TEXT,
    decision_json TEXT,
    auto_approved BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, node_id, iteration)
);
CREATE INDEX IF NOT EXISTS _smithers_approvals_status_idx ON _smithers_approvals (status);

CREATE TABLE IF NOT EXISTS _smithers_signals (
    run_id TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    signal_name TEXT COLLATE "C" NOT NULL,
    correlation_id TEXT COLLATE "C",
    payload_json TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    received_by TEXT,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS _smithers_signals_lookup_idx
    ON _smithers_signals (run_id, signal_name, correlation_id, received_at_ms);
"#;

const MIGRATION_2: &str = r#"
CREATE TABLE IF NOT EXISTS _smithers_cron (
    cron_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    pattern TEXT NOT NULL,
    workflow_path TEXT NOT NULL,
    enabled BIGINT NOT NULL DEFAULT 1,
    created_at_ms BIGINT NOT NULL,
    last_run_at_ms BIGINT,
    next_run_at_ms BIGINT,
    error_json TEXT
);
"#;

const MIGRATION_3: &str = r#"
CREATE TABLE IF NOT EXISTS _smithers_time_travel_audit (
    id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    run_id TEXT COLLATE "C" NOT NULL,
    from_frame_no BIGINT NOT NULL,
    to_frame_no BIGINT NOT NULL,
    caller TEXT COLLATE "C" NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    result TEXT COLLATE "C" NOT NULL,
    duration_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS _smithers_time_travel_audit_run_idx ON _smithers_time_travel_audit (run_id, caller, timestamp_ms);
CREATE INDEX IF NOT EXISTS _smithers_time_travel_audit_result_idx ON _smithers_time_travel_audit (result);

CREATE TABLE IF NOT EXISTS _smithers_node_diffs (
    run_id TEXT COLLATE "C" NOT NULL,
    node_id TEXT COLLATE "C" NOT NULL,
    iteration BIGINT NOT NULL,
    base_ref TEXT COLLATE "C" NOT NULL,
    attempt BIGINT NOT NULL,
    attempt_started_at_ms BIGINT NOT NULL,
    bundle_json TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (run_id, node_id, iteration, attempt, base_ref)
);
"#;

/// Partial stale-run and owner indexes: the same statements as SQLite's migration 8.
const MIGRATION_8: &str = crate::sqlite::MIGRATION_8;

/// The unused parent index goes (as SQLite's migration 7).
const MIGRATION_7: &str = r#"
DROP INDEX IF EXISTS _smithers_runs_parent_idx;
"#;

/// Schedules carry the input of the runs they start.
/// Indexes for the run list's pages and filters (as SQLite's migration 6).
const MIGRATION_6: &str = r#"
CREATE INDEX IF NOT EXISTS _smithers_runs_list_idx ON _smithers_runs (created_at_ms, run_id);
CREATE INDEX IF NOT EXISTS _smithers_runs_status_list_idx ON _smithers_runs (status, created_at_ms, run_id);
CREATE INDEX IF NOT EXISTS _smithers_runs_workflow_list_idx ON _smithers_runs (workflow_name, created_at_ms, run_id);
DROP INDEX IF EXISTS _smithers_runs_created_idx;
"#;

const MIGRATION_5: &str = r#"
ALTER TABLE _smithers_cron ADD COLUMN IF NOT EXISTS input_json TEXT;
"#;

/// Webhook delivery ids remembered for the dedupe window (`_smithers_webhook_deliveries`).
const MIGRATION_4: &str = r#"
CREATE TABLE IF NOT EXISTS _smithers_webhook_deliveries (
    workflow TEXT COLLATE "C" NOT NULL,
    delivery_id TEXT COLLATE "C" NOT NULL,
    claim_id TEXT COLLATE "C" NOT NULL,
    received_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    outcome_json TEXT,
    PRIMARY KEY (workflow, delivery_id)
);
CREATE INDEX IF NOT EXISTS _smithers_webhook_deliveries_expiry_idx
    ON _smithers_webhook_deliveries (expires_at_ms);
"#;

/// Brings the schema up to [`SCHEMA_VERSION`] in one transaction; refuses a database written
/// by a newer build.
pub(super) async fn migrate(conn: &mut Conn) -> Result<(), DbErr> {
    conn.begin().await?;
    let result = migrate_in_tx(conn).await;
    match result {
        Ok(()) => conn.commit().await,
        Err(e) => {
            conn.rollback().await;
            Err(e)
        }
    }
}

async fn migrate_in_tx(conn: &mut Conn) -> Result<(), DbErr> {
    // nodes starting together wait for the one migrating, and a migration of a large database
    // may run long: the session's lock and statement timeouts do not apply here
    conn.client
        .batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
        .await?;
    conn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    conn.client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS _smithers_schema_version (
                version BIGINT PRIMARY KEY NOT NULL,
                applied_at_ms BIGINT NOT NULL
            )",
        )
        .await?;
    let current: i64 = conn
        .client
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM _smithers_schema_version",
            &[],
        )
        .await?
        .try_get(0)?;
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
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if version <= current {
            continue;
        }
        conn.client.batch_execute(sql).await?;
        conn.client
            .execute(
                "INSERT INTO _smithers_schema_version (version, applied_at_ms) VALUES ($1, $2)",
                &[&version, &now_ms()],
            )
            .await?;
    }
    Ok(())
}
