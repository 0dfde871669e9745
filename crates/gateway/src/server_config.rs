//! The `[server]` settings a gateway runs with: plain data, filled from `smithers.toml` by
//! [`crate::config`] and read by every layer that enforces a limit.

/// Server knobs (DESIGN §4 `[server]`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
    pub heartbeat_ms: u64,
    /// Open WebSocket connections (authenticated or not); the next upgrade gets 503.
    pub max_connections: usize,
    pub max_body_bytes: usize,
    /// Whether `GET /metrics` needs a credential. `smithers.toml` defaults it to true whenever
    /// an auth mode other than `none` is configured.
    pub metrics_auth: bool,
    /// Serve the web console at `/` (`[server] console`, default on).
    pub console: bool,
    pub features: Vec<String>,
    /// Network limits that keep a hostile or slow client from hurting anyone but itself.
    pub limits: Limits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7331".into(),
            heartbeat_ms: 15_000,
            max_connections: 1000,
            max_body_bytes: 1_048_576,
            metrics_auth: false,
            console: true,
            features: vec!["streaming".into(), "runs".into()],
            limits: Limits::default(),
        }
    }
}

/// Timeouts and caps on what clients may hold (`[server]` keys of the same names; every one is
/// documented in docs/operations.md under "Network limits").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// A request's headers must arrive within this time of the connection opening or of the
    /// previous response.
    pub header_timeout_ms: u64,
    /// A request body (`/rpc`, webhooks) must arrive within this time of its headers.
    pub body_timeout_ms: u64,
    /// A keep-alive HTTP connection with no request in flight is closed after this time.
    pub idle_timeout_ms: u64,
    /// A WebSocket must complete `connect` within this time of its upgrade.
    pub connect_timeout_ms: u64,
    /// Open TCP connections of every kind. `None` = as many as the file-descriptor limit allows
    /// after `fd_reserve`; an explicit value is also kept below that.
    pub max_tcp_connections: Option<usize>,
    /// File descriptors kept free for storage, task processes and logs.
    pub fd_reserve: usize,
    /// WebSockets that have not completed `connect` (their own, smaller share of
    /// `max_connections`).
    pub max_unauthenticated_ws: usize,
    /// Bytes of webhook bodies held before their signature is checked, across all requests
    /// (each request also holds at most `max_body_bytes`).
    pub max_unverified_webhook_bytes: usize,
    /// Bytes of `POST /rpc` bodies held while they arrive, across all requests, when auth is
    /// `none`: then nobody has vouched for any client, so their bodies get a budget of their own.
    pub max_anonymous_rpc_bytes: usize,
    /// How long a webhook delivery id is remembered; a repeat inside it is a duplicate.
    pub webhook_dedupe_secs: u64,
    /// Frames queued for one connection and not yet written; past either bound the client is
    /// disconnected as too slow.
    pub max_outbound_frames: usize,
    pub max_outbound_bytes: usize,
    /// One write to a WebSocket client (a batch of frames) must finish within this time, or
    /// the client is disconnected as too slow.
    pub write_timeout_ms: u64,
    /// `streamDevTools` streams open at once on one connection, and on the whole server.
    pub max_streams_per_connection: usize,
    pub max_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            connect_timeout_ms: 10_000,
            max_tcp_connections: None,
            fd_reserve: 256,
            max_unauthenticated_ws: 128,
            max_unverified_webhook_bytes: 32 * 1024 * 1024,
            max_anonymous_rpc_bytes: 32 * 1024 * 1024,
            webhook_dedupe_secs: 24 * 60 * 60,
            max_outbound_frames: 10_000,
            max_outbound_bytes: 16 * 1024 * 1024,
            write_timeout_ms: 30_000,
            max_streams_per_connection: 32,
            max_streams: 2_000,
        }
    }
}
