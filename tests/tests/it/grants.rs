//! Grants through the whole path: once per payment, priced by the catalog.

use coinflow_shared::proto::v1::Outcome;
use coinflow_shared::proto::v1::payer::Id as Payer;
use coinflow_tests::Stack;
use coinflow_tests::bodies::{event, fixture, settled, wallet_of};
use coinflow_tests::http::Http;
use http::StatusCode;

#[tokio::test]
async fn a_settled_sword_is_granted_and_visible_by_wallet_and_user_id() {
    let stack = Stack::start().await;
    let a = Http::default()
        .deliver(&stack.edge.url(), fixture("settled-sword.json"))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let mut q = stack.query().await;
    assert_eq!(q.wallet("mygameʬuser-123").await, [("sword".to_owned(), 1)]);
    assert_eq!(
        q.entitlements(Payer::RawCustomerId("user-123".into()))
            .await,
        [("sword".to_owned(), 1)]
    );
    let p = q
        .payment("51e5ac49-d3ad-412c-afdb-acb1a5b50b3d")
        .await
        .unwrap();
    assert_eq!(p.state, "settled");
    assert_eq!(p.events.len(), 1);
    assert_eq!(p.events[0].outcome, Outcome::Granted as i32);
    assert_eq!(p.events[0].raw_body, fixture("settled-sword.json"));
    assert_eq!(p.ledger.len(), 1);
    assert_eq!(p.ledger[0].item, "sword");
    assert_eq!(p.ledger[0].kind, "grant");
}

#[tokio::test]
async fn stablecoin_credits_without_currency_are_granted() {
    let stack = Stack::start().await;
    let a = Http::default()
        .deliver(
            &stack.edge.url(),
            fixture("settled-credits-no-currency.json"),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let mut q = stack.query().await;
    assert_eq!(
        q.wallet("9ATzL5Tx3mC4n8bq1wJkPk6n").await,
        [("credits".to_owned(), 1000)]
    );
}

#[tokio::test]
async fn twenty_concurrent_copies_grant_once() {
    let stack = Stack::start().await;
    let body = settled("p-20", "starter-bundle", 1500);
    let url = stack.edge.url();
    let copies = (0..20).map(|_| {
        let (url, body) = (url.clone(), body.clone());
        tokio::spawn(async move { Http::default().deliver(&url, body).await.status })
    });
    for status in futures::future::join_all(copies).await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let mut q = stack.query().await;
    assert_eq!(
        q.wallet(&wallet_of("p-20")).await,
        [
            ("credits".to_owned(), 500),
            ("shield".to_owned(), 1),
            ("sword".to_owned(), 1)
        ]
    );
    let p = q.payment("p-20").await.unwrap();
    assert_eq!(p.events.len(), 1, "one transport identity, one event row");
    assert_eq!(p.ledger.len(), 3, "one bundle: three skus, once");
}

#[tokio::test]
async fn the_same_payment_with_another_created_grants_nothing_more() {
    let stack = Stack::start().await;
    let http = Http::default();
    let first = event(
        "Settled",
        "p-again",
        "sword",
        500,
        "2026-11-20T17:06:05.177Z",
    );
    let second = event(
        "Settled",
        "p-again",
        "sword",
        500,
        "2026-11-20T18:00:00.000Z",
    );
    assert_eq!(
        http.deliver(&stack.edge.url(), first).await.status,
        StatusCode::OK
    );
    assert_eq!(
        http.deliver(&stack.edge.url(), second).await.status,
        StatusCode::OK
    );
    let mut q = stack.query().await;
    assert_eq!(
        q.wallet(&wallet_of("p-again")).await,
        [("sword".to_owned(), 1)]
    );
    let p = q.payment("p-again").await.unwrap();
    let outcomes: Vec<_> = p.events.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        [Outcome::Granted as i32, Outcome::AlreadyGranted as i32]
    );
}

#[tokio::test]
async fn forged_webhook_info_is_held_and_grants_nothing() {
    let stack = Stack::start().await;
    let http = Http::default();
    // Paid 100 cents for a 500-cent sword.
    assert_eq!(
        http.deliver(&stack.edge.url(), settled("p-forged", "sword", 100))
            .await
            .status,
        StatusCode::OK
    );
    // An item the catalog doesn't sell.
    assert_eq!(
        http.deliver(&stack.edge.url(), settled("p-unknown", "god-mode", 100_000))
            .await
            .status,
        StatusCode::OK
    );
    // The right amount in the wrong currency.
    let eur = String::from_utf8(settled("p-eur", "sword", 500))
        .unwrap()
        .replace("USD", "EUR");
    assert_eq!(
        http.deliver(&stack.edge.url(), eur.into_bytes())
            .await
            .status,
        StatusCode::OK
    );

    let mut q = stack.query().await;
    for (payment, reason) in [
        ("p-forged", "underpaid"),
        ("p-unknown", "unknown_item"),
        ("p-eur", "currency_mismatch"),
    ] {
        assert!(q.wallet(&wallet_of(payment)).await.is_empty(), "{payment}");
        let p = q.payment(payment).await.unwrap();
        assert!(p.ledger.is_empty());
        assert_eq!(p.held_reason.as_deref(), Some(reason));
        assert_eq!(p.events[0].outcome, Outcome::Held as i32);
    }
}

