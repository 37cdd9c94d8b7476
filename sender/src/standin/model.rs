//! What the stand-in knows: the payments behind the generated events, and the delivery log
//! of every attempt.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use coinflow_shared::envelope::Envelope;
use serde_json::Value;

/// The `responseCode` logged for an attempt that got no answer: no connection, or nothing
/// within the sender's 5 s. Coinflow's own code for it is not documented.
pub const NO_ANSWER: u16 = 0;

/// One attempt in the delivery log.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// The delivery log id (`wl-` and a sequence number), what resend takes.
    pub id: String,
    /// Order of logging, from 1.
    pub seq: u64,
    /// The envelope's `eventType` (empty when the packet is not an envelope).
    pub event_type: String,
    /// The envelope's `category`.
    pub category: String,
    /// `data.id` / `data.paymentId`.
    pub payment_id: Option<String>,
    /// `data.merchantId`.
    pub merchant_id: Option<String>,
    /// The exact bytes posted.
    pub packet: Bytes,
    /// When the attempt was sent.
    pub sent_at: SystemTime,
    /// Where.
    pub url: String,
    /// The receiver's status, or [`NO_ANSWER`].
    pub response_code: u16,
}

impl LogEntry {
    /// The entry for one attempt.
    pub fn new(seq: u64, packet: &Bytes, url: &str, sent_at: SystemTime, code: u16) -> Self {
        let (event_type, category, payment_id, merchant_id) = match Envelope::parse(packet) {
            Ok(env) => {
                let merchant = env.data.str("merchantId").map(str::to_owned);
                let payment = env.payment_id();
                (env.event_type, env.category, payment, merchant)
            }
            Err(_) => (String::new(), String::new(), None, None),
        };
        Self {
            id: format!("wl-{seq}"),
            seq,
            event_type,
            category,
            payment_id,
            merchant_id,
            packet: packet.clone(),
            sent_at,
            url: url.to_owned(),
            response_code: code,
        }
    }
}

/// A refund of a generated payment.
#[derive(Debug, Clone, PartialEq)]
pub struct RefundRecord {
    /// When (epoch ms).
    pub created_at_ms: i64,
    /// `Settled`.
    pub status: String,
    /// The refunded subtotal.
    pub subtotal: Value,
    /// The refunded total.
    pub total: Value,
}

/// A chargeback of a generated payment.
#[derive(Debug, Clone, PartialEq)]
pub struct ChargebackRecord {
    /// `cb-` and the payment id.
    pub id: String,
    /// `Opened`, `Won` or `Lost`: the latest of its events.
    pub status: String,
    /// When it opened (epoch ms).
    pub created_at_ms: i64,
}

/// A generated payment as the merchant API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentRecord {
    /// `data.id`.
    pub id: String,
    /// `data.merchantId`.
    pub merchant_id: Option<String>,
    /// When the stand-in created it (epoch ms): distinct per payment, all before start.
    pub created_at_ms: i64,
    /// `Settled` if any of its events is `Settled`, else `Declined` if one is
    /// `Card Payment Declined`, else `Authorized`. Refunds and chargebacks do not change it:
    /// they are listed on their own.
    pub status: String,
    /// `data.wallet`.
    pub wallet: Option<String>,
    /// `data.rawCustomerId`.
    pub raw_customer_id: Option<String>,
    /// `data.webhookInfo`.
    pub webhook_info: Value,
    /// `data.subtotal`, `data.fees`, `data.total`.
    pub subtotal: Value,
    /// See `subtotal`.
    pub fees: Value,
    /// See `subtotal`.
    pub total: Value,
    /// Its distinct event types, in generation order.
    pub event_types: Vec<String>,
    /// One per distinct `Refund` event.
    pub refunds: Vec<RefundRecord>,
    /// When it had a chargeback.
    pub chargeback: Option<ChargebackRecord>,
}

