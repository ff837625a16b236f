//! The conductor: durable state (`store`), the core actor that owns cluster state (`core`),
//! one actor per node connection (`sessions`), the log hub, and the HTTP/WebSocket API.

pub mod api;
pub mod auth;
pub mod core;
pub mod events;
pub mod https;
pub mod loghub;
pub mod metrics;
pub mod paths;
pub mod runs;
pub mod services;
pub mod sessions;
pub mod store;
pub mod trust;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use symphony_net::{CertificateAuthority, Server, TlsMaterial, TransportSettings};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::scheduler::Strategy;

/// Everything a conductor needs to start.
#[derive(Debug, Clone)]
pub struct ConductorConfig {
    /// QUIC listen address (nodes dial this).
    pub quic_listen: SocketAddr,
    /// HTTP/WebSocket API listen address.
    pub http_listen: SocketAddr,
    /// Folder of the SQLite database and of the key that seals its secrets (`secrets.key`).
    pub storage_dir: PathBuf,
    /// Folder of the CA and server certificate.
    pub cert_dir: PathBuf,
    /// Extra names/IPs in the server certificate.
    pub server_names: Vec<String>,
    /// A disconnected or silent node is suspect after this (no new placements).
    pub suspect_after: Duration,
    /// A silent node is lost after this; its deployments are rescheduled.
    pub grace: Duration,
    /// Placement strategy.
    pub strategy: Strategy,
    /// QUIC tunables.
    pub transport: TransportSettings,
    /// Where mesh service ports come from.
    pub service_ports: std::ops::RangeInclusive<u16>,
    /// Whether node pairs try direct connections for mesh tunnels (else: relay only).
    pub direct_paths: bool,
    /// Retention of the events log (`keep: 0` turns it off).
    pub events: events::Retention,
    /// Lifetime of the node certificates this conductor signs (enrollment, renewal).
    pub node_cert_ttl: Duration,
    /// How long after its certificate expired a node may still renew it with its key.
    pub renew_grace: Duration,
    /// Whether API calls need a token (`None`: only when HTTP listens beyond loopback, where
    /// starting without it is refused).
    pub api_auth: Option<bool>,
    /// Serve the API over HTTPS with this certificate chain and key (PEM files).
    pub api_tls: Option<ApiTls>,
    /// How long an API call waits for the core before it answers 503 (`no_answer`).
    pub answer_within: Duration,
}

/// The API's HTTPS certificate and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl ConductorConfig {
    /// Defaults: QUIC 127.0.0.1:50051, HTTP 127.0.0.1:8000, storage ./storage.
    pub fn local(storage_dir: PathBuf) -> Self {
        Self {
            quic_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            cert_dir: storage_dir.join("certs"),
            storage_dir,
            server_names: Vec::new(),
            suspect_after: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            strategy: Strategy::Spread,
            transport: TransportSettings::default(),
            service_ports: services::DEFAULT_PORT_RANGE,
            direct_paths: true,
            events: events::Retention::default(),
            node_cert_ttl: DEFAULT_NODE_CERT_TTL,
            renew_grace: DEFAULT_RENEW_GRACE,
            api_auth: None,
            api_tls: None,
            answer_within: Duration::from_secs(30),
        }
    }
}

/// Default lifetime of node certificates signed at enrollment and renewal.
pub const DEFAULT_NODE_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default window after expiry in which a node may renew with its key.
pub const DEFAULT_RENEW_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Serves the API on `listener` until `cancel`.
async fn serve_http<L>(listener: L, app: axum::Router, cancel: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let shutdown = async move { cancel.cancelled().await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "http server failed");
    }
}

/// A running conductor.
#[derive(Debug)]
pub struct Conductor {
    /// Where the API listens.
    pub http_addr: SocketAddr,
    /// Whether the API speaks HTTPS.
    pub https: bool,
    /// Where nodes connect.
    pub quic_addr: SocketAddr,
    /// The CA (to issue node certificates in-process, e.g. for `symphony dev`); the core
    /// signs enrollments and renewals with the same one.
    pub ca: Arc<CertificateAuthority>,
    /// Handle to the core (tests, embedding).
    pub core: core::CoreHandle,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    /// The API's WebSocket tasks, awaited at shutdown so each socket gets its close frame.
    sockets: tokio_util::task::TaskTracker,
}

