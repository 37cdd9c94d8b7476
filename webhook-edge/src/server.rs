//! Assembles the edge: build with config → bound addresses → run until shutdown. Tests
//! spawn it on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::readiness;
use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::observe::{Metrics, ObserveLayer};
use crate::routes::{self, RouteConfig, Router, RoutesError};
use crate::stack::{Limits, webhook_service};
use crate::webhook::Webhook;
use coinflow_shared::http_server::serve;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A route is invalid.
    #[error(transparent)]
    Routes(#[from] RoutesError),
    /// A listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The edge, bound and ready to run.
pub struct Edge {
    listener: TcpListener,
    admin_listener: TcpListener,
    webhook: Arc<Webhook>,
    config: Config,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

impl Edge {
    /// Validates `config` and binds both listeners.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let routes = match &config.routes_file {
            Some(path) => {
                if config.ingest_token.is_some() {
                    tracing::warn!(
                        "EDGE_INGEST_TOKEN is ignored: with EDGE_ROUTES_FILE each route names \
                         its own token (token_env or token_file)"
                    );
                }
                routes::load(path)?
            }
            None => vec![RouteConfig::fulfillment(
                config.fulfillment_url.clone(),
                config.ingest_token.clone(),
            )],
        };
        let router = Router::new(
            &routes,
            Config::ms(config.deliver_deadline_ms),
            Duration::from_secs(config.resolve_interval_secs.max(1)),
            Arc::clone(&metrics),
        )?;
        let webhook = Arc::new(Webhook {
            path: config.path.clone(),
            body_limit: config.body_limit_bytes,
            auth: Authenticator::new(
                config.keys.0.clone(),
                config.auth_mode,
                config.signature_tolerance_secs,
            ),
            router,
            retry_after_secs: config.retry_after_secs,
            metrics,
        });
        let listener = bind(config.listen).await?;
        let admin_listener = bind(config.admin_listen).await?;
        Ok(Self {
            listener,
            admin_listener,
            webhook,
            config,
        })
    }

    /// Where webhooks are accepted.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// Where `/healthz` and `/readyz` are served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .unwrap_or(self.config.admin_listen)
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets in-flight
    /// requests finish for at most the configured grace.
    pub async fn run(self, shutdown: CancellationToken) {
        let c = &self.config;
        let limits = Limits {
            max_concurrency: c.max_concurrency,
            request_timeout: Config::ms(c.request_timeout_ms),
            body_timeout: Config::ms(c.body_timeout_ms),
            body_limit: c.body_limit_bytes,
            retry_after_secs: c.retry_after_secs,
        };
        let grace = Duration::from_secs(c.shutdown_grace_secs);
        let header_timeout = Config::ms(c.header_timeout_ms);
        tracing::info!(
            addr = %self.local_addr(),
            admin = %self.admin_addr(),
            path = %c.path,
            auth_mode = ?c.auth_mode,
            keys = c.keys.0.len(),
            "webhook-edge listening"
        );
        let admin = serve(
            self.admin_listener,
            coinflow_shared::admin::service(readiness(
                self.webhook.router.primary().clone(),
                shutdown.clone(),
            )),
            header_timeout,
            shutdown.clone(),
            Duration::from_secs(1),
        );
        let webhooks = serve(
            self.listener,
            webhook_service(
                Arc::clone(&self.webhook),
                limits,
                ObserveLayer::new(&c.path, Arc::clone(&self.webhook.metrics)),
            ),
            header_timeout,
            shutdown,
            grace,
        );
        tokio::join!(admin, webhooks);
    }
}
