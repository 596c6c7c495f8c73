//! Ferry's source-side page server ([`server`]): it answers demand faults
//! and pushes every other page of a [`PageSource`], over TCP or a socketpair
//! ([`Stream`]). The wire format it speaks is the `ferry-protocol` crate's.

pub mod pacer;
pub mod server;
pub mod source;
pub mod spare;

pub use server::{serve, serve_rest, LatencyUs, Resume, ServerConfig, ServerError, ServerStats};
pub use source::{FileSource, PageSource};
