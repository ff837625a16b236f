//! The node agent's driver: sockets, tasks and the supervisor around the [`NodeCore`].
//!
//! It dials out (`symphony-net` client, re-dialling forever) and feeds the core everything that
//! happens: a connection up or down, each command read from the control stream, each status
//! change of the supervisor, each background job's result. It carries out the core's effects in
//! order: sends on the current connection (never waiting: a full queue closes the connection,
//! which resyncs on the next Hello), applies to the supervisor, starts background jobs
//! (stopping a removed deployment, env work) that outlive a connection and report back as
//! events, starts and stops log shippers (see `ship`), and hands the local state to a writer
//! task that saves the newest version off the async workers. Statuses are flushed once per
//! batch of events (latest per deployment). Heartbeats have their own task and stream, so a
//! slow disk or a busy core never delays them.
//!
//! Processes keep running while the conductor is unreachable or refuses the node; after a node
//! restart, deployments from local state are started only once the conductor confirms them
//! (see `core`).

mod prepare;
mod ship;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use symphony_net::{
    Client, ClientConfig, ClientEvent, CloseCode, Control, FrameError, FrameReceiver, Pacer,
    PacerConfig, Session, StreamKind, TlsMaterial, TransportSettings,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::prepare::AgentPrepare;
use self::ship::{ShipCmd, Shipper};
use super::convert::{heartbeat_wire, static_wire};
use super::core::{Effect, EnvJob, EnvOutcome, Event, Identity, NodeCore};
use super::envs::{self, Envs};
use super::monitor::{Monitor, UsageSample};
use super::runner::Launcher;
use super::state::{Held, LocalState, StateStore};
use super::supervisor::{Hooks, Supervisor, SupervisorConfig};
use crate::model::DeploymentId;
use crate::wire;

/// Everything a node needs to run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    /// `host:port` of the conductor.
    pub conductor_addr: String,
    /// Name expected in the conductor's certificate (default: the host of `conductor_addr`).
    pub server_name: Option<String>,
    pub tls: TlsMaterial,
    pub groups: Vec<String>,
    pub capacities_total: BTreeMap<String, i64>,
    /// Usage heartbeat period.
    pub heartbeat: Duration,
    /// Workspaces, envs, log spools and local state live here.
    pub work_dir: PathBuf,
    pub transport: TransportSettings,
    /// How workloads' keepers are started (the `symphony` binary; tests name it).
    pub keeper: Launcher,
    /// When set at the time the node is cancelled, the workloads keep running under their
    /// keepers for the next agent to adopt (an upgrade in place); otherwise they are stopped.
    pub keep_workloads: Arc<AtomicBool>,
    /// The loopback address mesh services are reached at on this node (listen and connect).
    /// `127.0.0.1` (what `SYMPH_*_HOST` says); another one only to run several agents on one
    /// host (tests, benchmarks).
    pub service_ip: std::net::IpAddr,
    /// Where the processes on the GPUs come from; `None`: NVML (tests put a fake here).
    pub gpu_processes: Option<Arc<dyn super::monitor::GpuProcessSource>>,
    /// Where a renewed certificate and key are saved (`None`: kept in memory only).
    pub identity: Option<super::join::IdentityFiles>,
}

impl NodeConfig {
    /// A node on the conductor's own machine (`symphony dev`, tests, benches): its certificate
    /// is issued by (or reused from) `ca` into `dir`, its work dir is `dir/work`, and it dials
    /// `conductor_addr` expecting the name `localhost`. Defaults: 1 s heartbeat, default transport.
    pub fn local(
        ca: &symphony_net::CertificateAuthority,
        conductor_addr: std::net::SocketAddr,
        node_id: &str,
        dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let files = ca.ensure_node_files(node_id, dir)?;
        let tls = TlsMaterial::from_files(&dir.join("ca.pem"), &files.cert, &files.key)?;
        Ok(Self {
            node_id: node_id.to_owned(),
            conductor_addr: conductor_addr.to_string(),
            server_name: Some("localhost".into()),
            tls,
            groups: Vec::new(),
            capacities_total: BTreeMap::new(),
            heartbeat: Duration::from_secs(1),
            work_dir: dir.join("work"),
            transport: TransportSettings::default(),
            keeper: Launcher::current_exe(),
            keep_workloads: Arc::new(AtomicBool::new(false)),
            service_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            gpu_processes: None,
            identity: Some(super::join::IdentityFiles {
                cert: files.cert,
                key: files.key,
                ca: dir.join("ca.pem"),
                record: dir.join("node.json"),
            }),
        })
    }
}

