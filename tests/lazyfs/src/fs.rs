//! The FUSE side: a passthrough over the backing directory that keeps each file's
//! unsynced data in a [`Pending`] until that file is `fsync`ed.
//!
//! Inodes: every backing object the kernel has looked up gets an inode number of ours
//! (never reused within one mount), keyed by the backing object's `(st_dev, st_ino)`, with
//! its current backing path. Renames update the path (and, for a directory, the paths of
//! everything known below it); an unlink, rmdir or rename that removes the last name of a
//! backing object detaches our inode from its key, so a new file that the backing file
//! system gives the same inode number gets a fresh inode here. A file with pending data is
//! remembered even after the kernel forgets it, so its data is not lost before a crash.
//!
//! All requests run on fuser's single session thread; the state sits behind one mutex so
//! [`crate::LazyFs`] can read counters and, at a crash, what was dropped.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{
    DirBuilderExt, DirEntryExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use crate::pending::Pending;

/// How long the kernel may cache names and attributes. Everything goes through this mount,
/// so the kernel's view cannot go stale; the value only bounds how often it asks.
const TTL: Duration = Duration::from_secs(1);

/// `readdir` names of backing objects we have no inode for with this bit set, so they can
/// never equal one of our inode numbers (the kernel only passes them on as `d_ino`).
const FOREIGN: u64 = 1 << 63;

/// Counters that outlive one mount session.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) fsyncs: AtomicU64,
    pub(crate) fdatasyncs: AtomicU64,
    pub(crate) dir_fsyncs: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) bytes_synced: AtomicU64,
}

/// What a crash dropped, or what is pending now.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PendingTotals {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    pub(crate) writes: u64,
}

/// One backing object the kernel knows by our inode number.
#[derive(Debug)]
struct Node {
    /// Current backing path (meaningless once `key` is `None`).
    path: PathBuf,
    /// `(st_dev, st_ino)` of the backing object, `None` once its last name is gone.
    key: Option<(u64, u64)>,
    /// The kernel's lookup count.
    lookups: u64,
    /// Open file handles.
    opens: u64,
    /// The backing file, open while handles are open (and when needed again).
    file: Option<File>,
    /// Unsynced data.
    pending: Option<Pending>,
}

/// The inode table and the open directory listings of one mount session.
#[derive(Debug)]
pub(crate) struct Inner {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
    next_ino: u64,
    dirs: HashMap<u64, Vec<(u64, FileType, std::ffi::OsString)>>,
    next_fh: u64,
}

/// The state one session's file system and the [`crate::LazyFs`] handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    pub(crate) counters: Arc<Counters>,
}

