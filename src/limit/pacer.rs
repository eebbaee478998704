//! The in-process pacer: governor GCRA, one limiter per quota, exact over time.
//!
//! Three things a plain `governor::RateLimiter::until_ready()` loop gets wrong
//! for a proxy, and how this module fixes them:
//!
//! * **Timer lateness accumulates.** A burst-1 GCRA schedules the next slot
//!   from the instant a request was admitted; tokio timers fire about 1 ms
//!   late, so at 100/s every slot loses ~1 ms and 1000 requests take 11.2 s
//!   instead of 9.99 s. We hand governor a clock that reads *the instant the
//!   slot was promised* (at most [`GUARD`] earlier than the real wake-up), so
//!   the schedule advances by exactly one interval per request.
//! * **That catch-up must never break the quota.** Every quota `N/W` is paced
//!   as `N/(W + GUARD + WIRE_MARGIN·W)`: admission instants we present are at
//!   most `GUARD` before the real send, so no window of `W` ever sees more
//!   than `N` sends from this pacer, whatever the timers do, and arrivals at
//!   the upstream may still jitter by `WIRE_MARGIN·W` (5 ms per second of
//!   window) without a 429. The cost is 0.7 % of throughput at 1 s windows.
//! * **Several quotas must not waste each other's slots.** Checking `10/s`
//!   then `5000/h` would spend a `10/s` slot whenever the hourly one refuses.
//!   Each limiter keeps its state (the GCRA "theoretical arrival time") in a
//!   cell we own, so a refused round is rolled back and nothing is spent.
//!
//! The quota with the shortest interval paces (it admits `burst` back to back,
//! default 1 = even spacing); longer quotas are volume caps that admit up to
//! their whole count back to back, as governor's own `Quota::per_hour(n)` does.
//! Time comes from tokio, so paused-time tests drive the pacer too.
//!
//! **New quotas.** A reload that changes the quotas keeps the schedule
//! ([`Pacer::requota`]): what the last grant still owes each quota is paid
//! at the new interval, counted from that grant. Lowering 10/s to 5/s puts
//! the next slot 200 ms after the last grant, respelling 10/s as 600/min
//! changes nothing, and no change ever frees a burst the upstream would
//! answer with a 429.
//!
//! **Costs.** A request may cost several units (an endpoint limit's weight,
//! LLM tokens). governor's `check_n` pays a cost up front and refuses one
//! above the burst for good; we want even spacing by cost instead: a request
//! leaves once the units before it are paid for, and its own units push the
//! schedule back by `cost` intervals. Each quota checks one unit as usual,
//! then the other `cost - 1` intervals are added to its state cell, so no
//! window `W` of a quota `N/W` holds more than `N` units plus one request's.
//!
//! **Settled costs.** An LLM call's tokens are corrected once its answer
//! says what it used ([`Pacer::adjust`]). A pacer built [`Pacer::settled`]
//! keeps a [`Ledger`] of its pacing quota's last window: what is given
//! back after the schedule moved on becomes credit for the next grants
//! instead of being lost, and no window ever holds more than `N` units as
//! settled so far (not `N` plus one request's).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use smallvec::SmallVec;
use tokio::time::Instant;

use super::ledger::Ledger;
use crate::config::Rate;

/// Safety margin added to every quota window, and the most timer lateness the
/// schedule absorbs without losing it.
pub const GUARD: Duration = Duration::from_millis(2);

/// Share of every quota window kept free for the way to the upstream: the
/// first request of a connection pays its set-up, a loaded machine schedules
/// late, and a strict upstream counts arrivals, not our decisions.
pub const WIRE_MARGIN: f64 = 0.005;

/// The slowest a cap paces: one request a year. Caps come from what an
/// upstream reports, which may be absurd.
const LONGEST_CAP_PERIOD: Duration = Duration::from_secs(365 * 24 * 3600);

/// A GCRA state cell we can read back and restore (governor's own is opaque).
#[derive(Debug, Default, Clone)]
struct TatCell(Arc<AtomicU64>);

impl StateStore for TatCell {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // A cell is touched under its pacer's `&mut`: load/store suffices.
        let prev = self.0.load(Ordering::Acquire);
        let (result, next) = f((prev != 0).then(|| Nanos::new(prev)))?;
        self.0.store(next.as_u64(), Ordering::Release);
        Ok(result)
    }
}

/// A clock that reads whatever instant the pacer presents for this decision.
#[derive(Debug, Clone, Default)]
struct PresentedClock(Arc<AtomicU64>);

impl PresentedClock {
    fn present(&self, at: Duration) {
        self.0.store(u64::try_from(at.as_nanos()).unwrap_or(u64::MAX), Ordering::Release);
    }
}

impl Clock for PresentedClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Acquire))
    }
}

type Limiter = RateLimiter<NotKeyed, TatCell, PresentedClock, NoOpMiddleware<Duration>>;

