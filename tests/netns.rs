//! Real-network tests: nodes behind an nftables NAT in network namespaces, the real `symphony`
//! binary in each, asserted through the conductor's HTTP API and the pods' process tables.
//!
//! Each test builds its own bed ([`bed::Bed`]: public namespace with the conductor, a NAT
//! router namespace, one pod namespace per node), runs one scenario, and tears everything down
//! again, also when it fails. Tests never overlap (process-wide mutex plus a file lock).
//!
//! Requirements: root, and the `ip` (iproute2), `nft` (nftables) and `conntrack` (conntrack)
//! tools. Without them every test prints why and passes as skipped; with `CI` set, a missing
//! prerequisite fails the test. Nothing is installed from here.
//!
//! Waits poll the API (bounded by [`api::WAIT`]); the only fixed sleeps outwait a timeout on
//! purpose and say so where they stand.
//!
//! Run: `cargo test --test netns` as root (about 55 s; each scenario prints one `netns:` line
//! with what it observed). `SYMPHONY_NETNS_LOGS=1 cargo test --test netns -- --nocapture`
//! also prints the tail of every conductor and node log; a failing test always does.

// Test code: a failed unwrap is a test failure with its message, which is what we want.
#![allow(clippy::unwrap_used)]

#[path = "netns/api.rs"]
mod api;
#[path = "netns/bed.rs"]
mod bed;
#[path = "it/rl_example.rs"]
mod rl_example;

use std::time::{Duration, Instant};

use api::{DepFacts, NodeFacts, WAIT, until};
use bed::{Bed, NAT_WAN_IP, NAT_WAN_IP2, Nat, Params, say};
use serde_json::json;

