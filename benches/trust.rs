//! Trust costs, each beside its baseline in the same run:
//!
//! (a) API authentication: `GET /deployments/{id}` and `POST /deployments` (STOPPED) with a
//!     viewer/operator token against a conductor that requires tokens, alternated with the
//!     same calls against one that does not (loopback). Reports medians and their ratio.
//! (b) Enrollment: N nodes join at once with one token (key pair, pinned-CA handshake on
//!     `symphony-enroll/1`, token check, CSR signing, one SQLite transaction each), beside N
//!     plain mTLS connections of already-enrolled nodes (handshake + control stream): what
//!     joining costs over connecting.
//!
//! Loopback only. `BENCH_QUICK=1` runs a short version. Results go to target/bench/trust.json.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use symphony::conductor::core::{CoreMsg, TrustMsg};
use symphony::conductor::trust::Role;
use symphony::conductor::{Conductor, ConductorConfig};
use symphony::node::join::{IdentityFiles, JoinRequest, identity};

fn main() -> anyhow::Result<()> {
    let quick = common::quick();
    let (rounds, calls, nodes) = if quick { (1, 200, 50) } else { (3, 2000, 200) };
    println!(
        "trust bench: API auth A/B {rounds} x {calls} calls; enrollment of {nodes} nodes at once"
    );
    let rt = common::runtime()?;
    let auth = rt.block_on(auth_ab(rounds, calls))?;
    let enroll = rt.block_on(enrollment(nodes))?;
    let report = common::report(
        "trust",
        json!({"rounds": rounds, "calls_per_round": calls, "nodes": nodes}),
        json!({"api_auth": auth, "enrollment": enroll}),
    );
    let path = common::write_doc("trust", &report)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

async fn conductor(auth: bool) -> anyhow::Result<(tempfile::TempDir, Conductor)> {
    let dir = tempfile::tempdir()?;
    let mut cfg = ConductorConfig::local(dir.path().join("storage"));
    cfg.quic_listen = "127.0.0.1:0".parse()?;
    cfg.http_listen = "127.0.0.1:0".parse()?;
    cfg.api_auth = Some(auth);
    let c = Conductor::start(cfg).await?;
    Ok((dir, c))
}

async fn api_token(c: &Conductor, name: &str, role: Role) -> anyhow::Result<String> {
    let (_, t) = c
        .core
        .call(|reply| {
            CoreMsg::Trust(TrustMsg::CreateApiToken {
                name: name.into(),
                role,
                reply,
            })
        })
        .await?;
    Ok(t)
}

/// Per-call latencies (ms) of `calls` GETs and `calls` POSTs.
async fn calls_against(auth: bool, calls: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (_dir, c) = conductor(auth).await?;
    let token = if auth {
        Some(api_token(&c, "bench", Role::Operator).await?)
    } else {
        None
    };
    let api = format!("http://{}", c.http_addr);
    let http = reqwest::Client::new();
    let with = |r: reqwest::RequestBuilder| match &token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    let body = json!({"name": "b", "desired_state": "STOPPED",
        "specification": {"spec": {"config": {"command": ["true"]}}}});
    let created: Value = with(http.post(format!("{api}/deployments")))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    let (mut gets, mut posts) = (Vec::new(), Vec::new());
    for _ in 0..calls {
        let t = Instant::now();
        let r = with(http.get(format!("{api}/deployments/{id}")))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "GET: {}", r.status());
        r.bytes().await?;
        gets.push(t.elapsed().as_secs_f64() * 1e3);
    }
    for _ in 0..calls / 4 {
        let t = Instant::now();
        let r = with(http.post(format!("{api}/deployments")))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(r.status().as_u16() == 201, "POST: {}", r.status());
        r.bytes().await?;
        posts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    c.shutdown().await;
    Ok((gets, posts))
}

async fn auth_ab(rounds: usize, calls: usize) -> anyhow::Result<Value> {
    let (mut off_get, mut off_post, mut on_get, mut on_post) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (g, p) = calls_against(false, calls).await?;
        off_get.extend(g);
        off_post.extend(p);
        let (g, p) = calls_against(true, calls).await?;
        on_get.extend(g);
        on_post.extend(p);
    }
    let s = |v: Vec<f64>| common::sample_json(v, false);
    let (off_get, off_post, on_get, on_post) = (s(off_get), s(off_post), s(on_get), s(on_post));
    let p50 = |v: &Value| v["p50_ms"].as_f64().unwrap_or(f64::NAN);
    let get_ratio = p50(&on_get) / p50(&off_get);
    let post_ratio = p50(&on_post) / p50(&off_post);
    println!(
        "API auth A/B: GET p50 {:.3} ms without tokens, {:.3} ms with (x{get_ratio:.3}); POST p50 {:.3} ms without, {:.3} ms with (x{post_ratio:.3})",
        p50(&off_get),
        p50(&on_get),
        p50(&off_post),
        p50(&on_post)
    );
    Ok(
        json!({"get_off": off_get, "get_on": on_get, "post_off": off_post, "post_on": on_post,
              "get_p50_ratio_on_off": get_ratio, "post_p50_ratio_on_off": post_ratio}),
    )
}

