//! LLM token quotas in the admission core (docs/tokens.md).
//!
//! A token quota (`tokens`, `input_tokens`, `output_tokens`) is an endpoint
//! limit like any other: it comes after the upstream's `[[upstream.limit]]`s,
//! and an LLM call's [`Needs`] hold its reservation in units of each, so
//! queueing, the 413 for a cost no quota can hold, even spacing by cost,
//! `partition_by`, reloads and Redis treat tokens as they treat any limit.
//! What is proper to tokens lives here: which limits they are, what a
//! [`Reservation`] takes of each, and the correction once an answer says
//! what was used (settling), with the bookkeeping `/status` shows.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use tokio::time::Instant;

use super::needs::Needs;
use crate::config::{self, TokenAccounting, TokenKind};
use crate::llm::{Calibration, Usage};

/// How far back "tokens per minute sent" looks.
const SENT_WINDOW: Duration = Duration::from_secs(60);

/// Tokens one attempt takes: its calibrated input estimate and its output cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reservation {
    pub input: u64,
    pub output: u64,
}

impl Reservation {
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// How an attempt ended, as far as its tokens go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Not processed (429, connect failure): nothing was used.
    NotProcessed,
    /// The answer reported this usage.
    Used(Usage),
    /// Nothing is known (no usage reported, a 5xx, a cut stream): the reservation stands.
    Unknown,
}

/// Where an upstream's token quotas sit among its endpoint limits, and how
/// their reservations are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenQuotas {
    total: Option<usize>,
    input: Option<usize>,
    output: Option<usize>,
    accounting: TokenAccounting,
}

impl Default for TokenQuotas {
    fn default() -> Self {
        Self { total: None, input: None, output: None, accounting: TokenAccounting::Usage }
    }
}

impl TokenQuotas {
    /// The token quotas of `upstream`, numbered after its endpoint limits,
    /// in the order of `config::Tokens::quotas`.
    pub fn of(upstream: &config::Upstream) -> Self {
        let Some(tokens) = &upstream.tokens else { return Self::default() };
        let kinds = tokens.quotas.iter().map(|(kind, _)| *kind);
        Self::numbered(upstream.limits.len(), kinds, tokens.accounting)
    }

    /// Quotas of `kinds`, numbered from `first`.
    pub fn numbered(
        first: usize,
        kinds: impl IntoIterator<Item = TokenKind>,
        accounting: TokenAccounting,
    ) -> Self {
        let mut quotas = Self { accounting, ..Self::default() };
        for (index, kind) in (first..).zip(kinds) {
            match kind {
                TokenKind::Total => quotas.total = Some(index),
                TokenKind::Input => quotas.input = Some(index),
                TokenKind::Output => quotas.output = Some(index),
            }
        }
        quotas
    }

