//! The handshake: `Hello`, `HelloAck`, connection roles and the migration
//! mode option.

use super::{ProtocolError, HELLO_FIXED, HELLO_MAGIC, PROTOCOL_VERSION};

/// Hello option (critical): the migration mode, one byte ([`MigrationMode`]).
pub const OPT_MODE: u16 = 0x8001;

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

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(HELLO_FIXED);
        p.extend_from_slice(&HELLO_MAGIC);
        p.extend_from_slice(&self.version.to_le_bytes());
        p.extend_from_slice(&[self.role as u8, 0, 0, 0]);
        p.extend_from_slice(&self.session_id.to_le_bytes());
        p.extend_from_slice(&self.features.to_le_bytes());
        p.extend_from_slice(&self.mem_size.to_le_bytes());
        p.extend_from_slice(&self.vcpus.to_le_bytes());
        p.extend_from_slice(&self.page_size.to_le_bytes());
        for (tag, value) in &self.options {
            p.extend_from_slice(&tag.to_le_bytes());
            p.extend_from_slice(&(value.len() as u16).to_le_bytes());
            p.extend_from_slice(value);
        }
        p
    }

    /// Decodes a payload, refusing other magics and versions.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |s: String| ProtocolError::Handshake(s);
        if p.len() < HELLO_FIXED || p[0..8] != HELLO_MAGIC {
            return Err(bad("not a Ferry migration peer (bad Hello magic)".into()));
        }
        let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&p[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != PROTOCOL_VERSION {
            return Err(bad(format!(
                "peer speaks protocol version {version}, this build speaks {PROTOCOL_VERSION}"
            )));
        }
        let role = match p[12] {
            0 => Role::Control,
            1 => Role::Fault,
            r => return Err(bad(format!("unknown connection role {r}"))),
        };
        let mut options = Vec::new();
        let mut at = HELLO_FIXED;
        while at < p.len() {
            let hdr = p
                .get(at..at + 4)
                .ok_or_else(|| bad("truncated Hello option".into()))?;
            let tag = u16::from_le_bytes([hdr[0], hdr[1]]);
            let len = u16::from_le_bytes([hdr[2], hdr[3]]) as usize;
            let value = p
                .get(at + 4..at + 4 + len)
                .ok_or_else(|| bad("truncated Hello option".into()))?;
            options.push((tag, value.to_vec()));
            at += 4 + len;
        }
        Ok(Self {
            version,
            role,
            session_id: u64_at(16),
            features: u64_at(24),
            mem_size: u64_at(32),
            vcpus: u32_at(40),
            page_size: u32_at(44),
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
}

impl HelloAck {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(24);
        p.extend_from_slice(&self.version.to_le_bytes());
        p.extend_from_slice(&self.status.to_le_bytes());
        p.extend_from_slice(&self.features.to_le_bytes());
        p.extend_from_slice(&self.session_id.to_le_bytes());
        p
    }

    /// Decodes a payload.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        if p.len() != 24 {
            return Err(ProtocolError::Handshake(format!(
                "HelloAck of {} bytes",
                p.len()
            )));
        }
        let mut a8 = [0u8; 8];
        a8.copy_from_slice(&p[8..16]);
        let features = u64::from_le_bytes(a8);
        a8.copy_from_slice(&p[16..24]);
        Ok(Self {
            version: u32::from_le_bytes([p[0], p[1], p[2], p[3]]),
            status: u32::from_le_bytes([p[4], p[5], p[6], p[7]]),
            features,
            session_id: u64::from_le_bytes(a8),
        })
    }
}
