//! The RPC method layer (gateway-protocol §1.10): one table maps each method name to its
//! handler, and each area (runs, history, approvals, signals, cron, devtools, workflows) has its own
//! module. Handlers get an already authenticated and scope-checked [`Call`]; they read and act
//! through the engine and the store, and never touch connections or transports directly.

mod approvals;
mod cron;
mod devtools;
mod history;
pub mod params;
mod runs;
mod signals;
mod workflows;

pub use approvals::pending as pending_approvals;

use crate::error::RpcError;
use crate::gateway::{Caller, Gateway};
use serde_json::{Value, json};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Transport a call came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Ws,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Ws => "ws",
        }
    }
}

/// One method call: who asked, over what, with which parameters (always an object: upstream
/// treats a non-object `params` as `{}`).
pub struct Call<'a> {
    pub gw: &'a Arc<Gateway>,
    pub caller: &'a Caller<'a>,
    pub transport: Transport,
    pub params: Value,
}

/// What a handler returns.
pub type Reply<'a> = Pin<Box<dyn Future<Output = Result<Value, RpcError>> + Send + 'a>>;

/// A method: its wire name and its handler.
pub struct Method {
    pub name: &'static str,
    pub handler: for<'a> fn(&'a Call<'a>) -> Reply<'a>,
}

macro_rules! method {
    ($name:literal, $handler:path) => {
        Method {
            name: $name,
            handler: |c| Box::pin($handler(c)),
        }
    };
}

/// Every method the gateway serves. Scope levels are in [`crate::auth::required_level`].
pub static METHODS: &[Method] = &[
    method!("health", runs::health),
    method!("runs.list", runs::list),
    method!("runs.get", runs::get),
    method!("runs.create", runs::create),
    method!("runs.cancel", runs::cancel),
    method!("runs.rerun", runs::rerun),
    method!("runs.resume", runs::resume),
    method!("runs.fork", runs::fork),
    method!("runs.diff", runs::diff),
    method!("frames.list", history::frames_list),
    method!("frames.get", history::frames_get),
    method!("attempts.list", history::attempts_list),
    method!("attempts.get", history::attempts_get),
    method!("runs.events", history::events),
    method!("approvals.list", approvals::list),
    method!("approvals.decide", approvals::decide),
    method!("signals.send", signals::send),
    method!("cron.list", cron::list),
    method!("cron.add", cron::add),
    method!("cron.remove", cron::remove),
    method!("cron.trigger", cron::trigger),
    method!("getNodeOutput", devtools::node_output),
    method!("devtools.getNodeOutput", devtools::node_output),
    method!("getNodeDiff", devtools::node_diff),
    method!("devtools.getNodeDiff", devtools::node_diff),
    method!("getDevToolsSnapshot", devtools::snapshot),
    method!("streamDevTools", devtools::stream),
    method!("jumpToFrame", devtools::jump),
    method!("devtools.jumpToFrame", devtools::jump),
    method!("workflows.list", workflows::list),
];

/// The method of that name.
pub fn find(name: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.name == name)
}

/// The name to record in metric labels: the method's own name when it is one we serve (or
/// `connect`), else `unknown`, so that made-up names cannot create a metric series each.
pub fn metric_label(name: &str) -> &'static str {
    if name == "connect" {
        return "connect";
    }
    find(name).map_or("unknown", |m| m.name)
}

/// Runs one method call.
pub async fn call(
    gw: &Arc<Gateway>,
    caller: &Caller<'_>,
    transport: Transport,
    method: &str,
    params: &Value,
) -> Result<Value, RpcError> {
    let Some(m) = find(method) else {
        return Err(RpcError::new(
            "METHOD_NOT_FOUND",
            format!("Unknown method: {method}"),
        ));
    };
    let call = Call {
        gw,
        caller,
        transport,
        params: if params.is_object() {
            params.clone()
        } else {
            json!({})
        },
    };
    params::check_no_nul(&call.params)?;
    (m.handler)(&call).await
}
