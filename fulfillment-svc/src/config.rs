//! fulfillment-svc configuration: flags, each with a `FULFILLMENT_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How to run fulfillment-svc.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// gRPC listen address (ingest, queries, health, reflection).
    #[arg(long, env = "FULFILLMENT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// The ledger database. `sqlite://path` (created if missing) is the embedded default.
    #[arg(
        long,
        env = "FULFILLMENT_DATABASE_URL",
        default_value = "sqlite://fulfillment.db"
    )]
    pub database_url: String,
    /// The catalog file (TOML) mapping `webhookInfo` items to grants.
    #[arg(long, env = "FULFILLMENT_CATALOG", default_value = "catalog.toml")]
    pub catalog: PathBuf,
    /// How long in-flight calls may take to finish after SIGTERM, in seconds.
    #[arg(long, env = "FULFILLMENT_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

impl Config {
    /// The shutdown grace as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
