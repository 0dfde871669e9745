//! A diff bundle between two tree-ish ids, read-only: `git diff-tree` twice — once `-z --raw`
//! for exact paths and statuses, once `-p --binary` for the patch text — and the patch split
//! into one entry per file.

use super::{FilePatch, MAX_BYTES, Operation};
use crate::vcs::git::{self, GitError, Opts};
use base64::Engine as _;
use std::path::Path;
use std::time::Duration;

/// A diff computation may take this long per git command.
const DIFF_TIMEOUT: Duration = Duration::from_secs(60);

/// One entry of `git diff-tree -r -z --raw`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawEntry {
    old_mode: u32,
    new_mode: u32,
    new_id: String,
    status: u8,
    path: String,
    old_path: Option<String>,
}

impl RawEntry {
    /// `git diff -p` shows a change between a file, a symlink and a submodule as a deletion and
    /// a creation: two `diff --git` sections for one raw entry.
    fn sections(&self) -> usize {
        if self.old_mode != 0
            && self.new_mode != 0
            && (self.old_mode & 0o170000) != (self.new_mode & 0o170000)
        {
            2
        } else {
            1
        }
    }
}

/// Why patches could not be produced.
#[derive(Debug)]
pub(crate) enum PatchError {
    Git(GitError),
    /// The patch text alone is larger than the bundle may be.
    TooLarge,
    /// git's output did not have the expected shape.
    Parse(String),
}

impl From<GitError> for PatchError {
    fn from(e: GitError) -> Self {
        match e {
            GitError::TooLarge => PatchError::TooLarge,
            e => PatchError::Git(e),
        }
    }
}

/// The per-file patches from `base` to `target` (tree or commit ids) in the repository at
/// `root`. Binary files carry a git binary patch in `diff` (so the concatenated diffs apply
/// with `git apply`) and, unless deleted, their new content base64-encoded in `binaryContent`.
pub(crate) async fn patches(
    root: &Path,
    base: &str,
    target: &str,
) -> Result<Vec<FilePatch>, PatchError> {
    for id in [base, target] {
        if !git::is_object_id(id) {
            return Err(PatchError::Parse(format!("`{id}` is not a git object id")));
        }
    }
    let opts = Opts {
        index: None,
        timeout: DIFF_TIMEOUT,
        max_stdout: MAX_BYTES,
    };
    let raw = git::run(
        root,
        &["diff-tree", "-r", "-z", "-M", "--no-abbrev", base, target],
        opts,
    )
    .await?;
    let entries = parse_raw(&raw)?;
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let text = git::run(
        root,
        &[
            "diff-tree",
            "-r",
            "-p",
            "-M",
            "--binary",
            "--full-index",
            "--no-color",
            "--no-ext-diff",
            "--no-textconv",
            "--src-prefix=a/",
            "--dst-prefix=b/",
            base,
            target,
        ],
        opts,
    )
    .await?;
    let sections = split_sections(&text);
    let wanted: usize = entries.iter().map(RawEntry::sections).sum();
    if sections.len() != wanted {
        return Err(PatchError::Parse(format!(
            "git diff-tree listed {} changes but printed {} patch sections",
            wanted,
            sections.len()
        )));
    }
    let mut budget = MAX_BYTES.saturating_sub(text.len());
    let mut out = Vec::with_capacity(entries.len());
    let mut next = sections.into_iter();
    for e in entries {
        let mut bytes: Vec<u8> = Vec::new();
        for _ in 0..e.sections() {
            if let Some(s) = next.next() {
                bytes.extend_from_slice(s);
            }
        }
        let binary = is_binary_patch(&bytes);
        let diff = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        // the exact new content of binary files, and of text the UTF-8 diff cannot carry
        let needs_content = binary || diff.contains('\u{FFFD}');
        let operation = match e.status {
            b'A' | b'C' => Operation::Add,
            b'D' => Operation::Delete,
            b'R' => Operation::Rename,
            _ => Operation::Modify,
        };
        let binary_content = if needs_content && operation != Operation::Delete {
            let max = budget / 4 * 3;
            let blob = git::run(
                root,
                &["cat-file", "blob", &e.new_id],
                Opts {
                    max_stdout: max,
                    ..opts
                },
            )
            .await?;
            let encoded = base64::engine::general_purpose::STANDARD.encode(&blob);
            budget = budget.saturating_sub(encoded.len());
            Some(encoded)
        } else {
            None
        };
        out.push(FilePatch {
            path: e.path,
            operation,
            diff,
            old_path: e.old_path,
            binary_content,
        });
    }
    Ok(out)
}

