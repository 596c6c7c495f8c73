//! Local disks that move with the memory (`--migrate-disk`), on the
//! destination.
//!
//! A migrated disk's 4 KiB blocks follow guest RAM in the migration's page
//! space. The destination writes the blocks that arrive (pushed, or
//! answers to demand requests) into its own file, and keeps two bitmaps
//! per disk:
//!
//! - `present`: the block holds its final content (from the source, or
//!   written by the guest here); a guest read of a block that is not
//!   present asks for it over the fault connection (through [`DiskSet`]'s
//!   request queue, served by the fault thread) and waits;
//! - `owned`: the guest wrote the block here. Data for it that arrives
//!   later (the push, a late demand answer) is dropped, so the push never
//!   overwrites a guest write.
//!
//! The check of `owned` and the write of arriving data happen under the
//! disk's lock, and so do a guest write and its marking, so the two can
//! never interleave. A guest write that covers a block only partly needs
//! the block's old content first: that block is fetched before the write.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_protocol::PageBitmap;
use tracing::{debug, info};
use vmm_sys_util::eventfd::EventFd;

/// Bytes per block: the page size of the page space.
pub const BLOCK: u64 = 4096;

/// How often a waiting reader looks again (it is also woken at once).
const RECHECK: Duration = Duration::from_millis(50);

/// Errors of a migrated disk's file.
#[derive(Debug, thiserror::Error)]
pub enum MigratedError {
    /// The file could not be created, sized or written.
    #[error("migrated disk {path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Pages outside every migrated disk.
    #[error("pages {pfn}+{count} are outside the migrated disks")]
    OutOfRange {
        /// First page.
        pfn: u64,
        /// Pages.
        count: u64,
    },
}

/// Block requests from the disks' readers to the fault thread.
#[derive(Debug)]
pub struct Requests {
    queue: Mutex<Vec<u64>>,
    wake: EventFd,
    /// Blocks asked for on demand (each counted once).
    pub asked: AtomicU64,
    /// Time guest disk requests spent waiting for blocks, µs.
    pub wait_us: AtomicU64,
    /// Arriving blocks dropped because the guest had written them here.
    pub dropped: AtomicU64,
}

impl Requests {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(Vec::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            asked: AtomicU64::new(0),
            wait_us: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    fn push(&self, pfns: &[u64]) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(pfns);
        let _ = self.wake.write(1);
    }

