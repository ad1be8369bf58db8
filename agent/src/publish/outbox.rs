//! The agent's bounded outbox. A sample leaves only when the broker acknowledged it
//! (PubAck); after a reconnect everything not acknowledged is sent again. When full, two
//! adjacent waiting samples are merged into one, so a long outage costs resolution, never
//! energy: counters keep the newer values and the additive deltas are summed.
//!
//! Which pair merges follows a binary counter: the oldest adjacent pair of equal weight
//! (same number of samples folded in), else the oldest pair. Old data thus coarsens in
//! powers of two while recent data keeps full resolution.

use std::ops::Range;

use nodewatt_wire::Sample;
use std::collections::VecDeque;

/// Storage bound of the outbox; the configured capacity may be lower.
pub const MAX_CAPACITY: usize = 4096;

#[derive(Debug)]
struct Entry {
    id: u64,
    // Boxed: entries stay small when the outbox grows during an outage.
    sample: Box<Sample>,
    /// Packet id while published and awaiting its PubAck on the current connection.
    in_flight: Option<InFlight>,
    /// The spool records it holds (merges join adjacent ranges); empty when not spooled.
    spooled: Range<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum InFlight {
    /// Handed to the MQTT client; its packet id is not known yet.
    Sent,
    Pkid(u16),
}

/// In-flight samples are always the oldest (they are taken oldest first and all return to
/// waiting on a reconnect), and merges touch only waiting ones, so the waiting samples are
/// a contiguous run at the back. With at most `capacity - 2` in flight, a full outbox
/// always has an adjacent waiting pair to merge.
#[derive(Debug)]
pub struct Outbox {
    /// Grows only as far as samples wait (a few, connected); never beyond `capacity`.
    entries: VecDeque<Entry>,
    capacity: usize,
    max_in_flight: usize,
    next_id: u64,
    pub merges: u64,
}

impl Outbox {
    /// `capacity` is clamped to 2..=MAX_CAPACITY and `max_in_flight` to 1..=capacity-2.
    pub fn new(capacity: usize, max_in_flight: usize) -> Outbox {
        let capacity = capacity.clamp(3, MAX_CAPACITY);
        Outbox {
            entries: VecDeque::new(),
            capacity,
            max_in_flight: max_in_flight.clamp(1, capacity - 2),
            next_id: 0,
            merges: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// In-flight samples are the oldest ones (see the type's invariant): count the prefix.
    pub fn in_flight(&self) -> usize {
        self.entries
            .iter()
            .take_while(|e| e.in_flight.is_some())
            .count()
    }

    /// Adds a sample, first merging two waiting ones if the outbox is full.
    pub fn push(&mut self, sample: Sample) {
        self.push_spooled(sample, 0..0);
    }

    /// Adds a sample held by these spool records.
    pub fn push_spooled(&mut self, sample: Sample, spooled: Range<u64>) {
        if self.entries.len() >= self.capacity && !self.merge_one() {
            debug_assert!(false, "a full outbox always has a waiting pair");
            tracing::error!("outbox full with nothing to merge; sample dropped");
            return;
        }
        let entry = Entry {
            id: self.next_id,
            sample: Box::new(sample),
            in_flight: None,
            spooled,
        };
        self.next_id += 1;
        self.entries.push_back(entry);
    }

    /// Merges the chosen adjacent pair of waiting samples; false if there is none.
    fn merge_one(&mut self) -> bool {
        // Waiting samples are the contiguous run after the in-flight prefix.
        let first_waiting = self.in_flight();
        let len = self.entries.len();
        if len < first_waiting + 2 {
            return false;
        }
        let older = (first_waiting..len - 1)
            .find(|&i| self.entry(i).sample.merged == self.entry(i + 1).sample.merged)
            .unwrap_or(first_waiting);
        let removed = self.remove_at(older);
        let into = self.entry_mut(older);
        merge_into(&removed.sample, &mut into.sample);
        into.spooled = join(&removed.spooled, &into.spooled);
        self.merges += 1;
        true
    }

    fn entry(&self, i: usize) -> &Entry {
        &self.entries[i]
    }

    fn entry_mut(&mut self, i: usize) -> &mut Entry {
        &mut self.entries[i]
    }

    fn remove_at(&mut self, i: usize) -> Entry {
        self.entries.remove(i).expect("index in range")
    }

    /// The oldest sample not yet handed to the client, unless `max_in_flight` are already
    /// out; marks it as sent.
    pub fn take_next(&mut self) -> Option<(u64, &mut Sample)> {
        let next = self.in_flight();
        if next >= self.max_in_flight || next >= self.entries.len() {
            return None;
        }
        let e = self.entry_mut(next);
        e.in_flight = Some(InFlight::Sent);
        Some((e.id, &mut e.sample))
    }

    /// Returns a sample taken by `take_next` to waiting (the client could not take it).
    pub fn release(&mut self, id: u64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.in_flight = None;
        }
    }

    /// The client wrote sample `id` with packet id `pkid`.
    pub fn assign_pkid(&mut self, id: u64, pkid: u16) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.in_flight = Some(InFlight::Pkid(pkid));
        }
    }