/// One slot taken from every quota, which can be given back with [`Pacer::undo`].
#[derive(Debug)]
#[must_use = "a taken slot is either used or given back"]
pub struct Taken {
    /// Every cell's state before the slot was taken. Inline for up to four
    /// quotas: every grant makes one, and a heap allocation was a tenth of
    /// the admission's cost per request.
    cells: SmallVec<[u64; 4]>,
    /// The last grant before this one.
    last_grant: Option<Duration>,
    /// What this slot wrote in the ledger: (instant in ns, units).
    recorded: Option<(u64, u64)>,
}

/// When a unit may leave at the earliest once others have left before it,
/// as a pacer's schedule stood when [`Pacer::floor`] read it: a lower
/// bound of the real instant at the pace of that moment (a window's room,
/// other takers and caps set later only delay; credit and a hint's cap
/// that ends are counted, an adaptive rate that probes up sooner is not),
/// for honest waits. Times are ns since the pacer's origin,
/// signed: a schedule with room reaches back before `start`.
#[derive(Debug, Clone)]
pub struct Floor {
    origin: Instant,
    start: i128,
    /// Per quota: the instant its first unit may leave, and its interval.
    quotas: SmallVec<[(i128, i128); 4]>,
    /// The cap's, if any, which paces until `cap_ends` only.
    cap: Option<(i128, i128)>,
    cap_ends: Option<i128>,
}

impl Floor {
    /// When the unit after `ahead` others may leave.
    pub fn at(&self, ahead: u64) -> Instant {
        self.origin + Duration::from_nanos(u64::try_from(self.ns(ahead).max(0)).unwrap_or(u64::MAX))
    }

    /// [`Self::at`] in ns since the origin ([`Self::rebased`]): cheap
    /// enough to ask for every caller of a long queue.
    pub fn ns(&self, ahead: u64) -> i128 {
        let ahead = i128::from(ahead);
        let quotas =
            self.quotas.iter().map(|(base, interval)| base + ahead * interval).fold(self.start, i128::max);
        let Some((base, interval)) = self.cap else { return quotas };
        let capped = quotas.max(base + ahead * interval);
        // Held past the cap's end, it leaves no sooner than then.
        self.cap_ends.filter(|end| capped > *end).map_or(capped, |end| quotas.max(end))
    }

    /// The same schedule, its times counted from `origin`.
    pub fn rebased(mut self, origin: Instant) -> Self {
        let shift = if self.origin >= origin {
            i128::from(nanos(self.origin.duration_since(origin)))
        } else {
            -i128::from(nanos(origin.duration_since(self.origin)))
        };
        self.start += shift;
        for (base, _) in self.quotas.iter_mut().chain(self.cap.as_mut()) {
            *base += shift;
        }
        self.cap_ends = self.cap_ends.map(|end| end + shift);
        self.origin = origin;
        self
    }

    /// The same schedule without `units` that were taken but may be given
    /// back (slots awaiting the shared limiter's verdict).
    pub fn without(mut self, units: u64) -> Self {
        let units = i128::from(units);
        for (base, interval) in self.quotas.iter_mut().chain(self.cap.as_mut()) {
            *base -= units * *interval;
        }
        self
    }
}

/// Paces one upstream: every attempt needs a slot from each of its quotas.
#[derive(Debug)]
pub struct Pacer {
    /// Instant that governor's clock reading zero stands for.
    origin: Instant,
    clock: PresentedClock,
    limiters: Vec<Limiter>,
    cells: Vec<TatCell>,
    /// Instant the last refusal named: when we wake for it, we present it.
    promised: Option<Duration>,
    /// Long-run requests per second the quotas allow together.
    rate_per_second: f64,
    /// An extra, lower pace (adaptive rate or an upstream's rate-limit hint).
    cap: Option<(f64, Limiter)>,
    /// State of the cap's limiter, kept across changes of the cap.
    cap_cell: TatCell,
    /// Emission interval of each limiter (ns), to charge costs above one.
    intervals: Vec<u64>,
    /// Units each limiter admits back to back.
    bursts: Vec<u64>,
    /// Window of each quota, to tell which old quota a new one takes over.
    windows: Vec<Duration>,
    /// Count of each quota, for its ledger.
    counts: Vec<u64>,
    /// Instant presented for the last grant: new quotas continue from it.
    last_grant: Option<Duration>,
    /// Emission interval of the cap's limiter (ns).
    cap_interval: u64,
    /// Costs are corrected after the fact: the pacing quota keeps a ledger.
    settles: bool,
    /// The pacing quota's index and ledger, when `settles`.
    ledger: Option<(usize, Ledger)>,
}

