//! Snapshot files: the state blob plus sparse guest memory.
//!
//! ```text
//! +----------------------------------------------+ 0
//! | header (48 bytes, little-endian)             |
//! |   magic "FERRYSNP"      8                    |
//! |   version u32           4                    |
//! |   page_size u32         4   (4096)           |
//! |   mem_size u64          8                    |
//! |   state_len u64         8                    |
//! |   data_pages u64        8   (pages stored)   |
//! |   meta_crc u32          4   (header[0..40],  |
//! |                              state, bitmap)  |
//! |   data_crc u32          4   (all page data)  |
//! +----------------------------------------------+ 48
//! | state blob (state_len bytes, see state::codec)|
//! +----------------------------------------------+
//! | page bitmap: bit i set = page i is stored    |
//! |   (mem_size / 4096 / 8 bytes, rounded up)    |
//! +----------------------------------------------+ padded to 4096
//! | stored pages, in page order, 4096 bytes each |
//! +----------------------------------------------+
//! ```
//!
//! Zero pages are not stored. Page `i` means offset `i * 4096` of the memory
//! file (see `layout`). An eager restore ([`restore`]) checks sizes and both
//! CRCs before the VM's vCPUs are ever created, so a bad file gives an error
//! and no VM at all. A lazy restore ([`restore_lazy`]) checks everything but
//! the page data's CRC first, runs the VM while its memory arrives through
//! the post-copy path, and verifies the page data once it is all loaded.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_page_server::source::PageSource;
use ferry_protocol::PageBitmap;
use ferry_transport::Conn;
use serde::Serialize;

use crate::layout::PAGE_SIZE;
use crate::memory::{is_zero, Backing, GuestRam, MemoryError};
use crate::migration::acceptor::Acceptor;
use crate::migration::{self, DestError, MigrationStats, SourceError, SourceOptions};
use crate::ram_pages::RamPages;
use crate::snapshot_source::SnapshotPages;
use crate::state::{self, codec, CodecError, MachineState};

/// Magic at the start of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"FERRYSNP";
/// Snapshot format version this build writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
/// Memory is copied in chunks of this many bytes.
const CHUNK: usize = 2 << 20;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File I/O.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Not a snapshot.
    #[error("{0} is not a Ferry snapshot (bad magic)")]
    BadMagic(PathBuf),
    /// Another format version.
    #[error("{path}: snapshot format version {found} is not supported (this build reads version {SNAPSHOT_VERSION})")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The file is shorter or longer than its header says.
    #[error("{path}: snapshot is {what}: header implies {expected} bytes, file has {actual}")]
    Size {
        /// The file.
        path: PathBuf,
        /// "truncated" or "too long".
        what: &'static str,
        /// Size implied by the header.
        expected: u64,
        /// Real size.
        actual: u64,
    },
    /// A header field is out of range or contradicts another.
    #[error("{path}: snapshot header is invalid: {why}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A checksum did not match.
    #[error("{path}: snapshot {part} checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupted")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// "header/state/bitmap" or "memory".
        part: &'static str,
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// The embedded state blob is bad.
    #[error("{path}: snapshot state: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: CodecError,
    },
    /// Guest RAM access.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// What writing or loading a snapshot cost.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStats {
    /// Size of the file.
    pub file_bytes: u64,
    /// Guest pages in total.
    pub pages_total: u64,
    /// Pages stored (non-zero).
    pub pages_stored: u64,
    /// Wall time.
    pub millis: f64,
}

struct Header {
    mem_size: u64,
    state_len: u64,
    data_pages: u64,
    meta_crc: u32,
    data_crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
        h[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.mem_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.state_len.to_le_bytes());
        h[32..40].copy_from_slice(&self.data_pages.to_le_bytes());
        h[40..44].copy_from_slice(&self.meta_crc.to_le_bytes());
        h[44..48].copy_from_slice(&self.data_crc.to_le_bytes());
        h
    }
}

fn bitmap_len(mem_size: u64) -> u64 {
    (mem_size / PAGE_SIZE as u64).div_ceil(8)
}

fn data_offset(state_len: u64, mem_size: u64) -> u64 {
    (HEADER_LEN as u64 + state_len + bitmap_len(mem_size)).next_multiple_of(PAGE_SIZE as u64)
}

