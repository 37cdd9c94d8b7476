//! Delivering one webhook the Coinflow way, and what a run measured.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use coinflow_shared::envelope::Envelope;
use coinflow_shared::identity::event_key;
use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use secrecy::SecretString;
use serde::Serialize;

use crate::progress::{Counts, Progress};
use crate::schedule;

/// How long Coinflow waits for an answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to deliver.
#[derive(Clone)]
pub struct Target {
    /// The webhook URL.
    pub url: String,
    /// The Validation Key.
    pub key: SecretString,
    /// Also send `Authorization: <key>`, as Coinflow does when enabled.
    pub authorization: bool,
    /// Divides every retry wait (1 = Coinflow's real schedule).
    pub compress: f64,
    /// Attempts before giving up (Coinflow: 16).
    pub attempts: usize,
}

/// One line of the delivery log: what the sender believes happened to one delivery.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Logged {
    /// The transport identity, as the receiver computes it.
    pub event_key: String,
    /// `data.id` / `data.paymentId`.
    pub payment_id: Option<String>,
    /// `eventType`.
    pub event_type: String,
    /// `acked` (a 200 was received) or `gave_up`.
    pub result: String,
    /// Attempts made.
    pub attempts: usize,
    /// The last status received (0: no answer).
    pub last_status: u16,
}

/// What a run measured.
pub struct Stats {
    latency_us: Histogram<u64>,
    statuses: BTreeMap<String, u64>,
    acked: u64,
    gave_up: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|_| unreachable!("valid bounds")),
            statuses: BTreeMap::new(),
            acked: 0,
            gave_up: 0,
        }
    }
}

/// A run's summary.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Deliveries acked with 200.
    pub acked: u64,
    /// Deliveries that exhausted their attempts.
    pub gave_up: u64,
    /// Attempts by outcome (`200`, `503`, `timeout`, `error`…).
    pub statuses: BTreeMap<String, u64>,
    /// Attempt latency percentiles, in milliseconds.
    pub p50_ms: f64,
    /// p90.
    pub p90_ms: f64,
    /// p99.
    pub p99_ms: f64,
    /// max.
    pub max_ms: f64,
    /// Acked deliveries per second over the run.
    pub throughput_per_s: f64,
    /// Wall time.
    pub seconds: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "acked {} gave up {} in {:.2} s: {:.1} deliveries/s",
            self.acked, self.gave_up, self.seconds, self.throughput_per_s
        )?;
        writeln!(
            f,
            "attempt latency ms: p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        )?;
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        write!(f, "attempts by status: {}", statuses.join(", "))
    }
}

/// One attempt as it happened: what a delivery log of every attempt records.
#[derive(Debug)]
pub struct Attempted<'a> {
    /// The body posted.
    pub body: &'a Bytes,
    /// Where.
    pub url: &'a str,
    /// When it was signed and sent.
    pub sent_at: SystemTime,
    /// The receiver's status; `None`: no answer within [`ATTEMPT_TIMEOUT`] or no
    /// connection.
    pub status: Option<StatusCode>,
}

