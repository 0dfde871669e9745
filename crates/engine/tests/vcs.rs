//! Work-tree capture and node diffs against real git repositories: snapshots never touch the
//! user's index, HEAD or branches; run tasks record their trees; `Engine::node_diff` diffs,
//! caches and computes identical requests once.

use serde_json::{Value, json};
use smithers_engine::node_diff::{NodeDiffError, Operation};
use smithers_engine::vcs::{self, RefKey, WorkTrees};
use smithers_engine::{Engine, EngineConfig, StartOptions};
use smithers_store::Store;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// Runs git in `dir` (with a fixed identity) and returns stdout; panics on failure.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .env_remove("GIT_DIR")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_WORK_TREE")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have_git() -> bool {
    let ok = Command::new("git")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("note: git is not installed; skipping this test");
    }
    ok
}

/// A fresh repository with one commit: `a.txt`, `b.txt`, `.gitignore` (ignoring `*.log` and
/// the engine's database).
fn repo() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    git(&root, &["init", "-q", "-b", "main"]);
    std::fs::write(root.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(root.join("b.txt"), "bravo\n").unwrap();
    std::fs::write(root.join(".gitignore"), "*.log\ndb.sqlite*\n").unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/keep.txt"), "k\n").unwrap();
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-q", "-m", "one"]);
    (dir, root)
}

