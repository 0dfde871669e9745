//! Agent tasks (engine-model §7): one attempt of a task that calls a CLI agent (Claude Code,
//! Codex, Gemini, or any command) or an HTTP provider (OpenAI-compatible, Anthropic).
//!
//! An attempt is a short conversation. The first message is the task's prompt wrapped with the
//! output's JSON Schema ([`prompt`]); the reply's JSON is found in a fixed order ([`extract`])
//! and validated against the schema. A reply without valid JSON gets up to
//! [`MAX_REPAIR_TURNS`] repair turns that quote the problem back to the agent; they are part of
//! the attempt, not new attempts. Only then does the attempt fail (retryable, so the task's
//! retries apply).
//!
//! While it runs the attempt streams the agent's output as `NodeOutput` events, heart-beats
//! even when the agent is silent, and checkpoints the agent's session id on the attempt row as
//! soon as it is known, so the next attempt (after a failure or a crash) continues the same
//! session where the CLI can resume one. When it ends it leaves the final reply text, the turns,
//! the session and the token usage on the attempt.

mod cli;
mod extract;
mod http;
mod presets;
mod prompt;
mod providers;
mod usage;

use crate::Shared;
use crate::driver::{Msg, TaskResult};
use presets::CliKind;
use serde_json::{Map, Value, json};
use smithers_core::agent::{AgentDef, AgentKind, Preset};
use smithers_core::tree::OutputSpec;
use smithers_core::{Code, SmithersError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use usage::Usage;

/// Repair turns per attempt after a reply without valid output (not counted as attempts).
pub const MAX_REPAIR_TURNS: u32 = 3;

/// A running agent heart-beats at least this often, even when it prints nothing.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// One reply of an agent, as the extraction steps need it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reply {
    /// The final text.
    pub text: String,
    /// Intermediate assistant messages, oldest first.
    pub steps: Vec<String>,
    /// Structured output (a provider's forced tool call, a CLI's structured result).
    pub structured: Option<Value>,
    /// The session the CLI ran in.
    pub session: Option<String>,
    pub usage: Option<Usage>,
}

/// Everything one agent attempt needs, captured by the driver when it starts the attempt.
pub(crate) struct AgentJob {
    pub run_id: String,
    /// The stored node id (scoped inside nested loops).
    pub node_id: String,
    pub iteration: u32,
    /// The driver's index of the task instance.
    pub rt: usize,
    pub attempt: i64,
    pub def: AgentDef,
    /// The rendered task prompt.
    pub prompt: String,
    /// The task's `env` (also where API keys and `SMITHERS_*_BIN` are looked up first).
    pub env: BTreeMap<String, String>,
    /// Working directory of the agent.
    pub cwd: PathBuf,
    /// The workflow's directory: relative program paths are resolved against it.
    pub base_dir: PathBuf,
    pub output: Option<OutputSpec>,
    pub timeout_ms: Option<u64>,
    /// `SMITHERS_ATTEMPT_ID` of the attempt's processes (see [`crate::leftovers`]).
    pub marker: String,
}

/// Whether an agent runs local processes (CLI agents do; HTTP providers do not).
pub(crate) fn runs_processes(def: &AgentDef) -> bool {
    !matches!(def.kind, AgentKind::Provider { .. })
}

/// Sends what an attempt does to the driver, which records it.
#[derive(Clone)]
pub(crate) struct Reporter {
    tx: mpsc::UnboundedSender<Msg>,
    rt: usize,
    attempt: i64,
    engine: &'static str,
}

impl Reporter {
    /// Output of the agent (a `NodeOutput` event; also a sign of life).
    pub fn output(&self, stream: &'static str, text: String) {
        let _ = self.tx.send(Msg::Output {
            rt: self.rt,
            attempt: self.attempt,
            stream,
            text,
        });
    }

    /// The agent's session id, written to the attempt's heartbeat data at once.
    pub fn checkpoint(&self, session: &str) {
        self.heartbeat(Some(
            json!({"agentEngine": self.engine, "agentResume": session}),
        ));
    }

