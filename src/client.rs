//! Client commands against the conductor's HTTP/WebSocket API: `deploy`, `ps`, `logs`, `nodes`,
//! `stop`, `start`, `rm`.
//!
//! Each command is a library function taking the API base URL (`http://127.0.0.1:8000`) and a
//! writer for its normal output, and returning `Result<Exit, ClientError>`; the CLI prints the
//! error (see [`finish`]) and exits with [`Exit::code`]: 0 ok, 1 failure, 2 usage. Invariants:
//! - nothing here panics on network, file or user input; every failure is a [`ClientError`];
//! - a refused connection is always [`ClientError::Unreachable`], with one clear message;
//! - deployment arguments take an id, a unique id prefix or a unique name (see
//!   [`resolve_deployment`]); an ambiguous one is a usage error (exit 2) listing the candidates;
//! - only plain `http://` is supported (no TLS in this client), and no proxy is ever used.
//!
//! Pure parts live in submodules: [`render`] (tables, ages, log lines) and [`body`] (the deploy
//! request body from a spec file or flags).

pub mod body;
pub mod events;
pub mod experiments;
pub mod mesh;
pub mod render;
pub mod runs;
#[cfg(test)]
mod tests;
pub mod trust;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

use crate::model::{DesiredState, NodeId};
use crate::time::now_ms;

/// The API's JSON shapes, shared with the conductor (see [`crate::model`]).
pub use crate::model::{Deployment, Node, NodeList, RunStatus};
pub use body::{SpecFormat, deploy_body, parse_spec_text};
pub use render::{format_age, format_log_entry, render_table};

/// An argument at least this long that matches no listed id or name is sent as is (the server
/// answers for it, e.g. a 404 for a deployment deleted meanwhile).
pub const FULL_ID_LEN: usize = 32;

/// Page size used when listing all deployments.
const PAGE_LIMIT: usize = 500;

/// Safety cap on pages when listing, in case a server ignores `offset`.
const MAX_PAGES: usize = 1000;

/// Without `--follow`, how long `logs` waits for the backlog frame before giving up quietly.
const BACKLOG_WAIT: Duration = Duration::from_secs(3);

/// TCP connect timeout for HTTP requests.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whole-request timeout for HTTP requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How a command ended; the CLI turns it into the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success: exit 0.
    Ok,
    /// The operation failed: exit 1.
    Failure,
    /// The command line was wrong: exit 2.
    Usage,
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the API address.
    #[error("cannot reach the conductor at {api}: is `symphony dev` running?")]
    Unreachable {
        /// The base URL that was tried.
        api: String,
    },
    /// Bad arguments (exit 2).
    #[error("{0}")]
    Usage(String),
    /// An id prefix or a name matches several deployments (exit 2).
    #[error("'{prefix}' is ambiguous; it matches: {}; give the id", candidates.join(", "))]
    AmbiguousId {
        /// What the user typed.
        prefix: String,
        /// Matching deployments (at most a handful, sorted by id): `id (name)`, or the id
        /// alone where no name is known.
        candidates: Vec<String>,
    },
    /// No deployment has this id, id prefix or name.
    #[error("no deployment has the id, id prefix or name '{0}'")]
    NoSuchDeployment(String),
    /// The conductor rejected the request body (HTTP 422); one `field.path: message` per entry.
    #[error("{}", .0.join("\n"))]
    Validation(Vec<String>),
    /// Any other non-success HTTP answer.
    #[error("{detail} (HTTP {status})")]
    Api {
        /// The HTTP status code.
        status: u16,
        /// The server's `detail`, or the raw body.
        detail: String,
    },
    /// The spec file could not be read or parsed.
    #[error("{path}: {message}")]
    SpecFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The log stream reported an error (an `"error"` key in a frame).
    #[error("log stream: {0}")]
    LogStream(String),
    /// A transport failure other than a refused connection.
    #[error("request to the conductor failed: {0}")]
    Transport(String),
    /// The conductor answered something this client does not understand.
    #[error("unexpected answer from the conductor: {0}")]
    Decode(String),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// The exit status this error maps to.
    pub fn exit(&self) -> Exit {
        match self {
            ClientError::Usage(_) | ClientError::AmbiguousId { .. } => Exit::Usage,
            _ => Exit::Failure,
        }
    }
}

