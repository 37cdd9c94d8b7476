//! The internal gRPC API: paging, streaming, consumption and debt, bearer tokens, and
//! health during shutdown.

use std::time::Duration;

use coinflow_shared::proto::v1::fulfillment_client::FulfillmentClient;
use coinflow_shared::proto::v1::payer::Id as PayerId;
use coinflow_shared::proto::v1::{
    ConsumeRequest, GetEntitlementsRequest, LedgerEntry, ListLedgerRequest, Outcome, Payer,
    WatchEntitlementsRequest,
};
use coinflow_tests::TestDb;
use coinflow_tests::bodies::{event, settled, wallet_of};
use coinflow_tests::{FulfillmentHandle, Stack, channel, ingest, ingest_client};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn wallet(w: &str) -> Option<Payer> {
    Some(Payer {
        id: Some(PayerId::Wallet(w.into())),
    })
}

#[tokio::test]
async fn list_ledger_pages_newest_first_with_a_stable_cursor() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut q = stack.query().await;
    for i in 0..25 {
        ingest(&mut client, &settled(&format!("l-{i:02}"), "sword", 500)).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page =
            q.0.list_ledger(ListLedgerRequest {
                page_size: 10,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.entries.iter().map(|e| e.seq));
        if pages == 1 {
            // Entries committed while paging land on top, never inside later pages.
            for i in 25..30 {
                ingest(&mut client, &settled(&format!("l-{i:02}"), "sword", 500)).await;
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25, "each of the first 25 entries exactly once");
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seen:?}"
    );

    // The payer filter (the others: below).
    let by_payer =
        q.0.list_ledger(ListLedgerRequest {
            payer: wallet(&wallet_of("l-03")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_payer.entries.len(), 1);
    assert_eq!(by_payer.entries[0].payment_id, "l-03");
    let bad =
        q.0.list_ledger(ListLedgerRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("page_token"));
}

/// (payment, kind, sku, quantity) of `entries`, sorted.
fn described(entries: &[LedgerEntry]) -> Vec<(String, String, String, i64)> {
    let mut d: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.payment_id.clone(),
                e.kind.clone(),
                e.sku.clone(),
                e.quantity,
            )
        })
        .collect();
    d.sort();
    d
}

fn entry(payment: &str, kind: &str, sku: &str, quantity: i64) -> (String, String, String, i64) {
    (payment.into(), kind.into(), sku.into(), quantity)
}

