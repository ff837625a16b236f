//! The core actor: the one task that owns cluster state and the store.
//!
//! It handles a closed set of messages ([`CoreMsg`]): API commands with reply channels, node
//! session events, and timer ticks. Every change is persisted before it is acted on (sent to a
//! node or published). After each message the core schedules (pure [`crate::scheduler`]) and
//! publishes a fresh [`ClusterView`] on a `watch` channel that the API reads.
//!
//! Fencing: every (re)assignment and every change of what a node should run gets a higher
//! generation. A node reporting a deployment it should not hold, or at an older generation, is
//! told to drop it (`Unassign`), so a healed partition never leaves two copies running.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use super::events::{Event, Feed, Journal, NewEvent};
use super::loghub::LogHub;
use super::paths::{self, PairState, Paths};
use super::services::{SERVICE_HOST, Service, ServiceTable};
use super::store::{
    AssignmentChange, AssignmentRecord, CondaEnvRecord, DeploymentRecord, ExperimentRecord,
    NodeRecord, Store, StoreError,
};
use super::view::{self, AssignedRef, ClusterView, Deployment, NodeConnection};
use crate::model::{DeploymentId, DesiredState, Generation};
use crate::scheduler::{self, Strategy};
use crate::time::millis;
use crate::wire;

mod experiments;
mod narrate;
mod runs;
pub mod trust;

pub use runs::WorkflowInfo;

pub use trust::{TrustMsg, TrustState};

/// Re-exported for the API handlers (the one definition is [`crate::time::now_ms`]).
pub use crate::time::now_ms;

/// Parses a stored specification; the error is a one-line reason naming the fields. A token
/// still sealed is one the store could not open (another key sealed it): the deployment fails
/// with that reason rather than send a node a token it cannot use.
fn parse_spec(specification: &Value) -> Result<crate::spec::DeploymentSpec, String> {
    if specification
        .pointer("/spec/config/token")
        .and_then(Value::as_str)
        .is_some_and(crate::seal::is_sealed)
    {
        return Err(format!(
            "spec.config.token: sealed with another key than this conductor's {} (was the key \
             file replaced?); send the token again",
            crate::seal::KEY_FILE
        ));
    }
    crate::spec::parse(specification).map_err(|errs| {
        errs.iter()
            .map(|e| format!("{}: {}", e.loc.join("."), e.msg))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// Errors the API turns into status codes.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("conductor is shutting down")]
    Unavailable,
    /// The core did not answer in time (held up by a slow disk): the change may still be
    /// made.
    #[error("the conductor did not answer within {0:?}")]
    NoAnswer(Duration),
    /// The request is well-formed but conflicts with the cluster (a 422 naming the fields).
    #[error("invalid: {0:?}")]
    Invalid(Vec<crate::spec::FieldError>),
}

type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

tokio::task_local! {
    /// The name of the API token a request runs under (set by the API's auth middleware):
    /// [`CoreHandle::call`] sends it with the request, and the events it causes record it.
    pub static ACTOR: String;
}

/// A deployment change requested over the API (already validated).
#[derive(Debug)]
pub struct DeploymentPatch {
    pub name: Option<String>,
    pub desired_state: Option<DesiredState>,
    pub specification: Option<Value>,
}

/// A conda/uv env change requested over the API.
#[derive(Debug)]
pub struct EnvPatch {
    pub packages: Option<Vec<String>>,
    pub custom_script: Option<Option<String>>,
}

/// An experiment to launch (its declaration already parsed and checked on its own).
#[derive(Debug)]
pub struct Launch {
    pub experiment: crate::spec::Experiment,
    /// As the user sent it (stored, and shown by `GET /experiments/{name}`).
    pub declaration: Value,
    /// Replace an experiment of the same name (else that is a conflict).
    pub force: bool,
}

/// Messages the core handles.
#[derive(Debug)]
pub enum CoreMsg {
    LaunchExperiment(Box<Launch>, Reply<()>),
    PatchExperiment(String, DesiredState, Reply<()>),
    DeleteExperiment(String, Reply<()>),
    CreateDeployment(DeploymentRecord, Reply<()>),
    PatchDeployment(String, DeploymentPatch, Reply<()>),
    DeleteDeployment(String, Reply<()>),
    CreateEnv(CondaEnvRecord, Reply<()>),
    PatchEnv(String, EnvPatch, Reply<()>),
    DeleteEnv(String, Reply<()>),
    RerunEnv(String, Reply<()>),
    NodeConnected(Box<NodeConnected>),
    NodeMessage {
        node_id: String,
        epoch: u64,
        msg: wire::node_message::Msg,
    },
    Heartbeat {
        node_id: String,
        epoch: u64,
        hb: wire::Heartbeat,
    },
    NodeDisconnected {
        node_id: String,
        epoch: u64,
    },
    Tick,
    /// Join tokens, enrollment, renewal, revocation, API tokens.
    Trust(TrustMsg),
    /// A request made with an API token: the events it causes name the token.
    As(String, Box<CoreMsg>),
    /// A new version of a workflow (definition as sent, and checked): its version.
    DefineWorkflow(Value, Box<crate::spec::Workflow>, Reply<u32>),
    /// Queues a run of a workflow's newest version with parameters: its id.
    StartRun(String, BTreeMap<String, String>, Reply<String>),
    CancelRun(String, Reply<()>),
    RetryRun(String, Reply<()>),
}

/// A node session that finished its Hello.
#[derive(Debug)]
pub struct NodeConnected {
    pub node_id: String,
    pub epoch: u64,
    pub hello: wire::Hello,
    pub tx: mpsc::Sender<wire::ConductorMessage>,
    pub session: symphony_net::Session,
}

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub suspect_after: Duration,
    pub grace: Duration,
    pub strategy: Strategy,
    pub service_ports: std::ops::RangeInclusive<u16>,
    /// Try direct node-to-node paths for mesh tunnels (else relay only).
    pub direct_paths: bool,
    /// How much of the events log to keep (`keep: 0` turns it off).
    pub events: super::events::Retention,
    /// How long an API call waits for the core's answer (a slow disk holds the core in a
    /// write) before it gives up with 503.
    pub answer_within: Duration,
}

#[derive(Debug)]
struct Connection {
    /// The mesh routes last sent on this connection (`None`: none yet).
    routes: Option<wire::ServiceRoutes>,
    epoch: u64,
    tx: mpsc::Sender<wire::ConductorMessage>,
    session: symphony_net::Session,
    connected_at_ms: i64,
}

#[derive(Debug, Default)]
struct Node {
    groups: Vec<String>,
    capacities_total: BTreeMap<String, i64>,
    resources: Option<wire::StaticResources>,
    usage: Option<wire::Heartbeat>,
    last_seen_ms: i64,
    last_heartbeat_ms: Option<i64>,
    env_names: BTreeSet<String>,
    /// The problems of the node's last env report.
    env_problems: Vec<String>,
    conn: Option<Connection>,
    connections: u64,
    first_seen_ms: i64,
    /// The connection's remote address as last seen (a change is a path change).
    remote: Option<std::net::SocketAddr>,
    /// Known from the store when the conductor started.
    known_at_start: bool,
    /// An env report arrived since the conductor started.
    env_reported: bool,
    /// The envs the node itself last said it has (`env_names` also drops a deleted env at
    /// once, before the node removed it).
    reported_envs: BTreeSet<String>,
}

/// A copy the conductor told a node to stop, whose reports while it stops are still told.
#[derive(Debug)]
struct Released {
    /// The deployment's name.
    name: String,
    /// The copy's last report.
    told: wire::DeploymentStatus,
    /// A task's deployment (its start and end are told by the task's events): known when it
    /// was released, since its run may be pruned before the copy's last report comes.
    task: bool,
}

/// What the events already said about derived states (a change is an event).
#[derive(Debug, Default)]
struct Said {
    /// Each node's liveness.
    node_states: HashMap<String, scheduler::NodeState>,
    /// Why each deployment waits for a node.
    unplaced: HashMap<String, scheduler::Unplaced>,
    /// Each service: whether it is up, and the path from each connector's node.
    services: HashMap<(String, String), (bool, BTreeMap<String, String>)>,
    /// Copies the conductor itself told a node to stop (node, deployment) -> the deployment's
    /// name and the copy's last report: their reports while they stop are still its story.
    released: HashMap<(String, String), Released>,
    /// The first publish after a start happened (what it found was not news).
    primed: bool,
    /// Deployments whose first report in this conductor's life came in a Hello since the last
    /// publish: what they show (a service up) is where the story resumes.
    resumed: HashSet<String>,
    /// Assignments loaded from the store at start that have not reported yet.
    loaded: HashSet<(String, u64)>,
}

#[derive(Debug, Clone)]
struct Reported {
    node_id: String,
    status: wire::DeploymentStatus,
}

/// The actor's state.
#[derive(Debug)]
struct Core {
    store: Store,
    cfg: CoreConfig,
    logs: LogHub,
    deployments: HashMap<String, DeploymentRecord>,
    /// Parsed specs (None = invalid, with the reason), kept in step with `deployments`.
    specs: HashMap<String, Result<crate::spec::DeploymentSpec, String>>,
    envs: BTreeMap<String, CondaEnvRecord>,
    assignments: HashMap<String, scheduler::Assignment>,
    nodes: BTreeMap<String, Node>,
    reported: HashMap<String, Reported>,
    next_generation: Generation,
    next_command: u64,
    view: watch::Sender<Arc<ClusterView>>,
    /// Each deployment's specification with secrets masked, as of its `updated_at_ms`
    /// (publish runs on every usage tick; specs change only on writes).
    masked_specs: HashMap<String, (i64, Arc<Value>)>,
    /// Every deployment that is not in `quiet`: placed, reported, wanted running, invalid, or
    /// changed since the last publish ([`Core::wake`]). Scheduling and publishing look only at
    /// these, so they cost what runs, not what ran (finished tasks pile up by thousands).
    hot: HashSet<String>,
    /// The views of quiet deployments (stopped, held by no node, nothing reported, a valid
    /// spec), in the published order (newest first, then by id). Such a view changes only
    /// when its deployment is woken.
    quiet: BTreeMap<(std::cmp::Reverse<i64>, String), Arc<Deployment>>,
    /// Each quiet deployment's `created_at_ms` (its key in `quiet`).
    quiet_at: HashMap<String, i64>,
    /// The last published view of each hot deployment, with what it was built from besides
    /// its own record, assignment and report: built again only when one of those changed
    /// (a wake) or these did. Most of the hundreds of running tasks change in no publish.
    hot_views: HashMap<String, HotView>,
    /// Deployments woken since the last publish.
    woken: HashSet<String>,
    /// Why the database refused the last write, while it does (see [`Core::note_storage`]).
    storage_fault: Option<String>,
    /// Something changed since the last publish that only a tick publishes (usage).
    dirty: bool,
    /// State changed in this batch: publish at its end.
    changed: bool,
    /// When the last batch was flushed.
    flushed_at: tokio::time::Instant,
    /// Deployment reports (statuses, removals) from nodes in this batch so far.
    reports: usize,
    /// The last batch carried more than one report: nodes are busy, and a batch nobody waits
    /// on gathers (see [`FLUSH_EVERY`]).
    nodes_busy: bool,
    /// Run the scheduler at the end of this batch.
    needs_schedule: bool,
    /// A timer tick arrived in this batch.
    ticked: bool,
    /// API replies of this batch, sent after the publish.
    replies: Vec<(Reply<()>, Result<(), CoreError>)>,
    /// Node liveness as of the last publish.
    published_states: Vec<scheduler::NodeState>,
    /// Node liveness as of the last scheduling pass.
    scheduled_states: Vec<scheduler::NodeState>,
    /// Stale copies already told to stop: (node, deployment, generation).
    fenced: BTreeSet<(String, String, Generation)>,
    /// After a start: the nodes known from before that have not said hello yet. What they hold
    /// is unknown until they do (their copies told to stop before the restart may still run).
    awaiting_hello: BTreeSet<String>,
    /// After a start: deployments no node holds (one may still be stopping a copy told to stop
    /// before the restart). None is placed until every node in `awaiting_hello` said hello or
    /// is lost, or one could run twice. Found by the fault suite.
    unsettled: BTreeSet<String>,
    /// Every bound service (as stored).
    services: ServiceTable,
    /// The services each deployment connects to (from its spec), for the view.
    connects: BTreeMap<String, Vec<String>>,
    /// Direct paths between the nodes of connectors and binders.
    paths: Paths,
    /// By name.
    experiments: BTreeMap<String, ExperimentRecord>,
    /// Derived from `experiments` (see `Core::reindex`): each process's deployment id ->
    /// its place and scheduling unit.
    members: HashMap<String, experiments::Member>,
    /// Derived from `experiments`: each declaration with its secrets masked, for the view.
    declarations: HashMap<String, Arc<Value>>,
    /// Counters and histograms for `/metrics`.
    metrics: Arc<super::metrics::Metrics>,
    /// Deployments created (or started again) and not yet reported RUNNING: since when (for
    /// the POST -> RUNNING histogram).
    awaiting_running: HashMap<String, i64>,
    /// Experiments a failed process should have stopped, whose store write failed: retried on
    /// every tick (experiment -> why).
    stops_due: BTreeMap<String, String>,
    /// The events log's ids and its observed events not yet written.
    journal: Journal,
    /// Derived states the events have described.
    said: Said,
    /// Certificates, join tokens, revocation.
    trust: TrustState,
    /// The API token whose request is being handled (recorded in its events).
    by: Option<String>,
    /// Workflows, runs, and the task deployments they own.
    runs: runs::Runs,
}

/// The reflexive address of a connected node (its connection's remote address).
fn reflexive(nodes: &BTreeMap<String, Node>, node_id: &str) -> Option<std::net::SocketAddr> {
    nodes
        .get(node_id)
        .and_then(|n| n.conn.as_ref())
        // A dual-stack conductor sees IPv4 nodes as v4-mapped IPv6; peers dial the plain form.
        .map(|c| {
            let a = c.session.connection().remote_address();
            std::net::SocketAddr::new(a.ip().to_canonical(), a.port())
        })
}

/// What a deployment binds (ports assigned) and connects to.
type Planned = (Vec<Service>, Vec<String>);

/// How often events past the retention are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Handle to the core for the API and sessions.
#[derive(Debug, Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<CoreMsg>,
    view: watch::Receiver<Arc<ClusterView>>,
    epochs: Arc<std::sync::atomic::AtomicU64>,
    metrics: Arc<super::metrics::Metrics>,
    events: Feed,
    store: Store,
    answer_within: Duration,
}

