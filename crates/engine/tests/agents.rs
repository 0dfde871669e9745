//! Agent tasks end to end, without network: fake CLIs (POSIX sh scripts in
//! `tests/fixtures/agents/` that print what the real CLIs print) and a mock HTTP server on a
//! loopback socket for the providers. Every test has its own database, fake-CLI directory and
//! port, so they run in parallel.

#[path = "support/mock_http.rs"]
mod mock_http;

use mock_http::Canned;
use serde_json::{Value, json};
use smithers_core::agent::{AgentDef, PromptMode};
use smithers_core::build::{FnWorkflow, agent_task, seq};
use smithers_core::{Code, Workflow};
use smithers_engine::{Engine, EngineConfig, RunOutcome, StartOptions};
use smithers_store::{AttemptRow, EventRow, Store};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const REVIEW_SCHEMA: &str = "{type: object, required: [approved], properties: {approved: {type: boolean}, notes: {type: string}}}";

fn review_schema() -> Value {
    json!({"type": "object", "required": ["approved"],
           "properties": {"approved": {"type": "boolean"}, "notes": {"type": "string"}}})
}

fn fixture(name: &str) -> String {
    format!(
        "{}/tests/fixtures/agents/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A YAML string literal.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

struct Env {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    engine: Engine,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = smithers_store::open(&format!(
        "sqlite://{}",
        dir.path().join("db.sqlite").display()
    ))
    .await
    .unwrap();
    let engine = Engine::new(
        store.clone(),
        EngineConfig {
            default_cwd: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    );
    Env { dir, store, engine }
}

impl Env {
    fn workflow(&self, yaml: &str) -> Arc<dyn Workflow> {
        let path = self.dir.path().join("wf.yaml");
        std::fs::write(&path, yaml).unwrap();
        match smithers_core::yaml::load_file(&path) {
            Ok(w) => w,
            Err(p) => panic!("invalid test workflow: {p:?}"),
        }
    }

    async fn run(&self, yaml: &str) -> RunOutcome {
        self.run_wf(self.workflow(yaml)).await
    }

    async fn run_wf(&self, wf: Arc<dyn Workflow>) -> RunOutcome {
        self.engine
            .start(wf, json!({"repo": "demo"}), StartOptions::default())
            .await
            .unwrap()
            .wait()
            .await
    }

    /// Attempts of a node (iteration 0), oldest first.
    async fn attempts(&self, run: &str, node: &str) -> Vec<AttemptRow> {
        let mut a = self.store.list_node_attempts(run, node, 0).await.unwrap();
        a.reverse();
        a
    }

    async fn events(&self, run: &str, ty: &str) -> Vec<(EventRow, Value)> {
        self.store
            .list_events(run, None, 100_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == ty)
            .map(|e| {
                let p = serde_json::from_str(&e.payload_json).unwrap();
                (e, p)
            })
            .collect()
    }
}

fn meta(a: &AttemptRow) -> Value {
    serde_json::from_str(a.meta_json.as_deref().unwrap_or("null")).unwrap()
}

fn error(a: &AttemptRow) -> Value {
    serde_json::from_str(a.error_json.as_deref().unwrap_or("null")).unwrap()
}

/// The directory a fake CLI reads its replies and modes from and logs its calls to.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Reply N of the fake; the last one repeats.
    fn replies(&self, texts: &[&str]) {
        for (i, t) in texts.iter().enumerate() {
            self.write(
                &format!("{}.json", i + 1),
                &serde_json::to_string(t).unwrap(),
            );
            self.write(&format!("{}.txt", i + 1), t);
        }
        if let Some(t) = texts.last() {
            self.write("last.json", &serde_json::to_string(t).unwrap());
            self.write("last.txt", t);
        }
    }

    fn mode(&self, call: u32, mode: &str) {
        self.write(&format!("mode-{call}"), mode);
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn calls(&self) -> u32 {
        self.read("calls").trim().parse().unwrap_or(0)
    }

    fn args(&self, call: u32) -> Vec<String> {
        let n: usize = self
            .read(&format!("argc-{call}"))
            .trim()
            .parse()
            .unwrap_or(0);
        (0..n)
            .map(|i| self.read(&format!("arg-{call}-{i}")))
            .collect()
    }

    fn stdin(&self, call: u32) -> String {
        self.read(&format!("stdin-{call}"))
    }

    fn survivor(&self) -> PathBuf {
        self.dir.path().join("survivor")
    }
}

/// A workflow with one agent `a` and one task `review` calling it.
fn one_task(agent: &str, task_extra: &str, fake: &Fake) -> String {
    format!(
        "name: agents-test\noutputs:\n  review: {REVIEW_SCHEMA}\nagents:\n  a: {agent}\nsteps:\n  - task:\n      id: review\n      agent: a\n      output: review\n      prompt: \"Review {{{{ input.repo }}}} carefully\"\n      env: {{FAKE_DIR: {}}}\n{task_extra}",
        q(&fake.path())
    )
}

fn claude(extra: &str) -> String {
    format!(
        "{{preset: claude-code, bin: [/bin/sh, {}]{extra}}}",
        q(&fixture("fake-claude.sh"))
    )
}

fn command(extra_args: &str, extra: &str) -> String {
    format!(
        "{{command: [/bin/sh, {}{extra_args}]{extra}}}",
        q(&fixture("fake-command.sh"))
    )
}

fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
}

// ----- CLI presets -----------------------------------------------------------------------------

#[tokio::test]
async fn claude_repairs_invalid_output_within_one_attempt() {
    let e = env().await;
    let fake = Fake::new();
    fake.replies(&[
        "Here is my review: {\"approved\": yes}",
        "```json\n{\"approved\": \"yes\"}\n```",
        "Fixed it.\n```json\n{\"approved\": true, \"notes\": \"looks good\"}\n```",
    ]);
    let o = e
        .run(&one_task(
            &claude(", model: sonnet, allow_tools: [Read, Grep]"),
            "",
            &fake,
        ))
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(
        o.output.unwrap()["review"],
        json!({"approved": true, "notes": "looks good"})
    );
    // three turns, one attempt
    assert_eq!(fake.calls(), 3);
    let first = fake.args(1);
    for flag in ["--print", "--verbose"] {
        assert!(first.contains(&flag.to_string()), "{first:?}");
    }
    assert!(has_pair(&first, "--output-format", "stream-json"));
    assert!(has_pair(&first, "--model", "sonnet"));
    assert!(has_pair(&first, "--allowed-tools", "Read,Grep"));
    assert!(!first.iter().any(|a| a == "--resume"));
    let prompt = first.last().unwrap();
    assert!(prompt.starts_with("IMPORTANT:"), "{prompt}");
    assert!(prompt.contains("Review demo carefully"));
    assert!(prompt.contains("**REQUIRED OUTPUT**") && prompt.contains("\"approved\""));
    // repair turns continue the session and say what was wrong
    let second = fake.args(2);
    assert!(
        has_pair(&second, "--resume", "claude-session-1"),
        "{second:?}"
    );
    assert!(second.last().unwrap().contains("no JSON result"));
    let third = fake.args(3);
    assert!(has_pair(&third, "--resume", "claude-session-1"));
    assert!(third.last().unwrap().contains("/approved"), "{third:?}");

    let attempts = e.attempts(&o.run_id, "review").await;
    assert_eq!(attempts.len(), 1);
    let a = &attempts[0];
    assert_eq!(a.state, "finished");
    assert!(a.response_text.as_deref().unwrap().contains("looks good"));
    let m = meta(a);
    assert_eq!(m["kind"], "agent");
    assert_eq!(m["agentId"], "a");
    assert_eq!(m["agentEngine"], "claude-code");
    assert_eq!(m["agentModel"], "sonnet");
    assert_eq!(m["agentResume"], "claude-session-1");
    assert_eq!(m["repairTurns"], 2);
    assert_eq!(m["turns"].as_array().unwrap().len(), 3);
    assert!(
        m["turns"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("no JSON")
    );
    assert_eq!(m["outputSchema"], review_schema());
    let u = &m["usage"];
    assert_eq!(u["inputTokens"], 300);
    assert_eq!(u["outputTokens"], 60);
    assert_eq!(u["cacheReadTokens"], 150);
    assert_eq!(u["cacheWriteTokens"], 30);
    assert!((u["costUsd"].as_f64().unwrap() - 0.0375).abs() < 1e-9);
    let hb: Value = serde_json::from_str(a.heartbeat_data_json.as_deref().unwrap()).unwrap();
    assert_eq!(
        hb,
        json!({"agentEngine": "claude-code", "agentResume": "claude-session-1"})
    );
    let usage = e.events(&o.run_id, "TokenUsageReported").await;
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].1["inputTokens"], 300);
    assert_eq!(usage[0].1["agent"], "a");
    assert_eq!(usage[0].1["model"], "sonnet");
    assert_eq!(usage[0].1["attempt"], 1);
    let beats = e.events(&o.run_id, "TaskHeartbeat").await;
    assert!(beats.iter().any(|(_, p)| p["hasData"] == true), "{beats:?}");
    // the agent's stream went out as output events
    let outs = e.events(&o.run_id, "NodeOutput").await;
    assert!(outs.iter().any(|(_, p)| {
        p["stream"] == "stdout" && p["text"].as_str().unwrap().contains("system")
    }));
}

#[tokio::test]
async fn no_valid_output_after_three_repairs_fails_the_attempt_then_retries() {
    let e = env().await;
    let fake = Fake::new();
    fake.replies(&["I reviewed it and it is fine."]);
    let o = e
        .run(&one_task(
            &claude(""),
            "      retries: 1\n      backoff: 10ms\n",
            &fake,
        ))
        .await;
    assert_eq!(o.status, "failed");
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::InvalidOutput);
    assert!(
        err.message.contains("after 3 repair turns"),
        "{}",
        err.message
    );
    // 2 attempts × (1 + 3 repair turns)
    assert_eq!(fake.calls(), 8);
    let attempts = e.attempts(&o.run_id, "review").await;
    assert_eq!(attempts.len(), 2);
    for a in &attempts {
        assert_eq!(a.state, "failed");
        assert_eq!(error(a)["retryable"], true);
        assert_eq!(meta(a)["repairTurns"], 3);
        assert_eq!(
            a.response_text.as_deref(),
            Some("I reviewed it and it is fine.")
        );
    }
    // the second attempt continues the session the first one checkpointed
    assert!(has_pair(&fake.args(5), "--resume", "claude-session-1"));
    assert_eq!(meta(&attempts[1])["resumedFromSession"], "claude-session-1");
}

