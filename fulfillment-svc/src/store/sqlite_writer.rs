//! SQLite's write path for webhook events, in three threads:
//!
//! - the **writer** owns a `rusqlite` connection and group-commits whatever is queued (up
//!   to [`BATCH`] events) in one `BEGIN IMMEDIATE` transaction;
//! - the **syncer** makes committed batches durable with one `fdatasync` of the WAL for
//!   every batch committed since its last one, and only then answers their callers;
//! - the **checkpointer** copies the WAL back into the database and, when it has grown,
//!   has the writer rewind it between two batches.
//!
//! No caller hears "recorded" before its batch is on disk. The writer commits with
//! `synchronous = NORMAL` (WAL frames written, not yet synced; SQLite stays consistent
//! after a crash or power loss in that mode) and goes straight on to the next batch while
//! the syncer waits for the disk, so the fsync, the slowest step, is off the writer's path
//! and shared by several batches under load. Frames written before an `fdatasync` are on
//! disk after it, so the WAL then holds every transaction acked. A failed `fdatasync`
//! stops both threads (the page cache can no longer be trusted): ingest answers
//! Unavailable until the process restarts and SQLite recovers from what is on disk.
//!
//! It runs synchronously on its own threads because a batch is a dozen statements per
//! event: through an async driver each statement is a round trip between threads, which
//! cost far more than SQLite's own work (see BENCHMARKS.md). The decisions are the same
//! pure functions the PostgreSQL path uses (`Facts`, `reconcile`); only the SQL plumbing
//! differs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime};

use coinflow_shared::proto::v1::{LedgerEntry, WebhookEvent};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, watch};

use super::queue::{self, Job, Queue, fill, notify, unavailable};
use super::reconcile::{Delta, Held, Stored, apply};
use super::{Ack, StoreError, actor, micros, origin, outcome_from_name, outcome_name, timestamp};
use crate::catalog::Grant;
use crate::decision::{Decision, GrantPlan};
use crate::lifecycle::ChargebackPolicy;

/// The most events one group commit takes.
pub const BATCH: usize = 256;

/// How long a statement waits for a lock another connection holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// WAL frames after which the WAL is rewound (16 MiB of 4 KiB pages).
const REWIND_AT: i64 = 4_096;

/// At most this many frames are left for the writer to copy when it rewinds the WAL.
const REWIND_LEFT: i64 = 64;

/// A committed batch waiting for its WAL to be synced.
struct Committed {
    jobs: Vec<Job>,
    acks: Vec<Result<Ack, StoreError>>,
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

/// Opens `path` (already migrated) and starts the writer, syncer and checkpointer threads.
/// Events recorded through the returned queue are answered once their batch is committed
/// and on disk; dropping the queue stops the threads.
pub(super) fn start(
    path: &Path,
    policy: ChargebackPolicy,
    commits: Arc<watch::Sender<i64>>,
) -> Result<Queue, StoreError> {
    let conn = Connection::open(path).map_err(error)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 0;",
    )
    .map_err(error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(error)?;
    let checkpointer = Connection::open(path).map_err(error)?;
    checkpointer.busy_timeout(BUSY_TIMEOUT).map_err(error)?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal = PathBuf::from(wal);
    let (stop, stopped) = std_mpsc::channel::<()>();
    let (jobs, queue) = queue::channel(4 * BATCH);
    let (to_sync, committed) = std_mpsc::channel();
    let rewind = Arc::new(AtomicBool::new(false));
    let rewind_wanted = Arc::clone(&rewind);
    std::thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || {
            write(conn, queue, policy, &to_sync, &rewind_wanted);
            drop(stop);
        })
        .map_err(|e| StoreError::Setup(format!("starting the ledger writer: {e}")))?;
    std::thread::Builder::new()
        .name("ledger-sync".into())
        .spawn(move || sync(&wal, &committed, &commits))
        .map_err(|e| StoreError::Setup(format!("starting the ledger syncer: {e}")))?;
    std::thread::Builder::new()
        .name("ledger-checkpoint".into())
        .spawn(move || checkpoint(&checkpointer, &stopped, &rewind))
        .map_err(|e| StoreError::Setup(format!("starting the WAL checkpointer: {e}")))?;
    Ok(jobs)
}

