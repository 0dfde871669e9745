//! Running one git command: output captured (stdout bounded), a time limit, and an environment
//! that cannot redirect git to another repository, index or object store.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Variables that would make git act on something other than the repository of its working
/// directory (`git rev-parse --local-env-vars`). A Smithers process started from a git hook, for
/// example, inherits `GIT_DIR` and `GIT_INDEX_FILE`; its git commands must not follow them.
const LOCAL_ENV: &[&str] = &[
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_OBJECT_DIRECTORY",
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_IMPLICIT_WORK_TREE",
    "GIT_GRAFT_FILE",
    "GIT_INDEX_FILE",
    "GIT_NO_REPLACE_OBJECTS",
    "GIT_REPLACE_REF_BASE",
    "GIT_PREFIX",
    "GIT_SHALLOW_FILE",
    "GIT_COMMON_DIR",
];

/// Most stderr kept for an error message; the rest is read and dropped.
const STDERR_KEEP: usize = 16 * 1024;

/// How a git command failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitError {
    /// git could not be started (not installed, or the directory is gone).
    Spawn(String),
    /// A local file operation around git failed.
    Io(String),
    /// git ran and exited non-zero.
    Failed { command: String, stderr: String },
    /// The command ran longer than allowed and was killed.
    Timeout { command: String, secs: u64 },
    /// Stdout went past the allowed size; the command was killed.
    TooLarge,
}

impl std::fmt::Display for GitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitError::Spawn(e) => write!(f, "could not run git: {e}"),
            GitError::Io(e) => write!(f, "{e}"),
            GitError::Failed { command, stderr } if stderr.is_empty() => {
                write!(f, "`{command}` failed")
            }
            GitError::Failed { command, stderr } => write!(f, "`{command}` failed: {stderr}"),
            GitError::Timeout { command, secs } => {
                write!(f, "`{command}` did not finish within {secs} s")
            }
            GitError::TooLarge => write!(f, "git output exceeds the size limit"),
        }
    }
}

impl std::error::Error for GitError {}

/// Options of one command.
#[derive(Debug, Clone, Copy)]
pub struct Opts<'a> {
    /// `GIT_INDEX_FILE`: an index other than the repository's own.
    pub index: Option<&'a Path>,
    pub timeout: Duration,
    /// Largest stdout accepted (bytes); more is [`GitError::TooLarge`].
    pub max_stdout: usize,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            index: None,
            timeout: Duration::from_secs(60),
            max_stdout: 16 * 1024 * 1024,
        }
    }
}

/// Runs `git <args>` in `dir` and returns its stdout.
pub async fn run(dir: &Path, args: &[&str], opts: Opts<'_>) -> Result<Vec<u8>, GitError> {
    let command = format!("git {}", args.join(" "));
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for v in LOCAL_ENV {
        cmd.env_remove(v);
    }
    // no credential prompts, no optional lock taking by read commands, stable messages
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_OPTIONAL_LOCKS", "0")
        .env("LC_ALL", "C");
    if let Some(index) = opts.index {
        cmd.env("GIT_INDEX_FILE", index);
    }
    let mut child = cmd.spawn().map_err(|e| GitError::Spawn(e.to_string()))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let work = async {
        // stderr is drained on its own so a chatty command never blocks on a full pipe
        let err_task = tokio::spawn(read_capped(stderr, STDERR_KEEP));
        let (out, over) = read_stdout(stdout, opts.max_stdout).await;
        if over {
            let _ = child.start_kill();
        }
        let status = child.wait().await;
        let err = err_task.await.unwrap_or_default();
        (out, over, status, err)
    };
    let (out, over, status, err) =
        tokio::time::timeout(opts.timeout, work)
            .await
            .map_err(|_| GitError::Timeout {
                command: command.clone(),
                secs: opts.timeout.as_secs(),
            })?;
    if over {
        return Err(GitError::TooLarge);
    }
    let status = status.map_err(|e| GitError::Spawn(e.to_string()))?;
    if !status.success() {
        return Err(GitError::Failed {
            command,
            stderr: String::from_utf8_lossy(&err).trim().to_string(),
        });
    }
    Ok(out)
}

/// Reads stdout up to `max` bytes; true when there was more.
async fn read_stdout(stdout: Option<tokio::process::ChildStdout>, max: usize) -> (Vec<u8>, bool) {
    let Some(s) = stdout else {
        return (Vec::new(), false);
    };
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    if s.take(limit).read_to_end(&mut buf).await.is_err() {
        return (buf, false);
    }
    let over = buf.len() > max;
    buf.truncate(max);
    (buf, over)
}

/// Reads a stream to its end, keeping the first `keep` bytes.
async fn read_capped<R: AsyncRead + Unpin>(r: Option<R>, keep: usize) -> Vec<u8> {
    let Some(mut r) = r else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = keep.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}

/// Whether `s` looks like an object id (hex, SHA-1 or SHA-256 length): safe to pass to git as
/// an argument, never mistaken for an option or a revision expression.
pub fn is_object_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// First line of a command's output, trimmed.
pub fn first_line(out: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(out);
    let line = s.lines().next()?.trim();
    (!line.is_empty()).then(|| line.to_string())
}
