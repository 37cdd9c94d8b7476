//! Any arrival order, any duplicates: a payment ends in the same state with the same net
//! grants. Run against the real service over gRPC.

use coinflow_shared::proto::v1::Outcome;
use coinflow_tests::TestDb;
use std::collections::BTreeSet;

use coinflow_tests::bodies::{chargeback, event, fixture, settled, wallet_of};
use coinflow_tests::http::Http;
use coinflow_tests::model::{self, ModelCatalog};
use coinflow_tests::{FulfillmentHandle, IngestClient, Query, Stack, ingest, ingest_client};
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

/// The state, from the set of events as the README's money rules state them: each
/// chargeback id is its own dispute, open once opened and until won; a lost one reverses.
/// (What the payment must hold comes from the harness's model, [`model::expected_grants`].)
fn expected(set: &BTreeSet<(&str, Option<&str>)>) -> &'static str {
    let has = |t: &str| set.iter().any(|(s, _)| *s == t);
    let ids = [Some("cb1"), Some("cb2"), None];
    let open = ids
        .iter()
        .any(|&id| set.contains(&(OPENED, id)) && !set.contains(&(WON, id)));
    let disputes = ids
        .iter()
        .any(|&id| set.contains(&(OPENED, id)) || set.contains(&(WON, id)));
    let reversed = has("Refund") || has(LOST);
    if reversed {
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
    }
}

/// The body of `UNIVERSE[i]` for `payment`.
fn body_of(payment: &str, i: usize) -> Vec<u8> {
    let (event_type, created, id) = UNIVERSE[i];
    chargeback(event_type, payment, "starter-bundle", 1500, created, id)
}

/// Delivers `order` (indices into [`UNIVERSE`]) to `payment` over gRPC, one after the
/// other; returns its state and its payer's net grants.
async fn deliver_order(
    mut client: IngestClient,
    mut query: Query,
    payment: String,
    order: Vec<usize>,
) -> (String, Vec<(String, i64)>) {
    for &i in &order {
        ingest(&mut client, &body_of(&payment, i)).await;
    }
    let state = query.payment(&payment).await.unwrap().state;
    (state, query.wallet(&wallet_of(&payment)).await)
}

/// What a payment that saw the events `order` must end with: (state, net grants sorted by
/// sku), from [`expected`] and the harness's model.
fn called_for(payment: &str, order: &[usize]) -> (String, Vec<(String, i64)>) {
    let set: BTreeSet<_> = order
        .iter()
        .map(|&i| (UNIVERSE[i].0, UNIVERSE[i].2))
        .collect();
    let bodies: Vec<Vec<u8>> = order.iter().map(|&i| body_of(payment, i)).collect();
    let grants = model::expected_grants(&bodies, &ModelCatalog::example());
    (expected(&set).to_owned(), grants.into_iter().collect())
}

/// Delivers every distinct order of `deliveries` (indices into [`UNIVERSE`], one of them
/// repeated: a duplicate), each to its own payment, concurrently; each must end in what the
/// set calls for. Returns how many orders were delivered.
async fn deliver_every_order(
    client: &IngestClient,
    query: &Query,
    name: &str,
    deliveries: &[usize],
) -> usize {
    let orders: BTreeSet<Vec<usize>> = permutations(deliveries).into_iter().collect();
    let runs = orders.iter().enumerate().map(|(n, order)| {
        let payment = format!("perm-{name}-{n}");
        let run = deliver_order(
            client.clone(),
            Query(query.0.clone()),
            payment.clone(),
            order.clone(),
        );
        async move { (payment, order, run.await) }
    });
    let results = futures::future::join_all(runs).await;
    for (payment, order, got) in &results {
        assert_eq!(
            got,
            &called_for(payment, order),
            "{name}: the order {:?}",
            order.iter().map(|&i| UNIVERSE[i]).collect::<Vec<_>>()
        );
    }
    results.len()
}

