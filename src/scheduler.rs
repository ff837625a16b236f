//! Pure placement: which node runs which deployment, and why a deployment cannot be placed.
//!
//! This module owns the placement decision and nothing else. It does no IO, reads no clock
//! (time is a `u64` of unix milliseconds passed in), and knows nothing of the store or the
//! wire: the conductor converts its state into [`NodeView`]s and [`DeploymentView`]s, calls
//! [`plan`], persists the result and then tells the nodes.
//!
//! Invariants (each one fixes a bug of the original, see `original-symphony.md` section 20):
//! - Capacity is reserved from the conductor's own assignments, never from heartbeats, and a
//!   placement made earlier in a pass counts for the later ones: no over-commit (B23).
//! - Only desired-RUNNING deployments hold capacity or get placed; a STOPPED one keeps its
//!   assignment (its node keeps it stopped) but holds nothing (B19).
//! - Only [`NodeState::Online`] nodes receive new placements. Assignments on Online and
//!   Suspect nodes are never moved; only an assignment to a Lost (or unknown) node is released,
//!   and its deployment is re-placed under a fresh, strictly larger generation, so the node
//!   side can fence the old copy (B5, B21).
//! - `node_group` and `env_name` are honoured (B22, B24); the choice is deterministic spread
//!   or binpack by reserved load, never random (B25).
//! - Inputs are plain integers, so no single deployment can break a pass for the others;
//!   negative amounts are treated as 0 instead of handing capacity back (B8).
//!
//! Cost: O(D log D + N log N) to index, then O(candidate nodes x requested classes) per
//! unassigned deployment, so a full pass is at worst O(D x N) with small constants.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

pub use crate::model::Generation;

#[cfg(test)]
mod tests;

/// How to choose among the nodes a deployment fits on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The node with the lowest load after placement (the default).
    #[default]
    Spread,
    /// The node with the highest load after placement that still fits.
    Binpack,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Spread => "spread",
            Strategy::Binpack => "binpack",
        })
    }
}

/// The error of parsing a [`Strategy`] from text; holds the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownStrategy(pub String);

impl fmt::Display for UnknownStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown scheduling strategy {:?} (expected \"spread\" or \"binpack\")",
            self.0
        )
    }
}

impl std::error::Error for UnknownStrategy {}

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "spread" => Ok(Strategy::Spread),
            "binpack" => Ok(Strategy::Binpack),
            _ => Err(UnknownStrategy(s.to_owned())),
        }
    }
}

/// Liveness of a node as the scheduler sees it (see [`liveness`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Connected and heard from recently: receives new placements.
    Online,
    /// Disconnected or silent, but within the grace period: keeps its assignments, gets no
    /// new ones.
    Suspect,
    /// Silent past the grace period: its assignments are released and re-placed.
    Lost,
}

impl NodeState {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::Suspect => "suspect",
            NodeState::Lost => "lost",
        }
    }
}

/// A node, as the conductor converts it for one scheduling pass.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeView {
    /// Unique node id. With duplicates, the first in the input wins and the rest are ignored.
    pub id: String,
    /// Groups the node belongs to (matched against a deployment's `node_group`).
    pub groups: Vec<String>,
    /// Capacity class -> total amount. A class that is missing counts as 0.
    pub capacities_total: BTreeMap<String, i64>,
    /// Environment names the node reported (matched against a deployment's `env_name`).
    pub conda_envs: BTreeSet<String>,
    /// Liveness; only [`NodeState::Online`] nodes receive new placements.
    pub state: NodeState,
}

/// Where a deployment is assigned, under which fencing generation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    /// The node the deployment is assigned to.
    pub node_id: String,
    /// The generation of this assignment; a newer generation elsewhere fences this one.
    pub generation: Generation,
}

