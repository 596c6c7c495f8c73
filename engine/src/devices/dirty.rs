//! Guest pages written by devices.
//!
//! KVM's dirty log sees only what vCPUs write. A device writes guest
//! memory too (data read from a disk, used-ring entries), through the
//! VMM's own mapping, so while a pre-copy runs the devices record the pages
//! they write here and [`crate::Vm::take_dirty_log`] adds them to KVM's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::layout::PAGE_SIZE;

/// Guest-physical page numbers written by devices since the last take.
#[derive(Debug, Default)]
pub struct DirtyLog {
    enabled: AtomicBool,
    pages: Mutex<BTreeSet<u64>>,
    /// Disk blocks (4 KiB) the guest wrote, by disk file: the dirty-block
    /// bitmap of a pre-copy with `--migrate-disk`.
    blocks: Mutex<BTreeMap<PathBuf, BTreeSet<u64>>>,
}

impl DirtyLog {
    /// Starts or stops recording (stopping forgets what was recorded).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
        if !on {
            self.lock().clear();
            self.blocks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a write of `len` bytes at guest address `gpa`.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.enabled.load(Ordering::SeqCst) {
            return;
        }
        let page = PAGE_SIZE as u64;
        let first = gpa / page;
        let last = gpa.saturating_add(len - 1) / page;
        let mut pages = self.lock();
        for p in first..=last.min(first + (1 << 20)) {
            pages.insert(p);
        }
    }

    /// Records a guest write of bytes `start..end` of the disk file `disk`.
    pub fn mark_disk(&self, disk: &Path, start: u64, end: u64) {
        if end <= start || !self.enabled.load(Ordering::SeqCst) {
            return;
        }
        let block = PAGE_SIZE as u64;
        let mut all = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let set = all.entry(disk.to_path_buf()).or_default();
        set.extend(start / block..end.div_ceil(block));
    }

    /// The blocks of `disk` written since the last call.
    pub fn take_disk(&self, disk: &Path) -> Vec<u64> {
        let mut all = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(disk)
            .map(|s| s.into_iter().collect())
            .unwrap_or_default()
    }

    /// The guest-physical page numbers recorded since the last call.
    pub fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.lock()).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_enabled() {
        let d = DirtyLog::default();
        d.mark(0, 10);
        assert!(d.take().is_empty());
        d.set_enabled(true);
        d.mark(4095, 2);
        d.mark(8192, 1);
        assert_eq!(d.take(), vec![0, 1, 2]);
        assert!(d.take().is_empty());
    }
}
