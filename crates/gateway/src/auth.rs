//! Authentication and authorization of gateway callers (gateway-protocol §2; DESIGN §4, §5).
//!
//! Four modes: `none`, `token` (static bearer tokens), `jwt` (HS256, verified here with `hmac`
//! and `sha2`) and `trusted-proxy` (identity taken from headers set by a reverse proxy). Each
//! yields a [`Grant`]; [`has_scope`] then decides whether the grant may call a method.
//!
//! Secrets (JWT secrets, bearer tokens) never appear in error messages or `Debug` output.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use axum::http::header::{AUTHORIZATION, ORIGIN};
use axum::http::{HeaderMap, HeaderName};
use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2_010::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use crate::error::RpcError;

/// What an authenticated caller may do: its role, its scopes and (if known) its user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub role: String,
    pub scopes: Vec<String>,
    pub user_id: Option<String>,
}

const DEFAULT_ROLE: &str = "operator";
const DEFAULT_CLOCK_SKEW_SECONDS: i64 = 60;
const DEFAULT_TRUSTED_HEADERS: [&str; 3] = ["x-user-id", "x-user-scopes", "x-user-role"];

/// JWT mode settings (§2.2). Built by [`AuthSection::build`] or [`JwtConfig::new`].
#[derive(Clone)]
pub struct JwtConfig {
    /// Required exact value of the `iss` claim.
    pub issuer: String,
    /// Accepted audiences; the token's `aud` must name at least one.
    pub audience: Vec<String>,
    /// HS256 key. Never printed.
    pub secret: Vec<u8>,
    pub scopes_claim: String,
    pub role_claim: String,
    pub user_claim: String,
    pub default_role: String,
    pub default_scopes: Vec<String>,
    /// Leeway for `exp`/`nbf`, never negative.
    pub clock_skew_seconds: i64,
}

impl JwtConfig {
    /// A JWT configuration with the defaults of §2.2 for every optional knob.
    pub fn new(issuer: impl Into<String>, audience: Vec<String>, secret: Vec<u8>) -> Self {
        JwtConfig {
            issuer: issuer.into(),
            audience,
            secret,
            scopes_claim: "scope".into(),
            role_claim: "role".into(),
            user_claim: "sub".into(),
            default_role: DEFAULT_ROLE.into(),
            default_scopes: Vec::new(),
            clock_skew_seconds: DEFAULT_CLOCK_SKEW_SECONDS,
        }
    }
}

/// Written by hand so the secret cannot leak through logs.
impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("secret", &"<redacted>")
            .field("scopes_claim", &self.scopes_claim)
            .field("role_claim", &self.role_claim)
            .field("user_claim", &self.user_claim)
            .field("default_role", &self.default_role)
            .field("default_scopes", &self.default_scopes)
            .field("clock_skew_seconds", &self.clock_skew_seconds)
            .finish()
    }
}

/// Trusted-proxy mode settings (§2.4).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Accepted `Origin` values; empty accepts any request, with or without `Origin`.
    pub allowed_origins: Vec<String>,
    pub user_header: HeaderName,
    pub scopes_header: HeaderName,
    pub role_header: HeaderName,
    pub default_role: String,
    pub default_scopes: Vec<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let [user, scopes, role] = DEFAULT_TRUSTED_HEADERS.map(HeaderName::from_static);
        ProxyConfig {
            allowed_origins: Vec::new(),
            user_header: user,
            scopes_header: scopes,
            role_header: role,
            default_role: DEFAULT_ROLE.into(),
            // Upstream's default: a proxy that sends no scopes grants everything (§9 item 10).
            default_scopes: vec!["*".into()],
        }
    }
}

/// The configured authentication mode, ready to authenticate requests.
#[derive(Clone, Default)]
pub enum AuthConfig {
    /// Everyone is an operator with every scope.
    #[default]
    None,
    /// Static bearer tokens, each mapped to its grant.
    Token {
        tokens: HashMap<String, Grant>,
    },
    Jwt(JwtConfig),
    TrustedProxy(ProxyConfig),
}

/// Written by hand: the token map's keys are the bearer tokens themselves.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthConfig::None => f.write_str("AuthConfig::None"),
            AuthConfig::Token { tokens } => {
                let grants: Vec<&Grant> = tokens.values().collect();
                f.debug_struct("AuthConfig::Token")
                    .field("tokens", &"<redacted>")
                    .field("grants", &grants)
                    .finish()
            }
            AuthConfig::Jwt(jwt) => f.debug_tuple("AuthConfig::Jwt").field(jwt).finish(),
            AuthConfig::TrustedProxy(proxy) => f
                .debug_tuple("AuthConfig::TrustedProxy")
                .field(proxy)
                .finish(),
        }
    }
}

fn unauthorized(message: &str) -> RpcError {
    RpcError::new("UNAUTHORIZED", message)
}

impl AuthConfig {
    /// The mode as the protocol and the metrics label spell it.
    pub fn mode_name(&self) -> &'static str {
        match self {
            AuthConfig::None => "none",
            AuthConfig::Token { .. } => "token",
            AuthConfig::Jwt(_) => "jwt",
            AuthConfig::TrustedProxy(_) => "trusted-proxy",
        }
    }

    /// Authenticates a caller (§2.2–2.4). `token` is the bearer token (from [`http_token`] or
    /// `connect.params.auth.token`); `headers` are the HTTP request's or the WebSocket upgrade
    /// request's headers (only trusted-proxy mode reads them); `now_secs` is the Unix time used
    /// for `exp`/`nbf`. An empty token counts as no token. Every failure is `UNAUTHORIZED`.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        headers: &HeaderMap,
        now_secs: i64,
    ) -> Result<Grant, RpcError> {
        let token = token.filter(|t| !t.is_empty());
        match self {
            AuthConfig::None => Ok(Grant {
                role: DEFAULT_ROLE.into(),
                scopes: vec!["*".into()],
                user_id: None,
            }),
            AuthConfig::Token { tokens } => {
                let token = token.ok_or_else(|| unauthorized("A bearer token is required"))?;
                lookup_token(tokens, token)
                    .cloned()
                    .ok_or_else(|| unauthorized("Invalid token"))
            }
            AuthConfig::Jwt(jwt) => verify_jwt(jwt, token, now_secs),
            AuthConfig::TrustedProxy(proxy) => trusted_proxy(proxy, headers),
        }
    }
}

