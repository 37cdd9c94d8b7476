//! The SQL backends behind [`Store`]: embedded SQLite (the default, one process) and
//! PostgreSQL (several replicas sharing one ledger), one implementation over sqlx's `Any`
//! driver, chosen by the URL scheme. Queries use `$n` placeholders, which both accept.
//!
//! Durability: SQLite runs in WAL mode. In WAL mode `synchronous = NORMAL` survives a
//! killed process but may lose the last commits on power loss or an OS crash; a 200 to
//! Coinflow cannot be taken back, so no commit is acked before the WAL is fsynced. The
//! sqlx writer connection (reviews, spends) commits with `synchronous = FULL`; the webhook
//! writer commits with `NORMAL` and fsyncs the WAL itself before it answers, off its
//! commit path ([`super::sqlite_writer`]). PostgreSQL commits are durable with its
//! defaults (`synchronous_commit = on`).
//!
//! Concurrency and exactly-once, enforced by the database, never by process memory:
//! - SQLite admits one writer at a time: webhook events go through the group-commit
//!   writer thread ([`super::sqlite_writer`]); reviews and spends use one sqlx writer
//!   connection; both take the write lock with `BEGIN IMMEDIATE` and wait on it.
//! - PostgreSQL serialises the transactions of one payment with a transaction-scoped
//!   advisory lock on its id (and one payer's spends on the payer), so each sees the
//!   others' events before reconciling. Ledger appends take one more advisory lock, held
//!   to commit, so `seq` order is commit order and a `WatchEntitlements` cursor never
//!   skips a late commit.
//! - Unique keys back all of it: `events.event_key`, `plans.payment_id`,
//!   `reviews.payment_id`, `ledger (payment_id, entry_no)`, `ledger.idempotency_key`. A
//!   writer that loses a race gets a unique violation, and the whole transaction is
//!   retried: it then sees what won and returns that.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use coinflow_shared::proto::v1::{LedgerEntry, Outcome, RecordedEvent, WebhookEvent};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Connection, Executor, Row, SqlSafeStr};
use std::sync::Arc;

use tokio::sync::watch;

use super::queue::Queue;
use super::reconcile::{Delta, Held, Kind, Stored, apply, deltas};
use super::sqlite_writer;
use super::{
    Ack, HeldPayment, LedgerFilter, Payer, PaymentRecord, Resolution, Resolved, Spend, Spent,
    Store, StoreError, micros, outcome_from_name, outcome_name, timestamp,
};
use crate::catalog::Grant;
use crate::decision::{Decision, GrantPlan};
use crate::lifecycle::{ChargebackPolicy, Facts};

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://path`
    Sqlite,
    /// `postgres://…` or `postgresql://…`
    Postgres,
}

impl Backend {
    /// The backend a database URL names.
    pub fn of(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Self::Postgres)
        } else {
            Err(StoreError::Setup(format!(
                "unsupported database URL {:?}: expected sqlite://<path> or postgres://…",
                redact(url)
            )))
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgresql",
        }
    }

    fn migrator(self) -> Migrator {
        let sql = match self {
            Self::Sqlite => include_str!("../../migrations/sqlite/0001_ledger.sql"),
            Self::Postgres => include_str!("../../migrations/postgres/0001_ledger.sql"),
        };
        Migrator::with_migrations(vec![Migration::new(
            1,
            "ledger".into(),
            MigrationType::Simple,
            sql.into_sql_str(),
            false,
        )])
    }
}

/// A database URL with any password replaced, for errors and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// SQL storage.
#[derive(Debug)]
pub struct SqlStore {
    core: Arc<Core>,
    /// The backend's group-commit write path for webhook events.
    events: Queue,
}

/// What every write path needs.
#[derive(Debug)]
struct Core {
    write: AnyPool,
    read: AnyPool,
    backend: Backend,
    policy: ChargebackPolicy,
    commits: Arc<watch::Sender<i64>>,
}

/// How [`SqlStore::open`] treats migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrations {
    /// Apply pending migrations.
    Apply,
    /// Require them applied already (a `migrate` Job ran).
    Require,
}

const ADVISORY_LEDGER_APPEND: i64 = 0x636f_696e_666c_6f77; // "coinflow"
const MAX_ATTEMPTS: u32 = 8;

const LEDGER_COLUMNS: &str = "seq, payment_id, kind, sku, quantity, wallet, raw_customer_id, \
     item, event_key, recorded_at_us, catalog_version, actor, note";

