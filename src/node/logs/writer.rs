//! The log IO thread: every spool append, read and delete of one node runs on one dedicated
//! thread, in the order it was queued, so the async workers never wait for the disk.
//!
//! Invariants:
//! - Jobs run one at a time in queue order: a read or a flush queued after an append sees it.
//!   A job queued for later ([`SpoolWriter::submit_at`]) runs once its time came, between
//!   the others.
//! - The thread starts on the first job (an idle node with no deployment has none) and ends
//!   when the last [`SpoolWriter`] handle is dropped, after the jobs already queued, those
//!   queued for later included (at once).
//! - A panicking job is contained: the thread goes on with the next one.

use std::collections::VecDeque;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::oneshot;

/// Stack of the IO thread: the jobs encode and parse JSON lines and call the file system, none
/// of it deep.
const STACK_BYTES: usize = 256 * 1024;

type Job = Box<dyn FnOnce() + Send>;

/// A job to run now, or once its time came.
enum Queued {
    Now(Job),
    At(Instant, Job),
}

/// Handle to the node's log IO thread. Cheap to clone; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct SpoolWriter {
    queue: Arc<OnceLock<Result<mpsc::Sender<Queued>, String>>>,
}

fn run_job(job: Job) {
    if catch_unwind(AssertUnwindSafe(job)).is_err() {
        tracing::error!("log spool job panicked");
    }
}

/// The IO thread's loop. Jobs for later come with times that (nearly) only increase (a fixed
/// delay after their submission): they wait in submission order.
fn serve(rx: &mpsc::Receiver<Queued>) {
    let mut later: VecDeque<(Instant, Job)> = VecDeque::new();
    loop {
        let next = match later.front() {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some((at, _)) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match next {
            Ok(Queued::Now(job)) => run_job(job),
            Ok(Queued::At(at, job)) => later.push_back((at, job)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        while later.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, job)) = later.pop_front() {
                run_job(job);
            }
        }
    }
    for (_, job) in later {
        run_job(job);
    }
}

impl SpoolWriter {
    /// A handle; the thread itself starts with the first job.
    pub fn new() -> Self {
        Self::default()
    }

    fn sender(&self) -> Result<&mpsc::Sender<Queued>, &str> {
        self.queue
            .get_or_init(|| {
                let (tx, rx) = mpsc::channel::<Queued>();
                std::thread::Builder::new()
                    .name("log-spool".to_owned())
                    .stack_size(STACK_BYTES)
                    .spawn(move || serve(&rx))
                    .map(|_| tx)
                    .map_err(|e| format!("cannot start the log IO thread: {e}"))
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// Queues `job`; false when the thread could not be started (the job is dropped).
    pub(super) fn submit(&self, job: impl FnOnce() + Send + 'static) -> bool {
        self.queue_job(Queued::Now(Box::new(job)))
    }

    /// Queues `job` to run at `at` (or when the thread ends, if sooner); false as
    /// [`SpoolWriter::submit`].
    pub(super) fn submit_at(&self, at: Instant, job: impl FnOnce() + Send + 'static) -> bool {
        self.queue_job(Queued::At(at, Box::new(job)))
    }

    fn queue_job(&self, job: Queued) -> bool {
        match self.sender() {
            Ok(tx) => tx.send(job).is_ok(),
            Err(error) => {
                tracing::warn!(%error, "log spool job dropped");
                false
            }
        }
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
        // One for much later runs when the last handle goes.
        io.submit_at(Instant::now() + Duration::from_secs(3600), move || {
            c.send("at the end").unwrap();
        });
        drop(io);
        assert_eq!(rx.recv_timeout(wait).unwrap(), "at the end");
    }
}
