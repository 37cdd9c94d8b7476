//! The conversion from a parsed envelope and its raw bytes to the protobuf
//! [`WebhookEvent`] that the edge hands to ingest, and of a body that is not an envelope
//! ([`unparseable`]).
//!
//! What is converted is bounded ([`WEBHOOK_INFO_LIMITS`]): protobuf decoders refuse
//! messages nested past a recursion limit (prost's is 100), and a `DeliverBatch` call has a
//! size limit, so an event whose bytes could never be decoded would be refused on every
//! retry until Coinflow gave up. The raw body always travels whole.

use std::str::FromStr;
use std::time::SystemTime;

use bytes::Bytes;
use prost_types::{ListValue, Struct, Timestamp, Value as PValue, value::Kind};
use serde_json::{Map, Value};

use crate::envelope::{Envelope, Money, money_in};
use crate::identity::{body_key, event_key};
use crate::proto::v1::{Money as PMoney, RefundTotals, WebhookEvent};

/// How deep and how large a `webhookInfo` the edge converts to a `Struct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Nesting of objects and arrays, the `webhookInfo` object itself being depth 1. Each
    /// JSON level is two protobuf messages (`Value` and `Struct`/`ListValue`).
    pub max_depth: usize,
    /// The converted size: key and string bytes plus 8 per value.
    pub max_bytes: usize,
}

/// The documented limits: a real `webhookInfo` is a few keys (`{"item":"sword"}`); these
/// are far above that and far below what a decoder or a call refuses.
pub const WEBHOOK_INFO_LIMITS: Limits = Limits {
    max_depth: 16,
    max_bytes: 16 * 1024,
};

/// The longest identifier or name (`eventType`, `category`, `created`, the ids, the payer
/// fields) carried as a field. Both backends store and index them as text, and PostgreSQL
/// refuses an index entry over about 2.7 KB and any text holding U+0000, on every retry;
/// a body with such a field is carried as [`unparseable`] instead (real ids are under 100
/// bytes).
pub const MAX_FIELD_BYTES: usize = 512;

/// Whether a text field can be stored by every backend.
pub fn storable(field: &str) -> bool {
    field.len() <= MAX_FIELD_BYTES && !field.contains('\0')
}

/// Builds the event that carries everything Coinflow sent, raw bytes included. An
/// envelope with a field no backend can store ([`storable`]) becomes [`unparseable`].
pub fn to_proto(envelope: Envelope, raw_body: Bytes, received_at: SystemTime) -> WebhookEvent {
    let event = convert(envelope, raw_body, received_at);
    match unstorable_field(&event) {
        None => event,
        Some(name) => unparseable(
            event.raw_body,
            format!("{name} is longer than {MAX_FIELD_BYTES} bytes or contains U+0000"),
            received_at,
        ),
    }
}

/// The first text field of `event` that [`storable`] refuses.
fn unstorable_field(event: &WebhookEvent) -> Option<&'static str> {
    let required = [
        ("eventType", &event.event_type),
        ("category", &event.category),
        ("created", &event.created_raw),
    ];
    let optional = [
        ("data.id/paymentId", &event.payment_id),
        ("data.merchantId", &event.merchant_id),
        ("data.wallet", &event.wallet),
        ("data.customerId", &event.customer_id),
        ("data.rawCustomerId", &event.raw_customer_id),
        ("data.chargebackId", &event.chargeback_id),
        ("data.status", &event.refund_status),
    ];
    let bad_required = required.into_iter().find(|(_, v)| !storable(v));
    let bad_optional = || {
        optional
            .into_iter()
            .find(|(_, v)| v.as_deref().is_some_and(|v| !storable(v)))
    };
    bad_required
        .map(|(name, _)| name)
        .or_else(|| bad_optional().map(|(name, _)| name))
}

fn convert(envelope: Envelope, raw_body: Bytes, received_at: SystemTime) -> WebhookEvent {
    let event_key = event_key(&envelope, &raw_body);
    let payment_id = envelope.payment_id();
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
    let info = data.object("webhookInfo");
    let info_fits = info.is_none_or(|i| fits(i, WEBHOOK_INFO_LIMITS));
    WebhookEvent {
        event_key,
        created: Timestamp::from_str(&envelope.created).ok(),
        payment_id,
        merchant_id: data.str("merchantId").map(str::to_owned),
        wallet: data.str("wallet").map(str::to_owned),
        customer_id: data.str("customerId").map(str::to_owned),
        raw_customer_id: data.str("rawCustomerId").map(str::to_owned),
        webhook_info: info.filter(|_| info_fits).map(to_struct),
        webhook_info_over_limit: !info_fits,
        subtotal: data.money("subtotal").map(money),
        fees: data.money("fees").map(money),
        chargeback_protection_fees: data.money("chargebackProtectionFees").map(money),
        gas_fees: data.money("gasFees").map(money),
        fx_fees: data.money("fxFees").map(money),
        total: data.money("total").map(money),
        refund_totals,
        chargeback_id: data.str("chargebackId").map(str::to_owned),
        refund_status,
        unparseable: None,
        recovered: false,
        received_at: Some(Timestamp::from(received_at)),
        raw_body,
        event_type: envelope.event_type,
        category: envelope.category,
        created_raw: envelope.created,
    }
}

