//! Unit tests of the auth module: modes, HS256 JWT checks in upstream's order, the config
//! section. Public-key algorithms and JWKS are tested black-box in `tests/security_auth.rs`.

use super::*;
use axum::http::HeaderValue;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2_010::Sha256;

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
    let header = base64::engine::general_purpose::URL_SAFE.encode(br#"{"alg":"HS256","t":"a"}"#);
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
        json!({"alg": "HS512"}),
        json!({"alg": "EdDSA"}),
        json!({"alg": ["HS256"]}),
        json!({"typ": "JWT"}),
        json!({"alg": "HS256", "crit": ["exp"]}),
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
    // Deviation: a non-numeric exp is refused (upstream ignored it), and so is a missing one
    // unless require_exp = false.
    for bad in [
        json!("0"),
        json!("9999999999"),
        json!(true),
        json!([1]),
        json!({}),
    ] {
        assert_eq!(
            err(check_jwt(&jwt(claims_with(json!({"exp": bad}))))),
            "JWT exp claim must be a number (seconds since the epoch)"
        );
    }
    let mut no_exp = claims_with(json!({}));
    if let Value::Object(m) = &mut no_exp {
        m.remove("exp");
    }
    assert_eq!(
        err(check_jwt(&jwt(no_exp.clone()))),
        "JWT has no exp claim (tokens must expire; auth.require_exp = false accepts them)"
    );
    let mut lax = JwtConfig::new("https://issuer", strings(&["smithers"]), SECRET.to_vec());
    lax.require_exp = false;
    let lax = AuthConfig::Jwt(lax);
    assert!(
        lax.authenticate(Some(&jwt(no_exp)), &no_headers(), NOW)
            .is_ok()
    );
    // require_exp = false still refuses a string exp.
    assert_eq!(
        err(lax.authenticate(
            Some(&jwt(claims_with(json!({"exp": "0"})))),
            &no_headers(),
            NOW
        )),
        "JWT exp claim must be a number (seconds since the epoch)"
    );
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
    assert_eq!(
        err(check_jwt(&jwt(claims_with(json!({"nbf": "tomorrow"}))))),
        "JWT nbf claim must be a number (seconds since the epoch)"
    );
}

