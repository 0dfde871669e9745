//! Gateway state: registered workflows, connections, the global state version, and the
//! bridge from engine events to protocol broadcasts.

use crate::auth::{AuthConfig, Grant};
use crate::error::RpcError;
use crate::metrics::Metrics;
use crate::outbound::Queue;
use crate::webhook::WebhookConfig;
use serde_json::{Value, json};
use smithers_core::Workflow;
use smithers_engine::{Engine, EngineEvent, StartOptions};
use smithers_store::{RunRow, Store, status};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Protocol version this gateway speaks.
pub const PROTOCOL: u64 = 1;

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
            webhook_dedupe_secs: 24 * 60 * 60,
            max_outbound_frames: 10_000,
            max_outbound_bytes: 16 * 1024 * 1024,
            write_timeout_ms: 30_000,
            max_streams_per_connection: 32,
            max_streams: 2_000,
        }
    }
}

/// A workflow clients can start by key.
pub struct Registered {
    pub key: String,
    pub workflow: Arc<dyn Workflow>,
    pub schedule: Option<String>,
    pub webhook: Option<WebhookConfig>,
}

pub use crate::outbound::Outbound;

/// Which runs' events a connection receives.
#[derive(Default)]
pub struct View {
    /// `None` = every run; `Some(set)` = only these runs (an empty set means every run too).
    pub runs: Option<HashSet<String>>,
    /// Runs being (or having been) replayed on this connection (`connect.params.afterSeq`).
    pub gates: HashMap<String, crate::replay::Gate>,
}

impl View {
    /// Whether events of `run_id` (or events of no run) pass the `subscribe` filter.
    pub fn wants(&self, run_id: Option<&str>) -> bool {
        let Some(run) = run_id else { return true };
        match &self.runs {
            Some(set) if !set.is_empty() => set.contains(run),
            _ => true,
        }
    }
}

/// What the broadcaster needs to know about a WebSocket connection.
pub struct ConnShared {
    pub id: u64,
    /// The client's address, for logs.
    pub peer: Option<SocketAddr>,
    pub authed: AtomicBool,
    pub grant: RwLock<Option<Grant>>,
    pub view: RwLock<View>,
    /// Frames waiting for the socket (bounded: `[server] max_outbound_frames/_bytes`).
    pub out: Queue,
    /// Open `streamDevTools` streams (at most `[server] max_streams_per_connection`).
    pub streams: AtomicUsize,
}

impl ConnShared {
    /// Queues a broadcast event if the connection wants it; false if it was not queued.
    fn deliver(
        &self,
        run_id: Option<&str>,
        event_seq: Option<i64>,
        out: impl FnOnce() -> Outbound,
    ) -> bool {
        if !self.authed.load(Ordering::Acquire) {
            return false;
        }
        let Ok(view) = self.view.read() else {
            return false;
        };
        if !view.wants(run_id) {
            return false;
        }
        let out = out();
        let out = match run_id.and_then(|r| view.gates.get(r)) {
            Some(gate) => match gate.admit(event_seq, out, &self.out) {
                Some(out) => out,
                None => return false,
            },
            None => out,
        };
        // still under the view lock: a replay that ends (taking it for writing) sends what
        // it held before any later live event of the run
        self.out.push(out).is_ok()
    }

    /// Whether the connection may see events of `run_id` (its `subscribe` filter).
    pub fn may_see(&self, run_id: &str) -> bool {
        self.view
            .read()
            .map(|v| v.wants(Some(run_id)))
            .unwrap_or(true)
    }

    /// Adds a run to the subscription set, creating it (the upstream auto-subscribe rule).
    pub fn subscribe(&self, run_id: &str) {
        if let Ok(mut v) = self.view.write() {
            v.runs
                .get_or_insert_with(HashSet::new)
                .insert(run_id.to_string());
        }
    }
}

