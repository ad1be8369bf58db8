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
    /// The newest sampler state, kept with the newest record through compactions.
    last_state: Option<Vec<u8>>,
}

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
    let mut state = None;
    let mut foreign = 0;
    for r in recovered.records {
        let (sample, st) = split(&r.payload);
        match Sample::from_json(sample) {
            Ok(s) if s.cluster == cluster && s.node == node => {
                samples.push(Recovered {
                    seq: r.seq,
                    sample: s,
                });
                if let Some(st) = st {
                    state = Some(st.to_vec());
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
    let spooler = Spooler {
        spool: sp,
        dir,
        failures: 0,
        last_state: state.clone(),
    };
    Some((spooler, samples, state))
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
        if state.is_some() {
            self.last_state = state;
        }
        let records = match self.spool.append(&payload, now) {
            Ok(seq) => seq..seq + 1,
            Err(e) => {
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
        let snapshot = link.spool_snapshot();
        if self.spool.needs_rewrite() && !snapshot.is_empty() {
            let last = snapshot.len() - 1;
            let snapshot: Vec<(u64, Vec<u8>)> = snapshot
                .into_iter()
                .enumerate()
                .map(|(i, (seq, s))| {
                    let mut p = s.to_json().into_bytes();
                    // The newest sample keeps the state spooled with it.
                    if let (true, Some(st)) = (i == last, &self.last_state) {
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
                    tracing::info!(dir = %self.dir.display(), samples = snapshot.len(), bytes = self.spool.bytes(), "spool compacted to the outbox")
                }
                Err(e) => tracing::error!("cannot compact the spool: {e}"),
            }
        }
    }

    pub fn release(&mut self, link: &mut Link) {
        for range in link.take_released() {
            for seq in range {
                if let Err(e) = self.spool.ack(seq) {
                    tracing::warn!("{e}");
                }
            }
        }
    }

    pub fn sync(&mut self) {
        // A clean stop: what is spooled reaches the disk whatever the policy.
        if let Err(e) = self
            .spool
            .sync_if_due(std::time::Instant::now() + Duration::from_secs(86_400))
        {
            tracing::error!("{e}");
        }
    }
}