#[tokio::test]
async fn non_granting_events_are_recorded_only() {
    let stack = Stack::start().await;
    let http = Http::default();
    for name in [
        "card-payment-authorized.json",
        "withdraw-pending.json",
        "refund.json",
        "chargeback-opened.json",
    ] {
        assert_eq!(
            http.deliver(&stack.edge.url(), fixture(name)).await.status,
            StatusCode::OK,
            "{name}"
        );
    }
    let unknown = br#"{"eventType":"Some Future Event","category":"Purchase","created":"c","data":{"id":"p-future"}}"#;
    assert_eq!(
        http.deliver(&stack.edge.url(), unknown.to_vec())
            .await
            .status,
        StatusCode::OK
    );
    let mut q = stack.query().await;
    assert!(q.wallet("mygameʬuser-123").await.is_empty());
    let p = q
        .payment("51e5ac49-d3ad-412c-afdb-acb1a5b50b3d")
        .await
        .unwrap();
    assert_eq!(p.events.len(), 3);
    assert!(
        p.events
            .iter()
            .all(|e| e.outcome == Outcome::Recorded as i32)
    );
    assert_eq!(p.state, "reversed");
    assert_eq!(q.payment("p-future").await.unwrap().state, "unknown");
}

#[tokio::test]
async fn query_errors_say_what_to_fix() {
    let stack = Stack::start().await;
    let mut q = stack.query().await;
    let e =
        q.0.get_entitlements(coinflow_shared::proto::v1::GetEntitlementsRequest { payer: None })
            .await
            .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("wallet"));
    use tonic_types::StatusExt;
    let details = e.get_error_details();
    let violation = &details.bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "payer");
    assert!(violation.description.contains("wallet or raw_customer_id"));
    assert_eq!(
        q.payment("").await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        q.payment("nope").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}

#[tokio::test]
async fn a_version_3_settled_without_a_wallet_is_granted_to_its_customer_then_charged_back() {
    let stack = Stack::start().await;
    let http = Http::default();
    let a = http
        .deliver(
            &stack.edge.url(),
            fixture("variants/v3-settled-no-wallet.json"),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let mut q = stack.query().await;
    let customer = || Payer::RawCustomerId("user-910".into());
    assert_eq!(q.entitlements(customer()).await, [("shield".to_owned(), 1)]);
    let p = q.payment("var-v3-1").await.unwrap();
    assert_eq!(p.raw_customer_id.as_deref(), Some("user-910"));
    assert_eq!(p.ledger[0].wallet, "", "no wallet was sent");
    let a = http
        .deliver(
            &stack.edge.url(),
            fixture("variants/v3-chargeback-opened.json"),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(q.entitlements(customer()).await.is_empty());
    assert_eq!(q.payment("var-v3-1").await.unwrap().state, "disputed");
}

#[tokio::test]
async fn a_currency_that_is_not_a_string_is_held_never_granted_on_cents_alone() {
    let stack = Stack::start().await;
    let http = Http::default();
    let mut q = stack.query().await;
    for (i, currency) in ["392", "null", "{\"code\":\"USD\"}", "[\"USD\"]"]
        .iter()
        .enumerate()
    {
        let id = format!("cur-{i}");
        let body = format!(
            r#"{{"eventType":"Settled","category":"Purchase","created":"2026-11-21T11:00:00.000Z","data":{{"id":"{id}","wallet":"w-{id}","webhookInfo":{{"item":"sword"}},"subtotal":{{"cents":500,"currency":{currency}}}}}}}"#
        );
        let a = http.deliver(&stack.edge.url(), body.into_bytes()).await;
        assert_eq!(a.status, StatusCode::OK, "{currency}");
        let p = q.payment(&id).await.unwrap();
        assert_eq!(p.events[0].outcome, Outcome::Held as i32, "{currency}");
        assert_eq!(
            p.held_reason.as_deref(),
            Some("missing_subtotal"),
            "{currency}"
        );
        assert!(q.wallet(&format!("w-{id}")).await.is_empty(), "{currency}");
    }
}
