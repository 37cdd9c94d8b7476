//! Durable storage behind one trait, so backends are interchangeable: [`sql`] implements
//! it on SQLite (the embedded default) and on PostgreSQL (shared by replicas).
//!
//! Every backend keeps these promises:
//! - A write returns only after its transaction is committed durably.
//! - [`Store::record`] is idempotent on the transport identity: a second record of the same
//!   `event_key`, even a concurrent one, changes nothing and returns the original outcome.
//! - A payment's ledger entries are computed by [`reconcile`] from the *set* of its events,
//!   its plan and the policy, in the transaction that records the event, so any arrival
//!   order and any number of duplicates converge on the same ledger. A second writer of the
//!   same entry fails on `UNIQUE (payment_id, entry_no)` instead of doubling it.
//! - Events, plans, reviews and ledger rows are never updated or deleted.

mod queue;
pub mod reconcile;
pub mod sql;
mod sqlite_writer;

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use coinflow_shared::proto::v1::{LedgerEntry, Outcome, RecordedEvent, WebhookEvent};
use tokio::sync::watch;

use crate::decision::{Decision, GrantPlan};

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
    /// The request conflicts with what is recorded; the message says what to fix.
    #[error("{0}")]
    Precondition(String),
    /// Nothing is recorded under that id.
    #[error("{0}")]
    NotFound(String),
    /// The write lost a race with a concurrent one (a unique key or a serialization
    /// failure); the store retries it, so callers only see this if retries ran out.
    #[error("write conflict: {0}")]
    Conflict(#[source] sqlx::Error),
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
    /// The ledger entries this record wrote (none for a duplicate).
    pub entries: Vec<LedgerEntry>,
    /// The catalog entry that prices the payment, when it has a plan.
    pub item: Option<String>,
}

/// Whose entitlements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payer {
    /// `data.wallet`.
    Wallet(String),
    /// `data.rawCustomerId`.
    RawCustomerId(String),
}

/// What a recorded event adds to its payment's facts besides its type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventDetail {
    /// `data.status` of a refund.
    pub refund_status: Option<String>,
    /// `data.chargebackId` of a chargeback.
    pub chargeback_id: Option<String>,
}

impl EventDetail {
    /// The event of type `event_type` as [`crate::lifecycle::Facts::of`] takes it.
    pub fn fact<'a>(&'a self, event_type: &'a str) -> (&'a str, Option<&'a str>, Option<&'a str>) {
        (
            event_type,
            self.refund_status.as_deref(),
            self.chargeback_id.as_deref(),
        )
    }
}

/// Everything recorded for one payment.
#[derive(Debug, Clone, Default)]
pub struct PaymentRecord {
    /// Its events, in the order recorded, with what their facts need besides the type.
    pub events: Vec<(RecordedEvent, EventDetail)>,
    /// Its ledger entries, in the order recorded.
    pub ledger: Vec<LedgerEntry>,
    /// `approved` or `rejected`, once reviewed.
    pub review: Option<String>,
    /// Whether a plan (a priced grant) exists.
    pub planned: bool,
}

/// Ledger filters; all combined with AND.
#[derive(Debug, Clone, Default)]
pub struct LedgerFilter {
    /// Only this payer.
    pub payer: Option<Payer>,
    /// Only this payment.
    pub payment_id: Option<String>,
    /// Only this sku.
    pub sku: Option<String>,
    /// Recorded at or after, in µs since the epoch.
    pub since_us: Option<i64>,
    /// Recorded before, in µs since the epoch.
    pub until_us: Option<i64>,
}

/// A held payment waiting for review.
#[derive(Debug, Clone)]
pub struct HeldPayment {
    /// The held event's `seq`: the cursor of the review queue.
    pub seq: i64,
    /// The first held Settled event.
    pub event: RecordedEvent,
    /// The payment.
    pub payment_id: String,
    /// Payer fields of the held event.
    pub wallet: Option<String>,
    /// Payer fields of the held event.
    pub raw_customer_id: Option<String>,
    /// The type and detail of every event of the payment, for its state.
    pub event_types: Vec<(String, EventDetail)>,
}

/// How a review closes a held payment.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// Grant this plan.
    Approve(GrantPlan),
    /// Close with no grant; the audit entry carries this payer.
    Reject {
        /// The held event's wallet.
        wallet: String,
        /// The held event's user id.
        raw_customer_id: Option<String>,
    },
}

