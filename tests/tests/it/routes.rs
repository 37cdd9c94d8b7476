//! Fan-out from the edge: routes with filters, required and best-effort, each with its own
//! ingest token; routes that could lose an event or leak a token refused at start; and
//! endpoints found through DNS.

use std::time::Duration;

use coinflow_tests::bodies::{event, settled, wallet_of};
use coinflow_tests::http::Http;
use coinflow_tests::process::Proc;
use coinflow_tests::process::bin;
use coinflow_tests::{INGEST_TOKEN, KEY, Query, TestDb, free_addr};

use crate::stub::{Answer, Stub};
use http::StatusCode;

#[tokio::test]
async fn best_effort_routes_get_their_events_and_never_hold_the_200() {
    let (db1, db2) = (TestDb::new().await, TestDb::new().await);
    let mut primary = Proc::fulfillment(&db1).await;
    let mut analytics =
        Proc::fulfillment_env(&db2, &[("FULFILLMENT_INGEST_TOKENS", "analytics-token")]).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("analytics-token");
    std::fs::write(&token_file, "analytics-token\n").unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!(
            r#"
            [[routes]]
            name = "fulfillment"
            endpoints = "http://{}"
            token_env = "EDGE_TEST_FULFILLMENT_TOKEN"

            [[routes]]
            name = "analytics"
            endpoints = "http://{}"
            required = false
            event_types = ["Settled"]
            token_file = "{}"

            [[routes]]
            name = "gone"
            endpoints = "http://{}"
            required = false
            "#,
            primary.addr,
            analytics.addr,
            token_file.display(),
            free_addr()
        ),
    )
    .unwrap();
    let mut edge = Proc::edge(
        primary.addr,
        KEY,
        &[
            ("EDGE_ROUTES_FILE", routes.to_str().unwrap()),
            ("EDGE_TEST_FULFILLMENT_TOKEN", INGEST_TOKEN),
        ],
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

#[tokio::test]
async fn each_route_presents_its_own_token_and_only_its_own() {
    let (required, analytics, open) = (
        Stub::start(Answer::Ack, None).await,
        Stub::start(Answer::Ack, None).await,
        Stub::start(Answer::Ack, None).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("analytics-token");
    std::fs::write(&token_file, "  analytics-token\n").unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!(
            r#"
            [[routes]]
            name = "fulfillment"
            endpoints = "http://{}"
            token_env = "EDGE_TEST_FULFILLMENT_TOKEN"

            [[routes]]
            name = "analytics"
            endpoints = "http://{}"
            required = false
            token_file = "{}"

            [[routes]]
            name = "open"
            endpoints = "http://{}"
            required = false
            "#,
            required.addr,
            analytics.addr,
            token_file.display(),
            open.addr,
        ),
    )
    .unwrap();
    // EDGE_INGEST_TOKEN is set too (the harness sets it): routes from a file ignore it.
    let mut edge = Proc::edge(
        required.addr,
        KEY,
        &[
            ("EDGE_ROUTES_FILE", routes.to_str().unwrap()),
            ("EDGE_TEST_FULFILLMENT_TOKEN", "fulfillment-token"),
        ],
    )
    .await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let http = Http::default();
    for i in 0..3 {
        let a = http
            .deliver(&url, settled(&format!("tok-{i}"), "sword", 500))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let events = |stub: &Stub| -> usize { stub.calls().iter().map(|c| c.event_keys.len()).sum() };
    for _ in 0..200 {
        if events(&analytics) >= 3 && events(&open) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (stub, want) in [
        (&required, Some("Bearer fulfillment-token")),
        (&analytics, Some("Bearer analytics-token")),
        (&open, None),
    ] {
        let calls = stub.calls();
        assert_eq!(
            calls.iter().map(|c| c.event_keys.len()).sum::<usize>(),
            3,
            "{calls:?}"
        );
        for call in &calls {
            assert_eq!(call.authorization.as_deref(), want, "{calls:?}");
        }
    }
    assert!(edge.terminate().await.success());
}

/// Starts the edge binary on `routes` (with `env`) and returns its exit status and output.
async fn start_edge_on(routes: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, routes).unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(bin("webhook-edge"))
            .env_remove("RUST_LOG")
            .env("LOG_FORMAT", "json")
            .env("EDGE_LISTEN", "127.0.0.1:0")
            .env("EDGE_ADMIN_LISTEN", "127.0.0.1:0")
            .env("COINFLOW_WEBHOOK_KEYS", KEY)
            .env("EDGE_ROUTES_FILE", &path)
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the edge neither refused its routes nor kept running")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}

#[tokio::test]
async fn routes_that_could_lose_an_event_or_leak_a_token_are_refused_at_start() {
    let (status, text) = start_edge_on(
        r#"
        [[routes]]
        name = "fulfillment"
        endpoints = "http://127.0.0.1:1"
        event_types = ["Settled"]
        "#,
        &[],
    )
    .await;
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(r#"route \"fulfillment\""#) && text.contains("takes every event"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "the-shared-secret\n").unwrap();
    let (status, text) = start_edge_on(
        &format!(
            r#"
            [[routes]]
            name = "fulfillment"
            endpoints = "http://127.0.0.1:1"
            token_env = "EDGE_TEST_FULFILLMENT_TOKEN"

            [[routes]]
            name = "analytics"
            endpoints = "http://127.0.0.1:2"
            required = false
            token_file = "{}"
            "#,
            token_file.display()
        ),
        &[("EDGE_TEST_FULFILLMENT_TOKEN", "the-shared-secret")],
    )
    .await;
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(r#"route \"analytics\""#) && text.contains(r#"\"fulfillment\"'s"#),
        "{text}"
    );
    assert!(!text.contains("the-shared-secret"), "{text}");
}
