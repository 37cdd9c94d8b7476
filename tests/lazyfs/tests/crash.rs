//! The lazy file system against plain file operations: after a crash every file holds
//! exactly what was last synced, and before it every reader sees what was written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use coinflow_lazyfs::{LazyFs, LazyFsError};
use common::{Mounted, content, mount_or_skip};

/// A file's logical content and its last synced content, kept by hand.
#[derive(Clone, Default)]
struct Model {
    now: Vec<u8>,
    synced: Vec<u8>,
}

impl Model {
    fn write(&mut self, off: usize, data: &[u8]) {
        if self.now.len() < off + data.len() {
            self.now.resize(off + data.len(), 0);
        }
        self.now[off..off + data.len()].copy_from_slice(data);
    }
    fn truncate(&mut self, size: usize) {
        self.now.resize(size, 0);
    }
    fn sync(&mut self) {
        self.synced = self.now.clone();
    }
    fn crash(&mut self) {
        self.now = self.synced.clone();
    }
}

fn open_rw(m: &Mounted, name: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(m.path(name))
        .unwrap()
}

#[test]
fn synced_data_survives_a_crash_and_unsynced_data_does_not() {
    let Some(mut m) = mount_or_skip("synced_data_survives_a_crash_and_unsynced_data_does_not")
    else {
        return;
    };
    let mut a = open_rw(&m, "a");
    a.write_all(b"synced").unwrap();
    a.sync_all().unwrap();
    a.write_all(b" later").unwrap();
    fs::write(m.path("b"), b"never synced").unwrap();

    // Readers see the writes; the disk has only the synced part.
    assert_eq!(content(&m.path("a")), b"synced later");
    assert_eq!(content(&m.path("b")), b"never synced");
    assert_eq!(content(&m.backing("a")), b"synced");
    assert_eq!(content(&m.backing("b")), b"");
    let before = m.fs.stats();
    assert_eq!(before.fsyncs, 1);
    assert_eq!(before.pending_files, 2);
    assert_eq!(before.pending_bytes, 18);
    assert_eq!(before.bytes_synced, 6);

    drop(a);
    m.fs.crash().unwrap();
    assert_eq!(content(&m.path("a")), b"synced");
    // The create went to disk at once; its data did not.
    assert_eq!(content(&m.path("b")), b"");
    let after = m.fs.stats();
    assert_eq!(after.crashes, 1);
    assert_eq!(after.dropped_files, 2);
    assert_eq!(after.dropped_bytes, 18);
    assert_eq!(after.pending_files, 0);

    // The new session buffers again, and a second crash drops only what came after.
    let mut a = open_rw(&m, "a");
    a.seek(SeekFrom::End(0)).unwrap();
    a.write_all(b"!").unwrap();
    a.sync_data().unwrap();
    a.write_all(b"?").unwrap();
    drop(a);
    assert_eq!(content(&m.path("a")), b"synced!?");
    m.fs.crash().unwrap();
    assert_eq!(content(&m.path("a")), b"synced!");
    let last = m.fs.stats();
    assert_eq!((last.fsyncs, last.fdatasyncs), (1, 1));
    assert_eq!(
        (last.crashes, last.dropped_files, last.dropped_bytes),
        (2, 1, 1)
    );
}

#[test]
fn extended_then_truncated_files_come_back_as_last_synced() {
    let Some(mut m) = mount_or_skip("extended_then_truncated_files_come_back_as_last_synced")
    else {
        return;
    };
    let f = open_rw(&m, "t");
    let mut model = Model::default();
    let pattern: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&pattern, 0).unwrap();
    model.write(0, &pattern);
    f.sync_all().unwrap();
    model.sync();

    // Extend, cut below the synced size, leave a hole, write past it.
    f.write_all_at(&[0xAA; 10_000], 10_000).unwrap();
    model.write(10_000, &[0xAA; 10_000]);
    f.set_len(3_000).unwrap();
    model.truncate(3_000);
    f.write_all_at(&[0xBB; 100], 5_000).unwrap();
    model.write(5_000, &[0xBB; 100]);
    assert_eq!(content(&m.path("t")), model.now);
    assert_eq!(f.metadata().unwrap().len(), 5_100);
    assert_eq!(
        content(&m.backing("t")),
        model.synced,
        "nothing reached the disk"
    );

    f.sync_all().unwrap();
    model.sync();
    assert_eq!(content(&m.backing("t")), model.synced);

    // Unsynced: shrink to nothing much, grow by truncation.
    f.set_len(100).unwrap();
    f.set_len(50_000).unwrap();
    model.truncate(100);
    model.truncate(50_000);
    assert_eq!(content(&m.path("t")), model.now);
    drop(f);
    m.fs.crash().unwrap();
    model.crash();
    assert_eq!(content(&m.path("t")), model.synced);
    assert_eq!(fs::metadata(m.path("t")).unwrap().len(), 5_100);
}

