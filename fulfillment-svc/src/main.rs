//! The fulfillment-svc binary: parse flags, install logging, serve until SIGTERM.

use anyhow::Context;
use clap::{Parser, Subcommand};
use coinflow_shared::config::LogFormat;
use fulfillment_svc::catalog::Catalog;
use fulfillment_svc::{Config, Server};
use tokio_util::sync::CancellationToken;

/// Applies Coinflow payments to a durable grant ledger and serves it over gRPC.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Validate a catalog file and exit; errors name the bad entry.
    CheckCatalog {
        /// The catalog file.
        path: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing::subscriber::set_global_default(coinflow_shared::telemetry::subscriber(
        cli.log_format,
        "info,sqlx=warn",
    ))
    .context("installing the log subscriber")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckCatalog { path } => {
            let catalog = Catalog::load(&path)?;
            tracing::info!(version = %catalog.version, items = catalog.items.len(), "catalog is valid");
            Ok(())
        }
        Command::Serve => {
            let server = Server::build(cli.config).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(coinflow_shared::shutdown::on_signal(shutdown.clone()));
            server.run(shutdown).await?;
            Ok(())
        }
    }
}
