//! `POST /webhooks/<key>` (gateway-protocol §3): signed deliveries that wake waiting runs or
//! start new ones.
//!
//! A delivery goes through [`route`]: its body is read under the unverified-bytes budget
//! ([`Shared::unverified`]), its [`signature`] checked, its payload read ([`paths`]), its
//! delivery id claimed so that a repeat is answered as a duplicate ([`dedupe`]), and then it
//! is acted on ([`deliver`]). [`config`] is the `[workflows.webhook]` table.

pub mod config;
mod dedupe;
mod deliver;
mod log;
pub mod paths;
mod route;
pub mod signature;

pub use config::{
    DEFAULT_DELIVERY_HEADER, DEFAULT_SIGNATURE_HEADER, DEFAULT_SIGNATURE_PREFIX, RunToml,
    SignalConfig, WebhookConfig, WebhookToml,
};
pub use dedupe::prune_expired;
pub use paths::{parse_payload, read_path_value, run_input, scalar_id};
pub use route::handle;
pub use signature::{sign, verify_signature};

use crate::body::ByteBudget;
use crate::server_config::Limits;

/// Webhook state shared by every delivery to one gateway.
pub struct Shared {
    /// Bytes of webhook bodies held before their signature is checked
    /// (`max_unverified_webhook_bytes`): nobody has vouched for them yet, so they get their
    /// own budget, separate from everything an authenticated client may do.
    pub unverified: ByteBudget,
    log: log::Throttles,
}

impl Shared {
    pub fn new(limits: &Limits) -> Self {
        Shared {
            unverified: ByteBudget::new(limits.max_unverified_webhook_bytes),
            log: log::Throttles::default(),
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("unverified_capacity", &self.unverified.capacity())
            .field("unverified_available", &self.unverified.available())
            .finish_non_exhaustive()
    }
}
