//! YAML (and JSON) workflow files: loading, validation and rendering.
//!
//! Loading parses the file once, reports every problem it finds (not just the first), compiles
//! every expression and template, and renders the subtrees that do not depend on the run's
//! context once, so re-rendering after each step is cheap.

mod defs;
mod parse;
mod render;
mod time;
mod value;

use crate::error::{Code, Problem, Result, SmithersError};
use crate::expr::{ExprEnv, NameTable};
use crate::render::{RenderCtx, Workflow};
use crate::tree::{Node, NodeRef};
use defs::{Body, Def, DefKind};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use parse::{MAX_NAME_LEN, MAX_NODE_ID_LEN};
pub use time::parse_rfc3339_ms;

/// Agent definitions moved to [`crate::agent`] (Rust workflows declare them too); re-exported
/// here so existing `yaml::AgentDef` paths keep working.
pub use crate::agent::{AgentDef, AgentKind, PromptMode};

/// A workflow loaded from a YAML or JSON file.
#[derive(Debug)]
pub struct YamlWorkflow {
    name: String,
    description: Option<String>,
    file_label: String,
    path: Option<PathBuf>,
    base_dir: PathBuf,
    source_hash: String,
    input_schema: Option<Value>,
    schemas: BTreeMap<String, Arc<Value>>,
    agents: BTreeMap<String, AgentDef>,
    env: ExprEnv,
    names: Arc<NameTable>,
    steps: Vec<Def>,
    /// The whole tree, when nothing in it depends on the context.
    root: Option<NodeRef>,
}

impl YamlWorkflow {
    /// Agents declared under `agents:`, by name.
    pub fn agents(&self) -> &BTreeMap<String, AgentDef> {
        &self.agents
    }

    /// Named output schemas declared under `outputs:`.
    pub fn output_schemas(&self) -> &BTreeMap<String, Arc<Value>> {
        &self.schemas
    }

    /// The directory relative paths (subflows, prompt files) are resolved against.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Ids of every task-like node in the file.
    pub fn node_ids(&self) -> impl Iterator<Item = &str> {
        self.names.ids.keys().map(String::as_str)
    }
}

impl Workflow for YamlWorkflow {
    fn name(&self) -> &str {
        &self.name
    }

