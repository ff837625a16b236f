//! Reads the untyped YAML tree key by key into the typed config.
//!
//! The text is parsed by serde-saphyr into a `serde_json::Value`; each section is then read
//! with a [`Ctx`] that knows the file (for messages) and the base folder (for paths). Each
//! mapping's keys are checked against the known list, and the rest become warnings, never
//! errors. Every error names the full dotted key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use super::{
    ConductorConfig, ConfigError, FileConfig, LoggingConfig, Mode, NodeConfig, NodeTlsFiles,
    Scheduling, normalize_level,
};

const TOP_KEYS: &[&str] = &["mode", "logging", "conductor", "node"];
const LOGGING_KEYS: &[&str] = &["level", "json"];
const CONDUCTOR_KEYS: &[&str] = &[
    "listen",
    "server",
    "tls",
    "http_listen",
    "storage_dir",
    "node_grace_sec",
    "suspect_after_sec",
    "scheduling",
];
const CONDUCTOR_TLS_KEYS: &[&str] = &["cert_path"];
const NODE_KEYS: &[&str] = &[
    "node_id",
    "conductor_addr",
    "server_name",
    "groups",
    "capacities_total",
    "heartbeat_sec",
    "tls",
    "work_dir",
    "keep_alive_sec",
    "idle_timeout_sec",
];
const NODE_TLS_KEYS: &[&str] = &["ca_file", "cert_file", "key_file"];

/// Parses `text` (from `origin`), resolving relative paths against `base`.
pub(super) fn parse(
    text: &str,
    origin: &str,
    base: &Path,
) -> Result<(FileConfig, Vec<String>), ConfigError> {
    // Non-finite floats come through as strings, so that `.inf` is reported against its key.
    let options = serde_saphyr::options! {
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::AsString,
    };
    let root: Value =
        serde_saphyr::from_str_with_options(text, options).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: format!("not valid YAML: {e}"),
        })?;
    let empty = Map::new();
    let top = match &root {
        Value::Null => &empty,
        Value::Object(map) => map,
        other => {
            return Err(ConfigError::Syntax {
                origin: origin.to_owned(),
                message: format!(
                    "expected a mapping at the top level, got {}",
                    describe(other)
                ),
            });
        }
    };
    let mut cx = Ctx {
        origin,
        base,
        warnings: Vec::new(),
    };
    cx.warn_unknown(top, "", TOP_KEYS);

    let logging_map = cx.mapping(top.get("logging"), "logging")?;
    let conductor_map = cx.mapping(top.get("conductor"), "conductor")?;
    let node_map = cx.mapping(top.get("node"), "node")?;

    let mode = match cx.string(top.get("mode"), "mode")? {
        Some(s) => s.parse::<Mode>().map_err(|m| cx.err("mode", m))?,
        None if node_map.is_some() && conductor_map.is_none() => Mode::Node,
        None => Mode::Conductor,
    };
    let logging = cx.logging(logging_map)?;
    let conductor = match conductor_map {
        Some(map) => Some(cx.conductor(map)?),
        None if mode == Mode::Conductor => Some(ConductorConfig::with_defaults(base)),
        None => None,
    };
    let node = match node_map {
        Some(map) => Some(cx.node(map)?),
        None if mode == Mode::Node => {
            return Err(cx.err("node", "missing (required in node mode)"));
        }
        None => None,
    };
    if let (Mode::Node, Some(node)) = (mode, &node) {
        node.check_files(origin)?;
    }
    let cfg = FileConfig {
        mode,
        logging,
        conductor,
        node,
        origin: origin.to_owned(),
        base_dir: base.to_owned(),
    };
    Ok((cfg, cx.warnings))
}

/// The reading context: file name, base folder, and the warnings so far.
struct Ctx<'a> {
    origin: &'a str,
    base: &'a Path,
    warnings: Vec<String>,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// A short description of a value for messages: scalars verbatim, containers by kind.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}

