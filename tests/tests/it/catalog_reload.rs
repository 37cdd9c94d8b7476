//! The catalog reloads on file change and on SIGHUP without dropping requests; an invalid
//! file keeps the old catalog; every grant records the version that priced it.

use std::time::Duration;

use coinflow_shared::proto::v1::Outcome;
use coinflow_tests::TestDb;
use coinflow_tests::bodies::settled;
use coinflow_tests::process::Proc;
use coinflow_tests::{FulfillmentHandle, Query, catalog_path, ingest, ingest_client};

fn catalog_with(version: &str, sword_cents: i64) -> String {
    std::fs::read_to_string(catalog_path())
        .unwrap()
        .replace(
            "version = \"2026-11-28\"",
            &format!("version = \"{version}\""),
        )
        .replace(
            "cents = 500, currency",
            &format!("cents = {sword_cents}, currency"),
        )
}

#[tokio::test]
async fn a_changed_file_is_picked_up_and_an_invalid_one_is_refused() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.toml");
    std::fs::write(&path, catalog_with("v1", 500)).unwrap();
    let f = FulfillmentHandle::start_with(&db, |c| {
        c.catalog = path.clone();
        c.catalog_reload_secs = 1;
    })
    .await;
    let mut client = ingest_client(f.addr).await;
    let mut q = Query::connect(f.addr).await;
    let first = ingest(&mut client, &settled("cat-1", "sword", 300)).await;
    assert_eq!(first.outcome, Outcome::Held as i32, "300 < 500 under v1");

    std::fs::write(&path, catalog_with("v2", 300)).unwrap();
    let mut n = 0;
    let granted = loop {
        n += 1;
        let id = format!("cat-2-{n}");
        if ingest(&mut client, &settled(&id, "sword", 300))
            .await
            .outcome
            == Outcome::Granted as i32
        {
            break id;
        }
        assert!(n < 200, "the new catalog was never picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ledger = q.payment(&granted).await.unwrap().ledger;
    assert_eq!(ledger[0].catalog_version, "v2");

    // An invalid file: the v2 catalog stays in force.
    std::fs::write(&path, catalog_with("v3", -1)).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = ingest(&mut client, &settled("cat-3", "sword", 300)).await;
    assert_eq!(still.outcome, Outcome::Granted as i32);
    assert_eq!(
        q.payment("cat-3").await.unwrap().ledger[0].catalog_version,
        "v2"
    );
}

#[tokio::test]
async fn sighup_reloads_and_logs_why_a_bad_file_was_refused() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.toml");
    std::fs::write(&path, catalog_with("v1", 500)).unwrap();
    let mut f =
        Proc::fulfillment_with(&db, &path, &[("FULFILLMENT_CATALOG_RELOAD_SECS", "3600")]).await;
    let mut client = ingest_client(f.addr).await;

    std::fs::write(&path, catalog_with("v2", 300)).unwrap();
    f.signal("HUP");
    f.wait_for_log("catalog reloaded").await;
    let r = ingest(&mut client, &settled("hup-1", "sword", 300)).await;
    assert_eq!(r.outcome, Outcome::Granted as i32);

    std::fs::write(&path, catalog_with("v3", -1)).unwrap();
    f.signal("HUP");
    let line = f.wait_for_log("catalog reload failed").await;
    assert!(
        line.contains("items.sword"),
        "the log names the bad entry: {line}"
    );
    let r = ingest(&mut client, &settled("hup-2", "sword", 300)).await;
    assert_eq!(
        r.outcome,
        Outcome::Granted as i32,
        "the previous catalog stays"
    );
    assert!(f.terminate().await.success());
}