impl Pacer {
    /// A pacer for `rates`, the tightest admitting `burst` back to back,
    /// starting at `now`.
    pub fn new(rates: &[Rate], burst: NonZeroU32, now: Instant) -> Self {
        let mut pacer = Self {
            origin: now,
            clock: PresentedClock::default(),
            limiters: Vec::new(),
            cells: Vec::new(),
            promised: None,
            rate_per_second: 0.0,
            cap: None,
            cap_cell: TatCell::default(),
            intervals: Vec::new(),
            bursts: Vec::new(),
            windows: Vec::new(),
            counts: Vec::new(),
            last_grant: None,
            cap_interval: 0,
            settles: false,
            ledger: None,
        };
        pacer.install(rates, burst, vec![0; rates.len()]);
        pacer
    }

    /// The same pacer for costs corrected after the fact (see "Settled
    /// costs" above).
    pub fn settled(mut self) -> Self {
        self.settles = true;
        self.ledger = self.new_ledger();
        self
    }

    /// An empty ledger for the pacing quota: its window, margins included
    /// but not the guard (the ledger counts real instants, not presented
    /// ones), holds its count.
    fn new_ledger(&self) -> Option<(usize, Ledger)> {
        let index = self.pacing_index()?;
        let count = self.counts[index];
        let window = self.intervals[index].saturating_mul(count).saturating_sub(nanos(GUARD));
        Some((index, Ledger::new(count, window)))
    }

    /// Paces by `rates` from now on, keeping the schedule (see "New quotas"
    /// above). A new quota takes over the old one of the same window, else
    /// the new pacing quota takes over the old pacing one; what the old
    /// quota still owed past the last grant, counted in units, is owed at
    /// the new interval. A quota that takes over nothing starts empty.
    pub fn requota(&mut self, rates: &[Rate], burst: NonZeroU32) {
        let paced = paced_quotas(rates, burst);
        let tightest = paced.iter().map(|q| q.interval).min();
        let anchor = nanos(self.last_grant.unwrap_or_default());
        let states = rates
            .iter()
            .zip(&paced)
            .map(|(rate, quota)| {
                let same_window = self.windows.iter().position(|w| *w == rate.per);
                let pacing = (Some(quota.interval) == tightest).then(|| self.pacing_index()).flatten();
                same_window.or(pacing).map_or(0, |old| self.owed_at(old, anchor, nanos(quota.interval)))
            })
            .collect();
        self.install(rates, burst, states);
    }

    /// The state of old quota `old` with what it owes past `anchor`
    /// converted to `interval` (ns).
    fn owed_at(&self, old: usize, anchor: u64, interval: u64) -> u64 {
        let tat = self.cells[old].0.load(Ordering::Acquire);
        if tat == 0 {
            return 0;
        }
        let units_owed = u128::from(tat.saturating_sub(anchor)) * u128::from(interval);
        let owed = units_owed / u128::from(self.intervals[old].max(1));
        anchor.saturating_add(u64::try_from(owed).unwrap_or(u64::MAX)).max(1)
    }

    /// Index of the quota that paces (the shortest interval).
    fn pacing_index(&self) -> Option<usize> {
        (0..self.intervals.len()).min_by_key(|&i| self.intervals[i])
    }

    /// Builds the limiters of `rates` over cells holding `states`.
    fn install(&mut self, rates: &[Rate], burst: NonZeroU32, states: Vec<u64>) {
        self.cells = states.into_iter().map(|tat| TatCell(Arc::new(AtomicU64::new(tat)))).collect();
        self.limiters = build_limiters(rates, burst, &self.cells, &self.clock);
        let paced = paced_quotas(rates, burst);
        self.intervals = paced.iter().map(|q| nanos(q.interval)).collect();
        self.bursts = paced.iter().map(|q| u64::from(q.burst.get())).collect();
        self.windows = rates.iter().map(|r| r.per).collect();
        self.counts = rates.iter().map(|r| u64::from(r.count.get())).collect();
        self.rate_per_second = long_run_rate(rates);
        // Credit and counts of the old quotas mean nothing to the new ones.
        if self.settles {
            self.ledger = self.new_ledger();
        }
    }

