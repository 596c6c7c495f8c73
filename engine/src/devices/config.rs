//! How a disk is described: `--disk PATH[,readonly][,serial=ID]`.

use std::path::PathBuf;

/// Longest serial a virtio-blk device reports (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL: usize = 20;
/// Longest backing-file path accepted (in the state blob too).
pub const MAX_PATH: usize = 4096;

/// A virtio-blk device backed by a raw file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image. With shared storage both hosts see it at this path.
    pub path: PathBuf,
    /// The guest may not write (`VIRTIO_BLK_F_RO`); the file is opened
    /// read-only.
    pub readonly: bool,
    /// What `VIRTIO_BLK_T_GET_ID` answers: printable ASCII, at most
    /// [`MAX_SERIAL`] bytes.
    pub serial: String,
    /// Emulated service latency: the device's I/O thread waits this long
    /// (µs) after a notification before it serves the queue, so requests
    /// stay in flight longer (tests of the drain at a pause, demos). A
    /// property of this host's device, not of the guest: it is not saved
    /// in the VM state.
    pub latency_us: u64,
    /// A migrated local disk on a destination (`--migrate-disk`): blocks
    /// that have not arrived yet are fetched before the guest reads them.
    /// Host-side, never saved.
    pub migrated: Option<super::migrated::MigratedHandle>,
}

impl DiskConfig {
    /// A writable disk on `path` whose serial is `serial`.
    pub fn new(path: impl Into<PathBuf>, serial: &str) -> Self {
        Self {
            path: path.into(),
            readonly: false,
            serial: serial.to_string(),
            latency_us: 0,
            migrated: None,
        }
    }

    /// Parses `PATH[,readonly][,serial=ID][,latency_us=N]`; the serial
    /// defaults to `ferry<index>`.
    pub fn parse(spec: &str, index: usize) -> Result<Self, String> {
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(format!("--disk {spec:?}: no path"));
        }
        let mut disk = DiskConfig::new(path, &format!("ferry{index}"));
        for p in parts {
            match p.split_once('=') {
                None if p == "readonly" || p == "ro" => disk.readonly = true,
                Some(("serial", s)) => disk.serial = s.to_string(),
                Some(("latency_us", n)) if n.parse::<u64>().is_ok_and(|n| n <= 1_000_000) => {
                    disk.latency_us = n.parse().unwrap_or(0)
                }
                _ => {
                    return Err(format!(
                        "--disk {spec:?}: unknown option {p:?} (expected readonly, serial=ID \
                         or latency_us=N up to 1000000)"
                    ))
                }
            }
        }
        disk.validate()
            .map_err(|e| format!("--disk {spec:?}: {e}"))?;
        Ok(disk)
    }

    /// Checks the bounds the state blob and the device rely on.
    pub fn validate(&self) -> Result<(), String> {
        let path_len = self.path.as_os_str().len();
        if path_len == 0 || path_len > MAX_PATH {
            return Err(format!("path length {path_len} (1 to {MAX_PATH})"));
        }
        if self.serial.len() > MAX_SERIAL || !self.serial.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "serial {:?}: at most {MAX_SERIAL} printable ASCII characters",
                self.serial
            ));
        }
        Ok(())
    }

    /// This disk with what `other` (a `--disk` given at a restore) says:
    /// its path, its read-only flag, and its serial.
    pub fn overridden_by(&self, other: &DiskConfig) -> DiskConfig {
        other.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let d = DiskConfig::parse("/tmp/a.img", 0).unwrap();
        assert_eq!(d, DiskConfig::new("/tmp/a.img", "ferry0"));
        let d = DiskConfig::parse("/x,readonly,serial=abc", 3).unwrap();
        assert!(d.readonly);
        assert_eq!(d.serial, "abc");
        assert!(DiskConfig::parse("", 0).is_err());
        assert!(DiskConfig::parse("/x,what", 0).is_err());
        assert!(DiskConfig::parse("/x,serial=123456789012345678901", 0).is_err());
        assert!(DiskConfig::parse("/x,serial=a b", 0).is_err());
        assert_eq!(
            DiskConfig::parse("/x,latency_us=500", 0)
                .unwrap()
                .latency_us,
            500
        );
        assert!(DiskConfig::parse("/x,latency_us=soon", 0).is_err());
    }
}
