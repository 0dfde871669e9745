//! What one task changed on disk (gateway-protocol §1.15, with git instead of jj): the diff of
//! the latest attempt of a (run, node, iteration) between the work tree before and after it.
//!
//! Attempts of tasks that ran in a git work tree record the tree after the task in
//! `jj_pointer`, the work-tree root in `jj_cwd` and the tree before the task in the attempt's
//! `meta_json.vcsBefore` (see [`crate::vcs`]). The before-tree is the base; attempts without
//! one fall back to upstream's order (previous attempt of the same task, latest earlier task in
//! the same work tree, the run's `HEAD` revision, the attempt's own tree).
//!
//! Bundles are cached in `_smithers_node_diffs` per (run, node, iteration, attempt, base): a
//! cache hit never runs git, and identical requests arriving together compute once.

mod patch;

use crate::{Engine, now_ms, vcs};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use smithers_core::SmithersError;
use smithers_store::{AttemptRow, Batch, NodeDiffRow, RunRow, Store, Write, node_state};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// Largest serialized bundle (bytes); larger is [`NodeDiffError::DiffTooLarge`].
pub const MAX_BYTES: usize = 52_428_800;

/// VCS error messages are cut to this many characters (plus `…`).
const MESSAGE_MAX_CHARS: usize = 512;

/// The changes of one attempt (`DiffBundle` on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiffBundle {
    /// The attempt number.
    pub seq: i64,
    /// What the attempt is compared with (a tree or commit id).
    pub base_ref: String,
    /// One entry per changed file, in path order; empty when nothing changed.
    pub patches: Vec<FilePatch>,
}

/// One changed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FilePatch {
    /// Path relative to the work-tree root (the new path of a rename).
    pub path: String,
    pub operation: Operation,
    /// Unified diff of this file as `git diff --binary` prints it (`diff --git` header
    /// included); the diffs of a bundle concatenated apply with `git apply`.
    pub diff: String,
    /// The path before a rename.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_path: Option<String>,
    /// Base64 of the new content of a binary file (or of text that is not UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_content: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Add,
    Modify,
    Delete,
    Rename,
}

/// A bundle and how it was obtained.
#[derive(Debug, Clone)]
pub struct NodeDiff {
    pub bundle: DiffBundle,
    /// Served without running git (from the cache table, or computed by an identical request
    /// in flight at the same time).
    pub cached: bool,
    /// Size of the serialized bundle (bytes).
    pub bytes: usize,
    /// Time spent computing, when this request computed it.
    pub compute_ms: Option<f64>,
}

/// Why there is no bundle. [`NodeDiffError::code`] is the wire code.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeDiffError {
    RunNotFound(String),
    NodeNotFound(String),
    AttemptNotFound(String),
    AttemptNotFinished(String),
    Vcs(String),
    WorkingTreeDirty(String),
    DiffTooLarge,
    /// Reading the store failed.
    Store(SmithersError),
}

