//! The merchant API client (`fulfillment_svc::coinflow_api`) against the in-process
//! Coinflow stand-in (`coinflow_sender::standin`) over real sockets: a delivery log longer
//! than three pages, an API that fails part of the time, a wrong key, resend through the
//! real edge and fulfillment, and a payment whose `Settled` was never subscribed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coinflow_sender::standin::model::millis;
use coinflow_sender::standin::{Coinflow, NO_ANSWER, StandinConfig};
use coinflow_shared::envelope::Envelope;
use coinflow_tests::http::Http;
use coinflow_tests::{KEY, Stack};
use fulfillment_svc::coinflow_api::{
    API_KEY_ENV, ApiConfig, ApiError, CoinflowApi, Delivery, DeliveryFilter, RetryPolicy, Window,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

const API_KEY: &str = "cf_merchant_api_key_test_7788";

/// A webhook receiver: answers 503 while `failing` or when `refuse` says so, otherwise
/// forwards to `upstream` (with the signature) and answers what it answered, or 200 when
/// there is no upstream. Keeps every body it received.
struct Gate {
    url: String,
    failing: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<Bytes>>>,
}

impl Gate {
    async fn start(upstream: Option<String>, refuse: fn(&str) -> bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/webhooks/coinflow",
            listener.local_addr().unwrap()
        );
        let failing = Arc::new(AtomicBool::new(false));
        let received: Arc<Mutex<Vec<Bytes>>> = Arc::default();
        let (fail, keep) = (failing.clone(), received.clone());
        tokio::spawn(async move {
            let http = Http::default();
            while let Ok((stream, _)) = listener.accept().await {
                let (fail, keep, upstream, http) =
                    (fail.clone(), keep.clone(), upstream.clone(), http.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (fail, keep, upstream, http) =
                            (fail.clone(), keep.clone(), upstream.clone(), http.clone());
                        async move {
                            let signature = req
                                .headers()
                                .get("coinflow-signature")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            keep.lock().unwrap().push(body.clone());
                            let event_type = Envelope::parse(&body)
                                .map(|e| e.event_type)
                                .unwrap_or_default();
                            let status = if fail.load(Ordering::SeqCst) || refuse(&event_type) {
                                StatusCode::SERVICE_UNAVAILABLE
                            } else if let Some(up) = upstream {
                                let sig = signature.unwrap_or_default();
                                http.post(&up, &[("coinflow-signature", &sig)], body.to_vec())
                                    .await
                                    .status
                            } else {
                                StatusCode::OK
                            };
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            url,
            failing,
            received,
        }
    }
}

fn never(_: &str) -> bool {
    false
}

fn authorized_refused(event_type: &str) -> bool {
    event_type == "Card Payment Authorized"
}

/// A stand-in delivering `payments` to `url` with 2 attempts, compressed.
fn standin(url: &str, payments: usize) -> StandinConfig {
    let mut config = StandinConfig::local(url, KEY.into(), API_KEY.into(), payments);
    config.target.attempts = 2;
    config.target.compress = 10_000.0;
    config
}

/// A client of `standin` with pages of `limit` and quick retries.
fn client(standin: &Coinflow, key: &str, limit: u32) -> CoinflowApi {
    let mut config = ApiConfig::new(standin.api_url(), key.into());
    config.page_limit = limit;
    config.retry = RetryPolicy {
        max_attempts: 12,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(10),
        max_total: Duration::from_secs(120),
    };
    CoinflowApi::new(config).unwrap()
}

fn around(start: SystemTime) -> Window {
    Window {
        start: start - Duration::from_secs(1),
        end: SystemTime::now() + Duration::from_secs(1),
    }
}

/// (id, eventType, responseCode, packet as JSON) of each listed delivery, by id.
fn by_id(listed: &[Delivery]) -> BTreeMap<String, (String, Option<i64>, serde_json::Value)> {
    listed
        .iter()
        .map(|d| {
            let packet: serde_json::Value = serde_json::from_str(d.data.get()).unwrap();
            (
                d.id.clone(),
                (d.event_type.clone(), d.response_code, packet),
            )
        })
        .collect()
}

/// The same, from the stand-in's own log.
fn log_by_id(standin: &Coinflow) -> BTreeMap<String, (String, Option<i64>, serde_json::Value)> {
    standin
        .log()
        .iter()
        .map(|e| {
            (
                e.id.clone(),
                (
                    e.event_type.clone(),
                    Some(i64::from(e.response_code)),
                    serde_json::from_slice(&e.packet).unwrap(),
                ),
            )
        })
        .collect()
}

/// Payment ids of the generated bodies that have an event of `event_type`.
fn payments_with(bodies: &[Bytes], event_type: &str) -> BTreeSet<String> {
    bodies
        .iter()
        .map(|b| Envelope::parse(b).unwrap())
        .filter(|e| e.event_type == event_type)
        .map(|e| e.payment_id().unwrap())
        .collect()
}

#[tokio::test]
async fn a_window_of_more_than_three_pages_is_listed_whole() {
    let gate = Gate::start(None, authorized_refused).await;
    let started = SystemTime::now();
    let cf = Coinflow::start(standin(&gate.url, 30)).await.unwrap();
    cf.deliver().await;
    let api = client(&cf, API_KEY, 10);
    let listed = api
        .deliveries(around(started), &DeliveryFilter::default())
        .await
        .unwrap();
    let log = log_by_id(&cf);
    assert!(log.len() > 30, "more than three pages: {}", log.len());
    assert_eq!(listed.len(), log.len(), "every attempt listed once");
    assert_eq!(
        by_id(&listed),
        log,
        "ids, types, codes and packets as logged"
    );
    let codes: BTreeSet<Option<i64>> = listed.iter().map(|d| d.response_code).collect();
    assert_eq!(codes, BTreeSet::from([Some(200), Some(503)]));
    for d in &listed {
        assert_eq!(d.url.as_deref(), Some(gate.url.as_str()));
        assert_eq!(d.version.as_deref(), Some("Version 2"));
        assert_eq!(d.category.as_deref(), Some("Purchase"));
        assert!(d.sent_at().unwrap() >= started);
        let sent = cf.log().into_iter().find(|e| e.id == d.id).unwrap();
        assert_eq!(d.payment_id(), sent.payment_id);
    }
    // Each refused Authorized was tried twice: both attempts are in the log.
    let unacked = api.unacked_deliveries(around(started), None).await.unwrap();
    let refused = cf
        .subscribed_bodies()
        .iter()
        .filter(|b| Envelope::parse(b).unwrap().event_type == "Card Payment Authorized")
        .count();
    assert!(refused > 0);
    assert_eq!(unacked.len(), 2 * refused);
    assert!(
        unacked
            .iter()
            .all(|d| d.event_type == "Card Payment Authorized")
    );
    // Server-side filters.
    let only_503 = api
        .deliveries(
            around(started),
            &DeliveryFilter {
                response_code: Some(503),
                event_type: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(only_503.len(), unacked.len());
    let settled = api
        .deliveries(
            around(started),
            &DeliveryFilter {
                response_code: None,
                event_type: Some("Settled".into()),
            },
        )
        .await
        .unwrap();
    assert!(!settled.is_empty());
    assert!(
        settled
            .iter()
            .all(|d| d.event_type == "Settled" && d.acked())
    );
    // A window that ends before the first attempt lists nothing.
    let before = Window {
        start: started - Duration::from_secs(3600),
        end: started - Duration::from_secs(1800),
    };
    let none = api
        .deliveries(before, &DeliveryFilter::default())
        .await
        .unwrap();
    assert!(none.is_empty());
    cf.stop().await;
}

#[tokio::test]
async fn an_api_failing_part_of_the_time_still_answers_in_full() {
    let gate = Gate::start(None, never).await;
    let started = SystemTime::now();
    let mut config = standin(&gate.url, 60);
    config.api_error_rate = 0.3;
    config.api_error_seed = 7;
    let cf = Coinflow::start(config).await.unwrap();
    cf.deliver().await;
    let api = client(&cf, API_KEY, 10);
    let listed = api
        .deliveries(around(started), &DeliveryFilter::default())
        .await
        .unwrap();
    assert_eq!(by_id(&listed), log_by_id(&cf));
    let (since, until) = (millis(started) - 60_000, millis(SystemTime::now()) + 60_000);
    let payments = api.payments(since, until).await.unwrap();
    let ids: BTreeSet<String> = payments.iter().map(|p| p.payment_id.clone()).collect();
    let generated: BTreeSet<String> = cf
        .bodies()
        .iter()
        .map(|b| Envelope::parse(b).unwrap().payment_id().unwrap())
        .collect();
    assert_eq!(ids, generated);
    assert_eq!(payments.len(), 60);
    let settled: BTreeSet<String> = payments
        .iter()
        .filter(|p| p.status.as_deref() == Some("Settled"))
        .map(|p| p.payment_id.clone())
        .collect();
    assert_eq!(settled, payments_with(cf.bodies(), "Settled"));
    for p in &payments {
        let body = cf
            .bodies()
            .iter()
            .map(|b| Envelope::parse(b).unwrap())
            .find(|e| e.payment_id().as_deref() == Some(p.payment_id.as_str()))
            .unwrap();
        assert_eq!(p.wallet.as_deref(), body.data.str("wallet"));
        let item = body.data.object("webhookInfo").unwrap()["item"].clone();
        assert_eq!(p.webhook_info.as_ref().unwrap()["item"], item);
        let created = p.created_at.as_ref().unwrap().millis().unwrap();
        assert!((since..=until).contains(&created));
        if p.status.as_deref() == Some("Settled") {
            let subtotal = p.totals.as_ref().unwrap().subtotal.as_ref().unwrap();
            assert_eq!(
                Some(subtotal.cents),
                body.data.money("subtotal").map(|m| m.cents)
            );
        }
    }
    let chargebacks = api.chargebacks(since, until).await.unwrap();
    let disputed: BTreeSet<String> = chargebacks.iter().map(|c| c.payment_id.clone()).collect();
    assert_eq!(
        disputed,
        payments_with(cf.bodies(), "Card Payment Chargeback Opened")
    );
    for c in &chargebacks {
        let lost = payments_with(cf.bodies(), "Card Payment Chargeback Lost");
        let won = payments_with(cf.bodies(), "Card Payment Chargeback Won");
        let want = if lost.contains(&c.payment_id) {
            "Lost"
        } else if won.contains(&c.payment_id) {
            "Won"
        } else {
            "Opened"
        };
        assert_eq!(c.status.as_deref(), Some(want));
    }
    let refunded = payments_with(cf.bodies(), "Refund");
    assert!(!refunded.is_empty());
    for id in &ids {
        let refunds = api.refunds(id).await.unwrap();
        assert_eq!(refunds.len(), usize::from(refunded.contains(id)), "{id}");
        assert!(refunds.iter().all(|r| &r.payment_id == id));
    }
    let one = api.payment(ids.first().unwrap()).await.unwrap().unwrap();
    assert_eq!(&one.payment_id, ids.first().unwrap());
    assert!(api.payment("no-such-payment").await.unwrap().is_none());
    let seen = cf.seen();
    assert!(seen.injected > 10, "errors were injected: {seen:?}");
    assert_eq!(seen.refused, 0);
    cf.stop().await;
}

#[tokio::test]
async fn a_wrong_api_key_fails_fast_naming_the_variable_not_the_key() {
    let wrong = "cf_wrong_key_for_the_merchant_api_0000";
    let gate = Gate::start(None, never).await;
    let cf = Coinflow::start(standin(&gate.url, 3)).await.unwrap();
    let api = client(&cf, wrong, 10);
    let err = api
        .deliveries(
            Window::last(Duration::from_secs(3600)),
            &DeliveryFilter::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    let (text, debug) = (err.to_string(), format!("{err:?}"));
    assert!(text.contains(API_KEY_ENV), "{text}");
    for secret in [wrong, API_KEY] {
        assert!(
            !text.contains(secret) && !debug.contains(secret),
            "{text} / {debug}"
        );
    }
    assert!(!format!("{api:?}").contains(wrong));
    let err = api.resend("wl-1").await.unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized { .. }), "{err}");
    let seen = cf.seen();
    assert_eq!(
        (seen.requests, seen.refused),
        (2, 2),
        "one request each, no retry"
    );
    assert_eq!(seen.jobs, 0);
    cf.stop().await;
}

#[tokio::test]
async fn resend_reposts_the_packet_through_the_edge_and_logs_the_attempt() {
    let stack = Stack::start().await;
    let gate = Gate::start(Some(stack.edge.url()), never).await;
    gate.failing.store(true, Ordering::SeqCst);
    let started = SystemTime::now();
    let cf = Coinflow::start(standin(&gate.url, 8)).await.unwrap();
    let delivered = cf.deliver().await;
    assert!(delivered.iter().all(|d| d.result == "gave_up"));
    let api = client(&cf, API_KEY, 100);
    let failed = api
        .unacked_deliveries(around(started), Some("Settled"))
        .await
        .unwrap();
    let mut query = stack.query().await;
    let settled = payments_with(cf.bodies(), "Settled");
    assert!(!settled.is_empty());
    for id in &settled {
        let status = query.payment(id).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::NotFound,
            "nothing reached fulfillment"
        );
    }
    // One delivery per Settled payment to resend (each was tried twice).
    let mut to_resend: BTreeMap<String, Delivery> = BTreeMap::new();
    for d in failed {
        assert_eq!(d.response_code, Some(503));
        to_resend.entry(d.payment_id().unwrap()).or_insert(d);
    }
    assert_eq!(to_resend.keys().cloned().collect::<BTreeSet<_>>(), settled);
    let logged_before = cf.log().len();
    let received_before = gate.received.lock().unwrap().len();
    gate.failing.store(false, Ordering::SeqCst);
    let mut jobs = BTreeSet::new();
    for d in to_resend.values() {
        jobs.insert(api.resend(&d.id).await.unwrap());
    }
    assert_eq!(jobs.len(), to_resend.len(), "a job id each");
    cf.settle().await;
    let log = cf.log();
    assert_eq!(log.len(), logged_before + to_resend.len());
    let original: BTreeMap<String, Bytes> = cf
        .log()
        .iter()
        .map(|e| (e.id.clone(), e.packet.clone()))
        .collect();
    let new: Vec<_> = log[logged_before..].to_vec();
    let resent: BTreeSet<Bytes> = to_resend
        .values()
        .map(|d| original[&d.id].clone())
        .collect();
    assert_eq!(
        new.iter()
            .map(|e| e.packet.clone())
            .collect::<BTreeSet<_>>(),
        resent,
        "the logged packets, byte for byte"
    );
    assert!(new.iter().all(|e| e.response_code == 200), "{new:?}");
    let received: Vec<Bytes> = gate.received.lock().unwrap()[received_before..].to_vec();
    assert_eq!(received.len(), to_resend.len());
    assert_eq!(received.into_iter().collect::<BTreeSet<_>>(), resent);
    // The API shows the new attempts, acked, alongside the failed ones.
    let listed = api
        .deliveries(around(started), &DeliveryFilter::default())
        .await
        .unwrap();
    assert_eq!(by_id(&listed), log_by_id(&cf));
    let acked: BTreeSet<String> = listed
        .iter()
        .filter(|d| d.acked())
        .map(|d| d.payment_id().unwrap())
        .collect();
    assert_eq!(acked, settled);
    for id in &settled {
        let payment = query.payment(id).await.unwrap();
        assert_eq!(payment.state, "settled", "{id}");
        assert_eq!(payment.events.len(), 1);
    }
    let err = api.resend("wl-does-not-exist").await.unwrap_err();
    assert!(
        matches!(&err, ApiError::DeliveryNotFound { id } if id == "wl-does-not-exist"),
        "{err}"
    );
    cf.stop().await;
}

#[tokio::test]
async fn a_payment_whose_settled_was_not_subscribed_is_listed_but_never_delivered() {
    let gate = Gate::start(None, never).await;
    let started = SystemTime::now();
    let mut config = standin(&gate.url, 20);
    config.unsubscribed = vec!["Settled".into()];
    let cf = Coinflow::start(config).await.unwrap();
    cf.deliver().await;
    let api = client(&cf, API_KEY, 10);
    let listed = api
        .deliveries(around(started), &DeliveryFilter::default())
        .await
        .unwrap();
    assert!(!listed.is_empty());
    assert!(listed.iter().all(|d| d.event_type != "Settled"));
    assert_eq!(by_id(&listed), log_by_id(&cf));
    let received = gate.received.lock().unwrap().clone();
    assert!(
        received
            .iter()
            .all(|b| Envelope::parse(b).unwrap().event_type != "Settled"),
        "nothing Settled was posted"
    );
    let settled = payments_with(cf.bodies(), "Settled");
    assert!(!settled.is_empty());
    let payments = api
        .payments(millis(started) - 60_000, millis(SystemTime::now()) + 60_000)
        .await
        .unwrap();
    let listed_settled: BTreeSet<String> = payments
        .iter()
        .filter(|p| p.status.as_deref() == Some("Settled"))
        .map(|p| p.payment_id.clone())
        .collect();
    assert_eq!(listed_settled, settled, "settled in payments");
    let delivered_payments: BTreeSet<String> =
        listed.iter().filter_map(Delivery::payment_id).collect();
    for id in &settled {
        // Its other events (Authorized, Refund, chargebacks) were delivered.
        let others = payments_with(cf.subscribed_bodies().as_slice(), "Card Payment Authorized");
        if others.contains(id) {
            assert!(delivered_payments.contains(id), "{id}");
        }
        let settled_deliveries: Vec<&Delivery> = listed
            .iter()
            .filter(|d| d.payment_id().as_deref() == Some(id) && d.event_type == "Settled")
            .collect();
        assert!(settled_deliveries.is_empty(), "{id}");
    }
    assert!(
        cf.log()
            .iter()
            .all(|e| e.response_code != NO_ANSWER && e.event_type != "Settled")
    );
    cf.stop().await;
}

#[tokio::test]
async fn the_cli_stand_in_prints_its_address_and_serves_what_it_delivered() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let gate = Gate::start(None, authorized_refused).await;
    let started = SystemTime::now();
    let sender = coinflow_tests::process::bin("coinflow-sender");
    let mut child = tokio::process::Command::new(&sender)
        .args([
            "coinflow",
            "--payments",
            "6",
            "--attempts",
            "1",
            "--api-key-env",
            "STANDIN_TEST_API_KEY",
            "--unsubscribed",
            "Refund,Card Payment Chargeback Opened",
            "--url",
            &gate.url,
        ])
        .env("STANDIN_TEST_API_KEY", API_KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    let api_url = first["coinflow_api"].as_str().unwrap().to_owned();
    assert_eq!(first["payments"], 6);
    let second: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    let delivered = &second["delivered"];
    let events = first["events"].as_u64().unwrap();
    assert_eq!(
        delivered["acked"].as_u64().unwrap() + delivered["gave_up"].as_u64().unwrap(),
        events
    );
    let mut config = ApiConfig::new(format!("{api_url}/api"), API_KEY.into());
    config.page_limit = 4;
    let api = CoinflowApi::new(config).unwrap();
    let listed = api
        .deliveries(around(started), &DeliveryFilter::default())
        .await
        .unwrap();
    assert_eq!(listed.len() as u64, events, "one attempt each");
    assert_eq!(gate.received.lock().unwrap().len() as u64, events);
    assert!(
        listed.iter().all(|d| {
            d.event_type != "Refund" && d.event_type != "Card Payment Chargeback Opened"
        })
    );
    let refused = listed.iter().filter(|d| !d.acked()).count() as u64;
    assert_eq!(refused, delivered["gave_up"].as_u64().unwrap());
    let payments = api.payments(0, i64::MAX).await.unwrap();
    assert_eq!(payments.len(), 6);
    child.kill().await.unwrap();

    let out = tokio::process::Command::new(&sender)
        .args([
            "coinflow",
            "--payments",
            "1",
            "--api-key-env",
            "STANDIN_UNSET_KEY",
        ])
        .env_remove("STANDIN_UNSET_KEY")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("STANDIN_UNSET_KEY"), "{stderr}");
}
