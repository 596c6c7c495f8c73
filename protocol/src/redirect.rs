//! `Redirect`: a `ferry-dest --daemon` answers a new session's control
//! `Hello` with the port of the process it started for that VM, on the
//! same host. The source reconnects both connections there and does the
//! handshake again; it follows at most one redirect.

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::ProtocolError;

/// Bytes of a `Redirect` payload.
pub const REDIRECT_LEN: usize = 16;

/// A `Redirect` as it lies on the wire (16 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRedirect {
    session_id: U64,
    port: U16,
    reserved: [u8; 6],
}

/// Where to take a session: `port` on the host the source dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    /// The session of the `Hello` this answers.
    pub session_id: u64,
    /// The port of the VM's own process (never 0).
    pub port: u16,
}

impl Redirect {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        RawRedirect {
            session_id: U64::new(self.session_id),
            port: U16::new(self.port),
            reserved: [0; 6],
        }
        .as_bytes()
        .to_vec()
    }

    /// Decodes a payload: 16 bytes, reserved bytes zero, port not 0.
    pub fn decode(p: &[u8]) -> Result<Self, ProtocolError> {
        let raw = RawRedirect::ref_from_bytes(p)
            .map_err(|_| ProtocolError::Handshake(format!("Redirect of {} bytes", p.len())))?;
        if raw.reserved != [0; 6] {
            return Err(ProtocolError::Handshake(
                "Redirect with non-zero reserved bytes".into(),
            ));
        }
        let port = raw.port.get();
        if port == 0 {
            return Err(ProtocolError::Handshake("Redirect to port 0".into()));
        }
        Ok(Self {
            session_id: raw.session_id.get(),
            port,
        })
    }
}

const _: () = assert!(std::mem::size_of::<RawRedirect>() == REDIRECT_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let r = Redirect {
            session_id: 0x1234_5678_9abc_def0,
            port: 40123,
        };
        assert_eq!(Redirect::decode(&r.encode()).unwrap(), r);
        let mut zero = r.encode();
        zero[8..10].copy_from_slice(&[0, 0]);
        assert!(Redirect::decode(&zero)
            .unwrap_err()
            .to_string()
            .contains("port 0"));
        let mut reserved = r.encode();
        reserved[15] = 1;
        assert!(Redirect::decode(&reserved).is_err());
        assert!(Redirect::decode(&r.encode()[..15]).is_err());
    }
}
