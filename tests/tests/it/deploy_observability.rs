//! `deploy/observability/` only queries metrics the services really expose: the names in
//! the Grafana dashboard and the Prometheus rules are checked against a live scrape.

use std::collections::BTreeSet;

use coinflow_tests::KEY;
use coinflow_tests::TestDb;
use coinflow_tests::bodies::settled;
use coinflow_tests::http::Http;
use coinflow_tests::process::Proc;

fn repo(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path),
    )
    .unwrap()
}

/// Metric names in a PromQL expression: identifiers with one of our prefixes.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if ["coinflow_", "http_server_", "rpc_server_", "rpc_client_"]
            .iter()
            .any(|p| word.starts_with(p))
        {
            into.insert(word.to_owned());
        }
    }
}

async fn exposed(admin: std::net::SocketAddr, into: &mut BTreeSet<String>) {
    let text = Http::default()
        .get(&format!("http://{admin}/metrics"))
        .await
        .text;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        into.insert(name.to_owned());
    }
}

#[tokio::test]
async fn dashboard_and_alerts_query_metrics_that_exist() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo("deploy/observability/grafana-dashboard.json")).unwrap();
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            metric_names(target["expr"].as_str().unwrap(), &mut wanted);
        }
    }
    let rules = repo("deploy/observability/prometheus-rules.yaml");
    metric_names(&rules, &mut wanted);
    assert!(wanted.len() >= 8, "{wanted:?}");

    let db = TestDb::new().await;
    let mut fulfillment = Proc::fulfillment_env(
        &db,
        &[("FULFILLMENT_RECOVERY_TOKENS", "test-recovery-token")],
    )
    .await;
    let mut edge = Proc::edge(fulfillment.addr, KEY, &[]).await;
    let url = format!("http://{}/webhooks/coinflow", edge.addr);
    let http = Http::default();
    http.deliver(&url, settled("d-1", "sword", 500)).await;
    http.deliver(&url, settled("d-1", "sword", 500)).await;
    http.deliver(&url, settled("d-2", "sword", 1)).await;
    http.post(&url, &[("authorization", "wrong")], b"{}".to_vec())
        .await;
    let mut names = BTreeSet::new();
    // The queue gauges appear after their first refresh.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    exposed(edge.admin, &mut names).await;
    exposed(fulfillment.admin, &mut names).await;
    // `recover --every`'s own metrics, after one run against the stand-in.
    let coinflow =
        coinflow_sender::standin::Coinflow::start(coinflow_sender::standin::StandinConfig::local(
            url.clone(),
            KEY.into(),
            "test-merchant-api-key".into(),
            1,
        ))
        .await
        .unwrap();
    let (server, api) = (format!("http://{}", fulfillment.addr), coinflow.api_url());
    let mut recovering = Proc::start(
        "fulfillment-svc",
        &["recover", "--every", "1h", "--admin-listen", "127.0.0.1:0"],
        &[
            ("FULFILLMENT_SERVER", server.as_str()),
            ("FULFILLMENT_TOKEN", "test-recovery-token"),
            ("COINFLOW_API_URL", api.as_str()),
            ("COINFLOW_API_KEY", "test-merchant-api-key"),
        ],
        "admin",
    )
    .await;
    recovering.wait_for_log("recovery run finished").await;
    exposed(recovering.admin, &mut names).await;
    assert!(recovering.terminate().await.success());
    let missing: Vec<_> = wanted.difference(&names).collect();
    assert!(
        missing.is_empty(),
        "queried but not exposed: {missing:?}\nexposed: {names:?}"
    );
    assert!(edge.terminate().await.success());
    assert!(fulfillment.terminate().await.success());
}
