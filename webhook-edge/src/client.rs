//! The gRPC client to one ingest target: a pool of endpoints (a static list, or a DNS
//! name re-resolved periodically, e.g. a Kubernetes headless Service), balanced round
//! robin. An endpoint that fails at the transport level is set aside for a while and the
//! delivery moves on to the next one. Each delivery has one deadline, well inside
//! Coinflow's 5 s, and every retry stays inside it; that is safe because ingest is
//! idempotent.
//!
//! Events go to an endpoint in `DeliverBatch` calls: each endpoint has a few calls in
//! flight at most, and the events that arrive meanwhile leave together in the next one.
//! One quiet delivery is a call of its own, with no wait; under load one call carries many,
//! which is what makes the per-call cost of gRPC (framing, syscalls, task hand-offs) small
//! per event (see BENCHMARKS.md). Each event keeps its own deadline, result and trace. An
//! endpoint that answers `DeliverBatch` with UNIMPLEMENTED gets `Deliver` per event.
//!
//! A call is capped by bytes as well as events ([`MAX_BATCH_BYTES`]; a larger event goes
//! alone), and a call of several events that fails as a whole with a code that is not
//! retried is split: each of its events is tried again in a call of its own, so one event
//! never fails its neighbours.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use coinflow_shared::limits::{MAX_BATCH_BYTES, MAX_GRPC_MESSAGE_BYTES};
use coinflow_shared::proto::v1::deliver_result::Result as BatchResult;
use coinflow_shared::proto::v1::ingest_client::IngestClient;
use coinflow_shared::proto::v1::{
    BatchedEvent, DeliverBatchRequest, DeliverRequest, DeliverResponse, DeliverResult, WebhookEvent,
};
use opentelemetry::KeyValue;
use prost::Message as _;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::{Instant, sleep, timeout_at};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;
use tracing::field::Empty;

use crate::observe::Metrics;

/// How long a failed endpoint is skipped.
const COOLDOWN: Duration = Duration::from_secs(2);
/// The most events one `DeliverBatch` call carries.
const MAX_BATCH: usize = 64;
/// What one `DeliverBatch` call carries at most.
const CALL_LIMITS: CallLimits = CallLimits {
    events: MAX_BATCH,
    bytes: MAX_BATCH_BYTES,
};
/// `DeliverBatch` calls one endpoint has in flight at once.
const IN_FLIGHT_CALLS: usize = 4;
/// Events that may wait for a call to one endpoint.
const QUEUED: usize = 1024;
/// Why an event is handed back when its endpoint turned out to lack `DeliverBatch`.
const RETRY_UNARY: &str = "the endpoint has no DeliverBatch; retrying with Deliver";
/// Why an event is handed back when the call it shared failed as a whole.
const RETRY_ALONE: &str = "the shared call failed as a whole; retrying in a call of its own";

/// Why a delivery was not acked.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// No ack before the deadline.
    #[error("no ack within {0:?}")]
    Deadline(Duration),
    /// Ingest refused or failed; the status says why.
    #[error("ingest answered {}: {}", .0.code(), .0.message())]
    Status(Status),
    /// The endpoint list is invalid.
    #[error("invalid ingest endpoints {0:?}: {1}")]
    BadEndpoints(String, String),
    /// The ingest token is not a valid header value.
    #[error("the ingest token must be printable ASCII")]
    BadToken,
    /// No endpoint is known yet (DNS returned nothing).
    #[error("no ingest endpoint resolved")]
    NoEndpoint,
}

impl DeliverError {
    /// Whether a later delivery may succeed with nothing fixed: no ack in time, no
    /// endpoint, or a code that is retried. Anything else is a bug or a misconfiguration.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Deadline(_) | Self::NoEndpoint => true,
            Self::Status(status) => {
                retryable(status.code()) || status.code() == Code::DeadlineExceeded
            }
            Self::BadEndpoints(..) | Self::BadToken => false,
        }
    }
}

/// Where a target's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    /// Fixed `http://host:port` URLs.
    Static(Vec<String>),
    /// `host:port`, re-resolved periodically; every address is an endpoint.
    Dns(String),
}

