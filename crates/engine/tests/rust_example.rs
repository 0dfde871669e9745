//! The Rust-defined example workflow runs through the engine like a YAML one.

#[path = "../../../examples/rust_workflow.rs"]
mod example;

use serde_json::json;
use smithers_engine::{Engine, EngineConfig, StartOptions};

#[tokio::test]
async fn rust_example_loops_until_short_then_counts_words() {
    let dir = tempfile::tempdir().unwrap();
    let store = smithers_store::open(&format!("sqlite://{}", dir.path().join("db").display()))
        .await
        .unwrap();
    let engine = Engine::new(
        store.clone(),
        EngineConfig {
            default_cwd: Some(dir.path().into()),
            ..Default::default()
        },
    );
    let o = engine
        .start(
            example::workflow(),
            json!({"product": "Smithers"}),
            StartOptions::default(),
        )
        .await
        .unwrap()
        .wait()
        .await;
    assert_eq!(o.status, "finished", "{:?}", o.error);
    let out = o.output.unwrap();
    assert_eq!(
        out["draft"]["round"],
        json!(1),
        "the second draft is short enough"
    );
    assert_eq!(out["count"]["stdout"].as_str().unwrap().trim(), "6");
    assert_eq!(
        store
            .list_outputs(&o.run_id)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.node_id == "draft")
            .count(),
        2
    );
    // bad input is refused before anything runs
    let err = engine
        .start(example::workflow(), json!({}), StartOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, smithers_core::Code::InvalidInput);
}
