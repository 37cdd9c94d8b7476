//! The admin port both services serve: `/healthz` (alive), `/readyz` (the service's own
//! readiness check) and `/metrics` (Prometheus text).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::http_server::{HttpService, ServiceError, boxed, json};

/// A readiness check: `Err` says why the service is not ready.
pub type Readiness =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The admin routes, with `ready` behind `/readyz`.
pub fn service(ready: Readiness) -> HttpService {
    HttpService::new(tower::service_fn(move |request: Request<Incoming>| {
        let ready = Arc::clone(&ready);
        async move {
            let response = match request.uri().path() {
                "/healthz" => boxed(json(
                    StatusCode::OK,
                    &serde_json::json!({ "status": "alive" }),
                )),
                "/readyz" => boxed(match ready().await {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
                    Err(reason) => json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({ "status": "not ready", "reason": reason }),
                    ),
                }),
                "/metrics" => {
                    let mut r =
                        Response::new(Full::new(Bytes::from(crate::telemetry::prometheus_text())));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    boxed(r)
                }
                _ => boxed(json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({ "error": "no such route" }),
                )),
            };
            Ok::<_, ServiceError>(response)
        }
    }))
}
