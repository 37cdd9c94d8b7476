//! The fulfillment-svc binary: serve (the default), the operator CLI, and `recover`.

use clap::{Parser, Subcommand};
use coinflow_shared::config::LogFormat;
use coinflow_shared::proto::v1::payer::Id as PayerId;
use coinflow_shared::telemetry::Telemetry;
use fulfillment_svc::catalog::Catalog;
use fulfillment_svc::cli::{self, HeldCommand, Output, Target};
use fulfillment_svc::recover::{self, RecoverArgs};
use fulfillment_svc::store::sql::{SqlStore, redact};
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
    /// Apply pending database migrations and exit (a Kubernetes Job before a rollout).
    Migrate,
    /// Validate a catalog file and exit; errors name the bad entry.
    CheckCatalog {
        /// The catalog file.
        path: std::path::PathBuf,
    },
    /// The review queue: list, approve or reject held payments.
    Held {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: Output,
        #[command(subcommand)]
        command: HeldCommand,
    },
    /// Show a payment: state, events and ledger entries.
    Payment {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: Output,
        /// The payment id.
        payment_id: String,
    },
    /// Bring in what Coinflow stopped retrying (its delivery log: resend, or record
    /// directly) and report what the ledger does not reflect (its payments, refunds and
    /// chargebacks). Exits non-zero while discrepancies remain.
    Recover(Box<RecoverArgs>),
    /// Show a payer's net entitlements (or say it has none).
    Entitlements {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        output: Output,
        /// By wallet.
        #[arg(long, conflicts_with = "user", required_unless_present = "user")]
        wallet: Option<String>,
        /// By the merchant's user id (rawCustomerId).
        #[arg(long)]
        user: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let telemetry = Telemetry::init("fulfillment-svc", cli.log_format, "info,sqlx=warn")?;
            let result = serve(cli.config).await;
            if let Err(e) = &result {
                tracing::error!(error = format!("{e:#}"), "fulfillment-svc failed");
            }
            telemetry.shutdown();
            result?;
        }
        Command::Migrate => {
            SqlStore::migrate(&cli.config.database_url).await?;
            eprintln!("{}: migrations applied", redact(&cli.config.database_url));
        }
        Command::CheckCatalog { path } => {
            let catalog = Catalog::load(&path)?;
            eprintln!(
                "{}: valid (version {}, {} items)",
                path.display(),
                catalog.version,
                catalog.items.len()
            );
        }
        Command::Recover(args) => {
            let telemetry =
                Telemetry::init("fulfillment-recover", cli.log_format, "info,sqlx=warn")?;
            let shutdown = CancellationToken::new();
            tokio::spawn(coinflow_shared::shutdown::on_signal(shutdown.clone()));
            let result = recover::run(*args, shutdown).await;
            telemetry.shutdown();
            result?;
        }
        Command::Held {
            target,
            output,
            command,
        } => cli::held(&target, output, command).await?,
        Command::Payment {
            target,
            output,
            payment_id,
        } => cli::payment(&target, output, payment_id).await?,
        Command::Entitlements {
            target,
            output,
            wallet,
            user,
        } => {
            let payer = match (wallet, user) {
                (Some(w), _) => PayerId::Wallet(w),
                (None, Some(u)) => PayerId::RawCustomerId(u),
                (None, None) => anyhow::bail!("pass --wallet or --user"),
            };
            cli::entitlements(&target, output, payer).await?;
        }
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = Server::build(config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(coinflow_shared::shutdown::on_signal(shutdown.clone()));
    server.run(shutdown).await?;
    Ok(())
}
