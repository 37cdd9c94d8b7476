//! The `Coinflow-Signature` scheme: `t=<unix seconds>,v1=<lowercase hex>`, where `v1` is
//! HMAC-SHA256(key = the Validation Key as UTF-8, message = `t` + `.` + raw body bytes).
//!
//! Verification runs over the exact bytes received, tries every active key (rotation),
//! accepts any of several `v1` values, compares in constant time, and rejects a `t` more
//! than the tolerance away from now. [`sign`] is the sender side of the same definition.

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

/// The header Coinflow signs with.
pub const HEADER: &str = "coinflow-signature";

/// The most `v1` values one header may carry.
const MAX_SIGNATURES: usize = 8;

/// Why a signature was refused. Messages never contain the key or the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not `t=<digits>,v1=<64 hex>[,v1=…]`.
    #[error("malformed Coinflow-Signature header")]
    Malformed,
    /// `t` is further from now than the tolerance.
    #[error("Coinflow-Signature timestamp outside the tolerance")]
    Stale,
    /// No `v1` matches any active key.
    #[error("Coinflow-Signature does not match")]
    Mismatch,
}

/// A parsed header. `t` is kept as sent: the HMAC covers those exact digits.
#[derive(Debug, PartialEq, Eq)]
struct Parsed<'a> {
    t_raw: &'a str,
    t: i64,
    v1: Vec<[u8; 32]>,
}

fn parse(header: &str) -> Result<Parsed<'_>, SignatureError> {
    let mut t_raw = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        let (name, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match name {
            "t" if t_raw.is_none() => t_raw = Some(value),
            "v1" if v1.len() < MAX_SIGNATURES => {
                let mut mac = [0u8; 32];
                hex::decode_to_slice(value, &mut mac).map_err(|_| SignatureError::Malformed)?;
                v1.push(mac);
            }
            "t" | "v1" => return Err(SignatureError::Malformed),
            // Other schemes (a future v2) are ignored, as the convention goes.
            _ => {}
        }
    }
    let t_raw = t_raw.ok_or(SignatureError::Malformed)?;
    if t_raw.is_empty() || t_raw.len() > 12 || !t_raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::Malformed);
    }
    let t = t_raw.parse().map_err(|_| SignatureError::Malformed)?;
    if v1.is_empty() {
        return Err(SignatureError::Malformed);
    }
    Ok(Parsed { t_raw, t, v1 })
}

fn mac(key: &SecretString, t: &str, body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose_secret().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(t.as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().into()
}

/// Verifies `header` over `body` against every key in `keys`.
pub fn verify(
    header: &str,
    body: &[u8],
    keys: &[SecretString],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let parsed = parse(header)?;
    if now_unix.abs_diff(parsed.t) > tolerance_secs.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let mut ok = Choice::from(0);
    for key in keys {
        let expected = mac(key, parsed.t_raw, body);
        for candidate in &parsed.v1 {
            ok |= expected.ct_eq(candidate);
        }
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Signs `body` the way Coinflow does, returning the header value.
pub fn sign(key: &SecretString, t_unix: i64, body: &[u8]) -> String {
    let t = t_unix.to_string();
    format!("t={t},v1={}", hex::encode(mac(key, &t, body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "cf_whk_test_0123456789abcdef";
    const T: i64 = 1_795_626_000;
    const VECTOR: &str =
        "t=1795626000,v1=267a004c172aa6d262b14e847409330f0c72a33c496f74cccc8f5e59b78ed8ff";
    const BODY: &[u8] = include_bytes!("../../fixtures/settled-sword.json");

    fn keys(k: &[&str]) -> Vec<SecretString> {
        k.iter().map(|k| SecretString::from(*k)).collect()
    }

    #[test]
    fn matches_the_published_vector() {
        assert_eq!(sign(&SecretString::from(KEY), T, BODY), VECTOR);
        assert_eq!(verify(VECTOR, BODY, &keys(&[KEY]), T, 300), Ok(()));
    }

    #[test]
    fn any_active_key_and_any_v1_verifies() {
        let ks = keys(&["old-key", KEY]);
        assert_eq!(verify(VECTOR, BODY, &ks, T + 10, 300), Ok(()));
        let two = format!(
            "t={T},v1={},{}",
            "00".repeat(32),
            VECTOR.split_once(',').unwrap().1
        );
        assert_eq!(verify(&two, BODY, &keys(&[KEY]), T, 300), Ok(()));
    }

    #[test]
    fn other_bytes_other_key_or_stale_time_fail() {
        let mut body = BODY.to_vec();
        body.pop(); // the trailing newline is signed too
        assert_eq!(
            verify(VECTOR, &body, &keys(&[KEY]), T, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(VECTOR, BODY, &keys(&["nope"]), T, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(VECTOR, BODY, &keys(&[]), T, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(VECTOR, BODY, &keys(&[KEY]), T + 301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(VECTOR, BODY, &keys(&[KEY]), T - 301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(verify(VECTOR, BODY, &keys(&[KEY]), T + 300, 300), Ok(()));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good_mac = "267a004c172aa6d262b14e847409330f0c72a33c496f74cccc8f5e59b78ed8ff";
        for h in [
            "".to_owned(),
            "garbage".to_owned(),
            format!("v1={good_mac}"),
            format!("t=,v1={good_mac}"),
            format!("t=-5,v1={good_mac}"),
            format!("t=99999999999999999999,v1={good_mac}"),
            format!("t=1,t=2,v1={good_mac}"),
            "t=1795626000".to_owned(),
            "t=1795626000,v1=zz".to_owned(),
            format!("t=1795626000,v1={good_mac}00"),
            format!(
                "t=1795626000,{}",
                vec![format!("v1={good_mac}"); 9].join(",")
            ),
        ] {
            assert_eq!(
                verify(&h, BODY, &keys(&[KEY]), T, 300),
                Err(SignatureError::Malformed),
                "{h}"
            );
        }
    }
}
