//! JWT mode (gateway-protocol §2.2–2.3). Signatures and key parsing are the `jsonwebtoken`
//! crate's; the checks around them keep upstream's order and messages so clients see the same
//! errors:
//!
//! 1. no token → "A bearer token is required"
//! 2. not exactly three non-empty segments → "JWT must have three segments" (upstream ignores
//!    extra segments; we refuse them)
//! 3. header or payload not a base64url JSON object → "JWT header or payload was not valid JSON"
//! 4. `alg` not one the configured keys verify, or a `crit` header → "Unsupported JWT algorithm"
//!    (no configured key for the token's `kid` → "JWT kid matches no configured key")
//! 5. signature → "JWT signature verification failed"
//! 6. `iss` → "JWT issuer did not match"; 7. `aud` → "JWT audience did not match"
//! 8. `exp`: not a number → refused (upstream ignored it); absent → refused unless
//!    `require_exp = false`; `now - skew >= exp` → "JWT has expired"
//! 9. `nbf`: not a number → refused; `now + skew < nbf` → "JWT is not active yet";
//!    `iat`: not a number → refused.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};

use super::jwks::{JwksSettings, Refresh, RemoteJwks};
use super::keys::{KeySet, Selection, supported_algorithm};
use super::scopes::split_scopes;
use super::{DEFAULT_ROLE, Grant, Refusal};

const DEFAULT_CLOCK_SKEW_SECONDS: i64 = 60;

/// Where the verification keys come from.
#[derive(Clone, Debug)]
pub enum JwtKeys {
    /// Keys fixed at start: an HS256 secret, a PEM public key or a JWKS file.
    Fixed(Arc<KeySet>),
    /// Keys fetched from a JWKS URL, cached and refreshed.
    Remote(Arc<RemoteJwks>),
}

impl JwtKeys {
    /// An HS256 shared secret.
    pub fn hs256(secret: &[u8]) -> JwtKeys {
        JwtKeys::Fixed(Arc::new(KeySet::hs256(secret)))
    }

    /// Keys from a JWKS URL; nothing is fetched until [`RemoteJwks::fetch_now_blocking`] or the
    /// first token.
    pub fn remote(settings: JwksSettings) -> Result<JwtKeys, String> {
        RemoteJwks::new(settings).map(JwtKeys::Remote)
    }
}

/// JWT mode settings (§2.2). Built by [`super::AuthSection::build`] or [`JwtConfig::new`].
#[derive(Clone)]
pub struct JwtConfig {
    /// Required exact value of the `iss` claim.
    pub issuer: String,
    /// Accepted audiences; the token's `aud` must name at least one.
    pub audience: Vec<String>,
    /// Verification keys. Never printed.
    pub keys: JwtKeys,
    pub scopes_claim: String,
    pub role_claim: String,
    pub user_claim: String,
    pub default_role: String,
    pub default_scopes: Vec<String>,
    /// Leeway for `exp`/`nbf`, never negative.
    pub clock_skew_seconds: i64,
    /// Refuse tokens without `exp` (deviation from upstream, which accepts them forever).
    pub require_exp: bool,
}

impl JwtConfig {
    /// An HS256 configuration with the defaults of §2.2 for every optional knob.
    pub fn new(issuer: impl Into<String>, audience: Vec<String>, secret: Vec<u8>) -> Self {
        JwtConfig::with_keys(issuer, audience, JwtKeys::hs256(&secret))
    }

    /// A configuration verifying with `keys`, defaults elsewhere.
    pub fn with_keys(issuer: impl Into<String>, audience: Vec<String>, keys: JwtKeys) -> Self {
        JwtConfig {
            issuer: issuer.into(),
            audience,
            keys,
            scopes_claim: "scope".into(),
            role_claim: "role".into(),
            user_claim: "sub".into(),
            default_role: DEFAULT_ROLE.into(),
            default_scopes: Vec::new(),
            clock_skew_seconds: DEFAULT_CLOCK_SKEW_SECONDS,
            require_exp: true,
        }
    }

    /// Verifies with the keys we have now. With a JWKS URL, an unknown `kid` or old keys start
    /// a background fetch (rate-limited), so a retry can succeed once the new keys are in.
    pub(super) fn verify(&self, token: Option<&str>, now_secs: i64) -> Result<Grant, Refusal> {
        let token = Token::parse(token)?;
        match &self.keys {
            JwtKeys::Fixed(keys) => self.verify_with(&token, keys, now_secs),
            JwtKeys::Remote(remote) => {
                if remote.stale() {
                    remote.refresh();
                }
                match self.verify_with(&token, &remote.keys(), now_secs) {
                    Err(r) if r.key_missing => {
                        if remote.refresh() == Refresh::TooSoon {
                            Err(r)
                        } else {
                            Err(Refusal::new(
                                "JWT kid matches no known key; the key set is being refreshed, retry shortly",
                            ))
                        }
                    }
                    other => other,
                }
            }
        }
    }

    /// [`JwtConfig::verify`] that, with a JWKS URL, waits for the re-fetch an unknown `kid`
    /// triggers (bounded by the fetch deadline) and tries once more.
    pub(super) async fn verify_async(
        &self,
        token: Option<&str>,
        now_secs: i64,
    ) -> Result<Grant, Refusal> {
        let JwtKeys::Remote(remote) = &self.keys else {
            return self.verify(token, now_secs);
        };
        let token = Token::parse(token)?;
        if remote.keys().is_empty() {
            remote.refresh_and_wait().await;
        } else if remote.stale() {
            remote.refresh();
        }
        match self.verify_with(&token, &remote.keys(), now_secs) {
            Err(r) if r.key_missing && remote.refresh_and_wait().await => {
                self.verify_with(&token, &remote.keys(), now_secs)
            }
            other => other,
        }
    }

