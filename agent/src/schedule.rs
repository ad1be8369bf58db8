//! Sampling instants aligned to wall-clock multiples of the interval, so every node of a
//! cluster samples at the same instant and their series line up without interpolation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first aligned instant strictly after `now_ms`.
pub fn next_tick(now_ms: u64, interval_ms: u64) -> u64 {
    (now_ms / interval_ms + 1) * interval_ms
}

/// Where the loop goes after sampling at `tick`: the next tick, or, when sampling overran,
/// the first tick still in the future and how many were skipped.
pub fn after(tick: u64, now_ms: u64, interval_ms: u64) -> (u64, u64) {
    let next = tick + interval_ms;
    if next > now_ms {
        (next, 0)
    } else {
        let resume = next_tick(now_ms, interval_ms);
        (resume, (resume - next) / interval_ms)
    }
}

/// The wall clock, or a fixed one that advances only when slept on (deterministic output
/// for tests and golden files).
#[derive(Debug, Clone)]
pub enum Clock {
    Real,
    Fixed { now_ms: u64 },
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::Real => (now_ns() / 1_000_000) as u64,
            Clock::Fixed { now_ms } => *now_ms,
        }
    }

    pub fn sleep_until(&mut self, t_ms: u64) {
        match self {
            Clock::Real => {
                let target = u128::from(t_ms) * 1_000_000;
                let now = now_ns();
                if target > now {
                    std::thread::sleep(Duration::from_nanos((target - now) as u64));
                }
            }
            Clock::Fixed { now_ms } => *now_ms = (*now_ms).max(t_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_align_to_interval_multiples() {
        assert_eq!(next_tick(1_000, 1_000), 2_000);
        assert_eq!(next_tick(1_999, 1_000), 2_000);
        assert_eq!(next_tick(1_763_700_000_007, 10), 1_763_700_000_010);
        assert_eq!(next_tick(59_999, 60_000), 60_000);
    }

    #[test]
    fn overruns_skip_to_the_next_future_tick() {
        assert_eq!(after(2_000, 2_050, 1_000), (3_000, 0));
        assert_eq!(after(2_000, 3_000, 1_000), (4_000, 1));
        assert_eq!(after(2_000, 5_500, 1_000), (6_000, 3));
    }

    #[test]
    fn fixed_clock_advances_only_by_sleeping() {
        let mut c = Clock::Fixed { now_ms: 500 };
        c.sleep_until(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.sleep_until(900);
        assert_eq!(c.now_ms(), 1_000);
    }
}
