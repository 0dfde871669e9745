//! Remote mode: `--url http://host:7331 [--token T]` makes the commands that act on runs talk to
//! a running gateway (`smithers serve`) over `POST /rpc` instead of opening the database.
//!
//! The HTTP client is deliberately small: plain HTTP/1.1 over a `TcpStream`, one request per
//! connection (`Connection: close`), responses framed by `Content-Length` (what the gateway
//! sends), chunked or read-to-close as a fallback. `https://` is refused with advice to use a
//! local TLS-terminating proxy.

use crate::runs;
use crate::{Cmd, json_arg};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use smithers_core::{Code, SmithersError};
use smithers_store::{AttemptRow, FrameRow, RunRow};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long to wait for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one whole request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response head (status line + headers).
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body (a `frames` listing carries whole trees).
const MAX_BODY: usize = 256 * 1024 * 1024;

/// `--url` and `--token`, shared by every command that acts on runs.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RemoteArgs {
    /// Act through a running gateway (`smithers serve`) at this address, e.g.
    /// http://127.0.0.1:7331, instead of opening the database (default: SMITHERS_URL, unless
    /// --db is given).
    #[arg(long, value_name = "URL", global = true)]
    pub url: Option<String>,
    /// Bearer token for the gateway (default: the SMITHERS_TOKEN environment variable).
    #[arg(long, value_name = "TOKEN", global = true)]
    pub token: Option<String>,
}

/// An error from remote mode: the gateway's own code (which need not be one of ours, e.g.
/// `UNAUTHORIZED`) and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub code: String,
    pub message: String,
}

impl RemoteError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RemoteError {
            code: code.as_str().to_string(),
            message: message.into(),
        }
    }
}

impl RemoteError {
    /// An error the gateway answered, under the code the local command would print.
    pub fn from_gateway(code: &str, message: String) -> RemoteError {
        RemoteError {
            code: cli_code(code, &message),
            message,
        }
    }
}

