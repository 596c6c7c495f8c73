//! The session record: what a source needs to finish a committed move
//! after its process died, written beside a guest-RAM file that outlives it
//! (`ferry-source --mem-file`).
//!
//! It is written (atomically, then synced) just before `Commit`, so a
//! source that crashes after the switch-over can be restarted with
//! `ferry-source --resume FILE`: the new process reads the record, serves
//! the memory file's pages to the destination through the ordinary resume
//! handshake, and removes both files once the destination says `Complete`.

use std::path::{Path, PathBuf};

use ferry_protocol::{Hello, MigrationMode, Role, OPT_MODE, PAGE_SIZE, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};

/// Why a session record could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading or writing the file failed.
    #[error("session record {path}: {source}")]
    Io {
        /// The record.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a session record this build understands.
    #[error("session record {path} is damaged: {why}")]
    Damaged {
        /// The record.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// A committed session, as the source saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Format version (1).
    pub version: u32,
    /// The destination's address.
    pub addr: String,
    /// The session id.
    pub session_id: u64,
    /// Features the source asked for.
    pub features: u64,
    /// Guest RAM in bytes (the memory file's size).
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// How the memory moves.
    pub mode: MigrationMode,
}

impl SessionRecord {
    /// Where the record of memory file `mem_file` lives.
    pub fn path_for(mem_file: &Path) -> PathBuf {
        let mut p = mem_file.as_os_str().to_owned();
        p.push(".session");
        PathBuf::from(p)
    }

    /// The record of `hello`'s session with `addr`.
    pub fn of(addr: &str, hello: &Hello, mode: MigrationMode) -> Self {
        Self {
            version: 1,
            addr: addr.to_string(),
            session_id: hello.session_id,
            features: hello.features,
            mem_size: hello.mem_size,
            vcpus: hello.vcpus,
            mode,
        }
    }

    /// The session's control-connection `Hello`.
    pub fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            role: Role::Control,
            session_id: self.session_id,
            features: self.features,
            mem_size: self.mem_size,
            vcpus: self.vcpus,
            page_size: PAGE_SIZE as u32,
            options: vec![(OPT_MODE, vec![self.mode as u8])],
        }
    }

    /// Writes the record to `path` (a temporary file, synced, renamed).
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        crate::os::write_atomically(path, &json).map_err(|source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads and checks the record at `path`.
    pub fn read(path: &Path) -> Result<Self, RecordError> {
        let damaged = |why: String| RecordError::Damaged {
            path: path.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.len() > 64 << 10 {
            return Err(damaged(format!("{} bytes is too large", meta.len())));
        }
        let bytes = std::fs::read(path).map_err(|source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let r: Self = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        if r.version != 1 {
            return Err(damaged(format!("unknown version {}", r.version)));
        }
        if !crate::layout::valid_mem_size(r.mem_size) {
            return Err(damaged(format!("memory size {}", r.mem_size)));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("ferry-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram.session");
        let r = SessionRecord {
            version: 1,
            addr: "127.0.0.1:7000".into(),
            session_id: 42,
            features: 3,
            mem_size: 256 << 20,
            vcpus: 2,
            mode: MigrationMode::Postcopy,
        };
        r.write(&path).unwrap();
        assert_eq!(SessionRecord::read(&path).unwrap(), r);
        assert_eq!(r.hello().session_id, 42);
        std::fs::write(&path, b"{not json").unwrap();
        let e = SessionRecord::read(&path).unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
        let mut v2 = serde_json::to_value(&r).unwrap();
        v2["version"] = 2.into();
        std::fs::write(&path, v2.to_string()).unwrap();
        assert!(SessionRecord::read(&path)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
