//! Ferry's engine: a small KVM VMM, complete VM state capture and restore,
//! snapshots, and the migration drivers (post-copy, stop-and-copy, pre-copy,
//! hybrid).
//!
//! See `docs/architecture.md` for how the pieces fit.

pub mod api;
pub mod boot;
pub mod console;
pub mod controller;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod os;
pub mod ram_pages;
pub mod sched;
pub mod seccomp;
pub mod snapshot;
pub mod snapshot_replay;
pub mod snapshot_source;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use vm::{ConsoleOutput, PreparedVm, Vm, VmError};
