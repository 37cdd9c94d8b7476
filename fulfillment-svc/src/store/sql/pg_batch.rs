//! PostgreSQL's write path for webhook events: group commit over `tokio-postgres`, whose
//! client pipelines (sends a statement without waiting for the answer to the one before).
//! A batch costs two round trips whatever its size: `BEGIN`, [`LOCK_PAYMENTS`] and
//! [`LOAD`] (every event's stored state, in one read) go out together; then, once the
//! events are reconciled here, [`INSERT_EVENTS`] (events and new plans),
//! [`INSERT_ENTRIES`] (takes the ledger-append lock, then writes every entry) and
//! `COMMIT`. The server runs them in order, each statement with a snapshot of its own
//! (`READ COMMITTED`), so the read sees everything committed before the locks were
//! granted. The append lock is held from the first entry to the commit, so `seq` order
//! stays commit order; with `COMMIT` pipelined behind the entries, it is held for no client
//! round trip (sqlx, which the rest of the store uses, waits for every answer: holding the
//! lock across that round trip made the lock a convoy on busy cores). Every statement
//! binds whole columns as arrays and keeps one text whatever the batch's size, so each is
//! prepared once per connection and planned generically.
//!
//! A few workers, each with a connection of its own, take what is queued (up to [`BATCH`]
//! events, at most one per payment; a small batch taken while another transaction is in
//! flight waits up to [`LINGER`] to grow) and answer the events only after the commit. If
//! anything in a batch fails (a race lost to another replica, a bad row), the batch rolls
//! back and each of its events is recorded in a transaction of its own (a lost race comes
//! back as a conflict, which [`super::SqlStore`] retries), so one event's error stays its
//! own.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use coinflow_shared::proto::v1::{LedgerEntry, WebhookEvent};
use futures::future::join3;
use tokio::sync::{Mutex, mpsc};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use super::record::plan_from;
use super::{ADVISORY_LEDGER_APPEND, Core, StoreError, redact};
use crate::decision::{Decision, GrantPlan};
use crate::store::queue::{self, Job, Queue};
use crate::store::reconcile::{Delta, Held, Stored, apply};
use crate::store::{
    Ack, EventDetail, actor, micros, origin, outcome_from_name, outcome_name, timestamp,
};

/// The most events one transaction takes.
pub const BATCH: usize = 64;

/// Transactions in flight at once, each on a connection of its own. Fewer workers make
/// larger batches: on two cores, 4 recorded 25% more events per second than 8 (most of a
/// transaction's cost is per statement, not per row), and 2 fewer than 4 (BENCHMARKS.md).
const WORKERS: u32 = 4;

/// A batch smaller than this, taken while another of this process's transactions is in
/// flight, waits up to [`LINGER`] for more events. With the database busy, an event more in
/// this transaction costs far less than a transaction of its own (each replica of several
/// on one ledger otherwise sees its share of the load arrive in small pieces: two replicas
/// cost PostgreSQL 40–60% more CPU per event than one). With nothing in flight a batch
/// starts at once, so a quiet delivery never waits.
const LINGER_BATCH: usize = 8;
/// How long a small batch may wait, at most, while the database is busy.
const LINGER: Duration = Duration::from_millis(1);

/// Takes a transaction-scoped advisory lock per payment (`$1`, sorted, so that two
/// transactions taking several never deadlock: `unnest` keeps the array's order).
const LOCK_PAYMENTS: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest($1::text[]) AS k";

