//! A real Prometheus scrapes a test conductor's `/metrics`: the target is up, and a placement
//! counter and a per-node metric arrive, read back through Prometheus' own HTTP API; `promtool
//! check metrics` accepts the exposition.
//!
//! Without the `prometheus` binary the test says so and passes, unless `CI=true` (`.ci/run`
//! installs Debian's `prometheus` package), where a missing tool is a failure.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::support::{Cluster, free_port, sh};

/// How long Prometheus may take to start and scrape (it scrapes every second here).
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);

fn found(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The value of an instant query's single result, once Prometheus has one.
async fn query(http: &reqwest::Client, prom: &str, q: &str) -> Option<f64> {
    let v: Value = http
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}

/// Polls the query until `ok` holds (Prometheus scrapes on its own clock; nothing to await).
async fn until_query(http: &reqwest::Client, prom: &str, q: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + PROMETHEUS_WAIT;
    loop {
        if let Some(v) = query(http, prom, q).await
            && ok(v)
        {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus never answered {q} as expected (last: {:?})",
            query(http, prom, q).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn prometheus_scrapes_the_fleet_from_the_conductor() {
    if !found("prometheus") {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci,
            "prometheus is not installed (CI=true): apt-get install prometheus"
        );
        eprintln!("SKIPPED: prometheus is not installed (apt-get install prometheus)");
        return;
    }
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[("slot", 4)], false).await;
    let id = c.deploy("counted", sh("sleep 1000")).await;
    c.wait_state(&id, "RUNNING").await;

    let text = c.text("/metrics").await;
    if found("promtool") {
        let mut check = tokio::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = check.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).await.unwrap();
        drop(stdin);
        let out = check.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let target = c.api.trim_start_matches("http://");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n\
             - job_name: symphony\n\
             \x20 static_configs: [{{targets: ['{target}']}}]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let prom = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    until_query(&http, &prom, "up{job=\"symphony\"}", |v| v == 1.0).await;
    let placed = until_query(&http, &prom, "symphony_placements_total", |v| v >= 1.0).await;
    let slots = until_query(
        &http,
        &prom,
        "symphony_node_capacity{node=\"n1\",class=\"slot\"}",
        |_| true,
    )
    .await;
    assert_eq!(slots, 4.0);
    let running = until_query(
        &http,
        &prom,
        "sum(symphony_deployments{current_state=\"RUNNING\"})",
        |_| true,
    )
    .await;
    assert_eq!((placed, running), (1.0, 1.0));
    let _ = prometheus.kill().await;
    c.shutdown().await;
}

/// `name{labels} value` lines of an exposition, by series.
fn series(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_placements_restarts_logs_and_connections() {
    let mut c = Cluster::start().await;
    c.add_node("n1", &["local"], &[("slot", 4)], false).await;
    let mut spec = sh("echo one; echo two; echo three; exit 1");
    spec["restart_policy"] = serde_json::json!({"type": "on-failure", "backoff_seconds": 0.1});
    spec["capacity_requests"] = serde_json::json!({"slot": 1});
    let id = c.deploy("crashy", spec).await;
    c.wait("two restarts", |v| {
        v.deployment(&id)
            .and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.restart_count >= 2)
    })
    .await;
    let sleeper = c.deploy("sleeper", sh("sleep 1000")).await;
    c.wait_state(&sleeper, "RUNNING").await;
    // A process its health check keeps finding unhealthy (each failure restarts it).
    let mut sick = sh("sleep 1000");
    sick["health_check"] = serde_json::json!({"type": "exec", "command": ["false"],
        "period_seconds": 0.1, "initial_delay_seconds": 0, "failure_threshold": 1});
    sick["restart_policy"] = serde_json::json!({"type": "always", "backoff_seconds": 0.1});
    let sick = c.deploy("sick", sick).await;
    c.wait("two health-check restarts", |v| {
        v.deployment(&sick)
            .and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.restart_count >= 2)
    })
    .await;
    // Log lines arrive on their own streams, after the states: poll the counter (bounded).
    let deadline = tokio::time::Instant::now() + PROMETHEUS_WAIT;
    let text = loop {
        let text = c.text("/metrics").await;
        if series(&text)
            .get("symphony_log_lines_received_total")
            .is_some_and(|&n| n >= 6.0)
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "log lines never counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let s = series(&text);
    let at_least = |name: &str, min: f64| {
        let v = s.get(name).copied().unwrap_or(f64::NAN);
        assert!(v >= min, "{name} = {v}, want >= {min}\n{text}");
    };
    at_least("symphony_placements_total", 2.0);
    at_least("symphony_restarts_total", 4.0);
    at_least("symphony_health_check_failures_total", 1.0);
    at_least("symphony_node_connections_total", 1.0);
    at_least("symphony_log_bytes_received_total", 18.0);
    at_least("symphony_scheduling_pass_seconds_count", 1.0);
    at_least("symphony_post_to_running_seconds_count", 1.0);
    at_least("symphony_node_online{node=\"n1\"}", 1.0);
    at_least(
        "symphony_node_capacity_reserved{node=\"n1\",class=\"slot\"}",
        1.0,
    );
    at_least(
        "symphony_deployments{desired_state=\"RUNNING\",current_state=\"RUNNING\"}",
        1.0,
    );
    at_least("symphony_nodes{state=\"online\"}", 1.0);
    c.shutdown().await;
}
