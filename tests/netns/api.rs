//! The conductor's HTTP API as the tests see it, and bounded polling.
//!
//! Every wait is [`until`]: poll a condition every 100 ms until it holds or a deadline passes;
//! on timeout the panic message names what was awaited and the last observation, so a failure
//! says what the system was doing instead of only "timed out".

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Default deadline of a wait.
pub const WAIT: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Ok`, at most `timeout`. `Err` carries the last observation.
pub async fn until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if start.elapsed() > timeout => {
                panic!("timed out after {timeout:?} waiting until {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A handle on the API.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// What `/nodes` says about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFacts {
    /// online, suspect or lost.
    pub state: String,
    /// Whether the conductor holds a connection to it.
    pub connected: bool,
    /// The connection's remote address (the NAT's public side).
    pub remote: Option<SocketAddr>,
    /// Peer address changes on the current connection.
    pub path_changes: u64,
    /// Connections after the first (since the conductor started).
    pub reconnects: u64,
}

/// What `/deployments/{id}` says.
#[derive(Debug, Clone, PartialEq)]
pub struct DepFacts {
    pub desired: String,
    pub current: Option<String>,
    pub assigned: Option<String>,
    /// `status.*`: what a node last reported.
    pub state: Option<String>,
    pub pid: Option<u32>,
    pub generation: Option<u64>,
    pub restart_count: Option<u64>,
    pub status_node: Option<String>,
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

impl Api {
    /// An API at `base` (`http://ip:port`) that sends `token` (the conductor listens beyond
    /// loopback, so it requires one), bypassing any proxy settings.
    pub fn new(base: &str, token: &str) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        Self {
            base: base.to_owned(),
            token: token.to_owned(),
            http,
        }
    }

    /// The API token requests carry (for the CLI: `SYMPHONY_TOKEN`).
    pub fn token(&self) -> &str {
        &self.token
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(|e| format!("GET {path}: {e}"))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("GET {path}: {status} {body}"))
        }
    }

    /// `GET /experiments/{name}`.
    pub async fn experiment(&self, name: &str) -> Result<Value, String> {
        self.get(&format!("/experiments/{name}")).await
    }

    /// `GET /deployments` (the first page).
    pub async fn deployments(&self) -> Result<Value, String> {
        self.get("/deployments").await
    }

    /// `POST /experiments`; returns the experiment.
    pub async fn launch(&self, declaration: &Value) -> Value {
        let resp = self
            .http
            .post(format!("{}/experiments", self.base))
            .json(declaration)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "POST /experiments: {status} {v}");
        v
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /services`.
    pub async fn services(&self) -> Result<Value, String> {
        self.get("/services").await
    }

    /// `GET /nodes`.
    pub async fn nodes(&self) -> Result<Value, String> {
        self.get("/nodes").await
    }

    /// One node's facts.
    pub async fn node(&self, id: &str) -> Result<NodeFacts, String> {
        let all = self.nodes().await?;
        let n = all
            .get("nodes")
            .and_then(|m| m.get(id))
            .ok_or_else(|| format!("node {id} unknown: {all}"))?;
        let conn = n.get("connection").filter(|c| !c.is_null());
        Ok(NodeFacts {
            state: text(&n["state"]).unwrap_or_default(),
            connected: conn.is_some(),
            remote: conn
                .and_then(|c| c["remote_addr"].as_str())
                .and_then(|s| s.parse().ok()),
            path_changes: conn.and_then(|c| c["path_changes"].as_u64()).unwrap_or(0),
            reconnects: conn.and_then(|c| c["reconnects"].as_u64()).unwrap_or(0),
        })
    }

    /// `POST /deployments` of `sleep <token>` in the test group, one `slot`. Returns the id.
    pub async fn deploy(&self, name: &str, token: &str) -> String {
        let spec = json!({
            "config": {"command": ["sleep", token]},
            "node_group": super::bed::GROUP,
            "capacity_requests": {"slot": 1},
        });
        self.deploy_spec(name, spec).await
    }

    /// `POST /deployments` of `spec` (a whole `specification.spec`). Returns the id.
    /// `POST /tokens`: a join token for `groups` (one use), as `symphony token create` makes.
    pub async fn join_token(&self, groups: &[&str]) -> String {
        let resp = self
            .http
            .post(format!("{}/tokens", self.base))
            .json(&json!({"groups": groups, "uses": 1}))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "POST /tokens: {status} {v}");
        text(&v["token"]).unwrap_or_else(|| panic!("no token in {v}"))
    }

    pub async fn deploy_spec(&self, name: &str, spec: Value) -> String {
        let body = json!({"name": name, "specification": {"spec": spec}});
        let resp = self
            .http
            .post(format!("{}/deployments", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "POST /deployments: {status} {v}");
        text(&v["id"]).unwrap_or_else(|| panic!("no id in {v}"))
    }

    /// `PATCH /deployments/{id}`.
    pub async fn patch(&self, id: &str, body: Value) -> DepFacts {
        let resp = self
            .http
            .patch(format!("{}/deployments/{id}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "PATCH /deployments/{id}: {status} {v}");
        Self::dep_facts(&v)
    }

    /// `GET /deployments/{id}`.
    pub async fn deployment(&self, id: &str) -> Result<DepFacts, String> {
        Ok(Self::dep_facts(
            &self.get(&format!("/deployments/{id}")).await?,
        ))
    }

    fn dep_facts(v: &Value) -> DepFacts {
        let st = &v["status"];
        DepFacts {
            desired: text(&v["desired_state"]).unwrap_or_default(),
            current: text(&v["current_state"]),
            assigned: text(&v["assigned_node_id"]),
            state: text(&st["state"]),
            pid: st["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
            generation: st["generation"].as_u64(),
            restart_count: st["restart_count"].as_u64(),
            status_node: text(&st["node_id"]),
        }
    }
}