/// What is stored for a batch, in one read, a tagged row per fact: `e` the outcome of an
/// event key of `$1` already recorded (`a` key, `b` outcome, `c` held reason); for each
/// payment of `$2`, `f` an event's facts (`b` type, `c` refund status, `d` chargeback id),
/// `r` its review (`b` decision), `p` its plan (`b` item, `c` catalog version, `d` grants,
/// `e` wallet, `f` customer id) and `s` what its entries add up to for a sku (`b` sku, `n`).
const LOAD: &str = "\
    SELECT 'e' AS tag, event_key AS a, outcome AS b, held_reason AS c, \
           CAST(NULL AS TEXT) AS d, CAST(NULL AS TEXT) AS e, CAST(NULL AS TEXT) AS f, \
           CAST(NULL AS BIGINT) AS n \
      FROM events WHERE event_key = ANY($1::text[]) \
    UNION ALL \
    SELECT 'f', payment_id, event_type, refund_status, chargeback_id, NULL, NULL, NULL \
      FROM events WHERE payment_id = ANY($2::text[]) \
    UNION ALL \
    SELECT 'r', payment_id, decision, NULL, NULL, NULL, NULL, NULL \
      FROM reviews WHERE payment_id = ANY($2::text[]) \
    UNION ALL \
    SELECT 'p', payment_id, item, catalog_version, grants, wallet, raw_customer_id, NULL \
      FROM plans WHERE payment_id = ANY($2::text[]) \
    UNION ALL \
    SELECT 's', payment_id, sku, NULL, NULL, NULL, NULL, CAST(SUM(quantity) AS BIGINT) \
      FROM ledger WHERE kind IN ('grant', 'revoke', 'restore') \
       AND payment_id = ANY($2::text[]) \
     GROUP BY payment_id, sku";

/// The batch's new events (`$1`–`$14`, a column each, then `$15` the time) and the plans
/// they priced (`$16`–`$21`).
const INSERT_EVENTS: &str = "\
    WITH new_plans AS ( \
        INSERT INTO plans (payment_id, source, item, catalog_version, grants, wallet, \
                           raw_customer_id, recorded_at_us) \
        SELECT p, 'catalog', i, v, g, w, c, $15 \
          FROM unnest($16::text[], $17::text[], $18::text[], $19::text[], $20::text[], \
                      $21::text[]) AS t (p, i, v, g, w, c)) \
    INSERT INTO events (event_key, event_type, category, created_raw, payment_id, wallet, \
                        raw_customer_id, refund_status, chargeback_id, outcome, held_reason, \
                        received_at_us, recorded_at_us, raw_body, origin) \
    SELECT k, t, c, cr, p, w, rc, rs, cb, o, h, r, $15, b, og \
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                  $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], \
                  $12::bigint[], $13::bytea[], $14::text[]) \
           AS t (k, t, c, cr, p, w, rc, rs, cb, o, h, r, b, og)";

/// The batch's ledger entries, a column each (`$2`–`$12`, then `$13` the time), each
/// numbered after its payment's last `entry_no` (`$3` is the entry's offset; every
/// number is read before any row is inserted). The one-time filter takes the
/// ledger-append lock (`$1`) before the first row is formed, so before any `seq` is drawn.
const INSERT_ENTRIES: &str = concat!(
    "INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, wallet, raw_customer_id, \
                         item, catalog_version, event_key, actor, recorded_at_us) \
     SELECT v.p, \
            (SELECT COALESCE(MAX(l.entry_no), 0) FROM ledger l WHERE l.payment_id = v.p) + v.k, \
            v.kind, v.sku, v.q, v.w, v.c, v.i, v.cv, v.e, v.a, $13 \
       FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::bigint[], \
                   $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], \
                   $12::text[]) AS v (p, k, kind, sku, q, w, c, i, cv, e, a) \
      WHERE (SELECT TRUE FROM (SELECT pg_advisory_xact_lock($1)) AS appending) \
     RETURNING ",
    ledger_columns!()
);

