//! Mesh services on one node: a binder and a connector find each other through the
//! `SYMPH_*` variables the conductor hands out, with ports unique in the cluster, and bad
//! declarations are refused with a 422 naming the field.

use serde_json::{Value, json};

use crate::support::Cluster;

/// A TCP server on the `echo` service's address: answers `pong:<what it read>`.
const SERVER: &str = "import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((os.environ['SYMPH_ECHO_HOST'], int(os.environ['SYMPH_ECHO_PORT'])))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b'pong:' + c.recv(100))
    c.close()
";

/// A client of `echo` through `SYMPH_ECHO_ADDR`; exits 0 when the answer is right. It retries
/// while the server is not listening yet (the binder may still be starting).
const CLIENT: &str = "import os, socket, sys, time
host, port = os.environ['SYMPH_ECHO_ADDR'].rsplit(':', 1)
for _ in range(300):
    try:
        c = socket.create_connection((host, int(port)), timeout=5)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(2)
c.sendall(b'ping')
sys.exit(0 if c.recv(100) == b'pong:ping' else 3)
";

fn python(script: &str, extra: Value) -> Value {
    let mut spec = json!({ "config": { "command": ["python3", "-c", script] } });
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    spec
}

fn first_loc(resp: &Value) -> String {
    resp["detail"][0]["loc"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(".")
        })
        .unwrap_or_default()
}

/// A TCP port free on `ip` now.
fn free_port_on(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A cluster with one node and one port in the service pool (free on this machine).
async fn one_port_cluster() -> (Cluster, u16) {
    let port = free_port_on("127.0.0.1");
    let mut c = Cluster::start_with(|cfg| cfg.service_ports = port..=port).await;
    c.add_node("n1", &["local"], &[], false).await;
    (c, port)
}

#[tokio::test]
async fn a_connector_reaches_its_binder_through_symph_variables() {
    let (mut c, port) = one_port_cluster().await;
    let post = |name: &str, spec: Value| json!({ "name": name, "specification": { "spec": spec } });

    // Connecting to a service nobody binds is refused before anything runs.
    let client = python(
        CLIENT,
        json!({ "connects": ["echo"], "restart_policy": "never" }),
    );
    let (status, resp) = c.post("/deployments", post("client", client.clone())).await;
    assert_eq!(
        (status, first_loc(&resp).as_str()),
        (422, "body.specification.spec.connects.0"),
        "{resp}"
    );

    let server = c
        .deploy("server", python(SERVER, json!({ "binds": ["echo"] })))
        .await;
    // The name is taken, and the pool has no second port.
    for (spec, loc) in [
        (
            json!({ "binds": ["echo"] }),
            "body.specification.spec.binds.0",
        ),
        (
            json!({ "binds": ["other"] }),
            "body.specification.spec.binds.0",
        ),
    ] {
        let (status, resp) = c
            .post("/deployments", post("x", python("pass", spec)))
            .await;
        assert_eq!((status, first_loc(&resp).as_str()), (422, loc), "{resp}");
    }

    let client = c.deploy("client", client).await;
    let done = c.wait_state(&client, "EXITED").await;
    assert_eq!(done["status"]["last_exit_code"], 0, "{done}");

    let (status, services) = c.get("/services").await;
    assert_eq!(status, 200);
    assert_eq!(
        services,
        json!([{
            "namespace": "default", "name": "echo", "host": "127.0.0.1", "port": port,
            "exposed": false, "deployment_id": server, "deployment_name": "server",
            "node_id": "n1", "connectors": [client],
            "paths": [{"node_id": "n1", "path": "local", "rtt_ms": 0.0, "direct_error": null}],
        }])
    );
    // Ports and binders are stored: a restarted conductor has the same table.
    c.restart_conductor().await;
    assert_eq!(c.get("/services").await.1, services);
    // A deleted binder frees its name and port; its connector can still be changed.
    assert_eq!(c.delete(&format!("/deployments/{server}")).await.0, 204);
    assert_eq!(c.get("/services").await.1, json!([]));
    let (status, resp) = c
        .patch(
            &format!("/deployments/{client}"),
            json!({"desired_state": "STOPPED"}),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    let other = c
        .deploy("other", python("pass", json!({ "binds": ["other"] })))
        .await;
    assert_eq!(c.get("/services").await.1[0]["deployment_id"], json!(other));
    c.shutdown().await;
}

/// An HTTP server for the `web` service: files from its folder, and `Upgrade: echo`
/// switches the connection to echoing raw bytes (the shape of a WebSocket upgrade).
const WEB: &str = "import os, http.server
open('index.txt', 'w').write('hello-mesh')
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get('Upgrade') != 'echo':
            return super().do_GET()
        self.send_response(101)
        self.send_header('Upgrade', 'echo')
        self.send_header('Connection', 'Upgrade')
        self.end_headers()
        self.wfile.flush()
        while True:
            b = self.rfile.read1(100)
            if not b:
                break
            self.wfile.write(b)
            self.wfile.flush()
        self.close_connection = True
http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['SYMPH_WEB_PORT'])), H).serve_forever()
";

