//! Webhook bodies: the repo's fixtures and generated variants, signed like Coinflow.

use std::time::{SystemTime, UNIX_EPOCH};

use secrecy::SecretString;

/// A fixture's exact bytes.
pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(crate::fixtures_dir().join(name)).unwrap()
}

/// Now, in Unix seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The `Coinflow-Signature` for `body` under `key` at `t`.
pub fn sign_at(key: &str, t: i64, body: &[u8]) -> String {
    coinflow_shared::signature::sign(&SecretString::from(key), t, body)
}

/// The `Coinflow-Signature` for `body` under the test key, now.
pub fn sign(body: &[u8]) -> String {
    sign_at(crate::KEY, now(), body)
}

/// A card `Settled` event for `payment_id` buying `item` for `cents` (USD).
pub fn settled(payment_id: &str, item: &str, cents: i64) -> Vec<u8> {
    event(
        "Settled",
        payment_id,
        item,
        cents,
        "2026-11-20T17:06:05.177Z",
    )
}

/// A payment-family event with the given fields, as the sender generates them; the wallet
/// is derived from the payment ([`wallet_of`]).
pub fn event(event_type: &str, payment_id: &str, item: &str, cents: i64, created: &str) -> Vec<u8> {
    coinflow_sender::generate::event(event_type, payment_id, item, cents, created).to_vec()
}

/// The wallet [`event`] uses for a payment.
pub fn wallet_of(payment_id: &str) -> String {
    format!("mygameʬ{payment_id}")
}

/// The `rawCustomerId` [`event`] uses for a payment.
pub fn customer_of(payment_id: &str) -> String {
    format!("user-{payment_id}")
}

/// `body` with `data`'s fields `fields` set (added or replaced); a `null` value removes the
/// field.
pub fn with_data(body: &[u8], fields: &[(&str, serde_json::Value)]) -> Vec<u8> {
    let mut envelope: serde_json::Value = serde_json::from_slice(body).unwrap();
    let data = envelope["data"].as_object_mut().unwrap();
    for (key, value) in fields {
        if value.is_null() {
            data.remove(*key);
        } else {
            data.insert((*key).to_owned(), value.clone());
        }
    }
    serde_json::to_vec(&envelope).unwrap()
}

/// A chargeback event (`event_type`, e.g. `Card Payment Chargeback Opened`) of a payment,
/// of the dispute `chargeback_id` (none: the field is absent).
pub fn chargeback(
    event_type: &str,
    payment_id: &str,
    item: &str,
    cents: i64,
    created: &str,
    chargeback_id: Option<&str>,
) -> Vec<u8> {
    let body = event(event_type, payment_id, item, cents, created);
    match chargeback_id {
        Some(id) => with_data(&body, &[("chargebackId", serde_json::json!(id))]),
        None => body,
    }
}
