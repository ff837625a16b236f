//! The fault suite: a conductor and three node agents (real processes, so they can be killed
//! with -9 and frozen), a steady stream of creates, patches, stops, starts and deletes, and a
//! nemesis that crashes the conductor, kills and freezes agents, cuts a node's path and fills
//! the conductor's disk. After every step, and once the faults stop, an invariant checker
//! looks at the API and at the machine's processes.
//!
//! CI runs a fixed seed; `SYMPHONY_CHAOS_SEED=<n>`, `SYMPHONY_CHAOS_STEPS=<n>` (default 60) or
//! `SYMPHONY_CHAOS_SECONDS=<n>` run others (a failure prints its seed and the step log, so it
//! can be replayed). The step log goes to stderr as it happens (`--nocapture`).

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use symphony_net::impair::UdpProxy;

use crate::support::{Cluster, NodeProcess, pids_with, symphony_bin};

/// What the test asked of one deployment, and what it saw.
#[derive(Debug)]
struct Expect {
    name: String,
    marker: String,
    running: bool,
    /// The highest generation seen (reported or assigned): never goes down.
    generation: u64,
}

struct Chaos {
    seed: u64,
    rng: StdRng,
    log: Vec<String>,
    c: Cluster,
    agents: Vec<NodeProcess>,
    proxies: Vec<UdpProxy>,
    /// Acknowledged and not deleted.
    live: BTreeMap<String, Expect>,
    /// Deleted (acknowledged): must never come back.
    deleted: Vec<(String, String)>,
    next: usize,
    disk: Option<crate::faults::SmallDisk>,
    filler: Option<std::path::PathBuf>,
    faults: usize,
    ops: usize,
}

const NODES: usize = 3;

impl Chaos {
    fn fail(&self, what: &str) -> ! {
        panic!(
            "chaos invariant broken: {what}\nseed {} (replay: SYMPHONY_CHAOS_SEED={})\nsteps:\n  {}",
            self.seed,
            self.seed,
            self.log.join("\n  ")
        );
    }

    fn note(&mut self, line: String) {
        eprintln!("chaos: {line}");
        self.log.push(line);
    }

    /// One API call; a 5xx other than the documented fault statuses (503, 507) breaks an
    /// invariant. `None`: refused (documented), or not acknowledged.
    async fn call(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<Value> {
        let (status, reply) = self.c.request(method.clone(), path, body).await;
        self.ops += 1;
        match status {
            200..=299 => Some(reply),
            503 if reply["cause"] == "no_answer" => {
                // The change may still be made: once the core answers again, read back.
                self.note(format!("  {method} {path}: {status} {reply}"));
                self.resync().await;
                None
            }
            503 | 507 => {
                self.note(format!("  {method} {path}: {status} {reply}"));
                None
            }
            500..=599 => self.fail(&format!("{method} {path} answered {status}: {reply}")),
            _ => self.fail(&format!("{method} {path} answered {status}: {reply}")),
        }
    }

    /// `GET /deployments`, by id.
    async fn listed(&self) -> BTreeMap<String, Value> {
        let (_, list) = self.c.get("/deployments").await;
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| Some((d["id"].as_str()?.to_owned(), d.clone())))
            .collect()
    }

