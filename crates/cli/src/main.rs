//! `smithers`: run durable workflows from the command line.

/// mimalloc instead of glibc's malloc for Rust's allocations: allocation and free were about a
/// tenth of the server's CPU under load, much of it glibc consolidating and unlinking chunks
/// (docs/benchmarks.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc.h's `mi_option_e`.
#[cfg(target_os = "linux")]
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Commit mimalloc's arena as it is used, not all at once: committed eagerly (and so backed by
/// transparent huge pages) it put 12 MiB more into an idle server's resident memory. This
/// runs from `.init_array`, after mimalloc's own start-up and before Rust's first allocation
/// creates the arena; in `main` it would be too late.
#[cfg(target_os = "linux")]
extern "C" fn allocator_lazy_commit() {
    // SAFETY: sets a plain integer option; mimalloc reads it when it creates an arena.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static ALLOCATOR_LAZY_COMMIT: extern "C" fn() = allocator_lazy_commit;

mod act;
mod bench;
mod bench_cluster;
mod bench_console;
mod bench_devtools;
mod bench_gateway;
mod bench_guard;
mod bench_instr;
mod bench_latency;
mod bench_machine;
mod bench_pg;
mod cron_cmd;
mod diff_cmd;
mod env_defaults;
mod follow;
mod frame_changes;
mod json_log;
mod logs_cmd;
mod progress;
mod remote;
mod runs;
mod up;
mod workflows_cmd;

use clap::{Parser, Subcommand};
use smithers_core::{Code, SmithersError};
use std::process::ExitCode;

/// Default database: `sqlite://.smithers/smithers.db` in the current directory.
pub const DEFAULT_DB: &str = "sqlite://.smithers/smithers.db";

#[derive(Parser)]
#[command(
    name = "smithers",
    version,
    about = "Durable workflows for AI agents and automation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines on stderr: `pretty` (default on a terminal) or `json` (one object a line;
    /// default otherwise). Filter them with SMITHERS_LOG or RUST_LOG.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Hide task output lines while following a run (`up`, `run`, `resume`, `rerun`, `fork`).
    #[arg(long, short, global = true)]
    quiet: bool,
}

/// `--synchronous` of `bench gateway`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SyncArg {
    Full,
    Normal,
}

impl From<SyncArg> for smithers_store::Synchronous {
    fn from(a: SyncArg) -> Self {
        match a {
            SyncArg::Full => smithers_store::Synchronous::Full,
            SyncArg::Normal => smithers_store::Synchronous::Normal,
        }
    }
}

