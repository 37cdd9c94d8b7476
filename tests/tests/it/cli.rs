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

#[tokio::test]
async fn operators_list_approve_and_inspect() {
    let db = TestDb::new().await;
    let mut f = Proc::fulfillment(&db).await;
    let server = format!("http://{}", f.addr);
    let mut client = ingest_client(f.addr).await;
    ingest(&mut client, &settled("cli-1", "sword", 100)).await;

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
