//! Webhook replay protection: each verified delivery's id is claimed in the database before
//! anything acts on it, and remembered for `webhook_dedupe_secs`; a repeat inside that window
//! is answered as a duplicate instead of signalling or starting a run again.
//!
//! The id is the value of the workflow's `delivery_header` (GitHub's `X-GitHub-Delivery` by
//! default) or, without one, the SHA-256 of the body. Ids are claimed only after the signature
//! verified, so nobody without the secret can pre-claim an id and block a real delivery.

use super::config::WebhookConfig;
use crate::error::RpcError;
use crate::gateway::Gateway;
use axum::http::HeaderMap;
use serde_json::Value;
use sha2_010::{Digest, Sha256};
use smithers_store::DeliveryClaim;

/// Longest delivery id taken from a header.
pub const MAX_DELIVERY_ID_LEN: usize = 256;

/// A claim still without an outcome after this long is abandoned (the gateway that took it
/// stopped while acting), and a repeat of the delivery may act.
const ABANDONED_AFTER_MS: i64 = 5 * 60 * 1000;

/// The delivery's id: the `delivery_header` value when present and not blank (at most
/// [`MAX_DELIVERY_ID_LEN`] visible ASCII characters), else `sha256:<hex of the body>`.
pub(super) fn delivery_id(
    cfg: &WebhookConfig,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<String, RpcError> {
    if let Some(v) = headers.get(cfg.delivery_header.as_str()) {
        let bad = || {
            RpcError::new(
                "INVALID_REQUEST",
                format!(
                    "Webhook header `{}` must be at most {MAX_DELIVERY_ID_LEN} visible ASCII characters.",
                    cfg.delivery_header
                ),
            )
        };
        let id = v.to_str().map_err(|_| bad())?.trim();
        if id.len() > MAX_DELIVERY_ID_LEN {
            return Err(bad());
        }
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(body))))
}

/// The delivery id as the request states it, for log lines about refused requests (which
/// are never claimed).
pub(super) fn stated_id<'h>(
    cfg: Option<&WebhookConfig>,
    headers: &'h HeaderMap,
) -> Option<&'h str> {
    let name = cfg.map_or(super::DEFAULT_DELIVERY_HEADER, |c| {
        c.delivery_header.as_str()
    });
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// What claiming a delivery id found.
pub(super) enum Claimed {
    /// Dedupe is off (`webhook_dedupe_secs = 0`).
    Off,
    /// This request holds the delivery: act, then [`Held::finish`] or [`Held::release`].
    Held(Held),
    /// Seen inside the window: `outcome` is what the first delivery answered, `None` while it
    /// is still being acted on.
    Duplicate { outcome: Option<Value> },
}

/// A claimed delivery.
pub(super) struct Held {
    workflow: String,
    delivery_id: String,
    claim_id: String,
}

