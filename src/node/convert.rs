//! Conversions between the supervisor's and monitor's types and the wire types.

use crate::node::monitor::{GpuInfo, GpuUsage, StaticResources, StorageUsage, UsageSample};
use crate::node::supervisor::{CurrentState, DeploymentStatus};
use crate::wire;

pub(crate) fn result_msg(command_id: u64, ok: bool, message: String) -> wire::NodeMessage {
    wire::NodeMessage {
        msg: Some(wire::node_message::Msg::Result(wire::CommandResult {
            command_id,
            ok,
            message,
        })),
    }
}

pub(crate) fn status_msg(
    deployments: Vec<wire::DeploymentStatus>,
    removed: Vec<String>,
) -> wire::NodeMessage {
    wire::NodeMessage {
        msg: Some(wire::node_message::Msg::Status(wire::StatusUpdate {
            deployments,
            removed,
        })),
    }
}

pub(crate) fn to_wire(s: &DeploymentStatus, log_offset: u64) -> wire::DeploymentStatus {
    wire::DeploymentStatus {
        deployment_id: s.id.clone(),
        generation: s.generation,
        state: s.state.as_str().to_owned(),
        pid: s.pid,
        restart_count: s.restart_count,
        last_exit_code: s.last_exit_code,
        reason: s.reason.clone().unwrap_or_default(),
        started_at_ms: s.started_at_ms,
        stopped_at_ms: s.stopped_at_ms,
        last_log_seq: s.last_log_seq + log_offset,
        health_failures: s.health_failures,
        healthy: s.healthy,
        cron_restarts: s.cron_restarts,
        restart_at_ms: s.restart_at_ms,
        result: s.result.clone().and_then(Result::ok),
        result_error: s.result.clone().and_then(Result::err).unwrap_or_default(),
        desired_running: matches!(
            s.state,
            CurrentState::Running | CurrentState::Starting | CurrentState::Backoff
        ),
    }
}

fn mount_wire(m: &StorageUsage) -> wire::StorageMount {
    wire::StorageMount {
        mount_point: m.mount_point.clone(),
        fs_type: m.fs_type.clone(),
        total_bytes: m.total_bytes,
        used_bytes: m.used_bytes,
        available_bytes: m.available_bytes,
        used_percent: f64::from(m.percent),
    }
}

pub(crate) fn static_wire(s: &StaticResources) -> wire::StaticResources {
    wire::StaticResources {
        logical_cores: u32::try_from(s.logical_cores).unwrap_or(u32::MAX),
        memory_total_bytes: s.memory_total_bytes,
        storage: s.storage.iter().map(mount_wire).collect(),
        gpus: s.gpus.iter().map(gpu_info_wire).collect(),
        hostname: s.hostname.clone().unwrap_or_default(),
    }
}

pub(crate) fn heartbeat_wire(seq: u64, s: &UsageSample, problems: &[String]) -> wire::Heartbeat {
    wire::Heartbeat {
        problems: problems.to_vec(),
        seq,
        timestamp_unix_ms: s.timestamp_ms,
        cpu_total_percent: f64::from(s.cpu.total_percent),
        per_core: s
            .cpu
            .per_core_percent
            .iter()
            .enumerate()
            .map(|(i, p)| wire::CoreUsage {
                core_id: u32::try_from(i).unwrap_or(u32::MAX),
                used_percent: f64::from(*p),
            })
            .collect(),
        mem_used_bytes: s.memory.used_bytes,
        mem_available_bytes: s.memory.available_bytes,
        mem_used_percent: f64::from(s.memory.percent),
        mem_free_bytes: s.memory.free_bytes,
        mem_buffers_bytes: s.memory.buffers_bytes,
        mem_cached_bytes: s.memory.cached_bytes,
        storage: s.storage.iter().map(mount_wire).collect(),
        gpus: s.gpus.iter().map(gpu_usage_wire).collect(),
        deployment_gpus: s
            .deployment_gpus
            .iter()
            .map(|d| wire::DeploymentGpu {
                deployment_id: d.deployment_id.clone(),
                gpu_index: d.gpu_index,
                memory_bytes: d.memory_bytes,
                util_percent: d.util_percent,
                processes: d.processes,
            })
            .collect(),
    }
}

/// A GPU's identity on the wire (usage fields zero).
fn gpu_wire(index: u32, name: &str, mem_total_bytes: u64) -> wire::Gpu {
    wire::Gpu {
        index,
        name: name.to_owned(),
        mem_total_bytes,
        ..Default::default()
    }
}

fn gpu_info_wire(g: &GpuInfo) -> wire::Gpu {
    gpu_wire(g.index, &g.name, g.memory_total_bytes)
}

fn gpu_usage_wire(g: &GpuUsage) -> wire::Gpu {
    wire::Gpu {
        util_percent: g.utilization_gpu_percent.map_or(0.0, f64::from),
        mem_util_percent: g.utilization_memory_percent.map_or(0.0, f64::from),
        mem_used_bytes: g.memory_used_bytes,
        mem_free_bytes: g.memory_free_bytes,
        temperature_c: g.temperature_c.map_or(0.0, f64::from),
        power_w: g.power_w.unwrap_or(0.0),
        ..gpu_wire(g.index, &g.name, g.memory_total_bytes)
    }
}
