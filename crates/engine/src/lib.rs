//! The Smithers engine: runs workflows durably against a [`Store`].
//!
//! Data flows one way: callers (CLI, gateway) call [`Engine`] methods; the engine writes the
//! store; committed events go out on a broadcast bus ([`Engine::subscribe`]).

pub mod agents;
mod clock;
mod driver;
pub mod events;
mod fork;
pub mod frames;
pub mod leftovers;
pub mod node_diff;
pub mod ops;
pub mod outputs;
pub mod owner;
pub mod plan;
pub mod process;
mod rewind;
mod run_id;
mod subflows;
pub mod vcs;

pub use clock::now_ms;
pub use events::EngineEvent;
pub use rewind::Rewound;
pub use run_id::new_run_id;

use serde_json::{Value, json};
use smithers_core::{Code, Result, SmithersError, Workflow, bounds};
use smithers_store::{Batch, RunPatch, RunRow, Store, Write, status};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{Semaphore, broadcast, watch};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tasks (shell commands, subflows) running at once across all runs of this engine.
    pub max_concurrency: usize,
    /// A run whose owner has not heart-beaten for this long may be taken over.
    pub lease_timeout_ms: i64,
    pub heartbeat_interval_ms: u64,
    /// Timers and retries due within this are waited for in-process; later ones park the run.
    pub max_inline_wait_ms: i64,
    /// Working directory for tasks of workflows that have no file.
    pub default_cwd: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_concurrency: 8,
            lease_timeout_ms: 30_000,
            heartbeat_interval_ms: 1_000,
            max_inline_wait_ms: 60_000,
            default_cwd: None,
        }
    }
}

/// How a run ended (or stopped for now).
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run_id: String,
    /// A run status: finished, failed, cancelled, waiting-approval, waiting-event,
    /// waiting-timer; or `lease-lost` when another engine took the run over.
    pub status: String,
    /// `{nodeId: latest output}` when finished.
    pub output: Option<Value>,
    pub error: Option<SmithersError>,
}

impl RunOutcome {
    fn lease_lost(run_id: &str, e: SmithersError) -> Self {
        RunOutcome {
            run_id: run_id.to_string(),
            status: "lease-lost".into(),
            output: None,
            error: Some(e),
        }
    }
}

/// Options for a new run.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub run_id: Option<String>,
    pub parent_run_id: Option<String>,
    /// Extra keys merged into the run's `config_json` (e.g. gateway auth context).
    pub config: Option<Value>,
}

/// A run being driven by this engine.
pub struct RunHandle {
    pub run_id: String,
    join: tokio::task::JoinHandle<RunOutcome>,
}

impl RunHandle {
    /// Waits until the run finishes, fails, is cancelled or parks.
    pub async fn wait(self) -> RunOutcome {
        let id = self.run_id.clone();
        self.join.await.unwrap_or_else(|e| RunOutcome {
            run_id: id,
            status: status::FAILED.into(),
            output: None,
            error: Some(SmithersError::new(
                Code::Internal,
                format!("the run's driver stopped unexpectedly: {e}"),
            )),
        })
    }
}

/// A run driven by this engine: how to stop it and how to make it look again at its waiting
/// nodes.
struct ActiveRun {
    cancel: watch::Sender<bool>,
    /// The current driver's messages; None until the run is claimed.
    wake: Option<tokio::sync::mpsc::UnboundedSender<driver::Msg>>,
    /// False while the run is reserved but not yet claimed (starting or resuming): the
    /// heartbeat must not take "not owned" for a lost lease then.
    claimed: bool,
}

/// A run reserved in `Shared::active`: nobody else in this engine can drive it while this
/// exists. Dropping it frees the run.
pub(crate) struct Reservation {
    sh: Arc<Shared>,
    run_id: String,
    cancel: watch::Receiver<bool>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Ok(mut a) = self.sh.active.lock() {
            a.remove(&self.run_id);
        }
    }
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) owner: String,
    pub(crate) config: EngineConfig,
    bus: broadcast::Sender<EngineEvent>,
    active: Mutex<HashMap<String, ActiveRun>>,
    pub(crate) semaphore: Arc<Semaphore>,
    pub(crate) schemas: outputs::SchemaCache,
    /// Git work-tree roots by directory (probed once per directory).
    pub(crate) work_trees: vcs::WorkTrees,
    /// Node-diff computations in flight (identical requests share one).
    pub(crate) node_diffs: node_diff::InFlight,
    /// Workflows a `subflow` step may name by key.
    pub(crate) subflows: subflows::Registry,
}

