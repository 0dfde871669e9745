//! The CHANGES column of `smithers frames`: a frame's node state changes (computed by
//! `smithers_engine::frames::changes`) grouped by what happened, e.g.
//! `started: lint, test; finished: build`, so a user can see which frame to fork or rewind from.

use smithers_engine::frames::changes::NodeChange;

/// Names shown per group before the rest are counted (`+3 more`), to keep the table readable.
const NAMES_PER_GROUP: usize = 5;

/// Groups in the order they are printed; other states follow, by name.
const ORDER: &[&str] = &[
    "started",
    "finished",
    "failed",
    "waiting-approval",
    "waiting-event",
    "waiting-timer",
    "cancelled",
    "skipped",
    "pending",
    "removed",
    "added",
];

/// What happened to a node, as the group it is listed under: the state it reached (`started`
/// for `in-progress`), `added` for a node that first appears as pending, `removed` for one that
/// is gone.
fn group(c: &NodeChange) -> String {
    match (c.from.as_deref(), c.to.as_deref()) {
        (_, None) => "removed".into(),
        (None, Some("pending")) => "added".into(),
        (_, Some("in-progress")) => "started".into(),
        (_, Some(s)) => s.to_string(),
    }
}

/// `build`, or `step#2` inside a loop (iteration 2).
fn name(c: &NodeChange) -> String {
    if c.iteration == 0 {
        c.node_id.clone()
    } else {
        format!("{}#{}", c.node_id, c.iteration)
    }
}

/// `started: lint, test; finished: build` (empty when nothing changed).
pub fn summary(changes: &[NodeChange]) -> String {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for c in changes {
        let g = group(c);
        match groups.iter_mut().find(|(k, _)| *k == g) {
            Some((_, names)) => names.push(name(c)),
            None => groups.push((g, vec![name(c)])),
        }
    }
    let rank = |g: &str| ORDER.iter().position(|o| *o == g).unwrap_or(ORDER.len());
    groups.sort_by(|(a, _), (b, _)| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    groups
        .into_iter()
        .map(|(g, names)| {
            let mut shown = names
                .iter()
                .take(NAMES_PER_GROUP)
                .cloned()
                .collect::<Vec<_>>();
            if names.len() > NAMES_PER_GROUP {
                shown.push(format!("+{} more", names.len() - NAMES_PER_GROUP));
            }
            format!("{g}: {}", shown.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, it: i64, from: Option<&str>, to: Option<&str>) -> NodeChange {
        NodeChange::new(id, it, from, to)
    }

    #[test]
    fn groups_in_a_fixed_order() {
        let changes = [
            c("build", 0, Some("in-progress"), Some("finished")),
            c("lint", 0, Some("pending"), Some("in-progress")),
            c("gate", 0, Some("pending"), Some("waiting-approval")),
            c("test", 0, Some("pending"), Some("in-progress")),
            c("step", 2, None, Some("pending")),
            c("old", 0, Some("finished"), None),
            c("ci", 0, Some("waiting-event"), Some("skipped")),
            c("x", 0, Some("pending"), Some("strange")),
        ];
        assert_eq!(
            summary(&changes),
            "started: lint, test; finished: build; waiting-approval: gate; skipped: ci; \
             removed: old; added: step#2; strange: x"
        );
        assert_eq!(summary(&[]), "");
    }

    #[test]
    fn long_groups_are_cut() {
        let changes: Vec<_> = (0..8)
            .map(|i| c(&format!("n{i}"), 0, None, Some("pending")))
            .collect();
        assert_eq!(summary(&changes), "added: n0, n1, n2, n3, n4, +3 more");
    }
}
