//! `fulfillment-svc recover` against the Coinflow stand-in, the real edge and the real
//! fulfillment (all real processes but the stand-in, over real sockets): events Coinflow
//! gave up on are resent and granted once, or recorded directly and marked recovered; a
//! payment never delivered is a discrepancy that fails the run; a second run changes
//! nothing; the API failing part of the time, a wrong API key, and more than three pages.

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use coinflow_sender::deliver::Logged;
use coinflow_sender::standin::{Coinflow, StandinConfig};
use coinflow_shared::convert::from_body;
use coinflow_shared::proto::v1::GetPaymentRequest;
use coinflow_tests::process::{Proc, bin};
use coinflow_tests::{KEY, Query, TestDb, free_addr};
use secrecy::SecretString;
use serde_json::Value;

use crate::faults::assert_payments_as_expected;
use crate::observability::sample;

const API_KEY: &str = "cf_merchant_api_key_recover_5511";
const RECOVERY_TOKEN: &str = "test-recovery-token";

async fn fulfillment(db: &TestDb) -> Proc {
    Proc::fulfillment_env(db, &[("FULFILLMENT_RECOVERY_TOKENS", RECOVERY_TOKEN)]).await
}

/// An edge listening on `addr` (where the stand-in delivers) with validation key `key`.
async fn edge_on(addr: SocketAddr, fulfillment: &Proc, key: &str) -> Proc {
    Proc::edge(fulfillment.addr, key, &[("EDGE_LISTEN", &addr.to_string())]).await
}

/// The stand-in delivering `payments` payments to `addr`, giving up after 3 attempts.
async fn coinflow(
    addr: SocketAddr,
    payments: usize,
    tweak: impl FnOnce(&mut StandinConfig),
) -> Coinflow {
    let mut config = StandinConfig::local(
        format!("http://{addr}/webhooks/coinflow"),
        SecretString::from(KEY),
        SecretString::from(API_KEY),
        payments,
    );
    config.target.attempts = 3;
    config.target.compress = 100_000.0;
    tweak(&mut config);
    Coinflow::start(config).await.unwrap()
}

/// What a `recover` run printed, its exit status, and its action log.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
    log: Vec<Value>,
}

impl Run {
    fn summary(&self) -> &Value {
        self.log
            .iter()
            .rev()
            .find(|l| l["action"] == "summary")
            .unwrap_or_else(|| panic!("no summary: {}\n{}", self.stdout, self.stderr))
    }

    fn actions(&self, action: &str) -> usize {
        self.log.iter().filter(|l| l["action"] == action).count()
    }
}

async fn recover(fulfillment: &Proc, api_url: &str, api_key: &str, args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("actions.jsonl");
    let out = tokio::process::Command::new(bin("fulfillment-svc"))
        .arg("recover")
        .args(["--wait", "30s", "--page-limit", "7", "--log"])
        .arg(&log)
        .args(args)
        .env("FULFILLMENT_SERVER", format!("http://{}", fulfillment.addr))
        .env("FULFILLMENT_TOKEN", RECOVERY_TOKEN)
        .env("COINFLOW_API_URL", api_url)
        .env("COINFLOW_API_KEY", api_key)
        .env("LOG_FORMAT", "json")
        .output()
        .await
        .unwrap();
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        log: read_log(&log),
    };
    for secret in [API_KEY, RECOVERY_TOKEN, KEY] {
        assert!(
            !run.stdout.contains(secret) && !run.stderr.contains(secret),
            "recover printed a secret"
        );
    }
    run
}

fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn pool(db: &TestDb) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(&db.url).await.unwrap()
}

/// Every body Coinflow would deliver is recorded exactly once, every payment holds what
/// its events call for, and nothing is granted twice.
async fn assert_ledger_complete(db: &TestDb, bodies: &[Bytes]) {
    let pool = pool(db).await;
    for body in bodies {
        let key = from_body(body.clone(), std::time::SystemTime::now()).event_key;
        let n: i64 =
            sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM events WHERE event_key = $1")
                .bind(&key)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(n, 1, "{key} recorded exactly once");
    }
    assert_payments_as_expected(&pool, bodies).await;
}

async fn rows(db: &TestDb) -> (i64, i64) {
    let pool = pool(db).await;
    let events: i64 = sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let entries: i64 = sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM ledger")
        .fetch_one(&pool)
        .await
        .unwrap();
    (events, entries)
}

fn gave_up(logged: &[Logged]) -> usize {
    logged.iter().filter(|l| l.result == "gave_up").count()
}

