//! A test cluster: one conductor and any number of in-process node agents, with helpers to
//! await states through the conductor's published snapshot.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use symphony::conductor::core::{CoreMsg, TrustMsg};
use symphony::conductor::trust::Role;
use symphony::conductor::view::ClusterView;
use symphony::conductor::{Conductor, ConductorConfig};
use symphony::model::CurrentState;
use symphony::node::agent::NodeConfig;
use symphony::node::state::StateStore;
use symphony_net::TransportSettings;
use symphony_net::impair::UdpProxy;
use tokio_util::sync::CancellationToken;

/// Upper bound for any awaited state.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn fast_transport() -> TransportSettings {
    TransportSettings {
        keep_alive: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(1200),
        path_poll_interval: Duration::from_millis(50),
        ..TransportSettings::default()
    }
}

/// How to start an in-process agent (see `Cluster::start_agent`).
#[derive(Default)]
struct Agent<'a> {
    groups: &'a [&'a str],
    caps: &'a [(&'a str, i64)],
    /// Reach the conductor through an impairment proxy.
    via_proxy: bool,
    /// Keep the local state here (default: the agent's file).
    store: Option<Arc<dyn StateStore>>,
    /// Reach mesh services at this address (default 127.0.0.1).
    service_ip: Option<std::net::IpAddr>,
    /// The GPU processes it sees (default: NVML's).
    gpus: Option<Arc<dyn symphony::node::monitor::GpuProcessSource>>,
}

pub struct Node {
    cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Present when the node reaches the conductor through an impairment proxy.
    pub proxy: Option<UdpProxy>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub cfg: ConductorConfig,
    pub conductor: Option<Conductor>,
    pub api: String,
    pub http: reqwest::Client,
    pub nodes: HashMap<String, Node>,
}