    /// Paces at most `cap` requests per second on top of the quotas, evenly
    /// spaced; `None` (or a cap at or above the quotas) removes it.
    pub fn set_cap(&mut self, cap: Option<f64>) {
        let cap = cap.filter(|c| *c < self.rate_per_second && *c > 0.0);
        if cap == self.cap.as_ref().map(|(rate, _)| *rate) {
            return;
        }
        self.cap = cap.map(|rate| {
            // governor refuses periods past 584 years; a year is slow enough.
            let period =
                Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX).min(LONGEST_CAP_PERIOD);
            let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN));
            self.cap_interval = nanos(quota.replenish_interval());
            let limiter = with_origin(&self.clock, || {
                RateLimiter::new(quota, self.cap_cell.clone(), self.clock.clone())
            });
            (rate, limiter)
        });
    }

    /// Requests per second the pacer lets through now, cap included.
    pub fn effective_rate(&self) -> f64 {
        self.cap.as_ref().map_or(self.rate_per_second, |(rate, _)| *rate)
    }

    /// Requests per second these quotas allow in the long run.
    pub fn rate_per_second(&self) -> f64 {
        self.rate_per_second
    }

    /// Takes `units` from every quota at `now` (see "Costs" above), or says
    /// when that can happen.
    pub fn try_acquire(&mut self, now: Instant, units: NonZeroU32) -> Result<Taken, Instant> {
        let real = now.saturating_duration_since(self.origin);
        let presented = match self.promised {
            // Woke up for a promised slot: keep the schedule, not the lateness.
            Some(promised) if promised <= real => promised.max(real.saturating_sub(GUARD)),
            _ => real,
        };
        self.clock.present(presented);
        self.spend_credit(nanos(presented));
        let cells = self.all_cells().map(|c| c.0.load(Ordering::Acquire)).collect();
        let mut saved = Taken { cells, last_grant: self.last_grant, recorded: None };
        let mut earliest: Option<Duration> = None;
        for limiter in self.limiters.iter().chain(self.cap.as_ref().map(|(_, l)| l)) {
            if let Err(not_until) = limiter.check() {
                let at = not_until.earliest_possible();
                earliest = Some(earliest.map_or(at, |e| e.max(at)));
            }
        }
        // The ledger counts real instants: a presented one may be earlier.
        let real = nanos(real);
        let cost = u64::from(units.get());
        if let Some(at) = self.ledger.as_mut().and_then(|(_, ledger)| ledger.next_fit(real, cost)) {
            let at = Duration::from_nanos(at);
            earliest = Some(earliest.map_or(at, |e| e.max(at)));
        }
        match earliest {
            None => {
                self.promised = None;
                self.last_grant = Some(presented);
                self.charge(units.get() - 1);
                if let Some((_, ledger)) = &mut self.ledger {
                    ledger.record(real, cost);
                    saved.recorded = Some((real, cost));
                }
                Ok(saved)
            }
            Some(at) => {
                self.undo(saved);
                self.promised = Some(at);
                Err(self.origin + at)
            }
        }
    }

    /// The least schedule this pacer keeps from `start` on, if nothing
    /// else takes a unit (see [`Floor`]): each quota's schedule as it
    /// stands, its `burst`, the cap's until `cap_ends` (for ever with
    /// `None`), and the credit a settled pacer holds.
    pub fn floor(&self, start: Instant, cap_ends: Option<Instant>) -> Floor {
        let at = |instant: Instant| i128::from(nanos(instant.saturating_duration_since(self.origin)));
        let start_ns = at(start);
        // Waking for a promised slot, a grant is presented up to GUARD early.
        let earliest_presented = start_ns - i128::from(nanos(GUARD));
        let credit = self.ledger.as_ref().map(|(index, ledger)| (*index, i128::from(ledger.credit())));
        // GCRA: a unit conforms once the schedule is within `burst - 1`
        // intervals of it, and each unit moves the schedule one interval on.
        let base = |tat: i128, interval: u64, burst: u64| {
            (tat.max(earliest_presented) - i128::from(burst - 1) * i128::from(interval), i128::from(interval))
        };
        let quotas = self.cells.iter().zip(&self.intervals).zip(&self.bursts).enumerate();
        let quotas = quotas.map(|(index, ((cell, interval), burst))| {
            let tat = i128::from(cell.0.load(Ordering::Acquire));
            let (base, interval) = base(tat, *interval, *burst);
            // A schedule behind the next grant drops its credit (see
            // `Ledger::spend_credit`).
            let credit = credit.filter(|(pacing, _)| *pacing == index && tat >= earliest_presented);
            (base - credit.map_or(0, |(_, credit)| credit), interval)
        });
        Floor {
            origin: self.origin,
            start: start_ns,
            quotas: quotas.collect(),
            cap: self
                .cap
                .as_ref()
                .map(|_| base(i128::from(self.cap_cell.0.load(Ordering::Acquire)), self.cap_interval, 1)),
            cap_ends: cap_ends.map(at),
        }
    }

    /// Gives back a slot that was taken but not used.
    pub fn undo(&mut self, taken: Taken) {
        let cells: Vec<TatCell> = self.all_cells().cloned().collect();
        for (cell, tat) in cells.iter().zip(taken.cells) {
            cell.0.store(tat, Ordering::Release);
        }
        self.last_grant = taken.last_grant;
        if let (Some((at, units)), Some((_, ledger))) = (taken.recorded, &mut self.ledger) {
            ledger.correct(at, -i64::try_from(units).unwrap_or(i64::MAX));
        }
    }

    /// Moves the pacing quota's schedule back by its ledger's credit, as
    /// far as `presented` (see [`Ledger::spend_credit`]).
    fn spend_credit(&mut self, presented: u64) {
        let Some((index, ledger)) = &mut self.ledger else { return };
        let cell = &self.cells[*index].0;
        let tat = cell.load(Ordering::Acquire);
        if tat != 0 {
            cell.store(ledger.spend_credit(tat, presented).max(1), Ordering::Release);
        }
    }

    /// Corrects what the grant made at `granted` took by `delta` units: a
    /// positive delta is charged like a cost; a negative one moves every
    /// quota's schedule back by that many intervals, but never before `now`,
    /// so nothing given back becomes a burst the quotas do not allow. A
    /// settled pacer keeps what could not go back as credit, if that grant
    /// is still in its ledger's window (see "Settled costs" above).
    pub fn adjust(&mut self, now: Instant, delta: i64, granted: Instant) {
        let granted = nanos(granted.saturating_duration_since(self.origin));
        let in_window = self.ledger.as_mut().is_some_and(|(_, ledger)| ledger.correct(granted, delta));
        let units = u32::try_from(delta.unsigned_abs()).unwrap_or(u32::MAX);
        if delta >= 0 {
            return self.charge(units);
        }
        let now = nanos(now.saturating_duration_since(self.origin));
        let cap = self.cap.as_ref().map(|_| (&self.cap_cell, self.cap_interval));
        let cells = self.cells.iter().zip(self.intervals.iter().copied()).chain(cap);
        for (index, (cell, interval)) in cells.enumerate() {
            let tat = cell.0.load(Ordering::Acquire);
            let back = interval.saturating_mul(u64::from(units));
            // 0 is a fresh cell; a schedule already behind now owes nothing.
            let moved = if tat > now { back.min(tat - now) } else { 0 };
            if moved > 0 {
                cell.0.store((tat - moved).max(1), Ordering::Release);
            }
            if let Some((_, ledger)) = self.ledger.as_mut().filter(|(pacing, _)| *pacing == index)
                && in_window
            {
                ledger.keep_credit(back - moved);
            }
        }
    }

    /// Pushes every quota's schedule back by `extra` more units.
    fn charge(&self, extra: u32) {
        if extra == 0 {
            return;
        }
        let cap = self.cap.as_ref().map(|_| (&self.cap_cell, self.cap_interval));
        let charged = self.cells.iter().zip(self.intervals.iter().copied()).chain(cap);
        for (cell, interval) in charged {
            let tat = cell.0.load(Ordering::Acquire);
            cell.0.store(tat.saturating_add(interval.saturating_mul(u64::from(extra))), Ordering::Release);
        }
    }

    fn all_cells(&self) -> impl Iterator<Item = &TatCell> {
        self.cells.iter().chain(std::iter::once(&self.cap_cell))
    }
}

