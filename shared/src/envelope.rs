//! The Coinflow v2 webhook envelope: `{eventType, category, created, data}`.
//!
//! Only the envelope is strict: with a missing or mistyped envelope key the body is not an
//! envelope (the edge then delivers it as [`crate::convert::unparseable`], never refuses
//! it). Everything inside `data` is read leniently by [`Data`], because its shape varies
//! by event family and Coinflow adds fields over time; the raw body keeps what isn't read.

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer as _};
use serde_json::{Map, Value};

/// A parsed v2 envelope. Unknown top-level keys are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Title Case with spaces, e.g. `Settled`. Unknown values are valid.
    pub event_type: String,
    /// `Purchase`, `Subscription`, `KYC`, `Withdraw` or `Marketplace`.
    pub category: String,
    /// ISO-8601, kept exactly as sent.
    pub created: String,
    /// The event payload.
    pub data: Data,
}

/// Why a body is not a v2 envelope. The messages are safe to return to the sender: they
/// name the problem, never echo secrets.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The body is not well-formed JSON.
    #[error("malformed JSON: {0}")]
    Syntax(String),
    /// Well-formed JSON that is not a v2 envelope (missing or mistyped key).
    #[error("not a Coinflow v2 envelope: {0}")]
    Shape(String),
}

impl Envelope {
    /// Parses a raw body. Never panics, whatever the bytes.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let parsed = de
            .deserialize_map(ObjectOnly)
            .and_then(|env| de.end().map(|()| env));
        parsed.map_err(|e| {
            if e.is_data() {
                EnvelopeError::Shape(e.to_string())
            } else {
                EnvelopeError::Syntax(e.to_string())
            }
        })
    }
}

/// Accepts the envelope only as a JSON object (serde would also take an array).
struct ObjectOnly;

impl<'de> Visitor<'de> for ObjectOnly {
    type Value = Envelope;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Envelope, A::Error> {
        Envelope::deserialize(MapAccessDeserializer::new(map))
    }
}

/// The `data` object, read leniently: a field of an unexpected type reads as absent. A
/// key repeated anywhere inside it is refused: parsers disagree on which copy wins, and the
/// body must mean one thing.
#[derive(Debug, Clone, Default)]
pub struct Data(pub Map<String, Value>);

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(StrictValue)? {
            Value::Object(map) => Ok(Self(map)),
            other => Err(serde::de::Error::invalid_type(
                unexpected(&other),
                &"a JSON object",
            )),
        }
    }
}

fn unexpected(v: &Value) -> serde::de::Unexpected<'_> {
    use serde::de::Unexpected;
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(_) => Unexpected::Other("a number"),
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

/// Builds a `Value`, refusing duplicate keys in any object.
struct StrictValue;

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictValue)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictSeed)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key `{key}`"
                )));
            }
            let value = map.next_value_seed(StrictSeed)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

struct StrictSeed;

impl<'de> serde::de::DeserializeSeed<'de> for StrictSeed {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictValue)
    }
}

/// `{"cents": integer, "currency"?: string}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    /// Integer minor units.
    pub cents: i64,
    /// Absent on some events (stablecoin settlement).
    pub currency: Option<String>,
}

impl Data {
    /// A non-empty string field.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// An identifier (`data.id`, `data.paymentId`, ...), by one rule for every id field:
    ///
    /// - a non-empty JSON string is the id, exactly as sent (`"0"` included);
    /// - a JSON integer is the id, as its decimal text: `0` is `"0"`, `-5` is `"-5"`, and
    ///   so on from `i64::MIN` to `u64::MAX` (`18446744073709551615`). So `7` and `"7"` are
    ///   the same id: the same payment and the same transport identity;
    /// - anything else is no id: `""`, `null`, a boolean, an array, an object, and every
    ///   number serde_json reads as a float. That is any number written with a fraction or
    ///   an exponent (`1.5`, `5.0`, `1e3`), `-0` (read as -0.0), and any integer outside
    ///   `i64::MIN..=u64::MAX` (`18446744073709551616`), which serde_json reads as the
    ///   nearest `f64` (this workspace does not enable its `arbitrary_precision` feature). A
    ///   float is never rounded into an id: its decimal text would not be what was sent.
    pub fn id(&self, key: &str) -> Option<String> {
        match self.0.get(key)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            _ => None,
        }
    }

    /// A nested object field.
    pub fn object(&self, key: &str) -> Option<&Map<String, Value>> {
        self.0.get(key).and_then(Value::as_object)
    }

    /// A money field; absent when missing, `null` or not integer cents.
    pub fn money(&self, key: &str) -> Option<Money> {
        money_in(&self.0, key)
    }
}