impl Cluster {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut ConductorConfig)) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ConductorConfig::local(dir.path().join("storage"));
        cfg.quic_listen = "127.0.0.1:0".parse().unwrap();
        cfg.http_listen = "127.0.0.1:0".parse().unwrap();
        cfg.transport = fast_transport();
        tune(&mut cfg);
        let conductor = Conductor::start(cfg.clone()).await.unwrap();
        // Keep the ports across restarts.
        cfg.quic_listen = conductor.quic_addr;
        cfg.http_listen = conductor.http_addr;
        let scheme = if conductor.https { "https" } else { "http" };
        let api = format!("{scheme}://{}", conductor.http_addr);
        Self {
            dir,
            cfg,
            conductor: Some(conductor),
            api,
            http: reqwest::Client::new(),
            nodes: HashMap::new(),
        }
    }

    pub fn conductor(&self) -> &Conductor {
        self.conductor.as_ref().expect("conductor is running")
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.cfg.quic_listen
    }

    /// Starts a node agent in-process; `via_proxy` puts an impairment proxy in its path.
    pub async fn add_node(
        &mut self,
        id: &str,
        groups: &[&str],
        caps: &[(&str, i64)],
        via_proxy: bool,
    ) {
        let agent = Agent {
            groups,
            caps,
            via_proxy,
            ..Agent::default()
        };
        self.start_agent(id, id, agent).await;
    }

    /// Starts a node agent in-process in `groups` that reaches mesh services at `ip`
    /// (several nodes on one host: `NodeConfig::service_ip`); `via_proxy` as in `add_node`.
    pub async fn add_node_at(
        &mut self,
        id: &str,
        groups: &[&str],
        ip: std::net::IpAddr,
        via_proxy: bool,
    ) {
        let agent = Agent {
            groups,
            via_proxy,
            service_ip: Some(ip),
            ..Agent::default()
        };
        self.start_agent(id, id, agent).await;
    }

    /// Starts a node agent in-process with capacities `caps` that reaches mesh services at
    /// `ip` (several nodes on one host).
    pub async fn add_node_with_caps_at(
        &mut self,
        id: &str,
        caps: &[(&str, i64)],
        ip: std::net::IpAddr,
    ) {
        let agent = Agent {
            groups: &[],
            caps,
            service_ip: Some(ip),
            ..Agent::default()
        };
        self.start_agent(id, id, agent).await;
    }

    /// Starts a node agent in-process whose GPU processes come from `gpus` (a fake NVML).
    pub async fn add_node_with_gpus(
        &mut self,
        id: &str,
        gpus: Arc<dyn symphony::node::monitor::GpuProcessSource>,
    ) {
        let agent = Agent {
            groups: &["local"],
            gpus: Some(gpus),
            ..Agent::default()
        };
        self.start_agent(id, id, agent).await;
    }

    /// Starts a node agent in-process that keeps its local state in `store`.
    pub async fn add_node_with_store(&mut self, id: &str, store: Arc<dyn StateStore>) {
        let agent = Agent {
            store: Some(store),
            ..Agent::default()
        };
        self.start_agent(id, id, agent).await;
    }

    /// Starts another agent with `id`'s certificate but its own work dir (`instance`).
    pub async fn add_node_in(
        &mut self,
        id: &str,
        instance: &str,
        groups: &[&str],
        caps: &[(&str, i64)],
    ) {
        let agent = Agent {
            groups,
            caps,
            ..Agent::default()
        };
        self.start_agent(id, instance, agent).await;
    }

    async fn start_agent(&mut self, id: &str, instance: &str, agent: Agent<'_>) {
        let Agent {
            groups,
            caps,
            via_proxy,
            store,
            service_ip,
            gpus,
        } = agent;
        let proxy = if via_proxy {
            Some(UdpProxy::start(self.quic_addr()).await.unwrap())
        } else {
            None
        };
        let addr = proxy.as_ref().map_or(self.quic_addr(), UdpProxy::addr);
        let ca = &self.conductor().ca;
        let mut cfg =
            NodeConfig::local(ca, addr, id, &self.dir.path().join("nodes").join(instance)).unwrap();
        cfg.keeper =
            symphony::node::runner::Launcher::Program(env!("CARGO_BIN_EXE_symphony").into());
        cfg.groups = groups.iter().map(|g| (*g).to_owned()).collect();
        cfg.capacities_total = caps
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect::<BTreeMap<_, _>>();
        cfg.heartbeat = Duration::from_millis(200);
        cfg.transport = fast_transport();
        if let Some(ip) = service_ip {
            cfg.service_ip = ip;
        }
        cfg.gpu_processes = gpus;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(symphony::node::agent::run_with_store(
            cfg,
            cancel.clone(),
            store,
        ));
        self.nodes.insert(
            id.to_owned(),
            Node {
                cancel,
                task,
                proxy,
            },
        );
        let id = id.to_owned();
        self.wait(&format!("node {id} online"), |v| {
            v.nodes.get(&id).is_some_and(|n| n.state == "online")
        })
        .await;
    }

    /// An API token made by the core (as `POST /api-tokens` does).
    pub async fn api_token(&self, name: &str, role: Role) -> String {
        let (_, token) = self
            .conductor()
            .core
            .call(|reply| {
                CoreMsg::Trust(TrustMsg::CreateApiToken {
                    name: name.to_owned(),
                    role,
                    reply,
                })
            })
            .await
            .unwrap();
        token
    }

    /// A join token made by the core (as `POST /tokens` does).
    pub async fn join_token(&self, groups: &[&str], ttl: Duration, uses: Option<i64>) -> String {
        let (_, token) = self
            .conductor()
            .core
            .call(|reply| {
                CoreMsg::Trust(TrustMsg::CreateJoinToken {
                    groups: groups.iter().map(|g| (*g).to_owned()).collect(),
                    ttl,
                    uses,
                    node_id_prefix: "pod-".into(),
                    reply,
                })
            })
            .await
            .unwrap();
        token
    }

    /// Enrolls a node with `token` into the work dir `dir/joined/<instance>` (what `symphony
    /// node --join` does), returning its config (not started).
    pub async fn enroll(
        &self,
        instance: &str,
        token: &str,
        groups: &[&str],
    ) -> anyhow::Result<NodeConfig> {
        let work_dir = self.dir.path().join("joined").join(instance);
        let files = symphony::node::join::IdentityFiles::in_work_dir(&work_dir);
        let req = symphony::node::join::JoinRequest {
            token: Some(token.to_owned()),
            conductor: self.quic_addr().to_string(),
            node_id: None,
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        };
        let (rec, tls) = symphony::node::join::identity(&files, &req, &fast_transport()).await?;
        let ca = &self.conductor().ca;
        let mut cfg = NodeConfig::local(ca, self.quic_addr(), &rec.node_id, &work_dir)?;
        cfg.tls = tls;
        cfg.server_name = Some(symphony::node::join::SERVER_NAME.into());
        cfg.identity = Some(files);
        cfg.groups = rec.groups;
        cfg.keeper =
            symphony::node::runner::Launcher::Program(env!("CARGO_BIN_EXE_symphony").into());
        cfg.heartbeat = Duration::from_millis(200);
        cfg.transport = fast_transport();
        Ok(cfg)
    }

    /// Starts an agent from `cfg` under `key` (not waiting for it to come online).
    pub fn run_agent(&mut self, key: &str, cfg: NodeConfig) {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(symphony::node::agent::run(cfg, cancel.clone()));
        self.nodes.insert(
            key.to_owned(),
            Node {
                cancel,
                task,
                proxy: None,
            },
        );
    }

    /// Takes a node agent out of the cluster's list (to await its end).
    pub fn take_node(&mut self, key: &str) -> Node {
        self.nodes.remove(key).expect("known node")
    }

    /// Stops a node agent (its workloads are stopped too) and waits for it to end.
    pub async fn stop_node(&mut self, id: &str) {
        let node = self.nodes.remove(id).expect("known node");
        node.cancel.cancel();
        node.task.await.unwrap().unwrap();
    }

    /// The work dir of node `id` (workspaces, envs, local state).
    pub fn node_work_dir(&self, id: &str) -> std::path::PathBuf {
        self.dir.path().join("nodes").join(id).join("work")
    }

    pub fn proxy(&self, id: &str) -> &UdpProxy {
        self.nodes[id]
            .proxy
            .as_ref()
            .expect("node started with a proxy")
    }

    /// The conductor's store, opened beside it (or while it is down) with its secrets key.
    pub async fn open_store(&self) -> symphony::conductor::store::Store {
        let dir = &self.cfg.storage_dir;
        let key =
            symphony::seal::SealKey::load_or_create(&dir.join(symphony::seal::KEY_FILE)).unwrap();
        symphony::conductor::store::Store::open(dir, key)
            .await
            .unwrap()
    }

    /// Crashes the conductor (its tasks aborted, as by `kill -9`) and starts it again on the
    /// same storage and ports (trying again while the old sockets let go).
    pub async fn crash_conductor(&mut self) {
        let c = self.conductor.take().expect("running");
        c.abort().await;
        for attempt in 0.. {
            match Conductor::start(self.cfg.clone()).await {
                Ok(c) => {
                    self.conductor = Some(c);
                    return;
                }
                Err(_) if attempt < 100 => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("the conductor did not start again: {e:#}"),
            }
        }
    }

    /// Stops the conductor, runs the SQL `edit` on its database (what an older or newer
    /// binary might have left), and starts it again.
    pub async fn restart_conductor_after(&mut self, edit: &'static str) {
        let c = self.conductor.take().expect("running");
        c.shutdown().await;
        let db = self
            .cfg
            .storage_dir
            .join(symphony::conductor::store::DB_FILE_NAME);
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query(edit).execute(&pool).await.unwrap();
        pool.close().await;
        self.conductor = Some(Conductor::start(self.cfg.clone()).await.unwrap());
    }

    pub async fn restart_conductor(&mut self) {
        let c = self.conductor.take().expect("running");
        c.shutdown().await;
        self.conductor = Some(Conductor::start(self.cfg.clone()).await.unwrap());
    }

    /// Waits until the published snapshot satisfies `pred`.
    pub async fn wait(&self, what: &str, pred: impl Fn(&ClusterView) -> bool) -> Arc<ClusterView> {
        let mut rx = self.conductor().core.subscribe();
        let res = tokio::time::timeout(DEADLINE, async {
            loop {
                let view = rx.borrow_and_update().clone();
                if pred(&view) {
                    return view;
                }
                rx.changed().await.expect("conductor alive");
            }
        })
        .await;
        match res {
            Ok(v) => v,
            Err(_) => panic!(
                "timed out waiting for: {what}\nlast view: {:#?}",
                self.conductor().core.view()
            ),
        }
    }

    /// Waits until the deployment runs a process other than `old` (`what` says why it should)
    /// and returns that snapshot.
    pub async fn wait_new_process(&self, id: &str, old: u64, what: &str) -> Arc<ClusterView> {
        self.wait(what, |v| {
            v.deployment(id)
                .and_then(|d| d.status.as_ref())
                .is_some_and(|s| {
                    s.state == CurrentState::Running && s.pid.is_some_and(|p| u64::from(p) != old)
                })
        })
        .await
    }

    /// Waits until the deployment's reported state is `state` and returns its view as JSON.
    pub async fn wait_state(&self, id: &str, state: &str) -> Value {
        let view = self
            .wait(&format!("{id} {state}"), |v| {
                v.deployment(id)
                    .is_some_and(|d| d.current_state.map(CurrentState::as_str) == Some(state))
            })
            .await;
        json!(view.deployment(id).unwrap())
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.api, path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The body of `GET path` as text (a page, the metrics exposition).
    pub async fn text(&self, path: &str) -> String {
        let resp = self.http.get(format!("{}{path}", self.api)).send().await;
        resp.unwrap().text().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// Reads `GET /events?QUERY` until `pred` holds for the list, waking on every committed
    /// event (no polling); returns the list.
    pub async fn wait_events(
        &self,
        query: &str,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let mut live = self.conductor().core.events().subscribe();
        let mut last = Vec::new();
        let res = tokio::time::timeout(DEADLINE, async {
            loop {
                let (status, body) = self.get(&format!("/events?{query}")).await;
                assert_eq!(status, 200, "{body}");
                last = body.as_array().cloned().unwrap_or_default();
                if pred(&last) {
                    return;
                }
                // Lagging is fine: the next read is from the store anyway.
                let _ = live.recv().await;
            }
        })
        .await;
        if res.is_err() {
            let kinds: Vec<String> = last
                .iter()
                .map(|e| format!("{} {} {}", e["id"], e["kind"], e["message"]))
                .collect();
            panic!("timed out waiting for events: {what}\nlast read: {kinds:#?}");
        }
        last
    }

    /// Creates a deployment and returns its id.
    pub async fn deploy(&self, name: &str, spec: Value) -> String {
        let (status, body) = self
            .post(
                "/deployments",
                json!({"name": name, "specification": {"spec": spec}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn shutdown(mut self) {
        for (_, n) in self.nodes.drain() {
            n.cancel.cancel();
            let _ = n.task.await;
        }
        if let Some(c) = self.conductor.take() {
            c.shutdown().await;
        }
    }
}

/// A node agent run as a `symphony node` process, so that it can be killed with -9 and
/// started again (its workloads live under keepers, not in the test process).
pub struct NodeProcess {
    pub config: std::path::PathBuf,
    pub child: Option<std::process::Child>,
}

impl NodeProcess {
    /// Starts `program` (a `symphony` binary) as node `id` of the cluster, with `extra`
    /// arguments; the node's files are in `<cluster>/nodes/<id>`.
    pub fn start(c: &Cluster, id: &str, program: &std::path::Path, extra: &[&str]) -> Self {
        Self::start_via(c, id, program, c.quic_addr(), extra)
    }

    /// As [`NodeProcess::start`], dialing the conductor at `addr` (a proxy in front of it).
    pub fn start_via(
        c: &Cluster,
        id: &str,
        program: &std::path::Path,
        addr: SocketAddr,
        extra: &[&str],
    ) -> Self {
        let dir = c.dir.path().join("nodes").join(id);
        let files = c.conductor().ca.ensure_node_files(id, &dir).unwrap();
        let config = dir.join("node.yaml");
        let text = format!(
            "mode: node\n\
             logging: {{ level: {level} }}\n\
             node:\n\
             \x20 node_id: {id}\n\
             \x20 conductor_addr: {addr}\n\
             \x20 server_name: localhost\n\
             \x20 groups: [local]\n\
             \x20 heartbeat_sec: 0.2\n\
             \x20 keep_alive_sec: 0.2\n\
             \x20 idle_timeout_sec: 1.2\n\
             \x20 work_dir: {work}\n\
             \x20 tls: {{ ca_file: {ca}, cert_file: {cert}, key_file: {key} }}\n",
            level = std::env::var("SYMPHONY_TEST_AGENT_LOGS").unwrap_or_else(|_| "info".into()),
            work = dir.join("work").display(),
            ca = dir.join("ca.pem").display(),
            cert = files.cert.display(),
            key = files.key.display(),
        );
        std::fs::write(&config, text).unwrap();
        let mut p = Self {
            config,
            child: None,
        };
        p.restart(program, extra);
        p
    }

    /// Starts the agent again (after a kill or an exit).
    pub fn restart(&mut self, program: &std::path::Path, extra: &[&str]) {
        assert!(self.child.is_none(), "the agent is still running");
        let child = std::process::Command::new(program)
            .arg("node")
            .arg("--config")
            .arg(&self.config)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(if std::env::var_os("SYMPHONY_TEST_AGENT_LOGS").is_some() {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9` of the agent (what an OOM killer or a crash does); its keepers stay.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends `signal` and waits for the agent to exit.
    pub async fn signal_and_wait(&mut self, signal: nix::sys::signal::Signal) {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
            signal,
        )
        .unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "the agent exited with {status}");
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // A failed test must not leave an agent behind (its keepers are stopped by the
        // test's own cleanup of the processes it knows).
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

/// The `symphony` binary under test.
pub fn symphony_bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_symphony").into()
}

/// Pids of the live processes whose command line contains `needle` (a unique marker) and
/// whose parent's does not: one per copy of a workload, not counting a shell's forks that have
/// not exec'd yet.
pub fn pids_with(needle: &str) -> Vec<u32> {
    let matches = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(needle)
        })
    };
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut pids = Vec::new();
    for dirent in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = dirent
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if matches(pid) && alive(u64::from(pid)) && !parent(pid).is_some_and(matches) {
            pids.push(pid);
        }
    }
    pids
}

/// A TCP port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` consecutive ports free on 127.0.0.1 now, for a cluster's service port pool (clusters of
/// tests that run at once must not hand out the same ports).
pub fn free_port_range(n: u16) -> std::ops::RangeInclusive<u16> {
    loop {
        let start = free_port();
        let Some(end) = start.checked_add(n - 1) else {
            continue;
        };
        if (start..=end).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return start..=end;
        }
    }
}

/// The `loc` of each entry of a 422's `detail`, joined with dots (indexes as numbers).
pub fn locs(body: &Value) -> Vec<String> {
    body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("no detail list in {body}"))
        .iter()
        .map(|e| {
            e["loc"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect()
}

/// A spec running `sh -c SCRIPT`.
pub fn sh(script: &str) -> Value {
    json!({"config": {"command": ["sh", "-c", script]}})
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Polls `cond` (a fact outside the conductor, e.g. the process table) until true.
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn pid_of(d: &Value) -> u64 {
    d["status"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {d}"))
}

/// The log entries of `id` the conductor has, read over the log socket until `done` holds.
pub async fn log_until(c: &Cluster, id: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let url = format!(
        "{}/ws/deployments/{id}/logs?tail=100000",
        c.api.replace("http", "ws")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut all = Vec::new();
    let read = async {
        while !done(&all) {
            let text = futures_util::StreamExt::next(&mut ws)
                .await
                .unwrap()
                .unwrap()
                .into_text()
                .unwrap();
            let frame: Value = serde_json::from_str(&text).unwrap();
            all.extend(frame["entries"].as_array().cloned().unwrap_or_default());
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .unwrap_or_else(|_| panic!("log of {id} never complete: {} entries", all.len()));
    all
}
