//! Durations (`"250ms"`, `"1m30s"`, `"1.5s"`) and rates (`"10/s"`, `"5_000/h"`,
//! `"3/250ms"`), parsed from config strings and formatted back.
//!
//! Both parsers return a one-line `String` error that quotes the input, so
//! that serde can attach it to the offending TOML value and the user sees
//! `path:line:col: invalid duration "5x": ...`. Neither ever panics: every
//! arithmetic step is checked, which the property tests below exercise.
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use super::Rate;

/// Longest duration accepted anywhere in the config (100 × 365 days).
///
/// Far beyond any sensible timeout or window, yet small enough that
/// `Instant::now() + d` can never overflow in the code that uses it.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

const NANOS_PER_MS: u128 = 1_000_000;
const NANOS_PER_S: u128 = 1_000 * NANOS_PER_MS;

/// Units from the largest to the smallest; `min` is an alias of `m`.
const UNITS: &[(&str, u128)] = &[
    ("d", 86_400 * NANOS_PER_S),
    ("h", 3_600 * NANOS_PER_S),
    ("min", 60 * NANOS_PER_S),
    ("m", 60 * NANOS_PER_S),
    ("s", NANOS_PER_S),
    ("ms", NANOS_PER_MS),
];

/// More decimals than this would only describe fractions of a nanosecond.
const MAX_DECIMALS: usize = 9;

const RATE_HINT: &str = "expected N/unit like \"10/s\", \"5000/h\" or \"3/250ms\"";

const DURATION_HINT: &str = "expected a number followed by ms, s, m, h or d";

/// Parses a duration such as `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"`,
/// compounds such as `"1m30s"` and decimals such as `"1.5s"`.
///
/// Units: `ms`, `s`, `m` (or `min`), `h`, `d`. Zero (`"0s"`) is a valid
/// duration; callers that need a positive one check that themselves.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let fail = |reason: &str| format!("invalid duration {s:?}: {reason}");
    let input = s.trim();
    if input.is_empty() {
        return Err(fail(&format!("empty; {DURATION_HINT}")));
    }
    if input.starts_with('-') {
        return Err(fail("durations cannot be negative"));
    }

    let mut rest = input;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        // One component: digits, an optional fraction, then a unit.
        let (int_part, after_int) = split_prefix(rest, |c| c.is_ascii_digit());
        if int_part.is_empty() {
            return Err(fail(DURATION_HINT));
        }
        let (frac_part, after_frac) = match after_int.strip_prefix('.') {
            Some(after_dot) => {
                let (frac, after) = split_prefix(after_dot, |c| c.is_ascii_digit());
                if frac.is_empty() {
                    return Err(fail(DURATION_HINT));
                }
                (frac, after)
            }
            None => ("", after_int),
        };
        if frac_part.len() > MAX_DECIMALS {
            return Err(fail(&format!("at most {MAX_DECIMALS} decimal places")));
        }
        let (unit, after_unit) = split_prefix(after_frac, |c| c.is_ascii_alphabetic());
        if unit.is_empty() {
            // "1.5.5s" lacks no unit: it has a character no duration has.
            return Err(fail(&match after_frac.chars().next() {
                None => format!("missing unit; {DURATION_HINT}"),
                Some(c) => format!(
                    "unexpected {c:?} after {:?}; {DURATION_HINT}",
                    &rest[..rest.len() - after_frac.len()]
                ),
            }));
        }
        let Some(&(_, unit_nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(fail(DURATION_HINT));
        };

        let nanos = component_nanos(int_part, frac_part, unit_nanos).ok_or_else(|| fail(&too_large()))?;
        total = total.checked_add(nanos).ok_or_else(|| fail(&too_large()))?;
        rest = after_unit;
    }

    if total > MAX_DURATION.as_nanos() {
        return Err(fail(&too_large()));
    }
    let secs = u64::try_from(total / NANOS_PER_S).map_err(|_| fail(&too_large()))?;
    let nanos = u32::try_from(total % NANOS_PER_S).map_err(|_| fail(&too_large()))?;
    Ok(Duration::new(secs, nanos))
}

