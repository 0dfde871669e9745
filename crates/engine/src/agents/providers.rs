//! HTTP provider agents: an OpenAI-compatible chat-completions API (structured output through a
//! JSON-schema `response_format`) and the Anthropic Messages API (structured output through a
//! forced `output` tool whose input schema is the task's schema). Each attempt is one
//! conversation; repair turns append to it.

use super::http::{HttpClient, HttpError};
use super::usage::{Usage, count};
use super::{AgentJob, Reply, TurnIo};
use serde_json::{Value, json};
use smithers_core::agent::Provider;
use smithers_core::{Code, SmithersError};
use std::time::Duration;

/// A request without a task timeout still gives up after this long.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// `max_tokens` sent to Anthropic when the agent sets none (the API requires a value).
const DEFAULT_ANTHROPIC_MAX_TOKENS: u32 = 8_192;
/// The Anthropic API version header value.
const ANTHROPIC_VERSION: &str = "2023-06-01";
/// The tool Anthropic is made to call with the result.
const OUTPUT_TOOL: &str = "output";

struct ApiKey {
    env: String,
    value: String,
}

/// One provider conversation (one attempt).
pub(crate) struct HttpSession {
    provider: Provider,
    agent: String,
    url: String,
    model: String,
    key: Option<ApiKey>,
    key_env: String,
    max_tokens: Option<u32>,
    schema: Option<Value>,
    messages: Vec<Value>,
    /// Anthropic: the `output` tool call the next user message answers.
    pending_tool: Option<String>,
    client: HttpClient,
}

impl HttpSession {
    /// Resolves the URL and API key. The key is read from the task's `env` first, then from the
    /// engine's environment.
    pub fn new(
        job: &AgentJob,
        provider: Provider,
        base_url: Option<&str>,
        api_key_env: Option<&str>,
        max_tokens: Option<u32>,
    ) -> Result<Self, SmithersError> {
        let agent = job.def.name.clone();
        let config = |msg: String| {
            SmithersError::new(Code::AgentConfigInvalid, format!("agent `{agent}`: {msg}"))
                .terminal()
        };
        let model = job
            .def
            .model
            .clone()
            .ok_or_else(|| config("a provider agent needs `model`".into()))?;
        let url = match (provider, base_url) {
            (Provider::OpenAiCompatible, Some(b)) => {
                format!("{}/chat/completions", b.trim_end_matches('/'))
            }
            (Provider::OpenAiCompatible, None) => {
                return Err(config("an openai-compatible agent needs `base_url`".into()));
            }
            (Provider::Anthropic, b) => {
                let b = b
                    .unwrap_or("https://api.anthropic.com")
                    .trim_end_matches('/');
                if b.ends_with("/v1") {
                    format!("{b}/messages")
                } else {
                    format!("{b}/v1/messages")
                }
            }
        };
        let key_env = api_key_env
            .unwrap_or(provider.default_key_env())
            .to_string();
        let key = job
            .env
            .get(&key_env)
            .cloned()
            .or_else(|| std::env::var(&key_env).ok())
            .filter(|k| !k.is_empty())
            .map(|value| ApiKey {
                env: key_env.clone(),
                value,
            });
        if key.is_none() && provider == Provider::Anthropic {
            return Err(config(format!(
                "the API key variable `{key_env}` is not set (set it in the environment or the task's `env`, or name another with `api_key_env`)"
            )));
        }
        let client =
            HttpClient::new().map_err(|e| config(format!("cannot set up HTTPS: {e:?}")))?;
        Ok(HttpSession {
            provider,
            agent,
            url,
            model,
            key,
            key_env,
            max_tokens,
            schema: job.output.as_ref().map(|o| (*o.schema).clone()),
            messages: Vec::new(),
            pending_tool: None,
            client,
        })
    }