impl CoreHandle {
    /// The latest published snapshot.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// The core's counters and histograms (for `/metrics`).
    pub fn metrics(&self) -> &super::metrics::Metrics {
        &self.metrics
    }

    /// The store, for reads the published view does not carry (token lists).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The events log (stored and live).
    pub fn events(&self) -> &Feed {
        &self.events
    }

    /// A receiver that wakes on every publish.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.clone()
    }

    /// Sends a message without waiting for a reply.
    pub async fn send(&self, msg: CoreMsg) {
        let _ = self.tx.send(msg).await;
    }

    /// Sends a command and waits for its reply.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> CoreMsg) -> Result<T, CoreError> {
        let (tx, rx) = oneshot::channel();
        let msg = make(tx);
        let msg = match ACTOR.try_with(Clone::clone) {
            Ok(by) => CoreMsg::As(by, Box::new(msg)),
            Err(_) => msg,
        };
        let deadline = tokio::time::Instant::now() + self.answer_within;
        let slow = |_| CoreError::NoAnswer(self.answer_within);
        tokio::time::timeout_at(deadline, self.tx.send(msg))
            .await
            .map_err(slow)?
            .map_err(|_| CoreError::Unavailable)?;
        tokio::time::timeout_at(deadline, rx)
            .await
            .map_err(slow)?
            .map_err(|_| CoreError::Unavailable)?
    }

    /// A fresh session epoch (fencing token per connection).
    pub fn next_epoch(&self) -> u64 {
        self.epochs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }
}

/// A hot deployment's published view and the inputs of it that are not its own (see
/// `Core::hot_views`).
#[derive(Debug)]
struct HotView {
    view: Arc<Deployment>,
    unplaced: Option<scheduler::Unplaced>,
    any_online: bool,
    gpus: Vec<wire::DeploymentGpu>,
}

/// The least time between two flushes of batches nobody waits on (only what nodes said),
/// while nodes are busy (the last batch carried more than one of their reports).
pub const FLUSH_EVERY: Duration = Duration::from_millis(5);

/// Loads state from the store and starts the core task.
pub async fn start(
    store: Store,
    cfg: CoreConfig,
    logs: LogHub,
    trust: TrustState,
    tasks: &mut tokio::task::JoinSet<()>,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<CoreHandle, StoreError> {
    let snap = store.load_all().await?;
    let ports = cfg.service_ports.clone();
    let journal = Journal::new(snap.event_high_water, cfg.events.keep > 0);
    let feed = Feed::new(store.clone(), journal.sender());
    tasks.spawn(super::events::prune(
        store.clone(),
        cfg.events,
        PRUNE_EVERY,
        cancel.clone(),
    ));
    let (view_tx, view_rx) = watch::channel(Arc::new(ClusterView::default()));
    let mut core = Core {
        store,
        cfg,
        logs,
        specs: snap
            .deployments
            .iter()
            .map(|d| (d.id.clone(), parse_spec(&d.specification)))
            .collect(),
        hot: snap.deployments.iter().map(|d| d.id.clone()).collect(),
        deployments: snap
            .deployments
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect(),
        envs: snap
            .conda_envs
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect(),
        assignments: snap
            .assignments
            .into_iter()
            .map(|a| {
                (
                    a.deployment_id,
                    scheduler::Assignment {
                        node_id: a.node_id,
                        generation: a.generation,
                    },
                )
            })
            .collect(),
        nodes: BTreeMap::new(),
        reported: HashMap::new(),
        next_generation: snap.max_generation.next(),
        next_command: 1,
        view: view_tx,
        masked_specs: HashMap::new(),
        quiet: BTreeMap::new(),
        quiet_at: HashMap::new(),
        hot_views: HashMap::new(),
        woken: HashSet::new(),
        storage_fault: None,
        dirty: false,
        changed: false,
        flushed_at: tokio::time::Instant::now(),
        reports: 0,
        nodes_busy: false,
        needs_schedule: false,
        ticked: false,
        replies: Vec::new(),
        published_states: Vec::new(),
        scheduled_states: Vec::new(),
        fenced: BTreeSet::new(),
        awaiting_hello: BTreeSet::new(),
        unsettled: BTreeSet::new(),
        services: ServiceTable::new(snap.services, ports),
        connects: BTreeMap::new(),
        // Nonces grow across restarts, like epochs (an answer to an attempt of an earlier run
        // never matches).
        paths: Paths::new(u64::try_from(now_ms()).unwrap_or(0) * 1000),
        experiments: snap
            .experiments
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect(),
        members: HashMap::new(),
        declarations: HashMap::new(),
        metrics: Arc::new(super::metrics::Metrics::default()),
        awaiting_running: HashMap::new(),
        stops_due: BTreeMap::new(),
        journal,
        said: Said::default(),
        trust,
        by: None,
        runs: runs::Runs::default(),
    };
    core.load_runs().await?;
    core.reindex();
    core.reconcile_services().await?;
    // Known nodes come back as not connected; their grace starts now (a conductor restart
    // must not make them lost at once).
    let now = now_ms();
    core.said.loaded = core
        .assignments
        .iter()
        .map(|(id, a)| (id.clone(), a.generation.get()))
        .collect();
    let lost_after = i64::try_from(core.cfg.grace.as_millis()).unwrap_or(i64::MAX);
    for n in snap.nodes {
        // Lost before this start: already said (its deployments went elsewhere then).
        if now.saturating_sub(n.last_seen_ms) > lost_after {
            core.said
                .node_states
                .insert(n.node_id.clone(), scheduler::NodeState::Lost);
        } else {
            core.awaiting_hello.insert(n.node_id.clone());
        }
        core.nodes.insert(
            n.node_id,
            Node {
                groups: n.groups,
                capacities_total: n.capacities_total,
                last_seen_ms: now,
                first_seen_ms: n.first_seen_ms,
                known_at_start: true,
                ..Node::default()
            },
        );
    }
    for id in core.deployments.keys() {
        core.logs.ensure(id);
    }
    // What was placed before the restart takes its node's lines (the `Assign` sent again at
    // its Hello says so too).
    for (id, a) in &core.assignments {
        core.logs.placed(id, &a.node_id);
    }
    if !core.awaiting_hello.is_empty() {
        core.unsettled = core
            .deployments
            .keys()
            .filter(|id| !core.assignments.contains_key(*id))
            .cloned()
            .collect();
    }
    let nodes = core.sched_nodes(now_ms());
    core.publish(&nodes);
    let (tx, rx) = mpsc::channel(1024);
    let handle = CoreHandle {
        tx: tx.clone(),
        view: view_rx,
        // Epochs keep increasing across conductor restarts: start above anything handed out
        // before (microseconds since the epoch; connections arrive far slower than that).
        epochs: Arc::new((u64::try_from(now_ms()).unwrap_or(0) * 1000).into()),
        metrics: core.metrics.clone(),
        events: feed,
        store: core.store.clone(),
        answer_within: core.cfg.answer_within,
    };
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rx = rx;
        loop {
            let msg = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                m = rx.recv() => match m { Some(m) => m, None => break },
                _ = tick.tick() => CoreMsg::Tick,
            };
            core.handle(msg).await;
            // Take whatever else is queued before scheduling and publishing once.
            for _ in 0..256 {
                match rx.try_recv() {
                    Ok(m) => core.handle(m).await,
                    Err(_) => break,
                }
            }
            // Nobody waits on this batch and nodes are busy: what they say within FLUSH_EVERY
            // of the last flush joins it (one transaction, one scheduling pass, one publish
            // for all). A lone report (a deployment just started, on a quiet conductor) is
            // flushed and seen at once.
            let gather_until = core.flushed_at + FLUSH_EVERY;
            while core.nodes_busy
                && !core.caller_waiting()
                && tokio::time::Instant::now() < gather_until
            {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    m = rx.recv() => match m {
                        Some(m) => core.handle(m).await,
                        None => break,
                    },
                    () = tokio::time::sleep_until(gather_until) => break,
                }
            }
            core.flush().await;
            core.flushed_at = tokio::time::Instant::now();
            core.nodes_busy = std::mem::take(&mut core.reports) > 1;
        }
    });
    Ok(handle)
}

