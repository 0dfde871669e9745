//! The `POST /webhooks/<key>` handler, in the order of gateway-protocol §3: the key and its
//! configuration, the body (under the body timeout and the unverified-bytes budget), the
//! signature, the payload, the delivery id (a repeat is answered as a duplicate), the action.

use super::config::WebhookConfig;
use super::dedupe::{self, Claimed};
use super::log::Level;
use super::{deliver, paths, signature};
use crate::body::{self, BodyError};
use crate::error::RpcError;
use crate::gateway::Gateway;
use crate::http::json_response;
use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};
use std::sync::Arc;

/// The `workflow` metric label of requests to keys that are not served: one series for all of
/// them, however many keys are tried.
pub const UNKNOWN_WORKFLOW_LABEL: &str = "unknown";

/// One request, and what its metrics and log lines say about it.
struct Request<'a> {
    gw: &'a Gateway,
    /// The served key, or [`UNKNOWN_WORKFLOW_LABEL`].
    label: &'a str,
    cfg: Option<&'a WebhookConfig>,
    headers: &'a HeaderMap,
}

impl Request<'_> {
    fn sent(&self, outcome: &str) {
        self.gw.metrics.inc(
            "smithers_gateway_messages_sent_total",
            &[
                ("frameType", "response"),
                ("outcome", outcome),
                ("route", "webhook"),
                ("transport", "http"),
                ("workflow", self.label),
            ],
        );
    }

    fn reject(&self, reason: &str, e: &RpcError) -> Response {
        let gw = self.gw;
        gw.metrics.inc(
            "smithers_gateway_webhooks_rejected_total",
            &[("reason", reason), ("workflow", self.label)],
        );
        gw.metrics.inc(
            "smithers_gateway_errors_total",
            &[
                ("code", &e.code),
                ("kind", "webhook"),
                ("workflow", self.label),
            ],
        );
        self.sent("error");
        let level = match reason {
            "busy" | "server_error" => Level::Warn,
            _ => Level::Info,
        };
        gw.webhooks.log.rejected(
            level,
            self.label,
            reason,
            &e.code,
            dedupe::stated_id(self.cfg, self.headers),
        );
        json_response(
            e.status(),
            json!({"ok": false, "error": e.to_json()}).to_string(),
        )
    }

    /// A verified delivery seen inside the dedupe window: `200` with the first delivery's
    /// answer plus `"duplicate": true`, or `409 DELIVERY_IN_PROGRESS` while the first is still
    /// being acted on (its outcome is not known yet, so the sender should retry).
    fn duplicate(&self, delivery_id: &str, outcome: Option<Value>) -> Response {
        let Some(outcome) = outcome else {
            self.gw
                .webhooks
                .log
                .duplicate(self.label, delivery_id, true);
            return self.reject(
                "in_progress",
                &RpcError::new(
                    "DELIVERY_IN_PROGRESS",
                    format!(
                        "Webhook delivery {delivery_id} is already being processed; retry later."
                    ),
                ),
            );
        };
        self.gw
            .webhooks
            .log
            .duplicate(self.label, delivery_id, false);
        let mut body = match outcome {
            Value::Object(o) => o,
            _ => serde_json::Map::new(),
        };
        body.insert("ok".into(), json!(true));
        body.insert("workflow".into(), json!(self.label));
        body.insert("verified".into(), json!(true));
        body.insert("duplicate".into(), json!(true));
        body.insert("deliveryId".into(), json!(delivery_id));
        self.sent("duplicate");
        json_response(200, Value::Object(body).to_string())
    }
}

