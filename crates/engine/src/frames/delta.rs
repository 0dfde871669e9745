//! JSON deltas between two documents (`{"version":1,"ops":[…]}`), used to store frames
//! compactly between keyframes. Ops: `set`, `insert`, `remove` with a path of object keys and
//! array indices from the root.

use serde_json::{Map, Value, json};

/// Computes the ops that turn `prev` into `next`.
pub fn encode(prev: &Value, next: &Value) -> Value {
    let mut ops = Vec::new();
    diff(prev, next, &mut Vec::new(), &mut ops);
    json!({ "version": 1, "ops": ops })
}

fn node_hint(v: &Value) -> Option<Value> {
    v.get("props").and_then(|p| p.get("id")).cloned()
}

fn op(kind: &str, path: &[Value], value: Option<&Value>) -> Value {
    let mut m = Map::new();
    m.insert("op".into(), Value::String(kind.into()));
    m.insert("path".into(), Value::Array(path.to_vec()));
    if let Some(v) = value {
        m.insert("value".into(), v.clone());
        if let Some(id) = node_hint(v) {
            m.insert("nodeId".into(), id);
        }
    }
    Value::Object(m)
}

fn diff(a: &Value, b: &Value, path: &mut Vec<Value>, ops: &mut Vec<Value>) {
    if a == b {
        return;
    }
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            // serde_json maps are sorted, so keys come out in sorted order
            let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                path.push(Value::String(k.clone()));
                match (ma.get(k), mb.get(k)) {
                    (Some(_), None) => ops.push(op("remove", path, None)),
                    (None, Some(v)) => ops.push(op("set", path, Some(v))),
                    (Some(x), Some(y)) => diff(x, y, path, ops),
                    (None, None) => {}
                }
                path.pop();
            }
        }
        (Value::Array(xa), Value::Array(xb)) => {
            let mut pre = 0;
            while pre < xa.len() && pre < xb.len() && xa[pre] == xb[pre] {
                pre += 1;
            }
            let mut suf = 0;
            while suf < xa.len() - pre
                && suf < xb.len() - pre
                && xa[xa.len() - 1 - suf] == xb[xb.len() - 1 - suf]
            {
                suf += 1;
            }
            let wa = &xa[pre..xa.len() - suf];
            let wb = &xb[pre..xb.len() - suf];
            if wa.len() == wb.len() {
                for (i, (x, y)) in wa.iter().zip(wb).enumerate() {
                    path.push(Value::from(pre + i));
                    diff(x, y, path, ops);
                    path.pop();
                }
            } else {
                for i in (0..wa.len()).rev() {
                    path.push(Value::from(pre + i));
                    ops.push(op("remove", path, None));
                    path.pop();
                }
                for (i, v) in wb.iter().enumerate() {
                    path.push(Value::from(pre + i));
                    ops.push(op("insert", path, Some(v)));
                    path.pop();
                }
            }
        }
        _ => ops.push(op("set", path, Some(b))),
    }
}

/// Applies a delta to a document. Errors describe the first op that does not fit.
pub fn apply(base: &Value, delta: &Value) -> Result<Value, String> {
    let mut doc = base.clone();
    let ops = delta
        .get("ops")
        .and_then(Value::as_array)
        .ok_or("delta has no `ops` array")?;
    for (n, o) in ops.iter().enumerate() {
        let kind = o
            .get("op")
            .and_then(Value::as_str)
            .ok_or(format!("op {n}: missing `op`"))?;
        let path = o
            .get("path")
            .and_then(Value::as_array)
            .ok_or(format!("op {n}: missing `path`"))?;
        let value = o.get("value").cloned().unwrap_or(Value::Null);
        if path.is_empty() {
            if kind == "set" {
                doc = value;
                continue;
            }
            return Err(format!("op {n}: `{kind}` at the root"));
        }
        let (last, parents) = path.split_last().ok_or(format!("op {n}: empty path"))?;
        let mut cur = &mut doc;
        for seg in parents {
            cur = match (cur, seg) {
                (Value::Object(m), Value::String(k)) => {
                    m.get_mut(k).ok_or(format!("op {n}: no key `{k}`"))?
                }
                (Value::Array(a), Value::Number(i)) => {
                    let i = i.as_u64().ok_or(format!("op {n}: bad index"))? as usize;
                    a.get_mut(i)
                        .ok_or(format!("op {n}: index {i} out of range"))?
                }
                _ => return Err(format!("op {n}: path does not match the document")),
            };
        }
        match (cur, last, kind) {
            (Value::Object(m), Value::String(k), "set") => {
                m.insert(k.clone(), value);
            }
            (Value::Object(m), Value::String(k), "remove") => {
                m.remove(k);
            }
            (Value::Array(a), Value::Number(i), k) => {
                let i = i.as_u64().ok_or(format!("op {n}: bad index"))? as usize;
                match k {
                    "set" if i < a.len() => a[i] = value,
                    "insert" if i <= a.len() => a.insert(i, value),
                    "remove" if i < a.len() => {
                        a.remove(i);
                    }
                    _ => return Err(format!("op {n}: `{k}` at index {i} out of range")),
                }
            }
            _ => return Err(format!("op {n}: `{kind}` does not fit the document")),
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(a: Value, b: Value) {
        let d = encode(&a, &b);
        assert_eq!(apply(&a, &d).unwrap(), b, "delta {d}");
    }

    #[test]
    fn roundtrips() {
        roundtrip(json!({"a": 1}), json!({"a": 2, "b": [1, 2]}));
        roundtrip(json!([1, 2, 3, 4]), json!([1, 9, 9, 9, 4]));
        roundtrip(json!([1, 2, 3, 4]), json!([1, 4]));
        roundtrip(
            json!({"c": [{"x": 1}, {"y": 2}]}),
            json!({"c": [{"x": 1}, {"y": 3}, {"z": 1}]}),
        );
        roundtrip(json!(1), json!("s"));
        roundtrip(json!({"k": {"x": 1}}), json!({}));
    }

    #[test]
    fn identical_is_empty() {
        assert_eq!(
            encode(&json!({"a": [1]}), &json!({"a": [1]})),
            json!({"version": 1, "ops": []})
        );
    }

    #[test]
    fn bad_delta_is_an_error() {
        assert!(
            apply(
                &json!({}),
                &json!({"ops": [{"op": "remove", "path": ["a", "b"]}]})
            )
            .is_err()
        );
        assert!(
            apply(
                &json!([]),
                &json!({"ops": [{"op": "insert", "path": [5], "value": 1}]})
            )
            .is_err()
        );
        assert!(apply(&json!({}), &json!({})).is_err());
    }
}
