//! Ferry's migration wire protocol ([`protocol`]) and the source-side page
//! server ([`server`]) that answers demand faults and pushes every other page.

pub mod protocol;
pub mod server;
pub mod source;

pub use server::{serve, serve_rest, LatencyUs, ServerConfig, ServerError, ServerStats};
pub use source::{FileSource, PageSource};