/// The first held event of each payment still waiting for review (no plan, no review).
/// `h.outcome =
/// e.outcome` (not `= 'held'`) keeps SQLite on `events_by_payment` for the inner lookup:
/// through the partial index `events_held` it scanned every held event for each one, which
/// made the queue gauge quadratic in the queue's size.
const HELD: &str = "e.outcome = 'held' AND e.payment_id IS NOT NULL \
     AND NOT EXISTS (SELECT 1 FROM events h WHERE h.payment_id = e.payment_id AND h.outcome = e.outcome AND h.seq < e.seq) \
     AND NOT EXISTS (SELECT 1 FROM plans p WHERE p.payment_id = e.payment_id) \
     AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.payment_id = e.payment_id)";

const EVENT_COLUMNS: &str = "event_key, event_type, category, created_raw, outcome, \
     held_reason, received_at_us, raw_body, refund_status, seq, payment_id, wallet, raw_customer_id";

fn ledger_entry(row: &AnyRow) -> Result<LedgerEntry, sqlx::Error> {
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

fn recorded_event(row: &AnyRow) -> Result<RecordedEvent, sqlx::Error> {
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

/// The file a `sqlite://path?options` URL names.
fn sqlite_path(url: &str) -> std::path::PathBuf {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    std::path::PathBuf::from(rest.split('?').next().unwrap_or(rest))
}

/// `sqlite://path` with `mode` (rwc: create if missing; ro: read-only).
fn sqlite_url(url: &str, mode: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}mode={mode}")
}

async fn connect(url: &str, max: u32, pragmas: &'static str) -> Result<AnyPool, StoreError> {
    sqlx::any::install_default_drivers();
    let options = AnyConnectOptions::from_str(url)
        .map_err(|e| StoreError::Setup(format!("bad database URL {}: {e}", redact(url))))?;
    AnyPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(3))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if !pragmas.is_empty() {
                    conn.execute(pragmas).await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| StoreError::Setup(format!("connecting to {}: {e}", redact(url))))
}

const SQLITE_WRITER: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 2000;";
const SQLITE_READER: &str = "PRAGMA busy_timeout = 2000;";

impl SqlStore {
    /// Opens the database at `url`. SQLite files are created if missing; `migrations`
    /// says whether to apply pending migrations or require them done.
    pub async fn open(
        url: &str,
        policy: ChargebackPolicy,
        migrations: Migrations,
    ) -> Result<Self, StoreError> {
        let backend = Backend::of(url)?;
        let (write, read) = match backend {
            Backend::Sqlite => {
                let write = connect(&sqlite_url(url, "rwc"), 1, SQLITE_WRITER).await?;
                // The file and its WAL exist once the writer connected.
                let read = connect(&sqlite_url(url, "ro"), 4, SQLITE_READER).await?;
                (write, read)
            }
            Backend::Postgres => {
                let pool = connect(url, 16, "").await?;
                (pool.clone(), pool)
            }
        };
        match migrations {
            Migrations::Apply => backend
                .migrator()
                .run(&write)
                .await
                .map_err(|e| StoreError::Setup(format!("migrating {}: {e}", redact(url))))?,
            Migrations::Require => {
                let latest = backend
                    .migrator()
                    .iter()
                    .map(|m| m.version)
                    .max()
                    .unwrap_or(0);
                let applied: Option<i64> = sqlx::query_scalar(
                    "SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE",
                )
                .fetch_one(&write)
                .await
                .unwrap_or(None);
                if applied.unwrap_or(0) < latest {
                    return Err(StoreError::Setup(format!(
                        "{} is not migrated to version {latest}: run `fulfillment-svc migrate` \
                         (or start with --migrate-on-start)",
                        redact(url)
                    )));
                }
            }
        }
        let last: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM ledger")
                .fetch_one(&write)
                .await
                .map_err(classify)?;
        let core = Arc::new(Core {
            write,
            read,
            backend,
            policy,
            commits: Arc::new(watch::Sender::new(last)),
        });
        let events = match backend {
            Backend::Sqlite => {
                sqlite_writer::start(&sqlite_path(url), policy, Arc::clone(&core.commits))?
            }
            Backend::Postgres => pg_batch::start(&core),
        };
        Ok(Self { core, events })
    }

    /// Applies pending migrations to `url` and returns (for the `migrate` subcommand).
    pub async fn migrate(url: &str) -> Result<(), StoreError> {
        Self::open(url, ChargebackPolicy::default(), Migrations::Apply)
            .await
            .map(drop)
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.core.backend
    }

    async fn record_once(
        &self,
        event: &WebhookEvent,
        decision: &Decision,
    ) -> Result<Ack, StoreError> {
        self.events.record(event, decision).await
    }
}

impl Core {
    fn notify(&self, entries: &[LedgerEntry]) {
        super::queue::notify(&self.commits, entries);
    }

