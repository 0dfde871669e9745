//! Webhook signatures (gateway-protocol §3 step 6): HMAC-SHA256 of the raw body, keyed with the
//! workflow's secret, checked in constant time before the body is parsed or acted on.

use super::config::WebhookConfig;
use hmac::{Hmac, Mac};
use sha2_010::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// `prefix + lowercase hex HMAC-SHA256(secret trimmed, body)`: what a sender puts in the
/// signature header.
pub fn sign(cfg: &WebhookConfig, body: &[u8]) -> String {
    match HmacSha256::new_from_slice(cfg.secret.trim().as_bytes()) {
        Ok(mut mac) => {
            mac.update(body);
            format!(
                "{}{}",
                cfg.signature_prefix,
                hex::encode(mac.finalize().into_bytes())
            )
        }
        Err(_) => String::new(),
    }
}

/// §3 step 6: the header value, trimmed and lower-cased, must be exactly the prefix followed by
/// the lowercase hex HMAC-SHA256 of the body keyed with the trimmed secret. The digest is
/// compared in constant time; a missing header, an empty secret or a wrong length fails.
pub fn verify_signature(cfg: &WebhookConfig, header_value: Option<&str>, body: &[u8]) -> bool {
    let Some(header) = header_value else {
        return false;
    };
    let secret = cfg.secret.trim();
    if secret.is_empty() {
        return false;
    }
    let header = header.trim().to_lowercase();
    let Some(hex_digest) = header.strip_prefix(cfg.signature_prefix.as_str()) else {
        return false;
    };
    // 32 bytes as lowercase hex; `hex::decode` alone would also accept upper case.
    if hex_digest.len() != 64
        || !hex_digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return false;
    }
    let Ok(digest) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&digest).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::config::{DEFAULT_DELIVERY_HEADER, DEFAULT_SIGNATURE_HEADER};

    fn cfg(secret: &str, prefix: &str) -> WebhookConfig {
        WebhookConfig {
            secret: secret.into(),
            signature_header: DEFAULT_SIGNATURE_HEADER.into(),
            signature_prefix: prefix.into(),
            delivery_header: DEFAULT_DELIVERY_HEADER.into(),
            signal: None,
            run_enabled: true,
            input_path: None,
        }
    }

    /// HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog") (RFC test vector).
    const FOX: &str = "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8";
    const FOX_BODY: &[u8] = b"The quick brown fox jumps over the lazy dog";

    #[test]
    fn signature_right_and_wrong() {
        let c = cfg("key", "sha256=");
        assert_eq!(sign(&c, FOX_BODY), format!("sha256={FOX}"));
        assert!(verify_signature(
            &c,
            Some(&format!("sha256={FOX}")),
            FOX_BODY
        ));
        assert!(
            verify_signature(&c, Some(&format!("  sha256={FOX}\n")), FOX_BODY),
            "trimmed"
        );
        assert!(
            verify_signature(
                &c,
                Some(&format!("SHA256={}", FOX.to_uppercase())),
                FOX_BODY
            ),
            "header is lower-cased"
        );
        let mut wrong = FOX.to_string();
        wrong.replace_range(0..1, "0");
        assert!(!verify_signature(
            &c,
            Some(&format!("sha256={wrong}")),
            FOX_BODY
        ));
        assert!(!verify_signature(
            &c,
            Some(&format!("sha256={FOX}")),
            b"other body"
        ));
        assert!(
            !verify_signature(&c, Some(&format!("sha256={}", &FOX[..62])), FOX_BODY),
            "short"
        );
        assert!(
            !verify_signature(&c, Some(&format!("sha256={FOX}00")), FOX_BODY),
            "long"
        );
        assert!(!verify_signature(&c, Some(FOX), FOX_BODY), "prefix missing");
        assert!(!verify_signature(
            &c,
            Some(&format!("sha1={FOX}")),
            FOX_BODY
        ));
        assert!(!verify_signature(&c, Some(""), FOX_BODY));
        assert!(!verify_signature(&c, None, FOX_BODY), "missing header");
        assert!(!verify_signature(
            &cfg("other", "sha256="),
            Some(&format!("sha256={FOX}")),
            FOX_BODY
        ));
        assert!(!verify_signature(
            &cfg("  ", "sha256="),
            Some(&sign(&cfg("  ", "sha256="), b"")),
            b""
        ));
        let zz = "z".repeat(64);
        assert!(
            !verify_signature(&c, Some(&format!("sha256={zz}")), FOX_BODY),
            "not hex"
        );
    }

    #[test]
    fn empty_prefix_and_trimmed_secret() {
        let c = cfg("key", "");
        assert!(verify_signature(&c, Some(FOX), FOX_BODY));
        assert!(!verify_signature(
            &c,
            Some(&format!("sha256={FOX}")),
            FOX_BODY
        ));
        let padded = cfg("  key\n", "sha256=");
        assert!(verify_signature(
            &padded,
            Some(&format!("sha256={FOX}")),
            FOX_BODY
        ));
        assert_eq!(sign(&padded, FOX_BODY), format!("sha256={FOX}"));
    }
}
