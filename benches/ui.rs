//! The web UI at scale, in a real browser (headless Chromium through chromedriver): 1 000
//! deployments and 200 node agents (in-process, heartbeat every 2 s), with renames streaming
//! in. Each page is measured twice per round, alternating:
//!
//! - ours: `/ws/updates?frames=delta`, a snapshot and then deltas, each rendered by touching
//!   only the rows and cards it names;
//! - baseline: the original's frames (`?frames=snapshot`: a full snapshot of the newest 500
//!   deployments and every node on every change), which the page renders in full each time.
//!
//! The page itself measures (`window.symphonyRender`): when the first frame was rendered
//! (after navigation), and the time each later frame took to apply and render, and the bytes
//! received. Reported: medians over rounds and the ratios baseline / ours.
//!
//! `BENCH_QUICK=1` runs a short version. Results go to target/bench/ui.json.

#[path = "../tests/it/browser.rs"]
#[allow(dead_code)]
mod browser;
mod common;

use std::time::Duration;

use serde_json::{Value, json};
use symphony::conductor::{Conductor, ConductorConfig};
use symphony::node::agent::NodeConfig;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let quick = common::quick();
    let (deployments, nodes, rounds, window) = if quick {
        (300, 20, 1, Duration::from_secs(4))
    } else {
        (1000, 200, 3, Duration::from_secs(12))
    };
    println!(
        "ui bench: {deployments} deployments, {nodes} nodes, {rounds} rounds of {window:?} per page and mode"
    );
    let rt = common::runtime()?;
    let results = rt.block_on(run(deployments, nodes, rounds, window))?;
    let report = common::report(
        "ui",
        json!({"deployments": deployments, "nodes": nodes, "rounds": rounds,
               "window_s": window.as_secs_f64(), "heartbeat_s": 2}),
        results,
    );
    let path = common::write_doc("ui", &report)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

