//! The state blob: a versioned, checksummed list of tagged sections.
//!
//! ```text
//! +--------+---------+---------------+----------+-------------------+-------+
//! | magic  | version | section_count | body_len | sections ...      | crc32 |
//! | 8 B    | u32     | u32           | u64      | body_len bytes    | u32   |
//! +--------+---------+---------------+----------+-------------------+-------+
//! section: | tag u16 | instance u16 | len u32 | payload (len bytes) |
//! ```
//!
//! All integers are little-endian. `instance` is the vCPU index for per-vCPU
//! sections and 0 otherwise. KVM structures are stored as their exact `repr(C)`
//! bytes, so a section's length also checks that both sides agree on the
//! structure's size. The CRC-32 covers every byte before it. A tag with bit
//! 15 set is optional: a reader that does not know it skips it; any other
//! unknown tag is an error. The decoder never panics on any input.
//!
//! Versions: 1 is the original layout. 2 adds the mandatory
//! [`Tag::SerialLine`] section (the console line being printed at the
//! pause). 3 adds one [`Tag::Virtio`] section per virtio-mmio device
//! (instance = its slot, slots numbered from 0 without gaps): transport
//! registers, queues and the backend's configuration (see
//! `state::devices_codec`). This build writes 3 and reads 1 to 3; older
//! blobs decode with an empty line and no devices.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};
use vm_superio::serial::SerialState;
use zerocopy::{FromBytes, IntoBytes};

use super::{DeviceState, MachineMeta, MachineState, VcpuState, VmState};
use crate::layout::MAX_VCPUS;

/// Magic at the start of every state blob.
pub const STATE_MAGIC: [u8; 8] = *b"FERRYST\0";
/// Version written by this build.
pub const STATE_FORMAT_VERSION: u32 = 3;
/// Oldest version this build reads.
pub const MIN_STATE_FORMAT_VERSION: u32 = 1;
/// First version with [`Tag::SerialLine`].
const SERIAL_LINE_SINCE: u32 = 2;
/// First version with [`Tag::Virtio`].
const VIRTIO_SINCE: u32 = 3;
/// Longest [`Tag::SerialLine`] payload: a partial console line is always
/// shorter than the console's longest line.
pub const MAX_SERIAL_LINE: usize = crate::console::MAX_LINE - 1;
const HEADER_LEN: usize = 24;
/// Sanity bound on a whole blob (a few KiB per vCPU in practice).
pub const MAX_STATE_LEN: usize = 16 << 20;

/// Section tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Tag {
    /// [`MachineMeta`]: vcpus u32, mem_size u64, tsc_khz u32.
    Meta = 0x0001,
    /// kvm_pit_state2.
    Pit2 = 0x0100,
    /// kvm_clock_data.
    Clock = 0x0101,
    /// kvm_irqchip, PIC master.
    PicMaster = 0x0102,
    /// kvm_irqchip, PIC slave.
    PicSlave = 0x0103,
    /// kvm_irqchip, IOAPIC.
    Ioapic = 0x0104,
    /// kvm_cpuid_entry2 array.
    Cpuid = 0x0200,
    /// kvm_mp_state.
    MpState = 0x0201,
    /// kvm_regs.
    Regs = 0x0202,
    /// kvm_sregs.
    Sregs = 0x0203,
    /// kvm_xsave.
    Xsave = 0x0204,
    /// kvm_xcrs.
    Xcrs = 0x0205,
    /// kvm_debugregs.
    DebugRegs = 0x0206,
    /// kvm_lapic_state.
    Lapic = 0x0207,
    /// kvm_msr_entry array.
    Msrs = 0x0208,
    /// kvm_vcpu_events.
    Events = 0x0209,
    /// COM1 registers and receive FIFO.
    Serial = 0x0300,
    /// The console line COM1 had begun printing: its raw bytes, at most
    /// [`MAX_SERIAL_LINE`], no line ends. Since version 2.
    SerialLine = 0x0301,
    /// One virtio-mmio device (instance = slot). Since version 3.
    Virtio = 0x0310,
}

const ALL_TAGS: [Tag; 19] = [
    Tag::Meta,
    Tag::Pit2,
    Tag::Clock,
    Tag::PicMaster,
    Tag::PicSlave,
    Tag::Ioapic,
    Tag::Cpuid,
    Tag::MpState,
    Tag::Regs,
    Tag::Sregs,
    Tag::Xsave,
    Tag::Xcrs,
    Tag::DebugRegs,
    Tag::Lapic,
    Tag::Msrs,
    Tag::Events,
    Tag::Serial,
    Tag::SerialLine,
    Tag::Virtio,
];

