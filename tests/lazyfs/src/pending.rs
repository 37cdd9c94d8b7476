//! The written-but-unsynced state of one file: what a writer has done to it since its last
//! `fsync`, kept in memory over the untouched backing file.
//!
//! The logical file (what readers see) is, in order: the backing file's bytes below `cut`
//! (the lowest size the file was truncated to since the last sync; bytes of the backing
//! file at or past it are hidden and read as zero), then whole 4 KiB pages written since,
//! overlaid, and all of it limited to `size`. A write copies only the pages it touches (a
//! page it covers partly is first filled from the logical file), so memory grows with the
//! data written, not with the file. [`Pending::apply`] writes that state into the backing
//! file; the caller then syncs it.
//!
//! Invariant: whenever `size` is below the backing file's length, `cut <= size`, so bytes
//! past `size` in any page or in the visible backing file are zero, and growing the file
//! again (by a write past the end or a truncate upwards) shows zeros, as POSIX requires.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::SystemTime;

/// Size of one buffered page.
pub(crate) const PAGE: u64 = 4096;

/// What one file holds that its backing file does not yet.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The file's logical size.
    size: u64,
    /// Backing bytes at or past this offset are hidden (the file was truncated there).
    cut: Option<u64>,
    /// Page index to the page's full logical content.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Bytes passed to `write` since the last sync.
    written: u64,
    /// `write` calls since the last sync.
    writes: u64,
    /// When the content last changed (the backing file's mtime is not touched until sync).
    modified: Option<SystemTime>,
}

