//! Slow clients cannot hold the edge: headers and bodies have read timeouts, and the ones
//! configured are the ones applied.
//!
//! Each test sets a timeout far below the default and bounds when the edge gives up by
//! it: not before the configured timeout, and well before the default would have fired (so
//! a test that passes only because the default applies fails). The upper bound is generous
//! (halfway to the default); nothing here measures speed.

use std::time::{Duration, Instant};

use coinflow_tests::bodies::{settled, sign};
use coinflow_tests::{Stack, edge_config, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The configured timeout in each test.
const CONFIGURED: Duration = Duration::from_millis(300);

/// Asserts `elapsed` (from before the connection was opened to the edge's answer) is
/// bounded by the configured timeout and far from the `default_ms` one.
fn assert_bounded_by_configured(elapsed: Duration, default_ms: u64, what: &str) {
    let default = Duration::from_millis(default_ms);
    assert!(
        CONFIGURED * 4 < default,
        "the default {what} ({default:?}) must be far above the configured one"
    );
    assert!(
        elapsed >= CONFIGURED,
        "{what}: the edge gave up after {elapsed:?}, before the configured {CONFIGURED:?}"
    );
    let bound = (CONFIGURED + default) / 2;
    assert!(
        elapsed < bound,
        "{what}: the edge gave up after {elapsed:?}, not within the configured \
         {CONFIGURED:?} (bound {bound:?}; the default is {default:?})"
    );
}

#[tokio::test]
async fn trickled_headers_are_cut_off() {
    let default_ms = edge_config(free_addr()).header_timeout_ms;
    let stack = Stack::start_with(|c| c.header_timeout_ms = CONFIGURED.as_millis() as u64).await;
    let started = Instant::now();
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
    let elapsed = started.elapsed();
    assert!(read.is_ok(), "the connection was held open");
    assert_bounded_by_configured(elapsed, default_ms, "header timeout");
}

#[tokio::test]
async fn a_stalled_body_gets_408() {
    let default_ms = edge_config(free_addr()).body_timeout_ms;
    let stack = Stack::start_with(|c| c.body_timeout_ms = CONFIGURED.as_millis() as u64).await;
    let body = settled("p-stall", "sword", 500);
    let started = Instant::now();
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
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_bounded_by_configured(elapsed, default_ms, "body timeout");
    let mut q = stack.query().await;
    assert_eq!(
        q.payment("p-stall").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}