    /// PubAck for `pkid`: the sample is delivered and leaves the outbox; the spool
    /// records it held, if it was there.
    pub fn ack(&mut self, pkid: u16) -> Option<Range<u64>> {
        let pos = (0..self.entries.len())
            .find(|&i| self.entry(i).in_flight == Some(InFlight::Pkid(pkid)))?;
        Some(self.remove_at(pos).spooled)
    }

    /// Connection lost: nothing is in flight any more; all of it will be sent again.
    pub fn reset_in_flight(&mut self) {
        for e in self.entries.iter_mut() {
            e.in_flight = None;
        }
    }

    /// All samples, oldest first (for saving at shutdown).
    pub fn samples(&self) -> Vec<&Sample> {
        self.entries.iter().map(|e| &*e.sample).collect()
    }

    /// Spooled samples, oldest first, each with its last spool record (a spool snapshot).
    pub fn spooled(&self) -> Vec<(u64, &Sample)> {
        self.entries
            .iter()
            .filter(|e| !e.spooled.is_empty())
            .map(|e| (e.spooled.end - 1, &*e.sample))
            .collect()
    }
}

/// The records of two adjacent entries, merged.
fn join(a: &Range<u64>, b: &Range<u64>) -> Range<u64> {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.clone(),
        (_, true) => a.clone(),
        _ => a.start.min(b.start)..a.end.max(b.end),
    }
}

fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.saturating_add(y)),
        (x, None) | (None, x) => x,
    }
}

/// The larger of two readings (either may be missing).
fn max(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) | (None, x) => x,
    }
}

/// The mean of two means weighted by the time each covers.
fn mean(a: Option<f64>, a_ms: u64, b: Option<f64>, b_ms: u64) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) if a_ms + b_ms > 0 => {
            Some((x * a_ms as f64 + y * b_ms as f64) / (a_ms + b_ms) as f64)
        }
        (_, Some(y)) => Some(y),
        (x, None) => x,
    }
}

/// GPM metrics over both spans: each the mean weighted by the time it covers.
fn fold_gpm(older: &nodewatt_wire::Gpm, old_ms: u64, newer: &mut nodewatt_wire::Gpm, new_ms: u64) {
    for (slot, (_, old)) in newer.fields_mut().into_iter().zip(older.fields()) {
        *slot = mean(old, old_ms, *slot, new_ms);
    }
}

