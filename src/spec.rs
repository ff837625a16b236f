//! The deployment specification: the typed form of the original's `specification.spec`
//! JSON object, with its defaults, and validation that names the offending field.
//!
//! The conductor validates on POST/PATCH (a 422 names the field); the node parses again
//! before running, so a bad spec that somehow reaches it fails that one deployment with a
//! reason instead of breaking the connection. Pure: no IO, no clock.
//!
//! Invariants:
//! - [`parse`] never panics on any JSON input and reports *every* problem it finds, each with
//!   a `loc` path starting `["body", "specification", "spec", ...]`.
//! - Types are strict: a numeric string is not a number, a string `"true"` is not a boolean,
//!   a float is not an integer (the original's bugs B8 and B29). Unknown keys are ignored.
//! - Missing optional fields take their documented defaults (bug B13); an unknown restart
//!   policy or stop signal is an error, never a silent fallback.
//! - Cron expressions use the standard 5-field syntax (weekday 0 and 7 = Sunday) and are
//!   translated into the `cron` crate's 6-field form; computing the next fire time is bounded
//!   work (the crate never looks past the year 2100), so an impossible expression yields `None`.
//! - `config.token` is a secret: [`mask_secrets`] hides it in API output and
//!   [`restore_secrets`] keeps a round-tripped mask from overwriting the real value.

mod cron;
mod model;
mod parse;
mod secrets;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

pub use cron::{cron_schedule, next_fire};
pub use model::{
    AutoRestart, DEFAULT_BACKOFF, DEFAULT_FAILURE_THRESHOLD, DEFAULT_HEALTH_PERIOD,
    DEFAULT_LOG_LIMIT_LINES, DEFAULT_MAX_RESTARTS, DEFAULT_RESTART_WINDOW, DEFAULT_STOP_TIMEOUT,
    DeploymentSpec, FieldError, GitSource, HealthCheck, HealthProbe, MAX_DURATION_SECS,
    MAX_LOG_LIMIT_LINES, RestartKind, RestartPolicy, SECRET_MASK, SIGNAL_NAMES, signal_number,
};
pub use parse::{parse, shell_split};
pub use secrets::{mask_secrets, restore_secrets};
