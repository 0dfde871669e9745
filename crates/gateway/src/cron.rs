//! Cron schedules (gateway-protocol §4): pattern parsing, next-fire computation and the
//! scheduler tick, independent of the HTTP server.
//!
//! Patterns follow cron-parser v5 as closely as `croner` allows: 5 fields (minute precision) or
//! 6 fields (seconds first), names (`MON`, `JAN`), `L`, `#`, `?`, sloppy steps such as `5/5`
//! (= `5-59/5`), and the aliases `@yearly @annually @monthly @weekly @daily @hourly @minutely
//! @secondly @weekdays @weekends`. Day-of-month and day-of-week restrictions are OR-ed (Vixie).
//! Times are computed in the **server's local time zone** (`chrono::Local`, i.e. `TZ`), as
//! upstream does.

use chrono::{Local, TimeZone};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde_json::{Value, json};
use smithers_store::{CronRow, Store};
use std::future::Future;
use std::pin::Pin;

/// `workflow_path` prefix of crons that the gateway fires: `gateway:<workflowKey>`.
pub const GATEWAY_PREFIX: &str = "gateway:";
/// Delay before retrying a cron whose fire failed and that had no next run.
pub const FAILURE_RETRY_MS: i64 = 60_000;

/// What a run starter returns: the new run id, or an error message.
pub type StartFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'static>>;
/// Starts a run of the given workflow key with the schedule's input (auth `cron:gateway`).
pub type StartFn = dyn Fn(&str, Value) -> StartFuture + Send + Sync;

/// A cron that fired: the caller broadcasts `cron.triggered {cronId, workflow, runId}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    pub cron_id: String,
    pub workflow: String,
    pub run_id: String,
}

/// A due cron whose fire failed (recorded in its `error_json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FireFailure {
    pub cron_id: String,
    pub workflow: String,
    pub message: String,
}

/// Everything one scheduler pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    pub fired: Vec<Fired>,
    pub failed: Vec<FireFailure>,
    /// Storage errors (listing, claiming or recording), each naming the cron involved.
    pub errors: Vec<String>,
}

/// cron-parser's predefined expressions, as 6-field patterns.
const ALIASES: &[(&str, &str)] = &[
    ("@yearly", "0 0 0 1 1 *"),
    ("@annually", "0 0 0 1 1 *"),
    ("@monthly", "0 0 0 1 * *"),
    ("@weekly", "0 0 0 * * 0"),
    ("@daily", "0 0 0 * * *"),
    ("@hourly", "0 0 * * * *"),
    ("@minutely", "0 * * * * *"),
    ("@secondly", "* * * * * *"),
    ("@weekdays", "0 0 0 * * 1-5"),
    ("@weekends", "0 0 0 * * 0,6"),
];

/// Parses a cron pattern (5 or 6 fields, or an `@alias`); the error names the pattern.
pub fn parse(pattern: &str) -> Result<Cron, String> {
    let trimmed = pattern.trim();
    if trimmed.is_empty() {
        return Err("invalid cron pattern ``: the pattern is empty".to_string());
    }
    let expr = if trimmed.starts_with('@') {
        let lower = trimmed.to_ascii_lowercase();
        match ALIASES.iter().find(|(alias, _)| *alias == lower) {
            Some((_, expr)) => *expr,
            None => {
                let known: Vec<&str> = ALIASES.iter().map(|(a, _)| *a).collect();
                return Err(format!(
                    "invalid cron pattern `{pattern}`: unknown alias (known: {})",
                    known.join(", ")
                ));
            }
        }
    } else {
        let fields = trimmed.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "invalid cron pattern `{pattern}`: expected 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first), got {fields}"
            ));
        }
        trimmed
    };
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .sloppy_ranges(true)
        .build()
        .parse(expr)
        .map_err(|e| format!("invalid cron pattern `{pattern}`: {e}"))
}

/// The first fire time strictly after `after_ms` (epoch ms, local time zone).
pub fn next_after(pattern: &str, after_ms: i64) -> Result<i64, String> {
    let cron = parse(pattern)?;
    let after = Local
        .timestamp_millis_opt(after_ms)
        .single()
        .ok_or_else(|| {
            format!("cron pattern `{pattern}`: time {after_ms} ms is out of the supported range")
        })?;
    cron.find_next_occurrence(&after, false)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            format!("cron pattern `{pattern}`: no next fire time after {after_ms} ms: {e}")
        })
}

