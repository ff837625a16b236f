//! Symphony: a lightweight orchestrator for machines you do not own.
//!
//! See ARCHITECTURE.md for the codemap. The `symphony-net` crate holds the transport.

pub mod conductor;
pub mod node;
pub mod scheduler;
pub mod spec;
pub mod wire;
