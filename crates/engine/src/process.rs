//! Shell tasks: one child process per attempt, in its own process group so a timeout or a
//! cancellation kills everything it started. Output streams back while it runs. What a killed
//! engine leaves behind (the group outlives its leader's PDEATHSIG) is found again by the
//! attempt's marker in the environment, see [`crate::leftovers`].

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use smithers_core::tree::Command as Cmd;
use smithers_core::{Code, SmithersError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// Largest stdout a task may produce (bytes); more fails the attempt.
pub const MAX_STDOUT_BYTES: usize = 16 * 1024 * 1024;
/// How much of stderr is kept for the error message.
const STDERR_TAIL: usize = 2048;

pub struct ProcSpec {
    pub command: Cmd,
    pub cwd: PathBuf,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: Option<u64>,
    /// Kill the process group when it prints nothing (stdout or stderr) for this long.
    pub idle_timeout_ms: Option<u64>,
}

#[derive(Debug)]
pub struct ProcOutput {
    pub stdout: String,
    pub exit_code: i32,
    /// Process group id (= pid of the leader), recorded so a later engine can kill leftovers.
    pub pgid: i32,
}

/// A chunk of output while the process runs.
#[derive(Debug)]
pub struct Chunk {
    pub stream: &'static str,
    pub text: String,
}

/// What a process left behind, whatever its exit status (agents read stdout even when the
/// CLI failed: the error is often reported there).
#[derive(Debug)]
pub struct RawOutput {
    pub stdout: String,
    /// The last bytes of stderr, for error messages.
    pub stderr_tail: String,
    pub status: std::process::ExitStatus,
    /// Stdout went past [`MAX_STDOUT_BYTES`]; `stdout` holds the first part only.
    pub too_big: bool,
    /// Process group id (= pid of the leader).
    pub pgid: i32,
}

/// Runs one attempt. `cancel` turning true kills the process group (TASK_ABORTED); the
/// timeout does the same (TASK_TIMEOUT). `started` receives the pgid as soon as it exists.
pub async fn run(
    spec: ProcSpec,
    cancel: watch::Receiver<bool>,
    chunks: mpsc::UnboundedSender<Chunk>,
    started: impl FnOnce(i32),
) -> Result<ProcOutput, SmithersError> {
    let raw = run_raw(&spec, None, cancel, chunks, started).await?;
    if !raw.status.success() {
        let code = raw
            .status
            .code()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "a signal".into());
        let mut msg = format!("`{}` exited with {code}", describe(&spec.command));
        if !raw.stderr_tail.is_empty() {
            msg.push_str(&format!("; stderr: {}", raw.stderr_tail));
        }
        return Err(SmithersError::new(Code::ProcessFailed, msg));
    }
    if raw.too_big {
        return Err(SmithersError::new(
            Code::OutputTooLarge,
            format!(
                "`{}` wrote more than {MAX_STDOUT_BYTES} bytes to stdout",
                describe(&spec.command)
            ),
        ));
    }
    Ok(ProcOutput {
        stdout: raw.stdout,
        exit_code: raw.status.code().unwrap_or(0),
        pgid: raw.pgid,
    })
}

