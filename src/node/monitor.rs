//! Host resource monitoring: CPU, memory, storage (sysinfo) and NVIDIA GPUs (NVML).
//!
//! [`Monitor`] holds the samplers and is driven by the caller (about once a second, from a tokio
//! interval through `spawn_blocking`); it never spawns threads or timers itself. The numbers are
//! host-wide, like the original (not cgroup-aware).
//!
//! Invariants:
//! - NVML is initialised once, in [`Monitor::new`]. When `libnvidia-ml` is missing or fails to
//!   init, the GPU list is empty for the monitor's lifetime and the reason is kept in
//!   [`Monitor::gpu_unavailable_reason`]; nothing is logged per sample.
//! - A GPU's `index` is its NVML device index (the original always said 0, B27), and storage
//!   entries carry their file-system type (B27).
//! - CPU percentages are deltas between two refreshes: the first sample after construction may
//!   read 0; later samples (>= 200 ms apart) are meaningful.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// File systems never reported as storage even if sysinfo lists them (pseudo or in-memory).
const IGNORED_FS_TYPES: &[&str] = &[
    "tmpfs",
    "devtmpfs",
    "ramfs",
    "squashfs",
    "overlay.lower",
    "nsfs",
    "tracefs",
    "debugfs",
    "securityfs",
    "configfs",
    "fusectl",
    "bpf",
    "binfmt_misc",
    "efivarfs",
    "autofs",
    "fuse.lxcfs",
    "fuse.portal",
    "fuse.gvfsd-fuse",
];

/// Facts about the host that do not change while the node runs (storage and GPU totals are
/// included for the node's hello).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StaticResources {
    /// Host name, if known.
    pub hostname: Option<String>,
    /// Long OS name, e.g. "Linux (Ubuntu 24.04)".
    pub os: Option<String>,
    /// Kernel version.
    pub kernel: Option<String>,
    /// CPU architecture, e.g. "x86_64".
    pub arch: String,
    /// CPU brand string of the first core.
    pub cpu_model: Option<String>,
    /// Logical cores (what the per-core usage lists).
    pub logical_cores: usize,
    /// Physical cores, if known.
    pub physical_cores: Option<usize>,
    /// Total RAM in bytes.
    pub memory_total_bytes: u64,
    /// Total swap in bytes.
    pub swap_total_bytes: u64,
    /// Real file systems and their current usage.
    pub storage: Vec<StorageUsage>,
    /// NVIDIA GPUs (empty without NVML).
    pub gpus: Vec<GpuInfo>,
}

/// Static facts about one GPU.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GpuInfo {
    /// NVML device index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// GPU UUID, if available.
    pub uuid: Option<String>,
    /// Total framebuffer memory in bytes.
    pub memory_total_bytes: u64,
}

/// One point-in-time sample of the host's usage.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UsageSample {
    /// When the sample was taken (Unix ms, UTC).
    pub timestamp_ms: i64,
    /// CPU busy percentages.
    pub cpu: CpuUsage,
    /// RAM figures.
    pub memory: MemoryUsage,
    /// Real file systems.
    pub storage: Vec<StorageUsage>,
    /// NVIDIA GPUs (empty without NVML).
    pub gpus: Vec<GpuUsage>,
    /// The processes on the GPUs (empty without NVML).
    pub gpu_processes: Vec<GpuProcess>,
    /// GPU use per deployment (the caller maps `gpu_processes`, see [`per_deployment`]).
    pub deployment_gpus: Vec<DeploymentGpu>,
}

/// One process on a GPU, as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuProcess {
    /// NVML device index.
    pub gpu_index: u32,
    /// Host pid.
    pub pid: u32,
    /// GPU memory it holds, where the driver says.
    pub memory_bytes: Option<u64>,
    /// Percent of the last sample period its kernels ran on the SMs, where the driver offers
    /// per-process figures.
    pub sm_util_percent: Option<u32>,
}

/// GPU use of one deployment on one GPU.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeploymentGpu {
    /// The deployment.
    pub deployment_id: String,
    /// NVML device index.
    pub gpu_index: u32,
    /// GPU memory its processes hold.
    pub memory_bytes: u64,
    /// Its processes' SM utilisation summed (at most 100); `None` without per-process figures.
    pub util_percent: Option<f64>,
    /// How many of its processes use this GPU.
    pub processes: u32,
}