/// How often a node away past its certificate's expiry tries to renew it with its key.
const OFFLINE_RENEW_RETRY: Duration = Duration::from_secs(60);

/// Environment variables workloads never inherit from the agent.
const CREDENTIAL_VARS: [&str; 2] = ["SYMPHONY_JOIN_TOKEN", "SYMPHONY_TOKEN"];

/// How long shutdown waits for background work (stops of removed deployments) and for the
/// last state write.
const BACKGROUND_GRACE: Duration = Duration::from_secs(30);
/// Outgoing control messages queued per connection; a connection whose queue is full is
/// closed (the conductor stopped reading) and resyncs on its next Hello.
const SEND_QUEUE: usize = 4096;
/// Status events taken per batch before the coalesced statuses are sent.
const STATUS_BATCH: usize = 256;

/// Runs the node until `cancel`; then stops every workload and closes the connection.
pub async fn run(cfg: NodeConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    run_with_store(cfg, cancel, None).await
}

/// [`run`] keeping the local state in `store` instead of the state file in the work dir
/// (tests: a slow or failing disk).
pub async fn run_with_store(
    mut cfg: NodeConfig,
    cancel: CancellationToken,
    store: Option<Arc<dyn StateStore>>,
) -> anyhow::Result<()> {
    check_identity(&cfg)?;
    // Absolute from here on: tools run with other working directories (uv, git, workloads).
    cfg.work_dir = std::path::absolute(&cfg.work_dir)
        .with_context(|| format!("work dir {}", cfg.work_dir.display()))?;
    std::fs::create_dir_all(&cfg.work_dir)
        .with_context(|| format!("creating work dir {}", cfg.work_dir.display()))?;
    // One agent per work dir: two would adopt, stop and restart each other's workloads.
    let _lock = lock_work_dir(&cfg.work_dir)?;
    // Git tokens are sealed with this key in the local state and the keepers' records.
    let key_path = cfg.work_dir.join(crate::seal::KEY_FILE);
    let key = crate::seal::SealKey::load_or_create(&key_path)
        .with_context(|| format!("secrets key {}", key_path.display()))?;
    let store = store
        .unwrap_or_else(|| Arc::new(LocalState::new(cfg.work_dir.join("state.bin"), key.clone())));
    let restored = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .context("reading local state")?
            .context("reading local state")?
    };

    let discovery = envs::discover();
    for note in &discovery.notes {
        tracing::info!("{note}");
    }
    let envs = Arc::new(Envs::from_discovery(&cfg.work_dir, &discovery));
    let env_names = envs.list_all_envs().await;
    let hooks = Hooks {
        prepare: Arc::new(AgentPrepare {
            work_dir: cfg.work_dir.clone(),
            envs: envs.clone(),
            dirs: Arc::new(super::workdirs::WorkDirs::with_held(
                &cfg.work_dir,
                restored.iter().map(|h| h.id.to_string()).collect(),
            )),
        }),
        cron: Some(Arc::new(|ar: &crate::spec::AutoRestart| {
            let schedule = crate::spec::cron_schedule(&ar.cron)?;
            let tz: chrono_tz::Tz = ar
                .timezone
                .parse()
                .map_err(|_| format!("unknown time zone {}", ar.timezone))?;
            Ok(
                Arc::new(move |now| crate::spec::next_fire(&schedule, tz, now))
                    as super::supervisor::NextFire,
            )
        })),
    };
    // Workloads inherit the agent's environment, but never its credentials (a pod template's
    // join token could enroll more nodes).
    let node_env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| !CREDENTIAL_VARS.contains(&k.as_str()))
        .collect();
    let mut sup_cfg = SupervisorConfig::new(cfg.work_dir.clone(), node_env, key);
    sup_cfg.launcher = cfg.keeper.clone();
    let (sup, mut statuses) = Supervisor::with_hooks(sup_cfg, hooks);
    // Before anything starts: processes left by a previous agent are kept for adoption or
    // stopped, so no deployment ever runs twice.
    let wanted = restored
        .iter()
        .map(|h| (h.id.to_string(), h.desired_running))
        .collect();
    let work_dir = cfg.work_dir.clone();
    let steps = tokio::task::spawn_blocking(move || envs::kill_left_steps(&work_dir))
        .await
        .unwrap_or(0);
    if steps > 0 {
        tracing::info!(
            steps,
            "killed env provisioning steps the previous agent left running"
        );
    }
    let adoptable = sup.recover(&wanted).await;
    tracing::info!(held = restored.len(), adoptable = adoptable.len(), node_id = %cfg.node_id, "node agent started");

    let mut monitor = Monitor::new();
    if let Some(source) = cfg.gpu_processes.clone() {
        monitor.set_gpu_processes(source);
    }
    let me = Identity {
        node_id: cfg.node_id.clone(),
        groups: cfg.groups.clone(),
        capacities_total: cfg.capacities_total.clone(),
        resources: static_wire(&monitor.static_info()),
        instance_id: uuid::Uuid::new_v4().simple().to_string(),
    };
    let (usage_tx, usage_rx) = watch::channel::<Option<UsageSample>>(None);
    let mut tasks = JoinSet::new();
    // Usage sampling, about once per heartbeat period, off the async workers.
    {
        let (period, cancel, sup) = (cfg.heartbeat, cancel.clone(), sup.clone());
        // NVML's pids are the host's: in a pid namespace of its own the node cannot map them.
        let host_pids = cfg.gpu_processes.is_some() || super::monitor::in_host_pid_namespace();
        if !host_pids {
            tracing::info!("in a pid namespace of its own: no GPU use per deployment");
        }
        tasks.spawn(async move {
            // Only this task samples; the lock is what lets the sample move to a blocking
            // thread and back.
            let monitor = Arc::new(Mutex::new(monitor));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let (m, sup) = (monitor.clone(), sup.clone());
                let sample = tokio::task::spawn_blocking(move || {
                    let mut s = m.lock().ok().map(|mut m| m.sample())?;
                    if !s.gpu_processes.is_empty() && host_pids {
                        // Each running deployment's process leads its own process group.
                        let leaders: HashMap<u32, String> = sup
                            .status()
                            .into_iter()
                            .filter_map(|s| Some((s.pid?, s.id)))
                            .collect();
                        s.deployment_gpus =
                            super::monitor::per_deployment(&s.gpu_processes, &leaders, group_of);
                    }
                    Some(s)
                })
                .await;
                if let Ok(Some(s)) = sample {
                    usage_tx.send_replace(Some(s));
                }
            }
        });
    }
    let (state_tx, state_rx) = watch::channel(None);
    let (problems_tx, problems_rx) = watch::channel(Vec::new());
    let writer = tokio::spawn(write_state(store, state_rx, problems_tx));
    let (input_tx, mut inputs) = mpsc::channel::<Input>(256);
    let (done_tx, mut done) = mpsc::unbounded_channel::<Event>();
    let mut ccfg = ClientConfig::new(cfg.conductor_addr.clone(), cfg.tls.clone());
    ccfg.server_name = cfg.server_name.clone();
    ccfg.settings = cfg.transport.clone();
    let client = Arc::new(Client::new(ccfg).context("creating the QUIC endpoint")?);
    let direct = super::peers::PeerMap::default();
    let tunnels = super::tunnels::Tunnels::new(cfg.service_ip, direct.clone());
    let (peer_tx, mut peer_reports) = mpsc::unbounded_channel();
    let peers = super::peers::Peers::new(
        client.clone(),
        direct,
        tunnels.local_ports(),
        cfg.service_ip,
        peer_tx,
    );
    let mut d = Driver {
        core: NodeCore::new(me, restored, env_names),
        sup: sup.clone(),
        envs,
        heartbeat: cfg.heartbeat,
        usage: usage_rx,
        problems: problems_rx,
        conn: None,
        epoch: 0,
        inputs: input_tx,
        jobs: TaskTracker::new(),
        done: done_tx,
        state: state_tx,
        dropped_seen: 0,
        later: VecDeque::new(),
        tunnels,
        peers,
        service_ip: cfg.service_ip,
        renewal: super::renew::Renewal::new(client.clone(), cfg.tls.clone(), cfg.identity.clone()),
    };

    let (mut conns, conn_task) = client.clone().run(cancel.child_token());
    // Certificates renewed after expiry while away (over the enrollment ALPN).
    let (renewed_tx, mut renewed_offline) = mpsc::channel::<TlsMaterial>(1);
    let mut fatal = None;
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            ev = conns.recv() => match ev {
                Some(ClientEvent::Connected { session, control }) => d.connected(session, control),
                Some(ClientEvent::Refused(code, why)) => {
                    tracing::error!(%code, %why, "the conductor refused this node; workloads keep running, retrying slowly");
                }
                Some(ClientEvent::Fatal(CloseCode::Revoked, why)) => {
                    tracing::error!(%why, "this node was revoked; stopping its workloads");
                    fatal = Some(format!("this node was revoked by the conductor ({why}); join again with a new token"));
                    break;
                }
                Some(ClientEvent::Fatal(code, why)) => {
                    tracing::error!(%code, %why, "another process took over this node's identity; stopping");
                    fatal = Some(format!("the conductor closed the connection: {code} ({why})"));
                    break;
                }
                None => break,
            },
            Some(input) = inputs.recv() => d.input(input),
            Some(ev) = done.recv() => d.handle(ev),
            Some(st) = statuses.recv() => d.handle(Event::Status(st)),
            Some(report) = peer_reports.recv() => d.execute(Effect::Send(wire::NodeMessage {
                msg: Some(wire::node_message::Msg::PeerPath(report)),
            })),
            () = tokio::time::sleep_until(d.renewal.due()) => {
                if d.conn.is_none() && d.renewal.expired() {
                    // Away past expiry: every handshake is refused; renew with the key.
                    d.renewal.postpone(OFFLINE_RENEW_RETRY);
                    if let Some(files) = cfg.identity.clone() {
                        let (tls, tx) = (d.renewal.tls().clone(), renewed_tx.clone());
                        let (conductor, settings) = (cfg.conductor_addr.clone(), cfg.transport.clone());
                        tasks.spawn(async move {
                            match super::join::renew_expired(&files, &tls, &conductor, &settings).await {
                                Ok(t) => {
                                    let _ = tx.send(t).await;
                                }
                                Err(e) => tracing::warn!(error = %format!("{e:#}"), "could not renew the expired certificate"),
                            }
                        });
                    }
                } else if let Some(m) = d.renewal.request() {
                    // Not connected: the request is dropped and asked again later.
                    d.execute(Effect::Send(m));
                }
            }
            Some(tls) = renewed_offline.recv() => d.renewal.adopt(tls),
        }
        // Take the status changes that are ready too, then send them once.
        for _ in 0..STATUS_BATCH {
            match statuses.try_recv() {
                Ok(st) => d.handle(Event::Status(st)),
                Err(_) => break,
            }
        }
        d.flush();
    }
    if cfg.keep_workloads.load(Ordering::SeqCst) && fatal.is_none() {
        tracing::info!("node exiting for an upgrade: workloads keep running under their keepers");
        sup.detach().await;
    } else {
        tracing::info!("node shutting down: stopping workloads");
        sup.shutdown().await;
    }
    d.jobs.close();
    let _ = tokio::time::timeout(BACKGROUND_GRACE, d.jobs.wait()).await;
    // Dropping the driver ends the connection's tasks and lets the writer finish.
    drop(d);
    if tokio::time::timeout(BACKGROUND_GRACE, writer)
        .await
        .is_err()
    {
        tracing::warn!("the last local state write did not finish in time");
    }
    conn_task.abort();
    tasks.shutdown().await;
    match fatal {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// Saves the newest local state it is given, off the async workers; one write at a time, so
/// a slow disk coalesces writes instead of queueing them. A failed write (a full or read-only
/// disk) is a node problem, sent with every heartbeat until a write succeeds: it is tried
/// again with backoff (or at once with a newer state). Ends once the sender is gone and the
/// last state is written (or failed once more).
async fn write_state(
    store: Arc<dyn StateStore>,
    mut next: watch::Receiver<Option<Arc<Vec<Arc<Held>>>>>,
    problems: watch::Sender<Vec<String>>,
) {
    let mut failed: Option<Arc<Vec<Arc<Held>>>> = None;
    let mut retry_in = STATE_RETRY_FIRST;
    loop {
        let open = match &failed {
            None => next.changed().await.is_ok(),
            Some(_) => tokio::select! {
                r = next.changed() => r.is_ok(),
                () = tokio::time::sleep(retry_in) => true,
            },
        };
        let newest = next.borrow_and_update().clone();
        let Some(held) = newest.or_else(|| failed.take()) else {
            if open {
                continue;
            }
            return;
        };
        let saving = store.clone();
        let write = held.clone();
        let result = match tokio::task::spawn_blocking(move || saving.save(&write)).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(format!(
                "the writer thread failed: {e}"
            ))),
        };
        match result {
            Ok(()) => {
                if failed.take().is_some() {
                    tracing::info!("local state written again");
                }
                retry_in = STATE_RETRY_FIRST;
                problems.send_if_modified(|p| {
                    let had = !p.is_empty();
                    p.clear();
                    had
                });
            }
            Err(e) => {
                let line = format!(
                    "local state not written to {}: {e} (trying again; a restart now would forget what this node holds)",
                    store.describe()
                );
                if failed.is_none() {
                    tracing::warn!(error = %e, "could not write local state; trying again");
                }
                failed = Some(held);
                retry_in = (retry_in * 2).min(STATE_RETRY_MAX);
                problems.send_if_modified(|p| {
                    if p.len() == 1 && p[0] == line {
                        return false;
                    }
                    *p = vec![line];
                    true
                });
            }
        }
        if !open {
            return;
        }
    }
}

