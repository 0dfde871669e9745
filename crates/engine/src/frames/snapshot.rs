//! Snapshots: the run's durable state (nodes, outputs, loops, input) at each frame.
//!
//! The state is kept in memory and updated as the run changes; each frame stores only what
//! changed since the previous frame, and now and then a full keyframe. A keyframe is written
//! once at least `KEYFRAME_INTERVAL` frames and at least as many delta bytes as the state
//! itself has been stored since the last one. A state that keeps growing (a loop keeps every
//! iteration's nodes and outputs) then costs storage in proportion to what changed, not to
//! frames × state; rebuilding any frame still reads at most the state and about as much again
//! in deltas. The content hash is a sum of per-entry digests, so it is updated in O(changes) and
//! still depends only on the content, not on the history that produced it.

use super::KEYFRAME_INTERVAL;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use smithers_store::SnapshotRow;
use std::collections::{BTreeMap, BTreeSet};

/// One part of the state. Entries keep their JSON text (computed once, when they change), so
/// a keyframe is a concatenation, not a re-serialization.
#[derive(Default)]
struct Section {
    entries: BTreeMap<String, (String, [u64; 4])>,
    changed: BTreeSet<String>,
}

#[derive(Clone, Copy)]
enum Which {
    Nodes,
    Outputs,
    Ralph,
}

/// Incrementally maintained snapshot state of one run.
#[derive(Default)]
pub struct SnapshotState {
    nodes: Section,
    outputs: Section,
    ralph: Section,
    input: Value,
    input_digest: [u64; 4],
    input_len: usize,
    sum: [u64; 4],
    /// Bytes of a keyframe of the current state (keys and JSON texts).
    size: usize,
    /// Delta rows and their bytes stored since the last keyframe.
    deltas_since_key: i64,
    delta_bytes_since_key: usize,
}

