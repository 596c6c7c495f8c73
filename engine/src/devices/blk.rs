//! virtio-blk on a raw file.
//!
//! One request queue. A request is a descriptor chain: a 16-byte header the
//! device reads (type, reserved, sector), data buffers, and a one-byte
//! status the device writes. Every chain comes from the guest and is
//! checked before any I/O: the header and status descriptors' directions
//! and sizes, each data buffer's direction and guest-memory range, the
//! length (whole sectors) and the range on the file. A chain that fails a
//! check gets `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for an unknown type); a
//! chain without a usable status byte (none, read-only, or a broken chain:
//! a `next` out of the table, a loop) is returned with length 0 and
//! nothing written. Only a head index outside the queue, which cannot be
//! returned at all, breaks the device (`DEVICE_NEEDS_RESET`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use serde_json::json;
use tracing::{debug, info, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::chain::{next_chain, read_config_bytes, return_chain};
use super::dirty::DirtyLog;
use super::image_lock::{self, ImageLock, LockError};
use super::transport::VirtioBackend;
use super::{DeviceError, DiskConfig};
use crate::state::VirtioBackendConfig;

/// Bytes per sector, the unit of `sector` and of every length.
pub const SECTOR: u64 = 512;
/// Size of the only queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes moved per file call (a guest buffer may be up to 4 GiB).
const CHUNK: usize = 64 << 10;
/// Bytes of a request header.
const HEADER_LEN: u32 = 16;

/// Counters since the device was created (not part of the saved state).
#[derive(Debug, Default, Clone, Copy)]
pub struct BlkStats {
    /// Requests completed (any status).
    pub requests: u64,
    /// Completed `IN` requests.
    pub reads: u64,
    /// Completed `OUT` requests.
    pub writes: u64,
    /// `FLUSH` requests.
    pub flushes: u64,
    /// Requests answered `IOERR` or `UNSUPP`.
    pub errors: u64,
    /// Chains returned without a status (nowhere to write one).
    pub malformed: u64,
    /// Bytes read from the file for the guest.
    pub bytes_read: u64,
    /// Bytes written to the file for the guest.
    pub bytes_written: u64,
}

/// A virtio-blk backend.
pub struct Blk {
    config: DiskConfig,
    file: Option<File>,
    /// The lock `file` holds (see [`super::image_lock`]): the disk's own
    /// ([`ImageLock::for_disk`]) while the VM may run, less or none once
    /// handed over at a migration's switch-over.
    lock: Option<ImageLock>,
    capacity: u64,
    stats: BlkStats,
}

/// Why a request failed, for the log (the guest sees only the status).
#[derive(Debug)]
enum Reject {
    /// Answered with this status byte.
    Status(u32, String),
    /// No status byte can be written.
    NoStatus(String),
}

fn ioerr(why: impl Into<String>) -> Reject {
    Reject::Status(VIRTIO_BLK_S_IOERR, why.into())
}

/// Takes `want` on the disk `file` (at `path`), or says who has it. A file
/// system without locks gets a warning, not a refusal (QEMU's `locking=auto`).
fn lock_disk(file: &File, path: &std::path::Path, want: ImageLock) -> Result<(), DeviceError> {
    match image_lock::set(file, Some(want)) {
        Ok(()) => Ok(()),
        Err(LockError::InUse) => Err(DeviceError::InUse {
            path: path.to_path_buf(),
            exclusive: want == ImageLock::Exclusive,
        }),
        Err(LockError::Unsupported(e)) => {
            warn!(path = %path.display(), "the disk cannot be locked ({e}); opened without a lock");
            Ok(())
        }
    }
}

impl Blk {
    /// A device for `config`; the file is opened by [`Self::open`] or on
    /// activation.
    pub fn new(config: DiskConfig) -> Self {
        Self {
            config,
            file: None,
            lock: None,
            capacity: 0,
            stats: BlkStats::default(),
        }
    }

    /// Opens the file now (when booting: a missing file is an error before
    /// the VM runs at all) and locks it ([`super::image_lock`]): a disk
    /// another VM or process holds is refused. A file already open whose
    /// lock was handed over ([`Self::hand_over`]) takes it back.
    pub fn open(&mut self) -> Result<(), DeviceError> {
        let want = ImageLock::for_disk(self.config.readonly);
        if let Some(file) = &self.file {
            if self.lock != Some(want) {
                lock_disk(file, &self.config.path, want)?;
                self.lock = Some(want);
                info!(path = %self.config.path.display(), "disk lock taken back");
            }
            return Ok(());
        }
        let path = &self.config.path;
        let file = OpenOptions::new()
            .read(true)
            .write(!self.config.readonly)
            .open(path)
            .map_err(|source| DeviceError::Open {
                path: path.clone(),
                source,
            })?;
        // Before the first read: the size of a disk in use elsewhere is no
        // business of this VM.
        lock_disk(&file, path, want)?;
        let len = file
            .metadata()
            .map_err(|source| DeviceError::Open {
                path: path.clone(),
                source,
            })?
            .len();
        self.capacity = len / SECTOR;
        info!(path = %path.display(), sectors = self.capacity, readonly = self.config.readonly, "disk opened");
        self.file = Some(file);
        self.lock = Some(want);
        Ok(())
    }

    /// Lets go of the disk's lock at a migration's switch-over, so the
    /// destination can take it: none is kept, or with `keep_reading` (a
    /// migrated disk the source still serves blocks from) a shared one
    /// that keeps writers out. The file stays open; the device must not
    /// serve until [`Self::open`] (the next activation) takes the lock
    /// back. A read-only disk keeps its shared lock, which conflicts with
    /// no reader.
    pub fn hand_over(&mut self, keep_reading: bool) -> Result<(), DeviceError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if self.config.readonly || self.lock.is_none() {
            return Ok(());
        }
        let to = keep_reading.then_some(ImageLock::Shared);
        match image_lock::set(file, to) {
            // Releasing or downgrading a lock this file holds cannot
            // conflict; an error here means locks do not work at all.
            Ok(()) | Err(LockError::InUse) => {}
            Err(LockError::Unsupported(e)) => {
                warn!(path = %self.config.path.display(), "cannot hand over the disk lock: {e}")
            }
        }
        self.lock = to;
        info!(path = %self.config.path.display(), kept = ?to, "disk lock handed over");
        Ok(())
    }

    /// The counters.
    pub fn counters(&self) -> BlkStats {
        self.stats
    }

    /// Serves one chain; returns the bytes written into guest memory.
    fn serve(
        &mut self,
        descs: &[Descriptor],
        broken: bool,
        mem: &GuestMemoryMmap,
        dirty: &DirtyLog,
    ) -> u32 {
        let status = match descs.last() {
            Some(d) if !broken && d.is_write_only() && d.len() >= 1 && descs.len() >= 2 => d.addr(),
            _ => {
                self.stats.malformed += 1;
                debug!(
                    descriptors = descs.len(),
                    broken, "virtio-blk chain without a status byte"
                );
                return 0;
            }
        };
        let (code, written) = match self.execute(&descs[..descs.len() - 1], mem, dirty) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Reject::Status(code, why)) => {
                debug!(why, "virtio-blk request refused");
                self.stats.errors += 1;
                (code, 0)
            }
            Err(Reject::NoStatus(why)) => {
                debug!(why, "virtio-blk request dropped");
                self.stats.malformed += 1;
                return 0;
            }
        };
        if mem.write_obj(code as u8, status).is_err() {
            self.stats.malformed += 1;
            return 0;
        }
        dirty.mark(status.0, 1);
        self.stats.requests += 1;
        written.saturating_add(1)
    }

    /// Runs a request (all descriptors but the status); returns the bytes
    /// written into guest memory.
    fn execute(
        &mut self,
        descs: &[Descriptor],
        mem: &GuestMemoryMmap,
        dirty: &DirtyLog,
    ) -> Result<u32, Reject> {
        let (hdr, data) = descs
            .split_first()
            .ok_or_else(|| Reject::NoStatus("no header".into()))?;
        if hdr.is_write_only() || hdr.len() < HEADER_LEN {
            return Err(ioerr(format!(
                "bad header descriptor (len {}, write-only {})",
                hdr.len(),
                hdr.is_write_only()
            )));
        }
        let mut raw = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut raw, hdr.addr())
            .map_err(|e| ioerr(format!("header at {:#x}: {e}", hdr.addr().0)))?;
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default());
        for d in data {
            if !mem.check_range(
                d.addr(),
                d.len() as usize,
                vm_memory::Permissions::ReadWrite,
            ) {
                return Err(ioerr(format!(
                    "buffer {:#x}+{} is not guest RAM",
                    d.addr().0,
                    d.len()
                )));
            }
        }
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| ioerr("the disk is not open"))?;
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let out = kind == VIRTIO_BLK_T_OUT;
                if data.is_empty() {
                    return Err(ioerr("no data buffer"));
                }
                if out && self.config.readonly {
                    return Err(ioerr("write to a read-only disk"));
                }
                if data.iter().any(|d| d.is_write_only() == out) {
                    return Err(ioerr("a data buffer has the wrong direction"));
                }
                let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
                if total == 0 {
                    // Nothing to move; on a migrated disk it would still
                    // fetch a block and make it the guest's.
                    return Err(ioerr("data buffers of 0 bytes"));
                }
                let start = sector
                    .checked_mul(SECTOR)
                    .ok_or_else(|| ioerr("sector overflows"))?;
                if !total.is_multiple_of(SECTOR) {
                    return Err(ioerr(format!("length {total} is not whole sectors")));
                }
                let end = start
                    .checked_add(total)
                    .ok_or_else(|| ioerr("range overflows"))?;
                if end > self.capacity * SECTOR {
                    return Err(ioerr(format!(
                        "sectors {sector}..{} beyond the disk's {}",
                        end / SECTOR,
                        self.capacity
                    )));
                }
                // A migrated disk on a destination: a read waits for its
                // blocks; a write fetches the blocks it covers partly and
                // keeps the push out of all of them until it is done.
                let migrated = self.config.migrated.as_ref().map(|m| &*m.0);
                let mut write_guard = None;
                if let Some(m) = migrated {
                    if out {
                        write_guard = Some(m.before_write(start, end));
                    } else {
                        m.before_read(start, end);
                    }
                }
                if out {
                    dirty.mark_disk(&self.config.path, start, end);
                }
                let mut at = start;
                let mut buf = vec![0u8; CHUNK.min(total as usize)];
                for d in data {
                    let mut done = 0u64;
                    while done < u64::from(d.len()) {
                        let n = (u64::from(d.len()) - done).min(CHUNK as u64) as usize;
                        let gpa = GuestAddress(d.addr().0 + done);
                        let b = &mut buf[..n];
                        if out {
                            mem.read_slice(b, gpa)
                                .map_err(|e| ioerr(format!("guest read: {e}")))?;
                            file.write_all_at(b, at)
                                .map_err(|e| ioerr(format!("file write: {e}")))?;
                        } else {
                            file.read_exact_at(b, at)
                                .map_err(|e| ioerr(format!("file read: {e}")))?;
                            mem.write_slice(b, gpa)
                                .map_err(|e| ioerr(format!("guest write: {e}")))?;
                            dirty.mark(gpa.0, n as u64);
                        }
                        done += n as u64;
                        at += n as u64;
                    }
                }
                if let Some(g) = write_guard {
                    g.done();
                }
                if out {
                    // Again once the data is in the file: a pre-copy round
                    // that read the block between the first mark and the
                    // write sends it again.
                    dirty.mark_disk(&self.config.path, start, end);
                }
                if out {
                    self.stats.writes += 1;
                    self.stats.bytes_written += total;
                    Ok(0)
                } else {
                    self.stats.reads += 1;
                    self.stats.bytes_read += total;
                    Ok(total as u32)
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                file.sync_data()
                    .map_err(|e| ioerr(format!("fdatasync: {e}")))?;
                self.stats.flushes += 1;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let d = match data {
                    [d] if d.is_write_only() => d,
                    _ => return Err(ioerr("GET_ID needs one writable buffer")),
                };
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let s = self.config.serial.as_bytes();
                let k = s.len().min(id.len());
                id[..k].copy_from_slice(&s[..k]);
                let n = (d.len() as usize).min(id.len());
                mem.write_slice(&id[..n], d.addr())
                    .map_err(|e| ioerr(format!("guest write: {e}")))?;
                dirty.mark(d.addr().0, n as u64);
                Ok(n as u32)
            }
            other => Err(Reject::Status(
                VIRTIO_BLK_S_UNSUPP,
                format!("request type {other}"),
            )),
        }
    }
}