impl Shared {
    /// A fresh inode table over `root`.
    pub(crate) fn new(root: &Path, counters: Arc<Counters>) -> io::Result<Self> {
        let meta = fs::metadata(root)?;
        let mut nodes = HashMap::new();
        let key = (meta.dev(), meta.ino());
        nodes.insert(
            INodeNo::ROOT.0,
            Node {
                path: root.to_path_buf(),
                key: Some(key),
                lookups: 1,
                opens: 0,
                file: None,
                pending: None,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, INodeNo::ROOT.0);
        Ok(Self {
            inner: Mutex::new(Inner {
                nodes,
                by_key,
                next_ino: INodeNo::ROOT.0 + 1,
                dirs: HashMap::new(),
                next_fh: 1,
            }),
            counters,
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// Drops every inode's unsynced data (the session is over: a crash).
    pub(crate) fn clear(&mut self) {
        for n in self.nodes.values_mut() {
            n.pending = None;
            n.file = None;
        }
    }

    /// Files holding unsynced data, and how much.
    pub(crate) fn pending_totals(&self) -> PendingTotals {
        let mut t = PendingTotals::default();
        for p in self.nodes.values().filter_map(|n| n.pending.as_ref()) {
            t.files += 1;
            t.bytes += p.written();
            t.writes += p.writes();
        }
        t
    }

    fn node(&mut self, ino: INodeNo) -> Result<&mut Node, Errno> {
        self.nodes.get_mut(&ino.0).ok_or(Errno::ESTALE)
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        match self.nodes.get(&ino.0) {
            Some(n) if n.key.is_some() => Ok(n.path.clone()),
            _ => Err(Errno::ESTALE),
        }
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    /// Our inode for the backing object at `path` with `meta`, making one if new; counts a
    /// lookup.
    fn remember(&mut self, path: PathBuf, meta: &fs::Metadata) -> u64 {
        let key = (meta.dev(), meta.ino());
        let ino = match self.by_key.get(&key) {
            Some(&ino) => ino,
            None => {
                let ino = self.next_ino;
                self.next_ino += 1;
                self.by_key.insert(key, ino);
                self.nodes.insert(
                    ino,
                    Node {
                        path: path.clone(),
                        key: Some(key),
                        lookups: 0,
                        opens: 0,
                        file: None,
                        pending: None,
                    },
                );
                ino
            }
        };
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.path = path;
            n.lookups += 1;
        }
        ino
    }

    /// The backing object at `path` (with `meta`, read before it went) lost a name: if it
    /// was the last, detach our inode from its key and drop its unsynced data unless a
    /// handle still uses it.
    fn unlinked(&mut self, meta: &fs::Metadata) {
        if !meta.is_dir() && meta.nlink() > 1 {
            return;
        }
        let Some(ino) = self.by_key.remove(&(meta.dev(), meta.ino())) else {
            return;
        };
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.key = None;
        }
        self.maybe_release(ino);
    }

    /// Drops what an inode no longer needs: a detached inode's unsynced data once no handle
    /// uses it, and the inode once the kernel has forgotten it and nothing is pending.
    fn maybe_release(&mut self, ino: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        let Some(n) = self.nodes.get_mut(&ino) else {
            return;
        };
        if n.opens == 0 {
            n.file = None;
            if n.key.is_none() {
                n.pending = None;
            }
        }
        if n.lookups == 0 && n.opens == 0 && n.pending.is_none() {
            if let Some(key) = n.key
                && self.by_key.get(&key) == Some(&ino)
            {
                self.by_key.remove(&key);
            }
            self.nodes.remove(&ino);
        }
    }

    /// The backing file of a regular-file inode, opened (read-write if allowed) if needed.
    fn file(&mut self, ino: INodeNo) -> Result<&mut Node, Errno> {
        let n = self.node(ino)?;
        if n.file.is_none() {
            if n.key.is_none() {
                return Err(Errno::ESTALE);
            }
            let file = match OpenOptions::new().read(true).write(true).open(&n.path) {
                Ok(f) => f,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS)) => {
                    File::open(&n.path)?
                }
                Err(e) => return Err(e.into()),
            };
            n.file = Some(file);
        }
        Ok(n)
    }

    /// Attributes of an inode as the writer sees them (size includes pending data).
    fn attr(&mut self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let n = self.node(ino)?;
        let meta = match (&n.file, n.key) {
            (Some(f), _) => f.metadata()?,
            (None, Some(_)) => fs::symlink_metadata(&n.path)?,
            (None, None) => return Err(Errno::ESTALE),
        };
        Ok(file_attr(ino.0, &meta, n.pending.as_ref()))
    }

    /// Makes an inode's pending data durable: applies it to the backing file and syncs.
    fn sync(&mut self, ino: INodeNo, datasync: bool, counters: &Counters) -> Result<(), Errno> {
        let n = self.file(ino)?;
        let Some(file) = n.file.as_ref() else {
            return Err(Errno::EIO);
        };
        if let Some(p) = &n.pending {
            p.apply(file)?;
        }
        if datasync {
            file.sync_data()?;
        } else {
            file.sync_all()?;
        }
        if let Some(p) = n.pending.take() {
            counters
                .bytes_synced
                .fetch_add(p.written(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// The pending state of an inode, starting one over its backing file if none.
    fn pending(&mut self, ino: INodeNo) -> Result<(&File, &mut Pending), Errno> {
        let Node {
            file: Some(file),
            pending,
            ..
        } = self.file(ino)?
        else {
            return Err(Errno::EIO);
        };
        if pending.is_none() {
            *pending = Some(Pending::new(file.metadata()?.len()));
        }
        match pending {
            Some(p) => Ok((&*file, p)),
            None => Err(Errno::EIO),
        }
    }

    /// Replaces the path prefix `from` by `to` in every inode below a renamed directory.
    fn moved(&mut self, from: &Path, to: &Path) {
        for n in self.nodes.values_mut() {
            if n.key.is_some()
                && let Ok(rest) = n.path.strip_prefix(from)
                && !rest.as_os_str().is_empty()
            {
                n.path = to.join(rest);
            }
        }
    }
}

/// `secs`/`nsecs` since the epoch as a `SystemTime` (the epoch if out of range).
fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = Duration::from_nanos(u64::try_from(nsecs).unwrap_or(0));
    let whole = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(whole)
    } else {
        UNIX_EPOCH.checked_sub(whole)
    };
    t.and_then(|t| t.checked_add(nanos)).unwrap_or(UNIX_EPOCH)
}

fn kind(meta: &fs::Metadata) -> FileType {
    FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile)
}

fn file_attr(ino: u64, meta: &fs::Metadata, pending: Option<&Pending>) -> FileAttr {
    let size = pending.map_or(meta.len(), Pending::size);
    let changed = pending.and_then(Pending::modified);
    let mtime = changed.unwrap_or_else(|| time(meta.mtime(), meta.mtime_nsec()));
    let ctime = changed.unwrap_or_else(|| time(meta.ctime(), meta.ctime_nsec()));
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: meta.blocks().max(size.div_ceil(512)),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime,
        ctime,
        crtime: time(meta.ctime(), meta.ctime_nsec()),
        kind: kind(meta),
        perm: (meta.mode() & 0o7777) as u16,
        nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: u32::try_from(meta.rdev()).unwrap_or(0),
        blksize: u32::try_from(meta.blksize()).unwrap_or(4096),
        flags: 0,
    }
}

fn when(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// The file system handed to fuser for one mount session.
#[derive(Debug)]
pub(crate) struct LazyFsImpl {
    pub(crate) shared: Arc<Shared>,
}

impl LazyFsImpl {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    /// Looks up `path` after it was made and answers with its entry.
    fn entry(&self, s: &mut Inner, path: PathBuf, reply: ReplyEntry) {
        match fs::symlink_metadata(&path) {
            Ok(meta) => {
                let ino = s.remember(path, &meta);
                let pending = s.nodes.get(&ino).and_then(|n| n.pending.as_ref());
                reply.entry(&TTL, &file_attr(ino, &meta, pending), Generation(0));
            }
            Err(e) => reply.error(e.into()),
        }
    }

    /// Removes `name` from `parent` with `remove` (a file or an empty directory), dropping
    /// what was pending for it.
    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEmpty,
        remove: fn(&std::path::Path) -> std::io::Result<()>,
    ) {
        let mut s = self.lock();
        let r = (|| {
            let path = s.child(parent, name)?;
            let meta = fs::symlink_metadata(&path)?;
            remove(&path)?;
            s.unlinked(&meta);
            Ok(())
        })();
        done(reply, r);
    }
}

fn done(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for LazyFsImpl {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.lock();
        match s.child(parent, name) {
            Ok(path) => self.entry(&mut s, path, reply),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut s = self.lock();
        if let Some(n) = s.nodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
        }
        s.maybe_release(ino.0);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        let r = (|| -> Result<FileAttr, Errno> {
            let n = s.node(ino)?;
            let path = n.path.clone();
            // Through the open file where there is one (it may have lost its name).
            if let Some(mode) = mode {
                let perm = fs::Permissions::from_mode(mode & 0o7777);
                match &n.file {
                    Some(f) => f.set_permissions(perm)?,
                    None => fs::set_permissions(&path, perm)?,
                }
            }
            if uid.is_some() || gid.is_some() {
                match &n.file {
                    Some(f) => std::os::unix::fs::fchown(f, uid, gid)?,
                    None => std::os::unix::fs::lchown(&path, uid, gid)?,
                }
            }
            if let Some(size) = size {
                let (_, p) = s.pending(ino)?;
                p.truncate(size);
            }
            if atime.is_some() || mtime.is_some() {
                let mut times = fs::FileTimes::new();
                if let Some(t) = atime {
                    times = times.set_accessed(when(t));
                }
                if let Some(t) = mtime {
                    times = times.set_modified(when(t));
                }
                match s.node(ino)?.file.as_ref() {
                    Some(f) => f.set_times(times)?,
                    None => File::open(&path)?.set_times(times)?,
                }
            }
            s.attr(ino)
        })();
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let path = self.lock().path(ino);
        match path.and_then(|p| fs::read_link(p).map_err(Errno::from)) {
            Ok(target) => reply.data(target.as_os_str().as_encoded_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r = s.child(parent, name).and_then(|path| {
            fs::DirBuilder::new()
                .mode(mode & !umask & 0o7777)
                .create(&path)?;
            Ok(path)
        });
        match r {
            Ok(path) => self.entry(&mut s, path, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |p| fs::remove_file(p));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |p| fs::remove_dir(p));
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r = s.child(parent, link_name).and_then(|path| {
            std::os::unix::fs::symlink(target, &path)?;
            Ok(path)
        });
        match r {
            Ok(path) => self.entry(&mut s, path, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let r = (|| {
            if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
                return Err(Errno::EINVAL);
            }
            let from = s.child(parent, name)?;
            let to = s.child(newparent, newname)?;
            let src = fs::symlink_metadata(&from)?;
            let dst = fs::symlink_metadata(&to).ok();
            if dst.is_some() && flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            fs::rename(&from, &to)?;
            if let Some(dst) = dst
                && (dst.dev(), dst.ino()) != (src.dev(), src.ino())
            {
                s.unlinked(&dst);
            }
            if let Some(&ino) = s.by_key.get(&(src.dev(), src.ino()))
                && let Some(n) = s.nodes.get_mut(&ino)
            {
                n.path = to.clone();
            }
            if src.is_dir() {
                s.moved(&from, &to);
            }
            Ok(())
        })();
        done(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r = (|| {
            let from = s.path(ino)?;
            let to = s.child(newparent, newname)?;
            fs::hard_link(&from, &to)?;
            Ok(to)
        })();
        match r {
            Ok(path) => self.entry(&mut s, path, reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.lock();
        let fh = s.next_fh;
        match s.file(ino) {
            Ok(n) => {
                n.opens += 1;
                s.next_fh += 1;
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.lock();
        let r = (|| -> Result<Vec<u8>, Errno> {
            let n = s.file(ino)?;
            let Some(file) = n.file.as_ref() else {
                return Err(Errno::EIO);
            };
            match &n.pending {
                Some(p) => Ok(p.read(file, offset, size)?),
                None => {
                    let mut buf = vec![0; size as usize];
                    let mut done = 0;
                    while done < buf.len() {
                        match file.read_at(&mut buf[done..], offset + done as u64) {
                            Ok(0) => break,
                            Ok(k) => done += k,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    buf.truncate(done);
                    Ok(buf)
                }
            }
        })();
        match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        let r = s
            .pending(ino)
            .and_then(|(file, p)| p.write(file, offset, data).map_err(Errno::from));
        match r {
            Ok(()) => {
                let c = &self.shared.counters;
                c.writes.fetch_add(1, Ordering::Relaxed);
                c.bytes_written
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX));
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        if let Some(n) = s.nodes.get_mut(&ino.0) {
            n.opens = n.opens.saturating_sub(1);
        }
        s.maybe_release(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let c = &self.shared.counters;
        if datasync {
            c.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        } else {
            c.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        let r = self.lock().sync(ino, datasync, c);
        done(reply, r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.lock();
        let r = (|| -> Result<u64, Errno> {
            let path = s.path(ino)?;
            let dir_dev = fs::metadata(&path)?.dev();
            let mut list = vec![
                (ino.0, FileType::Directory, ".".into()),
                (ino.0, FileType::Directory, "..".into()),
            ];
            for e in fs::read_dir(&path)? {
                let e = e?;
                let kind = e
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                let known = s.by_key.get(&(dir_dev, e.ino())).copied();
                list.push((known.unwrap_or(FOREIGN | e.ino()), kind, e.file_name()));
            }
            let fh = s.next_fh;
            s.next_fh += 1;
            s.dirs.insert(fh, list);
            Ok(fh)
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.lock();
        let Some(list) = s.dirs.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock().dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Namespace operations are applied at once; syncing the backing directory keeps
        // the passthrough honest but changes nothing this model drops.
        self.shared
            .counters
            .dir_fsyncs
            .fetch_add(1, Ordering::Relaxed);
        let path = self.lock().path(ino);
        let r = path.and_then(|p| Ok(File::open(p)?.sync_all()?));
        done(reply, r);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let path = self.lock().path(ino);
        let r = path
            .and_then(|p| nix::sys::statvfs::statvfs(&p).map_err(|e| Errno::from_i32(e as i32)));
        match r {
            Ok(v) => reply.statfs(
                v.blocks(),
                v.blocks_free(),
                v.blocks_available(),
                v.files(),
                v.files_free(),
                u32::try_from(v.block_size()).unwrap_or(4096),
                u32::try_from(v.name_max()).unwrap_or(255),
                u32::try_from(v.fragment_size()).unwrap_or(4096),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.lock();
        let r = (|| -> Result<(FileAttr, u64), Errno> {
            let path = s.child(parent, name)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .create_new(flags & libc::O_EXCL != 0)
                .mode(mode & !umask & 0o7777)
                .open(&path)?;
            let meta = file.metadata()?;
            let ino = s.remember(path, &meta);
            let fh = s.next_fh;
            s.next_fh += 1;
            let n = s.node(INodeNo(ino))?;
            n.opens += 1;
            if n.file.is_none() {
                n.file = Some(file);
            }
            if flags & libc::O_TRUNC != 0 && meta.len() > 0 {
                let (_, p) = s.pending(INodeNo(ino))?;
                p.truncate(0);
            }
            Ok((s.attr(INodeNo(ino))?, fh))
        })();
        match r {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let r = match mode {
            // Allocation is not content: only the size the file grows to is modelled.
            0 => s.pending(ino).map(|(_, p)| {
                let end = offset.saturating_add(length);
                if end > p.size() {
                    p.truncate(end);
                }
            }),
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(Errno::EOPNOTSUPP),
        };
        done(reply, r);
    }
}
