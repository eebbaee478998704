//! The dispatcher: one task per upstream that owns its queue and its pacing.
//!
//! Connection tasks never pace themselves. They join the upstream's FIFO
//! queue and wait for a [`Ticket`]; the dispatcher task hands tickets out one
//! by one to the head of the queue, each only when a concurrency slot is free,
//! the upstream is not cooling down and the pacer has a slot. Keeping all of
//! that in one task makes FIFO order exact and means only one task ever sleeps
//! on an upstream's schedule (no herd of waiters polling the limiter).
//!
//! The queue bound is checked by callers on an atomic counter before they
//! join, so a full queue is answered at once. A caller that stops waiting
//! (timeout, disconnect) closes its ticket channel; the dispatcher skips such
//! entries without spending quota.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config;
use crate::limit::Pacer;

/// Permission to send one attempt: holds a concurrency slot until dropped.
#[derive(Debug)]
pub struct Ticket {
    _inflight: OwnedSemaphorePermit,
    /// How long this attempt waited in the queue.
    pub waited: Duration,
}

/// Why a caller got no ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue already holds `queue_size` callers.
    Full { retry_after: Duration },
    /// The caller's deadline passed while it waited.
    Timeout { waited: Duration, retry_after: Duration },
}

enum Command {
    /// A new caller, at the back of the queue.
    Join(Waiter),
    /// A retry, back at the head: it already waited its turn once.
    Rejoin(Waiter),
}

struct Waiter {
    tickets: oneshot::Sender<Ticket>,
    since: Instant,
}

/// Counts shared between the dispatcher task and its callers.
#[derive(Debug)]
struct Shared {
    /// Callers waiting for a ticket (joined, not yet served or gone).
    depth: AtomicUsize,
    /// `queue_size`: new callers are refused when `depth` reaches it.
    capacity: AtomicUsize,
    /// Bounds attempts in flight; a ticket holds one permit.
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    /// Long-run requests per second, for honest Retry-After estimates.
    rate_per_second: f64,
}

/// Handle to an upstream's dispatcher task; cheap to share.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl Dispatcher {
    /// Starts the dispatcher task of one upstream.
    pub fn spawn(upstream: &config::Upstream) -> Self {
        let pacer = Pacer::new(&upstream.rate, upstream.burst);
        let max_inflight = upstream.max_concurrency.get() as usize;
        let shared = Arc::new(Shared {
            depth: AtomicUsize::new(0),
            capacity: AtomicUsize::new(upstream.queue_size),
            inflight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
            rate_per_second: pacer.rate_per_second(),
        });
        let (commands, receiver) = mpsc::unbounded_channel();
        let task = Task { receiver, open: true, queue: VecDeque::new(), pacer, shared: shared.clone() };
        tokio::spawn(task.run());
        Self { commands, shared }
    }

    /// Callers waiting in the queue now.
    pub fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }

    /// Attempts in flight now.
    pub fn inflight(&self) -> usize {
        self.shared.max_inflight.saturating_sub(self.shared.inflight.available_permits())
    }

    /// Waits for a ticket as a new caller, until `deadline`.
    pub async fn join(&self, deadline: Instant) -> Result<Ticket, Refusal> {
        let capacity = self.shared.capacity.load(Ordering::Relaxed);
        let admitted = self
            .shared
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| (d < capacity).then_some(d + 1));
        if admitted.is_err() {
            return Err(Refusal::Full { retry_after: self.estimate_wait() });
        }
        self.wait(Command::Join, deadline).await
    }

    /// Waits for a ticket for a retry, at the head of the queue, until `deadline`.
    pub async fn rejoin(&self, deadline: Instant) -> Result<Ticket, Refusal> {
        self.shared.depth.fetch_add(1, Ordering::AcqRel);
        self.wait(Command::Rejoin, deadline).await
    }

    async fn wait(&self, command: fn(Waiter) -> Command, deadline: Instant) -> Result<Ticket, Refusal> {
        let since = Instant::now();
        let (tickets, receiver) = oneshot::channel();
        let mut slot = QueueSlot { receiver, shared: &self.shared, settled: false };
        if self.commands.send(command(Waiter { tickets, since })).is_err() {
            return Err(self.timeout(since)); // the task is gone: nothing will be served
        }
        match tokio::time::timeout_at(deadline, &mut slot.receiver).await {
            Ok(Ok(ticket)) => {
                slot.settled = true;
                Ok(ticket)
            }
            Ok(Err(_)) | Err(_) => match slot.leave() {
                Some(ticket) => Ok(ticket), // served at the very last moment
                None => Err(self.timeout(since)),
            },
        }
    }

    fn timeout(&self, since: Instant) -> Refusal {
        Refusal::Timeout { waited: since.elapsed(), retry_after: self.estimate_wait() }
    }

    /// How long the queue as it stands takes to drain at the quota's pace.
    fn estimate_wait(&self) -> Duration {
        let ahead = self.depth() as f64 + 1.0;
        Duration::try_from_secs_f64(ahead / self.shared.rate_per_second).unwrap_or(Duration::MAX)
    }
}