impl Tag {
    fn from_u16(v: u16) -> Option<Tag> {
        ALL_TAGS.iter().copied().find(|t| *t as u16 == v)
    }
    fn per_vcpu(self) -> bool {
        (self as u16) >> 8 == 0x02
    }
}

/// Why a state blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// Not a Ferry state blob.
    #[error("not a Ferry state blob (bad magic)")]
    BadMagic,
    /// Written by another format version.
    #[error("state format version {found} is not supported (this build reads versions {MIN_STATE_FORMAT_VERSION} to {STATE_FORMAT_VERSION})")]
    Version {
        /// The version in the blob.
        found: u32,
    },
    /// Shorter than its header says.
    #[error("state blob is truncated: {need} bytes needed, {have} present")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Longer than its header says, or absurdly large.
    #[error("state blob has a bad length ({0} bytes)")]
    BadLength(usize),
    /// Checksum mismatch.
    #[error("state blob checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// CRC in the blob.
        stored: u32,
        /// CRC of the content.
        computed: u32,
    },
    /// A section tag this build does not know and may not skip.
    #[error("unknown mandatory state section tag {0:#06x}")]
    UnknownTag(u16),
    /// A section's length does not fit its structure.
    #[error("state section {tag:?} (instance {instance}) has length {len}, expected {expected}")]
    SectionSize {
        /// The section.
        tag: Tag,
        /// Its instance.
        instance: u16,
        /// Its length.
        len: usize,
        /// What the structure needs.
        expected: String,
    },
    /// The same section twice.
    #[error("state section {tag:?} (instance {instance}) appears twice")]
    Duplicate {
        /// The section.
        tag: Tag,
        /// Its instance.
        instance: u16,
    },
    /// A required section is absent.
    #[error("state section {tag:?} (instance {instance}) is missing")]
    Missing {
        /// The section.
        tag: Tag,
        /// Its instance.
        instance: u16,
    },
    /// Header or metadata values are out of range.
    #[error("state blob is inconsistent: {0}")]
    Inconsistent(String),
}

struct Writer {
    buf: Vec<u8>,
    count: u32,
}

impl Writer {
    fn section(&mut self, tag: Tag, instance: u16, payload: &[u8]) {
        self.buf.extend_from_slice(&(tag as u16).to_le_bytes());
        self.buf.extend_from_slice(&instance.to_le_bytes());
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.count += 1;
    }
}

/// Encodes `state` into a blob.
pub fn encode(state: &MachineState) -> Vec<u8> {
    encode_as(state, STATE_FORMAT_VERSION)
}

/// Encodes `state` in the layout of `version` (older layouts leave out
/// what they cannot hold).
fn encode_as(state: &MachineState, version: u32) -> Vec<u8> {
    let mut w = Writer {
        buf: vec![0; HEADER_LEN],
        count: 0,
    };
    let m = &state.meta;
    let mut meta = Vec::with_capacity(16);
    meta.extend_from_slice(&m.vcpus.to_le_bytes());
    meta.extend_from_slice(&m.mem_size.to_le_bytes());
    meta.extend_from_slice(&m.tsc_khz.to_le_bytes());
    w.section(Tag::Meta, 0, &meta);
    w.section(Tag::Pit2, 0, state.vm.pit.as_bytes());
    w.section(Tag::Clock, 0, state.vm.clock.as_bytes());
    w.section(Tag::PicMaster, 0, state.vm.pic_master.as_bytes());
    w.section(Tag::PicSlave, 0, state.vm.pic_slave.as_bytes());
    w.section(Tag::Ioapic, 0, state.vm.ioapic.as_bytes());
    for (i, v) in state.vcpus.iter().enumerate() {
        let i = i as u16;
        w.section(Tag::Cpuid, i, v.cpuid.as_bytes());
        w.section(Tag::MpState, i, v.mp_state.as_bytes());
        w.section(Tag::Regs, i, v.regs.as_bytes());
        w.section(Tag::Sregs, i, v.sregs.as_bytes());
        w.section(Tag::Xsave, i, v.xsave.as_bytes());
        w.section(Tag::Xcrs, i, v.xcrs.as_bytes());
        w.section(Tag::DebugRegs, i, v.debugregs.as_bytes());
        w.section(Tag::Lapic, i, v.lapic.as_bytes());
        w.section(Tag::Msrs, i, v.msrs.as_bytes());
        w.section(Tag::Events, i, v.events.as_bytes());
    }
    w.section(Tag::Serial, 0, &encode_serial(&state.devices.serial));
    if version >= SERIAL_LINE_SINCE {
        w.section(Tag::SerialLine, 0, &state.devices.serial_line);
    }
    if version >= VIRTIO_SINCE {
        for (i, d) in state.devices.virtio.iter().enumerate() {
            w.section(Tag::Virtio, i as u16, &super::devices_codec::encode(d));
        }
    }

    let body_len = (w.buf.len() - HEADER_LEN) as u64;
    w.buf[0..8].copy_from_slice(&STATE_MAGIC);
    w.buf[8..12].copy_from_slice(&version.to_le_bytes());
    w.buf[12..16].copy_from_slice(&w.count.to_le_bytes());
    w.buf[16..24].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32fast::hash(&w.buf);
    w.buf.extend_from_slice(&crc.to_le_bytes());
    w.buf
}

