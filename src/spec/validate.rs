//! The one validation pass: the typed [`wire`](super::wire) form of a `specification` into a
//! [`DeploymentSpec`], with every problem reported at its path. What serde cannot say (ranges,
//! empty strings, the health-check type inferred from its fields, cross-field rules, cron
//! expressions and time zones) is checked here.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use serde_json::Value;

use super::checked::{Checked, Int, LineOrList, Loc, Object, Opt, Report};
use super::cron::{cron_schedule, next_fire};
use super::model::*;
use super::wire::*;

/// Parses and validates a deployment's whole `specification` object (the one holding
/// `spec`; other keys such as `api_version` or `metadata` are ignored).
///
/// Returns every problem found, not only the first.
pub fn parse(specification: &Value) -> Result<DeploymentSpec, Vec<FieldError>> {
    parse_with_services(specification).map(|(spec, _)| spec)
}

/// [`parse`], plus the mesh part of the spec (checked in the same pass).
pub fn parse_with_services(
    specification: &Value,
) -> Result<(DeploymentSpec, Services), Vec<FieldError>> {
    parse_owned(specification.clone())
}

/// [`parse_with_services`] of a `specification` the caller no longer needs (not copied).
pub fn parse_owned(specification: Value) -> Result<(DeploymentSpec, Services), Vec<FieldError>> {
    let root = Loc::new(&["body", "specification"]);
    let mut r = Report::default();
    let parsed = Checked::<Object<Specification>>::from_value(specification);
    let spec = r
        .checked(&parsed, &root)
        .and_then(|Object(s)| r.required(&s.spec, &root.at("spec")))
        .map(|Object(spec)| {
            let loc = root.at("spec");
            (spec_of(&mut r, spec, &loc), services_of(&mut r, spec, &loc))
        });
    r.finish(spec)
}

/// `binds`, `connects`, `exposes`: DNS-label names, a bound name once, fixed ports 1-65535,
/// exposed names among the bound ones.
fn services_of(r: &mut Report, spec: &SpecWire, loc: &Loc) -> Services {
    let mut out = Services::default();
    let name = |r: &mut Report, n: &str, at: &Loc| {
        let ok = is_dns_label(n);
        if !ok {
            let msg = format!(
                "{n:?} is not a valid service name: use 1-63 of a-z, 0-9 and '-', \
                 starting and ending with a letter or digit"
            );
            r.err(at, "value_error", msg);
        }
        ok
    };
    let at = loc.at("binds");
    for (i, bind) in r.opt(&spec.binds, &at).into_iter().flatten().enumerate() {
        let at = at.at(i);
        let bind = match r.checked(bind, &at) {
            Some(BindWire::Name(n)) => name(r, n, &at).then(|| Bind {
                name: n.clone(),
                port: None,
            }),
            Some(BindWire::Fixed(map)) => match map.iter().next() {
                Some((n, port)) if map.len() == 1 => {
                    let pat = at.at(n);
                    let port = r
                        .checked(port, &pat)
                        // Unprivileged ports only: a service is a workload's, never
                        // the node's own (sshd and the like).
                        .and_then(|p| r.int_in(*p, &pat, 1024, 65535))
                        .and_then(|p| u16::try_from(p).ok());
                    match (name(r, n, &at), port) {
                        (true, Some(port)) => Some(Bind {
                            name: n.clone(),
                            port: Some(port),
                        }),
                        _ => None,
                    }
                }
                _ => {
                    r.err(&at, "value_error", "Input should be one {name: port} pair");
                    None
                }
            },
            None => None,
        };
        if let Some(bind) = bind {
            if out.binds.iter().any(|b| b.name == bind.name) {
                let msg = format!("service {:?} is bound twice", bind.name);
                r.err(&at, "value_error", msg);
            } else {
                out.binds.push(bind);
            }
        }
    }
    let names = |r: &mut Report, field: &Opt<Vec<Checked<String>>>, key: &str, bound: &[Bind]| {
        let at = loc.at(key);
        let mut list: Vec<String> = Vec::new();
        for (i, n) in r.opt(field, &at).into_iter().flatten().enumerate() {
            let at = at.at(i);
            let Some(n) = r.checked(n, &at) else { continue };
            if !name(r, n, &at) || list.contains(n) {
                continue;
            }
            if key == "exposes" && !bound.iter().any(|b| &b.name == n) {
                let msg = format!("service {n:?} is exposed but not bound here; add it to binds");
                r.err(&at, "value_error", msg);
                continue;
            }
            list.push(n.clone());
        }
        list
    };
    out.connects = names(r, &spec.connects, "connects", &out.binds);
    out.exposes = names(r, &spec.exposes, "exposes", &out.binds);
    out
}

