//! Telemetry both services share: logs (JSON in containers, human on a terminal, each line
//! inside a request carrying `trace_id` and `span_id`), OpenTelemetry traces and metrics,
//! and W3C trace-context propagation over HTTP headers and gRPC metadata.
//!
//! [`Telemetry::init`] builds it all and hands back a guard that `main` flushes on
//! shutdown. Spans and metrics go out over OTLP/gRPC only when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or the signal-specific variable) is set; the exporter
//! connects lazily, so a collector that is down never stops start-up. `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` are
//! honoured. Metrics are always readable as Prometheus text ([`prometheus_text`]).

use std::collections::HashMap;
use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, global};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, fmt};

use crate::config::LogFormat;
use crate::log_writer::{self, LogGuard};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An OTLP exporter could not be built (a malformed endpoint, say).
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// The Prometheus reader could not be built.
    #[error("Prometheus reader: {0}")]
    Prometheus(String),
    /// The log writer's thread could not start.
    #[error("starting the log writer: {0}")]
    LogWriter(std::io::Error),
    /// A global log subscriber was already installed.
    #[error("installing the log subscriber: {0}")]
    Subscriber(String),
}

/// The installed telemetry. Call [`Telemetry::shutdown`] on exit, or batched spans are lost.
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    /// Dropped last: writes out the log lines still waiting.
    _log_writer: LogGuard,
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

fn resource(default_service: &'static str) -> Resource {
    let named = env_set("OTEL_SERVICE_NAME")
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name(default_service).build()
    }
}

impl Telemetry {
    /// Installs the propagator, tracer and meter providers, and the log subscriber.
    /// `RUST_LOG` overrides `default_filter`. Must run inside the tokio runtime.
    pub fn init(
        default_service: &'static str,
        format: LogFormat,
        default_filter: &str,
    ) -> Result<Self, TelemetryError> {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let resource = resource(default_service);

        let mut traces = SdkTracerProvider::builder().with_resource(resource.clone());
        if env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            traces = traces.with_batch_exporter(exporter);
        }
        let tracer_provider = traces.build();
        global::set_tracer_provider(tracer_provider.clone());

        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(prometheus::default_registry().clone())
            .build()
            .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
        let mut metrics = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(prometheus);
        if env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            metrics = metrics.with_periodic_exporter(exporter);
        }
        let meter_provider = metrics.build();
        global::set_meter_provider(meter_provider.clone());

        let filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
        let json = match format {
            LogFormat::Json => true,
            LogFormat::Human => false,
            LogFormat::Auto => !std::io::stderr().is_terminal(),
        };
        let (writer, log_writer) =
            log_writer::start(std::io::stderr()).map_err(TelemetryError::LogWriter)?;
        let logs = if json {
            // The JSON lines print no span fields: formatting them at every span's start
            // would be wasted.
            fmt::layer()
                .fmt_fields(NoFields)
                .event_format(JsonWithTrace)
                .with_writer(writer)
                .boxed()
        } else {
            fmt::layer()
                .event_format(HumanWithTrace(Format::default()))
                .with_writer(writer)
                .boxed()
        };
        // Only this system's spans become OpenTelemetry spans; the transport crates (the
        // exporter's own included) would otherwise trace themselves.
        let spans = Targets::new().with_default(Level::INFO).with_targets(
            [
                "h2",
                "hyper",
                "hyper_util",
                "tonic",
                "tower",
                "opentelemetry",
                "opentelemetry_sdk",
                "sqlx",
            ]
            .map(|t| (t, LevelFilter::OFF)),
        );
        // Nothing here reads the OpenTelemetry context as the current one (propagation and
        // log lines ask the span), so entering a span need not activate it; busy and idle
        // times, and thread attributes, cost a clock read or two on every poll of every
        // instrumented future and no dashboard reads them.
        let subscriber = tracing_subscriber::registry().with(filter).with(logs).with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer_provider.tracer(default_service))
                .with_context_activation(false)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_filter(spans),
        );
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
        Ok(Self {
            tracer_provider,
            meter_provider,
            _log_writer: log_writer,
        })
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(self) {
        if let Err(e) = self.tracer_provider.shutdown() {
            tracing::warn!(error = %e, "flushing spans on shutdown");
        }
        if let Err(e) = self.meter_provider.shutdown() {
            tracing::warn!(error = %e, "flushing metrics on shutdown");
        }
    }
}