/// A caller's place in the queue; leaving it (even by being dropped when the
/// client disconnects) settles the queue depth exactly once.
struct QueueSlot<'a> {
    receiver: oneshot::Receiver<Ticket>,
    shared: &'a Shared,
    /// The dispatcher already counted this caller out by serving it.
    settled: bool,
}

impl QueueSlot<'_> {
    /// Stops waiting; returns a ticket that was sent before the channel closed.
    fn leave(&mut self) -> Option<Ticket> {
        if self.settled {
            return None;
        }
        self.settled = true;
        self.receiver.close();
        match self.receiver.try_recv() {
            Ok(ticket) => Some(ticket),
            Err(_) => {
                self.shared.depth.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        drop(self.leave());
    }
}

/// The dispatcher task's own state.
struct Task {
    receiver: mpsc::UnboundedReceiver<Command>,
    /// False once every handle is gone: serve what is queued, then stop.
    open: bool,
    queue: VecDeque<Waiter>,
    pacer: Pacer,
    shared: Arc<Shared>,
}

impl Task {
    async fn run(mut self) {
        let mut permit: Option<OwnedSemaphorePermit> = None;
        loop {
            while let Ok(command) = self.receiver.try_recv() {
                self.apply(command);
            }
            self.drop_gone_heads();
            if self.queue.is_empty() {
                if !self.next_command().await {
                    return;
                }
                continue;
            }
            let Some(held) = permit.take() else {
                let inflight = self.shared.inflight.clone();
                tokio::select! {
                    acquired = inflight.acquire_owned() => {
                        permit = acquired.ok();
                    }
                    open = self.next_command(), if self.open => { let _ = open; }
                }
                continue;
            };
            match self.pacer.try_acquire(Instant::now()) {
                Ok(taken) => match self.serve_head(held) {
                    Ok(()) => {}
                    Err(unused) => {
                        self.pacer.undo(taken);
                        permit = Some(unused);
                    }
                },
                Err(at) => {
                    permit = Some(held);
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        open = self.next_command(), if self.open => { let _ = open; }
                    }
                }
            }
        }
    }

    /// Waits for and applies one command; false when no command can come.
    async fn next_command(&mut self) -> bool {
        match self.receiver.recv().await {
            Some(command) => {
                self.apply(command);
                true
            }
            None => {
                self.open = false;
                false
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Join(waiter) => self.queue.push_back(waiter),
            Command::Rejoin(waiter) => self.queue.push_front(waiter),
        }
        // Callers that gave up stay queued until reached; bound that leftover.
        let capacity = self.shared.capacity.load(Ordering::Relaxed);
        if self.queue.len() > 2 * capacity + 64 {
            self.queue.retain(|w| !w.tickets.is_closed());
        }
    }

    fn drop_gone_heads(&mut self) {
        while self.queue.front().is_some_and(|w| w.tickets.is_closed()) {
            self.queue.pop_front();
        }
    }

    /// Hands a ticket to the first caller still waiting; gives the permit back
    /// when nobody was left to take it.
    fn serve_head(&mut self, permit: OwnedSemaphorePermit) -> Result<(), OwnedSemaphorePermit> {
        let mut permit = permit;
        while let Some(waiter) = self.queue.pop_front() {
            let ticket = Ticket { _inflight: permit, waited: waiter.since.elapsed() };
            match waiter.tickets.send(ticket) {
                Ok(()) => {
                    self.shared.depth.fetch_sub(1, Ordering::AcqRel);
                    return Ok(());
                }
                Err(unsent) => permit = unsent._inflight,
            }
        }
        Err(permit)
    }
}
