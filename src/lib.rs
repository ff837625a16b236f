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