/// Copies the WAL back into the database every `CHECKPOINT_EVERY` (PASSIVE: never blocks
/// the writer), and asks the writer to rewind it once it holds [`REWIND_AT`] frames. Under
/// sustained load a PASSIVE pass never finds the writer idle, so the WAL would otherwise
/// grow without bound. Before asking, it passes again until at most [`REWIND_LEFT`] frames
/// are left to copy: the writer copies those itself, and ingest waits while it does. A
/// final TRUNCATE runs when the writer stops.
fn checkpoint(conn: &Connection, stopped: &std_mpsc::Receiver<()>, rewind: &AtomicBool) {
    const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
    const CATCH_UP_PASSES: usize = 3;
    let passive = || {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
    };
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
        match passive() {
            Ok((frames, _)) if frames >= REWIND_AT => {
                for _ in 0..CATCH_UP_PASSES {
                    match passive() {
                        Ok((frames, copied)) if frames - copied > REWIND_LEFT => {}
                        _ => break,
                    }
                }
                rewind.store(true, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

/// The writer thread: commits batches and hands them to the syncer. Between two batches,
/// when the checkpointer asks, it rewinds the WAL (RESTART): the checkpointer's passes
/// left at most [`REWIND_LEFT`] frames, so this costs those and the syncs.
fn write(
    mut conn: Connection,
    mut queue: mpsc::Receiver<Job>,
    policy: ChargebackPolicy,
    to_sync: &std_mpsc::Sender<Committed>,
    rewind: &AtomicBool,
) {
    while let Some(first) = queue.blocking_recv() {
        if rewind.swap(false, Ordering::Relaxed) {
            rewind_wal(&conn);
        }
        let mut jobs = Vec::with_capacity(BATCH.min(queue.len() + 1));
        jobs.push(first);
        fill(&mut jobs, &mut queue, BATCH);
        match record_batch(&mut conn, &jobs, policy) {
            Ok(acks) => {
                if let Err(std_mpsc::SendError(lost)) = to_sync.send(Committed { jobs, acks }) {
                    for job in lost.jobs {
                        let _ = job.reply.send(Err(unavailable(
                            "the ledger syncer stopped; restart to recover".into(),
                        )));
                    }
                    return;
                }
            }
            Err(e) => {
                let why = e.to_string();
                for job in jobs {
                    let _ = job
                        .reply
                        .send(Err(unavailable(format!("batch commit failed: {why}"))));
                }
            }
        }
    }
}

/// Rewinds the WAL (RESTART). That waits for readers still on an older snapshot; rather
/// than hold up ingest behind a slow reader it gives up after `WAIT`, and the checkpointer
/// asks again after its next pass.
fn rewind_wal(conn: &Connection) {
    const WAIT: Duration = Duration::from_millis(20);
    let rewound = conn.busy_timeout(WAIT).and_then(|()| {
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0))
    });
    if let Err(e) = conn.busy_timeout(BUSY_TIMEOUT) {
        tracing::warn!(error = %e, "restoring the writer's busy timeout");
    }
    match rewound {
        Ok(0) => {}
        Ok(_) => tracing::debug!("WAL rewind postponed: a reader is on an older snapshot"),
        Err(e) => tracing::warn!(error = %e, "rewinding the WAL failed"),
    }
}

/// The syncer thread: one `fdatasync` of the WAL for every batch committed since the last,
/// then the answers. Stops at the first failed sync.
fn sync(wal: &Path, committed: &std_mpsc::Receiver<Committed>, commits: &watch::Sender<i64>) {
    while let Ok(first) = committed.recv() {
        let mut group = vec![first];
        group.extend(committed.try_iter());
        if let Err(e) = std::fs::File::open(wal).and_then(|f| f.sync_data()) {
            tracing::error!(error = %e, wal = %wal.display(),
                "syncing the WAL failed: ingest stops until the process restarts");
            for job in group.into_iter().flat_map(|c| c.jobs) {
                let _ = job
                    .reply
                    .send(Err(unavailable(format!("syncing the WAL failed: {e}"))));
            }
            return;
        }
        notify(
            commits,
            group
                .iter()
                .flat_map(|c| &c.acks)
                .filter_map(|a| a.as_ref().ok())
                .flat_map(|a| &a.entries),
        );
        for Committed { jobs, acks } in group {
            for (job, ack) in jobs.into_iter().zip(acks) {
                let _ = job.reply.send(ack);
            }
        }
    }
}

/// Records a batch in one transaction. The fast path writes every event straight into it;
/// if any event fails on its own (a corrupt plan, a constraint), the batch is rolled back
/// and written again with a savepoint per event, so that one event's error is its own.
/// Savepoints are not on the fast path because each one copies every page it touches
/// into a statement journal (a third of the writer's time in the profile).
fn record_batch(
    conn: &mut Connection,
    batch: &[Job],
    policy: ChargebackPolicy,
) -> Result<Vec<Result<Ack, StoreError>>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(error)?;
    let mut acks = Vec::with_capacity(batch.len());
    for job in batch {
        match record_in(&tx, &job.event, &job.decision, policy) {
            Ok(ack) => acks.push(Ok(ack)),
            Err(_) => {
                drop(tx);
                return record_isolated(conn, batch, policy);
            }
        }
    }
    tx.commit().map_err(error)?;
    Ok(acks)
}

/// The slow path of [`record_batch`]: one savepoint per event.
fn record_isolated(
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
    let (stored, new_payment) = match &event.payment_id {
        None => (None, false),
        Some(payment_id) => match load_stored(conn, payment_id)? {
            Some(stored) => (Some(stored), false),
            None => (Some(Stored::default()), true),
        },
    };
    let effect = apply(event, decision, stored, policy);
    let (outcome, held_reason) = (effect.outcome, effect.held_reason);
    let received = event
        .received_at
        .and_then(|t| SystemTime::try_from(t).ok())
        .map_or(now, micros);
    conn.prepare_cached(
        "INSERT INTO events (event_key, event_type, category, created_raw, payment_id, wallet,
            raw_customer_id, refund_status, chargeback_id, outcome, held_reason, received_at_us,
            recorded_at_us, raw_body, origin)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
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
            event.chargeback_id,
            outcome_name(outcome),
            held_reason,
            received,
            now,
            &event.raw_body[..],
            origin(event),
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
        entries = append(
            conn,
            plan,
            &effect.deltas,
            (&event.event_key, actor(event)),
            now,
            new_payment,
        )?;
    }
    Ok(Ack {
        outcome,
        held_reason: held_reason.map(str::to_owned),
        duplicate: false,
        entries,
        item: effect.plan.map(|plan| plan.item),
    })
}

