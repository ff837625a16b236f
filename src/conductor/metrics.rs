//! Prometheus `GET /metrics`: one scrape covers the fleet (nodes sit behind NAT, so nobody can
//! scrape them; their usage arrives in heartbeats). Text exposition (format 0.0.4) through
//! `prometheus-client`.
//!
//! Two parts: counters and histograms the core keeps as things happen ([`Metrics`]), and
//! gauges computed at scrape time from the published snapshot ([`render`]), so they can never
//! disagree with `GET /nodes` and `GET /deployments`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::view::ClusterView;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// What the core counts and times as it goes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// New assignments (a placement, a re-placement after a lost node, a new generation on
    /// the same node).
    pub placements: Counter,
    /// Process restarts nodes reported (the increase of a deployment's restart count).
    pub restarts: Counter,
    /// Node connections accepted (a reconnect counts again).
    pub connections: Counter,
    /// Direct paths between nodes that came up or went down.
    pub path_changes: Counter,
    /// Log lines received from nodes (resends after a reconnect included).
    pub log_lines: Counter,
    /// Their bytes (the text, without newlines).
    pub log_bytes: Counter,
    /// Lines nodes lost to a full spool before they could send them.
    pub log_lines_dropped: Counter,
    /// One scheduling pass, seconds.
    pub scheduling_pass: Histogram,
    /// A deployment's creation to its first RUNNING report, seconds.
    pub post_to_running: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("symphony");
        let placements = Counter::default();
        let restarts = Counter::default();
        let connections = Counter::default();
        let path_changes = Counter::default();
        let log_lines = Counter::default();
        let log_bytes = Counter::default();
        let log_lines_dropped = Counter::default();
        // 50 us .. ~26 s, doubling.
        let scheduling_pass = Histogram::new(exponential_buckets(0.000_05, 2.0, 20));
        // 1 ms .. ~65 s, doubling.
        let post_to_running = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "placements",
            "Assignments made (placements, re-placements, new generations)",
            placements.clone(),
        );
        registry.register(
            "restarts",
            "Process restarts reported by nodes",
            restarts.clone(),
        );
        registry.register(
            "node_connections",
            "Node connections accepted (reconnects included)",
            connections.clone(),
        );
        registry.register(
            "direct_path_changes",
            "Direct node-to-node paths that came up or went down",
            path_changes.clone(),
        );
        registry.register(
            "log_lines_received",
            "Log lines received from nodes",
            log_lines.clone(),
        );
        registry.register(
            "log_bytes_received",
            "Bytes of log lines received from nodes",
            log_bytes.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines nodes lost to a full spool",
            log_lines_dropped.clone(),
        );
        registry.register(
            "scheduling_pass_seconds",
            "Duration of one scheduling pass",
            scheduling_pass.clone(),
        );
        registry.register(
            "post_to_running_seconds",
            "From a deployment's creation to its first RUNNING report",
            post_to_running.clone(),
        );
        Self {
            registry,
            placements,
            restarts,
            connections,
            path_changes,
            log_lines,
            log_bytes,
            log_lines_dropped,
            scheduling_pass,
            post_to_running,
        }
    }
}

