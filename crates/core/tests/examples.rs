//! Every workflow in examples/workflows is valid and renders.

use smithers_core::render::{RenderCtx, Workflow};
use smithers_core::yaml::{load_file, validate_file};
use std::path::PathBuf;

#[test]
fn examples_validate_and_render() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/workflows");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            continue;
        }
        let problems = validate_file(&path);
        assert!(
            problems.is_empty(),
            "{}:\n{}",
            path.display(),
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        let wf = load_file(&path).unwrap();
        let ctx = RenderCtx::new(
            "r",
            serde_json::json!({"repo": "demo", "sha": "abc", "text": "hi"}),
        );
        wf.render(&ctx)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        n += 1;
    }
    assert!(n >= 3);
    let every = load_file(dir.join("every-kind.yaml")).unwrap();
    let notify = every.subflow("notify").unwrap();
    assert_eq!(notify.name(), "notify");
}
