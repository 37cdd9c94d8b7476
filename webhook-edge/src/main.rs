//! The webhook-edge binary: parse flags, install logging, serve until SIGTERM.

use anyhow::Context;
use clap::Parser;
use coinflow_shared::config::LogFormat;
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
    tracing::subscriber::set_global_default(coinflow_shared::telemetry::subscriber(
        cli.log_format,
        "info",
    ))
    .context("installing the log subscriber")?;
    let edge = Edge::build(cli.config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(coinflow_shared::shutdown::on_signal(shutdown.clone()));
    edge.run(shutdown).await;
    Ok(())
}
