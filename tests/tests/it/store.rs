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

/// The release before migration 2 stored chargebacks without their ids; migrating fills
/// them in from the raw bodies, taking what the live path takes (a non-empty string),
/// whatever the body holds. So a dispute opened before the upgrade and won after it
/// closes, instead of counting as a dispute `""` that stays open.
#[tokio::test]
async fn migrating_fills_in_the_chargeback_ids_of_recorded_events_from_their_bodies() {
    use coinflow_tests::bodies::{chargeback, with_data};
    use coinflow_tests::db::Backend;
    use sqlx::SqlSafeStr;
    use sqlx::migrate::{Migration, MigrationType, Migrator};

    const OPENED: &str = "Card Payment Chargeback Opened";
    let db = TestDb::new().await;
    sqlx::any::install_default_drivers();
    let (url, first) = match db.backend {
        Backend::Sqlite => (
            format!("{}?mode=rwc", db.url),
            include_str!("../../../fulfillment-svc/migrations/sqlite/0001_ledger.sql"),
        ),
        Backend::Postgres => (
            db.url.clone(),
            include_str!("../../../fulfillment-svc/migrations/postgres/0001_ledger.sql"),
        ),
    };
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    Migrator::with_migrations(vec![Migration::new(
        1,
        "ledger".into(),
        MigrationType::Simple,
        first.into_sql_str(),
        false,
    )])
    .run(&pool)
    .await
    .unwrap();

    // What the release before recorded: a sword granted, then revoked when a chargeback
    // opened; and chargebacks whose bodies hold no usable id.
    let settled_body = settled("p-legacy", "sword", 500);
    let opened_body = chargeback(
        OPENED,
        "p-legacy",
        "sword",
        500,
        "2026-11-25T10:00:00Z",
        Some("cb_legacy"),
    );
    let base = |t: &str, p: &str| event(t, p, "sword", 500, "2026-11-26T10:00:00Z");
    let mut legacy: Vec<(String, String, Vec<u8>, Option<&str>)> = vec![
        (
            "k-settled".into(),
            "Settled".into(),
            settled_body.clone(),
            None,
        ),
        (
            "k-opened".into(),
            OPENED.into(),
            opened_body,
            Some("cb_legacy"),
        ),
        (
            "k-no-id".into(),
            "Card Payment Chargeback Won".into(),
            base("Card Payment Chargeback Won", "p-no-id"),
            None,
        ),
        (
            "k-number".into(),
            "PayPal Chargeback Opened".into(),
            with_data(
                &base("PayPal Chargeback Opened", "p-number"),
                &[("chargebackId", 42.into())],
            ),
            None,
        ),
        (
            "k-empty".into(),
            "Venmo Chargeback Lost".into(),
            with_data(
                &base("Venmo Chargeback Lost", "p-empty"),
                &[("chargebackId", "".into())],
            ),
            None,
        ),
        (
            "k-garbage".into(),
            OPENED.into(),
            b"{\"data\": not json \xff".to_vec(),
            None,
        ),
        (
            "k-not-a-chargeback".into(),
            "Settled".into(),
            with_data(
                &base("Settled", "p-other"),
                &[("chargebackId", "cb_ignored".into())],
            ),
            None,
        ),
    ];
    // The legacy Settled and Opened carry their real transport identities, so that a
    // redelivery after the upgrade is a duplicate.
    legacy[0].0 = proto(settled_body).event_key;
    legacy[1].0 = proto(legacy[1].2.clone()).event_key;
    for (key, event_type, body, _) in &legacy {
        let payment = if key == &legacy[0].0 || key == &legacy[1].0 {
            "p-legacy".to_owned()
        } else {
            format!("p-{key}")
        };
        sqlx::query(
            "INSERT INTO events (event_key, event_type, category, created_raw, payment_id,
                wallet, outcome, received_at_us, recorded_at_us, raw_body)
             VALUES ($1, $2, 'Purchase', '2026-11-25T10:00:00Z', $3, 'w', 'recorded', 0, 0, $4)",
        )
        .bind(key)
        .bind(event_type)
        .bind(payment)
        .bind(body.clone())
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO plans (payment_id, source, item, catalog_version, grants, wallet,
            raw_customer_id, recorded_at_us)
         VALUES ('p-legacy', 'catalog', 'sword', 'v-old', '[{\"sku\":\"sword\",\"quantity\":1}]',
            'mygameʬp-legacy', 'user-p-legacy', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (entry_no, kind, quantity, key) in [
        (1, "grant", 1, &legacy[0].0),
        (2, "revoke", -1, &legacy[1].0),
    ] {
        sqlx::query(
            "INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, wallet,
                raw_customer_id, item, catalog_version, event_key, actor, recorded_at_us)
             VALUES ('p-legacy', $1, $2, 'sword', $3, 'mygameʬp-legacy', 'user-p-legacy',
                'sword', 'v-old', $4, 'coinflow', 0)",
        )
        .bind(i64::from(entry_no))
        .bind(kind)
        .bind(i64::from(quantity))
        .bind(key)
        .execute(&pool)
        .await
        .unwrap();
    }

    // The upgrade.
    let (store, catalog) = open(&db).await;
    for (key, _, _, want) in &legacy {
        let got: Option<String> =
            sqlx::query_scalar("SELECT chargeback_id FROM events WHERE event_key = $1")
                .bind(key)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(got.as_deref(), *want, "{key}");
    }
    let won = proto(chargeback(
        "Card Payment Chargeback Won",
        "p-legacy",
        "sword",
        500,
        "2026-12-05T10:00:00Z",
        Some("cb_legacy"),
    ));
    let ack = store.record(&won, &decide(&won, &catalog)).await.unwrap();
    assert_eq!(ack.outcome, Outcome::Restored, "{ack:?}");
    assert_eq!(
        store
            .entitlements(&Payer::Wallet("mygameʬp-legacy".into()))
            .await
            .unwrap(),
        [("sword".to_owned(), 1)]
    );

    // PostgreSQL replicas of the release before keep recording during a rollout, without
    // the column: the database fills it in from the body.
    if db.backend == Backend::Postgres {
        let late = chargeback(
            OPENED,
            "p-late",
            "sword",
            500,
            "2026-11-27T10:00:00Z",
            Some("cb_late"),
        );
        sqlx::query(
            "INSERT INTO events (event_key, event_type, category, created_raw, payment_id,
                wallet, outcome, received_at_us, recorded_at_us, raw_body)
             VALUES ('k-late', $1, 'Purchase', '2026-11-27T10:00:00Z', 'p-late', 'w',
                'recorded', 0, 0, $2)",
        )
        .bind(OPENED)
        .bind(late)
        .execute(&pool)
        .await
        .unwrap();
        let got: Option<String> =
            sqlx::query_scalar("SELECT chargeback_id FROM events WHERE event_key = 'k-late'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(got.as_deref(), Some("cb_late"));
    }
}

