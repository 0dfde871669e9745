//! Expressions and templates (Jinja via minijinja).
//!
//! One [`ExprEnv`] per workflow holds every expression and template of the file, compiled once
//! at load. Renders evaluate them against a [`Scope`], which reads the run context lazily: an
//! output is only fetched (and converted) when an expression actually reads it, so the cost of
//! a render does not grow with the number of outputs a run has produced.

use crate::error::{Code, SmithersError};
use crate::render::RenderCtx;
use crate::tree::scoped_loop_id;
use minijinja::value::{Enumerator, Object, ObjectRepr, Serde, Value as JValue};
use minijinja::{Environment, Error as JError, ErrorKind, State, UndefinedBehavior};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

/// Instructions one evaluation may execute before it is stopped (runaway loops in templates).
pub const FUEL: u64 = 250_000;

/// Top-level names an expression may read besides the environment's builtin functions.
pub const SCOPE_NAMES: &[&str] = &["input", "outputs", "output", "iteration", "run", "signals"];

/// Name of the variable an expression template stores its result in.
const RESULT_VAR: &str = "__smithers_result";

/// A compiled expression or template, owned by the [`ExprEnv`] it was compiled in.
#[derive(Debug, Clone)]
pub struct Compiled {
    name: Arc<str>,
    /// The text as the user wrote it (used in error messages).
    pub source: Arc<str>,
    /// True when this is a bare expression (or a template that is exactly one `{{ expr }}`),
    /// which evaluates to a native value.
    pub native: bool,
}

/// What an expression reads, found at compile time; checked against the file's ids.
#[derive(Debug, Clone, Default)]
pub struct Refs {
    /// Dotted paths of every undeclared variable, e.g. `outputs.review.approved`.
    pub paths: Vec<String>,
}

/// The per-workflow Jinja environment: auto-escape off, (semi-)strict undefined, fuel-limited.
#[derive(Debug)]
pub struct ExprEnv {
    env: Environment<'static>,
    next: usize,
}

impl Default for ExprEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl ExprEnv {
    /// A fresh environment with the `output(id, iteration)` function registered.
    pub fn new() -> Self {
        let mut env = Environment::new();
        // Semi-strict: using an undefined value fails, but testing one for truth is simply false,
        // so `not outputs.review.approved` works before `review` has run.
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_fuel(Some(FUEL));
        // Values printed inside text are written as JSON (`true`, `null`, `[1, 2]`), not in
        // Python's spelling (`True`, `None`): the text usually ends up in a shell command or a
        // prompt where JSON is what readers expect.
        env.set_formatter(|out, state, value| {
            use minijinja::value::ValueKind;
            match value.kind() {
                ValueKind::String | ValueKind::Number | ValueKind::Undefined => {
                    minijinja::escape_formatter(out, state, value)
                }
                _ => {
                    let text = serde_json::to_string(value).map_err(|e| {
                        minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
                    })?;
                    out.write_str(&text).map_err(minijinja::Error::from)
                }
            }
        });
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        env.add_function("output", output_fn);
        ExprEnv { env, next: 0 }
    }

