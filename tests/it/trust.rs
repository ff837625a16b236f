//! Trust end to end: join tokens and enrollment, renewal, revocation, API tokens and roles.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use symphony::conductor::trust::{JoinToken, Role};
use symphony::node::join::{IdentityFiles, JoinRequest, identity};

use crate::support::{Cluster, fast_transport, sh};

async fn call(c: &Cluster, method: Method, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = c.http.request(method.clone(), format!("{}{path}", c.api));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if method != Method::GET {
        req = req.json(&json!({}));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `POST path` with `body` as `token`.
async fn post_as(c: &Cluster, token: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = c
        .http
        .post(format!("{}{path}", c.api))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// For every operation in the OpenAPI document: 401 without a token, 403 with every role
/// below the one it names, neither with that role. Driven from the document, so a new route
/// cannot be left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_its_role() {
    let c = Cluster::start_with(|cfg| cfg.api_auth = Some(true)).await;
    let tokens = [
        (Role::Viewer, c.api_token("v", Role::Viewer).await),
        (Role::Operator, c.api_token("o", Role::Operator).await),
        (Role::Admin, c.api_token("a", Role::Admin).await),
    ];
    let (status, doc) = call(&c, Method::GET, "/openapi.json", None).await;
    assert_eq!(status, 200, "the document is public");
    let mut checked = 0;
    let mut problems = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        // Path parameters get a value that names nothing: the role check comes first.
        let path: String = template
            .split('/')
            .map(|seg| if seg.starts_with('{') { "nothing" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for (method, op) in item.as_object().unwrap() {
            let Some(role) = op.get("x-symphony-role").and_then(Value::as_str) else {
                continue;
            };
            let m: Method = method.to_uppercase().parse().unwrap();
            if role == "public" {
                continue;
            }
            let need = Role::from_name(role).unwrap();
            checked += 1;
            let (s, body) = call(&c, m.clone(), &path, None).await;
            if s != 401 {
                problems.push(format!("{method} {path} without a token: {s} {body}"));
            }
            let (s, _) = call(&c, m.clone(), &path, Some("SYMA1.bad.token")).await;
            if s != 401 {
                problems.push(format!("{method} {path} with a bad token: {s}"));
            }
            for (r, t) in &tokens {
                let (s, body) = call(&c, m.clone(), &path, Some(t)).await;
                let refused = s == 401 || s == 403;
                if *r < need && s != 403 {
                    problems.push(format!("{method} {path} as {r}: {s}, expected 403"));
                }
                if *r >= need && refused {
                    problems.push(format!("{method} {path} as {r}: {s} {body}"));
                }
            }
        }
    }
    assert!(checked >= 35, "only {checked} operations checked");
    assert!(problems.is_empty(), "{problems:#?}");

    // A write records the token's name in its event.
    let (_, op) = &tokens[1];
    let (s, created) = post_as(
        &c,
        op,
        "/deployments",
        json!({"name": "by-o", "desired_state": "STOPPED",
               "specification": {"spec": sh("true")}}),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let (s, events) = call(
        &c,
        Method::GET,
        &format!("/deployments/{id}/events"),
        Some(&tokens[0].1),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(events[0]["kind"], "deployment.created", "{events}");
    assert_eq!(events[0]["fields"]["by"], "o", "{events}");
    // So does a run started with it (written with the others asked for at once, later).
    let (s, body) = post_as(
        &c,
        op,
        "/workflows",
        json!({"name": "by-w", "tasks": [{"name": "a", "config": {"command": ["true"]}}]}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let (s, run) = post_as(&c, op, "/workflows/by-w/runs", json!({})).await;
    assert_eq!(s, 201, "{run}");
    let run = run["id"].as_str().unwrap();
    let (s, events) = call(
        &c,
        Method::GET,
        &format!("/events?object=run/{run}&kind=run.queued"),
        Some(&tokens[0].1),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(events[0]["fields"]["by"], "o", "{events}");

    // A revoked API token is refused from the next request.
    let (s, list) = call(&c, Method::GET, "/api-tokens", Some(&tokens[2].1)).await;
    assert_eq!(s, 200);
    assert!(!list.to_string().contains("secret"), "{list}");
    let v_id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "v")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, _) = call(
        &c,
        Method::DELETE,
        &format!("/api-tokens/{v_id}"),
        Some(&tokens[2].1),
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = call(&c, Method::GET, "/deployments", Some(&tokens[0].1)).await;
    assert_eq!(s, 401);
    c.shutdown().await;
}

/// WebSockets: a token in the `Sec-WebSocket-Protocol` field (what a browser can send) opens
/// the socket and the server selects `symphony`; another origin is refused even with a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_take_a_token_and_refuse_other_origins() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let c = Cluster::start_with(|cfg| cfg.api_auth = Some(true)).await;
    let t = c.api_token("ui", Role::Viewer).await;
    let url = format!("{}/ws/updates", c.api.replace("http", "ws"));
    let plain = tokio_tungstenite::connect_async(url.as_str()).await;
    assert!(plain.is_err(), "no token must be refused");
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("symphony, bearer.{t}").parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req.clone()).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "symphony");
    let first = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(first.contains("snapshot"), "{first}");
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    c.shutdown().await;
}

/// The login cookie (what a browser sends from any page of this origin, a proxied service's
/// too) is worth at most `operator`: admin actions need the token itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_cookie_is_capped_at_operator() {
    let c = Cluster::start_with(|cfg| cfg.api_auth = Some(true)).await;
    let admin = c.api_token("boss", Role::Admin).await;
    let resp = c
        .http
        .post(format!("{}/auth/login", c.api))
        .json(&json!({"token": admin}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let with_cookie = |m: Method, path: &str| {
        c.http
            .request(m, format!("{}{path}", c.api))
            .header("cookie", pair.clone())
            .json(&json!({}))
    };
    let r = with_cookie(Method::GET, "/deployments")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = with_cookie(Method::GET, "/tokens").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .http
        .get(format!("{}/tokens", c.api))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    c.shutdown().await;
}

/// Without tokens (loopback), a request naming another host is refused: a page whose name
/// was made to resolve to 127.0.0.1 (DNS rebinding) cannot drive the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_only_loopback_names_are_served() {
    let c = Cluster::start().await;
    let (s, _) = call(&c, Method::GET, "/nodes", None).await;
    assert_eq!(s, 200);
    let r = c
        .http
        .get(format!("{}/nodes", c.api))
        .header("host", "evil.example:8000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conductor_beyond_loopback_needs_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = symphony::conductor::ConductorConfig::local(dir.path().join("storage"));
    cfg.http_listen = "0.0.0.0:0".parse().unwrap();
    cfg.quic_listen = "127.0.0.1:0".parse().unwrap();
    let err = symphony::conductor::Conductor::start(cfg)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("conductor.api_auth"), "{err:#}");
}

/// Join tokens: the node id comes from the token's prefix, the key stays on the node (0600),
/// a used-up token and a replay are refused, an expired one too, and a group the token does
/// not allow is refused both at enrollment and on Hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_enroll_nodes_within_their_limits() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::start().await;
    let token = c
        .join_token(&["gpu", "a100"], Duration::from_secs(600), Some(1))
        .await;
    let cfg = c.enroll("one", &token, &[]).await.unwrap();
    assert!(cfg.node_id.starts_with("pod-"), "{}", cfg.node_id);
    assert_eq!(cfg.groups, ["a100", "gpu"]);
    let files = cfg.identity.clone().unwrap();
    let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let id = cfg.node_id.clone();
    c.run_agent(&id, cfg);
    c.wait(&format!("{id} online"), |v| {
        v.nodes.get(&id).is_some_and(|n| n.state == "online")
    })
    .await;

    // Used up (uses: 1), and a replay of the same token.
    let err = c.enroll("two", &token, &[]).await.unwrap_err();
    assert!(format!("{err:#}").contains("used up"), "{err:#}");
    // Expired.
    let expired = c.join_token(&[], Duration::ZERO, None).await;
    let err = c.enroll("three", &expired, &[]).await.unwrap_err();
    assert!(format!("{err:#}").contains("expired"), "{err:#}");
    // A group the token lacks, at enrollment.
    let gpu_only = c.join_token(&["gpu"], Duration::from_secs(600), None).await;
    let err = c.enroll("four", &gpu_only, &["a100"]).await.unwrap_err();
    assert!(format!("{err:#}").contains("not allowed"), "{err:#}");
    // ... and on Hello: an enrolled node claiming another group is refused.
    let mut cfg = c.enroll("five", &gpu_only, &[]).await.unwrap();
    let sneaky = cfg.node_id.clone();
    cfg.groups = vec!["gpu".into(), "a100".into()];
    c.run_agent(&sneaky, cfg);
    let events = c
        .wait_events(
            &format!("object=node/{sneaky}"),
            "the hello is refused",
            |e| e.iter().any(|e| e["kind"] == "node.refused"),
        )
        .await;
    assert!(
        !events.iter().any(|e| e["kind"] == "node.connected"),
        "{events:#?}"
    );
    let (_, nodes) = c.get("/nodes").await;
    assert!(nodes["nodes"].get(&sneaky).is_none(), "{nodes}");
    let (_, tokens) = c.get("/tokens").await;
    let first = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| token.contains(t["id"].as_str().unwrap()))
        .unwrap();
    assert_eq!(first["uses"], 1, "{tokens}");
    assert!(!tokens.to_string().contains("secret_hash"), "{tokens}");
    c.shutdown().await;
}

/// A token whose pin names another CA: the node refuses the conductor in the handshake, so
/// the conductor never sees the token (its use count stays 0 and no enrollment is logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_pin_refuses_the_conductor_before_the_secret_is_sent() {
    let c = Cluster::start().await;
    let real = c.join_token(&[], Duration::from_secs(600), None).await;
    let mut t = JoinToken::parse(&real).unwrap();
    t.ca_pin[0] ^= 0xff;
    let dir = tempfile::tempdir().unwrap();
    let files = IdentityFiles::in_work_dir(dir.path());
    let req = JoinRequest {
        token: Some(t.encode()),
        conductor: c.quic_addr().to_string(),
        node_id: None,
        groups: vec![],
    };
    let err = identity(&files, &req, &fast_transport()).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("handshake") || msg.contains("certificate"),
        "{msg}"
    );
    assert!(!files.key.exists() && !files.cert.exists());
    let (_, tokens) = c.get("/tokens").await;
    assert_eq!(tokens[0]["uses"], 0, "{tokens}");
    let (_, events) = c.get("/events?kind=node.enrolled").await;
    assert_eq!(events.as_array().unwrap().len(), 0, "{events}");
    c.shutdown().await;
}

