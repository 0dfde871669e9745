//! Reading method parameters: required strings, identifiers under the one identifier rule,
//! non-negative integers, and the refusal of NUL bytes in anything stored as text.

use crate::error::RpcError;
use crate::gateway::Gateway;
use serde_json::Value;
use smithers_core::ids;
use smithers_store::RunRow;

/// A required string parameter; missing or not a string → `INVALID_REQUEST msg` (upstream's
/// wording for each method).
pub fn req_str<'a>(p: &'a Value, key: &str, msg: &str) -> Result<&'a str, RpcError> {
    p.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::new("INVALID_REQUEST", msg))
}

/// A required run id: missing → `INVALID_REQUEST msg`; not an id that `runs.create` could have
/// made → `INVALID_INPUT` naming the field and the rule.
pub fn run_id<'a>(p: &'a Value, key: &str, msg: &str) -> Result<&'a str, RpcError> {
    let id = req_str(p, key, msg)?;
    check_run_id(key, id)?;
    Ok(id)
}

/// An optional run id (a string, else absent), checked like [`run_id`].
pub fn opt_run_id<'a>(p: &'a Value, key: &str) -> Result<Option<&'a str>, RpcError> {
    match p.get(key).and_then(Value::as_str) {
        Some(id) => {
            check_run_id(key, id)?;
            Ok(Some(id))
        }
        None => Ok(None),
    }
}

/// The one run-id rule ([`smithers_core::ids::check_run_id`]) as an `INVALID_INPUT` error.
pub fn check_run_id(key: &str, id: &str) -> Result<(), RpcError> {
    ids::check_run_id(id).map_err(|e| RpcError::new("INVALID_INPUT", format!("{key}: {e}")))
}

/// A cron id under the identifier rule ([`smithers_core::ids::check_cron_id`]).
pub fn check_cron_id(key: &str, id: &str) -> Result<(), RpcError> {
    ids::check_cron_id(id).map_err(|e| RpcError::new("INVALID_INPUT", format!("{key}: {e}")))
}

/// The run row, or `NOT_FOUND "Run not found: <id>"`.
pub async fn ensure_run(gw: &Gateway, id: &str) -> Result<RunRow, RpcError> {
    gw.store.get_run(id).await?.ok_or_else(|| not_found_run(id))
}

pub fn not_found_run(id: &str) -> RpcError {
    RpcError::new("NOT_FOUND", format!("Run not found: {id}"))
}

/// A non-negative integer parameter (0 allowed; DESIGN §5). Numeric strings are accepted, as
/// upstream's `Number(v)`.
pub fn non_negative(v: Option<&Value>, field: &str) -> Result<Option<i64>, RpcError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => {
            let n = match x {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match n {
                Some(n)
                    if n.is_finite()
                        && n >= 0.0
                        && n.fract() == 0.0
                        && n <= 9.007_199_254_740_991e15 =>
                {
                    Ok(Some(n as i64))
                }
                Some(n) if n.is_finite() && n >= 0.0 => Err(RpcError::new(
                    "INVALID_INPUT",
                    format!("{field} must be an integer greater than or equal to 0."),
                )),
                _ => Err(RpcError::new(
                    "INVALID_INPUT",
                    format!("{field} must be a finite number greater than or equal to 0."),
                )),
            }
        }
    }
}

/// Parameters whose value is a JSON document stored serialized (where a NUL is an ordinary
/// `\u0000` escape); every other string is stored as text, where a NUL byte is refused by
/// PostgreSQL and truncates C strings.
const JSON_DOCUMENTS: &[&str] = &["input", "data", "decision"];

/// Refuses NUL bytes in parameter strings (ids, names, notes) with `INVALID_INPUT` naming the
/// parameter, instead of letting storage fail with a server error.
pub fn check_no_nul(params: &Value) -> Result<(), RpcError> {
    let Value::Object(m) = params else {
        return Ok(());
    };
    for (k, v) in m {
        if JSON_DOCUMENTS.contains(&k.as_str()) {
            continue;
        }
        if k.contains('\0') || has_nul(v) {
            return Err(RpcError::new(
                "INVALID_INPUT",
                format!("{} must not contain NUL bytes.", printable(k)),
            ));
        }
    }
    Ok(())
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// A parameter name fit for an error message: NULs shown as `\0`, long names cut.
fn printable(k: &str) -> String {
    let mut s: String = k.chars().take(64).collect();
    s = s.replace('\0', "\\0");
    if k.chars().count() > 64 {
        s.push('…');
    }
    s
}
