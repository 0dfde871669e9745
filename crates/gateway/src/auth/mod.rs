//! Authentication and authorization of gateway callers (gateway-protocol §2; DESIGN §4, §5).
//!
//! Four modes: `none`, `token` (static bearer tokens), `jwt` (HS256 with a shared secret, or
//! RS256 / ES256 / EdDSA with public keys from a PEM file, a JWKS file or a JWKS URL) and
//! `trusted-proxy` (identity taken from headers set by a reverse proxy). Each yields a
//! [`Grant`]; [`has_scope`] then decides whether the grant may call a method, and
//! [`approval_scope_allows`] whether it may decide an approval restricted to some scopes.
//!
//! Secrets (JWT secrets, keys, bearer tokens) never appear in error messages, logs or `Debug`
//! output. Refusals are logged at `debug` (mode, transport, reason): they are routine, and an
//! attacker could otherwise fill the log; `smithers_gateway_auth_events_total` counts them.

mod jwks;
mod jwt;
mod keys;
mod proxy;
mod scopes;
mod section;
mod token;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

use crate::error::RpcError;

pub use jwks::{JwksSettings, RemoteJwks};
pub use jwt::{JwtConfig, JwtKeys};
pub use keys::KeySet;
pub use proxy::ProxyConfig;
pub use scopes::{Level, approval_scope_allows, has_scope, required_level};
pub use section::{Audience, AuthSection, TokenEntry};

/// Refused credentials are logged at most once a second at `info`.
static REFUSAL_LOG: crate::log_rate::LogRate = crate::log_rate::LogRate::new(1000);
/// What an authenticated caller may do: its role, its scopes and (if known) its user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub role: String,
    pub scopes: Vec<String>,
    pub user_id: Option<String>,
}

const DEFAULT_ROLE: &str = "operator";

/// Why a caller was refused; becomes `UNAUTHORIZED` with this message.
#[derive(Debug)]
struct Refusal {
    message: Cow<'static, str>,
    /// No key matched the token (JWKS URL: worth a re-fetch).
    key_missing: bool,
}

impl Refusal {
    fn new(message: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            message: message.into(),
            key_missing: false,
        }
    }

    fn key_missing(mut self) -> Refusal {
        self.key_missing = true;
        self
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
    ///
    /// With a JWKS URL, a token whose key we do not have yet is refused while the key set is
    /// re-fetched in the background; [`AuthConfig::authenticate_async`] waits for it instead.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        headers: &HeaderMap,
        now_secs: i64,
    ) -> Result<Grant, RpcError> {
        self.authenticate_on("unknown", token, headers, now_secs)
    }

    /// [`AuthConfig::authenticate`], naming the transport (`http`, `ws`, `metrics`) for the log.
    pub fn authenticate_on(
        &self,
        transport: &'static str,
        token: Option<&str>,
        headers: &HeaderMap,
        now_secs: i64,
    ) -> Result<Grant, RpcError> {
        let token = token.filter(|t| !t.is_empty());
        let outcome = match self {
            AuthConfig::None => Ok(everything()),
            AuthConfig::Token { tokens } => token_grant(tokens, token),
            AuthConfig::Jwt(jwt) => jwt.verify(token, now_secs),
            AuthConfig::TrustedProxy(proxy) => proxy.identify(headers),
        };
        self.finish(transport, outcome)
    }

    /// [`AuthConfig::authenticate_on`] that, with a JWKS URL, fetches a key set that lacks the
    /// token's key (at most once per `jwks_refresh_interval_seconds`, bounded by
    /// `jwks_timeout_seconds`) before deciding, so the first token after a key rotation passes.
    pub async fn authenticate_async(
        &self,
        transport: &'static str,
        token: Option<&str>,
        headers: &HeaderMap,
        now_secs: i64,
    ) -> Result<Grant, RpcError> {
        match self {
            AuthConfig::Jwt(jwt) => {
                let token = token.filter(|t| !t.is_empty());
                let outcome = jwt.verify_async(token, now_secs).await;
                self.finish(transport, outcome)
            }
            _ => self.authenticate_on(transport, token, headers, now_secs),
        }
    }

    fn finish(
        &self,
        transport: &'static str,
        outcome: Result<Grant, Refusal>,
    ) -> Result<Grant, RpcError> {
        outcome.map_err(|refusal| {
            // anyone can provoke it: one line a second at info, the rest at debug; the
            // reason never holds the credential
            match REFUSAL_LOG.allow() {
                Some(left_out) => tracing::info!(
                    mode = self.mode_name(),
                    transport,
                    reason = %refusal.message,
                    similar_left_out = left_out,
                    "authentication refused"
                ),
                None => tracing::debug!(
                    mode = self.mode_name(),
                    transport,
                    reason = %refusal.message,
                    "authentication refused"
                ),
            }
            RpcError::new("UNAUTHORIZED", refusal.message)
        })
    }
}

fn everything() -> Grant {
    Grant {
        role: DEFAULT_ROLE.into(),
        scopes: vec!["*".into()],
        user_id: None,
    }
}

fn token_grant(tokens: &HashMap<String, Grant>, token: Option<&str>) -> Result<Grant, Refusal> {
    let token = token.ok_or_else(|| Refusal::new("A bearer token is required"))?;
    token::lookup(tokens, token)
        .cloned()
        .ok_or_else(|| Refusal::new("Invalid token"))
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

#[cfg(test)]
mod tests;
