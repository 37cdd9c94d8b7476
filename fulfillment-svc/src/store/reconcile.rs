//! The backend-independent heart of every write: from what a payment *should* hold (its
//! plan, if its events entitle it) and what the ledger says it *does* hold, the entries
//! that close the gap. Applied inside the transaction that records the event, so replays,
//! duplicates and any arrival order converge on the same ledger.

use std::collections::BTreeMap;

use coinflow_shared::proto::v1::{Outcome, WebhookEvent};

use crate::catalog::Grant;
use crate::decision::{Decision, GrantPlan, HeldReason, SETTLED};
use crate::lifecycle::{ChargebackPolicy, Facts};

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
fn outcome_of(
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
    if let Decision::Hold(HeldReason::Unparseable) = decision {
        return (Outcome::Held, Some(HeldReason::Unparseable.as_str()));
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

/// What a payment has on record before an event is recorded (without the event).
#[derive(Debug, Default)]
pub struct Stored {
    /// The facts of its recorded events.
    pub facts: Facts,
    /// A review rejected it.
    pub rejected: bool,
    /// Its plan, if priced.
    pub plan: Option<GrantPlan>,
    /// What its ledger entries add up to, per sku.
    pub current: BTreeMap<String, Held>,
}

/// What recording one event does; each backend writes it.
#[derive(Debug)]
pub struct Effect {
    /// The event's outcome.
    pub outcome: Outcome,
    /// Why it is held.
    pub held_reason: Option<&'static str>,
    /// The payment's plan after this event.
    pub plan: Option<GrantPlan>,
    /// Whether `plan` is new (priced by this event) and must be stored.
    pub new_plan: bool,
    /// The ledger entries to append for the payment.
    pub deltas: Vec<Delta>,
}

/// Decides what recording `event` does, given what its payment has on record (`None`
/// for an event without a payment id). The one place both backends take this from.
pub fn apply(
    event: &WebhookEvent,
    decision: &Decision,
    stored: Option<Stored>,
    policy: ChargebackPolicy,
) -> Effect {
    let Some(mut stored) = stored else {
        let (outcome, held_reason) = match decision {
            Decision::Hold(reason) => (Outcome::Held, Some(reason.as_str())),
            _ => (Outcome::Recorded, None),
        };
        return Effect {
            outcome,
            held_reason,
            plan: None,
            new_plan: false,
            deltas: Vec::new(),
        };
    };
    stored.facts.add(
        &event.event_type,
        event.refund_status.as_deref(),
        event.chargeback_id.as_deref(),
    );
    let mut new_plan = false;
    if stored.plan.is_none()
        && !stored.rejected
        && let Decision::Grant(plan) = decision
    {
        stored.plan = Some(plan.clone());
        new_plan = true;
    }
    let entitled = stored.facts.entitled(policy);
    let target: &[Grant] = match &stored.plan {
        Some(p) if entitled => &p.grants,
        _ => &[],
    };
    let deltas = deltas(target, &stored.current);
    let (outcome, held_reason) =
        outcome_of(event, decision, stored.plan.is_some(), entitled, &deltas);
    Effect {
        outcome,
        held_reason,
        plan: stored.plan,
        new_plan,
        deltas,
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
