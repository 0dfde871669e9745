//! The run loop: render → plan → execute → re-render (engine-model §2.4–§2.6).
//!
//! One driver task owns one run. It is the only writer of the run's rows while it holds the
//! lease: every change is collected into a batch and committed (with the events describing it)
//! before anything acts on it. Tasks that take time (shell commands, subflows) run on their own
//! tokio tasks and report back over a channel; the driver re-renders after every completion
//! instead of waiting for a whole batch, so a parallel branch never waits for its slowest
//! sibling.

use crate::agents;
use crate::events::{self, PendingEvent, kind};
use crate::frames::{FrameWriter, snapshot::SnapshotState};
use crate::leftovers;
use crate::outputs::OutputStore;
use crate::plan::{Plan, SchedView, TState, TaskKey, key_string};
use crate::process::{self, ProcSpec};
use crate::{RunOutcome, Shared, clock::now_ms, vcs};
use serde_json::{Value, json};
use smithers_core::tree::{
    ApprovalMode, ApprovalSpec, OnDeny, OnMaxReached, OnTimeout, TimerSpec, WaitSpec,
};
use smithers_core::{Code, RenderCtx, SmithersError, TaskKind, Workflow};
use smithers_store::{
    ApprovalRow, AttemptRow, Batch, LoopRow, NodeRow, OutputRow, RunPatch, Write, node_state,
    status,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Task heartbeats are persisted at most this often.
const HEARTBEAT_EVERY_MS: i64 = 500;

/// A run of steps that only change state commits once its batch holds this many writes, so a
/// long chain of value tasks never builds one unbounded transaction.
const DEFERRED_WRITES_CAP: usize = 512;

/// Subflows may nest this deep (guards against a workflow that calls itself).
pub const MAX_SUBFLOW_DEPTH: u32 = 16;

/// Runtime state of one task instance.
#[derive(Debug, Clone)]
struct TaskRt {
    key: TaskKey,
    state: TState,
    /// Highest attempt number used so far.
    attempts: i64,
    /// Failures since the last success or reset (drives retries and backoff).
    failures: u32,
    retry_at_ms: Option<i64>,
    error: Option<SmithersError>,
    /// Timers: when the timer fires.
    fires_at_ms: Option<i64>,
    /// Wait-for-event: when the wait began, and when it times out.
    wait_started_ms: Option<i64>,
    wait_deadline_ms: Option<i64>,
    /// Gate approval granted in this session.
    approved: bool,
    started_ms: i64,
    /// When the running attempt last recorded a heartbeat.
    heartbeat_ms: i64,
    /// The running attempt's metadata (kept so heartbeats rewrite it unchanged).
    attempt_meta: Option<String>,
    /// The running attempt's last heartbeat data (an agent's session checkpoint).
    heartbeat_data: Option<String>,
    /// The running attempt's final agent reply.
    response_text: Option<String>,
    /// The running attempt's work-tree snapshots (tasks that ran in a git work tree).
    vcs: Option<vcs::Captured>,
    output_table: String,
    label: Option<String>,
    /// The node this instance was last rendered from.
    node: Option<smithers_core::NodeRef>,
}

impl TaskRt {
    fn new(key: TaskKey) -> Self {
        TaskRt {
            key,
            state: TState::Pending,
            attempts: 0,
            failures: 0,
            retry_at_ms: None,
            error: None,
            fires_at_ms: None,
            wait_started_ms: None,
            wait_deadline_ms: None,
            approved: false,
            started_ms: 0,
            heartbeat_ms: 0,
            attempt_meta: None,
            heartbeat_data: None,
            response_text: None,
            vcs: None,
            output_table: String::new(),
            label: None,
            node: None,
        }
    }
}

/// Messages from in-flight tasks.
pub(crate) enum Msg {
    /// Something outside changed (a decision, a signal): re-derive waiting nodes.
    Wake,
    Output {
        rt: usize,
        attempt: i64,
        stream: &'static str,
        text: String,
    },
    Done {
        rt: usize,
        attempt: i64,
        result: TaskResult,
    },
    /// A running attempt is alive; `data` (an agent's session checkpoint) is stored at once.
    Heartbeat {
        rt: usize,
        attempt: i64,
        data: Option<Value>,
    },
    /// What an agent attempt leaves on its row; sent just before its `Done`.
    AttemptDetails {
        rt: usize,
        attempt: i64,
        /// Merged into the attempt's metadata.
        meta: serde_json::Map<String, Value>,
        response_text: Option<String>,
        /// `TokenUsageReported` fields, when the agent reported usage.
        usage: Option<Value>,
    },
    /// A process of the attempt started (its group id, recorded so the attempt's metadata
    /// names the group; the marker recorded before the start is what finds its processes).
    ProcessStarted { rt: usize, attempt: i64, pgid: i32 },
    /// The work tree before and after an attempt; sent just before its `Done`.
    Vcs {
        rt: usize,
        attempt: i64,
        captured: vcs::Captured,
    },
}

pub(crate) enum TaskResult {
    Ok(Value),
    Err(SmithersError),
    /// A subflow's child run parked; the parent waits the same way.
    Parked(&'static str),
}

/// Everything a driver needs to start.
pub(crate) struct DriverInit {
    pub shared: Arc<Shared>,
    pub workflow: Arc<dyn Workflow>,
    pub run_id: String,
    pub workflow_name: String,
    pub workflow_hash: Option<String>,
    pub input: Value,
    pub cancel: watch::Receiver<bool>,
    /// The driver's message channel (the sender is also kept by the engine, to wake it).
    pub messages: (mpsc::UnboundedSender<Msg>, mpsc::UnboundedReceiver<Msg>),
    pub depth: u32,
}

pub(crate) struct Driver {
    sh: Arc<Shared>,
    wf: Arc<dyn Workflow>,
    run_id: Arc<str>,
    workflow_name: String,
    workflow_hash: Option<String>,
    input: Arc<Value>,
    outputs: Arc<OutputStore>,
    loops: HashMap<String, (u32, bool)>,
    loops_arc: Arc<HashMap<String, u32>>,
    /// A loop advanced since the plan was built.
    loops_changed: bool,
    /// Signals already taken by a wait of this run (read from its attempts on first use), so
    /// that a signal wakes one wait only.
    consumed_signals: Option<std::collections::HashSet<i64>>,
    rts: Vec<TaskRt>,
    rt_index: HashMap<TaskKey, usize>,
    plan: Option<Plan>,
    frames: FrameWriter,
    frame_no: i64,
    snap: SnapshotState,
    batch: Batch,
    events: Vec<PendingEvent>,
    dirty: bool,
    in_flight: usize,
    /// Agents that failed with a login or configuration error in this run: later tasks using
    /// them fail at once instead of calling the agent again (cleared by a resume).
    broken_agents: HashMap<String, SmithersError>,
    fatal: Option<SmithersError>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    /// The run's cancel request (from a user, or from the heartbeat when the lease was lost).
    cancel: watch::Receiver<bool>,
    /// Stops this driver's tasks (on cancel, on failure, and when the driver stops on a
    /// storage error without the run being cancelled).
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    depth: u32,
    cwd: PathBuf,
}

/// How a driver stopped.
pub(crate) enum Drive {
    /// The run ended, parked, or was lost to another engine.
    Ended(RunOutcome),
    /// The store failed with a retryable error; nothing was recorded about the stop. The run
    /// is still owned here and is driven again once storage works.
    Stalled(SmithersError),
}

/// Errors of the store that a later attempt may not see (disk full, a lock held by another
/// process, a lost connection): the run is driven again instead of failing.
pub(crate) fn is_storage_fault(e: &SmithersError) -> bool {
    e.retryable
        && matches!(
            e.code,
            Code::DbQueryFailed | Code::DbWriteFailed | Code::StorageError
        )
}

/// Outcome of trying to start a task.
enum Started {
    /// Finished, failed, skipped or parked inline: re-render.
    Changed,
    /// Running in the background.
    Spawned,
    /// Nothing changed (e.g. still waiting).
    Unchanged,
}

impl SchedView for Driver {
    fn state(&self, rt: usize) -> TState {
        self.rts.get(rt).map(|r| r.state).unwrap_or(TState::Pending)
    }
    fn ready(&self, rt: usize) -> bool {
        match self.rts.get(rt).and_then(|r| r.retry_at_ms) {
            Some(at) => now_ms() >= at,
            None => true,
        }
    }
}

/// Where a run's tasks start: the workflow file's directory, else the engine's default, else
/// the process's working directory.
pub(crate) fn run_cwd(workflow: &dyn Workflow, config: &crate::EngineConfig) -> PathBuf {
    workflow
        .path()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .or_else(|| config.default_cwd.clone())
        .unwrap_or_else(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")))
}

impl Driver {
    pub(crate) fn new(init: DriverInit) -> Self {
        let (tx, rx) = init.messages;
        let cwd = run_cwd(&*init.workflow, &init.shared.config);
        let frames = FrameWriter::new(&init.workflow_name);
        let (stop_tx, stop_rx) = watch::channel(false);
        Driver {
            stop_tx,
            stop_rx,
            snap: SnapshotState::new(init.input.clone()),
            sh: init.shared,
            wf: init.workflow,
            run_id: Arc::from(init.run_id.as_str()),
            workflow_name: init.workflow_name,
            workflow_hash: init.workflow_hash,
            input: Arc::new(init.input),
            outputs: Arc::new(OutputStore::default()),
            loops: HashMap::new(),
            loops_arc: Arc::new(HashMap::new()),
            loops_changed: false,
            consumed_signals: None,
            rts: Vec::new(),
            rt_index: HashMap::new(),
            plan: None,
            frames,
            frame_no: 0,
            batch: Batch::new(),
            events: Vec::new(),
            dirty: true,
            in_flight: 0,
            broken_agents: HashMap::new(),
            fatal: None,
            tx,
            rx,
            cancel: init.cancel,
            depth: init.depth,
            cwd,
        }
    }

    // ----- persistence helpers -------------------------------------------------------------

    fn guarded_batch(&self) -> Batch {
        Batch::guarded(&self.run_id, &self.sh.owner)
    }

    fn event(&mut self, event_type: &'static str, fields: Value) {
        let ev = events::make(&self.run_id, event_type, now_ms(), fields);
        self.batch.push(Write::AppendEvent {
            run_id: self.run_id.to_string(),
            timestamp_ms: ev.timestamp_ms,
            event_type: event_type.to_string(),
            payload_json: smithers_core::json::text(&ev.payload),
        });
        self.events.push(ev);
    }

    /// Commits the pending batch, then publishes its events.
    async fn flush(&mut self) -> Result<(), SmithersError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let fresh = self.guarded_batch();
        let mut batch = std::mem::replace(&mut self.batch, fresh);
        collapse_upserts(&mut batch.writes);
        let evs = std::mem::replace(&mut self.events, Vec::with_capacity(8));
        let applied = self.sh.store.apply(batch).await?;
        for (ev, seq) in evs.into_iter().zip(applied.event_seqs) {
            self.sh.publish(&self.run_id, seq, ev);
        }
        Ok(())
    }

    fn set_node(&mut self, rt: usize, state: TState) {
        let now = now_ms();
        let r = &mut self.rts[rt];
        r.state = state;
        let row = NodeRow {
            run_id: self.run_id.to_string(),
            node_id: r.key.0.clone(),
            iteration: r.key.1 as i64,
            state: state.as_str().to_string(),
            last_attempt: if r.attempts > 0 {
                Some(r.attempts)
            } else {
                None
            },
            updated_at_ms: now,
            output_table: r.output_table.clone(),
            label: r.label.clone(),
        };
        self.snap.set_node(
            key_string(&r.key),
            json!({"nodeId": row.node_id, "iteration": row.iteration, "state": row.state,
                   "lastAttempt": row.last_attempt, "outputTable": row.output_table, "label": row.label}),
        );
        self.batch.push(Write::UpsertNode(row));
    }

    fn node_fields(&self, rt: usize) -> Value {
        let r = &self.rts[rt];
        json!({"nodeId": r.key.0, "iteration": r.key.1})
    }

    fn with(mut base: Value, extra: Value) -> Value {
        if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
            b.extend(e);
        }
        base
    }

    fn attempt_row(
        &self,
        rt: usize,
        attempt: i64,
        state: &str,
        started: i64,
        finished: Option<i64>,
    ) -> AttemptRow {
        let r = &self.rts[rt];
        AttemptRow {
            run_id: self.run_id.to_string(),
            node_id: r.key.0.clone(),
            iteration: r.key.1 as i64,
            attempt,
            state: state.to_string(),
            started_at_ms: started,
            finished_at_ms: finished,
            heartbeat_at_ms: Some(r.heartbeat_ms).filter(|h| *h > 0),
            heartbeat_data_json: r.heartbeat_data.clone(),
            error_json: None,
            jj_pointer: r.vcs.as_ref().and_then(|v| v.after.clone()),
            response_text: r.response_text.clone(),
            jj_cwd: Some(match &r.vcs {
                Some(v) => v.root.clone(),
                None => self.cwd.display().to_string(),
            }),
            cached: false,
            meta_json: None,
        }
    }

    /// Records a successful output: output row, attempt finished, node finished.
    fn record_output(
        &mut self,
        rt: usize,
        attempt: i64,
        started: i64,
        value: Value,
        meta: Option<Value>,
    ) {
        let now = now_ms();
        let (node_id, iteration) = (self.rts[rt].key.0.clone(), self.rts[rt].key.1);
        let mut a = self.attempt_row(rt, attempt, node_state::FINISHED, started, Some(now));
        a.meta_json = meta
            .map(|m| m.to_string())
            .or_else(|| self.rts[rt].attempt_meta.clone());
        self.batch.push(Write::UpsertAttempt(a));
        self.batch.push(Write::UpsertOutput(OutputRow {
            run_id: self.run_id.to_string(),
            node_id: node_id.clone(),
            iteration: iteration as i64,
            output_table: self.rts[rt].output_table.clone(),
            payload_json: smithers_core::json::text(&value),
            created_at_ms: now,
        }));
        self.snap
            .set_output(key_string(&self.rts[rt].key), value.clone());
        self.outputs.insert(&node_id, iteration, value);
        self.rts[rt].failures = 0;
        self.rts[rt].retry_at_ms = None;
        self.rts[rt].error = None;
        self.set_node(rt, TState::Finished);
        let f = Self::with(
            self.node_fields(rt),
            json!({"attempt": attempt, "durationMs": now - started}),
        );
        self.event(kind::NODE_FINISHED, f);
        self.dirty = true;
    }

    /// Records a failed attempt and decides between retry and terminal failure.
    fn record_failure(&mut self, rt: usize, attempt: i64, started: i64, err: SmithersError) {
        let now = now_ms();
        let mut a = self.attempt_row(rt, attempt, node_state::FAILED, started, Some(now));
        a.error_json = Some(smithers_core::json::text(&err.to_json()));
        a.meta_json = self.rts[rt].attempt_meta.clone();
        self.batch.push(Write::UpsertAttempt(a));
        let (retries, backoff, continue_on_fail) = match self.task_of(rt) {
            Some(t) => (t.retries, t.backoff_ms, t.continue_on_fail),
            None => (0, 0, false),
        };
        let r = &mut self.rts[rt];
        r.failures += 1;
        let failures = r.failures;
        r.error = Some(err.clone());
        self.set_node(rt, TState::Failed);
        let f = Self::with(
            self.node_fields(rt),
            json!({"attempt": attempt, "error": err.to_json(), "durationMs": now - started}),
        );
        self.event(kind::NODE_FAILED, f);
        if err.retryable && failures <= retries {
            let delay = backoff.saturating_mul(1u64 << (failures - 1).min(30));
            let r = &mut self.rts[rt];
            r.state = TState::Pending;
            r.retry_at_ms = Some(now + delay as i64);
            let f = Self::with(
                self.node_fields(rt),
                json!({"attempt": attempt + 1, "delayMs": delay}),
            );
            self.event(kind::NODE_RETRYING, f);
        } else if !continue_on_fail && self.fatal.is_none() {
            let e = err.clone();
            let node = self.rts[rt].key.0.clone();
            self.fatal = Some(if e.node.is_some() {
                e
            } else {
                e.with_node(node)
            });
        }
        self.dirty = true;
    }

    fn task_of(&self, rt: usize) -> Option<&smithers_core::Task> {
        match self.rts.get(rt)?.node.as_deref()? {
            smithers_core::Node::Task(t) => Some(t),
            _ => None,
        }
    }

    // ----- loading ---------------------------------------------------------------------------

    /// Loads durable state for a resumed run and tidies attempts a crash left behind.
    async fn load(&mut self) -> Result<(), SmithersError> {
        let store = self.sh.store.clone();
        let run_id = self.run_id.to_string();
        for o in store.list_outputs(&run_id).await? {
            let v: Value = serde_json::from_str(&o.payload_json).map_err(|e| {
                SmithersError::new(
                    Code::DbCorrupt,
                    format!("output of `{}` (iteration {}) in run `{run_id}` is not valid JSON ({e}); restore from backup", o.node_id, o.iteration),
                )
            })?;
            let it = u32::try_from(o.iteration).unwrap_or(0);
            self.snap
                .set_output(format!("{}::{}", o.node_id, it), v.clone());
            self.outputs.insert(&o.node_id, it, v);
        }
        for l in store.list_loops(&run_id).await? {
            let it = u32::try_from(l.iteration).unwrap_or(0);
            self.snap.set_loop(l.ralph_id.clone(), l.iteration, l.done);
            self.loops.insert(l.ralph_id, (it, l.done));
        }
        self.refresh_loops_arc();
        let mut attempts: HashMap<TaskKey, Vec<AttemptRow>> = HashMap::new();
        let all = store.list_attempts(&run_id).await?;
        // processes of attempts that did not finish may still run on this host: they must be
        // gone before anything runs again
        leftovers::kill_for_attempts(&run_id, &all).await;
        for a in all {
            let k = (a.node_id.clone(), u32::try_from(a.iteration).unwrap_or(0));
            attempts.entry(k).or_default().push(a);
        }
        let now = now_ms();
        for n in store.list_nodes(&run_id).await? {
            let key = (n.node_id.clone(), u32::try_from(n.iteration).unwrap_or(0));
            let idx = self.rts.len();
            let mut r = TaskRt::new(key.clone());
            r.output_table = n.output_table.clone();
            r.label = n.label.clone();
            let its = attempts.remove(&key).unwrap_or_default();
            r.attempts = its.iter().map(|a| a.attempt).max().unwrap_or(0);
            let state = TState::parse(&n.state).ok_or_else(|| {
                SmithersError::new(
                    Code::DbCorrupt,
                    format!(
                        "node `{}` of run `{run_id}` has unknown state `{}`; restore from backup",
                        n.node_id, n.state
                    ),
                )
            })?;
            let has_output = self.outputs.get_exact(&key.0, key.1);
            r.state = match state {
                TState::Finished if has_output => TState::Finished,
                TState::Skipped => TState::Skipped,
                // everything else is re-derived: deferred nodes from their rows, crashed or
                // failed attempts run again
                _ => TState::Pending,
            };
            for a in &its {
                if let Some(meta) = a
                    .meta_json
                    .as_deref()
                    .and_then(|m| serde_json::from_str::<Value>(m).ok())
                {
                    if let Some(f) = meta.pointer("/timer/firesAtMs").and_then(Value::as_i64) {
                        r.fires_at_ms = Some(f);
                    }
                    if let Some(s) = meta
                        .pointer("/waitForEvent/startedAtMs")
                        .and_then(Value::as_i64)
                    {
                        r.wait_started_ms = Some(s);
                        r.wait_deadline_ms = meta
                            .pointer("/waitForEvent/timeoutMs")
                            .and_then(Value::as_i64)
                            .map(|t| s + t);
                    }
                }
                if a.state == node_state::IN_PROGRESS {
                    // the attempt died with its engine: close it as cancelled
                    let mut c = a.clone();
                    c.state = node_state::CANCELLED.to_string();
                    c.finished_at_ms = Some(now);
                    c.error_json = Some(
                        SmithersError::new(
                            Code::TaskAborted,
                            "the engine running this attempt stopped; the task runs again",
                        )
                        .to_json()
                        .to_string(),
                    );
                    self.batch.push(Write::UpsertAttempt(c));
                }
            }
            self.rts.push(r);
            self.rt_index.insert(key, idx);
            let st = self.rts[idx].state;
            // waiting nodes keep their stored state: they are re-derived from their approval,
            // signal or timer rows when reached, and stay visibly waiting until then
            let waiting = matches!(
                state,
                TState::WaitingApproval | TState::WaitingEvent | TState::WaitingTimer
            );
            if st.as_str() != n.state && !waiting {
                self.set_node(idx, st);
            } else {
                self.snap.set_node(
                    format!("{}::{}", n.node_id, n.iteration),
                    json!({"nodeId": n.node_id, "iteration": n.iteration, "state": n.state,
                           "lastAttempt": n.last_attempt, "outputTable": n.output_table, "label": n.label}),
                );
            }
        }
        self.frame_no = store.last_frame_no(&run_id).await?;
        Ok(())
    }

    fn refresh_loops_arc(&mut self) {
        self.loops_changed = true;
        self.loops_arc = Arc::new(
            self.loops
                .iter()
                .map(|(k, (i, _))| (k.clone(), *i))
                .collect(),
        );
    }

    // ----- render ----------------------------------------------------------------------------

    /// Renders, rebuilds the plan when the tree changed, mounts new tasks, writes the frame.
    fn render(&mut self) -> Result<(), SmithersError> {
        let ctx = RenderCtx {
            run_id: self.run_id.clone(),
            input: self.input.clone(),
            outputs: self.outputs.clone(),
            loops: self.loops_arc.clone(),
        };
        let tree = self.wf.render(&ctx)?;
        let same = self
            .plan
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.root, &tree));
        if !same {
            let loops = &self.loops;
            let mut plan = Plan::build(tree.clone(), &|id| {
                loops.get(id).copied().unwrap_or((0, false))
            });
            if let Some(d) = plan.duplicates.first() {
                return Err(SmithersError::new(
                    Code::DuplicateId,
                    format!("node id `{d}` is used more than once in the rendered workflow; ids must be unique"),
                )
                .with_node(d.clone()));
            }
            let now = now_ms();
            for i in 0..plan.tasks.len() {
                let key = plan.tasks[i].key.clone();
                let rt = match self.rt_index.get(&key) {
                    Some(&rt) => rt,
                    None => {
                        let rt = self.rts.len();
                        let mut r = TaskRt::new(key.clone());
                        let t = plan.tasks[i].task();
                        r.output_table = t.output_table().to_string();
                        r.label = t.label.clone();
                        self.rts.push(r);
                        self.rt_index.insert(key, rt);
                        self.set_node(rt, TState::Pending);
                        let f = self.node_fields(rt);
                        self.event(kind::NODE_PENDING, f);
                        rt
                    }
                };
                plan.tasks[i].rt = rt;
                self.rts[rt].node = Some(plan.tasks[i].node.clone());
            }
            for l in &plan.loops {
                if !self.loops.contains_key(&l.id) {
                    self.loops.insert(l.id.clone(), (l.iteration, false));
                    self.snap.set_loop(l.id.clone(), l.iteration as i64, false);
                    self.batch.push(Write::UpsertLoop(LoopRow {
                        run_id: self.run_id.to_string(),
                        ralph_id: l.id.clone(),
                        iteration: l.iteration as i64,
                        done: false,
                        updated_at_ms: now,
                    }));
                }
            }
            self.plan = Some(plan);
        }
        self.commit_frame(&tree, !same);
        self.dirty = false;
        Ok(())
    }

    fn commit_frame(&mut self, tree: &smithers_core::NodeRef, plan_rebuilt: bool) {
        self.frame_no += 1;
        let now = now_ms();
        let enc = self.frames.encode(self.frame_no, tree);
        let (mounted, index) = match &self.plan {
            Some(p) if plan_rebuilt || self.frame_no % crate::frames::KEYFRAME_INTERVAL == 0 => {
                let m: Vec<String> = p.tasks.iter().map(|t| key_string(&t.key)).collect();
                let ix: Vec<Value> = p
                    .tasks
                    .iter()
                    .enumerate()
                    .map(|(o, t)| json!({"nodeId": t.key.0, "ordinal": o, "iteration": t.key.1}))
                    .collect();
                (
                    Some(serde_json::to_string(&m).unwrap_or_default()),
                    Some(smithers_core::json::text(&Value::Array(ix))),
                )
            }
            _ => (None, None),
        };
        let hash = enc.xml_hash.clone();
        self.batch
            .push(Write::InsertFrame(smithers_store::FrameRow {
                run_id: self.run_id.to_string(),
                frame_no: self.frame_no,
                created_at_ms: now,
                xml_json: enc.xml_json,
                xml_hash: enc.xml_hash,
                encoding: enc.encoding.to_string(),
                mounted_task_ids_json: mounted,
                task_index_json: index,
                note: Some("smithers-rs".into()),
            }));
        let snap = self
            .snap
            .encode(&self.run_id, self.frame_no, self.workflow_hash.clone(), now);
        let content_hash = snap.content_hash.clone();
        self.batch.push(Write::InsertSnapshot(snap));
        let frame_no = self.frame_no;
        self.event(
            kind::FRAME_COMMITTED,
            json!({"frameNo": frame_no, "xmlHash": hash}),
        );
        self.event(
            kind::SNAPSHOT_CAPTURED,
            json!({"frameNo": frame_no, "contentHash": content_hash}),
        );
    }

    // ----- the loop --------------------------------------------------------------------------

    pub(crate) async fn run(mut self, resume: bool) -> Drive {
        self.batch = self.guarded_batch();
        if resume && let Err(e) = self.load().await {
            return self.stop_on(e).await;
        }
        loop {
            match self.step().await {
                Ok(Some(outcome)) => return Drive::Ended(outcome),
                Ok(None) => {}
                Err(e) => return self.stop_on(e).await,
            }
        }
    }

    /// Stops the driver after an error: a lost lease ends it, a storage fault stalls it (the
    /// run is driven again), anything else fails the run.
    async fn stop_on(self, e: SmithersError) -> Drive {
        if e.code == Code::RunLeaseLost {
            self.fenced(&e);
            return Drive::Ended(RunOutcome::lease_lost(&self.run_id, e));
        }
        if is_storage_fault(&e) {
            return self.stall(e).await;
        }
        self.fail(e).await
    }

    fn fenced(&self, e: &SmithersError) {
        tracing::warn!(
            run_id = %self.run_id,
            workflow = %self.workflow_name,
            owner = %self.sh.owner,
            error = %e.message,
            "write fenced: this node no longer holds the run's lease, so it stops driving the run and writes nothing more for it"
        );
    }

    /// Stops the tasks in flight (their processes are killed) without recording anything: the
    /// store is failing, and the run is driven again from its committed state.
    async fn stall(mut self, e: SmithersError) -> Drive {
        if self.in_flight > 0 {
            let _ = self.stop_tx.send(true);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while self.in_flight > 0 {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(Msg::Done { .. })) => self.in_flight -= 1,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        Drive::Stalled(e)
    }

    /// One turn of the loop. Returns the outcome when the run stops.
    async fn step(&mut self) -> Result<Option<RunOutcome>, SmithersError> {
        if *self.cancel.borrow() {
            return self.cancelled().await.map(Some);
        }
        if self.dirty && self.fatal.is_none() {
            self.render()?;
        }
        let Some(plan) = &self.plan else {
            return Err(SmithersError::new(
                Code::SchedulerError,
                "nothing was rendered",
            ));
        };
        let sched = if self.fatal.is_none() {
            plan.schedule(&*self)
        } else {
            Default::default()
        };
        let runnable: Vec<usize> = sched.runnable.iter().map(|&ti| plan.tasks[ti].rt).collect();
        let mut changed = false;
        for rt in runnable {
            match self.start_task(rt).await? {
                Started::Changed => changed = true,
                Started::Spawned | Started::Unchanged => {}
            }
        }
        // What changed without acting outside the engine (values, skips, recorded failures,
        // approval requests) is committed with the next step's writes: anything that acts
        // (a process, an agent, a subflow) commits the batch before it starts, and so does every
        // wait. A one-task run is then two commits (start, end), not four.
        if changed {
            if self.batch.writes.len() >= DEFERRED_WRITES_CAP {
                self.flush().await?;
            }
            return Ok(None);
        }
        // a run about to end, or to advance a loop, commits this step with that
        let commits_next = self.in_flight == 0
            && (self.fatal.is_some() || !sched.ready_loops.is_empty() || sched.done);
        if !commits_next {
            self.flush().await?;
        }
        if self.in_flight > 0 {
            self.wait_for_message(None).await?;
            return Ok(None);
        }
        if let Some(e) = self.fatal.clone() {
            return self.failed_terminal(e).await.map(Some);
        }
        // nothing running and nothing startable: advance loops, finish, wait or park
        if !sched.ready_loops.is_empty() {
            for li in sched.ready_loops {
                let failed = self
                    .plan
                    .as_ref()
                    .and_then(|p| p.loops[li].until_error.clone());
                if let Some(e) = failed {
                    return Err(e);
                }
                self.advance_loop(li)?;
            }
            self.flush().await?;
            return Ok(None);
        }
        if sched.done {
            return self.finished().await.map(Some);
        }
        self.idle(&sched).await
    }

    async fn wait_for_message(&mut self, deadline_ms: Option<i64>) -> Result<(), SmithersError> {
        let sleep = async {
            match deadline_ms {
                Some(d) => {
                    tokio::time::sleep(Duration::from_millis((d - now_ms()).max(0) as u64)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = self.rx.recv() => {
                if let Some(m) = m {
                    self.handle(m);
                    while let Ok(m) = self.rx.try_recv() {
                        self.handle(m);
                    }
                }
            }
            _ = sleep => {}
            _ = self.cancel.changed() => {}
        }
        self.flush().await
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Wake => {
                for r in &mut self.rts {
                    if matches!(r.state, TState::WaitingApproval | TState::WaitingEvent) {
                        r.state = TState::Pending;
                    }
                }
                self.dirty = true;
            }
            Msg::Output {
                rt,
                attempt,
                stream,
                text,
            } => {
                let f = Self::with(
                    self.node_fields(rt),
                    json!({"attempt": attempt, "stream": stream, "text": text}),
                );
                self.event(kind::NODE_OUTPUT, f);
                // output is a sign of life
                self.task_heartbeat(rt, attempt, None);
            }
            Msg::Heartbeat { rt, attempt, data } => self.task_heartbeat(rt, attempt, data),
            Msg::ProcessStarted { rt, attempt, pgid } => self.process_started(rt, attempt, pgid),
            Msg::AttemptDetails {
                rt,
                attempt,
                meta,
                response_text,
                usage,
            } => self.attempt_details(rt, attempt, meta, response_text, usage),
            Msg::Vcs {
                rt,
                attempt,
                captured,
            } => self.attempt_vcs(rt, attempt, captured),
            Msg::Done {
                rt,
                attempt,
                result,
            } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                let started = self.rts[rt].started_ms;
                match result {
                    TaskResult::Ok(v) => {
                        let spec = self.task_of(rt).and_then(|t| t.output.clone());
                        let node = self.rts[rt].key.0.clone();
                        match self.sh.schemas.check(&node, spec.as_ref(), &v) {
                            Ok(()) => self.record_output(rt, attempt, started, v, None),
                            Err(e) => self.record_failure(rt, attempt, started, e.terminal()),
                        }
                    }
                    TaskResult::Err(e) if e.code == Code::TaskAborted && *self.stop_rx.borrow() => {
                        let now = now_ms();
                        let mut a = self.attempt_row(
                            rt,
                            attempt,
                            node_state::CANCELLED,
                            started,
                            Some(now),
                        );
                        a.error_json = Some(smithers_core::json::text(&e.to_json()));
                        self.batch.push(Write::UpsertAttempt(a));
                        self.set_node(rt, TState::Cancelled);
                        let f = Self::with(
                            self.node_fields(rt),
                            json!({"attempt": attempt, "reason": "aborted"}),
                        );
                        self.event(kind::NODE_CANCELLED, f);
                    }
                    TaskResult::Err(e) => {
                        if e.code == Code::AgentConfigInvalid
                            && let Some(TaskKind::Agent(a)) = self.task_of(rt).map(|t| &t.kind)
                        {
                            self.broken_agents.insert(a.agent.clone(), e.clone());
                        }
                        self.record_failure(rt, attempt, started, e)
                    }
                    TaskResult::Parked(st) => {
                        let s = match st {
                            status::WAITING_APPROVAL => TState::WaitingApproval,
                            status::WAITING_TIMER => TState::WaitingTimer,
                            _ => TState::WaitingEvent,
                        };
                        self.set_node(rt, s);
                        self.dirty = true;
                    }
                }
            }
        }
    }

    /// Records a heartbeat of the running attempt: at most every 500 ms, except that data (a
    /// checkpoint) is stored at once. Stale attempts are ignored.
    fn task_heartbeat(&mut self, rt: usize, attempt: i64, data: Option<Value>) {
        let now = now_ms();
        let r = &self.rts[rt];
        if r.state != TState::InProgress
            || r.attempts != attempt
            || (data.is_none() && now - r.heartbeat_ms < HEARTBEAT_EVERY_MS)
        {
            return;
        }
        let interval = now - r.heartbeat_ms.max(r.started_ms);
        let data = data.map(|d| d.to_string());
        let r = &mut self.rts[rt];
        r.heartbeat_ms = now;
        if let Some(d) = &data {
            r.heartbeat_data = Some(d.clone());
        }
        let started = r.started_ms;
        let mut a = self.attempt_row(rt, attempt, node_state::IN_PROGRESS, started, None);
        a.heartbeat_at_ms = Some(now);
        a.meta_json = self.rts[rt].attempt_meta.clone();
        self.batch.push(Write::UpsertAttempt(a));
        let size = data.as_ref().map_or(0, String::len);
        let f = Self::with(
            self.node_fields(rt),
            json!({"attempt": attempt, "hasData": data.is_some(), "dataSizeBytes": size, "intervalMs": interval}),
        );
        self.event(kind::TASK_HEARTBEAT, f);
    }

    /// Records the process group of the running attempt's newest process in its metadata.
    fn process_started(&mut self, rt: usize, attempt: i64, pgid: i32) {
        let r = &self.rts[rt];
        if r.state != TState::InProgress || r.attempts != attempt {
            return;
        }
        let mut meta = match r
            .attempt_meta
            .as_deref()
            .and_then(|m| serde_json::from_str::<Value>(m).ok())
        {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let Some(Value::Object(p)) = meta.get_mut("process") else {
            return;
        };
        p.insert("pgid".into(), json!(pgid));
        let meta = smithers_core::json::text(&Value::Object(meta));
        self.rts[rt].attempt_meta = Some(meta.clone());
        let started = self.rts[rt].started_ms;
        let mut a = self.attempt_row(rt, attempt, node_state::IN_PROGRESS, started, None);
        a.meta_json = Some(meta);
        self.batch.push(Write::UpsertAttempt(a));
    }

    /// Keeps an agent attempt's metadata, reply text and usage for the row its `Done` writes.
    fn attempt_details(
        &mut self,
        rt: usize,
        attempt: i64,
        meta: serde_json::Map<String, Value>,
        response_text: Option<String>,
        usage: Option<Value>,
    ) {
        if self.rts[rt].attempts != attempt {
            return;
        }
        let mut m = match self.rts[rt]
            .attempt_meta
            .as_deref()
            .and_then(|m| serde_json::from_str::<Value>(m).ok())
        {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        m.extend(meta);
        self.rts[rt].attempt_meta = Some(smithers_core::json::text(&Value::Object(m)));
        self.rts[rt].response_text = response_text;
        if let Some(u) = usage {
            let f = Self::with(
                Self::with(self.node_fields(rt), json!({"attempt": attempt})),
                u,
            );
            self.event(kind::TOKEN_USAGE_REPORTED, f);
        }
    }

    /// Keeps an attempt's work-tree snapshots for the row its `Done` writes: `jj_cwd` = the
    /// work-tree root, `jj_pointer` = the tree after, `meta_json.vcsBefore` = the tree before
    /// (and `vcsError` when a snapshot failed).
    fn attempt_vcs(&mut self, rt: usize, attempt: i64, captured: vcs::Captured) {
        if self.rts[rt].attempts != attempt {
            return;
        }
        let mut m = match self.rts[rt]
            .attempt_meta
            .as_deref()
            .and_then(|m| serde_json::from_str::<Value>(m).ok())
        {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        if let Some(b) = &captured.before {
            m.insert("vcsBefore".into(), json!(b));
        }
        if let Some(e) = &captured.error {
            m.insert("vcsError".into(), json!(e));
        }
        self.rts[rt].attempt_meta = Some(smithers_core::json::text(&Value::Object(m)));
        self.rts[rt].vcs = Some(captured);
    }

    fn advance_loop(&mut self, li: usize) -> Result<(), SmithersError> {
        let Some(plan) = &self.plan else {
            return Ok(());
        };
        let l = plan.loops[li].clone();
        let next = l.iteration + 1;
        let now = now_ms();
        let (iteration, done) = if next >= l.max_iterations {
            if l.on_max_reached == OnMaxReached::Fail {
                return Err(SmithersError::new(
                    Code::RalphMaxReached,
                    format!(
                        "loop `{}` reached max_iterations ({}) before `until` held",
                        l.id, l.max_iterations
                    ),
                )
                .with_node(l.id.clone())
                .terminal());
            }
            (l.iteration, true)
        } else {
            (next, false)
        };
        self.loops.insert(l.id.clone(), (iteration, done));
        self.refresh_loops_arc();
        self.snap.set_loop(l.id.clone(), iteration as i64, done);
        self.batch.push(Write::UpsertLoop(LoopRow {
            run_id: self.run_id.to_string(),
            ralph_id: l.id.clone(),
            iteration: iteration as i64,
            done,
            updated_at_ms: now,
        }));
        self.event(
            kind::LOOP_ADVANCED,
            json!({"loopId": l.id, "iteration": iteration, "done": done}),
        );
        if done {
            // a finished loop stays finished even when the tree itself did not change
            if let Some(p) = &mut self.plan {
                p.loops[li].finished = true;
            }
        }
        self.dirty = true;
        Ok(())
    }
}

// ----- starting tasks ----------------------------------------------------------------------

impl Driver {
    fn begin_attempt(&mut self, rt: usize, mut meta: Value) -> i64 {
        // the output schema travels with the attempt, so readers (getNodeOutput) can describe
        // the output without the workflow definition
        if let (Some(spec), Value::Object(m)) =
            (self.task_of(rt).and_then(|t| t.output.clone()), &mut meta)
        {
            m.insert("outputSchema".into(), (*spec.schema).clone());
            if let Some(name) = &spec.name {
                m.insert("outputTable".into(), json!(name));
            }
        }
        let now = now_ms();
        let r = &mut self.rts[rt];
        r.attempts += 1;
        r.started_ms = now;
        r.heartbeat_ms = 0;
        r.heartbeat_data = None;
        r.response_text = None;
        r.vcs = None;
        r.retry_at_ms = None;
        let attempt = r.attempts;
        let mut a = self.attempt_row(rt, attempt, node_state::IN_PROGRESS, now, None);
        a.meta_json = Some(smithers_core::json::text(&meta));
        self.rts[rt].attempt_meta = a.meta_json.clone();
        self.batch.push(Write::UpsertAttempt(a));
        self.set_node(rt, TState::InProgress);
        let f = Self::with(self.node_fields(rt), json!({"attempt": attempt}));
        self.event(kind::NODE_STARTED, f);
        attempt
    }

    async fn start_task(&mut self, rt: usize) -> Result<Started, SmithersError> {
        let Some(node) = self.rts[rt].node.clone() else {
            return Ok(Started::Unchanged);
        };
        let smithers_core::Node::Task(task) = &*node else {
            return Ok(Started::Unchanged);
        };
        if let Some(e) = &task.error {
            let attempt = self.begin_attempt(rt, json!({"kind": task.kind.name()}));
            let started = self.rts[rt].started_ms;
            self.record_failure(rt, attempt, started, e.clone().terminal());
            return Ok(Started::Changed);
        }
        if task.skip {
            self.set_node(rt, TState::Skipped);
            let f = self.node_fields(rt);
            self.event(kind::NODE_SKIPPED, f);
            self.dirty = true;
            return Ok(Started::Changed);
        }
        if task.needs_approval && !self.rts[rt].approved {
            let spec = ApprovalSpec {
                title: task
                    .label
                    .clone()
                    .unwrap_or_else(|| format!("Approve {}", task.id)),
                summary: None,
                mode: ApprovalMode::Approve,
                options: Vec::new(),
                on_deny: if task.continue_on_fail {
                    OnDeny::Skip
                } else {
                    OnDeny::Fail
                },
                allowed_users: Vec::new(),
                allowed_scopes: Vec::new(),
                auto_approve_after: None,
            };
            match self.approval(rt, &spec).await? {
                Gate::Waiting(changed) => {
                    return Ok(if changed {
                        Started::Changed
                    } else {
                        Started::Unchanged
                    });
                }
                Gate::Approved(_) => self.rts[rt].approved = true,
                Gate::Denied(row) => return Ok(self.denied(rt, &spec, &row, true)),
            }
        }
        match &task.kind {
            TaskKind::Value(v) => {
                let v = v.clone();
                let attempt = self.begin_attempt(rt, json!({"kind": "static"}));
                let started = self.rts[rt].started_ms;
                match self.sh.schemas.check(&task.id, task.output.as_ref(), &v) {
                    Ok(()) => self.record_output(rt, attempt, started, v, None),
                    Err(e) => self.record_failure(rt, attempt, started, e.terminal()),
                }
                Ok(Started::Changed)
            }
            TaskKind::Run(spec) => {
                let marker = leftovers::new_marker();
                let mut meta = json!({"kind": "run", "timeoutMs": task.timeout_ms});
                if let Some(p) = leftovers::meta_entry(&marker) {
                    meta["process"] = p;
                }
                let attempt = self.begin_attempt(rt, meta);
                // the start (with the marker that finds its processes after a crash) must be
                // durable before the command runs
                self.flush().await?;
                let cwd = match &spec.cwd {
                    Some(c) => self.cwd.join(c),
                    None => self.cwd.clone(),
                };
                let mut env = spec.env.clone();
                env.insert(leftovers::MARKER_ENV.into(), marker);
                let ps = ProcSpec {
                    command: spec.command.clone(),
                    cwd,
                    env,
                    timeout_ms: task.timeout_ms,
                    idle_timeout_ms: None,
                };
                let parse_json = task.output.is_some();
                self.spawn_process(rt, attempt, ps, parse_json);
                Ok(Started::Spawned)
            }
            TaskKind::Agent(a) => {
                let def = self.wf.agent(&a.agent);
                let mut meta = agents::start_meta(&a.agent, def.as_ref(), task.timeout_ms);
                let marker = leftovers::new_marker();
                if def.as_ref().is_some_and(agents::runs_processes)
                    && let Some(p) = leftovers::meta_entry(&marker)
                {
                    meta["process"] = p;
                }
                let attempt = self.begin_attempt(rt, meta);
                let Some(def) = def else {
                    let started = self.rts[rt].started_ms;
                    let e = SmithersError::new(
                        Code::AgentConfigInvalid,
                        format!(
                            "task `{}` uses agent `{}`, which the workflow does not declare",
                            task.id, a.agent
                        ),
                    )
                    .terminal();
                    self.record_failure(rt, attempt, started, e);
                    return Ok(Started::Changed);
                };
                if let Some(earlier) = self.broken_agents.get(&a.agent) {
                    let started = self.rts[rt].started_ms;
                    let e = SmithersError::new(
                        Code::AgentConfigInvalid,
                        format!(
                            "agent `{}` was not called: it already failed in this run with a login or configuration error ({}); fix that, then resume the run",
                            a.agent, earlier.message
                        ),
                    )
                    .terminal();
                    self.record_failure(rt, attempt, started, e);
                    return Ok(Started::Changed);
                }
                // the start must be durable before the agent runs
                self.flush().await?;
                let cwd = match &a.cwd {
                    Some(c) => self.cwd.join(c),
                    None => self.cwd.clone(),
                };
                let job = agents::AgentJob {
                    run_id: self.run_id.to_string(),
                    node_id: self.rts[rt].key.0.clone(),
                    iteration: self.rts[rt].key.1,
                    rt,
                    attempt,
                    def,
                    prompt: a.prompt.clone(),
                    env: a.env.clone(),
                    cwd,
                    base_dir: self.cwd.clone(),
                    output: task.output.clone(),
                    timeout_ms: task.timeout_ms,
                    marker,
                };
                self.in_flight += 1;
                agents::spawn(self.sh.clone(), self.tx.clone(), self.stop_rx.clone(), job);
                Ok(Started::Spawned)
            }
            TaskKind::Approval(spec) => match self.approval(rt, spec).await? {
                Gate::Waiting(changed) => Ok(if changed {
                    Started::Changed
                } else {
                    Started::Unchanged
                }),
                Gate::Approved(row) => {
                    let attempt = self.begin_attempt(rt, json!({"kind": "approval"}));
                    let out = decision_output(spec, &row, true);
                    let started = self.rts[rt].started_ms;
                    match self.sh.schemas.check(&task.id, task.output.as_ref(), &out) {
                        Ok(()) => self.record_output(rt, attempt, started, out, None),
                        Err(e) => self.record_failure(rt, attempt, started, e.terminal()),
                    }
                    Ok(Started::Changed)
                }
                Gate::Denied(row) => Ok(self.denied(rt, spec, &row, false)),
            },
            TaskKind::WaitForEvent(w) => self.wait_for_event(rt, w, task.output.as_ref()).await,
            TaskKind::Timer(t) => Ok(self.timer(rt, t)),
            TaskKind::Subflow(sf) => {
                if self.depth >= MAX_SUBFLOW_DEPTH {
                    let attempt = self.begin_attempt(rt, json!({"kind": "subflow"}));
                    let started = self.rts[rt].started_ms;
                    let e = SmithersError::new(
                        Code::WorkflowExecutionFailed,
                        format!("subflow `{}` nests deeper than {MAX_SUBFLOW_DEPTH} levels; does the workflow call itself?", task.id),
                    )
                    .terminal();
                    self.record_failure(rt, attempt, started, e);
                    return Ok(Started::Changed);
                }
                let attempt =
                    self.begin_attempt(rt, json!({"kind": "subflow", "workflow": sf.workflow}));
                self.flush().await?;
                self.spawn_subflow(rt, attempt, sf.clone());
                Ok(Started::Spawned)
            }
        }
    }

    fn spawn_process(&mut self, rt: usize, attempt: i64, spec: ProcSpec, parse_json: bool) {
        self.in_flight += 1;
        let tx = self.tx.clone();
        let cancel = self.stop_rx.clone();
        let sh = self.sh.clone();
        let key = vcs::RefKey {
            run_id: self.run_id.to_string(),
            node_id: self.rts[rt].key.0.clone(),
            iteration: self.rts[rt].key.1,
            attempt,
        };
        // called right after the attempt's start was committed
        let committed = std::time::Instant::now();
        tokio::spawn(async move {
            let _permit = match sh.task_permit(&key.run_id, &cancel, committed).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Msg::Done {
                        rt,
                        attempt,
                        result: TaskResult::Err(e),
                    });
                    return;
                }
            };
            let (ctx, mut crx) = mpsc::unbounded_channel::<process::Chunk>();
            let fwd_tx = tx.clone();
            let fwd = tokio::spawn(async move {
                while let Some(c) = crx.recv().await {
                    let _ = fwd_tx.send(Msg::Output {
                        rt,
                        attempt,
                        stream: c.stream,
                        text: c.text,
                    });
                }
            });
            let cwd = spec.cwd.clone();
            let started = tx.clone();
            let run = process::run(spec, cancel, ctx, move |pgid| {
                let _ = started.send(Msg::ProcessStarted { rt, attempt, pgid });
            });
            let (res, captured) = vcs::around(&sh.work_trees, &cwd, &key, run).await;
            let _ = fwd.await;
            if let Some(captured) = captured {
                let _ = tx.send(Msg::Vcs {
                    rt,
                    attempt,
                    captured,
                });
            }
            let result = match res {
                Ok(out) if parse_json => match serde_json::from_str::<Value>(out.stdout.trim()) {
                    Ok(v) => TaskResult::Ok(v),
                    Err(e) => TaskResult::Err(
                        SmithersError::new(
                            Code::InvalidOutput,
                            format!("stdout is not valid JSON ({e}); a task with an output schema must print one JSON value"),
                        )
                        .terminal(),
                    ),
                },
                Ok(out) => TaskResult::Ok(json!({"stdout": out.stdout, "exitCode": out.exit_code})),
                Err(e) => TaskResult::Err(e),
            };
            let _ = tx.send(Msg::Done {
                rt,
                attempt,
                result,
            });
        });
    }

    fn spawn_subflow(&mut self, rt: usize, attempt: i64, sf: smithers_core::tree::SubflowSpec) {
        self.in_flight += 1;
        let tx = self.tx.clone();
        let sh = self.sh.clone();
        let parent = self.wf.clone();
        let child_id = format!(
            "{}:child:{}:{}",
            self.run_id, self.rts[rt].key.0, self.rts[rt].key.1
        );
        let parent_id = self.run_id.to_string();
        let mut cancel = self.stop_rx.clone();
        let depth = self.depth + 1;
        tokio::spawn(async move {
            let result = async {
                let wf = sh.subflows.resolve(parent.as_ref(), &sf.workflow)?;
                let handle = match sh.store.get_run(&child_id).await? {
                    Some(row) if row.status == status::FINISHED => {
                        let outs = sh.store.list_outputs(&child_id).await?;
                        return Ok(TaskResult::Ok(latest_outputs(&outs)));
                    }
                    Some(_) => {
                        crate::Engine::from_shared(sh.clone())
                            .resume_inner(wf, &child_id, false, depth)
                            .await?
                    }
                    None => {
                        let opts = crate::StartOptions {
                            run_id: Some(child_id.clone()),
                            parent_run_id: Some(parent_id),
                            ..Default::default()
                        };
                        crate::Engine::from_shared(sh.clone())
                            .start_inner(wf, sf.input.clone(), opts, depth)
                            .await?
                    }
                };
                let child_cancel = sh.cancel_sender(&child_id);
                let join = handle.wait();
                tokio::pin!(join);
                let outcome = loop {
                    tokio::select! {
                        o = &mut join => break o,
                        r = cancel.changed() => {
                            if (r.is_err() || *cancel.borrow())
                                && let Some(c) = &child_cancel { let _ = c.send(true); }
                        }
                    }
                };
                Ok::<TaskResult, SmithersError>(match outcome.status.as_str() {
                    status::FINISHED => TaskResult::Ok(outcome.output.unwrap_or(Value::Null)),
                    s @ (status::WAITING_APPROVAL
                    | status::WAITING_EVENT
                    | status::WAITING_TIMER) => TaskResult::Parked(match s {
                        status::WAITING_APPROVAL => status::WAITING_APPROVAL,
                        status::WAITING_TIMER => status::WAITING_TIMER,
                        _ => status::WAITING_EVENT,
                    }),
                    status::CANCELLED => TaskResult::Err(SmithersError::new(
                        Code::TaskAborted,
                        format!("child run `{child_id}` was cancelled"),
                    )),
                    other => {
                        let why = outcome.error.map(|e| e.message).unwrap_or_default();
                        TaskResult::Err(SmithersError::new(
                            Code::WorkflowExecutionFailed,
                            format!("child run `{child_id}` ended `{other}`: {why}"),
                        ))
                    }
                })
            }
            .await;
            let result = result.unwrap_or_else(TaskResult::Err);
            let _ = tx.send(Msg::Done {
                rt,
                attempt,
                result,
            });
        });
    }

    // ----- approvals -------------------------------------------------------------------------

    async fn approval(&mut self, rt: usize, spec: &ApprovalSpec) -> Result<Gate, SmithersError> {
        let (node_id, iteration) = (self.rts[rt].key.0.clone(), self.rts[rt].key.1 as i64);
        let row = self
            .sh
            .store
            .get_approval(&self.run_id, &node_id, iteration)
            .await?;
        match row {
            Some(r) if r.status == "approved" => Ok(Gate::Approved(r)),
            Some(r) if r.status == "denied" => Ok(Gate::Denied(r)),
            Some(_) => {
                let changed = self.rts[rt].state != TState::WaitingApproval;
                if changed {
                    self.rts[rt].state = TState::WaitingApproval;
                }
                Ok(Gate::Waiting(false))
            }
            None => {
                let now = now_ms();
                let request = json!({
                    "mode": spec.mode.wire(),
                    "title": spec.title,
                    "summary": spec.summary,
                    "options": spec.options.iter().map(|o| json!({"key": o.key, "label": o.label, "summary": o.summary})).collect::<Vec<_>>(),
                    "allowedScopes": spec.allowed_scopes,
                    "allowedUsers": spec.allowed_users,
                    "autoApprove": spec.auto_approve_after.map(|a| json!({"after": a})),
                });
                if let Some(after) = spec.auto_approve_after
                    && self.auto_approve(&node_id, after).await?
                {
                    let decision = match spec.mode {
                        ApprovalMode::Approve => None,
                        ApprovalMode::Select => spec
                            .options
                            .first()
                            .map(|o| json!({"selected": o.key, "notes": "Automatically selected"})),
                        ApprovalMode::Rank => Some(json!({
                                "ranked": spec.options.iter().map(|o| o.key.clone()).collect::<Vec<_>>(),
                                "notes": "Automatically ranked"})),
                    };
                    let row = ApprovalRow {
                        run_id: self.run_id.to_string(),
                        node_id: node_id.clone(),
                        iteration,
                        status: "approved".into(),
                        requested_at_ms: Some(now),
                        decided_at_ms: Some(now),
                        note: Some("Auto-approved".into()),
                        decided_by: Some("smithers:auto".into()),
                        request_json: Some(request.to_string()),
                        decision_json: decision.map(|d| d.to_string()),
                        auto_approved: true,
                    };
                    self.batch.push(Write::UpsertApproval(row.clone()));
                    let f = self.node_fields(rt);
                    self.event(kind::APPROVAL_AUTO_APPROVED, f);
                    return Ok(Gate::Approved(row));
                }
                self.batch.push(Write::UpsertApproval(ApprovalRow {
                    run_id: self.run_id.to_string(),
                    node_id,
                    iteration,
                    status: "requested".into(),
                    requested_at_ms: Some(now),
                    decided_at_ms: None,
                    note: None,
                    decided_by: None,
                    request_json: Some(request.to_string()),
                    decision_json: None,
                    auto_approved: false,
                }));
                self.set_node(rt, TState::WaitingApproval);
                let f = Self::with(
                    self.node_fields(rt),
                    json!({
                        "title": spec.title,
                        "mode": spec.mode.wire(),
                        "options": spec.options.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
                    }),
                );
                self.event(kind::APPROVAL_REQUESTED, f.clone());
                self.event(kind::NODE_WAITING_APPROVAL, f);
                Ok(Gate::Waiting(true))
            }
        }
    }

    /// Auto-approve when the last `after` decisions of this node in earlier runs of the same
    /// workflow were approvals (auto-approvals do not count; a denial resets the streak).
    async fn auto_approve(&self, node_id: &str, after: u32) -> Result<bool, SmithersError> {
        if after == 0 {
            return Ok(true);
        }
        let history = self
            .sh
            .store
            .approval_history(
                &self.workflow_name,
                node_id,
                &self.run_id,
                after as usize + 10,
            )
            .await?;
        let mut count = 0;
        for h in history.iter().filter(|h| !h.auto_approved) {
            match h.status.as_str() {
                "approved" => count += 1,
                "denied" => break,
                _ => {}
            }
            if count >= after {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn denied(&mut self, rt: usize, spec: &ApprovalSpec, row: &ApprovalRow, gate: bool) -> Started {
        let attempt = self.begin_attempt(rt, json!({"kind": "approval"}));
        let started = self.rts[rt].started_ms;
        match spec.on_deny {
            OnDeny::Continue if !gate => {
                let out = decision_output(spec, row, false);
                self.record_output(rt, attempt, started, out, None);
            }
            OnDeny::Skip | OnDeny::Continue => {
                let now = now_ms();
                self.batch.push(Write::UpsertAttempt(self.attempt_row(
                    rt,
                    attempt,
                    node_state::SKIPPED,
                    started,
                    Some(now),
                )));
                self.set_node(rt, TState::Skipped);
                let f = self.node_fields(rt);
                self.event(kind::NODE_SKIPPED, f);
                self.dirty = true;
            }
            OnDeny::Fail => {
                let who = row.decided_by.clone().unwrap_or_else(|| "someone".into());
                let note = row
                    .note
                    .clone()
                    .map(|n| format!(": {n}"))
                    .unwrap_or_default();
                let e = SmithersError::new(
                    Code::ApprovalDenied,
                    format!(
                        "approval `{}` was denied by {who}{note}",
                        self.rts[rt].key.0
                    ),
                )
                .terminal();
                self.record_failure(rt, attempt, started, e);
            }
        }
        Started::Changed
    }

    // ----- wait for event --------------------------------------------------------------------

    async fn wait_for_event(
        &mut self,
        rt: usize,
        w: &WaitSpec,
        output: Option<&smithers_core::tree::OutputSpec>,
    ) -> Result<Started, SmithersError> {
        let now = now_ms();
        let mut changed = false;
        let started = match self.rts[rt].wait_started_ms {
            Some(s) => s,
            None => {
                let r = &mut self.rts[rt];
                r.attempts += 1;
                r.started_ms = now;
                r.wait_started_ms = Some(now);
                r.wait_deadline_ms = w.timeout_ms.map(|t| now + t as i64);
                let attempt = r.attempts;
                let mut a = self.attempt_row(rt, attempt, node_state::WAITING_EVENT, now, None);
                a.meta_json = Some(
                    json!({"kind": "wait-for-event", "waitForEvent": {
                        "signalName": w.event, "correlationId": w.correlation_id, "onTimeout": on_timeout_str(w.on_timeout),
                        "timeoutMs": w.timeout_ms, "startedAtMs": now}})
                    .to_string(),
                );
                self.batch.push(Write::UpsertAttempt(a));
                self.set_node(rt, TState::WaitingEvent);
                let f = Self::with(
                    self.node_fields(rt),
                    json!({"event": w.event, "correlationId": w.correlation_id}),
                );
                self.event(kind::NODE_WAITING_EVENT, f);
                changed = true;
                now
            }
        };
        let attempt = self.rts[rt].attempts.max(1);
        // every signal of that name and correlation id counts, also one sent before the wait
        // began (it is kept for the first matching wait), unless another wait took it
        let signals = self
            .sh
            .store
            .list_signals(&self.run_id, &w.event, w.correlation_id.as_deref(), 0)
            .await?;
        let consumed = self.consumed_signals().await?;
        if let Some(sig) = signals.iter().find(|s| !consumed.contains(&s.seq)) {
            if let Some(c) = &mut self.consumed_signals {
                c.insert(sig.seq);
            }
            let node = self.rts[rt].key.0.clone();
            let payload: Value = serde_json::from_str(&sig.payload_json).map_err(|e| {
                SmithersError::new(
                    Code::DbCorrupt,
                    format!(
                        "signal {} of run `{}` is not valid JSON ({e})",
                        sig.seq, self.run_id
                    ),
                )
            })?;
            let meta = json!({"kind": "wait-for-event", "waitForEvent": {"signalName": w.event, "correlationId": w.correlation_id,
                "startedAtMs": started, "resolvedSignalSeq": sig.seq, "receivedAtMs": sig.received_at_ms}});
            match self.sh.schemas.check(&node, output, &payload) {
                Ok(()) => self.record_output(rt, attempt, started, payload, Some(meta)),
                Err(e) => self.record_failure(rt, attempt, started, e.terminal()),
            }
            return Ok(Started::Changed);
        }
        if let Some(deadline) = self.rts[rt].wait_deadline_ms
            && now >= deadline
        {
            // kept on the closed attempt so `smithers inspect` can say the wait timed out
            // (rather than that a signal ended it)
            let meta = json!({"kind": "wait-for-event", "waitForEvent": {"signalName": w.event, "correlationId": w.correlation_id,
                "onTimeout": on_timeout_str(w.on_timeout), "timeoutMs": w.timeout_ms, "startedAtMs": started,
                "timedOutAtMs": now}});
            match w.on_timeout {
                OnTimeout::Fail => {
                    let e = SmithersError::new(
                        Code::TaskTimeout,
                        format!("no `{}` signal arrived before the wait timed out", w.event),
                    )
                    .terminal();
                    // record_failure writes the task's attempt metadata; lend it this one
                    let saved = self.rts[rt].attempt_meta.replace(meta.to_string());
                    self.record_failure(rt, attempt, started, e);
                    self.rts[rt].attempt_meta = saved;
                }
                OnTimeout::Skip => {
                    let mut a =
                        self.attempt_row(rt, attempt, node_state::SKIPPED, started, Some(now));
                    a.meta_json = Some(smithers_core::json::text(&meta));
                    self.batch.push(Write::UpsertAttempt(a));
                    self.set_node(rt, TState::Skipped);
                    let f = self.node_fields(rt);
                    self.event(kind::NODE_SKIPPED, f);
                    self.dirty = true;
                }
                OnTimeout::Continue => {
                    self.record_output(rt, attempt, started, Value::Null, Some(meta))
                }
            }
            return Ok(Started::Changed);
        }
        self.rts[rt].state = TState::WaitingEvent;
        Ok(if changed {
            Started::Changed
        } else {
            Started::Unchanged
        })
    }

    // ----- timers ----------------------------------------------------------------------------

    fn timer(&mut self, rt: usize, t: &TimerSpec) -> Started {
        let now = now_ms();
        let mut changed = false;
        let fires = match self.rts[rt].fires_at_ms {
            Some(f) => f,
            None => {
                let (fires, ty) = match t {
                    TimerSpec::DurationMs(ms) => (now + *ms as i64, "duration"),
                    TimerSpec::UntilMs(at) => (*at, "absolute"),
                };
                let r = &mut self.rts[rt];
                r.attempts += 1;
                r.started_ms = now;
                r.fires_at_ms = Some(fires);
                let attempt = r.attempts;
                let timer_id = r.key.0.clone();
                let mut a = self.attempt_row(rt, attempt, node_state::WAITING_TIMER, now, None);
                a.meta_json = Some(
                    json!({"kind": "timer", "timer": {"timerId": timer_id, "timerType": ty, "createdAtMs": now, "firesAtMs": fires}})
                        .to_string(),
                );
                self.batch.push(Write::UpsertAttempt(a));
                self.set_node(rt, TState::WaitingTimer);
                self.event(
                    kind::TIMER_CREATED,
                    json!({"timerId": timer_id, "firesAtMs": fires, "timerType": ty}),
                );
                let f = Self::with(self.node_fields(rt), json!({"firesAtMs": fires}));
                self.event(kind::NODE_WAITING_TIMER, f);
                changed = true;
                fires
            }
        };
        if now >= fires {
            let attempt = self.rts[rt].attempts.max(1);
            let started = self.rts[rt].started_ms.min(now);
            let timer_id = self.rts[rt].key.0.clone();
            self.event(kind::TIMER_FIRED, json!({"timerId": timer_id, "firesAtMs": fires, "firedAtMs": now, "delayMs": now - fires}));
            let meta = json!({"kind": "timer", "timer": {"timerId": timer_id, "firesAtMs": fires, "firedAtMs": now}});
            self.record_output(rt, attempt, started, json!({"firedAtMs": now}), Some(meta));
            return Started::Changed;
        }
        self.rts[rt].state = TState::WaitingTimer;
        if changed {
            Started::Changed
        } else {
            Started::Unchanged
        }
    }
}

enum Gate {
    /// Still waiting; true when this call wrote the request.
    Waiting(bool),
    Approved(ApprovalRow),
    Denied(ApprovalRow),
}

fn on_timeout_str(o: OnTimeout) -> &'static str {
    match o {
        OnTimeout::Fail => "fail",
        OnTimeout::Skip => "skip",
        OnTimeout::Continue => "continue",
    }
}

/// The output an approval node produces from its decision row.
fn decision_output(spec: &ApprovalSpec, row: &ApprovalRow, approved: bool) -> Value {
    let decision: Value = row
        .decision_json
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(Value::Null);
    let notes = decision
        .get("notes")
        .cloned()
        .unwrap_or_else(|| json!(row.note));
    match (spec.mode, approved) {
        (ApprovalMode::Select, true) => {
            json!({"selected": decision.get("selected"), "notes": notes})
        }
        (ApprovalMode::Rank, true) => json!({"ranked": decision.get("ranked"), "notes": notes}),
        (ApprovalMode::Approve, _) => json!({
            "approved": approved, "note": row.note, "decidedBy": row.decided_by, "decidedAt": row.decided_at_ms}),
        (_, false) => json!({"approved": false, "notes": notes, "decidedBy": row.decided_by}),
    }
}

/// Keeps only the last upsert of each node and attempt row in a batch (a task that starts and
/// finishes within one batch would otherwise write its rows twice).
fn collapse_upserts(writes: &mut Vec<Write>) {
    use std::collections::HashSet;
    let mut seen: HashSet<(u8, String, i64, i64)> = HashSet::new();
    let mut keep = vec![true; writes.len()];
    for (i, w) in writes.iter().enumerate().rev() {
        let key = match w {
            Write::UpsertNode(n) => (0, n.node_id.clone(), n.iteration, 0),
            Write::UpsertAttempt(a) => (1, a.node_id.clone(), a.iteration, a.attempt),
            _ => continue,
        };
        if !seen.insert(key) {
            keep[i] = false;
        }
    }
    let mut i = 0;
    writes.retain(|_| {
        let k = keep[i];
        i += 1;
        k
    });
}

/// `{nodeId: payload of the highest iteration}` from stored output rows.
pub(crate) fn latest_outputs(rows: &[OutputRow]) -> Value {
    let mut m = serde_json::Map::new();
    let mut best: HashMap<&str, i64> = HashMap::new();
    for r in rows {
        if best
            .get(r.node_id.as_str())
            .is_some_and(|&i| i > r.iteration)
        {
            continue;
        }
        best.insert(&r.node_id, r.iteration);
        m.insert(
            r.node_id.clone(),
            serde_json::from_str(&r.payload_json).unwrap_or(Value::Null),
        );
    }
    Value::Object(m)
}

// ----- stopping ----------------------------------------------------------------------------

impl Driver {
    /// Nothing can start and nothing runs: wait in-process for something due soon, or park.
    async fn idle(
        &mut self,
        sched: &crate::plan::Schedule,
    ) -> Result<Option<RunOutcome>, SmithersError> {
        let now = now_ms();
        let mut next_wake: Option<i64> = None;
        let (mut approval, mut event, mut timer) = (false, false, false);
        for r in &self.rts {
            let at = match r.state {
                TState::WaitingApproval => {
                    approval = true;
                    None
                }
                TState::WaitingEvent => {
                    event = true;
                    r.wait_deadline_ms
                }
                TState::WaitingTimer => {
                    timer = true;
                    r.fires_at_ms
                }
                TState::Pending => r.retry_at_ms,
                _ => None,
            };
            if let Some(at) = at {
                next_wake = Some(next_wake.map_or(at, |n: i64| n.min(at)));
            }
        }
        let retry_pending = self
            .rts
            .iter()
            .any(|r| r.state == TState::Pending && r.retry_at_ms.is_some_and(|a| a > now));
        if let Some(at) = next_wake
            && (retry_pending || at - now <= self.sh.config.max_inline_wait_ms)
        {
            self.wait_for_message(Some(at)).await?;
            let now = now_ms();
            for r in &mut self.rts {
                let due = match r.state {
                    TState::WaitingTimer => r.fires_at_ms.is_some_and(|f| f <= now),
                    TState::WaitingEvent => r.wait_deadline_ms.is_some_and(|d| d <= now),
                    _ => false,
                };
                if due {
                    r.state = TState::Pending;
                }
            }
            return Ok(None);
        }
        let park = if approval {
            status::WAITING_APPROVAL
        } else if event {
            status::WAITING_EVENT
        } else if timer {
            status::WAITING_TIMER
        } else if let Some((ti, dep)) = sched.blocked_on_unmounted.first() {
            let id = self
                .plan
                .as_ref()
                .map(|p| p.tasks[*ti].key.0.clone())
                .unwrap_or_default();
            return Err(SmithersError::new(
                Code::SchedulerError,
                format!("task `{id}` depends on `{dep}`, which is not part of the workflow at this point; fix depends_on"),
            )
            .with_node(id));
        } else {
            return Err(SmithersError::new(
                Code::SchedulerError,
                "the run cannot make progress (no task can start)",
            ));
        };
        self.park(park).await.map(Some)
    }

    /// Releases the run with a final (or waiting) status, in one commit with its event.
    async fn end_run(
        &mut self,
        st: &'static str,
        event: (&'static str, Value),
        output: Option<Value>,
        error: Option<SmithersError>,
    ) -> Result<RunOutcome, SmithersError> {
        let ended = st != status::WAITING_APPROVAL
            && st != status::WAITING_EVENT
            && st != status::WAITING_TIMER;
        let mut patch = RunPatch {
            status: Some(st.into()),
            runtime_owner_id: Some(None),
            heartbeat_at_ms: Some(None),
            ..Default::default()
        };
        if ended {
            patch.finished_at_ms = Some(Some(now_ms()));
            patch.cancel_requested_at_ms = Some(None);
            patch.error_json = Some(
                error
                    .as_ref()
                    .map(|e| smithers_core::json::text(&e.to_json())),
            );
        }
        self.batch.push(Write::UpdateRun {
            run_id: self.run_id.to_string(),
            patch,
        });
        self.event(event.0, event.1);
        self.flush().await?;
        Ok(RunOutcome {
            run_id: self.run_id.to_string(),
            status: st.to_string(),
            output,
            error,
        })
    }

    async fn park(&mut self, st: &'static str) -> Result<RunOutcome, SmithersError> {
        self.end_run(
            st,
            (kind::RUN_STATUS_CHANGED, json!({"status": st})),
            None,
            None,
        )
        .await
    }

    async fn finished(&mut self) -> Result<RunOutcome, SmithersError> {
        let output = self.outputs.latest_map();
        self.end_run(
            status::FINISHED,
            (kind::RUN_FINISHED, json!({})),
            Some(output),
            None,
        )
        .await
    }

    /// Cancels waiting timers (they must not fire for a run that stopped).
    fn cancel_waiting(&mut self, reason: &str) {
        for rt in 0..self.rts.len() {
            if self.rts[rt].state == TState::WaitingTimer {
                let id = self.rts[rt].key.0.clone();
                self.set_node(rt, TState::Cancelled);
                self.event(kind::TIMER_CANCELLED, json!({"timerId": id}));
                let f = Self::with(self.node_fields(rt), json!({"reason": reason}));
                self.event(kind::NODE_CANCELLED, f);
            }
        }
    }

    async fn failed_terminal(&mut self, e: SmithersError) -> Result<RunOutcome, SmithersError> {
        self.cancel_waiting("run-failed");
        let ev = json!({"error": e.to_json()});
        self.end_run(status::FAILED, (kind::RUN_FAILED, ev), None, Some(e))
            .await
    }

    /// Fails the run after an engine-level error (render, expression, storage). In-flight tasks
    /// are stopped first.
    async fn fail(mut self, e: SmithersError) -> Drive {
        if self.in_flight > 0 {
            // stop what runs; their results are recorded as cancelled
            let _ = self.stop_tx.send(true);
            while self.in_flight > 0 {
                if self.wait_for_message(None).await.is_err() {
                    break;
                }
            }
        }
        if let Some(node) = e.node.clone()
            && let Some(&rt) = self.rts.iter().position(|r| r.key.0 == node).as_ref()
            && !matches!(self.rts[rt].state, TState::Finished | TState::Skipped)
        {
            self.set_node(rt, TState::Failed);
            let f = Self::with(self.node_fields(rt), json!({"error": e.to_json()}));
            self.event(kind::NODE_FAILED, f);
        }
        match self.failed_terminal(e.clone()).await {
            Ok(o) => Drive::Ended(o),
            Err(e2) if e2.code == Code::RunLeaseLost => {
                self.fenced(&e2);
                Drive::Ended(RunOutcome::lease_lost(&self.run_id, e2))
            }
            // the failure could not be recorded: drive the run again once storage works (it
            // will meet the same error and record it then)
            Err(e2) if is_storage_fault(&e2) => Drive::Stalled(e2),
            Err(e2) => Drive::Ended(RunOutcome {
                run_id: self.run_id.to_string(),
                status: status::FAILED.into(),
                output: None,
                error: Some(SmithersError::new(
                    e.code,
                    format!(
                        "{}; recording the failure also failed: {}",
                        e.message, e2.message
                    ),
                )),
            }),
        }
    }

    async fn cancelled(&mut self) -> Result<RunOutcome, SmithersError> {
        // in-flight tasks are stopped: they kill their processes and report back
        let _ = self.stop_tx.send(true);
        let deadline = now_ms() + 10_000;
        while self.in_flight > 0 && now_ms() < deadline {
            self.wait_for_message(Some(deadline)).await?;
        }
        self.cancel_waiting("run-cancelled");
        self.end_run(
            status::CANCELLED,
            (kind::RUN_CANCELLED, json!({})),
            None,
            None,
        )
        .await
    }
}

impl Driver {
    /// The signals this run's waits have taken so far.
    async fn consumed_signals(&mut self) -> Result<std::collections::HashSet<i64>, SmithersError> {
        if let Some(c) = &self.consumed_signals {
            return Ok(c.clone());
        }
        let mut taken = std::collections::HashSet::new();
        for a in self.sh.store.list_attempts(&self.run_id).await? {
            let seq = a
                .meta_json
                .as_deref()
                .and_then(|m| serde_json::from_str::<Value>(m).ok())
                .and_then(|m| m["waitForEvent"]["resolvedSignalSeq"].as_i64());
            if let Some(seq) = seq {
                taken.insert(seq);
            }
        }
        self.consumed_signals = Some(taken.clone());
        Ok(taken)
    }
}
