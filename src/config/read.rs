//! Reads config text into the typed config in two steps.
//!
//! 1. serde-saphyr deserializes the text into the file shape ([`File`]). serde_path_to_error
//!    names the dotted key of a type error (`node.groups[1]`, `node.capacities_total.GPU`);
//!    serde_ignored reports the keys the shape does not know, which become warnings (with a
//!    "did you mean" hint), never errors. A type error stops the read.
//! 2. [`validate`] checks what types cannot say (ranges, formats, required keys, files) and
//!    collects every problem with its key, in the order of the shape: `mode`, `logging`,
//!    `conductor`, `node`, and within a section in the order its keys are listed there, except
//!    that a limit is checked before the key it bounds (`node.idle_timeout_sec` before
//!    `node.keep_alive_sec`).

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::IgnoredAny;

use super::shape::{self, ConductorFile, Count, File, NodeFile, NodeTlsFile, Secs, Str};
use super::{
    ConductorConfig, ConfigError, FileConfig, LoggingConfig, Mode, NodeConfig, NodeTlsFiles,
    file_problem, normalize_level,
};

fn options() -> serde_saphyr::Options {
    // Non-finite floats come through as strings, so that `.inf` is reported against its key.
    serde_saphyr::options! {
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::AsString,
    }
}

/// Parses `text` (from `origin`), resolving relative paths against `base`.
pub(super) fn parse(
    text: &str,
    origin: &str,
    base: &Path,
) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let syntax = |message: String| ConfigError::Syntax {
        origin: origin.to_owned(),
        message,
    };
    // Syntax first (duplicate keys included), so that an error below is about a value.
    serde_saphyr::from_str_with_options::<IgnoredAny>(text, options())
        .map_err(|e| syntax(format!("not valid YAML: {e}")))?;

    let mut warnings = Vec::new();
    let mut at = String::new();
    let file = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        let mut unknown = |path: serde_ignored::Path<'_>| warnings.push(unknown_key(origin, &path));
        let de = serde_ignored::Deserializer::new(de, &mut unknown);
        serde_path_to_error::deserialize::<_, Option<File>>(de).map_err(|e| {
            at = dotted(e.path());
            e.into_inner()
        })
    });
    let file = match file {
        Ok(file) => file.unwrap_or_default(),
        Err(e) => {
            let message = value_error(&e);
            // The syntax was fine, so an error at the root is about the root's kind.
            return Err(if at.is_empty() {
                syntax(format!("{message} at the top level"))
            } else {
                ConfigError::key(origin, &at, message)
            });
        }
    };
    let cfg = validate(file, origin, base).map_err(|e| ConfigError::from_errors(origin, e))?;
    Ok((cfg, warnings))
}

/// What a type error says, without serde-saphyr's location (the key is named instead).
fn value_error(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error as E;
    match e.without_snippet() {
        E::Message { msg, .. } => msg.clone(),
        E::Unexpected { expected, .. } => match *expected {
            "mapping start" => "expected a mapping".to_owned(),
            "sequence start" => "expected a list".to_owned(),
            other => format!("expected {other}"),
        },
        E::SerdeInvalidType {
            unexpected,
            expected,
            ..
        } => format!("expected {expected}, got {unexpected}"),
        other => other.to_string(),
    }
}

/// A serde_path_to_error path as a dotted key: `node.groups[1]`.
fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter().fold(String::new(), |out, seg| match seg {
        Segment::Seq { index } => format!("{out}[{index}]"),
        Segment::Map { key } | Segment::Enum { variant: key } => join(&out, key),
        Segment::Unknown => out,
    })
}

/// A serde_ignored path as a dotted key.
fn dotted_ignored(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", dotted_ignored(parent)),
        P::Map { parent, key } => join(&dotted_ignored(parent), key),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            dotted_ignored(parent)
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The warning for an unknown key, with the nearest known key as a hint when one is close.
fn unknown_key(origin: &str, path: &serde_ignored::Path<'_>) -> String {
    let serde_ignored::Path::Map { parent, key } = path else {
        return format!("{origin}: unknown key {} (ignored)", dotted_ignored(path));
    };
    let parent = dotted_ignored(parent);
    let hint = shape::known_keys(&parent)
        .iter()
        .map(|cand| (strsim::levenshtein(key, cand), cand))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, cand)| format!("; did you mean {}?", join(&parent, cand)))
        .unwrap_or_default();
    format!(
        "{origin}: unknown key {} (ignored{hint})",
        join(&parent, key)
    )
}

