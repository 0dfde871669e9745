//! Webhook helpers (gateway-protocol §3): configuration (`[workflows.webhook]`), signature
//! verification and payload path extraction. The HTTP handler lives in `webhooks`.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2_010::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Default signature header (lower case).
pub const DEFAULT_SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Default signature prefix.
pub const DEFAULT_SIGNATURE_PREFIX: &str = "sha256=";

/// `signal = {...}`: deliver a signal to waiting runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalConfig {
    pub name: String,
    #[serde(default)]
    pub correlation_id_path: Option<String>,
    #[serde(default)]
    pub payload_path: Option<String>,
    #[serde(default)]
    pub run_id_path: Option<String>,
}

/// `run = {...}`: start a run when no signal was delivered.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunToml {
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub input_path: Option<String>,
}

/// The `[workflows.webhook]` table as written (DESIGN §4), before the secret is resolved.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookToml {
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub signature_header: Option<String>,
    #[serde(default)]
    pub signature_prefix: Option<String>,
    #[serde(default)]
    pub signal: Option<SignalConfig>,
    #[serde(default)]
    pub run: Option<RunToml>,
}

impl std::fmt::Debug for WebhookToml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookToml")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .field("signature_header", &self.signature_header)
            .field("signature_prefix", &self.signature_prefix)
            .field("signal", &self.signal)
            .field("run", &self.run)
            .finish()
    }
}

impl WebhookToml {
    /// Resolves the secret (from `secret`, or the variable named by `secret_env`) and checks
    /// the table; errors name the offending key.
    pub fn build(self) -> Result<WebhookConfig, String> {
        self.build_with(|name| std::env::var(name).ok())
    }

    /// [`build`](Self::build) with an explicit environment lookup.
    pub fn build_with(self, env: impl Fn(&str) -> Option<String>) -> Result<WebhookConfig, String> {
        let secret = match (self.secret, self.secret_env) {
            (Some(_), Some(_)) => {
                return Err("set only one of `secret` and `secret_env`".to_string());
            }
            (None, None) => return Err("`secret` or `secret_env` is required".to_string()),
            (Some(s), None) => {
                if s.trim().is_empty() {
                    return Err("`secret` is empty".to_string());
                }
                s
            }
            (None, Some(var)) => match env(&var) {
                Some(s) if !s.trim().is_empty() => s,
                Some(_) => {
                    return Err(format!(
                        "`secret_env`: environment variable `{var}` is empty"
                    ));
                }
                None => {
                    return Err(format!(
                        "`secret_env`: environment variable `{var}` is not set"
                    ));
                }
            },
        };
        let signature_header = self
            .signature_header
            .unwrap_or_else(|| DEFAULT_SIGNATURE_HEADER.to_string())
            .trim()
            .to_ascii_lowercase();
        if signature_header.is_empty() {
            return Err("`signature_header` is empty".to_string());
        }
        // The header value is lower-cased before comparison, so the prefix must be too.
        let signature_prefix = self
            .signature_prefix
            .unwrap_or_else(|| DEFAULT_SIGNATURE_PREFIX.to_string())
            .to_lowercase();
        let signal = match self.signal {
            Some(mut s) => {
                s.name = s.name.trim().to_string();
                if s.name.is_empty() {
                    return Err("`signal.name` is empty".to_string());
                }
                Some(s)
            }
            None => None,
        };
        let (run_enabled, input_path) = match self.run {
            Some(r) => (r.enabled.unwrap_or(true), r.input_path),
            None => (true, None),
        };
        if signal.is_none() && !run_enabled {
            return Err(
                "enable signal delivery (`signal`) or run creation (`run.enabled`)".to_string(),
            );
        }
        Ok(WebhookConfig {
            secret,
            signature_header,
            signature_prefix,
            signal,
            run_enabled,
            input_path,
        })
    }
}

/// A workflow's resolved webhook configuration. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "WebhookToml")]
pub struct WebhookConfig {
    pub secret: String,
    /// Lower case.
    pub signature_header: String,
    pub signature_prefix: String,
    pub signal: Option<SignalConfig>,
    pub run_enabled: bool,
    pub input_path: Option<String>,
}

impl TryFrom<WebhookToml> for WebhookConfig {
    type Error = String;
    fn try_from(t: WebhookToml) -> Result<Self, String> {
        t.build()
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &"<redacted>")
            .field("signature_header", &self.signature_header)
            .field("signature_prefix", &self.signature_prefix)
            .field("signal", &self.signal)
            .field("run_enabled", &self.run_enabled)
            .field("input_path", &self.input_path)
            .finish()
    }
}

impl WebhookConfig {
    /// Parses and resolves a `[workflows.webhook]` TOML table; errors name the key.
    pub fn from_toml(v: toml::Value) -> Result<Self, String> {
        v.try_into::<WebhookToml>()
            .map_err(|e| e.to_string().trim().to_string())?
            .build()
    }

    /// The run id at `signal.run_id_path` (none without that path).
    pub fn explicit_run_id(&self, payload: &Value) -> Option<String> {
        let path = self.signal.as_ref()?.run_id_path.as_deref()?;
        scalar_id(read_path_value(payload, Some(path)))
    }

