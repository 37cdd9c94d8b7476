//! An `Ingest` server to put behind the edge when a test must see or shape what ingest
//! gets and answers: it records every `DeliverBatch` call (its `authorization`, its
//! events' keys, its encoded size) and answers as told, optionally holding the first calls
//! so that what arrives meanwhile queues at the edge.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coinflow_shared::limits::MAX_GRPC_MESSAGE_BYTES;
use coinflow_shared::proto::v1::deliver_result::Result as BatchResult;
use coinflow_shared::proto::v1::ingest_server::{Ingest, IngestServer};
use coinflow_shared::proto::v1::{
    DeliverBatchRequest, DeliverBatchResponse, DeliverFailure, DeliverRequest, DeliverResponse,
    DeliverResult, Outcome,
};
use coinflow_tests::IngestClient;
use prost::Message as _;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

/// How the stub answers a `DeliverBatch` call.
#[derive(Clone)]
pub(crate) enum Answer {
    /// Ack every event as recorded.
    Ack,
    /// Fail every event, each with its own result, with this code.
    FailEach(Code),
    /// Hand the call to a real ingest, except that a call of more than one event is
    /// refused as a whole with `refuse_shared` when set.
    Forward {
        upstream: IngestClient,
        refuse_shared: Option<Code>,
    },
}

/// One `DeliverBatch` call as the stub received it.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    /// The `authorization` metadata, if any.
    pub authorization: Option<String>,
    /// Its events' keys, in order.
    pub event_keys: Vec<String>,
    /// The request's encoded size.
    pub bytes: usize,
}

/// Which first calls the stub holds: until `calls` of them are in flight or they carry
/// `events` events, and a moment more (for what arrives meanwhile to queue at the edge).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hold {
    pub calls: usize,
    pub events: usize,
}

struct Gate {
    hold: Hold,
    calls: AtomicUsize,
    events: AtomicUsize,
    open: Arc<watch::Sender<bool>>,
}

impl Gate {
    async fn pass(&self, events: usize) {
        let calls = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let events = self.events.fetch_add(events, Ordering::SeqCst) + events;
        if (calls >= self.hold.calls || events >= self.hold.events) && !*self.open.borrow() {
            let open = Arc::clone(&self.open);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                open.send_replace(true);
            });
        }
        let _ = self.open.subscribe().wait_for(|open| *open).await;
    }
}

struct Service {
    answer: Answer,
    calls: Arc<Mutex<Vec<Call>>>,
    gate: Option<Gate>,
}

#[tonic::async_trait]
impl Ingest for Service {
    async fn deliver(
        &self,
        _request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        Err(Status::unimplemented("the stub takes DeliverBatch only"))
    }

    async fn deliver_batch(
        &self,
        request: Request<DeliverBatchRequest>,
    ) -> Result<Response<DeliverBatchResponse>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let batch = request.into_inner();
        self.calls.lock().unwrap().push(Call {
            authorization,
            event_keys: batch
                .events
                .iter()
                .map(|b| b.event.as_ref().unwrap().event_key.clone())
                .collect(),
            bytes: batch.encoded_len(),
        });
        if let Some(gate) = &self.gate {
            gate.pass(batch.events.len()).await;
        }
        let each = |result: BatchResult| {
            let results = batch
                .events
                .iter()
                .map(|_| DeliverResult {
                    result: Some(result.clone()),
                })
                .collect();
            Ok(Response::new(DeliverBatchResponse { results }))
        };
        match &self.answer {
            Answer::Ack => each(BatchResult::Ack(DeliverResponse {
                outcome: Outcome::Recorded.into(),
                duplicate: false,
                held_reason: None,
            })),
            Answer::FailEach(code) => each(BatchResult::Failure(DeliverFailure {
                code: *code as i32,
                message: "refused by the stub".into(),
            })),
            Answer::Forward { refuse_shared, .. }
                if batch.events.len() > 1 && refuse_shared.is_some() =>
            {
                Err(Status::new(
                    refuse_shared.unwrap(),
                    "the stub refuses calls of several events",
                ))
            }
            Answer::Forward { upstream, .. } => upstream.clone().deliver_batch(batch).await,
        }
    }
}

/// A running stub.
pub(crate) struct Stub {
    /// Where it listens.
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Stub {
    /// Starts a stub answering as `answer`, holding the first calls as `hold` says.
    pub(crate) async fn start(answer: Answer, hold: Option<Hold>) -> Self {
        let calls = Arc::default();
        let service = Service {
            answer,
            calls: Arc::clone(&calls),
            gate: hold.map(|hold| Gate {
                hold,
                calls: AtomicUsize::new(0),
                events: AtomicUsize::new(0),
                open: Arc::new(watch::channel(false).0),
            }),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    IngestServer::new(service)
                        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES),
                )
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Self { addr, calls }
    }

    /// Every call so far.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}
