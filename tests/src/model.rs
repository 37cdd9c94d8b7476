//! An independent model of the README's money rules: what a payment's ledger must hold,
//! computed from the bodies sent and the catalog file alone.
//!
//! It deliberately shares no code with fulfillment-svc (no `decision`, `lifecycle` or
//! `Catalog`): the catalog is read from the TOML here, and the bodies are parsed with
//! [`Envelope`] only to read their fields. A bug in the service's rules then shows up as a
//! disagreement instead of being copied into the expectation.
//!
//! The rules, under the default `revoke-on-open` chargeback policy:
//! - a payment is **granted** the grants of the catalog entry its `webhookInfo` names when
//!   some `Settled` covers that entry's price (`subtotal.cents` an integer at least the
//!   price; `subtotal.currency`, when sent, a string equal to the price's ignoring ASCII
//!   case) and names a payer (`wallet` or `rawCustomerId`);
//! - unless it is **reversed**: a `Refund` / `Refund Complete` whose `data.status` is not
//!   `Failed`, any `… Chargeback Lost`, `ACH Returned`, `ACH Chargeback`;
//! - or has an **open dispute**: each `chargebackId` is its own dispute (none: the dispute
//!   `""`), open when its `… Chargeback Opened` was seen and its `… Chargeback Won` was not.
//!
//! Duplicates and order do not matter: only the set of bodies does. When several covering
//! `Settled` name different entries (Coinflow never sends that), the first in the slice is
//! taken, as the first to arrive fixes the plan.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use coinflow_shared::envelope::Envelope;
use serde_json::Value;

/// Net quantity per sku.
pub type Grants = BTreeMap<String, i64>;

/// The catalog as the model reads it: the `webhookInfo` key, and per entry its price and
/// grants.
#[derive(Debug, Clone)]
pub struct ModelCatalog {
    /// `item_key`.
    pub item_key: String,
    /// The entries by name.
    pub items: BTreeMap<String, ModelItem>,
}

/// One catalog entry.
#[derive(Debug, Clone)]
pub struct ModelItem {
    /// `price.cents`.
    pub cents: i64,
    /// `price.currency`.
    pub currency: String,
    /// `grants`, as (sku, quantity).
    pub grants: Vec<(String, i64)>,
}

impl ModelCatalog {
    /// Reads a catalog TOML file.
    pub fn load(path: &Path) -> Self {
        Self::parse(&std::fs::read_to_string(path).unwrap())
    }

    /// The repo's example catalog, which the test stacks serve.
    pub fn example() -> Self {
        Self::load(&crate::catalog_path())
    }

    /// Reads catalog TOML text.
    pub fn parse(text: &str) -> Self {
        let table: toml::Table = text.parse().unwrap();
        let item_key = table["item_key"].as_str().unwrap().to_owned();
        let mut items = BTreeMap::new();
        for (name, entry) in table["items"].as_table().unwrap() {
            let price = &entry["price"];
            let grants = entry["grants"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| {
                    (
                        g["sku"].as_str().unwrap().to_owned(),
                        g["quantity"].as_integer().unwrap(),
                    )
                })
                .collect();
            items.insert(
                name.clone(),
                ModelItem {
                    cents: price["cents"].as_integer().unwrap(),
                    currency: price["currency"].as_str().unwrap().to_owned(),
                    grants,
                },
            );
        }
        Self { item_key, items }
    }
}

/// A non-empty string field of `data`.
fn text<'a>(data: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a str> {
    data.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The grants of the entry `env` (a `Settled`) pays for, when it covers the price.
fn covered<'c>(env: &Envelope, catalog: &'c ModelCatalog) -> Option<&'c [(String, i64)]> {
    let data = &env.data.0;
    let item = data.get("webhookInfo")?.get(&catalog.item_key)?.as_str()?;
    let entry = catalog.items.get(item)?;
    text(data, "wallet").or_else(|| text(data, "rawCustomerId"))?;
    let subtotal = data.get("subtotal")?.as_object()?;
    if subtotal.get("cents")?.as_i64()? < entry.cents {
        return None;
    }
    match subtotal.get("currency") {
        None => {}
        Some(Value::String(sent)) if sent.eq_ignore_ascii_case(&entry.currency) => {}
        Some(_) => return None,
    }
    Some(&entry.grants)
}