/// Runs one scenario on a fresh bed (or skips it, see the module docs).
fn scenario(name: &'static str, params: Params, body: impl AsyncFnOnce(&mut Bed)) {
    if !bed::preflight(name) {
        return;
    }
    let serial = bed::serial();
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut bed = Bed::up(name, params, serial).await;
        body(&mut bed).await;
    });
    say(&format!(
        "{name}: passed in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// A unique argument for `sleep`, so each deployment's processes can be told apart.
fn token() -> String {
    (9_000_000 + rand::random::<u32>() % 1_000_000).to_string()
}

/// Waits until the node is online with a live connection.
async fn online(bed: &Bed, node: &str) -> NodeFacts {
    until(
        &format!("{node} is online and connected"),
        WAIT,
        async || {
            let n = bed.api.node(node).await?;
            if n.state == "online" && n.connected {
                Ok(n)
            } else {
                Err(format!("{n:?}"))
            }
        },
    )
    .await
}

/// Waits until the deployment runs: RUNNING on its assigned node, with a pid that is a
/// `sleep <token>` process in that node's pod namespace. Returns the facts and the pod index.
async fn running(bed: &Bed, id: &str, token: &str) -> (DepFacts, usize) {
    until(&format!("deployment {id} runs"), WAIT, async || {
        let d = bed.api.deployment(id).await?;
        let (Some(node), Some(pid)) = (d.assigned.clone(), d.pid) else {
            return Err(format!("{d:?}"));
        };
        if d.state.as_deref() != Some("RUNNING") || d.status_node.as_deref() != Some(node.as_str())
        {
            return Err(format!("{d:?}"));
        }
        let pod = bed.pod_of(&node);
        let pids = bed.workload_pids(pod, token);
        if pids.contains(&pid) {
            Ok((d, pod))
        } else {
            Err(format!(
                "{d:?}; sleep {token} pids in {node}'s pod: {pids:?}"
            ))
        }
    })
    .await
}

/// All `sleep <token>` processes across the pods, as (pod index, pid).
fn copies(bed: &Bed, token: &str) -> Vec<(usize, u32)> {
    (0..bed.pods.len())
        .flat_map(|i| bed.workload_pids(i, token).into_iter().map(move |p| (i, p)))
        .collect()
}

/// Shared body of the three migration scenarios: a deployment runs, `change` moves the node's
/// public address, and the same connection must carry on (no reconnect, same workload).
async fn survives_address_change(
    bed: &mut Bed,
    change: impl FnOnce(&mut Bed),
) -> (NodeFacts, NodeFacts, DepFacts) {
    online(bed, "n0").await;
    let tok = token();
    let id = bed.api.deploy("web", &tok).await;
    let (d0, pod) = running(bed, &id, &tok).await;
    let before = online(bed, "n0").await;

    change(bed);

    until(
        "the conductor sees the node's new address on the same connection",
        WAIT,
        async || {
            let n = bed.api.node("n0").await?;
            assert_eq!(
                n.reconnects, before.reconnects,
                "the node re-dialled instead of migrating: {n:?}"
            );
            assert_eq!(
                n.state, "online",
                "the node must stay online while it moves: {n:?}"
            );
            if n.connected && n.path_changes > before.path_changes && n.remote != before.remote {
                Ok(())
            } else {
                Err(format!("{n:?} (before: {before:?})"))
            }
        },
    )
    .await;
    // The migrated connection still carries commands: a new deployment reaches the node.
    let tok2 = token();
    let id2 = bed.api.deploy("after-move", &tok2).await;
    running(bed, &id2, &tok2).await;
    // The first workload was never touched.
    let d1 = bed.api.deployment(&id).await.unwrap();
    assert_eq!(d1.state.as_deref(), Some("RUNNING"));
    assert_eq!(d1.pid, d0.pid, "the workload was restarted");
    assert_eq!(d1.generation, d0.generation);
    assert_eq!(d1.restart_count, d0.restart_count);
    assert_eq!(bed.workload_pids(pod, &tok), vec![d0.pid.unwrap()]);
    let end = online(bed, "n0").await;
    assert_eq!(
        end.reconnects, before.reconnects,
        "reconnected later: {end:?}"
    );
    (before, end, d1)
}

#[test]
fn node_behind_nat_registers_and_runs() {
    scenario("register", Params::default(), async |bed: &mut Bed| {
        let n = online(bed, "n0").await;
        // The conductor sees the NAT's public address, and cannot reach the pod at all: the
        // connection is outbound-only.
        let remote = n.remote.unwrap();
        assert_eq!(remote.ip(), NAT_WAN_IP, "{n:?}");
        assert!(
            !bed.public_routes_to(bed.pods[0].ip),
            "the conductor's namespace must not route to the pod"
        );
        let tok = token();
        let id = bed.api.deploy("hello", &tok).await;
        let (d, pod) = running(bed, &id, &tok).await;
        assert_eq!(d.assigned.as_deref(), Some("n0"));
        assert_eq!(bed.workload_pids(pod, &tok), vec![d.pid.unwrap()]);
        say(&format!(
            "register: remote {remote} (pod {}), deployment RUNNING pid {} generation {:?}",
            bed.pods[0].ip,
            d.pid.unwrap(),
            d.generation
        ));
    });
}

/// A pod that has only the two environment variables of a pod template joins through the
/// NAT: it enrolls (the CA pinned in the token), connects with its new certificate, gets the
/// token's groups, and runs a deployment placed by one of them.
#[test]
fn a_pod_joins_through_the_nat_with_two_environment_variables() {
    scenario("join", Params::default(), async |bed: &mut Bed| {
        online(bed, "n0").await;
        let join = bed.api.join_token(&["joined"]).await;
        bed.start_joining_node("joiner", 0, &join);
        let (id, n) = until("the joined pod is online", WAIT, async || {
            let all = bed.api.nodes().await?;
            let id = all["nodes"]
                .as_object()
                .and_then(|m| m.keys().find(|k| k.starts_with("node-")).cloned())
                .ok_or_else(|| format!("no joined node yet: {all}"))?;
            let n = bed.api.node(&id).await?;
            if n.state == "online" && n.connected {
                Ok((id, n))
            } else {
                Err(format!("{n:?}"))
            }
        })
        .await;
        assert_eq!(n.remote.unwrap().ip(), NAT_WAN_IP, "{n:?}");
        let tok = token();
        let dep = bed
            .api
            .deploy_spec(
                "on-joined",
                json!({"config": {"command": ["sleep", tok]}, "node_group": "joined"}),
            )
            .await;
        let d = until("it runs on the joined pod", WAIT, async || {
            let d = bed.api.deployment(&dep).await?;
            match (d.state.as_deref(), d.pid) {
                (Some("RUNNING"), Some(pid)) if bed.workload_pids(0, &tok).contains(&pid) => Ok(d),
                _ => Err(format!("{d:?}")),
            }
        })
        .await;
        assert_eq!(d.assigned.as_deref(), Some(id.as_str()));
        say(&format!(
            "join: {id} joined from {} and runs pid {}",
            n.remote.unwrap(),
            d.pid.unwrap()
        ));
    });
}

// `masquerade random` picks the new public port at random: the one-in-~64k chance that it
// equals the old one would make this test time out (no address change to see).
#[test]
fn nat_rebinding_migrates() {
    scenario("nat-rebinding", Params::default(), async |bed: &mut Bed| {
        let (before, after, d) = survives_address_change(bed, |b| b.flush_conntrack()).await;
        assert_eq!(after.remote.unwrap().ip(), NAT_WAN_IP);
        say(&format!(
            "nat-rebinding: remote {} -> {}, path_changes {} -> {}, reconnects {} -> {}, pid {} kept, generation {:?}",
            before.remote.unwrap(),
            after.remote.unwrap(),
            before.path_changes,
            after.path_changes,
            before.reconnects,
            after.reconnects,
            d.pid.unwrap(),
            d.generation
        ));
    });
}

#[test]
fn pod_ip_change_migrates() {
    scenario("pod-ip-change", Params::default(), async |bed: &mut Bed| {
        let old_ip = bed.pods[0].ip;
        let mut new_ip = old_ip;
        let (before, after, d) =
            survives_address_change(bed, |b| new_ip = b.change_pod_ip(0)).await;
        say(&format!(
            "pod-ip-change: pod {old_ip} -> {new_ip}, remote {} -> {}, path_changes {} -> {}, reconnects {} -> {}, pid {} kept",
            before.remote.unwrap(),
            after.remote.unwrap(),
            before.path_changes,
            after.path_changes,
            before.reconnects,
            after.reconnects,
            d.pid.unwrap()
        ));
    });
}

#[test]
fn nat_public_ip_change_migrates() {
    scenario(
        "public-ip-change",
        Params::default(),
        async |bed: &mut Bed| {
            let (before, after, d) = survives_address_change(bed, |b| b.change_public_ip()).await;
            assert_eq!(before.remote.unwrap().ip(), NAT_WAN_IP);
            assert_eq!(after.remote.unwrap().ip(), NAT_WAN_IP2, "{after:?}");
            say(&format!(
                "public-ip-change: remote {} -> {}, path_changes {} -> {}, reconnects {} -> {}, pid {} kept",
                before.remote.unwrap(),
                after.remote.unwrap(),
                before.path_changes,
                after.path_changes,
                before.reconnects,
                after.reconnects,
                d.pid.unwrap()
            ));
        },
    );
}

/// Short QUIC timers so a cut outlasts the idle timeout quickly; a grace far longer than
/// any cut, so nothing is rescheduled.
fn short_idle() -> Params {
    Params {
        keep_alive_sec: Some(1.0),
        idle_timeout_sec: Some(4.0),
        ..Params::default()
    }
}

/// Cuts pod `i`'s link until the conductor has dropped the connection and the idle timeout
/// has certainly passed on the node's side too.
async fn cut_past_idle_timeout(bed: &Bed, i: usize) {
    let node = bed.pods[i].node_id.clone();
    let idle = Duration::from_secs_f64(bed.params.idle_timeout_sec.unwrap());
    let cut_at = Instant::now();
    bed.cut(i);
    until(
        &format!("the conductor drops {node}'s connection"),
        WAIT,
        async || {
            let n = bed.api.node(&node).await?;
            if n.connected {
                Err(format!("{n:?}"))
            } else {
                Ok(())
            }
        },
    )
    .await;
    // Deliberate: the node's idle timer started at its own last received packet, which may be
    // a little later than the conductor's; outwait it by a second so both ends timed out.
    let past = idle + Duration::from_secs(1);
    if let Some(rest) = past.checked_sub(cut_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
}

#[test]
fn link_cut_past_idle_timeout_reconnects() {
    scenario("link-cut", short_idle(), async |bed: &mut Bed| {
        online(bed, "n0").await;
        let tok = token();
        let id = bed.api.deploy("steady", &tok).await;
        let (d0, pod) = running(bed, &id, &tok).await;
        let before = online(bed, "n0").await;
        let cut_at = Instant::now();
        cut_past_idle_timeout(bed, 0).await;
        let cut_for = cut_at.elapsed();
        // The workload runs on while the conductor is unreachable.
        assert_eq!(bed.workload_pids(pod, &tok), vec![d0.pid.unwrap()]);
        bed.restore(0);
        let after = until("n0 reconnects", WAIT, async || {
            let n = bed.api.node("n0").await?;
            if n.state == "online" && n.connected && n.reconnects > before.reconnects {
                Ok(n)
            } else {
                Err(format!("{n:?}"))
            }
        })
        .await;
        assert_eq!(after.reconnects, before.reconnects + 1, "{after:?}");
        let (d1, _) = running(bed, &id, &tok).await;
        assert_eq!(d1.pid, d0.pid, "the workload was restarted");
        assert_eq!(d1.restart_count, d0.restart_count);
        assert_eq!(d1.generation, d0.generation);
        assert_eq!(bed.workload_pids(pod, &tok), vec![d0.pid.unwrap()]);
        say(&format!(
            "link-cut: cut {:.1} s (idle timeout {} s), reconnects {} -> {}, pid {} kept, restarts {:?}, generation {:?}",
            cut_for.as_secs_f64(),
            bed.params.idle_timeout_sec.unwrap(),
            before.reconnects,
            after.reconnects,
            d1.pid.unwrap(),
            d1.restart_count,
            d1.generation
        ));
    });
}

#[test]
fn partition_past_grace_reschedules_and_heals_to_one_copy() {
    let params = Params {
        pods: 2,
        node_grace_sec: 6.0,
        suspect_after_sec: 2.0,
        keep_alive_sec: Some(1.0),
        idle_timeout_sec: Some(4.0),
        ..Params::default()
    };
    scenario("partition", params, async |bed: &mut Bed| {
        online(bed, "n0").await;
        online(bed, "n1").await;
        let tok = token();
        let id = bed.api.deploy("single", &tok).await;
        let (d0, a) = running(bed, &id, &tok).await;
        let b = 1 - a;
        let (node_a, node_b) = (bed.pods[a].node_id.clone(), bed.pods[b].node_id.clone());
        let a_before = online(bed, &node_a).await;
        let old_pid = d0.pid.unwrap();

        bed.cut(a);
        until(
            &format!("{id} is rescheduled to {node_b}"),
            WAIT,
            async || {
                let d = bed.api.deployment(&id).await?;
                if d.assigned.as_deref() == Some(node_b.as_str()) && d.generation > d0.generation {
                    Ok(())
                } else {
                    Err(format!("{d:?}"))
                }
            },
        )
        .await;
        let (d1, pod_b) = running(bed, &id, &tok).await;
        assert_eq!(pod_b, b);
        assert!(d1.generation > d0.generation, "{d1:?}");
        let lost = bed.api.node(&node_a).await.unwrap();
        assert_eq!(lost.state, "lost", "{lost:?}");
        // During the partition both copies exist: the cut-off node keeps its process.
        assert_eq!(
            bed.workload_pids(a, &tok),
            vec![old_pid],
            "the partitioned node's copy should still run"
        );
        let new_pid = d1.pid.unwrap();

        bed.restore(a);
        until(
            &format!("{node_a} is back and its stale copy is stopped"),
            WAIT,
            async || {
                let n = bed.api.node(&node_a).await?;
                let stale = bed.workload_pids(a, &tok);
                if n.state == "online" && n.reconnects > a_before.reconnects && stale.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{n:?}; copies on {node_a}: {stale:?}"))
                }
            },
        )
        .await;
        let (d2, pod) = running(bed, &id, &tok).await;
        assert_eq!(pod, b);
        assert_eq!(d2.pid, Some(new_pid), "the surviving copy changed");
        assert_eq!(d2.generation, d1.generation);
        assert_eq!(
            copies(bed, &tok),
            vec![(b, new_pid)],
            "exactly one copy must run"
        );
        let n_a = bed.api.node(&node_a).await.unwrap();
        say(&format!(
            "partition: {id} on {node_a} pid {old_pid} gen {:?} -> {node_b} pid {new_pid} gen {:?}; {node_a} reconnects {} -> {}; after heal copies {:?}",
            d0.generation,
            d2.generation,
            a_before.reconnects,
            n_a.reconnects,
            copies(bed, &tok)
        ));
    });
}

#[test]
fn conductor_restart_keeps_workloads_and_applies_changes_on_return() {
    scenario("conductor-restart", short_idle(), async |bed: &mut Bed| {
        online(bed, "n0").await;
        let (t1, t2) = (token(), token());
        let id1 = bed.api.deploy("one", &t1).await;
        let id2 = bed.api.deploy("two", &t2).await;
        let (a1, pod) = running(bed, &id1, &t1).await;
        let (a2, _) = running(bed, &id2, &t2).await;

        let status = bed.stop("conductor");
        // Processes keep running while the conductor is away.
        assert_eq!(bed.workload_pids(pod, &t1), vec![a1.pid.unwrap()]);
        assert_eq!(bed.workload_pids(pod, &t2), vec![a2.pid.unwrap()]);
        bed.start_conductor().await;
        let back = online(bed, "n0").await;
        let (b1, _) = running(bed, &id1, &t1).await;
        let (b2, _) = running(bed, &id2, &t2).await;
        assert_eq!(
            (b1.pid, b2.pid),
            (a1.pid, a2.pid),
            "workloads were restarted across a conductor restart"
        );
        assert_eq!(
            (b1.generation, b2.generation),
            (a1.generation, a2.generation)
        );
        assert_eq!(
            (b1.restart_count, b2.restart_count),
            (a1.restart_count, a2.restart_count)
        );

        // A desired-state change made while the node is disconnected is applied on return.
        cut_past_idle_timeout(bed, 0).await;
        let patched = bed
            .api
            .patch(&id1, json!({"desired_state": "STOPPED"}))
            .await;
        assert_eq!(patched.desired, "STOPPED");
        assert_eq!(
            bed.workload_pids(pod, &t1),
            vec![a1.pid.unwrap()],
            "the node cannot have heard of it yet"
        );
        bed.restore(0);
        let stopped = until(&format!("{id1} is stopped on the node"), WAIT, async || {
            let d = bed.api.deployment(&id1).await?;
            let left = bed.workload_pids(pod, &t1);
            if left.is_empty() && d.current.as_deref() == Some("STOPPED") && d.assigned.is_none() {
                Ok(d)
            } else {
                Err(format!("{d:?}; processes {left:?}"))
            }
        })
        .await;
        let (c2, _) = running(bed, &id2, &t2).await;
        assert_eq!(c2.pid, a2.pid, "the untouched deployment was restarted");
        let end = online(bed, "n0").await;
        assert_eq!(end.reconnects, back.reconnects + 1, "{end:?}");
        say(&format!(
            "conductor-restart: conductor exit {status}; pids {:?}/{:?} kept (generations {:?}/{:?}); STOPPED while cut off -> current {:?}, process gone; node reconnects {} -> {}",
            b1.pid,
            b2.pid,
            b1.generation,
            b2.generation,
            stopped.current,
            back.reconnects,
            end.reconnects
        ));
    });
}

/// Waits until `node` is online again after more than `reconnects` reconnects.
async fn reconnected(bed: &Bed, node: &str, reconnects: u64) -> NodeFacts {
    until(&format!("{node} reconnects"), WAIT, async || {
        let n = bed.api.node(node).await?;
        if n.state == "online" && n.reconnects > reconnects {
            Ok(n)
        } else {
            Err(format!("{n:?}"))
        }
    })
    .await
}

#[test]
fn node_restart_restores_local_state_without_duplicates() {
    scenario("node-restart", short_idle(), async |bed: &mut Bed| {
        online(bed, "n0").await;
        let tok = token();
        let id = bed.api.deploy("kept", &tok).await;
        let (d0, pod) = running(bed, &id, &tok).await;
        let before = online(bed, "n0").await;

        let status = bed.stop("n0");
        assert!(status.success(), "node exit: {status}");
        // The node's own shutdown stops its workloads.
        assert!(
            bed.workload_pids(pod, &tok).is_empty(),
            "workload survived the node's shutdown"
        );
        // Restart it cut off from the conductor: it knows what it held (local state) but does
        // not start it until the conductor confirms (the deployment might have moved).
        bed.cut(0);
        bed.start_node(0);
        assert!(
            bed.workload_pids(pod, &tok).is_empty(),
            "nothing starts before the conductor confirms"
        );
        bed.restore(0);
        let after = reconnected(bed, "n0", before.reconnects).await;
        let d1 = until(
            "the conductor confirms and the node runs its restored deployment",
            WAIT,
            async || {
                let d = bed.api.deployment(&id).await?;
                if d.state.as_deref() == Some("RUNNING") && d.pid.is_some() {
                    Ok(d)
                } else {
                    Err(format!("{d:?}"))
                }
            },
        )
        .await;
        let restored = d1.pid.unwrap_or_default();
        assert_eq!(
            d1.generation, d0.generation,
            "a restart from local state needs no new generation"
        );
        assert_eq!(d1.assigned.as_deref(), Some("n0"));
        assert_eq!(
            bed.workload_pids(pod, &tok),
            vec![restored],
            "exactly one copy"
        );
        assert_eq!(after.reconnects, before.reconnects + 1);
        say(&format!(
            "node-restart: pid {} -> {restored} (restored from local state once confirmed), generation {:?} -> {:?}, reconnects {} -> {}, copies {:?}",
            d0.pid.unwrap(),
            d0.generation,
            d1.generation,
            before.reconnects,
            after.reconnects,
            copies(bed, &tok)
        ));
    });
}

#[test]
fn node_kill9_adopts_its_workload_without_duplicates() {
    scenario("node-kill9", short_idle(), async |bed: &mut Bed| {
        online(bed, "n0").await;
        let tok = token();
        let id = bed.api.deploy("kept", &tok).await;
        let (d0, pod) = running(bed, &id, &tok).await;
        let pid = d0.pid.unwrap_or_default();
        let before = online(bed, "n0").await;
        // A crash of the agent: the workload lives on under its keeper.
        bed.kill9("n0");
        assert_eq!(
            bed.workload_pids(pod, &tok),
            vec![pid],
            "the workload outlives its agent"
        );
        bed.start_node(0);
        let after = reconnected(bed, "n0", before.reconnects).await;
        let d1 = until("the new agent adopts the workload", WAIT, async || {
            let d = bed.api.deployment(&id).await?;
            if d.state.as_deref() == Some("RUNNING") && d.pid == Some(pid) {
                Ok(d)
            } else {
                Err(format!("{d:?}"))
            }
        })
        .await;
        assert_eq!(d1.generation, d0.generation, "adopted, not placed again");
        assert_eq!(d1.restart_count, d0.restart_count, "adopted, not restarted");
        assert_eq!(bed.workload_pids(pod, &tok), vec![pid], "exactly one copy");
        say(&format!(
            "node-kill9: pid {pid} adopted by the restarted agent, generation {:?} -> {:?}, restarts {:?} -> {:?}, reconnects {} -> {}, copies {:?}",
            d0.generation,
            d1.generation,
            d0.restart_count,
            d1.restart_count,
            before.reconnects,
            after.reconnects,
            copies(bed, &tok)
        ));
    });
}

#[test]
fn idle_node_behind_short_nat_timeout_still_reachable() {
    // Only QUIC keep-alives (default 5 s) flow while idle: heartbeats every 30 s, and a
    // suspect/grace window long enough that the quiet node stays online.
    let params = Params {
        heartbeat_sec: Some(30.0),
        suspect_after_sec: 60.0,
        node_grace_sec: 120.0,
        udp_conntrack_timeout_sec: Some(5),
        ..Params::default()
    };
    scenario("idle-nat", params, async |bed: &mut Bed| {
        let before = online(bed, "n0").await;
        // Deliberate: stay idle for more than twice the router's 5 s UDP conntrack timeout.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let tok = token();
        let id = bed.api.deploy("late", &tok).await;
        let (d, _) = running(bed, &id, &tok).await;
        let after = online(bed, "n0").await;
        assert_eq!(
            after.reconnects, before.reconnects,
            "the idle connection was lost: {after:?}"
        );
        say(&format!(
            "idle-nat: after 12 s idle (conntrack 5 s) pushed deployment runs pid {}; remote {} -> {}, path_changes {} -> {}, reconnects {} -> {}",
            d.pid.unwrap(),
            before.remote.unwrap(),
            after.remote.unwrap(),
            before.path_changes,
            after.path_changes,
            before.reconnects,
            after.reconnects
        ));
    });
}

/// An echo server for the mesh scenarios: each connection's lines come back as `pong:<line>`.
const ECHO_SERVER: &str = "import os, socket, threading
def serve(c):
    for line in c.makefile('rb'):
        c.sendall(b'pong:' + line)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((os.environ['SYMPH_ECHO_HOST'], int(os.environ['SYMPH_ECHO_PORT'])))
s.listen()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
";

/// A client that opens ONE connection to `echo` and pings on it every 0.1 s, writing the
/// count of right answers to the file named by its argument; any error ends it.
const ECHO_CLIENT: &str = "import os, socket, sys, time
host, port = os.environ['SYMPH_ECHO_ADDR'].rsplit(':', 1)
for _ in range(300):
    try:
        c = socket.create_connection((host, int(port)), timeout=30)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(2)
f = c.makefile('rwb')
n = 0
while True:
    f.write(b'ping\\n')
    f.flush()
    if f.readline() != b'pong:ping\\n':
        sys.exit(3)
    n += 1
    with open(sys.argv[1] + '.tmp', 'w') as out:
        out.write(str(n))
    os.replace(sys.argv[1] + '.tmp', sys.argv[1])
    time.sleep(0.1)
";

/// The client's count of answered pings (0 before the first).
fn pings(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the client has had `n` more answers than `from`, on its one connection.
async fn pinged(path: &std::path::Path, from: u64, n: u64) -> u64 {
    until(&format!("{} answers past {from}", n), WAIT, async || {
        let now = pings(path);
        if now >= from + n {
            Ok(now)
        } else {
            Err(format!("{now} answers"))
        }
    })
    .await
}

/// The path `/services` shows for the connector node `node` of the `echo` service, once it
/// satisfies `ok`.
async fn echo_path(
    bed: &Bed,
    node: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    until(&format!("the path from {node} to echo"), WAIT, async || {
        let services = bed.api.services().await?;
        let path = services
            .as_array()
            .and_then(|l| l.iter().find(|s| s["name"] == "echo"))
            .and_then(|s| s["paths"].as_array())
            .and_then(|p| p.iter().find(|p| p["node_id"] == node))
            .cloned();
        match path {
            Some(p) if ok(&p) => Ok(p),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// The seed's learner/agent pattern across two NATs: the server binds `echo` in pod 0 (behind
/// the first NAT), `connects` from pod 1 (behind the second) make the pair wanted; returns the
/// file the client counts its answers in.
async fn learner_and_agent(bed: &Bed) -> (String, std::path::PathBuf) {
    online(bed, "n0").await;
    online(bed, "n1").await;
    echo_server(bed).await;
    echo_client(bed).await
}

/// The `echo` server (binds it) in pod 0.
async fn echo_server(bed: &Bed) -> String {
    bed.api
        .deploy_spec(
            "echo-server",
            json!({"config": {"command": ["python3", "-c", ECHO_SERVER]},
                   "binds": ["echo"], "node_group": "n0"}),
        )
        .await
}

/// The counting client (connects to `echo`) in pod 1; returns it and its count file.
async fn echo_client(bed: &Bed) -> (String, std::path::PathBuf) {
    let count = std::env::temp_dir().join(format!("symphony-mesh-{}", token()));
    let client = bed
        .api
        .deploy_spec(
            "echo-client",
            json!({"config": {"command": ["python3", "-c", ECHO_CLIENT, count.to_str().unwrap()]},
                   "connects": ["echo"], "node_group": "n1", "restart_policy": "never"}),
        )
        .await;
    (client, count)
}

#[test]
fn mesh_pods_behind_two_port_preserving_nats_talk_directly() {
    let params = Params {
        pods: 2,
        nat: Nat::PortPreserving,
        second_nat: Some(Nat::PortPreserving),
        ..Params::default()
    };
    scenario("mesh-direct", params, async |bed: &mut Bed| {
        // A connector placed first makes the pair wanted; the client that counts starts once
        // the direct path is up, so its one connection rides it.
        online(bed, "n0").await;
        online(bed, "n1").await;
        echo_server(bed).await;
        bed.api
            .deploy_spec(
                "wants-echo",
                json!({"config": {"command": ["sleep", token()]},
                       "connects": ["echo"], "node_group": "n1"}),
            )
            .await;
        let path = echo_path(bed, "n1", |p| p["path"] == "direct").await;
        let (_, count) = echo_client(bed).await;
        let first = pinged(&count, 0, 5).await;
        // Without the conductor there is no relay: only the direct path carries these. It
        // dies without a word (kill -9), and the pings go on past two keep-alive periods
        // (10 s), when a node whose conductor is silent would move its socket.
        bed.kill9("conductor");
        let without = pinged(&count, first, 150).await;
        bed.start_conductor().await;
        let again = echo_path(bed, "n1", |p| p["path"] == "direct").await;
        let after = pinged(&count, without, 5).await;
        let _ = std::fs::remove_file(&count);
        say(&format!(
            "mesh-direct: n1 (NAT 2) -> n0 (NAT 1) direct, rtt {} ms; {first} answers, \
             {without} with the conductor stopped, {after} after it came back (rtt {} ms), \
             on one connection",
            path["rtt_ms"], again["rtt_ms"]
        ));
    });
}

#[test]
fn mesh_falls_back_to_the_relay_behind_a_symmetric_nat_and_survives_address_changes() {
    let params = Params {
        pods: 2,
        nat: Nat::PortPreserving,
        second_nat: Some(Nat::Random),
        ..Params::default()
    };
    scenario("mesh-relay", params, async |bed: &mut Bed| {
        let (client, count) = learner_and_agent(bed).await;
        let first = pinged(&count, 0, 5).await;
        // The direct attempt fails (NAT 2 maps each destination to a new port): relay.
        let path = echo_path(bed, "n1", |p| {
            p["path"] == "relay" && p["direct_error"].is_string()
        })
        .await;
        // The same connection carries on across a NAT state flush and a new pod address of
        // the client's pod (its node's connection migrates; the tunnel rides it).
        bed.flush_conntrack();
        let after_flush = pinged(&count, first, 10).await;
        let new_ip = bed.change_pod_ip(1);
        let after_move = pinged(&count, after_flush, 10).await;
        let d = bed.api.deployment(&client).await.unwrap();
        assert_eq!(d.state.as_deref(), Some("RUNNING"), "{d:?}");
        let _ = std::fs::remove_file(&count);
        say(&format!(
            "mesh-relay: direct refused ({}); {first} answers relayed n1 -> conductor -> n0, \
             {after_flush} after a conntrack flush, {after_move} after n1 moved to {new_ip}, \
             on one connection",
            path["direct_error"]
        ));
    });
}

#[test]
fn experiment_rl_example_runs_across_two_nated_pods() {
    let params = Params {
        pods: 2,
        nat: Nat::PortPreserving,
        second_nat: Some(Nat::PortPreserving),
        ..Params::default()
    };
    scenario("experiment-rl", params, async |bed: &mut Bed| {
        online(bed, "n0").await;
        online(bed, "n1").await;
        // The learner in pod 0 (behind NAT 1), the agents in pod 1 (behind NAT 2): every
        // round trip crosses both NATs, as written for the seed (SYMPH_* only).
        let agents = 3;
        let decl = json!({"name": "rl", "placement": "gang", "processes": [
            {"name": "learner", "node_group": "n0",
             "binds": ["replay-server", "parameter-server"],
             "config": {"command": ["python3", "-c", rl_example::LEARNER]}},
            {"name": "agent", "replicas": agents, "node_group": "n1", "restart_policy": "never",
             "connects": ["replay-server", "parameter-server"],
             "config": {"command": ["python3", "-c", rl_example::AGENT]}},
        ]});
        bed.api.launch(&decl).await;
        let e = until("every agent's round trips", WAIT, async || {
            let e = bed.api.experiment("rl").await?;
            let done = e["processes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["current_state"] == "EXITED")
                .count();
            if done == agents {
                Ok(e)
            } else {
                Err(format!("{done} agents done: {e}"))
            }
        })
        .await;
        for p in e["processes"].as_array().unwrap() {
            if p["name"] == "learner" {
                assert_eq!(p["node_id"], "n0", "{e}");
            } else {
                assert_eq!(
                    (&p["node_id"], &p["last_exit_code"]),
                    (&json!("n1"), &json!(0)),
                    "{e}"
                );
            }
        }
        let paths = bed.api.services().await.unwrap();
        // `symphony p` from outside shows every process; `symphony d` removes them all.
        let cli = async |args: &[&str]| {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_symphony"))
                .args(args)
                .args(["--api", bed.api.base()])
                .env("SYMPHONY_TOKEN", bed.api.token())
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let table = cli(&["p", "rl"]).await;
        assert_eq!(table.lines().count(), 1 + 1 + agents, "{table}");
        // Logs shipped from behind NAT 2, by EXP/PROC.
        let logs = cli(&["logs", "rl/agent-1", "--tail", "5"]).await;
        assert!(logs.contains("round trip ok 1 of 3"), "{logs}");
        assert_eq!(cli(&["d", "rl", "--yes"]).await.trim(), "deleted rl");
        until("the experiment's deployments gone", WAIT, async || {
            let list = bed.api.deployments().await?;
            if list.as_array().is_some_and(Vec::is_empty) {
                Ok(())
            } else {
                Err(format!("{list}"))
            }
        })
        .await;
        let learner_pids = || {
            bed::ns_pids(&bed.pods[0].ns)
                .into_iter()
                .filter(|p| {
                    bed::cmdline(*p)
                        .is_some_and(|c| c.iter().any(|a| a.contains("parameter-server")))
                })
                .count()
        };
        until("the learner stopped", WAIT, async || match learner_pids() {
            0 => Ok(()),
            n => Err(format!("{n} learner processes")),
        })
        .await;
        say(&format!(
            "experiment-rl: learner behind NAT 1, {agents} agents behind NAT 2, every round \
             trip through SYMPH_* answered; paths {}; `symphony d` removed it all",
            paths
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| format!("{} {}", s["name"], s["paths"]))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    });
}

/// The fault suite's NAT variant (`tests/it/chaos.rs` is the loopback one): two pods behind the
/// NAT, deployments created, stopped, started and deleted while a seeded nemesis flushes the
/// NAT's mappings, cuts a pod's link briefly, kills an agent or the conductor with -9 and
/// starts it again. Every fault is shorter than the grace, so after every step no deployment
/// may run twice; once the faults stop, each wanted one runs in exactly one copy and nothing
/// else runs. `SYMPHONY_CHAOS_SEED` replays another seed.
#[test]
fn chaos_behind_the_nat_never_runs_a_deployment_twice() {
    use rand::{Rng, SeedableRng};
    let params = Params {
        pods: 2,
        ..short_idle()
    };
    scenario("chaos-nat", params, async |bed: &mut Bed| {
        let seed: u64 = std::env::var("SYMPHONY_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_261_203);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut log = vec![format!("seed {seed}")];
        for n in ["n0", "n1"] {
            online(bed, n).await;
        }
        // (id, token, wanted running)
        let mut live: Vec<(String, String, bool)> = Vec::new();
        let mut deleted: Vec<String> = Vec::new();
        let mut faults = 0;
        for step in 0..12 {
            let pick = rng.random_range(0..10);
            if live.len() < 3 || (pick < 3 && live.len() < 6) {
                let tok = token();
                let id = bed.api.deploy(&format!("c{step}"), &tok).await;
                log.push(format!("{step}: create {id}"));
                live.push((id, tok, true));
            } else if pick < 8 {
                let k = rng.random_range(0..live.len());
                live[k].2 = !live[k].2;
                let state = if live[k].2 { "RUNNING" } else { "STOPPED" };
                log.push(format!("{step}: set {} {state}", live[k].0));
                bed.api
                    .patch(&live[k].0, json!({"desired_state": state}))
                    .await;
            } else {
                let k = rng.random_range(0..live.len());
                let (id, tok, _) = live.remove(k);
                log.push(format!("{step}: delete {id}"));
                let status = reqwest::Client::new()
                    .delete(format!("{}/deployments/{id}", bed.api.base()))
                    .bearer_auth(bed.api.token())
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert!(status.is_success(), "DELETE {id}: {status}");
                deleted.push(tok);
            }
            let pod = rng.random_range(0..2);
            faults += 1;
            match rng.random_range(0..4) {
                0 => {
                    log.push(format!("{step}: nemesis: conntrack -F"));
                    bed.flush_conntrack();
                }
                1 => {
                    let ms = rng.random_range(300..1500);
                    log.push(format!("{step}: nemesis: cut pod {pod} for {ms} ms"));
                    bed.cut(pod);
                    // Deliberate: the fault is a cut of this length.
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    bed.restore(pod);
                }
                2 => {
                    log.push(format!("{step}: nemesis: kill -9 n{pod}, start it again"));
                    bed.kill9(&format!("n{pod}"));
                    bed.start_node(pod);
                }
                _ => {
                    log.push(format!(
                        "{step}: nemesis: kill -9 the conductor, start it again"
                    ));
                    bed.kill9("conductor");
                    bed.start_conductor().await;
                }
            }
            for (id, tok, _) in &live {
                let c = copies(bed, tok);
                assert!(c.len() <= 1, "{id} runs twice: {c:?}\n{}", log.join("\n"));
            }
        }
        // Faults stop: every wanted deployment runs once, nothing else runs.
        for (id, tok, wanted) in &live {
            if *wanted {
                running(bed, id, tok).await;
            }
            until(&format!("{id}: its copies settle"), WAIT, async || {
                let c = copies(bed, tok);
                if c.len() == usize::from(*wanted) {
                    Ok(())
                } else {
                    Err(format!("{c:?}"))
                }
            })
            .await;
        }
        for tok in &deleted {
            until("a deleted deployment's copy is gone", WAIT, async || {
                let c = copies(bed, tok);
                if c.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{c:?}"))
                }
            })
            .await;
        }
        say(&format!(
            "chaos-nat: seed {seed}, 12 steps, {faults} faults, {} live, {} deleted: no deployment ran twice",
            live.len(),
            deleted.len()
        ));
    });
}
