//! `smithers workflows`: what a gateway serves (`--url`, through `workflows.list`), or what
//! `smithers serve DIR…` would serve from these files.

use crate::remote::{self, Gateway};
use serde_json::{Value, json};
use smithers_core::{Code, SmithersError};
use std::path::PathBuf;

/// Lists workflows as a table, or as JSON (`{workflows: [...]}`, the `workflows.list` shape).
pub async fn run(
    paths: Vec<PathBuf>,
    url: Option<String>,
    token: Option<String>,
    as_json: bool,
) -> Result<u8, SmithersError> {
    let listed = match url {
        Some(url) => {
            let answer = match Gateway::new(&url, remote::token(token.as_ref())) {
                Ok(gw) => gw.call("workflows.list", json!({})).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(v) => v,
                // the gateway's own code, as every remote command prints it
                Err(e) => {
                    eprintln!("error[{}]: {}", e.code, e.message);
                    return Ok(1);
                }
            }
        }
        None => local(if paths.is_empty() {
            vec![PathBuf::from(".")]
        } else {
            paths
        })?,
    };
    let rows = listed
        .get("workflows")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if as_json {
        println!("{}", json!({ "workflows": rows }));
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no workflows");
        return Ok(0);
    }
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let width = |k: &str, head: &str| {
        rows.iter()
            .map(|r| text(r, k).chars().count())
            .chain([head.len()])
            .max()
            .unwrap_or(0)
    };
    let (wk, wn, ws) = (
        width("key", "KEY"),
        width("name", "NAME"),
        width("schedule", "SCHEDULE"),
    );
    println!(
        "{:wk$}  {:wn$}  {:ws$}  DESCRIPTION",
        "KEY", "NAME", "SCHEDULE"
    );
    for r in &rows {
        println!(
            "{:wk$}  {:wn$}  {:ws$}  {}",
            text(r, "key"),
            text(r, "name"),
            text(r, "schedule"),
            text(r, "description").lines().next().unwrap_or("")
        );
    }
    Ok(0)
}

/// The workflows `smithers serve PATHS` would register (keys are file stems).
fn local(paths: Vec<PathBuf>) -> Result<Value, SmithersError> {
    let cfg = smithers_gateway::config::zero_config(&paths)
        .map_err(|e| SmithersError::new(Code::InvalidInput, e))?;
    let mut out = Vec::new();
    for w in &cfg.workflows {
        let wf = smithers_gateway::serve::load_workflow(w)?;
        out.push(smithers_gateway::shapes::workflow_json(
            &w.key,
            wf.as_ref(),
            w.schedule.as_deref(),
        ));
    }
    Ok(json!({ "workflows": out }))
}
