//! Assembles and runs the gRPC server: build with config → bound address → run until
//! shutdown. Tests spawn it on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use coinflow_shared::limits::MAX_GRPC_MESSAGE_BYTES;
use coinflow_shared::proto::FILE_DESCRIPTOR_SET;
use coinflow_shared::proto::v1::fulfillment_server::FulfillmentServer;
use coinflow_shared::proto::v1::ingest_server::IngestServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;

use crate::catalog::{CatalogError, CatalogHandle};
use crate::config::Config;
use crate::grpc::auth::{AuthLayer, Credentials, CredentialsError};
use crate::grpc::ingest::IngestService;
use crate::grpc::query::QueryService;
use crate::lifecycle::ChargebackPolicy;
use crate::observe::{Metrics, ObserveLayer};
use crate::store::sql::{Backend, Migrations, SqlStore};
use crate::store::{Store, StoreError};
use coinflow_shared::admin::Readiness;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The catalog is missing or invalid.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The credentials of the roles are missing or inconsistent.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// A credential setting does not parse; the message never holds its value.
    #[error("{0}")]
    BadCredential(String),
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// Reflection could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Opens the storage backend that `url`'s scheme names.
///
/// SQLite is migrated at every start (one process owns the file). PostgreSQL is migrated
/// by the `migrate` subcommand (a Kubernetes Job) and only required to be current at
/// start, unless `migrate_on_start` is set (the single-pod case).
pub async fn open_store(
    url: &str,
    policy: ChargebackPolicy,
    migrate_on_start: bool,
) -> Result<Arc<dyn Store>, StartError> {
    let migrations = match Backend::of(url)? {
        Backend::Sqlite => Migrations::Apply,
        Backend::Postgres if migrate_on_start => Migrations::Apply,
        Backend::Postgres => Migrations::Require,
    };
    Ok(Arc::new(SqlStore::open(url, policy, migrations).await?))
}

/// Concurrent calls (HTTP/2 streams) one connection may have open: the edge keeps at
/// most a few `DeliverBatch` calls in flight per endpoint, so this only bounds a
/// misbehaving client.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// A fulfillment server, bound and ready to run.
pub struct Server {
    listener: TcpListener,
    admin_listener: TcpListener,
    store: Arc<dyn Store>,
    catalog: Arc<CatalogHandle>,
    credentials: Arc<Credentials>,
    config: Config,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Loads the catalog, opens and migrates the database, and binds the listener.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let credentials = Arc::new(Credentials::new(
            &config.ingest_tokens.0,
            &config.api_tokens.0,
            &config.operators().map_err(StartError::BadCredential)?,
            &config.recovery_tokens.0,
            config.allow_unauthenticated,
        )?);
        let catalog = Arc::new(CatalogHandle::load(&config.catalog)?);
        let store = open_store(
            &config.database_url,
            config.chargeback_policy,
            config.migrate_on_start,
        )
        .await?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let current = catalog.current();
        tracing::info!(
            catalog_version = %current.version,
            items = current.items.len(),
            chargeback_policy = ?config.chargeback_policy,
            authenticated = credentials.authenticated(),
            "catalog loaded"
        );
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.admin_listen,
                source,
            })?;
        Ok(Self {
            listener,
            admin_listener,
            store,
            catalog,
            credentials,
            config,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// The bound admin address: `/healthz`, `/readyz`, `/metrics`.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .unwrap_or(self.config.admin_listen)
    }

    /// Serves until `shutdown` is cancelled, then reports NOT_SERVING, stops accepting,
    /// and lets in-flight calls finish for at most the configured grace.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let (addr, admin_addr) = (self.local_addr(), self.admin_addr());
        let (health, health_service) = tonic_health::server::health_reporter();
        set_all(&health, tonic_health::ServingStatus::Serving).await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        tokio::spawn(Arc::clone(&self.catalog).watch(
            Duration::from_secs(self.config.catalog_reload_secs.max(1)),
            shutdown.clone(),
        ));
        tokio::spawn(refresh_queue(
            Arc::clone(&self.store),
            Arc::clone(&self.metrics),
            shutdown.clone(),
        ));
        tokio::spawn(coinflow_shared::http_server::serve(
            self.admin_listener,
            coinflow_shared::admin::service(readiness(Arc::clone(&self.store), shutdown.clone())),
            Duration::from_secs(5),
            shutdown.clone(),
            Duration::from_secs(1),
        ));
        let signal = shutdown.clone();
        let draining = {
            let health = health.clone();
            async move {
                signal.cancelled().await;
                set_all(&health, tonic_health::ServingStatus::NotServing).await;
                tracing::info!("shutting down: draining in-flight calls");
            }
        };
        // Observe outermost, so refused calls are counted too; then auth, before any service.
        let layers = tower::ServiceBuilder::new()
            .layer(ObserveLayer::new(Arc::clone(&self.metrics)))
            .layer(AuthLayer::new(Arc::clone(&self.credentials)))
            .into_inner();
        let serve = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .timeout(Duration::from_secs(self.config.request_timeout_secs.max(1)))
            .layer(layers)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                IngestServer::new(IngestService::new(
                    Arc::clone(&self.store),
                    Arc::clone(&self.catalog),
                    Arc::clone(&self.metrics),
                ))
                .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES),
            )
            .add_service(FulfillmentServer::new(QueryService::new(
                Arc::clone(&self.store),
                Arc::clone(&self.catalog),
                shutdown.clone(),
                Arc::clone(&self.metrics),
                self.config.max_watch_streams,
            )))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.listener).with_nodelay(Some(true)),
                draining,
            );
        tracing::info!(%addr, admin = %admin_addr, "fulfillment-svc listening");

        let grace = self.config.shutdown_grace();
        tokio::select! {
            result = serve => result?,
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "shutdown grace elapsed with calls still in flight");
            }
        }
        Ok(())
    }
}

/// Ready while not shutting down and the database answers.
fn readiness(store: Arc<dyn Store>, shutdown: CancellationToken) -> Readiness {
    Arc::new(move || {
        let (store, shutdown) = (Arc::clone(&store), shutdown.clone());
        Box::pin(async move {
            if shutdown.is_cancelled() {
                return Err("shutting down".to_owned());
            }
            store.ping().await.map_err(|e| e.to_string())
        })
    })
}

/// How often the review-queue gauges are refreshed.
const QUEUE_REFRESH: Duration = Duration::from_secs(2);

async fn refresh_queue(store: Arc<dyn Store>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        match store.held_summary().await {
            Ok((size, oldest)) => {
                metrics.queue.size.store(size, Ordering::Relaxed);
                metrics
                    .queue
                    .oldest_us
                    .store(oldest.unwrap_or(0), Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "measuring the review queue"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(QUEUE_REFRESH) => {}
        }
    }
}

async fn set_all(health: &HealthReporter, status: tonic_health::ServingStatus) {
    for service in [
        "",
        "coinflow.fulfillment.v1.Ingest",
        "coinflow.fulfillment.v1.Fulfillment",
    ] {
        health.set_service_status(service, status).await;
    }
}