/// Told about every attempt, after its answer (or its failure).
pub type Observer = Arc<dyn Fn(&Attempted<'_>) + Send + Sync>;

/// Delivers webhooks to one target, sharing a connection pool, stats and a log.
#[derive(Clone)]
pub struct Sender {
    target: Target,
    client: Client<HttpConnector, Full<Bytes>>,
    stats: Arc<Mutex<Stats>>,
    log: Option<Arc<Mutex<std::fs::File>>>,
    observer: Option<Observer>,
    started: Instant,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Sender {
    /// A sender to `target`, appending to the delivery log at `log` when given.
    pub fn new(target: Target, log: Option<std::fs::File>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            target,
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .build(connector),
            stats: Arc::default(),
            log: log.map(|f| Arc::new(Mutex::new(f))),
            observer: None,
            started: Instant::now(),
        }
    }

    /// The same sender, telling `observer` about every attempt.
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Where it delivers.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// One attempt: sign now, POST, wait at most 5 s. `None` means no answer.
    pub async fn attempt(&self, body: &Bytes) -> Option<StatusCode> {
        let sent_at = SystemTime::now();
        let signature = coinflow_shared::signature::sign(&self.target.key, now_unix(), body);
        let mut request = Request::post(&self.target.url)
            .header("content-type", "application/json")
            .header("coinflow-signature", signature);
        if self.target.authorization {
            use secrecy::ExposeSecret;
            request = request.header("authorization", self.target.key.expose_secret());
        }
        let request = request.body(Full::new(body.clone())).ok()?;
        let started = Instant::now();
        let answer = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
            let response = self.client.request(request).await.ok()?;
            let status = response.status();
            // Read the body so the connection can be reused.
            let _ = response.into_body().collect().await;
            Some(status)
        })
        .await;
        let status = match answer {
            Ok(Some(status)) => Some(status),
            Ok(None) => None,
            Err(_) => None,
        };
        let label = match (&answer, status) {
            (Err(_), _) => "timeout".to_owned(),
            (_, Some(s)) => s.as_u16().to_string(),
            (_, None) => "error".to_owned(),
        };
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let _ = stats.latency_us.record(
            u64::try_from(started.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        *stats.statuses.entry(label).or_default() += 1;
        drop(stats);
        if let Some(observer) = &self.observer {
            observer(&Attempted {
                body,
                url: &self.target.url,
                sent_at,
                status,
            });
        }
        status
    }

    /// Delivers `body` until a 200, following Coinflow's schedule; logs the result.
    pub async fn deliver(&self, body: Bytes) -> Logged {
        let mut attempts = 0;
        let mut last = 0;
        let mut acked = false;
        while attempts < self.target.attempts {
            if attempts > 0 {
                tokio::time::sleep(schedule::wait(attempts, self.target.compress)).await;
            }
            attempts += 1;
            let status = self.attempt(&body).await;
            last = status.map_or(0, |s| s.as_u16());
            if status == Some(StatusCode::OK) {
                acked = true;
                break;
            }
        }
        let (event_key, payment_id, event_type) = match Envelope::parse(&body) {
            Ok(env) => (event_key(&env, &body), env.payment_id(), env.event_type),
            Err(_) => (
                coinflow_shared::identity::body_key(&body),
                coinflow_shared::convert::best_effort_payment_id(&body),
                String::new(),
            ),
        };
        let logged = Logged {
            event_key,
            payment_id,
            event_type,
            result: if acked { "acked" } else { "gave_up" }.to_owned(),
            attempts,
            last_status: last,
        };
        {
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            if acked {
                stats.acked += 1
            } else {
                stats.gave_up += 1
            }
        }
        if let Some(log) = &self.log
            && let Ok(line) = serde_json::to_string(&logged)
        {
            let mut file = log.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(file, "{line}");
        }
        logged
    }

    /// Delivers every body with at most `concurrency` attempts in flight (closed loop).
    pub async fn closed_loop(&self, bodies: Vec<Bytes>, concurrency: usize) -> Vec<Logged> {
        use futures::StreamExt;
        futures::stream::iter(bodies)
            .map(|body| self.deliver(body))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await
    }

    /// Starts one delivery every `1 / rate` seconds whatever the answers (open loop).
    pub async fn open_loop(&self, bodies: Vec<Bytes>, rate: f64) -> Vec<Logged> {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(bodies.len());
        for body in bodies {
            tick.tick().await;
            let sender = self.clone();
            tasks.push(tokio::spawn(async move { sender.deliver(body).await }));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            if let Ok(logged) = t.await {
                out.push(logged);
            }
        }
        out
    }

    /// Deliveries finished (acked or given up) and attempts not answered 200, so far.
    pub fn counts(&self) -> Counts {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        Counts {
            done: stats.acked + stats.gave_up,
            errors: stats
                .statuses
                .iter()
                .filter(|(status, _)| *status != "200")
                .map(|(_, n)| n)
                .sum(),
        }
    }

    /// Shows this sender's progress towards `total` deliveries on stderr (see
    /// [`crate::progress`]) until [`Progress::finish`].
    pub fn progress(&self, what: impl Into<String>, total: usize) -> Progress {
        let sender = self.clone();
        Progress::start(what, total as u64, move || sender.counts())
    }

    /// The run so far.
    pub fn report(&self) -> Report {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let q = |p: f64| stats.latency_us.value_at_quantile(p) as f64 / 1000.0;
        let seconds = self.started.elapsed().as_secs_f64();
        Report {
            acked: stats.acked,
            gave_up: stats.gave_up,
            statuses: stats.statuses.clone(),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            max_ms: stats.latency_us.max() as f64 / 1000.0,
            throughput_per_s: stats.acked as f64 / seconds.max(1e-9),
            seconds,
        }
    }
}
