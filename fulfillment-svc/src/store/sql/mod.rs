//! The SQL backends behind [`Store`]: embedded SQLite (the default, one process) and
//! PostgreSQL (several replicas sharing one ledger), one implementation over sqlx's `Any`
//! driver, chosen by the URL scheme (PostgreSQL's webhook events excepted: `pg_batch`).
//! Queries use `$n` placeholders, which both accept.
//!
//! One file per concern: this one opens the database (connections, migrations, the
//! transaction and lock helpers, error classification, the retry loop, row mappers);
//! `record` holds what a review writes (a payment's stored state, its plan, its ledger
//! entries); `pg_batch` records webhook events on PostgreSQL (group commit over
//! `tokio-postgres`, which pipelines a transaction's statements; sqlx waits for each);
//! `review` closes held payments; `consume` records spending; `queries` serves the reads. Every
//! statement is one named constant, written once for both backends, with a PostgreSQL and
//! a SQLite variant only where the two must differ; the only text computed at run time is
//! the list of placeholders of a statement over several rows (`with_rows`).
//!
//! Connections: the reads (entitlements, payments, the ledger, the review queue, and every
//! `WatchEntitlements` stream's polls) have a pool of their own, 4 connections, apart from
//! the writes', so however many readers wait, they never hold a connection ingest needs.
//! PostgreSQL's writes have two: webhook events a connection per group-commit worker
//! (`pg_batch`), reviews and spends a pool of 4; SQLite's, its one sqlx writer beside the
//! webhook writer thread's own connection. On PostgreSQL the connections report
//! `fulfillment-svc/ingest`, `fulfillment-svc/write` and `fulfillment-svc/read` as their
//! `application_name` unless the URL sets one, and start with `enable_seqscan = off`
//! ([`STATISTICS_FREE`]).
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
//!   advisory lock on its id, so each sees the others' events before reconciling. Ledger
//!   appends take one more advisory lock, held to commit, so `seq` order is commit order
//!   and a `WatchEntitlements` cursor never skips a late commit. A spend takes that lock
//!   before it reads its account's balance, so spends through any of an account's
//!   identities serialise on it (`consume`).
//! - A payer's balance, entitlements and history are its account's (`account!`): every
//!   identity tied to it through payments that named both a wallet and a customer id.
//! - Unique keys back all of it: `events.event_key`, `plans.payment_id`,
//!   `reviews.payment_id`, `ledger (payment_id, entry_no)`, `ledger.idempotency_key`. A
//!   writer that loses a race gets a unique violation, and the whole transaction is
//!   retried: it then sees what won and returns that.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use coinflow_shared::proto::v1::{LedgerEntry, RecordedEvent, WebhookEvent};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Connection, Executor, Row, SqlSafeStr};
use tokio::sync::watch;

use super::queue::Queue;
use super::sqlite_writer;
use super::{
    Ack, HeldPayment, LedgerFilter, Payer, PaymentRecord, Resolution, Resolved, Spend, Spent,
    Store, StoreError, outcome_from_name, timestamp,
};
use crate::decision::Decision;
use crate::lifecycle::ChargebackPolicy;

/// The columns every ledger read returns, in [`ledger_entry`]'s order.
macro_rules! ledger_columns {
    () => {
        "seq, payment_id, kind, sku, quantity, wallet, raw_customer_id, item, event_key, \
         recorded_at_us, catalog_version, actor, note"
    };
}

/// The columns every event read returns, in [`recorded_event`]'s order, then the payment
/// and payer columns.
macro_rules! event_columns {
    () => {
        "event_key, event_type, category, created_raw, outcome, held_reason, received_at_us, \
         raw_body, refund_status, seq, payment_id, wallet, raw_customer_id, chargeback_id, origin"
    };
}

