//! Cumulative hardware counters: deltas that are never negative.

/// How a counter moved between two reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Normal advance by this much.
    Advanced(u64),
    /// Passed its wrap point once; the advance is this much.
    Wrapped(u64),
    /// Went backwards with no wrap to explain it (reboot, driver reload): the advance
    /// over this interval is unknown and must not be guessed.
    Reset,
}

impl Step {
    pub fn delta(self) -> Option<u64> {
        match self {
            Step::Advanced(d) | Step::Wrapped(d) => Some(d),
            Step::Reset => None,
        }
    }
}

/// The advance from `prev` to `cur` of a counter that wraps to 0 after `wrap_at`
/// (RAPL's `max_energy_range_uj`), or never wraps when `wrap_at` is `None` (NVML energy).
///
/// A counter can pass its wrap point at most once per interval if the interval is short
/// enough; RAPL's range is hours at full package power, so one wrap is the only reading.
/// The wrapped advance counts `wrap_at - prev + cur`, within one hardware energy unit of
/// the truth.
pub fn step(prev: u64, cur: u64, wrap_at: Option<u64>) -> Step {
    if cur >= prev {
        return Step::Advanced(cur - prev);
    }
    match wrap_at {
        Some(max) if prev <= max => Step::Wrapped(max - prev + cur),
        _ => Step::Reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances() {
        assert_eq!(step(10, 25, Some(100)), Step::Advanced(15));
        assert_eq!(step(10, 10, None), Step::Advanced(0));
        assert_eq!(step(0, u64::MAX, None), Step::Advanced(u64::MAX));
    }

    #[test]
    fn wraps_through_max_range() {
        assert_eq!(step(90, 5, Some(100)), Step::Wrapped(15));
        assert_eq!(step(100, 0, Some(100)), Step::Wrapped(0));
        let max = 262_143_328_850;
        assert_eq!(step(max - 1_000, 500, Some(max)), Step::Wrapped(1_500));
    }

    #[test]
    fn backwards_without_wrap_is_a_reset_never_negative() {
        assert_eq!(step(1_000, 10, None), Step::Reset);
        // A previous value above the range cannot have wrapped: it is a reset.
        assert_eq!(step(500, 10, Some(100)), Step::Reset);
        assert_eq!(Step::Reset.delta(), None);
    }

    #[test]
    fn delta_is_bounded_by_range_for_every_pair() {
        let max = 1_000u64;
        for prev in (0..=max).step_by(37) {
            for cur in (0..=max).step_by(41) {
                let d = step(prev, cur, Some(max)).delta().unwrap();
                assert!(d <= max, "{prev}->{cur} gave {d}");
                assert_eq!((prev + d) % max, cur % max, "{prev}->{cur}");
            }
        }
    }
}
