//! `ferry-benches` measures ferry against the physical limits of the machine it runs on. The
//! `ferry-bench` binary measures each transport backend beside its raw limit (raw TCP round trip
//! and stream, memcpy, raw io_uring reads) in one process and one run, and prints the ratios; the
//! criterion benches under `benches/` time the same operations for regression tracking. This
//! library holds what both share: fixtures that build a filled source and a connected destination
//! for every backend, and the raw-limit measurements.

pub mod fixtures;
pub mod plot;
pub mod raw;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod restore;
pub mod stats;
