//! A throwaway PostgreSQL cluster for tests, shared by all tests of one test binary.
//!
//! The first call to [`cluster`] runs `initdb` into a fresh temporary directory and starts
//! `postgres` on a free local port (TCP on 127.0.0.1 plus a socket in the same directory).
//! Each test then gets its own empty database from [`fresh_database_url`], so tests run in
//! parallel without seeing each other's rows.
//!
//! The server is stopped and its directory removed when the test process exits (an `atexit`
//! hook); should the process die without running it, `PR_SET_PDEATHSIG` kills the server
//! (the signal follows the thread that spawned it, so a dedicated thread spawns it and lives
//! as long as the process).
//!
//! `initdb` and `postgres` refuse to run as root: as root, the directory is handed to the
//! unprivileged `nobody` user and both run as that user.
//!
//! Binaries are looked up in `$SMITHERS_PG_BIN`, then `PATH`, then `/usr/lib/postgresql/*/bin`
//! (newest version first). Missing binaries fail the tests with a message saying how to
//! install them; they are never skipped silently.

#![allow(dead_code)]

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::{Gid, Pid, Uid};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    pid: i32,
}

impl Cluster {
    /// URL of database `db` as the superuser `postgres` (trust authentication).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The cluster of this test binary, started on first use. Panics with the reason when it
/// cannot be started (for example when PostgreSQL is not installed).
pub fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(start) {
        Ok(c) => c,
        Err(e) => panic!("cannot start a temporary PostgreSQL cluster: {e}"),
    }
}

/// Creates a new empty database and returns its URL.
pub async fn fresh_database_url() -> String {
    let c = cluster();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let client = admin_client(c).await;
    if let Err(e) = client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
    {
        panic!("CREATE DATABASE {name}: {e:?}");
    }
    c.url(&name)
}

/// A superuser connection to the `postgres` database (retries while the server starts).
pub async fn admin_client(c: &Cluster) -> tokio_postgres::Client {
    raw_client(&c.url("postgres")).await
}

/// A plain connection to `url`, for tests that poke at the database directly.
pub async fn raw_client(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("connect {url}: {e:?}"),
        }
    }
}

fn find_bin_dir() -> Result<PathBuf, String> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("SMITHERS_PG_BIN") {
        let d = PathBuf::from(d);
        if has_both(&d) {
            return Ok(d);
        }
        return Err(format!(
            "SMITHERS_PG_BIN={} has no initdb and postgres",
            d.display()
        ));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let initdb = d.join("initdb");
            if initdb.is_file() {
                // Debian links /usr/bin/initdb elsewhere; postgres sits next to the real one.
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                if let Some(dir) = real.parent()
                    && has_both(dir)
                {
                    return Ok(dir.to_path_buf());
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some((_, d)) = versions.into_iter().rev().find(|(_, d)| has_both(d)) {
        return Ok(d);
    }
    Err(
        "PostgreSQL server binaries (initdb, postgres) not found in $SMITHERS_PG_BIN, PATH or \
         /usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: apt-get install -y postgresql; \
         .ci/run does this) to run the PostgreSQL tests"
            .to_string(),
    )
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// Who runs the server: `None` to run as ourselves, or the unprivileged user when root.
fn run_as() -> Option<(Uid, Gid)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    match nix::unistd::User::from_name("nobody") {
        Ok(Some(u)) => Some((u.uid, u.gid)),
        _ => Some((Uid::from_raw(65534), Gid::from_raw(65534))),
    }
}

/// Drops privileges (when root) and arranges for `sig` when the spawning thread dies. Runs in
/// the child between fork and exec: only plain system calls.
fn prepare(cmd: &mut Command, user: Option<(Uid, Gid)>, deathsig: Option<Signal>) {
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                nix::unistd::setgroups(&[gid]).map_err(std::io::Error::from)?;
                nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
                nix::unistd::setuid(uid).map_err(std::io::Error::from)?;
            }
            // After setuid: changing credentials clears the parent-death signal.
            if let Some(sig) = deathsig {
                nix::sys::prctl::set_pdeathsig(sig).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}

fn start() -> Result<Cluster, String> {
    let bin_dir = find_bin_dir()?;
    let user = run_as();
    // As root the server runs as `nobody`, which must be able to reach the directory: use /tmp
    // rather than a $TMPDIR that may sit under a private home.
    let parent = if user.is_some() && Path::new("/tmp").is_dir() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("smithers-pg-test-")
        .tempdir_in(&parent)
        .map_err(|e| format!("tempdir: {e}"))?
        .keep();
    let data = dir.join("data");
    if let Some((uid, gid)) = user {
        nix::unistd::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }

    let mut initdb = Command::new(bin_dir.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ])
        .current_dir(&dir)
        .stdin(Stdio::null());
    prepare(&mut initdb, user, None);
    let out = initdb
        .output()
        .map_err(|e| format!("run {}: {e}", bin_dir.join("initdb").display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!(
            "initdb failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    let port = free_port()?;
    let log_path = dir.join("postgres.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("log file: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("log file: {e}"))?;
    let mut server = Command::new(bin_dir.join("postgres"));
    server
        .arg("-D")
        .arg(&data)
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(&dir)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=32MB",
        ])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    prepare(&mut server, user, Some(Signal::SIGKILL));

    // The parent-death signal is tied to the spawning thread: spawn from a thread that lives
    // as long as the process.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("postgres-test-cluster".into())
        .spawn(move || {
            let spawned = server.spawn();
            let ok = spawned.is_ok();
            let _ = tx.send(spawned.map(|c| c.id()));
            if ok {
                loop {
                    std::thread::park();
                }
            }
        })
        .map_err(|e| format!("spawn thread: {e}"))?;
    let pid = match rx.recv() {
        Ok(Ok(pid)) => i32::try_from(pid).map_err(|e| format!("pid: {e}"))?,
        Ok(Err(e)) => return Err(format!("start postgres: {e}")),
        Err(e) => return Err(format!("start postgres: {e}")),
    };
    let cluster = Cluster {
        port,
        dir: dir.clone(),
        bin_dir,
        pid,
    };
    // SAFETY: registers a plain extern "C" function without captured state.
    unsafe {
        nix::libc::atexit(stop_at_exit);
    }

    // Ready when postmaster.pid says so.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = std::fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
        if status.lines().any(|l| l.trim() == "ready") {
            return Ok(cluster);
        }
        if let Ok(st) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG))
            && st != nix::sys::wait::WaitStatus::StillAlive
        {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("postgres exited during startup ({st:?}): {log}"));
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!("postgres did not become ready within 60s: {log}"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

extern "C" fn stop_at_exit() {
    let Some(Ok(c)) = CLUSTER.get() else {
        return;
    };
    let pid = Pid::from_raw(c.pid);
    // Immediate shutdown: the data is thrown away anyway.
    if kill(pid, Signal::SIGQUIT).is_ok() {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    let _ = kill(pid, Signal::SIGKILL);
                    let _ = waitpid(pid, None);
                    break;
                }
                _ => break,
            }
        }
    }
    let _ = std::fs::remove_dir_all(&c.dir);
}
