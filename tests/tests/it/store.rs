//! The store directly, on this run's backend: the database, not process memory, enforces
//! exactly-once, and recorded rows cannot change.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use coinflow_shared::convert::to_proto;
use coinflow_shared::envelope::Envelope;
use coinflow_shared::proto::v1::{Outcome, WebhookEvent};
use coinflow_tests::TestDb;
use coinflow_tests::bodies::{event, settled};
use fulfillment_svc::catalog::Catalog;
use fulfillment_svc::decision::decide;
use fulfillment_svc::store::sql::{Migrations, SqlStore};
use fulfillment_svc::store::{Payer, Store};

fn proto(body: Vec<u8>) -> WebhookEvent {
    let env = Envelope::parse(&body).unwrap();
    to_proto(env, Bytes::from(body), SystemTime::now())
}

async fn open(db: &TestDb) -> (Arc<SqlStore>, Catalog) {
    let store = SqlStore::open(&db.url, Default::default(), Migrations::Apply)
        .await
        .unwrap();
    let catalog = Catalog::load(&coinflow_tests::catalog_path()).unwrap();
    (Arc::new(store), catalog)
}

#[tokio::test]
async fn concurrent_records_of_one_payment_grant_once() {
    let db = TestDb::new().await;
    let (store, catalog) = open(&db).await;
    // Two stores on one database stand for two replicas.
    let (other, _) = open(&db).await;
    // 10 copies of one delivery and 10 other deliveries of the same payment, all at once.
    let tasks = (0..20).map(|i| {
        let created = if i % 2 == 0 {
            "2026-01-01T00:00:00Z".to_owned()
        } else {
            format!("2026-01-01T00:00:{i:02}Z")
        };
        let ev = proto(event("Settled", "p-race", "sword", 500, &created));
        let decision = decide(&ev, &catalog);
        let store = if i % 4 < 2 {
            Arc::clone(&store)
        } else {
            Arc::clone(&other)
        };
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
async fn a_refund_racing_its_settled_on_two_replicas_still_reverses() {
    let db = TestDb::new().await;
    let (a, catalog) = open(&db).await;
    let (b, _) = open(&db).await;
    for i in 0..20 {
        let payment = format!("p-race-refund-{i}");
        let settled = proto(settled(&payment, "sword", 500));
        let refund = proto(event(
            "Refund",
            &payment,
            "sword",
            500,
            "2026-11-22T00:00:00Z",
        ));
        let (ds, dr) = (decide(&settled, &catalog), decide(&refund, &catalog));
        let (a, b) = (Arc::clone(&a), Arc::clone(&b));
        let one = tokio::spawn(async move { a.record(&settled, &ds).await.unwrap() });
        let two = tokio::spawn(async move { b.record(&refund, &dr).await.unwrap() });
        one.await.unwrap();
        two.await.unwrap();
        let wallet = format!("mygameʬ{payment}");
        assert!(
            other_entitlements(&db, &wallet).await.is_empty(),
            "{payment}: a refunded payment keeps nothing"
        );
    }
}

async fn other_entitlements(db: &TestDb, wallet: &str) -> Vec<(String, i64)> {
    let (store, _) = open(db).await;
    store
        .entitlements(&Payer::Wallet(wallet.into()))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_redelivery_returns_the_original_outcome() {
    let db = TestDb::new().await;
    let (store, catalog) = open(&db).await;
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
    let db = TestDb::new().await;
    let (store, catalog) = open(&db).await;
    let ev = proto(settled("p-immutable", "sword", 500));
    store.record(&ev, &decide(&ev, &catalog)).await.unwrap();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
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

#[tokio::test]
async fn a_database_that_was_not_migrated_is_refused_with_what_to_do() {
    let db = TestDb::new().await;
    let err = SqlStore::open(&db.url, Default::default(), Migrations::Require)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("fulfillment-svc migrate"), "{err}");
    SqlStore::migrate(&db.url).await.unwrap();
    SqlStore::open(&db.url, Default::default(), Migrations::Require)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_event_that_fails_fails_alone_among_concurrent_ones() {
    let db = TestDb::new().await;
    let (store, catalog) = open(&db).await;
    // A plan that cannot be read makes recording any event of that payment fail, whichever
    // group commit it joins.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    sqlx::query(
        "INSERT INTO plans (payment_id, source, item, catalog_version, grants, wallet, recorded_at_us)
         VALUES ('p-corrupt', 'catalog', 'sword', 'v1', 'not json', 'w', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let tasks = (0..40).map(|i| {
        let payment = if i % 10 == 5 {
            "p-corrupt".to_owned()
        } else {
            format!("p-fine-{i}")
        };
        let ev = proto(event(
            "Settled",
            &payment,
            "sword",
            500,
            &format!("2026-01-01T00:00:{i:02}Z"),
        ));
        let decision = decide(&ev, &catalog);
        let store = Arc::clone(&store);
        tokio::spawn(async move { (payment, store.record(&ev, &decision).await) })
    });
    for (payment, result) in futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
    {
        if payment == "p-corrupt" {
            assert!(result.is_err(), "{payment}: {result:?}");
        } else {
            let ack = result.unwrap_or_else(|e| panic!("{payment}: {e}"));
            assert_eq!((ack.outcome, ack.entries.len()), (Outcome::Granted, 1));
        }
    }
    let events: i64 = sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 36);
}