/// Parses a rate: `"N/s"`, `"N/min"` (or `"N/m"`), `"N/h"`, `"N/d"`, `"N/ms"`,
/// or `"N/<duration>"` such as `"N/250ms"`, `"N/5s"`, `"N/1m30s"`.
///
/// `N` is an integer of at least 1 and may use `_` between digits
/// (`"5_000/h"`); the window must be longer than zero.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let fail = |reason: &str| format!("invalid rate {s:?}: {reason}");
    let Some((count, window)) = s.split_once('/') else {
        return Err(fail(RATE_HINT));
    };
    let (count, window) = (count.trim(), window.trim());

    let count = parse_count(count).map_err(|reason| fail(&reason))?;
    let per = match UNITS.iter().find(|(name, _)| *name == window) {
        // A bare unit means one of it: "10/s", "10/min".
        Some(&(_, nanos)) => nanos_to_duration(nanos),
        None => parse_duration(window).map_err(|_| fail(&format!("bad window {window:?}; {RATE_HINT}")))?,
    };
    if per.is_zero() {
        return Err(fail("the window must be longer than zero"));
    }
    // Pacers work in whole nanoseconds between requests.
    if per.as_nanos() < u128::from(count.get()) {
        return Err(fail("more than one request per nanosecond"));
    }
    Ok(Rate { count, per })
}

/// Formats a duration so that [`parse_duration`] reads it back exactly:
/// `"1h30m"`, `"250ms"`, `"1s500ms"`, `"0.000001ms"`, `"0s"`.
pub fn format_duration(d: Duration) -> String {
    let mut nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for &(name, unit) in UNITS.iter().filter(|(name, _)| *name != "min") {
        let n = nanos / unit;
        nanos %= unit;
        if n == 0 && !(name == "ms" && nanos > 0) {
            continue;
        }
        out.push_str(&n.to_string());
        if name == "ms" && nanos > 0 {
            // Sub-millisecond rest as a decimal fraction of a millisecond.
            let frac = format!("{nanos:06}");
            out.push('.');
            out.push_str(frac.trim_end_matches('0'));
        }
        out.push_str(name);
    }
    out
}

// === impl Rate ===

impl fmt::Display for Rate {
    /// `"10/s"`, `"500/min"`, `"5000/h"`, `"3/250ms"`: what the config would say.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_nanos() {
            n if n == NANOS_PER_S => Some("s"),
            n if n == 60 * NANOS_PER_S => Some("min"),
            n if n == 3_600 * NANOS_PER_S => Some("h"),
            n if n == 86_400 * NANOS_PER_S => Some("d"),
            _ => None,
        };
        match unit {
            Some(unit) => write!(f, "{}/{unit}", self.count),
            None => write!(f, "{}/{}", self.count, format_duration(self.per)),
        }
    }
}

// === helpers ===

/// Splits `s` after its longest prefix of characters matching `pred`.
fn split_prefix(s: &str, pred: impl Fn(char) -> bool) -> (&str, &str) {
    let end = s.find(|c: char| !pred(c)).unwrap_or(s.len());
    s.split_at(end)
}

/// `int.frac` units in nanoseconds; `None` on overflow.
fn component_nanos(int_part: &str, frac_part: &str, unit_nanos: u128) -> Option<u128> {
    // More than 30 integer digits cannot fit in u128 nanoseconds anyway.
    if int_part.len() > 30 {
        return None;
    }
    let int: u128 = int_part.parse().ok()?;
    let mut nanos = int.checked_mul(unit_nanos)?;
    if !frac_part.is_empty() {
        let frac: u128 = frac_part.parse().ok()?;
        let scale = 10u128.checked_pow(u32::try_from(frac_part.len()).ok()?)?;
        nanos = nanos.checked_add(frac.checked_mul(unit_nanos)? / scale)?;
    }
    Some(nanos)
}

/// Request count of a rate: digits with optional `_` between them, at least 1.
fn parse_count(s: &str) -> Result<NonZeroU32, String> {
    let well_formed = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_digit() || c == '_')
        && !s.starts_with('_')
        && !s.ends_with('_')
        && !s.contains("__");
    if !well_formed {
        return Err(format!("{s:?} is not a whole number; {RATE_HINT}"));
    }
    let digits: String = s.chars().filter(|c| *c != '_').collect();
    let count: u32 = digits.parse().map_err(|_| format!("{s:?} is too large (at most {})", u32::MAX))?;
    NonZeroU32::new(count).ok_or_else(|| "the count must be at least 1".to_owned())
}

fn nanos_to_duration(nanos: u128) -> Duration {
    // Only called with the unit table's constants, all far below u64 seconds.
    let secs = u64::try_from(nanos / NANOS_PER_S).unwrap_or(u64::MAX);
    Duration::new(secs, (nanos % NANOS_PER_S) as u32)
}

