//! Where the page server reads guest memory from.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ferry_protocol::PAGE_SIZE;
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

/// Guest memory as the page server sees it: `pages()` pages of 4096 bytes,
/// numbered by page frame number (pfn = byte offset / 4096).
pub trait PageSource: Send + Sync {
    /// Number of pages.
    fn pages(&self) -> u64;

    /// Fills `buf` (its length a multiple of 4096) with the pages starting at
    /// `pfn`.
    fn read(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()>;

    /// The first pfn `>= pfn` that may hold non-zero data, or `None` when
    /// every page from `pfn` on is known to be zero. The default knows nothing
    /// and answers `Some(pfn)`. The page server asks once per hole and
    /// trusts the answer for as long as it serves, since what it serves
    /// (a paused VM's memory, a snapshot) does not change meanwhile.
    fn next_data(&self, pfn: u64) -> Option<u64> {
        (pfn < self.pages()).then_some(pfn)
    }

    /// Pages `pfn..pfn+n` in place, when the source can lend them and
    /// knows that nothing changes them while they are lent; `None` (the
    /// default) means read them with [`PageSource::read`]. The page server
    /// sends lent pages straight from where they are, one copy fewer.
    fn lend(&self, _pfn: u64, _n: u64) -> Option<&[u8]> {
        None
    }

    /// Pages `pfn..pfn+n` in place, when they are mapped in this process
    /// (guest RAM): the building block of [`Frozen`].
    ///
    /// # Safety
    ///
    /// Nothing may write those pages while the returned slice lives.
    unsafe fn lend_unchecked(&self, _pfn: u64, _n: u64) -> Option<&[u8]> {
        None
    }
}

/// A source whose pages no one writes for as long as it lives, so it lends
/// them ([`PageSource::lend`]): a paused VM's RAM once the destination runs
/// the VM, since this side never runs it again.
pub struct Frozen<'a>(&'a dyn PageSource);

impl<'a> Frozen<'a> {
    /// Wraps `source`.
    ///
    /// # Safety
    ///
    /// Nothing may write `source`'s pages while the `Frozen` lives (for a
    /// VM's RAM: its vCPUs and devices are stopped and stay stopped).
    pub unsafe fn new(source: &'a dyn PageSource) -> Self {
        Self(source)
    }
}

impl PageSource for Frozen<'_> {
    fn pages(&self) -> u64 {
        self.0.pages()
    }

    fn read(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(pfn, buf)
    }

    fn next_data(&self, pfn: u64) -> Option<u64> {
        self.0.next_data(pfn)
    }

    fn lend(&self, pfn: u64, n: u64) -> Option<&[u8]> {
        // SAFETY: `Frozen::new`'s contract: nothing writes these pages
        // while `self`, which the slice borrows, lives.
        unsafe { self.0.lend_unchecked(pfn, n) }
    }

    unsafe fn lend_unchecked(&self, pfn: u64, n: u64) -> Option<&[u8]> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.0.lend_unchecked(pfn, n) }
    }
}

/// A [`PageSource`] backed by a file, typically the guest's memfd: pages are
/// read with `pread`, and holes are found with `lseek(SEEK_DATA)` so the
/// never-touched parts of a large guest cost nothing to skip.
///
/// `next_data` moves the file's shared offset; the server only uses
/// positioned reads, and guest memory is accessed through a mapping, so
/// nothing depends on it.
#[derive(Debug, Clone)]
pub struct FileSource {
    file: Arc<File>,
    pages: u64,
}

impl FileSource {
    /// A source over the first `pages` pages of `file`.
    pub fn new(file: Arc<File>, pages: u64) -> Self {
        Self { file, pages }
    }

    /// A source over the whole of `file` (its length rounded down to pages).
    pub fn from_file(file: Arc<File>) -> io::Result<Self> {
        let pages = file.metadata()?.len() / PAGE_SIZE as u64;
        Ok(Self::new(file, pages))
    }
}

/// Checks that a read of `len` bytes at `pfn` is whole pages inside a
/// source of `pages` pages; returns the page count.
pub fn check_read(pages: u64, pfn: u64, len: usize) -> io::Result<u64> {
    let count = (len / PAGE_SIZE) as u64;
    if !len.is_multiple_of(PAGE_SIZE) || pfn.checked_add(count).is_none_or(|e| e > pages) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("read of {len} bytes at page {pfn} of a {pages}-page source"),
        ));
    }
    Ok(count)
}