impl Core {
    /// Handles one message. Effects that are cheaper once per batch (scheduling, publishing,
    /// replying) are only noted here and done by [`Core::flush`].
    async fn handle(&mut self, msg: CoreMsg) {
        match msg {
            CoreMsg::LaunchExperiment(launch, reply) => {
                let r = self.launch(*launch).await;
                self.answer(reply, r, true);
            }
            CoreMsg::PatchExperiment(name, desired, reply) => {
                let r = self.set_experiment_state(&name, desired, None).await;
                self.answer(reply, r, true);
            }
            CoreMsg::DeleteExperiment(name, reply) => {
                let r = self.delete_experiment(&name).await;
                self.answer(reply, r, true);
            }
            CoreMsg::CreateDeployment(rec, reply) => {
                let r = self.create(rec).await;
                self.answer(reply, r, true);
            }
            CoreMsg::PatchDeployment(id, patch, reply) => {
                let r = self.patch(&id, patch).await;
                if r.is_ok() {
                    self.process_started(&id).await;
                }
                self.answer(reply, r, true);
            }
            CoreMsg::DeleteDeployment(id, reply) => {
                let r = self.delete(&id).await;
                self.answer(reply, r, true);
            }
            CoreMsg::CreateEnv(rec, reply) => {
                let r = self.create_env(rec).await;
                self.answer(reply, r, false);
            }
            CoreMsg::PatchEnv(name, patch, reply) => {
                let r = self.patch_env(&name, patch).await;
                self.answer(reply, r, false);
            }
            CoreMsg::DeleteEnv(name, reply) => {
                let r = self.delete_env(&name).await;
                self.answer(reply, r, false);
            }
            CoreMsg::RerunEnv(name, reply) => {
                let r = match self.envs.get(&name).cloned() {
                    Some(env) => {
                        self.broadcast_env(&env, true);
                        self.journal.note(narrate::env(
                            "env.rerun",
                            &name,
                            format!("env {name}: every node recreates it"),
                            json!({"nodes": self.nodes.len()}),
                        ));
                        Ok(())
                    }
                    None => Err(CoreError::NotFound("Conda env not found")),
                };
                self.answer(reply, r, false);
            }
            CoreMsg::NodeConnected(c) => {
                self.connected(*c).await;
                self.changed = true;
                self.needs_schedule = true;
            }
            CoreMsg::NodeMessage {
                node_id,
                epoch,
                msg,
            } => {
                if self.current(&node_id, epoch) {
                    self.touch(&node_id);
                    self.node_message(&node_id, msg).await;
                }
            }
            CoreMsg::Heartbeat { node_id, epoch, hb } => {
                if self.current(&node_id, epoch) {
                    let now = now_ms();
                    if let Some(n) = self.nodes.get_mut(&node_id) {
                        n.last_seen_ms = now;
                        n.last_heartbeat_ms = Some(now);
                        n.usage = Some(hb);
                        if let Some(c) = &n.conn {
                            self.metrics.observe_rtt(&node_id, c.session.facts().rtt);
                        }
                    }
                    // Usage is published with the next tick; it changes nothing else.
                    self.dirty = true;
                }
            }
            CoreMsg::NodeDisconnected { node_id, epoch } => {
                if let Some(n) = self.nodes.get_mut(&node_id)
                    && n.conn.as_ref().is_some_and(|c| c.epoch == epoch)
                {
                    n.conn = None;
                    self.changed = true;
                    self.paths.disconnected(&node_id, now_ms());
                    tracing::info!(%node_id, "node disconnected");
                    self.journal.note(narrate::node(
                        "node.disconnected",
                        &node_id,
                        format!("node {node_id} disconnected"),
                        json!({"epoch": epoch}),
                    ));
                }
            }
            CoreMsg::Tick => self.ticked = true,
            CoreMsg::Trust(t) => self.trust_msg(t).await,
            CoreMsg::As(by, msg) => {
                self.by = Some(by);
                Box::pin(self.handle(*msg)).await;
                self.by = None;
            }
            CoreMsg::DefineWorkflow(definition, parsed, reply) => {
                let r = self.define_workflow(definition, *parsed).await;
                // After the publish: a read that follows the reply sees the new version.
                self.runs.defined.push((reply, r));
                self.changed = true;
            }
            CoreMsg::StartRun(workflow, params, reply) => {
                // Written, admitted and its first tasks made at this batch's flush; the reply
                // waits for that, so a read after it sees the run running.
                self.start_run(&workflow, params, Some(reply));
                self.changed = true;
            }
            CoreMsg::CancelRun(id, reply) => {
                let r = self.cancel_run(&id);
                self.answer(reply, r, true);
            }
            CoreMsg::RetryRun(id, reply) => {
                let r = self.retry_run(&id);
                self.answer(reply, r, true);
            }
        }
    }

    /// Runs one store write with the events waiting to be written and `own` (the change's),
    /// all in its transaction, and publishes them once it committed.
    async fn persist<T>(
        &mut self,
        mut own: Vec<NewEvent>,
        write: impl AsyncFnOnce(&Store, &[Event]) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        for e in &mut own {
            self.attribute(e);
        }
        let with_own = !own.is_empty();
        let batch = self.journal.batch(own);
        // The operator must act on the disk of an environmental fault: it names the file.
        let r = write(&self.store, &batch.events)
            .await
            .map_err(|e| match self.store.path() {
                Some(db) => e.at(db),
                None => e,
            });
        self.note_storage(&r);
        let clash = match &r {
            Ok(_) => {
                self.journal.written(batch);
                return r;
            }
            Err(e) => matches!(e, StoreError::Conflict),
        };
        self.journal.unwritten(batch);
        let clash = if with_own && self.journal.has_pending() {
            // The change failed; its observed events must not fail with it: they go alone.
            let pending = self.journal.batch(Vec::new());
            match self.store.append_events(&pending.events).await {
                Ok(()) => {
                    self.journal.written(pending);
                    false
                }
                Err(e) => {
                    self.journal.unwritten(pending);
                    matches!(e, StoreError::Conflict)
                }
            }
        } else {
            // Only observed events were written: a clash was theirs.
            clash && !with_own
        };
        // A clash of ids can never succeed: drop them, or they would fail every later write.
        // Anything else may pass next time: they wait (bounded).
        if clash && self.journal.has_pending() {
            let dropped = self.journal.discard_pending();
            tracing::warn!(
                dropped,
                "observed events clash with stored ones (another conductor on this database?); dropped"
            );
        }
        r
    }

    /// Names in `e` the API token whose call is being handled, if any (`by`).
    fn attribute(&self, e: &mut NewEvent) {
        if let Some(by) = &self.by
            && let Some(f) = e.fields.as_object_mut()
        {
            f.insert("by".into(), Value::String(by.clone()));
        }
    }

    /// A write that failed for an environmental cause (a full or read-only disk, a database
    /// another process locks) is said once, as a log line and an event (written once the
    /// store takes writes again); the first write that succeeds after it says so too.
    fn note_storage<T>(&mut self, r: &Result<T, StoreError>) {
        // Only built when something is said (this runs on every write).
        let path = || self.store.path().map(|p| p.display().to_string());
        match r {
            Err(e) if e.is_environmental() => {
                if self.storage_fault.is_none() {
                    let why = e.to_string();
                    tracing::error!("{why}: writes are refused until it is fixed; reads go on");
                    self.journal.note(NewEvent::new(
                        "storage.unwritable",
                        super::events::object("storage", "database"),
                        format!("{why}: writes are refused until it is fixed"),
                        json!({"path": path()}),
                    ));
                    self.storage_fault = Some(why);
                }
            }
            Err(_) => {}
            Ok(_) => {
                if let Some(why) = self.storage_fault.take() {
                    tracing::info!("the database takes writes again");
                    self.journal.note(NewEvent::new(
                        "storage.recovered",
                        super::events::object("storage", "database"),
                        "the database takes writes again".to_owned(),
                        json!({"path": path(), "was": why}),
                    ));
                }
            }
        }
    }

    /// Writes the observed events that wait, if any.
    async fn write_pending(&mut self) {
        if self.journal.has_pending()
            && let Err(e) = self
                .persist(Vec::new(), async |s, ev| s.append_events(ev).await)
                .await
        {
            tracing::warn!(error = ?e, "could not write events");
        }
    }

    /// Node liveness changes since the last flush (suspect, lost, back). A node known from
    /// before a conductor start is followed from its first connection (its `node.connected`
    /// says it is there), or from being lost if it never comes back.
    fn narrate_liveness(&mut self, nodes: &[scheduler::NodeView]) {
        use scheduler::NodeState;
        for n in nodes {
            let before = self.said.node_states.get(&n.id).copied();
            if before == Some(n.state) {
                continue;
            }
            // Not connected since this conductor started: only its loss is news.
            let seen = self.nodes.get(&n.id).is_some_and(|x| x.connections > 0);
            if !seen && n.state != NodeState::Lost {
                continue;
            }
            self.said.node_states.insert(n.id.clone(), n.state);
            let (kind, message) = match (before, n.state) {
                // First seen: its `node.connected` says so.
                (None, NodeState::Online | NodeState::Suspect) => continue,
                (_, NodeState::Suspect) => ("node.suspect", "suspect (silent or disconnected)"),
                (_, NodeState::Lost) => ("node.lost", "lost: its deployments are re-placed"),
                (_, NodeState::Online) => ("node.back", "back online"),
            };
            self.journal.note(narrate::node(
                kind,
                &n.id,
                format!("node {} {message}", n.id),
                json!({"from": before.map(scheduler::NodeState::as_str), "to": n.state.as_str()}),
            ));
        }
    }

    /// What an env report says changed on a node: envs that appeared (created there), went
    /// (removed there), and new problems (a failed create or removal).
    fn narrate_envs(&mut self, node_id: &str, report: &wire::EnvReport) {
        let Some(n) = self.nodes.get_mut(node_id) else {
            return;
        };
        let before = std::mem::replace(
            &mut n.reported_envs,
            report.env_names.iter().cloned().collect(),
        );
        // A node known from before a conductor start repeats the problems it reported then:
        // its first report's problems are where the story resumes (its envs are compared with
        // its Hello's).
        let resumed = !std::mem::replace(&mut n.env_reported, true) && n.known_at_start;
        let now: BTreeSet<&String> = report.env_names.iter().collect();
        let mut events = Vec::new();
        for name in now.iter().filter(|e| !before.contains(**e)) {
            events.push(narrate::env(
                "env.ready",
                name,
                format!("env {name} ready on {node_id}"),
                json!({"node": node_id}),
            ));
        }
        // Problems read "env NAME: ...".
        let env_of = |problem: &str| -> String {
            problem
                .strip_prefix("env ")
                .and_then(|rest| rest.split([':', ' ']).next())
                .unwrap_or_default()
                .to_owned()
        };
        let troubled: BTreeSet<String> = report.problems.iter().map(|p| env_of(p)).collect();
        // Gone from the node: no longer offered, and not kept (a kept env is still on its disk;
        // it goes, and is said to, when its problem clears).
        let was_there: BTreeSet<String> = before
            .iter()
            .cloned()
            .chain(
                n.env_problems
                    .iter()
                    .filter(|p| p.contains("kept"))
                    .map(|p| env_of(p)),
            )
            .collect();
        for name in was_there
            .iter()
            .filter(|e| !now.contains(e) && !troubled.contains(*e))
        {
            events.push(narrate::env(
                "env.removed",
                name,
                format!("env {name} removed from {node_id}"),
                json!({"node": node_id}),
            ));
        }
        for problem in report
            .problems
            .iter()
            .filter(|p| !resumed && !n.env_problems.contains(p))
        {
            let name = env_of(problem);
            events.push(narrate::env(
                "env.problem",
                &name,
                format!("on {node_id}: {problem}"),
                json!({"node": node_id, "problem": problem}),
            ));
        }
        for ev in events {
            self.journal.note(ev);
        }
    }

    /// The events a scheduling pass brings: moves off lost nodes, then placements with why
    /// that node.
    fn placement_events(&self, plan: &scheduler::Plan) -> Vec<NewEvent> {
        let name = |id: &str| self.deployments.get(id).map_or("", |d| d.name.as_str());
        let mut out = Vec::with_capacity(plan.unassign.len() + plan.placements.len());
        for (id, old) in &plan.unassign {
            out.push(narrate::deployment(
                "deployment.evicted",
                id,
                format!("{} moved off node {} (lost)", name(id), old.node_id),
                json!({"name": name(id), "node": old.node_id, "generation": old.generation}),
            ));
        }
        for p in &plan.placements {
            let id = p.deployment_id.as_str();
            if let Some(ev) = self.task_started_event(id, &p.node_id, p.generation.get()) {
                out.push(ev);
                continue;
            }
            let spec = self.specs.get(id).and_then(|s| s.as_ref().ok());
            let member = self.members.get(id);
            let rule = match self.cfg.strategy {
                Strategy::Spread => "spread: the eligible node with the lowest load after it",
                Strategy::Binpack => "binpack: the fullest eligible node it still fits on",
            };
            let why = match (
                member.and_then(|m| m.colocate.as_deref()),
                member.and_then(|m| m.gang.as_deref()),
            ) {
                (Some(group), _) => format!("with its process group {group} ({rule})"),
                (None, Some(gang)) => format!("gang {gang}: every member fits at once ({rule})"),
                (None, None) => rule.to_owned(),
            };
            out.push(narrate::deployment(
                "deployment.placed",
                id,
                format!(
                    "{} placed on {} (generation {}): {why}",
                    name(id),
                    p.node_id,
                    p.generation
                ),
                json!({
                    "name": name(id),
                    "node": p.node_id,
                    "generation": p.generation,
                    "why": why,
                    "node_group": spec.and_then(|s| s.node_group.clone()),
                    "env_name": spec.and_then(|s| s.env_name.clone()),
                    "requests": spec.map(|s| &s.capacity_requests),
                }),
            ));
        }
        out
    }

