//! The deployment specification: the typed form of the original's `specification.spec`
//! JSON object, with its defaults, and validation that names the offending field.
//!
//! One typed path: serde deserializes the JSON into the `wire` structs, whose every field is
//! [`Checked`] (one field of the wrong type does not hide the others); one validation pass
//! (`validate`) turns that into a [`DeploymentSpec`], checking what serde cannot say (ranges,
//! empty strings, cross-field rules, cron, time zones). The pattern (`checked`: `Checked`,
//! `Object`, `Int`, `Seconds`, `Report`, `Loc`) is shared by every declaration that follows.
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
//!   The original's loose forms stay accepted: a restart policy as a name or an object, a
//!   probe command as one string (split with POSIX quoting by `shlex`) or a list, env values
//!   as strings, numbers or booleans.
//! - Missing optional fields take their documented defaults (bug B13); an unknown restart
//!   policy or stop signal is an error, never a silent fallback.
//! - Cron expressions use the standard syntax (weekday 0 and 7 = Sunday; day-of-month OR
//!   day-of-week when both are restricted) on top of the `cron` crate; computing the next fire
//!   time is bounded work (the crate never looks past the year 2100), so an impossible
//!   expression yields `None`.
//! - `config.token` is a secret: [`mask_secrets`] hides it in API output and
//!   [`restore_secrets`] keeps a round-tripped mask from overwriting the real value; a type
//!   error never quotes a value. [`token_slot`] and [`declaration_token_slots`] find it for
//!   sealing at rest ([`crate::seal`]).

mod checked;
mod cron;
mod experiment;
mod model;
mod secrets;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
mod validate;
mod wire;
mod workflow;

pub use checked::{
    Checked, Int, LineOrList, Loc, Mismatch, Object, Opt, Report, Seconds, given, unexpected,
};
pub use cron::{CronSchedule, cron_schedule, next_fire};
pub use experiment::{
    Experiment, MAX_PROCESSES, MAX_REPLICAS, OnFailure, Placement, Process, add_env,
    parse_experiment, with_user,
};
pub use model::{
    AutoRestart, Bind, DEFAULT_BACKOFF, DEFAULT_FAILURE_THRESHOLD, DEFAULT_HEALTH_PERIOD,
    DEFAULT_LOG_LIMIT_LINES, DEFAULT_MAX_RESTARTS, DEFAULT_NAMESPACE, DEFAULT_RESTART_WINDOW,
    DEFAULT_STOP_TIMEOUT, DeploymentSpec, FieldError, GitSource, HealthCheck, HealthProbe,
    MAX_DURATION_SECS, MAX_LOG_LIMIT_LINES, RestartKind, RestartPolicy, SECRET_MASK, SERVICE_HOST,
    SIGNAL_NAMES, Services, is_dns_label, service_var_prefix, signal_number,
};
pub use secrets::{
    declaration_token_slots, mask_declaration, mask_secrets, restore_secrets, token_slot,
};
pub use validate::{parse, parse_owned, parse_with_services};
pub use workflow::{
    DEFAULT_KEEP_RUNS, MAX_ATTEMPTS, MAX_RESULT_BYTES, MAX_TASKS, Retries, RetryOn, Task, Workflow,
    parse_workflow,
};
