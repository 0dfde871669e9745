//! Trusted-proxy mode (gateway-protocol §2.4): the identity comes from headers that a reverse
//! proxy sets after authenticating the user itself.

use axum::http::header::ORIGIN;
use axum::http::{HeaderMap, HeaderName};

use super::scopes::split_scopes;
use super::{DEFAULT_ROLE, Grant, Refusal};

const DEFAULT_TRUSTED_HEADERS: [&str; 3] = ["x-user-id", "x-user-scopes", "x-user-role"];

/// Trusted-proxy mode settings (§2.4).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Accepted `Origin` values; empty accepts any request, with or without `Origin`.
    pub allowed_origins: Vec<String>,
    pub user_header: HeaderName,
    pub scopes_header: HeaderName,
    pub role_header: HeaderName,
    pub default_role: String,
    /// Scopes of a request without a scopes header (a present but blank header grants none).
    pub default_scopes: Vec<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        let [user, scopes, role] = DEFAULT_TRUSTED_HEADERS.map(HeaderName::from_static);
        ProxyConfig {
            allowed_origins: Vec::new(),
            user_header: user,
            scopes_header: scopes,
            role_header: role,
            default_role: DEFAULT_ROLE.into(),
            // Upstream's default: a proxy that sends no scopes header grants everything.
            default_scopes: vec!["*".into()],
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl ProxyConfig {
    /// The identity the proxy asserted. Empty user and role headers count as absent. The
    /// scopes header is different (deliberate deviation, docs/protocol.md): only an absent
    /// header takes `default_scopes`; a header that is present but empty, blank or unreadable
    /// grants no scopes, because upstream's fallback turned a proxy's "no scopes" into `"*"`.
    pub(super) fn identify(&self, headers: &HeaderMap) -> Result<Grant, Refusal> {
        if !self.allowed_origins.is_empty() {
            let allowed = header_str(headers, &ORIGIN)
                .is_some_and(|origin| self.allowed_origins.iter().any(|o| o == origin));
            if !allowed {
                return Err(Refusal::new("Origin is not allowed"));
            }
        }
        let user_id = header_str(headers, &self.user_header)
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        let scopes = if headers.contains_key(&self.scopes_header) {
            // Repeated scope headers are all honoured, as Node joins them with ", ".
            headers
                .get_all(&self.scopes_header)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(split_scopes)
                .collect()
        } else {
            self.default_scopes.clone()
        };
        let role = header_str(headers, &self.role_header)
            .filter(|v| !v.is_empty())
            .map_or_else(|| self.default_role.clone(), str::to_string);
        Ok(Grant {
            role,
            scopes,
            user_id,
        })
    }
}
