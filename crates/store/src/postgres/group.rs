//! Group commit: batches that arrive while others are being written wait in a queue and are
//! then applied together, in one transaction with one round trip for their statements and one
//! commit. With many runs in flight this divides the per-transaction costs (BEGIN, COMMIT and
//! its WAL flush, waking the other nodes' listeners) among them; a lone batch is written at
//! once, as before.
//!
//! At most [`WRITERS`] transactions are open at a time. A writer is a task spawned when a batch
//! arrives and fewer are running; it takes what is queued (up to [`MAX_BATCHES`] batches or
//! [`MAX_WRITES`] writes), writes it, and ends once the queue is empty. The queue holds at most
//! one batch per waiting caller, and each engine run waits for its batch before making the
//! next, so its length is bounded by the runs in flight.
//!
//! When a transaction of several batches fails and is known to have rolled back, the batch
//! whose own write or lease check failed (a lost lease, a run that exists already, a duplicate
//! frame) gets the error and the others are written again without it, together; a failure no
//! batch can be blamed for is retried batch by batch. So only the batch at fault fails, and a
//! client that keeps sending bad batches costs the others one extra transaction each time.

use super::claims::{Op, Out};
use super::{Pool, unexpected, write_tx};
use crate::{Applied, Batch};
use smithers_core::{Code, Result, SmithersError};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// Transactions of batches open at once (the pool keeps the rest of its connections for
/// reads and other writes).
const WRITERS: usize = 4;
/// Batches in one transaction at most.
const MAX_BATCHES: usize = 64;
/// Writes in one transaction at most (a larger batch still goes alone).
const MAX_WRITES: usize = 2048;

/// Applies batches through the group-commit queue.
pub(crate) struct Grouper {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Arc<Pool>,
    /// What this store signs its event notices with.
    instance: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    writers: usize,
}

struct Job {
    batch: Batch,
    reply: oneshot::Sender<Result<Applied>>,
}

impl Shared {
    /// The queue; a writer that panicked while holding it left nothing half-done in it.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Grouper {
    pub(crate) fn new(pool: Arc<Pool>, instance: String) -> Self {
        Grouper {
            shared: Arc::new(Shared {
                pool,
                instance,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Applies `batch` in one transaction, possibly shared with other batches.
    pub(crate) async fn apply(&self, batch: Batch) -> Result<Applied> {
        let (reply, answer) = oneshot::channel();
        let spawn = {
            let mut st = self.shared.state();
            st.queue.push_back(Job { batch, reply });
            let spawn = st.writers < WRITERS;
            if spawn {
                st.writers += 1;
            }
            spawn
        };
        if spawn {
            tokio::spawn(drain(Writer {
                shared: self.shared.clone(),
                counted: true,
            }));
        }
        answer.await.map_err(|_| {
            SmithersError::new(
                Code::DbWriteFailed,
                "apply: the writer of this batch stopped before answering, so whether it was stored is unknown",
            )
        })?
    }
}

/// A running writer; counted in [`State::writers`] until it ends, also by a panic.
struct Writer {
    shared: Arc<Shared>,
    counted: bool,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.counted {
            self.shared.state().writers -= 1;
        }
    }
}

/// Writes groups from the queue until it is empty. The writer stops being counted in the same
/// critical section that finds the queue empty, so a batch queued later always gets a writer.
async fn drain(mut w: Writer) {
    loop {
        let jobs = {
            let mut st = w.shared.state();
            let jobs = take(&mut st.queue);
            if jobs.is_empty() {
                st.writers -= 1;
                w.counted = false;
                return;
            }
            jobs
        };
        write_group(&w.shared, jobs).await;
    }
}

/// The next group: at least one batch, then more while the caps allow.
fn take(queue: &mut VecDeque<Job>) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut writes = 0;
    while let Some(next) = queue.front() {
        let n = next.batch.writes.len();
        if !jobs.is_empty() && (jobs.len() >= MAX_BATCHES || writes + n > MAX_WRITES) {
            break;
        }
        writes += n;
        if let Some(job) = queue.pop_front() {
            jobs.push(job);
        }
    }
    jobs
}

async fn write_group(shared: &Shared, mut jobs: Vec<Job>) {
    while !jobs.is_empty() {
        let batches: Vec<&Batch> = jobs.iter().map(|j| &j.batch).collect();
        let result = write_tx(&shared.pool, &Op::Apply(&batches, &shared.instance)).await;
        drop(batches);
        match result {
            Ok(Out::Applied(applied)) if applied.len() == jobs.len() => {
                for (job, a) in jobs.into_iter().zip(applied) {
                    let _ = job.reply.send(Ok(a));
                }
                return;
            }
            Ok(_) => {
                for job in jobs {
                    let _ = job.reply.send(Err(unexpected("apply")));
                }
                return;
            }
            // one batch's own write or lease check failed and nothing was committed: it gets
            // the error, and the others are written again without it
            Err(f) if f.rolled_back && f.culprit.is_some_and(|i| i < jobs.len()) => {
                let culprit = jobs.remove(f.culprit.unwrap_or_default());
                if !jobs.is_empty() {
                    tracing::debug!(
                        batches = jobs.len(),
                        error = %f.error,
                        "a batch failed in a shared transaction; writing the others without it"
                    );
                }
                let _ = culprit.reply.send(Err(f.error));
            }
            // a failure no batch can be blamed for, rolled back: each alone
            Err(f) if f.rolled_back && jobs.len() > 1 => {
                tracing::debug!(
                    batches = jobs.len(),
                    error = %f.error,
                    "a transaction of several batches failed; writing them one by one"
                );
                for job in jobs {
                    let result =
                        match write_tx(&shared.pool, &Op::Apply(&[&job.batch], &shared.instance))
                            .await
                        {
                            Ok(Out::Applied(mut a)) if a.len() == 1 => Ok(a.remove(0)),
                            Ok(_) => Err(unexpected("apply")),
                            Err(f) => Err(f.error),
                        };
                    let _ = job.reply.send(result);
                }
                return;
            }
            Err(f) => {
                for job in jobs {
                    let _ = job.reply.send(Err(f.error.clone()));
                }
                return;
            }
        }
    }
}
