//! RPC errors: a wire code (string, as the protocol spells it) and a message, plus the HTTP
//! status each code maps to.

use smithers_core::SmithersError;

/// An error as it travels in a response frame: `{"code": …, "message": …}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: String,
    pub message: String,
}

impl RpcError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        RpcError {
            code: code.to_string(),
            message: message.into(),
        }
    }

    /// HTTP status for this code (gateway-protocol §1.9, with DESIGN §5's fixes:
    /// `RUN_NOT_ACTIVE` is 409 and `PAYLOAD_TOO_LARGE` is 413; and the codes of issue 9's
    /// limits: `REQUEST_TIMEOUT` 408, `SERVICE_UNAVAILABLE` 503, `DELIVERY_IN_PROGRESS` 409).
    pub fn status(&self) -> u16 {
        status_for(&self.code)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code, "message": self.message})
    }
}

/// Maps an error code to its HTTP status.
pub fn status_for(code: &str) -> u16 {
    match code {
        "UNAUTHORIZED" | "Unauthorized" => 401,
        "FORBIDDEN" => 403,
        "NOT_FOUND" | "METHOD_NOT_FOUND" | "RunNotFound" | "NodeNotFound" | "AttemptNotFound"
        | "IterationNotFound" | "NodeHasNoOutput" | "RUN_NOT_FOUND" | "NODE_NOT_FOUND"
        | "WORKFLOW_NOT_FOUND" => 404,
        "INVALID_REQUEST"
        | "INVALID_FRAME"
        | "INVALID_INPUT"
        | "INVALID_JSON"
        | "UNKNOWN_SIGNAL"
        | "PROTOCOL_UNSUPPORTED"
        | "InvalidRunId"
        | "InvalidNodeId"
        | "InvalidIteration"
        | "InvalidDelta"
        | "InvalidFrameNo"
        | "ConfirmationRequired"
        | "FrameOutOfRange"
        | "SeqOutOfRange" => 400,
        "AttemptNotFinished"
        | "Busy"
        | "RUN_NOT_ACTIVE"
        | "NOT_WAITING_APPROVAL"
        | "RUN_STILL_RUNNING"
        | "RUN_EXISTS"
        | "RUN_NOT_RESUMABLE"
        | "RESUME_METADATA_MISMATCH"
        | "DELIVERY_IN_PROGRESS" => 409,
        "REQUEST_TIMEOUT" => 408,
        "DiffTooLarge" | "PayloadTooLarge" | "PAYLOAD_TOO_LARGE" => 413,
        "RateLimited" | "BackpressureDisconnect" => 429,
        "UnsupportedSandbox" => 501,
        "SERVICE_UNAVAILABLE" => 503,
        _ => 500,
    }
}

impl From<SmithersError> for RpcError {
    fn from(e: SmithersError) -> Self {
        RpcError {
            code: e.code.as_str().to_string(),
            message: e.message,
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for RpcError {}