/// Sends `request` on a fresh connection to `addr` and reads the answer's head.
async fn raw_head(addr: &str, request: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    (s, String::from_utf8(head).unwrap())
}

#[tokio::test]
async fn exposed_services_are_reachable_through_the_conductor() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (c, _) = one_port_cluster().await;
    let web = c
        .deploy(
            "web",
            python(WEB, json!({ "binds": ["web"], "exposes": ["web"] })),
        )
        .await;
    c.wait_state(&web, "RUNNING").await;

    // HTTP through the proxy: the first request waits for the server to listen.
    let url = format!("{}/services/default/web/index.txt?x=1", c.api);
    let resp = c.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "hello-mesh");
    // The path goes through as sent, percent-encoding included.
    let resp = c
        .http
        .get(format!("{}/services/default/web/a%20b%3Fc.txt", c.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // The service's own errors come back as they are (not rewritten into `detail`).
    let resp = c
        .http
        .get(format!("{}/services/default/web/nope", c.api))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let ct = resp.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(ct.starts_with("text/html"), "{ct}");
    // Unknown (or unexposed) services are the conductor's 404.
    let (status, body) = c.get("/services/default/nope/").await;
    assert_eq!(
        (status, body),
        (404, json!({"detail": "Service not found or not exposed"}))
    );

    // An upgrade (what a WebSocket does) passes through, then bytes flow both ways.
    let api = c.api.trim_start_matches("http://").to_owned();
    let (mut s, head) = raw_head(
        &api,
        "GET /services/default/web/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"over the mesh").await.unwrap();
    let mut echoed = [0u8; 13];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"over the mesh");

    // `symphony port-forward web 0`: raw TCP from a local port to the service.
    let mut pf = tokio::process::Command::new(crate::support::symphony_bin())
        .args(["port-forward", "web", "0", "--api", &c.api])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    tokio::io::BufReader::new(pf.stdout.take().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    let local = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let (mut s, head) = raw_head(&local, "GET /index.txt HTTP/1.0\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert_eq!(body, "hello-mesh");
    // `symphony visit --url-only` prints the proxy URL.
    let visit = tokio::process::Command::new(crate::support::symphony_bin())
        .args(["visit", "web", "--url-only", "--api", &c.api])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&visit.stdout).trim(),
        format!("{}/services/default/web/", c.api)
    );
    pf.kill().await.unwrap();
    c.shutdown().await;
}

/// An `echo` server that listens on the first of `BIND_HOSTS` it can (agents on this host reach
/// services at their own loopback addresses; a binder that may run on either of two nodes
/// tries both, and an old copy may still hold the first).
const SERVER_ANY: &str = "import os, socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
for h in os.environ['BIND_HOSTS'].split():
    try:
        s.bind((h, int(os.environ['SYMPH_ECHO_PORT'])))
        break
    except OSError:
        pass
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b'pong:' + c.recv(100))
    c.close()
";

/// One round trip to the `echo` service at `addr`; `None` if the mesh reset it.
async fn ping(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"ping").await.ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.ok()?;
    Some(answer).filter(|a| !a.is_empty())
}

