//! A payment's state, and whether its grant should stand, derived from the *set* of
//! events seen for it, never from the order they arrived in. This is the one place the
//! state table lives.
//!
//! | state    | when the set contains (rows checked top to bottom)                      |
//! |----------|--------------------------------------------------------------------------|
//! | reversed | a refund (not `Failed`), a lost chargeback, ACH Returned, ACH Chargeback |
//! | restored | a chargeback Won (after Opened, in whatever order they arrived)          |
//! | disputed | a chargeback Opened                                                      |
//! | settled  | Settled                                                                  |
//! | failed   | Declined, Suspected Fraud, Voided, Payment Expiration, ACH Failed        |
//! | pending  | Authorized, Pending Review, ACH Initiated, ACH Batched                   |
//! | unknown  | none of these (e.g. only event types of other families)                  |
//!
//! So a late `Card Payment Authorized` never moves a settled payment back, and a `Refund`
//! seen before its `Settled` still reads reversed. Chargeback events exist for cards,
//! PayPal and Venmo with the same Opened / Won / Lost names.
//!
//! Whether the payment's planned grant stands ([`Facts::entitled`]):
//! settled, and not reversed, and not disputed under [`ChargebackPolicy::RevokeOnOpen`].

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

/// What the set of a payment's events says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// A `Settled` was seen.
    pub settled: bool,
    /// A refund (not failed), a lost chargeback or an ACH reversal was seen.
    pub reversed: bool,
    /// A chargeback was opened.
    pub opened: bool,
    /// A chargeback was won.
    pub won: bool,
    /// The payment failed.
    pub failed: bool,
    /// The payment is in progress.
    pub pending: bool,
}

impl Facts {
    /// Folds one event (its type, and `data.status` for refunds) into the facts.
    pub fn add(&mut self, event_type: &str, refund_status: Option<&str>) {
        let t = event_type;
        self.settled |= t == crate::decision::SETTLED;
        self.reversed |= (REFUNDS.contains(&t) && refund_status != Some("Failed"))
            || ACH_REVERSALS.contains(&t)
            || is_chargeback(t, "Lost");
        self.opened |= is_chargeback(t, "Opened");
        self.won |= is_chargeback(t, "Won");
        self.failed |= FAILED.contains(&t);
        self.pending |= PENDING.contains(&t);
    }

    /// The facts of a set of events, in any order, duplicates allowed.
    pub fn of<'a>(events: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Self {
        let mut facts = Self::default();
        for (t, status) in events {
            facts.add(t, status);
        }
        facts
    }

    /// The state table above.
    pub fn state(&self) -> PaymentState {
        match () {
            () if self.reversed => PaymentState::Reversed,
            () if self.won => PaymentState::Restored,
            () if self.opened => PaymentState::Disputed,
            () if self.settled => PaymentState::Settled,
            () if self.failed => PaymentState::Failed,
            () if self.pending => PaymentState::Pending,
            () => PaymentState::Unknown,
        }
    }

    /// Whether the payment's planned grant should stand under `policy`.
    pub fn entitled(&self, policy: ChargebackPolicy) -> bool {
        let disputed = self.opened && !self.won;
        self.settled && !self.reversed && !(disputed && policy == ChargebackPolicy::RevokeOnOpen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(set: &[&str]) -> Facts {
        Facts::of(set.iter().map(|t| (*t, None)))
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
        let f = Facts::of([("Settled", None), ("Refund", Some("Failed"))]);
        assert_eq!(f.state(), PaymentState::Settled);
        assert!(f.entitled(ChargebackPolicy::RevokeOnOpen));
        let f = Facts::of([("Settled", None), ("Refund", Some("Pending"))]);
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
}
