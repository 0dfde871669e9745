//! Queries and row decoding. Unusable content (a NULL where a value is required, an unknown
//! run status, a flag other than 0/1, a column of the wrong type) is reported as `DB_CORRUPT`
//! naming the table, the row's key and the column.

use super::{Conn, DbErr, Param, limit_param};
use crate::{
    ApprovalRow, AttemptRow, AuditRow, CronRow, EventRow, FrameRow, LoopRow, NodeDiffRow, NodeRow,
    OutputRow, RunRow, SignalRow, SnapshotRow, status,
};
use smithers_core::{Code, SmithersError};
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

pub(crate) struct Cols<'a> {
    row: &'a Row,
    table: &'static str,
    key: &'static [&'static str],
}

impl<'a> Cols<'a> {
    pub(crate) fn new(row: &'a Row, table: &'static str, key: &'static [&'static str]) -> Self {
        Cols { row, table, key }
    }

    fn key_text(&self) -> String {
        let parts: Vec<String> = self
            .key
            .iter()
            .map(|k| {
                if let Ok(v) = self.row.try_get::<_, Option<String>>(*k) {
                    v.map_or_else(|| format!("{k}=NULL"), |s| format!("{k}=`{s}`"))
                } else if let Ok(v) = self.row.try_get::<_, Option<i64>>(*k) {
                    v.map_or_else(|| format!("{k}=NULL"), |i| format!("{k}={i}"))
                } else {
                    format!("{k}=?")
                }
            })
            .collect();
        parts.join(", ")
    }

    pub(crate) fn corrupt(&self, col: &str, detail: impl std::fmt::Display) -> DbErr {
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

    pub(crate) fn get<T: FromSql<'a>>(&self, col: &'static str) -> Result<T, DbErr> {
        self.row
            .try_get::<_, T>(col)
            .map_err(|e| self.corrupt(col, format!("unexpected value ({e})")))
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
macro_rules! audit_cols {
    () => {
        "id, run_id, from_frame_no, to_frame_no, caller, timestamp_ms, result, duration_ms"
    };
}
macro_rules! node_diff_cols {
    () => {
        "run_id, node_id, iteration, base_ref, attempt, attempt_started_at_ms, bundle_json, created_at_ms"
    };
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

type Decode<T> = fn(&Row) -> Result<T, DbErr>;

async fn all<T>(
    conn: &mut Conn,
    sql: &str,
    params: &[Param<'_>],
    decode: Decode<T>,
) -> Result<Vec<T>, DbErr> {
    conn.query(sql, params).await?.iter().map(decode).collect()
}

async fn one<T>(
    conn: &mut Conn,
    sql: &str,
    params: &[Param<'_>],
    decode: Decode<T>,
) -> Result<Option<T>, DbErr> {
    match conn.query_opt(sql, params).await? {
        Some(row) => Ok(Some(decode(&row)?)),
        None => Ok(None),
    }
}

pub(crate) async fn get_run(c: &mut Conn, run_id: &str) -> Result<Option<RunRow>, DbErr> {
    one(
        c,
        concat!(
            "SELECT ",
            run_cols!(),
            " FROM _smithers_runs WHERE run_id = $1"
        ),
        &[&run_id],
        run_row,
    )
    .await
}

pub(crate) async fn query_runs(c: &mut Conn, q: &crate::RunQuery) -> Result<Vec<RunRow>, DbErr> {
    use crate::run_query::{Arg, run_query_sql};
    let (tail, args) = run_query_sql(q, |n| format!("${n}"), false);
    let sql = format!(
        concat!("SELECT ", run_cols!(), " FROM _smithers_runs{}"),
        tail
    );
    let params: Vec<Param<'_>> = args
        .iter()
        .map(|a| match a {
            Arg::Text(t) => t as Param<'_>,
            Arg::Int(i) => i as Param<'_>,
        })
        .collect();
    all(c, &sql, &params, run_row).await
}

pub(crate) async fn list_stale_runs(
    c: &mut Conn,
    stale_before_ms: i64,
    limit: usize,
) -> Result<Vec<RunRow>, DbErr> {
    // NULLS FIRST: the order SQLite gives, so both backends list the same runs first.
    all(
        c,
        concat!(
            "SELECT ",
            run_cols!(),
            " FROM _smithers_runs WHERE status = 'running'
               AND (runtime_owner_id IS NULL OR heartbeat_at_ms IS NULL OR heartbeat_at_ms < $1)
             ORDER BY heartbeat_at_ms ASC NULLS FIRST, run_id ASC LIMIT $2"
        ),
        &[&stale_before_ms, &limit_param(limit)],
        run_row,
    )
    .await
}

pub(crate) async fn get_input(c: &mut Conn, run_id: &str) -> Result<Option<String>, DbErr> {
    match c
        .query_opt(
            "SELECT run_id, payload FROM input WHERE run_id = $1",
            &[&run_id],
        )
        .await?
    {
        Some(row) => Cols::new(&row, "input", &["run_id"]).get("payload"),
        None => Ok(None),
    }
}

pub(crate) async fn list_nodes(c: &mut Conn, run_id: &str) -> Result<Vec<NodeRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            node_cols!(),
            " FROM _smithers_nodes WHERE run_id = $1 ORDER BY node_id, iteration"
        ),
        &[&run_id],
        node_row,
    )
    .await
}

pub(crate) async fn get_node(
    c: &mut Conn,
    run_id: &str,
    node_id: &str,
    iteration: i64,
) -> Result<Option<NodeRow>, DbErr> {
    one(
        c,
        concat!(
            "SELECT ",
            node_cols!(),
            " FROM _smithers_nodes WHERE run_id = $1 AND node_id = $2 AND iteration = $3"
        ),
        &[&run_id, &node_id, &iteration],
        node_row,
    )
    .await
}

pub(crate) async fn list_attempts(c: &mut Conn, run_id: &str) -> Result<Vec<AttemptRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            attempt_cols!(),
            " FROM _smithers_attempts WHERE run_id = $1 ORDER BY started_at_ms, node_id, iteration, attempt"
        ),
        &[&run_id],
        attempt_row,
    )
    .await
}