    fn verify_with(&self, token: &Token<'_>, keys: &KeySet, now: i64) -> Result<Grant, Refusal> {
        let key = match keys.select(token.alg, token.kid.as_deref()) {
            Selection::Found(key) => key,
            Selection::NoAlgorithm => {
                return Err(Refusal::new("Unsupported JWT algorithm").key_missing());
            }
            Selection::UnknownKid => {
                return Err(Refusal::new("JWT kid matches no configured key").key_missing());
            }
            Selection::Ambiguous => {
                return Err(Refusal::new(
                    "JWT has no kid and several configured keys use its algorithm",
                ));
            }
        };
        if !key.verifies(token.signing_input, token.signature) {
            return Err(Refusal::new("JWT signature verification failed"));
        }
        self.check_claims(&token.payload, now)
    }

    /// Steps 6–9 and the claim mapping of §2.3.
    fn check_claims(&self, payload: &Map<String, Value>, now: i64) -> Result<Grant, Refusal> {
        if payload.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(Refusal::new("JWT issuer did not match"));
        }
        let audience_ok = match payload.get("aud") {
            Some(Value::String(aud)) => self.audience.iter().any(|a| a == aud),
            Some(Value::Array(auds)) => auds
                .iter()
                .filter_map(Value::as_str)
                .any(|aud| self.audience.iter().any(|a| a == aud)),
            _ => false,
        };
        if !audience_ok {
            return Err(Refusal::new("JWT audience did not match"));
        }

        // Float arithmetic: claims are JSON numbers (possibly fractional) and cannot overflow.
        let skew = self.clock_skew_seconds.max(0) as f64;
        let now = now as f64;
        match numeric_claim(payload, "exp")? {
            Some(exp) if now - skew >= exp => return Err(Refusal::new("JWT has expired")),
            Some(_) => {}
            None if self.require_exp => {
                return Err(Refusal::new(
                    "JWT has no exp claim (tokens must expire; auth.require_exp = false accepts them)",
                ));
            }
            None => {}
        }
        if let Some(nbf) = numeric_claim(payload, "nbf")?
            && now + skew < nbf
        {
            return Err(Refusal::new("JWT is not active yet"));
        }
        numeric_claim(payload, "iat")?;

        let mut scopes = match payload.get(&self.scopes_claim) {
            Some(Value::String(s)) => split_scopes(s),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        if scopes.is_empty() {
            scopes = self.default_scopes.clone();
        }
        let role = match payload.get(&self.role_claim) {
            Some(Value::String(role)) if !role.is_empty() => role.clone(),
            _ => self.default_role.clone(),
        };
        let user_id = payload
            .get(&self.user_claim)
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Grant {
            role,
            scopes,
            user_id,
        })
    }
}

/// A time claim: absent is `None`, a JSON number is its value, anything else is refused
/// (upstream silently ignored e.g. a string `exp`, making such a token immortal).
fn numeric_claim(payload: &Map<String, Value>, name: &str) -> Result<Option<f64>, Refusal> {
    match payload.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| not_a_number(name)),
        Some(_) => Err(not_a_number(name)),
    }
}

fn not_a_number(name: &str) -> Refusal {
    Refusal::new(format!(
        "JWT {name} claim must be a number (seconds since the epoch)"
    ))
}

/// Written by hand so key material cannot leak through logs.
impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("keys", &self.keys)
            .field("scopes_claim", &self.scopes_claim)
            .field("role_claim", &self.role_claim)
            .field("user_claim", &self.user_claim)
            .field("default_role", &self.default_role)
            .field("default_scopes", &self.default_scopes)
            .field("clock_skew_seconds", &self.clock_skew_seconds)
            .field("require_exp", &self.require_exp)
            .finish()
    }
}

/// base64url as Node decodes JWT segments: padding optional, non-zero trailing bits tolerated.
const LENIENT_B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

fn decode_json_object(segment: &str) -> Option<Map<String, Value>> {
    let bytes = LENIENT_B64URL.decode(segment).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// A token that passed steps 1–4 and names an algorithm we support.
struct Token<'t> {
    alg: jsonwebtoken::Algorithm,
    kid: Option<String>,
    payload: Map<String, Value>,
    /// `"<header>.<payload>"` as transmitted: what the signature covers.
    signing_input: &'t str,
    signature: &'t str,
}

impl<'t> Token<'t> {
    fn parse(token: Option<&'t str>) -> Result<Token<'t>, Refusal> {
        let token = token.ok_or_else(|| Refusal::new("A bearer token is required"))?;
        let mut parts = token.split('.');
        let (header_b64, payload_b64, signature) =
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(h), Some(p), Some(s), None)
                    if !h.is_empty() && !p.is_empty() && !s.is_empty() =>
                {
                    (h, p, s)
                }
                _ => return Err(Refusal::new("JWT must have three segments")),
            };
        let (Some(header), Some(payload)) = (
            decode_json_object(header_b64),
            decode_json_object(payload_b64),
        ) else {
            return Err(Refusal::new("JWT header or payload was not valid JSON"));
        };
        // RFC 7515 §4.1.11: extensions marked critical that we do not understand must fail.
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .and_then(supported_algorithm)
            .filter(|_| !header.contains_key("crit"))
            .ok_or_else(|| Refusal::new("Unsupported JWT algorithm"))?;
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .map(str::to_string);
        let signing_input = &token[..header_b64.len() + 1 + payload_b64.len()];
        Ok(Token {
            alg,
            kid,
            payload,
            signing_input,
            signature,
        })
    }
}