#[tokio::test]
async fn crash_is_retried_and_the_next_attempt_resumes_the_session() {
    let e = env().await;
    let fake = Fake::new();
    fake.mode(1, "crash");
    fake.replies(&["{\"approved\": true}"]);
    let o = e
        .run(&one_task(&claude(""), "      backoff: 10ms\n", &fake))
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let attempts = e.attempts(&o.run_id, "review").await;
    assert_eq!(attempts.len(), 2);
    let err = error(&attempts[0]);
    assert_eq!(err["code"], "AGENT_CLI_ERROR");
    assert_eq!(err["retryable"], true);
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("exited with 3") && msg.contains("the fake agent crashed"),
        "{msg}"
    );
    assert!(
        !msg.contains("REQUIRED OUTPUT"),
        "the prompt leaked into the error: {msg}"
    );
    // the session id was checkpointed while the first attempt ran, before it crashed
    let hb: Value =
        serde_json::from_str(attempts[0].heartbeat_data_json.as_deref().unwrap()).unwrap();
    assert_eq!(hb["agentResume"], "claude-session-1");
    assert!(has_pair(&fake.args(2), "--resume", "claude-session-1"));
}

#[tokio::test]
async fn agent_killed_by_a_signal_is_a_retryable_cli_error() {
    let e = env().await;
    let fake = Fake::new();
    fake.mode(1, "killed");
    fake.replies(&["{\"approved\": true}"]);
    let o = e
        .run(&one_task(&command("", ""), "      retries: 0\n", &fake))
        .await;
    assert_eq!(o.status, "failed");
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::AgentCliError);
    assert!(err.retryable);
    assert!(
        err.message.contains("killed by a signal"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn login_and_key_errors_are_terminal() {
    let e = env().await;
    let fake = Fake::new();
    fake.mode(1, "auth");
    let o = e.run(&one_task(&claude(""), "", &fake)).await;
    assert_eq!(o.status, "failed");
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::AgentConfigInvalid, "{}", err.message);
    assert!(!err.retryable);
    assert!(err.message.contains("Invalid API key"), "{}", err.message);
    // retries do not apply to a configuration error
    assert_eq!(fake.calls(), 1);

    let fake = Fake::new();
    fake.mode(1, "auth");
    let gemini = format!(
        "{{preset: gemini, bin: [/bin/sh, {}]}}",
        q(&fixture("fake-gemini.sh"))
    );
    let o = e.run(&one_task(&gemini, "", &fake)).await;
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::AgentConfigInvalid, "{}", err.message);
    assert!(err.message.contains("exited with 41"), "{}", err.message);
}