/// One vocabulary for local and remote errors: the protocol's codes as the CLI prints them.
/// Upstream's camelCase codes (`RunNotFound`, `ConfirmationRequired`) become UPPER_SNAKE
/// (`RUN_NOT_FOUND`, `CONFIRMATION_REQUIRED`); `INVALID_REQUEST` is `INVALID_INPUT`; the
/// protocol's generic `NOT_FOUND` is `RUN_NOT_FOUND` or `WORKFLOW_NOT_FOUND` when its message
/// says which, as a local command would say.
pub fn cli_code(code: &str, message: &str) -> String {
    match code {
        "INVALID_REQUEST" => return "INVALID_INPUT".into(),
        "NOT_FOUND" if message.starts_with("Run not found") => return "RUN_NOT_FOUND".into(),
        "NOT_FOUND" if message.starts_with("Unknown workflow") => {
            return "WORKFLOW_NOT_FOUND".into();
        }
        _ => {}
    }
    if !code.chars().any(|c| c.is_ascii_lowercase()) {
        return code.to_string();
    }
    let mut out = String::with_capacity(code.len() + 4);
    for (i, c) in code.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

impl From<SmithersError> for RemoteError {
    fn from(e: SmithersError) -> Self {
        RemoteError {
            code: e.code.as_str().to_string(),
            message: e.message,
        }
    }
}

/// A parsed `--url` plus the token. `Debug` never shows the token.
#[derive(Clone)]
pub struct Gateway {
    host: String,
    port: u16,
    /// `/rpc` below the URL's path.
    rpc_path: String,
    /// `http://host:port/prefix`, for messages.
    base: String,
    token: Option<String>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Gateway {
    /// Parses `http://host[:port][/prefix]` (port 80 when omitted).
    pub fn new(url: &str, token: Option<String>) -> Result<Gateway, RemoteError> {
        let bad = |why: &str| {
            RemoteError::new(
                Code::InvalidUrl,
                format!(
                    "--url `{url}`: {why}; give the gateway's address, e.g. http://127.0.0.1:7331"
                ),
            )
        };
        let url_t = url.trim();
        let lower = url_t.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(RemoteError::new(
                Code::InvalidUrl,
                format!(
                    "--url `{url}`: https is not supported (the CLI speaks plain HTTP only); run a TLS-terminating proxy on this machine (e.g. stunnel or an SSH tunnel) and point --url at it as http://127.0.0.1:PORT"
                ),
            ));
        }
        if !lower.starts_with("http://") {
            return Err(bad("it must start with http://"));
        }
        let rest = &url_t["http://".len()..];
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(bad("a query string or fragment is not allowed"));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("the path contains spaces or control characters"));
        }
        if authority.contains('@') {
            return Err(bad(
                "credentials in the URL are not supported (use --token or SMITHERS_TOKEN)",
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("the IPv6 address has no closing `]`"))?;
            if h.is_empty()
                || !h
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
            {
                return Err(bad("the IPv6 address is malformed"));
            }
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad("unexpected text after the IPv6 address"))?,
                ),
            };
            (h.to_string(), port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is missing"));
        }
        if !authority.starts_with('[')
            && !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad("the host contains characters a host name cannot have"));
        }
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(bad("the port must be a number from 1 to 65535")),
            },
        };
        if let Some(t) = &token
            && t.chars().any(|c| c.is_control())
        {
            return Err(RemoteError::new(
                Code::InvalidInput,
                "the gateway token contains control characters (a line break?); check --token or SMITHERS_TOKEN",
            ));
        }
        let prefix = path.trim_end_matches('/');
        let host_part = if authority.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Gateway {
            base: format!("http://{host_part}{prefix}"),
            rpc_path: format!("{prefix}/rpc"),
            host,
            port,
            token,
        })
    }

    /// The WebSocket address of the gateway (the protocol accepts upgrades on any path).
    pub fn ws_url(&self) -> String {
        format!("ws{}/", &self.base["http".len()..])
    }

    /// Host and port to connect to.
    pub fn addr(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    /// The bearer token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `http://host:port/prefix`, as given, for messages and hints.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn unreachable(&self, why: impl std::fmt::Display) -> RemoteError {
        RemoteError::new(
            Code::GatewayUnreachable,
            format!("cannot reach the gateway at {}: {why}", self.base),
        )
    }

    /// Calls one method and returns its payload (`null` when the response has none).
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, RemoteError> {
        let body = json!({"id": "cli", "method": method, "params": params}).to_string();
        let (status, bytes) = match tokio::time::timeout(REQUEST_TIMEOUT, self.post(&body)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(
                    self.unreachable(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))
                );
            }
        };
        let frame: Value = serde_json::from_slice(&bytes).map_err(|_| {
            RemoteError::new(
                Code::GatewayUnreachable,
                format!(
                    "{} answered HTTP {status} with a body that is not JSON; is a smithers gateway (`smithers serve`) listening there?",
                    self.base
                ),
            )
        })?;
        if frame.get("ok") == Some(&Value::Bool(true)) {
            return Ok(frame.get("payload").cloned().unwrap_or(Value::Null));
        }
        if let Some(err) = frame.get("error").filter(|e| e.is_object()) {
            let code = err
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("SERVER_ERROR")
                .to_string();
            let mut message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the gateway gave no message")
                .to_string();
            if code == "NOT_FOUND" && message == "Route not found" {
                message = format!(
                    "{message}: there is no gateway RPC at {}/rpc; give --url the gateway's base address, e.g. http://127.0.0.1:7331",
                    self.base
                );
            }
            return Err(RemoteError::from_gateway(&code, message));
        }
        Err(RemoteError::new(
            Code::GatewayUnreachable,
            format!(
                "{} answered HTTP {status} with JSON that is not a gateway response frame; is a smithers gateway (`smithers serve`) listening there?",
                self.base
            ),
        ))
    }

    /// Calls a method and decodes its payload as `T`.
    async fn call_as<T: DeserializeOwned>(
        &self,
        method: &str,
        params: Value,
    ) -> Result<T, RemoteError> {
        let v = self.call(method, params).await?;
        serde_json::from_value(v).map_err(|e| {
            RemoteError::new(
                Code::GatewayUnreachable,
                format!(
                    "the gateway at {} answered {method} with an unexpected shape ({e}); is it a smithers gateway of this version?",
                    self.base
                ),
            )
        })
    }

    /// One HTTP/1.1 POST of `body` to the RPC path; returns the status and the body.
    async fn post(&self, body: &str) -> Result<(u16, Vec<u8>), RemoteError> {
        let mut stream = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(
                    self.unreachable("connection refused; is `smithers serve` running there?")
                );
            }
            Ok(Err(e)) => return Err(self.unreachable(e)),
            Err(_) => {
                return Err(self.unreachable(format!(
                    "no connection within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
        let host_header = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: smithers-cli/{}\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.rpc_path,
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        if let Some(t) = &self.token {
            head.push_str("Authorization: Bearer ");
            head.push_str(t);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let write = async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.flush().await
        };
        write
            .await
            .map_err(|e| self.unreachable(format!("sending the request failed: {e}")))?;
        read_response(&mut stream)
            .await
            .map_err(|why| self.unreachable(why))
    }
}

/// Reads one HTTP/1.1 response: status line, headers, then a `Content-Length` body, a chunked
/// body, or everything up to the close.
async fn read_response<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<(u16, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err("the response headers are too large; is it an HTTP server?".into());
        }
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the response failed: {e}"))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "the connection closed without an answer".into()
            } else {
                "the connection closed in the middle of the response headers".into()
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| "the answer is not HTTP/1.x; is it a smithers gateway?".to_string())?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.parse()
                    .map_err(|_| format!("bad Content-Length `{v}` in the response"))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding")
            && v.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    if chunked {
        read_to_close(r, &mut body).await?;
        return Ok((status, dechunk(&body)?));
    }
    match length {
        Some(n) => {
            if n > MAX_BODY {
                return Err(format!("the response is too large ({n} bytes)"));
            }
            while body.len() < n {
                let got = r
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("reading the response failed: {e}"))?;
                if got == 0 {
                    return Err(format!(
                        "the connection closed after {} of {n} body bytes",
                        body.len()
                    ));
                }
                body.extend_from_slice(&chunk[..got]);
            }
            body.truncate(n);
        }
        None => read_to_close(r, &mut body).await?,
    }
    Ok((status, body))
}