/// Each filter of `ListLedger` over mixed data (several skus, bundles, a revocation, two
/// periods) returns exactly the entries it names: a non-empty strict subset, nothing it
/// excludes.
#[tokio::test]
async fn list_ledger_filters_include_what_they_name_and_exclude_the_rest() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let q = stack.query().await;
    let list = |request: ListLedgerRequest| {
        let mut client = q.0.clone();
        async move {
            let page = client
                .list_ledger(ListLedgerRequest {
                    page_size: 1000,
                    ..request
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.next_page_token.is_empty(), "one page holds it all");
            page.entries
        }
    };
    // Before the boundary: a sword, a bundle (sword, shield, credits), a shield.
    for (payment, item, cents) in [
        ("f-a-sword", "sword", 500),
        ("f-a-bundle", "starter-bundle", 1500),
        ("f-a-shield", "shield", 700),
    ] {
        let ack = ingest(&mut client, &settled(payment, item, cents)).await;
        assert_eq!(ack.outcome, Outcome::Granted as i32, "{payment}");
    }
    // Time apart, so the boundary falls strictly between the two periods.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let boundary = prost_types::Timestamp::from(std::time::SystemTime::now());
    tokio::time::sleep(Duration::from_millis(20)).await;
    // After it: a sword, a shield, credits, and the refund of the earlier shield.
    for (payment, item, cents) in [
        ("f-b-sword", "sword", 500),
        ("f-b-shield", "shield", 700),
        ("f-b-credits", "credits-1000", 1000),
    ] {
        let ack = ingest(&mut client, &settled(payment, item, cents)).await;
        assert_eq!(ack.outcome, Outcome::Granted as i32, "{payment}");
    }
    let refund = event(
        "Refund",
        "f-a-shield",
        "shield",
        700,
        "2026-11-22T09:00:00Z",
    );
    assert_eq!(
        ingest(&mut client, &refund).await.outcome,
        Outcome::Revoked as i32
    );

    let all = list(ListLedgerRequest::default()).await;
    let before = vec![
        entry("f-a-bundle", "grant", "credits", 500),
        entry("f-a-bundle", "grant", "shield", 1),
        entry("f-a-bundle", "grant", "sword", 1),
        entry("f-a-shield", "grant", "shield", 1),
        entry("f-a-sword", "grant", "sword", 1),
    ];
    let after = vec![
        entry("f-a-shield", "revoke", "shield", -1),
        entry("f-b-credits", "grant", "credits", 1000),
        entry("f-b-shield", "grant", "shield", 1),
        entry("f-b-sword", "grant", "sword", 1),
    ];
    let mut everything = [before.clone(), after.clone()].concat();
    everything.sort();
    assert_eq!(described(&all), everything);

    // sku: every shield entry (the bundle's and the revocation included), nothing else.
    let shields = list(ListLedgerRequest {
        sku: Some("shield".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        described(&shields),
        [
            entry("f-a-bundle", "grant", "shield", 1),
            entry("f-a-shield", "grant", "shield", 1),
            entry("f-a-shield", "revoke", "shield", -1),
            entry("f-b-shield", "grant", "shield", 1),
        ]
    );
    // since: at or after the boundary; until: before it.
    let since = list(ListLedgerRequest {
        since: Some(boundary),
        ..Default::default()
    })
    .await;
    assert_eq!(described(&since), after, "since");
    let until = list(ListLedgerRequest {
        until: Some(boundary),
        ..Default::default()
    })
    .await;
    assert_eq!(described(&until), before, "until");
    // Filters combine.
    let late_shields = list(ListLedgerRequest {
        sku: Some("shield".into()),
        since: Some(boundary),
        ..Default::default()
    })
    .await;
    assert_eq!(
        described(&late_shields),
        [
            entry("f-a-shield", "revoke", "shield", -1),
            entry("f-b-shield", "grant", "shield", 1),
        ]
    );
    let one_payment = list(ListLedgerRequest {
        payment_id: Some("f-a-shield".into()),
        until: Some(boundary),
        ..Default::default()
    })
    .await;
    assert_eq!(
        described(&one_payment),
        [entry("f-a-shield", "grant", "shield", 1)]
    );
    // At an entry's own `recorded_at`: `since` includes it, `until` excludes it.
    let mut by_time: Vec<&LedgerEntry> = all.iter().collect();
    by_time.sort_by_key(|e| e.seq);
    let pivot = by_time
        .iter()
        .position(|e| e.payment_id == "f-b-shield")
        .unwrap();
    let at = by_time[pivot].recorded_at.unwrap();
    let micros = |t: &prost_types::Timestamp| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000;
    let at_or_after: Vec<i64> = by_time
        .iter()
        .filter(|e| micros(e.recorded_at.as_ref().unwrap()) >= micros(&at))
        .map(|e| e.seq)
        .collect();
    assert!(at_or_after.contains(&by_time[pivot].seq));
    assert!(at_or_after.len() < all.len());
    let seqs = |entries: Vec<LedgerEntry>| {
        let mut s: Vec<i64> = entries.iter().map(|e| e.seq).collect();
        s.sort();
        s
    };
    let since_at = list(ListLedgerRequest {
        since: Some(at),
        ..Default::default()
    })
    .await;
    assert_eq!(seqs(since_at), at_or_after, "since is inclusive");
    let until_at = seqs(
        list(ListLedgerRequest {
            until: Some(at),
            ..Default::default()
        })
        .await,
    );
    assert!(
        !until_at.contains(&by_time[pivot].seq),
        "until is exclusive"
    );
    assert_eq!(
        until_at.len() + at_or_after.len(),
        all.len(),
        "until and since at one instant split the ledger"
    );
}

async fn next_n(
    stream: &mut tonic::Streaming<coinflow_shared::proto::v1::LedgerEntry>,
    n: usize,
) -> Vec<coinflow_shared::proto::v1::LedgerEntry> {
    let mut got = Vec::new();
    for _ in 0..n {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        got.push(next.unwrap().unwrap().unwrap());
    }
    got
}

/// An interceptor that presents `token`.
fn presenting(
    token: &str,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", value.clone());
        Ok(r)
    }
}

#[tokio::test]
async fn watch_streams_new_grants_and_resumes_from_a_cursor() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut q = stack.query().await;
    let w = wallet_of("w-1");
    let request = |after_seq| WatchEntitlementsRequest {
        payer: wallet(&w),
        after_seq,
    };

    let mut stream =
        q.0.watch_entitlements(request(0))
            .await
            .unwrap()
            .into_inner();
    ingest(&mut client, &settled("w-1", "starter-bundle", 1500)).await;
    ingest(&mut client, &settled("w-other", "sword", 500)).await; // another payer: filtered out
    let got = next_n(&mut stream, 3).await;
    assert!(got.iter().all(|e| e.wallet == w && e.kind == "grant"));
    let cursor = got.last().unwrap().seq;
    drop(stream); // the game server disconnects...

    ingest(
        &mut client,
        &event(
            "Refund",
            "w-1",
            "starter-bundle",
            1500,
            "2026-11-22T00:00:00Z",
        ),
    )
    .await;

    // ...and resumes from its cursor: it gets the revocations it missed, nothing twice.
    let mut stream =
        q.0.watch_entitlements(request(cursor))
            .await
            .unwrap()
            .into_inner();
    let missed = next_n(&mut stream, 3).await;
    assert!(missed.iter().all(|e| e.kind == "revoke" && e.seq > cursor));
    let quiet = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(quiet.is_err(), "nothing more: {quiet:?}");
}

