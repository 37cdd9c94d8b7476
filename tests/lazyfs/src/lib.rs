//! A test-only **lazy file system** (after Jepsen's LazyFS): a FUSE passthrough over a
//! backing directory that keeps every write not yet made durable by `fsync`/`fdatasync`
//! in memory, and throws it away on a simulated power loss ([`LazyFs::crash`]).
//!
//! `kill -9` tests cannot tell "acknowledged after fsync" from "acknowledged after
//! write": the kernel's page cache survives a killed process. Mounting the service's data
//! directory through a [`LazyFs`] and calling [`LazyFs::crash`] after the kill shows the
//! service exactly what a power loss would have left on disk.
//!
//! # Semantics
//!
//! - **Buffered per file until that file is synced:** data operations on a regular file:
//!   `write` (anywhere, including sparse writes past the end; `O_APPEND` writes arrive with
//!   the offset the kernel computed, so they are ordinary writes here), truncation
//!   (`truncate`, `ftruncate`, `open(O_TRUNC)`: `setattr` with a size), and `fallocate`
//!   (mode 0 grows the size; `FALLOC_FL_KEEP_SIZE` changes nothing visible; other modes are
//!   refused with `EOPNOTSUPP`). They are held as 4 KiB pages over the untouched backing
//!   file (a page is copied only when written), and reads, `stat` and `mmap` see the file
//!   as the writer left it: backing plus pending. `fsync` or `fdatasync` of the file writes
//!   its pending state into the backing file and then syncs the backing file for real;
//!   only then does it return. Syncing one file makes nothing of another file durable.
//! - **Applied at once** (a journaling file system that already committed its metadata is
//!   one valid outcome of a power loss, and the one modelled): namespace operations
//!   (`create`, `mkdir`, `unlink`, `rmdir`, `rename`, `link`, `symlink`) and metadata
//!   (`chmod`, `chown`, timestamps) go straight to the backing directory. So a file created
//!   and never synced survives a crash **empty** (or at its last synced content), and a
//!   file written, not synced, then renamed over another one leaves the target empty after
//!   a crash: both are outcomes a real file system may produce. What this model does not
//!   produce is the *other* valid outcome, a created or renamed name that vanishes; code
//!   that needs a new name to survive must still `fsync` the directory, and this harness
//!   will not catch it if it does not. Directory `fsync` is passed through and counted.
//! - **Unlinked files:** when the last name of a file goes (unlink, or a rename over it),
//!   its pending data is dropped once no open handle still uses it (handles opened before
//!   keep reading and writing it, as POSIX says).
//! - **[`LazyFs::crash`]:** unmounts (the kernel first writes back what it still holds,
//!   such as dirty pages of a shared `mmap`, and those writes land as pending), drops all
//!   pending data, and mounts again on the same mountpoint with a fresh session and a cold
//!   kernel cache. Afterwards the mount shows exactly the synced state. It refuses with
//!   [`LazyFsError::Busy`] while a process still has something open under the mount: kill
//!   (and reap) the processes using it first, as a power loss would.
//! - **Caching and mmap:** files are opened with the kernel's normal write-through caching
//!   (`FOPEN_KEEP_CACHE`, no `direct_io`), so shared writable `mmap` works (SQLite's WAL
//!   index, the `-shm` file, needs it). POSIX and `flock` locks are left to the kernel,
//!   which keeps them locally for a FUSE file system that does not implement them.
//!   Permissions are checked by the kernel (`default_permissions`). Files are created with
//!   the daemon's owner (the test's user), not the caller's.
//! - **Inodes** are ours, never reused within one mount, keyed by the backing object's
//!   `(st_dev, st_ino)` and tracking its current path across renames (of the file or any
//!   directory above it). A file with pending data is kept even when the kernel forgets
//!   its inode. Hard links work but are modelled minimally (one path per inode).
//!
//! # What it can and cannot show
//!
//! It catches an acknowledgement given before the fsync that makes it durable (a lost
//! commit), and any reliance on the page cache surviving. It models a single-disk power
//! loss at file granularity: it does not tear sectors or pages, does not reorder or
//! partially apply one file's writes before its sync (a sync applies them all), does not
//! lose synced data to a drive's volatile cache, and does not drop unsynced directory
//! entries.
//!
//! # Where it works
//!
//! Linux with `/dev/fuse`, as root (fuser mounts with `mount(2)` itself; no libfuse is
//! needed to build or run) or as a user with `fusermount3` on `PATH` (Debian's `fuse3`
//! package). [`LazyFs::available`] says whether it works here; the crate's tests skip
//! with a notice when it does not, and fail instead under `COINFLOW_STRICT=1`.

mod fs;
mod pending;

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption};

use crate::fs::{Counters, LazyFsImpl, PendingTotals, Shared};

/// How long [`LazyFs::crash`] keeps retrying an unmount that the kernel refuses as busy
/// (the processes just killed may still be closing their files).
const BUSY_WAIT: Duration = Duration::from_secs(3);

