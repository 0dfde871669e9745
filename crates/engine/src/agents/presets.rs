//! What each CLI agent is given and what it prints: the command lines of the built-in presets in
//! their non-interactive JSON modes (engine-model §7.2), and parsers for their output (final
//! text, session id, usage, reported errors).
//!
//! | preset | command line | prompt |
//! |---|---|---|
//! | claude-code | `claude --print --output-format stream-json --verbose [--model M] [--resume S] <tools> [--] PROMPT` | last argument |
//! | codex | `codex exec [resume S] --json --skip-git-repo-check [--model M] <sandbox> --output-last-message FILE -` | stdin |
//! | gemini | `gemini --output-format json [--model M] [--resume S] <tools> --prompt=PROMPT` | `--prompt` |

use super::Reply;
use super::usage::{Usage, count};
use serde_json::Value;
use smithers_core::agent::{Preset, PromptMode};
use std::path::PathBuf;

/// The CLI flavour of an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CliKind {
    Preset(Preset),
    Command(PromptMode),
}

impl CliKind {
    /// Whether the CLI can continue a session by id (repair turns and later attempts then send
    /// only the new message).
    pub fn resumes(self) -> bool {
        matches!(self, CliKind::Preset(_))
    }
}

/// The inputs of one CLI call.
pub(crate) struct CallArgs<'a> {
    /// Program and leading arguments.
    pub program: &'a [String],
    pub model: Option<&'a str>,
    pub allow_tools: Option<&'a [String]>,
    pub resume: Option<&'a str>,
    pub prompt: &'a str,
    /// Where Codex writes its final message.
    pub last_message: PathBuf,
}

/// A ready command line.
pub(crate) struct Invocation {
    pub argv: Vec<String>,
    pub stdin: Option<String>,
    /// The file holding the final answer (Codex), read after the process ends.
    pub last_message: Option<PathBuf>,
}

/// Builds the command line of one call.
pub(crate) fn invocation(kind: CliKind, a: &CallArgs) -> Invocation {
    let mut argv: Vec<String> = a.program.to_vec();
    let s = |x: &str| x.to_string();
    match kind {
        CliKind::Preset(Preset::ClaudeCode) => {
            argv.extend(["--print", "--output-format", "stream-json", "--verbose"].map(s));
            if let Some(m) = a.model {
                argv.extend([s("--model"), s(m)]);
            }
            if let Some(r) = a.resume {
                argv.extend([s("--resume"), s(r)]);
            }
            match a.allow_tools {
                None => argv.push(s("--dangerously-skip-permissions")),
                Some([]) => argv.extend([s("--tools"), s("")]),
                Some(list) => argv.extend([s("--allowed-tools"), list.join(",")]),
            }
            if a.prompt.starts_with('-') {
                argv.push(s("--"));
            }
            argv.push(s(a.prompt));
            Invocation {
                argv,
                stdin: None,
                last_message: None,
            }
        }
        CliKind::Preset(Preset::Codex) => {
            argv.push(s("exec"));
            if let Some(r) = a.resume {
                argv.extend([s("resume"), s(r)]);
            }
            argv.extend(["--json", "--skip-git-repo-check"].map(s));
            if let Some(m) = a.model {
                argv.extend([s("--model"), s(m)]);
            }
            // Codex has no per-tool list: the allow-list picks its sandbox instead
            match a.allow_tools {
                None => argv.push(s("--dangerously-bypass-approvals-and-sandbox")),
                Some([]) => argv.extend([s("--sandbox"), s("read-only")]),
                Some(_) => argv.push(s("--full-auto")),
            }
            argv.extend([
                s("--output-last-message"),
                a.last_message.display().to_string(),
                s("-"),
            ]);
            Invocation {
                argv,
                stdin: Some(a.prompt.to_string()),
                last_message: Some(a.last_message.clone()),
            }
        }
        CliKind::Preset(Preset::Gemini) => {
            argv.extend(["--output-format", "json"].map(s));
            if let Some(m) = a.model {
                argv.extend([s("--model"), s(m)]);
            }
            if let Some(r) = a.resume {
                argv.extend([s("--resume"), s(r)]);
            }
            match a.allow_tools {
                None => argv.push(s("--yolo")),
                Some(list) => {
                    for t in list {
                        argv.push(format!("--allowed-tools={t}"));
                    }
                }
            }
            argv.push(format!("--prompt={}", a.prompt));
            Invocation {
                argv,
                stdin: None,
                last_message: None,
            }
        }
        CliKind::Command(mode) => {
            let stdin = match mode {
                PromptMode::Stdin => Some(a.prompt.to_string()),
                PromptMode::Arg => {
                    argv.push(s(a.prompt));
                    None
                }
            };
            Invocation {
                argv,
                stdin,
                last_message: None,
            }
        }
    }
}

