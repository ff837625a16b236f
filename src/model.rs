//! The typed model shared by the conductor and its clients: ids, generations, the desired and
//! observed states of a deployment, and the JSON shapes of the HTTP API ([`Deployment`],
//! [`Node`], ...), which the conductor's view serializes and `crate::client` deserializes.
//!
//! Invariants:
//! - every type here serializes to exactly the JSON the API has always produced: the ids and
//!   [`Generation`] are transparent (a plain string or number), the states are their
//!   upper-case names;
//! - the wire protocol (`proto/`) keeps plain strings; conversion happens at that boundary
//!   ([`CurrentState::from_wire`], [`DesiredState::as_str`]);
//! - a state name this build does not know deserializes as [`CurrentState::Unknown`] instead of
//!   failing, so a newer node or conductor never breaks an older reader.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Declares a string id newtype: transparent in serde, displayed as the bare string, and
/// usable where a `&str` key is looked up (`Borrow<str>`).
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps an id.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

string_id!(
    /// A node's id (its certificate's name), as the API shows it.
    NodeId
);
string_id!(
    /// A deployment's id (32 lower-case hex digits when the conductor made it).
    DeploymentId
);

/// The fencing generation of an assignment: every (re)assignment gets a higher one.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The generation after this one (saturating: 2^64 assignments never happen).
    #[must_use]
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u64> for Generation {
    fn from(g: u64) -> Self {
        Self(g)
    }
}

/// What the user wants a deployment to be (`desired_state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DesiredState {
    /// Keep it running (the default of a new deployment).
    #[default]
    Running,
    /// Keep it stopped.
    Stopped,
}

impl DesiredState {
    /// Every value, in the order the API documents them.
    pub const ALL: [DesiredState; 2] = [DesiredState::Running, DesiredState::Stopped];
    /// The names of [`Self::ALL`].
    pub const NAMES: [&'static str; 2] = ["RUNNING", "STOPPED"];

    /// The JSON/SQL name (`RUNNING`, `STOPPED`).
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "RUNNING",
            DesiredState::Stopped => "STOPPED",
        }
    }

    /// The state named `name` (exact, upper case), or `None`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a deployment is observed to be (`current_state`, and `status.state` as the node
/// reported it).
///
/// The node reports the run states (`STARTING` .. `FAILED`); the conductor adds `PENDING`
/// (not placed, or placed but not reported yet), `STOPPED` for a stopped deployment with no
/// node, `FAILED` for an invalid spec, and shows a node's `BACKOFF` as `CRASHED`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CurrentState {
    /// Waiting for a node, or for the node's first report.
    Pending,
    /// Preparing (workspace, env) or spawning.
    Starting,
    /// The process exists.
    Running,
    /// A stop is in progress (signal sent, waiting for the process group).
    Stopping,
    /// Stopped on request, or the desired state is STOPPED.
    Stopped,
    /// Exited with code 0 and no restart is due.
    Exited,
    /// Exited non-zero (or by a signal) and no restart is due; the API also shows a node's
    /// `BACKOFF` as `CRASHED`.
    Crashed,
    /// Waiting for the backoff delay before the next start (as a node reports it).
    Backoff,
    /// Gave up: the restart budget is spent, the start failed, or the spec is invalid.
    Failed,
    /// A name this build does not know (a newer peer); shown as `UNKNOWN`.
    #[default]
    #[serde(other)]
    Unknown,
}

impl CurrentState {
    /// Every known value.
    pub const ALL: [CurrentState; 10] = [
        CurrentState::Pending,
        CurrentState::Starting,
        CurrentState::Running,
        CurrentState::Stopping,
        CurrentState::Stopped,
        CurrentState::Exited,
        CurrentState::Crashed,
        CurrentState::Backoff,
        CurrentState::Failed,
        CurrentState::Unknown,
    ];

    /// The JSON name (`RUNNING`, ...), the same as the wire protocol's.
    pub fn as_str(self) -> &'static str {
        match self {
            CurrentState::Pending => "PENDING",
            CurrentState::Starting => "STARTING",
            CurrentState::Running => "RUNNING",
            CurrentState::Stopping => "STOPPING",
            CurrentState::Stopped => "STOPPED",
            CurrentState::Exited => "EXITED",
            CurrentState::Crashed => "CRASHED",
            CurrentState::Backoff => "BACKOFF",
            CurrentState::Failed => "FAILED",
            CurrentState::Unknown => "UNKNOWN",
        }
    }

    /// The state a node reported as `name` on the wire; an unknown name is [`Self::Unknown`].
    pub fn from_wire(name: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .unwrap_or(CurrentState::Unknown)
    }
}

