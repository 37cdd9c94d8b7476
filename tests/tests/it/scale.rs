//! Scale-out on PostgreSQL: real binaries, several replicas of each service, one shared
//! ledger. These need PostgreSQL; `scripts/test` runs them in its PostgreSQL pass.

use std::collections::{BTreeMap, BTreeSet};
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

/// Every payment `{prefix}-0` .. `{prefix}-{n-1}` (each a `sword` Settled) is in the
/// database with exactly one event and one ledger entry, a grant of one sword; no other
/// payment is.
async fn assert_each_recorded_and_granted_once(db: &TestDb, prefix: &str, n: usize) {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let events: BTreeMap<String, i64> =
        sqlx::query_as("SELECT payment_id, COUNT(*) FROM events GROUP BY payment_id")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut ledger: BTreeMap<String, Vec<(String, String, i64)>> = BTreeMap::new();
    let rows: Vec<(String, String, String, i64)> =
        sqlx::query_as("SELECT payment_id, kind, sku, quantity FROM ledger")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for (payment, kind, sku, quantity) in rows {
        ledger
            .entry(payment)
            .or_default()
            .push((kind, sku, quantity));
    }
    let want: BTreeSet<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    assert_eq!(
        events.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "every payment recorded, nothing else"
    );
    assert_eq!(
        ledger.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "every payment in the ledger, nothing else"
    );
    for payment in &want {
        assert_eq!(events[payment], 1, "{payment}: one event row");
        assert_eq!(
            ledger[payment],
            [("grant".to_owned(), "sword".to_owned(), 1)],
            "{payment}: granted exactly once"
        );
    }
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
    futures::stream::iter(work)
        .for_each_concurrent(64, |(p, edge)| {
            let (http, url) = (http.clone(), urls[edge].clone());
            async move {
                deliver_until_ok(&http, &url, settled(&format!("scale-{p}"), "sword", 500)).await;
            }
        })
        .await;

    // What the ledger holds, payment by payment: one row per transport identity (the three
    // copies deduplicated across edges and replicas), one grant, none lost.
    assert_each_recorded_and_granted_once(&db, "scale", PAYMENTS).await;
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
    assert_each_recorded_and_granted_once(&db, "kill", 600).await;
    assert!(deliveries_served(f2.admin).await > 0.0);
}