/// The session id carried by one streamed JSON event, if any.
pub(crate) fn session_in_event(kind: CliKind, ev: &Value) -> Option<String> {
    let str_at = |p: &str| ev.pointer(p).and_then(Value::as_str).map(str::to_string);
    match kind {
        CliKind::Preset(Preset::ClaudeCode) => str_at("/session_id"),
        CliKind::Preset(Preset::Codex) => match ev.get("type").and_then(Value::as_str) {
            Some("thread.started") => str_at("/thread_id"),
            _ if ev.pointer("/msg/type").and_then(Value::as_str) == Some("session_configured") => {
                str_at("/msg/session_id")
            }
            _ => None,
        },
        CliKind::Preset(Preset::Gemini) => str_at("/session_id"),
        CliKind::Command(_) => None,
    }
}

/// What a CLI printed, understood.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub reply: Reply,
    /// An error the CLI reported in its output (it may still have exited 0).
    pub error: Option<String>,
}

/// Parses a finished CLI's stdout (and, for Codex, its last-message file).
pub(crate) fn parse_output(kind: CliKind, stdout: &str, last_message: Option<String>) -> Parsed {
    match kind {
        CliKind::Preset(Preset::ClaudeCode) => parse_claude(stdout),
        CliKind::Preset(Preset::Codex) => parse_codex(stdout, last_message),
        CliKind::Preset(Preset::Gemini) => parse_gemini(stdout),
        CliKind::Command(_) => Parsed {
            reply: Reply {
                text: stdout.to_string(),
                ..Default::default()
            },
            error: None,
        },
    }
}

/// JSON events in a CLI's stdout: one document (an object, or an array of events), else one
/// event per line (lines that are not JSON are skipped).
pub(crate) fn events(stdout: &str) -> Vec<Value> {
    match serde_json::from_str::<Value>(stdout.trim()) {
        Ok(Value::Array(items)) => return items,
        Ok(v @ Value::Object(_)) => return vec![v],
        _ => {}
    }
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(Value::is_object)
        .collect()
}

fn text_blocks(content: Option<&Value>) -> Option<String> {
    let blocks = content?.as_array()?;
    let texts: Vec<&str> = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    (!texts.is_empty()).then(|| texts.join("\n"))
}

/// Claude Code `stream-json` (or `json`): `system/init` carries the session id, `assistant`
/// events the messages, the final `result` event the answer, usage and cost.
fn parse_claude(stdout: &str) -> Parsed {
    let mut p = Parsed::default();
    let mut result_text: Option<String> = None;
    for ev in events(stdout) {
        if let Some(sid) = session_in_event(CliKind::Preset(Preset::ClaudeCode), &ev) {
            p.reply.session = Some(sid);
        }
        match ev.get("type").and_then(Value::as_str) {
            Some("assistant") => {
                if let Some(t) = text_blocks(ev.pointer("/message/content")) {
                    p.reply.steps.push(t);
                }
            }
            Some("result") => {
                result_text = ev.get("result").and_then(Value::as_str).map(str::to_string);
                if let Some(s) = ev.get("structured_output").filter(|v| !v.is_null()) {
                    p.reply.structured = Some(s.clone());
                }
                if let Some(u) = ev.get("usage").filter(|u| u.is_object()) {
                    p.reply.usage = Some(Usage {
                        input: count(u, "input_tokens").unwrap_or(0),
                        output: count(u, "output_tokens").unwrap_or(0),
                        cache_read: count(u, "cache_read_input_tokens"),
                        cache_write: count(u, "cache_creation_input_tokens"),
                        reasoning: None,
                        cost_usd: ev.get("total_cost_usd").and_then(Value::as_f64),
                    });
                }
                let is_error = ev.get("is_error").and_then(Value::as_bool) == Some(true)
                    || ev
                        .get("subtype")
                        .and_then(Value::as_str)
                        .is_some_and(|s| s.starts_with("error"));
                if is_error {
                    p.error = Some(
                        result_text
                            .clone()
                            .or_else(|| {
                                ev.get("subtype")
                                    .and_then(Value::as_str)
                                    .map(str::to_string)
                            })
                            .unwrap_or_else(|| "the agent reported an error".into()),
                    );
                }
            }
            _ => {}
        }
    }
    p.reply.text = result_text
        .or_else(|| p.reply.steps.last().cloned())
        .unwrap_or_default();
    p
}

