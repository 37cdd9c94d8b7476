//! The backend-independent heart of every write: from what a payment *should* hold (its
//! plan, if its events entitle it) and what the ledger says it *does* hold, the entries
//! that close the gap. Applied inside the transaction that records the event, so replays,
//! duplicates and any arrival order converge on the same ledger.

use std::collections::BTreeMap;

use coinflow_shared::proto::v1::{Outcome, WebhookEvent};

use crate::catalog::Grant;
use crate::decision::{Decision, SETTLED};

/// The kinds of ledger entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The first time a payment grants a sku.
    Grant,
    /// A compensating entry taking back what the payment granted.
    Revoke,
    /// Giving back what a revocation took (a chargeback won).
    Restore,
    /// The audit entry of a review that closed a payment with no grant (quantity 0).
    Reject,
    /// A payer spent some of a consumable sku.
    Consume,
}

impl Kind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Revoke => "revoke",
            Self::Restore => "restore",
            Self::Reject => "reject",
            Self::Consume => "consume",
        }
    }
}

/// What a payment's entries add up to for one sku.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// The net quantity.
    pub net: i64,
    /// Whether any grant, revoke or restore entry exists.
    pub touched: bool,
}

/// One entry to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Grant, revoke or restore.
    pub kind: Kind,
    /// The sku.
    pub sku: String,
    /// Signed quantity.
    pub quantity: i64,
}

/// The entries that move a payment from `current` to `target` (absent skus are 0).
pub fn deltas(target: &[Grant], current: &BTreeMap<String, Held>) -> Vec<Delta> {
    let mut skus: BTreeMap<&str, (i64, Held)> = BTreeMap::new();
    for g in target {
        skus.entry(&g.sku).or_default().0 += g.quantity;
    }
    for (sku, held) in current {
        skus.entry(sku).or_default().1 = *held;
    }
    skus.into_iter()
        .filter_map(|(sku, (want, held))| {
            let quantity = want - held.net;
            let kind = match quantity {
                0 => return None,
                q if q < 0 => Kind::Revoke,
                _ if held.touched => Kind::Restore,
                _ => Kind::Grant,
            };
            Some(Delta {
                kind,
                sku: sku.to_owned(),
                quantity,
            })
        })
        .collect()
}

/// The outcome an event gets from what reconciling did.
pub fn outcome_of(
    event: &WebhookEvent,
    decision: &Decision,
    planned: bool,
    entitled: bool,
    deltas: &[Delta],
) -> (Outcome, Option<&'static str>) {
    if let Some(d) = deltas.first() {
        return match d.kind {
            Kind::Grant => (Outcome::Granted, None),
            Kind::Restore => (Outcome::Restored, None),
            _ => (Outcome::Revoked, None),
        };
    }
    if event.event_type != SETTLED {
        return (Outcome::Recorded, None);
    }
    match decision {
        Decision::Hold(reason) if !planned => (Outcome::Held, Some(reason.as_str())),
        _ if planned && entitled => (Outcome::AlreadyGranted, None),
        _ => (Outcome::Recorded, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(sku: &str, quantity: i64) -> Grant {
        Grant {
            sku: sku.into(),
            quantity,
        }
    }

    fn held(entries: &[(&str, i64)]) -> BTreeMap<String, Held> {
        entries
            .iter()
            .map(|(s, n)| {
                (
                    (*s).to_owned(),
                    Held {
                        net: *n,
                        touched: true,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn grant_revoke_restore() {
        let bundle = [g("sword", 1), g("credits", 500)];
        let first = deltas(&bundle, &BTreeMap::new());
        assert_eq!(
            first
                .iter()
                .map(|d| (d.kind, d.quantity))
                .collect::<Vec<_>>(),
            [(Kind::Grant, 500), (Kind::Grant, 1)]
        );
        assert!(deltas(&bundle, &held(&[("sword", 1), ("credits", 500)])).is_empty());
        let revoke = deltas(&[], &held(&[("sword", 1), ("credits", 500)]));
        assert_eq!(
            revoke
                .iter()
                .map(|d| (d.kind, d.quantity))
                .collect::<Vec<_>>(),
            [(Kind::Revoke, -500), (Kind::Revoke, -1)]
        );
        let restore = deltas(&bundle, &held(&[("sword", 0), ("credits", 0)]));
        assert_eq!(
            restore
                .iter()
                .map(|d| (d.kind, d.quantity))
                .collect::<Vec<_>>(),
            [(Kind::Restore, 500), (Kind::Restore, 1)]
        );
        assert!(deltas(&[], &held(&[("sword", 0)])).is_empty());
    }
}
