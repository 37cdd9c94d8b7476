//! Traces and RED metrics for the webhook route: a tower layer that opens the HTTP server
//! span (continuing an incoming `traceparent`), records the status, and feeds the
//! `http.server.request.duration` histogram; and the edge's other instruments.
//!
//! No label takes a value from the request as sent: a method outside the standard ones is
//! `_OTHER` ([`method_label`]), a path other than the webhook's is `other`, and the rest
//! are the edge's own (status, gRPC code, route names from config, fixed reasons). A sender
//! inventing methods or paths cannot grow `/metrics`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Latency buckets in seconds, from the HTTP semantic conventions (Coinflow gives up at 5).
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The edge's instruments, from the global meter provider.
pub struct Metrics {
    /// `http.server.request.duration`: requests by method, route and status.
    pub http_duration: Histogram<f64>,
    /// `rpc.client.duration`: ingest calls by method and code.
    pub rpc_duration: Histogram<f64>,
    /// `coinflow.webhook.auth.failures`: refused deliveries by reason.
    pub auth_failures: Counter<u64>,
    /// `coinflow.webhook.route.drops`: best-effort deliveries given up, by route.
    pub route_drops: Counter<u64>,
}

impl Metrics {
    /// Creates the instruments.
    pub fn new() -> Self {
        let meter = opentelemetry::global::meter("webhook-edge");
        Self {
            http_duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("Webhook requests: duration by method, route and status")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            rpc_duration: meter
                .f64_histogram("rpc.client.duration")
                .with_unit("s")
                .with_description("Calls to ingest: duration by method and gRPC code")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            auth_failures: meter
                .u64_counter("coinflow.webhook.auth.failures")
                .with_description("Deliveries refused with 401, by reason")
                .build(),
            route_drops: meter
                .u64_counter("coinflow.webhook.route.drops")
                .with_description("Best-effort route deliveries given up, by route and reason")
                .build(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `http.request.method` of `method`: its name when it is one of the standard
/// methods, else `_OTHER` (as the HTTP semantic conventions say).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

/// Wraps the route in its server span and request metrics.
#[derive(Clone)]
pub struct ObserveLayer {
    route: Arc<str>,
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    /// Spans are named for `route`; other paths are reported as `other`, keeping label
    /// values bounded.
    pub fn new(route: &str, metrics: Arc<Metrics>) -> Self {
        Self {
            route: route.into(),
            metrics,
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ObserveLayer`].
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = method_label(request.method());
        let route: Arc<str> = if request.uri().path() == &*self.layer.route {
            Arc::clone(&self.layer.route)
        } else {
            "other".into()
        };
        let span = tracing::info_span!(
            "http.server",
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = Empty,
            coinflow.event_type = Empty,
            coinflow.category = Empty,
            coinflow.payment_id = Empty,
            coinflow.outcome = Empty,
            coinflow.held_reason = Empty,
            coinflow.duplicate = Empty,
            coinflow.auth_failure = Empty,
            error.type = Empty,
        );
        let _ = span.set_parent(coinflow_shared::telemetry::extract(request.headers()));
        let metrics = Arc::clone(&self.layer.metrics);
        let future = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let result = future.await;
            if let Ok(response) = &result {
                let status = response.status().as_u16();
                span.record("http.response.status_code", status);
                if status >= 500 {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", status);
                }
                metrics.http_duration.record(
                    started.elapsed().as_secs_f64(),
                    &[
                        KeyValue::new("http.request.method", method),
                        KeyValue::new("http.route", route.to_string()),
                        KeyValue::new("http.response.status_code", i64::from(status)),
                    ],
                );
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_standard_methods_keep_their_name() {
        for name in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ] {
            assert_eq!(
                method_label(&Method::from_bytes(name.as_bytes()).unwrap()),
                name
            );
        }
        for name in ["get", "PROPFIND", "X-INVENTED-1234", "_OTHER"] {
            assert_eq!(
                method_label(&Method::from_bytes(name.as_bytes()).unwrap()),
                "_OTHER"
            );
        }
    }
}