/// Starts the workers on the current tokio runtime, each connecting to the database at
/// `url` as it needs (`settings`: the connections' run-time parameters). Events recorded through
/// the returned queue are answered once their transaction commits; dropping the queue
/// stops the workers once it is empty.
pub(super) fn start(
    core: &Arc<Core>,
    url: &str,
    settings: &[(&str, &str)],
) -> Result<Queue, StoreError> {
    let mut config: Config = url
        .parse()
        .map_err(|e| StoreError::Setup(format!("bad database URL {}: {e}", redact(url))))?;
    if config.get_application_name().is_none() {
        config.application_name(INGEST_POOL_NAME);
    }
    let ours = settings
        .iter()
        .map(|(name, value)| format!("-c {name}={value}"))
        .collect::<Vec<_>>()
        .join(" ");
    let options = match config.get_options() {
        Some(own) => format!("{own} {ours}"),
        None => ours,
    };
    config.options(options).connect_timeout(CONNECT_TIMEOUT);
    let config = Arc::new(config);
    let (queue, waiting) = queue::channel(4 * BATCH);
    let intake = Arc::new(Mutex::new(Intake {
        queue: waiting,
        carried: Vec::new(),
        busy: Arc::default(),
    }));
    for _ in 0..WORKERS {
        tokio::spawn(work(
            Arc::clone(core),
            Arc::clone(&config),
            Arc::clone(&intake),
        ));
    }
    Ok(queue)
}

/// The `application_name` of the workers' connections.
const INGEST_POOL_NAME: &str = "fulfillment-svc/ingest";
/// How long a worker waits for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The queue, and the events held back because their payment was already in a batch.
struct Intake {
    queue: mpsc::Receiver<Job>,
    carried: Vec<Job>,
    /// This process's transactions in flight.
    busy: Arc<AtomicUsize>,
}

impl Intake {
    /// The next batch: carried events first, then what is queued, at most one event per
    /// payment, or per event key for events without one (a second one waits for the next
    /// batch, so that it sees the first), counted in flight until its [`InFlight`] drops.
    /// `None` once the queue is closed and empty.
    async fn next(&mut self) -> Option<(Vec<Job>, InFlight)> {
        if self.carried.is_empty() {
            let first = self.queue.recv().await?;
            self.carried.push(first);
        }
        queue::fill(&mut self.carried, &mut self.queue, BATCH);
        if self.busy.load(Ordering::Relaxed) > 0 {
            let until = tokio::time::Instant::now() + LINGER;
            while self.carried.len() < LINGER_BATCH {
                let Ok(Some(job)) = tokio::time::timeout_at(until, self.queue.recv()).await else {
                    break;
                };
                self.carried.push(job);
                queue::fill(&mut self.carried, &mut self.queue, BATCH);
            }
        }
        let mut batch = Vec::with_capacity(self.carried.len());
        let mut keys = HashSet::new();
        let mut rest = Vec::new();
        for job in self.carried.drain(..) {
            let key = job
                .event
                .payment_id
                .as_ref()
                .unwrap_or(&job.event.event_key);
            let fits = batch.len() < BATCH && keys.insert(key.clone());
            if fits {
                batch.push(job);
            } else {
                rest.push(job);
            }
        }
        self.carried = rest;
        self.busy.fetch_add(1, Ordering::Relaxed);
        Some((batch, InFlight(Arc::clone(&self.busy))))
    }
}

/// Counts a batch's transaction in flight for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A worker's connection, with its statements prepared.
struct Conn {
    client: Client,
    lock: Statement,
    load: Statement,
    insert_events: Statement,
    insert_entries: Statement,
}

impl Conn {
    async fn open(config: &Config) -> Result<Self, StoreError> {
        let (client, connection) = config.connect(NoTls).await.map_err(pg_error)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "an ingest connection to PostgreSQL closed");
            }
        });
        Ok(Self {
            lock: client.prepare(LOCK_PAYMENTS).await.map_err(pg_error)?,
            load: client.prepare(LOAD).await.map_err(pg_error)?,
            insert_events: client.prepare(INSERT_EVENTS).await.map_err(pg_error)?,
            insert_entries: client.prepare(INSERT_ENTRIES).await.map_err(pg_error)?,
            client,
        })
    }
}

