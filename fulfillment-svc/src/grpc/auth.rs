//! Who is calling, and whether they may: every call but health and reflection presents
//! `authorization: Bearer <token>`; the token names one [`Role`] (and, for operators, a
//! person), compared in constant time against every configured token. A missing or
//! unknown token is `UNAUTHENTICATED`; a token used outside its role's methods
//! ([`super::methods`]) is `PERMISSION_DENIED`. The authenticated [`Caller`] travels in
//! the request's extensions, so handlers take the actor from the credential, never from
//! a request field.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tonic::Status;
use tower::{Layer, Service};

use super::methods::{self, Access, Role};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A credential of `role`; operator credentials carry the operator's name.
    Credential {
        /// The credential's role.
        role: Role,
        /// The operator's name (operators only).
        name: Option<Arc<str>>,
    },
    /// `--allow-unauthenticated` (local development): nothing is checked, and what a
    /// caller claims is recorded as unverified.
    Unauthenticated,
}

impl Caller {
    fn may(&self, role: Role) -> bool {
        match self {
            Self::Credential { role: mine, .. } => *mine == role,
            Self::Unauthenticated => true,
        }
    }
}

/// Why the configured credentials cannot be used. Messages name roles, never tokens.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    /// Ingest has no token and unauthenticated serving was not asked for.
    #[error(
        "no ingest tokens: set FULFILLMENT_INGEST_TOKENS (the token the edge presents as \
         EDGE_INGEST_TOKEN), or pass --allow-unauthenticated for local development"
    )]
    NoIngestTokens,
    /// One token is configured twice (in two roles, or for two operators).
    #[error(
        "the same token is configured for {0} and for {1}: every credential must belong to \
         exactly one role (and one operator)"
    )]
    Reused(String, String),
    /// Tokens are configured together with unauthenticated mode.
    #[error(
        "--allow-unauthenticated serves without checking any token, but tokens are \
         configured: drop one or the other"
    )]
    Contradictory,
}

/// One configured token.
struct Entry {
    token: SecretString,
    caller: Caller,
}

/// Every credential the server accepts.
pub struct Credentials {
    entries: Vec<Entry>,
    unauthenticated: bool,
}

/// Who holds a credential, for messages.
fn holder(caller: &Caller) -> String {
    match caller {
        Caller::Credential {
            role: Role::Operator,
            name: Some(name),
        } => format!("operator {name:?}"),
        Caller::Credential { role, .. } => format!("the {} role", role.as_str()),
        Caller::Unauthenticated => "unauthenticated callers".to_owned(),
    }
}

impl Credentials {
    /// The credentials of the three roles; `operators` are `(name, token)`. Refuses a
    /// token configured twice, an empty ingest role, and tokens alongside
    /// `unauthenticated`.
    pub fn new(
        ingest: &[SecretString],
        query: &[SecretString],
        operators: &[(String, SecretString)],
        recovery: &[SecretString],
        unauthenticated: bool,
    ) -> Result<Self, CredentialsError> {
        let role = |role| Caller::Credential { role, name: None };
        let entries: Vec<Entry> = ingest
            .iter()
            .map(|t| (t, role(Role::Ingest)))
            .chain(query.iter().map(|t| (t, role(Role::Query))))
            .chain(recovery.iter().map(|t| (t, role(Role::Recovery))))
            .chain(operators.iter().map(|(name, t)| {
                (
                    t,
                    Caller::Credential {
                        role: Role::Operator,
                        name: Some(name.as_str().into()),
                    },
                )
            }))
            .map(|(token, caller)| Entry {
                token: token.clone(),
                caller,
            })
            .collect();
        if unauthenticated {
            return if entries.is_empty() {
                Ok(Self {
                    entries,
                    unauthenticated,
                })
            } else {
                Err(CredentialsError::Contradictory)
            };
        }
        if ingest.is_empty() {
            return Err(CredentialsError::NoIngestTokens);
        }
        for (i, a) in entries.iter().enumerate() {
            for b in &entries[i + 1..] {
                if bool::from(
                    a.token
                        .expose_secret()
                        .as_bytes()
                        .ct_eq(b.token.expose_secret().as_bytes()),
                ) {
                    return Err(CredentialsError::Reused(
                        holder(&a.caller),
                        holder(&b.caller),
                    ));
                }
            }
        }
        Ok(Self {
            entries,
            unauthenticated,
        })
    }

    /// Whether any credential is checked.
    pub fn authenticated(&self) -> bool {
        !self.unauthenticated
    }

