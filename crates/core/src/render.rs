//! The seam between workflow definitions and the engine: a workflow is a render function from
//! the run's context to a tree.

use crate::error::{Result, SmithersError};
use crate::tree::NodeRef;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Read access to the outputs a run has produced so far.
pub trait OutputsView: Send + Sync + std::fmt::Debug {
    /// Output of the highest iteration of `node_id`, if any.
    fn latest(&self, node_id: &str) -> Option<Value>;
    /// Output of one (node, iteration).
    fn get(&self, node_id: &str, iteration: u32) -> Option<Value>;
}

/// An empty outputs view (first render of a new run, tests).
#[derive(Debug, Default)]
pub struct NoOutputs;

impl OutputsView for NoOutputs {
    fn latest(&self, _: &str) -> Option<Value> {
        None
    }
    fn get(&self, _: &str, _: u32) -> Option<Value> {
        None
    }
}

/// Everything a render may read. Cheap to build: all large parts are shared.
#[derive(Debug, Clone)]
pub struct RenderCtx {
    pub run_id: Arc<str>,
    pub input: Arc<Value>,
    pub outputs: Arc<dyn OutputsView>,
    /// Current iteration of each loop, by scoped loop id (absent = 0).
    pub loops: Arc<HashMap<String, u32>>,
}

impl RenderCtx {
    pub fn new(run_id: &str, input: Value) -> Self {
        RenderCtx {
            run_id: Arc::from(run_id),
            input: Arc::new(input),
            outputs: Arc::new(NoOutputs),
            loops: Arc::new(HashMap::new()),
        }
    }

    /// Current iteration of a loop (0 before its first advance).
    pub fn iteration_of(&self, scoped_loop_id: &str) -> u32 {
        self.loops.get(scoped_loop_id).copied().unwrap_or(0)
    }
}

/// A workflow definition. YAML files and Rust code both implement it.
pub trait Workflow: Send + Sync {
    /// Becomes the run's `workflow_name`.
    fn name(&self) -> &str;

    /// Builds the tree for this context. Errors fail the run (an expression error names the
    /// node and the expression).
    fn render(&self, ctx: &RenderCtx) -> Result<NodeRef>;

    /// The workflow's `description`, shown to people choosing what to run.
    fn description(&self) -> Option<&str> {
        None
    }

    /// JSON Schema the run input must satisfy, checked when a run is created.
    fn input_schema(&self) -> Option<&Value> {
        None
    }

    /// Every event name the workflow's waits listen for, when it is known without rendering,
    /// so that a signal no wait could ever take is refused instead of kept forever. `None`
    /// (the default, for workflows that decide at render time) accepts any name.
    fn event_names(&self) -> Option<Vec<String>> {
        None
    }

    /// The JSON Schema a task's output must satisfy, when it is known without rendering (so a
    /// node that has not run yet can describe its output). `node_id` may carry the loop scope
    /// the engine adds (`work@@outer=1`). `None` (the default): unknown, or no schema.
    fn output_schema(&self, node_id: &str) -> Option<Arc<Value>> {
        let _ = node_id;
        None
    }

    /// The file the workflow was loaded from, if any (stored as `workflow_path`).
    fn path(&self) -> Option<&Path> {
        None
    }

    /// Hash of the definition's source; a resumed run refuses a changed definition.
    fn source_hash(&self) -> Option<&str> {
        None
    }

    /// The agent named `name` under the workflow's agents, for agent tasks. Workflows that
    /// declare no agents keep the default (every agent task then fails with a clear error).
    fn agent(&self, name: &str) -> Option<crate::agent::AgentDef> {
        let _ = name;
        None
    }

    /// Resolves a `subflow` reference (a key or a path relative to this workflow).
    fn subflow(&self, reference: &str) -> Result<Arc<dyn Workflow>> {
        Err(crate::err!(
            WorkflowNotFound,
            "workflow `{}` cannot resolve subflow `{reference}`",
            self.name()
        ))
    }
}

/// Refuses a signal that no wait of `workflow` listens for (it would be kept and never taken),
/// naming the events its waits do listen for. Workflows whose waits are only known at render
/// time accept every name.
pub fn check_signal_name(workflow: &dyn Workflow, run_id: &str, name: &str) -> Result<()> {
    let Some(names) = workflow.event_names() else {
        return Ok(());
    };
    if names.iter().any(|n| n == name) {
        return Ok(());
    }
    let known = if names.is_empty() {
        "it has no wait_for_event step, so it takes no signals".to_string()
    } else {
        format!(
            "its waits listen for: {}",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(SmithersError::new(
        crate::error::Code::UnknownSignal,
        format!(
            "no step of run `{run_id}` (workflow `{}`) waits for a signal named `{name}`; {known}",
            workflow.name()
        ),
    ))
}
