//! Work-tree snapshots as git tree objects, taken through a private index so the user's index,
//! HEAD and branches are never touched.
//!
//! A snapshot is `git add -A` (which honours `.gitignore`) into a temporary index seeded from
//! `HEAD`, then `git write-tree`. The only things written to the repository are objects and the
//! refs under `refs/smithers/` that keep them from being garbage-collected (see [`RefKey`]).
//! Files under `.smithers/` directories (the engine's own database when it is served from the
//! work tree) are left out.

use super::git::{self, GitError, Opts};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A git command of a snapshot may take this long (a first `git add -A` hashes every file of a
/// large work tree).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Left out of every snapshot: the engine's own state (`.smithers/smithers.db` and its WAL change
/// all the time when `smithers` runs inside the work tree).
const EXCLUDE: &str = ":(top,exclude,glob)**/.smithers/**";

/// Namespace of the refs that keep snapshots alive. Never under `refs/heads` or `refs/tags`:
/// branch and tag listings, `git log --all` (the refs point at trees, not commits), fetch and
/// push refspecs all leave it alone.
pub const REF_PREFIX: &str = "refs/smithers/runs/";

/// The attempt a snapshot belongs to; names its refs:
/// `refs/smithers/runs/<run>/<node>/<iteration>/<attempt>/{before,after}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefKey {
    pub run_id: String,
    pub node_id: String,
    pub iteration: u32,
    pub attempt: i64,
}

impl RefKey {
    /// The ref of the snapshot taken before (`"before"`) or after (`"after"`) the attempt.
    pub fn refname(&self, side: &str) -> String {
        format!(
            "{REF_PREFIX}{}/{}/{}/{}/{side}",
            component(&self.run_id),
            component(&self.node_id),
            self.iteration,
            self.attempt
        )
    }
}

/// One ref name component: ASCII letters, digits, `_` and `-` as they are, every other byte
/// `%XX` (so no `.`, `:`, `..`, `@{` or `.lock` can appear). Components longer than 120 bytes
/// become a hash (file systems limit a name to 255 bytes and loose refs are files).
fn component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        return "%00".into();
    }
    if out.len() > 120 {
        let digest = Sha256::digest(s.as_bytes());
        return format!("sha256-{}", hex::encode(&digest[..20]));
    }
    out
}

/// A temporary index file in a directory of its own, removed on drop.
struct TempIndex {
    dir: PathBuf,
    file: PathBuf,
}

impl TempIndex {
    fn new() -> Result<Self, GitError> {
        let dir =
            std::env::temp_dir().join(format!("smithers-git-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| {
            GitError::Io(format!(
                "cannot create a temporary index in {}: {e}",
                dir.display()
            ))
        })?;
        let file = dir.join("index");
        Ok(TempIndex { dir, file })
    }
}

impl Drop for TempIndex {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Takes snapshots of one work tree. The private index lives as long as the snapshotter, so a
/// second snapshot (after a task) re-hashes only files whose stat data changed.
pub struct Snapshotter {
    root: PathBuf,
    index: Option<TempIndex>,
}

impl Snapshotter {
    pub fn new(root: &Path) -> Self {
        Snapshotter {
            root: root.to_path_buf(),
            index: None,
        }
    }

    fn opts(&self) -> Opts<'_> {
        Opts {
            index: self.index.as_ref().map(|i| i.file.as_path()),
            timeout: SNAPSHOT_TIMEOUT,
            max_stdout: 64 * 1024,
        }
    }

    /// Snapshots the work tree and points `refname` at the tree; returns the tree id.
    pub async fn capture(&mut self, refname: &str) -> Result<String, GitError> {
        if self.index.is_none() {
            self.index = Some(TempIndex::new()?);
            // Seeding from HEAD keeps tracked files that .gitignore would exclude. A repository
            // without commits has no HEAD: the index starts empty.
            if git::run(&self.root, &["read-tree", "HEAD"], self.opts())
                .await
                .is_err()
                && let Some(i) = &self.index
            {
                let _ = std::fs::remove_file(&i.file);
            }
        }
        git::run(
            &self.root,
            &[
                "-c",
                "advice.addEmbeddedRepo=false",
                "add",
                "-A",
                "--",
                EXCLUDE,
            ],
            self.opts(),
        )
        .await?;
        let out = git::run(&self.root, &["write-tree"], self.opts()).await?;
        let tree = git::first_line(&out)
            .filter(|t| git::is_object_id(t))
            .ok_or_else(|| GitError::Failed {
                command: "git write-tree".into(),
                stderr: format!(
                    "unexpected output `{}`",
                    String::from_utf8_lossy(&out).trim()
                ),
            })?;
        git::run(
            &self.root,
            &["update-ref", refname, &tree],
            Opts {
                index: None,
                ..self.opts()
            },
        )
        .await?;
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_are_valid_and_distinct() {
        let k = RefKey {
            run_id: "run-1".into(),
            node_id: "build:step".into(),
            iteration: 3,
            attempt: 2,
        };
        assert_eq!(
            k.refname("before"),
            "refs/smithers/runs/run-1/build%3Astep/3/2/before"
        );
        assert_eq!(component("a.lock"), "a%2Elock");
        assert_eq!(component(".."), "%2E%2E");
        assert_eq!(component("x@{y"), "x%40%7By");
        assert_eq!(component("a%b"), "a%25b");
        assert_eq!(component(""), "%00");
        let long = "r".repeat(200);
        let c = component(&long);
        assert!(c.starts_with("sha256-") && c.len() == 47, "{c}");
        assert_ne!(component(&"r".repeat(201)), c);
    }
}