/// The account of a payer, as two tables. `account (kind, id)`: `$1` is how the caller
/// named the payer (`'w'` a wallet, `'c'` a `rawCustomerId`; no one when `$2` is `NULL`) and
/// `$2` the id; the table holds that identity and every identity connected to it,
/// transitively, through payment entries that carry both a wallet and a customer id (the
/// events of such a payment said both are the same person). `mine (seq)`: the ledger rows
/// whose wallet or customer id is one of those, each once. The empty string is nobody's
/// identity (the wallet of a spend by customer id, or of a Version 3 payment without a
/// wallet), so it ties nothing together. Links are ledger rows: never undone, and written
/// by the transaction that writes the first entry carrying them.
///
/// `mine` is a union of two index joins rather than `wallet IN (..) OR raw_customer_id IN
/// (..)`: PostgreSQL cannot plan that `OR` as a semi-join and scans the whole ledger.
macro_rules! account {
    () => {
        "WITH RECURSIVE account (kind, id) AS ( \
             SELECT CAST($1 AS TEXT), CAST($2 AS TEXT) WHERE $2 IS NOT NULL \
             UNION \
             SELECT CASE WHEN a.kind = 'w' THEN 'c' ELSE 'w' END, \
                    CASE WHEN a.kind = 'w' THEN l.raw_customer_id ELSE l.wallet END \
             FROM account a JOIN ledger l \
               ON (a.kind = 'w' AND l.wallet = a.id) \
               OR (a.kind = 'c' AND l.raw_customer_id = a.id) \
             WHERE l.payment_id IS NOT NULL AND l.wallet <> '' AND l.raw_customer_id <> ''), \
         mine (seq) AS ( \
             SELECT l.seq FROM account a JOIN ledger l ON l.wallet = a.id WHERE a.kind = 'w' \
             UNION \
             SELECT l.seq FROM account a JOIN ledger l ON l.raw_customer_id = a.id \
             WHERE a.kind = 'c') "
    };
}

/// The [`account!`]'s ledger rows.
macro_rules! of_account {
    () => {
        "seq IN (SELECT seq FROM mine)"
    };
}

/// Whether a ledger row found through another index (a payment, an idempotency key) is
/// the [`account!`]'s.
macro_rules! in_account {
    () => {
        "(wallet IN (SELECT id FROM account WHERE kind = 'w') \
          OR raw_customer_id IN (SELECT id FROM account WHERE kind = 'c'))"
    };
}

/// The [`LedgerEntry`] of a row read with [`ledger_columns!`], through either driver's
/// `try_get` (sqlx here, `tokio-postgres` in `pg_batch`); evaluates to a `Result`, the
/// driver's error type.
macro_rules! ledger_entry_of {
    ($row:expr) => {{
        let row = $row;
        let payment_id: Option<String> = row.try_get(1)?;
        let event_key: Option<String> = row.try_get(8)?;
        Ok(LedgerEntry {
            seq: row.try_get(0)?,
            payment_id: payment_id.unwrap_or_default(),
            kind: row.try_get(2)?,
            sku: row.try_get(3)?,
            quantity: row.try_get(4)?,
            wallet: row.try_get(5)?,
            raw_customer_id: row.try_get(6)?,
            item: row.try_get(7)?,
            event_key: event_key.unwrap_or_default(),
            recorded_at: Some(timestamp(row.try_get(9)?)),
            catalog_version: row.try_get(10)?,
            actor: row.try_get(11)?,
            note: row.try_get(12)?,
        })
    }};
}

mod consume;
mod pg_batch;
mod queries;
mod record;
mod review;

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

    /// This backend's migrations, oldest first: (version, description, SQL).
    fn migrations(self) -> &'static [(i64, &'static str, &'static str)] {
        match self {
            Self::Sqlite => SQLITE_MIGRATIONS,
            Self::Postgres => POSTGRES_MIGRATIONS,
        }
    }

    fn migrator(self) -> Migrator {
        Migrator::with_migrations(
            self.migrations()
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        description.into(),
                        MigrationType::Simple,
                        sql.into_sql_str(),
                        false,
                    )
                })
                .collect(),
        )
    }
}

