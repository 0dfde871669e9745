//! The HTTP transport of provider agents: one JSON POST over `http://` (local servers such as
//! ollama or vLLM, test mocks) or `https://` (rustls with the ring backend and the Mozilla root
//! store, so nothing depends on the system's OpenSSL), with a deadline, cancellation and a cap
//! on the response size.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use tokio::sync::watch;

/// Largest response body read (bytes).
pub(crate) const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Why a request got no HTTP answer. Messages never contain request headers (the API key).
#[derive(Debug)]
pub(crate) enum HttpError {
    /// The client could not be set up (TLS roots).
    Setup(String),
    BadUrl(String),
    /// Connecting failed (refused, DNS, TLS handshake).
    Connect(String),
    /// The connection broke or the body could not be read.
    Io(String),
    TooLarge,
    Timeout,
    Cancelled,
}

/// A client for one attempt (connections are not shared across runtimes).
pub(crate) struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpClient {
    pub fn new() -> Result<Self, HttpError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| HttpError::Setup(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(HttpClient {
            inner: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// POSTs `body` as JSON and returns the status and body of the answer, whatever the status.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
        timeout: Duration,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<(u16, Bytes), HttpError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| HttpError::BadUrl(format!("`{url}` is not a valid URL ({e})")))?;
        let mut req = hyper::Request::builder()
            .method(hyper::Method::POST)
            .uri(uri)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("smithers/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HttpError::BadUrl(format!("cannot build a request for `{url}` ({e})")))?;
        let exchange = async {
            let resp = self.inner.request(req).await.map_err(|e| {
                if e.is_connect() {
                    HttpError::Connect(smithers_core::error::chain(&e))
                } else {
                    HttpError::Io(smithers_core::error::chain(&e))
                }
            })?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        HttpError::TooLarge
                    } else {
                        HttpError::Io(e.to_string())
                    }
                })?
                .to_bytes();
            Ok((status, body))
        };
        let cancelled = async {
            loop {
                if *cancel.borrow() {
                    return;
                }
                if cancel.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, exchange) => r.unwrap_or(Err(HttpError::Timeout)),
            _ = cancelled => Err(HttpError::Cancelled),
        }
    }
}
