//! A 200 means durable: outages, restarts and `kill -9` lose nothing that was acked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use coinflow_shared::proto::v1::Outcome;
use coinflow_tests::TestDb;
use coinflow_tests::bodies::{fixture, settled, sign, wallet_of};
use coinflow_tests::http::Http;
use coinflow_tests::process::Proc;
use coinflow_tests::{EdgeHandle, FulfillmentHandle, KEY, Query, edge_config, free_addr};
use futures::StreamExt;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn fulfillment_down_then_up_the_retry_grants_once() {
    let db = TestDb::new().await;
    let addr = free_addr();
    let mut config = edge_config(addr);
    config.deliver_deadline_ms = 300;
    let edge = EdgeHandle::start(config).await;
    let http = Http::default();
    let body = settled("p-retry", "sword", 500);

    let down = http.deliver(&edge.url(), body.clone()).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);

    let fulfillment = FulfillmentHandle::start_on(&db, addr).await;
    // Coinflow retries the same delivery; the edge reconnects on its own.
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        status = http.deliver(&edge.url(), body.clone()).await.status;
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK);
    // And a late duplicate of the retry changes nothing.
    assert_eq!(http.deliver(&edge.url(), body).await.status, StatusCode::OK);

    let mut q = Query::connect(fulfillment.addr).await;
    assert_eq!(
        q.wallet(&wallet_of("p-retry")).await,
        [("sword".to_owned(), 1)]
    );
    assert_eq!(q.payment("p-retry").await.unwrap().events.len(), 1);
}

#[tokio::test]
async fn kill_9_right_after_an_ack_keeps_the_event() {
    let db = TestDb::new().await;
    let mut fulfillment = Proc::fulfillment(&db).await;
    let edge = EdgeHandle::start(edge_config(fulfillment.addr)).await;

    let a = Http::default()
        .deliver(&edge.url(), fixture("settled-sword.json"))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    fulfillment.kill9().await;

    let restarted = Proc::fulfillment(&db).await;
    let mut q = Query::connect(restarted.addr).await;
    let p = q
        .payment("51e5ac49-d3ad-412c-afdb-acb1a5b50b3d")
        .await
        .unwrap();
    assert_eq!(p.events.len(), 1);
    assert_eq!(p.events[0].raw_body, fixture("settled-sword.json"));
    assert_eq!(q.wallet("mygameʬuser-123").await, [("sword".to_owned(), 1)]);
}

