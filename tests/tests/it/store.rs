//! The SQLite store directly: the database, not process memory, enforces exactly-once, and
//! recorded rows cannot change.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use coinflow_shared::convert::to_proto;
use coinflow_shared::envelope::Envelope;
use coinflow_shared::proto::v1::{Outcome, WebhookEvent};
use coinflow_tests::bodies::{event, settled};
use fulfillment_svc::catalog::Catalog;
use fulfillment_svc::decision::decide;
use fulfillment_svc::store::sqlite::SqliteStore;
use fulfillment_svc::store::{Payer, Store};

fn proto(body: Vec<u8>) -> WebhookEvent {
    let env = Envelope::parse(&body).unwrap();
    to_proto(env, Bytes::from(body), SystemTime::now())
}

async fn open() -> (tempfile::TempDir, Arc<SqliteStore>, Catalog) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        &format!("sqlite://{}", dir.path().join("s.db").display()),
        Default::default(),
    )
    .await
    .unwrap();
    let catalog = Catalog::load(&coinflow_tests::catalog_path()).unwrap();
    (dir, Arc::new(store), catalog)
}

#[tokio::test]
async fn concurrent_records_of_one_payment_grant_once() {
    let (_dir, store, catalog) = open().await;
    // 10 copies of one delivery and 10 other deliveries of the same payment, all at once.
    let tasks = (0..20).map(|i| {
        let created = if i % 2 == 0 {
            "2026-01-01T00:00:00Z".to_owned()
        } else {
            format!("2026-01-01T00:00:{i:02}Z")
        };
        let ev = proto(event("Settled", "p-race", "sword", 500, &created));
        let decision = decide(&ev, &catalog);
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.record(&ev, &decision).await.unwrap() })
    });
    let acks: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let granted = acks
        .iter()
        .filter(|a| a.outcome == Outcome::Granted && !a.duplicate)
        .count();
    assert_eq!(granted, 1, "{acks:?}");
    assert_eq!(
        store
            .entitlements(&Payer::Wallet("mygameʬp-race".into()))
            .await
            .unwrap(),
        [("sword".to_owned(), 1)]
    );
    let record = store.payment("p-race").await.unwrap().unwrap();
    assert_eq!(record.events.len(), 11, "one row per transport identity");
    assert_eq!(record.ledger.len(), 1);
}

#[tokio::test]
async fn a_redelivery_returns_the_original_outcome() {
    let (_dir, store, catalog) = open().await;
    let ev = proto(settled("p-dup", "sword", 100));
    let first = store.record(&ev, &decide(&ev, &catalog)).await.unwrap();
    assert_eq!(
        (first.outcome, first.held_reason.as_deref(), first.duplicate),
        (Outcome::Held, Some("underpaid"), false)
    );
    // Even if the catalog changed in between, the stored outcome is what comes back.
    let second = store
        .record(&ev, &fulfillment_svc::decision::Decision::Record)
        .await
        .unwrap();
    assert_eq!(
        (
            second.outcome,
            second.held_reason.as_deref(),
            second.duplicate
        ),
        (Outcome::Held, Some("underpaid"), true)
    );
}

#[tokio::test]
async fn recorded_rows_cannot_be_updated_or_deleted() {
    let (dir, store, catalog) = open().await;
    let ev = proto(settled("p-immutable", "sword", 500));
    store.record(&ev, &decide(&ev, &catalog)).await.unwrap();
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("s.db").display()))
            .await
            .unwrap();
    for sql in [
        "UPDATE ledger SET quantity = 2",
        "DELETE FROM ledger",
        "UPDATE events SET outcome = 'recorded'",
        "DELETE FROM events",
    ] {
        let err = sqlx::query(sql)
            .execute(&pool)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("append-only") || err.contains("immutable"),
            "{sql}: {err}"
        );
    }
}
