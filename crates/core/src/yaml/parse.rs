//! Turning a parsed document into definitions, collecting every problem on the way.

use super::defs::{Body, Cond, Def, DefKind, TCmd, TJson, TStr, TaskDef};
use super::value::{Y, YV};
use crate::agent::{AgentDef, AgentKind, Preset, PromptMode, Provider};
use crate::duration::parse_duration_ms;
use crate::error::Problem;
use crate::expr::{ExprEnv, NameTable, SCOPE_NAMES, single_expression};
use crate::tree::{
    ApprovalMode, ApprovalOption, ApprovalSpec, OnDeny, OnMaxReached, OnTimeout, OutputSpec, Task,
    TaskKind, TimerSpec, WaitSpec,
};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

const KINDS: &[&str] = &[
    "task",
    "sequence",
    "parallel",
    "branch",
    "loop",
    "approval",
    "wait_for_event",
    "timer",
    "subflow",
];
const ROOT_FIELDS: &[&str] = &["name", "description", "input", "outputs", "agents", "steps"];
const COMMON: &[&str] = &["id", "skip_if", "depends_on", "label"];
const TASK_FIELDS: &[&str] = &[
    "id",
    "value",
    "run",
    "agent",
    "prompt",
    "prompt_file",
    "output",
    "retries",
    "backoff",
    "timeout",
    "skip_if",
    "depends_on",
    "continue_on_fail",
    "needs_approval",
    "label",
    "cwd",
    "env",
];
const AGENT_FIELDS: &[&str] = &[
    "preset",
    "bin",
    "command",
    "prompt",
    "provider",
    "base_url",
    "model",
    "api_key_env",
    "max_tokens",
    "allow_tools",
    "idle_timeout",
];
/// Longest workflow name accepted.
pub const MAX_NAME_LEN: usize = 256;
/// Longest node id accepted.
pub const MAX_NODE_ID_LEN: usize = 128;

/// An expression's references, checked once every id in the file is known.
struct RefCheck {
    paths: Vec<String>,
    line: Option<usize>,
    node: String,
    field: String,
    source: String,
}

/// Accumulates definitions and problems for one file.
pub struct Parser<'a> {
    file: String,
    base_dir: &'a Path,
    pub problems: Vec<Problem>,
    pub env: ExprEnv,
    pub names: NameTable,
    pub schemas: HashMap<String, Arc<Value>>,
    pub agents: BTreeMap<String, AgentDef>,
    all_ids: HashMap<String, Option<usize>>,
    refs: Vec<RefCheck>,
    deps: Vec<(String, Option<usize>, Vec<String>)>,
}

impl<'a> Parser<'a> {
    pub fn new(file: &str, base_dir: &'a Path) -> Self {
        Parser {
            file: file.to_string(),
            base_dir,
            problems: Vec::new(),
            env: ExprEnv::new(),
            names: NameTable::default(),
            schemas: HashMap::new(),
            agents: BTreeMap::new(),
            all_ids: HashMap::new(),
            refs: Vec::new(),
            deps: Vec::new(),
        }
    }

