//! Integration tests: the conductor's API end to end against a real listener, a real SQLite
//! file and real node agents (in-process, over QUIC on loopback), and the `symphony` binary
//! started as processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod adopt;
mod api;
mod browser;
mod chaos;
mod cli;
mod cluster;
mod events;
mod experiments;
mod faults;
mod gpus;
mod node;
mod prometheus;
mod rl_example;
mod schemathesis;
mod services;
mod sockets;
mod support;
mod trust;
mod ui;
mod workflows;
