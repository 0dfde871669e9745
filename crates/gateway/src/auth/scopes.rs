//! Scopes: which methods a grant may call (gateway-protocol §2.5) and who may decide an approval
//! that lists `allowed_scopes`.

/// Access levels of §2.5, ordered by rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Read,
    Execute,
    Approve,
    Admin,
}

impl Level {
    /// A level by its exact name (`read`, `execute`, `approve`, `admin`).
    fn from_name(name: &str) -> Option<Level> {
        match name {
            "read" => Some(Level::Read),
            "execute" => Some(Level::Execute),
            "approve" => Some(Level::Approve),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }

    /// A granted level scope, whitespace-trimmed as upstream does.
    fn from_scope(scope: &str) -> Option<Level> {
        Level::from_name(scope.trim())
    }

    /// The highest level among granted scopes.
    fn highest(scopes: &[String]) -> Option<Level> {
        scopes.iter().filter_map(|s| Level::from_scope(s)).max()
    }
}

/// The level a method requires (§2.5 table): unknown methods need `read`, `config.*` `admin`.
pub fn required_level(method: &str) -> Level {
    match method {
        "runs.create"
        | "runs.cancel"
        | "runs.rerun"
        | "runs.resume"
        | "runs.fork"
        | "signals.send"
        | "cron.trigger"
        | "jumpToFrame"
        | "devtools.jumpToFrame" => Level::Execute,
        "approvals.decide" => Level::Approve,
        "cron.add" | "cron.remove" => Level::Admin,
        m if m.starts_with("config.") => Level::Admin,
        _ => Level::Read,
    }
}

/// Whether `scopes` allow calling `method` (§2.5 steps 1–4): the exact wildcard `"*"`, a level
/// scope of sufficient rank, the method name itself, or a `"<prefix>.*"` scope covering it.
pub fn has_scope(scopes: &[String], method: &str) -> bool {
    if scopes.iter().any(|s| s == "*") {
        return true;
    }
    if Level::highest(scopes).is_some_and(|level| level >= required_level(method)) {
        return true;
    }
    scopes.iter().any(|s| {
        s == method
            || s.strip_suffix(".*").is_some_and(|prefix| {
                method
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
            })
    })
}

/// Whether a caller holding `granted` may decide an approval whose `allowed_scopes` are
/// `listed` (an empty list restricts nothing). Upstream treats each entry as a method name, so
/// `allowed_scopes: [deploy]` lets any `approve` token through; here (a deliberate deviation,
/// docs/protocol.md) an entry is satisfied only by `"*"`, by holding that exact string, or, when
/// the entry is a level name, by a granted level at least as high.
pub fn approval_scope_allows(granted: &[String], listed: &[String]) -> bool {
    if listed.is_empty() || granted.iter().any(|s| s == "*") {
        return true;
    }
    let level = Level::highest(granted);
    listed.iter().any(|entry| {
        granted.iter().any(|g| g == entry)
            || Level::from_name(entry).is_some_and(|need| level.is_some_and(|have| have >= need))
    })
}

/// Splits a scope list on runs of commas and whitespace (upstream's `/[,\s]+/`), dropping empty
/// pieces.
pub(crate) fn split_scopes(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace() || c == '\u{feff}')
        .filter(|piece| !piece.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn required_levels() {
        for m in [
            "health",
            "runs.list",
            "runs.get",
            "runs.diff",
            "frames.list",
            "frames.get",
            "attempts.list",
            "attempts.get",
            "approvals.list",
            "cron.list",
            "workflows.list",
            "getNodeDiff",
            "devtools.getNodeDiff",
            "getNodeOutput",
            "devtools.getNodeOutput",
            "getDevToolsSnapshot",
            "streamDevTools",
            "connect",
            "unknown.method",
            "configure",
        ] {
            assert_eq!(required_level(m), Level::Read, "{m}");
        }
        for m in [
            "runs.create",
            "runs.cancel",
            "runs.rerun",
            "runs.resume",
            "signals.send",
            "cron.trigger",
            "jumpToFrame",
            "devtools.jumpToFrame",
        ] {
            assert_eq!(required_level(m), Level::Execute, "{m}");
        }
        assert_eq!(required_level("approvals.decide"), Level::Approve);
        for m in ["cron.add", "cron.remove", "config.x", "config.reload"] {
            assert_eq!(required_level(m), Level::Admin, "{m}");
        }
        assert!(
            Level::Read < Level::Execute
                && Level::Execute < Level::Approve
                && Level::Approve < Level::Admin
        );
    }

    #[test]
    fn scope_matching_table() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["*"], "cron.add", true),
            (&["*"], "config.x", true),
            (&[" *"], "runs.list", false),
            (&["* "], "runs.list", false),
            (&["read"], "runs.list", true),
            (&["read"], "runs.create", false),
            (&["read"], "unknown.thing", true),
            (&[" read "], "runs.get", true),
            (&["execute"], "runs.create", true),
            (&["execute"], "runs.list", true),
            (&["execute"], "approvals.decide", false),
            (&["\texecute\n"], "jumpToFrame", true),
            (&["approve"], "approvals.decide", true),
            (&["approve"], "cron.add", false),
            (&["admin"], "cron.add", true),
            (&["admin"], "config.x", true),
            (&["approve"], "config.x", false),
            (&["execute"], "config.x", false),
            (&["READ"], "runs.list", false),
            (&["runs.*"], "runs.create", true),
            (&["runs.*"], "runs.cancel", true),
            (&["runs.*"], "runs", false),
            (&["runs.*"], "runsx.create", false),
            (&["runs.*"], "frames.list", false),
            (&["devtools.*"], "devtools.getNodeOutput", true),
            (&["devtools.*"], "getNodeOutput", false),
            (&["devtools.*"], "devtools.jumpToFrame", true),
            (&["config.*"], "config.x", true),
            (&["runs.create"], "runs.create", true),
            (&["runs.create"], "runs.cancel", false),
            (&[" runs.create"], "runs.create", false),
            (&["cron.add"], "cron.add", true),
            (&["approve"], "approve", true),
            (&["approvals.decide"], "approve", false),
            (&[], "health", false),
            (&["", "nope"], "health", false),
            (&["nope", "admin"], "cron.remove", true),
        ];
        for (scopes, method, expected) in cases {
            assert_eq!(
                has_scope(&strings(scopes), method),
                *expected,
                "{scopes:?} {method}"
            );
        }
    }

    #[test]
    fn approval_scope_rule_table() {
        // (granted, listed, allowed)
        let cases: &[(&[&str], &[&str], bool)] = &[
            // no restriction
            (&[], &[], true),
            (&["read"], &[], true),
            // a custom scope needs that exact string or "*": no level covers it (upstream's hole)
            (&["approve"], &["deploy"], false),
            (&["admin"], &["deploy"], false),
            (&["read"], &["deploy"], false),
            (&["deploy"], &["deploy"], true),
            (&["*"], &["deploy"], true),
            (&[" deploy"], &["deploy"], false),
            (&["deploy.*"], &["deploy"], false),
            (&["deploy"], &["deploy.prod"], false),
            (&["approvals.decide"], &["deploy"], false),
            // any one entry suffices
            (&["qa"], &["deploy", "qa"], true),
            (&["approve"], &["deploy", "approve"], true),
            // level names compare by rank; granted levels are trimmed as in has_scope
            (&["approve"], &["approve"], true),
            (&["admin"], &["approve"], true),
            (&[" admin "], &["approve"], true),
            (&["execute"], &["approve"], false),
            (&["approve"], &["admin"], false),
            (&["read"], &["read"], true),
            (&["execute", "read"], &["execute"], true),
            // a listed level name is matched exactly, and other grants do not help
            (&["admin"], &["Admin"], false),
            (&["approve"], &[" approve"], false),
            (&["runs.*"], &["approve"], false),
            (&["approvals.decide"], &["approve"], false),
            (&[], &["read"], false),
        ];
        for (granted, listed, expected) in cases {
            assert_eq!(
                approval_scope_allows(&strings(granted), &strings(listed)),
                *expected,
                "granted {granted:?} listed {listed:?}"
            );
        }
    }

    #[test]
    fn scope_lists_split_on_commas_and_whitespace() {
        assert_eq!(split_scopes("a b,c ,\td,,"), strings(&["a", "b", "c", "d"]));
        assert!(split_scopes(" , \u{feff}").is_empty());
    }
}
