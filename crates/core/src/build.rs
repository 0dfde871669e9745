//! Building workflows in Rust: a render function from context to tree, plus small
//! constructors for the common node kinds. The YAML loader produces the same tree type.

use crate::agent::AgentDef;
use crate::error::Result;
use crate::render::{RenderCtx, Workflow};
use crate::tree::{
    AgentSpec, Command, LoopNode, Node, NodeRef, OnMaxReached, OutputSpec, RunSpec, Task, TaskKind,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

type RenderFn = dyn Fn(&RenderCtx) -> Result<NodeRef> + Send + Sync;

/// A workflow defined by a Rust closure.
pub struct FnWorkflow {
    name: String,
    render: Box<RenderFn>,
    input_schema: Option<Value>,
    subflows: BTreeMap<String, Arc<dyn Workflow>>,
    agents: BTreeMap<String, AgentDef>,
}

impl FnWorkflow {
    pub fn new(
        name: impl Into<String>,
        render: impl Fn(&RenderCtx) -> Result<NodeRef> + Send + Sync + 'static,
    ) -> Self {
        FnWorkflow {
            name: name.into(),
            render: Box::new(render),
            input_schema: None,
            subflows: BTreeMap::new(),
            agents: BTreeMap::new(),
        }
    }

    /// Requires run input to match this JSON Schema.
    pub fn with_input_schema(mut self, schema: Value) -> Self {
        self.input_schema = Some(schema);
        self
    }

    /// Registers a workflow that `subflow` nodes can name.
    pub fn with_subflow(mut self, key: &str, wf: Arc<dyn Workflow>) -> Self {
        self.subflows.insert(key.to_string(), wf);
        self
    }

    /// Declares an agent that agent tasks ([`agent_task`]) can name.
    pub fn with_agent(mut self, def: AgentDef) -> Self {
        self.agents.insert(def.name.clone(), def);
        self
    }
}

impl Workflow for FnWorkflow {
    fn name(&self) -> &str {
        &self.name
    }
    fn render(&self, ctx: &RenderCtx) -> Result<NodeRef> {
        (self.render)(ctx)
    }
    fn input_schema(&self) -> Option<&Value> {
        self.input_schema.as_ref()
    }
    fn agent(&self, name: &str) -> Option<AgentDef> {
        self.agents.get(name).cloned()
    }
    fn subflow(&self, reference: &str) -> Result<Arc<dyn Workflow>> {
        self.subflows.get(reference).cloned().ok_or_else(|| {
            crate::err!(
                WorkflowNotFound,
                "workflow `{}` has no subflow `{reference}`; register it with with_subflow",
                self.name
            )
        })
    }
}

/// Children run one after another.
pub fn seq(children: Vec<NodeRef>) -> NodeRef {
    Arc::new(Node::Sequence { children })
}

/// Children run at once, at most `max` at a time.
pub fn par(max: Option<usize>, children: Vec<NodeRef>) -> NodeRef {
    Arc::new(Node::Parallel {
        id: None,
        max_concurrency: max,
        children,
    })
}

/// A loop whose body repeats until `until` holds or `max_iterations` is reached.
pub fn repeat(id: &str, until: bool, max_iterations: u32, children: Vec<NodeRef>) -> NodeRef {
    Arc::new(Node::Loop(LoopNode {
        id: id.to_string(),
        until,
        until_error: None,
        max_iterations,
        on_max_reached: OnMaxReached::ReturnLast,
        children,
    }))
}

/// Wraps a task.
pub fn task(t: Task) -> NodeRef {
    Arc::new(Node::Task(Box::new(t)))
}

/// A task whose output is a fixed value.
pub fn value(id: &str, v: Value) -> Task {
    Task::new(id, TaskKind::Value(v))
}

/// A shell task (`sh -c`).
pub fn shell(id: &str, command: &str) -> Task {
    Task::new(
        id,
        TaskKind::Run(RunSpec {
            command: Command::Shell(command.to_string()),
            cwd: None,
            env: BTreeMap::new(),
        }),
    )
}

/// A task that calls the agent `agent` (declared with [`FnWorkflow::with_agent`]) with a
/// prompt. Agent tasks retry twice by default, like YAML ones: agents fail transiently.
pub fn agent_task(id: &str, agent: &str, prompt: &str) -> Task {
    let mut t = Task::new(
        id,
        TaskKind::Agent(AgentSpec {
            agent: agent.to_string(),
            prompt: prompt.to_string(),
            cwd: None,
            env: BTreeMap::new(),
        }),
    );
    t.retries = 2;
    t
}

impl Task {
    /// Sets an inline output schema.
    pub fn output_schema(mut self, schema: Value) -> Self {
        self.output = Some(OutputSpec {
            name: None,
            schema: Arc::new(schema),
        });
        self
    }
    pub fn retries(mut self, n: u32, backoff_ms: u64) -> Self {
        self.retries = n;
        self.backoff_ms = backoff_ms;
        self
    }
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = Some(ms);
        self
    }
    pub fn depends_on(mut self, ids: &[&str]) -> Self {
        self.depends_on = ids.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn skip(mut self, skip: bool) -> Self {
        self.skip = skip;
        self
    }
    pub fn continue_on_fail(mut self) -> Self {
        self.continue_on_fail = true;
        self
    }
    pub fn node(self) -> NodeRef {
        task(self)
    }
}