async fn work(core: Arc<Core>, config: Arc<Config>, intake: Arc<Mutex<Intake>>) {
    let mut conn: Option<Conn> = None;
    loop {
        let Some((batch, _in_flight)) = intake.lock().await.next().await else {
            return;
        };
        let events: Vec<_> = batch.iter().map(|j| (&j.event, &j.decision)).collect();
        match record(&core, &config, &mut conn, &events).await {
            Ok(acks) => {
                for (job, ack) in batch.into_iter().zip(acks) {
                    core.notify(&ack.entries);
                    let _ = job.reply.send(Ok(ack));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, events = batch.len(),
                    "batch rolled back; recording its events one by one");
                for job in batch {
                    let ack = record(&core, &config, &mut conn, &[(&job.event, &job.decision)])
                        .await
                        .and_then(|mut acks| {
                            acks.pop().ok_or_else(|| {
                                StoreError::Setup("recording an event returned no ack".into())
                            })
                        });
                    if let Ok(ack) = &ack {
                        core.notify(&ack.entries);
                    }
                    let _ = job.reply.send(ack);
                }
            }
        }
    }
}

/// Records `events` (no two sharing a payment or an event key) in one transaction on
/// `conn` (opened first if there is none, or it closed) and returns each one's ack, in
/// order.
async fn record(
    core: &Core,
    config: &Config,
    conn: &mut Option<Conn>,
    events: &[(&WebhookEvent, &Decision)],
) -> Result<Vec<Ack>, StoreError> {
    let open = match conn.take() {
        Some(open) if !open.client.is_closed() => open,
        _ => Conn::open(config).await?,
    };
    let acks = transaction(core, &open, events).await;
    *conn = Some(open);
    acks
}

