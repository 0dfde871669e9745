//! Leftover task processes of attempts whose engine died.
//!
//! Every process an attempt starts (a shell task's command, a CLI agent's turns) runs in its own
//! process group with `SMITHERS_ATTEMPT_ID=<uuid>` in its environment, which its descendants
//! inherit even when they leave the group (`setsid`). The attempt's metadata records that
//! marker and the host's boot id before the process starts (and the group id once it exists).
//! When a run is resumed or taken over on the same host (same boot id), the new driver kills
//! every live process whose `/proc/<pid>/environ` carries the marker of an unfinished earlier
//! attempt before it starts anything: PID and group reuse cannot make it hit a stranger, because
//! only the marker, read through a pidfd that pins the process, decides.

use serde_json::{Value, json};
use smithers_store::{AttemptRow, node_state};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Environment variable carrying an attempt's marker into its processes.
pub const MARKER_ENV: &str = "SMITHERS_ATTEMPT_ID";

/// How long a resumed attempt waits for killed leftovers to disappear.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// This boot of this host (`/proc/sys/kernel/random/boot_id`); None where it cannot be read.
pub fn boot_id() -> Option<&'static str> {
    static BOOT: OnceLock<Option<String>> = OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

/// A fresh marker for one attempt.
pub fn new_marker() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The `process` entry of an attempt's metadata: what recognises its processes later.
pub fn meta_entry(marker: &str) -> Option<Value> {
    boot_id().map(|b| json!({"marker": marker, "bootId": b}))
}

/// The marker of an attempt's processes, when they ran on this boot of this host.
pub fn marker_on_this_boot(meta: &Value) -> Option<&str> {
    let p = meta.get("process")?;
    let boot = p.get("bootId")?.as_str()?;
    if Some(boot) != boot_id() {
        return None;
    }
    p.get("marker").and_then(Value::as_str)
}

/// Kills the live processes of a run's unfinished attempts (in progress when their engine
/// died, or cancelled) that ran on this boot of this host, waits until they are gone (at most
/// [`KILL_WAIT`]) and logs what it killed.
pub async fn kill_for_attempts(run_id: &str, attempts: &[AttemptRow]) {
    let mut owners: HashMap<String, &AttemptRow> = HashMap::new();
    for a in attempts {
        if a.state != node_state::IN_PROGRESS && a.state != node_state::CANCELLED {
            continue;
        }
        let Some(meta) = a
            .meta_json
            .as_deref()
            .and_then(|m| serde_json::from_str::<Value>(m).ok())
        else {
            continue;
        };
        if let Some(m) = marker_on_this_boot(&meta) {
            owners.insert(m.to_string(), a);
        }
    }
    if owners.is_empty() {
        return;
    }
    let markers: HashSet<String> = owners.keys().cloned().collect();
    let done = tokio::task::spawn_blocking(move || kill(&markers, KILL_WAIT))
        .await
        .unwrap_or_default();
    for (marker, pids) in &done.killed {
        if let Some(a) = owners.get(marker) {
            tracing::warn!(
                run_id,
                node_id = %a.node_id,
                iteration = a.iteration,
                attempt = a.attempt,
                pids = ?pids,
                "killed leftover processes of an earlier attempt before the run goes on"
            );
        }
    }
    for (marker, pids) in &done.survivors {
        if let Some(a) = owners.get(marker) {
            tracing::error!(
                run_id,
                node_id = %a.node_id,
                iteration = a.iteration,
                attempt = a.attempt,
                pids = ?pids,
                "leftover processes of an earlier attempt survived SIGKILL (stuck in the kernel?); the run goes on without them"
            );
        }
    }
}

/// What [`kill`] did, per marker.
#[derive(Debug, Default)]
pub struct Killed {
    /// Pids that were sent SIGKILL.
    pub killed: BTreeMap<String, Vec<i32>>,
    /// Pids still alive when the wait ran out (stuck in the kernel, e.g. on a dead mount).
    pub survivors: BTreeMap<String, Vec<i32>>,
}

