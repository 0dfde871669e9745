//! `smithers run`, and `rerun` / `resume` with `--url`: start or continue a run on a gateway and
//! follow it live over the gateway's WebSocket, printing the lines `smithers up` prints and
//! ending with its exit codes.
//!
//! The connection subscribes to the run before the run is started (the run id is chosen here),
//! so no early event is missed. If the socket drops, the follower reconnects for up to a minute
//! and asks for the events it missed (`afterSeq`), so every line is printed once.

use crate::progress::{self, Printer, Style};
use crate::remote::{Gateway, RemoteError};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use smithers_core::Code;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Ws = WebSocketStream<TcpStream>;

/// Connecting and the protocol handshake each get this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The gateway sends a `tick` every 15 s; this much silence means the connection is dead.
const SILENCE: Duration = Duration::from_secs(45);
/// How long to keep trying to reconnect after the connection dropped.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// Largest frame accepted from the gateway (its replies are bounded well below this).
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// What to ask the gateway for.
pub enum Start {
    /// `runs.create`.
    Create {
        workflow: String,
        input: Value,
        run_id: Option<String>,
    },
    /// `runs.rerun`: a new run with the workflow and input of `run_id`.
    Rerun {
        run_id: String,
        new_run_id: Option<String>,
    },
    /// `runs.resume`.
    Resume { run_id: String, force: bool },
}

impl Start {
    /// The id of the run that will be followed (chosen here for new runs: time-ordered, as the
    /// engine's own, so that runs started together share pages in every table keyed by run id).
    fn target(&self) -> String {
        let fresh = smithers_engine::new_run_id;
        match self {
            Start::Create { run_id, .. } => run_id.clone().unwrap_or_else(fresh),
            Start::Rerun { new_run_id, .. } => new_run_id.clone().unwrap_or_else(fresh),
            Start::Resume { run_id, .. } => run_id.clone(),
        }
    }

    fn request(&self, target: &str) -> (&'static str, Value) {
        match self {
            Start::Create {
                workflow, input, ..
            } => (
                "runs.create",
                json!({"workflow": workflow, "input": input, "runId": target}),
            ),
            Start::Rerun { run_id, .. } => {
                ("runs.rerun", json!({"runId": run_id, "newRunId": target}))
            }
            Start::Resume { run_id, force } => {
                ("runs.resume", json!({"runId": run_id, "force": force}))
            }
        }
    }
}

/// Starts (or resumes) the run and follows it to its end or its next wait for a person or an
/// event. With `detach`, prints the run id and returns at once.
pub async fn run(gw: &Gateway, start: Start, detach: bool) -> Result<u8, RemoteError> {
    let target = start.target();
    if detach {
        let (method, params) = start.request(&target);
        let r = gw.call(method, params).await?;
        let id = r.get("runId").and_then(Value::as_str).unwrap_or(&target);
        crate::runs::emit(&[id])?;
        return Ok(0);
    }
    let mut stop = crate::up::watch_term().map_err(RemoteError::from)?;
    let mut follower = Follower::new(gw, &target);
    let mut conn = Conn::open(gw, &target, None).await?;
    let (method, params) = start.request(&target);
    let reply = conn.request(method, params, &mut follower).await?;
    if reply.get("resumed") == Some(&Value::Bool(false)) {
        eprintln!("run {target} is already running on the gateway; following it");
    }
    follower.printer.line(&format!("run {target}"));
    let mut tick = tokio::time::interval(progress::TICK);
    loop {
        if let Some(code) = follower.done {
            follower.printer.done();
            return follower.finish(code).await;
        }
        tokio::select! {
            frame = conn.next() => match frame {
                Ok(v) => follower.on_frame(&v),
                Err(why) => {
                    follower.printer.line(&format!("  connection to {} lost ({why}); reconnecting", gw.base()));
                    conn = reconnect(gw, &target, &follower).await?;
                }
            },
            _ = tick.tick() => follower.printer.tick(),
            _ = stop.int.recv() => return Ok(follower.detached()),
            _ = stop.term.recv() => return Ok(follower.detached()),
        }
    }
}

