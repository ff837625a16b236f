//! The events log: what happened, when and why, kept durably beside the state it explains.
//!
//! The core records an [`Event`] for every state change it makes or learns (a deployment
//! placed, a process exited, a node lost...). Invariants:
//!
//! - ids are handed out by the core alone, one after another, and never reused: the next id
//!   follows the larger of the newest row and `counters.event_high_water`, which pruning raises
//!   to the newest id before it deletes rows, so ids stay monotonic across restarts even when
//!   every row was pruned (writes do not touch the counter: one statement less per write);
//! - an event that records a stored change is written in the same transaction as the change
//!   (the store's write methods take the events to add); an event about something only
//!   observed (a process started on a node) waits in the [`Journal`] and goes with the next
//!   transaction, or at the end of the core's flush (after its publish, so the path to RUNNING
//!   never waits for it). Pending events always go first, so events become visible in id order
//!   and a reader that saw id N has seen everything below N;
//! - live subscribers get an event only after it is committed, so replaying from the store
//!   and then following the live feed (skipping ids already seen) misses nothing and
//!   repeats nothing.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

use super::store::{Store, StoreError};
use crate::time::now_ms;

/// How many committed events a slow live subscriber may fall behind before it has to go back
/// to the store (it then replays from its last id; nothing is lost).
const LIVE_CAPACITY: usize = 4096;
/// Most events one read returns.
pub const MAX_LIMIT: u32 = 1000;
/// Events one read returns by default.
pub const DEFAULT_LIMIT: u32 = 100;
/// Most observed events that wait for a write.
const MAX_PENDING: usize = 100_000;

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic id (starts at 1, never reused).
    pub id: u64,
    /// When it happened (ms since the Unix epoch).
    pub at_ms: i64,
    /// What happened, `<object type>.<verb>` (e.g. `deployment.exited`, `node.lost`).
    pub kind: String,
    /// What it happened to, `<type>/<id>` (e.g. `deployment/4f2a...`, `node/pod-1`,
    /// `env/torch`, `experiment/rl`, `service/default/learner`).
    pub object: String,
    /// One line for people.
    pub message: String,
    /// Structured details (node, generation, exit code, reason...).
    pub fields: Value,
}

/// The object name of a deployment, node, env, experiment or service.
pub fn object(kind: &str, id: &str) -> String {
    format!("{kind}/{id}")
}

/// Which events to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only ids above this, oldest first; `None`: the newest `limit` events.
    pub after: Option<u64>,
    /// `type/id` for one object, or a bare type (`node`) for every object of that type.
    pub object: Option<String>,
    /// A kind (`deployment.exited`), or a bare type (`deployment`) for all its kinds.
    pub kind: Option<String>,
    /// At most this many (capped at [`MAX_LIMIT`]).
    pub limit: u32,
}

impl Filter {
    /// Whether `e` passes the object and kind filters (not `after` or `limit`).
    pub fn matches(&self, e: &Event) -> bool {
        fn family(pattern: &str, value: &str, sep: char) -> bool {
            if pattern.contains(sep) {
                value == pattern
            } else {
                value
                    .strip_prefix(pattern)
                    .is_some_and(|rest| rest.starts_with(sep))
            }
        }
        self.object
            .as_deref()
            .is_none_or(|o| family(o, &e.object, '/'))
            && self.kind.as_deref().is_none_or(|k| family(k, &e.kind, '.'))
    }
}

/// Retention of the events log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Newest events kept; 0 turns the events log off.
    pub keep: u64,
    /// Events older than this are dropped.
    pub max_age: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep: 100_000,
            max_age: std::time::Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The core's side: hands out ids, holds observed events until a transaction takes them,
/// and publishes what was committed.
#[derive(Debug)]
pub struct Journal {
    next_id: u64,
    enabled: bool,
    /// Observed events are not recorded (the core's first look after a start, where the
    /// state it finds is where the story resumes, not news).
    pub quiet: bool,
    pending: Vec<Event>,
    live: broadcast::Sender<Arc<Event>>,
}