impl Endpoints {
    /// Parses `dns://host:port` or a comma-separated list of `http(s)://` URLs.
    pub fn parse(spec: &str) -> Result<Self, DeliverError> {
        let bad = |why: &str| DeliverError::BadEndpoints(spec.to_owned(), why.to_owned());
        if let Some(name) = spec.trim().strip_prefix("dns://") {
            return match name.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Self::Dns(name.to_owned()))
                }
                _ => Err(bad("expected dns://host:port")),
            };
        }
        let urls: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err(bad("no endpoint"));
        }
        for url in &urls {
            Endpoint::from_shared(url.clone()).map_err(|e| bad(&e.to_string()))?;
        }
        Ok(Self::Static(urls))
    }
}

/// One event waiting for its `DeliverBatch` call.
struct Pending {
    batched: BatchedEvent,
    /// `batched`'s encoded size.
    size: usize,
    deadline: Instant,
    reply: oneshot::Sender<Result<DeliverResponse, Status>>,
}

/// What one call may carry.
#[derive(Debug, Clone, Copy)]
struct CallLimits {
    events: usize,
    bytes: usize,
}

/// Fills `call` with `first`, then with what `more` yields while `call` stays within
/// `limits` (the `size` of its items summed). `first` goes however large it is; the first
/// item that does not fit is handed back, to open the next call.
fn fill<T>(
    call: &mut Vec<T>,
    first: T,
    limits: CallLimits,
    size: impl Fn(&T) -> usize,
    mut more: impl FnMut() -> Option<T>,
) -> Option<T> {
    let mut bytes = size(&first);
    call.push(first);
    while call.len() < limits.events {
        let next = more()?;
        bytes = bytes.saturating_add(size(&next));
        if bytes > limits.bytes {
            return Some(next);
        }
        call.push(next);
    }
    None
}

/// What every call to one endpoint needs.
#[derive(Clone)]
struct Caller {
    client: IngestClient<Channel>,
    bearer: Option<MetadataValue<Ascii>>,
    metrics: Arc<Metrics>,
    route: Arc<str>,
    /// Set once the endpoint answered `DeliverBatch` with UNIMPLEMENTED.
    unary: Arc<AtomicBool>,
    /// The endpoint's `DeliverBatch` calls in flight, at most [`IN_FLIGHT_CALLS`].
    slots: Arc<Semaphore>,
}

