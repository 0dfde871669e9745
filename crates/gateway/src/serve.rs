//! Running the gateway: the listener, the engine-event bridge, the background loops (timers,
//! event timeouts, cron, orphaned runs) and a clean shutdown.

use crate::gateway::Gateway;
use serde_json::Value;
use smithers_core::{Code, SmithersError};
use smithers_store::status;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// A running gateway.
pub struct Server {
    pub local_addr: std::net::SocketAddr,
    gw: Arc<Gateway>,
    shutdown: tokio::sync::watch::Sender<bool>,
    join: tokio::task::JoinHandle<std::io::Result<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Stops accepting, closes sockets, and waits for the HTTP server to finish. Runs keep their
    /// state and are resumed by the next start.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(true);
        self.gw.close_all(1001, "server shutting down");
        for b in &self.background {
            b.abort();
        }
        match tokio::time::timeout(Duration::from_secs(5), self.join).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Err(_) => Ok(()),
        }
    }
}

/// Starts serving on an already bound listener.
pub async fn start(gw: Arc<Gateway>, listener: TcpListener) -> std::io::Result<Server> {
    let local_addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut background = Vec::new();

    // events of runs executed by other nodes on the same database; known before the engine's
    // own events flow, so those are remembered and never broadcast twice
    let foreign = gw.store.foreign_events().await;
    if foreign.is_some() {
        gw.forwards_foreign
            .store(true, std::sync::atomic::Ordering::Release);
    }
    // engine events → protocol broadcasts
    {
        let gw = gw.clone();
        let mut events = gw.engine.subscribe();
        background.push(tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ev) => gw.on_engine_event(&ev),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
            }
        }));
    }
    if let Some(feed) = foreign {
        background.push(tokio::spawn(crate::foreign::run(gw.clone(), feed)));
    }
    // a rewind cut short by a crash: its run waits for a person instead of being resumed
    match gw.engine.recover_interrupted_rewinds().await {
        Ok(runs) => {
            for r in runs {
                eprintln!(
                    "smithers: run {r} was being rewound when the server stopped; it is now needs-attention (inspect it, then `smithers resume {r}`)"
                );
            }
        }
        Err(e) => eprintln!("smithers: could not check for interrupted rewinds: {e}"),
    }
    // runs orphaned by a dead engine (ours before a restart, or another node's)
    {
        let g = gw.clone();
        let resolve = move |row: &smithers_store::RunRow| g.workflow_of(row);
        let _ = gw.engine.take_over_orphans(&resolve).await;
    }
    background.push(tokio::spawn(wake_loop(gw.clone())));
    background.push(tokio::spawn(crate::cron_loop::run(gw.clone())));

    let limits = &gw.config.limits;
    let cap = crate::fd_limit::tcp_cap(
        limits.max_tcp_connections,
        limits.fd_reserve,
        crate::fd_limit::soft_nofile(),
    );
    if let Some(w) = &cap.warning {
        tracing::warn!("{w}");
    }
    tracing::info!(
        max_tcp_connections = cap.cap,
        max_connections = gw.config.max_connections,
        max_unauthenticated_ws = limits.max_unauthenticated_ws,
        "connection limits"
    );
    let table = crate::conn_limit::ConnTable::new(cap.cap, limits, gw.metrics.clone());
    let app = crate::http::router(gw.clone());
    let join = tokio::spawn(crate::listener::run(listener, table, app, rx));
    Ok(Server {
        local_addr,
        gw,
        shutdown: tx,
        join,
        background,
    })
}

/// Resumes parked runs whose timer is due or whose event wait timed out, and takes over runs
/// whose engine stopped heart-beating. Once a second; once a minute it also forgets expired
/// webhook delivery ids.
async fn wake_loop(gw: Arc<Gateway>) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        let now = smithers_engine::now_ms();
        for st in [status::WAITING_TIMER, status::WAITING_EVENT] {
            let Ok(runs) = gw.store.list_runs(Some(st), 1000).await else {
                continue;
            };
            for r in runs {
                if r.status != st || gw.engine.is_active(&r.run_id) {
                    continue;
                }
                if due(&gw, &r.run_id, now).await {
                    let _ = gw.continue_run(&r.run_id, None).await;
                }
            }
        }
        if n.is_multiple_of(10) {
            let g = gw.clone();
            let resolve = move |row: &smithers_store::RunRow| g.workflow_of(row);
            let _ = gw.engine.take_over_orphans(&resolve).await;
        }
        if n.is_multiple_of(60) {
            crate::webhook::prune_expired(&gw).await;
        }
    }
}

