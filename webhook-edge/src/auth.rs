//! Authenticates a delivery with `Coinflow-Signature` and/or `Authorization`.
//!
//! A present signature is always verified, and a wrong one is refused whatever else
//! matches. Keys are compared in constant time, and several may be active (rotation).
//! Nothing here logs or returns a key, a header value or a signature.

use http::HeaderMap;
use http::header::AUTHORIZATION;
use secrecy::{ExposeSecret, SecretString};
use subtle::{Choice, ConstantTimeEq};

use coinflow_shared::signature::{self, SignatureError};

/// Which credentials a delivery must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AuthMode {
    /// Coinflow's own rule: the signature when sent, else `Authorization`.
    #[default]
    Any,
    /// `Coinflow-Signature` required; `Authorization` ignored.
    Signature,
    /// `Authorization` required (a signature, when sent, must still verify).
    Authorization,
    /// Both required.
    Both,
}

/// Why a delivery was refused; `as_str` is safe to return and to use as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither credential, or not the one the mode requires.
    #[error("missing credentials")]
    Missing,
    /// `Authorization` is not an active key.
    #[error("Authorization does not match")]
    BadAuthorization,
    /// `Coinflow-Signature` failed.
    #[error("{0}")]
    Signature(SignatureError),
}

impl AuthError {
    /// A stable short name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::BadAuthorization => "bad_authorization",
            Self::Signature(SignatureError::Malformed) => "malformed_signature",
            Self::Signature(SignatureError::Stale) => "stale_signature",
            Self::Signature(SignatureError::Mismatch) => "bad_signature",
        }
    }
}

/// The authenticator of one deployment.
#[derive(Clone)]
pub struct Authenticator {
    keys: Vec<SecretString>,
    mode: AuthMode,
    tolerance_secs: i64,
}

impl Authenticator {
    /// Authenticates with any of `keys`.
    pub fn new(keys: Vec<SecretString>, mode: AuthMode, tolerance_secs: i64) -> Self {
        Self {
            keys,
            mode,
            tolerance_secs,
        }
    }

    /// Checks one delivery's headers over its exact body bytes, at `now_unix`.
    pub fn check(&self, headers: &HeaderMap, body: &[u8], now_unix: i64) -> Result<(), AuthError> {
        let signed = match single(headers, signature::HEADER)? {
            Some(h) => {
                let h = h
                    .to_str()
                    .map_err(|_| AuthError::Signature(SignatureError::Malformed))?;
                signature::verify(h, body, &self.keys, now_unix, self.tolerance_secs)
                    .map_err(AuthError::Signature)?;
                true
            }
            None => false,
        };
        let authorized = match (self.mode, single(headers, AUTHORIZATION.as_str())?) {
            (AuthMode::Signature, _) | (_, None) => false,
            (AuthMode::Any, Some(_)) if signed => false,
            (_, Some(value)) => {
                if !self.matches_key(value.as_bytes()) {
                    return Err(AuthError::BadAuthorization);
                }
                true
            }
        };
        let ok = match self.mode {
            AuthMode::Any => signed || authorized,
            AuthMode::Signature => signed,
            AuthMode::Authorization => authorized,
            AuthMode::Both => signed && authorized,
        };
        if ok { Ok(()) } else { Err(AuthError::Missing) }
    }

    fn matches_key(&self, presented: &[u8]) -> bool {
        let mut ok = Choice::from(0);
        for key in &self.keys {
            ok |= key.expose_secret().as_bytes().ct_eq(presented);
        }
        bool::from(ok)
    }
}

/// The one value of a header that must not repeat.
fn single<'a>(
    headers: &'a HeaderMap,
    name: &str,
) -> Result<Option<&'a http::HeaderValue>, AuthError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(if name == signature::HEADER {
            AuthError::Signature(SignatureError::Malformed)
        } else {
            AuthError::BadAuthorization
        });
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const NOW: i64 = 1_800_000_000;
    const BODY: &[u8] = br#"{"eventType":"Settled"}"#;

    fn auth(mode: AuthMode) -> Authenticator {
        Authenticator::new(vec!["old".into(), "new".into()], mode, 300)
    }

    fn headers(sig_key: Option<&str>, authz: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(k) = sig_key {
            let v = signature::sign(&k.into(), NOW, BODY);
            h.insert(signature::HEADER, HeaderValue::from_str(&v).unwrap());
        }
        if let Some(a) = authz {
            h.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn the_mode_table() {
        use AuthMode::*;
        let missing = Err(AuthError::Missing);
        let bad_sig = Err(AuthError::Signature(SignatureError::Mismatch));
        let bad_authz = Err(AuthError::BadAuthorization);
        for (mode, sig, authz, want) in [
            (Any, Some("new"), None, Ok(())),
            (Any, None, Some("old"), Ok(())),
            (Any, None, None, missing),
            (Any, Some("wrong"), Some("new"), bad_sig),
            (Any, None, Some("wrong"), bad_authz),
            (Signature, Some("old"), None, Ok(())),
            (Signature, None, Some("new"), missing),
            (Signature, Some("new"), Some("wrong"), Ok(())),
            (Authorization, None, Some("new"), Ok(())),
            (Authorization, Some("new"), None, missing),
            (Authorization, Some("wrong"), Some("new"), bad_sig),
            (Both, Some("new"), Some("new"), Ok(())),
            (Both, Some("new"), None, missing),
            (Both, None, Some("new"), missing),
            (Both, Some("new"), Some("wrong"), bad_authz),
        ] {
            let got = auth(mode).check(&headers(sig, authz), BODY, NOW);
            assert_eq!(got, want, "{mode:?} sig={sig:?} authz={authz:?}");
        }
    }

    #[test]
    fn repeated_headers_are_refused() {
        let mut h = headers(Some("new"), None);
        h.append(signature::HEADER, HeaderValue::from_static("t=1,v1=00"));
        assert_eq!(
            auth(AuthMode::Any).check(&h, BODY, NOW),
            Err(AuthError::Signature(SignatureError::Malformed))
        );
        let mut h = headers(None, Some("new"));
        h.append(AUTHORIZATION, HeaderValue::from_static("new"));
        assert_eq!(
            auth(AuthMode::Any).check(&h, BODY, NOW),
            Err(AuthError::BadAuthorization)
        );
    }

    #[test]
    fn a_bearer_prefix_is_not_the_key() {
        let h = headers(None, Some("Bearer new"));
        assert_eq!(
            auth(AuthMode::Any).check(&h, BODY, NOW),
            Err(AuthError::BadAuthorization)
        );
    }
}
