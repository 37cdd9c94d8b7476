//! Any arrival order, any duplicates: a payment ends in the same state with the same net
//! grants. Run against the real service over gRPC.

use coinflow_shared::proto::v1::Outcome;
use coinflow_tests::TestDb;
use coinflow_tests::bodies::{event, fixture, settled, wallet_of};
use coinflow_tests::http::Http;
use coinflow_tests::{FulfillmentHandle, Query, Stack, ingest, ingest_client};
use fulfillment_svc::lifecycle::ChargebackPolicy;
use http::StatusCode;
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use proptest::test_runner::{Config, TestRunner};

/// The events one payment can see; two distinct Settled deliveries among them.
const UNIVERSE: [(&str, &str); 9] = [
    ("Card Payment Authorized", "2026-11-20T17:00:00.000Z"),
    ("Payment Pending Review", "2026-11-20T17:00:30.000Z"),
    ("Settled", "2026-11-20T17:01:00.000Z"),
    ("Settled", "2026-11-20T18:01:00.000Z"),
    ("Card Payment Chargeback Opened", "2026-11-25T10:00:00.000Z"),
    ("Card Payment Chargeback Won", "2026-12-05T10:00:00.000Z"),
    ("Card Payment Chargeback Lost", "2026-12-06T10:00:00.000Z"),
    ("Refund", "2026-11-22T09:00:00.000Z"),
    ("Card Payment Declined", "2026-11-20T16:59:00.000Z"),
];

/// One set of events, with some duplicated, in two independent orders.
fn two_orders() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    subsequence((0..UNIVERSE.len()).collect::<Vec<_>>(), 1..=UNIVERSE.len())
        .prop_flat_map(|set| {
            let dups = proptest::collection::vec(select(set.clone()), 0..4);
            (Just(set), dups)
        })
        .prop_flat_map(|(set, dups)| {
            let all = [set, dups].concat();
            (Just(all.clone()).prop_shuffle(), Just(all).prop_shuffle())
        })
}

#[test]
fn every_order_with_duplicates_ends_in_the_same_state_and_grants() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::new());
    let (client, query) = rt.block_on(async {
        let f = FulfillmentHandle::start(&db).await;
        let clients = (ingest_client(f.addr).await, Query::connect(f.addr).await);
        std::mem::forget(f); // serve for the whole test
        clients
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&two_orders(), |(a, b)| {
            let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (mut client, mut query) = (client.clone(), Query(query.0.clone()));
            let results = rt.block_on(async {
                let mut results = Vec::new();
                for (name, order) in [("a", &a), ("b", &b)] {
                    let payment = format!("prop-{case}-{name}");
                    for &i in order {
                        let (event_type, created) = UNIVERSE[i];
                        ingest(
                            &mut client,
                            &event(event_type, &payment, "starter-bundle", 1500, created),
                        )
                        .await;
                    }
                    let state = query.payment(&payment).await.unwrap().state;
                    results.push((state, query.wallet(&wallet_of(&payment)).await));
                }
                results
            });
            let set: std::collections::BTreeSet<_> = a.iter().map(|&i| UNIVERSE[i].0).collect();
            prop_assert_eq!(&results[0], &results[1], "orders {:?} and {:?}", a, b);
            // And what the set calls for, whatever the order.
            let granted = !results[0].1.is_empty();
            let reversed = set.contains("Refund") || set.contains("Card Payment Chargeback Lost");
            let disputed = set.contains("Card Payment Chargeback Opened")
                && !set.contains("Card Payment Chargeback Won");
            prop_assert_eq!(
                granted,
                set.contains("Settled") && !reversed && !disputed,
                "{:?}",
                set
            );
            if granted {
                prop_assert_eq!(
                    &results[0].1,
                    &vec![
                        ("credits".to_owned(), 500),
                        ("shield".to_owned(), 1),
                        ("sword".to_owned(), 1)
                    ]
                );
            }
            Ok(())
        })
        .unwrap();
}

#[tokio::test]
async fn a_refund_before_its_settled_leaves_it_reversed_with_nothing_granted() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let refund = ingest(
        &mut client,
        &event(
            "Refund",
            "p-early-refund",
            "sword",
            500,
            "2026-11-22T09:00:00Z",
        ),
    )
    .await;
    assert_eq!(refund.outcome, Outcome::Recorded as i32);
    let settled = ingest(&mut client, &settled("p-early-refund", "sword", 500)).await;
    assert_eq!(settled.outcome, Outcome::Recorded as i32);
    let mut q = stack.query().await;
    let p = q.payment("p-early-refund").await.unwrap();
    assert_eq!(p.state, "reversed");
    assert!(p.ledger.is_empty(), "nothing was ever granted");
    assert!(q.wallet(&wallet_of("p-early-refund")).await.is_empty());
}