/// [`record`]'s transaction: two pipelined round trips.
async fn transaction(
    core: &Core,
    conn: &Conn,
    events: &[(&WebhookEvent, &Decision)],
) -> Result<Vec<Ack>, StoreError> {
    let payments: Vec<&str> = events
        .iter()
        .filter_map(|(e, _)| e.payment_id.as_deref())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let keys: Vec<&str> = events.iter().map(|(e, _)| e.event_key.as_str()).collect();
    let client = &conn.client;
    // `join3` polls in order, so the statements go out in order, before any answer.
    let (begun, locked, loaded) = join3(
        client.batch_execute("BEGIN"),
        client.execute(&conn.lock, &[&payments]),
        client.query(&conn.load, &[&keys, &payments]),
    )
    .await;
    let written = async {
        begun.map_err(pg_error)?;
        locked.map_err(pg_error)?;
        write(core, conn, events, &payments, &loaded.map_err(pg_error)?).await
    }
    .await;
    if written.is_err() {
        // Whatever failed, the transaction ends here (after a pipelined `COMMIT` that rolled
        // back, this only draws a warning), so the connection can take the next one.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    written
}

/// Reconciles `events` with what [`LOAD`] returned, then writes them and commits.
async fn write(
    core: &Core,
    conn: &Conn,
    events: &[(&WebhookEvent, &Decision)],
    payments: &[&str],
    loaded: &[Row],
) -> Result<Vec<Ack>, StoreError> {
    let (mut existing, mut stored) = stored(loaded, payments)?;
    let now = micros(SystemTime::now());
    let mut acks = Vec::with_capacity(events.len());
    let mut new_events = NewEvents::default();
    let mut new_plans = NewPlans::default();
    let mut entries = NewEntries::default();
    // Which ack each payment's entries belong to.
    let mut appending: HashMap<String, usize> = HashMap::new();
    for &(event, decision) in events {
        if let Some((outcome, held_reason)) = existing.remove(&event.event_key) {
            acks.push(Ack {
                outcome: outcome_from_name(&outcome),
                held_reason,
                duplicate: true,
                entries: Vec::new(),
                item: None,
            });
            continue;
        }
        let payment = event
            .payment_id
            .as_ref()
            .map(|p| stored.remove(p).unwrap_or_default());
        let effect = apply(event, decision, payment, core.policy);
        new_events.push(event, outcome_name(effect.outcome), effect.held_reason, now);
        if let Some(plan) = &effect.plan {
            if effect.new_plan {
                new_plans.push(plan)?;
            }
            if !effect.deltas.is_empty() {
                appending.insert(plan.payment_id.clone(), acks.len());
                entries.push(plan, &effect.deltas, &event.event_key, actor(event));
            }
        }
        acks.push(Ack {
            outcome: effect.outcome,
            held_reason: effect.held_reason.map(str::to_owned),
            duplicate: false,
            entries: Vec::new(),
            item: effect.plan.as_ref().map(|plan| plan.item.clone()),
        });
    }
    let client = &conn.client;
    let event_params = new_events.params(&now, &new_plans);
    let entry_params = entries.params(&now);
    let (inserted, appended, committed) = join3(
        async {
            if new_events.key.is_empty() {
                return Ok(0);
            }
            client.execute(&conn.insert_events, &event_params).await
        },
        async {
            if entries.payment.is_empty() {
                return Ok(Vec::new());
            }
            client.query(&conn.insert_entries, &entry_params).await
        },
        client.batch_execute("COMMIT"),
    )
    .await;
    // A failed statement aborts the transaction, and the `COMMIT` behind it rolls back.
    inserted.map_err(pg_error)?;
    let rows = appended.map_err(pg_error)?;
    committed.map_err(pg_error)?;
    let mut written: Vec<LedgerEntry> = rows
        .iter()
        .map(ledger_entry)
        .collect::<Result<_, _>>()
        .map_err(pg_error)?;
    written.sort_by_key(|e| e.seq);
    for entry in written {
        if let Some(&i) = appending.get(&entry.payment_id) {
            acks[i].entries.push(entry);
        }
    }
    Ok(acks)
}

/// What [`LOAD`] returned: the outcomes of the event keys already recorded, and what each
/// of `payments` has on record (the default for a payment with nothing yet).
#[allow(clippy::type_complexity)]
fn stored(
    rows: &[Row],
    payments: &[&str],
) -> Result<
    (
        HashMap<String, (String, Option<String>)>,
        HashMap<String, Stored>,
    ),
    StoreError,
> {
    let mut existing = HashMap::new();
    let mut stored: HashMap<String, Stored> = payments
        .iter()
        .map(|p| ((*p).to_owned(), Stored::default()))
        .collect();
    let text = |row: &Row, i: usize| row.try_get::<_, Option<String>>(i).map_err(pg_error);
    for row in rows {
        let tag: String = row.try_get(0).map_err(pg_error)?;
        let a: String = row.try_get(1).map_err(pg_error)?;
        if tag == "e" {
            let outcome = text(row, 2)?.unwrap_or_default();
            existing.insert(a, (outcome, text(row, 3)?));
            continue;
        }
        let payment = stored.entry(a.clone()).or_default();
        match tag.as_str() {
            "f" => {
                let event_type = text(row, 2)?.unwrap_or_default();
                let detail = EventDetail {
                    refund_status: text(row, 3)?,
                    chargeback_id: text(row, 4)?,
                };
                let (t, status, chargeback) = detail.fact(&event_type);
                payment.facts.add(t, status, chargeback);
            }
            "r" => payment.rejected = text(row, 2)?.as_deref() == Some("rejected"),
            "p" => {
                payment.plan = Some(plan_from(
                    a,
                    text(row, 2)?.unwrap_or_default(),
                    text(row, 3)?.unwrap_or_default(),
                    &text(row, 4)?.unwrap_or_default(),
                    text(row, 5)?.unwrap_or_default(),
                    text(row, 6)?,
                )?);
            }
            _ => {
                let sku = text(row, 2)?.unwrap_or_default();
                let net: i64 = row.try_get(7).map_err(pg_error)?;
                payment.current.insert(sku, Held { net, touched: true });
            }
        }
    }
    Ok((existing, stored))
}

/// A row of [`INSERT_ENTRIES`]' `RETURNING`, in `ledger_columns!`'s order.
fn ledger_entry(row: &Row) -> Result<LedgerEntry, tokio_postgres::Error> {
    ledger_entry_of!(row)
}

/// The [`StoreError`] of a `tokio-postgres` error, classified as sqlx's are
/// ([`super::classify`]): a lost race is a conflict (retried), a connection or server
/// failure transient, anything else internal.
fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let code = e.code().cloned();
    let error = sqlx::Error::Protocol(e.to_string());
    match code {
        Some(c)
            if c == SqlState::UNIQUE_VIOLATION
                || c == SqlState::T_R_SERIALIZATION_FAILURE
                || c == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            StoreError::Conflict(error)
        }
        Some(c)
            if ["08", "53", "57"]
                .iter()
                .any(|class| c.code().starts_with(class)) =>
        {
            StoreError::Unavailable(error)
        }
        // No SQLSTATE: the connection failed, closed or timed out.
        None => StoreError::Unavailable(error),
        Some(_) => StoreError::Internal(error),
    }
}