    /// Whether `name` is a builtin global of the environment (e.g. `range`, `dict`).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.env.globals().any(|(n, _)| n == name)
            || matches!(name, "loop" | "self" | "super" | "caller")
    }

    /// Compiles a bare expression (`if`, `until`, `skip_if`).
    pub fn compile_expression(&mut self, source: &str) -> Result<(Compiled, Refs), String> {
        let refs = {
            let expr = self
                .env
                .compile_expression(source)
                .map_err(|e| describe(&e))?;
            Refs {
                paths: sorted(expr.undeclared_variables(true)),
            }
        };
        let name = self.fresh_name();
        // Evaluated as a template that stores the value, so it can be kept compiled in the env.
        let wrapped = format!("{{% set {RESULT_VAR} = ({source}\n) %}}");
        self.env
            .add_template_owned(name.clone(), wrapped)
            .map_err(|e| describe(&e))?;
        Ok((
            Compiled {
                name: Arc::from(name),
                source: Arc::from(source),
                native: true,
            },
            refs,
        ))
    }

    /// Compiles a template string. A string that is exactly one `{{ expr }}` is compiled as an
    /// expression so it yields a native JSON value.
    pub fn compile_template(&mut self, source: &str) -> Result<(Compiled, Refs), String> {
        if let Some(inner) = single_expression(source) {
            let (mut c, refs) = self.compile_expression(inner)?;
            c.source = Arc::from(source);
            return Ok((c, refs));
        }
        let name = self.fresh_name();
        self.env
            .add_template_owned(name.clone(), source.to_string())
            .map_err(|e| describe(&e))?;
        let refs = match self.env.get_template(&name) {
            Ok(t) => Refs {
                paths: sorted(t.undeclared_variables(true)),
            },
            Err(e) => return Err(describe(&e)),
        };
        Ok((
            Compiled {
                name: Arc::from(name),
                source: Arc::from(source),
                native: false,
            },
            refs,
        ))
    }

    fn fresh_name(&mut self) -> String {
        self.next += 1;
        format!("#{}", self.next)
    }

    fn eval_raw(&self, c: &Compiled, scope: &Scope) -> Result<JValue, JError> {
        let tmpl = self.env.get_template(&c.name)?;
        let ctx = JValue::from_object(scope.clone());
        if c.native {
            let captured = tmpl.render_captured(ctx)?;
            Ok(captured
                .state()
                .lookup(RESULT_VAR)
                .unwrap_or(JValue::UNDEFINED))
        } else {
            tmpl.render(ctx).map(JValue::from)
        }
    }

    /// Evaluates a bare expression with Jinja truthiness (undefined and none are false).
    pub fn eval_bool(&self, c: &Compiled, scope: &Scope) -> Result<bool, String> {
        self.eval_raw(c, scope)
            .map(|v| v.is_true())
            .map_err(|e| describe(&e))
    }

    /// Renders a template to text (a native single-expression template is stringified:
    /// strings as is, everything else as JSON).
    pub fn eval_string(&self, c: &Compiled, scope: &Scope) -> Result<String, String> {
        let v = self.eval_raw(c, scope).map_err(|e| describe(&e))?;
        if !c.native {
            return Ok(v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string()));
        }
        let json = to_json(&v)?;
        Ok(match json {
            Value::String(s) => s,
            other => other.to_string(),
        })
    }

    /// Evaluates a template to JSON: a native template keeps its type, others give a string.
    pub fn eval_json(&self, c: &Compiled, scope: &Scope) -> Result<Value, String> {
        if c.native {
            let v = self.eval_raw(c, scope).map_err(|e| describe(&e))?;
            to_json(&v)
        } else {
            self.eval_string(c, scope).map(Value::String)
        }
    }
}

fn to_json(v: &JValue) -> Result<Value, String> {
    if v.is_undefined() {
        return Err(
            "the expression evaluated to an undefined value (a missing field or variable)".into(),
        );
    }
    serde_json::to_value(v).map_err(|e| format!("the value cannot be converted to JSON: {e}"))
}

fn sorted(set: HashSet<String>) -> Vec<String> {
    let mut v: Vec<String> = set.into_iter().collect();
    v.sort();
    v
}

/// A one-line description of a minijinja error, without its internal template name.
fn describe(e: &JError) -> String {
    let kind = match e.kind() {
        ErrorKind::SyntaxError => "syntax error",
        ErrorKind::UndefinedError => "undefined value",
        ErrorKind::UnknownFunction => "unknown function",
        ErrorKind::UnknownFilter => "unknown filter",
        ErrorKind::UnknownTest => "unknown test",
        ErrorKind::UnknownMethod => "unknown method",
        ErrorKind::InvalidOperation => "invalid operation",
        ErrorKind::OutOfFuel => "evaluation ran too long (out of fuel)",
        ErrorKind::MissingArgument => "missing argument",
        ErrorKind::TooManyArguments => "too many arguments",
        ErrorKind::BadSerialization => "value cannot be converted",
        _ => "error",
    };
    match e.detail() {
        Some(d) => format!("{kind}: {d}"),
        None => kind.to_string(),
    }
}

