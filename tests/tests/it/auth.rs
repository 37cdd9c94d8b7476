//! Signature and Authorization modes, key rotation and stale timestamps, end to end.

use coinflow_tests::bodies::{fixture, now, sign_at};
use coinflow_tests::http::Http;
use coinflow_tests::{KEY, Stack, keys};
use http::StatusCode;
use webhook_edge::auth::AuthMode;

async fn post(stack: &Stack, headers: &[(&str, &str)]) -> StatusCode {
    Http::default()
        .post(&stack.edge.url(), headers, fixture("settled-sword.json"))
        .await
        .status
}

fn sig(key: &str, t: i64) -> String {
    sign_at(key, t, &fixture("settled-sword.json"))
}

#[tokio::test]
async fn any_mode_accepts_either_and_refuses_a_wrong_signature_even_with_authorization() {
    let stack = Stack::start().await;
    assert_eq!(
        post(&stack, &[("coinflow-signature", &sig(KEY, now()))]).await,
        StatusCode::OK
    );
    assert_eq!(
        post(&stack, &[("authorization", KEY)]).await,
        StatusCode::OK
    );
    assert_eq!(
        post(
            &stack,
            &[
                ("coinflow-signature", &sig("forged", now())),
                ("authorization", KEY)
            ]
        )
        .await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(&stack, &[("authorization", "wrong")]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(&stack, &[("authorization", &format!("Bearer {KEY}"))]).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn signature_mode_requires_the_signature() {
    let stack = Stack::start_with(|c| c.auth_mode = AuthMode::Signature).await;
    assert_eq!(
        post(&stack, &[("authorization", KEY)]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(&stack, &[("coinflow-signature", &sig(KEY, now()))]).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn authorization_mode_requires_the_header() {
    let stack = Stack::start_with(|c| c.auth_mode = AuthMode::Authorization).await;
    assert_eq!(
        post(&stack, &[("coinflow-signature", &sig(KEY, now()))]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(&stack, &[("authorization", KEY)]).await,
        StatusCode::OK
    );
    assert_eq!(
        post(
            &stack,
            &[
                ("authorization", KEY),
                ("coinflow-signature", &sig("forged", now()))
            ]
        )
        .await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn both_mode_requires_both() {
    let stack = Stack::start_with(|c| c.auth_mode = AuthMode::Both).await;
    assert_eq!(
        post(&stack, &[("authorization", KEY)]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(&stack, &[("coinflow-signature", &sig(KEY, now()))]).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(
            &stack,
            &[
                ("authorization", KEY),
                ("coinflow-signature", &sig(KEY, now()))
            ]
        )
        .await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn rotation_accepts_old_and_new_keys_and_nothing_else() {
    let stack = Stack::start_with(|c| c.keys = keys(&["key-old", "key-new"])).await;
    assert_eq!(
        post(&stack, &[("coinflow-signature", &sig("key-old", now()))]).await,
        StatusCode::OK
    );
    assert_eq!(
        post(&stack, &[("coinflow-signature", &sig("key-new", now()))]).await,
        StatusCode::OK
    );
    assert_eq!(
        post(&stack, &[("authorization", "key-old")]).await,
        StatusCode::OK
    );
    assert_eq!(
        post(&stack, &[("coinflow-signature", &sig(KEY, now()))]).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn stale_and_future_timestamps_are_refused() {
    // Outside the window and inside it by a clear margin, so the clock ticking between
    // signing and the edge's check cannot decide the answer.
    const TOLERANCE: i64 = 300;
    let stack = Stack::start_with(|c| c.signature_tolerance_secs = TOLERANCE).await;
    for t in [now() - (TOLERANCE + 30), now() + (TOLERANCE + 30), 0] {
        let a = Http::default()
            .post(
                &stack.edge.url(),
                &[("coinflow-signature", &sig(KEY, t))],
                fixture("settled-sword.json"),
            )
            .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "t={t}");
        assert!(
            a.json["error"].as_str().unwrap().contains("timestamp"),
            "{}",
            a.json
        );
    }
    for t in [now() - (TOLERANCE - 30), now() + (TOLERANCE - 30)] {
        assert_eq!(
            post(&stack, &[("coinflow-signature", &sig(KEY, t))]).await,
            StatusCode::OK,
            "t={t}"
        );
    }
}

#[tokio::test]
async fn a_signature_over_other_bytes_is_refused() {
    let stack = Stack::start().await;
    let mut body = fixture("settled-sword.json");
    let signature = sign_at(KEY, now(), &body);
    body.pop(); // drop the trailing newline: same JSON, different bytes
    let a = Http::default()
        .post(
            &stack.edge.url(),
            &[("coinflow-signature", &signature)],
            body,
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let mut q = stack.query().await;
    assert_eq!(
        q.payment("51e5ac49-d3ad-412c-afdb-acb1a5b50b3d")
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
}