    fn event_names(&self) -> Option<Vec<String>> {
        fn walk(defs: &[Def], out: &mut Vec<String>) {
            for d in defs {
                match &d.kind {
                    DefKind::Sequence { steps, .. }
                    | DefKind::Parallel { steps, .. }
                    | DefKind::Loop { steps, .. } => walk(steps, out),
                    DefKind::Branch {
                        then, otherwise, ..
                    } => {
                        walk(then, out);
                        walk(otherwise, out);
                    }
                    DefKind::Task(t) => {
                        if let Body::Wait { spec, .. } = &t.body
                            && !out.contains(&spec.event)
                        {
                            out.push(spec.event.clone());
                        }
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.steps, &mut out);
        out.sort();
        Some(out)
    }

    fn output_schema(&self, node_id: &str) -> Option<Arc<Value>> {
        fn find(defs: &[Def], id: &str) -> Option<Arc<Value>> {
            defs.iter().find_map(|d| match &d.kind {
                DefKind::Sequence { steps, .. }
                | DefKind::Parallel { steps, .. }
                | DefKind::Loop { steps, .. } => find(steps, id),
                DefKind::Branch {
                    then, otherwise, ..
                } => find(then, id).or_else(|| find(otherwise, id)),
                DefKind::Task(t) if t.base.id == id => {
                    t.base.output.as_ref().map(|o| o.schema.clone())
                }
                DefKind::Task(_) => None,
            })
        }
        let plain = node_id.split_once("@@").map_or(node_id, |(id, _)| id);
        find(&self.steps, plain)
    }

    fn render(&self, ctx: &RenderCtx) -> Result<NodeRef> {
        if let Some(root) = &self.root {
            return Ok(root.clone());
        }
        let mut r = render::Renderer::new(&self.env, &self.names, &self.file_label, ctx);
        Ok(Arc::new(Node::Sequence {
            children: r.list(&self.steps)?,
        }))
    }

    fn input_schema(&self) -> Option<&Value> {
        self.input_schema.as_ref()
    }

    fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn source_hash(&self) -> Option<&str> {
        Some(&self.source_hash)
    }

    fn agent(&self, name: &str) -> Option<AgentDef> {
        self.agents.get(name).cloned()
    }

    fn subflow(&self, reference: &str) -> Result<Arc<dyn Workflow>> {
        let Some(path) = resolve_subflow_path(&self.base_dir, reference) else {
            return Err(SmithersError::new(
                Code::WorkflowNotFound,
                format!(
                    "workflow `{}` cannot find subflow `{reference}` in {} (tried it as given and with .yaml/.yml/.json)",
                    self.name,
                    self.base_dir.display()
                ),
            )
            .terminal());
        };
        match load_file(&path) {
            Ok(wf) => Ok(wf),
            Err(problems) => Err(invalid(&problems)),
        }
    }
}

/// One INVALID_WORKFLOW error listing every problem (one per line).
pub fn invalid(problems: &[Problem]) -> SmithersError {
    let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    SmithersError::new(Code::InvalidWorkflow, lines.join("\n")).terminal()
}

/// Finds a subflow file: the reference as given, then with `.yaml`, `.yml`, `.json`.
pub(crate) fn resolve_subflow_path(base_dir: &Path, reference: &str) -> Option<PathBuf> {
    if reference.is_empty() {
        return None;
    }
    let given = base_dir.join(reference);
    let mut candidates = vec![given.clone()];
    for ext in ["yaml", "yml", "json"] {
        candidates.push(PathBuf::from(format!("{}.{ext}", given.display())));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Loads and validates a workflow file (YAML, or JSON for `.json` files).
pub fn load_file(path: impl AsRef<Path>) -> std::result::Result<Arc<YamlWorkflow>, Vec<Problem>> {
    let path = path.as_ref();
    let label = path.display().to_string();
    let problem = |message: String| {
        vec![Problem {
            file: label.clone(),
            line: None,
            node: None,
            field: None,
            message,
        }]
    };
    let bytes =
        std::fs::read(path).map_err(|e| problem(format!("cannot read the workflow file: {e}")))?;
    if bytes.len() > value::MAX_FILE_BYTES {
        return Err(problem(format!(
            "file is {} bytes; workflow files may be at most {} bytes",
            bytes.len(),
            value::MAX_FILE_BYTES
        )));
    }
    let source =
        String::from_utf8(bytes).map_err(|_| problem("the file is not valid UTF-8 text".into()))?;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let base = abs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut wf = load_str(&source, &label, &base)?;
    wf.path = Some(abs);
    Ok(Arc::new(wf))
}

/// Loads a workflow from text. `file_label` names it in problems; `base_dir` resolves
/// `prompt_file` and subflow paths.
pub fn load_str(
    source: &str,
    file_label: &str,
    base_dir: &Path,
) -> std::result::Result<YamlWorkflow, Vec<Problem>> {
    let doc = value::parse_document(source, file_label).map_err(|(message, line)| {
        vec![Problem {
            file: file_label.to_string(),
            line,
            node: None,
            field: None,
            message,
        }]
    })?;
    let mut p = parse::Parser::new(file_label, base_dir);
    let (name, input_schema, mut steps) = p.root(&doc);
    let description = match doc.get("description") {
        None => None,
        Some(d) => match d.as_str() {
            Some(text) => Some(text.to_string()),
            None => {
                p.problem(
                    d.line,
                    None,
                    Some("description"),
                    format!("expected a string, found {}", d.type_name()),
                );
                None
            }
        },
    };
    if !p.problems.is_empty() {
        let mut problems = p.problems;
        problems.sort_by_key(|pr| pr.line.unwrap_or(0));
        return Err(problems);
    }
    let names = Arc::new(std::mem::take(&mut p.names));
    let root_static = steps.iter().all(Def::is_static);
    let cache = render::fill_cache(&mut steps, &p.env, &names, file_label).and_then(|_| {
        if !root_static {
            return Ok(None);
        }
        let ctx = RenderCtx::new("", Value::Null);
        let mut r = render::Renderer::new(&p.env, &names, file_label, &ctx);
        Ok(Some(Arc::new(Node::Sequence {
            children: r.list(&steps)?,
        })))
    });
    let root = cache.map_err(|e| {
        vec![Problem {
            file: file_label.to_string(),
            line: None,
            node: e.node.clone(),
            field: None,
            message: e.message,
        }]
    })?;
    Ok(YamlWorkflow {
        name,
        description,
        file_label: file_label.to_string(),
        path: None,
        base_dir: base_dir.to_path_buf(),
        source_hash: hex::encode(Sha256::digest(source.as_bytes())),
        input_schema,
        schemas: p.schemas.into_iter().collect(),
        agents: p.agents,
        env: p.env,
        names,
        steps,
        root,
    })
}

/// Every problem in a workflow file; empty when it is valid.
pub fn validate_file(path: impl AsRef<Path>) -> Vec<Problem> {
    match load_file(path) {
        Ok(_) => Vec::new(),
        Err(p) => p,
    }
}