#[test]
fn jwt_iat_must_be_a_number() {
    assert!(check_jwt(&jwt(claims_with(json!({"iat": NOW - 5})))).is_ok());
    assert!(check_jwt(&jwt(claims_with(json!({"iat": NOW as f64 + 0.5})))).is_ok());
    assert_eq!(
        err(check_jwt(&jwt(claims_with(json!({"iat": "now"}))))),
        "JWT iat claim must be a number (seconds since the epoch)"
    );
    // Type checks come after the issuer, audience and expiry checks of §2.3.
    assert_eq!(
        err(check_jwt(&jwt(claims_with(
            json!({"iat": "now", "exp": 1})
        )))),
        "JWT has expired"
    );
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
    assert!(shown.contains("HS256"), "{shown}");
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
    // Empty user and role fall back to the defaults; a present but blank scopes header grants
    // nothing (deviation: upstream granted the default "*").
    for blank in ["", " ", " , ", "\t,"] {
        let h = headers(&[
            ("x-user-id", ""),
            ("x-user-scopes", blank),
            ("x-user-role", ""),
        ]);
        assert_eq!(
            cfg.authenticate(None, &h, NOW),
            Ok(grant("operator", &[], None)),
            "{blank:?}"
        );
    }
    // An unreadable (non-UTF-8) scopes header is present too: no scopes.
    let mut h = HeaderMap::new();
    h.insert(
        "x-user-scopes",
        HeaderValue::from_bytes(b"\xff").unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(
        cfg.authenticate(None, &h, NOW).map(|g| g.scopes),
        Ok(vec![])
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
        build_err(json!({"mode": "token", "tokens": {"": {"scopes": []}}})).contains("auth.tokens")
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
        build_err(json!({"mode": "jwt", "audience": "a", "secret": "s"})).contains("auth.issuer")
    );
    assert!(
        build_err(json!({"mode": "jwt", "issuer": "i", "secret": "s"})).contains("auth.audience")
    );
    assert!(
        build_err(json!({"mode": "jwt", "issuer": "i", "audience": [], "secret": "s"}))
            .contains("auth.audience")
    );
    assert!(
        build_err(jwt_base(json!({"secret": "s", "role_claim": ""}))).contains("auth.role_claim")
    );
    assert!(
        build_err(jwt_base(json!({"secret": "s", "allowed_origins": []})))
            .contains("auth.allowed_origins")
    );

    let e = build_err(json!({"mode": "trusted-proxy", "trusted_headers": ["ok", "bad header"]}));
    assert!(e.contains("auth.trusted_headers[1]"), "{e}");
    assert!(
        build_err(json!({"mode": "trusted-proxy", "trusted_headers": ["a", "b", "c", "d"]}))
            .contains("auth.trusted_headers")
    );

    // Unknown keys are rejected by serde.
    assert!(serde_json::from_value::<AuthSection>(json!({"mode": "none", "bogus": 1})).is_err());
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

// ---- key sources ----------------------------------------------------------------------------

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn jwt_section(extra: Value) -> Value {
    let mut v = json!({"mode": "jwt", "issuer": "https://issuer", "audience": "smithers"});
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

#[test]
fn pem_keys_get_the_algorithm_of_their_type() {
    for (file, alg) in [
        ("rsa-a.pub.pem", "RS256"),
        ("ec-p256.pub.pem", "ES256"),
        ("ed25519.pub.pem", "EdDSA"),
    ] {
        let cfg = section(jwt_section(json!({"public_key_path": fixture(file)})))
            .build_with_env(no_env)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let shown = format!("{cfg:?}");
        assert!(shown.contains(alg), "{file}: {shown}");
    }
}

#[test]
fn key_source_errors_name_the_key() {
    let e = build_err(jwt_section(
        json!({"secret": "s", "public_key_path": "k.pem"}),
    ));
    assert!(e.contains("mutually exclusive"), "{e}");
    let e = build_err(jwt_section(
        json!({"jwks_path": "a.json", "jwks_url": "https://x/jwks"}),
    ));
    assert!(e.contains("mutually exclusive"), "{e}");
    let e = build_err(jwt_section(
        json!({"secret": "s", "jwks_cache_seconds": 10}),
    ));
    assert!(
        e.contains("auth.jwks_cache_seconds") && e.contains("auth.jwks_url"),
        "{e}"
    );
    let e = build_err(jwt_section(
        json!({"public_key_path": "/nonexistent/k.pem"}),
    ));
    assert!(
        e.contains("auth.public_key_path") && e.contains("/nonexistent/k.pem"),
        "{e}"
    );
    let e = build_err(jwt_section(
        json!({"public_key_path": fixture("rsa-a.key.pem")}),
    ));
    assert!(
        e.contains("auth.public_key_path") && e.contains("private key"),
        "{e}"
    );
    // the error must not echo the key material
    assert!(!e.contains("MII"), "{e}");
    let e = build_err(jwt_section(
        json!({"public_key_path": fixture("ec-p384.pub.pem")}),
    ));
    assert!(
        e.contains("auth.public_key_path") && e.contains("P-256"),
        "{e}"
    );
    let e = build_err(jwt_section(
        json!({"public_key_path": fixture("README.md")}),
    ));
    assert!(
        e.contains("auth.public_key_path") && e.contains("PEM"),
        "{e}"
    );
    let e = build_err(jwt_section(json!({"jwks_path": fixture("README.md")})));
    assert!(e.contains("auth.jwks_path") && e.contains("JWKS"), "{e}");
    let e = build_err(jwt_section(json!({"jwks_url": "http://idp.example/jwks"})));
    assert!(e.contains("auth.jwks_url") && e.contains("https"), "{e}");
    for key in [
        "jwks_cache_seconds",
        "jwks_refresh_interval_seconds",
        "jwks_timeout_seconds",
        "jwks_max_bytes",
    ] {
        let mut extra = json!({"jwks_url": "https://idp.example/jwks"});
        extra[key] = json!(0);
        let e = build_err(jwt_section(extra));
        assert!(
            e.contains(&format!("auth.{key}")) && e.contains("at least 1"),
            "{e}"
        );
    }
    let e = build_err(jwt_section(json!({"secret_env": "EMPTY"})));
    assert!(e.contains("auth.secret_env"), "{e}");
    assert!(
        build_err(json!({"mode": "token", "tokens": {"t": {"scopes": []}}, "require_exp": false}))
            .contains("auth.require_exp")
    );
}

#[test]
fn jwks_documents_keep_only_usable_signing_keys() {
    // an `oct` key, an encryption key and a key whose alg contradicts its type: none usable
    let doc = json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "use": "enc"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "alg": "RS256"}
    ]});
    let e = KeySet::from_jwks(doc.to_string().as_bytes())
        .err()
        .unwrap_or_default();
    assert!(
        e.contains("no usable signing key") && e.contains("3 key"),
        "{e}"
    );
    let doc = json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed"}
    ]});
    let set = KeySet::from_jwks(doc.to_string().as_bytes()).unwrap_or_default();
    assert_eq!(set.len(), 1, "{set:?}");
    assert!(KeySet::from_jwks(b"{\"keys\": 5}").is_err());
}