fn meta_crc(header: &[u8; HEADER_LEN], state: &[u8], bitmap: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[..40]);
    h.update(state);
    h.update(bitmap);
    h.finalize()
}

/// Writes a snapshot of a paused VM: `state` plus every non-zero page.
pub fn write(
    path: &Path,
    state: &MachineState,
    ram: &GuestRam,
) -> Result<SnapshotStats, SnapshotError> {
    let t = Instant::now();
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let blob = state::encode(state);
    let mem_size = ram.size();
    let data_at = data_offset(blob.len() as u64, mem_size);
    // Written aside and renamed into place: a failure leaves the file that
    // was at `path` (an older snapshot, a template's) as it was, and a lazy
    // restore reading that older file goes on reading it.
    let target = crate::os::ReplacingFile::create(path).map_err(io)?;
    let file = target.file();
    let mut out = BufWriter::with_capacity(CHUNK, file);
    out.seek(SeekFrom::Start(data_at)).map_err(io)?;

    let stored_pages = PageBitmap::new(mem_size / PAGE_SIZE as u64);
    let mut data_crc = crc32fast::Hasher::new();
    let mut stored = 0u64;
    let mut buf = vec![0u8; CHUNK];
    // Holes in the memory file (never-touched RAM) are skipped unread.
    let pages = RamPages::new(ram);
    let mut offset = 0u64;
    while offset < mem_size {
        match pages.next_data(offset / PAGE_SIZE as u64) {
            Some(pfn) => offset = offset.max(pfn * PAGE_SIZE as u64),
            None => break,
        }
        if offset >= mem_size {
            break;
        }
        let n = (CHUNK as u64).min(mem_size - offset) as usize;
        ram.read_at(offset, &mut buf[..n])?;
        for (i, page) in buf[..n].chunks_exact(PAGE_SIZE).enumerate() {
            if !is_zero(page) {
                let pfn = offset / PAGE_SIZE as u64 + i as u64;
                stored_pages.set(pfn);
                data_crc.update(page);
                out.write_all(page).map_err(io)?;
                stored += 1;
            }
        }
        offset += n as u64;
    }
    out.flush().map_err(io)?;
    drop(out);
    let mut bitmap = stored_pages.to_le_bytes();
    bitmap.truncate(bitmap_len(mem_size) as usize);
    let mut header = Header {
        mem_size,
        state_len: blob.len() as u64,
        data_pages: stored,
        meta_crc: 0,
        data_crc: data_crc.finalize(),
    };
    header.meta_crc = meta_crc(&header.encode(), &blob, &bitmap);
    let mut head = Vec::with_capacity(data_at as usize);
    head.extend_from_slice(&header.encode());
    head.extend_from_slice(&blob);
    head.extend_from_slice(&bitmap);
    file.write_all_at(&head, 0).map_err(io)?;
    let file_bytes = data_at + stored * PAGE_SIZE as u64;
    file.set_len(file_bytes).map_err(io)?;
    target.commit().map_err(io)?;
    Ok(SnapshotStats {
        file_bytes,
        pages_total: mem_size / PAGE_SIZE as u64,
        pages_stored: stored,
        millis: ms(t.elapsed()),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// An opened, validated snapshot whose memory has not been loaded yet.
pub struct Snapshot {
    path: PathBuf,
    file: Arc<File>,
    /// The VM state.
    pub state: MachineState,
    stored: PageBitmap,
    data_at: u64,
    data_pages: u64,
    data_crc: u32,
    file_bytes: u64,
}

impl Snapshot {
    /// Opens `path` and checks everything but the page data's CRC.
    pub fn open(path: &Path) -> Result<Self, SnapshotError> {
        let p = || path.to_path_buf();
        let io = |source| SnapshotError::Io { path: p(), source };
        let mut file = File::open(path).map_err(io)?;
        let actual = file.metadata().map_err(io)?.len();
        let mut h = [0u8; HEADER_LEN];
        if actual < HEADER_LEN as u64 {
            let mut m = [0u8; 8];
            let n = file.read(&mut m).map_err(io)?;
            if n < 8 || m != SNAPSHOT_MAGIC {
                return Err(SnapshotError::BadMagic(p()));
            }
            return Err(SnapshotError::Size {
                path: p(),
                what: "truncated",
                expected: HEADER_LEN as u64,
                actual,
            });
        }
        file.read_exact(&mut h).map_err(io)?;
        if h[0..8] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::BadMagic(p()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version {
                path: p(),
                found: version,
            });
        }
        let header = Header {
            mem_size: u64_at(16),
            state_len: u64_at(24),
            data_pages: u64_at(32),
            meta_crc: u32_at(40),
            data_crc: u32_at(44),
        };
        let bad = |why: String| SnapshotError::Header { path: p(), why };
        if u32_at(12) as usize != PAGE_SIZE {
            return Err(bad(format!(
                "page size {} (expected {PAGE_SIZE})",
                u32_at(12)
            )));
        }
        if !crate::layout::valid_mem_size(header.mem_size) {
            return Err(bad(format!("memory size {}", header.mem_size)));
        }
        if header.state_len as usize > codec::MAX_STATE_LEN {
            return Err(bad(format!("state length {}", header.state_len)));
        }
        let pages_total = header.mem_size / PAGE_SIZE as u64;
        if header.data_pages > pages_total {
            return Err(bad(format!(
                "{} stored pages for a {pages_total}-page guest",
                header.data_pages
            )));
        }
        let data_at = data_offset(header.state_len, header.mem_size);
        let expected = data_at + header.data_pages * PAGE_SIZE as u64;
        if actual != expected {
            return Err(SnapshotError::Size {
                path: p(),
                what: if actual < expected {
                    "truncated"
                } else {
                    "too long"
                },
                expected,
                actual,
            });
        }
        let mut blob = vec![0u8; header.state_len as usize];
        file.read_exact(&mut blob).map_err(io)?;
        let mut bitmap = vec![0u8; bitmap_len(header.mem_size) as usize];
        file.read_exact(&mut bitmap).map_err(io)?;
        let computed = meta_crc(&h, &blob, &bitmap);
        if computed != header.meta_crc {
            return Err(SnapshotError::Checksum {
                path: p(),
                part: "header/state/bitmap",
                stored: header.meta_crc,
                computed,
            });
        }
        let set: u64 = bitmap.iter().map(|b| u64::from(b.count_ones())).sum();
        if set != header.data_pages {
            return Err(bad(format!(
                "bitmap marks {set} pages but the header says {}",
                header.data_pages
            )));
        }
        let state =
            codec::decode(&blob).map_err(|source| SnapshotError::State { path: p(), source })?;
        if state.meta.mem_size != header.mem_size {
            return Err(bad(format!(
                "state is for {} bytes of RAM, header says {}",
                state.meta.mem_size, header.mem_size
            )));
        }
        Ok(Self {
            path: p(),
            file: Arc::new(file),
            state,
            stored: PageBitmap::from_le_bytes(header.mem_size / PAGE_SIZE as u64, &bitmap)
                .ok_or_else(|| bad("bitmap size does not match the memory size".into()))?,
            data_at,
            data_pages: header.data_pages,
            data_crc: header.data_crc,
            file_bytes: actual,
        })
    }

    /// True when page `pfn` (memory-file page index) is stored in the file.
    pub fn has_page(&self, pfn: u64) -> bool {
        self.stored.get(pfn)
    }

    /// Copies every stored page into `ram` and verifies the data CRC.
    /// `ram` must be zeroed (fresh); on error its contents are undefined and
    /// the caller must discard the VM.
    pub fn load_memory(&self, ram: &GuestRam) -> Result<SnapshotStats, SnapshotError> {
        let t = Instant::now();
        let io = |source| SnapshotError::Io {
            path: self.path.clone(),
            source,
        };
        if ram.size() != self.state.meta.mem_size {
            return Err(SnapshotError::Header {
                path: self.path.clone(),
                why: format!(
                    "guest RAM is {} bytes, snapshot is for {}",
                    ram.size(),
                    self.state.meta.mem_size
                ),
            });
        }
        let pages = ram.pages();
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut file_at = self.data_at;
        // Copy each run of stored pages with one read and one write.
        for (pfn, run) in self.stored.runs(0, (CHUNK / PAGE_SIZE) as u64) {
            let len = run as usize * PAGE_SIZE;
            self.file
                .read_exact_at(&mut buf[..len], file_at)
                .map_err(io)?;
            crc.update(&buf[..len]);
            ram.write_at(pfn * PAGE_SIZE as u64, &buf[..len])?;
            file_at += len as u64;
        }
        self.check_data_crc(crc.finalize())?;
        Ok(SnapshotStats {
            file_bytes: self.file_bytes,
            pages_total: pages,
            pages_stored: self.data_pages,
            millis: ms(t.elapsed()),
        })
    }

    /// The guest memory this snapshot holds, as a page-server source: stored
    /// pages come from the file (unverified: see [`Snapshot::verify_memory`]),
    /// the rest read as zero.
    pub fn page_source(&self) -> SnapshotPages {
        SnapshotPages::new(self.file.clone(), self.stored.clone(), self.data_at)
    }

    /// Reads the stored page data once, in file order, and checks it against
    /// the header's data CRC.
    pub fn verify_memory(&self) -> Result<(), SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: self.path.clone(),
            source,
        };
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let end = self.data_at + self.data_pages * PAGE_SIZE as u64;
        let mut at = self.data_at;
        while at < end {
            let n = (CHUNK as u64).min(end - at) as usize;
            self.file.read_exact_at(&mut buf[..n], at).map_err(io)?;
            crc.update(&buf[..n]);
            at += n as u64;
        }
        self.check_data_crc(crc.finalize())
    }

    fn check_data_crc(&self, computed: u32) -> Result<(), SnapshotError> {
        if computed != self.data_crc {
            return Err(SnapshotError::Checksum {
                path: self.path.clone(),
                part: "memory",
                stored: self.data_crc,
                computed,
            });
        }
        Ok(())
    }
}