    /// The limit index of the quota counting `kind`, if it is configured.
    pub fn index(&self, kind: TokenKind) -> Option<usize> {
        match kind {
            TokenKind::Total => self.total,
            TokenKind::Input => self.input,
            TokenKind::Output => self.output,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total.is_none() && self.input.is_none() && self.output.is_none()
    }

    /// `(limit index, units)` a reservation takes; a quota it takes nothing
    /// of (an embedding's output) is not needed at all.
    pub fn needs(&self, reserved: Reservation) -> impl Iterator<Item = (usize, NonZeroU32)> + use<> {
        self.per_quota(reserved).filter_map(|(index, units)| Some((index, NonZeroU32::new(units)?)))
    }

    /// Units of each quota `tokens` stand for, as a quota counts them (at
    /// most `u32::MAX`, which no quota can hold anyway).
    fn per_quota(&self, tokens: Reservation) -> impl Iterator<Item = (usize, u32)> + use<> {
        let units = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        let total = self.total.map(|index| (index, units(tokens.total())));
        let input = self.input.map(|index| (index, units(tokens.input)));
        let output = self.output.map(|index| (index, units(tokens.output)));
        [total, input, output].into_iter().flatten()
    }

    /// What an attempt is charged in the end: what it used, where the
    /// accounting trusts the answer; its reservation where nothing is known.
    ///
    /// With an `input_tokens` quota (Anthropic's ITPM), tokens read from the
    /// provider's prompt cache are not charged: Anthropic does not count
    /// cache reads against it. A `tokens` quota (OpenAI's TPM) counts them.
    pub fn charged(&self, reserved: Reservation, settlement: Settlement) -> Reservation {
        match settlement {
            Settlement::NotProcessed => Reservation::default(),
            Settlement::Unknown => reserved,
            Settlement::Used(usage) => Reservation {
                input: match self.input {
                    Some(_) => usage.input.saturating_sub(usage.cached_input),
                    None => usage.input,
                },
                output: match self.accounting {
                    TokenAccounting::Usage => usage.output,
                    TokenAccounting::Reserved => reserved.output,
                },
            },
        }
    }

    /// Per quota, units to add (positive) or give back (negative) so that
    /// what was taken for `reserved` becomes `charged`.
    pub fn corrections(&self, reserved: Reservation, charged: Reservation) -> Vec<(usize, i64)> {
        self.per_quota(reserved)
            .zip(self.per_quota(charged))
            .map(|((index, taken), (_, owed))| (index, i64::from(owed) - i64::from(taken)))
            .filter(|(_, delta)| *delta != 0)
            .collect()
    }

    /// The tokens a grant with `needs` reserved, for the in-flight count:
    /// the `tokens` quota's units, else input and output together.
    fn reserved_in(&self, needs: &Needs) -> u64 {
        let units = |index: Option<usize>| {
            index.and_then(|i| needs.iter().find(|(n, _)| *n == i)).map_or(0, |(_, u)| u64::from(u.get()))
        };
        match self.total {
            Some(_) => units(self.total),
            None => units(self.input) + units(self.output),
        }
    }

    /// The same count for a reservation.
    fn reserved_of(&self, reserved: Reservation) -> u64 {
        let units = |n: u64| n.min(u64::from(u32::MAX));
        match self.total {
            Some(_) => units(reserved.total()),
            None => {
                self.input.map_or(0, |_| units(reserved.input))
                    + self.output.map_or(0, |_| units(reserved.output))
            }
        }
    }
}

/// What `/status` shows of an upstream's tokens, and its calibration.
#[derive(Debug, Default)]
pub struct TokenBook {
    /// Reported per estimated input tokens, learned from answers.
    pub calibration: Calibration,
    /// Tokens reserved by attempts not yet ended: the instant of their
    /// grant, the tokens, and whether the attempt settled. Every attempt
    /// ends ([`Self::released`]), after its settlement if it has one; one
    /// whose caller left before it could use its ticket never settles.
    in_flight: Vec<InFlight>,
    /// Every grant not yet ended, token or not, by its instant: the driver
    /// grants several at one instant, and an end names only its instant.
    /// Only for upstreams with token quotas.
    open: Vec<(Instant, u32)>,
    /// Tokens charged (settled), with when, over the last [`SENT_WINDOW`].
    sent: VecDeque<(Instant, u64)>,
    sent_sum: u64,
}

/// One attempt's tokens in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    granted: Instant,
    tokens: u64,
    settled: bool,
}

/// An upstream's tokens as `/status` shows them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenStatus {
    /// Tokens charged against the quotas over the last minute, as settled.
    pub sent_last_minute: u64,
    /// Tokens reserved by attempts in flight: not yet ended (settled or not).
    pub reserved_in_flight: u64,
    /// The calibration ratio applied to input estimates.
    pub calibration: f64,
    /// Answers the ratio is based on.
    pub calibration_samples: u32,
}