#[tokio::test]
async fn after_a_login_error_the_agent_is_not_called_again_in_the_run() {
    let e = env().await;
    let fake = Fake::new();
    fake.mode(1, "auth");
    fake.mode(2, "auth");
    let yaml = format!(
        "name: breaker\nagents:\n  a: {}\nsteps:\n  - task: {{id: first, agent: a, prompt: one, continue_on_fail: true, env: {{FAKE_DIR: {dir}}}}}\n  - task: {{id: second, agent: a, prompt: two, env: {{FAKE_DIR: {dir}}}}}\n",
        claude(""),
        dir = q(&fake.path())
    );
    let o = e.run(&yaml).await;
    assert_eq!(o.status, "failed");
    assert_eq!(fake.calls(), 1, "the second task did not call the agent");
    let second = e.attempts(&o.run_id, "second").await;
    let err = error(&second[0]);
    assert_eq!(err["code"], "AGENT_CONFIG_INVALID", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("already failed in this run"),
        "{err}"
    );
}

#[tokio::test]
async fn a_prompt_too_long_for_one_argument_is_a_task_error_not_a_broken_agent() {
    let e = env().await;
    let fake = Fake::new();
    let long = "x".repeat(200 * 1024);
    let yaml = format!(
        "name: long\nagents:\n  a: {}\nsteps:\n  - task: {{id: big, agent: a, prompt: \"{long}\", continue_on_fail: true, env: {{FAKE_DIR: {dir}}}}}\n  - task: {{id: small, agent: a, prompt: short, env: {{FAKE_DIR: {dir}}}}}\n",
        claude(""),
        dir = q(&fake.path())
    );
    fake.replies(&["{\"approved\": true}"]);
    let o = e.run(&yaml).await;
    let big = e.attempts(&o.run_id, "big").await;
    let err = error(&big[0]);
    assert_eq!(err["code"], "INVALID_INPUT", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("128 KiB"),
        "{err}"
    );
    // the agent itself is fine: the next task calls it
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn timeout_kills_the_agents_whole_process_group() {
    let e = env().await;
    let fake = Fake::new();
    fake.mode(1, "hang");
    let t0 = Instant::now();
    let o = e
        .run(&one_task(
            &claude(""),
            "      timeout: 300ms\n      retries: 0\n",
            &fake,
        ))
        .await;
    assert_eq!(o.status, "failed");
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::TaskTimeout);
    assert!(
        err.message.contains("300 ms") && err.message.contains("process group"),
        "{}",
        err.message
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    // the grandchild would have written its file after 1 s
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        !fake.survivor().exists(),
        "a child of the agent outlived the timeout"
    );
}