/// The first and the longest wait before a failed local state write is tried again.
const STATE_RETRY_FIRST: Duration = Duration::from_millis(500);
const STATE_RETRY_MAX: Duration = Duration::from_secs(30);

/// An exclusive lock on `<work_dir>/agent.lock`, held while the agent runs (the kernel drops
/// it when the process ends, however it ends). Keepers do not inherit it (close-on-exec).
fn lock_work_dir(work_dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = work_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            anyhow::anyhow!(
                "another node agent already runs with work dir {} ({} is locked)",
                work_dir.display(),
                path.display()
            )
        } else {
            anyhow::anyhow!("cannot lock {}: {e}", path.display())
        }
    })
}

fn check_identity(cfg: &NodeConfig) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cfg.tls.cert_pem.as_bytes())
        .context("node certificate is not valid PEM")?;
    let id = symphony_net::pki::node_id_from_cert(&der)
        .context("node certificate carries no node identity")?;
    if id != cfg.node_id {
        anyhow::bail!(
            "node.node_id is {:?} but the certificate was issued for {:?}; issue a certificate for this node (symphony cert node {})",
            cfg.node_id,
            id,
            cfg.node_id
        );
    }
    Ok(())
}

/// Closes a session we gave up on, but never overwrites the peer's reason (the client's
/// reconnect decision reads it).
fn close_unless_closed(session: &Session, code: CloseCode, reason: &str) {
    if !session.is_closed() {
        session.close(code, reason);
    }
}

