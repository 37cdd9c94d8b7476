//! webhook-edge configuration: flags, each with an `EDGE_*` environment variable. The
//! validation keys come from `COINFLOW_WEBHOOK_KEYS` and are never printed.

use std::net::SocketAddr;
use std::time::Duration;

use coinflow_shared::config::{SecretList, parse_secret_list};
use coinflow_shared::limits::MAX_BODY_BYTES;

use crate::auth::AuthMode;

/// How to run webhook-edge.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Where Coinflow's webhooks arrive.
    #[arg(long, env = "EDGE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The admin port: `/healthz`, `/readyz`.
    #[arg(long, env = "EDGE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// The webhook path configured in Coinflow's dashboard.
    #[arg(long, env = "EDGE_PATH", default_value = "/webhooks/coinflow")]
    pub path: String,
    /// The fulfillment route's endpoints: comma-separated `http://host:port` URLs, or
    /// `dns://host:port` re-resolved periodically (a Kubernetes headless Service).
    #[arg(
        long,
        env = "EDGE_FULFILLMENT_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub fulfillment_url: String,
    /// A TOML file of routes (fan-out); replaces the single fulfillment route.
    #[arg(long, env = "EDGE_ROUTES_FILE")]
    pub routes_file: Option<std::path::PathBuf>,
    /// How often `dns://` endpoints are re-resolved, in seconds.
    #[arg(long, env = "EDGE_RESOLVE_INTERVAL_SECS", default_value_t = 5)]
    pub resolve_interval_secs: u64,
    /// The bearer token fulfillment's ingest expects (FULFILLMENT_INGEST_TOKENS), for the
    /// default route only: each route of a routes file names its own.
    #[arg(long, env = "EDGE_INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<secrecy::SecretString>,
    /// Active Webhook Validation Keys, comma-separated (several during rotation).
    #[arg(
        long,
        env = "COINFLOW_WEBHOOK_KEYS",
        value_parser = parse_secret_list,
        hide_env_values = true,
        required = true
    )]
    pub keys: SecretList,
    /// Which credentials a delivery must carry.
    #[arg(long, env = "EDGE_AUTH_MODE", value_enum, default_value_t)]
    pub auth_mode: AuthMode,
    /// How far `Coinflow-Signature`'s `t` may be from now, in seconds.
    #[arg(long, env = "EDGE_SIGNATURE_TOLERANCE_SECS", default_value_t = 300)]
    pub signature_tolerance_secs: i64,
    /// The largest body accepted, in bytes (at most 1 MiB; real events are a few KiB).
    #[arg(long, env = "EDGE_BODY_LIMIT_BYTES", default_value_t = 256 * 1024)]
    pub body_limit_bytes: usize,
    /// The budget for fulfillment's ack, retries included, in milliseconds.
    #[arg(long, env = "EDGE_DELIVER_DEADLINE_MS", default_value_t = 2500)]
    pub deliver_deadline_ms: u64,
    /// How long a client may take to send its headers, in milliseconds.
    #[arg(long, env = "EDGE_HEADER_TIMEOUT_MS", default_value_t = 5000)]
    pub header_timeout_ms: u64,
    /// How long a client may take to send its body, in milliseconds.
    #[arg(long, env = "EDGE_BODY_TIMEOUT_MS", default_value_t = 2000)]
    pub body_timeout_ms: u64,
    /// The most a whole request may take before 503, in milliseconds (Coinflow waits 5 s).
    #[arg(long, env = "EDGE_REQUEST_TIMEOUT_MS", default_value_t = 4500)]
    pub request_timeout_ms: u64,
    /// Requests handled at once; more are shed with 503 at once. Each one in flight holds
    /// about 64 KiB (its connection's buffers, the body, the encoded gRPC request), so the
    /// default bounds the edge near 20 MiB under overload while leaving several times the
    /// in-flight count a 2-core pipeline sustains (BENCHMARKS.md).
    #[arg(long, env = "EDGE_MAX_CONCURRENCY", default_value_t = 128)]
    pub max_concurrency: usize,
    /// The `Retry-After` sent with 503, in seconds.
    #[arg(long, env = "EDGE_RETRY_AFTER_SECS", default_value_t = 5)]
    pub retry_after_secs: u64,
    /// How long in-flight requests may take to finish after SIGTERM, in seconds.
    #[arg(long, env = "EDGE_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,
}

/// Config problems found before start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No validation key.
    #[error("no validation key: set COINFLOW_WEBHOOK_KEYS (comma-separated)")]
    NoKeys,
    /// The path does not start with `/`.
    #[error("path {0:?} must start with '/'")]
    BadPath(String),
    /// A zero where a positive number is needed.
    #[error("{0} must be positive")]
    Zero(&'static str),
    /// A body limit above what both services agree on.
    #[error(
        "EDGE_BODY_LIMIT_BYTES is {0}, above the most the edge may accept ({MAX_BODY_BYTES} \
         bytes): a larger body could make an event that ingest refuses on every retry"
    )]
    BodyLimit(usize),
}

impl Config {
    /// Checks what clap's types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.keys.0.is_empty() {
            return Err(ConfigError::NoKeys);
        }
        if !self.path.starts_with('/') {
            return Err(ConfigError::BadPath(self.path.clone()));
        }
        for (name, v) in [
            ("body_limit_bytes", self.body_limit_bytes as u64),
            ("deliver_deadline_ms", self.deliver_deadline_ms),
            ("header_timeout_ms", self.header_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("max_concurrency", self.max_concurrency as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.body_limit_bytes > MAX_BODY_BYTES {
            return Err(ConfigError::BodyLimit(self.body_limit_bytes));
        }
        Ok(())
    }

    /// A config with the defaults, `keys`, and ports chosen by the OS; for tests and tools.
    pub fn local(keys: SecretList, fulfillment_url: String) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            path: "/webhooks/coinflow".into(),
            fulfillment_url,
            routes_file: None,
            resolve_interval_secs: 5,
            ingest_token: None,
            keys,
            auth_mode: AuthMode::default(),
            signature_tolerance_secs: 300,
            body_limit_bytes: 256 * 1024,
            deliver_deadline_ms: 2500,
            header_timeout_ms: 5000,
            body_timeout_ms: 2000,
            request_timeout_ms: 4500,
            max_concurrency: 128,
            retry_after_secs: 5,
            shutdown_grace_secs: 20,
        }
    }

    pub(crate) fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_limit_may_not_pass_the_shared_maximum() {
        let keys = parse_secret_list("k").unwrap();
        let mut config = Config::local(keys, "http://127.0.0.1:1".into());
        config.body_limit_bytes = MAX_BODY_BYTES;
        assert!(config.validate().is_ok());
        config.body_limit_bytes = MAX_BODY_BYTES + 1;
        let message = config.validate().unwrap_err().to_string();
        assert!(
            message.contains("EDGE_BODY_LIMIT_BYTES") && message.contains("1048576"),
            "{message}"
        );
    }
}
