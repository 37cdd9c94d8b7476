//! fulfillment-svc configuration: flags, each with a `FULFILLMENT_*` environment variable.
//! Tokens are secrets and never printed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use coinflow_shared::config::{SecretList, parse_secret_list};

use crate::lifecycle::ChargebackPolicy;

/// How to run fulfillment-svc.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// gRPC listen address (ingest, queries, health, reflection).
    #[arg(long, env = "FULFILLMENT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// The admin port: `/healthz`, `/readyz`, `/metrics`.
    #[arg(
        long,
        env = "FULFILLMENT_ADMIN_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    pub admin_listen: SocketAddr,
    /// The ledger database: `sqlite://path` (the embedded default, created if missing) or
    /// `postgres://user:pass@host/db` (shared by replicas).
    #[arg(
        long,
        env = "FULFILLMENT_DATABASE_URL",
        default_value = "sqlite://fulfillment.db",
        global = true
    )]
    pub database_url: String,
    /// Apply pending PostgreSQL migrations at start (single replica). With several
    /// replicas, run `fulfillment-svc migrate` once instead. SQLite always migrates.
    #[arg(long, env = "FULFILLMENT_MIGRATE_ON_START")]
    pub migrate_on_start: bool,
    /// The catalog file (TOML) mapping `webhookInfo` items to grants.
    #[arg(long, env = "FULFILLMENT_CATALOG", default_value = "catalog.toml")]
    pub catalog: PathBuf,
    /// How often to check the catalog file for changes, in seconds (SIGHUP reloads at once).
    #[arg(long, env = "FULFILLMENT_CATALOG_RELOAD_SECS", default_value_t = 5)]
    pub catalog_reload_secs: u64,
    /// What an open chargeback does to a grant.
    #[arg(
        long,
        env = "FULFILLMENT_CHARGEBACK_POLICY",
        value_enum,
        default_value_t
    )]
    pub chargeback_policy: ChargebackPolicy,
    /// Bearer tokens accepted on the query API, comma-separated (several for rotation).
    #[arg(long, env = "FULFILLMENT_API_TOKENS", value_parser = parse_secret_list, hide_env_values = true, default_value = "")]
    pub api_tokens: SecretList,
    /// Bearer tokens accepted on ingest (the edge's); when empty, the API tokens are.
    #[arg(long, env = "FULFILLMENT_INGEST_TOKENS", value_parser = parse_secret_list, hide_env_values = true, default_value = "")]
    pub ingest_tokens: SecretList,
    /// Serve without bearer tokens (local development only).
    #[arg(long, env = "FULFILLMENT_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// How long in-flight calls may take to finish after SIGTERM, in seconds.
    #[arg(long, env = "FULFILLMENT_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

impl Config {
    /// Defaults for `database_url` and `catalog`, on a port the OS picks, authenticating
    /// callers with `api_token`; for tests and tools.
    pub fn local(database_url: String, catalog: PathBuf, api_token: &str) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url,
            migrate_on_start: true,
            catalog,
            catalog_reload_secs: 5,
            chargeback_policy: ChargebackPolicy::default(),
            api_tokens: parse_secret_list(api_token).unwrap_or_default(),
            ingest_tokens: SecretList::default(),
            allow_unauthenticated: false,
            shutdown_grace_secs: 5,
        }
    }

    /// The shutdown grace as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