#[tokio::test]
async fn a_hung_agent_is_killed_after_its_idle_timeout_and_retried() {
    let e = env().await;
    let fake = Fake::new();
    // call 1 prints one line and then nothing; call 2 answers
    fake.mode(1, "hang");
    fake.replies(&["{\"approved\": true, \"notes\": \"ok\"}"]);
    let t0 = Instant::now();
    let o = e
        .run(&one_task(
            &command("", ", idle_timeout: 400ms"),
            "      retries: 1\n      backoff: 10ms\n",
            &fake,
        ))
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let attempts = e.attempts(&o.run_id, "review").await;
    assert_eq!(attempts.len(), 2);
    let first = attempts.iter().find(|a| a.attempt == 1).unwrap();
    let err = error(first);
    assert_eq!(err["code"], "TASK_IDLE_TIMEOUT", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("printed nothing for 400 ms"),
        "{err}"
    );
    // the agent's child (it would write the file after 1 s) died with its group
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        !fake.survivor().exists(),
        "a child of the hung agent outlived the idle timeout"
    );
}

#[test]
fn idle_timeout_is_for_cli_agents_only() {
    let dir = tempfile::tempdir().unwrap();
    let bad = "name: w\nagents:\n  p: {provider: anthropic, model: m, idle_timeout: 5m}\nsteps:\n  - task: {id: t, agent: p, prompt: hi}\n";
    let e = format!(
        "{:?}",
        smithers_core::yaml::load_str(bad, "w.yaml", dir.path()).unwrap_err()
    );
    assert!(
        e.contains("`idle_timeout` only applies to CLI agents"),
        "{e}"
    );
    let bad = "name: w\nagents:\n  c: {command: [x], idle_timeout: soon}\nsteps:\n  - task: {id: t, agent: c, prompt: hi}\n";
    let e = format!(
        "{:?}",
        smithers_core::yaml::load_str(bad, "w.yaml", dir.path()).unwrap_err()
    );
    assert!(e.contains("idle_timeout"), "{e}");
}

#[tokio::test]
async fn cancelling_the_run_kills_a_running_agent() {
    let e = env().await;
    let fake = Fake::new();
    fake.mode(1, "hang");
    let wf = e.workflow(&one_task(&command("", ""), "", &fake));
    let h = e
        .engine
        .start(wf, json!({"repo": "demo"}), StartOptions::default())
        .await
        .unwrap();
    let run_id = h.run_id.clone();
    let t0 = Instant::now();
    while fake.calls() == 0 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    e.engine.cancel(&run_id).await.unwrap();
    let o = h.wait().await;
    assert_eq!(o.status, "cancelled", "{:?}", o.error);
    let a = e.attempts(&run_id, "review").await;
    assert_eq!(a[0].state, "cancelled");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        !fake.survivor().exists(),
        "a child of the agent outlived the cancel"
    );
}

