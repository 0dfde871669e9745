//! Webhook delivery dedupe on PostgreSQL (`_smithers_webhook_deliveries`).

use super::reads::Cols;
use super::{Conn, DbErr, claims::Out};
use crate::{DeliveryClaim, WebhookDeliveryRow};

/// A delivery write; each runs in its own transaction like every other write.
pub(crate) enum Write<'a> {
    Claim(&'a DeliveryClaim),
    Finish {
        workflow: &'a str,
        delivery_id: &'a str,
        claim_id: &'a str,
        outcome_json: &'a str,
    },
    Release {
        workflow: &'a str,
        delivery_id: &'a str,
        claim_id: &'a str,
    },
    Prune {
        now_ms: i64,
    },
}

impl Write<'_> {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Write::Claim(_) => "claim_webhook_delivery",
            Write::Finish { .. } => "finish_webhook_delivery",
            Write::Release { .. } => "release_webhook_delivery",
            Write::Prune { .. } => "prune_webhook_deliveries",
        }
    }
}

pub(crate) async fn exec(conn: &mut Conn, w: &Write<'_>) -> Result<Out, DbErr> {
    match w {
        Write::Claim(c) => {
            // `ON CONFLICT` makes concurrent claims from several nodes serialize on the key:
            // the second waits for the first to commit, then re-checks the WHERE against the
            // committed row and updates nothing (a duplicate).
            let n = conn
                .execute(
                    "INSERT INTO _smithers_webhook_deliveries
                        (workflow, delivery_id, claim_id, received_at_ms, expires_at_ms, outcome_json)
                     VALUES ($1, $2, $3, $4, $5, NULL)
                     ON CONFLICT (workflow, delivery_id) DO UPDATE SET
                        claim_id = EXCLUDED.claim_id, received_at_ms = EXCLUDED.received_at_ms,
                        expires_at_ms = EXCLUDED.expires_at_ms, outcome_json = NULL
                     WHERE _smithers_webhook_deliveries.expires_at_ms <= EXCLUDED.received_at_ms
                        OR (_smithers_webhook_deliveries.outcome_json IS NULL
                            AND _smithers_webhook_deliveries.received_at_ms < $6)",
                    &[
                        &c.workflow,
                        &c.delivery_id,
                        &c.claim_id,
                        &c.now_ms,
                        &c.expires_at_ms,
                        &c.stale_before_ms,
                    ],
                )
                .await?;
            Ok(Out::Flag(n == 1))
        }
        Write::Finish {
            workflow,
            delivery_id,
            claim_id,
            outcome_json,
        } => {
            let n = conn
                .execute(
                    "UPDATE _smithers_webhook_deliveries SET outcome_json = $4
                     WHERE workflow = $1 AND delivery_id = $2 AND claim_id = $3",
                    &[workflow, delivery_id, claim_id, outcome_json],
                )
                .await?;
            Ok(Out::Flag(n == 1))
        }
        Write::Release {
            workflow,
            delivery_id,
            claim_id,
        } => {
            let n = conn
                .execute(
                    "DELETE FROM _smithers_webhook_deliveries
                     WHERE workflow = $1 AND delivery_id = $2 AND claim_id = $3",
                    &[workflow, delivery_id, claim_id],
                )
                .await?;
            Ok(Out::Flag(n == 1))
        }
        Write::Prune { now_ms } => {
            let n = conn
                .execute(
                    "DELETE FROM _smithers_webhook_deliveries WHERE expires_at_ms <= $1",
                    &[now_ms],
                )
                .await?;
            Ok(Out::Count(n))
        }
    }
}

pub(crate) async fn get(
    conn: &mut Conn,
    workflow: &str,
    delivery_id: &str,
) -> Result<Option<WebhookDeliveryRow>, DbErr> {
    let Some(row) = conn
        .query_opt(
            "SELECT workflow, delivery_id, claim_id, received_at_ms, expires_at_ms, outcome_json
             FROM _smithers_webhook_deliveries WHERE workflow = $1 AND delivery_id = $2",
            &[&workflow, &delivery_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let c = Cols::new(
        &row,
        "_smithers_webhook_deliveries",
        &["workflow", "delivery_id"],
    );
    Ok(Some(WebhookDeliveryRow {
        workflow: c.get("workflow")?,
        delivery_id: c.get("delivery_id")?,
        claim_id: c.get("claim_id")?,
        received_at_ms: c.get("received_at_ms")?,
        expires_at_ms: c.get("expires_at_ms")?,
        outcome_json: c.get("outcome_json")?,
    }))
}
