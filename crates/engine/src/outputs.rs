//! Task outputs held in memory for rendering, and output validation against JSON Schema.

use serde_json::Value;
use smithers_core::{Code, OutputsView, SmithersError, tree::OutputSpec};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

/// The outputs a run has produced, shared with renders (which read them lazily).
#[derive(Debug, Default)]
pub struct OutputStore {
    map: RwLock<HashMap<String, BTreeMap<u32, Value>>>,
}

impl OutputStore {
    pub fn insert(&self, node_id: &str, iteration: u32, value: Value) {
        if let Ok(mut m) = self.map.write() {
            m.entry(node_id.to_string())
                .or_default()
                .insert(iteration, value);
        }
    }

    pub fn remove(&self, node_id: &str, iteration: u32) {
        if let Ok(mut m) = self.map.write()
            && let Some(its) = m.get_mut(node_id)
        {
            its.remove(&iteration);
        }
    }

    /// Whether (node, iteration) has an output.
    pub fn get_exact(&self, node_id: &str, iteration: u32) -> bool {
        self.map
            .read()
            .map(|m| {
                m.get(node_id)
                    .is_some_and(|its| its.contains_key(&iteration))
            })
            .unwrap_or(false)
    }

    /// `{nodeId: latest output}` for every node with an output: the run's final output.
    pub fn latest_map(&self) -> Value {
        let Ok(m) = self.map.read() else {
            return Value::Null;
        };
        let mut out = serde_json::Map::new();
        let sorted: BTreeMap<&String, &BTreeMap<u32, Value>> = m.iter().collect();
        for (k, its) in sorted {
            if let Some((_, v)) = its.iter().next_back() {
                out.insert(k.clone(), v.clone());
            }
        }
        Value::Object(out)
    }
}

impl OutputsView for OutputStore {
    fn latest(&self, node_id: &str) -> Option<Value> {
        self.map
            .read()
            .ok()?
            .get(node_id)?
            .iter()
            .next_back()
            .map(|(_, v)| v.clone())
    }
    fn get(&self, node_id: &str, iteration: u32) -> Option<Value> {
        self.map.read().ok()?.get(node_id)?.get(&iteration).cloned()
    }
}

/// A schema (kept alive so its address stays unique) and its compiled validator.
type CachedValidator = (Arc<Value>, Arc<jsonschema::Validator>);

/// Compiled validators, keyed by the schema's identity (the Arc is kept alive with the entry so
/// the address cannot be reused).
#[derive(Default)]
pub struct SchemaCache {
    compiled: Mutex<HashMap<usize, CachedValidator>>,
}

impl SchemaCache {
    fn validator(&self, schema: &Arc<Value>) -> Result<Arc<jsonschema::Validator>, SmithersError> {
        let key = Arc::as_ptr(schema) as usize;
        if let Ok(m) = self.compiled.lock()
            && let Some((_, v)) = m.get(&key)
        {
            return Ok(v.clone());
        }
        let v = jsonschema::validator_for(schema).map_err(|e| {
            SmithersError::new(
                Code::UnknownOutputSchema,
                format!("output schema is not a valid JSON Schema: {e}"),
            )
            .terminal()
        })?;
        let v = Arc::new(v);
        if let Ok(mut m) = self.compiled.lock() {
            if m.len() > 4096 {
                m.clear();
            }
            m.insert(key, (schema.clone(), v.clone()));
        }
        Ok(v)
    }

    /// Validates an output; the error names the node, the JSON path and the failed rule.
    pub fn check(
        &self,
        node_id: &str,
        spec: Option<&OutputSpec>,
        value: &Value,
    ) -> Result<(), SmithersError> {
        let Some(spec) = spec else { return Ok(()) };
        let v = self.validator(&spec.schema)?;
        let problems: Vec<String> = v
            .iter_errors(value)
            .take(5)
            .map(|e| {
                let path = e.instance_path().to_string();
                let path = if path.is_empty() {
                    "/".to_string()
                } else {
                    path
                };
                format!("at `{path}`: {e} (rule `{}`)", e.kind().keyword())
            })
            .collect();
        if problems.is_empty() {
            return Ok(());
        }
        let schema_name = spec
            .name
            .as_deref()
            .map(|n| format!(" `{n}`"))
            .unwrap_or_default();
        Err(SmithersError::new(
            Code::InvalidOutput,
            format!(
                "output of `{node_id}` does not match its schema{schema_name}: {}",
                problems.join("; ")
            ),
        )
        .with_node(node_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_names_path_and_rule() {
        let cache = SchemaCache::default();
        let spec = OutputSpec {
            name: Some("review".into()),
            schema: Arc::new(
                json!({"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}),
            ),
        };
        assert!(cache.check("r", Some(&spec), &json!({"ok": true})).is_ok());
        let e = cache
            .check("r", Some(&spec), &json!({"ok": "yes"}))
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidOutput);
        assert!(e.message.contains("/ok"), "{}", e.message);
        assert!(e.message.contains("rule `type`"), "{}", e.message);
        let e = cache.check("r", Some(&spec), &json!({})).unwrap_err();
        assert!(e.message.contains("rule `required`"), "{}", e.message);
    }

    #[test]
    fn latest_is_highest_iteration() {
        let s = OutputStore::default();
        s.insert("a", 0, json!(1));
        s.insert("a", 2, json!(3));
        s.insert("a", 1, json!(2));
        assert_eq!(s.latest("a"), Some(json!(3)));
        assert_eq!(s.get("a", 1), Some(json!(2)));
        assert_eq!(s.latest_map(), json!({"a": 3}));
    }
}