/// SQLite's migrations, oldest first.
pub(crate) const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "ledger",
        include_str!("../../../migrations/sqlite/0001_ledger.sql"),
    ),
    (
        2,
        "chargeback ids",
        include_str!("../../../migrations/sqlite/0002_chargeback_ids.sql"),
    ),
    (
        3,
        "event origin",
        include_str!("../../../migrations/sqlite/0003_event_origin.sql"),
    ),
];

/// PostgreSQL's migrations, oldest first.
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "ledger",
        include_str!("../../../migrations/postgres/0001_ledger.sql"),
    ),
    (
        2,
        "chargeback ids",
        include_str!("../../../migrations/postgres/0002_chargeback_ids.sql"),
    ),
    (
        3,
        "event origin",
        include_str!("../../../migrations/postgres/0003_event_origin.sql"),
    ),
];

/// A database URL with any password replaced, for errors and logs: the userinfo's
/// (`postgres://user:***@host`) and the value of any parameter whose name ends in
/// `password` (`?password=***`, `sslpassword=***`, and the same in a libpq key-value
/// string, quoted or not). It errs on the side of hiding: a password with an unencoded
/// `@` hides the host up to the last `@` too.
pub fn redact(url: &str) -> String {
    redact_parameters(&redact_userinfo(url))
}

fn redact_userinfo(url: &str) -> String {
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

/// `text` with the value of every parameter whose name ends in `password` replaced by
/// `***`: `…password=value`, spaces around `=` allowed (libpq's key-value syntax). A value
/// ends at `&`, `;`, `?`, whitespace or the end; one that opens with `'` runs to the
/// closing `'` (libpq's quoting, `\'` escaping a quote), or to the end.
fn redact_parameters(text: &str) -> String {
    const KEY: &str = "password";
    let separator = |c: char| matches!(c, '&' | ';' | '?') || c.is_whitespace();
    // ASCII lowercasing keeps every byte offset.
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut from) = (0, 0);
    while let Some(found) = lower[from..].find(KEY) {
        let key_end = from + found + KEY.len();
        from = key_end;
        let Some(value) = text[key_end..].trim_start().strip_prefix('=') else {
            continue;
        };
        let value = value.trim_start();
        let value_start = text.len() - value.len();
        let value_len = match value.strip_prefix('\'') {
            Some(quoted) => 1 + quoted_len(quoted),
            None => value.find(separator).unwrap_or(value.len()),
        };
        out.push_str(&text[copied..value_start]);
        out.push_str("***");
        copied = value_start + value_len;
        from = copied;
    }
    out.push_str(&text[copied..]);
    out
}

/// The length of a quoted value after its opening `'`, through its closing one (all of
/// `quoted` when it never closes).
fn quoted_len(quoted: &str) -> usize {
    let mut escaped = false;
    for (i, c) in quoted.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return i + 1,
            _ => {}
        }
    }
    quoted.len()
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
    /// Ingest, reviews and spends.
    write: AnyPool,
    /// The reads ([`Store`]'s queries); never the write pool's connections.
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

/// Connections of the read pool (queries, `WatchEntitlements` polls), on both backends.
const READERS: u32 = 4;
/// Connections of PostgreSQL's write pool for reviews and spends (webhook events have
/// their group-commit workers' own pool, a connection per worker).
const POSTGRES_WRITERS: u32 = 4;
/// The settings of the webhook-event workers' connections ([`pg_batch`]): those of every
/// connection ([`STATISTICS_FREE`]), and generic plans (each statement's text is the same
/// for any batch, and planned once).
const INGEST_SETTINGS: [(&str, &str); 2] =
    [STATISTICS_FREE, ("plan_cache_mode", "force_generic_plan")];
/// The `application_name` of PostgreSQL's write pool.
const WRITE_POOL_NAME: &str = "fulfillment-svc/write";
/// The `application_name` of PostgreSQL's read pool.
const READ_POOL_NAME: &str = "fulfillment-svc/read";

