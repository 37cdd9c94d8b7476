//! One webhook is one OpenTelemetry trace across edge and fulfillment, exported over OTLP
//! to a real receiver; metrics count exactly what was sent; nothing secret leaks.

use std::time::Duration;

use coinflow_tests::TestDb;
use coinflow_tests::bodies::{fixture, now, settled, sign, sign_at};
use coinflow_tests::http::Http;
use coinflow_tests::otlp::{Collector, Received};
use coinflow_tests::process::Proc;
use coinflow_tests::{API_TOKEN, INGEST_TOKEN, KEY, OPERATOR_TOKEN};
use http::StatusCode;

/// A Settled body whose card fields are markers a leak scan can find.
fn card_body() -> Vec<u8> {
    String::from_utf8(fixture("settled-sword.json"))
        .unwrap()
        .replace("\"last4\":\"1111\"", "\"last4\":\"CARDSECRET-L4\"")
        .replace(
            "\"bin\":\"411111\"",
            "\"bin\":\"CARDSECRET-BIN\",\"cardToken\":\"CARDSECRET-TOKEN\"",
        )
        .into_bytes()
}

async fn stack(env: &[(&str, &str)]) -> (TestDb, Proc, Proc) {
    let db = TestDb::new().await;
    let fulfillment = Proc::fulfillment_env(&db, env).await;
    let edge = Proc::edge(fulfillment.addr, KEY, env).await;
    (db, fulfillment, edge)
}

fn one<'a>(spans: &'a [Received], service: &str, name: &str) -> &'a Received {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.service == service && s.span.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{service} {name}: {:#?}",
        spans
            .iter()
            .map(|s| (&s.service, &s.span.name))
            .collect::<Vec<_>>()
    );
    found[0]
}