fn encode_serial(s: &SerialState) -> Vec<u8> {
    let mut v = vec![
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ];
    v.extend_from_slice(&(s.in_buffer.len() as u32).to_le_bytes());
    v.extend_from_slice(&s.in_buffer);
    v
}

fn decode_serial(p: &[u8]) -> Result<SerialState, CodecError> {
    let bad = || CodecError::SectionSize {
        tag: Tag::Serial,
        instance: 0,
        len: p.len(),
        expected: "13 + FIFO length".into(),
    };
    let (regs, rest) = p.split_at_checked(9).ok_or_else(bad)?;
    let (n, fifo) = rest.split_at_checked(4).ok_or_else(bad)?;
    let n = u32::from_le_bytes(n.try_into().map_err(|_| bad())?) as usize;
    if fifo.len() != n || n > 64 {
        return Err(bad());
    }
    Ok(SerialState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer: fifo.to_vec(),
    })
}

fn decode_serial_line(p: &[u8]) -> Result<Vec<u8>, CodecError> {
    if p.len() > MAX_SERIAL_LINE || p.iter().any(|&b| b == b'\n' || b == b'\r') {
        return Err(CodecError::SectionSize {
            tag: Tag::SerialLine,
            instance: 0,
            len: p.len(),
            expected: format!("at most {MAX_SERIAL_LINE} bytes, no line ends"),
        });
    }
    Ok(p.to_vec())
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Where each section's payload lies, keyed by (tag, instance).
type SectionMap<'a> = std::collections::BTreeMap<(u16, u16), &'a [u8]>;

/// Checks the framing of a blob and returns its version and sections.
fn sections(blob: &[u8]) -> Result<(u32, SectionMap<'_>), CodecError> {
    if blob.len() < 8 || blob[0..8] != STATE_MAGIC {
        return Err(CodecError::BadMagic);
    }
    if blob.len() < HEADER_LEN + 4 {
        return Err(CodecError::Truncated {
            need: HEADER_LEN + 4,
            have: blob.len(),
        });
    }
    let version = le_u32(blob, 8);
    if !(MIN_STATE_FORMAT_VERSION..=STATE_FORMAT_VERSION).contains(&version) {
        return Err(CodecError::Version { found: version });
    }
    let count = le_u32(blob, 12);
    let body_len = le_u64(blob, 16);
    let total = usize::try_from(body_len)
        .ok()
        .and_then(|b| b.checked_add(HEADER_LEN + 4))
        .filter(|&t| t <= MAX_STATE_LEN)
        .ok_or(CodecError::BadLength(blob.len()))?;
    if blob.len() < total {
        return Err(CodecError::Truncated {
            need: total,
            have: blob.len(),
        });
    }
    if blob.len() > total {
        return Err(CodecError::BadLength(blob.len()));
    }
    let stored = le_u32(blob, total - 4);
    let computed = crc32fast::hash(&blob[..total - 4]);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    let body = &blob[HEADER_LEN..total - 4];
    let mut at = 0usize;
    let mut map = SectionMap::new();
    for _ in 0..count {
        let hdr = body.get(at..at + 8).ok_or(CodecError::Truncated {
            need: HEADER_LEN + at + 8,
            have: blob.len(),
        })?;
        let tag = u16::from_le_bytes([hdr[0], hdr[1]]);
        let instance = u16::from_le_bytes([hdr[2], hdr[3]]);
        let len = le_u32(hdr, 4) as usize;
        let payload = body
            .get(at + 8..at + 8 + len)
            .ok_or(CodecError::Truncated {
                need: HEADER_LEN + at + 8 + len,
                have: blob.len(),
            })?;
        at += 8 + len;
        match Tag::from_u16(tag) {
            Some(Tag::SerialLine) if version < SERIAL_LINE_SINCE => {
                return Err(CodecError::UnknownTag(tag));
            }
            Some(Tag::Virtio) if version < VIRTIO_SINCE => {
                return Err(CodecError::UnknownTag(tag));
            }
            Some(t) => {
                if map.insert((tag, instance), payload).is_some() {
                    return Err(CodecError::Duplicate { tag: t, instance });
                }
            }
            None if tag & 0x8000 != 0 => {}
            None => return Err(CodecError::UnknownTag(tag)),
        }
    }
    if at != body.len() {
        return Err(CodecError::Inconsistent(format!(
            "{} bytes after the last of {count} sections",
            body.len() - at
        )));
    }
    Ok((version, map))
}

fn get<'a>(map: &SectionMap<'a>, tag: Tag, instance: u16) -> Result<&'a [u8], CodecError> {
    map.get(&(tag as u16, instance))
        .copied()
        .ok_or(CodecError::Missing { tag, instance })
}

