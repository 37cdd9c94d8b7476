//! Every body in `fixtures/` and `fixtures/variants/` through the real edge, with the
//! outcome it must have.

use std::time::SystemTime;

use bytes::Bytes;
use coinflow_shared::convert::from_body;
use coinflow_shared::envelope::Envelope;
use coinflow_shared::proto::v1::Outcome;
use coinflow_shared::proto::v1::payer::Id as Payer;
use coinflow_tests::http::Http;
use coinflow_tests::{Stack, fixtures_dir};
use http::StatusCode;

/// (file, outcome, held reason) for every fixture; the order is the delivery order.
const EXPECTED: &[(&str, Outcome, Option<&str>)] = &[
    ("card-payment-authorized.json", Outcome::Recorded, None),
    ("settled-sword.json", Outcome::Granted, None),
    ("settled-credits-no-currency.json", Outcome::Granted, None),
    // Refunds the sword granted just above.
    ("refund.json", Outcome::Revoked, None),
    ("chargeback-opened.json", Outcome::Recorded, None),
    ("withdraw-pending.json", Outcome::Recorded, None),
    ("variants/settled-bundle.json", Outcome::Granted, None),
    (
        "variants/settled-underpaid-forged-info.json",
        Outcome::Held,
        Some("underpaid"),
    ),
    (
        "variants/settled-wrong-currency.json",
        Outcome::Held,
        Some("currency_mismatch"),
    ),
    (
        "variants/settled-missing-webhook-info.json",
        Outcome::Held,
        Some("missing_webhook_info"),
    ),
    (
        "variants/settled-unknown-item.json",
        Outcome::Held,
        Some("unknown_item"),
    ),
    (
        "variants/settled-overpaid-nulls-lowercase-currency.json",
        Outcome::Granted,
        None,
    ),
    // A partial refund of the bundle: the policy revokes the whole grant.
    ("variants/refund-partial.json", Outcome::Revoked, None),
    (
        "variants/subscription-created.json",
        Outcome::Recorded,
        None,
    ),
    ("variants/unknown-event-type.json", Outcome::Recorded, None),
    (
        "variants/settled-currency-number.json",
        Outcome::Held,
        Some("missing_subtotal"),
    ),
    (
        "variants/settled-currency-null.json",
        Outcome::Held,
        Some("missing_subtotal"),
    ),
    ("variants/v3-settled-no-wallet.json", Outcome::Granted, None),
    ("variants/v3-chargeback-opened.json", Outcome::Revoked, None),
    // Refunds the credits payment above, named by paymentId, not the refund's own id.
    (
        "variants/refund-with-refund-id.json",
        Outcome::Revoked,
        None,
    ),
];

/// The name the events table stores an outcome under.
fn stored_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Unspecified => "unspecified",
        Outcome::Recorded => "recorded",
        Outcome::Granted => "granted",
        Outcome::Held => "held",
        Outcome::AlreadyGranted => "already_granted",
        Outcome::Revoked => "revoked",
        Outcome::Restored => "restored",
    }
}

#[test]
fn every_fixture_has_an_expectation() {
    let mut on_disk = Vec::new();
    for dir in ["", "variants/"] {
        for entry in std::fs::read_dir(fixtures_dir().join(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".json") && name != "signature-vector.json" {
                on_disk.push(format!("{dir}{name}"));
            }
        }
    }
    on_disk.sort();
    let mut expected: Vec<_> = EXPECTED.iter().map(|(f, ..)| (*f).to_owned()).collect();
    expected.sort();
    assert_eq!(on_disk, expected);
}

#[tokio::test]
async fn every_fixture_gets_its_outcome() {
    let stack = Stack::start().await;
    let http = Http::default();
    let mut q = stack.query().await;
    let mut without_payment = 0;
    for (file, outcome, reason) in EXPECTED {
        let body = std::fs::read(fixtures_dir().join(file)).unwrap();
        let a = http.deliver(&stack.edge.url(), body.clone()).await;
        assert_eq!(a.status, StatusCode::OK, "{file}: {}", a.json);
        // In storage, by transport identity: every fixture, with or without a payment.
        let key = from_body(Bytes::from(body.clone()), SystemTime::now()).event_key;
        assert_eq!(
            stack.db.event_outcome(&key).await,
            Some((stored_name(*outcome).to_owned(), reason.map(str::to_owned))),
            "{file} ({key}) in the events table"
        );
        let Some(payment_id) = Envelope::parse(&body).unwrap().payment_id() else {
            without_payment += 1;
            continue;
        };
        let p = q.payment(&payment_id).await.unwrap();
        let recorded = p
            .events
            .iter()
            .find(|e| e.raw_body == body)
            .unwrap_or_else(|| panic!("{file} not recorded"));
        assert_eq!(recorded.outcome, *outcome as i32, "{file}");
        assert_eq!(recorded.held_reason.as_deref(), *reason, "{file}");
    }
    assert!(
        without_payment > 0,
        "some fixtures name no payment, and were checked in storage only"
    );
    assert!(
        q.wallet("mygameʬuser-900").await.is_empty(),
        "the bundle was refunded"
    );
    assert!(
        q.wallet("mygameʬuser-123").await.is_empty(),
        "the sword was refunded"
    );
    assert!(
        q.wallet("9ATzL5Tx3mC4n8bq1wJkPk6n").await.is_empty(),
        "the credits were refunded by a refund carrying its own id"
    );
    assert!(q.wallet("mygameʬuser-906").await.is_empty());
    assert!(q.wallet("mygameʬuser-907").await.is_empty());
    assert!(
        q.entitlements(Payer::RawCustomerId("user-910".into()))
            .await
            .is_empty(),
        "the Version 3 payment was granted, then charged back"
    );
    assert_eq!(
        q.wallet("mygameʬuser-905").await,
        [("shield".to_owned(), 1)]
    );
    assert!(q.wallet("mygameʬuser-901").await.is_empty());
}
