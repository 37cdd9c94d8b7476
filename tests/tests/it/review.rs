//! The review queue over gRPC: list held payments, approve or reject, idempotent, audited.

use coinflow_shared::proto::v1::resolve_held_request::{Approve, Reject, Resolution};
use coinflow_shared::proto::v1::{ListHeldRequest, ResolveHeldRequest};
use coinflow_tests::bodies::{event, settled, wallet_of};
use coinflow_tests::{QueryClient, Stack, ingest, ingest_client};
use tonic::Code;

fn approve(payment: &str, item: Option<&str>) -> ResolveHeldRequest {
    ResolveHeldRequest {
        payment_id: payment.into(),
        operator: String::new(),
        note: "paid by bank transfer".into(),
        resolution: Some(Resolution::Approve(Approve {
            item: item.map(Into::into),
        })),
    }
}

fn reject(payment: &str) -> ResolveHeldRequest {
    ResolveHeldRequest {
        payment_id: payment.into(),
        operator: String::new(),
        note: "forged webhookInfo".into(),
        resolution: Some(Resolution::Reject(Reject {})),
    }
}

async fn held_ids(op: &mut QueryClient) -> Vec<(String, String)> {
    let r = op
        .list_held(ListHeldRequest::default())
        .await
        .unwrap()
        .into_inner();
    r.held
        .into_iter()
        .map(|h| (h.payment_id, h.held_reason))
        .collect()
}

#[tokio::test]
async fn held_payments_are_listed_with_reason_and_payload_then_resolved() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut q = stack.query().await;
    let mut op = stack.operator().await;
    let underpaid = settled("r-underpaid", "sword", 100);
    ingest(&mut client, &underpaid).await;
    ingest(&mut client, &settled("r-unknown", "dragon", 9999)).await;
    ingest(&mut client, &settled("r-fine", "sword", 500)).await;

    let listed = op
        .list_held(ListHeldRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.held.len(), 2);
    let first = &listed.held[0];
    assert_eq!(
        (first.payment_id.as_str(), first.held_reason.as_str()),
        ("r-underpaid", "underpaid")
    );
    assert_eq!(
        first.event.as_ref().unwrap().raw_body,
        underpaid,
        "the original payload"
    );
    assert_eq!(first.state, "settled");
    assert_eq!(
        first.wallet.as_deref(),
        Some(wallet_of("r-underpaid").as_str())
    );

    // Approve: granted as if it had matched, audited with the operator and note.
    let r = op
        .resolve_held(approve("r-underpaid", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.review.as_str(), r.duplicate), ("approved", false));
    assert_eq!(r.entries.len(), 1);
    assert_eq!(r.entries[0].actor, "operator:tester");
    assert_eq!(r.entries[0].note.as_deref(), Some("paid by bank transfer"));
    assert_eq!(
        q.wallet(&wallet_of("r-underpaid")).await,
        [("sword".to_owned(), 1)]
    );

    // Idempotent: the same resolution again changes nothing.
    let again = op
        .resolve_held(approve("r-underpaid", None))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate && again.entries.is_empty());
    assert_eq!(
        q.wallet(&wallet_of("r-underpaid")).await,
        [("sword".to_owned(), 1)]
    );
    // A different resolution is refused.
    let e = op.resolve_held(reject("r-underpaid")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("already approved"), "{}", e.message());

    // Reject: closed with no grant, audited in the ledger.
    let r = op
        .resolve_held(reject("r-unknown"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.review, "rejected");
    assert_eq!(
        (r.entries[0].kind.as_str(), r.entries[0].quantity),
        ("reject", 0)
    );
    assert_eq!(r.entries[0].actor, "operator:tester");
    assert!(q.wallet(&wallet_of("r-unknown")).await.is_empty());
    assert!(
        op.resolve_held(reject("r-unknown"))
            .await
            .unwrap()
            .into_inner()
            .duplicate
    );

    assert!(held_ids(&mut op).await.is_empty(), "the queue is empty");
    let p = q.payment("r-unknown").await.unwrap();
    assert_eq!(p.review.as_deref(), Some("rejected"));
    assert_eq!(p.held_reason, None);
}