/// Why a lazy file system could not be mounted, crashed or unmounted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LazyFsError {
    /// A file system call on one of the given directories failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory concerned.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The backing directory or the mountpoint is not a directory.
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The mountpoint has entries.
    #[error("mountpoint {} is not empty", .0.display())]
    NotEmpty(PathBuf),
    /// The backing directory and the mountpoint contain one another.
    #[error(
        "the backing directory {} and the mountpoint {} must not contain one another",
        backing.display(),
        mountpoint.display()
    )]
    Nested {
        /// The backing directory.
        backing: PathBuf,
        /// The mountpoint.
        mountpoint: PathBuf,
    },
    /// The FUSE mount failed.
    #[error("mounting a lazy file system at {}: {source}", mountpoint.display())]
    Mount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// A process still has a file or directory open under the mount.
    #[error(
        "{} is still in use (a process has something open under it): stop it before crash()",
        .0.display()
    )]
    Busy(PathBuf),
    /// The unmount failed for another reason.
    #[error("unmounting {}: {reason}", mountpoint.display())]
    Unmount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Counters for assertions. Totals run over the [`LazyFs`]'s whole life (all sessions);
/// the `dropped_*` fields describe the last [`LazyFs::crash`] only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `fsync` calls on files.
    pub fsyncs: u64,
    /// `fdatasync` calls on files.
    pub fdatasyncs: u64,
    /// `fsync`/`fdatasync` calls on directories.
    pub dir_fsyncs: u64,
    /// `write` requests (the kernel may merge or split the caller's calls).
    pub writes: u64,
    /// Bytes passed to `write`.
    pub bytes_written: u64,
    /// Bytes of writes that a sync made durable.
    pub bytes_synced: u64,
    /// Files holding unsynced data now.
    pub pending_files: u64,
    /// Bytes written and not yet synced now.
    pub pending_bytes: u64,
    /// Crashes simulated.
    pub crashes: u64,
    /// Files whose unsynced data the last crash dropped (a file that was only truncated
    /// counts too).
    pub dropped_files: u64,
    /// Bytes of writes the last crash dropped.
    pub dropped_bytes: u64,
    /// `write` requests the last crash dropped.
    pub dropped_writes: u64,
}

