//! `smithers.toml` (DESIGN §4) and zero-config `smithers serve DIR`: what to listen on, where
//! runs are stored, how callers authenticate, and which workflows are served under which keys.

use crate::auth::{AuthConfig, AuthSection};
use crate::server_config::{Limits, ServerConfig};
use crate::webhook::WebhookConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Everything `smithers serve` needs.
#[derive(Debug)]
pub struct ServeConfig {
    pub server: ServerConfig,
    pub storage_url: String,
    pub auth: AuthConfig,
    pub workflows: Vec<WorkflowEntry>,
    /// `[telemetry] otlp_endpoint` and `service_name` (the OTEL_* variables are read at start).
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
}

/// One served workflow.
#[derive(Debug, Clone)]
pub struct WorkflowEntry {
    pub key: String,
    pub path: PathBuf,
    pub schedule: Option<String>,
    /// The input of the runs its schedule starts (`{}` when absent).
    pub input: Option<serde_json::Value>,
    pub webhook: Option<WebhookConfig>,
}

/// Default database when the config names none.
pub const DEFAULT_STORAGE: &str = "sqlite://.smithers/smithers.db";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    storage: StorageSection,
    auth: Option<AuthSection>,
    #[serde(default)]
    workflows: Vec<WorkflowSection>,
    #[serde(default)]
    telemetry: TelemetrySection,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TelemetrySection {
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    listen: Option<String>,
    heartbeat_ms: Option<u64>,
    max_connections: Option<usize>,
    max_body_bytes: Option<usize>,
    metrics_auth: Option<bool>,
    console: Option<bool>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    max_tcp_connections: Option<usize>,
    fd_reserve: Option<usize>,
    max_unauthenticated_ws: Option<usize>,
    max_unverified_webhook_bytes: Option<usize>,
    max_anonymous_rpc_bytes: Option<usize>,
    webhook_dedupe_secs: Option<u64>,
    max_outbound_frames: Option<usize>,
    max_outbound_bytes: Option<usize>,
    write_timeout_ms: Option<u64>,
    max_streams_per_connection: Option<usize>,
    max_streams: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StorageSection {
    url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowSection {
    key: String,
    path: PathBuf,
    schedule: Option<String>,
    input: Option<toml::Value>,
    webhook: Option<toml::Value>,
}

/// Reads a config file; errors name the file and the key that is wrong.
pub fn load(path: &Path) -> Result<ServeConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config `{}`: {e}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&text, &path.display().to_string(), &base)
}