    /// The correlation id at `signal.correlation_id_path` (none without that path).
    pub fn correlation_id(&self, payload: &Value) -> Option<String> {
        let path = self.signal.as_ref()?.correlation_id_path.as_deref()?;
        scalar_id(read_path_value(payload, Some(path)))
    }

    /// The signal payload: the value at `signal.payload_path`, the whole payload by default.
    pub fn signal_payload<'a>(&self, payload: &'a Value) -> Option<&'a Value> {
        let path = self.signal.as_ref().and_then(|s| s.payload_path.as_deref());
        read_path_value(payload, path)
    }

    /// The input of a new run: the value at `run.input_path` (whole payload by default),
    /// wrapped by [`run_input`].
    pub fn run_input(&self, payload: &Value) -> Value {
        run_input(read_path_value(payload, self.input_path.as_deref()))
    }
}

/// `prefix + lowercase hex HMAC-SHA256(secret trimmed, body)`: what a sender puts in the
/// signature header.
pub fn sign(cfg: &WebhookConfig, body: &[u8]) -> String {
    match HmacSha256::new_from_slice(cfg.secret.trim().as_bytes()) {
        Ok(mut mac) => {
            mac.update(body);
            format!(
                "{}{}",
                cfg.signature_prefix,
                hex::encode(mac.finalize().into_bytes())
            )
        }
        Err(_) => String::new(),
    }
}