#[tokio::test]
async fn one_webhook_is_one_trace_across_both_services_and_nothing_secret_is_exported() {
    let (collector, otlp) = Collector::start().await;
    let endpoint = format!("http://{otlp}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ("RUST_LOG", "debug"),
    ];
    let (test_db, mut fulfillment, mut edge) = stack(&env).await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let http = Http::default();

    let body = card_body();
    let signature = sign(&body);
    let a = http
        .post(
            &url,
            &[("coinflow-signature", &signature), ("authorization", KEY)],
            body,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    // A second delivery continues the caller's trace.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{caller_trace}-00f067aa0ba902b7-01");
    let second = settled("obs-2", "sword", 500);
    let sig2 = sign(&second);
    let b = http
        .post(
            &url,
            &[("coinflow-signature", &sig2), ("traceparent", &traceparent)],
            second,
        )
        .await;
    assert_eq!(b.status, StatusCode::OK);
    // Internal callers of the query API get their trace continued too.
    let query_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut query = coinflow_tests::Query::connect(fulfillment.addr).await;
    let mut request = tonic::Request::new(coinflow_shared::proto::v1::GetPaymentRequest {
        payment_id: "obs-2".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{query_trace}-b7ad6b7169203331-01")
            .parse()
            .unwrap(),
    );
    query.0.get_payment(request).await.unwrap();
    // Spans are flushed on graceful shutdown.
    assert!(edge.terminate().await.success());
    assert!(fulfillment.terminate().await.success());

    let spans = collector.spans();
    let server = spans
        .iter()
        .find(|s| {
            s.service == "webhook-edge"
                && s.attr("coinflow.payment_id").as_deref()
                    == Some("51e5ac49-d3ad-412c-afdb-acb1a5b50b3d")
        })
        .unwrap_or_else(|| panic!("no edge server span: {spans:#?}"));
    let trace = server.trace_id();
    let in_trace: Vec<Received> = spans
        .iter()
        .filter(|s| s.trace_id() == trace)
        .cloned()
        .collect();

    // The edge server span, with HTTP semantic conventions and the outcome.
    assert_eq!(server.span.name, "POST /webhooks/coinflow");
    assert_eq!(server.span.kind, 2, "SERVER");
    assert_eq!(server.attr("http.request.method").as_deref(), Some("POST"));
    assert_eq!(
        server.attr("http.route").as_deref(),
        Some("/webhooks/coinflow")
    );
    assert_eq!(
        server.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        server.attr("coinflow.event_type").as_deref(),
        Some("Settled")
    );
    assert_eq!(
        server.attr("coinflow.outcome").as_deref(),
        Some("OUTCOME_GRANTED")
    );
    assert!(
        server.parent_id().is_empty(),
        "a webhook without traceparent starts a trace"
    );
    // Auth and parse as children.
    for name in ["webhook.auth", "webhook.parse"] {
        assert_eq!(
            one(&in_trace, "webhook-edge", name).parent_id(),
            server.span_id(),
            "{name}"
        );
    }
    // The tonic client span, then fulfillment's server span under it, then the storage
    // transaction under that. The event travelled in a `DeliverBatch` call, which carries
    // each event's own trace context.
    let client = one(
        &in_trace,
        "webhook-edge",
        "coinflow.fulfillment.v1.Ingest/DeliverBatch",
    );
    assert_eq!(client.span.kind, 3, "CLIENT");
    assert_eq!(client.parent_id(), server.span_id());
    assert_eq!(client.attr("rpc.grpc.status_code").as_deref(), Some("0"));
    let grpc = one(
        &in_trace,
        "fulfillment-svc",
        "coinflow.fulfillment.v1.Ingest/DeliverBatch",
    );
    assert_eq!(grpc.span.kind, 2, "SERVER");
    assert_eq!(
        grpc.parent_id(),
        client.span_id(),
        "joined through the event's trace context"
    );
    assert_eq!(
        grpc.attr("coinflow.outcome").as_deref(),
        Some("OUTCOME_GRANTED")
    );
    assert_eq!(grpc.attr("coinflow.catalog_item").as_deref(), Some("sword"));
    assert_eq!(grpc.attr("rpc.grpc.status_code").as_deref(), Some("0"));
    let db = one(&in_trace, "fulfillment-svc", "db.transaction");
    assert_eq!(db.parent_id(), grpc.span_id());
    let system = match test_db.backend {
        coinflow_tests::db::Backend::Sqlite => "sqlite",
        coinflow_tests::db::Backend::Postgres => "postgresql",
    };
    assert_eq!(db.attr("db.system.name").as_deref(), Some(system));

    // The second webhook continued the caller's trace.
    let continued = spans
        .iter()
        .find(|s| {
            s.service == "webhook-edge" && s.attr("coinflow.payment_id").as_deref() == Some("obs-2")
        })
        .unwrap();
    assert_eq!(continued.trace_id(), caller_trace);
    assert_eq!(continued.parent_id(), "00f067aa0ba902b7");
    assert!(
        spans
            .iter()
            .any(|s| s.service == "fulfillment-svc" && s.trace_id() == caller_trace)
    );

    // Log lines inside the request carry the trace: one info line per webhook.
    let acked: Vec<serde_json::Value> = edge
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["message"] == "webhook acked")
        .collect();
    assert_eq!(acked.len(), 2);
    assert_eq!(acked[0]["trace_id"], trace.as_str());
    assert_eq!(acked[0]["level"], "INFO");
    assert!(acked[0]["fields"]["latency_ms"].is_u64());
    let recorded = fulfillment.log_text();
    assert!(
        recorded
            .lines()
            .any(|l| l.contains("event recorded") && l.contains(&trace)),
        "fulfillment logs carry the trace id"
    );

    assert!(
        collector.metric_batches() > 0,
        "metrics went out over OTLP too"
    );

    // Nothing secret in anything exported or logged.
    let mac = signature.split("v1=").nth(1).unwrap().to_owned();
    let exported = collector.values.lock().unwrap().join("\n");
    let logged = format!("{}\n{}", edge.log_text(), fulfillment.log_text());
    for secret in [
        KEY,
        API_TOKEN,
        INGEST_TOKEN,
        OPERATOR_TOKEN,
        mac.as_str(),
        "CARDSECRET",
        "velocityHold",
    ] {
        assert!(
            !exported.contains(secret),
            "exported telemetry contains {secret}"
        );
        assert!(!logged.contains(secret), "logs contain {secret}");
    }
}

#[tokio::test]
async fn service_name_resource_attributes_and_sampler_come_from_the_environment() {
    let (collector, otlp) = Collector::start().await;
    let endpoint = format!("http://{otlp}");
    let common = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let db = TestDb::new().await;
    let mut fulfillment = Proc::fulfillment_env(
        &db,
        &[&common[..], &[("OTEL_TRACES_SAMPLER", "always_off")]].concat(),
    )
    .await;
    let mut edge = Proc::edge(
        fulfillment.addr,
        KEY,
        &[
            &common[..],
            &[
                ("OTEL_SERVICE_NAME", "renamed-edge"),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=it-test"),
            ],
        ]
        .concat(),
    )
    .await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    assert_eq!(
        Http::default()
            .deliver(&url, fixture("settled-sword.json"))
            .await
            .status,
        StatusCode::OK
    );
    assert!(edge.terminate().await.success());
    assert!(fulfillment.terminate().await.success());
    let spans = collector.spans();
    assert!(
        spans.iter().any(|s| s.service == "renamed-edge"),
        "{spans:#?}"
    );
    assert!(
        spans.iter().all(|s| s.service == "renamed-edge"),
        "fulfillment samples nothing"
    );
    assert!(
        collector
            .values
            .lock()
            .unwrap()
            .iter()
            .any(|v| v == "it-test")
    );
}

#[tokio::test]
async fn start_up_survives_a_collector_that_is_down() {
    let dead = coinflow_tests::free_addr();
    let endpoint = format!("http://{dead}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let (_dir, mut fulfillment, mut edge) = stack(&env).await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let a = Http::default()
        .deliver(&url, fixture("settled-sword.json"))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(edge.terminate().await.success());
    assert!(fulfillment.terminate().await.success());
}

/// The value of the Prometheus sample `name` whose labels include all of `labels`,
/// summed over the series that match.
pub(crate) fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

pub(crate) async fn scrape(admin: std::net::SocketAddr) -> String {
    let answer = Http::default()
        .get(&format!("http://{admin}/metrics"))
        .await;
    assert!(answer.status.is_success());
    answer.text
}

#[tokio::test]
async fn metrics_count_exactly_what_was_sent() {
    let (_dir, mut fulfillment, mut edge) = stack(&[]).await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let http = Http::default();
    for body in [
        settled("m-1", "sword", 500),
        settled("m-2", "sword", 500),
        settled("m-3", "starter-bundle", 1500),
    ] {
        assert_eq!(http.deliver(&url, body).await.status, StatusCode::OK);
    }
    assert_eq!(
        http.deliver(&url, settled("m-1", "sword", 500))
            .await
            .status,
        StatusCode::OK,
        "duplicate"
    );
    assert_eq!(
        http.deliver(&url, settled("m-4", "sword", 100))
            .await
            .status,
        StatusCode::OK,
        "held"
    );
    let forged = sign_at("not-the-key", now(), b"{}");
    assert_eq!(
        http.post(&url, &[("coinflow-signature", &forged)], b"{}".to_vec())
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        http.post(&url, &[], b"{}".to_vec()).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        http.deliver(&url, b"{not json".to_vec()).await.status,
        StatusCode::OK,
        "recorded and held"
    );

    let e = scrape(edge.admin).await;
    let route = ("http_route", "/webhooks/coinflow");
    assert_eq!(
        sample(
            &e,
            "http_server_request_duration_seconds_count",
            &[route, ("http_response_status_code", "200")]
        ),
        6.0,
        "{e}"
    );
    assert_eq!(
        sample(
            &e,
            "http_server_request_duration_seconds_count",
            &[route, ("http_response_status_code", "401")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &e,
            "http_server_request_duration_seconds_count",
            &[route, ("http_response_status_code", "400")]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &e,
            "coinflow_webhook_auth_failures_total",
            &[("reason", "bad_signature")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &e,
            "coinflow_webhook_auth_failures_total",
            &[("reason", "missing")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &e,
            "rpc_client_duration_seconds_count",
            &[
                ("rpc_method", "DeliverBatch"),
                ("rpc_grpc_status_code", "0")
            ]
        ),
        6.0
    );

    let f = scrape(fulfillment.admin).await;
    assert_eq!(
        sample(
            &f,
            "coinflow_events_total",
            &[("event_type", "Settled"), ("outcome", "OUTCOME_GRANTED")]
        ),
        3.0,
        "{f}"
    );
    assert_eq!(
        sample(
            &f,
            "coinflow_events_total",
            &[("event_type", "Settled"), ("outcome", "OUTCOME_HELD")]
        ),
        1.0
    );
    assert_eq!(sample(&f, "coinflow_events_duplicates_total", &[]), 1.0);
    assert_eq!(
        sample(&f, "coinflow_events_held_total", &[("reason", "underpaid")]),
        1.0
    );
    assert_eq!(
        sample(
            &f,
            "coinflow_events_held_total",
            &[("reason", "unparseable")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &f,
            "coinflow_ledger_entries_total",
            &[("kind", "grant"), ("sku", "sword")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &f,
            "coinflow_ledger_entries_total",
            &[("kind", "grant"), ("sku", "credits")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &f,
            "rpc_server_duration_seconds_count",
            &[
                ("rpc_method", "DeliverBatch"),
                ("rpc_grpc_status_code", "0")
            ]
        ),
        6.0
    );
    // The queue gauges refresh every 2 s.
    let mut f = f;
    for _ in 0..100 {
        if sample(&f, "coinflow_review_queue_size", &[]) == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        f = scrape(fulfillment.admin).await;
    }
    assert_eq!(sample(&f, "coinflow_review_queue_size", &[]), 1.0, "{f}");
    assert!(sample(&f, "coinflow_review_oldest_age_seconds", &[]) > 0.0);
    let ready = Http::default()
        .get(&format!("http://{}/readyz", fulfillment.admin))
        .await;
    assert_eq!(ready.status, StatusCode::OK);
    assert!(edge.terminate().await.success());
    assert!(fulfillment.terminate().await.success());
}
