//! Agent definitions: the named agents a workflow declares and its agent tasks call.
//!
//! They live outside the YAML module because Rust-defined workflows declare agents too
//! ([`crate::build::FnWorkflow::with_agent`]); the engine only ever sees an [`AgentDef`],
//! whichever way it was written.

/// An agent a workflow declares (YAML `agents:`). Declaring it starts nothing: the engine runs it
/// when a task names it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentDef {
    pub name: String,
    pub kind: AgentKind,
    /// Model name handed to the agent (CLI `--model`, the provider's `model` field). None lets
    /// the CLI pick its own default; providers require it.
    pub model: Option<String>,
    /// Tools the agent may use. `None` (the field left out) means the CLI's tools run without
    /// permission prompts; `Some(list)` restricts a CLI that has an allow-list to that list
    /// (`Some(vec![])`: no tools).
    pub allow_tools: Option<Vec<String>>,
    /// A CLI agent that prints nothing for this long is considered hung: its process group is
    /// killed and the attempt fails (`TASK_IDLE_TIMEOUT`, retried). None: [`DEFAULT_IDLE_TIMEOUT_MS`].
    pub idle_timeout_ms: Option<u64>,
}

/// How long a CLI agent may stay silent before it is considered hung (10 minutes).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 600_000;

impl AgentDef {
    /// A built-in CLI preset with the CLI's default model and tools.
    pub fn preset(name: impl Into<String>, preset: Preset) -> Self {
        AgentDef {
            name: name.into(),
            kind: AgentKind::Preset { preset, bin: None },
            model: None,
            allow_tools: None,
            idle_timeout_ms: None,
        }
    }

    /// A generic CLI agent.
    pub fn command(name: impl Into<String>, argv: Vec<String>, prompt: PromptMode) -> Self {
        AgentDef {
            name: name.into(),
            kind: AgentKind::Command { argv, prompt },
            model: None,
            allow_tools: None,
            idle_timeout_ms: None,
        }
    }

    /// Sets the model.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets how long the agent may stay silent before it is considered hung.
    pub fn with_idle_timeout_ms(mut self, ms: u64) -> Self {
        self.idle_timeout_ms = Some(ms);
        self
    }

    /// Restricts the tools the agent may use.
    pub fn with_allow_tools(mut self, tools: &[&str]) -> Self {
        self.allow_tools = Some(tools.iter().map(|s| s.to_string()).collect());
        self
    }

    /// The engine name stored on attempts (`agentEngine`): a preset's name, `command`, or the
    /// provider's name. A resumed session is only reused by an agent of the same engine.
    pub fn engine(&self) -> &'static str {
        match &self.kind {
            AgentKind::Preset { preset, .. } => preset.as_str(),
            AgentKind::Command { .. } => "command",
            AgentKind::Provider { provider, .. } => provider.as_str(),
        }
    }
}

/// How an agent is reached.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentKind {
    /// A built-in CLI agent run in its non-interactive JSON mode.
    Preset {
        preset: Preset,
        /// Replaces the CLI's program (`claude`, `codex`, `gemini`): one path, or a program with
        /// leading arguments. Tests point presets at fake CLIs with it.
        bin: Option<Vec<String>>,
    },
    /// A generic CLI agent: the argv to run and how it receives the prompt.
    Command {
        argv: Vec<String>,
        prompt: PromptMode,
    },
    /// An HTTP API.
    Provider {
        provider: Provider,
        /// API root. `openai-compatible` requires it (e.g. `http://127.0.0.1:8080/v1`);
        /// `anthropic` defaults to `https://api.anthropic.com`.
        base_url: Option<String>,
        /// Environment variable holding the API key (defaults: `OPENAI_API_KEY`,
        /// `ANTHROPIC_API_KEY`).
        api_key_env: Option<String>,
        /// Upper bound on generated tokens per call (the Anthropic API requires one).
        max_tokens: Option<u32>,
    },
}

/// The built-in CLI agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    ClaudeCode,
    Codex,
    Gemini,
}

impl Preset {
    /// Every preset, in the order they are listed in errors.
    pub const ALL: [Preset; 3] = [Preset::ClaudeCode, Preset::Codex, Preset::Gemini];

    /// The name written in workflow files.
    pub fn as_str(self) -> &'static str {
        match self {
            Preset::ClaudeCode => "claude-code",
            Preset::Codex => "codex",
            Preset::Gemini => "gemini",
        }
    }

    pub fn parse(s: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The program run when neither `bin` nor the override variable is set.
    pub fn default_program(self) -> &'static str {
        match self {
            Preset::ClaudeCode => "claude",
            Preset::Codex => "codex",
            Preset::Gemini => "gemini",
        }
    }

    /// Environment variable that replaces the program (e.g. `SMITHERS_CLAUDE_BIN`).
    pub fn bin_env(self) -> &'static str {
        match self {
            Preset::ClaudeCode => "SMITHERS_CLAUDE_BIN",
            Preset::Codex => "SMITHERS_CODEX_BIN",
            Preset::Gemini => "SMITHERS_GEMINI_BIN",
        }
    }
}

/// The HTTP APIs an agent can call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// `POST {base_url}/chat/completions` with a JSON-schema `response_format`.
    OpenAiCompatible,
    /// `POST {base_url}/v1/messages` (the Anthropic Messages API).
    Anthropic,
}

impl Provider {
    pub const ALL: [Provider; 2] = [Provider::OpenAiCompatible, Provider::Anthropic];

    /// The name written in workflow files.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAiCompatible => "openai-compatible",
            Provider::Anthropic => "anthropic",
        }
    }

    pub fn parse(s: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Where the API key is read from when `api_key_env` is not set.
    pub fn default_key_env(self) -> &'static str {
        match self {
            Provider::OpenAiCompatible => "OPENAI_API_KEY",
            Provider::Anthropic => "ANTHROPIC_API_KEY",
        }
    }
}

/// How a command agent receives its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptMode {
    /// Written to the agent's standard input, which is then closed.
    Stdin,
    /// Appended as the last argument.
    Arg,
}
