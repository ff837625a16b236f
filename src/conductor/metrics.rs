//! Prometheus `GET /metrics`: one scrape covers the fleet (nodes sit behind NAT, so nobody can
//! scrape them; their usage arrives in heartbeats). Text exposition (format 0.0.4) through
//! `prometheus-client`.
//!
//! Two parts: counters and histograms the core keeps as things happen ([`Metrics`]), and
//! gauges computed at scrape time from the published snapshot ([`render`]), so they can never
//! disagree with `GET /nodes` and `GET /deployments`.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeMetric, MetricEncoder, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
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
    /// Health checks nodes found failing (each restarted its process).
    pub health_failures: Counter,
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
    /// Each node's control round trip (its connection's RTT, sampled at every heartbeat),
    /// seconds, by `node`.
    pub control_rtt: Family<Vec<(&'static str, String)>, Histogram>,
}

/// Buckets of [`Metrics::control_rtt`]: few, since there is one histogram per node (a scrape of
/// 5 000 nodes stays under 10 MB): LAN or region, continent, world, broken.
const RTT_BUCKETS: [f64; 3] = [0.01, 0.1, 0.5];

impl Metrics {
    /// Records one control round trip of `node`.
    pub fn observe_rtt(&self, node: &str, rtt: std::time::Duration) {
        self.control_rtt
            .get_or_create(&vec![("node", node.to_owned())])
            .observe(rtt.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("symphony");
        let placements = Counter::default();
        let restarts = Counter::default();
        let health_failures = Counter::default();
        let connections = Counter::default();
        let path_changes = Counter::default();
        let log_lines = Counter::default();
        let log_bytes = Counter::default();
        let log_lines_dropped = Counter::default();
        // 50 us .. ~26 s, doubling.
        let scheduling_pass = Histogram::new(exponential_buckets(0.000_05, 2.0, 20));
        // 1 ms .. ~65 s, doubling.
        let post_to_running = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let control_rtt: Family<Vec<(&'static str, String)>, Histogram> =
            Family::new_with_constructor(|| Histogram::new(RTT_BUCKETS));
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
            "health_check_failures",
            "Health checks nodes found failing (each restarted its process)",
            health_failures.clone(),
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
        registry.register(
            "node_control_rtt_seconds",
            "Control round trip per node (its connection's RTT at each heartbeat)",
            control_rtt.clone(),
        );
        Self {
            registry,
            control_rtt,
            placements,
            restarts,
            health_failures,
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

/// Writes one gauge family: its description, then each series `fill` puts.
fn gauge_family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    fill: impl FnOnce(&mut Series<'_>) -> std::fmt::Result,
) -> std::fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    fill(&mut Series(metric))
}

/// The series of one family being written.
struct Series<'a>(MetricEncoder<'a>);

impl Series<'_> {
    fn put(&mut self, labels: &[(&str, &str)], value: f64) -> std::fmt::Result {
        ConstGauge::new(value).encode(self.0.encode_family(&labels)?)
    }
}

/// The gauges of a snapshot, written series by series on each scrape (no per-scrape
/// registry of families: 5 000 nodes make about 80 000 series).
#[derive(Debug)]
struct Fleet(std::sync::Arc<ClusterView>);

impl Collector for Fleet {
    #[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let view = &self.0;
        gauge_family(
            &mut e,
            "symphony_nodes",
            "Nodes by state (online, suspect, lost)",
            |s| {
                for state in ["online", "suspect", "lost"] {
                    let n = view.nodes.values().filter(|n| n.state == state).count();
                    s.put(&[("state", state)], n as f64)?;
                }
                Ok(())
            },
        )?;
        let mut by_state: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for d in &view.deployments {
            let current = d.current_state.map_or("UNKNOWN", |c| c.as_str());
            *by_state
                .entry((d.desired_state.as_str(), current))
                .or_default() += 1;
        }
        gauge_family(
            &mut e,
            "symphony_deployments",
            "Deployments by desired and current state",
            |s| {
                for ((desired, current), n) in &by_state {
                    s.put(
                        &[("desired_state", desired), ("current_state", current)],
                        *n as f64,
                    )?;
                }
                Ok(())
            },
        )?;
        let mut experiments: BTreeMap<&str, usize> = BTreeMap::new();
        for x in &view.experiments {
            *experiments.entry(x.state.as_str()).or_default() += 1;
        }
        gauge_family(
            &mut e,
            "symphony_experiments",
            "Experiments by state",
            |s| {
                for (state, n) in &experiments {
                    s.put(&[("state", state)], *n as f64)?;
                }
                Ok(())
            },
        )?;
        let nodes = || view.nodes.iter().map(|(id, n)| (id.as_str(), n));
        gauge_family(
            &mut e,
            "symphony_node_online",
            "1 when the node is online",
            |s| {
                nodes().try_for_each(|(id, n)| {
                    s.put(&[("node", id)], f64::from(u8::from(n.state == "online")))
                })
            },
        )?;
        gauge_family(
            &mut e,
            "symphony_node_capacity",
            "Capacity a node offers, per class",
            |s| {
                nodes().try_for_each(|(id, n)| {
                    n.capacities_total.iter().try_for_each(|(class, &v)| {
                        s.put(&[("node", id), ("class", class)], v as f64)
                    })
                })
            },
        )?;
        gauge_family(
            &mut e,
            "symphony_node_capacity_reserved",
            "Capacity reserved by the node's assignments, per class",
            |s| {
                nodes().try_for_each(|(id, n)| {
                    n.capacities_total.keys().try_for_each(|class| {
                        let held = n.total_capacities_used.get(class).copied().unwrap_or(0);
                        s.put(&[("node", id), ("class", class)], held as f64)
                    })
                })
            },
        )?;
        gauge_family(
            &mut e,
            "symphony_node_cpu_percent",
            "CPU use, all cores",
            |s| {
                nodes().try_for_each(|(id, n)| match &n.cpu.dynamic {
                    Some(d) => s.put(&[("node", id)], d.total_percent),
                    None => Ok(()),
                })
            },
        )?;
        gauge_family(
            &mut e,
            "symphony_node_memory_used_bytes",
            "Memory in use",
            |s| {
                nodes().try_for_each(|(id, n)| match &n.memory.dynamic {
                    Some(m) => s.put(&[("node", id)], m.used_bytes as f64),
                    None => Ok(()),
                })
            },
        )?;
        gauge_family(
            &mut e,
            "symphony_node_memory_total_bytes",
            "Memory installed",
            |s| {
                nodes()
                    .filter(|(_, n)| n.memory.static_.total_bytes > 0)
                    .try_for_each(|(id, n)| {
                        s.put(&[("node", id)], n.memory.static_.total_bytes as f64)
                    })
            },
        )?;
        type Mount = crate::model::StorageMount;
        let disks = |s: &mut Series<'_>, f: fn(&Mount) -> u64| {
            nodes().try_for_each(|(id, n)| {
                n.storage_mounts.iter().try_for_each(|m| {
                    s.put(&[("node", id), ("mount", &m.mount_point)], f(m) as f64)
                })
            })
        };
        gauge_family(
            &mut e,
            "symphony_node_disk_used_bytes",
            "Disk space used, per mount",
            |s| disks(s, |m| m.used_bytes),
        )?;
        gauge_family(
            &mut e,
            "symphony_node_disk_total_bytes",
            "Disk size, per mount",
            |s| disks(s, |m| m.total_bytes),
        )?;
        type G = crate::model::Gpu;
        let gpus = |s: &mut Series<'_>, f: fn(&G) -> f64| {
            nodes().try_for_each(|(id, n)| {
                n.gpus.iter().try_for_each(|g| {
                    let index = g.index.to_string();
                    s.put(&[("node", id), ("gpu", &index)], f(g))
                })
            })
        };
        gauge_family(
            &mut e,
            "symphony_node_gpu_utilization_percent",
            "GPU use",
            |s| gpus(s, |g| g.util_percent),
        )?;
        gauge_family(
            &mut e,
            "symphony_node_gpu_memory_used_bytes",
            "GPU memory in use",
            |s| gpus(s, |g| g.mem_used_bytes as f64),
        )?;
        gauge_family(
            &mut e,
            "symphony_node_gpu_memory_total_bytes",
            "GPU memory",
            |s| gpus(s, |g| g.mem_total_bytes as f64),
        )?;
        gauge_family(
            &mut e,
            "symphony_node_gpu_temperature_celsius",
            "GPU temperature",
            |s| gpus(s, |g| g.temperature_c),
        )?;
        gauge_family(
            &mut e,
            "symphony_node_gpu_power_watts",
            "GPU power draw",
            |s| gpus(s, |g| g.power_w),
        )?;
        let deployment_gpus = |s: &mut Series<'_>, f: fn(&crate::model::GpuUse) -> Option<f64>| {
            view.deployments.iter().try_for_each(|d| {
                let Some(st) = &d.status else { return Ok(()) };
                st.gpus.iter().try_for_each(|g| match f(g) {
                    Some(v) => s.put(
                        &[
                            ("deployment", d.id.as_str()),
                            ("name", &d.name),
                            ("node", st.node_id.as_str()),
                            ("gpu", &g.gpu_index.to_string()),
                        ],
                        v,
                    ),
                    None => Ok(()),
                })
            })
        };
        gauge_family(
            &mut e,
            "symphony_deployment_gpu_memory_bytes",
            "GPU memory a deployment's processes hold, per GPU",
            |s| deployment_gpus(s, |g| Some(g.memory_bytes as f64)),
        )?;
        gauge_family(
            &mut e,
            "symphony_deployment_gpu_utilization_percent",
            "SM utilisation of a deployment's processes, per GPU (where the driver gives it)",
            |s| deployment_gpus(s, |g| g.util_percent),
        )?;
        type C = crate::model::NodeConnection;
        let conns = |s: &mut Series<'_>, f: fn(&C) -> f64| {
            nodes().try_for_each(|(id, n)| match &n.connection {
                Some(c) => s.put(&[("node", id)], f(c)),
                None => Ok(()),
            })
        };
        gauge_family(
            &mut e,
            "symphony_node_rtt_seconds",
            "Round trip of the node's connection (QUIC's estimate)",
            |s| conns(s, |c| c.rtt_ms / 1000.0),
        )?;
        gauge_family(
            &mut e,
            "symphony_node_reconnects",
            "Times the node connected again since the conductor started",
            |s| conns(s, |c| c.reconnects as f64),
        )?;
        gauge_family(
            &mut e,
            "symphony_node_path_migrations",
            "Address changes (NAT rebinding, new IP) on the node's current connection",
            |s| conns(s, |c| c.path_changes as f64),
        )
    }
}