/// `spec`: each field with its default when absent.
fn spec_of(r: &mut Report, spec: &SpecWire, loc: &Loc) -> DeploymentSpec {
    let mut out = DeploymentSpec::defaults_for(Vec::new());

    let config_loc = loc.at("config");
    let config = r.required(&spec.config, &config_loc).map(|Object(c)| c);
    if let Some(config) = config {
        let at = config_loc.at("command");
        if let Some(words) = r.required(&config.command, &at)
            && let Some(cmd) = words_of(r, words, &at, false)
        {
            out.command = cmd;
        }
        out.env_name = r.opt_text(&config.env_name, &config_loc.at("env_name"));
        out.git = git_of(r, config, &config_loc);
    }

    let caps_loc = loc.at("capacity_requests");
    for (class, amount) in r
        .opt(&spec.capacity_requests, &caps_loc)
        .into_iter()
        .flatten()
    {
        let at = caps_loc.at(class);
        if class.is_empty() {
            r.err(&at, "value_error", "Capacity class name must not be empty");
            continue;
        }
        if let Some(n) = r
            .checked(amount, &at)
            .and_then(|n| r.int_in(*n, &at, 0, i64::MAX))
        {
            out.capacity_requests.insert(class.clone(), n);
        }
    }

    out.node_group = r.opt_text(&spec.node_group, &loc.at("node_group"));

    // spec.env wins if it is a mapping, else config.env (both are checked).
    let spec_env = env_of(r, &spec.env, &loc.at("env"));
    let config_env = config.and_then(|c| env_of(r, &c.env, &config_loc.at("env")));
    out.env = spec_env.or(config_env).unwrap_or_default();

    if let Some(policy) = policy_of(r, &spec.restart_policy, &loc.at("restart_policy")) {
        out.restart_policy = policy;
    }
    let max = i64::from(u32::MAX);
    if let Some(n) = r.opt_int(&spec.max_restarts, &loc.at("max_restarts"), 0, max) {
        out.max_restarts = u32::try_from(n).unwrap_or(u32::MAX);
    }
    let at = loc.at("restart_window_sec");
    if let Some(d) = r.opt_seconds(&spec.restart_window_sec, &at, true) {
        out.restart_window = d;
    }
    let max_lines = i64::try_from(MAX_LOG_LIMIT_LINES).unwrap_or(i64::MAX);
    let at = loc.at("log_limit_lines");
    if let Some(n) = r.opt_int(&spec.log_limit_lines, &at, 1, max_lines) {
        out.log_limit_lines = usize::try_from(n).unwrap_or(MAX_LOG_LIMIT_LINES);
    }
    if let Some(sig) = signal_of(r, &spec.stop_signal, &loc.at("stop_signal")) {
        out.stop_signal = sig;
    }
    let at = loc.at("stop_timeout_sec");
    if let Some(d) = r.opt_seconds(&spec.stop_timeout_sec, &at, false) {
        out.stop_timeout = d;
    }

    let at = loc.at("health_check");
    out.health_check = r
        .opt(&spec.health_check, &at)
        .and_then(|Object(hc)| health_check_of(r, hc, &at));
    let at = loc.at("auto_restart");
    out.auto_restart = r
        .opt(&spec.auto_restart, &at)
        .and_then(|Object(ar)| auto_restart_of(r, ar, &at));
    if let Some(&keep) = r.opt(&spec.outlive_agent, &loc.at("outlive_agent")) {
        out.outlive_agent = keep;
    }
    out
}

/// A list of strings: at least one item, no NUL bytes, and no empty item unless
/// `allow_empty_items`.
fn words_of(
    r: &mut Report,
    words: &[Checked<String>],
    loc: &Loc,
    allow_empty_items: bool,
) -> Option<Vec<String>> {
    if words.is_empty() {
        r.err(loc, "too_short", "List should have at least 1 item");
        return None;
    }
    let before = r.len();
    let out: Vec<String> = words
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            let at = loc.at(i);
            r.checked(w, &at)
                .and_then(|s| r.text(s, &at, allow_empty_items))
        })
        .collect();
    (r.len() == before).then_some(out)
}