/// Prints the error of a finished command to `err` (validation entries one per line, anything
/// else as `error: ...`) and returns the exit status.
pub fn finish(result: Result<Exit, ClientError>, err: &mut impl Write) -> Exit {
    match result {
        Ok(exit) => exit,
        Err(e) => {
            // Best effort: if stderr itself is gone there is nobody left to tell.
            let _ = match &e {
                ClientError::Validation(lines) => {
                    lines.iter().try_for_each(|l| writeln!(err, "{l}"))
                }
                other => writeln!(err, "error: {other}"),
            };
            e.exit()
        }
    }
}

/// One log line from the logs WebSocket.
#[derive(Debug, Clone, Deserialize)]
pub struct LogEntry {
    /// Per-deployment sequence number.
    #[serde(default)]
    pub seq: Option<u64>,
    /// When the line was read, unix ms.
    #[serde(default)]
    pub timestamp_unix_ms: i64,
    /// stdout, stderr, system, ...
    #[serde(default)]
    pub stream: String,
    /// The text, without newline.
    #[serde(default)]
    pub line: String,
}

/// One frame of the logs WebSocket.
#[derive(Debug, Clone, Deserialize)]
struct LogFrame {
    #[serde(default)]
    entries: Vec<LogEntry>,
    #[serde(default)]
    error: Option<String>,
}

/// Arguments of `symphony deploy`.
#[derive(Debug, Clone, Default)]
pub struct DeployArgs {
    /// `-f FILE`: a full POST body or just a specification (JSON, or YAML by extension).
    pub file: Option<PathBuf>,
    /// `--name N`: required with a command or a spec-only file; overrides the file's name.
    pub name: Option<String>,
    /// `-- cmd args...`: the command to run (exclusive with `file`).
    pub command: Vec<String>,
    /// `--stopped`: create with `desired_state: STOPPED`.
    pub desired_stopped: bool,
    /// `--json`: print the created deployment as JSON instead of its id.
    pub json: bool,
    /// Optional spec additions.
    pub extra: DeployExtra,
}

/// Optional spec additions for `deploy`, merged into `specification.spec`.
#[derive(Debug, Clone, Default)]
pub struct DeployExtra {
    /// `--env KEY=VALUE` (repeatable) -> `spec.env`.
    pub env: Vec<String>,
    /// `--capacity CLASS=N` (repeatable) -> `spec.capacity_requests`.
    pub capacity: Vec<String>,
    /// `--restart POLICY` -> `spec.restart_policy`.
    pub restart: Option<String>,
    /// `--env-name NAME` -> `spec.config.env_name` (a conda/uv env defined on the conductor).
    pub env_name: Option<String>,
    /// `--group NAME` -> `spec.node_group`.
    pub group: Option<String>,
}

/// Arguments of `symphony logs`.
#[derive(Debug, Clone, Default)]
pub struct LogsArgs {
    /// Deployment id or unique prefix.
    pub id: String,
    /// `-f`: keep following until the socket closes or Ctrl-C.
    pub follow: bool,
    /// `--tail N`: backlog lines (server default when `None`).
    pub tail: Option<u32>,
    /// `--streams a,b`: only these streams (all when empty).
    pub streams: Vec<String>,
}

/// `symphony deploy`: creates a deployment and prints its id (or the JSON with `--json`).
pub async fn deploy(
    api: &str,
    args: &DeployArgs,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    if args.file.is_some() && !args.command.is_empty() {
        // Checked before reading the file so the usage error wins over a file error.
        return Err(ClientError::Usage(
            "give either a spec file (-f) or a command (-- cmd ...), not both".into(),
        ));
    }
    let file = match &args.file {
        None => None,
        Some(path) => Some(read_spec_file(path).await?),
    };
    let body = deploy_body(args, file)?;
    let client = Client::new(api)?;
    let created: Value = client
        .request(Method::POST, &["deployments"], &[], Some(&body))
        .await?;
    if args.json {
        print_json(out, &created)?;
    } else {
        let id = created
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| ClientError::Decode("the created deployment has no id".into()))?;
        writeln!(out, "{id}")?;
    }
    Ok(Exit::Ok)
}