impl Caller {
    fn request<T>(&self, message: T, deadline: Instant) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        request
    }

    /// Runs `call` until `deadline` and records it in `rpc.client.duration`.
    async fn call<T>(
        &self,
        method: &'static str,
        deadline: Instant,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        let started = std::time::Instant::now();
        let result = timeout_at(deadline, call)
            .await
            .unwrap_or_else(|_| Err(no_ack()))
            .map(tonic::Response::into_inner);
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.rpc_duration.record(
            started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", "coinflow.fulfillment.v1.Ingest"),
                KeyValue::new("rpc.method", method),
                KeyValue::new("rpc.grpc.status_code", code as i64),
                KeyValue::new("route", Arc::clone(&self.route)),
            ],
        );
        result
    }

    /// `Deliver` of one event, for an endpoint without `DeliverBatch`.
    async fn deliver(
        &self,
        event: &WebhookEvent,
        span: &tracing::Span,
        deadline: Instant,
    ) -> Result<DeliverResponse, Status> {
        let mut request = self.request(
            DeliverRequest {
                event: Some(event.clone()),
            },
            deadline,
        );
        coinflow_shared::telemetry::inject(span, request.metadata_mut());
        self.call("Deliver", deadline, self.client.clone().deliver(request))
            .await
    }

    /// One `DeliverBatch` call of `events`, until `deadline`: a result per event.
    async fn call_batch(
        &self,
        events: Vec<BatchedEvent>,
        deadline: Instant,
    ) -> Result<Vec<DeliverResult>, Status> {
        let sent = events.len();
        let request = self.request(DeliverBatchRequest { events }, deadline);
        let results = self
            .call(
                "DeliverBatch",
                deadline,
                self.client.clone().deliver_batch(request),
            )
            .await?
            .results;
        if results.len() != sent {
            return Err(Status::internal(format!(
                "ingest answered {} results for {sent} events",
                results.len()
            )));
        }
        Ok(results)
    }

    /// What each event of a call of `events` that failed as a whole with `status` is
    /// answered: an endpoint without `DeliverBatch` is switched to `Deliver`, and a call
    /// of several events refused with a code that is not retried is split.
    fn failed_whole(&self, status: Status, events: usize) -> Status {
        let code = status.code();
        if code == Code::Unimplemented {
            tracing::info!(route = %self.route, "the ingest endpoint has no DeliverBatch: using Deliver");
            self.unary.store(true, Ordering::Relaxed);
            // ABORTED: retried at once, without setting the endpoint aside.
            return Status::aborted(RETRY_UNARY);
        }
        if events > 1 && !retryable(code) && code != Code::DeadlineExceeded {
            tracing::warn!(
                route = %self.route,
                code = %code,
                message = status.message(),
                events,
                "a DeliverBatch call failed as a whole: retrying each of its events alone"
            );
            return Status::aborted(RETRY_ALONE);
        }
        status
    }

    /// One `DeliverBatch` call; answers each event. Holds `slot` while in flight.
    async fn deliver_batch(self, mut batch: Vec<Pending>, slot: OwnedSemaphorePermit) {
        batch.retain(|p| !p.reply.is_closed());
        let Some(deadline) = batch.iter().map(|p| p.deadline).min() else {
            return;
        };
        let events = batch
            .iter_mut()
            .map(|p| std::mem::take(&mut p.batched))
            .collect();
        let result = self.call_batch(events, deadline).await;
        drop(slot);
        match result {
            Ok(results) => {
                for (p, result) in batch.into_iter().zip(results) {
                    let _ = p.reply.send(answer(result));
                }
            }
            Err(status) => {
                let status = self.failed_whole(status, batch.len());
                for p in batch {
                    let _ = p.reply.send(Err(status.clone()));
                }
            }
        }
    }

    /// `batched` in a `DeliverBatch` call of its own, taking one of the endpoint's slots.
    async fn deliver_alone(
        &self,
        batched: BatchedEvent,
        deadline: Instant,
    ) -> Result<DeliverResponse, Status> {
        let _slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the endpoint's batcher stopped"))?;
        let results = self
            .call_batch(vec![batched], deadline)
            .await
            .map_err(|status| self.failed_whole(status, 1))?;
        results.into_iter().next().map_or_else(
            || Err(Status::internal("ingest answered no result")),
            answer,
        )
    }
}

/// One event's answer in a `DeliverBatch` response.
fn answer(result: DeliverResult) -> Result<DeliverResponse, Status> {
    match result.result {
        Some(BatchResult::Ack(ack)) => Ok(ack),
        Some(BatchResult::Failure(f)) => Err(Status::new(Code::from(f.code), f.message)),
        None => Err(Status::internal("ingest answered an empty result")),
    }
}

/// Sends what waits in `queue` to the endpoint, at most [`IN_FLIGHT_CALLS`] calls at once,
/// each within [`CALL_LIMITS`]. Ends when the endpoint is dropped.
async fn batch(mut queue: mpsc::Receiver<Pending>, caller: Caller) {
    let mut left_over = None;
    loop {
        let Ok(slot) = Arc::clone(&caller.slots).acquire_owned().await else {
            return;
        };
        let first = match left_over.take() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut call = Vec::with_capacity(MAX_BATCH.min(queue.len() + 1));
        left_over = fill(
            &mut call,
            first,
            CALL_LIMITS,
            |p: &Pending| p.size,
            || queue.try_recv().ok(),
        );
        tokio::spawn(caller.clone().deliver_batch(call, slot));
    }
}

struct Member {
    key: String,
    channel: Channel,
    caller: Caller,
    queue: mpsc::Sender<Pending>,
    down_until: Mutex<Option<Instant>>,
}

impl Member {
    fn new(
        key: String,
        url: &str,
        connect_timeout: Duration,
        base: &Base,
    ) -> Result<Self, DeliverError> {
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(|e| DeliverError::BadEndpoints(url.to_owned(), e.to_string()))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let client = IngestClient::new(channel.clone())
            .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        let caller = Caller {
            client,
            bearer: base.bearer.clone(),
            metrics: Arc::clone(&base.metrics),
            route: Arc::clone(&base.route),
            unary: Arc::default(),
            slots: Arc::new(Semaphore::new(IN_FLIGHT_CALLS)),
        };
        let (queue, waiting) = mpsc::channel(QUEUED);
        tokio::spawn(batch(waiting, caller.clone()));
        Ok(Self {
            key,
            channel,
            caller,
            queue,
            down_until: Mutex::new(None),
        })
    }