/// Finds the grant of `candidate` in constant time with respect to the tokens' contents: every
/// configured token is compared (as a SHA-256 digest, so lengths and common prefixes do not
/// matter) without stopping at the first match.
fn lookup_token<'a>(tokens: &'a HashMap<String, Grant>, candidate: &str) -> Option<&'a Grant> {
    let wanted = Sha256::digest(candidate.as_bytes());
    let mut found = Choice::from(0);
    let mut index = 0u64;
    for (i, key) in tokens.keys().enumerate() {
        let eq = Sha256::digest(key.as_bytes())
            .as_slice()
            .ct_eq(wanted.as_slice());
        index = u64::conditional_select(&index, &(i as u64), eq);
        found |= eq;
    }
    if bool::from(found) {
        // Only reached with a valid token, so the position of the match is no longer secret.
        usize::try_from(index)
            .ok()
            .and_then(|i| tokens.iter().nth(i))
            .map(|(_, grant)| grant)
    } else {
        None
    }
}

/// base64url as Node decodes JWT segments: padding optional, non-zero trailing bits tolerated.
const LENIENT_B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// base64url for the signature: padding optional but otherwise canonical, so one signature has
/// one accepted spelling.
const SIGNATURE_B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn decode_json_object(segment: &str) -> Option<Map<String, Value>> {
    let bytes = LENIENT_B64URL.decode(segment).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// HS256 JWT verification, checks in the order of §2.3. Deviation (DESIGN §5): a token with
/// more than three segments is rejected rather than having the extra segments ignored.
fn verify_jwt(cfg: &JwtConfig, token: Option<&str>, now_secs: i64) -> Result<Grant, RpcError> {
    let token = token.ok_or_else(|| unauthorized("A bearer token is required"))?;

    let mut parts = token.split('.');
    let (header_b64, payload_b64, signature_b64) =
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(h), Some(p), Some(s), None)
                if !h.is_empty() && !p.is_empty() && !s.is_empty() =>
            {
                (h, p, s)
            }
            _ => return Err(unauthorized("JWT must have three segments")),
        };

    let (Some(header), Some(payload)) = (
        decode_json_object(header_b64),
        decode_json_object(payload_b64),
    ) else {
        return Err(unauthorized("JWT header or payload was not valid JSON"));
    };

    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(unauthorized("Unsupported JWT algorithm"));
    }

    if !signature_matches(&cfg.secret, header_b64, payload_b64, signature_b64) {
        return Err(unauthorized("JWT signature verification failed"));
    }

    if payload.get("iss").and_then(Value::as_str) != Some(cfg.issuer.as_str()) {
        return Err(unauthorized("JWT issuer did not match"));
    }

    let audience_ok = match payload.get("aud") {
        Some(Value::String(aud)) => cfg.audience.iter().any(|a| a == aud),
        Some(Value::Array(auds)) => auds
            .iter()
            .filter_map(Value::as_str)
            .any(|aud| cfg.audience.iter().any(|a| a == aud)),
        _ => false,
    };
    if !audience_ok {
        return Err(unauthorized("JWT audience did not match"));
    }

    // Float arithmetic: claims are JSON numbers (possibly fractional) and cannot overflow here.
    let skew = cfg.clock_skew_seconds.max(0) as f64;
    let now = now_secs as f64;
    if let Some(exp) = payload.get("exp").and_then(Value::as_f64)
        && now - skew >= exp
    {
        return Err(unauthorized("JWT has expired"));
    }
    if let Some(nbf) = payload.get("nbf").and_then(Value::as_f64)
        && now + skew < nbf
    {
        return Err(unauthorized("JWT is not active yet"));
    }

    let mut scopes = match payload.get(&cfg.scopes_claim) {
        Some(Value::String(s)) => split_scopes(s),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    if scopes.is_empty() {
        scopes = cfg.default_scopes.clone();
    }
    let role = match payload.get(&cfg.role_claim) {
        Some(Value::String(role)) if !role.is_empty() => role.clone(),
        _ => cfg.default_role.clone(),
    };
    let user_id = payload
        .get(&cfg.user_claim)
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(Grant {
        role,
        scopes,
        user_id,
    })
}

/// HMAC-SHA256 over `"<header>.<payload>"` as transmitted, compared in constant time.
fn signature_matches(
    secret: &[u8],
    header_b64: &str,
    payload_b64: &str,
    signature_b64: &str,
) -> bool {
    let Ok(signature) = SIGNATURE_B64URL.decode(signature_b64) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return false;
    };
    mac.update(header_b64.as_bytes());
    mac.update(b".");
    mac.update(payload_b64.as_bytes());
    mac.verify_slice(&signature).is_ok()
}

/// Splits a scope list on runs of commas and whitespace (upstream's `/[,\s]+/`), dropping empty
/// pieces.
fn split_scopes(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace() || c == '\u{feff}')
        .filter(|piece| !piece.is_empty())
        .map(str::to_string)
        .collect()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Trusted-proxy identity (§2.4). Empty header values count as absent.
