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

#[tokio::test]
async fn a_connector_reaches_its_binder_through_symph_variables() {
    // One port in the pool, free on this machine.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = Cluster::start_with(|cfg| cfg.service_ports = port..=port).await;
    c.add_node("n1", &["local"], &[], false).await;
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
        }])
    );
    // Ports and binders are stored: a restarted conductor has the same table.
    c.restart_conductor().await;
    assert_eq!(c.get("/services").await.1, services);
    // A deleted binder frees its name and port.
    assert_eq!(c.delete(&format!("/deployments/{server}")).await.0, 204);
    assert_eq!(c.get("/services").await.1, json!([]));
    let other = c
        .deploy("other", python("pass", json!({ "binds": ["other"] })))
        .await;
    assert_eq!(c.get("/services").await.1[0]["deployment_id"], json!(other));
    c.shutdown().await;
}
