//! `ferry-bench`: the downtime/latency benchmark harness. It runs Ferry's
//! `ferry-source` and `ferry-dest` (and, where installed, QEMU with the same
//! guest) over a matrix of modes and guests, and writes `results.json`,
//! `results.md` and SVG plots.
//!
//! | module | concern |
//! |---|---|
//! | [`cli`] | the command line, checked into a [`cli::Config`] |
//! | [`matrix`] | modes, points, runs |
//! | [`runner`] | the run loop, progress bar, output files |
//! | [`ferry`] | one Ferry migration (two processes) |
//! | [`qemu`] / [`qmp`] | one QEMU migration, driven over QMP |
//! | [`netns`] | loopback or two namespaces joined by a veth pair |
//! | [`procs`] | child processes, timeouts, listening sockets |
//! | [`serial`] | stamped serial logs: ticks, rounds/s, guest stall |
//! | [`record`] | `results.json` records |
//! | [`restore`] | `--restore`: lazy restore plain, recording and replayed |
//! | [`summary`] | median and min–max |
//! | [`markdown`] | `results.md` |
//! | [`goals`] | `results.md`'s post-copy goals: Ferry vs QEMU vs the wire |
//! | [`wire`] | the wire's bulk TCP rate, measured in the same run |
//! | [`tls_cost`] | `results.md`'s TLS cost: TLS ÷ plain push rate, fault p50 delta |
//! | [`plots`] | the benchmark's SVG plots (drawn with `plotters`) |

pub mod cli;
pub mod ferry;
pub mod goals;
pub mod host;
pub mod hugepool;
pub mod markdown;
pub mod matrix;
pub use crate::netns;
pub mod plots;
pub mod procs;
pub mod qemu;
pub mod qmp;
pub mod record;
pub mod restore;
pub mod runner;
pub mod serial;
pub mod summary;
pub mod tls_cost;
pub mod wire;