    /// Begins a write transaction. SQLite takes the write lock at once (`IMMEDIATE`), so a
    /// transaction never has to upgrade a stale read snapshot.
    async fn begin<'c>(
        &self,
        conn: &'c mut AnyConnection,
    ) -> Result<sqlx::Transaction<'c, sqlx::Any>, StoreError> {
        let statement = match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        conn.begin_with(statement).await.map_err(classify)
    }

    /// Serialises this transaction with every other one holding any of `keys` (PostgreSQL;
    /// SQLite has a single writer already). The locks are taken in one round trip, in
    /// sorted order (a VALUES list is scanned in order), so two transactions taking
    /// several never deadlock.
    async fn lock(&self, conn: &mut AnyConnection, keys: &[&str]) -> Result<(), StoreError> {
        let keys: BTreeSet<&str> = keys.iter().copied().collect();
        if self.backend != Backend::Postgres || keys.is_empty() {
            return Ok(());
        }
        let mut query = sqlx::query(AssertSqlSafe(format!(
            "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM (VALUES {}) AS v(k)",
            placeholders(keys.len(), 1)
        )));
        for key in keys {
            query = query.bind(key);
        }
        query.execute(&mut *conn).await.map_err(classify)?;
        Ok(())
    }

    /// Holds ledger appends until this transaction commits, so `seq` order is commit
    /// order (PostgreSQL; SQLite's single writer gives that already).
    async fn lock_appends(&self, conn: &mut AnyConnection) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(ADVISORY_LEDGER_APPEND)
                .execute(&mut *conn)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    /// Appends `deltas` for `plan`'s payment, numbered after its last entry.
    async fn append(
        &self,
        conn: &mut AnyConnection,
        plan: &GrantPlan,
        deltas: &[Delta],
        cause: &Cause<'_>,
        now: i64,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut written = self
            .append_many(
                conn,
                &[Appending {
                    plan,
                    deltas,
                    cause,
                    now,
                }],
            )
            .await?;
        Ok(written.pop().unwrap_or_default())
    }

    /// Appends each item's deltas for its payment (at most one item per payment), in one
    /// statement, numbered after each payment's last entry; returns each item's entries.
    async fn append_many(
        &self,
        conn: &mut AnyConnection,
        items: &[Appending<'_>],
    ) -> Result<Vec<Vec<LedgerEntry>>, StoreError> {
        let mut written: Vec<Vec<LedgerEntry>> = items.iter().map(|_| Vec::new()).collect();
        let rows: usize = items.iter().map(|i| i.deltas.len()).sum();
        if rows == 0 {
            return Ok(written);
        }
        self.lock_appends(&mut *conn).await?;
        const COLUMNS: usize = 13;
        let values = (0..rows)
            .map(|r| {
                let p = |c: usize| format!("${}", r * COLUMNS + c);
                format!(
                    "({}, (SELECT COALESCE(MAX(entry_no), 0) FROM ledger WHERE payment_id = {}) + {}, {})",
                    p(1),
                    p(1),
                    p(2),
                    (3..=COLUMNS).map(p).collect::<Vec<_>>().join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, wallet,
                raw_customer_id, item, catalog_version, event_key, actor, note, recorded_at_us)
             VALUES {values} RETURNING {LEDGER_COLUMNS}"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for item in items {
            for (k, d) in (1_i64..).zip(item.deltas) {
                query = query
                    .bind(&item.plan.payment_id)
                    .bind(k)
                    .bind(d.kind.as_str())
                    .bind(&d.sku)
                    .bind(d.quantity)
                    .bind(&item.plan.wallet)
                    .bind(&item.plan.raw_customer_id)
                    .bind(&item.plan.item)
                    .bind(&item.plan.catalog_version)
                    .bind(item.cause.event_key)
                    .bind(item.cause.actor)
                    .bind(item.cause.note)
                    .bind(item.now);
            }
        }
        let mut entries = query
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?
            .iter()
            .map(ledger_entry)
            .collect::<Result<Vec<_>, _>>()
            .map_err(classify)?;
        entries.sort_by_key(|e| e.seq);
        for entry in entries {
            if let Some(i) = items
                .iter()
                .position(|i| i.plan.payment_id == entry.payment_id)
            {
                written[i].push(entry);
            }
        }
        Ok(written)
    }

    async fn record_once(
        &self,
        event: &WebhookEvent,
        decision: &Decision,
    ) -> Result<Ack, StoreError> {
        let mut conn = self.write.acquire().await.map_err(classify)?;
        let mut tx = self.begin(&mut conn).await?;
        let ack = self.record_in(&mut tx, event, decision).await?;
        tx.commit().await.map_err(classify)?;
        self.notify(&ack.entries);
        Ok(ack)
    }

    /// Records one event inside the caller's transaction (no commit).
    async fn record_in(
        &self,
        tx: &mut AnyConnection,
        event: &WebhookEvent,
        decision: &Decision,
    ) -> Result<Ack, StoreError> {
        if let Some(payment_id) = &event.payment_id {
            self.lock(tx, &[payment_id]).await?;
        }
        let prepared = self.prepare(tx, &[(event, decision)]).await?;
        let mut acks = self.finish(tx, prepared).await?;
        acks.pop()
            .ok_or_else(|| StoreError::Setup("recording an event returned no ack".into()))
    }

    /// Records events up to their ledger entries, with a few statements for all of them:
    /// their payments' locks must be held already, and no two may share a payment or an
    /// event key.
    async fn prepare(
        &self,
        tx: &mut AnyConnection,
        events: &[(&WebhookEvent, &Decision)],
    ) -> Result<Vec<Prepared>, StoreError> {
        let keys: Vec<&str> = events.iter().map(|(e, _)| e.event_key.as_str()).collect();
        let mut existing: HashMap<String, (String, Option<String>)> = HashMap::new();
        for row in fetch_in(
            tx,
            "SELECT event_key, outcome, held_reason FROM events WHERE event_key IN",
            &keys,
            "",
        )
        .await?
        {
            existing.insert(
                row.try_get(0).map_err(classify)?,
                (
                    row.try_get(1).map_err(classify)?,
                    row.try_get(2).map_err(classify)?,
                ),
            );
        }
        let payments: Vec<&str> = events
            .iter()
            .filter(|(e, _)| !existing.contains_key(&e.event_key))
            .filter_map(|(e, _)| e.payment_id.as_deref())
            .collect();
        let mut stored = load_stored(tx, &payments).await?;

        let now = micros(SystemTime::now());
        let mut prepared = Vec::with_capacity(events.len());
        let mut new_events = Vec::new();
        let mut new_plans = Vec::new();
        for &(event, decision) in events {
            if let Some((outcome, held_reason)) = existing.remove(&event.event_key) {
                prepared.push(Prepared::done(Ack {
                    outcome: outcome_from_name(&outcome),
                    held_reason,
                    duplicate: true,
                    entries: Vec::new(),
                    item: None,
                }));
                continue;
            }
            let payment = event
                .payment_id
                .as_ref()
                .map(|p| stored.remove(p).unwrap_or_default());
            let effect = apply(event, decision, payment, self.policy);
            new_events.push((event, effect.outcome, effect.held_reason));
            if effect.new_plan
                && let Some(plan) = &effect.plan
            {
                new_plans.push(plan.clone());
            }
            prepared.push(Prepared {
                ack: Ack {
                    outcome: effect.outcome,
                    held_reason: effect.held_reason.map(str::to_owned),
                    duplicate: false,
                    entries: Vec::new(),
                    item: effect.plan.as_ref().map(|plan| plan.item.clone()),
                },
                append: effect.plan.map(|plan| (plan, effect.deltas)),
                event_key: event.event_key.clone(),
                now,
            });
        }
        insert_events(tx, &new_events, now).await?;
        let new_plans: Vec<&GrantPlan> = new_plans.iter().collect();
        insert_plans(tx, &new_plans, "catalog", now).await?;
        Ok(prepared)
    }

    /// Appends what [`Core::prepare`] decided to the ledger (at most one prepared event
    /// per payment) and returns each event's ack.
    async fn finish(
        &self,
        tx: &mut AnyConnection,
        prepared: Vec<Prepared>,
    ) -> Result<Vec<Ack>, StoreError> {
        let causes: Vec<Cause<'_>> = prepared
            .iter()
            .map(|p| Cause {
                event_key: Some(&p.event_key),
                actor: "coinflow",
                note: None,
            })
            .collect();
        let (owners, items): (Vec<usize>, Vec<Appending<'_>>) = prepared
            .iter()
            .zip(&causes)
            .enumerate()
            .filter_map(|(i, (p, cause))| {
                let (plan, deltas) = p.append.as_ref()?;
                Some((
                    i,
                    Appending {
                        plan,
                        deltas,
                        cause,
                        now: p.now,
                    },
                ))
            })
            .unzip();
        let written = self.append_many(tx, &items).await?;
        let mut acks: Vec<Ack> = prepared.into_iter().map(|p| p.ack).collect();
        for (i, entries) in owners.into_iter().zip(written) {
            acks[i].entries = entries;
        }
        Ok(acks)
    }

    async fn resolve_once(
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
        let mut conn = self.write.acquire().await.map_err(classify)?;
        let mut tx = self.begin(&mut conn).await?;
        self.lock(&mut tx, &[payment_id]).await?;
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
        let (events, held): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COUNT(*) AS BIGINT),
                    CAST(COALESCE(SUM(CASE WHEN outcome = 'held' THEN 1 ELSE 0 END), 0) AS BIGINT)
             FROM events WHERE payment_id = $1",
        )
        .bind(payment_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        if events == 0 {
            return Err(StoreError::NotFound(format!(
                "no events recorded for payment {payment_id:?}"
            )));
        }
        if held == 0 || load_plan(&mut tx, payment_id).await?.is_some() {
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
             VALUES ($1, $2, $3, $4, $5, $6)",
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
                self.append(&mut tx, plan, &deltas(target, &current), &cause, now)
                    .await?
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
                self.append(&mut tx, &audit, &[reject], &cause, now).await?
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

    async fn consume_once(&self, spend: &Spend) -> Result<Spent, StoreError> {
        let (column, key) = payer_column(&spend.payer);
        let balance_sql = format!(
            "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM ledger WHERE {column} = $1 AND sku = $2"
        );
        let mut conn = self.write.acquire().await.map_err(classify)?;
        let mut tx = self.begin(&mut conn).await?;
        self.lock(&mut tx, &[&format!("payer:{column}:{key}")])
            .await?;
        let existing = sqlx::query(AssertSqlSafe(format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE idempotency_key = $1"
        )))
        .bind(&spend.idempotency_key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        let balance: i64 = sqlx::query_scalar(AssertSqlSafe(balance_sql))
            .bind(key)
            .bind(&spend.sku)
            .fetch_one(&mut *tx)
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
            return Ok(Spent {
                entry,
                balance,
                duplicate: true,
            });
        }
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
        self.lock_appends(&mut tx).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO ledger (kind, sku, quantity, wallet, raw_customer_id, actor,
                idempotency_key, recorded_at_us)
             VALUES ('consume', $1, $2, $3, $4, 'api', $5, $6) RETURNING {LEDGER_COLUMNS}"
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
}

/// Runs a write attempt again while it loses races (unique violations, serialization
/// failures), up to `MAX_ATTEMPTS`.
macro_rules! retrying {
    ($attempt:expr) => {{
        let mut tries = 0u32;
        loop {
            tries += 1;
            match $attempt.await {
                Err(StoreError::Conflict(e)) => after_conflict(tries, e).await?,
                other => break other,
            }
        }
    }};
}

mod pg_batch;

async fn after_conflict(tries: u32, e: sqlx::Error) -> Result<(), StoreError> {
    if tries >= MAX_ATTEMPTS {
        return Err(StoreError::Unavailable(e));
    }
    tracing::debug!(error = %e, tries, "write lost a race; retrying");
    tokio::time::sleep(Duration::from_millis(u64::from(tries) * 2)).await;
    Ok(())
}

fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(e),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: serialization failure, deadlock; connection exceptions (08…),
            // insufficient resources (53…), operator intervention (57…).
            let pg_conflict = matches!(code.as_ref(), "40001" | "40P01");
            let pg_unavailable =
                code.starts_with("08") || code.starts_with("53") || code.starts_with("57");
            // SQLite: BUSY (5), LOCKED (6), IOERR (10), FULL (13), CANTOPEN (14), with
            // their extended codes.
            let sqlite_unavailable = matches!(
                code.parse::<i32>().ok().map(|c| c & 0xff),
                Some(5 | 6 | 10 | 13 | 14)
            );
            if pg_conflict {
                StoreError::Conflict(e)
            } else if pg_unavailable || sqlite_unavailable {
                StoreError::Unavailable(e)
            } else {
                StoreError::Internal(e)
            }
        }
        _ => StoreError::Internal(e),
    }
}

