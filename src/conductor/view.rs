//! The immutable snapshot of cluster state that the API reads (published by the core on a
//! `watch` channel). Shapes follow the original's JSON (section 6 of the reference) plus our
//! fixes: `current_state` reflects failures, a `status` object, connection facts per node.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::store::CondaEnvRecord;
use crate::model::{CurrentState, DesiredState};

/// What a node last reported about a deployment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusView {
    pub state: CurrentState,
    pub pid: Option<u32>,
    pub restart_count: u32,
    pub last_exit_code: Option<i32>,
    pub reason: Option<String>,
    pub generation: u64,
    pub started_at_ms: Option<i64>,
    pub stopped_at_ms: Option<i64>,
    pub node_id: String,
}

/// `DeploymentResponse`, enriched (same for the list and GET one).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeploymentView {
    pub id: String,
    pub name: String,
    pub desired_state: DesiredState,
    pub current_state: Option<CurrentState>,
    pub kind: String,
    /// Secrets masked (shared with the core's cache of masked specs).
    pub specification: Arc<serde_json::Value>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub assigned_node_id: Option<String>,
    pub assignment_reason: Option<String>,
    pub status: Option<StatusView>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct CpuView {
    #[serde(rename = "static")]
    pub static_: serde_json::Value,
    pub dynamic: serde_json::Value,
}

/// Connection facts shown per node.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConnectionView {
    pub remote_addr: String,
    pub connected_since_ms: i64,
    pub rtt_ms: f64,
    pub path_changes: u64,
    pub reconnects: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AssignedRef {
    pub id: String,
    pub name: String,
}

/// `NodeSnapshot`, plus state and connection facts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeView {
    pub node_id: String,
    /// online, suspect or lost.
    pub state: String,
    pub groups: Vec<String>,
    pub capacities_total: BTreeMap<String, i64>,
    /// Reserved by the conductor's own assignments.
    pub total_capacities_used: BTreeMap<String, i64>,
    pub last_heartbeat: Option<String>,
    pub dynamic_timestamp_unix_ms: Option<i64>,
    pub cpu: CpuView,
    pub memory: CpuView,
    pub storage_mounts: Vec<serde_json::Value>,
    pub gpus: Vec<serde_json::Value>,
    pub assigned_deployments: Vec<AssignedRef>,
    pub conda_envs: Vec<String>,
    pub schedulable: bool,
    pub missing_conda_envs: Vec<String>,
    /// What went wrong in the node's last env work (a failed create, an env kept because a
    /// deployment uses it), one line per env; empty when all went well.
    pub env_problems: Vec<String>,
    pub connection: Option<ConnectionView>,
}

/// Everything the API reads.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Newest first.
    pub deployments: Vec<Arc<DeploymentView>>,
    pub nodes: BTreeMap<String, NodeView>,
    /// Newest first.
    pub conda_envs: Vec<CondaEnvRecord>,
}

impl ClusterView {
    pub fn deployment(&self, id: &str) -> Option<&Arc<DeploymentView>> {
        self.deployments.iter().find(|d| d.id == id)
    }
}
