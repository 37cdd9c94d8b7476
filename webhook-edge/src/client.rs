//! The gRPC client to ingest. Each delivery has one deadline, well inside Coinflow's 5 s;
//! transient failures are retried inside it, which is safe because ingest is idempotent.

use std::time::Duration;

use coinflow_shared::proto::v1::ingest_client::IngestClient;
use coinflow_shared::proto::v1::{DeliverRequest, DeliverResponse, WebhookEvent};
use std::sync::Arc;

use opentelemetry::KeyValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::{Instant, sleep, timeout_at};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;
use tracing::field::Empty;

use crate::observe::Metrics;

/// Why a delivery was not acked.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// No ack before the deadline.
    #[error("no ack within {0:?}")]
    Deadline(Duration),
    /// Ingest refused or failed; the status says why.
    #[error("ingest answered {}: {}", .0.code(), .0.message())]
    Status(Status),
    /// The ingest URL is invalid.
    #[error("invalid ingest URL: {0}")]
    BadUrl(String),
    /// The ingest token is not a valid header value.
    #[error("the ingest token must be printable ASCII")]
    BadToken,
}

/// A client of the ingest service.
#[derive(Clone)]
pub struct IngestTarget {
    channel: Channel,
    client: IngestClient<Channel>,
    deadline: Duration,
    bearer: Option<MetadataValue<Ascii>>,
    metrics: Arc<Metrics>,
}

impl IngestTarget {
    /// A lazily connecting client to `url`; each delivery gets `deadline` and, when set,
    /// `authorization: Bearer <token>`.
    pub fn new(
        url: &str,
        deadline: Duration,
        token: Option<&SecretString>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DeliverError> {
        let bearer = token
            .map(|t| {
                let mut v = MetadataValue::try_from(format!("Bearer {}", t.expose_secret()))
                    .map_err(|_| DeliverError::BadToken)?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()?;
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| DeliverError::BadUrl(e.to_string()))?
            .connect_timeout(deadline.min(Duration::from_secs(1)))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_lazy();
        Ok(Self {
            client: IngestClient::new(channel.clone()),
            channel,
            deadline,
            bearer,
            metrics,
        })
    }

    /// Delivers one event; `Ok` means ingest recorded it durably.
    pub async fn deliver(&self, event: WebhookEvent) -> Result<DeliverResponse, DeliverError> {
        let deadline = Instant::now() + self.deadline;
        let mut backoff = Duration::from_millis(20);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(DeliverError::Deadline(self.deadline));
            }
            let span = tracing::info_span!(
                "grpc.client",
                otel.name = "coinflow.fulfillment.v1.Ingest/Deliver",
                otel.kind = "client",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = "coinflow.fulfillment.v1.Ingest",
                rpc.method = "Deliver",
                rpc.grpc.status_code = Empty,
            );
            let mut request = tonic::Request::new(DeliverRequest {
                event: Some(event.clone()),
            });
            request.set_timeout(remaining);
            if let Some(bearer) = &self.bearer {
                request
                    .metadata_mut()
                    .insert("authorization", bearer.clone());
            }
            coinflow_shared::telemetry::inject(&span, request.metadata_mut());
            let mut client = self.client.clone();
            let started = std::time::Instant::now();
            let outcome = timeout_at(deadline, client.deliver(request))
                .instrument(span.clone())
                .await;
            let code = match &outcome {
                Ok(Ok(_)) => Code::Ok,
                Ok(Err(status)) => status.code(),
                Err(_) => Code::DeadlineExceeded,
            };
            span.record("rpc.grpc.status_code", code as i32);
            if code != Code::Ok {
                span.record("otel.status_code", "ERROR");
            }
            self.metrics.rpc_duration.record(
                started.elapsed().as_secs_f64(),
                &[
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", "coinflow.fulfillment.v1.Ingest"),
                    KeyValue::new("rpc.method", "Deliver"),
                    KeyValue::new("rpc.grpc.status_code", code as i64),
                ],
            );
            match outcome {
                Err(_) => return Err(DeliverError::Deadline(self.deadline)),
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if retryable(status.code()) => {
                    tracing::debug!(code = %status.code(), "ingest transient failure; retrying");
                    let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                    sleep(pause).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Ok(Err(status)) => return Err(DeliverError::Status(status)),
            }
        }
    }

    /// The underlying channel, for health checks.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted | Code::Unknown
    )
}