/// The workflow key of a `gateway:<key>` workflow path; `None` for other paths.
pub fn workflow_key(workflow_path: &str) -> Option<&str> {
    workflow_path.strip_prefix(GATEWAY_PREFIX)
}

/// A new enabled-or-not gateway cron row for `key`, first fire after `now_ms`.
pub fn new_row(
    cron_id: &str,
    key: &str,
    pattern: &str,
    enabled: bool,
    now_ms: i64,
    input: Option<&Value>,
) -> Result<CronRow, String> {
    Ok(CronRow {
        cron_id: cron_id.to_string(),
        pattern: pattern.to_string(),
        workflow_path: format!("{GATEWAY_PREFIX}{key}"),
        enabled,
        created_at_ms: now_ms,
        last_run_at_ms: None,
        next_run_at_ms: Some(next_after(pattern, now_ms)?),
        error_json: None,
        input_json: input.map(Value::to_string),
    })
}

/// The input a schedule's runs start with: its stored object, else `{}`.
pub fn input_of(row: &CronRow) -> Value {
    row.input_json
        .as_deref()
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}))
}

/// The wire shape of a `cron.list` row (§1.10); `workflow` is the key of a `gateway:<key>`
/// path, `null` for other paths (callers may overwrite it with the registering key).
pub fn cron_json(row: &CronRow) -> Value {
    json!({
        "cronId": row.cron_id,
        "pattern": row.pattern,
        "workflowPath": row.workflow_path,
        "enabled": row.enabled,
        "createdAtMs": row.created_at_ms,
        "lastRunAtMs": row.last_run_at_ms,
        "nextRunAtMs": row.next_run_at_ms,
        "errorJson": row.error_json,
        "workflow": workflow_key(&row.workflow_path),
        "input": input_of(row),
    })
}

/// One scheduler pass; returns the crons that fired. Storage errors go to stderr; use
/// [`tick_report`] to handle them yourself.
pub async fn tick(store: &dyn Store, now_ms: i64, start: &StartFn) -> Vec<Fired> {
    let report = tick_report(store, now_ms, start).await;
    for f in &report.fired {
        tracing::info!(cron_id = %f.cron_id, workflow = %f.workflow, run_id = %f.run_id, "cron fired");
    }
    for f in &report.failed {
        tracing::warn!(cron_id = %f.cron_id, workflow = %f.workflow, error = %f.message, "cron fire failed; retried at its next time");
    }
    for e in &report.errors {
        tracing::error!(error = %e, "cron storage error");
    }
    report.fired
}

/// One scheduler pass (§4): every enabled `gateway:<key>` cron that is due (no next run, or
/// next run ≤ `now_ms`) is claimed with a compare-and-set on its next run, so that among
/// several gateways sharing the database exactly one fires it; the winner starts the run and
/// records `last_run = now, next_run = next(pattern), error = NULL`, or on failure
/// `last_run = now, next_run = old next ?? now + 60 s, error = message`. A stored pattern
/// that no longer parses is a failure too, retried after 60 s (not every tick).
pub async fn tick_report(store: &dyn Store, now_ms: i64, start: &StartFn) -> TickReport {
    let mut report = TickReport::default();
    let crons = match store.list_crons().await {
        Ok(c) => c,
        Err(e) => {
            report.errors.push(format!("listing crons failed: {e}"));
            return report;
        }
    };
    for row in crons {
        if !row.enabled || row.next_run_at_ms.is_some_and(|n| n > now_ms) {
            continue;
        }
        let Some(key) = workflow_key(&row.workflow_path) else {
            continue;
        };
        fire(store, now_ms, start, &row, key, &mut report).await;
    }
    report
}

