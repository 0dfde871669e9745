//! WAL checkpoints off the commit path.
//!
//! SQLite's automatic checkpoint runs on the connection that commits, once the WAL holds
//! `wal_autocheckpoint` frames. While readers or a steady stream of commits keep the log from
//! being reset, the WAL stays over that size, so the checkpoint runs again after *every* later
//! commit, each time with an fsync of the WAL and one of the database: under load that put
//! 20–50 ms stalls on the commit path (issue 13). Here a thread with its own connection copies
//! the WAL back instead, and the writer's automatic checkpoint is off while it runs.
//!
//! The thread's `PASSIVE` checkpoint never waits for the writer or readers. A log that is
//! fully copied back is reset by the next commit (one small fsync of the WAL header). If
//! commits never pause long enough for that, the log would grow without end: past
//! [`RESTART_FRAMES`] the thread runs a `RESTART` checkpoint, which waits (at most
//! [`RESTART_WAIT`]) for the writer and readers to finish so that the next commit starts
//! the log from the beginning. A writer that commits group after group never lets go of its
//! lock long enough for that wait to see it free (seen at 3,000–9,000 runs/s: the WAL grew
//! past the limit and stayed there), so the thread also asks the writer, through a
//! [`ResetGate`], to wait between two groups until the reset is done.

use rusqlite::Connection;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

/// How the checkpoint thread asks the writer to stand still for a forced reset.
#[derive(Debug)]
pub struct ResetGate {
    /// A reset is running and wants the writer still.
    wanted: Mutex<bool>,
    ended: Condvar,
    /// The longest the writer stands still: the reset's two waits (for the writer's lock,
    /// then for the readers) are each at most the policy's `restart_wait`.
    max_pause: Duration,
}

impl ResetGate {
    pub fn new(policy: &Policy) -> Self {
        ResetGate {
            wanted: Mutex::new(false),
            ended: Condvar::new(),
            max_pause: policy.restart_wait * 2 + Duration::from_millis(100),
        }
    }

    /// The writer, between two groups: if a reset is running, waits until it ends (at most
    /// `max_pause`). Returns whether it waited.
    pub fn pause_if_wanted(&self) -> bool {
        let Ok(wanted) = self.wanted.lock() else {
            return false;
        };
        if !*wanted {
            return false;
        }
        let _ = self
            .ended
            .wait_timeout_while(wanted, self.max_pause, |wanted| *wanted);
        true
    }

    /// Asks the writer to stand still until the returned guard is dropped (also by a panic,
    /// so the writer is never left waiting on a reset that is gone).
    fn hold(&self) -> Held<'_> {
        self.set(true);
        Held(self)
    }

    fn set(&self, wanted: bool) {
        if let Ok(mut w) = self.wanted.lock() {
            *w = wanted;
        }
        self.ended.notify_all();
    }
}

/// A forced reset in progress; lets the writer go when dropped.
struct Held<'a>(&'a ResetGate);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// How often the WAL is copied back into the database file. Often enough that each copy is
/// small (a busy server writes about 50,000 WAL frames a second) and that the log gets reset
/// whenever commits pause; a reset costs the next commit one fsync of the WAL header.
pub const EVERY: Duration = Duration::from_millis(200);

/// WAL frames (pages; 4 KiB each by default, so 256 MiB) past which the log is reset by
/// force. Under sustained load the log was seen reaching 45,000 frames between natural resets.
pub const RESTART_FRAMES: i64 = 65_536;

/// How long a forced reset waits for the writer and readers before trying again next time.
pub const RESTART_WAIT: Duration = Duration::from_millis(500);

/// When the thread checkpoints, and when it resets the log by force.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub every: Duration,
    pub restart_frames: i64,
    pub restart_wait: Duration,
}

impl Policy {
    pub const DEFAULT: Policy = Policy {
        every: EVERY,
        restart_frames: RESTART_FRAMES,
        restart_wait: RESTART_WAIT,
    };
}

/// What the thread has done, for tests and diagnostics.
#[derive(Debug, Default)]
pub struct Counts {
    pub rounds: AtomicU64,
    pub forced_resets: AtomicU64,
}

