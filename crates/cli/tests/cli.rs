//! End-to-end tests of the `smithers` binary: every test spawns the real built binary with its
//! own temporary directory as the working directory and its own SQLite database, so tests can
//! run in parallel.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_smithers");

/// Commands that take `--db`.
const DB_COMMANDS: &[&str] = &[
    "up", "resume", "ps", "inspect", "frames", "approve", "deny", "signal", "cancel", "logs",
];

/// What a finished `smithers` process left behind.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Asserts the exit code, showing both streams when it differs.
    #[track_caller]
    fn code(&self, want: i32) -> &Self {
        assert_eq!(self.code, want, "unexpected exit code; {self:#?}");
        self
    }

    /// Asserts a successful exit (0).
    #[track_caller]
    fn ok(&self) -> &Self {
        self.code(0)
    }

    /// Parses stdout as one JSON value.
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); {self:#?}"))
    }

    /// Asserts stderr contains `needle`.
    #[track_caller]
    fn err_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}; {self:#?}"
        );
        self
    }

    /// Asserts the process failed with exit 1 and exactly one `error[CODE]` line, no panic;
    /// returns that line.
    #[track_caller]
    fn error(&self, code: &str) -> String {
        assert_eq!(self.code, 1, "expected exit 1; {self:#?}");
        no_panic(self);
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error["))
            .collect();
        assert_eq!(lines.len(), 1, "expected one error line; {self:#?}");
        let want = format!("error[{code}]: ");
        assert!(
            lines[0].starts_with(&want),
            "expected {want:?}; got {:?}",
            lines[0]
        );
        lines[0].to_string()
    }
}

#[track_caller]
fn no_panic(o: &Out) {
    assert!(
        !o.stderr.contains("panicked") && !o.stderr.contains("RUST_BACKTRACE"),
        "the binary panicked; {o:#?}"
    );
}