/// `config.git_repo` / `git_ref` / `token`. An empty ref or token (as a form would send)
/// means "not set"; a ref without a repository is an error; a token alone is ignored.
fn git_of(r: &mut Report, config: &ConfigWire, loc: &Loc) -> Option<GitSource> {
    let repo = r.opt_text(&config.git_repo, &loc.at("git_repo"));
    let mut optional = |field: &Opt<String>, key: &str| {
        let at = loc.at(key);
        let s = r.opt(field, &at)?;
        r.text(s, &at, true).filter(|s| !s.is_empty())
    };
    let git_ref = optional(&config.git_ref, "git_ref");
    let token = optional(&config.token, "token");
    if git_ref.is_some() && config.git_repo.is_none() {
        r.err(
            &loc.at("git_ref"),
            "value_error",
            "git_ref requires git_repo",
        );
    }
    repo.map(|repo| GitSource {
        repo,
        git_ref,
        token,
    })
}

/// An environment mapping; `None` when absent or invalid.
fn env_of(r: &mut Report, env: &Opt<EnvWire>, loc: &Loc) -> Option<BTreeMap<String, String>> {
    let env = r.opt(env, loc)?;
    let before = r.len();
    let mut out = BTreeMap::new();
    for (key, value) in env {
        let at = loc.at(key);
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            let msg = "Environment variable names must be non-empty, without '=' or NUL";
            r.err(&at, "value_error", msg);
            continue;
        }
        if let Some(text) = r.checked(value, &at).and_then(|v| r.text(&v.0, &at, true)) {
            out.insert(key.clone(), text);
        }
    }
    (r.len() == before).then_some(out)
}

/// `restart_policy`: `None` when absent or invalid.
fn policy_of(r: &mut Report, policy: &Opt<PolicyWire>, loc: &Loc) -> Option<RestartPolicy> {
    match r.opt(policy, loc)? {
        PolicyWire::Name(name) => Some(RestartPolicy {
            kind: restart_kind(r, name, loc)?,
            backoff: DEFAULT_BACKOFF,
        }),
        PolicyWire::Object(Object(obj)) => {
            let at = loc.at("type");
            let kind = match r.opt(&obj.kind, &at) {
                None if obj.kind.is_none() => Some(RestartKind::OnFailure),
                None => None,
                Some(name) => restart_kind(r, name, &at),
            };
            let at = loc.at("backoff_seconds");
            let backoff = r.opt_seconds(&obj.backoff_seconds, &at, false);
            Some(RestartPolicy {
                kind: kind?,
                backoff: backoff.unwrap_or(DEFAULT_BACKOFF),
            })
        }
    }
}

fn restart_kind(r: &mut Report, name: &str, loc: &Loc) -> Option<RestartKind> {
    match name.to_ascii_lowercase().as_str() {
        "never" => Some(RestartKind::Never),
        "on-failure" | "on_failure" => Some(RestartKind::OnFailure),
        "always" => Some(RestartKind::Always),
        _ => {
            let msg = format!("Input should be 'never', 'on-failure' or 'always', got {name:?}");
            r.err(loc, "enum", msg);
            None
        }
    }
}

/// `stop_signal`: a known name or an integer 1..=64.
fn signal_of(r: &mut Report, signal: &Opt<SignalWire>, loc: &Loc) -> Option<i32> {
    match r.opt(signal, loc)? {
        SignalWire::Name(name) => {
            let n = signal_number(name);
            if n.is_none() {
                let msg = format!(
                    "Unknown signal {name:?}; expected one of {} or a number 1..=64",
                    SIGNAL_NAMES.join(", ")
                );
                r.err(loc, "value_error", msg);
            }
            n
        }
        SignalWire::Number(n) => {
            let n = *r.checked(n, loc)?;
            r.int_in(n, loc, 1, 64).and_then(|n| i32::try_from(n).ok())
        }
    }
}