/// 200 nodes enroll at once with one token: 200 distinct ids, 200 uses, the next refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_nodes_enroll_at_once() {
    const N: usize = 200;
    // The conductor too keeps the default transport: QUIC takes the smaller of the two idle
    // timeouts, and the tests' fast 1.2 s one lost a connection of 200 handshaking at once
    // on a loaded 2-core CI machine ("connection lost" while joining).
    let c =
        Cluster::start_with(|cfg| cfg.transport = symphony_net::TransportSettings::default()).await;
    let token = c
        .join_token(&["gpu"], Duration::from_secs(600), Some(N as i64))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let files = IdentityFiles::in_work_dir(&dir.path().join(i.to_string()));
        let req = JoinRequest {
            token: Some(token.clone()),
            conductor: c.quic_addr().to_string(),
            node_id: None,
            groups: vec![],
        };
        // Default transport settings (a 20 s handshake limit): 200 handshakes at once on a
        // loaded 2-core machine take longer than the tests' fast 1.2 s idle timeout.
        tasks.spawn(async move {
            identity(&files, &req, &symphony_net::TransportSettings::default()).await
        });
    }
    let mut ids = std::collections::BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        let (rec, _) = r.unwrap().unwrap();
        ids.insert(rec.node_id);
    }
    eprintln!("{N} enrollments in {:?}", started.elapsed());
    assert_eq!(ids.len(), N);
    let (_, tokens) = c.get("/tokens").await;
    assert_eq!(tokens[0]["uses"], N, "{tokens}");
    let files = IdentityFiles::in_work_dir(&dir.path().join("late"));
    let req = JoinRequest {
        token: Some(token),
        conductor: c.quic_addr().to_string(),
        node_id: None,
        groups: vec![],
    };
    let err = identity(&files, &req, &fast_transport()).await.unwrap_err();
    assert!(format!("{err:#}").contains("used up"), "{err:#}");
    c.shutdown().await;
}

