//! One turn of a CLI agent: build its command line, run it in its own process group (the same
//! runner as shell tasks: timeout and cancellation kill the whole group, the child dies with the
//! engine), stream its output to the run's events, checkpoint its session id as soon as it
//! appears, and turn its exit into a reply or a typed error.

use super::presets::{self, CallArgs, CliKind};
use super::prompt::{self, Role};
use super::usage::{Usage, count};
use super::{AgentJob, Reply, TurnIo};
use crate::process::{self, ProcSpec};
use serde_json::Value;
use smithers_core::tree::Command as Cmd;
use smithers_core::{Code, SmithersError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio::sync::mpsc;

/// Lower-case fragments of CLI errors that no retry can fix (login, key or model problems).
const CONFIG_PATTERNS: &[&str] = &[
    "invalid api key",
    "invalid x-api-key",
    "api key not valid",
    "api key expired",
    "expired credentials",
    "not logged in",
    "please run /login",
    "authentication failed",
    "invalid_authentication",
    "unknown model",
    "model not found",
    "invalid model",
];

/// Keep at most this much of an error detail in messages.
const DETAIL_LIMIT: usize = 1_500;

/// A CLI agent across the turns of one attempt.
pub(crate) struct CliSession {
    kind: CliKind,
    agent: String,
    program: Vec<String>,
    model: Option<String>,
    allow_tools: Option<Vec<String>>,
    /// Session to continue (from an earlier attempt, then from this attempt's replies).
    resume: Option<String>,
    /// The resume id came from an earlier attempt and has not worked yet in this one.
    resume_untested: bool,
    /// The last session id reported to the driver as a checkpoint.
    checkpointed: Option<String>,
    /// This attempt's conversation, flattened into the prompt when there is no session.
    history: Vec<(Role, String)>,
    env: BTreeMap<String, String>,
    cwd: PathBuf,
    /// Silence after which the CLI is considered hung.
    idle_timeout_ms: u64,
}

impl CliSession {
    /// `program` is the resolved program with leading arguments; `env` the whole extra
    /// environment; `resume` a session checkpointed by an earlier attempt.
    pub fn new(
        kind: CliKind,
        job: &AgentJob,
        program: Vec<String>,
        resume: Option<String>,
        env: BTreeMap<String, String>,
    ) -> Self {
        let resume = resume.filter(|_| kind.resumes());
        CliSession {
            kind,
            agent: job.def.name.clone(),
            program,
            model: job.def.model.clone(),
            allow_tools: job.def.allow_tools.clone(),
            idle_timeout_ms: job
                .def
                .idle_timeout_ms
                .unwrap_or(smithers_core::agent::DEFAULT_IDLE_TIMEOUT_MS),
            resume_untested: resume.is_some(),
            checkpointed: resume.clone(),
            resume,
            history: Vec::new(),
            env,
            cwd: job.cwd.clone(),
        }
    }

    /// Sends one message (the task prompt or a repair request) and returns the reply.
    pub async fn send(&mut self, ask: &str, io: &TurnIo<'_>) -> Result<Reply, SmithersError> {
        let first = self.call(ask, io).await;
        let reply = match first {
            // a session kept from an earlier attempt may be gone (expired, other machine):
            // start over without it once rather than failing every retry the same way
            Err(e) if self.resume_untested && e.code == Code::AgentCliError => {
                io.rep.output(
                    "stderr",
                    format!(
                        "smithers: resuming session {} failed ({}); starting a new session\n",
                        self.resume.as_deref().unwrap_or_default(),
                        e.message
                    ),
                );
                self.resume = None;
                self.resume_untested = false;
                self.call(ask, io).await?
            }
            other => other?,
        };
        self.resume_untested = false;
        if let Some(sid) = &reply.session {
            self.resume = Some(sid.clone());
            self.checkpoint(io, sid);
        }
        self.history.push((Role::User, ask.to_string()));
        self.history.push((Role::Assistant, reply.text.clone()));
        Ok(reply)
    }

    fn checkpoint(&mut self, io: &TurnIo<'_>, sid: &str) {
        if self.checkpointed.as_deref() != Some(sid) {
            self.checkpointed = Some(sid.to_string());
            io.rep.checkpoint(sid);
        }
    }

    async fn call(&mut self, ask: &str, io: &TurnIo<'_>) -> Result<Reply, SmithersError> {
        let prompt = if self.resume.is_some() || self.history.is_empty() {
            ask.to_string()
        } else {
            prompt::flatten(&self.history, ask)
        };
        let last_message =
            std::env::temp_dir().join(format!("smithers-agent-{}.txt", uuid::Uuid::new_v4()));
        let inv = presets::invocation(
            self.kind,
            &CallArgs {
                program: &self.program,
                model: self.model.as_deref(),
                allow_tools: self.allow_tools.as_deref(),
                resume: self.resume.as_deref(),
                prompt: &prompt,
                last_message,
            },
        );
        let timeout_ms = io.remaining_ms(&self.agent)?;
        let mut env = self.env.clone();
        env.insert("SMITHERS_TURN".into(), io.turn.to_string());
        // a generic command agent may report its usage in this file (see `read_usage_file`)
        let usage_file = matches!(self.kind, CliKind::Command(_)).then(|| {
            std::env::temp_dir().join(format!("smithers-usage-{}.json", uuid::Uuid::new_v4()))
        });
        if let Some(f) = &usage_file {
            env.insert("SMITHERS_USAGE_FILE".into(), f.display().to_string());
        }
        let spec = ProcSpec {
            command: Cmd::Argv(inv.argv),
            cwd: self.cwd.clone(),
            env,
            timeout_ms,
            idle_timeout_ms: Some(self.idle_timeout_ms),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<process::Chunk>();
        let run = process::run_raw(
            &spec,
            inv.stdin.map(String::into_bytes),
            io.cancel.clone(),
            tx,
            |pgid| io.rep.process_started(pgid),
        );
        let kind = self.kind;
        let mut seen: Option<String> = self.checkpointed.clone();
        let forward = async {
            let mut line = String::new();
            while let Some(c) = rx.recv().await {
                if c.stream == "stdout" && kind.resumes() {
                    line.push_str(&c.text);
                    while let Some(nl) = line.find('\n') {
                        let l: String = line.drain(..=nl).collect();
                        if let Ok(ev) = serde_json::from_str::<Value>(l.trim())
                            && let Some(sid) = presets::session_in_event(kind, &ev)
                            && seen.as_deref() != Some(sid.as_str())
                        {
                            // durable before the agent goes on working: a crash now can resume
                            io.rep.checkpoint(&sid);
                            seen = Some(sid);
                        }
                    }
                }
                io.rep.output(c.stream, c.text);
            }
        };
        let (res, ()) = tokio::join!(run, forward);
        self.checkpointed = seen;
        let last = inv.last_message.as_ref().and_then(|p| {
            let text = std::fs::read_to_string(p).ok();
            let _ = std::fs::remove_file(p);
            text
        });
        let reported = usage_file.as_deref().and_then(read_usage_file);
        let raw = match res {
            Ok(raw) => raw,
            Err(e) => return Err(self.process_error(e, io)),
        };
        let mut parsed = presets::parse_output(self.kind, &raw.stdout, last);
        if parsed.reply.usage.is_none() {
            parsed.reply.usage = reported;
        }
        if raw.too_big {
            return Err(SmithersError::new(
                Code::OutputTooLarge,
                format!(
                    "agent `{}` wrote more than {} bytes to stdout",
                    self.agent,
                    process::MAX_STDOUT_BYTES
                ),
            ));
        }
        if !raw.status.success() || parsed.error.is_some() {
            let how = match raw.status.code() {
                Some(0) => "reported an error".to_string(),
                Some(c) => format!("exited with {c}"),
                None => "was killed by a signal".to_string(),
            };
            let detail = parsed
                .error
                .clone()
                .filter(|d| !d.trim().is_empty())
                .or_else(|| Some(raw.stderr_tail.clone()).filter(|d| !d.is_empty()))
                .unwrap_or_else(|| tail(raw.stdout.trim()));
            let detail = clip(&detail);
            let lower = detail.to_lowercase();
            let config = CONFIG_PATTERNS.iter().any(|p| lower.contains(p));
            let msg = format!(
                "agent `{}` ({}) {how}: {detail}",
                self.agent,
                self.program_name()
            );
            return Err(if config {
                SmithersError::new(
                    Code::AgentConfigInvalid,
                    format!("{msg} (check the CLI's login, API key and model)"),
                )
                .terminal()
            } else {
                SmithersError::new(Code::AgentCliError, msg)
            });
        }
        Ok(parsed.reply)
    }

    fn program_name(&self) -> String {
        self.program.first().cloned().unwrap_or_default()
    }

    /// Errors of the process runner, reworded for an agent (its command line holds the whole
    /// prompt, which does not belong in an error message).
    fn process_error(&self, e: SmithersError, io: &TurnIo<'_>) -> SmithersError {
        match e.code {
            Code::ProcessSpawnFailed => {
                let how = match self.kind {
                    CliKind::Preset(p) => format!(
                        "install it, or point `bin:` (or {}) at the program",
                        p.bin_env()
                    ),
                    CliKind::Command(_) => "check the agent's `command`".to_string(),
                };
                let cause = e
                    .message
                    .rsplit(": ")
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if cause.contains("Argument list too long") {
                    // the task's prompt, not the agent, is the problem
                    return SmithersError::new(
                        Code::InvalidInput,
                        format!(
                            "cannot start agent `{}`: its prompt is passed as one argument and is longer than the system allows (128 KiB on Linux); shorten the task's prompt or use an agent that reads it from stdin (codex, or a command agent with `prompt: stdin`)",
                            self.agent
                        ),
                    )
                    .terminal();
                }
                SmithersError::new(
                    Code::AgentConfigInvalid,
                    format!(
                        "cannot start agent `{}` (`{}` in `{}`): {cause}; {how}",
                        self.agent,
                        self.program_name(),
                        self.cwd.display()
                    ),
                )
                .terminal()
            }
            Code::TaskIdleTimeout => SmithersError::new(
                Code::TaskIdleTimeout,
                format!(
                    "agent `{}` printed nothing for {} ms (its `idle_timeout`) and was considered hung; its process group was killed",
                    self.agent, self.idle_timeout_ms
                ),
            ),
            Code::TaskTimeout => SmithersError::new(
                Code::TaskTimeout,
                format!(
                    "agent `{}` did not finish within the task's timeout ({} ms); its process group was killed",
                    self.agent,
                    io.timeout_ms.unwrap_or(0)
                ),
            ),
            _ => e,
        }
    }
}

/// Reads (and removes) the usage a command agent wrote to `SMITHERS_USAGE_FILE`: a JSON object
/// with `input_tokens`, `output_tokens` and optionally `cache_read_tokens`,
/// `cache_write_tokens`, `reasoning_tokens`, `cost_usd`. A missing or malformed file means no
/// usage was reported.
fn read_usage_file(path: &std::path::Path) -> Option<Usage> {
    let text = std::fs::read_to_string(path).ok();
    let _ = std::fs::remove_file(path);
    let v: Value = serde_json::from_str(&text?).ok()?;
    if !v.is_object() {
        return None;
    }
    Some(Usage {
        input: count(&v, "input_tokens").unwrap_or(0),
        output: count(&v, "output_tokens").unwrap_or(0),
        cache_read: count(&v, "cache_read_tokens"),
        cache_write: count(&v, "cache_write_tokens"),
        reasoning: count(&v, "reasoning_tokens"),
        cost_usd: v.get("cost_usd").and_then(Value::as_f64),
    })
}

/// The last part of a long text (errors are usually at the end).
fn tail(s: &str) -> String {
    let n = s.chars().count();
    s.chars().skip(n.saturating_sub(DETAIL_LIMIT)).collect()
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > DETAIL_LIMIT {
        format!("{}…", s.chars().take(DETAIL_LIMIT).collect::<String>())
    } else {
        s.to_string()
    }
}