/// Binder on n1, connector on n0 (two agents on this host: n1 reaches services at
/// 127.0.0.2, n0 listens for them at 127.0.0.3). Returns the cluster, where n0 listens, and
/// the path `/services` settles on for n0.
async fn two_node_mesh(direct: bool) -> (Cluster, std::net::SocketAddr, Value) {
    let port = free_port_on("127.0.0.2");
    let mut c = Cluster::start_with(|cfg| {
        cfg.service_ports = port..=port;
        cfg.direct_paths = direct;
    })
    .await;
    c.add_node_at("n0", &["n0"], [127, 0, 0, 3].into(), false)
        .await;
    c.add_node_at("n1", &["n1"], [127, 0, 0, 2].into(), false)
        .await;
    let server = python(
        SERVER_ANY,
        json!({ "binds": ["echo"], "node_group": "n1", "env": {"BIND_HOSTS": "127.0.0.2"} }),
    );
    let server = c.deploy("server", server).await;
    let sleeper = json!({ "config": { "command": ["sleep", "1000"] }, "connects": ["echo"], "node_group": "n0" });
    let connector = c.deploy("connector", sleeper).await;
    c.wait_state(&server, "RUNNING").await;
    c.wait_state(&connector, "RUNNING").await;
    let want = if direct { "direct" } else { "relay" };
    let view = c
        .wait(&format!("the path from n0 is {want}"), |v| {
            v.services
                .first()
                .is_some_and(|s| s.paths.first().is_some_and(|p| p.path == want))
        })
        .await;
    let path = serde_json::to_value(&view.services[0].paths).unwrap();
    (c, std::net::SocketAddr::from(([127, 0, 0, 3], port)), path)
}

#[tokio::test]
async fn connectors_reach_a_binder_on_another_node_directly_even_while_the_conductor_is_away() {
    let (mut c, addr, paths) = two_node_mesh(true).await;
    assert_eq!(paths[0]["node_id"], "n0");
    assert!(paths[0]["rtt_ms"].as_f64().is_some(), "{paths}");
    // The events log has the service going up and n0's path ending direct.
    let story = c
        .wait_events(
            "object=service/default/echo&after=0",
            "up, then direct",
            |e| {
                e.iter().any(|e| e["kind"] == "service.up")
                    && e.iter()
                        .rev()
                        .find(|e| e["kind"] == "service.path_changed")
                        .is_some_and(|e| {
                            e["fields"]["node"] == "n0" && e["fields"]["to"] == "direct"
                        })
            },
        )
        .await;
    assert!(
        !story.iter().any(|e| e["kind"] == "service.down"),
        "{story:?}"
    );
    // `/services` says so too.
    let (_, services) = c.get("/services").await;
    assert_eq!(services[0]["paths"], paths);
    // The first connection may wait for the binder to listen.
    let mut answer = None;
    for _ in 0..100 {
        answer = ping(addr).await;
        if answer.is_some() {
            break;
        }
    }
    assert_eq!(answer.as_deref(), Some("pong:ping"));
    let (_, newest) = c.get("/events?limit=1").await;
    let high = newest[0]["id"].as_u64().unwrap();
    // With the conductor gone no relay exists: only the direct path can carry this.
    let conductor = c.conductor.take().unwrap();
    conductor.shutdown().await;
    assert_eq!(ping(addr).await.as_deref(), Some("pong:ping"));
    // A new conductor learns the live direct path again (the nodes answer its punch at once).
    c.conductor = Some(
        symphony::conductor::Conductor::start(c.cfg.clone())
            .await
            .unwrap(),
    );
    c.wait("direct again after a conductor restart", |v| {
        v.services
            .first()
            .is_some_and(|s| s.paths.first().is_some_and(|p| p.path == "direct"))
    })
    .await;
    assert_eq!(ping(addr).await.as_deref(), Some("pong:ping"));
    // The service never went down, so a restarted conductor does not say it came up.
    let after = c
        .wait_events(
            &format!("after={high}&object=service"),
            "the direct path again",
            |e| e.iter().any(|e| e["fields"]["to"] == "direct"),
        )
        .await;
    assert!(
        !after.iter().any(|e| e["kind"] == "service.up"),
        "{after:?}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn without_direct_paths_tunnels_are_relayed_and_need_the_conductor() {
    let (mut c, addr, paths) = two_node_mesh(false).await;
    assert_eq!(paths[0]["node_id"], "n0");
    let mut answer = None;
    for _ in 0..100 {
        answer = ping(addr).await;
        if answer.is_some() {
            break;
        }
    }
    assert_eq!(answer.as_deref(), Some("pong:ping"));
    let conductor = c.conductor.take().unwrap();
    conductor.shutdown().await;
    // Held for a while, then reset: nothing carries it.
    assert_eq!(ping(addr).await, None);
    c.conductor = Some(
        symphony::conductor::Conductor::start(c.cfg.clone())
            .await
            .unwrap(),
    );
    c.shutdown().await;
}

/// Pings through `addr` until an answer comes (the binder may be starting), at most ~30 s.
async fn ping_until_answered(addr: std::net::SocketAddr) -> Option<String> {
    for _ in 0..3 {
        if let Some(a) = ping(addr).await {
            return Some(a);
        }
    }
    None
}

#[tokio::test]
async fn a_service_whose_node_is_lost_comes_back_where_its_binder_is_rescheduled() {
    let port = free_port_on("127.0.0.2");
    let mut c = Cluster::start_with(|cfg| {
        cfg.service_ports = port..=port;
        cfg.suspect_after = std::time::Duration::from_millis(300);
        cfg.grace = std::time::Duration::from_millis(1500);
    })
    .await;
    c.add_node_at("n0", &["n0"], [127, 0, 0, 3].into(), false)
        .await;
    // n1 reaches the conductor through a proxy the test can cut.
    c.add_node_at("n1", &["b"], [127, 0, 0, 2].into(), true)
        .await;
    let server = python(
        SERVER_ANY,
        json!({ "binds": ["echo"], "node_group": "b", "env": {"BIND_HOSTS": "127.0.0.2 127.0.0.4"} }),
    );
    let server = c.deploy("server", server).await;
    let sleeper = json!({ "config": { "command": ["sleep", "1000"] }, "connects": ["echo"], "node_group": "n0" });
    c.deploy("connector", sleeper).await;
    c.wait("echo bound on n1", |v| {
        v.services
            .first()
            .is_some_and(|s| s.node_id.as_deref() == Some("n1"))
    })
    .await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 3], port));
    assert_eq!(
        ping_until_answered(addr).await.as_deref(),
        Some("pong:ping")
    );

    // The second node of the group joins, then n1 vanishes without a word.
    c.add_node_at("n2", &["b"], [127, 0, 0, 4].into(), false)
        .await;
    c.proxy("n1").set_blackhole(true);
    let view = c
        .wait("echo rescheduled to n2", |v| {
            v.services
                .first()
                .is_some_and(|s| s.node_id.as_deref() == Some("n2"))
        })
        .await;
    assert_eq!(
        view.services[0].port, port,
        "a service keeps its port when it moves"
    );
    c.wait_state(&server, "RUNNING").await;
    // The connector's node reaches the new binder through the same address.
    assert_eq!(
        ping_until_answered(addr).await.as_deref(),
        Some("pong:ping")
    );
    c.proxy("n1").set_blackhole(false);
    c.shutdown().await;
}