async fn load_plan(
    conn: &mut AnyConnection,
    payment_id: &str,
) -> Result<Option<GrantPlan>, StoreError> {
    let row = sqlx::query(
        "SELECT item, catalog_version, grants, wallet, raw_customer_id FROM plans WHERE payment_id = $1",
    )
    .bind(payment_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(classify)?;
    let Some(row) = row else { return Ok(None) };
    let grants: String = row.try_get(2).map_err(classify)?;
    let grants: Vec<Grant> = serde_json::from_str(&grants)
        .map_err(|e| StoreError::Setup(format!("corrupt plan for {payment_id}: {e}")))?;
    Ok(Some(GrantPlan {
        payment_id: payment_id.to_owned(),
        item: row.try_get(0).map_err(classify)?,
        catalog_version: row.try_get(1).map_err(classify)?,
        grants,
        wallet: row.try_get(3).map_err(classify)?,
        raw_customer_id: row.try_get(4).map_err(classify)?,
    }))
}

async fn insert_plan(
    conn: &mut AnyConnection,
    plan: &GrantPlan,
    source: &str,
    now: i64,
) -> Result<(), StoreError> {
    insert_plans(conn, &[plan], source, now).await
}

/// Inserts `plans` in one statement.
async fn insert_plans(
    conn: &mut AnyConnection,
    plans: &[&GrantPlan],
    source: &str,
    now: i64,
) -> Result<(), StoreError> {
    if plans.is_empty() {
        return Ok(());
    }
    let mut query = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO plans (payment_id, source, item, catalog_version, grants, wallet,
            raw_customer_id, recorded_at_us) VALUES {}",
        placeholders(plans.len(), 8)
    )));
    for plan in plans {
        let grants = serde_json::to_string(&plan.grants)
            .map_err(|e| StoreError::Setup(format!("encoding plan: {e}")))?;
        query = query
            .bind(&plan.payment_id)
            .bind(source)
            .bind(&plan.item)
            .bind(&plan.catalog_version)
            .bind(grants)
            .bind(&plan.wallet)
            .bind(&plan.raw_customer_id)
            .bind(now);
    }
    query.execute(&mut *conn).await.map_err(classify)?;
    Ok(())
}

