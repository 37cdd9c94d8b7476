//! "An authentic delivery is recorded or retried, never refused forever": whatever the
//! bytes of an authenticated body (too deep, too large a `webhookInfo`, not JSON, a key
//! repeated, many large events at once), the real edge and fulfillment record it and
//! answer 200, and a call that ingest refuses as a whole never fails the events it carried.

use coinflow_shared::identity::body_key;
use coinflow_shared::limits::MAX_BATCH_BYTES;
use coinflow_shared::proto::v1::{Outcome, Payment};
use coinflow_tests::bodies::{settled, wallet_of};
use coinflow_tests::http::Http;
use coinflow_tests::process::Proc;
use coinflow_tests::{
    EdgeHandle, FulfillmentHandle, KEY, Query, TestDb, edge_config, free_addr, ingest_client,
};
use futures::StreamExt;
use http::{Method, StatusCode};
use tonic::Code;

use crate::observability::{sample, scrape};
use crate::stub::{Answer, Hold, Stub};

/// A `Settled` buying a sword whose `webhookInfo` is `info` (a JSON object).
fn settled_with_info(payment_id: &str, info: &str) -> Vec<u8> {
    let body = String::from_utf8(settled(payment_id, "sword", 500)).unwrap();
    assert!(body.contains(r#""webhookInfo":{"item":"sword"}"#), "{body}");
    body.replace(
        r#""webhookInfo":{"item":"sword"}"#,
        &format!(r#""webhookInfo":{info}"#),
    )
    .into_bytes()
}

/// A `Settled` buying a sword that carries `pad` bytes in a field nobody reads.
fn large_settled(payment_id: &str, pad: usize) -> Vec<u8> {
    let body = String::from_utf8(settled(payment_id, "sword", 500)).unwrap();
    assert!(body.contains(r#""paymentMethod":"card""#), "{body}");
    body.replace(
        r#""paymentMethod":"card""#,
        &format!(r#""paymentMethod":"card","memo":"{}""#, "m".repeat(pad)),
    )
    .into_bytes()
}

fn grants(payment: &Payment) -> usize {
    payment.ledger.iter().filter(|e| e.kind == "grant").count()
}

/// The payment's one event was held for `reason`, with exactly `body` kept, and nothing
/// was granted.
async fn assert_held(query: &mut Query, payment_id: &str, body: &[u8], reason: &str) {
    let payment = query.payment(payment_id).await.unwrap();
    assert_eq!(payment.events.len(), 1, "{payment_id}");
    let event = &payment.events[0];
    assert_eq!(event.outcome(), Outcome::Held, "{payment_id}");
    assert_eq!(event.held_reason.as_deref(), Some(reason), "{payment_id}");
    assert_eq!(event.raw_body, body, "{payment_id}");
    assert_eq!(grants(&payment), 0, "{payment_id}");
}

#[tokio::test]
async fn authentic_deliveries_are_recorded_whatever_their_bytes() {
    let db = TestDb::new().await;
    let mut fulfillment = Proc::fulfillment(&db).await;
    // Generous budgets: this test is about bytes, never about speed on a busy machine.
    let mut edge = Proc::edge(
        fulfillment.addr,
        KEY,
        &[
            ("EDGE_DELIVER_DEADLINE_MS", "20000"),
            ("EDGE_REQUEST_TIMEOUT_MS", "30000"),
            ("EDGE_BODY_TIMEOUT_MS", "20000"),
        ],
    )
    .await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);

    let deep = settled_with_info(
        "deep-1",
        &format!(
            r#"{{"item":"sword","nest":{}1{}}}"#,
            "[".repeat(60),
            "]".repeat(60)
        ),
    );
    let wide = settled_with_info(
        "wide-1",
        &format!(r#"{{"item":"sword","pad":"{}"}}"#, "w".repeat(200 * 1024)),
    );
    let repeated = settled_with_info("dup-1", r#"{"item":"sword","item":"starter-bundle"}"#);
    let full = settled("broken-1", "sword", 500);
    let broken = full[..full.len() - 7].to_vec();
    let large: Vec<Vec<u8>> = (0..64)
        .map(|i| large_settled(&format!("large-{i}"), 200 * 1024))
        .collect();
    let normal: Vec<Vec<u8>> = (0..20)
        .map(|i| settled(&format!("normal-{i}"), "sword", 500))
        .collect();

    let http = Http::default();
    let odd = [&deep, &wide, &repeated, &broken];
    let answers = futures::future::join_all(
        odd.iter()
            .copied()
            .chain(&large)
            .chain(&normal)
            .map(|body| http.deliver(&url, body.clone())),
    )
    .await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    }

    let mut query = Query::connect(fulfillment.addr).await;
    assert_held(&mut query, "deep-1", &deep, "malformed_webhook_info").await;
    assert_held(&mut query, "wide-1", &wide, "malformed_webhook_info").await;
    // The repeated key makes the body mean two things: held as it came, under the
    // payment it names.
    assert_held(&mut query, "dup-1", &repeated, "unparseable").await;
    // Broken JSON names no payment: the ledger has it under its bytes' identity.
    assert_eq!(
        db.event_outcome(&body_key(&broken)).await,
        Some(("held".to_owned(), Some("unparseable".to_owned())))
    );
    for (i, body) in large.iter().enumerate() {
        let id = format!("large-{i}");
        let payment = query.payment(&id).await.unwrap();
        assert_eq!(grants(&payment), 1, "{id}");
        assert_eq!(payment.events[0].raw_body, *body, "{id}");
        assert_eq!(query.wallet(&wallet_of(&id)).await, [("sword".into(), 1)]);
    }
    for i in 0..20 {
        let payment = query.payment(&format!("normal-{i}")).await.unwrap();
        assert_eq!(grants(&payment), 1, "normal-{i}");
    }
    let metrics = scrape(fulfillment.admin).await;
    assert_eq!(
        sample(
            &metrics,
            "coinflow_events_held_total",
            &[("reason", "unparseable")]
        ),
        2.0,
        "{metrics}"
    );

    // Coinflow's retry of a body that is not an envelope is the same event, acked again.
    let again = http.deliver(&url, broken.clone()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    let metrics = scrape(fulfillment.admin).await;
    assert_eq!(
        sample(&metrics, "coinflow_events_duplicates_total", &[]),
        1.0
    );
    assert!(edge.terminate().await.success());
    assert!(fulfillment.terminate().await.success());
}

#[tokio::test]
async fn a_call_refused_as_a_whole_is_retried_event_by_event() {
    let db = TestDb::new().await;
    let fulfillment = FulfillmentHandle::start(&db).await;
    // Refuses every call of several events, as an ingest would one it cannot decode.
    let stub = Stub::start(
        Answer::Forward {
            upstream: ingest_client(fulfillment.addr).await,
            refuse_shared: Some(Code::OutOfRange),
        },
        Some(Hold {
            calls: 4,
            events: 24,
        }),
    )
    .await;
    let mut config = edge_config(stub.addr);
    config.deliver_deadline_ms = 20_000;
    config.request_timeout_ms = 30_000;
    // 64 bodies of 200 KiB at once on a loaded machine: reading one may pass the 2 s body
    // timeout (a 408 before authentication), which is not what this test is about.
    config.body_timeout_ms = 20_000;
    let edge = EdgeHandle::start(config).await;
    let (http, url) = (Http::default(), edge.url());
    let answers = futures::future::join_all(
        (0..24).map(|i| http.deliver(&url, settled(&format!("split-{i}"), "sword", 500))),
    )
    .await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    }

    let calls = stub.calls();
    let refused: Vec<_> = calls.iter().filter(|c| c.event_keys.len() > 1).collect();
    assert!(
        !refused.is_empty(),
        "no call carried several events: {calls:#?}"
    );
    for call in &refused {
        for key in &call.event_keys {
            assert!(
                calls.iter().any(|c| c.event_keys == [key.clone()]),
                "{key} was never retried alone"
            );
        }
    }
    let mut query = Query::connect(fulfillment.addr).await;
    for i in 0..24 {
        let payment = query.payment(&format!("split-{i}")).await.unwrap();
        assert_eq!(grants(&payment), 1, "split-{i}");
    }
}

#[tokio::test]
async fn large_events_share_calls_only_up_to_the_batch_byte_limit() {
    let db = TestDb::new().await;
    let fulfillment = FulfillmentHandle::start(&db).await;
    let stub = Stub::start(
        Answer::Forward {
            upstream: ingest_client(fulfillment.addr).await,
            refuse_shared: None,
        },
        Some(Hold {
            calls: 4,
            events: 64,
        }),
    )
    .await;
    let mut config = edge_config(stub.addr);
    config.deliver_deadline_ms = 20_000;
    config.request_timeout_ms = 30_000;
    // 64 bodies of 200 KiB at once on a loaded machine: reading one may pass the 2 s body
    // timeout (a 408 before authentication), which is not what this test is about.
    config.body_timeout_ms = 20_000;
    let edge = EdgeHandle::start(config).await;
    let (http, url) = (Http::default(), edge.url());
    let answers = futures::future::join_all(
        (0..64).map(|i| http.deliver(&url, large_settled(&format!("capped-{i}"), 200 * 1024))),
    )
    .await;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    }

    let calls = stub.calls();
    let sizes: Vec<(usize, usize)> = calls
        .iter()
        .map(|c| (c.event_keys.len(), c.bytes))
        .collect();
    assert!(
        sizes.iter().any(|(events, _)| *events > 1),
        "no call carried several events: {sizes:?}"
    );
    for (events, bytes) in &sizes {
        // The request adds a few bytes of framing per event to the events' own sizes.
        assert!(
            *events == 1 || *bytes <= MAX_BATCH_BYTES + 8 * events,
            "a call of {events} events is {bytes} bytes: {sizes:?}"
        );
    }
    let mut query = Query::connect(fulfillment.addr).await;
    for i in 0..64 {
        let payment = query.payment(&format!("capped-{i}")).await.unwrap();
        assert_eq!(grants(&payment), 1, "capped-{i}");
    }
}

#[tokio::test]
async fn edge_metrics_stay_bounded_whatever_methods_and_paths_are_sent() {
    let mut edge = Proc::edge(free_addr(), KEY, &[]).await;
    let base = format!("http://{}", edge.addr);
    let http = Http::default();
    // 3000 made-up methods on the webhook path, 1000 made-up paths.
    let statuses: Vec<StatusCode> = futures::stream::iter(0..4000)
        .map(|i| {
            let http = http.clone();
            let (method, url) = if i < 3000 {
                let method = Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
                (method, format!("{base}/webhooks/coinflow"))
            } else {
                (Method::POST, format!("{base}/invented-path-{i}"))
            };
            async move { http.send(method, &url, &[], Vec::new()).await.status }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::METHOD_NOT_ALLOWED)
            .count(),
        3000
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::NOT_FOUND)
            .count(),
        1000
    );

    let metrics = scrape(edge.admin).await;
    assert!(
        metrics.len() < 1024 * 1024,
        "/metrics is {} bytes",
        metrics.len()
    );
    assert!(
        !metrics.contains("INVENTED"),
        "a request's method became a label"
    );
    assert!(
        !metrics.contains("invented-path"),
        "a request's path became a label"
    );
    assert_eq!(
        sample(
            &metrics,
            "http_server_request_duration_seconds_count",
            &[
                ("http_request_method", "_OTHER"),
                ("http_route", "/webhooks/coinflow"),
                ("http_response_status_code", "405")
            ]
        ),
        3000.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "http_server_request_duration_seconds_count",
            &[
                ("http_request_method", "POST"),
                ("http_route", "other"),
                ("http_response_status_code", "404")
            ]
        ),
        1000.0
    );
    assert!(edge.terminate().await.success());
}

/// Text a database cannot take in a text column or its index (PostgreSQL refuses U+0000 and
/// index entries over ~2.7 KB) must not make an authentic event fail on every retry.
#[tokio::test]
async fn fields_no_database_can_store_are_recorded_with_the_raw_body() {
    let stack = coinflow_tests::Stack::start().await;
    let http = Http::default();
    let long_id = "p".repeat(5000);
    let bodies = [
        String::from_utf8(settled("nul-1", "sword", 500))
            .unwrap()
            .replace(&wallet_of("nul-1"), "mygame\\u0000user"),
        String::from_utf8(settled("long-1", "sword", 500))
            .unwrap()
            .replace("long-1", &long_id),
        r#"{"eventType":"Card Payment Chargeback Opened","category":"Purchase","created":"c","data":{"id":"cb-nul","chargebackId":"cb\u0000"}}"#
            .to_owned(),
    ];
    for body in &bodies {
        let a = http
            .deliver(&stack.edge.url(), body.clone().into_bytes())
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}: {}", &body[..80], a.text);
        let (outcome, reason) = stack
            .db
            .event_outcome(&body_key(body.as_bytes()))
            .await
            .unwrap_or_else(|| panic!("not recorded: {}", &body[..80]));
        assert_eq!(
            (outcome.as_str(), reason.as_deref()),
            ("held", Some("unparseable"))
        );
    }
    let mut q = stack.query().await;
    assert!(q.wallet(&wallet_of("nul-1")).await.is_empty());
    // Filed under the payment when the id itself is fine.
    assert_eq!(q.payment("nul-1").await.unwrap().events.len(), 1);
}
