//! `fulfillment-svc recover`: brings in what Coinflow stopped retrying, and reports what
//! the ledger does not reflect.
//!
//! Coinflow makes 16 attempts over about 18 hours and then drops an event; its merchant
//! API ([`crate::coinflow_api`]) keeps the delivery log and can resend. One run:
//! 1. [`sweep`]: lists the deliveries of the window whose answer was not 200, computes
//!    each one's transport identity from the logged packet exactly as the edge does
//!    ([`coinflow_shared::convert::from_body`]), and asks the ledger (`GetEvent`) whether
//!    it is recorded. A missing event is resent by Coinflow (the default: it comes back
//!    signed through the normal path, and the run waits for it to be recorded), or with
//!    `--direct` recorded through `Ingest` by this command's recovery credential, which
//!    fulfillment marks as recovered.
//! 2. [`reconcile`]: lists Coinflow's payments, refunds and chargebacks of the window and
//!    reports each one the ledger does not reflect.
//! 3. [`report`]: a summary, one JSON line per action with `--log`, progress on a terminal,
//!    and `coinflow_recovery_*` metrics; the run fails while discrepancies remain, so a
//!    CronJob alerts. A second run right after changes nothing.

mod reconcile;
mod report;
mod sweep;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use coinflow_shared::proto::v1::fulfillment_client::FulfillmentClient;
use coinflow_shared::proto::v1::ingest_client::IngestClient;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::{Bearer, CliError, Target, channel};
use crate::coinflow_api::{API_KEY_ENV, ApiConfig, ApiError, CoinflowApi, PRODUCTION_URL, Window};

pub use report::{Discrepancy, Report};

/// How `recover` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct RecoverArgs {
    /// fulfillment-svc, with a token of the recovery role (FULFILLMENT_RECOVERY_TOKENS).
    #[command(flatten)]
    pub target: Target,
    /// Coinflow's merchant API (the sandbox is https://api-sandbox.coinflow.cash/api).
    #[arg(long, env = "COINFLOW_API_URL", default_value = PRODUCTION_URL)]
    pub api_url: String,
    /// The merchant API key (not the webhook Validation Key).
    #[arg(long, env = "COINFLOW_API_KEY", hide_env_values = true)]
    pub api_key: Option<SecretString>,
    /// How far back to look: more than Coinflow's ~18 h retry schedule.
    #[arg(long, default_value = "48h", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Record missing events through Ingest instead of asking Coinflow to resend them
    /// (for when the webhook path itself is what is broken).
    #[arg(long)]
    pub direct: bool,
    /// How long to wait for resent events to be recorded.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Append one JSON line per action to this file.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Keep running, once per this interval, serving `/metrics` on --admin-listen.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
    /// `/healthz`, `/readyz` and `/metrics` with --every.
    #[arg(long, env = "RECOVER_ADMIN_LISTEN", default_value = "127.0.0.1:9092")]
    pub admin_listen: SocketAddr,
    /// Entries per page of Coinflow's lists.
    #[arg(long, default_value_t = crate::coinflow_api::DEFAULT_PAGE_LIMIT, hide = true)]
    pub page_limit: u32,
}

/// Why a run could not finish. Messages name settings, never secrets.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// No API key.
    #[error("set {API_KEY_ENV} to the merchant API key")]
    NoApiKey,
    /// Coinflow's API failed or refused.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// fulfillment-svc is unreachable.
    #[error(transparent)]
    Connect(#[from] CliError),
    /// fulfillment-svc refused or failed a call.
    #[error("fulfillment-svc answered {}: {}", .0.code(), .0.message())]
    Fulfillment(#[from] tonic::Status),
    /// The action log could not be written.
    #[error("the action log {0}: {1}")]
    Log(PathBuf, std::io::Error),
    /// The admin port could not be bound.
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// The run finished with discrepancies left.
    #[error("{0} discrepancies remain (see the report above)")]
    Discrepancies(usize),
}

type Query = FulfillmentClient<InterceptedService<Channel, Bearer>>;
type Ingest = IngestClient<InterceptedService<Channel, Bearer>>;

/// What a run talks to.
struct Recovery {
    args: RecoverArgs,
    api: CoinflowApi,
    query: Query,
    ingest: Ingest,
}

impl Recovery {
    async fn connect(args: RecoverArgs) -> Result<Self, RecoverError> {
        let key = args.api_key.clone().ok_or(RecoverError::NoApiKey)?;
        let mut config = ApiConfig::new(args.api_url.clone(), key);
        config.page_limit = args.page_limit.max(1);
        let api = CoinflowApi::new(config)?;
        let (channel, bearer) = channel(&args.target).await?;
        Ok(Self {
            query: FulfillmentClient::with_interceptor(channel.clone(), bearer.clone()),
            ingest: IngestClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(coinflow_shared::limits::MAX_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(coinflow_shared::limits::MAX_GRPC_MESSAGE_BYTES),
            api,
            args,
        })
    }

    /// One sweep and reconciliation of the window ending now.
    async fn run_once(&mut self, out: &mut report::Out) -> Result<Report, RecoverError> {
        let window = Window::last(self.args.window);
        let mut report = Report {
            window_start: window.start,
            window_end: window.end,
            ..Report::default()
        };
        sweep::sweep(self, window, &mut report, out).await?;
        reconcile::reconcile(self, window, &mut report, out).await?;
        out.summary(&report)?;
        tracing::info!(
            deliveries = report.deliveries,
            events = report.events,
            already_recorded = report.already_recorded,
            resent = report.resent,
            recorded_directly = report.recorded_directly,
            payments = report.payments,
            discrepancies = report.discrepancies.len(),
            "recovery run finished"
        );
        Ok(report)
    }
}

/// Runs `recover` as `args` say: once (failing while discrepancies remain), or with
/// `--every` until `shutdown`.
pub async fn run(args: RecoverArgs, shutdown: CancellationToken) -> Result<(), RecoverError> {
    let every = args.every;
    let mut out = report::Out::open(args.log.as_deref())?;
    let mut recovery = Recovery::connect(args).await?;
    let Some(every) = every else {
        let report = recovery.run_once(&mut out).await?;
        report::print(&report);
        return match report.discrepancies.len() {
            0 => Ok(()),
            n => Err(RecoverError::Discrepancies(n)),
        };
    };
    let metrics = report::Metrics::new();
    report::serve_admin(recovery.args.admin_listen, shutdown.clone()).await?;
    loop {
        let started = SystemTime::now();
        match recovery.run_once(&mut out).await {
            Ok(report) => {
                report::print(&report);
                metrics.record(&report);
            }
            Err(e) => {
                tracing::error!(error = %e, "recovery run failed");
                metrics.failed();
                if matches!(e, RecoverError::Api(ApiError::Unauthorized { .. })) {
                    return Err(e);
                }
            }
        }
        let next = every.saturating_sub(started.elapsed().unwrap_or_default());
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(next) => {}
        }
    }
}