/// What a review did.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// `approved` or `rejected`.
    pub review: String,
    /// The entries written.
    pub entries: Vec<LedgerEntry>,
    /// The same resolution had been recorded before.
    pub duplicate: bool,
}

/// A consumption request.
#[derive(Debug, Clone)]
pub struct Spend {
    /// Who spends.
    pub payer: Payer,
    /// What.
    pub sku: String,
    /// How many (positive).
    pub quantity: i64,
    /// The caller's idempotency key.
    pub idempotency_key: String,
}

/// What a consumption did.
#[derive(Debug, Clone)]
pub struct Spent {
    /// The consume entry (the original one for a repeat).
    pub entry: LedgerEntry,
    /// The payer's net of the sku afterwards.
    pub balance: i64,
    /// The key had been used before.
    pub duplicate: bool,
}

/// The storage contract.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records `event` and reconciles its payment's ledger, in one durable transaction.
    async fn record(&self, event: &WebhookEvent, decision: &Decision) -> Result<Ack, StoreError>;
    /// Net quantity per sku for a payer, skipping skus that net to zero.
    async fn entitlements(&self, payer: &Payer) -> Result<Vec<(String, i64)>, StoreError>;
    /// Everything recorded for a payment; `None` when nothing is.
    async fn payment(&self, payment_id: &str) -> Result<Option<PaymentRecord>, StoreError>;
    /// One event by its transport identity, with its payment id; `None` when it is not
    /// recorded.
    async fn event(
        &self,
        event_key: &str,
    ) -> Result<Option<(RecordedEvent, Option<String>)>, StoreError>;
    /// Ledger entries matching `filter` with `seq < before` (newest first), at most `limit`.
    async fn list_ledger(
        &self,
        filter: &LedgerFilter,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError>;
    /// Ledger entries with `seq > after` for `payer` (all when `None`), oldest first.
    async fn entries_after(
        &self,
        payer: Option<&Payer>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LedgerEntry>, StoreError>;
    /// The highest committed ledger `seq`, updated after each commit in this process.
    fn commits(&self) -> watch::Receiver<i64>;
    /// Held payments waiting for review, oldest first, after the held event `after_seq`.
    async fn list_held(&self, after_seq: i64, limit: u32) -> Result<Vec<HeldPayment>, StoreError>;
    /// Closes a held payment. Idempotent for the same resolution.
    async fn resolve(
        &self,
        payment_id: &str,
        resolution: &Resolution,
        operator: &str,
        note: &str,
    ) -> Result<Resolved, StoreError>;
    /// Records a spend. Idempotent on the key; refused when the balance would go negative.
    async fn consume(&self, spend: &Spend) -> Result<Spent, StoreError>;
    /// How many payments wait for review, and when the oldest was received (µs).
    async fn held_summary(&self) -> Result<(u64, Option<i64>), StoreError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// The actor of the entries a webhook event causes.
const ACTOR_COINFLOW: &str = "coinflow";
/// The actor of the entries an event recorded by `recover --direct` causes.
const ACTOR_RECOVERY: &str = "recovery";

/// The stored origin of `event` (`events.origin`).
pub(crate) fn origin(event: &WebhookEvent) -> &'static str {
    if event.recovered {
        "recovery"
    } else {
        "coinflow"
    }
}

/// Who the ledger says caused the entries `event` writes.
pub(crate) fn actor(event: &WebhookEvent) -> &'static str {
    if event.recovered {
        ACTOR_RECOVERY
    } else {
        ACTOR_COINFLOW
    }
}

/// The names outcomes are stored under.
pub(crate) fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Unspecified => "unspecified",
        Outcome::Recorded => "recorded",
        Outcome::Granted => "granted",
        Outcome::Held => "held",
        Outcome::AlreadyGranted => "already_granted",
        Outcome::Revoked => "revoked",
        Outcome::Restored => "restored",
    }
}

/// The inverse of [`outcome_name`].
pub(crate) fn outcome_from_name(s: &str) -> Outcome {
    match s {
        "recorded" => Outcome::Recorded,
        "granted" => Outcome::Granted,
        "held" => Outcome::Held,
        "already_granted" => Outcome::AlreadyGranted,
        "revoked" => Outcome::Revoked,
        "restored" => Outcome::Restored,
        _ => Outcome::Unspecified,
    }
}

/// Microseconds since the Unix epoch.
pub fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`micros`], as a protobuf timestamp.
pub fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}
