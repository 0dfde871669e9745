//! WebSocket budgets: `max_connections` open sockets in all, of which at most
//! `max_unauthenticated_ws` may not have completed `connect`. Both are reserved atomically when
//! the upgrade is admitted (before the `101`), so a burst can never overshoot, and a socket
//! leaves the unauthenticated budget the moment its `connect` succeeds: anonymous sockets can
//! fill only their own small share, never lock out clients that authenticate.

use crate::conn_limit::ConnState;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The counters behind [`WsSlot`].
#[derive(Default, Debug)]
pub struct WsBudget {
    open: AtomicUsize,
    unauthenticated: AtomicUsize,
}

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsRefusal {
    /// `max_connections` sockets are open.
    Full,
    /// `max_unauthenticated_ws` sockets have not completed `connect`.
    Unauthenticated,
}

fn take_below(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl WsBudget {
    /// Open WebSockets (reserved upgrades included).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Open WebSockets that have not completed `connect`.
    pub fn unauthenticated(&self) -> usize {
        self.unauthenticated.load(Ordering::Acquire)
    }

    /// Reserves a place for an upgrade that has not authenticated yet: one of `max_open`
    /// (`max_connections`) and one of `max_unauthenticated` (`max_unauthenticated_ws`).
    pub fn reserve(
        self: &Arc<Self>,
        max_open: usize,
        max_unauthenticated: usize,
        tcp: Option<Arc<ConnState>>,
    ) -> Result<WsSlot, WsRefusal> {
        if !take_below(&self.open, max_open) {
            return Err(WsRefusal::Full);
        }
        if !take_below(&self.unauthenticated, max_unauthenticated) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(WsRefusal::Unauthenticated);
        }
        Ok(WsSlot {
            budget: self.clone(),
            authenticated: false,
            tcp,
        })
    }
}

/// One WebSocket's place in the budgets, held for the socket's life; dropping it (also when
/// the upgrade never completes) gives the place back.
pub struct WsSlot {
    budget: Arc<WsBudget>,
    authenticated: bool,
    tcp: Option<Arc<ConnState>>,
}

impl WsSlot {
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// The TCP connection underneath (to learn of its eviction).
    pub fn tcp(&self) -> Option<&Arc<ConnState>> {
        self.tcp.as_ref()
    }

    /// `connect` succeeded: the socket moves from the unauthenticated budget to the
    /// authenticated one, and its TCP connection stops being a candidate for eviction.
    pub fn promote(&mut self) {
        if !self.authenticated {
            self.authenticated = true;
            self.budget.unauthenticated.fetch_sub(1, Ordering::AcqRel);
            if let Some(t) = &self.tcp {
                t.authenticated();
            }
        }
    }
}

impl Drop for WsSlot {
    fn drop(&mut self) {
        let b = &self.budget;
        if !self.authenticated {
            b.unauthenticated.fetch_sub(1, Ordering::AcqRel);
        }
        b.open.fetch_sub(1, Ordering::AcqRel);
    }
}
