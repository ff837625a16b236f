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

use std::collections::BTreeSet;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

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
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Parses and validates a deployment's whole `specification` object (the one holding
/// `spec`; other keys such as `api_version` or `metadata` are ignored).
///
/// Returns every problem found, not only the first.
pub fn parse(specification: &Value) -> Result<DeploymentSpec, Vec<FieldError>> {
    let mut p = Parser { errors: Vec::new() };
    let root = vec!["body".to_owned(), "specification".to_owned()];
    let spec = match specification {
        Value::Object(map) => p.object_at(map, &root, "spec", true),
        _ => {
            p.err(&root, "dict_type", "Input should be a valid dictionary");
            None
        }
    };
    let result = spec.map(|spec| p.spec(spec, &child(&root, "spec")));
    match result {
        Some(parsed) if p.errors.is_empty() => Ok(parsed),
        _ => Err(p.errors),
    }
}

/// Appends `key` to a location path.
fn child(loc: &[String], key: &str) -> Vec<String> {
    let mut out = loc.to_vec();
    out.push(key.to_owned());
    out
}

/// Describes a JSON value's type for messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Collects errors while walking the spec.
struct Parser {
    errors: Vec<FieldError>,
}

impl Parser {
    fn err(&mut self, loc: &[String], kind: &str, msg: impl Into<String>) {
        self.errors.push(FieldError::new(loc.to_vec(), kind, msg));
    }

