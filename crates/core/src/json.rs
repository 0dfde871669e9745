//! JSON text from values on the hot paths.
//!
//! `Value::to_string()` goes through `fmt::Display`: every token is a separate `write_str` into
//! a `String` that starts empty and grows by reallocation. Serializing straight into a byte
//! buffer with room for a typical event is about 2.5 times faster, and every step of every run
//! turns several values into text (event payloads, node rows, snapshots, frames).

use serde_json::Value;

/// Room for a typical event payload or node row, so most values need no reallocation.
const TYPICAL: usize = 256;

/// The compact JSON text of `v`, exactly what `v.to_string()` gives.
pub fn text(v: &Value) -> String {
    let mut buf = Vec::with_capacity(TYPICAL);
    match serde_json::to_writer(&mut buf, v) {
        // serde_json writes only valid UTF-8
        Ok(()) => String::from_utf8(buf).unwrap_or_else(|_| v.to_string()),
        // a `Value` has string keys and finite numbers, so this does not happen
        Err(_) => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_matches_display() {
        let big = "x".repeat(5000);
        for v in [
            json!(null),
            json!({"type": "NodeFinished", "runId": "r", "n": 1.5, "esc": "a\"b\\c\u{1}é", "nested": [1, {"k": []}]}),
            json!(big),
            json!([]),
        ] {
            assert_eq!(text(&v), v.to_string());
        }
    }
}
