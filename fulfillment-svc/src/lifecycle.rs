//! A payment's state, and whether its grant should stand, derived from the *set* of
//! events seen for it, never from the order they arrived in. This is the one place the
//! state table lives.
//!
//! Each chargeback is its own **dispute**, named by its `chargebackId` (a chargeback event
//! without one belongs to the dispute `""`). A dispute is **open** when its Opened was seen
//! and its Won was not; a Lost reverses the payment whatever else was seen.
//!
//! | state    | when the set contains (rows checked top to bottom)                      |
//! |----------|--------------------------------------------------------------------------|
//! | reversed | a refund (not `Failed`), a lost chargeback, ACH Returned, ACH Chargeback |
//! | restored | disputes, every one of them won (Won, after Opened in whatever order)   |
//! | disputed | an open dispute                                                          |
//! | settled  | Settled                                                                  |
//! | failed   | Declined, Suspected Fraud, Voided, Payment Expiration, ACH Failed        |
//! | pending  | Authorized, Pending Review, ACH Initiated, ACH Batched                   |
//! | unknown  | none of these (e.g. only event types of other families)                  |
//!
//! So a late `Card Payment Authorized` never moves a settled payment back, a `Refund`
//! seen before its `Settled` still reads reversed, and a second dispute opened after the
//! first was won reads disputed again. Chargeback events exist for cards, PayPal and Venmo
//! with the same Opened / Won / Lost names.
//!
//! Whether the payment's planned grant stands ([`Facts::entitled`]): settled, and not
//! reversed, and, under [`ChargebackPolicy::RevokeOnOpen`], no dispute open.

use std::collections::BTreeMap;

/// The state of one payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentState {
    /// Not yet paid.
    Pending,
    /// The payment failed.
    Failed,
    /// Paid; the merchant holds the funds.
    Settled,
    /// A chargeback is open.
    Disputed,
    /// Refunded or charged back.
    Reversed,
    /// A chargeback was won.
    Restored,
    /// No payment-family event seen.
    Unknown,
}

impl PaymentState {
    /// The stable name returned over gRPC.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Failed => "failed",
            Self::Settled => "settled",
            Self::Disputed => "disputed",
            Self::Reversed => "reversed",
            Self::Restored => "restored",
            Self::Unknown => "unknown",
        }
    }
}

/// What to do with a grant while a chargeback is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ChargebackPolicy {
    /// Revoke when the chargeback opens; restore if it is won.
    #[default]
    RevokeOnOpen,
    /// Keep the grant until the chargeback is lost.
    HoldUntilLost,
}

const PROCESSORS: [&str; 3] = ["Card Payment", "PayPal", "Venmo"];
const REFUNDS: [&str; 2] = ["Refund", "Refund Complete"];
const ACH_REVERSALS: [&str; 2] = ["ACH Returned", "ACH Chargeback"];
const FAILED: [&str; 5] = [
    "Card Payment Declined",
    "Card Payment Suspected Fraud",
    "Card Payment Voided",
    "Payment Expiration",
    "ACH Failed",
];
const PENDING: [&str; 4] = [
    "Card Payment Authorized",
    "Payment Pending Review",
    "ACH Initiated",
    "ACH Batched",
];

fn is_chargeback(event_type: &str, outcome: &str) -> bool {
    PROCESSORS.iter().any(|p| {
        event_type
            .strip_prefix(p)
            .and_then(|rest| rest.strip_prefix(" Chargeback "))
            == Some(outcome)
    })
}

/// One dispute of a payment: which of its chargeback events were seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dispute {
    /// Its Opened was seen.
    pub opened: bool,
    /// Its Won was seen.
    pub won: bool,
}

impl Dispute {
    /// Opened and not (yet) won.
    pub fn open(self) -> bool {
        self.opened && !self.won
    }
}

/// What the set of a payment's events says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// A `Settled` was seen.
    pub settled: bool,
    /// A refund (not failed), a lost chargeback or an ACH reversal was seen.
    pub reversed: bool,
    /// Each dispute an Opened or Won was seen for, by `chargebackId` (`""` for chargeback
    /// events without one).
    pub disputes: BTreeMap<String, Dispute>,
    /// The payment failed.
    pub failed: bool,
    /// The payment is in progress.
    pub pending: bool,
}