    /// `map[key]`, treating JSON `null` as absent.
    fn get<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
        map.get(key).filter(|v| !v.is_null())
    }

    /// `map[key]` as an object; an error if it has another type, or is absent and required.
    fn object_at<'a>(
        &mut self,
        map: &'a Map<String, Value>,
        loc: &[String],
        key: &str,
        required: bool,
    ) -> Option<&'a Map<String, Value>> {
        let at = child(loc, key);
        match Self::get(map, key) {
            Some(Value::Object(inner)) => Some(inner),
            Some(other) => {
                let msg = format!(
                    "Input should be a valid dictionary, got {}",
                    type_name(other)
                );
                self.err(&at, "dict_type", msg);
                None
            }
            None => {
                if required {
                    self.err(&at, "missing", "Field required");
                }
                None
            }
        }
    }

    /// An optional string; `allow_empty = false` rejects `""`.
    fn opt_string(
        &mut self,
        map: &Map<String, Value>,
        loc: &[String],
        key: &str,
        allow_empty: bool,
    ) -> Option<String> {
        let at = child(loc, key);
        match Self::get(map, key) {
            None => None,
            Some(Value::String(s)) if s.contains('\0') => {
                self.err(&at, "value_error", "String must not contain NUL bytes");
                None
            }
            Some(Value::String(s)) if s.is_empty() && !allow_empty => {
                self.err(
                    &at,
                    "string_too_short",
                    "String should have at least 1 character",
                );
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                let msg = format!("Input should be a valid string, got {}", type_name(other));
                self.err(&at, "string_type", msg);
                None
            }
        }
    }

    /// An optional integer in `min..=max`; `None` (after reporting) when invalid or absent.
    fn opt_int(
        &mut self,
        map: &Map<String, Value>,
        loc: &[String],
        key: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let v = Self::get(map, key)?;
        self.int_value(v, &child(loc, key), min, max)
    }

    fn int_value(&mut self, v: &Value, at: &[String], min: i64, max: i64) -> Option<i64> {
        let n = match v {
            Value::Number(n) if n.is_i64() => n.as_i64(),
            // Positive integers above i64::MAX: certainly above `max`.
            Value::Number(n) if n.is_u64() => None,
            other => {
                let msg = format!("Input should be a valid integer, got {}", type_name(other));
                self.err(at, "int_type", msg);
                return None;
            }
        };
        match n {
            Some(n) if n < min => {
                self.err(
                    at,
                    "greater_than_equal",
                    format!("Input should be >= {min}"),
                );
                None
            }
            Some(n) if n <= max => Some(n),
            _ => {
                self.err(at, "less_than_equal", format!("Input should be <= {max}"));
                None
            }
        }
    }

    /// An optional number of seconds as a [`Duration`]; `positive` rejects zero.
    fn opt_seconds(
        &mut self,
        map: &Map<String, Value>,
        loc: &[String],
        key: &str,
        positive: bool,
    ) -> Option<Duration> {
        let v = Self::get(map, key)?;
        self.seconds_value(v, &child(loc, key), positive)
    }

    fn seconds_value(&mut self, v: &Value, at: &[String], positive: bool) -> Option<Duration> {
        let Some(secs) = v.as_f64() else {
            let msg = format!("Input should be a valid number, got {}", type_name(v));
            self.err(at, "float_type", msg);
            return None;
        };
        if !secs.is_finite() {
            self.err(at, "finite_number", "Input should be a finite number");
            return None;
        }
        if positive && secs <= 0.0 {
            self.err(at, "greater_than", "Input should be > 0");
            return None;
        }
        if secs < 0.0 {
            self.err(at, "greater_than_equal", "Input should be >= 0");
            return None;
        }
        if secs > MAX_DURATION_SECS {
            let msg = format!("Input should be <= {MAX_DURATION_SECS}");
            self.err(at, "less_than_equal", msg);
            return None;
        }
        match Duration::try_from_secs_f64(secs) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(at, "value_error", format!("Invalid duration: {e}"));
                None
            }
        }
    }

    /// A list of strings (no NUL bytes), or `None` after reporting.
    fn string_list(
        &mut self,
        v: &Value,
        at: &[String],
        allow_empty_items: bool,
    ) -> Option<Vec<String>> {
        let Value::Array(items) = v else {
            let msg = format!(
                "Input should be a valid list of strings, got {}",
                type_name(v)
            );
            self.err(at, "list_type", msg);
            return None;
        };
        if items.is_empty() {
            self.err(at, "too_short", "List should have at least 1 item");
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_at = child(at, &i.to_string());
            match item {
                Value::String(s) if s.contains('\0') => {
                    self.err(&item_at, "value_error", "String must not contain NUL bytes");
                    ok = false;
                }
                Value::String(s) if s.is_empty() && !allow_empty_items => {
                    let msg = "String should have at least 1 character";
                    self.err(&item_at, "string_too_short", msg);
                    ok = false;
                }
                Value::String(s) => out.push(s.clone()),
                other => {
                    let msg = format!("Input should be a valid string, got {}", type_name(other));
                    self.err(&item_at, "string_type", msg);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// Parses `spec` (the object under `specification.spec`).
    fn spec(&mut self, spec: &Map<String, Value>, loc: &[String]) -> DeploymentSpec {
        let mut out = DeploymentSpec::defaults_for(Vec::new());

        // --- config -------------------------------------------------------------------------
        let config = self.object_at(spec, loc, "config", true);
        let config_loc = child(loc, "config");
        if let Some(config) = config {
            let at = child(&config_loc, "command");
            match Self::get(config, "command") {
                None => self.err(&at, "missing", "Field required"),
                Some(v) => {
                    if let Some(cmd) = self.string_list(v, &at, false) {
                        out.command = cmd;
                    }
                }
            }
            out.env_name = self.opt_string(config, &config_loc, "env_name", false);
            out.git = self.git(config, &config_loc);
        }

        // --- capacity_requests --------------------------------------------------------------
        if let Some(caps) = self.object_at(spec, loc, "capacity_requests", false) {
            let caps_loc = child(loc, "capacity_requests");
            for (class, amount) in caps {
                let at = child(&caps_loc, class);
                if class.is_empty() {
                    self.err(&at, "value_error", "Capacity class name must not be empty");
                    continue;
                }
                if let Some(n) = self.int_value(amount, &at, 0, i64::MAX) {
                    out.capacity_requests.insert(class.clone(), n);
                }
            }
        }

        out.node_group = self.opt_string(spec, loc, "node_group", false);

        // --- env: spec.env wins if it is a mapping, else config.env -------------------------
        let spec_env = self.env(spec, loc);
        let config_env = config.and_then(|c| self.env(c, &config_loc));
        out.env = spec_env.or(config_env).unwrap_or_default();

        // --- restart behaviour ----------------------------------------------------------------
        if let Some(policy) = self.restart_policy(spec, loc) {
            out.restart_policy = policy;
        }
        if let Some(n) = self.opt_int(spec, loc, "max_restarts", 0, i64::from(u32::MAX)) {
            out.max_restarts = u32::try_from(n).unwrap_or(u32::MAX);
        }
        if let Some(d) = self.opt_seconds(spec, loc, "restart_window_sec", true) {
            out.restart_window = d;
        }
        let max_lines = i64::try_from(MAX_LOG_LIMIT_LINES).unwrap_or(i64::MAX);
        if let Some(n) = self.opt_int(spec, loc, "log_limit_lines", 1, max_lines) {
            out.log_limit_lines = usize::try_from(n).unwrap_or(MAX_LOG_LIMIT_LINES);
        }
        if let Some(sig) = self.stop_signal(spec, loc) {
            out.stop_signal = sig;
        }
        if let Some(d) = self.opt_seconds(spec, loc, "stop_timeout_sec", false) {
            out.stop_timeout = d;
        }

        out.health_check = self.health_check(spec, loc);
        out.auto_restart = self.auto_restart(spec, loc);
        out
    }

    /// `config.git_repo` / `git_ref` / `token`.
    fn git(&mut self, config: &Map<String, Value>, loc: &[String]) -> Option<GitSource> {
        let repo = self.opt_string(config, loc, "git_repo", false);
        // An empty ref or token (as a form would send) means "not set".
        let git_ref = self
            .opt_string(config, loc, "git_ref", true)
            .filter(|s| !s.is_empty());
        let token = self
            .opt_string(config, loc, "token", true)
            .filter(|s| !s.is_empty());
        let repo_given = Self::get(config, "git_repo").is_some();
        if git_ref.is_some() && !repo_given {
            let msg = "git_ref requires git_repo";
            self.err(&child(loc, "git_ref"), "value_error", msg);
        }
        repo.map(|repo| GitSource {
            repo,
            git_ref,
            token,
        })
    }

    /// `map.env` if it is a mapping: values stringified. `None` when absent or invalid.
    fn env(
        &mut self,
        map: &Map<String, Value>,
        loc: &[String],
    ) -> Option<BTreeMap<String, String>> {
        let env = self.object_at(map, loc, "env", false)?;
        let env_loc = child(loc, "env");
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (key, value) in env {
            let at = child(&env_loc, key);
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                let msg = "Environment variable names must be non-empty, without '=' or NUL";
                self.err(&at, "value_error", msg);
                ok = false;
                continue;
            }
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    let msg = format!(
                        "Environment values should be strings, numbers or booleans, got {}",
                        type_name(other)
                    );
                    self.err(&at, "string_type", msg);
                    ok = false;
                    continue;
                }
            };
            if text.contains('\0') {
                self.err(&at, "value_error", "String must not contain NUL bytes");
                ok = false;
                continue;
            }
            out.insert(key.clone(), text);
        }
        ok.then_some(out)
    }

    /// `restart_policy`: a string or `{type, backoff_seconds}`. `None` = absent or invalid.
    fn restart_policy(
        &mut self,
        spec: &Map<String, Value>,
        loc: &[String],
    ) -> Option<RestartPolicy> {
        let at = child(loc, "restart_policy");
        match Self::get(spec, "restart_policy")? {
            Value::String(s) => {
                let kind = self.restart_kind(s, &at)?;
                Some(RestartPolicy {
                    kind,
                    backoff: DEFAULT_BACKOFF,
                })
            }
            Value::Object(obj) => {
                let type_at = child(&at, "type");
                let kind = match Self::get(obj, "type") {
                    None => Some(RestartKind::OnFailure),
                    Some(Value::String(s)) => self.restart_kind(s, &type_at),
                    Some(other) => {
                        let msg =
                            format!("Input should be a valid string, got {}", type_name(other));
                        self.err(&type_at, "string_type", msg);
                        None
                    }
                };
                let backoff = self.opt_seconds(obj, &at, "backoff_seconds", false);
                Some(RestartPolicy {
                    kind: kind?,
                    backoff: backoff.unwrap_or(DEFAULT_BACKOFF),
                })
            }
            other => {
                let msg = format!(
                    "Input should be a policy name or an object {{type, backoff_seconds}}, got {}",
                    type_name(other)
                );
                self.err(&at, "value_error", msg);
                None
            }
        }
    }

    fn restart_kind(&mut self, s: &str, at: &[String]) -> Option<RestartKind> {
        match s.to_ascii_lowercase().as_str() {
            "never" => Some(RestartKind::Never),
            "on-failure" | "on_failure" => Some(RestartKind::OnFailure),
            "always" => Some(RestartKind::Always),
            _ => {
                let msg = format!("Input should be 'never', 'on-failure' or 'always', got {s:?}");
                self.err(at, "enum", msg);
                None
            }
        }
    }

    /// `stop_signal`: a known name or an integer 1..=64.
    fn stop_signal(&mut self, spec: &Map<String, Value>, loc: &[String]) -> Option<i32> {
        let at = child(loc, "stop_signal");
        match Self::get(spec, "stop_signal")? {
            Value::String(s) => match signal_number(s) {
                Some(n) => Some(n),
                None => {
                    let msg = format!(
                        "Unknown signal {s:?}; expected one of {} or a number 1..=64",
                        SIGNAL_NAMES.join(", ")
                    );
                    self.err(&at, "value_error", msg);
                    None
                }
            },
            v @ Value::Number(_) => self
                .int_value(v, &at, 1, 64)
                .and_then(|n| i32::try_from(n).ok()),
            other => {
                let msg = format!(
                    "Input should be a signal name or number, got {}",
                    type_name(other)
                );
                self.err(&at, "value_error", msg);
                None
            }
        }
    }

    /// `health_check`: `None` when absent or invalid.
    fn health_check(&mut self, spec: &Map<String, Value>, loc: &[String]) -> Option<HealthCheck> {
        let hc = self.object_at(spec, loc, "health_check", false)?;
        let loc = child(loc, "health_check");
        let errors_before = self.errors.len();

        let kind = match Self::get(hc, "type") {
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                k @ ("exec" | "http" | "tcp") => Some(k.to_owned()),
                _ => {
                    let msg = format!("Input should be 'exec', 'http' or 'tcp', got {s:?}");
                    self.err(&child(&loc, "type"), "enum", msg);
                    None
                }
            },
            Some(other) => {
                let msg = format!("Input should be a valid string, got {}", type_name(other));
                self.err(&child(&loc, "type"), "string_type", msg);
                None
            }
            // No type: infer it from the fields given; exec is the default.
            None if Self::get(hc, "url").is_some() && Self::get(hc, "command").is_none() => {
                Some("http".to_owned())
            }
            None if Self::get(hc, "port").is_some() && Self::get(hc, "command").is_none() => {
                Some("tcp".to_owned())
            }
            None => Some("exec".to_owned()),
        };

        let probe = match kind.as_deref() {
            Some("exec") => self.exec_probe(hc, &loc),
            Some("http") => self.http_probe(hc, &loc),
            Some("tcp") => self.tcp_probe(hc, &loc),
            _ => None,
        };

        let initial_delay = self.opt_seconds(hc, &loc, "initial_delay_seconds", false);
        let period = self.opt_seconds(hc, &loc, "period_seconds", true);
        let timeout = self.opt_seconds(hc, &loc, "timeout_seconds", true);
        let threshold = self.opt_int(hc, &loc, "failure_threshold", 1, i64::from(u32::MAX));

        if self.errors.len() != errors_before {
            return None;
        }
        let period = period.unwrap_or(DEFAULT_HEALTH_PERIOD);
        Some(HealthCheck {
            probe: probe?,
            initial_delay: initial_delay.unwrap_or(Duration::ZERO),
            period,
            timeout: timeout.unwrap_or(period),
            failure_threshold: threshold
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(DEFAULT_FAILURE_THRESHOLD),
        })
    }

    fn exec_probe(&mut self, hc: &Map<String, Value>, loc: &[String]) -> Option<HealthProbe> {
        let at = child(loc, "command");
        let command = match Self::get(hc, "command") {
            None => {
                self.err(&at, "missing", "Field required");
                return None;
            }
            Some(Value::String(s)) => match shell_split(s) {
                Ok(words) if words.is_empty() => {
                    self.err(&at, "too_short", "Command should have at least 1 word");
                    return None;
                }
                Ok(words) if words.iter().any(|w| w.contains('\0')) => {
                    self.err(&at, "value_error", "String must not contain NUL bytes");
                    return None;
                }
                Ok(words) => words,
                Err(e) => {
                    self.err(&at, "value_error", format!("Cannot split command: {e}"));
                    return None;
                }
            },
            Some(v) => self.string_list(v, &at, true)?,
        };
        if command.first().is_some_and(String::is_empty) {
            let msg = "String should have at least 1 character";
            self.err(&child(&at, "0"), "string_too_short", msg);
            return None;
        }
        Some(HealthProbe::Exec { command })
    }

    fn http_probe(&mut self, hc: &Map<String, Value>, loc: &[String]) -> Option<HealthProbe> {
        let at = child(loc, "url");
        if Self::get(hc, "url").is_none() {
            self.err(&at, "missing", "Field required");
            return None;
        }
        let url = self.opt_string(hc, loc, "url", false)?;
        let lower = url.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("http://")
            .or_else(|| lower.strip_prefix("https://"));
        match rest {
            Some(rest) if !rest.is_empty() && !url.chars().any(char::is_whitespace) => {
                Some(HealthProbe::Http { url })
            }
            _ => {
                let msg = "URL should start with http:// or https:// and name a host";
                self.err(&at, "url_scheme", msg);
                None
            }
        }
    }

    fn tcp_probe(&mut self, hc: &Map<String, Value>, loc: &[String]) -> Option<HealthProbe> {
        let port_at = child(loc, "port");
        let port = match Self::get(hc, "port") {
            None => {
                self.err(&port_at, "missing", "Field required");
                None
            }
            Some(v) => self
                .int_value(v, &port_at, 1, 65535)
                .and_then(|n| u16::try_from(n).ok()),
        };
        let host = self
            .opt_string(hc, loc, "host", false)
            .unwrap_or_else(|| "127.0.0.1".to_owned());
        Some(HealthProbe::Tcp { host, port: port? })
    }

    /// `auto_restart`: `Some` only when enabled (a real boolean) and valid.
    fn auto_restart(&mut self, spec: &Map<String, Value>, loc: &[String]) -> Option<AutoRestart> {
        let ar = self.object_at(spec, loc, "auto_restart", false)?;
        let loc = child(loc, "auto_restart");
        let enabled = match Self::get(ar, "enabled") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                let msg = format!("Input should be a valid boolean, got {}", type_name(other));
                self.err(&child(&loc, "enabled"), "bool_type", msg);
                false
            }
        };
        if !enabled {
            return None;
        }
        let cron_at = child(&loc, "cron");
        let tz_at = child(&loc, "timezone");
        if Self::get(ar, "cron").is_none() {
            self.err(
                &cron_at,
                "missing",
                "Field required when auto_restart is enabled",
            );
        }
        if Self::get(ar, "timezone").is_none() {
            self.err(
                &tz_at,
                "missing",
                "Field required when auto_restart is enabled",
            );
        }
        let cron = self.opt_string(ar, &loc, "cron", false);
        let timezone = self.opt_string(ar, &loc, "timezone", false);

        let tz = timezone
            .as_deref()
            .and_then(|name| match name.parse::<chrono_tz::Tz>() {
                Ok(tz) => Some(tz),
                Err(_) => {
                    let msg = format!("Unknown IANA time zone {name:?}");
                    self.err(&tz_at, "value_error", msg);
                    None
                }
            });
        let schedule = cron.as_deref().and_then(|expr| match cron_schedule(expr) {
            Ok(s) => Some(s),
            Err(e) => {
                self.err(
                    &cron_at,
                    "value_error",
                    format!("Invalid cron expression: {e}"),
                );
                None
            }
        });
        if let Some(schedule) = &schedule {
            // Pure check (fixed reference instant): an expression that never fires is an error.
            let reference = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single();
            let fires = reference
                .and_then(|r| next_fire(schedule, tz.unwrap_or(chrono_tz::UTC), r))
                .is_some();
            if !fires {
                let msg = "Cron expression never fires (e.g. a day that does not exist)";
                self.err(&cron_at, "value_error", msg);
            }
        }
        match (cron, timezone, schedule, tz) {
            (Some(cron), Some(timezone), Some(_), Some(_)) => Some(AutoRestart { cron, timezone }),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Shell-like splitting (no shell is ever run)
// ---------------------------------------------------------------------------------------------

/// Splits `input` into words with POSIX shell quoting rules: whitespace separates words,
/// `'...'` is literal, `"..."` allows `\"`, `\\`, `\$`, `` \` `` and `\<newline>` escapes, and a
/// backslash outside quotes escapes the next character. No expansion of any kind; `#` is
/// literal. Errors on an unterminated quote or a trailing backslash.
pub fn shell_split(input: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = input.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unterminated single quote".to_owned()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unterminated double quote".to_owned()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("unterminated double quote".to_owned()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => {
                    in_word = true;
                    word.push(c);
                }
                None => return Err("trailing backslash".to_owned()),
            },
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

// ---------------------------------------------------------------------------------------------
// Cron
// ---------------------------------------------------------------------------------------------

/// One field of a standard cron expression.
struct CronField {
    name: &'static str,
    min: u32,
    max: u32,
    /// Upper bound that `*` expands to (differs from `max` for weekdays, where 7 = 0).
    star_max: u32,
    /// Three-letter names, the first one having the value `min` (empty = numbers only).
    names: &'static [&'static str],
}

const SECOND: CronField = CronField {
    name: "second",
    min: 0,
    max: 59,
    star_max: 59,
    names: &[],
};
const MINUTE: CronField = CronField {
    name: "minute",
    min: 0,
    max: 59,
    star_max: 59,
    names: &[],
};
const HOUR: CronField = CronField {
    name: "hour",
    min: 0,
    max: 23,
    star_max: 23,
    names: &[],
};
const DAY_OF_MONTH: CronField = CronField {
    name: "day of month",
    min: 1,
    max: 31,
    star_max: 31,
    names: &[],
};
const MONTH: CronField = CronField {
    name: "month",
    min: 1,
    max: 12,
    star_max: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
};
const DAY_OF_WEEK: CronField = CronField {
    name: "day of week",
    min: 0,
    max: 7,
    star_max: 6,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
};

/// Weekday names in the `cron` crate's order (it numbers SUN=1..SAT=7; we emit names).
const CRATE_WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl CronField {
    fn value(&self, text: &str) -> Result<u32, String> {
        let n = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            text.parse::<u32>()
                .map_err(|_| format!("{}: {text:?} is out of range", self.name))?
        } else {
            let upper = text.to_ascii_uppercase();
            let idx = self
                .names
                .iter()
                .position(|n| *n == upper)
                .ok_or_else(|| format!("{}: {text:?} is not a number", self.name))?;
            self.min + u32::try_from(idx).map_err(|e| e.to_string())?
        };
        if n < self.min || n > self.max {
            return Err(format!(
                "{}: {n} is out of range {}-{}",
                self.name, self.min, self.max
            ));
        }
        Ok(n)
    }

    /// Expands a field (`*`, lists, ranges `a-b`, steps `*/n`, `a-b/n`, `a/n`) to its values.
    fn expand(&self, text: &str) -> Result<BTreeSet<u32>, String> {
        let mut out = BTreeSet::new();
        if text.is_empty() {
            return Err(format!("{}: empty field", self.name));
        }
        for item in text.split(',') {
            let (base, step) = match item.split_once('/') {
                Some((base, step)) => {
                    let step: u32 = step
                        .parse()
                        .map_err(|_| format!("{}: bad step {step:?}", self.name))?;
                    if step == 0 {
                        return Err(format!("{}: step must be at least 1", self.name));
                    }
                    (base, Some(step))
                }
                None => (item, None),
            };
            let (lo, hi) = if base == "*" {
                (self.min, self.star_max)
            } else if let Some((a, b)) = base.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!("{}: range {base:?} is reversed", self.name));
                }
                (a, b)
            } else {
                let a = self.value(base)?;
                // `a/n` means from a to the end of the range.
                (
                    a,
                    if step.is_some() {
                        self.star_max.max(a)
                    } else {
                        a
                    },
                )
            };
            let step = step.unwrap_or(1);
            let mut v = lo;
            while v <= hi {
                out.insert(v);
                v = match v.checked_add(step) {
                    Some(next) => next,
                    None => break,
                };
            }
        }
        Ok(out)
    }

    /// Renders a value set for the `cron` crate (`*` when it covers the whole field).
    fn render(&self, values: &BTreeSet<u32>) -> String {
        let full = (self.min..=self.star_max).all(|v| values.contains(&v));
        if full {
            return "*".to_owned();
        }
        let items: Vec<String> = values.iter().map(u32::to_string).collect();
        items.join(",")
    }
}

