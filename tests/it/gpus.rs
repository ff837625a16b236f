//! GPU use per deployment: the processes on the GPUs (here from a fake NVML behind the node's
//! `GpuProcessSource`) are mapped to the deployment owning each one's process group, and shown
//! on the deployment's status, in `symphony ps --wide` and in `/metrics`.

use std::sync::{Arc, Mutex};

use symphony::node::monitor::{GpuProcess, GpuProcessSource};

use crate::support::{Cluster, pid_of, sh};

#[derive(Debug, Default)]
pub(crate) struct FakeNvml(pub(crate) Mutex<Vec<GpuProcess>>);

impl GpuProcessSource for FakeNvml {
    fn processes(&self) -> Vec<GpuProcess> {
        self.0.lock().unwrap().clone()
    }
}

/// The pids in process group `group`, other than its leader.
fn members_of(group: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ..."; comm may hold spaces, so split after ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let pgrp = rest.split_whitespace().nth(2).and_then(|g| g.parse().ok());
        if pgrp == Some(group) && pid != group {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn gpu_use_is_reported_per_deployment_from_its_process_group() {
    let fake = Arc::new(FakeNvml::default());
    let mut c = Cluster::start().await;
    c.add_node_with_gpus("g1", fake.clone()).await;
    let train = c.deploy("train", sh("sleep 1000 & wait")).await;
    let idle = c.deploy("idle", sh("sleep 1000")).await;
    let leader = u32::try_from(pid_of(&c.wait_state(&train, "RUNNING").await)).unwrap();
    c.wait_state(&idle, "RUNNING").await;
    crate::support::until("the child runs", || !members_of(leader).is_empty()).await;
    let child = members_of(leader)[0];
    let gib = 1u64 << 30;
    *fake.0.lock().unwrap() = vec![
        GpuProcess {
            gpu_index: 0,
            pid: leader,
            memory_bytes: Some(gib),
            sm_util_percent: Some(30),
        },
        GpuProcess {
            gpu_index: 0,
            pid: child,
            memory_bytes: Some(2 * gib),
            sm_util_percent: Some(20),
        },
        GpuProcess {
            gpu_index: 1,
            pid: child,
            memory_bytes: Some(gib / 2),
            sm_util_percent: None,
        },
        // Not a deployment's: left out.
        GpuProcess {
            gpu_index: 0,
            pid: std::process::id(),
            memory_bytes: Some(gib),
            sm_util_percent: Some(90),
        },
    ];
    let view = c
        .wait("train's GPU use", |v| {
            v.deployment(&train)
                .and_then(|d| d.status.as_ref())
                .is_some_and(|s| s.gpus.len() == 2)
        })
        .await;
    let gpus = &view
        .deployment(&train)
        .unwrap()
        .status
        .as_ref()
        .unwrap()
        .gpus;
    assert_eq!(
        (gpus[0].gpu_index, gpus[0].memory_bytes, gpus[0].processes),
        (0, 3 * gib, 2)
    );
    assert_eq!(gpus[0].util_percent, Some(50.0));
    assert_eq!(
        (
            gpus[1].gpu_index,
            gpus[1].memory_bytes,
            gpus[1].util_percent
        ),
        (1, gib / 2, None)
    );
    let (_, idle_json) = c.get(&format!("/deployments/{idle}")).await;
    assert_eq!(
        idle_json["status"]["gpus"],
        serde_json::json!([]),
        "{idle_json}"
    );
    let (_, train_json) = c.get(&format!("/deployments/{train}")).await;
    assert_eq!(train_json["status"]["gpus"][0]["memory_bytes"], 3 * gib);

    let metrics = c.text("/metrics").await;
    let line = format!(
        "symphony_deployment_gpu_memory_bytes{{deployment=\"{train}\",name=\"train\",node=\"g1\",gpu=\"0\"}} {}",
        3 * gib
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == line || l == format!("{line}.0")),
        "{line} missing:\n{metrics}"
    );
    assert!(
        !metrics.contains(&format!("deployment=\"{idle}\"")),
        "idle uses no GPU"
    );

    let mut out = Vec::new();
    symphony::client::ps(&c.api, false, true, &mut out)
        .await
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("0:3.0GiB/50%,1:0.5GiB/-"), "{out}");
    assert!(out.contains(&leader.to_string()), "{out}");
    c.shutdown().await;
}
