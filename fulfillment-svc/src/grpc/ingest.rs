//! `Ingest.Deliver`: decide, record durably (reconciling the payment's ledger), then ack.

use std::sync::Arc;

use coinflow_shared::proto::v1::ingest_server::Ingest;
use coinflow_shared::proto::v1::{DeliverRequest, DeliverResponse};
use tonic::{Request, Response, Status};

use super::invalid;
use crate::catalog::CatalogHandle;
use crate::decision::decide;
use crate::store::Store;

/// The ingest service.
pub struct IngestService {
    store: Arc<dyn Store>,
    catalog: Arc<CatalogHandle>,
}

impl IngestService {
    /// Serves ingest over `store`, pricing with the live `catalog`.
    pub fn new(store: Arc<dyn Store>, catalog: Arc<CatalogHandle>) -> Self {
        Self { store, catalog }
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
        let decision = decide(&event, &self.catalog.current());
        let ack = self.store.record(&event, &decision).await?;
        tracing::info!(
            event_type = %event.event_type,
            payment_id = event.payment_id.as_deref().unwrap_or(""),
            outcome = ack.outcome.as_str_name(),
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