    /// A process of the attempt started in its own group `pgid`.
    pub fn process_started(&self, pgid: i32) {
        let _ = self.tx.send(Msg::ProcessStarted {
            rt: self.rt,
            attempt: self.attempt,
            pgid,
        });
    }

    fn heartbeat(&self, data: Option<Value>) {
        let _ = self.tx.send(Msg::Heartbeat {
            rt: self.rt,
            attempt: self.attempt,
            data,
        });
    }
}

/// What one turn may use besides its message.
pub(crate) struct TurnIo<'a> {
    pub rep: &'a Reporter,
    pub cancel: watch::Receiver<bool>,
    /// When the attempt times out (the task's `timeout` covers all turns).
    pub deadline: Option<Instant>,
    pub timeout_ms: Option<u64>,
    /// 0 for the task prompt, then 1.. for repair turns.
    pub turn: u32,
}

impl TurnIo<'_> {
    /// Time left before the task's timeout (None: no timeout). Fails once it has passed.
    pub fn remaining_ms(&self, agent: &str) -> Result<Option<u64>, SmithersError> {
        let Some(d) = self.deadline else {
            return Ok(None);
        };
        let left = d.saturating_duration_since(Instant::now()).as_millis() as u64;
        if left == 0 {
            return Err(SmithersError::new(
                Code::TaskTimeout,
                format!(
                    "agent `{agent}` did not finish within the task's timeout ({} ms)",
                    self.timeout_ms.unwrap_or(0)
                ),
            ));
        }
        Ok(Some(left))
    }
}

/// The attempt metadata written when an agent attempt starts.
pub(crate) fn start_meta(agent: &str, def: Option<&AgentDef>, timeout_ms: Option<u64>) -> Value {
    json!({
        "kind": "agent",
        "agentId": agent,
        "agentEngine": def.map(AgentDef::engine),
        "agentModel": def.and_then(|d| d.model.clone()),
        "timeoutMs": timeout_ms,
    })
}

/// Runs one agent attempt on its own task. The driver receives its output, heartbeats and
/// checkpoints while it runs, then `Vcs` (in a git work tree), `AttemptDetails` and `Done`, in
/// that order.
pub(crate) fn spawn(
    sh: Arc<Shared>,
    tx: mpsc::UnboundedSender<Msg>,
    cancel: watch::Receiver<bool>,
    job: AgentJob,
) {
    // called right after the attempt's start was committed
    let committed = std::time::Instant::now();
    tokio::spawn(async move {
        let _permit = match sh.task_permit(&job.run_id, &cancel, committed).await {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Msg::Done {
                    rt: job.rt,
                    attempt: job.attempt,
                    result: TaskResult::Err(e),
                });
                return;
            }
        };
        let rep = Reporter {
            tx: tx.clone(),
            rt: job.rt,
            attempt: job.attempt,
            engine: job.def.engine(),
        };
        let beat = rep.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                beat.heartbeat(None);
            }
        });
        // what the agent changed on disk, when it works in a git work tree
        let key = crate::vcs::RefKey {
            run_id: job.run_id.clone(),
            node_id: job.node_id.clone(),
            iteration: job.iteration,
            attempt: job.attempt,
        };
        let run = run_attempt(&sh, &job, &rep, cancel);
        let (fin, captured) = crate::vcs::around(&sh.work_trees, &job.cwd, &key, run).await;
        ticker.abort();
        let _ = ticker.await;
        if let Some(captured) = captured {
            let _ = tx.send(Msg::Vcs {
                rt: job.rt,
                attempt: job.attempt,
                captured,
            });
        }
        let _ = tx.send(Msg::AttemptDetails {
            rt: job.rt,
            attempt: job.attempt,
            meta: fin.meta,
            response_text: fin.response_text,
            usage: fin.usage_event,
        });
        let result = match fin.result {
            Ok(v) => TaskResult::Ok(v),
            Err(e) => TaskResult::Err(e),
        };
        let _ = tx.send(Msg::Done {
            rt: job.rt,
            attempt: job.attempt,
            result,
        });
    });
}

