//! Live migration in all four modes: the source's sessions, rounds and
//! switch-over, the destination's receive, install and fault handling, and
//! the statistics. The wire format is the `ferry-protocol` crate's (see
//! `docs/protocol.md`).

pub mod acceptor;
pub mod admission;
pub mod cancel;
pub mod committed;
pub mod dest;
pub mod dial;
mod disk_space;
pub mod error;
pub mod fault;
pub mod fault_around;
pub mod fault_buffers;
pub mod install;
pub mod link;
pub mod options;
pub mod precopy;
pub mod preload;
pub mod progress;
pub mod ram_ahead;
pub mod record;
pub mod rounds;
pub mod session;
pub mod source;
pub mod stats;
pub mod uffd_ram;

pub use dest::{receive, receive_from, DestOptions, Received};
pub use dial::Dial;
pub use error::{DestError, SourceError};
pub use options::SourceOptions;
pub use source::{finish_after_crash, migrate, migrate_machine, migrate_postcopy, Outcome};
pub use stats::MigrationStats;