    /// The caller a request's `authorization` header names.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Status> {
        if self.unauthenticated {
            return Ok(Caller::Unauthenticated);
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing credentials: send `authorization: Bearer <token>`")
            })?;
        // Every token is compared, whichever matches, so the time taken does not say which.
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.token.expose_secret().as_bytes().ct_eq(presented)) {
                found = Some(&entry.caller);
            }
        }
        found
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the bearer token is not valid"))
    }

    /// Whether `caller` may call the method at `path`; the error is the call's answer.
    fn authorize(&self, path: &str, headers: &HeaderMap) -> Result<Option<Caller>, Status> {
        let access = methods::lookup(path).map(|m| m.access);
        if access == Some(Access::Open) {
            return Ok(None);
        }
        let caller = self.authenticate(headers)?;
        match access {
            Some(Access::Roles(roles)) if roles.iter().any(|r| caller.may(*r)) => Ok(Some(caller)),
            Some(Access::Roles(roles)) => Err(Status::permission_denied(format!(
                "this credential is not allowed to call {path}: it needs a token of the {} role",
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))),
            _ => Err(Status::permission_denied(format!(
                "{path} is not a method this server serves"
            ))),
        }
    }
}

/// Authenticates and authorizes every call before it reaches a service.
#[derive(Clone)]
pub struct AuthLayer {
    credentials: Arc<Credentials>,
}

impl AuthLayer {
    /// Checks calls against `credentials`.
    pub fn new(credentials: Arc<Credentials>) -> Self {
        Self { credentials }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            credentials: Arc::clone(&self.credentials),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    credentials: Arc<Credentials>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match self
            .credentials
            .authorize(request.uri().path(), request.headers())
        {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s)
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    fn credentials() -> Credentials {
        Credentials::new(
            &[secret("ing")],
            &[secret("qry")],
            &[
                ("alice".into(), secret("op-a")),
                ("bob".into(), secret("op-b")),
            ],
            &[secret("rec")],
            false,
        )
        .unwrap()
    }

    const BATCH: &str = "/coinflow.fulfillment.v1.Ingest/DeliverBatch";
    const CONSUME: &str = "/coinflow.fulfillment.v1.Fulfillment/Consume";
    const RESOLVE: &str = "/coinflow.fulfillment.v1.Fulfillment/ResolveHeld";

    #[test]
    fn each_token_does_its_role_and_nothing_more() {
        let c = credentials();
        let code = |path: &str, token: &str| {
            c.authorize(path, &bearer(token))
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok)
        };
        use tonic::Code::{Ok, PermissionDenied, Unauthenticated};
        const EVENT: &str = "/coinflow.fulfillment.v1.Fulfillment/GetEvent";
        const DENIED: tonic::Code = PermissionDenied;
        for (path, ingest, query, operator, recovery) in [
            (BATCH, Ok, DENIED, DENIED, Ok),
            (CONSUME, DENIED, Ok, DENIED, DENIED),
            (RESOLVE, DENIED, DENIED, Ok, DENIED),
            (EVENT, DENIED, Ok, DENIED, Ok),
            ("/x.Y/Z", DENIED, DENIED, DENIED, DENIED),
        ] {
            assert_eq!(code(path, "ing"), ingest, "{path}");
            assert_eq!(code(path, "qry"), query, "{path}");
            assert_eq!(code(path, "rec"), recovery, "{path}");
            assert_eq!(code(path, "op-b"), operator, "{path}");
            assert_eq!(code(path, "nope"), Unauthenticated, "{path}");
            assert_eq!(
                c.authorize(path, &HeaderMap::new()).unwrap_err().code(),
                Unauthenticated
            );
        }
        assert_eq!(
            c.authorize("/grpc.health.v1.Health/Check", &HeaderMap::new())
                .unwrap(),
            None
        );
        assert_eq!(
            c.authorize(RESOLVE, &bearer("op-b")).unwrap(),
            Some(Caller::Credential {
                role: Role::Operator,
                name: Some("bob".into())
            })
        );
    }

    #[test]
    fn a_token_in_two_roles_or_no_ingest_token_is_refused() {
        let err = Credentials::new(&[secret("t")], &[secret("t")], &[], &[], false)
            .err()
            .unwrap();
        assert_eq!(
            err,
            CredentialsError::Reused("the ingest role".into(), "the query role".into())
        );
        assert!(!err.to_string().contains("\"t\""));
        let err = Credentials::new(
            &[secret("i")],
            &[],
            &[("a".into(), secret("x")), ("b".into(), secret("x"))],
            &[],
            false,
        )
        .err()
        .unwrap();
        assert!(matches!(err, CredentialsError::Reused(..)), "{err}");
        assert_eq!(
            Credentials::new(&[], &[secret("q")], &[], &[], false).err(),
            Some(CredentialsError::NoIngestTokens)
        );
        assert_eq!(
            Credentials::new(&[secret("i")], &[], &[], &[], true).err(),
            Some(CredentialsError::Contradictory)
        );
        let open = Credentials::new(&[], &[], &[], &[], true).unwrap();
        assert_eq!(
            open.authorize(RESOLVE, &HeaderMap::new()).unwrap(),
            Some(Caller::Unauthenticated)
        );
    }
}
