//! The daemon's run directory: one set of files per VM process, named by a
//! random VM id (never the session id, which is a secret of the session).
//!
//! ```text
//! DIR/                      mode 0700
//!   vm-ID.json              the record an operator lists: pid, addr, files
//!   vm-ID.sock              the VM's API socket (mode 0600)
//!   vm-ID.serial            the guest console
//!   vm-ID.log               the VM process's own log (stderr/stdout)
//!   vm-ID.stats.json        the migration statistics, once complete
//!   vm-ID.addr              the VM process's listening address (transient)
//! ```

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The run directory, created owner-only.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

/// The files of one VM process.
#[derive(Debug, Clone)]
pub(super) struct VmFiles {
    pub(super) record: PathBuf,
    pub(super) api: PathBuf,
    pub(super) serial: PathBuf,
    pub(super) log: PathBuf,
    pub(super) stats: PathBuf,
    pub(super) addr: PathBuf,
}

impl RunDir {
    /// Creates `path` (and its parents) if needed and makes it mode 0700.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub(super) fn files(&self, vm: &str) -> VmFiles {
        let p = |ext: &str| self.path.join(format!("{vm}.{ext}"));
        VmFiles {
            record: p("json"),
            api: p("sock"),
            serial: p("serial"),
            log: p("log"),
            stats: p("stats.json"),
            addr: p("addr"),
        }
    }
}

/// The records of the VM processes a daemon lists in `dir` now
/// (`vm-*.json`, sorted by start time), for `ferry-ctl vms`.
pub fn list(dir: &Path) -> std::io::Result<Vec<serde_json::Value>> {
    let mut out: Vec<serde_json::Value> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let record = name.starts_with("vm-") && name.ends_with(".json");
        if record && !name.ends_with(".stats.json") {
            // A record being replaced, or removed meanwhile, is skipped.
            if let Ok(v) = std::fs::read(&p).map(|b| serde_json::from_slice(&b)) {
                out.extend(v.ok());
            }
        }
    }
    out.sort_by_key(|v| v["started_unix_ms"].as_u64().unwrap_or(0));
    Ok(out)
}
