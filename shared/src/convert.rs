//! The conversion from a parsed envelope and its raw bytes to the protobuf
//! [`WebhookEvent`] that the edge hands to ingest.

use std::str::FromStr;
use std::time::SystemTime;

use bytes::Bytes;
use prost_types::{ListValue, Struct, Timestamp, Value as PValue, value::Kind};
use serde_json::{Map, Value};

use crate::envelope::{Envelope, Money, money_in};
use crate::identity::event_key;
use crate::proto::v1::{Money as PMoney, RefundTotals, WebhookEvent};

/// Builds the event that carries everything Coinflow sent, raw bytes included.
pub fn to_proto(envelope: Envelope, raw_body: Bytes, received_at: SystemTime) -> WebhookEvent {
    let event_key = event_key(&envelope, &raw_body);
    let data = &envelope.data;
    let refund_status = envelope
        .event_type
        .starts_with("Refund")
        .then(|| data.str("status").map(str::to_owned))
        .flatten();
    let refund_totals = data.object("totals").map(|totals| RefundTotals {
        subtotal: money_in(totals, "subtotal").map(money),
        processor_fees: money_in(totals, "processorFees").map(money),
        total: money_in(totals, "total").map(money),
    });
    WebhookEvent {
        event_key,
        created: Timestamp::from_str(&envelope.created).ok(),
        payment_id: data.payment_id(),
        merchant_id: data.str("merchantId").map(str::to_owned),
        wallet: data.str("wallet").map(str::to_owned),
        customer_id: data.str("customerId").map(str::to_owned),
        raw_customer_id: data.str("rawCustomerId").map(str::to_owned),
        webhook_info: data.object("webhookInfo").map(to_struct),
        subtotal: data.money("subtotal").map(money),
        fees: data.money("fees").map(money),
        chargeback_protection_fees: data.money("chargebackProtectionFees").map(money),
        gas_fees: data.money("gasFees").map(money),
        fx_fees: data.money("fxFees").map(money),
        total: data.money("total").map(money),
        refund_totals,
        chargeback_id: data.str("chargebackId").map(str::to_owned),
        refund_status,
        received_at: Some(Timestamp::from(received_at)),
        raw_body,
        event_type: envelope.event_type,
        category: envelope.category,
        created_raw: envelope.created,
    }
}

fn money(m: Money) -> PMoney {
    PMoney {
        cents: m.cents,
        currency: m.currency,
    }
}

/// A JSON object as a `google.protobuf.Struct`. Numbers become doubles, as the Struct
/// type defines; the raw body keeps the exact text.
pub fn to_struct(map: &Map<String, Value>) -> Struct {
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(v: &Value) -> PValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    PValue { kind: Some(kind) }
}

/// A string field of a `Struct`, if present and a string.
pub fn struct_str<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(v) => Some(v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(body: &'static [u8]) -> WebhookEvent {
        let env = Envelope::parse(body).unwrap();
        to_proto(env, Bytes::from_static(body), SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn settled_card_payment() {
        let body = include_bytes!("../../fixtures/settled-sword.json");
        let ev = convert(body);
        assert_eq!(ev.event_type, "Settled");
        assert_eq!(
            ev.payment_id.as_deref(),
            Some("51e5ac49-d3ad-412c-afdb-acb1a5b50b3d")
        );
        assert_eq!(ev.raw_customer_id.as_deref(), Some("user-123"));
        assert_eq!(ev.wallet.as_deref(), Some("mygameʬuser-123"));
        assert_eq!(
            struct_str(ev.webhook_info.as_ref().unwrap(), "item"),
            Some("sword")
        );
        assert_eq!(
            ev.subtotal,
            Some(PMoney {
                cents: 500,
                currency: Some("USD".into())
            })
        );
        assert_eq!(ev.total.as_ref().map(|m| m.cents), Some(535));
        assert_eq!(ev.created.unwrap().seconds, 1_795_194_365);
        assert_eq!(ev.created_raw, "2026-11-20T17:06:05.177Z");
        assert_eq!(&ev.raw_body[..], &body[..]);
    }

    #[test]
    fn stablecoin_settlement_without_currency() {
        let ev = convert(include_bytes!(
            "../../fixtures/settled-credits-no-currency.json"
        ));
        assert_eq!(
            ev.subtotal,
            Some(PMoney {
                cents: 1000,
                currency: None
            })
        );
        assert_eq!(ev.raw_customer_id, None);
    }

    #[test]
    fn refund_uses_payment_id_and_totals() {
        let ev = convert(include_bytes!("../../fixtures/refund.json"));
        assert_eq!(
            ev.payment_id.as_deref(),
            Some("51e5ac49-d3ad-412c-afdb-acb1a5b50b3d")
        );
        let totals = ev.refund_totals.unwrap();
        assert_eq!(totals.subtotal.unwrap().cents, 500);
        assert_eq!(totals.total.unwrap().cents, 515);
        assert_eq!(ev.refund_status.as_deref(), Some("Pending"));
    }

    #[test]
    fn unrelated_family_is_carried_through() {
        let ev = convert(include_bytes!("../../fixtures/withdraw-pending.json"));
        assert_eq!(ev.category, "Withdraw");
        assert_eq!(ev.payment_id, None);
        assert!(ev.event_key.starts_with("b1:"));
    }

    #[test]
    fn unparseable_created_is_kept_raw() {
        let ev = convert(br#"{"eventType":"Settled","category":"Purchase","created":"yesterday","data":{"id":"p"}}"#);
        assert_eq!(ev.created, None);
        assert_eq!(ev.created_raw, "yesterday");
    }
}