impl Shared {
    pub(crate) fn publish(&self, run_id: &Arc<str>, seq: i64, ev: events::PendingEvent) {
        let _ = self.bus.send(EngineEvent {
            run_id: run_id.clone(),
            seq,
            event_type: ev.event_type,
            timestamp_ms: ev.timestamp_ms,
            payload: Arc::new(ev.payload),
        });
    }

    pub(crate) fn cancel_sender(&self, run_id: &str) -> Option<watch::Sender<bool>> {
        self.active
            .lock()
            .ok()?
            .get(run_id)
            .map(|a| a.cancel.clone())
    }

    fn wake(&self, run_id: &str) -> bool {
        let Some(tx) = self
            .active
            .lock()
            .ok()
            .and_then(|a| a.get(run_id).and_then(|a| a.wake.clone()))
        else {
            return false;
        };
        tx.send(driver::Msg::Wake).is_ok()
    }

    /// Signals a locally driven run to stop; false when it is not driven here.
    pub(crate) fn cancel_local(&self, run_id: &str) -> bool {
        match self.cancel_sender(run_id) {
            Some(tx) => tx.send(true).is_ok(),
            None => false,
        }
    }

    fn is_active(&self, run_id: &str) -> bool {
        self.active
            .lock()
            .map(|a| a.contains_key(run_id))
            .unwrap_or(false)
    }

    /// Reserves a run for one driver of this engine, atomically: None when it is already
    /// being started, resumed or driven here.
    fn reserve(self: &Arc<Self>, run_id: &str) -> Option<Reservation> {
        let mut a = self.active.lock().ok()?;
        if a.contains_key(run_id) {
            return None;
        }
        let (cancel, rx) = watch::channel(false);
        a.insert(
            run_id.to_string(),
            ActiveRun {
                cancel,
                wake: None,
                claimed: false,
            },
        );
        Some(Reservation {
            sh: self.clone(),
            run_id: run_id.to_string(),
            cancel: rx,
        })
    }

    /// Marks a reserved run as claimed and points its wake-ups at the current driver.
    fn driving(&self, run_id: &str, wake: tokio::sync::mpsc::UnboundedSender<driver::Msg>) {
        if let Ok(mut a) = self.active.lock()
            && let Some(r) = a.get_mut(run_id)
        {
            r.wake = Some(wake);
            r.claimed = true;
        }
    }

    /// A slot to run one task process. `committed` is when the attempt's start was committed
    /// under the run's lease. The wait for a slot can be long, and the engine may have been
    /// frozen meanwhile: a run that was stopped or lost its lease must start nothing, so unless
    /// the commit is recent (well inside the lease, when no other engine can have claimed the
    /// run), the lease is read again first.
    pub(crate) async fn task_permit(
        &self,
        run_id: &str,
        stop: &watch::Receiver<bool>,
        committed: std::time::Instant,
    ) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let aborted =
            || SmithersError::new(Code::TaskAborted, "task was stopped before it started");
        let permit = match self.semaphore.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let mut stop = stop.clone();
                tokio::select! {
                    p = self.semaphore.clone().acquire_owned() => p.map_err(|_| aborted())?,
                    _ = stop.wait_for(|v| *v) => return Err(aborted()),
                }
            }
        };
        if *stop.borrow() {
            return Err(aborted());
        }
        let proof = std::time::Duration::from_millis(
            (self.config.lease_timeout_ms / 4).clamp(0, 1_000) as u64,
        );
        if committed.elapsed() < proof {
            return Ok(permit);
        }
        let owner = self
            .store
            .get_run(run_id)
            .await?
            .and_then(|r| r.runtime_owner_id);
        if owner.as_deref() != Some(self.owner.as_str()) {
            tracing::warn!(
                run_id,
                owner = %self.owner,
                "task not started: while it waited for a slot, its run stopped being owned by this node (fenced)"
            );
            return Err(SmithersError::new(
                Code::RunLeaseLost,
                format!(
                    "run `{run_id}` is no longer owned by this engine; the task was not started"
                ),
            )
            .terminal());
        }
        Ok(permit)
    }
}