fn tree_files(root: &Path, tree: &str) -> Vec<String> {
    git(root, &["ls-tree", "-r", "--name-only", tree])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Everything of the user's git state a snapshot must leave alone.
fn user_state(root: &Path) -> (Vec<u8>, String, String, String, String) {
    (
        std::fs::read(root.join(".git/index")).unwrap(),
        git(root, &["diff", "--cached"]),
        git(root, &["rev-parse", "HEAD"]),
        git(root, &["symbolic-ref", "HEAD"]),
        git(root, &["for-each-ref", "refs/heads", "refs/tags"]),
    )
}

#[tokio::test]
async fn snapshots_leave_the_index_head_and_branches_alone() {
    if !have_git() {
        return;
    }
    let (_d, root) = repo();
    // the user has a staged change, a further unstaged one, an untracked and an ignored file
    std::fs::write(root.join("a.txt"), "alpha staged\n").unwrap();
    git(&root, &["add", "a.txt"]);
    std::fs::write(root.join("a.txt"), "alpha worktree\n").unwrap();
    std::fs::write(root.join("u.txt"), "untracked\n").unwrap();
    std::fs::write(root.join("noise.log"), "ignored\n").unwrap();
    // the engine's own database, served from inside the work tree and not ignored
    std::fs::create_dir(root.join(".smithers")).unwrap();
    std::fs::write(root.join(".smithers/smithers.db"), "db").unwrap();
    let before_state = user_state(&root);
    let index_mtime = std::fs::metadata(root.join(".git/index"))
        .unwrap()
        .modified()
        .unwrap();

    let trees = WorkTrees::default();
    let key = RefKey {
        run_id: "r1".into(),
        node_id: "build:x".into(),
        iteration: 0,
        attempt: 1,
    };
    let r = root.clone();
    let task = async move {
        std::fs::write(r.join("c.txt"), "charlie\n").unwrap();
        std::fs::remove_file(r.join("b.txt")).unwrap();
        std::fs::write(r.join("u.txt"), "untracked, changed\n").unwrap();
        7
    };
    // the task starts in a subdirectory; the snapshot covers the whole work tree
    let (out, cap) = vcs::around(&trees, &root.join("sub"), &key, task).await;
    assert_eq!(out, 7);
    let cap = cap.expect("inside a work tree");
    assert_eq!(cap.error, None);
    assert_eq!(Path::new(&cap.root), root);
    let (before, after) = (cap.before.unwrap(), cap.after.unwrap());
    assert_eq!(before.len(), 40);

    let bf = tree_files(&root, &before);
    assert_eq!(
        bf,
        [".gitignore", "a.txt", "b.txt", "sub/keep.txt", "u.txt"]
    );
    let af = tree_files(&root, &after);
    assert_eq!(
        af,
        [".gitignore", "a.txt", "c.txt", "sub/keep.txt", "u.txt"]
    );
    // the work tree's content, not the staged one
    assert_eq!(
        git(&root, &["cat-file", "blob", &format!("{before}:a.txt")]),
        "alpha worktree\n"
    );
    assert_eq!(
        git(&root, &["cat-file", "blob", &format!("{after}:u.txt")]),
        "untracked, changed\n"
    );
    // refs keep the trees alive, under refs/smithers only
    assert_eq!(
        git(
            &root,
            &["rev-parse", "refs/smithers/runs/r1/build%3Ax/0/1/before"]
        )
        .trim(),
        before
    );
    assert_eq!(
        git(
            &root,
            &["rev-parse", "refs/smithers/runs/r1/build%3Ax/0/1/after"]
        )
        .trim(),
        after
    );
    git(&root, &["gc", "-q", "--prune=now"]);
    assert_eq!(git(&root, &["cat-file", "-t", &after]).trim(), "tree");

    assert_eq!(user_state(&root), before_state);
    let index_mtime_after = std::fs::metadata(root.join(".git/index"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(index_mtime, index_mtime_after);
    assert_eq!(
        git(&root, &["log", "--all", "--oneline"]).lines().count(),
        1
    );
    assert_eq!(git(&root, &["stash", "list"]), "");
}

#[tokio::test]
async fn a_repository_without_commits_is_captured_too() {
    if !have_git() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    git(&root, &["init", "-q"]);
    std::fs::write(root.join("x.txt"), "x\n").unwrap();
    let trees = WorkTrees::default();
    let key = RefKey {
        run_id: "r".into(),
        node_id: "n".into(),
        iteration: 2,
        attempt: 3,
    };
    let r = root.clone();
    let (_, cap) = vcs::around(&trees, &root, &key, async move {
        std::fs::write(r.join("y.txt"), "y\n").unwrap();
    })
    .await;
    let cap = cap.unwrap();
    assert_eq!(cap.error, None);
    assert_eq!(tree_files(&root, cap.before.as_deref().unwrap()), ["x.txt"]);
    assert_eq!(
        tree_files(&root, cap.after.as_deref().unwrap()),
        ["x.txt", "y.txt"]
    );
    // still no commit, no branch
    assert!(git(&root, &["for-each-ref", "refs/heads"]).is_empty());
}

#[tokio::test]
async fn outside_git_the_task_just_runs_and_the_probe_is_remembered() {
    if !have_git() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let inside = Command::new("git")
        .current_dir(dir.path())
        .args(["rev-parse", "--show-toplevel"])
        .output()
        .is_ok_and(|o| o.status.success());
    if inside {
        eprintln!("note: the temp directory is inside a git work tree; skipping");
        return;
    }
    let trees = WorkTrees::default();
    let key = RefKey {
        run_id: "r".into(),
        node_id: "n".into(),
        iteration: 0,
        attempt: 1,
    };
    let (out, cap) = vcs::around(&trees, dir.path(), &key, async { "ran" }).await;
    assert_eq!((out, cap), ("ran", None));
    assert_eq!(trees.root_of(dir.path()).await, None);
    // once a directory is known, asking again needs no git: it answers even when the directory
    // has since become a repository
    git(dir.path(), &["init", "-q"]);
    assert_eq!(trees.root_of(dir.path()).await, None);
    assert!(
        WorkTrees::default().root_of(dir.path()).await.is_some(),
        "a fresh cache probes again"
    );
    // a directory that does not exist (yet) is not remembered
    let later = dir.path().join("later");
    assert_eq!(trees.root_of(&later).await, None);
    std::fs::create_dir(&later).unwrap();
    assert!(trees.root_of(&later).await.is_some());
}

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: Arc<dyn Store>,
    engine: Engine,
}

/// An engine whose runs start in a fresh repository (the database is ignored by git).
async fn env() -> Env {
    let (dir, root) = repo();
    let store = smithers_store::open(&format!("sqlite://{}", root.join("db.sqlite").display()))
        .await
        .unwrap();
    let engine = Engine::new(
        store.clone(),
        EngineConfig {
            default_cwd: Some(root.clone()),
            ..Default::default()
        },
    );
    Env {
        _dir: dir,
        root,
        store,
        engine,
    }
}

const EDITS: &str = r#"name: edits
steps:
  - task: {id: plan, value: {ok: true}}
  - task:
      id: edit
      run: |
        printf 'alpha\nmore\n' > a.txt
        rm b.txt
        mv sub/keep.txt sub/kept.txt
        printf 'new\n' > new.txt
        printf '\000\001\002binary' > blob.bin
  - task: {id: again, run: "printf 'again\n' > again.txt"}
"#;

async fn run_edits(e: &Env) -> String {
    let wf = smithers_core::yaml::load_str(EDITS, "edits.yaml", &e.root).unwrap();
    let o = e
        .engine
        .start(Arc::new(wf), json!({}), StartOptions::default())
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    o.run_id
}

#[tokio::test]
async fn run_tasks_record_their_trees_and_node_diff_reads_them() {
    if !have_git() {
        return;
    }
    let e = env().await;
    let head = git(&e.root, &["rev-parse", "HEAD"]).trim().to_string();
    let id = run_edits(&e).await;

    let run = e.store.get_run(&id).await.unwrap().unwrap();
    assert_eq!(run.vcs_type.as_deref(), Some("git"));
    assert_eq!(run.vcs_root.as_deref(), e.root.to_str());
    assert_eq!(run.vcs_revision.as_deref(), Some(head.as_str()));

    let a = e
        .store
        .get_attempt(&id, "edit", 0, 1)
        .await
        .unwrap()
        .unwrap();
    let after = a.jj_pointer.clone().expect("after-tree recorded");
    assert_eq!(a.jj_cwd.as_deref(), e.root.to_str());
    let meta: Value = serde_json::from_str(a.meta_json.as_deref().unwrap()).unwrap();
    let before = meta["vcsBefore"].as_str().unwrap().to_string();
    assert_eq!(meta["kind"], "run");
    assert!(meta.get("vcsError").is_none(), "{meta}");
    assert_eq!(
        git(
            &e.root,
            &[
                "rev-parse",
                &format!("refs/smithers/runs/{id}/edit/0/1/after")
            ]
        )
        .trim(),
        after
    );

    // a value task never probes nor records anything
    let v = e
        .store
        .get_attempt(&id, "plan", 0, 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.jj_pointer, None);
    assert_eq!(
        e.engine.node_diff(&id, "plan", 0).await.unwrap_err(),
        NodeDiffError::AttemptNotFinished("Attempt has no finished git pointer.".into())
    );

    let d = e.engine.node_diff(&id, "edit", 0).await.unwrap();
    assert!(!d.cached);
    assert!(d.compute_ms.is_some());
    assert_eq!(d.bundle.seq, 1);
    assert_eq!(d.bundle.base_ref, before);
    let ops: Vec<(&str, Operation, Option<&str>)> = d
        .bundle
        .patches
        .iter()
        .map(|p| (p.path.as_str(), p.operation, p.old_path.as_deref()))
        .collect();
    assert_eq!(
        ops,
        [
            ("a.txt", Operation::Modify, None),
            ("b.txt", Operation::Delete, None),
            ("blob.bin", Operation::Add, None),
            ("new.txt", Operation::Add, None),
            ("sub/kept.txt", Operation::Rename, Some("sub/keep.txt")),
        ]
    );
    let a_txt = &d.bundle.patches[0];
    assert!(a_txt.diff.starts_with("diff --git a/a.txt b/a.txt\n"));
    assert!(a_txt.diff.contains("\n+more\n"), "{}", a_txt.diff);
    let bin = &d.bundle.patches[2];
    assert!(bin.diff.contains("GIT binary patch"));
    assert_eq!(bin.binary_content.as_deref(), Some("AAECYmluYXJ5"));
    assert_eq!(d.bundle.patches[1].binary_content, None);

    // second call: from the cache row, no git involved
    let row = e
        .store
        .get_node_diff(&id, "edit", 0, 1, &before)
        .await
        .unwrap()
        .expect("cached");
    assert_eq!(row.attempt_started_at_ms, a.started_at_ms);
    let again = e.engine.node_diff(&id, "edit", 0).await.unwrap();
    assert!(again.cached);
    assert_eq!(again.compute_ms, None);
    assert_eq!(again.bundle, d.bundle);
    assert_eq!(again.bytes, row.bundle_json.len());

    // the concatenated diffs re-create the change on a clean checkout of the before-tree
    let patch: String = d.bundle.patches.iter().map(|p| p.diff.as_str()).collect();
    let check = tempfile::tempdir().unwrap();
    let wt = check.path().join("wt");
    git(
        &e.root,
        &[
            "worktree",
            "add",
            "-q",
            "--detach",
            wt.to_str().unwrap(),
            "HEAD",
        ],
    );
    std::fs::write(check.path().join("p.diff"), &patch).unwrap();
    git(
        &wt,
        &[
            "apply",
            "--index",
            check.path().join("p.diff").to_str().unwrap(),
        ],
    );
    assert_eq!(git(&wt, &["write-tree"]).trim(), after);
    git(
        &e.root,
        &["worktree", "remove", "--force", wt.to_str().unwrap()],
    );
}

#[tokio::test]
async fn identical_requests_compute_once() {
    if !have_git() {
        return;
    }
    let e = env().await;
    let id = run_edits(&e).await;
    let mut calls = Vec::new();
    for _ in 0..8 {
        let engine = e.engine.clone();
        let id = id.clone();
        calls.push(tokio::spawn(async move {
            engine.node_diff(&id, "again", 0).await
        }));
    }
    let mut computed = 0;
    let mut bundles = Vec::new();
    for c in calls {
        let d = c.await.unwrap().unwrap();
        computed += usize::from(!d.cached);
        bundles.push(d.bundle);
    }
    assert_eq!(computed, 1);
    assert!(bundles.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(bundles[0].patches.len(), 1);
    assert_eq!(bundles[0].patches[0].path, "again.txt");
}

#[tokio::test]
async fn attempts_without_a_before_tree_fall_back_to_the_previous_task() {
    if !have_git() {
        return;
    }
    let e = env().await;
    let id = run_edits(&e).await;
    // an attempt written by an engine that did not record its before-tree
    let mut a = e
        .store
        .get_attempt(&id, "again", 0, 1)
        .await
        .unwrap()
        .unwrap();
    a.meta_json = Some(json!({"kind": "run"}).to_string());
    let mut batch = smithers_store::Batch::new();
    batch.push(smithers_store::Write::UpsertAttempt(a));
    e.store.apply(batch).await.unwrap();
    let edit = e
        .store
        .get_attempt(&id, "edit", 0, 1)
        .await
        .unwrap()
        .unwrap();
    let d = e.engine.node_diff(&id, "again", 0).await.unwrap();
    assert_eq!(Some(d.bundle.base_ref), edit.jj_pointer);
    assert_eq!(d.bundle.patches.len(), 1);
}
