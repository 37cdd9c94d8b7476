//! The `Fulfillment` query API for the merchant's internal services.

use std::sync::Arc;

use coinflow_shared::proto::v1::fulfillment_server::Fulfillment;
use coinflow_shared::proto::v1::get_entitlements_request::Payer as PayerField;
use coinflow_shared::proto::v1::{
    Entitlement, GetEntitlementsRequest, GetEntitlementsResponse, GetPaymentRequest,
    GetPaymentResponse, Outcome, Payment,
};
use tonic::{Request, Response, Status};

use crate::lifecycle;
use crate::store::{Payer, Store};

/// The query service.
pub struct QueryService {
    store: Arc<dyn Store>,
}

impl QueryService {
    /// Serves queries over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl Fulfillment for QueryService {
    async fn get_entitlements(
        &self,
        request: Request<GetEntitlementsRequest>,
    ) -> Result<Response<GetEntitlementsResponse>, Status> {
        let payer = match request.into_inner().payer {
            Some(PayerField::Wallet(w)) if !w.is_empty() => Payer::Wallet(w),
            Some(PayerField::RawCustomerId(c)) if !c.is_empty() => Payer::RawCustomerId(c),
            _ => {
                return Err(Status::invalid_argument(
                    "set payer: a non-empty wallet or raw_customer_id",
                ));
            }
        };
        let entitlements = self
            .store
            .entitlements(&payer)
            .await?
            .into_iter()
            .map(|(sku, quantity)| Entitlement { sku, quantity })
            .collect();
        Ok(Response::new(GetEntitlementsResponse { entitlements }))
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<GetPaymentResponse>, Status> {
        let payment_id = request.into_inner().payment_id;
        if payment_id.is_empty() {
            return Err(Status::invalid_argument("payment_id is required"));
        }
        let record = self.store.payment(&payment_id).await?.ok_or_else(|| {
            Status::not_found(format!("no events recorded for payment {payment_id:?}"))
        })?;
        let state = lifecycle::state(record.events.iter().map(|e| e.event_type.as_str()));
        let held_reason = if record.ledger.is_empty() {
            record
                .events
                .iter()
                .rev()
                .find(|e| e.outcome == i32::from(Outcome::Held))
                .and_then(|e| e.held_reason.clone())
        } else {
            None
        };
        let payer = record.ledger.first();
        Ok(Response::new(GetPaymentResponse {
            payment: Some(Payment {
                payment_id,
                state: state.as_str().to_owned(),
                held_reason,
                wallet: payer.map(|l| l.wallet.clone()),
                raw_customer_id: payer.and_then(|l| l.raw_customer_id.clone()),
                events: record.events,
                ledger: record.ledger,
            }),
        }))
    }
}