/// Events taken from the [`Journal`] for one transaction: the pending ones first, then the
/// change's own. Give it back with [`Journal::written`] or [`Journal::unwritten`].
#[derive(Debug)]
#[must_use]
pub struct Batch {
    /// Everything to insert, in id order.
    pub events: Vec<Event>,
    pending: usize,
}

impl Journal {
    /// A journal whose next id follows `high_water`; `enabled: false` records nothing.
    pub fn new(high_water: u64, enabled: bool) -> Self {
        Self {
            next_id: high_water.saturating_add(1),
            enabled,
            quiet: false,
            pending: Vec::new(),
            live: broadcast::channel(LIVE_CAPACITY).0,
        }
    }

    /// The feed of committed events.
    pub fn sender(&self) -> broadcast::Sender<Arc<Event>> {
        self.live.clone()
    }

    fn make(
        &mut self,
        kind: &'static str,
        object: String,
        message: String,
        fields: Value,
    ) -> Event {
        let id = self.next_id;
        self.next_id += 1;
        Event {
            id,
            at_ms: now_ms(),
            kind: kind.to_owned(),
            object,
            message,
            fields,
        }
    }

    /// Records an observed event; it is written with the next transaction. At most
    /// [`MAX_PENDING`] wait (a store that keeps failing must not grow this without bound); the
    /// oldest go first.
    pub fn note(&mut self, e: NewEvent) {
        if self.enabled && !self.quiet {
            if self.pending.len() >= MAX_PENDING {
                self.pending.remove(0);
                tracing::warn!(
                    "events log: too many events wait to be written; dropping the oldest"
                );
            }
            let e = self.make(e.kind, e.object, e.message, e.fields);
            self.pending.push(e);
        }
    }

    /// Drops the observed events that wait (they can never be written); how many.
    pub fn discard_pending(&mut self) -> usize {
        std::mem::take(&mut self.pending).len()
    }

    /// Whether observed events wait to be written.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the pending events plus `own` (kind, object, message, fields) for one write.
    pub fn batch(&mut self, own: Vec<NewEvent>) -> Batch {
        let pending = self.pending.len();
        let mut events = std::mem::take(&mut self.pending);
        if self.enabled {
            for n in own {
                let e = self.make(n.kind, n.object, n.message, n.fields);
                events.push(e);
            }
        }
        Batch { events, pending }
    }

    /// The batch was committed: publish it.
    pub fn written(&mut self, batch: Batch) {
        for e in batch.events {
            // No subscriber is fine.
            let _ = self.live.send(Arc::new(e));
        }
    }

    /// The write failed: the change did not happen, so its own events go; the pending ones
    /// wait for the next write.
    pub fn unwritten(&mut self, mut batch: Batch) {
        let first_own = batch.events.get(batch.pending).map(|e| e.id);
        batch.events.truncate(batch.pending);
        // Anything noted meanwhile keeps its place after the returned ones.
        batch.events.append(&mut self.pending);
        self.pending = batch.events;
        // The failed change's ids are handed out again unless something was noted after them.
        if let Some(first) = first_own
            && self.pending.last().is_none_or(|e| e.id < first)
        {
            self.next_id = first;
        }
    }
}

/// An event a change brings, before it has an id.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// As [`Event::kind`].
    pub kind: &'static str,
    /// As [`Event::object`].
    pub object: String,
    /// As [`Event::message`].
    pub message: String,
    /// As [`Event::fields`].
    pub fields: Value,
}

impl NewEvent {
    /// Shorthand.
    pub fn new(kind: &'static str, object: String, message: String, fields: Value) -> Self {
        Self {
            kind,
            object,
            message,
            fields,
        }
    }
}

/// The API's side: reads from the store and follows the live feed.
#[derive(Debug, Clone)]
pub struct Feed {
    store: Store,
    live: broadcast::Sender<Arc<Event>>,
}

impl Feed {
    /// A feed over `store` and the journal's `live` sender.
    pub fn new(store: Store, live: broadcast::Sender<Arc<Event>>) -> Self {
        Self { store, live }
    }

