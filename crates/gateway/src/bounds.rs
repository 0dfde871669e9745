//! Input bounds of the gateway protocol (gateway-protocol §1.5, §1.10, §5; DESIGN §5).
//!
//! Every walk over a JSON value here is iterative with an explicit stack and stops as soon as a
//! limit is crossed, so hostile input (deep nesting, huge arrays) can neither overflow the Rust
//! stack nor cost more than the limits allow.

use serde_json::{Map, Value};

use crate::error::RpcError;

/// Maximum depth of a whole frame, counting every value (scalars included), root = 1.
pub const MAX_FRAME_DEPTH: usize = 32;
/// Maximum number of items in any array of a frame.
pub const MAX_ARRAY_LENGTH: usize = 256;
/// Maximum length of any string (object keys included) of a frame, in UTF-16 code units.
pub const MAX_STRING_LENGTH: usize = 16384;
/// Maximum length of a method name, in UTF-16 code units.
pub const MAX_METHOD_LENGTH: usize = 64;
/// Maximum length of a frame id, in UTF-16 code units.
pub const MAX_ID_LENGTH: usize = 128;
/// Maximum size of a run input serialized as JSON, in bytes.
pub const MAX_INPUT_BYTES: usize = 1_048_576;
/// Maximum container depth of a run input (scalars do not count, root object = 1).
pub const MAX_INPUT_DEPTH: usize = 32;

const INVALID_INPUT: &str = "INVALID_INPUT";

fn invalid(message: impl Into<String>) -> RpcError {
    RpcError::new(INVALID_INPUT, message)
}

