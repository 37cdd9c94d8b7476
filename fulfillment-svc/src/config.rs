//! fulfillment-svc configuration: flags, each with a `FULFILLMENT_*` environment variable.
//! Tokens and the database URL are secrets and never printed (not even by `--help`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use coinflow_shared::config::{SecretList, parse_secret_list};
use secrecy::{ExposeSecret, SecretString};

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
        hide_env_values = true,
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
    /// Tokens of the **ingest** role (the edge, and any route's own caller: `Ingest.*`
    /// only), comma-separated for rotation. Required unless --allow-unauthenticated.
    #[arg(long, env = "FULFILLMENT_INGEST_TOKENS", value_parser = parse_secret_list, hide_env_values = true, default_value = "")]
    pub ingest_tokens: SecretList,
    /// Tokens of the **query** role (game servers, tools: entitlements, payments, the
    /// ledger, Consume), comma-separated.
    #[arg(long, env = "FULFILLMENT_API_TOKENS", value_parser = parse_secret_list, hide_env_values = true, default_value = "")]
    pub api_tokens: SecretList,
    /// Tokens of the **operator** role (support staff: ListHeld, ResolveHeld), each
    /// `name:token`, comma-separated; the ledger records the name.
    #[arg(long, env = "FULFILLMENT_OPERATOR_TOKENS", value_parser = parse_secret_list, hide_env_values = true, default_value = "")]
    pub operator_tokens: SecretList,
    /// Tokens of the **recovery** role (`fulfillment-svc recover`: looks up events and
    /// payments, and records what Coinflow stopped retrying, marked recovered).
    #[arg(long, env = "FULFILLMENT_RECOVERY_TOKENS", value_parser = parse_secret_list, hide_env_values = true, default_value = "")]
    pub recovery_tokens: SecretList,
    /// Serve without checking any token (local development only; refused when tokens are
    /// configured).
    #[arg(long, env = "FULFILLMENT_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// `WatchEntitlements` streams served at once by this process; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "FULFILLMENT_MAX_WATCH_STREAMS", default_value_t = 256)]
    pub max_watch_streams: usize,
    /// How long one call may take before it is answered DEADLINE_EXCEEDED, in seconds
    /// (streams are bounded by their own limit, not this).
    #[arg(long, env = "FULFILLMENT_REQUEST_TIMEOUT_SECS", default_value_t = 10)]
    pub request_timeout_secs: u64,
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
            operator_tokens: SecretList::default(),
            recovery_tokens: SecretList::default(),
            allow_unauthenticated: false,
            max_watch_streams: 256,
            request_timeout_secs: 10,
            shutdown_grace_secs: 5,
        }
    }

    /// The operator tokens as `(name, token)`. The error names the entry by position,
    /// never its text, which holds a secret.
    pub fn operators(&self) -> Result<Vec<(String, SecretString)>, String> {
        self.operator_tokens
            .0
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let (name, token) = entry.expose_secret().split_once(':').ok_or_else(|| {
                    format!(
                        "FULFILLMENT_OPERATOR_TOKENS entry {}: expected name:token",
                        i + 1
                    )
                })?;
                let name = name.trim();
                let valid = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
                if !valid {
                    return Err(format!(
                        "FULFILLMENT_OPERATOR_TOKENS entry {}: the name must be 1-64 of \
                         A-Z a-z 0-9 . _ @ -",
                        i + 1
                    ));
                }
                if token.trim().is_empty() {
                    return Err(format!(
                        "FULFILLMENT_OPERATOR_TOKENS entry {} ({name}): the token is empty",
                        i + 1
                    ));
                }
                Ok((name.to_owned(), SecretString::from(token.trim())))
            })
            .collect()
    }

    /// The shutdown grace as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}
