//! Frames (one per render) and snapshots (the run's durable state at that frame).
//!
//! Both are written as a keyframe every [`KEYFRAME_INTERVAL`] frames and as deltas in between,
//! and both are maintained incrementally, so a step's cost does not grow with the size of the
//! workflow or the length of the run.

pub mod changes;
pub mod delta;
pub mod snapshot;

use serde_json::Value;
use sha2::{Digest, Sha256};
use smithers_core::{Code, NodeRef, Result, SmithersError};
use smithers_store::{FrameRow, Store};

/// A keyframe is forced every this many frames.
pub const KEYFRAME_INTERVAL: i64 = 50;

/// sha256 hex of a string.
pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Per-run frame encoder: remembers the previous tree so an unchanged render costs nothing.
/// Every frame's root is a `smithers:workflow` element named after the workflow, holding the
/// rendered steps, as upstream's frames do (so DevTools clients see the same root and ids).
#[derive(Default)]
pub struct FrameWriter {
    workflow_name: String,
    last_tree: Option<NodeRef>,
    last_json: Option<Value>,
    last_text: Option<String>,
    last_hash: String,
}

/// What to store for one frame.
pub struct EncodedFrame {
    pub xml_json: String,
    pub xml_hash: String,
    pub encoding: &'static str,
}

impl FrameWriter {
    /// An encoder for the frames of a run of workflow `name`.
    pub fn new(name: &str) -> FrameWriter {
        FrameWriter {
            workflow_name: name.to_string(),
            ..Default::default()
        }
    }

    /// Encodes `tree` as frame `frame_no`.
    pub fn encode(&mut self, frame_no: i64, tree: &NodeRef) -> EncodedFrame {
        let force_key = frame_no % KEYFRAME_INTERVAL == 0 || self.last_json.is_none();
        let same = self
            .last_tree
            .as_ref()
            .is_some_and(|t| std::sync::Arc::ptr_eq(t, tree));
        if same {
            if force_key {
                let text = self.full_text();
                return EncodedFrame {
                    xml_json: text,
                    xml_hash: self.last_hash.clone(),
                    encoding: "keyframe",
                };
            }
            return EncodedFrame {
                xml_json: r#"{"ops":[],"version":1}"#.to_string(),
                xml_hash: self.last_hash.clone(),
                encoding: "delta",
            };
        }
        let json = serde_json::json!({
            "kind": "element",
            "tag": "smithers:workflow",
            "props": {"name": self.workflow_name},
            "children": [tree.to_frame_json()],
        });
        let text = smithers_core::json::text(&json);
        let hash = sha256_hex(&text);
        let out = match (&self.last_json, force_key) {
            (Some(prev), false) => {
                let d = smithers_core::json::text(&delta::encode(prev, &json));
                if d.len() < text.len() {
                    EncodedFrame {
                        xml_json: d,
                        xml_hash: hash.clone(),
                        encoding: "delta",
                    }
                } else {
                    EncodedFrame {
                        xml_json: text.clone(),
                        xml_hash: hash.clone(),
                        encoding: "keyframe",
                    }
                }
            }
            _ => EncodedFrame {
                xml_json: text.clone(),
                xml_hash: hash.clone(),
                encoding: "keyframe",
            },
        };
        self.last_tree = Some(tree.clone());
        self.last_json = Some(json);
        self.last_text = Some(text);
        self.last_hash = hash;
        out
    }

    fn full_text(&mut self) -> String {
        if let Some(t) = &self.last_text {
            return t.clone();
        }
        let t = self
            .last_json
            .as_ref()
            .map(smithers_core::json::text)
            .unwrap_or_else(|| "null".into());
        self.last_text = Some(t.clone());
        t
    }
}

/// Reads a frame with its tree inflated (keyframe plus deltas applied). The returned row's
/// `xml_json` is the full tree JSON; `encoding` keeps the stored encoding.
pub async fn read_frame(
    store: &dyn Store,
    run_id: &str,
    frame_no: i64,
) -> Result<Option<FrameRow>> {
    let Some(row) = store.get_frame(run_id, frame_no).await? else {
        return Ok(None);
    };
    if row.encoding != "delta" {
        return Ok(Some(row));
    }
    // walk back to the nearest keyframe (at most one keyframe interval away)
    let from = (frame_no - KEYFRAME_INTERVAL).max(0);
    let rows = store.frames_between(run_id, from, frame_no).await?;
    let start = rows
        .iter()
        .rposition(|r| r.encoding != "delta")
        .ok_or_else(|| corrupt(run_id, frame_no, "no keyframe before this delta"))?;
    let mut doc: Value = serde_json::from_str(&rows[start].xml_json)
        .map_err(|e| corrupt(run_id, rows[start].frame_no, &e.to_string()))?;
    for r in &rows[start + 1..] {
        let d: Value = serde_json::from_str(&r.xml_json)
            .map_err(|e| corrupt(run_id, r.frame_no, &e.to_string()))?;
        doc = delta::apply(&doc, &d).map_err(|e| corrupt(run_id, r.frame_no, &e))?;
    }
    let mut out = row;
    out.xml_json = smithers_core::json::text(&doc);
    Ok(Some(out))
}

fn corrupt(run_id: &str, frame_no: i64, why: &str) -> SmithersError {
    SmithersError::new(
        Code::DbCorrupt,
        format!(
            "frame {frame_no} of run `{run_id}` cannot be rebuilt ({why}); restore the database from a backup"
        ),
    )
}