/// `($1, ..., $columns), ...` for `rows` rows of a multi-row `VALUES`.
fn placeholders(rows: usize, columns: usize) -> String {
    (0..rows)
        .map(|r| {
            let row = (1..=columns)
                .map(|c| format!("${}", r * columns + c))
                .collect::<Vec<_>>()
                .join(", ");
            format!("({row})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn event_types(
    conn: &mut AnyConnection,
    payment_id: &str,
) -> Result<Vec<(String, Option<String>)>, StoreError> {
    sqlx::query_as("SELECT event_type, refund_status FROM events WHERE payment_id = $1")
        .bind(payment_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)
}

async fn load_facts(conn: &mut AnyConnection, payment_id: &str) -> Result<Facts, StoreError> {
    let rows = event_types(conn, payment_id).await?;
    Ok(Facts::of(
        rows.iter().map(|(t, s)| (t.as_str(), s.as_deref())),
    ))
}

async fn load_held(
    conn: &mut AnyConnection,
    payment_id: &str,
) -> Result<BTreeMap<String, Held>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sku, CAST(SUM(quantity) AS BIGINT) FROM ledger
         WHERE payment_id = $1 AND kind IN ('grant', 'revoke', 'restore') GROUP BY sku",
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
    conn: &mut AnyConnection,
    payment_id: &str,
) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar("SELECT decision FROM reviews WHERE payment_id = $1")
        .bind(payment_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(classify)
}

/// `sql` followed by ` ($1, ..., $n)` for `values`, then `tail`; nothing for no values.
async fn fetch_in(
    conn: &mut AnyConnection,
    sql: &str,
    values: &[&str],
    tail: &str,
) -> Result<Vec<AnyRow>, StoreError> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let list = placeholders(1, values.len());
    let mut query = sqlx::query(AssertSqlSafe(format!("{sql} {list} {tail}")));
    for value in values {
        query = query.bind(*value);
    }
    query.fetch_all(&mut *conn).await.map_err(classify)
}

/// What each of `payments` has on record: its events' facts, review, plan and ledger sums
/// (the default for a payment with nothing yet).
async fn load_stored(
    conn: &mut AnyConnection,
    payments: &[&str],
) -> Result<HashMap<String, Stored>, StoreError> {
    let mut stored: HashMap<String, Stored> = payments
        .iter()
        .map(|p| ((*p).to_owned(), Stored::default()))
        .collect();
    fn entry<'s>(
        stored: &'s mut HashMap<String, Stored>,
        row: &AnyRow,
    ) -> Result<&'s mut Stored, StoreError> {
        let payment: String = row.try_get(0).map_err(classify)?;
        Ok(stored.entry(payment).or_default())
    }
    for row in fetch_in(
        conn,
        "SELECT payment_id, event_type, refund_status FROM events WHERE payment_id IN",
        payments,
        "",
    )
    .await?
    {
        let (t, status): (String, Option<String>) = (
            row.try_get(1).map_err(classify)?,
            row.try_get(2).map_err(classify)?,
        );
        entry(&mut stored, &row)?.facts.add(&t, status.as_deref());
    }
    for row in fetch_in(
        conn,
        "SELECT payment_id, decision FROM reviews WHERE payment_id IN",
        payments,
        "",
    )
    .await?
    {
        let decision: String = row.try_get(1).map_err(classify)?;
        entry(&mut stored, &row)?.rejected = decision == "rejected";
    }
    for row in fetch_in(
        conn,
        "SELECT payment_id, item, catalog_version, grants, wallet, raw_customer_id FROM plans \
         WHERE payment_id IN",
        payments,
        "",
    )
    .await?
    {
        let payment_id: String = row.try_get(0).map_err(classify)?;
        let grants: String = row.try_get(3).map_err(classify)?;
        let grants: Vec<Grant> = serde_json::from_str(&grants)
            .map_err(|e| StoreError::Setup(format!("corrupt plan for {payment_id}: {e}")))?;
        entry(&mut stored, &row)?.plan = Some(GrantPlan {
            item: row.try_get(1).map_err(classify)?,
            catalog_version: row.try_get(2).map_err(classify)?,
            grants,
            wallet: row.try_get(4).map_err(classify)?,
            raw_customer_id: row.try_get(5).map_err(classify)?,
            payment_id,
        });
    }
    for row in fetch_in(
        conn,
        "SELECT payment_id, sku, CAST(SUM(quantity) AS BIGINT) FROM ledger \
         WHERE kind IN ('grant', 'revoke', 'restore') AND payment_id IN",
        payments,
        "GROUP BY payment_id, sku",
    )
    .await?
    {
        let (sku, net): (String, i64) = (
            row.try_get(1).map_err(classify)?,
            row.try_get(2).map_err(classify)?,
        );
        entry(&mut stored, &row)?
            .current
            .insert(sku, Held { net, touched: true });
    }
    Ok(stored)
}