    /// Delivers `event` in the endpoint's next call, or in a call of its own when `alone`;
    /// `span` is the attempt's client span.
    async fn deliver(
        &self,
        event: &WebhookEvent,
        span: &tracing::Span,
        deadline: Instant,
        alone: bool,
    ) -> Result<DeliverResponse, Status> {
        if self.caller.unary.load(Ordering::Relaxed) {
            // Boxed: tonic's unary call future is ~11 KiB, and every delivery's future
            // would carry (and move) that space for this rare path.
            return Box::pin(self.caller.deliver(event, span, deadline)).await;
        }
        let batched = BatchedEvent {
            event: Some(event.clone()),
            trace_context: coinflow_shared::telemetry::context_map(span),
        };
        if alone {
            return Box::pin(self.caller.deliver_alone(batched, deadline)).await;
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            size: batched.encoded_len(),
            batched,
            deadline,
            reply,
        };
        self.queue
            .send(pending)
            .await
            .map_err(|_| Status::unavailable("the endpoint's batcher stopped"))?;
        answer
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("the endpoint's call was dropped")))
    }

    fn down_until(&self) -> Option<Instant> {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_down(&self, until: Option<Instant>) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }
}

/// What every endpoint of a target shares.
#[derive(Clone)]
struct Base {
    route: Arc<str>,
    bearer: Option<MetadataValue<Ascii>>,
    metrics: Arc<Metrics>,
}

/// A client of one ingest target.
#[derive(Clone)]
pub struct IngestTarget {
    base: Base,
    members: Arc<RwLock<Vec<Arc<Member>>>>,
    next: Arc<AtomicUsize>,
    deadline: Duration,
}