/// Epoch milliseconds.
pub fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The payments behind `bodies` (duplicates counted once), in order of first appearance,
/// created one millisecond apart and ending at `now`.
pub fn payments(bodies: &[Bytes], now: SystemTime) -> Vec<PaymentRecord> {
    let mut seen = HashSet::new();
    let mut out: Vec<PaymentRecord> = Vec::new();
    for body in bodies {
        if !seen.insert(body.clone()) {
            continue;
        }
        let Ok(env) = Envelope::parse(body) else {
            continue;
        };
        let Some(id) = env.payment_id() else {
            continue;
        };
        let field = |key: &str| env.data.0.get(key).cloned().unwrap_or(Value::Null);
        let at = match out.iter().position(|p| p.id == id) {
            Some(at) => at,
            None => {
                out.push(PaymentRecord {
                    id: id.clone(),
                    merchant_id: env.data.str("merchantId").map(str::to_owned),
                    created_at_ms: 0,
                    status: String::new(),
                    wallet: env.data.str("wallet").map(str::to_owned),
                    raw_customer_id: env.data.str("rawCustomerId").map(str::to_owned),
                    webhook_info: field("webhookInfo"),
                    subtotal: field("subtotal"),
                    fees: field("fees"),
                    total: field("total"),
                    event_types: Vec::new(),
                    refunds: Vec::new(),
                    chargeback: None,
                });
                out.len() - 1
            }
        };
        let payment = &mut out[at];
        if env.event_type == "Settled" {
            payment.subtotal = field("subtotal");
            payment.fees = field("fees");
            payment.total = field("total");
        }
        if env.event_type == "Refund" {
            payment.refunds.push(RefundRecord {
                created_at_ms: 0,
                status: "Settled".into(),
                subtotal: field("subtotal"),
                total: field("total"),
            });
        }
        if !payment.event_types.contains(&env.event_type) {
            payment.event_types.push(env.event_type);
        }
    }
    let base = millis(now) - i64::try_from(out.len()).unwrap_or(0) * 3;
    for (n, payment) in out.iter_mut().enumerate() {
        let created = base + i64::try_from(n).unwrap_or(0) * 3;
        payment.created_at_ms = created;
        let has = |t: &str| payment.event_types.iter().any(|e| e == t);
        payment.status = if has("Settled") {
            "Settled"
        } else if has("Card Payment Declined") {
            "Declined"
        } else {
            "Authorized"
        }
        .into();
        for refund in &mut payment.refunds {
            refund.created_at_ms = created + 1;
        }
        if has("Card Payment Chargeback Opened") {
            let status = if has("Card Payment Chargeback Lost") {
                "Lost"
            } else if has("Card Payment Chargeback Won") {
                "Won"
            } else {
                "Opened"
            };
            payment.chargeback = Some(ChargebackRecord {
                id: format!("cb-{}", payment.id),
                status: status.into(),
                created_at_ms: created + 2,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{Traffic, event, generate};

    #[test]
    fn payments_follow_their_events() {
        let t = "2026-11-18T00:00:00.000Z";
        let bodies = vec![
            event("Card Payment Authorized", "a", "sword", 500, t),
            event("Settled", "a", "sword", 500, t),
            event("Settled", "a", "sword", 500, t),
            event("Card Payment Authorized", "b", "sword", 500, t),
            event("Card Payment Declined", "b", "sword", 500, t),
            event("Settled", "c", "shield", 700, t),
            event("Refund", "c", "shield", 700, t),
            event("Settled", "d", "shield", 700, t),
            event("Card Payment Chargeback Opened", "d", "shield", 700, t),
            event("Card Payment Chargeback Lost", "d", "shield", 700, t),
        ];
        let now = SystemTime::now();
        let p = payments(&bodies, now);
        let ids: Vec<&str> = p.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        let statuses: Vec<&str> = p.iter().map(|p| p.status.as_str()).collect();
        assert_eq!(statuses, ["Settled", "Declined", "Settled", "Settled"]);
        assert_eq!(p[2].refunds.len(), 1, "a duplicate is one refund");
        assert_eq!(p[0].refunds.len(), 0);
        assert_eq!(p[3].chargeback.as_ref().unwrap().status, "Lost");
        assert_eq!(p[0].wallet.as_deref(), Some("mygameʬa"));
        assert_eq!(p[2].subtotal["cents"], 700);
        let created: HashSet<i64> = p.iter().map(|p| p.created_at_ms).collect();
        assert_eq!(created.len(), 4, "distinct");
        assert!(p.iter().all(|p| p.created_at_ms <= millis(now)));
    }

    #[test]
    fn every_generated_payment_is_listed_once() {
        let bodies = generate(&Traffic {
            payments: 200,
            duplicate_ratio: 0.3,
            reorder_ratio: 0.3,
            prefix: "m".into(),
            seed: 3,
        });
        let p = payments(&bodies, SystemTime::now());
        assert_eq!(p.len(), 200);
        assert!(p.iter().any(|p| p.status == "Settled"));
        assert!(p.iter().any(|p| p.status == "Declined"));
        assert!(p.iter().any(|p| !p.refunds.is_empty()));
        assert!(p.iter().any(|p| p.chargeback.is_some()));
    }
}
