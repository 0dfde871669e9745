//! Rendering loaded definitions into the tree for one context. Static subtrees come from the
//! cache filled at load; only the dynamic parts are evaluated.

use super::defs::{Body, Cond, Def, DefKind, TCmd, TJson, TStr, TaskDef};
use crate::error::Result;
use crate::expr::{ExprEnv, NameTable, Scope, expression_error};
use crate::render::RenderCtx;
use crate::tree::AgentSpec;
use crate::tree::{
    ApprovalSpec, Command, LoopNode, Node, NodeRef, RunSpec, SubflowSpec, TaskKind, WaitSpec,
    scoped_loop_id,
};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Everything a render reads besides the context.
pub struct Renderer<'a> {
    pub env: &'a ExprEnv,
    pub names: &'a Arc<NameTable>,
    pub file: &'a str,
    pub ctx: &'a RenderCtx,
    scope: Option<Scope>,
    /// Enclosing loops with their current iterations, outermost first.
    outer: Vec<(String, u32)>,
}

impl<'a> Renderer<'a> {
    pub fn new(
        env: &'a ExprEnv,
        names: &'a Arc<NameTable>,
        file: &'a str,
        ctx: &'a RenderCtx,
    ) -> Self {
        Renderer {
            env,
            names,
            file,
            ctx,
            scope: None,
            outer: Vec::new(),
        }
    }

    fn scope(&mut self) -> Scope {
        let iteration = self.outer.last().map(|(_, i)| *i).unwrap_or(0);
        let base = self
            .scope
            .get_or_insert_with(|| Scope::new(self.ctx, self.names.clone()));
        base.at_iteration(iteration)
    }

    /// Renders a list of steps, leaving out the ones skipped by `skip_if`.
    pub fn list(&mut self, defs: &[Def]) -> Result<Vec<NodeRef>> {
        let mut out = Vec::with_capacity(defs.len());
        for d in defs {
            if let Some(n) = self.def(d)? {
                out.push(n);
            }
        }
        Ok(out)
    }

    fn cond(&mut self, node: &str, c: &Cond) -> Result<bool> {
        let scope = self.scope();
        self.env
            .eval_bool(&c.c, &scope)
            .map_err(|m| expression_error(self.file, node, c.field, &c.c.source, &m))
    }

    fn tstr(&mut self, node: &str, s: &TStr) -> Result<String> {
        match s {
            TStr::Lit(s) => Ok(s.clone()),
            TStr::T(c, field) => {
                let scope = self.scope();
                self.env
                    .eval_string(c, &scope)
                    .map_err(|m| expression_error(self.file, node, field, &c.source, &m))
            }
        }
    }

    fn tjson(&mut self, node: &str, v: &TJson) -> Result<Value> {
        match v {
            TJson::Lit(v) => Ok(v.clone()),
            TJson::T(c, field) => {
                let scope = self.scope();
                self.env
                    .eval_json(c, &scope)
                    .map_err(|m| expression_error(self.file, node, field, &c.source, &m))
            }
            TJson::Arr(items) => items
                .iter()
                .map(|i| self.tjson(node, i))
                .collect::<Result<Vec<_>>>()
                .map(Value::Array),
            TJson::Obj(entries) => {
                let mut m = Map::new();
                for (k, v) in entries {
                    m.insert(k.clone(), self.tjson(node, v)?);
                }
                Ok(Value::Object(m))
            }
        }
    }

    fn opt(&mut self, node: &str, s: &Option<TStr>) -> Result<Option<String>> {
        s.as_ref().map(|s| self.tstr(node, s)).transpose()
    }

    fn env_map(&mut self, node: &str, env: &[(String, TStr)]) -> Result<BTreeMap<String, String>> {
        let mut m = BTreeMap::new();
        for (k, v) in env {
            m.insert(k.clone(), self.tstr(node, v)?);
        }
        Ok(m)
    }

    /// Renders one step; `None` when `skip_if` removes it. An expression that cannot be
    /// evaluated yet (it reads an output that does not exist) does not fail the render: the
    /// step is replaced by a task carrying the error, which fails only if the run reaches it.
    pub fn def(&mut self, d: &Def) -> Result<Option<NodeRef>> {
        match self.def_inner(d) {
            Err(e) if e.code == crate::Code::ExpressionError => {
                let mut t = crate::tree::Task::new(d.name.clone(), TaskKind::Value(Value::Null));
                t.error = Some(e);
                Ok(Some(Arc::new(Node::Task(Box::new(t)))))
            }
            other => other,
        }
    }

