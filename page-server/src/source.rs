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
    /// and answers `Some(pfn)`.
    fn next_data(&self, pfn: u64) -> Option<u64> {
        (pfn < self.pages()).then_some(pfn)
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
