//! Two small things the engine and its tools ask of the OS more than once:
//! a file replaced whole, and random bits.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file in the same
/// directory (named for this process, so writers in other processes never
/// share one), synced, then renamed into place: a reader sees the old
/// file or the whole new one, and after a crash the new one is on disk.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// 64 bits from the OS's random number source (`/dev/urandom`).
pub fn random_u64() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}
