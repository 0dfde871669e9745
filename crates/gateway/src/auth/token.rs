//! Token mode (gateway-protocol §2.2): static bearer tokens, each mapped to its grant.

use std::collections::HashMap;

use sha2_010::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use super::Grant;

/// Finds the grant of `candidate` in constant time with respect to the tokens' contents: every
/// configured token is compared (as a SHA-256 digest, so lengths and common prefixes do not
/// matter) without stopping at the first match.
pub(super) fn lookup<'a>(tokens: &'a HashMap<String, Grant>, candidate: &str) -> Option<&'a Grant> {
    let wanted = Sha256::digest(candidate.as_bytes());
    let mut found = Choice::from(0);
    let mut index = 0u64;
    for (i, key) in tokens.keys().enumerate() {
        let eq = Sha256::digest(key.as_bytes())
            .as_slice()
            .ct_eq(wanted.as_slice());
        index = u64::conditional_select(&index, &(i as u64), eq);
        found |= eq;
    }
    if bool::from(found) {
        // Only reached with a valid token, so the position of the match is no longer secret.
        usize::try_from(index)
            .ok()
            .and_then(|i| tokens.iter().nth(i))
            .map(|(_, grant)| grant)
    } else {
        None
    }
}