/// A deployment, as the conductor converts it for one scheduling pass.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeploymentView {
    /// Unique deployment id. With duplicates, the oldest (then first) wins.
    pub id: String,
    /// Creation time (unix ms): older deployments are placed first.
    pub created_at_ms: u64,
    /// `true` when the desired state is RUNNING.
    pub desired_running: bool,
    /// Only nodes with this group are eligible. `None` (or an empty string) = any node.
    pub node_group: Option<String>,
    /// Capacity class -> requested amount. 0, negative or an empty map always fits.
    pub capacity_requests: BTreeMap<String, i64>,
    /// Only nodes reporting this env are eligible. `None` (or an empty string) = any node.
    pub env_name: Option<String>,
    /// The conductor's current assignment, if any.
    pub assignment: Option<Assignment>,
    /// Deployments with the same key run on one node: they are placed together, in one pass,
    /// or not at all (an experiment's process group). A member that already runs pins the
    /// others to its node.
    pub colocate: Option<String>,
    /// Deployments with the same key are placed all in one pass or none (an experiment with
    /// `placement: gang`): a 16-actor job never runs with 9.
    pub gang: Option<String>,
}

/// Why a desired-RUNNING deployment has no node. Checked in this order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Unplaced {
    /// No node is online.
    #[serde(rename = "No Node")]
    NoNode,
    /// No online node has the requested group.
    #[serde(rename = "No Group")]
    NoGroup,
    /// None of the online nodes in the group reports the requested env.
    #[serde(rename = "No Env")]
    NoEnv,
    /// No eligible node has enough unreserved capacity.
    #[serde(rename = "No Capacity")]
    NoCapacity,
    /// It would fit, but another member of its gang does not (nothing of a gang is placed
    /// until all of it fits).
    #[serde(rename = "Waiting For Gang")]
    WaitingForGang,
}

impl fmt::Display for Unplaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unplaced::NoNode => "No Node",
            Unplaced::NoGroup => "No Group",
            Unplaced::NoEnv => "No Env",
            Unplaced::NoCapacity => "No Capacity",
            Unplaced::WaitingForGang => "Waiting For Gang",
        })
    }
}

/// A new assignment decided by [`plan`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// The deployment placed.
    pub deployment_id: String,
    /// The node it goes to.
    pub node_id: String,
    /// Its fresh generation (never reused).
    pub generation: Generation,
}

/// The outcome of one scheduling pass. All lists are in processing order (oldest first).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// New assignments, with strictly increasing generations.
    pub placements: Vec<Placement>,
    /// Released assignments (deployment id, old assignment): those on Lost or unknown nodes.
    pub unassign: Vec<(String, Assignment)>,
    /// Desired-RUNNING deployments left without a node, and why.
    pub unplaced: Vec<(String, Unplaced)>,
    /// The generation counter after this pass: persist it and pass it to the next [`plan`].
    pub next_generation: Generation,
}

/// Decides placements for every desired-RUNNING deployment without a live assignment.
///
/// `next_generation` is the first generation to hand out; each placement takes the next one.
/// Deterministic: the same inputs (in any order) give the same plan. A unit (a `gang`, or a
/// `colocate` group outside a gang) is decided when its oldest member needing a node comes up:
/// every member that needs one is placed in that step, or none is.
pub fn plan(
    nodes: &[NodeView],
    deployments: &[DeploymentView],
    next_generation: Generation,
    strategy: Strategy,
) -> Plan {
    let mut state = State::new(nodes, deployments);
    let mut out = Plan {
        next_generation,
        ..Plan::default()
    };
    let mut units_done: BTreeSet<(bool, &str)> = BTreeSet::new();
    for i in 0..state.order.len() {
        let dep = state.order[i];
        if let Some(a) = &dep.assignment {
            if state.live_slot(a).is_some() {
                continue;
            }
            out.unassign.push((dep.id.clone(), a.clone()));
        }
        if !dep.desired_running {
            continue;
        }
        let decided = match unit_of(dep) {
            None => vec![(dep, state.place(&[dep], None, strategy, None))],
            Some(unit) if units_done.insert(unit) => state.place_unit(unit, strategy),
            Some(_) => continue,
        };
        for (d, result) in decided {
            match result {
                Ok(slot) => {
                    out.placements.push(Placement {
                        deployment_id: d.id.clone(),
                        node_id: state.slots[slot].node.id.clone(),
                        generation: out.next_generation,
                    });
                    out.next_generation = out.next_generation.next();
                }
                Err(why) => out.unplaced.push((d.id.clone(), why)),
            }
        }
    }
    out
}

