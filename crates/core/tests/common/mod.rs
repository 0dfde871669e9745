// Shared helpers for the YAML tests (included with `mod common;`).
#![allow(dead_code)]

use serde_json::Value;
use smithers_core::error::Problem;
use smithers_core::render::{OutputsView, RenderCtx};
use smithers_core::yaml::{YamlWorkflow, load_str};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Outputs keyed by (node id, iteration).
#[derive(Debug, Default)]
pub struct MapOutputs(pub HashMap<(String, u32), Value>);

impl OutputsView for MapOutputs {
    fn latest(&self, node_id: &str) -> Option<Value> {
        self.0
            .iter()
            .filter(|((n, _), _)| n == node_id)
            .max_by_key(|((_, i), _)| *i)
            .map(|(_, v)| v.clone())
    }
    fn get(&self, node_id: &str, iteration: u32) -> Option<Value> {
        self.0.get(&(node_id.to_string(), iteration)).cloned()
    }
}

pub fn load(src: &str) -> YamlWorkflow {
    match load_str(src, "test.yaml", Path::new(".")) {
        Ok(w) => w,
        Err(p) => panic!("unexpected problems: {:#?}", p),
    }
}

pub fn problems(src: &str) -> Vec<Problem> {
    match load_str(src, "test.yaml", Path::new(".")) {
        Ok(_) => panic!("expected problems for:\n{src}"),
        Err(p) => p,
    }
}

pub fn ctx(input: Value, outputs: &[(&str, u32, Value)], loops: &[(&str, u32)]) -> RenderCtx {
    let mut c = RenderCtx::new("run-1", input);
    c.outputs = Arc::new(MapOutputs(
        outputs
            .iter()
            .map(|(n, i, v)| ((n.to_string(), *i), v.clone()))
            .collect(),
    ));
    c.loops = Arc::new(loops.iter().map(|(l, i)| (l.to_string(), *i)).collect());
    c
}