#[tokio::test]
async fn a_late_authorized_never_moves_a_settled_payment_back() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    ingest(&mut client, &settled("p-late-auth", "sword", 500)).await;
    let late = ingest(
        &mut client,
        &event(
            "Card Payment Authorized",
            "p-late-auth",
            "sword",
            500,
            "2026-11-20T17:00:00Z",
        ),
    )
    .await;
    assert_eq!(late.outcome, Outcome::Recorded as i32);
    let mut q = stack.query().await;
    assert_eq!(q.payment("p-late-auth").await.unwrap().state, "settled");
    assert_eq!(
        q.wallet(&wallet_of("p-late-auth")).await,
        [("sword".to_owned(), 1)]
    );
}

#[tokio::test]
async fn chargeback_opened_revoked_won_restored_through_the_edge_in_list_ledger() {
    let stack = Stack::start().await;
    let http = Http::default();
    let url = stack.edge.url();
    let payment = "51e5ac49-d3ad-412c-afdb-acb1a5b50b3d";
    let wallet = "mygameʬuser-123";
    let mut q = stack.query().await;

    assert_eq!(
        http.deliver(&url, fixture("settled-sword.json"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(q.wallet(wallet).await, [("sword".to_owned(), 1)]);

    assert_eq!(
        http.deliver(&url, fixture("chargeback-opened.json"))
            .await
            .status,
        StatusCode::OK
    );
    assert!(
        q.wallet(wallet).await.is_empty(),
        "revoked when the chargeback opened"
    );
    assert_eq!(q.payment(payment).await.unwrap().state, "disputed");

    let won = String::from_utf8(fixture("chargeback-opened.json"))
        .unwrap()
        .replace("Chargeback Opened", "Chargeback Won")
        .replace("2026-11-27T14:02:11.004Z", "2026-12-08T10:00:00.000Z");
    assert_eq!(
        http.deliver(&url, won.into_bytes()).await.status,
        StatusCode::OK
    );
    assert_eq!(
        q.wallet(wallet).await,
        [("sword".to_owned(), 1)],
        "restored when it was won"
    );
    assert_eq!(q.payment(payment).await.unwrap().state, "restored");

    let page =
        q.0.list_ledger(coinflow_shared::proto::v1::ListLedgerRequest {
            payment_id: Some(payment.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let seen: Vec<_> = page
        .entries
        .iter()
        .map(|e| (e.kind.as_str(), e.sku.as_str(), e.quantity))
        .collect();
    assert_eq!(
        seen,
        [
            ("restore", "sword", 1),
            ("revoke", "sword", -1),
            ("grant", "sword", 1)
        ],
        "newest first"
    );
    assert!(
        page.entries
            .iter()
            .all(|e| e.actor == "coinflow" && e.catalog_version == "2026-11-28")
    );
}

#[tokio::test]
async fn hold_until_lost_keeps_the_grant_while_disputed() {
    let db = TestDb::new().await;
    let f = FulfillmentHandle::start_with(&db, |c| {
        c.chargeback_policy = ChargebackPolicy::HoldUntilLost;
    })
    .await;
    let mut client = ingest_client(f.addr).await;
    let mut q = Query::connect(f.addr).await;
    let p = "p-hold";
    ingest(&mut client, &settled(p, "sword", 500)).await;
    let opened = ingest(
        &mut client,
        &event(
            "Card Payment Chargeback Opened",
            p,
            "sword",
            500,
            "2026-11-25T00:00:00Z",
        ),
    )
    .await;
    assert_eq!(opened.outcome, Outcome::Recorded as i32);
    assert_eq!(q.wallet(&wallet_of(p)).await, [("sword".to_owned(), 1)]);
    let lost = ingest(
        &mut client,
        &event(
            "Card Payment Chargeback Lost",
            p,
            "sword",
            500,
            "2026-12-05T00:00:00Z",
        ),
    )
    .await;
    assert_eq!(lost.outcome, Outcome::Revoked as i32);
    assert!(q.wallet(&wallet_of(p)).await.is_empty());
}

#[tokio::test]
async fn repeated_partial_refunds_revoke_once() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let p = "p-partial";
    ingest(&mut client, &settled(p, "credits-1000", 1000)).await;
    let first = ingest(
        &mut client,
        &event("Refund", p, "credits-1000", 200, "2026-11-22T09:00:00Z"),
    )
    .await;
    assert_eq!(first.outcome, Outcome::Revoked as i32);
    let second = ingest(
        &mut client,
        &event("Refund", p, "credits-1000", 300, "2026-11-23T09:00:00Z"),
    )
    .await;
    assert_eq!(second.outcome, Outcome::Recorded as i32);
    let replay = ingest(
        &mut client,
        &event("Refund", p, "credits-1000", 200, "2026-11-22T09:00:00Z"),
    )
    .await;
    assert!(replay.duplicate);
    let mut q = stack.query().await;
    let ledger = q.payment(p).await.unwrap().ledger;
    assert_eq!(
        ledger.iter().map(|e| e.quantity).collect::<Vec<_>>(),
        [1000, -1000]
    );
}
