//! Configuration files: the original's YAML keys plus ours, read into typed configs.
//!
//! One YAML file configures one process (`mode: conductor` or `mode: node`). The file is
//! deserialized with serde (serde-saphyr) into a typed file shape; a value of the wrong kind
//! stops the read there. One validation pass then checks what types cannot express and
//! collects every problem, so a file with several bad keys reports them all. Every error names
//! the file and the dotted key (`node.yaml: node.capacities_total.GPU: expected a non-negative
//! integer, got 1.5`), and every unknown key becomes a warning the caller logs (it never fails
//! the load). Every key the original accepted is accepted here (see
//! `reference/original-symphony.md` §2.2), with its bugs (B28) fixed:
//!
//! * `mode` other than `conductor`/`node` is an error (the original crashed later). A missing
//!   `mode` means `conductor`, as in the original, unless the file has a `node` section and no
//!   `conductor` section, in which case it means `node`.
//! * `logging.json` works ([`init_logging`]); the CLI's `--mode`, `--log-level` and
//!   `--log-json` win over the file ([`apply_overrides`]).
//! * The `tls` mappings are optional for the conductor; for a node, each TLS file is required
//!   and must exist, and the error names the key.
//! * Defaults: `conductor.listen` is `127.0.0.1:50051` (the original's code said
//!   `0.0.0.0:8080`, its README `0.0.0.0:50051`; we default to loopback and the README's port),
//!   the HTTP address, storage folder, node grace and scheduling policy are configurable.
//!
//! Invariants: **every relative path** (written in the file or a default such as `./storage`)
//! is resolved against the folder that holds the config file, never against the process's
//! working directory; a loaded config has passed every check listed on its fields, so callers
//! use it without re-validating.

mod logging;
mod read;
mod shape;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use logging::init_logging;

/// Which process a config file starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The central conductor.
    Conductor,
    /// A node agent.
    Node,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "conductor" => Ok(Self::Conductor),
            "node" => Ok(Self::Node),
            _ => Err(format!("expected conductor or node, got {s:?}")),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Conductor => "conductor",
            Self::Node => "node",
        })
    }
}

/// How the scheduler scores candidate nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scheduling {
    /// Prefer the node with the most free capacity (the default).
    #[default]
    Spread,
    /// Prefer the node with the least free capacity that still fits.
    Binpack,
}

impl FromStr for Scheduling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "spread" => Ok(Self::Spread),
            "binpack" => Ok(Self::Binpack),
            _ => Err(format!("expected spread or binpack, got {s:?}")),
        }
    }
}

impl fmt::Display for Scheduling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Spread => "spread",
            Self::Binpack => "binpack",
        })
    }
}

/// `logging.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingConfig {
    /// `logging.level`: one of `trace`, `debug`, `info`, `warn`, `error` (lower case; the file
    /// may use any case, and the original's `WARNING` and `CRITICAL` map to `warn` and
    /// `error`). Default `info`. A value set by [`apply_overrides`] is checked by
    /// [`init_logging`].
    pub level: String,
    /// `logging.json`: one JSON object per log line instead of plain text. Default `false`.
    pub json: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            json: false,
        }
    }
}

/// Maps a log level as users write it to the `tracing` name, or `None` if it is not one.
pub fn normalize_level(level: &str) -> Option<&'static str> {
    match level.trim().to_ascii_lowercase().as_str() {
        "trace" => Some("trace"),
        "debug" => Some("debug"),
        "info" | "success" => Some("info"),
        "warn" | "warning" => Some("warn"),
        "error" | "critical" => Some("error"),
        _ => None,
    }
}

/// `conductor.*`: the conductor's settings, all optional in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConductorConfig {
    /// `conductor.listen`: QUIC listen address, an IP and a port. Default `127.0.0.1:50051`.
    pub listen: SocketAddr,
    /// `conductor.server`: an extra name or IP put into the server certificate. Default none.
    pub server: Option<String>,
    /// `conductor.tls.cert_path`: folder for the CA and the server certificate.
    /// Default `<storage_dir>/certs`.
    pub cert_dir: PathBuf,
    /// `conductor.http_listen`: HTTP/WebSocket API address. Default `127.0.0.1:8000`.
    pub http_listen: SocketAddr,
    /// `conductor.storage_dir`: folder for the database (created if missing). Default `./storage`.
    pub storage_dir: PathBuf,
    /// `conductor.node_grace_sec`: a silent node is marked lost after this. Default 30 s; > 0.
    pub node_grace: Duration,
    /// `conductor.suspect_after_sec`: a silent node is marked suspect after this. Default 10 s
    /// (or half the grace if the grace is shorter); > 0 and less than `node_grace`.
    pub suspect_after: Duration,
    /// `conductor.scheduling`: `spread` (default) or `binpack`.
    pub scheduling: Scheduling,
    /// `conductor.service_ports`: where mesh service ports come from, `LOW-HIGH`.
    /// Default `7000-8999` (the seed's pool; ports are unique across the cluster).
    pub service_ports: std::ops::RangeInclusive<u16>,
    /// `conductor.direct_paths`: whether nodes try direct connections (hole punching) for
    /// mesh tunnels; `false` relays everything through the conductor. Default `true`.
    pub direct_paths: bool,
    /// `conductor.events_keep` (newest events kept, 0 turns the events log off; default
    /// 100 000) and `conductor.events_max_age_sec` (older events are dropped; default 7 days).
    pub events: crate::conductor::events::Retention,
    /// `conductor.api_auth`: whether API calls need a token. Default: no on a loopback
    /// `http_listen`; beyond loopback the conductor refuses to start unless it is `true`.
    pub api_auth: Option<bool>,
    /// `conductor.api_tls.cert_file` and `.key_file`: serve the API over HTTPS (both PEM
    /// files must exist). Default: plain HTTP.
    pub api_tls: Option<crate::conductor::ApiTls>,
    /// `conductor.node_cert_ttl_sec`: lifetime of node certificates signed at enrollment and
    /// renewal. Default 24 h; > 0.
    pub node_cert_ttl: Duration,
    /// `conductor.renew_grace_sec`: how long after expiry a node may renew with its key.
    /// Default 7 days; > 0.
    pub renew_grace: Duration,
}