#[test]
fn sparse_writes_read_as_zeros_and_only_synced_ones_survive() {
    let Some(mut m) = mount_or_skip("sparse_writes_read_as_zeros_and_only_synced_ones_survive")
    else {
        return;
    };
    let f = open_rw(&m, "s");
    let mut model = Model::default();
    for (off, byte) in [(1_048_586_usize, b'x'), (7, b'y'), (200_000, b'z')] {
        f.write_all_at(&[byte; 3], off as u64).unwrap();
        model.write(off, &[byte; 3]);
    }
    assert_eq!(content(&m.path("s")), model.now);
    f.sync_data().unwrap();
    model.sync();
    f.write_all_at(b"late", 3 << 20).unwrap();
    f.write_all_at(b"over", 6).unwrap();
    model.write(3 << 20, b"late");
    model.write(6, b"over");
    assert_eq!(content(&m.path("s")), model.now);
    drop(f);
    m.fs.crash().unwrap();
    assert_eq!(content(&m.path("s")), model.synced);
    assert_eq!(model.synced.len(), 1_048_589);
}

#[test]
fn appends_survive_up_to_the_last_sync() {
    let Some(mut m) = mount_or_skip("appends_survive_up_to_the_last_sync") else {
        return;
    };
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(m.path("log"))
        .unwrap();
    let mut expected = Vec::new();
    for i in 0..100 {
        let line = format!("line {i}\n");
        f.write_all(line.as_bytes()).unwrap();
        if i < 50 {
            expected.extend_from_slice(line.as_bytes());
        }
        if i == 49 {
            f.sync_all().unwrap();
        }
    }
    let mut all = String::new();
    File::open(m.path("log"))
        .unwrap()
        .read_to_string(&mut all)
        .unwrap();
    assert_eq!(all.lines().count(), 100);
    drop(f);
    m.fs.crash().unwrap();
    assert_eq!(content(&m.path("log")), expected);
}

/// xorshift64*, so the sequence is the same every run.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn random_writes_truncates_and_syncs_match_a_model_across_crashes() {
    let Some(mut m) =
        mount_or_skip("random_writes_truncates_and_syncs_match_a_model_across_crashes")
    else {
        return;
    };
    let names = ["r0", "r1", "r2"];
    let mut models = vec![Model::default(); names.len()];
    let mut seed = 0x5eed_1234_abcd_ef01_u64;
    for round in 0..4 {
        let files: Vec<File> = names.iter().map(|n| open_rw(&m, n)).collect();
        for step in 0..150 {
            let i = (next(&mut seed) % names.len() as u64) as usize;
            let (f, model) = (&files[i], &mut models[i]);
            match next(&mut seed) % 10 {
                0 => {
                    let size = (next(&mut seed) % 60_000) as usize;
                    f.set_len(size as u64).unwrap();
                    model.truncate(size);
                }
                1 => {
                    f.sync_all().unwrap();
                    model.sync();
                }
                2 => {
                    f.sync_data().unwrap();
                    model.sync();
                }
                _ => {
                    let off = (next(&mut seed) % 60_000) as usize;
                    let len = 1 + (next(&mut seed) % 9_000) as usize;
                    let data: Vec<u8> = (0..len).map(|k| (k + step + round) as u8 | 1).collect();
                    f.write_all_at(&data, off as u64).unwrap();
                    model.write(off, &data);
                }
            }
            if step % 25 == 0 {
                assert_eq!(
                    content(&m.path(names[i])),
                    model.now,
                    "round {round} step {step}"
                );
            }
        }
        drop(files);
        m.fs.crash().unwrap();
        for (name, model) in names.iter().zip(&mut models) {
            model.crash();
            assert_eq!(
                content(&m.path(name)),
                model.synced,
                "{name} after crash {round}"
            );
            assert_eq!(content(&m.backing(name)), model.synced, "{name} on disk");
        }
    }
    assert!(m.fs.stats().dropped_bytes > 0 || m.fs.stats().dropped_files > 0);
}