/// Length as JavaScript's `String.prototype.length` counts it, since the limits are upstream's.
fn js_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// One pending step of the frame walk: an object key to measure or a value to visit.
enum FrameItem<'a> {
    Key(&'a str),
    Value(&'a Value, usize),
}

/// Whole-frame bounds (§1.5 step 3): depth ≤ 32 counting every value, arrays ≤ 256 items,
/// strings and object keys ≤ 16384 UTF-16 units. The first violation in document order wins.
pub fn check_frame_bounds(v: &Value) -> Result<(), RpcError> {
    let mut stack = vec![FrameItem::Value(v, 1)];
    while let Some(item) = stack.pop() {
        let (value, depth) = match item {
            FrameItem::Key(k) => {
                check_frame_string(k)?;
                continue;
            }
            FrameItem::Value(value, depth) => (value, depth),
        };
        if depth > MAX_FRAME_DEPTH {
            return Err(invalid(format!(
                "gateway frame exceeds the maximum JSON depth of {MAX_FRAME_DEPTH}."
            )));
        }
        match value {
            Value::String(s) => check_frame_string(s)?,
            Value::Array(items) => {
                if items.len() > MAX_ARRAY_LENGTH {
                    return Err(invalid(format!(
                        "gateway frame contains an array exceeding {MAX_ARRAY_LENGTH} items."
                    )));
                }
                // Reversed so that popping visits the items in document order.
                stack.extend(
                    items
                        .iter()
                        .rev()
                        .map(|item| FrameItem::Value(item, depth + 1)),
                );
            }
            Value::Object(map) => {
                for (k, child) in map.iter().rev() {
                    stack.push(FrameItem::Value(child, depth + 1));
                    stack.push(FrameItem::Key(k));
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    Ok(())
}

fn check_frame_string(s: &str) -> Result<(), RpcError> {
    // A string shorter in bytes than the limit cannot exceed it in UTF-16 units; skip the count.
    if s.len() > MAX_STRING_LENGTH && js_len(s) > MAX_STRING_LENGTH {
        return Err(invalid(format!(
            "gateway frame contains a string exceeding {MAX_STRING_LENGTH} characters."
        )));
    }
    Ok(())
}

/// Method name rules (§1.5 step 6): a string of at most 64 characters matching
/// `^[a-z][a-zA-Z0-9]*(?:\.[a-z][a-zA-Z0-9]*)*$`.
pub fn check_method(v: Option<&Value>) -> Result<String, RpcError> {
    let Some(Value::String(method)) = v else {
        return Err(invalid("Gateway method name must be a string."));
    };
    if js_len(method) > MAX_METHOD_LENGTH {
        return Err(invalid(format!(
            "method exceeds the maximum length of {MAX_METHOD_LENGTH} characters."
        )));
    }
    if !is_valid_method_name(method) {
        return Err(invalid("Gateway method name is invalid."));
    }
    Ok(method.clone())
}

/// Hand-written matcher for the method pattern: dot-separated segments, each a lower-case ASCII
/// letter followed by ASCII letters and digits.
fn is_valid_method_name(method: &str) -> bool {
    method.split('.').all(|segment| {
        let mut bytes = segment.bytes();
        matches!(bytes.next(), Some(b'a'..=b'z')) && bytes.all(|b| b.is_ascii_alphanumeric())
    })
}

/// Frame id rules (§1.5 step 5): a string (empty allowed) of at most 128 characters.
pub fn check_frame_id(v: Option<&Value>) -> Result<String, RpcError> {
    let Some(Value::String(id)) = v else {
        return Err(invalid("Gateway frame id must be a string."));
    };
    check_id_len(id)?;
    Ok(id.clone())
}

/// The id length limit, shared by WS frame ids and HTTP body ids / request ids (§1.3 step 7).
pub fn check_id_len(id: &str) -> Result<(), RpcError> {
    if js_len(id) > MAX_ID_LENGTH {
        return Err(invalid(format!(
            "id exceeds the maximum length of {MAX_ID_LENGTH} characters."
        )));
    }
    Ok(())
}

/// Run input of `runs.create` / `runs.rerun` / `cron.trigger` / webhooks: a missing or null input
/// is `{}`; anything but an object is rejected (DESIGN §5, where upstream silently used `{}`);
/// then the JSON size (≤ 1 MiB) and container depth (≤ 32) bounds, in that order.
pub fn check_run_input(v: Option<&Value>) -> Result<Value, RpcError> {
    let input = match v {
        None | Some(Value::Null) => return Ok(Value::Object(Map::new())),
        Some(input @ Value::Object(_)) => input,
        Some(_) => return Err(invalid("input must be a JSON object")),
    };
    let (bytes, too_deep) = measure_input(input);
    if bytes > MAX_INPUT_BYTES {
        return Err(invalid(format!(
            "Gateway RPC input exceeds {MAX_INPUT_BYTES} bytes."
        )));
    }
    if too_deep {
        return Err(invalid(format!(
            "Gateway RPC input exceeds the maximum nesting depth of {MAX_INPUT_DEPTH}."
        )));
    }
    Ok(input.clone())
}

/// Computes, in one iterative pass, the compact JSON size of `v` in bytes and whether its
/// container depth exceeds the limit. Counting stops once the size is past the limit, and the
/// walk does not descend below the depth limit (the part below still counts towards the size, so
/// the size error keeps its precedence, but by measuring its serialization, not by walking it).
fn measure_input(v: &Value) -> (usize, bool) {
    let mut bytes = 0usize;
    let mut too_deep = false;
    let mut stack = vec![(v, 1usize)];
    while let Some((value, depth)) = stack.pop() {
        if bytes > MAX_INPUT_BYTES {
            break;
        }
        match value {
            container @ (Value::Array(_) | Value::Object(_)) if depth > MAX_INPUT_DEPTH => {
                too_deep = true;
                bytes = bytes.saturating_add(subtree_size_capped(container));
            }
            Value::Array(items) => {
                bytes += 2 + items.len().saturating_sub(1);
                stack.extend(items.iter().map(|item| (item, depth + 1)));
            }
            Value::Object(map) => {
                bytes += 2 + map.len().saturating_sub(1);
                for (k, child) in map {
                    bytes += json_string_size(k) + 1;
                    stack.push((child, depth + 1));
                }
            }
            scalar => bytes += scalar_size(scalar),
        }
    }
    (bytes, too_deep)
}

/// Size of a container found below the depth limit. Its own nesting may be arbitrarily deep, so
/// it is measured with a loop rather than by serializing it (serde_json's serializer recurses).
fn subtree_size_capped(v: &Value) -> usize {
    let mut bytes = 0usize;
    let mut stack = vec![v];
    while let Some(value) = stack.pop() {
        if bytes > MAX_INPUT_BYTES {
            break;
        }
        match value {
            Value::Array(items) => {
                bytes += 2 + items.len().saturating_sub(1);
                stack.extend(items.iter());
            }
            Value::Object(map) => {
                bytes += 2 + map.len().saturating_sub(1);
                for (k, child) in map {
                    bytes += json_string_size(k) + 1;
                    stack.push(child);
                }
            }
            scalar => bytes += scalar_size(scalar),
        }
    }
    bytes
}

fn scalar_size(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::Number(n) => n.to_string().len(),
        Value::String(s) => json_string_size(s),
        Value::Array(_) | Value::Object(_) => 0,
    }
}

/// Bytes of `s` as a JSON string literal, quotes and escapes included (the escapes that both
/// serde_json and JavaScript's `JSON.stringify` use).
fn json_string_size(s: &str) -> usize {
    2 + s
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

/// `asOptionalPositiveInt` (§1.10): absent or null → `None`; otherwise the value converted the
/// way JavaScript's `Number()` does (so `"10"` is accepted) must be finite, > 0 and an integer.
/// Integers beyond `u64::MAX` saturate.
pub fn positive_int(v: Option<&Value>, field: &str) -> Result<Option<u64>, RpcError> {
    let v = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let n = js_number(v);
    if !n.is_finite() || n <= 0.0 {
        return Err(invalid(format!(
            "{field} must be a finite number greater than 0."
        )));
    }
    if n.fract() != 0.0 {
        return Err(invalid(format!(
            "{field} must be an integer greater than 0."
        )));
    }
    // `as` saturates for floats beyond the u64 range, which is the intended behaviour.
    Ok(Some(n as u64))
}

/// JavaScript's `Number(v)` for a JSON value.
fn js_number(v: &Value) -> f64 {
    let mut v = v;
    // `Number([x])` is `Number(String(x))`; unwrap single-item arrays without recursion.
    loop {
        match v {
            Value::Array(items) if items.len() == 1 => match &items[0] {
                Value::Null => return 0.0,
                Value::Bool(_) | Value::Object(_) => return f64::NAN,
                inner => v = inner,
            },
            _ => break,
        }
    }
    match v {
        Value::Null => 0.0,
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) => js_string_to_number(s),
        Value::Array(items) if items.is_empty() => 0.0,
        Value::Array(_) | Value::Object(_) => f64::NAN,
    }
}

/// JavaScript's string-to-number conversion: surrounding whitespace ignored, empty → 0,
/// `Infinity`, `0x`/`0o`/`0b` integers, decimal literals; anything else is NaN.
fn js_string_to_number(s: &str) -> f64 {
    let t = s.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if t.is_empty() {
        return 0.0;
    }
    match t {
        "Infinity" | "+Infinity" => return f64::INFINITY,
        "-Infinity" => return f64::NEG_INFINITY,
        _ => {}
    }
    let radix = match t.get(..2) {
        Some("0x" | "0X") => Some(16),
        Some("0o" | "0O") => Some(8),
        Some("0b" | "0B") => Some(2),
        _ => None,
    };
    if let Some(radix) = radix {
        let digits = &t[2..];
        if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return f64::NAN;
        }
        return digits
            .chars()
            .filter_map(|c| c.to_digit(radix))
            .fold(0.0, |acc, d| acc * f64::from(radix) + f64::from(d));
    }
    if !is_decimal_literal(t) {
        return f64::NAN;
    }
    t.parse::<f64>().unwrap_or(f64::NAN)
}

/// `[+-]? (digits [. digits?] | . digits) ([eE] [+-]? digits)?` — checked by hand because Rust's
/// float parser also accepts `inf`, `nan` and `infinity`, which JavaScript does not.
fn is_decimal_literal(t: &str) -> bool {
    let b = t.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let mut mantissa_digits = i - int_start;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        mantissa_digits += i - frac_start;
    }
    if mantissa_digits == 0 {
        return false;
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(r: Result<impl std::fmt::Debug, RpcError>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => {
                assert_eq!(e.code, "INVALID_INPUT");
                e.message
            }
        }
    }

    /// Nests `leaf` inside `levels` single-item arrays, without recursion.
    fn nest_arrays(levels: usize, leaf: Value) -> Value {
        let mut v = leaf;
        for _ in 0..levels {
            v = Value::Array(vec![v]);
        }
        v
    }

    /// Nests `leaf` inside `levels` objects `{"a": …}`, without recursion.
    fn nest_objects(levels: usize, leaf: Value) -> Value {
        let mut v = leaf;
        for _ in 0..levels {
            let mut m = Map::new();
            m.insert("a".into(), v);
            v = Value::Object(m);
        }
        v
    }

    /// Takes a deep value apart level by level: serde_json's own Drop is recursive and would
    /// overflow the stack on the 100,000-level values of these tests.
    fn dismantle(v: Value) {
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                Value::Array(items) => stack.extend(items),
                Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
                _ => {}
            }
        }
    }

    const DEPTH_MSG: &str = "gateway frame exceeds the maximum JSON depth of 32.";
    const ARRAY_MSG: &str = "gateway frame contains an array exceeding 256 items.";
    const STRING_MSG: &str = "gateway frame contains a string exceeding 16384 characters.";

    #[test]
    fn frame_depth_counts_scalars_and_root() {
        // 31 arrays + the scalar leaf = depth 32.
        assert!(check_frame_bounds(&nest_arrays(31, json!(1))).is_ok());
        assert_eq!(
            msg(check_frame_bounds(&nest_arrays(32, json!(1)))),
            DEPTH_MSG
        );
        // An empty container at depth 32 is fine; one level more is not.
        assert!(check_frame_bounds(&nest_arrays(31, json!([]))).is_ok());
        assert_eq!(
            msg(check_frame_bounds(&nest_arrays(32, json!({})))),
            DEPTH_MSG
        );
        assert!(check_frame_bounds(&nest_objects(31, json!("x"))).is_ok());
        assert_eq!(
            msg(check_frame_bounds(&nest_objects(32, json!(null)))),
            DEPTH_MSG
        );
        assert!(check_frame_bounds(&json!(5)).is_ok());
    }

    #[test]
    fn frame_depth_of_a_realistic_frame() {
        // frame=1, params=2, input=3: params.input may be 30 levels deep itself, scalars included.
        let input = nest_objects(29, json!(true)); // depth 30 on its own
        let frame =
            json!({"type": "req", "id": "1", "method": "runs.create", "params": {"input": input}});
        assert!(check_frame_bounds(&frame).is_ok());
        let input = nest_objects(30, json!(true));
        let frame =
            json!({"type": "req", "id": "1", "method": "runs.create", "params": {"input": input}});
        assert_eq!(msg(check_frame_bounds(&frame)), DEPTH_MSG);
    }

    #[test]
    fn frame_array_length_boundary() {
        assert!(check_frame_bounds(&json!({"a": vec![0; 256]})).is_ok());
        assert_eq!(
            msg(check_frame_bounds(&json!({"a": vec![0; 257]}))),
            ARRAY_MSG
        );
        assert_eq!(
            msg(check_frame_bounds(&Value::Array(vec![json!(null); 257]))),
            ARRAY_MSG
        );
    }

    #[test]
    fn frame_string_length_counts_utf16_units() {
        assert!(check_frame_bounds(&json!("a".repeat(16384))).is_ok());
        assert_eq!(
            msg(check_frame_bounds(&json!("a".repeat(16385)))),
            STRING_MSG
        );
        // 'é' is 2 bytes but 1 unit; '😀' is 4 bytes and 2 units.
        assert!(check_frame_bounds(&json!("é".repeat(16384))).is_ok());
        assert_eq!(
            msg(check_frame_bounds(&json!("é".repeat(16385)))),
            STRING_MSG
        );
        assert!(check_frame_bounds(&json!("😀".repeat(8192))).is_ok());
        assert_eq!(
            msg(check_frame_bounds(&json!(format!(
                "{}a",
                "😀".repeat(8192)
            )))),
            STRING_MSG
        );
        // Strings nested in arrays and object keys count too.
        assert_eq!(
            msg(check_frame_bounds(&json!([["a".repeat(16385)]]))),
            STRING_MSG
        );
        let mut m = Map::new();
        m.insert("k".repeat(16384), json!(1));
        assert!(check_frame_bounds(&Value::Object(m.clone())).is_ok());
        m.insert("k".repeat(16385), json!(1));
        assert_eq!(msg(check_frame_bounds(&Value::Object(m))), STRING_MSG);
    }

    #[test]
    fn frame_first_violation_in_document_order_wins() {
        let v = json!([vec![0; 257], "a".repeat(16385)]);
        assert_eq!(msg(check_frame_bounds(&v)), ARRAY_MSG);
        let v = json!(["a".repeat(16385), vec![0; 257]]);
        assert_eq!(msg(check_frame_bounds(&v)), STRING_MSG);
    }

    #[test]
    fn hostile_deep_nesting_does_not_crash() {
        let v = nest_arrays(100_000, json!(1));
        assert_eq!(msg(check_frame_bounds(&v)), DEPTH_MSG);
        let input = nest_objects(100_000, json!(1));
        assert_eq!(
            msg(check_run_input(Some(&input))),
            "Gateway RPC input exceeds the maximum nesting depth of 32."
        );
        dismantle(v);
        dismantle(input);
    }

    #[test]
    fn method_names() {
        for ok in [
            "health",
            "runs.list",
            "getNodeOutput",
            "devtools.getNodeOutput",
            "a",
            "a1.b2C.c",
            "x9Y",
        ] {
            assert_eq!(check_method(Some(&json!(ok))).as_deref(), Ok(ok), "{ok}");
        }
        for bad in [
            "Runs.list",
            "runs_list",
            "runs..x",
            "runs.",
            ".runs",
            "1x",
            "",
            "runs.1",
            "runs.X",
            "rüns",
            "a b",
        ] {
            assert_eq!(
                msg(check_method(Some(&json!(bad)))),
                "Gateway method name is invalid.",
                "{bad}"
            );
        }
        for not_string in [
            None,
            Some(json!(null)),
            Some(json!(1)),
            Some(json!(["runs.list"])),
        ] {
            assert_eq!(
                msg(check_method(not_string.as_ref())),
                "Gateway method name must be a string."
            );
        }
        assert!(check_method(Some(&json!("a".repeat(64)))).is_ok());
        assert_eq!(
            msg(check_method(Some(&json!("a".repeat(65))))),
            "method exceeds the maximum length of 64 characters."
        );
        // The length check comes before the pattern.
        assert_eq!(
            msg(check_method(Some(&json!("_".repeat(65))))),
            "method exceeds the maximum length of 64 characters."
        );
    }

    #[test]
    fn frame_ids() {
        assert_eq!(check_frame_id(Some(&json!(""))).as_deref(), Ok(""));
        assert_eq!(check_frame_id(Some(&json!("abc"))).as_deref(), Ok("abc"));
        for not_string in [None, Some(json!(null)), Some(json!(7)), Some(json!({}))] {
            assert_eq!(
                msg(check_frame_id(not_string.as_ref())),
                "Gateway frame id must be a string."
            );
        }
        let id_msg = "id exceeds the maximum length of 128 characters.";
        assert!(check_frame_id(Some(&json!("i".repeat(128)))).is_ok());
        assert_eq!(msg(check_frame_id(Some(&json!("i".repeat(129))))), id_msg);
        assert!(check_id_len(&"é".repeat(128)).is_ok());
        assert_eq!(msg(check_id_len(&"😀".repeat(65))), id_msg);
    }

    const BYTES_MSG: &str = "Gateway RPC input exceeds 1048576 bytes.";
    const NESTING_MSG: &str = "Gateway RPC input exceeds the maximum nesting depth of 32.";

    #[test]
    fn run_input_shape() {
        assert_eq!(check_run_input(None), Ok(json!({})));
        assert_eq!(check_run_input(Some(&json!(null))), Ok(json!({})));
        let v = json!({"items": [{"child": {"leaf": true}}]});
        assert_eq!(check_run_input(Some(&v)), Ok(v));
        for bad in [json!([]), json!("x"), json!(3), json!(false)] {
            assert_eq!(
                msg(check_run_input(Some(&bad))),
                "input must be a JSON object"
            );
        }
    }

    #[test]
    fn run_input_size_boundary() {
        // {"s":"…"} is 8 bytes of framing around the string's content.
        let at_limit = json!({"s": "x".repeat(MAX_INPUT_BYTES - 8)});
        assert_eq!(
            serde_json::to_vec(&at_limit).map(|b| b.len()).ok(),
            Some(MAX_INPUT_BYTES)
        );
        assert!(check_run_input(Some(&at_limit)).is_ok());
        let over = json!({"s": "x".repeat(MAX_INPUT_BYTES - 7)});
        assert_eq!(msg(check_run_input(Some(&over))), BYTES_MSG);
        // Size wins over depth when both are exceeded.
        let both = json!({"s": "x".repeat(MAX_INPUT_BYTES), "d": nest_objects(40, json!(1))});
        assert_eq!(msg(check_run_input(Some(&both))), BYTES_MSG);
    }

    #[test]
    fn run_input_size_matches_serde_json() {
        let v = json!({
            "a": [1, 2.5, -3, 1e300, null, true, false, "q\"\\\n\t\u{1}é😀"],
            "b": {"": {}, "c": []},
            "k\u{7}": "v"
        });
        let expected = serde_json::to_vec(&v).map(|b| b.len()).unwrap_or(0);
        assert_eq!(measure_input(&v), (expected, false));
        let deep = json!({"x": nest_objects(40, json!([1, "two", {"three": 3}]))});
        let expected = serde_json::to_vec(&deep).map(|b| b.len()).unwrap_or(0);
        assert_eq!(measure_input(&deep), (expected, true));
    }

    #[test]
    fn run_input_depth_counts_containers_only() {
        // Root object + 31 nested objects = 32 containers; the scalar leaf does not count.
        let v = nest_objects(32, json!(1));
        assert!(check_run_input(Some(&v)).is_ok());
        let v = nest_objects(33, json!(1));
        assert_eq!(msg(check_run_input(Some(&v))), NESTING_MSG);
        // An empty container at level 33 counts.
        let v = nest_objects(32, json!([]));
        assert_eq!(msg(check_run_input(Some(&v))), NESTING_MSG);
        let v = nest_objects(1, nest_arrays(31, json!("leaf")));
        assert!(check_run_input(Some(&v)).is_ok());
    }

    #[test]
    fn positive_ints() {
        let f = |v: Value| positive_int(Some(&v), "limit");
        assert_eq!(positive_int(None, "limit"), Ok(None));
        assert_eq!(f(json!(null)), Ok(None));
        assert_eq!(f(json!(1)), Ok(Some(1)));
        assert_eq!(f(json!(50)), Ok(Some(50)));
        assert_eq!(f(json!(10.0)), Ok(Some(10)));
        assert_eq!(f(json!("10")), Ok(Some(10)));
        assert_eq!(f(json!(" 7 ")), Ok(Some(7)));
        assert_eq!(f(json!("1e2")), Ok(Some(100)));
        assert_eq!(f(json!("0x10")), Ok(Some(16)));
        assert_eq!(f(json!(true)), Ok(Some(1)));
        assert_eq!(f(json!([3])), Ok(Some(3)));
        assert_eq!(f(json!([["4"]])), Ok(Some(4)));
        assert_eq!(f(json!(1e300)), Ok(Some(u64::MAX)));
        let finite = "limit must be a finite number greater than 0.";
        for bad in [
            json!(0),
            json!(-1),
            json!("0"),
            json!(""),
            json!("abc"),
            json!("Infinity"),
            json!("inf"),
            json!("NaN"),
            json!("1e"),
            json!("0x"),
            json!(false),
            json!([]),
            json!([1, 2]),
            json!({}),
            json!(-0.5),
        ] {
            assert_eq!(msg(f(bad.clone())), finite, "{bad}");
        }
        let integer = "limit must be an integer greater than 0.";
        for bad in [json!(1.5), json!("2.5"), json!(0.1), json!(".5")] {
            assert_eq!(msg(f(bad.clone())), integer, "{bad}");
        }
        assert_eq!(
            msg(positive_int(Some(&json!(0)), "afterFrameNo")),
            "afterFrameNo must be a finite number greater than 0."
        );
    }
}