    pub(crate) fn problem(
        &mut self,
        line: Option<usize>,
        node: Option<&str>,
        field: Option<&str>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            file: self.file.clone(),
            line,
            node: node.map(str::to_string),
            field: field.map(str::to_string),
            message: message.into(),
        });
    }

    /// Reports fields not in `allowed` (with a suggestion for near misses).
    fn check_fields(&mut self, y: &Y, allowed: &[&str], node: &str, what: &str) {
        let Some(m) = y.as_map() else { return };
        for (k, line, _) in m {
            if !allowed.contains(&k.as_str()) {
                let hint = suggest(k, allowed)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.problem(
                    *line,
                    Some(node),
                    Some(k),
                    format!(
                        "unknown field `{k}` for {what} (allowed: {}){hint}",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    fn wrong_type(&mut self, y: &Y, node: &str, field: &str, expected: &str) {
        self.problem(
            y.line,
            Some(node),
            Some(field),
            format!("expected {expected}, found {}", y.type_name()),
        );
    }

    fn string(&mut self, m: &Y, key: &str, node: &str) -> Option<String> {
        let y = m.get(key)?;
        match &y.v {
            YV::Str(s) => Some(s.clone()),
            YV::Num(n) => Some(n.to_string()),
            _ => {
                self.wrong_type(y, node, key, "a string");
                None
            }
        }
    }

    fn required_string(&mut self, m: &Y, key: &str, node: &str, what: &str) -> Option<String> {
        if m.get(key).is_none() {
            self.problem(
                m.line,
                Some(node),
                Some(key),
                format!("{what} needs `{key}`"),
            );
            return None;
        }
        self.string(m, key, node)
    }

    fn boolean(&mut self, m: &Y, key: &str, node: &str) -> bool {
        match m.get(key) {
            None => false,
            Some(Y { v: YV::Bool(b), .. }) => *b,
            Some(y) => {
                self.wrong_type(y, node, key, "true or false");
                false
            }
        }
    }

    fn uint(&mut self, m: &Y, key: &str, node: &str, min: u64, max: u64) -> Option<u64> {
        let y = m.get(key)?;
        match &y.v {
            YV::Num(n) if n.as_u64().is_some_and(|v| v >= min && v <= max) => n.as_u64(),
            _ => {
                self.wrong_type(y, node, key, &format!("an integer from {min} to {max}"));
                None
            }
        }
    }

    fn duration(&mut self, m: &Y, key: &str, node: &str) -> Option<u64> {
        let y = m.get(key)?;
        let text = match &y.v {
            YV::Str(s) => s.clone(),
            YV::Num(n) => n.to_string(),
            _ => {
                self.wrong_type(
                    y,
                    node,
                    key,
                    "a duration such as `500ms`, `10s`, `5m`, `2h` or `1d`",
                );
                return None;
            }
        };
        match parse_duration_ms(&text) {
            Ok(ms) => Some(ms),
            Err(e) => {
                self.problem(y.line, Some(node), Some(key), e.message);
                None
            }
        }
    }

    fn string_list(&mut self, m: &Y, key: &str, node: &str) -> Vec<(String, Option<usize>)> {
        let Some(y) = m.get(key) else {
            return Vec::new();
        };
        let Some(items) = y.as_seq() else {
            self.wrong_type(y, node, key, "a list of strings");
            return Vec::new();
        };
        let mut out = Vec::new();
        for i in items {
            match i.as_str() {
                Some(s) => out.push((s.to_string(), i.line)),
                None => self.wrong_type(i, node, key, "a string"),
            }
        }
        out
    }

    fn one_of<T: Copy>(
        &mut self,
        m: &Y,
        key: &str,
        node: &str,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(y) = m.get(key) else { return default };
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        match y
            .as_str()
            .and_then(|s| options.iter().find(|(n, _)| *n == s))
        {
            Some((_, v)) => *v,
            None => {
                let found = y
                    .as_str()
                    .map(|s| format!("`{s}`"))
                    .unwrap_or_else(|| y.type_name().to_string());
                self.problem(
                    y.line,
                    Some(node),
                    Some(key),
                    format!(
                        "unknown value {found}; expected one of {}",
                        names.join(", ")
                    ),
                );
                default
            }
        }
    }

    /// Registers a node id: syntax and uniqueness across the whole file.
    fn id(&mut self, m: &Y, node_path: &str, required: bool, what: &str) -> Option<String> {
        let y = match m.get("id") {
            Some(y) => y,
            None => {
                if required {
                    self.problem(
                        m.line,
                        Some(node_path),
                        Some("id"),
                        format!("{what} needs an `id`"),
                    );
                }
                return None;
            }
        };
        let id = match &y.v {
            YV::Str(s) => s.clone(),
            YV::Num(n) => n.to_string(),
            _ => {
                self.wrong_type(y, node_path, "id", "a string");
                return None;
            }
        };
        if id.is_empty()
            || id.len() > MAX_NODE_ID_LEN
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            self.problem(
                y.line,
                Some(&id),
                Some("id"),
                format!("invalid id `{id}`: use 1 to {MAX_NODE_ID_LEN} characters of letters, digits, `_`, `.` and `-`"),
            );
            return None;
        }
        if let Some(first) = self.all_ids.get(&id) {
            let at = first
                .map(|l| format!(" (first defined on line {l})"))
                .unwrap_or_default();
            self.problem(
                y.line,
                Some(&id),
                Some("id"),
                format!("duplicate id `{id}`{at}; ids must be unique in the whole file"),
            );
            return None;
        }
        self.all_ids.insert(id.clone(), y.line);
        Some(id)
    }

    fn expression(&mut self, m: &Y, key: &'static str, node: &str) -> Option<Cond> {
        let y = m.get(key)?;
        let text = match &y.v {
            YV::Str(s) => s.clone(),
            YV::Bool(b) => b.to_string(),
            YV::Num(n) => n.to_string(),
            _ => {
                self.wrong_type(y, node, key, "an expression string");
                return None;
            }
        };
        // `"{{ x }}"` in a bare-expression field means `x`.
        let text = single_expression(&text).map(str::to_string).unwrap_or(text);
        match self.env.compile_expression(&text) {
            Ok((c, refs)) => {
                self.refs.push(RefCheck {
                    paths: refs.paths,
                    line: y.line,
                    node: node.into(),
                    field: key.into(),
                    source: text,
                });
                Some(Cond { c, field: key })
            }
            Err(e) => {
                self.problem(
                    y.line,
                    Some(node),
                    Some(key),
                    format!("invalid expression `{text}`: {e}"),
                );
                None
            }
        }
    }

    fn tstr_of(&mut self, s: &str, line: Option<usize>, node: &str, field: &str) -> TStr {
        if !crate::expr::is_template(s) {
            return TStr::Lit(s.to_string());
        }
        match self.env.compile_template(s) {
            Ok((c, refs)) => {
                self.refs.push(RefCheck {
                    paths: refs.paths,
                    line,
                    node: node.into(),
                    field: field.into(),
                    source: s.into(),
                });
                TStr::T(c, Arc::from(field))
            }
            Err(e) => {
                self.problem(
                    line,
                    Some(node),
                    Some(field),
                    format!("invalid template `{s}`: {e}"),
                );
                TStr::Lit(s.to_string())
            }
        }
    }

    fn tstr(&mut self, m: &Y, key: &str, node: &str) -> Option<TStr> {
        let s = self.string(m, key, node)?;
        let line = m.get(key).and_then(|y| y.line);
        Some(self.tstr_of(&s, line, node, key))
    }

    fn tjson(&mut self, y: &Y, node: &str, field: &str) -> TJson {
        if !y.has_template() {
            return TJson::Lit(y.to_json());
        }
        match &y.v {
            YV::Str(s) => match self.tstr_of(s, y.line, node, field) {
                TStr::T(c, f) => TJson::T(c, f),
                TStr::Lit(s) => TJson::Lit(Value::String(s)),
            },
            YV::Seq(items) => TJson::Arr(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.tjson(v, node, &format!("{field}[{i}]")))
                    .collect(),
            ),
            YV::Map(m) => TJson::Obj(
                m.iter()
                    .map(|(k, _, v)| (k.clone(), self.tjson(v, node, &format!("{field}.{k}"))))
                    .collect(),
            ),
            _ => TJson::Lit(y.to_json()),
        }
    }

    fn env_vars(&mut self, m: &Y, node: &str) -> Vec<(String, TStr)> {
        let Some(y) = m.get("env") else {
            return Vec::new();
        };
        let Some(map) = y.as_map() else {
            self.wrong_type(y, node, "env", "a mapping of variable names to strings");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, line, v) in map {
            let text = match &v.v {
                YV::Str(s) => s.clone(),
                YV::Num(n) => n.to_string(),
                YV::Bool(b) => b.to_string(),
                _ => {
                    self.problem(
                        *line,
                        Some(node),
                        Some(&format!("env.{k}")),
                        format!("expected a string, found {}", v.type_name()),
                    );
                    continue;
                }
            };
            let t = self.tstr_of(&text, v.line, node, &format!("env.{k}"));
            out.push((k.clone(), t));
        }
        out
    }

    fn compile_schema(
        &mut self,
        schema: &Value,
        line: Option<usize>,
        node: Option<&str>,
        field: &str,
    ) -> bool {
        if !schema.is_object() && !schema.is_boolean() {
            self.problem(
                line,
                node,
                Some(field),
                "a JSON Schema must be a mapping (or true/false)",
            );
            return false;
        }
        match jsonschema::validator_for(schema) {
            Ok(_) => true,
            Err(e) => {
                self.problem(line, node, Some(field), format!("invalid JSON Schema: {e}"));
                false
            }
        }
    }

    fn output_spec(&mut self, m: &Y, node: &str) -> Option<OutputSpec> {
        let y = m.get("output")?;
        match &y.v {
            YV::Str(name) => match self.schemas.get(name) {
                Some(s) => Some(OutputSpec {
                    name: Some(name.clone()),
                    schema: s.clone(),
                }),
                None => {
                    let known: Vec<&String> = self.schemas.keys().collect();
                    let msg = if known.is_empty() {
                        format!(
                            "output schema `{name}` is not defined: add it under `outputs:` or write the schema inline"
                        )
                    } else {
                        let mut known: Vec<String> = known.into_iter().cloned().collect();
                        known.sort();
                        format!(
                            "output schema `{name}` is not defined under `outputs:` (defined: {})",
                            known.join(", ")
                        )
                    };
                    self.problem(y.line, Some(node), Some("output"), msg);
                    None
                }
            },
            YV::Map(_) | YV::Bool(_) => {
                let schema = y.to_json();
                self.compile_schema(&schema, y.line, Some(node), "output")
                    .then(|| OutputSpec {
                        name: None,
                        schema: Arc::new(schema),
                    })
            }
            _ => {
                self.wrong_type(y, node, "output", "a schema name or an inline JSON Schema");
                None
            }
        }
    }

    // ---- the root -------------------------------------------------------------------------

    /// Parses the whole document. Returns name, input schema and steps (problems are kept).
    pub fn root(&mut self, y: &Y) -> (String, Option<Value>, Vec<Def>) {
        if y.as_map().is_none() {
            self.problem(
                y.line,
                None,
                None,
                format!(
                    "a workflow file must be a mapping with `name` and `steps`, found {}",
                    y.type_name()
                ),
            );
            return (String::new(), None, Vec::new());
        }
        self.check_fields(y, ROOT_FIELDS, "workflow", "a workflow");
        let name = match y.get("name") {
            None => {
                self.problem(None, None, Some("name"), "the workflow needs a `name`");
                String::new()
            }
            Some(n) => match n.as_str() {
                Some(s) if !s.trim().is_empty() && s.chars().count() <= MAX_NAME_LEN => {
                    s.to_string()
                }
                Some(s) if s.trim().is_empty() => {
                    self.problem(
                        n.line,
                        None,
                        Some("name"),
                        "the workflow name must not be empty",
                    );
                    String::new()
                }
                Some(_) => {
                    self.problem(
                        n.line,
                        None,
                        Some("name"),
                        format!("the workflow name may be at most {MAX_NAME_LEN} characters"),
                    );
                    String::new()
                }
                None => {
                    self.problem(
                        n.line,
                        None,
                        Some("name"),
                        format!("expected a string, found {}", n.type_name()),
                    );
                    String::new()
                }
            },
        };
        let input = y.get("input").and_then(|i| {
            let schema = i.to_json();
            self.compile_schema(&schema, i.line, None, "input")
                .then_some(schema)
        });
        if let Some(outs) = y.get("outputs") {
            match outs.as_map() {
                Some(m) => {
                    for (k, line, s) in m {
                        let schema = s.to_json();
                        if self.compile_schema(
                            &schema,
                            s.line.or(*line),
                            None,
                            &format!("outputs.{k}"),
                        ) {
                            self.schemas.insert(k.clone(), Arc::new(schema));
                        } else {
                            // Keep the name known so tasks using it do not report a second problem.
                            self.schemas.insert(k.clone(), Arc::new(Value::Bool(true)));
                        }
                    }
                }
                None => self.wrong_type(
                    outs,
                    "workflow",
                    "outputs",
                    "a mapping of schema names to JSON Schemas",
                ),
            }
        }
        if let Some(agents) = y.get("agents") {
            match agents.as_map() {
                Some(m) => {
                    for (k, _, a) in m {
                        if let Some(def) = self.agent(k, a) {
                            self.agents.insert(k.clone(), def);
                        }
                    }
                }
                None => self.wrong_type(
                    agents,
                    "workflow",
                    "agents",
                    "a mapping of agent names to agent definitions",
                ),
            }
        }
        let steps = match y.get("steps") {
            None => {
                self.problem(
                    None,
                    None,
                    Some("steps"),
                    "the workflow needs `steps` (a list of nodes)",
                );
                Vec::new()
            }
            Some(s) => self.steps(s, "steps", &[]),
        };
        self.finish();
        (name, input, steps)
    }

    fn agent(&mut self, name: &str, a: &Y) -> Option<AgentDef> {
        let node = format!("agents.{name}");
        if a.as_map().is_none() {
            self.wrong_type(
                a,
                &node,
                name,
                "an agent definition (preset, command or provider)",
            );
            return None;
        }
        self.check_fields(a, AGENT_FIELDS, &node, "an agent");
        let model = self.string(a, "model", &node);
        let allow_tools = a.get("allow_tools").map(|_| {
            self.string_list(a, "allow_tools", &node)
                .into_iter()
                .map(|(s, _)| s)
                .collect::<Vec<_>>()
        });
        let idle_timeout_ms = self.duration(a, "idle_timeout", &node);
        let has = |k: &str| a.get(k).is_some();
        let line_of = |k: &str| a.get(k).and_then(|y| y.line);
        let count = ["preset", "command", "provider"]
            .iter()
            .filter(|k| has(k))
            .count();
        if count != 1 {
            self.problem(
                a.line,
                Some(&node),
                None,
                "an agent needs exactly one of `preset`, `command` or `provider`",
            );
            return None;
        }
        let kind = if has("preset") {
            let preset_name = self.string(a, "preset", &node)?;
            let Some(preset) = Preset::parse(&preset_name) else {
                let known: Vec<&str> = Preset::ALL.iter().map(|p| p.as_str()).collect();
                let hint = suggest(&preset_name, &known)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.problem(
                    line_of("preset"),
                    Some(&node),
                    Some("preset"),
                    format!(
                        "unknown preset `{preset_name}` (known: {}){hint}",
                        known.join(", ")
                    ),
                );
                return None;
            };
            let bin = match a.get("bin") {
                None => None,
                Some(b) => Some(self.argv(a, b, "bin", &node, false)?),
            };
            AgentKind::Preset { preset, bin }
        } else if let Some(c) = a.get("command") {
            let argv = self.argv(a, c, "command", &node, true)?;
            let prompt = self.one_of(
                a,
                "prompt",
                &node,
                &[("stdin", PromptMode::Stdin), ("arg", PromptMode::Arg)],
                PromptMode::Stdin,
            );
            AgentKind::Command { argv, prompt }
        } else {
            let provider_name = self.string(a, "provider", &node)?;
            let provider = Provider::parse(&provider_name);
            if provider.is_none() {
                self.problem(
                    line_of("provider"),
                    Some(&node),
                    Some("provider"),
                    format!(
                        "unknown provider `{provider_name}`; expected openai-compatible or anthropic"
                    ),
                );
            }
            if model.is_none() {
                self.problem(
                    a.line,
                    Some(&node),
                    Some("model"),
                    "a provider agent needs `model`",
                );
            }
            let base_url = self.string(a, "base_url", &node);
            if provider == Some(Provider::OpenAiCompatible) && base_url.is_none() {
                self.problem(
                    a.line,
                    Some(&node),
                    Some("base_url"),
                    "an openai-compatible agent needs `base_url`",
                );
            }
            if let Some(u) = &base_url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                self.problem(
                    line_of("base_url"),
                    Some(&node),
                    Some("base_url"),
                    format!("`{u}` is not an http:// or https:// URL"),
                );
            }
            let api_key_env = self.string(a, "api_key_env", &node);
            if let Some(k) = &api_key_env
                && (k.is_empty() || k.contains('=') || k.contains('\0'))
            {
                self.problem(
                    line_of("api_key_env"),
                    Some(&node),
                    Some("api_key_env"),
                    format!("`{k}` is not an environment variable name"),
                );
            }
            let max_tokens = self
                .uint(a, "max_tokens", &node, 1, u32::MAX as u64)
                .map(|n| n as u32);
            AgentKind::Provider {
                provider: provider?,
                base_url,
                api_key_env,
                max_tokens,
            }
        };
        let provider_only = ["base_url", "api_key_env", "max_tokens"];
        for k in provider_only {
            if has(k) && !matches!(kind, AgentKind::Provider { .. }) {
                self.problem(
                    line_of(k),
                    Some(&node),
                    Some(k),
                    format!("`{k}` only applies to provider agents"),
                );
            }
        }
        if has("idle_timeout") && matches!(kind, AgentKind::Provider { .. }) {
            self.problem(
                line_of("idle_timeout"),
                Some(&node),
                Some("idle_timeout"),
                "`idle_timeout` only applies to CLI agents (presets and commands); a provider request is bounded by the task's `timeout`",
            );
        }
        if has("prompt") && !matches!(kind, AgentKind::Command { .. }) {
            self.problem(
                line_of("prompt"),
                Some(&node),
                Some("prompt"),
                "`prompt` (stdin|arg) only applies to command agents",
            );
        }
        if has("bin") && !matches!(kind, AgentKind::Preset { .. }) {
            self.problem(
                line_of("bin"),
                Some(&node),
                Some("bin"),
                "`bin` only applies to preset agents (it replaces the preset's program)",
            );
        }
        Some(AgentDef {
            name: name.to_string(),
            kind,
            model,
            allow_tools,
            idle_timeout_ms,
        })
    }

    /// A program with arguments: a string (split on whitespace when `split`, else one path) or
    /// a non-empty list of strings.
    fn argv(&mut self, a: &Y, y: &Y, key: &str, node: &str, split: bool) -> Option<Vec<String>> {
        let argv = match &y.v {
            YV::Str(s) if split => s.split_whitespace().map(str::to_string).collect::<Vec<_>>(),
            YV::Str(s) if s.trim().is_empty() => Vec::new(),
            YV::Str(s) => vec![s.clone()],
            YV::Seq(_) => self
                .string_list(a, key, node)
                .into_iter()
                .map(|(s, _)| s)
                .collect(),
            _ => {
                self.wrong_type(y, node, key, "a string or a list of strings");
                return None;
            }
        };
        if argv.is_empty() {
            self.problem(
                y.line,
                Some(node),
                Some(key),
                format!("`{key}` must not be empty"),
            );
            return None;
        }
        Some(argv)
    }

    // ---- steps ----------------------------------------------------------------------------

    fn steps(&mut self, y: &Y, path: &str, loops: &[String]) -> Vec<Def> {
        let Some(items) = y.as_seq() else {
            self.problem(
                y.line,
                None,
                Some(path),
                format!("expected a list of steps, found {}", y.type_name()),
            );
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.step(s, &format!("{path}[{i}]"), loops))
            .collect()
    }

    /// `then`/`else`: one node or a list of nodes.
    fn one_or_many(&mut self, y: &Y, path: &str, loops: &[String]) -> Vec<Def> {
        if y.as_seq().is_some() {
            self.steps(y, path, loops)
        } else {
            self.step(y, path, loops).into_iter().collect()
        }
    }

    fn step(&mut self, y: &Y, path: &str, loops: &[String]) -> Option<Def> {
        let Some(m) = y.as_map() else {
            self.problem(y.line, Some(path), None, format!("each step is a one-key mapping naming its kind (e.g. `- task: {{...}}`), found {}", y.type_name()));
            return None;
        };
        let kinds: Vec<&(String, Option<usize>, Y)> = m
            .iter()
            .filter(|(k, _, _)| KINDS.contains(&k.as_str()))
            .collect();
        if kinds.len() != 1 || m.len() != 1 {
            if kinds.is_empty() {
                for (k, line, _) in m {
                    let hint = suggest(k, KINDS)
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_default();
                    self.problem(
                        *line,
                        Some(path),
                        None,
                        format!(
                            "unknown kind `{k}` (expected one of {}){hint}",
                            KINDS.join(", ")
                        ),
                    );
                }
            } else {
                let keys: Vec<&str> = m.iter().map(|(k, _, _)| k.as_str()).collect();
                self.problem(y.line, Some(path), None, format!("a step must have exactly one key naming its kind, found {}; indent the node's fields under its kind", keys.join(", ")));
            }
            if kinds.len() != 1 {
                return None;
            }
        }
        let (kind, _, body) = kinds[0];
        if body.as_map().is_none() {
            self.problem(
                body.line,
                Some(path),
                Some(kind),
                format!(
                    "expected the {kind}'s fields as a mapping, found {}",
                    body.type_name()
                ),
            );
            return None;
        }
        let display = body
            .get("id")
            .and_then(|i| i.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("{path}.{kind}"));
        let d = &display;
        let def_kind = match kind.as_str() {
            "sequence" | "parallel" => {
                let par = kind == "parallel";
                let allowed: &[&str] = if par {
                    &["id", "steps", "max_concurrency", "skip_if"]
                } else {
                    &["id", "steps", "skip_if"]
                };
                self.check_fields(body, allowed, d, kind);
                let id = self.id(body, d, false, kind);
                let skip_if = self.expression(body, "skip_if", d);
                let max = if par {
                    self.uint(body, "max_concurrency", d, 1, 1_000_000)
                        .map(|v| v as usize)
                } else {
                    None
                };
                let steps = match body.get("steps") {
                    Some(s) => self.steps(s, &format!("{path}.{kind}.steps"), loops),
                    None => {
                        self.problem(
                            body.line,
                            Some(d),
                            Some("steps"),
                            format!("a {kind} needs `steps`"),
                        );
                        Vec::new()
                    }
                };
                if par {
                    DefKind::Parallel {
                        id,
                        max_concurrency: max,
                        skip_if,
                        steps,
                    }
                } else {
                    DefKind::Sequence { skip_if, steps }
                }
            }
            "branch" => {
                self.check_fields(body, &["id", "if", "then", "else"], d, "a branch");
                self.id(body, d, false, "a branch");
                let cond = self.expression(body, "if", d);
                if body.get("if").is_none() {
                    self.problem(
                        body.line,
                        Some(d),
                        Some("if"),
                        "a branch needs `if` (an expression)",
                    );
                }
                let then = match body.get("then") {
                    Some(t) => self.one_or_many(t, &format!("{path}.branch.then"), loops),
                    None => {
                        self.problem(
                            body.line,
                            Some(d),
                            Some("then"),
                            "a branch needs `then` (a node or a list of nodes)",
                        );
                        Vec::new()
                    }
                };
                let otherwise = body
                    .get("else")
                    .map(|e| self.one_or_many(e, &format!("{path}.branch.else"), loops))
                    .unwrap_or_default();
                DefKind::Branch {
                    cond: cond?,
                    then,
                    otherwise,
                }
            }
            "loop" => {
                self.check_fields(
                    body,
                    &["id", "steps", "until", "max_iterations", "on_max_reached"],
                    d,
                    "a loop",
                );
                let id = self.id(body, d, true, "a loop");
                let until = self.expression(body, "until", d);
                let max = self
                    .uint(body, "max_iterations", d, 1, 1_000_000)
                    .unwrap_or(5) as u32;
                let on_max = self.one_of(
                    body,
                    "on_max_reached",
                    d,
                    &[
                        ("return-last", OnMaxReached::ReturnLast),
                        ("fail", OnMaxReached::Fail),
                    ],
                    OnMaxReached::ReturnLast,
                );
                let mut inner = loops.to_vec();
                inner.push(id.clone().unwrap_or_else(|| display.clone()));
                let steps = match body.get("steps") {
                    Some(s) => self.steps(s, &format!("{path}.loop.steps"), &inner),
                    None => {
                        self.problem(body.line, Some(d), Some("steps"), "a loop needs `steps`");
                        Vec::new()
                    }
                };
                DefKind::Loop {
                    id: id?,
                    until,
                    max_iterations: max,
                    on_max_reached: on_max,
                    steps,
                }
            }
            _ => DefKind::Task(Box::new(self.task_like(kind, body, d, loops)?)),
        };
        Some(Def {
            kind: def_kind,
            name: display,
            cached: None,
        })
    }

    fn task_like(&mut self, kind: &str, b: &Y, d: &str, loops: &[String]) -> Option<TaskDef> {
        let allowed: Vec<&str> = match kind {
            "task" => TASK_FIELDS.to_vec(),
            "approval" => [
                COMMON,
                &[
                    "title",
                    "summary",
                    "mode",
                    "options",
                    "on_deny",
                    "allowed_users",
                    "allowed_scopes",
                    "auto_approve",
                ],
            ]
            .concat(),
            "wait_for_event" => [
                COMMON,
                &["event", "correlation_id", "output", "timeout", "on_timeout"],
            ]
            .concat(),
            "timer" => [COMMON, &["duration", "until"]].concat(),
            _ => [
                COMMON,
                &["workflow", "input", "continue_on_fail", "timeout"],
            ]
            .concat(),
        };
        self.check_fields(b, &allowed, d, &format!("a {kind}"));
        let id = self.id(b, d, true, &format!("a {kind}"));
        let skip_if = self.expression(b, "skip_if", d);
        let deps = self.string_list(b, "depends_on", d);
        let label = self.string(b, "label", d);
        if let Some(id) = &id {
            self.names.ids.insert(id.clone(), loops.to_vec());
            if kind == "wait_for_event" {
                self.names.signals.insert(id.clone());
            }
        }
        let mut base = Task::new(id.clone().unwrap_or_default(), TaskKind::Value(Value::Null));
        base.label = label;
        base.depends_on = deps.iter().map(|(s, _)| s.clone()).collect();
        let body = match kind {
            "task" => self.task_body(b, d, &mut base)?,
            "approval" => self.approval(b, d)?,
            "wait_for_event" => {
                let event = self.required_string(b, "event", d, "a wait_for_event");
                let correlation = self.tstr(b, "correlation_id", d);
                base.output = self.output_spec(b, d);
                let timeout_ms = self.duration(b, "timeout", d);
                let on_timeout = self.one_of(
                    b,
                    "on_timeout",
                    d,
                    &[
                        ("fail", OnTimeout::Fail),
                        ("skip", OnTimeout::Skip),
                        ("continue", OnTimeout::Continue),
                    ],
                    OnTimeout::Fail,
                );
                base.continue_on_fail = on_timeout != OnTimeout::Fail;
                Body::Wait {
                    spec: WaitSpec {
                        event: event?,
                        correlation_id: None,
                        timeout_ms,
                        on_timeout,
                    },
                    correlation,
                }
            }
            "timer" => {
                let dur = self.duration(b, "duration", d);
                let until = match b.get("until") {
                    None => None,
                    Some(u) => match u.as_str().and_then(super::time::parse_rfc3339_ms) {
                        Some(ms) => Some(ms),
                        None => {
                            self.problem(
                                u.line,
                                Some(d),
                                Some("until"),
                                "expected an RFC 3339 time such as `2030-01-02T03:04:05Z`",
                            );
                            return None;
                        }
                    },
                };
                match (b.get("duration").is_some(), b.get("until").is_some()) {
                    (true, true) | (false, false) => {
                        self.problem(
                            b.line,
                            Some(d),
                            None,
                            "a timer needs exactly one of `duration` or `until`",
                        );
                        return None;
                    }
                    _ => {}
                }
                match (dur, until) {
                    (Some(ms), None) => Body::Timer(TimerSpec::DurationMs(ms)),
                    (None, Some(at)) => Body::Timer(TimerSpec::UntilMs(at)),
                    _ => return None,
                }
            }
            _ => {
                let workflow = self.required_string(b, "workflow", d, "a subflow");
                if let Some(w) = &workflow
                    && (w.contains('/')
                        || w.ends_with(".yaml")
                        || w.ends_with(".yml")
                        || w.ends_with(".json"))
                    && super::resolve_subflow_path(self.base_dir, w).is_none()
                {
                    self.problem(
                        b.get("workflow").and_then(|y| y.line),
                        Some(d),
                        Some("workflow"),
                        format!("subflow file `{w}` not found next to this workflow"),
                    );
                }
                base.continue_on_fail = self.boolean(b, "continue_on_fail", d);
                base.timeout_ms = self.duration(b, "timeout", d);
                let input = b
                    .get("input")
                    .map(|i| self.tjson(i, d, "input"))
                    .unwrap_or(TJson::Lit(Value::Object(Default::default())));
                Body::Subflow {
                    workflow: workflow?,
                    input,
                }
            }
        };
        let id = id?;
        if !deps.is_empty() {
            self.deps.push((
                id.clone(),
                b.get("depends_on").and_then(|y| y.line),
                base.depends_on.clone(),
            ));
        }
        Some(TaskDef {
            scoped: loops.len() >= 2,
            base,
            body,
            skip_if,
        })
    }

    fn task_body(&mut self, b: &Y, d: &str, base: &mut Task) -> Option<Body> {
        let has = |k: &str| b.get(k).is_some();
        let n = [
            has("value"),
            has("run"),
            has("agent") || has("prompt") || has("prompt_file"),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if n != 1 {
            self.problem(b.line, Some(d), None, "a task needs exactly one of `value`, `run`, or `agent` with `prompt` (or `prompt_file`)");
            return None;
        }
        base.output = self.output_spec(b, d);
        base.backoff_ms = self.duration(b, "backoff", d).unwrap_or(1000);
        base.timeout_ms = self.duration(b, "timeout", d);
        base.continue_on_fail = self.boolean(b, "continue_on_fail", d);
        base.needs_approval = self.boolean(b, "needs_approval", d);
        let cwd = self.tstr(b, "cwd", d);
        let env = self.env_vars(b, d);
        let default_retries = if has("agent") { 2 } else { 0 };
        base.retries = self
            .uint(b, "retries", d, 0, 1000)
            .map(|r| r as u32)
            .unwrap_or(default_retries);
        if let Some(v) = b.get("value") {
            for k in ["cwd", "env"] {
                if has(k) {
                    self.problem(
                        b.get(k).and_then(|y| y.line),
                        Some(d),
                        Some(k),
                        format!("`{k}` does not apply to a value task"),
                    );
                }
            }
            return Some(Body::Value(self.tjson(v, d, "value")));
        }
        if let Some(r) = b.get("run") {
            let command = match &r.v {
                YV::Str(s) if !s.trim().is_empty() => {
                    TCmd::Shell(self.tstr_of(s, r.line, d, "run"))
                }
                YV::Seq(items) if !items.is_empty() => {
                    let mut argv = Vec::new();
                    for (i, it) in items.iter().enumerate() {
                        match &it.v {
                            YV::Str(s) => {
                                argv.push(self.tstr_of(s, it.line, d, &format!("run[{i}]")))
                            }
                            YV::Num(n) => argv.push(TStr::Lit(n.to_string())),
                            _ => self.wrong_type(it, d, &format!("run[{i}]"), "a string"),
                        }
                    }
                    TCmd::Argv(argv)
                }
                _ => {
                    self.wrong_type(r, d, "run", "a non-empty command string or argv list");
                    return None;
                }
            };
            return Some(Body::Run { command, cwd, env });
        }
        let agent = self.required_string(b, "agent", d, "an agent task");
        if let Some(a) = &agent
            && !self.agents.contains_key(a)
        {
            let mut known: Vec<&str> = self.agents.keys().map(String::as_str).collect();
            known.sort();
            let hint = if known.is_empty() {
                "no agents are defined under `agents:`".to_string()
            } else {
                format!("defined agents: {}", known.join(", "))
            };
            self.problem(
                b.get("agent").and_then(|y| y.line),
                Some(d),
                Some("agent"),
                format!("unknown agent `{a}` ({hint})"),
            );
        }
        let prompt = match (has("prompt"), has("prompt_file")) {
            (true, false) => self.tstr(b, "prompt", d),
            (false, true) => {
                let file = self.string(b, "prompt_file", d)?;
                let path = self.base_dir.join(&file);
                match std::fs::read_to_string(&path) {
                    Ok(text) => Some(self.tstr_of(
                        &text,
                        b.get("prompt_file").and_then(|y| y.line),
                        d,
                        "prompt_file",
                    )),
                    Err(e) => {
                        self.problem(
                            b.get("prompt_file").and_then(|y| y.line),
                            Some(d),
                            Some("prompt_file"),
                            format!("cannot read `{}`: {e}", path.display()),
                        );
                        None
                    }
                }
            }
            (true, true) => {
                self.problem(
                    b.line,
                    Some(d),
                    Some("prompt"),
                    "use either `prompt` or `prompt_file`, not both",
                );
                None
            }
            (false, false) => {
                self.problem(
                    b.line,
                    Some(d),
                    Some("prompt"),
                    "an agent task needs `prompt` or `prompt_file`",
                );
                None
            }
        };
        Some(Body::Agent {
            agent: agent?,
            prompt: prompt?,
            cwd,
            env,
        })
    }

    fn approval(&mut self, b: &Y, d: &str) -> Option<Body> {
        let title = b
            .get("title")
            .is_some()
            .then(|| self.tstr(b, "title", d))
            .flatten();
        if b.get("title").is_none() {
            self.problem(
                b.line,
                Some(d),
                Some("title"),
                "an approval needs a `title`",
            );
        }
        let summary = self.tstr(b, "summary", d);
        let mode = self.one_of(
            b,
            "mode",
            d,
            &[
                ("approve", ApprovalMode::Approve),
                ("select", ApprovalMode::Select),
                ("rank", ApprovalMode::Rank),
            ],
            ApprovalMode::Approve,
        );
        let on_deny = self.one_of(
            b,
            "on_deny",
            d,
            &[
                ("fail", OnDeny::Fail),
                ("continue", OnDeny::Continue),
                ("skip", OnDeny::Skip),
            ],
            OnDeny::Fail,
        );
        let mut options = Vec::new();
        if let Some(o) = b.get("options") {
            match o.as_seq() {
                Some(items) => {
                    let mut seen = HashSet::new();
                    for it in items {
                        if it.as_map().is_none() {
                            self.wrong_type(
                                it,
                                d,
                                "options",
                                "an option mapping {key, label, summary}",
                            );
                            continue;
                        }
                        self.check_fields(
                            it,
                            &["key", "label", "summary"],
                            d,
                            "an approval option",
                        );
                        let Some(key) = self.required_string(it, "key", d, "an approval option")
                        else {
                            continue;
                        };
                        if !seen.insert(key.clone()) {
                            self.problem(
                                it.line,
                                Some(d),
                                Some("options"),
                                format!("duplicate option key `{key}`"),
                            );
                        }
                        let label = self.string(it, "label", d).unwrap_or_else(|| key.clone());
                        let summary = self.string(it, "summary", d);
                        options.push(ApprovalOption {
                            key,
                            label,
                            summary,
                        });
                    }
                }
                None => self.wrong_type(o, d, "options", "a list of options"),
            }
        }
        if mode != ApprovalMode::Approve && options.is_empty() {
            self.problem(
                b.line,
                Some(d),
                Some("options"),
                "select and rank approvals need `options: [{key, label}]`",
            );
        }
        let auto_approve_after = match b.get("auto_approve") {
            None => None,
            Some(a) if a.as_map().is_some() => {
                self.check_fields(a, &["after"], d, "auto_approve");
                let after = self.uint(a, "after", d, 1, 1_000_000).map(|v| v as u32);
                if a.get("after").is_none() {
                    self.problem(
                        a.line,
                        Some(d),
                        Some("auto_approve"),
                        "auto_approve needs `after: N`",
                    );
                }
                after
            }
            Some(a) => {
                self.wrong_type(a, d, "auto_approve", "a mapping {after: N}");
                None
            }
        };
        let spec = ApprovalSpec {
            title: String::new(),
            summary: None,
            mode,
            options,
            on_deny,
            allowed_users: self
                .string_list(b, "allowed_users", d)
                .into_iter()
                .map(|(s, _)| s)
                .collect(),
            allowed_scopes: self
                .string_list(b, "allowed_scopes", d)
                .into_iter()
                .map(|(s, _)| s)
                .collect(),
            auto_approve_after,
        };
        Some(Body::Approval {
            spec,
            title: title?,
            summary,
        })
    }

    // ---- whole-file checks ------------------------------------------------------------------

    fn finish(&mut self) {
        let refs = std::mem::take(&mut self.refs);
        for r in &refs {
            let mut reported = HashSet::new();
            for path in &r.paths {
                let mut parts = path.split('.');
                let top = parts.next().unwrap_or_default();
                let second = parts.next();
                let msg = if !SCOPE_NAMES.contains(&top) && !self.env.is_builtin(top) {
                    Some(format!(
                        "expression `{}` uses unknown name `{top}` (in scope: {}); ids with `-` must be written outputs['my-id']",
                        r.source,
                        SCOPE_NAMES.join(", ")
                    ))
                } else {
                    match (top, second) {
                        ("outputs", Some(id)) if !self.names.ids.contains_key(id) => Some(format!(
                            "expression `{}` reads `outputs.{id}`, but no node has id `{id}`",
                            r.source
                        )),
                        ("signals", Some(id)) if !self.names.signals.contains(id) => Some(format!(
                            "expression `{}` reads `signals.{id}`, but no wait_for_event node has id `{id}`",
                            r.source
                        )),
                        ("run", Some(f)) if f != "id" => Some(format!(
                            "expression `{}` reads `run.{f}`; only `run.id` exists",
                            r.source
                        )),
                        _ => None,
                    }
                };
                if let Some(m) = msg
                    && reported.insert(m.clone())
                {
                    self.problem(r.line, Some(&r.node), Some(&r.field), m);
                }
            }
        }
        let deps = std::mem::take(&mut self.deps);
        let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (id, line, targets) in &deps {
            for t in targets {
                if !self.names.ids.contains_key(t) {
                    self.problem(
                        *line,
                        Some(id),
                        Some("depends_on"),
                        format!("depends on `{t}`, but no task-like node has that id"),
                    );
                } else {
                    graph.entry(id.as_str()).or_default().push(t.as_str());
                }
            }
        }
        let lines: HashMap<&str, Option<usize>> =
            deps.iter().map(|(id, l, _)| (id.as_str(), *l)).collect();
        for cycle in find_cycles(&graph) {
            let first = cycle[0].to_string();
            self.problem(
                lines.get(first.as_str()).copied().flatten(),
                Some(&first),
                Some("depends_on"),
                format!("depends_on forms a cycle: {}", cycle.join(" -> ")),
            );
        }
    }
}

/// Every distinct cycle in a dependency graph, each as a path that returns to its start.
fn find_cycles<'g>(graph: &BTreeMap<&'g str, Vec<&'g str>>) -> Vec<Vec<&'g str>> {
    // 0 = unvisited, 1 = on the stack, 2 = done
    let mut state: HashMap<&str, u8> = HashMap::new();
    let mut cycles = Vec::new();
    for &start in graph.keys() {
        if state.get(start).copied().unwrap_or(0) != 0 {
            continue;
        }
        // iterative DFS: (node, next child index)
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        state.insert(start, 1);
        while let Some((node, idx)) = stack.last().copied() {
            let children = graph.get(node).map(Vec::as_slice).unwrap_or(&[]);
            if idx < children.len() {
                if let Some(top) = stack.last_mut() {
                    top.1 += 1;
                }
                let c = children[idx];
                match state.get(c).copied().unwrap_or(0) {
                    0 => {
                        state.insert(c, 1);
                        stack.push((c, 0));
                    }
                    1 => {
                        let pos = stack.iter().position(|(n, _)| *n == c).unwrap_or(0);
                        let mut cyc: Vec<&str> = stack[pos..].iter().map(|(n, _)| *n).collect();
                        cyc.push(c);
                        cycles.push(cyc);
                    }
                    _ => {}
                }
            } else {
                state.insert(node, 2);
                stack.pop();
            }
        }
    }
    cycles
}

/// The closest allowed name to a misspelt one (edit distance at most 2).
fn suggest<'s>(word: &str, options: &[&'s str]) -> Option<&'s str> {
    options
        .iter()
        .map(|o| (distance(word, o), *o))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