/// Parses `git diff-tree -r -z --raw` output:
/// `:<old mode> <new mode> <old id> <new id> <status>[score] NUL <path> NUL [<new path> NUL]`.
fn parse_raw(raw: &[u8]) -> Result<Vec<RawEntry>, PatchError> {
    let bad = |what: &str| PatchError::Parse(format!("unexpected git diff-tree output: {what}"));
    let mut fields = raw.split(|b| *b == 0).peekable();
    let mut out = Vec::new();
    while let Some(head) = fields.next() {
        if head.is_empty() && fields.peek().is_none() {
            break;
        }
        let head = std::str::from_utf8(head).map_err(|_| bad("header is not text"))?;
        let head = head.strip_prefix(':').ok_or_else(|| bad(head))?;
        let parts: Vec<&str> = head.split(' ').collect();
        let [old_mode, new_mode, _old_id, new_id, status] = parts.as_slice() else {
            return Err(bad(head));
        };
        let mode = |m: &str| u32::from_str_radix(m, 8).map_err(|_| bad(head));
        let status = *status.as_bytes().first().ok_or_else(|| bad(head))?;
        let first = fields.next().ok_or_else(|| bad("missing path"))?;
        let first = String::from_utf8_lossy(first).into_owned();
        let (path, old_path) = if matches!(status, b'R' | b'C') {
            let second = fields.next().ok_or_else(|| bad("missing new path"))?;
            (String::from_utf8_lossy(second).into_owned(), Some(first))
        } else {
            (first, None)
        };
        out.push(RawEntry {
            old_mode: mode(old_mode)?,
            new_mode: mode(new_mode)?,
            new_id: new_id.to_string(),
            status,
            path,
            old_path,
        });
    }
    Ok(out)
}

/// Splits patch text at every line starting with `diff --git ` (no content line can: content
/// lines carry a ` `, `+`, `-` or `\` prefix, and binary patch lines have no spaces).
fn split_sections(text: &[u8]) -> Vec<&[u8]> {
    const HEAD: &[u8] = b"diff --git ";
    let mut starts = Vec::new();
    let mut at = 0;
    while at < text.len() {
        if text[at..].starts_with(HEAD) {
            starts.push(at);
        }
        match text[at..].iter().position(|b| *b == b'\n') {
            Some(n) => at += n + 1,
            None => break,
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (i, s) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(text.len());
        out.push(&text[*s..end]);
    }
    out
}

/// Whether a section is a binary patch (`GIT binary patch`, or `Binary files … differ` when git
/// could not produce one).
fn is_binary_patch(section: &[u8]) -> bool {
    section.split(|b| *b == b'\n').any(|line| {
        line == b"GIT binary patch"
            || (line.starts_with(b"Binary files ") && line.ends_with(b" differ"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_entries_with_renames_and_odd_paths() {
        let z = "0000000000000000000000000000000000000000";
        let a = "d5d0b8b4c4c9e936890870f6799cfbb5ba984470";
        let raw = format!(
            ":000000 100644 {z} {a} A\0new file.txt\0:100644 100644 {a} {a} R082\0old\0ren amed \"q\".txt\0:100644 120000 {a} {a} T\0typ\0"
        );
        let e = parse_raw(raw.as_bytes()).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!((e[0].status, e[0].path.as_str()), (b'A', "new file.txt"));
        assert_eq!(e[0].sections(), 1);
        assert_eq!(e[1].path, "ren amed \"q\".txt");
        assert_eq!(e[1].old_path.as_deref(), Some("old"));
        assert_eq!(e[2].sections(), 2);
        assert!(parse_raw(b"").unwrap().is_empty());
        assert!(parse_raw(b":bogus\0x\0").is_err());
    }

    #[test]
    fn sections_split_at_diff_headers_only() {
        let text = b"diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-diff --git a/y b/y\n+z\ndiff --git a/q b/q\nnew file mode 100644\n";
        let s = split_sections(text);
        assert_eq!(s.len(), 2);
        assert!(s[0].ends_with(b"+z\n"));
        assert!(s[1].starts_with(b"diff --git a/q"));
        assert!(split_sections(b"").is_empty());
    }

    #[test]
    fn binary_sections_are_recognised() {
        assert!(is_binary_patch(
            b"diff --git a/b b/b\nindex 1..2\nGIT binary patch\nliteral 3\n"
        ));
        assert!(is_binary_patch(
            b"diff --git a/b b/b\nBinary files a/b and b/b differ\n"
        ));
        assert!(!is_binary_patch(b"diff --git a/b b/b\n+GIT binary patch\n"));
    }
}