/// `health_check`: `None` when invalid.
fn health_check_of(r: &mut Report, hc: &HealthCheckWire, loc: &Loc) -> Option<HealthCheck> {
    let before = r.len();
    let type_at = loc.at("type");
    let kind = match r.opt(&hc.kind, &type_at) {
        Some(name) => match name.to_ascii_lowercase().as_str() {
            k @ ("exec" | "http" | "tcp") => Some(k.to_owned()),
            _ => {
                let msg = format!("Input should be 'exec', 'http' or 'tcp', got {name:?}");
                r.err(&type_at, "enum", msg);
                None
            }
        },
        None if hc.kind.is_some() => None,
        // No type: inferred from the fields given; exec is the default.
        None if hc.url.is_some() && hc.command.is_none() => Some("http".to_owned()),
        None if hc.port.is_some() && hc.command.is_none() => Some("tcp".to_owned()),
        None => Some("exec".to_owned()),
    };
    let probe = match kind.as_deref() {
        Some("exec") => exec_probe(r, hc, loc),
        Some("http") => http_probe(r, hc, loc),
        Some("tcp") => tcp_probe(r, hc, loc),
        _ => None,
    };
    let initial_delay = r.opt_seconds(
        &hc.initial_delay_seconds,
        &loc.at("initial_delay_seconds"),
        false,
    );
    let period = r.opt_seconds(&hc.period_seconds, &loc.at("period_seconds"), true);
    let timeout = r.opt_seconds(&hc.timeout_seconds, &loc.at("timeout_seconds"), true);
    let max = i64::from(u32::MAX);
    let at = loc.at("failure_threshold");
    let threshold = r.opt_int(&hc.failure_threshold, &at, 1, max);
    if r.len() != before {
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

/// An exec probe's command: a list, or one string split with POSIX shell quoting (`shlex`;
/// no shell runs, nothing is expanded, `#` starts a comment at the start of a word).
fn exec_probe(r: &mut Report, hc: &HealthCheckWire, loc: &Loc) -> Option<HealthProbe> {
    let at = loc.at("command");
    let command = match r.required(&hc.command, &at)? {
        LineOrList::Line(line) => {
            let Some(words) = shlex::split(line) else {
                let msg = "Cannot split command: unterminated quote or trailing backslash";
                r.err(&at, "value_error", msg);
                return None;
            };
            if words.is_empty() {
                r.err(&at, "too_short", "Command should have at least 1 word");
                return None;
            }
            if words.iter().any(|w| w.contains('\0')) {
                r.err(&at, "value_error", "String must not contain NUL bytes");
                return None;
            }
            words
        }
        LineOrList::List(words) => words_of(r, words, &at, true)?,
    };
    if command.first().is_some_and(String::is_empty) {
        let msg = "String should have at least 1 character";
        r.err(&at.at(0), "string_too_short", msg);
        return None;
    }
    Some(HealthProbe::Exec { command })
}

fn http_probe(r: &mut Report, hc: &HealthCheckWire, loc: &Loc) -> Option<HealthProbe> {
    let at = loc.at("url");
    let url = r.required(&hc.url, &at)?;
    let url = r.text(url, &at, false)?;
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
            r.err(&at, "url_scheme", msg);
            None
        }
    }
}

fn tcp_probe(r: &mut Report, hc: &HealthCheckWire, loc: &Loc) -> Option<HealthProbe> {
    let at = loc.at("port");
    let port = r
        .required(&hc.port, &at)
        .copied()
        .and_then(|n: Int| r.int_in(n, &at, 1, 65535))
        .and_then(|n| u16::try_from(n).ok());
    let host = r
        .opt_text(&hc.host, &loc.at("host"))
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    Some(HealthProbe::Tcp { host, port: port? })
}

/// `auto_restart`: `Some` only when enabled (a real boolean) and valid.
fn auto_restart_of(r: &mut Report, ar: &AutoRestartWire, loc: &Loc) -> Option<AutoRestart> {
    if !r
        .opt(&ar.enabled, &loc.at("enabled"))
        .copied()
        .unwrap_or(false)
    {
        return None;
    }
    let cron_at = loc.at("cron");
    let tz_at = loc.at("timezone");
    let required = "Field required when auto_restart is enabled";
    if ar.cron.is_none() {
        r.err(&cron_at, "missing", required);
    }
    if ar.timezone.is_none() {
        r.err(&tz_at, "missing", required);
    }
    let cron = r.opt_text(&ar.cron, &cron_at);
    let timezone = r.opt_text(&ar.timezone, &tz_at);
    let tz = timezone.as_deref().and_then(|name| {
        let tz = name.parse::<chrono_tz::Tz>().ok();
        if tz.is_none() {
            r.err(
                &tz_at,
                "value_error",
                format!("Unknown IANA time zone {name:?}"),
            );
        }
        tz
    });
    let schedule = cron.as_deref().and_then(|expr| match cron_schedule(expr) {
        Ok(s) => Some(s),
        Err(e) => {
            let msg = format!("Invalid cron expression: {e}");
            r.err(&cron_at, "value_error", msg);
            None
        }
    });
    if let Some(schedule) = &schedule {
        // Pure check (fixed reference instant): an expression that never fires is an error.
        let reference = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single();
        let fires = reference
            .and_then(|at| next_fire(schedule, tz.unwrap_or(chrono_tz::UTC), at))
            .is_some();
        if !fires {
            let msg = "Cron expression never fires (e.g. a day that does not exist)";
            r.err(&cron_at, "value_error", msg);
        }
    }
    match (cron, timezone, schedule, tz) {
        (Some(cron), Some(timezone), Some(_), Some(_)) => Some(AutoRestart { cron, timezone }),
        _ => None,
    }
}
