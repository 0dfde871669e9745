//! The run list's filters and keyset paging, built once for both backends so that they list the
//! same rows in the same order.

use crate::rows::status;

/// Which runs to list, newest first (`created_at_ms DESC, run_id DESC`). Paging continues from a
/// position (`before`) instead of an offset, so a deep page of a large table costs what the first
/// page does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunQuery {
    /// `running` also matches `continued`, as upstream's list does.
    pub status: Option<String>,
    pub workflow_name: Option<String>,
    pub run_id_prefix: Option<String>,
    pub before: Option<RunCursor>,
    pub limit: usize,
}

/// A position in the newest-first order: list only runs after it. Without `run_id`, every run
/// created at `created_at_ms` is skipped too.
#[derive(Debug, Clone, PartialEq)]
pub struct RunCursor {
    pub created_at_ms: i64,
    pub run_id: Option<String>,
}

/// One bound argument of the generated SQL.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// The SQL after `FROM _smithers_runs` (filters, order and limit) and its arguments in
/// placeholder order. `mark(n)` spells the n-th placeholder (`?n` or `$n`). `byte_order` says
/// that text compares byte-wise (SQLite), so a run-id prefix can also be a key range.
pub(crate) fn run_query_sql(
    q: &RunQuery,
    mark: fn(usize) -> String,
    byte_order: bool,
) -> (String, Vec<Arg>) {
    let mut args = Vec::new();
    let mut push = |a: Arg| {
        args.push(a);
        mark(args.len())
    };
    let mut conds = Vec::new();
    if let Some(s) = &q.status {
        let also = if s == status::RUNNING {
            status::CONTINUED
        } else {
            s.as_str()
        };
        let a = push(Arg::Text(s.clone()));
        if also == s {
            conds.push(format!("status = {a}"));
        } else {
            let b = push(Arg::Text(also.to_string()));
            conds.push(format!("status IN ({a}, {b})"));
        }
    }
    if let Some(w) = &q.workflow_name {
        let a = push(Arg::Text(w.clone()));
        conds.push(format!("workflow_name = {a}"));
    }
    if let Some(p) = &q.run_id_prefix {
        let a = push(Arg::Text(p.clone()));
        if byte_order {
            // the primary key's range holds every id with this prefix (U+10FFFF is the
            // largest character); the exact test stays for anything past it
            let end = push(Arg::Text(format!("{p}\u{10FFFF}")));
            conds.push(format!(
                "run_id >= {a} AND run_id < {end} AND substr(run_id, 1, length({a})) = {a}"
            ));
        } else {
            conds.push(format!("substr(run_id, 1, length({a})) = {a}"));
        }
    }
    if let Some(c) = &q.before {
        let t = push(Arg::Int(c.created_at_ms));
        match &c.run_id {
            Some(id) => {
                let r = push(Arg::Text(id.clone()));
                conds.push(format!(
                    "(created_at_ms < {t} OR (created_at_ms = {t} AND run_id < {r}))"
                ));
            }
            None => conds.push(format!("created_at_ms < {t}")),
        }
    }
    let limit = push(Arg::Int(i64::try_from(q.limit).unwrap_or(i64::MAX)));
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    (
        format!("{filter} ORDER BY created_at_ms DESC, run_id DESC LIMIT {limit}"),
        args,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_gets_its_own_numbered_placeholder() {
        let q = RunQuery {
            status: Some("running".into()),
            workflow_name: Some("wf".into()),
            run_id_prefix: Some("ab".into()),
            before: Some(RunCursor {
                created_at_ms: 5,
                run_id: Some("r".into()),
            }),
            limit: 10,
        };
        let (sql, args) = run_query_sql(&q, |n| format!("${n}"), false);
        assert_eq!(
            sql,
            " WHERE status IN ($1, $2) AND workflow_name = $3 AND substr(run_id, 1, length($4)) = $4 \
             AND (created_at_ms < $5 OR (created_at_ms = $5 AND run_id < $6)) \
             ORDER BY created_at_ms DESC, run_id DESC LIMIT $7"
        );
        assert_eq!(args.len(), 7);
        assert_eq!(args[1], Arg::Text("continued".into()));
    }

    #[test]
    fn no_filter_is_just_order_and_limit() {
        let (sql, args) = run_query_sql(
            &RunQuery {
                limit: 3,
                ..Default::default()
            },
            |n| format!("?{n}"),
            true,
        );
        assert_eq!(sql, " ORDER BY created_at_ms DESC, run_id DESC LIMIT ?1");
        assert_eq!(args, vec![Arg::Int(3)]);
    }
}