#[test]
fn renames_keep_the_data_and_unlinks_drop_it() {
    let Some(mut m) = mount_or_skip("renames_keep_the_data_and_unlinks_drop_it") else {
        return;
    };
    // A file found again through a renamed directory.
    fs::create_dir(m.path("d")).unwrap();
    let mut f = File::create(m.path("d/f")).unwrap();
    f.write_all(b"one").unwrap();
    fs::rename(m.path("d"), m.path("e")).unwrap();
    assert_eq!(
        content(&m.path("e/f")),
        b"one",
        "pending data follows the inode"
    );
    f.write_all(b" two").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(content(&m.backing("e/f")), b"one two");

    // Written, not synced, renamed over a synced file: the rename lands, the data not.
    fs::write(m.path("e/g"), b"old").unwrap();
    File::open(m.path("e/g")).unwrap().sync_all().unwrap();
    fs::write(m.path("e/g.tmp"), b"new").unwrap();
    fs::rename(m.path("e/g.tmp"), m.path("e/g")).unwrap();
    assert_eq!(content(&m.path("e/g")), b"new");

    // An unlinked file's pending data goes at once; a file still open keeps its own.
    fs::write(m.path("u"), b"doomed").unwrap();
    let pending = m.fs.stats().pending_bytes;
    fs::remove_file(m.path("u")).unwrap();
    assert_eq!(m.fs.stats().pending_bytes, pending - 6);
    let mut held = open_rw(&m, "held");
    held.write_all(b"still readable").unwrap();
    fs::remove_file(m.path("held")).unwrap();
    let mut back = String::new();
    held.seek(SeekFrom::Start(0)).unwrap();
    held.read_to_string(&mut back).unwrap();
    assert_eq!(back, "still readable");
    drop(held);
    // The kernel sends the release in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while m.fs.stats().pending_bytes != pending - 6 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(m.fs.stats().pending_bytes, pending - 6);

    // A new file that gets the old backing inode number is a new file.
    fs::write(m.path("fresh"), b"").unwrap();
    assert_eq!(content(&m.path("fresh")), b"");

    m.fs.crash().unwrap();
    assert_eq!(content(&m.path("e/f")), b"one two");
    assert_eq!(content(&m.path("e/g")), b"", "renamed over, never synced");
    assert!(!m.path("d").exists() && !m.path("u").exists() && !m.path("held").exists());
    let mut names: Vec<_> = fs::read_dir(m.path("e"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["f", "g"]);
    assert!(m.fs.stats().dir_fsyncs == 0);
}

#[test]
fn crash_refuses_while_the_mount_is_in_use() {
    let Some(mut m) = mount_or_skip("crash_refuses_while_the_mount_is_in_use") else {
        return;
    };
    let mut f = File::create(m.path("open")).unwrap();
    f.write_all(b"abc").unwrap();
    match m.fs.crash() {
        Err(LazyFsError::Busy(_)) => {}
        other => panic!("crash with a file open: {other:?}"),
    }
    // Still mounted, still buffering.
    assert_eq!(content(&m.path("open")), b"abc");
    assert_eq!(content(&m.backing("open")), b"");
    drop(f);
    m.fs.crash().unwrap();
    assert_eq!(content(&m.path("open")), b"");
}

#[test]
fn mount_refuses_a_busy_or_nested_mountpoint() {
    // These checks come before any FUSE call, so they run everywhere.
    let dirs = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dirs.path().join("b"), dirs.path().join("m"));
    fs::create_dir_all(backing.join("inner")).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(mnt.join("x"), b"").unwrap();
    assert!(matches!(
        LazyFs::mount(&backing, &mnt),
        Err(LazyFsError::NotEmpty(_))
    ));
    assert!(matches!(
        LazyFs::mount(&backing, &backing.join("inner")),
        Err(LazyFsError::Nested { .. })
    ));
    assert!(matches!(
        LazyFs::mount(&mnt.join("x"), &backing.join("inner")),
        Err(LazyFsError::NotADirectory(_))
    ));
    assert!(matches!(
        LazyFs::mount(&dirs.path().join("missing"), &mnt),
        Err(LazyFsError::Io { .. })
    ));
}