    /// The page numbers asked for since the last call.
    pub fn take(&self) -> Vec<u64> {
        let _ = self.wake.read();
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Readable when requests wait (for `poll`).
    pub fn fd(&self) -> &EventFd {
        &self.wake
    }
}

/// One migrated disk on the destination.
#[derive(Debug)]
pub struct DiskImage {
    /// Its virtio slot.
    pub slot: u32,
    path: PathBuf,
    /// Its first page in the page space.
    pub first_pfn: u64,
    file: File,
    /// Blocks that hold their final content.
    pub present: PageBitmap,
    /// Blocks the guest wrote here: arriving data for them is dropped.
    pub owned: PageBitmap,
    lock: Mutex<()>,
    arrived: Condvar,
    complete: AtomicBool,
    requests: Arc<Requests>,
}

impl DiskImage {
    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.present.pages()
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> MigratedError + '_ {
        move |source| MigratedError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    fn guard(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_complete(&self) {
        if self.present.is_full() && !self.complete.swap(true, Ordering::AcqRel) {
            info!(slot = self.slot, path = %self.path.display(), "every block of the migrated disk is here");
        }
    }

    /// Writes arriving data for blocks `first..` (a whole number of
    /// blocks), except blocks the guest owns; returns how many were new.
    pub fn install(&self, first: u64, data: &[u8]) -> Result<u64, MigratedError> {
        let n = data.len() as u64 / BLOCK;
        // One write per run of blocks the guest does not own.
        self.fill_unowned(first, n, |b, e| {
            let (off, end) = (
                ((b - first) * BLOCK) as usize,
                ((e - first) * BLOCK) as usize,
            );
            self.file
                .write_all_at(&data[off..end], b * BLOCK)
                .map_err(self.io("write"))
        })
    }

    /// Blocks `first..first+n` are zero on the source: punches them out,
    /// except blocks the guest owns; returns how many were new.
    pub fn install_zero(&self, first: u64, n: u64) -> Result<u64, MigratedError> {
        // One punch per run of blocks the guest does not own.
        self.fill_unowned(first, n, |b, e| {
            punch(&self.file, b * BLOCK, (e - b) * BLOCK).map_err(self.io("punch"))
        })
    }

    /// Calls `fill(b, e)` for each run `b..e` of blocks in `first..first+n`
    /// the guest does not own (counting the owned ones as dropped), under
    /// the disk's lock, then marks them present and wakes waiting reads;
    /// returns how many were new.
    fn fill_unowned(
        &self,
        first: u64,
        n: u64,
        mut fill: impl FnMut(u64, u64) -> Result<(), MigratedError>,
    ) -> Result<u64, MigratedError> {
        self.check(first, n)?;
        let g = self.guard();
        let mut newly = 0;
        let mut b = first;
        while b < first + n {
            if self.owned.get(b) {
                self.requests.dropped.fetch_add(1, Ordering::Relaxed);
                b += 1;
                continue;
            }
            let mut e = b + 1;
            while e < first + n && !self.owned.get(e) {
                e += 1;
            }
            fill(b, e)?;
            newly += self.present.set_range(b, e - b);
            b = e;
        }
        drop(g);
        self.arrived.notify_all();
        self.note_complete();
        Ok(newly)
    }

    /// The source says blocks went stale (hybrid's `Discard`, before the
    /// VM runs here): they must come again.
    pub fn discard(&self, first: u64, n: u64) -> Result<(), MigratedError> {
        self.check(first, n)?;
        let _g = self.guard();
        for b in first..first + n {
            self.present.clear(b);
        }
        self.complete.store(false, Ordering::Release);
        Ok(())
    }

    fn check(&self, first: u64, n: u64) -> Result<(), MigratedError> {
        if first.checked_add(n).is_none_or(|e| e > self.blocks()) {
            return Err(MigratedError::OutOfRange {
                pfn: self.first_pfn.saturating_add(first),
                count: n,
            });
        }
        Ok(())
    }

    /// Blocks covering bytes `start..end`.
    fn span(&self, start: u64, end: u64) -> (u64, u64) {
        let first = start / BLOCK;
        let last = end.div_ceil(BLOCK).min(self.blocks());
        (first, last)
    }

    /// Waits until every block in `blocks` is present, asking the fault
    /// thread for the missing ones. A guest request waits here as a vCPU
    /// waits in its page fault; nothing is ever read from a block that has
    /// not arrived.
    fn wait_for(&self, blocks: impl Iterator<Item = u64> + Clone) {
        if self.complete.load(Ordering::Acquire) {
            return;
        }
        let missing: Vec<u64> = blocks
            .clone()
            .filter(|&b| !self.present.get(b))
            .map(|b| self.first_pfn + b)
            .collect();
        if missing.is_empty() {
            return;
        }
        let t = Instant::now();
        debug!(
            slot = self.slot,
            blocks = missing.len(),
            "disk read waits for blocks"
        );
        self.requests
            .asked
            .fetch_add(missing.len() as u64, Ordering::Relaxed);
        self.requests.push(&missing);
        let mut g = self.guard();
        while blocks.clone().any(|b| !self.present.get(b)) {
            g = self
                .arrived
                .wait_timeout(g, RECHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        self.requests
            .wait_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Before a guest read of bytes `start..end`: every block is here.
    pub fn before_read(&self, start: u64, end: u64) {
        let (a, b) = self.span(start, end);
        self.wait_for(a..b);
    }

    /// Before a guest write of bytes `start..end`: the blocks it covers
    /// only partly are fetched first; the returned guard keeps arriving
    /// data out until [`WriteGuard::done`] marks every covered block the
    /// guest's.
    pub fn before_write(&self, start: u64, end: u64) -> WriteGuard<'_> {
        let (a, b) = self.span(start, end);
        let edges = [
            (!start.is_multiple_of(BLOCK)).then_some(a),
            (!end.is_multiple_of(BLOCK)).then(|| b - 1),
        ];
        let edges: Vec<u64> = edges.into_iter().flatten().filter(|&x| x < b).collect();
        self.wait_for(edges.iter().copied());
        WriteGuard {
            disk: self,
            _g: self.guard(),
            blocks: (a, b),
        }
    }
}

/// A guest write in progress on a migrated disk (see
/// [`DiskImage::before_write`]).
pub struct WriteGuard<'a> {
    disk: &'a DiskImage,
    _g: MutexGuard<'a, ()>,
    blocks: (u64, u64),
}

impl WriteGuard<'_> {
    /// The write reached the file: its blocks are the guest's from now on.
    pub fn done(self) {
        let (a, b) = self.blocks;
        if b > a {
            self.disk.owned.set_range(a, b - a);
            self.disk.present.set_range(a, b - a);
        }
        let d = self.disk;
        drop(self);
        d.arrived.notify_all();
        d.note_complete();
    }
}

fn punch(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    nix::fcntl::fallocate(
        file,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(std::io::Error::from)
}

/// The handle a virtio-blk device of a migrated disk holds (part of its
/// [`super::DiskConfig`], never saved).
#[derive(Debug, Clone)]
pub struct MigratedHandle(pub Arc<DiskImage>);

impl PartialEq for MigratedHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for MigratedHandle {}

/// Every migrated disk of an incoming VM, after guest RAM in the page
/// space.
#[derive(Debug)]
pub struct DiskSet {
    /// Pages of guest RAM: the first disk's first page.
    pub ram_pages: u64,
    /// The disks, in page-space order.
    pub disks: Vec<Arc<DiskImage>>,
    /// Demand requests for the fault thread.
    pub requests: Arc<Requests>,
    /// The files were put in place ([`DiskSet::commit`]).
    committed: AtomicBool,
}

/// Where a migrated disk's blocks land until the move commits: beside its
/// file, so that the rename into place stays on one file system.
pub fn incoming_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".ferry-incoming");
    PathBuf::from(p)
}

impl DiskSet {
    /// Creates each disk's file, `blocks` blocks long and sparse, for
    /// `(slot, blocks, path)` in page-space order: at
    /// [`incoming_path`]`(path)`, since `path` itself may hold data (a
    /// disk this host shares with the source, say) that a move which never
    /// commits must not touch. [`DiskSet::commit`] puts them in place; a
    /// set dropped before that removes them.
    pub fn create(ram_pages: u64, disks: &[(u32, u64, &Path)]) -> Result<Self, MigratedError> {
        let requests = Arc::new(Requests::new().map_err(|source| MigratedError::Io {
            path: PathBuf::new(),
            what: "eventfd",
            source,
        })?);
        let mut at = ram_pages;
        let mut out = Vec::new();
        for &(slot, blocks, path) in disks {
            let io = |what| {
                move |source| MigratedError::Io {
                    path: path.to_path_buf(),
                    what,
                    source,
                }
            };
            let incoming = incoming_path(path);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&incoming)
                .map_err(io("create"))?;
            file.set_len(blocks * BLOCK).map_err(io("set size"))?;
            info!(slot, blocks, path = %incoming.display(), "migrated disk: empty file ready (moved into place once the move commits)");
            out.push(Arc::new(DiskImage {
                slot,
                path: path.to_path_buf(),
                first_pfn: at,
                file,
                present: PageBitmap::new(blocks),
                owned: PageBitmap::new(blocks),
                lock: Mutex::new(()),
                arrived: Condvar::new(),
                complete: AtomicBool::new(false),
                requests: requests.clone(),
            }));
            at += blocks;
        }
        Ok(Self {
            ram_pages,
            disks: out,
            requests,
            committed: AtomicBool::new(false),
        })
    }