    /// After an answer that left the outcome open: waits until the core has answered a later
    /// call (it works in order, so the open one is done), then takes what the API shows.
    async fn resync(&mut self) {
        loop {
            let (status, _) = self
                .c
                .request(
                    reqwest::Method::DELETE,
                    "/deployments/no-such-deployment",
                    None,
                )
                .await;
            if status == 404 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let shown: BTreeMap<String, (String, bool)> = self
            .listed()
            .await
            .into_iter()
            .map(|(id, d)| {
                let name = d["name"].as_str().unwrap_or_default().to_owned();
                (id, (name, d["desired_state"] == "RUNNING"))
            })
            .collect();
        let gone: Vec<String> = self
            .live
            .keys()
            .filter(|id| !shown.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(e) = self.live.remove(&id) {
                self.deleted.push((id, e.marker));
            }
        }
        for (id, (name, running)) in shown {
            match self.live.get_mut(&id) {
                Some(e) => {
                    e.running = running;
                    e.name = name;
                }
                // A create that was made after all.
                None => {
                    if let Some(n) = name.strip_prefix('c').and_then(|n| n.parse::<usize>().ok()) {
                        let marker = format!("chaos-{}-{n}-x", self.seed);
                        self.live.insert(
                            id,
                            Expect {
                                name,
                                marker,
                                running,
                                generation: 0,
                            },
                        );
                    }
                }
            }
        }
    }

    async fn op(&mut self) {
        let ids: Vec<String> = self.live.keys().cloned().collect();
        let pick = self.rng.random_range(0..10);
        if ids.len() < 4 || (pick < 3 && ids.len() < 10) {
            self.next += 1;
            let name = format!("c{}", self.next);
            let marker = format!("chaos-{}-{}-x", self.seed, self.next);
            let spec =
                json!({"config": {"command": ["sh", "-c", format!("sleep 100000; : {marker}")]}});
            self.note(format!("create {name}"));
            if let Some(d) = self
                .call(
                    reqwest::Method::POST,
                    "/deployments",
                    Some(json!({"name": name, "specification": {"spec": spec}})),
                )
                .await
            {
                let id = d["id"].as_str().unwrap_or_default().to_owned();
                self.live.insert(
                    id,
                    Expect {
                        name,
                        marker,
                        running: true,
                        generation: 0,
                    },
                );
            }
            return;
        }
        let id = ids[self.rng.random_range(0..ids.len())].clone();
        let path = format!("/deployments/{id}");
        match pick {
            0..=3 => {
                // A rename changes nothing that runs; a new env restarts it (a new generation).
                let body = if self.rng.random_bool(0.5) {
                    json!({"name": format!("{}-r{}", self.live[&id].name, self.ops)})
                } else {
                    let marker = self.live[&id].marker.clone();
                    json!({"specification": {"spec": {"config": {
                        "command": ["sh", "-c", format!("sleep 100000; : {marker}")],
                        "env": {"STEP": self.ops.to_string()}}}}})
                };
                self.note(format!("patch {id} {body}"));
                if self
                    .call(reqwest::Method::PATCH, &path, Some(body.clone()))
                    .await
                    .is_some()
                    && let Some(n) = body["name"].as_str()
                    && let Some(e) = self.live.get_mut(&id)
                {
                    e.name = n.to_owned();
                }
            }
            4..=6 => {
                let running = !self.live[&id].running;
                let state = if running { "RUNNING" } else { "STOPPED" };
                self.note(format!("set {id} {state}"));
                if self
                    .call(
                        reqwest::Method::PATCH,
                        &path,
                        Some(json!({"desired_state": state})),
                    )
                    .await
                    .is_some()
                    && let Some(e) = self.live.get_mut(&id)
                {
                    e.running = running;
                }
            }
            _ => {
                self.note(format!("delete {id}"));
                if self
                    .call(reqwest::Method::DELETE, &path, None)
                    .await
                    .is_some()
                    && let Some(e) = self.live.remove(&id)
                {
                    self.deleted.push((id, e.marker));
                }
            }
        }
    }

    /// One fault, over before the next step (every fault is shorter than the conductor's
    /// grace: no node is declared lost, so no deployment may ever run twice).
    async fn nemesis(&mut self) {
        let which = self.rng.random_range(0..6);
        let node = self.rng.random_range(0..NODES);
        self.faults += 1;
        match which {
            0 => {
                self.note("nemesis: kill -9 the conductor, start it again".into());
                self.crash_conductor().await;
            }
            1 => {
                self.note(format!("nemesis: kill -9 agent n{node}, start it again"));
                self.agents[node].kill9();
                self.agents[node].restart(&symphony_bin(), &[]);
            }
            2 => {
                let ms = self.rng.random_range(200..1500);
                self.note(format!("nemesis: freeze agent n{node} for {ms} ms"));
                let pid = nix::unistd::Pid::from_raw(self.agents[node].pid().cast_signed());
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            }
            3 => {
                let ms = self.rng.random_range(200..1500);
                self.note(format!("nemesis: cut n{node}'s path for {ms} ms"));
                self.proxies[node].set_blackhole(true);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.proxies[node].set_blackhole(false);
            }
            _ => match (self.disk.is_some(), self.filler.take()) {
                (true, Some(f)) => {
                    self.note("nemesis: free the conductor's disk".into());
                    let _ = std::fs::remove_file(f);
                }
                (true, None) => {
                    self.note("nemesis: fill the conductor's disk".into());
                    self.filler = self.disk.as_ref().map(crate::faults::SmallDisk::fill);
                }
                (false, _) => {
                    self.note("nemesis: (no disk to fill here) kill -9 the conductor".into());
                    self.crash_conductor().await;
                }
            },
        }
    }

    /// A conductor cannot open its database on a full disk: space is freed before it starts
    /// again (the crash itself may happen while the disk is full).
    async fn crash_conductor(&mut self) {
        if let Some(f) = self.filler.take() {
            self.note("  (the disk is freed before the conductor starts again)".into());
            let _ = std::fs::remove_file(f);
        }
        self.c.crash_conductor().await;
    }

    /// The invariants that hold at every moment.
    async fn check(&mut self) {
        // Never two live copies of a deployment.
        for (id, e) in &self.live {
            let copies = pids_with(&e.marker).len();
            if copies > 1 {
                self.fail(&format!("{id} ({}) runs {copies} copies", e.name));
            }
        }
        let (status, list) = self.c.get("/deployments").await;
        if status != 200 {
            self.fail(&format!("GET /deployments answered {status}: {list}"));
        }
        let seen: BTreeMap<String, &Value> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| Some((d["id"].as_str()?.to_owned(), d)))
            .collect();
        // Every acknowledged deployment still exists; no deleted one came back.
        for id in self.live.keys() {
            if !seen.contains_key(id) {
                self.fail(&format!("{id} was acknowledged and is gone"));
            }
        }
        for (id, _) in &self.deleted {
            if seen.contains_key(id) {
                self.fail(&format!("{id} was deleted and came back"));
            }
        }
        // Generations only increase.
        let mut lower = None;
        for (id, e) in &mut self.live {
            // The generation its node reports (none before the first report after a start).
            let Some(g) = seen[id]["status"]["generation"].as_u64() else {
                continue;
            };
            if g < e.generation {
                lower = Some(format!("{id}: generation {g} after {}", e.generation));
            }
            e.generation = e.generation.max(g);
        }
        if let Some(what) = lower {
            self.fail(&what);
        }
    }

