//! "200 means on disk", across a power loss: fulfillment's SQLite ledger lives on the lazy
//! file system (`coinflow-lazyfs`), which keeps every write that was not fsynced in memory
//! and drops it when it "crashes". `kill -9` alone cannot see an ack sent before the
//! `fdatasync` (the kernel keeps the page cache); this can. Several times per run
//! fulfillment is killed with -9 *and* the disk loses its unsynced writes, then both come
//! back while the sender goes on retrying like Coinflow. After a last power loss, every
//! delivery answered 200 is in the ledger exactly once, every payment holds what the
//! independent model of the money rules says, and SQLite's integrity check passes.
//!
//! SQLite only: PostgreSQL's durability is its own (`synchronous_commit = on`), and its
//! data directory is not ours to put on a test file system.

use std::time::Duration;

use coinflow_lazyfs::LazyFs;
use coinflow_sender::generate::{Traffic, generate};
use coinflow_tests::db::{Backend, backend};
use coinflow_tests::process::Proc;
use coinflow_tests::{KEY, TestDb, free_addr, unique_secret};

use crate::faults::{sender, verify};

/// Whether a skip must fail the run (CI).
fn strict() -> bool {
    std::env::var("COINFLOW_STRICT").as_deref() == Ok("1")
}

/// fulfillment-svc over `db`, always on `listen`, so the edge finds it after a restart,
/// taking only `token` (another test's service may take the port while it is down).
async fn start(db: &TestDb, listen: &str, token: &str) -> Proc {
    Proc::fulfillment_env(
        db,
        &[
            ("FULFILLMENT_LISTEN", listen),
            ("FULFILLMENT_INGEST_TOKENS", token),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_after_any_200_loses_nothing() {
    if backend() != Backend::Sqlite {
        return;
    }
    if let Err(why) = LazyFs::available() {
        assert!(!strict(), "the power-loss test cannot run: {why}");
        eprintln!("SKIPPED: the power-loss test needs a lazy file system: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (backing, mount) = (dir.path().join("disk"), dir.path().join("mnt"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mount).unwrap();
    let mut disk = LazyFs::mount(&backing, &mount).unwrap();
    let db = TestDb::sqlite_in(&mount);
    let listen = free_addr().to_string();
    let token = unique_secret("ingest");
    let mut fulfillment = start(&db, &listen, &token).await;
    let edge = Proc::edge(
        fulfillment.addr,
        KEY,
        &[
            ("EDGE_DELIVER_DEADLINE_MS", "1000"),
            ("EDGE_INGEST_TOKEN", token.as_str()),
        ],
    )
    .await;
    let sender = sender(&format!("http://{}/webhooks/coinflow", edge.addr));
    // ~5,000 deliveries: enough WAL (~25 KB an event) to pass the 16 MiB rewind threshold
    // several times, so some power losses land around a rewind.
    let bodies = generate(&Traffic {
        payments: 1600,
        duplicate_ratio: 0.2,
        reorder_ratio: 0.3,
        prefix: "power".into(),
        seed: 16,
    });
    let run = tokio::spawn({
        let (sender, bodies) = (sender.clone(), bodies.clone());
        async move { sender.open_loop(bodies, 400.0).await }
    });
    let mut dropped = 0;
    for _ in 0..4 {
        // A moment between 1.5 and 3 s from now, different on every run.
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 1500;
        tokio::time::sleep(Duration::from_millis(1500 + u64::from(jitter))).await;
        fulfillment.kill9().await;
        disk.crash().unwrap();
        dropped += disk.stats().dropped_bytes;
        fulfillment = start(&db, &listen, &token).await;
    }
    let logged = run.await.unwrap();
    let tail: Vec<String> = fulfillment
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
        .map(str::to_owned)
        .collect();
    assert!(
        logged.iter().all(|l| l.result == "acked"),
        "every delivery was acked in the end: {:?}; fulfillment said: {tail:#?}",
        sender.report().statuses
    );
    // The last power loss: whatever was acked must be on the disk already.
    fulfillment.kill9().await;
    disk.crash().unwrap();
    dropped += disk.stats().dropped_bytes;
    assert!(dropped > 0, "the crashes dropped unsynced writes");
    // The WAL is rewound once it holds 16 MiB: with this much written, several rewinds fell
    // between the power losses.
    let written = disk.stats().bytes_written;
    assert!(written > 64 << 20, "only {written} bytes written");

    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(integrity, "ok");
    pool.close().await;
    verify(&db, &bodies, &logged).await;
    drop(edge);
    drop(disk);
}
