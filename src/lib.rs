//! Symphony: a lightweight orchestrator for machines you do not own.
//!
//! See ARCHITECTURE.md for the codemap. The `symphony-net` crate holds the transport.

pub mod spec;
pub mod scheduler;
pub mod wire;
