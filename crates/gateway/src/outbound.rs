//! One WebSocket connection's outbound queue: frames waiting for the socket, bounded by a
//! count of frames and of bytes.
//!
//! Three kinds of producers use it, each with its own rule at the bound:
//! - broadcasts, responses and ticks ([`Queue::push`]) never wait: a push onto a full queue
//!   marks the connection *overflowed*; its writer then closes it as too slow, so one client
//!   that does not read cannot slow anyone else down or grow the server's memory;
//! - replay ([`Queue::push_wait`]) waits until the queue is at most half full, which leaves
//!   the other half to live events;
//! - DevTools streams ([`Queue::offer`]) hand over a frame only below their own mark and keep
//!   it otherwise.
//!
//! The counts are two atomics next to a lock-free channel: no lock is taken per frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::{Notify, mpsc};

/// An outbound message for one connection; events get their per-connection `seq` when
/// written.
#[derive(Debug)]
pub enum Outbound {
    /// A response frame, serialized.
    Response(String),
    /// An event whose payload is serialized already (broadcasts serialize it once for every
    /// connection).
    Event {
        event: &'static str,
        payload_json: Arc<str>,
        state_version: u64,
    },
    /// A close frame; the writer ends after it.
    Close(u16, &'static str),
}

/// Bytes an event frame adds around its name and payload (`type`, `seq`, `stateVersion`).
const EVENT_ENVELOPE: usize = 64;

impl Outbound {
    /// What the frame counts against the byte bound: about its size on the wire.
    pub fn cost(&self) -> usize {
        match self {
            Outbound::Response(s) => s.len(),
            Outbound::Event {
                event,
                payload_json,
                ..
            } => payload_json.len() + event.len() + EVENT_ENVELOPE,
            Outbound::Close(..) => 0,
        }
    }
}

/// Close code and reason when a client fell behind by more than the queue holds.
pub const OVERFLOW_CLOSE: (u16, &str) = (
    1008,
    "client too slow: outbound queue full ([server] max_outbound_frames / max_outbound_bytes)",
);
/// Close code and reason when one write to the client did not finish in time.
pub const STALLED_CLOSE: (u16, &str) = (
    1008,
    "client too slow: a write stalled past [server] write_timeout_ms",
);

/// Why a push was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No room (for [`Queue::push`], the connection is now overflowed and will be closed).
    Full,
    /// The connection is closing or gone.
    Closed,
}

struct Shared {
    frames: AtomicUsize,
    bytes: AtomicUsize,
    max_frames: usize,
    max_bytes: usize,
    overflowed: AtomicBool,
    /// Wakes a writer that waits on the socket when the queue overflows.
    kick: Notify,
    /// Set by a [`Queue::push_wait`] waiting for room; the writer wakes it through `room`.
    want_room: AtomicBool,
    room: Notify,
}

impl Shared {
    /// Counts a frame in unless that would pass `max_frames` or `max_bytes`. A frame larger
    /// than `max_bytes` on its own still goes into an empty queue, so one big response is not
    /// mistaken for a slow client.
    fn reserve(&self, cost: usize, max_frames: usize, max_bytes: usize) -> bool {
        let frames = self.frames.fetch_add(1, Ordering::SeqCst);
        let bytes = self.bytes.fetch_add(cost, Ordering::SeqCst);
        if frames < max_frames && (bytes + cost <= max_bytes || (frames == 0 && bytes == 0)) {
            return true;
        }
        self.release(cost);
        false
    }

    fn release(&self, cost: usize) {
        self.frames.fetch_sub(1, Ordering::SeqCst);
        self.bytes.fetch_sub(cost, Ordering::SeqCst);
    }

    fn has_room(&self, cost: usize, max_frames: usize, max_bytes: usize) -> bool {
        let frames = self.frames.load(Ordering::SeqCst);
        let bytes = self.bytes.load(Ordering::SeqCst);
        frames < max_frames && (bytes + cost <= max_bytes || frames == 0)
    }
}

/// The producing side, kept by the connection (`ConnShared::out`).
pub struct Queue {
    tx: mpsc::UnboundedSender<Outbound>,
    shared: Arc<Shared>,
}

/// The consuming side, owned by the connection's writer task.
pub struct Receiver {
    rx: mpsc::UnboundedReceiver<Outbound>,
    shared: Arc<Shared>,
}