impl Conductor {
    /// Opens the store, creates or loads the PKI, binds both listeners and starts serving.
    pub async fn start(cfg: ConductorConfig) -> anyhow::Result<Self> {
        // Secrets (git tokens) are sealed in the store with this key; a database without it
        // reveals none.
        let key_path = cfg.storage_dir.join(crate::seal::KEY_FILE);
        let key = crate::seal::SealKey::load_or_create(&key_path)
            .with_context(|| format!("secrets key {}", key_path.display()))?;
        let store = store::Store::open(&cfg.storage_dir, key)
            .await
            .with_context(|| format!("opening the store in {}", cfg.storage_dir.display()))?;
        let ca = Arc::new(
            CertificateAuthority::load_or_create(&cfg.cert_dir)
                .with_context(|| format!("certificate authority in {}", cfg.cert_dir.display()))?,
        );
        let mut names = cfg.server_names.clone();
        names.push("127.0.0.1".into());
        if !cfg.quic_listen.ip().is_unspecified() {
            names.push(cfg.quic_listen.ip().to_string());
        }
        let server_files = ca.ensure_server_files(&cfg.cert_dir, &names)?;
        let tls = TlsMaterial::from_files(
            &cfg.cert_dir.join("ca.pem"),
            &server_files.cert,
            &server_files.key,
        )?;
        let auth_required = match cfg.api_auth {
            Some(on) => on,
            None if cfg.http_listen.ip().is_loopback() => false,
            None => anyhow::bail!(
                "conductor.api_auth: the HTTP API listens on {}, beyond loopback, so it must \
                 require tokens: set `api_auth: true` (and create one with `symphony api-token \
                 create --role admin --name NAME`), or listen on 127.0.0.1",
                cfg.http_listen
            ),
        };
        let revoked = symphony_net::RevokedSet::default();
        let trust = core::TrustState::new(
            ca.clone(),
            revoked.clone(),
            store.list_node_trust().await?,
            cfg.node_cert_ttl,
            cfg.renew_grace,
        )?;
        let server = Server::bind_revoking(cfg.quic_listen, &tls, cfg.transport.clone(), revoked)
            .with_context(|| format!("binding QUIC on {}", cfg.quic_listen))?;
        let quic_addr = server.local_addr()?;
        let http = tokio::net::TcpListener::bind(cfg.http_listen)
            .await
            .with_context(|| format!("binding HTTP on {}", cfg.http_listen))?;
        let http_addr = http.local_addr()?;
        let https = cfg
            .api_tls
            .as_ref()
            .map(|t| https::server_config(&t.cert, &t.key))
            .transpose()?;

        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let logs = loghub::LogHub::default();
        let core_cfg = core::CoreConfig {
            suspect_after: cfg.suspect_after,
            grace: cfg.grace,
            strategy: cfg.strategy,
            service_ports: cfg.service_ports.clone(),
            direct_paths: cfg.direct_paths,
            events: cfg.events,
            answer_within: cfg.answer_within,
        };
        let auth = auth::Auth::new(
            store.clone(),
            auth_required,
            cfg.http_listen.ip().is_loopback(),
            https.is_some(),
        );
        let core = core::start(
            store,
            core_cfg,
            logs.clone(),
            trust,
            &mut tasks,
            cancel.child_token(),
        )
        .await?;
        let registry = sessions::Registry::default();
        tasks.spawn(sessions::serve(
            server,
            core.clone(),
            logs.clone(),
            registry.clone(),
            cancel.child_token(),
        ));
        let sockets = tokio_util::task::TaskTracker::new();
        let app = api::router(api::ApiState {
            sessions: registry,
            core: core.clone(),
            logs,
            cancel: cancel.child_token(),
            sockets: sockets.clone(),
            auth,
        });
        let http_cancel = cancel.child_token();
        let is_https = https.is_some();
        match https {
            Some(config) => {
                let listener = https::TlsListener::new(http, config)?;
                tasks.spawn(serve_http(listener, app, http_cancel));
            }
            None => {
                tasks.spawn(serve_http(http, app, http_cancel));
            }
        }
        tracing::info!(%http_addr, %quic_addr, "conductor started");
        Ok(Self {
            http_addr,
            https: is_https,
            quic_addr,
            ca,
            core,
            cancel,
            tasks,
            sockets,
        })
    }

    /// Stops at once, as a crash would (`kill -9`): every task is aborted where it is, nothing
    /// is flushed or closed in order. For tests of recovery.
    pub async fn abort(mut self) {
        self.cancel.cancel();
        self.tasks.shutdown().await;
    }

    /// Stops accepting, tells nodes `Shutdown`, closes WebSockets (1001), flushes, and waits
    /// (bounded) for every task.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        self.sockets.close();
        let sockets = self.sockets.clone();
        let drain = async {
            while self.tasks.join_next().await.is_some() {}
            sockets.wait().await;
        };
        if tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            tracing::warn!("forced conductor shutdown");
            self.tasks.shutdown().await;
        }
    }
}