#[tokio::test]
async fn output_streams_while_the_agent_works() {
    let e = env().await;
    let fake = Fake::new();
    fake.mode(1, "slow");
    fake.replies(&["{\"approved\": true}"]);
    let o = e.run(&one_task(&claude(""), "", &fake)).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let finished = e.events(&o.run_id, "NodeFinished").await[0].0.timestamp_ms;
    let outs = e.events(&o.run_id, "NodeOutput").await;
    let first = outs.first().unwrap().0.timestamp_ms;
    assert!(
        finished - first >= 500,
        "output came late: {}",
        finished - first
    );
    let stderr = outs.iter().find(|(_, p)| p["stream"] == "stderr").unwrap();
    assert!(stderr.1["text"].as_str().unwrap().contains("half way"));
    assert!(stderr.0.timestamp_ms < finished - 200);
}

#[tokio::test]
async fn a_silent_agent_still_heartbeats() {
    let e = env().await;
    let fake = Fake::new();
    fake.mode(1, "silent");
    fake.replies(&["{\"approved\": true}"]);
    let o = e.run(&one_task(&command("", ""), "", &fake)).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let first_output = e.events(&o.run_id, "NodeOutput").await[0].0.seq;
    let beats = e.events(&o.run_id, "TaskHeartbeat").await;
    assert!(
        beats
            .iter()
            .any(|(ev, p)| ev.seq < first_output && p["hasData"] == false),
        "no heartbeat while the agent was silent: {beats:?}"
    );
}

#[tokio::test]
async fn codex_reads_the_prompt_from_stdin_and_answers_in_a_file() {
    let e = env().await;
    let fake = Fake::new();
    fake.replies(&[
        "not yet",
        "```json\n{\"approved\": false, \"notes\": \"tests fail\"}\n```",
    ]);
    let agent = format!(
        "{{preset: codex, bin: {}, model: gpt-5-codex, allow_tools: []}}",
        q(&fixture("fake-codex.sh"))
    );
    let o = e.run(&one_task(&agent, "", &fake)).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(o.output.unwrap()["review"]["notes"], "tests fail");
    let first = fake.args(1);
    assert_eq!(first[0], "exec");
    assert!(first.contains(&"--json".to_string()));
    assert!(has_pair(&first, "--sandbox", "read-only"));
    assert!(has_pair(&first, "--model", "gpt-5-codex"));
    assert_eq!(first.last().unwrap(), "-");
    assert!(fake.stdin(1).contains("Review demo carefully"));
    assert!(fake.stdin(1).contains("REQUIRED OUTPUT"));
    // the repair turn resumes the thread and sends only the repair request
    let second = fake.args(2);
    assert!(has_pair(&second, "resume", "codex-thread-1"), "{second:?}");
    assert!(
        fake.stdin(2).starts_with("Your last reply"),
        "{}",
        fake.stdin(2)
    );
    let a = &e.attempts(&o.run_id, "review").await[0];
    let m = meta(a);
    assert_eq!(m["agentResume"], "codex-thread-1");
    assert_eq!(
        m["usage"],
        json!({"inputTokens": 400, "outputTokens": 60, "cacheReadTokens": 160})
    );
}

#[tokio::test]
async fn gemini_gets_the_prompt_as_an_option_and_reports_usage() {
    let e = env().await;
    let fake = Fake::new();
    fake.replies(&["Done.\n```json\n{\"approved\": true}\n```"]);
    let agent = format!(
        "{{preset: gemini, bin: [/bin/sh, {}], model: gemini-2.5-flash}}",
        q(&fixture("fake-gemini.sh"))
    );
    let o = e.run(&one_task(&agent, "", &fake)).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let args = fake.args(1);
    assert!(has_pair(&args, "--output-format", "json"));
    assert!(args.contains(&"--yolo".to_string()));
    let prompt = fake.read("prompt-1");
    assert!(prompt.contains("REQUIRED OUTPUT") && prompt.contains("Remember"));
    let m = meta(&e.attempts(&o.run_id, "review").await[0]);
    assert_eq!(m["agentResume"], "gemini-session-1");
    assert_eq!(
        m["usage"],
        json!({"inputTokens": 300, "outputTokens": 40, "cacheReadTokens": 5, "reasoningTokens": 7})
    );
}

