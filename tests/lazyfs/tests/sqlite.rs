//! SQLite in WAL mode on the lazy file system, written by a child process that is
//! `kill -9`ed after acknowledging its commits, then a simulated power loss: with
//! `synchronous = OFF` (or `NORMAL` without a sync of the WAL) acknowledged commits
//! vanish, which shows the harness sees that bug class; with `FULL`, or `NORMAL` plus an
//! `fdatasync` of the `-wal` file before each acknowledgement (what
//! `fulfillment-svc/src/store/sqlite_writer.rs` does), every one survives and the database
//! passes `PRAGMA integrity_check`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Mounted, mount_or_skip};
use rusqlite::Connection;

/// Environment of the child: the database path, the mode, the commit count.
const CHILD_DB: &str = "COINFLOW_LAZYFS_CHILD_DB";
const CHILD_MODE: &str = "COINFLOW_LAZYFS_CHILD_MODE";
const CHILD_COMMITS: &str = "COINFLOW_LAZYFS_CHILD_COMMITS";

/// What the child prints once every commit is acknowledged.
const ACKED: &str = "LAZYFS-ACKED ";

/// Not a test of its own: the entry point of the writer child that the tests below start
/// (this same test binary, with the `COINFLOW_LAZYFS_CHILD_*` variables set). Without
/// them it returns at once.
#[test]
fn sqlite_writer_child() {
    let (Ok(db), Ok(mode), Ok(commits)) = (
        std::env::var(CHILD_DB),
        std::env::var(CHILD_MODE),
        std::env::var(CHILD_COMMITS),
    ) else {
        return;
    };
    let commits: u32 = commits.parse().unwrap();
    let conn = Connection::open(&db).unwrap();
    let journal: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    // The schema and a baseline row, made durable: committed with FULL, then checkpointed.
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         CREATE TABLE acked (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
         INSERT INTO acked (id, body) VALUES (0, 'baseline');",
    )
    .unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    // The lossy modes never checkpoint (a checkpoint in NORMAL syncs, and would make the
    // loss depend on where the last one fell); the durable ones checkpoint every 40 pages,
    // so the crash also meets a database file and a rewound WAL.
    let (synchronous, sync_wal, checkpoint_every) = match mode.as_str() {
        "off" => ("OFF", false, 0),
        "normal" => ("NORMAL", false, 0),
        "full" => ("FULL", false, 40),
        "normal+fdatasync" => ("NORMAL", true, 40),
        other => panic!("unknown mode {other}"),
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {synchronous}; PRAGMA wal_autocheckpoint = {checkpoint_every};"
    ))
    .unwrap();
    let wal = format!("{db}-wal");
    let body = "x".repeat(300);
    for id in 1..=commits {
        conn.execute(
            "INSERT INTO acked (id, body) VALUES (?1, ?2)",
            rusqlite::params![id, format!("{id} {body}")],
        )
        .unwrap();
        if sync_wal {
            std::fs::File::open(&wal).unwrap().sync_data().unwrap();
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{ACKED}{commits}").unwrap();
    out.flush().unwrap();
    drop(out);
    // Wait to be killed, connection open, as a service would be.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// Runs the writer child on `db` until it has acknowledged `commits` commits, then
/// `kill -9`s it and reaps it.
fn write_then_kill(db: &Path, mode: &str, commits: u32) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "sqlite_writer_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, db)
        .env(CHILD_MODE, mode)
        .env(CHILD_COMMITS, commits.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let acked = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // libtest prints "test sqlite_writer_child ... " on the same line first.
            .find_map(|line| {
                let at = line.find(ACKED)?;
                line[at + ACKED.len()..].trim().parse::<u32>().ok()
            });
        let _ = tx.send(acked);
    });
    // A child that hangs is killed all the same, and the test fails instead of hanging.
    let acked = rx.recv_timeout(Duration::from_secs(60)).ok().flatten();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        acked,
        Some(commits),
        "the writer child did not acknowledge its commits"
    );
}

/// Rows in the table and the integrity check's answer, read through the mount.
fn rows_and_integrity(m: &Mounted) -> (u32, String) {
    let conn = Connection::open(m.path("ledger.db")).unwrap();
    let rows = conn
        .query_row("SELECT count(*) FROM acked", [], |r| r.get(0))
        .unwrap();
    let ok = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    (rows, ok)
}

/// Writes `commits` acknowledged commits in `mode`, kill -9, crash; returns the rows left.
fn run(test: &str, mode: &str, commits: u32) -> Option<(u32, Mounted)> {
    let mut m = mount_or_skip(test)?;
    write_then_kill(&m.path("ledger.db"), mode, commits);
    m.fs.crash().unwrap();
    let (rows, integrity) = rows_and_integrity(&m);
    assert_eq!(integrity, "ok", "{mode}: integrity_check after the crash");
    // Still a working database after recovery.
    let conn = Connection::open(m.path("ledger.db")).unwrap();
    conn.execute(
        "INSERT INTO acked (id, body) VALUES (?1, 'after')",
        [commits + 1],
    )
    .unwrap();
    drop(conn);
    eprintln!(
        "{mode}: {rows} of {} rows after the crash; {:?}",
        commits + 1,
        m.fs.stats()
    );
    Some((rows, m))
}

#[test]
fn synchronous_off_loses_acknowledged_commits() {
    let Some((rows, m)) = run("synchronous_off_loses_acknowledged_commits", "off", 200) else {
        return;
    };
    assert!(
        rows < 201,
        "200 commits acknowledged without a sync all survived: {rows}"
    );
    // Nothing after the checkpointed baseline was ever synced.
    assert_eq!(rows, 1, "only the synced baseline row survives");
    assert!(m.fs.stats().dropped_bytes > 200 * 300);
}

#[test]
fn synchronous_normal_without_a_wal_sync_loses_acknowledged_commits() {
    let Some((rows, _m)) = run(
        "synchronous_normal_without_a_wal_sync_loses_acknowledged_commits",
        "normal",
        200,
    ) else {
        return;
    };
    assert!(
        rows < 201,
        "200 commits acknowledged without a sync all survived: {rows}"
    );
    assert_eq!(rows, 1, "only the synced baseline row survives");
}

#[test]
fn synchronous_full_keeps_every_acknowledged_commit() {
    let Some((rows, m)) = run(
        "synchronous_full_keeps_every_acknowledged_commit",
        "full",
        150,
    ) else {
        return;
    };
    assert_eq!(rows, 151);
    let s = m.fs.stats();
    assert!(s.fsyncs + s.fdatasyncs >= 150, "{s:?}");
    // The WAL index (-shm) is never synced: the crash dropped it, and SQLite rebuilt it.
    assert!(s.dropped_bytes > 0, "{s:?}");
}

#[test]
fn synchronous_normal_with_a_wal_fdatasync_keeps_every_acknowledged_commit() {
    let Some((rows, m)) = run(
        "synchronous_normal_with_a_wal_fdatasync_keeps_every_acknowledged_commit",
        "normal+fdatasync",
        150,
    ) else {
        return;
    };
    assert_eq!(rows, 151);
    assert!(m.fs.stats().fdatasyncs >= 150);
}
