//! The cron scheduler loop: fires due schedules (once across every gateway sharing the
//! database) and broadcasts `cron.triggered`.

use crate::auth::Grant;
use crate::gateway::{Caller, Gateway};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Ticks every `clamp(heartbeat_ms, 1000, 15000)` ms.
pub async fn run(gw: Arc<Gateway>) {
    let every = gw.config.heartbeat_ms.clamp(1000, 15_000);
    let mut tick = tokio::time::interval(Duration::from_millis(every));
    loop {
        tick.tick().await;
        tick_once(&gw).await;
    }
}

/// One scheduler pass (also used by tests).
pub async fn tick_once(gw: &Arc<Gateway>) {
    let now = smithers_engine::now_ms();
    let starter = {
        let gw = gw.clone();
        move |key: &str, input: serde_json::Value| {
            let gw = gw.clone();
            let key = key.to_string();
            let fut: crate::cron::StartFuture = Box::pin(async move {
                let system = Grant {
                    role: "system".into(),
                    scopes: vec!["*".into()],
                    user_id: None,
                };
                let caller = Caller {
                    grant: &system,
                    conn: None,
                    answering: None,
                };
                gw.start_run(&key, input, None, &caller, Some("cron:gateway"))
                    .await
                    .map_err(|e| e.message)
            });
            fut
        }
    };
    for fired in crate::cron::tick(gw.store.as_ref(), now, &starter).await {
        gw.metrics.inc(
            "smithers_gateway_cron_triggers_total",
            &[("source", "scheduled")],
        );
        gw.broadcast(
            "cron.triggered",
            json!({"cronId": fired.cron_id, "workflow": fired.workflow, "runId": fired.run_id}),
        );
    }
}
