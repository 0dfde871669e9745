//! The writer thread's statements, prepared once and kept for the life of its connection.
//!
//! rusqlite's `prepare_cached` trims and hashes the SQL text to take a statement out of its LRU
//! cache, copies the text into a fresh `Arc<str>`, and hashes it again to put it back: about
//! 5 % of the server's instructions when runs are created, where the writer thread is what
//! every request waits for. The writer's SQL is fixed text, so where that text lives is key
//! enough, and a lookup is a few comparisons.

use rusqlite::{Connection, PrepFlags, Statement};

/// What tells one kept statement from another.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Key {
    /// Fixed SQL text, by address and length.
    Text(usize, usize),
    /// A `_smithers_runs` update, by the set of columns it assigns.
    RunPatch(u16),
}

impl Key {
    fn of(sql: &'static str) -> Key {
        Key::Text(sql.as_ptr() as usize, sql.len())
    }
}

/// The writer's connection with its statements. The number kept is bounded by the writer's code:
/// one per SQL text in it, plus one per combination of run columns an update assigns.
pub(super) struct Prepared<'c> {
    conn: &'c Connection,
    stmts: Vec<(Key, Statement<'c>)>,
    /// Statements used since the last `release`, by index (the first 64).
    used: u64,
}

impl<'c> Prepared<'c> {
    pub(super) fn new(conn: &'c Connection) -> Prepared<'c> {
        Prepared {
            conn,
            stmts: Vec::with_capacity(48),
            used: 0,
        }
    }

    pub(super) fn conn(&self) -> &'c Connection {
        self.conn
    }

    /// The statement for `sql`, prepared on first use.
    pub(super) fn get(&mut self, sql: &'static str) -> rusqlite::Result<&mut Statement<'c>> {
        self.get_or(Key::of(sql), || sql.to_owned())
    }

    /// The statement kept under `key`; `sql` builds its text the first time.
    pub(super) fn get_or(
        &mut self,
        key: Key,
        sql: impl FnOnce() -> String,
    ) -> rusqlite::Result<&mut Statement<'c>> {
        let i = match self.stmts.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let stmt = self
                    .conn
                    .prepare_with_flags(&sql(), PrepFlags::SQLITE_PREPARE_PERSISTENT)?;
                self.stmts.push((key, stmt));
                self.stmts.len() - 1
            }
        };
        if i < 64 {
            self.used |= 1 << i;
        }
        Ok(&mut self.stmts[i].1)
    }

    /// Drops the values bound since the last call, so a large payload is not held in memory
    /// until its statement runs again. Called once per transaction.
    pub(super) fn release(&mut self) {
        let mut used = std::mem::take(&mut self.used);
        while used != 0 {
            let i = used.trailing_zeros() as usize;
            used &= used - 1;
            self.stmts[i].1.clear_bindings();
        }
        for (_, stmt) in self.stmts.iter_mut().skip(64) {
            stmt.clear_bindings();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_prepared_once_and_reused() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (x TEXT)").unwrap();
        let mut p = Prepared::new(&conn);
        const INSERT: &str = "INSERT INTO t (x) VALUES (?1)";
        for v in ["a", "b", "c"] {
            p.get(INSERT).unwrap().execute([v]).unwrap();
        }
        assert_eq!(p.stmts.len(), 1);
        let n: i64 = p
            .get("SELECT COUNT(*) FROM t")
            .unwrap()
            .query_row([], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
        // a built statement is kept under its key, and its text is built only once
        let mut built = 0;
        for _ in 0..2 {
            p.get_or(Key::RunPatch(1), || {
                built += 1;
                "DELETE FROM t WHERE x = ?1".into()
            })
            .unwrap()
            .execute(["a"])
            .unwrap();
        }
        assert_eq!(built, 1);
        assert_eq!(p.stmts.len(), 3);
        p.release();
        assert_eq!(p.used, 0);
    }

    #[test]
    fn bad_sql_is_an_error_and_nothing_is_kept() {
        let conn = Connection::open_in_memory().unwrap();
        let mut p = Prepared::new(&conn);
        assert!(p.get("SELEKT 1").is_err());
        assert!(p.stmts.is_empty());
    }
}