/// The unit a deployment is decided with: `(true, gang)` or `(false, colocate group)`.
fn unit_of(dep: &DeploymentView) -> Option<(bool, &str)> {
    match (filter_of(&dep.gang), filter_of(&dep.colocate)) {
        (Some(g), _) => Some((true, g)),
        (None, Some(c)) => Some((false, c)),
        (None, None) => None,
    }
}

/// Capacity held on each node by the current assignments of desired-RUNNING deployments.
///
/// Every node of `nodes` is present (a Lost node with an empty map: its assignments are
/// released); classes with nothing reserved are omitted.
pub fn reserved(
    nodes: &[NodeView],
    deployments: &[DeploymentView],
) -> BTreeMap<String, BTreeMap<String, i64>> {
    let state = State::new(nodes, deployments);
    state
        .slots
        .iter()
        .map(|s| {
            let held = s
                .reserved
                .iter()
                .filter(|&(_, &v)| v > 0)
                .map(|(&k, &v)| (k.to_owned(), v))
                .collect();
            (s.node.id.clone(), held)
        })
        .collect()
}

/// Why `deployment_id` has no node right now, given the current assignments.
///
/// `None` when it is unknown, desired STOPPED, assigned to an Online or Suspect node, or would
/// fit now (a pass would place it): the reasons are those of a fresh [`plan`] over the same
/// inputs, so after the conductor applies a plan they agree with that plan's `unplaced` list.
/// For many deployments use [`reasons`] (one pass).
pub fn reason_for(
    nodes: &[NodeView],
    deployments: &[DeploymentView],
    deployment_id: &str,
    strategy: Strategy,
) -> Option<Unplaced> {
    reasons(nodes, deployments, strategy).remove(deployment_id)
}

/// [`reason_for`] for every deployment at once: deployment id -> reason, only for those that
/// have one. `strategy` is the one the conductor plans with: whether a gang fits can depend on
/// where its first members go.
pub fn reasons(
    nodes: &[NodeView],
    deployments: &[DeploymentView],
    strategy: Strategy,
) -> BTreeMap<String, Unplaced> {
    plan(nodes, deployments, Generation(0), strategy)
        .unplaced
        .into_iter()
        .collect()
}

/// A node's liveness from its last contact.
///
/// `silence = now_ms - last_seen_ms` (0 if the clock went backwards).
/// - Lost when `silence >= suspect_after_ms + grace_ms`, whatever the connection says;
/// - otherwise Suspect when disconnected or `silence >= suspect_after_ms`;
/// - otherwise Online.
///
/// So `grace_ms` is the extra time a silent node keeps its assignments after it stops
/// receiving new ones.
pub fn liveness(
    last_seen_ms: u64,
    connected: bool,
    now_ms: u64,
    suspect_after_ms: u64,
    grace_ms: u64,
) -> NodeState {
    let silence = now_ms.saturating_sub(last_seen_ms);
    if silence >= suspect_after_ms.saturating_add(grace_ms) {
        NodeState::Lost
    } else if !connected || silence >= suspect_after_ms {
        NodeState::Suspect
    } else {
        NodeState::Online
    }
}

/// One node's running tally during a pass.
#[derive(Clone)]
struct Slot<'a> {
    node: &'a NodeView,
    /// Class -> amount reserved by live assignments and by placements made in this pass.
    reserved: BTreeMap<&'a str, i64>,
    /// Max over the node's classes with a positive total of reserved / total.
    load: f64,
    /// Desired-RUNNING deployments assigned here (including this pass).
    count: usize,
}

