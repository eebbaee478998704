//! Strict number and duration parsers for header values.
//!
//! Hand-written rather than `str::parse::<f64>` because header text from a
//! third party must not smuggle in `inf`, `NaN`, `1e308` or a sign, and
//! because integer arithmetic on nanoseconds is exact and saturates instead
//! of panicking: a huge value means "very long", which the caller caps.

use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A plain non-negative integer: ASCII digits only, `None` on overflow.
pub(crate) fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `DIGITS[.DIGITS]` times `unit`; saturates at `Duration::MAX`.
pub(crate) fn parse_decimal(s: &str, unit: Duration) -> Option<Duration> {
    let (nanos, rest) = decimal_nanos(s, unit.as_nanos())?;
    rest.is_empty().then(|| from_nanos(nanos))
}

/// A Go `time.Duration` string as OpenAI sends it: `6m0s`, `1.5s`, `20ms`.
/// Negative durations are refused; a bare `0` is zero.
pub(crate) fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    // Longer units first so `ms` is not read as `m` followed by garbage.
    const UNITS: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("μs", 1_000),
        ("ms", 1_000_000),
        ("h", 3_600 * NANOS_PER_SEC),
        ("m", 60 * NANOS_PER_SEC),
        ("s", NANOS_PER_SEC),
    ];
    let mut rest = s;
    let mut total: u128 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let (unit, size) = UNITS.iter().find(|(u, _)| after.starts_with(u))?;
        let (nanos, leftover) = decimal_nanos(number, *size)?;
        if !leftover.is_empty() {
            return None;
        }
        total = total.saturating_add(nanos);
        rest = &after[unit.len()..];
    }
    Some(from_nanos(total))
}

/// An RFC 3339 time (`2025-08-21T12:40:59Z`, offsets and fractions allowed).
pub(crate) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok().map(SystemTime::from)
}

/// Reads a leading `DIGITS[.DIGITS]` (Go also allows `.5` and `5.`, so do
/// we) scaled by `unit_nanos`; returns the value and the unread rest.
fn decimal_nanos(s: &str, unit_nanos: u128) -> Option<(u128, &str)> {
    let int_len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (int, rest) = s.split_at(int_len);
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(after_dot) => {
            let len = after_dot.find(|c: char| !c.is_ascii_digit()).unwrap_or(after_dot.len());
            after_dot.split_at(len)
        }
        None => ("", rest),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let whole = digits_saturating(int).saturating_mul(unit_nanos);
    // Nine fractional digits reach nanoseconds for any unit up to a second;
    // the rest cannot change the result by more than a nanosecond per unit.
    let frac = &frac[..frac.len().min(9)];
    let scale = 10u128.pow(frac.len() as u32);
    let part = digits_saturating(frac).saturating_mul(unit_nanos) / scale;
    Some((whole.saturating_add(part), rest))
}

fn digits_saturating(digits: &str) -> u128 {
    digits.bytes().fold(0u128, |acc, b| acc.saturating_mul(10).saturating_add(u128::from(b - b'0')))
}

fn from_nanos(nanos: u128) -> Duration {
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below 10^9 and so fits a u32.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SEC: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn integers_are_strict() {
        assert_eq!(parse_u64("42"), Some(42));
        assert_eq!(parse_u64("0"), Some(0));
        for bad in ["", "+1", "-1", "1.0", " 1", "1e3", "99999999999999999999999"] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decimals_scale_by_unit() {
        assert_eq!(parse_decimal("120", SEC), Some(Duration::from_secs(120)));
        assert_eq!(parse_decimal("1.5", SEC), Some(Duration::from_millis(1500)));
        assert_eq!(parse_decimal("20.25", MS), Some(Duration::from_micros(20_250)));
        assert_eq!(parse_decimal("0.000000001", SEC), Some(Duration::from_nanos(1)));
        assert_eq!(parse_decimal(".5", SEC), Some(Duration::from_millis(500)));
        assert_eq!(parse_decimal("5.", SEC), Some(Duration::from_secs(5)));
    }

    #[test]
    fn decimals_refuse_garbage() {
        for bad in ["", ".", "-1", "+1", "inf", "NaN", "1e3", "1.2.3", "1 s", "0x10"] {
            assert_eq!(parse_decimal(bad, SEC), None, "{bad:?}");
        }
    }

    #[test]
    fn huge_decimals_saturate() {
        let huge = "9".repeat(60);
        assert_eq!(parse_decimal(&huge, SEC), Some(Duration::MAX));
    }

    #[test]
    fn go_durations() {
        let cases = [
            ("6m0s", Duration::from_secs(360)),
            ("1s", SEC),
            ("20ms", Duration::from_millis(20)),
            ("1h2m3.5s", Duration::from_millis(3_723_500)),
            ("1.5s", Duration::from_millis(1500)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
            ("0", Duration::ZERO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Some(want), "{text}");
        }
        for bad in ["", "5", "-1s", "1x", "s", "1.2.3s", "1m 2s", "ms"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn never_panic(s in "\\PC*") {
            let _ = parse_u64(&s);
            let _ = parse_decimal(&s, SEC);
            let _ = parse_go_duration(&s);
        }

        #[test]
        fn decimal_round_trip(secs in 0u64..1_000_000_000, millis in 0u32..1000) {
            let text = format!("{secs}.{millis:03}");
            let want = Duration::from_secs(secs) + Duration::from_millis(u64::from(millis));
            prop_assert_eq!(parse_decimal(&text, SEC), Some(want));
        }
    }
}