/// If `source` is exactly one `{{ expr }}` (surrounding whitespace allowed), the inner expr.
pub fn single_expression(source: &str) -> Option<&str> {
    let t = source.trim();
    let inner = t.strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("{#")
    {
        return None;
    }
    Some(inner.trim())
}

/// Whether a string is a template (contains `{{` or `{%`).
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// Builds the EXPRESSION_ERROR a render reports: names the file, node, field and expression.
pub fn expression_error(
    file: &str,
    node: &str,
    field: &str,
    source: &str,
    message: &str,
) -> SmithersError {
    SmithersError::new(
        Code::ExpressionError,
        format!("{file}: node `{node}` field `{field}`: expression `{source}` failed: {message}"),
    )
    .terminal()
    .with_node(node)
}

/// Which node ids exist in a workflow, and the loops around each (outermost first), so
/// `outputs.<id>` finds the row of a node nested in several loops.
#[derive(Debug, Default)]
pub struct NameTable {
    /// Node id -> enclosing loop ids, outermost first.
    pub ids: HashMap<String, Vec<String>>,
    /// Ids of wait_for_event nodes (the keys of `signals`).
    pub signals: HashSet<String>,
}

impl NameTable {
    /// The node id the engine stores rows under: ids inside two or more loops carry the outer
    /// loops' current iterations (see [`scoped_loop_id`]).
    pub fn resolve(&self, id: &str, ctx: &RenderCtx) -> String {
        match self.ids.get(id) {
            Some(chain) if chain.len() >= 2 => {
                let mut outer: Vec<(String, u32)> = Vec::with_capacity(chain.len());
                for l in &chain[..chain.len() - 1] {
                    let it = ctx.iteration_of(&scoped_loop_id(l, &outer));
                    outer.push((l.clone(), it));
                }
                scoped_loop_id(id, &outer)
            }
            _ => id.to_string(),
        }
    }
}

/// The context values shared by every evaluation of one render.
#[derive(Debug)]
struct Shared {
    ctx: RenderCtx,
    input: OnceLock<JValue>,
    outputs: JValue,
    signals: JValue,
    run: JValue,
}

/// The root scope of an evaluation: `input`, `outputs`, `output()`, `iteration`, `run`,
/// `signals`. Cheap to clone; values are produced on first access.
#[derive(Debug, Clone)]
pub struct Scope {
    shared: Arc<Shared>,
    iteration: u32,
}

impl Scope {
    /// A scope over a render context, at iteration 0.
    pub fn new(ctx: &RenderCtx, names: Arc<NameTable>) -> Self {
        let outputs = JValue::from_object(OutputsObj {
            ctx: ctx.clone(),
            names: names.clone(),
            signals: false,
        });
        let signals = JValue::from_object(OutputsObj {
            ctx: ctx.clone(),
            names,
            signals: true,
        });
        let run = JValue::from(std::collections::BTreeMap::from([(
            "id".to_string(),
            JValue::from(&*ctx.run_id),
        )]));
        Scope {
            shared: Arc::new(Shared {
                ctx: ctx.clone(),
                input: OnceLock::new(),
                outputs,
                signals,
                run,
            }),
            iteration: 0,
        }
    }

    /// The same scope seen from inside a loop at `iteration`.
    pub fn at_iteration(&self, iteration: u32) -> Scope {
        Scope {
            shared: self.shared.clone(),
            iteration,
        }
    }
}

impl Object for Scope {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        match key.as_str()? {
            "input" => Some(
                self.shared
                    .input
                    .get_or_init(|| JValue::from(Serde(&*self.shared.ctx.input)))
                    .clone(),
            ),
            "outputs" => Some(self.shared.outputs.clone()),
            "signals" => Some(self.shared.signals.clone()),
            "run" => Some(self.shared.run.clone()),
            "iteration" => Some(JValue::from(self.iteration)),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["input", "outputs", "signals", "run", "iteration"])
    }
}

/// `outputs` / `signals`: latest output of each known node, fetched on access.
#[derive(Debug)]
struct OutputsObj {
    ctx: RenderCtx,
    names: Arc<NameTable>,
    signals: bool,
}

impl OutputsObj {
    fn known(&self, id: &str) -> bool {
        if self.signals {
            self.names.signals.contains(id)
        } else {
            self.names.ids.contains_key(id)
        }
    }