/// Inserts `events` with their outcomes in one statement.
async fn insert_events(
    conn: &mut AnyConnection,
    events: &[(&WebhookEvent, Outcome, Option<&str>)],
    now: i64,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let values = placeholders(events.len(), 13);
    let mut query = sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO events (event_key, event_type, category, created_raw, payment_id, wallet,
            raw_customer_id, refund_status, outcome, held_reason, received_at_us,
            recorded_at_us, raw_body)
         VALUES {values}"
    )));
    for &(event, outcome, held_reason) in events {
        let received = event
            .received_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .map_or(now, micros);
        query = query
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
            .bind(event.raw_body.to_vec());
    }
    query.execute(&mut *conn).await.map_err(classify)?;
    Ok(())
}

/// An event recorded up to its ledger entries.
struct Prepared {
    ack: Ack,
    append: Option<(GrantPlan, Vec<Delta>)>,
    event_key: String,
    now: i64,
}

impl Prepared {
    fn done(ack: Ack) -> Self {
        Self {
            ack,
            append: None,
            event_key: String::new(),
            now: 0,
        }
    }
}

/// One payment's entries for [`Core::append_many`].
struct Appending<'a> {
    plan: &'a GrantPlan,
    deltas: &'a [Delta],
    cause: &'a Cause<'a>,
    now: i64,
}

