//! Rendering: defaults, every kind, templates, expression errors and static caching.

mod common;
use common::{ctx, load};
use serde_json::json;
use smithers_core::error::Code;
use smithers_core::render::{RenderCtx, Workflow};
use smithers_core::tree::*;
use std::sync::Arc;

fn children(n: &NodeRef) -> &[NodeRef] {
    match &**n {
        Node::Sequence { children }
        | Node::Parallel { children, .. }
        | Node::Branch { children, .. } => children,
        Node::Loop(l) => &l.children,
        Node::Task(_) => &[],
    }
}

fn task(n: &NodeRef) -> &Task {
    match &**n {
        Node::Task(t) => t,
        other => panic!("not a task: {other:?}"),
    }
}

#[test]
fn defaults() {
    let wf = load(concat!(
        "name: d\nagents: {a: {preset: codex}}\nsteps:\n",
        "  - task: {id: v, value: 1}\n",
        "  - task: {id: r, run: ls}\n",
        "  - task: {id: g, agent: a, prompt: hi}\n",
        "  - loop: {id: l, steps: []}\n",
        "  - approval: {id: ap, title: t}\n",
        "  - wait_for_event: {id: w, event: e}\n",
    ));
    let root = wf.render(&RenderCtx::new("r", json!({}))).unwrap();
    let c = children(&root);
    assert_eq!(task(&c[0]).retries, 0);
    assert_eq!(task(&c[1]).retries, 0);
    assert_eq!(task(&c[2]).retries, 2);
    assert_eq!(task(&c[0]).backoff_ms, 1000);
    match &*c[3] {
        Node::Loop(l) => {
            assert_eq!(l.max_iterations, 5);
            assert_eq!(l.on_max_reached, OnMaxReached::ReturnLast);
            assert!(!l.until);
        }
        _ => panic!(),
    }
    match &task(&c[4]).kind {
        TaskKind::Approval(a) => {
            assert_eq!(a.mode, ApprovalMode::Approve);
            assert_eq!(a.on_deny, OnDeny::Fail);
        }
        _ => panic!(),
    }
    match &task(&c[5]).kind {
        TaskKind::WaitForEvent(w) => assert_eq!(w.on_timeout, OnTimeout::Fail),
        _ => panic!(),
    }
}

#[test]
fn task_fields_map_onto_task() {
    let wf = load(concat!(
        "name: f\noutputs: {o: {type: object}}\nsteps:\n",
        "  - task: {id: a, value: 1}\n",
        "  - task:\n      id: b\n      run: [echo, hi]\n      cwd: /tmp\n      env: {A: x}\n      retries: 3\n      backoff: 2s\n      timeout: 1m\n",
        "      depends_on: [a]\n      continue_on_fail: true\n      needs_approval: true\n      label: Bee\n      output: o\n",
    ));
    let root = wf.render(&RenderCtx::new("r", json!({}))).unwrap();
    let t = task(&children(&root)[1]);
    assert_eq!(t.retries, 3);
    assert_eq!(t.backoff_ms, 2000);
    assert_eq!(t.timeout_ms, Some(60_000));
    assert_eq!(t.depends_on, vec!["a".to_string()]);
    assert!(t.continue_on_fail && t.needs_approval);
    assert_eq!(t.label.as_deref(), Some("Bee"));
    assert_eq!(t.output_table(), "o");
    match &t.kind {
        TaskKind::Run(r) => {
            assert_eq!(r.command, Command::Argv(vec!["echo".into(), "hi".into()]));
            assert_eq!(r.cwd.as_deref(), Some("/tmp"));
            assert_eq!(r.env.get("A").map(String::as_str), Some("x"));
        }
        _ => panic!(),
    }
}