/// Set on every PostgreSQL connection: every statement here finds its rows through an
/// index, and the planner must take it even before a table's first `ANALYZE`. Without
/// statistics it estimates 0.5% of a table per `payment_id` looked up and prefers a table
/// scan at any size, so a new ledger slowed down as it grew until autovacuum's first pass
/// (BENCHMARKS.md). A statement that has no index path still runs, as a scan.
const STATISTICS_FREE: (&str, &str) = ("enable_seqscan", "off");

const ADVISORY_LEDGER_APPEND: i64 = 0x636f_696e_666c_6f77; // "coinflow"
const MAX_ATTEMPTS: u32 = 8;

/// The newest migration applied.
const MIGRATED_TO: &str = "SELECT MAX(version) FROM _sqlx_migrations WHERE success = TRUE";
/// The highest ledger `seq` committed.
const LAST_SEQ: &str = "SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) FROM ledger";
/// Begins a write transaction: SQLite takes the write lock at once.
const BEGIN_SQLITE: &str = "BEGIN IMMEDIATE";
/// Begins a write transaction (PostgreSQL).
const BEGIN_POSTGRES: &str = "BEGIN";
/// Takes a payment's transaction-scoped advisory lock (PostgreSQL; the same key as
/// `pg_batch`'s locks of a batch's payments).
const LOCK_PAYMENT: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";
/// Takes the ledger-append lock, held to commit (PostgreSQL).
const LOCK_APPENDS: &str = "SELECT pg_advisory_xact_lock($1)";
/// Whether the database answers.
const PING: &str = "SELECT 1";

const SQLITE_WRITER: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 2000;";
const SQLITE_READER: &str = "PRAGMA busy_timeout = 2000;";

fn ledger_entry(row: &AnyRow) -> Result<LedgerEntry, sqlx::Error> {
    ledger_entry_of!(row)
}

fn ledger_entries(rows: &[AnyRow]) -> Result<Vec<LedgerEntry>, StoreError> {
    rows.iter()
        .map(ledger_entry)
        .collect::<Result<_, _>>()
        .map_err(classify)
}

/// How [`account!`] takes a payer: its kind (`$1`) and id (`$2`).
fn account_binds(payer: &Payer) -> (Option<&'static str>, Option<&str>) {
    match payer {
        Payer::Wallet(w) => (Some("w"), Some(w)),
        Payer::RawCustomerId(c) => (Some("c"), Some(c)),
    }
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
        recovered: row.try_get::<String, _>(14)? == "recovery",
    })
}