/// Errors from restoring a VM out of a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The file is bad.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// Lazy restore: the socketpairs it runs over could not be made.
    #[error("lazy restore: cannot create a socketpair: {0}")]
    Socketpair(#[source] std::io::Error),
    /// Lazy restore: the thread serving the snapshot's pages could not start
    /// or panicked.
    #[error("lazy restore: snapshot page server thread: {0}")]
    Thread(String),
    /// `--disk` overrides that do not fit the saved VM.
    #[error("{0}")]
    Disk(String),
    /// Lazy restore: receiving the VM over the in-process post-copy migration
    /// failed (with the page server's own error, when it has one).
    #[error("lazy restore failed: {dest}{}", server_note(.server))]
    Lazy {
        /// The receiving side's error.
        dest: Box<DestError>,
        /// The page server's error, if it failed too.
        server: Option<Box<SourceError>>,
    },
}

fn server_note(server: &Option<Box<SourceError>>) -> String {
    server
        .as_ref()
        .map(|e| format!(" (snapshot page server: {e})"))
        .unwrap_or_default()
}

/// Whether a lazy restore uses the snapshot's replay list (the REAP idea:
/// record the working set once, load it in one batch on later restores).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replay {
    /// Load the pages the list names before the vCPUs run, if the snapshot
    /// has a list; else restore plainly.
    #[default]
    Auto,
    /// Record a new list (replacing any): the push is held while the
    /// guest's faults reveal its working set ([`RECORD_HOLD`]), so this
    /// restore is slower, and those pages are written beside the snapshot.
    Record,
    /// Neither read nor record a list.
    Off,
}