impl NodeDiffError {
    pub fn code(&self) -> &'static str {
        match self {
            NodeDiffError::RunNotFound(_) => "RunNotFound",
            NodeDiffError::NodeNotFound(_) => "NodeNotFound",
            NodeDiffError::AttemptNotFound(_) => "AttemptNotFound",
            NodeDiffError::AttemptNotFinished(_) => "AttemptNotFinished",
            NodeDiffError::Vcs(_) => "VcsError",
            NodeDiffError::WorkingTreeDirty(_) => "WorkingTreeDirty",
            NodeDiffError::DiffTooLarge => "DiffTooLarge",
            NodeDiffError::Store(e) => e.code.as_str(),
        }
    }

    pub fn message(&self) -> String {
        match self {
            NodeDiffError::RunNotFound(m)
            | NodeDiffError::NodeNotFound(m)
            | NodeDiffError::AttemptNotFound(m)
            | NodeDiffError::AttemptNotFinished(m)
            | NodeDiffError::Vcs(m)
            | NodeDiffError::WorkingTreeDirty(m) => m.clone(),
            NodeDiffError::DiffTooLarge => {
                format!("Serialized diff exceeds {MAX_BYTES} bytes [truncated]")
            }
            NodeDiffError::Store(e) => e.message.clone(),
        }
    }

    /// A failed VCS operation: `WorkingTreeDirty` when the message says so, else `VcsError`;
    /// the message trimmed and cut to 512 characters.
    fn from_vcs(message: &str) -> Self {
        let m = message.trim();
        let m = if m.is_empty() {
            "VCS operation failed.".to_string()
        } else if m.chars().count() > MESSAGE_MAX_CHARS {
            let mut s: String = m.chars().take(MESSAGE_MAX_CHARS).collect();
            s.push('…');
            s
        } else {
            m.to_string()
        };
        let lower = m.to_lowercase();
        if ["working copy", "dirty", "conflict", "cannot restore"]
            .iter()
            .any(|w| lower.contains(w))
        {
            NodeDiffError::WorkingTreeDirty(m)
        } else {
            NodeDiffError::Vcs(m)
        }
    }
}

impl std::fmt::Display for NodeDiffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for NodeDiffError {}

impl From<SmithersError> for NodeDiffError {
    fn from(e: SmithersError) -> Self {
        NodeDiffError::Store(e)
    }
}

/// A finished computation, shared by the requests that waited for it.
struct Outcome {
    bundle: DiffBundle,
    bytes: usize,
    compute_ms: Option<f64>,
}

type Key = (String, String, i64, i64, String);
type Slot = Arc<OnceCell<Result<Arc<Outcome>, NodeDiffError>>>;

/// Computations in flight, so identical requests share one.
#[derive(Default)]
pub(crate) struct InFlight {
    slots: Mutex<HashMap<Key, Slot>>,
}

impl InFlight {
    fn slot(&self, key: &Key) -> Slot {
        match self.slots.lock() {
            Ok(mut m) => m.entry(key.clone()).or_default().clone(),
            Err(_) => Slot::default(),
        }
    }

    fn finish(&self, key: &Key, slot: &Slot) {
        if let Ok(mut m) = self.slots.lock()
            && m.get(key).is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            m.remove(key);
        }
    }
}

/// The base ref recorded by the attempt itself: the work tree before it ran.
fn recorded_base(a: &AttemptRow) -> Option<String> {
    let meta: Value = serde_json::from_str(a.meta_json.as_deref()?).ok()?;
    let before = meta.get("vcsBefore")?.as_str()?;
    vcs::git::is_object_id(before).then(|| before.to_string())
}

fn pointer(a: &AttemptRow) -> Option<&str> {
    a.jj_pointer.as_deref().filter(|p| !p.is_empty())
}

/// The newest of `rows` by (finished at, attempt).
fn newest<'a>(rows: impl Iterator<Item = &'a AttemptRow>) -> Option<&'a AttemptRow> {
    rows.max_by_key(|a| (a.finished_at_ms.unwrap_or(-1), a.attempt))
}

/// Upstream's base for attempts that did not record their before-tree: the previous finished
/// attempt of the same task in the same work tree; else the latest attempt of another task in
/// that work tree finished by the time this one started; else the run's `HEAD` revision (same
/// work tree only); else the attempt's own pointer (an empty diff).
async fn fallback_base(
    store: &dyn Store,
    run: &RunRow,
    target: &AttemptRow,
    same_task: &[AttemptRow],
) -> Result<String, NodeDiffError> {
    let same_cwd = |a: &AttemptRow| a.jj_cwd == target.jj_cwd && pointer(a).is_some();
    if let Some(p) = newest(
        same_task
            .iter()
            .filter(|a| a.attempt < target.attempt && a.finished_at_ms.is_some() && same_cwd(a)),
    )
    .and_then(pointer)
    {
        return Ok(p.to_string());
    }
    let all = store.list_attempts(&run.run_id).await?;
    if let Some(p) = newest(all.iter().filter(|a| {
        (a.node_id != target.node_id || a.iteration != target.iteration)
            && a.finished_at_ms.is_some_and(|f| f <= target.started_at_ms)
            && same_cwd(a)
    }))
    .and_then(pointer)
    {
        return Ok(p.to_string());
    }
    if let Some(rev) = run
        .vcs_revision
        .as_deref()
        .filter(|r| vcs::git::is_object_id(r))
        && run.vcs_root.is_some()
        && run.vcs_root == target.jj_cwd
    {
        return Ok(rev.to_string());
    }
    Ok(pointer(target).unwrap_or_default().to_string())
}