#[tokio::test]
async fn a_node_that_runs_nothing_cannot_reach_services_through_the_relay() {
    use symphony::wire;
    let (c, _) = one_port_cluster().await;
    let server = c
        .deploy("server", python(SERVER, json!({ "binds": ["echo"] })))
        .await;
    c.wait_state(&server, "RUNNING").await;
    // A node with a valid certificate that runs no deployment, speaking the protocol itself.
    let dir = tempfile::tempdir().unwrap();
    let files = c
        .conductor()
        .ca
        .ensure_node_files("idle", dir.path())
        .unwrap();
    let tls =
        symphony_net::TlsMaterial::from_files(&dir.path().join("ca.pem"), &files.cert, &files.key)
            .unwrap();
    let mut cfg = symphony_net::ClientConfig::new(c.quic_addr().to_string(), tls);
    cfg.server_name = Some("localhost".into());
    cfg.settings = crate::support::fast_transport();
    let client = symphony_net::Client::new(cfg).unwrap();
    let (session, mut control) = client.connect().await.unwrap();
    let hello = wire::NodeMessage {
        msg: Some(wire::node_message::Msg::Hello(wire::Hello {
            protocol_version: wire::ProtocolVersion::Current as u32,
            node_id: "idle".into(),
            ..Default::default()
        })),
    };
    control.tx.send(&hello).await.unwrap();
    let ack: Option<wire::ConductorMessage> = control.rx.recv().await.unwrap();
    assert!(ack.is_some());
    let mut t = session.open_tunnel().await.unwrap();
    let open = wire::TunnelOpen {
        namespace: "default".into(),
        name: "echo".into(),
        port: 0,
    };
    t.send_header(&open).await.unwrap();
    let (mut recv, mut send) = (t.recv, t.send);
    let _ = send.write_all(b"ping").await;
    let read = recv.read_to_end(1024).await;
    assert!(
        read.is_err(),
        "the relay carried a tunnel for a node that runs nothing: {read:?}"
    );
    session.close(symphony_net::CloseCode::Shutdown, "done");
    c.shutdown().await;
}
