//! Restart decisions for one deployment: the policy (`never | on-failure | always`), the
//! exponential backoff and the `max_restarts`-per-`restart_window` budget.
//!
//! Pure: no tokio, no clock. Time is an argument (`now_ms`, milliseconds on any monotonic
//! scale the caller keeps). Only the supervisor's per-deployment actor calls this.
//!
//! Invariants:
//! - Every automatic restart (crash, failed health check, failed prepare or spawn) is recorded
//!   in one sliding window; more than `max_restarts` of them inside `restart_window` gives up
//!   with the reason `max_restarts=N in window=Ws exceeded` (the original never counted health
//!   check restarts, B13, and never retried spawn failures, B14).
//! - Scheduled (cron) restarts and spec changes are not automatic restarts: they never call in.
//! - The delay is `backoff x 2^k` for the k-th consecutive restart, capped at [`MAX_BACKOFF`];
//!   `k` resets after a run that lasted at least [`RESET_AFTER`].

use std::collections::VecDeque;
use std::time::Duration;

use crate::spec::{DeploymentSpec, RestartKind, RestartPolicy};

/// Upper bound of the backoff delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A run at least this long resets the consecutive-restart count (the backoff starts over).
pub const RESET_AFTER: Duration = Duration::from_secs(60);

/// The part of a spec that restart decisions read.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Policy kind and initial backoff.
    pub policy: RestartPolicy,
    /// Automatic restarts allowed inside `window`.
    pub max_restarts: u32,
    /// Length of the sliding window.
    pub window: Duration,
}

impl Budget {
    /// The budget of a deployment spec.
    pub fn from_spec(spec: &DeploymentSpec) -> Self {
        Self {
            policy: spec.restart_policy.clone(),
            max_restarts: spec.max_restarts,
            window: spec.restart_window,
        }
    }
}

/// What to do after an exit or a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start again after `delay`.
    Restart {
        /// Backoff delay before the next start.
        delay: Duration,
    },
    /// The budget is spent: the deployment is FAILED with this reason.
    GiveUp {
        /// E.g. `max_restarts=3 in window=60s exceeded`.
        reason: String,
    },
    /// No restart wanted (policy, clean exit, or desired state is not running).
    Stay,
}

/// The delay before the `consecutive`-th consecutive restart (0-based): `initial x 2^n`,
/// capped at [`MAX_BACKOFF`]. An initial delay of zero stays zero.
pub fn backoff_delay(initial: Duration, consecutive: u32) -> Duration {
    let factor = 1u32.checked_shl(consecutive.min(31)).unwrap_or(u32::MAX);
    initial
        .checked_mul(factor)
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF)
}

/// Restart bookkeeping of one deployment (one spec generation; reset on a spec change).
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    /// Times (ms) of the automatic restarts still inside the window, oldest first.
    history: VecDeque<u64>,
    /// Restarts since the last long-enough run.
    consecutive: u32,
    /// When the current (or last) process started, if one did.
    last_start_ms: Option<u64>,
    /// Automatic restarts since this tracker was created.
    total: u32,
}

impl RestartTracker {
    /// A fresh tracker: empty window, backoff at its initial value.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fresh tracker that goes on counting from `total` restarts (a process adopted after
    /// an agent restart keeps its count; the window starts empty).
    pub fn resumed(total: u32) -> Self {
        Self {
            total,
            ..Self::default()
        }
    }

    /// Records that a process started at `now_ms`.
    pub fn on_start(&mut self, now_ms: u64) {
        self.last_start_ms = Some(now_ms);
    }

    /// The process exited with `exit_code` (negative = killed by that signal number).
    ///
    /// `desired_running` is false when the exit follows a stop request or the desired state
    /// is STOPPED; nothing restarts then.
    pub fn on_exit(
        &mut self,
        now_ms: u64,
        exit_code: i32,
        budget: &Budget,
        desired_running: bool,
    ) -> Decision {
        self.note_run_end(now_ms);
        if !desired_running {
            return Decision::Stay;
        }
        match budget.policy.kind {
            RestartKind::Never => return Decision::Stay,
            RestartKind::OnFailure if exit_code == 0 => return Decision::Stay,
            RestartKind::OnFailure | RestartKind::Always => {}
        }
        self.charge(now_ms, budget)
    }

    /// A failure that always wants a restart whatever the policy kind: a failed health check
    /// (the process is still running), or a failed prepare or spawn (nothing ran). It is
    /// charged to the same budget as crashes.
    pub fn on_failure(&mut self, now_ms: u64, budget: &Budget) -> Decision {
        self.note_run_end(now_ms);
        self.charge(now_ms, budget)
    }

