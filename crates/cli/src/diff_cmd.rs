//! `smithers diff`: what a task changed on disk (the node diff the engine recorded around its
//! attempt in a git work tree), locally or through a gateway (`getNodeDiff`).

use crate::remote;
use serde_json::{Value, json};
use smithers_core::SmithersError;

/// Prints a diff bundle: the patches (they apply with `git apply`) on stdout, a summary on
/// stderr; or the bundle as JSON.
fn print(bundle: &Value, as_json: bool) {
    if as_json {
        println!("{bundle}");
        return;
    }
    let patches = bundle["patches"].as_array().cloned().unwrap_or_default();
    for p in &patches {
        if let Some(d) = p["diff"].as_str() {
            print!("{d}");
            if !d.ends_with('\n') {
                println!();
            }
        }
    }
    let attempt = bundle["seq"].as_i64().unwrap_or(0);
    if patches.is_empty() {
        eprintln!("attempt {attempt} changed no files");
        return;
    }
    eprintln!(
        "attempt {attempt} changed {} file{}:",
        patches.len(),
        if patches.len() == 1 { "" } else { "s" }
    );
    for p in &patches {
        let op = p["operation"].as_str().unwrap_or("?");
        let path = p["path"].as_str().unwrap_or("?");
        match p["oldPath"].as_str() {
            Some(old) => eprintln!("  {op:<7} {old} → {path}"),
            None => eprintln!("  {op:<7} {path}"),
        }
    }
}

/// Local mode: the engine computes (or reads the cached) diff from the database.
pub async fn diff(
    db: &str,
    run_id: &str,
    node: &str,
    iteration: i64,
    as_json: bool,
) -> Result<u8, SmithersError> {
    let store = crate::open_store(db).await?;
    let engine = smithers_engine::Engine::new(store, smithers_engine::EngineConfig::default());
    match engine.node_diff(run_id, node, iteration).await {
        Ok(d) => {
            let bundle = serde_json::to_value(&d.bundle).unwrap_or(Value::Null);
            print(&bundle, as_json);
            Ok(0)
        }
        Err(e) => {
            eprintln!(
                "error[{}]: {}",
                crate::remote::cli_code(e.code(), &e.message()),
                e.message()
            );
            Ok(1)
        }
    }
}

/// Remote mode: `getNodeDiff` on the gateway.
pub async fn diff_remote(
    gw: &remote::Gateway,
    run_id: &str,
    node: &str,
    iteration: i64,
    as_json: bool,
) -> Result<u8, remote::RemoteError> {
    let bundle = gw
        .call(
            "getNodeDiff",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration}),
        )
        .await?;
    print(&bundle, as_json);
    Ok(0)
}