/// What a connection's reader tells the driver.
enum Input {
    /// A command read on connection `epoch`.
    Command(u64, wire::conductor_message::Msg),
    /// Connection `epoch` is gone.
    Lost(u64),
}

/// Owns the core and everything its effects act on.
struct Driver {
    core: NodeCore,
    sup: Supervisor,
    envs: Arc<Envs>,
    heartbeat: Duration,
    usage: watch::Receiver<Option<UsageSample>>,
    /// What the node cannot do right now, sent with every heartbeat.
    problems: watch::Receiver<Vec<String>>,
    conn: Option<Conn>,
    /// Counts connections, so a late word from an old one is not taken for the current one.
    epoch: u64,
    inputs: mpsc::Sender<Input>,
    /// Background jobs (stopping removed deployments, env work): they outlive a connection
    /// and report back on `done`.
    jobs: TaskTracker,
    done: mpsc::UnboundedSender<Event>,
    /// The newest local state, for the writer task.
    state: watch::Sender<Option<Arc<Vec<Arc<Held>>>>>,
    dropped_seen: u64,
    /// Events that effects gave rise to, fed to the core after the current effect list.
    later: VecDeque<Event>,
    /// Mesh listeners and the binder side of tunnels.
    tunnels: super::tunnels::Tunnels,
    /// Direct connections with other nodes.
    peers: super::peers::Peers,
    /// Where this node serves mesh services (see [`NodeConfig::service_ip`]).
    service_ip: std::net::IpAddr,
    /// The node certificate's live renewal.
    renewal: super::renew::Renewal,
}

