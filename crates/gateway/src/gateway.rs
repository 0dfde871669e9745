//! Gateway state shared by every transport and method handler: registered workflows,
//! connections and their views, the global state version. Behaviour lives in the modules that
//! use it ([`crate::broadcast`], [`crate::run_control`], [`crate::methods`]).

use crate::auth::{AuthConfig, Grant};
use crate::metrics::Metrics;
use crate::outbound::Queue;
use crate::server_config::ServerConfig;
use crate::webhook::WebhookConfig;
use smithers_core::Workflow;
use smithers_engine::Engine;
use smithers_store::Store;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Protocol version this gateway speaks.
pub const PROTOCOL: u64 = 1;

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
    pub gates: HashMap<String, crate::replay_gate::Gate>,
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
    pub(crate) fn deliver(
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

    /// Subscribes to `run_id` and holds its events on this connection until
    /// [`ConnShared::answered`]: the request starting the run is still being answered. A run
    /// being replayed keeps its gate.
    pub fn hold_until_answered(&self, run_id: &str) {
        self.subscribe_and(run_id, true);
    }

    /// The response to the request that started `runs` is queued: their held events follow
    /// it, in order, before any later one (the view lock is held for writing meanwhile).
    pub fn answered(&self, runs: &[String]) {
        if runs.is_empty() {
            return;
        }
        let Ok(mut view) = self.view.write() else {
            return;
        };
        for run in runs {
            if !matches!(
                view.gates.get(run),
                Some(crate::replay_gate::Gate::Unanswered(_))
            ) {
                continue;
            }
            if let Some(crate::replay_gate::Gate::Unanswered(held)) = view.gates.remove(run) {
                for out in held.into_inner().unwrap_or_default() {
                    let _ = self.out.send_reserved(out);
                }
            }
        }
    }

    /// Adds a run to the subscription set, creating it (the upstream auto-subscribe rule).
    pub fn subscribe(&self, run_id: &str) {
        self.subscribe_and(run_id, false);
    }

    /// Subscribes to `run_id` and, with `hold`, holds its events (one view lock for both).
    fn subscribe_and(&self, run_id: &str, hold: bool) {
        let Ok(mut v) = self.view.write() else { return };
        v.runs
            .get_or_insert_with(HashSet::new)
            .insert(run_id.to_string());
        if hold {
            v.gates
                .entry(run_id.to_string())
                .or_insert_with(|| crate::replay_gate::Gate::Unanswered(Default::default()));
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
    pub(crate) state_version: AtomicU64,
    started: Instant,
    next_conn: AtomicU64,
    /// Open WebSockets and those of them that have not completed `connect`.
    pub ws_budget: Arc<crate::ws_budget::WsBudget>,
    pub(crate) conns: RwLock<HashMap<u64, Arc<ConnShared>>>,
    /// Workflow key of each run driven through this gateway (for metric labels).
    pub(crate) run_keys: Mutex<HashMap<String, String>>,
    /// The last event seq broadcast per run (so another node's events are broadcast once).
    pub(crate) last_seqs: Mutex<crate::last_seqs::LastSeqs>,
    /// Whether other nodes' events are forwarded (PostgreSQL): only then is each broadcast seq
    /// remembered, so a single-node gateway pays nothing for it per event.
    pub(crate) forwards_foreign: AtomicBool,
    /// Runs with a `jumpToFrame` in flight (the per-run rewind lock).
    pub(crate) rewinding: Mutex<HashSet<String>>,
    /// Open `streamDevTools` streams.
    pub streams: crate::stream_registry::Registry,
    /// The hello snapshot read shared by concurrent `connect`s.
    pub(crate) hello_snapshots: crate::shared_snapshot::SharedSnapshot,
    /// Webhook budgets and log throttles.
    pub webhooks: crate::webhook::Shared,
    /// Bytes of `POST /rpc` bodies being read when auth is `none` (`max_anonymous_rpc_bytes`).
    pub anonymous_rpc_bodies: crate::body::ByteBudget,
}

/// Who asked for something (for run auth context and auto-subscribe).
pub struct Caller<'a> {
    pub grant: &'a Grant,
    pub conn: Option<&'a Arc<ConnShared>>,
    /// Over WebSocket: the runs this request started, whose events wait on `conn` until the
    /// response is queued ([`ConnShared::answered`]).
    pub answering: Option<&'a std::sync::Mutex<Vec<String>>>,
}

impl Caller<'_> {
    /// Subscribes the caller's connection to a run it starts or resumes (the upstream
    /// auto-subscribe rule); over WebSocket the run's events then wait until the response to
    /// this request is queued.
    pub fn follow(&self, run_id: &str) {
        let Some(c) = self.conn else { return };
        match self.answering.map(|a| a.lock()) {
            Some(Ok(mut runs)) => {
                c.hold_until_answered(run_id);
                runs.push(run_id.to_string());
            }
            _ => c.subscribe(run_id),
        }
    }
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
        // a subflow step may name any of these by key, as clients do
        engine.register_workflows(
            workflows
                .iter()
                .map(|w| (w.key.clone(), w.workflow.clone())),
        );
        let webhooks = crate::webhook::Shared::new(&config.limits);
        let anonymous_rpc_bodies =
            crate::body::ByteBudget::new(config.limits.max_anonymous_rpc_bytes);
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
            last_seqs: Mutex::new(crate::last_seqs::LastSeqs::default()),
            forwards_foreign: AtomicBool::new(false),
            rewinding: Mutex::new(HashSet::new()),
            streams: Default::default(),
            hello_snapshots: Default::default(),
            webhooks,
            anonymous_rpc_bodies,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (ConnShared, crate::outbound::Receiver) {
        let (out, rx) = crate::outbound::queue(100, 1 << 20);
        let c = ConnShared {
            id: 1,
            peer: None,
            authed: AtomicBool::new(true),
            grant: RwLock::new(None),
            view: RwLock::new(View::default()),
            out,
            streams: AtomicUsize::new(0),
        };
        (c, rx)
    }

    fn event(run: &str) -> Outbound {
        Outbound::Event {
            event: "run.started",
            payload_json: format!(r#"{{"runId":"{run}"}}"#).into(),
            state_version: 0,
        }
    }

    fn kinds(rx: &mut crate::outbound::Receiver) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|o| match o {
                Outbound::Response(s) => s,
                Outbound::Event { payload_json, .. } => payload_json.to_string(),
                Outbound::Close(..) => "close".into(),
            })
            .collect()
    }

    #[test]
    fn events_of_a_run_wait_for_the_response_that_started_it() {
        let (c, mut rx) = conn();
        c.subscribe("a");
        c.subscribe("b");
        c.hold_until_answered("a");
        assert!(!c.deliver(Some("a"), Some(0), || event("a")));
        assert!(
            c.deliver(Some("b"), Some(0), || event("b")),
            "other runs pass"
        );
        assert_eq!(
            c.out.queued().0,
            2,
            "a held event still counts against the bound"
        );
        let _ = c.out.push(Outbound::Response("res-a".into()));
        c.answered(&["a".to_string()]);
        assert!(c.deliver(Some("a"), Some(1), || event("a")));
        assert_eq!(
            kinds(&mut rx),
            [
                r#"{"runId":"b"}"#,
                "res-a",
                r#"{"runId":"a"}"#,
                r#"{"runId":"a"}"#
            ]
        );
        // answering a run that has no hold changes nothing
        c.answered(&["b".to_string()]);
        assert!(c.deliver(Some("b"), Some(2), || event("b")));
        assert_eq!(kinds(&mut rx).len(), 1);
    }
}
