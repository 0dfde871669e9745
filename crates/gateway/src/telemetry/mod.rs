//! OpenTelemetry traces: with an OTLP endpoint configured, `serve` exports one span per run and
//! one per task attempt over OTLP/HTTP (JSON encoding) to a collector.
//!
//! Export never slows runs down: spans are built from the engine's event bus (a lagging reader
//! loses events, it does not block the engine), batched (up to [`BATCH`] spans or every
//! [`FLUSH`]), and posted by at most [`IN_FLIGHT`] requests at a time; a batch that finds no free
//! slot, or whose post fails, is dropped with a (rate-limited) warning.

pub mod spans;

use crate::gateway::Gateway;
use crate::log_rate::LogRate;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use spans::{Produced, Span, Tracker};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Spans per request.
pub const BATCH: usize = 512;
/// A partial batch is sent after this long.
pub const FLUSH: Duration = Duration::from_secs(1);
/// Requests to the collector at once.
pub const IN_FLIGHT: usize = 4;
/// One export request may take this long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

static EXPORT_FAILED: LogRate = LogRate::new(60_000);
static EVENTS_LOST: LogRate = LogRate::new(60_000);

/// Where spans go and under which service name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// The full traces URL (`…/v1/traces`).
    pub traces_url: String,
    pub service_name: String,
}

impl TelemetryConfig {
    /// From `[telemetry]` and the standard OpenTelemetry variables, which win:
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the traces URL as is), `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// and `otlp_endpoint` (a base URL: `/v1/traces` is appended), `OTEL_SERVICE_NAME` and
    /// `service_name` (default `smithers`). `None` when no endpoint is set.
    pub fn resolve(
        file_endpoint: Option<&str>,
        file_service: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<TelemetryConfig> {
        let base = |b: &str| {
            let b = b.trim().trim_end_matches('/');
            if b.ends_with("/v1/traces") {
                b.to_string()
            } else {
                format!("{b}/v1/traces")
            }
        };
        let traces_url = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .map(|u| u.trim().to_string())
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|b| base(&b)))
            .or_else(|| file_endpoint.map(base))?;
        let service_name = env("OTEL_SERVICE_NAME")
            .or_else(|| file_service.map(str::to_string))
            .unwrap_or_else(|| "smithers".into());
        Some(TelemetryConfig {
            traces_url,
            service_name,
        })
    }

    /// Checks the URL once, at start (`http://` or `https://`, a host).
    pub fn uri(&self) -> Result<hyper::Uri, String> {
        let uri: hyper::Uri = self
            .traces_url
            .parse()
            .map_err(|e| format!("telemetry endpoint `{}`: {e}", self.traces_url))?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(_)) => Ok(uri),
            _ => Err(format!(
                "telemetry endpoint `{}` must be an http:// or https:// URL, e.g. http://127.0.0.1:4318",
                self.traces_url
            )),
        }
    }
}

/// Starts exporting the spans of the runs this node drives.
pub fn start(
    gw: Arc<Gateway>,
    cfg: TelemetryConfig,
    uri: hyper::Uri,
) -> tokio::task::JoinHandle<()> {
    let mut events = gw.engine.subscribe();
    tracing::info!(endpoint = %cfg.traces_url, service = %cfg.service_name, "exporting traces over OTLP/HTTP");
    tokio::spawn(async move {
        let exporter = Arc::new(Exporter::new(uri, cfg.service_name));
        let mut tracker = Tracker::default();
        let mut batch: Vec<Span> = Vec::new();
        let mut flush = tokio::time::interval(FLUSH);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        match tracker.on_event(ev.event_type, &ev.run_id, ev.timestamp_ms, &ev.payload) {
                            Produced::Nothing => {}
                            Produced::Attempt(span) => batch.push(span),
                            Produced::Run(end) => {
                                let (workflow, created) = match gw.store.get_run(&end.run_id).await {
                                    Ok(Some(row)) => (row.workflow_name, row.created_at_ms),
                                    _ => (String::new(), end.end_ms),
                                };
                                // only a run resumed here can have ended before
                                let earlier = match end.resumed_at_ms {
                                    Some(at) => earlier_ends(gw.store.as_ref(), &end.run_id, ev.seq, at).await,
                                    None => None,
                                };
                                batch.push(spans::run_span(&end, &workflow, created, earlier));
                            }
                        }
                        if batch.len() >= BATCH {
                            exporter.send(std::mem::take(&mut batch));
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        if let Some(more) = EVENTS_LOST.allow() {
                            tracing::warn!(events = n, earlier_warnings_left_out = more, "telemetry fell behind the engine; spans of those events are missing");
                        }
                    }
                    Err(RecvError::Closed) => break,
                },
                _ = flush.tick() => {
                    if !batch.is_empty() {
                        exporter.send(std::mem::take(&mut batch));
                    }
                }
            }
        }
        if !batch.is_empty() {
            exporter.send(batch);
        }
    })
}

