//! The operator CLI against a running fulfillment-svc process.

use coinflow_tests::TestDb;
use coinflow_tests::bodies::{settled, wallet_of};
use coinflow_tests::process::{Proc, bin};
use coinflow_tests::{API_TOKEN, OPERATOR_TOKEN, ingest, ingest_client};

async fn run(args: &[&str], server: &str) -> (bool, String, String) {
    // The review queue takes an operator's token, everything else a query token.
    let token = if args.first() == Some(&"held") {
        OPERATOR_TOKEN
    } else {
        API_TOKEN
    };
    let out = tokio::process::Command::new(bin("fulfillment-svc"))
        .args(args)
        .env("FULFILLMENT_SERVER", server)
        .env("FULFILLMENT_TOKEN", token)
        .env("LOG_FORMAT", "human")
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fulfillment process on a new ledger that has recorded `bodies`, and its URL (the
/// ledger lives as long as the `TestDb`).
async fn fulfillment_with(bodies: &[Vec<u8>]) -> (TestDb, Proc, String) {
    let db = TestDb::new().await;
    let f = Proc::fulfillment(&db).await;
    let server = format!("http://{}", f.addr);
    let mut client = ingest_client(f.addr).await;
    for body in bodies {
        ingest(&mut client, body).await;
    }
    (db, f, server)
}

#[tokio::test]
async fn operators_list_approve_and_inspect() {
    let (_db, mut f, server) = fulfillment_with(&[settled("cli-1", "sword", 100)]).await;

    let (ok, out, err) = run(&["held", "list"], &server).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("cli-1") && out.contains("reason=underpaid"),
        "{out}"
    );

    let (ok, out, err) = run(
        &["held", "approve", "cli-1", "--note", "ok by phone"],
        &server,
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("cli-1: approved") && out.contains("operator:tester"),
        "{out}"
    );

    let (ok, out, _) = run(&["entitlements", "--wallet", &wallet_of("cli-1")], &server).await;
    assert!(ok);
    assert!(out.contains("sword") && out.contains('1'), "{out}");

    let (ok, out, _) = run(&["payment", "cli-1"], &server).await;
    assert!(ok);
    assert!(
        out.contains("state=settled") && out.contains("review: approved"),
        "{out}"
    );

    let (ok, _, err) = run(&["held", "reject", "cli-1"], &server).await;
    assert!(!ok);
    assert!(
        err.contains("FailedPrecondition") || err.contains("already approved"),
        "{err}"
    );

    // Without the token the service refuses, and the CLI says so.
    let out = std::process::Command::new(bin("fulfillment-svc"))
        .args(["held", "list", "--server", &server])
        .env_remove("FULFILLMENT_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bearer"));
    assert!(f.terminate().await.success());
}

#[tokio::test]
async fn check_catalog_names_the_bad_entry() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(coinflow_tests::catalog_path()).unwrap();
    std::fs::write(&bad, text.replace("quantity = 1000", "quantity = 0")).unwrap();
    let (ok, _, err) = run(&["check-catalog", bad.to_str().unwrap()], "http://unused").await;
    assert!(!ok);
    assert!(
        err.contains("items.credits-1000") && err.contains("quantity must be positive"),
        "{err}"
    );
    let (ok, _, err) = run(
        &[
            "check-catalog",
            coinflow_tests::catalog_path().to_str().unwrap(),
        ],
        "http://unused",
    )
    .await;
    assert!(ok, "{err}");
}

#[tokio::test]
async fn help_never_prints_a_secret_from_the_environment() {
    let secrets = [
        (
            "FULFILLMENT_DATABASE_URL",
            "postgres://u:pw-in-url@db/ledger?password=pw-in-query",
        ),
        ("FULFILLMENT_API_TOKENS", "query-secret"),
        ("FULFILLMENT_INGEST_TOKENS", "ingest-secret"),
        ("FULFILLMENT_OPERATOR_TOKENS", "alice:operator-secret"),
        ("FULFILLMENT_TOKEN", "cli-secret"),
        ("COINFLOW_WEBHOOK_KEYS", "webhook-key-secret"),
        ("EDGE_INGEST_TOKEN", "edge-ingest-secret"),
        ("FULFILLMENT_RECOVERY_TOKENS", "recovery-secret"),
        ("COINFLOW_API_KEY", "merchant-api-secret"),
    ];
    for (bin_name, args) in [
        ("fulfillment-svc", &["--help"][..]),
        ("fulfillment-svc", &["migrate", "--help"][..]),
        ("fulfillment-svc", &["held", "approve", "--help"][..]),
        ("fulfillment-svc", &["recover", "--help"][..]),
        ("webhook-edge", &["--help"][..]),
    ] {
        let out = tokio::process::Command::new(bin(bin_name))
            .args(args)
            .envs(secrets)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("Usage"),
            "{bin_name} {args:?}: {text}"
        );
        for secret in [
            "pw-in-url",
            "pw-in-query",
            "query-secret",
            "ingest-secret",
            "operator-secret",
            "cli-secret",
            "webhook-key-secret",
            "edge-ingest-secret",
            "recovery-secret",
            "merchant-api-secret",
        ] {
            assert!(
                !text.contains(secret),
                "{bin_name} {args:?} prints {secret}"
            );
        }
    }
}