    /// Stored events matching `filter`, oldest first.
    pub async fn read(&self, filter: &Filter) -> Result<Vec<Event>, StoreError> {
        self.store.list_events(filter).await
    }

    /// The id of the oldest event kept (what retention left).
    pub async fn oldest(&self) -> Result<Option<u64>, StoreError> {
        self.store.oldest_event_id().await
    }

    /// Subscribes to committed events (subscribe before reading the store, so nothing falls
    /// between the read and the subscription).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }
}

/// Drops events past the retention, now and then every `every`, until `cancel`.
pub async fn prune(
    store: Store,
    retention: Retention,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let age = i64::try_from(retention.max_age.as_millis()).unwrap_or(i64::MAX);
        if let Err(e) = store
            .prune_events(retention.keep, now_ms().saturating_sub(age))
            .await
        {
            tracing::warn!(error = %e, "could not prune the events log");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(kind: &str, object: &str) -> Event {
        Event {
            id: 1,
            at_ms: 0,
            kind: kind.into(),
            object: object.into(),
            message: String::new(),
            fields: json!({}),
        }
    }

    #[test]
    fn filter_by_object_and_kind_family() {
        let e = ev("deployment.exited", "deployment/abc");
        let f = |object: Option<&str>, kind: Option<&str>| Filter {
            object: object.map(Into::into),
            kind: kind.map(Into::into),
            ..Filter::default()
        };
        assert!(f(None, None).matches(&e));
        assert!(f(Some("deployment/abc"), None).matches(&e));
        assert!(f(Some("deployment"), Some("deployment")).matches(&e));
        assert!(f(None, Some("deployment.exited")).matches(&e));
        assert!(!f(Some("deployment/ab"), None).matches(&e));
        assert!(!f(Some("deploy"), None).matches(&e));
        assert!(!f(Some("node"), None).matches(&e));
        assert!(!f(None, Some("deployment.exit")).matches(&e));
        assert!(!f(None, Some("node")).matches(&e));
    }

    fn own(n: usize) -> Vec<NewEvent> {
        (0..n)
            .map(|i| NewEvent::new("x.y", format!("x/{i}"), String::new(), json!({})))
            .collect()
    }

    #[test]
    fn ids_follow_the_high_water_and_a_failed_write_gives_back_only_its_own() {
        let mut j = Journal::new(41, true);
        let mut live = j.sender().subscribe();
        j.note(NewEvent::new("a.b", "a/1".into(), "seen".into(), json!({})));
        let b = j.batch(own(2));
        assert_eq!(
            b.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            [42, 43, 44]
        );
        j.unwritten(b);
        assert!(j.has_pending());
        // The observed event waits; the failed change's ids are handed out again.
        let b = j.batch(own(1));
        assert_eq!(b.events.iter().map(|e| e.id).collect::<Vec<_>>(), [42, 43]);
        assert!(
            live.try_recv().is_err(),
            "nothing published before a commit"
        );
        j.written(b);
        assert!(!j.has_pending());
        assert_eq!(live.try_recv().unwrap().id, 42);
        assert_eq!(live.try_recv().unwrap().id, 43);
        // Observed events noted while a write was out come after the given-back ones.
        j.note(NewEvent::new("a.b", "a/1".into(), String::new(), json!({})));
        let b = j.batch(own(1));
        j.note(NewEvent::new("a.c", "a/1".into(), String::new(), json!({})));
        j.unwritten(b);
        let b = j.batch(Vec::new());
        let ids: Vec<u64> = b.events.iter().map(|e| e.id).collect();
        let kinds: Vec<&str> = b.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["a.b", "a.c"]);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }

    #[test]
    fn a_disabled_journal_records_nothing() {
        let mut j = Journal::new(0, false);
        j.note(NewEvent::new("a.b", "a/1".into(), String::new(), json!({})));
        assert!(!j.has_pending());
        assert!(j.batch(own(3)).events.is_empty());
    }
}
