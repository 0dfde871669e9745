//! A throwaway PostgreSQL cluster for `smithers bench gateway --db postgres`: `initdb` into a
//! fresh temporary directory, `postgres` on a free local port with durable commits (the
//! server defaults `fsync`, `synchronous_commit` and `full_page_writes` stay on), stopped and
//! removed on drop.
//!
//! `initdb` and `postgres` refuse to run as root: as root both run as `nobody`. Should the
//! benchmark die without dropping the cluster, the server gets `SIGKILL` (a parent-death
//! signal, tied to the thread that spawned it, so a parked thread of its own spawns it).

use crate::bench_gateway::{R, err};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Server settings besides the defaults, as `-c` options; printed with the figures.
pub(crate) const SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("max_connections", "100"),
    ("shared_buffers", "128MB"),
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "on"),
];

/// Loaded when the server has it, to count statements per run.
const STATEMENTS_LIBRARY: &str = "pg_stat_statements";

pub(crate) struct TempCluster {
    dir: PathBuf,
    pid: i32,
    port: u16,
    bin_dir: PathBuf,
}

impl TempCluster {
    /// Runs `initdb` and starts the server; returns once it accepts connections.
    pub(crate) fn start() -> R<TempCluster> {
        let bin_dir = find_bin_dir()?;
        let user = run_as();
        // as `nobody` the server must reach its directory: /tmp rather than a private $TMPDIR
        let parent = if user.is_some() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = parent.join(format!(
            "smithers-bench-pg-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        if let Some((uid, gid)) = user {
            nix::unistd::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        let data = dir.join("data");
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .current_dir(&dir)
            .stdin(Stdio::null());
        drop_privileges(&mut initdb, user, false);
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
        let log = std::fs::File::create(&log_path).map_err(err)?;
        let log_err = log.try_clone().map_err(err)?;
        let mut server = Command::new(bin_dir.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&dir);
        for (name, value) in SETTINGS {
            server.arg("-c").arg(format!("{name}={value}"));
        }
        if has_statements_library(&bin_dir) {
            server
                .arg("-c")
                .arg(format!("shared_preload_libraries={STATEMENTS_LIBRARY}"));
        }
        server
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        drop_privileges(&mut server, user, true);
        let pid = spawn_on_own_thread(server)?;
        let cluster = TempCluster {
            dir,
            pid,
            port,
            bin_dir,
        };
        cluster.wait_ready(&data, &log_path)?;
        Ok(cluster)
    }

    fn wait_ready(&self, data: &Path, log: &Path) -> R<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pid_file = std::fs::read_to_string(data.join("postmaster.pid")).unwrap_or_default();
            if pid_file.lines().any(|l| l.trim() == "ready") {
                return Ok(());
            }
            if !self.alive() || Instant::now() > deadline {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                return Err(format!("postgres did not start: {text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server still runs (reaps it when it has ended).
    fn alive(&self) -> bool {
        matches!(
            waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)),
            Ok(WaitStatus::StillAlive)
        )
    }

    /// URL of database `db` as the superuser `postgres` (trust authentication).
    pub(crate) fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The postmaster's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Which server, for the report.
    pub(crate) fn describe(&self) -> String {
        let version = Command::new(self.bin_dir.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let settings: Vec<String> = SETTINGS
            .iter()
            .filter(|(n, _)| *n != "listen_addresses")
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        format!(
            "{version}, throwaway cluster in {}, {}",
            self.dir.display(),
            settings.join(" ")
        )
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.pid);
        // fast shutdown; the data is thrown away
        if kill(pid, Signal::SIGINT).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.alive() {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `$SMITHERS_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` with `initdb` and
/// `postgres`, else the directory of an `initdb` on `PATH`.
fn find_bin_dir() -> R<PathBuf> {
    let usable = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("SMITHERS_PG_BIN") {
        let d = PathBuf::from(d);
        return if usable(&d) {
            Ok(d)
        } else {
            Err(format!(
                "SMITHERS_PG_BIN={} has no initdb and postgres",
                d.display()
            ))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some((_, d)) = versions.into_iter().rev().find(|(_, d)| usable(d)) {
        return Ok(d);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for d in on_path {
        // Debian links /usr/bin/initdb elsewhere; postgres sits next to the real one
        let real = std::fs::canonicalize(d.join("initdb")).unwrap_or_default();
        if let Some(dir) = real.parent()
            && usable(dir)
        {
            return Ok(dir.to_path_buf());
        }
    }
    Err(
        "PostgreSQL server binaries (initdb, postgres) not found; install them (Debian: \
         apt-get install postgresql) or set SMITHERS_PG_BIN, or pass --db postgres://…"
            .into(),
    )
}

fn has_statements_library(bin_dir: &Path) -> bool {
    let lib = Command::new(bin_dir.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|_| bin_dir.join("../lib"));
    lib.join(format!("{STATEMENTS_LIBRARY}.so")).is_file()
}

fn free_port() -> R<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(err)?;
    Ok(l.local_addr().map_err(err)?.port())
}

/// `nobody` when running as root, else nobody to switch to.
fn run_as() -> Option<(Uid, Gid)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    match nix::unistd::User::from_name("nobody") {
        Ok(Some(u)) => Some((u.uid, u.gid)),
        _ => Some((Uid::from_raw(65534), Gid::from_raw(65534))),
    }
}

/// Switches to `user` (when given) and, with `die_with_parent`, asks for `SIGKILL` when the
/// spawning thread ends. Runs in the child between fork and exec: plain system calls only.
fn drop_privileges(cmd: &mut Command, user: Option<(Uid, Gid)>, die_with_parent: bool) {
    // SAFETY: the closure makes only async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                nix::unistd::setgroups(&[gid]).map_err(std::io::Error::from)?;
                nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
                nix::unistd::setuid(uid).map_err(std::io::Error::from)?;
            }
            // after setuid, which clears the parent-death signal
            if die_with_parent {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` from a thread that then parks for the rest of the process, so that the
/// parent-death signal (tied to the spawning thread) fires only when the process ends.
fn spawn_on_own_thread(mut cmd: Command) -> R<i32> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("bench-postgres".into())
        .spawn(move || {
            let spawned = cmd.spawn();
            let keep = spawned.is_ok();
            let _ = tx.send(spawned.map(|c| c.id()));
            if keep {
                loop {
                    std::thread::park();
                }
            }
        })
        .map_err(err)?;
    match rx.recv() {
        Ok(Ok(pid)) => i32::try_from(pid).map_err(err),
        Ok(Err(e)) => Err(format!("start postgres: {e}")),
        Err(e) => Err(format!("start postgres: {e}")),
    }
}

/// CPU time (ms) used so far by the postmaster and its live children (backends, WAL writer,
/// checkpointer…), including children that already ended and were reaped.
pub(crate) fn tree_cpu_ms(postmaster: u32) -> f64 {
    let mut total = 0.0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some(f) = stat_fields(pid) else { continue };
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // `f` starts at stat(5) field 3: ppid is field 4, utime…cstime fields 14–17
        if pid == postmaster {
            total += field(11) + field(12) + field(13) + field(14);
        } else if field(1) as u32 == postmaster {
            total += field(11) + field(12);
        }
    }
    // USER_HZ is 100 on Linux
    total * 10.0
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}
