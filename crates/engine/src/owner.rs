//! Run ownership: who drives a run. An owner id is `pid:<pid>:<uuid>:<host>`, so an engine on
//! the same host can tell a dead owner (its process is gone) from a live one at once, without
//! waiting for the heartbeat to go stale.

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// A fresh owner id for this process.
pub fn new_owner_id() -> String {
    format!(
        "pid:{}:{}:{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple(),
        host()
    )
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Liveness of an owner as seen from this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerLiveness {
    /// Same host and the process exists.
    Alive,
    /// Same host and the process is gone.
    Dead,
    /// Another host, or an id we cannot parse: only the heartbeat can tell.
    Unknown,
}

/// Checks whether an owner's process is alive (same host only).
pub fn liveness(owner: &str) -> OwnerLiveness {
    let parts: Vec<&str> = owner.splitn(4, ':').collect();
    if parts.len() != 4 || parts[0] != "pid" || parts[3] != host() {
        return OwnerLiveness::Unknown;
    }
    let Ok(pid) = parts[1].parse::<i32>() else {
        return OwnerLiveness::Unknown;
    };
    if pid <= 0 {
        return OwnerLiveness::Unknown;
    }
    if pid as u32 == std::process::id() {
        return OwnerLiveness::Alive;
    }
    match kill(Pid::from_raw(pid), None) {
        Ok(()) | Err(Errno::EPERM) => OwnerLiveness::Alive,
        Err(_) => OwnerLiveness::Dead,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_id_is_alive_and_foreign_host_unknown() {
        let id = new_owner_id();
        assert_eq!(liveness(&id), OwnerLiveness::Alive);
        assert_eq!(
            liveness("pid:1:abc:some-other-host-xyz"),
            OwnerLiveness::Unknown
        );
        assert_eq!(liveness("garbage"), OwnerLiveness::Unknown);
    }

    #[test]
    fn exited_process_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let id = format!("pid:{pid}:x:{}", host());
        assert_eq!(liveness(&id), OwnerLiveness::Dead);
    }
}
