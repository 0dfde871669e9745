//! Errors with stable codes. Every failure a user can see carries a code from [`Code`], so
//! scripts and clients can branch on it without parsing messages.

use serde::{Deserialize, Serialize};

macro_rules! codes {
    ($($variant:ident => $s:literal),* $(,)?) => {
        /// Stable error codes (the strings are part of the protocol contract).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code { $($variant),* }
        impl Code {
            /// The wire form of the code, e.g. `"INVALID_INPUT"`.
            pub fn as_str(self) -> &'static str { match self { $(Code::$variant => $s),* } }
            /// Every code, for listings and documentation checks.
            pub const ALL: &'static [Code] = &[$(Code::$variant),*];
            /// Parses a wire code back; unknown codes map to `Internal`.
            pub fn parse(s: &str) -> Code { match s { $($s => Code::$variant,)* _ => Code::Internal } }
        }
    };
}

codes! {
    InvalidInput => "INVALID_INPUT",
    InvalidWorkflow => "INVALID_WORKFLOW",
    WorkflowNotFound => "WORKFLOW_NOT_FOUND",
    ExpressionError => "EXPRESSION_ERROR",
    UnknownOutputSchema => "UNKNOWN_OUTPUT_SCHEMA",
    InvalidOutput => "INVALID_OUTPUT",
    DuplicateId => "DUPLICATE_ID",
    InvalidDuration => "INVALID_DURATION",
    TaskFailed => "TASK_FAILED",
    TaskTimeout => "TASK_TIMEOUT",
    TaskIdleTimeout => "TASK_IDLE_TIMEOUT",
    TaskAborted => "TASK_ABORTED",
    ProcessSpawnFailed => "PROCESS_SPAWN_FAILED",
    ProcessFailed => "PROCESS_FAILED",
    OutputTooLarge => "OUTPUT_TOO_LARGE",
    RunNotFound => "RUN_NOT_FOUND",
    RunExists => "RUN_EXISTS",
    RunNotResumable => "RUN_NOT_RESUMABLE",
    RunStillRunning => "RUN_STILL_RUNNING",
    RunResumeClaimFailed => "RUN_RESUME_CLAIM_FAILED",
    RunCancelled => "RUN_CANCELLED",
    RunNotActive => "RUN_NOT_ACTIVE",
    RunLeaseLost => "RUN_LEASE_LOST",
    RunNeedsAttention => "RUN_NEEDS_ATTENTION",
    ResumeMetadataMismatch => "RESUME_METADATA_MISMATCH",
    NodeNotFound => "NODE_NOT_FOUND",
    NotWaitingApproval => "NOT_WAITING_APPROVAL",
    UnknownSignal => "UNKNOWN_SIGNAL",
    NoPendingApprovals => "NO_PENDING_APPROVALS",
    ApprovalDenied => "APPROVAL_DENIED",
    ApprovalOptionsRequired => "APPROVAL_OPTIONS_REQUIRED",
    RalphMaxReached => "RALPH_MAX_REACHED",
    WorkflowExecutionFailed => "WORKFLOW_EXECUTION_FAILED",
    SchedulerError => "SCHEDULER_ERROR",
    DbQueryFailed => "DB_QUERY_FAILED",
    DbWriteFailed => "DB_WRITE_FAILED",
    DbCorrupt => "DB_CORRUPT",
    StorageError => "STORAGE_ERROR",
    InvalidUrl => "INVALID_URL",
    GatewayUnreachable => "GATEWAY_UNREACHABLE",
    AddressInUse => "ADDRESS_IN_USE",
    InvalidConfig => "INVALID_CONFIG",
    IoError => "IO_ERROR",
    AgentCliError => "AGENT_CLI_ERROR",
    AgentConfigInvalid => "AGENT_CONFIG_INVALID",
    AgentHttpError => "AGENT_HTTP_ERROR",
    Internal => "INTERNAL_ERROR",
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one error type that crosses crate boundaries: a stable code plus a message that says
/// what was wrong, where, and how to fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct SmithersError {
    pub code: Code,
    pub message: String,
    /// Whether a retry could help (false for deterministic failures such as invalid output).
    pub retryable: bool,
    /// The workflow node the error belongs to, when there is one.
    pub node: Option<String>,
}

impl SmithersError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        SmithersError {
            code,
            message: message.into(),
            retryable: true,
            node: None,
        }
    }

    /// Marks the error as deterministic: retrying the same attempt cannot help.
    pub fn terminal(mut self) -> Self {
        self.retryable = false;
        self
    }

    /// Attaches the node the error belongs to.
    pub fn with_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// The JSON shape stored in `error_json` columns and sent on the wire.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": "SmithersError",
            "code": self.code.as_str(),
            "message": self.message,
            "retryable": self.retryable,
            "nodeId": self.node,
        })
    }

    /// Reads an error back from an `error_json` column; tolerant of foreign shapes.
    pub fn from_json(v: &serde_json::Value) -> Self {
        let code = v
            .get("code")
            .and_then(|c| c.as_str())
            .map(Code::parse)
            .unwrap_or(Code::Internal);
        let message = v
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("unknown error")
            .to_string();
        let retryable = v.get("retryable").and_then(|r| r.as_bool()).unwrap_or(true);
        let node = v.get("nodeId").and_then(|n| n.as_str()).map(str::to_string);
        SmithersError {
            code,
            message,
            retryable,
            node,
        }
    }
}

/// Shorthand for results in Smithers crates.
pub type Result<T, E = SmithersError> = std::result::Result<T, E>;

/// Builds a [`SmithersError`] with `format!` arguments.
#[macro_export]
macro_rules! err {
    ($code:ident, $($arg:tt)*) => {
        $crate::error::SmithersError::new($crate::error::Code::$code, format!($($arg)*))
    };
}

/// A problem found while loading or validating a workflow file; `smithers validate` prints all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub file: String,
    pub line: Option<usize>,
    pub node: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ":")?;
        if let Some(n) = &self.node {
            write!(f, " node `{n}`")?;
        }
        if let Some(fl) = &self.field {
            write!(f, " field `{fl}`")?;
        }
        if self.node.is_some() || self.field.is_some() {
            write!(f, ":")?;
        }
        write!(f, " {}", self.message)
    }
}

/// An error with its causes, one after another (`client error (Connect): tcp connect error:
/// Connection refused`): HTTP client errors hide what went wrong in their sources, and an
/// operator needs all of it in one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
