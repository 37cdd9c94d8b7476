//! Any arrival order, any duplicates: a payment ends in the same state with the same net
//! grants. Run against the real service over gRPC.

use coinflow_shared::proto::v1::Outcome;
use coinflow_tests::TestDb;
use std::collections::BTreeSet;

use coinflow_tests::bodies::{chargeback, event, fixture, settled, wallet_of};
use coinflow_tests::http::Http;
use coinflow_tests::{FulfillmentHandle, Query, Stack, ingest, ingest_client};
use fulfillment_svc::lifecycle::ChargebackPolicy;
use http::StatusCode;
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use proptest::test_runner::{Config, TestRunner};

const OPENED: &str = "Card Payment Chargeback Opened";
const WON: &str = "Card Payment Chargeback Won";
const LOST: &str = "Card Payment Chargeback Lost";

/// The events one payment can see (type, `created`, `chargebackId`): two distinct Settled
/// deliveries, and chargebacks of three disputes (`cb1`, `cb2`, and one sent without an id).
const UNIVERSE: [(&str, &str, Option<&str>); 13] = [
    ("Card Payment Authorized", "2026-11-20T17:00:00.000Z", None),
    ("Payment Pending Review", "2026-11-20T17:00:30.000Z", None),
    ("Settled", "2026-11-20T17:01:00.000Z", None),
    ("Settled", "2026-11-20T18:01:00.000Z", None),
    (OPENED, "2026-11-25T10:00:00.000Z", Some("cb1")),
    (WON, "2026-12-05T10:00:00.000Z", Some("cb1")),
    (OPENED, "2026-12-10T10:00:00.000Z", Some("cb2")),
    (WON, "2026-12-20T10:00:00.000Z", Some("cb2")),
    (LOST, "2026-12-06T10:00:00.000Z", Some("cb2")),
    (OPENED, "2026-12-11T10:00:00.000Z", None),
    (WON, "2026-12-21T10:00:00.000Z", None),
    ("Refund", "2026-11-22T09:00:00.000Z", None),
    ("Card Payment Declined", "2026-11-20T16:59:00.000Z", None),
];

/// The state and whether the grant stands (revoke-on-open), from the set of events as the
/// README's money rules state them: each chargeback id is its own dispute, open once
/// opened and until won; a lost one reverses.
fn expected(set: &BTreeSet<(&str, Option<&str>)>) -> (&'static str, bool) {
    let has = |t: &str| set.iter().any(|(s, _)| *s == t);
    let ids = [Some("cb1"), Some("cb2"), None];
    let open = ids
        .iter()
        .any(|&id| set.contains(&(OPENED, id)) && !set.contains(&(WON, id)));
    let disputes = ids
        .iter()
        .any(|&id| set.contains(&(OPENED, id)) || set.contains(&(WON, id)));
    let reversed = has("Refund") || has(LOST);
    let state = if reversed {
        "reversed"
    } else if open {
        "disputed"
    } else if disputes {
        "restored"
    } else if has("Settled") {
        "settled"
    } else if has("Card Payment Declined") {
        "failed"
    } else if has("Card Payment Authorized") || has("Payment Pending Review") {
        "pending"
    } else {
        "unknown"
    };
    (state, has("Settled") && !reversed && !open)
}

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
                        let (event_type, created, id) = UNIVERSE[i];
                        let body =
                            chargeback(event_type, &payment, "starter-bundle", 1500, created, id);
                        ingest(&mut client, &body).await;
                    }
                    let state = query.payment(&payment).await.unwrap().state;
                    results.push((state, query.wallet(&wallet_of(&payment)).await));
                }
                results
            });
            let set: BTreeSet<_> = a.iter().map(|&i| (UNIVERSE[i].0, UNIVERSE[i].2)).collect();
            prop_assert_eq!(&results[0], &results[1], "orders {:?} and {:?}", a, b);
            // And what the set calls for, whatever the order.
            let (state, entitled) = expected(&set);
            prop_assert_eq!(results[0].0.as_str(), state, "{:?}", set);
            let granted = !results[0].1.is_empty();
            prop_assert_eq!(granted, entitled, "{:?}", set);
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

/// Each chargeback id is its own dispute: a second dispute opened after the first was won
/// revokes again (revoke-on-open), in whatever order the four events arrive, and winning it
/// restores the grant.
#[tokio::test]
async fn a_second_dispute_after_a_won_one_revokes_again_until_it_is_won_too() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut q = stack.query().await;
    let events = [
        ("Settled", "2026-11-20T17:06:05.177Z", None),
        (OPENED, "2026-11-25T10:00:00.000Z", Some("cb1")),
        (WON, "2026-12-05T10:00:00.000Z", Some("cb1")),
        (OPENED, "2026-12-10T10:00:00.000Z", Some("cb2")),
    ];
    let orders = permutations(&[0, 1, 2, 3]);
    assert_eq!(orders.len(), 24);
    for (n, order) in orders.iter().enumerate() {
        let p = format!("two-disputes-{n}");
        for &i in order {
            let (event_type, created, id) = events[i];
            ingest(
                &mut client,
                &chargeback(event_type, &p, "sword", 500, created, id),
            )
            .await;
        }
        let payment = q.payment(&p).await.unwrap();
        assert_eq!(payment.state, "disputed", "{order:?}");
        assert!(
            q.wallet(&wallet_of(&p)).await.is_empty(),
            "revoked: {order:?}"
        );
        assert_eq!(
            payment.ledger.iter().map(|e| e.quantity).sum::<i64>(),
            0,
            "{order:?}"
        );

        let won = ingest(
            &mut client,
            &chargeback(
                WON,
                &p,
                "sword",
                500,
                "2026-12-20T10:00:00.000Z",
                Some("cb2"),
            ),
        )
        .await;
        // Restored, or granted for the first time when no prefix of the order was ever
        // entitled (Settled arrived while a dispute was open, and stayed so).
        let outcome = if !payment.ledger.is_empty() {
            Outcome::Restored
        } else {
            Outcome::Granted
        };
        assert_eq!(won.outcome, outcome as i32, "{order:?}");
        assert_eq!(q.payment(&p).await.unwrap().state, "restored", "{order:?}");
        assert_eq!(
            q.wallet(&wallet_of(&p)).await,
            [("sword".to_owned(), 1)],
            "{order:?}"
        );
    }
}

/// Every order of `items`.
fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut all = Vec::new();
    for (i, &first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, first);
            all.push(tail);
        }
    }
    all
}