/// Renewal under load: certificates that last 3 s are renewed over the live control stream
/// while 150 deployments start (an Assign each, and two or more status messages back: over
/// 500 control messages): none is lost (all RUNNING), the connection is the same one, the
/// first process keeps its pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_the_connection_streams_and_processes() {
    let mut c = Cluster::start_with(|cfg| cfg.node_cert_ttl = Duration::from_secs(3)).await;
    let token = c.join_token(&[], Duration::from_secs(600), None).await;
    let cfg = c.enroll("r", &token, &[]).await.unwrap();
    let id = cfg.node_id.clone();
    let files = cfg.identity.clone().unwrap();
    let first_cert = std::fs::read_to_string(&files.cert).unwrap();
    c.run_agent(&id, cfg);
    c.wait(&format!("{id} online"), |v| {
        v.nodes.get(&id).is_some_and(|n| n.state == "online")
    })
    .await;
    let (_, nodes) = c.get("/nodes").await;
    let first_end = nodes["nodes"][&id]["certificate"]["not_after_ms"]
        .as_i64()
        .unwrap();
    let first = c.deploy("first", sh("sleep 1000")).await;
    let pid = c.wait_state(&first, "RUNNING").await["status"]["pid"].clone();
    let mut ids = Vec::new();
    for i in 0..150 {
        ids.push(c.deploy(&format!("d{i}"), sh("sleep 1000")).await);
    }
    c.wait_events(
        &format!("object=node/{id}&kind=node.renewed"),
        "a renewal",
        |e| !e.is_empty(),
    )
    .await;
    for d in &ids {
        c.wait_state(d, "RUNNING").await;
    }
    let after = c.wait_state(&first, "RUNNING").await;
    assert_eq!(after["status"]["pid"], pid);
    let view = c.conductor().core.view();
    let conn = view.nodes[&id].connection.as_ref().unwrap();
    assert_eq!(conn.reconnects, 0);
    // The node saves the new certificate once the conductor's answer arrives.
    crate::support::until("the renewed certificate is saved", || {
        std::fs::read_to_string(&files.cert).is_ok_and(|c| c != first_cert)
    })
    .await;
    // The conductor records the newer certificate. Its state is read once it is valid: with
    // 3 s certificates, a loaded machine may let one lapse between two renewals, and the next
    // renewal over the same connection makes it valid again.
    c.wait("a newer valid certificate recorded", |v| {
        v.nodes
            .get(&id)
            .and_then(|n| n.certificate.as_ref())
            .is_some_and(|cert| cert.state == "valid" && cert.not_after_ms > Some(first_end))
    })
    .await;
    let (_, nodes) = c.get("/nodes").await;
    assert!(nodes["nodes"][&id]["certificate"]["not_after_ms"].as_i64() > Some(first_end));
    c.shutdown().await;
}

