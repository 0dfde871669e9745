//! Reading a request body (`POST /rpc`, webhooks) within the gateway's limits: at most
//! `max_body_bytes`, complete within `body_timeout_ms` of the request head, and, for bodies
//! nobody has vouched for yet, out of a byte budget shared by every request and reserved
//! chunk by chunk, so a crowd of slow or unfinished bodies cannot pile up in memory.

use crate::error::RpcError;
use crate::server_config::ServerConfig;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// What a client is told to wait (`Retry-After`, seconds) when a budget is exhausted: budget
/// bytes come back as soon as the bodies holding them are checked, finished or cut off.
pub const RETRY_AFTER_SECS: u64 = 5;

/// Bytes that many requests' bodies share. Cloning shares the same budget.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    permits: Arc<Semaphore>,
    capacity: usize,
}

impl ByteBudget {
    /// A budget of `bytes` (capped at what a semaphore can count, about 2^61).
    pub fn new(bytes: usize) -> Self {
        let capacity = bytes.min(Semaphore::MAX_PERMITS);
        ByteBudget {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes not held by any body right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Takes `n` bytes now or not at all: a request never waits for budget.
    fn try_reserve(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).ok()?;
        self.permits.clone().try_acquire_many_owned(n).ok()
    }
}

/// Budget bytes held by one body; they return to the budget when this is dropped, whatever
/// ended the request (checked, finished, timed out, client gone).
#[derive(Debug, Default)]
pub struct Reservation(Option<OwnedSemaphorePermit>);

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    fn add(&mut self, more: OwnedSemaphorePermit) {
        match &mut self.0 {
            Some(held) => held.merge(more),
            None => self.0 = Some(more),
        }
    }
}

/// How one body may be read.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    /// Largest body accepted (`max_body_bytes`); one byte more is `413`.
    pub max_bytes: usize,
    /// When the whole body must have arrived (`body_timeout_ms` after the request head).
    pub deadline: Instant,
    /// Shared budget the body's bytes are reserved from as they arrive, if any.
    pub budget: Option<&'a ByteBudget>,
}

impl<'a> Limits<'a> {
    /// The server's limits for a request whose head was complete at `head_at`, without a
    /// shared budget.
    pub fn for_request(config: &ServerConfig, head_at: std::time::Instant) -> Self {
        Limits {
            max_bytes: config.max_body_bytes,
            deadline: Instant::from_std(head_at)
                + Duration::from_millis(config.limits.body_timeout_ms),
            budget: None,
        }
    }

    /// The same limits, drawing from `budget`.
    pub fn with_budget(self, budget: &'a ByteBudget) -> Self {
        Limits {
            budget: Some(budget),
            ..self
        }
    }
}

/// A whole body and the budget bytes it still holds.
#[derive(Debug)]
pub struct ReadBody {
    pub bytes: Bytes,
    pub reservation: Reservation,
}

/// Why a body was not read. Every variant leaves the rest of the body unread, so the
/// connection is closed after the answer ([`BodyError::respond`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Larger than `limit` bytes (declared or sent): `413 PAYLOAD_TOO_LARGE`.
    TooLarge { limit: usize },
    /// Not complete within `timeout_ms` of the head: `408 REQUEST_TIMEOUT`.
    Timeout { timeout_ms: u64 },
    /// The shared budget had no room for the next chunk: `503 SERVICE_UNAVAILABLE`.
    Busy,
    /// The client went away or broke the framing mid-body: `400 INVALID_REQUEST` (rarely
    /// seen by anyone).
    Broken,
}

impl BodyError {
    /// The protocol error to answer with.
    pub fn to_rpc(&self) -> RpcError {
        match self {
            BodyError::TooLarge { limit } => RpcError::new(
                "PAYLOAD_TOO_LARGE",
                format!("Gateway request payload exceeds {limit} bytes."),
            ),
            BodyError::Timeout { timeout_ms } => RpcError::new(
                "REQUEST_TIMEOUT",
                format!(
                    "Request body not received within {timeout_ms} ms of the request head; send the whole body at once (server.body_timeout_ms)."
                ),
            ),
            BodyError::Busy => RpcError::new(
                "SERVICE_UNAVAILABLE",
                format!(
                    "The server is holding too many request bodies from clients nobody has vouched for (unsigned webhooks, or /rpc with auth none); retry in {RETRY_AFTER_SECS} s."
                ),
            ),
            BodyError::Broken => RpcError::new(
                "INVALID_REQUEST",
                "The request body could not be read (connection closed or malformed).",
            ),
        }
    }

    /// A short name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            BodyError::TooLarge { .. } => "too_large",
            BodyError::Timeout { .. } => "body_timeout",
            BodyError::Busy => "busy",
            BodyError::Broken => "broken_body",
        }
    }

    /// Adds to an error response what the client needs beyond its JSON: `Connection: close`
    /// (the unread rest of the body cannot be skipped) and, when busy, `Retry-After`.
    pub fn respond(&self, mut r: Response) -> Response {
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        if *self == BodyError::Busy {
            h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        r
    }
}

