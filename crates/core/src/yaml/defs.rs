//! The loaded form of a workflow file: what parsing produces and rendering consumes. Every
//! string that may contain a template is already compiled; everything else is final.

use crate::expr::Compiled;
use crate::tree::{ApprovalSpec, NodeRef, OnMaxReached, Task, TimerSpec, WaitSpec};
use serde_json::Value;
use std::sync::Arc;

/// A string that is either literal or a compiled template.
#[derive(Debug, Clone)]
pub enum TStr {
    Lit(String),
    T(Compiled, Arc<str>),
}

impl TStr {
    pub fn is_static(&self) -> bool {
        matches!(self, TStr::Lit(_))
    }
}

/// A JSON value whose strings may be templates.
#[derive(Debug, Clone)]
pub enum TJson {
    Lit(Value),
    T(Compiled, Arc<str>),
    Arr(Vec<TJson>),
    Obj(Vec<(String, TJson)>),
}

impl TJson {
    pub fn is_static(&self) -> bool {
        matches!(self, TJson::Lit(_))
    }
}

#[derive(Debug, Clone)]
pub enum TCmd {
    Shell(TStr),
    Argv(Vec<TStr>),
}

/// What a task-like node does, with its templated parts.
#[derive(Debug, Clone)]
pub enum Body {
    Value(TJson),
    Run {
        command: TCmd,
        cwd: Option<TStr>,
        env: Vec<(String, TStr)>,
    },
    Agent {
        agent: String,
        prompt: TStr,
        cwd: Option<TStr>,
        env: Vec<(String, TStr)>,
    },
    Approval {
        spec: ApprovalSpec,
        title: TStr,
        summary: Option<TStr>,
    },
    Wait {
        spec: WaitSpec,
        correlation: Option<TStr>,
    },
    Timer(TimerSpec),
    Subflow {
        workflow: String,
        input: TJson,
    },
}

impl Body {
    pub fn is_static(&self) -> bool {
        let opt = |s: &Option<TStr>| s.as_ref().is_none_or(TStr::is_static);
        let env = |e: &[(String, TStr)]| e.iter().all(|(_, v)| v.is_static());
        match self {
            Body::Value(v) => v.is_static(),
            Body::Run {
                command,
                cwd,
                env: e,
            } => {
                let cmd = match command {
                    TCmd::Shell(s) => s.is_static(),
                    TCmd::Argv(a) => a.iter().all(TStr::is_static),
                };
                cmd && opt(cwd) && env(e)
            }
            Body::Agent {
                prompt,
                cwd,
                env: e,
                ..
            } => prompt.is_static() && opt(cwd) && env(e),
            Body::Approval { title, summary, .. } => title.is_static() && opt(summary),
            Body::Wait { correlation, .. } => opt(correlation),
            Body::Timer(_) => true,
            Body::Subflow { input, .. } => input.is_static(),
        }
    }
}

/// A bare expression and the field it was written in.
#[derive(Debug, Clone)]
pub struct Cond {
    pub c: Compiled,
    pub field: &'static str,
}

#[derive(Debug, Clone)]
pub struct TaskDef {
    /// Every field but `kind`, `skip` and (for nested loops) `id`/`depends_on` is final here.
    pub base: Task,
    pub body: Body,
    pub skip_if: Option<Cond>,
    /// Inside two or more loops, or depending on such a node: ids get scoped at render.
    pub scoped: bool,
}

#[derive(Debug, Clone)]
pub enum DefKind {
    Sequence {
        skip_if: Option<Cond>,
        steps: Vec<Def>,
    },
    Parallel {
        id: Option<String>,
        max_concurrency: Option<usize>,
        skip_if: Option<Cond>,
        steps: Vec<Def>,
    },
    Branch {
        cond: Cond,
        then: Vec<Def>,
        otherwise: Vec<Def>,
    },
    Loop {
        id: String,
        until: Option<Cond>,
        max_iterations: u32,
        on_max_reached: OnMaxReached,
        steps: Vec<Def>,
    },
    Task(Box<TaskDef>),
}

/// One step of the file.
#[derive(Debug, Clone)]
pub struct Def {
    pub kind: DefKind,
    /// The node's id, or its position (`steps[2].branch`) when it has none; used in errors.
    pub name: String,
    /// Rendered once at load when nothing in the subtree depends on the context.
    pub cached: Option<NodeRef>,
}

impl Def {
    /// True when the subtree renders the same for every context.
    pub fn is_static(&self) -> bool {
        match &self.kind {
            DefKind::Sequence { skip_if, steps } | DefKind::Parallel { skip_if, steps, .. } => {
                skip_if.is_none() && steps.iter().all(Def::is_static)
            }
            DefKind::Branch { .. } | DefKind::Loop { .. } => false,
            DefKind::Task(t) => t.skip_if.is_none() && !t.scoped && t.body.is_static(),
        }
    }
}