#[tokio::test]
async fn command_agents_get_stdin_or_an_argument_and_a_flattened_repair() {
    let e = env().await;
    let fake = Fake::new();
    fake.replies(&["approved, I think", "{\"approved\": true}"]);
    fake.write(
        "usage",
        r#"{"input_tokens": 7, "output_tokens": 2, "cost_usd": 0.001}"#,
    );
    let o = e
        .run(&one_task(
            &command("", ", model: local-1, allow_tools: [read]"),
            "",
            &fake,
        ))
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert!(fake.stdin(1).contains("Review demo carefully"));
    // no session to resume: the repair turn carries the conversation
    let second = fake.stdin(2);
    assert!(second.starts_with("USER: IMPORTANT:"), "{second}");
    assert!(second.contains("\n\nASSISTANT: approved, I think\n\nUSER: Your last reply"));
    let env1 = fake.read("env-1");
    for line in [
        "SMITHERS_AGENT=a",
        "SMITHERS_NODE_ID=review",
        "SMITHERS_ATTEMPT=1",
        "SMITHERS_TURN=0",
        "SMITHERS_MODEL=local-1",
        "SMITHERS_ALLOW_TOOLS=read",
    ] {
        assert!(
            env1.lines().any(|l| l == line),
            "{line} missing from {env1}"
        );
    }
    assert!(fake.read("env-2").contains("SMITHERS_TURN=1"));
    let m = meta(&e.attempts(&o.run_id, "review").await[0]);
    assert_eq!(m["usage"]["inputTokens"], 14);
    assert_eq!(m["usage"]["outputTokens"], 4);
    assert!((m["usage"]["costUsd"].as_f64().unwrap() - 0.002).abs() < 1e-9);

    // prompt as the last argument; a task without an output schema gets the text
    let fake = Fake::new();
    fake.replies(&["all good"]);
    let yaml = format!(
        "name: t\nagents:\n  a: {}\nsteps:\n  - task: {{id: say, agent: a, prompt: \"-say hi\", env: {{FAKE_DIR: {}}}}}\n",
        command(", --prompt-arg", ", prompt: arg"),
        q(&fake.path())
    );
    let o = e.run(&yaml).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(o.output.unwrap()["say"], json!({"text": "all good"}));
    assert_eq!(fake.args(1), vec!["--prompt-arg", "-say hi"]);
    let a = &e.attempts(&o.run_id, "say").await[0];
    assert_eq!(a.response_text.as_deref(), Some("all good"));
    assert_eq!(meta(a)["prompt"], "-say hi");
}

#[tokio::test]
async fn preset_program_comes_from_bin_env_var_or_is_a_clear_error() {
    let e = env().await;
    // SMITHERS_CLAUDE_BIN (here from the task's env) replaces `claude`
    let fake = Fake::new();
    fake.replies(&["{\"approved\": true}"]);
    let yaml = one_task("{preset: claude-code}", "", &fake).replace(
        "env: {FAKE_DIR:",
        &format!(
            "env: {{SMITHERS_CLAUDE_BIN: {}, FAKE_DIR:",
            q(&fixture("fake-claude.sh"))
        ),
    );
    let o = e.run(&yaml).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(fake.calls(), 1);

    let fake = Fake::new();
    let o = e
        .run(&one_task(
            "{preset: claude-code, bin: /nonexistent/claude}",
            "",
            &fake,
        ))
        .await;
    assert_eq!(o.status, "failed");
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::AgentConfigInvalid);
    assert!(
        err.message.contains("SMITHERS_CLAUDE_BIN"),
        "{}",
        err.message
    );
    assert_eq!(e.attempts(&o.run_id, "review").await.len(), 1);
}

#[tokio::test]
async fn rust_workflows_declare_agents_too() {
    let e = env().await;
    let fake = Fake::new();
    fake.replies(&["{\"approved\": true}"]);
    let dir = fake.path();
    let wf = FnWorkflow::new("rust-agents", move |_| {
        let mut t = agent_task("review", "local", "Review it").output_schema(review_schema());
        if let smithers_core::TaskKind::Agent(a) = &mut t.kind {
            a.env.insert("FAKE_DIR".into(), dir.clone());
        }
        Ok(seq(vec![t.node()]))
    })
    .with_agent(AgentDef::command(
        "local",
        vec!["/bin/sh".into(), fixture("fake-command.sh")],
        PromptMode::Stdin,
    ));
    let o = e.run_wf(Arc::new(wf)).await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(o.output.unwrap()["review"], json!({"approved": true}));

    // an agent the workflow does not declare fails at once, without retries
    let wf = FnWorkflow::new("no-agents", |_| {
        Ok(seq(vec![agent_task("t", "ghost", "hi").node()]))
    });
    let o = e.run_wf(Arc::new(wf)).await;
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::AgentConfigInvalid);
    assert!(err.message.contains("ghost"));
    assert_eq!(e.attempts(&o.run_id, "t").await.len(), 1);
}