/// Runs a process to its end and reports how it ended without judging the exit status.
/// `stdin`, when given, is written to the process and then closed; otherwise stdin is empty.
/// Errors only when the process cannot start, times out or is cancelled (in the last two cases
/// the whole process group is killed first).
pub async fn run_raw(
    spec: &ProcSpec,
    stdin: Option<Vec<u8>>,
    mut cancel: watch::Receiver<bool>,
    chunks: mpsc::UnboundedSender<Chunk>,
    started: impl FnOnce(i32),
) -> Result<RawOutput, SmithersError> {
    let mut cmd = match &spec.command {
        Cmd::Shell(s) => {
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c").arg(s);
            c
        }
        Cmd::Argv(argv) => {
            let Some((prog, args)) = argv.split_first() else {
                return Err(
                    SmithersError::new(Code::ProcessSpawnFailed, "empty command").terminal(),
                );
            };
            let mut c = tokio::process::Command::new(prog);
            c.args(args);
            c
        }
    };
    cmd.current_dir(&spec.cwd)
        .envs(&spec.env)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe. It makes the child die with the engine; its descendants do not, and
    // are killed by marker before the run is driven again (`leftovers`).
    unsafe {
        cmd.pre_exec(|| {
            let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        SmithersError::new(
            Code::ProcessSpawnFailed,
            format!(
                "cannot start `{}` in `{}`: {e}",
                describe(&spec.command),
                spec.cwd.display()
            ),
        )
    })?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    started(pid);
    if let (Some(bytes), Some(mut input)) = (stdin, child.stdin.take()) {
        // a child that exits without reading its input is not an error here: its exit status
        // tells what happened
        tokio::spawn(async move {
            let _ = input.write_all(&bytes).await;
            let _ = input.shutdown().await;
        });
    }
    let out = child.stdout.take();
    let err = child.stderr.take();
    let tx_out = chunks.clone();
    // when output was last seen, in ms since `t0`, for the idle timeout
    let t0 = std::time::Instant::now();
    let last_output = Arc::new(AtomicU64::new(0));
    let (seen_out, seen_err) = (last_output.clone(), last_output.clone());
    let out_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut too_big = false;
        if let Some(mut s) = out {
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        seen_out.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                        let _ = tx_out.send(Chunk {
                            stream: "stdout",
                            text: String::from_utf8_lossy(&chunk[..n]).into_owned(),
                        });
                        if buf.len() + n > MAX_STDOUT_BYTES {
                            too_big = true;
                        } else {
                            buf.extend_from_slice(&chunk[..n]);
                        }
                    }
                }
            }
        }
        (buf, too_big)
    });
    let err_task = tokio::spawn(async move {
        let mut tail: Vec<u8> = Vec::new();
        if let Some(mut s) = err {
            let mut chunk = vec![0u8; 8 * 1024];
            loop {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        seen_err.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                        let _ = chunks.send(Chunk {
                            stream: "stderr",
                            text: String::from_utf8_lossy(&chunk[..n]).into_owned(),
                        });
                        tail.extend_from_slice(&chunk[..n]);
                        if tail.len() > STDERR_TAIL * 2 {
                            tail.drain(..tail.len() - STDERR_TAIL);
                        }
                    }
                }
            }
        }
        tail
    });

    let timeout = async {
        match spec.timeout_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending::<()>().await,
        }
    };
    let idle = async {
        let Some(limit) = spec.idle_timeout_ms else {
            return std::future::pending::<()>().await;
        };
        loop {
            let quiet_for = (t0.elapsed().as_millis() as u64)
                .saturating_sub(last_output.load(Ordering::Relaxed));
            if quiet_for >= limit {
                return;
            }
            tokio::time::sleep(Duration::from_millis(limit - quiet_for)).await;
        }
    };
    let cancelled = async {
        loop {
            if *cancel.borrow() {
                return;
            }
            if cancel.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let outcome = tokio::select! {
        status = child.wait() => Ok(status),
        _ = timeout => Err(SmithersError::new(
            Code::TaskTimeout,
            format!("`{}` did not finish within {} ms; its process group was killed", describe(&spec.command), spec.timeout_ms.unwrap_or(0)),
        )),
        _ = cancelled => Err(SmithersError::new(Code::TaskAborted, "task was cancelled; its process group was killed")),
        _ = idle => Err(SmithersError::new(
            Code::TaskIdleTimeout,
            format!("`{}` printed nothing for {} ms; its process group was killed", describe(&spec.command), spec.idle_timeout_ms.unwrap_or(0)),
        )),
    };
    // kill whatever is left in the group (background children, or everything on timeout/cancel)
    kill_group(pid);
    let _ = child.wait().await;
    let status = outcome?;
    let (stdout, too_big) = out_task.await.unwrap_or_default();
    let tail = err_task.await.unwrap_or_default();
    let status = status.map_err(|e| {
        SmithersError::new(
            Code::ProcessFailed,
            format!("waiting for the task failed: {e}"),
        )
    })?;
    let stderr_tail = String::from_utf8_lossy(&tail[tail.len().saturating_sub(STDERR_TAIL)..])
        .trim()
        .to_string();
    Ok(RawOutput {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr_tail,
        status,
        too_big,
        pgid: pid,
    })
}

/// Kills a process group (no-op for 0 or a group that is already gone).
pub fn kill_group(pgid: i32) {
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

fn describe(c: &Cmd) -> String {
    let s = match c {
        Cmd::Shell(s) => s.clone(),
        Cmd::Argv(a) => a.join(" "),
    };
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmd: &str, timeout_ms: Option<u64>) -> ProcSpec {
        ProcSpec {
            command: Cmd::Shell(cmd.into()),
            cwd: std::env::temp_dir(),
            env: BTreeMap::new(),
            timeout_ms,
            idle_timeout_ms: None,
        }
    }

    async fn go(s: ProcSpec) -> Result<ProcOutput, SmithersError> {
        let (_tx, rx) = watch::channel(false);
        let (ctx, _crx) = mpsc::unbounded_channel();
        run(s, rx, ctx, |_| {}).await
    }

    #[tokio::test]
    async fn captures_stdout_and_failure_tail() {
        let o = go(spec("echo hi", None)).await.unwrap();
        assert_eq!(o.stdout, "hi\n");
        let e = go(spec("echo boom >&2; exit 3", None)).await.unwrap_err();
        assert_eq!(e.code, Code::ProcessFailed);
        assert!(
            e.message.contains("exited with 3") && e.message.contains("boom"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("alive");
        let cmd = format!("(sleep 1; touch {}) & sleep 5", marker.display());
        let t0 = std::time::Instant::now();
        let e = go(spec(&cmd, Some(200))).await.unwrap_err();
        assert_eq!(e.code, Code::TaskTimeout);
        assert!(t0.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(!marker.exists(), "a grandchild survived the timeout");
    }

    #[tokio::test]
    async fn cancel_kills() {
        let (tx, rx) = watch::channel(false);
        let (ctx, _crx) = mpsc::unbounded_channel();
        let h = tokio::spawn(run(spec("sleep 5", None), rx, ctx, |_| {}));
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(true).unwrap();
        let e = h.await.unwrap().unwrap_err();
        assert_eq!(e.code, Code::TaskAborted);
    }

    #[tokio::test]
    async fn raw_run_feeds_stdin_and_keeps_stdout_of_a_failure() {
        let (_tx, rx) = watch::channel(false);
        let (ctx, _crx) = mpsc::unbounded_channel();
        let s = spec("tr a-z A-Z; echo oops >&2; exit 4", None);
        let o = run_raw(&s, Some(b"hello".to_vec()), rx, ctx, |_| {})
            .await
            .unwrap();
        assert_eq!(o.stdout, "HELLO");
        assert_eq!(o.stderr_tail, "oops");
        assert_eq!(o.status.code(), Some(4));
        assert!(!o.too_big);
    }

    #[tokio::test]
    async fn missing_program_is_a_clear_error() {
        let s = ProcSpec {
            command: Cmd::Argv(vec!["/nonexistent/prog".into()]),
            cwd: std::env::temp_dir(),
            env: BTreeMap::new(),
            timeout_ms: None,
            idle_timeout_ms: None,
        };
        let e = go(s).await.unwrap_err();
        assert_eq!(e.code, Code::ProcessSpawnFailed);
    }
}
