//! The spool beside the link (see `spool` for the file format): each sample is appended
//! before it enters the outbox, with the sampler's state after it, and released when the
//! broker acknowledged it. Its writes are small and go to the page cache (fsync as
//! configured), so they run on the publishing thread.

use std::time::Duration;

use nodewatt_wire::Sample;

use super::link::{Link, Send};
use super::spool::{Spool, SpoolConfig};

/// The spool beside the link: samples are appended before they enter the outbox and
/// released when acknowledged. A spool that fails (disk full) is logged and counted, and
/// the sample goes on in memory: publishing never stops for the disk.
pub struct Spooler {
    spool: Spool,
    dir: std::path::PathBuf,
    failures: u64,
    /// The newest state spooled and the record it is in, kept with that record through
    /// compactions.
    last_state: Option<(u64, Vec<u8>)>,
}

/// Present while the newest spooled state is the sampler's newest: removed when an
/// append fails (removing works on a full disk), so a state older than what was published
/// meanwhile is never resumed, which would bill that time twice.
const STATE_VALID: &str = "state-valid";

/// A sample found in the spool at start.
pub struct Recovered {
    pub seq: u64,
    pub sample: Sample,
}

/// Splits a record into the sample and, if present, the state spooled with it.
fn split(payload: &[u8]) -> (&[u8], Option<&[u8]>) {
    match payload.iter().position(|b| *b == b'\n') {
        Some(i) => (&payload[..i], Some(&payload[i + 1..])),
        None => (payload, None),
    }
}

/// Opens the spool: the samples an earlier run left unacknowledged (this node's only),
/// and the newest sampler state spooled. A spool that cannot be opened is logged, and
/// the agent runs with its outbox in memory.
pub fn open(
    cfg: SpoolConfig,
    cluster: &str,
    node: &str,
) -> Option<(Spooler, Vec<Recovered>, Option<Vec<u8>>)> {
    let dir = cfg.dir.clone();
    let (sp, recovered) = match Spool::open(cfg) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("cannot open the spool: {e}; samples are kept in memory only");
            return None;
        }
    };
    if recovered.corrupt_records > 0 {
        tracing::warn!(
            dir = %dir.display(),
            corrupt = recovered.corrupt_records,
            truncated_bytes = recovered.truncated_bytes,
            "damaged spool records were cut off (a crash while writing)"
        );
    }
    let mut samples = Vec::new();
    let mut state: Option<(u64, Vec<u8>)> = None;
    let mut foreign = 0;
    // Delivered before the stop: not sent again, but the newest state may be in one.
    for r in &recovered.delivered {
        if let (_, Some(st)) = split(&r.payload) {
            state = Some((r.seq, st.to_vec()));
        }
    }
    for r in recovered.records {
        let (sample, st) = split(&r.payload);
        match Sample::from_json(sample) {
            Ok(s) if s.cluster == cluster && s.node == node => {
                samples.push(Recovered {
                    seq: r.seq,
                    sample: s,
                });
                // The newest state, whether its record was delivered or not.
                if let Some(st) = st.filter(|_| state.as_ref().is_none_or(|(at, _)| *at < r.seq)) {
                    state = Some((r.seq, st.to_vec()));
                }
            }
            _ => foreign += 1,
        }
    }
    if !samples.is_empty() {
        tracing::info!(samples = samples.len(), dir = %dir.display(), "resending spooled samples");
    }
    if foreign > 0 {
        tracing::warn!(
            records = foreign,
            "spooled records that are not this node's samples were skipped"
        );
    }
    let valid = dir.join(STATE_VALID).exists();
    if state.is_some() && !valid {
        tracing::warn!(dir = %dir.display(), "the spooled state is older than what was published (a spool write failed); not resumed");
    }
    let state = state.filter(|_| valid);
    let resumed = state.as_ref().map(|(_, st)| st.clone());
    let spooler = Spooler {
        spool: sp,
        dir,
        failures: 0,
        last_state: state,
    };
    Some((spooler, samples, resumed))
}

impl Spooler {
    pub fn add(
        &mut self,
        s: Sample,
        state: Option<Vec<u8>>,
        link: &mut Link,
        sends: &mut Vec<Send>,
    ) {
        let now = std::time::Instant::now();
        let mut payload = s.to_json().into_bytes();
        if let Some(st) = &state {
            payload.push(b'\n');
            payload.extend_from_slice(st);
        }
        let records = match self.spool.append(&payload, now) {
            Ok(seq) => {
                if let Some(st) = state {
                    if self.last_state.is_none() || self.failures > 0 {
                        self.mark_state_valid(true);
                    }
                    self.last_state = Some((seq, st));
                }
                self.failures = 0;
                seq..seq + 1
            }
            Err(e) => {
                if self.failures == 0 {
                    self.mark_state_valid(false);
                }
                self.failures += 1;
                if self.failures.is_power_of_two() {
                    tracing::error!(failures = self.failures, "cannot spool a sample: {e}");
                }
                0..0
            }
        };
        link.spooled(s, records, sends);
        if let Err(e) = self.spool.sync_if_due(now) {
            tracing::error!("{e}");
        }
        if self.spool.needs_rewrite() && !link.spool_snapshot().is_empty() {
            self.compact(link);
        }
    }

