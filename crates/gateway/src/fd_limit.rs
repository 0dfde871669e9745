//! The process's file-descriptor budget, and the TCP connection cap derived from it: every
//! accepted socket costs a descriptor, so the cap stays below the limit by a reserve kept for
//! the database, task processes and logs. (`smithers serve` raises the soft limit to the hard
//! one at start, as the Go runtime does.)

use nix::sys::resource::{Resource, getrlimit};

/// The smallest cap ever used, whatever the limit and reserve say: a gateway that cannot accept
/// anything is of no use, and a few connections fit in any sane descriptor limit.
pub const MIN_TCP_CAP: usize = 16;

/// The soft `RLIMIT_NOFILE` now in force.
pub fn soft_nofile() -> Option<u64> {
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// The cap on open TCP connections and, when the configured value could not be used as is, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpCap {
    pub cap: usize,
    pub warning: Option<String>,
}

/// `max_tcp_connections`: the configured value, or the descriptor limit minus `fd_reserve`,
/// and never above that budget (a cap past the descriptor limit would let accept fail with
/// `EMFILE` instead of the cap making room).
pub fn tcp_cap(configured: Option<usize>, fd_reserve: usize, soft_limit: Option<u64>) -> TcpCap {
    // no limit to read: a conservative budget rather than none at all
    let limit = soft_limit.map_or(1024, |s| usize::try_from(s).unwrap_or(usize::MAX));
    let budget = limit.saturating_sub(fd_reserve);
    match configured {
        Some(c) if c <= budget => TcpCap {
            cap: c,
            warning: None,
        },
        _ if budget < MIN_TCP_CAP => TcpCap {
            cap: MIN_TCP_CAP,
            warning: Some(format!(
                "the file-descriptor limit ({limit}) minus server.fd_reserve ({fd_reserve}) leaves {budget} TCP connections; using {MIN_TCP_CAP}. Raise the limit (ulimit -n) or lower fd_reserve"
            )),
        },
        Some(c) => TcpCap {
            cap: budget,
            warning: Some(format!(
                "server.max_tcp_connections = {c} does not fit the file-descriptor limit ({limit}) minus server.fd_reserve ({fd_reserve}); using {budget}. Raise the limit (ulimit -n) or lower the setting"
            )),
        },
        None => TcpCap {
            cap: budget,
            warning: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_limit_minus_the_reserve() {
        assert_eq!(tcp_cap(None, 256, Some(1024)).cap, 768);
        assert_eq!(tcp_cap(None, 256, Some(1024)).warning, None);
    }

    #[test]
    fn explicit_value_is_kept_below_the_budget() {
        assert_eq!(
            tcp_cap(Some(100), 256, Some(1024)),
            TcpCap {
                cap: 100,
                warning: None
            }
        );
        let t = tcp_cap(Some(5000), 256, Some(1024));
        assert_eq!(t.cap, 768);
        assert!(t.warning.unwrap().contains("max_tcp_connections = 5000"));
        // exactly the budget is fine
        assert_eq!(tcp_cap(Some(768), 256, Some(1024)).warning, None);
    }

    #[test]
    fn a_reserve_larger_than_the_limit_still_leaves_a_floor() {
        let t = tcp_cap(None, 256, Some(200));
        assert_eq!(t.cap, MIN_TCP_CAP);
        assert!(t.warning.is_some());
        // an explicit small value is the operator's choice
        assert_eq!(tcp_cap(Some(4), 256, Some(1024)).cap, 4);
    }
}
