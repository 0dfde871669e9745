//! Reading a webhook payload (gateway-protocol §3 steps 7–8): JSON parsing, dotted paths into
//! the payload, ids from scalars, and a new run's input.

use serde_json::{Map, Value, json};

/// Parses a webhook body: empty (or blank) is `{}`; `None` when it is not JSON.
pub fn parse_payload(body: &[u8]) -> Option<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Some(Value::Object(Map::new()));
    }
    serde_json::from_slice(body).ok()
}

/// §3 step 8: no or blank path → the whole payload; otherwise the trimmed path split on `.`
/// (empty segments ignored) descends objects by key and arrays by non-negative integer index
/// (`"1"`, `"01"`, `"1.0"`-style numbers as JavaScript's `Number` reads them); anything else
/// is `None`.
pub fn read_path_value<'a>(payload: &'a Value, path: Option<&str>) -> Option<&'a Value> {
    let path = match path.map(str::trim) {
        None | Some("") => return Some(payload),
        Some(p) => p,
    };
    let mut cur = payload;
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        cur = match cur {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(array_index(seg)?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A path segment as an array index: a finite, non-negative integer.
fn array_index(seg: &str) -> Option<usize> {
    let t = seg.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let n: f64 = t.parse().ok()?;
    if !n.is_finite() || n < 0.0 || n.fract() != 0.0 || n > usize::MAX as f64 {
        return None;
    }
    Some(n as usize)
}

/// §3 step 8 scalar rule: strings trimmed (empty → `None`), finite numbers as JavaScript's
/// `String(n)` prints them, booleans `"true"`/`"false"`; anything else `None`.
pub fn scalar_id(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => {
            let t = s.trim();
            (!t.is_empty()).then(|| t.to_string())
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i.to_string())
            } else if let Some(u) = n.as_u64() {
                Some(u.to_string())
            } else {
                n.as_f64().filter(|f| f.is_finite()).map(js_number)
            }
        }
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// JavaScript's `String(n)` for a finite double.
fn js_number(f: f64) -> String {
    if f == 0.0 {
        return "0".to_string();
    }
    let a = f.abs();
    if (1e-6..1e21).contains(&a) {
        // Rust's shortest round-trip digits match JavaScript's; only the notation differs.
        return format!("{f}");
    }
    let s = format!("{f:e}");
    match s.split_once('e') {
        Some((mant, exp)) if !exp.starts_with('-') => format!("{mant}e+{exp}"),
        _ => s,
    }
}

/// A new run's input: an object as is, anything else wrapped as `{"payload": v or null}`.
pub fn run_input(v: Option<&Value>) -> Value {
    match v {
        Some(o @ Value::Object(_)) => o.clone(),
        Some(other) => json!({ "payload": other }),
        None => json!({ "payload": null }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_extraction() {
        let p = json!({"a": {"b": [10, {"c": "x"}, [true]]}, "": 5, "n": null});
        assert_eq!(read_path_value(&p, None), Some(&p));
        assert_eq!(read_path_value(&p, Some("   ")), Some(&p));
        assert_eq!(read_path_value(&p, Some("a.b.0")), Some(&json!(10)));
        assert_eq!(read_path_value(&p, Some(" a.b.1.c ")), Some(&json!("x")));
        assert_eq!(
            read_path_value(&p, Some("a..b...2.0")),
            Some(&json!(true)),
            "blank segments"
        );
        assert_eq!(
            read_path_value(&p, Some("a.b.01")),
            Some(&json!({"c": "x"}))
        );
        assert_eq!(
            read_path_value(&p, Some("a.b.1.0")),
            None,
            "index into object"
        );
        assert_eq!(read_path_value(&p, Some("a.b.-1")), None, "negative");
        assert_eq!(
            read_path_value(&p, Some("a.b.1.5")),
            None,
            "1.5 is two segments: 1 then 5"
        );
        assert_eq!(read_path_value(&p, Some("a.b.x")), None, "non-integer");
        assert_eq!(read_path_value(&p, Some("a.b.3")), None, "out of range");
        assert_eq!(
            read_path_value(&p, Some("a.b.0.c")),
            None,
            "descend into number"
        );
        assert_eq!(read_path_value(&p, Some("missing")), None);
        assert_eq!(read_path_value(&p, Some("n")), Some(&Value::Null));
        assert_eq!(read_path_value(&p, Some("n.x")), None);
        assert_eq!(read_path_value(&json!([1, 2]), Some("1")), Some(&json!(2)));
        assert_eq!(array_index("1e0"), None);
        assert_eq!(array_index("+1"), None);
        assert_eq!(array_index("2.0"), Some(2));
        assert_eq!(array_index("2.5"), None);
    }

    #[test]
    fn scalar_rules() {
        assert_eq!(scalar_id(Some(&json!("  abc "))), Some("abc".into()));
        assert_eq!(scalar_id(Some(&json!("   "))), None);
        assert_eq!(scalar_id(Some(&json!(""))), None);
        assert_eq!(scalar_id(Some(&json!(42))), Some("42".into()));
        assert_eq!(scalar_id(Some(&json!(-7))), Some("-7".into()));
        assert_eq!(scalar_id(Some(&json!(1.5))), Some("1.5".into()));
        assert_eq!(scalar_id(Some(&json!(2.0))), Some("2".into()));
        assert_eq!(scalar_id(Some(&json!(1e21))), Some("1e+21".into()));
        assert_eq!(scalar_id(Some(&json!(1.5e-7))), Some("1.5e-7".into()));
        assert_eq!(
            scalar_id(Some(&json!(u64::MAX))),
            Some(u64::MAX.to_string())
        );
        assert_eq!(scalar_id(Some(&json!(true))), Some("true".into()));
        assert_eq!(scalar_id(Some(&json!(false))), Some("false".into()));
        assert_eq!(scalar_id(Some(&json!({"a": 1}))), None);
        assert_eq!(scalar_id(Some(&json!([1]))), None);
        assert_eq!(scalar_id(Some(&Value::Null)), None);
        assert_eq!(scalar_id(None), None);
    }

    #[test]
    fn run_input_wraps_non_objects() {
        assert_eq!(run_input(Some(&json!({"a": 1}))), json!({"a": 1}));
        assert_eq!(run_input(Some(&json!([1]))), json!({"payload": [1]}));
        assert_eq!(run_input(Some(&json!("s"))), json!({"payload": "s"}));
        assert_eq!(run_input(Some(&Value::Null)), json!({"payload": null}));
        assert_eq!(run_input(None), json!({"payload": null}));
    }

    #[test]
    fn payload_parsing() {
        assert_eq!(parse_payload(b""), Some(json!({})));
        assert_eq!(parse_payload(b" \n"), Some(json!({})));
        assert_eq!(parse_payload(b"[1]"), Some(json!([1])));
        assert_eq!(parse_payload(b"{"), None);
    }
}
