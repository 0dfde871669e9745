//! `getNodeDiff` over real sockets against real git repositories: the bundle of a task that
//! edits, adds, deletes, renames and writes a binary file; the user's index, HEAD and branches
//! untouched; cache hits; every error code.

mod common;

use common::*;
use serde_json::{Value, json};
use smithers_gateway::metrics::names;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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

fn in_work_tree(dir: &Path) -> bool {
    Command::new("git")
        .current_dir(dir)
        .args(["rev-parse", "--show-toplevel"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A repository with one commit (`a.txt`, `b.txt`, `c.txt`, `sub/keep.txt`, `.gitignore`).
fn init_repo(root: &Path) {
    git(root, &["init", "-q", "-b", "main"]);
    std::fs::write(root.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(root.join("b.txt"), "bravo\n").unwrap();
    std::fs::write(root.join("c.txt"), "charlie\n").unwrap();
    std::fs::write(root.join(".gitignore"), "*.log\ndb.sqlite*\n").unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/keep.txt"), "keep me\n").unwrap();
    git(root, &["add", "-A"]);
    git(root, &["commit", "-q", "-m", "one"]);
}

fn repo() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    init_repo(&root);
    (dir, root)
}

const EDITS: &str = r#"name: edits
steps:
  - task:
      id: edit
      cwd: "{{ input.repo }}"
      run: |
        printf 'alpha\nmore\n' > a.txt
        rm b.txt
        mv sub/keep.txt sub/kept.txt
        printf 'new\n' > new.txt
        printf '\000\001\002binary' > blob.bin
        printf 'ignored\n' > build.log
"#;

const BIG: &str = r#"name: big
steps:
  - task: {id: big, cwd: "{{ input.repo }}", run: "seq 1 6300000 > big.txt"}
"#;

const MIXED: &str = r#"name: mixed
steps:
  - task: {id: plan, value: 1}
  - task: {id: skipped, value: 2, skip_if: "true"}
  - task: {id: local, run: "echo hi > local.txt"}
"#;

const SLEEPY: &str = "name: sleepy\nsteps:\n  - task: {id: nap, run: \"sleep 30\"}\n";

async fn ok(s: &TestServer, method: &str, params: Value) -> Value {
    let r = rpc(s.addr, method, params, &[]).await;
    assert_eq!(r.status, 200, "{method}: {}", r.body);
    r.json()["payload"].clone()
}

async fn start_run(s: &TestServer, workflow: &str, input: Value) -> String {
    let p = ok(
        s,
        "runs.create",
        json!({"workflow": workflow, "input": input}),
    )
    .await;
    p["runId"].as_str().unwrap().to_string()
}

/// The error of a failed call: (HTTP status, code, message).
async fn err(s: &TestServer, method: &str, params: Value) -> (u16, String, String) {
    let r = rpc(s.addr, method, params, &[]).await;
    let j = r.json();
    assert_eq!(j["ok"], false, "{}", r.body);
    (
        r.status,
        j["error"]["code"].as_str().unwrap_or_default().to_string(),
        j["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

fn metric(s: &TestServer, name: &str, result: &str) -> f64 {
    s.gw.metrics.get(name, &[("result", result)]).unwrap_or(0.0)
}

#[tokio::test]
async fn a_task_diff_with_every_kind_of_change_and_the_user_repo_untouched() {
    if !have_git() {
        return;
    }
    let (_repo_dir, root) = repo();
    // the user has work of their own: a staged change and an unstaged one
    std::fs::write(root.join("c.txt"), "charlie staged\n").unwrap();
    git(&root, &["add", "c.txt"]);
    std::fs::write(root.join("c.txt"), "charlie unstaged\n").unwrap();
    let index = std::fs::read(root.join(".git/index")).unwrap();
    let index_mtime = std::fs::metadata(root.join(".git/index"))
        .unwrap()
        .modified()
        .unwrap();
    let cached = git(&root, &["diff", "--cached"]);
    let head = git(&root, &["rev-parse", "HEAD"]);
    let branch = git(&root, &["symbolic-ref", "HEAD"]);
    let refs = git(&root, &["for-each-ref", "refs/heads", "refs/tags"]);

    let s = start(Spec {
        workflows: vec![("edits", EDITS.to_string())],
        ..Default::default()
    })
    .await;
    let id = start_run(&s, "edits", json!({"repo": root})).await;
    let run = wait_status(s.addr, &id, "finished").await;
    if !in_work_tree(s.dir.path()) {
        // the run itself started outside git; only the task's directory is a work tree
        assert_eq!(run["vcsType"], Value::Null);
    }

    let attempt = ok(
        &s,
        "attempts.get",
        json!({"runId": id, "nodeId": "edit", "iteration": 0, "attempt": 1}),
    )
    .await;
    assert_eq!(attempt["jjCwd"], json!(root));
    let after = attempt["jjPointer"].as_str().unwrap().to_string();
    let meta: Value = serde_json::from_str(attempt["metaJson"].as_str().unwrap()).unwrap();
    let before = meta["vcsBefore"].as_str().unwrap().to_string();

    let params = json!({"runId": id, "nodeId": "edit", "iteration": 0});
    let d = ok(&s, "getNodeDiff", params.clone()).await;
    assert_eq!(d["seq"], 1);
    assert_eq!(d["baseRef"], json!(before));
    let patches = d["patches"].as_array().unwrap();
    let summary: Vec<(&str, &str, Option<&str>)> = patches
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap(),
                p["operation"].as_str().unwrap(),
                p["oldPath"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a.txt", "modify", None),
            ("b.txt", "delete", None),
            ("blob.bin", "add", None),
            ("new.txt", "add", None),
            ("sub/kept.txt", "rename", Some("sub/keep.txt")),
        ]
    );
    assert!(
        patches[0]["diff"]
            .as_str()
            .unwrap()
            .contains(" alpha\n+more\n")
    );
    assert!(patches[1]["diff"].as_str().unwrap().contains("-bravo\n"));
    assert!(
        patches[2]["diff"]
            .as_str()
            .unwrap()
            .contains("GIT binary patch")
    );
    assert_eq!(patches[2]["binaryContent"], "AAECYmluYXJ5");
    assert!(patches[3].get("binaryContent").is_none());
    assert!(
        patches[4]["diff"]
            .as_str()
            .unwrap()
            .contains("rename from sub/keep.txt")
    );
    // the user's own changes are not the task's: c.txt is not in the bundle, and the ignored
    // build.log neither

    // nothing of the user's changed: index (bytes and mtime), staged diff, HEAD, branches
    assert_eq!(std::fs::read(root.join(".git/index")).unwrap(), index);
    assert_eq!(
        std::fs::metadata(root.join(".git/index"))
            .unwrap()
            .modified()
            .unwrap(),
        index_mtime
    );
    assert_eq!(git(&root, &["diff", "--cached"]), cached);
    assert_eq!(git(&root, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(&root, &["symbolic-ref", "HEAD"]), branch);
    assert_eq!(
        git(&root, &["for-each-ref", "refs/heads", "refs/tags"]),
        refs
    );
    // the snapshots are kept by refs of our own
    assert_eq!(
        git(
            &root,
            &[
                "for-each-ref",
                "--format=%(objectname) %(refname)",
                "refs/smithers/"
            ]
        ),
        format!(
            "{after} refs/smithers/runs/{id}/edit/0/1/after\n{before} refs/smithers/runs/{id}/edit/0/1/before\n"
        )
    );

    // computed once, then served from the cache row (and through the alias, and over WS)
    assert_eq!(metric(&s, names::NODE_DIFF_CACHE_TOTAL, "miss"), 1.0);
    assert_eq!(metric(&s, names::NODE_DIFF_REQUEST_TOTAL, "miss"), 1.0);
    let row =
        s.gw.store
            .get_node_diff(&id, "edit", 0, 1, &before)
            .await
            .unwrap()
            .expect("cache row");
    assert_eq!(serde_json::from_str::<Value>(&row.bundle_json).unwrap(), d);
    assert_eq!(ok(&s, "getNodeDiff", params.clone()).await, d);
    assert_eq!(ok(&s, "devtools.getNodeDiff", params.clone()).await, d);
    let mut ws = ws(s.addr).await;
    connect(&mut ws, hello_params()).await;
    let mut evs = Vec::new();
    let r = call(&mut ws, "d1", "getNodeDiff", params.clone(), &mut evs).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["payload"], d);
    assert_eq!(metric(&s, names::NODE_DIFF_CACHE_TOTAL, "hit"), 3.0);
    assert_eq!(metric(&s, names::NODE_DIFF_CACHE_TOTAL, "miss"), 1.0);
    assert_eq!(metric(&s, names::NODE_DIFF_REQUEST_TOTAL, "hit"), 3.0);
    assert_eq!(
        s.gw.metrics
            .histogram_totals(names::NODE_DIFF_COMPUTE_MS, &[])
            .map(|(n, _)| n),
        Some(1)
    );
    assert_eq!(
        s.gw.metrics
            .histogram_totals(names::NODE_DIFF_BYTES, &[])
            .map(|(n, _)| n),
        Some(4)
    );
    let text = http(s.addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        text.contains("smithers_node_diff_cache_total{result=\"hit\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("smithers_node_diff_cache_rows 1\n"),
        "one cached bundle: {text}"
    );
}

#[tokio::test]
async fn parameters_are_validated_before_anything_is_read() {
    let s = start(Spec::default()).await;
    let id = start_run(&s, "hello", json!({})).await;
    wait_status(s.addr, &id, "finished").await;
    let bad_run = "runId must be 1 to 256 characters of letters, digits, `-`, `_`, `.` and `:`.";
    let bad_node = "nodeId must be 1 to 128 characters of letters, digits, `_`, `.`, `-` and `:`, optionally followed by loop scopes (`id@@loop=1,inner=0`).";
    let bad_it = "iteration must be an i32 non-negative integer.";
    let long = "n".repeat(129);
    for (params, code, message) in [
        (
            json!({"nodeId": "a", "iteration": 0}),
            "InvalidRunId",
            bad_run,
        ),
        (
            json!({"runId": "Bad!", "nodeId": "a", "iteration": 0}),
            "InvalidRunId",
            bad_run,
        ),
        (
            json!({"runId": 5, "nodeId": "a", "iteration": 0}),
            "InvalidRunId",
            bad_run,
        ),
        (
            json!({"runId": id, "iteration": 0}),
            "InvalidNodeId",
            bad_node,
        ),
        (
            json!({"runId": id, "nodeId": "a b", "iteration": 0}),
            "InvalidNodeId",
            bad_node,
        ),
        (
            json!({"runId": id, "nodeId": long, "iteration": 0}),
            "InvalidNodeId",
            bad_node,
        ),
        (
            json!({"runId": id, "nodeId": "a"}),
            "InvalidIteration",
            bad_it,
        ),
        (
            json!({"runId": id, "nodeId": "a", "iteration": "0"}),
            "InvalidIteration",
            bad_it,
        ),
        (
            json!({"runId": id, "nodeId": "a", "iteration": null}),
            "InvalidIteration",
            bad_it,
        ),
        (
            json!({"runId": id, "nodeId": "a", "iteration": -1}),
            "InvalidIteration",
            bad_it,
        ),
        (
            json!({"runId": id, "nodeId": "a", "iteration": 1.5}),
            "InvalidIteration",
            bad_it,
        ),
        (
            json!({"runId": id, "nodeId": "a", "iteration": 2_147_483_648i64}),
            "InvalidIteration",
            bad_it,
        ),
        // the run id is checked against the pattern before the run is looked up
        (
            json!({"runId": "no/pe", "nodeId": "a", "iteration": 0}),
            "InvalidRunId",
            bad_run,
        ),
    ] {
        assert_eq!(
            err(&s, "getNodeDiff", params.clone()).await,
            (400, code.to_string(), message.to_string()),
            "{params}"
        );
    }
    assert_eq!(
        err(
            &s,
            "getNodeDiff",
            json!({"runId": "nope", "nodeId": "a", "iteration": 0})
        )
        .await,
        (404, "RunNotFound".into(), "Run not found: nope".into())
    );
    assert_eq!(
        err(
            &s,
            "getNodeDiff",
            json!({"runId": id, "nodeId": "ghost", "iteration": 0})
        )
        .await,
        (
            404,
            "NodeNotFound".into(),
            format!("Node not found: {id}/ghost/0")
        )
    );
    assert_eq!(
        err(
            &s,
            "getNodeDiff",
            json!({"runId": id, "nodeId": "a", "iteration": 3})
        )
        .await,
        (
            404,
            "NodeNotFound".into(),
            format!("Node not found: {id}/a/3")
        )
    );
    assert_eq!(metric(&s, names::NODE_DIFF_REQUEST_TOTAL, "error"), 16.0);
    assert_eq!(metric(&s, names::NODE_DIFF_CACHE_TOTAL, "miss"), 0.0);
}

#[tokio::test]
async fn attempts_that_cannot_be_diffed() {
    if !have_git() {
        return;
    }
    let s = start(Spec {
        workflows: vec![("mixed", MIXED.to_string()), ("sleepy", SLEEPY.to_string())],
        ..Default::default()
    })
    .await;
    let id = start_run(&s, "mixed", json!({})).await;
    wait_status(s.addr, &id, "finished").await;
    let p = |node: &str| json!({"runId": id, "nodeId": node, "iteration": 0});
    // a skipped node has no attempt
    assert_eq!(
        err(&s, "getNodeDiff", p("skipped")).await,
        (
            404,
            "AttemptNotFound".into(),
            format!("Attempt not found for {id}/skipped/0")
        )
    );
    if in_work_tree(s.dir.path()) {
        eprintln!(
            "note: the temp directory is inside a git work tree; skipping the outside-git checks"
        );
    } else {
        // the run and its shell task ran outside any git work tree
        for node in ["plan", "local"] {
            assert_eq!(
                err(&s, "getNodeDiff", p(node)).await,
                (
                    500,
                    "VcsError".into(),
                    "Attempt did not run in a git work tree.".into()
                )
            );
        }
    }

    // a task still running
    let sleepy = start_run(&s, "sleepy", json!({})).await;
    let mut running = false;
    for _ in 0..200 {
        let a = ok(
            &s,
            "attempts.list",
            json!({"runId": sleepy, "nodeId": "nap"}),
        )
        .await;
        if a.as_array()
            .is_some_and(|a| a.iter().any(|x| x["state"] == "in-progress"))
        {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(running, "the sleep task never started");
    assert_eq!(
        err(
            &s,
            "getNodeDiff",
            json!({"runId": sleepy, "nodeId": "nap", "iteration": 0})
        )
        .await,
        (
            409,
            "AttemptNotFinished".into(),
            "Attempt is still running.".into()
        )
    );
    ok(&s, "runs.cancel", json!({"runId": sleepy})).await;
    wait_status(s.addr, &sleepy, "cancelled").await;

    // a run recorded by a jj-based engine
    use smithers_store::{AttemptRow, Batch, NodeRow, RunRow, Write};
    let mut b = Batch::new();
    b.push(Write::InsertRun(RunRow {
        run_id: "jj-run".into(),
        parent_run_id: None,
        workflow_name: "x".into(),
        workflow_path: None,
        workflow_hash: None,
        status: "finished".into(),
        created_at_ms: 1,
        started_at_ms: Some(1),
        finished_at_ms: Some(2),
        heartbeat_at_ms: None,
        runtime_owner_id: None,
        cancel_requested_at_ms: None,
        hijack_requested_at_ms: None,
        hijack_target: None,
        vcs_type: Some("jj".into()),
        vcs_root: Some("/tmp".into()),
        vcs_revision: Some("zzz".into()),
        error_json: None,
        config_json: None,
    }))
    .push(Write::UpsertNode(NodeRow {
        run_id: "jj-run".into(),
        node_id: "t".into(),
        iteration: 0,
        state: "finished".into(),
        last_attempt: Some(1),
        updated_at_ms: 2,
        output_table: String::new(),
        label: None,
    }))
    .push(Write::UpsertAttempt(AttemptRow {
        run_id: "jj-run".into(),
        node_id: "t".into(),
        iteration: 0,
        attempt: 1,
        state: "finished".into(),
        started_at_ms: 1,
        finished_at_ms: Some(2),
        heartbeat_at_ms: None,
        heartbeat_data_json: None,
        error_json: None,
        jj_pointer: Some("qpvuntsm".into()),
        response_text: None,
        jj_cwd: Some("/tmp".into()),
        cached: false,
        meta_json: None,
    }));
    s.gw.store.apply(b).await.unwrap();
    assert_eq!(
        err(
            &s,
            "getNodeDiff",
            json!({"runId": "jj-run", "nodeId": "t", "iteration": 0})
        )
        .await,
        (
            500,
            "VcsError".into(),
            "Unsupported VCS type: jj. Only git-backed runs are supported.".into()
        )
    );
}

#[tokio::test]
async fn a_run_started_in_a_work_tree_records_it() {
    if !have_git() {
        return;
    }
    // `smithers serve` in a repository: the database is ignored, the runs are in git
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    init_repo(&root);
    let head = git(&root, &["rev-parse", "HEAD"]).trim().to_string();
    let s = start_in(
        dir,
        Spec {
            workflows: vec![("mixed", MIXED.to_string())],
            ..Default::default()
        },
    )
    .await;
    let id = start_run(&s, "mixed", json!({})).await;
    let run = wait_status(s.addr, &id, "finished").await;
    assert_eq!(run["vcsType"], "git");
    assert_eq!(run["vcsRoot"], json!(root));
    assert_eq!(run["vcsRevision"], json!(head));
    let p = |node: &str| json!({"runId": id, "nodeId": node, "iteration": 0});
    // a value task changes nothing on disk and records no pointer
    assert_eq!(
        err(&s, "getNodeDiff", p("plan")).await,
        (
            409,
            "AttemptNotFinished".into(),
            "Attempt has no finished git pointer.".into()
        )
    );
    let d = ok(&s, "getNodeDiff", p("local")).await;
    assert_eq!(d["patches"].as_array().unwrap().len(), 1);
    assert_eq!(d["patches"][0]["path"], "local.txt");
    assert_eq!(d["patches"][0]["operation"], "add");
    assert_eq!(
        d["patches"][0]["diff"],
        "diff --git a/local.txt b/local.txt\nnew file mode 100644\nindex 0000000000000000000000000000000000000000..45b983be36b73c0788dc9cbcb76cbb80fc7bb057\n--- /dev/null\n+++ b/local.txt\n@@ -0,0 +1 @@\n+hi\n"
    );
    assert!(git(&root, &["status", "--porcelain"]).contains("?? local.txt"));
}

#[tokio::test]
async fn a_diff_over_50_mib_is_refused_and_not_cached() {
    if !have_git() {
        return;
    }
    let (_repo_dir, root) = repo();
    let s = start(Spec {
        workflows: vec![("big", BIG.to_string())],
        ..Default::default()
    })
    .await;
    let id = start_run(&s, "big", json!({"repo": root})).await;
    for _ in 0..600 {
        let r = rpc(s.addr, "runs.get", json!({"runId": id}), &[]).await;
        if r.json()["payload"]["status"] == "finished" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 49 MB of text; its patch (a `+` per line) is over the 50 MiB cap
    assert!(std::fs::metadata(root.join("big.txt")).unwrap().len() > 48_000_000);
    let params = json!({"runId": id, "nodeId": "big", "iteration": 0});
    let too_large = (
        413,
        "DiffTooLarge".to_string(),
        "Serialized diff exceeds 52428800 bytes [truncated]".to_string(),
    );
    assert_eq!(err(&s, "getNodeDiff", params).await, too_large);
    assert_eq!(metric(&s, names::NODE_DIFF_REQUEST_TOTAL, "error"), 1.0);
    let attempt =
        s.gw.store
            .get_attempt(&id, "big", 0, 1)
            .await
            .unwrap()
            .unwrap();
    let meta: Value = serde_json::from_str(attempt.meta_json.as_deref().unwrap()).unwrap();
    let before = meta["vcsBefore"].as_str().unwrap();
    assert_eq!(
        s.gw.store
            .get_node_diff(&id, "big", 0, 1, before)
            .await
            .unwrap(),
        None
    );
}
