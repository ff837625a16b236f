//! The node agent: the connection to the conductor.
//!
//! It dials out (`symphony-net` client, re-dialling forever), sends Hello with its full
//! inventory after every fresh connection, applies commands by generation through the
//! supervisor, pushes status changes as they happen (latest state per deployment, coalesced),
//! ships logs on low-priority streams (see `ship`), and sends a usage heartbeat about once a
//! second. Processes keep running while the conductor is unreachable or refuses the node. A bad
//! command fails that deployment with a reason; it never closes the connection.
//!
//! Slow work never runs in the command loop: stopping a removed deployment and provisioning
//! envs run as background tasks that outlive a connection.
//!
//! After a node restart, deployments from local state are reported in Hello but started only
//! when the conductor confirms them (a re-sent `Assign`): if it moved them elsewhere meanwhile,
//! they are dropped instead, so a restart never makes a second copy.

mod convert;
mod prepare;
mod ship;

pub use convert::state_name;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use symphony_net::{
    Client, ClientConfig, ClientEvent, CloseCode, Control, FrameError, Pacer, PacerConfig, Session,
    StreamKind, TlsMaterial, TransportSettings,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::convert::{heartbeat_wire, result_msg, static_wire, status_msg, to_wire};
use self::prepare::AgentPrepare;
use self::ship::Shipper;
use super::envs::{self, EnvDefinition, Envs, ManagerKind};
use super::monitor::{Monitor, UsageSample};
use super::state::{Held, LocalState};
use super::supervisor::{ApplyOutcome, Hooks, Supervisor, SupervisorConfig};
use crate::spec::DeploymentSpec;
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
        })
    }
}

/// How long shutdown waits for background work (stops of removed deployments).
const BACKGROUND_GRACE: Duration = Duration::from_secs(30);