/// Where the processes on the GPUs come from: NVML on a real node, a fake in tests. NVML's
/// device utilisation alone misleads (one busy loop reads 100 %), so use is reported per
/// process and mapped to deployments.
pub trait GpuProcessSource: Send + Sync + std::fmt::Debug {
    /// The processes using a GPU now.
    fn processes(&self) -> Vec<GpuProcess>;
}

/// [`GpuProcessSource`] over NVML: running compute processes with their memory, and the
/// per-process SM utilisation since the previous call where the driver offers it.
#[derive(Debug)]
struct NvmlProcesses {
    nvml: Arc<Nvml>,
    /// Per device: NVML's timestamp (µs) of the newest utilisation sample seen.
    last_seen_us: std::sync::Mutex<HashMap<u32, u64>>,
}

impl GpuProcessSource for NvmlProcesses {
    fn processes(&self) -> Vec<GpuProcess> {
        use nvml_wrapper::error::NvmlError;
        let Ok(count) = self.nvml.device_count() else {
            return Vec::new();
        };
        let Ok(mut last_seen) = self.last_seen_us.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for i in 0..count {
            let Ok(device) = self.nvml.device_by_index(i) else {
                continue;
            };
            let index = device.index().unwrap_or(i);
            let since = last_seen.get(&index).copied().unwrap_or(0);
            // Per pid, its newest sample since the last call. `None`: no per-process figures on
            // this GPU or driver (memory only); no sample since then reads as idle.
            let util: Option<HashMap<u32, (u64, u32)>> =
                match device.process_utilization_stats(since) {
                    Ok(samples) => {
                        let mut newest: HashMap<u32, (u64, u32)> = HashMap::new();
                        for s in samples {
                            let e = newest.entry(s.pid).or_insert((s.timestamp, s.sm_util));
                            if s.timestamp >= e.0 {
                                *e = (s.timestamp, s.sm_util);
                            }
                        }
                        if let Some(t) = newest.values().map(|(t, _)| *t).max() {
                            last_seen.insert(index, t);
                        }
                        Some(newest)
                    }
                    Err(NvmlError::NotFound) => Some(HashMap::new()),
                    Err(_) => None,
                };
            for p in device.running_compute_processes().unwrap_or_default() {
                out.push(GpuProcess {
                    gpu_index: index,
                    pid: p.pid,
                    memory_bytes: match p.used_gpu_memory {
                        nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                        nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                    },
                    sm_util_percent: util
                        .as_ref()
                        .map(|u| u.get(&p.pid).map_or(0, |(_, sm)| *sm)),
                });
            }
        }
        out
    }
}

/// Whether this process sees the host's pids (NVML reports host pids: in a container with its
/// own pid namespace they would name other processes). From `NSpid` in `/proc/self/status`:
/// one entry means the initial namespace.
pub fn in_host_pid_namespace() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_none_or(|pids| pids.split_whitespace().count() == 1)
    })
}

/// Sums GPU processes per deployment and GPU. `leaders` maps a deployment's process-group id
/// (its process's pid) to the deployment; `group_of` gives a pid's process group (children of a
/// workload share its group). Processes of no deployment are left out.
pub fn per_deployment(
    processes: &[GpuProcess],
    leaders: &HashMap<u32, String>,
    group_of: impl Fn(u32) -> Option<u32>,
) -> Vec<DeploymentGpu> {
    let mut by: BTreeMap<(&str, u32), DeploymentGpu> = BTreeMap::new();
    for p in processes {
        let owner = leaders
            .get(&p.pid)
            .or_else(|| group_of(p.pid).and_then(|g| leaders.get(&g)));
        let Some(id) = owner else { continue };
        let e = by
            .entry((id.as_str(), p.gpu_index))
            .or_insert_with(|| DeploymentGpu {
                deployment_id: id.clone(),
                gpu_index: p.gpu_index,
                memory_bytes: 0,
                util_percent: Some(0.0),
                processes: 0,
            });
        e.memory_bytes += p.memory_bytes.unwrap_or(0);
        e.util_percent = match (e.util_percent, p.sm_util_percent) {
            (Some(sum), Some(u)) => Some((sum + f64::from(u)).min(100.0)),
            _ => None,
        };
        e.processes += 1;
    }
    by.into_values().collect()
}

/// CPU busy percentages (0..=100).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuUsage {
    /// All cores together.
    pub total_percent: f32,
    /// One entry per logical core, in core order.
    pub per_core_percent: Vec<f32>,
}

