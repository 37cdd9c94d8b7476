//! PostgreSQL's write path for webhook events: group commit. A few workers each take what
//! is queued (up to [`BATCH`] events, at most one per payment) and record it in one
//! transaction: the payments' locks ([`Core::lock`]), every event up to its ledger entries,
//! then the ledger-append lock and every event's entries, one commit, and only then the
//! answers. The append lock is held from the first entry to the commit, so `seq` order
//! stays commit order; taking it last keeps that window short and lets the workers overlap
//! the rest. If anything in a batch fails (a race lost to another replica, a bad row), the
//! batch rolls back and each of its events is recorded in a transaction of its own (a lost
//! race comes back as a conflict, which [`super::SqlStore`] retries), so one event's error
//! stays its own.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc};

use super::{Core, StoreError, classify};
use crate::store::Ack;
use crate::store::queue::{self, Job, Queue};

/// The most events one transaction takes.
pub const BATCH: usize = 64;

/// Transactions in flight at once, each on its own pooled connection.
const WORKERS: usize = 8;

/// Starts the workers on the current tokio runtime. Events recorded through the returned
/// queue are answered once their transaction commits; dropping the queue stops the workers
/// once it is empty.
pub(super) fn start(core: &Arc<Core>) -> Queue {
    let (queue, waiting) = queue::channel(4 * BATCH);
    let intake = Arc::new(Mutex::new(Intake {
        queue: waiting,
        carried: Vec::new(),
    }));
    for _ in 0..WORKERS {
        tokio::spawn(work(Arc::clone(core), Arc::clone(&intake)));
    }
    queue
}

/// The queue, and the events held back because their payment was already in a batch.
struct Intake {
    queue: mpsc::Receiver<Job>,
    carried: Vec<Job>,
}

impl Intake {
    /// The next batch: carried events first, then what is queued, at most one event per
    /// payment, or per event key for events without one (a second one waits for the next
    /// batch, so that it sees the first). `None` once the queue is closed and empty.
    async fn next(&mut self) -> Option<Vec<Job>> {
        if self.carried.is_empty() {
            let first = self.queue.recv().await?;
            self.carried.push(first);
        }
        queue::fill(&mut self.carried, &mut self.queue, BATCH);
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
        Some(batch)
    }
}

async fn work(core: Arc<Core>, intake: Arc<Mutex<Intake>>) {
    loop {
        let Some(batch) = intake.lock().await.next().await else {
            return;
        };
        match record_batch(&core, &batch).await {
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
                    let core = Arc::clone(&core);
                    tokio::spawn(async move {
                        let ack = core.record_once(&job.event, &job.decision).await;
                        let _ = job.reply.send(ack);
                    });
                }
            }
        }
    }
}

async fn record_batch(core: &Core, jobs: &[Job]) -> Result<Vec<Ack>, StoreError> {
    let mut conn = core.write.acquire().await.map_err(classify)?;
    let mut tx = core.begin(&mut conn).await?;
    let payments: Vec<&str> = jobs
        .iter()
        .filter_map(|j| j.event.payment_id.as_deref())
        .collect();
    core.lock(&mut tx, &payments).await?;
    let events: Vec<_> = jobs.iter().map(|j| (&j.event, &j.decision)).collect();
    let prepared = core.prepare(&mut tx, &events).await?;
    let acks = core.finish(&mut tx, prepared).await?;
    tx.commit().await.map_err(classify)?;
    Ok(acks)
}
