//! The hello snapshot read (`connect`'s `snapshot`) shared by concurrent connects. Knows
//! nothing of the gateway: the caller passes the read itself.

use crate::error::RpcError;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};

/// One hello snapshot read serves every `connect` that arrived before the read started.
///
/// Reads are serialized; a `connect` takes the result of the latest read if that read started
/// after the `connect` arrived, and otherwise starts a new one. Either way the snapshot it gets
/// was read entirely after it asked, exactly as fresh as reading it alone, but a burst of
/// connects costs a few reads instead of one read (five queries) each.
#[derive(Default)]
pub struct SharedSnapshot {
    /// Reads started so far; read `n` starts after this counter reached `n`.
    started: AtomicU64,
    /// The number of the latest finished read and its result.
    last: tokio::sync::Mutex<Option<(u64, Result<Value, RpcError>)>>,
}

impl SharedSnapshot {
    /// The result of a `read` that started after this call: this caller's own, or one that a
    /// concurrent caller started later.
    pub async fn get<F, Fut>(&self, read: F) -> Result<Value, RpcError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Value, RpcError>>,
    {
        let arrived = self.started.load(Ordering::Acquire);
        let mut last = self.last.lock().await;
        if let Some((n, result)) = &*last
            && *n > arrived
        {
            return result.clone();
        }
        let n = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        let result = read().await;
        *last = Some((n, result.clone()));
        result
    }
}