/// What a `PRAGMA wal_checkpoint` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The checkpoint could not finish: the writer or a reader was in the way.
    pub busy: bool,
    /// Frames in the WAL.
    pub log_frames: i64,
    /// Frames already copied back into the database file.
    pub copied_frames: i64,
}

/// Runs one checkpoint in `mode` (`PASSIVE`, `RESTART`, …).
pub fn run(conn: &Connection, mode: &str) -> rusqlite::Result<Outcome> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok(Outcome {
            busy: r.get::<_, i64>(0)? != 0,
            log_frames: r.get(1)?,
            copied_frames: r.get(2)?,
        })
    })
}

/// A checkpoint that keeps failing (a full disk) is logged at most this often.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// What the checkpoint thread remembers between rounds.
#[derive(Default)]
struct Rounds {
    /// A forced reset is being retried every round.
    forcing: bool,
    /// Rounds in a row whose checkpoint failed.
    failed: u64,
    /// When a failure was last logged.
    failure_logged: Option<std::time::Instant>,
}

impl Rounds {
    /// Logs a failed checkpoint: the first of a series, then at most once a
    /// [`FAILURE_LOG_EVERY`] (it runs every round, several times a second).
    fn failed(&mut self, e: &rusqlite::Error) {
        self.failed += 1;
        if self
            .failure_logged
            .is_some_and(|at| at.elapsed() < FAILURE_LOG_EVERY)
        {
            return;
        }
        self.failure_logged = Some(std::time::Instant::now());
        tracing::warn!(
            error = %e,
            failed_rounds = self.failed,
            "SQLite WAL checkpoint failed; retrying every round (logged again in a minute if it still fails)"
        );
    }

    /// A checkpoint worked: says so once after a series of failures.
    fn worked(&mut self) {
        if self.failed > 0 {
            tracing::info!(
                failed_rounds = self.failed,
                "SQLite WAL checkpoints work again"
            );
        }
        self.failed = 0;
        self.failure_logged = None;
    }
}

/// One round: copy back what the WAL holds, and reset a log that has grown too long.
fn round(conn: &Connection, policy: &Policy, counts: &Counts, gate: &ResetGate, st: &mut Rounds) {
    counts.rounds.fetch_add(1, Ordering::Relaxed);
    let passive = match run(conn, "PASSIVE") {
        Ok(o) => {
            st.worked();
            o
        }
        Err(e) => {
            st.failed(&e);
            return;
        }
    };
    let forcing = &mut st.forcing;
    if passive.log_frames < policy.restart_frames {
        if *forcing {
            tracing::info!(
                wal_frames = passive.log_frames,
                "SQLite WAL reset; back to background checkpoints"
            );
            *forcing = false;
        }
        return;
    }
    // the writer waits between its groups while this runs
    let held = gate.hold();
    let restart = run(conn, "RESTART");
    drop(held);
    match restart {
        Ok(o) if !o.busy => {
            counts.forced_resets.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                wal_frames = passive.log_frames,
                "SQLite WAL reset by force: commits had not paused long enough for a reset"
            );
            *forcing = false;
        }
        Ok(_) | Err(_) if !*forcing => {
            tracing::warn!(
                wal_frames = passive.log_frames,
                limit = policy.restart_frames,
                "SQLite WAL has grown past its limit and readers or the writer kept it from being reset; retrying every round"
            );
            *forcing = true;
        }
        Ok(_) | Err(_) => {}
    }
}