/// The current connection: its outgoing queue, tasks and log shipper (all end with it).
struct Conn {
    epoch: u64,
    session: Session,
    tx: mpsc::Sender<wire::NodeMessage>,
    /// Commands to the connection's log shipper.
    ship: mpsc::UnboundedSender<ShipCmd>,
    /// Its writer, reader, pacer, heartbeats and shipper: dropped (aborted) with it.
    _tasks: JoinSet<()>,
}

/// Points the `SYMPH_*_HOST` / `_ADDR` variables at the address this node serves mesh
/// services on, when that is not the usual `127.0.0.1` (several agents on one host), so the
/// programs read the right place unchanged.
fn localize_service_env(env: &mut std::collections::HashMap<String, String>, ip: std::net::IpAddr) {
    let usual = crate::spec::SERVICE_HOST;
    if ip.to_string() == usual {
        return;
    }
    for (k, v) in env.iter_mut() {
        if k.ends_with("_HOST") && v == usual {
            *v = ip.to_string();
        } else if k.ends_with("_ADDR")
            && let Some(Ok(port)) = v
                .strip_prefix(usual)
                .and_then(|r| r.strip_prefix(':'))
                .map(str::parse::<u16>)
        {
            *v = std::net::SocketAddr::new(ip, port).to_string();
        }
    }
}

