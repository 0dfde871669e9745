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

#[cfg(test)]
mod tests {
    use super::*;

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