/// Reads a JSON or YAML file (by extension, else JSON then YAML) holding a mapping.
async fn read_spec_file(path: &std::path::Path) -> Result<Value, ClientError> {
    let spec_err = |message: String| ClientError::SpecFile {
        path: path.to_owned(),
        message,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| spec_err(e.to_string()))?;
    parse_spec_text(&text, SpecFormat::from_path(path)).map_err(spec_err)
}

/// `symphony ps`: lists deployments as a table (or the raw JSON array with `--json`); `wide`
/// adds each one's pid and GPU use.
pub async fn ps(
    api: &str,
    json: bool,
    wide: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let raw = client.list_deployments().await?;
    if json {
        print_json(out, &Value::Array(raw))?;
        return Ok(Exit::Ok);
    }
    let deployments = raw
        .into_iter()
        .map(serde_json::from_value::<Deployment>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Decode(e.to_string()))?;
    out.write_all(render::render_ps(&deployments, now_ms(), wide).as_bytes())?;
    Ok(Exit::Ok)
}

/// `symphony nodes`: lists nodes as a table (or the raw JSON with `--json`).
pub async fn nodes(api: &str, json: bool, out: &mut impl Write) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let raw: Value = client.request(Method::GET, &["nodes"], &[], None).await?;
    if json {
        print_json(out, &raw)?;
        return Ok(Exit::Ok);
    }
    let parsed: NodeList =
        serde_json::from_value(raw).map_err(|e| ClientError::Decode(e.to_string()))?;
    let snapshots = parsed.nodes.into_iter().map(|(id, mut n)| {
        if n.node_id.is_empty() {
            n.node_id = NodeId::from(id);
        }
        n
    });
    let snapshots: Vec<Node> = snapshots.collect();
    out.write_all(render::render_nodes(&snapshots).as_bytes())?;
    Ok(Exit::Ok)
}

/// `symphony stop`: sets `desired_state: STOPPED`; prints the full id.
pub async fn stop(api: &str, id: &str, out: &mut impl Write) -> Result<Exit, ClientError> {
    set_desired(api, id, DesiredState::Stopped, out).await
}

/// `symphony start`: sets `desired_state: RUNNING`; prints the full id.
pub async fn start(api: &str, id: &str, out: &mut impl Write) -> Result<Exit, ClientError> {
    set_desired(api, id, DesiredState::Running, out).await
}

async fn set_desired(
    api: &str,
    id: &str,
    state: DesiredState,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let id = client.resolve_id(id).await?;
    let _: Value = client
        .request(
            Method::PATCH,
            &["deployments", &id],
            &[],
            Some(&json!({ "desired_state": state })),
        )
        .await?;
    writeln!(out, "{id}")?;
    Ok(Exit::Ok)
}

/// `symphony rm`: deletes a deployment; prints the full id.
pub async fn rm(api: &str, id: &str, out: &mut impl Write) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let id = client.resolve_id(id).await?;
    client
        .request_empty(Method::DELETE, &["deployments", &id])
        .await?;
    writeln!(out, "{id}")?;
    Ok(Exit::Ok)
}

/// `symphony logs`: prints log lines as `<RFC3339 time> [<stream>] <line>`.
///
/// Without `follow` it prints the backlog (the first frame) and returns; with `follow` it runs
/// until the server closes the socket or Ctrl-C.
pub async fn logs(api: &str, args: &LogsArgs, out: &mut impl Write) -> Result<Exit, ClientError> {
    logs_until(api, args, out, ctrl_c()).await
}

/// Ends at Ctrl-C; if the handler cannot be installed, never (the default kills us).
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// [`logs`] with an explicit stop signal instead of Ctrl-C (for embedding and tests).
pub async fn logs_until(
    api: &str,
    args: &LogsArgs,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
) -> Result<Exit, ClientError> {
    logs_inner(api, args, out, stop, BACKLOG_WAIT).await
}