/// Whether a parked run has a timer that fired or an event wait that timed out.
async fn due(gw: &Gateway, run_id: &str, now: i64) -> bool {
    let Ok(attempts) = gw.store.list_attempts(run_id).await else {
        return false;
    };
    attempts.iter().any(|a| {
        let meta = a
            .meta_json
            .as_deref()
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok());
        let Some(meta) = meta else { return false };
        match a.state.as_str() {
            "waiting-timer" => meta
                .pointer("/timer/firesAtMs")
                .and_then(|v| v.as_i64())
                .is_some_and(|f| f <= now),
            "waiting-event" => {
                let start = meta
                    .pointer("/waitForEvent/startedAtMs")
                    .and_then(|v| v.as_i64());
                let timeout = meta
                    .pointer("/waitForEvent/timeoutMs")
                    .and_then(|v| v.as_i64());
                matches!((start, timeout), (Some(s), Some(t)) if s + t <= now)
            }
            _ => false,
        }
    })
}

/// `smithers serve`: opens storage, loads the workflows, registers schedules, serves until
/// SIGTERM or Ctrl-C, then shuts down cleanly (runs stay resumable; the next start resumes
/// them). Errors carry the code the CLI prints (`ADDRESS_IN_USE`, `INVALID_WORKFLOW`, the
/// storage's own codes, …).
pub async fn run(config: crate::config::ServeConfig) -> Result<(), SmithersError> {
    use crate::gateway::Registered;
    let store = smithers_store::open(&config.storage_url).await?;
    let engine =
        smithers_engine::Engine::new(store.clone(), smithers_engine::EngineConfig::default());
    let mut regs = Vec::new();
    for w in &config.workflows {
        let wf = load_workflow(w)?;
        if let Some(pattern) = &w.schedule {
            // a schedule whose runs would all be refused is refused now, at start
            let input = w.input.clone().unwrap_or_else(|| serde_json::json!({}));
            smithers_engine::check_input(wf.as_ref(), &input).map_err(|e| {
                SmithersError::new(
                    Code::InvalidConfig,
                    format!(
                        "workflow `{}`: its schedule's input cannot start a run ({}); set `input = {{ … }}` under its [[workflows]] entry",
                        w.key, e.message
                    ),
                )
            })?;
            let row = crate::cron::new_row(
                &format!("gateway:{}", w.key),
                &w.key,
                pattern,
                true,
                smithers_engine::now_ms(),
                w.input.as_ref(),
            )
            .map_err(|e| {
                SmithersError::new(
                    Code::InvalidConfig,
                    format!("workflow `{}` schedule: {e}", w.key),
                )
            })?;
            store.upsert_cron(row).await?;
        }
        regs.push(Registered {
            key: w.key.clone(),
            workflow: wf,
            schedule: w.schedule.clone(),
            webhook: w.webhook.clone(),
        });
    }
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let auth_mode = config.auth.mode_name();
    let gw_regs: Vec<(String, Option<Value>)> = regs
        .iter()
        .map(|r| (r.key.clone(), r.workflow.input_schema().cloned()))
        .collect();
    let telemetry = match crate::telemetry::TelemetryConfig::resolve(
        config.otlp_endpoint.as_deref(),
        config.service_name.as_deref(),
        &|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()),
    ) {
        Some(t) => {
            let uri = t
                .uri()
                .map_err(|e| SmithersError::new(Code::InvalidConfig, e))?;
            Some((t, uri))
        }
        None => None,
    };
    let gw = Gateway::new(engine, regs, config.auth, config.server.clone(), metrics);
    // before the server starts taking over runs, so their spans are exported too
    let _telemetry = telemetry.map(|(t, uri)| crate::telemetry::start(gw.clone(), t, uri));
    let listen = &config.server.listen;
    let listener = crate::listener::bind(listen)
        .await
        .map_err(|e| listen_error(listen, &e))?;
    let server = start(gw, listener)
        .await
        .map_err(|e| SmithersError::new(Code::IoError, format!("cannot start the server: {e}")))?;
    // handlers first: a SIGTERM sent as soon as the listening line is out (a supervisor, a
    // test) must stop the server cleanly, not kill it with the default action
    let signal = |kind| {
        tokio::signal::unix::signal(kind).map_err(|e| {
            SmithersError::new(
                Code::IoError,
                format!("cannot install a signal handler: {e}"),
            )
        })
    };
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let keys: Vec<&str> = config.workflows.iter().map(|w| w.key.as_str()).collect();
    tracing::info!(
        version = %env!("CARGO_PKG_VERSION"),
        listen = %server.local_addr,
        database = %smithers_store::redact_url(&smithers_store::storage_url(&config.storage_url)),
        auth = %auth_mode,
        workflows = ?keys,
        "smithers gateway started"
    );
    eprintln!(
        "smithers gateway listening on http://{} ({} workflows)",
        server.local_addr,
        config.workflows.len()
    );
    eprintln!(
        "{}",
        next_steps(
            &gw_regs,
            server.local_addr,
            auth_mode,
            config.server.console
        )
    );
    // start-up code need not stay mapped once the server has settled (startup_pages.rs)
    tokio::spawn(async {
        tokio::time::sleep(crate::startup_pages::AFTER_LISTEN).await;
        match crate::startup_pages::release() {
            Ok(bytes) => tracing::debug!(kib = bytes / 1024, "released start-up code pages"),
            Err(e) => tracing::debug!(error = %e, "cannot release start-up code pages"),
        }
    });
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = why, "shutting down; runs in flight stay resumable");
    eprintln!("shutting down");
    server
        .shutdown()
        .await
        .map_err(|e| SmithersError::new(Code::IoError, format!("shutdown: {e}")))
}

