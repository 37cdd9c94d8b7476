//! One balance per person: once a payment's events name both a wallet and a
//! `rawCustomerId`, `Consume`, `GetEntitlements`, `ListLedger` and `WatchEntitlements`
//! see one account, whichever identity the caller names.

use std::time::Duration;

use coinflow_shared::proto::v1::payer::Id as PayerId;
use coinflow_shared::proto::v1::{
    ConsumeRequest, ConsumeResponse, LedgerEntry, ListLedgerRequest, Payer,
    WatchEntitlementsRequest,
};
use coinflow_tests::bodies::{customer_of, settled, wallet_of, with_data};
use coinflow_tests::http::Http;
use coinflow_tests::{QueryClient, Stack};
use http::StatusCode;
use tokio_stream::StreamExt;
use tonic::Code;

fn by_wallet(p: &str) -> PayerId {
    PayerId::Wallet(wallet_of(p))
}

fn by_customer(p: &str) -> PayerId {
    PayerId::RawCustomerId(customer_of(p))
}

fn credits(n: i64) -> Vec<(String, i64)> {
    vec![("credits".to_owned(), n)]
}

/// Delivers `body` signed through the edge.
async fn deliver(stack: &Stack, body: Vec<u8>) {
    let answer = Http::default().deliver(&stack.edge.url(), body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
}

/// 1,000 credits for payment `p`, whose Settled carries both `wallet` and
/// `rawCustomerId`.
async fn grant_credits(stack: &Stack, p: &str) {
    deliver(stack, settled(p, "credits-1000", 1000)).await;
}

async fn consume(
    client: &mut QueryClient,
    payer: PayerId,
    quantity: i64,
    key: &str,
) -> Result<ConsumeResponse, tonic::Status> {
    client
        .consume(ConsumeRequest {
            payer: Some(Payer { id: Some(payer) }),
            sku: "credits".into(),
            quantity,
            idempotency_key: key.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn assert_insufficient(e: &tonic::Status) {
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("insufficient balance"), "{e:?}");
}

#[tokio::test]
async fn spending_everything_through_one_identity_leaves_nothing_for_the_other() {
    let stack = Stack::start().await;
    let mut q = stack.query().await;
    let p = "acct-once";
    grant_credits(&stack, p).await;
    assert_eq!(q.entitlements(by_wallet(p)).await, credits(1000));
    assert_eq!(q.entitlements(by_customer(p)).await, credits(1000));

    let first = consume(&mut q.0, by_wallet(p), 1000, "spend-1")
        .await
        .unwrap();
    assert_eq!((first.balance, first.duplicate), (0, false));
    let second = consume(&mut q.0, by_customer(p), 1000, "spend-2")
        .await
        .unwrap_err();
    assert_insufficient(&second);
    assert!(q.entitlements(by_wallet(p)).await.is_empty());
    assert!(q.entitlements(by_customer(p)).await.is_empty());

    // A retry of the first spend through the other identity is the same spend.
    let retried = consume(&mut q.0, by_customer(p), 1000, "spend-1")
        .await
        .unwrap();
    assert!(retried.duplicate);
    assert_eq!(retried.entry.unwrap().seq, first.entry.unwrap().seq);
    // The other way round too: customer id first, then the wallet.
    let p = "acct-once-reversed";
    grant_credits(&stack, p).await;
    consume(&mut q.0, by_customer(p), 1000, "spend-3")
        .await
        .unwrap();
    assert_insufficient(
        &consume(&mut q.0, by_wallet(p), 1000, "spend-4")
            .await
            .unwrap_err(),
    );
}

#[tokio::test]
async fn a_spend_through_one_identity_shows_in_the_others_balance_and_history() {
    let stack = Stack::start().await;
    let mut q = stack.query().await;
    let p = "acct-history";
    grant_credits(&stack, p).await;
    let spent = consume(&mut q.0, by_customer(p), 300, "buy-1")
        .await
        .unwrap();
    assert_eq!(spent.balance, 700);
    assert_eq!(q.entitlements(by_wallet(p)).await, credits(700));
    let spent = consume(&mut q.0, by_wallet(p), 200, "buy-2").await.unwrap();
    assert_eq!(spent.balance, 500);
    assert_eq!(q.entitlements(by_customer(p)).await, credits(500));

    // ListLedger and WatchEntitlements show, through either identity, the entries that
    // make up that balance.
    for payer in [by_wallet(p), by_customer(p)] {
        let page =
            q.0.list_ledger(ListLedgerRequest {
                payer: Some(Payer {
                    id: Some(payer.clone()),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let seen: Vec<_> = page
            .entries
            .iter()
            .map(|e| (e.kind.as_str(), e.quantity))
            .collect();
        assert_eq!(
            seen,
            [("consume", -200), ("consume", -300), ("grant", 1000)],
            "{payer:?}"
        );
        let mut stream =
            q.0.watch_entitlements(WatchEntitlementsRequest {
                payer: Some(Payer { id: Some(payer) }),
                after_seq: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut watched: Vec<LedgerEntry> = Vec::new();
        for _ in 0..3 {
            let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
            watched.push(next.unwrap().unwrap().unwrap());
        }
        assert_eq!(watched.iter().map(|e| e.quantity).sum::<i64>(), 500);
    }
}

#[tokio::test]
async fn concurrent_spends_through_the_two_identities_never_both_succeed() {
    let stack = Stack::start().await;
    let (a, b) = (stack.query().await.0, stack.query().await.0);
    for round in 0..50 {
        let p = format!("acct-race-{round}");
        grant_credits(&stack, &p).await;
        let (mut a, mut b) = (a.clone(), b.clone());
        let (wallet, customer) = (by_wallet(&p), by_customer(&p));
        let through_wallet =
            tokio::spawn(
                async move { consume(&mut a, wallet, 1000, &format!("race-{round}-w")).await },
            );
        let through_customer = tokio::spawn(async move {
            consume(&mut b, customer, 1000, &format!("race-{round}-c")).await
        });
        let answers = [
            through_wallet.await.unwrap(),
            through_customer.await.unwrap(),
        ];
        let succeeded = answers.iter().filter(|a| a.is_ok()).count();
        assert_eq!(succeeded, 1, "round {round}: {answers:?}");
        for refused in answers.iter().filter_map(|a| a.as_ref().err()) {
            assert_insufficient(refused);
        }
        let mut q = stack.query().await;
        assert!(
            q.entitlements(by_wallet(&p)).await.is_empty(),
            "round {round}"
        );
        assert!(
            q.entitlements(by_customer(&p)).await.is_empty(),
            "round {round}"
        );
    }
}

#[tokio::test]
async fn identities_tied_through_any_payment_share_one_balance_and_empty_wallets_tie_nothing() {
    let stack = Stack::start().await;
    let mut q = stack.query().await;
    // Two wallets of one customer, each tied to it by a payment of its own.
    let first = settled("acct-w1", "credits-1000", 1000);
    deliver(
        &stack,
        with_data(&first, &[("rawCustomerId", "u-both".into())]),
    )
    .await;
    let second = settled("acct-w2", "credits-1000", 1000);
    deliver(
        &stack,
        with_data(&second, &[("rawCustomerId", "u-both".into())]),
    )
    .await;
    for payer in [
        by_wallet("acct-w1"),
        by_wallet("acct-w2"),
        PayerId::RawCustomerId("u-both".into()),
    ] {
        assert_eq!(
            q.entitlements(payer.clone()).await,
            credits(2000),
            "{payer:?}"
        );
    }
    consume(&mut q.0, by_wallet("acct-w1"), 1500, "both-1")
        .await
        .unwrap();
    assert_insufficient(
        &consume(&mut q.0, by_wallet("acct-w2"), 501, "both-2")
            .await
            .unwrap_err(),
    );
    assert_eq!(q.entitlements(by_wallet("acct-w2")).await, credits(500));

    // Version 3 payments carry no wallet: their ledger rows hold an empty one, which is
    // nobody's identity and ties these two customers to nothing.
    for p in ["acct-v3-a", "acct-v3-b"] {
        let body = settled(p, "credits-1000", 1000);
        deliver(
            &stack,
            with_data(&body, &[("wallet", serde_json::Value::Null)]),
        )
        .await;
    }
    consume(&mut q.0, by_customer("acct-v3-a"), 1000, "v3-a")
        .await
        .unwrap();
    assert!(q.entitlements(by_customer("acct-v3-a")).await.is_empty());
    assert_eq!(
        q.entitlements(by_customer("acct-v3-b")).await,
        credits(1000)
    );
}
