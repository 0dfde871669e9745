//! JWT verification keys. The key's type decides the one algorithm it verifies — an HMAC secret
//! HS256, an RSA key RS256, an EC P-256 key ES256, an Ed25519 key EdDSA — so a token can never
//! pick how its signature is checked (no `alg: none`, no HS256 keyed with a public key).
//! Parsing and signature checks are the `jsonwebtoken` crate's (RustCrypto backend).

use std::fmt;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};

/// Algorithms a token may name. Anything else (`none`, `HS512`, `PS256`, …) is refused before
/// any key is looked at.
pub(super) fn supported_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "HS256" => Some(Algorithm::HS256),
        "RS256" => Some(Algorithm::RS256),
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// One verification key and the algorithm its type allows.
#[derive(Clone)]
pub struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl VerifyKey {
    /// Checks `signature` (base64url, as in the token) over `signing_input` with this key and its
    /// own algorithm.
    pub(super) fn verifies(&self, signing_input: &str, signature: &str) -> bool {
        jsonwebtoken::crypto::verify(signature, signing_input.as_bytes(), &self.key, self.alg)
            .unwrap_or(false)
    }
}

/// Which keys a token's header selects.
pub(super) enum Selection<'a> {
    Found(&'a VerifyKey),
    /// No key verifies the token's algorithm.
    NoAlgorithm,
    /// The token names a `kid` that no key of its algorithm has.
    UnknownKid,
    /// No `kid`, and several keys use the token's algorithm.
    Ambiguous,
}

/// A set of verification keys (an HS256 secret, a PEM public key, or a JWKS document).
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

/// Written by hand: key material is never printed, only what kind of keys there are.
impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<String> = self
            .keys
            .iter()
            .map(|k| match &k.kid {
                Some(kid) => format!("{:?} kid={kid}", k.alg),
                None => format!("{:?}", k.alg),
            })
            .collect();
        f.debug_struct("KeySet").field("keys", &keys).finish()
    }
}

impl KeySet {
    /// An HS256 shared secret. An empty secret gives an empty set, which refuses every token.
    pub fn hs256(secret: &[u8]) -> KeySet {
        let keys = DecodingKey::from_secret(secret)
            .map(|key| VerifyKey {
                kid: None,
                alg: Algorithm::HS256,
                key,
            })
            .into_iter()
            .collect();
        KeySet { keys }
    }

    /// One public key in PEM (`PUBLIC KEY` SubjectPublicKeyInfo, or PKCS#1 `RSA PUBLIC KEY`).
    pub fn from_pem(text: &str) -> Result<KeySet, String> {
        if text.contains("PRIVATE KEY") {
            return Err(
                "holds a private key; give the public key only (openssl pkey -pubout)".into(),
            );
        }
        if !text.contains("-----BEGIN PUBLIC KEY-----")
            && !text.contains("-----BEGIN RSA PUBLIC KEY-----")
        {
            return Err("is not a PEM public key (-----BEGIN PUBLIC KEY-----)".into());
        }
        let bytes = text.as_bytes();
        let (alg, key) = if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
            (Algorithm::RS256, key)
        } else if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
            (ec_algorithm(&key)?, key)
        } else if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
            (ed_algorithm(&key)?, key)
        } else {
            return Err(
                "is not a supported public key (RSA for RS256, EC P-256 for ES256, Ed25519 for EdDSA)"
                    .into(),
            );
        };
        Ok(KeySet {
            keys: vec![VerifyKey {
                kid: None,
                alg,
                key,
            }],
        })
    }

    /// The signing keys of a JWKS document (`{"keys": [...]}`). Keys marked for encryption, of
    /// other types or curves, or whose `alg` differs from what their type verifies are skipped;
    /// a document without one usable key is an error.
    pub fn from_jwks(json: &[u8]) -> Result<KeySet, String> {
        let set: JwkSet = serde_json::from_slice(json)
            .map_err(|e| format!("is not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
        let total = set.keys.len();
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            ) {
                continue;
            }
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    Algorithm::EdDSA
                }
                // symmetric (`oct`) keys belong in auth.secret, never in a published key set
                _ => continue,
            };
            if let Some(named) = &jwk.common.key_algorithm
                && named.to_string() != format!("{alg:?}")
            {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let sane = match alg {
                Algorithm::ES256 => ec_algorithm(&key).is_ok(),
                Algorithm::EdDSA => ed_algorithm(&key).is_ok(),
                _ => true,
            };
            if sane {
                keys.push(VerifyKey {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                });
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "has no usable signing key ({total} key(s); supported: RSA for RS256, EC P-256 for ES256, Ed25519 for EdDSA)"
            ));
        }
        Ok(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key for a token signed with `alg` and naming `kid`. A key without a `kid` (a PEM
    /// key, an HS256 secret) serves any `kid`; a token without one is served only when a
    /// single key uses its algorithm, so one request costs at most one signature check.
    pub(super) fn select(&self, alg: Algorithm, kid: Option<&str>) -> Selection<'_> {
        let mut same_alg = self.keys.iter().filter(|k| k.alg == alg);
        let Some(first) = same_alg.clone().next() else {
            return Selection::NoAlgorithm;
        };
        match kid {
            Some(kid) => same_alg
                .clone()
                .find(|k| k.kid.as_deref() == Some(kid))
                .or_else(|| same_alg.find(|k| k.kid.is_none()))
                .map_or(Selection::UnknownKid, Selection::Found),
            None if same_alg.nth(1).is_none() => Selection::Found(first),
            None => Selection::Ambiguous,
        }
    }
}

/// ES256 for an uncompressed P-256 point; other curves are refused.
fn ec_algorithm(key: &DecodingKey) -> Result<Algorithm, String> {
    match key.kind() {
        DecodingKeyKind::SecretOrDer(point) if point.len() == 65 && point[0] == 4 => {
            Ok(Algorithm::ES256)
        }
        _ => Err("is an EC key on a curve other than P-256 (only ES256 is supported)".into()),
    }
}

/// EdDSA for a 32-byte Ed25519 key; Ed448 is refused.
fn ed_algorithm(key: &DecodingKey) -> Result<Algorithm, String> {
    match key.kind() {
        DecodingKeyKind::SecretOrDer(bytes) if bytes.len() == 32 => Ok(Algorithm::EdDSA),
        _ => Err("is an Edwards key other than Ed25519 (only Ed25519 is supported)".into()),
    }
}
