//! Fan-out from the edge: routes with filters, required and best-effort, and endpoints
//! found through DNS.

use std::time::Duration;

use coinflow_tests::bodies::{event, settled, wallet_of};
use coinflow_tests::http::Http;
use coinflow_tests::process::Proc;
use coinflow_tests::{KEY, Query, TestDb, free_addr};
use http::StatusCode;

#[tokio::test]
async fn best_effort_routes_get_their_events_and_never_hold_the_200() {
    let (db1, db2) = (TestDb::new().await, TestDb::new().await);
    let mut primary = Proc::fulfillment(&db1).await;
    let mut analytics = Proc::fulfillment(&db2).await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!(
            r#"
            [[routes]]
            name = "fulfillment"
            endpoints = "http://{}"

            [[routes]]
            name = "analytics"
            endpoints = "http://{}"
            required = false
            event_types = ["Settled"]

            [[routes]]
            name = "gone"
            endpoints = "http://{}"
            required = false
            "#,
            primary.addr,
            analytics.addr,
            free_addr()
        ),
    )
    .unwrap();
    let mut edge = Proc::edge(
        primary.addr,
        KEY,
        &[("EDGE_ROUTES_FILE", routes.to_str().unwrap())],
    )
    .await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let http = Http::default();
    assert_eq!(
        http.deliver(&url, settled("r-1", "sword", 500))
            .await
            .status,
        StatusCode::OK
    );
    let refund = event("Refund", "r-1", "sword", 500, "2026-11-22T00:00:00Z");
    assert_eq!(http.deliver(&url, refund).await.status, StatusCode::OK);

    // The required route has both events.
    let mut q1 = Query::connect(primary.addr).await;
    assert_eq!(q1.payment("r-1").await.unwrap().events.len(), 2);
    // The best-effort route gets only what its filter takes, shortly after.
    let mut q2 = Query::connect(analytics.addr).await;
    let mut granted = Vec::new();
    for _ in 0..100 {
        granted = q2.wallet(&wallet_of("r-1")).await;
        if !granted.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(granted, [("sword".to_owned(), 1)]);
    assert_eq!(
        q2.payment("r-1").await.unwrap().events.len(),
        1,
        "the Refund was filtered out"
    );

    // The dead best-effort route dropped both events, and said so.
    let mut drops = 0.0;
    for _ in 0..100 {
        let text = http
            .get(&format!("http://{}/metrics", edge.admin))
            .await
            .text;
        drops = text
            .lines()
            .filter(|l| {
                l.starts_with("coinflow_webhook_route_drops_total{") && l.contains("route=\"gone\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if drops >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(drops, 2.0);
    assert!(edge.terminate().await.success());
    assert!(primary.terminate().await.success());
    assert!(analytics.terminate().await.success());
}

#[tokio::test]
async fn dns_endpoints_are_resolved() {
    let db = TestDb::new().await;
    let mut fulfillment = Proc::fulfillment(&db).await;
    let spec = format!("dns://localhost:{}", fulfillment.addr.port());
    let mut edge = Proc::edge_to(&spec, KEY, &[("EDGE_RESOLVE_INTERVAL_SECS", "1")]).await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let a = Http::default()
        .deliver(&url, settled("dns-1", "sword", 500))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let ready = Http::default()
        .get(&format!("http://{}/readyz", edge.admin))
        .await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text);
    assert!(edge.terminate().await.success());
    assert!(fulfillment.terminate().await.success());
}
