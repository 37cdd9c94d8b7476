//! `coinflow-sender`: deliver webhook bodies the way Coinflow does.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use coinflow_sender::deliver::{Sender, Target};
use coinflow_sender::generate::{Traffic, generate};
use coinflow_sender::schedule::ATTEMPTS;
use coinflow_sender::standin::{Coinflow, StandinConfig};
use secrecy::SecretString;

/// Deliver Coinflow v2 webhooks: signed, retried on Coinflow's schedule, measured.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    #[command(flatten)]
    delivery: Delivery,
}

#[derive(Args)]
struct Delivery {
    /// The webhook URL.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:8080/webhooks/coinflow"
    )]
    url: String,
    /// The Validation Key.
    #[arg(
        long,
        global = true,
        env = "COINFLOW_WEBHOOK_KEY",
        hide_env_values = true,
        default_value = "cf_whk_test_0123456789abcdef"
    )]
    key: SecretString,
    /// Also send `Authorization: <key>`.
    #[arg(long, global = true)]
    authorization: bool,
    /// Divide every retry wait by this (1: Coinflow's real ~17 h schedule).
    #[arg(long, global = true, default_value_t = 1.0)]
    compress: f64,
    /// Attempts per delivery.
    #[arg(long, global = true, default_value_t = ATTEMPTS)]
    attempts: usize,
    /// Closed loop: this many deliveries in flight.
    #[arg(long, global = true, default_value_t = 32, conflicts_with = "rate")]
    concurrency: usize,
    /// Open loop: start this many deliveries per second.
    #[arg(long, global = true)]
    rate: Option<f64>,
    /// Append one JSON line per delivery here.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Mode {
    /// Deliver the JSON bodies in these files and folders (exact bytes).
    Replay {
        /// Files or folders of `.json` bodies.
        paths: Vec<PathBuf>,
    },
    /// Generate realistic traffic.
    Generate {
        /// Distinct payments.
        #[arg(long, default_value_t = 1000)]
        payments: usize,
        /// Chance that a delivery is duplicated later.
        #[arg(long, default_value_t = 0.1)]
        duplicates: f64,
        /// Chance that a payment's events arrive out of order.
        #[arg(long, default_value_t = 0.1)]
        reorder: f64,
        /// Payment id prefix.
        #[arg(long, default_value = "gen")]
        prefix: String,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Stand in for Coinflow: generate payments, deliver their webhooks logging every
    /// attempt, and serve Coinflow's merchant API (delivery log, resend, payments, refunds,
    /// chargebacks) until Ctrl-C. Prints one JSON line with the API's address first.
    Coinflow(CoinflowArgs),
}

#[derive(Args)]
struct CoinflowArgs {
    /// Distinct payments.
    #[arg(long, default_value_t = 100)]
    payments: usize,
    /// Where the merchant API listens (port 0: any free port; the line printed says which).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The environment variable holding the merchant API key the API accepts.
    #[arg(long, default_value = "COINFLOW_API_KEY")]
    api_key_env: String,
    /// The share of API requests answered 429 (`Retry-After: 0`) or 503 instead.
    #[arg(long, default_value_t = 0.0)]
    api_error_rate: f64,
    /// Event types never delivered, comma-separated (their payments are still listed).
    #[arg(long, value_delimiter = ',')]
    unsubscribed: Vec<String>,
    /// Chance that a delivery is duplicated later.
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Chance that a payment's events arrive out of order.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Payment id prefix.
    #[arg(long, default_value = "cf")]
    prefix: String,
    /// Seed of the traffic and of the injected API errors.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Exit once every event is delivered instead of serving the API until Ctrl-C.
    #[arg(long)]
    exit_when_delivered: bool,
}