    /// Faults stopped: every desired RUNNING deployment runs (one copy), nothing else does.
    async fn converge(&mut self) {
        if let Some(f) = self.filler.take() {
            let _ = std::fs::remove_file(f);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let state: BTreeMap<String, String> = self
                .listed()
                .await
                .into_iter()
                .filter_map(|(id, d)| Some((id, d["current_state"].as_str()?.to_owned())))
                .collect();
            let mut wrong = Vec::new();
            for (id, e) in &self.live {
                let want = if e.running { "RUNNING" } else { "STOPPED" };
                let copies = pids_with(&e.marker).len();
                let want_copies = usize::from(e.running);
                if state.get(id).map(String::as_str) != Some(want) || copies != want_copies {
                    wrong.push(format!(
                        "{id} ({}): {:?} with {copies} copies, want {want} with {want_copies}",
                        e.name,
                        state.get(id)
                    ));
                }
            }
            for (id, marker) in &self.deleted {
                let copies = pids_with(marker).len();
                if copies > 0 {
                    wrong.push(format!("deleted {id}: {copies} copies left"));
                }
            }
            // No process the test does not know of (a write refused that ran anyway).
            let running = self.live.values().filter(|e| e.running).count();
            let all = pids_with(&format!("chaos-{}-", self.seed)).len();
            if all != running {
                wrong.push(format!("{all} chaos processes run, {running} expected"));
            }
            if wrong.is_empty() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                self.fail(&format!("no convergence in 60 s: {wrong:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_lose_nothing_and_never_run_a_deployment_twice() {
    let seed: u64 = std::env::var("SYMPHONY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_203);
    let steps: usize = std::env::var("SYMPHONY_CHAOS_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    // A long local run: as many steps as fit in this many seconds.
    let for_secs: Option<u64> = std::env::var("SYMPHONY_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let started = std::time::Instant::now();
    let outer = tempfile::tempdir().unwrap();
    // The conductor's storage on a small disk that the nemesis can fill (root only).
    let disk = crate::faults::SmallDisk::try_mount(&outer.path().join("small"), "16m");
    let storage = disk.as_ref().map(|d| d.path.join("storage"));
    let c = Cluster::start_with(|cfg| {
        // Every fault is shorter than this: no node is ever declared lost.
        cfg.grace = Duration::from_secs(20);
        cfg.suspect_after = Duration::from_secs(10);
        if let Some(s) = &storage {
            cfg.cert_dir = s.join("certs");
            cfg.storage_dir = s.clone();
        }
    })
    .await;
    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    for i in 0..NODES {
        let proxy = UdpProxy::start(c.quic_addr()).await.unwrap();
        agents.push(NodeProcess::start_via(
            &c,
            &format!("n{i}"),
            &symphony_bin(),
            proxy.addr(),
            &[],
        ));
        proxies.push(proxy);
    }
    c.wait("every node online", |v| {
        v.nodes.values().filter(|n| n.state == "online").count() == NODES
    })
    .await;
    let mut chaos = Chaos {
        seed,
        rng: StdRng::seed_from_u64(seed),
        log: Vec::new(),
        c,
        agents,
        proxies,
        live: BTreeMap::new(),
        deleted: Vec::new(),
        next: 0,
        disk,
        filler: None,
        faults: 0,
        ops: 0,
    };
    chaos.note(format!(
        "seed {seed}, {steps} steps, disk faults {}",
        if chaos.disk.is_some() {
            "on"
        } else {
            "off (not root)"
        }
    ));
    let mut step = 0;
    while match for_secs {
        Some(secs) => started.elapsed() < Duration::from_secs(secs),
        None => step < steps,
    } {
        step += 1;
        chaos.note(format!("step {step}"));
        for _ in 0..3 {
            chaos.op().await;
        }
        if chaos.rng.random_bool(0.6) {
            chaos.nemesis().await;
        }
        chaos.check().await;
    }
    chaos.note("faults stop".into());
    chaos.converge().await;
    chaos.check().await;
    eprintln!(
        "chaos: seed {seed}: {step} steps in {:.0} s, {} operations, {} faults, {} deployments live, {} deleted: all invariants held",
        started.elapsed().as_secs_f64(),
        chaos.ops,
        chaos.faults,
        chaos.live.len(),
        chaos.deleted.len()
    );
    // Clean up what runs: delete every deployment, stop the agents.
    let ids: Vec<String> = chaos.live.keys().cloned().collect();
    for id in ids {
        let _ = chaos.c.delete(&format!("/deployments/{id}")).await;
    }
    let markers: Vec<String> = chaos.live.values().map(|e| e.marker.clone()).collect();
    crate::support::until("every chaos process is gone", || {
        markers.iter().all(|m| pids_with(m).is_empty())
    })
    .await;
    for a in &mut chaos.agents {
        a.signal_and_wait(nix::sys::signal::Signal::SIGTERM).await;
    }
    let Chaos { c, disk, .. } = chaos;
    c.shutdown().await;
    drop(disk);
}
