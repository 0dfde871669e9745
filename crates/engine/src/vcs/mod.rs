//! What tasks change on disk, for git work trees (upstream uses jj; see docs/protocol.md).
//!
//! - [`WorkTrees`] answers "is this directory inside a git work tree, and where is its root",
//!   once per directory per process (the engine's shared state holds one), so runs outside git
//!   pay a single `git rev-parse` per directory and tasks that do not touch disk (values,
//!   approvals, timers) never ask.
//! - [`around`] wraps a task: a snapshot of the work tree before it, one after it (see
//!   [`snapshot`]), both kept alive by refs under `refs/smithers/`.
//! - [`WorkTrees::run_info`] gives the run row's `vcs_type`, `vcs_root` and `vcs_revision`.

pub mod git;
pub mod snapshot;

pub use snapshot::RefKey;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// The only VCS type recorded by this engine.
pub const GIT: &str = "git";

/// Directories remembered at most; past that the memory starts over (a workflow whose task
/// directory differs on every run must not grow it forever).
const MAX_REMEMBERED: usize = 4096;

type Probe = Arc<OnceCell<Option<Arc<str>>>>;

/// Work-tree roots by directory, probed once per directory.
#[derive(Default)]
pub struct WorkTrees {
    probes: Mutex<HashMap<PathBuf, Probe>>,
}

/// The VCS facts of a run, taken when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunVcs {
    /// Top level of the work tree.
    pub root: String,
    /// `HEAD` commit, when the repository has one.
    pub revision: Option<String>,
}

/// What [`around`] recorded for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// Top level of the work tree.
    pub root: String,
    /// Tree id of the work tree before the task.
    pub before: Option<String>,
    /// Tree id of the work tree after the task.
    pub after: Option<String>,
    /// Why a snapshot is missing.
    pub error: Option<String>,
}

impl WorkTrees {
    /// The top level of the git work tree containing `dir`, or None (not in a work tree, git
    /// missing, or the directory does not exist yet — only that last answer is not remembered).
    pub async fn root_of(&self, dir: &Path) -> Option<Arc<str>> {
        let probe = {
            let mut map = self.probes.lock().ok()?;
            if let Some(p) = map.get(dir) {
                p.clone()
            } else {
                if !dir.is_dir() {
                    return None;
                }
                if map.len() >= MAX_REMEMBERED {
                    map.clear();
                }
                let p = Probe::default();
                map.insert(dir.to_path_buf(), p.clone());
                p
            }
        };
        probe
            .get_or_init(|| async {
                let out = git::run(dir, &["rev-parse", "--show-toplevel"], Default::default())
                    .await
                    .ok()?;
                git::first_line(&out).map(Arc::from)
            })
            .await
            .clone()
    }

    /// Work tree and `HEAD` of a run whose tasks start in `dir`.
    pub async fn run_info(&self, dir: &Path) -> Option<RunVcs> {
        let root = self.root_of(dir).await?;
        let out = git::run(
            Path::new(&*root),
            &["rev-parse", "-q", "--verify", "HEAD^{commit}"],
            Default::default(),
        )
        .await
        .ok();
        Some(RunVcs {
            root: root.to_string(),
            revision: out.as_deref().and_then(git::first_line),
        })
    }
}

/// Runs `task` between two snapshots of the work tree containing `cwd`. Outside a work tree the
/// task just runs. A failed snapshot never fails the task: it is reported in
/// [`Captured::error`].
pub async fn around<F: Future>(
    trees: &WorkTrees,
    cwd: &Path,
    key: &RefKey,
    task: F,
) -> (F::Output, Option<Captured>) {
    let Some(root) = trees.root_of(cwd).await else {
        return (task.await, None);
    };
    let mut snap = snapshot::Snapshotter::new(Path::new(&*root));
    let mut errors = Vec::new();
    let before = match snap.capture(&key.refname("before")).await {
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(format!("before the task: {e}"));
            None
        }
    };
    let out = task.await;
    let after = match snap.capture(&key.refname("after")).await {
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(format!("after the task: {e}"));
            None
        }
    };
    let captured = Captured {
        root: root.to_string(),
        before,
        after,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    };
    (out, Some(captured))
}