    /// Sends one user message and returns the reply.
    pub async fn send(&mut self, ask: &str, io: &TurnIo<'_>) -> Result<Reply, SmithersError> {
        let user = match self.pending_tool.take() {
            Some(id) => json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": id, "is_error": true, "content": ask}]}),
            None => json!({"role": "user", "content": ask}),
        };
        self.messages.push(user);
        let (body, headers) = self.request();
        let timeout = match io.remaining_ms(&self.agent)? {
            Some(ms) => Duration::from_millis(ms),
            None => DEFAULT_REQUEST_TIMEOUT,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let (status, answer) = self
            .client
            .post_json(&self.url, &headers, bytes, timeout, io.cancel.clone())
            .await
            .map_err(|e| self.transport_error(e, timeout))?;
        if !(200..300).contains(&status) {
            return Err(self.status_error(status, &answer));
        }
        let doc: Value = serde_json::from_slice(&answer).map_err(|e| {
            SmithersError::new(
                Code::AgentHttpError,
                format!(
                    "agent `{}`: {} answered HTTP {status} with a body that is not JSON ({e})",
                    self.agent, self.url
                ),
            )
        })?;
        let reply = match self.provider {
            Provider::OpenAiCompatible => self.openai_reply(&doc)?,
            Provider::Anthropic => self.anthropic_reply(&doc)?,
        };
        let shown = match &reply.structured {
            Some(v) if reply.text.trim().is_empty() => v.to_string(),
            _ => reply.text.clone(),
        };
        io.rep.output("stdout", format!("{shown}\n"));
        Ok(reply)
    }

    /// The request body and headers of the next call.
    fn request(&self) -> (Value, Vec<(&'static str, String)>) {
        let mut headers = Vec::new();
        let mut body = json!({"model": self.model, "messages": self.messages});
        match self.provider {
            Provider::OpenAiCompatible => {
                if let Some(k) = &self.key {
                    headers.push(("authorization", format!("Bearer {}", k.value)));
                }
                if let Some(schema) = &self.schema {
                    body["response_format"] = json!({"type": "json_schema",
                        "json_schema": {"name": OUTPUT_TOOL, "schema": schema}});
                }
                if let Some(n) = self.max_tokens {
                    body["max_tokens"] = json!(n);
                }
            }
            Provider::Anthropic => {
                if let Some(k) = &self.key {
                    headers.push(("x-api-key", k.value.clone()));
                }
                headers.push(("anthropic-version", ANTHROPIC_VERSION.to_string()));
                body["max_tokens"] = json!(self.max_tokens.unwrap_or(DEFAULT_ANTHROPIC_MAX_TOKENS));
                // a tool's input must be an object: other schemas rely on the prompt alone
                if let Some(schema) = self.schema.as_ref().filter(|s| is_object_schema(s)) {
                    body["tools"] = json!([{"name": OUTPUT_TOOL,
                        "description": "Return the task's result. Call this exactly once, with the complete result.",
                        "input_schema": schema}]);
                    body["tool_choice"] = json!({"type": "tool", "name": OUTPUT_TOOL});
                }
            }
        }
        (body, headers)
    }

    fn openai_reply(&mut self, doc: &Value) -> Result<Reply, SmithersError> {
        let msg = doc
            .pointer("/choices/0/message")
            .ok_or_else(|| self.shape_error("no `choices[0].message`"))?;
        let text = match msg.get("content") {
            Some(Value::String(s)) => s.clone(),
            // some servers send content parts
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => msg
                .get("refusal")
                .and_then(Value::as_str)
                .map(|r| format!("(refused) {r}"))
                .unwrap_or_default(),
        };
        self.messages
            .push(json!({"role": "assistant", "content": text}));
        let usage = doc.get("usage").filter(|u| u.is_object()).map(|u| Usage {
            input: count(u, "prompt_tokens").unwrap_or(0),
            output: count(u, "completion_tokens").unwrap_or(0),
            cache_read: u
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64),
            cache_write: None,
            reasoning: u
                .pointer("/completion_tokens_details/reasoning_tokens")
                .and_then(Value::as_u64),
            cost_usd: None,
        });
        Ok(Reply {
            text,
            usage,
            ..Default::default()
        })
    }

    fn anthropic_reply(&mut self, doc: &Value) -> Result<Reply, SmithersError> {
        let content = doc
            .get("content")
            .and_then(Value::as_array)
            .ok_or_else(|| self.shape_error("no `content` list"))?;
        let mut texts = Vec::new();
        let mut structured = None;
        for block in content {
            match block.get("type").and_then(Value::as_str) {
                Some("text") => {
                    if let Some(t) = block.get("text").and_then(Value::as_str) {
                        texts.push(t.to_string());
                    }
                }
                Some("tool_use")
                    if block.get("name").and_then(Value::as_str) == Some(OUTPUT_TOOL) =>
                {
                    structured = block.get("input").cloned();
                    self.pending_tool = block.get("id").and_then(Value::as_str).map(str::to_string);
                }
                _ => {}
            }
        }
        self.messages
            .push(json!({"role": "assistant", "content": content}));
        let usage = doc.get("usage").filter(|u| u.is_object()).map(|u| Usage {
            input: count(u, "input_tokens").unwrap_or(0),
            output: count(u, "output_tokens").unwrap_or(0),
            cache_read: count(u, "cache_read_input_tokens"),
            cache_write: count(u, "cache_creation_input_tokens"),
            reasoning: None,
            cost_usd: None,
        });
        Ok(Reply {
            text: texts.join("\n"),
            structured,
            usage,
            ..Default::default()
        })
    }

    fn shape_error(&self, what: &str) -> SmithersError {
        SmithersError::new(
            Code::AgentHttpError,
            format!(
                "agent `{}`: the answer of {} has an unexpected shape ({what})",
                self.agent, self.url
            ),
        )
    }

    fn transport_error(&self, e: HttpError, timeout: Duration) -> SmithersError {
        let (a, u) = (&self.agent, &self.url);
        match e {
            HttpError::Setup(m) | HttpError::BadUrl(m) => SmithersError::new(
                Code::AgentConfigInvalid,
                format!("agent `{a}`: {}", self.redact(&m)),
            )
            .terminal(),
            HttpError::Connect(m) => SmithersError::new(
                Code::AgentHttpError,
                format!("agent `{a}`: cannot reach {u}: {}", self.redact(&m)),
            ),
            HttpError::Io(m) => SmithersError::new(
                Code::AgentHttpError,
                format!(
                    "agent `{a}`: the request to {u} failed: {}",
                    self.redact(&m)
                ),
            ),
            HttpError::TooLarge => SmithersError::new(
                Code::OutputTooLarge,
                format!(
                    "agent `{a}`: the answer of {u} is larger than {} bytes",
                    super::http::MAX_RESPONSE_BYTES
                ),
            ),
            HttpError::Timeout => SmithersError::new(
                Code::TaskTimeout,
                format!(
                    "agent `{a}`: {u} did not answer within {} ms",
                    timeout.as_millis()
                ),
            ),
            HttpError::Cancelled => SmithersError::new(
                Code::TaskAborted,
                format!("agent `{a}`: the task was cancelled during the request"),
            ),
        }
    }

    /// An HTTP error status as a typed error: credentials problems and other client errors are
    /// terminal, rate limits and server errors retryable.
    fn status_error(&self, status: u16, body: &[u8]) -> SmithersError {
        let text = String::from_utf8_lossy(body);
        let detail = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .or_else(|| v.get("message"))
                    .or_else(|| v.get("error"))
                    .map(|m| {
                        m.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| m.to_string())
                    })
            })
            .unwrap_or_else(|| text.trim().chars().take(500).collect());
        let detail = self.redact(&detail);
        let (a, u) = (&self.agent, &self.url);
        match status {
            401 | 403 => {
                let key = match &self.key {
                    Some(k) => format!("the key in `{}`", k.env),
                    None => format!("no key was sent (`{}` is not set)", self.key_env),
                };
                SmithersError::new(
                    Code::AgentConfigInvalid,
                    format!(
                        "agent `{a}`: {u} refused the credentials (HTTP {status}; {key}): {detail}"
                    ),
                )
                .terminal()
            }
            408 | 409 | 429 | 500..=599 => SmithersError::new(
                Code::AgentHttpError,
                format!("agent `{a}`: {u} answered HTTP {status}: {detail}"),
            ),
            _ => SmithersError::new(
                Code::AgentHttpError,
                format!("agent `{a}`: {u} rejected the request (HTTP {status}): {detail}"),
            )
            .terminal(),
        }
    }

    /// Removes the API key from a text that came back from the server or the transport.
    fn redact(&self, s: &str) -> String {
        match &self.key {
            Some(k) if k.value.len() >= 4 => s.replace(&k.value, "[redacted]"),
            _ => s.to_string(),
        }
    }
}

/// Whether a schema describes an object (a tool's input schema must).
fn is_object_schema(s: &Value) -> bool {
    s.get("type").and_then(Value::as_str) == Some("object")
}