#[tokio::test]
async fn kill_9_under_load_every_acked_event_survives() {
    const PAYMENTS: usize = 1000;
    const CONCURRENCY: usize = 300;
    let db = TestDb::new().await;
    let mut fulfillment = Proc::fulfillment(&db).await;
    let mut config = edge_config(fulfillment.addr);
    config.deliver_deadline_ms = 1000;
    // Nothing is shed: every delivery the edge accepts waits on fulfillment's ack, so the
    // requests in flight at the kill are in flight at fulfillment.
    config.max_concurrency = 4 * CONCURRENCY;
    let edge = EdgeHandle::start(config).await;

    let url = edge.url();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    // A closed loop of 300 concurrent deliveries over 1,000 payments, so deliveries are
    // still in flight when the kill lands; none is started after it.
    let load = tokio::spawn({
        let (in_flight, killed) = (Arc::clone(&in_flight), Arc::clone(&killed));
        futures::stream::iter(0..PAYMENTS)
            .map(move |i| {
                let (url, acked_tx) = (url.clone(), acked_tx.clone());
                let (in_flight, killed) = (Arc::clone(&in_flight), Arc::clone(&killed));
                async move {
                    let id = format!("p-load-{i}");
                    if killed.load(Ordering::SeqCst) {
                        return (id, None);
                    }
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let status = Http::default()
                        .deliver(&url, settled(&id, "sword", 500))
                        .await
                        .status;
                    let before_kill = !killed.load(Ordering::SeqCst);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    if status == StatusCode::OK {
                        let _ = acked_tx.send(());
                    }
                    (id, Some((status, before_kill)))
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
    });
    // Kill while deliveries are in flight: after the first 20 acks.
    for _ in 0..20 {
        acked_rx.recv().await.unwrap();
    }
    killed.store(true, Ordering::SeqCst);
    let in_flight_at_kill = in_flight.load(Ordering::SeqCst);
    fulfillment.kill9().await;
    let results = load.await.unwrap();
    assert!(
        in_flight_at_kill > 0,
        "the kill landed while deliveries were in flight"
    );

    let restarted = Proc::fulfillment(&db).await;
    let mut q = Query::connect(restarted.addr).await;
    let (mut acked_before_kill, mut cut_by_kill) = (0, 0);
    for (id, answer) in &results {
        let Some((status, before_kill)) = *answer else {
            continue;
        };
        assert!(
            matches!(status, StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE),
            "{id}: {status}"
        );
        if status == StatusCode::OK {
            acked_before_kill += usize::from(before_kill);
            let p = q
                .payment(id)
                .await
                .unwrap_or_else(|e| panic!("{id} was acked but is missing: {e}"));
            assert_eq!(p.ledger.len(), 1, "{id}");
        } else if !before_kill {
            cut_by_kill += 1;
        }
    }
    assert!(
        acked_before_kill >= 20,
        "20 deliveries were acked before the kill"
    );
    assert!(
        cut_by_kill > 0,
        "deliveries in flight at the kill ({in_flight_at_kill}) were answered 503"
    );
    // Whatever was sent, Coinflow redelivers until acked (or again, as a duplicate); each
    // grants exactly once.
    let mut config = edge_config(restarted.addr);
    config.deliver_deadline_ms = 1000;
    let edge = EdgeHandle::start(config).await;
    let sent: Vec<_> = results
        .iter()
        .filter_map(|(id, answer)| answer.map(|(status, _)| (id.clone(), status)))
        .collect();
    let url = edge.url();
    let redelivered: Vec<_> = futures::stream::iter(sent)
        .map(|(id, status)| {
            let (url, mut q) = (url.clone(), Query(q.0.clone()));
            async move {
                let a = Http::default()
                    .deliver(&url, settled(&id, "sword", 500))
                    .await;
                assert_eq!(a.status, StatusCode::OK, "{id}");
                assert_eq!(
                    q.wallet(&wallet_of(&id)).await,
                    [("sword".to_owned(), 1)],
                    "{id}"
                );
                status != StatusCode::OK
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        redelivered.iter().any(|&first_time| first_time),
        "some deliveries were acked only after the restart"
    );
}

#[tokio::test]
async fn sigterm_lets_the_services_exit_cleanly() {
    let db = TestDb::new().await;
    let mut fulfillment = Proc::fulfillment(&db).await;
    let mut edge = Proc::edge(fulfillment.addr, KEY, &[]).await;
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
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let db = TestDb::new().await;
    let fulfillment = FulfillmentHandle::start(&db).await;
    let edge = EdgeHandle::start(edge_config(fulfillment.addr)).await;

    let body = settled("p-inflight", "sword", 500);
    let signature = sign(&body);
    let mut stream = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    // `Expect: 100-continue` makes the edge say when the route starts reading the body: from
    // then on the request is in flight.
    let head = format!(
        "POST /webhooks/coinflow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         expect: 100-continue\r\ncoinflow-signature: {signature}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut continue_line = [0u8; 25];
    stream.read_exact(&mut continue_line).await.unwrap();
    assert_eq!(&continue_line, b"HTTP/1.1 100 Continue\r\n\r\n");

    edge.shutdown.cancel();
    // New connections are refused once the listener is closed...
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(edge.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the edge kept accepting after shutdown began");
    // ...while the request in flight completes.
    stream.write_all(&body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    edge.task.await.unwrap();
    let mut q = Query::connect(fulfillment.addr).await;
    assert_eq!(
        q.payment("p-inflight").await.unwrap().events[0].outcome,
        Outcome::Granted as i32
    );
}

#[tokio::test]
async fn logs_never_contain_keys_authorization_or_signatures() {
    let db = TestDb::new().await;
    let mut fulfillment = Proc::fulfillment_env(&db, &[("RUST_LOG", "trace")]).await;
    let keys = format!("{KEY},second-secret-key");
    let mut edge = Proc::edge(fulfillment.addr, &keys, &[("RUST_LOG", "trace")]).await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let http = Http::default();
    let body = fixture("settled-sword.json");
    let good_sig = sign(&body);
    let forged_sig =
        coinflow_tests::bodies::sign_at("attacker-key", coinflow_tests::bodies::now(), &body);
    assert_eq!(
        http.post(&url, &[("coinflow-signature", &good_sig)], body.clone())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        http.post(&url, &[("authorization", KEY)], body.clone())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        http.post(
            &url,
            &[("authorization", "wrong-authorization-value")],
            body.clone()
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        http.post(&url, &[("coinflow-signature", &forged_sig)], body)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert!(edge.terminate().await.success());
    assert!(fulfillment.terminate().await.success());

    let logs = format!("{}\n{}", edge.log_text(), fulfillment.log_text());
    assert!(logs.contains("webhook acked"), "the logs were captured");
    let good_mac = good_sig.split("v1=").nth(1).unwrap();
    let forged_mac = forged_sig.split("v1=").nth(1).unwrap();
    for secret in [
        KEY,
        coinflow_tests::API_TOKEN,
        coinflow_tests::INGEST_TOKEN,
        "second-secret-key",
        "wrong-authorization-value",
        good_mac,
        forged_mac,
    ] {
        assert!(
            !logs.contains(secret),
            "a secret leaked into the logs: {secret}"
        );
    }
}