/// A mounted lazy view of a backing directory. Dropping it unmounts.
#[derive(Debug)]
pub struct LazyFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    crashes: u64,
    dropped: PendingTotals,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LazyFsError + '_ {
    move |source| LazyFsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The first executable called `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// One unmount attempt (`lazy`: detach now, finish when the last user goes).
fn unmount_once(mountpoint: &Path, lazy: bool) -> Result<(), LazyFsError> {
    if is_root() {
        let flags = if lazy {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        match nix::mount::umount2(mountpoint, flags) {
            // EINVAL: not a mount point (any more).
            Ok(()) | Err(nix::errno::Errno::EINVAL) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                return Err(LazyFsError::Busy(mountpoint.to_path_buf()));
            }
            // Root without the capability (a user namespace): fusermount3 may still do it.
            Err(nix::errno::Errno::EPERM) => {}
            Err(e) => {
                return Err(LazyFsError::Unmount {
                    mountpoint: mountpoint.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        }
    }
    let unmount_failed = |reason: String| LazyFsError::Unmount {
        mountpoint: mountpoint.to_path_buf(),
        reason,
    };
    let Some(bin) = which("fusermount3").or_else(|| which("fusermount")) else {
        return Err(unmount_failed(
            "not root, and no fusermount3 on PATH".to_string(),
        ));
    };
    let mut cmd = Command::new(bin);
    cmd.arg(if lazy { "-uz" } else { "-u" }).arg(mountpoint);
    let out = cmd
        .output()
        .map_err(|e| unmount_failed(format!("running fusermount: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("busy") {
        Err(LazyFsError::Busy(mountpoint.to_path_buf()))
    } else if stderr.contains("not found in") || stderr.contains("not mounted") {
        Ok(())
    } else {
        Err(unmount_failed(stderr.trim().to_string()))
    }
}

/// Unmounts, retrying while the kernel says busy, for up to `wait`.
fn unmount_retrying(mountpoint: &Path, wait: Duration) -> Result<(), LazyFsError> {
    let deadline = Instant::now() + wait;
    loop {
        match unmount_once(mountpoint, false) {
            Err(LazyFsError::Busy(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Mounts a fresh session over `backing` at `mountpoint`.
fn start(
    backing: &Path,
    mountpoint: &Path,
    counters: &Arc<Counters>,
) -> Result<(BackgroundSession, Arc<Shared>), LazyFsError> {
    let shared = Arc::new(Shared::new(backing, counters.clone()).map_err(io_error(backing))?);
    let fs = LazyFsImpl {
        shared: shared.clone(),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("coinflow-lazyfs".to_string()),
        MountOption::Subtype("lazyfs".to_string()),
        MountOption::DefaultPermissions,
    ];
    let session =
        fuser::spawn_mount(fs, mountpoint, &config).map_err(|source| LazyFsError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        })?;
    Ok((session, shared))
}

/// Mounts and unmounts an empty lazy file system in a scratch directory.
fn probe() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse does not exist (no FUSE in this kernel or container)".to_string());
    }
    if !is_root() && which("fusermount3").is_none() && which("fusermount").is_none() {
        return Err("not root, and no fusermount3 on PATH (install the fuse3 package)".to_string());
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let scratch = std::env::temp_dir().join(format!(
        "coinflow-lazyfs-probe-{}-{nanos}",
        std::process::id()
    ));
    let (backing, mnt) = (scratch.join("backing"), scratch.join("mnt"));
    let made = std::fs::create_dir_all(&backing).and_then(|()| std::fs::create_dir_all(&mnt));
    let result = match made {
        Ok(()) => LazyFs::mount(&backing, &mnt)
            .map(drop)
            .map_err(|e| format!("a trial mount failed: {e}")),
        Err(e) => Err(format!("making {}: {e}", scratch.display())),
    };
    // Best effort: a scratch directory left in /tmp is harmless.
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

impl LazyFs {
    /// Whether lazy mounts can work here (`/dev/fuse` present and `fusermount3` on PATH,
    /// or root able to mount); Err(reason) otherwise. The answer comes from a trial mount,
    /// made once per process.
    pub fn available() -> Result<(), String> {
        static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
        PROBE.get_or_init(probe).clone()
    }

    /// Mounts a lazy view of the existing directory `backing` at the existing, empty
    /// directory `mountpoint`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<LazyFs, LazyFsError> {
        let backing = backing.canonicalize().map_err(io_error(backing))?;
        let mountpoint = mountpoint.canonicalize().map_err(io_error(mountpoint))?;
        for dir in [&backing, &mountpoint] {
            if !dir.is_dir() {
                return Err(LazyFsError::NotADirectory(dir.clone()));
            }
        }
        let mut entries = std::fs::read_dir(&mountpoint).map_err(io_error(&mountpoint))?;
        if entries.next().is_some() {
            return Err(LazyFsError::NotEmpty(mountpoint));
        }
        if backing.starts_with(&mountpoint) || mountpoint.starts_with(&backing) {
            return Err(LazyFsError::Nested {
                backing,
                mountpoint,
            });
        }
        let counters = Arc::new(Counters::default());
        let (session, shared) = start(&backing, &mountpoint, &counters)?;
        Ok(LazyFs {
            backing,
            mountpoint,
            session: Some(session),
            shared,
            counters,
            crashes: 0,
            dropped: PendingTotals::default(),
        })
    }

    /// The mountpoint (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The backing directory (canonical). It holds exactly the synced state plus the
    /// namespace operations; do not change it while mounted.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// A simulated power loss: every write not yet made durable by fsync/fdatasync is
    /// dropped, and the mount afterwards serves only what was synced. Call it while no
    /// process uses the mount (the test kill -9s the service first); otherwise it returns
    /// [`LazyFsError::Busy`] after a few seconds of retrying and leaves the mount as it was.
    pub fn crash(&mut self) -> Result<(), LazyFsError> {
        if let Some(session) = self.session.take() {
            if let Err(e) = unmount_retrying(&self.mountpoint, BUSY_WAIT) {
                self.session = Some(session);
                return Err(e);
            }
            // Unmounted: the session thread sees the connection end and returns. An error
            // it ends with changes nothing here.
            let _ = session.umount_and_join();
        }
        {
            let mut old = self.shared.lock();
            self.dropped = old.pending_totals();
            old.clear();
        }
        self.crashes += 1;
        // The old session's inode table and pending data go with its last reference.
        let (session, shared) = start(&self.backing, &self.mountpoint, &self.counters)?;
        self.session = Some(session);
        self.shared = shared;
        Ok(())
    }

    /// Counters for tests: syncs seen, bytes written and synced, what is pending now and
    /// what the last crash dropped.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let pending = self.shared.lock().pending_totals();
        Stats {
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            fdatasyncs: c.fdatasyncs.load(Ordering::Relaxed),
            dir_fsyncs: c.dir_fsyncs.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            bytes_synced: c.bytes_synced.load(Ordering::Relaxed),
            pending_files: pending.files,
            pending_bytes: pending.bytes,
            crashes: self.crashes,
            dropped_files: self.dropped.files,
            dropped_bytes: self.dropped.bytes,
            dropped_writes: self.dropped.writes,
        }
    }
}

impl Drop for LazyFs {
    /// Unmounts; never panics. A mount still in use after a few seconds is detached lazily
    /// (it goes away when its last user does).
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if unmount_retrying(&self.mountpoint, BUSY_WAIT).is_ok() {
            let _ = session.umount_and_join();
        } else {
            let _ = unmount_once(&self.mountpoint, true);
            // Not joined: the session thread ends when the last user closes its files.
            drop(session);
        }
    }
}