/// A queue holding at most `max_frames` frames and `max_bytes` bytes (each at least 1).
pub fn queue(max_frames: usize, max_bytes: usize) -> (Queue, Receiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        frames: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        max_frames: max_frames.max(1),
        max_bytes: max_bytes.max(1),
        overflowed: AtomicBool::new(false),
        kick: Notify::new(),
        want_room: AtomicBool::new(false),
        room: Notify::new(),
    });
    (
        Queue {
            tx,
            shared: shared.clone(),
        },
        Receiver { rx, shared },
    )
}

impl Queue {
    /// Queues a frame without waiting. On a full queue the connection is marked overflowed
    /// (its writer closes it with [`OVERFLOW_CLOSE`]) and every later push is refused.
    pub fn push(&self, out: Outbound) -> Result<(), Refused> {
        let s = &self.shared;
        if s.overflowed.load(Ordering::Acquire) {
            return Err(Refused::Full);
        }
        let cost = out.cost();
        if !s.reserve(cost, s.max_frames, s.max_bytes) {
            self.overflow();
            return Err(Refused::Full);
        }
        self.send(out, cost)
    }

    /// Queues a frame if the queue holds fewer than `max_frames` frames and, with it, at most
    /// `max_bytes` bytes (both capped by the queue's own bound); otherwise leaves the
    /// connection alone and refuses.
    pub fn offer(&self, out: Outbound, max_frames: usize, max_bytes: usize) -> Result<(), Refused> {
        let s = &self.shared;
        if s.overflowed.load(Ordering::Acquire) || self.tx.is_closed() {
            return Err(Refused::Closed);
        }
        let cost = out.cost();
        if !s.reserve(
            cost,
            max_frames.min(s.max_frames),
            max_bytes.min(s.max_bytes),
        ) {
            return Err(Refused::Full);
        }
        self.send(out, cost)
    }

    /// Queues a frame once the queue is at most half full, waiting for the writer to make
    /// room. Fails only when the connection closes or overflows meanwhile.
    pub async fn push_wait(&self, out: Outbound) -> Result<(), Refused> {
        let s = &self.shared;
        let (max_frames, max_bytes) = self.half();
        let cost = out.cost();
        loop {
            if s.overflowed.load(Ordering::Acquire) || self.tx.is_closed() {
                return Err(Refused::Closed);
            }
            if s.reserve(cost, max_frames, max_bytes) {
                return self.send(out, cost);
            }
            let room = s.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            s.want_room.store(true, Ordering::SeqCst);
            if s.has_room(cost, max_frames, max_bytes) || self.tx.is_closed() {
                continue;
            }
            room.await;
        }
    }

    /// Counts a frame that is held elsewhere for now (and sent later with
    /// [`Queue::send_reserved`]) against the bound, as [`Queue::push`] would.
    pub fn reserve(&self, cost: usize) -> bool {
        let s = &self.shared;
        if s.overflowed.load(Ordering::Acquire) {
            return false;
        }
        if s.reserve(cost, s.max_frames, s.max_bytes) {
            return true;
        }
        self.overflow();
        false
    }

    /// Queues a frame counted in by [`Queue::reserve`].
    pub fn send_reserved(&self, out: Outbound) -> Result<(), Refused> {
        let cost = out.cost();
        self.send(out, cost)
    }

    /// Gives back what [`Queue::reserve`] counted for a frame that will not be sent.
    pub fn unreserve(&self, cost: usize) {
        self.shared.release(cost);
    }

    /// Queues a close frame whatever the bound (shutdown).
    pub fn close(&self, code: u16, reason: &'static str) {
        if self.shared.reserve(0, usize::MAX, usize::MAX) {
            let _ = self.send(Outbound::Close(code, reason), 0);
        }
    }

    /// Whether the writer is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Frames and bytes queued and not yet written.
    pub fn queued(&self) -> (usize, usize) {
        (
            self.shared.frames.load(Ordering::Acquire),
            self.shared.bytes.load(Ordering::Acquire),
        )
    }

    /// The bound of [`Queue::push_wait`]: half of the queue.
    fn half(&self) -> (usize, usize) {
        let s = &self.shared;
        ((s.max_frames / 2).max(1), (s.max_bytes / 2).max(1))
    }

    fn send(&self, out: Outbound, cost: usize) -> Result<(), Refused> {
        if self.tx.send(out).is_err() {
            self.shared.release(cost);
            return Err(Refused::Closed);
        }
        Ok(())
    }

    fn overflow(&self) {
        let s = &self.shared;
        if !s.overflowed.swap(true, Ordering::AcqRel) {
            // wake the writer: a waiting write through `kick`, an idle one through a frame
            s.kick.notify_one();
            if s.reserve(0, usize::MAX, usize::MAX) {
                let _ = self.send(Outbound::Close(OVERFLOW_CLOSE.0, OVERFLOW_CLOSE.1), 0);
            }
        }
    }
}

