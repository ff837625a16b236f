//! Benches that run the real `symphony` binary: child processes stopped on drop, free ports,
//! polling the API, and the separate layout (a conductor and a node, each its own process,
//! configured from YAML as the README shows).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Upper bound for any awaited state.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A child `symphony` process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Child(std::process::Child);

impl Child {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// `kill -9` (a crash, an OOM kill), and waits for it.
    pub fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        for _ in 0..300 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(bin: &Path, args: &[&str], dir: &Path, log: &str) -> anyhow::Result<Child> {
    let out = std::fs::File::create(dir.join(log))?;
    let err = out.try_clone()?;
    let child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()?;
    Ok(Child(child))
}

pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `GET url` until `pred` holds (bounded).
pub async fn wait_json(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(r) = http.get(url).send().await
            && let Ok(v) = r.json::<Value>().await
            && pred(&v)
        {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A conductor and a node (`n1`, group `local`, work dir `<dir>/n1/work`) as two processes.
pub struct SplitCluster {
    pub conductor: Child,
    pub node: Child,
    pub api: String,
    pub http: reqwest::Client,
}

impl SplitCluster {
    /// Starts both in `dir` and waits until the node is online.
    pub async fn start(bin: &Path, dir: &Path, heartbeat_sec: f64) -> anyhow::Result<Self> {
        let (http_port, quic_port) = (free_tcp_port()?, free_udp_port()?);
        std::fs::write(
            dir.join("conductor.yaml"),
            format!(
                "mode: conductor\nconductor:\n  listen: 127.0.0.1:{quic_port}\n  http_listen: 127.0.0.1:{http_port}\n  storage_dir: ./storage\n  tls:\n    cert_path: ./certs\n"
            ),
        )?;
        let conductor = spawn(bin, &["--config", "conductor.yaml"], dir, "conductor.log")?;
        let api = format!("http://127.0.0.1:{http_port}");
        let http = reqwest::Client::new();
        wait_json(&http, &format!("{api}/nodes"), "the API", |v| {
            v["nodes"].is_object()
        })
        .await?;
        let out = Command::new(bin)
            .args([
                "cert",
                "node",
                "n1",
                "--cert-path",
                "./certs",
                "--out",
                "./n1",
            ])
            .current_dir(dir)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "symphony cert node: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            dir.join("node.yaml"),
            format!(
                "mode: node\nnode:\n  node_id: n1\n  conductor_addr: 127.0.0.1:{quic_port}\n  server_name: localhost\n  groups: [local]\n  capacities_total: {{cpu: 2}}\n  heartbeat_sec: {heartbeat_sec}\n  work_dir: ./n1/work\n  tls:\n    ca_file: ./n1/ca.pem\n    cert_file: ./n1/n1.pem\n    key_file: ./n1/n1.key\n"
            ),
        )?;
        let node = spawn(bin, &["--config", "node.yaml"], dir, "node.log")?;
        let cluster = Self {
            conductor,
            node,
            api,
            http,
        };
        cluster.node_online().await?;
        Ok(cluster)
    }

    /// Waits until node `n1` is online.
    pub async fn node_online(&self) -> anyhow::Result<Value> {
        wait_json(
            &self.http,
            &format!("{}/nodes", self.api),
            "node n1 online",
            |v| v["nodes"]["n1"]["state"] == "online",
        )
        .await
    }
}
