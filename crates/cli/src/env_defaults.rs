//! `SMITHERS_URL` and `SMITHERS_DB`: defaults for where a command acts, so that a shell set up
//! once (`export SMITHERS_URL=http://gw:7331`) needs no `--url` on every command.
//!
//! Precedence: `--url`, then `--db` given on the command line, then `SMITHERS_URL` (for commands
//! with a remote mode), then `SMITHERS_DB`, then the default database. `serve` reads
//! `SMITHERS_DB` itself (between its flags and its config file).

use crate::Cmd;
use crate::remote::RemoteArgs;
use clap::ArgMatches;
use clap::parser::ValueSource;
use smithers_core::{Code, SmithersError};

/// Fills in `--url` or `--db` from the environment where the command line left them open;
/// refuses `--token` when no gateway is named either way.
pub fn apply(cmd: &mut Cmd, matches: &ArgMatches) -> Result<(), SmithersError> {
    apply_with(cmd, matches, &|k| {
        std::env::var(k).ok().filter(|v| !v.trim().is_empty())
    });
    let token_alone = match cmd {
        Cmd::Workflows { url, token, .. } => token.is_some() && url.is_none(),
        _ => targets(cmd)
            .1
            .is_some_and(|r| r.token.is_some() && r.url.is_none()),
    };
    if token_alone {
        return Err(SmithersError::new(
            Code::InvalidInput,
            "--token is the credential for a gateway: give the gateway with --url URL (or SMITHERS_URL), or drop --token to act on the local database",
        ));
    }
    Ok(())
}

fn apply_with(cmd: &mut Cmd, matches: &ArgMatches, env: &dyn Fn(&str) -> Option<String>) {
    if db_given(matches) {
        return;
    }
    if let Cmd::Workflows { paths, url, .. } = cmd {
        if url.is_none() && paths.is_empty() {
            *url = env("SMITHERS_URL");
        }
        return;
    }
    let (db, remote) = targets(cmd);
    if let Some(remote) = remote {
        if remote.url.is_some() {
            return;
        }
        if let Some(url) = env("SMITHERS_URL") {
            remote.url = Some(url);
            return;
        }
    }
    if let (Some(db), Some(from_env)) = (db, env("SMITHERS_DB")) {
        *db = smithers_store::storage_url(&from_env);
    }
}

/// `--url` and `--db` both typed: a command acts on one place only (a usage error).
pub fn conflict(matches: &ArgMatches) -> Option<String> {
    (given(matches, "db") && given(matches, "url")).then(|| {
        "the argument '--url <URL>' cannot be used with '--db <DB>': a command acts either on a gateway or on a database".to_string()
    })
}

/// Whether `--db` was typed on the command line (at the subcommand or, for `cron`, below it).
fn db_given(matches: &ArgMatches) -> bool {
    given(matches, "db")
}

/// Whether the argument `id` was typed on the command line, at any subcommand level.
fn given(matches: &ArgMatches, id: &str) -> bool {
    let mut level = matches.subcommand();
    while let Some((_, m)) = level {
        if m.ids().any(|i| i.as_str() == id) && m.value_source(id) == Some(ValueSource::CommandLine)
        {
            return true;
        }
        level = m.subcommand();
    }
    false
}

/// The command's `--db` and remote arguments, where it has them.
fn targets(cmd: &mut Cmd) -> (Option<&mut String>, Option<&mut RemoteArgs>) {
    match cmd {
        Cmd::Fork { db, remote, .. }
        | Cmd::Rewind { db, remote, .. }
        | Cmd::Cron { db, remote, .. }
        | Cmd::Ps { db, remote, .. }
        | Cmd::Inspect { db, remote, .. }
        | Cmd::Frames { db, remote, .. }
        | Cmd::Diff { db, remote, .. }
        | Cmd::Approve { db, remote, .. }
        | Cmd::Deny { db, remote, .. }
        | Cmd::Signal { db, remote, .. }
        | Cmd::Cancel { db, remote, .. }
        | Cmd::Rerun { db, remote, .. }
        | Cmd::Logs { db, remote, .. } => (Some(db), Some(remote)),
        // `resume --orphans` takes over local runs only
        Cmd::Resume {
            db,
            remote,
            orphans: false,
            ..
        } => (Some(db), Some(remote)),
        Cmd::Run { remote, .. } => (None, Some(remote)),
        Cmd::Up { db, .. } | Cmd::Resume { db, .. } => (Some(db), None),
        _ => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::{CommandFactory, FromArgMatches};

    fn parse(args: &[&str], vars: &[(&str, &str)]) -> Cmd {
        let m = Cli::command()
            .try_get_matches_from(std::iter::once("smithers").chain(args.iter().copied()))
            .unwrap();
        let mut cli = Cli::from_arg_matches(&m).unwrap();
        let env = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        apply_with(&mut cli.cmd, &m, &env);
        cli.cmd
    }

    fn where_ps(cmd: &Cmd) -> (String, Option<String>) {
        match cmd {
            Cmd::Ps { db, remote, .. } => (db.clone(), remote.url.clone()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn precedence() {
        let url = ("SMITHERS_URL", "http://gw:1");
        let db = ("SMITHERS_DB", "env.db");
        let p = parse(&["ps"], &[]);
        assert_eq!(where_ps(&p), (crate::DEFAULT_DB.into(), None));
        let p = parse(&["ps"], &[url, db]);
        assert_eq!(where_ps(&p).1.as_deref(), Some("http://gw:1"));
        let p = parse(&["ps"], &[db]);
        assert_eq!(where_ps(&p), ("sqlite://env.db".into(), None));
        // a typed --db wins over both variables
        let p = parse(&["ps", "--db", "x.db"], &[url, db]);
        assert_eq!(where_ps(&p), ("x.db".into(), None));
        let p = parse(&["ps", "--url", "http://flag:2"], &[url]);
        assert_eq!(where_ps(&p).1.as_deref(), Some("http://flag:2"));
        // cron's --db is global: given after the action it still counts
        match parse(&["cron", "list", "--db", "c.db"], &[url]) {
            Cmd::Cron { db, remote, .. } => assert_eq!((db.as_str(), remote.url), ("c.db", None)),
            _ => unreachable!(),
        }
        // up has no remote mode: SMITHERS_URL does not apply, SMITHERS_DB does
        match parse(&["up", "w.yaml"], &[url, db]) {
            Cmd::Up { db, .. } => assert_eq!(db, "sqlite://env.db"),
            _ => unreachable!(),
        }
        match parse(&["workflows"], &[url]) {
            Cmd::Workflows { url, .. } => assert_eq!(url.as_deref(), Some("http://gw:1")),
            _ => unreachable!(),
        }
        match parse(&["workflows", "dir"], &[url]) {
            Cmd::Workflows { url, .. } => assert_eq!(url, None),
            _ => unreachable!(),
        }
    }
}