impl ConductorConfig {
    /// The defaults, with relative default paths resolved against `base` (the config's folder).
    pub fn with_defaults(base: &Path) -> Self {
        let storage_dir = base.join("storage");
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 50051)),
            server: None,
            cert_dir: storage_dir.join("certs"),
            http_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8000)),
            storage_dir,
            node_grace: Duration::from_secs(30),
            suspect_after: Duration::from_secs(10),
            scheduling: Scheduling::Spread,
            service_ports: crate::conductor::services::DEFAULT_PORT_RANGE,
            direct_paths: true,
            events: crate::conductor::events::Retention::default(),
            api_auth: None,
            api_tls: None,
            node_cert_ttl: crate::conductor::DEFAULT_NODE_CERT_TTL,
            renew_grace: crate::conductor::DEFAULT_RENEW_GRACE,
        }
    }
}

/// `node.tls.*`: the node's certificate files (all required, all must exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTlsFiles {
    /// `node.tls.ca_file`: the CA certificate (PEM).
    pub ca_file: PathBuf,
    /// `node.tls.cert_file`: this node's certificate (PEM).
    pub cert_file: PathBuf,
    /// `node.tls.key_file`: this node's private key (PEM).
    pub key_file: PathBuf,
}

/// `node.*`: a node agent's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// `node.node_id` (required): 1-128 letters, digits, `.`, `_`, `-`.
    pub node_id: String,
    /// `node.conductor_addr` (required): `host:port` (a name, an IPv4 address, or `[IPv6]`),
    /// port 1-65535.
    pub conductor_addr: String,
    /// `node.server_name`: the name expected in the conductor's certificate.
    /// Default: the host part of `conductor_addr`.
    pub server_name: Option<String>,
    /// `node.groups`: non-empty strings, duplicates removed. Default empty.
    pub groups: Vec<String>,
    /// `node.capacities_total`: capacity class -> non-negative integer. Default empty.
    pub capacities_total: BTreeMap<String, i64>,
    /// `node.heartbeat_sec`: heartbeat / usage report period. Default 1 s; > 0.
    pub heartbeat: Duration,
    /// `node.tls.*`.
    pub tls: NodeTlsFiles,
    /// `node.work_dir`: workspaces, log spool and state. Default `./symphony-node`.
    pub work_dir: PathBuf,
    /// `node.keep_alive_sec`: QUIC keep-alive interval. Default 5 s (or half the idle timeout
    /// if that is shorter); > 0 and less than `idle_timeout`.
    pub keep_alive: Duration,
    /// `node.idle_timeout_sec`: QUIC idle timeout. Default 20 s; > 0.
    pub idle_timeout: Duration,
}

impl NodeConfig {
    /// Checks that the TLS files exist; the error names each missing file's key and path.
    pub fn check_files(&self, origin: &str) -> Result<(), ConfigError> {
        let files = [
            ("node.tls.ca_file", &self.tls.ca_file),
            ("node.tls.cert_file", &self.tls.cert_file),
            ("node.tls.key_file", &self.tls.key_file),
        ];
        let errors: Vec<(String, String)> = files
            .iter()
            .filter_map(|(key, path)| file_problem(path).map(|m| ((*key).to_owned(), m)))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::from_errors(origin, errors))
        }
    }
}

/// Why `path` is not a readable-looking file (`file not found: ...`), if it isn't.
fn file_problem(path: &Path) -> Option<String> {
    if path.is_file() {
        return None;
    }
    let what = if path.exists() {
        "is not a file"
    } else {
        "file not found"
    };
    Some(format!("{what}: {}", path.display()))
}