#[test]
fn templates_keep_native_values() {
    let wf = load(concat!(
        "name: t\nsteps:\n",
        "  - task: {id: plan, value: {files: '{{ input.files }}', n: '{{ input.files | length }}', s: 'n={{ input.files | length }}', deep: [{x: '{{ input.flag }}'}]}}\n",
        "  - task: {id: sh, run: 'echo {{ input.files | join(\",\") }}', cwd: '{{ input.dir }}', env: {F: '{{ input.files }}'}}\n",
        "  - subflow: {id: sub, workflow: other, input: {files: '{{ input.files }}', id: '{{ run.id }}'}}\n",
    ));
    let root = wf
        .render(&ctx(
            json!({"files": ["a", "b"], "flag": true, "dir": "/w"}),
            &[],
            &[],
        ))
        .unwrap();
    let c = children(&root);
    assert_eq!(
        task(&c[0]).kind,
        TaskKind::Value(json!({"files": ["a", "b"], "n": 2, "s": "n=2", "deep": [{"x": true}]}))
    );
    match &task(&c[1]).kind {
        TaskKind::Run(r) => {
            assert_eq!(r.command, Command::Shell("echo a,b".into()));
            assert_eq!(r.cwd.as_deref(), Some("/w"));
            assert_eq!(r.env["F"], r#"["a","b"]"#);
        }
        _ => panic!(),
    }
    match &task(&c[2]).kind {
        TaskKind::Subflow(s) => assert_eq!(s.input, json!({"files": ["a", "b"], "id": "run-1"})),
        _ => panic!(),
    }
}

#[test]
fn branch_mounts_only_the_chosen_side() {
    let wf = load(concat!(
        "name: b\nsteps:\n",
        "  - task: {id: review, value: 1}\n",
        "  - branch:\n      if: outputs.review.approved\n      then: {approval: {id: ship, title: 'Ship {{ input.repo }}?'}}\n",
        "      else:\n        - task: {id: report, value: {ok: false}}\n        - task: {id: report2, value: 2}\n",
    ));
    let r = wf.render(&ctx(json!({"repo": "x"}), &[], &[])).unwrap();
    match &*children(&r)[1] {
        Node::Branch { taken, children } => {
            assert!(!taken);
            assert_eq!(children.len(), 2);
            assert_eq!(task(&children[0]).id, "report");
        }
        _ => panic!(),
    }
    let r = wf
        .render(&ctx(
            json!({"repo": "x"}),
            &[("review", 0, json!({"approved": true}))],
            &[],
        ))
        .unwrap();
    match &*children(&r)[1] {
        Node::Branch { taken, children } => {
            assert!(taken);
            assert_eq!(children.len(), 1);
            match &task(&children[0]).kind {
                TaskKind::Approval(a) => assert_eq!(a.title, "Ship x?"),
                _ => panic!(),
            }
        }
        _ => panic!(),
    }
}

#[test]
fn loop_until_and_iteration() {
    let wf = load(concat!(
        "name: l\nsteps:\n",
        "  - loop:\n      id: fix\n      until: outputs.review.ok\n      max_iterations: 3\n      on_max_reached: fail\n      steps:\n",
        "        - task: {id: review, value: {it: '{{ iteration }}', prev: '{{ output(\"review\", iteration - 1) }}'}}\n",
        "  - task: {id: after, value: '{{ iteration }}'}\n",
    ));
    let r = wf
        .render(&ctx(
            json!({}),
            &[("review", 0, json!({"ok": false}))],
            &[("fix", 1)],
        ))
        .unwrap();
    match &*children(&r)[0] {
        Node::Loop(l) => {
            assert_eq!(l.id, "fix");
            assert!(!l.until);
            assert_eq!(l.max_iterations, 3);
            assert_eq!(l.on_max_reached, OnMaxReached::Fail);
            assert_eq!(
                task(&l.children[0]).kind,
                TaskKind::Value(json!({"it": 1, "prev": {"ok": false}}))
            );
        }
        _ => panic!(),
    }
    assert_eq!(task(&children(&r)[1]).kind, TaskKind::Value(json!(0)));
    let r = wf
        .render(&ctx(
            json!({}),
            &[("review", 1, json!({"ok": true}))],
            &[("fix", 1)],
        ))
        .unwrap();
    match &*children(&r)[0] {
        Node::Loop(l) => assert!(l.until),
        _ => panic!(),
    }
}

#[test]
fn nested_loops_scope_ids() {
    let wf = load(concat!(
        "name: n\nsteps:\n",
        "  - loop:\n      id: outer\n      steps:\n",
        "        - sequence:\n            steps:\n",
        "              - loop:\n                  id: inner\n                  until: outputs.work.done\n                  steps:\n",
        "                    - task: {id: work, value: '{{ iteration }}'}\n",
    ));
    let c = ctx(
        json!({}),
        &[("work@@outer=2", 0, json!({"done": true}))],
        &[("outer", 2), ("inner@@outer=2", 4)],
    );
    let r = wf.render(&c).unwrap();
    let outer = match &*children(&r)[0] {
        Node::Loop(l) => l,
        _ => panic!(),
    };
    let seq = &outer.children[0];
    let inner = match &*children(seq)[0] {
        Node::Loop(l) => l,
        _ => panic!(),
    };
    assert_eq!(inner.id, "inner@@outer=2");
    assert!(inner.until, "until reads the scoped output");
    let t = task(&inner.children[0]);
    assert_eq!(t.id, "work@@outer=2");
    assert_eq!(t.kind, TaskKind::Value(json!(4)));
}

#[test]
fn parallel_approval_wait_timer_subflow() {
    let wf = load(concat!(
        "name: p\nsteps:\n",
        "  - parallel:\n      id: par\n      max_concurrency: 2\n      steps:\n",
        "        - wait_for_event: {id: ci, event: ci.finished, correlation_id: '{{ input.sha }}', timeout: 1h, on_timeout: skip}\n",
        "        - timer: {id: t1, duration: 10m}\n",
        "        - timer: {id: t2, until: '2030-01-01T00:00:00Z'}\n",
        "        - approval:\n            id: pick\n            title: Pick\n            mode: rank\n            options: [{key: a, label: A}, {key: b}]\n            on_deny: skip\n            allowed_users: [ann]\n            allowed_scopes: [deploy]\n            auto_approve: {after: 3}\n",
        "  - subflow: {id: s, workflow: notify}\n",
        "  - task: {id: sig, value: '{{ signals.ci.ok }}'}\n",
    ));
    let r = wf
        .render(&ctx(
            json!({"sha": "abc"}),
            &[("ci", 0, json!({"ok": true}))],
            &[],
        ))
        .unwrap();
    let par = &children(&r)[0];
    match &**par {
        Node::Parallel {
            id,
            max_concurrency,
            ..
        } => {
            assert_eq!(id.as_deref(), Some("par"));
            assert_eq!(*max_concurrency, Some(2));
        }
        _ => panic!(),
    }
    let pc = children(par);
    let w = task(&pc[0]);
    assert!(w.continue_on_fail);
    assert_eq!(
        w.kind,
        TaskKind::WaitForEvent(WaitSpec {
            event: "ci.finished".into(),
            correlation_id: Some("abc".into()),
            timeout_ms: Some(3_600_000),
            on_timeout: OnTimeout::Skip
        })
    );
    assert_eq!(
        task(&pc[1]).kind,
        TaskKind::Timer(TimerSpec::DurationMs(600_000))
    );
    assert_eq!(
        task(&pc[2]).kind,
        TaskKind::Timer(TimerSpec::UntilMs(1_893_456_000_000))
    );
    match &task(&pc[3]).kind {
        TaskKind::Approval(a) => {
            assert_eq!(a.mode, ApprovalMode::Rank);
            assert_eq!(a.options.len(), 2);
            assert_eq!(a.options[1].label, "b");
            assert_eq!(a.on_deny, OnDeny::Skip);
            assert_eq!(a.allowed_users, vec!["ann".to_string()]);
            assert_eq!(a.allowed_scopes, vec!["deploy".to_string()]);
            assert_eq!(a.auto_approve_after, Some(3));
        }
        _ => panic!(),
    }
    assert_eq!(
        task(&children(&r)[1]).kind,
        TaskKind::Subflow(SubflowSpec {
            workflow: "notify".into(),
            input: json!({})
        })
    );
    assert_eq!(task(&children(&r)[2]).kind, TaskKind::Value(json!(true)));
}

#[test]
fn skip_if() {
    let wf = load(concat!(
        "name: s\nsteps:\n",
        "  - task: {id: a, value: 1, skip_if: input.skip}\n",
        "  - sequence: {skip_if: input.skip, steps: [{task: {id: b, value: 1}}]}\n",
        "  - parallel: {skip_if: 'not input.skip', steps: [{task: {id: c, value: 1}}]}\n",
    ));
    let r = wf.render(&ctx(json!({"skip": true}), &[], &[])).unwrap();
    let c = children(&r);
    assert_eq!(c.len(), 2, "the skipped sequence renders nothing");
    assert!(task(&c[0]).skip);
    assert!(matches!(&*c[1], Node::Parallel { .. }));
    let r = wf.render(&ctx(json!({"skip": false}), &[], &[])).unwrap();
    let c = children(&r);
    assert_eq!(c.len(), 2);
    assert!(!task(&c[0]).skip);
    assert!(matches!(&*c[1], Node::Sequence { .. }));
}

/// The error a render deferred onto the (only) step of the root sequence.
fn deferred_error(r: &NodeRef) -> smithers_core::SmithersError {
    let c = children(r);
    task(&c[0])
        .error
        .clone()
        .expect("the step carries its expression error")
}

#[test]
fn expression_errors_name_file_node_field_and_expression() {
    // errors are kept on the step (it fails only when the run reaches it), never a silent false
    let wf = load(
        "name: e\nsteps:\n  - branch:\n      id: gate\n      if: 'input.n + \"x\"'\n      then: []\n",
    );
    let e = deferred_error(&wf.render(&ctx(json!({"n": 1}), &[], &[])).unwrap());
    assert_eq!(e.code, Code::ExpressionError);
    assert_eq!(e.node.as_deref(), Some("gate"));
    assert!(
        e.message.contains("test.yaml")
            && e.message.contains("`if`")
            && e.message.contains("input.n + \"x\""),
        "{}",
        e.message
    );

    let wf = load("name: e\nsteps:\n  - task: {id: t, value: '{{ input.a.b.c }}'}\n");
    let r = wf.render(&ctx(json!({}), &[], &[])).unwrap();
    let e = deferred_error(&r);
    assert_eq!(e.code, Code::ExpressionError);
    assert_eq!(e.node.as_deref(), Some("t"));
    assert_eq!(task(&children(&r)[0]).id, "t");
    assert!(e.message.contains("{{ input.a.b.c }}"), "{}", e.message);

    // unknown names are rejected at load, so use an unknown filter (a runtime error) instead
    let wf =
        load("name: e\nsteps:\n  - task: {id: t, value: 1, skip_if: 'input | nosuchfilter'}\n");
    let e = deferred_error(&wf.render(&ctx(json!({}), &[], &[])).unwrap());
    assert!(
        e.message.contains("skip_if") && e.message.contains("nosuchfilter"),
        "{}",
        e.message
    );

    // a template over an output that does not exist yet is an error only until it exists
    let wf = load(
        "name: e\nsteps:\n  - task: {id: a, value: {x: 1}}\n  - task: {id: b, value: '{{ outputs.a.x + 1 }}'}\n",
    );
    let r = wf.render(&ctx(json!({}), &[], &[])).unwrap();
    assert!(task(&children(&r)[1]).error.is_some());
    let r = wf
        .render(&ctx(json!({}), &[("a", 0, json!({"x": 1}))], &[]))
        .unwrap();
    let b = task(&children(&r)[1]);
    assert!(b.error.is_none());
    assert_eq!(b.kind, smithers_core::TaskKind::Value(json!(2)));

    // a missing attribute of a none output is just falsy
    let wf = load(
        "name: e\nsteps:\n  - task: {id: a, value: 1}\n  - branch: {if: outputs.a.ok, then: []}\n",
    );
    assert!(wf.render(&ctx(json!({}), &[], &[])).is_ok());
}

#[test]
fn static_workflows_render_once() {
    let mut src = String::from("name: big\nsteps:\n");
    for i in 0..1000 {
        src.push_str(&format!(
            "  - task: {{id: t{i}, run: 'echo {i}', retries: 1}}\n"
        ));
    }
    let wf = load(&src);
    let c = RenderCtx::new("r", json!({}));
    let a = wf.render(&c).unwrap();
    let b = wf
        .render(&ctx(json!({"x": 1}), &[("t1", 0, json!(1))], &[]))
        .unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(children(&a).len(), 1000);
    let start = std::time::Instant::now();
    for _ in 0..1000 {
        let _ = wf.render(&c).unwrap();
    }
    let per = start.elapsed() / 1000;
    assert!(
        per < std::time::Duration::from_micros(50),
        "static render took {per:?}"
    );
}

#[test]
fn static_subtrees_are_shared_in_dynamic_workflows() {
    let mut src = String::from(
        "name: mixed\nsteps:\n  - task: {id: dyn, value: '{{ input.x }}'}\n  - sequence:\n      steps:\n",
    );
    for i in 0..1000 {
        src.push_str(&format!("        - task: {{id: t{i}, value: {i}}}\n"));
    }
    let wf = load(&src);
    let a = wf.render(&ctx(json!({"x": 1}), &[], &[])).unwrap();
    let b = wf.render(&ctx(json!({"x": 2}), &[], &[])).unwrap();
    assert!(!Arc::ptr_eq(&a, &b));
    assert!(Arc::ptr_eq(&children(&a)[1], &children(&b)[1]));
    assert_eq!(task(&children(&b)[0]).kind, TaskKind::Value(json!(2)));
    let start = std::time::Instant::now();
    for i in 0..200 {
        let _ = wf.render(&ctx(json!({"x": i}), &[], &[])).unwrap();
    }
    let per = start.elapsed() / 200;
    assert!(
        per < std::time::Duration::from_micros(500),
        "render took {per:?}"
    );
}

#[test]
fn prompt_file_and_subflow_resolution() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.md"), "Fix {{ input.repo }}\n").unwrap();
    std::fs::write(dir.path().join("child.yml"), "name: child\nsteps: []\n").unwrap();
    let main = dir.path().join("main.yaml");
    std::fs::write(
        &main,
        "name: m\nagents: {c: {command: [./agent, --json], prompt: stdin}}\nsteps:\n  - task: {id: a, agent: c, prompt_file: p.md}\n  - subflow: {id: s, workflow: child}\n",
    )
    .unwrap();
    let wf = smithers_core::yaml::load_file(&main).unwrap();
    assert!(wf.path().unwrap().is_absolute());
    assert_eq!(wf.source_hash().unwrap().len(), 64);
    let r = wf.render(&ctx(json!({"repo": "x"}), &[], &[])).unwrap();
    match &task(&children(&r)[0]).kind {
        TaskKind::Agent(a) => assert_eq!(a.prompt, "Fix x\n"),
        _ => panic!(),
    }
    assert_eq!(wf.subflow("child").unwrap().name(), "child");
    assert_eq!(
        wf.subflow("nope").err().unwrap().code,
        Code::WorkflowNotFound
    );
    let agent = &wf.agents()["c"];
    assert!(
        matches!(&agent.kind, smithers_core::yaml::AgentKind::Command { argv, .. } if argv.len() == 2)
    );
}

