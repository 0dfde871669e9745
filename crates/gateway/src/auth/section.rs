//! The `[auth]` table of `smithers.toml` (DESIGN §4): parsed as written, then checked and turned
//! into an [`AuthConfig`]. Every error names the key that is wrong and never shows a secret.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderName;
use serde::Deserialize;

use super::jwks::JwksSettings;
use super::jwt::{JwtConfig, JwtKeys};
use super::keys::KeySet;
use super::proxy::ProxyConfig;
use super::{AuthConfig, DEFAULT_ROLE, Grant};

/// The `[auth]` table as written; [`AuthSection::build`] checks it. An absent table means mode
/// `none`.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// `none` | `token` | `jwt` | `trusted-proxy`.
    pub mode: Option<String>,
    /// Token mode: bearer token → grant.
    pub tokens: Option<BTreeMap<String, TokenEntry>>,
    pub issuer: Option<String>,
    pub audience: Option<Audience>,
    /// HS256 shared secret.
    pub secret: Option<String>,
    /// Name of an environment variable holding the HS256 secret.
    pub secret_env: Option<String>,
    /// A PEM public key (RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA).
    pub public_key_path: Option<String>,
    /// A JWKS file (`{"keys": [...]}`), read once at start.
    pub jwks_path: Option<String>,
    /// A JWKS URL, fetched at start, cached and refreshed.
    pub jwks_url: Option<String>,
    pub jwks_cache_seconds: Option<u64>,
    pub jwks_refresh_interval_seconds: Option<u64>,
    pub jwks_timeout_seconds: Option<u64>,
    pub jwks_max_bytes: Option<u64>,
    /// Refuse tokens without `exp` (default true).
    pub require_exp: Option<bool>,
    pub scopes_claim: Option<String>,
    pub role_claim: Option<String>,
    pub user_claim: Option<String>,
    pub default_role: Option<String>,
    pub default_scopes: Option<Vec<String>>,
    pub clock_skew_seconds: Option<i64>,
    pub allowed_origins: Option<Vec<String>>,
    pub trusted_headers: Option<Vec<String>>,
}

/// One `[auth.tokens.<token>]` entry.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Defaults to `operator`.
    pub role: Option<String>,
    pub scopes: Vec<String>,
    pub user_id: Option<String>,
}

/// `audience = "x"` or `audience = ["x", "y"]`.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Written by hand: the section holds the JWT secret and the bearer tokens.
impl fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSection")
            .field("mode", &self.mode)
            .field(
                "tokens",
                &self
                    .tokens
                    .as_ref()
                    .map(|t| format!("<{} redacted>", t.len())),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .field("public_key_path", &self.public_key_path)
            .field("jwks_path", &self.jwks_path)
            .field("jwks_url", &self.jwks_url.as_ref().map(|_| "<set>"))
            .field("require_exp", &self.require_exp)
            .field("scopes_claim", &self.scopes_claim)
            .field("role_claim", &self.role_claim)
            .field("user_claim", &self.user_claim)
            .field("default_role", &self.default_role)
            .field("default_scopes", &self.default_scopes)
            .field("clock_skew_seconds", &self.clock_skew_seconds)
            .field("allowed_origins", &self.allowed_origins)
            .field("trusted_headers", &self.trusted_headers)
            .finish()
    }
}

const JWT_KEYS: &[&str] = &[
    "issuer",
    "audience",
    "secret",
    "secret_env",
    "public_key_path",
    "jwks_path",
    "jwks_url",
    "jwks_cache_seconds",
    "jwks_refresh_interval_seconds",
    "jwks_timeout_seconds",
    "jwks_max_bytes",
    "require_exp",
    "scopes_claim",
    "role_claim",
    "user_claim",
    "default_role",
    "default_scopes",
    "clock_skew_seconds",
];
const PROXY_KEYS: &[&str] = &[
    "allowed_origins",
    "trusted_headers",
    "default_role",
    "default_scopes",
];
const KEY_SOURCES: &str =
    "auth.secret, auth.secret_env, auth.public_key_path, auth.jwks_path or auth.jwks_url";

impl AuthSection {
    /// Checks the section and builds the mode, resolving `secret_env` from the process
    /// environment and reading key files (paths relative to the working directory). With
    /// `jwks_url` the key set is fetched once here (bounded by `jwks_timeout_seconds`); if that
    /// fails the gateway still starts, logs a warning and keeps trying on later tokens.
    pub fn build(self) -> Result<AuthConfig, String> {
        self.build_with_env(|name| std::env::var(name).ok())
    }