/// Revocation: the live connection closes at once with the typed code (the agent stops), the
/// next handshake with that certificate is refused, and the deployment moves to another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_the_connection_and_moves_the_work() {
    let mut c = Cluster::start().await;
    let token = c.join_token(&[], Duration::from_secs(600), None).await;
    let cfg = c.enroll("x", &token, &[]).await.unwrap();
    let id = cfg.node_id.clone();
    let again = cfg.clone();
    c.run_agent(&id, cfg);
    c.wait(&format!("{id} online"), |v| {
        v.nodes.get(&id).is_some_and(|n| n.state == "online")
    })
    .await;
    let d = c.deploy("moves", sh("sleep 1000")).await;
    let placed = c.wait_state(&d, "RUNNING").await;
    assert_eq!(placed["assigned_node_id"], id.as_str());
    c.add_node("spare", &[], &[], false).await;

    let node = c.take_node(&id);
    let started = Instant::now();
    let (s, body) = c
        .post(&format!("/nodes/{id}/revoke"), json!({"reason": "stolen"}))
        .await;
    assert_eq!(s, 204, "{body}");
    let ended = tokio::time::timeout(Duration::from_secs(10), node.task)
        .await
        .expect("the agent ends")
        .unwrap();
    eprintln!(
        "revoked node's agent ended {:?} after the call",
        started.elapsed()
    );
    assert!(format!("{:#}", ended.unwrap_err()).contains("revoked"));
    c.wait(&format!("{d} on spare"), |v| {
        v.deployment(&d).is_some_and(|x| {
            x.assigned_node_id
                .as_ref()
                .is_some_and(|n| n.as_str() == "spare")
                && x.current_state.map(|s| s.as_str()) == Some("RUNNING")
        })
    })
    .await;
    let (_, nodes) = c.get("/nodes").await;
    assert_eq!(nodes["nodes"][&id]["certificate"]["state"], "revoked");
    assert_eq!(nodes["nodes"][&id]["certificate"]["reason"], "stolen");

    // The next handshake with that certificate is refused.
    let mut ccfg = symphony_net::ClientConfig::new(c.quic_addr().to_string(), again.tls.clone());
    ccfg.server_name = again.server_name.clone();
    ccfg.settings = fast_transport();
    let client = symphony_net::Client::new(ccfg).unwrap();
    let refused = match client.connect().await {
        Err(_) => true,
        Ok((session, _)) => {
            let (code, _) = session.closed().await;
            code == Some(symphony_net::CloseCode::Revoked) || code.is_none()
        }
    };
    assert!(refused);
    let (_, events) = c.get(&format!("/events?object=node/{id}")).await;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"node.revoked") && kinds.contains(&"node.lost"),
        "{kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .skip_while(|k| **k != "node.revoked")
            .any(|k| *k == "node.connected")
    );
    c.shutdown().await;
}