fn digest(section: &str, key: &str, text: &str) -> [u64; 4] {
    let mut h = Sha256::new();
    h.update(section.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    let d = h.finalize();
    let mut out = [0u64; 4];
    for (i, chunk) in d.chunks(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        out[i] = u64::from_le_bytes(b);
    }
    out
}

fn add(a: &mut [u64; 4], b: &[u64; 4]) {
    for i in 0..4 {
        a[i] = a[i].wrapping_add(b[i]);
    }
}

fn sub(a: &mut [u64; 4], b: &[u64; 4]) {
    for i in 0..4 {
        a[i] = a[i].wrapping_sub(b[i]);
    }
}

impl SnapshotState {
    pub fn new(input: Value) -> Self {
        let mut s = SnapshotState::default();
        s.set_input(input);
        s
    }

    fn set_input(&mut self, input: Value) {
        let text = smithers_core::json::text(&input);
        sub(&mut self.sum, &self.input_digest);
        self.input_digest = digest("input", "", &text);
        add(&mut self.sum, &self.input_digest);
        self.size = self.size - self.input_len + text.len();
        self.input_len = text.len();
        self.input = input;
    }

    fn put(&mut self, which: Which, key: String, value: Value) {
        let text = smithers_core::json::text(&value);
        let mut sum = self.sum;
        let (name, sec) = self.section(which);
        let mut size_change = key.len() + text.len();
        let mut freed = 0;
        if let Some((old, d)) = sec.entries.get(&key) {
            if *old == text {
                return;
            }
            sub(&mut sum, d);
            size_change = text.len();
            freed = old.len();
        }
        let d = digest(name, &key, &text);
        add(&mut sum, &d);
        sec.changed.insert(key.clone());
        sec.entries.insert(key, (text, d));
        self.sum = sum;
        self.size = self.size + size_change - freed;
    }

    fn remove(&mut self, which: Which, key: &str) {
        let (_, sec) = self.section(which);
        if let Some((old, d)) = sec.entries.remove(key) {
            sec.changed.insert(key.to_string());
            sub(&mut self.sum, &d);
            self.size -= key.len() + old.len();
        }
    }

    fn section(&mut self, which: Which) -> (&'static str, &mut Section) {
        match which {
            Which::Nodes => ("nodes", &mut self.nodes),
            Which::Outputs => ("outputs", &mut self.outputs),
            Which::Ralph => ("ralph", &mut self.ralph),
        }
    }

    /// Records a node row (`{nodeId, iteration, state, lastAttempt, outputTable, label}`).
    pub fn set_node(&mut self, key: String, row: Value) {
        self.put(Which::Nodes, key, row);
    }

    pub fn remove_node(&mut self, key: &str) {
        self.remove(Which::Nodes, key);
    }

    /// Records an output payload for `nodeId::iteration`.
    pub fn set_output(&mut self, key: String, payload: Value) {
        self.put(Which::Outputs, key, payload);
    }

    pub fn remove_output(&mut self, key: &str) {
        self.remove(Which::Outputs, key);
    }

    /// Records a loop's state.
    pub fn set_loop(&mut self, id: String, iteration: i64, done: bool) {
        let v = json!({"ralphId": id, "iteration": iteration, "done": done});
        self.put(Which::Ralph, id, v);
    }

    /// The content hash of the current state.
    pub fn content_hash(&self) -> String {
        let mut b = Vec::with_capacity(32);
        for x in self.sum {
            b.extend_from_slice(&x.to_le_bytes());
        }
        hex::encode(b)
    }

    /// `{key: value, ...}` of all entries, or of the changed ones (removed ones as `null`).
    fn section_json(sec: &Section, only_changed: bool) -> String {
        let mut out = String::from("{");
        let mut push = |k: &str, v: &str| {
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(&smithers_core::json::text(&Value::String(k.to_string())));
            out.push(':');
            out.push_str(v);
        };
        if only_changed {
            for k in &sec.changed {
                push(
                    k,
                    sec.entries
                        .get(k)
                        .map(|(v, _)| v.as_str())
                        .unwrap_or("null"),
                );
            }
        } else {
            for (k, (v, _)) in &sec.entries {
                push(k, v);
            }
        }
        out.push('}');
        out
    }

    /// Builds the snapshot row for `frame_no` and clears the change sets.
    pub fn encode(
        &mut self,
        run_id: &str,
        frame_no: i64,
        workflow_hash: Option<String>,
        now_ms: i64,
    ) -> SnapshotRow {
        let key = frame_no <= 1
            || (self.deltas_since_key >= KEYFRAME_INTERVAL
                && self.delta_bytes_since_key >= self.size);
        let row = SnapshotRow {
            run_id: run_id.to_string(),
            frame_no,
            encoding: if key { "keyframe" } else { "delta" }.to_string(),
            nodes_json: Self::section_json(&self.nodes, !key),
            outputs_json: Self::section_json(&self.outputs, !key),
            ralph_json: Self::section_json(&self.ralph, !key),
            input_json: if key {
                smithers_core::json::text(&self.input)
            } else {
                "null".to_string()
            },
            vcs_pointer: None,
            workflow_hash,
            content_hash: self.content_hash(),
            created_at_ms: now_ms,
        };
        self.nodes.changed.clear();
        self.outputs.changed.clear();
        self.ralph.changed.clear();
        if key {
            self.deltas_since_key = 0;
            self.delta_bytes_since_key = 0;
        } else {
            self.deltas_since_key += 1;
            self.delta_bytes_since_key +=
                row.nodes_json.len() + row.outputs_json.len() + row.ralph_json.len();
        }
        row
    }
}

/// A snapshot rebuilt from a keyframe and the deltas after it.
#[derive(Debug, Clone, PartialEq)]
pub struct FullSnapshot {
    pub frame_no: i64,
    pub nodes: Map<String, Value>,
    pub outputs: Map<String, Value>,
    pub ralph: Map<String, Value>,
    pub input: Value,
    pub content_hash: String,
}

/// Rebuilds the full snapshot at the last row of `rows` (ascending frame order, starting at or
/// before a keyframe). Errors say what is wrong with the stored rows.
pub fn inflate(rows: &[SnapshotRow]) -> Result<FullSnapshot, String> {
    let start = rows
        .iter()
        .rposition(|r| r.encoding != "delta")
        .ok_or("no keyframe snapshot")?;
    let parse = |s: &str| serde_json::from_str::<Value>(s).map_err(|e| e.to_string());
    let obj = |v: Value| match v {
        Value::Object(m) => Ok(m),
        _ => Err("snapshot section is not an object".to_string()),
    };
    let first = &rows[start];
    let mut snap = FullSnapshot {
        frame_no: first.frame_no,
        nodes: obj(parse(&first.nodes_json)?)?,
        outputs: obj(parse(&first.outputs_json)?)?,
        ralph: obj(parse(&first.ralph_json)?)?,
        input: parse(&first.input_json)?,
        content_hash: first.content_hash.clone(),
    };
    for r in &rows[start + 1..] {
        for (target, text) in [
            (&mut snap.nodes, &r.nodes_json),
            (&mut snap.outputs, &r.outputs_json),
            (&mut snap.ralph, &r.ralph_json),
        ] {
            for (k, v) in obj(parse(text)?)? {
                if v.is_null() {
                    target.remove(&k);
                } else {
                    target.insert(k, v);
                }
            }
        }
        snap.frame_no = r.frame_no;
        snap.content_hash = r.content_hash.clone();
    }
    Ok(snap)
}

/// The snapshot of a run at a frame, rebuilt from the keyframe before it.
pub async fn at_frame(
    store: &dyn smithers_store::Store,
    run_id: &str,
    frame_no: i64,
) -> smithers_core::Result<FullSnapshot> {
    let rows = store
        .snapshots_from_keyframe(run_id, frame_no, frame_no)
        .await?;
    inflate(&rows).map_err(|why| {
        smithers_core::SmithersError::new(
            smithers_core::Code::DbCorrupt,
            format!("the snapshot of run `{run_id}` at frame {frame_no} cannot be rebuilt ({why}); restore the database from a backup"),
        )
    })
}

/// The latest snapshot of a run (None when it has no frame).
pub async fn latest(
    store: &dyn smithers_store::Store,
    run_id: &str,
) -> smithers_core::Result<Option<FullSnapshot>> {
    let last = store.last_frame_no(run_id).await?;
    if last == 0 || store.get_snapshot(run_id, last).await?.is_none() {
        return Ok(None);
    }
    at_frame(store, run_id, last).await.map(Some)
}

/// Writes that put `run_id`'s nodes, outputs and loops to a snapshot's state (for a fork or a
/// rewind). `state_of(state, has_output)` gives each node's state, or `None` to leave it out;
/// outputs are written for the nodes that end up finished.
pub fn restore_writes(
    snap: &FullSnapshot,
    run_id: &str,
    now_ms: i64,
    state_of: impl Fn(&str, bool) -> Option<&'static str>,
) -> Vec<smithers_store::Write> {
    use smithers_store::{LoopRow, NodeRow, OutputRow, Write, node_state};
    let mut out = Vec::new();
    for (key, node) in &snap.nodes {
        let output = snap.outputs.get(key);
        let Some(st) = state_of(
            node.get("state").and_then(Value::as_str).unwrap_or(""),
            output.is_some(),
        ) else {
            continue;
        };
        let node_id = node
            .get("nodeId")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let iteration = node.get("iteration").and_then(Value::as_i64).unwrap_or(0);
        let table = node
            .get("outputTable")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        out.push(Write::UpsertNode(NodeRow {
            run_id: run_id.to_string(),
            node_id: node_id.clone(),
            iteration,
            state: st.to_string(),
            last_attempt: node.get("lastAttempt").and_then(Value::as_i64),
            updated_at_ms: now_ms,
            output_table: table.clone(),
            label: node
                .get("label")
                .and_then(Value::as_str)
                .map(str::to_string),
        }));
        if let (node_state::FINISHED, Some(o)) = (st, output) {
            out.push(Write::UpsertOutput(OutputRow {
                run_id: run_id.to_string(),
                node_id,
                iteration,
                output_table: table,
                payload_json: smithers_core::json::text(o),
                created_at_ms: now_ms,
            }));
        }
    }
    for (id, l) in &snap.ralph {
        out.push(Write::UpsertLoop(LoopRow {
            run_id: run_id.to_string(),
            ralph_id: id.clone(),
            iteration: l.get("iteration").and_then(Value::as_i64).unwrap_or(0),
            done: l.get("done").and_then(Value::as_bool).unwrap_or(false),
            updated_at_ms: now_ms,
        }));
    }
    out
}

/// Differences between two snapshots, in the `runs.diff` shape: nodes (keyed `nodeId::iteration`)
/// added, removed and changed (state, lastAttempt or label), outputs added, removed and changed
/// (compared as JSON), loops changed (iteration or done, for loops on both sides), and whether
/// the inputs differ.
pub fn diff(a: &FullSnapshot, b: &FullSnapshot) -> Value {
    let keys = |m: &Map<String, Value>| m.keys().cloned().collect::<BTreeSet<String>>();
    let (na, nb) = (keys(&a.nodes), keys(&b.nodes));
    let (oa, ob) = (keys(&a.outputs), keys(&b.outputs));
    let changed_node = |x: &Value, y: &Value| {
        ["state", "lastAttempt", "label"]
            .iter()
            .any(|f| x.get(*f) != y.get(*f))
    };
    let nodes_changed: Vec<Value> = na
        .intersection(&nb)
        .filter(|k| changed_node(&a.nodes[*k], &b.nodes[*k]))
        .map(|k| json!({"nodeId": k, "from": a.nodes[k], "to": b.nodes[k]}))
        .collect();
    let outputs_changed: Vec<Value> = oa
        .intersection(&ob)
        .filter(|k| a.outputs[*k] != b.outputs[*k])
        .map(|k| json!({"key": k, "from": a.outputs[k], "to": b.outputs[k]}))
        .collect();
    let ralph_changed: Vec<Value> = a
        .ralph
        .iter()
        .filter_map(|(k, x)| {
            let y = b.ralph.get(k)?;
            (x.get("iteration") != y.get("iteration") || x.get("done") != y.get("done"))
                .then(|| json!({"ralphId": k, "from": x, "to": y}))
        })
        .collect();
    json!({
        "nodesAdded": nb.difference(&na).collect::<Vec<_>>(),
        "nodesRemoved": na.difference(&nb).collect::<Vec<_>>(),
        "nodesChanged": nodes_changed,
        "outputsAdded": ob.difference(&oa).collect::<Vec<_>>(),
        "outputsRemoved": oa.difference(&ob).collect::<Vec<_>>(),
        "outputsChanged": outputs_changed,
        "ralphChanged": ralph_changed,
        "inputChanged": a.input != b.input,
        "vcsPointerChanged": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_content_not_history() {
        let mut a = SnapshotState::new(json!({"x": 1}));
        a.set_node("n::0".into(), json!({"state": "pending"}));
        a.set_node("n::0".into(), json!({"state": "finished"}));
        a.set_output("n::0".into(), json!(1));
        let mut b = SnapshotState::new(json!({"x": 1}));
        b.set_output("n::0".into(), json!(1));
        b.set_node("n::0".into(), json!({"state": "finished"}));
        assert_eq!(a.content_hash(), b.content_hash());
        b.set_output("n::0".into(), json!(2));
        assert_ne!(a.content_hash(), b.content_hash());
    }

    #[test]
    fn deltas_inflate_to_full_state() {
        let mut s = SnapshotState::new(json!({}));
        let mut rows = Vec::new();
        for f in 1..=5 {
            s.set_node(format!("t{f}::0"), json!({"state": "finished"}));
            s.set_output(format!("t{f}::0"), json!(f));
            if f == 3 {
                s.remove_output("t1::0");
            }
            rows.push(s.encode("r", f, None, 0));
        }
        assert_eq!(rows[0].encoding, "keyframe");
        assert_eq!(rows[2].encoding, "delta");
        let full = inflate(&rows).unwrap();
        assert_eq!(full.nodes.len(), 5);
        assert_eq!(full.outputs.len(), 4);
        assert!(!full.outputs.contains_key("t1::0"));
        assert_eq!(full.content_hash, s.content_hash());
    }

    /// What a keyframe of `s` holds, counted from scratch.
    fn counted_size(s: &SnapshotState) -> usize {
        [&s.nodes, &s.outputs, &s.ralph]
            .iter()
            .flat_map(|sec| sec.entries.iter())
            .map(|(k, (v, _))| k.len() + v.len())
            .sum::<usize>()
            + smithers_core::json::text(&s.input).len()
    }

    #[test]
    fn the_state_size_follows_every_change() {
        let mut s = SnapshotState::new(json!({"who": "world"}));
        s.set_node("a::0".into(), json!({"state": "pending", "label": "x"}));
        s.set_node("a::0".into(), json!({"state": "finished", "label": "x"}));
        s.set_node("a::0".into(), json!({"state": "finished", "label": "x"}));
        s.set_output("a::0".into(), json!("a longer output"));
        s.set_loop("l".into(), 3, false);
        s.set_node("b::1".into(), json!({"state": "pending"}));
        assert_eq!(s.size, counted_size(&s));
        s.remove_node("b::1");
        s.remove_node("never-there::0");
        s.remove_output("a::0");
        s.set_input(json!({"who": "someone else entirely"}));
        assert_eq!(s.size, counted_size(&s));
    }

    /// A loop keeps every iteration's nodes: keyframes every 50 frames would store frames ×
    /// state (quadratic). Keyframes paced by delta bytes keep the total in proportion to the
    /// deltas, and every frame still rebuilds from its keyframe.
    #[test]
    fn a_growing_state_is_stored_in_linear_space() {
        let label = "x".repeat(16 * 1024);
        let mut s = SnapshotState::new(json!({}));
        let mut rows = Vec::new();
        for f in 1..=1600 {
            s.set_node(
                format!("n::{f}"),
                json!({"state": "finished", "label": label}),
            );
            s.set_loop("l".into(), f, false);
            rows.push(s.encode("r", f, None, 0));
        }
        let bytes = |enc: &str| -> usize {
            rows.iter()
                .filter(|r| r.encoding == enc)
                .map(|r| r.nodes_json.len() + r.outputs_json.len() + r.ralph_json.len())
                .sum()
        };
        let (key, delta) = (bytes("keyframe"), bytes("delta"));
        // every 50 frames: 32 keyframes averaging 800 labels, 420 MB
        assert!(
            key <= 3 * delta,
            "keyframes {key} B against deltas {delta} B"
        );
        let keys: Vec<i64> = rows
            .iter()
            .filter(|r| r.encoding == "keyframe")
            .map(|r| r.frame_no)
            .collect();
        assert_eq!(keys[0], 1);
        assert!(
            keys.windows(2).all(|w| w[1] - w[0] > KEYFRAME_INTERVAL),
            "{keys:?}"
        );
        for f in [1, 2, 50, 51, 777, keys[keys.len() - 1], 1600] {
            let at = (f - 1) as usize;
            let start = rows[..=at]
                .iter()
                .rposition(|r| r.encoding == "keyframe")
                .unwrap();
            let full = inflate(&rows[start..=at]).unwrap();
            assert_eq!(full.frame_no, f);
            assert_eq!(full.nodes.len(), f as usize);
            assert_eq!(full.ralph["l"]["iteration"], f);
        }
        assert_eq!(inflate(&rows).unwrap().content_hash, s.content_hash());
    }

    /// A state that does not grow still gets a keyframe soon after every 50 frames, so a
    /// rebuild reads few rows.
    #[test]
    fn a_steady_state_gets_keyframes_about_every_interval() {
        let mut s = SnapshotState::new(json!({}));
        for n in 0..20 {
            s.set_node(format!("n{n}::0"), json!({"state": "pending"}));
        }
        let mut keys = Vec::new();
        for f in 1..=400 {
            let n = f % 20;
            let st = if f % 40 < 20 { "running" } else { "pending" };
            s.set_node(format!("n{n}::0"), json!({"state": st}));
            if s.encode("r", f, None, 0).encoding == "keyframe" {
                keys.push(f);
            }
        }
        assert_eq!(keys[0], 1);
        assert!(keys.len() >= 6, "{keys:?}");
        assert!(
            keys.windows(2)
                .all(|w| w[1] - w[0] <= 2 * KEYFRAME_INTERVAL),
            "{keys:?}"
        );
    }
}
