//! Assembles and runs the gRPC server: build with config → bound address → run until
//! shutdown. Tests spawn it on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use coinflow_shared::proto::FILE_DESCRIPTOR_SET;
use coinflow_shared::proto::v1::fulfillment_server::FulfillmentServer;
use coinflow_shared::proto::v1::ingest_server::IngestServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;

use crate::catalog::{CatalogError, CatalogHandle};
use crate::config::Config;
use crate::grpc::auth::BearerAuth;
use crate::grpc::ingest::IngestService;
use crate::grpc::query::QueryService;
use crate::lifecycle::ChargebackPolicy;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The catalog is missing or invalid.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No bearer tokens, and unauthenticated serving was not asked for.
    #[error(
        "no API tokens: set FULFILLMENT_API_TOKENS (comma-separated), or pass \
         --allow-unauthenticated for local development"
    )]
    NoTokens,
    /// The database URL names no supported backend.
    #[error("unsupported database URL {0:?}: expected sqlite://<path>")]
    UnsupportedDatabase(String),
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
pub async fn open_store(url: &str, policy: ChargebackPolicy) -> Result<Arc<dyn Store>, StartError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url, policy).await?))
    } else {
        Err(StartError::UnsupportedDatabase(url.to_owned()))
    }
}

/// A fulfillment server, bound and ready to run.
pub struct Server {
    listener: TcpListener,
    store: Arc<dyn Store>,
    catalog: Arc<CatalogHandle>,
    config: Config,
}

impl Server {
    /// Loads the catalog, opens and migrates the database, and binds the listener.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        if config.api_tokens.0.is_empty() && !config.allow_unauthenticated {
            return Err(StartError::NoTokens);
        }
        let catalog = Arc::new(CatalogHandle::load(&config.catalog)?);
        let store = open_store(&config.database_url, config.chargeback_policy).await?;
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
            authenticated = !config.api_tokens.0.is_empty(),
            "catalog loaded"
        );
        Ok(Self {
            listener,
            store,
            catalog,
            config,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// Serves until `shutdown` is cancelled, then reports NOT_SERVING, stops accepting,
    /// and lets in-flight calls finish for at most the configured grace.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let addr = self.local_addr();
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

        let api_auth = BearerAuth::new(self.config.api_tokens.0.clone());
        let ingest_auth = BearerAuth::new(if self.config.ingest_tokens.0.is_empty() {
            self.config.api_tokens.0.clone()
        } else {
            self.config.ingest_tokens.0.clone()
        });
        tokio::spawn(Arc::clone(&self.catalog).watch(
            Duration::from_secs(self.config.catalog_reload_secs.max(1)),
            shutdown.clone(),
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
        let serve = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(IngestServer::with_interceptor(
                IngestService::new(Arc::clone(&self.store), Arc::clone(&self.catalog)),
                ingest_auth,
            ))
            .add_service(FulfillmentServer::with_interceptor(
                QueryService::new(
                    Arc::clone(&self.store),
                    Arc::clone(&self.catalog),
                    shutdown.clone(),
                ),
                api_auth,
            ))
            .serve_with_incoming_shutdown(TcpIncoming::from(self.listener), draining);
        tracing::info!(%addr, "fulfillment-svc listening");

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

async fn set_all(health: &HealthReporter, status: tonic_health::ServingStatus) {
    for service in [
        "",
        "coinflow.fulfillment.v1.Ingest",
        "coinflow.fulfillment.v1.Fulfillment",
    ] {
        health.set_service_status(service, status).await;
    }
}