#[tokio::test]
async fn approving_an_unknown_item_needs_an_item_from_the_catalog() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut q = stack.query().await;
    let mut op = stack.operator().await;
    ingest(&mut client, &settled("r-dragon", "dragon", 9999)).await;
    let e = op
        .resolve_held(approve("r-dragon", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("approve.item"), "{}", e.message());
    let e = op
        .resolve_held(approve("r-dragon", Some("nope")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let r = op
        .resolve_held(approve("r-dragon", Some("shield")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.entries[0].item, "shield");
    assert_eq!(
        q.wallet(&wallet_of("r-dragon")).await,
        [("shield".to_owned(), 1)]
    );
}

#[tokio::test]
async fn approval_respects_what_happened_to_the_payment_since() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut q = stack.query().await;
    let mut op = stack.operator().await;
    ingest(&mut client, &settled("r-refunded", "sword", 100)).await;
    ingest(
        &mut client,
        &event("Refund", "r-refunded", "sword", 100, "2026-11-22T00:00:00Z"),
    )
    .await;
    let r = op
        .resolve_held(approve("r-refunded", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.review, "approved");
    assert!(
        r.entries.is_empty(),
        "a refunded payment grants nothing even when approved"
    );
    assert!(q.wallet(&wallet_of("r-refunded")).await.is_empty());
}

#[tokio::test]
async fn resolving_what_is_not_held_says_so() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut op = stack.operator().await;
    ingest(&mut client, &settled("r-granted", "sword", 500)).await;
    let e = op
        .resolve_held(approve("r-granted", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("not held"));
    assert_eq!(
        op.resolve_held(approve("r-nothing", None))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let mut someone_else = approve("r-granted", None);
    someone_else.operator = "mallory".into();
    assert_eq!(
        op.resolve_held(someone_else).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let mut no_resolution = approve("r-granted", None);
    no_resolution.resolution = None;
    assert_eq!(
        op.resolve_held(no_resolution).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn a_matching_settled_after_a_held_one_grants_and_clears_the_hold() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut q = stack.query().await;
    let mut op = stack.operator().await;
    ingest(
        &mut client,
        &event("Settled", "r-second", "sword", 100, "2026-11-20T00:00:00Z"),
    )
    .await;
    assert_eq!(
        held_ids(&mut op).await,
        [("r-second".to_owned(), "underpaid".to_owned())]
    );
    ingest(
        &mut client,
        &event("Settled", "r-second", "sword", 500, "2026-11-20T01:00:00Z"),
    )
    .await;
    assert!(held_ids(&mut op).await.is_empty());
    assert_eq!(
        q.wallet(&wallet_of("r-second")).await,
        [("sword".to_owned(), 1)]
    );
}

#[tokio::test]
async fn list_held_pages_are_bounded_in_count_and_bytes() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    let mut op = stack.operator().await;
    // 120 small held payments and 20 of ~200 KiB each.
    for i in 0..120 {
        ingest(&mut client, &settled(&format!("page-{i:03}"), "sword", 1)).await;
    }
    let pad = "x".repeat(200 * 1024);
    for i in 0..20 {
        let body = format!(
            r#"{{"eventType":"Settled","category":"Purchase","created":"c","data":{{"id":"page-big-{i:02}","wallet":"w","webhookInfo":{{"item":"sword"}},"subtotal":{{"cents":1}},"pad":"{pad}"}}}}"#
        );
        ingest(&mut client, body.as_bytes()).await;
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = op
            .list_held(ListHeldRequest {
                page_size: 1000,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.held.len() <= 100, "{} on one page", page.held.len());
        let bytes: usize = page
            .held
            .iter()
            .map(|h| h.event.as_ref().unwrap().raw_body.len())
            .sum();
        assert!(
            page.held.len() == 1 || bytes <= 3 * 1024 * 1024,
            "{bytes} bytes of payloads on one page"
        );
        seen.extend(page.held.into_iter().map(|h| h.payment_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 140, "every held payment, once");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 140);
    assert!(pages >= 3, "{pages} pages");
}
