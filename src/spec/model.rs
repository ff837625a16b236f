//! The typed spec and its defaults (everything under `specification.spec`), plus the
//! stop-signal names it accepts.

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
    /// `spec.outlive_agent` (default true): the process runs under a keeper and outlives the
    /// agent (a crash, an upgrade): the next agent adopts it. `false`: the agent runs it as its
    /// own child, one `exec` less per start; an agent that ends takes it along, and the next
    /// one ends whatever is left of it and counts an exit with no code (a workflow task's
    /// failed attempt). Workflow tasks default to `false`.
    pub outlive_agent: bool,
}

/// The namespace of deployments outside an experiment (an experiment's services live in a
/// namespace named after it).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The host every process reaches a service at (`SYMPH_<NAME>_HOST`).
pub const SERVICE_HOST: &str = "127.0.0.1";

/// The mesh part of a spec (`binds`, `connects`, `exposes`). Kept out of [`DeploymentSpec`]:
/// the conductor acts on it (ports, variables); a node only sees the variables it yields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Services {
    /// Services this deployment serves, in the order given; names are unique.
    pub binds: Vec<Bind>,
    /// Services it needs: each must be bound by some deployment of its namespace.
    pub connects: Vec<String>,
    /// Services it serves that are reachable from outside: each is one of `binds`.
    pub exposes: Vec<String>,
}

/// One `binds` entry: a service name (a DNS label) and the port asked for, if fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub name: String,
    /// `{"tensorboard": 6006}`; `None` = the conductor picks one.
    pub port: Option<u16>,
}

/// What [`mask_secrets`] puts in place of a secret.
pub const SECRET_MASK: &str = "********";

/// Default initial restart backoff.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(500);
/// Default `max_restarts`.
pub const DEFAULT_MAX_RESTARTS: u32 = 10;
/// Default `restart_window_sec`.
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(300);
/// Default `log_limit_lines`.
pub const DEFAULT_LOG_LIMIT_LINES: usize = 5000;
/// Largest accepted `log_limit_lines`.
pub const MAX_LOG_LIMIT_LINES: usize = 1_000_000;
/// Default `stop_timeout_sec`.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default health-check period.
pub const DEFAULT_HEALTH_PERIOD: Duration = Duration::from_secs(10);
/// Default health-check failure threshold.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Largest duration accepted for any `*_sec`/`*_seconds` field (about 31 years), so that
/// later `Instant + Duration` arithmetic can never overflow.
pub const MAX_DURATION_SECS: f64 = 1e9;

impl FieldError {
    /// Builds an error at `loc`.
    pub fn new(loc: Vec<String>, kind: &str, msg: impl Into<String>) -> Self {
        Self {
            loc,
            msg: msg.into(),
            kind: kind.to_owned(),
        }
    }
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            kind: RestartKind::OnFailure,
            backoff: DEFAULT_BACKOFF,
        }
    }
}

impl DeploymentSpec {
    /// A spec running `command` with every other field at its default.
    pub fn defaults_for(command: Vec<String>) -> Self {
        Self {
            capacity_requests: BTreeMap::new(),
            node_group: None,
            command,
            env: BTreeMap::new(),
            env_name: None,
            git: None,
            restart_policy: RestartPolicy::default(),
            max_restarts: DEFAULT_MAX_RESTARTS,
            restart_window: DEFAULT_RESTART_WINDOW,
            log_limit_lines: DEFAULT_LOG_LIMIT_LINES,
            stop_signal: signal_number("SIGTERM").unwrap_or(15),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            health_check: None,
            auto_restart: None,
            outlive_agent: true,
        }
    }
}

/// Stop-signal names accepted by [`parse`] (also without the `SIG` prefix, any case).
pub const SIGNAL_NAMES: &[&str] = &[
    "SIGTERM", "SIGINT", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
];

/// The number of an accepted signal name (`"SIGTERM"`, `"term"`, ...), or `None`.
pub fn signal_number(name: &str) -> Option<i32> {
    use nix::sys::signal::Signal;
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let sig = match bare {
        "TERM" => Signal::SIGTERM,
        "INT" => Signal::SIGINT,
        "KILL" => Signal::SIGKILL,
        "HUP" => Signal::SIGHUP,
        "QUIT" => Signal::SIGQUIT,
        "USR1" => Signal::SIGUSR1,
        "USR2" => Signal::SIGUSR2,
        _ => return None,
    };
    Some(sig as i32)
}

/// Whether `name` is a DNS label as service names must be: 1-63 characters of `a-z`, `0-9` and
/// `-`, starting and ending with a letter or digit (the seed's rule).
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.first().is_some_and(inner)
        && b.last().is_some_and(inner)
        && b.iter().all(|c| inner(c) || *c == b'-')
}

/// The `SYMPH_<N>` prefix of a service's variables: the name upper-cased, `-` -> `_`.
pub fn service_var_prefix(name: &str) -> String {
    format!("SYMPH_{}", name.to_ascii_uppercase().replace('-', "_"))
}
