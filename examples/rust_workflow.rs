//! A workflow written in Rust: a render function from the run's context to a tree.
//!
//! It goes through the same engine as YAML workflows: every render is a frame, every step a
//! row, and a crashed run resumes where it stopped. Run it with
//! `cargo run -p smithers-engine --example rust_workflow`.

use serde_json::json;
use smithers_core::build::{FnWorkflow, repeat, seq, shell, value};
use smithers_core::{RenderCtx, Workflow};
use smithers_engine::{Engine, EngineConfig, StartOptions};
use std::sync::Arc;

/// Drafts a release note, "reviews" it until it is short enough (at most 3 rounds), then
/// counts its words with a shell command.
pub fn workflow() -> Arc<dyn Workflow> {
    Arc::new(
        FnWorkflow::new("release-note", |ctx: &RenderCtx| {
            let product = ctx.input["product"]
                .as_str()
                .unwrap_or("the product")
                .to_string();
            let round = ctx.iteration_of("polish");
            // the latest draft, if any: later steps read earlier outputs on every render
            let draft = ctx
                .outputs
                .latest("draft")
                .and_then(|d| d["text"].as_str().map(str::to_string));
            let short_enough = draft.as_ref().is_some_and(|t| t.len() <= 40);
            let text = match round {
                0 => format!("{product} ships today with many improvements to speed and safety."),
                1 => format!("{product} ships today: faster and safer."),
                _ => format!("{product}: faster, safer."),
            };
            let words = draft.clone().unwrap_or_default();
            Ok(seq(vec![
                repeat(
                    "polish",
                    short_enough,
                    3,
                    vec![
                        value("draft", json!({ "text": text, "round": round }))
                            .output_schema(json!({
                                "type": "object",
                                "required": ["text"],
                                "properties": {"text": {"type": "string"}}
                            }))
                            .node(),
                    ],
                ),
                shell(
                    "count",
                    &format!("printf '%s' '{}' | wc -w", words.replace('\'', "")),
                )
                .node(),
            ]))
        })
        .with_input_schema(json!({"type": "object", "required": ["product"]})),
    )
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store = smithers_store::open("sqlite://.smithers/rust-example.db").await?;
    let engine = Engine::new(store, EngineConfig::default());
    let run = engine
        .start(
            workflow(),
            json!({"product": "Smithers"}),
            StartOptions::default(),
        )
        .await?;
    println!("run {}", run.run_id);
    let outcome = run.wait().await;
    println!(
        "{}: {}",
        outcome.status,
        serde_json::to_string_pretty(&outcome.output)?
    );
    Ok(())
}
