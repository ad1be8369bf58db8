//! Exponential backoff with jitter, for reconnects and write retries: after a broker or
//! database outage, thousands of agents must not all come back in the same instant.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
        Backoff::with_seed(initial, max, seed)
    }

    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
            rng: seed | 1,
        }
    }

    /// The next delay: uniformly in [d/2, d] where d doubles per failure up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        // xorshift64: plenty for spreading reconnects, no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + 0.5 * frac)
    }

    /// After a success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// A connection or write that may fail and is retried with backoff: when the next try is
/// due, and whether a failure is worth a log line (the first, then at powers of two, so a
/// long outage stays quiet). Pure: the caller passes the time.
#[derive(Debug, Clone)]
pub struct Retry {
    backoff: Backoff,
    failures: u32,
    at: Option<Instant>,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Failed {
    pub failures: u32,
    pub delay: Duration,
    /// Log this one: the first failure, then the 2nd, 4th, 8th...
    pub log: bool,
}

impl Retry {
    pub fn new(backoff: Backoff) -> Retry {
        Retry {
            backoff,
            failures: 0,
            at: None,
        }
    }

    /// A failure at `now`: the next try waits for the backoff delay.
    pub fn failed(&mut self, now: Instant) -> Failed {
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff.next_delay();
        self.at = Some(now + delay);
        Failed {
            failures: self.failures,
            delay,
            log: self.failures.is_power_of_two(),
        }
    }

    /// A success: returns how many failures came before it (0 if none).
    pub fn succeeded(&mut self) -> u32 {
        self.backoff.reset();
        self.at = None;
        std::mem::take(&mut self.failures)
    }

    /// When the next try may start, while waiting after a failure.
    pub fn waiting_until(&self) -> Option<Instant> {
        self.at
    }

    /// Whether a try may start at `now`; ends the wait once it is over.
    pub fn ready(&mut self, now: Instant) -> bool {
        match self.at {
            Some(t) if now < t => false,
            _ => {
                self.at = None;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_with_jitter_in_upper_half() {
        let ms = Duration::from_millis;
        let mut b = Backoff::with_seed(ms(100), ms(1_000), 42);
        let bounds = [100, 200, 400, 800, 1_000, 1_000, 1_000];
        for hi in bounds {
            let d = b.next_delay();
            assert!(
                d >= ms(hi / 2) && d <= ms(hi),
                "{d:?} not in [{}, {hi}] ms",
                hi / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }

    #[test]
    fn jitter_spreads_clients_apart() {
        let ms = Duration::from_millis;
        let delays: std::collections::BTreeSet<Duration> = (1..50u64)
            .map(|seed| Backoff::with_seed(ms(1_000), ms(1_000), seed * 7919).next_delay())
            .collect();
        assert!(delays.len() > 40, "only {} distinct delays", delays.len());
    }

    #[test]
    fn retry_waits_logs_at_powers_of_two_and_resets() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut r = Retry::new(Backoff::with_seed(ms(100), ms(400), 7));
        assert!(r.ready(t0), "nothing failed yet");
        let logged: Vec<bool> = (0..5).map(|_| r.failed(t0).log).collect();
        assert_eq!(logged, [true, true, false, true, false]);
        let at = r.waiting_until().unwrap();
        assert!(!r.ready(at - ms(1)));
        assert!(r.ready(at));
        assert_eq!(r.waiting_until(), None, "ready ends the wait");
        assert_eq!(r.succeeded(), 5);
        assert_eq!(r.succeeded(), 0, "counted afresh");
        assert!(r.failed(t0).delay <= ms(100), "backoff starts over");
    }
}
