//! The embedded SQLite backend.
//!
//! Durability: WAL journal with `synchronous = FULL`. In WAL mode, `NORMAL` survives a
//! killed process but may lose the last commits on power loss or an OS crash; a 200 to
//! Coinflow cannot be taken back, so every commit fsyncs the WAL (`FULL`).
//!
//! Concurrency: one writer connection (SQLite admits one writer at a time anyway, and a
//! single connection never sees `SQLITE_BUSY` from itself) and a pool of readers, which
//! WAL lets run beside the writer. sqlx runs each connection on its own thread, so no
//! SQLite call blocks the async runtime.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use coinflow_shared::proto::v1::{LedgerEntry, Outcome, RecordedEvent, WebhookEvent};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqlSafeStr};

use super::{
    Ack, Payer, PaymentRecord, Store, StoreError, micros, outcome_from_name, outcome_name,
    timestamp,
};
use crate::decision::Decision;

/// SQLite storage.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "ledger".into(),
        MigrationType::Simple,
        include_str!("../../migrations/sqlite/0001_ledger.sql").into_sql_str(),
        false,
    )])
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`) and applies
    /// migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Setup(format!("bad database URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(2))
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Setup(format!("opening {url}: {e}")))?;
        migrator()
            .run(&write)
            .await
            .map_err(|e| StoreError::Setup(format!("migrating {url}: {e}")))?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options.read_only(true))
            .await
            .map_err(|e| StoreError::Setup(format!("opening {url} for reads: {e}")))?;
        Ok(Self { write, read })
    }
}

fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
        sqlx::Error::Database(db) => {
            // SQLITE_BUSY (5), SQLITE_LOCKED (6), SQLITE_IOERR (10), SQLITE_FULL (13),
            // SQLITE_CANTOPEN (14), with their extended codes.
            let primary = db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
            if matches!(primary, Some(5 | 6 | 10 | 13 | 14)) {
                StoreError::Unavailable(e)
            } else {
                StoreError::Internal(e)
            }
        }
        _ => StoreError::Internal(e),
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn record(&self, event: &WebhookEvent, decision: &Decision) -> Result<Ack, StoreError> {
        let mut tx = self.write.begin().await.map_err(classify)?;
        let existing = sqlx::query("SELECT outcome, held_reason FROM events WHERE event_key = ?")
            .bind(&event.event_key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?;
        if let Some(row) = existing {
            return Ok(Ack {
                outcome: outcome_from_name(row.get::<&str, _>(0)),
                held_reason: row.get(1),
                duplicate: true,
            });
        }

        let (outcome, held_reason, plan) = match decision {
            Decision::Record => (Outcome::Recorded, None, None),
            Decision::Hold(reason) => (Outcome::Held, Some(reason.as_str()), None),
            Decision::Grant(plan) => {
                let granted: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM ledger WHERE payment_id = ?)")
                        .bind(&plan.payment_id)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(classify)?;
                if granted {
                    (Outcome::AlreadyGranted, None, None)
                } else {
                    (Outcome::Granted, None, Some(plan))
                }
            }
        };

        let now = micros(SystemTime::now());
        let received = event
            .received_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .map_or(now, micros);
        sqlx::query(
            "INSERT INTO events (event_key, event_type, category, created_raw, payment_id, wallet,
                raw_customer_id, outcome, held_reason, received_at_us, recorded_at_us, raw_body)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&event.event_key)
        .bind(&event.event_type)
        .bind(&event.category)
        .bind(&event.created_raw)
        .bind(&event.payment_id)
        .bind(&event.wallet)
        .bind(&event.raw_customer_id)
        .bind(outcome_name(outcome))
        .bind(held_reason)
        .bind(received)
        .bind(now)
        .bind(&event.raw_body[..])
        .execute(&mut *tx)
        .await
        .map_err(classify)?;

        if let Some(plan) = plan {
            for (entry_no, grant) in (1_i64..).zip(&plan.grants) {
                sqlx::query(
                    "INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, wallet,
                        raw_customer_id, item, catalog_version, event_key, recorded_at_us)
                     VALUES (?, ?, 'grant', ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(&plan.payment_id)
                .bind(entry_no)
                .bind(&grant.sku)
                .bind(grant.quantity)
                .bind(&plan.wallet)
                .bind(&plan.raw_customer_id)
                .bind(&plan.item)
                .bind(&plan.catalog_version)
                .bind(&event.event_key)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            }
        }
        tx.commit().await.map_err(classify)?;
        Ok(Ack {
            outcome,
            held_reason: held_reason.map(str::to_owned),
            duplicate: false,
        })
    }

    async fn entitlements(&self, payer: &Payer) -> Result<Vec<(String, i64)>, StoreError> {
        let (sql, key) = match payer {
            Payer::Wallet(w) => (
                "SELECT sku, SUM(quantity) FROM ledger WHERE wallet = ?
                 GROUP BY sku HAVING SUM(quantity) <> 0 ORDER BY sku",
                w,
            ),
            Payer::RawCustomerId(c) => (
                "SELECT sku, SUM(quantity) FROM ledger WHERE raw_customer_id = ?
                 GROUP BY sku HAVING SUM(quantity) <> 0 ORDER BY sku",
                c,
            ),
        };
        sqlx::query_as(sql)
            .bind(key)
            .fetch_all(&self.read)
            .await
            .map_err(classify)
    }

    async fn payment(&self, payment_id: &str) -> Result<Option<PaymentRecord>, StoreError> {
        let events = sqlx::query(
            "SELECT event_key, event_type, category, created_raw, outcome, held_reason,
                    received_at_us, raw_body
             FROM events WHERE payment_id = ? ORDER BY seq",
        )
        .bind(payment_id)
        .try_map(|row: SqliteRow| {
            Ok(RecordedEvent {
                event_key: row.try_get(0)?,
                event_type: row.try_get(1)?,
                category: row.try_get(2)?,
                created_raw: row.try_get(3)?,
                outcome: outcome_from_name(row.try_get(4)?).into(),
                held_reason: row.try_get(5)?,
                received_at: Some(timestamp(row.try_get(6)?)),
                raw_body: row.try_get::<Vec<u8>, _>(7)?.into(),
            })
        })
        .fetch_all(&self.read)
        .await
        .map_err(classify)?;
        if events.is_empty() {
            return Ok(None);
        }
        let ledger = sqlx::query(
            "SELECT seq, payment_id, kind, sku, quantity, wallet, raw_customer_id, item,
                    event_key, recorded_at_us
             FROM ledger WHERE payment_id = ? ORDER BY seq",
        )
        .bind(payment_id)
        .try_map(|row: SqliteRow| {
            Ok(LedgerEntry {
                seq: row.try_get(0)?,
                payment_id: row.try_get(1)?,
                kind: row.try_get(2)?,
                sku: row.try_get(3)?,
                quantity: row.try_get(4)?,
                wallet: row.try_get(5)?,
                raw_customer_id: row.try_get(6)?,
                item: row.try_get(7)?,
                event_key: row.try_get(8)?,
                recorded_at: Some(timestamp(row.try_get(9)?)),
            })
        })
        .fetch_all(&self.read)
        .await
        .map_err(classify)?;
        Ok(Some(PaymentRecord { events, ledger }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.write)
            .await
            .map_err(classify)?;
        Ok(())
    }
}
