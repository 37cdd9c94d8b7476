//! The webhook route's tower stack, one layer per concern, outermost first:
//! observe (server span, request metrics) → errors-to-responses → load shedding →
//! concurrency limit → request timeout → body read timeout → body limit → the route.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::Limited;
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::observe::ObserveLayer;
use crate::response::EdgeError;
use crate::webhook::Webhook;
use coinflow_shared::http_server::{BoxError, HttpService, ServiceError, boxed};

/// Stack settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests handled at once; the rest are shed with 503.
    pub max_concurrency: usize,
    /// A whole request's budget.
    pub request_timeout: Duration,
    /// The body's read budget.
    pub body_timeout: Duration,
    /// The largest body.
    pub body_limit: usize,
    /// `Retry-After` on 503.
    pub retry_after_secs: u64,
}

/// Builds the webhook service.
pub fn webhook_service(
    webhook: Arc<Webhook>,
    limits: Limits,
    observe: ObserveLayer,
) -> HttpService {
    let Limits {
        max_concurrency,
        request_timeout,
        body_timeout,
        body_limit,
        retry_after_secs,
    } = limits;
    let service = ServiceBuilder::new()
        .map_response(boxed)
        .layer(observe)
        .map_result(move |result: Result<Response<_>, BoxError>| {
            Ok::<_, ServiceError>(
                result.unwrap_or_else(|e| tower_error(e).into_response(retry_after_secs)),
            )
        })
        .load_shed()
        .concurrency_limit(max_concurrency)
        .timeout(request_timeout)
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .filter(move |request: Request<_>| limit_body(request, body_limit))
        .service_fn(move |request| {
            let webhook = Arc::clone(&webhook);
            async move { Ok::<_, Infallible>(webhook.handle(request).await) }
        });
    HttpService::new(service)
}

/// Refuses a declared length over the limit before reading a byte, and caps what is read.
fn limit_body<B>(request: Request<B>, limit: usize) -> Result<Request<Limited<B>>, BoxError> {
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Box::new(EdgeError::TooLarge(limit)));
    }
    Ok(request.map(|body| Limited::new(body, limit)))
}

/// Maps an error raised by a layer to the edge's answer.
fn tower_error(e: BoxError) -> EdgeError {
    if e.is::<tower::load_shed::error::Overloaded>() {
        return EdgeError::Overloaded;
    }
    match e.downcast::<EdgeError>() {
        Ok(edge) => *edge,
        // The request timeout (`Elapsed`) and anything unforeseen: let Coinflow retry.
        Err(_) => EdgeError::Unavailable,
    }
}
