//! Realistic, reproducible traffic: distinct payments each living through a plausible
//! lifecycle, interleaved, with chosen duplicate and reordering ratios.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// What to generate.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// Distinct payments.
    pub payments: usize,
    /// The chance that a delivery is sent again later (a duplicate).
    pub duplicate_ratio: f64,
    /// The chance that a payment's events arrive shuffled.
    pub reorder_ratio: f64,
    /// Payment ids start with this, so runs don't collide.
    pub prefix: String,
    /// The RNG seed.
    pub seed: u64,
}

/// (item, price in cents) from the example catalog.
const ITEMS: [(&str, i64); 4] = [
    ("sword", 500),
    ("shield", 700),
    ("credits-1000", 1000),
    ("starter-bundle", 1500),
];

/// One event body.
pub fn event(event_type: &str, payment_id: &str, item: &str, cents: i64, created: &str) -> Bytes {
    Bytes::from(json(event_type, payment_id, item, cents, created).to_string())
}

fn json(
    event_type: &str,
    payment_id: &str,
    item: &str,
    cents: i64,
    created: &str,
) -> serde_json::Value {
    serde_json::json!({
            "eventType": event_type,
            "category": "Purchase",
            "created": created,
            "data": {
                "id": payment_id,
                "merchantId": "mygame",
                "wallet": format!("mygameʬ{payment_id}"),
                "rawCustomerId": format!("user-{payment_id}"),
                "webhookInfo": { "item": item },
                "subtotal": { "cents": cents, "currency": "USD" },
                "fees": { "cents": 25, "currency": "USD" },
                "total": { "cents": cents + 25, "currency": "USD" },
                "paymentMethod": "card",
            }
    })
}

/// An event of generated traffic: as [`event`], and a chargeback carries `chargebackId`
/// (`cb-` + the payment id: one dispute per payment), as Coinflow's do.
fn traffic_event(
    event_type: &str,
    payment_id: &str,
    item: &str,
    cents: i64,
    created: &str,
) -> Bytes {
    let mut body = json(event_type, payment_id, item, cents, created);
    if event_type.contains(" Chargeback ") {
        body["data"]["chargebackId"] = format!("cb-{payment_id}").into();
    }
    Bytes::from(body.to_string())
}

fn created(n: u64) -> String {
    // A fixed base plus n seconds, rendered as RFC 3339.
    let secs = 1_795_000_000 + n;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // 1_795_000_000 s is 2026-11-18; days since then stay small.
    let day = 18 + (days - 1_795_000_000 / 86_400);
    format!(
        "2026-11-{:02}T{:02}:{:02}:{:02}.000Z",
        day.min(28),
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The bodies of a run, in delivery order.
pub fn generate(t: &Traffic) -> Vec<Bytes> {
    let mut rng = StdRng::seed_from_u64(t.seed);
    let mut clock = 0u64;
    let mut per_payment: Vec<Vec<Bytes>> = Vec::with_capacity(t.payments);
    for i in 0..t.payments {
        let id = format!("{}-{i}", t.prefix);
        let (item, price) = ITEMS[rng.random_range(0..ITEMS.len())];
        let roll: f64 = rng.random();
        let lifecycle: &[(&str, i64)] = if roll < 0.70 {
            &[("Card Payment Authorized", price), ("Settled", price)]
        } else if roll < 0.80 {
            &[
                ("Card Payment Authorized", price),
                ("Card Payment Declined", price),
            ]
        } else if roll < 0.88 {
            &[
                ("Card Payment Authorized", price),
                ("Settled", price),
                ("Refund", price),
            ]
        } else if roll < 0.93 {
            &[
                ("Settled", price),
                ("Card Payment Chargeback Opened", price),
                ("Card Payment Chargeback Won", price),
            ]
        } else if roll < 0.96 {
            &[
                ("Settled", price),
                ("Card Payment Chargeback Opened", price),
                ("Card Payment Chargeback Lost", price),
            ]
        } else {
            &[
                ("Card Payment Authorized", price / 5),
                ("Settled", price / 5),
            ]
        };
        let mut events: Vec<Bytes> = lifecycle
            .iter()
            .map(|(event_type, cents)| {
                clock += 1 + rng.random_range(0..30);
                traffic_event(event_type, &id, item, *cents, &created(clock))
            })
            .collect();
        if rng.random::<f64>() < t.reorder_ratio {
            events.shuffle(&mut rng);
        }
        per_payment.push(events);
    }
    // Interleave payments, keeping each one's (possibly shuffled) order.
    let mut cursors: Vec<(usize, usize)> = per_payment
        .iter()
        .enumerate()
        .map(|(i, _)| (i, 0))
        .collect();
    let mut out = Vec::new();
    while !cursors.is_empty() {
        let pick = rng.random_range(0..cursors.len().min(64));
        let (p, next) = cursors[pick];
        out.push(per_payment[p][next].clone());
        if next + 1 == per_payment[p].len() {
            cursors.swap_remove(pick);
        } else {
            cursors[pick].1 += 1;
        }
    }
    // Duplicates arrive later, anywhere after the original.
    let originals = out.len();
    for i in 0..originals {
        if rng.random::<f64>() < t.duplicate_ratio {
            let at = rng.random_range(i + 1..=out.len());
            let copy = out[i].clone();
            out.insert(at, copy);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_with_the_asked_duplicates() {
        let t = Traffic {
            payments: 500,
            duplicate_ratio: 0.3,
            reorder_ratio: 0.2,
            prefix: "p".into(),
            seed: 7,
        };
        let a = generate(&t);
        assert_eq!(a, generate(&t), "same seed, same run");
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        let dup_share = (a.len() - distinct.len()) as f64 / distinct.len() as f64;
        assert!((0.2..0.4).contains(&dup_share), "{dup_share}");
        for body in &a {
            coinflow_shared::envelope::Envelope::parse(body).unwrap();
        }
    }
}
