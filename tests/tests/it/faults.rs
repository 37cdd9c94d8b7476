//! Fault injection with the Coinflow-faithful sender: processes killed under load, storage
//! stalls. Whatever happens, every event acked with 200 is in the ledger exactly once and
//! every payment ends with exactly what its events call for.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use coinflow_sender::deliver::{Logged, Sender, Target};
use coinflow_sender::generate::{Traffic, generate};
use coinflow_tests::db::Backend;
use coinflow_tests::http::Http;
use coinflow_tests::model::{self, ModelCatalog};
use coinflow_tests::process::Proc;
use coinflow_tests::{KEY, TestDb, unique_secret};
use http::StatusCode;
use sqlx::Row;

pub(crate) fn sender(url: &str) -> Sender {
    sender_signing(url, KEY)
}

/// [`sender`], signing with `key`.
pub(crate) fn sender_signing(url: &str, key: &str) -> Sender {
    Sender::new(
        Target {
            url: url.to_owned(),
            key: key.into(),
            authorization: false,
            compress: 2000.0,
            attempts: 16,
        },
        None,
    )
}

async fn pool(db: &TestDb) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(&db.url).await.unwrap()
}

/// What each payment must end with, from the bodies sent and the catalog file, by the
/// harness's own model of the money rules ([`coinflow_tests::model`]), not the service's.
fn expected(bodies: &[Bytes]) -> BTreeMap<String, BTreeMap<String, i64>> {
    model::expected_by_payment(bodies, &ModelCatalog::example())
}

/// Every acked delivery is recorded once; every payment holds exactly what it should.
pub(crate) async fn verify(db: &TestDb, bodies: &[Bytes], logged: &[Logged]) {
    let pool = pool(db).await;
    assert!(!logged.is_empty(), "a delivery log to check");
    assert!(
        logged.iter().all(|l| l.result == "acked"),
        "the sender drained its retries with every delivery acked"
    );
    for l in logged {
        let n: i64 =
            sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM events WHERE event_key = $1")
                .bind(&l.event_key)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            n, 1,
            "acked {} ({:?}) must be recorded exactly once",
            l.event_key, l.payment_id
        );
    }
    assert_payments_as_expected(&pool, bodies).await;
}

