//! Two small things the engine and its tools ask of the OS more than once:
//! a file replaced whole, and random bits.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A file that replaces `path` whole, or not at all: written under a
/// temporary name in the same directory (named for this process, so
/// writers in other processes never share one), then [`Self::commit`]
/// syncs it, renames it over `path` and syncs the directory. Dropped
/// uncommitted (an error on the way), it is removed and `path` is as it
/// was. A reader that opened the old file keeps reading the old file.
pub struct ReplacingFile {
    file: std::fs::File,
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl ReplacingFile {
    /// Creates the temporary file for `path`.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let file = std::fs::File::create(&tmp)?;
        Ok(Self {
            file,
            tmp,
            path: path.to_path_buf(),
            committed: false,
        })
    }

    /// The file being written.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Syncs the file and puts it in place of `path`, durably.
    pub fn commit(mut self) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        std::fs::File::open(parent_dir(&self.path))?.sync_all()
    }
}

/// The directory `path` is in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

impl Drop for ReplacingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` through a [`ReplacingFile`]: a reader sees the
/// old file or the whole new one, and after a crash the new one is on disk.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let f = ReplacingFile::create(path)?;
    f.file().write_all(bytes)?;
    f.commit()
}

/// 64 bits from the OS's random number source (`/dev/urandom`).
pub fn random_u64() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}