/// `head`, then `rows` rows of `columns` placeholders each (`($1, ..., $c), (...)`,
/// numbered from 1), then `tail`: the one place a statement's text depends on the number
/// of values it carries (an `IN` list is one row).
fn with_rows(head: &str, rows: usize, columns: usize, tail: &str) -> String {
    let list = (0..rows)
        .map(|r| {
            let row = (1..=columns)
                .map(|c| format!("${}", r * columns + c))
                .collect::<Vec<_>>()
                .join(", ");
            format!("({row})")
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("{head} {list} {tail}")
}

/// The rows of `head ($1, ..., $n) tail` for the `n` `values` (an `IN` list); none for no
/// values.
async fn fetch_in(
    conn: &mut AnyConnection,
    head: &str,
    values: &[&str],
    tail: &str,
) -> Result<Vec<AnyRow>, StoreError> {
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = sqlx::query(AssertSqlSafe(with_rows(head, 1, values.len(), tail)));
    for value in values {
        query = query.bind(*value);
    }
    query.fetch_all(&mut *conn).await.map_err(classify)
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

/// A pool of at most `max` connections to `url`, each running `pragmas` (SQLite) first.
/// A PostgreSQL connection (`application` set) reports it as its `application_name` (seen
/// in `pg_stat_activity`) unless the URL names one, and starts with [`STATISTICS_FREE`].
async fn connect(
    url: &str,
    max: u32,
    pragmas: &'static str,
    application: Option<&str>,
) -> Result<AnyPool, StoreError> {
    sqlx::any::install_default_drivers();
    let mut options = AnyConnectOptions::from_str(url)
        .map_err(|e| StoreError::Setup(format!("bad database URL {}: {e}", redact(url))))?;
    if let Some(name) = application {
        if !options
            .database_url
            .query_pairs()
            .any(|(key, _)| key == "application_name")
        {
            options
                .database_url
                .query_pairs_mut()
                .append_pair("application_name", name);
        }
        let (setting, value) = STATISTICS_FREE;
        options
            .database_url
            .query_pairs_mut()
            .append_pair(&format!("options[{setting}]"), value);
    }
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
                let write = connect(&sqlite_url(url, "rwc"), 1, SQLITE_WRITER, None).await?;
                // The file and its WAL exist once the writer connected.
                let read = connect(&sqlite_url(url, "ro"), READERS, SQLITE_READER, None).await?;
                (write, read)
            }
            Backend::Postgres => {
                let write = connect(url, POSTGRES_WRITERS, "", Some(WRITE_POOL_NAME)).await?;
                let read = connect(url, READERS, "", Some(READ_POOL_NAME)).await?;
                (write, read)
            }
        };
        match migrations {
            Migrations::Apply => backend
                .migrator()
                .run(&write)
                .await
                .map_err(|e| StoreError::Setup(format!("migrating {}: {e}", redact(url))))?,
            Migrations::Require => {
                let latest = backend.migrations().iter().map(|m| m.0).max().unwrap_or(0);
                let applied: Option<i64> = sqlx::query_scalar(MIGRATED_TO)
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
        let last: i64 = sqlx::query_scalar(LAST_SEQ)
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
            Backend::Postgres => pg_batch::start(&core, url, &INGEST_SETTINGS)?,
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
            Backend::Sqlite => BEGIN_SQLITE,
            Backend::Postgres => BEGIN_POSTGRES,
        };
        conn.begin_with(statement).await.map_err(classify)
    }

    /// Serialises this transaction with every other one of `payment_id` (PostgreSQL; SQLite
    /// has a single writer already).
    async fn lock(&self, conn: &mut AnyConnection, payment_id: &str) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query(LOCK_PAYMENT)
                .bind(payment_id)
                .execute(&mut *conn)
                .await
                .map_err(classify)?;
        }
        Ok(())
    }

    /// Holds ledger appends until this transaction commits, so `seq` order is commit
    /// order (PostgreSQL; SQLite's single writer gives that already).
    async fn lock_appends(&self, conn: &mut AnyConnection) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query(LOCK_APPENDS)
                .bind(ADVISORY_LEDGER_APPEND)
                .execute(&mut *conn)
                .await
                .map_err(classify)?;
        }
        Ok(())
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

#[async_trait]
impl Store for SqlStore {
    #[tracing::instrument(name = "db.transaction", skip_all, fields(otel.kind = "client", db.system.name = self.core.backend.name(), db.operation.name = "record"))]
    async fn record(&self, event: &WebhookEvent, decision: &Decision) -> Result<Ack, StoreError> {
        retrying!(self.record_once(event, decision))
    }

    async fn entitlements(&self, payer: &Payer) -> Result<Vec<(String, i64)>, StoreError> {
        self.core.entitlements(payer).await
    }

    async fn payment(&self, payment_id: &str) -> Result<Option<PaymentRecord>, StoreError> {
        self.core.payment(payment_id).await
    }

    async fn event(
        &self,
        event_key: &str,
    ) -> Result<Option<(RecordedEvent, Option<String>)>, StoreError> {
        self.core.event(event_key).await
    }

    async fn list_ledger(
        &self,
        filter: &LedgerFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.core.list_ledger(filter, before, limit).await
    }

    async fn entries_after(
        &self,
        payer: Option<&Payer>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        self.core.entries_after(payer, after, limit).await
    }

    fn commits(&self) -> watch::Receiver<i64> {
        self.core.commits.subscribe()
    }