pub(crate) async fn list_node_attempts(
    c: &mut Conn,
    run_id: &str,
    node_id: &str,
    iteration: i64,
) -> Result<Vec<AttemptRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            attempt_cols!(),
            " FROM _smithers_attempts WHERE run_id = $1 AND node_id = $2 AND iteration = $3 ORDER BY attempt DESC"
        ),
        &[&run_id, &node_id, &iteration],
        attempt_row,
    )
    .await
}

pub(crate) async fn get_attempt(
    c: &mut Conn,
    run_id: &str,
    node_id: &str,
    iteration: i64,
    attempt: i64,
) -> Result<Option<AttemptRow>, DbErr> {
    one(
        c,
        concat!(
            "SELECT ",
            attempt_cols!(),
            " FROM _smithers_attempts WHERE run_id = $1 AND node_id = $2 AND iteration = $3 AND attempt = $4"
        ),
        &[&run_id, &node_id, &iteration, &attempt],
        attempt_row,
    )
    .await
}

pub(crate) async fn list_outputs(c: &mut Conn, run_id: &str) -> Result<Vec<OutputRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            output_cols!(),
            " FROM _smithers_outputs WHERE run_id = $1 ORDER BY node_id, iteration"
        ),
        &[&run_id],
        output_row,
    )
    .await
}

pub(crate) async fn get_output(
    c: &mut Conn,
    run_id: &str,
    node_id: &str,
    iteration: i64,
) -> Result<Option<OutputRow>, DbErr> {
    one(
        c,
        concat!(
            "SELECT ",
            output_cols!(),
            " FROM _smithers_outputs WHERE run_id = $1 AND node_id = $2 AND iteration = $3"
        ),
        &[&run_id, &node_id, &iteration],
        output_row,
    )
    .await
}

pub(crate) async fn get_frame(
    c: &mut Conn,
    run_id: &str,
    frame_no: i64,
) -> Result<Option<FrameRow>, DbErr> {
    one(
        c,
        concat!(
            "SELECT ",
            frame_cols!(),
            " FROM _smithers_frames WHERE run_id = $1 AND frame_no = $2"
        ),
        &[&run_id, &frame_no],
        frame_row,
    )
    .await
}