/// What a payment has on record: its events' facts, review, plan and ledger sums; `None`
/// when it has no event yet. Reviews, plans and ledger entries of a payment are only ever
/// written after one of its events, so a payment without events has none of them, and its
/// first event (the common case) costs one lookup here instead of four. Were that ever
/// untrue, the unique keys on `plans` and on the ledger's `(payment_id, entry_no)` would
/// refuse the event rather than price or grant the payment twice.
fn load_stored(conn: &Connection, payment_id: &str) -> Result<Option<Stored>, StoreError> {
    let mut stored = Stored::default();
    let mut any = false;
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT event_type, refund_status, chargeback_id FROM events WHERE payment_id = ?1",
            )
            .map_err(error)?;
        let mut rows = stmt.query([payment_id]).map_err(error)?;
        while let Some(row) = rows.next().map_err(error)? {
            let (t, s, c): (String, Option<String>, Option<String>) = (
                row.get(0).map_err(error)?,
                row.get(1).map_err(error)?,
                row.get(2).map_err(error)?,
            );
            stored.facts.add(&t, s.as_deref(), c.as_deref());
            any = true;
        }
    }
    if !any {
        return Ok(None);
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
    Ok(Some(stored))
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
    (event_key, actor): (&str, &str),
    now: i64,
    new_payment: bool,
) -> Result<Vec<LedgerEntry>, StoreError> {
    if deltas.is_empty() {
        return Ok(Vec::new());
    }
    // A payment's first event finds no ledger entries (see `load_stored`).
    let mut entry_no: i64 = if new_payment {
        0
    } else {
        conn.prepare_cached("SELECT COALESCE(MAX(entry_no), 0) FROM ledger WHERE payment_id = ?1")
            .and_then(|mut s| s.query_row([&plan.payment_id], |r| r.get(0)))
            .map_err(error)?
    };
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO ledger (payment_id, entry_no, kind, sku, quantity, wallet, raw_customer_id,
                item, catalog_version, event_key, actor, recorded_at_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .map_err(error)?;
    let mut written = Vec::with_capacity(deltas.len());
    for d in deltas {
        entry_no += 1;
        stmt.execute(params![
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
            actor,
            now
        ])
        .map_err(error)?;
        written.push(LedgerEntry {
            seq: conn.last_insert_rowid(),
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
            actor: actor.to_owned(),
            note: None,
        });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coinflow_shared::proto::v1::Outcome;
    use tokio::sync::oneshot;

    fn migrated() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("ledger.db")).unwrap();
        for (_, _, sql) in crate::store::sql::SQLITE_MIGRATIONS {
            conn.execute_batch(sql).unwrap();
        }
        (dir, conn)
    }

    fn settled(payment_id: &str) -> Job {
        let (event, decision) = event_and_decision(payment_id);
        let (reply, _) = oneshot::channel();
        Job {
            event,
            decision,
            reply,
        }
    }

    fn event_and_decision(payment_id: &str) -> (WebhookEvent, Decision) {
        let event = WebhookEvent {
            event_key: format!("key-{payment_id}"),
            event_type: "Settled".into(),
            category: "Purchase".into(),
            created_raw: "2026-01-01T00:00:00Z".into(),
            payment_id: Some(payment_id.into()),
            wallet: Some("wallet".into()),
            ..Default::default()
        };
        let decision = Decision::Grant(GrantPlan {
            payment_id: payment_id.into(),
            wallet: "wallet".into(),
            raw_customer_id: None,
            item: "sword".into(),
            catalog_version: "v1".into(),
            grants: vec![Grant {
                sku: "sword".into(),
                quantity: 1,
            }],
        });
        (event, decision)
    }

    #[tokio::test]
    async fn after_a_failed_wal_sync_nothing_is_acked() {
        let (dir, conn) = migrated();
        drop(conn);
        let path = dir.path().join("ledger.db");
        let commits = Arc::new(watch::Sender::new(0));
        let writer = start(&path, ChargebackPolicy::default(), commits).unwrap();
        let (event, decision) = event_and_decision("p-before");
        assert_eq!(
            writer.record(&event, &decision).await.unwrap().outcome,
            Outcome::Granted
        );
        // The syncer can no longer reach the WAL: its next sync fails.
        std::fs::rename(dir.path().join("ledger.db-wal"), dir.path().join("moved")).unwrap();
        for i in 0..3 {
            let (event, decision) = event_and_decision(&format!("p-after-{i}"));
            let answer = writer.record(&event, &decision).await;
            assert!(
                matches!(answer, Err(StoreError::Unavailable(_))),
                "{i}: {answer:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_rewinds_under_sustained_writes() {
        let (dir, conn) = migrated();
        drop(conn);
        let path = dir.path().join("ledger.db");
        let commits = Arc::new(watch::Sender::new(0));
        let writer = Arc::new(start(&path, ChargebackPolicy::default(), commits).unwrap());
        let wal = dir.path().join("ledger.db-wal");
        // The writer is never idle: 16 senders, each with its next event ready, keep batches
        // small, so each event's random index pages cost whole WAL frames; 8,000 events write
        // well over 100 MiB of frames if the WAL never rewinds.
        let senders = (0..16).map(|s| {
            let writer = Arc::clone(&writer);
            async move {
                let mut acks = Vec::new();
                for i in 0..500 {
                    let (event, decision) = event_and_decision(&format!("p-{s}-{i}"));
                    acks.push(writer.record(&event, &decision).await);
                }
                acks
            }
        });
        let events = senders.map(tokio::spawn);
        let all = tokio::spawn(futures::future::join_all(events));
        let mut largest = 0;
        while !all.is_finished() {
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for ack in all.await.unwrap().into_iter().flat_map(Result::unwrap) {
            assert_eq!(ack.unwrap().outcome, Outcome::Granted);
        }
        assert!(largest < 96 << 20, "the WAL reached {largest} bytes");
    }

    #[test]
    fn one_failing_event_fails_alone_and_its_batch_still_commits() {
        let (_dir, mut conn) = migrated();
        // A plan that cannot be read makes the next event of that payment fail.
        conn.execute_batch(
            "INSERT INTO events (event_key, event_type, category, created_raw, payment_id,
                outcome, received_at_us, recorded_at_us, raw_body)
             VALUES ('key-earlier', 'Settled', 'Purchase', '2026-01-01T00:00:00Z', 'p-bad',
                'granted', 0, 0, x'');
             INSERT INTO plans (payment_id, source, item, catalog_version, grants, wallet, recorded_at_us)
             VALUES ('p-bad', 'catalog', 'sword', 'v1', 'not json', 'wallet', 0);",
        )
        .unwrap();
        let batch = vec![settled("p-1"), settled("p-bad"), settled("p-2")];
        let acks = record_batch(&mut conn, &batch, ChargebackPolicy::default()).unwrap();
        assert_eq!(acks[0].as_ref().unwrap().outcome, Outcome::Granted);
        assert!(
            matches!(acks[1], Err(StoreError::Setup(_))),
            "{:?}",
            acks[1]
        );
        assert_eq!(acks[2].as_ref().unwrap().outcome, Outcome::Granted);
        let events: Vec<String> = conn
            .prepare("SELECT payment_id FROM events ORDER BY payment_id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(events, ["p-1", "p-2", "p-bad"]);
        let grants: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM ledger WHERE kind = 'grant'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(grants, 2);
    }

    /// An ack reports the ledger rows as stored: each entry's `seq` is its row's.
    #[test]
    fn acked_entries_carry_the_seq_of_their_rows() {
        let (_dir, mut conn) = migrated();
        conn.execute_batch(
            "INSERT INTO ledger (kind, sku, quantity, wallet, actor, idempotency_key, recorded_at_us)
             VALUES ('consume', 'gem', 1, 'w', 'api', 'k1', 0)",
        )
        .unwrap();
        let batch = vec![settled("p-1"), settled("p-2"), settled("p-3")];
        let acked: Vec<(i64, String)> =
            record_batch(&mut conn, &batch, ChargebackPolicy::default())
                .unwrap()
                .into_iter()
                .flat_map(|ack| ack.unwrap().entries)
                .map(|e| (e.seq, e.payment_id))
                .collect();
        let stored: Vec<(i64, String)> = conn
            .prepare("SELECT seq, payment_id FROM ledger WHERE payment_id IS NOT NULL ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(acked.len(), 3);
        assert_eq!(acked, stored);
        assert!(acked.iter().all(|(seq, _)| *seq > 1));
    }

    /// A payment's first event skips the plan and ledger lookups (`load_stored`); a plan
    /// this service never wrote without an event must still never be priced again.
    #[test]
    fn a_plan_without_events_refuses_the_event_instead_of_pricing_twice() {
        let (_dir, mut conn) = migrated();
        conn.execute(
            "INSERT INTO plans (payment_id, source, item, catalog_version, grants, wallet, recorded_at_us)
             VALUES ('p-orphan', 'catalog', 'sword', 'v1', '[]', 'wallet', 0)",
            [],
        )
        .unwrap();
        let batch = vec![settled("p-orphan"), settled("p-1")];
        let acks = record_batch(&mut conn, &batch, ChargebackPolicy::default()).unwrap();
        assert!(
            matches!(acks[0], Err(StoreError::Conflict(_))),
            "{:?}",
            acks[0]
        );
        assert_eq!(acks[1].as_ref().unwrap().outcome, Outcome::Granted);
        let orphan: i64 = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM events WHERE payment_id = 'p-orphan')
                      + (SELECT COUNT(*) FROM ledger WHERE payment_id = 'p-orphan')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(orphan, 0);
    }

    #[test]
    fn a_batch_with_a_duplicate_records_it_once() {
        let (_dir, mut conn) = migrated();
        let batch = vec![settled("p-1"), settled("p-1")];
        let acks = record_batch(&mut conn, &batch, ChargebackPolicy::default()).unwrap();
        assert!(!acks[0].as_ref().unwrap().duplicate);
        assert!(acks[1].as_ref().unwrap().duplicate);
        let grants: i64 = conn
            .query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0))
            .unwrap();
        assert_eq!(grants, 1);
    }
}
