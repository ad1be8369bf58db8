//! Exponential backoff with jitter, for reconnects and write retries: after a broker or
//! database outage, thousands of agents must not all come back in the same instant.

use std::time::Duration;

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
}