/// Pause before the `n`th re-drive of a run stopped by a storage error: 1 s doubling to 60 s,
/// with up to 25% jitter so many stalled runs do not retry in lockstep.
fn redrive_delay(n: u32) -> std::time::Duration {
    let base = 1_000u64
        .saturating_mul(1 << n.saturating_sub(1).min(6))
        .min(60_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    std::time::Duration::from_millis(base + nanos % (base / 4 + 1))
}

/// Whether a stalled run can be driven again here.
enum Reclaim {
    Yes,
    /// It ended, parked or belongs to another engine now: the driver's task ends with this.
    No(RunOutcome),
}

/// The engine. Cheap to clone; all clones share one owner id, bus and concurrency limit.
#[derive(Clone)]
pub struct Engine {
    sh: Arc<Shared>,
}

impl Engine {
    /// Creates an engine and starts its heartbeat. Must be called inside a tokio runtime.
    pub fn new(store: Arc<dyn Store>, config: EngineConfig) -> Engine {
        let (bus, _) = broadcast::channel(4096);
        let sh = Arc::new(Shared {
            store,
            owner: owner::new_owner_id(),
            semaphore: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            config,
            bus,
            active: Mutex::new(HashMap::new()),
            schemas: outputs::SchemaCache::default(),
            work_trees: vcs::WorkTrees::default(),
            node_diffs: node_diff::InFlight::default(),
            subflows: subflows::Registry::default(),
        });
        let weak = Arc::downgrade(&sh);
        tokio::spawn(async move {
            let interval = weak
                .upgrade()
                .map(|s| s.config.heartbeat_interval_ms)
                .unwrap_or(1000);
            // The first beat is one interval away: a run claimed now has a fresh lease, and an
            // immediate beat would only race the first runs for the writer.
            let period = std::time::Duration::from_millis(interval.max(10));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(sh) = weak.upgrade() else { return };
                heartbeat(&sh).await;
            }
        });
        Engine { sh }
    }

    pub(crate) fn from_shared(sh: Arc<Shared>) -> Engine {
        Engine { sh }
    }

    /// This engine's owner id (`pid:<pid>:<uuid>:<host>`).
    pub fn owner_id(&self) -> &str {
        &self.sh.owner
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.sh.store
    }

    pub fn config(&self) -> &EngineConfig {
        &self.sh.config
    }

    /// Registers workflows under the keys clients use, so a `subflow` step can name them by key
    /// (a gateway's `[[workflows]]`); replaces any registered before.
    pub fn register_workflows(
        &self,
        workflows: impl IntoIterator<Item = (String, Arc<dyn Workflow>)>,
    ) {
        self.sh.subflows.set(
            workflows
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        );
    }

    /// Committed events of every run this engine drives.
    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        self.sh.bus.subscribe()
    }

    /// Makes a run driven here look again at its waiting approvals and events (after a decision
    /// or a signal was recorded). False when the run is not driven by this engine.
    pub fn wake(&self, run_id: &str) -> bool {
        self.sh.wake(run_id)
    }

    /// Whether this engine is driving the run right now.
    pub fn is_active(&self, run_id: &str) -> bool {
        self.sh.is_active(run_id)
    }

    /// Starts a new run. The run row and input are committed before this returns.
    pub async fn start(
        &self,
        workflow: Arc<dyn Workflow>,
        input: Value,
        opts: StartOptions,
    ) -> Result<RunHandle> {
        self.start_inner(workflow, input, opts, 0).await
    }

    pub(crate) async fn start_inner(
        &self,
        workflow: Arc<dyn Workflow>,
        input: Value,
        opts: StartOptions,
        depth: u32,
    ) -> Result<RunHandle> {
        check_input(&*workflow, &input)?;
        let StartOptions {
            run_id,
            parent_run_id,
            config: extra_config,
        } = opts;
        let run_id = run_id.unwrap_or_else(crate::new_run_id);
        bounds::check_run_id(&run_id)?;
        let reservation = self.sh.reserve(&run_id).ok_or_else(|| {
            SmithersError::new(
                Code::RunExists,
                format!("run `{run_id}` is already being started or driven by this engine"),
            )
        })?;
        let vcs = self.run_vcs(&*workflow).await;
        let now = now_ms();
        let mut config = json!({});
        if let (Some(Value::Object(extra)), Value::Object(c)) = (extra_config, &mut config) {
            c.extend(extra);
        }
        let row = RunRow {
            run_id: run_id.clone(),
            parent_run_id,
            workflow_name: workflow.name().to_string(),
            workflow_path: workflow.path().map(|p| p.display().to_string()),
            workflow_hash: workflow.source_hash().map(str::to_string),
            status: status::RUNNING.into(),
            created_at_ms: now,
            started_at_ms: Some(now),
            finished_at_ms: None,
            heartbeat_at_ms: Some(now),
            runtime_owner_id: Some(self.sh.owner.clone()),
            cancel_requested_at_ms: None,
            hijack_requested_at_ms: None,
            hijack_target: None,
            vcs_type: vcs.as_ref().map(|_| vcs::GIT.to_string()),
            vcs_root: vcs.as_ref().map(|v| v.root.clone()),
            vcs_revision: vcs.and_then(|v| v.revision),
            error_json: None,
            config_json: Some(smithers_core::json::text(&config)),
        };
        let ev = events::make(
            &run_id,
            events::kind::RUN_STARTED,
            now,
            json!({"workflowName": workflow.name()}),
        );
        let mut batch = Batch::new();
        batch
            .push(Write::InsertRun(row))
            .push(Write::InsertInput {
                run_id: run_id.clone(),
                payload_json: smithers_core::json::text(&input),
            })
            .push(Write::AppendEvent {
                run_id: run_id.clone(),
                timestamp_ms: now,
                event_type: ev.event_type.to_string(),
                payload_json: smithers_core::json::text(&ev.payload),
            });
        let applied = self.sh.store.apply(batch).await?;
        if let Some(seq) = applied.event_seqs.first() {
            self.sh.publish(&Arc::from(run_id.as_str()), *seq, ev);
        }
        tracing::info!(run_id = %run_id, workflow = %workflow.name(), "run started");
        Ok(self.spawn_driver(reservation, workflow, input, false, depth, now))
    }

    /// The git work tree and `HEAD` of a run of `workflow` (None outside git).
    pub(crate) async fn run_vcs(&self, workflow: &dyn Workflow) -> Option<vcs::RunVcs> {
        let cwd = driver::run_cwd(workflow, &self.sh.config);
        self.sh.work_trees.run_info(&cwd).await
    }

    /// Drives a reserved (and claimed) run on its own task. A driver stopped by a storage
    /// fault is started again from the committed state, with backoff, for as long as the run is
    /// still ours: the reservation is held throughout, so the run is never driven twice here.
    pub(crate) fn spawn_driver(
        &self,
        reservation: Reservation,
        workflow: Arc<dyn Workflow>,
        input: Value,
        resume: bool,
        depth: u32,
        created_at_ms: i64,
    ) -> RunHandle {
        let sh = self.sh.clone();
        let run_id = reservation.run_id.clone();
        let join = tokio::spawn(async move {
            let reservation = reservation;
            let run_id = reservation.run_id.clone();
            let mut resume = resume;
            let mut stalls = 0u32;
            loop {
                let (msg_tx, msg_rx) = tokio::sync::mpsc::unbounded_channel();
                sh.driving(&run_id, msg_tx.clone());
                let init = driver::DriverInit {
                    shared: sh.clone(),
                    workflow_name: workflow.name().to_string(),
                    workflow_hash: workflow.source_hash().map(str::to_string),
                    workflow: workflow.clone(),
                    run_id: run_id.clone(),
                    input: input.clone(),
                    cancel: reservation.cancel.clone(),
                    messages: (msg_tx, msg_rx),
                    depth,
                };
                let began = std::time::Instant::now();
                // boxed: the driver's state machine is large, and inline it would make this
                // task's future as large, copied whole on every spawn
                let drive = Box::pin(driver::Driver::new(init).run(resume));
                let mut error = match drive.await {
                    driver::Drive::Ended(outcome) => {
                        log_outcome(&outcome, workflow.name(), created_at_ms);
                        return outcome;
                    }
                    driver::Drive::Stalled(e) => e,
                };
                // a driver that ran a while before stalling starts the backoff afresh
                if began.elapsed() > std::time::Duration::from_secs(60) {
                    stalls = 0;
                }
                loop {
                    stalls += 1;
                    let delay = redrive_delay(stalls);
                    tracing::warn!(
                        run_id = %run_id,
                        workflow = %workflow.name(),
                        attempt = stalls,
                        retry_in_ms = delay.as_millis() as u64,
                        code = %error.code,
                        error = %error.message,
                        "the run's driver stopped on a storage error; the run stays owned by this node and is driven again once storage works"
                    );
                    let mut cancel = reservation.cancel.clone();
                    if *cancel.borrow() {
                        tokio::time::sleep(delay).await;
                    } else {
                        // a new cancel request is acted on at once (the next driver records it)
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = cancel.wait_for(|v| *v) => {}
                        }
                    }
                    match Engine::from_shared(sh.clone()).reclaim(&run_id).await {
                        Ok(Reclaim::Yes) => break,
                        Ok(Reclaim::No(outcome)) => return outcome,
                        Err(e) if driver::is_storage_fault(&e) => error = e,
                        Err(e) => {
                            tracing::error!(run_id = %run_id, code = %e.code, error = %e.message, "the run cannot be driven again after a storage error");
                            return RunOutcome {
                                run_id: run_id.clone(),
                                status: status::FAILED.into(),
                                output: None,
                                error: Some(e),
                            };
                        }
                    }
                }
                tracing::info!(
                    run_id = %run_id,
                    workflow = %workflow.name(),
                    attempt = stalls,
                    "driving the run again after a storage error"
                );
                resume = true;
            }
        });
        RunHandle { run_id, join }
    }

    /// Takes a run stalled by a storage fault back for another driver of this engine: it must
    /// still be `running` and owned by this engine (the claim refreshes the lease).
    async fn reclaim(&self, run_id: &str) -> Result<Reclaim> {
        let store = &self.sh.store;
        let lost = |row: Option<&RunRow>| {
            let (st, owner) = row
                .map(|r| (r.status.clone(), r.runtime_owner_id.clone()))
                .unwrap_or_else(|| ("missing".into(), None));
            tracing::warn!(
                run_id,
                status = %st,
                owner = ?owner,
                "a run stalled by a storage error is no longer this node's to drive (fenced); it is left alone"
            );
            let e = SmithersError::new(
                Code::RunLeaseLost,
                format!("run `{run_id}` is `{st}` and owned by {owner:?} now; this engine stopped driving it"),
            )
            .terminal();
            if st == status::RUNNING {
                RunOutcome::lease_lost(run_id, e)
            } else {
                RunOutcome {
                    run_id: run_id.to_string(),
                    status: st,
                    output: None,
                    error: None,
                }
            }
        };
        let row = store.get_run(run_id).await?;
        let ours = row.as_ref().is_some_and(|r| {
            r.status == status::RUNNING && r.runtime_owner_id.as_deref() == Some(&self.sh.owner)
        });
        if !ours {
            return Ok(Reclaim::No(lost(row.as_ref())));
        }
        let now = now_ms();
        let claimed = store
            .claim_run(
                run_id,
                &self.sh.owner,
                now,
                now - self.sh.config.lease_timeout_ms,
                Some(&self.sh.owner),
            )
            .await?;
        if !claimed {
            let row = store.get_run(run_id).await?;
            return Ok(Reclaim::No(lost(row.as_ref())));
        }
        Ok(Reclaim::Yes)
    }

    /// Resumes a run that is not being driven: parked, cancelled, failed (failed tasks get a
    /// fresh retry budget) or orphaned by a dead engine. `force` accepts a changed workflow
    /// definition.
    pub async fn resume(
        &self,
        workflow: Arc<dyn Workflow>,
        run_id: &str,
        force: bool,
    ) -> Result<RunHandle> {
        self.resume_inner(workflow, run_id, force, 0).await
    }

    pub(crate) async fn resume_inner(
        &self,
        workflow: Arc<dyn Workflow>,
        run_id: &str,
        force: bool,
        depth: u32,
    ) -> Result<RunHandle> {
        let store = &self.sh.store;
        let row = store.get_run(run_id).await?.ok_or_else(|| {
            SmithersError::new(
                Code::RunNotFound,
                format!("run `{run_id}` not found; `smithers ps` lists runs"),
            )
        })?;
        let reservation = self.sh.reserve(run_id).ok_or_else(|| {
            SmithersError::new(
                Code::RunStillRunning,
                format!("run `{run_id}` is already running in this process"),
            )
        })?;
        if row.status == status::FINISHED || row.status == status::CONTINUED {
            return Err(SmithersError::new(
                Code::RunNotResumable,
                format!(
                    "run `{run_id}` is `{}`; there is nothing to resume",
                    row.status
                ),
            ));
        }
        if !force
            && let (Some(stored), Some(now_hash)) = (&row.workflow_hash, workflow.source_hash())
            && stored != now_hash
        {
            return Err(SmithersError::new(
                Code::ResumeMetadataMismatch,
                format!(
                    "workflow `{}` changed since run `{run_id}` started; resuming could re-run or skip steps. Restore the file, or resume with --force",
                    row.workflow_path
                        .clone()
                        .unwrap_or_else(|| row.workflow_name.clone())
                ),
            ));
        }
        let now = now_ms();
        let mut dead_owner = None;
        if let Some(owner) = &row.runtime_owner_id
            && owner != &self.sh.owner
        {
            let fresh = row
                .heartbeat_at_ms
                .is_some_and(|h| now - h < self.sh.config.lease_timeout_ms);
            match owner::liveness(owner) {
                owner::OwnerLiveness::Dead => dead_owner = Some(owner.clone()),
                owner::OwnerLiveness::Alive if fresh => {
                    return Err(SmithersError::new(
                        Code::RunStillRunning,
                        format!(
                            "run `{run_id}` is being driven by a live engine ({owner}); cancel it first or wait for it to park"
                        ),
                    ));
                }
                _ if fresh => {
                    return Err(SmithersError::new(
                        Code::RunStillRunning,
                        format!(
                            "run `{run_id}` is owned by {owner}, which heart-beat {} ms ago; it can be taken over once the lease ({} ms) expires",
                            now - row.heartbeat_at_ms.unwrap_or(now),
                            self.sh.config.lease_timeout_ms
                        ),
                    ));
                }
                _ => {}
            }
        }
        let claimed = store
            .claim_run(
                run_id,
                &self.sh.owner,
                now,
                now - self.sh.config.lease_timeout_ms,
                dead_owner.as_deref(),
            )
            .await?;
        if !claimed {
            return Err(SmithersError::new(
                Code::RunResumeClaimFailed,
                format!(
                    "another engine claimed run `{run_id}` at the same time; check `smithers ps`"
                ),
            ));
        }
        if let Some(previous) = row
            .runtime_owner_id
            .as_deref()
            .filter(|o| *o != self.sh.owner)
        {
            tracing::info!(
                run_id,
                workflow = %row.workflow_name,
                previous_owner = previous,
                owner = %self.sh.owner,
                "took over a run whose engine died or stopped heart-beating"
            );
        }
        let input: Value = match store.get_input(run_id).await? {
            Some(text) => serde_json::from_str(&text).map_err(|e| {
                SmithersError::new(Code::DbCorrupt, format!("stored input of run `{run_id}` is not valid JSON ({e}); restore from backup"))
            })?,
            None => json!({}),
        };
        let mut batch = Batch::guarded(run_id, &self.sh.owner);
        let ev = events::make(
            run_id,
            events::kind::RUN_RESUMED,
            now,
            json!({"previousStatus": row.status}),
        );
        batch
            .push(Write::UpdateRun {
                run_id: run_id.to_string(),
                patch: RunPatch {
                    status: Some(status::RUNNING.into()),
                    finished_at_ms: Some(None),
                    cancel_requested_at_ms: Some(None),
                    error_json: Some(None),
                    ..Default::default()
                },
            })
            .push(Write::AppendEvent {
                run_id: run_id.to_string(),
                timestamp_ms: now,
                event_type: ev.event_type.to_string(),
                payload_json: smithers_core::json::text(&ev.payload),
            });
        let applied = store.apply(batch).await?;
        if let Some(seq) = applied.event_seqs.first() {
            self.sh.publish(&Arc::from(run_id), *seq, ev);
        }
        tracing::info!(
            run_id,
            workflow = %row.workflow_name,
            previous_status = %row.status,
            "run resumed"
        );
        Ok(self.spawn_driver(reservation, workflow, input, true, depth, row.created_at_ms))
    }

    /// Cancels a run. A run driven here stops at once (its processes are killed); a parked or
    /// orphaned run is marked cancelled directly; a run driven by another live engine gets a
    /// durable cancel request that engine acts on within a heartbeat.
    pub async fn cancel(&self, run_id: &str) -> Result<ops::CancelOutcome> {
        if self.sh.cancel_local(run_id) {
            let _ = self.sh.store.request_cancel(run_id, now_ms()).await;
            return Ok(ops::CancelOutcome::Cancelling);
        }
        ops::cancel_run(
            self.sh.store.as_ref(),
            run_id,
            self.sh.config.lease_timeout_ms,
        )
        .await
    }

    /// Resumes every run left `running` by an engine that died (same host, process gone) or
    /// stopped heart-beating. `resolve` maps a run to its workflow; runs it cannot resolve are
    /// left alone. Returns the handles of the runs taken over.
    pub async fn take_over_orphans(
        &self,
        resolve: &(dyn Fn(&RunRow) -> Option<Arc<dyn Workflow>> + Send + Sync),
    ) -> Result<Vec<RunHandle>> {
        let now = now_ms();
        let mut out = Vec::new();
        for row in self
            .sh
            .store
            .list_runs(Some(status::RUNNING), 10_000)
            .await?
        {
            if row.status != status::RUNNING || self.sh.is_active(&row.run_id) {
                continue;
            }
            let orphaned = match &row.runtime_owner_id {
                None => true,
                Some(o) if o == &self.sh.owner => false,
                Some(o) => {
                    owner::liveness(o) == owner::OwnerLiveness::Dead
                        || row
                            .heartbeat_at_ms
                            .is_none_or(|h| now - h >= self.sh.config.lease_timeout_ms)
                }
            };
            if !orphaned {
                continue;
            }
            let Some(wf) = resolve(&row) else { continue };
            if let Ok(h) = self.resume(wf, &row.run_id, false).await {
                out.push(h);
            }
        }
        Ok(out)
    }
}