/// The most of a parse error kept as an event's `unparseable` reason: serde's messages
/// can quote the body.
pub const MAX_REASON_BYTES: usize = 256;

/// The event of an authenticated body, the one way both the edge and `recover` build it:
/// converted when it is a v2 envelope, else [`unparseable`], carrying the body and why.
pub fn from_body(body: Bytes, received_at: SystemTime) -> WebhookEvent {
    match Envelope::parse(&body) {
        Ok(envelope) => to_proto(envelope, body, received_at),
        Err(e) => unparseable(body, truncate(e.to_string(), MAX_REASON_BYTES), received_at),
    }
}

/// `s` cut to at most `max` bytes, on a character boundary, marked when cut.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The event for an authenticated body that is not a v2 envelope: identified by its
/// bytes, carrying them whole, with `why` and, when the body still yields one, the
/// payment it names ([`best_effort_payment_id`]).
pub fn unparseable(raw_body: Bytes, why: String, received_at: SystemTime) -> WebhookEvent {
    WebhookEvent {
        event_key: body_key(&raw_body),
        payment_id: best_effort_payment_id(&raw_body),
        unparseable: Some(why),
        received_at: Some(Timestamp::from(received_at)),
        raw_body,
        ..WebhookEvent::default()
    }
}

/// The payment a body that is not a valid envelope names, if a plain JSON reading finds
/// one (`data.id`, or `data.paymentId`, when [`storable`]; with a repeated key, the last
/// copy). Only for
/// filing such an event under its payment for a person to look at: it never grants.
pub fn best_effort_payment_id(raw_body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(raw_body).ok()?;
    let data = value.get("data")?.as_object()?;
    ["id", "paymentId"]
        .iter()
        .find_map(|key| match data.get(*key)? {
            Value::String(s) if !s.is_empty() && storable(s) => Some(s.clone()),
            Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            _ => None,
        })
}

/// Whether `map` is within `limits`.
pub fn fits(map: &Map<String, Value>, limits: Limits) -> bool {
    let mut budget = limits.max_bytes;
    fits_map(map, 1, limits.max_depth, &mut budget)
}

fn fits_map(map: &Map<String, Value>, depth: usize, max_depth: usize, budget: &mut usize) -> bool {
    depth <= max_depth
        && map
            .iter()
            .all(|(k, v)| spend(budget, k.len()) && fits_value(v, depth, max_depth, budget))
}

fn fits_value(v: &Value, depth: usize, max_depth: usize, budget: &mut usize) -> bool {
    spend(budget, 8)
        && match v {
            Value::String(s) => spend(budget, s.len()),
            Value::Array(a) => {
                depth < max_depth
                    && a.iter()
                        .all(|v| fits_value(v, depth + 1, max_depth, budget))
            }
            Value::Object(o) => fits_map(o, depth + 1, max_depth, budget),
            Value::Null | Value::Bool(_) | Value::Number(_) => true,
        }
}