impl fmt::Display for CurrentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// The JSON shapes of the HTTP API
// ---------------------------------------------------------------------------------------------
//
// The conductor's view (`crate::conductor::view`) builds and serializes these; the client
// (`crate::client`) deserializes the same types. Each struct is `#[serde(default)]`: the
// conductor always writes every field, and a reader tolerates a conductor that omits one, or
// writes `null` for a float (NaN).
// Fields of the node usage blocks are declared in alphabetical order, the order the API has
// always written them in.

/// One deployment: `GET /deployments/{id}`, each item of `GET /deployments` and of the
/// `/ws/updates` snapshot (the original's `DeploymentResponse`, enriched).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Deployment {
    pub id: DeploymentId,
    pub name: String,
    pub desired_state: DesiredState,
    /// Always set by this conductor; nullable in the API.
    pub current_state: Option<CurrentState>,
    /// `EXEC` or `DOCKER`.
    pub kind: String,
    /// As stored, secrets masked (shared with the core's cache of masked specs).
    pub specification: Arc<Value>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub assigned_node_id: Option<NodeId>,
    /// Why it is not placed: `No Node`, `No Group`, `No Env`, `No Capacity`, `Invalid Spec: ...`.
    pub assignment_reason: Option<String>,
    pub status: Option<RunStatus>,
}

/// What the node last reported about a deployment (`status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunStatus {
    pub state: CurrentState,
    pub pid: Option<u32>,
    pub restart_count: u32,
    /// Negative: killed by that signal.
    pub last_exit_code: Option<i32>,
    pub reason: Option<String>,
    pub generation: Generation,
    pub started_at_ms: Option<i64>,
    pub stopped_at_ms: Option<i64>,
    pub node_id: NodeId,
    /// GPU use of its processes, per GPU of its node (empty without GPUs).
    pub gpus: Vec<GpuUse>,
}

/// A deployment's use of one GPU: NVML's compute processes in its process group.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuUse {
    /// NVML device index on its node.
    pub gpu_index: u32,
    /// GPU memory its processes hold.
    pub memory_bytes: u64,
    /// SM utilisation of its processes (summed, at most 100); `None` where the driver gives
    /// no per-process figures.
    pub util_percent: Option<f64>,
    /// Its processes on this GPU.
    pub processes: u32,
}

/// `GET /nodes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeList {
    /// By node id.
    pub nodes: BTreeMap<String, Node>,
}

/// How long a mesh connection is held while its service (or its binder's node) is not
/// reachable yet, before it is reset.
pub const TUNNEL_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

/// One bound service (`GET /services`): where every process of its namespace reaches it
/// (`SYMPH_<NAME>_HOST/_PORT/_ADDR`), who binds it and who connects to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceInfo {
    /// An experiment's name, or `default`.
    pub namespace: String,
    pub name: String,
    /// Always `127.0.0.1`: every node makes the service reachable there.
    pub host: String,
    /// Unique in the cluster.
    pub port: u16,
    /// Reachable from outside the mesh.
    pub exposed: bool,
    /// The binder.
    pub deployment_id: String,
    pub deployment_name: String,
    /// Where the binder is placed, if it is.
    pub node_id: Option<String>,
    /// Deployments that declare `connects` to it.
    pub connectors: Vec<String>,
    /// For each node running a connector: the path its tunnels take to the binder.
    pub paths: Vec<ServicePath>,
}

/// An experiment (`GET /experiments`): its state, derived from its processes, and each
/// process as `symphony p` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExperimentInfo {
    pub name: String,
    /// `spread` or `gang`.
    pub placement: String,
    /// `pending` (nothing started yet), `running` (every process that should run does, or
    /// finished), `degraded` (some do not), `failed` (stopped by a failed process, or every
    /// process failed), `stopped` (stopped on request).
    pub state: String,
    /// Why it is not running: the process that failed, or what keeps it pending.
    pub reason: Option<String>,
    pub created_at_ms: i64,
    /// In declaration order.
    pub processes: Vec<ExperimentProcess>,
    /// The services of its namespace (the `SYMPH_*` variables every process gets).
    pub services: Vec<String>,
    /// The declaration as launched, secrets masked (only on `GET /experiments/{name}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub declaration: Option<Arc<Value>>,
}

