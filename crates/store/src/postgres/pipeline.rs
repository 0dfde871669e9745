//! Sends a transaction's statements together (pipelining): each statement is written to the
//! connection without waiting for the answer to the one before, so a batch of any size costs
//! one round trip instead of one per statement. PostgreSQL still runs them one after another,
//! in order, in the same transaction; once one fails, the ones after it fail too (the
//! transaction is aborted), so the caller looks at the first error in statement order.

use super::{Conn, DbErr, Param};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use tokio_postgres::Row;

type Pending<'a> = Pin<Box<dyn Future<Output = Result<Vec<Row>, DbErr>> + Send + 'a>>;

/// Runs `stmts` (SQL and parameters), preceded by `BEGIN` when `begin` is set, in one round
/// trip; returns each statement's rows or error, in order. Statements this connection has not
/// prepared yet are prepared first (one round trip each, once per connection).
pub(crate) async fn send_all(
    conn: &mut Conn,
    begin: bool,
    stmts: &[(&str, &[Param<'_>])],
) -> Result<Vec<Result<Vec<Row>, DbErr>>, DbErr> {
    let mut prepared = Vec::with_capacity(stmts.len());
    for (sql, _) in stmts {
        prepared.push(conn.statement(sql).await?);
    }
    let client = &conn.client;
    let mut pending: Vec<Pending<'_>> = Vec::with_capacity(stmts.len() + 1);
    if begin {
        pending.push(Box::pin(async move {
            client.batch_execute("BEGIN").await?;
            Ok(Vec::new())
        }));
    }
    for (st, (_, params)) in prepared.iter().zip(stmts) {
        pending.push(Box::pin(async move { Ok(client.query(st, params).await?) }));
    }
    let mut results = in_order(pending).await;
    if begin && !results.is_empty() {
        results.remove(0)?;
    }
    Ok(results)
}

/// Polls every future, first to last, until all are done. The first poll of each sends its
/// request, so requests leave in the order of `pending`.
async fn in_order<T>(mut pending: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut done: Vec<Option<T>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (f, slot) in pending.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}
