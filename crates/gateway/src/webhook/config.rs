//! `[workflows.webhook]`: a workflow's webhook configuration as written in `smithers.toml`
//! (DESIGN §4), resolved (secret from the environment, names lower-cased) and checked.

use super::paths::{read_path_value, run_input, scalar_id};
use serde::Deserialize;
use serde_json::Value;

/// Default signature header (lower case).
pub const DEFAULT_SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Default signature prefix.
pub const DEFAULT_SIGNATURE_PREFIX: &str = "sha256=";
/// Default header carrying the sender's delivery id (GitHub's), lower case.
pub const DEFAULT_DELIVERY_HEADER: &str = "x-github-delivery";

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
    pub delivery_header: Option<String>,
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
            .field("delivery_header", &self.delivery_header)
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
        let delivery_header = self
            .delivery_header
            .unwrap_or_else(|| DEFAULT_DELIVERY_HEADER.to_string())
            .trim()
            .to_ascii_lowercase();
        if delivery_header.is_empty() {
            return Err("`delivery_header` is empty".to_string());
        }
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
            delivery_header,
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
    /// Lower case. Its value names a delivery for dedupe (the body hash when absent).
    pub delivery_header: String,
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
            .field("delivery_header", &self.delivery_header)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        assert_eq!(c.delivery_header, "x-github-delivery");
        assert!(c.run_enabled && c.signal.is_none() && c.input_path.is_none());
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret") && dbg.contains("redacted"), "{dbg}");

        let full = toml(
            r#"
            secret = "k"
            signature_header = "X-Signature"
            signature_prefix = ""
            delivery_header = " X-Request-Id "
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
        assert_eq!(full.delivery_header, "x-request-id");
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
            (
                "secret = \"a\"\ndelivery_header = \"\"",
                "`delivery_header`",
            ),
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
            delivery_header: None,
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
