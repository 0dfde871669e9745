//! `--json` of `ps`, `cron list` and `frames` (locally and through a `smithers serve`
//! process on the same database), the CHANGES of `frames`, the run order and wait details of
//! `inspect`, and `completions`. Every test runs the built binary in its own temporary
//! directory; servers listen on a port the OS picks.

use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

mod common;
use common::{rpc, serve, wait_status};

const BIN: &str = env!("CARGO_BIN_EXE_smithers");

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "{self:#?}");
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}); {self:#?}"))
    }
}

fn smithers(dir: &Path, args: &[&str]) -> Out {
    let o = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env_remove("SMITHERS_TOKEN")
        .env_remove("SMITHERS_DB")
        .output()
        .unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The node ids of `inspect`'s `nodes:` section, in the order printed.
fn node_order(inspect: &str) -> Vec<String> {
    inspect
        .split("\nnodes:")
        .nth(1)
        .unwrap_or("")
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("      "))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// The detail line printed under node `id` by `inspect` (what it waits for or why it stopped).
#[track_caller]
fn detail(inspect: &str, id: &str) -> String {
    let mut lines = inspect.lines();
    lines
        .find(|l| l.split_whitespace().next() == Some(id) && l.starts_with("  "))
        .unwrap_or_else(|| panic!("no node {id}: {inspect}"));
    lines
        .next()
        .filter(|l| l.starts_with("      "))
        .unwrap_or_else(|| panic!("no detail line under {id}: {inspect}"))
        .trim()
        .to_string()
}

// `zz` runs before `aa`: run order differs from the alphabetical order the database keeps
const GATED: &str = "name: gated\nsteps:\n  - task: {id: zz, value: 1}\n  - approval: {id: gate, title: ok?}\n  - task: {id: aa, value: 2}\n";

#[test]
fn json_and_frame_changes_locally_and_through_a_served_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("gated.yaml"), GATED).unwrap();
    std::fs::write(
        dir.join("hello.yaml"),
        "name: hello\nsteps:\n  - task: {id: a, value: 1}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("smithers.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"sqlite://db.sqlite\"\n[[workflows]]\nkey = \"gated\"\npath = \"gated.yaml\"\n[[workflows]]\nkey = \"hello\"\npath = \"hello.yaml\"\n",
    )
    .unwrap();
    let db = "sqlite://db.sqlite";
    // empty lists are still one JSON document each
    assert_eq!(
        smithers(dir, &["ps", "--json", "--db", db]).ok().json(),
        json!({"runs": []})
    );
    assert_eq!(
        smithers(dir, &["cron", "list", "--json", "--db", db])
            .ok()
            .json(),
        json!({"schedules": []})
    );

    let s = serve(dir, &["--config", "smithers.toml"]);
    let url = format!("http://{}", s.addr);
    let created = rpc(&s.addr, "runs.create", json!({"workflow": "gated"}));
    let run = created["payload"]["runId"].as_str().unwrap().to_string();
    wait_status(&s.addr, &run, "waiting-approval");

    // ps --json: the runs.list rows, the same shape locally and remotely
    let local = smithers(dir, &["ps", "--json", "--db", db]).ok().json();
    let remote = smithers(dir, &["ps", "--json", "--url", &url]).ok().json();
    let listed = rpc(&s.addr, "runs.list", json!({}))["payload"].clone();
    assert_eq!(remote, json!({ "runs": listed }));
    for doc in [&local, &remote] {
        let rows = doc["runs"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{doc}");
        assert_eq!(rows[0]["runId"], run.as_str());
        assert_eq!(rows[0]["status"], "waiting-approval");
        assert_eq!(rows[0]["workflowKey"], "gated");
    }
    let keys = |v: &Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<String>>()
    };
    assert_eq!(keys(&local["runs"][0]), keys(&remote["runs"][0]));
    let filtered = smithers(dir, &["ps", "--json", "--status", "failed", "--url", &url]);
    assert_eq!(filtered.ok().json(), json!({"runs": []}));

    // cron list --json: the cron.list rows
    smithers(
        dir,
        &[
            "cron",
            "add",
            "hello",
            "0 8 * * 1-5",
            "--cron-id",
            "morning",
            "--db",
            db,
        ],
    )
    .ok();
    let local = smithers(dir, &["cron", "list", "--json", "--db", db])
        .ok()
        .json();
    let remote = smithers(dir, &["cron", "list", "--json", "--url", &url])
        .ok()
        .json();
    assert_eq!(local, remote);
    assert_eq!(
        remote,
        json!({ "schedules": rpc(&s.addr, "cron.list", json!({}))["payload"] })
    );
    assert_eq!(remote["schedules"][0]["cronId"], "morning");
    assert_eq!(remote["schedules"][0]["workflow"], "hello");
    assert_eq!(remote["schedules"][0]["pattern"], "0 8 * * 1-5");

    // finish the run, then look at its frames
    smithers(dir, &["approve", &run, "--node", "gate", "--url", &url]).ok();
    wait_status(&s.addr, &run, "finished");
    let local = smithers(dir, &["frames", &run, "--json", "--db", db])
        .ok()
        .json();
    let remote = smithers(dir, &["frames", &run, "--json", "--url", &url])
        .ok()
        .json();
    assert_eq!(local, remote, "local and remote frames agree");
    let frames = local["frames"].as_array().unwrap();
    assert!(frames.len() >= 3, "{local}");
    let nos: Vec<i64> = frames
        .iter()
        .map(|f| f["frameNo"].as_i64().unwrap())
        .collect();
    let mut sorted = nos.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(nos, sorted, "newest first");
    for f in frames {
        assert!(f["createdAtMs"].as_i64().unwrap() > 0, "{f}");
        assert!(f["nodeChanges"].is_array(), "{f}");
        assert!(f["summary"].is_string(), "{f}");
    }
    let first = frames.last().unwrap();
    assert_eq!(first["frameNo"], 1);
    assert_eq!(first["summary"], "added: aa, gate, zz");
    // every node reaches `finished` in exactly one frame, zz before aa
    let finished_in = |id: &str| -> Vec<i64> {
        frames
            .iter()
            .filter(|f| {
                f["nodeChanges"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["nodeId"] == id && c["to"] == "finished")
            })
            .map(|f| f["frameNo"].as_i64().unwrap())
            .collect()
    };
    let (zz, gate, aa) = (finished_in("zz"), finished_in("gate"), finished_in("aa"));
    assert_eq!((zz.len(), gate.len(), aa.len()), (1, 1, 1), "{local}");
    assert!(zz[0] < gate[0] && gate[0] <= aa[0], "{local}");
    let zz_frame = frames.iter().find(|f| f["frameNo"] == zz[0]).unwrap();
    assert!(
        zz_frame["summary"]
            .as_str()
            .unwrap()
            .contains("finished: zz"),
        "{zz_frame}"
    );
    assert_eq!(
        zz_frame["nodeChanges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["nodeId"] == "zz")
            .unwrap()["iteration"],
        0
    );

    // the table: the same lines locally and remotely, a CHANGES column
    let table = smithers(dir, &["frames", &run, "--db", db])
        .ok()
        .stdout
        .clone();
    let remote_table = smithers(dir, &["frames", &run, "--url", &url])
        .ok()
        .stdout
        .clone();
    assert_eq!(table, remote_table);
    let mut lines = table.lines();
    assert!(
        lines.next().unwrap().trim_end().ends_with("CHANGES"),
        "{table}"
    );
    let frame1 = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some("1"))
        .unwrap();
    assert!(frame1.ends_with("  added: aa, gate, zz"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&zz[0].to_string())
                && l.contains("finished: zz")),
        "{table}"
    );

    // inspect lists nodes in run order (zz, gate, aa), locally and remotely
    let local = smithers(dir, &["inspect", &run, "--db", db])
        .ok()
        .stdout
        .clone();
    assert_eq!(node_order(&local), ["zz", "gate", "aa"], "{local}");
    let remote = smithers(dir, &["inspect", &run, "--url", &url])
        .ok()
        .stdout
        .clone();
    assert_eq!(node_order(&remote), ["zz", "gate", "aa"], "{remote}");
}