/// `args` with `--json`: the one JSON document the CLI printed.
async fn json(args: &[&str], server: &str) -> serde_json::Value {
    let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
    let (ok, out, err) = run(&args, server).await;
    assert!(ok, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[tokio::test]
async fn a_payer_without_entitlements_is_said_to_have_none() {
    let (_db, mut f, server) = fulfillment_with(&[]).await;
    for args in [
        &["entitlements", "--wallet", "mygameʬnobody"][..],
        &["entitlements", "--user", "nobody"][..],
    ] {
        let (ok, out, err) = run(args, &server).await;
        assert!(ok, "{err}");
        assert_eq!(out, format!("payer {}: no entitlements\n", args[2]));
    }
    let (ok, out, err) = run(&["held", "list"], &server).await;
    assert!(ok, "{err}");
    assert_eq!(out, "no held payments\n");
    assert!(f.terminate().await.success());
}

#[tokio::test]
async fn every_read_command_prints_json_with_the_real_values() {
    let (_db, mut f, server) = fulfillment_with(&[
        settled("cli-held", "sword", 100),
        settled("cli-paid", "shield", 700),
    ])
    .await;

    let v = json(&["entitlements", "--user", "nobody"], &server).await;
    assert_eq!(
        v,
        serde_json::json!({
            "payer": { "wallet": null, "raw_customer_id": "nobody" },
            "entitlements": [],
        })
    );
    let v = json(
        &["entitlements", "--wallet", &wallet_of("cli-paid")],
        &server,
    )
    .await;
    assert_eq!(
        v,
        serde_json::json!({
            "payer": { "wallet": wallet_of("cli-paid"), "raw_customer_id": null },
            "entitlements": [{ "sku": "shield", "quantity": 1, "debt": false }],
        })
    );

    let v = json(&["payment", "cli-paid"], &server).await;
    assert_eq!(v["payment_id"], "cli-paid");
    assert_eq!(v["state"], "settled");
    assert_eq!(v["held_reason"], serde_json::Value::Null);
    assert_eq!(v["wallet"], wallet_of("cli-paid"));
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{v}");
    let event = &events[0];
    assert_eq!(event["event_type"], "Settled");
    assert_eq!(event["outcome"], "granted");
    assert_eq!(event["created"], "2026-11-20T17:06:05.177Z");
    assert_eq!(
        event["subtotal"],
        serde_json::json!({ "cents": 700, "currency": "USD" })
    );
    assert_eq!(event["total"]["cents"].as_i64(), Some(725));
    assert_eq!(event["recovered"], false);
    assert!(
        event["received_at"].as_str().unwrap().ends_with('Z'),
        "{event}"
    );
    let raw: serde_json::Value = serde_json::from_str(event["raw_body"].as_str().unwrap()).unwrap();
    assert_eq!(raw["data"]["id"], "cli-paid");
    let ledger = v["ledger"].as_array().unwrap();
    assert_eq!(ledger.len(), 1, "{v}");
    let entry = &ledger[0];
    assert!(entry["seq"].as_i64().unwrap() > 0, "{entry}");
    assert_eq!(entry["kind"], "grant");
    assert_eq!(entry["sku"], "shield");
    assert_eq!(entry["quantity"].as_i64(), Some(1));
    assert_eq!(entry["item"], "shield");
    assert_eq!(entry["actor"], "coinflow");
    assert_eq!(entry["catalog_version"], "2026-11-28");
    assert_eq!(entry["event_key"], event["event_key"]);
    assert_eq!(entry["note"], serde_json::Value::Null);
    assert!(
        entry["recorded_at"].as_str().unwrap().ends_with('Z'),
        "{entry}"
    );

    let v = json(&["held", "list"], &server).await;
    let held = v["held"].as_array().unwrap();
    assert_eq!(held.len(), 1, "{v}");
    assert_eq!(held[0]["payment_id"], "cli-held");
    assert_eq!(held[0]["held_reason"], "underpaid");
    assert_eq!(held[0]["wallet"], wallet_of("cli-held"));
    assert_eq!(held[0]["event"]["outcome"], "held");
    assert_eq!(held[0]["event"]["held_reason"], "underpaid");
    assert_eq!(held[0]["event"]["subtotal"]["cents"].as_i64(), Some(100));

    let v = json(
        &["held", "approve", "cli-held", "--note", "paid by phone"],
        &server,
    )
    .await;
    assert_eq!(v["payment_id"], "cli-held");
    assert_eq!(v["review"], "approved");
    assert_eq!(v["duplicate"], false);
    assert_eq!(v["entries"][0]["actor"], "operator:tester");
    assert_eq!(v["entries"][0]["note"], "paid by phone");
    assert_eq!(v["entries"][0]["sku"], "sword");
    assert_eq!(v["entries"][0]["quantity"].as_i64(), Some(1));
    assert_eq!(
        json(&["held", "list"], &server).await,
        serde_json::json!({ "held": [] })
    );

    // Errors still go to stderr, with nothing on stdout and a failing exit.
    let (ok, out, err) = run(&["payment", "no-such-payment", "--json"], &server).await;
    assert!(!ok);
    assert_eq!(out, "");
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
    assert!(f.terminate().await.success());
}