/// The whole exposition: the core's counters and histograms, then the gauges of `view`.
pub fn render(
    metrics: &Metrics,
    view: &std::sync::Arc<ClusterView>,
) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(4096 + view.nodes.len() * 1536);
    prometheus_text::encode(&mut out, &metrics.registry)?;
    let mut fleet = Registry::default();
    fleet.register_collector(Box::new(Fleet(view.clone())));
    prometheus_text::encode(&mut out, &fleet)?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
        view.deployments
            .push(std::sync::Arc::new(crate::model::Deployment {
                id: "d1".into(),
                name: "train".to_owned(),
                status: Some(crate::model::RunStatus {
                    node_id: "gpu-1".into(),
                    gpus: vec![crate::model::GpuUse {
                        gpu_index: 0,
                        memory_bytes: 1024,
                        util_percent: Some(40.0),
                        processes: 1,
                    }],
                    ..crate::model::RunStatus::default()
                }),
                ..crate::model::Deployment::default()
            }));
        m.observe_rtt("gpu-1", std::time::Duration::from_millis(15));
        let text = render(&m, &std::sync::Arc::new(view)).unwrap();
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
            "symphony_deployment_gpu_memory_bytes{deployment=\"d1\",name=\"train\",node=\"gpu-1\",gpu=\"0\"} 1024",
            "symphony_deployment_gpu_utilization_percent{deployment=\"d1\",name=\"train\",node=\"gpu-1\",gpu=\"0\"} 40",
            "symphony_node_control_rtt_seconds_bucket{node=\"gpu-1\",le=\"0.1\"} 1",
            "symphony_node_control_rtt_seconds_count{node=\"gpu-1\"} 1",
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