/// One process of an experiment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExperimentProcess {
    pub name: String,
    pub group: Option<String>,
    /// `restart` or `stop-experiment`.
    pub on_failure: String,
    /// The deployment that runs it (its logs are the deployment's).
    pub deployment_id: String,
    pub desired_state: DesiredState,
    pub current_state: CurrentState,
    /// Running (and past its start).
    pub ready: bool,
    pub restarts: u32,
    pub last_exit_code: Option<i32>,
    /// Since when it is in its current state (started or stopped), if known.
    pub since_ms: Option<i64>,
    pub node_id: Option<String>,
    /// Why it is not placed, or the node's reason for its state.
    pub reason: Option<String>,
}

/// How tunnels from one node reach a service's binder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServicePath {
    /// The connector's node.
    pub node_id: String,
    /// `direct` (a hole-punched connection between the two nodes), `relay` (through the
    /// conductor) or `local` (same node: no tunnel).
    pub path: String,
    /// Round-trip time of that path, milliseconds (the relay's is the sum of both nodes'
    /// round trips to the conductor); `null` while unknown.
    pub rtt_ms: Option<f64>,
    /// On the relay: why the last direct attempt failed (`null`: none failed yet, or direct
    /// paths are off).
    pub direct_error: Option<String>,
}

/// One node (the original's `NodeSnapshot`, plus liveness and connection facts).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Node {
    pub node_id: NodeId,
    /// `online`, `suspect` or `lost`.
    pub state: String,
    pub groups: Vec<String>,
    pub capacities_total: BTreeMap<String, i64>,
    /// Reserved by the conductor's own assignments.
    pub total_capacities_used: BTreeMap<String, i64>,
    /// ISO-8601 UTC.
    pub last_heartbeat: Option<String>,
    pub dynamic_timestamp_unix_ms: Option<i64>,
    #[serde(deserialize_with = "null_as_default")]
    pub cpu: NodeCpu,
    #[serde(deserialize_with = "null_as_default")]
    pub memory: NodeMemory,
    pub storage_mounts: Vec<StorageMount>,
    pub gpus: Vec<Gpu>,
    pub assigned_deployments: Vec<AssignedRef>,
    pub conda_envs: Vec<String>,
    /// Online: the scheduler places work here.
    pub schedulable: bool,
    pub missing_conda_envs: Vec<String>,
    /// What went wrong in the node's last env work (a failed create, an env kept because a
    /// deployment uses it), one line per env; empty when all went well.
    pub env_problems: Vec<String>,
    /// What the node reports it cannot do right now (its local state could not be written to
    /// its disk, ...), one line each, from its last heartbeat; empty when all is well.
    pub problems: Vec<String>,
    pub connection: Option<NodeConnection>,
    /// What the conductor knows of the node's certificate (`None`: nothing recorded, a
    /// certificate made with `symphony cert node` that was never renewed).
    pub certificate: Option<NodeCertificate>,
}

/// A node's certificate as the conductor knows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeCertificate {
    /// `valid`, `expired` or `revoked`.
    pub state: String,
    /// Why it is not valid.
    pub reason: Option<String>,
    /// End of the newest certificate issued, Unix ms.
    pub not_after_ms: Option<i64>,
    /// Groups the node may claim (`None`: any).
    pub allowed_groups: Option<Vec<String>>,
    /// The join token it enrolled with.
    pub token_id: Option<String>,
}

/// A deployment assigned to a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AssignedRef {
    pub id: DeploymentId,
    pub name: String,
}

/// `cpu`: what the node has and, once it sent a heartbeat, what it uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeCpu {
    #[serde(rename = "static")]
    pub static_: CpuStatic,
    pub dynamic: Option<CpuDynamic>,
}

/// `cpu.static`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuStatic {
    pub logical_cores: u32,
    pub max_millicores_total: u64,
}