fn trusted_proxy(cfg: &ProxyConfig, headers: &HeaderMap) -> Result<Grant, RpcError> {
    if !cfg.allowed_origins.is_empty() {
        let allowed = header_str(headers, &ORIGIN)
            .is_some_and(|origin| cfg.allowed_origins.iter().any(|o| o == origin));
        if !allowed {
            return Err(unauthorized("Origin is not allowed"));
        }
    }
    let user_id = header_str(headers, &cfg.user_header)
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    // Repeated scope headers are all honoured, as Node joins them with ", ".
    let mut scopes: Vec<String> = headers
        .get_all(&cfg.scopes_header)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_scopes)
        .collect();
    if scopes.is_empty() {
        scopes = cfg.default_scopes.clone();
    }
    let role = header_str(headers, &cfg.role_header)
        .filter(|v| !v.is_empty())
        .map_or_else(|| cfg.default_role.clone(), str::to_string);
    Ok(Grant {
        role,
        scopes,
        user_id,
    })
}

/// The bearer token of an HTTP request (§2.1): a non-empty `x-smithers-key`, else
/// `Authorization` with a case-sensitive `"Bearer "` prefix removed (or the whole value without
/// that prefix). Empty results and non-UTF-8 values count as no token.
pub fn http_token(headers: &HeaderMap) -> Option<String> {
    if let Some(key) = headers.get("x-smithers-key").and_then(|v| v.to_str().ok())
        && !key.is_empty()
    {
        return Some(key.to_string());
    }
    let auth = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok())?;
    let token = auth.strip_prefix("Bearer ").unwrap_or(auth);
    (!token.is_empty()).then(|| token.to_string())
}

/// Access levels of §2.5, ordered by rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Read,
    Execute,
    Approve,
    Admin,
}

impl Level {
    /// A granted level scope (`read`, `execute`, `approve`, `admin`), whitespace-trimmed.
    fn from_scope(scope: &str) -> Option<Level> {
        match scope.trim() {
            "read" => Some(Level::Read),
            "execute" => Some(Level::Execute),
            "approve" => Some(Level::Approve),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }
}

/// The level a method requires (§2.5 table): unknown methods need `read`, `config.*` `admin`.
pub fn required_level(method: &str) -> Level {
    match method {
        "runs.create"
        | "runs.cancel"
        | "runs.rerun"
        | "runs.fork"
        | "signals.send"
        | "cron.trigger"
        | "jumpToFrame"
        | "devtools.jumpToFrame" => Level::Execute,
        "approvals.decide" => Level::Approve,
        "cron.add" | "cron.remove" => Level::Admin,
        m if m.starts_with("config.") => Level::Admin,
        _ => Level::Read,
    }
}

/// Whether `scopes` allow calling `method` (§2.5 steps 1–4): the exact wildcard `"*"`, a level
/// scope of sufficient rank, the method name itself, or a `"<prefix>.*"` scope covering it.
pub fn has_scope(scopes: &[String], method: &str) -> bool {
    if scopes.iter().any(|s| s == "*") {
        return true;
    }
    let required = required_level(method);
    if scopes
        .iter()
        .filter_map(|s| Level::from_scope(s))
        .any(|level| level >= required)
    {
        return true;
    }
    scopes.iter().any(|s| {
        s == method
            || s.strip_suffix(".*").is_some_and(|prefix| {
                method
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
            })
    })
}

/// The `[auth]` table of `smithers.toml` (DESIGN §4), as written; [`AuthSection::build`] checks
/// it and turns it into an [`AuthConfig`]. An absent table means mode `none`.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// `none` | `token` | `jwt` | `trusted-proxy`.
    pub mode: Option<String>,
    /// Token mode: bearer token → grant.
    pub tokens: Option<BTreeMap<String, TokenEntry>>,
    pub issuer: Option<String>,
    pub audience: Option<Audience>,
    pub secret: Option<String>,
    /// Name of an environment variable holding the JWT secret.
    pub secret_env: Option<String>,
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

impl AuthSection {
    /// Checks the section and builds the mode, resolving `secret_env` from the process
    /// environment. Errors name the offending key (never a secret).
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

    fn build_jwt(self, env: impl Fn(&str) -> Option<String>) -> Result<AuthConfig, String> {
        let issuer = self
            .issuer
            .filter(|s| !s.is_empty())
            .ok_or("auth.issuer is required for auth mode \"jwt\"")?;
        let audience = match self.audience {
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
        let secret = match (self.secret, self.secret_env) {
            (Some(_), Some(_)) => {
                return Err("auth.secret and auth.secret_env are mutually exclusive".into());
            }
            (Some(secret), None) => secret,
            (None, Some(var)) => env(&var)
                .ok_or_else(|| format!("auth.secret_env: environment variable {var} is not set"))?,
            (None, None) => {
                return Err(
                    "auth.secret or auth.secret_env is required for auth mode \"jwt\"".into(),
                );
            }
        };
        if secret.is_empty() {
            return Err("auth.secret must not be empty".into());
        }
        let mut cfg = JwtConfig::new(issuer, audience, secret.into_bytes());
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
        Ok(AuthConfig::Jwt(cfg))
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::json;

    const SECRET: &[u8] = b"top-secret-key";
    const NOW: i64 = 1_700_000_000;

    fn no_headers() -> HeaderMap {
        HeaderMap::new()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.append(*name, v);
            }
        }
        h
    }