async fn heartbeat(sh: &Arc<Shared>) {
    let active: Vec<String> = match sh.active.lock() {
        Ok(a) => a
            .iter()
            .filter(|(_, r)| r.claimed)
            .map(|(k, _)| k.clone())
            .collect(),
        Err(_) => return,
    };
    if active.is_empty() {
        return;
    }
    let Ok(hb) = sh.store.heartbeat(&sh.owner, now_ms()).await else {
        return;
    };
    for id in hb.cancel_requested {
        sh.cancel_local(&id);
    }
    // runs we drive but no longer own were taken over: stop them (their writes would fail)
    for id in active {
        if !hb.owned.contains(&id) && sh.cancel_local(&id) {
            tracing::info!(
                run_id = %id,
                owner = %sh.owner,
                "lease lost: the run is no longer owned by this node; stopping its tasks here"
            );
        }
    }
}

/// Whether `input` may start a run of `workflow` (the input limits and its input schema), so
/// that what starts runs later (a schedule) can be refused when it is defined.
pub fn check_input(workflow: &dyn Workflow, input: &Value) -> Result<()> {
    bounds::check_run_input(input)?;
    match workflow.input_schema() {
        Some(schema) => check_input_schema(schema, input),
        None => Ok(()),
    }
}

fn check_input_schema(schema: &Value, input: &Value) -> Result<()> {
    let v = jsonschema::validator_for(schema).map_err(|e| {
        SmithersError::new(
            Code::InvalidWorkflow,
            format!("the workflow's input schema is invalid: {e}"),
        )
    })?;
    let problems: Vec<String> = v
        .iter_errors(input)
        .take(5)
        .map(|e| {
            let p = e.instance_path().to_string();
            format!(
                "at `{}`: {e}",
                if p.is_empty() { "/".to_string() } else { p }
            )
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SmithersError::new(
            Code::InvalidInput,
            format!(
                "input does not match the workflow's input schema: {}",
                problems.join("; ")
            ),
        ))
    }
}

/// One log line per run that stops being driven: how it ended (or why it waits) and how long
/// since it was created.
fn log_outcome(outcome: &RunOutcome, workflow: &str, created_at_ms: i64) {
    let duration_ms = now_ms().saturating_sub(created_at_ms);
    let run_id = outcome.run_id.as_str();
    let st = outcome.status.as_str();
    match (st, &outcome.error) {
        (status::FINISHED, _) => {
            tracing::info!(run_id, workflow, duration_ms, "run finished")
        }
        (status::CANCELLED, _) => {
            tracing::info!(run_id, workflow, duration_ms, "run cancelled")
        }
        (status::FAILED, Some(e)) => tracing::warn!(
            run_id,
            workflow,
            duration_ms,
            code = %e.code,
            node = e.node.as_deref().unwrap_or(""),
            error = %e.message,
            "run failed"
        ),
        (_, Some(e)) if e.code == Code::RunLeaseLost => {
            tracing::info!(
                run_id,
                workflow,
                "run handed over: another node owns it now"
            )
        }
        _ => tracing::info!(run_id, workflow, status = st, duration_ms, "run waiting"),
    }
}