/// `LOW-HIGH` with 1 <= LOW <= HIGH <= 65535.
fn port_range(s: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let (lo, hi) = s.trim().split_once('-')?;
    let (lo, hi) = (
        lo.trim().parse::<u16>().ok()?,
        hi.trim().parse::<u16>().ok()?,
    );
    (lo >= 1 && lo <= hi).then_some(lo..=hi)
}

/// Checks the file shape and builds the config, or returns every problem as (key, message).
/// In node mode the TLS files must exist.
fn validate(file: File, origin: &str, base: &Path) -> Result<FileConfig, Vec<(String, String)>> {
    let mut ck = Check {
        base,
        errors: Vec::new(),
    };
    let inferred = if file.node.is_some() && file.conductor.is_none() {
        Mode::Node
    } else {
        Mode::Conductor
    };
    let mode = match file.mode {
        Some(Str(s)) => s.parse().unwrap_or_else(|m: String| {
            ck.fail("mode", m);
            inferred
        }),
        None => inferred,
    };
    let mut logging = LoggingConfig::default();
    if let Some(l) = file.logging {
        if let Some(Str(level)) = l.level {
            match normalize_level(&level) {
                Some(level) => level.clone_into(&mut logging.level),
                None => ck.fail(
                    "logging.level",
                    format!("expected trace, debug, info, warn or error, got {level:?}"),
                ),
            }
        }
        logging.json = l.json.is_some_and(|f| f.0);
    }
    let conductor = match file.conductor {
        Some(c) => Some(ck.conductor(c)),
        None if mode == Mode::Conductor => Some(ConductorConfig::with_defaults(base)),
        None => None,
    };
    let node = match file.node {
        Some(n) => Some(ck.node(n, mode == Mode::Node)),
        None if mode == Mode::Node => {
            ck.fail("node", "missing (required in node mode)");
            None
        }
        None => None,
    };
    if !ck.errors.is_empty() {
        return Err(ck.errors);
    }
    Ok(FileConfig {
        mode,
        logging,
        conductor,
        node,
        origin: origin.to_owned(),
        base_dir: base.to_owned(),
    })
}

/// The validation pass: the base folder for paths, and the problems so far. A bad value is
/// recorded and replaced by a stand-in so that the pass goes on.
struct Check<'a> {
    base: &'a Path,
    errors: Vec<(String, String)>,
}

/// A trimmed string; empty means absent.
fn optional(v: Option<Str>) -> Option<String> {
    v.map(|Str(s)| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Why `s` is not `host:port` (a name, an IPv4 address or `[IPv6]`, port 1-65535), if it isn't.
fn host_port_problem(s: &str) -> Option<&'static str> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, p)) = rest.split_once("]:") else {
            return Some("use [IPv6]:port");
        };
        if h.parse::<Ipv6Addr>().is_err() {
            return Some("not an IPv6 address");
        }
        (h, p)
    } else {
        let Some((h, p)) = s.rsplit_once(':') else {
            return Some("no port");
        };
        if h.contains(':') {
            return Some("an IPv6 address needs brackets: [addr]:port");
        }
        (h, p)
    };
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Some("bad host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => None,
        _ => Some("the port must be 1-65535"),
    }
}