/// RAM figures in bytes; `used` = `total` - `available`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemoryUsage {
    /// Installed RAM.
    pub total_bytes: u64,
    /// `total - available`.
    pub used_bytes: u64,
    /// Memory available for new work without swapping (MemAvailable).
    pub available_bytes: u64,
    /// Completely unused memory (MemFree).
    pub free_bytes: u64,
    /// Kernel buffers (`Buffers` in /proc/meminfo); 0 where unknown.
    pub buffers_bytes: u64,
    /// Page cache (`Cached` in /proc/meminfo); 0 where unknown.
    pub cached_bytes: u64,
    /// `used / total * 100`.
    pub percent: f32,
}

/// One mounted file system, with `df`'s arithmetic: `used` = total - free; root-reserved blocks
/// are neither used nor available.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StorageUsage {
    /// Where it is mounted.
    pub mount_point: String,
    /// File-system type (ext4, xfs, overlay, ...).
    pub fs_type: String,
    /// The device or source name.
    pub device: String,
    /// Size in bytes.
    pub total_bytes: u64,
    /// `total - free`.
    pub used_bytes: u64,
    /// Space an unprivileged user can still write.
    pub available_bytes: u64,
    /// `used / (used + available) * 100`, like `df`'s Use%.
    pub percent: f32,
}

/// One GPU's current usage. Fields a device does not support are `None`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GpuUsage {
    /// NVML device index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Total framebuffer memory in bytes (0 if unreadable).
    pub memory_total_bytes: u64,
    /// Used framebuffer memory in bytes (0 if unreadable).
    pub memory_used_bytes: u64,
    /// Free framebuffer memory in bytes (0 if unreadable).
    pub memory_free_bytes: u64,
    /// Percent of time a kernel was running.
    pub utilization_gpu_percent: Option<u32>,
    /// Percent of time device memory was read or written.
    pub utilization_memory_percent: Option<u32>,
    /// Die temperature in °C.
    pub temperature_c: Option<u32>,
    /// Power draw in watts.
    pub power_w: Option<f64>,
}

/// The sampler. Create once; call [`Monitor::sample`] periodically from a blocking context.
pub struct Monitor {
    system: Option<System>,
    disks: Option<Disks>,
    nvml: Option<Arc<Nvml>>,
    nvml_error: Option<String>,
    /// The processes on the GPUs (NVML's, or a test's fake).
    gpu_processes: Option<Arc<dyn GpuProcessSource>>,
    /// Set while NVML device queries fail, so the failure is logged once per outage.
    gpu_query_failing: bool,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("system", &self.system.is_some())
            .field("disks", &self.disks.is_some())
            .field("nvml", &self.nvml.is_some())
            .field("nvml_error", &self.nvml_error)
            .finish()
    }
}

impl Default for Monitor {
    fn default() -> Self {
        Self::new()
    }
}