impl Engine {
    /// The diff bundle of the latest attempt of `(run_id, node_id, iteration)`.
    pub async fn node_diff(
        &self,
        run_id: &str,
        node_id: &str,
        iteration: i64,
    ) -> Result<NodeDiff, NodeDiffError> {
        let store = self.store().as_ref();
        let run = store
            .get_run(run_id)
            .await?
            .ok_or_else(|| NodeDiffError::RunNotFound(format!("Run not found: {run_id}")))?;
        if store.get_node(run_id, node_id, iteration).await?.is_none() {
            return Err(NodeDiffError::NodeNotFound(format!(
                "Node not found: {run_id}/{node_id}/{iteration}"
            )));
        }
        let attempts = store.list_node_attempts(run_id, node_id, iteration).await?;
        let Some(latest) = attempts.iter().max_by_key(|a| a.attempt) else {
            return Err(NodeDiffError::AttemptNotFound(format!(
                "Attempt not found for {run_id}/{node_id}/{iteration}"
            )));
        };
        if latest.state == node_state::IN_PROGRESS {
            return Err(NodeDiffError::AttemptNotFinished(
                "Attempt is still running.".into(),
            ));
        }
        if let Some(t) = run.vcs_type.as_deref()
            && t != vcs::GIT
        {
            return Err(NodeDiffError::Vcs(format!(
                "Unsupported VCS type: {t}. Only git-backed runs are supported."
            )));
        }
        let Some(target) = pointer(latest).filter(|p| vcs::git::is_object_id(p)) else {
            return Err(if run.vcs_type.is_none() {
                NodeDiffError::Vcs("Attempt did not run in a git work tree.".into())
            } else {
                NodeDiffError::AttemptNotFinished("Attempt has no finished git pointer.".into())
            });
        };
        let Some(root) = latest.jj_cwd.as_deref().filter(|c| !c.is_empty()) else {
            return Err(NodeDiffError::Vcs(
                "Attempt did not record a git working directory.".into(),
            ));
        };
        let base = match recorded_base(latest) {
            Some(b) => b,
            None => fallback_base(store, &run, latest, &attempts).await?,
        };
        let key: Key = (
            run_id.to_string(),
            node_id.to_string(),
            iteration,
            latest.attempt,
            base.clone(),
        );
        if let Some(hit) = cached(store, &key).await? {
            return Ok(hit);
        }
        let slot = self.sh.node_diffs.slot(&key);
        let mut computed_here = false;
        let result = slot
            .get_or_init(|| async {
                // an identical request may have finished between the lookup and here
                if let Some(hit) = cached(store, &key).await? {
                    return Ok(Arc::new(Outcome {
                        bundle: hit.bundle,
                        bytes: hit.bytes,
                        compute_ms: None,
                    }));
                }
                computed_here = true;
                compute(store, latest, Path::new(root), &base, target).await
            })
            .await
            .clone();
        self.sh.node_diffs.finish(&key, &slot);
        let o = result?;
        Ok(NodeDiff {
            bundle: o.bundle.clone(),
            cached: !computed_here,
            bytes: o.bytes,
            compute_ms: if computed_here { o.compute_ms } else { None },
        })
    }
}