/// `zz` first, then a wait that times out, a wait a signal resolves, a timer due in an hour, and
/// two steps that never start, listed in tree order (not alphabetically).
const WAITS: &str = r#"
name: waits
steps:
  - task: {id: zz, value: 1}
  - wait_for_event: {id: yy-timeout, event: never.sent, timeout: 1s, on_timeout: skip}
  - wait_for_event: {id: xx-signal, event: ci.done, correlation_id: "c-7", timeout: 2h}
  - timer: {id: ww-timer, duration: 1h}
  - task: {id: vv, value: 2}
  - task: {id: aa, value: 3}
"#;

#[test]
fn inspect_shows_run_order_timers_and_why_waits_ended() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("waits.yaml"), WAITS).unwrap();
    let db = "sqlite://db.sqlite";
    let up = smithers(dir, &["up", "waits.yaml", "--run-id", "w1", "--db", db]);
    assert_eq!(up.code, 3, "{up:#?}");

    let text = smithers(dir, &["inspect", "w1", "--db", db])
        .ok()
        .stdout
        .clone();
    assert_eq!(
        node_order(&text),
        ["zz", "yy-timeout", "xx-signal", "ww-timer", "vv", "aa"],
        "{text}"
    );
    let timed_out = detail(&text, "yy-timeout");
    assert!(
        timed_out.starts_with("wait timed out at ")
            && timed_out.contains(" after 1s with no `never.sent` signal (on_timeout: skip)"),
        "{text}"
    );
    let waiting = detail(&text, "xx-signal");
    assert!(
        waiting.starts_with("waiting for signal `ci.done` (correlation c-7) since ")
            && waiting.contains("; times out ")
            && waiting.contains("Z (in 1h59m"),
        "{text}"
    );

    let sent = smithers(
        dir,
        &[
            "signal",
            "w1",
            "ci.done",
            "--correlation-id",
            "c-7",
            "--db",
            db,
        ],
    );
    let seq = sent.ok().json()["seq"].as_i64().unwrap();
    let resumed = smithers(dir, &["resume", "w1", "--db", db]);
    assert_eq!(resumed.code, 3, "the timer parks the run: {resumed:#?}");

    let text = smithers(dir, &["inspect", "w1", "--db", db])
        .ok()
        .stdout
        .clone();
    assert_eq!(
        node_order(&text),
        ["zz", "yy-timeout", "xx-signal", "ww-timer", "vv", "aa"],
        "{text}"
    );
    let resolved = detail(&text, "xx-signal");
    assert!(
        resolved.starts_with(&format!(
            "wait ended by signal `ci.done` (correlation c-7) seq {seq}, received "
        )),
        "{text}"
    );
    let due = detail(&text, "ww-timer");
    assert!(
        due.starts_with("timer due ") && due.ends_with("s)") && due.contains("Z (in 59m"),
        "{text}"
    );
    // the frames say what each step did
    let frames = smithers(dir, &["frames", "w1", "--db", db])
        .ok()
        .stdout
        .clone();
    for want in ["skipped: yy-timeout", "finished: xx-signal"] {
        assert!(frames.contains(want), "{want}: {frames}");
    }
}

