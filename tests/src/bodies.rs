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

/// A payment-family event with the given fields; `wallet` is derived from the payment.
pub fn event(event_type: &str, payment_id: &str, item: &str, cents: i64, created: &str) -> Vec<u8> {
    serde_json::json!({
        "eventType": event_type,
        "category": "Purchase",
        "created": created,
        "data": {
            "id": payment_id,
            "merchantId": "mygame",
            "wallet": wallet_of(payment_id),
            "rawCustomerId": format!("user-{payment_id}"),
            "webhookInfo": { "item": item },
            "subtotal": { "cents": cents, "currency": "USD" },
            "fees": { "cents": 25, "currency": "USD" },
            "total": { "cents": cents + 25, "currency": "USD" },
            "last4": "1111",
            "bin": "411111"
        }
    })
    .to_string()
    .into_bytes()
}

/// The wallet [`event`] uses for a payment.
pub fn wallet_of(payment_id: &str) -> String {
    format!("mygameʬ{payment_id}")
}
