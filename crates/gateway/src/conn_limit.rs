//! The global cap on open TCP connections (`[server] max_tcp_connections`).
//!
//! Every accepted socket is entered in one table, in accept order, with the phase it is in.
//! When the table is full a new socket makes room by closing the oldest connection that has
//! nothing in flight and is not an authenticated WebSocket (a socket still sending its first
//! request head, an idle keep-alive connection, a WebSocket that has not completed `connect`);
//! when there is none, the new socket is refused at once. So a flood of idle sockets only ever
//! displaces other idle sockets: descriptors never run out, and `/health`, requests in flight
//! and authenticated clients keep working.

use crate::metrics::{Metrics, names};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What a connection is doing, as far as timeouts and eviction care.
pub mod phase {
    /// Waiting for (the rest of) a request head: a fresh socket, or a keep-alive connection
    /// whose next request has started arriving. `header_timeout_ms` runs.
    pub const HEAD: u8 = 0;
    /// A request is being served. No timeout of ours runs (the body has its own).
    pub const BUSY: u8 = 1;
    /// A keep-alive connection between requests. `idle_timeout_ms` runs.
    pub const IDLE: u8 = 2;
    /// An upgraded WebSocket that has not completed `connect` (`connect_timeout_ms` runs).
    pub const WS_PENDING: u8 = 3;
    /// An authenticated WebSocket: never evicted.
    pub const WS_AUTHED: u8 = 4;
    /// Chosen for eviction; its task is closing it.
    pub const CLOSING: u8 = 5;
}

/// Milliseconds since the first call in this process: a cheap timestamp that fits an atomic.
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// The instant [`now_ms`] counts from.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// One open TCP connection, shared by its socket, its HTTP service and its WebSocket task.
pub struct ConnState {
    id: u64,
    peer: SocketAddr,
    phase: AtomicU8,
    /// When the current phase started ([`now_ms`]); used by the timeouts of HEAD and IDLE.
    since_ms: AtomicU64,
    close: Notify,
}

impl ConnState {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    pub fn since_ms(&self) -> u64 {
        self.since_ms.load(Ordering::Acquire)
    }

    fn move_from(&self, from: &[u8], to: u8) -> bool {
        self.phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                from.contains(&p).then_some(to)
            })
            .is_ok()
    }

    /// A request head was parsed: the connection has something in flight.
    pub fn begin_request(&self) {
        self.move_from(&[phase::HEAD, phase::IDLE], phase::BUSY);
    }

    /// The response was produced: the connection idles until the next request starts.
    pub fn end_request(&self) {
        if self.phase() == phase::BUSY {
            self.since_ms.store(now_ms(), Ordering::Release);
            self.move_from(&[phase::BUSY], phase::IDLE);
        }
    }

    /// Bytes arrived; on an idle connection they start the next request head and its timeout.
    pub fn bytes_arrived(&self) {
        if self.phase() == phase::IDLE {
            self.since_ms.store(now_ms(), Ordering::Release);
            self.move_from(&[phase::IDLE], phase::HEAD);
        }
    }

    /// The request being served was admitted as a WebSocket upgrade.
    pub fn upgraded(&self) {
        self.move_from(&[phase::BUSY], phase::WS_PENDING);
    }

    /// The WebSocket completed `connect`: it is no longer a candidate for eviction.
    pub fn authenticated(&self) {
        self.move_from(&[phase::WS_PENDING], phase::WS_AUTHED);
    }

    /// Resolves once this connection was chosen for eviction (also when that happened before
    /// the call).
    pub async fn evicted(&self) {
        self.close.notified().await
    }

    /// Marks an evictable connection as closing and wakes whoever serves it.
    fn try_evict(&self) -> bool {
        let ok = self.move_from(
            &[phase::HEAD, phase::IDLE, phase::WS_PENDING],
            phase::CLOSING,
        );
        if ok {
            self.close.notify_one();
        }
        ok
    }
}

/// Connections chosen for eviction whose sockets have not closed yet may exceed the cap by at
/// most this many (they close within a scheduling round; the descriptor reserve covers them).
const CLOSING_SLACK: usize = 64;