/// A recording restore holds its push until the guest went this long
/// without a fault, or for at most this long in all.
pub const RECORD_HOLD: ferry_page_server::server::PushHold = ferry_page_server::server::PushHold {
    quiet: Duration::from_millis(200),
    max: Duration::from_secs(10),
};

/// Eagerly restores a snapshot into a new, paused VM.
///
/// Everything that can be wrong with the file is found before any vCPU
/// state is applied; on error no VM exists.
pub fn restore(
    path: &Path,
    console: crate::vm::ConsoleOutput,
) -> Result<(crate::vm::Vm, SnapshotStats), RestoreError> {
    restore_with(path, console, &[])
}

/// [`restore`], with `--disk` overrides: the `i`-th replaces the saved
/// VM's `i`-th disk (a clone given its own copy of the disk).
pub fn restore_with(
    path: &Path,
    console: crate::vm::ConsoleOutput,
    disks: &[crate::devices::DiskConfig],
) -> Result<(crate::vm::Vm, SnapshotStats), RestoreError> {
    restore_with_devices(path, console, disks, &[])
}

/// [`restore_with`], with `--net` overrides too: the `i`-th replaces the
/// tap and MAC of the saved VM's `i`-th network card (a clone's own MAC).
pub fn restore_with_devices(
    path: &Path,
    console: crate::vm::ConsoleOutput,
    disks: &[crate::devices::DiskConfig],
    nets: &[crate::devices::NetConfig],
) -> Result<(crate::vm::Vm, SnapshotStats), RestoreError> {
    let t = Instant::now();
    let mut snap = Snapshot::open(path)?;
    crate::devices::override_disks(&mut snap.state.devices.virtio, disks)
        .and_then(|()| crate::devices::override_nets(&mut snap.state.devices.virtio, nets))
        .map_err(RestoreError::Disk)?;
    let meta = snap.state.meta;
    let prepared = crate::vm::PreparedVm::new(meta.mem_size, meta.vcpus, console)?;
    let mut stats = snap.load_memory(prepared.ram())?;
    let vm = prepared.restore(&snap.state)?;
    stats.millis = ms(t.elapsed());
    Ok((vm, stats))
}

