//! Precision apart from volume: the agent samples at `interval` (accounting precision, job
//! edges) and publishes at coarser instants aligned to the wall clock: device telemetry
//! every `telemetry_interval`, usage every `usage_interval` and at job edges.
//!
//! Folding loses resolution, never energy: deltas, spans and usage are summed
//! ([`merge_into`]), so every message still conserves what it declares, and every joule
//! measured lands in exactly one message. Pure: samples in, messages out.

use nodewatt_wire::{JobId, Sample, Usage, UsageWindow};
use serde::{Deserialize, Serialize};

use crate::publish::outbox::merge_into;

/// When messages are due, in ms; both multiples of the sampling interval, usage a
/// multiple of telemetry (checked by the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    pub telemetry_ms: u64,
    pub usage_ms: u64,
}

impl Cadence {
    /// One message per sample, usage in each: the behaviour without coarser cadences.
    pub fn every_sample(interval_ms: u64) -> Cadence {
        Cadence {
            telemetry_ms: interval_ms,
            usage_ms: interval_ms,
        }
    }
}

/// The first instant at or after `ts` that is a multiple of `every`.
fn boundary(ts: u64, every: u64) -> u64 {
    ts.div_ceil(every.max(1)).saturating_mul(every.max(1))
}

/// What was sampled but not published yet. Part of the sampler's saved state, so a
/// restart continues the usage window instead of losing it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Samples folded since the last message.
    telemetry: Option<Sample>,
    /// When the telemetry window closes.
    telemetry_due: u64,
    /// Usage per job since the last usage was published, and what it splits.
    usage: Vec<Usage>,
    window: UsageWindow,
    /// When the usage window closes; `None` while it is empty.
    usage_due: Option<u64>,
    /// Jobs of the last sample: a job not among them starts an edge.
    jobs: Vec<JobId>,
}

