//! The end-to-end harness: spawns the real services (in-process on `127.0.0.1:0`, or as
//! real processes that tests can `kill -9`), signs deliveries like Coinflow, and posts them
//! over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bodies;
pub mod db;
pub mod http;
pub mod model;
pub mod otlp;
pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use db::TestDb;

use coinflow_shared::config::{SecretList, parse_secret_list};
use coinflow_shared::proto::v1::fulfillment_client::FulfillmentClient;
use coinflow_shared::proto::v1::payer::Id as Payer;
use coinflow_shared::proto::v1::{GetEntitlementsRequest, GetPaymentRequest, Payment};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The validation key every test stack trusts.
pub const KEY: &str = "cf_whk_test_0123456789abcdef";
/// The bearer token of the query API in every test stack.
pub const API_TOKEN: &str = "test-api-token";
/// The bearer token the edge presents to ingest in every test stack.
pub const INGEST_TOKEN: &str = "test-ingest-token";
/// The operator every test stack knows, and their token (`FULFILLMENT_OPERATOR_TOKENS`).
pub const OPERATOR: &str = "tester";
/// See [`OPERATOR`].
pub const OPERATOR_TOKEN: &str = "test-operator-token";

/// The repo's `fixtures/` folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// The repo's example catalog.
pub fn catalog_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/catalog.example.toml")
}

/// `keys` as the edge's config type.
pub fn keys(keys: &[&str]) -> SecretList {
    parse_secret_list(&keys.join(",")).unwrap()
}

/// An in-process fulfillment-svc.
pub struct FulfillmentHandle {
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its admin address (`/metrics`).
    pub admin: SocketAddr,
    /// Cancel to shut it down.
    pub shutdown: CancellationToken,
    /// The serving task.
    pub task: JoinHandle<()>,
}

impl FulfillmentHandle {
    /// Starts one on `listen` over `db`.
    pub async fn start_on(db: &TestDb, listen: SocketAddr) -> Self {
        Self::start_with(db, |c| c.listen = listen).await
    }

    /// The test config for `db`: example catalog, test tokens, port 0.
    pub fn config(db: &TestDb) -> fulfillment_svc::Config {
        let mut config = fulfillment_svc::Config::local(db.url.clone(), catalog_path(), API_TOKEN);
        config.ingest_tokens = keys(&[INGEST_TOKEN]);
        config.operator_tokens = keys(&[&format!("{OPERATOR}:{OPERATOR_TOKEN}")]);
        config
    }

