//! The JSON-carrying messages around the switch-over: `State` (metadata and
//! the VM state blob) and `Resumed`.
//!
//! `State` payload: `meta_len u32 LE | meta JSON (`[`StateMeta`]`) | state blob`.
//! The blob is the engine's versioned, checksummed machine state; this crate
//! only carries it.

use serde::{Deserialize, Serialize};

use crate::{from_json, MigrationMode, ProtocolError};

/// One pre-copy round, as the source saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// 0 is the full first pass.
    pub round: u32,
    /// Pages sent in this round (data and zero).
    pub pages: u64,
    /// Bytes written in this round.
    pub bytes: u64,
    /// Wall time of the round, ms.
    pub ms: f64,
    /// Pages the guest dirtied while the round was sent.
    pub dirty_after: u64,
    /// Estimated stop-and-copy time of those pages at this round's rate, ms.
    pub est_downtime_ms: f64,
}

/// Context the source sends with the VM state. It is about the migration
/// only; nothing in it depends on what the guest runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateMeta {
    /// How the memory moves.
    pub mode: MigrationMode,
    /// Host wall clock when the migration began (connect), µs since the epoch.
    pub start_host_us: u64,
    /// Pre-copy rounds (empty for post-copy; stop-and-copy's single pass
    /// is round 0).
    #[serde(default)]
    pub rounds: Vec<RoundStats>,
    /// Whether pre-copy met its downtime target (None: not pre-copy).
    #[serde(default)]
    pub converged: Option<bool>,
    /// Host wall clock once the source's vCPUs had all stopped, µs since
    /// the epoch (the time spent stopping them is `pause_us`).
    pub pause_host_us: u64,
    /// Time the source took to pause the vCPUs, µs.
    pub pause_us: u64,
    /// Time the source took to capture the state, µs.
    pub save_us: u64,
}

/// The destination's answer once its vCPUs run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resumed {
    /// Source pause until destination vCPUs run, µs.
    pub downtime_us: u64,
    /// Host wall clock at resume, µs since the epoch.
    pub resume_host_us: u64,
}

/// Builds a `State` payload.
pub fn encode_state(meta: &StateMeta, blob: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(meta).unwrap_or_default();
    let mut p = Vec::with_capacity(4 + json.len() + blob.len());
    p.extend_from_slice(&(json.len() as u32).to_le_bytes());
    p.extend_from_slice(&json);
    p.extend_from_slice(blob);
    p
}

/// Splits a `State` payload into its metadata and state blob.
pub fn decode_state(p: &[u8]) -> Result<(StateMeta, &[u8]), ProtocolError> {
    let bad = |why: String| ProtocolError::BadJson { what: "State", why };
    let (len, rest) = p
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("payload shorter than 4 bytes".into()))?;
    let len = u32::from_le_bytes(*len) as usize;
    let (json, blob) = rest
        .split_at_checked(len)
        .ok_or_else(|| bad(format!("metadata length {len} exceeds the payload")))?;
    Ok((from_json("State metadata", json)?, blob))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_payload_round_trip_and_refusals() {
        let meta = StateMeta {
            mode: MigrationMode::Precopy,
            start_host_us: 1,
            rounds: vec![RoundStats {
                round: 0,
                pages: 9,
                ..Default::default()
            }],
            converged: Some(false),
            pause_host_us: 5,
            pause_us: 0,
            save_us: 0,
        };
        let p = encode_state(&meta, b"blob");
        let (m, b) = decode_state(&p).unwrap();
        assert_eq!((&m, b), (&meta, &b"blob"[..]));
        assert!(decode_state(&p[..3]).is_err());
        let mut lie = p.clone();
        lie[0] = 0xff;
        assert!(decode_state(&lie).is_err());
        let mut garbage = p;
        garbage[5] = b'!';
        assert!(decode_state(&garbage).is_err());
    }
}
