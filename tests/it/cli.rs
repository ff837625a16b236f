//! The `symphony` binary as a user runs it: `symphony dev`, client commands, Ctrl-C.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{alive, until};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_symphony")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(api: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env("SYMPHONY_API", api)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills the dev process if a test fails half-way.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn dev_runs_deploys_logs_stops_removes_and_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (http, quic) = (free_port(), free_udp_port());
    let mut dev = Child(
        Command::new(bin())
            .args([
                "dev",
                "--http",
                &format!("127.0.0.1:{http}"),
                "--quic",
                &format!("127.0.0.1:{quic}"),
                "--storage",
            ])
            .arg(dir.path().join("storage"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = format!("http://127.0.0.1:{http}");
    let client = reqwest::Client::new();
    // The API answers and the local node registers.
    until("local node online", || {
        std::net::TcpStream::connect(("127.0.0.1", http)).is_ok()
    })
    .await;
    loop {
        if let Ok(r) = client.get(format!("{api}/nodes")).send().await {
            let v: Value = r.json().await.unwrap();
            if v["nodes"]["local"]["state"] == "online" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, id, err) = run(
        &api,
        &[
            "deploy",
            "--name",
            "hello",
            "--",
            "sh",
            "-c",
            "while true; do echo hello-line; sleep 0.1; done",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 32);
    // RUNNING, with a pid.
    let mut pid = 0;
    for _ in 0..600 {
        let d: Value = client
            .get(format!("{api}/deployments/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if d["current_state"] == "RUNNING" {
            pid = d["status"]["pid"].as_u64().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pid > 0 && alive(pid), "never RUNNING");
    let (code, ps, _) = run(&api, &["ps"]);
    assert_eq!(code, 0);
    assert!(
        ps.lines().next().unwrap().starts_with("ID")
            && ps.contains("hello")
            && ps.contains("RUNNING")
            && ps.contains("local"),
        "{ps}"
    );
    // Logs through the CLI (backlog) and the WebSocket.
    let mut lines = String::new();
    for _ in 0..100 {
        let (code, out, err) = run(&api, &["logs", "--tail", "3", &id[..8]]);
        assert_eq!(code, 0, "{err}");
        // --tail 3: once there are enough lines, exactly the last three.
        if out
            .lines()
            .filter(|l| l.contains("[stdout] hello-line"))
            .count()
            >= 2
        {
            lines = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lines.lines().count(), 3, "{lines}");
    let (code, nodes, _) = run(&api, &["nodes"]);
    assert_eq!(code, 0);
    assert!(
        nodes.contains("local") && nodes.contains("online"),
        "{nodes}"
    );
    // Stop, start, remove.
    assert_eq!(run(&api, &["stop", &id[..8]]).0, 0);
    until("stopped", || !alive(pid)).await;
    assert_eq!(run(&api, &["start", &id[..8]]).0, 0);
    let mut pid2 = 0;
    for _ in 0..600 {
        let d: Value = client
            .get(format!("{api}/deployments/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if d["current_state"] == "RUNNING" {
            pid2 = d["status"]["pid"].as_u64().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pid2 > 0 && pid2 != pid);
    assert_eq!(run(&api, &["rm", &id[..8]]).0, 0);
    until("removed", || !alive(pid2)).await;
    assert_eq!(
        run(&api, &["logs", &id]).0,
        1,
        "logs of a removed deployment fail"
    );
    // Usage errors exit 2; an unreachable conductor exits 1 with a clear message.
    assert_eq!(run(&api, &["deploy"]).0, 2);
    let (code, _, err) = run("http://127.0.0.1:1", &["ps"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the conductor"), "{err}");

    // A last workload, then Ctrl-C: it must not survive the shutdown.
    let (_, id, _) = run(&api, &["deploy", "--name", "last", "--", "sleep", "1000"]);
    let id = id.trim().to_owned();
    let mut pid3 = 0;
    for _ in 0..600 {
        let d: Value = client
            .get(format!("{api}/deployments/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if d["current_state"] == "RUNNING" {
            pid3 = d["status"]["pid"].as_u64().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pid3 > 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(dev.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let s = dev.0.wait().unwrap();
        std::mem::forget(dev);
        s
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!alive(pid3), "nothing left running after Ctrl-C");
}

#[test]
fn a_config_error_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.yaml");
    std::fs::write(&path, "mode: node\nnode:\n  node_id: n1\n  conductor_addr: localhost:50051\n  groups: [a]\n  capacities_total: {gpu: 1.5}\n").unwrap();
    let out = Command::new(bin())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node.yaml") && err.contains("node.capacities_total.gpu"),
        "{err}"
    );
}

#[test]
fn a_node_whose_certificate_names_another_node_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = symphony_net::CertificateAuthority::load_or_create(&dir.path().join("certs")).unwrap();
    let files = ca
        .ensure_node_files("other-node", &dir.path().join("n"))
        .unwrap();
    let yaml = format!(
        "mode: node\nnode:\n  node_id: n1\n  conductor_addr: localhost:50051\n  groups: [a]\n  capacities_total: {{gpu: 1}}\n  tls:\n    ca_file: {}\n    cert_file: {}\n    key_file: {}\n  work_dir: {}\n",
        dir.path().join("n/ca.pem").display(),
        files.cert.display(),
        files.key.display(),
        dir.path().join("work").display()
    );
    let path = dir.path().join("node.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(bin())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("other-node") && err.contains("n1"), "{err}");
}

#[test]
fn cert_command_issues_a_node_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    symphony_net::CertificateAuthority::load_or_create(&certs).unwrap();
    let out_dir = dir.path().join("pod");
    let out = Command::new(bin())
        .args(["cert", "node", "gpu-pod-1", "--cert-path"])
        .arg(&certs)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let key = std::fs::metadata(out_dir.join("gpu-pod-1.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    assert!(out_dir.join("ca.pem").exists() && out_dir.join("gpu-pod-1.pem").exists());
}
