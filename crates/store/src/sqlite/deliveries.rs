//! Webhook delivery dedupe on SQLite (`_smithers_webhook_deliveries`): the writes run on the
//! writer thread like every other write, the read on the reader pool.

use super::{Cols, DbErr, Out, Prepared};
use crate::{DeliveryClaim, WebhookDeliveryRow};
use rusqlite::{Connection, Row, params};

/// A delivery write, queued to the writer thread.
pub(super) enum Write {
    Claim(DeliveryClaim),
    Finish {
        workflow: String,
        delivery_id: String,
        claim_id: String,
        outcome_json: String,
    },
    Release {
        workflow: String,
        delivery_id: String,
        claim_id: String,
    },
    Prune {
        now_ms: i64,
    },
}

impl Write {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Write::Claim(_) => "claim webhook delivery",
            Write::Finish { .. } => "finish webhook delivery",
            Write::Release { .. } => "release webhook delivery",
            Write::Prune { .. } => "prune webhook deliveries",
        }
    }
}

pub(super) fn exec(db: &mut Prepared<'_>, w: &Write) -> Result<Out, DbErr> {
    match w {
        Write::Claim(c) => {
            // One statement: the writer thread serializes it against every other write, and
            // the upsert's WHERE decides between "new" (a row written) and "duplicate" (none).
            let n = db
                .get(
                    "INSERT INTO _smithers_webhook_deliveries
                        (workflow, delivery_id, claim_id, received_at_ms, expires_at_ms, outcome_json)
                     VALUES (?1, ?2, ?3, ?4, ?5, NULL)
                     ON CONFLICT (workflow, delivery_id) DO UPDATE SET
                        claim_id = excluded.claim_id, received_at_ms = excluded.received_at_ms,
                        expires_at_ms = excluded.expires_at_ms, outcome_json = NULL
                     WHERE _smithers_webhook_deliveries.expires_at_ms <= excluded.received_at_ms
                        OR (_smithers_webhook_deliveries.outcome_json IS NULL
                            AND _smithers_webhook_deliveries.received_at_ms < ?6)",
                )?
                .execute(params![
                    c.workflow,
                    c.delivery_id,
                    c.claim_id,
                    c.now_ms,
                    c.expires_at_ms,
                    c.stale_before_ms
                ])?;
            Ok(Out::Flag(n == 1))
        }
        Write::Finish {
            workflow,
            delivery_id,
            claim_id,
            outcome_json,
        } => {
            let n = db
                .get(
                    "UPDATE _smithers_webhook_deliveries SET outcome_json = ?4
                     WHERE workflow = ?1 AND delivery_id = ?2 AND claim_id = ?3",
                )?
                .execute(params![workflow, delivery_id, claim_id, outcome_json])?;
            Ok(Out::Flag(n == 1))
        }
        Write::Release {
            workflow,
            delivery_id,
            claim_id,
        } => {
            let n = db
                .get(
                    "DELETE FROM _smithers_webhook_deliveries
                     WHERE workflow = ?1 AND delivery_id = ?2 AND claim_id = ?3",
                )?
                .execute(params![workflow, delivery_id, claim_id])?;
            Ok(Out::Flag(n == 1))
        }
        Write::Prune { now_ms } => {
            let n = db
                .get("DELETE FROM _smithers_webhook_deliveries WHERE expires_at_ms <= ?1")?
                .execute(params![now_ms])?;
            Ok(Out::Count(n as u64))
        }
    }
}

fn delivery_row(row: &Row) -> Result<WebhookDeliveryRow, DbErr> {
    let c = Cols::new(
        row,
        "_smithers_webhook_deliveries",
        &["workflow", "delivery_id"],
    );
    Ok(WebhookDeliveryRow {
        workflow: c.get("workflow")?,
        delivery_id: c.get("delivery_id")?,
        claim_id: c.get("claim_id")?,
        received_at_ms: c.get("received_at_ms")?,
        expires_at_ms: c.get("expires_at_ms")?,
        outcome_json: c.get("outcome_json")?,
    })
}

pub(super) fn get(
    conn: &Connection,
    workflow: &str,
    delivery_id: &str,
) -> Result<Option<WebhookDeliveryRow>, DbErr> {
    super::query_one(
        conn,
        "SELECT workflow, delivery_id, claim_id, received_at_ms, expires_at_ms, outcome_json
         FROM _smithers_webhook_deliveries WHERE workflow = ?1 AND delivery_id = ?2",
        params![workflow, delivery_id],
        delivery_row,
    )
}
