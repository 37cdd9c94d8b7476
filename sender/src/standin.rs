//! A local stand-in for Coinflow: it generates payments, delivers their webhooks with the
//! Coinflow-faithful [`Sender`] (signing, the retry schedule, `compress`, `attempts`),
//! keeps a **delivery log of every attempt** with the status the receiver answered, and
//! serves Coinflow's merchant API over that log and those payments on its own port:
//!
//! | route | what |
//! |---|---|
//! | `GET /merchant/webhooks` | the log, newest first; `page`, `limit`, `responseCode`, `eventType`, `startDate`/`endDate` (ISO 8601, on `sentAt`, both ends included), `transactionId` (payment id), `search` (in the id and the packet), `merchantId` |
//! | `POST /merchant/webhooks/{id}` | posts that packet again, signed as usual, as a background job logged as a new attempt; `200 {"jobId": …}`, 404 for an unknown id |
//! | `GET /merchant/payments` | `since`/`until` (epoch ms, on `createdAt`), `status`, `page`, `limit` |
//! | `GET /merchant/payments/{paymentId}` | one payment, 404 when unknown |
//! | `GET /refunds/payment/{paymentId}/all` | a payment's refunds (`[]` if none), 404 when unknown |
//! | `GET /merchant/chargebacks` | `since`/`until` (epoch ms, on when each opened), `status`, `page`, `limit` |
//!
//! The paths may also be prefixed with `/api`, like Coinflow's base URLs. Every request
//! needs `Authorization: <api key>` (401 otherwise, never retried by a client); then, at
//! [`StandinConfig::api_error_rate`], a seeded draw answers 429 with `Retry-After: 0` or
//! 503 instead. An attempt that got no answer is logged with `responseCode`
//! [`NO_ANSWER`] (0). Event types in [`StandinConfig::unsubscribed`] are never delivered,
//! so never logged, while their payments are still listed: the case only reconciliation
//! can find.
//!
//! Field names follow `/work/shared/coinflow/merchant-api.md`; where it is silent the
//! stand-in uses the same provisional names as `fulfillment_svc::coinflow_api`: a
//! payment's `status` (`Settled`, `Declined`, `Authorized`), a refund's `paymentId`,
//! `status`, `createdAt`, `totals`, a chargeback's `chargebackId`, `paymentId`, `status`
//! (`Opened`, `Won`, `Lost`), `createdAt`; `createdAt` is ISO 8601. The JSON is built
//! here ([`api`]), never from the client's types.

pub mod api;
pub mod model;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use coinflow_shared::envelope::Envelope;
use coinflow_shared::http_server::{HttpService, ServiceError, boxed, serve};
use rand::SeedableRng;
use rand::rngs::StdRng;
use secrecy::SecretString;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneService;

pub use model::{LogEntry, NO_ANSWER, PaymentRecord};

use crate::deliver::{Logged, Observer, Sender, Target};
use crate::generate::{Traffic, generate};

/// What the stand-in generates, where it delivers and how its API behaves.
#[derive(Clone)]
pub struct StandinConfig {
    /// The payments and their events (as `generate` makes them).
    pub traffic: Traffic,
    /// The webhook URL and key, retries and compression.
    pub target: Target,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Where the merchant API listens (`127.0.0.1:0`: any free port).
    pub listen: SocketAddr,
    /// The merchant API key it accepts.
    pub api_key: SecretString,
    /// The share of authorized API requests answered 429 or 503 instead.
    pub api_error_rate: f64,
    /// Seeds the error draws.
    pub api_error_seed: u64,
    /// Event types never delivered (not subscribed in the dashboard).
    pub unsubscribed: Vec<String>,
}

impl StandinConfig {
    /// `payments` generated payments (no duplicates, no reordering, seed 1) delivered to
    /// `webhook_url` signed with `webhook_key` (16 attempts, 1000 times faster than
    /// Coinflow); the API on a free port of 127.0.0.1 accepting `api_key`, never failing.
    pub fn local(
        webhook_url: impl Into<String>,
        webhook_key: SecretString,
        api_key: SecretString,
        payments: usize,
    ) -> Self {
        Self {
            traffic: Traffic {
                payments,
                duplicate_ratio: 0.0,
                reorder_ratio: 0.0,
                prefix: "cf".into(),
                seed: 1,
            },
            target: Target {
                url: webhook_url.into(),
                key: webhook_key,
                authorization: false,
                compress: 1000.0,
                attempts: crate::schedule::ATTEMPTS,
            },
            concurrency: 32,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key,
            api_error_rate: 0.0,
            api_error_seed: 1,
            unsubscribed: Vec::new(),
        }
    }
}

/// Requests the API has seen.
#[derive(Debug, Default)]
pub struct Counters {
    /// Every request.
    pub requests: AtomicU64,
    /// Answered 401.
    pub refused: AtomicU64,
    /// Answered with an injected 429 or 503.
    pub injected: AtomicU64,
    /// Resend jobs started.
    pub jobs: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Every request.
    pub requests: u64,
    /// Answered 401.
    pub refused: u64,
    /// Answered with an injected 429 or 503.
    pub injected: u64,
    /// Resend jobs started.
    pub jobs: u64,
}