/// Handles one delivery to `key`.
pub async fn handle(gw: Arc<Gateway>, key: &str, headers: HeaderMap, body: Body) -> Response {
    let head_at = std::time::Instant::now();
    let served = gw.workflows.get(key);
    let r = Request {
        gw: &gw,
        label: if served.is_some() {
            key
        } else {
            UNKNOWN_WORKFLOW_LABEL
        },
        cfg: served.and_then(|w| w.webhook.as_ref()),
        headers: &headers,
    };
    gw.metrics.inc(
        "smithers_gateway_messages_received_total",
        &[
            ("frameType", "webhook"),
            ("transport", "http"),
            ("workflow", r.label),
        ],
    );
    gw.metrics.inc(
        "smithers_gateway_webhooks_received_total",
        &[("workflow", r.label)],
    );
    if served.is_none() {
        return r.reject(
            "workflow_not_found",
            &RpcError::new("NOT_FOUND", format!("Unknown workflow: {key}")),
        );
    }
    let Some(cfg) = r.cfg else {
        return r.reject(
            "not_configured",
            &RpcError::new(
                "NOT_FOUND",
                format!("Webhook not configured for workflow: {key}"),
            ),
        );
    };
    if cfg.secret.trim().is_empty() {
        return r.reject(
            "not_configured",
            &RpcError::new("SERVER_ERROR", "Webhook secret is not configured"),
        );
    }
    if cfg.signal.is_none() && !cfg.run_enabled {
        return r.reject(
            "misconfigured",
            &RpcError::new(
                "INVALID_REQUEST",
                "Webhook config must enable signal delivery or run creation",
            ),
        );
    }
    // nobody has vouched for these bytes yet: they come out of the unverified budget
    let limits =
        body::Limits::for_request(&gw.config, head_at).with_budget(&gw.webhooks.unverified);
    let read = match body::read(&headers, body, limits).await {
        Ok(read) => read,
        Err(e) => {
            let reason = match e {
                BodyError::Timeout { .. } => "body_timeout",
                BodyError::Busy => "busy",
                BodyError::TooLarge { .. } | BodyError::Broken => "invalid_payload",
            };
            return e.respond(r.reject(reason, &e.to_rpc()));
        }
    };
    let header = headers
        .get(cfg.signature_header.as_str())
        .and_then(|v| v.to_str().ok());
    let verified = signature::verify_signature(cfg, header, &read.bytes);
    // checked, one way or the other: the bytes no longer count as unverified
    let bytes = read.bytes;
    drop(read.reservation);
    if !verified {
        return r.reject(
            "invalid_signature",
            &RpcError::new("UNAUTHORIZED", "Webhook signature verification failed"),
        );
    }
    gw.metrics.inc(
        "smithers_gateway_webhooks_verified_total",
        &[("workflow", key)],
    );
    let Some(payload) = paths::parse_payload(&bytes) else {
        return r.reject(
            "invalid_payload",
            &RpcError::new("INVALID_INPUT", "Webhook payload must be valid JSON."),
        );
    };
    let delivery_id = match dedupe::delivery_id(cfg, &headers, &bytes) {
        Ok(id) => id,
        Err(e) => return r.reject("invalid_payload", &e),
    };
    drop(bytes);
    // claim, act, record: in a task of its own, so that a client hanging up cannot leave a
    // delivery claimed but neither acted on nor released
    let task = tokio::spawn(claim_and_act(
        gw.clone(),
        key.to_string(),
        delivery_id.clone(),
        payload,
    ));
    match task.await {
        Ok(Acted::Done(body)) => {
            r.sent("ok");
            json_response(200, body.to_string())
        }
        Ok(Acted::Duplicate(outcome)) => r.duplicate(&delivery_id, outcome),
        Ok(Acted::Failed(e)) => {
            let reason = if e.status() == 500 {
                "server_error"
            } else {
                "invalid_payload"
            };
            r.reject(reason, &e)
        }
        Err(e) => r.reject(
            "server_error",
            &RpcError::new("SERVER_ERROR", format!("webhook delivery task failed: {e}")),
        ),
    }
}

enum Acted {
    Done(Value),
    Duplicate(Option<Value>),
    Failed(RpcError),
}

async fn claim_and_act(
    gw: Arc<Gateway>,
    key: String,
    delivery_id: String,
    payload: Value,
) -> Acted {
    let held = match dedupe::claim(&gw, &key, &delivery_id).await {
        Ok(Claimed::Off) => None,
        Ok(Claimed::Held(h)) => Some(h),
        Ok(Claimed::Duplicate { outcome }) => return Acted::Duplicate(outcome),
        Err(e) => return Acted::Failed(e),
    };
    match deliver::deliver(&gw, &key, &payload).await {
        Ok(body) => {
            if let Some(h) = held {
                h.finish(&gw, &body).await;
            }
            Acted::Done(body)
        }
        Err(e) => {
            if let Some(h) = held {
                h.release(&gw).await;
            }
            Acted::Failed(e)
        }
    }
}
