//! The Smithers gateway: protocol v1 over HTTP (`POST /rpc`) and WebSocket, webhooks, cron and
//! metrics, in front of the engine.

pub mod auth;
pub mod body;
pub mod bounds;
pub mod broadcast;
pub mod cron;
pub mod error;
pub mod metrics;
pub mod webhook;

pub mod clock;
pub mod config;
pub mod conn_io;
pub mod conn_limit;
pub mod console;
pub mod cron_loop;
pub mod devtools;
pub mod devtools_diff;
pub mod devtools_tree;
pub mod fd_limit;
pub mod foreign;
pub mod frames;
pub mod gateway;
pub mod http;
pub mod jump;
pub mod last_seqs;
pub mod listener;
pub mod log_rate;
pub mod methods;
pub mod node_diff;
pub mod node_output;
pub mod outbound;
pub mod replay;
pub mod replay_gate;
pub mod request;
pub mod run_control;
pub mod run_view;
pub mod serve;
pub mod server_config;
pub mod shapes;
pub mod shared_snapshot;
pub mod startup_pages;
pub mod stream;
pub mod stream_registry;
pub mod telemetry;
pub mod ws;
pub mod ws_budget;

pub use error::RpcError;