/// The node picked for a deployment.
#[derive(Debug, Clone, Copy)]
struct Choice {
    slot: usize,
    load_after: f64,
}

/// Indexed inputs of one pass.
struct State<'a> {
    /// Deduplicated nodes, sorted by id.
    slots: Vec<Slot<'a>>,
    by_id: BTreeMap<&'a str, usize>,
    /// Online slots, ascending id.
    online: Vec<usize>,
    /// Group -> online slots having it, ascending id.
    by_group: BTreeMap<&'a str, Vec<usize>>,
    /// Deduplicated deployments, oldest first (created_at_ms, then id).
    order: Vec<&'a DeploymentView>,
    /// Each unit's members (see [`unit_of`]), oldest first.
    units: BTreeMap<(bool, &'a str), Vec<&'a DeploymentView>>,
}

/// The summed positive requests of deployments placed together, by class.
fn sum_requests<'d>(deps: &[&'d DeploymentView]) -> Vec<(&'d str, i64)> {
    if let [one] = deps {
        return positive_requests(one).collect();
    }
    let mut sum: BTreeMap<&str, i64> = BTreeMap::new();
    for (class, amount) in deps.iter().flat_map(|d| positive_requests(d)) {
        let held = sum.entry(class).or_insert(0);
        *held = held.saturating_add(amount);
    }
    sum.into_iter().collect()
}

/// The positive requests of a deployment (0 and negative amounts always fit and hold nothing).
fn positive_requests(dep: &DeploymentView) -> impl Iterator<Item = (&str, i64)> {
    dep.capacity_requests
        .iter()
        .filter(|&(_, &v)| v > 0)
        .map(|(k, &v)| (k.as_str(), v))
}

/// An optional filter string, with the empty string meaning "no filter".
fn filter_of(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|s| !s.is_empty())
}