/// Who wrote an entry, and why.
struct Cause<'a> {
    event_key: Option<&'a str>,
    actor: &'a str,
    note: Option<&'a str>,
}

fn payer_column(payer: &Payer) -> (&'static str, &str) {
    match payer {
        Payer::Wallet(w) => ("wallet", w),
        Payer::RawCustomerId(c) => ("raw_customer_id", c),
    }
}

/// A query with `$n` placeholders built one filter at a time.
struct Filters {
    sql: String,
    binds: Vec<Bind>,
}

enum Bind {
    Text(String),
    Int(i64),
}

impl Filters {
    fn new(sql: String) -> Self {
        Self {
            sql,
            binds: Vec::new(),
        }
    }

    fn and(&mut self, clause: &str, value: Bind) {
        self.binds.push(value);
        self.sql
            .push_str(&format!(" AND {clause} ${}", self.binds.len()));
    }

    async fn fetch(self, tail: &str, pool: &AnyPool) -> Result<Vec<LedgerEntry>, StoreError> {
        let sql = format!("{}{tail}", self.sql);
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for b in self.binds {
            query = match b {
                Bind::Text(s) => query.bind(s),
                Bind::Int(i) => query.bind(i),
            };
        }
        let rows = query.fetch_all(pool).await.map_err(classify)?;
        rows.iter()
            .map(ledger_entry)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }
}

#[async_trait]
impl Store for SqlStore {
    #[tracing::instrument(name = "db.transaction", skip_all, fields(otel.kind = "client", db.system.name = self.core.backend.name(), db.operation.name = "record"))]
    async fn record(&self, event: &WebhookEvent, decision: &Decision) -> Result<Ack, StoreError> {
        retrying!(self.record_once(event, decision))
    }

    async fn entitlements(&self, payer: &Payer) -> Result<Vec<(String, i64)>, StoreError> {
        let (column, key) = payer_column(payer);
        let sql = format!(
            "SELECT sku, CAST(SUM(quantity) AS BIGINT) FROM ledger WHERE {column} = $1
             GROUP BY sku HAVING SUM(quantity) <> 0 ORDER BY sku"
        );
        sqlx::query_as(AssertSqlSafe(sql))
            .bind(key)
            .fetch_all(&self.core.read)
            .await
            .map_err(classify)
    }

