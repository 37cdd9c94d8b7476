//! What one event asks of the ledger, decided purely from the event and the catalog.
//! The store then applies it atomically, enforcing at most one grant per payment.

use coinflow_shared::convert::struct_str;
use coinflow_shared::proto::v1::WebhookEvent;

use crate::catalog::{Catalog, Grant};

/// The only event type that grants.
pub const SETTLED: &str = "Settled";

/// Why a Settled payment was held instead of granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldReason {
    /// No `data.id`: the payment cannot be granted at most once.
    MissingPaymentId,
    /// No `webhookInfo` object.
    MissingWebhookInfo,
    /// `webhookInfo` is deeper or larger than the edge converts.
    MalformedWebhookInfo,
    /// `webhookInfo` names no catalog entry.
    UnknownItem,
    /// Neither `data.wallet` nor `data.rawCustomerId` to grant to.
    MissingPayer,
    /// No readable `subtotal`: missing, `cents` not an integer, or `currency` present but
    /// not a string.
    MissingSubtotal,
    /// `subtotal.currency` is present and is not the catalog's.
    CurrencyMismatch,
    /// `subtotal` is below the catalog price.
    Underpaid,
    /// The authenticated body is not a v2 envelope (any event type): recorded as it came.
    Unparseable,
}

impl HeldReason {
    /// The stable name stored, returned over gRPC and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingPaymentId => "missing_payment_id",
            Self::MissingWebhookInfo => "missing_webhook_info",
            Self::MalformedWebhookInfo => "malformed_webhook_info",
            Self::UnknownItem => "unknown_item",
            Self::MissingPayer => "missing_payer",
            Self::MissingSubtotal => "missing_subtotal",
            Self::CurrencyMismatch => "currency_mismatch",
            Self::Underpaid => "underpaid",
            Self::Unparseable => "unparseable",
        }
    }
}

/// What to do with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Record it; no ledger effect.
    Record,
    /// Record it as held, granting nothing.
    Hold(HeldReason),
    /// Record it and grant, unless this payment was already granted.
    Grant(GrantPlan),
}

/// The grant a Settled payment earns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantPlan {
    /// The business key.
    pub payment_id: String,
    /// The payer.
    pub wallet: String,
    /// The merchant's user id, when sent.
    pub raw_customer_id: Option<String>,
    /// The catalog entry.
    pub item: String,
    /// The catalog version that priced it.
    pub catalog_version: String,
    /// What is granted.
    pub grants: Vec<Grant>,
}

/// Decides what `event` asks for under `catalog`.
pub fn decide(event: &WebhookEvent, catalog: &Catalog) -> Decision {
    if event.unparseable.is_some() {
        return Decision::Hold(HeldReason::Unparseable);
    }
    if event.event_type != SETTLED {
        return Decision::Record;
    }
    match plan_grant(event, catalog) {
        Ok(plan) => Decision::Grant(plan),
        Err(reason) => Decision::Hold(reason),
    }
}

fn plan_grant(event: &WebhookEvent, catalog: &Catalog) -> Result<GrantPlan, HeldReason> {
    let payment_id = event
        .payment_id
        .clone()
        .ok_or(HeldReason::MissingPaymentId)?;
    if event.webhook_info_over_limit {
        return Err(HeldReason::MalformedWebhookInfo);
    }
    let info = event
        .webhook_info
        .as_ref()
        .ok_or(HeldReason::MissingWebhookInfo)?;
    let name = struct_str(info, &catalog.item_key).ok_or(HeldReason::UnknownItem)?;
    let item = catalog.items.get(name).ok_or(HeldReason::UnknownItem)?;
    let wallet = payer_of(event).ok_or(HeldReason::MissingPayer)?;
    let paid = event.subtotal.as_ref().ok_or(HeldReason::MissingSubtotal)?;
    if let Some(currency) = &paid.currency
        && !currency.eq_ignore_ascii_case(&item.price.currency)
    {
        return Err(HeldReason::CurrencyMismatch);
    }
    if paid.cents < item.price.cents {
        return Err(HeldReason::Underpaid);
    }
    Ok(GrantPlan {
        payment_id,
        wallet,
        raw_customer_id: event.raw_customer_id.clone(),
        item: name.to_owned(),
        catalog_version: catalog.version.clone(),
        grants: item.grants.clone(),
    })
}

