//! Limits on data that comes from outside (run input, signal payloads). Every limit here is
//! enforced where the data enters and tested at its boundary.

use crate::error::{Code, Result, SmithersError};
use serde_json::Value;

/// Run input: at most 1 MiB of JSON.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;
/// Run input: containers nested at most 32 deep.
pub const MAX_INPUT_DEPTH: usize = 32;
/// Run input: arrays of at most 512 items.
pub const MAX_INPUT_ARRAY: usize = 512;
/// Run input: strings of at most 64 KiB.
pub const MAX_INPUT_STRING: usize = 64 * 1024;
/// Run ids and workflow names: at most 256 characters.
pub const MAX_ID_LEN: usize = crate::ids::MAX_ID_LEN;

/// Checks a run input: a JSON object within the size, depth, array and string limits.
pub fn check_run_input(input: &Value) -> Result<()> {
    if !input.is_object() {
        return Err(SmithersError::new(
            Code::InvalidInput,
            "input must be a JSON object",
        ));
    }
    let bytes = serde_json::to_vec(input)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if bytes > MAX_INPUT_BYTES {
        return Err(SmithersError::new(
            Code::InvalidInput,
            format!("input is {bytes} bytes; the limit is {MAX_INPUT_BYTES} bytes"),
        ));
    }
    walk(input, 1, "input")
}

fn walk(v: &Value, depth: usize, path: &str) -> Result<()> {
    match v {
        Value::Object(m) => {
            if depth > MAX_INPUT_DEPTH {
                return Err(too_deep(path));
            }
            for (k, c) in m {
                if k.len() > MAX_INPUT_STRING {
                    return Err(SmithersError::new(
                        Code::InvalidInput,
                        format!("a key in {path} exceeds {MAX_INPUT_STRING} bytes"),
                    ));
                }
                walk(c, depth + 1, &format!("{path}.{k}"))?;
            }
        }
        Value::Array(a) => {
            if depth > MAX_INPUT_DEPTH {
                return Err(too_deep(path));
            }
            if a.len() > MAX_INPUT_ARRAY {
                return Err(SmithersError::new(
                    Code::InvalidInput,
                    format!(
                        "{path} has {} items; arrays may have at most {MAX_INPUT_ARRAY}",
                        a.len()
                    ),
                ));
            }
            for (i, c) in a.iter().enumerate() {
                walk(c, depth + 1, &format!("{path}[{i}]"))?;
            }
        }
        Value::String(s) if s.len() > MAX_INPUT_STRING => {
            return Err(SmithersError::new(
                Code::InvalidInput,
                format!(
                    "{path} is {} bytes; strings may be at most {MAX_INPUT_STRING} bytes",
                    s.len()
                ),
            ));
        }
        _ => {}
    }
    Ok(())
}

fn too_deep(path: &str) -> SmithersError {
    SmithersError::new(
        Code::InvalidInput,
        format!("{path} exceeds the maximum nesting depth of {MAX_INPUT_DEPTH}"),
    )
}

/// Checks a run id (the one rule, [`crate::ids::check_run_id`]).
pub fn check_run_id(id: &str) -> Result<()> {
    crate::ids::check_run_id(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!([v]);
        }
        json!({ "a": v })
    }

    #[test]
    fn object_required() {
        assert_eq!(
            check_run_input(&json!([1])).unwrap_err().code,
            Code::InvalidInput
        );
        assert!(check_run_input(&json!({})).is_ok());
    }

    #[test]
    fn depth_boundary() {
        // the object itself is depth 1, so 31 nested arrays reach exactly 32
        assert!(check_run_input(&nested(MAX_INPUT_DEPTH - 1)).is_ok());
        assert!(check_run_input(&nested(MAX_INPUT_DEPTH)).is_err());
    }

    #[test]
    fn array_and_string_boundary() {
        assert!(check_run_input(&json!({"a": vec![0; MAX_INPUT_ARRAY]})).is_ok());
        assert!(check_run_input(&json!({"a": vec![0; MAX_INPUT_ARRAY + 1]})).is_err());
        assert!(check_run_input(&json!({"a": "x".repeat(MAX_INPUT_STRING)})).is_ok());
        assert!(check_run_input(&json!({"a": "x".repeat(MAX_INPUT_STRING + 1)})).is_err());
    }

    #[test]
    fn byte_boundary() {
        // {"a":[ "xxx", ... ]} sized right at the limit and one past it
        let item = "x".repeat(MAX_INPUT_STRING - 100);
        let mut arr = Vec::new();
        while serde_json::to_vec(&json!({ "a": arr })).unwrap().len() + item.len() + 3
            < MAX_INPUT_BYTES
        {
            arr.push(item.clone());
        }
        let base = serde_json::to_vec(&json!({ "a": arr })).unwrap().len();
        let pad = MAX_INPUT_BYTES - base - 3; // `,""` adds 3 bytes plus the string
        let mut ok = arr.clone();
        ok.push("y".repeat(pad));
        assert_eq!(
            serde_json::to_vec(&json!({ "a": ok })).unwrap().len(),
            MAX_INPUT_BYTES
        );
        assert!(check_run_input(&json!({ "a": ok })).is_ok());
        let mut over = arr;
        over.push("y".repeat(pad + 1));
        assert!(check_run_input(&json!({ "a": over })).is_err());
    }

    #[test]
    fn run_ids() {
        assert!(check_run_id("run-1:child:x:0").is_ok());
        assert!(check_run_id(&"a".repeat(256)).is_ok());
        assert!(check_run_id(&"a".repeat(257)).is_err());
        assert!(check_run_id("").is_err());
        assert!(check_run_id("a b").is_err());
    }
}