impl Facts {
    /// Folds one event into the facts: its type, `data.status` for refunds and
    /// `data.chargebackId` for chargebacks.
    pub fn add(
        &mut self,
        event_type: &str,
        refund_status: Option<&str>,
        chargeback_id: Option<&str>,
    ) {
        let t = event_type;
        self.settled |= t == crate::decision::SETTLED;
        self.reversed |= (REFUNDS.contains(&t) && refund_status != Some("Failed"))
            || ACH_REVERSALS.contains(&t)
            || is_chargeback(t, "Lost");
        let (opened, won) = (is_chargeback(t, "Opened"), is_chargeback(t, "Won"));
        if opened || won {
            let dispute = self
                .disputes
                .entry(chargeback_id.unwrap_or_default().to_owned())
                .or_default();
            dispute.opened |= opened;
            dispute.won |= won;
        }
        self.failed |= FAILED.contains(&t);
        self.pending |= PENDING.contains(&t);
    }

    /// The facts of a set of events (type, refund status, chargeback id), in any order,
    /// duplicates allowed.
    pub fn of<'a>(
        events: impl IntoIterator<Item = (&'a str, Option<&'a str>, Option<&'a str>)>,
    ) -> Self {
        let mut facts = Self::default();
        for (t, status, chargeback) in events {
            facts.add(t, status, chargeback);
        }
        facts
    }

    /// Whether any dispute is open.
    pub fn disputed(&self) -> bool {
        self.disputes.values().any(|d| d.open())
    }

    /// The state table above.
    pub fn state(&self) -> PaymentState {
        match () {
            () if self.reversed => PaymentState::Reversed,
            () if !self.disputes.is_empty() && !self.disputed() => PaymentState::Restored,
            () if self.disputed() => PaymentState::Disputed,
            () if self.settled => PaymentState::Settled,
            () if self.failed => PaymentState::Failed,
            () if self.pending => PaymentState::Pending,
            () => PaymentState::Unknown,
        }
    }