/// Folds `older` into `newer`, the sample or message just after it: newer counters and
/// last readings, summed deltas, span and usage, power and utilisation as means over the
/// span and their maxima. Devices only the older sample has are kept, so their energy is
/// not lost.
pub fn merge_into(older: &Sample, newer: &mut Sample) {
    let (old_ms, new_ms) = (older.span_ms, newer.span_ms);
    let cover = match (older.usage_cover(), newer.usage_cover()) {
        (None, None) => None,
        (a, b) => {
            let mut w = a.unwrap_or_default();
            w.add(&b.unwrap_or_default());
            Some(w)
        }
    };
    newer.merged = newer.merged.saturating_add(older.merged).saturating_add(1);
    newer.span_ms = old_ms.saturating_add(new_ms);
    for og in &older.gpus {
        match newer
            .gpus
            .iter_mut()
            .find(|g| g.index == og.index && g.uuid == og.uuid)
        {
            Some(g) => {
                g.power_max_w = max(og.power_max_w.or(og.power_w), g.power_max_w.or(g.power_w));
                g.temp_max_c = max(og.temp_max_c.or(og.temp_c), g.temp_max_c.or(g.temp_c));
                g.util_pct = mean(og.util_pct, old_ms, g.util_pct, new_ms);
                g.mem_util_pct = mean(og.mem_util_pct, old_ms, g.mem_util_pct, new_ms);
                g.power_w = match (og.energy_delta_mj, g.energy_delta_mj) {
                    // Exact from the counter where both spans were measured.
                    (Some(a), Some(b)) if old_ms + new_ms > 0 => {
                        Some((a + b) as f64 / (old_ms + new_ms) as f64)
                    }
                    _ => mean(og.power_w, old_ms, g.power_w, new_ms),
                };
                g.energy_delta_mj = add(og.energy_delta_mj, g.energy_delta_mj);
                g.power_limit_w = g.power_limit_w.or(og.power_limit_w);
                g.mig_slices = g.mig_slices.or(og.mig_slices);
                g.power_capped_ms = add(og.power_capped_ms, g.power_capped_ms);
                g.thermal_capped_ms = add(og.thermal_capped_ms, g.thermal_capped_ms);
                fold_gpm(&og.gpm, old_ms, &mut g.gpm, new_ms);
                for m in &mut g.mig {
                    if let Some(om) = og.mig.iter().find(|om| om.uuid == m.uuid) {
                        fold_gpm(&om.gpm, old_ms, &mut m.gpm, new_ms);
                    }
                }
                for e in &og.events {
                    nodewatt_wire::count_event(&mut g.events, e.kind, e.code, e.count);
                }
                // Said for the span: it happened at some sample of it.
                g.lost |= og.lost;
                g.stalled |= og.stalled;
            }
            None => newer.gpus.push(og.clone()),
        }
    }
    if let (Some(oc), Some(c)) = (&older.cpu, &mut newer.cpu) {
        c.util_pct = mean(oc.util_pct, old_ms, c.util_pct, new_ms);
    }
    for od in &older.rapl {
        match newer.rapl.iter_mut().find(|d| d.zone == od.zone) {
            Some(d) => d.energy_delta_uj = add(od.energy_delta_uj, d.energy_delta_uj),
            None => newer.rapl.push(od.clone()),
        }
    }
    for ou in &older.usage {
        match newer
            .usage
            .iter_mut()
            .find(|u| u.job == ou.job && u.project == ou.project && u.user == ou.user)
        {
            Some(u) => u.amounts.add(&ou.amounts),
            None => newer.usage.push(ou.clone()),
        }
    }
    // The usage now covers both; said explicitly unless that is the merged span's deltas.
    newer.usage_window = None;
    newer.usage_window = cover.filter(|w| {
        !newer
            .usage_cover()
            .is_some_and(|own| own.same_measure(w) && !newer.usage.is_empty())
    });
    // Totals are cumulative: the newer one of a job wins; an ended job's final total is
    // only in the older sample and is kept.
    for ot in &older.job_totals {
        if !newer
            .job_totals
            .iter()
            .any(|t| t.job == ot.job && t.since_ms == ot.since_ms)
        {
            newer.job_totals.push(ot.clone());
        }
    }
    // Mean power over the merged span, from the summed delta.
    for d in &mut newer.rapl {
        if let (Some(uj), true) = (d.energy_delta_uj, newer.span_ms > 0) {
            d.power_w = Some(uj as f64 / (newer.span_ms as f64 * 1000.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;
    use nodewatt_wire::{Gpu, RaplDomain};

    fn sample(seq: u64) -> Sample {
        let mut s = crate::testutil::empty_sample();
        s.seq = seq;
        s.ts_ms = 1_000 * (seq + 1);
        s.span_ms = 1_000;
        s.gpus.push(Gpu {
            index: 0,
            uuid: "GPU-a".into(),
            energy_mj: Some(350_000 * (seq + 1)),
            energy_delta_mj: Some(350_000),
            power_w: Some(350.0),
            ..Gpu::default()
        });
        s.rapl.push(RaplDomain {
            zone: "intel-rapl:0".into(),
            name: "package-0".into(),
            parent: None,
            energy_uj: Some(0),
            max_energy_range_uj: 1,
            energy_delta_uj: Some(100_000_000),
            power_w: Some(100.0),
            error: None,
        });
        s
    }

    fn total_gpu_mj(o: &Outbox) -> u64 {
        o.samples()
            .iter()
            .map(|s| s.gpus[0].energy_delta_mj.unwrap())
            .sum()
    }

    #[test]
    fn merged_entries_hold_all_their_spool_records() {
        let mut o = Outbox::new(3, 1);
        for seq in 0..4 {
            o.push_spooled(sample(seq), seq..seq + 1);
        }
        // Full at 3: the two oldest merged; their records travel together.
        let lasts: Vec<u64> = o.spooled().iter().map(|(last, _)| *last).collect();
        assert_eq!(lasts, [1, 2, 3]);
        o.take_next();
        o.assign_pkid(o.entries.front().unwrap().id, 5);
        assert_eq!(o.ack(5), Some(0..2));
    }

    #[test]
    fn merges_keep_every_joule_and_coarsen_old_data_first() {
        let mut o = Outbox::new(8, 2);
        for seq in 0..100 {
            o.push(sample(seq));
            assert!(o.len() <= 8);
        }
        assert_eq!(o.merges, 92);
        // Energy and time are conserved exactly across all merges.
        assert_eq!(total_gpu_mj(&o), 100 * 350_000);
        let span: u64 = o.samples().iter().map(|s| s.span_ms).sum();
        assert_eq!(span, 100_000);
        let weights: Vec<u32> = o.samples().iter().map(|s| s.merged + 1).collect();
        assert_eq!(weights.iter().sum::<u32>(), 100);
        // Powers of two, oldest heaviest, newest at full resolution.
        assert!(weights.iter().all(|w| w.is_power_of_two()), "{weights:?}");
        assert!(weights.windows(2).all(|w| w[0] >= w[1]), "{weights:?}");
        assert_eq!(*weights.last().unwrap(), 1);
        // The newest sample's counters and sequence number survive.
        assert_eq!(o.samples().last().unwrap().seq, 99);
        let rapl = &o.samples()[0].rapl[0];
        assert_eq!(rapl.power_w, Some(100.0), "mean power over the merged span");
    }

    #[test]
    fn in_flight_samples_are_never_merged_and_leave_only_on_their_ack() {
        let mut o = Outbox::new(4, 2);
        for seq in 0..4 {
            o.push(sample(seq));
        }
        let (id0, s0) = o.take_next().unwrap();
        assert_eq!(s0.seq, 0);
        o.assign_pkid(id0, 7);
        let (id1, _) = o.take_next().unwrap();
        o.assign_pkid(id1, 8);
        o.push(sample(4)); // full: merges seq 2 and 3, not the in-flight 0 and 1
        let seqs: Vec<(u64, u32)> = o.samples().iter().map(|s| (s.seq, s.merged)).collect();
        assert_eq!(seqs, [(0, 0), (1, 0), (3, 1), (4, 0)]);
        assert!(o.ack(99).is_none(), "unknown packet id");
        assert!(o.ack(8).is_some());
        assert!(o.ack(7).is_some());
        assert_eq!(o.len(), 2);
        assert_eq!(total_gpu_mj(&o), 3 * 350_000);
    }

    #[test]
    fn in_flight_is_limited() {
        let mut o = Outbox::new(10, 2);
        for seq in 0..5 {
            o.push(sample(seq));
        }
        assert!(o.take_next().is_some() && o.take_next().is_some());
        assert!(o.take_next().is_none());
        assert_eq!(o.in_flight(), 2);
    }

    #[test]
    fn reconnect_resends_everything_unacknowledged_in_order() {
        let mut o = Outbox::new(10, 8);
        for seq in 0..3 {
            o.push(sample(seq));
        }
        let (a, _) = o.take_next().unwrap();
        o.assign_pkid(a, 1);
        let _ = o.take_next().unwrap(); // handed over, no packet id yet
        o.reset_in_flight();
        assert_eq!(o.in_flight(), 0);
        let order: Vec<u64> = std::iter::from_fn(|| o.take_next().map(|(_, s)| s.seq)).collect();
        assert_eq!(order, [0, 1, 2]);
        assert!(
            o.ack(1).is_none(),
            "an ack from the old connection matches nothing after reset"
        );
    }

    #[test]
    fn merge_sums_usage_per_job_and_keeps_final_job_totals() {
        use nodewatt_wire::{Amounts, JobTotal, Usage};
        let usage = |job: Option<&str>, project: &str, gpu_uj| Usage {
            job: job.map(n),
            project: n(project),
            user: job.map(|_| n("alice")),
            amounts: Amounts {
                gpu_uj,
                gpu_ms: 1_000,
                ..Amounts::default()
            },
        };
        let total = |job: &str, gpu_uj, ended| JobTotal {
            job: n(job),
            project: n("p"),
            user: n("alice"),
            start_ms: 0,
            since_ms: 1,
            until_ms: 0,
            gpus: Vec::new(),
            ended,
            amounts: Amounts {
                gpu_uj,
                ..Amounts::default()
            },
        };
        let mut old = sample(0);
        old.usage = vec![
            usage(Some("1"), "p", 10),
            usage(Some("2"), "p", 20),
            usage(None, "_idle", 5),
        ];
        old.job_totals = vec![total("1", 100, false), total("2", 200, true)];
        let mut new = sample(1);
        new.usage = vec![usage(Some("1"), "p", 1), usage(None, "_idle", 2)];
        new.job_totals = vec![total("1", 101, false)];
        merge_into(&old, &mut new);

        let gpu = |job: Option<&str>| {
            new.usage
                .iter()
                .find(|u| u.job.as_deref() == job)
                .unwrap()
                .amounts
        };
        assert_eq!((gpu(Some("1")).gpu_uj, gpu(Some("1")).gpu_ms), (11, 2_000));
        assert_eq!(
            gpu(Some("2")).gpu_uj,
            20,
            "a job only the older sample billed"
        );
        assert_eq!(gpu(None).gpu_uj, 7);
        let totals: Vec<(&str, u64, bool)> = new
            .job_totals
            .iter()
            .map(|t| (t.job.as_str(), t.amounts.gpu_uj, t.ended))
            .collect();
        assert_eq!(
            totals,
            [("1", 101, false), ("2", 200, true)],
            "newer total wins; the final one is kept"
        );
    }

    #[test]
    fn merge_sums_capped_time_and_events_and_weighs_gpm_by_time() {
        use nodewatt_wire::{Gpm, GpuEventKind::Xid, GpuEvents};
        let ev = |code, count| GpuEvents {
            kind: Xid,
            code,
            count,
        };
        let mut old = sample(0);
        old.span_ms = 3_000;
        let g = &mut old.gpus[0];
        (g.power_capped_ms, g.power_limit_w, g.stalled) = (Some(1_000), Some(700.0), true);
        g.gpm = Gpm {
            sm_active_pct: Some(20.0),
            pcie_tx_mibps: Some(10.0),
            ..Gpm::default()
        };
        g.events = vec![ev(79, 2), ev(48, 1)];
        let mut new = sample(1);
        let g = &mut new.gpus[0];
        (g.power_capped_ms, g.thermal_capped_ms) = (Some(500), Some(100));
        g.gpm.sm_active_pct = Some(60.0);
        g.events = vec![ev(79, 1)];
        merge_into(&old, &mut new);
        let g = &new.gpus[0];
        assert_eq!(
            (g.power_capped_ms, g.thermal_capped_ms),
            (Some(1_500), Some(100))
        );
        assert_eq!(g.power_limit_w, Some(700.0), "last known");
        // 3 s at 20 % and 1 s at 60 %.
        assert_eq!(g.gpm.sm_active_pct, Some(30.0));
        assert_eq!(g.gpm.pcie_tx_mibps, Some(10.0));
        assert_eq!(g.events, vec![ev(79, 3), ev(48, 1)]);
        assert!(g.stalled && !g.lost, "said for the span");
    }

    #[test]
    fn merge_keeps_devices_only_the_older_sample_has() {
        let old = sample(0);
        let mut new = sample(1);
        new.gpus.clear();
        new.rapl[0].energy_delta_uj = None;
        merge_into(&old, &mut new);
        assert_eq!(new.gpus.len(), 1);
        assert_eq!(new.gpus[0].energy_delta_mj, Some(350_000));
        assert_eq!(new.rapl[0].energy_delta_uj, Some(100_000_000));
        assert_eq!((new.merged, new.span_ms), (1, 2_000));
    }
}
