//! The admin port: `/healthz` (the process is alive) and `/readyz` (not shutting down,
//! and fulfillment's ingest reports SERVING).

use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::http_server::{HttpService, ServiceError};
use crate::response::json;
use crate::stack::boxed;

const INGEST_SERVICE: &str = "coinflow.fulfillment.v1.Ingest";

/// Builds the admin service.
pub fn admin_service(ingest: Channel, shutdown: CancellationToken) -> HttpService {
    HttpService::new(tower::service_fn(move |request: Request<Incoming>| {
        let (ingest, shutdown) = (ingest.clone(), shutdown.clone());
        async move {
            let (status, body) = match request.uri().path() {
                "/healthz" => (StatusCode::OK, serde_json::json!({ "status": "alive" })),
                "/readyz" if shutdown.is_cancelled() => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "status": "shutting down" }),
                ),
                "/readyz" => match ingest_serving(ingest).await {
                    Ok(()) => (StatusCode::OK, serde_json::json!({ "status": "ready" })),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({ "status": "not ready", "reason": why }),
                    ),
                },
                _ => (
                    StatusCode::NOT_FOUND,
                    serde_json::json!({ "error": "no such route" }),
                ),
            };
            let response = boxed(json(status, &body));
            Ok::<Response<_>, ServiceError>(response)
        }
    }))
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