/// Nothing is granted twice, and every payment holds exactly what its events in `bodies`
/// call for ([`expected`]).
pub(crate) async fn assert_payments_as_expected(pool: &sqlx::AnyPool, bodies: &[Bytes]) {
    let twice: i64 = sqlx::query_scalar(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM (SELECT payment_id, sku FROM ledger WHERE kind = 'grant'
         GROUP BY payment_id, sku HAVING COUNT(*) > 1) t",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(twice, 0, "nothing granted twice");
    for (payment, want) in expected(bodies) {
        let rows = sqlx::query("SELECT sku, CAST(SUM(quantity) AS BIGINT) FROM ledger WHERE payment_id = $1 GROUP BY sku")
            .bind(&payment)
            .fetch_all(pool)
            .await
            .unwrap();
        let got: BTreeMap<String, i64> = rows
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .filter(|(_, q)| *q != 0)
            .collect();
        assert_eq!(got, want, "payment {payment}");
    }
}

async fn wait_for_acks(sender: &Sender, at_least: u64) {
    for _ in 0..600 {
        if sender.report().acked >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {at_least} acks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulfillment_killed_twice_under_load_loses_and_doubles_nothing() {
    let db = TestDb::new().await;
    // Restarted on its port: while it is down, another test's fulfillment may take the
    // port, and must refuse this edge's deliveries.
    let token = unique_secret("ingest");
    let own = [("FULFILLMENT_INGEST_TOKENS", token.as_str())];
    let mut fulfillment = Proc::fulfillment_env(&db, &own).await;
    let listen = fulfillment.addr.to_string();
    let edge = Proc::edge(
        fulfillment.addr,
        KEY,
        &[
            ("EDGE_DELIVER_DEADLINE_MS", "1000"),
            ("EDGE_INGEST_TOKEN", token.as_str()),
        ],
    )
    .await;
    let sender = sender(&format!("http://{}/webhooks/coinflow", edge.addr));
    let bodies = generate(&Traffic {
        payments: 200,
        duplicate_ratio: 0.2,
        reorder_ratio: 0.3,
        prefix: "crash".into(),
        seed: 11,
    });
    let run = tokio::spawn({
        let (sender, bodies) = (sender.clone(), bodies.clone());
        async move { sender.closed_loop(bodies, 16).await }
    });
    for round in 1..=2u64 {
        wait_for_acks(&sender, round * 120).await;
        fulfillment.kill9().await;
        // Down for longer than the edge's 1 s deadline, so Coinflow sees 503s and retries.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        fulfillment = Proc::fulfillment_env(&db, &[own[0], ("FULFILLMENT_LISTEN", &listen)]).await;
    }
    let logged = run.await.unwrap();
    assert!(
        sender.report().statuses.keys().any(|s| s != "200"),
        "the kills were felt: {:?}",
        sender.report().statuses
    );
    verify(&db, &bodies, &logged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_killed_mid_request_loses_and_doubles_nothing() {
    let db = TestDb::new().await;
    let fulfillment = Proc::fulfillment(&db).await;
    // Restarted on its port: while it is down, another test's edge may take the port, and
    // must refuse this sender's deliveries.
    let key = unique_secret("cf_whk");
    let mut edge = Proc::edge(fulfillment.addr, &key, &[]).await;
    let listen = edge.addr.to_string();
    let sender = sender_signing(&format!("http://{listen}/webhooks/coinflow"), &key);
    let bodies = generate(&Traffic {
        payments: 200,
        duplicate_ratio: 0.2,
        reorder_ratio: 0.3,
        prefix: "edge".into(),
        seed: 12,
    });
    let run = tokio::spawn({
        let (sender, bodies) = (sender.clone(), bodies.clone());
        async move { sender.closed_loop(bodies, 16).await }
    });
    wait_for_acks(&sender, 150).await;
    edge.kill9().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _edge = Proc::edge(fulfillment.addr, &key, &[("EDGE_LISTEN", &listen)]).await;
    let logged = run.await.unwrap();
    assert!(
        sender.report().statuses.contains_key("error"),
        "requests were cut: {:?}",
        sender.report().statuses
    );
    verify(&db, &bodies, &logged).await;
}

/// Holds the database's write lock (SQLite) or an exclusive lock on `events`
/// (PostgreSQL) until dropped... or until `release` is called.
pub(crate) struct Stall {
    conn: sqlx::AnyConnection,
}

impl Stall {
    pub(crate) async fn begin(db: &TestDb) -> Self {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
        let sql = match db.backend {
            Backend::Sqlite => "BEGIN EXCLUSIVE",
            Backend::Postgres => "BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE",
        };
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        Self { conn }
    }

    pub(crate) async fn release(mut self) {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut self.conn)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_storage_stall_answers_503_never_200_and_recovers_without_a_restart() {
    let db = TestDb::new().await;
    let fulfillment = Proc::fulfillment(&db).await;
    let edge = Proc::edge(
        fulfillment.addr,
        KEY,
        &[("EDGE_DELIVER_DEADLINE_MS", "1500")],
    )
    .await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let http = Http::default();
    let sender = sender(&url);
    let bodies: Vec<Bytes> = (0..=3)
        .map(|i| {
            Bytes::from(coinflow_tests::bodies::settled(
                &format!("stall-{i}"),
                "sword",
                500,
            ))
        })
        .collect();
    let mut logged = vec![sender.deliver(bodies[0].clone()).await];
    assert_eq!(logged[0].attempts, 1, "acked at once before the stall");

    let stall = Stall::begin(&db).await;
    for body in &bodies[1..] {
        let a = http.deliver(&url, body.to_vec()).await;
        assert_eq!(
            a.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "stalled storage must never be acked"
        );
        assert!(a.headers.contains_key("retry-after"));
    }
    stall.release().await;

    // Coinflow retries; once storage is back every one is acked, with no restart.
    for body in &bodies[1..] {
        logged.push(sender.deliver(body.clone()).await);
    }
    assert_eq!(logged.len(), bodies.len());
    verify(&db, &bodies, &logged).await;
}

#[tokio::test]
async fn a_thousand_idle_connections_do_not_stop_deliveries() {
    let db = TestDb::new().await;
    let fulfillment = Proc::fulfillment(&db).await;
    let edge = Proc::edge(fulfillment.addr, KEY, &[]).await;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(tokio::net::TcpStream::connect(edge.addr).await.unwrap());
    }
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    for i in 0..20 {
        let a = Http::default()
            .deliver(
                &url,
                coinflow_tests::bodies::settled(&format!("idle-{i}"), "sword", 500),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    drop(idle);
}

#[tokio::test]
async fn a_ten_mib_body_is_refused_before_it_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await;
    let fulfillment = Proc::fulfillment(&db).await;
    let edge = Proc::edge(fulfillment.addr, KEY, &[]).await;
    let mut stream = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    let head = "POST /webhooks/coinflow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10485760\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b' '; 64 * 1024]).await.unwrap();
    // Only 64 KiB of 10 MiB were sent: the answer comes anyway.
    let mut buf = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}