impl IngestTarget {
    /// A lazily connecting client of `endpoints`, named `name` in metrics; each delivery
    /// gets `deadline` and, when set, `authorization: Bearer <token>`. It must be created
    /// inside a tokio runtime (each endpoint has a task; a DNS target is re-resolved every
    /// `resolve_every`).
    pub fn new(
        name: &str,
        endpoints: &Endpoints,
        deadline: Duration,
        token: Option<&SecretString>,
        resolve_every: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, DeliverError> {
        let bearer = token
            .map(|t| {
                let mut v = MetadataValue::try_from(format!("Bearer {}", t.expose_secret()))
                    .map_err(|_| DeliverError::BadToken)?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()?;
        let target = Self {
            base: Base {
                route: name.into(),
                bearer,
                metrics,
            },
            members: Arc::default(),
            next: Arc::default(),
            deadline,
        };
        let connect_timeout = deadline.min(Duration::from_secs(1));
        match endpoints {
            Endpoints::Static(urls) => {
                let members = urls
                    .iter()
                    .map(|u| Member::new(u.clone(), u, connect_timeout, &target.base).map(Arc::new))
                    .collect::<Result<_, _>>()?;
                *target.members.write().unwrap_or_else(|p| p.into_inner()) = members;
            }
            Endpoints::Dns(name) => {
                tokio::spawn(resolve(
                    Arc::downgrade(&target.members),
                    name.clone(),
                    resolve_every,
                    connect_timeout,
                    target.base.clone(),
                ));
            }
        }
        Ok(target)
    }

    /// The target's name.
    pub fn name(&self) -> &str {
        &self.base.route
    }

    /// A channel to a live endpoint, for health checks.
    pub fn channel(&self) -> Option<Channel> {
        self.pick().map(|m| m.channel.clone())
    }

    /// The next endpoint round robin, skipping ones set aside; if all are, the one that
    /// comes back first.
    fn pick(&self) -> Option<Arc<Member>> {
        let members = self.members.read().unwrap_or_else(|p| p.into_inner());
        if members.is_empty() {
            return None;
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..members.len())
            .map(|i| &members[(start + i) % members.len()])
            .find(|m| m.down_until().is_none_or(|t| t <= now))
            .or_else(|| members.iter().min_by_key(|m| m.down_until()))
            .cloned()
    }

    /// Delivers one event; `Ok` means the target recorded it durably.
    pub async fn deliver(&self, event: &WebhookEvent) -> Result<DeliverResponse, DeliverError> {
        let deadline = Instant::now() + self.deadline;
        let mut backoff = Duration::from_millis(20);
        // Set once a call this event shared failed as a whole: from then on it goes alone.
        let mut alone = false;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(DeliverError::Deadline(self.deadline));
            }
            let Some(member) = self.pick() else {
                sleep(backoff.min(remaining)).await;
                backoff = (backoff * 2).min(Duration::from_millis(250));
                if Instant::now() >= deadline {
                    return Err(DeliverError::NoEndpoint);
                }
                continue;
            };
            let method = if member.caller.unary.load(Ordering::Relaxed) {
                "Deliver"
            } else {
                "DeliverBatch"
            };
            let span = tracing::info_span!(
                "grpc.client",
                otel.name = %format_args!("coinflow.fulfillment.v1.Ingest/{method}"),
                otel.kind = "client",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = "coinflow.fulfillment.v1.Ingest",
                rpc.method = method,
                rpc.grpc.status_code = Empty,
                server.address = %member.key,
                coinflow.route = %self.base.route,
            );
            // With another endpoint to fall back on, one attempt may use half the budget:
            // an endpoint that hangs (a dead peer not yet noticed) must not eat it all.
            let attempt_deadline = if self.live_members() > 1 {
                Instant::now() + remaining.min(self.deadline / 2)
            } else {
                deadline
            };
            let result = timeout_at(
                attempt_deadline,
                member.deliver(event, &span, attempt_deadline, alone),
            )
            .instrument(span.clone())
            .await
            .unwrap_or_else(|_| Err(no_ack()));
            let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
            span.record("rpc.grpc.status_code", code as i32);
            if code != Code::Ok {
                span.record("otel.status_code", "ERROR");
            }
            // A call shared with other events ends at the earliest of their deadlines: an
            // event whose own attempt still has time left tries again.
            let timed_out = code == Code::DeadlineExceeded && Instant::now() >= attempt_deadline;
            match result {
                Ok(response) => {
                    member.set_down(None);
                    return Ok(response);
                }
                Err(_) if timed_out && attempt_deadline < deadline => {
                    tracing::debug!(endpoint = %member.key, "ingest attempt timed out; trying another endpoint");
                    member.set_down(Some(Instant::now() + COOLDOWN));
                }
                Err(_) if timed_out => {
                    return Err(DeliverError::Deadline(self.deadline));
                }
                Err(status) if code == Code::Aborted && status.message() == RETRY_UNARY => {}
                Err(status) if code == Code::Aborted && status.message() == RETRY_ALONE => {
                    alone = true;
                }
                Err(_) if retryable(code) || code == Code::DeadlineExceeded => {
                    tracing::debug!(code = %code, endpoint = %member.key, "ingest transient failure; retrying");
                    if matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled) {
                        // The endpoint itself is likely gone: try the others first.
                        member.set_down(Some(Instant::now() + COOLDOWN));
                        if self.live_members() > 0 {
                            continue;
                        }
                    }
                    sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(status) => return Err(DeliverError::Status(status)),
            }
        }
    }

    fn live_members(&self) -> usize {
        let now = Instant::now();
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|m| m.down_until().is_none_or(|t| t <= now))
            .count()
    }
}

