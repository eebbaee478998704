//! Shutdown: which waiters can still leave before the grace is over.
//!
//! When pacegate stops, every queued request must get an answer while its
//! connection is still open (docs/operations.md, "Shutdown": 503
//! `shutting_down` for what cannot be served within `shutdown_grace`). The
//! core is told a *cutoff*, the last instant an attempt may leave, and the
//! instant the grace ends. Then:
//! - at once, each partition keeps the waiters its pacing could possibly
//!   let go before the cutoff (its burst plus its rate over the time left
//!   after any cooldown), in serving order within each of its queues, and
//!   refuses the others: they could not be served whatever happens, so they
//!   are told now (endpoint limits are not counted: the bound stays an
//!   upper bound);
//! - a caller that joins later is refused at once when the partition
//!   already holds as many as can leave;
//! - at the cutoff, whoever still waits is refused (the estimate above is an
//!   upper bound: concurrency, a cooldown that starts during shutdown or the
//!   shared limiter may let fewer go), and nobody leaves after it.

use std::time::Duration;

use tokio::time::Instant;

use super::pacing::Pacing;
use super::{Admission, Limits, Refusal, Waiter};

/// Shutdown's two instants.
#[derive(Debug, Clone, Copy)]
pub(super) struct Closing {
    /// Nobody leaves after this instant.
    cutoff: Instant,
    /// The grace is over: connections are closed.
    ends: Instant,
}

impl Closing {
    /// At most how many waiters of a partition paced by `pacing` can leave
    /// between `now` and the cutoff.
    pub(super) fn servable(&self, pacing: &Pacing, limits: &Limits, now: Instant) -> usize {
        let start = pacing.cooldown_until().map_or(now, |until| until.max(now));
        if start >= self.cutoff {
            return 0;
        }
        let span = self.cutoff.duration_since(start).as_secs_f64();
        let paced = (span * pacing.effective_rate()).floor();
        // Float to int saturates: an unbounded rate allows everyone.
        (limits.quotas.burst.get() as usize).saturating_add(paced as usize)
    }
}

impl<W: Waiter> Admission<W> {
    /// Shutdown started: nobody leaves after `cutoff`, and connections close
    /// at `ends`. Returns the waiters that cannot leave before the cutoff,
    /// to be refused now (see the module doc).
    pub fn close(&mut self, cutoff: Instant, ends: Instant, now: Instant) -> Vec<W> {
        let closing = Closing { cutoff: cutoff.min(ends), ends };
        self.closing = Some(closing);
        if self.closed(now) {
            return self.refuse_all();
        }
        let keys: Vec<u64> = self.partitions.keys().copied().collect();
        let mut refused = Vec::new();
        for key in keys {
            let Some(partition) = self.partitions.get_mut(&key) else { continue };
            let servable = closing.servable(&partition.pacing, &self.limits, now);
            if partition.len() > servable {
                let (mut late, gone) = partition.keep_first(servable);
                let emptied = partition.is_empty();
                self.held -= late.len() + gone;
                self.departed = self.departed.saturating_sub(gone);
                refused.append(&mut late);
                if emptied {
                    self.ready.retain(|ready| ready.partition != key);
                }
            }
        }
        refused
    }

    /// The cutoff, once shutdown started: the driver refuses every waiter
    /// then, and must wake for it.
    pub fn cutoff(&self) -> Option<Instant> {
        self.closing.map(|closing| closing.cutoff)
    }

    /// Shutdown started and its cutoff is past: nobody leaves any more.
    pub fn closed(&self, now: Instant) -> bool {
        self.closing.is_some_and(|closing| now >= closing.cutoff)
    }

    /// The refusal of a caller that cannot leave before the cutoff.
    pub fn shutting_down(&self, now: Instant) -> Refusal {
        let ends = self.closing.map_or(now, |closing| closing.ends);
        Refusal::ShuttingDown { retry_after: ends.saturating_duration_since(now).max(Duration::from_secs(1)) }
    }
}
