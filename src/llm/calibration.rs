//! Correcting input estimates by what an upstream reports it counted.
//!
//! An estimate is off by a steady factor more often than at random: a
//! character ratio on a language it was not made for, a compatible server
//! with another vocabulary, framing tokens a provider adds. So each upstream
//! keeps a moving ratio of reported to estimated input tokens and scales its
//! estimates by it. The ratio is that of two exponentially weighted sums,
//! so a large request weighs more than a short one, the first answers count
//! fully (the weight is 1/n until [`WINDOW`] answers), and one odd answer
//! moves it little. It stays within [`MIN_RATIO`]..=[`MAX_RATIO`], because
//! an upstream that reports nonsense must not make requests free or make
//! every one too big to ever fit.
//!
//! A reservation is scaled by more than the ratio: by the highest ratio
//! recent answers showed ([`Calibration::reserve`]), at most
//! [`MAX_MARGIN`] above the ratio. Estimates scatter around the ratio from
//! one text to the next, and a call reserving less than it uses is what
//! draws a 429 from a provider whose window pacegate fills to the limit; a
//! reservation above use costs nothing once settled, since tokens given
//! back late are kept as credit ([`crate::limit::ledger`]).

/// Roughly how many recent answers the ratio follows.
pub const WINDOW: u32 = 20;
/// The ratio's bounds.
pub const MIN_RATIO: f64 = 0.25;
pub const MAX_RATIO: f64 = 4.0;
/// A reservation's ratio is at most this share above the moving ratio.
pub const MAX_MARGIN: f64 = 0.25;

/// A moving ratio of reported to estimated input tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Weighted sum of estimated input tokens.
    estimated: f64,
    /// Weighted sum of reported input tokens.
    reported: f64,
    /// Answers observed, up to [`WINDOW`]: sets the weight of the next one.
    samples: u32,
    /// The highest ratio of one answer lately, decaying toward the ratio
    /// by 1/[`WINDOW`] of the difference per answer.
    high: f64,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration::new()
    }
}

impl Calibration {
    /// No answers yet: estimates stand as they are (ratio 1).
    pub fn new() -> Calibration {
        Calibration { estimated: 0.0, reported: 0.0, samples: 0, high: 1.0 }
    }

    /// Learns from one answer: the uncalibrated `estimated` input and the
    /// `reported` one. An answer reporting 0, or estimated at 0, says
    /// nothing about the ratio and is ignored.
    pub fn observe(&mut self, estimated: u64, reported: u64) {
        if estimated == 0 || reported == 0 {
            return;
        }
        self.samples = (self.samples + 1).min(WINDOW);
        let weight = 1.0 / f64::from(self.samples);
        self.estimated += weight * (estimated as f64 - self.estimated);
        self.reported += weight * (reported as f64 - self.reported);
        let ratio = self.ratio();
        let this = (reported as f64 / estimated as f64).clamp(MIN_RATIO, MAX_RATIO);
        let decayed = if self.samples == 1 {
            this
        } else {
            ratio + (self.high - ratio) * (1.0 - 1.0 / f64::from(WINDOW))
        };
        self.high = this.max(decayed);
    }

    /// Reported per estimated token, within the bounds.
    pub fn ratio(&self) -> f64 {
        if self.samples == 0 {
            return 1.0;
        }
        (self.reported / self.estimated).clamp(MIN_RATIO, MAX_RATIO)
    }

    /// `estimate` scaled for a reservation: by the highest recent ratio,
    /// within [`MAX_MARGIN`] above the ratio, rounded up.
    pub fn reserve(&self, estimate: u64) -> u64 {
        let ratio = self.ratio();
        let scaled = (estimate as f64 * self.high.clamp(ratio, ratio * (1.0 + MAX_MARGIN))).ceil();
        // `as` saturates: a scaled u64::MAX stays u64::MAX.
        scaled as u64
    }

    /// Answers the ratio is based on, up to [`WINDOW`].
    pub fn samples(&self) -> u32 {
        self.samples
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn starts_neutral() {
        let c = Calibration::new();
        assert_eq!((c.ratio(), c.reserve(1234), c.samples()), (1.0, 1234, 0));
    }

    #[test]
    fn converges_to_a_steady_ratio() {
        let mut c = Calibration::new();
        c.observe(100, 130);
        assert!((c.ratio() - 1.3).abs() < 1e-9);
        for _ in 0..200 {
            c.observe(1000, 800);
        }
        assert!((c.ratio() - 0.8).abs() < 1e-3, "{}", c.ratio());
        assert!((800..=801).contains(&c.reserve(1000)));
    }

    #[test]
    fn one_odd_answer_moves_it_little() {
        let mut c = Calibration::new();
        for _ in 0..WINDOW {
            c.observe(1000, 1000);
        }
        c.observe(1000, 3000);
        assert!(c.ratio() < 1.11, "{}", c.ratio());
    }

    #[test]
    fn reservations_cover_the_scatter_of_recent_answers() {
        let mut c = Calibration::new();
        assert_eq!(c.reserve(1000), 1000, "nothing known: the estimate");
        for reported in [1000, 1100, 900, 1000] {
            c.observe(1000, reported);
        }
        assert!((c.ratio() - 1.0).abs() < 1e-9);
        assert!((1090..=1100).contains(&c.reserve(1000)), "{}", c.reserve(1000));
        // An odd answer raises it at most MAX_MARGIN above the ratio; it decays.
        c.observe(1000, 3000);
        let ratio = c.ratio();
        assert_eq!(c.reserve(1000), (1000.0 * ratio * (1.0 + MAX_MARGIN)).ceil() as u64);
        for _ in 0..200 {
            c.observe(1000, 1000);
        }
        assert!((1000..=1001).contains(&c.reserve(1000)), "{}", c.reserve(1000));
    }

    #[test]
    fn bounded_and_ignores_empty_answers() {
        let mut c = Calibration::new();
        c.observe(10, 1_000_000);
        assert_eq!(c.ratio(), MAX_RATIO);
        let mut c = Calibration::new();
        c.observe(1_000_000, 1);
        assert_eq!(c.ratio(), MIN_RATIO);
        c.observe(0, 5);
        c.observe(5, 0);
        assert_eq!(c.samples(), 1);
        assert_eq!(Calibration::new().reserve(u64::MAX), u64::MAX);
    }

    proptest! {
        #[test]
        fn always_within_bounds(answers in prop::collection::vec((any::<u64>(), any::<u64>()), 0..50)) {
            let mut c = Calibration::new();
            for (estimated, reported) in answers {
                c.observe(estimated, reported);
                prop_assert!((MIN_RATIO..=MAX_RATIO).contains(&c.ratio()));
                let estimate = estimated % 1_000_000;
                let floor = (estimate as f64 * c.ratio()).ceil() as u64;
                let ceiling = (estimate as f64 * c.ratio() * (1.0 + MAX_MARGIN)).ceil() as u64;
                prop_assert!((floor..=ceiling).contains(&c.reserve(estimate)));
            }
        }
    }
}
