//! Ids for runs the engine names itself (a caller may always give its own).

/// A new run id: a lower-case UUID, version 7, so ids grow with creation time. Every table
/// keyed by run id (runs, events, frames, snapshots, nodes, attempts, outputs, inputs) then
/// receives the runs created together in neighbouring pages. With random (version 4) ids each
/// run's rows land on pages of their own: with 64–256 runs in flight that halved throughput
/// (`bench gateway`, docs/benchmarks.md "Run ids"). Same shape as upstream's random UUIDs:
/// 36 characters of `[0-9a-f-]`.
pub fn new_run_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_uuid_shaped_and_grow_with_time() {
        let a = super::new_run_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::new_run_id();
        for id in [&a, &b] {
            assert_eq!(id.len(), 36);
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c) || c == '-')
            );
            assert!(uuid::Uuid::parse_str(id).is_ok());
        }
        assert!(a < b, "{a} then {b}");
    }
}