/// Converts a standard cron expression into a [`cron::Schedule`].
///
/// Accepted: 5 fields `minute hour day-of-month month day-of-week` (weekday 0-7, 0 and 7 =
/// Sunday; month and weekday also accept three-letter names), or 6 fields with a leading
/// seconds field (same rules otherwise, so weekday numbers keep their standard meaning), or
/// one of `@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@yearly`, `@annually`.
/// Each field supports `*`, lists, ranges and steps; not `?`, `L`, `W` or `#`.
///
/// Restricting both day-of-month and day-of-week is rejected: standard cron fires when
/// *either* matches, which a single `cron::Schedule` (which requires both) cannot express.
pub fn cron_schedule(expr: &str) -> Result<cron::Schedule, String> {
    let expanded = match expr.trim() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        other => other,
    };
    let fields: Vec<&str> = expanded.split_whitespace().collect();
    let (second, rest) = match fields.as_slice() {
        [m, h, dom, mon, dow] => ("0".to_owned(), [*m, *h, *dom, *mon, *dow]),
        [s, m, h, dom, mon, dow] => {
            let seconds = SECOND.expand(s)?;
            (SECOND.render(&seconds), [*m, *h, *dom, *mon, *dow])
        }
        _ => {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), got {}",
                fields.len()
            ));
        }
    };
    let [m, h, dom, mon, dow] = rest;
    let minutes = MINUTE.expand(m)?;
    let hours = HOUR.expand(h)?;
    let days = DAY_OF_MONTH.expand(dom)?;
    let months = MONTH.expand(mon)?;
    let weekdays: BTreeSet<u32> = DAY_OF_WEEK
        .expand(dow)?
        .into_iter()
        .map(|d| d % 7)
        .collect();
    if !dom.starts_with('*') && !dow.starts_with('*') {
        return Err(
            "restricting both day-of-month and day-of-week is not supported; use '*' for one"
                .to_owned(),
        );
    }
    let weekday_text = if (0..7).all(|d| weekdays.contains(&d)) {
        "*".to_owned()
    } else {
        let names: Vec<&str> = weekdays
            .iter()
            .filter_map(|d| CRATE_WEEKDAYS.get(usize::try_from(*d).ok()?).copied())
            .collect();
        names.join(",")
    };
    let translated = format!(
        "{second} {} {} {} {} {weekday_text}",
        MINUTE.render(&minutes),
        HOUR.render(&hours),
        DAY_OF_MONTH.render(&days),
        MONTH.render(&months),
    );
    translated
        .parse::<cron::Schedule>()
        .map_err(|e| format!("{e} (translated to {translated:?})"))
}