fn spend(budget: &mut usize, n: usize) -> bool {
    match budget.checked_sub(n) {
        Some(left) => {
            *budget = left;
            true
        }
        None => false,
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
    fn webhook_info_past_the_limits_is_not_converted() {
        let deep = format!(
            r#"{{"eventType":"Settled","category":"Purchase","created":"c","data":{{"id":"p","webhookInfo":{{"item":{}1{}}}}}}}"#,
            "[".repeat(60),
            "]".repeat(60)
        );
        let ev = to_proto(
            Envelope::parse(deep.as_bytes()).unwrap(),
            Bytes::from(deep),
            SystemTime::UNIX_EPOCH,
        );
        assert!(ev.webhook_info.is_none() && ev.webhook_info_over_limit);
        let big = format!(
            r#"{{"eventType":"Settled","category":"Purchase","created":"c","data":{{"id":"p","webhookInfo":{{"item":"sword","pad":"{}"}}}}}}"#,
            "x".repeat(200 * 1024)
        );
        let ev = to_proto(
            Envelope::parse(big.as_bytes()).unwrap(),
            Bytes::from(big),
            SystemTime::UNIX_EPOCH,
        );
        assert!(ev.webhook_info.is_none() && ev.webhook_info_over_limit);
        let ok = convert(include_bytes!("../../fixtures/settled-sword.json"));
        assert!(ok.webhook_info.is_some() && !ok.webhook_info_over_limit);
    }

    #[test]
    fn the_limits_are_exact() {
        let limits = Limits {
            max_depth: 2,
            max_bytes: 1000,
        };
        let map = |json: &str| -> Map<String, Value> { serde_json::from_str(json).unwrap() };
        assert!(fits(&map(r#"{"a":{"b":1}}"#), limits));
        assert!(fits(&map(r#"{"a":[1]}"#), limits));
        assert!(!fits(&map(r#"{"a":{"b":{}}}"#), limits));
        assert!(!fits(&map(r#"{"a":[[1]]}"#), limits));
        let tight = Limits {
            max_depth: 4,
            max_bytes: 1 + 8 + 3,
        };
        assert!(fits(&map(r#"{"a":"xyz"}"#), tight));
        assert!(!fits(&map(r#"{"a":"xyzw"}"#), tight));
    }

    #[test]
    fn a_body_that_is_not_an_envelope_keeps_its_bytes_and_names_its_payment_if_it_can() {
        let body = br#"{"eventType":"Settled","category":"Purchase","created":"c","data":{"id":"p1","id":"p1"}}"#;
        let ev = unparseable(
            Bytes::from_static(body),
            "duplicate key".into(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(ev.event_key, body_key(body));
        assert_eq!(ev.payment_id.as_deref(), Some("p1"));
        assert_eq!(ev.event_type, "");
        assert_eq!(&ev.raw_body[..], &body[..]);
        assert_eq!(
            unparseable(
                Bytes::from_static(b"{not json"),
                "x".into(),
                SystemTime::UNIX_EPOCH
            )
            .payment_id,
            None
        );
    }

    #[test]
    fn a_field_no_backend_can_store_makes_the_body_unparseable() {
        let long = "p".repeat(MAX_FIELD_BYTES + 1);
        for data in [
            format!(r#"{{"id":"{long}","wallet":"w"}}"#),
            r#"{"id":"p","wallet":"w\u0000x"}"#.to_owned(),
            r#"{"id":"p","chargebackId":"\u0000"}"#.to_owned(),
        ] {
            let body = format!(
                r#"{{"eventType":"Settled","category":"Purchase","created":"c","data":{data}}}"#
            );
            let ev = to_proto(
                Envelope::parse(body.as_bytes()).unwrap(),
                Bytes::from(body.clone()),
                SystemTime::UNIX_EPOCH,
            );
            assert!(ev.unparseable.is_some(), "{data}");
            assert_eq!(ev.event_key, body_key(body.as_bytes()));
            assert!(ev.payment_id.as_deref().is_none_or(storable), "{data}");
            assert_eq!(&ev.raw_body[..], body.as_bytes());
        }
        let at_the_limit = format!(
            r#"{{"eventType":"Settled","category":"Purchase","created":"c","data":{{"id":"{}"}}}}"#,
            "p".repeat(MAX_FIELD_BYTES)
        );
        assert!(
            to_proto(
                Envelope::parse(at_the_limit.as_bytes()).unwrap(),
                Bytes::from(at_the_limit),
                SystemTime::UNIX_EPOCH
            )
            .unparseable
            .is_none()
        );
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("short".into(), 8), "short");
        assert_eq!(truncate("abcdefgh".into(), 4), "abcd…");
        assert_eq!(truncate("aé".into(), 2), "a…");
    }

    #[test]
    fn a_body_is_converted_or_carried_as_unparseable() {
        let now = SystemTime::UNIX_EPOCH;
        let event = from_body(
            Bytes::from_static(br#"{"eventType":"Settled","eventType":"x"}"#),
            now,
        );
        assert!(event.unparseable.as_deref().unwrap().contains("duplicate"));
        assert!(event.event_type.is_empty() && event.event_key.starts_with("b1:"));
        let long = format!(
            r#"{{"eventType":"S","category":"P","created":"c","data":"{}"}}"#,
            "x".repeat(10_000)
        );
        let event = from_body(Bytes::from(long), now);
        assert!(event.unparseable.unwrap().len() <= MAX_REASON_BYTES + '…'.len_utf8());
        let event = from_body(
            Bytes::from_static(include_bytes!("../../fixtures/settled-sword.json")),
            now,
        );
        assert_eq!(event.unparseable, None);
        assert_eq!(event.event_type, "Settled");
    }

    #[test]
    fn unparseable_created_is_kept_raw() {
        let ev = convert(br#"{"eventType":"Settled","category":"Purchase","created":"yesterday","data":{"id":"p"}}"#);
        assert_eq!(ev.created, None);
        assert_eq!(ev.created_raw, "yesterday");
    }
}
