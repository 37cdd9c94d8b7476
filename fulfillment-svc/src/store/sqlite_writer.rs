//! SQLite's write path for webhook events: one OS thread owns a `rusqlite` connection and
//! group-commits whatever is queued (up to [`BATCH`] events) in one `BEGIN IMMEDIATE`
//! transaction, one savepoint per event, one fsync per batch, then answers every caller.
//! No caller hears "recorded" before the commit.
//!
//! It runs synchronously on its own thread because a batch is a dozen statements per event:
//! through an async driver each statement is a round trip between threads, which cost far
//! more than SQLite's own work (see BENCHMARKS.md). The decisions are the same pure
//! functions the PostgreSQL path uses (`Facts`, `reconcile`); only the SQL plumbing differs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use coinflow_shared::proto::v1::{LedgerEntry, WebhookEvent};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot, watch};

use super::reconcile::{Delta, Held, Stored, apply};
use super::{Ack, StoreError, micros, outcome_from_name, outcome_name, timestamp};
use crate::catalog::Grant;
use crate::decision::{Decision, GrantPlan};
use crate::lifecycle::ChargebackPolicy;

/// The most events one group commit takes.
pub const BATCH: usize = 256;

/// One event waiting for the writer.
#[derive(Debug)]
struct Job {
    event: WebhookEvent,
    decision: Decision,
    reply: oneshot::Sender<Result<Ack, StoreError>>,
}

/// The handle to the writer thread; dropping the last one stops it.
#[derive(Debug)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

fn error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{
        CannotOpen, ConstraintViolation, DatabaseBusy, DatabaseLocked, DiskFull, SystemIoFailure,
    };
    let why = sqlx::Error::Protocol(format!("sqlite: {e}"));
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | CannotOpen) => {
            StoreError::Unavailable(why)
        }
        Some(ConstraintViolation)
            if matches!(e.sqlite_error().map(|f| f.extended_code), Some(2067 | 1555)) =>
        {
            StoreError::Conflict(why)
        }
        _ => StoreError::Internal(why),
    }
}

