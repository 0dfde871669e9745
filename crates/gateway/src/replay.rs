//! Replay on reconnect (`connect.params.afterSeq`): the events of a run a client missed, read
//! from the durable log page by page and queued only as fast as the client reads them.
//!
//! While a run is replayed on a connection its live broadcasts wait at a *gate* (counted
//! against the connection's outbound bound) and follow the replayed events; a live event the
//! replay already sent is not sent again. So a client sees each run's events once, in
//! `eventSeq` order, whether they came from the log or live.

use crate::error::RpcError;
use crate::gateway::{ConnShared, Gateway};
use crate::outbound::Outbound;
use crate::replay_gate::Gate;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Replay sends at most this many missed events per run; it then sends `replay.truncated`
/// and the connection gets no more events of that run until the client reconnects with the
/// `lastEventSeq` it names.
pub const REPLAY_WINDOW: usize = 1000;
/// Log rows read at once.
pub const PAGE: usize = 100;
/// Runs one `afterSeq` may name.
pub const MAX_RUNS: usize = 1000;

/// `connect.params.afterSeq`: `{runId: last eventSeq seen}` (an addition to upstream).
pub fn after_seq(params: &Value) -> Result<Vec<(String, i64)>, RpcError> {
    let bad = || {
        RpcError::new(
            "INVALID_INPUT",
            "afterSeq must map run ids to the last eventSeq received (integers >= -1).",
        )
    };
    match params.get("afterSeq") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => {
            if m.len() > MAX_RUNS {
                return Err(RpcError::new(
                    "INVALID_INPUT",
                    format!("afterSeq may name at most {MAX_RUNS} runs."),
                ));
            }
            m.iter()
                .map(|(k, v)| match v.as_i64() {
                    Some(n) if n >= -1 => Ok((k.clone(), n)),
                    _ => Err(bad()),
                })
                .collect()
        }
        Some(_) => Err(bad()),
    }
}

/// Puts a gate on every run of `afterSeq` the connection may see (its `subscribe` filter), so
/// live events of those runs wait for the replay [`run`] then sends. Called by `connect` before
/// the connection starts receiving broadcasts (a later `connect` replaces the gates).
pub fn open_gates(conn: &ConnShared, runs: Vec<(String, i64)>) {
    let Ok(mut view) = conn.view.write() else {
        return;
    };
    let mut gates = HashMap::new();
    for (run, after) in runs {
        if view.wants(Some(&run)) {
            let held = Mutex::new(Vec::new());
            gates.insert(run, Gate::Replaying { after, held });
        }
    }
    view.gates = gates;
}

/// Sends a reconnecting client the events it missed (the runs [`open_gates`] let through),
/// oldest first, one run after the other, then opens each run's gate.
pub async fn run(gw: &Arc<Gateway>, conn: &Arc<ConnShared>) {
    let mut runs: Vec<(String, i64)> = match conn.view.read() {
        Ok(view) => view
            .gates
            .iter()
            .filter_map(|(run, g)| match g {
                Gate::Replaying { after, .. } => Some((run.clone(), *after)),
                _ => None,
            })
            .collect(),
        Err(_) => return,
    };
    runs.sort();
    for (run_id, after) in runs {
        match replay_run(gw, conn, &run_id, after).await {
            Ok(through) => finish(conn, &run_id, Gate::Done(through)),
            Err(Stop::Closed) => return,
            Err(Stop::Truncated { last, why }) => {
                finish(conn, &run_id, Gate::Stopped);
                let mut payload = json!({"runId": run_id, "lastEventSeq": last});
                match why {
                    Why::Window => {
                        payload["reason"] = json!("window");
                        payload["message"] = json!(format!(
                            "replay sends at most {REPLAY_WINDOW} events per run; reconnect with afterSeq {{\"{run_id}\": {last}}} to continue"
                        ));
                    }
                    Why::Error(e) => {
                        payload["reason"] = json!("error");
                        payload["message"] = json!(format!(
                            "reading the event log failed; reconnect with afterSeq {{\"{run_id}\": {last}}} to retry"
                        ));
                        payload["error"] = e.to_json();
                    }
                }
                let out = Outbound::Event {
                    event: "replay.truncated",
                    payload_json: payload.to_string().into(),
                    state_version: gw.state_version(),
                };
                if conn.out.push_wait(out).await.is_err() {
                    return;
                }
            }
        }
    }
}

enum Why {
    Window,
    Error(RpcError),
}

enum Stop {
    /// The connection closed.
    Closed,
    /// Replay of the run ended after `eventSeq` `last`.
    Truncated { last: i64, why: Why },
}

/// Replays one run; returns the `eventSeq` it got to.
async fn replay_run(
    gw: &Arc<Gateway>,
    conn: &ConnShared,
    run_id: &str,
    after: i64,
) -> Result<i64, Stop> {
    let mut last = after;
    let mut sent = 0;
    loop {
        let from = (last >= 0).then_some(last);
        let rows = gw
            .store
            .list_events(run_id, from, PAGE)
            .await
            .map_err(|e| Stop::Truncated {
                last,
                why: Why::Error(e.into()),
            })?;
        let n = rows.len();
        for r in rows {
            let Ok(payload) = serde_json::from_str::<Value>(&r.payload_json) else {
                last = r.seq;
                continue;
            };
            if let Some((event, p)) =
                crate::broadcast::map_event(&r.event_type, run_id, r.seq, &payload)
            {
                if sent == REPLAY_WINDOW {
                    return Err(Stop::Truncated {
                        last,
                        why: Why::Window,
                    });
                }
                let out = Outbound::Event {
                    event,
                    payload_json: p.to_string().into(),
                    state_version: gw.state_version(),
                };
                conn.out.push_wait(out).await.map_err(|_| Stop::Closed)?;
                sent += 1;
            }
            last = r.seq;
        }
        if n < PAGE {
            return Ok(last);
        }
    }
}

/// Ends a run's replay: the live events held meanwhile that the replay did not send go out
/// now, in order, before any later one (the view lock is held for writing, so no broadcast
/// can pass them).
fn finish(conn: &ConnShared, run_id: &str, next: Gate) {
    let Ok(mut view) = conn.view.write() else {
        return;
    };
    let Some(gate) = view.gates.get_mut(run_id) else {
        return;
    };
    let through = match &next {
        Gate::Done(t) => Some(*t),
        _ => None,
    };
    let held = match std::mem::replace(gate, next) {
        Gate::Replaying { held, .. } => held.into_inner().unwrap_or_default(),
        _ => Vec::new(),
    };
    for (seq, out) in held {
        let send = match (through, seq) {
            (None, _) => false,
            (Some(t), Some(s)) => s > t,
            (Some(_), None) => true,
        };
        if send {
            let _ = conn.out.send_reserved(out);
        } else {
            conn.out.unreserve(out.cost());
        }
    }
}
