//! The catalog reloads on file change and on SIGHUP without dropping requests; an invalid
//! file keeps the old catalog; every grant records the version that priced it.

use std::path::Path;

use coinflow_shared::proto::v1::Outcome;
use coinflow_tests::TestDb;
use coinflow_tests::bodies::settled;
use coinflow_tests::process::Proc;
use coinflow_tests::{Query, catalog_path, ingest, ingest_client};

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

/// Replaces `path` in one step (as a ConfigMap update does), so the watcher never reads a
/// half-written file.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The watcher's own signals are its log lines: `catalog reloaded` (with the new version)
/// and `catalog reload failed` (naming the bad entry). Each step waits for one before it
/// asserts which catalog is in force, so "the old catalog still applies" is checked after
/// the invalid file was read and refused, not merely after some time.
#[tokio::test]
async fn a_changed_file_is_picked_up_and_an_invalid_one_is_refused() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.toml");
    write_atomically(&path, &catalog_with("v1", 500));
    // No SIGHUP here: only the periodic check of the file.
    let mut f =
        Proc::fulfillment_with(&db, &path, &[("FULFILLMENT_CATALOG_RELOAD_SECS", "1")]).await;
    let mut client = ingest_client(f.addr).await;
    let mut q = Query::connect(f.addr).await;
    let first = ingest(&mut client, &settled("cat-1", "sword", 300)).await;
    assert_eq!(first.outcome, Outcome::Held as i32, "300 < 500 under v1");

    write_atomically(&path, &catalog_with("v2", 300));
    let line = f.wait_for_log("catalog reloaded").await;
    assert!(line.contains("\"v2\""), "the reload swapped in v2: {line}");
    let granted = ingest(&mut client, &settled("cat-2", "sword", 300)).await;
    assert_eq!(granted.outcome, Outcome::Granted as i32, "300 covers v2");
    assert_eq!(
        q.payment("cat-2").await.unwrap().ledger[0].catalog_version,
        "v2"
    );

    // An invalid file: once the watcher has read and refused it, v2 stays in force.
    write_atomically(&path, &catalog_with("v3", -1));
    let line = f.wait_for_log("catalog reload failed").await;
    assert!(
        line.contains("items.sword"),
        "the log names the bad entry: {line}"
    );
    let still = ingest(&mut client, &settled("cat-3", "sword", 300)).await;
    assert_eq!(still.outcome, Outcome::Granted as i32);
    assert_eq!(
        q.payment("cat-3").await.unwrap().ledger[0].catalog_version,
        "v2"
    );
    assert!(
        !f.log_text().contains("\"v3\""),
        "the invalid catalog was never swapped in"
    );
    assert!(f.terminate().await.success());
}

#[tokio::test]
async fn sighup_reloads_and_logs_why_a_bad_file_was_refused() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.toml");
    write_atomically(&path, &catalog_with("v1", 500));
    let mut f =
        Proc::fulfillment_with(&db, &path, &[("FULFILLMENT_CATALOG_RELOAD_SECS", "3600")]).await;
    let mut client = ingest_client(f.addr).await;

    write_atomically(&path, &catalog_with("v2", 300));
    f.signal("HUP");
    let line = f.wait_for_log("catalog reloaded").await;
    assert!(line.contains("\"v2\""), "the reload swapped in v2: {line}");
    let r = ingest(&mut client, &settled("hup-1", "sword", 300)).await;
    assert_eq!(r.outcome, Outcome::Granted as i32);

    write_atomically(&path, &catalog_with("v3", -1));
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
