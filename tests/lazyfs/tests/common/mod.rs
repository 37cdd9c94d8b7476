//! What the lazy file system's tests share: a mount over fresh scratch directories, or a
//! skip (a failure under `COINFLOW_STRICT=1`) where FUSE cannot work.
#![allow(dead_code)] // Each test crate uses its own part of this module.

use std::io::Write;
use std::path::{Path, PathBuf};

use coinflow_lazyfs::LazyFs;

/// A lazy mount over a fresh backing directory; drops the mount before the directories.
pub struct Mounted {
    pub fs: LazyFs,
    pub dirs: tempfile::TempDir,
}

impl Mounted {
    /// `name` under the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.fs.mountpoint().join(name)
    }

    /// `name` in the backing directory (the synced state, plus the namespace).
    pub fn backing(&self, name: &str) -> PathBuf {
        self.dirs.path().join("backing").join(name)
    }
}

/// Mounts a lazy file system for `test`, or says why it cannot and returns `None`; under
/// `COINFLOW_STRICT=1` (CI) it fails the test instead.
pub fn mount_or_skip(test: &str) -> Option<Mounted> {
    if let Err(why) = LazyFs::available() {
        if std::env::var("COINFLOW_STRICT").as_deref() == Ok("1") {
            panic!("{test}: the lazy file system cannot work here, and COINFLOW_STRICT=1: {why}");
        }
        // Straight to stderr, past libtest's capture, so `cargo test` shows it.
        let _ = writeln!(
            std::io::stderr(),
            "=== SKIPPED {test}: the lazy file system cannot work here: {why}"
        );
        return None;
    }
    let dirs = tempfile::tempdir().expect("scratch directory");
    let (backing, mnt) = (dirs.path().join("backing"), dirs.path().join("mnt"));
    std::fs::create_dir(&backing).expect("backing directory");
    std::fs::create_dir(&mnt).expect("mountpoint");
    let fs = LazyFs::mount(&backing, &mnt).expect("mount");
    Some(Mounted { fs, dirs })
}

/// The whole content of `path`.
pub fn content(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