/// How often a warning about the cap (or about running out of descriptors) is repeated while
/// the condition lasts; the events in between are counted and logged at debug level.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(60);

/// The table of open TCP connections.
pub struct ConnTable {
    cap: usize,
    /// `header_timeout_ms` and `idle_timeout_ms`, applied by [`crate::conn_io::ConnIo`].
    pub(crate) header_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    inner: Mutex<Inner>,
    cap_warnings: Throttle,
    pub(crate) fd_warnings: Throttle,
    /// Signalled when an evicted connection's socket closes.
    closed: Notify,
}

/// How long the accept loop waits for evicted sockets to close before accepting anyway.
const ROOM_WAIT: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: BTreeMap<u64, Arc<ConnState>>,
    /// Entries in `open` that are [`phase::CLOSING`].
    closing: usize,
}

/// A refused connection: the table was full and nothing in it could be evicted.
#[derive(Debug)]
pub struct Refused;

impl ConnTable {
    pub fn new(
        cap: usize,
        limits: &crate::server_config::Limits,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(ConnTable {
            cap,
            header_timeout: Duration::from_millis(limits.header_timeout_ms),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
            metrics,
            shutting_down: AtomicBool::new(false),
            inner: Mutex::new(Inner::default()),
            cap_warnings: Throttle::new(WARN_EVERY),
            fd_warnings: Throttle::new(WARN_EVERY),
            closed: Notify::new(),
        })
    }

