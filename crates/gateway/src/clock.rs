//! The wall clock as the gateway's credential checks read it.

/// Unix time in whole seconds (JWT `exp`/`nbf`/`iat` are in seconds).
pub fn now_secs() -> i64 {
    smithers_engine::now_ms() / 1000
}