/// Runs the node until `cancel`; then stops every workload and closes the connection.
pub async fn run(mut cfg: NodeConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    check_identity(&cfg)?;
    // Absolute from here on: tools run with other working directories (uv, git, workloads).
    cfg.work_dir = std::path::absolute(&cfg.work_dir)
        .with_context(|| format!("work dir {}", cfg.work_dir.display()))?;
    std::fs::create_dir_all(&cfg.work_dir)
        .with_context(|| format!("creating work dir {}", cfg.work_dir.display()))?;
    let state = LocalState::new(cfg.work_dir.join("state.bin"));
    let held = state.load().context("reading local state")?;

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
    let node_env: BTreeMap<String, String> = std::env::vars().collect();
    let (sup, mut events) =
        Supervisor::with_hooks(SupervisorConfig::new(cfg.work_dir.clone(), node_env), hooks);
    tracing::info!(held = held.len(), node_id = %cfg.node_id, "node agent started");

    let mut monitor = Monitor::new();
    let static_info = monitor.static_info();
    let (usage_tx, usage_rx) = watch::channel::<Option<UsageSample>>(None);
    let agent = Arc::new(Agent {
        cfg: cfg.clone(),
        sup: sup.clone(),
        state,
        envs,
        env_names: Mutex::new(env_names),
        static_info,
        usage: usage_rx,
        invalid: Mutex::new(HashMap::new()),
        log_offsets: Mutex::new(held.iter().map(|h| (h.id.clone(), h.log_offset)).collect()),
        pending: Mutex::new(held.into_iter().map(|h| (h.id.clone(), h)).collect()),
        dirty: Mutex::new(HashMap::new()),
        dirty_notify: Notify::new(),
        current: Mutex::new(None),
        shipping: Mutex::new(HashMap::new()),
        removing: Mutex::new(HashMap::new()),
        conn: Mutex::new(None),
        env_wanted: Mutex::new(BTreeSet::new()),
        envs_kept: std::sync::atomic::AtomicBool::new(false),
        stopping_envs: Mutex::new(HashMap::new()),
        env_set_seen: std::sync::atomic::AtomicBool::new(false),
        env_problems: Mutex::new(BTreeMap::new()),
        env_report: tokio::sync::Mutex::new(()),
        background: TaskTracker::new(),
        instance_id: uuid::Uuid::new_v4().simple().to_string(),
    });

    let mut tasks = JoinSet::new();
    // Usage sampling, about once per heartbeat period, off the async workers.
    {
        let (period, cancel) = (cfg.heartbeat, cancel.clone());
        tasks.spawn(async move {
            let monitor = Arc::new(Mutex::new(monitor));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let m = monitor.clone();
                let sample =
                    tokio::task::spawn_blocking(move || m.lock().ok().map(|mut m| m.sample()))
                        .await;
                if let Ok(Some(s)) = sample {
                    usage_tx.send_replace(Some(s));
                }
            }
        });
    }
    // Status changes: latest per deployment, sent by the current connection.
    {
        let agent = agent.clone();
        tasks.spawn(async move {
            while let Some(st) = events.recv().await {
                let wire = to_wire(&st, agent.log_offset(&st.id));
                agent.mark_dirty(st.id, Some(wire));
            }
        });
    }

    let mut ccfg = ClientConfig::new(cfg.conductor_addr.clone(), cfg.tls.clone());
    ccfg.server_name = cfg.server_name.clone();
    ccfg.settings = cfg.transport.clone();
    let client = Arc::new(Client::new(ccfg).context("creating the QUIC endpoint")?);
    let (mut conns, conn_task) = client.clone().run(cancel.child_token());
    let mut fatal = None;
    loop {
        let ev = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            ev = conns.recv() => ev,
        };
        match ev {
            Some(ClientEvent::Connected { session, control }) => {
                agent
                    .clone()
                    .connection(session, control, cancel.child_token())
                    .await;
            }
            Some(ClientEvent::Refused(code, why)) => {
                tracing::error!(%code, %why, "the conductor refused this node; workloads keep running, retrying slowly");
            }
            Some(ClientEvent::Fatal(code, why)) => {
                tracing::error!(%code, %why, "another process took over this node's identity; stopping");
                fatal = Some(format!(
                    "the conductor closed the connection: {code} ({why})"
                ));
                break;
            }
            None => break,
        }
    }
    tracing::info!("node shutting down: stopping workloads");
    sup.shutdown().await;
    agent.background.close();
    let _ = tokio::time::timeout(BACKGROUND_GRACE, agent.background.wait()).await;
    conn_task.abort();
    tasks.shutdown().await;
    match fatal {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
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

struct Agent {
    cfg: NodeConfig,
    sup: Supervisor,
    state: LocalState,
    envs: Arc<Envs>,
    /// Env names as last listed (Hello must not wait for `conda env list`).
    env_names: Mutex<Vec<String>>,
    static_info: super::monitor::StaticResources,
    usage: watch::Receiver<Option<UsageSample>>,
    /// Deployments whose spec could not be parsed here: reported FAILED with the reason.
    invalid: Mutex<HashMap<String, wire::DeploymentStatus>>,
    /// Per deployment: added to local log sequence numbers on the wire. Set from the
    /// conductor's `log_seq_floor` when this node starts holding a deployment, so numbering
    /// continues above what the conductor already has (another node, or a removed copy).
    log_offsets: Mutex<HashMap<String, u64>>,
    /// Restored from local state, reported in Hello, started only once the conductor confirms.
    pending: Mutex<HashMap<String, Held>>,
    /// Latest unsent status per deployment (`None` = removed).
    dirty: Mutex<HashMap<String, Option<wire::DeploymentStatus>>>,
    dirty_notify: Notify,
    /// The current connection's outgoing queue, if connected.
    current: Mutex<Option<mpsc::Sender<wire::NodeMessage>>>,
    /// Per deployment: cancels its log shipper when it leaves this node.
    shipping: Mutex<HashMap<String, CancellationToken>>,
    /// Deployments being stopped in the background, with Assigns that arrived meanwhile
    /// (applied, newest first, once the old copy is gone: one id, one process table slot).
    removing: Mutex<HashMap<String, Vec<wire::Assign>>>,
    /// The current connection, for work that finishes in the background.
    conn: Mutex<Option<Arc<Conn>>>,
    /// The envs the conductor defines, as of the newest `EnvEnsure` received (updated in the
    /// command loop, so a removal that runs late still sees a re-created env as wanted).
    env_wanted: Mutex<BTreeSet<(ManagerKind, String)>>,
    /// Set when a removal pass kept an unwanted env because a deployment here used it: the
    /// next deployment removal runs the pass again.
    envs_kept: std::sync::atomic::AtomicBool,
    /// The env of each deployment being stopped in the background (the supervisor forgets a
    /// deployment when its stop begins; its process still runs in the env until it ends).
    stopping_envs: Mutex<HashMap<String, String>>,
    /// Set once a complete env set arrived: from then on, envs created here that it lacks are
    /// left out of reports (they are on their way out, nothing new may be placed on them).
    env_set_seen: std::sync::atomic::AtomicBool,
    /// The current problem of each env (a failed create or removal, kept while in use),
    /// reported until it is resolved.
    env_problems: Mutex<BTreeMap<String, String>>,
    /// One env report at a time, so they reach the conductor in the order they were listed.
    env_report: tokio::sync::Mutex<()>,
    /// Work that must outlive a connection (stopping removed deployments, env provisioning).
    background: TaskTracker,
    /// Random per agent process: tells the conductor a restart from a reconnect.
    instance_id: String,
}

/// What the current connection's command loop shares with its tasks.
struct Conn {
    session: Session,
    tx: mpsc::Sender<wire::NodeMessage>,
    pacer: Pacer,
    /// Set by `LogResume`: the conductor's last sequence per deployment.
    resume: Mutex<Option<HashMap<String, u64>>>,
    tasks: Mutex<JoinSet<()>>,
}

impl Agent {
    fn log_offset(&self, id: &str) -> u64 {
        self.log_offsets
            .lock()
            .ok()
            .and_then(|o| o.get(id).copied())
            .unwrap_or(0)
    }

    fn mark_dirty(&self, id: String, status: Option<wire::DeploymentStatus>) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(id, status);
        }
        self.dirty_notify.notify_one();
    }

    fn inventory(&self) -> Vec<wire::DeploymentStatus> {
        let mut inv: Vec<wire::DeploymentStatus> = self
            .sup
            .status()
            .iter()
            .map(|s| to_wire(s, self.log_offset(&s.id)))
            .collect();
        if let Ok(bad) = self.invalid.lock() {
            inv.extend(bad.values().cloned());
        }
        if let Ok(pending) = self.pending.lock() {
            inv.extend(pending.values().map(|h| wire::DeploymentStatus {
                deployment_id: h.id.clone(),
                generation: h.generation,
                state: "STOPPED".into(),
                reason: "restored from local state; waiting for the conductor".into(),
                last_log_seq: self.log_offset(&h.id),
                ..Default::default()
            }));
        }
        inv
    }

    fn persist(&self) {
        let mut held: Vec<Held> = self
            .sup
            .snapshot()
            .into_iter()
            .map(|(id, generation, desired_running, spec)| {
                let log_offset = self.log_offset(&id);
                Held {
                    id,
                    generation,
                    desired_running,
                    spec,
                    log_offset,
                }
            })
            .collect();
        if let Ok(p) = self.pending.lock() {
            held.extend(p.values().cloned());
        }
        if let Err(e) = self.state.save(&held) {
            tracing::warn!(error = %e, "could not write local state");
        }
    }

    async fn connection(
        self: Arc<Self>,
        session: Session,
        mut control: Control,
        cancel: CancellationToken,
    ) {
        // Everything up to now is in the inventory; later changes queue as dirty.
        if let Ok(mut d) = self.dirty.lock() {
            d.clear();
        }
        let env_names = self.env_names.lock().map(|e| e.clone()).unwrap_or_default();
        let hello = wire::Hello {
            protocol_version: wire::ProtocolVersion::Current as u32,
            node_id: self.cfg.node_id.clone(),
            groups: self.cfg.groups.clone(),
            capacities_total: self.cfg.capacities_total.clone().into_iter().collect(),
            resources: Some(static_wire(&self.static_info)),
            inventory: self.inventory(),
            env_names,
            agent_instance_id: self.instance_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let msg = wire::NodeMessage {
            msg: Some(wire::node_message::Msg::Hello(hello)),
        };
        if control.tx.send(&msg).await.is_err() {
            session.close(CloseCode::ProtocolError, "could not send hello");
            return;
        }
        let (tx, mut rx) = mpsc::channel::<wire::NodeMessage>(4096);
        if let Ok(mut c) = self.current.lock() {
            *c = Some(tx.clone());
        }
        let pacer = Pacer::new(session.connection().clone(), PacerConfig::default());
        let conn = Arc::new(Conn {
            session: session.clone(),
            tx: tx.clone(),
            pacer: pacer.clone(),
            resume: Mutex::new(None),
            tasks: Mutex::new(JoinSet::new()),
        });
        if let Ok(mut c) = self.conn.lock() {
            *c = Some(conn.clone());
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(pacer.run());
        // Writer: any failure closes the connection so the client re-dials (and resyncs).
        {
            let (mut ctl_tx, session) = (control.tx, session.clone());
            tasks.spawn(async move {
                while let Some(m) = rx.recv().await {
                    if let Err(e) = ctl_tx.send(&m).await {
                        tracing::warn!(error = %e, "control write failed; reconnecting");
                        close_unless_closed(
                            &session,
                            CloseCode::ProtocolError,
                            "control write failed",
                        );
                        return;
                    }
                }
            });
        }
        // Status pusher: coalesced, latest state per deployment.
        {
            let (agent, tx) = (self.clone(), tx.clone());
            tasks.spawn(async move {
                let mut dropped_seen = agent.sup.dropped_events();
                loop {
                    agent.dirty_notify.notified().await;
                    if agent.sup.dropped_events() != dropped_seen {
                        // The supervisor dropped events: resend everything it holds.
                        dropped_seen = agent.sup.dropped_events();
                        for st in agent.sup.status() {
                            let w = to_wire(&st, agent.log_offset(&st.id));
                            if let Ok(mut d) = agent.dirty.lock() {
                                d.insert(st.id, Some(w));
                            }
                        }
                    }
                    let batch: Vec<(String, Option<wire::DeploymentStatus>)> = agent
                        .dirty
                        .lock()
                        .map(|mut d| d.drain().collect())
                        .unwrap_or_default();
                    if batch.is_empty() {
                        continue;
                    }
                    let (mut up, mut removed) = (Vec::new(), Vec::new());
                    for (id, st) in batch {
                        match st {
                            Some(st) => up.push(st),
                            None => removed.push(id),
                        }
                    }
                    if tx.send(status_msg(up, removed)).await.is_err() {
                        return;
                    }
                }
            });
        }
        // Heartbeats on their own stream (never behind log bytes).
        {
            let (session, mut usage, period) =
                (session.clone(), self.usage.clone(), self.cfg.heartbeat);
            tasks.spawn(async move {
                let Ok(mut hb) = session.open_uni(StreamKind::Heartbeat).await else {
                    return;
                };
                let mut seq = 0;
                loop {
                    let msg = usage
                        .borrow_and_update()
                        .as_ref()
                        .map(|s| heartbeat_wire(seq + 1, s));
                    if let Some(msg) = msg {
                        seq += 1;
                        if hb.send(&msg).await.is_err() {
                            return;
                        }
                    }
                    tokio::select! {
                        r = usage.changed() => if r.is_err() { return },
                        () = tokio::time::sleep(period * 2) => {}
                    }
                }
            });
        }
        let mut rx_ctl = control.rx;
        loop {
            let msg = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                m = rx_ctl.recv::<wire::ConductorMessage>() => m,
            };
            match msg {
                Ok(Some(wire::ConductorMessage { msg: Some(m) })) => self.handle(m, &conn).await,
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
                    close_unless_closed(
                        &session,
                        CloseCode::ProtocolError,
                        "control stream failed",
                    );
                    break;
                }
            }
        }
        if let Ok(mut c) = self.current.lock() {
            *c = None;
        }
        if let Ok(mut c) = self.conn.lock() {
            *c = None;
        }
        // This connection's shippers end with it; the next connection starts new ones.
        if let Ok(mut s) = self.shipping.lock() {
            for (_, c) in s.drain() {
                c.cancel();
            }
        }
        let shippers = conn
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        let mut shippers = shippers;
        shippers.shutdown().await;
        tasks.shutdown().await;
    }

    async fn handle(self: &Arc<Self>, msg: wire::conductor_message::Msg, conn: &Arc<Conn>) {
        use wire::conductor_message::Msg;
        match msg {
            Msg::HelloAck(ack) => {
                tracing::info!(epoch = ack.session_epoch, "registered with the conductor");
            }
            Msg::LogResume(resume) => {
                if let Ok(mut r) = conn.resume.lock() {
                    *r = Some(resume.last_seq.into_iter().collect());
                }
                for st in self.sup.status() {
                    self.ship(&st.id, conn);
                }
            }
            Msg::Assign(a) => {
                let deferred = self
                    .removing
                    .lock()
                    .ok()
                    .and_then(|mut r| r.get_mut(&a.deployment_id).map(|d| d.push(a.clone())))
                    .is_some();
                if deferred {
                    let msg = "applied once the previous copy has stopped".to_owned();
                    let _ = conn.tx.send(result_msg(a.command_id, true, msg)).await;
                    return;
                }
                let (ok, message) = match self.assign(&a) {
                    Ok(()) => {
                        self.ship(&a.deployment_id, conn);
                        (true, String::new())
                    }
                    Err(e) => (false, e),
                };
                let _ = conn.tx.send(result_msg(a.command_id, ok, message)).await;
            }
            Msg::Unassign(u) => {
                self.unassign(&u);
                let _ = conn
                    .tx
                    .send(result_msg(u.command_id, true, String::new()))
                    .await;
            }
            Msg::EnvEnsure(e) => {
                if let Ok(mut wanted) = self.env_wanted.lock() {
                    if e.complete {
                        wanted.clear();
                        self.env_set_seen
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    wanted.extend(
                        e.envs
                            .iter()
                            .map(|spec| (manager_of(spec), spec.name.clone())),
                    );
                }
                // Provisioning can take minutes: never in the command loop, never cut short
                // by a reconnect.
                let agent = self.clone();
                self.background
                    .spawn(async move { agent.ensure_envs(e).await });
            }
        }
    }

    fn assign(self: &Arc<Self>, a: &wire::Assign) -> Result<(), String> {
        let id = a.deployment_id.as_str();
        let parsed = serde_json::from_str::<serde_json::Value>(&a.specification_json)
            .map_err(|e| format!("specification is not JSON: {e}"))
            .and_then(|v| {
                crate::spec::parse(&v).map_err(|errs| {
                    errs.iter()
                        .map(|e| format!("{}: {}", e.loc.join("."), e.msg))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
            });
        let spec: DeploymentSpec = match parsed {
            Ok(s) => s,
            Err(reason) => {
                // This node cannot run what is asked: report FAILED at the new generation and
                // stop whatever older generation it still runs.
                let st = wire::DeploymentStatus {
                    deployment_id: id.to_owned(),
                    generation: a.generation,
                    state: "FAILED".into(),
                    reason: format!("invalid spec: {reason}"),
                    ..Default::default()
                };
                if let Ok(mut bad) = self.invalid.lock() {
                    bad.insert(id.to_owned(), st.clone());
                }
                if self.sup.status_of(id).is_some() {
                    self.remove_in_background(id.to_owned(), false);
                }
                self.mark_dirty(id.to_owned(), Some(st));
                return Err(reason);
            }
        };
        if let Ok(mut bad) = self.invalid.lock() {
            bad.remove(id);
        }
        let restored = self
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(id))
            .is_some();
        if !restored
            && self.sup.status_of(id).is_none()
            && let Ok(mut o) = self.log_offsets.lock()
        {
            o.insert(id.to_owned(), a.log_seq_floor);
        }
        let outcome = self
            .sup
            .apply(id, a.generation, a.desired_running, spec)
            .map_err(|e| e.to_string())?;
        tracing::info!(id, generation = a.generation, ?outcome, "assign applied");
        // Every reconnect re-sends each Assign: write the state file only when it changed.
        if restored || matches!(outcome, ApplyOutcome::Created | ApplyOutcome::Updated) {
            self.persist();
        }
        match outcome {
            ApplyOutcome::Stale { held } => Err(format!(
                "stale generation {} (holding {held})",
                a.generation
            )),
            _ => Ok(()),
        }
    }

    fn unassign(self: &Arc<Self>, u: &wire::Unassign) {
        let id = u.deployment_id.clone();
        // Assigns waiting on an earlier removal are cancelled by this Unassign too.
        if let Ok(mut r) = self.removing.lock()
            && let Some(deferred) = r.get_mut(&id)
        {
            deferred.retain(|a| a.generation > u.generation);
        }
        let was_pending = self
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&id))
            .is_some();
        let was_invalid = self
            .invalid
            .lock()
            .ok()
            .and_then(|mut b| b.remove(&id))
            .is_some();
        match self.sup.status_of(&id).map(|s| s.generation) {
            Some(g) if g <= u.generation => self.remove_in_background(id, true),
            Some(g) => {
                tracing::info!(%id, held = g, asked = u.generation, "ignoring unassign of an older generation");
            }
            None => {
                if was_pending || was_invalid {
                    self.persist();
                }
                self.mark_dirty(id, None);
            }
        }
    }

    /// Stops and forgets a deployment without holding up the command loop. Assigns for the
    /// same id that arrive meanwhile wait for it (see `removing`).
    fn remove_in_background(self: &Arc<Self>, id: String, report_removed: bool) {
        if let Some(c) = self.shipping.lock().ok().and_then(|mut s| s.remove(&id)) {
            c.cancel();
        }
        {
            let Ok(mut r) = self.removing.lock() else {
                return;
            };
            if r.contains_key(&id) {
                return; // already on its way out
            }
            r.insert(id.clone(), Vec::new());
        }
        let env = self
            .sup
            .env_names()
            .into_iter()
            .find_map(|(held, env)| (held == id).then_some(env));
        if let Some(env) = env
            && let Ok(mut s) = self.stopping_envs.lock()
        {
            s.insert(id.clone(), env);
        }
        let agent = self.clone();
        self.background.spawn(async move {
            agent.sup.remove(&id).await;
            if let Ok(mut o) = agent.log_offsets.lock() {
                o.remove(&id);
            }
            agent.persist();
            let deferred = agent
                .removing
                .lock()
                .ok()
                .and_then(|mut r| r.remove(&id))
                .unwrap_or_default();
            match deferred.into_iter().max_by_key(|a| a.generation) {
                Some(a) if agent.assign(&a).is_ok() => {
                    let conn = agent.conn.lock().ok().and_then(|c| c.clone());
                    if let Some(conn) = conn {
                        agent.ship(&a.deployment_id, &conn);
                    }
                }
                Some(_) => {}
                None if report_removed => agent.mark_dirty(id.clone(), None),
                None => {}
            }
            // Only now: a deferred Assign for the same id (applied above) holds its env itself.
            if let Ok(mut s) = agent.stopping_envs.lock() {
                s.remove(&id);
            }
            if agent
                .envs_kept
                .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                agent.remove_unwanted_envs().await;
                agent.report_envs().await;
            }
        });
    }

    async fn ensure_envs(self: Arc<Self>, e: wire::EnvEnsure) {
        for spec in e.envs {
            let def = EnvDefinition {
                name: spec.name.clone(),
                manager: manager_of(&spec),
                python_version: spec.python_version,
                packages: spec.packages,
                custom_script: (!spec.custom_script.is_empty()).then_some(spec.custom_script),
                force_recreate: spec.force_recreate,
            };
            let (kind, name) = (def.manager, def.name.clone());
            // Deleted meanwhile (a later message): not created again.
            if !self.env_wanted(kind, &name) {
                continue;
            }
            match self.envs.ensure(&def).await {
                Ok(()) => self.set_env_problem(&name, None),
                Err(err) => {
                    tracing::warn!(env = %name, error = %err, "env provisioning failed");
                    self.set_env_problem(&name, Some(err));
                }
            }
            // Deleted while it was being made: the removal pass may have missed it.
            if !self.env_wanted(kind, &name) {
                self.remove_env(kind, &name).await;
            }
        }
        if e.complete {
            self.remove_unwanted_envs().await;
        }
        self.report_envs().await;
    }

    fn set_env_problem(&self, name: &str, problem: Option<String>) {
        if let Ok(mut p) = self.env_problems.lock() {
            match problem {
                Some(text) if text.starts_with(&format!("env {name}")) => {
                    p.insert(name.to_owned(), text)
                }
                Some(text) => p.insert(name.to_owned(), format!("env {name}: {text}")),
                None => p.remove(name),
            };
        }
    }

    /// Lists the envs again and tells the conductor, with the current problems. Envs created
    /// here that the conductor no longer defines are left out: nothing new may use them.
    async fn report_envs(&self) {
        let _one_at_a_time = self.env_report.lock().await;
        let mut names = self.envs.list_all_envs().await;
        if self.env_set_seen.load(std::sync::atomic::Ordering::Relaxed) {
            let leaving: BTreeSet<String> = self
                .envs
                .created()
                .await
                .into_iter()
                .filter(|(kind, name)| !self.env_wanted(*kind, name))
                .map(|(_, name)| name)
                .collect();
            names.retain(|n| !leaving.contains(n));
        }
        if let Ok(mut n) = self.env_names.lock() {
            n.clone_from(&names);
        }
        let problems = self
            .env_problems
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default();
        let report = wire::EnvReport {
            env_names: names,
            problems,
        };
        let tx = self.current.lock().ok().and_then(|c| c.clone());
        if let Some(tx) = tx {
            let _ = tx
                .send(wire::NodeMessage {
                    msg: Some(wire::node_message::Msg::EnvReport(report)),
                })
                .await;
        }
    }

    fn env_wanted(&self, kind: ManagerKind, name: &str) -> bool {
        self.env_wanted
            .lock()
            .map_or(true, |w| w.contains(&(kind, name.to_owned())))
    }

    /// Env names used by the deployments held here (running, stopping, or restored), each
    /// with one deployment that uses it.
    fn envs_in_use(&self) -> BTreeMap<String, String> {
        let mut in_use: BTreeMap<String, String> = self
            .sup
            .env_names()
            .into_iter()
            .map(|(id, env)| (env, id))
            .collect();
        if let Ok(pending) = self.pending.lock() {
            for h in pending.values() {
                if let Some(env) = &h.spec.env_name {
                    in_use.insert(env.clone(), h.id.clone());
                }
            }
        }
        if let Ok(stopping) = self.stopping_envs.lock() {
            for (id, env) in stopping.iter() {
                in_use.insert(env.clone(), id.clone());
            }
        }
        in_use
    }

    /// Removes one env created here, unless (checked again under the env's lock) it is wanted
    /// again or a deployment here uses it by then.
    async fn remove_env(self: &Arc<Self>, kind: ManagerKind, name: &str) {
        let agent = self.clone();
        let unwanted = || !agent.env_wanted(kind, name) && !agent.envs_in_use().contains_key(name);
        match self.envs.remove(kind, name, unwanted).await {
            Ok(true) => self.set_env_problem(name, None),
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(env = %name, error = %err, "env removal failed");
                self.set_env_problem(name, Some(err));
            }
        }
    }

    /// Removes the envs this node created that the conductor no longer defines, except those
    /// a deployment held here still uses: those are removed once that deployment is (see
    /// `envs_kept`).
    async fn remove_unwanted_envs(self: &Arc<Self>) {
        loop {
            let created = self.envs.created().await;
            // Problems of envs that are gone from the definitions and from this node are over.
            if let (Ok(wanted), Ok(mut problems)) =
                (self.env_wanted.lock(), self.env_problems.lock())
            {
                problems.retain(|name, _| wanted.iter().chain(&created).any(|(_, n)| n == name));
            }
            let in_use = self.envs_in_use();
            let mut kept = BTreeSet::new();
            for (kind, name) in created {
                if self.env_wanted(kind, &name) {
                    continue;
                }
                if let Some(user) = in_use.get(&name) {
                    self.set_env_problem(
                        &name,
                        Some(format!(
                            "env {name}: no longer defined, kept while deployment {user} here uses it"
                        )),
                    );
                    kept.insert(name);
                    continue;
                }
                self.remove_env(kind, &name).await;
            }
            if kept.is_empty() {
                return;
            }
            // Flag first, then look again: a removal that finished before the flag was set
            // is seen here, one that finishes after it runs the pass itself.
            self.envs_kept
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let now = self.envs_in_use();
            if kept.iter().all(|name| now.contains_key(name)) {
                return;
            }
        }
    }

    /// Starts the log shipper of a deployment on this connection (once), after `LogResume`.
    fn ship(&self, id: &str, conn: &Arc<Conn>) {
        let Some(resume) = conn
            .resume
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|m| m.get(id).copied().unwrap_or(0)))
        else {
            return;
        };
        let Some(buffer) = self.sup.logs(id) else {
            return;
        };
        let cancel = CancellationToken::new();
        {
            let Ok(mut shipping) = self.shipping.lock() else {
                return;
            };
            // One shipper per deployment per connection: a re-Assign keeps the running one.
            if shipping.get(id).is_some_and(|c| !c.is_cancelled()) {
                return;
            }
            shipping.insert(id.to_owned(), cancel.clone());
        }
        let shipper = Shipper {
            session: conn.session.clone(),
            id: id.to_owned(),
            buffer,
            resume,
            offset: self.log_offset(id),
            pacer: conn.pacer.clone(),
            cancel: cancel.clone(),
        };
        if let Ok(mut t) = conn.tasks.lock() {
            t.spawn(async move {
                shipper.run().await;
                cancel.cancel();
            });
        }
    }
}

/// The manager an env spec names (anything but `uv` is conda, the original's only manager).
fn manager_of(spec: &wire::EnvSpec) -> ManagerKind {
    if spec.manager == "uv" {
        ManagerKind::Uv
    } else {
        ManagerKind::Conda
    }
}
