//! What each frame changed: the nodes whose state differs from the frame before it.
//!
//! Frame trees hold the rendered workflow but not node states, so the changes come from the
//! frames' snapshots (one per frame, with every node's state). `smithers frames` and the
//! gateway's `frames.list` show them so that a user can pick a frame to fork or rewind from.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use smithers_store::{SnapshotRow, Store};
use std::collections::{BTreeMap, BTreeSet};

/// A node whose state differs between a frame and the one before it. `from` is `None` for a
/// node that first appears in this frame, `to` is `None` for one that is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeChange {
    pub node_id: String,
    pub iteration: i64,
    pub from: Option<String>,
    pub to: Option<String>,
}

impl NodeChange {
    /// A change of `node_id` at `iteration` from one state to another (`None`: absent).
    pub fn new(node_id: &str, iteration: i64, from: Option<&str>, to: Option<&str>) -> Self {
        NodeChange {
            node_id: node_id.to_string(),
            iteration,
            from: from.map(str::to_string),
            to: to.map(str::to_string),
        }
    }
}

fn state_of(node: &Value) -> Option<String> {
    node.get("state")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// `nodeId::iteration` keys back into their parts (the row's own fields win when present).
fn id_of(key: &str, node: Option<&Value>) -> (String, i64) {
    let (k_id, k_it) = match key.rsplit_once("::") {
        Some((id, it)) => (id, it.parse().unwrap_or(0)),
        None => (key, 0),
    };
    let id = node
        .and_then(|n| n.get("nodeId"))
        .and_then(Value::as_str)
        .unwrap_or(k_id);
    let it = node
        .and_then(|n| n.get("iteration"))
        .and_then(Value::as_i64)
        .unwrap_or(k_it);
    (id.to_string(), it)
}

/// The node state changes from snapshot node map `prev` to `next` (maps keyed
/// `nodeId::iteration` with `{nodeId, iteration, state, …}` rows), ordered by node key.
pub fn between(prev: &Map<String, Value>, next: &Map<String, Value>) -> Vec<NodeChange> {
    let keys: BTreeSet<&String> = prev.keys().chain(next.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        let (a, b) = (prev.get(k), next.get(k));
        let (from, to) = (a.and_then(state_of), b.and_then(state_of));
        if from == to && a.is_some() == b.is_some() {
            continue;
        }
        let (node_id, iteration) = id_of(k, b.or(a));
        out.push(NodeChange {
            node_id,
            iteration,
            from,
            to,
        });
    }
    out
}

/// Applies one stored snapshot row's `nodes_json` to the running node map: a keyframe
/// replaces it, a delta sets changed nodes (`null` removes one). `None` when the row is
/// unreadable or a delta has nothing to apply to.
fn apply(cur: Option<Map<String, Value>>, row: &SnapshotRow) -> Option<Map<String, Value>> {
    let Ok(Value::Object(nodes)) = serde_json::from_str::<Value>(&row.nodes_json) else {
        return None;
    };
    if row.encoding != "delta" {
        return Some(nodes);
    }
    let mut cur = cur?;
    for (k, v) in nodes {
        if v.is_null() {
            cur.remove(&k);
        } else {
            cur.insert(k, v);
        }
    }
    Some(cur)
}

/// For each of `frame_nos` (frames of `run_id`), the changes against the frame before it
/// (frame 1 against an empty run). A frame whose snapshot, or its predecessor's, is missing
/// or unreadable has no entry. Reads the snapshots once, from the keyframe before the earliest
/// frame asked for.
pub async fn for_frames(
    store: &dyn Store,
    run_id: &str,
    frame_nos: &[i64],
) -> smithers_core::Result<BTreeMap<i64, Vec<NodeChange>>> {
    let mut out = BTreeMap::new();
    let (Some(&lo), Some(&hi)) = (frame_nos.iter().min(), frame_nos.iter().max()) else {
        return Ok(out);
    };
    let wanted: BTreeSet<i64> = frame_nos.iter().copied().collect();
    let rows = store
        .snapshots_from_keyframe(run_id, (lo - 1).max(0), hi)
        .await?;
    // the node map at frame `prev_no`, when it could be rebuilt
    let mut prev: Option<(i64, Map<String, Value>)> = None;
    for row in &rows {
        let contiguous = prev
            .take()
            .filter(|(no, _)| *no == row.frame_no - 1)
            .map(|(_, m)| m);
        // frame 1 has an empty run before it
        let before = contiguous
            .clone()
            .or_else(|| (row.frame_no <= 1).then(Map::new));
        let next = apply(contiguous, row);
        if let (Some(a), Some(b)) = (&before, &next)
            && wanted.contains(&row.frame_no)
        {
            out.insert(row.frame_no, between(a, b));
        }
        prev = next.map(|m| (row.frame_no, m));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nodes(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn between_lists_new_changed_and_removed_nodes_only() {
        let a = nodes(json!({
            "build::0": {"nodeId": "build", "iteration": 0, "state": "in-progress", "lastAttempt": 1},
            "lint::0": {"nodeId": "lint", "iteration": 0, "state": "pending"},
            "gone::0": {"nodeId": "gone", "iteration": 0, "state": "pending"},
        }));
        let b = nodes(json!({
            // lastAttempt changes alone are not state changes
            "build::0": {"nodeId": "build", "iteration": 0, "state": "finished", "lastAttempt": 2},
            "lint::0": {"nodeId": "lint", "iteration": 0, "state": "pending", "lastAttempt": 1},
            "step::3": {"nodeId": "step", "iteration": 3, "state": "in-progress"},
        }));
        assert_eq!(
            between(&a, &b),
            vec![
                NodeChange::new("build", 0, Some("in-progress"), Some("finished")),
                NodeChange::new("gone", 0, Some("pending"), None),
                NodeChange::new("step", 3, None, Some("in-progress")),
            ]
        );
        assert!(between(&b, &b).is_empty());
        // keys alone still name the node
        let c = nodes(json!({"odd::2": {"state": "failed"}}));
        assert_eq!(
            between(&Map::new(), &c),
            vec![NodeChange::new("odd", 2, None, Some("failed"))]
        );
    }

    fn row(frame_no: i64, encoding: &str, nodes: Value) -> SnapshotRow {
        SnapshotRow {
            run_id: "r".into(),
            frame_no,
            encoding: encoding.into(),
            nodes_json: nodes.to_string(),
            outputs_json: "{}".into(),
            ralph_json: "{}".into(),
            input_json: "null".into(),
            vcs_pointer: None,
            workflow_hash: None,
            content_hash: String::new(),
            created_at_ms: 0,
        }
    }

    #[test]
    fn deltas_are_applied_in_order() {
        let rows = [
            row(1, "keyframe", json!({"a::0": {"state": "pending"}})),
            row(2, "delta", json!({"a::0": {"state": "finished"}})),
            row(3, "delta", json!({"a::0": null})),
        ];
        let mut cur = None;
        let mut seen = Vec::new();
        for r in &rows {
            cur = apply(cur, r);
            seen.push(cur.clone().map(|m| m.len()));
        }
        assert_eq!(seen, vec![Some(1), Some(1), Some(0)]);
        // a delta with nothing before it cannot be applied
        assert_eq!(apply(None, &rows[1]), None);
        assert_eq!(apply(None, &row(4, "keyframe", json!("not a map"))), None);
    }
}