/// Every metric this process recorded, in the Prometheus text exposition format.
pub fn prometheus_text() -> String {
    let mut out = String::new();
    let families = prometheus::gather();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    out
}

/// The trace context carried by HTTP headers (`traceparent`, `tracestate`).
pub fn extract(headers: &http::HeaderMap) -> Context {
    global::get_text_map_propagator(|p| p.extract(&opentelemetry_http::HeaderExtractor(headers)))
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// `span`'s trace context as a map (`traceparent`, `tracestate`), for a message that
/// carries the contexts of several calls.
pub fn context_map(span: &tracing::Span) -> HashMap<String, String> {
    let cx = span.context();
    let mut map = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut map));
    map
}

/// The trace context carried in such a map.
pub fn extract_map(map: &HashMap<String, String>) -> Context {
    global::get_text_map_propagator(|p| p.extract(map))
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Reads trace context from gRPC metadata, for services called without HTTP headers.
pub struct MetadataExtractor<'a>(pub &'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The trace and span ids of the current span, when there is one.
fn current_ids() -> Option<(String, String)> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// One JSON object per line: timestamp, level, target, message, `fields`, the current
/// span's name, and `trace_id`/`span_id` inside a traced request. Written straight into
/// one buffer (no JSON tree per line): every delivery logs a line in each service.
struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let mut timestamp = String::with_capacity(32);
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut line = Vec::with_capacity(192 + fields.fields.len());
        line.extend_from_slice(b"{\"timestamp\":");
        json_str(&mut line, &timestamp);
        line.extend_from_slice(b",\"level\":");
        json_str(&mut line, meta.level().as_str());
        line.extend_from_slice(b",\"target\":");
        json_str(&mut line, meta.target());
        if let Some(message) = &fields.message {
            line.extend_from_slice(b",\"message\":");
            line.extend_from_slice(message);
        }
        line.extend_from_slice(b",\"fields\":{");
        line.extend_from_slice(&fields.fields);
        line.push(b'}');
        if let Some(span) = ctx.lookup_current() {
            line.extend_from_slice(b",\"span\":");
            json_str(&mut line, span.name());
        }
        if let Some((trace_id, span_id)) = current_ids() {
            line.extend_from_slice(b",\"trace_id\":");
            json_str(&mut line, &trace_id);
            line.extend_from_slice(b",\"span_id\":");
            json_str(&mut line, &span_id);
        }
        line.extend_from_slice(b"}\n");
        // Every piece is a `str` or serde_json's output: always UTF-8.
        writer.write_str(&String::from_utf8_lossy(&line))
    }
}

/// `value` as a JSON string (serde_json's escaping), appended to `out`.
fn json_str(out: &mut Vec<u8>, value: &str) {
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(out, value);
}

/// The default human format, prefixed with `trace_id`/`span_id` inside a traced request.
struct HumanWithTrace(Format);

impl<S, N> FormatEvent<S, N> for HumanWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if let Some((trace_id, span_id)) = current_ids() {
            write!(writer, "trace_id={trace_id} span_id={span_id} ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

/// Formats no fields: what span fields become in the JSON format, which never prints them.
struct NoFields;

impl<'writer> FormatFields<'writer> for NoFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        _writer: Writer<'writer>,
        _fields: R,
    ) -> std::fmt::Result {
        Ok(())
    }
}

/// An event's fields as JSON: `message` (a JSON value) apart, the rest as the members
/// of an object (`"name":value,...`).
#[derive(Default)]
struct JsonFields {
    message: Option<Vec<u8>>,
    fields: Vec<u8>,
}

impl JsonFields {
    fn member(&mut self, field: &Field) -> &mut Vec<u8> {
        if field.name() == "message" {
            return self.message.insert(Vec::new());
        }
        if !self.fields.is_empty() {
            self.fields.push(b',');
        }
        json_str(&mut self.fields, field.name());
        self.fields.push(b':');
        &mut self.fields
    }

    /// A number or `true`/`false`, as serde_json writes it (a non-finite float: `null`).
    fn value(&mut self, field: &Field, value: impl serde::Serialize) {
        let _ = serde_json::to_writer(self.member(field), &value);
    }
}

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        json_str(self.member(field), value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.value(field, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.value(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.value(field, value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.value(field, value);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        json_str(self.member(field), &value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        json_str(self.member(field), &format!("{value:?}"));
    }
}
