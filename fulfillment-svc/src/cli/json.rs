//! What the operator CLI prints with `--json`: one document per command, built from the
//! gRPC API's messages. Field names are stable (scripts read them); every field is always
//! present, `null` when the service sent nothing; counts and quantities are numbers,
//! amounts integer cents with their currency, times RFC 3339 in UTC.

use std::time::SystemTime;

use coinflow_shared::proto::v1 as pb;
use serde::Serialize;

/// `entitlements --json`.
#[derive(Debug, Serialize)]
pub struct Entitlements {
    /// Who was asked about.
    pub payer: Payer,
    /// Net quantity per sku; empty when the payer has none.
    pub entitlements: Vec<Entitlement>,
}

/// A payer: by wallet or by the merchant's user id.
#[derive(Debug, Serialize)]
pub struct Payer {
    /// The wallet asked about.
    pub wallet: Option<String>,
    /// The `rawCustomerId` asked about.
    pub raw_customer_id: Option<String>,
}

/// One sku's net quantity.
#[derive(Debug, Serialize)]
pub struct Entitlement {
    /// The sku.
    pub sku: String,
    /// Net quantity; negative is debt.
    pub quantity: i64,
    /// Whether the quantity is a debt.
    pub debt: bool,
}

/// `payment --json`.
#[derive(Debug, Serialize)]
pub struct Payment {
    /// The payment id.
    pub payment_id: String,
    /// pending, failed, settled, disputed, reversed, restored or unknown.
    pub state: String,
    /// Why it is held, while it waits for review.
    pub held_reason: Option<String>,
    /// approved or rejected, once reviewed.
    pub review: Option<String>,
    /// The payer's wallet.
    pub wallet: Option<String>,
    /// The payer's `rawCustomerId`.
    pub raw_customer_id: Option<String>,
    /// Every event recorded for it.
    pub events: Vec<Event>,
    /// Its ledger entries.
    pub ledger: Vec<Entry>,
}

/// A recorded event.
#[derive(Debug, Serialize)]
pub struct Event {
    /// The transport identity.
    pub event_key: String,
    /// `eventType`.
    pub event_type: String,
    /// `category`.
    pub category: String,
    /// `created`, as Coinflow sent it.
    pub created: String,
    /// recorded, granted, held, already_granted, revoked, restored, …
    pub outcome: String,
    /// Why it was held.
    pub held_reason: Option<String>,
    /// When the edge received it.
    pub received_at: Option<String>,
    /// Recorded by `recover --direct` rather than a signed delivery.
    pub recovered: bool,
    /// `data.subtotal`, read from the body as the edge reads it.
    pub subtotal: Option<Money>,
    /// `data.total`.
    pub total: Option<Money>,
    /// The exact body Coinflow sent (lossy UTF-8).
    pub raw_body: String,
}

/// An amount.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Money {
    /// Integer cents.
    pub cents: i64,
    /// The currency, when sent.
    pub currency: Option<String>,
}

/// A ledger entry.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// Global, increasing.
    pub seq: i64,
    /// Empty for consumption.
    pub payment_id: String,
    /// grant, revoke, restore, reject or consume.
    pub kind: String,
    /// The sku.
    pub sku: String,
    /// Signed quantity.
    pub quantity: i64,
    /// The payer's wallet.
    pub wallet: String,
    /// The payer's `rawCustomerId`.
    pub raw_customer_id: Option<String>,
    /// The catalog entry that priced the grant.
    pub item: String,
    /// The event that caused it; empty for reviews and consumption.
    pub event_key: String,
    /// When it was recorded.
    pub recorded_at: Option<String>,
    /// The catalog version that priced the grant.
    pub catalog_version: String,
    /// `coinflow`, `operator:<name>`, `api`, `recovery`.
    pub actor: String,
    /// The operator's note.
    pub note: Option<String>,
}

/// `held list --json`.
#[derive(Debug, Serialize)]
pub struct HeldList {
    /// Every held payment, oldest first.
    pub held: Vec<Held>,
}

/// A held payment.
#[derive(Debug, Serialize)]
pub struct Held {
    /// The payment id.
    pub payment_id: String,
    /// Why it is held.
    pub held_reason: String,
    /// Its state.
    pub state: String,
    /// The payer's wallet.
    pub wallet: Option<String>,
    /// The payer's `rawCustomerId`.
    pub raw_customer_id: Option<String>,
    /// The event that was held, body included.
    pub event: Option<Event>,
}

/// `held approve --json` and `held reject --json`.
#[derive(Debug, Serialize)]
pub struct Resolved {
    /// The payment id.
    pub payment_id: String,
    /// approved or rejected.
    pub review: String,
    /// It had been resolved this way already.
    pub duplicate: bool,
    /// The entries the resolution wrote.
    pub entries: Vec<Entry>,
}

impl Entitlements {
    /// The view of a `GetEntitlements` answer for `payer`.
    pub fn of(payer: &pb::payer::Id, entitlements: &[pb::Entitlement]) -> Self {
        let (wallet, raw_customer_id) = match payer {
            pb::payer::Id::Wallet(w) => (Some(w.clone()), None),
            pb::payer::Id::RawCustomerId(u) => (None, Some(u.clone())),
        };
        Self {
            payer: Payer {
                wallet,
                raw_customer_id,
            },
            entitlements: entitlements
                .iter()
                .map(|e| Entitlement {
                    sku: e.sku.clone(),
                    quantity: e.quantity,
                    debt: e.debt,
                })
                .collect(),
        }
    }
}