fn too_large() -> String {
    format!("too large (at most {})", format_duration(MAX_DURATION))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5min"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn compound_and_decimal_durations() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h1m1s1ms"), Ok(ms(3_661_001)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1_500)));
        assert_eq!(parse_duration("0.25h"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1.5ms"), Ok(Duration::from_micros(1_500)));
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
    }

    #[test]
    fn bad_durations_say_why() {
        assert_eq!(
            parse_duration("5x").unwrap_err(),
            r#"invalid duration "5x": expected a number followed by ms, s, m, h or d"#
        );
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("30").unwrap_err().contains("missing unit"));
        assert_eq!(
            parse_duration("1.5.5s").unwrap_err(),
            r#"invalid duration "1.5.5s": unexpected '.' after "1.5"; expected a number followed by ms, s, m, h or d"#
        );
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("99999999999d").unwrap_err().contains("too large"));
        assert!(parse_duration("1.0000000001s").unwrap_err().contains("decimal"));
        for bad in ["s", "1.s", ".5s", "1 s", "1s 2m", "1e3s", "1_000s", "1S", "abc", "1s?"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn rates_with_named_units() {
        let rate = |count: u32, per: Duration| Rate { count: NonZeroU32::new(count).unwrap(), per };
        assert_eq!(parse_rate("10/s"), Ok(rate(10, Duration::from_secs(1))));
        assert_eq!(parse_rate("500/min"), Ok(rate(500, Duration::from_secs(60))));
        assert_eq!(parse_rate("500/m"), Ok(rate(500, Duration::from_secs(60))));
        assert_eq!(parse_rate("5000/h"), Ok(rate(5_000, Duration::from_secs(3_600))));
        assert_eq!(parse_rate("5_000/h"), Ok(rate(5_000, Duration::from_secs(3_600))));
        assert_eq!(parse_rate("1/d"), Ok(rate(1, Duration::from_secs(86_400))));
        assert_eq!(parse_rate("3/250ms"), Ok(rate(3, ms(250))));
        assert_eq!(parse_rate("10/5s"), Ok(rate(10, Duration::from_secs(5))));
        assert_eq!(parse_rate("10/2m"), Ok(rate(10, Duration::from_secs(120))));
    }

    #[test]
    fn bad_rates_say_why() {
        assert!(parse_rate("0/s").unwrap_err().contains("at least 1"));
        assert!(parse_rate("10/0s").unwrap_err().contains("longer than zero"));
        assert!(parse_rate("10").unwrap_err().contains("expected N/unit"));
        assert!(parse_rate("10/x").unwrap_err().contains("bad window"));
        assert!(parse_rate("99999999999/s").unwrap_err().contains("too large"));
        assert!(parse_rate("2000000/ms").unwrap_err().contains("nanosecond"));
        for bad in ["/s", "-1/s", "1.5/s", "_1/s", "1_/s", "1__0/s", "a/s", "10/", "10/s/s"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn formatting_reads_naturally() {
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(ms(1_500)), "1s500ms");
        assert_eq!(format_duration(Duration::from_nanos(1)), "0.000001ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(parse_rate("5000/h").unwrap().to_string(), "5000/h");
        assert_eq!(parse_rate("500/m").unwrap().to_string(), "500/min");
        assert_eq!(parse_rate("3/250ms").unwrap().to_string(), "3/250ms");
    }

    fn any_duration() -> impl Strategy<Value = Duration> {
        (0..=MAX_DURATION.as_secs(), 0u32..1_000_000_000).prop_map(|(s, n)| {
            // Stay within MAX_DURATION when the seconds are already at the cap.
            let d = Duration::new(s, n);
            d.min(MAX_DURATION)
        })
    }

    proptest! {
        #[test]
        fn durations_round_trip(d in any_duration()) {
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }

        #[test]
        fn rates_round_trip(count in 1u32..=1_000_000, window_ms in 1u64..=30 * 86_400_000) {
            let rate = Rate { count: NonZeroU32::new(count).unwrap(), per: ms(window_ms) };
            prop_assert_eq!(parse_rate(&rate.to_string()), Ok(rate));
        }

        #[test]
        fn written_durations_parse(n in 0u64..10_000_000, unit in 0usize..UNITS.len()) {
            let (name, nanos) = UNITS[unit];
            let parsed = parse_duration(&format!("{n}{name}"));
            let nanos = u128::from(n) * nanos;
            if nanos <= MAX_DURATION.as_nanos() {
                let expected = Duration::from_nanos(u64::try_from(nanos).unwrap());
                prop_assert_eq!(parsed, Ok(expected));
            } else {
                prop_assert!(parsed.unwrap_err().contains("too large"));
            }
        }

        #[test]
        fn duration_parser_never_panics(s in "\\PC*") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn duration_parser_never_panics_on_near_misses(s in "[0-9._ -]{0,40}(ms|s|m|min|h|d|x)?[0-9.]{0,30}") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn rate_parser_never_panics(s in "\\PC*") {
            let _ = parse_rate(&s);
        }

        #[test]
        fn rate_parser_never_panics_on_near_misses(s in "[0-9_]{0,40}/[0-9.]{0,30}(ms|s|m|min|h|d)?") {
            let _ = parse_rate(&s);
        }
    }
}