    /// Before the next accept: while the sockets of evicted connections still fill the closing
    /// slack, wait (at most [`ROOM_WAIT`]) for one to close, so that a burst leaves the next
    /// connections in the kernel's queue instead of refusing them while room is being made.
    pub async fn room(&self) {
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        loop {
            let closed = self.closed.notified();
            {
                let inner = self.lock();
                if inner.open.len() < self.cap + CLOSING_SLACK || inner.closing == 0 {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return;
            }
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Open connections (evicted ones included until their sockets close).
    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops lingering closes: the server is going away.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Enters a freshly accepted socket, evicting the oldest idle connection if the table is
    /// full. The check and the insertion happen under one lock: the cap is reserved atomically.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Slot, Refused> {
        let (state, evicted, open) = {
            let mut inner = self.lock();
            let mut evicted = None;
            if inner.open.len() - inner.closing >= self.cap {
                let victim = if inner.open.len() < self.cap + CLOSING_SLACK {
                    inner.open.values().find(|c| c.try_evict()).cloned()
                } else {
                    None
                };
                match victim {
                    Some(v) => {
                        inner.closing += 1;
                        evicted = Some(v.peer);
                    }
                    None => {
                        let open = inner.open.len();
                        drop(inner);
                        self.refused(peer, open);
                        return Err(Refused);
                    }
                }
            }
            let id = inner.next_id;
            inner.next_id += 1;
            let state = Arc::new(ConnState {
                id,
                peer,
                phase: AtomicU8::new(phase::HEAD),
                since_ms: AtomicU64::new(now_ms()),
                close: Notify::new(),
            });
            inner.open.insert(id, state.clone());
            (state, evicted, inner.open.len())
        };
        self.metrics
            .gauge_add(names::CONNECTIONS_TCP_OPEN, &[], 1.0);
        if let Some(victim) = evicted {
            self.evicted(victim, peer, open);
        }
        Ok(Slot {
            table: self.clone(),
            state,
        })
    }

    /// Out of descriptors at accept: evicts the oldest idle connection so that one frees.
    pub fn make_room(&self) -> bool {
        let mut inner = self.lock();
        let victim = inner.open.values().find(|c| c.try_evict()).cloned();
        if victim.is_some() {
            inner.closing += 1;
        }
        victim.is_some()
    }

    fn evicted(&self, victim: SocketAddr, by: SocketAddr, open: usize) {
        self.metrics.inc(
            names::ERRORS_TOTAL,
            &[("kind", "connection_evicted"), ("transport", "tcp")],
        );
        tracing::debug!(peer = %victim, new_peer = %by, "closed an idle connection to make room");
        if let Some(more) = self.cap_warnings.hit() {
            tracing::warn!(
                open,
                max_tcp_connections = self.cap,
                peer = %victim,
                events_since_last_warning = more,
                "TCP connection cap reached: closing the oldest idle connections to make room (server.max_tcp_connections; each event is logged at debug level)"
            );
        }
    }

    fn refused(&self, peer: SocketAddr, open: usize) {
        self.metrics.inc(
            names::ERRORS_TOTAL,
            &[("kind", "connection_limit"), ("transport", "tcp")],
        );
        tracing::debug!(peer = %peer, "refused a connection: the TCP connection cap is reached");
        if let Some(more) = self.cap_warnings.hit() {
            tracing::warn!(
                open,
                max_tcp_connections = self.cap,
                peer = %peer,
                events_since_last_warning = more,
                "TCP connection cap reached and every connection is busy or an authenticated WebSocket: refusing new connections (raise server.max_tcp_connections and the file-descriptor limit)"
            );
        }
    }

    fn remove(&self, state: &ConnState) {
        {
            let mut inner = self.lock();
            if inner.open.remove(&state.id).is_some() && state.phase() == phase::CLOSING {
                inner.closing -= 1;
                self.closed.notify_waiters();
            }
        }
        self.metrics
            .gauge_add(names::CONNECTIONS_TCP_OPEN, &[], -1.0);
    }
}

/// A connection's place in the table, held by its socket for as long as the socket is open
/// (through a WebSocket upgrade too); dropping it frees the place.
pub struct Slot {
    table: Arc<ConnTable>,
    state: Arc<ConnState>,
}

impl Slot {
    pub fn state(&self) -> &Arc<ConnState> {
        &self.state
    }

    pub fn table(&self) -> &ConnTable {
        &self.table
    }

    pub fn table_arc(&self) -> Arc<ConnTable> {
        self.table.clone()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.remove(&self.state);
    }
}

/// Lets one warning through per interval and counts the events it held back.
pub(crate) struct Throttle {
    every_ms: u64,
    /// [`now_ms`] of the last warning let through; `u64::MAX` before the first.
    last_ms: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    pub(crate) const fn new(every: Duration) -> Self {
        Throttle {
            every_ms: every.as_millis() as u64,
            last_ms: AtomicU64::new(u64::MAX),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(events held back since the last warning)` when a warning may be logged now.
    pub(crate) fn hit(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Acquire);
        if (last == u64::MAX || now >= last.saturating_add(self.every_ms))
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::AcqRel));
        }
        self.held_back.fetch_add(1, Ordering::AcqRel);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cap: usize) -> Arc<ConnTable> {
        ConnTable::new(
            cap,
            &crate::server_config::Limits::default(),
            Arc::new(Metrics::new()),
        )
    }

    fn peer(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    #[test]
    fn a_full_table_evicts_the_oldest_idle_connection() {
        let t = table(3);
        let a = t.admit(peer(1)).unwrap();
        let b = t.admit(peer(2)).unwrap();
        let c = t.admit(peer(3)).unwrap();
        // a is busy, b is an authenticated WebSocket: c is the only candidate
        a.state().begin_request();
        b.state().begin_request();
        b.state().upgraded();
        b.state().authenticated();
        let d = t.admit(peer(4)).unwrap();
        assert_eq!(c.state().phase(), phase::CLOSING);
        assert_eq!(a.state().phase(), phase::BUSY);
        assert_eq!(b.state().phase(), phase::WS_AUTHED);
        // nothing left to evict: refused, and the closing one still counts until it closes
        d.state().begin_request();
        assert!(t.admit(peer(5)).is_err());
        drop(c);
        assert_eq!(t.open(), 3);
        assert!(t.admit(peer(6)).is_err());
        a.state().end_request();
        let _e = t.admit(peer(7)).unwrap();
        assert_eq!(a.state().phase(), phase::CLOSING);
    }

    #[test]
    fn throttle_lets_the_first_warning_through_then_counts() {
        let th = Throttle::new(Duration::from_secs(60));
        assert_eq!(th.hit(), Some(0));
        assert_eq!(th.hit(), None);
        assert_eq!(th.hit(), None);
        assert_eq!(th.held_back.load(Ordering::Acquire), 2);
    }
}
