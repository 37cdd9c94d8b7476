//! Events share ingest calls under load (`Ingest.DeliverBatch`) and each keeps its own
//! result: a batch is never all-or-nothing, and an ingest endpoint without `DeliverBatch`
//! still gets every event, through `Deliver`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coinflow_shared::convert::to_proto;
use coinflow_shared::envelope::Envelope;
use coinflow_shared::proto::v1::deliver_result::Result as BatchResult;
use coinflow_shared::proto::v1::ingest_server::{Ingest, IngestServer};
use coinflow_shared::proto::v1::{
    BatchedEvent, DeliverBatchRequest, DeliverBatchResponse, DeliverRequest, DeliverResponse,
    Outcome, WebhookEvent,
};
use coinflow_tests::bodies::settled;
use coinflow_tests::http::Http;
use coinflow_tests::process::Proc;
use coinflow_tests::{
    EdgeHandle, FulfillmentHandle, IngestClient, KEY, Query, TestDb, edge_config, ingest_client,
};
use http::StatusCode;
use tonic::{Code, Request, Response, Status};

use crate::faults::Stall;
use crate::observability::{sample, scrape};

fn event(body: &[u8]) -> WebhookEvent {
    to_proto(
        Envelope::parse(body).unwrap(),
        Bytes::copy_from_slice(body),
        SystemTime::now(),
    )
}

fn batch(events: Vec<Option<WebhookEvent>>) -> DeliverBatchRequest {
    DeliverBatchRequest {
        events: events
            .into_iter()
            .map(|event| BatchedEvent {
                event,
                trace_context: Default::default(),
            })
            .collect(),
    }
}

fn grants(payment: &coinflow_shared::proto::v1::Payment) -> usize {
    payment.ledger.iter().filter(|e| e.kind == "grant").count()
}

#[tokio::test]
async fn concurrent_deliveries_share_ingest_calls_and_each_is_granted_once() {
    let db = TestDb::new().await;
    let fulfillment = Proc::fulfillment(&db).await;
    let edge = Proc::edge(fulfillment.addr, KEY, &[]).await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let http = Http::default();

    // While storage is stalled the first calls wait; every delivery that arrives meanwhile
    // waits at the edge and leaves with the others once a call returns.
    let stall = Stall::begin(&db).await;
    let deliveries = futures::future::join_all(
        (0..20).map(|i| http.deliver(&url, settled(&format!("shared-{i}"), "sword", 500))),
    );
    let release = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stall.release().await;
    };
    let (answers, ()) = tokio::join!(deliveries, release);
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    }

    let metrics = scrape(edge.admin).await;
    let calls = sample(
        &metrics,
        "rpc_client_duration_seconds_count",
        &[("rpc_method", "DeliverBatch")],
    );
    assert!(
        (1.0..=8.0).contains(&calls),
        "20 concurrent deliveries took {calls} ingest calls"
    );
    assert_eq!(
        sample(
            &metrics,
            "rpc_client_duration_seconds_count",
            &[("rpc_method", "Deliver")]
        ),
        0.0
    );
    let mut query = Query::connect(fulfillment.addr).await;
    for i in 0..20 {
        let payment = query.payment(&format!("shared-{i}")).await.unwrap();
        assert_eq!(grants(&payment), 1, "shared-{i}");
    }
}

