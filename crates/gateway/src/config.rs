//! `smithers.toml` (DESIGN §4) and zero-config `smithers serve DIR`: what to listen on, where
//! runs are stored, how callers authenticate, and which workflows are served under which keys.

use crate::auth::{AuthConfig, AuthSection};
use crate::gateway::ServerConfig;
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
}

/// One served workflow.
#[derive(Debug, Clone)]
pub struct WorkflowEntry {
    pub key: String,
    pub path: PathBuf,
    pub schedule: Option<String>,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    listen: Option<String>,
    heartbeat_ms: Option<u64>,
    max_connections: Option<usize>,
    max_body_bytes: Option<usize>,
    metrics_auth: Option<bool>,
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
    let server = ServerConfig {
        listen: s.listen.unwrap_or(d.listen),
        heartbeat_ms: s.heartbeat_ms.unwrap_or(d.heartbeat_ms),
        max_connections: s.max_connections.unwrap_or(d.max_connections),
        max_body_bytes: s.max_body_bytes.unwrap_or(d.max_body_bytes),
        metrics_auth: s.metrics_auth.unwrap_or(false),
        features: d.features,
    };
    if server.heartbeat_ms == 0 {
        return Err(format!(
            "{label}: server.heartbeat_ms must be greater than 0"
        ));
    }
    if server.max_body_bytes == 0 {
        return Err(format!(
            "{label}: server.max_body_bytes must be greater than 0"
        ));
    }
    let auth = match file.auth {
        Some(a) => a.build().map_err(|e| format!("{label}: auth: {e}"))?,
        None => AuthConfig::None,
    };
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
        workflows.push(WorkflowEntry {
            key: w.key,
            path: base.join(&w.path),
            schedule: w.schedule,
            webhook,
        });
    }
    Ok(ServeConfig {
        server,
        storage_url: file.storage.url.unwrap_or_else(|| DEFAULT_STORAGE.into()),
        auth,
        workflows,
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
    })
}
