//! Data-driven tests of the pure scheduler: fixtures are built with small builders, and a
//! plan is rendered as text (one line per decision) so each case reads as a table row.

#![allow(clippy::unwrap_used)]

use super::*;

// ---------- fixture builders ----------

fn node(id: &str) -> NodeView {
    NodeView {
        id: id.to_owned(),
        groups: Vec::new(),
        capacities_total: BTreeMap::new(),
        conda_envs: BTreeSet::new(),
        state: NodeState::Online,
    }
}

trait NodeExt {
    fn group(self, g: &str) -> Self;
    fn cap(self, class: &str, total: i64) -> Self;
    fn env(self, e: &str) -> Self;
    fn state(self, s: NodeState) -> Self;
}

impl NodeExt for NodeView {
    fn group(mut self, g: &str) -> Self {
        self.groups.push(g.to_owned());
        self
    }
    fn cap(mut self, class: &str, total: i64) -> Self {
        self.capacities_total.insert(class.to_owned(), total);
        self
    }
    fn env(mut self, e: &str) -> Self {
        self.conda_envs.insert(e.to_owned());
        self
    }
    fn state(mut self, s: NodeState) -> Self {
        self.state = s;
        self
    }
}

/// A desired-RUNNING, unassigned deployment created at `t`.
fn dep(id: &str, t: u64) -> DeploymentView {
    DeploymentView {
        id: id.to_owned(),
        created_at_ms: t,
        desired_running: true,
        node_group: None,
        capacity_requests: BTreeMap::new(),
        env_name: None,
        assignment: None,
        colocate: None,
        gang: None,
    }
}

trait DepExt {
    fn req(self, class: &str, amount: i64) -> Self;
    fn group(self, g: &str) -> Self;
    fn env(self, e: &str) -> Self;
    fn stopped(self) -> Self;
    fn on(self, node: &str, generation: u64) -> Self;
    fn colocate(self, key: &str) -> Self;
    fn gang(self, key: &str) -> Self;
}

impl DepExt for DeploymentView {
    fn req(mut self, class: &str, amount: i64) -> Self {
        self.capacity_requests.insert(class.to_owned(), amount);
        self
    }
    fn group(mut self, g: &str) -> Self {
        self.node_group = Some(g.to_owned());
        self
    }
    fn env(mut self, e: &str) -> Self {
        self.env_name = Some(e.to_owned());
        self
    }
    fn stopped(mut self) -> Self {
        self.desired_running = false;
        self
    }
    fn colocate(mut self, key: &str) -> Self {
        self.colocate = Some(key.to_owned());
        self
    }
    fn gang(mut self, key: &str) -> Self {
        self.gang = Some(key.to_owned());
        self
    }
    fn on(mut self, node: &str, generation: u64) -> Self {
        self.assignment = Some(Assignment {
            node_id: node.to_owned(),
            generation: Generation(generation),
        });
        self
    }
}

/// Renders a plan as text, one decision per line, in plan order.
fn render(p: &Plan) -> String {
    let mut out = Vec::new();
    for (d, a) in &p.unassign {
        out.push(format!("{d} released {}@{}", a.node_id, a.generation));
    }
    for pl in &p.placements {
        out.push(format!(
            "{} -> {}@{}",
            pl.deployment_id, pl.node_id, pl.generation
        ));
    }
    for (d, why) in &p.unplaced {
        out.push(format!("{d}: {why}"));
    }
    out.push(format!("next {}", p.next_generation));
    out.join("\n")
}

/// Plans with generation counter 100 and renders the result.
fn check(nodes: &[NodeView], deps: &[DeploymentView], strategy: Strategy) -> String {
    render(&plan(nodes, deps, Generation(100), strategy))
}

/// Applies a plan to the deployments, as the conductor would.
fn apply(deps: &[DeploymentView], p: &Plan) -> Vec<DeploymentView> {
    let mut out = deps.to_vec();
    for (id, _) in &p.unassign {
        for d in out.iter_mut().filter(|d| &d.id == id) {
            d.assignment = None;
        }
    }
    for pl in &p.placements {
        for d in out.iter_mut().filter(|d| d.id == pl.deployment_id) {
            d.assignment = Some(Assignment {
                node_id: pl.node_id.clone(),
                generation: pl.generation,
            });
        }
    }
    out
}