pub(crate) async fn list_frames(
    c: &mut Conn,
    run_id: &str,
    after_frame_no: i64,
    limit: usize,
) -> Result<Vec<FrameRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            frame_cols!(),
            " FROM _smithers_frames WHERE run_id = $1 AND frame_no > $2 ORDER BY frame_no DESC LIMIT $3"
        ),
        &[&run_id, &after_frame_no, &limit_param(limit)],
        frame_row,
    )
    .await
}

pub(crate) async fn frames_between(
    c: &mut Conn,
    run_id: &str,
    from: i64,
    to: i64,
) -> Result<Vec<FrameRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            frame_cols!(),
            " FROM _smithers_frames WHERE run_id = $1 AND frame_no >= $2 AND frame_no <= $3 ORDER BY frame_no ASC"
        ),
        &[&run_id, &from, &to],
        frame_row,
    )
    .await
}

pub(crate) async fn get_snapshot(
    c: &mut Conn,
    run_id: &str,
    frame_no: i64,
) -> Result<Option<SnapshotRow>, DbErr> {
    one(
        c,
        concat!(
            "SELECT ",
            snapshot_cols!(),
            " FROM _smithers_snapshots WHERE run_id = $1 AND frame_no = $2"
        ),
        &[&run_id, &frame_no],
        snapshot_row,
    )
    .await
}

pub(crate) async fn snapshots_from_keyframe(
    c: &mut Conn,
    run_id: &str,
    base: i64,
    to: i64,
) -> Result<Vec<SnapshotRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            snapshot_cols!(),
            " FROM _smithers_snapshots WHERE run_id = $1 AND frame_no <= $3 AND frame_no >= ",
            "COALESCE((SELECT frame_no FROM _smithers_snapshots WHERE run_id = $1 AND frame_no <= $2 ",
            "AND encoding <> 'delta' ORDER BY frame_no DESC LIMIT 1), 0) ORDER BY frame_no ASC"
        ),
        &[&run_id, &base, &to],
        snapshot_row,
    )
    .await
}

pub(crate) async fn list_events(
    c: &mut Conn,
    run_id: &str,
    after_seq: Option<i64>,
    limit: usize,
) -> Result<Vec<EventRow>, DbErr> {
    let after = after_seq.unwrap_or(i64::MIN);
    all(
        c,
        concat!(
            "SELECT ",
            event_cols!(),
            " FROM _smithers_events WHERE run_id = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3"
        ),
        &[&run_id, &after, &limit_param(limit)],
        event_row,
    )
    .await
}

pub(crate) async fn list_loops(c: &mut Conn, run_id: &str) -> Result<Vec<LoopRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            loop_cols!(),
            " FROM _smithers_ralph WHERE run_id = $1 ORDER BY ralph_id"
        ),
        &[&run_id],
        loop_row,
    )
    .await
}

pub(crate) async fn get_approval(
    c: &mut Conn,
    run_id: &str,
    node_id: &str,
    iteration: i64,
) -> Result<Option<ApprovalRow>, DbErr> {
    one(
        c,
        concat!(
            "SELECT ",
            approval_cols!(),
            " FROM _smithers_approvals WHERE run_id = $1 AND node_id = $2 AND iteration = $3"
        ),
        &[&run_id, &node_id, &iteration],
        approval_row,
    )
    .await
}

pub(crate) async fn list_approvals(c: &mut Conn, run_id: &str) -> Result<Vec<ApprovalRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            approval_cols!(),
            " FROM _smithers_approvals WHERE run_id = $1 ORDER BY node_id, iteration"
        ),
        &[&run_id],
        approval_row,
    )
    .await
}

pub(crate) async fn list_pending_approvals(
    c: &mut Conn,
    limit: usize,
) -> Result<Vec<ApprovalRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            approval_cols!(),
            " FROM _smithers_approvals WHERE status = 'requested'
             ORDER BY requested_at_ms ASC NULLS LAST, run_id, node_id, iteration LIMIT $1"
        ),
        &[&limit_param(limit)],
        approval_row,
    )
    .await
}

