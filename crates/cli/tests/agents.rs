//! The offline agent example through the real `smithers` binary: `up` runs the fake agent,
//! whose first reply is broken JSON, through a repair turn to a valid output; `inspect` shows the
//! agent attempt with its repair turn and tokens.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_smithers");

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/workflows/agent-offline.yaml")
        .display()
        .to_string()
}

fn sm(dir: &Path, args: &[&str]) -> Output {
    let db = format!("sqlite://{}", dir.join("db.sqlite").display());
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn offline_agent_example_repairs_and_reports_usage() {
    let dir = tempfile::tempdir().unwrap();
    let o = sm(
        dir.path(),
        &["up", &example(), "--input", r#"{"repo": "demo"}"#],
    );
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{stderr}");
    let out: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(out["review"]["approved"], true);
    assert_eq!(out["report"]["ship"], true);
    assert_eq!(out["report"]["repo"], "demo");
    let run = stderr
        .lines()
        .find_map(|l| l.strip_prefix("run ").and_then(|r| r.split(' ').next()))
        .unwrap()
        .to_string();

    let o = sm(dir.path(), &["inspect", &run]);
    let shown = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{shown}");
    assert!(shown.contains("\nagents:\n"), "{shown}");
    let line = shown
        .lines()
        .find(|l| l.contains("command `reviewer`"))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(
        line.contains("(offline-1)")
            && line.contains("tokens in ")
            && line.contains("1 repair turn"),
        "{line}"
    );

    let o = sm(dir.path(), &["inspect", &run, "--json"]);
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    let attempts = doc["attempts"].as_array().unwrap();
    let review: Vec<&Value> = attempts
        .iter()
        .filter(|a| a["nodeId"] == "review")
        .collect();
    assert_eq!(review.len(), 1, "repair turns are not attempts");
    let a = review[0];
    assert!(a["responseText"].as_str().unwrap().contains("```json"));
    let meta: Value = serde_json::from_str(a["metaJson"].as_str().unwrap()).unwrap();
    assert_eq!(meta["repairTurns"], 1);
    assert!(
        meta["turns"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("no JSON")
    );
    assert!(meta["usage"]["inputTokens"].as_u64().unwrap() > 0);
    assert_eq!(meta["usage"]["outputTokens"], 40);
    assert!(meta["prompt"].as_str().unwrap().contains("REQUIRED OUTPUT"));
}
