//! What a run went through: `frames.list`, `frames.get`, `attempts.list`, `attempts.get`,
//! `runs.events`.

use super::Call;
use super::params::{ensure_run, non_negative, run_id};
use crate::bounds;
use crate::error::RpcError;
use serde_json::Value;

pub async fn frames_list(c: &Call<'_>) -> Result<Value, RpcError> {
    let (gw, p) = (c.gw, &c.params);
    let id = run_id(p, "runId", "runId is required")?;
    ensure_run(gw, id).await?;
    let limit = bounds::positive_int(p.get("limit"), "limit")?
        .unwrap_or(50)
        .min(10_000) as usize;
    let after = non_negative(p.get("afterFrameNo"), "afterFrameNo")?.unwrap_or(0);
    let rows = gw.store.list_frames(id, after, limit).await?;
    // an addition: what each frame changed (trees hold no node states; snapshots do)
    let nos: Vec<i64> = rows.iter().map(|r| r.frame_no).collect();
    let mut changes =
        smithers_engine::frames::changes::for_frames(gw.store.as_ref(), id, &nos).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if let Some(f) =
            smithers_engine::frames::read_frame(gw.store.as_ref(), id, r.frame_no).await?
        {
            let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                let c = changes.remove(&r.frame_no);
                m.insert(
                    "nodeChanges".into(),
                    c.and_then(|c| serde_json::to_value(c).ok())
                        .unwrap_or(Value::Null),
                );
            }
            out.push(v);
        }
    }
    Ok(Value::Array(out))
}

pub async fn frames_get(c: &Call<'_>) -> Result<Value, RpcError> {
    let (gw, p) = (c.gw, &c.params);
    let id = run_id(p, "runId", "runId is required")?;
    ensure_run(gw, id).await?;
    let no = match non_negative(p.get("frameNo"), "frameNo")? {
        Some(n) => n,
        None => gw.store.last_frame_no(id).await?,
    };
    let f = smithers_engine::frames::read_frame(gw.store.as_ref(), id, no)
        .await?
        .ok_or_else(|| RpcError::new("NOT_FOUND", "Frame not found"))?;
    Ok(serde_json::to_value(f).unwrap_or(Value::Null))
}

pub async fn attempts_list(c: &Call<'_>) -> Result<Value, RpcError> {
    let (gw, p) = (c.gw, &c.params);
    let id = run_id(p, "runId", "runId is required")?;
    ensure_run(gw, id).await?;
    let rows = match p
        .get("nodeId")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        Some(node) => {
            let it = p
                .get("iteration")
                .and_then(Value::as_f64)
                .filter(|f| f.is_finite())
                .unwrap_or(0.0) as i64;
            gw.store.list_node_attempts(id, node, it).await?
        }
        None => gw.store.list_attempts(id).await?,
    };
    Ok(serde_json::to_value(rows).unwrap_or(Value::Null))
}

pub async fn attempts_get(c: &Call<'_>) -> Result<Value, RpcError> {
    let (gw, p) = (c.gw, &c.params);
    let (Some(id), Some(node), Some(it), Some(at)) = (
        p.get("runId").and_then(Value::as_str),
        p.get("nodeId").and_then(Value::as_str),
        p.get("iteration")
            .and_then(Value::as_f64)
            .filter(|f| f.is_finite()),
        p.get("attempt")
            .and_then(Value::as_f64)
            .filter(|f| f.is_finite()),
    ) else {
        return Err(RpcError::new(
            "INVALID_REQUEST",
            "runId, nodeId, iteration, and attempt are required",
        ));
    };
    super::params::check_run_id("runId", id)?;
    ensure_run(gw, id).await?;
    let a = gw
        .store
        .get_attempt(id, node, it as i64, at as i64)
        .await?
        .ok_or_else(|| RpcError::new("NOT_FOUND", "Attempt not found"))?;
    Ok(serde_json::to_value(a).unwrap_or(Value::Null))
}

/// `runs.events` (an addition): a page of the run's durable event log as protocol events (the
/// payloads WebSocket clients receive, with `eventSeq`), for reading a run's history or its
/// task output after the fact. Log entries that are not protocol events are skipped; `lastSeq`
/// is where the next page starts (pass it back as `afterSeq`) and `more` says whether there is
/// one. `nodeId` keeps the events of one node.
pub async fn events(c: &Call<'_>) -> Result<Value, RpcError> {
    let (gw, p) = (c.gw, &c.params);
    let id = run_id(p, "runId", "runId is required")?;
    ensure_run(gw, id).await?;
    let after = match p.get("afterSeq") {
        Some(v) if v.as_i64() == Some(-1) => None,
        v => non_negative(v, "afterSeq")?,
    };
    let limit = bounds::positive_int(p.get("limit"), "limit")?
        .unwrap_or(1000)
        .min(10_000) as usize;
    let node = p
        .get("nodeId")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    let rows = gw.store.list_events(id, after, limit).await?;
    let last = rows.last().map(|r| r.seq).or(after).unwrap_or(-1);
    let mut events = Vec::with_capacity(rows.len());
    for r in &rows {
        let payload: Value = serde_json::from_str(&r.payload_json).unwrap_or(Value::Null);
        if node.is_some() && payload.get("nodeId").and_then(Value::as_str) != node {
            continue;
        }
        if let Some((event, mut payload)) =
            crate::broadcast::map_event(&r.event_type, id, r.seq, &payload)
        {
            payload["timestampMs"] = serde_json::json!(r.timestamp_ms);
            events.push(serde_json::json!({"event": event, "payload": payload}));
        }
    }
    Ok(serde_json::json!({"events": events, "lastSeq": last, "more": rows.len() == limit}))
}