fn fixed<T: FromBytes>(map: &SectionMap<'_>, tag: Tag, instance: u16) -> Result<T, CodecError> {
    let p = get(map, tag, instance)?;
    T::read_from_bytes(p).map_err(|_| CodecError::SectionSize {
        tag,
        instance,
        len: p.len(),
        expected: std::mem::size_of::<T>().to_string(),
    })
}

fn array<T: FromBytes + Clone>(
    map: &SectionMap<'_>,
    tag: Tag,
    instance: u16,
    max: usize,
) -> Result<Vec<T>, CodecError> {
    let p = get(map, tag, instance)?;
    let size = std::mem::size_of::<T>();
    let n = p.len() / size;
    if p.len() % size != 0 || n > max {
        return Err(CodecError::SectionSize {
            tag,
            instance,
            len: p.len(),
            expected: format!("a multiple of {size}, at most {max} entries"),
        });
    }
    let mut out = Vec::with_capacity(n);
    for chunk in p.chunks_exact(size) {
        out.push(
            T::read_from_bytes(chunk).map_err(|_| CodecError::SectionSize {
                tag,
                instance,
                len: p.len(),
                expected: size.to_string(),
            })?,
        );
    }
    Ok(out)
}

/// Reads only the machine shape, e.g. to size a VM before restoring into it.
pub fn decode_meta(blob: &[u8]) -> Result<MachineMeta, CodecError> {
    meta(&sections(blob)?.1)
}

fn meta(map: &SectionMap<'_>) -> Result<MachineMeta, CodecError> {
    let p = get(map, Tag::Meta, 0)?;
    if p.len() != 16 {
        return Err(CodecError::SectionSize {
            tag: Tag::Meta,
            instance: 0,
            len: p.len(),
            expected: "16".into(),
        });
    }
    let m = MachineMeta {
        vcpus: le_u32(p, 0),
        mem_size: le_u64(p, 4),
        tsc_khz: le_u32(p, 12),
    };
    if !crate::layout::valid_vcpus(m.vcpus) {
        return Err(CodecError::Inconsistent(format!(
            "{} vCPUs (a Ferry VM has 1 to {MAX_VCPUS})",
            m.vcpus
        )));
    }
    if !crate::layout::valid_mem_size(m.mem_size) {
        return Err(CodecError::Inconsistent(format!(
            "memory size {} bytes",
            m.mem_size
        )));
    }
    Ok(m)
}