    fn err(r: Result<Grant, RpcError>) -> String {
        match r {
            Ok(g) => panic!("expected an error, got {g:?}"),
            Err(e) => {
                assert_eq!(e.code, "UNAUTHORIZED");
                e.message
            }
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn grant(role: &str, scopes: &[&str], user: Option<&str>) -> Grant {
        Grant {
            role: role.into(),
            scopes: strings(scopes),
            user_id: user.map(str::to_string),
        }
    }

    // ---- JWT helpers ------------------------------------------------------------------------

    fn b64(v: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    fn hs256(secret: &[u8], signing_input: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| panic!("hmac key"));
        mac.update(signing_input.as_bytes());
        b64(&mac.finalize().into_bytes())
    }

    /// Signs raw header/payload segments (already encoded) with `secret`.
    fn sign_segments(h: &str, p: &str, secret: &[u8]) -> String {
        format!("{h}.{p}.{}", hs256(secret, &format!("{h}.{p}")))
    }

    fn jwt_with(header: Value, payload: Value, secret: &[u8]) -> String {
        sign_segments(
            &b64(header.to_string().as_bytes()),
            &b64(payload.to_string().as_bytes()),
            secret,
        )
    }

    fn jwt(payload: Value) -> String {
        jwt_with(json!({"alg": "HS256", "typ": "JWT"}), payload, SECRET)
    }

    fn good_claims() -> Value {
        json!({"iss": "https://issuer", "aud": "smithers", "sub": "alice", "role": "admin",
               "scope": "read execute", "exp": NOW + 3600, "nbf": NOW - 10})
    }

    fn jwt_config() -> AuthConfig {
        AuthConfig::Jwt(JwtConfig::new(
            "https://issuer",
            strings(&["smithers", "other"]),
            SECRET.to_vec(),
        ))
    }

    fn check_jwt(token: &str) -> Result<Grant, RpcError> {
        jwt_config().authenticate(Some(token), &no_headers(), NOW)
    }

    fn claims_with(changes: Value) -> Value {
        let mut claims = good_claims();
        if let (Value::Object(base), Value::Object(changes)) = (&mut claims, changes) {
            for (k, v) in changes {
                if v.is_null() {
                    base.remove(&k);
                } else {
                    base.insert(k, v);
                }
            }
        }
        claims
    }

    // ---- none / token -----------------------------------------------------------------------

    #[test]
    fn none_mode_grants_everything() {
        let g = AuthConfig::None.authenticate(None, &no_headers(), NOW);
        assert_eq!(g, Ok(grant("operator", &["*"], None)));
        assert_eq!(AuthConfig::None.mode_name(), "none");
        assert_eq!(AuthConfig::default().mode_name(), "none");
    }

    fn token_config() -> AuthConfig {
        let mut tokens = HashMap::new();
        tokens.insert(
            "admin-token".to_string(),
            grant("admin", &["*"], Some("admin")),
        );
        tokens.insert("reader-token".to_string(), grant("viewer", &["read"], None));
        AuthConfig::Token { tokens }
    }

    #[test]
    fn token_mode() {
        let cfg = token_config();
        assert_eq!(cfg.mode_name(), "token");
        assert_eq!(
            cfg.authenticate(Some("admin-token"), &no_headers(), NOW),
            Ok(grant("admin", &["*"], Some("admin")))
        );
        assert_eq!(
            cfg.authenticate(Some("reader-token"), &no_headers(), NOW),
            Ok(grant("viewer", &["read"], None))
        );
        assert_eq!(
            err(cfg.authenticate(Some("admin-token2"), &no_headers(), NOW)),
            "Invalid token"
        );
        assert_eq!(
            err(cfg.authenticate(Some("admin-toke"), &no_headers(), NOW)),
            "Invalid token"
        );
        assert_eq!(
            err(cfg.authenticate(Some("wrong"), &no_headers(), NOW)),
            "Invalid token"
        );
        assert_eq!(
            err(cfg.authenticate(None, &no_headers(), NOW)),
            "A bearer token is required"
        );
        assert_eq!(
            err(cfg.authenticate(Some(""), &no_headers(), NOW)),
            "A bearer token is required"
        );
    }

    #[test]
    fn token_mode_debug_hides_tokens() {
        let shown = format!("{:?}", token_config());
        assert!(
            !shown.contains("admin-token") && !shown.contains("reader-token"),
            "{shown}"
        );
        assert!(shown.contains("viewer"));
    }

    // ---- http_token -------------------------------------------------------------------------

    #[test]
    fn http_token_extraction() {
        assert_eq!(http_token(&no_headers()), None);
        assert_eq!(
            http_token(&headers(&[("x-smithers-key", "k1")])).as_deref(),
            Some("k1")
        );
        assert_eq!(
            http_token(&headers(&[
                ("x-smithers-key", "k1"),
                ("authorization", "Bearer b1")
            ]))
            .as_deref(),
            Some("k1")
        );
        assert_eq!(
            http_token(&headers(&[
                ("x-smithers-key", ""),
                ("authorization", "Bearer b1")
            ]))
            .as_deref(),
            Some("b1")
        );
        assert_eq!(
            http_token(&headers(&[("authorization", "Bearer b1")])).as_deref(),
            Some("b1")
        );
        // Case-sensitive prefix, single space: anything else is taken whole.
        assert_eq!(
            http_token(&headers(&[("authorization", "bearer b1")])).as_deref(),
            Some("bearer b1")
        );
        assert_eq!(
            http_token(&headers(&[("authorization", "Bearer  b1")])).as_deref(),
            Some(" b1")
        );
        assert_eq!(
            http_token(&headers(&[("authorization", "raw-token")])).as_deref(),
            Some("raw-token")
        );
        assert_eq!(http_token(&headers(&[("authorization", "Bearer ")])), None);
    }

    // ---- JWT --------------------------------------------------------------------------------

    #[test]
    fn jwt_valid_token() {
        assert_eq!(
            check_jwt(&jwt(good_claims())),
            Ok(grant("admin", &["read", "execute"], Some("alice")))
        );
        assert_eq!(jwt_config().mode_name(), "jwt");
    }

    #[test]
    fn jwt_missing_token() {
        assert_eq!(
            err(jwt_config().authenticate(None, &no_headers(), NOW)),
            "A bearer token is required"
        );
        assert_eq!(
            err(jwt_config().authenticate(Some(""), &no_headers(), NOW)),
            "A bearer token is required"
        );
    }

    #[test]
    fn jwt_segments() {
        let good = jwt(good_claims());
        let parts: Vec<&str> = good.split('.').collect();
        let msg = "JWT must have three segments";
        assert_eq!(err(check_jwt("abc")), msg);
        assert_eq!(err(check_jwt(&format!("{}.{}", parts[0], parts[1]))), msg);
        assert_eq!(err(check_jwt(&format!("{}.{}.", parts[0], parts[1]))), msg);
        assert_eq!(err(check_jwt(&format!(".{}.{}", parts[1], parts[2]))), msg);
        assert_eq!(err(check_jwt(&format!("{}..{}", parts[0], parts[2]))), msg);
        // Deviation from upstream (DESIGN §5): a valid token with a fourth segment is rejected.
        assert_eq!(err(check_jwt(&format!("{good}.extra"))), msg);
        assert_eq!(err(check_jwt(&format!("{good}."))), msg);
        // Checked before anything else: garbage with four segments gets the same message.
        assert_eq!(err(check_jwt("a.b.c.d")), msg);
    }

    #[test]
    fn jwt_bad_base64_or_json() {
        let msg = "JWT header or payload was not valid JSON";
        let header = b64(br#"{"alg":"HS256"}"#);
        let payload = b64(good_claims().to_string().as_bytes());
        // Not base64url at all.
        assert_eq!(err(check_jwt(&sign_segments("!!!", &payload, SECRET))), msg);
        assert_eq!(err(check_jwt(&sign_segments(&header, "$$$", SECRET))), msg);
        // Base64 of something that is not JSON / not an object.
        assert_eq!(
            err(check_jwt(&sign_segments(
                &b64(b"not json"),
                &payload,
                SECRET
            ))),
            msg
        );
        assert_eq!(
            err(check_jwt(&sign_segments(&header, &b64(b"[1,2]"), SECRET))),
            msg
        );
        assert_eq!(
            err(check_jwt(&sign_segments(&header, &b64(b"42"), SECRET))),
            msg
        );
        // Checked before the algorithm: an invalid payload with alg none still reports JSON.
        let none_header = b64(br#"{"alg":"none"}"#);
        assert_eq!(
            err(check_jwt(&sign_segments(&none_header, &b64(b"{"), SECRET))),
            msg
        );
    }

    #[test]
    fn jwt_padding_is_tolerated_in_header_and_payload() {
        // This header is 23 bytes, so its base64 needs one `=` of padding.
        let header =
            base64::engine::general_purpose::URL_SAFE.encode(br#"{"alg":"HS256","t":"a"}"#);
        assert!(header.ends_with('='), "{header}");
        let payload = b64(good_claims().to_string().as_bytes());
        assert!(check_jwt(&sign_segments(&header, &payload, SECRET)).is_ok());
    }

    #[test]
    fn jwt_algorithm() {
        let msg = "Unsupported JWT algorithm";
        for header in [
            json!({"alg": "none"}),
            json!({"alg": "RS256"}),
            json!({"alg": "hs256"}),
            json!({"typ": "JWT"}),
        ] {
            assert_eq!(
                err(check_jwt(&jwt_with(header, good_claims(), SECRET))),
                msg
            );
        }
        // alg none with an empty signature is a segment error, and with any signature an alg error.
        let unsigned = format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(good_claims().to_string().as_bytes())
        );
        assert_eq!(err(check_jwt(&unsigned)), "JWT must have three segments");
        assert_eq!(err(check_jwt(&format!("{unsigned}x"))), msg);
    }

    #[test]
    fn jwt_signature() {
        let msg = "JWT signature verification failed";
        assert_eq!(
            err(check_jwt(&jwt_with(
                json!({"alg": "HS256"}),
                good_claims(),
                b"other-secret"
            ))),
            msg
        );
        let good = jwt(good_claims());
        let (signed, _) = good.rsplit_once('.').unwrap_or_default();
        assert_eq!(err(check_jwt(&format!("{signed}.AAAA"))), msg);
        assert_eq!(err(check_jwt(&format!("{signed}.not*base64"))), msg);
        // Tampered payload, original signature.
        let parts: Vec<&str> = good.split('.').collect();
        let forged = b64(claims_with(json!({"role": "root"})).to_string().as_bytes());
        assert_eq!(
            err(check_jwt(&format!("{}.{forged}.{}", parts[0], parts[2]))),
            msg
        );
        // The signature is checked before the claims: a bad issuer with a bad signature.
        let bad_both = jwt_with(
            json!({"alg": "HS256"}),
            claims_with(json!({"iss": "evil"})),
            b"x",
        );
        assert_eq!(err(check_jwt(&bad_both)), msg);
    }

    #[test]
    fn jwt_issuer() {
        let msg = "JWT issuer did not match";
        assert_eq!(
            err(check_jwt(&jwt(claims_with(json!({"iss": "https://evil"}))))),
            msg
        );
        assert_eq!(err(check_jwt(&jwt(claims_with(json!({"iss": null}))))), msg);
        assert_eq!(
            err(check_jwt(&jwt(claims_with(
                json!({"iss": ["https://issuer"]})
            )))),
            msg
        );
        // Issuer is checked before audience.
        assert_eq!(
            err(check_jwt(&jwt(claims_with(
                json!({"iss": "x", "aud": "nope"})
            )))),
            msg
        );
    }

    #[test]
    fn jwt_audience() {
        let msg = "JWT audience did not match";
        assert!(check_jwt(&jwt(claims_with(json!({"aud": "other"})))).is_ok());
        assert!(check_jwt(&jwt(claims_with(json!({"aud": ["x", "smithers"]})))).is_ok());
        assert!(check_jwt(&jwt(claims_with(json!({"aud": [1, "other"]})))).is_ok());
        assert_eq!(
            err(check_jwt(&jwt(claims_with(json!({"aud": "nope"}))))),
            msg
        );
        assert_eq!(
            err(check_jwt(&jwt(claims_with(json!({"aud": ["x", "y"]}))))),
            msg
        );
        assert_eq!(err(check_jwt(&jwt(claims_with(json!({"aud": []}))))), msg);
        assert_eq!(err(check_jwt(&jwt(claims_with(json!({"aud": null}))))), msg);
        // Audience before expiry.
        assert_eq!(
            err(check_jwt(&jwt(claims_with(
                json!({"aud": "nope", "exp": 1})
            )))),
            msg
        );
    }

    #[test]
    fn jwt_expiry_with_skew() {
        let msg = "JWT has expired";
        // Expired when now - skew >= exp; default skew 60.
        assert_eq!(
            err(check_jwt(&jwt(claims_with(json!({"exp": NOW - 60}))))),
            msg
        );
        assert!(check_jwt(&jwt(claims_with(json!({"exp": NOW - 59})))).is_ok());
        assert!(check_jwt(&jwt(claims_with(json!({"exp": NOW as f64 - 59.5})))).is_ok());
        assert_eq!(
            err(check_jwt(&jwt(claims_with(
                json!({"exp": NOW as f64 - 60.5})
            )))),
            msg
        );
        // A non-numeric exp is ignored, as is a missing one.
        assert!(check_jwt(&jwt(claims_with(json!({"exp": "0"})))).is_ok());
        assert!(check_jwt(&jwt(claims_with(json!({"exp": null})))).is_ok());
        // Expiry before not-before.
        assert_eq!(
            err(check_jwt(&jwt(claims_with(
                json!({"exp": 1, "nbf": NOW + 1000})
            )))),
            msg
        );

        // Zero skew, and a negative skew clamped to zero.
        for skew in [0, -30] {
            let mut cfg = JwtConfig::new("https://issuer", strings(&["smithers"]), SECRET.to_vec());
            cfg.clock_skew_seconds = skew;
            let cfg = AuthConfig::Jwt(cfg);
            let at = |exp: i64| {
                cfg.authenticate(
                    Some(&jwt(claims_with(json!({"exp": exp})))),
                    &no_headers(),
                    NOW,
                )
            };
            assert_eq!(err(at(NOW)), msg);
            assert!(at(NOW + 1).is_ok());
        }
    }

    #[test]
    fn jwt_not_before_with_skew() {
        let msg = "JWT is not active yet";
        // Not active when now + skew < nbf.
        assert!(check_jwt(&jwt(claims_with(json!({"nbf": NOW + 60})))).is_ok());
        assert_eq!(
            err(check_jwt(&jwt(claims_with(json!({"nbf": NOW + 61}))))),
            msg
        );
        assert_eq!(
            err(check_jwt(&jwt(claims_with(
                json!({"nbf": NOW as f64 + 60.5})
            )))),
            msg
        );
        assert!(check_jwt(&jwt(claims_with(json!({"nbf": "tomorrow"})))).is_ok());
    }

    #[test]
    fn jwt_claims_mapping() {
        // Scopes as a string split on commas and whitespace.
        let g = check_jwt(&jwt(claims_with(json!({"scope": "a b,c ,\td,,"}))));
        assert_eq!(g.map(|g| g.scopes), Ok(strings(&["a", "b", "c", "d"])));
        // Scopes as an array: non-strings dropped.
        let g = check_jwt(&jwt(claims_with(
            json!({"scope": ["runs.*", 3, "read", null]}),
        )));
        assert_eq!(g.map(|g| g.scopes), Ok(strings(&["runs.*", "read"])));
        // Missing / empty / wrong type → default scopes ([] by default); role and user defaults.
        let g = check_jwt(&jwt(claims_with(
            json!({"scope": null, "role": null, "sub": null}),
        )));
        assert_eq!(g, Ok(grant("operator", &[], None)));
        let g = check_jwt(&jwt(claims_with(
            json!({"scope": " , ", "role": 7, "sub": 42}),
        )));
        assert_eq!(g, Ok(grant("operator", &[], None)));

        // Custom claim names and defaults.
        let mut cfg = JwtConfig::new("https://issuer", strings(&["smithers"]), SECRET.to_vec());
        cfg.scopes_claim = "perms".into();
        cfg.role_claim = "r".into();
        cfg.user_claim = "email".into();
        cfg.default_role = "viewer".into();
        cfg.default_scopes = strings(&["read"]);
        let cfg = AuthConfig::Jwt(cfg);
        let token = jwt(claims_with(
            json!({"perms": ["admin"], "r": "boss", "email": "a@b"}),
        ));
        assert_eq!(
            cfg.authenticate(Some(&token), &no_headers(), NOW),
            Ok(grant("boss", &["admin"], Some("a@b")))
        );
        let token = jwt(good_claims());
        assert_eq!(
            cfg.authenticate(Some(&token), &no_headers(), NOW),
            Ok(grant("viewer", &["read"], None))
        );
    }

    #[test]
    fn jwt_debug_hides_secret() {
        let shown = format!("{:?}", jwt_config());
        assert!(!shown.contains("top-secret-key"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    // ---- trusted proxy ----------------------------------------------------------------------

    #[test]
    fn trusted_proxy_defaults() {
        let cfg = AuthConfig::TrustedProxy(ProxyConfig::default());
        assert_eq!(cfg.mode_name(), "trusted-proxy");
        assert_eq!(
            cfg.authenticate(None, &no_headers(), NOW),
            Ok(grant("operator", &["*"], None))
        );
        let h = headers(&[
            ("x-user-id", "bob"),
            ("x-user-scopes", "read, execute approve"),
            ("x-user-role", "lead"),
        ]);
        assert_eq!(
            cfg.authenticate(None, &h, NOW),
            Ok(grant("lead", &["read", "execute", "approve"], Some("bob")))
        );
        // Empty values fall back to the defaults.
        let h = headers(&[
            ("x-user-id", ""),
            ("x-user-scopes", " , "),
            ("x-user-role", ""),
        ]);
        assert_eq!(
            cfg.authenticate(None, &h, NOW),
            Ok(grant("operator", &["*"], None))
        );
        // Repeated scope headers all count.
        let h = headers(&[("x-user-scopes", "read"), ("x-user-scopes", "runs.*")]);
        assert_eq!(
            cfg.authenticate(None, &h, NOW).map(|g| g.scopes),
            Ok(strings(&["read", "runs.*"]))
        );
        // A token is irrelevant.
        assert!(
            cfg.authenticate(Some("whatever"), &no_headers(), NOW)
                .is_ok()
        );
    }

    #[test]
    fn trusted_proxy_origins() {
        let cfg = AuthConfig::TrustedProxy(ProxyConfig {
            allowed_origins: strings(&["https://app.example"]),
            ..ProxyConfig::default()
        });
        let msg = "Origin is not allowed";
        assert_eq!(err(cfg.authenticate(None, &no_headers(), NOW)), msg);
        assert_eq!(
            err(cfg.authenticate(None, &headers(&[("origin", "https://evil.example")]), NOW)),
            msg
        );
        assert_eq!(
            err(cfg.authenticate(None, &headers(&[("origin", "https://app.example/")]), NOW)),
            msg
        );
        let h = headers(&[("origin", "https://app.example"), ("x-user-id", "carol")]);
        assert_eq!(
            cfg.authenticate(None, &h, NOW),
            Ok(grant("operator", &["*"], Some("carol")))
        );
    }

    fn section(toml_like: Value) -> AuthSection {
        serde_json::from_value(toml_like).unwrap_or_else(|e| panic!("section: {e}"))
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn trusted_proxy_header_fallbacks() {
        // One custom header: the other positions keep their defaults.
        let cfg = section(
            json!({"mode": "trusted-proxy", "trusted_headers": ["X-Forwarded-User"],
                                 "default_role": "guest", "default_scopes": ["read"]}),
        )
        .build_with_env(no_env);
        let cfg = cfg.unwrap_or_else(|e| panic!("{e}"));
        let h = headers(&[
            ("x-forwarded-user", "dave"),
            ("x-user-id", "ignored"),
            ("x-user-role", "ops"),
        ]);
        assert_eq!(
            cfg.authenticate(None, &h, NOW),
            Ok(grant("ops", &["read"], Some("dave")))
        );
        let h = headers(&[("x-user-scopes", "execute")]);
        assert_eq!(
            cfg.authenticate(None, &h, NOW),
            Ok(grant("guest", &["execute"], None))
        );

        let cfg = section(json!({"mode": "trusted-proxy", "trusted_headers": ["u", "s", "r"]}))
            .build_with_env(no_env)
            .unwrap_or_else(|e| panic!("{e}"));
        let h = headers(&[
            ("u", "erin"),
            ("s", "admin"),
            ("r", "chief"),
            ("x-user-id", "nope"),
        ]);
        assert_eq!(
            cfg.authenticate(None, &h, NOW),
            Ok(grant("chief", &["admin"], Some("erin")))
        );
    }

    // ---- config section ---------------------------------------------------------------------

    fn build_err(v: Value) -> String {
        match section(v).build_with_env(no_env) {
            Ok(cfg) => panic!("expected a config error, got {cfg:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn section_modes() {
        let none = section(json!({"mode": "none"})).build_with_env(no_env);
        assert_eq!(none.map(|c| c.mode_name()), Ok("none"));

        let cfg = section(json!({"mode": "token", "tokens": {
            "admin-token": {"role": "admin", "scopes": ["*"], "user_id": "admin"},
            "ci-token": {"scopes": ["execute"]}
        }}))
        .build_with_env(no_env)
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            cfg.authenticate(Some("admin-token"), &no_headers(), NOW),
            Ok(grant("admin", &["*"], Some("admin")))
        );
        assert_eq!(
            cfg.authenticate(Some("ci-token"), &no_headers(), NOW),
            Ok(grant("operator", &["execute"], None))
        );

        let cfg = section(
            json!({"mode": "jwt", "issuer": "https://issuer", "audience": "smithers",
                                 "secret": "top-secret-key", "clock_skew_seconds": -5}),
        )
        .build_with_env(no_env)
        .unwrap_or_else(|e| panic!("{e}"));
        match &cfg {
            AuthConfig::Jwt(j) => {
                assert_eq!(j.clock_skew_seconds, 0);
                assert_eq!(j.audience, strings(&["smithers"]));
                assert_eq!(
                    (
                        j.scopes_claim.as_str(),
                        j.role_claim.as_str(),
                        j.user_claim.as_str()
                    ),
                    ("scope", "role", "sub")
                );
                assert_eq!(j.default_role, "operator");
                assert!(j.default_scopes.is_empty());
            }
            other => panic!("not jwt: {other:?}"),
        }
        assert!(
            cfg.authenticate(
                Some(&jwt(claims_with(json!({"exp": NOW + 1})))),
                &no_headers(),
                NOW
            )
            .is_ok()
        );

        let cfg = section(
            json!({"mode": "jwt", "issuer": "https://issuer", "audience": ["a", "smithers"],
                                 "secret_env": "JWT_SECRET"}),
        )
        .build_with_env(|name| (name == "JWT_SECRET").then(|| "top-secret-key".to_string()))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            cfg.authenticate(Some(&jwt(good_claims())), &no_headers(), NOW)
                .is_ok()
        );

        let proxy = section(json!({"mode": "trusted-proxy"})).build_with_env(no_env);
        assert_eq!(proxy.map(|c| c.mode_name()), Ok("trusted-proxy"));
    }

    #[test]
    fn section_errors_name_the_key_and_hide_secrets() {
        assert!(build_err(json!({})).contains("auth.mode"));
        assert!(build_err(json!({"mode": "oauth"})).contains("auth.mode"));
        assert!(build_err(json!({"mode": "token"})).contains("auth.tokens"));
        assert!(build_err(json!({"mode": "token", "tokens": {}})).contains("auth.tokens"));
        assert!(
            build_err(json!({"mode": "token", "tokens": {"": {"scopes": []}}}))
                .contains("auth.tokens")
        );
        assert!(build_err(json!({"mode": "none", "issuer": "x"})).contains("auth.issuer"));
        assert!(
            build_err(json!({"mode": "token", "tokens": {"t": {"scopes": []}}, "secret": "s3"}))
                .contains("auth.secret")
        );

        let jwt_base = |extra: Value| {
            let mut v = json!({"mode": "jwt", "issuer": "https://issuer", "audience": "smithers"});
            if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
                m.extend(e);
            }
            v
        };
        assert!(build_err(jwt_base(json!({}))).contains("auth.secret"));
        assert!(build_err(jwt_base(json!({"secret": ""}))).contains("auth.secret"));
        let e = build_err(jwt_base(json!({"secret_env": "MISSING_VAR"})));
        assert!(
            e.contains("auth.secret_env") && e.contains("MISSING_VAR"),
            "{e}"
        );
        let e = build_err(jwt_base(json!({"secret": "hunter2", "secret_env": "X"})));
        assert!(e.contains("auth.secret") && !e.contains("hunter2"), "{e}");
        assert!(
            build_err(json!({"mode": "jwt", "audience": "a", "secret": "s"}))
                .contains("auth.issuer")
        );
        assert!(
            build_err(json!({"mode": "jwt", "issuer": "i", "secret": "s"}))
                .contains("auth.audience")
        );
        assert!(
            build_err(json!({"mode": "jwt", "issuer": "i", "audience": [], "secret": "s"}))
                .contains("auth.audience")
        );
        assert!(
            build_err(jwt_base(json!({"secret": "s", "role_claim": ""})))
                .contains("auth.role_claim")
        );
        assert!(
            build_err(jwt_base(json!({"secret": "s", "allowed_origins": []})))
                .contains("auth.allowed_origins")
        );

        let e =
            build_err(json!({"mode": "trusted-proxy", "trusted_headers": ["ok", "bad header"]}));
        assert!(e.contains("auth.trusted_headers[1]"), "{e}");
        assert!(
            build_err(json!({"mode": "trusted-proxy", "trusted_headers": ["a", "b", "c", "d"]}))
                .contains("auth.trusted_headers")
        );

        // Unknown keys are rejected by serde.
        assert!(
            serde_json::from_value::<AuthSection>(json!({"mode": "none", "bogus": 1})).is_err()
        );
        assert!(
            serde_json::from_value::<AuthSection>(
                json!({"mode": "token", "tokens": {"t": {"role": "x"}}})
            )
            .is_err()
        );
    }

    #[test]
    fn section_debug_hides_secrets() {
        let s = section(
            json!({"mode": "jwt", "issuer": "i", "audience": "a", "secret": "hunter2",
                               "tokens": {"tok-secret": {"scopes": []}}}),
        );
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-secret"),
            "{shown}"
        );
    }

    // ---- scopes -----------------------------------------------------------------------------

    #[test]
    fn required_levels() {
        for m in [
            "health",
            "runs.list",
            "runs.get",
            "runs.diff",
            "frames.list",
            "frames.get",
            "attempts.list",
            "attempts.get",
            "approvals.list",
            "cron.list",
            "getNodeDiff",
            "devtools.getNodeDiff",
            "getNodeOutput",
            "devtools.getNodeOutput",
            "getDevToolsSnapshot",
            "streamDevTools",
            "connect",
            "unknown.method",
            "configure",
        ] {
            assert_eq!(required_level(m), Level::Read, "{m}");
        }
        for m in [
            "runs.create",
            "runs.cancel",
            "runs.rerun",
            "signals.send",
            "cron.trigger",
            "jumpToFrame",
            "devtools.jumpToFrame",
        ] {
            assert_eq!(required_level(m), Level::Execute, "{m}");
        }
        assert_eq!(required_level("approvals.decide"), Level::Approve);
        for m in ["cron.add", "cron.remove", "config.x", "config.reload"] {
            assert_eq!(required_level(m), Level::Admin, "{m}");
        }
        assert!(
            Level::Read < Level::Execute
                && Level::Execute < Level::Approve
                && Level::Approve < Level::Admin
        );
    }

    #[test]
    fn scope_matching_table() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["*"], "cron.add", true),
            (&["*"], "config.x", true),
            (&[" *"], "runs.list", false),
            (&["* "], "runs.list", false),
            (&["read"], "runs.list", true),
            (&["read"], "runs.create", false),
            (&["read"], "unknown.thing", true),
            (&[" read "], "runs.get", true),
            (&["execute"], "runs.create", true),
            (&["execute"], "runs.list", true),
            (&["execute"], "approvals.decide", false),
            (&["\texecute\n"], "jumpToFrame", true),
            (&["approve"], "approvals.decide", true),
            (&["approve"], "cron.add", false),
            (&["admin"], "cron.add", true),
            (&["admin"], "config.x", true),
            (&["approve"], "config.x", false),
            (&["execute"], "config.x", false),
            (&["READ"], "runs.list", false),
            (&["runs.*"], "runs.create", true),
            (&["runs.*"], "runs.cancel", true),
            (&["runs.*"], "runs", false),
            (&["runs.*"], "runsx.create", false),
            (&["runs.*"], "frames.list", false),
            (&["devtools.*"], "devtools.getNodeOutput", true),
            (&["devtools.*"], "getNodeOutput", false),
            (&["devtools.*"], "devtools.jumpToFrame", true),
            (&["config.*"], "config.x", true),
            (&["runs.create"], "runs.create", true),
            (&["runs.create"], "runs.cancel", false),
            (&[" runs.create"], "runs.create", false),
            (&["cron.add"], "cron.add", true),
            (&["approve"], "approve", true),
            (&["approvals.decide"], "approve", false),
            (&[], "health", false),
            (&["", "nope"], "health", false),
            (&["nope", "admin"], "cron.remove", true),
        ];
        for (scopes, method, expected) in cases {
            assert_eq!(
                has_scope(&strings(scopes), method),
                *expected,
                "{scopes:?} {method}"
            );
        }
    }
}
