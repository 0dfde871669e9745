//! Property tests of what a hostile client controls: request frames (random text, random JSON,
//! mutated valid frames) never panic the parser and are always answered with a coded error;
//! random parameters sent to every method over a real socket never make the server fail with
//! a 500.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};
use smithers_gateway::request::{parse_http, parse_ws};

/// Arbitrary JSON, nested a few levels, with the keys and values a frame uses mixed in.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        prop_oneof![
            Just("req"),
            Just("health"),
            Just("runs.list"),
            Just("connect"),
            Just("Runs.list"),
            Just("")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("type".to_string()),
        Just("id".to_string()),
        Just("method".to_string()),
        Just("params".to_string()),
        ".{0,12}",
    ]
}

/// A valid frame, then bytes flipped, cut, duplicated or inserted.
fn mutated_frame() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        Just(r#"{"type":"req","id":"a1","method":"runs.list","params":{"limit":5}}"#),
        Just(r#"{"type":"req","id":"","method":"health"}"#),
        Just(r#"{"id":"x","method":"runs.get","params":{"runId":"r"}}"#),
        Just(
            r#"{"type":"req","id":"c","method":"connect","params":{"minProtocol":1,"maxProtocol":1}}"#
        ),
    ];
    (
        valid,
        prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 1..6),
    )
        .prop_map(|(frame, edits)| {
            let mut b = frame.as_bytes().to_vec();
            for (at, byte, kind) in edits {
                if b.is_empty() {
                    b.push(byte);
                    continue;
                }
                let i = at % b.len();
                match kind {
                    0 => b[i] = byte,
                    1 => {
                        b.remove(i);
                    }
                    2 => b.insert(i, byte),
                    _ => {
                        let tail = b[i..].to_vec();
                        b.extend_from_slice(&tail);
                    }
                }
            }
            b
        })
}

fn check_ws(text: &str) {
    match parse_ws(text) {
        Ok(r) => {
            assert!(!r.method.is_empty());
            assert!(r.id.encode_utf16().count() <= 128);
        }
        Err(r) => {
            assert_eq!(r.error.code, "INVALID_INPUT", "{text:?}");
            assert!(!r.error.message.is_empty());
            // the frame's own id, or "invalid" when it has no usable one
            let own = serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|f| f.get("id").and_then(Value::as_str).map(str::to_string));
            assert!(
                r.id == "invalid" || own.as_deref() == Some(r.id.as_str()),
                "{text:?} {}",
                r.id
            );
        }
    }
}

fn check_http(body: &[u8]) {
    match parse_http(body, "request-id") {
        Ok(r) => assert!(!r.method.is_empty()),
        Err(r) => {
            assert!(
                matches!(r.error.code.as_str(), "INVALID_INPUT" | "INVALID_REQUEST"),
                "{}",
                r.error.code
            );
            assert!(!r.error.message.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(Config { cases: 2000, ..Config::default() })]

    #[test]
    fn random_text_frames_get_a_coded_error(text in ".{0,200}") {
        check_ws(&text);
        check_http(text.as_bytes());
    }

    #[test]
    fn random_json_frames_get_a_coded_error(v in json_value()) {
        let text = v.to_string();
        check_ws(&text);
        check_http(text.as_bytes());
    }

    #[test]
    fn mutated_frames_get_a_coded_error(bytes in mutated_frame()) {
        check_http(&bytes);
        check_ws(&String::from_utf8_lossy(&bytes));
    }
}

/// Parameter names the methods read, so random values reach the handlers' checks.
const PARAM_NAMES: &[&str] = &[
    "runId",
    "nodeId",
    "iteration",
    "attempt",
    "frameNo",
    "afterFrameNo",
    "limit",
    "status",
    "workflow",
    "input",
    "newRunId",
    "leftRunId",
    "rightRunId",
    "signalName",
    "correlationId",
    "data",
    "approved",
    "decision",
    "note",
    "cronId",
    "pattern",
    "enabled",
    "confirm",
    "fromSeq",
];

fn param_value(run: String) -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => Just(Value::String(run)),
        1 => Just(json!("hello")),
        1 => Just(json!("a")),
        1 => Just(json!("@daily")),
        2 => json_value(),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => (0i64..5).prop_map(|n| json!(n)),
    ]
}

#[test]
fn random_params_to_every_method_never_fail_the_server() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(start(Spec {
        workflows: vec![("hello", HELLO.to_string()), ("gated", GATED.to_string())],
        ..Default::default()
    }));
    let run = rt.block_on(async {
        let id = rpc(s.addr, "runs.create", json!({"workflow": "gated"}), &[])
            .await
            .json()["payload"]["runId"]
            .as_str()
            .unwrap()
            .to_string();
        wait_status(s.addr, &id, "waiting-approval").await;
        id
    });
    let methods: Vec<&'static str> = smithers_gateway::methods::METHODS
        .iter()
        .map(|m| m.name)
        .collect();
    let strategy = (
        prop::sample::select(methods),
        prop::collection::vec(
            (prop::sample::select(PARAM_NAMES), param_value(run.clone())),
            0..6,
        ),
    );
    let mut runner = TestRunner::new(Config {
        cases: 1000,
        ..Config::default()
    });
    runner
        .run(&strategy, |(method, params)| {
            let params: Map<String, Value> = params
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            let r = rt.block_on(rpc(s.addr, method, Value::Object(params.clone()), &[]));
            let body = r.json();
            prop_assert!(
                r.status != 500 && r.status != 0,
                "{method} {}: {} {}",
                Value::Object(params),
                r.status,
                r.body
            );
            if r.status != 200 {
                prop_assert!(
                    body["error"]["code"]
                        .as_str()
                        .is_some_and(|c| !c.is_empty())
                );
                prop_assert!(
                    body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty())
                );
            }
            Ok(())
        })
        .unwrap();
    drop(s);
}
