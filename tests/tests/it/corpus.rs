//! A corpus of hostile and malformed requests through the real edge process. Each gets its
//! documented status and nothing panics. An authenticated body that is not an envelope is
//! acked and recorded, held (Coinflow would otherwise retry it for 18 hours and drop it);
//! nothing else reaches the ledger.

use std::time::Duration;

use coinflow_shared::identity::body_key;
use coinflow_tests::bodies::{fixture, now, sign, sign_at};
use coinflow_tests::process::Proc;
use coinflow_tests::{KEY, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One raw request: method + path, headers, body; and the status it must get.
struct Case {
    name: String,
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    want: u16,
}

fn signed(name: &str, body: Vec<u8>, want: u16) -> Case {
    let sig = sign(&body);
    Case {
        name: name.into(),
        method: "POST",
        path: "/webhooks/coinflow".into(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("coinflow-signature".into(), sig),
        ],
        body,
        want,
    }
}

fn with_headers(name: &str, headers: Vec<(&str, String)>, body: Vec<u8>, want: u16) -> Case {
    Case {
        name: name.into(),
        method: "POST",
        path: "/webhooks/coinflow".into(),
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        body,
        want,
    }
}

fn envelope(data: &str) -> Vec<u8> {
    format!(r#"{{"eventType":"Settled","category":"Purchase","created":"2026-11-20T17:06:05.177Z","data":{data}}}"#).into_bytes()
}

/// How many cases the corpus holds: the count README.md and ARCHITECTURE.md state. A case
/// added or removed changes this number and those documents together.
const CASES: usize = 63;
/// How many of them are authenticated and so acked (malformed JSON, truncations, shapes).
const ACKED: usize = 43;

fn corpus() -> Vec<Case> {
    let good = fixture("settled-sword.json");
    let ct = || ("content-type", "application/json".to_owned());
    let mut cases = vec![];
    // Malformed JSON, correctly signed: recorded and held, 200.
    for (name, body) in [
        ("empty body", &b""[..]),
        ("whitespace", b"   \n"),
        ("open brace", b"{"),
        ("close brace", b"}"),
        ("open bracket", b"["),
        ("null", b"null"),
        ("true", b"true"),
        ("a number", b"1"),
        ("a string", b"\"Settled\""),
        ("dangling key", b"{\"eventType\":"),
        ("trailing garbage", b"{\"eventType\":\"Settled\",\"category\":\"P\",\"created\":\"c\",\"data\":{}} x"),
        ("byte order mark", b"\xef\xbb\xbf{\"eventType\":\"Settled\",\"category\":\"P\",\"created\":\"c\",\"data\":{}}"),
        ("comment", b"// hi\n{}"),
        ("single quotes", b"{'eventType':'Settled'}"),
        ("NaN", b"{\"eventType\":\"Settled\",\"category\":\"P\",\"created\":\"c\",\"data\":{\"subtotal\":{\"cents\":NaN}}}"),
        ("Infinity", b"{\"eventType\":\"Settled\",\"category\":\"P\",\"created\":\"c\",\"data\":{\"subtotal\":{\"cents\":Infinity}}}"),
        ("non-UTF-8 in a string", b"{\"eventType\":\"Sett\xffled\",\"category\":\"P\",\"created\":\"c\",\"data\":{}}"),
        ("raw 0xff", b"\xff\xfe\xfd"),
        ("lone surrogate", b"{\"eventType\":\"\\ud800\",\"category\":\"P\",\"created\":\"c\",\"data\":{}}"),
        ("control character in a string", b"{\"eventType\":\"Set\x01tled\",\"category\":\"P\",\"created\":\"c\",\"data\":{}}"),
    ] {
        cases.push(signed(name, body.to_vec(), 200));
    }
    for cut in [1, 10, 50, 100, good.len() / 2, good.len() - 3] {
        cases.push(signed(
            &format!("truncated at {cut}"),
            good[..cut].to_vec(),
            200,
        ));
    }
    // Shape: wrong types, missing keys, duplicates, depth: recorded and held, 200.
    for (name, body) in [
        ("eventType a number", br#"{"eventType":1,"category":"P","created":"c","data":{}}"#.to_vec()),
        ("eventType null", br#"{"eventType":null,"category":"P","created":"c","data":{}}"#.to_vec()),
        ("eventType an object", br#"{"eventType":{},"category":"P","created":"c","data":{}}"#.to_vec()),
        ("category an array", br#"{"eventType":"S","category":[],"created":"c","data":{}}"#.to_vec()),
        ("created a number", br#"{"eventType":"S","category":"P","created":17,"data":{}}"#.to_vec()),
        ("data a string", br#"{"eventType":"S","category":"P","created":"c","data":"x"}"#.to_vec()),
        ("data null", br#"{"eventType":"S","category":"P","created":"c","data":null}"#.to_vec()),
        ("data an array", br#"{"eventType":"S","category":"P","created":"c","data":[]}"#.to_vec()),
        ("no data", br#"{"eventType":"S","category":"P","created":"c"}"#.to_vec()),
        ("no eventType", br#"{"category":"P","created":"c","data":{}}"#.to_vec()),
        ("an array envelope", br#"["Settled","Purchase","c",{}]"#.to_vec()),
        ("duplicate eventType", br#"{"eventType":"Refund","eventType":"Settled","category":"P","created":"c","data":{}}"#.to_vec()),
        ("duplicate key in data", envelope(r#"{"id":"p","id":"q"}"#)),
        ("duplicate key in webhookInfo", envelope(r#"{"id":"p","webhookInfo":{"item":"sword","item":"starter-bundle"}}"#)),
        ("deep nesting in data", envelope(&format!("{{\"x\":{}{}}}", "[".repeat(5000), "]".repeat(5000)))),
        ("deep nesting at the top", format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes()),
        ("a huge number", envelope(r#"{"id":"p","subtotal":{"cents":1e400}}"#)),
    ] {
        cases.push(signed(name, body, 200));
    }
    // Authentication: 401.
    let mut other_bytes = good.clone();
    other_bytes.pop();
    let sig_for_good = sign(&good);
    let mac = sig_for_good.split("v1=").nth(1).unwrap().to_owned();
    for (name, headers, body) in [
        ("no credentials", vec![ct()], good.clone()),
        (
            "a signature over other bytes",
            vec![ct(), ("coinflow-signature", sig_for_good.clone())],
            other_bytes,
        ),
        (
            "a replayed old timestamp",
            vec![
                ct(),
                ("coinflow-signature", sign_at(KEY, now() - 3600, &good)),
            ],
            good.clone(),
        ),
        (
            "a timestamp from the future",
            vec![
                ct(),
                ("coinflow-signature", sign_at(KEY, now() + 3600, &good)),
            ],
            good.clone(),
        ),
        (
            "several v1, none right",
            vec![
                ct(),
                (
                    "coinflow-signature",
                    format!("t={},v1={},v1={}", now(), "ab".repeat(32), "cd".repeat(32)),
                ),
            ],
            good.clone(),
        ),
        (
            "a v1 that is not hex",
            vec![
                ct(),
                (
                    "coinflow-signature",
                    format!("t={},v1={}", now(), "zz".repeat(32)),
                ),
            ],
            good.clone(),
        ),
        (
            "an empty v1",
            vec![ct(), ("coinflow-signature", format!("t={},v1=", now()))],
            good.clone(),
        ),
        (
            "no t",
            vec![ct(), ("coinflow-signature", format!("v1={mac}"))],
            good.clone(),
        ),
        (
            "an empty signature header",
            vec![ct(), ("coinflow-signature", String::new())],
            good.clone(),
        ),
        (
            "an empty Authorization",
            vec![ct(), ("authorization", String::new())],
            good.clone(),
        ),
        (
            "a wrong Authorization",
            vec![
                ct(),
                ("authorization", "cf_whk_test_0123456789abcdeX".into()),
            ],
            good.clone(),
        ),
        (
            "a Bearer Authorization",
            vec![ct(), ("authorization", format!("Bearer {KEY}"))],
            good.clone(),
        ),
        (
            "two signature headers",
            vec![
                ct(),
                ("coinflow-signature", sig_for_good.clone()),
                ("coinflow-signature", sig_for_good.clone()),
            ],
            good.clone(),
        ),
    ] {
        cases.push(with_headers(name, headers, body, 401));
    }
    // Transport: 404, 405, 415, 413, 431.
    cases.push(Case {
        name: "GET".into(),
        method: "GET",
        path: "/webhooks/coinflow".into(),
        headers: vec![],
        body: vec![],
        want: 405,
    });
    cases.push(Case {
        name: "PUT".into(),
        method: "PUT",
        path: "/webhooks/coinflow".into(),
        headers: vec![],
        body: vec![],
        want: 405,
    });
    cases.push(Case {
        name: "another path".into(),
        method: "POST",
        path: "/webhooks/coinflow/../admin".into(),
        headers: vec![],
        body: vec![],
        want: 404,
    });
    cases.push(with_headers(
        "no content type",
        vec![("coinflow-signature", sign(&good))],
        good.clone(),
        415,
    ));
    cases.push(with_headers(
        "form content type",
        vec![("content-type", "application/x-www-form-urlencoded".into())],
        good.clone(),
        415,
    ));
    let mut big = good.clone();
    big.resize(300 * 1024, b' ');
    cases.push(signed("over the body limit", big, 413));
    cases.push(with_headers(
        "an oversized header",
        vec![ct(), ("x-junk", "a".repeat(200 * 1024))],
        good.clone(),
        431,
    ));
    cases
}

async fn send(addr: std::net::SocketAddr, case: &Case) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{} {} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n",
        case.method,
        case.path,
        case.body.len()
    );
    for (k, v) in &case.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&case.body).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn every_hostile_request_gets_its_status_and_only_authentic_ones_are_recorded() {
    let db = TestDb::new().await;
    let mut fulfillment = Proc::fulfillment(&db).await;
    let mut edge = Proc::edge(fulfillment.addr, KEY, &[]).await;
    let cases = corpus();
    assert_eq!(
        cases.len(),
        CASES,
        "the corpus README.md and ARCHITECTURE.md describe"
    );
    let mut wrong = Vec::new();
    for case in &cases {
        let got = send(edge.addr, case).await;
        if got != case.want {
            wrong.push(format!("{}: got {got}, want {}", case.name, case.want));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // Still alive and healthy; each acked body is recorded under its bytes and held,
    // granting nothing; nothing else reached the ledger; nobody panicked.
    let ok = coinflow_tests::http::Http::default()
        .get(&format!("http://{}/healthz", edge.admin))
        .await;
    assert_eq!(ok.status, http::StatusCode::OK);
    let acked: Vec<&Case> = cases.iter().filter(|c| c.want == 200).collect();
    assert_eq!(acked.len(), ACKED, "acked cases");
    for case in &acked {
        assert_eq!(
            db.event_outcome(&body_key(&case.body)).await,
            Some(("held".to_owned(), Some("unparseable".to_owned()))),
            "{}",
            case.name
        );
    }
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count("SELECT CAST(COUNT(*) AS BIGINT) FROM events").await,
        acked
            .iter()
            .map(|c| body_key(&c.body))
            .collect::<std::collections::HashSet<_>>()
            .len() as i64,
        "only the authenticated bodies are recorded, each once"
    );
    assert_eq!(
        count("SELECT CAST(COUNT(*) AS BIGINT) FROM ledger").await,
        0
    );
    assert!(edge.terminate().await.success());
    assert!(fulfillment.terminate().await.success());
    let logs = format!("{}\n{}", edge.log_text(), fulfillment.log_text());
    assert!(!logs.contains("panicked"), "a panic was logged");
}