impl VirtioBackend for Blk {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_BLK_F_FLUSH;
        if self.config.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with `le64 capacity`; the rest
        // (geometry, block size, ...) is not offered and reads as zero.
        read_config_bytes(&self.capacity.to_le_bytes(), offset, data);
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        self.open()
    }

    fn hand_over(&mut self, keep_reading: bool) -> Result<(), DeviceError> {
        Blk::hand_over(self, keep_reading)
    }

    fn take_back(&mut self) -> Result<(), DeviceError> {
        // A disk never opened here holds nothing to take back.
        if self.file.is_some() {
            self.open()?;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), DeviceError> {
        // access(2), not open(2): nothing on this side holds the file
        // before the move commits.
        use nix::unistd::{access, AccessFlags};
        let mode = if self.config.readonly {
            AccessFlags::R_OK
        } else {
            AccessFlags::R_OK | AccessFlags::W_OK
        };
        let path = &self.config.path;
        let refused = |source| DeviceError::Open {
            path: path.clone(),
            source,
        };
        access(path, mode).map_err(|e| refused(std::io::Error::from(e)))?;
        // What open(2) would refuse after the commit (a directory, a
        // socket), refused now, while the source can still take the VM back.
        use std::os::unix::fs::FileTypeExt;
        let kind = std::fs::metadata(path).map_err(refused)?.file_type();
        if kind.is_file() || kind.is_block_device() {
            Ok(())
        } else {
            Err(refused(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            )))
        }
    }

    fn process(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        dirty: &DirtyLog,
    ) -> (u32, Option<String>) {
        let mut done = 0;
        loop {
            let (head, descs) = match next_chain(queue, mem) {
                Ok(Some(c)) => c,
                Ok(None) => return (done, None),
                Err(why) => return (done, Some(why)),
            };
            // A chain that ends on a descriptor still saying NEXT was cut
            // short: a `next` outside the table, a loop (the chain's TTL),
            // or an unreadable descriptor.
            let broken = descs.last().is_none_or(|d| d.has_next());
            let len = self.serve(&descs, broken, mem, dirty);
            if let Err(why) = return_chain(queue, mem, head, len) {
                return (done, Some(why));
            }
            done += 1;
        }
    }

    fn flush(&mut self) -> Result<(), DeviceError> {
        if let Some(f) = &self.file {
            if !self.config.readonly {
                f.sync_data().map_err(|source| DeviceError::Flush {
                    path: self.config.path.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn config(&self) -> VirtioBackendConfig {
        VirtioBackendConfig::Blk(self.config.clone())
    }

    fn stats(&self) -> serde_json::Value {
        let s = self.stats;
        if s.malformed > 0 && s.malformed % 1000 == 1 {
            warn!(
                malformed = s.malformed,
                "the guest keeps sending malformed virtio-blk chains"
            );
        }
        json!({
            "kind": "blk",
            "path": self.config.path,
            "readonly": self.config.readonly,
            "serial": self.config.serial,
            "sectors": self.capacity,
            "requests": s.requests,
            "reads": s.reads,
            "writes": s.writes,
            "flushes": s.flushes,
            "errors": s.errors,
            "malformed": s.malformed,
            "bytes_read": s.bytes_read,
            "bytes_written": s.bytes_written,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::migrated::{DiskSet, MigratedHandle};

    #[test]
    fn a_request_of_zero_bytes_is_refused_and_owns_no_migrated_block() {
        // Found by fuzz_virtio: a write of 0 bytes at sector 17 of a
        // migrated disk fetched block 2 and made it the guest's, with
        // nothing written and nothing logged.
        let dir = std::env::temp_dir().join(format!(
            "ferry-blk-{}-{}",
            std::process::id(),
            crate::os::random_u64().unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        let set = DiskSet::create(16, &[(0, 8, &path)]).unwrap();
        set.commit().unwrap();
        set.install(16, &[1u8; 8 * 4096]).unwrap();
        let mut cfg = DiskConfig::new(&path, "s");
        cfg.migrated = Some(MigratedHandle(set.disks[0].clone()));
        let mut blk = Blk::new(cfg);
        blk.open().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let dirty = DirtyLog::default();
        for (kind, flags) in [(VIRTIO_BLK_T_OUT, 0), (VIRTIO_BLK_T_IN, 2)] {
            mem.write_obj(kind, GuestAddress(0x1000)).unwrap();
            mem.write_obj(17u64, GuestAddress(0x1008)).unwrap();
            let descs = [
                Descriptor::new(0x1000, 16, 1, 1),
                Descriptor::new(0x2000, 0, flags | 1, 2),
            ];
            match blk.execute(&descs, &mem, &dirty) {
                Err(Reject::Status(code, why)) => {
                    assert_eq!(code, VIRTIO_BLK_S_IOERR);
                    assert!(why.contains("0 bytes"), "{why}");
                }
                other => panic!("type {kind}: {other:?}"),
            }
        }
        assert_eq!(set.disks[0].owned.count(), 0);
        drop(set);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