    /// The move committed: each disk's file replaces the one at its path
    /// (the file stays open, so blocks still arriving land in it).
    pub fn commit(&self) -> Result<(), MigratedError> {
        // A PATH that another VM or process writes (it holds a write lock,
        // see `super::image_lock`) is not replaced under it: the move's
        // devices cannot start, and the VM is discarded unrun.
        for d in &self.disks {
            let Ok(old) = File::open(&d.path) else {
                continue;
            };
            if super::image_lock::would_conflict(&old, super::image_lock::ImageLock::Shared)
                .unwrap_or(false)
            {
                return Err(d.io("in use by another VM or process, not replaced")(
                    std::io::ErrorKind::WouldBlock.into(),
                ));
            }
        }
        for d in &self.disks {
            std::fs::rename(incoming_path(&d.path), &d.path).map_err(d.io("move into place"))?;
            info!(slot = d.slot, path = %d.path.display(), "migrated disk in place");
        }
        self.committed.store(true, Ordering::Release);
        Ok(())
    }

    /// Pages of the whole page space (RAM and disks).
    pub fn total_pages(&self) -> u64 {
        self.ram_pages + self.disks.iter().map(|d| d.blocks()).sum::<u64>()
    }

    /// Blocks of every disk.
    pub fn blocks(&self) -> u64 {
        self.total_pages() - self.ram_pages
    }

    /// True when every block of every disk is present.
    pub fn complete(&self) -> bool {
        self.disks.iter().all(|d| d.present.is_full())
    }