/// Builds a limiter whose start instant is our origin, whatever time it is.
fn with_origin<T>(clock: &PresentedClock, build: impl FnOnce() -> T) -> T {
    let saved = clock.now();
    clock.present(Duration::ZERO);
    let built = build();
    clock.present(saved);
    built
}

fn build_limiters(
    rates: &[Rate],
    burst: NonZeroU32,
    cells: &[TatCell],
    clock: &PresentedClock,
) -> Vec<Limiter> {
    paced_quotas(rates, burst)
        .into_iter()
        .zip(cells)
        .map(|(paced, cell)| {
            let quota = Quota::with_period(paced.interval)
                .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
                .allow_burst(paced.burst);
            with_origin(clock, || RateLimiter::new(quota, cell.clone(), clock.clone()))
        })
        .collect()
}

/// One quota as the pacer enforces it (GCRA): an emission interval with the
/// margins included, and how many may leave back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacedQuota {
    pub interval: Duration,
    pub burst: NonZeroU32,
}

/// How `rates` are paced: the tightest admits `burst` back to back, the
/// others are volume caps admitting their whole count. The shared (Redis)
/// limiter enforces exactly these, so both limiters agree.
pub fn paced_quotas(rates: &[Rate], burst: NonZeroU32) -> Vec<PacedQuota> {
    let tightest = rates.iter().map(interval).min().unwrap_or(Duration::MAX);
    rates
        .iter()
        .map(|rate| PacedQuota {
            interval: interval(rate),
            burst: if interval(rate) == tightest { burst } else { rate.count },
        })
        .collect()
}

fn nanos(interval: Duration) -> u64 {
    u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX)
}

/// Time between two admissions of this quota, guard included.
fn interval(rate: &Rate) -> Duration {
    (rate.per.mul_f64(1.0 + WIRE_MARGIN) + GUARD) / rate.count.get()
}