/// `cpu.dynamic`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuDynamic {
    pub per_core: Vec<CoreUsage>,
    #[serde(deserialize_with = "null_as_default")]
    pub total_percent: f64,
}

/// One core in `cpu.dynamic.per_core`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoreUsage {
    pub core_id: u32,
    #[serde(deserialize_with = "null_as_default")]
    pub used_percent: f64,
}

/// `memory`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeMemory {
    #[serde(rename = "static")]
    pub static_: MemoryStatic,
    pub dynamic: Option<MemoryDynamic>,
}

/// `memory.static`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryStatic {
    /// 0 when the node has not reported its resources.
    pub total_bytes: u64,
}

/// `memory.dynamic`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryDynamic {
    pub available_bytes: u64,
    pub buffers_bytes: u64,
    pub cached_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub used_percent: f64,
}

/// One item of `storage_mounts`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageMount {
    pub available_bytes: u64,
    pub fs_type: String,
    pub mount_point: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub used_percent: f64,
}

/// One item of `gpus`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpu {
    pub index: u32,
    pub mem_free_bytes: u64,
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub mem_util_percent: f64,
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub power_w: f64,
    #[serde(deserialize_with = "null_as_default")]
    pub temperature_c: f64,
    #[serde(deserialize_with = "null_as_default")]
    pub util_percent: f64,
}

/// `connection`: facts about the node's QUIC connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeConnection {
    pub remote_addr: String,
    pub connected_since_ms: i64,
    #[serde(deserialize_with = "null_as_default")]
    pub rtt_ms: f64,
    /// QUIC migrations (NAT rebinding, new address) without reconnecting.
    pub path_changes: u64,
    pub reconnects: u64,
}

/// Reads `null` as the type's default. The conductor writes `null` for a float that is not a
/// number (serde_json's rule; e.g. the used percentage of an empty file system), and never
/// for the usage blocks, which older readers accepted as `null`.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn states_serialize_to_the_names_the_api_has_always_used() {
        for s in DesiredState::ALL {
            assert_eq!(json!(s), json!(s.as_str()));
            assert_eq!(DesiredState::from_name(s.as_str()), Some(s));
            assert_eq!(serde_json::from_value::<DesiredState>(json!(s)).unwrap(), s);
        }
        assert_eq!(
            DesiredState::NAMES,
            DesiredState::ALL.map(DesiredState::as_str)
        );
        assert_eq!(DesiredState::from_name("running"), None);
        assert_eq!(DesiredState::default(), DesiredState::Running);
        let names: Vec<&str> = CurrentState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "PENDING", "STARTING", "RUNNING", "STOPPING", "STOPPED", "EXITED", "CRASHED",
                "BACKOFF", "FAILED", "UNKNOWN"
            ]
        );
        for s in CurrentState::ALL {
            assert_eq!(json!(s), json!(s.as_str()));
            assert_eq!(CurrentState::from_wire(s.as_str()), s);
            assert_eq!(serde_json::from_value::<CurrentState>(json!(s)).unwrap(), s);
        }
    }

    #[test]
    fn an_unknown_state_name_reads_as_unknown() {
        assert_eq!(CurrentState::from_wire("PAUSED"), CurrentState::Unknown);
        assert_eq!(CurrentState::from_wire("running"), CurrentState::Unknown);
        let s: CurrentState = serde_json::from_value(json!("HIBERNATING")).unwrap();
        assert_eq!(s, CurrentState::Unknown);
        assert!(serde_json::from_value::<DesiredState>(json!("PAUSED")).is_err());
    }

    #[test]
    fn ids_and_generations_are_plain_json_values() {
        let id = DeploymentId::new("abc");
        assert_eq!(json!(id), json!("abc"));
        assert_eq!(id.to_string(), "abc");
        assert_eq!(id, "abc");
        let back: NodeId = serde_json::from_value(json!("n1")).unwrap();
        assert_eq!(back.as_str(), "n1");
        let map: std::collections::BTreeMap<NodeId, u8> = [(back, 1)].into();
        assert_eq!(map.get("n1"), Some(&1));
        assert_eq!(json!(Generation(7)), json!(7));
        assert_eq!(
            serde_json::from_value::<Generation>(json!(9)).unwrap(),
            Generation(9)
        );
        assert_eq!(Generation(3).to_string(), "3");
    }
}
