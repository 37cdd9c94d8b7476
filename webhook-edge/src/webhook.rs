//! The webhook route: check the request, read the exact body, authenticate, parse once,
//! hand to ingest, and answer 200 only after ingest acked.
//!
//! Recorded or retried: once a delivery is authenticated, nothing about its bytes can get
//! it refused. A body that is not a v2 envelope is delivered as an `unparseable` event
//! ([`coinflow_shared::convert::unparseable`]; fulfillment records and holds it), and
//! whatever keeps ingest from acking is a 503, which Coinflow retries.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Method, Request, Response};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, LengthLimitError};
use opentelemetry::KeyValue;
use tokio::time::Instant;

use coinflow_shared::convert::from_body;
use coinflow_shared::proto::v1::{Outcome, WebhookEvent};

use crate::auth::Authenticator;
use crate::observe::Metrics;
use crate::response::{Body, EdgeError, success};
use crate::routes::Router;

/// What the route needs, shared by every request.
pub struct Webhook {
    /// The configured path.
    pub path: String,
    /// The body limit, in bytes.
    pub body_limit: usize,
    /// The authenticator.
    pub auth: Authenticator,
    /// Where events go.
    pub router: Router,
    /// `Retry-After` on 503.
    pub retry_after_secs: u64,
    /// The edge's instruments.
    pub metrics: Arc<Metrics>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Webhook {
    /// Handles one request. Never fails: every error becomes its response.
    pub async fn handle<B>(self: Arc<Self>, request: Request<B>) -> Response<Body>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        match self.accept(request).await {
            Ok(()) => success(),
            Err(e) => {
                let status = e.status();
                match &e {
                    EdgeError::Unauthorized(reason) => {
                        tracing::Span::current().record("coinflow.auth_failure", reason.as_str());
                        self.metrics
                            .auth_failures
                            .add(1, &[KeyValue::new("reason", reason.as_str())]);
                        tracing::warn!(reason = reason.as_str(), "delivery refused: unauthorized");
                    }
                    EdgeError::Unavailable => tracing::warn!(
                        latency_ms = started.elapsed().as_millis() as u64,
                        "delivery not acked: fulfillment unavailable"
                    ),
                    _ => tracing::info!(status = status.as_u16(), error = %e, "delivery refused"),
                }
                e.into_response(self.retry_after_secs)
            }
        }
    }

    async fn accept<B>(&self, request: Request<B>) -> Result<(), EdgeError>
    where
        B: HttpBody<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        if request.uri().path() != self.path {
            return Err(EdgeError::NotFound);
        }
        if request.method() != Method::POST {
            return Err(EdgeError::MethodNotAllowed);
        }
        let (parts, body) = request.into_parts();
        if !is_json(&parts.headers) {
            return Err(EdgeError::UnsupportedMediaType);
        }
        let body = read_body(body, self.body_limit).await?;
        tracing::info_span!("webhook.auth").in_scope(|| {
            self.auth
                .check(&parts.headers, &body, unix_now())
                .map_err(EdgeError::Unauthorized)
        })?;
        let event = tracing::info_span!("webhook.parse").in_scope(|| parse(body));
        let span = tracing::Span::current();
        span.record("coinflow.event_type", event.event_type.as_str());
        span.record("coinflow.category", event.category.as_str());
        if let Some(payment_id) = &event.payment_id {
            span.record("coinflow.payment_id", payment_id.as_str());
        }
        let (event_type, payment_id) = (event.event_type.clone(), event.payment_id.clone());
        match self.router.deliver(&event).await {
            Ok(ack) => {
                let outcome = Outcome::try_from(ack.outcome)
                    .unwrap_or_default()
                    .as_str_name();
                span.record("coinflow.outcome", outcome);
                span.record("coinflow.duplicate", ack.duplicate);
                if let Some(reason) = &ack.held_reason {
                    span.record("coinflow.held_reason", reason.as_str());
                }
                tracing::info!(
                    event_type = %event_type,
                    payment_id = payment_id.as_deref().unwrap_or(""),
                    outcome,
                    duplicate = ack.duplicate,
                    latency_ms = started.elapsed().as_millis() as u64,
                    "webhook acked"
                );
                Ok(())
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, event_type = %event_type, "ingest did not ack");
                Err(EdgeError::Unavailable)
            }
            Err(e) => {
                // A refusal after authentication is a bug here or in ingest, never the
                // sender's fault: Coinflow must keep the event and retry once it is fixed.
                tracing::error!(error = %e, event_type = %event_type, "ingest refused an authenticated delivery");
                Err(EdgeError::Unavailable)
            }
        }
    }
}

/// The event of an authenticated body ([`from_body`]), logged when it is not an envelope.
fn parse(body: Bytes) -> WebhookEvent {
    let event = from_body(body, SystemTime::now());
    if let Some(why) = &event.unparseable {
        tracing::warn!(
            event_key = %event.event_key,
            payment_id = event.payment_id.as_deref().unwrap_or(""),
            bytes = event.raw_body.len(),
            why = %why,
            "authenticated body is not a v2 envelope: delivering it to be recorded and held"
        );
    }
    event
}

/// Reads the whole body (capped by the stack's body limit) into one buffer.
async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, EdgeError>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match body.collect().await.map_err(Into::into) {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(EdgeError::TooLarge(limit)),
        Err(e) if is_timeout(&*e) => Err(EdgeError::BodyTimeout),
        Err(_) => Err(EdgeError::BodyRead),
    }
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        current = err.source();
    }
    false
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
