//! Durable storage behind one trait, so backends are interchangeable. SQLite is the
//! embedded default ([`sqlite`]).
//!
//! Every backend keeps these promises:
//! - [`Store::record`] returns only after the event (and any grant) is committed durably.
//! - It is idempotent on the transport identity: a second record of the same `event_key`,
//!   even a concurrent one, changes nothing and returns the original outcome.
//! - A payment is granted at most once, whatever the transport identity, enforced by the
//!   database (`UNIQUE (payment_id, entry_no)`), not by process memory.
//! - Events and ledger rows are never updated or deleted.

pub mod sqlite;

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use coinflow_shared::proto::v1::{LedgerEntry, Outcome, RecordedEvent, WebhookEvent};

use crate::decision::Decision;

/// Storage failures, split by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Transient: the database is busy, locked or unreachable. Retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A bug or corruption; retrying will not help.
    #[error("storage failure: {0}")]
    Internal(#[source] sqlx::Error),
    /// Opening the database or applying migrations failed.
    #[error("storage setup failed: {0}")]
    Setup(String),
}

/// The result of recording one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// What recording did (the original outcome for a duplicate).
    pub outcome: Outcome,
    /// Why the event was held.
    pub held_reason: Option<String>,
    /// The event_key had been recorded before.
    pub duplicate: bool,
}

/// Whose entitlements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payer {
    /// `data.wallet`.
    Wallet(String),
    /// `data.rawCustomerId`.
    RawCustomerId(String),
}

/// Everything recorded for one payment.
#[derive(Debug, Clone, Default)]
pub struct PaymentRecord {
    /// Its events, in the order recorded.
    pub events: Vec<RecordedEvent>,
    /// Its ledger entries, in the order recorded.
    pub ledger: Vec<LedgerEntry>,
}

/// The storage contract.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records `event` and applies `decision` in one durable transaction.
    async fn record(&self, event: &WebhookEvent, decision: &Decision) -> Result<Ack, StoreError>;
    /// Net quantity per sku for a payer, skipping skus that net to zero.
    async fn entitlements(&self, payer: &Payer) -> Result<Vec<(String, i64)>, StoreError>;
    /// Events and ledger entries of a payment; `None` when nothing is recorded.
    async fn payment(&self, payment_id: &str) -> Result<Option<PaymentRecord>, StoreError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The names outcomes are stored under.
pub(crate) fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Unspecified => "unspecified",
        Outcome::Recorded => "recorded",
        Outcome::Granted => "granted",
        Outcome::Held => "held",
        Outcome::AlreadyGranted => "already_granted",
    }
}

/// The inverse of [`outcome_name`].
pub(crate) fn outcome_from_name(s: &str) -> Outcome {
    match s {
        "recorded" => Outcome::Recorded,
        "granted" => Outcome::Granted,
        "held" => Outcome::Held,
        "already_granted" => Outcome::AlreadyGranted,
        _ => Outcome::Unspecified,
    }
}

/// Microseconds since the Unix epoch.
pub(crate) fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`micros`], as a protobuf timestamp.
pub(crate) fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}
