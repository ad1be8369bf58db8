//! Pure helpers that turn NVML's cumulative and instantaneous answers into per-span values.

use super::TickMs;

/// A cumulative nanosecond counter read at a sample tick, with NVML's own timestamp of
/// the reading (µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub at: TickMs,
    pub ns: u64,
    pub ref_us: u64,
}

/// Milliseconds a cumulative nanosecond counter advanced over the span that ends at this
/// tick and starts at `prev_tick`, the sample before it. Only given when the previous
/// reading was taken at exactly that tick: after a skipped or stalled sample the advance
/// would cover more than the span. Whole milliseconds of the cumulative value, so the
/// spans add up to the counter without rounding drift; a counter that went back (driver
/// reload) or advanced more than the time between the readings gives nothing. The reads
/// happen a little after their ticks, so a GPU capped all along can advance slightly more
/// than the span between ticks: that is the whole span.
pub fn advance_ms(prev: Option<Reading>, prev_tick: Option<TickMs>, cur: Reading) -> Option<u64> {
    let prev = prev.filter(|p| Some(p.at) == prev_tick && p.at < cur.at)?;
    let ms = (cur.ns / 1_000_000).checked_sub(prev.ns / 1_000_000)?;
    let between_ms = cur.ref_us.checked_sub(prev.ref_us)? / 1_000;
    // Whole ms of each end can add one.
    (ms <= between_ms + 1).then_some(ms.min(cur.at - prev.at))
}

/// A GPM percentage as the wire takes it: rounding may put it a hair outside 0..=100,
/// which is clamped; anything further out, or not a number, is a fault of the reading.
pub fn percent(v: f64) -> Option<f64> {
    match v {
        v if (0.0..=100.0).contains(&v) => Some(v),
        v if (-0.5..0.0).contains(&v) => Some(0.0),
        v if v > 100.0 && v <= 100.5 => Some(100.0),
        _ => None,
    }
}

/// A GPM throughput in MiB/s; negative or not finite is a fault of the reading.
pub fn rate(v: f64) -> Option<f64> {
    (0.0..=1_048_576.0).contains(&v).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reading taken exactly at its tick.
    fn r(at: TickMs, ns: u64) -> Reading {
        Reading {
            at,
            ns,
            ref_us: at * 1_000,
        }
    }

    #[test]
    fn advance_over_consecutive_samples() {
        assert_eq!(advance_ms(None, None, r(100, 5_000_000)), None);
        assert_eq!(
            advance_ms(Some(r(100, 5_000_000)), Some(100), r(200, 45_000_000)),
            Some(40)
        );
        // Whole ms of the cumulative value: 0.9 + 0.9 ms over two spans is 1 ms, not 0.
        let a = advance_ms(Some(r(0, 0)), Some(0), r(100, 900_000)).unwrap();
        let b = advance_ms(Some(r(100, 900_000)), Some(100), r(200, 1_800_000)).unwrap();
        assert_eq!(a + b, 1);
    }

    /// Capped all along, read 2 ms late at 100 and on time at 200: the counter advanced
    /// 98 ms, and reads 5 ms late at 300: 105 ms, which is the whole 100 ms span.
    #[test]
    fn capped_all_along_is_the_whole_span_whenever_the_reads_happen() {
        let at = |tick: u64, late_ms: u64| Reading {
            at: tick,
            ns: (tick + late_ms) * 1_000_000,
            ref_us: (tick + late_ms) * 1_000,
        };
        assert_eq!(
            advance_ms(Some(at(100, 2)), Some(100), at(200, 0)),
            Some(98)
        );
        assert_eq!(
            advance_ms(Some(at(200, 0)), Some(200), at(300, 5)),
            Some(100)
        );
    }

    #[test]
    fn no_advance_after_a_gap_a_reset_or_an_impossible_value() {
        // The sample at 200 had no reading (stalled): the span 200..300 is not 100..300.
        assert_eq!(
            advance_ms(Some(r(100, 0)), Some(200), r(300, 1_000_000)),
            None
        );
        // Counter went back: reload.
        assert_eq!(
            advance_ms(Some(r(100, 9_000_000)), Some(100), r(200, 0)),
            None
        );
        // More throttled time than time between the readings.
        assert_eq!(
            advance_ms(Some(r(100, 0)), Some(100), r(200, 102_000_000)),
            None
        );
        // NVML's clock went back.
        let mut back = r(200, 1_000_000);
        back.ref_us = 0;
        assert_eq!(advance_ms(Some(r(100, 0)), Some(100), back), None);
        // Same tick twice.
        assert_eq!(advance_ms(Some(r(100, 0)), Some(100), r(100, 0)), None);
    }

    #[test]
    fn percentages_and_rates() {
        assert_eq!(percent(42.5), Some(42.5));
        assert_eq!(percent(100.2), Some(100.0));
        assert_eq!(percent(-0.1), Some(0.0));
        assert_eq!(percent(101.0), None);
        assert_eq!(percent(f64::NAN), None);
        assert_eq!(rate(12.0), Some(12.0));
        assert_eq!(rate(-1.0), None);
        assert_eq!(rate(f64::INFINITY), None);
    }
}