    /// Whether the payment's planned grant should stand under `policy`.
    pub fn entitled(&self, policy: ChargebackPolicy) -> bool {
        self.settled
            && !self.reversed
            && !(self.disputed() && policy == ChargebackPolicy::RevokeOnOpen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(set: &[&str]) -> Facts {
        Facts::of(set.iter().map(|t| (*t, None, None)))
    }

    #[test]
    fn the_state_table_in_any_order() {
        use PaymentState::*;
        for (set, want) in [
            (vec!["Card Payment Authorized"], Pending),
            (vec!["Settled", "Card Payment Authorized"], Settled),
            (vec!["Card Payment Authorized", "Settled"], Settled),
            (vec!["Refund", "Settled"], Reversed),
            (vec!["Card Payment Declined"], Failed),
            (vec!["Settled", "Card Payment Chargeback Opened"], Disputed),
            (
                vec![
                    "Card Payment Chargeback Won",
                    "Card Payment Chargeback Opened",
                    "Settled",
                ],
                Restored,
            ),
            (
                vec![
                    "Card Payment Chargeback Opened",
                    "Card Payment Chargeback Lost",
                ],
                Reversed,
            ),
            (vec!["Settled", "PayPal Chargeback Opened"], Disputed),
            (vec!["Settled", "Venmo Chargeback Lost"], Reversed),
            (vec!["Settled", "ACH Returned"], Reversed),
            (vec!["Withdraw Pending"], Unknown),
            (vec![], Unknown),
        ] {
            assert_eq!(facts(&set).state(), want, "{set:?}");
            let reversed: Vec<_> = set.iter().rev().copied().collect();
            assert_eq!(facts(&reversed).state(), want, "{set:?} reversed");
        }
    }

    #[test]
    fn a_failed_refund_reverses_nothing() {
        let f = Facts::of([("Settled", None, None), ("Refund", Some("Failed"), None)]);
        assert_eq!(f.state(), PaymentState::Settled);
        assert!(f.entitled(ChargebackPolicy::RevokeOnOpen));
        let f = Facts::of([("Settled", None, None), ("Refund", Some("Pending"), None)]);
        assert!(!f.entitled(ChargebackPolicy::RevokeOnOpen));
    }

    #[test]
    fn entitlement_follows_the_chargeback_policy() {
        use ChargebackPolicy::*;
        for (set, revoke_on_open, hold_until_lost) in [
            (vec!["Settled"], true, true),
            (vec!["Card Payment Authorized"], false, false),
            (
                vec!["Settled", "Card Payment Chargeback Opened"],
                false,
                true,
            ),
            (
                vec![
                    "Settled",
                    "Card Payment Chargeback Opened",
                    "Card Payment Chargeback Won",
                ],
                true,
                true,
            ),
            (
                vec![
                    "Settled",
                    "Card Payment Chargeback Opened",
                    "Card Payment Chargeback Lost",
                ],
                false,
                false,
            ),
            (vec!["Settled", "Refund"], false, false),
            (vec!["Refund"], false, false),
        ] {
            let f = facts(&set);
            assert_eq!(f.entitled(RevokeOnOpen), revoke_on_open, "{set:?}");
            assert_eq!(f.entitled(HoldUntilLost), hold_until_lost, "{set:?}");
        }
    }

    /// Every order of `items`.
    fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first.clone());
                all.push(tail);
            }
        }
        all
    }

    #[test]
    fn each_chargeback_id_is_its_own_dispute_in_any_order() {
        use ChargebackPolicy::*;
        use PaymentState::*;
        const OPENED: &str = "Card Payment Chargeback Opened";
        const WON: &str = "Card Payment Chargeback Won";
        const LOST: &str = "Card Payment Chargeback Lost";
        let settled = ("Settled", None);
        // (events as (type, chargeback id), state, entitled under revoke-on-open, under
        // hold-until-lost)
        for (set, state, revoke_on_open, hold_until_lost) in [
            // A second dispute opened after the first was won revokes again...
            (
                vec![
                    settled,
                    (OPENED, Some("cb1")),
                    (WON, Some("cb1")),
                    (OPENED, Some("cb2")),
                ],
                Disputed,
                false,
                true,
            ),
            // ...until it is won too.
            (
                vec![
                    settled,
                    (OPENED, Some("cb1")),
                    (WON, Some("cb1")),
                    (OPENED, Some("cb2")),
                    (WON, Some("cb2")),
                ],
                Restored,
                true,
                true,
            ),
            // Winning one dispute does not close another.
            (
                vec![settled, (OPENED, Some("cb1")), (WON, Some("cb2"))],
                Disputed,
                false,
                true,
            ),
            // A Won seen before its Opened: that dispute is not open.
            (vec![settled, (WON, Some("cb1"))], Restored, true, true),
            // Without an id a chargeback is the dispute "", apart from any named one.
            (
                vec![settled, (OPENED, None), (WON, Some("cb1"))],
                Disputed,
                false,
                true,
            ),
            (
                vec![settled, (OPENED, None), (WON, None)],
                Restored,
                true,
                true,
            ),
            // Any lost dispute reverses, whatever the others did.
            (
                vec![
                    settled,
                    (OPENED, Some("cb1")),
                    (WON, Some("cb1")),
                    (LOST, Some("cb2")),
                ],
                Reversed,
                false,
                false,
            ),
            // Duplicates change nothing.
            (
                vec![
                    settled,
                    (OPENED, Some("cb1")),
                    (OPENED, Some("cb1")),
                    (WON, Some("cb1")),
                ],
                Restored,
                true,
                true,
            ),
        ] {
            for order in permutations(&set) {
                let f = Facts::of(order.iter().map(|&(t, id)| (t, None, id)));
                assert_eq!(f.state(), state, "{order:?}");
                assert_eq!(f.entitled(RevokeOnOpen), revoke_on_open, "{order:?}");
                assert_eq!(f.entitled(HoldUntilLost), hold_until_lost, "{order:?}");
            }
        }
    }
}
