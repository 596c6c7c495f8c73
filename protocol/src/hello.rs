//! The handshake: `Hello`, `HelloAck`, connection roles and the migration
//! mode option.

use std::time::Duration;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{ProtocolError, HELLO_FIXED, HELLO_MAGIC, MAX_HELLO_OPTIONS, PROTOCOL_VERSION};

/// Hello option (critical): the migration mode, one byte ([`MigrationMode`]).
pub const OPT_MODE: u16 = 0x8001;

/// Hello option (critical): the local disks that move with the memory
/// (`--migrate-disk`), as `count` entries of `slot u32 | blocks u64`
/// (little-endian): the virtio slot of the disk and its size in 4 KiB
/// blocks. Their blocks follow guest RAM in the page space, in this order.
pub const OPT_DISKS: u16 = 0x8002;

/// Hello option (not critical): the source's peer timeout in milliseconds,
/// a `u32` (little-endian). With [`features::PEER_TIMEOUT`](super::features::PEER_TIMEOUT)
/// the destination answers with its own in the `HelloAck`, and both sides
/// use [`session_peer_timeout`].
pub const OPT_PEER_TIMEOUT: u16 = 0x0001;

/// The shortest peer timeout a side takes from its peer: however short the
/// peer's, this side waits at least this long for it and pings it at most
/// every quarter of it.
pub const MIN_PEER_TIMEOUT: Duration = Duration::from_millis(100);

/// The peer timeout a session runs with on this side: the shorter of this
/// side's own (`own`) and the peer's (`peer_ms`, when it said one), but not
/// shorter than [`MIN_PEER_TIMEOUT`] because of the peer. Both sides
/// compute the same value from the two, so each pings often enough for the
/// other (every quarter of it) and deems the other gone after the same
/// silence.
pub fn session_peer_timeout(own: Duration, peer_ms: Option<u32>) -> Duration {
    match peer_ms {
        None => own,
        Some(ms) => own.min(Duration::from_millis(ms.into()).max(MIN_PEER_TIMEOUT)),
    }
}

/// A peer timeout as `OPT_PEER_TIMEOUT` and the `HelloAck` carry it, in
/// whole milliseconds (saturating at `u32::MAX`, about 49 days).
pub fn peer_timeout_ms(t: Duration) -> u32 {
    u32::try_from(t.as_millis()).unwrap_or(u32::MAX)
}

/// Most migrated disks one `Hello` may name.
pub const MAX_MIGRATED_DISKS: usize = 16;

/// Largest migrated disk, in 4 KiB blocks (16 TiB).
pub const MAX_DISK_BLOCKS: u64 = 1 << 32;

/// One migrated disk, as the `OPT_DISKS` option names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigratedDisk {
    /// The virtio-mmio slot of the disk's device.
    pub slot: u32,
    /// Its size in 4 KiB blocks.
    pub blocks: u64,
}

impl MigratedDisk {
    /// Encodes the `OPT_DISKS` option value.
    pub fn encode_option(disks: &[MigratedDisk]) -> Vec<u8> {
        let mut v = Vec::with_capacity(disks.len() * 12);
        for d in disks {
            v.extend_from_slice(&d.slot.to_le_bytes());
            v.extend_from_slice(&d.blocks.to_le_bytes());
        }
        v
    }
}

/// How the memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum MigrationMode {
    /// State first; pages on demand and by background push.
    Postcopy = 0,
    /// Pause, all pages, then state.
    StopAndCopy = 1,
    /// Pages while running, in rounds of dirty pages; pause; the rest; state.
    Precopy = 2,
    /// Some pre-copy rounds, then post-copy for the rest.
    Hybrid = 3,
}

impl MigrationMode {
    /// Decodes the `OPT_MODE` byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        [
            Self::Postcopy,
            Self::StopAndCopy,
            Self::Precopy,
            Self::Hybrid,
        ]
        .into_iter()
        .find(|m| *m as u8 == v)
    }

    /// The name used on the command line and in statistics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Postcopy => "postcopy",
            Self::StopAndCopy => "stop-and-copy",
            Self::Precopy => "precopy",
            Self::Hybrid => "hybrid",
        }
    }

    /// True when the destination fetches pages after resuming.
    pub fn lazy(self) -> bool {
        matches!(self, Self::Postcopy | Self::Hybrid)
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Self::Postcopy,
            Self::StopAndCopy,
            Self::Precopy,
            Self::Hybrid,
        ]
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| {
            format!("unknown mode {s:?}: expected postcopy, stop-and-copy, precopy or hybrid")
        })
    }
}

/// Role of a connection within a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// State, pushed pages, completion.
    Control = 0,
    /// Demand page requests and their answers only.
    Fault = 1,
}