impl Envelope {
    /// The business key: `data.paymentId` first on `Refund*` events (a refund's own `id`,
    /// if Coinflow ever sends one, is not the payment), `data.id` first on the others; the
    /// first of the two that is an id by [`Data::id`]'s rule. So a non-empty string, or an
    /// integer as its decimal text (`{"id": 0}` names payment `"0"`); a float, `""`,
    /// `null` or any other type is no id, and the other field is tried.
    pub fn payment_id(&self) -> Option<String> {
        let order = if self.event_type.starts_with("Refund") {
            ["paymentId", "id"]
        } else {
            ["id", "paymentId"]
        };
        order.iter().find_map(|key| self.data.id(key))
    }
}

/// Reads a money object at `key` of `map`: absent unless `cents` is an integer and
/// `currency`, when the key is present at all, is a string. A `currency` of `null`, a
/// number, an object or an array makes the whole amount unreadable (a `Settled` is then
/// held), never an amount in no particular currency.
pub fn money_in(map: &Map<String, Value>, key: &str) -> Option<Money> {
    let obj = map.get(key)?.as_object()?;
    let cents = obj.get("cents")?.as_i64()?;
    let currency = match obj.get("currency") {
        None => None,
        Some(Value::String(c)) => Some(c.clone()),
        Some(_) => return None,
    };
    Some(Money { cents, currency })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_settled_fixture() {
        let env = Envelope::parse(include_bytes!("../../fixtures/settled-sword.json")).unwrap();
        assert_eq!(env.event_type, "Settled");
        assert_eq!(env.category, "Purchase");
        assert_eq!(env.created, "2026-11-20T17:06:05.177Z");
        assert_eq!(
            env.payment_id().as_deref(),
            Some("51e5ac49-d3ad-412c-afdb-acb1a5b50b3d")
        );
        assert_eq!(
            env.data.money("subtotal"),
            Some(Money {
                cents: 500,
                currency: Some("USD".into())
            })
        );
    }

    #[test]
    fn missing_currency_and_nulls_are_absent_not_errors() {
        let env = Envelope::parse(
            br#"{"eventType":"Settled","category":"Purchase","created":"x",
                "data":{"id":null,"paymentId":"p1","subtotal":{"cents":1000},
                        "fees":null,"total":{"cents":1.5},"wallet":7}}"#,
        )
        .unwrap();
        assert_eq!(env.payment_id().as_deref(), Some("p1"));
        assert_eq!(
            env.data.money("subtotal"),
            Some(Money {
                cents: 1000,
                currency: None
            })
        );
        assert_eq!(env.data.money("fees"), None);
        assert_eq!(env.data.money("total"), None);
        assert_eq!(env.data.str("wallet"), None);
    }

    #[test]
    fn a_currency_that_is_not_a_string_makes_the_amount_unreadable() {
        for currency in ["392", "null", "{}", "[\"USD\"]", "true"] {
            let body = format!(
                r#"{{"eventType":"Settled","category":"Purchase","created":"x",
                    "data":{{"subtotal":{{"cents":500,"currency":{currency}}}}}}}"#
            );
            let env = Envelope::parse(body.as_bytes()).unwrap();
            assert_eq!(env.data.money("subtotal"), None, "{currency}");
        }
    }

    #[test]
    fn refunds_name_their_payment_by_payment_id_first() {
        let refund = Envelope::parse(
            br#"{"eventType":"Refund","category":"Purchase","created":"x","data":{"id":"r1","paymentId":"p1"}}"#,
        )
        .unwrap();
        assert_eq!(refund.payment_id().as_deref(), Some("p1"));
        let settled = Envelope::parse(
            br#"{"eventType":"Settled","category":"Purchase","created":"x","data":{"id":"p2","paymentId":"zz"}}"#,
        )
        .unwrap();
        assert_eq!(settled.payment_id().as_deref(), Some("p2"));
    }

    #[test]
    fn an_id_is_a_non_empty_string_or_an_integer_in_decimal() {
        let cases = [
            (r#""abc""#, Some("abc")),
            (r#""0""#, Some("0")),
            (r#""-5""#, Some("-5")),
            (r#""1.5""#, Some("1.5")),
            ("0", Some("0")),
            ("-5", Some("-5")),
            ("9223372036854775807", Some("9223372036854775807")),
            ("-9223372036854775808", Some("-9223372036854775808")),
            ("18446744073709551615", Some("18446744073709551615")),
            // Past u64 (or below i64) serde_json reads a float: no id, not a rounded one. It
            // reads `-0` as the float -0.0 too.
            ("18446744073709551616", None),
            ("-9223372036854775809", None),
            ("1.5", None),
            ("5.0", None),
            ("1e3", None),
            ("-0.0", None),
            ("-0", None),
            (r#""""#, None),
            ("null", None),
            ("true", None),
            ("[1]", None),
            (r#"{"id":"p"}"#, None),
        ];
        for (id, want) in cases {
            for event_type in ["Settled", "Refund"] {
                let body = format!(
                    r#"{{"eventType":"{event_type}","category":"Purchase","created":"x","data":{{"id":{id}}}}}"#
                );
                let env = Envelope::parse(body.as_bytes()).unwrap();
                assert_eq!(env.data.id("id").as_deref(), want, "{id}");
                assert_eq!(env.payment_id().as_deref(), want, "{event_type} {id}");
            }
            // The same rule for `paymentId`; where `id` is no id, `paymentId` is the payment.
            let body = format!(
                r#"{{"eventType":"Settled","category":"Purchase","created":"x","data":{{"id":{id},"paymentId":{id}}}}}"#
            );
            let env = Envelope::parse(body.as_bytes()).unwrap();
            assert_eq!(env.data.id("paymentId").as_deref(), want, "{id}");
            let body = format!(
                r#"{{"eventType":"Settled","category":"Purchase","created":"x","data":{{"id":{id},"paymentId":"p"}}}}"#
            );
            let env = Envelope::parse(body.as_bytes()).unwrap();
            assert_eq!(
                env.payment_id().as_deref(),
                Some(want.unwrap_or("p")),
                "{id}"
            );
        }
    }

    #[test]
    fn unknown_top_level_keys_are_ignored() {
        let env = Envelope::parse(
            br#"{"eventType":"Brand New Event","category":"Purchase","created":"c","data":{},"extra":1}"#,
        )
        .unwrap();
        assert_eq!(env.event_type, "Brand New Event");
    }

    #[test]
    fn bad_bodies_are_classified() {
        assert!(matches!(
            Envelope::parse(b"{\"eventType\""),
            Err(EnvelopeError::Syntax(_))
        ));
        assert!(matches!(
            Envelope::parse(b"\xff\xfe"),
            Err(EnvelopeError::Syntax(_))
        ));
        assert!(matches!(
            Envelope::parse(br#"{"eventType":"Settled","category":"Purchase","created":"c"}"#),
            Err(EnvelopeError::Shape(m)) if m.contains("data")
        ));
        assert!(matches!(
            Envelope::parse(br#"{"eventType":1,"category":"Purchase","created":"c","data":{}}"#),
            Err(EnvelopeError::Shape(_))
        ));
        assert!(matches!(
            Envelope::parse(br#"{"eventType":"S","category":"P","created":"c","data":[]}"#),
            Err(EnvelopeError::Shape(_))
        ));
        assert!(matches!(
            Envelope::parse(br#"["Settled","Purchase","c",{}]"#),
            Err(EnvelopeError::Shape(m)) if m.contains("JSON object")
        ));
        assert!(matches!(
            Envelope::parse(br#"{"eventType":"S","eventType":"T","category":"P","created":"c","data":{}}"#),
            Err(EnvelopeError::Shape(m)) if m.contains("duplicate field")
        ));
        assert!(matches!(
            Envelope::parse(br#"{"eventType":"S","category":"P","created":"c","data":{}} {}"#),
            Err(EnvelopeError::Syntax(_))
        ));
        assert!(matches!(
            Envelope::parse(br#"{"eventType":"S","category":"P","created":"c","data":{"webhookInfo":{"item":"a","item":"b"}}}"#),
            Err(EnvelopeError::Shape(m)) if m.contains("duplicate key `item`")
        ));
        assert!(matches!(
            Envelope::parse(br#"{"eventType":"S","category":"P","created":"c","data":{"id":"a","id":"b"}}"#),
            Err(EnvelopeError::Shape(m)) if m.contains("duplicate key `id`")
        ));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(Envelope::parse(deep.as_bytes()).is_err());
    }
}