impl PageSource for FileSource {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        check_read(self.pages, pfn, buf.len())?;
        self.file.read_exact_at(buf, pfn * PAGE_SIZE as u64)
    }

    fn next_data(&self, pfn: u64) -> Option<u64> {
        if pfn >= self.pages {
            return None;
        }
        let Ok(offset) = i64::try_from(pfn * PAGE_SIZE as u64) else {
            return Some(pfn);
        };
        let at = match lseek(&*self.file, offset, Whence::SeekData) {
            Ok(at) => at,
            // ENXIO: no data at or after `offset`. Anything else (say, a file
            // system without SEEK_DATA): assume data everywhere.
            Err(Errno::ENXIO) => return None,
            Err(_) => return Some(pfn),
        };
        let data = at as u64 / PAGE_SIZE as u64;
        (data < self.pages).then_some(data.max(pfn))
    }
}

/// Several sources one after the other in one page space: guest RAM, then
/// the blocks of each migrated disk (`--migrate-disk`). A read that spans
/// two parts is split; `next_data` asks each part in turn.
pub struct ConcatSource {
    parts: Vec<(u64, Box<dyn PageSource>)>,
    pages: u64,
}

impl ConcatSource {
    /// `parts` in page-space order.
    pub fn new(parts: Vec<Box<dyn PageSource>>) -> Self {
        let mut at = 0u64;
        let parts = parts
            .into_iter()
            .map(|p| {
                let first = at;
                at = at.saturating_add(p.pages());
                (first, p)
            })
            .collect();
        Self { parts, pages: at }
    }

    /// The part holding `pfn`: its index and first page.
    fn part(&self, pfn: u64) -> Option<(usize, u64)> {
        self.parts
            .iter()
            .enumerate()
            .rev()
            .find(|(_, (first, p))| pfn >= *first && pfn - first < p.pages())
            .map(|(i, (first, _))| (i, *first))
    }
}

impl PageSource for ConcatSource {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
        check_read(self.pages, pfn, buf.len())?;
        let mut at = pfn;
        let mut rest = buf;
        while !rest.is_empty() {
            let Some((i, first)) = self.part(at) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("page {at} is in no part"),
                ));
            };
            let part = &self.parts[i].1;
            let n = ((part.pages() - (at - first)) as usize).min(rest.len() / PAGE_SIZE);
            let (now, later) = rest.split_at_mut(n * PAGE_SIZE);
            part.read(at - first, now)?;
            rest = later;
            at += n as u64;
        }
        Ok(())
    }

    fn next_data(&self, pfn: u64) -> Option<u64> {
        let (start, _) = self.part(pfn)?;
        self.parts[start..].iter().find_map(|(first, p)| {
            let local = pfn.saturating_sub(*first);
            p.next_data(local).map(|d| first + d)
        })
    }

    /// Lends a run that lies within one part (a run across two is read).
    fn lend(&self, pfn: u64, n: u64) -> Option<&[u8]> {
        let (i, first) = self.part(pfn)?;
        let part = &self.parts[i].1;
        (pfn - first + n <= part.pages()).then(|| part.lend(pfn - first, n))?
    }

    unsafe fn lend_unchecked(&self, pfn: u64, n: u64) -> Option<&[u8]> {
        let (i, first) = self.part(pfn)?;
        let part = &self.parts[i].1;
        if pfn - first + n > part.pages() {
            return None;
        }
        // SAFETY: the caller's promise, passed on.
        unsafe { part.lend_unchecked(pfn - first, n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fill(u64, u8);
    impl PageSource for Fill {
        fn pages(&self) -> u64 {
            self.0
        }
        fn read(&self, pfn: u64, buf: &mut [u8]) -> io::Result<()> {
            check_read(self.0, pfn, buf.len())?;
            buf.fill(self.1);
            Ok(())
        }
        fn next_data(&self, pfn: u64) -> Option<u64> {
            (self.1 != 0 && pfn < self.0).then_some(pfn)
        }
    }

    #[test]
    fn concatenated_parts() {
        let c = ConcatSource::new(vec![
            Box::new(Fill(3, 1)),
            Box::new(Fill(2, 0)),
            Box::new(Fill(4, 7)),
        ]);
        assert_eq!(c.pages(), 9);
        let mut buf = vec![9u8; 4 * PAGE_SIZE];
        c.read(2, &mut buf).unwrap();
        assert_eq!(buf[0], 1);
        assert_eq!(buf[PAGE_SIZE], 0);
        assert_eq!(buf[2 * PAGE_SIZE], 0);
        assert_eq!(buf[3 * PAGE_SIZE], 7);
        assert_eq!(c.next_data(3), Some(5));
        assert_eq!(c.next_data(0), Some(0));
        assert_eq!(c.next_data(9), None);
        assert!(c.read(8, &mut buf).is_err());
    }
}
