//! Symphony: a lightweight orchestrator for machines you do not own.
//!
//! See ARCHITECTURE.md for the codemap. The `symphony-net` crate holds the transport.

pub mod cli;
pub mod client;
pub mod conductor;
pub mod config;
pub mod model;
pub mod node;
pub mod scheduler;
pub mod seal;
pub mod spec;
pub mod time;
pub mod wire;

/// The allocator of every binary built with this crate (the node, the conductor, the tests
/// and the benchmarks alike). glibc's malloc was about 9 % of a busy node's samples, most of
/// it consolidating and unlinking chunks across the runtime's threads (`benches/dag.rs`,
/// BENCHMARKS 13). Built without transparent huge pages: with them it zeroed a fresh 2 MiB
/// page after each purge of a small one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
