//! Slow clients cannot hold the edge: headers and bodies have read timeouts.

use std::time::Duration;

use coinflow_tests::Stack;
use coinflow_tests::bodies::{settled, sign};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn trickled_headers_are_cut_off() {
    let stack = Stack::start_with(|c| c.header_timeout_ms = 300).await;
    let mut stream = tokio::net::TcpStream::connect(stack.edge.addr)
        .await
        .unwrap();
    stream
        .write_all(b"POST /webhooks/coinflow HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Never finish the headers: the edge must close the connection on its own.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was held open");
}

#[tokio::test]
async fn a_stalled_body_gets_408() {
    let stack = Stack::start_with(|c| c.body_timeout_ms = 300).await;
    let body = settled("p-stall", "sword", 500);
    let mut stream = tokio::net::TcpStream::connect(stack.edge.addr)
        .await
        .unwrap();
    let head = format!(
        "POST /webhooks/coinflow HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         coinflow-signature: {}\r\ncontent-length: {}\r\n\r\n",
        sign(&body),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..5]).await.unwrap();
    let mut buf = vec![0; 512];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let mut q = stack.query().await;
    assert_eq!(
        q.payment("p-stall").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}