/// Levenshtein distance, for "did you mean" hints on unknown keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

impl Ctx<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::key(self.origin, key, message)
    }

    fn warn_unknown(&mut self, map: &Map<String, Value>, prefix: &str, known: &[&str]) {
        for k in map.keys().filter(|k| !known.contains(&k.as_str())) {
            let hint = known
                .iter()
                .filter(|cand| distance(k, cand) <= 2)
                .min_by_key(|cand| distance(k, cand))
                .map(|cand| format!("; did you mean {}?", join(prefix, cand)))
                .unwrap_or_default();
            self.warnings.push(format!(
                "{}: unknown key {} (ignored{hint})",
                self.origin,
                join(prefix, k)
            ));
        }
    }

    /// A mapping, or `None` when absent or null (`tls:` with nothing under it).
    fn mapping<'v>(
        &self,
        v: Option<&'v Value>,
        key: &str,
    ) -> Result<Option<&'v Map<String, Value>>, ConfigError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(other) => {
                Err(self.err(key, format!("expected a mapping, got {}", describe(other))))
            }
        }
    }

    fn string(&self, v: Option<&Value>, key: &str) -> Result<Option<String>, ConfigError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other @ (Value::Number(_) | Value::Bool(_))) => Err(self.err(
                key,
                format!(
                    "expected a string, got {} (quote it: \"{other}\")",
                    describe(other)
                ),
            )),
            Some(other) => {
                Err(self.err(key, format!("expected a string, got {}", describe(other))))
            }
        }
    }

    /// A string that must be present and non-empty.
    fn required_string(&self, v: Option<&Value>, key: &str) -> Result<String, ConfigError> {
        match self.string(v, key)? {
            None => Err(self.err(key, "missing (required)")),
            Some(s) if s.trim().is_empty() => Err(self.err(key, "must not be empty")),
            Some(s) => Ok(s.trim().to_owned()),
        }
    }

    fn bool(&self, v: Option<&Value>, key: &str, default: bool) -> Result<bool, ConfigError> {
        match v {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.err(
                key,
                format!("expected true or false, got {}", describe(other)),
            )),
        }
    }

    /// A strictly positive number of seconds; `None` when absent.
    fn seconds(&self, v: Option<&Value>, key: &str) -> Result<Option<Duration>, ConfigError> {
        let secs = match v {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => n.as_f64(),
            Some(_) => None,
        };
        let bad = || {
            let got = v.map_or_else(String::new, describe);
            self.err(
                key,
                format!("expected a number of seconds greater than 0, got {got}"),
            )
        };
        let secs = secs.filter(|s| s.is_finite() && *s > 0.0).ok_or_else(bad)?;
        let d = Duration::try_from_secs_f64(secs)
            .map_err(|_| self.err(key, format!("{secs} seconds is too long")))?;
        if d.is_zero() {
            return Err(bad());
        }
        Ok(Some(d))
    }

    /// An IP socket address (`0.0.0.0:50051`, `[::1]:8000`).
    fn socket_addr(
        &self,
        v: Option<&Value>,
        key: &str,
        default: SocketAddr,
    ) -> Result<SocketAddr, ConfigError> {
        match self.string(v, key)? {
            None => Ok(default),
            Some(s) => s.trim().parse().map_err(|_| {
                self.err(
                    key,
                    format!(
                        "expected an IP address and port such as 0.0.0.0:50051 or [::]:50051, \
                         got {s:?}"
                    ),
                )
            }),
        }
    }

    /// `host:port` with a name, an IPv4 address or a bracketed IPv6 address, port 1-65535.
    fn host_port(&self, v: Option<&Value>, key: &str) -> Result<String, ConfigError> {
        let s = self.required_string(v, key)?;
        let bad = |why: &str| self.err(key, format!("expected host:port, got {s:?} ({why})"));
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| bad("use [IPv6]:port"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address"))?;
            (h, p)
        } else {
            let (h, p) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
            if h.contains(':') {
                return Err(bad("an IPv6 address needs brackets: [addr]:port"));
            }
            (h, p)
        };
        if host.is_empty() || host.chars().any(char::is_whitespace) {
            return Err(bad("bad host"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(s),
            _ => Err(bad("the port must be 1-65535")),
        }
    }

    /// A path, resolved against the config's folder when relative.
    fn path(&self, v: Option<&Value>, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        match self.string(v, key)? {
            None => Ok(None),
            Some(s) if s.trim().is_empty() => Err(self.err(key, "must not be empty")),
            Some(s) => Ok(Some(self.base.join(s.trim()))),
        }
    }

    fn logging(&mut self, map: Option<&Map<String, Value>>) -> Result<LoggingConfig, ConfigError> {
        let mut out = LoggingConfig::default();
        let Some(map) = map else { return Ok(out) };
        self.warn_unknown(map, "logging", LOGGING_KEYS);
        if let Some(level) = self.string(map.get("level"), "logging.level")? {
            out.level = normalize_level(&level)
                .ok_or_else(|| {
                    self.err(
                        "logging.level",
                        format!("expected trace, debug, info, warn or error, got {level:?}"),
                    )
                })?
                .to_owned();
        }
        out.json = self.bool(map.get("json"), "logging.json", false)?;
        Ok(out)
    }

    fn conductor(&mut self, map: &Map<String, Value>) -> Result<ConductorConfig, ConfigError> {
        self.warn_unknown(map, "conductor", CONDUCTOR_KEYS);
        let d = ConductorConfig::with_defaults(self.base);
        let listen = self.socket_addr(map.get("listen"), "conductor.listen", d.listen)?;
        let server = match self.string(map.get("server"), "conductor.server")? {
            Some(s) if s.trim().is_empty() => None,
            other => other.map(|s| s.trim().to_owned()),
        };
        let http_listen = self.socket_addr(
            map.get("http_listen"),
            "conductor.http_listen",
            d.http_listen,
        )?;
        let storage_dir = self
            .path(map.get("storage_dir"), "conductor.storage_dir")?
            .unwrap_or(d.storage_dir);
        let cert_dir = match self.mapping(map.get("tls"), "conductor.tls")? {
            Some(tls) => {
                self.warn_unknown(tls, "conductor.tls", CONDUCTOR_TLS_KEYS);
                self.path(tls.get("cert_path"), "conductor.tls.cert_path")?
            }
            None => None,
        }
        .unwrap_or_else(|| storage_dir.join("certs"));
        let node_grace = self
            .seconds(map.get("node_grace_sec"), "conductor.node_grace_sec")?
            .unwrap_or(d.node_grace);
        let suspect_after =
            match self.seconds(map.get("suspect_after_sec"), "conductor.suspect_after_sec")? {
                Some(s) if s >= node_grace => {
                    return Err(self.err(
                        "conductor.suspect_after_sec",
                        format!(
                            "must be less than conductor.node_grace_sec ({} s), got {} s",
                            node_grace.as_secs_f64(),
                            s.as_secs_f64()
                        ),
                    ));
                }
                Some(s) => s,
                None => d.suspect_after.min(node_grace / 2),
            };
        let scheduling = match self.string(map.get("scheduling"), "conductor.scheduling")? {
            None => Scheduling::Spread,
            Some(s) => s
                .parse()
                .map_err(|m: String| self.err("conductor.scheduling", m))?,
        };
        Ok(ConductorConfig {
            listen,
            server,
            cert_dir,
            http_listen,
            storage_dir,
            node_grace,
            suspect_after,
            scheduling,
        })
    }

    fn node(&mut self, map: &Map<String, Value>) -> Result<NodeConfig, ConfigError> {
        self.warn_unknown(map, "node", NODE_KEYS);
        let node_id = self.required_string(map.get("node_id"), "node.node_id")?;
        symphony_net::pki::validate_node_id(&node_id).map_err(|_| {
            self.err(
                "node.node_id",
                format!("use 1-128 letters, digits, '.', '_' or '-', got {node_id:?}"),
            )
        })?;
        let conductor_addr = self.host_port(map.get("conductor_addr"), "node.conductor_addr")?;
        let server_name = match self.string(map.get("server_name"), "node.server_name")? {
            Some(s) if s.trim().is_empty() => None,
            other => other.map(|s| s.trim().to_owned()),
        };
        let groups = self.groups(map.get("groups"))?;
        let capacities_total = self.capacities(map.get("capacities_total"))?;
        let heartbeat = self
            .seconds(map.get("heartbeat_sec"), "node.heartbeat_sec")?
            .unwrap_or(Duration::from_secs(1));
        let tls = self.node_tls(map.get("tls"))?;
        let work_dir = self
            .path(map.get("work_dir"), "node.work_dir")?
            .unwrap_or_else(|| self.base.join("symphony-node"));
        let idle_timeout = self
            .seconds(map.get("idle_timeout_sec"), "node.idle_timeout_sec")?
            .unwrap_or(Duration::from_secs(20));
        let keep_alive = match self.seconds(map.get("keep_alive_sec"), "node.keep_alive_sec")? {
            Some(k) if k >= idle_timeout => {
                return Err(self.err(
                    "node.keep_alive_sec",
                    format!(
                        "must be less than node.idle_timeout_sec ({} s), got {} s",
                        idle_timeout.as_secs_f64(),
                        k.as_secs_f64()
                    ),
                ));
            }
            Some(k) => k,
            None => Duration::from_secs(5).min(idle_timeout / 2),
        };
        Ok(NodeConfig {
            node_id,
            conductor_addr,
            server_name,
            groups,
            capacities_total,
            heartbeat,
            tls,
            work_dir,
            keep_alive,
            idle_timeout,
        })
    }

    fn groups(&self, v: Option<&Value>) -> Result<Vec<String>, ConfigError> {
        let items = match v {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(self.err(
                    "node.groups",
                    format!("expected a list of strings, got {}", describe(other)),
                ));
            }
        };
        let mut out: Vec<String> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let key = format!("node.groups[{i}]");
            let g = self.required_string(Some(item), &key)?;
            if !out.contains(&g) {
                out.push(g);
            }
        }
        Ok(out)
    }

    fn capacities(&self, v: Option<&Value>) -> Result<BTreeMap<String, i64>, ConfigError> {
        let Some(map) = self.mapping(v, "node.capacities_total")? else {
            return Ok(BTreeMap::new());
        };
        let mut out = BTreeMap::new();
        for (class, value) in map {
            let key = format!("node.capacities_total.{class}");
            if class.trim().is_empty() {
                return Err(self.err(&key, "the class name must not be empty"));
            }
            let n = match value {
                Value::Number(n) => n.as_i64().filter(|n| *n >= 0),
                _ => None,
            };
            let n = n.ok_or_else(|| {
                self.err(
                    &key,
                    format!("expected a non-negative integer, got {}", describe(value)),
                )
            })?;
            out.insert(class.clone(), n);
        }
        Ok(out)
    }

    fn node_tls(&mut self, v: Option<&Value>) -> Result<NodeTlsFiles, ConfigError> {
        let Some(map) = self.mapping(v, "node.tls")? else {
            return Err(self.err(
                "node.tls",
                "missing (required: node.tls.ca_file, node.tls.cert_file, node.tls.key_file)",
            ));
        };
        self.warn_unknown(map, "node.tls", NODE_TLS_KEYS);
        let file = |name: &str| -> Result<PathBuf, ConfigError> {
            let key = format!("node.tls.{name}");
            self.path(map.get(name), &key)?
                .ok_or_else(|| self.err(&key, "missing (required)"))
        };
        Ok(NodeTlsFiles {
            ca_file: file("ca_file")?,
            cert_file: file("cert_file")?,
            key_file: file("key_file")?,
        })
    }
}
