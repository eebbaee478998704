//! Worker threads: connections of the proxy listener are served by one
//! single-threaded tokio runtime per CPU core, the way nginx runs one worker
//! process per core.
//!
//! On one multi-threaded runtime a proxied request hops between threads: the
//! client connection's task, hyper's upstream connection task and their
//! wake-ups may each run on another core, and every hop costs a futex wake or
//! an inter-processor interrupt. A worker keeps a client connection, its
//! requests and the upstream connections they use on one thread (bench:
//! about +40 % requests/s on 2 cores, see BENCHMARKS.md).
//!
//! The accept loop hands each new connection to the next worker in turn, a
//! cost per connection, not per request. Per-worker `SO_REUSEPORT` sockets
//! would save the hand-off, but the kernel's hash spreads connections
//! unevenly (64 over two workers: 28/36 in one run), and a connection never
//! moves to another worker afterwards.
//!
//! Upstream connection pools are per worker too: [`current`] says which.
//! Hence a module of its own, below both of its users: [`crate::server`]
//! hands connections to the workers, [`crate::upstream::client`] picks the
//! pool of the worker it runs on.

use std::cell::Cell;
use std::io;
use std::num::NonZeroUsize;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Work for a worker, run inside its runtime (so `tokio::spawn` lands there).
type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The worker running this thread: 0 to `count - 1`; 0 outside workers.
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// Worker threads for `configured` (`None`: one per CPU core).
pub fn count(configured: Option<NonZeroUsize>) -> usize {
    configured.or_else(|| std::thread::available_parallelism().ok()).map_or(1, NonZeroUsize::get)
}

/// Running worker threads, or none: then jobs run on the caller's runtime.
pub struct Workers {
    jobs: Vec<mpsc::UnboundedSender<Job>>,
    /// Resolve (with an error) once a thread and its runtime have ended.
    ended: Vec<oneshot::Receiver<()>>,
    next: usize,
}

impl Workers {
    /// No threads: jobs run on the caller's runtime (the admin listener).
    pub fn none() -> Self {
        Self { jobs: Vec::new(), ended: Vec::new(), next: 0 }
    }

    /// Starts `count` threads, each with its own runtime.
    pub fn start(count: usize) -> io::Result<Self> {
        let mut workers = Self::none();
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (job_sender, mut jobs) = mpsc::unbounded_channel::<Job>();
            let (done, ended) = oneshot::channel::<()>();
            std::thread::Builder::new().name(format!("pacegate-w{index}")).spawn(move || {
                CURRENT.with(|current| current.set(index));
                runtime.block_on(async {
                    while let Some(job) = jobs.recv().await {
                        job();
                    }
                });
                // Every task of this worker ends here, before `ended` says so.
                drop(runtime);
                drop(done);
            })?;
            workers.jobs.push(job_sender);
            workers.ended.push(ended);
        }
        Ok(workers)
    }

    /// Runs `serve(stream)` on the next worker in turn, or here without
    /// workers.
    pub fn hand_over(&mut self, stream: TcpStream, serve: impl FnOnce(TcpStream) + Send + 'static) {
        if self.jobs.is_empty() {
            return serve(stream);
        }
        // The stream moves to the worker's runtime, whose reactor will watch it.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => return tracing::warn!(%error, "cannot hand a connection to a worker"),
        };
        self.run(move || match TcpStream::from_std(stream) {
            Ok(stream) => serve(stream),
            Err(error) => tracing::warn!(%error, "a worker cannot take a connection"),
        });
    }

    /// Runs `job` on the next worker in turn, or here without workers.
    fn run(&mut self, job: impl FnOnce() + Send + 'static) {
        if self.jobs.is_empty() {
            return job();
        }
        self.next = (self.next + 1) % self.jobs.len();
        // A worker's receiver lives as long as its thread, which ends only
        // once `join` dropped the senders, unless it panicked.
        if self.jobs[self.next].send(Box::new(job)).is_err() {
            tracing::error!(worker = self.next, "worker thread has ended: connection dropped");
        }
    }

    /// Ends every worker, cancelling whatever its tasks still do, and waits
    /// until their threads are done.
    pub async fn join(self) {
        drop(self.jobs);
        for ended in self.ended {
            let _ = ended.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs go to every worker in turn, run on that worker's thread, and
    /// `join` waits for the threads and cancels their leftover tasks.
    #[tokio::test]
    async fn jobs_go_round_robin_and_join_ends_the_threads() {
        let mut workers = Workers::start(2).unwrap();
        let (seen, mut ran) = mpsc::unbounded_channel();
        let (leftover, cancelled) = oneshot::channel::<()>();
        for _ in 0..4 {
            let seen = seen.clone();
            workers.run(move || {
                let _ = seen.send((current(), std::thread::current().name().map(str::to_owned)));
            });
        }
        workers.run(move || {
            // Never ends by itself: `join` must drop it with the runtime.
            tokio::spawn(async move {
                let _keep = leftover;
                std::future::pending::<()>().await;
            });
        });
        let mut found = Vec::new();
        let patience = std::time::Duration::from_secs(10);
        for _ in 0..4 {
            let job = tokio::time::timeout(patience, ran.recv()).await.expect("a job ran in time");
            found.push(job.expect("a job ran"));
        }
        found.sort();
        let on = |i: usize| (i, Some(format!("pacegate-w{i}")));
        assert_eq!(found, [on(0), on(0), on(1), on(1)]);
        tokio::time::timeout(patience, workers.join()).await.expect("joined in time");
        assert!(cancelled.await.is_err(), "a worker's task outlived join");
    }

    /// Without workers, a job runs at once on the caller's thread.
    #[test]
    fn no_workers_runs_jobs_here() {
        let mut workers = Workers::none();
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        workers.run(move || flag.store(true, std::sync::atomic::Ordering::Relaxed));
        assert!(ran.load(std::sync::atomic::Ordering::Relaxed));
    }
}
