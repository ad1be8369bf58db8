//! The collector's own counters, written to InfluxDB as `nodewatt_collector` and logged.

use crate::ingest::pipeline::WriteStats;
use crate::lineproto::{line, Value};
use crate::validate::Reason;

#[derive(Debug, Default)]
pub struct Stats {
    pub messages_in: u64,
    pub status_in: u64,
    rejected: [u64; Reason::ALL.len()],
    pub connected: bool,
}

impl Stats {
    pub fn reject(&mut self, r: Reason) {
        self.rejected[r as usize] += 1;
    }

    pub fn rejected(&self, r: Reason) -> u64 {
        self.rejected[r as usize]
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }

    /// One `nodewatt_collector` point with every counter.
    pub fn encode(
        &self,
        writes: &WriteStats,
        pending: usize,
        collector: &str,
        ts_ms: u64,
        out: &mut Vec<u8>,
    ) {
        let int = |v: u64| Value::I(v.min(i64::MAX as u64) as i64);
        let mut fields = vec![
            ("messages_in", int(self.messages_in)),
            ("status_in", int(self.status_in)),
            ("rejected", int(self.rejected_total())),
            ("points_written", int(writes.points_written)),
            ("batches_written", int(writes.batches_written)),
            ("write_errors", int(writes.write_errors)),
            ("points_refused", int(writes.points_refused)),
            ("write_latency_ms", int(writes.last_write_ms)),
            ("batch_points", int(writes.last_batch_points)),
            ("pending_messages", int(pending as u64)),
            ("connected", Value::B(self.connected)),
        ];
        let names: Vec<String> = Reason::ALL
            .iter()
            .map(|r| format!("rejected_{}", r.as_str()))
            .collect();
        for (r, name) in Reason::ALL.iter().zip(&names) {
            fields.push((name.as_str(), int(self.rejected(*r))));
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
        let mut s = Stats {
            messages_in: 3,
            ..Stats::default()
        };
        s.reject(Reason::Name);
        s.reject(Reason::Name);
        let writes = WriteStats {
            points_refused: 4,
            ..WriteStats::default()
        };
        let mut out = Vec::new();
        s.encode(&writes, 7, "c1", 5, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("nodewatt_collector,collector=c1 messages_in=3i,"),
            "{text}"
        );
        assert!(text.contains(",rejected=2i,"), "{text}");
        assert!(text.contains(",points_refused=4i,"), "{text}");
        assert!(text.contains(",pending_messages=7i,"), "{text}");
        assert!(
            text.contains(",rejected_name=2i,") || text.contains(",rejected_name=2i "),
            "{text}"
        );
        assert!(text.contains("rejected_too_large=0i"), "{text}");
        assert!(text.ends_with(" 5\n"));
    }
}