/// The cached bundle of `key`, if any (an unreadable row counts as absent and is recomputed).
async fn cached(store: &dyn Store, key: &Key) -> Result<Option<NodeDiff>, NodeDiffError> {
    let (run, node, iteration, attempt, base) = key;
    let Some(row) = store
        .get_node_diff(run, node, *iteration, *attempt, base)
        .await?
    else {
        return Ok(None);
    };
    Ok(serde_json::from_str::<DiffBundle>(&row.bundle_json)
        .ok()
        .map(|bundle| NodeDiff {
            bundle,
            cached: true,
            bytes: row.bundle_json.len(),
            compute_ms: None,
        }))
}

/// Computes a bundle with git and caches it (a failed cache write only costs a recomputation
/// next time).
async fn compute(
    store: &dyn Store,
    attempt: &AttemptRow,
    root: &Path,
    base: &str,
    target: &str,
) -> Result<Arc<Outcome>, NodeDiffError> {
    let t0 = std::time::Instant::now();
    if !root.is_dir() {
        return Err(NodeDiffError::Vcs(format!(
            "The work tree {} is not available.",
            root.display()
        )));
    }
    let patches = patch::patches(root, base, target)
        .await
        .map_err(|e| match e {
            patch::PatchError::TooLarge => NodeDiffError::DiffTooLarge,
            patch::PatchError::Git(e) => NodeDiffError::from_vcs(&e.to_string()),
            patch::PatchError::Parse(m) => NodeDiffError::from_vcs(&m),
        })?;
    let bundle = DiffBundle {
        seq: attempt.attempt,
        base_ref: base.to_string(),
        patches,
    };
    let json = serde_json::to_string(&bundle)
        .map_err(|e| NodeDiffError::from_vcs(&format!("cannot serialize the diff: {e}")))?;
    if json.len() > MAX_BYTES {
        return Err(NodeDiffError::DiffTooLarge);
    }
    let compute_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let bytes = json.len();
    let mut batch = Batch::new();
    batch.push(Write::UpsertNodeDiff(NodeDiffRow {
        run_id: attempt.run_id.clone(),
        node_id: attempt.node_id.clone(),
        iteration: attempt.iteration,
        base_ref: base.to_string(),
        attempt: attempt.attempt,
        attempt_started_at_ms: attempt.started_at_ms,
        bundle_json: json,
        created_at_ms: now_ms(),
    }));
    let _ = store.apply(batch).await;
    Ok(Arc::new(Outcome {
        bundle,
        bytes,
        compute_ms: Some(compute_ms),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcs_messages_are_classified_and_cut() {
        assert_eq!(
            NodeDiffError::from_vcs("  "),
            NodeDiffError::Vcs("VCS operation failed.".into())
        );
        assert_eq!(
            NodeDiffError::from_vcs("fatal: bad object abc\n"),
            NodeDiffError::Vcs("fatal: bad object abc".into())
        );
        assert!(matches!(
            NodeDiffError::from_vcs("Merge CONFLICT in x"),
            NodeDiffError::WorkingTreeDirty(_)
        ));
        let long = "é".repeat(600);
        let NodeDiffError::Vcs(m) = NodeDiffError::from_vcs(&long) else {
            panic!("not a VcsError");
        };
        assert_eq!(m.chars().count(), 513);
        assert!(m.ends_with('…'));
        assert_eq!(
            NodeDiffError::DiffTooLarge.message(),
            "Serialized diff exceeds 52428800 bytes [truncated]"
        );
    }

    #[test]
    fn bundles_use_the_wire_names() {
        let b = DiffBundle {
            seq: 2,
            base_ref: "abc".into(),
            patches: vec![FilePatch {
                path: "b".into(),
                operation: Operation::Rename,
                diff: "d".into(),
                old_path: Some("a".into()),
                binary_content: None,
            }],
        };
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            serde_json::json!({"seq": 2, "baseRef": "abc", "patches": [
                {"path": "b", "operation": "rename", "diff": "d", "oldPath": "a"}]})
        );
    }
}
