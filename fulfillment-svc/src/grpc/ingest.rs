//! `Ingest.Deliver`: decide, record durably (reconciling the payment's ledger), then ack.

use std::sync::Arc;

use coinflow_shared::proto::v1::ingest_server::Ingest;
use coinflow_shared::proto::v1::{DeliverRequest, DeliverResponse};
use opentelemetry::KeyValue;
use tonic::{Request, Response, Status};

use super::invalid;
use crate::catalog::CatalogHandle;
use crate::decision::decide;
use crate::observe::Metrics;
use crate::store::Store;

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
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let event = request
            .into_inner()
            .event
            .ok_or_else(|| invalid("event", "required"))?;
        if event.event_key.is_empty() {
            return Err(invalid(
                "event.event_key",
                "required: the transport identity",
            ));
        }
        if event.event_type.is_empty() {
            return Err(invalid("event.event_type", "required"));
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
        tracing::info!(
            event_type = %event.event_type,
            payment_id = event.payment_id.as_deref().unwrap_or(""),
            outcome,
            held_reason = ack.held_reason.as_deref().unwrap_or(""),
            duplicate = ack.duplicate,
            "event recorded"
        );
        Ok(Response::new(DeliverResponse {
            outcome: ack.outcome.into(),
            duplicate: ack.duplicate,
            held_reason: ack.held_reason,
        }))
    }
}