// ----- HTTP providers --------------------------------------------------------------------------

fn provider_task(agent: &str, env: &str, extra: &str) -> String {
    format!(
        "name: providers\noutputs:\n  review: {REVIEW_SCHEMA}\nagents:\n  api: {agent}\nsteps:\n  - task:\n      id: review\n      agent: api\n      output: review\n      prompt: \"Review {{{{ input.repo }}}}\"\n      env: {env}\n{extra}"
    )
}

#[tokio::test]
async fn openai_compatible_provider_sends_the_schema_and_repairs() {
    let e = env().await;
    let mock = mock_http::start(vec![
        Canned::Json(200, json!({"id": "c1", "choices": [{"index": 0, "message": {"role": "assistant", "content": "I would approve it."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}})),
        Canned::Json(200, json!({"id": "c2", "choices": [{"index": 0, "message": {"role": "assistant", "content": "{\"approved\": true}"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 8}}})),
    ])
    .await;
    let agent = format!(
        "{{provider: openai-compatible, base_url: {}, model: m-1, api_key_env: TEST_KEY}}",
        q(&format!("{}/v1/", mock.url))
    );
    let o = e
        .run(&provider_task(&agent, "{TEST_KEY: sk-test-123}", ""))
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(o.output.unwrap()["review"], json!({"approved": true}));
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.headers["authorization"], "Bearer sk-test-123");
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.body["model"], "m-1");
    assert_eq!(r.body["response_format"]["type"], "json_schema");
    assert_eq!(
        r.body["response_format"]["json_schema"]["schema"],
        review_schema()
    );
    let first = r.body["messages"][0]["content"].as_str().unwrap();
    assert!(first.contains("Review demo") && first.contains("REQUIRED OUTPUT"));
    let msgs = reqs[1].body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3);
    assert_eq!(
        msgs[1],
        json!({"role": "assistant", "content": "I would approve it."})
    );
    assert_eq!(msgs[2]["role"], "user");
    assert!(
        msgs[2]["content"]
            .as_str()
            .unwrap()
            .contains("no JSON result")
    );
    let a = &e.attempts(&o.run_id, "review").await[0];
    assert_eq!(a.response_text.as_deref(), Some("{\"approved\": true}"));
    let m = meta(a);
    assert_eq!(m["agentEngine"], "openai-compatible");
    assert_eq!(
        m["usage"],
        json!({"inputTokens": 31, "outputTokens": 7, "cacheReadTokens": 8})
    );
    let outs = e.events(&o.run_id, "NodeOutput").await;
    assert!(
        outs.iter()
            .any(|(_, p)| p["text"].as_str().unwrap().contains("I would approve"))
    );
}

