//! The webhook-edge binary: parse flags, start telemetry, serve until SIGTERM, flush.

use clap::Parser;
use coinflow_shared::config::LogFormat;
use coinflow_shared::telemetry::Telemetry;
use tokio_util::sync::CancellationToken;
use webhook_edge::{Config, Edge};

/// Receives Coinflow webhooks and hands them to fulfillment.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: Config,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = Telemetry::init("webhook-edge", cli.log_format, "info")?;
    let result = run(cli.config).await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "webhook-edge failed");
    }
    telemetry.shutdown();
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    let edge = Edge::build(config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(coinflow_shared::shutdown::on_signal(shutdown.clone()));
    edge.run(shutdown).await;
    Ok(())
}