/// Reads a whole body within `limits`. A declared `Content-Length` over the limit is refused
/// before anything is read; otherwise chunks are counted (and reserved from the budget) as
/// they arrive, and the first chunk that does not fit, or the deadline, ends the read.
pub async fn read(
    headers: &HeaderMap,
    body: Body,
    limits: Limits<'_>,
) -> Result<ReadBody, BodyError> {
    let too_large = BodyError::TooLarge {
        limit: limits.max_bytes,
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        && len > limits.max_bytes as u64
    {
        return Err(too_large);
    }
    let timeout_ms = limits
        .deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    let mut stream = body.into_data_stream();
    // the usual body is one chunk: kept as is, no copy and no list
    let mut first: Option<Bytes> = None;
    let mut more: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    let mut reservation = Reservation::default();
    // one timer for the whole body, polled only when a chunk is not there yet: a body that
    // has already arrived (the usual small request) never touches the timer
    let deadline = tokio::time::sleep_until(limits.deadline);
    tokio::pin!(deadline);
    loop {
        let next = tokio::select! {
            biased;
            next = stream.next() => next,
            () = &mut deadline => return Err(BodyError::Timeout { timeout_ms }),
        };
        let chunk = match next {
            None => break,
            Some(Ok(chunk)) => chunk,
            Some(Err(_)) => return Err(BodyError::Broken),
        };
        if chunk.is_empty() {
            continue;
        }
        if chunk.len() > limits.max_bytes - total {
            return Err(too_large);
        }
        if let Some(budget) = limits.budget {
            match budget.try_reserve(chunk.len()) {
                Some(permit) => reservation.add(permit),
                None => return Err(BodyError::Busy),
            }
        }
        total += chunk.len();
        match first {
            None => first = Some(chunk),
            Some(_) => more.push(chunk),
        }
    }
    let bytes = match first {
        None => Bytes::new(),
        Some(only) if more.is_empty() => only,
        Some(head) => {
            let mut all = Vec::with_capacity(total);
            all.extend_from_slice(&head);
            for c in &more {
                all.extend_from_slice(c);
            }
            Bytes::from(all)
        }
    };
    Ok(ReadBody { bytes, reservation })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, budget: Option<&ByteBudget>) -> Limits<'_> {
        Limits {
            max_bytes: max,
            deadline: Instant::now() + Duration::from_secs(30),
            budget,
        }
    }

    fn chunked(parts: &[&'static [u8]]) -> Body {
        let items: Vec<Result<Bytes, std::io::Error>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        Body::from_stream(futures_util::stream::iter(items))
    }

    #[tokio::test]
    async fn limit_is_inclusive_and_declared_length_is_checked_first() {
        let h = HeaderMap::new();
        let got = read(&h, chunked(&[b"ab", b"cd"]), limits(4, None)).await;
        assert_eq!(got.map(|r| r.bytes), Ok(Bytes::from_static(b"abcd")));
        let got = read(&h, chunked(&[b"ab", b"cde"]), limits(4, None)).await;
        assert_eq!(got.err(), Some(BodyError::TooLarge { limit: 4 }));
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from(5u64));
        let got = read(&declared, chunked(&[b"a"]), limits(4, None)).await;
        assert_eq!(got.err(), Some(BodyError::TooLarge { limit: 4 }));
        let got = read(&h, Body::empty(), limits(4, None)).await;
        assert_eq!(got.map(|r| r.bytes.len()), Ok(0));
    }

    #[tokio::test]
    async fn budget_is_held_until_dropped_and_never_waited_for() {
        let budget = ByteBudget::new(5);
        let h = HeaderMap::new();
        let held = match read(&h, chunked(&[b"ab", b"c"]), limits(10, Some(&budget))).await {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!((held.reservation.bytes(), budget.available()), (3, 2));
        // 2 fit, the third byte does not: refused at once, and its 2 bytes come back
        let got = read(&h, chunked(&[b"xy", b"z"]), limits(10, Some(&budget))).await;
        assert_eq!(got.err(), Some(BodyError::Busy));
        assert_eq!(budget.available(), 2);
        drop(held);
        assert_eq!(budget.available(), 5);
        let got = read(&h, chunked(&[b"vwxyz"]), limits(10, Some(&budget))).await;
        assert_eq!(
            got.map(|r| r.reservation.bytes()),
            Ok(5),
            "exactly the budget"
        );
        assert_eq!(budget.available(), 5);
    }

    #[tokio::test]
    async fn deadline_cuts_a_trickling_body() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let body = Body::from_stream(tokio_stream_from(rx));
        let feeder = tokio::spawn(async move {
            for _ in 0..1000 {
                if tx.send(Ok(Bytes::from_static(b"x"))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let l = Limits {
            max_bytes: 1 << 20,
            deadline: Instant::now() + Duration::from_millis(200),
            budget: None,
        };
        let got = read(&HeaderMap::new(), body, l).await;
        assert!(
            matches!(got, Err(BodyError::Timeout { .. })),
            "{:?}",
            got.map(|r| r.bytes.len())
        );
        feeder.abort();
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[test]
    fn errors_carry_codes_and_close_the_connection() {
        assert_eq!(BodyError::TooLarge { limit: 1 }.to_rpc().status(), 413);
        assert_eq!(BodyError::Timeout { timeout_ms: 1 }.to_rpc().status(), 408);
        assert_eq!(BodyError::Busy.to_rpc().status(), 503);
        let r = BodyError::Busy.respond(Response::new(Body::empty()));
        assert_eq!(r.headers()[header::CONNECTION], "close");
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        let r = BodyError::Timeout { timeout_ms: 1 }.respond(Response::new(Body::empty()));
        assert_eq!(r.headers()[header::CONNECTION], "close");
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