impl Driver {
    /// Feeds an event to the core and carries out its effects; events that effects give
    /// rise to are fed after the whole list (so the core's effects never interleave).
    fn handle(&mut self, event: Event) {
        let mut next = Some(event);
        while let Some(event) = next.take().or_else(|| self.later.pop_front()) {
            for effect in self.core.handle(event) {
                self.execute(effect);
            }
        }
    }

    fn input(&mut self, input: Input) {
        let current = self.conn.as_ref().map(|c| c.epoch);
        match input {
            Input::Command(epoch, wire::conductor_message::Msg::Renewed(r))
                if current == Some(epoch) =>
            {
                self.renewal.answer(r);
            }
            Input::Command(epoch, mut msg) if current == Some(epoch) => {
                if let wire::conductor_message::Msg::Assign(a) = &mut msg {
                    localize_service_env(&mut a.service_env, self.service_ip);
                }
                self.handle(Event::Command(msg));
            }
            Input::Lost(epoch) if current == Some(epoch) => self.disconnected(),
            Input::Command(..) | Input::Lost(_) => {}
        }
    }

    /// Sends the statuses changed since the last flush (everything, if the supervisor had to
    /// drop events).
    fn flush(&mut self) {
        let dropped = self.sup.dropped_events();
        if dropped != self.dropped_seen {
            self.dropped_seen = dropped;
            self.handle(Event::Resync(self.sup.status()));
        }
        if let Some(effect) = self.core.flush() {
            self.execute(effect);
        }
    }

    fn execute(&mut self, effect: Effect) {
        match effect {
            Effect::Routes(r) => {
                self.tunnels.set_routes(r.routes);
                self.peers.set_allowed(r.peers);
            }
            Effect::Punch(p) => self.peers.punch(p),
            Effect::Send(msg) => {
                let Some(conn) = &self.conn else { return };
                if let Err(mpsc::error::TrySendError::Full(_)) = conn.tx.try_send(msg) {
                    tracing::warn!(
                        "the conductor does not read this node's messages; reconnecting"
                    );
                    close_unless_closed(&conn.session, CloseCode::ProtocolError, "send queue full");
                }
            }
            Effect::Apply {
                id,
                generation,
                running,
                spec,
            } => {
                if let Err(e) = self.sup.apply(&id, generation.get(), running, spec) {
                    tracing::warn!(%id, %generation, error = %e, "could not apply");
                }
            }
            Effect::Remove(id) => {
                let (sup, done) = (self.sup.clone(), self.done.clone());
                self.jobs.spawn(async move {
                    sup.remove(&id).await;
                    let _ = done.send(Event::Removed(id));
                });
            }
            Effect::Ship { id, resume, offset } => self.ship(id, resume, offset),
            Effect::StopShip(id) => {
                if let Some(conn) = &self.conn {
                    let _ = conn.ship.send(ShipCmd::Stop(id.into_string()));
                }
            }
            Effect::Persist(held) => {
                self.state.send_replace(Some(Arc::new(held)));
            }
            Effect::Env(job) => {
                let (envs, done) = (self.envs.clone(), self.done.clone());
                self.jobs.spawn(async move {
                    let outcome = env_job(&envs, job).await;
                    let _ = done.send(Event::EnvDone(outcome));
                });
            }
        }
    }

