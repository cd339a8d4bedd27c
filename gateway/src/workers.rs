//! Connection workers: HTTPS connections are served by `server.workers` threads, each
//! running its own single-threaded tokio runtime, the way nginx runs worker processes.
//!
//! The accept loop hands every accepted connection to the next worker (round robin) and
//! the worker serves it to the end: its TLS, its requests, and everything a request opens
//! (a proxied request's connection to an admin node, a WebSocket relay). No wake-up on
//! the request path crosses threads, where the shared work-stealing runtime woke the
//! other thread for most of them. Background work (key rotation, the audit writer,
//! the change feed, the admin listener) stays on the shared runtime.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Most connection workers `server.workers` may ask for.
pub const MAX_WORKERS: usize = 64;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the connection worker running the caller, or `None` off the workers.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// The default worker count: one per available core.
pub fn default_count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_WORKERS)
}

/// Running connection workers. Dropping this stops them; connections still open on a
/// worker are dropped with it, so it is dropped last, after the graceful drain.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    // each worker runs until its sender is dropped
    _stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `count` workers (at least one).
    pub fn start(count: usize) -> std::io::Result<Self> {
        let count = count.clamp(1, MAX_WORKERS);
        let mut handles = Vec::with_capacity(count);
        let mut stops = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("portcullis-conn-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(Some(index)));
                    // a single-threaded runtime runs its tasks while it is blocked on
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            _stops: stops,
        })
    }

    /// How many workers run.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// The worker to give the next connection to.
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn connections_go_round_robin_and_each_worker_knows_its_index() {
        let workers = Workers::start(3).expect("workers");
        assert_eq!(workers.count(), 3);
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (tx, rx) = std::sync::mpsc::channel();
            workers.next().spawn(async move {
                let _ = tx.send(current());
            });
            seen.push(rx.recv().expect("worker answered"));
        }
        assert_eq!(seen, [Some(0), Some(1), Some(2), Some(0), Some(1), Some(2)]);
        assert_eq!(current(), None, "the test thread is not a worker");
    }

    #[test]
    fn dropping_the_workers_stops_their_tasks() {
        let workers = Workers::start(1).expect("workers");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        workers.next().spawn(async move {
            // holds the sender until the runtime drops the task
            std::future::pending::<()>().await;
            drop(tx);
        });
        drop(workers);
        // the sender is dropped with the task when the worker's runtime ends
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
            "the task was dropped with its worker"
        );
    }
}