    async fn payment(&self, payment_id: &str) -> Result<Option<PaymentRecord>, StoreError> {
        let mut conn = self.core.read.acquire().await.map_err(classify)?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE payment_id = $1 ORDER BY seq"
        )))
        .bind(payment_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
        if rows.is_empty() {
            return Ok(None);
        }
        let events = rows
            .iter()
            .map(|row| Ok((recorded_event(row)?, row.try_get(8)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(classify)?;
        let ledger = sqlx::query(AssertSqlSafe(format!(
            "SELECT {LEDGER_COLUMNS} FROM ledger WHERE payment_id = $1 ORDER BY seq"
        )))
        .bind(payment_id)
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?
        .iter()
        .map(ledger_entry)
        .collect::<Result<Vec<_>, _>>()
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
        let mut q = Filters::new(format!("SELECT {LEDGER_COLUMNS} FROM ledger WHERE 1 = 1"));
        if let Some(payer) = &filter.payer {
            let (column, key) = payer_column(payer);
            q.and(&format!("{column} ="), Bind::Text(key.to_owned()));
        }
        if let Some(p) = &filter.payment_id {
            q.and("payment_id =", Bind::Text(p.clone()));
        }
        if let Some(s) = &filter.sku {
            q.and("sku =", Bind::Text(s.clone()));
        }
        if let Some(t) = filter.since_us {
            q.and("recorded_at_us >=", Bind::Int(t));
        }
        if let Some(t) = filter.until_us {
            q.and("recorded_at_us <", Bind::Int(t));
        }
        if let Some(b) = before {
            q.and("seq <", Bind::Int(b));
        }
        q.fetch(
            &format!(" ORDER BY seq DESC LIMIT {limit}"),
            &self.core.read,
        )
        .await
    }

    async fn entries_after(
        &self,
        payer: Option<&Payer>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut q = Filters::new(format!("SELECT {LEDGER_COLUMNS} FROM ledger WHERE 1 = 1"));
        q.and("seq >", Bind::Int(after));
        if let Some(payer) = payer {
            let (column, key) = payer_column(payer);
            q.and(&format!("{column} ="), Bind::Text(key.to_owned()));
        }
        q.fetch(&format!(" ORDER BY seq LIMIT {limit}"), &self.core.read)
            .await
    }

    fn commits(&self) -> watch::Receiver<i64> {
        self.core.commits.subscribe()
    }

    async fn list_held(&self, after_seq: i64, limit: u32) -> Result<Vec<HeldPayment>, StoreError> {
        let mut conn = self.core.read.acquire().await.map_err(classify)?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events e WHERE {HELD} AND e.seq > $1
             ORDER BY e.seq LIMIT {limit}"
        )))
        .bind(after_seq)
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
        let mut held = Vec::with_capacity(rows.len());
        for row in rows {
            let payment_id: String = row.try_get(10).map_err(classify)?;
            held.push(HeldPayment {
                seq: row.try_get(9).map_err(classify)?,
                event: recorded_event(&row).map_err(classify)?,
                wallet: row.try_get(11).map_err(classify)?,
                raw_customer_id: row.try_get(12).map_err(classify)?,
                event_types: event_types(&mut conn, &payment_id).await?,
                payment_id,
            });
        }
        Ok(held)
    }

    #[tracing::instrument(name = "db.transaction", skip_all, fields(otel.kind = "client", db.system.name = self.core.backend.name(), db.operation.name = "resolve"))]
    async fn resolve(
        &self,
        payment_id: &str,
        resolution: &Resolution,
        operator: &str,
        note: &str,
    ) -> Result<Resolved, StoreError> {
        retrying!(
            self.core
                .resolve_once(payment_id, resolution, operator, note)
        )
    }

    #[tracing::instrument(name = "db.transaction", skip_all, fields(otel.kind = "client", db.system.name = self.core.backend.name(), db.operation.name = "consume"))]
    async fn consume(&self, spend: &Spend) -> Result<Spent, StoreError> {
        retrying!(self.core.consume_once(spend))
    }

    async fn held_summary(&self) -> Result<(u64, Option<i64>), StoreError> {
        let (count, oldest): (i64, Option<i64>) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT CAST(COUNT(*) AS BIGINT), MIN(e.received_at_us) FROM events e WHERE {HELD}"
        )))
        .fetch_one(&self.core.read)
        .await
        .map_err(classify)?;
        Ok((u64::try_from(count).unwrap_or(0), oldest))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.core.write)
            .await
            .map_err(classify)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::HELD;

    /// The review queue's query must stay linear in the queue's size: each held event's
    /// "is it the payment's first?" lookup goes through `events_by_payment`.
    #[test]
    fn the_held_query_looks_up_each_payment_by_index() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(include_str!("../../migrations/sqlite/0001_ledger.sql"))
            .unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM events e WHERE {HELD}"
            ))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("SEARCH h USING INDEX events_by_payment")),
            "{plan:#?}"
        );
        assert!(
            !plan
                .iter()
                .any(|step| step.contains("SEARCH h USING INDEX events_held")),
            "{plan:#?}"
        );
    }
}