pub(crate) async fn approval_history(
    c: &mut Conn,
    workflow_name: &str,
    node_id: &str,
    exclude_run_id: &str,
    limit: usize,
) -> Result<Vec<ApprovalRow>, DbErr> {
    all(
        c,
        "SELECT a.run_id, a.node_id, a.iteration, a.status, a.requested_at_ms, a.decided_at_ms, a.note,
                a.decided_by, a.request_json, a.decision_json, a.auto_approved
         FROM _smithers_approvals a JOIN _smithers_runs r ON r.run_id = a.run_id
         WHERE r.workflow_name = $1 AND a.node_id = $2 AND a.run_id <> $3
           AND a.status IN ('approved', 'denied')
         ORDER BY r.created_at_ms DESC, a.run_id DESC, a.iteration DESC
         LIMIT $4",
        &[&workflow_name, &node_id, &exclude_run_id, &limit_param(limit)],
        approval_row,
    )
    .await
}

pub(crate) async fn list_signals(
    c: &mut Conn,
    run_id: &str,
    signal_name: &str,
    correlation_id: Option<&str>,
    received_after_ms: i64,
) -> Result<Vec<SignalRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            signal_cols!(),
            " FROM _smithers_signals
             WHERE run_id = $1 AND signal_name = $2 AND correlation_id IS NOT DISTINCT FROM $3
               AND received_at_ms >= $4
             ORDER BY seq ASC"
        ),
        &[&run_id, &signal_name, &correlation_id, &received_after_ms],
        signal_row,
    )
    .await
}

pub(crate) async fn list_audits(
    c: &mut Conn,
    run_id: Option<&str>,
    result: Option<&str>,
) -> Result<Vec<AuditRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            audit_cols!(),
            " FROM _smithers_time_travel_audit
             WHERE ($1::TEXT IS NULL OR run_id = $1::TEXT) AND ($2::TEXT IS NULL OR result = $2::TEXT)
             ORDER BY timestamp_ms ASC, id ASC"
        ),
        &[&run_id, &result],
        audit_row,
    )
    .await
}

pub(crate) async fn get_node_diff(
    c: &mut Conn,
    run_id: &str,
    node_id: &str,
    iteration: i64,
    attempt: i64,
    base_ref: &str,
) -> Result<Option<NodeDiffRow>, DbErr> {
    one(
        c,
        concat!(
            "SELECT ",
            node_diff_cols!(),
            " FROM _smithers_node_diffs
             WHERE run_id = $1 AND node_id = $2 AND iteration = $3 AND attempt = $4 AND base_ref = $5"
        ),
        &[&run_id, &node_id, &iteration, &attempt, &base_ref],
        node_diff_row,
    )
    .await
}

pub(crate) async fn list_node_diff_attempts(
    c: &mut Conn,
    run_id: &str,
) -> Result<Vec<(String, i64, i64)>, DbErr> {
    all(
        c,
        "SELECT run_id, node_id, iteration, attempt, base_ref FROM _smithers_node_diffs WHERE run_id = $1
         ORDER BY node_id, iteration, attempt",
        &[&run_id],
        |row| {
            let c = Cols::new(
                row,
                "_smithers_node_diffs",
                &["run_id", "node_id", "iteration", "attempt", "base_ref"],
            );
            Ok((c.get("node_id")?, c.get("iteration")?, c.get("attempt")?))
        },
    )
    .await
}

pub(crate) async fn list_crons(c: &mut Conn) -> Result<Vec<CronRow>, DbErr> {
    all(
        c,
        concat!(
            "SELECT ",
            cron_cols!(),
            " FROM _smithers_cron ORDER BY created_at_ms ASC, cron_id ASC"
        ),
        &[],
        cron_row,
    )
    .await
}

pub(crate) async fn get_cron(c: &mut Conn, cron_id: &str) -> Result<Option<CronRow>, DbErr> {
    one(
        c,
        concat!(
            "SELECT ",
            cron_cols!(),
            " FROM _smithers_cron WHERE cron_id = $1"
        ),
        &[&cron_id],
        cron_row,
    )
    .await
}