/// The plan's `wallet`: `data.wallet`, or empty for a payer named only by
/// `rawCustomerId` (Version 3 webhooks carry no wallet). `None` when neither is sent.
fn payer_of(event: &WebhookEvent) -> Option<String> {
    match (&event.wallet, &event.raw_customer_id) {
        (Some(wallet), _) => Some(wallet.clone()),
        (None, Some(_)) => Some(String::new()),
        (None, None) => None,
    }
}

/// The plan an operator's approval grants for a held `event`: "as if it had matched",
/// so price and currency are not checked. `item` overrides the entry `webhookInfo` names.
/// The error says what to fix.
pub fn approval_plan(
    event: &WebhookEvent,
    catalog: &Catalog,
    item: Option<&str>,
) -> Result<GrantPlan, String> {
    if event.unparseable.is_some() {
        return Err(
            "the held event's body is not a Coinflow envelope, so it names nothing to \
                    grant: reject it, or wait for Coinflow's well-formed delivery"
                .to_owned(),
        );
    }
    let payment_id = event
        .payment_id
        .clone()
        .ok_or("the held event has no payment id")?;
    let named = event
        .webhook_info
        .as_ref()
        .and_then(|i| struct_str(i, &catalog.item_key));
    let name = item.or(named).ok_or(
        "the held event's webhookInfo names no item: pass approve.item with a catalog entry",
    )?;
    let entry = catalog.items.get(name).ok_or_else(|| {
        format!("item {name:?} is not in the catalog (version {}): pass approve.item with a catalog entry", catalog.version)
    })?;
    let wallet =
        payer_of(event).ok_or("the held event names no wallet or rawCustomerId to grant to")?;
    Ok(GrantPlan {
        payment_id,
        wallet,
        raw_customer_id: event.raw_customer_id.clone(),
        item: name.to_owned(),
        catalog_version: catalog.version.clone(),
        grants: entry.grants.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;
    use coinflow_shared::convert::to_proto;
    use coinflow_shared::envelope::Envelope;

    use super::*;

    fn catalog() -> Catalog {
        Catalog::parse(
            r#"item_key = "item"
               version = "v7"
               [items.sword]
               price = { cents = 500, currency = "USD" }
               grants = [{ sku = "sword", quantity = 1 }]"#,
            "test",
        )
        .unwrap()
    }

    fn event(data: &str) -> WebhookEvent {
        let body = format!(
            r#"{{"eventType":"Settled","category":"Purchase","created":"c","data":{data}}}"#
        );
        let env = Envelope::parse(body.as_bytes()).unwrap();
        to_proto(env, Bytes::from(body), SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn a_covered_settled_payment_is_granted() {
        let d = decide(
            &event(
                r#"{"id":"p","wallet":"w","rawCustomerId":"u","webhookInfo":{"item":"sword"},"subtotal":{"cents":500,"currency":"USD"}}"#,
            ),
            &catalog(),
        );
        let Decision::Grant(plan) = d else {
            panic!("{d:?}")
        };
        assert_eq!(plan.payment_id, "p");
        assert_eq!(plan.raw_customer_id.as_deref(), Some("u"));
        assert_eq!(plan.catalog_version, "v7");
        assert_eq!(
            plan.grants,
            [Grant {
                sku: "sword".into(),
                quantity: 1
            }]
        );
    }

    #[test]
    fn missing_currency_is_accepted_when_the_amount_covers_the_price() {
        let d = decide(
            &event(
                r#"{"id":"p","wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":600}}"#,
            ),
            &catalog(),
        );
        assert!(matches!(d, Decision::Grant(_)), "{d:?}");
    }

    #[test]
    fn anything_that_does_not_match_is_held() {
        for (data, reason) in [
            (
                r#"{"wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":500}}"#,
                HeldReason::MissingPaymentId,
            ),
            (
                r#"{"id":"p","wallet":"w","subtotal":{"cents":500}}"#,
                HeldReason::MissingWebhookInfo,
            ),
            (
                r#"{"id":"p","wallet":"w","webhookInfo":{"item":"axe"},"subtotal":{"cents":500}}"#,
                HeldReason::UnknownItem,
            ),
            (
                r#"{"id":"p","wallet":"w","webhookInfo":{"item":5},"subtotal":{"cents":500}}"#,
                HeldReason::UnknownItem,
            ),
            (
                r#"{"id":"p","wallet":"w","webhookInfo":{"sku":"sword"},"subtotal":{"cents":500}}"#,
                HeldReason::UnknownItem,
            ),
            (
                r#"{"id":"p","webhookInfo":{"item":"sword"},"subtotal":{"cents":500}}"#,
                HeldReason::MissingPayer,
            ),
            (
                r#"{"id":"p","wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":"500"}}"#,
                HeldReason::MissingSubtotal,
            ),
            (
                r#"{"id":"p","wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":500,"currency":392}}"#,
                HeldReason::MissingSubtotal,
            ),
            (
                r#"{"id":"p","wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":500,"currency":null}}"#,
                HeldReason::MissingSubtotal,
            ),
            (
                r#"{"id":"p","wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":500,"currency":{"code":"USD"}}}"#,
                HeldReason::MissingSubtotal,
            ),
            (
                &format!(
                    r#"{{"id":"p","wallet":"w","webhookInfo":{{"item":"sword","n":{}0{}}},"subtotal":{{"cents":500}}}}"#,
                    "[".repeat(40),
                    "]".repeat(40)
                ),
                HeldReason::MalformedWebhookInfo,
            ),
            (
                r#"{"id":"p","wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":500,"currency":"EUR"}}"#,
                HeldReason::CurrencyMismatch,
            ),
            (
                r#"{"id":"p","wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":100,"currency":"USD"}}"#,
                HeldReason::Underpaid,
            ),
        ] {
            assert_eq!(
                decide(&event(data), &catalog()),
                Decision::Hold(reason),
                "{data}"
            );
        }
    }

    #[test]
    fn approval_grants_the_named_or_overridden_item_whatever_was_paid() {
        let underpaid = event(
            r#"{"id":"p","wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":1}}"#,
        );
        let plan = approval_plan(&underpaid, &catalog(), None).unwrap();
        assert_eq!((plan.item.as_str(), plan.grants.len()), ("sword", 1));
        let unknown = event(r#"{"id":"p","wallet":"w","webhookInfo":{"item":"axe"}}"#);
        let err = approval_plan(&unknown, &catalog(), None).unwrap_err();
        assert!(err.contains("\"axe\" is not in the catalog"), "{err}");
        assert_eq!(
            approval_plan(&unknown, &catalog(), Some("sword"))
                .unwrap()
                .item,
            "sword"
        );
        let no_payer = event(r#"{"id":"p","webhookInfo":{"item":"sword"}}"#);
        assert!(
            approval_plan(&no_payer, &catalog(), None)
                .unwrap_err()
                .contains("wallet")
        );
        let v3 = event(r#"{"id":"p","rawCustomerId":"u","webhookInfo":{"item":"sword"}}"#);
        let plan = approval_plan(&v3, &catalog(), None).unwrap();
        assert_eq!(
            (plan.wallet.as_str(), plan.raw_customer_id.as_deref()),
            ("", Some("u"))
        );
    }

    #[test]
    fn a_version_3_settled_without_a_wallet_is_granted_to_its_customer_id() {
        let d = decide(
            &event(
                r#"{"id":"p","customerId":"c9","rawCustomerId":"u","webhookInfo":{"item":"sword"},"subtotal":{"cents":500,"currency":"USD"}}"#,
            ),
            &catalog(),
        );
        let Decision::Grant(plan) = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            (plan.wallet.as_str(), plan.raw_customer_id.as_deref()),
            ("", Some("u"))
        );
    }

    #[test]
    fn a_body_that_is_not_an_envelope_is_held_whatever_it_says() {
        let ev = coinflow_shared::convert::unparseable(
            Bytes::from_static(b"{\"eventType\":\"Settled\""),
            "malformed JSON".into(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            decide(&ev, &catalog()),
            Decision::Hold(HeldReason::Unparseable)
        );
        assert!(approval_plan(&ev, &catalog(), Some("sword")).is_err());
    }

    #[test]
    fn other_event_types_only_record() {
        let mut ev = event(
            r#"{"id":"p","wallet":"w","webhookInfo":{"item":"sword"},"subtotal":{"cents":500}}"#,
        );
        ev.event_type = "Card Payment Authorized".into();
        assert_eq!(decide(&ev, &catalog()), Decision::Record);
    }
}