/// PostgreSQL: the reads have a pool of their own. However many readers crowd in (queries,
/// watch streams polling), they hold at most its 4 connections, and ingest, on the write
/// pool, records every event meanwhile.
#[tokio::test]
async fn readers_hold_only_their_own_pool_while_ingest_records() {
    use std::sync::atomic::{AtomicBool, Ordering};

    use coinflow_tests::db::Backend;
    use fulfillment_svc::store::LedgerFilter;

    let db = TestDb::new().await;
    if db.backend != Backend::Postgres {
        return; // SQLite's readers have a read-only pool of their own.
    }
    let (store, catalog) = open(&db).await;
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut most = (0_i64, 0_i64);
            while !done.load(Ordering::Relaxed) {
                let (read, write): (i64, i64) = sqlx::query_as(
                    "SELECT
                        CAST(COUNT(*) FILTER (WHERE application_name = 'fulfillment-svc/read') AS BIGINT),
                        CAST(COUNT(*) FILTER (WHERE application_name = 'fulfillment-svc/write') AS BIGINT)
                     FROM pg_stat_activity WHERE datname = current_database()",
                )
                .fetch_one(&admin)
                .await
                .unwrap();
                most = (most.0.max(read), most.1.max(write));
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            most
        })
    };
    let readers = (0..64).map(|i| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let payer = Payer::Wallet(format!("mygameʬp-pool-{i}"));
            for _ in 0..10 {
                store.entries_after(None, 0, 500).await.unwrap();
                store.entitlements(&payer).await.unwrap();
                let filter = LedgerFilter {
                    payer: Some(payer.clone()),
                    ..LedgerFilter::default()
                };
                store.list_ledger(&filter, None, 100).await.unwrap();
            }
        })
    });
    let writers = (0..64).map(|i| {
        let ev = proto(settled(&format!("p-pool-{i}"), "sword", 500));
        let decision = decide(&ev, &catalog);
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.record(&ev, &decision).await.unwrap() })
    });
    let (readers, writers) = futures::future::join(
        futures::future::join_all(readers),
        futures::future::join_all(writers),
    )
    .await;
    done.store(true, Ordering::Relaxed);
    let (reads, writes) = sampler.await.unwrap();
    for r in readers {
        r.unwrap();
    }
    for ack in writers {
        assert_eq!(ack.unwrap().outcome, Outcome::Granted);
    }
    assert!((1..=4).contains(&reads), "read connections: {reads}");
    assert!(writes >= 1, "write connections: {writes}");
}

