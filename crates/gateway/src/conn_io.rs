//! The socket of one accepted connection, with the timeouts that apply while nothing is in
//! flight and a lingering close.
//!
//! Timeouts: a request head must arrive within `header_timeout_ms` of the connection opening
//! or of the first byte of that head on a keep-alive connection; a keep-alive connection with
//! no request for `idle_timeout_ms` is closed. hyper's own `header_read_timeout` is not used:
//! its timer starts whenever hyper waits for a head, idle keep-alive time included, so it
//! cannot tell an idle client (60 s) from a slow one (10 s). Here the timer lives in the socket,
//! which sees the first byte of each head, and runs only while the connection's phase
//! ([`crate::conn_limit::phase`]) is HEAD or IDLE; a stalled write in those phases (a client
//! that never reads its response) is bounded the same way. While a request is served, or once
//! the socket is a WebSocket, no timer of this module runs.
//!
//! Lingering close: when the server closes a connection it shuts down its write side and then
//! reads and discards what the client still sends (at most [`LINGER_BYTES`], for at most
//! [`LINGER_TIME`]) before closing. Closing a socket with unread input makes the kernel send a
//! reset, which destroys a response the client has not read yet: a client that writes a whole
//! oversized body before reading would get a reset instead of its `413`.

use crate::conn_limit::{Slot, epoch, phase};
use crate::metrics::names;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Most bytes read and discarded by a lingering close.
pub const LINGER_BYTES: usize = 8 * 1024 * 1024;
/// Longest a lingering close waits for the client to finish sending and close.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// An accepted TCP socket and its place in the connection table.
pub struct ConnIo {
    tcp: TcpStream,
    slot: Slot,
    timer: Pin<Box<Sleep>>,
    /// The (phase, phase start) the timer is set for.
    armed: Option<(u8, u64)>,
    /// Bytes discarded so far by a lingering close that has started.
    lingering: Option<usize>,
}

impl ConnIo {
    pub fn new(tcp: TcpStream, slot: Slot) -> Self {
        ConnIo {
            tcp,
            slot,
            // set for real the first time the socket waits
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            armed: None,
            lingering: None,
        }
    }

    /// Called when the socket would wait: fails it once the timeout of its phase has passed.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let state = self.slot.state();
        let phase = state.phase();
        let table = self.slot.table();
        let (limit, what) = match phase {
            phase::HEAD => (table.header_timeout, "HEADER_TIMEOUT"),
            phase::IDLE => (table.idle_timeout, "IDLE_TIMEOUT"),
            _ => return Ok(()),
        };
        let since = state.since_ms();
        if self.armed != Some((phase, since)) {
            let at = epoch() + Duration::from_millis(since) + limit;
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::from_std(at));
            self.armed = Some((phase, since));
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        table.metrics.inc(
            names::ERRORS_TOTAL,
            &[("code", what), ("kind", "timeout"), ("transport", "http")],
        );
        tracing::debug!(peer = %state.peer(), timeout = what, "closed a connection that stayed silent too long");
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            if phase == phase::HEAD {
                "request head not received in time (server.header_timeout_ms)"
            } else {
                "keep-alive connection idle too long (server.idle_timeout_ms)"
            },
        ))
    }

    fn should_linger(&self) -> bool {
        !self.slot.table().shutting_down()
            && matches!(
                self.slot.state().phase(),
                phase::HEAD | phase::BUSY | phase::IDLE
            )
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.slot.state().bytes_arrived();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.check_deadline(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.tcp).poll_write(cx, buf) {
            Poll::Pending => match this.check_deadline(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            done => done,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs) {
            Poll::Pending => match this.check_deadline(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    /// hyper flushes after every response. Without a header timer of its own it does not poll
    /// the socket for the next request until bytes arrive, so the idle timer is armed here.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.tcp).poll_flush(cx))?;
        this.check_deadline(cx)?;
        Poll::Ready(Ok(()))
    }

    /// Shuts down the write side, then lingers (see the module docs) on an HTTP connection.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut drained = match this.lingering {
            Some(n) => n,
            None => {
                ready!(Pin::new(&mut this.tcp).poll_shutdown(cx))?;
                if !this.should_linger() {
                    return Poll::Ready(Ok(()));
                }
                this.timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + LINGER_TIME);
                this.armed = None;
                this.lingering = Some(0);
                0
            }
        };
        let mut scratch = [0u8; 8192];
        loop {
            if this.timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.tcp).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    drained += rb.filled().len();
                    this.lingering = Some(drained);
                    if drained >= LINGER_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                // the client is gone: nothing left to protect
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
