//! `smithers cron list|add|remove|trigger`: schedules in the database (served by `smithers
//! serve`), or through a running gateway with `--url`.

use crate::open_store;
use crate::remote::{self, RemoteArgs};
use serde_json::{Value, json};
use smithers_core::{Code, SmithersError};

#[derive(clap::Subcommand)]
pub enum CronAction {
    /// List schedules.
    List {
        /// Print JSON (`{"schedules": [...]}`, rows as `cron.list` returns them) instead of a
        /// table.
        #[arg(long)]
        json: bool,
    },
    /// Add or replace a schedule for a served workflow key.
    Add {
        /// Workflow key (as served by `smithers serve`).
        workflow: String,
        /// Cron pattern: 5 or 6 fields (seconds first), or @hourly/@daily/….
        pattern: String,
        #[arg(long)]
        cron_id: Option<String>,
        /// Store it disabled.
        #[arg(long)]
        disabled: bool,
        /// Input of the runs it starts: a JSON object, or @file (default `{}`).
        #[arg(long)]
        input: Option<String>,
    },
    /// Remove a schedule.
    Remove { cron_id: String },
    /// Start a run now (needs a running gateway: --url).
    Trigger {
        /// The schedule to trigger.
        cron_id: Option<String>,
        /// Or a workflow key.
        #[arg(long)]
        workflow: Option<String>,
        /// Run input (JSON or @file).
        #[arg(long)]
        input: Option<String>,
    },
}

/// `--input`, when given: JSON or @file.
fn opt_input(text: Option<&str>) -> Result<Option<Value>, SmithersError> {
    text.map(|t| crate::json_arg("--input", t)).transpose()
}

fn print_rows(rows: &[Value]) {
    if rows.is_empty() {
        eprintln!("no schedules");
        return;
    }
    println!(
        "{:<28} {:<18} {:<16} {:<8} {:<21}",
        "CRON ID", "PATTERN", "WORKFLOW", "ENABLED", "NEXT RUN"
    );
    for r in rows {
        let next = r["nextRunAtMs"]
            .as_i64()
            .map(crate::progress::fmt_ms)
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:<18} {:<16} {:<8} {:<21}",
            r["cronId"].as_str().unwrap_or(""),
            r["pattern"].as_str().unwrap_or(""),
            r["workflow"].as_str().unwrap_or("-"),
            r["enabled"].as_bool().unwrap_or(false),
            next
        );
        if r["input"].as_object().is_some_and(|m| !m.is_empty()) {
            println!("  input: {}", r["input"]);
        }
        if let Some(e) = r["errorJson"].as_str() {
            println!("  last error: {e}");
        }
    }
}

pub async fn run(
    action: &CronAction,
    db: &str,
    remote_args: &RemoteArgs,
) -> Result<u8, SmithersError> {
    if let Some(url) = &remote_args.url {
        let gw =
            remote::Gateway::new(url, remote::token(remote_args.token.as_ref())).map_err(to_err)?;
        let (method, params) = match action {
            CronAction::List { .. } => ("cron.list", json!({})),
            CronAction::Add {
                workflow,
                pattern,
                cron_id,
                disabled,
                input,
            } => {
                let input = opt_input(input.as_deref())?;
                (
                    "cron.add",
                    json!({"workflow": workflow, "pattern": pattern, "cronId": cron_id, "enabled": !disabled, "input": input}),
                )
            }
            CronAction::Remove { cron_id } => ("cron.remove", json!({"cronId": cron_id})),
            CronAction::Trigger {
                cron_id,
                workflow,
                input,
            } => {
                let input = opt_input(input.as_deref())?;
                (
                    "cron.trigger",
                    json!({"cronId": cron_id, "workflow": workflow, "input": input}),
                )
            }
        };
        let out = match gw.call(method, params).await {
            Ok(out) => out,
            Err(e) => {
                // the gateway's own code (FORBIDDEN, …), as every remote command prints it
                eprintln!("error[{}]: {}", e.code, e.message);
                return Ok(1);
            }
        };
        match action {
            CronAction::List { json: true } => {
                return crate::runs::emit_json(&json!({ "schedules": out }));
            }
            CronAction::List { json: false } => {
                print_rows(out.as_array().map(Vec::as_slice).unwrap_or(&[]))
            }
            _ => println!("{out}"),
        }
        return Ok(0);
    }
    let store = open_store(db).await?;
    match action {
        CronAction::List { json } => {
            let rows: Vec<Value> = store
                .list_crons()
                .await?
                .iter()
                .map(smithers_gateway::cron::cron_json)
                .collect();
            if *json {
                return crate::runs::emit_json(&json!({ "schedules": rows }));
            }
            print_rows(&rows);
        }
        CronAction::Add {
            workflow,
            pattern,
            cron_id,
            disabled,
            input,
        } => {
            let id = cron_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            // checked against the input limits here, against the workflow's schema when the
            // gateway fires it (a failed fire is recorded on the schedule)
            let input = opt_input(input.as_deref())?;
            if let Some(i) = &input {
                smithers_core::bounds::check_run_input(i)?;
            }
            let row = smithers_gateway::cron::new_row(
                &id,
                workflow,
                pattern,
                !disabled,
                smithers_engine::now_ms(),
                input.as_ref(),
            )
            .map_err(|e| SmithersError::new(Code::InvalidInput, e))?;
            store.upsert_cron(row).await?;
            let stored = store
                .get_cron(&id)
                .await?
                .ok_or_else(|| SmithersError::new(Code::Internal, "the schedule was not stored"))?;
            println!("{}", smithers_gateway::cron::cron_json(&stored));
            eprintln!(
                "schedule `{id}` stored; `smithers serve` fires it for workflow `{workflow}`"
            );
        }
        CronAction::Remove { cron_id } => {
            if !store.delete_cron(cron_id).await? {
                return Err(SmithersError::new(
                    Code::NodeNotFound,
                    format!("no schedule `{cron_id}`; `smithers cron list` shows them"),
                ));
            }
            eprintln!("schedule `{cron_id}` removed");
        }
        CronAction::Trigger { .. } => {
            return Err(SmithersError::new(
                Code::InvalidInput,
                "cron trigger starts a run of a served workflow: give the gateway with --url (or run the workflow with `smithers up`)",
            ));
        }
    }
    Ok(0)
}

fn to_err(e: remote::RemoteError) -> SmithersError {
    // keep the gateway's code visible in the one-line error
    let code = Code::parse(&e.code);
    let message = if code == Code::Internal && e.code != "INTERNAL_ERROR" {
        format!("[{}] {}", e.code, e.message)
    } else {
        e.message
    };
    SmithersError::new(
        if code == Code::Internal {
            Code::Internal
        } else {
            code
        },
        message,
    )
}