#[tokio::test]
async fn anthropic_provider_forces_the_output_tool_and_answers_it_on_repair() {
    let e = env().await;
    let first_content = json!([
        {"type": "text", "text": "Let me record the result."},
        {"type": "tool_use", "id": "toolu_1", "name": "output", "input": {"approved": "yes"}}
    ]);
    let mock = mock_http::start(vec![
        Canned::Json(200, json!({"id": "m1", "type": "message", "role": "assistant", "content": first_content, "stop_reason": "tool_use",
            "usage": {"input_tokens": 50, "output_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 2}})),
        Canned::Json(200, json!({"id": "m2", "type": "message", "role": "assistant", "stop_reason": "tool_use",
            "content": [{"type": "tool_use", "id": "toolu_2", "name": "output", "input": {"approved": true, "notes": "ok"}}],
            "usage": {"input_tokens": 70, "output_tokens": 12}})),
    ])
    .await;
    let agent = format!(
        "{{provider: anthropic, base_url: {}, model: claude-test, max_tokens: 1000}}",
        q(&mock.url)
    );
    let o = e
        .run(&provider_task(
            &agent,
            "{ANTHROPIC_API_KEY: ak-test-456}",
            "",
        ))
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    assert_eq!(
        o.output.unwrap()["review"],
        json!({"approved": true, "notes": "ok"})
    );
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2);
    let r = &reqs[0];
    assert_eq!(r.path, "/v1/messages");
    assert_eq!(r.headers["x-api-key"], "ak-test-456");
    assert_eq!(r.headers["anthropic-version"], "2023-06-01");
    assert!(!r.headers.contains_key("authorization"));
    assert_eq!(r.body["model"], "claude-test");
    assert_eq!(r.body["max_tokens"], 1000);
    assert_eq!(r.body["tools"][0]["name"], "output");
    assert_eq!(r.body["tools"][0]["input_schema"], review_schema());
    assert_eq!(
        r.body["tool_choice"],
        json!({"type": "tool", "name": "output"})
    );
    let msgs = reqs[1].body["messages"].as_array().unwrap();
    assert_eq!(
        msgs[1],
        json!({"role": "assistant", "content": first_content})
    );
    let answer = &msgs[2]["content"][0];
    assert_eq!(answer["type"], "tool_result");
    assert_eq!(answer["tool_use_id"], "toolu_1");
    assert_eq!(answer["is_error"], true);
    assert!(answer["content"].as_str().unwrap().contains("/approved"));
    let m = meta(&e.attempts(&o.run_id, "review").await[0]);
    assert_eq!(
        m["usage"],
        json!({"inputTokens": 120, "outputTokens": 22, "cacheReadTokens": 5, "cacheWriteTokens": 2})
    );
}

#[tokio::test]
async fn provider_errors_are_typed_and_never_show_the_key() {
    let e = env().await;
    // 401: a configuration error, no retry, the key echoed by the server is not repeated
    let mock = mock_http::start(vec![Canned::Json(
        401,
        json!({"error": {"message": "Incorrect API key provided: sk-secret-999"}}),
    )])
    .await;
    let agent = format!(
        "{{provider: openai-compatible, base_url: {}, model: m}}",
        q(&mock.url)
    );
    let o = e
        .run(&provider_task(
            &agent,
            "{OPENAI_API_KEY: sk-secret-999}",
            "",
        ))
        .await;
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::AgentConfigInvalid);
    assert!(!err.retryable);
    assert!(
        err.message.contains("HTTP 401") && err.message.contains("OPENAI_API_KEY"),
        "{}",
        err.message
    );
    assert!(!err.message.contains("sk-secret-999"), "{}", err.message);
    assert_eq!(mock.requests().len(), 1);

    // 503: retryable; the retry succeeds
    let mock = mock_http::start(vec![
        Canned::Json(503, json!({"error": {"message": "overloaded"}})),
        Canned::Json(
            200,
            json!({"choices": [{"message": {"content": "{\"approved\": false}"}}]}),
        ),
    ])
    .await;
    let agent = format!(
        "{{provider: openai-compatible, base_url: {}, model: m}}",
        q(&mock.url)
    );
    let o = e
        .run(&provider_task(
            &agent,
            "{}",
            "      retries: 1\n      backoff: 10ms\n",
        ))
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let attempts = e.attempts(&o.run_id, "review").await;
    assert_eq!(attempts.len(), 2);
    let err = error(&attempts[0]);
    assert_eq!(err["code"], "AGENT_HTTP_ERROR");
    assert_eq!(err["retryable"], true);
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("HTTP 503: overloaded")
    );
    // no key set: no authorization header (local servers need none)
    assert!(!mock.requests()[0].headers.contains_key("authorization"));

    // connection refused
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let agent = format!(
        "{{provider: openai-compatible, base_url: \"http://127.0.0.1:{port}/v1\", model: m}}"
    );
    let o = e
        .run(&provider_task(&agent, "{}", "      retries: 0\n"))
        .await;
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::AgentHttpError);
    assert!(err.retryable);
    assert!(err.message.contains("cannot reach"), "{}", err.message);

    // a server that never answers runs into the task's timeout
    let mock = mock_http::start(vec![Canned::Hang]).await;
    let agent = format!(
        "{{provider: anthropic, base_url: {}, model: m}}",
        q(&mock.url)
    );
    let t0 = Instant::now();
    let o = e
        .run(&provider_task(
            &agent,
            "{ANTHROPIC_API_KEY: k-1234}",
            "      retries: 0\n      timeout: 300ms\n",
        ))
        .await;
    assert_eq!(o.error.unwrap().code, Code::TaskTimeout);
    assert!(t0.elapsed() < Duration::from_secs(5));

    // anthropic without a key does not send a request
    let agent = format!(
        "{{provider: anthropic, base_url: {}, model: m, api_key_env: SMITHERS_TEST_KEY_THAT_IS_NOT_SET}}",
        q(&mock.url)
    );
    let o = e.run(&provider_task(&agent, "{}", "")).await;
    let err = o.error.unwrap();
    assert_eq!(err.code, Code::AgentConfigInvalid);
    assert!(err.message.contains("SMITHERS_TEST_KEY_THAT_IS_NOT_SET"));
}