/// Keeps `members` equal to what `name` resolves to, keeping the connections of
/// addresses that stay. Ends when the target is dropped.
async fn resolve(
    members: std::sync::Weak<RwLock<Vec<Arc<Member>>>>,
    name: String,
    every: Duration,
    connect_timeout: Duration,
    base: Base,
) {
    loop {
        match tokio::net::lookup_host(&name).await {
            Ok(addrs) => {
                let Some(members) = members.upgrade() else {
                    return;
                };
                let mut current: BTreeMap<String, Arc<Member>> = members
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|m| (m.key.clone(), Arc::clone(m)))
                    .collect();
                let mut next = Vec::new();
                for addr in addrs {
                    let key = addr.to_string();
                    let member = match current.remove(&key) {
                        Some(m) => m,
                        None => match Member::new(
                            key.clone(),
                            &format!("http://{addr}"),
                            connect_timeout,
                            &base,
                        ) {
                            Ok(m) => Arc::new(m),
                            Err(e) => {
                                tracing::warn!(error = %e, "skipping a resolved address");
                                continue;
                            }
                        },
                    };
                    next.push(member);
                }
                if !next.is_empty() || current.is_empty() {
                    *members.write().unwrap_or_else(|p| p.into_inner()) = next;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, %name, "resolving ingest endpoints failed; keeping the last set")
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// What a call that ran out of time answers.
fn no_ack() -> Status {
    Status::deadline_exceeded("no ack before the deadline")
}

/// Codes after which the same event is tried again (ingest is idempotent). CANCELLED is
/// what the client reports for a call whose connection died under it (a replica killed
/// mid-call), not an answer from ingest.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown
            | Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_specs() {
        assert_eq!(
            Endpoints::parse("http://a:1, http://b:2").unwrap(),
            Endpoints::Static(vec!["http://a:1".into(), "http://b:2".into()])
        );
        assert_eq!(
            Endpoints::parse("dns://svc.ns:50051").unwrap(),
            Endpoints::Dns("svc.ns:50051".into())
        );
        assert!(Endpoints::parse("dns://svc").is_err());
        assert!(Endpoints::parse("").is_err());
        assert!(Endpoints::parse("not a url").is_err());
    }

    /// Splits items of `sizes` into calls the way the batcher does.
    fn calls(sizes: &[usize], limits: CallLimits) -> Vec<Vec<usize>> {
        let mut queue = sizes.iter().copied();
        let mut out = Vec::new();
        let mut left_over = None;
        while let Some(first) = left_over.take().or_else(|| queue.next()) {
            let mut call = Vec::new();
            left_over = fill(&mut call, first, limits, |n| *n, || queue.next());
            out.push(call);
        }
        out
    }

    #[test]
    fn calls_are_capped_by_bytes_and_by_events() {
        let limits = CallLimits {
            events: 3,
            bytes: 250,
        };
        assert_eq!(calls(&[100, 100, 100], limits), [vec![100, 100], vec![100]]);
        assert_eq!(calls(&[100, 150, 1], limits), [vec![100, 150], vec![1]]);
        assert_eq!(calls(&[1, 1, 1, 1, 1], limits), [vec![1, 1, 1], vec![1, 1]]);
        // A larger event goes alone, neither holding back nor joining its neighbours.
        assert_eq!(
            calls(&[10, 1000, 10, 10], limits),
            [vec![10], vec![1000], vec![10, 10]]
        );
        assert_eq!(calls(&[1000, 1000], limits), [vec![1000], vec![1000]]);
        assert_eq!(calls(&[usize::MAX, 1], limits), [vec![usize::MAX], vec![1]]);
        // Nothing is lost or reordered.
        let sizes: Vec<usize> = (0..500).map(|i| (i * 37) % 300).collect();
        let split = calls(&sizes, limits);
        assert_eq!(split.concat(), sizes);
        for call in &split {
            assert!(call.len() <= 3);
            assert!(
                call.len() == 1 || call.iter().sum::<usize>() <= 250,
                "{call:?}"
            );
        }
    }

    #[test]
    fn events_of_200_kib_share_calls_within_the_batch_byte_limit() {
        let event = |n: usize| {
            let body = format!(
                r#"{{"eventType":"Settled","category":"Purchase","created":"c","data":{{"id":"p{n}","memo":"{}"}}}}"#,
                "x".repeat(200 * 1024)
            );
            let envelope = coinflow_shared::envelope::Envelope::parse(body.as_bytes()).unwrap();
            BatchedEvent {
                event: Some(coinflow_shared::convert::to_proto(
                    envelope,
                    body.into(),
                    std::time::SystemTime::UNIX_EPOCH,
                )),
                trace_context: [("traceparent".to_owned(), "00-x-y-01".to_owned())].into(),
            }
        };
        let sizes: Vec<usize> = (0..64).map(|n| event(n).encoded_len()).collect();
        let split = calls(&sizes, CALL_LIMITS);
        assert!(
            split.len() > 1,
            "64 events of 200 KiB cannot share one call"
        );
        for call in &split {
            assert!(
                call.len() > 1,
                "200 KiB events still share calls: {split:?}"
            );
            assert!(call.iter().sum::<usize>() <= MAX_BATCH_BYTES);
        }
    }

    #[test]
    fn transport_failures_are_retried_and_refusals_are_not() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Cancelled,
            Code::Aborted,
        ] {
            assert!(retryable(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::FailedPrecondition,
        ] {
            assert!(!retryable(code), "{code:?}");
        }
    }
}
