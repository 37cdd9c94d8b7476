//! The edge's readiness: not shutting down, and the primary route's ingest reports SERVING.
//! `/healthz`, `/readyz` and `/metrics` are served by `coinflow_shared::admin`.

use std::sync::Arc;
use std::time::Duration;

use coinflow_shared::admin::Readiness;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::client::IngestTarget;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const INGEST_SERVICE: &str = "coinflow.fulfillment.v1.Ingest";

/// Ready when not shutting down and the primary route's ingest answers SERVING within a
/// second.
pub fn readiness(primary: IngestTarget, shutdown: CancellationToken) -> Readiness {
    Arc::new(move || {
        let (primary, shutdown) = (primary.clone(), shutdown.clone());
        Box::pin(async move {
            if shutdown.is_cancelled() {
                return Err("shutting down".to_owned());
            }
            let channel = primary
                .channel()
                .ok_or_else(|| "no ingest endpoint resolved".to_owned())?;
            ingest_serving(channel).await
        })
    })
}

async fn ingest_serving(channel: Channel) -> Result<(), String> {
    let mut client = HealthClient::new(channel);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: INGEST_SERVICE.into(),
    });
    request.set_timeout(Duration::from_secs(1));
    let check = tokio::time::timeout(Duration::from_secs(1), client.check(request)).await;
    match check {
        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
        Ok(Ok(_)) => Err("fulfillment is not serving".into()),
        Ok(Err(status)) => Err(format!(
            "fulfillment health check failed: {}",
            status.code()
        )),
        Err(_) => Err("fulfillment health check timed out".into()),
    }
}