impl Aggregate {
    /// Folds one sample in; returns the message to publish when one is due: at a telemetry
    /// or usage boundary, when a job started or ended, or at a `stop`.
    pub fn push(&mut self, mut s: Sample, c: Cadence, stop: bool) -> Option<Sample> {
        let ts = s.ts_ms;
        let mut jobs: Vec<JobId> = s.usage.iter().filter_map(|u| u.job.clone()).collect();
        jobs.sort();
        jobs.dedup();
        let started = jobs.iter().any(|j| self.jobs.binary_search(j).is_err());
        let ended = s.job_totals.iter().any(|t| t.ended);
        self.jobs = jobs;

        if let Some(cover) = s.usage_cover() {
            self.window.add(&cover);
            for u in s.usage.drain(..) {
                match self
                    .usage
                    .iter_mut()
                    .find(|x| x.job == u.job && x.project == u.project && x.user == u.user)
                {
                    Some(x) => x.amounts.add(&u.amounts),
                    None => self.usage.push(u),
                }
            }
            self.usage_due.get_or_insert(boundary(ts, c.usage_ms));
        }
        s.usage_window = None;
        match self.telemetry.take() {
            Some(older) => merge_into(&older, &mut s),
            None => self.telemetry_due = boundary(ts, c.telemetry_ms),
        }
        self.telemetry = Some(s);

        let with_usage = stop || started || ended || self.usage_due.is_some_and(|d| ts >= d);
        if !(with_usage || ts >= self.telemetry_due) {
            return None;
        }
        let mut m = self.telemetry.take()?;
        if with_usage {
            m.usage = std::mem::take(&mut self.usage);
            let w = std::mem::take(&mut self.window);
            self.usage_due = None;
            // Said only where it differs from the message's own span and deltas.
            let own = m.usage_cover();
            if !m.usage.is_empty() && !own.is_some_and(|o| o.same_measure(&w)) {
                m.usage_window = Some(w);
            }
        }
        Some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;
    use nodewatt_wire::{Amounts, Gpu, JobTotal};
    use proptest::prelude::*;

    const T0: u64 = 1_763_700_000_000;

    /// A sample at `ts` of one 400 W GPU whose energy went to `owner` (or `_idle`).
    fn sample(ts: u64, span: u64, job: Option<&str>) -> Sample {
        let mut s = crate::testutil::empty_sample();
        s.agent_start_ms = T0 - 60_000;
        s.ts_ms = ts;
        s.span_ms = span;
        let mj = 400 * span;
        s.gpus.push(Gpu {
            index: 0,
            uuid: "GPU-a".into(),
            power_w: Some(400.0),
            temp_c: Some(50.0 + (ts % 7) as f64),
            util_pct: Some(if job.is_some() { 100.0 } else { 0.0 }),
            energy_delta_mj: Some(mj),
            ..Gpu::default()
        });
        s.usage.push(Usage {
            job: job.map(n),
            project: n(if job.is_some() { "p" } else { "_idle" }),
            user: job.map(|_| n("alice")),
            amounts: Amounts {
                gpu_uj: mj * 1000,
                gpu_ms: span,
                ..Amounts::default()
            },
        });
        s
    }

    const TEN_S: Cadence = Cadence {
        telemetry_ms: 10_000,
        usage_ms: 60_000,
    };

    #[test]
    fn every_sample_cadence_passes_samples_through() {
        let mut a = Aggregate::default();
        for i in 1..5 {
            let s = sample(T0 + i * 1_000, 1_000, Some("7"));
            let m = a
                .push(s.clone(), Cadence::every_sample(1_000), false)
                .unwrap();
            assert_eq!(m, s, "unchanged, no window");
        }
    }

    #[test]
    fn telemetry_every_ten_seconds_usage_every_minute_aligned_to_the_clock() {
        let mut a = Aggregate::default();
        let mut out = Vec::new();
        // 1 s samples from T0 + 1 s to T0 + 120 s (T0 is a multiple of a minute).
        assert_eq!(T0 % 60_000, 0);
        for i in 1..=120 {
            if let Some(m) = a.push(sample(T0 + i * 1_000, 1_000, None), TEN_S, false) {
                out.push(m);
            }
        }
        let at: Vec<u64> = out.iter().map(|m| (m.ts_ms - T0) / 1_000).collect();
        assert_eq!(at, (1..=12).map(|k| k * 10).collect::<Vec<_>>());
        for m in &out {
            assert_eq!((m.span_ms, m.merged), (10_000, 9));
            assert_eq!(m.gpus[0].energy_delta_mj, Some(4_000_000));
            assert_eq!(m.gpus[0].power_w, Some(400.0), "mean from the counter");
            assert!(m.gpus[0].temp_max_c.unwrap() >= m.gpus[0].temp_c.unwrap());
        }
        let with_usage: Vec<&Sample> = out.iter().filter(|m| !m.usage.is_empty()).collect();
        assert_eq!(with_usage.len(), 2, "usage at T0 + 60 s and + 120 s");
        for m in with_usage {
            assert_eq!(m.ts_ms % 60_000, 0);
            let w = m.usage_window.unwrap();
            assert_eq!((w.span_ms, w.gpu_uj), (60_000, 24_000_000_000));
            assert_eq!(m.usage[0].amounts.gpu_uj, w.gpu_uj);
            let checked =
                nodewatt_wire::check_sample(m.clone(), m.ts_ms, &nodewatt_wire::Limits::default());
            assert!(checked.is_ok(), "{checked:?}");
        }
    }

    #[test]
    fn a_job_edge_publishes_usage_at_once() {
        let mut a = Aggregate::default();
        let mut push = |i: u64, job: Option<&str>, ended: bool| {
            let mut s = sample(T0 + i * 1_000, 1_000, job);
            if ended {
                s.job_totals.push(JobTotal {
                    job: n("7"),
                    project: n("p"),
                    user: n("alice"),
                    start_ms: T0 + 3_000,
                    since_ms: T0 + 3_000,
                    until_ms: s.ts_ms,
                    ended: true,
                    gpus: Vec::new(),
                    amounts: Amounts::default(),
                });
            }
            a.push(s, TEN_S, false)
        };
        assert!(push(1, None, false).is_none());
        assert!(push(2, None, false).is_none());
        let start = push(3, Some("7"), false).expect("a job started");
        assert_eq!(start.usage_window, None, "the usage covers its span");
        assert_eq!(start.span_ms, 3_000);
        assert!(push(4, Some("7"), false).is_none());
        let end = push(5, Some("7"), true).expect("a job ended");
        assert_eq!(end.job_totals.len(), 1);
        assert_eq!(end.usage[0].amounts.gpu_ms, 2_000);
        assert!(push(6, None, false).is_none(), "its absence is no new edge");
    }

    #[test]
    fn skipped_ticks_close_the_window_late_not_never() {
        let mut a = Aggregate::default();
        assert!(a
            .push(sample(T0 + 1_000, 1_000, None), TEN_S, false)
            .is_none());
        assert!(a
            .push(sample(T0 + 9_000, 8_000, None), TEN_S, false)
            .is_none());
        // The tick at + 10 s was skipped: the sample at + 12 s closes the window.
        let m = a
            .push(sample(T0 + 12_000, 3_000, None), TEN_S, false)
            .unwrap();
        assert_eq!(m.span_ms, 12_000);
    }

    #[test]
    fn a_stop_publishes_everything() {
        let mut a = Aggregate::default();
        a.push(sample(T0 + 1_000, 1_000, Some("7")), TEN_S, false);
        assert!(a
            .push(sample(T0 + 2_000, 1_000, Some("7")), TEN_S, false)
            .is_none());
        let m = a
            .push(sample(T0 + 2_500, 500, Some("7")), TEN_S, true)
            .unwrap();
        assert_eq!(m.span_ms, 1_500);
        assert_eq!(m.usage[0].amounts.gpu_ms, 1_500);
        assert_eq!((a.telemetry, a.usage, a.usage_due), (None, vec![], None));
    }

    proptest! {
        /// Whatever the cadences, jobs and skipped ticks: every message passes the
        /// collector's checks, and the messages hold exactly the samples' energy and
        /// usage, per owner.
        #[test]
        fn folding_conserves_energy_and_usage(
            telemetry_k in 1u64..20,
            usage_k in 1u64..6,
            steps in proptest::collection::vec((1u64..4, 0usize..3), 1..300),
        ) {
            let c = Cadence { telemetry_ms: telemetry_k * 1_000, usage_ms: telemetry_k * usage_k * 1_000 };
            let mut a = Aggregate::default();
            let mut ts = T0;
            let (mut gpu_in, mut gpu_out) = (0u64, 0u64);
            let mut by_owner_in = std::collections::BTreeMap::new();
            let mut by_owner_out = std::collections::BTreeMap::new();
            let mut messages = Vec::new();
            for (i, (ticks, job)) in steps.iter().enumerate() {
                ts += ticks * 1_000;
                let job = [None, Some("1"), Some("2")][*job];
                let s = sample(ts, ticks * 1_000, job);
                gpu_in += s.gpus[0].energy_delta_mj.unwrap();
                *by_owner_in.entry(job).or_insert(0u64) += s.usage[0].amounts.gpu_uj;
                let last = i + 1 == steps.len();
                messages.extend(a.push(s, c, last));
            }
            for m in &messages {
                gpu_out += m.gpus[0].energy_delta_mj.unwrap();
                for u in &m.usage {
                    *by_owner_out.entry(u.job.as_ref().map(|j| j.as_str().to_string())).or_insert(0u64) += u.amounts.gpu_uj;
                }
                let checked = nodewatt_wire::check_sample(m.clone(), m.ts_ms, &nodewatt_wire::Limits::default());
                prop_assert!(checked.is_ok(), "{:?}", checked);
            }
            prop_assert_eq!(gpu_in, gpu_out);
            let by_owner_in: std::collections::BTreeMap<_, _> =
                by_owner_in.into_iter().map(|(k, v)| (k.map(str::to_string), v)).collect();
            prop_assert_eq!(by_owner_in, by_owner_out);
            prop_assert_eq!(a.telemetry.as_ref(), None, "the stop published everything");
        }
    }
}
