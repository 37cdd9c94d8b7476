//! What a recovery run reports: the summary a person reads, one JSON line per action for
//! `--log`, progress while it runs on a terminal, and the `coinflow_recovery_*` metrics of
//! `--every`.
#![allow(clippy::print_stdout)]

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, ObservableGauge};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::RecoverError;
use crate::coinflow_api::iso8601;

/// Something the ledger does not reflect, after everything a run could do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Discrepancy {
    /// Coinflow resent the event, but it was not recorded within `--wait` (the webhook
    /// path is still broken: try `--direct`).
    ResentNotRecorded {
        /// Its transport identity.
        event_key: String,
        /// The delivery resent.
        delivery_id: String,
        /// Its event type.
        event_type: String,
        /// Its payment.
        payment_id: Option<String>,
    },
    /// Coinflow lists the payment as settled; no `Settled` is recorded.
    SettledNotRecorded {
        /// The payment.
        payment_id: String,
    },
    /// Coinflow has a refund of the payment; no refund is recorded.
    RefundNotRecorded {
        /// The payment.
        payment_id: String,
    },
    /// Coinflow has a chargeback (in this status); the ledger has no such event.
    ChargebackNotRecorded {
        /// The payment.
        payment_id: String,
        /// Coinflow's chargeback id.
        chargeback_id: Option<String>,
        /// `Opened`, `Won` or `Lost`.
        status: String,
    },
}

/// What one run found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The window swept (`sentAt` of deliveries, `createdAt` of payments).
    #[serde(serialize_with = "as_iso8601")]
    pub window_start: SystemTime,
    /// See `window_start`.
    #[serde(serialize_with = "as_iso8601")]
    pub window_end: SystemTime,
    /// Logged attempts not answered 200.
    pub deliveries: usize,
    /// The distinct events they were attempts of.
    pub events: usize,
    /// Of those, already in the ledger.
    pub already_recorded: usize,
    /// Resent by Coinflow.
    pub resent: usize,
    /// Resent, and seen recorded before the run ended.
    pub resent_recorded: usize,
    /// Resent events identified by their bytes alone, which the run cannot wait for.
    pub resent_unverifiable: usize,
    /// Recorded through Ingest by this run (`--direct`), marked recovered.
    pub recorded_directly: usize,
    /// Payments of the window compared with the ledger.
    pub payments: usize,
    /// What is still not reflected.
    pub discrepancies: Vec<Discrepancy>,
}

impl Default for Report {
    fn default() -> Self {
        Self {
            window_start: SystemTime::UNIX_EPOCH,
            window_end: SystemTime::UNIX_EPOCH,
            deliveries: 0,
            events: 0,
            already_recorded: 0,
            resent: 0,
            resent_recorded: 0,
            resent_unverifiable: 0,
            recorded_directly: 0,
            payments: 0,
            discrepancies: Vec::new(),
        }
    }
}

fn as_iso8601<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&iso8601(*t))
}

/// One line of the action log.
#[derive(Debug, Default, Serialize)]
pub(super) struct Action<'a> {
    /// `already_recorded`, `resent`, `recorded_directly`, `resent_not_recorded`,
    /// `discrepancy`.
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discrepancy: Option<&'a Discrepancy>,
}

/// The `--log` file, when asked for.
pub(super) struct Out {
    file: Option<(PathBuf, std::fs::File)>,
}

impl Out {
    pub(super) fn open(path: Option<&Path>) -> Result<Self, RecoverError> {
        let file = path
            .map(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map(|f| (p.to_owned(), f))
                    .map_err(|e| RecoverError::Log(p.to_owned(), e))
            })
            .transpose()?;
        Ok(Self { file })
    }

    fn line(&mut self, value: &impl Serialize) -> Result<(), RecoverError> {
        let Some((path, file)) = &mut self.file else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(value)
            .map_err(|e| RecoverError::Log(path.clone(), std::io::Error::other(e)))?;
        line.push(b'\n');
        file.write_all(&line)
            .map_err(|e| RecoverError::Log(path.clone(), e))
    }

    /// Logs one action, stamped with the time.
    pub(super) fn write(&mut self, action: &Action<'_>) -> Result<(), RecoverError> {
        #[derive(Serialize)]
        struct Stamped<'a, 'b> {
            at: String,
            #[serde(flatten)]
            action: &'a Action<'b>,
        }
        self.line(&Stamped {
            at: iso8601(SystemTime::now()),
            action,
        })
    }

    /// Logs the run's summary.
    pub(super) fn summary(&mut self, report: &Report) -> Result<(), RecoverError> {
        #[derive(Serialize)]
        struct Summary<'a> {
            at: String,
            action: &'static str,
            #[serde(flatten)]
            report: &'a Report,
        }
        self.line(&Summary {
            at: iso8601(SystemTime::now()),
            action: "summary",
            report,
        })
    }
}