#[tokio::test]
async fn an_outage_past_the_retries_is_resent_granted_once_and_a_second_run_changes_nothing() {
    let db = TestDb::new().await;
    let mut f = fulfillment(&db).await;
    let addr = free_addr();
    // The API fails part of the time: the run must still finish.
    let cf = coinflow(addr, 12, |c| c.api_error_rate = 0.25).await;
    let logged = cf.deliver().await;
    let bodies = cf.subscribed_bodies();
    assert_eq!(
        gave_up(&logged),
        bodies.len(),
        "the edge was down: Coinflow gave up on all"
    );

    let mut edge = edge_on(addr, &f, KEY).await;
    let run = recover(&f, &cf.api_url(), API_KEY, &[]).await;
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    let s = run.summary();
    assert_eq!(s["events"], bodies.len(), "{s}");
    assert_eq!(s["resent"], bodies.len(), "{s}");
    assert_eq!(s["resent_recorded"], bodies.len(), "{s}");
    assert!(
        s["deliveries"].as_u64().unwrap() > 3 * 7,
        "more than three pages of 7: {s}"
    );
    assert_eq!(s["discrepancies"].as_array().unwrap().len(), 0, "{s}");
    assert!(cf.seen().injected > 0, "the API did fail part of the time");
    assert_ledger_complete(&db, &bodies).await;

    let before = rows(&db).await;
    let again = recover(&f, &cf.api_url(), API_KEY, &[]).await;
    assert!(again.ok, "{}\n{}", again.stdout, again.stderr);
    let s = again.summary();
    assert_eq!(s["resent"], 0, "{s}");
    assert_eq!(s["already_recorded"], bodies.len(), "{s}");
    assert_eq!(rows(&db).await, before, "the second run changed nothing");
    assert!(edge.terminate().await.success());
    assert!(f.terminate().await.success());
}

#[tokio::test]
async fn a_wrong_validation_key_until_coinflow_gives_up_is_recovered_once_the_key_is_fixed() {
    let db = TestDb::new().await;
    let mut f = fulfillment(&db).await;
    let addr = free_addr();
    let mut wrong = edge_on(addr, &f, "cf_whk_mistyped_after_rotation").await;
    let cf = coinflow(addr, 8, |_| {}).await;
    let logged = cf.deliver().await;
    let bodies = cf.subscribed_bodies();
    assert_eq!(gave_up(&logged), bodies.len());
    assert!(
        logged.iter().all(|l| l.last_status == 401),
        "every delivery was refused"
    );
    assert!(wrong.terminate().await.success());

    let mut edge = edge_on(addr, &f, KEY).await;
    let run = recover(&f, &cf.api_url(), API_KEY, &[]).await;
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.summary()["resent"], bodies.len());
    assert_ledger_complete(&db, &bodies).await;
    assert!(edge.terminate().await.success());
    assert!(f.terminate().await.success());
}

