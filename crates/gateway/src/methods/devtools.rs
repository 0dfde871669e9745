//! The DevTools methods: `getDevToolsSnapshot`, `streamDevTools`, `getNodeOutput`,
//! `getNodeDiff` and `jumpToFrame` (each also reachable under its `devtools.` alias where
//! upstream has one). Each lives in its own module; these entries only route to them.

use super::{Call, Transport};
use crate::error::RpcError;
use serde_json::Value;

pub async fn snapshot(c: &Call<'_>) -> Result<Value, RpcError> {
    crate::devtools::snapshot(c.gw, c.caller, &c.params).await
}

pub async fn stream(c: &Call<'_>) -> Result<Value, RpcError> {
    crate::stream::start(c.gw, c.caller, c.transport == Transport::Ws, &c.params).await
}

pub async fn node_output(c: &Call<'_>) -> Result<Value, RpcError> {
    crate::node_output::get(c.gw, &c.params).await
}

pub async fn node_diff(c: &Call<'_>) -> Result<Value, RpcError> {
    crate::node_diff::get(c.gw, &c.params).await
}

pub async fn jump(c: &Call<'_>) -> Result<Value, RpcError> {
    crate::jump::jump_to_frame(c.gw, c.caller, &c.params).await
}
