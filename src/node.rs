//! The node agent: supervises deployments on this machine.

pub mod agent;
mod convert;
pub mod core;
pub mod envs;
pub mod health;
pub mod join;
pub mod keeper;
pub mod logs;
pub mod monitor;
pub mod peers;
pub mod renew;
pub mod restart;
pub mod runner;
pub mod state;
pub mod supervisor;
pub mod tunnels;
pub mod workdirs;
pub mod workspace;