/// What one payment's ledger must net to, per sku, given every body delivered for it (any
/// order, duplicates allowed). Bodies that are not envelopes count for nothing.
pub fn expected_grants<B: AsRef<[u8]>>(bodies: &[B], catalog: &ModelCatalog) -> Grants {
    let events: Vec<Envelope> = bodies
        .iter()
        .filter_map(|b| Envelope::parse(b.as_ref()).ok())
        .collect();
    // `<processor> Chargeback <outcome>`: Card Payment, PayPal, Venmo.
    let is = |env: &Envelope, outcome: &str| {
        env.event_type
            .rsplit_once(" Chargeback ")
            .is_some_and(|(processor, o)| !processor.is_empty() && o == outcome)
    };
    let reversed = events.iter().any(|e| match e.event_type.as_str() {
        "Refund" | "Refund Complete" => text(&e.data.0, "status") != Some("Failed"),
        "ACH Returned" | "ACH Chargeback" => true,
        _ => is(e, "Lost"),
    });
    let dispute = |e: &Envelope| text(&e.data.0, "chargebackId").unwrap_or("").to_owned();
    let opened: BTreeSet<String> = events
        .iter()
        .filter(|e| is(e, "Opened"))
        .map(dispute)
        .collect();
    let won: BTreeSet<String> = events
        .iter()
        .filter(|e| is(e, "Won"))
        .map(dispute)
        .collect();
    let open_dispute = opened.difference(&won).next().is_some();
    let plan = events
        .iter()
        .filter(|e| e.event_type == "Settled")
        .find_map(|e| covered(e, catalog));
    let mut net = Grants::new();
    if let Some(grants) = plan
        && !reversed
        && !open_dispute
    {
        for (sku, quantity) in grants {
            *net.entry(sku.clone()).or_default() += quantity;
        }
    }
    net.retain(|_, q| *q != 0);
    net
}