#[test]
fn agents_reach_the_engine_through_the_workflow_trait() {
    use smithers_core::agent::{AgentKind, Preset, PromptMode, Provider};
    let wf = load(
        "name: a\nagents:\n  c: {preset: claude-code, model: sonnet, allow_tools: [Read, Edit], bin: [sh, fake.sh]}\n  x: {preset: codex, allow_tools: []}\n  g: {preset: gemini}\n  l: {command: ./agent --json, prompt: arg}\n  o: {provider: openai-compatible, base_url: 'http://127.0.0.1:1/v1', model: m, api_key_env: KEY}\n  n: {provider: anthropic, model: claude, max_tokens: 512}\nsteps: []\n",
    );
    let c = wf.agent("c").unwrap();
    assert_eq!(
        c.kind,
        AgentKind::Preset {
            preset: Preset::ClaudeCode,
            bin: Some(vec!["sh".into(), "fake.sh".into()])
        }
    );
    assert_eq!(c.model.as_deref(), Some("sonnet"));
    assert_eq!(c.allow_tools, Some(vec!["Read".into(), "Edit".into()]));
    assert_eq!(c.engine(), "claude-code");
    // an empty list (no tools) differs from no list (the CLI's own defaults)
    assert_eq!(wf.agent("x").unwrap().allow_tools, Some(vec![]));
    assert_eq!(wf.agent("g").unwrap().allow_tools, None);
    assert_eq!(
        wf.agent("l").unwrap().kind,
        AgentKind::Command {
            argv: vec!["./agent".into(), "--json".into()],
            prompt: PromptMode::Arg
        }
    );
    match wf.agent("o").unwrap().kind {
        AgentKind::Provider {
            provider,
            base_url,
            api_key_env,
            max_tokens,
        } => {
            assert_eq!(provider, Provider::OpenAiCompatible);
            assert_eq!(base_url.as_deref(), Some("http://127.0.0.1:1/v1"));
            assert_eq!(api_key_env.as_deref(), Some("KEY"));
            assert_eq!(max_tokens, None);
        }
        k => panic!("{k:?}"),
    }
    assert!(matches!(
        wf.agent("n").unwrap().kind,
        AgentKind::Provider {
            provider: Provider::Anthropic,
            max_tokens: Some(512),
            ..
        }
    ));
    assert!(wf.agent("missing").is_none());
}

#[test]
fn input_schema_is_exposed() {
    let wf = load("name: i\ninput: {type: object, required: [repo]}\nsteps: []\n");
    assert_eq!(
        wf.input_schema(),
        Some(&json!({"type": "object", "required": ["repo"]}))
    );
    assert_eq!(wf.name(), "i");
}

#[test]
fn values_inside_text_are_written_as_json() {
    let wf = load(
        "name: e\nsteps:\n  - task: {id: t, run: \"echo {{ input.b }} {{ input.n }} {{ input.l }} {{ input.o }} {{ input.s }}\"}\n",
    );
    let r = wf
        .render(&ctx(
            json!({"b": true, "n": null, "l": [1, 2], "o": {"k": "v"}, "s": "x"}),
            &[],
            &[],
        ))
        .unwrap();
    match &task(&children(&r)[0]).kind {
        TaskKind::Run(r) => assert_eq!(
            r.command,
            Command::Shell("echo true null [1,2] {\"k\":\"v\"} x".into())
        ),
        other => panic!("{other:?}"),
    }
}
