//! Scale-out on PostgreSQL: real binaries, several replicas of each service, one shared
//! ledger. These need PostgreSQL; `scripts/test` runs them in its PostgreSQL pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use coinflow_tests::bodies::settled;
use coinflow_tests::http::Http;
use coinflow_tests::process::{Proc, bin};
use coinflow_tests::{KEY, TestDb};
use futures::StreamExt;
use http::StatusCode;
use sqlx::Connection;

/// Runs the `migrate` subcommand, as a Kubernetes Job would.
async fn migrate(db: &TestDb) {
    let out = tokio::process::Command::new(bin("fulfillment-svc"))
        .args(["migrate", "--database-url", &db.url])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

async fn deliveries_served(admin: std::net::SocketAddr) -> f64 {
    let text = Http::default()
        .get(&format!("http://{admin}/metrics"))
        .await
        .text;
    text.lines()
        .filter(|l| {
            l.starts_with("rpc_server_duration_seconds_count{")
                && l.contains("rpc_method=\"DeliverBatch\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Posts until a 200, as Coinflow retries; returns how many attempts it took.
async fn deliver_until_ok(http: &Http, url: &str, body: Vec<u8>) -> usize {
    for attempt in 1..=40 {
        let status = http.deliver(url, body.clone()).await.status;
        if status == StatusCode::OK {
            return attempt;
        }
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "only 503 may be retried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_and_two_fulfillments_grant_each_of_2000_payments_once() {
    let db = TestDb::postgres().await;
    migrate(&db).await;
    let f1 = Proc::fulfillment(&db).await;
    let f2 = Proc::fulfillment(&db).await;
    let both = format!("http://{},http://{}", f1.addr, f2.addr);
    let e1 = Proc::edge_to(&both, KEY, &[]).await;
    let e2 = Proc::edge_to(&both, KEY, &[]).await;
    let urls = [e1.addr, e2.addr].map(|a| format!("http://{a}/webhooks/coinflow"));

    const PAYMENTS: usize = 2000;
    // Every payment three times, the copies spread over both edges, all interleaved.
    let mut work: Vec<(usize, usize)> = (0..PAYMENTS)
        .flat_map(|p| (0..3).map(move |c| (p, (p + c) % 2)))
        .collect();
    work.sort_by_key(|(p, c)| (p * 7919 + c * 104_729) % 6007);
    let http = Http::default();
    let acked = Arc::new(AtomicUsize::new(0));
    futures::stream::iter(work)
        .for_each_concurrent(64, |(p, edge)| {
            let (http, url, acked) = (http.clone(), urls[edge].clone(), Arc::clone(&acked));
            async move {
                deliver_until_ok(&http, &url, settled(&format!("scale-{p}"), "sword", 500)).await;
                acked.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    assert_eq!(
        acked.load(Ordering::Relaxed),
        PAYMENTS * 3,
        "every delivery acked"
    );

    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM events").await,
        PAYMENTS as i64,
        "one row per transport identity, none lost"
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM ledger WHERE kind = 'grant'").await,
        PAYMENTS as i64
    );
    assert_eq!(
        count(&db, "SELECT COUNT(DISTINCT payment_id) FROM ledger").await,
        PAYMENTS as i64
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM (SELECT payment_id FROM ledger GROUP BY payment_id HAVING COUNT(*) > 1) d").await,
        0,
        "no payment granted twice"
    );
    // Both replicas served deliveries.
    assert!(deliveries_served(f1.admin).await > 0.0);
    assert!(deliveries_served(f2.admin).await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_fulfillment_replica_loses_no_acked_event_and_the_edge_keeps_answering() {
    let db = TestDb::postgres().await;
    migrate(&db).await;
    let mut f1 = Proc::fulfillment(&db).await;
    let f2 = Proc::fulfillment(&db).await;
    let both = format!("http://{},http://{}", f1.addr, f2.addr);
    let edge = Proc::edge_to(&both, KEY, &[]).await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);

    let http = Http::default();
    let (tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    let sender = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            futures::stream::iter(0..600)
                .map(|i| {
                    let (http, url, tx) = (http.clone(), url.clone(), tx.clone());
                    async move {
                        let status = http
                            .deliver(&url, settled(&format!("kill-{i}"), "sword", 500))
                            .await
                            .status;
                        let _ = tx.send(status);
                        (i, status)
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await
        }
    });
    for _ in 0..100 {
        acks.recv().await.unwrap();
    }
    f1.kill9().await;
    let results = sender.await.unwrap();
    let failed: Vec<_> = results
        .iter()
        .filter(|(_, s)| *s != StatusCode::OK)
        .collect();
    assert!(
        failed.is_empty(),
        "the edge answered non-200 after a replica died: {} of them, e.g. {:?}\nedge log tail:\n{}",
        failed.len(),
        failed.first(),
        edge.log_text()
            .lines()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        count(&db, "SELECT COUNT(DISTINCT payment_id) FROM ledger").await,
        600,
        "every acked payment is in the ledger"
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM ledger").await,
        600,
        "each exactly once"
    );
    assert!(deliveries_served(f2.admin).await > 0.0);
}