impl TokenBook {
    /// A grant at `now` with `needs` left: its tokens count in flight.
    pub fn granted(&mut self, quotas: &TokenQuotas, needs: &Needs, now: Instant) {
        if quotas.is_empty() {
            return;
        }
        match self.open.iter_mut().rev().find(|(at, _)| *at == now) {
            Some((_, grants)) => *grants += 1,
            None => self.open.push((now, 1)),
        }
        let tokens = quotas.reserved_in(needs);
        if tokens > 0 {
            self.in_flight.push(InFlight { granted: now, tokens, settled: false });
        }
    }

    /// An attempt granted at `granted` ended, settled or not. One that
    /// settled takes its own entry out (a settlement comes before its end).
    /// One that did not may be a grant that reserved no tokens, or one whose
    /// caller left before it used its ticket: which one is not known from
    /// the instant, so the unsettled entries of an instant go when the last
    /// grant of that instant ends. (The quotas keep what an unsettled
    /// attempt reserved: nothing says it was not sent.)
    pub fn released(&mut self, granted: Instant) {
        let Some(open) = self.open.iter().position(|(at, _)| *at == granted) else { return };
        self.open[open].1 -= 1;
        let settled = self.in_flight.iter().position(|entry| entry.granted == granted && entry.settled);
        if let Some(index) = settled {
            self.in_flight.swap_remove(index);
        }
        if self.open[open].1 == 0 {
            self.open.swap_remove(open);
            self.in_flight.retain(|entry| entry.granted != granted);
        }
    }

    /// An attempt granted at `granted` that reserved `reserved` was
    /// charged `charged`; it stays in flight until it ends. Of several
    /// grants at one instant, one that reserved as much is marked.
    pub fn settled(
        &mut self,
        quotas: &TokenQuotas,
        (reserved, granted): (Reservation, Instant),
        charged: Reservation,
        now: Instant,
    ) {
        let tokens = quotas.reserved_of(reserved);
        let open = |entry: &InFlight| entry.granted == granted && !entry.settled;
        let same = self.in_flight.iter().position(|entry| open(entry) && entry.tokens == tokens);
        if let Some(index) = same.or_else(|| self.in_flight.iter().position(open)) {
            self.in_flight[index].settled = true;
        }
        self.forget(now);
        let total = charged.total();
        if total > 0 {
            self.sent.push_back((now, total));
            self.sent_sum = self.sent_sum.saturating_add(total);
        }
    }

    fn forget(&mut self, now: Instant) {
        while let Some(&(at, tokens)) = self.sent.front() {
            if now.saturating_duration_since(at) < SENT_WINDOW {
                break;
            }
            self.sent.pop_front();
            self.sent_sum -= tokens;
        }
    }

