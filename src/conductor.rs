//! The conductor: durable state, the core actor, node sessions and the HTTP API.

pub mod store;