/// Codex `exec --json` JSONL: `thread.started` carries the session id, `item.completed` agent
/// messages, `turn.completed` usage; the answer is the `--output-last-message` file.
fn parse_codex(stdout: &str, last_message: Option<String>) -> Parsed {
    let mut p = Parsed::default();
    let kind = CliKind::Preset(Preset::Codex);
    for ev in events(stdout) {
        if let Some(sid) = session_in_event(kind, &ev) {
            p.reply.session = Some(sid);
        }
        match ev.get("type").and_then(Value::as_str) {
            Some("item.completed") => {
                let item = ev.get("item").unwrap_or(&Value::Null);
                let ty = item
                    .get("type")
                    .or_else(|| item.get("item_type"))
                    .and_then(Value::as_str);
                if matches!(ty, Some("agent_message" | "assistant_message"))
                    && let Some(t) = item.get("text").and_then(Value::as_str)
                {
                    p.reply.steps.push(t.to_string());
                }
            }
            Some("turn.completed") => {
                if let Some(u) = ev.get("usage").filter(|u| u.is_object()) {
                    let turn = Usage {
                        input: count(u, "input_tokens").unwrap_or(0),
                        output: count(u, "output_tokens").unwrap_or(0),
                        cache_read: count(u, "cached_input_tokens"),
                        cache_write: None,
                        reasoning: count(u, "reasoning_output_tokens"),
                        cost_usd: None,
                    };
                    p.reply.usage.get_or_insert_with(Usage::default).add(&turn);
                }
            }
            Some("turn.failed") => {
                p.error = ev
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| Some("the turn failed".into()));
            }
            Some("error") => {
                p.error = ev
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
            _ => {
                // the older event shape: {"msg": {"type": "agent_message", "message": …}}
                if ev.pointer("/msg/type").and_then(Value::as_str) == Some("agent_message")
                    && let Some(t) = ev.pointer("/msg/message").and_then(Value::as_str)
                {
                    p.reply.steps.push(t.to_string());
                }
            }
        }
    }
    p.reply.text = last_message
        .filter(|t| !t.trim().is_empty())
        .or_else(|| p.reply.steps.last().cloned())
        .unwrap_or_default();
    p
}

