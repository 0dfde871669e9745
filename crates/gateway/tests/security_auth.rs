//! Authorization attacks against a real gateway over real sockets (HTTP `/rpc`, WebSocket
//! `connect`, `GET /metrics`). Every auth setup is written as `smithers.toml` text and goes
//! through the config parser, as an operator's would. Each test is named after what it blocks.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use smithers_gateway::auth::AuthConfig;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---- setup ------------------------------------------------------------------------------------

/// A gateway configured by `toml` (a whole `smithers.toml`), serving `workflows`.
async fn serve(toml: &str, workflows: Vec<(&'static str, String)>) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let cfg = smithers_gateway::config::parse(toml, "smithers.toml", dir.path())
        .unwrap_or_else(|e| panic!("config refused: {e}"));
    start_in(
        dir,
        Spec {
            workflows,
            auth: cfg.auth,
            config: cfg.server,
            ..Default::default()
        },
    )
    .await
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn now() -> i64 {
    smithers_engine::now_ms() / 1000
}

fn claims() -> Value {
    json!({"iss": "https://idp.test", "aud": "smithers", "sub": "joe",
           "scope": "read execute", "exp": now() + 600})
}

const JWT_HEAD: &str =
    "[auth]\nmode = \"jwt\"\nissuer = \"https://idp.test\"\naudience = \"smithers\"\n";

/// A token signed by the private key in fixture `key` with `alg`, naming `kid` if given.
fn sign(alg: Algorithm, key: &str, kid: Option<&str>, claims: &Value) -> String {
    let pem = read_fixture(key);
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no fixture for {other:?}"),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, &key).unwrap()
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

/// The public JWK of a fixture private key, with a `kid`.
fn jwk(alg: Algorithm, key: &str, kid: &str) -> Value {
    let pem = read_fixture(key);
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no fixture for {other:?}"),
    }
    .unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    serde_json::to_value(jwk).unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `runs.list` over HTTP with `token`: the status and the error message, if any.
async fn try_token(addr: std::net::SocketAddr, token: &str) -> (u16, Value) {
    let b = bearer(token);
    let r = rpc(addr, "runs.list", json!({}), &[("authorization", &b)]).await;
    (r.status, r.json()["error"]["message"].clone())
}

/// The WebSocket `connect` response for `token`.
async fn ws_connect(addr: std::net::SocketAddr, token: &str) -> Value {
    let mut w = ws(addr).await;
    let mut p = hello_params();
    p["auth"] = json!({"token": token});
    connect(&mut w, p).await
}

// ---- 1. approval scopes -----------------------------------------------------------------------

fn gated(allowed_scopes: &str) -> String {
    format!(
        "name: gated\nsteps:\n  - task: {{id: a, value: 1}}\n  - approval: {{id: gate, title: ok?, allowed_scopes: {allowed_scopes}}}\n  - task: {{id: b, value: 2}}\n"
    )
}

const TOKENS: &str = r#"[auth]
mode = "token"
[auth.tokens.runner]
scopes = ["execute"]
[auth.tokens.approver]
scopes = ["approve"]
[auth.tokens.admin]
scopes = ["admin"]
[auth.tokens.deployer]
scopes = ["approve", "deploy"]
[auth.tokens.root]
scopes = ["*"]
"#;

async fn waiting_run(s: &TestServer) -> String {
    let h = [("authorization", "Bearer runner")];
    let r = rpc(s.addr, "runs.create", json!({"workflow": "gated"}), &h).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["payload"]["runId"].as_str().unwrap().to_string();
    wait_status_auth(s.addr, &id, "waiting-approval", &h).await;
    id
}

async fn decide(s: &TestServer, id: &str, token: &str) -> (u16, Value) {
    let b = bearer(token);
    let r = rpc(
        s.addr,
        "approvals.decide",
        json!({"runId": id, "nodeId": "gate", "approved": true}),
        &[("authorization", &b)],
    )
    .await;
    (r.status, r.json()["error"]["message"].clone())
}

#[tokio::test]
async fn deploy_scoped_approval_refuses_plain_approve_token() {
    let s = serve(TOKENS, vec![("gated", gated("[deploy]"))]).await;
    let id = waiting_run(&s).await;
    let missing = json!("Connection is missing required approval scope");
    // upstream lets any approve-level token through, since "deploy" is read as a method name
    assert_eq!(decide(&s, &id, "approver").await, (403, missing.clone()));
    assert_eq!(decide(&s, &id, "admin").await, (403, missing));
    // over WebSocket too
    let mut w = ws(s.addr).await;
    let mut p = hello_params();
    p["auth"] = json!({"token": "approver"});
    assert_eq!(connect(&mut w, p).await["ok"], true);
    let mut evs = Vec::new();
    let r = call(
        &mut w,
        "d",
        "approvals.decide",
        json!({"runId": id, "nodeId": "gate", "approved": true}),
        &mut evs,
    )
    .await;
    assert_eq!(r["error"]["code"], "FORBIDDEN", "{r}");
    // holding the listed scope itself is what counts
    assert_eq!(decide(&s, &id, "deployer").await.0, 200);
    wait_status_auth(s.addr, &id, "finished", &[("authorization", "Bearer root")]).await;
}

#[tokio::test]
async fn admin_listed_approval_refuses_lower_levels() {
    let s = serve(TOKENS, vec![("gated", gated("[admin]"))]).await;
    let id = waiting_run(&s).await;
    // upstream: "admin" read as a method name needs only the read level, so approve passes
    assert_eq!(
        decide(&s, &id, "approver").await,
        (403, json!("Connection is missing required approval scope"))
    );
    assert_eq!(decide(&s, &id, "admin").await.0, 200);
}

#[tokio::test]
async fn star_token_and_higher_level_still_decide_level_listed_approvals() {
    let s = serve(TOKENS, vec![("gated", gated("[approve]"))]).await;
    let id = waiting_run(&s).await;
    assert_eq!(decide(&s, &id, "root").await.0, 200);
    let s = serve(TOKENS, vec![("gated", gated("[approve]"))]).await;
    let id = waiting_run(&s).await;
    assert_eq!(decide(&s, &id, "admin").await.0, 200);
}

// ---- 2. trusted proxy -------------------------------------------------------------------------

const PROXY: &str = "[auth]\nmode = \"trusted-proxy\"\n";

#[tokio::test]
async fn blank_proxy_scopes_header_grants_nothing() {
    let s = serve(PROXY, vec![("hello", HELLO.into())]).await;
    for blank in ["", " ", " , ", ",,"] {
        let r = rpc(
            s.addr,
            "runs.create",
            json!({"workflow": "hello"}),
            &[("x-user-id", "mallory"), ("x-user-scopes", blank)],
        )
        .await;
        assert_eq!(
            (r.status, r.json()["error"]["message"].clone()),
            (403, json!("Missing scope for runs.create")),
            "scopes header {blank:?}"
        );
        let r = rpc(s.addr, "runs.list", json!({}), &[("x-user-scopes", blank)]).await;
        assert_eq!(r.status, 403, "read needs a scope too, header {blank:?}");
    }
    // the WebSocket upgrade's headers count the same way
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/", s.addr).into_client_request().unwrap();
    req.headers_mut()
        .insert("x-user-scopes", " ".parse().unwrap());
    let (mut w, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = connect(&mut w, hello_params()).await;
    assert_eq!(hello["payload"]["auth"]["scopes"], json!([]), "{hello}");
}

#[tokio::test]
async fn absent_proxy_scopes_header_still_takes_default_scopes() {
    let s = serve(
        &format!("{PROXY}default_scopes = [\"read\"]\n"),
        vec![("hello", HELLO.into())],
    )
    .await;
    let r = rpc(s.addr, "runs.list", json!({}), &[("x-user-id", "pat")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = rpc(s.addr, "runs.create", json!({"workflow": "hello"}), &[]).await;
    assert_eq!(r.status, 403);
    let s = serve(PROXY, vec![("hello", HELLO.into())]).await;
    let r = rpc(s.addr, "runs.create", json!({"workflow": "hello"}), &[]).await;
    assert_eq!(
        r.status, 200,
        "upstream's default_scopes [\"*\"]: {}",
        r.body
    );
}

// ---- 3. /metrics ------------------------------------------------------------------------------

async fn scrape(s: &TestServer, headers: &[(&str, &str)]) -> (u16, String) {
    let r = http(s.addr, "GET", "/metrics", headers, b"").await;
    (r.status, r.body)
}

fn unauthorized(body: &str) -> bool {
    serde_json::from_str::<Value>(body).is_ok_and(|v| v["error"]["code"] == "UNAUTHORIZED")
}

#[tokio::test]
async fn anonymous_metrics_scrape_is_refused_in_token_mode() {
    let s = serve(TOKENS, vec![]).await;
    let (status, body) = scrape(&s, &[]).await;
    assert!(status == 401 && unauthorized(&body), "{status} {body}");
    let (status, body) = scrape(&s, &[("authorization", "Bearer wrong")]).await;
    assert!(status == 401 && unauthorized(&body), "{status} {body}");
    let (status, body) = scrape(&s, &[("authorization", "Bearer runner")]).await;
    assert_eq!(status, 200);
    assert!(body.contains("smithers_gateway_"), "{body}");
    let (status, _) = scrape(&s, &[("x-smithers-key", "approver")]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn anonymous_metrics_scrape_is_refused_in_jwt_mode() {
    let s = serve(&format!("{JWT_HEAD}secret = \"k3y\"\n"), vec![]).await;
    let (status, body) = scrape(&s, &[]).await;
    assert!(status == 401 && unauthorized(&body), "{status} {body}");
    let forged = hs256(b"not-the-key", &claims());
    let (status, body) = scrape(&s, &[("authorization", &bearer(&forged))]).await;
    assert!(status == 401 && unauthorized(&body), "{status} {body}");
    let good = hs256(b"k3y", &claims());
    assert_eq!(
        scrape(&s, &[("authorization", &bearer(&good))]).await.0,
        200
    );
}

#[tokio::test]
async fn anonymous_metrics_scrape_is_refused_in_trusted_proxy_mode() {
    let s = serve(
        &format!("{PROXY}allowed_origins = [\"https://app.test\"]\n"),
        vec![],
    )
    .await;
    let (status, body) = scrape(&s, &[]).await;
    assert!(status == 401 && unauthorized(&body), "{status} {body}");
    let (status, _) = scrape(&s, &[("origin", "https://evil.test")]).await;
    assert_eq!(status, 401);
    let (status, body) = scrape(&s, &[("origin", "https://app.test")]).await;
    assert_eq!(status, 200, "{body}");
    // a proxy that asserts no scopes gets no metrics either
    let (status, body) = scrape(&s, &[("origin", "https://app.test"), ("x-user-scopes", "")]).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn metrics_auth_false_opens_metrics_deliberately() {
    let s = serve(&format!("[server]\nmetrics_auth = false\n{TOKENS}"), vec![]).await;
    let (status, body) = scrape(&s, &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("smithers_gateway_"), "{body}");
    // and auth none keeps it open, as before
    let s = serve("", vec![]).await;
    assert_eq!(scrape(&s, &[]).await.0, 200);
}

// ---- 4. JWT -----------------------------------------------------------------------------------

#[tokio::test]
async fn string_exp_jwt_is_refused() {
    let s = serve(&format!("{JWT_HEAD}secret = \"k3y\"\n"), vec![]).await;
    let msg = json!("JWT exp claim must be a number (seconds since the epoch)");
    let mut c = claims();
    // upstream ignores a non-number exp, so this token would never expire
    c["exp"] = json!("1");
    let token = hs256(b"k3y", &c);
    assert_eq!(try_token(s.addr, &token).await, (401, msg.clone()));
    let hello = ws_connect(s.addr, &token).await;
    assert_eq!(
        (
            hello["error"]["code"].clone(),
            hello["error"]["message"].clone()
        ),
        (json!("UNAUTHORIZED"), msg)
    );
    for (claim, value) in [("nbf", json!("0")), ("iat", json!(null))] {
        let mut c = claims();
        c[claim] = value;
        let (status, message) = try_token(s.addr, &hs256(b"k3y", &c)).await;
        assert_eq!(status, 401);
        assert!(
            message.as_str().unwrap_or("").contains(claim),
            "{claim}: {message}"
        );
    }
    assert_eq!(try_token(s.addr, &hs256(b"k3y", &claims())).await.0, 200);
}

#[tokio::test]
async fn immortal_jwt_without_exp_is_refused_unless_require_exp_is_false() {
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    let token = hs256(b"k3y", &c);
    let s = serve(&format!("{JWT_HEAD}secret = \"k3y\"\n"), vec![]).await;
    let (status, message) = try_token(s.addr, &token).await;
    assert_eq!(status, 401);
    assert!(
        message.as_str().unwrap_or("").contains("no exp claim"),
        "{message}"
    );
    let s = serve(
        &format!("{JWT_HEAD}secret = \"k3y\"\nrequire_exp = false\n"),
        vec![],
    )
    .await;
    assert_eq!(try_token(s.addr, &token).await.0, 200);
}

fn pem_config(file: &str) -> String {
    format!("{JWT_HEAD}public_key_path = \"{}\"\n", fixture(file))
}

#[tokio::test]
async fn hs256_token_cannot_pass_as_rs256_key_confusion() {
    let s = serve(&pem_config("rsa-a.pub.pem"), vec![]).await;
    // the classic attack: HMAC keyed with the (public) PEM text of the server's RSA key
    let pem = read_fixture("rsa-a.pub.pem");
    let forged = hs256(&pem, &claims());
    let unsupported = (401, json!("Unsupported JWT algorithm"));
    assert_eq!(try_token(s.addr, &forged).await, unsupported);
    let trimmed = hs256(String::from_utf8(pem).unwrap().trim().as_bytes(), &claims());
    assert_eq!(try_token(s.addr, &trimmed).await, unsupported);
    // the real RS256 token passes, over HTTP and WebSocket
    let good = sign(Algorithm::RS256, "rsa-a.key.pem", None, &claims());
    assert_eq!(try_token(s.addr, &good).await.0, 200);
    let hello = ws_connect(s.addr, &good).await;
    assert_eq!(hello["payload"]["auth"]["userId"], "joe", "{hello}");
}

#[tokio::test]
async fn alg_none_token_is_refused() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let s = serve(&pem_config("rsa-a.pub.pem"), vec![]).await;
    let head = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64.encode(claims().to_string());
    assert_eq!(
        try_token(s.addr, &format!("{head}.{body}.")).await,
        (401, json!("JWT must have three segments"))
    );
    for sig in ["x", "AAAA"] {
        assert_eq!(
            try_token(s.addr, &format!("{head}.{body}.{sig}")).await,
            (401, json!("Unsupported JWT algorithm"))
        );
    }
    // a real signature under a header that was edited afterwards does not verify
    let good = sign(Algorithm::RS256, "rsa-a.key.pem", None, &claims());
    let sig = good.rsplit('.').next().unwrap();
    let rs_head = b64.encode(br#"{"alg":"RS256","typ":"JWT","x":1}"#);
    assert_eq!(
        try_token(s.addr, &format!("{rs_head}.{body}.{sig}")).await,
        (401, json!("JWT signature verification failed"))
    );
}

#[tokio::test]
async fn tokens_signed_by_another_key_are_refused_for_rs256_es256_eddsa() {
    let cases = [
        (Algorithm::RS256, "rsa-a", Algorithm::ES256, "ec-p256"),
        (Algorithm::ES256, "ec-p256", Algorithm::EdDSA, "ed25519"),
        (Algorithm::EdDSA, "ed25519", Algorithm::RS256, "rsa-a"),
    ];
    for (alg, key, other_alg, other_key) in cases {
        let s = serve(&pem_config(&format!("{key}.pub.pem")), vec![]).await;
        let good = sign(alg, &format!("{key}.key.pem"), None, &claims());
        assert_eq!(try_token(s.addr, &good).await.0, 200, "{alg:?}");
        // a valid token of another key type: the key decides the algorithm
        let other = sign(other_alg, &format!("{other_key}.key.pem"), None, &claims());
        assert_eq!(
            try_token(s.addr, &other).await,
            (401, json!("Unsupported JWT algorithm")),
            "{other_alg:?} against a {alg:?} key"
        );
        // tampered claims under the real signature
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        let mut c = claims();
        c["scope"] = json!("admin");
        use base64::Engine as _;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.to_string());
        assert_eq!(
            try_token(s.addr, &parts.join(".")).await,
            (401, json!("JWT signature verification failed")),
            "{alg:?}"
        );
    }
    // same algorithm, another RSA key
    let s = serve(&pem_config("rsa-a.pub.pem"), vec![]).await;
    let foreign = sign(Algorithm::RS256, "rsa-b.key.pem", None, &claims());
    assert_eq!(
        try_token(s.addr, &foreign).await,
        (401, json!("JWT signature verification failed"))
    );
}

#[tokio::test]
async fn jwks_file_refuses_unknown_kid_and_wrong_key_for_kid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let set = json!({"keys": [
        jwk(Algorithm::RS256, "rsa-a.key.pem", "a"),
        jwk(Algorithm::ES256, "ec-p256.key.pem", "e"),
        jwk(Algorithm::EdDSA, "ed25519.key.pem", "d"),
    ]});
    std::fs::write(&path, set.to_string()).unwrap();
    let s = serve(
        &format!("{JWT_HEAD}jwks_path = \"{}\"\n", path.display()),
        vec![],
    )
    .await;
    for (alg, key, kid) in [
        (Algorithm::RS256, "rsa-a.key.pem", "a"),
        (Algorithm::ES256, "ec-p256.key.pem", "e"),
        (Algorithm::EdDSA, "ed25519.key.pem", "d"),
    ] {
        let t = sign(alg, key, Some(kid), &claims());
        assert_eq!(try_token(s.addr, &t).await.0, 200, "{alg:?}");
        // without a kid, a single key of the algorithm is found
        let t = sign(alg, key, None, &claims());
        assert_eq!(try_token(s.addr, &t).await.0, 200, "{alg:?} without kid");
    }
    let unknown = (401, json!("JWT kid matches no configured key"));
    let t = sign(Algorithm::RS256, "rsa-a.key.pem", Some("zzz"), &claims());
    assert_eq!(try_token(s.addr, &t).await, unknown);
    // kid "e" names the EC key, which cannot verify RS256
    let t = sign(Algorithm::RS256, "rsa-a.key.pem", Some("e"), &claims());
    assert_eq!(try_token(s.addr, &t).await, unknown);
    // kid "a" with a signature by another RSA key
    let t = sign(Algorithm::RS256, "rsa-b.key.pem", Some("a"), &claims());
    assert_eq!(
        try_token(s.addr, &t).await,
        (401, json!("JWT signature verification failed"))
    );
}

// ---- JWKS URL ---------------------------------------------------------------------------------

/// A JWKS server on a thread of its own: answers every request with the current document (or
/// never answers when `hang` is set) and counts the requests.
struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    doc: Arc<Mutex<String>>,
}

impl JwksServer {
    fn start(doc: String, hang: bool) -> JwksServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let doc = Arc::new(Mutex::new(doc));
        let (h, d) = (hits.clone(), doc.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                if hang {
                    held.push(conn);
                    continue;
                }
                let body = d.lock().unwrap().clone();
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        JwksServer { url, hits, doc }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn jwks_doc(keys: &[(Algorithm, &str, &str)]) -> String {
    let keys: Vec<Value> = keys.iter().map(|(a, k, kid)| jwk(*a, k, kid)).collect();
    json!({ "keys": keys }).to_string()
}

fn url_config(url: &str, extra: &str) -> String {
    format!("{JWT_HEAD}jwks_url = \"{url}\"\n{extra}")
}

#[tokio::test]
async fn random_kid_flood_cannot_hammer_the_jwks_server() {
    let idp = JwksServer::start(jwks_doc(&[(Algorithm::RS256, "rsa-a.key.pem", "a")]), false);
    let s = serve(
        &url_config(&idp.url, "jwks_refresh_interval_seconds = 3600\n"),
        vec![],
    )
    .await;
    assert_eq!(idp.hits(), 1, "the key set is fetched once at start");
    // cached: valid tokens do not fetch again
    for _ in 0..5 {
        let t = sign(Algorithm::RS256, "rsa-a.key.pem", Some("a"), &claims());
        assert_eq!(try_token(s.addr, &t).await.0, 200);
    }
    // an attacker's random kids: refused, and no fetch within the refresh interval
    for i in 0..30 {
        let t = sign(
            Algorithm::RS256,
            "rsa-b.key.pem",
            Some(&format!("x{i}")),
            &claims(),
        );
        let (status, message) = try_token(s.addr, &t).await;
        assert_eq!(status, 401);
        assert_eq!(message, json!("JWT kid matches no configured key"));
        let hello = ws_connect(s.addr, &t).await;
        assert_eq!(hello["error"]["code"], "UNAUTHORIZED");
    }
    assert_eq!(
        idp.hits(),
        1,
        "unknown kids must not hammer the JWKS server"
    );
}

#[tokio::test]
async fn rotated_jwks_key_is_fetched_on_unknown_kid() {
    let idp = JwksServer::start(jwks_doc(&[(Algorithm::RS256, "rsa-a.key.pem", "a")]), false);
    let s = serve(
        &url_config(&idp.url, "jwks_refresh_interval_seconds = 1\n"),
        vec![],
    )
    .await;
    assert_eq!(idp.hits(), 1);
    let a = sign(Algorithm::RS256, "rsa-a.key.pem", Some("a"), &claims());
    assert_eq!(try_token(s.addr, &a).await.0, 200);
    // the identity provider rotates in key b
    *idp.doc.lock().unwrap() = jwks_doc(&[
        (Algorithm::RS256, "rsa-a.key.pem", "a"),
        (Algorithm::ES256, "ec-p256.key.pem", "b"),
    ]);
    let b = sign(Algorithm::ES256, "ec-p256.key.pem", Some("b"), &claims());
    let mut accepted = false;
    for _ in 0..100 {
        let (status, message) = try_token(s.addr, &b).await;
        if status == 200 {
            accepted = true;
            break;
        }
        assert_eq!(status, 401, "{message}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        accepted,
        "the token of the rotated-in key was never accepted"
    );
    assert_eq!(idp.hits(), 2, "one re-fetch for the new kid");
    assert_eq!(try_token(s.addr, &a).await.0, 200);
    assert_eq!(idp.hits(), 2, "the new set is cached");
}

#[tokio::test]
async fn oversized_jwks_response_cannot_install_keys() {
    let mut doc: Value =
        serde_json::from_str(&jwks_doc(&[(Algorithm::RS256, "rsa-a.key.pem", "a")])).unwrap();
    doc["padding"] = json!("p".repeat(64 * 1024));
    let idp = JwksServer::start(doc.to_string(), false);
    let s = serve(
        &url_config(
            &idp.url,
            "jwks_max_bytes = 4096\njwks_refresh_interval_seconds = 3600\n",
        ),
        vec![],
    )
    .await;
    assert_eq!(idp.hits(), 1);
    let t = sign(Algorithm::RS256, "rsa-a.key.pem", Some("a"), &claims());
    assert_eq!(try_token(s.addr, &t).await.0, 401);
    // the same document within the cap is accepted
    let idp = JwksServer::start(doc.to_string(), false);
    let s = serve(&url_config(&idp.url, "jwks_max_bytes = 1048576\n"), vec![]).await;
    assert_eq!(try_token(s.addr, &t).await.0, 200);
}

#[tokio::test]
async fn silent_jwks_server_cannot_stall_startup_forever() {
    let idp = JwksServer::start(String::new(), true);
    // returns once jwks_timeout_seconds has passed; the gateway serves and refuses tokens
    let s = serve(&url_config(&idp.url, "jwks_timeout_seconds = 1\n"), vec![]).await;
    let t = sign(Algorithm::RS256, "rsa-a.key.pem", Some("a"), &claims());
    assert_eq!(try_token(s.addr, &t).await.0, 401);
    let r = rpc(s.addr, "health", json!({}), &[]).await;
    assert_eq!(r.status, 401, "health over /rpc needs a credential too");
    let r = http(s.addr, "GET", "/health", &[], b"").await;
    assert_eq!(r.status, 200);
}

#[test]
fn auth_none_is_still_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = smithers_gateway::config::parse("", "smithers.toml", dir.path()).unwrap();
    assert!(matches!(cfg.auth, AuthConfig::None));
    assert!(!cfg.server.metrics_auth);
}

/// The awaiting variant (for call sites that can await): the first token of a rotated-in key
/// passes at once, because the re-fetch it triggers is waited for.
#[tokio::test]
async fn rotated_jwks_key_passes_at_once_with_authenticate_async() {
    let idp = JwksServer::start(jwks_doc(&[(Algorithm::RS256, "rsa-a.key.pem", "a")]), false);
    let dir = tempfile::tempdir().unwrap();
    let cfg = smithers_gateway::config::parse(
        &url_config(&idp.url, "jwks_refresh_interval_seconds = 1\n"),
        "smithers.toml",
        dir.path(),
    )
    .unwrap();
    let headers = axum::http::HeaderMap::new();
    *idp.doc.lock().unwrap() = jwks_doc(&[(Algorithm::EdDSA, "ed25519.key.pem", "d")]);
    let d = sign(Algorithm::EdDSA, "ed25519.key.pem", Some("d"), &claims());
    // wait out the refresh interval that the start-up fetch opened (polled, not timed)
    let mut grant = Err(String::new());
    for _ in 0..50 {
        let before = idp.hits();
        grant = cfg
            .auth
            .authenticate_async("http", Some(&d), &headers, now())
            .await
            .map_err(|e| e.message);
        if grant.is_ok() {
            // the very call that triggered the re-fetch waited for it and passed
            assert_eq!((before, idp.hits()), (1, 2));
            break;
        }
        assert_eq!(
            idp.hits(),
            1,
            "refused calls inside the interval fetch nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(grant.map(|g| g.user_id), Ok(Some("joe".to_string())));
    // an unknown kid right after: refused without another fetch (rate limit)
    let x = sign(Algorithm::EdDSA, "ed25519.key.pem", Some("x"), &claims());
    let refused = cfg
        .auth
        .authenticate_async("http", Some(&x), &headers, now())
        .await;
    assert_eq!(
        refused.map_err(|e| e.message),
        Err("JWT kid matches no configured key".to_string())
    );
    assert_eq!(idp.hits(), 2);
}
