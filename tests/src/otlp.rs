//! An in-process OTLP/gRPC receiver (the published OpenTelemetry proto types on a real
//! tonic server) that keeps every span and metric batch it is sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// A span as received, with its service.
#[derive(Debug, Clone)]
pub struct Received {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// The span.
    pub span: Span,
}

impl Received {
    /// A string, int or bool attribute, rendered as a string.
    pub fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| render(kv.value.as_ref()))
    }

    /// The trace id in hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span id in hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id in hex (empty for a root).
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An attribute value as a string.
pub fn render(value: Option<&AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn service_of(attrs: &[KeyValue]) -> String {
    attrs
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| render(kv.value.as_ref()))
        .unwrap_or_default()
}

/// The receiver.
#[derive(Clone, Default)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    /// Every attribute value received (spans, events, resources, metrics), for leak scans.
    pub values: Arc<Mutex<Vec<String>>>,
    metric_batches: Arc<Mutex<usize>>,
}

impl Collector {
    /// Serves on a free port; returns the collector and its address.
    pub async fn start() -> (Self, SocketAddr) {
        let collector = Self::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpIncoming::from(listener));
        tokio::spawn(server);
        (collector, addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// How many metric batches arrived.
    pub fn metric_batches(&self) -> usize {
        *self.metric_batches.lock().unwrap()
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        let mut values = self.values.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = service_of(&attrs);
            values.extend(attrs.iter().filter_map(|kv| render(kv.value.as_ref())));
            for ss in rs.scope_spans {
                for span in ss.spans {
                    values.push(span.name.clone());
                    values.extend(
                        span.attributes
                            .iter()
                            .filter_map(|kv| render(kv.value.as_ref())),
                    );
                    for event in &span.events {
                        values.push(event.name.clone());
                        values.extend(
                            event
                                .attributes
                                .iter()
                                .filter_map(|kv| render(kv.value.as_ref())),
                        );
                    }
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        *self.metric_batches.lock().unwrap() += 1;
        let debug = format!("{:?}", request.into_inner());
        self.values.lock().unwrap().push(debug);
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}