impl Writer {
    /// Opens `path` (already migrated) and starts the writer thread.
    pub fn start(
        path: &Path,
        policy: ChargebackPolicy,
        commits: Arc<watch::Sender<i64>>,
    ) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(error)?;
        // Checkpoints run on their own thread (below), not inside a batch's commit, where
        // they would stall every caller waiting on that batch.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
             PRAGMA wal_autocheckpoint = 0;",
        )
        .map_err(error)?;
        conn.busy_timeout(Duration::from_secs(2)).map_err(error)?;
        let checkpointer = Connection::open(path).map_err(error)?;
        checkpointer
            .busy_timeout(Duration::from_secs(2))
            .map_err(error)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (jobs, queue) = mpsc::channel(4 * BATCH);
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                run(conn, queue, policy, &commits);
                drop(stop);
            })
            .map_err(|e| StoreError::Setup(format!("starting the ledger writer: {e}")))?;
        std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || checkpoint(&checkpointer, &stopped))
            .map_err(|e| StoreError::Setup(format!("starting the WAL checkpointer: {e}")))?;
        Ok(Self { jobs })
    }

    /// Records `event`, waiting for the batch it joins to commit.
    pub async fn record(
        &self,
        event: &WebhookEvent,
        decision: &Decision,
    ) -> Result<Ack, StoreError> {
        let stopped =
            || StoreError::Unavailable(sqlx::Error::Protocol("the ledger writer stopped".into()));
        let (reply, answer) = oneshot::channel();
        let job = Job {
            event: event.clone(),
            decision: decision.clone(),
            reply,
        };
        self.jobs.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Copies the WAL back into the database every `CHECKPOINT_EVERY` while the writer runs.
/// PASSIVE never blocks the writer; a final TRUNCATE runs when it stops.
fn checkpoint(conn: &Connection, stopped: &std::sync::mpsc::Receiver<()>) {
    const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stopped.recv_timeout(CHECKPOINT_EVERY)
    {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

fn run(
    mut conn: Connection,
    mut queue: mpsc::Receiver<Job>,
    policy: ChargebackPolicy,
    commits: &watch::Sender<i64>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match record_batch(&mut conn, &batch, policy) {
            Ok(acks) => {
                let last = acks
                    .iter()
                    .filter_map(|a| a.as_ref().ok())
                    .flat_map(|a| a.entries.iter().map(|e| e.seq))
                    .max();
                if let Some(last) = last {
                    commits.send_if_modified(|seq| {
                        let newer = last > *seq;
                        *seq = (*seq).max(last);
                        newer
                    });
                }
                for (job, ack) in batch.drain(..).zip(acks) {
                    let _ = job.reply.send(ack);
                }
            }
            Err(e) => {
                let why = e.to_string();
                for job in batch.drain(..) {
                    let lost = sqlx::Error::Protocol(format!("batch commit failed: {why}"));
                    let _ = job.reply.send(Err(StoreError::Unavailable(lost)));
                }
            }
        }
    }
}

fn record_batch(
    conn: &mut Connection,
    batch: &[Job],
    policy: ChargebackPolicy,
) -> Result<Vec<Result<Ack, StoreError>>, StoreError> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(error)?;
    let mut acks = Vec::with_capacity(batch.len());
    for job in batch {
        let savepoint = tx.savepoint().map_err(error)?;
        let ack = record_in(&savepoint, &job.event, &job.decision, policy);
        if ack.is_ok() {
            savepoint.commit().map_err(error)?;
        } // else: dropping the savepoint rolls it back
        acks.push(ack);
    }
    tx.commit().map_err(error)?;
    Ok(acks)
}

fn record_in(
    conn: &Connection,
    event: &WebhookEvent,
    decision: &Decision,
    policy: ChargebackPolicy,
) -> Result<Ack, StoreError> {
    let existing: Option<(String, Option<String>)> = conn
        .prepare_cached("SELECT outcome, held_reason FROM events WHERE event_key = ?1")
        .and_then(|mut s| {
            s.query_row([&event.event_key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(error)?;
    if let Some((outcome, held_reason)) = existing {
        return Ok(Ack {
            outcome: outcome_from_name(&outcome),
            held_reason,
            duplicate: true,
            entries: Vec::new(),
            item: None,
        });
    }
    let now = micros(SystemTime::now());
    let stored = match &event.payment_id {
        None => None,
        Some(payment_id) => Some(load_stored(conn, payment_id)?),
    };
    let effect = apply(event, decision, stored, policy);
    let (outcome, held_reason) = (effect.outcome, effect.held_reason);
    let received = event
        .received_at
        .and_then(|t| SystemTime::try_from(t).ok())
        .map_or(now, micros);
    conn.prepare_cached(
        "INSERT INTO events (event_key, event_type, category, created_raw, payment_id, wallet,
            raw_customer_id, refund_status, outcome, held_reason, received_at_us, recorded_at_us, raw_body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )
    .and_then(|mut s| {
        s.execute(params![
            event.event_key,
            event.event_type,
            event.category,
            event.created_raw,
            event.payment_id,
            event.wallet,
            event.raw_customer_id,
            event.refund_status,
            outcome_name(outcome),
            held_reason,
            received,
            now,
            &event.raw_body[..],
        ])
    })
    .map_err(error)?;
    let mut entries = Vec::new();
    if let Some(plan) = &effect.plan {
        if effect.new_plan {
            let grants = serde_json::to_string(&plan.grants)
                .map_err(|e| StoreError::Setup(format!("encoding plan: {e}")))?;
            conn.prepare_cached(
                "INSERT INTO plans (payment_id, source, item, catalog_version, grants, wallet, raw_customer_id, recorded_at_us)
                 VALUES (?1, 'catalog', ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    plan.payment_id,
                    plan.item,
                    plan.catalog_version,
                    grants,
                    plan.wallet,
                    plan.raw_customer_id,
                    now
                ])
            })
            .map_err(error)?;
        }
        entries = append(conn, plan, &effect.deltas, &event.event_key, now)?;
    }
    Ok(Ack {
        outcome,
        held_reason: held_reason.map(str::to_owned),
        duplicate: false,
        entries,
        item: effect.plan.map(|plan| plan.item),
    })
}

/// What a payment has on record: its events' facts, review, plan and ledger sums.
fn load_stored(conn: &Connection, payment_id: &str) -> Result<Stored, StoreError> {
    let mut stored = Stored::default();
    {
        let mut stmt = conn
            .prepare_cached("SELECT event_type, refund_status FROM events WHERE payment_id = ?1")
            .map_err(error)?;
        let mut rows = stmt.query([payment_id]).map_err(error)?;
        while let Some(row) = rows.next().map_err(error)? {
            let (t, s): (String, Option<String>) =
                (row.get(0).map_err(error)?, row.get(1).map_err(error)?);
            stored.facts.add(&t, s.as_deref());
        }
    }
    stored.rejected = conn
        .prepare_cached("SELECT decision FROM reviews WHERE payment_id = ?1")
        .and_then(|mut s| {
            s.query_row([payment_id], |r| r.get::<_, String>(0))
                .optional()
        })
        .map_err(error)?
        .as_deref()
        == Some("rejected");
    stored.plan = load_plan(conn, payment_id)?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT sku, SUM(quantity) FROM ledger
             WHERE payment_id = ?1 AND kind IN ('grant', 'revoke', 'restore') GROUP BY sku",
        )
        .map_err(error)?;
    let mut rows = stmt.query([payment_id]).map_err(error)?;
    while let Some(row) = rows.next().map_err(error)? {
        stored.current.insert(
            row.get::<_, String>(0).map_err(error)?,
            Held {
                net: row.get(1).map_err(error)?,
                touched: true,
            },
        );
    }
    Ok(stored)
}

fn load_plan(conn: &Connection, payment_id: &str) -> Result<Option<GrantPlan>, StoreError> {
    let row = conn
        .prepare_cached("SELECT item, catalog_version, grants, wallet, raw_customer_id FROM plans WHERE payment_id = ?1")
        .and_then(|mut s| {
            s.query_row([payment_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, Option<String>>(4)?))
            })
            .optional()
        })
        .map_err(error)?;
    let Some((item, catalog_version, grants, wallet, raw_customer_id)) = row else {
        return Ok(None);
    };
    let grants: Vec<Grant> = serde_json::from_str(&grants)
        .map_err(|e| StoreError::Setup(format!("corrupt plan for {payment_id}: {e}")))?;
    Ok(Some(GrantPlan {
        payment_id: payment_id.to_owned(),
        wallet,
        raw_customer_id,
        item,
        catalog_version,
        grants,
    }))
}

