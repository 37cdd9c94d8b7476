//! `Ingest.Deliver` and `Ingest.DeliverBatch`: decide, record durably (reconciling the
//! payment's ledger), then ack. A batch's events are recorded side by side, each exactly as
//! its own `Deliver` would be, each in its own trace.

use std::sync::Arc;

use coinflow_shared::proto::v1::deliver_result::Result as Outcome;
use coinflow_shared::proto::v1::ingest_server::Ingest;
use coinflow_shared::proto::v1::{
    BatchedEvent, DeliverBatchRequest, DeliverBatchResponse, DeliverFailure, DeliverRequest,
    DeliverResponse, DeliverResult, WebhookEvent,
};
use opentelemetry::KeyValue;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::auth::Caller;
use super::invalid;
use super::methods::Role;
use crate::catalog::CatalogHandle;
use crate::decision::decide;
use crate::observe::{BATCH_METHOD, Metrics, record_status, server_span};
use crate::store::Store;

/// The most events one `DeliverBatch` call may carry.
pub const MAX_BATCH: usize = 256;

/// The ingest service.
pub struct IngestService {
    store: Arc<dyn Store>,
    catalog: Arc<CatalogHandle>,
    metrics: Arc<Metrics>,
}

impl IngestService {
    /// Serves ingest over `store`, pricing with the live `catalog`.
    pub fn new(store: Arc<dyn Store>, catalog: Arc<CatalogHandle>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            catalog,
            metrics,
        }
    }

    /// Records one event; the current span is the call's (or the batched event's).
    /// `recovered` comes from the caller's credential and overrides the event's field.
    async fn record(
        &self,
        event: Option<WebhookEvent>,
        recovered: bool,
    ) -> Result<DeliverResponse, Status> {
        let mut event = event.ok_or_else(|| invalid("event", "required"))?;
        event.recovered = recovered;
        if event.event_key.is_empty() {
            return Err(invalid(
                "event.event_key",
                "required: the transport identity",
            ));
        }
        if event.event_type.is_empty() && event.unparseable.is_none() {
            return Err(invalid(
                "event.event_type",
                "required (or set `unparseable` for a body that is not an envelope)",
            ));
        }
        let span = tracing::Span::current();
        span.record("coinflow.event_type", event.event_type.as_str());
        span.record("coinflow.category", event.category.as_str());
        if let Some(payment_id) = &event.payment_id {
            span.record("coinflow.payment_id", payment_id.as_str());
        }
        let decision = decide(&event, &self.catalog.current());
        let ack = self.store.record(&event, &decision).await?;
        let outcome = ack.outcome.as_str_name();
        span.record("coinflow.outcome", outcome);
        span.record("coinflow.duplicate", ack.duplicate);
        if let Some(reason) = &ack.held_reason {
            span.record("coinflow.held_reason", reason.as_str());
        }
        if let Some(item) = &ack.item {
            span.record("coinflow.catalog_item", item.as_str());
        }
        if ack.duplicate {
            self.metrics.duplicates.add(1, &[]);
        } else {
            self.metrics.events.add(
                1,
                &[
                    KeyValue::new("event_type", event.event_type.clone()),
                    KeyValue::new("outcome", outcome),
                ],
            );
            if let Some(reason) = &ack.held_reason {
                self.metrics
                    .held
                    .add(1, &[KeyValue::new("reason", reason.clone())]);
            }
            self.metrics.count_entries(&ack.entries);
        }
        if let Some(why) = &event.unparseable
            && !ack.duplicate
        {
            // With a payment id it waits in the review queue; without one, this line and
            // `coinflow_events_held_total{reason="unparseable"}` are where it shows.
            tracing::warn!(
                event_key = %event.event_key,
                payment_id = event.payment_id.as_deref().unwrap_or(""),
                why = %why,
                "an authenticated body that is not a Coinflow envelope was recorded and held"
            );
        }
        tracing::info!(
            event_type = %event.event_type,
            payment_id = event.payment_id.as_deref().unwrap_or(""),
            outcome,
            held_reason = ack.held_reason.as_deref().unwrap_or(""),
            duplicate = ack.duplicate,
            "event recorded"
        );
        Ok(DeliverResponse {
            outcome: ack.outcome.into(),
            duplicate: ack.duplicate,
            held_reason: ack.held_reason,
        })
    }

    /// Records one event of a batch under its own server span, in its delivery's trace.
    async fn record_batched(&self, batched: BatchedEvent, recovered: bool) -> DeliverResult {
        let span = server_span("coinflow.fulfillment.v1.Ingest", BATCH_METHOD);
        let _ = span.set_parent(coinflow_shared::telemetry::extract_map(
            &batched.trace_context,
        ));
        let (result, code) = match self
            .record(batched.event, recovered)
            .instrument(span.clone())
            .await
        {
            Ok(ack) => (Outcome::Ack(ack), 0),
            Err(status) => {
                let code = status.code() as i32;
                let failure = DeliverFailure {
                    code,
                    message: status.message().to_owned(),
                };
                (Outcome::Failure(failure), i64::from(code))
            }
        };
        record_status(&span, code);
        DeliverResult {
            result: Some(result),
        }
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let recovered = by_recovery(&request);
        self.record(request.into_inner().event, recovered)
            .await
            .map(Response::new)
    }

    async fn deliver_batch(
        &self,
        request: Request<DeliverBatchRequest>,
    ) -> Result<Response<DeliverBatchResponse>, Status> {
        let recovered = by_recovery(&request);
        let events = request.into_inner().events;
        if events.len() > MAX_BATCH {
            return Err(invalid("events", &format!("at most {MAX_BATCH} per call")));
        }
        let results = futures::future::join_all(
            events
                .into_iter()
                .map(|e| self.record_batched(e, recovered)),
        )
        .await;
        Ok(Response::new(DeliverBatchResponse { results }))
    }
}

/// Whether the caller holds a recovery credential: its events are recorded as recovered.
fn by_recovery<T>(request: &Request<T>) -> bool {
    matches!(
        request.extensions().get::<Caller>(),
        Some(Caller::Credential {
            role: Role::Recovery,
            ..
        })
    )
}