/// A whole config file, checked and typed.
#[derive(Debug, Clone, PartialEq)]
pub struct FileConfig {
    /// `mode`.
    pub mode: Mode,
    /// `logging`.
    pub logging: LoggingConfig,
    /// `conductor`: present when the file has the section or the mode is `conductor` (then
    /// filled with defaults).
    pub conductor: Option<ConductorConfig>,
    /// `node`: present when the file has the section.
    pub node: Option<NodeConfig>,
    /// Where the config came from (the path as given, or the `origin` of [`parse_str`]);
    /// used in error messages.
    pub origin: String,
    /// The folder relative paths were resolved against.
    pub base_dir: PathBuf,
}

impl FileConfig {
    /// The conductor section, or an error if there is none.
    pub fn conductor_config(&self) -> Result<&ConductorConfig, ConfigError> {
        self.conductor.as_ref().ok_or_else(|| {
            ConfigError::key(
                &self.origin,
                "conductor",
                "missing (required in conductor mode)",
            )
        })
    }

    /// The node section with its TLS files checked, or an error naming what is missing.
    pub fn node_config(&self) -> Result<&NodeConfig, ConfigError> {
        let node = self.node.as_ref().ok_or_else(|| {
            ConfigError::key(&self.origin, "node", "missing (required in node mode)")
        })?;
        node.check_files(&self.origin)?;
        Ok(node)
    }
}

/// Command-line values that win over the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--mode`.
    pub mode: Option<Mode>,
    /// `--log-level`.
    pub log_level: Option<String>,
    /// `--log-json` (`Some(true)` when given).
    pub log_json: Option<bool>,
}

/// Why a config could not be loaded. Every message names the file, and the key where one is
/// at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("config file not found: {}", path.display())]
    NotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The path as given.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The text is not valid YAML, or not a mapping at the top level.
    #[error("{origin}: {message}")]
    Syntax {
        /// The file.
        origin: String,
        /// What the parser said.
        message: String,
    },
    /// A key is missing or has a bad value.
    #[error("{origin}: {key}: {message}")]
    Key {
        /// The file.
        origin: String,
        /// The dotted key, e.g. `node.tls.ca_file`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Several keys are missing or have bad values; all of them are listed.
    #[error("{}", list_errors(origin, errors))]
    Invalid {
        /// The file.
        origin: String,
        /// `(dotted key, what is wrong)`, in the order the file's keys were checked.
        errors: Vec<(String, String)>,
    },
    /// Logging could not be set up (bad level or bad `RUST_LOG`).
    #[error("logging: {0}")]
    Logging(String),
}

impl ConfigError {
    fn key(origin: &str, key: &str, message: impl Into<String>) -> Self {
        Self::Key {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// One problem as [`ConfigError::Key`], several as [`ConfigError::Invalid`]; `errors`
    /// must not be empty.
    fn from_errors(origin: &str, mut errors: Vec<(String, String)>) -> Self {
        if errors.len() == 1
            && let Some((key, message)) = errors.pop()
        {
            return Self::key(origin, &key, message);
        }
        Self::Invalid {
            origin: origin.to_owned(),
            errors,
        }
    }

    /// The dotted key at fault, if the error is about keys (the first one if several).
    pub fn key_name(&self) -> Option<&str> {
        match self {
            Self::Key { key, .. } => Some(key),
            Self::Invalid { errors, .. } => errors.first().map(|(key, _)| key.as_str()),
            _ => None,
        }
    }
}

/// `{origin}: {key}: {message}` for each error, joined by `; `.
fn list_errors(origin: &str, errors: &[(String, String)]) -> String {
    let each: Vec<String> = errors
        .iter()
        .map(|(key, message)| format!("{origin}: {key}: {message}"))
        .collect();
    each.join("; ")
}

/// Reads and checks a config file. Relative paths in it (and relative defaults) are resolved
/// against the file's folder. Returns the config and the warnings (unknown keys) to log.
pub fn load(path: &Path) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ConfigError::NotFound {
                path: path.to_owned(),
            }
        } else {
            ConfigError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let base = path.parent().unwrap_or(Path::new(""));
    read::parse(&text, &path.display().to_string(), base)
}

/// Parses config text. `origin` names it in messages; relative paths are resolved against
/// `origin`'s folder (for a bare name such as `conductor.yaml`: left relative, i.e. to the
/// working directory).
pub fn parse_str(text: &str, origin: &str) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let base = Path::new(origin).parent().unwrap_or(Path::new(""));
    read::parse(text, origin, base)
}

/// Applies command-line values over the file's (the original ignored them, B28). Switching
/// to conductor mode without a `conductor` section fills in the defaults; switching to node
/// mode without a `node` section leaves it empty and [`FileConfig::node_config`] reports it.
pub fn apply_overrides(cfg: &mut FileConfig, o: &Overrides) {
    if let Some(mode) = o.mode {
        cfg.mode = mode;
        if mode == Mode::Conductor && cfg.conductor.is_none() {
            cfg.conductor = Some(ConductorConfig::with_defaults(&cfg.base_dir));
        }
    }
    if let Some(level) = &o.log_level {
        cfg.logging.level = match normalize_level(level) {
            Some(l) => l.to_owned(),
            None => level.clone(),
        };
    }
    if let Some(json) = o.log_json {
        cfg.logging.json = json;
    }
}