#[tokio::test]
async fn each_event_of_a_batch_is_recorded_or_refused_on_its_own() {
    let db = TestDb::new().await;
    let fulfillment = FulfillmentHandle::start(&db).await;
    let mut client = ingest_client(fulfillment.addr).await;
    let paid = event(&settled("own-paid", "sword", 500));
    let mut untyped = event(&settled("own-untyped", "sword", 500));
    untyped.event_type.clear();
    let underpaid = event(&settled("own-underpaid", "sword", 100));

    let results = client
        .deliver_batch(batch(vec![
            Some(paid.clone()),
            None,
            Some(paid),
            Some(untyped),
            Some(underpaid),
        ]))
        .await
        .unwrap()
        .into_inner()
        .results;
    let results: Vec<BatchResult> = results.into_iter().map(|r| r.result.unwrap()).collect();
    assert_eq!(results.len(), 5);
    let ack = |r: &BatchResult| match r {
        BatchResult::Ack(ack) => ack.clone(),
        BatchResult::Failure(f) => panic!("expected an ack, got {f:?}"),
    };
    let failure = |r: &BatchResult| match r {
        BatchResult::Failure(f) => (Code::from(f.code), f.message.clone()),
        BatchResult::Ack(a) => panic!("expected a failure, got {a:?}"),
    };
    // The same event twice in one batch: one of the two records it and the other is its
    // duplicate. Which one is not defined: on PostgreSQL the two may land in different
    // workers' transactions, and the payment's lock decides.
    let (first, again) = (ack(&results[0]), ack(&results[2]));
    assert_eq!(first.outcome(), Outcome::Granted);
    assert_eq!(again.outcome(), Outcome::Granted);
    assert!(
        first.duplicate != again.duplicate,
        "exactly one of the two is a duplicate: {first:?}, {again:?}"
    );
    let (code, message) = failure(&results[1]);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("event"), "{message}");
    let (code, message) = failure(&results[3]);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("event_type"), "{message}");
    let held = ack(&results[4]);
    assert_eq!(held.outcome(), Outcome::Held);
    assert_eq!(held.held_reason.as_deref(), Some("underpaid"));

    let mut query = Query::connect(fulfillment.addr).await;
    assert_eq!(grants(&query.payment("own-paid").await.unwrap()), 1);
    assert_eq!(grants(&query.payment("own-underpaid").await.unwrap()), 0);
    assert_eq!(
        query.payment("own-untyped").await.unwrap_err().code(),
        Code::NotFound
    );

    // A call over the size limit is refused whole, and records nothing.
    let many = event(&settled("own-many", "sword", 500));
    let status = client
        .deliver_batch(batch(vec![Some(many); 257]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        query.payment("own-many").await.unwrap_err().code(),
        Code::NotFound
    );
}

/// An ingest implementation from before `DeliverBatch`: it forwards `Deliver` to the real
/// fulfillment and has no batch method.
struct DeliverOnly {
    upstream: IngestClient,
    deliver_calls: Arc<AtomicUsize>,
    batch_calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Ingest for DeliverOnly {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        self.deliver_calls.fetch_add(1, Ordering::SeqCst);
        self.upstream.clone().deliver(request.into_inner()).await
    }

    async fn deliver_batch(
        &self,
        _request: Request<DeliverBatchRequest>,
    ) -> Result<Response<DeliverBatchResponse>, Status> {
        self.batch_calls.fetch_add(1, Ordering::SeqCst);
        Err(Status::unimplemented("DeliverBatch"))
    }
}

#[tokio::test]
async fn an_endpoint_without_deliver_batch_gets_every_event_through_deliver() {
    let db = TestDb::new().await;
    let fulfillment = FulfillmentHandle::start(&db).await;
    let (deliver_calls, batch_calls) = (Arc::default(), Arc::default());
    let legacy = DeliverOnly {
        upstream: ingest_client(fulfillment.addr).await,
        deliver_calls: Arc::clone(&deliver_calls),
        batch_calls: Arc::clone(&batch_calls),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let legacy_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IngestServer::new(legacy))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let edge = EdgeHandle::start(edge_config(legacy_addr)).await;
    let http = Http::default();
    for i in 0..3 {
        let answer = http
            .deliver(&edge.url(), settled(&format!("legacy-{i}"), "sword", 500))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    }
    assert_eq!(batch_calls.load(Ordering::SeqCst), 1, "asked once");
    assert_eq!(deliver_calls.load(Ordering::SeqCst), 3);
    let mut query = Query::connect(fulfillment.addr).await;
    for i in 0..3 {
        let payment = query.payment(&format!("legacy-{i}")).await.unwrap();
        assert_eq!(grants(&payment), 1);
    }
}