    /// Automatic restarts inside the window ending at `now_ms`.
    #[cfg(test)]
    pub fn restarts_in_window(&self, now_ms: u64, window: Duration) -> u32 {
        let window = millis(window);
        let n = self
            .history
            .iter()
            .filter(|&&t| now_ms.saturating_sub(t) < window)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Automatic restarts since this tracker was created.
    pub fn total_restarts(&self) -> u32 {
        self.total
    }

    fn note_run_end(&mut self, now_ms: u64) {
        if let Some(start) = self.last_start_ms.take()
            && now_ms.saturating_sub(start) >= millis(RESET_AFTER)
        {
            self.consecutive = 0;
        }
    }

    fn charge(&mut self, now_ms: u64, budget: &Budget) -> Decision {
        let window = millis(budget.window);
        while self
            .history
            .front()
            .is_some_and(|&t| now_ms.saturating_sub(t) >= window)
        {
            self.history.pop_front();
        }
        if self.history.len() >= budget.max_restarts as usize {
            return Decision::GiveUp {
                reason: format!(
                    "max_restarts={} in window={}s exceeded",
                    budget.max_restarts,
                    budget.window.as_secs()
                ),
            };
        }
        self.history.push_back(now_ms);
        let delay = backoff_delay(budget.policy.backoff, self.consecutive);
        self.consecutive = self.consecutive.saturating_add(1);
        self.total = self.total.saturating_add(1);
        Decision::Restart { delay }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn budget(kind: RestartKind, backoff_ms: u64, max: u32, window_s: u64) -> Budget {
        Budget {
            policy: RestartPolicy {
                kind,
                backoff: Duration::from_millis(backoff_ms),
            },
            max_restarts: max,
            window: Duration::from_secs(window_s),
        }
    }

    fn delay_ms(d: &Decision) -> u64 {
        match d {
            Decision::Restart { delay } => delay.as_millis() as u64,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[test]
    fn policy_kinds() {
        let never = budget(RestartKind::Never, 500, 10, 300);
        let on_failure = budget(RestartKind::OnFailure, 500, 10, 300);
        let always = budget(RestartKind::Always, 500, 10, 300);
        let mut t = RestartTracker::new();
        assert_eq!(t.on_exit(0, 1, &never, true), Decision::Stay);
        assert_eq!(t.on_exit(0, -9, &never, true), Decision::Stay);
        assert_eq!(t.on_exit(0, 0, &on_failure, true), Decision::Stay);
        assert!(matches!(
            t.on_exit(0, 1, &on_failure, true),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            t.on_exit(0, -15, &on_failure, true),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            t.on_exit(0, 0, &always, true),
            Decision::Restart { .. }
        ));
        // Not desired running: never restart, and nothing is charged.
        assert_eq!(t.on_exit(0, 1, &always, false), Decision::Stay);
        assert_eq!(t.total_restarts(), 3);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = budget(RestartKind::Always, 500, 100, 3600);
        let mut t = RestartTracker::new();
        let delays: Vec<u64> = (0..10)
            .map(|i| {
                t.on_start(i * 10);
                delay_ms(&t.on_exit(i * 10 + 1, 1, &b, true))
            })
            .collect();
        assert_eq!(
            delays,
            vec![
                500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000
            ]
        );
        assert_eq!(backoff_delay(Duration::ZERO, 5), Duration::ZERO);
        assert_eq!(backoff_delay(Duration::from_secs(1), 200), MAX_BACKOFF);
    }

    #[test]
    fn long_run_resets_backoff() {
        let b = budget(RestartKind::Always, 1000, 100, 3600);
        let mut t = RestartTracker::new();
        t.on_start(0);
        assert_eq!(delay_ms(&t.on_exit(10, 1, &b, true)), 1000);
        t.on_start(1010);
        assert_eq!(delay_ms(&t.on_exit(1020, 1, &b, true)), 2000);
        t.on_start(3020);
        // Ran for 60 s: back to the initial delay.
        assert_eq!(delay_ms(&t.on_exit(63_020, 1, &b, true)), 1000);
    }

    #[test]
    fn window_budget_gives_up_then_recovers_after_window() {
        let b = budget(RestartKind::OnFailure, 0, 3, 60);
        let mut t = RestartTracker::new();
        for i in 0..3 {
            assert!(matches!(
                t.on_exit(i * 1000, 3, &b, true),
                Decision::Restart { .. }
            ));
        }
        assert_eq!(t.restarts_in_window(2000, b.window), 3);
        assert_eq!(
            t.on_exit(3000, 3, &b, true),
            Decision::GiveUp {
                reason: "max_restarts=3 in window=60s exceeded".to_owned()
            }
        );
        // The first restart (t=0) left the window at t=60 s.
        assert!(matches!(
            t.on_exit(60_500, 3, &b, true),
            Decision::Restart { .. }
        ));
        assert_eq!(t.restarts_in_window(60_500, b.window), 3);
    }

    #[test]
    fn failures_share_the_budget_whatever_the_policy() {
        let b = budget(RestartKind::Never, 100, 2, 60);
        let mut t = RestartTracker::new();
        assert!(matches!(t.on_failure(0, &b), Decision::Restart { .. }));
        assert!(matches!(t.on_failure(1, &b), Decision::Restart { .. }));
        assert!(matches!(t.on_failure(2, &b), Decision::GiveUp { .. }));

        let b = budget(RestartKind::Always, 100, 2, 60);
        let mut t = RestartTracker::new();
        assert!(matches!(t.on_failure(0, &b), Decision::Restart { .. }));
        assert!(matches!(
            t.on_exit(1, 1, &b, true),
            Decision::Restart { .. }
        ));
        assert!(matches!(t.on_exit(2, 1, &b, true), Decision::GiveUp { .. }));
    }

    #[test]
    fn zero_budget_gives_up_at_once() {
        let b = budget(RestartKind::Always, 100, 0, 60);
        let mut t = RestartTracker::new();
        assert!(matches!(t.on_exit(0, 1, &b, true), Decision::GiveUp { .. }));
        assert_eq!(t.total_restarts(), 0);
    }
}