struct Case {
    name: &'static str,
    nodes: Vec<NodeView>,
    deps: Vec<DeploymentView>,
    strategy: Strategy,
    expect: &'static str,
}

fn run_cases(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in cases {
        let got = check(&c.nodes, &c.deps, c.strategy);
        if got != c.expect {
            failures.push(format!(
                "case {:?}\n--- expected\n{}\n--- got\n{}",
                c.name, c.expect, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

use NodeState::{Lost, Online, Suspect};
use Strategy::{Binpack, Spread};

// ---------- filter: groups, envs, nodes ----------

#[test]
fn groups_envs_and_no_node() {
    run_cases(vec![
        Case {
            name: "group matches only the node that has it",
            nodes: vec![node("a").group("cpu"), node("b").group("gpu").group("x")],
            deps: vec![dep("d1", 1).group("gpu")],
            strategy: Spread,
            expect: "d1 -> b@100\nnext 101",
        },
        Case {
            name: "unknown group -> No Group",
            nodes: vec![node("a").group("cpu")],
            deps: vec![dep("d1", 1).group("gpu")],
            strategy: Spread,
            expect: "d1: No Group\nnext 100",
        },
        Case {
            name: "group only on a suspect node -> No Group",
            nodes: vec![
                node("a").group("cpu"),
                node("b").group("gpu").state(Suspect),
            ],
            deps: vec![dep("d1", 1).group("gpu")],
            strategy: Spread,
            expect: "d1: No Group\nnext 100",
        },
        Case {
            name: "no group requested (or empty) -> any node",
            nodes: vec![node("a").group("cpu")],
            deps: vec![dep("d1", 1), dep("d2", 2).group("")],
            strategy: Binpack,
            expect: "d1 -> a@100\nd2 -> a@101\nnext 102",
        },
        Case {
            name: "env filter picks the node that reports it",
            nodes: vec![node("a").env("py310"), node("b").env("py311").env("torch")],
            deps: vec![dep("d1", 1).env("torch")],
            strategy: Spread,
            expect: "d1 -> b@100\nnext 101",
        },
        Case {
            name: "env only outside the group -> No Env",
            nodes: vec![node("a").group("g"), node("b").env("torch")],
            deps: vec![dep("d1", 1).group("g").env("torch")],
            strategy: Spread,
            expect: "d1: No Env\nnext 100",
        },
        Case {
            name: "group checked before env, env before capacity",
            nodes: vec![node("a").group("g").cap("A", 1)],
            deps: vec![
                dep("d1", 1).group("h").env("nope").req("A", 9),
                dep("d2", 2).group("g").env("nope").req("A", 9),
                dep("d3", 3).group("g").req("A", 9),
            ],
            strategy: Spread,
            expect: "d1: No Group\nd2: No Env\nd3: No Capacity\nnext 100",
        },
        Case {
            name: "no nodes at all -> No Node",
            nodes: vec![],
            deps: vec![dep("d1", 1), dep("d2", 2).group("g")],
            strategy: Spread,
            expect: "d1: No Node\nd2: No Node\nnext 100",
        },
        Case {
            name: "only suspect and lost nodes -> No Node",
            nodes: vec![node("a").state(Suspect), node("b").state(Lost)],
            deps: vec![dep("d1", 1).group("g")],
            strategy: Spread,
            expect: "d1: No Node\nnext 100",
        },
    ]);
}

// ---------- capacity ----------

#[test]
fn capacity_reservation() {
    run_cases(vec![
        Case {
            name: "exact fit",
            nodes: vec![node("a").cap("A", 3).cap("B", 2)],
            deps: vec![dep("d1", 1).req("A", 3).req("B", 2)],
            strategy: Spread,
            expect: "d1 -> a@100\nnext 101",
        },
        Case {
            name: "one over -> No Capacity",
            nodes: vec![node("a").cap("A", 3)],
            deps: vec![dep("d1", 1).req("A", 4)],
            strategy: Spread,
            expect: "d1: No Capacity\nnext 100",
        },
        Case {
            name: "four A:1 on A=3: three placed, the newest refused (B23)",
            nodes: vec![node("a").cap("A", 3)],
            deps: vec![
                dep("d1", 1).req("A", 1),
                dep("d2", 2).req("A", 1),
                dep("d3", 3).req("A", 1),
                dep("d4", 4).req("A", 1),
            ],
            strategy: Spread,
            expect: "d1 -> a@100\nd2 -> a@101\nd3 -> a@102\nd4: No Capacity\nnext 103",
        },
        Case {
            name: "existing running assignment holds capacity",
            nodes: vec![node("a").cap("A", 3)],
            deps: vec![
                dep("old", 1).req("A", 2).on("a", 7),
                dep("d1", 2).req("A", 2),
            ],
            strategy: Spread,
            expect: "d1: No Capacity\nnext 100",
        },
        Case {
            name: "STOPPED assignment keeps its node but holds nothing",
            nodes: vec![node("a").cap("A", 3)],
            deps: vec![
                dep("old", 1).req("A", 3).on("a", 7).stopped(),
                dep("d1", 2).req("A", 3),
            ],
            strategy: Spread,
            expect: "d1 -> a@100\nnext 101",
        },
        Case {
            name: "STOPPED unassigned is neither placed nor unplaced",
            nodes: vec![],
            deps: vec![dep("s", 1).req("A", 1).stopped()],
            strategy: Spread,
            expect: "next 100",
        },
        Case {
            name: "missing class counts as 0; request 0 or negative always fits",
            nodes: vec![node("a").cap("A", 1)],
            deps: vec![
                dep("d1", 1).req("GPU", 1),
                dep("d2", 2).req("GPU", 0),
                dep("d3", 3).req("A", -5),
                dep("d4", 4).req("A", 1),
            ],
            strategy: Spread,
            expect: "d2 -> a@100\nd3 -> a@101\nd4 -> a@102\nd1: No Capacity\nnext 103",
        },
        Case {
            name: "request 0 fits even on an over-committed node",
            nodes: vec![node("a").cap("A", 1)],
            deps: vec![
                dep("big", 1).req("A", 5).on("a", 1),
                dep("d1", 2).req("A", 0),
            ],
            strategy: Spread,
            expect: "d1 -> a@100\nnext 101",
        },
        Case {
            name: "capacity falls through to another node",
            nodes: vec![node("a").cap("A", 2), node("b").cap("A", 2)],
            deps: vec![
                dep("d1", 1).req("A", 2),
                dep("d2", 2).req("A", 2),
                dep("d3", 3).req("A", 1),
            ],
            strategy: Binpack,
            expect: "d1 -> a@100\nd2 -> b@101\nd3: No Capacity\nnext 102",
        },
    ]);
}

// ---------- scoring ----------

#[test]
fn spread_and_binpack_choices() {
    // a: A=4 with 1 reserved (0.25); b: A=8 with 4 reserved (0.5).
    let nodes = vec![node("a").cap("A", 4), node("b").cap("A", 8)];
    let base = vec![
        dep("x", 1).req("A", 1).on("a", 1),
        dep("y", 2).req("A", 4).on("b", 2),
    ];
    let mut deps = base.clone();
    deps.push(dep("d1", 3).req("A", 1));
    // after: a 0.5, b 0.625
    assert_eq!(check(&nodes, &deps, Spread), "d1 -> a@100\nnext 101");
    assert_eq!(check(&nodes, &deps, Binpack), "d1 -> b@100\nnext 101");

    run_cases(vec![
        Case {
            name: "spread compares load AFTER placement",
            // a: A=2 empty (after: 1.0); b: A=10 with 1 reserved (after: 0.3)
            nodes: vec![node("a").cap("A", 2), node("b").cap("A", 10)],
            deps: vec![dep("x", 1).req("A", 1).on("b", 1), dep("d1", 2).req("A", 2)],
            strategy: Spread,
            expect: "d1 -> b@100\nnext 101",
        },
        Case {
            name: "load is the max over classes",
            // a: A 0/10, B 9/10 -> 0.9+; b: A 5/10, B 0/10 -> 0.5+
            nodes: vec![
                node("a").cap("A", 10).cap("B", 10),
                node("b").cap("A", 10).cap("B", 10),
            ],
            deps: vec![
                dep("x", 1).req("B", 9).on("a", 1),
                dep("y", 2).req("A", 5).on("b", 2),
                dep("d1", 3).req("A", 1),
            ],
            strategy: Spread,
            expect: "d1 -> b@100\nnext 101",
        },
        Case {
            name: "spread alternates across equal nodes",
            nodes: vec![node("a").cap("A", 4), node("b").cap("A", 4)],
            deps: vec![
                dep("d1", 1).req("A", 1),
                dep("d2", 2).req("A", 1),
                dep("d3", 3).req("A", 1),
            ],
            strategy: Spread,
            expect: "d1 -> a@100\nd2 -> b@101\nd3 -> a@102\nnext 103",
        },
        Case {
            name: "binpack fills one node first",
            nodes: vec![node("a").cap("A", 4), node("b").cap("A", 4)],
            deps: vec![
                dep("d1", 1).req("A", 1),
                dep("d2", 2).req("A", 1),
                dep("d3", 3).req("A", 1),
            ],
            strategy: Binpack,
            expect: "d1 -> a@100\nd2 -> a@101\nd3 -> a@102\nnext 103",
        },
        Case {
            name: "binpack skips the fullest node when it does not fit",
            nodes: vec![node("a").cap("A", 4), node("b").cap("A", 4)],
            deps: vec![dep("x", 1).req("A", 3).on("b", 1), dep("d1", 2).req("A", 2)],
            strategy: Binpack,
            expect: "d1 -> a@100\nnext 101",
        },
        Case {
            name: "spread ties on load broken by fewest deployments, then id",
            // no capacities: every load is 0
            nodes: vec![node("c"), node("a"), node("b")],
            deps: vec![
                dep("x", 1).on("a", 1),
                dep("s", 2).on("b", 2).stopped(), // stopped does not count
                dep("d1", 3),
                dep("d2", 4),
                dep("d3", 5),
            ],
            strategy: Spread,
            expect: "d1 -> b@100\nd2 -> c@101\nd3 -> a@102\nnext 103",
        },
    ]);
}

#[test]
fn deterministic_regardless_of_input_order() {
    let nodes = vec![
        node("n3").cap("A", 4).group("g"),
        node("n1").cap("A", 4).group("g"),
        node("n2").cap("A", 4).group("g"),
    ];
    let deps: Vec<DeploymentView> = (0..9)
        .map(|i| dep(&format!("d{i}"), 10 + (i % 3)).req("A", 1).group("g"))
        .collect();
    for strategy in [Spread, Binpack] {
        let first = plan(&nodes, &deps, Generation(1), strategy);
        let mut rn = nodes.clone();
        rn.reverse();
        let mut rd = deps.clone();
        rd.reverse();
        rd.rotate_left(4);
        assert_eq!(plan(&rn, &rd, Generation(1), strategy), first, "{strategy}");
        assert_eq!(
            plan(&nodes, &deps, Generation(1), strategy),
            first,
            "{strategy}"
        );
    }
    // Equal nodes, equal loads: the lowest id wins.
    assert_eq!(check(&nodes, &deps[..1], Spread), "d0 -> n1@100\nnext 101");
    assert_eq!(check(&nodes, &deps[..1], Binpack), "d0 -> n1@100\nnext 101");
}

#[test]
fn oldest_first_order() {
    run_cases(vec![
        Case {
            name: "older deployment wins the last slot even if listed last",
            nodes: vec![node("a").cap("A", 1)],
            deps: vec![dep("new", 20).req("A", 1), dep("old", 10).req("A", 1)],
            strategy: Spread,
            expect: "old -> a@100\nnew: No Capacity\nnext 101",
        },
        Case {
            name: "same creation time: by id",
            nodes: vec![node("a").cap("A", 1)],
            deps: vec![dep("zz", 10).req("A", 1), dep("aa", 10).req("A", 1)],
            strategy: Spread,
            expect: "aa -> a@100\nzz: No Capacity\nnext 101",
        },
        Case {
            name: "generations follow processing order",
            nodes: vec![node("a")],
            deps: vec![dep("c", 3), dep("a", 1), dep("b", 2)],
            strategy: Spread,
            expect: "a -> a@100\nb -> a@101\nc -> a@102\nnext 103",
        },
    ]);
}

// ---------- liveness and rescheduling ----------

#[test]
fn lost_and_suspect_nodes() {
    run_cases(vec![
        Case {
            name: "lost node: released and re-placed under new generations",
            nodes: vec![node("dead").cap("A", 4).state(Lost), node("b").cap("A", 4)],
            deps: vec![
                dep("d1", 1).req("A", 2).on("dead", 40),
                dep("d2", 2).req("A", 2).on("dead", 41),
                dep("d3", 3).req("A", 1),
            ],
            strategy: Spread,
            expect: "d1 released dead@40\nd2 released dead@41\nd1 -> b@100\nd2 -> b@101\n\
                     d3: No Capacity\nnext 102",
        },
        Case {
            name: "lost node with nowhere to go: released and unplaced",
            nodes: vec![node("dead").state(Lost)],
            deps: vec![dep("d1", 1).on("dead", 40)],
            strategy: Spread,
            expect: "d1 released dead@40\nd1: No Node\nnext 100",
        },
        Case {
            name: "unknown node counts as lost",
            nodes: vec![node("b")],
            deps: vec![dep("d1", 1).on("gone", 40)],
            strategy: Spread,
            expect: "d1 released gone@40\nd1 -> b@100\nnext 101",
        },
        Case {
            name: "stopped deployment on a lost node: released, not placed",
            nodes: vec![node("dead").state(Lost), node("b")],
            deps: vec![dep("d1", 1).on("dead", 40).stopped()],
            strategy: Spread,
            expect: "d1 released dead@40\nnext 100",
        },
        Case {
            name: "suspect keeps its assignments and their capacity, gets no new ones",
            nodes: vec![node("s").cap("A", 4).state(Suspect), node("b").cap("A", 1)],
            deps: vec![
                dep("d1", 1).req("A", 1).on("s", 40),
                dep("d2", 2).req("A", 1),
                dep("d3", 3).req("A", 1),
            ],
            strategy: Binpack,
            expect: "d2 -> b@100\nd3: No Capacity\nnext 101",
        },
        Case {
            name: "online assignments are never moved, even if the node no longer fits",
            nodes: vec![
                node("a").cap("A", 1).group("g"),
                node("b").cap("A", 9).group("h"),
            ],
            deps: vec![dep("d1", 1).req("A", 5).group("h").env("e").on("a", 40)],
            strategy: Spread,
            expect: "next 100",
        },
    ]);
}

#[test]
fn lost_replacement_gets_generation_above_the_old_one() {
    let nodes = vec![node("dead").state(Lost), node("b")];
    let deps = vec![dep("d1", 1).on("dead", 7)];
    // The conductor's counter is always past every generation it handed out.
    let p = plan(&nodes, &deps, Generation(8), Spread);
    assert_eq!(
        p.unassign,
        vec![(
            "d1".to_owned(),
            Assignment {
                node_id: "dead".into(),
                generation: Generation(7)
            }
        )]
    );
    assert_eq!(p.placements.len(), 1);
    assert!(p.placements[0].generation > Generation(7));
    assert_eq!(p.next_generation, Generation(9));
}

#[test]
fn liveness_transitions() {
    // suspect after 15 s of silence, lost 60 s after that.
    let (suspect, grace) = (15_000, 60_000);
    let seen = 1_000_000;
    let table: &[(u64, bool, NodeState)] = &[
        (0, true, Online),
        (14_999, true, Online),
        (15_000, true, Suspect),
        (74_999, true, Suspect),
        (75_000, true, Lost),
        (0, false, Suspect),
        (74_999, false, Suspect),
        (75_000, false, Lost),
        (10_000_000, false, Lost),
    ];
    for &(silence, connected, want) in table {
        assert_eq!(
            liveness(seen, connected, seen + silence, suspect, grace),
            want,
            "silence {silence} connected {connected}"
        );
    }
    // Clock went backwards: treated as just seen.
    assert_eq!(liveness(seen, true, seen - 5_000, suspect, grace), Online);
    // Huge thresholds saturate instead of overflowing.
    assert_eq!(liveness(0, true, 1_000, u64::MAX, u64::MAX), Online);
    assert_eq!(liveness(0, false, 1_000, 1, u64::MAX), Suspect);
    assert_eq!(liveness(0, true, u64::MAX, u64::MAX, 5), Lost);
}

// ---------- reserved and reasons ----------

#[test]
fn reserved_counts_live_running_assignments_only() {
    let nodes = vec![
        node("a").cap("A", 4),
        node("s").state(Suspect),
        node("dead").state(Lost),
    ];
    let deps = vec![
        dep("r1", 1).req("A", 1).req("B", 2).on("a", 1),
        dep("r2", 2).req("A", 2).req("Z", 0).on("a", 2),
        dep("stop", 3).req("A", 4).on("a", 3).stopped(),
        dep("neg", 4).req("A", -3).on("a", 4),
        dep("sus", 5).req("A", 1).on("s", 5),
        dep("lost", 6).req("A", 1).on("dead", 6),
        dep("free", 7).req("A", 1),
    ];
    let got = reserved(&nodes, &deps);
    let want: BTreeMap<String, BTreeMap<String, i64>> = [
        ("a", vec![("A", 3), ("B", 2)]),
        ("dead", vec![]),
        ("s", vec![("A", 1)]),
    ]
    .into_iter()
    .map(|(n, v)| {
        (
            n.to_owned(),
            v.into_iter().map(|(k, x)| (k.to_owned(), x)).collect(),
        )
    })
    .collect();
    assert_eq!(got, want);
}

#[test]
fn reasons_agree_with_plan_after_it_is_applied() {
    let nodes = vec![
        node("a").cap("A", 2).group("g").env("e"),
        node("b").cap("A", 1).group("g"),
        node("dead").cap("A", 9).group("g").state(Lost),
    ];
    let deps = vec![
        dep("d1", 1).req("A", 2).group("g").on("dead", 3),
        dep("d2", 2).req("A", 1).group("g"),
        dep("d3", 3).req("A", 1).group("g"),
        dep("d4", 4).group("h"),
        dep("d5", 5).group("g").env("x"),
        dep("d6", 6).stopped(),
    ];
    for strategy in [Spread, Binpack] {
        let p = plan(&nodes, &deps, Generation(100), strategy);
        assert_eq!(p.placements.len(), 2, "{strategy}: {}", render(&p));
        let after = apply(&deps, &p);
        let want: BTreeMap<String, Unplaced> = p.unplaced.iter().cloned().collect();
        assert_eq!(reasons(&nodes, &after, strategy), want, "{strategy}");
        for d in &deps {
            assert_eq!(
                reason_for(&nodes, &after, &d.id, strategy),
                want.get(&d.id).copied(),
                "{}",
                d.id
            );
        }
        // A second pass over the applied state changes nothing.
        let again = plan(&nodes, &after, p.next_generation, strategy);
        assert!(again.placements.is_empty() && again.unassign.is_empty());
        assert_eq!(again.unplaced, p.unplaced);
    }
    // Before the plan is applied, the lost-node deployment would fit: no reason.
    assert_eq!(reason_for(&nodes, &deps, "d1", Spread), None);
    assert_eq!(
        reason_for(&nodes, &deps, "d4", Spread),
        Some(Unplaced::NoGroup)
    );
    assert_eq!(reason_for(&nodes, &deps, "unknown", Spread), None);
}

// ---------- robustness ----------

#[test]
fn duplicate_ids_are_ignored() {
    let nodes = vec![node("a").cap("A", 1), node("a").cap("A", 100)];
    let deps = vec![
        dep("d1", 1).req("A", 1),
        dep("d1", 2).req("A", 1),
        dep("d2", 3).req("A", 1),
    ];
    assert_eq!(
        check(&nodes, &deps, Spread),
        "d1 -> a@100\nd2: No Capacity\nnext 101"
    );
}

#[test]
fn large_pass_never_overcommits_and_generations_increase() {
    let nodes: Vec<NodeView> = (0..200)
        .map(|i| {
            node(&format!("n{i:03}"))
                .cap("cpu", 8 + (i % 5))
                .cap("gpu", i % 3)
                .group(if i % 2 == 0 { "even" } else { "odd" })
                .state(if i % 17 == 0 {
                    Lost
                } else if i % 13 == 0 {
                    Suspect
                } else {
                    Online
                })
        })
        .collect();
    let deps: Vec<DeploymentView> = (0..3000)
        .map(|i| {
            let mut d = dep(&format!("d{i:05}"), (i * 7919 % 1000) as u64)
                .req("cpu", 1 + (i % 3) as i64)
                .req("gpu", (i % 4 == 0) as i64);
            if i % 5 == 0 {
                d = d.group("even");
            }
            if i % 11 == 0 {
                d = d.on(&format!("n{:03}", i % 200), i as u64);
            }
            d
        })
        .collect();
    for strategy in [Spread, Binpack] {
        let p = plan(&nodes, &deps, Generation(5_000), strategy);
        let gens: Vec<u64> = p.placements.iter().map(|pl| pl.generation.get()).collect();
        assert!(gens.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(p.next_generation.get(), 5_000 + gens.len() as u64);
        // Every running deployment is accounted for exactly once.
        let kept = deps
            .iter()
            .filter(|d| {
                d.assignment
                    .as_ref()
                    .is_some_and(|a| nodes.iter().any(|n| n.id == a.node_id && n.state != Lost))
            })
            .count();
        assert_eq!(kept + p.placements.len() + p.unplaced.len(), deps.len());
        assert!(!p.placements.is_empty() && !p.unplaced.is_empty());
        // New placements only on online nodes; nothing over-committed where the
        // pre-existing assignments did not already over-commit.
        let before = reserved(&nodes, &deps);
        let after = reserved(&nodes, &apply(&deps, &p));
        for n in &nodes {
            for (class, &held) in &after[&n.id] {
                let total = n.capacities_total.get(class).copied().unwrap_or(0);
                let prior = before[&n.id].get(class).copied().unwrap_or(0);
                assert!(held <= total.max(prior), "{strategy} {} {class}", n.id);
            }
        }
        for pl in &p.placements {
            let n = nodes.iter().find(|n| n.id == pl.node_id).unwrap();
            assert_eq!(n.state, Online);
        }
    }
}

#[test]
fn display_and_parse() {
    let shown: Vec<String> = [
        Unplaced::NoNode,
        Unplaced::NoGroup,
        Unplaced::NoEnv,
        Unplaced::NoCapacity,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    assert_eq!(shown, ["No Node", "No Group", "No Env", "No Capacity"]);
    assert_eq!(
        serde_json::to_string(&Unplaced::NoCapacity).unwrap(),
        "\"No Capacity\""
    );
    assert_eq!("Binpack".parse::<Strategy>().unwrap(), Binpack);
    assert_eq!(" spread ".parse::<Strategy>().unwrap(), Spread);
    assert_eq!(Strategy::default(), Spread);
    let err = "random".parse::<Strategy>().unwrap_err();
    assert!(err.to_string().contains("\"random\""));
    assert_eq!(
        serde_json::from_str::<Strategy>("\"binpack\"").unwrap(),
        Binpack
    );
}

#[test]
fn process_groups_share_a_node_or_wait_together() {
    run_cases(vec![
        Case {
            name: "a group goes where all of it fits, not where the first member would",
            nodes: vec![node("a").cap("A", 2), node("b").cap("A", 4)],
            deps: vec![
                dep("g1", 1).req("A", 2).colocate("x/g"),
                dep("g2", 1).req("A", 2).colocate("x/g"),
                dep("solo", 2).req("A", 1),
            ],
            strategy: Spread,
            expect: "g1 -> b@100\ng2 -> b@101\nsolo -> a@102\nnext 103",
        },
        Case {
            name: "a group that fits on no single node places none of it",
            nodes: vec![node("a").cap("A", 2), node("b").cap("A", 2)],
            deps: vec![
                dep("g1", 1).req("A", 2).colocate("x/g"),
                dep("g2", 1).req("A", 2).colocate("x/g"),
                dep("solo", 2).req("A", 2),
            ],
            strategy: Spread,
            expect: "solo -> a@100\ng1: No Capacity\ng2: No Capacity\nnext 101",
        },
        Case {
            name: "a member that runs pins the others to its node",
            nodes: vec![node("a").cap("A", 4), node("b").cap("A", 8)],
            deps: vec![
                dep("g1", 1).req("A", 1).colocate("x/g").on("a", 7),
                dep("g2", 2).req("A", 2).colocate("x/g"),
                dep("g3", 3).req("A", 2).colocate("x/g"),
            ],
            strategy: Spread,
            expect: "g2: No Capacity\ng3: No Capacity\nnext 100",
        },
        Case {
            name: "every member's node group and env must hold on the shared node",
            nodes: vec![
                node("a").group("gpu").env("torch"),
                node("b").group("gpu"),
                node("c").env("torch"),
            ],
            deps: vec![
                dep("g1", 1).group("gpu").colocate("x/g"),
                dep("g2", 1).env("torch").colocate("x/g"),
            ],
            strategy: Binpack,
            expect: "g1 -> a@100\ng2 -> a@101\nnext 102",
        },
        Case {
            name: "groups of different experiments are different groups",
            nodes: vec![node("a").cap("A", 2), node("b").cap("A", 2)],
            deps: vec![
                dep("x1", 1).req("A", 2).colocate("x/g"),
                dep("y1", 2).req("A", 2).colocate("y/g"),
            ],
            strategy: Spread,
            expect: "x1 -> a@100\ny1 -> b@101\nnext 102",
        },
    ]);
}

#[test]
fn a_gang_is_placed_whole_or_not_at_all() {
    let agents = |n: usize, t: u64| -> Vec<DeploymentView> {
        (0..n)
            .map(|i| dep(&format!("agent-{i}"), t).req("A", 1).gang("rl"))
            .collect()
    };
    let mut deps = vec![dep("learner", 1).req("A", 2).gang("rl").colocate("rl/t")];
    deps.extend(agents(3, 1));
    deps.push(dep("other", 2).req("A", 1));
    run_cases(vec![
        Case {
            name: "it fits: all in one pass",
            nodes: vec![node("a").cap("A", 3), node("b").cap("A", 3)],
            deps: deps.clone(),
            strategy: Spread,
            expect: "learner -> a@100\nagent-0 -> b@101\nagent-1 -> b@102\nagent-2 -> a@103\n\
                     other -> b@104\nnext 105",
        },
        Case {
            name: "one agent does not fit: nothing is placed, that one says why, \
                    and what comes after still gets the capacity",
            nodes: vec![node("a").cap("A", 2), node("b").cap("A", 2)],
            deps: deps.clone(),
            strategy: Spread,
            expect: "other -> a@100\nlearner: Waiting For Gang\nagent-0: Waiting For Gang\n\
                     agent-1: Waiting For Gang\nagent-2: No Capacity\nnext 101",
        },
    ]);
    // A node joins: the whole gang goes at once; the reasons agree with the plan.
    let nodes = vec![node("a").cap("A", 2), node("b").cap("A", 2)];
    let first = plan(&nodes, &deps, Generation(1), Spread);
    let deps = apply(&deps, &first);
    assert_eq!(
        reasons(&nodes, &deps, Spread).get("agent-2"),
        Some(&Unplaced::NoCapacity)
    );
    assert_eq!(
        reasons(&nodes, &deps, Spread).get("agent-0"),
        Some(&Unplaced::WaitingForGang)
    );
    let nodes = vec![
        node("a").cap("A", 2),
        node("b").cap("A", 2),
        node("c").cap("A", 2),
    ];
    let second = plan(&nodes, &deps, first.next_generation, Spread);
    assert_eq!(second.placements.len(), 4, "{}", render(&second));
    assert!(second.unplaced.is_empty());
    let deps = apply(&deps, &second);
    assert!(reasons(&nodes, &deps, Spread).is_empty());
    // One member's node is lost: only that member is placed again.
    let nodes = vec![
        node("a").cap("A", 2).state(NodeState::Lost),
        node("b").cap("A", 4),
        node("c").cap("A", 4),
    ];
    let third = plan(&nodes, &deps, second.next_generation, Spread);
    let moved: Vec<&str> = third.unassign.iter().map(|(id, _)| id.as_str()).collect();
    let placed: Vec<&str> = third
        .placements
        .iter()
        .map(|p| p.deployment_id.as_str())
        .collect();
    assert_eq!(moved, placed, "{}", render(&third));
    assert!(!moved.is_empty() && third.unplaced.is_empty());
}