/// Shared gateway state.
pub struct Gateway {
    pub engine: Engine,
    pub store: Arc<dyn Store>,
    pub workflows: BTreeMap<String, Registered>,
    pub auth: AuthConfig,
    pub config: ServerConfig,
    pub metrics: Arc<Metrics>,
    state_version: AtomicU64,
    started: Instant,
    next_conn: AtomicU64,
    /// Open WebSockets and those of them that have not completed `connect`.
    pub ws_budget: crate::ws_budget::WsBudget,
    conns: RwLock<HashMap<u64, Arc<ConnShared>>>,
    /// Workflow key of each run driven through this gateway (for metric labels).
    run_keys: Mutex<HashMap<String, String>>,
    /// The last event seq broadcast per run (so another node's events are broadcast once).
    last_seqs: Mutex<crate::foreign::LastSeqs>,
    /// Whether other nodes' events are forwarded (PostgreSQL): only then is each broadcast seq
    /// remembered, so a single-node gateway pays nothing for it per event.
    pub(crate) forwards_foreign: AtomicBool,
    /// Runs with a `jumpToFrame` in flight (the per-run rewind lock).
    pub(crate) rewinding: Mutex<HashSet<String>>,
    /// Open `streamDevTools` streams.
    pub streams: crate::stream::Registry,
    /// The hello snapshot read shared by concurrent `connect`s.
    pub(crate) hello_snapshots: crate::ws::SharedSnapshot,
    /// Webhook budgets and log throttles.
    pub webhooks: crate::webhook::Shared,
}

/// Who asked for something (for run auth context and auto-subscribe).
pub struct Caller<'a> {
    pub grant: &'a Grant,
    pub conn: Option<&'a Arc<ConnShared>>,
}

impl Gateway {
    pub fn new(
        engine: Engine,
        workflows: Vec<Registered>,
        auth: AuthConfig,
        config: ServerConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Gateway> {
        let store = engine.store().clone();
        let webhooks = crate::webhook::Shared::new(&config.limits);
        Arc::new(Gateway {
            engine,
            store,
            workflows: workflows.into_iter().map(|w| (w.key.clone(), w)).collect(),
            auth,
            config,
            metrics,
            state_version: AtomicU64::new(0),
            started: Instant::now(),
            next_conn: AtomicU64::new(1),
            ws_budget: Default::default(),
            conns: RwLock::new(HashMap::new()),
            run_keys: Mutex::new(HashMap::new()),
            last_seqs: Mutex::new(crate::foreign::LastSeqs::default()),
            forwards_foreign: AtomicBool::new(false),
            rewinding: Mutex::new(HashSet::new()),
            streams: Default::default(),
            hello_snapshots: Default::default(),
            webhooks,
        })
    }

    pub fn state_version(&self) -> u64 {
        self.state_version.load(Ordering::Acquire)
    }

    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn register_conn(&self, out: Queue, peer: Option<SocketAddr>) -> Arc<ConnShared> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(ConnShared {
            id,
            peer,
            authed: AtomicBool::new(false),
            grant: RwLock::new(None),
            view: RwLock::new(View::default()),
            out,
            streams: AtomicUsize::new(0),
        });
        if let Ok(mut m) = self.conns.write() {
            m.insert(id, c.clone());
        }
        c
    }

    pub fn unregister_conn(&self, id: u64) {
        if let Ok(mut m) = self.conns.write() {
            m.remove(&id);
        }
    }

