//! A VM as one portable file (the OVA idea, in Ferry's terms): a tar
//! archive with a JSON descriptor and the VM's snapshot.
//!
//! ```text
//! ferry-vm.json   {"format": "ferry-vm", "version": 1, "vm": {...},
//!                  "members": [{"name": "vm.snap", "size": N, "sha256": "..."}]}
//! vm.snap         the snapshot (state, page bitmap, non-zero pages)
//! ```
//!
//! Import trusts nothing in the file: every member must be a plain name
//! the descriptor lists (no directories, links, absolute paths or `..`:
//! the tar-slip check), sizes and SHA-256 sums must match, and the format
//! version must be known, all before a VM is built.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ferry_engine::os::{random_u64, ReplacingFile};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The descriptor's name inside the archive.
pub const DESCRIPTOR: &str = "ferry-vm.json";
/// The snapshot's name inside the archive.
pub const SNAPSHOT: &str = "vm.snap";
/// The format name in the descriptor.
pub const FORMAT: &str = "ferry-vm";
/// The archive version this build writes and reads.
pub const VERSION: u32 = 1;
/// The descriptor is small; a larger one is refused unread.
const MAX_DESCRIPTOR: u64 = 1 << 20;

/// Why an archive could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The archive is damaged, foreign, or not what its descriptor says.
    #[error("archive {path}: {why}")]
    Invalid {
        /// The archive.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// The VM's configuration, as recorded in the descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Devices (none yet: Ferry VMs have only a serial console).
    #[serde(default)]
    pub devices: Vec<serde_json::Value>,
}

/// One member of the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its name (a plain file name).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of its bytes, lower-case hex.
    pub sha256: String,
}

/// The archive's descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Always [`FORMAT`].
    pub format: String,
    /// The archive version.
    pub version: u32,
    /// The VM.
    pub vm: VmConfig,
    /// Every other member, with its checksum.
    pub members: Vec<Member>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// SHA-256 and size of a file.
fn digest(path: &Path) -> Result<(String, u64), ArchiveError> {
    let mut f = BufReader::new(File::open(path).map_err(io(path))?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&h.finalize()), size))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes an archive at `out` from the snapshot at `snapshot` of a VM with
/// configuration `vm`. The archive is written to a temporary name and
/// renamed into place, so a reader never sees half of one.
pub fn write(out: &Path, vm: VmConfig, snapshot: &Path) -> Result<Descriptor, ArchiveError> {
    let (sha256, size) = digest(snapshot)?;
    let desc = Descriptor {
        format: FORMAT.into(),
        version: VERSION,
        vm,
        members: vec![Member {
            name: SNAPSHOT.into(),
            size,
            sha256,
        }],
    };
    let json = serde_json::to_vec_pretty(&desc).unwrap_or_default();
    // Written aside and renamed into place (removed on an error): the
    // file at `out` is the whole archive or what it was before.
    let target = ReplacingFile::create(out).map_err(io(out))?;
    let mut tar = tar::Builder::new(BufWriter::new(target.file()));
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, DESCRIPTOR, &json[..])
        .map_err(io(out))?;
    let mut snap = File::open(snapshot).map_err(io(snapshot))?;
    tar.append_file(SNAPSHOT, &mut snap).map_err(io(out))?;
    let mut w = tar.into_inner().map_err(io(out))?;
    w.flush().map_err(io(out))?;
    drop(w);
    target.commit().map_err(io(out))?;
    Ok(desc)
}

/// A verified archive, unpacked into a directory of its own.
#[derive(Debug)]
pub struct Unpacked {
    /// The descriptor.
    pub descriptor: Descriptor,
    /// The directory the members were written to (removed on drop).
    pub dir: PathBuf,
}

