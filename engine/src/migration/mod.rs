//! Live migration: post-copy over userfaultfd, with its wire messages,
//! destination fault handling and statistics. The wire format itself is in
//! `ferry_page_server::protocol` (see `docs/protocol.md`).

pub mod bitmap;
pub mod dest;
pub mod fault;
pub mod install;
pub mod precopy;
pub mod progress;
pub mod rounds;
pub mod source;
pub mod stats;
pub mod uffd_ram;
pub mod wire;

pub use dest::{receive, DestError};
pub use source::{migrate, migrate_postcopy, Outcome, SourceError, SourceOptions};
pub use stats::MigrationStats;