/// Reopens the connection after it dropped, asking for the events after the last one seen.
async fn reconnect(
    gw: &Gateway,
    target: &str,
    follower: &Follower<'_>,
) -> Result<Conn, RemoteError> {
    let deadline = Instant::now() + RECONNECT_FOR;
    let mut pause = Duration::from_millis(250);
    loop {
        match Conn::open(gw, target, Some(follower.last_seq)).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() + pause >= deadline => {
                return Err(RemoteError {
                    code: e.code,
                    message: format!(
                        "{} (gave up reconnecting after {}s; the run goes on on the gateway: `smithers inspect {target} --url {}`)",
                        e.message,
                        RECONNECT_FOR.as_secs(),
                        gw.base()
                    ),
                });
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The state of one followed run: what was printed and how it ended.
struct Follower<'a> {
    gw: &'a Gateway,
    run_id: String,
    printer: Printer,
    /// The last `eventSeq` seen, -1 before the first.
    last_seq: i64,
    /// The exit code, once the run ended or waits for someone.
    done: Option<u8>,
    /// `run.completed`'s payload.
    completion: Option<Value>,
    /// Whether a command to paste (approve, signal) was printed for the current wait.
    hinted: bool,
    /// The status the run parked in.
    parked: Option<String>,
}

impl<'a> Follower<'a> {
    fn new(gw: &'a Gateway, run_id: &str) -> Self {
        Follower {
            gw,
            run_id: run_id.to_string(),
            printer: Printer::new(
                Style::detect(),
                progress::quiet(),
                Some(gw.base().to_string()),
            ),
            last_seq: -1,
            done: None,
            completion: None,
            hinted: false,
            parked: None,
        }
    }

    /// Handles one frame from the gateway (events; replies and ticks are ignored here).
    fn on_frame(&mut self, frame: &Value) {
        if frame.get("type").and_then(Value::as_str) != Some("event") || self.done.is_some() {
            return;
        }
        let event = frame.get("event").and_then(Value::as_str).unwrap_or("");
        let p = frame.get("payload").cloned().unwrap_or(Value::Null);
        if p.get("runId").and_then(Value::as_str) != Some(self.run_id.as_str()) {
            return;
        }
        if let Some(seq) = p.get("eventSeq").and_then(Value::as_i64) {
            if seq <= self.last_seq {
                return; // seen before a reconnect
            }
            self.last_seq = seq;
        }
        let kind = match event {
            "task.output" => "NodeOutput",
            "node.started" => "NodeStarted",
            "node.finished" => "NodeFinished",
            "node.failed" => "NodeFailed",
            "node.retrying" => "NodeRetrying",
            "approval.requested" => "ApprovalRequested",
            "approval.auto_approved" => "ApprovalAutoApproved",
            "node.waiting" if p.get("kind").and_then(Value::as_str) == Some("timer") => {
                "NodeWaitingTimer"
            }
            "node.waiting" => "NodeWaitingEvent",
            "run.waiting" => return self.on_waiting(&p),
            "run.completed" => {
                self.done = Some(match p.get("status").and_then(Value::as_str) {
                    Some("finished") => 0,
                    Some("cancelled") => 2,
                    _ => 1,
                });
                self.completion = Some(p);
                return;
            }
            "replay.truncated" => {
                self.printer.line(&format!(
                    "  events missed while disconnected were not all replayed ({}); `smithers inspect {} --url {}` shows the run",
                    p.get("reason").and_then(Value::as_str).unwrap_or("?"),
                    self.run_id,
                    self.gw.base()
                ));
                return;
            }
            _ => return,
        };
        // task.output names its text `output`; the printer reads the engine's `text`
        let p = match (kind, p) {
            ("NodeOutput", mut p) => {
                p["text"] = p.get("output").cloned().unwrap_or(Value::Null);
                p
            }
            (_, p) => p,
        };
        self.hinted |= matches!(kind, "ApprovalRequested" | "NodeWaitingEvent");
        self.printer.on(kind, &self.run_id, &p);
    }

    /// The run parked: waiting for a person or an event ends the command (exit 3) as with
    /// `up`; a timer does not, because the gateway wakes the run itself.
    fn on_waiting(&mut self, p: &Value) {
        let st = p.get("status").and_then(Value::as_str).unwrap_or("");
        if st == "waiting-timer" {
            let line = format!(
                "  run {} sleeps until its timer fires; the gateway wakes it (still following)",
                self.run_id
            );
            self.printer.line(&line);
            return;
        }
        self.parked = Some(st.to_string());
        self.done = Some(3);
    }

    /// Ctrl-C or SIGTERM: stop following; the run is the gateway's and goes on.
    fn detached(&mut self) -> u8 {
        self.printer.done();
        eprintln!(
            "stopped following run {id}; it goes on on the gateway (`smithers cancel {id} --url {url}` stops it)",
            id = self.run_id,
            url = self.gw.base()
        );
        130
    }

    /// The run parked at a wait whose request was made before this command followed it (a
    /// resumed run): print the commands that resolve its pending approvals.
    async fn print_waits(&self) -> Result<(), RemoteError> {
        let pending = self.gw.call("approvals.list", json!({})).await?;
        for a in pending.as_array().into_iter().flatten() {
            if a.get("runId").and_then(Value::as_str) != Some(self.run_id.as_str()) {
                continue;
            }
            let keys: Vec<Value> = a
                .get("options")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|o| o.get("key").cloned())
                .collect();
            let p = json!({
                "nodeId": a.get("nodeId"),
                "iteration": a.get("iteration"),
                "title": a.get("requestTitle"),
                "mode": a.get("approvalMode"),
                "options": keys,
            });
            if let Some(line) = progress::describe(
                self.printer.style,
                "ApprovalRequested",
                &self.run_id,
                &p,
                Some(self.gw.base()),
            ) {
                eprintln!("{line}");
            }
        }
        Ok(())
    }

    /// Prints the end of the run as `up` does: the output of a finished run on stdout.
    async fn finish(&self, code: u8) -> Result<u8, RemoteError> {
        let id = &self.run_id;
        let p = self.completion.clone().unwrap_or(Value::Null);
        match code {
            0 => {
                eprintln!("run {id} finished");
                let run = self.gw.call("runs.get", json!({"runId": id})).await?;
                let out = run.get("output").cloned().unwrap_or(Value::Null);
                crate::runs::emit(&[serde_json::to_string_pretty(&out).unwrap_or_default()])?;
            }
            2 => eprintln!("run {id} cancelled"),
            3 => {
                let st = self.parked.as_deref().unwrap_or("waiting");
                if !self.hinted {
                    self.print_waits().await?;
                }
                eprintln!(
                    "run {id} is {st}; the gateway continues it once that is resolved (`smithers inspect {id} --url {}` shows it)",
                    self.gw.base()
                );
            }
            1 => {
                let e = p.get("error");
                let code = e
                    .and_then(|e| e.get("code"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let msg = e
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                eprintln!("run {id} failed: [{code}] {msg}");
            }
            _ => {}
        }
        Ok(code)
    }
}

/// One authenticated WebSocket connection subscribed to one run.
pub(crate) struct Conn {
    ws: Ws,
    next_id: u64,
}

impl Conn {
    /// Connects, completes the protocol handshake and subscribes to `run_id`; with `after`,
    /// asks for the run's events after that `eventSeq`.
    pub(crate) async fn open(
        gw: &Gateway,
        run_id: &str,
        after: Option<i64>,
    ) -> Result<Conn, RemoteError> {
        let (host, port) = gw.addr();
        let tcp =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect((host, port))).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err(
                        gw.unreachable("connection refused; is `smithers serve` running there?")
                    );
                }
                Ok(Err(e)) => return Err(gw.unreachable(e)),
                Err(_) => return Err(gw.unreachable("no connection within 10s")),
            };
        let _ = tcp.set_nodelay(true);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME))
            .max_frame_size(Some(MAX_FRAME));
        let upgrade = tokio_tungstenite::client_async_with_config(gw.ws_url(), tcp, Some(config));
        let ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade).await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                return Err(gw.unreachable(format!("the WebSocket upgrade failed: {e}")));
            }
            Err(_) => return Err(gw.unreachable("the WebSocket upgrade took over 10s")),
        };
        let mut conn = Conn { ws, next_id: 0 };
        let challenge = conn.next().await.map_err(|e| gw.unreachable(e))?;
        if challenge.get("event").and_then(Value::as_str) != Some("connect.challenge") {
            return Err(
                gw.unreachable("it did not open with connect.challenge; is it a smithers gateway?")
            );
        }
        let mut params = json!({
            "minProtocol": 1,
            "maxProtocol": 1,
            "client": {"id": "smithers-cli", "version": env!("CARGO_PKG_VERSION"), "platform": std::env::consts::OS},
            "subscribe": [run_id],
        });
        if let Some(t) = gw.token() {
            params["auth"] = json!({"token": t});
        }
        if let Some(seq) = after {
            params["afterSeq"] = json!({ run_id: seq });
        }
        let mut ignore = |_: &Value| {};
        conn.call_with("connect", params, &mut ignore).await?;
        Ok(conn)
    }

    /// The next frame as JSON; an error when the connection ended or went silent.
    pub(crate) async fn next(&mut self) -> Result<Value, String> {
        loop {
            let msg = match tokio::time::timeout(SILENCE, self.ws.next()).await {
                Err(_) => return Err(format!("no frame for {}s", SILENCE.as_secs())),
                Ok(None) => return Err("the gateway closed the connection".into()),
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(&t)
                        .map_err(|e| format!("the gateway sent a frame that is not JSON ({e})"));
                }
                Message::Close(c) => {
                    return Err(match c {
                        Some(c) => format!("closed by the gateway: {} {}", c.code, c.reason),
                        None => "closed by the gateway".into(),
                    });
                }
                _ => continue,
            }
        }
    }

    /// Sends a request and waits for its reply, handing every other frame to `follower`.
    async fn request(
        &mut self,
        method: &str,
        params: Value,
        follower: &mut Follower<'_>,
    ) -> Result<Value, RemoteError> {
        let mut on_event = |v: &Value| follower.on_frame(v);
        self.call_with(method, params, &mut on_event).await
    }

    async fn call_with(
        &mut self,
        method: &str,
        params: Value,
        on_other: &mut dyn FnMut(&Value),
    ) -> Result<Value, RemoteError> {
        self.next_id += 1;
        let id = format!("cli-{}", self.next_id);
        let frame = json!({"type": "req", "id": id, "method": method, "params": params});
        let lost = |e: String| {
            RemoteError::new(
                Code::GatewayUnreachable,
                format!("the connection to the gateway failed during {method}: {e}"),
            )
        };
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .map_err(|e| lost(e.to_string()))?;
        loop {
            let v = self.next().await.map_err(lost)?;
            if v.get("type").and_then(Value::as_str) == Some("res")
                && v.get("id").and_then(Value::as_str) == Some(id.as_str())
            {
                if v.get("ok") == Some(&Value::Bool(true)) {
                    return Ok(v.get("payload").cloned().unwrap_or(Value::Null));
                }
                let err = v.get("error");
                let s = |k: &str| {
                    err.and_then(|e| e.get(k))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                return Err(RemoteError::from_gateway(
                    &s("code").unwrap_or_else(|| "SERVER_ERROR".into()),
                    s("message").unwrap_or_else(|| "the gateway gave no message".into()),
                ));
            }
            on_other(&v);
        }
    }
}
