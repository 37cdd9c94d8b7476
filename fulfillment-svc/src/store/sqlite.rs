//! The embedded SQLite backend.
//!
//! Durability: WAL journal with `synchronous = FULL`. In WAL mode, `NORMAL` survives a
//! killed process but may lose the last commits on power loss or an OS crash; a 200 to
//! Coinflow cannot be taken back, so every commit fsyncs the WAL (`FULL`).
//!
//! Concurrency: one writer connection (SQLite admits one writer at a time anyway, so every
//! write transaction is serialised and sees the ones before it) and a pool of readers,
//! which WAL lets run beside the writer. sqlx runs each connection on its own thread, so no
//! SQLite call blocks the async runtime.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use coinflow_shared::proto::v1::{LedgerEntry, Outcome, RecordedEvent, WebhookEvent};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, SqlSafeStr, Sqlite};
use tokio::sync::watch;

use super::reconcile::{Delta, Held, Kind, deltas};
use super::{
    Ack, HeldPayment, LedgerFilter, Payer, PaymentRecord, Resolution, Resolved, Spend, Spent,
    Store, StoreError, micros, outcome_from_name, outcome_name, timestamp,
};
use crate::catalog::Grant;
use crate::decision::{Decision, GrantPlan, SETTLED};
use crate::lifecycle::{ChargebackPolicy, Facts};

/// SQLite storage.
#[derive(Debug)]
pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
    policy: ChargebackPolicy,
    commits: watch::Sender<i64>,
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

const LEDGER_COLUMNS: &str = "seq, payment_id, kind, sku, quantity, wallet, raw_customer_id, \
     item, event_key, recorded_at_us, catalog_version, actor, note";

fn ledger_entry(row: &SqliteRow) -> Result<LedgerEntry, sqlx::Error> {
    Ok(LedgerEntry {
        seq: row.try_get(0)?,
        payment_id: row.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
        kind: row.try_get(2)?,
        sku: row.try_get(3)?,
        quantity: row.try_get(4)?,
        wallet: row.try_get(5)?,
        raw_customer_id: row.try_get(6)?,
        item: row.try_get(7)?,
        event_key: row.try_get::<Option<String>, _>(8)?.unwrap_or_default(),
        recorded_at: Some(timestamp(row.try_get(9)?)),
        catalog_version: row.try_get(10)?,
        actor: row.try_get(11)?,
        note: row.try_get(12)?,
    })
}

/// The first held event of each payment still waiting for review (no plan, no review).
const HELD: &str = "e.outcome = 'held' AND e.payment_id IS NOT NULL \
     AND e.seq = (SELECT MIN(seq) FROM events h WHERE h.payment_id = e.payment_id AND h.outcome = 'held') \
     AND NOT EXISTS (SELECT 1 FROM plans p WHERE p.payment_id = e.payment_id) \
     AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.payment_id = e.payment_id)";

const EVENT_COLUMNS: &str = "event_key, event_type, category, created_raw, outcome, \
     held_reason, received_at_us, raw_body, refund_status, seq, payment_id, wallet, raw_customer_id";