/// Claims `delivery_id` for workflow `key`. Fails (and nothing acts) when the database cannot
/// say whether the delivery was seen.
pub(super) async fn claim(gw: &Gateway, key: &str, delivery_id: &str) -> Result<Claimed, RpcError> {
    let window_secs = gw.config.limits.webhook_dedupe_secs;
    if window_secs == 0 {
        return Ok(Claimed::Off);
    }
    let window_ms = i64::try_from(window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    // a repeat can find the row gone (released by a failed first attempt, or pruned) between
    // the refused claim and the read: then claim again
    for _ in 0..3 {
        let now = smithers_engine::now_ms();
        let c = DeliveryClaim {
            workflow: key.to_string(),
            delivery_id: delivery_id.to_string(),
            claim_id: uuid::Uuid::new_v4().to_string(),
            now_ms: now,
            expires_at_ms: now.saturating_add(window_ms),
            stale_before_ms: now.saturating_sub(ABANDONED_AFTER_MS),
        };
        if gw.store.claim_webhook_delivery(&c).await? {
            return Ok(Claimed::Held(Held {
                workflow: c.workflow,
                delivery_id: c.delivery_id,
                claim_id: c.claim_id,
            }));
        }
        if let Some(row) = gw.store.get_webhook_delivery(key, delivery_id).await? {
            let outcome = row
                .outcome_json
                .as_deref()
                .and_then(|o| serde_json::from_str(o).ok());
            return Ok(Claimed::Duplicate { outcome });
        }
    }
    Ok(Claimed::Duplicate { outcome: None })
}

impl Held {
    /// Records what the delivery did, so repeats are answered with it. A failure here is only
    /// logged: the delivery stays claimed (repeats are answered "in progress" until the claim
    /// is abandoned) rather than acted on twice.
    pub(super) async fn finish(self, gw: &Gateway, outcome: &Value) {
        let r = gw
            .store
            .finish_webhook_delivery(
                &self.workflow,
                &self.delivery_id,
                &self.claim_id,
                &outcome.to_string(),
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(
                workflow = %self.workflow,
                delivery_id = %self.delivery_id,
                error = %e,
                "could not record a webhook delivery's outcome"
            );
        }
    }

    /// Forgets the claim after the action failed, so the sender's retry can act.
    pub(super) async fn release(self, gw: &Gateway) {
        let r = gw
            .store
            .release_webhook_delivery(&self.workflow, &self.delivery_id, &self.claim_id)
            .await;
        if let Err(e) = r {
            tracing::warn!(
                workflow = %self.workflow,
                delivery_id = %self.delivery_id,
                error = %e,
                "could not release a failed webhook delivery; a retry is refused as in progress for up to 5 minutes"
            );
        }
    }
}

/// Forgets delivery ids whose window has passed (called from the gateway's periodic loop).
pub async fn prune_expired(gw: &Gateway) {
    match gw
        .store
        .prune_webhook_deliveries(smithers_engine::now_ms())
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::debug!(pruned = n, "forgot expired webhook delivery ids"),
        Err(e) => tracing::warn!(error = %e, "could not prune expired webhook delivery ids"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn cfg() -> WebhookConfig {
        match WebhookConfig::from_toml(toml::Value::Table(
            [("secret".to_string(), toml::Value::String("k".into()))]
                .into_iter()
                .collect(),
        )) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn id_from_header_or_body_hash() {
        let c = cfg();
        let mut h = HeaderMap::new();
        // sha256("") is well known
        assert_eq!(
            delivery_id(&c, &h, b"").ok().as_deref(),
            Some("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        h.insert("x-github-delivery", HeaderValue::from_static("  "));
        assert!(
            delivery_id(&c, &h, b"x")
                .ok()
                .is_some_and(|id| id.starts_with("sha256:")),
            "blank header: body hash"
        );
        h.insert("x-github-delivery", HeaderValue::from_static(" abc-1 "));
        assert_eq!(delivery_id(&c, &h, b"x").ok().as_deref(), Some("abc-1"));
        let at_limit = "a".repeat(MAX_DELIVERY_ID_LEN);
        h.insert(
            "x-github-delivery",
            HeaderValue::from_str(&at_limit).unwrap_or(HeaderValue::from_static("")),
        );
        assert_eq!(delivery_id(&c, &h, b"x").ok(), Some(at_limit.clone()));
        let over = format!("{at_limit}a");
        h.insert(
            "x-github-delivery",
            HeaderValue::from_str(&over).unwrap_or(HeaderValue::from_static("")),
        );
        assert_eq!(
            delivery_id(&c, &h, b"x").err().map(|e| e.code),
            Some("INVALID_REQUEST".to_string())
        );
        h.insert(
            "x-github-delivery",
            HeaderValue::from_bytes(b"\xff\xfe").unwrap_or(HeaderValue::from_static("")),
        );
        assert!(delivery_id(&c, &h, b"x").is_err(), "not visible ASCII");
    }
}
