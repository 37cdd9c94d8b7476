//! What both group-commit write paths share: the queue of events waiting for a batch, how
//! a batch is filled from it, and how a commit wakes `WatchEntitlements` streams.

use coinflow_shared::proto::v1::{LedgerEntry, WebhookEvent};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Ack, StoreError};
use crate::decision::Decision;

/// One event waiting for its batch.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) event: WebhookEvent,
    pub(super) decision: Decision,
    pub(super) reply: oneshot::Sender<Result<Ack, StoreError>>,
}

/// The sending side: callers wait here for their batch's answer.
#[derive(Debug)]
pub(super) struct Queue {
    jobs: mpsc::Sender<Job>,
}

/// A queue holding up to `capacity` waiting events.
pub(super) fn channel(capacity: usize) -> (Queue, mpsc::Receiver<Job>) {
    let (jobs, queue) = mpsc::channel(capacity);
    (Queue { jobs }, queue)
}

impl Queue {
    /// Queues `event` and waits for the answer of the batch it joins.
    pub(super) async fn record(
        &self,
        event: &WebhookEvent,
        decision: &Decision,
    ) -> Result<Ack, StoreError> {
        let stopped = || unavailable("the ledger writer stopped".into());
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

/// Moves queued events into `batch` without waiting, until it holds `max`.
pub(super) fn fill(batch: &mut Vec<Job>, queue: &mut mpsc::Receiver<Job>, max: usize) {
    while batch.len() < max {
        match queue.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// Wakes `WatchEntitlements` streams up to the newest of `entries`, once committed.
pub(super) fn notify<'a>(
    commits: &watch::Sender<i64>,
    entries: impl IntoIterator<Item = &'a LedgerEntry>,
) {
    if let Some(last) = entries.into_iter().map(|e| e.seq).max() {
        commits.send_if_modified(|seq| {
            let newer = last > *seq;
            *seq = (*seq).max(last);
            newer
        });
    }
}

/// A storage error the caller should retry later.
pub(super) fn unavailable(why: String) -> StoreError {
    StoreError::Unavailable(sqlx::Error::Protocol(why))
}