/// Reads `buf.len()` bytes at `off` from `file`; whatever lies past its end reads as zero.
fn read_full(file: &File, off: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// `n` as an index into a buffer (offsets within one request or page always fit).
fn idx(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl Pending {
    /// Nothing buffered yet over a backing file of `backing_len` bytes.
    pub(crate) fn new(backing_len: u64) -> Self {
        Self {
            size: backing_len,
            cut: None,
            pages: BTreeMap::new(),
            written: 0,
            writes: 0,
            modified: None,
        }
    }

    /// When a write or truncation last changed the file, if one did.
    pub(crate) fn modified(&self) -> Option<SystemTime> {
        self.modified
    }

    /// The file's logical size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes passed to `write` since the last sync.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// `write` calls since the last sync.
    pub(crate) fn writes(&self) -> u64 {
        self.writes
    }

    /// Fills `buf` with the backing file's visible bytes at `off` (zero past `cut`).
    fn base(&self, file: &File, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let visible_end = self.cut.unwrap_or(u64::MAX);
        let n = idx(visible_end.saturating_sub(off)).min(buf.len());
        read_full(file, off, &mut buf[..n])?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Reads up to `len` bytes at `off` of the logical file.
    pub(crate) fn read(&self, file: &File, off: u64, len: u32) -> io::Result<Vec<u8>> {
        let end = off.saturating_add(u64::from(len)).min(self.size);
        if off >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0; idx(end - off)];
        self.base(file, off, &mut buf)?;
        for (&page, data) in self.pages.range(off / PAGE..=(end - 1) / PAGE) {
            let start = page * PAGE;
            let from = start.max(off);
            let to = (start + PAGE).min(end);
            buf[idx(from - off)..idx(to - off)]
                .copy_from_slice(&data[idx(from - start)..idx(to - start)]);
        }
        Ok(buf)
    }

    /// Writes `data` at `off` of the logical file (past its end leaves a hole of zeros).
    pub(crate) fn write(&mut self, file: &File, off: u64, data: &[u8]) -> io::Result<()> {
        let end = off.saturating_add(data.len() as u64);
        if data.is_empty() {
            return Ok(());
        }
        for page in off / PAGE..=(end - 1) / PAGE {
            let start = page * PAGE;
            let from = start.max(off);
            let to = (start + PAGE).min(end);
            let slot = match self.pages.entry(page) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let mut fresh = vec![0; idx(PAGE)].into_boxed_slice();
                    let covered = from == start && to == start + PAGE;
                    if !covered && start < self.size {
                        // Only the part below the logical size holds data; the rest is zero.
                        let keep = idx((self.size - start).min(PAGE));
                        let visible_end = self.cut.unwrap_or(u64::MAX);
                        let n = idx(visible_end.saturating_sub(start)).min(keep);
                        read_full(file, start, &mut fresh[..n])?;
                    }
                    v.insert(fresh)
                }
            };
            slot[idx(from - start)..idx(to - start)]
                .copy_from_slice(&data[idx(from - off)..idx(to - off)]);
        }
        self.size = self.size.max(end);
        self.written += data.len() as u64;
        self.writes += 1;
        self.modified = Some(SystemTime::now());
        Ok(())
    }

    /// Sets the logical size to `size` (shrinking drops data past it; growing adds zeros).
    pub(crate) fn truncate(&mut self, size: u64) {
        if size < self.size {
            self.cut = Some(self.cut.map_or(size, |c| c.min(size)));
            let first_gone = size.div_ceil(PAGE);
            self.pages.retain(|&page, _| page < first_gone);
            if !size.is_multiple_of(PAGE)
                && let Some(page) = self.pages.get_mut(&(size / PAGE))
            {
                page[idx(size % PAGE)..].fill(0);
            }
        }
        self.size = size;
        self.modified = Some(SystemTime::now());
    }

    /// Makes the backing file hold the logical file (not synced: the caller syncs).
    pub(crate) fn apply(&self, file: &File) -> io::Result<()> {
        if let Some(cut) = self.cut {
            file.set_len(cut)?;
        }
        for (&page, data) in &self.pages {
            let start = page * PAGE;
            let n = idx((self.size.saturating_sub(start)).min(PAGE));
            file.write_all_at(&data[..n], start)?;
        }
        file.set_len(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A reference model: the whole logical file as one vector.
    struct Model(Vec<u8>);

    impl Model {
        fn write(&mut self, off: usize, data: &[u8]) {
            if self.0.len() < off + data.len() {
                self.0.resize(off + data.len(), 0);
            }
            self.0[off..off + data.len()].copy_from_slice(data);
        }
        fn truncate(&mut self, size: usize) {
            self.0.resize(size, 0);
        }
    }

    fn backing(content: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        let file = f.reopen().unwrap();
        (f, file)
    }

    fn whole(p: &Pending, file: &File) -> Vec<u8> {
        p.read(file, 0, u32::MAX).unwrap()
    }

    /// xorshift64*, deterministic.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    fn reads_backing_then_overlays_writes() {
        let (_t, f) = backing(&[1; 10_000]);
        let mut p = Pending::new(10_000);
        p.write(&f, 5_000, &[2; 100]).unwrap();
        let mut m = Model(vec![1; 10_000]);
        m.write(5_000, &[2; 100]);
        assert_eq!(whole(&p, &f), m.0);
        assert_eq!(p.read(&f, 4_990, 20).unwrap(), m.0[4_990..5_010]);
        assert_eq!(p.read(&f, 20_000, 20).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn shrink_then_grow_shows_zeros_not_old_backing_bytes() {
        let (_t, f) = backing(&[7; 9_000]);
        let mut p = Pending::new(9_000);
        let mut m = Model(vec![7; 9_000]);
        p.write(&f, 4_000, &[3; 200]).unwrap();
        m.write(4_000, &[3; 200]);
        p.truncate(4_100);
        m.truncate(4_100);
        p.truncate(12_000);
        m.truncate(12_000);
        p.write(&f, 6_000, &[9; 10]).unwrap();
        m.write(6_000, &[9; 10]);
        assert_eq!(whole(&p, &f), m.0);
        p.apply(&f).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut got).unwrap();
        assert_eq!(got, m.0);
    }

    #[test]
    fn random_operations_match_the_model_and_apply_exactly() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for round in 0..40 {
            let start = (next(&mut seed) % 20_000) as usize;
            let initial: Vec<u8> = (0..start).map(|i| (i * 31 + round) as u8).collect();
            let (_t, f) = backing(&initial);
            let mut p = Pending::new(start as u64);
            let mut m = Model(initial);
            for step in 0..60 {
                match next(&mut seed) % 4 {
                    0 => {
                        let size = (next(&mut seed) % 30_000) as usize;
                        p.truncate(size as u64);
                        m.truncate(size);
                    }
                    _ => {
                        let off = (next(&mut seed) % 30_000) as usize;
                        let len = (next(&mut seed) % 9_000) as usize;
                        let data: Vec<u8> = (0..len).map(|i| (i + step) as u8 | 1).collect();
                        p.write(&f, off as u64, &data).unwrap();
                        m.write(off, &data);
                    }
                }
                assert_eq!(p.size(), m.0.len() as u64);
                let off = next(&mut seed) % 32_000;
                let len = (next(&mut seed) % 10_000) as u32;
                let want: Vec<u8> =
                    m.0.iter()
                        .skip(off as usize)
                        .take(len as usize)
                        .copied()
                        .collect();
                assert_eq!(
                    p.read(&f, off, len).unwrap(),
                    want,
                    "round {round} step {step}"
                );
            }
            // The backing file is untouched until apply, then holds exactly the model.
            p.apply(&f).unwrap();
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut &f, &mut got).unwrap();
            assert_eq!(got, m.0, "round {round}");
        }
    }
}
