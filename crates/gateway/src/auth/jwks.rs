//! Keys from a JWKS URL: fetched at start, cached, re-fetched when they grow old or a token
//! names a key we do not have (rotation). Every fetch — whatever caused it — is at most one per
//! `refresh_interval`, so tokens with random `kid`s cannot make us hammer the key server; a fetch
//! has a deadline and a response-size cap, and a failed one keeps the previous keys.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use super::keys::KeySet;

/// How a JWKS URL is fetched and cached (the `[auth] jwks_*` keys).
#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub url: String,
    /// Keys older than this are re-fetched (in the background) on the next token.
    pub cache: Duration,
    /// At most one fetch per this interval, whatever triggers it.
    pub refresh_interval: Duration,
    /// Deadline of one fetch: connect, TLS, headers and body.
    pub timeout: Duration,
    /// Largest accepted response body.
    pub max_bytes: usize,
}

impl JwksSettings {
    pub const DEFAULT_CACHE_SECONDS: u64 = 300;
    pub const DEFAULT_REFRESH_INTERVAL_SECONDS: u64 = 30;
    pub const DEFAULT_TIMEOUT_SECONDS: u64 = 5;
    pub const DEFAULT_MAX_BYTES: usize = 256 * 1024;

    /// Settings with the defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> JwksSettings {
        JwksSettings {
            url: url.into(),
            cache: Duration::from_secs(Self::DEFAULT_CACHE_SECONDS),
            refresh_interval: Duration::from_secs(Self::DEFAULT_REFRESH_INTERVAL_SECONDS),
            timeout: Duration::from_secs(Self::DEFAULT_TIMEOUT_SECONDS),
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }
}

/// Checks a JWKS URL: `https://`, or plain `http://` to a loopback address only (keys fetched in
/// clear text over a network could be swapped by anyone on the path).
pub(super) fn parse_url(url: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("\"{url}\" is not a valid URL ({e})"))?;
    let host = uri.host().ok_or_else(|| format!("\"{url}\" has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        Some("http") => Err(format!(
            "\"{url}\" must use https (plain http is accepted only for loopback addresses)"
        )),
        _ => Err(format!("\"{url}\" must be an https:// URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The URL without credentials or query, for logs.
fn shown(uri: &hyper::Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.host().unwrap_or("?"),
        uri.port().map(|p| format!(":{p}")).unwrap_or_default()
    ) + uri.path()
}

struct State {
    keys: Arc<KeySet>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    in_flight: bool,
}

/// Why [`RemoteJwks::refresh`] did or did not start a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refresh {
    Started,
    AlreadyRunning,
    /// The last fetch began less than `refresh_interval` ago.
    TooSoon,
}

/// A cached, refreshed JWKS URL.
pub struct RemoteJwks {
    settings: JwksSettings,
    uri: hyper::Uri,
    state: Mutex<State>,
    /// Bumped after every fetch attempt, so waiters learn that one finished.
    attempts: watch::Sender<u64>,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("url", &shown(&self.uri))
            .field("keys", &self.keys().len())
            .finish()
    }
}

impl RemoteJwks {
    /// A cache for `settings.url` with no keys yet.
    pub fn new(settings: JwksSettings) -> Result<Arc<RemoteJwks>, String> {
        let uri = parse_url(&settings.url)?;
        Ok(Arc::new(RemoteJwks {
            settings,
            uri,
            state: Mutex::new(State {
                keys: Arc::new(KeySet::default()),
                fetched_at: None,
                last_attempt: None,
                in_flight: false,
            }),
            attempts: watch::channel(0).0,
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys we have now (empty until the first successful fetch).
    pub fn keys(&self) -> Arc<KeySet> {
        self.state().keys.clone()
    }

    /// Whether the keys are missing or older than `cache`.
    pub(super) fn stale(&self) -> bool {
        self.state()
            .fetched_at
            .is_none_or(|at| at.elapsed() >= self.settings.cache)
    }

    /// Claims the right to fetch now, under the rate limit.
    fn begin(&self) -> Refresh {
        let mut st = self.state();
        if st.in_flight {
            return Refresh::AlreadyRunning;
        }
        if st
            .last_attempt
            .is_some_and(|at| at.elapsed() < self.settings.refresh_interval)
        {
            return Refresh::TooSoon;
        }
        st.in_flight = true;
        st.last_attempt = Some(Instant::now());
        Refresh::Started
    }

    /// Starts a background fetch unless one is running or the rate limit forbids it.
    pub(super) fn refresh(self: &Arc<Self>) -> Refresh {
        let outcome = self.begin();
        if outcome == Refresh::Started {
            let me = self.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { me.fetch_and_store().await });
                }
                Err(_) => {
                    std::thread::spawn(move || me.fetch_on_own_runtime());
                }
            }
        }
        outcome
    }

    /// Starts a fetch if allowed and waits (up to the fetch deadline) for the one running to
    /// finish. Returns whether a fetch finished meanwhile, i.e. whether the keys may have changed.
    pub(super) async fn refresh_and_wait(self: &Arc<Self>) -> bool {
        let mut finished = self.attempts.subscribe();
        if self.refresh() == Refresh::TooSoon {
            return false;
        }
        let grace = self.settings.timeout + Duration::from_secs(1);
        matches!(
            tokio::time::timeout(grace, finished.changed()).await,
            Ok(Ok(()))
        )
    }

    /// The first fetch, at start: blocks the caller until it is done (it runs on a thread of its
    /// own, so this works inside or outside an async runtime). A failure is logged and the
    /// gateway starts anyway; tokens are refused until a later fetch succeeds.
    pub fn fetch_now_blocking(self: &Arc<Self>) {
        if self.begin() != Refresh::Started {
            return;
        }
        let me = self.clone();
        let _ = std::thread::spawn(move || me.fetch_on_own_runtime()).join();
    }

    fn fetch_on_own_runtime(self: Arc<Self>) {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(self.fetch_and_store()),
            Err(e) => self.store(Err(format!("cannot start a runtime for the fetch: {e}"))),
        }
    }