/// The first fire time of `schedule` strictly after `after`, evaluated on the wall clock of
/// `tz`. A local time skipped by a DST jump does not fire that day; a repeated one fires at
/// its first occurrence. `None` when it never fires again (bounded work: the `cron` crate
/// stops at the year 2100).
pub fn next_fire(
    schedule: &cron::Schedule,
    tz: chrono_tz::Tz,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    schedule
        .after(&after.with_timezone(&tz))
        .next()
        .map(|t| t.with_timezone(&Utc))
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

fn token_slot(specification: &mut Value) -> Option<&mut Value> {
    specification
        .get_mut("spec")?
        .get_mut("config")?
        .get_mut("token")
}

/// Replaces `spec.config.token` (when present and not null) with [`SECRET_MASK`].
pub fn mask_secrets(specification: &mut Value) {
    if let Some(token) = token_slot(specification).filter(|t| !t.is_null()) {
        *token = Value::String(SECRET_MASK.to_owned());
    }
}

/// For a PATCHed `new` specification that still carries the mask as its token (a client
/// round-tripping a GET), puts back the real token from `old`; if `old` had none, the mask
/// is removed rather than stored as a token.
pub fn restore_secrets(new: &mut Value, old: &Value) {
    let masked = token_slot(new).is_some_and(|t| t.as_str() == Some(SECRET_MASK));
    if !masked {
        return;
    }
    let repo = |v: &Value| {
        v.get("spec")
            .and_then(|s| s.get("config"))
            .and_then(|c| c.get("git_repo"))
            .cloned()
    };
    // The real token goes back only to the repository it was given for: otherwise a PATCH
    // could point `git_repo` elsewhere and have the node send the token there.
    let old_token = old
        .get("spec")
        .and_then(|s| s.get("config"))
        .and_then(|c| c.get("token"))
        .filter(|t| !t.is_null())
        .filter(|_| repo(new) == repo(old))
        .cloned();
    match old_token {
        Some(real) => {
            if let Some(slot) = token_slot(new) {
                *slot = real;
            }
        }
        None => {
            if let Some(config) = new
                .get_mut("spec")
                .and_then(|s| s.get_mut("config"))
                .and_then(Value::as_object_mut)
            {
                config.remove("token");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::{Datelike, Timelike};
    use serde_json::json;

    /// Wraps a `spec` object into a whole `specification`.
    fn wrap(spec: Value) -> Value {
        json!({ "api_version": "v1", "metadata": { "x": 1 }, "spec": spec })
    }

    /// A minimal valid spec with `extra` keys merged in.
    fn with(extra: Value) -> Value {
        let mut spec = json!({ "config": { "command": ["python", "-m", "app"] } });
        for (k, v) in extra.as_object().unwrap() {
            spec.as_object_mut().unwrap().insert(k.clone(), v.clone());
        }
        wrap(spec)
    }

    fn ok(specification: Value) -> DeploymentSpec {
        match parse(&specification) {
            Ok(s) => s,
            Err(e) => panic!("expected Ok for {specification}, got {e:#?}"),
        }
    }

    /// `(loc after "spec" joined by '.', type)` of every error, in order.
    fn errs(specification: Value) -> Vec<(String, String)> {
        match parse(&specification) {
            Ok(s) => panic!("expected errors for {specification}, got {s:#?}"),
            Err(errors) => errors
                .into_iter()
                .map(|e| {
                    assert_eq!(e.loc[..2], ["body", "specification"], "{e:?}");
                    (e.loc[2..].join("."), e.kind)
                })
                .collect(),
        }
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(l, k)| ((*l).to_owned(), (*k).to_owned()))
            .collect()
    }

    #[test]
    fn bad_specs_report_exact_loc_and_type() {
        let cases: Vec<(Value, Vec<(&str, &str)>)> = vec![
            (json!([]), vec![("", "dict_type")]),
            (json!({}), vec![("spec", "missing")]),
            (json!({ "spec": null }), vec![("spec", "missing")]),
            (json!({ "spec": "x" }), vec![("spec", "dict_type")]),
            (wrap(json!({})), vec![("spec.config", "missing")]),
            (
                wrap(json!({ "config": [] })),
                vec![("spec.config", "dict_type")],
            ),
            (
                wrap(json!({ "config": {} })),
                vec![("spec.config.command", "missing")],
            ),
            (
                wrap(json!({ "config": { "command": "python app.py" } })),
                vec![("spec.config.command", "list_type")],
            ),
            (
                wrap(json!({ "config": { "command": [] } })),
                vec![("spec.config.command", "too_short")],
            ),
            (
                wrap(json!({ "config": { "command": ["a", 3, ""] } })),
                vec![
                    ("spec.config.command.1", "string_type"),
                    ("spec.config.command.2", "string_too_short"),
                ],
            ),
            (
                with(json!({ "capacity_requests": { "GPU": 1.5, "CPU": "2", "A": -1, "B": 2 } })),
                // serde_json maps iterate in key order.
                vec![
                    ("spec.capacity_requests.A", "greater_than_equal"),
                    ("spec.capacity_requests.CPU", "int_type"),
                    ("spec.capacity_requests.GPU", "int_type"),
                ],
            ),
            (
                with(json!({ "capacity_requests": [1] })),
                vec![("spec.capacity_requests", "dict_type")],
            ),
            (
                with(json!({ "node_group": "" })),
                vec![("spec.node_group", "string_too_short")],
            ),
            (
                with(json!({ "node_group": 3 })),
                vec![("spec.node_group", "string_type")],
            ),
            (
                with(json!({ "env": { "A": [1], "B": null, "": "x" } })),
                vec![
                    ("spec.env.", "value_error"),
                    ("spec.env.A", "string_type"),
                    ("spec.env.B", "string_type"),
                ],
            ),
            (
                with(json!({ "env": ["A=1"] })),
                vec![("spec.env", "dict_type")],
            ),
            (
                with(json!({ "restart_policy": "alwayz" })),
                vec![("spec.restart_policy", "enum")],
            ),
            (
                with(json!({ "restart_policy": 1 })),
                vec![("spec.restart_policy", "value_error")],
            ),
            (
                with(json!({ "restart_policy": { "type": "sometimes", "backoff_seconds": "1" } })),
                vec![
                    ("spec.restart_policy.type", "enum"),
                    ("spec.restart_policy.backoff_seconds", "float_type"),
                ],
            ),
            (
                with(json!({ "restart_policy": { "backoff_seconds": -1 } })),
                vec![("spec.restart_policy.backoff_seconds", "greater_than_equal")],
            ),
            (
                with(json!({ "restart_policy": { "backoff_seconds": 1e300 } })),
                vec![("spec.restart_policy.backoff_seconds", "less_than_equal")],
            ),
            (
                with(json!({ "max_restarts": -1 })),
                vec![("spec.max_restarts", "greater_than_equal")],
            ),
            (
                with(json!({ "max_restarts": 2.5 })),
                vec![("spec.max_restarts", "int_type")],
            ),
            (
                with(json!({ "max_restarts": "3" })),
                vec![("spec.max_restarts", "int_type")],
            ),
            (
                with(json!({ "max_restarts": 18446744073709551615u64 })),
                vec![("spec.max_restarts", "less_than_equal")],
            ),
            (
                with(json!({ "restart_window_sec": 0 })),
                vec![("spec.restart_window_sec", "greater_than")],
            ),
            (
                with(json!({ "log_limit_lines": 0 })),
                vec![("spec.log_limit_lines", "greater_than_equal")],
            ),
            (
                with(json!({ "log_limit_lines": 1_000_001 })),
                vec![("spec.log_limit_lines", "less_than_equal")],
            ),
            (
                with(json!({ "stop_signal": "SIGFOO" })),
                vec![("spec.stop_signal", "value_error")],
            ),
            (
                with(json!({ "stop_signal": 0 })),
                vec![("spec.stop_signal", "greater_than_equal")],
            ),
            (
                with(json!({ "stop_signal": 65 })),
                vec![("spec.stop_signal", "less_than_equal")],
            ),
            (
                with(json!({ "stop_signal": true })),
                vec![("spec.stop_signal", "value_error")],
            ),
            (
                with(json!({ "stop_timeout_sec": -0.5 })),
                vec![("spec.stop_timeout_sec", "greater_than_equal")],
            ),
            (
                wrap(json!({ "config": { "command": ["x"], "git_ref": "main", "env_name": "" } })),
                vec![
                    ("spec.config.env_name", "string_too_short"),
                    ("spec.config.git_ref", "value_error"),
                ],
            ),
            (
                wrap(json!({ "config": { "command": ["x"], "git_repo": "", "token": 5 } })),
                vec![
                    ("spec.config.git_repo", "string_too_short"),
                    ("spec.config.token", "string_type"),
                ],
            ),
            (
                with(json!({ "health_check": "false" })),
                vec![("spec.health_check", "dict_type")],
            ),
            (
                with(json!({ "health_check": {} })),
                vec![("spec.health_check.command", "missing")],
            ),
            (
                with(json!({ "health_check": { "type": "grpc" } })),
                vec![("spec.health_check.type", "enum")],
            ),
            (
                with(json!({ "health_check": { "command": "curl 'x", "period_seconds": 0 } })),
                vec![
                    ("spec.health_check.command", "value_error"),
                    ("spec.health_check.period_seconds", "greater_than"),
                ],
            ),
            (
                with(json!({ "health_check": { "command": [], "failure_threshold": 0 } })),
                vec![
                    ("spec.health_check.command", "too_short"),
                    ("spec.health_check.failure_threshold", "greater_than_equal"),
                ],
            ),
            (
                with(json!({ "health_check": { "type": "http" } })),
                vec![("spec.health_check.url", "missing")],
            ),
            (
                with(json!({ "health_check": { "type": "HTTP", "url": "ftp://x" } })),
                vec![("spec.health_check.url", "url_scheme")],
            ),
            (
                with(json!({ "health_check": { "url": "http://" } })),
                vec![("spec.health_check.url", "url_scheme")],
            ),
            (
                with(json!({ "health_check": { "type": "tcp", "host": "" } })),
                vec![
                    ("spec.health_check.port", "missing"),
                    ("spec.health_check.host", "string_too_short"),
                ],
            ),
            (
                with(json!({ "health_check": { "type": "tcp", "port": 70000 } })),
                vec![("spec.health_check.port", "less_than_equal")],
            ),
            (
                with(
                    json!({ "auto_restart": { "enabled": "true", "cron": "* * * * *", "timezone": "UTC" } }),
                ),
                vec![("spec.auto_restart.enabled", "bool_type")],
            ),
            (
                with(json!({ "auto_restart": { "enabled": true } })),
                vec![
                    ("spec.auto_restart.cron", "missing"),
                    ("spec.auto_restart.timezone", "missing"),
                ],
            ),
            (
                with(
                    json!({ "auto_restart": { "enabled": true, "cron": "61 * * * *", "timezone": "Mars/Olympus" } }),
                ),
                vec![
                    ("spec.auto_restart.timezone", "value_error"),
                    ("spec.auto_restart.cron", "value_error"),
                ],
            ),
            (
                with(
                    json!({ "auto_restart": { "enabled": true, "cron": "0 0 31 2 *", "timezone": "UTC" } }),
                ),
                vec![("spec.auto_restart.cron", "value_error")],
            ),
            (
                with(json!({ "auto_restart": { "enabled": true, "cron": "", "timezone": "UTC" } })),
                vec![("spec.auto_restart.cron", "string_too_short")],
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(errs(input.clone()), pairs(&expected), "input: {input}");
        }
    }

    #[test]
    fn all_errors_are_collected_not_just_the_first() {
        let input = wrap(json!({
            "config": { "command": "x", "env_name": 1 },
            "max_restarts": "many",
            "stop_signal": "NOPE",
            "auto_restart": { "enabled": "yes" }
        }));
        assert_eq!(
            errs(input),
            pairs(&[
                ("spec.config.command", "list_type"),
                ("spec.config.env_name", "string_type"),
                ("spec.max_restarts", "int_type"),
                ("spec.stop_signal", "value_error"),
                ("spec.auto_restart.enabled", "bool_type"),
            ])
        );
    }

    #[test]
    fn error_loc_is_a_full_fastapi_path() {
        let err = parse(&wrap(json!({ "config": { "command": "x" } }))).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(
            err[0].loc,
            ["body", "specification", "spec", "config", "command"]
        );
        assert_eq!(err[0].kind, "list_type");
        let json = serde_json::to_value(&err[0]).unwrap();
        assert_eq!(json["type"], "list_type");
        assert!(json["msg"].as_str().unwrap().contains("list"));
    }

    #[test]
    fn minimal_spec_takes_every_default() {
        let spec = ok(with(json!({})));
        assert_eq!(
            spec,
            DeploymentSpec::defaults_for(vec!["python".into(), "-m".into(), "app".into()])
        );
        assert!(spec.capacity_requests.is_empty());
        assert_eq!(spec.restart_policy.kind, RestartKind::OnFailure);
        assert_eq!(spec.restart_policy.backoff, Duration::from_millis(500));
        assert_eq!(spec.max_restarts, 10);
        assert_eq!(spec.restart_window, Duration::from_secs(300));
        assert_eq!(spec.log_limit_lines, 5000);
        assert_eq!(spec.stop_signal, 15);
        assert_eq!(spec.stop_timeout, Duration::from_secs(10));
        assert_eq!(spec.health_check, None);
        assert_eq!(spec.auto_restart, None);
        assert_eq!(spec.git, None);
        assert_eq!(spec.env_name, None);
        assert_eq!(spec.node_group, None);
    }

    #[test]
    fn nulls_mean_absent_and_unknown_keys_are_ignored() {
        let spec = ok(with(json!({
            "node_group": null, "max_restarts": null, "health_check": null,
            "auto_restart": null, "frobnicate": [1, 2]
        })));
        assert_eq!(spec.max_restarts, 10);
        assert_eq!(spec.node_group, None);
    }

    #[test]
    fn full_spec_is_parsed() {
        let spec = ok(wrap(json!({
            "capacity_requests": { "GPU": 2, "CPU": 0 },
            "node_group": "gpu-box",
            "config": {
                "command": ["python", "train.py"],
                "env_name": "torch",
                "git_repo": "https://example.com/r.git",
                "git_ref": "v1.2",
                "token": "s3cret"
            },
            "restart_policy": { "type": "Always", "backoff_seconds": 2 },
            "max_restarts": 0,
            "restart_window_sec": 60.5,
            "log_limit_lines": 1_000_000,
            "stop_signal": "int",
            "stop_timeout_sec": 0
        })));
        assert_eq!(
            spec.capacity_requests,
            BTreeMap::from([("CPU".into(), 0), ("GPU".into(), 2)])
        );
        assert_eq!(spec.node_group.as_deref(), Some("gpu-box"));
        assert_eq!(spec.command, ["python", "train.py"]);
        assert_eq!(spec.env_name.as_deref(), Some("torch"));
        assert_eq!(
            spec.git,
            Some(GitSource {
                repo: "https://example.com/r.git".into(),
                git_ref: Some("v1.2".into()),
                token: Some("s3cret".into()),
            })
        );
        assert_eq!(
            spec.restart_policy,
            RestartPolicy {
                kind: RestartKind::Always,
                backoff: Duration::from_secs(2)
            }
        );
        assert_eq!(spec.max_restarts, 0);
        assert_eq!(spec.restart_window, Duration::from_millis(60_500));
        assert_eq!(spec.log_limit_lines, 1_000_000);
        assert_eq!(spec.stop_signal, 2);
        assert_eq!(spec.stop_timeout, Duration::ZERO);
    }

    #[test]
    fn empty_git_ref_and_token_mean_unset_and_token_alone_is_ignored() {
        let spec = ok(wrap(json!({ "config": {
            "command": ["x"], "git_repo": "/srv/repo", "git_ref": "", "token": ""
        } })));
        assert_eq!(
            spec.git,
            Some(GitSource {
                repo: "/srv/repo".into(),
                git_ref: None,
                token: None
            })
        );
        let spec = ok(wrap(
            json!({ "config": { "command": ["x"], "token": "t" } }),
        ));
        assert_eq!(spec.git, None);
    }

    #[test]
    fn env_precedence_and_stringification() {
        // spec.env wins over config.env when it is a mapping (no merge).
        let spec = ok(wrap(json!({
            "env": { "A": "spec", "N": 3, "F": 1.5, "B": true },
            "config": { "command": ["x"], "env": { "A": "config", "C": "c" } }
        })));
        assert_eq!(
            spec.env,
            BTreeMap::from([
                ("A".into(), "spec".into()),
                ("B".into(), "true".into()),
                ("F".into(), "1.5".into()),
                ("N".into(), "3".into()),
            ])
        );
        // config.env is used when spec.env is absent (or null).
        let spec = ok(wrap(json!({
            "env": null,
            "config": { "command": ["x"], "env": { "A": "config", "B": false } }
        })));
        assert_eq!(
            spec.env,
            BTreeMap::from([("A".into(), "config".into()), ("B".into(), "false".into())])
        );
        // A bad config.env is still reported even when spec.env wins.
        let input = wrap(json!({
            "env": { "A": "1" },
            "config": { "command": ["x"], "env": { "K=V": "x" } }
        }));
        assert_eq!(
            errs(input),
            pairs(&[("spec.config.env.K=V", "value_error")])
        );
    }

    #[test]
    fn restart_policy_forms() {
        let cases = [
            (json!("never"), RestartKind::Never, 500),
            (json!("NEVER"), RestartKind::Never, 500),
            (json!("on-failure"), RestartKind::OnFailure, 500),
            (json!("On_Failure"), RestartKind::OnFailure, 500),
            (json!("always"), RestartKind::Always, 500),
            (
                json!({ "type": "never", "backoff_seconds": 0 }),
                RestartKind::Never,
                0,
            ),
            (
                json!({ "type": "always", "backoff_seconds": 0.25 }),
                RestartKind::Always,
                250,
            ),
            (
                json!({ "backoff_seconds": 3 }),
                RestartKind::OnFailure,
                3000,
            ),
            (json!({ "type": "always" }), RestartKind::Always, 500),
            (json!({}), RestartKind::OnFailure, 500),
        ];
        for (policy, kind, backoff_ms) in cases {
            let spec = ok(with(json!({ "restart_policy": policy.clone() })));
            assert_eq!(
                spec.restart_policy,
                RestartPolicy {
                    kind,
                    backoff: Duration::from_millis(backoff_ms)
                },
                "policy {policy}"
            );
        }
    }

    #[test]
    fn stop_signals_by_name_and_number() {
        let cases = [
            (json!("SIGTERM"), 15),
            (json!("term"), 15),
            (json!("SIGINT"), 2),
            (json!("INT"), 2),
            (json!("sigkill"), 9),
            (json!("SIGHUP"), 1),
            (json!("QUIT"), 3),
            (json!("SIGUSR1"), nix::sys::signal::Signal::SIGUSR1 as i32),
            (json!("usr2"), nix::sys::signal::Signal::SIGUSR2 as i32),
            (json!(1), 1),
            (json!(64), 64),
        ];
        for (signal, number) in cases {
            assert_eq!(
                ok(with(json!({ "stop_signal": signal.clone() }))).stop_signal,
                number,
                "{signal}"
            );
        }
        assert_eq!(
            errs(with(json!({ "stop_signal": 9.0 }))),
            pairs(&[("spec.stop_signal", "int_type")])
        );
        assert_eq!(
            errs(with(json!({ "stop_signal": "SIGSEGV" }))),
            pairs(&[("spec.stop_signal", "value_error")])
        );
    }

    #[test]
    fn health_check_defaults_apply_to_missing_fields() {
        // Bug B13: missing initial_delay_seconds / period_seconds must take defaults.
        let spec = ok(with(json!({ "health_check": { "command": ["true"] } })));
        assert_eq!(
            spec.health_check,
            Some(HealthCheck {
                probe: HealthProbe::Exec {
                    command: vec!["true".into()]
                },
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(10),
                failure_threshold: 3,
            })
        );
        // timeout defaults to the period.
        let spec = ok(with(json!({ "health_check": {
            "command": ["true"], "period_seconds": 2.5, "initial_delay_seconds": 1
        } })));
        let hc = spec.health_check.unwrap();
        assert_eq!(hc.period, Duration::from_millis(2500));
        assert_eq!(hc.timeout, Duration::from_millis(2500));
        assert_eq!(hc.initial_delay, Duration::from_secs(1));
        let spec = ok(with(json!({ "health_check": {
            "command": ["true"], "timeout_seconds": 1, "failure_threshold": 1
        } })));
        let hc = spec.health_check.unwrap();
        assert_eq!(
            (hc.period, hc.timeout, hc.failure_threshold),
            (Duration::from_secs(10), Duration::from_secs(1), 1)
        );
    }

    #[test]
    fn health_check_types() {
        let probe = |hc: Value| {
            ok(with(json!({ "health_check": hc })))
                .health_check
                .unwrap()
                .probe
        };
        assert_eq!(
            probe(json!({ "type": "exec", "command": "sh -c 'test -f \"/tmp/a b\"' \\#x" })),
            HealthProbe::Exec {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "test -f \"/tmp/a b\"".into(),
                    "#x".into()
                ]
            }
        );
        assert_eq!(
            probe(json!({ "type": "http", "url": "https://localhost:8080/healthz" })),
            HealthProbe::Http {
                url: "https://localhost:8080/healthz".into()
            }
        );
        assert_eq!(
            probe(json!({ "url": "HTTP://127.0.0.1/" })),
            HealthProbe::Http {
                url: "HTTP://127.0.0.1/".into()
            }
        );
        assert_eq!(
            probe(json!({ "type": "tcp", "port": 5432 })),
            HealthProbe::Tcp {
                host: "127.0.0.1".into(),
                port: 5432
            }
        );
        assert_eq!(
            probe(json!({ "type": "Tcp", "port": 1, "host": "db.local" })),
            HealthProbe::Tcp {
                host: "db.local".into(),
                port: 1
            }
        );
        assert_eq!(
            probe(json!({ "port": 22 })),
            HealthProbe::Tcp {
                host: "127.0.0.1".into(),
                port: 22
            }
        );
    }

    #[test]
    fn shell_split_follows_posix_quoting() {
        assert_eq!(shell_split("  a  b\tc\n").unwrap(), ["a", "b", "c"]);
        assert_eq!(shell_split("a'b c'd").unwrap(), ["ab cd"]);
        assert_eq!(
            shell_split(r#""a \"q\" \\ \$x \n""#).unwrap(),
            [r#"a "q" \ $x \n"#]
        );
        assert_eq!(shell_split(r"a\ b \'c").unwrap(), ["a b", "'c"]);
        assert_eq!(shell_split("'' \"\"").unwrap(), ["", ""]);
        assert_eq!(
            shell_split("echo $HOME; rm -rf /").unwrap(),
            ["echo", "$HOME;", "rm", "-rf", "/"]
        );
        assert_eq!(shell_split("").unwrap(), Vec::<String>::new());
        assert!(shell_split("'open").is_err());
        assert!(shell_split("\"open").is_err());
        assert!(shell_split("end\\").is_err());
    }

    #[test]
    fn auto_restart_enabled_disabled_and_valid() {
        let spec = ok(with(json!({ "auto_restart": {
            "enabled": true, "cron": "0 9 * * 1-5", "timezone": "Europe/Paris"
        } })));
        assert_eq!(
            spec.auto_restart,
            Some(AutoRestart {
                cron: "0 9 * * 1-5".into(),
                timezone: "Europe/Paris".into()
            })
        );
        // Disabled (or enabled absent): None, and the rest is not required.
        for ar in [
            json!({ "enabled": false, "cron": "garbage" }),
            json!({ "cron": "* * * * *", "timezone": "UTC" }),
        ] {
            assert_eq!(ok(with(json!({ "auto_restart": ar }))).auto_restart, None);
        }
        // Bug B29: a string "true" is an error, not silently ignored.
        assert_eq!(
            errs(with(json!({ "auto_restart": { "enabled": "true" } }))),
            pairs(&[("spec.auto_restart.enabled", "bool_type")])
        );
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single().unwrap()
    }

    fn upcoming(
        expr: &str,
        tz: chrono_tz::Tz,
        from: DateTime<Utc>,
        n: usize,
    ) -> Vec<DateTime<Utc>> {
        let schedule = cron_schedule(expr).unwrap();
        let mut out = Vec::new();
        let mut t = from;
        for _ in 0..n {
            t = next_fire(&schedule, tz, t).unwrap();
            out.push(t);
        }
        out
    }

    #[test]
    fn cron_weekday_zero_and_seven_are_sunday() {
        // 2024-06-02 is a Sunday.
        let from = utc(2024, 5, 29, 12, 0, 0);
        let sunday = utc(2024, 6, 2, 0, 0, 0);
        for expr in ["0 0 * * 0", "0 0 * * 7", "0 0 * * SUN", "0 0 * * sun"] {
            assert_eq!(upcoming(expr, chrono_tz::UTC, from, 1), [sunday], "{expr}");
        }
        // 1 = Monday (the cron crate alone would read 1 as Sunday).
        assert_eq!(
            upcoming("0 0 * * 1", chrono_tz::UTC, from, 1),
            [utc(2024, 6, 3, 0, 0, 0)]
        );
        // Friday to Sunday via 5-7 wraps 7 onto Sunday.
        let days: Vec<u32> = upcoming("0 0 * * 5-7", chrono_tz::UTC, from, 4)
            .iter()
            .map(|t| t.day())
            .collect();
        assert_eq!(days, [31, 1, 2, 7]);
        // Weekday steps: */2 = Sun, Tue, Thu, Sat.
        let days: Vec<u32> = upcoming("0 0 * * */2", chrono_tz::UTC, from, 4)
            .iter()
            .map(|t| t.day())
            .collect();
        assert_eq!(days, [30, 1, 2, 4]);
    }

    #[test]
    fn cron_every_fifteen_minutes() {
        let got = upcoming(
            "*/15 * * * *",
            chrono_tz::UTC,
            utc(2024, 1, 1, 10, 7, 30),
            5,
        );
        assert_eq!(
            got,
            [
                utc(2024, 1, 1, 10, 15, 0),
                utc(2024, 1, 1, 10, 30, 0),
                utc(2024, 1, 1, 10, 45, 0),
                utc(2024, 1, 1, 11, 0, 0),
                utc(2024, 1, 1, 11, 15, 0),
            ]
        );
        // Strictly after: from exactly a fire time, the next one.
        assert_eq!(
            upcoming(
                "*/15 * * * *",
                chrono_tz::UTC,
                utc(2024, 1, 1, 10, 15, 0),
                1
            ),
            [utc(2024, 1, 1, 10, 30, 0)]
        );
    }

    #[test]
    fn cron_lists_ranges_steps_and_names() {
        let got = upcoming(
            "5,10-12 3-4/1 1 jan-feb *",
            chrono_tz::UTC,
            utc(2024, 1, 1, 0, 0, 0),
            9,
        );
        let hm: Vec<(u32, u32, u32)> = got
            .iter()
            .map(|t| (t.month(), t.hour(), t.minute()))
            .collect();
        assert_eq!(
            hm,
            [
                (1, 3, 5),
                (1, 3, 10),
                (1, 3, 11),
                (1, 3, 12),
                (1, 4, 5),
                (1, 4, 10),
                (1, 4, 11),
                (1, 4, 12),
                (2, 3, 5)
            ]
        );
        // a/n runs to the end of the range.
        let got = upcoming("50/5 0 * * *", chrono_tz::UTC, utc(2024, 1, 1, 0, 0, 0), 3);
        assert_eq!(
            got,
            [
                utc(2024, 1, 1, 0, 50, 0),
                utc(2024, 1, 1, 0, 55, 0),
                utc(2024, 1, 2, 0, 50, 0)
            ]
        );
        assert_eq!(
            upcoming("@daily", chrono_tz::UTC, utc(2024, 1, 1, 5, 0, 0), 1),
            [utc(2024, 1, 2, 0, 0, 0)]
        );
    }

    #[test]
    fn cron_six_fields_have_seconds() {
        let got = upcoming(
            "*/20 * * * * *",
            chrono_tz::UTC,
            utc(2024, 1, 1, 0, 0, 5),
            3,
        );
        assert_eq!(
            got,
            [
                utc(2024, 1, 1, 0, 0, 20),
                utc(2024, 1, 1, 0, 0, 40),
                utc(2024, 1, 1, 0, 1, 0)
            ]
        );
        // Weekday numbering stays standard in the 6-field form too (0 = Sunday).
        assert_eq!(
            upcoming("0 0 0 * * 0", chrono_tz::UTC, utc(2024, 5, 29, 0, 0, 0), 1),
            [utc(2024, 6, 2, 0, 0, 0)]
        );
    }

    #[test]
    fn cron_rejects_bad_expressions() {
        for expr in [
            "",
            "* * * *",
            "* * * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * 32 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "5-1 * * * *",
            "? * * * *",
            "L * * * *",
            "* * * * 1#2",
            "a * * * *",
            "1,,2 * * * *",
            "@reboot",
            "* * 1 * 1",
            "99999999999 * * * *",
        ] {
            assert!(cron_schedule(expr).is_err(), "{expr:?} should be rejected");
        }
    }

    #[test]
    fn next_fire_is_timezone_aware() {
        let paris: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
        // Winter: CET = UTC+1.
        assert_eq!(
            upcoming("0 9 * * *", paris, utc(2024, 1, 15, 0, 0, 0), 1),
            [utc(2024, 1, 15, 8, 0, 0)]
        );
        // Summer: CEST = UTC+2; after today's 07:00Z, tomorrow's.
        assert_eq!(
            upcoming("0 9 * * *", paris, utc(2024, 7, 15, 7, 0, 0), 1),
            [utc(2024, 7, 16, 7, 0, 0)]
        );
        // Across the spring-forward night, 09:00 local stays 09:00 local.
        assert_eq!(
            upcoming("0 9 * * *", paris, utc(2024, 3, 30, 12, 0, 0), 2),
            [utc(2024, 3, 31, 7, 0, 0), utc(2024, 4, 1, 7, 0, 0)]
        );
        // 02:30 does not exist in Paris on 2024-03-31: skipped that day.
        assert_eq!(
            upcoming("30 2 * * *", paris, utc(2024, 3, 30, 12, 0, 0), 1),
            [utc(2024, 4, 1, 0, 30, 0)]
        );
        // 02:30 happens twice on 2024-10-27: the first occurrence (CEST, 00:30Z) comes first.
        assert_eq!(
            upcoming("30 2 * * *", paris, utc(2024, 10, 26, 12, 0, 0), 1),
            [utc(2024, 10, 27, 0, 30, 0)]
        );
    }

    #[test]
    fn impossible_expression_returns_none_quickly() {
        let schedule = cron_schedule("0 0 31 2 *").unwrap();
        let paris: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
        assert_eq!(next_fire(&schedule, paris, utc(2024, 1, 1, 0, 0, 0)), None);
        assert_eq!(
            next_fire(&schedule, chrono_tz::UTC, utc(1999, 1, 1, 0, 0, 0)),
            None
        );
        // Possible but rare: Feb 29.
        assert_eq!(
            upcoming("0 0 29 2 *", chrono_tz::UTC, utc(2024, 3, 1, 0, 0, 0), 1),
            [utc(2028, 2, 29, 0, 0, 0)]
        );
    }

    #[test]
    fn mask_and_restore_secrets() {
        let original =
            wrap(json!({ "config": { "command": ["x"], "git_repo": "r", "token": "s3cret" } }));
        let mut shown = original.clone();
        mask_secrets(&mut shown);
        assert_eq!(shown["spec"]["config"]["token"], SECRET_MASK);
        assert_eq!(shown["spec"]["config"]["git_repo"], "r");

        // Round-trip: the PATCH carries the mask, the real token comes back.
        let mut patched = shown.clone();
        patched["spec"]["config"]["command"] = json!(["y"]);
        restore_secrets(&mut patched, &original);
        assert_eq!(patched["spec"]["config"]["token"], "s3cret");
        assert_eq!(patched["spec"]["config"]["command"], json!(["y"]));

        // A new token replaces the old one.
        let mut patched = shown.clone();
        patched["spec"]["config"]["token"] = json!("new");
        restore_secrets(&mut patched, &original);
        assert_eq!(patched["spec"]["config"]["token"], "new");

        // Removing the token removes it.
        let mut patched = shown.clone();
        patched["spec"]["config"]
            .as_object_mut()
            .unwrap()
            .remove("token");
        restore_secrets(&mut patched, &original);
        assert!(patched["spec"]["config"].get("token").is_none());

        // A mask with no old token to restore is dropped, never stored as the token.
        let mut patched = shown;
        restore_secrets(
            &mut patched,
            &wrap(json!({ "config": { "command": ["x"] } })),
        );
        assert!(patched["spec"]["config"].get("token").is_none());

        // Nothing to mask: unchanged (null token, no config, not an object).
        for v in [
            wrap(json!({ "config": { "command": ["x"], "token": null } })),
            wrap(json!({})),
            json!({}),
            json!("x"),
        ] {
            let mut m = v.clone();
            mask_secrets(&mut m);
            assert_eq!(m, v);
            restore_secrets(&mut m, &original);
            assert_eq!(m, v);
        }
    }

    #[test]
    fn parse_never_panics_on_odd_json() {
        for v in [
            json!(null),
            json!(1),
            json!({ "spec": { "config": { "command": [null] } } }),
            json!({ "spec": { "config": null, "capacity_requests": { "": 1 } } }),
            json!({ "spec": { "config": { "command": ["a\u{0}b"] }, "env": { "A": "\u{0}" } } }),
            json!({ "spec": { "config": { "command": ["x"] }, "health_check": { "command": [1], "type": 3 } } }),
        ] {
            assert!(parse(&v).is_err(), "{v}");
        }
    }
}

#[cfg(test)]
mod secret_redirect_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_masked_token_is_not_restored_for_another_repository() {
        let old = json!({"spec": {"config": {"command": ["x"], "git_repo": "https://good.example/r.git", "token": "REAL"}}});
        let mut same = json!({"spec": {"config": {"command": ["y"], "git_repo": "https://good.example/r.git", "token": SECRET_MASK}}});
        restore_secrets(&mut same, &old);
        assert_eq!(same["spec"]["config"]["token"], "REAL");
        let mut moved = json!({"spec": {"config": {"command": ["y"], "git_repo": "https://evil.example/x.git", "token": SECRET_MASK}}});
        restore_secrets(&mut moved, &old);
        assert!(moved["spec"]["config"].get("token").is_none(), "{moved}");
    }
}
