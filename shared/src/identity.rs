//! The one definition of an event's identities. Coinflow sends no event id, so both are
//! built from the payload.
//!
//! - **Transport identity** ([`event_key`]): equal for redeliveries of one event. It is
//!   `eventType` + the first present of `data.id`, `data.paymentId`,
//!   `data.subscriptionId`, `data.chargebackId` + `created` (exactly as sent). When none
//!   of those ids is present, the SHA-256 of the raw body is the last resort
//!   ([`body_key`]), and it is the only identity of a body that is not an envelope at all.
//! - **Business identity** ([`crate::envelope::Envelope::payment_id`]): the payment id. A
//!   payment is granted at most once, whatever the transport identity.

use sha2::{Digest, Sha256};

use crate::envelope::Envelope;

/// The id fields tried, in order, for the transport identity.
const ID_FIELDS: [&str; 4] = ["id", "paymentId", "subscriptionId", "chargebackId"];

/// The transport identity of one delivery: `t1:` + hex SHA-256 over the length-prefixed
/// (eventType, id, created), or `b1:` + hex SHA-256 of the raw body when no id is present.
pub fn event_key(envelope: &Envelope, raw_body: &[u8]) -> String {
    let id = ID_FIELDS.iter().find_map(|f| envelope.data.id(f));
    match id {
        Some(id) => {
            let mut h = Sha256::new();
            for part in [
                envelope.event_type.as_str(),
                id.as_str(),
                envelope.created.as_str(),
            ] {
                h.update((part.len() as u64).to_be_bytes());
                h.update(part.as_bytes());
            }
            format!("t1:{}", hex::encode(h.finalize()))
        }
        None => body_key(raw_body),
    }
}

/// The transport identity of a body by its bytes alone: `b1:` + hex SHA-256. Used when
/// the envelope carries no id, and for a body that does not parse.
pub fn body_key(raw_body: &[u8]) -> String {
    format!("b1:{}", hex::encode(Sha256::digest(raw_body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(body: &str) -> String {
        event_key(&Envelope::parse(body.as_bytes()).unwrap(), body.as_bytes())
    }

    #[test]
    fn redelivery_with_other_formatting_has_the_same_key() {
        let a = key(
            r#"{"eventType":"Settled","category":"Purchase","created":"c1","data":{"id":"p1","x":1}}"#,
        );
        let b = key(
            r#"{ "category":"Purchase", "eventType":"Settled","created":"c1","data":{"x":2,"id":"p1"}}"#,
        );
        assert_eq!(a, b);
        assert!(a.starts_with("t1:"));
    }

    #[test]
    fn each_part_changes_the_key() {
        let base =
            key(r#"{"eventType":"Settled","category":"P","created":"c1","data":{"id":"p1"}}"#);
        for other in [
            r#"{"eventType":"Refund","category":"P","created":"c1","data":{"id":"p1"}}"#,
            r#"{"eventType":"Settled","category":"P","created":"c2","data":{"id":"p1"}}"#,
            r#"{"eventType":"Settled","category":"P","created":"c1","data":{"id":"p2"}}"#,
        ] {
            assert_ne!(base, key(other));
        }
    }

    #[test]
    fn fields_cannot_bleed_into_each_other() {
        let a = key(r#"{"eventType":"ab","category":"P","created":"c","data":{"id":"x"}}"#);
        let b = key(r#"{"eventType":"a","category":"P","created":"c","data":{"id":"bx"}}"#);
        assert_ne!(a, b);
    }

    #[test]
    fn id_fields_are_tried_in_order_and_body_hash_is_the_fallback() {
        let by_payment =
            key(r#"{"eventType":"Refund","category":"P","created":"c","data":{"paymentId":"p1"}}"#);
        let by_id = key(
            r#"{"eventType":"Refund","category":"P","created":"c","data":{"id":"p1","paymentId":"zz"}}"#,
        );
        assert_eq!(by_payment, by_id);
        let withdraw = key(
            r#"{"eventType":"Withdraw Pending","category":"Withdraw","created":"c","data":{"wallet":"w"}}"#,
        );
        assert!(withdraw.starts_with("b1:"));
        let other_body = key(
            r#"{"eventType":"Withdraw Pending","category":"Withdraw","created":"c","data":{"wallet":"v"}}"#,
        );
        assert_ne!(withdraw, other_body);
    }
}