impl Monitor {
    /// Loads the CPU list, takes the CPU baseline, lists the disks and tries NVML once.
    pub fn new() -> Self {
        let refresh = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::everything());
        let system = match System::new_with_specifics(refresh) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "sysinfo unavailable: CPU and memory will read 0");
                None
            }
        };
        let disks = match Disks::new_with_refreshed_list_specifics(
            DiskRefreshKind::nothing().with_storage(),
        ) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(error = %e, "disk listing unavailable: no storage reported");
                None
            }
        };
        let (nvml, nvml_error) = match Nvml::init() {
            Ok(nvml) => (Some(Arc::new(nvml)), None),
            Err(e) => {
                let reason = format!("NVML unavailable: {e}");
                tracing::debug!(%reason, "no NVIDIA GPUs will be reported");
                (None, Some(reason))
            }
        };
        let gpu_processes = nvml.as_ref().map(|nvml| {
            Arc::new(NvmlProcesses {
                nvml: nvml.clone(),
                last_seen_us: std::sync::Mutex::new(HashMap::new()),
            }) as Arc<dyn GpuProcessSource>
        });
        Self {
            system,
            disks,
            nvml,
            nvml_error,
            gpu_processes,
            gpu_query_failing: false,
        }
    }

    /// Takes the GPU processes from `source` instead (a test's fake).
    pub fn set_gpu_processes(&mut self, source: Arc<dyn GpuProcessSource>) {
        self.gpu_processes = Some(source);
    }

    /// Why GPUs are not reported (NVML failed to load or init), or `None` when NVML works.
    pub fn gpu_unavailable_reason(&self) -> Option<&str> {
        self.nvml_error.as_deref()
    }

    /// Host facts for the node's hello (also refreshes storage and memory totals).
    pub fn static_info(&mut self) -> StaticResources {
        let (cpu_model, logical_cores, memory_total_bytes, swap_total_bytes) =
            match &mut self.system {
                Some(s) => {
                    s.refresh_memory_specifics(MemoryRefreshKind::everything());
                    let model = s
                        .cpus()
                        .first()
                        .map(|c| c.brand().trim().to_owned())
                        .filter(|b| !b.is_empty());
                    (model, s.cpus().len(), s.total_memory(), s.total_swap())
                }
                None => (None, 0, 0, 0),
            };
        let gpus = self
            .gpu_usage()
            .into_iter()
            .map(|g| GpuInfo {
                index: g.index,
                name: g.name,
                uuid: self.gpu_uuid(g.index),
                memory_total_bytes: g.memory_total_bytes,
            })
            .collect();
        StaticResources {
            hostname: System::host_name().ok(),
            os: System::long_os_version().ok(),
            kernel: System::kernel_version().ok(),
            arch: System::cpu_arch(),
            cpu_model,
            logical_cores,
            physical_cores: System::physical_core_count().ok(),
            memory_total_bytes,
            swap_total_bytes,
            storage: self.storage_usage(),
            gpus,
        }
    }

    /// Takes one usage sample. Blocking (reads /proc, statvfs, NVML); call it off the runtime.
    pub fn sample(&mut self) -> UsageSample {
        UsageSample {
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            cpu: self.cpu_usage(),
            memory: self.memory_usage(),
            storage: self.storage_usage(),
            gpus: self.gpu_usage(),
            gpu_processes: self
                .gpu_processes
                .as_ref()
                .map(|s| s.processes())
                .unwrap_or_default(),
            deployment_gpus: Vec::new(),
        }
    }

    fn cpu_usage(&mut self) -> CpuUsage {
        let Some(system) = &mut self.system else {
            return CpuUsage {
                total_percent: 0.0,
                per_core_percent: Vec::new(),
            };
        };
        system.refresh_cpu_usage();
        CpuUsage {
            total_percent: clamp_percent(system.global_cpu_usage()),
            per_core_percent: system
                .cpus()
                .iter()
                .map(|c| clamp_percent(c.usage()))
                .collect(),
        }
    }

    fn memory_usage(&mut self) -> MemoryUsage {
        let (total, available, free) = match &mut self.system {
            Some(s) => {
                s.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
                (s.total_memory(), s.available_memory(), s.free_memory())
            }
            None => (0, 0, 0),
        };
        let (buffers_bytes, cached_bytes) = buffers_and_cached();
        let used = total.saturating_sub(available);
        MemoryUsage {
            total_bytes: total,
            used_bytes: used,
            available_bytes: available,
            free_bytes: free,
            buffers_bytes,
            cached_bytes,
            percent: percent(used, total),
        }
    }

    fn storage_usage(&mut self) -> Vec<StorageUsage> {
        let Some(disks) = &mut self.disks else {
            return Vec::new();
        };
        // Only the mount list comes from sysinfo (it already skips pseudo and network file
        // systems); the numbers come from statvfs so that `used` matches `df` (total - free).
        disks.refresh_specifics(true, DiskRefreshKind::nothing());
        let mut seen = BTreeSet::new();
        let mut out: Vec<StorageUsage> = disks
            .iter()
            .filter_map(|d| {
                let fs_type = d.file_system().to_string_lossy().into_owned();
                let mount = d.mount_point();
                if IGNORED_FS_TYPES.contains(&fs_type.as_str())
                    || !mount.is_dir()
                    || seen.contains(mount)
                {
                    return None;
                }
                let stats = nix::sys::statvfs::statvfs(mount).ok()?;
                // The widths of these counts differ across platforms.
                #[allow(clippy::useless_conversion)]
                let usage = storage_numbers(
                    u64::from(stats.fragment_size()),
                    u64::from(stats.blocks()),
                    u64::from(stats.blocks_free()),
                    u64::from(stats.blocks_available()),
                )?;
                seen.insert(mount.to_path_buf());
                Some(StorageUsage {
                    mount_point: mount.to_string_lossy().into_owned(),
                    fs_type,
                    device: d.name().to_string_lossy().into_owned(),
                    ..usage
                })
            })
            .collect();
        out.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
        out
    }

    fn gpu_uuid(&self, index: u32) -> Option<String> {
        let nvml = self.nvml.as_ref()?;
        nvml.device_by_index(index).ok()?.uuid().ok()
    }

    fn gpu_usage(&mut self) -> Vec<GpuUsage> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = match nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                if !self.gpu_query_failing {
                    tracing::warn!(error = %e, "NVML device count failed; reporting no GPUs");
                    self.gpu_query_failing = true;
                }
                return Vec::new();
            }
        };
        self.gpu_query_failing = false;
        (0..count)
            .filter_map(|i| {
                let device = nvml.device_by_index(i).ok()?;
                let memory = device.memory_info().ok();
                let utilization = device.utilization_rates().ok();
                Some(GpuUsage {
                    index: device.index().unwrap_or(i),
                    name: device.name().unwrap_or_else(|_| format!("GPU {i}")),
                    memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
                    memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
                    memory_free_bytes: memory.as_ref().map_or(0, |m| m.free),
                    utilization_gpu_percent: utilization.as_ref().map(|u| u.gpu),
                    utilization_memory_percent: utilization.as_ref().map(|u| u.memory),
                    temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
                    power_w: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                })
            })
            .collect()
    }
}