impl<'a> State<'a> {
    fn new(nodes: &'a [NodeView], deployments: &'a [DeploymentView]) -> Self {
        let mut sorted: Vec<&NodeView> = nodes.iter().collect();
        // Stable: among equal ids the first in the input stays first and survives dedup.
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        sorted.dedup_by(|b, a| a.id == b.id);
        let mut slots: Vec<Slot<'a>> = sorted
            .into_iter()
            .map(|node| Slot {
                node,
                reserved: BTreeMap::new(),
                load: 0.0,
                count: 0,
            })
            .collect();
        let by_id: BTreeMap<&str, usize> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.node.id.as_str(), i))
            .collect();
        let mut online = Vec::new();
        let mut by_group: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, s) in slots.iter().enumerate() {
            if s.node.state != NodeState::Online {
                continue;
            }
            online.push(i);
            let groups: BTreeSet<&str> = s.node.groups.iter().map(String::as_str).collect();
            for g in groups {
                by_group.entry(g).or_default().push(i);
            }
        }

        let mut order: Vec<&DeploymentView> = deployments.iter().collect();
        order.sort_by(|a, b| {
            (a.created_at_ms, a.id.as_str()).cmp(&(b.created_at_ms, b.id.as_str()))
        });
        let mut seen = BTreeSet::new();
        order.retain(|d| seen.insert(d.id.as_str()));

        for dep in &order {
            if !dep.desired_running {
                continue;
            }
            let Some(a) = &dep.assignment else { continue };
            let Some(&i) = by_id.get(a.node_id.as_str()) else {
                continue;
            };
            let slot = &mut slots[i];
            if slot.node.state == NodeState::Lost {
                continue;
            }
            for (class, amount) in positive_requests(dep) {
                let held = slot.reserved.entry(class).or_insert(0);
                *held = held.saturating_add(amount);
            }
            slot.count += 1;
        }
        for slot in &mut slots {
            slot.load = slot
                .node
                .capacities_total
                .iter()
                .filter(|&(_, &total)| total > 0)
                .map(|(class, &total)| {
                    let held = slot.reserved.get(class.as_str()).copied().unwrap_or(0);
                    held as f64 / total as f64
                })
                .fold(0.0, f64::max);
        }
        let mut units: BTreeMap<(bool, &str), Vec<&DeploymentView>> = BTreeMap::new();
        for dep in &order {
            if let Some(unit) = unit_of(dep) {
                units.entry(unit).or_default().push(dep);
            }
        }
        State {
            slots,
            by_id,
            online,
            by_group,
            order,
            units,
        }
    }

    /// The slot an assignment holds, if its node is known and not Lost.
    fn live_slot(&self, a: &Assignment) -> Option<usize> {
        let &i = self.by_id.get(a.node_id.as_str())?;
        (self.slots[i].node.state != NodeState::Lost).then_some(i)
    }

    /// The load of `slot` after adding `requests`, or `None` if they do not fit there.
    fn load_after(&self, slot: usize, requests: &[(&str, i64)]) -> Option<f64> {
        let s = &self.slots[slot];
        let mut load = s.load;
        for &(class, amount) in requests {
            let total = s.node.capacities_total.get(class).copied().unwrap_or(0);
            let held = s.reserved.get(class).copied().unwrap_or(0);
            if amount > total.saturating_sub(held) {
                return None;
            }
            // Here total >= amount > 0.
            load = load.max(held.saturating_add(amount) as f64 / total as f64);
        }
        Some(load)
    }

    /// Filter then score: the best node for `deps` all together (one node, the sum of their
    /// requests, every one's group and env), or the first reason there is none. `pinned`: the
    /// node they must go to (where a member of their group runs already).
    fn choose(
        &self,
        deps: &[&DeploymentView],
        pinned: Option<usize>,
        strategy: Strategy,
    ) -> Result<Choice, Unplaced> {
        if self.online.is_empty() {
            return Err(Unplaced::NoNode);
        }
        let pinned_slot;
        let candidates: &[usize] = match pinned {
            Some(p) if self.slots[p].node.state == NodeState::Online => {
                pinned_slot = [p];
                &pinned_slot
            }
            // Its group's node is away: the rest waits for it.
            Some(_) => return Err(Unplaced::NoNode),
            None => match deps.iter().find_map(|d| filter_of(&d.node_group)) {
                None => &self.online,
                Some(g) => self.by_group.get(g).map(Vec::as_slice).unwrap_or(&[]),
            },
        };
        let in_groups = |slot: usize| {
            deps.iter().all(|d| {
                filter_of(&d.node_group)
                    .is_none_or(|g| self.slots[slot].node.groups.iter().any(|n| n == g))
            })
        };
        let has_envs = |slot: usize| {
            deps.iter().all(|d| {
                filter_of(&d.env_name).is_none_or(|e| self.slots[slot].node.conda_envs.contains(e))
            })
        };
        let requests = sum_requests(deps);
        let mut grouped = false;
        let mut env_matched = false;
        let mut best: Option<Choice> = None;
        for &slot in candidates {
            if !in_groups(slot) {
                continue;
            }
            grouped = true;
            if !has_envs(slot) {
                continue;
            }
            env_matched = true;
            let Some(load_after) = self.load_after(slot, &requests) else {
                continue;
            };
            let candidate = Choice { slot, load_after };
            best = match best {
                Some(b) if !self.better(strategy, &candidate, &b) => Some(b),
                _ => Some(candidate),
            };
        }
        match best {
            Some(choice) => Ok(choice),
            None if !grouped => Err(Unplaced::NoGroup),
            None if !env_matched => Err(Unplaced::NoEnv),
            None => Err(Unplaced::NoCapacity),
        }
    }

    /// Chooses a node for `deps` together and reserves them there.
    /// `undo`: where to keep the chosen slot as it was before, once (a gang's undo log).
    fn place(
        &mut self,
        deps: &[&'a DeploymentView],
        pinned: Option<usize>,
        strategy: Strategy,
        undo: Option<&mut BTreeMap<usize, Slot<'a>>>,
    ) -> Result<usize, Unplaced> {
        let choice = self.choose(deps, pinned, strategy)?;
        if let Some(undo) = undo {
            undo.entry(choice.slot)
                .or_insert_with(|| self.slots[choice.slot].clone());
        }
        for dep in deps {
            self.commit(dep, choice);
        }
        Ok(choice.slot)
    }

    /// Decides every member of `unit` that needs a node: each colocate group on one node (the
    /// node of a member that runs, if one does), the rest one by one, the largest requests
    /// first. In a gang, one failure undoes the others' reservations and holds all of them
    /// back.
    #[allow(clippy::type_complexity)]
    fn place_unit(
        &mut self,
        unit: (bool, &str),
        strategy: Strategy,
    ) -> Vec<(&'a DeploymentView, Result<usize, Unplaced>)> {
        let members: &[&'a DeploymentView] = self.units.get(&unit).map_or(&[], Vec::as_slice);
        // Per colocate group: the node where a member already runs.
        let mut pinned: BTreeMap<&str, usize> = BTreeMap::new();
        // Blocks: a colocate group, or a member on its own; in the order of their oldest.
        let mut blocks: Vec<Vec<&'a DeploymentView>> = Vec::new();
        let mut block_of: BTreeMap<&str, usize> = BTreeMap::new();
        for &d in members.iter().filter(|d| d.desired_running) {
            let live = d.assignment.as_ref().and_then(|a| self.live_slot(a));
            match (filter_of(&d.colocate), live) {
                (Some(c), Some(slot)) => {
                    pinned.entry(c).or_insert(slot);
                }
                (None, Some(_)) => {}
                (Some(c), None) => match block_of.get(c) {
                    Some(&i) => blocks[i].push(d),
                    None => {
                        block_of.insert(c, blocks.len());
                        blocks.push(vec![d]);
                    }
                },
                (None, None) => blocks.push(vec![d]),
            }
        }
        // The largest first (then the oldest): small members must not take the room a large
        // one needs when all of them would fit.
        blocks.sort_by_cached_key(|b| {
            std::cmp::Reverse(
                sum_requests(b)
                    .iter()
                    .fold(0i64, |acc, (_, v)| acc.saturating_add(*v)),
            )
        });
        // A gang's undo log: each slot it touched, as it was before.
        let mut saved: BTreeMap<usize, Slot<'a>> = BTreeMap::new();
        let mut out = Vec::new();
        let mut failed = false;
        for block in blocks {
            let pin = filter_of(&block[0].colocate).and_then(|c| pinned.get(c).copied());
            let undo = unit.0.then_some(&mut saved);
            let result = self.place(&block, pin, strategy, undo);
            failed |= result.is_err();
            out.extend(block.into_iter().map(|d| (d, result)));
        }
        if unit.0 && failed {
            for (i, slot) in saved {
                self.slots[i] = slot;
            }
            for (_, result) in &mut out {
                if result.is_ok() {
                    *result = Err(Unplaced::WaitingForGang);
                }
            }
        }
        out
    }

    /// Reserves `dep` on the chosen slot.
    fn commit(&mut self, dep: &'a DeploymentView, choice: Choice) {
        let slot = &mut self.slots[choice.slot];
        for (class, amount) in positive_requests(dep) {
            let held = slot.reserved.entry(class).or_insert(0);
            *held = held.saturating_add(amount);
        }
        slot.load = choice.load_after;
        slot.count += 1;
    }

    /// Whether `a` beats `b` under `strategy` (a total order: ids are unique).
    fn better(&self, strategy: Strategy, a: &Choice, b: &Choice) -> bool {
        let (sa, sb) = (&self.slots[a.slot], &self.slots[b.slot]);
        let by_id = sa.node.id.cmp(&sb.node.id);
        let order = match strategy {
            Strategy::Spread => a
                .load_after
                .total_cmp(&b.load_after)
                .then(sa.count.cmp(&sb.count))
                .then(by_id),
            Strategy::Binpack => b.load_after.total_cmp(&a.load_after).then(by_id),
        };
        order == Ordering::Less
    }
}