fn recorded_event(row: &SqliteRow) -> Result<RecordedEvent, sqlx::Error> {
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
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`) and applies
    /// migrations. `policy` decides what an open chargeback does to a grant.
    pub async fn open(url: &str, policy: ChargebackPolicy) -> Result<Self, StoreError> {
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
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM ledger")
            .fetch_one(&write)
            .await
            .map_err(classify)?;
        Ok(Self {
            write,
            read,
            policy,
            commits: watch::Sender::new(last),
        })
    }

    fn notify(&self, entries: &[LedgerEntry]) {
        if let Some(last) = entries.iter().map(|e| e.seq).max() {
            self.commits.send_if_modified(|seq| {
                let newer = last > *seq;
                *seq = (*seq).max(last);
                newer
            });
        }
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

/// A payment's plan as stored.
struct StoredPlan {
    plan: GrantPlan,
}

async fn load_plan(
    conn: &mut SqliteConnection,
    payment_id: &str,
) -> Result<Option<StoredPlan>, StoreError> {
    let row = sqlx::query(
        "SELECT item, catalog_version, grants, wallet, raw_customer_id FROM plans WHERE payment_id = ?",
    )
    .bind(payment_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(classify)?;
    let Some(row) = row else { return Ok(None) };
    let grants: Vec<Grant> = serde_json::from_str(row.get::<&str, _>(2))
        .map_err(|e| StoreError::Setup(format!("corrupt plan for {payment_id}: {e}")))?;
    Ok(Some(StoredPlan {
        plan: GrantPlan {
            payment_id: payment_id.to_owned(),
            item: row.get(0),
            catalog_version: row.get(1),
            grants,
            wallet: row.get(3),
            raw_customer_id: row.get(4),
        },
    }))
}

async fn insert_plan(
    conn: &mut SqliteConnection,
    plan: &GrantPlan,
    source: &str,
    now: i64,
) -> Result<(), StoreError> {
    let grants = serde_json::to_string(&plan.grants)
        .map_err(|e| StoreError::Setup(format!("encoding plan: {e}")))?;
    sqlx::query(
        "INSERT INTO plans (payment_id, source, item, catalog_version, grants, wallet,
            raw_customer_id, recorded_at_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&plan.payment_id)
    .bind(source)
    .bind(&plan.item)
    .bind(&plan.catalog_version)
    .bind(grants)
    .bind(&plan.wallet)
    .bind(&plan.raw_customer_id)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(classify)?;
    Ok(())
}

async fn load_facts(conn: &mut SqliteConnection, payment_id: &str) -> Result<Facts, StoreError> {
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT event_type, refund_status FROM events WHERE payment_id = ?")
            .bind(payment_id)
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?;
    Ok(Facts::of(
        rows.iter().map(|(t, s)| (t.as_str(), s.as_deref())),
    ))
}

async fn load_held(
    conn: &mut SqliteConnection,
    payment_id: &str,
) -> Result<BTreeMap<String, Held>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sku, SUM(quantity) FROM ledger
         WHERE payment_id = ? AND kind IN ('grant', 'revoke', 'restore') GROUP BY sku",
    )
    .bind(payment_id)
    .fetch_all(&mut *conn)
    .await
    .map_err(classify)?;
    Ok(rows
        .into_iter()
        .map(|(sku, net)| (sku, Held { net, touched: true }))
        .collect())
}

async fn review_of(
    conn: &mut SqliteConnection,
    payment_id: &str,
) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar("SELECT decision FROM reviews WHERE payment_id = ?")
        .bind(payment_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(classify)
}

/// Who wrote an entry, and why.
struct Cause<'a> {
    event_key: Option<&'a str>,
    actor: &'a str,
    note: Option<&'a str>,
}

async fn append(
    conn: &mut SqliteConnection,
    plan: &GrantPlan,
    deltas: &[Delta],
    cause: &Cause<'_>,
    now: i64,
) -> Result<Vec<LedgerEntry>, StoreError> {
    let mut entry_no: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(entry_no), 0) FROM ledger WHERE payment_id = ?")
            .bind(&plan.payment_id)
            .fetch_one(&mut *conn)
            .await
            .map_err(classify)?;
    let mut written = Vec::with_capacity(deltas.len());
    for d in deltas {
        entry_no += 1;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, wallet,
                raw_customer_id, item, catalog_version, event_key, actor, note, recorded_at_us)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {LEDGER_COLUMNS}"
        )))
        .bind(&plan.payment_id)
        .bind(entry_no)
        .bind(d.kind.as_str())
        .bind(&d.sku)
        .bind(d.quantity)
        .bind(&plan.wallet)
        .bind(&plan.raw_customer_id)
        .bind(&plan.item)
        .bind(&plan.catalog_version)
        .bind(cause.event_key)
        .bind(cause.actor)
        .bind(cause.note)
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .map_err(classify)?;
        written.push(ledger_entry(&row).map_err(classify)?);
    }
    Ok(written)
}

/// The outcome an event gets from what reconciling did.
fn outcome_of(
    event: &WebhookEvent,
    decision: &Decision,
    planned: bool,
    entitled: bool,
    deltas: &[Delta],
) -> (Outcome, Option<&'static str>) {
    if let Some(d) = deltas.first() {
        return match d.kind {
            Kind::Grant => (Outcome::Granted, None),
            Kind::Restore => (Outcome::Restored, None),
            _ => (Outcome::Revoked, None),
        };
    }
    if event.event_type != SETTLED {
        return (Outcome::Recorded, None);
    }
    match decision {
        Decision::Hold(reason) if !planned => (Outcome::Held, Some(reason.as_str())),
        _ if planned && entitled => (Outcome::AlreadyGranted, None),
        _ => (Outcome::Recorded, None),
    }
}

fn payer_column(payer: &Payer) -> (&'static str, &str) {
    match payer {
        Payer::Wallet(w) => ("wallet", w),
        Payer::RawCustomerId(c) => ("raw_customer_id", c),
    }
}

#[async_trait]
impl Store for SqliteStore {
    #[tracing::instrument(name = "db.transaction", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "record"))]
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
                entries: Vec::new(),
                item: None,
            });
        }

        let now = micros(SystemTime::now());
        let mut plan_to_insert = None;
        let mut effect = None;
        let (outcome, held_reason) = match &event.payment_id {
            None => match decision {
                Decision::Hold(reason) => (Outcome::Held, Some(reason.as_str())),
                _ => (Outcome::Recorded, None),
            },
            Some(payment_id) => {
                let mut facts = load_facts(&mut tx, payment_id).await?;
                facts.add(&event.event_type, event.refund_status.as_deref());
                let rejected = review_of(&mut tx, payment_id).await?.as_deref() == Some("rejected");
                let mut plan = load_plan(&mut tx, payment_id).await?.map(|p| p.plan);
                if plan.is_none()
                    && !rejected
                    && let Decision::Grant(new) = decision
                {
                    plan = Some(new.clone());
                    plan_to_insert = Some(new);
                }
                let entitled = facts.entitled(self.policy);
                let target: &[Grant] = match &plan {
                    Some(p) if entitled => &p.grants,
                    _ => &[],
                };
                let current = load_held(&mut tx, payment_id).await?;
                let deltas = deltas(target, &current);
                let result = outcome_of(event, decision, plan.is_some(), entitled, &deltas);
                effect = plan.map(|p| (p, deltas));
                result
            }
        };

        let received = event
            .received_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .map_or(now, micros);
        sqlx::query(
            "INSERT INTO events (event_key, event_type, category, created_raw, payment_id, wallet,
                raw_customer_id, refund_status, outcome, held_reason, received_at_us,
                recorded_at_us, raw_body)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&event.event_key)
        .bind(&event.event_type)
        .bind(&event.category)
        .bind(&event.created_raw)
        .bind(&event.payment_id)
        .bind(&event.wallet)
        .bind(&event.raw_customer_id)
        .bind(&event.refund_status)
        .bind(outcome_name(outcome))
        .bind(held_reason)
        .bind(received)
        .bind(now)
        .bind(&event.raw_body[..])
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if let Some(plan) = plan_to_insert {
            insert_plan(&mut tx, plan, "catalog", now).await?;
        }
        let mut written = Vec::new();
        if let Some((plan, deltas)) = &effect {
            let cause = Cause {
                event_key: Some(&event.event_key),
                actor: "coinflow",
                note: None,
            };
            written = append(&mut tx, plan, deltas, &cause, now).await?;
        }
        tx.commit().await.map_err(classify)?;
        self.notify(&written);
        Ok(Ack {
            outcome,
            held_reason: held_reason.map(str::to_owned),
            duplicate: false,
            entries: written,
            item: effect.map(|(plan, _)| plan.item),
        })
    }

    async fn entitlements(&self, payer: &Payer) -> Result<Vec<(String, i64)>, StoreError> {
        let (column, key) = payer_column(payer);
        let sql = format!(
            "SELECT sku, SUM(quantity) FROM ledger WHERE {column} = ?
             GROUP BY sku HAVING SUM(quantity) <> 0 ORDER BY sku"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(key)
            .fetch_all(&self.read)
            .await
            .map_err(classify)
    }

    async fn payment(&self, payment_id: &str) -> Result<Option<PaymentRecord>, StoreError> {
        let mut conn = self.read.acquire().await.map_err(classify)?;
        let events = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE payment_id = ? ORDER BY seq"
        )))
        .bind(payment_id)
        .try_map(|row: SqliteRow| Ok((recorded_event(&row)?, row.try_get(8)?)))
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
        if events.is_empty() {
            return Ok(None);
        }
        let ledger = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE payment_id = ? ORDER BY seq"
        )))
        .bind(payment_id)
        .try_map(|row: SqliteRow| ledger_entry(&row))
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
        let review = review_of(&mut conn, payment_id).await?;
        let planned = load_plan(&mut conn, payment_id).await?.is_some();
        Ok(Some(PaymentRecord {
            events,
            ledger,
            review,
            planned,
        }))
    }

    async fn list_ledger(
        &self,
        filter: &LedgerFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut q =
            QueryBuilder::<Sqlite>::new(format!("SELECT {LEDGER_COLUMNS} FROM ledger WHERE 1 = 1"));
        if let Some(payer) = &filter.payer {
            let (column, key) = payer_column(payer);
            q.push(format!(" AND {column} = "))
                .push_bind(key.to_owned());
        }
        if let Some(p) = &filter.payment_id {
            q.push(" AND payment_id = ").push_bind(p.clone());
        }
        if let Some(s) = &filter.sku {
            q.push(" AND sku = ").push_bind(s.clone());
        }
        if let Some(t) = filter.since_us {
            q.push(" AND recorded_at_us >= ").push_bind(t);
        }
        if let Some(t) = filter.until_us {
            q.push(" AND recorded_at_us < ").push_bind(t);
        }
        if let Some(b) = before {
            q.push(" AND seq < ").push_bind(b);
        }
        q.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&self.read).await.map_err(classify)?;
        rows.iter()
            .map(ledger_entry)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    async fn entries_after(
        &self,
        payer: Option<&Payer>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE seq > "
        ));
        q.push_bind(after);
        if let Some(payer) = payer {
            let (column, key) = payer_column(payer);
            q.push(format!(" AND {column} = "))
                .push_bind(key.to_owned());
        }
        q.push(" ORDER BY seq LIMIT ").push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&self.read).await.map_err(classify)?;
        rows.iter()
            .map(ledger_entry)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    fn commits(&self) -> watch::Receiver<i64> {
        self.commits.subscribe()
    }

    async fn list_held(&self, after_seq: i64, limit: u32) -> Result<Vec<HeldPayment>, StoreError> {
        let mut conn = self.read.acquire().await.map_err(classify)?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events e WHERE {HELD} AND e.seq > ?
             ORDER BY e.seq LIMIT ?"
        )))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
        let mut held = Vec::with_capacity(rows.len());
        for row in rows {
            let payment_id: String = row.get(10);
            let event_types =
                sqlx::query_as("SELECT event_type, refund_status FROM events WHERE payment_id = ?")
                    .bind(&payment_id)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(classify)?;
            held.push(HeldPayment {
                seq: row.get(9),
                event: recorded_event(&row).map_err(classify)?,
                wallet: row.get(11),
                raw_customer_id: row.get(12),
                payment_id,
                event_types,
            });
        }
        Ok(held)
    }

    #[tracing::instrument(name = "db.transaction", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "resolve"))]
    async fn resolve(
        &self,
        payment_id: &str,
        resolution: &Resolution,
        operator: &str,
        note: &str,
    ) -> Result<Resolved, StoreError> {
        let decision = match resolution {
            Resolution::Approve(_) => "approved",
            Resolution::Reject { .. } => "rejected",
        };
        let mut tx = self.write.begin().await.map_err(classify)?;
        if let Some(done) = review_of(&mut tx, payment_id).await? {
            return if done == decision {
                Ok(Resolved {
                    review: done,
                    entries: Vec::new(),
                    duplicate: true,
                })
            } else {
                Err(StoreError::Precondition(format!(
                    "payment {payment_id:?} was already {done}; a review cannot be changed"
                )))
            };
        }
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT COUNT(*) FROM events WHERE payment_id = ? AND outcome = 'held'",
        )
        .bind(payment_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        let any: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE payment_id = ?)")
                .bind(payment_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
        if !any {
            return Err(StoreError::NotFound(format!(
                "no events recorded for payment {payment_id:?}"
            )));
        }
        if held.unwrap_or(0) == 0 || load_plan(&mut tx, payment_id).await?.is_some() {
            return Err(StoreError::Precondition(format!(
                "payment {payment_id:?} is not held for review"
            )));
        }
        let now = micros(SystemTime::now());
        let item = match resolution {
            Resolution::Approve(plan) => Some(plan.item.as_str()),
            Resolution::Reject { .. } => None,
        };
        sqlx::query(
            "INSERT INTO reviews (payment_id, decision, operator, note, item, recorded_at_us)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(payment_id)
        .bind(decision)
        .bind(operator)
        .bind(note)
        .bind(item)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        let actor = format!("operator:{operator}");
        let cause = Cause {
            event_key: None,
            actor: &actor,
            note: Some(note),
        };
        let entries = match resolution {
            Resolution::Approve(plan) => {
                insert_plan(&mut tx, plan, "review", now).await?;
                let facts = load_facts(&mut tx, payment_id).await?;
                let target: &[Grant] = if facts.entitled(self.policy) {
                    &plan.grants
                } else {
                    &[]
                };
                let current = load_held(&mut tx, payment_id).await?;
                append(&mut tx, plan, &deltas(target, &current), &cause, now).await?
            }
            Resolution::Reject {
                wallet,
                raw_customer_id,
            } => {
                let audit = GrantPlan {
                    payment_id: payment_id.to_owned(),
                    wallet: wallet.clone(),
                    raw_customer_id: raw_customer_id.clone(),
                    item: String::new(),
                    catalog_version: String::new(),
                    grants: Vec::new(),
                };
                let reject = Delta {
                    kind: Kind::Reject,
                    sku: String::new(),
                    quantity: 0,
                };
                append(&mut tx, &audit, &[reject], &cause, now).await?
            }
        };
        tx.commit().await.map_err(classify)?;
        self.notify(&entries);
        Ok(Resolved {
            review: decision.to_owned(),
            entries,
            duplicate: false,
        })
    }

    #[tracing::instrument(name = "db.transaction", skip_all, fields(otel.kind = "client", db.system.name = "sqlite", db.operation.name = "consume"))]
    async fn consume(&self, spend: &Spend) -> Result<Spent, StoreError> {
        let (column, key) = payer_column(&spend.payer);
        let mut tx = self.write.begin().await.map_err(classify)?;
        let balance_sql =
            format!("SELECT COALESCE(SUM(quantity), 0) FROM ledger WHERE {column} = ? AND sku = ?");
        let existing = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE idempotency_key = ?"
        )))
        .bind(&spend.idempotency_key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        if let Some(row) = existing {
            let entry = ledger_entry(&row).map_err(classify)?;
            let same_payer = match &spend.payer {
                Payer::Wallet(w) => &entry.wallet == w,
                Payer::RawCustomerId(c) => entry.raw_customer_id.as_ref() == Some(c),
            };
            if !same_payer || entry.sku != spend.sku || entry.quantity != -spend.quantity {
                return Err(StoreError::Precondition(format!(
                    "idempotency_key {:?} was used for a different spend",
                    spend.idempotency_key
                )));
            }
            let balance: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(balance_sql))
                .bind(key)
                .bind(&spend.sku)
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
            return Ok(Spent {
                entry,
                balance,
                duplicate: true,
            });
        }
        let balance: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(balance_sql))
            .bind(key)
            .bind(&spend.sku)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
        if balance < spend.quantity {
            return Err(StoreError::Precondition(format!(
                "insufficient balance: {key:?} holds {balance} {:?}, asked to consume {}",
                spend.sku, spend.quantity
            )));
        }
        let (wallet, customer) = match &spend.payer {
            Payer::Wallet(w) => (w.as_str(), None),
            Payer::RawCustomerId(c) => ("", Some(c.as_str())),
        };
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO ledger (kind, sku, quantity, wallet, raw_customer_id, actor,
                idempotency_key, recorded_at_us)
             VALUES ('consume', ?, ?, ?, ?, 'api', ?, ?) RETURNING {LEDGER_COLUMNS}"
        )))
        .bind(&spend.sku)
        .bind(-spend.quantity)
        .bind(wallet)
        .bind(customer)
        .bind(&spend.idempotency_key)
        .bind(micros(SystemTime::now()))
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        let entry = ledger_entry(&row).map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        self.notify(std::slice::from_ref(&entry));
        Ok(Spent {
            entry,
            balance: balance - spend.quantity,
            duplicate: false,
        })
    }

    async fn held_summary(&self) -> Result<(u64, Option<i64>), StoreError> {
        let (count, oldest): (i64, Option<i64>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*), MIN(e.received_at_us) FROM events e WHERE {HELD}"
        )))
        .fetch_one(&self.read)
        .await
        .map_err(classify)?;
        Ok((u64::try_from(count).unwrap_or(0), oldest))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.write)
            .await
            .map_err(classify)?;
        Ok(())
    }
}
