//! The `symphony` binary as a user runs it: `symphony dev`, client commands, Ctrl-C.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{alive, free_port, until};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_symphony")
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

/// Stops a symphony process when a test ends (SIGTERM first so its workloads are stopped too).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the deployment is RUNNING and returns its pid.
async fn running_pid(client: &reqwest::Client, api: &str, id: &str) -> u64 {
    let d = wait_json(client, &format!("{api}/deployments/{id}"), "RUNNING", |v| {
        v["current_state"] == "RUNNING"
    })
    .await;
    d["status"]["pid"]
        .as_u64()
        .expect("a running deployment has a pid")
}

async fn wait_json(
    client: &reqwest::Client,
    url: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..600 {
        if let Ok(r) = client.get(url).send().await
            && let Ok(v) = r.json::<Value>().await
            && pred(&v)
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what} at {url}");
}

#[tokio::test]
async fn a_conductor_and_two_nodes_from_yaml_schedule_by_group_and_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (http, quic) = (free_port(), free_udp_port());
    std::fs::write(
        d.join("conductor.yaml"),
        format!("mode: conductor\nlogging:\n  level: INFO\n  json: true\nconductor:\n  listen: 127.0.0.1:{quic}\n  http_listen: 127.0.0.1:{http}\n  storage_dir: ./storage\n  tls:\n    cert_path: ./certs\n"),
    )
    .unwrap();
    let conductor_log = std::fs::File::create(d.join("conductor.log")).unwrap();
    let _conductor = Child(
        Command::new(bin())
            .arg("--config")
            .arg(d.join("conductor.yaml"))
            .stderr(conductor_log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = format!("http://127.0.0.1:{http}");
    let client = reqwest::Client::new();
    wait_json(&client, &format!("{api}/nodes"), "the API", |v| {
        v["nodes"].is_object()
    })
    .await;
    // JSON log lines, as logging.json asks.
    let log = std::fs::read_to_string(d.join("conductor.log")).unwrap();
    let first = log.lines().next().expect("a log line");
    assert!(
        serde_json::from_str::<Value>(first).is_ok(),
        "not JSON: {first}"
    );

    let mut nodes = Vec::new();
    for (id, groups, caps) in [
        ("gpu-1", "[gpu]", "{gpu: 1}"),
        ("cpu-1", "[cpu]", "{cpu: 2}"),
    ] {
        let out = Command::new(bin())
            .args(["cert", "node", id, "--cert-path"])
            .arg(d.join("certs"))
            .arg("--out")
            .arg(d.join(id))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let yaml = format!(
            "mode: node\nnode:\n  node_id: {id}\n  conductor_addr: localhost:{quic}\n  groups: {groups}\n  capacities_total: {caps}\n  heartbeat_sec: 0.5\n  work_dir: ./{id}/work\n  tls:\n    ca_file: ./{id}/ca.pem\n    cert_file: ./{id}/{id}.pem\n    key_file: ./{id}/{id}.key\n"
        );
        std::fs::write(d.join(format!("{id}.yaml")), yaml).unwrap();
        nodes.push(Child(
            Command::new(bin())
                .arg("--config")
                .arg(d.join(format!("{id}.yaml")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }
    wait_json(&client, &format!("{api}/nodes"), "two nodes online", |v| {
        ["gpu-1", "cpu-1"]
            .iter()
            .all(|n| v["nodes"][n]["state"] == "online")
    })
    .await;
    let deploy = |name: &str, spec: Value| {
        let (client, api, name) = (client.clone(), api.clone(), name.to_owned());
        async move {
            let r = client
                .post(format!("{api}/deployments"))
                .json(&serde_json::json!({"name": name, "specification": {"spec": spec}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let cmd = serde_json::json!(["sleep", "1000"]);
    let a = deploy("train", serde_json::json!({"config": {"command": cmd}, "node_group": "gpu", "capacity_requests": {"gpu": 1}})).await;
    let b = deploy("train-2", serde_json::json!({"config": {"command": cmd}, "node_group": "gpu", "capacity_requests": {"gpu": 1}})).await;
    let c = deploy("etl", serde_json::json!({"config": {"command": cmd}, "node_group": "cpu", "capacity_requests": {"cpu": 2}})).await;
    let e = deploy(
        "anywhere",
        serde_json::json!({"config": {"command": cmd}, "capacity_requests": {"cpu": 1}}),
    )
    .await;
    let url = |id: &str| format!("{api}/deployments/{id}");
    let da = wait_json(&client, &url(&a), "train running", |v| {
        v["current_state"] == "RUNNING"
    })
    .await;
    assert_eq!(da["assigned_node_id"], "gpu-1");
    let dc = wait_json(&client, &url(&c), "etl running", |v| {
        v["current_state"] == "RUNNING"
    })
    .await;
    assert_eq!(dc["assigned_node_id"], "cpu-1");
    let db = wait_json(&client, &url(&b), "train-2 waiting", |v| {
        v["assignment_reason"] == "No Capacity"
    })
    .await;
    assert_eq!(db["assigned_node_id"], Value::Null);
    let de = wait_json(&client, &url(&e), "anywhere waiting", |v| {
        v["assignment_reason"] == "No Capacity"
    })
    .await;
    assert_eq!(de["current_state"], "PENDING");
    let pids: Vec<u64> = [&da, &dc]
        .iter()
        .map(|d| d["status"]["pid"].as_u64().unwrap())
        .collect();
    assert!(pids.iter().all(|p| alive(*p)));
    drop(nodes);
    for p in pids {
        until("workload stopped with its node", || !alive(p)).await;
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
    let pid = running_pid(&client, &api, &id).await;
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
    let pid2 = running_pid(&client, &api, &id).await;
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

    // A last workload, with the spec flags, then Ctrl-C: it must not survive the shutdown.
    let flags = [
        "deploy",
        "--name",
        "last",
        "--env",
        "GREETING=hi",
        "--group",
        "local",
        "--capacity",
        "cpu=1",
        "--restart",
        "never",
        "--",
        "sleep",
        "1000",
    ];
    let (code, id, err) = run(&api, &flags);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    let pid3 = running_pid(&client, &api, &id).await;
    assert!(pid3 > 0);
    let d: Value = client
        .get(format!("{api}/deployments/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let spec = &d["specification"]["spec"];
    assert_eq!(
        (
            &spec["node_group"],
            &spec["capacity_requests"],
            &spec["restart_policy"]
        ),
        (&json!("local"), &json!({"cpu": 1}), &json!("never")),
        "{spec}"
    );
    let environ = std::fs::read(format!("/proc/{pid3}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("GREETING=hi"));
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

/// `symphony logs tick` for a deployment named `tick`: every command that takes a deployment
/// takes its name; an ambiguous name lists the candidates and exits 2.
#[tokio::test]
async fn client_commands_take_a_deployment_name() {
    let c = crate::support::Cluster::start().await;
    let tick = c.deploy("tick", crate::support::sh("true")).await;
    let dup_a = c.deploy("dup", crate::support::sh("true")).await;
    let dup_b = c.deploy("dup", crate::support::sh("true")).await;
    let api = c.api.clone();
    let symphony = move |args: &'static [&'static str]| {
        let api = api.clone();
        tokio::task::spawn_blocking(move || run(&api, args))
    };

    let (code, out, err) = symphony(&["logs", "tick"]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "", "no lines yet");
    let (code, out, err) = symphony(&["stop", "tick"]).await.unwrap();
    assert_eq!((code, out.trim()), (0, tick.as_str()), "{err}");
    let (_, d) = c.get(&format!("/deployments/{tick}")).await;
    assert_eq!(d["desired_state"], "STOPPED");
    let (code, out, err) = symphony(&["start", "tick"]).await.unwrap();
    assert_eq!((code, out.trim()), (0, tick.as_str()), "{err}");

    let (code, out, err) = symphony(&["rm", "dup"]).await.unwrap();
    assert_eq!(code, 2, "{out}{err}");
    let (first, second) = if dup_a < dup_b {
        (&dup_a, &dup_b)
    } else {
        (&dup_b, &dup_a)
    };
    assert_eq!(
        err.trim(),
        format!(
            "error: 'dup' is ambiguous; it matches: {first} (dup), {second} (dup); give the id"
        )
    );
    let (code, _, err) = symphony(&["rm", "nothing-by-that-name"]).await.unwrap();
    assert_eq!(code, 1, "{err}");

    let (code, out, err) = symphony(&["rm", "tick"]).await.unwrap();
    assert_eq!((code, out.trim()), (0, tick.as_str()), "{err}");
    let (status, _) = c.get(&format!("/deployments/{tick}")).await;
    assert_eq!(status, 404);
    c.shutdown().await;
}

/// A pod's whole path as a user runs it: the first admin token made on the conductor's host
/// against its store, a join token through the API with it, a `symphony node` that has only
/// the two environment variables, and its revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_joins_with_two_environment_variables_and_is_revoked() {
    let c = crate::support::Cluster::start_with(|cfg| cfg.api_auth = Some(true)).await;
    let storage = c.cfg.storage_dir.to_str().unwrap().to_owned();
    let api = c.api.clone();
    let (code, out, err) = tokio::task::spawn_blocking({
        let api = api.clone();
        move || {
            run(
                &api,
                &[
                    "api-token",
                    "create",
                    "--role",
                    "admin",
                    "--name",
                    "first",
                    "--storage",
                    &storage,
                ],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let admin = out.trim().to_owned();
    assert!(admin.starts_with("SYMA1."), "{out}");

    // Without the token the API refuses; with it a join token is made.
    let (code, _, err) = run(&api, &["token", "create", "--uses", "1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("API token"), "{err}");
    let out = Command::new(bin())
        .args(["token", "create", "--groups", "gpu", "--uses", "1"])
        .env("SYMPHONY_API", &api)
        .env("SYMPHONY_TOKEN", &admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let join = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(join.starts_with("SYM1."), "{join}");

    let mut c = c;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {admin}").parse().unwrap(),
    );
    c.http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let child = Command::new(bin())
        .arg("node")
        .current_dir(work.path())
        .env("SYMPHONY_JOIN_TOKEN", &join)
        .env("SYMPHONY_CONDUCTOR", c.quic_addr().to_string())
        .env_remove("SYMPHONY_API")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Child(child);
    let view = c
        .wait("the pod online", |v| {
            v.nodes
                .values()
                .any(|n| n.node_id.as_str().starts_with("node-") && n.state == "online")
        })
        .await;
    let node = view
        .nodes
        .values()
        .find(|n| n.node_id.as_str().starts_with("node-"))
        .unwrap();
    assert_eq!(node.groups, ["gpu"]);
    let id = node.node_id.to_string();
    // The key stays in the pod, owner-only; the token is not needed again.
    let key = work.path().join("symphony-node/identity/node.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Workloads never inherit the pod's join token.
    let seen = work.path().join("seen");
    let mut spec = crate::support::sh(&format!(
        "echo \"tok=${{SYMPHONY_JOIN_TOKEN:-none}}\" > {}; sleep 1000",
        seen.display()
    ));
    spec["node_group"] = json!("gpu");
    let d = c.deploy("env-check", spec).await;
    c.wait_state(&d, "RUNNING").await;
    until("the workload wrote what it saw", || {
        std::fs::read_to_string(&seen).is_ok_and(|t| t.ends_with('\n'))
    })
    .await;
    assert_eq!(std::fs::read_to_string(&seen).unwrap().trim(), "tok=none");

    let out = Command::new(bin())
        .args(["node", "revoke", &id, "--reason", "pod returned"])
        .env("SYMPHONY_API", &api)
        .env("SYMPHONY_TOKEN", &admin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success(), "a revoked node exits with an error");
    c.shutdown().await;
}

/// HTTPS for the API: the CLI reaches it with `--ca` (HTTPS for requests, WSS for logs), a
/// client that does not trust the certificate is refused, plain HTTP gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_https() {
    let certs = tempfile::tempdir().unwrap();
    let ca = symphony_net::CertificateAuthority::load_or_create(certs.path()).unwrap();
    let pair = ca
        .issue_server(&["127.0.0.1".into()], symphony_net::Validity::days(1))
        .unwrap();
    let (cert, key) = (certs.path().join("api.pem"), certs.path().join("api.key"));
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    symphony_net::pki::write_private(&key, &pair.key_pem).unwrap();
    let ca_file = certs.path().join("ca.pem");
    let mut c = crate::support::Cluster::start_with(|cfg| {
        cfg.api_tls = Some(symphony::conductor::ApiTls {
            cert: cert.clone(),
            key: key.clone(),
        });
    })
    .await;
    c.http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    c.add_node("n1", &[], &[], false).await;
    let https = c.api.clone();
    assert!(https.starts_with("https://"), "{https}");
    let id = c
        .deploy("hello", crate::support::sh("echo over-tls; sleep 1000"))
        .await;
    c.wait_state(&id, "RUNNING").await;
    let ca_arg = ca_file.to_str().unwrap().to_owned();
    let cli = move |args: Vec<String>| {
        let https = https.clone();
        let ca_arg = ca_arg.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(bin())
                .args(&args)
                .env("SYMPHONY_API", &https)
                .env("SYMPHONY_CA", &ca_arg)
                .output()
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let (code, out, err) = cli(vec!["ps".into()]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hello"), "{out}");
    let (code, out, err) = cli(vec!["logs".into(), id.clone()]).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("over-tls"), "{out}");
    // Without the CA the certificate is not trusted.
    let out = Command::new(bin())
        .args(["ps"])
        .env(
            "SYMPHONY_API",
            format!("https://{}", c.conductor().http_addr),
        )
        .env_remove("SYMPHONY_CA")
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/nodes", c.conductor().http_addr))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    c.shutdown().await;
}

/// `symphony run FILE --param k=v --wait` follows the run to its end (exit 0 when it
/// succeeded, 1 when it failed); `runs` lists it; `run show` draws the DAG; `run cancel`.
#[tokio::test]
async fn workflows_run_from_a_file_and_are_followed_to_their_end() {
    let mut c = crate::support::Cluster::start().await;
    c.add_node("n1", &[], &[], false).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.yaml");
    std::fs::write(
        &file,
        "name: w\ntasks:\n  - name: a\n    config: {command: [sh, -c, 'test \"$SYMPHONY_PARAM_OK\" = yes']}\n  - name: b\n    depends_on: [a]\n    config: {command: ['true']}\n",
    )
    .unwrap();
    let api = c.api.clone();
    let path = file.display().to_string();
    let symphony = move |args: Vec<String>| {
        let api = api.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&api, &args)
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let (code, out, err) = symphony(args(&["run", &path, "--param", "ok=yes", "--wait"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("2/2 done, 0 running, 0 failed  SUCCEEDED"),
        "{out}"
    );
    assert!(out.contains("└─ b  SUCCEEDED"), "{out}");
    let (code, out, err) = symphony(args(&["run", &path, "--param", "ok=no", "--wait"]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("FAILED"), "{out}");
    assert!(out.contains("b  UPSTREAM_FAILED"), "{out}");
    let (code, out, err) = symphony(args(&["runs"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    let id = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let (code, out, err) = symphony(args(&["run", "show", &id])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("run {id} of w v1")), "{out}");
    let (_, w) = c.get("/workflows/w").await;
    assert_eq!(w["version"], 1, "the same file twice is one version");
    let (code, _, err) = symphony(args(&["run", "cancel", &id])).await.unwrap();
    assert_eq!(code, 1, "an ended run cannot be cancelled: {err}");
    assert!(err.contains("already ended"), "{err}");
    c.shutdown().await;
}