    /// Blocks not present yet.
    pub fn missing(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| d.blocks() - d.present.count())
            .sum()
    }

    /// True when page `pfn` of the page space is a present disk block.
    pub fn present(&self, pfn: u64) -> bool {
        self.find(pfn).is_some_and(|(d, b)| d.present.get(b))
    }

    /// The disk holding page `pfn` and the block in it.
    fn find(&self, pfn: u64) -> Option<(&DiskImage, u64)> {
        self.disks
            .iter()
            .find(|d| pfn >= d.first_pfn && pfn - d.first_pfn < d.blocks())
            .map(|d| (&**d, pfn - d.first_pfn))
    }

    /// Applies `f(disk, first block, blocks)` to each disk's part of the
    /// pages `pfn..pfn+n` (all of them beyond RAM).
    fn each<T>(
        &self,
        pfn: u64,
        n: u64,
        mut f: impl FnMut(&DiskImage, u64, u64, u64) -> Result<T, MigratedError>,
    ) -> Result<Vec<T>, MigratedError> {
        let mut out = Vec::new();
        let mut at = pfn;
        let end = pfn
            .checked_add(n)
            .ok_or(MigratedError::OutOfRange { pfn, count: n })?;
        while at < end {
            let (d, b) = self.find(at).ok_or(MigratedError::OutOfRange {
                pfn: at,
                count: end - at,
            })?;
            let k = (d.blocks() - b).min(end - at);
            out.push(f(d, b, k, at - pfn)?);
            at += k;
        }
        Ok(out)
    }

    /// Writes data for pages `pfn..` (all beyond RAM); returns how many
    /// blocks were new.
    pub fn install(&self, pfn: u64, data: &[u8]) -> Result<u64, MigratedError> {
        let n = data.len() as u64 / BLOCK;
        let r = self.each(pfn, n, |d, b, k, off| {
            let off = (off * BLOCK) as usize;
            d.install(b, &data[off..off + (k * BLOCK) as usize])
        })?;
        Ok(r.into_iter().sum())
    }

    /// Pages `pfn..pfn+n` (all beyond RAM) are zero.
    pub fn install_zero(&self, pfn: u64, n: u64) -> Result<u64, MigratedError> {
        Ok(self
            .each(pfn, n, |d, b, k, _| d.install_zero(b, k))?
            .into_iter()
            .sum())
    }

    /// Pages `pfn..pfn+n` (all beyond RAM) went stale (hybrid `Discard`).
    pub fn discard(&self, pfn: u64, n: u64) -> Result<(), MigratedError> {
        self.each(pfn, n, |d, b, k, _| d.discard(b, k)).map(|_| ())
    }

    /// Sets, in `have` (a bitmap of the whole page space), every present
    /// block.
    pub fn mark_present_in(&self, have: &PageBitmap) {
        for d in &self.disks {
            for b in d.present.iter_set() {
                have.set(d.first_pfn + b);
            }
        }
    }
}

impl Drop for DiskSet {
    /// A move that never committed leaves the disks' paths as they were.
    fn drop(&mut self) {
        if !self.committed.load(Ordering::Acquire) {
            for d in &self.disks {
                let _ = std::fs::remove_file(incoming_path(&d.path));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(dir: &Path) -> DiskSet {
        let p = dir.join("d.img");
        DiskSet::create(16, &[(0, 8, &p)]).unwrap()
    }

    #[test]
    fn guest_writes_are_never_overwritten() {
        let dir = tempdir();
        let s = set(&dir);
        let d = &s.disks[0];
        let g = d.before_write(4096, 8192);
        d.file.write_all_at(&[7u8; 4096], 4096).unwrap();
        g.done();
        assert_eq!(s.install(16, &vec![1u8; 4 * 4096]).unwrap(), 3);
        assert_eq!(s.install_zero(17, 1).unwrap(), 0);
        let mut b = vec![0u8; 4 * 4096];
        d.file.read_exact_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 1));
        assert!(b[4096..8192].iter().all(|&x| x == 7));
        assert!(b[8192..].iter().all(|&x| x == 1));
        assert!(!s.complete());
        assert_eq!(s.missing(), 4);
        s.install_zero(20, 4).unwrap();
        assert!(s.complete());
        assert!(s.install(24, &[0u8; 4096]).is_err());
        assert!(s.install(15, &[0u8; 4096]).is_err());
        assert!(s.install_zero(u64::MAX, 2).is_err());
    }

    #[test]
    fn a_read_waits_for_its_blocks_and_asks_for_them() {
        let dir = tempdir();
        let s = Arc::new(set(&dir));
        let d = s.disks[0].clone();
        let reader = std::thread::spawn(move || d.before_read(8192, 3 * 4096));
        let asked = loop {
            let a = s.requests.take();
            if !a.is_empty() {
                break a;
            }
            std::thread::yield_now();
        };
        assert_eq!(asked, vec![18]);
        s.install(18, &[3u8; 4096]).unwrap();
        reader.join().unwrap();
        assert_eq!(s.requests.asked.load(Ordering::Relaxed), 1);
    }

    fn tempdir() -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "ferry-migrated-{}-{}",
            std::process::id(),
            crate::os::random_u64().unwrap_or(0)
        ));
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}