impl Check<'_> {
    fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push((key.to_owned(), message.into()));
    }

    /// A trimmed string that must be present and non-empty (`""` after an error).
    fn required(&mut self, v: Option<Str>, key: &str) -> String {
        match v.map(|Str(s)| s.trim().to_owned()) {
            None => self.fail(key, "missing (required)"),
            Some(s) if s.is_empty() => self.fail(key, "must not be empty"),
            Some(s) => return s,
        }
        String::new()
    }

    /// A strictly positive number of seconds; `None` when absent or bad.
    fn secs(&mut self, v: Option<Secs>, key: &str) -> Option<Duration> {
        let Secs(secs) = v?;
        let message = match Duration::try_from_secs_f64(secs) {
            Ok(d) if !d.is_zero() => return Some(d),
            Err(_) if secs > 0.0 && secs.is_finite() => format!("{secs} seconds is too long"),
            _ => format!("expected a number of seconds greater than 0, got {secs}"),
        };
        self.fail(key, message);
        None
    }

    /// Seconds that must be below `limit` (unless the limit's own key was bad).
    fn secs_below(
        &mut self,
        v: Option<Secs>,
        key: &str,
        limit: (Duration, &str, bool),
    ) -> Option<Duration> {
        let (limit, limit_key, limit_ok) = limit;
        let d = self.secs(v, key)?;
        if limit_ok && d >= limit {
            self.fail(
                key,
                format!(
                    "must be less than {limit_key} ({} s), got {} s",
                    limit.as_secs_f64(),
                    d.as_secs_f64()
                ),
            );
        }
        Some(d)
    }

    /// An IP socket address (`0.0.0.0:50051`, `[::1]:8000`).
    fn socket_addr(&mut self, v: Option<Str>, key: &str, default: SocketAddr) -> SocketAddr {
        let Some(Str(s)) = v else { return default };
        s.trim().parse().unwrap_or_else(|_| {
            self.fail(
                key,
                format!(
                    "expected an IP address and port such as 0.0.0.0:50051 or [::]:50051, \
                     got {s:?}"
                ),
            );
            default
        })
    }

    /// A path, resolved against the config's folder when relative; `None` when absent or bad.
    fn path(&mut self, v: Option<Str>, key: &str) -> Option<PathBuf> {
        let Str(s) = v?;
        if s.trim().is_empty() {
            self.fail(key, "must not be empty");
            return None;
        }
        Some(self.base.join(s.trim()))
    }

    fn conductor(&mut self, c: ConductorFile) -> ConductorConfig {
        let d = ConductorConfig::with_defaults(self.base);
        let listen = self.socket_addr(c.listen, "conductor.listen", d.listen);
        let server = optional(c.server);
        let cert_path = c.tls.and_then(|t| t.cert_path);
        let cert_path = self.path(cert_path, "conductor.tls.cert_path");
        let http_listen = self.socket_addr(c.http_listen, "conductor.http_listen", d.http_listen);
        let storage_dir = self
            .path(c.storage_dir, "conductor.storage_dir")
            .unwrap_or(d.storage_dir);
        let cert_dir = cert_path.unwrap_or_else(|| storage_dir.join("certs"));
        let errors = self.errors.len();
        let node_grace = self.secs(c.node_grace_sec, "conductor.node_grace_sec");
        let grace_ok = self.errors.len() == errors;
        let node_grace = node_grace.unwrap_or(d.node_grace);
        let suspect_after = self
            .secs_below(
                c.suspect_after_sec,
                "conductor.suspect_after_sec",
                (node_grace, "conductor.node_grace_sec", grace_ok),
            )
            .unwrap_or_else(|| d.suspect_after.min(node_grace / 2));
        let scheduling = match c.scheduling {
            None => d.scheduling,
            Some(Str(s)) => s.parse().unwrap_or_else(|m: String| {
                self.fail("conductor.scheduling", m);
                d.scheduling
            }),
        };
        let service_ports = match c.service_ports {
            None => d.service_ports,
            Some(Str(s)) => port_range(&s).unwrap_or_else(|| {
                let m = format!("expected a port range such as 7000-8999, got {s:?}");
                self.fail("conductor.service_ports", m);
                d.service_ports
            }),
        };
        let direct_paths = c.direct_paths.map_or(d.direct_paths, |f| f.0);
        let keep = match c.events_keep {
            None => d.events.keep,
            Some(Count(n)) => u64::try_from(n).unwrap_or_else(|_| {
                self.fail(
                    "conductor.events_keep",
                    format!("expected 0 or more, got {n}"),
                );
                d.events.keep
            }),
        };
        let max_age = self
            .secs(c.events_max_age_sec, "conductor.events_max_age_sec")
            .unwrap_or(d.events.max_age);
        let api_tls = c.api_tls.and_then(|t| {
            let cert = self.path(t.cert_file, "conductor.api_tls.cert_file");
            let key = self.path(t.key_file, "conductor.api_tls.key_file");
            match (cert, key) {
                (Some(cert), Some(key)) => {
                    for (k, p) in [
                        ("conductor.api_tls.cert_file", &cert),
                        ("conductor.api_tls.key_file", &key),
                    ] {
                        if let Some(m) = super::file_problem(p) {
                            self.fail(k, m);
                        }
                    }
                    Some(crate::conductor::ApiTls { cert, key })
                }
                (None, _) => {
                    self.fail("conductor.api_tls.cert_file", "required with api_tls");
                    None
                }
                (_, None) => {
                    self.fail("conductor.api_tls.key_file", "required with api_tls");
                    None
                }
            }
        });
        let node_cert_ttl = self
            .secs(c.node_cert_ttl_sec, "conductor.node_cert_ttl_sec")
            .unwrap_or(d.node_cert_ttl);
        let renew_grace = self
            .secs(c.renew_grace_sec, "conductor.renew_grace_sec")
            .unwrap_or(d.renew_grace);
        ConductorConfig {
            direct_paths,
            events: crate::conductor::events::Retention { keep, max_age },
            api_auth: c.api_auth.map(|f| f.0),
            api_tls,
            node_cert_ttl,
            renew_grace,
            listen,
            server,
            cert_dir,
            http_listen,
            storage_dir,
            node_grace,
            suspect_after,
            scheduling,
            service_ports,
        }
    }

    fn node(&mut self, n: NodeFile, check_files: bool) -> NodeConfig {
        let node_id = self.required(n.node_id, "node.node_id");
        if !node_id.is_empty() && symphony_net::pki::validate_node_id(&node_id).is_err() {
            self.fail(
                "node.node_id",
                format!("use 1-128 letters, digits, '.', '_' or '-', got {node_id:?}"),
            );
        }
        let conductor_addr = self.required(n.conductor_addr, "node.conductor_addr");
        let bad_addr = if conductor_addr.is_empty() {
            None
        } else {
            host_port_problem(&conductor_addr)
        };
        if let Some(why) = bad_addr {
            self.fail(
                "node.conductor_addr",
                format!("expected host:port, got {conductor_addr:?} ({why})"),
            );
        }
        let mut groups: Vec<String> = Vec::new();
        for (i, Str(g)) in n.groups.unwrap_or_default().into_iter().enumerate() {
            let g = g.trim();
            if g.is_empty() {
                self.fail(&format!("node.groups[{i}]"), "must not be empty");
            } else if !groups.iter().any(|have| have == g) {
                groups.push(g.to_owned());
            }
        }
        let mut capacities_total = BTreeMap::new();
        for (class, Count(count)) in n.capacities_total.unwrap_or_default() {
            let key = format!("node.capacities_total.{class}");
            if class.trim().is_empty() {
                self.fail(&key, "the class name must not be empty");
                continue;
            }
            if count < 0 {
                self.fail(
                    &key,
                    format!("expected a non-negative integer, got {count}"),
                );
            } else {
                capacities_total.insert(class, count);
            }
        }
        let heartbeat = self.secs(n.heartbeat_sec, "node.heartbeat_sec");
        let tls = self.node_tls(n.tls, check_files);
        let work_dir = self
            .path(n.work_dir, "node.work_dir")
            .unwrap_or_else(|| self.base.join("symphony-node"));
        let errors = self.errors.len();
        let idle_timeout = self.secs(n.idle_timeout_sec, "node.idle_timeout_sec");
        let idle_ok = self.errors.len() == errors;
        let idle_timeout = idle_timeout.unwrap_or(Duration::from_secs(20));
        let keep_alive = self
            .secs_below(
                n.keep_alive_sec,
                "node.keep_alive_sec",
                (idle_timeout, "node.idle_timeout_sec", idle_ok),
            )
            .unwrap_or_else(|| Duration::from_secs(5).min(idle_timeout / 2));
        NodeConfig {
            node_id,
            conductor_addr,
            server_name: optional(n.server_name),
            groups,
            capacities_total,
            heartbeat: heartbeat.unwrap_or(Duration::from_secs(1)),
            tls,
            work_dir,
            keep_alive,
            idle_timeout,
        }
    }

    fn node_tls(&mut self, tls: Option<NodeTlsFile>, check_files: bool) -> NodeTlsFiles {
        let Some(tls) = tls else {
            self.fail(
                "node.tls",
                "missing (required: node.tls.ca_file, node.tls.cert_file, node.tls.key_file)",
            );
            return NodeTlsFiles {
                ca_file: PathBuf::new(),
                cert_file: PathBuf::new(),
                key_file: PathBuf::new(),
            };
        };
        NodeTlsFiles {
            ca_file: self.tls_file(tls.ca_file, "node.tls.ca_file", check_files),
            cert_file: self.tls_file(tls.cert_file, "node.tls.cert_file", check_files),
            key_file: self.tls_file(tls.key_file, "node.tls.key_file", check_files),
        }
    }

    /// A required TLS file, checked to exist when `check_file`.
    fn tls_file(&mut self, v: Option<Str>, key: &str, check_file: bool) -> PathBuf {
        if v.is_none() {
            self.fail(key, "missing (required)");
            return PathBuf::new();
        }
        let Some(path) = self.path(v, key) else {
            return PathBuf::new();
        };
        if let Some(problem) = file_problem(&path).filter(|_| check_file) {
            self.fail(key, problem);
        }
        path
    }
}