/// The fixed part of a `Hello` as it lies on the wire (48 bytes,
/// little-endian); options follow as `tag u16 | len u16 | value`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHello {
    magic: [u8; 8],
    version: U32,
    role: u8,
    reserved: [u8; 3],
    session_id: U64,
    features: U64,
    mem_size: U64,
    vcpus: U32,
    page_size: U32,
}

/// A `HelloAck` as it lies on the wire (24 bytes, then [`RawAckTimeout`]
/// when its features include `PEER_TIMEOUT`).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHelloAck {
    version: U32,
    status: U32,
    features: U64,
    session_id: U64,
}

/// The tail of a `HelloAck` whose features include `PEER_TIMEOUT` (8 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawAckTimeout {
    peer_timeout_ms: U32,
    reserved: U32,
}

/// One option's header inside a `Hello`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawOption {
    tag: U16,
    len: U16,
}

/// The first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version of the sender.
    pub version: u32,
    /// What this connection is for.
    pub role: Role,
    /// Identifies the migration; the fault connection repeats the control
    /// connection's id.
    pub session_id: u64,
    /// Features the source wants ([`features`](super::features)).
    pub features: u64,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Page size (4096).
    pub page_size: u32,
    /// Extension options `(tag, value)`. Tag bit 15 marks an option the
    /// receiver must understand or refuse the session.
    pub options: Vec<(u16, Vec<u8>)>,
}

impl Hello {
    /// The migration mode the source asks for (post-copy when absent).
    pub fn mode(&self) -> Result<MigrationMode, ProtocolError> {
        match self.options.iter().find(|(t, _)| *t == OPT_MODE) {
            None => Ok(MigrationMode::Postcopy),
            Some((_, v)) => v
                .first()
                .copied()
                .and_then(MigrationMode::from_u8)
                .filter(|_| v.len() == 1)
                .ok_or_else(|| ProtocolError::Handshake(format!("bad mode option {v:?}"))),
        }
    }

    /// The source's peer timeout in milliseconds (`OPT_PEER_TIMEOUT`), when
    /// it says one.
    pub fn peer_timeout_ms(&self) -> Result<Option<u32>, ProtocolError> {
        match self.options.iter().find(|(t, _)| *t == OPT_PEER_TIMEOUT) {
            None => Ok(None),
            Some((_, v)) => <[u8; 4]>::try_from(v.as_slice())
                .map(|b| Some(u32::from_le_bytes(b)))
                .map_err(|_| {
                    ProtocolError::Handshake(format!(
                        "peer timeout option of {} bytes (4)",
                        v.len()
                    ))
                }),
        }
    }

