//! A snapshot's replay list: the pages a recording lazy restore of it
//! faulted on, in order (the REAP idea); that restore holds its background
//! push while the guest faults, so the list is the guest's working set.
//! Later lazy restores send those pages in one batch before the vCPUs run
//! (a single pre-copy pass), so the guest finds its working set already
//! there instead of faulting on it page by page.
//!
//! File `SNAPSHOT.replay`: magic `FERRYRPL`, version u32, count u32, then
//! `count` page numbers (u64), then a CRC-32 of everything before it; all
//! little-endian. It is a hint: a missing or damaged list is ignored (with
//! a warning), and every page number is checked against the snapshot's
//! size, so it can change what is sent first but never what is sent.

use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FERRYRPL";
const VERSION: u32 = 1;
/// Most pages a list may name (1 Mi pages: 4 GiB of working set).
const MAX_PAGES: u64 = 1 << 20;

/// Where the replay list of `snapshot` lives.
pub fn path_for(snapshot: &Path) -> PathBuf {
    let mut p = snapshot.as_os_str().to_owned();
    p.push(".replay");
    PathBuf::from(p)
}

/// Reads the list at `path` for a snapshot of `pages` pages. `Ok(None)`
/// when there is none; an error names what is wrong with a damaged one.
pub fn read(path: &Path, pages: u64) -> Result<Option<Vec<u64>>, String> {
    let bytes = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
        Ok(m) if m.len() > 20 + MAX_PAGES * 8 => {
            return Err(format!("{} bytes is too large", m.len()))
        }
        Ok(_) => std::fs::read(path).map_err(|e| e.to_string())?,
    };
    let body_len = bytes
        .len()
        .checked_sub(4)
        .ok_or("shorter than its checksum")?;
    let (body, crc) = bytes.split_at(body_len);
    let want = u32::from_le_bytes(crc.try_into().map_err(|_| "no checksum")?);
    if crc32fast::hash(body) != want {
        return Err("checksum mismatch".into());
    }
    let (head, list) = body.split_at_checked(16).ok_or("shorter than its header")?;
    if &head[..8] != MAGIC {
        return Err("not a replay list (bad magic)".into());
    }
    let version = u32::from_le_bytes(head[8..12].try_into().map_err(|_| "header")?);
    if version != VERSION {
        return Err(format!("unknown version {version}"));
    }
    let count = u32::from_le_bytes(head[12..16].try_into().map_err(|_| "header")?) as usize;
    if list.len() != count * 8 {
        return Err(format!(
            "{count} pages declared, {} bytes of them",
            list.len()
        ));
    }
    let pfns: Vec<u64> = list
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8])))
        .collect();
    if let Some(bad) = pfns.iter().find(|&&p| p >= pages) {
        return Err(format!("page {bad} is past the snapshot's {pages} pages"));
    }
    Ok(Some(pfns))
}

/// Writes `pfns` (at most [`MAX_PAGES`] of them) as the list at `path`,
/// replacing it whole (clones of one template may record at once: the last
/// one wins, never a mix).
pub fn write(path: &Path, pfns: &[u64]) -> std::io::Result<()> {
    let pfns = &pfns[..pfns.len().min(MAX_PAGES as usize)];
    let mut b = Vec::with_capacity(20 + pfns.len() * 8);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(pfns.len() as u32).to_le_bytes());
    for p in pfns {
        b.extend_from_slice(&p.to_le_bytes());
    }
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    crate::os::write_atomically(path, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("ferry-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.replay");
        assert_eq!(read(&p, 100).unwrap(), None);
        write(&p, &[5, 3, 99]).unwrap();
        assert_eq!(read(&p, 100).unwrap(), Some(vec![5, 3, 99]));
        assert!(read(&p, 50).unwrap_err().contains("past"));
        let mut b = std::fs::read(&p).unwrap();
        b[17] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(read(&p, 100).unwrap_err().contains("checksum"));
        std::fs::write(&p, b"FERRYRPL").unwrap();
        assert!(read(&p, 100).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