#[tokio::test]
async fn direct_recording_marks_events_recovered_and_a_later_delivery_is_a_duplicate() {
    let db = TestDb::new().await;
    let mut f = fulfillment(&db).await;
    let addr = free_addr();
    let cf = coinflow(addr, 8, |_| {}).await;
    cf.deliver().await;
    let bodies = cf.subscribed_bodies();

    // The edge is still down: resending would not help.
    let run = recover(&f, &cf.api_url(), API_KEY, &["--direct"]).await;
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.summary()["recorded_directly"], bodies.len());
    assert_eq!(run.actions("recorded_directly"), bodies.len());
    assert_eq!(cf.seen().jobs, 0, "nothing was resent");
    assert_ledger_complete(&db, &bodies).await;

    let mut q = Query::connect(f.addr).await;
    let settled = cf
        .payments()
        .iter()
        .find(|p| p.status == "Settled")
        .unwrap()
        .id
        .clone();
    // The recovery token may read payments; the test's query token reads this one.
    let p =
        q.0.get_payment(GetPaymentRequest {
            payment_id: settled.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .payment
        .unwrap();
    assert!(
        p.events.iter().all(|e| e.recovered),
        "{settled}: marked recovered"
    );
    assert!(
        p.ledger.iter().all(|l| l.actor == "recovery"),
        "{:?}",
        p.ledger
    );

    // Coinflow delivers the same events later, through the fixed edge: duplicates.
    let before = rows(&db).await;
    let mut edge = edge_on(addr, &f, KEY).await;
    let again = cf.deliver().await;
    assert!(again.iter().all(|l| l.result == "acked"));
    assert_eq!(rows(&db).await, before, "every redelivery was a duplicate");
    assert_ledger_complete(&db, &bodies).await;
    assert!(edge.terminate().await.success());
    assert!(f.terminate().await.success());
}

#[tokio::test]
async fn a_settled_payment_never_delivered_is_a_discrepancy_and_fails_the_run() {
    let db = TestDb::new().await;
    let mut f = fulfillment(&db).await;
    let addr = free_addr();
    let mut edge = edge_on(addr, &f, KEY).await;
    let cf = coinflow(addr, 10, |c| c.unsubscribed = vec!["Settled".into()]).await;
    let logged = cf.deliver().await;
    assert!(
        logged.iter().all(|l| l.result == "acked"),
        "what was sent arrived"
    );
    let settled: Vec<String> = cf
        .payments()
        .iter()
        .filter(|p| p.status == "Settled")
        .map(|p| p.id.clone())
        .collect();
    assert!(!settled.is_empty());

    let run = recover(&f, &cf.api_url(), API_KEY, &[]).await;
    assert!(!run.ok, "discrepancies fail the run: {}", run.stdout);
    let found: Vec<String> = run.summary()["discrepancies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["kind"] == "settled_not_recorded")
        .map(|d| d["payment_id"].as_str().unwrap().to_owned())
        .collect();
    let mut want = settled.clone();
    want.sort();
    let mut got = found.clone();
    got.sort();
    assert_eq!(got, want);
    assert!(
        run.stdout.contains("settled_not_recorded"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("discrepancies remain"),
        "{}",
        run.stderr
    );
    assert!(edge.terminate().await.success());
    assert!(f.terminate().await.success());
}

#[tokio::test]
async fn a_wrong_api_key_fails_fast_naming_its_variable_not_its_value() {
    let db = TestDb::new().await;
    let mut f = fulfillment(&db).await;
    let cf = coinflow(free_addr(), 2, |_| {}).await;
    let run = recover(&f, &cf.api_url(), "cf_not_the_merchant_key", &[]).await;
    assert!(!run.ok);
    assert!(run.stderr.contains("COINFLOW_API_KEY"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("cf_not_the_merchant_key"),
        "{}",
        run.stderr
    );
    assert_eq!(cf.seen().refused, 1, "no retry after 401");
    assert!(f.terminate().await.success());
}

#[tokio::test]
async fn every_keeps_running_and_serves_its_metrics() {
    let db = TestDb::new().await;
    let mut f = fulfillment(&db).await;
    let addr = free_addr();
    let cf = coinflow(addr, 6, |c| c.unsubscribed = vec!["Settled".into()]).await;
    // Nothing listens: every delivery Coinflow made failed.
    cf.deliver().await;
    let events = cf.subscribed_bodies().len();
    let settled = cf
        .payments()
        .iter()
        .filter(|p| p.status == "Settled")
        .count();
    let (server, api) = (format!("http://{}", f.addr), cf.api_url());
    let mut recovering = Proc::start(
        "fulfillment-svc",
        &[
            "recover",
            "--every",
            "1s",
            "--direct",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[
            ("FULFILLMENT_SERVER", server.as_str()),
            ("FULFILLMENT_TOKEN", RECOVERY_TOKEN),
            ("COINFLOW_API_URL", api.as_str()),
            ("COINFLOW_API_KEY", API_KEY),
        ],
        "admin",
    )
    .await;
    // Two runs: the first records what was missing, the second finds it all recorded; both
    // leave the unsubscribed Settled payments as discrepancies.
    let mut text = String::new();
    for _ in 0..100 {
        text = crate::observability::scrape(recovering.admin).await;
        if sample(
            &text,
            "coinflow_recovery_runs_total",
            &[("result", "discrepancies")],
        ) >= 2.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        sample(
            &text,
            "coinflow_recovery_runs_total",
            &[("result", "discrepancies")]
        ) >= 2.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "coinflow_recovery_recovered_total", &[]),
        events as f64,
        "recorded once, by the first run"
    );
    assert_eq!(
        sample(&text, "coinflow_recovery_discrepancies", &[]),
        settled as f64
    );
    assert!(
        sample(&text, "coinflow_recovery_deliveries_checked_total", &[]) >= 2.0 * events as f64
    );
    assert!(
        recovering.terminate().await.success(),
        "SIGTERM ends the loop cleanly"
    );
    assert_ledger_complete(&db, &cf.subscribed_bodies()).await;
    assert!(f.terminate().await.success());
}