/// Gemini `--output-format json`: one object `{session_id?, response, stats, error?}`; tokens
/// per model under `stats.models.<name>.tokens`.
fn parse_gemini(stdout: &str) -> Parsed {
    let mut p = Parsed::default();
    // the CLI may print notices before the JSON document
    let doc = serde_json::from_str::<Value>(stdout.trim())
        .ok()
        .or_else(|| {
            let at = stdout.find("\n{").map(|i| i + 1)?;
            serde_json::from_str::<Value>(stdout[at..].trim()).ok()
        });
    let Some(doc) = doc else {
        p.reply.text = stdout.to_string();
        return p;
    };
    p.reply.session = session_in_event(CliKind::Preset(Preset::Gemini), &doc);
    p.reply.text = doc
        .get("response")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Some(models) = doc.pointer("/stats/models").and_then(Value::as_object) {
        let mut total = Usage::default();
        let mut any = false;
        for m in models.values() {
            let Some(t) = m.get("tokens") else { continue };
            any = true;
            total.add(&Usage {
                input: count(t, "prompt").unwrap_or(0),
                output: count(t, "candidates").unwrap_or(0),
                cache_read: count(t, "cached"),
                cache_write: None,
                reasoning: count(t, "thoughts"),
                cost_usd: None,
            });
        }
        if any {
            p.reply.usage = Some(total);
        }
    }
    if let Some(e) = doc.get("error").filter(|e| !e.is_null()) {
        p.error = Some(
            e.get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string()),
        );
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args<'a>(
        program: &'a [String],
        tools: Option<&'a [String]>,
        resume: Option<&'a str>,
    ) -> CallArgs<'a> {
        CallArgs {
            program,
            model: Some("m1"),
            allow_tools: tools,
            resume,
            prompt: "do it",
            last_message: PathBuf::from("/tmp/last.txt"),
        }
    }

    #[test]
    fn claude_command_line() {
        let prog = vec!["claude".to_string()];
        let inv = invocation(
            CliKind::Preset(Preset::ClaudeCode),
            &args(&prog, None, Some("s1")),
        );
        assert_eq!(
            inv.argv.join(" "),
            "claude --print --output-format stream-json --verbose --model m1 --resume s1 --dangerously-skip-permissions do it"
        );
        let tools = vec!["Read".to_string(), "Bash".to_string()];
        let inv = invocation(
            CliKind::Preset(Preset::ClaudeCode),
            &args(&prog, Some(&tools), None),
        );
        assert!(inv.argv.ends_with(&[
            "--allowed-tools".into(),
            "Read,Bash".into(),
            "do it".into()
        ]));
        let inv = invocation(
            CliKind::Preset(Preset::ClaudeCode),
            &args(&prog, Some(&[]), None),
        );
        assert!(
            inv.argv
                .ends_with(&["--tools".into(), "".into(), "do it".into()])
        );
        assert!(inv.stdin.is_none());
    }

    #[test]
    fn codex_and_gemini_command_lines() {
        let prog = vec!["codex".to_string()];
        let inv = invocation(
            CliKind::Preset(Preset::Codex),
            &args(&prog, Some(&[]), Some("t1")),
        );
        assert_eq!(
            inv.argv.join(" "),
            "codex exec resume t1 --json --skip-git-repo-check --model m1 --sandbox read-only --output-last-message /tmp/last.txt -"
        );
        assert_eq!(inv.stdin.as_deref(), Some("do it"));
        let prog = vec!["gemini".to_string()];
        let tools = vec!["read_file".to_string()];
        let inv = invocation(
            CliKind::Preset(Preset::Gemini),
            &args(&prog, Some(&tools), None),
        );
        assert_eq!(
            inv.argv.join(" "),
            "gemini --output-format json --model m1 --allowed-tools=read_file --prompt=do it"
        );
        let inv = invocation(CliKind::Preset(Preset::Gemini), &args(&prog, None, None));
        assert!(inv.argv.contains(&"--yolo".to_string()));
    }

    #[test]
    fn claude_stream() {
        let out = [
            json!({"type": "system", "subtype": "init", "session_id": "abc", "tools": []}),
            json!({"type": "assistant", "message": {"content": [{"type": "text", "text": "thinking"}]}, "session_id": "abc"}),
            json!({"type": "result", "subtype": "success", "is_error": false, "result": "{\"ok\": true}", "session_id": "abc",
                   "total_cost_usd": 0.25, "usage": {"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 7}}),
        ]
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n");
        let p = parse_output(CliKind::Preset(Preset::ClaudeCode), &out, None);
        assert_eq!(p.reply.session.as_deref(), Some("abc"));
        assert_eq!(p.reply.text, "{\"ok\": true}");
        assert_eq!(p.reply.steps, vec!["thinking".to_string()]);
        let u = p.reply.usage.unwrap();
        assert_eq!(
            (u.input, u.output, u.cache_read, u.cache_write),
            (10, 4, Some(100), Some(7))
        );
        assert_eq!(u.cost_usd, Some(0.25));
        assert!(p.error.is_none());
        let err =
            json!({"type": "result", "subtype": "error_max_turns", "is_error": true}).to_string();
        let p = parse_output(CliKind::Preset(Preset::ClaudeCode), &err, None);
        assert_eq!(p.error.as_deref(), Some("error_max_turns"));
    }

    #[test]
    fn codex_jsonl() {
        let out = [
            json!({"type": "thread.started", "thread_id": "th-1"}),
            json!({"type": "turn.started"}),
            json!({"type": "item.completed", "item": {"id": "i0", "type": "agent_message", "text": "first"}}),
            json!({"type": "turn.completed", "usage": {"input_tokens": 20, "cached_input_tokens": 5, "output_tokens": 3}}),
        ]
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("\n");
        let kind = CliKind::Preset(Preset::Codex);
        let p = parse_output(kind, &out, Some("final".into()));
        assert_eq!(p.reply.session.as_deref(), Some("th-1"));
        assert_eq!(p.reply.text, "final");
        let u = p.reply.usage.unwrap();
        assert_eq!((u.input, u.output, u.cache_read), (20, 3, Some(5)));
        // without the file, the last agent message is the answer
        assert_eq!(
            parse_output(kind, &out, Some(" ".into())).reply.text,
            "first"
        );
        let failed = json!({"type": "turn.failed", "error": {"message": "quota"}}).to_string();
        assert_eq!(
            parse_output(kind, &failed, None).error.as_deref(),
            Some("quota")
        );
    }

    #[test]
    fn gemini_json() {
        let out = format!(
            "Loaded cached credentials.\n{}",
            serde_json::to_string_pretty(&json!({
                "session_id": "g-1",
                "response": "```json\n{\"ok\": true}\n```",
                "stats": {"models": {"gemini-2.5-pro": {"tokens": {"prompt": 30, "candidates": 6, "total": 40, "cached": 2, "thoughts": 4}}}}
            }))
            .unwrap()
        );
        let p = parse_output(CliKind::Preset(Preset::Gemini), &out, None);
        assert_eq!(p.reply.session.as_deref(), Some("g-1"));
        assert!(p.reply.text.contains("\"ok\": true"));
        let u = p.reply.usage.unwrap();
        assert_eq!(
            (u.input, u.output, u.cache_read, u.reasoning),
            (30, 6, Some(2), Some(4))
        );
        let e = json!({"response": "", "error": {"type": "ApiError", "message": "bad key"}})
            .to_string();
        assert_eq!(
            parse_output(CliKind::Preset(Preset::Gemini), &e, None)
                .error
                .as_deref(),
            Some("bad key")
        );
    }
}