impl Payment {
    /// The view of a `GetPayment` answer.
    pub fn of(p: &pb::Payment) -> Self {
        Self {
            payment_id: p.payment_id.clone(),
            state: p.state.clone(),
            held_reason: p.held_reason.clone(),
            review: p.review.clone(),
            wallet: p.wallet.clone(),
            raw_customer_id: p.raw_customer_id.clone(),
            events: p.events.iter().map(Event::of).collect(),
            ledger: p.ledger.iter().map(Entry::of).collect(),
        }
    }
}

/// An outcome by the name the ledger stores it under (`already_granted`).
fn outcome(value: i32) -> String {
    crate::store::outcome_name(pb::Outcome::try_from(value).unwrap_or_default()).to_owned()
}

fn rfc3339(t: Option<prost_types::Timestamp>) -> Option<String> {
    let t = SystemTime::try_from(t?).ok()?;
    Some(humantime::format_rfc3339_micros(t).to_string())
}

fn money(m: Option<pb::Money>) -> Option<Money> {
    m.map(|m| Money {
        cents: m.cents,
        currency: m.currency,
    })
}

impl Event {
    /// The view of a recorded event; amounts are read from its body with the edge's own
    /// conversion.
    pub fn of(e: &pb::RecordedEvent) -> Self {
        let parsed =
            coinflow_shared::convert::from_body(e.raw_body.clone(), SystemTime::UNIX_EPOCH);
        Self {
            event_key: e.event_key.clone(),
            event_type: e.event_type.clone(),
            category: e.category.clone(),
            created: e.created_raw.clone(),
            outcome: outcome(e.outcome),
            held_reason: e.held_reason.clone(),
            received_at: rfc3339(e.received_at),
            recovered: e.recovered,
            subtotal: money(parsed.subtotal),
            total: money(parsed.total),
            raw_body: String::from_utf8_lossy(&e.raw_body).into_owned(),
        }
    }
}

impl Entry {
    /// The view of a ledger entry.
    pub fn of(e: &pb::LedgerEntry) -> Self {
        Self {
            seq: e.seq,
            payment_id: e.payment_id.clone(),
            kind: e.kind.clone(),
            sku: e.sku.clone(),
            quantity: e.quantity,
            wallet: e.wallet.clone(),
            raw_customer_id: e.raw_customer_id.clone(),
            item: e.item.clone(),
            event_key: e.event_key.clone(),
            recorded_at: rfc3339(e.recorded_at),
            catalog_version: e.catalog_version.clone(),
            actor: e.actor.clone(),
            note: e.note.clone(),
        }
    }
}

impl HeldList {
    /// The view of every page of `ListHeld`.
    pub fn of(held: &[pb::HeldPayment]) -> Self {
        Self {
            held: held
                .iter()
                .map(|h| Held {
                    payment_id: h.payment_id.clone(),
                    held_reason: h.held_reason.clone(),
                    state: h.state.clone(),
                    wallet: h.wallet.clone(),
                    raw_customer_id: h.raw_customer_id.clone(),
                    event: h.event.as_ref().map(Event::of),
                })
                .collect(),
        }
    }
}

impl Resolved {
    /// The view of a `ResolveHeld` answer for `payment_id`.
    pub fn of(payment_id: &str, r: &pb::ResolveHeldResponse) -> Self {
        Self {
            payment_id: payment_id.to_owned(),
            review: r.review.clone(),
            duplicate: r.duplicate,
            entries: r.entries.iter().map(Entry::of).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_shows_its_amounts_in_cents_and_its_outcome_by_name() {
        let body = br#"{"eventType":"Settled","category":"Purchase","created":"2026-11-20T17:06:05.177Z","data":{"id":"p-1","subtotal":{"cents":500,"currency":"USD"},"total":{"cents":525,"currency":"USD"}}}"#;
        let e = Event::of(&pb::RecordedEvent {
            event_key: "t1:x".into(),
            event_type: "Settled".into(),
            outcome: pb::Outcome::AlreadyGranted.into(),
            received_at: Some(prost_types::Timestamp {
                seconds: 1_795_000_000,
                nanos: 5_000,
            }),
            raw_body: body.to_vec().into(),
            ..Default::default()
        });
        assert_eq!(e.outcome, "already_granted");
        assert_eq!(
            e.subtotal,
            Some(Money {
                cents: 500,
                currency: Some("USD".into())
            })
        );
        assert_eq!(e.total.map(|m| m.cents), Some(525));
        assert_eq!(
            e.received_at.as_deref(),
            Some("2026-11-18T11:06:40.000005Z")
        );

        let garbage = Event::of(&pb::RecordedEvent {
            raw_body: b"\xff not json".to_vec().into(),
            ..Default::default()
        });
        assert_eq!((garbage.subtotal, garbage.received_at), (None, None));
        assert_eq!(garbage.outcome, "unspecified");
    }
}
