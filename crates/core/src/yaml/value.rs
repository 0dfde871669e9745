//! The document tree the loader works on: YAML or JSON parsed into typed values that remember
//! their line, so every problem can point at the line it comes from.

use serde_json::{Map, Number, Value};

/// Containers may nest at most this deep (a workflow never needs more; deeper input is junk).
pub const MAX_DEPTH: usize = 64;
/// Workflow files larger than this are refused.
pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;

/// A parsed value with the (1-based) line it starts on, when known.
#[derive(Debug, Clone)]
pub struct Y {
    pub line: Option<usize>,
    pub v: YV,
}

#[derive(Debug, Clone)]
pub enum YV {
    Null,
    Bool(bool),
    Num(Number),
    Str(String),
    Seq(Vec<Y>),
    /// Entries in document order: key, line of the key, value.
    Map(Vec<(String, Option<usize>, Y)>),
}

impl Y {
    /// A short type name for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match self.v {
            YV::Null => "null",
            YV::Bool(_) => "a boolean",
            YV::Num(_) => "a number",
            YV::Str(_) => "a string",
            YV::Seq(_) => "a list",
            YV::Map(_) => "a mapping",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.v {
            YV::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(String, Option<usize>, Y)]> {
        match &self.v {
            YV::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Y]> {
        match &self.v {
            YV::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// Value of `key` when this is a mapping.
    pub fn get(&self, key: &str) -> Option<&Y> {
        self.as_map()?
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, v)| v)
    }

    /// Plain JSON (for schemas, static values, inputs).
    pub fn to_json(&self) -> Value {
        match &self.v {
            YV::Null => Value::Null,
            YV::Bool(b) => Value::Bool(*b),
            YV::Num(n) => Value::Number(n.clone()),
            YV::Str(s) => Value::String(s.clone()),
            YV::Seq(s) => Value::Array(s.iter().map(Y::to_json).collect()),
            YV::Map(m) => {
                let mut out = Map::new();
                for (k, _, v) in m {
                    out.insert(k.clone(), v.to_json());
                }
                Value::Object(out)
            }
        }
    }

    /// Whether any string inside is a template.
    pub fn has_template(&self) -> bool {
        match &self.v {
            YV::Str(s) => crate::expr::is_template(s),
            YV::Seq(s) => s.iter().any(Y::has_template),
            YV::Map(m) => m.iter().any(|(_, _, v)| v.has_template()),
            _ => false,
        }
    }
}

/// A parse failure: message and line, if known.
pub type ParseError = (String, Option<usize>);

/// Parses a workflow document. JSON is tried first when the label or text suggests it; YAML
/// otherwise. Never panics, whatever the bytes.
pub fn parse_document(source: &str, label: &str) -> Result<Y, ParseError> {
    if source.len() > MAX_FILE_BYTES {
        return Err((
            format!(
                "file is {} bytes; workflow files may be at most {MAX_FILE_BYTES} bytes",
                source.len()
            ),
            None,
        ));
    }
    if source.trim().is_empty()
        || source
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err((
            "file is empty: a workflow needs at least `name` and `steps`".into(),
            None,
        ));
    }
    if let Some(pos) =
        source.find(|c: char| c == '\0' || (c.is_control() && !matches!(c, '\n' | '\r' | '\t')))
    {
        let line = source[..pos].matches('\n').count() + 1;
        return Err((
            "file contains control characters; is it a binary file?".into(),
            Some(line),
        ));
    }
    let is_json = label.ends_with(".json") || source.trim_start().starts_with('{');
    if is_json {
        match serde_json::from_str::<Value>(source) {
            Ok(v) => {
                // Prefer the YAML parse of the same text for line numbers; fall back to plain JSON.
                if check_depth(source).is_ok()
                    && let Ok(y) = parse_yaml(source)
                {
                    return Ok(y);
                }
                return from_json(&v, 0);
            }
            Err(e) if label.ends_with(".json") => {
                return Err((
                    format!("invalid JSON: {e}"),
                    Some(e.line()).filter(|l| *l > 0),
                ));
            }
            Err(_) => {}
        }
    }
    check_depth(source)?;
    parse_yaml(source)
}

