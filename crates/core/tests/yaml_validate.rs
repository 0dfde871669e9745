//! Validation: every problem kind, reported all at once with file, line, node and field.

mod common;
use common::problems;
use smithers_core::error::Problem;

fn has(ps: &[Problem], needle: &str) -> bool {
    ps.iter().any(|p| p.to_string().contains(needle))
}

fn assert_problem(src: &str, needle: &str) -> Vec<Problem> {
    let ps = problems(src);
    assert!(
        has(&ps, needle),
        "expected a problem containing `{needle}`, got:\n{}",
        dump(&ps)
    );
    ps
}

fn dump(ps: &[Problem]) -> String {
    ps.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn wf(steps: &str) -> String {
    format!("name: t\nsteps:\n{steps}")
}

#[test]
fn unknown_kind_with_line() {
    let ps = assert_problem(
        &wf("  - task: {id: a, value: 1}\n  - tsak: {id: b, value: 1}\n"),
        "unknown kind `tsak`",
    );
    let p = ps.iter().find(|p| p.message.contains("tsak")).unwrap();
    assert_eq!(p.line, Some(4));
    assert!(p.message.contains("did you mean `task`"));
}

#[test]
fn unknown_field_with_line_node_and_field() {
    let ps = assert_problem(
        &wf("  - task:\n      id: a\n      value: 1\n      retires: 3\n"),
        "unknown field `retires`",
    );
    let p = &ps[0];
    assert_eq!(p.line, Some(6));
    assert_eq!(p.node.as_deref(), Some("a"));
    assert_eq!(p.field.as_deref(), Some("retires"));
    assert!(
        p.to_string()
            .starts_with("test.yaml:6: node `a` field `retires`:"),
        "{p}"
    );
}

#[test]
fn unknown_root_field() {
    assert_problem("name: t\nstep: []\nsteps: []\n", "unknown field `step`");
}

#[test]
fn missing_required_fields() {
    assert_problem(&wf("  - task: {value: 1}\n"), "needs an `id`");
    assert_problem(&wf("  - loop: {id: l}\n"), "a loop needs `steps`");
    assert_problem(
        &wf("  - branch: {then: {task: {id: a, value: 1}}}\n"),
        "needs `if`",
    );
    assert_problem(&wf("  - approval: {id: a}\n"), "needs a `title`");
    assert_problem(&wf("  - wait_for_event: {id: a}\n"), "needs `event`");
    assert_problem(&wf("  - subflow: {id: a}\n"), "needs `workflow`");
    assert_problem("steps: []\n", "needs a `name`");
    assert_problem("name: t\n", "needs `steps`");
}

#[test]
fn wrong_types() {
    assert_problem(
        &wf("  - task: {id: a, value: 1, retries: many}\n"),
        "field `retries`: expected an integer",
    );
    assert_problem(
        &wf("  - task: {id: a, value: 1, continue_on_fail: 'yes'}\n"),
        "expected true or false",
    );
    assert_problem(
        &wf("  - parallel: {steps: {}}\n"),
        "expected a list of steps",
    );
    assert_problem(
        &wf("  - task: {id: a, value: 1, depends_on: b}\n"),
        "expected a list of strings",
    );
    assert_problem(
        &wf("  - parallel: {max_concurrency: 0, steps: []}\n"),
        "max_concurrency",
    );
    assert_problem("name: [x]\nsteps: []\n", "expected a string");
}

#[test]
fn duplicate_ids_across_branches_and_loops() {
    let src = wf(concat!(
        "  - task: {id: a, value: 1}\n",
        "  - branch:\n      if: 'true'\n      then: {task: {id: a, value: 2}}\n",
        "  - loop:\n      id: l\n      steps:\n        - task: {id: l, value: 3}\n",
    ));
    let ps = assert_problem(&src, "duplicate id `a`");
    assert!(has(&ps, "duplicate id `l`"), "{}", dump(&ps));
    let p = ps
        .iter()
        .find(|p| p.message.contains("duplicate id `a`"))
        .unwrap();
    assert!(p.message.contains("first defined on line 3"), "{p}");
}

#[test]
fn id_syntax() {
    assert_problem(&wf("  - task: {id: 'a b', value: 1}\n"), "invalid id `a b`");
    assert_problem(
        &wf(&format!(
            "  - task: {{id: {}, value: 1}}\n",
            "x".repeat(129)
        )),
        "invalid id",
    );
    assert_problem(&wf("  - task: {id: '', value: 1}\n"), "invalid id");
    assert_problem(&wf("  - task: {id: 'a@b', value: 1}\n"), "invalid id");
}

#[test]
fn output_schema_references() {
    assert_problem(
        &wf("  - task: {id: a, value: 1, output: nope}\n"),
        "output schema `nope` is not defined",
    );
    assert_problem(
        "name: t\noutputs:\n  bad: {type: 12}\nsteps: []\n",
        "invalid JSON Schema",
    );
    assert_problem(
        &wf("  - task: {id: a, value: 1, output: {type: nothing}}\n"),
        "invalid JSON Schema",
    );
    assert_problem(
        "name: t\ninput: {type: [1]}\nsteps: []\n",
        "field `input`: invalid JSON Schema",
    );
}

#[test]
fn bad_durations() {
    assert_problem(
        &wf("  - task: {id: a, value: 1, timeout: 10x}\n"),
        "field `timeout`: invalid duration `10x`",
    );
    assert_problem(
        &wf("  - task: {id: a, value: 1, backoff: soon}\n"),
        "field `backoff`: invalid duration",
    );
    assert_problem(
        &wf("  - timer: {id: a, duration: 5 minutes}\n"),
        "field `duration`: invalid duration",
    );
    assert_problem(
        &wf("  - wait_for_event: {id: a, event: e, timeout: -1s}\n"),
        "field `timeout`: invalid duration",
    );
}

#[test]
fn timer_needs_exactly_one() {
    assert_problem(
        &wf("  - timer: {id: a}\n"),
        "exactly one of `duration` or `until`",
    );
    assert_problem(
        &wf("  - timer: {id: a, duration: 1s, until: '2030-01-01T00:00:00Z'}\n"),
        "exactly one of `duration` or `until`",
    );
    assert_problem(&wf("  - timer: {id: a, until: tomorrow}\n"), "RFC 3339");
}

#[test]
fn task_needs_exactly_one_body() {
    assert_problem(&wf("  - task: {id: a}\n"), "exactly one of `value`, `run`");
    assert_problem(
        &wf("  - task: {id: a, value: 1, run: ls}\n"),
        "exactly one of `value`, `run`",
    );
    assert_problem(
        "name: t\nagents: {x: {preset: codex}}\nsteps:\n  - task: {id: a, agent: x}\n",
        "needs `prompt` or `prompt_file`",
    );
    assert_problem(
        "name: t\nsteps:\n  - task: {id: a, prompt: hi}\n",
        "needs `agent`",
    );
}

#[test]
fn agents() {
    assert_problem(
        &wf("  - task: {id: a, agent: ghost, prompt: hi}\n"),
        "unknown agent `ghost`",
    );
    assert_problem(
        "name: t\nagents: {x: {preset: codex, command: [a]}}\nsteps: []\n",
        "exactly one of `preset`, `command` or `provider`",
    );
    assert_problem(
        "name: t\nagents: {x: {provider: openai-compatible, model: m}}\nsteps: []\n",
        "needs `base_url`",
    );
    assert_problem(
        "name: t\nagents: {x: {preset: codex, modle: m}}\nsteps: []\n",
        "did you mean `model`",
    );
    assert_problem(
        &wf("  - task: {id: a, agent: x, prompt_file: missing-prompt.md}\n"),
        "cannot read",
    );
    let ps = assert_problem(
        "name: t\nagents:\n  x:\n    preset: claud-code\nsteps: []\n",
        "unknown preset `claud-code`",
    );
    assert_eq!(ps[0].line, Some(4));
    assert!(
        ps[0].message.contains("did you mean `claude-code`"),
        "{}",
        ps[0]
    );
    assert_problem(
        "name: t\nagents: {x: {command: [a], bin: b}}\nsteps: []\n",
        "`bin` only applies to preset agents",
    );
    assert_problem(
        "name: t\nagents: {x: {preset: codex, bin: []}}\nsteps: []\n",
        "`bin` must not be empty",
    );
    assert_problem(
        "name: t\nagents: {x: {preset: codex, max_tokens: 10}}\nsteps: []\n",
        "`max_tokens` only applies to provider agents",
    );
    assert_problem(
        "name: t\nagents: {x: {provider: anthropic, model: m, max_tokens: 0}}\nsteps: []\n",
        "an integer from 1",
    );
    assert_problem(
        "name: t\nagents: {x: {provider: openai-compatible, model: m, base_url: localhost:1}}\nsteps: []\n",
        "not an http:// or https:// URL",
    );
    assert_problem(
        "name: t\nagents: {x: {provider: gpt, model: m}}\nsteps: []\n",
        "unknown provider `gpt`",
    );
    assert_problem(
        "name: t\nagents: {x: {preset: gemini, allow_tools: read}}\nsteps: []\n",
        "a list of strings",
    );
}

#[test]
fn approval_options() {
    assert_problem(
        &wf("  - approval: {id: a, title: t, mode: select}\n"),
        "need `options",
    );
    assert_problem(
        &wf("  - approval: {id: a, title: t, mode: rank, options: []}\n"),
        "need `options",
    );
    assert_problem(
        &wf("  - approval: {id: a, title: t, mode: vote}\n"),
        "unknown value `vote`",
    );
}

#[test]
fn enum_values() {
    assert_problem(
        &wf("  - approval: {id: a, title: t, on_deny: ignore}\n"),
        "field `on_deny`: unknown value `ignore`",
    );
    assert_problem(
        &wf("  - wait_for_event: {id: a, event: e, on_timeout: retry}\n"),
        "field `on_timeout`: unknown value",
    );
    assert_problem(
        &wf("  - loop: {id: l, on_max_reached: stop, steps: []}\n"),
        "field `on_max_reached`: unknown value",
    );
}

#[test]
fn expression_syntax() {
    assert_problem(
        &wf("  - branch: {if: 'a ==', then: []}\n"),
        "field `if`: invalid expression",
    );
    assert_problem(
        &wf("  - task: {id: a, value: '{{ input.x'}\n"),
        "invalid template",
    );
    assert_problem(
        &wf("  - task: {id: a, run: 'echo {% if %}'}\n"),
        "invalid template",
    );
}

#[test]
fn expression_unknown_names() {
    let ps = assert_problem(
        &wf("  - task: {id: a, value: '{{ inptu.x }}'}\n"),
        "unknown name `inptu`",
    );
    assert_eq!(ps[0].field.as_deref(), Some("value"));
    assert_problem(
        &wf("  - branch: {if: 'outputs.nope.ok', then: []}\n"),
        "no node has id `nope`",
    );
    assert_problem(
        &wf("  - task: {id: a, value: 1}\n  - task: {id: b, value: '{{ signals.a }}'}\n"),
        "no wait_for_event node has id `a`",
    );
    assert_problem(
        &wf("  - task: {id: a, value: '{{ run.name }}'}\n"),
        "only `run.id` exists",
    );
    // builtins and locals are fine
    common::load(&wf(
        "  - task: {id: a, value: \"{% for i in range(3) %}{{ i }}{% endfor %}{{ dict(x=1) }}\"}\n",
    ));
}

#[test]
fn depends_on_unknown_and_cycles() {
    assert_problem(
        &wf("  - task: {id: a, value: 1, depends_on: [zz]}\n"),
        "depends on `zz`",
    );
    let ps = assert_problem(
        &wf(
            "  - task: {id: a, value: 1, depends_on: [c]}\n  - task: {id: b, value: 1, depends_on: [a]}\n  - task: {id: c, value: 1, depends_on: [b]}\n",
        ),
        "cycle",
    );
    assert_eq!(
        ps.iter().filter(|p| p.message.contains("cycle")).count(),
        1,
        "{}",
        dump(&ps)
    );
    assert_problem(
        &wf("  - task: {id: a, value: 1, depends_on: [a]}\n"),
        "cycle: a -> a",
    );
}

#[test]
fn name_length() {
    assert_problem(
        &format!("name: {}\nsteps: []\n", "n".repeat(257)),
        "at most 256",
    );
    common::load(&format!("name: {}\nsteps: []\n", "n".repeat(256)));
}

#[test]
fn all_problems_at_once() {
    let src = concat!(
        "name: t\n",
        "bogus: 1\n",
        "steps:\n",
        "  - task: {id: a, value: 1, retires: 2}\n",
        "  - task: {id: a, value: 1}\n",
        "  - timer: {id: t1}\n",
        "  - branch: {if: 'outputs.zz', then: []}\n",
        "  - task: {id: c, run: ls, timeout: 1y, output: missing}\n",
        "  - approval: {id: d, title: x, mode: select}\n",
    );
    let ps = problems(src);
    for needle in [
        "bogus",
        "retires",
        "duplicate id `a`",
        "exactly one of `duration`",
        "`zz`",
        "1y",
        "missing",
        "options",
    ] {
        assert!(has(&ps, needle), "missing `{needle}` in:\n{}", dump(&ps));
    }
    assert!(ps.len() >= 8);
    // sorted by line
    let lines: Vec<usize> = ps.iter().filter_map(|p| p.line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
}

#[test]
fn step_shape_problems() {
    assert_problem(
        &wf("  - task: {id: a, value: 1}\n    id: b\n"),
        "exactly one key naming its kind",
    );
    assert_problem(&wf("  - just a string\n"), "one-key mapping");
    assert_problem(&wf("  - task: [1]\n"), "as a mapping");
}

#[test]
fn json_files_are_accepted_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("w.json");
    std::fs::write(
        &ok,
        r#"{"name": "j", "steps": [{"task": {"id": "a", "value": {"x": 1}}}]}"#,
    )
    .unwrap();
    assert!(smithers_core::yaml::validate_file(&ok).is_empty());
    let bad = dir.path().join("b.json");
    std::fs::write(
        &bad,
        "{\n  \"name\": \"j\",\n  \"steps\": [{\"task\": {\"id\": \"a\", \"valeu\": 1}}]\n}",
    )
    .unwrap();
    let ps = smithers_core::yaml::validate_file(&bad);
    assert!(has(&ps, "unknown field `valeu`"), "{}", dump(&ps));
    assert!(ps.iter().any(|p| p.line == Some(3)), "{}", dump(&ps));
    let broken = dir.path().join("c.json");
    std::fs::write(&broken, "{\n  \"name\": \"j\",\n  \"steps\": [\n}").unwrap();
    let ps = smithers_core::yaml::validate_file(&broken);
    assert!(has(&ps, "invalid JSON"), "{}", dump(&ps));
}