/// Parses config text; workflow paths are relative to `base` (the config file's directory).
pub fn parse(text: &str, label: &str, base: &Path) -> Result<ServeConfig, String> {
    let file: File =
        toml::from_str(text).map_err(|e| format!("{label}: {}", e.to_string().trim()))?;
    let d = ServerConfig::default();
    let s = file.server;
    let auth = match file.auth {
        Some(a) => a.build().map_err(|e| format!("{label}: auth: {e}"))?,
        None => AuthConfig::None,
    };
    let l = Limits::default();
    let limits = Limits {
        header_timeout_ms: s.header_timeout_ms.unwrap_or(l.header_timeout_ms),
        body_timeout_ms: s.body_timeout_ms.unwrap_or(l.body_timeout_ms),
        idle_timeout_ms: s.idle_timeout_ms.unwrap_or(l.idle_timeout_ms),
        connect_timeout_ms: s.connect_timeout_ms.unwrap_or(l.connect_timeout_ms),
        max_tcp_connections: s.max_tcp_connections.or(l.max_tcp_connections),
        fd_reserve: s.fd_reserve.unwrap_or(l.fd_reserve),
        max_unauthenticated_ws: s.max_unauthenticated_ws.unwrap_or(l.max_unauthenticated_ws),
        max_unverified_webhook_bytes: s
            .max_unverified_webhook_bytes
            .unwrap_or(l.max_unverified_webhook_bytes),
        max_anonymous_rpc_bytes: s
            .max_anonymous_rpc_bytes
            .unwrap_or(l.max_anonymous_rpc_bytes),
        webhook_dedupe_secs: s.webhook_dedupe_secs.unwrap_or(l.webhook_dedupe_secs),
        max_outbound_frames: s.max_outbound_frames.unwrap_or(l.max_outbound_frames),
        max_outbound_bytes: s.max_outbound_bytes.unwrap_or(l.max_outbound_bytes),
        write_timeout_ms: s.write_timeout_ms.unwrap_or(l.write_timeout_ms),
        max_streams_per_connection: s
            .max_streams_per_connection
            .unwrap_or(l.max_streams_per_connection),
        max_streams: s.max_streams.unwrap_or(l.max_streams),
    };
    let server = ServerConfig {
        listen: s.listen.unwrap_or(d.listen),
        heartbeat_ms: s.heartbeat_ms.unwrap_or(d.heartbeat_ms),
        max_connections: s.max_connections.unwrap_or(d.max_connections),
        max_body_bytes: s.max_body_bytes.unwrap_or(d.max_body_bytes),
        // behind auth by default whenever there is auth (an operator may open it)
        metrics_auth: s.metrics_auth.unwrap_or(!matches!(auth, AuthConfig::None)),
        console: s.console.unwrap_or(true),
        features: d.features,
        limits,
    };
    // zero would disable a guard or refuse every client; neither is what anyone means
    for (key, value) in [
        ("heartbeat_ms", server.heartbeat_ms),
        ("max_connections", server.max_connections as u64),
        ("max_body_bytes", server.max_body_bytes as u64),
        ("header_timeout_ms", server.limits.header_timeout_ms),
        ("body_timeout_ms", server.limits.body_timeout_ms),
        ("idle_timeout_ms", server.limits.idle_timeout_ms),
        ("connect_timeout_ms", server.limits.connect_timeout_ms),
        (
            "max_tcp_connections",
            server.limits.max_tcp_connections.unwrap_or(1) as u64,
        ),
        (
            "max_unauthenticated_ws",
            server.limits.max_unauthenticated_ws as u64,
        ),
        (
            "max_unverified_webhook_bytes",
            server.limits.max_unverified_webhook_bytes as u64,
        ),
        (
            "max_anonymous_rpc_bytes",
            server.limits.max_anonymous_rpc_bytes as u64,
        ),
        (
            "max_outbound_frames",
            server.limits.max_outbound_frames as u64,
        ),
        (
            "max_outbound_bytes",
            server.limits.max_outbound_bytes as u64,
        ),
        ("write_timeout_ms", server.limits.write_timeout_ms),
        (
            "max_streams_per_connection",
            server.limits.max_streams_per_connection as u64,
        ),
        ("max_streams", server.limits.max_streams as u64),
    ] {
        if value == 0 {
            return Err(format!("{label}: server.{key} must be greater than 0"));
        }
    }
    let mut workflows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, w) in file.workflows.into_iter().enumerate() {
        if w.key.is_empty()
            || !w
                .key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "{label}: workflows[{i}].key `{}` must be letters, digits, `-`, `_` or `.`",
                w.key
            ));
        }
        if !seen.insert(w.key.clone()) {
            return Err(format!(
                "{label}: workflows[{i}].key `{}` is used twice",
                w.key
            ));
        }
        let webhook = match w.webhook {
            Some(v) => Some(
                crate::webhook::WebhookConfig::from_toml(v)
                    .map_err(|e| format!("{label}: workflows[{i}].webhook: {e}"))?,
            ),
            None => None,
        };
        if let Some(p) = &w.schedule {
            crate::cron::parse(p).map_err(|e| format!("{label}: workflows[{i}].schedule: {e}"))?;
        }
        let input = match w.input {
            None => None,
            Some(_) if w.schedule.is_none() => {
                return Err(format!(
                    "{label}: workflows[{i}].input is the input of scheduled runs, but `{}` has no schedule; add `schedule = \"…\"` or remove `input`",
                    w.key
                ));
            }
            Some(toml::Value::Table(t)) => Some(
                serde_json::to_value(t)
                    .map_err(|e| format!("{label}: workflows[{i}].input: {e}"))?,
            ),
            Some(_) => {
                return Err(format!(
                    "{label}: workflows[{i}].input must be a table (`input = {{ repo = \"x\" }}`)"
                ));
            }
        };
        workflows.push(WorkflowEntry {
            key: w.key,
            path: base.join(&w.path),
            schedule: w.schedule,
            input,
            webhook,
        });
    }
    Ok(ServeConfig {
        server,
        storage_url: file.storage.url.unwrap_or_else(|| DEFAULT_STORAGE.into()),
        auth,
        workflows,
        otlp_endpoint: file.telemetry.otlp_endpoint,
        service_name: file.telemetry.service_name,
    })
}

/// `smithers serve DIR|FILE...` without a config: every `*.yaml`/`*.yml` of each directory (and
/// each file given) under its file stem, auth none, default listen address.
pub fn zero_config(paths: &[PathBuf]) -> Result<ServeConfig, String> {
    let mut workflows = Vec::new();
    for p in paths {
        let files: Vec<PathBuf> = if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("cannot read `{}`: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            v.sort();
            v
        } else if p.is_file() {
            vec![p.clone()]
        } else {
            return Err(format!(
                "`{}` is neither a workflow file nor a directory",
                p.display()
            ));
        };
        for f in files {
            let key = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if workflows.iter().any(|w: &WorkflowEntry| w.key == key) {
                return Err(format!(
                    "two workflows are named `{key}` (`{}`); keys must be unique",
                    f.display()
                ));
            }
            workflows.push(WorkflowEntry {
                input: None,
                key,
                path: f,
                schedule: None,
                webhook: None,
            });
        }
    }
    if workflows.is_empty() {
        return Err("no workflows to serve: give a directory with *.yaml files, workflow files, or --config".into());
    }
    Ok(ServeConfig {
        server: ServerConfig::default(),
        storage_url: DEFAULT_STORAGE.into(),
        auth: AuthConfig::None,
        workflows,
        otlp_endpoint: None,
        service_name: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(text: &str) -> Result<ServerConfig, String> {
        parse(text, "smithers.toml", Path::new(".")).map(|c| c.server)
    }

    #[test]
    fn the_anonymous_rpc_budget_is_read_defaulted_and_never_zero() {
        let d = server("").unwrap();
        assert_eq!(d.limits.max_anonymous_rpc_bytes, 32 * 1024 * 1024);
        let s = server("[server]\nmax_anonymous_rpc_bytes = 2048\n").unwrap();
        assert_eq!(s.limits.max_anonymous_rpc_bytes, 2048);
        assert_eq!(
            server("[server]\nmax_anonymous_rpc_bytes = 0\n").unwrap_err(),
            "smithers.toml: server.max_anonymous_rpc_bytes must be greater than 0"
        );
    }
}
