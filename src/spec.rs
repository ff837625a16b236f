//! The deployment specification: the typed form of the original's `specification.spec`
//! JSON object, with its defaults, and validation that names the offending field.
//!
//! The conductor validates on POST/PATCH (a 422 names the field); the node parses again
//! before running, so a bad spec that somehow reaches it fails that one deployment with a
//! reason instead of breaking the connection. Pure: no IO, no clock.

use std::collections::BTreeMap;
use std::time::Duration;

/// One validation problem, in the shape of FastAPI's 422 `detail` items.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Path to the field, e.g. `["body", "specification", "spec", "config", "command"]`.
    pub loc: Vec<String>,
    /// Human-readable message.
    pub msg: String,
    /// Machine-readable kind, e.g. `missing`, `list_type`, `int_type`, `value_error`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// Restart policy kinds (`never | on-failure | always`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RestartKind {
    /// Never restart.
    Never,
    /// Restart only on a non-zero exit (or death by signal).
    OnFailure,
    /// Restart on any exit while desired is RUNNING.
    Always,
}

/// Restart policy: kind plus the initial backoff of the exponential backoff.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RestartPolicy {
    pub kind: RestartKind,
    /// Initial backoff delay (default 0.5 s); doubles per consecutive restart, capped.
    pub backoff: Duration,
}

/// Where the code comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GitSource {
    pub repo: String,
    /// Branch, tag or commit SHA; `None` = the remote's default branch.
    pub git_ref: Option<String>,
    /// HTTPS token; never logged, never returned by the API.
    pub token: Option<String>,
}

/// What a health check probes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HealthProbe {
    /// Run a command; exit 0 = healthy.
    Exec { command: Vec<String> },
    /// HTTP GET; 2xx/3xx = healthy.
    Http { url: String },
    /// TCP connect succeeds = healthy.
    Tcp { host: String, port: u16 },
}

/// `spec.health_check`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    /// Default 0 s.
    pub initial_delay: Duration,
    /// Default 10 s.
    pub period: Duration,
    /// Default = period.
    pub timeout: Duration,
    /// Consecutive failures before a restart; default 3.
    pub failure_threshold: u32,
}

/// `spec.auto_restart` when enabled.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AutoRestart {
    /// A 5-field cron expression as the user wrote it.
    pub cron: String,
    /// IANA time zone name (validated with chrono-tz).
    pub timezone: String,
}

/// The typed deployment spec (everything under `specification.spec`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeploymentSpec {
    /// Capacity class -> amount (non-negative integers).
    pub capacity_requests: BTreeMap<String, i64>,
    /// Only nodes having this group are eligible.
    pub node_group: Option<String>,
    /// `config.command`: a non-empty list of strings; no shell.
    pub command: Vec<String>,
    /// `spec.env` (wins if a mapping) or `config.env`; values stringified.
    pub env: BTreeMap<String, String>,
    /// `config.env_name`: conda/uv env to run in.
    pub env_name: Option<String>,
    /// `config.git_repo` / `git_ref` / `token`.
    pub git: Option<GitSource>,
    pub restart_policy: RestartPolicy,
    /// Default 10.
    pub max_restarts: u32,
    /// Default 300 s.
    pub restart_window: Duration,
    /// Default 5000.
    pub log_limit_lines: usize,
    /// Signal number; default SIGTERM (15). Names like "SIGINT"/"INT" accepted.
    pub stop_signal: i32,
    /// Default 10 s.
    pub stop_timeout: Duration,
    pub health_check: Option<HealthCheck>,
    pub auto_restart: Option<AutoRestart>,
}