impl Receiver {
    /// The next frame; `None` once every [`Queue`] is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Outbound> {
        self.rx.recv().await
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.rx.try_recv().ok()
    }

    /// A frame of `cost` has been handed to the socket: it no longer counts.
    pub fn written(&self, cost: usize) {
        let s = &self.shared;
        s.release(cost);
        if s.want_room.load(Ordering::SeqCst) {
            let frames = s.frames.load(Ordering::Relaxed);
            let bytes = s.bytes.load(Ordering::Relaxed);
            // wake a waiting replay at a quarter full, so it sends a batch rather than a frame
            if frames <= s.max_frames / 4 && bytes <= s.max_bytes / 4 {
                s.want_room.store(false, Ordering::SeqCst);
                s.room.notify_one();
            }
        }
    }

    /// Whether a push found the queue full.
    pub fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Acquire)
    }

    /// Completes once the queue overflows (immediately if it has).
    pub async fn kicked(&self) {
        if self.overflowed() {
            return;
        }
        self.shared.kick.notified().await;
    }

    /// Frames and bytes queued and not yet written.
    pub fn queued(&self) -> (usize, usize) {
        (
            self.shared.frames.load(Ordering::Acquire),
            self.shared.bytes.load(Ordering::Acquire),
        )
    }

    /// Stops taking frames and drops those queued (the connection is being closed).
    pub fn discard(&mut self) {
        self.rx.close();
        while let Ok(out) = self.rx.try_recv() {
            self.shared.release(out.cost());
        }
        self.shared.room.notify_one();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // a replay waiting for room learns that none will come
        self.rx.close();
        self.shared.room.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(bytes: usize) -> Outbound {
        Outbound::Event {
            event: "e",
            payload_json: "x".repeat(bytes).into(),
            state_version: 0,
        }
    }

    #[test]
    fn frame_bound_holds_at_n_and_refuses_n_plus_one() {
        let (q, mut rx) = queue(3, 1 << 20);
        for _ in 0..3 {
            q.push(ev(1)).unwrap();
        }
        assert!(!rx.overflowed());
        assert_eq!(q.push(ev(1)), Err(Refused::Full));
        assert!(rx.overflowed());
        // once overflowed, nothing more is taken, not even after the writer made room
        let first = rx.try_recv().unwrap();
        rx.written(first.cost());
        assert_eq!(q.push(ev(1)), Err(Refused::Full));
    }

    #[test]
    fn byte_bound_holds_at_n_and_refuses_n_plus_one() {
        let cost = ev(100).cost();
        let (q, rx) = queue(100, 2 * cost);
        q.push(ev(100)).unwrap();
        q.push(ev(100)).unwrap();
        assert_eq!(q.queued(), (2, 2 * cost));
        assert_eq!(q.push(ev(0)), Err(Refused::Full));
        assert!(rx.overflowed());
    }

    #[test]
    fn one_frame_larger_than_the_bound_goes_into_an_empty_queue() {
        let (q, rx) = queue(10, 100);
        q.push(ev(1000)).unwrap();
        assert!(!rx.overflowed());
        assert_eq!(q.push(ev(1)), Err(Refused::Full));
    }

    #[test]
    fn offer_refuses_without_overflowing() {
        let (q, rx) = queue(10, 1 << 20);
        q.offer(ev(1), 2, usize::MAX).unwrap();
        q.offer(ev(1), 2, usize::MAX).unwrap();
        assert_eq!(q.offer(ev(1), 2, usize::MAX), Err(Refused::Full));
        assert!(!rx.overflowed());
        q.push(ev(1)).unwrap();
    }

    #[tokio::test]
    async fn push_wait_waits_for_room_and_stops_when_the_writer_goes() {
        let (q, mut rx) = queue(8, 1 << 20);
        let q = Arc::new(q);
        // half the queue: 4 frames go in at once, the 5th waits
        for _ in 0..4 {
            q.push_wait(ev(1)).await.unwrap();
        }
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.push_wait(ev(1)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        for _ in 0..3 {
            let f = rx.try_recv().unwrap();
            rx.written(f.cost());
        }
        assert_eq!(waiter.await.unwrap(), Ok(()));
        let blocked = {
            let q = q.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    q.push_wait(ev(1)).await?;
                }
                Ok::<(), Refused>(())
            })
        };
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(blocked.await.unwrap(), Err(Refused::Closed));
    }
}