/// §3 step 6: the header value, trimmed and lower-cased, must be exactly the prefix followed by
/// the lowercase hex HMAC-SHA256 of the body keyed with the trimmed secret. The digest is
/// compared in constant time; a missing header, an empty secret or a wrong length fails.
pub fn verify_signature(cfg: &WebhookConfig, header_value: Option<&str>, body: &[u8]) -> bool {
    let Some(header) = header_value else {
        return false;
    };
    let secret = cfg.secret.trim();
    if secret.is_empty() {
        return false;
    }
    let header = header.trim().to_lowercase();
    let Some(hex_digest) = header.strip_prefix(cfg.signature_prefix.as_str()) else {
        return false;
    };
    // 32 bytes as lowercase hex; `hex::decode` alone would also accept upper case.
    if hex_digest.len() != 64
        || !hex_digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return false;
    }
    let Ok(digest) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&digest).is_ok()
}

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

    fn cfg(secret: &str, prefix: &str) -> WebhookConfig {
        WebhookConfig {
            secret: secret.into(),
            signature_header: DEFAULT_SIGNATURE_HEADER.into(),
            signature_prefix: prefix.into(),
            signal: None,
            run_enabled: true,
            input_path: None,
        }
    }

    /// HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog") (RFC test vector).
    const FOX: &str = "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8";
    const FOX_BODY: &[u8] = b"The quick brown fox jumps over the lazy dog";

    #[test]
    fn signature_right_and_wrong() {
        let c = cfg("key", "sha256=");
        assert_eq!(sign(&c, FOX_BODY), format!("sha256={FOX}"));
        assert!(verify_signature(
            &c,
            Some(&format!("sha256={FOX}")),
            FOX_BODY
        ));
        assert!(
            verify_signature(&c, Some(&format!("  sha256={FOX}\n")), FOX_BODY),
            "trimmed"
        );
        assert!(
            verify_signature(
                &c,
                Some(&format!("SHA256={}", FOX.to_uppercase())),
                FOX_BODY
            ),
            "header is lower-cased"
        );
        let mut wrong = FOX.to_string();
        wrong.replace_range(0..1, "0");
        assert!(!verify_signature(
            &c,
            Some(&format!("sha256={wrong}")),
            FOX_BODY
        ));
        assert!(!verify_signature(
            &c,
            Some(&format!("sha256={FOX}")),
            b"other body"
        ));
        assert!(
            !verify_signature(&c, Some(&format!("sha256={}", &FOX[..62])), FOX_BODY),
            "short"
        );
        assert!(
            !verify_signature(&c, Some(&format!("sha256={FOX}00")), FOX_BODY),
            "long"
        );
        assert!(!verify_signature(&c, Some(FOX), FOX_BODY), "prefix missing");
        assert!(!verify_signature(
            &c,
            Some(&format!("sha1={FOX}")),
            FOX_BODY
        ));
        assert!(!verify_signature(&c, Some(""), FOX_BODY));
        assert!(!verify_signature(&c, None, FOX_BODY), "missing header");
        assert!(!verify_signature(
            &cfg("other", "sha256="),
            Some(&format!("sha256={FOX}")),
            FOX_BODY
        ));
        assert!(!verify_signature(
            &cfg("  ", "sha256="),
            Some(&sign(&cfg("  ", "sha256="), b"")),
            b""
        ));
        let zz = "z".repeat(64);
        assert!(
            !verify_signature(&c, Some(&format!("sha256={zz}")), FOX_BODY),
            "not hex"
        );
    }

    #[test]
    fn empty_prefix_and_trimmed_secret() {
        let c = cfg("key", "");
        assert!(verify_signature(&c, Some(FOX), FOX_BODY));
        assert!(!verify_signature(
            &c,
            Some(&format!("sha256={FOX}")),
            FOX_BODY
        ));
        let padded = cfg("  key\n", "sha256=");
        assert!(verify_signature(
            &padded,
            Some(&format!("sha256={FOX}")),
            FOX_BODY
        ));
        assert_eq!(sign(&padded, FOX_BODY), format!("sha256={FOX}"));
    }

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

    fn toml(src: &str) -> Result<WebhookConfig, String> {
        let v: toml::Value = src
            .parse::<toml::Table>()
            .map(toml::Value::Table)
            .map_err(|e| e.to_string())?;
        WebhookConfig::from_toml(v)
    }

    #[test]
    fn config_defaults_and_full_table() {
        let c = match toml("secret = \"s3cret\"") {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.signature_header, "x-hub-signature-256");
        assert_eq!(c.signature_prefix, "sha256=");
        assert!(c.run_enabled && c.signal.is_none() && c.input_path.is_none());
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret") && dbg.contains("redacted"), "{dbg}");

        let full = toml(
            r#"
            secret = "k"
            signature_header = "X-Signature"
            signature_prefix = ""
            signal = {name = " github.comment.created ", correlation_id_path = "issue.id", payload_path = "comment", run_id_path = "meta.run"}
            run = {enabled = false, input_path = "data"}
            "#,
        );
        let full = match full {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(full.signature_header, "x-signature");
        assert_eq!(full.signature_prefix, "");
        assert!(!full.run_enabled);
        assert_eq!(full.input_path.as_deref(), Some("data"));
        assert_eq!(
            full.signal,
            Some(SignalConfig {
                name: "github.comment.created".into(),
                correlation_id_path: Some("issue.id".into()),
                payload_path: Some("comment".into()),
                run_id_path: Some("meta.run".into()),
            })
        );
        let payload = json!({"issue": {"id": 17}, "comment": {"body": "hi"}, "meta": {"run": " r1 "}, "data": 3});
        assert_eq!(full.correlation_id(&payload), Some("17".into()));
        assert_eq!(full.explicit_run_id(&payload), Some("r1".into()));
        assert_eq!(full.signal_payload(&payload), Some(&json!({"body": "hi"})));
        assert_eq!(full.run_input(&payload), json!({"payload": 3}));
        assert_eq!(c.correlation_id(&payload), None, "no signal config");
        assert_eq!(c.signal_payload(&payload), Some(&payload));
        assert_eq!(c.run_input(&payload), payload);

        // serde entry point (e.g. a JSON config) resolves the same way
        let via_serde: Result<WebhookConfig, _> = serde_json::from_value(json!({"secret": "k"}));
        assert!(via_serde.is_ok());
    }

    #[test]
    fn config_errors_name_the_key() {
        let cases = [
            ("", "`secret` or `secret_env`"),
            ("secret = \"  \"", "`secret` is empty"),
            ("secret = \"a\"\nsecret_env = \"B\"", "only one of"),
            (
                "secret = \"a\"\nsignature_header = \" \"",
                "`signature_header`",
            ),
            (
                "secret = \"a\"\nsignal = {correlation_id_path = \"x\"}",
                "name",
            ),
            ("secret = \"a\"\nsignal = {name = \" \"}", "`signal.name`"),
            ("secret = \"a\"\nrun = {enabled = false}", "`run.enabled`"),
            ("secret = \"a\"\nsecrets = \"b\"", "secrets"),
            ("secret = \"a\"\nrun = {enabled = \"yes\"}", "enabled"),
        ];
        for (src, needle) in cases {
            match toml(src) {
                Ok(c) => panic!("`{src}` must fail, got {c:?}"),
                Err(e) => assert!(e.contains(needle), "`{src}`: {e}"),
            }
        }
    }

    #[test]
    fn secret_env() {
        let t = |var: &str| WebhookToml {
            secret: None,
            secret_env: Some(var.into()),
            signature_header: None,
            signature_prefix: Some("SHA256=".into()),
            signal: None,
            run: None,
        };
        let env = |name: &str| match name {
            "HOOK_SECRET" => Some("from-env".to_string()),
            "BLANK" => Some(" ".to_string()),
            _ => None,
        };
        let c = t("HOOK_SECRET").build_with(env);
        assert_eq!(c.as_ref().map(|c| c.secret.as_str()), Ok("from-env"));
        assert_eq!(
            c.map(|c| c.signature_prefix),
            Ok("sha256=".to_string()),
            "prefix lower-cased"
        );
        let e = t("MISSING").build_with(env).err().unwrap_or_default();
        assert!(
            e.contains("`secret_env`") && e.contains("`MISSING`") && e.contains("not set"),
            "{e}"
        );
        let e = t("BLANK").build_with(env).err().unwrap_or_default();
        assert!(e.contains("`BLANK`") && e.contains("empty"), "{e}");
        let dbg = format!(
            "{:?}",
            WebhookToml {
                secret: Some("hidden".into()),
                ..t("X")
            }
        );
        assert!(!dbg.contains("hidden"), "{dbg}");
    }
}