    async fn fetch_and_store(self: Arc<Self>) {
        let result = fetch(&self.uri, &self.settings).await;
        self.store(result);
    }

    fn store(&self, result: Result<KeySet, String>) {
        {
            let mut st = self.state();
            match result {
                Ok(keys) => {
                    tracing::info!(url = %shown(&self.uri), keys = keys.len(), "JWKS fetched");
                    st.keys = Arc::new(keys);
                    st.fetched_at = Some(Instant::now());
                }
                Err(error) => {
                    tracing::warn!(
                        url = %shown(&self.uri),
                        %error,
                        keys_kept = st.keys.len(),
                        retry_after_secs = self.settings.refresh_interval.as_secs(),
                        "JWKS fetch failed; keeping the previous keys"
                    );
                }
            }
            st.in_flight = false;
        }
        self.attempts.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// One GET of the key set: status 200, at most `max_bytes`, within `timeout`, no redirects.
async fn fetch(uri: &hyper::Uri, settings: &JwksSettings) -> Result<KeySet, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let request = hyper::Request::get(uri.clone())
        .header(hyper::header::ACCEPT, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("smithers/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let max = settings.max_bytes;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {}", smithers_core::error::chain(&e)))?;
        let status = response.status();
        if status != hyper::StatusCode::OK {
            return Err(format!("answered HTTP {status} (expected 200)"));
        }
        let declared = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return Err(format!(
                "response is larger than jwks_max_bytes ({max} bytes)"
            ));
        }
        let body = Limited::new(response.into_body(), max)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    format!("response is larger than jwks_max_bytes ({max} bytes)")
                } else {
                    format!("reading the response failed: {e}")
                }
            })?
            .to_bytes();
        KeySet::from_jwks(&body).map_err(|e| format!("response {e}"))
    };
    tokio::time::timeout(settings.timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no complete answer within jwks_timeout_seconds ({} s)",
                settings.timeout.as_secs()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_https_except_on_loopback() {
        for ok in [
            "https://idp.example/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9000/jwks",
        ] {
            assert!(parse_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example/jwks",
            "http://10.0.0.1/jwks",
            "ftp://idp.example/jwks",
            "not a url",
            "/relative/path",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn logged_url_drops_credentials_and_query() {
        let uri = parse_url("https://user:pw@idp.example:8443/keys?token=abc").unwrap_or_default();
        assert_eq!(shown(&uri), "https://idp.example:8443/keys");
    }

    #[test]
    fn refreshes_are_rate_limited_and_single_flight() {
        let mut settings = JwksSettings::new("http://127.0.0.1:9/jwks");
        settings.refresh_interval = Duration::from_secs(3600);
        let jwks = RemoteJwks::new(settings).unwrap_or_else(|e| panic!("{e}"));
        assert!(jwks.stale());
        assert_eq!(jwks.begin(), Refresh::Started);
        assert_eq!(jwks.begin(), Refresh::AlreadyRunning);
        jwks.store(Err("test".into()));
        assert_eq!(jwks.begin(), Refresh::TooSoon);
        assert!(jwks.stale(), "a failed fetch leaves the keys stale");
        assert!(jwks.keys().is_empty());
    }
}
