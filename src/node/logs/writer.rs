//! The log IO thread: every spool append, read and delete of one node runs on one dedicated
//! thread, in the order it was queued, so the async workers never wait for the disk.
//!
//! Invariants:
//! - Jobs run one at a time in queue order: a read or a flush queued after an append sees it.
//!   A job queued for later ([`SpoolWriter::submit_at`]) runs once its time came, between
//!   the others. Jobs for later wait in a list the thread reads before it sleeps, in time
//!   order: queueing one wakes the thread only when it goes first (the thread sleeps until the
//!   first one's time, or with no deadline when there is none), so a busy node's deferred jobs
//!   cost no wakeups of their own.
//! - The thread starts on the first job (an idle node with no deployment has none) and ends
//!   when the last [`SpoolWriter`] handle is dropped, after the jobs already queued, those
//!   queued for later included (at once).
//! - A panicking job is contained: the thread goes on with the next one.

use std::collections::VecDeque;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use tokio::sync::oneshot;

/// Stack of the IO thread: the jobs encode and parse JSON lines and call the file system, none
/// of it deep.
const STACK_BYTES: usize = 256 * 1024;

type Job = Box<dyn FnOnce() + Send>;

/// Jobs for later, in time order.
type Later = Arc<Mutex<VecDeque<(Instant, Job)>>>;

fn lock_later(later: &Later) -> MutexGuard<'_, VecDeque<(Instant, Job)>> {
    later.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the thread receives: a job to run now, or a nudge to read the list of jobs for
/// later again (a new one goes first).
enum Queued {
    Now(Job),
    Wake,
}

/// The running thread's queue and its list of jobs for later.
struct Thread {
    tx: mpsc::Sender<Queued>,
    later: Later,
}

impl std::fmt::Debug for Thread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Thread").finish_non_exhaustive()
    }
}

/// Handle to the node's log IO thread. Cheap to clone; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct SpoolWriter {
    thread: Arc<OnceLock<Result<Thread, String>>>,
}

fn run_job(job: Job) {
    if catch_unwind(AssertUnwindSafe(job)).is_err() {
        tracing::error!("log spool job panicked");
    }
}

/// The IO thread's loop.
fn serve(rx: &mpsc::Receiver<Queued>, later: &Later) {
    loop {
        let due = lock_later(later).front().map(|(at, _)| *at);
        let next = match due {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match next {
            Ok(Queued::Now(job)) => run_job(job),
            Ok(Queued::Wake) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        loop {
            let job = {
                let mut list = lock_later(later);
                match list.front() {
                    Some((at, _)) if *at <= now => list.pop_front(),
                    _ => None,
                }
            };
            match job {
                Some((_, job)) => run_job(job),
                None => break,
            }
        }
    }
    let rest = std::mem::take(&mut *lock_later(later));
    for (_, job) in rest {
        run_job(job);
    }
}

impl SpoolWriter {
    /// A handle; the thread itself starts with the first job.
    pub fn new() -> Self {
        Self::default()
    }

    fn thread(&self) -> Result<&Thread, &str> {
        self.thread
            .get_or_init(|| {
                let (tx, rx) = mpsc::channel::<Queued>();
                let later = Later::default();
                let list = Arc::clone(&later);
                std::thread::Builder::new()
                    .name("log-spool".to_owned())
                    .stack_size(STACK_BYTES)
                    .spawn(move || serve(&rx, &list))
                    .map(|_| Thread { tx, later })
                    .map_err(|e| format!("cannot start the log IO thread: {e}"))
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// The running thread, or `None` (said) when it could not be started.
    fn running(&self) -> Option<&Thread> {
        self.thread()
            .inspect_err(|error| tracing::warn!(%error, "log spool job dropped"))
            .ok()
    }

    /// Queues `job`; false when the thread could not be started (the job is dropped).
    pub(super) fn submit(&self, job: impl FnOnce() + Send + 'static) -> bool {
        self.running()
            .is_some_and(|t| t.tx.send(Queued::Now(Box::new(job))).is_ok())
    }

    /// Queues `job` to run at `at` (or when the thread ends, if sooner); false as
    /// [`SpoolWriter::submit`].
    pub(super) fn submit_at(&self, at: Instant, job: impl FnOnce() + Send + 'static) -> bool {
        let Some(t) = self.running() else {
            return false;
        };
        let first = {
            let mut list = lock_later(&t.later);
            // After those due no later (nearly always at the end).
            let at_index = list.partition_point(|(due, _)| *due <= at);
            list.insert(at_index, (at, Box::new(job)));
            at_index == 0
        };
        // The thread sleeps until the first one's time: only a new first one changes it.
        !first || t.tx.send(Queued::Wake).is_ok()
    }

    /// Runs `f` on the IO thread after everything queued before, and waits for its result
    /// without blocking an async worker.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.submit(move || {
            let _ = tx.send(f());
        });
        rx.await
            .map_err(|_| io::Error::other("log IO thread unavailable"))
    }

    /// Runs every job queued for later now, after what is queued before (tests).
    #[cfg(test)]
    pub(super) async fn run_later_now(&self) {
        if let Ok(t) = self.thread() {
            let later = Arc::clone(&t.later);
            let _ = self
                .run(move || {
                    let all = std::mem::take(&mut *lock_later(&later));
                    for (_, job) in all {
                        run_job(job);
                    }
                })
                .await;
        }
    }

    /// As [`SpoolWriter::run`], blocking the calling thread (tests' sync reads).
    #[cfg(test)]
    pub(super) fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(move || {
            let _ = tx.send(f());
        });
        rx.recv()
            .map_err(|_| io::Error::other("log IO thread unavailable"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::SpoolWriter;

    #[test]
    fn a_job_for_later_runs_after_those_for_now_and_at_the_end_at_the_latest() {
        let io = SpoolWriter::new();
        let (tx, rx) = mpsc::channel();
        let (a, b, c) = (tx.clone(), tx.clone(), tx);
        io.submit_at(Instant::now() + Duration::from_millis(30), move || {
            a.send("later").unwrap();
        });
        io.submit(move || b.send("now").unwrap());
        let wait = Duration::from_secs(10);
        assert_eq!(rx.recv_timeout(wait).unwrap(), "now");
        // Its time comes with no other job to wake the thread.
        assert_eq!(rx.recv_timeout(wait).unwrap(), "later");
        // One for much later runs when the last handle goes; one due sooner, queued after it,
        // goes first, when its time comes.
        let d = c.clone();
        io.submit_at(Instant::now() + Duration::from_secs(3600), move || {
            c.send("at the end").unwrap();
        });
        io.submit_at(Instant::now() + Duration::from_millis(30), move || {
            d.send("sooner").unwrap();
        });
        assert_eq!(rx.recv_timeout(wait).unwrap(), "sooner");
        drop(io);
        assert_eq!(rx.recv_timeout(wait).unwrap(), "at the end");
    }
}