    fn ship(&mut self, id: DeploymentId, resume: u64, mut offset: u64) {
        let Some(conn) = &self.conn else {
            return;
        };
        let Some(buffer) = self.sup.logs(&id) else {
            return;
        };
        // The conductor never holds more than was shipped, unless this node lost lines it had
        // numbered (see `Event::LogsBehind`): then new lines must number above `resume`.
        let local_last = buffer.last_seq();
        if resume > offset + local_last {
            offset = resume - local_last;
            tracing::warn!(%id, resume, local_last, "the conductor holds lines this node's spool lost; numbering new lines above them");
            self.later.push_back(Event::LogsBehind {
                id: id.clone(),
                offset,
            });
        }
        let _ = conn.ship.send(ShipCmd::Start {
            id: id.into_string(),
            buffer,
            resume,
            offset,
        });
    }

    /// A new connection: its writer, reader, pacer and heartbeat tasks, then the Hello.
    fn connected(&mut self, session: Session, control: Control) {
        if self.conn.is_some() {
            self.disconnected();
        }
        self.epoch += 1;
        let epoch = self.epoch;
        let (tx, rx) = mpsc::channel::<wire::NodeMessage>(SEND_QUEUE);
        let pacer = Pacer::new(session.connection().clone(), PacerConfig::default());
        let mut tasks = JoinSet::new();
        tasks.spawn(pacer.clone().run());
        tasks.spawn(write_control(control.tx, rx, session.clone()));
        tasks.spawn(read_control(
            control.rx,
            self.inputs.clone(),
            epoch,
            session.clone(),
        ));
        tasks.spawn(send_heartbeats(
            session.clone(),
            self.usage.clone(),
            self.problems.clone(),
            self.heartbeat,
        ));
        if let Some(serve) = self
            .tunnels
            .connected(Some((session.clone(), pacer.clone())))
        {
            tasks.spawn(serve);
        }
        let (ship, cmds) = mpsc::unbounded_channel();
        tasks.spawn(
            Shipper {
                session: session.clone(),
                pacer,
                cmds,
            }
            .run(),
        );
        self.conn = Some(Conn {
            epoch,
            session,
            tx,
            ship,
            _tasks: tasks,
        });
        self.handle(Event::Connected {
            statuses: self.sup.status(),
        });
    }

    /// The current connection is gone: its tasks and shipper end with it.
    fn disconnected(&mut self) {
        // Dropping the JoinSet aborts the connection's tasks.
        drop(self.conn.take());
        let _ = self.tunnels.connected(None);
        self.handle(Event::Disconnected);
    }
}

/// Writes queued messages on the control stream; any failure closes the connection so the
/// client re-dials (and resyncs).
async fn write_control(
    mut ctl: symphony_net::FrameSender,
    mut rx: mpsc::Receiver<wire::NodeMessage>,
    session: Session,
) {
    while let Some(m) = rx.recv().await {
        if let Err(e) = ctl.send(&m).await {
            tracing::warn!(error = %e, "control write failed; reconnecting");
            close_unless_closed(&session, CloseCode::ProtocolError, "control write failed");
            return;
        }
    }
}

