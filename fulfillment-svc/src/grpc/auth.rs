//! Bearer-token authentication for gRPC callers: `authorization: Bearer <token>`, compared
//! in constant time against the configured tokens (several, for rotation). Health and
//! reflection stay open for probes and `grpcurl describe`.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use subtle::{Choice, ConstantTimeEq};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Checks the bearer token of every call; with no tokens, lets every call through.
#[derive(Clone)]
pub struct BearerAuth {
    tokens: Arc<[SecretString]>,
}

impl BearerAuth {
    /// Accepts any of `tokens`; an empty list means unauthenticated (explicitly allowed).
    pub fn new(tokens: Vec<SecretString>) -> Self {
        Self {
            tokens: tokens.into(),
        }
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        let mut ok = Choice::from(0);
        for token in self.tokens.iter() {
            ok |= token.expose_secret().as_bytes().ct_eq(presented);
        }
        bool::from(ok)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.tokens.is_empty() {
            return Ok(request);
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        match presented {
            Some(token) if self.accepts(token) => Ok(request),
            Some(_) => Err(Status::unauthenticated("the bearer token is not valid")),
            None => Err(Status::unauthenticated(
                "missing credentials: send `authorization: Bearer <token>`",
            )),
        }
    }
}