/// Lazily restores a snapshot into a new, running VM: the vCPUs run as soon
/// as the machine state is restored, and the memory follows through the
/// post-copy path. The snapshot is served by the post-copy page server on a
/// thread of this process ([`migration::migrate_machine`] over
/// [`SnapshotPages`]) to [`migration::receive_from`] on the calling thread,
/// over two socketpairs (no port is bound): guest accesses to pages not loaded yet fault
/// through userfaultfd and are fetched on demand while the rest is pushed.
///
/// The file's sizes, header, state and bitmap (and their CRC) are checked
/// exactly as [`restore`] checks them, before any VM exists. The page data's
/// CRC cannot be checked before the vCPUs run without reading every page
/// first, which is what lazy restore avoids: it is verified after the fact,
/// by one sequential pass over the stored pages once every page is present.
/// On a mismatch the VM (which has already run on that data) is discarded
/// and the error is [`SnapshotError::Checksum`] with part `"memory"`. Eager
/// [`restore`] verifies the data before the VM runs.
///
/// The statistics are the migration's: `downtime_us` is the time from the
/// start of this call until the vCPUs run, `total_ms` until every page is
/// present.
pub fn restore_lazy(
    path: &Path,
    console: crate::vm::ConsoleOutput,
    replay_mode: Replay,
) -> Result<(crate::vm::Vm, MigrationStats), RestoreError> {
    restore_lazy_with(path, console, replay_mode, &[])
}

/// [`restore_lazy`], with `--disk` overrides (see [`restore_with`]).
pub fn restore_lazy_with(
    path: &Path,
    console: crate::vm::ConsoleOutput,
    replay_mode: Replay,
    disks: &[crate::devices::DiskConfig],
) -> Result<(crate::vm::Vm, MigrationStats), RestoreError> {
    restore_lazy_with_devices(path, console, replay_mode, disks, &[], Backing::Shmem)
}