impl Unpacked {
    /// The snapshot's path.
    pub fn snapshot(&self) -> PathBuf {
        self.dir.join(SNAPSHOT)
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads and checks the archive at `path`, unpacking its members into a
/// new directory under `work` (so it can be restored from): the
/// descriptor must come first, be valid and name a known version; every
/// other member must be a plain file the descriptor lists, with the size
/// and SHA-256 it says; none may be missing. Nothing else is written.
pub fn unpack(path: &Path, work: &Path) -> Result<Unpacked, ArchiveError> {
    let invalid = |why: String| ArchiveError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let file = File::open(path).map_err(io(path))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut entries = archive
        .entries()
        .map_err(|e| invalid(format!("not a tar archive: {e}")))?;
    // The descriptor first.
    let mut first = entries
        .next()
        .ok_or_else(|| invalid("empty archive".into()))?
        .map_err(|e| invalid(format!("not a tar archive: {e}")))?;
    let name = member_name(&first).map_err(&invalid)?;
    if name != DESCRIPTOR {
        return Err(invalid(format!(
            "not a Ferry VM archive: first member is {name:?}, not {DESCRIPTOR}"
        )));
    }
    if first.size() > MAX_DESCRIPTOR {
        return Err(invalid(format!("descriptor of {} bytes", first.size())));
    }
    let mut json = Vec::new();
    first
        .read_to_end(&mut json)
        .map_err(|e| invalid(format!("reading the descriptor: {e}")))?;
    let desc: Descriptor =
        serde_json::from_slice(&json).map_err(|e| invalid(format!("bad descriptor: {e}")))?;
    if desc.format != FORMAT {
        return Err(invalid(format!("format {:?}, not {FORMAT:?}", desc.format)));
    }
    if desc.version != VERSION {
        return Err(invalid(format!(
            "archive version {}, this build reads version {VERSION}",
            desc.version
        )));
    }
    for m in &desc.members {
        check_plain_name(&m.name).map_err(&invalid)?;
    }
    let dir = private_dir(work).map_err(io(work))?;
    let unpacked = Unpacked {
        descriptor: desc,
        dir,
    };
    let mut seen = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("damaged archive: {e}")))?;
        let name = member_name(&entry).map_err(&invalid)?;
        let Some(m) = unpacked.descriptor.members.iter().find(|m| m.name == name) else {
            return Err(invalid(format!("member {name:?} is not in the descriptor")));
        };
        if seen.contains(&name) {
            return Err(invalid(format!("member {name:?} appears twice")));
        }
        if entry.size() != m.size {
            return Err(invalid(format!(
                "member {name:?} is {} bytes, the descriptor says {}",
                entry.size(),
                m.size
            )));
        }
        let target = unpacked.dir.join(&name);
        let mut out = BufWriter::new(File::create(&target).map_err(io(&target))?);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| invalid(format!("member {name:?} is cut short: {e}")))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io(&target))?;
            got += n as u64;
        }
        out.flush().map_err(io(&target))?;
        if got != m.size {
            return Err(invalid(format!(
                "member {name:?} is cut short: {got} of {} bytes",
                m.size
            )));
        }
        let sum = hex(&h.finalize());
        if sum != m.sha256 {
            return Err(invalid(format!(
                "member {name:?} checksum mismatch: sha256 {sum}, the descriptor says {}",
                m.sha256
            )));
        }
        seen.push(name);
    }
    for m in &unpacked.descriptor.members {
        if !seen.contains(&m.name) {
            return Err(invalid(format!("member {:?} is missing", m.name)));
        }
    }
    if !seen.iter().any(|n| n == SNAPSHOT) {
        return Err(invalid(format!("no {SNAPSHOT} member")));
    }
    Ok(unpacked)
}

/// Makes a new directory under `work` that only this user can enter
/// (0700), with a random name, failing rather than reuse anything already
/// there (as `mkdtemp`): no one else can put, swap or link a member in it
/// between its check and its restore.
fn private_dir(work: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut tries = 0;
    loop {
        let dir = work.join(format!("ferry-import-{:016x}", random_u64()?));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
            r => return r.map(|()| dir),
        }
    }
}

/// The entry's name, if it is a regular file with a plain name.
fn member_name<R: Read>(e: &tar::Entry<'_, R>) -> Result<String, String> {
    if e.header().entry_type() != tar::EntryType::Regular {
        return Err(format!(
            "member of type {:?}: only plain files are allowed",
            e.header().entry_type()
        ));
    }
    let raw = e.path_bytes();
    let name = std::str::from_utf8(&raw)
        .map_err(|_| "a member name is not UTF-8".to_string())?
        .to_string();
    check_plain_name(&name)?;
    Ok(name)
}

/// The tar-slip check: a member name must be one plain path component.
fn check_plain_name(name: &str) -> Result<(), String> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0');
    if plain {
        Ok(())
    } else {
        Err(format!(
            "member name {name:?} escapes the target directory (only plain file names are allowed)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_unpack_into_a_new_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let work = std::env::temp_dir().join(format!("ferry-archive-test-{}", std::process::id()));
        std::fs::create_dir_all(&work).unwrap();
        let (a, b) = (private_dir(&work).unwrap(), private_dir(&work).unwrap());
        assert_ne!(a, b);
        for d in [&a, &b] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", d.display());
        }
        std::fs::remove_dir_all(&work).unwrap();
    }

    #[test]
    fn plain_names_only() {
        assert!(check_plain_name("vm.snap").is_ok());
        for bad in ["../x", "/etc/passwd", "a/b", "..", ".", "", "x\\y"] {
            assert!(check_plain_name(bad).is_err(), "{bad:?}");
        }
    }
}