/// A node whose certificate expired while it was away renews it with its key within the
/// grace window (same node id, a valid certificate after); past the window it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_renewed_within_the_grace_window_only() {
    // Certificates that are expired as soon as they are made.
    let mut c = Cluster::start_with(|cfg| cfg.node_cert_ttl = Duration::from_millis(1)).await;
    let token = c.join_token(&[], Duration::from_secs(600), Some(1)).await;
    let cfg = c.enroll("away", &token, &[]).await.unwrap();
    let id = cfg.node_id.clone();
    let files = cfg.identity.clone().unwrap();
    let expired_cert = std::fs::read_to_string(&files.cert).unwrap();
    let key = std::fs::read_to_string(&files.key).unwrap();
    // The conductor now signs for an hour; the node comes back with its expired certificate
    // (the token is used up: only the key proves who it is).
    c.cfg.node_cert_ttl = Duration::from_secs(3600);
    c.restart_conductor().await;
    let req = JoinRequest {
        token: None,
        conductor: c.quic_addr().to_string(),
        node_id: None,
        groups: vec![],
    };
    let (rec, tls) = identity(&files, &req, &fast_transport()).await.unwrap();
    assert_eq!(rec.node_id, id);
    assert_ne!(tls.cert_pem, expired_cert);
    assert_eq!(tls.key_pem, key, "the key stays");
    let (_, events) = c
        .get(&format!("/events?object=node/{id}&kind=node.renewed"))
        .await;
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");

    // Past the grace window: refused, the files are left as they were.
    std::fs::write(&files.cert, &expired_cert).unwrap();
    c.cfg.renew_grace = Duration::from_millis(1);
    c.restart_conductor().await;
    let req = JoinRequest {
        conductor: c.quic_addr().to_string(),
        ..req
    };
    let err = identity(&files, &req, &fast_transport()).await.unwrap_err();
    assert!(format!("{err:#}").contains("new token"), "{err:#}");
    assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), expired_cert);
    c.shutdown().await;
}
