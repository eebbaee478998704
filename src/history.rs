//! A short history of every upstream, for the dashboard: one sample a
//! second for the last five minutes, so that a page loaded now draws what
//! happened before it was opened instead of starting empty.
//!
//! Counters only grow, so a sample is what each one added since the one
//! before (a counter that went back, as when a reload removes an upstream
//! and the next adds it again between two samples, adds 0).
//! Queue waits are counted per bucket of [`QUEUE_WAIT_BOUNDS`]; p50 and
//! p99 are the upper bound of the bucket that holds them, over one second
//! or over the last minute. The memory is bounded: [`SAMPLES`] samples per
//! configured upstream. Time is passed in (milliseconds since the Unix
//! epoch), so every rule here is tested on a clock of its own.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

pub use crate::metrics::QUEUE_WAIT_BOUNDS;

/// Samples kept per upstream: five minutes at one a second.
pub const SAMPLES: usize = 300;
/// What "the last minute" spans, in milliseconds.
const MINUTE_MS: u64 = 60_000;
/// Buckets of queue waits: one per bound, and one above the last.
pub const WAIT_BUCKETS: usize = QUEUE_WAIT_BOUNDS.len() + 1;

/// One upstream's counters at one instant, as they stand since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Answers to callers.
    pub requests: u64,
    /// Attempts sent upstream, retries included.
    pub attempts: u64,
    /// Attempts the upstream answered 429.
    pub rate_limited: u64,
    pub retries: u64,
    pub queue_full: u64,
    pub queue_timeout: u64,
    /// Answers 502 and 504 to callers (upstream unreachable, timed out).
    pub bad_gateway: u64,
    pub gateway_timeout: u64,
    /// Queue waits by bucket of [`QUEUE_WAIT_BOUNDS`], the last one above.
    pub waits: [u64; WAIT_BUCKETS],
}

/// What one second added to an upstream's [`Totals`], and its queue then.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    at_ms: u64,
    added: Totals,
    queue_depth: u64,
}

/// One upstream's counters at the last reading and its samples since.
#[derive(Debug)]
struct Series {
    last: Totals,
    samples: VecDeque<Sample>,
}

/// The samples of every configured upstream, by name.
#[derive(Debug, Default)]
pub struct History {
    series: BTreeMap<String, Series>,
}

impl History {
    /// Records one reading of every configured upstream: `(name, totals,
    /// queue depth)`. An upstream read for the first time only sets where
    /// its counts start; one no longer configured is forgotten.
    pub fn record(&mut self, now_ms: u64, readings: impl IntoIterator<Item = (String, Totals, u64)>) {
        let mut kept = BTreeMap::new();
        for (name, totals, queue_depth) in readings {
            let series = match self.series.remove(&name) {
                Some(mut series) => {
                    let added = series.last.added_until(&totals);
                    if series.samples.len() == SAMPLES {
                        series.samples.pop_front();
                    }
                    series.samples.push_back(Sample { at_ms: now_ms, added, queue_depth });
                    series.last = totals;
                    series
                }
                None => Series { last: totals, samples: VecDeque::with_capacity(SAMPLES) },
            };
            kept.insert(name, series);
        }
        self.series = kept;
    }

    /// The history of upstream `name` as served: its samples, oldest first,
    /// and what the minute before `now_ms` adds up to. `None` for an
    /// upstream not recorded yet.
    pub fn upstream(&self, name: &str, now_ms: u64) -> Option<Value> {
        let series = self.series.get(name)?;
        let samples: Vec<Value> = series
            .samples
            .iter()
            .map(|s| {
                let mut value = counts(&s.added);
                value["at_unix_ms"] = json!(s.at_ms);
                value["queue_depth"] = json!(s.queue_depth);
                value
            })
            .collect();
        let since = now_ms.saturating_sub(MINUTE_MS);
        let minute = series
            .samples
            .iter()
            .filter(|s| s.at_ms > since)
            .fold(Totals::default(), |sum, s| sum.plus(&s.added));
        Some(json!({ "samples": samples, "last_minute": counts(&minute) }))
    }
}

impl Totals {
    /// What the counters added from `self` to `later`.
    fn added_until(&self, later: &Self) -> Self {
        let mut waits = [0; WAIT_BUCKETS];
        for (slot, (before, after)) in waits.iter_mut().zip(self.waits.iter().zip(&later.waits)) {
            *slot = after.saturating_sub(*before);
        }
        Self {
            requests: later.requests.saturating_sub(self.requests),
            attempts: later.attempts.saturating_sub(self.attempts),
            rate_limited: later.rate_limited.saturating_sub(self.rate_limited),
            retries: later.retries.saturating_sub(self.retries),
            queue_full: later.queue_full.saturating_sub(self.queue_full),
            queue_timeout: later.queue_timeout.saturating_sub(self.queue_timeout),
            bad_gateway: later.bad_gateway.saturating_sub(self.bad_gateway),
            gateway_timeout: later.gateway_timeout.saturating_sub(self.gateway_timeout),
            waits,
        }
    }

    fn plus(mut self, other: &Self) -> Self {
        self.requests += other.requests;
        self.attempts += other.attempts;
        self.rate_limited += other.rate_limited;
        self.retries += other.retries;
        self.queue_full += other.queue_full;
        self.queue_timeout += other.queue_timeout;
        self.bad_gateway += other.bad_gateway;
        self.gateway_timeout += other.gateway_timeout;
        for (sum, added) in self.waits.iter_mut().zip(&other.waits) {
            *sum += added;
        }
        self
    }
}

