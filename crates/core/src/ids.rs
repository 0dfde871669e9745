//! The one identifier rule. A run id that `runs.create` (or `smithers up --run-id`) accepts is
//! accepted by every method and command that names a run, and nothing else is: ids travel into
//! SQL text columns, URLs, file names and log lines, so they are kept to a small, printable set.

use crate::error::{Code, Result, SmithersError};

/// Run ids, cron ids and workflow names: at most 256 characters.
pub const MAX_ID_LEN: usize = 256;

/// Characters an id may contain besides ASCII letters and digits.
const ID_PUNCTUATION: &[u8] = b"-_.:";

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || ID_PUNCTUATION.contains(&b))
}

fn refuse(what: &str) -> SmithersError {
    SmithersError::new(
        Code::InvalidInput,
        format!(
            "a {what} is 1 to {MAX_ID_LEN} characters of letters, digits, `-`, `_`, `.` and `:`"
        ),
    )
}

/// Checks a run id: 1–256 characters of `[A-Za-z0-9._:-]`. Generated ids (UUIDs) and subflow
/// child ids (`parent:child:node:iteration`) satisfy it.
pub fn check_run_id(id: &str) -> Result<()> {
    if is_id(id) {
        Ok(())
    } else {
        Err(refuse("run id"))
    }
}

/// Checks a cron id, by the same rule as run ids (schedule crons are `gateway:<key>`).
pub fn check_cron_id(id: &str) -> Result<()> {
    if is_id(id) {
        Ok(())
    } else {
        Err(refuse("cron id"))
    }
}

/// Whether `id` is a valid run id, for callers that answer with their own error code.
pub fn is_run_id(id: &str) -> bool {
    is_id(id)
}

/// Node ids: at most 128 characters, as `id:` in a workflow file.
pub const MAX_NODE_ID_LEN: usize = 128;

/// Loops a scoped node id may name (far more than any workflow nests).
const MAX_SCOPED_LOOPS: usize = 64;

fn is_plain_node_id(s: &str) -> bool {
    (1..=MAX_NODE_ID_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

/// Whether `id` names a node the engine may have stored rows under: a workflow id
/// (`[A-Za-z0-9_.-]`, 1–128, as `docs/workflows.md` allows; `:` too, which upstream's DevTools
/// pattern allows), optionally followed by the scope the engine adds inside two or more nested
/// loops (`work@@outer=1,mid=0`, see [`crate::tree::scoped_loop_id`]). Methods that look a node
/// up by id use this rule so that every id a frame or a snapshot shows can be asked about.
pub fn is_node_id(id: &str) -> bool {
    let (base, scope) = match id.split_once("@@") {
        Some((b, s)) => (b, Some(s)),
        None => (id, None),
    };
    if !is_plain_node_id(base) {
        return false;
    }
    let Some(scope) = scope else {
        return true;
    };
    let parts: Vec<&str> = scope.split(',').collect();
    parts.len() <= MAX_SCOPED_LOOPS
        && parts.iter().all(|p| {
            p.rsplit_once('=').is_some_and(|(loop_id, it)| {
                is_plain_node_id(loop_id)
                    && !it.is_empty()
                    && it.len() <= 10
                    && it.bytes().all(|b| b.is_ascii_digit())
                    && it.parse::<u32>().is_ok()
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_of_the_workflow_format_and_loop_scopes() {
        for ok in [
            "a",
            "lint.check",
            "build.v2",
            "ship-gate",
            "x_y",
            "task-a::0",
            "123",
            "work@@outer=1",
            "work@@outer=1,mid.v2=0",
            &"a".repeat(MAX_NODE_ID_LEN),
        ] {
            assert!(is_node_id(ok), "{ok:?}");
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "é",
            "a\0",
            "work@@",
            "work@@outer",
            "work@@outer=",
            "work@@outer=x",
            "work@@=1",
            "work@@outer=1,",
            "work@@outer=99999999999",
            "@@outer=1",
            "a@@b=1@@c=2",
            &"a".repeat(MAX_NODE_ID_LEN + 1),
        ] {
            assert!(!is_node_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn run_id_boundaries() {
        assert!(check_run_id("run-1:child:x:0").is_ok());
        assert!(check_run_id("Run.Upper:1").is_ok());
        assert!(check_run_id("3f0c8f2e-8a53-4f43-9d5a-0c8b6f1f2f10").is_ok());
        assert!(check_run_id(&"a".repeat(MAX_ID_LEN)).is_ok());
        assert!(check_run_id(&"a".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(check_run_id("").is_err());
        for bad in ["a b", "a/b", "a\0b", "é", "a\nb", "../x", "a%2f"] {
            assert!(check_run_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_do_not_echo_the_id() {
        let e = check_run_id("secret\0stuff").unwrap_err();
        assert_eq!(e.code, Code::InvalidInput);
        assert!(!e.message.contains("secret"));
    }

    #[test]
    fn cron_ids() {
        assert!(check_cron_id("gateway:nightly").is_ok());
        assert!(check_cron_id("").is_err());
        assert!(check_cron_id("x\0").is_err());
    }
}
