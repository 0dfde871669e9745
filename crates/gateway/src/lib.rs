//! The Smithers gateway: protocol v1 over HTTP (`POST /rpc`) and WebSocket, webhooks, cron and
//! metrics, in front of the engine.

pub mod auth;
pub mod bounds;
pub mod cron;
pub mod error;
pub mod metrics;
pub mod webhook;

pub use error::RpcError;