    /// The migrated disks the source names (none when absent). Every
    /// entry is checked: whole entries, at most [`MAX_MIGRATED_DISKS`],
    /// distinct slots, 1 to [`MAX_DISK_BLOCKS`] blocks each.
    pub fn disks(&self) -> Result<Vec<MigratedDisk>, ProtocolError> {
        let Some((_, v)) = self.options.iter().find(|(t, _)| *t == OPT_DISKS) else {
            return Ok(Vec::new());
        };
        let bad = |s: String| ProtocolError::Handshake(format!("migrated disks option: {s}"));
        if v.len() % 12 != 0 || v.len() / 12 > MAX_MIGRATED_DISKS {
            return Err(bad(format!(
                "{} bytes (entries of 12 bytes, at most {MAX_MIGRATED_DISKS})",
                v.len()
            )));
        }
        let mut out: Vec<MigratedDisk> = Vec::new();
        for e in v.chunks_exact(12) {
            let mut slot = [0u8; 4];
            slot.copy_from_slice(&e[..4]);
            let mut blocks = [0u8; 8];
            blocks.copy_from_slice(&e[4..]);
            let d = MigratedDisk {
                slot: u32::from_le_bytes(slot),
                blocks: u64::from_le_bytes(blocks),
            };
            if d.blocks == 0 || d.blocks > MAX_DISK_BLOCKS {
                return Err(bad(format!(
                    "slot {} has {} blocks (1 to {MAX_DISK_BLOCKS})",
                    d.slot, d.blocks
                )));
            }
            if out.iter().any(|o| o.slot == d.slot) {
                return Err(bad(format!("slot {} named twice", d.slot)));
            }
            out.push(d);
        }
        Ok(out)
    }

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let fixed = RawHello {
            magic: HELLO_MAGIC,
            version: U32::new(self.version),
            role: self.role as u8,
            reserved: [0; 3],
            session_id: U64::new(self.session_id),
            features: U64::new(self.features),
            mem_size: U64::new(self.mem_size),
            vcpus: U32::new(self.vcpus),
            page_size: U32::new(self.page_size),
        };
        let mut p = Vec::with_capacity(HELLO_FIXED);
        p.extend_from_slice(fixed.as_bytes());
        for (tag, value) in &self.options {
            let opt = RawOption {
                tag: U16::new(*tag),
                len: U16::new(value.len() as u16),
            };
            p.extend_from_slice(opt.as_bytes());
            p.extend_from_slice(value);
        }
        p
    }

    /// Decodes a payload, refusing other magics and versions.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |s: String| ProtocolError::Handshake(s);
        let Ok((fixed, mut rest)) = RawHello::ref_from_prefix(p) else {
            return Err(bad("not a Ferry migration peer (short Hello)".into()));
        };
        if fixed.magic != HELLO_MAGIC {
            return Err(bad("not a Ferry migration peer (bad Hello magic)".into()));
        }
        let version = fixed.version.get();
        if version != PROTOCOL_VERSION {
            return Err(bad(format!(
                "peer speaks protocol version {version}, this build speaks {PROTOCOL_VERSION}"
            )));
        }
        let role = match fixed.role {
            0 => Role::Control,
            1 => Role::Fault,
            r => return Err(bad(format!("unknown connection role {r}"))),
        };
        // The frame bound, again: each 4-byte empty option becomes a
        // 32-byte entry, so unbounded options would cost 8x their size.
        if rest.len() > MAX_HELLO_OPTIONS {
            return Err(bad(format!(
                "{} bytes of Hello options (at most {MAX_HELLO_OPTIONS})",
                rest.len()
            )));
        }
        let mut options = Vec::new();
        while !rest.is_empty() {
            let truncated = || bad("truncated Hello option".into());
            let (opt, after) = RawOption::ref_from_prefix(rest).map_err(|_| truncated())?;
            let len = usize::from(opt.len.get());
            let value = after.get(..len).ok_or_else(truncated)?;
            options.push((opt.tag.get(), value.to_vec()));
            rest = &after[len..];
        }
        Ok(Self {
            version,
            role,
            session_id: fixed.session_id.get(),
            features: fixed.features.get(),
            mem_size: fixed.mem_size.get(),
            vcpus: fixed.vcpus.get(),
            page_size: fixed.page_size.get(),
            options,
        })
    }
}

/// The destination's answer to a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck {
    /// Protocol version of the destination.
    pub version: u32,
    /// 0 = accepted; anything else is followed by an `Abort`.
    pub status: u32,
    /// Features both sides will use.
    pub features: u64,
    /// The session id being answered.
    pub session_id: u64,
    /// The destination's peer timeout in milliseconds: present exactly
    /// when `features` includes `PEER_TIMEOUT`.
    pub peer_timeout_ms: Option<u32>,
}

impl HelloAck {
    /// Encodes the payload: 24 bytes, or 32 with the peer timeout.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = RawHelloAck {
            version: U32::new(self.version),
            status: U32::new(self.status),
            features: U64::new(self.features),
            session_id: U64::new(self.session_id),
        }
        .as_bytes()
        .to_vec();
        if let Some(ms) = self.peer_timeout_ms {
            let tail = RawAckTimeout {
                peer_timeout_ms: U32::new(ms),
                reserved: U32::new(0),
            };
            p.extend_from_slice(tail.as_bytes());
        }
        p
    }

    /// Decodes a payload: 24 bytes, or 32 when its features include
    /// `PEER_TIMEOUT`.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::Handshake(format!("HelloAck of {} bytes", p.len()));
        let (raw, tail) = RawHelloAck::ref_from_prefix(p).map_err(|_| bad())?;
        let features = raw.features.get();
        let peer_timeout_ms = if features & super::features::PEER_TIMEOUT != 0 {
            let t = RawAckTimeout::ref_from_bytes(tail).map_err(|_| {
                ProtocolError::Handshake(format!(
                    "HelloAck of {} bytes with PEER_TIMEOUT (32)",
                    p.len()
                ))
            })?;
            Some(t.peer_timeout_ms.get())
        } else if tail.is_empty() {
            None
        } else {
            return Err(bad());
        };
        Ok(Self {
            version: raw.version.get(),
            status: raw.status.get(),
            features,
            session_id: raw.session_id.get(),
            peer_timeout_ms,
        })
    }
}

// The wire structs are exactly the sizes the protocol documents.
const _: () = assert!(std::mem::size_of::<RawHello>() == HELLO_FIXED);
const _: () = assert!(std::mem::size_of::<RawHelloAck>() == 24);
const _: () = assert!(std::mem::size_of::<RawAckTimeout>() == 8);
