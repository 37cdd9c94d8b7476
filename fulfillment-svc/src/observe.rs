//! Traces and metrics of fulfillment-svc: a tower layer under tonic that opens the gRPC
//! server span (joined to the caller's trace through `traceparent` metadata), records the
//! gRPC status and feeds `rpc.server.duration`; and the domain instruments.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, ObservableGauge};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::store::micros;

const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The review queue as last measured, read by the gauges.
#[derive(Debug, Default)]
pub struct QueueState {
    /// Held payments waiting for review.
    pub size: AtomicU64,
    /// When the oldest of them was received, µs since the epoch (0: none).
    pub oldest_us: AtomicI64,
}

/// The fulfillment instruments, from the global meter provider.
pub struct Metrics {
    /// `rpc.server.duration`: calls by service, method and gRPC code.
    pub rpc_duration: Histogram<f64>,
    /// `coinflow.events`: recorded events by type and outcome.
    pub events: Counter<u64>,
    /// `coinflow.events.duplicates`: redeliveries of a recorded event.
    pub duplicates: Counter<u64>,
    /// `coinflow.events.held`: events held for review, by reason.
    pub held: Counter<u64>,
    /// `coinflow.ledger.entries`: ledger entries written, by kind and sku.
    pub ledger_entries: Counter<u64>,
    /// The review queue, refreshed by the server.
    pub queue: Arc<QueueState>,
    _gauges: (ObservableGauge<u64>, ObservableGauge<f64>),
}

impl Metrics {
    /// Creates the instruments.
    pub fn new() -> Self {
        let meter = opentelemetry::global::meter("fulfillment-svc");
        let queue = Arc::new(QueueState::default());
        let (q1, q2) = (Arc::clone(&queue), Arc::clone(&queue));
        Self {
            rpc_duration: meter
                .f64_histogram("rpc.server.duration")
                .with_unit("s")
                .with_description("gRPC calls served: duration by service, method and code")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            events: meter
                .u64_counter("coinflow.events")
                .with_description("Webhook events recorded, by event type and outcome")
                .build(),
            duplicates: meter
                .u64_counter("coinflow.events.duplicates")
                .with_description("Redeliveries of an already recorded event")
                .build(),
            held: meter
                .u64_counter("coinflow.events.held")
                .with_description("Events held for review, by reason")
                .build(),
            ledger_entries: meter
                .u64_counter("coinflow.ledger.entries")
                .with_description("Ledger entries written, by kind (grant, revoke, restore, reject, consume) and sku")
                .build(),
            _gauges: (
                meter
                    .u64_observable_gauge("coinflow.review.queue.size")
                    .with_description("Held payments waiting for review")
                    .with_callback(move |o| o.observe(q1.size.load(Ordering::Relaxed), &[]))
                    .build(),
                meter
                    .f64_observable_gauge("coinflow.review.oldest.age")
                    .with_unit("s")
                    .with_description("Age of the oldest held payment waiting for review")
                    .with_callback(move |o| {
                        let oldest = q2.oldest_us.load(Ordering::Relaxed);
                        let age = if oldest == 0 {
                            0.0
                        } else {
                            (micros(SystemTime::now()) - oldest).max(0) as f64 / 1e6
                        };
                        o.observe(age, &[]);
                    })
                    .build(),
            ),
            queue,
        }
    }

    /// Counts the ledger entries a write produced.
    pub fn count_entries(&self, entries: &[coinflow_shared::proto::v1::LedgerEntry]) {
        for e in entries {
            self.ledger_entries.add(
                1,
                &[
                    KeyValue::new("kind", e.kind.clone()),
                    KeyValue::new("sku", e.sku.clone()),
                ],
            );
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Wraps every gRPC call in its server span and `rpc.server.duration`.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// See [`ObserveLayer`].
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Body + Send + 'static,
{
    type Response = Response<ObservedBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let started = Instant::now();
        // Labels and span names come from the table of served methods, never from the
        // request: made-up paths would grow a series each.
        let (service, method) = crate::grpc::methods::lookup(request.uri().path())
            .map_or(("unknown", "unknown"), |m| (m.service, m.method));
        // A batch carries the trace context of each of its events, and each event gets its
        // server span in its own trace (see `grpc::ingest`); the call itself has none.
        let span = if method == BATCH_METHOD {
            tracing::Span::none()
        } else {
            let span = server_span(service, method);
            let _ = span.set_parent(coinflow_shared::telemetry::extract(request.headers()));
            span
        };
        let future = self.inner.call(request).instrument(span.clone());
        let metrics = Arc::clone(&self.metrics);
        Box::pin(async move {
            let response = future.await?;
            let code = grpc_status(response.headers());
            let finish = Finish {
                span,
                started,
                service,
                method,
                metrics,
                code,
            };
            Ok(response.map(|inner| ObservedBody {
                inner,
                finish: Some(finish),
            }))
        })
    }
}

/// The method whose calls carry several events, each with its own trace context.
pub const BATCH_METHOD: &str = "DeliverBatch";

/// A gRPC server span, with fields for what ingest learns about the event.
pub fn server_span(service: &str, method: &str) -> tracing::Span {
    tracing::info_span!(
        "grpc.server",
        otel.name = %format!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = Empty,
        coinflow.event_type = Empty,
        coinflow.category = Empty,
        coinflow.payment_id = Empty,
        coinflow.outcome = Empty,
        coinflow.held_reason = Empty,
        coinflow.duplicate = Empty,
        coinflow.catalog_item = Empty,
    )
}

/// Records a call's gRPC status code on its span.
pub fn record_status(span: &tracing::Span, code: i64) {
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i64> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// What to record when a call's response ends.
struct Finish {
    span: tracing::Span,
    started: Instant,
    service: &'static str,
    method: &'static str,
    metrics: Arc<Metrics>,
    code: Option<i64>,
}

impl Finish {
    fn record(self) {
        // A stream dropped before its trailers (the client left) counts as CANCELLED.
        let code = self.code.unwrap_or(1);
        record_status(&self.span, code);
        self.metrics.rpc_duration.record(
            self.started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", self.service),
                KeyValue::new("rpc.method", self.method),
                KeyValue::new("rpc.grpc.status_code", code),
            ],
        );
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the call when its trailers (the gRPC status) pass, or
    /// when it is dropped.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        finish: Option<Finish>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(finish) = this.project().finish.take() {
                finish.record();
            }
        }
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut finish) = this.finish.take()
                {
                    finish.code = grpc_status(trailers).or(finish.code);
                    finish.record();
                }
            }
            Poll::Ready(None) => {
                if let Some(mut finish) = this.finish.take() {
                    finish.code = finish.code.or(Some(0));
                    finish.record();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