    /// Replaces the spool by the outbox (merged, acknowledged samples gone); the state
    /// stays with the record it was spooled in.
    fn compact(&mut self, link: &Link) {
        let snapshot: Vec<(u64, Vec<u8>)> = link
            .spool_snapshot()
            .into_iter()
            .map(|(seq, s)| {
                let mut p = s.to_json().into_bytes();
                if let Some((_, st)) = self.last_state.as_ref().filter(|(at, _)| *at == seq) {
                    p.push(b'\n');
                    p.extend_from_slice(st);
                }
                (seq, p)
            })
            .collect();
        match self
            .spool
            .rewrite(snapshot.iter().map(|(seq, p)| (*seq, p.as_slice())))
        {
            Ok(()) => {
                tracing::debug!(dir = %self.dir.display(), samples = snapshot.len(), bytes = self.spool.bytes(), "spool compacted to the outbox")
            }
            Err(e) => tracing::error!("cannot compact the spool: {e}"),
        }
    }

    fn mark_state_valid(&mut self, valid: bool) {
        let path = self.dir.join(STATE_VALID);
        let r = if valid {
            std::fs::write(&path, b"")
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = r {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %path.display(), "{e}");
            }
        }
    }

    pub fn release(&mut self, link: &mut Link) {
        let released = link.take_released();
        if released.is_empty() {
            return;
        }
        if let Err(e) = self.spool.ack_all(released.into_iter().flatten()) {
            tracing::warn!("{e}");
        }
    }

    /// A clean stop: the spool is compacted to what is unacknowledged (so acknowledged
    /// samples do not come back at the next start) and reaches the disk.
    pub fn close(&mut self, link: &mut Link) {
        self.release(link);
        self.compact(link);
        self.sync();
    }

    fn sync(&mut self) {
        // What is spooled reaches the disk whatever the policy.
        if let Err(e) = self
            .spool
            .sync_if_due(std::time::Instant::now() + Duration::from_secs(86_400))
        {
            tracing::error!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::outbox::Outbox;
    use crate::publish::spool::Fsync;
    use crate::testutil::n;

    fn config(dir: &std::path::Path) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_owned(),
            segment_bytes: 4 << 20,
            max_bytes: 16 << 20,
            fsync: Fsync::Never,
        }
    }

    fn sample(seq: u64) -> Sample {
        let mut s = Sample::new("a", n("c"), n("n1"), 1000, 0);
        s.seq = seq;
        s
    }

    /// A crash after some PubAcks: only what was not delivered comes back, with the
    /// newest state, even one spooled with a delivered sample.
    #[test]
    fn delivered_samples_do_not_come_back_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sp, recovered, state) = open(config(dir.path()), "c", "n1").unwrap();
        assert!(recovered.is_empty() && state.is_none());
        let mut link = Link::new(Outbox::new(10, 8));
        let mut sends = Vec::new();
        link.connected(0, &mut sends);
        for seq in 0..4 {
            sp.add(
                sample(seq),
                Some(format!("{{\"s\":{seq}}}").into_bytes()),
                &mut link,
                &mut sends,
            );
        }
        for pkid in 1..=5 {
            link.written(pkid); // the status, then samples 0..4
        }
        // Samples 0 and 2 delivered (out of order), 1 and 3 not.
        link.acked(2, &mut sends);
        link.acked(4, &mut sends);
        sp.release(&mut link);
        drop(sp); // the crash: no close

        let (_, recovered, state) = open(config(dir.path()), "c", "n1").unwrap();
        let seqs: Vec<u64> = recovered.iter().map(|r| r.sample.seq).collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(state.as_deref(), Some(&b"{\"s\":3}"[..]));
    }

    /// A clean stop compacts the spool to what is unacknowledged: delivered samples are
    /// gone from disk, and the state stays only with the record it was spooled in.
    #[test]
    fn a_clean_stop_leaves_only_what_is_unacknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let run = |ack: &[u16]| {
            let (mut sp, recovered, _) = open(config(dir.path()), "c", "n1").unwrap();
            let mut link = Link::new(Outbox::new(10, 8));
            let mut sends = Vec::new();
            for r in recovered {
                link.spooled(r.sample, r.seq..r.seq + 1, &mut sends);
            }
            link.connected(0, &mut sends);
            let base = link.spool_snapshot().len() as u64;
            for seq in base..base + 3 {
                let st = format!("{{\"s\":{seq}}}").into_bytes();
                sp.add(sample(seq), Some(st), &mut link, &mut sends);
            }
            for pkid in 1..=(base as u16 + 4) {
                link.written(pkid);
            }
            for pkid in ack {
                link.acked(*pkid, &mut sends);
            }
            sp.close(&mut link);
        };
        let files = || std::fs::read_dir(dir.path()).unwrap().count();
        run(&[]);
        let (_, recovered, state) = open(config(dir.path()), "c", "n1").unwrap();
        let seqs: Vec<u64> = recovered.iter().map(|r| r.sample.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
        assert_eq!(state.as_deref(), Some(&b"{\"s\":2}"[..]));
        // Next run: the three come back, three more; all but the newest delivered.
        run(&[2, 3, 4, 5, 6]);
        let (_, recovered, state) = open(config(dir.path()), "c", "n1").unwrap();
        let seqs: Vec<u64> = recovered.iter().map(|r| r.sample.seq).collect();
        assert_eq!(seqs, [5], "only the undelivered sample is on disk");
        assert_eq!(state.as_deref(), Some(&b"{\"s\":5}"[..]));
        assert!(files() <= 4, "one snapshot, the marks: {}", files());
    }
}