/// [`INSERT_EVENTS`]' event columns.
#[derive(Default)]
struct NewEvents<'a> {
    key: Vec<&'a str>,
    event_type: Vec<&'a str>,
    category: Vec<&'a str>,
    created_raw: Vec<&'a str>,
    payment_id: Vec<Option<&'a str>>,
    wallet: Vec<Option<&'a str>>,
    raw_customer_id: Vec<Option<&'a str>>,
    refund_status: Vec<Option<&'a str>>,
    chargeback_id: Vec<Option<&'a str>>,
    outcome: Vec<&'static str>,
    held_reason: Vec<Option<&'static str>>,
    received_at: Vec<i64>,
    raw_body: Vec<&'a [u8]>,
    origin: Vec<&'static str>,
}

impl<'a> NewEvents<'a> {
    fn push(
        &mut self,
        event: &'a WebhookEvent,
        outcome: &'static str,
        held_reason: Option<&'static str>,
        now: i64,
    ) {
        self.key.push(&event.event_key);
        self.event_type.push(&event.event_type);
        self.category.push(&event.category);
        self.created_raw.push(&event.created_raw);
        self.payment_id.push(event.payment_id.as_deref());
        self.wallet.push(event.wallet.as_deref());
        self.raw_customer_id.push(event.raw_customer_id.as_deref());
        self.refund_status.push(event.refund_status.as_deref());
        self.chargeback_id.push(event.chargeback_id.as_deref());
        self.outcome.push(outcome);
        self.held_reason.push(held_reason);
        self.received_at.push(
            event
                .received_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .map_or(now, micros),
        );
        self.raw_body.push(&event.raw_body);
        self.origin.push(origin(event));
    }

    /// [`INSERT_EVENTS`]' parameters, `$1` to `$21`.
    fn params<'p>(&'p self, now: &'p i64, plans: &'p NewPlans) -> [&'p (dyn ToSql + Sync); 21] {
        [
            &self.key,
            &self.event_type,
            &self.category,
            &self.created_raw,
            &self.payment_id,
            &self.wallet,
            &self.raw_customer_id,
            &self.refund_status,
            &self.chargeback_id,
            &self.outcome,
            &self.held_reason,
            &self.received_at,
            &self.raw_body,
            &self.origin,
            now,
            &plans.payment_id,
            &plans.item,
            &plans.catalog_version,
            &plans.grants,
            &plans.wallet,
            &plans.raw_customer_id,
        ]
    }
}

/// [`INSERT_EVENTS`]' plan columns.
#[derive(Default)]
struct NewPlans {
    payment_id: Vec<String>,
    item: Vec<String>,
    catalog_version: Vec<String>,
    grants: Vec<String>,
    wallet: Vec<String>,
    raw_customer_id: Vec<Option<String>>,
}