/// What the API serves from, shared with the request handlers.
pub struct State {
    api_key: SecretString,
    error_rate: f64,
    rng: Mutex<StdRng>,
    log: Arc<Mutex<Vec<LogEntry>>>,
    payments: Vec<PaymentRecord>,
    sender: Sender,
    jobs: Mutex<Vec<JoinHandle<()>>>,
    counters: Counters,
}

/// A running stand-in. Dropping it leaves the server running until the runtime ends;
/// [`Coinflow::stop`] stops it.
pub struct Coinflow {
    addr: SocketAddr,
    state: Arc<State>,
    bodies: Vec<Bytes>,
    concurrency: usize,
    unsubscribed: Vec<String>,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
}

impl Coinflow {
    /// Generates the payments, binds the API and serves it. Nothing is delivered until
    /// [`Coinflow::deliver`].
    pub async fn start(config: StandinConfig) -> std::io::Result<Self> {
        let bodies = generate(&config.traffic);
        let payments = model::payments(&bodies, SystemTime::now());
        let log: Arc<Mutex<Vec<LogEntry>>> = Arc::default();
        let sender = Sender::new(config.target.clone(), None).with_observer(observer(&log));
        let state = Arc::new(State {
            api_key: config.api_key,
            error_rate: config.api_error_rate,
            rng: Mutex::new(StdRng::seed_from_u64(config.api_error_seed)),
            log,
            payments,
            sender,
            jobs: Mutex::default(),
            counters: Counters::default(),
        });
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let for_routes = state.clone();
        let service: HttpService = BoxCloneService::new(tower::service_fn(move |request| {
            let state = for_routes.clone();
            async move { Ok::<_, ServiceError>(boxed(api::handle(state, request).await)) }
        }));
        let server = tokio::spawn(serve(
            listener,
            service,
            Duration::from_secs(10),
            shutdown.clone(),
            Duration::from_secs(1),
        ));
        Ok(Self {
            addr,
            state,
            bodies,
            concurrency: config.concurrency,
            unsubscribed: config.unsubscribed,
            shutdown,
            server,
        })
    }

    /// Where the merchant API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The merchant API's base URL (`http://127.0.0.1:port`).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every generated event body, the unsubscribed ones included, in delivery order.
    pub fn bodies(&self) -> &[Bytes] {
        &self.bodies
    }

    /// The bodies [`Coinflow::deliver`] posts: all but the unsubscribed event types.
    pub fn subscribed_bodies(&self) -> Vec<Bytes> {
        self.bodies
            .iter()
            .filter(|b| {
                Envelope::parse(b).map_or(true, |e| !self.unsubscribed.contains(&e.event_type))
            })
            .cloned()
            .collect()
    }

    /// The payments it generated, as the API lists them.
    pub fn payments(&self) -> &[PaymentRecord] {
        &self.state.payments
    }

    /// Delivers every subscribed event (each until a 200 or out of attempts, on
    /// Coinflow's schedule) and returns when all are done. Calling it again delivers them
    /// all again.
    pub async fn deliver(&self) -> Vec<Logged> {
        let bodies = self.subscribed_bodies();
        self.state
            .sender
            .closed_loop(bodies, self.concurrency)
            .await
    }

    /// Waits until every resend job started so far has its answer logged.
    pub async fn settle(&self) {
        loop {
            let jobs: Vec<JoinHandle<()>> = std::mem::take(
                &mut *self
                    .state
                    .jobs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            if jobs.is_empty() {
                return;
            }
            for job in jobs {
                let _ = job.await;
            }
        }
    }

    /// The delivery log so far, oldest first.
    pub fn log(&self) -> Vec<LogEntry> {
        self.state
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What the API has answered so far.
    pub fn seen(&self) -> Seen {
        let c = &self.state.counters;
        Seen {
            requests: c.requests.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            injected: c.injected.load(Ordering::Relaxed),
            jobs: c.jobs.load(Ordering::Relaxed),
        }
    }

    /// The sender's summary of the deliveries so far.
    pub fn report(&self) -> crate::deliver::Report {
        self.state.sender.report()
    }

    /// Stops serving (after resend jobs in flight finish) and waits until it has.
    pub async fn stop(self) {
        self.settle().await;
        self.shutdown.cancel();
        let _ = self.server.await;
    }
}

/// Appends every attempt to `log`.
fn observer(log: &Arc<Mutex<Vec<LogEntry>>>) -> Observer {
    let log = log.clone();
    Arc::new(move |attempt| {
        let code = attempt.status.map_or(NO_ANSWER, |s| s.as_u16());
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = u64::try_from(log.len()).unwrap_or(u64::MAX) + 1;
        log.push(LogEntry::new(
            seq,
            attempt.body,
            attempt.url,
            attempt.sent_at,
            code,
        ));
    })
}
