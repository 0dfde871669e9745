//! The rendered workflow tree: what a render function returns for one context. YAML workflows
//! and Rust workflows both produce this type; the engine only ever sees it.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Shared node handle: unchanged subtrees are reused between renders, so re-rendering a large
/// static workflow costs a pointer copy, not a rebuild.
pub type NodeRef = Arc<Node>;

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// Children run one after another; a sequence stops at its first unfinished child.
    Sequence {
        children: Vec<NodeRef>,
    },
    /// Children run at once, at most `max_concurrency` of them (None = unlimited).
    Parallel {
        id: Option<String>,
        max_concurrency: Option<usize>,
        children: Vec<NodeRef>,
    },
    /// The side a branch chose at this render; its children run as a sequence.
    Branch {
        taken: bool,
        children: Vec<NodeRef>,
    },
    Loop(LoopNode),
    Task(Box<Task>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoopNode {
    /// Scoped loop id (see [`scoped_loop_id`]).
    pub id: String,
    /// `until` evaluated at this render. It counts only once the current iteration's body is
    /// complete: a loop always runs its first iteration.
    pub until: bool,
    /// `until` could not be evaluated at this render (e.g. it reads an output the first
    /// iteration has not produced yet); an error only if it still fails once an iteration's
    /// body is complete.
    pub until_error: Option<Box<crate::SmithersError>>,
    pub max_iterations: u32,
    pub on_max_reached: OnMaxReached,
    pub children: Vec<NodeRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMaxReached {
    ReturnLast,
    Fail,
}

/// A task-like node: anything with an id that the engine tracks as a (node, iteration) row.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    pub kind: TaskKind,
    pub output: Option<OutputSpec>,
    /// Extra attempts after the first failure.
    pub retries: u32,
    /// Delay before the first retry; doubles for each further retry.
    pub backoff_ms: u64,
    pub timeout_ms: Option<u64>,
    /// `skip_if` evaluated at this render.
    pub skip: bool,
    pub depends_on: Vec<String>,
    pub continue_on_fail: bool,
    /// Gate the task behind an approval (mode approve) before it runs.
    pub needs_approval: bool,
    pub label: Option<String>,
    /// A render error in this task's own fields (a template that could not be evaluated yet).
    /// It fails the task only when the task is reached, so a template may refer to outputs
    /// of steps that run before it.
    pub error: Option<crate::SmithersError>,
}

impl Task {
    /// A task with defaults for everything but id and kind.
    pub fn new(id: impl Into<String>, kind: TaskKind) -> Self {
        Task {
            id: id.into(),
            kind,
            output: None,
            retries: 0,
            backoff_ms: 1000,
            timeout_ms: None,
            skip: false,
            depends_on: Vec::new(),
            continue_on_fail: false,
            needs_approval: false,
            label: None,
            error: None,
        }
    }

    /// The schema key stored in `output_table` columns ("" when the task has no named schema).
    pub fn output_table(&self) -> &str {
        self.output
            .as_ref()
            .and_then(|o| o.name.as_deref())
            .unwrap_or("")
    }
}

/// A JSON Schema the task's output must satisfy.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    /// The name under `outputs:` when the schema was referenced by name.
    pub name: Option<String>,
    pub schema: Arc<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskKind {
    /// Static output (already templated).
    Value(Value),
    /// Shell command.
    Run(RunSpec),
    /// AI agent call (executed by agent runners in a later layer).
    Agent(AgentSpec),
    Approval(ApprovalSpec),
    WaitForEvent(WaitSpec),
    Timer(TimerSpec),
    Subflow(SubflowSpec),
}

impl TaskKind {
    /// The frame tag of the node, e.g. `smithers:task`.
    pub fn tag(&self) -> &'static str {
        match self {
            TaskKind::Value(_) | TaskKind::Run(_) | TaskKind::Agent(_) => "smithers:task",
            TaskKind::Approval(_) => "smithers:approval",
            TaskKind::WaitForEvent(_) => "smithers:wait-for-event",
            TaskKind::Timer(_) => "smithers:timer",
            TaskKind::Subflow(_) => "smithers:subflow",
        }
    }

    /// Short kind name used in attempt metadata and CLI output.
    pub fn name(&self) -> &'static str {
        match self {
            TaskKind::Value(_) => "value",
            TaskKind::Run(_) => "run",
            TaskKind::Agent(_) => "agent",
            TaskKind::Approval(_) => "approval",
            TaskKind::WaitForEvent(_) => "wait-for-event",
            TaskKind::Timer(_) => "timer",
            TaskKind::Subflow(_) => "subflow",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run through `sh -c`.
    Shell(String),
    /// Executed directly, no shell.
    Argv(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    pub command: Command,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentSpec {
    pub agent: String,
    pub prompt: String,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalMode {
    Approve,
    Select,
    Rank,
}

impl ApprovalMode {
    /// Wire name (`approvalMode` in the protocol): approve is reported as `decision`.
    pub fn wire(self) -> &'static str {
        match self {
            ApprovalMode::Approve => "decision",
            ApprovalMode::Select => "select",
            ApprovalMode::Rank => "rank",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDeny {
    Fail,
    Continue,
    Skip,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalOption {
    pub key: String,
    pub label: String,
    pub summary: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalSpec {
    pub title: String,
    pub summary: Option<String>,
    pub mode: ApprovalMode,
    pub options: Vec<ApprovalOption>,
    pub on_deny: OnDeny,
    pub allowed_users: Vec<String>,
    pub allowed_scopes: Vec<String>,
    /// Auto-approve once this many consecutive earlier runs approved this node.
    pub auto_approve_after: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    Fail,
    Skip,
    Continue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WaitSpec {
    pub event: String,
    pub correlation_id: Option<String>,
    pub timeout_ms: Option<u64>,
    pub on_timeout: OnTimeout,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TimerSpec {
    /// Relative to when the timer node is first reached.
    DurationMs(u64),
    /// Absolute wall-clock time, epoch milliseconds.
    UntilMs(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubflowSpec {
    /// A registered workflow key or a path relative to the parent workflow file.
    pub workflow: String,
    pub input: Value,
}

/// Scoped id of a loop nested in other loops: `id@@outer=i,...` (outermost first).
pub fn scoped_loop_id(id: &str, outer: &[(String, u32)]) -> String {
    if outer.is_empty() {
        return id.to_string();
    }
    let parts: Vec<String> = outer.iter().map(|(o, i)| format!("{o}={i}")).collect();
    format!("{id}@@{}", parts.join(","))
}

impl Node {
    /// Canonical frame JSON (`{"kind":"element","tag":…,"props":{…},"children":[…]}`), with
    /// props stringified and sorted, as the frame format prescribes.
    pub fn to_frame_json(&self) -> Value {
        fn el(tag: &str, props: Map<String, Value>, children: &[NodeRef]) -> Value {
            json!({
                "kind": "element",
                "tag": tag,
                "props": props,
                "children": children.iter().map(|c| c.to_frame_json()).collect::<Vec<_>>(),
            })
        }
        fn s(v: impl ToString) -> Value {
            Value::String(v.to_string())
        }
        match self {
            Node::Sequence { children } => el("smithers:sequence", Map::new(), children),
            Node::Parallel {
                id,
                max_concurrency,
                children,
            } => {
                let mut p = Map::new();
                if let Some(id) = id {
                    p.insert("id".into(), s(id));
                }
                if let Some(m) = max_concurrency {
                    p.insert("maxConcurrency".into(), s(m));
                }
                el("smithers:parallel", p, children)
            }
            Node::Branch { taken, children } => {
                let mut p = Map::new();
                p.insert("if".into(), s(taken));
                el("smithers:branch", p, children)
            }
            Node::Loop(l) => {
                let mut p = Map::new();
                p.insert("id".into(), s(&l.id));
                p.insert("maxIterations".into(), s(l.max_iterations));
                p.insert(
                    "onMaxReached".into(),
                    s(match l.on_max_reached {
                        OnMaxReached::Fail => "fail",
                        OnMaxReached::ReturnLast => "return-last",
                    }),
                );
                p.insert("until".into(), s(l.until));
                el("smithers:ralph", p, &l.children)
            }
            Node::Task(t) => {
                let mut p = Map::new();
                p.insert("id".into(), s(&t.id));
                p.insert("kind".into(), s(t.kind.name()));
                if let Some(l) = &t.label {
                    p.insert("label".into(), s(l));
                }
                if t.output_table() != "" {
                    p.insert("output".into(), s(t.output_table()));
                }
                if t.skip {
                    p.insert("skipIf".into(), s(true));
                }
                if t.continue_on_fail {
                    p.insert("continueOnFail".into(), s(true));
                }
                if t.needs_approval {
                    p.insert("needsApproval".into(), s(true));
                }
                if t.retries > 0 {
                    p.insert("retries".into(), s(t.retries));
                }
                if let Some(ms) = t.timeout_ms {
                    p.insert("timeoutMs".into(), s(ms));
                }
                if let Some(e) = &t.error {
                    p.insert("error".into(), s(&e.message));
                }
                let mut children = Vec::new();
                match &t.kind {
                    TaskKind::Run(r) => {
                        let cmd = match &r.command {
                            Command::Shell(c) => c.clone(),
                            Command::Argv(a) => a.join(" "),
                        };
                        children.push(json!({"kind": "text", "text": cmd}));
                    }
                    TaskKind::Agent(a) => {
                        p.insert("agent".into(), s(&a.agent));
                        children.push(json!({"kind": "text", "text": a.prompt}));
                    }
                    TaskKind::Approval(a) => {
                        p.insert("title".into(), s(&a.title));
                        p.insert("mode".into(), s(a.mode.wire()));
                    }
                    TaskKind::WaitForEvent(w) => {
                        p.insert("event".into(), s(&w.event));
                        if let Some(c) = &w.correlation_id {
                            p.insert("correlationId".into(), s(c));
                        }
                    }
                    TaskKind::Timer(TimerSpec::DurationMs(ms)) => {
                        p.insert("durationMs".into(), s(ms));
                    }
                    TaskKind::Timer(TimerSpec::UntilMs(ms)) => {
                        p.insert("untilMs".into(), s(ms));
                    }
                    TaskKind::Subflow(sf) => {
                        p.insert("workflow".into(), s(&sf.workflow));
                    }
                    TaskKind::Value(_) => {}
                }
                json!({"kind": "element", "tag": t.kind.tag(), "props": p, "children": children})
            }
        }
    }
}
