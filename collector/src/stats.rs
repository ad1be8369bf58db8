//! The collector's own counters, written to InfluxDB as `nodewatt_collector` and logged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::lineproto::{line, Value};
use crate::validate::Reason;

#[derive(Debug, Default)]
pub struct Stats {
    pub messages_in: AtomicU64,
    pub status_in: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    pub points_written: AtomicU64,
    pub batches_written: AtomicU64,
    pub write_errors: AtomicU64,
    pub points_refused: AtomicU64,
    pub last_write_ms: AtomicU64,
    pub last_batch_points: AtomicU64,
    /// Messages received and not yet acknowledged.
    pub pending: AtomicU64,
    pub connected: AtomicBool,
}

impl Stats {
    pub fn reject(&self, r: Reason) {
        self.rejected[r as usize].fetch_add(1, Relaxed);
    }

    pub fn rejected(&self, r: Reason) -> u64 {
        self.rejected[r as usize].load(Relaxed)
    }

    pub fn rejected_total(&self) -> u64 {
        Reason::ALL.iter().map(|r| self.rejected(*r)).sum()
    }

    /// One `nodewatt_collector` point with every counter.
    pub fn encode(&self, collector: &str, ts_ms: u64, out: &mut Vec<u8>) {
        let get = |a: &AtomicU64| Value::I(a.load(Relaxed) as i64);
        let mut fields = vec![
            ("messages_in", get(&self.messages_in)),
            ("status_in", get(&self.status_in)),
            ("rejected", Value::I(self.rejected_total() as i64)),
            ("points_written", get(&self.points_written)),
            ("batches_written", get(&self.batches_written)),
            ("write_errors", get(&self.write_errors)),
            ("points_refused", get(&self.points_refused)),
            ("write_latency_ms", get(&self.last_write_ms)),
            ("batch_points", get(&self.last_batch_points)),
            ("pending_messages", get(&self.pending)),
            ("connected", Value::B(self.connected.load(Relaxed))),
        ];
        let names: Vec<String> = Reason::ALL
            .iter()
            .map(|r| format!("rejected_{}", r.as_str()))
            .collect();
        for (r, name) in Reason::ALL.iter().zip(&names) {
            fields.push((name.as_str(), Value::I(self.rejected(*r) as i64)));
        }
        line(
            out,
            "nodewatt_collector",
            &[("collector", collector)],
            &fields,
            ts_ms,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_counter() {
        let s = Stats::default();
        s.messages_in.fetch_add(3, Relaxed);
        s.reject(Reason::Name);
        s.reject(Reason::Name);
        let mut out = Vec::new();
        s.encode("c1", 5, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("nodewatt_collector,collector=c1 messages_in=3i,"),
            "{text}"
        );
        assert!(text.contains(",rejected=2i,"), "{text}");
        assert!(
            text.contains(",rejected_name=2i,") || text.contains(",rejected_name=2i "),
            "{text}"
        );
        assert!(text.contains("rejected_too_large=0i"), "{text}");
        assert!(text.ends_with(" 5\n"));
    }
}