/// Sets of four distinct events, plus a duplicate of one (the first listed), picked for the
/// rules they exercise: several disputes, a dispute sent without an id, a Won without its
/// Opened, refunds and losses against won disputes, two distinct Settled deliveries, late
/// and failed events. Indices into [`UNIVERSE`].
const SMALL_SETS: [[usize; 4]; 12] = [
    [2, 4, 5, 6],   // a second dispute opened after the first was won
    [5, 2, 4, 8],   // a won dispute, then another lost
    [11, 2, 4, 5],  // a refund, and a won dispute
    [9, 2, 10, 5],  // the dispute without an id, won; a Won of cb1 alone
    [9, 2, 5, 0],   // the dispute without an id stays open
    [2, 0, 3, 12],  // two Settled, a late Authorized and a Declined
    [11, 12, 0, 1], // a refund of a payment never settled
    [7, 2, 6, 9],   // cb2 won, the dispute without an id open
    [4, 5, 6, 7],   // two disputes won, never settled
    [2, 4, 6, 5],   // two disputes opened, one won
    [2, 8, 7, 6],   // a dispute lost and won
    [2, 3, 9, 10],  // two Settled, a dispute without an id won
];

/// Every permutation, exhaustively, of small sets: four distinct events and a duplicate
/// (five deliveries, 60 distinct orders each), the hand-picked [`SMALL_SETS`] and random
/// ones of two to four events.
#[test]
fn every_order_of_small_sets_with_a_duplicate_ends_in_what_the_set_calls_for() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::new());
    let (client, query) = rt.block_on(async {
        let f = FulfillmentHandle::start(&db).await;
        let clients = (ingest_client(f.addr).await, Query::connect(f.addr).await);
        std::mem::forget(f); // serve for the whole test
        clients
    });
    let mut delivered = 0;
    for (n, set) in SMALL_SETS.iter().enumerate() {
        let deliveries = [&set[..], &set[..1]].concat();
        delivered += rt.block_on(deliver_every_order(
            &client,
            &query,
            &format!("set{n}"),
            &deliveries,
        ));
    }
    assert_eq!(delivered, SMALL_SETS.len() * 60, "every order of each set");

    let small_set_and_a_duplicate = subsequence((0..UNIVERSE.len()).collect::<Vec<_>>(), 2..=4)
        .prop_flat_map(|set| {
            let dup = select(set.clone());
            (Just(set), dup)
        });
    let case = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 8,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&small_set_and_a_duplicate, |(set, dup)| {
            let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let deliveries = [set, vec![dup]].concat();
            rt.block_on(deliver_every_order(
                &client,
                &query,
                &format!("random{case}"),
                &deliveries,
            ));
            Ok(())
        })
        .unwrap();
}

/// One larger set of events (five or more; smaller ones are delivered in every order
/// above), with some duplicated, in two independent random orders.
fn two_orders() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    subsequence((0..UNIVERSE.len()).collect::<Vec<_>>(), 5..=UNIVERSE.len())
        .prop_flat_map(|set| {
            let dups = proptest::collection::vec(select(set.clone()), 0..4);
            (Just(set), dups)
        })
        .prop_flat_map(|(set, dups)| {
            let all = [set, dups].concat();
            (Just(all.clone()).prop_shuffle(), Just(all).prop_shuffle())
        })
}

/// Random orders of larger sets: two random orders of each, with duplicates.
#[test]
fn random_orders_of_larger_sets_with_duplicates_end_in_the_same_state_and_grants() {
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
            let results = rt.block_on(async {
                let mut results = Vec::new();
                for (name, order) in [("a", &a), ("b", &b)] {
                    let payment = format!("prop-{case}-{name}");
                    let got = deliver_order(
                        client.clone(),
                        Query(query.0.clone()),
                        payment,
                        order.clone(),
                    )
                    .await;
                    results.push(got);
                }
                results
            });
            prop_assert_eq!(&results[0], &results[1], "orders {:?} and {:?}", a, b);
            // And what the set calls for, whatever the order.
            prop_assert_eq!(
                &results[0],
                &called_for(&format!("prop-{case}-a"), &a),
                "{:?}",
                a
            );
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