    fn def_inner(&mut self, d: &Def) -> Result<Option<NodeRef>> {
        if let Some(n) = &d.cached {
            return Ok(Some(n.clone()));
        }
        let node = match &d.kind {
            DefKind::Sequence { skip_if, steps } => {
                if let Some(c) = skip_if
                    && self.cond(&d.name, c)?
                {
                    return Ok(None);
                }
                Node::Sequence {
                    children: self.list(steps)?,
                }
            }
            DefKind::Parallel {
                id,
                max_concurrency,
                skip_if,
                steps,
            } => {
                if let Some(c) = skip_if
                    && self.cond(&d.name, c)?
                {
                    return Ok(None);
                }
                Node::Parallel {
                    id: id.clone(),
                    max_concurrency: *max_concurrency,
                    children: self.list(steps)?,
                }
            }
            DefKind::Branch {
                cond,
                then,
                otherwise,
            } => {
                let taken = self.cond(&d.name, cond)?;
                let children = self.list(if taken { then } else { otherwise })?;
                Node::Branch { taken, children }
            }
            DefKind::Loop {
                id,
                until,
                max_iterations,
                on_max_reached,
                steps,
            } => {
                let scoped = scoped_loop_id(id, &self.outer);
                let iteration = self.ctx.iteration_of(&scoped);
                let (until, until_error) = match until {
                    Some(c) => {
                        // `until` sees the loop's own iteration, like its body.
                        self.outer.push((id.clone(), iteration));
                        let r = self.cond(&d.name, c);
                        self.outer.pop();
                        match r {
                            Ok(b) => (b, None),
                            // it may read what the body has not produced yet; the engine
                            // raises it only if it still fails after an iteration
                            Err(e) if e.code == crate::Code::ExpressionError => {
                                (false, Some(Box::new(e)))
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    None => (false, None),
                };
                self.outer.push((id.clone(), iteration));
                let children = self.list(steps);
                self.outer.pop();
                Node::Loop(LoopNode {
                    id: scoped,
                    until,
                    until_error,
                    max_iterations: *max_iterations,
                    on_max_reached: *on_max_reached,
                    children: children?,
                })
            }
            DefKind::Task(t) => Node::Task(Box::new(self.task_deferred(t)?)),
        };
        Ok(Some(Arc::new(node)))
    }

    /// Renders a task; an expression error in its own fields is kept on the task.
    fn task_deferred(&mut self, t: &TaskDef) -> Result<crate::tree::Task> {
        match self.task(t) {
            Err(e) if e.code == crate::Code::ExpressionError => {
                let mut task = t.base.clone();
                if t.scoped {
                    task.id = self.names.resolve(&t.base.id, self.ctx);
                }
                task.kind = TaskKind::Value(Value::Null);
                task.error = Some(e);
                Ok(task)
            }
            other => other,
        }
    }

    fn task(&mut self, t: &TaskDef) -> Result<crate::tree::Task> {
        let name = t.base.id.as_str();
        let mut task = t.base.clone();
        if let Some(c) = &t.skip_if {
            task.skip = self.cond(name, c)?;
        }
        if t.scoped {
            task.id = self.names.resolve(&t.base.id, self.ctx);
            task.depends_on = t
                .base
                .depends_on
                .iter()
                .map(|d| self.names.resolve(d, self.ctx))
                .collect();
        }
        task.kind = match &t.body {
            Body::Value(v) => TaskKind::Value(self.tjson(name, v)?),
            Body::Run { command, cwd, env } => {
                let command = match command {
                    TCmd::Shell(s) => Command::Shell(self.tstr(name, s)?),
                    TCmd::Argv(a) => Command::Argv(
                        a.iter()
                            .map(|s| self.tstr(name, s))
                            .collect::<Result<_>>()?,
                    ),
                };
                TaskKind::Run(RunSpec {
                    command,
                    cwd: self.opt(name, cwd)?,
                    env: self.env_map(name, env)?,
                })
            }
            Body::Agent {
                agent,
                prompt,
                cwd,
                env,
            } => TaskKind::Agent(AgentSpec {
                agent: agent.clone(),
                prompt: self.tstr(name, prompt)?,
                cwd: self.opt(name, cwd)?,
                env: self.env_map(name, env)?,
            }),
            Body::Approval {
                spec,
                title,
                summary,
            } => TaskKind::Approval(ApprovalSpec {
                title: self.tstr(name, title)?,
                summary: self.opt(name, summary)?,
                ..spec.clone()
            }),
            Body::Wait { spec, correlation } => TaskKind::WaitForEvent(WaitSpec {
                correlation_id: self.opt(name, correlation)?,
                ..spec.clone()
            }),
            Body::Timer(spec) => TaskKind::Timer(spec.clone()),
            Body::Subflow { workflow, input } => TaskKind::Subflow(SubflowSpec {
                workflow: workflow.clone(),
                input: self.tjson(name, input)?,
            }),
        };
        Ok(task)
    }
}

/// Fills `cached` for every static subtree (rendered once against an empty context).
pub fn fill_cache(
    defs: &mut [Def],
    env: &ExprEnv,
    names: &Arc<NameTable>,
    file: &str,
) -> Result<()> {
    let ctx = RenderCtx::new("", Value::Null);
    for d in defs.iter_mut() {
        if d.is_static() {
            let mut r = Renderer::new(env, names, file, &ctx);
            d.cached = r.def(d)?;
            continue;
        }
        match &mut d.kind {
            DefKind::Sequence { steps, .. }
            | DefKind::Parallel { steps, .. }
            | DefKind::Loop { steps, .. } => fill_cache(steps, env, names, file)?,
            DefKind::Branch {
                then, otherwise, ..
            } => {
                fill_cache(then, env, names, file)?;
                fill_cache(otherwise, env, names, file)?;
            }
            DefKind::Task(_) => {}
        }
    }
    Ok(())
}