/// Reads commands until the control stream ends, then says the connection is lost.
async fn read_control(
    mut rx: FrameReceiver,
    inputs: mpsc::Sender<Input>,
    epoch: u64,
    session: Session,
) {
    loop {
        match rx.recv::<wire::ConductorMessage>().await {
            Ok(Some(wire::ConductorMessage { msg: Some(m) })) => {
                if inputs.send(Input::Command(epoch, m)).await.is_err() {
                    return;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                close_unless_closed(&session, CloseCode::ProtocolError, "control stream ended");
                break;
            }
            Err(FrameError::TooLarge { len, max }) => {
                tracing::warn!(len, max, "command frame too large");
                close_unless_closed(
                    &session,
                    CloseCode::FrameTooLarge,
                    "command frame too large",
                );
                break;
            }
            Err(e) => {
                tracing::info!(error = %e, "control stream failed");
                close_unless_closed(&session, CloseCode::ProtocolError, "control stream failed");
                break;
            }
        }
    }
    let _ = inputs.send(Input::Lost(epoch)).await;
}

/// Usage heartbeats on their own stream (never behind log bytes), one per new sample or change
/// of the node's problems, or the last one again after two periods without.
async fn send_heartbeats(
    session: Session,
    mut usage: watch::Receiver<Option<UsageSample>>,
    mut problems: watch::Receiver<Vec<String>>,
    period: Duration,
) {
    let Ok(mut hb) = session.open_uni(StreamKind::Heartbeat).await else {
        return;
    };
    let mut seq = 0;
    loop {
        // Both marked seen every time round (a change of either wakes the loop once).
        let now_problems = problems.borrow_and_update().clone();
        let msg = usage
            .borrow_and_update()
            .as_ref()
            .map(|s| heartbeat_wire(seq + 1, s, &now_problems));
        if let Some(msg) = msg {
            seq += 1;
            if hb.send(&msg).await.is_err() {
                return;
            }
        }
        tokio::select! {
            r = usage.changed() => if r.is_err() { return },
            r = problems.changed() => if r.is_err() { return },
            () = tokio::time::sleep(period * 2) => {}
        }
    }
}

/// Runs one env job.
async fn env_job(envs: &Envs, job: EnvJob) -> EnvOutcome {
    match job {
        EnvJob::Ensure(def) => {
            let result = envs.ensure(&def).await;
            if let Err(err) = &result {
                tracing::warn!(env = %def.name, error = %err, "env provisioning failed");
            }
            EnvOutcome::Ensured {
                kind: def.manager,
                name: def.name,
                result,
            }
        }
        EnvJob::ListCreated => EnvOutcome::Created(envs.created().await),
        EnvJob::Remove(kind, name) => {
            // The core checked, when it started this job, that the env is unwanted and
            // unused; env jobs run one at a time, so no ensure of it runs meanwhile.
            let result = envs.remove(kind, &name, || true).await;
            if let Err(err) = &result {
                tracing::warn!(env = %name, error = %err, "env removal failed");
            }
            EnvOutcome::Removed { kind, name, result }
        }
        EnvJob::Report => EnvOutcome::Listed {
            names: envs.list_all_envs().await,
            created: envs.created().await,
        },
    }
}

/// The process group of `pid` (`None` once it is gone).
fn group_of(pid: u32) -> Option<u32> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    nix::unistd::getpgid(Some(pid))
        .ok()
        .and_then(|g| u32::try_from(g.as_raw()).ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn service_variables_point_at_the_node_service_address() {
        let env = |pairs: &[(&str, &str)]| -> std::collections::HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let given = env(&[
            ("SYMPH_DB_HOST", "127.0.0.1"),
            ("SYMPH_DB_PORT", "7000"),
            ("SYMPH_DB_ADDR", "127.0.0.1:7000"),
            ("SYMPH_ODD_ADDR", "127.0.0.1:x"),
        ]);
        let mut same = given.clone();
        localize_service_env(&mut same, std::net::Ipv4Addr::LOCALHOST.into());
        assert_eq!(same, given);
        let mut moved = given.clone();
        localize_service_env(&mut moved, std::net::Ipv4Addr::new(127, 0, 0, 3).into());
        assert_eq!(
            moved,
            env(&[
                ("SYMPH_DB_HOST", "127.0.0.3"),
                ("SYMPH_DB_PORT", "7000"),
                ("SYMPH_DB_ADDR", "127.0.0.3:7000"),
                ("SYMPH_ODD_ADDR", "127.0.0.1:x"),
            ])
        );
    }
}