    async fn list_held(&self, after_seq: i64, limit: u32) -> Result<Vec<HeldPayment>, StoreError> {
        self.core.list_held(after_seq, limit).await
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
        self.core.held_summary().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(PING)
            .execute(&self.core.write)
            .await
            .map_err(classify)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SQLITE_MIGRATIONS;

    /// The steps of SQLite's plan for `sql`, its parameters all `NULL`.
    fn plan(sql: &str) -> Vec<String> {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for (_, _, migration) in SQLITE_MIGRATIONS {
            conn.execute_batch(migration).unwrap();
        }
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let nulls = vec![None::<String>; stmt.parameter_count()];
        stmt.query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// An account's rows are found through the payer indexes, never by reading the whole
    /// ledger (which holds every payer's rows).
    #[test]
    fn account_statements_search_the_ledger_by_index() {
        for (name, sql) in [
            ("entitlements", super::queries::ENTITLEMENTS),
            ("page of account", super::queries::PAGE_OF_ACCOUNT),
            ("page of payment", super::queries::PAGE_OF_PAYMENT),
            ("after, of account", super::queries::AFTER_OF_ACCOUNT),
            ("balance", super::consume::BALANCE),
            ("spend by key", super::consume::SPEND_BY_KEY),
        ] {
            let plan = plan(sql);
            assert!(
                plan.iter().any(|step| step.starts_with("SEARCH")),
                "{name}: {plan:#?}"
            );
            assert!(
                !plan.iter().any(|step| step == "SCAN ledger"
                    || step == "SCAN l"
                    || step.starts_with("SCAN ledger ")
                    || step.starts_with("SCAN l ")),
                "{name} reads the whole ledger: {plan:#?}"
            );
        }
    }

    #[test]
    fn redact_hides_every_password_and_keeps_the_rest() {
        use super::redact;
        for (url, redacted) in [
            // userinfo
            ("postgres://u:secret@host/db", "postgres://u:***@host/db"),
            (
                "postgresql://u:se@cret@host:5432/db",
                "postgresql://u:***@host:5432/db",
            ),
            // query strings
            (
                "postgres://host/db?user=u&password=secret",
                "postgres://host/db?user=u&password=***",
            ),
            (
                "postgres://host/db?password=secret&sslmode=require",
                "postgres://host/db?password=***&sslmode=require",
            ),
            (
                "postgres://host/db?PassWord=secret&sslpassword=key",
                "postgres://host/db?PassWord=***&sslpassword=***",
            ),
            (
                "postgres://u:one@host/db?password=two",
                "postgres://u:***@host/db?password=***",
            ),
            (
                "postgres://host/db?password=a:b@c",
                "postgres://host/db?password=***",
            ),
            // libpq key-value strings (refused, but named in the error)
            (
                "host=db password=secret user=u",
                "host=db password=*** user=u",
            ),
            ("password='se cr\\'et' host=db", "password=*** host=db"),
            // nothing to hide
            (
                "postgres://u@host/db?sslmode=require",
                "postgres://u@host/db?sslmode=require",
            ),
            ("sqlite://ledger.db?mode=rwc", "sqlite://ledger.db?mode=rwc"),
            ("", ""),
            // odd input: no panic, nothing lost but the value
            ("password", "password"),
            ("password=", "password=***"),
            ("ʬpasswordʬ=ʬ", "ʬpasswordʬ=ʬ"),
            ("x?password=ʬü&y=ö", "x?password=***&y=ö"),
            ("password='", "password=***"),
        ] {
            assert_eq!(redact(url), redacted, "{url}");
        }
        // Whatever surrounds it, a password never survives.
        for url in [
            "postgres://u:s3cr3t@h/d",
            "postgres://h/d?password=s3cr3t",
            "postgres://h/d?x=1&password=s3cr3t#frag",
            "postgres://u:s3cr3t@h/d?password=s3cr3t",
            "postgres://h/d?password=s3cr3t@x",
            "postgres://h/d?password='s3cr3t",
            "password = s3cr3t",
            "host=h sslpassword='s3 cr3t' user=u",
            "PASSWORD=s3cr3t",
        ] {
            assert!(!redact(url).contains("s3cr3t"), "{url}: {}", redact(url));
        }
    }
}