async fn enrollment(nodes: usize) -> anyhow::Result<Value> {
    let (dir, c) = conductor(false).await?;
    let (_, token) = c
        .core
        .call(|reply| {
            CoreMsg::Trust(TrustMsg::CreateJoinToken {
                groups: vec!["gpu".into()],
                ttl: Duration::from_secs(600),
                uses: None,
                node_id_prefix: "pod-".into(),
                reply,
            })
        })
        .await?;
    let conductor_addr = c.quic_addr.to_string();
    let cpu0 = common::proc_cpu_ticks("self");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..nodes {
        let files = IdentityFiles::in_work_dir(&dir.path().join(format!("n{i}")));
        let req = JoinRequest {
            token: Some(token.clone()),
            conductor: conductor_addr.clone(),
            node_id: None,
            groups: vec![],
        };
        tasks.spawn(async move {
            identity(&files, &req, &symphony_net::TransportSettings::default()).await
        });
    }
    let mut materials = Vec::new();
    while let Some(r) = tasks.join_next().await {
        materials.push(r??.1);
    }
    let enroll_s = started.elapsed().as_secs_f64();
    let enroll_cpu = (common::proc_cpu_ticks("self") - cpu0) as f64 / common::clock_ticks();

    // Baseline: the same nodes connecting with the certificates they got.
    let cpu0 = common::proc_cpu_ticks("self");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for tls in materials {
        let mut cfg = symphony_net::ClientConfig::new(conductor_addr.clone(), tls);
        cfg.server_name = Some(symphony::node::join::SERVER_NAME.into());
        tasks.spawn(async move {
            let client = symphony_net::Client::new(cfg)?;
            let (session, _control) = client.connect().await?;
            session.close(symphony_net::CloseCode::Shutdown, "bench");
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let connect_s = started.elapsed().as_secs_f64();
    let connect_cpu = (common::proc_cpu_ticks("self") - cpu0) as f64 / common::clock_ticks();
    c.shutdown().await;
    println!(
        "enrollment: {nodes} nodes joined at once in {:.3} s ({:.0}/s, {:.2} ms CPU each, conductor and nodes in one process); {nodes} plain mTLS connects {:.3} s ({:.2} ms CPU each); join/connect x{:.2}",
        enroll_s,
        nodes as f64 / enroll_s,
        enroll_cpu * 1e3 / nodes as f64,
        connect_s,
        connect_cpu * 1e3 / nodes as f64,
        enroll_s / connect_s
    );
    Ok(
        json!({"nodes": nodes, "enroll_s": enroll_s, "enroll_cpu_s": enroll_cpu,
              "connect_s": connect_s, "connect_cpu_s": connect_cpu,
              "ratio_enroll_connect": enroll_s / connect_s}),
    )
}