async fn logs_inner(
    api: &str,
    args: &LogsArgs,
    out: &mut impl Write,
    stop: impl Future<Output = ()>,
    backlog_wait: Duration,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    // A deployment (id, prefix, name), else an experiment's process (`EXP/PROC`, `GROUP/PROC`,
    // `PROC`).
    let id = match client.resolve_id(&args.id).await {
        Err(ClientError::NoSuchDeployment(_)) => {
            experiments::resolve_logs_target(&client, &args.id).await?
        }
        other => other?,
    };
    let streams: Vec<&str> = args
        .streams
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut query = Vec::new();
    if let Some(tail) = args.tail {
        query.push(("tail", tail.to_string()));
    }
    if !streams.is_empty() {
        query.push(("streams", streams.join(",")));
    }
    let url = client.ws_url(&["ws", "deployments", &id, "logs"], &query)?;

    let mut ws = client
        .ws_connect(&url)
        .await
        .map_err(|e| ws_error(api, e))?;

    let mut stop = std::pin::pin!(stop);
    let result = async {
        loop {
            let next = if args.follow {
                tokio::select! {
                    m = ws.next() => m,
                    () = &mut stop => return Ok(Exit::Ok),
                }
            } else {
                tokio::select! {
                    m = tokio::time::timeout(backlog_wait, ws.next()) => match m {
                        Ok(m) => m,
                        Err(_) => return Ok(Exit::Ok),
                    },
                    () = &mut stop => return Ok(Exit::Ok),
                }
            };
            let text = match next {
                None | Some(Ok(tungstenite::Message::Close(_))) => return Ok(Exit::Ok),
                Some(Err(e)) => return Err(ws_error(api, e)),
                Some(Ok(tungstenite::Message::Text(t))) => t.as_str().to_owned(),
                Some(Ok(tungstenite::Message::Binary(b))) => {
                    String::from_utf8_lossy(&b).into_owned()
                }
                Some(Ok(_)) => continue,
            };
            let frame: LogFrame = serde_json::from_str(&text)
                .map_err(|e| ClientError::Decode(format!("log frame: {e}")))?;
            if let Some(error) = frame.error {
                return Err(ClientError::LogStream(error));
            }
            match write_entries(out, &frame.entries) {
                Ok(()) => {}
                // `symphony logs -f | head`: the reader left; that is a normal end.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(Exit::Ok),
                Err(e) => return Err(e.into()),
            }
            if !args.follow {
                return Ok(Exit::Ok);
            }
        }
    }
    .await;
    // Polite close; the server may already be gone, which is fine.
    let _ = ws.close(None).await;
    let _ = ws.flush().await;
    result
}

fn write_entries(out: &mut impl Write, entries: &[LogEntry]) -> std::io::Result<()> {
    for e in entries {
        writeln!(out, "{}", format_log_entry(e))?;
    }
    out.flush()
}

/// Resolves `prefix` against ids alone; see [`resolve_deployment`].
pub fn resolve_prefix<'a>(
    prefix: &str,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<String, ClientError> {
    resolve_deployment(prefix, ids.into_iter().map(|id| (id, None)))
}

/// Resolves what the user typed to one deployment id, given `(id, name)` of every deployment.
/// In order: an exact id wins; then an id prefix matching exactly one id; then a name matching
/// exactly one deployment. Empty -> usage error; nothing -> [`ClientError::NoSuchDeployment`];
/// otherwise (several ids with that prefix and not exactly one with that name, or several with
/// that name) -> [`ClientError::AmbiguousId`] listing up to five `id (name)`, sorted by id.
pub fn resolve_deployment<'a>(
    input: &str,
    deployments: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<String, ClientError> {
    if input.is_empty() {
        return Err(ClientError::Usage(
            "the deployment id must not be empty".into(),
        ));
    }
    let mut by_prefix: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    let mut by_name: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    for (id, name) in deployments {
        if id == input {
            return Ok(id.to_owned());
        }
        if id.starts_with(input) {
            by_prefix.insert(id, name);
        }
        if name == Some(input) {
            by_name.insert(id, name);
        }
    }
    let only = |m: &BTreeMap<&str, Option<&str>>| match m.keys().collect::<Vec<_>>().as_slice() {
        [one] => Some((**one).to_owned()),
        _ => None,
    };
    if let Some(id) = only(&by_prefix).or_else(|| only(&by_name)) {
        return Ok(id);
    }
    if by_prefix.is_empty() && by_name.is_empty() {
        return Err(ClientError::NoSuchDeployment(input.to_owned()));
    }
    by_prefix.append(&mut by_name);
    Err(ClientError::AmbiguousId {
        prefix: input.to_owned(),
        candidates: by_prefix
            .into_iter()
            .take(5)
            .map(|(id, name)| match name {
                Some(n) if !n.is_empty() => format!("{id} ({n})"),
                _ => id.to_owned(),
            })
            .collect(),
    })
}