#[test]
fn frame_changes_are_the_same_in_any_window_of_a_long_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // two frames per iteration: past the 50-frame keyframe interval of snapshots
    std::fs::write(
        dir.join("loop.yaml"),
        "name: lp\nsteps:\n  - loop:\n      id: lp\n      until: \"{{ iteration >= 39 }}\"\n      max_iterations: 50\n      steps:\n        - task: {id: step, value: 1}\n",
    )
    .unwrap();
    let db = "sqlite://db.sqlite";
    smithers(dir, &["up", "loop.yaml", "--run-id", "l1", "--db", db]).ok();
    let all = smithers(
        dir,
        &["frames", "l1", "--json", "--limit", "1000", "--db", db],
    )
    .ok()
    .json();
    let all = all["frames"].as_array().unwrap();
    assert!(all.len() > 60, "{}", all.len());
    for f in all {
        let no = f["frameNo"].as_i64().unwrap();
        let changes = f["nodeChanges"].as_array().unwrap();
        assert!(!changes.is_empty(), "frame {no} changed nothing: {f}");
        for c in changes {
            assert_eq!(c["nodeId"], "step", "{f}");
        }
    }
    assert_eq!(all[0]["summary"], "finished: step#39");
    assert_eq!(all[all.len() - 1]["summary"], "added: step");
    // the newest 3 frames alone (their keyframe lies outside the window) say the same
    let window = smithers(dir, &["frames", "l1", "--json", "--limit", "3", "--db", db])
        .ok()
        .json();
    assert_eq!(window["frames"].as_array().unwrap()[..], all[..3]);
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bash = smithers(dir, &["completions", "bash"]);
    bash.ok();
    for sub in [
        "serve",
        "frames",
        "inspect",
        "cron",
        "completions",
        "--json",
    ] {
        assert!(bash.stdout.contains(sub), "bash script lacks {sub}");
    }
    let script = dir.join("smithers.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // and bash can load it: it registers a completion for `smithers`
    let loaded = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source '{}' && complete -p smithers",
            script.display()
        ))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&loaded.stdout).contains("smithers"),
        "{loaded:?}"
    );
    let fish = smithers(dir, &["completions", "fish"]);
    assert!(fish.ok().stdout.contains("serve"), "{fish:#?}");
    let zsh = smithers(dir, &["completions", "zsh"]);
    assert!(zsh.ok().stdout.starts_with("#compdef smithers"), "{zsh:#?}");
    let bad = smithers(dir, &["completions", "tcsh"]);
    assert_eq!(bad.code, 2, "{bad:#?}");
    assert!(bad.stdout.is_empty());
}