    /// Closes every WebSocket connection with a close frame (on shutdown).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        if let Ok(conns) = self.conns.read() {
            for c in conns.values() {
                c.out.close(code, reason);
            }
        }
    }

    /// Sends an event to every authenticated connection that wants it; bumps the global state
    /// version by exactly one, whether or not anyone receives it.
    pub fn broadcast(&self, event: &'static str, payload: Value) {
        let sv = self.state_version.fetch_add(1, Ordering::AcqRel) + 1;
        let run = payload.get("runId").and_then(Value::as_str);
        let event_seq = payload.get("eventSeq").and_then(Value::as_i64);
        // serialized once here rather than once per connection; each writer adds its own seq
        let payload_json: Arc<str> = payload.to_string().into();
        let mut sent: u64 = 0;
        if let Ok(conns) = self.conns.read() {
            for c in conns.values() {
                let out = || Outbound::Event {
                    event,
                    payload_json: payload_json.clone(),
                    state_version: sv,
                };
                // never waits: a connection whose queue is full is closed as too slow
                if c.deliver(run, event_seq, out) {
                    sent += 1;
                }
            }
        }
        if sent > 0 {
            self.metrics.add(
                "smithers_gateway_messages_sent_total",
                &[
                    ("event", event),
                    ("frameType", "event"),
                    ("transport", "ws"),
                ],
                sent as f64,
            );
        }
    }

    /// Maps committed engine events to protocol broadcasts (gateway-protocol §1.8).
    pub fn on_engine_event(&self, ev: &EngineEvent) {
        if self.forwards_foreign.load(Ordering::Acquire) {
            self.advance_seq(&ev.run_id, ev.seq);
        }
        self.broadcast_event(ev.event_type, &ev.run_id, ev.seq, &ev.payload);
    }

    /// Broadcasts an event read from the run's log (committed by another node), unless an
    /// event of that run with this seq or a later one was broadcast already.
    pub fn on_stored_event(&self, run_id: &str, seq: i64, event_type: &str, payload: &Value) {
        if self.advance_seq(run_id, seq) {
            self.broadcast_event(event_type, run_id, seq, payload);
        }
    }

    /// The last event seq of a run this gateway broadcast, if it remembers one.
    pub fn last_broadcast_seq(&self, run_id: &str) -> Option<i64> {
        self.last_seqs.lock().ok().and_then(|s| s.get(run_id))
    }

    /// Records a broadcast seq; false when it (or a later one) was recorded already.
    fn advance_seq(&self, run_id: &str, seq: i64) -> bool {
        self.last_seqs
            .lock()
            .map(|mut s| s.advance(run_id, seq))
            .unwrap_or(true)
    }

    fn broadcast_event(&self, event_type: &str, run_id: &str, seq: i64, payload: &Value) {
        let Some((event, payload)) = map_event(event_type, run_id, seq, payload) else {
            return;
        };
        if event == "run.completed" {
            let st = payload
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            self.count_completion(run_id, &st);
        }
        self.broadcast(event, payload);
    }

    /// Broadcasts `run.completed`. It is called once per completion: from the engine event that
    /// recorded it, or by the gateway for a parked run it cancelled itself.
    pub fn run_completed(&self, run_id: &str, st: &str, error: Option<Value>) {
        let mut payload = json!({"runId": run_id, "status": st});
        if let Some(e) = error {
            payload["error"] = e;
        }
        self.broadcast("run.completed", payload);
        self.count_completion(run_id, st);
    }

    fn count_completion(&self, run_id: &str, st: &str) {
        let workflow = self
            .run_keys
            .lock()
            .ok()
            .and_then(|mut m| m.remove(run_id))
            .unwrap_or_default();
        self.metrics.inc(
            "smithers_gateway_runs_completed_total",
            &[("status", st), ("workflow", &workflow)],
        );
    }

    fn remember_key(&self, run_id: &str, key: &str) {
        if let Ok(mut m) = self.run_keys.lock() {
            m.insert(run_id.to_string(), key.to_string());
        }
    }

    /// The registered key a stored run belongs to.
    pub fn key_of(&self, run: &RunRow) -> Option<String> {
        crate::shapes::workflow_key(run, &|name| {
            self.workflows
                .values()
                .find(|w| w.workflow.name() == name)
                .map(|w| w.key.clone())
        })
    }

    /// The workflow a stored run belongs to (for resuming it).
    pub fn workflow_of(&self, run: &RunRow) -> Option<Arc<dyn Workflow>> {
        let key = self.key_of(run)?;
        self.workflows.get(&key).map(|w| w.workflow.clone())
    }

    /// Starts a run of a registered workflow on behalf of a caller.
    pub async fn start_run(
        &self,
        key: &str,
        input: Value,
        run_id: Option<String>,
        caller: &Caller<'_>,
        triggered_by: Option<&str>,
    ) -> Result<String, RpcError> {
        let reg = self
            .workflows
            .get(key)
            .ok_or_else(|| RpcError::new("NOT_FOUND", format!("Unknown workflow: {key}")))?;
        let triggered = triggered_by
            .map(str::to_string)
            .or_else(|| caller.grant.user_id.clone())
            .unwrap_or_else(|| "gateway".into());
        let config = json!({
            "auth": {
                "triggeredBy": triggered,
                "scopes": caller.grant.scopes,
                "role": caller.grant.role,
                "createdAt": crate::shapes::iso(smithers_engine::now_ms()),
            },
            "gatewayWorkflowKey": key,
            "gatewayTriggeredBy": triggered,
        });
        // subscribe before the run starts, so its first events reach this connection too
        let run_id = run_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if let Some(c) = caller.conn {
            c.subscribe(&run_id);
        }
        self.remember_key(&run_id, key);
        let handle = self
            .engine
            .start(
                reg.workflow.clone(),
                input,
                StartOptions {
                    run_id: Some(run_id.clone()),
                    parent_run_id: None,
                    config: Some(config),
                },
            )
            .await?;
        let source = source_of(&triggered);
        self.metrics.inc(
            "smithers_gateway_runs_started_total",
            &[("resume", "false"), ("source", source), ("workflow", key)],
        );
        // the driver runs on; completion is broadcast from its RunFinished/RunFailed event
        drop(handle);
        Ok(run_id)
    }

    /// After a decision or a signal: wake the run if it is driven here, else resume it unless it
    /// has ended (gateway-protocol §4 resume rule).
    pub async fn continue_run(
        &self,
        run_id: &str,
        caller: Option<&Caller<'_>>,
    ) -> Result<(), RpcError> {
        if let Some(c) = caller.and_then(|c| c.conn) {
            c.subscribe(run_id);
        }
        for _ in 0..20 {
            if self.engine.wake(run_id) {
                return Ok(());
            }
            let Some(row) = self.store.get_run(run_id).await? else {
                return Ok(());
            };
            if status::is_ended(&row.status) {
                return Ok(());
            }
            let Some(wf) = self.workflow_of(&row) else {
                return Err(RpcError::new(
                    "SERVER_ERROR",
                    format!(
                        "run `{run_id}` belongs to no registered workflow; it cannot be resumed here"
                    ),
                ));
            };
            match self.engine.resume(wf, run_id, false).await {
                Ok(h) => {
                    let key = self.key_of(&row).unwrap_or_default();
                    self.remember_key(run_id, &key);
                    self.metrics.inc(
                        "smithers_gateway_runs_started_total",
                        &[
                            ("resume", "true"),
                            ("source", "gateway"),
                            ("workflow", &key),
                        ],
                    );
                    drop(h);
                    return Ok(());
                }
                Err(e) if e.code == smithers_core::Code::RunStillRunning => {
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Maps an engine event (as committed, with its per-run `seq`) to a protocol event (gateway-protocol
/// §1.8). Payloads carry `eventSeq`, the event's position in the run's durable log, which a
/// reconnecting client passes back as `afterSeq` to replay what it missed.
pub fn map_event(
    event_type: &str,
    run_id: &str,
    seq: i64,
    p: &Value,
) -> Option<(&'static str, Value)> {
    let node = p.get("nodeId").cloned().unwrap_or(Value::Null);
    let iteration = p.get("iteration").cloned().unwrap_or(json!(0));
    let field = |k: &str| p.get(k).cloned().unwrap_or(Value::Null);
    let (event, mut payload) = match event_type {
        "NodeStarted" => (
            "node.started",
            json!({"runId": run_id, "nodeId": node, "state": "in-progress"}),
        ),
        "NodeFinished" => (
            "node.finished",
            json!({"runId": run_id, "nodeId": node, "state": "finished"}),
        ),
        "NodeFailed" => (
            "node.failed",
            json!({"runId": run_id, "nodeId": node, "state": "failed", "error": field("error")}),
        ),
        "NodeOutput" => (
            "task.output",
            json!({"runId": run_id, "nodeId": node, "output": field("text"), "stream": field("stream")}),
        ),
        "TaskHeartbeat" => (
            "task.heartbeat",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration, "attempt": field("attempt")}),
        ),
        "ApprovalRequested" => (
            "approval.requested",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration}),
        ),
        "ApprovalGranted" | "ApprovalDenied" => (
            "approval.decided",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration, "approved": event_type == "ApprovalGranted"}),
        ),
        "ApprovalAutoApproved" => (
            "approval.auto_approved",
            json!({"runId": run_id, "nodeId": node, "iteration": iteration}),
        ),
        "RunFinished" => (
            "run.completed",
            json!({"runId": run_id, "status": "finished"}),
        ),
        "RunFailed" => (
            "run.completed",
            json!({"runId": run_id, "status": "failed", "error": field("error")}),
        ),
        "RunCancelled" => (
            "run.completed",
            json!({"runId": run_id, "status": "cancelled"}),
        ),
        "TimeTravelJumped" => (
            "run.time_travel_jumped",
            json!({"runId": run_id, "fromFrameNo": field("fromFrameNo"), "toFrameNo": field("toFrameNo"), "caller": field("caller")}),
        ),
        _ => return None,
    };
    payload["eventSeq"] = json!(seq);
    Some((event, payload))
}

/// `source` label of runs_started_total from the `triggeredBy` value.
pub fn source_of(triggered_by: &str) -> &'static str {
    if triggered_by.starts_with("cron:") {
        "cron"
    } else if triggered_by.starts_with("webhook:") {
        "webhook"
    } else if triggered_by == "gateway" {
        "gateway"
    } else {
        "user"
    }
}