/// The API token every client command sends (`--token` or `SYMPHONY_TOKEN`), set once by the
/// CLI before any command runs.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes every later request carry `token` (first call wins).
pub fn use_token(token: String) {
    let _ = TOKEN.set(token);
}

/// A CA (PEM) to trust for an `https://` API besides the system's roots (`--ca`).
static CA: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Trusts `pem` for an `https://` API (first call wins).
pub fn trust_ca(pem: String) {
    let _ = CA.set(pem);
}

/// The TLS setup of an `https://` API (HTTPS, WSS, port-forward): the system's roots and the
/// `--ca` certificate.
fn tls_config() -> Result<std::sync::Arc<rustls::ClientConfig>, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(pem) = CA.get() {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| ClientError::Usage(format!("--ca: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Usage(format!("--ca: {e}")))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Transport(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// A thin HTTP client bound to one conductor.
struct Client {
    api: String,
    base: Url,
    http: reqwest::Client,
    token: Option<String>,
    /// For an `https://` API.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Client {
    fn new(api: &str) -> Result<Client, ClientError> {
        let base = Url::parse(api)
            .map_err(|e| ClientError::Usage(format!("invalid conductor URL '{api}': {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ClientError::Usage(format!(
                "invalid conductor URL '{api}': use http://HOST:PORT or https://HOST:PORT"
            )));
        }
        let tls = if base.scheme() == "https" {
            Some(tls_config()?)
        } else {
            None
        };
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if let Some(t) = &tls {
            builder = builder.use_preconfigured_tls((**t).clone());
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Transport(error_chain(&e)))?;
        Ok(Client {
            api: api.to_owned(),
            base,
            http,
            token: TOKEN.get().cloned(),
            tls,
        })
    }

    /// Opens a WebSocket to `url` (over TLS for an `https://` API).
    async fn ws_connect(
        &self,
        url: &Url,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        tungstenite::Error,
    > {
        let req = self
            .ws_request(url)
            .map_err(|e| tungstenite::Error::Io(std::io::Error::other(e.to_string())))?;
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector)
            .await
            .map(|(ws, _)| ws)
    }

    /// A WebSocket handshake request for `url`, with the token when there is one.
    fn ws_request(
        &self,
        url: &Url,
    ) -> Result<tungstenite::handshake::client::Request, ClientError> {
        use tungstenite::client::IntoClientRequest;
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::Usage(format!("bad WebSocket URL {url}: {e}")))?;
        if let Some(t) = &self.token
            && let Ok(v) = format!("Bearer {t}").parse()
        {
            req.headers_mut().insert("authorization", v);
        }
        Ok(req)
    }

    /// The `ws://` URL of `segments` with `query` (none when empty).
    fn ws_url(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Url, ClientError> {
        let mut url = self.url(segments)?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        url.set_scheme(scheme).map_err(|()| {
            ClientError::Usage(format!("cannot make a WebSocket URL from {}", self.api))
        })?;
        Ok(url)
    }

    /// `base` + percent-encoded path segments.
    fn url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        let mut url = self.base.clone();
        url.set_query(None);
        url.path_segments_mut()
            .map_err(|()| ClientError::Usage(format!("invalid conductor URL '{}'", self.api)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self.http.request(method, self.url(segments)?);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        Err(api_error(status, &text))
    }

    async fn request<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, segments, query, body).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn request_empty(&self, method: Method, segments: &[&str]) -> Result<(), ClientError> {
        self.send(method, segments, &[], None).await.map(drop)
    }

    fn transport(&self, e: reqwest::Error) -> ClientError {
        if e.is_connect() {
            ClientError::Unreachable {
                api: self.api.clone(),
            }
        } else {
            ClientError::Transport(error_chain(&e))
        }
    }

    /// All deployments, newest first, paging until an empty page (or a page with nothing new).
    async fn list_deployments(&self) -> Result<Vec<Value>, ClientError> {
        let mut all = Vec::new();
        let mut seen = HashSet::new();
        let mut offset = 0usize;
        for _ in 0..MAX_PAGES {
            let page: Vec<Value> = self
                .request(
                    Method::GET,
                    &["deployments"],
                    &[
                        ("limit", PAGE_LIMIT.to_string()),
                        ("offset", offset.to_string()),
                    ],
                    None,
                )
                .await?;
            if page.is_empty() {
                break;
            }
            offset += page.len();
            let mut fresh = 0;
            for item in page {
                let id = item
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if seen.insert(id) {
                    fresh += 1;
                    all.push(item);
                }
            }
            if fresh == 0 {
                break;
            }
        }
        Ok(all)
    }

    /// An id, unique id prefix or unique name resolved over all deployments
    /// ([`resolve_deployment`]); a full-length argument that matches nothing is kept as is.
    async fn resolve_id(&self, input: &str) -> Result<String, ClientError> {
        let input = input.trim();
        if input.is_empty() {
            return resolve_deployment(input, []);
        }
        let all = self.list_deployments().await?;
        let found = resolve_deployment(
            input,
            all.iter().filter_map(|d| {
                let id = d.get("id").and_then(Value::as_str)?;
                Some((id, d.get("name").and_then(Value::as_str)))
            }),
        );
        match found {
            Err(ClientError::NoSuchDeployment(_)) if input.len() >= FULL_ID_LEN => {
                Ok(input.to_owned())
            }
            other => other,
        }
    }
}

/// Maps a non-success HTTP answer: 422 lists become [`ClientError::Validation`].
fn api_error(status: StatusCode, text: &str) -> ClientError {
    let detail = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("detail").cloned());
    match detail {
        Some(Value::Array(items)) if status == StatusCode::UNPROCESSABLE_ENTITY => {
            ClientError::Validation(items.iter().map(format_validation_item).collect())
        }
        Some(Value::String(s)) => ClientError::Api {
            status: status.as_u16(),
            detail: s,
        },
        Some(other) => ClientError::Api {
            status: status.as_u16(),
            detail: other.to_string(),
        },
        None => {
            let body = text.trim();
            let detail = if body.is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                body.chars().take(500).collect()
            };
            ClientError::Api {
                status: status.as_u16(),
                detail,
            }
        }
    }
}

