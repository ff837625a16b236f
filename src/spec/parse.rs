//! The parser: walks a `specification` JSON object into a [`DeploymentSpec`], collecting
//! every problem as a [`FieldError`] with its field path; and the shell-like splitting of
//! a string command.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use serde_json::{Map, Value};

use super::cron::{cron_schedule, next_fire};
use super::model::*;

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