/// Requests per second `rates` allow together in the long run.
pub fn long_run_rate(rates: &[Rate]) -> f64 {
    rates.iter().map(Rate::per_second).fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, per_ms: u64) -> Rate {
        Rate { count: NonZeroU32::new(count).unwrap(), per: Duration::from_millis(per_ms) }
    }

    const ONE: NonZeroU32 = NonZeroU32::MIN;

    /// Drives the pacer like the dispatcher does, waking `late` after each promise.
    fn admissions(pacer: &mut Pacer, start: Instant, n: usize, late: Duration) -> Vec<Duration> {
        let mut now = start;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n * 10 {
            if out.len() == n {
                break;
            }
            match pacer.try_acquire(now, ONE) {
                Ok(_) => out.push(now - start),
                Err(at) => now = at.max(now) + late,
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn lateness_is_not_lost_slot_after_slot() {
        let mut pacer = Pacer::new(&[rate(100, 1000)], ONE, Instant::now());
        let start = Instant::now();
        let times = admissions(&mut pacer, start, 1000, Duration::from_millis(1));
        let makespan = times[999].as_secs_f64();
        // Ideal 9.99 s; the margins add 0.7 %; lateness must not add 10 %.
        assert!((9.99..10.1).contains(&makespan), "makespan {makespan}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_holds_more_than_the_quota() {
        let mut pacer = Pacer::new(&[rate(10, 1000)], ONE, Instant::now());
        let start = Instant::now();
        // Alternate early and late wake-ups: the worst case for catch-up.
        let mut now = start;
        let mut times = Vec::new();
        for i in 0..400 {
            if times.len() == 50 {
                break;
            }
            match pacer.try_acquire(now, ONE) {
                Ok(_) => times.push(now),
                Err(at) => now = at.max(now) + Duration::from_micros(if i % 3 == 0 { 1900 } else { 0 }),
            }
        }
        for pair in times.windows(11) {
            assert!(pair[10] - pair[0] >= Duration::from_secs(1), "11 sends within 1 s");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusing_quota_does_not_spend_the_others() {
        // 10/s paces, 3 per 10 s caps volume.
        let mut pacer = Pacer::new(&[rate(10, 1000), rate(3, 10_000)], ONE, Instant::now());
        let start = Instant::now();
        let times = admissions(&mut pacer, start, 4, Duration::ZERO);
        assert_eq!(times.len(), 4);
        assert!(times[2] < Duration::from_millis(300), "{times:?}");
        // The 4th waits for the volume cap, then the 10/s limiter still has a slot.
        assert!(times[3] >= Duration::from_millis(3300), "{times:?}");
        assert!(pacer.try_acquire(start + times[3], ONE).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn burst_admits_back_to_back() {
        let mut pacer = Pacer::new(&[rate(10, 1000)], NonZeroU32::new(5).unwrap(), Instant::now());
        let now = Instant::now();
        for _ in 0..5 {
            assert!(pacer.try_acquire(now, ONE).is_ok());
        }
        assert!(pacer.try_acquire(now, ONE).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cap_paces_below_the_quota_and_can_be_lifted() {
        let mut pacer = Pacer::new(&[rate(100, 1000)], ONE, Instant::now());
        pacer.set_cap(Some(10.0));
        assert_eq!(pacer.effective_rate(), 10.0);
        let start = Instant::now();
        let times = admissions(&mut pacer, start, 11, Duration::ZERO);
        assert!(times[10] >= Duration::from_millis(999), "{times:?}");
        pacer.set_cap(None);
        let times = admissions(&mut pacer, start + times[10], 11, Duration::ZERO);
        assert!(times[10] <= Duration::from_millis(150), "{times:?}");
    }

    #[test]
    fn an_absurdly_low_cap_paces_without_panicking() {
        let now = Instant::now();
        let mut pacer = Pacer::new(&[rate(10, 1000)], ONE, now);
        pacer.set_cap(Some(f64::MIN_POSITIVE));
        assert!(pacer.try_acquire(now, ONE).is_ok());
        assert!(pacer.try_acquire(now + Duration::from_secs(3600), ONE).is_err(), "at most one a year");
    }

    #[test]
    fn costs_space_requests_evenly_by_units() {
        let start = Instant::now();
        let ms = |t: Instant| (t - start).as_millis();
        let mut pacer = Pacer::new(&[rate(10, 1000)], ONE, start);
        let five = NonZeroU32::new(5).unwrap();
        assert!(pacer.try_acquire(start, five).is_ok(), "nothing is owed yet: a cost of 5 leaves at once");
        // Its 5 units are paid at 10/s: the next request, whatever its cost, waits ~500 ms.
        let next = pacer.try_acquire(start, ONE).unwrap_err();
        assert!((500..=510).contains(&ms(next)), "{}", ms(next));
        assert!(pacer.try_acquire(next, ONE).is_ok());
        let after = pacer.try_acquire(next, ONE).unwrap_err();
        assert!((600..=615).contains(&ms(after)), "{}", ms(after));
    }

    #[test]
    fn a_cost_above_the_burst_still_leaves() {
        // governor's check_n would refuse this forever.
        let start = Instant::now();
        let mut pacer = Pacer::new(&[rate(2, 1000)], ONE, start);
        assert!(pacer.try_acquire(start, NonZeroU32::new(3).unwrap()).is_ok());
        let next = pacer.try_acquire(start, ONE).unwrap_err();
        assert!(next - start >= Duration::from_millis(1500), "three units at 2/s");
    }

    #[test]
    fn an_undone_cost_is_given_back_whole() {
        let start = Instant::now();
        let mut pacer = Pacer::new(&[rate(10, 1000)], ONE, start);
        let taken = pacer.try_acquire(start, NonZeroU32::new(8).unwrap()).unwrap();
        pacer.undo(taken);
        assert!(pacer.try_acquire(start, ONE).is_ok());
    }

    /// The instant `earliest` names for `ahead` units is the one at which
    /// the pacer, asked again and again, admits the unit after them.
    #[test]
    fn earliest_is_when_the_unit_after_those_ahead_leaves() {
        let start = Instant::now();
        let cases: [(&[&str], u32, u64); 4] =
            [(&["10/s"], 1, 4), (&["10/s"], 3, 6), (&["10/s", "5/2s"], 1, 7), (&["100/s", "3/h"], 2, 5)];
        for (rates, burst, ahead) in cases {
            let mut pacer = Pacer::new(&parsed(rates), NonZeroU32::new(burst).unwrap(), start);
            let _first = pacer.try_acquire(start, ONE).expect("nothing owed yet");
            let now = start + Duration::from_millis(30);
            let predicted = pacer.floor(now, None).at(ahead);
            let times = admissions(&mut pacer, now, ahead as usize + 1, Duration::ZERO);
            let actual = times.last().map(|t| now + *t).expect("admitted");
            // A schedule with room may be presented up to GUARD early.
            let early = actual.saturating_duration_since(predicted);
            assert!(
                predicted <= actual && early <= GUARD,
                "{rates:?} burst {burst}, {ahead} ahead: {early:?}"
            );
        }
        // A cap paces too.
        let mut pacer = Pacer::new(&parsed(&["10/s"]), ONE, start);
        pacer.set_cap(Some(2.0));
        let _first = pacer.try_acquire(start, ONE).expect("nothing owed yet");
        assert_eq!(pacer.floor(start, None).at(1), start + Duration::from_secs(1), "two at 2/s");
        let uncapped = pacer.floor(start, Some(start)).at(1) - start;
        assert!(
            (Duration::from_millis(200)..Duration::from_millis(205)).contains(&uncapped),
            "10/s: {uncapped:?}"
        );
    }

    /// Credit a settled pacer holds moves its schedule back, and the
    /// honest wait with it.
    #[test]
    fn earliest_counts_a_settled_pacers_credit() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let units = |n| NonZeroU32::new(n).unwrap();
        let mut pacer = Pacer::new(&[rate(1000, 1000)], ONE, start).settled();
        let _a = pacer.try_acquire(start, units(500)).expect("nothing owed yet");
        let b = pacer.try_acquire(start, ONE).unwrap_err();
        let _b = pacer.try_acquire(b, units(500)).expect("paid for");
        // The first grant used 100 of its 500: the schedule moves back to
        // now (900 ms), and the rest of the 400 stays as credit.
        pacer.adjust(at(900), -400, start);
        let _c = pacer.try_acquire(at(900), units(300)).expect("the schedule is back at now");
        let predicted = pacer.floor(at(900), None).at(0);
        assert!(
            predicted < at(1_150),
            "300 units paid from 900 ms, less the credit: {:?}",
            predicted - start
        );
        assert!(pacer.try_acquire(predicted - Duration::from_millis(1), ONE).is_err(), "not before");
        assert!(pacer.try_acquire(predicted, ONE).is_ok(), "{:?}", predicted - start);
    }

    /// Credit larger than what the schedule owes now still pulls the units
    /// ahead forward, as each of their grants spends it.
    #[test]
    fn credit_beyond_the_debt_pulls_the_units_ahead_forward() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut pacer = Pacer::new(&[rate(1000, 1000)], ONE, start).settled();
        let _a = pacer.try_acquire(start, NonZeroU32::new(500).unwrap()).expect("nothing owed yet");
        // 400 of its 500 given back at 400 ms: ~100 ms of schedule back, ~300 as credit.
        pacer.adjust(at(400), -400, start);
        let predicted = pacer.floor(at(400), None).at(200);
        let times = admissions(&mut pacer, at(400), 201, Duration::ZERO);
        let actual = at(400) + times[200];
        assert_eq!(actual, at(400), "the credit pays for all 200");
        assert!(predicted <= actual && actual - predicted <= GUARD, "{:?}", actual - predicted);
    }

    /// Woken for its promised slot a little late, a grant is presented at
    /// the promise: the floor reaches back as far as the pacer does.
    #[test]
    fn the_floor_keeps_the_schedule_not_the_lateness() {
        let start = Instant::now();
        let mut pacer = Pacer::new(&[rate(10, 1000)], ONE, start);
        let _first = pacer.try_acquire(start, ONE).expect("nothing owed yet");
        let promised = pacer.try_acquire(start, ONE).unwrap_err();
        let woke = promised + Duration::from_micros(1_500);
        let predicted = pacer.floor(woke, None).at(1);
        let _second = pacer.try_acquire(woke, ONE).expect("its slot");
        let third = pacer.try_acquire(woke, ONE).unwrap_err();
        assert_eq!(predicted, third, "one interval after the promise, not after the wake-up");
    }

    /// Milliseconds from `start` until `pacer` admits a request asked at `now`.
    fn next_slot_ms(pacer: &mut Pacer, start: Instant, now: Instant) -> u128 {
        match pacer.try_acquire(now, ONE) {
            Ok(taken) => {
                pacer.undo(taken);
                (now - start).as_millis()
            }
            Err(at) => (at - start).as_millis(),
        }
    }

    fn parsed(rates: &[&str]) -> Vec<Rate> {
        rates.iter().map(|r| crate::config::parse_rate(r).expect("rate")).collect()
    }

    #[test]
    fn new_quotas_continue_from_the_last_grant() {
        let start = Instant::now();
        let later = start + Duration::from_millis(20);
        let cases: [(&[&str], &[&str], std::ops::RangeInclusive<u128>); 4] = [
            (&["10/s"], &["5/s"], 200..=202),
            (&["10/s"], &["600/min"], 100..=101),
            (&["10/s"], &["20/s"], 50..=51),
            (&["10/s", "5000/h"], &["5/s", "5000/h"], 200..=202),
        ];
        for (from, to, expected) in cases {
            let mut pacer = Pacer::new(&parsed(from), ONE, start);
            assert!(pacer.try_acquire(start, ONE).is_ok());
            pacer.requota(&parsed(to), ONE);
            let next = next_slot_ms(&mut pacer, start, later);
            assert!(expected.contains(&next), "{from:?} -> {to:?}: next slot at {next} ms");
        }
    }

    #[test]
    fn new_quotas_owe_a_costly_grant_at_the_new_rate() {
        let start = Instant::now();
        let mut pacer = Pacer::new(&[rate(10, 1000)], ONE, start);
        assert!(pacer.try_acquire(start, NonZeroU32::new(3).unwrap()).is_ok());
        pacer.requota(&[rate(5, 1000)], ONE);
        let next = next_slot_ms(&mut pacer, start, start);
        assert!((600..=605).contains(&next), "3 units at 5/s: {next} ms");
    }

    #[test]
    fn new_quotas_after_a_pause_owe_nothing() {
        let start = Instant::now();
        let mut pacer = Pacer::new(&[rate(10, 1000)], ONE, start);
        assert!(pacer.try_acquire(start, ONE).is_ok());
        pacer.requota(&[rate(1, 1000)], ONE);
        let rested = start + Duration::from_secs(2);
        assert_eq!(next_slot_ms(&mut pacer, start, rested), 2000);
    }

    #[test]
    fn new_quotas_keep_what_a_volume_cap_has_counted() {
        // 3 per 10 s caps volume; the pacing quota changes from 10/s to 5/s.
        let start = Instant::now();
        let mut pacer = Pacer::new(&[rate(10, 1000), rate(3, 10_000)], ONE, start);
        let times = admissions(&mut pacer, start, 3, Duration::ZERO);
        let last = start + times[2];
        pacer.requota(&[rate(5, 1000), rate(3, 10_000)], ONE);
        let next = next_slot_ms(&mut pacer, start, last);
        assert!(next >= 3300, "the cap still counts 3 sends: next slot at {next} ms");
    }

    #[test]
    fn an_undone_grant_is_not_the_last_one() {
        let start = Instant::now();
        let mut pacer = Pacer::new(&[rate(10, 1000)], ONE, start);
        assert!(pacer.try_acquire(start, ONE).is_ok());
        let after = start + Duration::from_millis(101);
        let taken = pacer.try_acquire(after, ONE).expect("the next slot");
        pacer.undo(taken);
        pacer.requota(&[rate(5, 1000)], ONE);
        assert_eq!(next_slot_ms(&mut pacer, start, after), 201, "200 ms at 5/s after the grant at 0");
    }

    #[tokio::test(start_paused = true)]
    async fn undo_gives_the_slot_back() {
        let mut pacer = Pacer::new(&[rate(1, 1000)], ONE, Instant::now());
        let now = Instant::now();
        let taken = pacer.try_acquire(now, ONE).unwrap();
        pacer.undo(taken);
        assert!(pacer.try_acquire(now, ONE).is_ok());
    }
}