/// `checked n/total`, the rate and the ETA on stderr while a step runs: an `indicatif` bar
/// like `coinflow-sender`'s, only on a terminal (a CronJob's log gets the summary and
/// `--log` instead).
pub(super) struct Progress(ProgressBar);

impl Progress {
    pub(super) fn new(what: &'static str, total: usize) -> Self {
        if !std::io::stderr().is_terminal() || total == 0 {
            return Self(ProgressBar::hidden());
        }
        let style =
            ProgressStyle::with_template("  checked {pos}/{len} {prefix} {per_sec}, ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        Self(
            ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_prefix(what),
        )
    }

    pub(super) fn show(&self, done: usize) {
        self.0.set_position(done as u64);
    }

    pub(super) fn done(&self) {
        self.0.finish();
    }
}

/// The summary on stdout.
pub(super) fn print(report: &Report) {
    let directly = if report.recorded_directly > 0 {
        format!(
            ", {} recorded directly (marked recovered)",
            report.recorded_directly
        )
    } else {
        String::new()
    };
    println!(
        "recover {} .. {}: {} failed deliveries of {} events: {} already recorded, {} resent \
         ({} seen recorded, {} unverifiable){directly}; {} payments compared; {} discrepancies left",
        iso8601(report.window_start),
        iso8601(report.window_end),
        report.deliveries,
        report.events,
        report.already_recorded,
        report.resent,
        report.resent_recorded,
        report.resent_unverifiable,
        report.payments,
        report.discrepancies.len()
    );
    for d in &report.discrepancies {
        println!(
            "  discrepancy {}",
            serde_json::to_string(d).unwrap_or_default()
        );
    }
}

/// `coinflow_recovery_*`, for `--every`.
pub(super) struct Metrics {
    checked: Counter<u64>,
    resent: Counter<u64>,
    recovered: Counter<u64>,
    runs: Counter<u64>,
    discrepancies: Arc<AtomicU64>,
    _gauge: ObservableGauge<u64>,
}

impl Metrics {
    pub(super) fn new() -> Self {
        let meter = opentelemetry::global::meter("fulfillment-recover");
        let discrepancies = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&discrepancies);
        Self {
            checked: meter
                .u64_counter("coinflow.recovery.deliveries.checked")
                .with_description(
                    "Undelivered events found in Coinflow's delivery log and looked up",
                )
                .build(),
            resent: meter
                .u64_counter("coinflow.recovery.resent")
                .with_description("Events Coinflow was asked to resend")
                .build(),
            recovered: meter
                .u64_counter("coinflow.recovery.recovered")
                .with_description("Events recorded directly (--direct), marked recovered")
                .build(),
            runs: meter
                .u64_counter("coinflow.recovery.runs")
                .with_description("Recovery runs, by result (ok, discrepancies, failed)")
                .build(),
            _gauge: meter
                .u64_observable_gauge("coinflow.recovery.discrepancies")
                .with_description("Discrepancies left by the last run")
                .with_callback(move |o| o.observe(seen.load(Ordering::Relaxed), &[]))
                .build(),
            discrepancies,
        }
    }

    pub(super) fn record(&self, report: &Report) {
        self.checked.add(report.events as u64, &[]);
        self.resent.add(report.resent as u64, &[]);
        self.recovered.add(report.recorded_directly as u64, &[]);
        let left = report.discrepancies.len() as u64;
        self.discrepancies.store(left, Ordering::Relaxed);
        let result = if left == 0 { "ok" } else { "discrepancies" };
        self.runs.add(1, &[KeyValue::new("result", result)]);
    }

    pub(super) fn failed(&self) {
        self.runs.add(1, &[KeyValue::new("result", "failed")]);
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr` until `shutdown`.
pub(super) async fn serve_admin(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), RecoverError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RecoverError::Bind(addr, e))?;
    let bound = listener.local_addr().unwrap_or(addr);
    let ready: coinflow_shared::admin::Readiness = Arc::new(|| Box::pin(async { Ok(()) }));
    tokio::spawn(coinflow_shared::http_server::serve(
        listener,
        coinflow_shared::admin::service(ready),
        Duration::from_secs(5),
        shutdown,
        Duration::from_secs(1),
    ));
    tracing::info!(admin = %bound, "recover: serving /metrics");
    Ok(())
}
