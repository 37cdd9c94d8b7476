//! A payment's state, derived from the *set* of event types seen for it, never from the
//! order they arrived in. This is the one place the state table lives.
//!
//! | state    | when the set contains                                            |
//! |----------|------------------------------------------------------------------|
//! | reversed | a refund, a lost chargeback, or an ACH return / chargeback      |
//! | restored | Chargeback Opened and Chargeback Won (and no reversal)           |
//! | disputed | Chargeback Opened (and none of the above)                        |
//! | settled  | Settled (and none of the above)                                  |
//! | failed   | Declined, Suspected Fraud, Voided, Expiration or ACH Failed      |
//! | pending  | Authorized, Pending Review, ACH Initiated or ACH Batched         |
//! | unknown  | none of these (e.g. only event types of other families)          |
//!
//! Rows are checked top to bottom, so a late `Card Payment Authorized` never moves a
//! settled payment back, and a `Refund` seen before its `Settled` still reads reversed.

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

const REVERSED: &[&str] = &[
    "Refund",
    "Refund Complete",
    "Card Payment Chargeback Lost",
    "ACH Returned",
    "ACH Chargeback",
    "PayPal Chargeback Lost",
    "Venmo Chargeback Lost",
];
const OPENED: &[&str] = &[
    "Card Payment Chargeback Opened",
    "PayPal Chargeback Opened",
    "Venmo Chargeback Opened",
];
const WON: &[&str] = &[
    "Card Payment Chargeback Won",
    "PayPal Chargeback Won",
    "Venmo Chargeback Won",
];
const FAILED: &[&str] = &[
    "Card Payment Declined",
    "Card Payment Suspected Fraud",
    "Card Payment Voided",
    "Payment Expiration",
    "ACH Failed",
];
const PENDING: &[&str] = &[
    "Card Payment Authorized",
    "Payment Pending Review",
    "ACH Initiated",
    "ACH Batched",
];

/// Derives the state from the event types seen, in any order, duplicates allowed.
pub fn state<'a>(event_types: impl IntoIterator<Item = &'a str>) -> PaymentState {
    let (mut reversed, mut opened, mut won, mut settled, mut failed, mut pending) =
        (false, false, false, false, false, false);
    for t in event_types {
        reversed |= REVERSED.contains(&t);
        opened |= OPENED.contains(&t);
        won |= WON.contains(&t);
        settled |= t == crate::decision::SETTLED;
        failed |= FAILED.contains(&t);
        pending |= PENDING.contains(&t);
    }
    match () {
        () if reversed => PaymentState::Reversed,
        () if opened && won => PaymentState::Restored,
        () if opened => PaymentState::Disputed,
        () if settled => PaymentState::Settled,
        () if failed => PaymentState::Failed,
        () if pending => PaymentState::Pending,
        () => PaymentState::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_in_any_order() {
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
            (vec!["Withdraw Pending"], Unknown),
            (vec![], Unknown),
        ] {
            assert_eq!(state(set.iter().copied()), want, "{set:?}");
            assert_eq!(state(set.iter().rev().copied()), want, "{set:?} reversed");
        }
    }
}
