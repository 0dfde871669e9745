//! Malformed input never panics: every case yields at least one Problem.

use smithers_core::yaml::load_str;
use std::path::Path;

fn check(label: &str, src: &str) {
    let r = std::panic::catch_unwind(|| load_str(src, "bad.yaml", Path::new(".")));
    match r {
        Ok(Err(problems)) => {
            assert!(!problems.is_empty(), "{label}: no problems");
            for p in &problems {
                assert!(!p.message.is_empty(), "{label}");
            }
        }
        Ok(Ok(_)) => panic!("{label}: accepted malformed input"),
        Err(_) => panic!("{label}: panicked"),
    }
}

#[test]
fn corpus() {
    let deep_flow = format!(
        "name: x\nsteps: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_map = format!(
        "name: x\nsteps: {}1{}\n",
        "{a: ".repeat(5_000),
        "}".repeat(5_000)
    );
    let mut deep_block = String::from("name: x\nsteps:\n");
    for i in 0..3000 {
        deep_block.push_str(&format!("{}- \n", " ".repeat(i * 2)));
    }
    let long_dash = format!("name: x\nsteps:\n{}x\n", "- ".repeat(50_000));
    let cases: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("whitespace", "   \n\n  ".into()),
        ("comments only", "# nothing\n# here\n".into()),
        (
            "tabs",
            "name: x\nsteps:\n\t- task: {id: a, value: 1}\n".into(),
        ),
        (
            "bad indentation",
            "name: x\nsteps:\n  - task:\n      id: a\n     value: 1\n".into(),
        ),
        (
            "anchor",
            "name: x\nbase: &b {id: a}\nsteps:\n  - task: *b\n".into(),
        ),
        ("alias only", "name: x\nsteps: *nope\n".into()),
        ("tag", "name: !!str x\nsteps: []\n".into()),
        ("duplicate key", "name: x\nname: y\nsteps: []\n".into()),
        ("binary", "\u{0}\u{1}\u{2}ELF\u{7f}".into()),
        ("top-level list", "- a\n- b\n".into()),
        ("top-level scalar", "hello".into()),
        ("unclosed flow", "name: x\nsteps: [\n".into()),
        ("unclosed quote", "name: \"x\nsteps: []\n".into()),
        ("deep flow", deep_flow),
        ("deep map", deep_map),
        ("deep block", deep_block),
        ("long dash", long_dash),
        ("json garbage", "{\"name\": \"x\", \"steps\": [}".into()),
        ("steps scalar", "name: x\nsteps: 3\n".into()),
        ("step null", "name: x\nsteps:\n  -\n".into()),
        ("kind null", "name: x\nsteps:\n  - task:\n".into()),
        ("numeric keys", "1: 2\n".into()),
        ("complex key", "? [a]\n: b\n".into()),
        (
            "huge number",
            format!(
                "name: x\nsteps:\n  - task: {{id: a, value: 1, retries: {}}}\n",
                "9".repeat(400)
            ),
        ),
        (
            "weird unicode",
            "name: \u{202e}x\u{fffd}\nsteps:\n  - task: {id: \u{1F600}, value: 1}\n".into(),
        ),
    ];
    for (label, src) in &cases {
        check(label, src);
    }
}

#[test]
fn random_bytes_never_panic() {
    // a small deterministic generator: no external crate needed
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let alphabet = b"name: steps-task{}[]\n  \t#&*!|>'\"{{ }}%:,?-1a\\";
    for _ in 0..2000 {
        let len = (seed % 200) as usize;
        let mut s = String::new();
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            s.push(alphabet[(seed % alphabet.len() as u64) as usize] as char);
        }
        let r = std::panic::catch_unwind(|| {
            let _ = load_str(&s, "fuzz.yaml", Path::new("."));
        });
        assert!(r.is_ok(), "panicked on {s:?}");
    }
}

#[test]
fn non_utf8_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bin.yaml");
    std::fs::write(&p, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let problems = smithers_core::yaml::validate_file(&p);
    assert_eq!(problems.len(), 1);
    assert!(problems[0].message.contains("UTF-8"));
    let missing = smithers_core::yaml::validate_file(dir.path().join("nope.yaml"));
    assert!(missing[0].message.contains("cannot read"));
}