/// A temporary working directory with its own database.
struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn db(&self) -> String {
        format!("sqlite://{}", self.path().join("db.sqlite").display())
    }

    /// Writes a file in the directory and returns its path as a string.
    fn write(&self, name: &str, text: &str) -> String {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// A command for the binary, run in the directory, with `--db` for commands that take it.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.path()).args(args);
        if args.first().is_some_and(|a| DB_COMMANDS.contains(a)) {
            c.arg("--db").arg(self.db());
        }
        c
    }

    /// Runs the binary to completion.
    fn sm(&self, args: &[&str]) -> Out {
        run(self.cmd(args))
    }

    /// Runs `up` on a workflow written from `yaml`, with extra arguments.
    fn up(&self, yaml: &str, extra: &[&str]) -> Out {
        let wf = self.write("wf.yaml", yaml);
        let mut args = vec!["up", wf.as_str()];
        args.extend_from_slice(extra);
        self.sm(&args)
    }

    /// `inspect --json` of a run.
    fn inspect(&self, run: &str) -> Value {
        self.sm(&["inspect", run, "--json"]).ok().json()
    }

    fn status(&self, run: &str) -> String {
        self.inspect(run)["run"]["status"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

fn run(mut c: Command) -> Out {
    let o = c.output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The run id `up` announces on stderr (`run <id>`).
#[track_caller]
fn run_id(o: &Out) -> String {
    o.stderr
        .lines()
        .find_map(|l| l.strip_prefix("run ").map(|r| r.split(' ').next().unwrap()))
        .unwrap_or_else(|| panic!("no `run <id>` line; {o:#?}"))
        .to_string()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn example(name: &str) -> String {
    repo_root()
        .join("examples/workflows")
        .join(name)
        .display()
        .to_string()
}

const SMALL: &str = r#"
name: small
steps:
  - task: {id: a, value: {n: 1, who: "{{ input.who | default('nobody') }}"}}
  - task: {id: b, run: "echo from-b"}
  - task: {id: c, value: {doubled: "{{ outputs.a.n * 2 }}"}}
"#;

const GATED: &str = r#"
name: gated
steps:
  - task: {id: before, value: 1}
  - approval: {id: gate, title: "Ship it?"}
  - task: {id: after, value: {shipped: true}}
"#;

// ----- 1. up -------------------------------------------------------------------------------------

#[test]
fn up_small_workflow_finishes_with_output_and_progress() {
    let env = Env::new();
    let o = env.up(SMALL, &["--input", r#"{"who": "ann"}"#]);
    o.ok();
    let out = o.json();
    assert_eq!(out["a"], json!({"n": 1, "who": "ann"}));
    assert_eq!(out["b"]["stdout"].as_str().unwrap().trim(), "from-b");
    assert_eq!(out["b"]["exitCode"], 0);
    assert_eq!(out["c"], json!({"doubled": 2}));
    for id in ["a", "b", "c"] {
        let n = o
            .stderr
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("+ {id} finished")))
            .count();
        assert_eq!(n, 1, "one `+ {id} finished` line; {o:#?}");
    }
    let id = run_id(&o);
    o.err_has(&format!("run {id} finished"));
    assert_eq!(env.status(&id), "finished");
}

// ----- 2. input and run ids ----------------------------------------------------------------------

const NEEDS_NAME: &str = r#"
name: needs-name
input:
  type: object
  required: [name]
  properties:
    name: {type: string}
steps:
  - task: {id: greet, value: {text: "hi {{ input.name }}"}}
"#;

#[test]
fn up_input_inline_and_from_file() {
    let env = Env::new();
    let o = env.up(NEEDS_NAME, &["--input", r#"{"name": "bob"}"#]);
    assert_eq!(o.ok().json()["greet"]["text"], "hi bob");

    let f = env.write("in.json", r#"{"name": "carol"}"#);
    let o = env.up(NEEDS_NAME, &["--input", &format!("@{f}")]);
    assert_eq!(o.ok().json()["greet"]["text"], "hi carol");
}

#[test]
fn up_rejects_bad_input() {
    let env = Env::new();
    let e = env
        .up(NEEDS_NAME, &["--input", "{not json"])
        .error("INVALID_INPUT");
    assert!(e.contains("--input"), "{e}");

    let e = env
        .up(NEEDS_NAME, &["--input", "@missing.json"])
        .error("INVALID_INPUT");
    assert!(e.contains("missing.json"), "{e}");

    let bad = env.write("bad.json", "[1, 2");
    env.up(NEEDS_NAME, &["--input", &format!("@{bad}")])
        .error("INVALID_INPUT");

    let e = env
        .up(NEEDS_NAME, &["--input", "[1, 2]"])
        .error("INVALID_INPUT");
    assert!(e.contains("object"), "{e}");
    env.up(NEEDS_NAME, &["--input", "\"text\""])
        .error("INVALID_INPUT");

    let e = env
        .up(NEEDS_NAME, &["--input", r#"{"name": 5}"#])
        .error("INVALID_INPUT");
    assert!(e.contains("schema"), "{e}");
    // no input at all: `{}` misses the required `name`
    env.up(NEEDS_NAME, &[]).error("INVALID_INPUT");

    // none of these created a run
    let ps = env.sm(&["ps"]);
    ps.ok().err_has("no runs");
}

#[test]
fn up_custom_run_id_and_duplicate() {
    let env = Env::new();
    let o = env.up(SMALL, &["--run-id", "my-run.1"]);
    o.ok();
    assert_eq!(run_id(&o), "my-run.1");
    assert_eq!(env.status("my-run.1"), "finished");

    let e = env.up(SMALL, &["--run-id", "my-run.1"]).error("RUN_EXISTS");
    assert!(e.contains("my-run.1"), "{e}");
    // the first run is untouched
    assert_eq!(env.status("my-run.1"), "finished");

    env.up(SMALL, &["--run-id", "bad id!"])
        .error("INVALID_INPUT");
}

// ----- 3. failures -------------------------------------------------------------------------------

#[test]
fn up_failing_task_exits_1_with_stderr_tail() {
    let env = Env::new();
    let o = env.up(
        r#"
name: failing
steps:
  - task: {id: ok, value: 1}
  - task: {id: boom, run: "echo starting; echo disk-on-fire-7731 >&2; exit 7"}
  - task: {id: never, value: 2}
"#,
        &[],
    );
    o.code(1);
    no_panic(&o);
    o.err_has("disk-on-fire-7731").err_has("exited with 7");
    assert!(
        o.stderr.lines().any(|l| l.contains("! boom failed")),
        "{o:#?}"
    );
    assert!(!o.stderr.contains("never started"), "{o:#?}");
    let id = run_id(&o);
    o.err_has(&format!("run {id} failed"));
    let doc = env.inspect(&id);
    assert_eq!(doc["run"]["status"], "failed");
    let outputs: Vec<&str> = doc["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["nodeId"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["ok"]);
}

#[test]
fn up_task_timeout_fails_quickly() {
    let env = Env::new();
    let t = Instant::now();
    let o = env.up(
        r#"
name: slow
steps:
  - task: {id: slow, run: "sleep 20", timeout: 300ms}
"#,
        &[],
    );
    o.code(1);
    no_panic(&o);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    o.err_has("did not finish within 300 ms");
    let id = run_id(&o);
    assert_eq!(env.status(&id), "failed");
}

// ----- 4. approvals ------------------------------------------------------------------------------

#[test]
fn approval_flow_approve_then_resume() {
    let env = Env::new();
    let o = env.up(GATED, &[]);
    o.code(3)
        .err_has("waiting-approval")
        .err_has("needs approval");
    let id = run_id(&o);

    let ps = env.sm(&["ps"]);
    let line = ps
        .ok()
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("run missing from ps; {ps:#?}"))
        .to_string();
    assert!(
        line.contains("waiting-approval") && line.contains("gated"),
        "{line}"
    );
    let ps = env.sm(&["ps", "--status", "waiting-approval"]);
    assert!(ps.ok().stdout.contains(&id));
    let ps = env.sm(&["ps", "--status", "finished"]);
    assert!(!ps.ok().stdout.contains(&id));
    let e = env.sm(&["ps", "--status", "bogus"]).error("INVALID_INPUT");
    assert!(e.contains("waiting-approval"), "lists valid statuses: {e}");

    env.sm(&["approve", &id, "--node", "nope"])
        .error("NODE_NOT_FOUND");
    env.sm(&["approve", &id, "--node", "gate", "--note", "lgtm"])
        .ok()
        .err_has("approved `gate`");
    env.sm(&["approve", &id, "--node", "gate"])
        .error("NOT_WAITING_APPROVAL");
    env.sm(&["deny", &id, "--node", "gate"])
        .error("NOT_WAITING_APPROVAL");

    let o = env.sm(&["resume", &id]);
    let out = o.ok().json();
    assert_eq!(out["after"], json!({"shipped": true}));
    assert_eq!(out["gate"]["approved"], true);
    let doc = env.inspect(&id);
    assert_eq!(doc["run"]["status"], "finished");
    assert_eq!(doc["approvals"][0]["status"], "approved");
    assert_eq!(doc["approvals"][0]["note"], "lgtm");
}

#[test]
fn approval_deny_with_on_deny_fail() {
    let env = Env::new();
    let o = env.up(
        r#"
name: deny-me
steps:
  - approval: {id: gate, title: "Risky?", on_deny: fail}
  - task: {id: after, value: 1}
"#,
        &[],
    );
    let id = run_id(o.code(3));
    env.sm(&["deny", &id, "--node", "gate", "--note", "too risky"])
        .ok()
        .err_has("denied `gate`");
    let o = env.sm(&["resume", &id]);
    o.code(1);
    no_panic(&o);
    let doc = env.inspect(&id);
    assert_eq!(doc["run"]["status"], "failed");
    assert_eq!(doc["approvals"][0]["status"], "denied");
    assert!(
        doc["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["nodeId"] != "after"),
        "{doc:#}"
    );
}

const CHOOSE: &str = r#"
name: choose
steps:
  - approval:
      id: pick
      title: "Where?"
      mode: select
      options: [{key: chat, label: "Team chat"}, {key: mail}]
  - approval:
      id: order
      title: "Order?"
      mode: rank
      options: [{key: a}, {key: b}, {key: c}]
  - task: {id: done, value: {picked: "{{ outputs.pick.selected }}"}}
"#;

#[test]
fn approval_select_and_rank() {
    let env = Env::new();
    let id = run_id(env.up(CHOOSE, &[]).code(3));
    let e = env
        .sm(&["approve", &id, "--node", "pick", "--select", "fax"])
        .error("INVALID_INPUT");
    assert!(e.contains("chat") && e.contains("mail"), "{e}");
    env.sm(&["approve", &id, "--node", "pick"])
        .error("INVALID_INPUT");
    env.sm(&["approve", &id, "--node", "pick", "--select", "mail"])
        .ok();

    // the run now parks at the rank approval
    env.sm(&["resume", &id]).code(3).err_has("order");
    env.sm(&["approve", &id, "--node", "order", "--rank", "a,zzz"])
        .error("INVALID_INPUT");
    env.sm(&["approve", &id, "--node", "order", "--rank", "c,a,b"])
        .ok();
    let out = env.sm(&["resume", &id]).ok().json();
    assert_eq!(out["pick"]["selected"], "mail");
    assert_eq!(out["order"]["ranked"], json!(["c", "a", "b"]));
    assert_eq!(out["done"]["picked"], "mail");
}

// ----- 5. signals --------------------------------------------------------------------------------

const WAITS: &str = r#"
name: waits
steps:
  - wait_for_event: {id: ci, event: ci.finished, correlation_id: "{{ input.sha }}"}
  - task: {id: after, value: {ci_ok: "{{ signals.ci.ok }}"}}
"#;

#[test]
fn wait_for_event_signal_and_resume() {
    let env = Env::new();
    let o = env.up(WAITS, &["--input", r#"{"sha": "c1"}"#]);
    o.code(3).err_has("waiting-event").err_has("ci.finished");
    let id = run_id(&o);
    assert_eq!(env.status(&id), "waiting-event");

    // a signal for another correlation id does not wake the wait
    env.sm(&[
        "signal",
        &id,
        "ci.finished",
        "--data",
        "{}",
        "--correlation-id",
        "other",
    ])
    .ok();
    env.sm(&["resume", &id]).code(3);

    env.sm(&["signal", &id, "ci.finished", "--data", "{oops"])
        .error("INVALID_INPUT");
    env.sm(&["signal", "no-such-run", "ci.finished"])
        .error("RUN_NOT_FOUND");
    env.sm(&["signal", &id, " "]).error("INVALID_INPUT");

    let s = env.sm(&[
        "signal",
        &id,
        "ci.finished",
        "--data",
        r#"{"ok":true}"#,
        "--correlation-id",
        "c1",
    ]);
    let d = s.ok().json();
    assert_eq!(d["runId"], id.as_str());
    assert_eq!(d["signalName"], "ci.finished");
    assert_eq!(d["correlationId"], "c1");
    assert!(d["seq"].as_i64().is_some(), "{d}");
    assert!(
        d["receivedAtMs"].as_i64().unwrap() > 1_600_000_000_000,
        "{d}"
    );

    let out = env.sm(&["resume", &id]).ok().json();
    assert_eq!(out["ci"], json!({"ok": true}));
    assert_eq!(out["after"], json!({"ci_ok": true}));

    // a finished run takes no more signals
    env.sm(&["signal", &id, "ci.finished"])
        .error("RUN_NOT_ACTIVE");
}

// ----- 6. cancel ---------------------------------------------------------------------------------

#[test]
fn cancel_parked_run() {
    let env = Env::new();
    let id = run_id(env.up(GATED, &[]).code(3));
    env.sm(&["cancel", &id]).ok().err_has("cancelled");
    let doc = env.inspect(&id);
    assert_eq!(doc["run"]["status"], "cancelled");
    let gate = doc["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["nodeId"] == "gate")
        .unwrap();
    assert_eq!(gate["state"], "cancelled", "{doc:#}");
    env.sm(&["cancel", &id]).error("RUN_NOT_ACTIVE");
    env.sm(&["cancel", "no-such-run"]).error("RUN_NOT_FOUND");
    env.sm(&["signal", &id, "x"]).error("RUN_NOT_ACTIVE");
}

#[test]
fn approve_on_cancelled_run_is_rejected() {
    let env = Env::new();
    let id = run_id(env.up(GATED, &[]).code(3));
    env.sm(&["cancel", &id]).ok();
    // like `signal`, a decision on a run that is no longer active is refused
    env.sm(&["approve", &id, "--node", "gate"])
        .error("RUN_NOT_ACTIVE");
    let doc = env.inspect(&id);
    assert_eq!(doc["run"]["status"], "cancelled");
    for n in doc["nodes"].as_array().unwrap() {
        if n["nodeId"] == "gate" {
            assert_eq!(n["state"], "cancelled", "{doc:#}");
        }
    }
}

// ----- resume ------------------------------------------------------------------------------------

#[test]
fn resume_errors() {
    let env = Env::new();
    env.sm(&["resume", "no-such-run"]).error("RUN_NOT_FOUND");

    let id = run_id(env.up(GATED, &[]).code(3));
    // resuming a run that is still parked parks it again
    env.sm(&["resume", &id]).code(3);
    // the workflow file changed since the run started: refused unless --force
    let wf = env.path().join("wf.yaml");
    let mut text = std::fs::read_to_string(&wf).unwrap();
    text.push_str("# edited\n");
    std::fs::write(&wf, &text).unwrap();
    env.sm(&["approve", &id, "--node", "gate"]).ok();
    let e = env.sm(&["resume", &id]).error("RESUME_METADATA_MISMATCH");
    assert!(e.contains("--force"), "{e}");
    env.sm(&["resume", &id, "--force"]).ok();
    let e = env.sm(&["resume", &id]).error("RUN_NOT_RESUMABLE");
    assert!(e.contains("finished"), "{e}");

    // the workflow file is gone
    let id = run_id(env.up(GATED, &[]).code(3));
    std::fs::remove_file(&wf).unwrap();
    env.sm(&["resume", &id]).error("INVALID_WORKFLOW");
}

// ----- closed stdout -----------------------------------------------------------------------------

/// A workflow whose output is far larger than a pipe's buffer.
const BIG: &str = r#"
name: big
steps:
  - task: {id: big, run: "head -c 300000 /dev/zero | tr '\\0' x"}
"#;

/// Runs a command whose stdout pipe is closed by the reader right away (`... | head -0`).
fn closed_stdout(mut c: Command) -> Out {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn read_commands_survive_a_closed_stdout() {
    let env = Env::new();
    let o = env.up(BIG, &["--run-id", "big"]);
    assert_eq!(
        o.ok().json()["big"]["stdout"].as_str().unwrap().len(),
        300_000
    );
    for args in [
        &["inspect", "big", "--json"][..],
        &["frames", "big", "--frame", "1"],
    ] {
        let o = closed_stdout(env.cmd(args));
        no_panic(&o);
        // like other Unix tools: success, or ended quietly by SIGPIPE (no exit code)
        assert!(o.code == 0 || o.code == -1, "{args:?}: {o:#?}");
    }
}

#[test]
fn up_survives_a_closed_stdout() {
    let env = Env::new();
    let wf = env.write("big.yaml", BIG);
    let o = closed_stdout(env.cmd(&["up", &wf]));
    no_panic(&o);
}

#[test]
fn sigterm_cancels_a_live_run() {
    let env = Env::new();
    let wf = env.write(
        "slow.yaml",
        r#"
name: slow
steps:
  - task: {id: first, value: 1}
  - task: {id: slow, run: "sleep 30"}
  - task: {id: never, value: 2}
"#,
    );
    let mut c = env.cmd(&["up", &wf, "--run-id", "term-me"]);
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    // `up` prints `run <id>` just before it starts watching for SIGTERM (a SIGTERM before that
    // kills the process outright, see the report); wait for it and for the slow task to start,
    // then give it a moment to install the handler.
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let ready = |seen: &[String]| {
        seen.iter().any(|l| l == "run term-me") && seen.iter().any(|l| l.contains("> slow started"))
    };
    while !ready(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("`slow` never started; stderr so far: {seen:#?}");
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    seen.extend(rx.try_iter());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(2), "stderr: {seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("run term-me cancelled")),
        "{seen:#?}"
    );
    assert!(!seen.iter().any(|l| l.contains("panicked")), "{seen:#?}");
    let doc = env.inspect("term-me");
    assert_eq!(doc["run"]["status"], "cancelled");
    assert!(
        doc["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["nodeId"] == "first"),
        "{doc:#}"
    );
}

// ----- 7. inspect and frames ---------------------------------------------------------------------

#[test]
fn inspect_and_frames() {
    let env = Env::new();
    let id = run_id(env.up(SMALL, &[]).ok());

    let text = env.sm(&["inspect", &id]);
    let t = &text.ok().stdout;
    assert!(t.contains(&format!("run       {id}")), "{t}");
    assert!(t.contains("workflow  small"), "{t}");
    assert!(t.contains("status    finished"), "{t}");
    for section in ["nodes:", "outputs:"] {
        assert!(t.contains(section), "{t}");
    }
    for node in ["a", "b", "c"] {
        assert!(
            t.lines()
                .any(|l| l.trim_start().starts_with(&format!("{node} ")) && l.contains("finished")),
            "node {node} missing: {t}"
        );
    }

    let doc = env.inspect(&id);
    for key in ["run", "nodes", "attempts", "approvals", "outputs"] {
        assert!(!doc[key].is_null(), "missing {key}: {doc:#}");
    }
    assert_eq!(doc["run"]["runId"], id.as_str());
    assert_eq!(doc["run"]["workflowName"], "small");
    assert_eq!(doc["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(doc["attempts"].as_array().unwrap().len(), 3);
    assert_eq!(doc["approvals"], json!([]));
    let c = doc["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["nodeId"] == "c")
        .unwrap();
    assert_eq!(c["output"], json!({"doubled": 2}));

    env.sm(&["inspect", "no-such-run"]).error("RUN_NOT_FOUND");
    env.sm(&["inspect", "no-such-run", "--json"])
        .error("RUN_NOT_FOUND");

    let f = env.sm(&["frames", &id]);
    let rows: Vec<&str> = f.ok().stdout.lines().collect();
    assert!(rows[0].contains("FRAME"), "{rows:#?}");
    assert!(rows.len() >= 2, "{rows:#?}");
    assert!(
        rows[1..].iter().any(|r| r.trim_start().starts_with("1 ")),
        "{rows:#?}"
    );

    let fr = env.sm(&["frames", &id, "--frame", "1"]).ok().json();
    assert_eq!(fr["frameNo"], 1);
    assert_eq!(fr["tree"]["tag"], "smithers:workflow", "{fr:#}");
    assert_eq!(
        fr["tree"]["children"][0]["tag"], "smithers:sequence",
        "{fr:#}"
    );

    env.sm(&["frames", &id, "--frame", "9999"])
        .error("NODE_NOT_FOUND");
    env.sm(&["frames", "no-such-run"]).error("RUN_NOT_FOUND");
}

// ----- 8. validate -------------------------------------------------------------------------------

#[test]
fn validate_valid_file() {
    let env = Env::new();
    let wf = env.write("ok.yaml", SMALL);
    let o = env.sm(&["validate", &wf]);
    assert_eq!(o.ok().stdout.trim(), format!("{wf}: ok"));
}

const BROKEN: &str = "name: broken
steps:
  - task: {id: a, value: 1, retires: 2}
  - task: {id: a, value: 2}
  - timer: {id: t}
  - task: {id: b, run: \"true\", timeout: 5 parsecs}
  - approval: {id: p, title: x, mode: sideways}
";

#[test]
fn validate_reports_every_problem_with_lines() {
    let env = Env::new();
    let wf = env.write("broken.yaml", BROKEN);
    let o = env.sm(&["validate", &wf]);
    o.code(1);
    no_panic(&o);
    let lines: Vec<&str> = o.stderr.lines().collect();
    let at = |line: usize, needle: &str| {
        let prefix = format!("{wf}:{line}: ");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&prefix) && l.contains(needle)),
            "no `{prefix}...{needle}...` line; {o:#?}"
        );
    };
    at(3, "retires");
    at(4, "`a`");
    at(5, "duration");
    at(6, "timeout");
    at(7, "sideways");
    let last = lines.last().unwrap();
    assert!(last.ends_with("problems found"), "{o:#?}");
    let n: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(n >= 5, "{o:#?}");
}

#[test]
fn validate_missing_file() {
    let env = Env::new();
    let o = env.sm(&["validate", "does-not-exist.yaml"]);
    assert_ne!(o.code, 0);
    no_panic(&o);
    o.err_has("does-not-exist.yaml").err_has("cannot read");
    env.sm(&["up", "does-not-exist.yaml"])
        .error("INVALID_WORKFLOW");
}

#[test]
fn up_invalid_file_creates_no_run() {
    let env = Env::new();
    let o = env.up(BROKEN, &[]);
    o.error("INVALID_WORKFLOW");
    o.err_has(":3: ");
    // either the database was never created, or it holds no run
    if env.path().join("db.sqlite").exists() {
        env.sm(&["ps"]).ok().err_has("no runs");
    }
}

// ----- 9. examples -------------------------------------------------------------------------------

#[test]
fn every_example_validates() {
    let dir = repo_root().join("examples/workflows");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let o = run({
                let mut c = Command::new(BIN);
                c.arg("validate").arg(&p);
                c
            });
            o.ok();
            assert!(o.stdout.trim().ends_with(": ok"), "{o:#?}");
            n += 1;
        }
    }
    assert!(n >= 3, "expected examples in {}", dir.display());
}

#[test]
fn example_hello_finishes() {
    let env = Env::new();
    let o = env.sm(&[
        "up",
        &example("hello.yaml"),
        "--input",
        r#"{"who": "tests"}"#,
    ]);
    let out = o.ok().json();
    assert_eq!(out["greet"]["text"], "Hello, tests!");
    assert_eq!(
        out["shout"]["stdout"].as_str().unwrap().trim(),
        "HELLO, TESTS!"
    );
    assert_eq!(out["summary"]["run"], run_id(&o).as_str());
}

#[test]
fn example_every_kind_driven_to_the_end() {
    let env = Env::new();
    let o = env.sm(&[
        "up",
        &example("every-kind.yaml"),
        "--input",
        r#"{"repo": "demo", "sha": "abc123"}"#,
    ]);
    o.code(3).err_has("ship-gate");
    let id = run_id(&o);
    for id in ["plan", "lint", "unit", "docs", "build", "package"] {
        o.err_has(&format!("+ {id} finished"));
    }

    env.sm(&["approve", &id, "--node", "ship-gate"]).ok();
    // next stop: the select approval
    env.sm(&["resume", &id]).code(3).err_has("pick-channel");
    env.sm(&["approve", &id, "--node", "pick-channel", "--select", "chat"])
        .ok();
    // then the event wait (the 2 s timer next to it is waited for in-process)
    let o = env.sm(&["resume", &id]);
    o.code(3).err_has("waiting-event");
    env.sm(&[
        "signal",
        &id,
        "ci.finished",
        "--correlation-id",
        "abc123",
        "--data",
        r#"{"ok": true}"#,
    ])
    .ok();
    let o = env.sm(&["resume", &id]);
    let out = o.ok().json();
    assert_eq!(out["plan"], json!({"repo": "demo", "files": []}));
    assert_eq!(out["package"], json!({"artifact": "pkg-demo"}));
    assert_eq!(out["check"], json!({"ok": true}));
    assert_eq!(out["pick-channel"]["selected"], "chat");
    assert_eq!(out["ci"], json!({"ok": true}));
    // a boolean inside a longer template is written the Jinja way (`True`)
    assert_eq!(
        out["notify"],
        json!({"output": {"sent": "shipped demo (ci ok: true)"}})
    );
    assert_eq!(env.status(&id), "finished");
}

// ----- 10. bad databases -------------------------------------------------------------------------

#[test]
fn bad_db_urls_are_one_line_errors() {
    let env = Env::new();
    let wf = env.write("wf.yaml", SMALL);
    let junk = env.write("junk.db", &"this is not a database\n".repeat(200));
    let urls = [
        "postgres://x".to_string(),
        "mysql://x".to_string(),
        "nonsense://x".to_string(),
        format!("sqlite://{junk}"),
    ];
    for url in &urls {
        for args in [vec!["ps"], vec!["up", wf.as_str()], vec!["inspect", "r1"]] {
            let mut c = Command::new(BIN);
            c.current_dir(env.path()).args(&args).args(["--db", url]);
            let o = run(c);
            assert_eq!(o.code, 1, "{url} {args:?}: {o:#?}");
            no_panic(&o);
            let errs: Vec<&str> = o
                .stderr
                .lines()
                .filter(|l| l.starts_with("error["))
                .collect();
            assert_eq!(errs.len(), 1, "{url} {args:?}: {o:#?}");
        }
    }
}

// ----- 11. default database ----------------------------------------------------------------------

#[test]
fn default_db_is_created_in_cwd() {
    let env = Env::new();
    let wf = env.write("wf.yaml", SMALL);
    let mut c = Command::new(BIN);
    c.current_dir(env.path()).args(["up", &wf]);
    let o = run(c);
    o.ok();
    assert!(env.path().join(".smithers/smithers.db").is_file());
    let mut c = Command::new(BIN);
    c.current_dir(env.path()).arg("ps");
    let ps = run(c);
    assert!(ps.ok().stdout.contains(&run_id(&o)));
}

fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("git is needed for this test: {e}"));
    assert!(o.status.success(), "git {args:?}: {o:?}");
}

#[test]
fn diff_shows_what_a_task_changed_in_its_work_tree() {
    let env = Env::new();
    let repo = env.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    git(&repo, &["config", "user.email", "t@example.com"]);
    git(&repo, &["config", "user.name", "t"]);
    std::fs::write(repo.join("keep.txt"), "one\n").unwrap();
    std::fs::write(repo.join("gone.txt"), "bye\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "start"]);
    let wf = repo.join("wf.yaml");
    std::fs::write(
        &wf,
        "name: edits\nsteps:\n  - task: {id: edit, run: \"echo two >> keep.txt && rm gone.txt && echo new > new.txt\"}\n",
    )
    .unwrap();
    std::fs::write(repo.join(".gitignore"), "wf.yaml\n").unwrap();
    let db = env.db();
    let o = env.sm(&["up", wf.to_str().unwrap()]);
    o.ok();
    let id = run_id(&o);

    let o = env.sm(&["diff", &id, "--node", "edit", "--db", &db]);
    o.ok();
    assert!(
        o.stdout.contains("diff --git a/keep.txt b/keep.txt"),
        "{o:#?}"
    );
    assert!(o.stdout.contains("+two"), "{o:#?}");
    assert!(
        o.stdout.contains("diff --git a/new.txt b/new.txt"),
        "{o:#?}"
    );
    o.err_has("changed 3 files").err_has("delete  gone.txt");

    let j = env
        .sm(&["diff", &id, "--node", "edit", "--json", "--db", &db])
        .ok()
        .json();
    let ops: Vec<(String, String)> = j["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["path"].as_str().unwrap().to_string(),
                p["operation"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        ops.contains(&("gone.txt".into(), "delete".into())),
        "{ops:?}"
    );
    assert!(ops.contains(&("new.txt".into(), "add".into())), "{ops:?}");
    assert!(
        ops.contains(&("keep.txt".into(), "modify".into())),
        "{ops:?}"
    );
    assert_eq!(j["seq"], 1);

    // the patch applies to the original tree
    let patch = env.write(
        "edit.patch",
        &env.sm(&["diff", &id, "--node", "edit", "--db", &db]).stdout,
    );
    git(&repo, &["stash", "-u", "-q"]);
    git(&repo, &["apply", "--check", &patch]);

    let e = env.sm(&["diff", &id, "--node", "nope", "--db", &db]);
    e.error("NODE_NOT_FOUND");
}

// ----- loops: `until` after each iteration ------------------------------------------------------

/// A loop whose body appends a line to `count` and outputs `{n: iteration + 1}`.
fn counting_loop(until: &str) -> String {
    format!(
        r#"
name: counting
steps:
  - loop:
      id: again
      max_iterations: 5
      until: "{until}"
      steps:
        - task: {{id: tick, run: "echo x >> count"}}
        - task: {{id: check, value: {{n: "{{{{ iteration + 1 }}}}"}}, depends_on: [tick]}}
"#
    )
}

fn iterations(env: &Env) -> usize {
    std::fs::read_to_string(env.path().join("count"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn loop_until_reading_its_own_output_is_checked_after_each_iteration() {
    let env = Env::new();
    let o = env.up(&counting_loop("outputs.check.n >= 2"), &[]);
    o.ok();
    assert_eq!(iterations(&env), 2, "{o:#?}");
    assert_eq!(o.json()["check"], json!({"n": 2}));
}

#[test]
fn loop_whose_until_already_holds_still_runs_once() {
    let env = Env::new();
    env.up(&counting_loop("true"), &[]).ok();
    assert_eq!(iterations(&env), 1);
}

#[test]
fn loop_until_that_still_fails_after_an_iteration_fails_the_run() {
    let env = Env::new();
    let o = env.up(&counting_loop("outputs.check.missing.deeper"), &[]);
    o.code(1);
    assert!(o.stderr.contains("EXPRESSION_ERROR"), "{o:#?}");
    assert_eq!(iterations(&env), 1, "it failed after the first iteration");
}

// ----- copyable hints ---------------------------------------------------------------------------

/// The command in backticks after `-- ` on the first stderr line that contains `needle`.
#[track_caller]
fn hint(o: &Out, needle: &str) -> String {
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no `{needle}` line: {o:#?}"));
    line.split("-- `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("no hint in {line}"))
        .to_string()
}

#[test]
fn waiting_hints_run_as_printed_in_a_shell() {
    let env = Env::new();
    let yaml = r#"
name: hints
steps:
  - approval:
      id: pick
      title: "Where?"
      mode: select
      options:
        - {key: chat, label: "Team chat"}
        - {key: mail, label: "Mailing list"}
  - wait_for_event:
      id: ci
      event: ci.finished
      correlation_id: "issue 42's"
  - task: {id: done, value: {channel: "{{ outputs.pick.selected }}"}}
"#;
    let o = env.up(yaml, &[]);
    o.code(3);
    let id = run_id(&o);
    let approve = hint(&o, "needs approval");
    assert!(approve.contains("--select chat"), "{approve}");
    assert!(o.stderr.contains("(choices: chat, mail)"), "{o:#?}");
    let paste = |cmd: &str| {
        // the printed command, with this test's binary and database
        let cmd = cmd.replacen("smithers ", &format!("{BIN} "), 1);
        let mut c = Command::new("sh");
        c.current_dir(env.path())
            .arg("-c")
            .arg(format!("{cmd} --db {}", env.db()));
        run(c)
    };
    paste(&approve).ok();
    let resumed = env.sm(&["resume", &id]);
    resumed.code(3);
    let signal = hint(&resumed, "waits for event");
    assert!(
        signal.contains("--correlation-id 'issue 42'\\''s'"),
        "{signal}"
    );
    paste(&signal).ok();
    let done = env.sm(&["resume", &id]);
    done.ok();
    assert_eq!(done.json()["done"], json!({"channel": "chat"}));
}

// ----- signals sent early -----------------------------------------------------------------------

#[test]
fn signal_sent_before_the_wait_is_kept_for_the_first_matching_wait_only() {
    let env = Env::new();
    let yaml = r#"
name: early
steps:
  - approval: {id: gate, title: "go?"}
  - wait_for_event: {id: first, event: ci.finished}
  - wait_for_event: {id: second, event: ci.finished}
  - task: {id: done, value: {first: "{{ signals.first.n }}", second: "{{ signals.second.n }}"}}
"#;
    let o = env.up(yaml, &[]);
    o.code(3);
    let id = run_id(&o);
    // nobody waits for it yet
    env.sm(&["signal", &id, "ci.finished", "--data", r#"{"n": 1}"#])
        .ok();
    env.sm(&["approve", &id, "--node", "gate"]).ok();
    let r = env.sm(&["resume", &id]);
    r.code(3);
    assert!(
        r.stderr.contains("second waits for event"),
        "the early signal woke `first` only: {r:#?}"
    );
    // a name no wait listens for would be kept forever: refused, naming the ones that count
    let typo = env.sm(&["signal", &id, "ci.finshed"]);
    typo.code(1);
    typo.err_has("error[UNKNOWN_SIGNAL]: no step of run");
    typo.err_has("waits for a signal named `ci.finshed`; its waits listen for: `ci.finished`");
    env.sm(&["signal", &id, "ci.finished", "--data", r#"{"n": 2}"#])
        .ok();
    let done = env.sm(&["resume", &id]);
    done.ok();
    assert_eq!(done.json()["done"], json!({"first": 1, "second": 2}));
}

// ----- task output: live lines, --quiet, logs ---------------------------------------------------

const CHATTY: &str = r#"
name: chatty
steps:
  - task: {id: build, run: "printf 'one\ntwo\n'; sleep 0.2; printf 'thr'; sleep 0.2; echo ee; sleep 0.2; echo oops >&2"}
  - task: {id: test, run: "echo tested"}
"#;

#[test]
fn up_shows_task_output_as_whole_lines_and_quiet_hides_it() {
    let env = Env::new();
    let o = env.up(CHATTY, &["--run-id", "c1"]);
    o.ok();
    let lines: Vec<&str> = o.stderr.lines().collect();
    let at = |l: &str| {
        lines
            .iter()
            .position(|x| *x == l)
            .unwrap_or_else(|| panic!("no line {l:?}: {o:#?}"))
    };
    // in order, between the node's start and its finish; a line split across writes is whole
    assert!(at("  > build started (attempt 1)") < at("    build | one"));
    assert!(at("    build | one") < at("    build | two"));
    assert!(at("    build | two") < at("    build | three"));
    at("    build | oops");
    assert!(
        lines[at("    build | three")..]
            .iter()
            .any(|l| l.starts_with("  + build finished"))
    );
    assert!(at("    test | tested") > at("  > test started (attempt 1)"));

    let q = env.up(CHATTY, &["--run-id", "c2", "--quiet"]);
    q.ok();
    assert!(!q.stderr.contains(" | "), "{q:#?}");
    q.err_has("+ build finished");
}

#[test]
fn logs_prints_a_runs_output_and_follows_a_live_one() {
    let env = Env::new();
    env.up(CHATTY, &["--run-id", "c1"]).ok();
    let all = env.sm(&["logs", "c1"]);
    all.ok();
    assert_eq!(
        all.stdout,
        "build | one\nbuild | two\nbuild | three\nbuild | oops\ntest | tested\n"
    );
    // one node: the text as written
    let one = env.sm(&["logs", "c1", "--node", "build"]);
    one.ok();
    assert_eq!(one.stdout, "one\ntwo\nthree\noops\n");
    env.sm(&["logs", "nope"]).error("RUN_NOT_FOUND");

    // --follow on a run that another process is driving: everything, then it returns
    let wf = env.write(
        "slow.yaml",
        "name: slow\nsteps:\n  - task: {id: tick, run: \"for i in 1 2 3 4 5; do echo t$i; sleep 0.3; done\"}\n",
    );
    let mut up = env
        .cmd(&["up", &wf, "--run-id", "s1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // wait until the run exists, then follow it
    let t0 = Instant::now();
    while !env.sm(&["logs", "s1"]).stderr.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the run never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let f = env.sm(&["logs", "s1", "--follow"]);
    f.ok();
    assert_eq!(
        f.stdout,
        "tick | t1\ntick | t2\ntick | t3\ntick | t4\ntick | t5\n"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "--follow returned once the run ended"
    );
    assert!(up.wait().unwrap().success());
}

#[test]
fn a_terminal_gets_symbols_and_an_elapsed_time_line() {
    let env = Env::new();
    let wf = env.write("chatty.yaml", CHATTY);
    // `script` runs the command on a pseudo-terminal
    let o = run({
        let mut c = Command::new("script");
        c.current_dir(env.path())
            .env_remove("NO_COLOR")
            .env("TERM", "xterm")
            .args([
                "-qec",
                &format!("{BIN} up {wf} --db {}", env.db()),
                "/dev/null",
            ]);
        c
    });
    o.ok();
    assert!(o.stdout.contains("⏱ 0s"), "{o:#?}");
    assert!(o.stdout.contains("\x1b[2K"), "{o:#?}");
    assert!(o.stdout.contains("✓"), "{o:#?}");
    assert!(o.stdout.contains("\x1b[32m"), "coloured: {o:#?}");
    // NO_COLOR keeps the symbols, drops the colours
    let o = run({
        let mut c = Command::new("script");
        c.current_dir(env.path())
            .env("NO_COLOR", "1")
            .env("TERM", "xterm")
            .args([
                "-qec",
                &format!("{BIN} up {wf} --db {}", env.db()),
                "/dev/null",
            ]);
        c
    });
    o.ok();
    assert!(
        o.stdout.contains("✓") && !o.stdout.contains("\x1b[32m"),
        "{o:#?}"
    );
}

/// mimalloc commits its arena as it is used (an idle server stays small): the option is set
/// from `.init_array`, before Rust's first allocation creates the arena. mimalloc reports its
/// options when asked to be verbose.
#[cfg(target_os = "linux")]
#[test]
fn allocator_commits_its_arena_lazily() {
    let out = match std::process::Command::new(BIN)
        .arg("--version")
        .env("MIMALLOC_VERBOSE", "1")
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("{BIN}: {e}"),
    };
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("option 'arena_eager_commit': 0"),
        "mimalloc's options: {err}"
    );
}