    pub fn status(&self, now: Instant) -> TokenStatus {
        let recent = self.sent.iter().filter(|(at, _)| now.saturating_duration_since(*at) < SENT_WINDOW);
        TokenStatus {
            sent_last_minute: recent.map(|(_, tokens)| tokens).sum(),
            reserved_in_flight: self.in_flight.iter().map(|entry| entry.tokens).sum(),
            calibration: self.calibration.ratio(),
            calibration_samples: self.calibration.samples(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(total: bool, input: bool, output: bool) -> TokenQuotas {
        let mut at = 2..;
        let mut next = |on: bool| on.then(|| at.next().expect("unbounded"));
        TokenQuotas {
            total: next(total),
            input: next(input),
            output: next(output),
            accounting: TokenAccounting::Usage,
        }
    }

    fn units(needs: impl Iterator<Item = (usize, NonZeroU32)>) -> Vec<(usize, u32)> {
        needs.map(|(index, units)| (index, units.get())).collect()
    }

    #[test]
    fn a_reservation_takes_input_and_output_from_each_quota_as_it_counts_them() {
        let all = quotas(true, true, true);
        let r = Reservation { input: 100, output: 50 };
        assert_eq!(units(all.needs(r)), [(2, 150), (3, 100), (4, 50)]);
        let embedding = Reservation { input: 100, output: 0 };
        assert_eq!(units(all.needs(embedding)), [(2, 100), (3, 100)], "no output quota needed");
        let huge = Reservation { input: u64::MAX, output: 1 };
        assert_eq!(units(quotas(true, false, false).needs(huge)), [(2, u32::MAX)]);
    }

    #[test]
    fn settling_corrects_to_the_usage_or_keeps_the_output_reservation() {
        let mut q = quotas(true, false, true);
        let reserved = Reservation { input: 100, output: 500 };
        let usage = Usage { input: 120, cached_input: 0, output: 30 };
        let charged = q.charged(reserved, Settlement::Used(usage));
        assert_eq!(charged, Reservation { input: 120, output: 30 });
        assert_eq!(q.corrections(reserved, charged), [(2, -450), (3, -470)]);
        q.accounting = TokenAccounting::Reserved;
        let charged = q.charged(reserved, Settlement::Used(usage));
        assert_eq!(q.corrections(reserved, charged), [(2, 20)], "only the input is corrected");
        assert_eq!(q.charged(reserved, Settlement::Unknown), reserved);
        let nothing = q.charged(reserved, Settlement::NotProcessed);
        assert_eq!(q.corrections(reserved, nothing), [(2, -600), (3, -500)]);
    }

    #[test]
    fn cache_reads_are_charged_to_tokens_but_not_to_input_tokens() {
        let usage = Usage { input: 1000, cached_input: 800, output: 10 };
        let reserved = Reservation { input: 1000, output: 100 };
        let openai = quotas(true, false, false).charged(reserved, Settlement::Used(usage));
        assert_eq!(openai, Reservation { input: 1000, output: 10 }, "TPM counts cached prompt tokens");
        let anthropic = quotas(false, true, true).charged(reserved, Settlement::Used(usage));
        assert_eq!(anthropic, Reservation { input: 200, output: 10 }, "ITPM does not count cache reads");
    }

    #[test]
    fn the_book_counts_in_flight_and_the_last_minute() {
        let q = quotas(true, false, false);
        let t0 = Instant::now();
        let mut book = TokenBook::default();
        let reserved = Reservation { input: 100, output: 400 };
        book.granted(&q, &Needs::new(q.needs(reserved)), t0);
        assert_eq!(book.status(t0).reserved_in_flight, 500);
        book.settled(&q, (reserved, t0), Reservation { input: 100, output: 20 }, t0);
        assert_eq!(book.status(t0).reserved_in_flight, 500, "in flight until the attempt ends");
        book.released(t0);
        let status = book.status(t0 + Duration::from_secs(1));
        assert_eq!((status.reserved_in_flight, status.sent_last_minute), (0, 120));
        assert_eq!(book.status(t0 + SENT_WINDOW).sent_last_minute, 0);
    }

    /// A grant's tokens are in flight until its attempt ends, settled or
    /// not. Three grants at one instant (the driver hands out several at
    /// once): an LLM call that settles and ends, a plain request that ends,
    /// and an LLM call that streams on, shown until it ends.
    #[test]
    fn tokens_in_flight_end_with_their_attempt_settled_or_not() {
        let q = quotas(true, false, false);
        let t0 = Instant::now();
        let mut book = TokenBook::default();
        let (small, large) = (Reservation { input: 100, output: 0 }, Reservation { input: 100, output: 200 });
        for reserved in [small, Reservation::default(), large] {
            book.granted(&q, &Needs::new(q.needs(reserved)), t0);
        }
        assert_eq!(book.status(t0).reserved_in_flight, 400);
        book.settled(&q, (small, t0), small, t0);
        book.released(t0);
        assert_eq!(book.status(t0).reserved_in_flight, 300, "the small one ended, the large one streams");
        book.released(t0);
        assert_eq!(
            book.status(t0).reserved_in_flight,
            300,
            "the plain request ended; the large one streams on"
        );
        book.released(t0);
        assert_eq!(book.status(t0).reserved_in_flight, 0, "the large one ended unsettled: its caller left");
        book.released(t0);
        assert_eq!(book.status(t0).reserved_in_flight, 0);
    }
}