fn clamp_percent(value: f32) -> f32 {
    if value.is_finite() {
        value.clamp(0.0, 100.0)
    } else {
        0.0
    }
}

#[allow(clippy::cast_precision_loss)] // percentages need no more than f32 precision
fn percent(part: u64, total: u64) -> f32 {
    if total == 0 {
        0.0
    } else {
        (part as f64 / total as f64 * 100.0) as f32
    }
}

/// Byte figures from statvfs counts (`frsize` units, like `df`): `used` = total - free, percent
/// = used / (used + available). `None` for an empty file system. Names are left empty.
fn storage_numbers(frsize: u64, blocks: u64, free: u64, available: u64) -> Option<StorageUsage> {
    let total = blocks.saturating_mul(frsize);
    if total == 0 {
        return None;
    }
    let free = free.saturating_mul(frsize).min(total);
    let available = available.saturating_mul(frsize).min(free);
    let used = total - free;
    Some(StorageUsage {
        mount_point: String::new(),
        fs_type: String::new(),
        device: String::new(),
        total_bytes: total,
        used_bytes: used,
        available_bytes: available,
        percent: percent(used, used.saturating_add(available)),
    })
}

/// `Buffers` and `Cached` from /proc/meminfo in bytes; (0, 0) where unavailable.
fn buffers_and_cached() -> (u64, u64) {
    match std::fs::read_to_string(Path::new("/proc/meminfo")) {
        Ok(text) => parse_meminfo_buffers_cached(&text),
        Err(_) => (0, 0),
    }
}