/// Loads a served workflow's file; its problems, one a line, under `INVALID_WORKFLOW`.
pub fn load_workflow(
    w: &crate::config::WorkflowEntry,
) -> Result<Arc<smithers_core::yaml::YamlWorkflow>, SmithersError> {
    smithers_core::yaml::load_file(&w.path).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        SmithersError::new(
            Code::InvalidWorkflow,
            format!("workflow `{}` has problems:\n{}", w.key, lines.join("\n")),
        )
    })
}

/// Why the listen address could not be bound, and how to pick another.
fn listen_error(listen: &str, e: &std::io::Error) -> SmithersError {
    let how = "choose another with `smithers serve --port N` or `--listen HOST:PORT` (or `[server] listen` in smithers.toml, or SMITHERS_LISTEN)";
    match e.kind() {
        std::io::ErrorKind::AddrInUse => SmithersError::new(
            Code::AddressInUse,
            format!(
                "cannot listen on {listen}: the address is already in use (another server holds it); {how}"
            ),
        ),
        _ => SmithersError::new(
            Code::InvalidInput,
            format!("cannot listen on {listen}: {e}; {how}"),
        ),
    }
}

/// What to do next, printed under the listening line: one command that starts a run (of a
/// workflow that needs no input when there is one) and how to list the others.
fn next_steps(
    workflows: &[(String, Option<Value>)],
    addr: std::net::SocketAddr,
    auth_mode: &str,
    console: bool,
) -> String {
    // a wildcard address is reachable on loopback
    let host = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let url = format!("http://{host}:{}", addr.port());
    let token = if auth_mode == "none" {
        ""
    } else {
        "SMITHERS_TOKEN=… "
    };
    let needs_input = |schema: &Option<Value>| {
        schema
            .as_ref()
            .and_then(|s| s.get("required"))
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty())
    };
    let console = if console {
        format!("  console:         {url}/\n")
    } else {
        String::new()
    };
    let pick = workflows
        .iter()
        .find(|(_, s)| !needs_input(s))
        .or_else(|| workflows.first());
    match pick {
        None => format!(
            "{console}  no workflows served: add workflow files (docs/workflows.md) and restart"
        ),
        Some((key, schema)) => {
            let input = if needs_input(schema) {
                " --input '{…}'"
            } else {
                ""
            };
            format!(
                "{console}  start a run:     {token}smithers run {key}{input} --url {url}\n  list workflows:  {token}smithers workflows --url {url}"
            )
        }
    }
}