/// What an attempt leaves behind.
struct Finished {
    result: Result<Value, SmithersError>,
    response_text: Option<String>,
    meta: Map<String, Value>,
    /// `TokenUsageReported` fields, when the agent reported usage.
    usage_event: Option<Value>,
}

/// An agent reached one way or the other.
enum Session {
    Cli(Box<cli::CliSession>),
    Http(Box<providers::HttpSession>),
}

impl Session {
    async fn send(&mut self, ask: &str, io: &TurnIo<'_>) -> Result<Reply, SmithersError> {
        match self {
            Session::Cli(s) => s.send(ask, io).await,
            Session::Http(s) => s.send(ask, io).await,
        }
    }
}

async fn run_attempt(
    sh: &Shared,
    job: &AgentJob,
    rep: &Reporter,
    cancel: watch::Receiver<bool>,
) -> Finished {
    let deadline = job
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let resume = previous_session(sh, job).await;
    let schema = job.output.as_ref().map(|o| o.schema.clone());
    let reminder = matches!(
        job.def.kind,
        AgentKind::Preset {
            preset: Preset::Gemini,
            ..
        }
    );
    let first = prompt::task_prompt(&job.prompt, schema.as_deref(), reminder);
    let mut fin = Finished {
        result: Ok(Value::Null),
        response_text: None,
        meta: Map::new(),
        usage_event: None,
    };
    fin.meta.insert("prompt".into(), json!(first));
    if let Some(r) = &resume {
        fin.meta.insert("resumedFromSession".into(), json!(r));
    }
    let mut session = match open_session(job, resume) {
        Ok(s) => s,
        Err(e) => {
            fin.result = Err(e);
            return fin;
        }
    };
    let mut total: Option<Usage> = None;
    let mut turns: Vec<Value> = Vec::new();
    let mut ask = first;
    let mut turn = 0u32;
    fin.result = loop {
        let io = TurnIo {
            rep,
            cancel: cancel.clone(),
            deadline,
            timeout_ms: job.timeout_ms,
            turn,
        };
        let reply = match session.send(&ask, &io).await {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        let mut record = json!({
            "turn": turn,
            "kind": if turn == 0 { "task" } else { "repair" },
            "textLength": reply.text.chars().count(),
        });
        if let Some(u) = &reply.usage {
            total.get_or_insert_with(Usage::default).add(u);
            record["usage"] = u.to_json();
        }
        if let Some(s) = &reply.session {
            fin.meta.insert("agentResume".into(), json!(s));
        }
        fin.response_text = Some(reply.text.clone());
        let Some(spec) = &job.output else {
            turns.push(record);
            break Ok(json!({"text": reply.text}));
        };
        let problem = match extract::extract(&reply) {
            Some(v) => match sh.schemas.check(&job.node_id, Some(spec), &v) {
                Ok(()) => {
                    turns.push(record);
                    break Ok(v);
                }
                Err(e) if e.code == Code::UnknownOutputSchema => break Err(e),
                Err(e) => e.message,
            },
            None => {
                "the reply contains no JSON result (expected a JSON object in a ```json code fence)"
                    .to_string()
            }
        };
        record["problem"] = json!(problem);
        turns.push(record);
        if turn >= MAX_REPAIR_TURNS {
            break Err(SmithersError::new(
                Code::InvalidOutput,
                format!(
                    "agent `{}` gave no valid output after {MAX_REPAIR_TURNS} repair turns: {problem}",
                    job.def.name
                ),
            )
            .with_node(job.node_id.clone()));
        }
        turn += 1;
        ask = prompt::repair_prompt(&problem, &spec.schema);
    };
    fin.meta
        .insert("repairTurns".into(), json!(turns.len().saturating_sub(1)));
    fin.meta.insert("turns".into(), Value::Array(turns));
    if let Some(u) = total {
        let uj = u.to_json();
        fin.meta.insert("usage".into(), uj.clone());
        let mut ev = json!({"agent": job.def.name, "model": job.def.model});
        if let (Value::Object(e), Value::Object(u)) = (&mut ev, uj) {
            e.extend(u);
        }
        fin.usage_event = Some(ev);
    }
    fin
}

/// Opens the CLI or HTTP session for the agent's kind.
fn open_session(job: &AgentJob, resume: Option<String>) -> Result<Session, SmithersError> {
    match &job.def.kind {
        AgentKind::Preset { preset, bin } => {
            let program = match bin {
                Some(b) => b.clone(),
                None => match lookup_env(job, preset.bin_env()) {
                    Some(p) => vec![p],
                    None => vec![preset.default_program().to_string()],
                },
            };
            Ok(Session::Cli(Box::new(cli::CliSession::new(
                CliKind::Preset(*preset),
                job,
                resolve_program(&job.base_dir, program),
                resume,
                cli_env(job),
            ))))
        }
        AgentKind::Command { argv, prompt } => Ok(Session::Cli(Box::new(cli::CliSession::new(
            CliKind::Command(*prompt),
            job,
            resolve_program(&job.base_dir, argv.clone()),
            None,
            cli_env(job),
        )))),
        AgentKind::Provider {
            provider,
            base_url,
            api_key_env,
            max_tokens,
        } => Ok(Session::Http(Box::new(providers::HttpSession::new(
            job,
            *provider,
            base_url.as_deref(),
            api_key_env.as_deref(),
            *max_tokens,
        )?))),
    }
}

/// A variable from the task's `env`, else from the engine's environment.
fn lookup_env(job: &AgentJob, name: &str) -> Option<String> {
    job.env
        .get(name)
        .cloned()
        .or_else(|| std::env::var(name).ok())
        .filter(|v| !v.is_empty())
}

/// A relative program path (`./agent`, `agents/fake.sh`) means the workflow's directory, not
/// the task's working directory or the engine's.
fn resolve_program(base_dir: &Path, mut argv: Vec<String>) -> Vec<String> {
    if let Some(p) = argv.first_mut()
        && p.contains('/')
        && Path::new(p.as_str()).is_relative()
    {
        *p = base_dir.join(&*p).display().to_string();
    }
    argv
}

/// The environment a CLI agent gets on top of the engine's: the task's `env` and `SMITHERS_*`
/// variables saying where it runs (a generic command agent can read its model and tools here).
fn cli_env(job: &AgentJob) -> BTreeMap<String, String> {
    let mut env = job.env.clone();
    env.insert("SMITHERS_RUN_ID".into(), job.run_id.clone());
    env.insert("SMITHERS_NODE_ID".into(), job.node_id.clone());
    env.insert("SMITHERS_ITERATION".into(), job.iteration.to_string());
    env.insert("SMITHERS_ATTEMPT".into(), job.attempt.to_string());
    env.insert(crate::leftovers::MARKER_ENV.into(), job.marker.clone());
    env.insert("SMITHERS_AGENT".into(), job.def.name.clone());
    if let Some(m) = &job.def.model {
        env.insert("SMITHERS_MODEL".into(), m.clone());
    }
    if let Some(t) = &job.def.allow_tools {
        env.insert("SMITHERS_ALLOW_TOOLS".into(), t.join(","));
    }
    env
}

/// The session an earlier attempt of this task checkpointed, when the same engine ran it and
/// the engine can resume sessions.
async fn previous_session(sh: &Shared, job: &AgentJob) -> Option<String> {
    if !matches!(job.def.kind, AgentKind::Preset { .. }) {
        return None;
    }
    let engine = job.def.engine();
    let attempts = sh
        .store
        .list_node_attempts(&job.run_id, &job.node_id, job.iteration as i64)
        .await
        .ok()?;
    attempts
        .iter()
        .filter(|a| a.attempt < job.attempt)
        .filter_map(|a| serde_json::from_str::<Value>(a.heartbeat_data_json.as_deref()?).ok())
        .find(|d| d.get("agentEngine").and_then(Value::as_str) == Some(engine))
        .and_then(|d| {
            d.get("agentResume")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
}
