//! Every status the edge documents, each with its JSON body. After authentication the
//! only answer but 200 is 503.

use coinflow_shared::identity::body_key;
use coinflow_tests::bodies::{fixture, settled};
use coinflow_tests::http::Http;
use coinflow_tests::{EdgeHandle, Stack, edge_config, free_addr};
use http::{Method, StatusCode};
use tokio::net::TcpListener;

use crate::stub::{Answer, Stub};

/// A TCP peer that accepts connections, never answers, and says when it accepted one.
async fn silent_peer() -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<()>) {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let (accepted_tx, accepted_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
            let _ = accepted_tx.try_send(());
        }
    });
    (addr, accepted_rx)
}

#[tokio::test]
async fn ok_is_success_true() {
    let stack = Stack::start().await;
    let a = Http::default()
        .deliver(&stack.edge.url(), fixture("settled-sword.json"))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json, serde_json::json!({ "success": true }));
}

#[tokio::test]
async fn unauthorized_without_credentials() {
    let stack = Stack::start().await;
    let a = Http::default()
        .post(&stack.edge.url(), &[], fixture("settled-sword.json"))
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json["success"], false);
}

#[tokio::test]
async fn authenticated_bodies_that_are_not_envelopes_are_acked_and_held() {
    let stack = Stack::start().await;
    let http = Http::default();
    let bodies: [&[u8]; 9] = [
        b"{\"eventType\":\"Settled\"",
        b"not json",
        b"\xff\xfe\x00",
        br#"{"eventType":"Settled","category":"Purchase","created":"c"}"#,
        br#"{"category":"Purchase","created":"c","data":{"id":"p-bad"}}"#,
        br#"{"eventType":7,"category":"Purchase","created":"c","data":{"id":"p-bad"}}"#,
        br#"{"eventType":"Settled","category":"Purchase","created":"c","data":"x"}"#,
        br#"[]"#,
        br#"["Settled","Purchase","c",{}]"#,
    ];
    for body in bodies {
        let a = http.deliver(&stack.edge.url(), body.to_vec()).await;
        assert_eq!(a.status, StatusCode::OK, "{body:?}: {}", a.text);
        assert_eq!(a.json, serde_json::json!({ "success": true }));
        assert_eq!(
            stack.db.event_outcome(&body_key(body)).await,
            Some(("held".to_owned(), Some("unparseable".to_owned()))),
            "{body:?}"
        );
    }
    // The two that name a payment wait in its review, granting nothing.
    let payment = stack.query().await.payment("p-bad").await.unwrap();
    assert_eq!(payment.events.len(), 2);
    assert!(payment.ledger.is_empty());
    assert_eq!(payment.held_reason.as_deref(), Some("unparseable"));
}

#[tokio::test]
async fn a_refusal_by_ingest_after_authentication_is_503_never_400() {
    let stub = Stub::start(Answer::FailEach(tonic::Code::InvalidArgument), None).await;
    let edge = EdgeHandle::start(edge_config(stub.addr)).await;
    let a = Http::default()
        .deliver(&edge.url(), fixture("settled-sword.json"))
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert_eq!(a.headers["retry-after"], "5");
    assert_eq!(
        stub.calls().len(),
        1,
        "a refusal is not retried inside the deadline"
    );
}

#[tokio::test]
async fn payload_too_large_by_declared_length_and_by_streamed_bytes() {
    let stack = Stack::start_with(|c| c.body_limit_bytes = 1024).await;
    let http = Http::default();
    let mut big = settled("p-big", "sword", 500);
    big.extend(std::iter::repeat_n(b' ', 2048));
    let a = http.deliver(&stack.edge.url(), big.clone()).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(a.json["error"].as_str().unwrap().contains("1024"));

    // Chunked, with no Content-Length: the cap applies while reading.
    let addr = stack.edge.addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = "POST /webhooks/coinflow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 600];
    for _ in 0..3 {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(&chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    let mut buf = vec![0; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(
        stack
            .query()
            .await
            .payment("p-big")
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
}

#[tokio::test]
async fn unsupported_media_type() {
    let stack = Stack::start().await;
    let http = Http::default();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
    ] {
        let body = fixture("settled-sword.json");
        let sig = coinflow_tests::bodies::sign(&body);
        let a = http
            .send(
                Method::POST,
                &stack.edge.url(),
                &[("content-type", ct), ("coinflow-signature", &sig)],
                body,
            )
            .await;
        assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
    }
    // Parameters and case are fine.
    let body = fixture("settled-sword.json");
    let sig = coinflow_tests::bodies::sign(&body);
    let a = http
        .send(
            Method::POST,
            &stack.edge.url(),
            &[
                ("content-type", "Application/JSON; charset=utf-8"),
                ("coinflow-signature", &sig),
            ],
            body,
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn method_not_allowed_and_not_found() {
    let stack = Stack::start().await;
    let http = Http::default();
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let a = http
            .send(method.clone(), &stack.edge.url(), &[], Vec::new())
            .await;
        assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(a.headers["allow"], "POST");
    }
    let a = http
        .deliver(
            &format!("http://{}/other", stack.edge.addr),
            fixture("settled-sword.json"),
        )
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json["success"], false);
}

#[tokio::test]
async fn fulfillment_down_is_503_with_retry_after() {
    let mut config = edge_config(free_addr());
    config.deliver_deadline_ms = 300;
    let edge = EdgeHandle::start(config).await;
    let a = Http::default()
        .deliver(&edge.url(), fixture("settled-sword.json"))
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.headers["retry-after"], "5");
    let ready = Http::default()
        .get(&format!("http://{}/readyz", edge.admin))
        .await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let alive = Http::default()
        .get(&format!("http://{}/healthz", edge.admin))
        .await;
    assert_eq!(alive.status, StatusCode::OK);
}

#[tokio::test]
async fn slow_fulfillment_is_503_within_the_deadline() {
    // A peer that accepts connections and never answers: the deadline must fire.
    let (addr, _accepted) = silent_peer().await;
    let mut config = edge_config(addr);
    config.deliver_deadline_ms = 400;
    // Only the delivery deadline can end this request: the request timeout is far away.
    config.request_timeout_ms = 600_000;
    let edge = EdgeHandle::start(config).await;
    let a = Http::default()
        .deliver(&edge.url(), fixture("settled-sword.json"))
        .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.headers["retry-after"], "5");
}

#[tokio::test]
async fn overload_is_shed_at_once_with_503() {
    // One slot, held by a request stuck on a silent ingest peer.
    let (addr, mut accepted_rx) = silent_peer().await;
    let mut config = edge_config(addr);
    config.max_concurrency = 1;
    config.deliver_deadline_ms = 3000;
    let edge = EdgeHandle::start(config).await;
    let url = edge.url();
    let first = tokio::spawn(async move {
        Http::default()
            .deliver(&url, fixture("settled-sword.json"))
            .await
    });
    accepted_rx.recv().await.unwrap();
    let second = Http::default()
        .deliver(&edge.url(), fixture("settled-sword.json"))
        .await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        second.json["error"]
            .as_str()
            .unwrap()
            .contains("overloaded")
    );
    assert!(second.headers.contains_key("retry-after"));
    assert!(
        !first.is_finished(),
        "the shed request must not wait for the slot"
    );
    first.abort();
}

#[tokio::test]
async fn readiness_follows_fulfillment() {
    let stack = Stack::start().await;
    let http = Http::default();
    let ready = http
        .get(&format!("http://{}/readyz", stack.edge.admin))
        .await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(
        http.get(&format!("http://{}/nope", stack.edge.admin))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}
