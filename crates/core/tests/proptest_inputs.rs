//! Property tests of what a workflow author (or anyone who can submit a workflow file) controls:
//! random and mutated YAML never panics the loader and always yields located problems; random
//! expressions never panic compilation or evaluation and fail with a coded error.

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::json;
use smithers_core::Code;
use smithers_core::render::{RenderCtx, Workflow};
use smithers_core::yaml::load_str;
use std::path::Path;

const EXAMPLES: &[&str] = &[
    include_str!("../../../examples/workflows/every-kind.yaml"),
    include_str!("../../../examples/workflows/hello.yaml"),
    include_str!("../../../examples/workflows/notify.yaml"),
    include_str!("../../../examples/workflows/agent-offline.yaml"),
    "name: x\nsteps:\n  - loop:\n      id: l\n      until: \"outputs.b.done\"\n      steps:\n        - task: {id: b, value: {done: \"{{ iteration > 1 }}\"}}\n",
];

fn examples_dir() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/workflows"
    ))
}

/// Loads and, when it loads, renders once: whatever happens, no panic, and every failure is a
/// located problem or a coded error with a message.
fn load_and_render(src: &str) {
    match load_str(src, "fuzz.yaml", examples_dir()) {
        Err(problems) => {
            assert!(!problems.is_empty());
            for p in &problems {
                assert!(!p.message.is_empty(), "{p:?}");
                assert_eq!(p.file, "fuzz.yaml");
            }
        }
        Ok(wf) => {
            let ctx = RenderCtx::new("r-1", json!({"repo": "demo", "n": 3, "files": ["a"]}));
            if let Err(e) = wf.render(&ctx) {
                assert_ne!(e.code, Code::Internal, "{e}");
                assert!(!e.message.is_empty());
            }
        }
    }
}

/// An example with bytes replaced, removed, inserted or lines duplicated.
fn mutated_example() -> impl Strategy<Value = String> {
    (
        prop::sample::select(EXAMPLES),
        prop::collection::vec((any::<usize>(), any::<char>(), 0u8..4), 1..8),
    )
        .prop_map(|(src, edits)| {
            let mut chars: Vec<char> = src.chars().collect();
            for (at, c, kind) in edits {
                if chars.is_empty() {
                    chars.push(c);
                    continue;
                }
                let i = at % chars.len();
                match kind {
                    0 => chars[i] = c,
                    1 => {
                        chars.remove(i);
                    }
                    2 => chars.insert(i, c),
                    _ => {
                        // duplicate the line holding position i
                        let start = chars[..i]
                            .iter()
                            .rposition(|&c| c == '\n')
                            .map_or(0, |p| p + 1);
                        let end = chars[i..]
                            .iter()
                            .position(|&c| c == '\n')
                            .map_or(chars.len(), |p| i + p + 1);
                        let line: Vec<char> = chars[start..end].to_vec();
                        chars.splice(end..end, line);
                    }
                }
            }
            chars.into_iter().collect()
        })
}

/// Expression text built from the language's pieces (names in scope, operators, filters,
/// literals, brackets) with random noise mixed in.
fn expression() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("input".to_string()),
        Just("input.repo".to_string()),
        Just("outputs".to_string()),
        Just("outputs.a".to_string()),
        Just("outputs.a.n".to_string()),
        Just("output('a', 0)".to_string()),
        Just("iteration".to_string()),
        Just("run.id".to_string()),
        Just("signals.w".to_string()),
        Just("range(10)".to_string()),
        Just("[1, 2, 3]".to_string()),
        Just("{'k': 1}".to_string()),
        Just("'text'".to_string()),
        Just("none".to_string()),
        Just("true".to_string()),
        Just("1".to_string()),
        Just("0".to_string()),
        Just("-7.5".to_string()),
        Just("99999999999999999999".to_string()),
        Just(" + ".to_string()),
        Just(" - ".to_string()),
        Just(" * ".to_string()),
        Just(" / ".to_string()),
        Just(" // ".to_string()),
        Just(" % ".to_string()),
        Just(" ** ".to_string()),
        Just(" ~ ".to_string()),
        Just(" and ".to_string()),
        Just(" or ".to_string()),
        Just(" not ".to_string()),
        Just(" == ".to_string()),
        Just(" > ".to_string()),
        Just(" in ".to_string()),
        Just(" if ".to_string()),
        Just(" else ".to_string()),
        Just(" is defined".to_string()),
        Just("|length".to_string()),
        Just("|upper".to_string()),
        Just("|default(1)".to_string()),
        Just("|tojson".to_string()),
        Just("|join(',')".to_string()),
        Just("|int".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(".".to_string()),
        Just(",".to_string()),
        Just("{{".to_string()),
        Just("}}".to_string()),
        Just("{%".to_string()),
        "[ -~]{0,6}",
        ".{0,3}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|p| p.concat())
}

/// A workflow using `expr` as a branch condition, a template and a loop condition.
fn workflow_with(expr: &str) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    format!(
        "name: fuzz\nsteps:\n  - task: {{id: a, value: {{n: 1}}}}\n  - branch:\n      if: {cond}\n      then: {{task: {{id: t, value: {tmpl}}}}}\n  - loop:\n      id: l\n      until: {cond}\n      max_iterations: 2\n      steps:\n        - task: {{id: b, value: {tmpl}, skip_if: {cond}}}\n",
        cond = q(expr),
        tmpl = q(&format!("{{{{ {expr} }}}}")),
    )
}

proptest! {
    #![proptest_config(Config { cases: 1500, ..Config::default() })]

    #[test]
    fn random_text_is_refused_with_located_problems(src in ".{0,300}") {
        load_and_render(&src);
    }

    #[test]
    fn mutated_workflows_never_panic(src in mutated_example()) {
        load_and_render(&src);
    }

    #[test]
    fn random_expressions_fail_with_a_coded_error(expr in expression()) {
        load_and_render(&workflow_with(&expr));
    }
}
