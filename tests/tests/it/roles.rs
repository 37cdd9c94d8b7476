//! Every caller has a role: the ingest, query and operator tokens each open their own
//! methods and nothing more, the ledger names the operator from the credential, and the
//! configuration refuses a token in two roles or an ingest role without one. Through the
//! real server over real gRPC.

use std::str::FromStr;

use coinflow_shared::proto::v1::resolve_held_request::{Approve, Resolution};
use coinflow_shared::proto::v1::{ListHeldRequest, ResolveHeldRequest};
use coinflow_tests::bodies::{settled, wallet_of};
use coinflow_tests::process::Proc;
use coinflow_tests::{
    API_TOKEN, FulfillmentHandle, INGEST_TOKEN, OPERATOR, OPERATOR_TOKEN, Stack, TestDb, channel,
    ingest, ingest_client, keys,
};
use http::uri::PathAndQuery;
use tonic::Code;

/// Calls `path` with an empty message and `token`; the code it answers.
async fn call(ch: &tonic::transport::Channel, path: &str, token: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = PathAndQuery::from_str(path).unwrap();
    if path.as_str().ends_with("/WatchEntitlements") {
        return match grpc.server_streaming(request, path, codec).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
    }
    match grpc.unary(request, path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn each_token_opens_its_roles_methods_and_no_other() {
    let stack = Stack::start().await;
    let ch = channel(stack.fulfillment.addr).await;
    let ingest_methods =
        ["Deliver", "DeliverBatch"].map(|m| format!("/coinflow.fulfillment.v1.Ingest/{m}"));
    let query_methods = [
        "GetEntitlements",
        "GetPayment",
        "ListLedger",
        "WatchEntitlements",
        "Consume",
    ]
    .map(|m| format!("/coinflow.fulfillment.v1.Fulfillment/{m}"));
    let operator_methods =
        ["ListHeld", "ResolveHeld"].map(|m| format!("/coinflow.fulfillment.v1.Fulfillment/{m}"));
    let roles = [
        (INGEST_TOKEN, &ingest_methods[..]),
        (API_TOKEN, &query_methods[..]),
        (OPERATOR_TOKEN, &operator_methods[..]),
    ];
    let all: Vec<&String> = roles.iter().flat_map(|(_, m)| m.iter()).collect();
    for (token, mine) in roles {
        for path in &all {
            let code = call(&ch, path, Some(token)).await;
            if mine.contains(path) {
                // Past auth: an empty request is the method's own business (it may well be
                // INVALID_ARGUMENT), never a refusal of the credential.
                assert!(
                    !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
                    "{token} on {path}: {code:?}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{token} on {path}");
            }
        }
    }
    for path in &all {
        assert_eq!(call(&ch, path, None).await, Code::Unauthenticated, "{path}");
        assert_eq!(
            call(&ch, path, Some("made-up")).await,
            Code::Unauthenticated,
            "{path}"
        );
    }
    // A path the server does not serve is refused whatever the credential.
    assert_eq!(
        call(
            &ch,
            "/coinflow.fulfillment.v1.Fulfillment/DropLedger",
            Some(OPERATOR_TOKEN)
        )
        .await,
        Code::PermissionDenied
    );
    // Health stays open for probes.
    assert_eq!(
        call(&ch, "/grpc.health.v1.Health/Check", None).await,
        Code::Ok
    );
}

fn approve(payment: &str, operator: &str) -> ResolveHeldRequest {
    ResolveHeldRequest {
        payment_id: payment.into(),
        operator: operator.into(),
        note: "checked the bank transfer".into(),
        resolution: Some(Resolution::Approve(Approve { item: None })),
    }
}

#[tokio::test]
async fn a_query_token_cannot_approve_a_held_payment_and_the_ledger_names_the_credential() {
    let stack = Stack::start().await;
    let mut client = ingest_client(stack.fulfillment.addr).await;
    ingest(&mut client, &settled("role-underpaid", "sword", 100)).await;
    let mut q = stack.query().await;

    // What a game server's token could do before: approve an underpaid payment.
    let e =
        q.0.resolve_held(approve("role-underpaid", ""))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = q.0.list_held(ListHeldRequest::default()).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "held payloads carry customer data"
    );
    assert!(q.wallet(&wallet_of("role-underpaid")).await.is_empty());

    // An operator cannot sign as someone else.
    let mut op = stack.operator().await;
    let e = op
        .resolve_held(approve("role-underpaid", "alice"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains(OPERATOR), "{}", e.message());
    assert!(q.wallet(&wallet_of("role-underpaid")).await.is_empty());

    // Their own name, or none, is recorded from the credential.
    let r = op
        .resolve_held(approve("role-underpaid", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.review, "approved");
    assert_eq!(r.entries[0].actor, format!("operator:{OPERATOR}"));
    let again = op
        .resolve_held(approve("role-underpaid", OPERATOR))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(
        q.wallet(&wallet_of("role-underpaid")).await,
        [("sword".to_owned(), 1)]
    );
}

#[tokio::test]
async fn two_operators_are_recorded_by_their_own_names() {
    let db = TestDb::new().await;
    let f = FulfillmentHandle::start_with(&db, |c| {
        c.operator_tokens = keys(&["alice:tok-alice", "bob:tok-bob"]);
    })
    .await;
    let mut client = ingest_client(f.addr).await;
    ingest(&mut client, &settled("role-a", "sword", 100)).await;
    ingest(&mut client, &settled("role-b", "sword", 100)).await;
    let ch = channel(f.addr).await;
    for (payment, name, token) in [
        ("role-a", "alice", "tok-alice"),
        ("role-b", "bob", "tok-bob"),
    ] {
        let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        let mut op =
            coinflow_shared::proto::v1::fulfillment_client::FulfillmentClient::with_interceptor(
                ch.clone(),
                move |mut r: tonic::Request<()>| {
                    r.metadata_mut().insert("authorization", value.clone());
                    Ok(r)
                },
            );
        let r = op
            .resolve_held(approve(payment, ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.entries[0].actor, format!("operator:{name}"));
    }
    f.stop().await;
}

#[tokio::test]
async fn credentials_that_break_the_roles_refuse_to_start() {
    let db = TestDb::new().await;
    let start = |tweak: fn(&mut fulfillment_svc::Config)| {
        let mut config = FulfillmentHandle::config(&db);
        tweak(&mut config);
        fulfillment_svc::Server::build(config)
    };
    let err = start(|c| c.api_tokens = keys(&[INGEST_TOKEN]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("ingest role") && err.contains("query role"),
        "{err}"
    );
    assert!(!err.contains(INGEST_TOKEN), "{err}");
    let err = start(|c| c.operator_tokens = keys(&["eve:test-api-token"]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("operator \"eve\""), "{err}");
    assert!(!err.contains(API_TOKEN), "{err}");
    let err = start(|c| c.ingest_tokens = keys(&[]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("FULFILLMENT_INGEST_TOKENS"), "{err}");
    let err = start(|c| c.operator_tokens = keys(&["no-separator-secret"]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("entry 1") && !err.contains("no-separator-secret"),
        "{err}"
    );
    let err = start(|c| c.allow_unauthenticated = true)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--allow-unauthenticated"), "{err}");
}

#[tokio::test]
async fn made_up_grpc_paths_do_not_grow_the_metrics() {
    // The real binary: it installs the meter provider that `/metrics` serves.
    let db = TestDb::new().await;
    let mut f = Proc::fulfillment(&db).await;
    let ch = channel(f.addr).await;
    for i in 0..3000 {
        let path = format!("/made.up.Service{i}/Method{i}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
        call(&ch, &path, Some(API_TOKEN)).await;
    }
    call(
        &ch,
        "/coinflow.fulfillment.v1.Fulfillment/GetPayment",
        Some(API_TOKEN),
    )
    .await;
    let metrics = coinflow_tests::http::Http::default()
        .get(&format!("http://{}/metrics", f.admin))
        .await;
    assert_eq!(metrics.status, http::StatusCode::OK);
    assert!(
        metrics.text.len() < 1024 * 1024,
        "/metrics is {} bytes",
        metrics.text.len()
    );
    assert!(
        !metrics.text.contains("made.up"),
        "a request path became a label"
    );
    let counted = |method: &str| {
        metrics.text.lines().any(|l| {
            l.starts_with("rpc_server_duration") && l.contains(&format!("rpc_method=\"{method}\""))
        })
    };
    assert!(
        counted("unknown"),
        "the made-up calls are counted under `unknown`"
    );
    assert!(counted("GetPayment"), "a served method keeps its name");
    assert!(f.terminate().await.success());
}

#[tokio::test]
async fn a_recovery_token_looks_up_and_ingests_and_does_nothing_else() {
    let db = TestDb::new().await;
    let f = FulfillmentHandle::start_with(&db, |c| {
        c.recovery_tokens = keys(&["test-recovery-token"]);
    })
    .await;
    let ch = channel(f.addr).await;
    let path = |service: &str, method: &str| format!("/coinflow.fulfillment.v1.{service}/{method}");
    for (service, method, allowed) in [
        ("Ingest", "Deliver", true),
        ("Ingest", "DeliverBatch", true),
        ("Fulfillment", "GetPayment", true),
        ("Fulfillment", "GetEvent", true),
        ("Fulfillment", "GetEntitlements", false),
        ("Fulfillment", "ListLedger", false),
        ("Fulfillment", "WatchEntitlements", false),
        ("Fulfillment", "Consume", false),
        ("Fulfillment", "ListHeld", false),
        ("Fulfillment", "ResolveHeld", false),
    ] {
        let code = call(&ch, &path(service, method), Some("test-recovery-token")).await;
        if allowed {
            assert!(
                !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
                "{method}: {code:?}"
            );
        } else {
            assert_eq!(code, Code::PermissionDenied, "{method}");
        }
    }
    f.stop().await;
}
