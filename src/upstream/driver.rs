//! The driver: one task per upstream that carries out its admission core's
//! answers. It decides nothing itself.
//!
//! Each round it asks the core for its next step under the lock and hands
//! out every grant the core makes now; then it sleeps until the core's next
//! instant, until woken (a caller queued, an attempt ended, a reload), or,
//! with `[redis]`, for the one Redis round trip that confirms a batch of
//! grants. Only this task asks Redis, one batch at a time, so each replica
//! sends Redis one request per batch of attempts and never a herd of pollers.
//! When Redis is down, `on_error` applies: local pacing, or every waiter
//! refused.
//!
//! It runs on the main runtime (it is spawned where the config is loaded),
//! never on a worker thread, so that no client connection's thread sleeps on
//! an upstream's schedule.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;

use super::shared::{Core, Limiter, Shared};
use crate::admission::{Confirm, Next, Refusal, Verdict};
use crate::config::RedisOnError;

/// How often idle partitions are looked for while there are several.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Pause before a driver that panicked starts again.
const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// What the driver waits for after a round.
enum Step {
    /// The shared limiter must confirm these grants.
    Ask(Confirm, Arc<Limiter>),
    /// Nothing to do before this instant (or a wake-up); `None`: until woken.
    Sleep(Option<Instant>),
    /// Nobody waits and every handle is gone.
    Stop,
}

/// Drives `shared`'s core until its upstream is gone and its queue empty.
/// A panic in a round is logged, counted and the driver restarted: the core
/// keeps the queue, so nothing queued is lost, and the upstream never turns
/// into a queue that nobody serves.
pub(super) async fn supervise(shared: Arc<Shared>) {
    while let Err(panic) = AssertUnwindSafe(drive(&shared)).catch_unwind().await {
        shared.metrics.panicked(panic.as_ref(), "driver, restarted");
        shared.lock().recover();
        // Not a hot loop if the same state panics again.
        tokio::time::sleep(RESTART_PAUSE).await;
    }
}

async fn drive(shared: &Arc<Shared>) {
    let mut next_sweep = Instant::now() + SWEEP_EVERY;
    loop {
        // Settled tokens first: what they give back may let the next go now.
        correct(shared).await;
        let step = shared.change(|core| {
            // Read under the lock, like every caller's decision.
            let now = Instant::now();
            if now >= next_sweep {
                core.sweep(now);
                next_sweep = now + SWEEP_EVERY;
            }
            round(shared, core, now, next_sweep)
        });
        match step {
            Step::Stop => return,
            Step::Ask(confirm, limiter) => ask(shared, confirm, &limiter).await,
            Step::Sleep(Some(at)) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = shared.wake.notified() => {}
                }
            }
            Step::Sleep(None) => shared.wake.notified().await,
        }
    }
}

/// One round under the lock: grants handed out, and what to wait for next.
fn round(shared: &Arc<Shared>, core: &mut Core, now: Instant, next_sweep: Instant) -> Step {
    let limiter = shared.limiter.load_full();
    let up = limiter.as_ref().map(|l| l.store.is_up());
    if up == Some(false) && limiter.as_ref().is_some_and(|l| l.store.on_error() == RedisOnError::Deny) {
        refuse_all(core, Refusal::StoreDown);
    }
    // Shutting down: past the cutoff nobody leaves, and whoever still waits
    // is answered while its connection is open.
    if core.closed(now) {
        let refusal = core.shutting_down(now);
        refuse_all(core, refusal);
    }
    let step = next_step(shared, core, now, next_sweep, up, limiter);
    // Until the cutoff, so that nobody waits past it.
    match (step, core.cutoff()) {
        (Step::Sleep(at), Some(cutoff)) if core.depth() > 0 => {
            Step::Sleep(Some(at.map_or(cutoff, |at| at.min(cutoff))))
        }
        (step, _) => step,
    }
}

/// Hands out what the core grants now; says what to wait for next.
fn next_step(
    shared: &Arc<Shared>,
    core: &mut Core,
    now: Instant,
    next_sweep: Instant,
    up: Option<bool>,
    limiter: Option<Arc<Limiter>>,
) -> Step {
    loop {
        match core.next(now, up == Some(true)) {
            Next::Grant(tickets) => shared.hand(core, tickets, now),
            Next::Confirm(confirm) => match &limiter {
                Some(limiter) => return Step::Ask(confirm, limiter.clone()),
                // Only asked for with a limiter in hand; kept local if not.
                None => {
                    let wanted = confirm.wanted();
                    for tickets in core.settle(confirm, Verdict::Go(wanted), now) {
                        shared.hand(core, tickets, now);
                    }
                }
            },
            // Idle partitions are swept while there are several.
            Next::At(at) if core.partitions() > 1 => return Step::Sleep(Some(at.min(next_sweep))),
            Next::At(at) => return Step::Sleep(Some(at)),
            Next::Full => return Step::Sleep(None),
            Next::Idle if shared.closed.load(Ordering::Acquire) => return Step::Stop,
            Next::Idle if core.partitions() > 1 => return Step::Sleep(Some(next_sweep)),
            Next::Idle => return Step::Sleep(None),
        }
    }
}

/// Asks the shared limiter to confirm `confirm`'s grants and hands out what
/// it allows; Redis down means `on_error`: local grants, or refusals.
async fn ask(shared: &Arc<Shared>, confirm: Confirm, limiter: &Limiter) {
    let keys = limiter.store.keys(&shared.name, confirm.partition());
    let wanted = confirm.wanted();
    let probe = limiter.probes.filter(|_| confirm.probing());
    let answer = limiter.store.acquire(&keys, &limiter.demand(&confirm), wanted, probe).await;
    let deny = limiter.store.on_error() == RedisOnError::Deny;
    shared.change(|core| {
        let now = Instant::now();
        let verdict = match answer {
            Ok(verdict) => verdict,
            Err(_) if !deny => Verdict::Go(wanted),
            Err(_) => {
                drop(core.settle(confirm, Verdict::Wait(Duration::ZERO, None), now));
                return refuse_all(core, Refusal::StoreDown);
            }
        };
        for tickets in core.settle(confirm, verdict, now) {
            shared.hand(core, tickets, now);
        }
        // Another replica's breaker opened: who cannot wait is told now.
        if let Verdict::Open(open_for) = verdict {
            for tickets in core.outwaited_by_break() {
                let _ = tickets.send(Err(Refusal::CircuitOpen { retry_after: open_for }));
            }
        }
    });
}

/// Sends the token corrections settled since the last round to the shared
/// schedule; with Redis down they are dropped (the local pacer has them).
async fn correct(shared: &Shared) {
    let owed = shared.take_owed();
    let Some(limiter) = shared.limiter.load_full() else { return };
    for (partition, index, units) in owed {
        let Some(quotas) = limiter.limits.get(index) else { continue };
        if units != 0
            && limiter
                .store
                .adjust(&limiter.store.keys(&shared.name, partition), quotas, units)
                .await
                .is_err()
        {
            return;
        }
    }
}

/// Answers every waiter with `refusal`.
fn refuse_all(core: &mut Core, refusal: Refusal) {
    for tickets in core.refuse_all() {
        let _ = tickets.send(Err(refusal));
    }
}