async fn run(
    deployments: usize,
    nodes: usize,
    rounds: usize,
    window: Duration,
) -> anyhow::Result<Value> {
    let Some(b) = browser::Browser::start().await else {
        anyhow::bail!("no browser: apt-get install chromium chromium-driver");
    };
    let dir = tempfile::tempdir()?;
    let mut cfg = ConductorConfig::local(dir.path().join("storage"));
    cfg.quic_listen = "127.0.0.1:0".parse()?;
    cfg.http_listen = "127.0.0.1:0".parse()?;
    let conductor = Conductor::start(cfg).await?;
    let api = format!("http://{}", conductor.http_addr);
    let http = reqwest::Client::new();

    let cancel = CancellationToken::new();
    for i in 0..nodes {
        let id = format!("n{i:03}");
        let mut node = NodeConfig::local(
            &conductor.ca,
            conductor.quic_addr,
            &id,
            &dir.path().join("nodes").join(&id),
        )?;
        node.heartbeat = Duration::from_secs(2);
        node.groups = vec![format!("g{}", i % 8)];
        tokio::spawn(symphony::node::agent::run(node, cancel.child_token()));
    }
    let mut ids = Vec::new();
    for i in 0..deployments {
        let body = json!({"name": format!("d{i:04}"), "desired_state": "STOPPED",
                          "specification": {"spec": {"config": {"command": ["true"]}}}});
        let created: Value = http
            .post(format!("{api}/deployments"))
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        ids.push(
            created["id"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("no id"))?
                .to_owned(),
        );
    }
    let mut rx = conductor.core.subscribe();
    tokio::time::timeout(
        Duration::from_secs(120),
        rx.wait_for(|v| v.nodes.values().filter(|n| n.state == "online").count() == nodes),
    )
    .await??;
    println!("{nodes} nodes online, {deployments} deployments");

    // Renames stream in (5 a second) while a page is measured.
    let renamer = {
        let http = http.clone();
        let api = api.clone();
        let ids = ids.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut k = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while !cancel.is_cancelled() {
                tick.tick().await;
                let id = &ids[k % ids.len()];
                let _ = http
                    .patch(format!("{api}/deployments/{id}"))
                    .json(&json!({"name": format!("renamed-{k}")}))
                    .send()
                    .await;
                k += 1;
            }
        })
    };

    let mut samples: Vec<(String, String, Value)> = Vec::new();
    for round in 0..rounds {
        for page in ["deployments", "nodes"] {
            for mode in ["delta", "snapshot"] {
                let m = measure(&b, &api, page, mode, deployments, nodes, window).await?;
                println!("round {round} {page:>11} {mode:>8}: {m}");
                samples.push((page.into(), mode.into(), m));
            }
        }
    }
    cancel.cancel();
    renamer.abort();
    b.close().await;

    let median = |page: &str, mode: &str, key: &str| {
        let mut xs: Vec<f64> = samples
            .iter()
            .filter(|(p, m, _)| p == page && m == mode)
            .filter_map(|(_, _, v)| v[key].as_f64())
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut out = serde_json::Map::new();
    let mut rows = Vec::new();
    for page in ["deployments", "nodes"] {
        let mut per = serde_json::Map::new();
        for key in [
            "first_render_ms",
            "update_ms_mean",
            "update_ms_max",
            "bytes_per_update",
            "updates",
        ] {
            let ours = median(page, "delta", key);
            let base = median(page, "snapshot", key);
            per.insert(
                key.into(),
                json!({"ours": ours, "baseline": base, "baseline_over_ours": base / ours}),
            );
            rows.push(vec![
                page.to_owned(),
                key.to_owned(),
                common::ms(ours),
                common::ms(base),
                format!("{:.2}", base / ours),
            ]);
        }
        out.insert(page.into(), Value::Object(per));
    }
    println!(
        "\n{}",
        common::table(
            &[
                "page",
                "measure",
                "ours (delta)",
                "baseline (snapshot)",
                "base/ours"
            ],
            &rows
        )
    );
    Ok(
        json!({"pages": out, "samples": samples.iter().map(|(p, m, v)| json!({"page": p, "mode": m, "measured": v})).collect::<Vec<_>>()}),
    )
}

/// Opens `page` with `mode` frames, waits until it shows everything, then measures `window`
/// of live updates.
async fn measure(
    b: &browser::Browser,
    api: &str,
    page: &str,
    mode: &str,
    deployments: usize,
    nodes: usize,
    window: Duration,
) -> anyhow::Result<Value> {
    b.client
        .goto(&format!("{api}/ui/{page}?frames={mode}"))
        .await?;
    let (what, count) = if page == "nodes" {
        ("#nodes article", nodes)
    } else {
        // The original's frames carry at most 500 deployments.
        (
            "#deployments tbody tr",
            if mode == "snapshot" {
                deployments.min(500)
            } else {
                deployments
            },
        )
    };
    b.until(
        "everything shown",
        &format!("return document.querySelectorAll('{what}').length;"),
        |v| v.as_u64() == Some(count as u64),
    )
    .await;
    // Taken and reset: the maximum below is over the later frames only.
    let first = b
        .client
        .execute(
            "const m = window.symphonyRender; const c = {...m}; m.max_ms = 0; return c;",
            vec![],
        )
        .await?;
    let read = "return window.symphonyRender;";
    tokio::time::sleep(window).await;
    let after = b.client.execute(read, vec![]).await?;
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let updates = f(&after, "count") - f(&first, "count");
    Ok(json!({
        "shown": count,
        "first_render_ms": f(&first, "first_at_ms"),
        "updates": updates,
        "update_ms_mean": (f(&after, "total_ms") - f(&first, "total_ms")) / updates.max(1.0),
        "update_ms_max": f(&after, "max_ms"),
        "bytes_per_update": (f(&after, "bytes") - f(&first, "bytes")) / updates.max(1.0),
    }))
}