#[tokio::test]
async fn consumption_is_idempotent_bounded_and_a_chargeback_after_spending_is_debt() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut q = stack.query().await;
    let p = "c-credits";
    ingest(&mut client, &settled(p, "credits-1000", 1000)).await;
    let spend = |key: &str, quantity| ConsumeRequest {
        payer: wallet(&wallet_of(p)),
        sku: "credits".into(),
        quantity,
        idempotency_key: key.into(),
    };

    let r =
        q.0.consume(spend("buy-potion-1", 800))
            .await
            .unwrap()
            .into_inner();
    assert_eq!((r.balance, r.duplicate), (200, false));
    assert_eq!(r.entry.as_ref().unwrap().kind, "consume");
    let again =
        q.0.consume(spend("buy-potion-1", 800))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        (again.balance, again.duplicate),
        (200, true),
        "a retried spend counts once"
    );
    let reused = q.0.consume(spend("buy-potion-1", 5)).await.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
    let over = q.0.consume(spend("buy-potion-2", 201)).await.unwrap_err();
    assert_eq!(over.code(), Code::FailedPrecondition);
    assert!(
        over.message().contains("insufficient"),
        "{}",
        over.message()
    );
    let mut not_consumable = spend("k", 1);
    not_consumable.sku = "sword".into();
    let e = q.0.consume(not_consumable).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("consumable"));
    assert_eq!(
        q.0.consume(spend("k", 0)).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // The payer spent 800 of 1000 credits; the chargeback takes back all 1000.
    ingest(
        &mut client,
        &event(
            "Card Payment Chargeback Opened",
            p,
            "credits-1000",
            1000,
            "2026-11-25T00:00:00Z",
        ),
    )
    .await;
    let ent =
        q.0.get_entitlements(GetEntitlementsRequest {
            payer: wallet(&wallet_of(p)),
        })
        .await
        .unwrap()
        .into_inner()
        .entitlements;
    assert_eq!(ent.len(), 1);
    assert_eq!(
        (ent[0].sku.as_str(), ent[0].quantity, ent[0].debt),
        ("credits", -800, true)
    );
}

