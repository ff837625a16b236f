//! The log IO thread: every spool append, read and delete of one node runs on one dedicated
//! thread, in the order it was queued, so the async workers never wait for the disk.
//!
//! Invariants:
//! - Jobs run one at a time in queue order: a read or a flush queued after an append sees it.
//! - The thread starts on the first job (an idle node with no deployment has none) and ends
//!   when the last [`SpoolWriter`] handle is dropped, after the jobs already queued.
//! - A panicking job is contained: the thread goes on with the next one.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use tokio::sync::oneshot;

/// Stack of the IO thread: the jobs encode and parse JSON lines and call the file system, none
/// of it deep.
const STACK_BYTES: usize = 256 * 1024;

type Job = Box<dyn FnOnce() + Send>;

/// Handle to the node's log IO thread. Cheap to clone; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct SpoolWriter {
    queue: Arc<OnceLock<Result<mpsc::Sender<Job>, String>>>,
}

impl SpoolWriter {
    /// A handle; the thread itself starts with the first job.
    pub fn new() -> Self {
        Self::default()
    }

    fn sender(&self) -> Result<&mpsc::Sender<Job>, &str> {
        self.queue
            .get_or_init(|| {
                let (tx, rx) = mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name("log-spool".to_owned())
                    .stack_size(STACK_BYTES)
                    .spawn(move || {
                        for job in rx {
                            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                                tracing::error!("log spool job panicked");
                            }
                        }
                    })
                    .map(|_| tx)
                    .map_err(|e| format!("cannot start the log IO thread: {e}"))
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// Queues `job`; false when the thread could not be started (the job is dropped).
    pub(super) fn submit(&self, job: impl FnOnce() + Send + 'static) -> bool {
        match self.sender() {
            Ok(tx) => tx.send(Box::new(job)).is_ok(),
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