/// How operator logs are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the gateway (HTTP + WebSocket protocol v1) and run workflows.
    Serve {
        /// Configuration file (smithers.toml).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Without --config: directories (every *.yaml in them) or workflow files to serve.
        paths: Vec<std::path::PathBuf>,
        /// Address to listen on, HOST:PORT (overrides `[server] listen`; env SMITHERS_LISTEN).
        #[arg(long, conflicts_with = "port")]
        listen: Option<String>,
        /// Port to listen on, keeping the configured host (127.0.0.1 by default).
        #[arg(long)]
        port: Option<u16>,
        /// Database: sqlite://PATH, a bare SQLite file path, or postgres://… (overrides
        /// `[storage] url`; env SMITHERS_DB).
        #[arg(long)]
        db: Option<String>,
    },
    /// Run a workflow in the foreground with live progress.
    Up {
        workflow: String,
        /// Run input: a JSON object, or @file to read it from a file.
        #[arg(long)]
        input: Option<String>,
        #[arg(long)]
        run_id: Option<String>,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
    },
    /// Start a run of a workflow served by a gateway and follow it live (progress and exit
    /// codes as `up`).
    Run {
        /// The workflow's key on the gateway (`smithers workflows --url URL` lists them).
        workflow: String,
        /// Run input: a JSON object, or @file to read it from a file.
        #[arg(long)]
        input: Option<String>,
        #[arg(long)]
        run_id: Option<String>,
        /// Print the run id and return at once instead of following the run.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Start a new run with the workflow and input of an earlier run, and follow it.
    Rerun {
        run_id: String,
        /// Id of the new run.
        #[arg(long)]
        new_run_id: Option<String>,
        /// With --url: print the new run's id and return at once.
        #[arg(long)]
        detach: bool,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Continue a run that is parked, cancelled, failed or orphaned by a dead engine.
    Resume {
        #[arg(required_unless_present = "orphans")]
        run_id: Option<String>,
        /// Instead of one run, take over every run whose engine died or stopped heart-beating.
        #[arg(long, conflicts_with = "run_id")]
        orphans: bool,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        /// Resume even though the workflow file changed since the run started.
        #[arg(long)]
        force: bool,
        /// With --url: return once the gateway resumed the run instead of following it.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Start a new run from another run's state at one of its frames (the original is untouched).
    Fork {
        run_id: String,
        /// Frame to branch from (`smithers frames RUN_ID` lists them).
        #[arg(long)]
        frame: i64,
        /// Input for the new run (JSON or @file); default: the original run's input.
        #[arg(long)]
        input: Option<String>,
        /// Id of the new run.
        #[arg(long)]
        new_run_id: Option<String>,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Put a run back to the state it had at a frame (later frames, attempts and decisions are
    /// deleted); continue it with `smithers resume`.
    Rewind {
        run_id: String,
        #[arg(long)]
        frame: i64,
        /// Confirm: rewinding deletes what happened after the frame.
        #[arg(long)]
        yes: bool,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Manage schedules: list, add, remove, trigger.
    Cron {
        #[command(subcommand)]
        action: cron_cmd::CronAction,
        #[arg(long, default_value = DEFAULT_DB, global = true)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// List runs, newest first.
    Ps {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..))]
        limit: u16,
        /// Print JSON (`{"runs": [...]}`, rows as `runs.list` returns them) instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Show a run: status, nodes, attempts, approvals and outputs.
    Inspect {
        run_id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Print a run's task output in the order it was written; --follow keeps printing it live.
    Logs {
        run_id: String,
        /// Only this node's output, exactly as the task wrote it (otherwise each line is
        /// prefixed with its node).
        #[arg(long)]
        node: Option<String>,
        /// Keep printing new output until the run ends (Ctrl-C stops).
        #[arg(long, short)]
        follow: bool,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// List a run's frames with what each changed, or print one frame's tree with --frame.
    Frames {
        run_id: String,
        #[arg(long)]
        frame: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// List the frames as JSON (`{"frames": [...]}`) instead of a table (`--frame N`
        /// prints JSON anyway).
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Show what a task changed on disk: the files its attempt added, modified, deleted or
    /// renamed in the git work tree it ran in, as a patch (`git apply` takes it).
    Diff {
        run_id: String,
        /// The task's node id.
        #[arg(long)]
        node: String,
        /// Loop iteration (0 outside loops).
        #[arg(long, default_value_t = 0)]
        iteration: i64,
        /// Print the bundle as JSON (`{seq, baseRef, patches}`) instead of the patch.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Approve a pending approval.
    Approve {
        run_id: String,
        #[arg(long)]
        node: String,
        #[arg(long, default_value_t = 0)]
        iteration: i64,
        #[arg(long)]
        note: Option<String>,
        /// For select approvals: the chosen option key.
        #[arg(long, conflicts_with = "rank")]
        select: Option<String>,
        /// For rank approvals: option keys in order, comma-separated.
        #[arg(long, value_delimiter = ',')]
        rank: Option<Vec<String>>,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Deny a pending approval.
    Deny {
        run_id: String,
        #[arg(long)]
        node: String,
        #[arg(long, default_value_t = 0)]
        iteration: i64,
        #[arg(long)]
        note: Option<String>,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Send a signal (event) to a run.
    Signal {
        run_id: String,
        name: String,
        /// Payload: JSON, or @file.
        #[arg(long)]
        data: Option<String>,
        #[arg(long)]
        correlation_id: Option<String>,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Cancel a run.
    Cancel {
        run_id: String,
        #[arg(long, default_value = DEFAULT_DB)]
        db: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Check a workflow file and report every problem.
    Validate { workflow: String },
    /// Print a shell completion script (bash, zsh, fish, …) on stdout, e.g.
    /// `smithers completions bash > ~/.local/share/bash-completion/completions/smithers`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// List workflows: those a gateway serves (--url), or those `smithers serve PATHS` would
    /// serve (default: the current directory).
    Workflows {
        /// Directories (every *.yaml in them) or workflow files.
        paths: Vec<std::path::PathBuf>,
        /// A running gateway, e.g. http://127.0.0.1:7331.
        #[arg(long, value_name = "URL", conflicts_with = "paths")]
        url: Option<String>,
        /// Bearer token for the gateway (default: SMITHERS_TOKEN).
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// Print JSON (`{"workflows": [...]}`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure engine overhead and throughput on durable SQLite (see docs/benchmarks.md).
    Bench {
        /// Repetitions per chain length (the median is reported).
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Smaller workloads, for a smoke check.
        #[arg(long)]
        quick: bool,
        /// Only these chain lengths (comma-separated), and no throughput test.
        #[arg(long, value_delimiter = ',')]
        lengths: Option<Vec<usize>>,
        #[command(subcommand)]
        target: Option<BenchTarget>,
    },
}

#[derive(Subcommand)]
enum BenchTarget {
    /// Measure the gateway (`smithers serve` in a separate process) against the targets.
    Gateway {
        /// Smaller workloads, for a smoke check (the figures are not comparable to the targets).
        #[arg(long)]
        quick: bool,
        /// Only these parts (comma-separated); startup time and idle memory are always measured.
        #[arg(long, value_delimiter = ',')]
        only: Vec<bench_gateway::Part>,
        /// Measure `runs.create → run.completed` on PostgreSQL instead of the SQLite figures:
        /// `postgres` starts a throwaway local cluster (durable commits), a `postgres://…` URL
        /// uses that database.
        #[arg(long, value_name = "postgres|URL")]
        db: Option<String>,
        /// With `--db`: also measure this many `smithers serve` nodes sharing the database
        /// (after one node), the load spread over them.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
        nodes: u8,
        /// SQLite commits: `full` (when not given) syncs each commit to disk, durable across a
        /// power loss, as the targets are defined; `normal` (the server's default) syncs at
        /// checkpoints. Not with `--db` (PostgreSQL follows its own `synchronous_commit`).
        #[arg(long, value_enum)]
        synchronous: Option<SyncArg>,
    },
    /// Measure DevTools: snapshot and delta of a 1,000-node tree, and 100 live stream
    /// subscribers on one busy run (`smithers serve` in a separate process).
    Devtools {
        /// Smaller workloads, for a smoke check.
        #[arg(long)]
        quick: bool,
    },
    /// Measure what the web console asks of a gateway with many runs: `runs.list` pages of a
    /// seeded 100,000-run SQLite file (`smithers serve` in a separate process), and its files.
    Console {
        /// How many runs to seed.
        #[arg(long, default_value_t = 100_000)]
        runs: usize,
        /// At most 5,000 runs and fewer repetitions, for a smoke check.
        #[arg(long)]
        quick: bool,
    },
    /// Regression guard: measure the latency, throughput and per-step figures again, and the
    /// server's instructions per run when valgrind is found, and report each one more than
    /// 10 % worse than the baseline in docs/benchmarks.md (exit code 1). On a machine more than
    /// 25 % faster or slower than the baseline's, only the instruction count is judged.
    Check {
        /// The document holding the baseline block.
        #[arg(long, default_value = "docs/benchmarks.md", value_name = "FILE")]
        baseline: std::path::PathBuf,
        /// Passes; each figure is the best of them.
        #[arg(long, default_value_t = 5)]
        passes: usize,
        /// Small workloads, for a smoke check (not comparable to the baseline).
        #[arg(long)]
        quick: bool,
        /// Write the measured figures as the new baseline instead of comparing.
        #[arg(long)]
        record: bool,
    },
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Some(msg) = env_defaults::conflict(&matches) {
        <Cli as clap::CommandFactory>::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit();
    }
    let env_checked = env_defaults::apply(&mut cli.cmd, &matches);
    progress::set_quiet(cli.quiet);
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`smithers inspect RUN | head -1`) instead of failing on the write. A long-running server
    // must not do this (a closed socket would kill it); every command here is short-lived or
    // leaves its run resumable.
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        // SAFETY: called before any other thread exists; SIG_DFL is always a valid disposition.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    // held to the end of main: dropping it writes out the log lines still queued
    let _log_guard = init_logging(matches!(cli.cmd, Cmd::Serve { .. }), cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error[IO_ERROR]: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match env_checked {
        Ok(()) => rt.block_on(dispatch(cli.cmd)),
        Err(e) => Err(e),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error[{}]: {}", e.code, e.message);
            ExitCode::from(1)
        }
    }
}

/// Operator logs (`tracing` events) go to stderr. `SMITHERS_LOG` or `RUST_LOG` filter them
/// (`SMITHERS_LOG=debug`, `RUST_LOG=smithers_gateway=debug`); without either, `serve` logs at
/// `info` and every other command only warnings, so their own output stays readable.
/// Lines are formatted on the thread that logs and written by a logging thread in batches (one
/// `write` per burst instead of one per line), so a busy server does not wait on stderr; at
/// most 65,536 lines wait, past that the logging thread blocks (no line is dropped).
fn init_logging(
    serving: bool,
    format: Option<LogFormat>,
) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let from_env = std::env::var("SMITHERS_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .filter(|v| !v.trim().is_empty());
    let default = if serving { "info" } else { "warn" };
    let filter = from_env
        .as_deref()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let terminal = std::io::stderr().is_terminal();
    let format = format.unwrap_or(if terminal {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(65_536)
        .thread_name("smithers-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.event_format(json_log::JsonLine).try_init(),
        LogFormat::Pretty => builder
            .with_ansi(terminal && std::env::var_os("NO_COLOR").is_none())
            .try_init(),
    };
    guard
}

async fn dispatch(cmd: Cmd) -> Result<u8, SmithersError> {
    if let Some(r) = remote::dispatch(&cmd).await {
        return r;
    }
    match cmd {
        Cmd::Serve {
            config,
            paths,
            listen,
            port,
            db,
        } => serve(config, paths, ServeOverrides { listen, port, db }).await,
        Cmd::Up {
            workflow,
            input,
            run_id,
            db,
        } => up::up(&workflow, input.as_deref(), run_id, &db).await,
        Cmd::Fork {
            run_id,
            frame,
            input,
            new_run_id,
            db,
            ..
        } => up::fork(&run_id, frame, input.as_deref(), new_run_id, &db).await,
        Cmd::Rewind {
            run_id,
            frame,
            yes,
            db,
            ..
        } => act::rewind(&db, &run_id, frame, yes).await,
        Cmd::Cron { action, db, remote } => cron_cmd::run(&action, &db, &remote).await,
        Cmd::Run { .. } => Err(SmithersError::new(
            Code::InvalidInput,
            "smithers run starts a run on a gateway: give --url URL (or set SMITHERS_URL); to run a workflow file here, use `smithers up FILE`",
        )),
        Cmd::Rerun { detach: true, .. } | Cmd::Resume { detach: true, .. } => {
            Err(SmithersError::new(
                Code::InvalidInput,
                "--detach leaves the run to a gateway: give --url URL (or set SMITHERS_URL); a local run lives as long as this command",
            ))
        }
        Cmd::Rerun {
            run_id,
            new_run_id,
            db,
            ..
        } => up::rerun(&run_id, new_run_id, &db).await,
        Cmd::Resume {
            run_id: Some(run_id),
            db,
            force,
            ..
        } => up::resume(&run_id, &db, force).await,
        Cmd::Resume {
            run_id: None, db, ..
        } => up::resume_orphans(&db).await,
        Cmd::Ps {
            status,
            limit,
            json,
            db,
            ..
        } => runs::ps(&db, status.as_deref(), limit as usize, json).await,
        Cmd::Inspect {
            run_id, json, db, ..
        } => runs::inspect(&db, &run_id, json).await,
        Cmd::Frames {
            run_id,
            frame,
            limit,
            json,
            db,
            ..
        } => runs::frames(&db, &run_id, frame, limit, json).await,
        Cmd::Approve {
            run_id,
            node,
            iteration,
            note,
            select,
            rank,
            db,
            ..
        } => act::approve(&db, &run_id, &node, iteration, note, select, rank).await,
        Cmd::Deny {
            run_id,
            node,
            iteration,
            note,
            db,
            ..
        } => act::deny(&db, &run_id, &node, iteration, note).await,
        Cmd::Signal {
            run_id,
            name,
            data,
            correlation_id,
            db,
            ..
        } => {
            act::signal(
                &db,
                &run_id,
                &name,
                data.as_deref(),
                correlation_id.as_deref(),
            )
            .await
        }
        Cmd::Cancel { run_id, db, .. } => act::cancel(&db, &run_id).await,
        Cmd::Logs {
            run_id,
            node,
            follow,
            db,
            ..
        } => logs_cmd::local(&db, &run_id, node.as_deref(), follow).await,
        Cmd::Diff {
            run_id,
            node,
            iteration,
            json,
            db,
            ..
        } => diff_cmd::diff(&db, &run_id, &node, iteration, json).await,
        Cmd::Validate { workflow } => validate(&workflow),
        Cmd::Completions { shell } => completions(shell),
        Cmd::Workflows {
            paths,
            url,
            token,
            json,
        } => workflows_cmd::run(paths, url, token, json).await,
        Cmd::Bench {
            target:
                Some(BenchTarget::Gateway {
                    quick,
                    only,
                    db: None,
                    nodes,
                    synchronous,
                }),
            ..
        } => {
            if nodes > 1 {
                Err(SmithersError::new(
                    Code::InvalidInput,
                    "bench gateway: --nodes needs --db (nodes share a PostgreSQL database)",
                ))
            } else {
                let synchronous = synchronous.unwrap_or(SyncArg::Full);
                bench_gateway::bench_gateway(quick, &only, synchronous.into()).await
            }
        }
        Cmd::Bench {
            target:
                Some(BenchTarget::Gateway {
                    quick,
                    only,
                    db: Some(db),
                    nodes,
                    synchronous,
                }),
            ..
        } => {
            if synchronous.is_some() {
                Err(SmithersError::new(
                    Code::InvalidInput,
                    "bench gateway: --synchronous is for SQLite; with --db PostgreSQL commits as its server is set (the throwaway cluster: synchronous_commit=on)",
                ))
            } else if only.iter().any(|p| *p != bench_gateway::Part::Runs) {
                Err(SmithersError::new(
                    Code::InvalidInput,
                    "bench gateway: with --db only `runs` is measured (--only runs)",
                ))
            } else {
                bench_cluster::bench_cluster(quick, &db, usize::from(nodes)).await
            }
        }
        Cmd::Bench {
            target: Some(BenchTarget::Devtools { quick }),
            ..
        } => bench_devtools::bench_devtools(quick).await,
        Cmd::Bench {
            target: Some(BenchTarget::Console { runs, quick }),
            ..
        } => bench_console::bench_console(runs, quick).await,
        Cmd::Bench {
            target:
                Some(BenchTarget::Check {
                    baseline,
                    passes,
                    quick,
                    record,
                }),
            ..
        } => bench_guard::bench_check(&baseline, passes, quick, record).await,
        Cmd::Bench {
            runs,
            quick,
            lengths,
            target: None,
        } => bench::bench(runs.max(1), quick, lengths).await,
    }
}

/// What `serve` flags and environment variables change in the loaded configuration.
struct ServeOverrides {
    listen: Option<String>,
    port: Option<u16>,
    db: Option<String>,
}

impl ServeOverrides {
    /// Flags win over the environment, which wins over the file.
    fn apply(self, cfg: &mut smithers_gateway::config::ServeConfig) -> Result<(), SmithersError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if let Some(listen) = self.listen.or_else(|| {
            self.port
                .is_none()
                .then(|| env("SMITHERS_LISTEN"))
                .flatten()
        }) {
            cfg.server.listen = listen;
        }
        if let Some(port) = self.port {
            let host = match cfg.server.listen.rsplit_once(':') {
                Some((host, _)) if !host.is_empty() => host.to_string(),
                _ => "127.0.0.1".to_string(),
            };
            cfg.server.listen = format!("{host}:{port}");
        }
        if let Some(db) = self.db.or_else(|| env("SMITHERS_DB")) {
            cfg.storage_url = smithers_store::storage_url(&db);
        }
        if cfg.server.listen.parse::<std::net::SocketAddr>().is_err()
            && !cfg.server.listen.contains(':')
        {
            return Err(SmithersError::new(
                Code::InvalidInput,
                format!(
                    "listen address `{}` has no port; give HOST:PORT (e.g. --listen 0.0.0.0:7331) or --port N",
                    cfg.server.listen
                ),
            ));
        }
        Ok(())
    }
}

async fn serve(
    config: Option<std::path::PathBuf>,
    paths: Vec<std::path::PathBuf>,
    overrides: ServeOverrides,
) -> Result<u8, SmithersError> {
    let usage = |e: String| SmithersError::new(Code::InvalidInput, e);
    let mut cfg = match (config, paths.is_empty()) {
        (Some(c), true) => smithers_gateway::config::load(&c)
            .map_err(|e| SmithersError::new(Code::InvalidConfig, e))?,
        (Some(_), false) => {
            return Err(usage(
                "give either --config or workflow paths, not both".into(),
            ));
        }
        (None, false) => smithers_gateway::config::zero_config(&paths).map_err(usage)?,
        (None, true) => return Err(usage("nothing to serve: give a directory of workflows (smithers serve examples/workflows) or --config smithers.toml".into())),
    };
    overrides.apply(&mut cfg)?;
    raise_open_file_limit();
    smithers_gateway::serve::run(cfg).await?;
    Ok(0)
}

/// A server holds one descriptor per connection (plus SQLite files), and the default soft limit
/// (often 1,024) is far below the `max_connections` one may configure. Raise the soft
/// RLIMIT_NOFILE to the hard limit, which any process may do; on failure keep the old limit.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn validate(path: &str) -> Result<u8, SmithersError> {
    let problems = smithers_core::yaml::validate_file(path);
    if problems.is_empty() {
        println!("{path}: ok");
        return Ok(0);
    }
    for p in &problems {
        eprintln!("{p}");
    }
    eprintln!(
        "{} problem{} found",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    Ok(1)
}

/// `smithers completions SHELL`: the script clap_complete generates from the command definition,
/// so completions never drift from the real flags.
fn completions(shell: clap_complete::Shell) -> Result<u8, SmithersError> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "smithers", &mut script);
    runs::emit(&[String::from_utf8_lossy(&script).trim_end()])
}

/// Reads a JSON argument given inline or as `@file`.
pub fn json_arg(flag: &str, text: &str) -> Result<serde_json::Value, SmithersError> {
    let (src, what) = match text.strip_prefix('@') {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|e| {
                SmithersError::new(
                    Code::InvalidInput,
                    format!("{flag}: cannot read `{path}`: {e}"),
                )
            })?,
            format!("file `{path}`"),
        ),
        None => (text.to_string(), "value".to_string()),
    };
    serde_json::from_str(&src).map_err(|e| {
        SmithersError::new(
            Code::InvalidInput,
            format!("{flag}: {what} is not valid JSON ({e}); pass a JSON object like '{{\"key\": \"value\"}}' or @file.json"),
        )
    })
}

/// Opens the store named by `--db`.
pub async fn open_store(
    db: &str,
) -> Result<std::sync::Arc<dyn smithers_store::Store>, SmithersError> {
    smithers_store::open(db).await
}

#[cfg(test)]
mod tests {
    /// docs/cli.md lists every error code a command can print.
    #[test]
    fn every_error_code_is_documented() {
        let doc = include_str!("../../../docs/cli.md");
        let section = doc
            .split("## Error codes")
            .nth(1)
            .expect("docs/cli.md has an Error codes section");
        for code in smithers_core::Code::ALL {
            let quoted = format!("`{}`", code.as_str());
            assert!(
                section.contains(&quoted),
                "{quoted} is missing from docs/cli.md's Error codes"
            );
        }
    }
}