#[tokio::test]
async fn callers_need_a_valid_bearer_token_and_ingest_has_its_own() {
    let stack = Stack::start().await;
    let ch = channel(stack.fulfillment.addr).await;
    let request = || GetEntitlementsRequest { payer: wallet("w") };

    let mut anonymous = FulfillmentClient::new(ch.clone());
    let e = anonymous.get_entitlements(request()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("Bearer"));

    let mut client = FulfillmentClient::with_interceptor(ch.clone(), presenting("wrong"));
    assert_eq!(
        client.get_entitlements(request()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // A valid token of another role is refused as such (see `roles` for every method).
    let mut as_ingest =
        FulfillmentClient::with_interceptor(ch.clone(), presenting(coinflow_tests::INGEST_TOKEN));
    assert_eq!(
        as_ingest
            .get_entitlements(request())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let mut ingest_as_api =
        coinflow_shared::proto::v1::ingest_client::IngestClient::with_interceptor(
            ch.clone(),
            presenting(coinflow_tests::API_TOKEN),
        );
    let e = ingest_as_api
        .deliver(coinflow_shared::proto::v1::DeliverRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Health stays open for probes.
    let mut health = HealthClient::new(ch);
    assert!(
        health
            .check(HealthCheckRequest {
                service: String::new()
            })
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_edge_without_the_ingest_token_gets_no_ack() {
    let stack = Stack::start_with(|c| {
        c.ingest_token = None;
        c.deliver_deadline_ms = 500;
    })
    .await;
    let a = coinflow_tests::http::Http::default()
        .deliver(&stack.edge.url(), settled("t-1", "sword", 500))
        .await;
    assert_eq!(
        a.status,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "our misconfiguration: Coinflow must retry"
    );
    let mut q = stack.query().await;
    assert_eq!(q.payment("t-1").await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn health_reports_not_serving_once_shutdown_begins() {
    let db = TestDb::new().await;
    let f = FulfillmentHandle::start(&db).await;
    let mut health = HealthClient::new(channel(f.addr).await);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: "coinflow.fulfillment.v1.Ingest".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updates.next().await.unwrap().unwrap().status, 1, "SERVING");
    f.shutdown.cancel();
    let next = tokio::time::timeout(Duration::from_secs(10), updates.next())
        .await
        .unwrap();
    assert_eq!(next.unwrap().unwrap().status, 2, "NOT_SERVING");
}

#[tokio::test]
async fn watch_streams_are_capped_per_replica_and_a_closed_one_frees_its_slot() {
    let db = TestDb::new().await;
    let f = FulfillmentHandle::start_with(&db, |c| c.max_watch_streams = 2).await;
    let mut q = coinflow_tests::Query::connect(f.addr).await;
    let request = || WatchEntitlementsRequest {
        payer: wallet("w"),
        after_seq: 0,
    };
    let first = q.0.watch_entitlements(request()).await.unwrap();
    let _second = q.0.watch_entitlements(request()).await.unwrap();
    let e = q.0.watch_entitlements(request()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    drop(first);
    // The stream's task notices the closed stream at its next wake-up (a commit or the
    // 1 s poll) and gives its slot back.
    let mut reopened = None;
    for _ in 0..50 {
        match q.0.watch_entitlements(request()).await {
            Ok(stream) => {
                reopened = Some(stream);
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reopened.is_some(), "the closed stream's slot came back");
    f.stop().await;
}

#[tokio::test]
async fn the_request_timeout_bounds_calls_but_not_a_watch_stream() {
    let db = TestDb::new().await;
    let f = FulfillmentHandle::start_with(&db, |c| c.request_timeout_secs = 1).await;
    let mut q = coinflow_tests::Query::connect(f.addr).await;
    let mut client = ingest_client(f.addr).await;
    let mut stream =
        q.0.watch_entitlements(WatchEntitlementsRequest {
            payer: wallet(&wallet_of("t-watch")),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // Past the timeout, the stream is still open and still delivers.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ingest(&mut client, &settled("t-watch", "sword", 500)).await;
    let entry = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream delivers")
        .expect("the stream is open")
        .expect("no error");
    assert_eq!(entry.kind, "grant");
    f.stop().await;
}