/// [`expected_grants`] of every payment named in `bodies` (by `data.id`, or `paymentId`
/// first on `Refund*` events); bodies naming no payment are left out.
pub fn expected_by_payment<B: AsRef<[u8]>>(
    bodies: &[B],
    catalog: &ModelCatalog,
) -> BTreeMap<String, Grants> {
    let mut by_payment: BTreeMap<String, Vec<&[u8]>> = BTreeMap::new();
    for body in bodies {
        if let Ok(env) = Envelope::parse(body.as_ref())
            && let Some(payment) = env.payment_id()
        {
            by_payment.entry(payment).or_default().push(body.as_ref());
        }
    }
    by_payment
        .into_iter()
        .map(|(payment, bodies)| {
            let want = expected_grants(&bodies, catalog);
            (payment, want)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn catalog() -> ModelCatalog {
        ModelCatalog::parse(
            r#"item_key = "item"
               [items.sword]
               price = { cents = 500, currency = "USD" }
               grants = [{ sku = "sword", quantity = 1 }]
               [items.bundle]
               price = { cents = 1500, currency = "USD" }
               grants = [{ sku = "sword", quantity = 1 }, { sku = "gold", quantity = 50 },
                         { sku = "sword", quantity = 2 }]"#,
        )
    }

    fn body(event_type: &str, data: Value) -> Vec<u8> {
        let mut data = data;
        data.as_object_mut()
            .unwrap()
            .entry("id")
            .or_insert(json!("p1"));
        serde_json::to_vec(&json!({
            "eventType": event_type, "category": "Purchase", "created": "c", "data": data
        }))
        .unwrap()
    }

    fn settled(item: &str, subtotal: Value) -> Vec<u8> {
        body(
            "Settled",
            json!({"wallet": "w", "webhookInfo": {"item": item}, "subtotal": subtotal}),
        )
    }

    fn sword() -> Vec<u8> {
        settled("sword", json!({"cents": 500, "currency": "USD"}))
    }

    fn chargeback(outcome: &str, id: Option<&str>) -> Vec<u8> {
        let data = match id {
            Some(id) => json!({ "chargebackId": id }),
            None => json!({}),
        };
        body(&format!("Card Payment Chargeback {outcome}"), data)
    }

    fn grants(bodies: &[Vec<u8>]) -> Vec<(String, i64)> {
        let got = expected_grants(bodies, &catalog());
        // Whatever the order, with duplicates: the same answer.
        let mut reversed: Vec<Vec<u8>> = bodies.iter().rev().cloned().collect();
        reversed.extend(bodies.iter().cloned());
        assert_eq!(expected_grants(&reversed, &catalog()), got, "order matters");
        got.into_iter().collect()
    }

    fn one(sku: &str, q: i64) -> Vec<(String, i64)> {
        vec![(sku.to_owned(), q)]
    }

    #[test]
    fn a_covering_settled_grants_its_entry() {
        assert_eq!(grants(&[sword()]), one("sword", 1));
        let overpaid_lowercase = settled("sword", json!({"cents": 900, "currency": "usd"}));
        assert_eq!(grants(&[overpaid_lowercase]), one("sword", 1));
        let no_currency = settled("sword", json!({"cents": 500}));
        assert_eq!(grants(&[no_currency]), one("sword", 1));
        let bundle = settled("bundle", json!({"cents": 1500, "currency": "USD"}));
        assert_eq!(
            grants(&[bundle]),
            vec![("gold".to_owned(), 50), ("sword".to_owned(), 3)],
            "grants of one sku add up"
        );
        let v3 = body(
            "Settled",
            json!({"rawCustomerId": "u", "webhookInfo": {"item": "sword"}, "subtotal": {"cents": 500}}),
        );
        assert_eq!(grants(&[v3]), one("sword", 1));
    }

    #[test]
    fn a_settled_that_does_not_cover_grants_nothing() {
        for s in [
            settled("sword", json!({"cents": 499, "currency": "USD"})),
            settled("sword", json!({"cents": 500, "currency": "EUR"})),
            settled("sword", json!({"cents": 500, "currency": 840})),
            settled("sword", json!({"cents": 500, "currency": null})),
            settled("sword", json!({"cents": "500", "currency": "USD"})),
            settled("axe", json!({"cents": 500, "currency": "USD"})),
            body(
                "Settled",
                json!({"wallet": "w", "subtotal": {"cents": 500}}),
            ),
            body(
                "Settled",
                json!({"webhookInfo": {"item": "sword"}, "subtotal": {"cents": 500}}),
            ),
            body(
                "Card Payment Authorized",
                json!({"wallet": "w", "webhookInfo": {"item": "sword"}, "subtotal": {"cents": 500}}),
            ),
            b"{\"eventType\":\"Settled\"".to_vec(),
        ] {
            assert_eq!(
                grants(std::slice::from_ref(&s)),
                [],
                "{}",
                String::from_utf8_lossy(&s)
            );
        }
        // A held Settled and a covering one: the covering one grants.
        let underpaid = settled("sword", json!({"cents": 1, "currency": "USD"}));
        assert_eq!(grants(&[underpaid, sword()]), one("sword", 1));
    }

    #[test]
    fn reversals_revoke_whatever_else_was_seen() {
        let refund = |status: Option<&str>| {
            let data = match status {
                Some(s) => json!({"paymentId": "p1", "status": s}),
                None => json!({"paymentId": "p1"}),
            };
            body("Refund", data)
        };
        assert_eq!(grants(&[sword(), refund(None)]), []);
        assert_eq!(grants(&[sword(), refund(Some("Pending"))]), []);
        assert_eq!(
            grants(&[sword(), refund(Some("Failed"))]),
            one("sword", 1),
            "a failed refund reverses nothing"
        );
        assert_eq!(grants(&[sword(), body("Refund Complete", json!({}))]), []);
        assert_eq!(grants(&[sword(), body("ACH Returned", json!({}))]), []);
        assert_eq!(grants(&[sword(), body("ACH Chargeback", json!({}))]), []);
        assert_eq!(
            grants(&[sword(), body("Venmo Chargeback Lost", json!({}))]),
            []
        );
        assert_eq!(
            grants(&[
                sword(),
                chargeback("Opened", Some("a")),
                chargeback("Won", Some("a")),
                chargeback("Lost", Some("b")),
            ]),
            [],
            "a lost dispute reverses though another was won"
        );
        assert_eq!(
            grants(&[sword(), body("Card Payment Declined", json!({}))]),
            one("sword", 1)
        );
    }

    #[test]
    fn each_chargeback_id_is_its_own_dispute() {
        let s = sword;
        assert_eq!(grants(&[s(), chargeback("Opened", Some("a"))]), []);
        assert_eq!(
            grants(&[
                s(),
                chargeback("Opened", Some("a")),
                chargeback("Won", Some("a"))
            ]),
            one("sword", 1)
        );
        assert_eq!(
            grants(&[
                s(),
                chargeback("Opened", Some("a")),
                chargeback("Won", Some("a")),
                chargeback("Opened", Some("b")),
            ]),
            [],
            "a second dispute opened after a won one revokes again"
        );
        assert_eq!(
            grants(&[
                s(),
                chargeback("Opened", Some("a")),
                chargeback("Won", Some("b"))
            ]),
            [],
            "winning one dispute closes no other"
        );
        assert_eq!(
            grants(&[
                s(),
                chargeback("Opened", None),
                chargeback("Won", Some("a"))
            ]),
            [],
            "a chargeback without an id is the dispute \"\""
        );
        assert_eq!(
            grants(&[s(), chargeback("Opened", None), chargeback("Won", None)]),
            one("sword", 1)
        );
        assert_eq!(
            grants(&[s(), chargeback("Won", Some("a"))]),
            one("sword", 1),
            "a Won alone opens nothing"
        );
        assert_eq!(
            grants(&[
                chargeback("Opened", Some("a")),
                chargeback("Won", Some("a"))
            ]),
            [],
            "never settled"
        );
    }

    #[test]
    fn bodies_are_grouped_by_payment() {
        let other = String::from_utf8(sword()).unwrap().replace("p1", "p2");
        let refund_of_p2 = body("Refund", json!({"id": "rf-1", "paymentId": "p2"}));
        let got = expected_by_payment(&[sword(), other.into_bytes(), refund_of_p2], &catalog());
        assert_eq!(got.len(), 2);
        assert_eq!(got["p1"], Grants::from([("sword".to_owned(), 1)]));
        assert_eq!(got["p2"], Grants::new());
    }

    #[test]
    fn reads_the_example_catalog() {
        let c = ModelCatalog::example();
        assert_eq!(c.item_key, "item");
        assert_eq!(c.items["sword"].cents, 500);
        assert_eq!(c.items["starter-bundle"].grants.len(), 3);
    }
}