async fn coinflow(d: &Delivery, args: &CoinflowArgs) -> anyhow::Result<()> {
    if d.log.is_some() || d.rate.is_some() {
        anyhow::bail!(
            "`coinflow` takes neither --log nor --rate: it delivers in a closed loop and serves \
             its log of every attempt at GET /merchant/webhooks"
        );
    }
    if !(0.0..1.0).contains(&args.api_error_rate) {
        anyhow::bail!("--api-error-rate must be at least 0 and below 1");
    }
    let api_key = std::env::var(&args.api_key_env).map_err(|_| {
        anyhow::anyhow!(
            "set {} to the merchant API key the stand-in should accept",
            args.api_key_env
        )
    })?;
    let mut config = StandinConfig::local(
        d.url.clone(),
        d.key.clone(),
        SecretString::from(api_key),
        args.payments,
    );
    config.traffic = Traffic {
        payments: args.payments,
        duplicate_ratio: args.duplicates,
        reorder_ratio: args.reorder,
        prefix: args.prefix.clone(),
        seed: args.seed,
    };
    config.target.authorization = d.authorization;
    config.target.compress = d.compress;
    config.target.attempts = d.attempts;
    config.concurrency = d.concurrency;
    config.listen = args.listen;
    config.api_error_rate = args.api_error_rate;
    config.api_error_seed = args.seed;
    config.unsubscribed = args.unsubscribed.clone();
    let standin = Coinflow::start(config)
        .await
        .with_context(|| format!("binding the merchant API on {}", args.listen))?;
    println!(
        "{}",
        serde_json::json!({
            "coinflow_api": standin.api_url(),
            "webhook_url": d.url,
            "payments": standin.payments().len(),
            "events": standin.subscribed_bodies().len(),
            "unsubscribed": args.unsubscribed,
        })
    );
    eprintln!(
        "merchant API on {}; delivering {} events to {}",
        standin.api_url(),
        standin.subscribed_bodies().len(),
        d.url
    );
    standin.deliver().await;
    let report = standin.report();
    eprintln!("{report}");
    println!("{}", serde_json::json!({ "delivered": report }));
    if !args.exit_when_delivered {
        eprintln!("serving the merchant API until Ctrl-C");
        let stop = tokio_util::sync::CancellationToken::new();
        coinflow_shared::shutdown::on_signal(stop.clone()).await;
    }
    standin.stop().await;
    Ok(())
}

fn bodies_in(paths: &[PathBuf]) -> anyhow::Result<Vec<Bytes>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    files
        .iter()
        .map(|f| {
            std::fs::read(f)
                .map(Bytes::from)
                .with_context(|| format!("reading {}", f.display()))
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bodies = match &cli.mode {
        Mode::Coinflow(args) => return coinflow(&cli.delivery, args).await,
        Mode::Replay { paths } => bodies_in(paths)?,
        Mode::Generate {
            payments,
            duplicates,
            reorder,
            prefix,
            seed,
        } => generate(&Traffic {
            payments: *payments,
            duplicate_ratio: *duplicates,
            reorder_ratio: *reorder,
            prefix: prefix.clone(),
            seed: *seed,
        }),
    };
    let d = &cli.delivery;
    let log = d
        .log
        .as_ref()
        .map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))
        })
        .transpose()?;
    let sender = Sender::new(
        Target {
            url: d.url.clone(),
            key: d.key.clone(),
            authorization: d.authorization,
            compress: d.compress,
            attempts: d.attempts,
        },
        log,
    );
    eprintln!("delivering {} bodies to {}", bodies.len(), d.url);
    let progress = sender.progress("delivered", bodies.len());
    match d.rate {
        Some(rate) => sender.open_loop(bodies, rate).await,
        None => sender.closed_loop(bodies, d.concurrency).await,
    };
    progress.finish().await;
    let report = sender.report();
    println!("{report}");
    println!("{}", serde_json::to_string(&report)?);
    if report.gave_up > 0 {
        anyhow::bail!("{} deliveries were never acked", report.gave_up);
    }
    Ok(())
}