    fn fetch(&self, id: &str, iteration: Option<u32>) -> JValue {
        let node = self.names.resolve(id, &self.ctx);
        let v = match iteration {
            Some(i) => self.ctx.outputs.get(&node, i),
            None => self.ctx.outputs.latest(&node),
        };
        v.map(|v| JValue::from(Serde(&v)))
            .unwrap_or(JValue::from(()))
    }
}

impl Object for OutputsObj {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        let id = key.as_str()?;
        if !self.known(id) {
            return None;
        }
        Some(self.fetch(id, None))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut keys: Vec<JValue> = if self.signals {
            self.names
                .signals
                .iter()
                .map(|k| JValue::from(k.as_str()))
                .collect()
        } else {
            self.names
                .ids
                .keys()
                .map(|k| JValue::from(k.as_str()))
                .collect()
        };
        keys.sort();
        Enumerator::Values(keys)
    }
}

/// `output(id, iteration)`: the output of one node at one iteration, or none.
fn output_fn(state: &State, id: String, iteration: u32) -> Result<JValue, JError> {
    let outputs = state.lookup("outputs").ok_or_else(|| {
        JError::new(
            ErrorKind::InvalidOperation,
            "output() is only available while rendering a workflow",
        )
    })?;
    let obj = outputs.downcast_object_ref::<OutputsObj>().ok_or_else(|| {
        JError::new(
            ErrorKind::InvalidOperation,
            "`outputs` was shadowed; output() cannot read it",
        )
    })?;
    if !obj.known(&id) {
        return Err(JError::new(
            ErrorKind::InvalidOperation,
            format!("output(): no node with id `{id}`"),
        ));
    }
    Ok(obj.fetch(&id, Some(iteration)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope(input: Value) -> Scope {
        let mut names = NameTable::default();
        names.ids.insert("a".into(), vec![]);
        Scope::new(&RenderCtx::new("r1", input), Arc::new(names))
    }

    #[test]
    fn native_and_text() {
        let mut env = ExprEnv::new();
        let s = scope(json!({"files": ["x", "y"], "n": 2}));
        let (c, refs) = env.compile_template("{{ input.files }}").unwrap();
        assert!(c.native);
        assert_eq!(refs.paths, vec!["input.files".to_string()]);
        assert_eq!(env.eval_json(&c, &s).unwrap(), json!(["x", "y"]));
        let (c, _) = env
            .compile_template("n={{ input.n }} run={{ run.id }}")
            .unwrap();
        assert_eq!(env.eval_json(&c, &s).unwrap(), json!("n=2 run=r1"));
        let (c, _) = env.compile_template("{{ input.n }}").unwrap();
        assert_eq!(env.eval_string(&c, &s).unwrap(), "2");
    }

    #[test]
    fn truthiness_and_errors() {
        let mut env = ExprEnv::new();
        let s = scope(json!({}));
        let (c, _) = env.compile_expression("outputs.a.approved").unwrap();
        assert!(!env.eval_bool(&c, &s).unwrap());
        let (c, _) = env.compile_expression("outputs.a.x.y").unwrap();
        assert!(env.eval_bool(&c, &s).is_err());
        let (c, _) = env.compile_expression("nope(1)").unwrap();
        assert!(
            env.eval_bool(&c, &s)
                .unwrap_err()
                .contains("unknown function")
        );
        let (c, _) = env
            .compile_template(
                "{% for i in range(1000) %}{% for j in range(1000) %}.{% endfor %}{% endfor %}",
            )
            .unwrap();
        let e = env.eval_string(&c, &s).unwrap_err();
        assert!(e.contains("fuel"), "{e}");
        assert!(env.compile_expression("a +").is_err());
        let (c, _) = env
            .compile_expression("output('a', 3) is none and iteration == 0")
            .unwrap();
        assert!(env.eval_bool(&c, &s).unwrap());
    }

    #[test]
    fn single_expression_detection() {
        assert_eq!(single_expression(" {{ a.b }} "), Some("a.b"));
        assert_eq!(single_expression("{{ a }} {{ b }}"), None);
        assert_eq!(single_expression("x {{ a }}"), None);
    }
}