/// Decodes and fully validates a blob.
pub fn decode(blob: &[u8]) -> Result<MachineState, CodecError> {
    let (version, map) = sections(blob)?;
    let meta = meta(&map)?;
    for &(tag, instance) in map.keys() {
        let t = Tag::from_u16(tag).ok_or(CodecError::UnknownTag(tag))?;
        let ok = if t.per_vcpu() {
            u32::from(instance) < meta.vcpus
        } else if t == Tag::Virtio {
            usize::from(instance) < crate::layout::MAX_VIRTIO_DEVICES
        } else {
            instance == 0
        };
        if !ok {
            return Err(CodecError::Inconsistent(format!(
                "section {t:?} has instance {instance} but the machine has {} vCPUs",
                meta.vcpus
            )));
        }
    }
    let vm = VmState {
        pit: fixed(&map, Tag::Pit2, 0)?,
        clock: fixed(&map, Tag::Clock, 0)?,
        pic_master: fixed(&map, Tag::PicMaster, 0)?,
        pic_slave: fixed(&map, Tag::PicSlave, 0)?,
        ioapic: fixed(&map, Tag::Ioapic, 0)?,
    };
    // Grown as sections are found: a small blob may claim 64 vCPUs and
    // carry none, and each entry is some 5 KiB.
    let mut vcpus = Vec::new();
    for i in 0..meta.vcpus as u16 {
        vcpus.push(VcpuState {
            cpuid: array::<kvm_cpuid_entry2>(
                &map,
                Tag::Cpuid,
                i,
                kvm_bindings::KVM_MAX_CPUID_ENTRIES,
            )?,
            mp_state: fixed(&map, Tag::MpState, i)?,
            regs: fixed(&map, Tag::Regs, i)?,
            sregs: fixed(&map, Tag::Sregs, i)?,
            xsave: fixed(&map, Tag::Xsave, i)?,
            xcrs: fixed(&map, Tag::Xcrs, i)?,
            debugregs: fixed(&map, Tag::DebugRegs, i)?,
            lapic: fixed(&map, Tag::Lapic, i)?,
            msrs: array::<kvm_msr_entry>(&map, Tag::Msrs, i, 1024)?,
            events: fixed(&map, Tag::Events, i)?,
        });
    }
    let serial = decode_serial(get(&map, Tag::Serial, 0)?)?;
    let serial_line = if version >= SERIAL_LINE_SINCE {
        decode_serial_line(get(&map, Tag::SerialLine, 0)?)?
    } else {
        Vec::new()
    };
    let mut virtio = Vec::new();
    for slot in 0..crate::layout::MAX_VIRTIO_DEVICES as u16 {
        let Some(p) = map.get(&(Tag::Virtio as u16, slot)) else {
            break;
        };
        virtio.push(
            super::devices_codec::decode(p)
                .map_err(|e| CodecError::Inconsistent(format!("virtio device {slot}: {e}")))?,
        );
    }
    let slots = map.keys().filter(|k| k.0 == Tag::Virtio as u16).count();
    if slots != virtio.len() {
        return Err(CodecError::Inconsistent(format!(
            "virtio device slots are not numbered 0..{slots}"
        )));
    }
    Ok(MachineState {
        meta,
        vm,
        vcpus,
        devices: DeviceState {
            serial,
            serial_line,
            virtio,
        },
    })
}

/// Names the sections whose payloads differ between two blobs, e.g.
/// `["Clock", "Msrs[0]"]`. Both blobs must be valid.
pub fn differing_sections(a: &[u8], b: &[u8]) -> Result<Vec<String>, CodecError> {
    let (sa, sb) = (sections(a)?.1, sections(b)?.1);
    let mut out = Vec::new();
    for (key, pa) in &sa {
        if sb.get(key) != Some(pa) {
            out.push(section_name(*key));
        }
    }
    for key in sb.keys() {
        if !sa.contains_key(key) {
            out.push(section_name(*key));
        }
    }
    Ok(out)
}