/// Kills every live process carrying one of `markers` and waits (at most `wait`) until none is
/// left. Blocking: call it from a blocking thread.
pub fn kill(markers: &HashSet<String>, wait: Duration) -> Killed {
    let mut out = Killed::default();
    if markers.is_empty() {
        return out;
    }
    let deadline = Instant::now() + wait;
    loop {
        let found = scan(markers);
        if found.is_empty() {
            out.survivors.clear();
            return out;
        }
        if Instant::now() >= deadline {
            for (pid, marker) in found {
                out.survivors.entry(marker).or_default().push(pid);
            }
            return out;
        }
        for (pid, marker) in found {
            if signal_if_marked(pid, &marker) {
                let pids = out.killed.entry(marker).or_default();
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live processes (not zombies) whose environment carries one of `markers`: (pid, marker).
fn scan(markers: &HashSet<String>) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        if let Some(m) = marker_of(pid).filter(|m| markers.contains(m)) {
            found.push((pid, m));
        }
    }
    found
}

/// The process exists and is not a zombie (a zombie cannot act; its parent reaps it).
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // the state follows the command name, which is in parentheses and may contain anything
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z") | Some("X") | Some("x"))
}

/// The value of `SMITHERS_ATTEMPT_ID` in a process's environment (unreadable: None).
fn marker_of(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{MARKER_ENV}=");
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Sends SIGKILL to `pid` if it still carries `marker`. The process is pinned with a pidfd
/// before its environment is checked, so a pid reused in between is never signalled.
fn signal_if_marked(pid: i32, marker: &str) -> bool {
    match pidfd::open(pid) {
        Some(fd) => {
            if marker_of(pid).as_deref() != Some(marker) {
                return false;
            }
            pidfd::kill(&fd)
        }
        // kernels without pidfds (before 5.3): check, then signal at once
        None => {
            marker_of(pid).as_deref() == Some(marker)
                && nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .is_ok()
        }
    }
}

mod pidfd {
    use std::os::fd::{FromRawFd, OwnedFd};

    /// A pidfd for `pid`; None when the process is gone or the kernel has no pidfds.
    pub fn open(pid: i32) -> Option<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it
        // touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
        Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// SIGKILL through the pidfd (fails when the process is gone).
    pub fn kill(fd: &OwnedFd) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal with a null siginfo and no flags reads nothing of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn spawn_marked(marker: &str) -> std::process::Child {
        Command::new("sleep")
            .arg("30")
            .env(MARKER_ENV, marker)
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    #[test]
    fn kills_only_processes_carrying_the_marker() {
        let (a, b) = (new_marker(), new_marker());
        let mut mine = spawn_marked(&a);
        let mut other = spawn_marked(&b);
        let mut plain = Command::new("sleep").arg("30").spawn().unwrap();
        let markers: HashSet<String> = [a.clone()].into();
        let k = kill(&markers, Duration::from_secs(5));
        assert_eq!(k.killed.get(&a), Some(&vec![mine.id() as i32]));
        assert!(k.survivors.is_empty());
        assert!(mine.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(
            other.try_wait().unwrap().is_none(),
            "another attempt's process lives"
        );
        assert!(
            plain.try_wait().unwrap().is_none(),
            "an unmarked process lives"
        );
        let _ = other.kill();
        let _ = plain.kill();
        let _ = other.wait();
        let _ = plain.wait();
    }

    #[test]
    fn finds_descendants_that_left_the_group() {
        let m = new_marker();
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // the grandchild starts a new session: it is in no group of ours, only the marker says
        // whose it is
        let mut sh = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "setsid sh -c 'echo $$ > {}; exec sleep 30' &",
                pidfile.display()
            ))
            .env(MARKER_ENV, &m)
            .spawn()
            .unwrap();
        sh.wait().unwrap();
        let t0 = Instant::now();
        let pid: i32 = loop {
            if let Some(p) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(alive(pid));
        let k = kill(&[m.clone()].into(), Duration::from_secs(5));
        assert_eq!(k.killed.get(&m), Some(&vec![pid]));
        assert!(!alive(pid), "the escaped process is gone");
    }

    #[test]
    fn meta_entry_round_trips_on_this_boot_only() {
        let meta = json!({"process": meta_entry("abc")});
        assert_eq!(marker_on_this_boot(&meta), Some("abc"));
        let other = json!({"process": {"marker": "abc", "bootId": "another-boot"}});
        assert_eq!(marker_on_this_boot(&other), None);
        assert_eq!(marker_on_this_boot(&json!({"kind": "run"})), None);
    }
}