    /// Connected nodes whose remote address changed (QUIC migration: a NAT rebinding or a
    /// new IP) since they were last looked at (`moved`: found by the publish, which reads
    /// each connection's facts anyway).
    fn narrate_paths(&mut self, moved: Vec<(String, std::net::SocketAddr)>) {
        for (id, remote) in moved {
            let Some(n) = self.nodes.get_mut(&id) else {
                continue;
            };
            let Some(before) = n.remote.replace(remote) else {
                continue;
            };
            self.journal.note(narrate::node(
                "node.path_changed",
                &id,
                format!("node {id} path changed: {before} -> {remote}"),
                json!({"from": before.to_string(), "to": remote.to_string()}),
            ));
        }
    }

    /// Why deployments wait for a node, said when the reason appears or changes.
    fn narrate_unplaced(&mut self, reasons: &BTreeMap<String, scheduler::Unplaced>) {
        self.said.unplaced.retain(|id, _| reasons.contains_key(id));
        for (id, reason) in reasons {
            if self.said.unplaced.get(id) == Some(reason) {
                continue;
            }
            self.said.unplaced.insert(id.clone(), *reason);
            let name = self.deployments.get(id).map_or("", |d| d.name.as_str());
            self.journal.note(narrate::deployment(
                "deployment.unplaced",
                id,
                format!("{name} waits for a node: {reason}"),
                json!({"name": name, "reason": reason.to_string()}),
            ));
        }
    }

    /// Services going up or down, and the path from each connector's node switching (direct,
    /// relay). At most one service per port of the pool (2 000 by default), so a look at each
    /// per publish is cheap.
    fn narrate_services(&mut self, services: &[crate::model::ServiceInfo]) {
        let reported = &self.reported;
        let running = |id: &str, node: &str| {
            reported.get(id).is_some_and(|r| {
                r.node_id == node && r.status.state == crate::model::CurrentState::Running.as_str()
            })
        };
        for s in services {
            let up = s
                .node_id
                .as_deref()
                .is_some_and(|n| running(&s.deployment_id, n));
            let key = (s.namespace.clone(), s.name.clone());
            let resumed = self.said.resumed.contains(&s.deployment_id);
            let said = self.said.services.entry(key).or_default();
            let object =
                || super::events::object("service", &format!("{}/{}", s.namespace, s.name));
            let mut events = Vec::new();
            let changed = said.0 != up;
            said.0 = up;
            // A binder first heard of in a Hello since the last publish changed nothing.
            if changed && !resumed {
                let (kind, verb) = if up {
                    ("service.up", "up")
                } else {
                    ("service.down", "down")
                };
                events.push(NewEvent::new(
                    kind,
                    object(),
                    format!("service {}/{} {verb}", s.namespace, s.name),
                    json!({"deployment": s.deployment_id, "node": s.node_id}),
                ));
            }
            for p in &s.paths {
                if said.1.get(&p.node_id) == Some(&p.path) {
                    continue;
                }
                let before = said.1.insert(p.node_id.clone(), p.path.clone());
                let from = before
                    .as_deref()
                    .map_or(String::new(), |b| format!("{b} -> "));
                events.push(NewEvent::new(
                    "service.path_changed",
                    object(),
                    format!(
                        "service {}/{} from {}: {from}{}",
                        s.namespace, s.name, p.node_id, p.path
                    ),
                    json!({"node": p.node_id, "from": before, "to": p.path}),
                ));
            }
            for ev in events {
                self.journal.note(ev);
            }
        }
        if services.len() != self.said.services.len() {
            let now: HashSet<(&str, &str)> = services
                .iter()
                .map(|s| (s.namespace.as_str(), s.name.as_str()))
                .collect();
            let gone: Vec<(String, String)> = self
                .said
                .services
                .keys()
                .filter(|(ns, n)| !now.contains(&(ns.as_str(), n.as_str())))
                .cloned()
                .collect();
            for (ns, name) in gone {
                if self
                    .said
                    .services
                    .remove(&(ns.clone(), name.clone()))
                    .is_some_and(|s| s.0)
                {
                    self.journal.note(NewEvent::new(
                        "service.down",
                        super::events::object("service", &format!("{ns}/{name}")),
                        format!("service {ns}/{name} down (gone)"),
                        json!({}),
                    ));
                }
            }
        }
    }

    fn answer(&mut self, reply: Reply<()>, r: Result<(), CoreError>, schedule: bool) {
        self.replies.push((reply, r));
        self.changed = true;
        self.needs_schedule |= schedule;
    }

    /// Schedules, publishes once, then answers the API calls of the batch (after the publish,
    /// so a client that reads after its write sees it).
    async fn flush(&mut self) {
        let ticked = std::mem::take(&mut self.ticked);
        if ticked && !self.stops_due.is_empty() {
            self.retry_stops().await;
        }
        if ticked && !self.runs.next_fire.is_empty() {
            self.fire_schedules().await;
        }
        // Runs move first: the tasks they start are written before this flush schedules.
        self.write_starting().await;
        self.advance_runs(ticked).await;
        let needs_schedule = std::mem::take(&mut self.needs_schedule);
        let mut publish = std::mem::take(&mut self.changed);
        if ticked || needs_schedule || publish {
            // One view of the nodes for the whole flush (scheduling changes no node).
            let nodes = self.sched_nodes(now_ms());
            let states: Vec<scheduler::NodeState> = nodes.iter().map(|n| n.state).collect();
            self.narrate_liveness(&nodes);
            // Everything that can change a placement schedules at once; the timer only
            // matters when a node's liveness changed (suspect, lost).
            if needs_schedule || (ticked && states != self.scheduled_states) {
                self.scheduled_states.clone_from(&states);
                self.schedule(&nodes).await;
            }
            // Usage arrived or a node's liveness changed since the last publish?
            publish |= ticked && (self.dirty || states != self.published_states);
            if publish {
                self.publish(&nodes);
            }
            self.drive_paths();
        }
        // Observed events go right after the publish (off the path to it: a client waiting
        // for RUNNING does not wait for this write), before the batch's replies.
        self.write_pending().await;
        for (reply, r) in self.replies.drain(..) {
            let _ = reply.send(r);
        }
        for (reply, r) in self.runs.defined.drain(..) {
            let _ = reply.send(r);
        }
        for (reply, r) in self.runs.replies.drain(..) {
            let _ = reply.send(r);
        }
    }

    /// Whether an API call waits for the end of this batch.
    fn caller_waiting(&self) -> bool {
        !self.replies.is_empty() || self.runs.caller_waiting()
    }

    fn current(&self, node_id: &str, epoch: u64) -> bool {
        self.nodes
            .get(node_id)
            .and_then(|n| n.conn.as_ref())
            .is_some_and(|c| c.epoch == epoch)
    }