impl NewPlans {
    fn push(&mut self, plan: &GrantPlan) -> Result<(), StoreError> {
        let grants = serde_json::to_string(&plan.grants)
            .map_err(|e| StoreError::Setup(format!("encoding plan: {e}")))?;
        self.payment_id.push(plan.payment_id.clone());
        self.item.push(plan.item.clone());
        self.catalog_version.push(plan.catalog_version.clone());
        self.grants.push(grants);
        self.wallet.push(plan.wallet.clone());
        self.raw_customer_id.push(plan.raw_customer_id.clone());
        Ok(())
    }
}

/// [`INSERT_ENTRIES`]' columns.
#[derive(Default)]
struct NewEntries {
    payment: Vec<String>,
    offset: Vec<i64>,
    kind: Vec<&'static str>,
    sku: Vec<String>,
    quantity: Vec<i64>,
    wallet: Vec<String>,
    raw_customer_id: Vec<Option<String>>,
    item: Vec<String>,
    catalog_version: Vec<String>,
    event_key: Vec<String>,
    actor: Vec<&'static str>,
}

impl NewEntries {
    /// `deltas` for `plan`'s payment, written by `event_key` on behalf of `actor`.
    fn push(&mut self, plan: &GrantPlan, deltas: &[Delta], event_key: &str, actor: &'static str) {
        for (offset, d) in (1_i64..).zip(deltas) {
            self.payment.push(plan.payment_id.clone());
            self.offset.push(offset);
            self.kind.push(d.kind.as_str());
            self.sku.push(d.sku.clone());
            self.quantity.push(d.quantity);
            self.wallet.push(plan.wallet.clone());
            self.raw_customer_id.push(plan.raw_customer_id.clone());
            self.item.push(plan.item.clone());
            self.catalog_version.push(plan.catalog_version.clone());
            self.event_key.push(event_key.to_owned());
            self.actor.push(actor);
        }
    }

    /// [`INSERT_ENTRIES`]' parameters, `$1` to `$13`.
    fn params<'p>(&'p self, now: &'p i64) -> [&'p (dyn ToSql + Sync); 13] {
        [
            &ADVISORY_LEDGER_APPEND,
            &self.payment,
            &self.offset,
            &self.kind,
            &self.sku,
            &self.quantity,
            &self.wallet,
            &self.raw_customer_id,
            &self.item,
            &self.catalog_version,
            &self.event_key,
            &self.actor,
            now,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn job(n: usize) -> Job {
        Job {
            event: WebhookEvent {
                event_key: format!("key-{n}"),
                payment_id: Some(format!("payment-{n}")),
                ..WebhookEvent::default()
            },
            decision: Decision::Record,
            reply: oneshot::channel().0,
        }
    }

    fn intake(busy: usize) -> (mpsc::Sender<Job>, Intake) {
        let (jobs, queue) = mpsc::channel(BATCH);
        let intake = Intake {
            queue,
            carried: Vec::new(),
            busy: Arc::new(AtomicUsize::new(busy)),
        };
        (jobs, intake)
    }

    /// Sends `count` jobs from another task, one at a time, as a call's events arrive.
    fn arriving(jobs: mpsc::Sender<Job>, count: usize) {
        tokio::spawn(async move {
            for n in 1..=count {
                tokio::task::yield_now().await;
                let _ = jobs.send(job(n)).await;
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_in_flight_a_batch_starts_with_what_is_queued() {
        let (jobs, mut intake) = intake(0);
        jobs.send(job(0)).await.unwrap();
        arriving(jobs, 7);
        let started = tokio::time::Instant::now();
        assert_eq!(intake.next().await.unwrap().0.len(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_transaction_in_flight_a_small_batch_waits_for_more() {
        let (jobs, mut intake) = intake(1);
        jobs.send(job(0)).await.unwrap();
        arriving(jobs, 20);
        let (batch, _) = intake.next().await.unwrap();
        assert!(batch.len() >= LINGER_BATCH, "{} events", batch.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_batch_goes_when_its_time_is_up() {
        let (jobs, mut intake) = intake(1);
        jobs.send(job(0)).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(intake.next().await.unwrap().0.len(), 1);
        assert_eq!(started.elapsed(), LINGER);
        drop(jobs);
    }
}