/// [`restore_lazy_with`], with `--net` overrides too (see
/// [`restore_with_devices`]), into RAM of `backing`. Into huge pages, the
/// replay list loads the whole huge pages it touches.
pub fn restore_lazy_with_devices(
    path: &Path,
    console: crate::vm::ConsoleOutput,
    replay_mode: Replay,
    disks: &[crate::devices::DiskConfig],
    nets: &[crate::devices::NetConfig],
    backing: Backing,
) -> Result<(crate::vm::Vm, MigrationStats), RestoreError> {
    let start_host_us = crate::console::now_us();
    let snap = Snapshot::open(path)?;
    // The two connections are socketpairs: no port is bound, so no other
    // process can connect to the restore.
    let (src_control, dst_control) = Conn::pair().map_err(RestoreError::Socketpair)?;
    let (src_fault, dst_fault) = Conn::pair().map_err(RestoreError::Socketpair)?;
    let dial = migration::Dial::given(src_control, src_fault);
    // The pages an earlier lazy restore of this snapshot faulted on are
    // loaded before the vCPUs run, straight from the file (see
    // `migration::preload`); the first restore records them.
    let pages = snap.state.meta.mem_size / PAGE_SIZE as u64;
    let replay_path = crate::snapshot_replay::path_for(path);
    let replay = match replay_mode {
        Replay::Off | Replay::Record => None,
        Replay::Auto => crate::snapshot_replay::read(&replay_path, pages).unwrap_or_else(|e| {
            tracing::warn!(path = %replay_path.display(), "ignoring the replay list: {e}");
            None
        }),
    };
    let preloaded = replay.map(|list| {
        let set = ferry_protocol::PageBitmap::new(pages);
        for p in list {
            set.set(p);
        }
        let set = match backing {
            Backing::HugePages => migration::preload::whole_huge_pages(&set),
            Backing::Shmem => set,
        };
        tracing::info!(
            path = %replay_path.display(),
            "loading {} recorded pages before the vCPUs run",
            set.count()
        );
        Arc::new(set)
    });
    let record = replay_mode == Replay::Record;
    // Both ends share a random session id all the same, so the destination
    // would take no other session.
    let session_id =
        migration::session::random_session_id().map_err(|e| RestoreError::Thread(e.to_string()))?;
    // Both ends are in this process: copying a page is cheaper than
    // compressing it.
    // Recording: the push waits while the guest faults, so that its
    // faults name its whole working set, not only the pages it reached
    // before the push did.
    let opts = SourceOptions {
        server: ferry_page_server::server::ServerConfig {
            lz4: false,
            push_hold: record.then_some(RECORD_HOLD),
            ..Default::default()
        },
        session_id: Some(session_id),
        preloaded: preloaded.clone(),
        ..Default::default()
    };
    // Both ends are in this process: a failure is not a lost network link,
    // so recovery gets only a short window.
    let dest_opts = migration::DestOptions {
        recovery_window: Duration::from_secs(2),
        accept_timeout: Some(Duration::from_secs(10)),
        expect_session: Some(session_id),
        disk_overrides: disks.to_vec(),
        net_overrides: nets.to_vec(),
        backing,
        preload: preloaded.map(|set| migration::preload::Preload {
            set,
            from: Arc::new(snap.page_source()),
        }),
        ..Default::default()
    };
    let (received, served) = std::thread::scope(|s| {
        let server = std::thread::Builder::new()
            .name("snapshot-pages".into())
            .spawn_scoped(s, || {
                migration::migrate_machine(
                    &snap.state,
                    &snap.page_source(),
                    &dial,
                    &opts,
                    start_host_us,
                )
            })
            .map_err(|e| RestoreError::Thread(e.to_string()))?;
        let received = Acceptor::given(vec![dst_control, dst_fault], dest_opts.peer_timeout)
            .map_err(migration::DestError::from)
            .and_then(|acceptor| migration::receive_from(acceptor, console, &dest_opts))
            .and_then(|r| match (r.failure, r.stats) {
                (None, Some(stats)) => Ok((r.vm, stats)),
                (Some(e), _) => Err(e),
                (None, None) => Err(DestError::Refused("no statistics".into())),
            });
        let served = server
            .join()
            .map_err(|_| RestoreError::Thread("panicked".into()))?;
        Ok::<_, RestoreError>((received, served))
    })?;
    let (vm, stats) = match (received, served) {
        // The page server's view (with its counters), and the fault order
        // that only this side saw.
        (Ok((vm, mine)), Ok(outcome)) => {
            let mut stats = outcome.stats;
            stats.demand_order = mine.demand_order;
            (vm, stats)
        }
        // Every page is present: the VM is whole even though the page
        // server did not see the end of the session cleanly.
        (Ok((vm, stats)), Err(e)) => {
            tracing::warn!("snapshot page server: {e}");
            (vm, stats)
        }
        (Err(dest), server) => {
            return Err(RestoreError::Lazy {
                dest: Box::new(dest),
                server: server.err().map(Box::new),
            })
        }
    };
    let t = Instant::now();
    snap.verify_memory()?;
    tracing::info!(millis = ms(t.elapsed()), "snapshot page data verified");
    if record && !stats.demand_order.is_empty() {
        match crate::snapshot_replay::write(&replay_path, &stats.demand_order) {
            Ok(()) => tracing::info!(
                pages = stats.demand_order.len(),
                path = %replay_path.display(),
                "recorded the restore's working set for the next restore"
            ),
            Err(e) => {
                tracing::warn!(path = %replay_path.display(), "cannot record the replay list: {e}")
            }
        }
    }
    Ok((vm, stats))
}