/// Starts the checkpoint thread on `conn`; it stops when `stop`'s sender is dropped, after
/// one last round.
pub fn spawn(
    conn: Connection,
    stop: mpsc::Receiver<()>,
    policy: Policy,
    gate: Arc<ResetGate>,
) -> std::io::Result<(std::thread::JoinHandle<()>, Arc<Counts>)> {
    let counts = Arc::new(Counts::default());
    let mine = counts.clone();
    let handle = std::thread::Builder::new()
        .name("smithers-sqlite-checkpoint".into())
        .spawn(move || {
            let _ = conn.busy_timeout(policy.restart_wait);
            let mut st = Rounds::default();
            while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(policy.every) {
                round(&conn, &policy, &mine, &gate, &mut st);
            }
            round(&conn, &policy, &mine, &gate, &mut st);
        })?;
    Ok((handle, counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn open(path: &std::path::Path) -> Connection {
        let c = Connection::open(path).expect("open");
        c.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0",
        )
        .expect("configure");
        c
    }

    /// The writer's connection, with the table the tests fill.
    fn open_with_table(path: &std::path::Path) -> Connection {
        let c = open(path);
        c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            .expect("table");
        c
    }

    fn write_pages(c: &Connection, txns: usize) {
        for _ in 0..txns {
            c.execute("INSERT INTO t (v) VALUES (randomblob(3000))", [])
                .expect("insert");
        }
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_writer_waits_only_while_a_reset_is_held_and_at_most_its_limit() {
        let gate = Arc::new(ResetGate::new(&Policy {
            restart_wait: Duration::from_millis(10),
            ..Policy::DEFAULT
        }));
        assert!(!gate.pause_if_wanted(), "nothing held");
        let held = gate.hold();
        let t0 = Instant::now();
        assert!(gate.pause_if_wanted());
        assert!(
            t0.elapsed() >= Duration::from_millis(120),
            "waited its limit: 2 × 10 + 100 ms"
        );
        // a reset that ends lets the writer go at once
        let writer = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let waited = gate.pause_if_wanted();
                (waited, t0.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        let (waited, took) = writer.join().expect("join");
        assert!(waited && took < Duration::from_millis(120), "{took:?}");
        assert!(!gate.pause_if_wanted(), "over");
    }

    const FAST: Policy = Policy {
        every: Duration::from_millis(10),
        restart_frames: 50,
        restart_wait: Duration::from_millis(20),
    };

    #[test]
    fn the_thread_copies_the_wal_back_while_the_writer_never_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("c.db");
        let writer = open_with_table(&db);
        write_pages(&writer, 200);
        // with automatic checkpoints off, the rows live only in the WAL so far
        let before = std::fs::metadata(&db).expect("db").len();
        assert!(
            before < 100_000,
            "database file already holds the rows: {before} bytes"
        );
        let (stop, wake) = mpsc::channel();
        let (handle, counts) = spawn(
            open(&db),
            wake,
            Policy {
                restart_frames: i64::MAX,
                ..FAST
            },
            Arc::new(ResetGate::new(&FAST)),
        )
        .expect("spawn");
        wait_for("the rows to reach the database file", || {
            std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0) > 600_000
        });
        assert!(counts.rounds.load(Ordering::Relaxed) >= 1);
        assert_eq!(counts.forced_resets.load(Ordering::Relaxed), 0);
        drop(stop);
        handle.join().expect("join");
    }

    #[test]
    fn a_log_held_long_by_a_reader_is_reset_by_force_once_the_reader_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("r.db");
        let writer = open_with_table(&db);
        write_pages(&writer, 10);
        // a reader pins an old snapshot: nothing written after it can be copied back
        let reader = open(&db);
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM t;")
            .expect("read txn");
        let (stop, wake) = mpsc::channel();
        let (handle, counts) =
            spawn(open(&db), wake, FAST, Arc::new(ResetGate::new(&FAST))).expect("spawn");
        write_pages(&writer, 200);
        let r0 = counts.rounds.load(Ordering::Relaxed);
        wait_for("a few rounds", || {
            counts.rounds.load(Ordering::Relaxed) >= r0 + 3
        });
        assert_eq!(
            counts.forced_resets.load(Ordering::Relaxed),
            0,
            "reset while a reader held the log"
        );
        reader.execute_batch("COMMIT").expect("end read");
        wait_for("a forced reset", || {
            counts.forced_resets.load(Ordering::Relaxed) >= 1
        });
        // the next commit starts the log from the beginning: the WAL stops growing
        let wal = dir.path().join("r.db-wal");
        let size = std::fs::metadata(&wal).expect("wal").len();
        write_pages(&writer, 20);
        assert_eq!(
            std::fs::metadata(&wal).expect("wal").len(),
            size,
            "the WAL grew after a reset"
        );
        drop(stop);
        handle.join().expect("join");
    }
}