    /// [`AuthSection::build`] with the environment supplied by the caller (tests, embedding).
    pub fn build_with_env(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AuthConfig, String> {
        let mode = self
            .mode
            .clone()
            .ok_or("auth.mode is required (none | token | jwt | trusted-proxy)")?;
        let allowed: &[&str] = match mode.as_str() {
            "none" => &[],
            "token" => &["tokens"],
            "jwt" => JWT_KEYS,
            "trusted-proxy" => PROXY_KEYS,
            other => {
                return Err(format!(
                    "auth.mode: unknown mode \"{other}\" (expected none | token | jwt | trusted-proxy)"
                ));
            }
        };
        if let Some(key) = self
            .set_keys()
            .into_iter()
            .find(|key| !allowed.contains(key))
        {
            return Err(format!("auth.{key} is not used by auth mode \"{mode}\""));
        }
        match mode.as_str() {
            "token" => self.build_token(),
            "jwt" => self.build_jwt(env),
            "trusted-proxy" => self.build_proxy(),
            _ => Ok(AuthConfig::None),
        }
    }

    /// Names of the mode-specific keys present in the section.
    fn set_keys(&self) -> Vec<&'static str> {
        [
            ("tokens", self.tokens.is_some()),
            ("issuer", self.issuer.is_some()),
            ("audience", self.audience.is_some()),
            ("secret", self.secret.is_some()),
            ("secret_env", self.secret_env.is_some()),
            ("public_key_path", self.public_key_path.is_some()),
            ("jwks_path", self.jwks_path.is_some()),
            ("jwks_url", self.jwks_url.is_some()),
            ("jwks_cache_seconds", self.jwks_cache_seconds.is_some()),
            (
                "jwks_refresh_interval_seconds",
                self.jwks_refresh_interval_seconds.is_some(),
            ),
            ("jwks_timeout_seconds", self.jwks_timeout_seconds.is_some()),
            ("jwks_max_bytes", self.jwks_max_bytes.is_some()),
            ("require_exp", self.require_exp.is_some()),
            ("scopes_claim", self.scopes_claim.is_some()),
            ("role_claim", self.role_claim.is_some()),
            ("user_claim", self.user_claim.is_some()),
            ("default_role", self.default_role.is_some()),
            ("default_scopes", self.default_scopes.is_some()),
            ("clock_skew_seconds", self.clock_skew_seconds.is_some()),
            ("allowed_origins", self.allowed_origins.is_some()),
            ("trusted_headers", self.trusted_headers.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    fn build_token(self) -> Result<AuthConfig, String> {
        let entries = self.tokens.unwrap_or_default();
        if entries.is_empty() {
            return Err(
                "auth.tokens must define at least one token for auth mode \"token\"".into(),
            );
        }
        let mut tokens = HashMap::with_capacity(entries.len());
        for (token, entry) in entries {
            if token.is_empty() {
                return Err("auth.tokens: a token must not be empty".into());
            }
            let role = entry.role.unwrap_or_else(|| DEFAULT_ROLE.into());
            tokens.insert(
                token,
                Grant {
                    role,
                    scopes: entry.scopes,
                    user_id: entry.user_id,
                },
            );
        }
        Ok(AuthConfig::Token { tokens })
    }

    fn build_jwt(mut self, env: impl Fn(&str) -> Option<String>) -> Result<AuthConfig, String> {
        let issuer = self
            .issuer
            .take()
            .filter(|s| !s.is_empty())
            .ok_or("auth.issuer is required for auth mode \"jwt\"")?;
        let audience = match self.audience.take() {
            Some(Audience::One(a)) => vec![a],
            Some(Audience::Many(list)) => list,
            None => Vec::new(),
        };
        if audience.iter().all(String::is_empty) {
            return Err(
                "auth.audience is required for auth mode \"jwt\" (a string or a list of strings)"
                    .into(),
            );
        }
        let keys = self.jwt_keys(env)?;
        let mut cfg = JwtConfig::with_keys(issuer, audience, keys);
        for (key, value, slot) in [
            ("scopes_claim", self.scopes_claim, &mut cfg.scopes_claim),
            ("role_claim", self.role_claim, &mut cfg.role_claim),
            ("user_claim", self.user_claim, &mut cfg.user_claim),
            ("default_role", self.default_role, &mut cfg.default_role),
        ] {
            if let Some(value) = value {
                if value.is_empty() {
                    return Err(format!("auth.{key} must not be empty"));
                }
                *slot = value;
            }
        }
        if let Some(scopes) = self.default_scopes {
            cfg.default_scopes = scopes;
        }
        if let Some(skew) = self.clock_skew_seconds {
            cfg.clock_skew_seconds = skew.max(0);
        }
        if let Some(require) = self.require_exp {
            cfg.require_exp = require;
        }
        if let JwtKeys::Remote(remote) = &cfg.keys {
            remote.fetch_now_blocking();
        }
        Ok(AuthConfig::Jwt(cfg))
    }

    /// The one key source of JWT mode.
    fn jwt_keys(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<JwtKeys, String> {
        let sources = [
            self.secret.is_some(),
            self.secret_env.is_some(),
            self.public_key_path.is_some(),
            self.jwks_path.is_some(),
            self.jwks_url.is_some(),
        ];
        match sources.iter().filter(|set| **set).count() {
            0 => {
                return Err(format!(
                    "auth mode \"jwt\" needs a key: set one of {KEY_SOURCES}"
                ));
            }
            1 => {}
            _ => {
                return Err(format!(
                    "{KEY_SOURCES} are mutually exclusive: set exactly one"
                ));
            }
        }
        if self.jwks_url.is_none()
            && let Some(key) = [
                ("jwks_cache_seconds", self.jwks_cache_seconds.is_some()),
                (
                    "jwks_refresh_interval_seconds",
                    self.jwks_refresh_interval_seconds.is_some(),
                ),
                ("jwks_timeout_seconds", self.jwks_timeout_seconds.is_some()),
                ("jwks_max_bytes", self.jwks_max_bytes.is_some()),
            ]
            .into_iter()
            .find_map(|(key, set)| set.then_some(key))
        {
            return Err(format!("auth.{key} is only used with auth.jwks_url"));
        }

        if let Some(secret) = self.secret.take() {
            if secret.is_empty() {
                return Err("auth.secret must not be empty".into());
            }
            return Ok(JwtKeys::hs256(secret.as_bytes()));
        }
        if let Some(var) = self.secret_env.take() {
            let secret = env(&var)
                .ok_or_else(|| format!("auth.secret_env: environment variable {var} is not set"))?;
            if secret.is_empty() {
                return Err(format!(
                    "auth.secret_env: environment variable {var} is empty"
                ));
            }
            return Ok(JwtKeys::hs256(secret.as_bytes()));
        }
        if let Some(path) = self.public_key_path.take() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("auth.public_key_path: cannot read `{path}`: {e}"))?;
            let keys = KeySet::from_pem(&text)
                .map_err(|e| format!("auth.public_key_path: `{path}` {e}"))?;
            return Ok(JwtKeys::Fixed(Arc::new(keys)));
        }
        if let Some(path) = self.jwks_path.take() {
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("auth.jwks_path: cannot read `{path}`: {e}"))?;
            let keys =
                KeySet::from_jwks(&bytes).map_err(|e| format!("auth.jwks_path: `{path}` {e}"))?;
            return Ok(JwtKeys::Fixed(Arc::new(keys)));
        }
        let url = self.jwks_url.take().unwrap_or_default();
        let mut settings = JwksSettings::new(url);
        let seconds = |key: &str, value: Option<u64>, default: Duration| match value {
            None => Ok(default),
            Some(0) => Err(format!("auth.{key} must be at least 1")),
            Some(s) => Ok(Duration::from_secs(s)),
        };
        settings.cache = seconds(
            "jwks_cache_seconds",
            self.jwks_cache_seconds,
            settings.cache,
        )?;
        settings.refresh_interval = seconds(
            "jwks_refresh_interval_seconds",
            self.jwks_refresh_interval_seconds,
            settings.refresh_interval,
        )?;
        settings.timeout = seconds(
            "jwks_timeout_seconds",
            self.jwks_timeout_seconds,
            settings.timeout,
        )?;
        if let Some(max) = self.jwks_max_bytes {
            settings.max_bytes = usize::try_from(max)
                .ok()
                .filter(|m| *m > 0)
                .ok_or("auth.jwks_max_bytes must be at least 1")?;
        }
        JwtKeys::remote(settings).map_err(|e| format!("auth.jwks_url: {e}"))
    }

    fn build_proxy(self) -> Result<AuthConfig, String> {
        let mut cfg = ProxyConfig::default();
        if let Some(origins) = self.allowed_origins {
            cfg.allowed_origins = origins;
        }
        if let Some(names) = self.trusted_headers {
            if names.len() > 3 {
                return Err(
                    "auth.trusted_headers takes at most three names: [user, scopes, role]".into(),
                );
            }
            let slots = [
                &mut cfg.user_header,
                &mut cfg.scopes_header,
                &mut cfg.role_header,
            ];
            for (i, (name, slot)) in names.iter().zip(slots).enumerate() {
                *slot = HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
                    .map_err(|_| {
                        format!("auth.trusted_headers[{i}]: \"{name}\" is not a valid header name")
                    })?;
            }
        }
        if let Some(role) = self.default_role {
            if role.is_empty() {
                return Err("auth.default_role must not be empty".into());
            }
            cfg.default_role = role;
        }
        if let Some(scopes) = self.default_scopes {
            cfg.default_scopes = scopes;
        }
        Ok(AuthConfig::TrustedProxy(cfg))
    }
}