    fn touch(&mut self, node_id: &str) {
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.last_seen_ms = now_ms();
        }
    }

    /// Marks a deployment whose view or placement may change: it leaves the quiet set until a
    /// publish finds it quiet again. Called wherever its record, spec, assignment or report
    /// changes (and when it goes).
    fn wake(&mut self, id: &str) {
        if let Some(at) = self.quiet_at.remove(id) {
            self.quiet.remove(&(std::cmp::Reverse(at), id.to_owned()));
        }
        if !self.hot.contains(id) {
            self.hot.insert(id.to_owned());
        }
        if !self.woken.contains(id) {
            self.woken.insert(id.to_owned());
        }
    }

    fn command_id(&mut self) -> u64 {
        self.next_command += 1;
        self.next_command
    }

    fn send_to(&self, node_id: &str, msg: wire::conductor_message::Msg) {
        if let Some(conn) = self.nodes.get(node_id).and_then(|n| n.conn.as_ref()) {
            // Never wait for a node: a node that cannot take 1024 queued commands is stuck.
            // Closing makes it reconnect, and its Hello resynchronises everything.
            if let Err(mpsc::error::TrySendError::Full(_)) =
                conn.tx.try_send(wire::ConductorMessage { msg: Some(msg) })
            {
                tracing::warn!(%node_id, "node is not reading its commands; closing its connection");
                conn.session.close(
                    symphony_net::CloseCode::Shutdown,
                    "command queue full; reconnect",
                );
            }
        }
    }

    /// The mesh routes of `node_id`: every service of every namespace (ports are unique in
    /// the cluster, so a node can listen for all of them), marked local when the binder is
    /// placed there.
    /// `runs_any`: whether the node holds an assignment (the caller knows, without a scan).
    fn routes_for(&self, node_id: &str, runs_any: bool) -> Vec<wire::ServiceRoute> {
        if !runs_any {
            return Vec::new();
        }
        self.services
            .all()
            .map(|s| {
                let binder = self.assignments.get(&s.deployment_id).map(|a| &a.node_id);
                wire::ServiceRoute {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    port: u32::from(s.port),
                    local: binder.is_some_and(|b| b == node_id),
                    node_id: binder.cloned().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Sends `node_id` its mesh routes (and the peers it may connect with directly) if they
    /// changed since the last ones sent.
    fn sync_routes(&mut self, node_id: &str, runs_any: bool) {
        let routes = wire::ServiceRoutes {
            routes: self.routes_for(node_id, runs_any),
            peers: self.paths.peers_of(node_id),
        };
        let Some(conn) = self.nodes.get_mut(node_id).and_then(|n| n.conn.as_mut()) else {
            return;
        };
        if conn.routes.as_ref() == Some(&routes) {
            return;
        }
        conn.routes = Some(routes.clone());
        self.send_to(node_id, wire::conductor_message::Msg::ServiceRoutes(routes));
    }

    /// The node pairs that should talk directly: a deployment placed on one connects to a
    /// service whose binder is placed on the other.
    fn wanted_pairs(&self) -> BTreeSet<paths::PairKey> {
        if !self.cfg.direct_paths {
            return BTreeSet::new();
        }
        let mut wanted = BTreeSet::new();
        for (id, names) in &self.connects {
            let Some(here) = self.assignments.get(id).map(|a| &a.node_id) else {
                continue;
            };
            for s in self.services.all().filter(|s| names.contains(&s.name)) {
                if let Some(there) = self.assignments.get(&s.deployment_id).map(|a| &a.node_id)
                    && there != here
                {
                    wanted.insert(paths::key(here, there));
                }
            }
        }
        wanted
    }

    /// Starts due hole punches and times out stale ones.
    fn drive_paths(&mut self) {
        let nodes = &self.nodes;
        let punches = self.paths.drive(now_ms(), |n| reflexive(nodes, n));
        self.send_punches(punches);
    }

    fn send_punches(&mut self, punches: paths::Punches) {
        for (node_id, punch) in punches {
            tracing::debug!(%node_id, peer = %punch.peer_id, dial = punch.dial, "hole punch");
            self.send_to(&node_id, wire::conductor_message::Msg::Punch(punch));
        }
    }

    /// The path between a connector's node and the binder's node, and its RTT: the direct
    /// connection's, or the sum of both nodes' RTTs to the conductor for the relay.
    fn path_between(&self, here: &str, there: &str) -> crate::model::ServicePath {
        let rtt = |n: &str| {
            self.nodes
                .get(n)
                .and_then(|n| n.conn.as_ref())
                .map(|c| c.session.connection().rtt().as_secs_f64() * 1000.0)
        };
        let (path, rtt_ms, direct_error) = match self.paths.state(here, there) {
            _ if here == there => ("local", Some(0.0), None),
            #[allow(clippy::cast_precision_loss)]
            Some(PairState::Direct { rtt_us, .. }) => {
                ("direct", Some(*rtt_us as f64 / 1000.0), None)
            }
            state => {
                let error = match state {
                    Some(PairState::Relay { last_error, .. }) => last_error.clone(),
                    _ => None,
                };
                let relay = rtt(here).zip(rtt(there)).map(|(a, b)| a + b);
                ("relay", relay, error)
            }
        };
        crate::model::ServicePath {
            node_id: here.to_owned(),
            path: path.to_owned(),
            rtt_ms,
            direct_error,
        }
    }

    fn assign_msg(
        &mut self,
        id: &str,
        generation: Generation,
    ) -> Option<wire::conductor_message::Msg> {
        // The node learns which service ports are now its own before the process that binds
        // them starts (it stops listening on them first).
        let node_id = self.assignments.get(id).map(|a| a.node_id.clone());
        if let Some(node_id) = &node_id {
            self.sync_routes(node_id, true);
        }
        let command_id = self.command_id();
        // From now on its log takes lines from this node only (before it can send any).
        let log_seq_floor = match &node_id {
            Some(node_id) => self.logs.placed(id, node_id),
            None => self
                .logs
                .last_seqs([id.to_owned()])
                .get(id)
                .copied()
                .unwrap_or(0),
        };
        let d = self.deployments.get(id)?;
        Some(wire::conductor_message::Msg::Assign(wire::Assign {
            deployment_id: d.id.clone(),
            generation: generation.get(),
            name: d.name.clone(),
            desired_running: d.desired_state == DesiredState::Running,
            specification_json: d.specification.to_string(),
            command_id,
            log_seq_floor,
            service_env: self
                .services
                .env(self.namespace_of(id))
                .into_iter()
                .collect(),
        }))
    }

    fn unassign(&mut self, node_id: &str, deployment_id: &str, generation: Generation) {
        // Its status reports while it stops are expected: no second Unassign, no fencing log.
        self.fenced
            .insert((node_id.to_owned(), deployment_id.to_owned(), generation));
        // ... and they tell how it ended (exited, stopped): keep its last report to narrate
        // them against.
        if let Some(r) = self
            .reported
            .get(deployment_id)
            .filter(|r| r.node_id == node_id && r.status.generation == generation.get())
        {
            let name = self
                .deployments
                .get(deployment_id)
                .map(|d| d.name.clone())
                .unwrap_or_default();
            let released = Released {
                name,
                told: r.status.clone(),
                task: self.is_task(deployment_id),
            };
            self.said
                .released
                .insert((node_id.to_owned(), deployment_id.to_owned()), released);
        }
        let command_id = self.command_id();
        let msg = wire::conductor_message::Msg::Unassign(wire::Unassign {
            deployment_id: deployment_id.to_owned(),
            generation: generation.get(),
            command_id,
        });
        self.send_to(node_id, msg);
    }

    /// The services `id` would bind with `specification` (none if the spec is invalid: the
    /// API refuses those, and a stored one fails on its node instead).
    /// `check_connects`: refuse `connects` to names nothing binds (on create, and when the
    /// spec changes; never for a stored spec whose binder went away since).
    fn plan_services(
        &self,
        id: &str,
        specification: &Value,
        check_connects: bool,
    ) -> Result<Planned, CoreError> {
        match crate::spec::parse_with_services(specification) {
            Ok((_, decl)) => self
                .services
                .plan(self.namespace_of(id), id, &decl, check_connects)
                .map(|binds| (binds, decl.connects))
                .map_err(CoreError::Invalid),
            Err(_) => Ok((Vec::new(), Vec::new())),
        }
    }

    /// Records what `id` binds and connects to (after the store has it).
    fn set_services(&mut self, id: &str, (binds, connects): Planned) {
        self.services.set(id, binds);
        if connects.is_empty() {
            self.connects.remove(id);
        } else {
            self.connects.insert(id.to_owned(), connects);
        }
    }

    /// Makes the stored services match every deployment's spec (a crash between writing a
    /// deployment and its services leaves them behind; this catches up at start).
    async fn reconcile_services(&mut self) -> Result<(), StoreError> {
        let ids: Vec<String> = self.deployments.keys().cloned().collect();
        for id in ids {
            let Some(d) = self.deployments.get(&id) else {
                continue;
            };
            match self.plan_services(&id, &d.specification, false) {
                Ok(plan) => {
                    if plan.0 != self.services.of(&id) {
                        self.store.set_services(&id, &plan.0).await?;
                    }
                    self.set_services(&id, plan);
                }
                Err(e) => tracing::warn!(deployment = %id, error = %e, "services not bound"),
            }
        }
        Ok(())
    }

    async fn create(&mut self, rec: DeploymentRecord) -> Result<(), CoreError> {
        let services = self.plan_services(&rec.id, &rec.specification, true)?;
        let ev = narrate::deployment(
            "deployment.created",
            &rec.id,
            format!(
                "{} created (desired {})",
                rec.name,
                rec.desired_state.as_str()
            ),
            json!({"name": rec.name, "desired_state": rec.desired_state.as_str()}),
        );
        self.persist(vec![ev], async |s, ev| {
            s.insert_deployment(&rec, &services.0, ev).await
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict => CoreError::Conflict("Deployment already exists".into()),
            e => e.into(),
        })?;
        self.set_services(&rec.id, services);
        self.wake(&rec.id);
        self.specs
            .insert(rec.id.clone(), parse_spec(&rec.specification));
        self.logs.ensure(&rec.id);
        if rec.desired_state == DesiredState::Running {
            self.awaiting_running
                .insert(rec.id.clone(), rec.created_at_ms);
        }
        self.deployments.insert(rec.id.clone(), rec);
        Ok(())
    }

    async fn patch(&mut self, id: &str, patch: DeploymentPatch) -> Result<(), CoreError> {
        let Some(old) = self.deployments.get(id).cloned() else {
            return Err(CoreError::NotFound("Deployment not found"));
        };
        self.not_a_task(id)?;
        let mut new = old.clone();
        if let Some(n) = patch.name {
            new.name = n;
        }
        if let Some(s) = patch.desired_state {
            new.desired_state = s;
        }
        if let Some(mut s) = patch.specification {
            // A client that round-trips a GET sends the masked token back: keep the real one
            // (only for the same repository, so a token cannot be redirected elsewhere).
            crate::spec::restore_secrets(&mut s, &old.specification);
            new.specification = s;
        }
        if new == old {
            return Ok(());
        }
        new.updated_at_ms = now_ms();
        let new_spec = parse_spec(&new.specification);
        let runtime_changed =
            new.specification != old.specification || new.desired_state != old.desired_state;
        // What happens to the assignment, decided before anything is written.
        let release = match self.assignments.get(id) {
            Some(a) if runtime_changed => {
                let old_spec = self.specs.get(id).and_then(|s| s.as_ref().ok());
                let placement_changed = match (old_spec, new_spec.as_ref().ok()) {
                    (Some(o), Some(n)) => {
                        o.capacity_requests != n.capacity_requests
                            || o.node_group != n.node_group
                            || o.env_name != n.env_name
                    }
                    _ => true,
                };
                // STOPPED holds no capacity, and a changed request, group or env must pass the
                // scheduler again (it may land on the same node, with a new generation).
                Some((
                    a.clone(),
                    new.desired_state == DesiredState::Stopped || placement_changed,
                ))
            }
            _ => None,
        };
        let spec_changed = new.specification != old.specification;
        let services = self.plan_services(id, &new.specification, spec_changed)?;
        let mut changed = Vec::new();
        if new.name != old.name {
            changed.push("name");
        }
        if new.desired_state != old.desired_state {
            changed.push("desired_state");
        }
        if spec_changed {
            changed.push("specification");
        }
        let mut events = vec![narrate::deployment(
            "deployment.updated",
            id,
            if new.desired_state == old.desired_state {
                format!("{} updated ({})", new.name, changed.join(", "))
            } else {
                format!(
                    "{} updated: desired {} -> {}",
                    new.name,
                    old.desired_state.as_str(),
                    new.desired_state.as_str()
                )
            },
            json!({"name": new.name, "changed": changed, "desired_state": new.desired_state.as_str(),
                "released_from": release.as_ref().filter(|(_, clear)| *clear).map(|(a, _)| &a.node_id)}),
        )];
        let assignment = match &release {
            Some((_, true)) => AssignmentChange::Clear,
            Some((a, false)) => {
                let rec = AssignmentRecord {
                    deployment_id: id.to_owned(),
                    node_id: a.node_id.clone(),
                    generation: self.next_generation,
                };
                events.push(narrate::deployment(
                    "deployment.placed",
                    id,
                    format!(
                        "{} placed on {} again (generation {}): its spec changed, its request did not",
                        new.name, a.node_id, rec.generation
                    ),
                    json!({"name": new.name, "node": a.node_id, "generation": rec.generation,
                        "why": "same node: the spec changed but not its request, group or env"}),
                ));
                AssignmentChange::Set(rec)
            }
            None => AssignmentChange::Keep,
        };
        // Persist everything first, in one transaction; memory changes only once it
        // committed, so a failed PATCH can simply be retried.
        self.persist(events, async |s, ev| {
            s.patch_deployment(&new, &services.0, &assignment, ev).await
        })
        .await?;
        let regenerate = match (&release, assignment) {
            (Some((a, true)), _) => {
                self.unassign(&a.node_id, id, a.generation);
                None
            }
            (_, AssignmentChange::Set(rec)) => {
                self.next_generation = rec.generation.next();
                self.metrics.placements.inc();
                Some((rec.node_id, rec.generation))
            }
            _ => None,
        };
        self.wake(id);
        self.specs.insert(id.to_owned(), new_spec);
        if new.desired_state == DesiredState::Stopped {
            self.awaiting_running.remove(id);
        } else if old.desired_state == DesiredState::Stopped {
            self.awaiting_running
                .insert(id.to_owned(), new.updated_at_ms);
        }
        self.deployments.insert(id.to_owned(), new);
        self.set_services(id, services);
        if matches!(release, Some((_, true))) {
            self.assignments.remove(id);
            self.reported.remove(id);
        }
        if let Some((node_id, generation)) = regenerate {
            // A new generation carries the new spec to the same node.
            self.assignments.insert(
                id.to_owned(),
                scheduler::Assignment {
                    node_id: node_id.clone(),
                    generation,
                },
            );
            if let Some(msg) = self.assign_msg(id, generation) {
                self.send_to(&node_id, msg);
            }
        }
        Ok(())
    }

    async fn delete(&mut self, id: &str) -> Result<(), CoreError> {
        self.not_a_task(id)?;
        if !self.deployments.contains_key(id) {
            return Err(CoreError::NotFound("Deployment not found"));
        }
        if let Some((e, p)) = self.process_of(id) {
            return Err(CoreError::Conflict(format!(
                "deployment {id} is process {:?} of experiment {:?}: delete the experiment, or stop the process",
                p.name, e.name
            )));
        }
        let name = self
            .deployments
            .get(id)
            .map(|d| d.name.clone())
            .unwrap_or_default();
        let ev = narrate::deployment(
            "deployment.deleted",
            id,
            format!("{name} deleted"),
            json!({"name": name}),
        );
        self.persist(vec![ev], async |s, ev| s.delete_deployment(id, ev).await)
            .await?;
        self.forget(id);
        Ok(())
    }

    /// Drops a deleted deployment from memory and stops it on its node.
    fn forget(&mut self, id: &str) {
        self.wake(id);
        if let Some(a) = self.assignments.remove(id) {
            self.unassign(&a.node_id, id, a.generation);
        }
        self.awaiting_running.remove(id);
        self.services.remove(id);
        self.connects.remove(id);
        self.deployments.remove(id);
        self.specs.remove(id);
        self.reported.remove(id);
        self.masked_specs.remove(id);
        self.logs.remove(id);
    }

    async fn create_env(&mut self, rec: CondaEnvRecord) -> Result<(), CoreError> {
        let ev = narrate::env(
            "env.defined",
            &rec.name,
            format!(
                "env {} defined ({}, python {})",
                rec.name, rec.manager, rec.python_version
            ),
            json!({"manager": rec.manager, "python_version": rec.python_version,
                "packages": rec.packages.len()}),
        );
        self.persist(vec![ev], async |s, ev| s.insert_conda_env(&rec, ev).await)
            .await
            .map_err(|e| match e {
                StoreError::Conflict => {
                    CoreError::Conflict("Conda env with that name already exists".into())
                }
                e => e.into(),
            })?;
        self.envs.insert(rec.name.clone(), rec.clone());
        self.broadcast_env(&rec, false);
        Ok(())
    }

    async fn patch_env(&mut self, name: &str, patch: EnvPatch) -> Result<(), CoreError> {
        let Some(mut env) = self.envs.get(name).cloned() else {
            return Err(CoreError::NotFound("Conda env not found"));
        };
        if let Some(p) = patch.packages {
            env.packages = p;
        }
        if let Some(s) = patch.custom_script {
            env.custom_script = s;
        }
        env.updated_at_ms = now_ms();
        let ev = narrate::env(
            "env.updated",
            name,
            format!("env {name} changed; nodes recreate it"),
            json!({"packages": env.packages.len()}),
        );
        self.persist(vec![ev], async |s, ev| s.update_conda_env(&env, ev).await)
            .await?;
        self.envs.insert(name.to_owned(), env.clone());
        self.broadcast_env(&env, true);
        Ok(())
    }

    /// Deletes an env definition and has every node remove its copy (B1: the original left
    /// deleted envs on the nodes). Refused while a deployment that should run uses it.
    async fn delete_env(&mut self, name: &str) -> Result<(), CoreError> {
        if !self.envs.contains_key(name) {
            return Err(CoreError::NotFound("Conda env not found"));
        }
        let users: Vec<&str> = self
            .deployments
            .values()
            .filter(|d| d.desired_state != DesiredState::Stopped)
            .filter(|d| {
                self.specs.get(&d.id).is_some_and(|s| {
                    s.as_ref()
                        .is_ok_and(|s| s.env_name.as_deref() == Some(name))
                })
            })
            .map(|d| d.id.as_str())
            .collect();
        if !users.is_empty() {
            return Err(CoreError::Conflict(format!(
                "Conda env {name} is used by deployments that should run: {}; stop or change them first",
                users.join(", ")
            )));
        }
        let ev = narrate::env(
            "env.deleted",
            name,
            format!("env {name} deleted; nodes remove it"),
            json!({}),
        );
        match self
            .persist(vec![ev], async |s, ev| s.delete_conda_env(name, ev).await)
            .await
        {
            Ok(()) => {}
            Err(StoreError::NotFound) => return Err(CoreError::NotFound("Conda env not found")),
            Err(e) => return Err(e.into()),
        }
        self.envs.remove(name);
        // Nothing new is placed on it from now on, whatever a node reported last.
        for node in self.nodes.values_mut() {
            node.env_names.remove(name);
        }
        self.changed = true;
        for id in self.nodes.keys() {
            self.send_env_set(id);
        }
        Ok(())
    }

    /// Sends a node every env definition, marked complete: it creates what it lacks and
    /// removes the envs it created that are no longer defined.
    fn send_env_set(&self, node_id: &str) {
        let envs = self
            .envs
            .values()
            .map(|e| Self::env_spec(e, false))
            .collect();
        self.send_to(
            node_id,
            wire::conductor_message::Msg::EnvEnsure(wire::EnvEnsure {
                envs,
                complete: true,
            }),
        );
    }

    fn env_spec(env: &CondaEnvRecord, force: bool) -> wire::EnvSpec {
        wire::EnvSpec {
            name: env.name.clone(),
            python_version: env.python_version.clone(),
            packages: env.packages.clone(),
            custom_script: env.custom_script.clone().unwrap_or_default(),
            manager: env.manager.clone(),
            force_recreate: force,
        }
    }

    fn broadcast_env(&self, env: &CondaEnvRecord, force: bool) {
        let msg = wire::conductor_message::Msg::EnvEnsure(wire::EnvEnsure {
            envs: vec![Self::env_spec(env, force)],
            complete: false,
        });
        for id in self.nodes.keys() {
            self.send_to(id, msg.clone());
        }
    }

    async fn connected(&mut self, c: NodeConnected) {
        let NodeConnected {
            node_id,
            epoch,
            hello,
            tx,
            session,
        } = c;
        if let Some((code, why)) = self.hello_refusal(&node_id, &hello.groups) {
            tracing::warn!(%node_id, %why, "refusing a node's hello");
            session.close(code, &why);
            self.journal.note(narrate::node(
                "node.refused",
                &node_id,
                format!("node {node_id} refused: {why}"),
                json!({"reason": why, "groups": hello.groups}),
            ));
            return;
        }
        let now = now_ms();
        let node = self.nodes.entry(node_id.clone()).or_insert_with(|| Node {
            first_seen_ms: now,
            ..Node::default()
        });
        // Epochs are handed out in accept order; a Hello that lost a race to a newer
        // connection of the same node is the one to go.
        if node.conn.as_ref().is_some_and(|c| c.epoch > epoch) {
            session.close(
                symphony_net::CloseCode::Superseded,
                "a newer connection of this node took over",
            );
            return;
        }
        if let Some(old) = node.conn.take() {
            old.session.close(
                symphony_net::CloseCode::Superseded,
                "a newer connection of this node took over",
            );
        }
        node.groups = hello.groups.clone();
        node.capacities_total = hello.capacities_total.clone().into_iter().collect();
        node.resources = hello.resources.clone();
        node.env_names = hello.env_names.iter().cloned().collect();
        node.reported_envs.clone_from(&node.env_names);
        node.last_seen_ms = now;
        node.connections += 1;
        let remote = session.facts().remote;
        node.remote = Some(remote);
        let reconnects = node.connections - 1;
        self.metrics.connections.inc();
        node.conn = Some(Connection {
            epoch,
            tx,
            session,
            connected_at_ms: now,
            routes: None,
        });
        let record = NodeRecord {
            node_id: node_id.clone(),
            groups: node.groups.clone(),
            capacities_total: node.capacities_total.clone(),
            first_seen_ms: node.first_seen_ms,
            last_seen_ms: now,
        };
        let ev = narrate::node(
            "node.connected",
            &node_id,
            format!("node {node_id} connected from {remote}"),
            json!({"address": remote.to_string(), "epoch": epoch, "reconnects": reconnects,
                "inventory": hello.inventory.len()}),
        );
        if let Err(e) = self
            .persist(vec![ev], async |s, ev| s.upsert_node(&record, ev).await)
            .await
        {
            tracing::warn!(%node_id, error = %e, "could not persist node");
        }
        tracing::info!(%node_id, epoch, inventory = hello.inventory.len(), "node connected");

        // Reconcile the node's inventory against our assignments (fencing).
        self.fenced.retain(|(n, _, _)| n != &node_id);
        if self.awaiting_hello.remove(&node_id) && self.awaiting_hello.is_empty() {
            // Every node known at the start has said what it holds.
            self.unsettled.clear();
        }
        let mut held = BTreeSet::new();
        for st in hello.inventory {
            held.insert(st.deployment_id.clone());
            self.reconcile_status(&node_id, st, true).await;
        }
        // Copies it released and no longer holds are gone (their `removed` may have been lost
        // with the old connection).
        self.said
            .released
            .retain(|(n, d), _| n != &node_id || held.contains(d));
        // Resend what this node should run (idempotent by generation).
        let mine: Vec<(String, Generation)> = self
            .assignments
            .iter()
            .filter(|(_, a)| a.node_id == node_id)
            .map(|(id, a)| (id.clone(), a.generation))
            .collect();
        let resume = self.logs.last_seqs(mine.iter().map(|(id, _)| id.clone()));
        self.send_to(
            &node_id,
            wire::conductor_message::Msg::LogResume(wire::LogResume {
                last_seq: resume.into_iter().collect(),
            }),
        );
        for (id, generation) in mine {
            if let Some(msg) = self.assign_msg(&id, generation) {
                self.send_to(&node_id, msg);
            }
        }
        // Always, even when empty: a node that missed a DELETE removes that env now.
        self.send_env_set(&node_id);
        self.needs_schedule = true;
    }

    /// Accepts a status from a node, or fences it off when the node should not hold it.
    /// `inventory`: it comes with the node's Hello (a first report from there is where the
    /// story resumes, not news).
    async fn reconcile_status(
        &mut self,
        node_id: &str,
        st: wire::DeploymentStatus,
        inventory: bool,
    ) {
        let id = st.deployment_id.clone();
        let held = Generation(st.generation);
        if held >= self.next_generation {
            // Only possible after the store was restored from an older copy: never hand out a
            // generation a node has already seen.
            self.next_generation = held.next();
            if let Err(e) = self.store.bump_generation(held).await {
                tracing::error!(error = %e, "could not persist the generation counter");
            }
        }
        let ours = self.assignments.get(&id).cloned();
        match ours {
            Some(a) if a.node_id == node_id && a.generation == held => {
                let previous = self
                    .reported
                    .get(&id)
                    .map(|r| &r.status)
                    .filter(|p| p.generation == st.generation);
                let watch = previous.is_none_or(|p| p.state != st.state)
                    && self.members.contains_key(&id)
                    && self
                        .deployments
                        .get(&id)
                        .is_some_and(|d| d.desired_state == DesiredState::Running);
                if let Some(p) = previous {
                    // Only increases seen between two reports of one generation count: a
                    // count accumulated before this conductor heard of it is not counted
                    // twice after a restart.
                    self.metrics
                        .restarts
                        .inc_by(u64::from(st.restart_count.saturating_sub(p.restart_count)));
                    self.metrics.health_failures.inc_by(u64::from(
                        st.health_failures.saturating_sub(p.health_failures),
                    ));
                }
                // Narrated against the node's last report of any generation: its counters
                // (health failures, cron restarts) live as long as the node's copy.
                let told = self
                    .reported
                    .get(&id)
                    .filter(|r| r.node_id == node_id)
                    .map(|r| &r.status);
                // A copy placed before this conductor started, first heard of in a Hello: where
                // its story resumes. (A placement of this run whose first report was lost with
                // a connection is still news.)
                let loaded = self.said.loaded.remove(&(id.clone(), st.generation));
                if told.is_none() && inventory && loaded {
                    self.said.resumed.insert(id.clone());
                } else {
                    let name = self.deployments.get(&id).map_or("", |d| d.name.as_str());
                    let task = self.is_task(&id);
                    for ev in narrate::status(name, node_id, told, &st) {
                        if !(task && narrate::told_by_task(&ev)) {
                            self.journal.note(ev);
                        }
                    }
                }
                if st.state == crate::model::CurrentState::Running.as_str()
                    && let Some(since) = self.awaiting_running.remove(&id)
                {
                    #[allow(clippy::cast_precision_loss)]
                    let secs = now_ms().saturating_sub(since).max(0) as f64 / 1000.0;
                    self.metrics.post_to_running.observe(secs);
                }
                let (state, reason) = (st.state.clone(), st.reason.clone());
                self.task_status(&id, &st);
                self.wake(&id);
                self.reported.insert(
                    id.clone(),
                    Reported {
                        node_id: node_id.to_owned(),
                        status: st,
                    },
                );
                self.changed = true;
                if watch {
                    self.on_process_status(&id, &state, &reason).await;
                }
            }
            Some(a) if a.node_id == node_id && held < a.generation => {
                // An older generation on the right node: the Assign we (re)send replaces it.
            }
            Some(a) if a.node_id == node_id => {
                // The node holds a newer generation than our records (restored store): move the
                // assignment past it so the node accepts our Assign.
                tracing::warn!(%node_id, %id, %held, assigned = %a.generation, "node holds a newer generation; re-issuing");
                if let Err(e) = self.reassign_here(&id, node_id).await {
                    tracing::error!(%id, error = %e, "could not persist a new generation");
                }
            }
            _ => {
                // One Unassign per stale copy: its further status reports (while it stops) need
                // no second one; a new Hello clears this so a copy that survived is fenced again.
                let key = (node_id.to_owned(), id.clone());
                let released = match self
                    .said
                    .released
                    .get_mut(&key)
                    .filter(|r| r.told.generation == st.generation)
                {
                    Some(r) => {
                        for ev in narrate::status(&r.name, node_id, Some(&r.told), &st) {
                            if !(r.task && narrate::told_by_task(&ev)) {
                                self.journal.note(ev);
                            }
                        }
                        r.told = st.clone();
                        true
                    }
                    None => false,
                };
                if self.fenced.insert((node_id.to_owned(), id.clone(), held)) {
                    // A copy it was told to stop that is still stopping (told again after a
                    // reconnect) is no news; any other is a stale copy fenced off.
                    if !released {
                        tracing::info!(%node_id, %id, generation = %held, "fencing: node holds a copy it should not; unassigning");
                        self.journal.note(narrate::deployment(
                            "deployment.fenced",
                            &id,
                            format!(
                                "node {node_id} holds a copy (generation {held}) it should not; told to stop it"
                            ),
                            json!({"node": node_id, "generation": held, "assigned": ours.map(|a| json!({"node": a.node_id, "generation": a.generation}))}),
                        ));
                    }
                    self.unassign(node_id, &id, held);
                }
            }
        }
    }

    /// Gives `id` a new generation on `node_id` (persisted), and sends the Assign.
    async fn reassign_here(&mut self, id: &str, node_id: &str) -> Result<(), CoreError> {
        let generation = self.next_generation;
        let rec = AssignmentRecord {
            deployment_id: id.to_owned(),
            node_id: node_id.to_owned(),
            generation,
        };
        let ev = narrate::deployment(
            "deployment.placed",
            id,
            format!(
                "placed on {node_id} again (generation {generation}): the node held a newer generation than the conductor's records"
            ),
            json!({"node": node_id, "generation": generation,
                "why": "the node already runs it at a newer generation (restored store)"}),
        );
        self.persist(vec![ev], async |s, ev| {
            s.apply_placements(std::slice::from_ref(&rec), &[], generation, ev)
                .await
        })
        .await?;
        self.next_generation = generation.next();
        self.metrics.placements.inc();
        self.wake(id);
        self.assignments.insert(
            id.to_owned(),
            scheduler::Assignment {
                node_id: node_id.to_owned(),
                generation,
            },
        );
        // A task's attempt runs on as this generation: its end reports name it.
        self.task_placed(id, node_id, generation.get());
        self.changed = true;
        if let Some(msg) = self.assign_msg(id, generation) {
            self.send_to(node_id, msg);
        }
        Ok(())
    }

    async fn node_message(&mut self, node_id: &str, msg: wire::node_message::Msg) {
        use wire::node_message::Msg;
        match msg {
            Msg::Status(update) => {
                self.reports += update.deployments.len() + update.removed.len();
                for st in update.deployments {
                    self.reconcile_status(node_id, st, false).await;
                }
                for id in update.removed {
                    let before = self.fenced.len();
                    self.fenced.retain(|(n, d, _)| !(n == node_id && *d == id));
                    // A start that waited for this copy to go may be placed now.
                    self.needs_schedule |= self.fenced.len() != before;
                    self.said.released.remove(&(node_id.to_owned(), id.clone()));
                    if self.reported.get(&id).is_some_and(|r| r.node_id == node_id) {
                        self.wake(&id);
                        self.reported.remove(&id);
                        self.changed = true;
                    }
                }
            }
            Msg::EnvReport(report) => {
                for problem in &report.problems {
                    tracing::warn!(%node_id, %problem, "env work on a node went wrong");
                }
                self.narrate_envs(node_id, &report);
                if let Some(n) = self.nodes.get_mut(node_id) {
                    n.env_names = report.env_names.into_iter().collect();
                    n.env_problems = report.problems;
                }
                self.changed = true;
                self.needs_schedule = true;
            }
            Msg::Result(r) => {
                if !r.ok {
                    tracing::info!(%node_id, command_id = r.command_id, message = %r.message, "node refused a command");
                }
            }
            Msg::PeerPath(report) => {
                let nodes = &self.nodes;
                let (punches, path_changed) = self
                    .paths
                    .report(node_id, &report, now_ms(), |n| reflexive(nodes, n));
                self.send_punches(punches);
                // A new path shows at once; an RTT refresh with the next tick's publish.
                if path_changed {
                    self.metrics.path_changes.inc();
                    self.changed = true;
                } else {
                    self.dirty = true;
                }
            }
            Msg::Hello(_) => tracing::info!(%node_id, "ignoring a second hello"),
            // Answered by the node's session (see `sessions`), never queued here.
            Msg::Renew(_) => {}
        }
    }

    fn sched_nodes(&self, now: i64) -> Vec<scheduler::NodeView> {
        let suspect = millis(self.cfg.suspect_after);
        let grace = millis(self.cfg.grace).saturating_sub(suspect);
        self.nodes
            .iter()
            .map(|(id, n)| scheduler::NodeView {
                id: id.clone(),
                groups: n.groups.clone(),
                capacities_total: n.capacities_total.clone(),
                conda_envs: n.env_names.clone(),
                // A revoked node is lost at once: its deployments go elsewhere, fenced.
                state: if self.trust.is_revoked(id) {
                    scheduler::NodeState::Lost
                } else {
                    scheduler::liveness(
                        u64::try_from(n.last_seen_ms).unwrap_or(0),
                        n.conn.is_some(),
                        u64::try_from(now).unwrap_or(0),
                        suspect,
                        grace,
                    )
                },
            })
            .collect()
    }

    fn sched_deployments(&self, nodes: &[scheduler::NodeView]) -> Vec<scheduler::DeploymentView> {
        // A copy told to stop on a node that is not lost may still run: the deployment is not
        // placed again until that node says it is gone (or is lost), else it could run twice
        // (a stop then a start, its node away meanwhile). Found by the fault suite.
        let lost: BTreeSet<&str> = nodes
            .iter()
            .filter(|n| n.state == scheduler::NodeState::Lost)
            .map(|n| n.id.as_str())
            .collect();
        let stopping: HashSet<&str> = self
            .fenced
            .iter()
            .filter(|(node, _, _)| !lost.contains(node.as_str()))
            .map(|(_, id, _)| id.as_str())
            .collect();
        let unsettled = if self
            .awaiting_hello
            .iter()
            .all(|n| lost.contains(n.as_str()))
        {
            None
        } else {
            Some(&self.unsettled)
        };
        // Every deployment that wants to run or is held is hot; a stopped deployment no node
        // holds takes no part in placement.
        self.hot
            .iter()
            .filter_map(|id| self.deployments.get(id))
            .filter(|d| {
                d.desired_state == DesiredState::Running || self.assignments.contains_key(&d.id)
            })
            .map(|d| {
                let spec = self.specs.get(&d.id).and_then(|s| s.as_ref().ok());
                scheduler::DeploymentView {
                    id: d.id.clone(),
                    created_at_ms: u64::try_from(d.created_at_ms).unwrap_or(0),
                    // A task's deployment is wanted only while its attempt runs.
                    desired_running: d.desired_state == DesiredState::Running
                        && spec.is_some()
                        && self.task_wanted(&d.id).unwrap_or(true)
                        && (self.assignments.contains_key(&d.id)
                            || !(stopping.contains(d.id.as_str())
                                || unsettled.is_some_and(|u| u.contains(&d.id)))),
                    node_group: spec.and_then(|s| s.node_group.clone()),
                    capacity_requests: spec
                        .map(|s| s.capacity_requests.clone())
                        .unwrap_or_default(),
                    env_name: spec.and_then(|s| s.env_name.clone()),
                    assignment: self.assignments.get(&d.id).cloned(),
                    colocate: self.members.get(&d.id).and_then(|m| m.colocate.clone()),
                    gang: self.members.get(&d.id).and_then(|m| m.gang.clone()),
                }
            })
            .collect()
    }

    /// Runs the scheduler, persists its decisions, then tells the nodes.
    async fn schedule(&mut self, nodes: &[scheduler::NodeView]) {
        let deps = self.sched_deployments(nodes);
        let started = std::time::Instant::now();
        let mut plan = scheduler::plan(nodes, &deps, self.next_generation, self.cfg.strategy);
        // A task whose node was lost is not placed again in this pass: its attempt ended
        // (counted, then retried by its policy with a new attempt).
        let lost_tasks: Vec<(String, String)> = plan
            .unassign
            .iter()
            .filter(|(id, _)| self.task_wanted(id) == Some(true))
            .map(|(id, old)| (id.clone(), old.node_id.clone()))
            .collect();
        if !lost_tasks.is_empty() {
            plan.placements
                .retain(|p| !lost_tasks.iter().any(|(id, _)| *id == p.deployment_id));
        }
        self.metrics
            .scheduling_pass
            .observe(started.elapsed().as_secs_f64());
        if plan.placements.is_empty() && plan.unassign.is_empty() {
            return;
        }
        let set: Vec<AssignmentRecord> = plan
            .placements
            .iter()
            .map(|p| AssignmentRecord {
                deployment_id: p.deployment_id.clone(),
                node_id: p.node_id.clone(),
                generation: p.generation,
            })
            .collect();
        let placed: BTreeSet<&str> = set.iter().map(|a| a.deployment_id.as_str()).collect();
        let clear: Vec<String> = plan
            .unassign
            .iter()
            .map(|(id, _)| id.clone())
            .filter(|id| !placed.contains(id.as_str()))
            .collect();
        let events = self.placement_events(&plan);
        let high = Generation(plan.next_generation.get().saturating_sub(1));
        if let Err(e) = self
            .persist(events, async |s, ev| {
                s.apply_placements(&set, &clear, high, ev).await
            })
            .await
        {
            tracing::error!(error = %e, "could not persist placements; not acting on them");
            return;
        }
        self.next_generation = plan.next_generation;
        self.changed = true;
        for (id, old) in &plan.unassign {
            tracing::info!(deployment = %id, node = %old.node_id, "node lost; releasing assignment");
            self.wake(id);
            self.assignments.remove(id);
            // A lost node may still be connected (silent, not gone): fence it now rather
            // than at its next Hello.
            self.unassign(&old.node_id, id, old.generation);
            // Its copy was not told in time: if the node comes back holding it, that is news
            // (`deployment.fenced`), not a stop running its course.
            self.said
                .released
                .remove(&(old.node_id.clone(), id.clone()));
            if self
                .reported
                .get(id)
                .is_some_and(|r| r.node_id == old.node_id)
            {
                self.reported.remove(id);
            }
        }
        self.tasks_lost(&lost_tasks);
        self.metrics.placements.inc_by(plan.placements.len() as u64);
        for p in plan.placements {
            self.task_placed(&p.deployment_id, &p.node_id, p.generation.get());
            tracing::info!(deployment = %p.deployment_id, node = %p.node_id, generation = %p.generation, "placed");
            self.wake(&p.deployment_id);
            self.assignments.insert(
                p.deployment_id.clone(),
                scheduler::Assignment {
                    node_id: p.node_id.clone(),
                    generation: p.generation,
                },
            );
            if let Some(msg) = self.assign_msg(&p.deployment_id, p.generation) {
                self.send_to(&p.node_id, msg);
            }
        }
    }

    /// For each node that runs a connector of `s`, the path its tunnels take to the binder.
    fn service_paths(&self, s: &Service) -> Vec<crate::model::ServicePath> {
        let Some(there) = self.assignments.get(&s.deployment_id).map(|a| &a.node_id) else {
            return Vec::new();
        };
        let here: BTreeSet<&String> = self
            .connects
            .iter()
            .filter(|(_, names)| names.contains(&s.name))
            .filter_map(|(id, _)| self.assignments.get(id).map(|a| &a.node_id))
            .collect();
        here.into_iter()
            .map(|n| self.path_between(n, there))
            .collect()
    }

    /// Stopped, held by no node, nothing reported, a valid spec: its view changes only with
    /// its record.
    fn is_quiet(&self, d: &DeploymentRecord) -> bool {
        d.desired_state == DesiredState::Stopped
            && !self.assignments.contains_key(&d.id)
            && !self.reported.contains_key(&d.id)
            && self.specs.get(&d.id).is_some_and(Result::is_ok)
    }

    /// One deployment's view; a masked spec built anew is pushed on `masked` for the cache.
    fn build_view(
        &self,
        d: &DeploymentRecord,
        reasons: &BTreeMap<String, scheduler::Unplaced>,
        any_online: bool,
        gpus: &HashMap<&str, Vec<&wire::DeploymentGpu>>,
        masked: &mut Vec<(String, (i64, Arc<Value>))>,
    ) -> Arc<Deployment> {
        let assignment = self.assignments.get(&d.id);
        // Only a report about the current assignment describes what runs now.
        let reported = self.reported.get(&d.id).filter(|r| {
            assignment.is_some_and(|a| {
                a.node_id == r.node_id && a.generation == Generation(r.status.generation)
            })
        });
        let spec = match self.masked_specs.get(&d.id) {
            Some((at, spec)) if *at == d.updated_at_ms => spec.clone(),
            _ => {
                let mut spec = d.specification.clone();
                crate::spec::mask_secrets(&mut spec);
                let spec = Arc::new(spec);
                masked.push((d.id.clone(), (d.updated_at_ms, spec.clone())));
                spec
            }
        };
        let facts = view::DeploymentFacts {
            record: d,
            invalid: self
                .specs
                .get(&d.id)
                .and_then(|s| s.as_ref().err())
                .map(String::as_str),
            assignment,
            reported: reported.map(|r| (r.node_id.as_str(), &r.status)),
            unplaced: reasons.get(&d.id).copied(),
            any_online,
            gpus: gpus.get(d.id.as_str()).map_or(&[], Vec::as_slice),
        };
        Arc::new(view::deployment(facts, spec))
    }

    /// Debug builds (every test) check what publishing trusts: each deployment is hot or
    /// quiet, and each quiet view is what building it again gives (a change that forgot
    /// [`Core::wake`] fails here).
    #[cfg(debug_assertions)]
    fn check_quiet(
        &self,
        reasons: &BTreeMap<String, scheduler::Unplaced>,
        any_online: bool,
        gpus: &HashMap<&str, Vec<&wire::DeploymentGpu>>,
    ) {
        assert_eq!(
            self.quiet.len(),
            self.quiet_at.len(),
            "quiet index out of step"
        );
        for d in self.deployments.values() {
            if self.hot.contains(&d.id) {
                continue;
            }
            let cached = self
                .quiet
                .get(&(std::cmp::Reverse(d.created_at_ms), d.id.clone()))
                .unwrap_or_else(|| panic!("deployment {} is neither hot nor quiet", d.id));
            assert!(
                self.is_quiet(d),
                "deployment {} changed without a wake",
                d.id
            );
            let fresh = self.build_view(d, reasons, any_online, gpus, &mut Vec::new());
            assert_eq!(**cached, *fresh, "quiet view of {} is stale", d.id);
        }
    }

    /// Builds the API's view of the cluster (the pure parts are in [`view`]) and publishes it.
    fn publish(&mut self, nodes: &[scheduler::NodeView]) {
        self.dirty = false;
        // One pass over the assignments for all nodes (not one per node).
        let running: HashSet<String> = self
            .assignments
            .values()
            .map(|a| a.node_id.clone())
            .collect();
        let connected: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.conn.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        let wanted = self.wanted_pairs();
        self.paths.want(wanted, now_ms());
        for node_id in connected {
            let runs_any = running.contains(&node_id);
            self.sync_routes(&node_id, runs_any);
        }
        self.published_states = nodes.iter().map(|n| n.state).collect();
        let deps = self.sched_deployments(nodes);
        let reasons = scheduler::reasons(nodes, &deps, self.cfg.strategy);
        // What the first publish after a start finds is where the story resumes.
        self.journal.quiet = !self.said.primed;
        self.narrate_unplaced(&reasons);
        let reserved = scheduler::reserved(nodes, &deps);
        let any_online = nodes
            .iter()
            .any(|n| n.state == scheduler::NodeState::Online);

        // GPU use per deployment, from the heartbeat of the node it is assigned to.
        let mut gpus: HashMap<&str, Vec<&wire::DeploymentGpu>> = HashMap::new();
        for (node_id, n) in &self.nodes {
            for g in n.usage.iter().flat_map(|u| &u.deployment_gpus) {
                if self
                    .assignments
                    .get(&g.deployment_id)
                    .is_some_and(|a| &a.node_id == node_id)
                {
                    gpus.entry(g.deployment_id.as_str()).or_default().push(g);
                }
            }
        }
        let mut masked = Vec::new();
        let mut gone = Vec::new();
        let mut quieted = Vec::new();
        let mut built = Vec::new();
        let mut live: Vec<Arc<Deployment>> = Vec::with_capacity(self.hot.len());
        for id in &self.hot {
            let Some(d) = self.deployments.get(id) else {
                gone.push(id.clone());
                continue;
            };
            let unplaced = reasons.get(id).copied();
            let used = gpus.get(id.as_str()).map_or(&[][..], Vec::as_slice);
            let cached = self.hot_views.get(id).filter(|c| {
                !self.woken.contains(id)
                    && c.unplaced == unplaced
                    && c.any_online == any_online
                    && c.gpus.iter().eq(used.iter().copied())
            });
            if let Some(c) = cached {
                #[cfg(debug_assertions)]
                {
                    let fresh = self.build_view(d, &reasons, any_online, &gpus, &mut Vec::new());
                    assert_eq!(*c.view, *fresh, "hot view of {id} is stale (no wake)");
                }
                live.push(c.view.clone());
                continue;
            }
            let v = self.build_view(d, &reasons, any_online, &gpus, &mut masked);
            if self.is_quiet(d) {
                quieted.push((d.id.clone(), v));
            } else {
                let memo = HotView {
                    view: v.clone(),
                    unplaced,
                    any_online,
                    gpus: used.iter().map(|&g| g.clone()).collect(),
                };
                built.push((id.clone(), memo));
                live.push(v);
            }
        }
        // Only what was built anew goes into the cache (entries leave with their deployment).
        self.masked_specs.extend(masked);
        self.hot_views.extend(built);
        self.woken.clear();
        for id in gone {
            self.hot.remove(&id);
            self.hot_views.remove(&id);
        }
        for (id, v) in quieted {
            // Its view now lives in `quiet`, with its masked spec.
            self.hot.remove(&id);
            self.hot_views.remove(&id);
            self.masked_specs.remove(&id);
            self.quiet_at.insert(id.clone(), v.created_at_ms);
            self.quiet
                .insert((std::cmp::Reverse(v.created_at_ms), id), v);
        }
        #[cfg(debug_assertions)]
        self.check_quiet(&reasons, any_online, &gpus);
        let order = |a: &Arc<Deployment>, b: &Arc<Deployment>| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        };
        live.sort_by(order);
        // Both are in the published order: merge them.
        let mut deployments = Vec::with_capacity(live.len() + self.quiet.len());
        let mut quiet = self.quiet.values().peekable();
        for v in live {
            while let Some(q) = quiet.next_if(|q| order(q, &v).is_lt()) {
                deployments.push(q.clone());
            }
            deployments.push(v);
        }
        deployments.extend(quiet.cloned());

        let defined: BTreeSet<String> = self.envs.keys().cloned().collect();
        let mut assigned_to: HashMap<&str, Vec<AssignedRef>> = HashMap::new();
        for (dep, a) in &self.assignments {
            assigned_to
                .entry(a.node_id.as_str())
                .or_default()
                .push(AssignedRef {
                    id: DeploymentId::from(dep.as_str()),
                    name: self
                        .deployments
                        .get(dep)
                        .map_or_else(|| dep.clone(), |d| d.name.clone()),
                });
        }
        let mut node_views = BTreeMap::new();
        // Connected nodes whose remote address changed since the last look.
        let mut moved = Vec::new();
        for (sn, (id, n)) in nodes.iter().zip(&self.nodes) {
            let assigned = assigned_to.remove(id.as_str()).unwrap_or_default();
            let connection = n.conn.as_ref().map(|c| {
                let f = c.session.facts();
                if n.remote != Some(f.remote) {
                    moved.push((id.clone(), f.remote));
                }
                NodeConnection {
                    remote_addr: f.remote.to_string(),
                    connected_since_ms: c.connected_at_ms,
                    rtt_ms: f.rtt.as_secs_f64() * 1000.0,
                    path_changes: f.path_changes,
                    reconnects: n.connections.saturating_sub(1),
                }
            });
            let facts = view::NodeFacts {
                id,
                state: sn.state,
                groups: &n.groups,
                capacities_total: &n.capacities_total,
                reserved: reserved.get(id),
                last_heartbeat_ms: n.last_heartbeat_ms,
                resources: n.resources.as_ref(),
                usage: n.usage.as_ref(),
                env_names: &n.env_names,
                defined_envs: &defined,
                env_problems: &n.env_problems,
            };
            let mut v = view::node(facts, assigned, connection);
            v.certificate = self
                .trust
                .nodes
                .get(id)
                .map(|t| view::certificate(t, now_ms()));
            node_views.insert(id.clone(), v);
        }
        let mut envs: Vec<CondaEnvRecord> = self.envs.values().cloned().collect();
        envs.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| a.name.cmp(&b.name))
        });
        let experiments = self.experiment_views(&deployments);
        let services: Vec<crate::model::ServiceInfo> = self
            .services
            .all()
            .map(|s| crate::model::ServiceInfo {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                host: SERVICE_HOST.to_owned(),
                port: s.port,
                exposed: s.exposed,
                deployment_id: s.deployment_id.clone(),
                deployment_name: self
                    .deployments
                    .get(&s.deployment_id)
                    .map(|d| d.name.clone())
                    .unwrap_or_default(),
                node_id: self
                    .assignments
                    .get(&s.deployment_id)
                    .map(|a| a.node_id.clone()),
                connectors: self
                    .connects
                    .iter()
                    .filter(|(_, names)| names.contains(&s.name))
                    .map(|(id, _)| id.clone())
                    .collect(),
                paths: self.service_paths(s),
            })
            .collect();
        self.narrate_services(&services);
        self.narrate_paths(moved);
        self.journal.quiet = false;
        self.said.primed = true;
        self.said.resumed.clear();
        let mut runs: Vec<Arc<super::runs::Run>> = self.runs.runs.values().cloned().collect();
        runs.sort_by(|a, b| b.queued_at_ms.cmp(&a.queued_at_ms).then(b.seq.cmp(&a.seq)));
        self.view.send_replace(Arc::new(ClusterView {
            deployments,
            nodes: node_views,
            conda_envs: envs,
            services,
            experiments,
            runs,
            workflows: self.workflow_infos(),
        }));
    }
}