    /// Starts one over `db` with the test config as `tweak` adjusts it.
    pub async fn start_with(db: &TestDb, tweak: impl FnOnce(&mut fulfillment_svc::Config)) -> Self {
        let mut config = Self::config(db);
        tweak(&mut config);
        let server = fulfillment_svc::Server::build(config).await.unwrap();
        let (addr, admin) = (server.local_addr(), server.admin_addr());
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { server.run(token).await.unwrap() });
        Self {
            addr,
            admin,
            shutdown,
            task,
        }
    }

    /// Starts one on a free port over `db`.
    pub async fn start(db: &TestDb) -> Self {
        Self::start_on(db, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Stops it and waits until it has.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

/// An in-process webhook-edge.
pub struct EdgeHandle {
    /// Where webhooks go.
    pub addr: SocketAddr,
    /// `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    /// Cancel to shut it down.
    pub shutdown: CancellationToken,
    /// The serving task.
    pub task: JoinHandle<()>,
}

impl EdgeHandle {
    /// Starts an edge with `config`.
    pub async fn start(config: webhook_edge::Config) -> Self {
        let edge = webhook_edge::Edge::build(config).await.unwrap();
        let (addr, admin) = (edge.local_addr(), edge.admin_addr());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(edge.run(shutdown.clone()));
        Self {
            addr,
            admin,
            shutdown,
            task,
        }
    }

    /// The webhook URL.
    pub fn url(&self) -> String {
        format!("http://{}/webhooks/coinflow", self.addr)
    }
}

/// The default edge config for a fulfillment at `addr`.
pub fn edge_config(fulfillment: SocketAddr) -> webhook_edge::Config {
    let mut config = webhook_edge::Config::local(keys(&[KEY]), format!("http://{fulfillment}"));
    config.ingest_token = Some(INGEST_TOKEN.into());
    config
}

/// Both services on a fresh temp database.
pub struct Stack {
    /// The database.
    pub db: TestDb,
    /// Fulfillment.
    pub fulfillment: FulfillmentHandle,
    /// Edge.
    pub edge: EdgeHandle,
}

impl Stack {
    /// Starts fulfillment and an edge with default config.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts fulfillment and an edge whose config `tweak` adjusts.
    pub async fn start_with(tweak: impl FnOnce(&mut webhook_edge::Config)) -> Self {
        let db = TestDb::new().await;
        let fulfillment = FulfillmentHandle::start(&db).await;
        let mut config = edge_config(fulfillment.addr);
        tweak(&mut config);
        let edge = EdgeHandle::start(config).await;
        Self {
            db,
            fulfillment,
            edge,
        }
    }

    /// A query client to fulfillment.
    pub async fn query(&self) -> Query {
        Query::connect(self.fulfillment.addr).await
    }

    /// A client of the review queue, authenticated as [`OPERATOR`].
    pub async fn operator(&self) -> QueryClient {
        operator_client(self.fulfillment.addr).await
    }
}

/// Adds the test API token to every call.
pub type Bearer = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

fn bearer(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let value = format!("Bearer {API_TOKEN}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

fn operator_bearer(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let value = format!("Bearer {OPERATOR_TOKEN}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// A `Fulfillment` client at `addr` authenticated with [`OPERATOR_TOKEN`].
pub async fn operator_client(addr: SocketAddr) -> QueryClient {
    FulfillmentClient::with_interceptor(channel(addr).await, operator_bearer as Bearer)
}

fn ingest_bearer(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let value = format!("Bearer {INGEST_TOKEN}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// An ingest client authenticated as the edge.
pub type IngestClient = coinflow_shared::proto::v1::ingest_client::IngestClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

/// Connects an ingest client to `addr` with [`INGEST_TOKEN`].
pub async fn ingest_client(addr: SocketAddr) -> IngestClient {
    coinflow_shared::proto::v1::ingest_client::IngestClient::with_interceptor(
        channel(addr).await,
        ingest_bearer as Bearer,
    )
}

/// Delivers a raw body over gRPC the way the edge does (parse, convert, `Ingest.Deliver`).
pub async fn ingest(
    client: &mut IngestClient,
    body: &[u8],
) -> coinflow_shared::proto::v1::DeliverResponse {
    let envelope = coinflow_shared::envelope::Envelope::parse(body).unwrap();
    let event = coinflow_shared::convert::to_proto(
        envelope,
        bytes::Bytes::copy_from_slice(body),
        std::time::SystemTime::now(),
    );
    client
        .deliver(coinflow_shared::proto::v1::DeliverRequest { event: Some(event) })
        .await
        .unwrap()
        .into_inner()
}

/// An authenticated query client.
pub type QueryClient =
    FulfillmentClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A typed client of the query API, authenticated with [`API_TOKEN`].
pub struct Query(pub QueryClient);

impl Query {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Self {
        Self(FulfillmentClient::with_interceptor(
            channel(addr).await,
            bearer as Bearer,
        ))
    }

    /// Net entitlements of a wallet as (sku, quantity), sorted by sku.
    pub async fn wallet(&mut self, wallet: &str) -> Vec<(String, i64)> {
        self.entitlements(Payer::Wallet(wallet.into())).await
    }

    /// Net entitlements by payer.
    pub async fn entitlements(&mut self, payer: Payer) -> Vec<(String, i64)> {
        let r = self
            .0
            .get_entitlements(GetEntitlementsRequest {
                payer: Some(coinflow_shared::proto::v1::Payer { id: Some(payer) }),
            })
            .await
            .unwrap()
            .into_inner();
        r.entitlements
            .into_iter()
            .map(|e| (e.sku, e.quantity))
            .collect()
    }

    /// A payment, or the gRPC status.
    pub async fn payment(&mut self, id: &str) -> Result<Payment, tonic::Status> {
        let r = self
            .0
            .get_payment(GetPaymentRequest {
                payment_id: id.into(),
            })
            .await?;
        Ok(r.into_inner().payment.unwrap())
    }
}

/// A gRPC channel to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A secret no other test process holds: for a service restarted on a fixed port, whose
/// port another test's service may take while it is down. With the shared test tokens and
/// keys, a delivery could then land in that test's ledger; with this one it is refused
/// there, and retried.
pub fn unique_secret(role: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{role}-{}-{n}", std::process::id())
}

/// A port that was free a moment ago (for a service that starts later).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