fn parse_meminfo_buffers_cached(text: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
                Some(kib.saturating_mul(1024))
            })
            .unwrap_or(0)
    };
    (field("Buffers"), field("Cached"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn monitor_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Monitor>();
    }

    #[test]
    fn sample_reports_cores_memory_and_a_mount() {
        let mut monitor = Monitor::new();
        let first = monitor.sample();
        let sample = monitor.sample();
        assert!(sample.timestamp_ms >= first.timestamp_ms);
        assert!(!sample.cpu.per_core_percent.is_empty());
        assert!((0.0..=100.0).contains(&sample.cpu.total_percent));
        assert!(
            sample
                .cpu
                .per_core_percent
                .iter()
                .all(|p| (0.0..=100.0).contains(p))
        );
        let m = &sample.memory;
        assert!(m.total_bytes > 0);
        assert!(m.available_bytes <= m.total_bytes);
        assert_eq!(m.used_bytes, m.total_bytes - m.available_bytes);
        assert!(m.free_bytes <= m.total_bytes);
        assert!((0.0..=100.0).contains(&m.percent));

        assert!(!sample.storage.is_empty(), "no mounts reported");
        for s in &sample.storage {
            assert!(s.total_bytes > 0);
            assert!(s.used_bytes + s.available_bytes <= s.total_bytes);
            assert!((0.0..=100.0).contains(&s.percent));
            assert!(!s.fs_type.is_empty(), "fs_type must be set (B27)");
            assert!(!IGNORED_FS_TYPES.contains(&s.fs_type.as_str()));
        }
        let mounts: Vec<&str> = sample
            .storage
            .iter()
            .map(|s| s.mount_point.as_str())
            .collect();
        let mut sorted = mounts.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(mounts, sorted, "sorted and unique");

        // Serializable for the wire / API.
        let json = serde_json::to_string(&sample).unwrap();
        let back: UsageSample = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sample);
    }

    #[test]
    fn gpus_follow_nvml_availability() {
        let mut monitor = Monitor::new();
        let sample = monitor.sample();
        match monitor.gpu_unavailable_reason() {
            Some(reason) => {
                assert!(reason.starts_with("NVML unavailable"), "{reason}");
                assert!(sample.gpus.is_empty());
                assert!(monitor.static_info().gpus.is_empty());
            }
            None => {
                // With NVML (a GPU machine): indices are the real, distinct device indices.
                let indices: Vec<u32> = sample.gpus.iter().map(|g| g.index).collect();
                let expected: Vec<u32> = (0..u32::try_from(indices.len()).unwrap()).collect();
                assert_eq!(indices, expected);
                for g in &sample.gpus {
                    assert!(g.memory_total_bytes > 0);
                    assert!(!g.name.is_empty());
                }
            }
        }
    }

    #[test]
    fn static_info_matches_samples() {
        let mut monitor = Monitor::new();
        let info = monitor.static_info();
        let sample = monitor.sample();
        assert!(info.logical_cores >= 1);
        assert_eq!(info.logical_cores, sample.cpu.per_core_percent.len());
        assert_eq!(info.memory_total_bytes, sample.memory.total_bytes);
        assert!(!info.arch.is_empty());
        assert_eq!(info.gpus.len(), sample.gpus.len());
        let json = serde_json::to_string(&info).unwrap();
        let back: StaticResources = serde_json::from_str(&json).unwrap();
        assert_eq!(back, info);
    }

    #[test]
    fn gpu_processes_add_up_per_deployment_and_gpu() {
        let p = |gpu_index, pid, memory_bytes, sm_util_percent| GpuProcess {
            gpu_index,
            pid,
            memory_bytes,
            sm_util_percent,
        };
        let leaders = HashMap::from([(10, "a".to_owned()), (20, "b".to_owned())]);
        // 11 and 12 are children in a's group; 99 belongs to nobody.
        let group_of = |pid: u32| match pid {
            11 | 12 => Some(10),
            99 => Some(99),
            _ => None,
        };
        let got = per_deployment(
            &[
                p(0, 10, Some(100), Some(30)),
                p(0, 11, Some(50), Some(80)),
                p(1, 12, None, None),
                p(0, 20, Some(7), Some(0)),
                p(0, 99, Some(1000), Some(90)),
            ],
            &leaders,
            group_of,
        );
        let dg = |id: &str, gpu_index, memory_bytes, util_percent, processes| DeploymentGpu {
            deployment_id: id.to_owned(),
            gpu_index,
            memory_bytes,
            util_percent,
            processes,
        };
        assert_eq!(
            got,
            [
                // Summed, and capped at 100 %.
                dg("a", 0, 150, Some(100.0), 2),
                // No per-process figures: unknown, not 0.
                dg("a", 1, 0, None, 1),
                dg("b", 0, 7, Some(0.0), 1),
            ]
        );
        assert!(per_deployment(&[], &leaders, group_of).is_empty());
    }

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal: 100 kB\nBuffers:   12 kB\nCached:  34 kB\nSwapCached: 5 kB\n";
        assert_eq!(parse_meminfo_buffers_cached(text), (12 * 1024, 34 * 1024));
        assert_eq!(parse_meminfo_buffers_cached("garbage"), (0, 0));
    }

    #[test]
    fn storage_numbers_follow_df() {
        // 100 blocks of 4 KiB, 30 free of which 20 available to users (10 reserved).
        let s = storage_numbers(4096, 100, 30, 20).unwrap();
        assert_eq!(s.total_bytes, 409_600);
        assert_eq!(s.used_bytes, 70 * 4096);
        assert_eq!(s.available_bytes, 20 * 4096);
        assert_eq!(s.percent, percent(70, 90));
        assert!(storage_numbers(4096, 0, 0, 0).is_none());
        // Inconsistent counts are clamped, never underflow.
        let s = storage_numbers(1, 10, 50, 60).unwrap();
        assert_eq!((s.used_bytes, s.available_bytes), (0, 10));
    }

    #[test]
    fn percent_helpers() {
        assert_eq!(percent(1, 4), 25.0);
        assert_eq!(percent(1, 0), 0.0);
        assert_eq!(clamp_percent(f32::NAN), 0.0);
        assert_eq!(clamp_percent(120.0), 100.0);
    }
}