/// The served form of some counts: the counters, and queue wait p50/p99
/// (`null` when nothing waited).
fn counts(totals: &Totals) -> Value {
    json!({
        "requests": totals.requests,
        "attempts": totals.attempts,
        "rate_limited": totals.rate_limited,
        "retries": totals.retries,
        "rejected": { "queue_full": totals.queue_full, "queue_timeout": totals.queue_timeout },
        "errors": { "502": totals.bad_gateway, "504": totals.gateway_timeout },
        "queue_wait_ms": {
            "p50": quantile_ms(&totals.waits, 0.5),
            "p99": quantile_ms(&totals.waits, 0.99),
        },
    })
}

/// The upper bound, in milliseconds, of the bucket that holds quantile `q`
/// of these waits; above the last bound, the last bound. `None` without waits.
fn quantile_ms(waits: &[u64; WAIT_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = waits.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the wait at quantile q, from 1.
    let rank = ((total as f64 * q).ceil() as u64).max(1);
    let mut seen = 0;
    let bucket = waits.iter().position(|&n| {
        seen += n;
        seen >= rank
    })?;
    let bound = QUEUE_WAIT_BOUNDS[bucket.min(QUEUE_WAIT_BOUNDS.len() - 1)];
    Some(bound * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Totals with `requests` answers and waits in buckets `(index, count)`.
    fn totals(requests: u64, waits: &[(usize, u64)]) -> Totals {
        let mut totals = Totals { requests, attempts: requests, ..Totals::default() };
        for &(bucket, count) in waits {
            totals.waits[bucket] = count;
        }
        totals
    }

    fn reading(name: &str, totals: Totals, depth: u64) -> Vec<(String, Totals, u64)> {
        vec![(name.to_owned(), totals, depth)]
    }

    #[test]
    fn a_sample_is_what_one_second_added() {
        let mut history = History::default();
        history.record(1_000, reading("api", totals(5, &[]), 0));
        assert_eq!(
            history.upstream("api", 1_000).unwrap()["samples"],
            json!([]),
            "the first reading is a start"
        );
        history.record(2_000, reading("api", totals(12, &[(0, 7)]), 3));
        history.record(3_000, reading("api", totals(12, &[(0, 7)]), 0));
        let served = history.upstream("api", 3_000).unwrap();
        let samples = served["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0]["at_unix_ms"], 2_000);
        assert_eq!(samples[0]["requests"], 7);
        assert_eq!(samples[0]["queue_depth"], 3);
        assert_eq!(samples[1]["requests"], 0);
        assert_eq!(samples[1]["queue_wait_ms"]["p50"], Value::Null, "nothing waited in that second");
        assert_eq!(served["last_minute"]["requests"], 7);
    }

    #[test]
    fn the_last_minute_leaves_older_samples_out() {
        let mut history = History::default();
        let mut rejected = Totals::default();
        history.record(0, reading("api", rejected.clone(), 0));
        for second in 1..=90 {
            rejected.queue_full += 1;
            rejected.queue_timeout += 2;
            history.record(second * 1_000, reading("api", rejected.clone(), 0));
        }
        let minute = &history.upstream("api", 90_000).unwrap()["last_minute"];
        assert_eq!(minute["rejected"], json!({ "queue_full": 60, "queue_timeout": 120 }));
    }

    #[test]
    fn samples_are_bounded_to_five_minutes() {
        let mut history = History::default();
        for second in 0..(SAMPLES as u64 + 50) {
            history.record(second * 1_000, reading("api", totals(second, &[]), 0));
        }
        let samples = history.upstream("api", 0).unwrap()["samples"].as_array().unwrap().clone();
        assert_eq!(samples.len(), SAMPLES);
        assert_eq!(samples[0]["at_unix_ms"], 50_000, "the oldest went first");
    }

    #[test]
    fn an_upstream_no_longer_read_is_forgotten() {
        let mut history = History::default();
        history.record(0, reading("old", Totals::default(), 0));
        history.record(1_000, reading("new", Totals::default(), 0));
        assert!(history.upstream("old", 1_000).is_none());
        assert!(history.upstream("new", 1_000).is_some());
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let mut waits = [0; WAIT_BUCKETS];
        assert_eq!(quantile_ms(&waits, 0.5), None);
        // 98 waits in the first bucket (1 ms), 2 in the fifth (100 ms).
        waits[0] = 98;
        waits[4] = 2;
        assert_eq!(quantile_ms(&waits, 0.5), Some(1.0));
        assert_eq!(quantile_ms(&waits, 0.99), Some(100.0));
        // Above the last bound: the last bound.
        let mut long = [0; WAIT_BUCKETS];
        long[WAIT_BUCKETS - 1] = 1;
        assert_eq!(quantile_ms(&long, 0.5), Some(60_000.0));
    }

    #[test]
    fn a_counter_that_went_back_adds_nothing() {
        let mut history = History::default();
        history.record(0, reading("api", totals(10, &[(2, 4)]), 0));
        history.record(1_000, reading("api", totals(3, &[(2, 1)]), 0));
        let served = history.upstream("api", 1_000).unwrap();
        assert_eq!(served["samples"][0]["requests"], 0);
        assert_eq!(served["samples"][0]["queue_wait_ms"]["p50"], Value::Null);
    }
}