async fn fire(
    store: &dyn Store,
    now_ms: i64,
    start: &StartFn,
    row: &CronRow,
    key: &str,
    report: &mut TickReport,
) {
    let next = next_after(&row.pattern, now_ms);
    let claim_next = match next {
        Ok(n) => n,
        Err(_) => now_ms + FAILURE_RETRY_MS,
    };
    match store
        .claim_due_cron(&row.cron_id, row.next_run_at_ms, claim_next, now_ms)
        .await
    {
        Ok(true) => {}
        // Another gateway fired it, or it changed since it was listed.
        Ok(false) => return,
        Err(e) => {
            report
                .errors
                .push(format!("claiming cron `{}` failed: {e}", row.cron_id));
            return;
        }
    }
    let pattern_ok = next.is_ok();
    let outcome = match next {
        Ok(n) => start(key, input_of(row)).await.map(|run_id| (run_id, n)),
        Err(msg) => Err(msg),
    };
    let (next_run, error, result) = match outcome {
        Ok((run_id, n)) => (Some(n), None, Ok(run_id)),
        Err(msg) => {
            let retry = if pattern_ok {
                row.next_run_at_ms.unwrap_or(now_ms + FAILURE_RETRY_MS)
            } else {
                claim_next
            };
            (Some(retry), Some(msg.clone()), Err(msg))
        }
    };
    if let Err(e) = store
        .update_cron_run(&row.cron_id, Some(now_ms), next_run, error)
        .await
    {
        report.errors.push(format!(
            "recording the fire of cron `{}` failed: {e}",
            row.cron_id
        ));
    }
    match result {
        Ok(run_id) => report.fired.push(Fired {
            cron_id: row.cron_id.clone(),
            workflow: key.to_string(),
            run_id,
        }),
        Err(message) => report.failed.push(FireFailure {
            cron_id: row.cron_id.clone(),
            workflow: key.to_string(),
            message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Timelike;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// 2023-11-14T22:13:20Z, a whole multiple of 10 s.
    const NOW: i64 = 1_700_000_000_000;

    async fn open(path: &std::path::Path) -> Arc<dyn Store> {
        match smithers_store::open(&format!("sqlite://{}", path.display())).await {
            Ok(s) => s,
            Err(e) => panic!("open: {e}"),
        }
    }

    async fn temp_store() -> (Arc<dyn Store>, tempfile::TempDir) {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        (open(&dir.path().join("smithers.db")).await, dir)
    }

    fn row(id: &str, path: &str, pattern: &str, next: Option<i64>) -> CronRow {
        CronRow {
            cron_id: id.into(),
            pattern: pattern.into(),
            workflow_path: path.into(),
            enabled: true,
            created_at_ms: 1,
            last_run_at_ms: None,
            next_run_at_ms: next,
            error_json: None,
            input_json: None,
        }
    }

    async fn put(store: &dyn Store, r: CronRow) {
        if let Err(e) = store.upsert_cron(r).await {
            panic!("upsert: {e}");
        }
    }

    async fn get(store: &dyn Store, id: &str) -> CronRow {
        match store.get_cron(id).await {
            Ok(Some(r)) => r,
            other => panic!("get_cron {id}: {other:?}"),
        }
    }

    /// A starter that records the keys it started (with the input, when not `{}`) and fails
    /// for key `broken`.
    fn starter(log: Arc<Mutex<Vec<String>>>) -> impl Fn(&str, Value) -> StartFuture + Send + Sync {
        let counter = Arc::new(AtomicUsize::new(0));
        move |key: &str, input: Value| {
            let (log, counter) = (log.clone(), counter.clone());
            let key = if input == json!({}) {
                key.to_string()
            } else {
                format!("{key} {input}")
            };
            Box::pin(async move {
                if key.starts_with("broken") {
                    return Err("Unknown workflow: broken".to_string());
                }
                let n = counter.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut l) = log.lock() {
                    l.push(key.clone());
                }
                Ok(format!("run-{key}-{n}"))
            })
        }
    }

    fn started(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
        log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    #[test]
    fn five_and_six_fields() {
        assert_eq!(
            next_after("* * * * *", NOW),
            Ok(NOW + 40_000),
            "next minute"
        );
        assert_eq!(
            next_after("* * * * * *", NOW),
            Ok(NOW + 1_000),
            "next second"
        );
        assert_eq!(next_after("*/15 * * * * *", NOW), Ok(NOW + 10_000));
        assert_eq!(
            next_after("* * * * * *", NOW + 500),
            Ok(NOW + 1_000),
            "sub-second start"
        );
        assert!(parse(" 0 8 * * 1-5 ").is_ok());
        assert!(parse("0 0 8 * * MON-FRI").is_ok());
    }

    #[test]
    fn sloppy_steps_accepted() {
        // cron-parser rewrites `5/5` to `5-59/5`.
        assert_eq!(next_after("5/5 * * * * *", NOW), Ok(NOW + 5_000));
        assert_eq!(next_after("5/10 * * * * *", NOW), Ok(NOW + 5_000));
    }

    #[test]
    fn aliases() {
        for alias in ["@daily", "@DAILY", " @daily "] {
            let next = match next_after(alias, NOW) {
                Ok(n) => n,
                Err(e) => panic!("{alias}: {e}"),
            };
            let local = Local.timestamp_millis_opt(next).single();
            assert_eq!(
                local.map(|t| (t.hour(), t.minute(), t.second())),
                Some((0, 0, 0)),
                "{alias} fires at local midnight"
            );
            assert!(next > NOW && next <= NOW + 25 * 3_600_000);
        }
        let e = next_after("@midnight-no", NOW).err().unwrap_or_default();
        assert!(
            e.contains("`@midnight-no`") && e.contains("unknown alias"),
            "{e}"
        );
        for alias in [
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@hourly",
            "@minutely",
            "@secondly",
            "@weekdays",
            "@weekends",
        ] {
            assert!(next_after(alias, NOW).is_ok(), "{alias}");
        }
        assert_eq!(next_after("@secondly", NOW), Ok(NOW + 1_000));
        assert_eq!(next_after("@minutely", NOW), Ok(NOW + 40_000));
    }

    #[test]
    fn invalid_patterns_name_the_pattern() {
        for bad in [
            "a * * * *",
            "* * *",
            "* * * * * * *",
            "",
            "61 * * * *",
            "*/0 * * * *",
        ] {
            match parse(bad) {
                Ok(_) => panic!("`{bad}` must be rejected"),
                Err(e) => assert!(
                    e.starts_with(&format!("invalid cron pattern `{bad}`")),
                    "{e}"
                ),
            }
        }
        let e = parse("* * *").err().unwrap_or_default();
        assert!(e.contains("got 3"), "{e}");
        assert!(next_after("nope", NOW).is_err());
    }

    #[test]
    fn json_shape() {
        let mut r = row("c1", "gateway:github", "@daily", Some(5));
        r.error_json = Some("boom".into());
        assert_eq!(
            cron_json(&r),
            json!({"cronId":"c1","pattern":"@daily","workflowPath":"gateway:github","enabled":true,
                   "createdAtMs":1,"lastRunAtMs":null,"nextRunAtMs":5,"errorJson":"boom","workflow":"github","input":{}})
        );
        assert_eq!(
            cron_json(&row("c2", "other.tsx", "@daily", None))["workflow"],
            Value::Null
        );
        let n = new_row("gateway:k", "k", "* * * * * *", false, NOW, None);
        assert_eq!(
            n.map(|r| (r.workflow_path, r.enabled, r.next_run_at_ms)),
            Ok(("gateway:k".to_string(), false, Some(NOW + 1_000)))
        );
        assert!(new_row("x", "k", "bad", true, NOW, None).is_err());
        let with = new_row("w", "k", "@daily", true, NOW, Some(&json!({"repo": "x"})));
        assert_eq!(with.map(|r| input_of(&r)), Ok(json!({"repo": "x"})));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fires_due_crons_only() {
        let (store, _dir) = temp_store().await;
        let s = store.as_ref();
        put(s, row("due", "gateway:a", "*/10 * * * * *", Some(NOW - 5))).await;
        // a schedule with input starts its runs with it
        let mut exact = row("exact", "gateway:b", "*/10 * * * * *", Some(NOW));
        exact.input_json = Some(r#"{"n":1}"#.into());
        put(s, exact).await;
        put(s, row("never", "gateway:c", "*/10 * * * * *", None)).await;
        put(
            s,
            row("later", "gateway:d", "*/10 * * * * *", Some(NOW + 1)),
        )
        .await;
        let mut off = row("off", "gateway:e", "*/10 * * * * *", Some(NOW - 5));
        off.enabled = false;
        put(s, off.clone()).await;
        put(
            s,
            row("foreign", "workflows/x.tsx", "*/10 * * * * *", Some(0)),
        )
        .await;

        let log = Arc::new(Mutex::new(Vec::new()));
        let start = starter(log.clone());
        let report = tick_report(s, NOW, &start).await;
        let mut ids: Vec<&str> = report.fired.iter().map(|f| f.cron_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, vec!["due", "exact", "never"]);
        assert!(
            report.failed.is_empty() && report.errors.is_empty(),
            "{report:?}"
        );
        let mut keys = started(&log);
        keys.sort();
        assert_eq!(keys, vec!["a", r#"b {"n":1}"#, "c"]);
        let due = report.fired.iter().find(|f| f.cron_id == "due");
        assert_eq!(due.map(|f| f.workflow.as_str()), Some("a"));
        assert!(due.is_some_and(|f| f.run_id.starts_with("run-a-")));

        for id in ["due", "exact", "never"] {
            let r = get(s, id).await;
            assert_eq!(r.last_run_at_ms, Some(NOW), "{id}");
            assert_eq!(r.next_run_at_ms, Some(NOW + 10_000), "{id}: next(pattern)");
            assert_eq!(r.error_json, None);
        }
        assert_eq!(get(s, "later").await.last_run_at_ms, None);
        assert_eq!(get(s, "off").await, off, "disabled crons are untouched");
        assert_eq!(get(s, "foreign").await.last_run_at_ms, None);

        // Nothing is due any more at the same instant.
        assert!(tick(s, NOW, &start).await.is_empty());
        // Ten seconds later every gateway cron with next = NOW + 10 s (and `later`) fires.
        let fired = tick(s, NOW + 10_000, &start).await;
        assert_eq!(fired.len(), 4);
        assert_eq!(get(s, "due").await.next_run_at_ms, Some(NOW + 20_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failure_is_recorded_and_retried() {
        let (store, _dir) = temp_store().await;
        let s = store.as_ref();
        put(
            s,
            row("old", "gateway:broken", "* * * * *", Some(NOW - 1_000)),
        )
        .await;
        put(s, row("null", "gateway:broken", "* * * * *", None)).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let start = starter(log.clone());

        let report = tick_report(s, NOW, &start).await;
        assert!(report.fired.is_empty());
        assert_eq!(report.failed.len(), 2);
        assert_eq!(report.failed[0].message, "Unknown workflow: broken");
        let old = get(s, "old").await;
        assert_eq!(
            (
                old.last_run_at_ms,
                old.next_run_at_ms,
                old.error_json.as_deref()
            ),
            (
                Some(NOW),
                Some(NOW - 1_000),
                Some("Unknown workflow: broken")
            ),
            "old next run kept"
        );
        let null = get(s, "null").await;
        assert_eq!(
            (null.last_run_at_ms, null.next_run_at_ms),
            (Some(NOW), Some(NOW + FAILURE_RETRY_MS)),
            "no next run: retry in 60 s"
        );

        // A later success clears the error.
        let mut fixed = get(s, "old").await;
        fixed.workflow_path = "gateway:ok".into();
        put(s, fixed).await;
        let fired = tick(s, NOW + 1, &start).await;
        assert_eq!(fired.len(), 1);
        let old = get(s, "old").await;
        assert_eq!(old.error_json, None);
        assert_eq!(old.last_run_at_ms, Some(NOW + 1));
        assert_eq!(old.next_run_at_ms, Some(NOW + 40_000));
        assert!(started(&log).iter().all(|k| k == "ok"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_stored_pattern_is_a_failure_without_a_run() {
        let (store, _dir) = temp_store().await;
        let s = store.as_ref();
        put(s, row("bad", "gateway:a", "not a pattern", Some(NOW - 1))).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let start = starter(log.clone());
        let report = tick_report(s, NOW, &start).await;
        assert!(report.fired.is_empty() && started(&log).is_empty());
        assert_eq!(report.failed.len(), 1);
        let bad = get(s, "bad").await;
        assert_eq!(bad.next_run_at_ms, Some(NOW + FAILURE_RETRY_MS));
        let err = bad.error_json.unwrap_or_default();
        assert!(err.contains("`not a pattern`"), "{err}");
        assert!(
            tick_report(s, NOW + 1_000, &start).await.failed.is_empty(),
            "backs off"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_gateways_fire_each_cron_exactly_once() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let path = dir.path().join("smithers.db");
        let a = open(&path).await;
        let b = open(&path).await;
        for i in 0..10 {
            put(
                a.as_ref(),
                row(
                    &format!("c{i}"),
                    &format!("gateway:k{i}"),
                    "*/10 * * * * *",
                    Some(NOW - i),
                ),
            )
            .await;
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        for round in 0..3 {
            let now = NOW + round * 10_000;
            let spawn = |store: Arc<dyn Store>| {
                let start = starter(log.clone());
                tokio::spawn(async move { tick_report(store.as_ref(), now, &start).await })
            };
            let (ra, rb) = (spawn(a.clone()), spawn(b.clone()));
            let (ra, rb) = match (ra.await, rb.await) {
                (Ok(x), Ok(y)) => (x, y),
                other => panic!("tick task failed: {other:?}"),
            };
            assert!(
                ra.errors.is_empty() && rb.errors.is_empty(),
                "{ra:?} {rb:?}"
            );
            let mut ids: Vec<String> = ra
                .fired
                .iter()
                .chain(rb.fired.iter())
                .map(|f| f.cron_id.clone())
                .collect();
            ids.sort();
            let mut want: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
            want.sort();
            assert_eq!(ids, want, "round {round}: every cron fired exactly once");
        }
        assert_eq!(started(&log).len(), 30);
    }
}
