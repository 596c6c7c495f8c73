//! The source's page space with migrated local disks (`--migrate-disk`):
//! guest RAM, then each disk's 4 KiB blocks, served by the one page
//! server and sent by the same pre-copy rounds. The disks' dirty blocks
//! (recorded by their devices while dirty logging is on) join KVM's dirty
//! log in the rounds.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_page_server::source::{ConcatSource, FileSource, PageSource};
use ferry_protocol::{MigratedDisk, PageBitmap, MAX_DISK_BLOCKS, MAX_MIGRATED_DISKS, OPT_DISKS};
use tracing::info;

use super::error::SourceError;
use crate::layout::PAGE_SIZE;
use crate::ram_pages::RamPages;
use crate::vm::Vm;

/// One disk in the page space.
struct Disk {
    path: PathBuf,
    first_pfn: u64,
    named: MigratedDisk,
}

/// What the source serves: RAM alone, or RAM and its migrated disks.
pub(super) struct PageSpace {
    /// The pages, in page-space order.
    pub(super) source: Box<dyn PageSource>,
    disks: Vec<Disk>,
}

impl PageSpace {
    /// `vm`'s RAM, and with `migrate_disks` every disk of the VM after it.
    /// A disk whose size is not whole 4 KiB blocks is refused.
    pub(super) fn of(vm: &Vm, migrate_disks: bool) -> Result<Self, SourceError> {
        let ram = RamPages::new(vm.ram());
        if !migrate_disks {
            return Ok(Self {
                source: Box::new(ram),
                disks: Vec::new(),
            });
        }
        let configs = vm.disk_configs();
        if configs.is_empty() {
            return Err(SourceError::Disk {
                path: PathBuf::new(),
                why: "--migrate-disk, but the VM has no disk".into(),
            });
        }
        if configs.len() > MAX_MIGRATED_DISKS {
            return Err(SourceError::Disk {
                path: PathBuf::new(),
                why: format!("{} disks (at most {MAX_MIGRATED_DISKS})", configs.len()),
            });
        }
        let mut parts: Vec<Box<dyn PageSource>> = vec![Box::new(ram)];
        let mut disks = Vec::new();
        let mut at = vm.ram().pages();
        for (slot, c) in configs.into_iter().enumerate() {
            let fail = |why: String| SourceError::Disk {
                path: c.path.clone(),
                why,
            };
            let file = File::open(&c.path).map_err(|e| fail(e.to_string()))?;
            let len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
            let blocks = len / PAGE_SIZE as u64;
            if len % PAGE_SIZE as u64 != 0 || blocks == 0 || blocks > MAX_DISK_BLOCKS {
                return Err(fail(format!(
                    "{len} bytes: a migrated disk is 1 to {MAX_DISK_BLOCKS} whole 4 KiB blocks"
                )));
            }
            info!(slot, blocks, path = %c.path.display(), "disk moves with the memory");
            parts.push(Box::new(FileSource::new(Arc::new(file), blocks)));
            disks.push(Disk {
                path: c.path,
                first_pfn: at,
                named: MigratedDisk {
                    slot: slot as u32,
                    blocks,
                },
            });
            at += blocks;
        }
        Ok(Self {
            source: Box::new(ConcatSource::new(parts)),
            disks,
        })
    }

    /// The `Hello` option naming the migrated disks (none without).
    pub(super) fn hello_options(&self) -> Vec<(u16, Vec<u8>)> {
        if self.disks.is_empty() {
            return Vec::new();
        }
        let named: Vec<MigratedDisk> = self.disks.iter().map(|d| d.named).collect();
        vec![(OPT_DISKS, MigratedDisk::encode_option(&named))]
    }

    /// Pages of the whole space.
    pub(super) fn pages(&self) -> u64 {
        self.source.pages()
    }

    /// Takes the dirty log: RAM pages (KVM's and the devices') and the
    /// blocks the guest wrote on each migrated disk, in page-space numbers.
    pub(super) fn take_dirty(&self, vm: &Vm) -> Result<PageBitmap, SourceError> {
        let ram = vm.take_dirty_log()?;
        if self.disks.is_empty() {
            return Ok(ram);
        }
        let all = PageBitmap::new(self.pages());
        all.or_with(&ram);
        for d in &self.disks {
            for b in vm.take_disk_dirty(&d.path) {
                if b < d.named.blocks {
                    all.set(d.first_pfn + b);
                }
            }
        }
        Ok(all)
    }
}
