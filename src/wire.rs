//! Generated protobuf types for the node <-> conductor protocol (`proto/symphony/v1`).
//! Conversions to domain types happen at the edges (node agent, conductor sessions).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/symphony.v1.rs"));
