//! The listening socket and the accept loop: each socket is entered in the connection table
//! ([`ConnTable`]), gets `TCP_NODELAY`, and is served by hyper's HTTP/1 connection (with
//! upgrades) running the gateway's router. Running out of descriptors never makes the loop
//! spin: it evicts an idle connection, backs off and logs.

use crate::conn_io::ConnIo;
use crate::conn_limit::{ConnState, ConnTable, Slot};
use crate::metrics::names;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// Connections the kernel keeps waiting for the accept loop. The 128 that `TcpListener::bind`
/// asks for overflowed when a few hundred clients connected at once: the kernel dropped the
/// surplus handshakes and each of those clients waited a second for its retry, which capped a
/// 256-connection load at 4,900 runs/s (issue 13). Linux caps it at `net.core.somaxconn`.
pub const BACKLOG: u32 = 1024;

/// Listens on `listen` (`HOST:PORT`; of the addresses a name resolves to, the first that
/// binds) with room for [`BACKLOG`] connections not yet accepted.
pub async fn bind(listen: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(listen).await? {
        match bind_addr(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

fn bind_addr(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // as TcpListener::bind: a restarted server can listen again at once
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// What a refused socket is told before it is closed (the table was full of busy
/// connections and authenticated WebSockets).
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 33\r\n\r\nGateway connection limit reached\n";

/// Pause after an accept error that is not about one connection (out of descriptors with
/// nothing to evict, out of memory): long enough not to spin, short enough to recover within a
/// request's patience.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The TCP connection an upgrade request arrived on (a request extension, set only on
/// requests that ask for an upgrade).
#[derive(Clone)]
pub struct ConnHandle(pub Arc<ConnState>);

/// Accepts until `shutdown` turns true, then lets every HTTP connection finish its request
/// (hyper's graceful shutdown) and returns once they are closed.
pub async fn run(
    listener: TcpListener,
    table: Arc<ConnTable>,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // every connection task holds a receiver; `closed()` resolves when the last one ends
    let (done_tx, done_rx) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            r = async {
                table.room().await;
                listener.accept().await
            } => r,
            _ = shutdown.wait_for(|v| *v) => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                match table.admit(peer) {
                    Ok(slot) => {
                        tokio::spawn(serve_conn(
                            tcp,
                            slot,
                            router.clone(),
                            shutdown.clone(),
                            done_rx.clone(),
                        ));
                    }
                    Err(_) => {
                        // best effort, never waits: the socket is closed right after
                        let _ = tcp.try_write(REFUSED);
                    }
                }
            }
            Err(e) => accept_failed(&table, e).await,
        }
    }
    table.begin_shutdown();
    drop(listener);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

async fn accept_failed(table: &ConnTable, e: std::io::Error) {
    use std::io::ErrorKind as K;
    // about one connection that is already gone: accept the next
    if matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::ConnectionRefused | K::Interrupted
    ) {
        return;
    }
    let out_of_fds = matches!(
        e.raw_os_error(),
        Some(code) if code == nix::errno::Errno::EMFILE as i32 || code == nix::errno::Errno::ENFILE as i32
    );
    let code = if out_of_fds { "EMFILE" } else { "ACCEPT" };
    table.metrics.inc(
        names::ERRORS_TOTAL,
        &[("code", code), ("kind", "accept"), ("transport", "tcp")],
    );
    let made_room = out_of_fds && table.make_room();
    if let Some(more) = table.fd_warnings.hit() {
        tracing::warn!(
            error = %e,
            open = table.open(),
            max_tcp_connections = table.cap(),
            closed_an_idle_connection = made_room,
            events_since_last_warning = more,
            "cannot accept connections; pausing accept (raise the file-descriptor limit, or lower server.max_tcp_connections / raise server.fd_reserve)"
        );
    }
    // an evicted connection frees its descriptor as soon as its task runs
    let pause = if made_room {
        Duration::from_millis(1)
    } else {
        ACCEPT_BACKOFF
    };
    tokio::time::sleep(pause).await;
}

async fn serve_conn(
    tcp: TcpStream,
    slot: Slot,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
    _done: watch::Receiver<()>,
) {
    let state = slot.state().clone();
    let table = slot.table_arc();
    let service = ConnService {
        router,
        state: state.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        // ours runs in ConnIo (it tells idle time from a slow head)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(ConnIo::new(tcp, slot)), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::trace!(peer = %state.peer(), error = %e, "connection ended with an error");
                }
                return;
            }
            // chosen for eviction: dropping the connection closes the socket
            _ = state.evicted() => return,
            _ = shutdown.wait_for(|v| *v), if !draining => {
                draining = true;
                // no lingering close while the server goes away
                table.begin_shutdown();
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The router as one connection's hyper service: marks the connection busy while a request
/// is served, and hands upgrade requests their connection.
struct ConnService {
    router: axum::Router,
    state: Arc<ConnState>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = Response;
    type Error = Infallible;
    type Future = Served;

    fn call(&self, req: hyper::Request<Incoming>) -> Served {
        self.state.begin_request();
        let mut req: Request = req.map(axum::body::Body::new);
        if req.headers().contains_key(axum::http::header::UPGRADE) {
            req.extensions_mut().insert(ConnHandle(self.state.clone()));
        }
        let mut router = self.router.clone();
        Served {
            inner: tower_service::Service::call(&mut router, req),
            state: self.state.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request being served; when its response is ready the connection is idle again.
    struct Served {
        #[pin]
        inner: axum::routing::future::RouteFuture<Infallible>,
        state: Arc<ConnState>,
    }
}

impl Future for Served {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        this.state.end_request();
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod backlog_tests {
    use super::*;

    /// A burst of connections the server has not accepted yet all complete their handshake
    /// (with the old backlog of 128, the ones past 129 waited for retries and timed out here).
    #[tokio::test]
    async fn a_burst_of_300_connections_waits_in_the_backlog() {
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        let n = 300.min(somaxconn);
        let listener = match bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("local_addr: {e}"),
        };
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            tasks.spawn(async move {
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
            });
        }
        let mut connected = Vec::new();
        while let Some(r) = tasks.join_next().await {
            if let Ok(Ok(Ok(s))) = r {
                connected.push(s);
            }
        }
        assert_eq!(
            connected.len(),
            n,
            "connections that completed without an accept"
        );
        drop(listener);
    }
}