fn section_name((tag, instance): (u16, u16)) -> String {
    match Tag::from_u16(tag) {
        Some(t) if t.per_vcpu() => format!("{t:?}[{instance}]"),
        Some(t) => format!("{t:?}"),
        None => format!("{tag:#06x}[{instance}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::*;

    fn sample() -> MachineState {
        let v = VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 7,
                ..Default::default()
            }],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            events: kvm_vcpu_events::default(),
        };
        MachineState {
            meta: MachineMeta {
                vcpus: 2,
                mem_size: 64 << 20,
                tsc_khz: 2_000_000,
            },
            vm: VmState {
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data::default(),
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip::default(),
            },
            vcpus: vec![v.clone(), v],
            devices: DeviceState {
                serial: SerialState {
                    in_buffer: vec![1, 2, 3],
                    ..Default::default()
                },
                serial_line: b"FERRY TI".to_vec(),
                virtio: vec![crate::state::devices_codec::sample()],
            },
        }
    }

    /// Rewrites a blob's header and checksum after its body was edited.
    fn reseal(mut b: Vec<u8>, version: u32, count: u32) -> Vec<u8> {
        b.truncate(b.len() - 4);
        let body = (b.len() - HEADER_LEN) as u64;
        b[8..12].copy_from_slice(&version.to_le_bytes());
        b[12..16].copy_from_slice(&count.to_le_bytes());
        b[16..24].copy_from_slice(&body.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// `sample()`'s blob with its SerialLine section (the last) replaced.
    fn with_line(line: &[u8]) -> Vec<u8> {
        let mut s = sample();
        s.devices.serial_line.clear();
        s.devices.virtio.clear();
        let mut b = encode(&s);
        // Drop the CRC and the empty section's 8-byte header, then append
        // the section by hand so no encoder-side bound applies.
        b.truncate(b.len() - 4 - 8);
        b.extend_from_slice(&(Tag::SerialLine as u16).to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(line.len() as u32).to_le_bytes());
        b.extend_from_slice(line);
        b.extend_from_slice(&[0; 4]);
        let count = le_u32(&b, 12);
        reseal(b, STATE_FORMAT_VERSION, count)
    }

    #[test]
    fn the_partial_console_line_round_trips() {
        let back = decode(&encode(&sample())).unwrap();
        assert_eq!(back.devices.serial_line, b"FERRY TI");
        let longest = vec![b'x'; MAX_SERIAL_LINE];
        assert_eq!(
            decode(&with_line(&longest)).unwrap().devices.serial_line,
            longest
        );
        assert!(decode(&with_line(b""))
            .unwrap()
            .devices
            .serial_line
            .is_empty());
    }

    #[test]
    fn a_bad_partial_console_line_is_refused() {
        for line in [&vec![b'x'; MAX_SERIAL_LINE + 1][..], b"ab\ncd", b"\r"] {
            assert!(
                matches!(
                    decode(&with_line(line)),
                    Err(CodecError::SectionSize {
                        tag: Tag::SerialLine,
                        ..
                    })
                ),
                "{} bytes",
                line.len()
            );
        }
        // Version 2 requires the section.
        let v1_body = encode_as(&sample(), 1);
        let count = le_u32(&v1_body, 12);
        assert_eq!(
            decode(&reseal(v1_body, 2, count)).err(),
            Some(CodecError::Missing {
                tag: Tag::SerialLine,
                instance: 0
            })
        );
    }

    #[test]
    fn version_1_blobs_still_decode() {
        let v1 = encode_as(&sample(), 1);
        assert_eq!(le_u32(&v1, 8), 1);
        let back = decode(&v1).unwrap();
        assert!(back.devices.serial_line.is_empty());
        assert_eq!(back.devices.serial.in_buffer, vec![1, 2, 3]);
        assert_eq!(back.vcpus[1].regs.rip, 0x1234);
        // Re-encoded, it is a version 2 blob of the same machine.
        let again = decode(&encode(&back)).unwrap();
        assert_eq!(encode_as(&again, 1), v1);
        // A version 1 blob cannot carry the section a version 1 reader
        // would refuse.
        let v2 = encode(&sample());
        let count = le_u32(&v2, 12);
        assert_eq!(
            decode(&reseal(v2, 1, count)).err(),
            Some(CodecError::UnknownTag(Tag::SerialLine as u16))
        );
    }

    #[test]
    fn version_2_blobs_decode_without_devices_and_cannot_carry_them() {
        let v2 = encode_as(&sample(), 2);
        let back = decode(&v2).unwrap();
        assert!(back.devices.virtio.is_empty());
        assert_eq!(back.devices.serial_line, b"FERRY TI");
        let v3 = encode(&sample());
        let count = le_u32(&v3, 12);
        assert_eq!(
            decode(&reseal(v3, 2, count)).err(),
            Some(CodecError::UnknownTag(Tag::Virtio as u16))
        );
    }

    #[test]
    fn virtio_devices_round_trip_and_slots_have_no_gaps() {
        let mut s = sample();
        let mut second = crate::state::devices_codec::sample();
        second.queues[0].next_avail = 9;
        s.devices.virtio.push(second.clone());
        let back = decode(&encode(&s)).unwrap();
        assert_eq!(back.devices.virtio.len(), 2);
        assert_eq!(back.devices.virtio[1], second);
        // Drop slot 0: slot 1 alone is a gap.
        let mut b = encode(&s);
        let body = b[HEADER_LEN..b.len() - 4].to_vec();
        let mut at = 0;
        let mut kept = Vec::new();
        let mut count = 0;
        while at < body.len() {
            let tag = u16::from_le_bytes([body[at], body[at + 1]]);
            let inst = u16::from_le_bytes([body[at + 2], body[at + 3]]);
            let len = le_u32(&body, at + 4) as usize;
            if !(tag == Tag::Virtio as u16 && inst == 0) {
                kept.extend_from_slice(&body[at..at + 8 + len]);
                count += 1;
            }
            at += 8 + len;
        }
        b.truncate(HEADER_LEN);
        b.extend_from_slice(&kept);
        b.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode(&reseal(b, STATE_FORMAT_VERSION, count)),
            Err(CodecError::Inconsistent(_))
        ));
    }

    /// A state of more vCPUs than a VM may have is refused when its meta
    /// is read (as `decode_meta` does to size a VM), naming the count and
    /// the limit; one of exactly [`MAX_VCPUS`] decodes.
    #[test]
    fn a_state_of_more_vcpus_than_a_vm_can_have_is_refused_at_decode() {
        let with_vcpus = |n: u32| {
            let mut s = sample();
            s.meta.vcpus = n;
            s.vcpus = vec![s.vcpus[0].clone(); n as usize];
            encode(&s)
        };
        let most = with_vcpus(MAX_VCPUS);
        assert_eq!(decode_meta(&most).unwrap().vcpus, MAX_VCPUS);
        assert_eq!(decode(&most).unwrap().vcpus.len(), MAX_VCPUS as usize);
        let over = with_vcpus(MAX_VCPUS + 1);
        let want = || {
            CodecError::Inconsistent(format!(
                "{} vCPUs (a Ferry VM has 1 to {MAX_VCPUS})",
                MAX_VCPUS + 1
            ))
        };
        assert_eq!(decode_meta(&over).err(), Some(want()));
        assert_eq!(decode(&over).err(), Some(want()));
        assert!(decode_meta(&with_vcpus(0)).is_err());
        // What a VM can be built with is what a blob may describe.
        assert!(crate::layout::valid_vcpus(MAX_VCPUS));
        assert!(!crate::layout::valid_vcpus(MAX_VCPUS + 1));
    }

    #[test]
    fn round_trip_is_exact() {
        let blob = encode(&sample());
        let back = decode(&blob).unwrap();
        assert_eq!(encode(&back), blob);
        assert_eq!(back.vcpus[1].regs.rip, 0x1234);
        assert_eq!(back.devices.serial.in_buffer, vec![1, 2, 3]);
        assert!(differing_sections(&blob, &blob).unwrap().is_empty());
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let blob = encode(&sample());
        for len in 0..blob.len() {
            assert!(decode(&blob[..len]).is_err(), "truncated to {len}");
        }
        // Flip one bit in every byte position (a stride keeps the test fast).
        for at in (0..blob.len()).step_by(7) {
            let mut b = blob.clone();
            b[at] ^= 0x10;
            assert!(decode(&b).is_err(), "bit flip at {at}");
        }
    }

    #[test]
    fn version_and_magic_are_named() {
        let mut blob = encode(&sample());
        blob[8] = 9;
        assert_eq!(decode(&blob).err(), Some(CodecError::Version { found: 9 }));
        blob[8] = 0;
        assert_eq!(decode(&blob).err(), Some(CodecError::Version { found: 0 }));
        assert_eq!(
            decode(b"NOTFERRY-and-more-bytes-here----").err(),
            Some(CodecError::BadMagic)
        );
    }

    #[test]
    fn garbage_with_valid_crc_never_panics() {
        // Re-checksum random bodies so the parser, not the CRC, must cope.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let base = encode(&sample());
        for _ in 0..2000 {
            let mut b = base.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = HEADER_LEN + (seed as usize) % (b.len() - HEADER_LEN - 4);
                b[at] = (seed >> 32) as u8;
            }
            let n = b.len();
            let crc = crc32fast::hash(&b[..n - 4]);
            b[n - 4..].copy_from_slice(&crc.to_le_bytes());
            let _ = decode(&b);
        }
    }
}