/// One 422 entry as `field.path: message`; a leading `body` location element is dropped.
pub fn format_validation_item(item: &Value) -> String {
    let msg = item
        .get("msg")
        .and_then(Value::as_str)
        .map_or_else(|| item.to_string(), str::to_owned);
    let loc: Vec<String> = item
        .get("loc")
        .and_then(Value::as_array)
        .map(|parts| {
            parts
                .iter()
                .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let loc = match loc.split_first() {
        Some((first, rest)) if first == "body" => rest.to_vec(),
        _ => loc,
    };
    if loc.is_empty() {
        msg
    } else {
        format!("{}: {msg}", loc.join("."))
    }
}

/// Maps a WebSocket error, recognising a refused connection and HTTP rejections.
fn ws_error(api: &str, e: tungstenite::Error) -> ClientError {
    match e {
        tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            ClientError::Unreachable {
                api: api.to_owned(),
            }
        }
        tungstenite::Error::Http(resp) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            api_error(resp.status(), &body)
        }
        other => ClientError::Transport(error_chain(&other)),
    }
}

/// An error and its sources, joined with `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

fn print_json(out: &mut impl Write, v: &Value) -> Result<(), ClientError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ClientError::Decode(e.to_string()))?;
    writeln!(out, "{text}")?;
    Ok(())
}