type Labels = Vec<(&'static str, String)>;
type GaugeF = Gauge<f64, AtomicU64>;

/// A family of float gauges, registered under `symphony_<name>`.
fn gauges(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, GaugeF> {
    let family = Family::<Labels, GaugeF>::default();
    registry.register(name, help, family.clone());
    family
}

/// Sets one gauge of `family`.
fn set(family: &Family<Labels, GaugeF>, labels: Labels, value: f64) {
    family.get_or_create(&labels).set(value);
}

/// The whole exposition: the core's counters and histograms, then the gauges of `view`.
#[allow(clippy::cast_precision_loss)]
pub fn render(metrics: &Metrics, view: &ClusterView) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(4096 + view.nodes.len() * 2048);
    prometheus_text::encode(&mut out, &metrics.registry)?;

    let mut r = Registry::with_prefix("symphony");
    let nodes = gauges(&mut r, "nodes", "Nodes by state (online, suspect, lost)");
    for state in ["online", "suspect", "lost"] {
        let n = view.nodes.values().filter(|n| n.state == state).count();
        set(&nodes, vec![("state", state.to_owned())], n as f64);
    }
    let deployments = gauges(
        &mut r,
        "deployments",
        "Deployments by desired and current state",
    );
    for d in &view.deployments {
        let labels = vec![
            ("desired_state", d.desired_state.as_str().to_owned()),
            (
                "current_state",
                d.current_state.map_or("UNKNOWN", |s| s.as_str()).to_owned(),
            ),
        ];
        deployments.get_or_create(&labels).inc_by(1.0);
    }
    let experiments = gauges(&mut r, "experiments", "Experiments by state");
    for e in &view.experiments {
        experiments
            .get_or_create(&vec![("state", e.state.clone())])
            .inc_by(1.0);
    }

    let capacity = gauges(&mut r, "node_capacity", "Capacity a node offers, per class");
    let reserved = gauges(
        &mut r,
        "node_capacity_reserved",
        "Capacity reserved by the node's assignments, per class",
    );
    let online = gauges(&mut r, "node_online", "1 when the node is online");
    let cpu = gauges(&mut r, "node_cpu_percent", "CPU use, all cores");
    let mem_used = gauges(&mut r, "node_memory_used_bytes", "Memory in use");
    let mem_total = gauges(&mut r, "node_memory_total_bytes", "Memory installed");
    let disk_used = gauges(&mut r, "node_disk_used_bytes", "Disk space used, per mount");
    let disk_total = gauges(&mut r, "node_disk_total_bytes", "Disk size, per mount");
    let gpu_util = gauges(&mut r, "node_gpu_utilization_percent", "GPU use");
    let gpu_mem = gauges(&mut r, "node_gpu_memory_used_bytes", "GPU memory in use");
    let gpu_mem_total = gauges(&mut r, "node_gpu_memory_total_bytes", "GPU memory");
    let gpu_temp = gauges(&mut r, "node_gpu_temperature_celsius", "GPU temperature");
    let gpu_power = gauges(&mut r, "node_gpu_power_watts", "GPU power draw");
    let rtt = gauges(
        &mut r,
        "node_rtt_seconds",
        "Round trip of the node's connection (QUIC's estimate)",
    );
    let reconnects = gauges(
        &mut r,
        "node_reconnects",
        "Times the node connected again since the conductor started",
    );
    let migrations = gauges(
        &mut r,
        "node_path_migrations",
        "Address changes (NAT rebinding, new IP) on the node's current connection",
    );
    for (id, n) in &view.nodes {
        let node = || vec![("node", id.clone())];
        set(&online, node(), f64::from(u8::from(n.state == "online")));
        for (class, &total) in &n.capacities_total {
            let labels = vec![("node", id.clone()), ("class", class.clone())];
            set(&capacity, labels.clone(), total as f64);
            let held = n.total_capacities_used.get(class).copied().unwrap_or(0);
            set(&reserved, labels, held as f64);
        }
        if let Some(d) = &n.cpu.dynamic {
            set(&cpu, node(), d.total_percent);
        }
        if n.memory.static_.total_bytes > 0 {
            set(&mem_total, node(), n.memory.static_.total_bytes as f64);
        }
        if let Some(m) = &n.memory.dynamic {
            set(&mem_used, node(), m.used_bytes as f64);
        }
        for s in &n.storage_mounts {
            let labels = vec![("node", id.clone()), ("mount", s.mount_point.clone())];
            set(&disk_used, labels.clone(), s.used_bytes as f64);
            set(&disk_total, labels, s.total_bytes as f64);
        }
        for g in &n.gpus {
            let labels = vec![("node", id.clone()), ("gpu", g.index.to_string())];
            set(&gpu_util, labels.clone(), g.util_percent);
            set(&gpu_mem, labels.clone(), g.mem_used_bytes as f64);
            set(&gpu_mem_total, labels.clone(), g.mem_total_bytes as f64);
            set(&gpu_temp, labels.clone(), g.temperature_c);
            set(&gpu_power, labels, g.power_w);
        }
        if let Some(c) = &n.connection {
            set(&rtt, node(), c.rtt_ms / 1000.0);
            set(&reconnects, node(), c.reconnects as f64);
            set(&migrations, node(), c.path_changes as f64);
        }
    }
    prometheus_text::encode(&mut out, &r)?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{Gpu, Node, NodeConnection, NodeId};

    #[test]
    fn the_exposition_has_counters_and_per_node_gauges() {
        let m = Metrics::default();
        m.placements.inc();
        m.scheduling_pass.observe(0.002);
        let mut view = ClusterView::default();
        let mut n = Node {
            node_id: NodeId::from("gpu-1"),
            state: "online".to_owned(),
            capacities_total: BTreeMap::from([("gpu".to_owned(), 8)]),
            total_capacities_used: BTreeMap::from([("gpu".to_owned(), 3)]),
            connection: Some(NodeConnection {
                rtt_ms: 12.5,
                reconnects: 2,
                ..NodeConnection::default()
            }),
            ..Node::default()
        };
        n.gpus.push(Gpu {
            index: 0,
            util_percent: 97.0,
            temperature_c: 71.0,
            ..Gpu::default()
        });
        view.nodes.insert("gpu-1".to_owned(), n);
        let text = render(&m, &view).unwrap();
        for line in [
            "symphony_placements_total 1",
            "symphony_scheduling_pass_seconds_count 1",
            "symphony_nodes{state=\"online\"} 1",
            "symphony_nodes{state=\"lost\"} 0",
            "symphony_node_capacity{node=\"gpu-1\",class=\"gpu\"} 8",
            "symphony_node_capacity_reserved{node=\"gpu-1\",class=\"gpu\"} 3",
            "symphony_node_gpu_utilization_percent{node=\"gpu-1\",gpu=\"0\"} 97",
            "symphony_node_gpu_temperature_celsius{node=\"gpu-1\",gpu=\"0\"} 71",
            "symphony_node_rtt_seconds{node=\"gpu-1\"} 0.0125",
            "symphony_node_reconnects{node=\"gpu-1\"} 2",
        ] {
            assert!(
                text.lines()
                    .any(|l| l == line || l.starts_with(&format!("{line}.0"))),
                "{line} missing from:\n{text}"
            );
        }
        // Every family is described once.
        assert_eq!(text.matches("# TYPE symphony_nodes gauge").count(), 1);
        assert!(!text.contains("EOF"));
    }
}