/// Refuses deeply nested text before a parser builds (and recursively drops) a deep tree.
fn check_depth(source: &str) -> Result<(), ParseError> {
    let mut flow = 0usize;
    let mut quote: Option<char> = None;
    for (i, line) in source.lines().enumerate() {
        let indent = line
            .chars()
            .take_while(|c| matches!(c, ' ' | '-' | '?' | ':' | '\t'))
            .count();
        if indent > 8 * MAX_DEPTH {
            return Err((
                format!("nesting is too deep (more than {MAX_DEPTH} levels)"),
                Some(i + 1),
            ));
        }
        let mut prev = ' ';
        for c in line.chars() {
            match quote {
                Some(q) => {
                    if c == q && prev != '\\' {
                        quote = None;
                    }
                }
                None => match c {
                    '"' | '\'' if matches!(prev, ' ' | '[' | '{' | ',' | ':') => quote = Some(c),
                    '#' if prev == ' ' => break,
                    '[' | '{' => {
                        flow += 1;
                        if flow > MAX_DEPTH {
                            return Err((
                                format!("nesting is too deep (more than {MAX_DEPTH} levels)"),
                                Some(i + 1),
                            ));
                        }
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = c;
        }
        if quote == Some('\'') || quote == Some('"') {
            // multi-line quoted scalars are allowed; keep state across lines
        }
    }
    Ok(())
}

fn parse_yaml(source: &str) -> Result<Y, ParseError> {
    use marked_yaml::{LoadError, LoaderOptions};
    let opts = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let node = marked_yaml::parse_yaml_with_options(0, source, opts).map_err(|e| {
        let (msg, mark) = match &e {
            LoadError::TopLevelMustBeMapping(m) => (
                "the top level must be a mapping (name:, steps:, ...)".to_string(),
                Some(m),
            ),
            LoadError::TopLevelMustBeSequence(m) => {
                ("the top level must be a sequence".to_string(), Some(m))
            }
            LoadError::UnexpectedAnchor(m) => (
                "YAML anchors and aliases (&, *) are not supported".to_string(),
                Some(m),
            ),
            LoadError::MappingKeyMustBeScalar(m) => {
                ("mapping keys must be plain strings".to_string(), Some(m))
            }
            LoadError::UnexpectedTag(m) => {
                ("YAML tags (!tag) are not supported".to_string(), Some(m))
            }
            LoadError::ScanError(m, se) => (format!("invalid YAML: {}", se.info()), Some(m)),
            LoadError::DuplicateKey(d) => (
                format!("duplicate key `{}`", d.key.as_str()),
                d.key.span().start(),
            ),
        };
        (msg, mark.map(|m| m.line()).filter(|l| *l > 0))
    })?;
    from_marked(&node, 0)
}

fn from_marked(node: &marked_yaml::Node, depth: usize) -> Result<Y, ParseError> {
    use marked_yaml::Node;
    let line = node.span().start().map(|m| m.line()).filter(|l| *l > 0);
    if depth > MAX_DEPTH {
        return Err((
            format!("nesting is too deep (more than {MAX_DEPTH} levels)"),
            line,
        ));
    }
    let v = match node {
        Node::Scalar(s) => scalar(s.as_str(), s.may_coerce()),
        Node::Sequence(seq) => {
            let mut out = Vec::with_capacity(seq.len());
            for item in seq.iter() {
                out.push(from_marked(item, depth + 1)?);
            }
            YV::Seq(out)
        }
        Node::Mapping(map) => {
            let mut out = Vec::with_capacity(map.len());
            for (k, v) in map.iter() {
                let kl = k.span().start().map(|m| m.line()).filter(|l| *l > 0);
                out.push((k.as_str().to_string(), kl, from_marked(v, depth + 1)?));
            }
            YV::Map(out)
        }
    };
    Ok(Y { line, v })
}

/// Types a YAML scalar the way YAML 1.2's core schema would (plain scalars only).
fn scalar(text: &str, plain: bool) -> YV {
    if !plain {
        return YV::Str(text.to_string());
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return YV::Null,
        "true" | "True" | "TRUE" => return YV::Bool(true),
        "false" | "False" | "FALSE" => return YV::Bool(false),
        _ => {}
    }
    let numeric = text
        .trim_start_matches(['-', '+'])
        .starts_with(|c: char| c.is_ascii_digit())
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'));
    if numeric {
        if let Ok(i) = text.parse::<i64>() {
            return YV::Num(i.into());
        }
        if let Ok(u) = text.parse::<u64>() {
            return YV::Num(u.into());
        }
        if let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
            return YV::Num(n);
        }
    }
    YV::Str(text.to_string())
}

fn from_json(v: &Value, depth: usize) -> Result<Y, ParseError> {
    if depth > MAX_DEPTH {
        return Err((
            format!("nesting is too deep (more than {MAX_DEPTH} levels)"),
            None,
        ));
    }
    let v = match v {
        Value::Null => YV::Null,
        Value::Bool(b) => YV::Bool(*b),
        Value::Number(n) => YV::Num(n.clone()),
        Value::String(s) => YV::Str(s.clone()),
        Value::Array(a) => YV::Seq(
            a.iter()
                .map(|x| from_json(x, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => {
            let mut out = Vec::with_capacity(m.len());
            for (k, x) in m {
                out.push((k.clone(), None, from_json(x, depth + 1)?));
            }
            YV::Map(out)
        }
    };
    Ok(Y { line: None, v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_are_typed() {
        let y = parse_document(
            "a: 1\nb: '1'\nc: true\nd: x\ne: 1.5\nf:\ng: 10m\n",
            "t.yaml",
        )
        .unwrap();
        assert_eq!(
            y.to_json(),
            serde_json::json!({"a": 1, "b": "1", "c": true, "d": "x", "e": 1.5, "f": null, "g": "10m"})
        );
        assert_eq!(y.get("d").and_then(|d| d.line), Some(4));
    }

    #[test]
    fn json_keeps_lines() {
        let y = parse_document("{\n \"name\": \"x\",\n \"steps\": []\n}", "t.json").unwrap();
        assert_eq!(y.get("steps").and_then(|d| d.line), Some(3));
    }
}