/// Events read per page while counting a run's earlier ends.
const EVENTS_PAGE: usize = 1_000;

/// How often the run had ended before its event `seq`, and when its execution that ends at
/// `seq` was resumed (read from its stored events; `resumed_at_ms`, this process's last resume,
/// if they do not say). `None` when the events cannot be read: the span is then exported as
/// the run's own.
async fn earlier_ends(
    store: &dyn smithers_store::Store,
    run_id: &str,
    seq: i64,
    resumed_at_ms: i64,
) -> Option<spans::EarlierEnds> {
    let mut found = spans::EarlierEnds {
        count: 0,
        resumed_at_ms,
    };
    let mut resume_pending = false;
    let mut after = None;
    loop {
        let page = match store.list_events(run_id, after, EVENTS_PAGE).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(run_id, code = %e.code, error = %e.message, "cannot read the run's events to tell whether it ended before; its span is exported as the run's own");
                return None;
            }
        };
        for ev in page.iter().take_while(|ev| ev.seq < seq) {
            match ev.event_type.as_str() {
                "RunFinished" | "RunFailed" | "RunCancelled" => {
                    found.count += 1;
                    resume_pending = true;
                }
                // the first resume after an end starts the next execution (later ones only
                // continue it, after an approval or a wait)
                "RunResumed" if resume_pending => {
                    found.resumed_at_ms = ev.timestamp_ms;
                    resume_pending = false;
                }
                _ => {}
            }
        }
        match page.last() {
            Some(last) if last.seq < seq && page.len() == EVENTS_PAGE => after = Some(last.seq),
            _ => return Some(found),
        }
    }
}

type HttpClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// Posts batches to the collector, at most [`IN_FLIGHT`] at a time.
struct Exporter {
    uri: hyper::Uri,
    service_name: String,
    client: Option<HttpClient>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Exporter {
    fn new(uri: hyper::Uri, service_name: String) -> Exporter {
        let client = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map(|b| {
                let https = b.https_or_http().enable_http1().build();
                Client::builder(TokioExecutor::new()).build(https)
            })
            .map_err(|e| tracing::warn!(error = %e, "telemetry: TLS setup failed; no spans are exported"))
            .ok();
        Exporter {
            uri,
            service_name,
            client,
            slots: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
        }
    }

    fn send(&self, batch: Vec<Span>) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            warn_failed(
                batch.len(),
                "the collector is slow: every export slot is busy",
            );
            return;
        };
        let body = spans::encode(&batch, &self.service_name).to_string();
        let uri = self.uri.clone();
        let count = batch.len();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(why) = post(&client, uri, body).await {
                warn_failed(count, &why);
            }
        });
    }
}

fn warn_failed(spans: usize, why: &str) {
    if let Some(more) = EXPORT_FAILED.allow() {
        tracing::warn!(
            spans,
            error = %why,
            earlier_warnings_left_out = more,
            "OTLP export failed; those spans are dropped"
        );
    }
}

async fn post(client: &HttpClient, uri: hyper::Uri, body: String) -> Result<(), String> {
    let request = hyper::Request::post(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("smithers/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| smithers_core::error::chain(&e))?;
        let status = response.status();
        // read (a bounded amount of) the answer so the connection can be reused
        let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered HTTP {status}"))
        }
    };
    tokio::time::timeout(EXPORT_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", EXPORT_TIMEOUT.as_secs())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_resolve_as_opentelemetry_defines_them() {
        let none = |_: &str| None;
        assert_eq!(TelemetryConfig::resolve(None, None, &none), None);
        let c = TelemetryConfig::resolve(Some("http://c:4318/"), None, &none).unwrap();
        assert_eq!(c.traces_url, "http://c:4318/v1/traces");
        assert_eq!(c.service_name, "smithers");
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://env:4318".to_string()),
            "OTEL_SERVICE_NAME" => Some("svc".to_string()),
            _ => None,
        };
        let c = TelemetryConfig::resolve(Some("http://file:1"), Some("f"), &env).unwrap();
        assert_eq!(
            (c.traces_url.as_str(), c.service_name.as_str()),
            ("http://env:4318/v1/traces", "svc")
        );
        let full = |k: &str| {
            (k == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").then(|| "http://t:1/custom".to_string())
        };
        let c = TelemetryConfig::resolve(None, None, &full).unwrap();
        assert_eq!(c.traces_url, "http://t:1/custom");
        assert!(c.uri().is_ok());
        let bad = TelemetryConfig::resolve(Some("ftp://x"), None, &none).unwrap();
        assert!(bad.uri().is_err());
    }
}