/// PostgreSQL: a new ledger finds its rows through indexes from its first event. With no
/// statistics yet (before autovacuum's first `ANALYZE`), the planner would read the ledger
/// whole for every batch's lookups by payment, and keep doing so as it grows; every
/// connection here forbids that (`enable_seqscan = off`). The scans are counted by the
/// server itself, once the store's connections have closed and reported them.
#[tokio::test]
async fn a_new_postgres_ledger_is_searched_through_indexes_before_any_analyze() {
    use coinflow_tests::db::Backend;
    use sqlx::Connection;

    /// Sequential scans of `events`, `ledger` and `plans`, once the server has counted
    /// `inserts` rows into `counted` (so the closed connections' reports are in).
    async fn scans(db: &TestDb, counted: &str, inserts: i64) -> Vec<i64> {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        for _ in 0..200 {
            let inserted: i64 =
                sqlx::query_scalar("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = $1")
                    .bind(counted)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            if inserted >= inserts {
                let mut scans = Vec::new();
                for table in ["events", "ledger", "plans"] {
                    scans.push(
                        sqlx::query_scalar(
                            "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = $1",
                        )
                        .bind(table)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap(),
                    );
                }
                return scans;
            }
            sqlx::query("SELECT pg_stat_clear_snapshot()")
                .execute(&mut conn)
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("{counted}: the server never counted {inserts} inserts");
    }

    let migrated_only = TestDb::new().await;
    if migrated_only.backend != Backend::Postgres {
        return; // SQLite's plans: `account_statements_search_the_ledger_by_index`.
    }
    drop(open(&migrated_only).await);
    // What the migrations scan themselves (a backfill reads `events`).
    let migrations = scans(&migrated_only, "_sqlx_migrations", 3).await;

    let db = TestDb::new().await;
    let (store, catalog) = open(&db).await;
    let n = 3000;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = Arc::clone(&store);
            let settled = proto(settled(&format!("new-{i}"), "sword", 500));
            let decision = decide(&settled, &catalog);
            tokio::spawn(async move { store.record(&settled, &decision).await.unwrap() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().outcome, Outcome::Granted);
    }
    drop(store);
    for counted in ["events", "ledger", "plans"] {
        assert_eq!(
            scans(&db, counted, n).await,
            migrations,
            "sequential scans of events, ledger and plans beyond the migrations' own"
        );
    }
}