async fn read_to_close<R: AsyncReadExt + Unpin>(
    r: &mut R,
    body: &mut Vec<u8>,
) -> Result<(), String> {
    let mut chunk = [0u8; 8192];
    loop {
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the response failed: {e}"))?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
        if body.len() > MAX_BODY {
            return Err("the response is too large".into());
        }
    }
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let i = find(raw, b"\r\n").ok_or("a chunked response ends early")?;
        let size_text = String::from_utf8_lossy(&raw[..i]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size `{size_text}` in the response"))?;
        raw = &raw[i + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size {
            return Err("a chunked response ends early".into());
        }
        out.extend_from_slice(&raw[..size]);
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The token: `--token`, else `SMITHERS_TOKEN` (empty means none).
pub fn token(flag: Option<&String>) -> Option<String> {
    flag.cloned()
        .or_else(|| std::env::var("SMITHERS_TOKEN").ok())
        .filter(|t| !t.is_empty())
}

/// Runs `cmd` against a gateway when it has `--url`; `None` when it is a local command.
/// Gateway errors print `error[CODE]: message` with the gateway's own code and exit 1.
pub async fn dispatch(cmd: &Cmd) -> Option<Result<u8, SmithersError>> {
    let remote = match cmd {
        Cmd::Ps { remote, .. }
        | Cmd::Inspect { remote, .. }
        | Cmd::Frames { remote, .. }
        | Cmd::Approve { remote, .. }
        | Cmd::Deny { remote, .. }
        | Cmd::Signal { remote, .. }
        | Cmd::Cancel { remote, .. }
        | Cmd::Rewind { remote, .. }
        | Cmd::Diff { remote, .. }
        | Cmd::Run { remote, .. }
        | Cmd::Logs { remote, .. }
        | Cmd::Rerun { remote, .. }
        | Cmd::Resume { remote, .. }
        | Cmd::Fork { remote, .. } => remote,
        _ => return None,
    };
    let url = remote.url.as_deref()?;
    let result = match Gateway::new(url, token(remote.token.as_ref())) {
        Ok(gw) => run(&gw, cmd).await,
        Err(e) => Err(e),
    };
    Some(match result {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error[{}]: {}", e.code, e.message);
            Ok(1)
        }
    })
}

async fn run(gw: &Gateway, cmd: &Cmd) -> Result<u8, RemoteError> {
    match cmd {
        Cmd::Ps {
            status,
            limit,
            json,
            ..
        } => ps(gw, status.as_deref(), *limit, *json).await,
        Cmd::Inspect { run_id, json, .. } => inspect(gw, run_id, *json).await,
        Cmd::Frames {
            run_id,
            frame,
            limit,
            json,
            ..
        } => frames(gw, run_id, *frame, *limit, *json).await,
        Cmd::Approve {
            run_id,
            node,
            iteration,
            note,
            select,
            rank,
            ..
        } => {
            let decision = match (select, rank) {
                (Some(s), _) => Some(json!({"selected": s})),
                (None, Some(r)) => Some(json!({"ranked": r})),
                _ => None,
            };
            decide(
                gw,
                run_id,
                node,
                *iteration,
                true,
                note.as_deref(),
                decision,
            )
            .await
        }
        Cmd::Deny {
            run_id,
            node,
            iteration,
            note,
            ..
        } => decide(gw, run_id, node, *iteration, false, note.as_deref(), None).await,
        Cmd::Signal {
            run_id,
            name,
            data,
            correlation_id,
            ..
        } => signal(gw, run_id, name, data.as_deref(), correlation_id.as_deref()).await,
        Cmd::Cancel { run_id, .. } => cancel(gw, run_id).await,
        Cmd::Rewind {
            run_id, frame, yes, ..
        } => rewind(gw, run_id, *frame, *yes).await,
        Cmd::Diff {
            run_id,
            node,
            iteration,
            json,
            ..
        } => crate::diff_cmd::diff_remote(gw, run_id, node, *iteration, *json).await,
        Cmd::Fork {
            run_id,
            frame,
            input,
            new_run_id,
            ..
        } => fork(gw, run_id, *frame, input.as_deref(), new_run_id.as_deref()).await,
        Cmd::Run {
            workflow,
            input,
            run_id,
            detach,
            ..
        } => {
            let input = match input {
                Some(t) => json_arg("--input", t)?,
                None => json!({}),
            };
            let start = crate::follow::Start::Create {
                workflow: workflow.clone(),
                input,
                run_id: run_id.clone(),
            };
            crate::follow::run(gw, start, *detach).await
        }
        Cmd::Logs {
            run_id,
            node,
            follow,
            ..
        } => crate::logs_cmd::remote(gw, run_id, node.as_deref(), *follow).await,
        Cmd::Rerun {
            run_id,
            new_run_id,
            detach,
            ..
        } => {
            let start = crate::follow::Start::Rerun {
                run_id: run_id.clone(),
                new_run_id: new_run_id.clone(),
            };
            crate::follow::run(gw, start, *detach).await
        }
        Cmd::Resume {
            run_id: Some(run_id),
            force,
            detach,
            ..
        } => {
            let start = crate::follow::Start::Resume {
                run_id: run_id.clone(),
                force: *force,
            };
            crate::follow::run(gw, start, *detach).await
        }
        _ => Err(RemoteError::new(
            Code::InvalidInput,
            "this command has no remote mode (`resume --orphans` takes over runs of the local database only)",
        )),
    }
}

async fn ps(
    gw: &Gateway,
    status: Option<&str>,
    limit: u16,
    as_json: bool,
) -> Result<u8, RemoteError> {
    runs::check_status(status)?;
    let mut params = json!({"limit": limit});
    if let Some(s) = status {
        params["status"] = json!(s);
    }
    if as_json {
        // the gateway's rows as they are
        let rows = gw.call("runs.list", params).await?;
        return Ok(runs::emit_json(&json!({ "runs": rows }))?);
    }
    let rows: Vec<RunRow> = gw.call_as("runs.list", params).await?;
    Ok(runs::print_ps(&rows)?)
}

async fn inspect(gw: &Gateway, run_id: &str, as_json: bool) -> Result<u8, RemoteError> {
    let run_v = gw.call("runs.get", json!({"runId": run_id})).await?;
    let run: RunRow = serde_json::from_value(run_v.clone()).map_err(|e| {
        RemoteError::new(
            Code::GatewayUnreachable,
            format!("the gateway answered runs.get with an unexpected shape ({e})"),
        )
    })?;
    let attempts_v = gw.call("attempts.list", json!({"runId": run_id})).await?;
    let attempts: Vec<AttemptRow> = serde_json::from_value(attempts_v.clone()).map_err(|e| {
        RemoteError::new(
            Code::GatewayUnreachable,
            format!("the gateway answered attempts.list with an unexpected shape ({e})"),
        )
    })?;
    // approvals.list holds the pending approvals of every run; keep this run's.
    let pending: Vec<Value> = match gw.call("approvals.list", json!({})).await? {
        Value::Array(items) => items
            .into_iter()
            .filter(|a| a.get("runId").and_then(Value::as_str) == Some(run_id))
            .map(|mut a| {
                if let Value::Object(m) = &mut a {
                    m.insert("status".into(), json!("requested"));
                }
                a
            })
            .collect(),
        _ => Vec::new(),
    };
    if as_json {
        let doc = json!({"run": run_v, "attempts": attempts_v, "approvals": pending});
        return Ok(runs::emit(&[
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        ])?);
    }
    let mut lines = runs::run_lines(&run);
    // The gateway has no node list: show its per-state counts, then every node that has run.
    let summary = run_v
        .get("summary")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(state, n)| format!("{state} {}", n.as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty());
    lines.push(match summary {
        Some(s) => format!("\nnodes: {s}"),
        None => "\nnodes:".into(),
    });
    // one line per (node, iteration) that has attempts, in run order (as locally), with the
    // state of its latest attempt
    let mut latest: std::collections::BTreeMap<(&str, i64), &AttemptRow> =
        std::collections::BTreeMap::new();
    for a in &attempts {
        let slot = latest.entry((a.node_id.as_str(), a.iteration)).or_insert(a);
        if a.attempt > slot.attempt {
            *slot = a;
        }
    }
    let states: Vec<(&str, i64, &str)> = latest
        .iter()
        .map(|((node, iteration), a)| (*node, *iteration, a.state.as_str()))
        .collect();
    // the latest frame's tree breaks ties (nodes that started in the same millisecond) in
    // workflow order, as locally; without it (no frame yet) node ids do
    let tree_pos = gw
        .call("frames.get", json!({"runId": run_id}))
        .await
        .ok()
        .and_then(|f| {
            f.get("xmlJson")
                .and_then(Value::as_str)
                .and_then(|t| serde_json::from_str::<Value>(t).ok())
        })
        .map(|t| runs::tree_order(&t))
        .unwrap_or_default();
    lines.extend(runs::node_lines(
        &states,
        &attempts,
        &tree_pos,
        smithers_engine::now_ms(),
    ));
    lines.extend(runs::agent_lines(&attempts));
    if !pending.is_empty() {
        lines.push("\napprovals:".into());
        for a in &pending {
            let node = a.get("nodeId").and_then(Value::as_str).unwrap_or("?");
            let it = a.get("iteration").and_then(Value::as_i64).unwrap_or(0);
            let title = a.get("requestTitle").and_then(Value::as_str);
            lines.push(runs::approval_line(node, it, "requested", None, title));
        }
    }
    Ok(runs::emit(&lines)?)
}

async fn frames(
    gw: &Gateway,
    run_id: &str,
    frame: Option<i64>,
    limit: usize,
    as_json: bool,
) -> Result<u8, RemoteError> {
    if let Some(n) = frame {
        let f: FrameRow = gw
            .call_as("frames.get", json!({"runId": run_id, "frameNo": n}))
            .await?;
        return Ok(runs::print_frame(&f)?);
    }
    let rows: Vec<Value> = if limit == 0 {
        // the gateway wants a positive limit; check the run exists, list nothing
        gw.call("runs.get", json!({"runId": run_id})).await?;
        Vec::new()
    } else {
        gw.call_as(
            "frames.list",
            json!({"runId": run_id, "limit": limit.min(10_000)}),
        )
        .await?
    };
    let mut listed = Vec::with_capacity(rows.len());
    for v in rows {
        // `nodeChanges` is null or absent when the gateway could not tell (or is older)
        let changes = v
            .get("nodeChanges")
            .and_then(|c| serde_json::from_value(c.clone()).ok());
        let row: FrameRow = serde_json::from_value(v).map_err(|e| {
            RemoteError::new(
                Code::GatewayUnreachable,
                format!("the gateway answered frames.list with an unexpected shape ({e})"),
            )
        })?;
        listed.push((row, changes));
    }
    Ok(runs::print_frame_list(&listed, as_json)?)
}

async fn decide(
    gw: &Gateway,
    run_id: &str,
    node: &str,
    iteration: i64,
    approved: bool,
    note: Option<&str>,
    decision: Option<Value>,
) -> Result<u8, RemoteError> {
    let mut params =
        json!({"runId": run_id, "nodeId": node, "iteration": iteration, "approved": approved});
    if let Some(n) = note {
        params["note"] = json!(n);
    }
    if let Some(d) = decision {
        params["decision"] = d;
    }
    gw.call("approvals.decide", params).await?;
    let verb = if approved { "approved" } else { "denied" };
    eprintln!("{verb} `{node}`; the gateway continues run {run_id}");
    Ok(0)
}

async fn signal(
    gw: &Gateway,
    run_id: &str,
    name: &str,
    data: Option<&str>,
    correlation: Option<&str>,
) -> Result<u8, RemoteError> {
    let payload = match data {
        Some(d) => json_arg("--data", d)?,
        None => json!({}),
    };
    let mut params = json!({"runId": run_id, "signalName": name, "data": payload});
    if let Some(c) = correlation {
        params["correlationId"] = json!(c);
    }
    let d = gw.call("signals.send", params).await?;
    let line = json!({
        "runId": d.get("runId"),
        "seq": d.get("seq"),
        "signalName": d.get("signalName"),
        "correlationId": d.get("correlationId"),
        "receivedAtMs": d.get("receivedAtMs"),
    });
    runs::emit(&[line.to_string()])?;
    eprintln!("signal `{name}` recorded; the gateway continues run {run_id}");
    Ok(0)
}

async fn cancel(gw: &Gateway, run_id: &str) -> Result<u8, RemoteError> {
    let r = gw.call("runs.cancel", json!({"runId": run_id})).await?;
    match r.get("status").and_then(Value::as_str) {
        Some("cancelling") => eprintln!(
            "run {run_id} is running on the gateway; its engine has been asked to cancel it"
        ),
        _ => eprintln!("run {run_id} cancelled"),
    }
    Ok(0)
}

/// `jumpToFrame`: the gateway stops the run, rewinds it and resumes it.
async fn rewind(gw: &Gateway, run_id: &str, frame: i64, yes: bool) -> Result<u8, RemoteError> {
    let r = gw
        .call(
            "jumpToFrame",
            json!({"runId": run_id, "frameNo": frame, "confirm": yes}),
        )
        .await?;
    println!("{r}");
    if r.get("deletedFrames").and_then(Value::as_i64) == Some(0) {
        eprintln!("run {run_id} already is at frame {frame}; nothing changed");
    } else {
        eprintln!("run {run_id} is back at frame {frame} and runs again on the gateway");
    }
    Ok(0)
}

/// `runs.fork`: a new run on the gateway from the state at a frame.
async fn fork(
    gw: &Gateway,
    run_id: &str,
    frame: i64,
    input: Option<&str>,
    new_run_id: Option<&str>,
) -> Result<u8, RemoteError> {
    let mut params = json!({"runId": run_id, "frameNo": frame});
    if let Some(i) = input {
        params["input"] = crate::json_arg("--input", i)?;
    }
    if let Some(n) = new_run_id {
        params["newRunId"] = json!(n);
    }
    let r = gw.call("runs.fork", params).await?;
    println!("{r}");
    if let Some(id) = r.get("runId").and_then(Value::as_str) {
        eprintln!("forked {run_id} at frame {frame} as {id}; it runs on the gateway");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Gateway, RemoteError> {
        Gateway::new(url, None)
    }

    #[test]
    fn urls() {
        let g = parse("http://127.0.0.1:7331").unwrap();
        assert_eq!((g.host.as_str(), g.port), ("127.0.0.1", 7331));
        assert_eq!(g.rpc_path, "/rpc");
        assert_eq!(g.base, "http://127.0.0.1:7331");
        let g = parse("http://gw.example/smithers/").unwrap();
        assert_eq!((g.host.as_str(), g.port), ("gw.example", 80));
        assert_eq!(g.rpc_path, "/smithers/rpc");
        let g = parse("HTTP://[::1]:9000").unwrap();
        assert_eq!((g.host.as_str(), g.port), ("::1", 9000));
        assert_eq!(g.base, "http://[::1]:9000");
        for bad in [
            "https://x:1",
            "ftp://x",
            "x:7331",
            "http://",
            "http://:80",
            "http://h:0",
            "http://h:99999",
            "http://h:port",
            "http://u:p@h:1",
            "http://h:1/rpc?x=1",
            "http://[::1",
            "http://h h:1",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, "INVALID_URL", "{bad}");
        }
        assert!(parse("https://x").unwrap_err().message.contains("TLS"));
    }

    #[test]
    fn gateway_codes_read_like_local_ones() {
        assert_eq!(cli_code("RunNotFound", ""), "RUN_NOT_FOUND");
        assert_eq!(
            cli_code("ConfirmationRequired", ""),
            "CONFIRMATION_REQUIRED"
        );
        assert_eq!(cli_code("Unauthorized", ""), "UNAUTHORIZED");
        assert_eq!(cli_code("UNAUTHORIZED", ""), "UNAUTHORIZED");
        assert_eq!(cli_code("INVALID_REQUEST", "x"), "INVALID_INPUT");
        assert_eq!(cli_code("NOT_FOUND", "Run not found: r"), "RUN_NOT_FOUND");
        assert_eq!(
            cli_code("NOT_FOUND", "Unknown workflow: w"),
            "WORKFLOW_NOT_FOUND"
        );
        assert_eq!(cli_code("NOT_FOUND", "Frame not found"), "NOT_FOUND");
        let g = parse("http://gw.example/smithers/").unwrap();
        assert_eq!(g.ws_url(), "ws://gw.example:80/smithers/");
    }

    #[test]
    fn token_is_redacted_and_checked() {
        let g = Gateway::new("http://h:1", Some("s3cret".into())).unwrap();
        assert!(!format!("{g:?}").contains("s3cret"));
        let e = Gateway::new("http://h:1", Some("a\r\nX: y".into())).unwrap_err();
        assert_eq!(e.code, "INVALID_INPUT");
        assert!(!e.message.contains("X: y"));
    }

    #[tokio::test]
    async fn responses() {
        let mut r: &[u8] =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 4\r\n\r\ntrueEXTRA";
        assert_eq!(
            read_response(&mut r).await.unwrap(),
            (200, b"true".to_vec())
        );
        let mut r: &[u8] =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            read_response(&mut r).await.unwrap(),
            (404, b"abcde".to_vec())
        );
        let mut r: &[u8] = b"HTTP/1.0 200 OK\r\n\r\nto the end";
        assert_eq!(
            read_response(&mut r).await.unwrap(),
            (200, b"to the end".to_vec())
        );
        let mut r: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        assert!(read_response(&mut r).await.is_err());
        let mut r: &[u8] = b"SSH-2.0-OpenSSH\r\n\r\n";
        assert!(read_response(&mut r).await.is_err());
        let mut r: &[u8] = b"";
        assert!(read_response(&mut r).await.is_err());
    }
}