fn append(
    conn: &Connection,
    plan: &GrantPlan,
    deltas: &[Delta],
    event_key: &str,
    now: i64,
) -> Result<Vec<LedgerEntry>, StoreError> {
    if deltas.is_empty() {
        return Ok(Vec::new());
    }
    let mut entry_no: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(entry_no), 0) FROM ledger WHERE payment_id = ?1")
        .and_then(|mut s| s.query_row([&plan.payment_id], |r| r.get(0)))
        .map_err(error)?;
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, wallet, raw_customer_id,
                item, catalog_version, event_key, actor, recorded_at_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'coinflow', ?11) RETURNING seq",
        )
        .map_err(error)?;
    let mut written = Vec::with_capacity(deltas.len());
    for d in deltas {
        entry_no += 1;
        let seq: i64 = stmt
            .query_row(
                params![
                    plan.payment_id,
                    entry_no,
                    d.kind.as_str(),
                    d.sku,
                    d.quantity,
                    plan.wallet,
                    plan.raw_customer_id,
                    plan.item,
                    plan.catalog_version,
                    event_key,
                    now
                ],
                |r| r.get(0),
            )
            .map_err(error)?;
        written.push(LedgerEntry {
            seq,
            payment_id: plan.payment_id.clone(),
            kind: d.kind.as_str().to_owned(),
            sku: d.sku.clone(),
            quantity: d.quantity,
            wallet: plan.wallet.clone(),
            raw_customer_id: plan.raw_customer_id.clone(),
            item: plan.item.clone(),
            event_key: event_key.to_owned(),
            recorded_at: Some(timestamp(now)),
            catalog_version: plan.catalog_version.clone(),
            actor: "coinflow".to_owned(),
            note: None,
        });
    }
    Ok(written)
}
