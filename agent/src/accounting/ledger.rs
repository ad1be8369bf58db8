//! One node's accounting as a state machine without I/O: a registry read and a sample's
//! deltas in, the sample's usage and job totals out. It holds the jobs known to run,
//! their running totals and the last instant billed, and can be saved at stop and
//! resumed at start, so a job's total continues across agent restarts.
//!
//! Rules:
//! - A span (t0, t1] is split among the jobs held in it, each for the part between its
//!   start and its end (`attribution::split`); the parts sum exactly to what was measured.
//! - A job whose end the epilog recorded is billed up to that end, then its final total
//!   is sent and it is forgotten. Its file may stay in the registry a while: a job that
//!   was finished is never taken up again (`finished`).
//! - A failed, missing or untrusted registry read changes nothing: jobs are only ever
//!   ended by a recorded end, or by their file disappearing from a listing that succeeded.
//! - A job whose file disappeared without a recorded end ended somewhere in the span; who
//!   used its devices then is unknown, so its share goes to `_unattributed`, never to
//!   another tenant and never silently to `_idle`.
//! - A job seen first with an end at or before the last instant billed ran entirely
//!   before what this ledger measured: it is not taken up.

use std::collections::{BTreeMap, BTreeSet};

use nodewatt_wire::{Amounts, JobId, JobTotal, Project, Sample, Usage};
use serde::{Deserialize, Serialize};

use super::registry::{Listing, ReadError};
use crate::attribution::{split, Job};
use crate::counter::step;

/// How much of a job first seen now was billed before it was seen: spans already billed
/// cannot be taken back, so a file that appeared after its `start_ms` (a slow prolog)
/// loses the time from its start (or this ledger's origin) to `t0`, the end of the span
/// billed before, to `_idle`. Nothing is lost at the first sample (no `t0`).
fn late_start_ms(t0: Option<u64>, start_ms: u64, origin_ms: u64) -> u64 {
    t0.map_or(0, |t0| t0.saturating_sub(start_ms.max(origin_ms)))
}

/// A job run: a requeued job keeps its id and gets a new start.
type Key = (JobId, u64);

fn key(j: &Job) -> Key {
    (j.id.clone(), j.start_ms)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Held {
    job: Job,
    total: JobTotal,
    /// Gone from the registry without a recorded end.
    vanished: bool,
}

/// JSON maps need string keys: held jobs are saved as a list (each knows its key).
mod held_as_list {
    use super::{key, BTreeMap, Held, Key};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<Key, Held>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.values())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<Key, Held>, D::Error> {
        let held = Vec::<Held>::deserialize(d)?;
        Ok(held.into_iter().map(|h| (key(&h.job), h)).collect())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Job totals count from here (or from the job's start, if later): the start of this
    /// ledger's continuous measurement, kept across resumed restarts.
    origin_ms: u64,
    /// The end of the last span billed.
    last_ts: Option<u64>,
    #[serde(with = "held_as_list")]
    held: BTreeMap<Key, Held>,
    finished: BTreeSet<Key>,
    /// Cumulative cgroup CPU time per job at the previous sample.
    job_cpu: BTreeMap<JobId, u64>,
    totals_interval_ms: u64,
    /// Registry reads that failed as a whole since start.
    #[serde(skip)]
    pub registry_errors: u64,
}

impl Ledger {
    pub fn new(origin_ms: u64, totals_interval_ms: u64) -> Ledger {
        Ledger {
            origin_ms,
            last_ts: None,
            held: BTreeMap::new(),
            finished: BTreeSet::new(),
            job_cpu: BTreeMap::new(),
            totals_interval_ms: totals_interval_ms.max(1),
            registry_errors: 0,
        }
    }

    /// A saved ledger continues; the totals interval is the current configuration's.
    pub fn resumed(mut self, totals_interval_ms: u64) -> Ledger {
        self.totals_interval_ms = totals_interval_ms.max(1);
        self
    }

    pub fn totals_interval_ms(&self) -> u64 {
        self.totals_interval_ms
    }

    pub fn origin_ms(&self) -> u64 {
        self.origin_ms
    }

    pub fn last_ts(&self) -> Option<u64> {
        self.last_ts
    }

    /// Jobs held now, by id.
    pub fn jobs(&self) -> Vec<&Job> {
        self.held.values().map(|h| &h.job).collect()
    }

    /// Fills `usage` and `job_totals` of a sample whose deltas are set. `measured` gives
    /// what the sample's deltas measured over (t0, ts].
    pub fn account(
        &mut self,
        s: &mut Sample,
        read: Result<Listing, ReadError>,
        measured: impl FnOnce(&Sample, u64) -> crate::attribution::Measured,
    ) {
        let t1 = s.ts_ms;
        let t0 = self.last_ts.replace(t1).filter(|t0| *t0 < t1);
        let horizon = t0.unwrap_or(t1);
        match read {
            Ok(listing) => self.update(listing, t0, t1),
            // No directory and nothing known: no scheduler on this node (yet).
            Err(ReadError::Missing(_)) if self.held.is_empty() => self.finished.clear(),
            Err(_) => self.registry_errors += 1,
        }
        let job_cpu_us = self.cpu_deltas(s, t0);
        let jobs: Vec<Job> = self.held.values().map(|h| h.job.clone()).collect();

        if let Some(t0) = t0 {
            let mut m = measured(s, t0);
            m.job_cpu_us = job_cpu_us;
            let sp = split(&jobs, &m);
            let mut unattributed = Amounts::default();
            for ((h, a), ran) in self.held.values_mut().zip(&sp.jobs).zip(&sp.ran) {
                if h.vanished {
                    unattributed.add(a);
                    continue;
                }
                h.total.amounts.add(a);
                if *ran == 0 && *a == Amounts::default() {
                    continue;
                }
                let u = Usage {
                    job: Some(h.job.id.clone()),
                    project: h.job.project.clone(),
                    user: Some(h.job.user.clone()),
                    amounts: *a,
                };
                // A requeued job's two runs in one span are one entry.
                match s
                    .usage
                    .iter_mut()
                    .find(|x| x.job == u.job && x.project == u.project && x.user == u.user)
                {
                    Some(x) => x.amounts.add(a),
                    None => s.usage.push(u),
                }
            }
            for (project, amounts) in [
                (Project::idle(), sp.idle),
                (Project::unattributed(), unattributed),
            ] {
                if amounts != Amounts::default() {
                    s.usage.push(Usage {
                        job: None,
                        project,
                        user: None,
                        amounts,
                    });
                }
            }
        }

        self.finish(s, horizon, t1);
        let iv = self.totals_interval_ms;
        if t0.is_some_and(|t0| t0 / iv != t1 / iv) {
            s.job_totals.extend(self.running_totals());
        }
    }

    /// Takes in a registry listing: new jobs, recorded ends, vanished files.
    /// `t0`: the end of the span billed before this one, if any.
    fn update(&mut self, listing: Listing, t0: Option<u64>, t1: u64) {
        let horizon = t0.unwrap_or(t1);
        let listed: BTreeSet<Key> = listing.jobs.iter().map(key).collect();
        for j in listing.jobs {
            let k = key(&j);
            if self.finished.contains(&k) {
                continue;
            }
            if let Some(h) = self.held.get_mut(&k) {
                if h.job.end_ms.is_none() {
                    // An end recorded just before the last sample but seen only now:
                    // the span up to it is billed already.
                    h.job.end_ms = j.end_ms.map(|e| e.max(horizon));
                    if let Some(late_ms) = j.end_ms.map(|e| horizon.saturating_sub(e)) {
                        if late_ms > 0 {
                            tracing::info!(
                                job = %j.id,
                                late_ms,
                                "job's end seen {late_ms} ms after it (its registry file \
                                 changed late); billed up to the span that saw it"
                            );
                        }
                    }
                }
                continue;
            }
            if j.end_ms.is_some_and(|e| e <= horizon) {
                self.finished.insert(k);
                continue;
            }
            // Started after this sample's instant (the read comes later): nothing of it is
            // in this span, and a total dated after the sample would be refused with the
            // whole message. The next sample takes it up. A job that starts at the instant
            // itself is taken up now, with none of this span: left for the next sample, a
            // failed read there would bill its first span to _idle.
            if j.start_ms > t1 {
                continue;
            }
            let late_ms = late_start_ms(t0, j.start_ms, self.origin_ms);
            if late_ms > 0 {
                tracing::info!(
                    job = %j.id,
                    late_ms,
                    "job taken up {late_ms} ms after its start (its registry file appeared late); \
                     that time was billed to _idle"
                );
            }
            let total = JobTotal {
                job: j.id.clone(),
                project: j.project.clone(),
                user: j.user.clone(),
                start_ms: j.start_ms,
                since_ms: j.start_ms.max(self.origin_ms),
                until_ms: t1,
                ended: false,
                gpus: j.gpus.clone(),
                amounts: Amounts::default(),
            };
            self.held.insert(
                k,
                Held {
                    job: j,
                    total,
                    vanished: false,
                },
            );
        }
        // GPUs of the jobs whose files are there and readable: a job kept only because its
        // file is rejected loses its GPUs to a newer job that claims them, never shares them.
        let claimed: Vec<&Job> = self
            .held
            .iter()
            .filter(|(k, _)| listed.contains(*k))
            .map(|(_, h)| &h.job)
            .collect();
        let mut gone = Vec::new();
        for (k, h) in &self.held {
            // A file that is there but unreadable keeps its job, as a failed read does.
            let rejected = !listed.contains(k) && listing.rejected.contains(k.0.as_str());
            // ... until the scheduler gives one of its GPUs to a newer job: it had ended.
            let taken_at = claimed
                .iter()
                .filter(|c| c.start_ms > h.job.start_ms)
                .filter(|c| c.gpus.iter().any(|g| h.job.gpus.contains(g)))
                .map(|c| c.start_ms)
                .min();
            if h.job.end_ms.is_some() {
                continue;
            }
            match (listed.contains(k), rejected, taken_at) {
                (false, false, _) => gone.push((k.clone(), None)),
                (false, true, Some(at)) => gone.push((k.clone(), Some(at.max(horizon)))),
                _ => {}
            }
        }
        for (k, end) in gone {
            if let Some(h) = self.held.get_mut(&k) {
                h.vanished = true;
                h.job.end_ms = end;
            }
        }
        self.finished.retain(|k| listed.contains(k));
    }

    /// Sends the final totals of jobs that ended by `t1` and forgets them.
    fn finish(&mut self, s: &mut Sample, horizon: u64, t1: u64) {
        let done: Vec<Key> = self
            .held
            .iter()
            .filter(|(_, h)| h.vanished || h.job.end_ms.is_some_and(|e| e <= t1))
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            let Some(mut h) = self.held.remove(&k) else {
                continue;
            };
            h.total.ended = true;
            h.total.until_ms = match h.job.end_ms {
                Some(e) if !h.vanished => e,
                _ => horizon,
            }
            .max(h.total.since_ms);
            s.job_totals.push(h.total);
            self.finished.insert(k);
        }
    }

    /// Running jobs' totals up to the last instant billed (sent at each totals interval
    /// and at stop).
    pub fn running_totals(&mut self) -> Vec<JobTotal> {
        let until = self.last_ts.unwrap_or(self.origin_ms);
        self.held
            .values_mut()
            .map(|h| {
                h.total.until_ms = until.max(h.total.since_ms);
                h.total.clone()
            })
            .collect()
    }

    /// CPU time of each job's cgroup over the span, from the cumulative counters.
    fn cpu_deltas(&mut self, s: &Sample, t0: Option<u64>) -> std::collections::HashMap<JobId, u64> {
        let mut deltas = std::collections::HashMap::new();
        let mut now = BTreeMap::new();
        for jc in s.cpu.iter().flat_map(|c| &c.jobs) {
            let delta = match self.job_cpu.get(&jc.job) {
                Some(prev) => step(*prev, jc.cpu_usage_us, None).delta().unwrap_or(0),
                // First seen: all of it is new if the job started within this span.
                None => {
                    let started = self
                        .held
                        .values()
                        .filter(|h| h.job.id == jc.job)
                        .map(|h| h.job.start_ms)
                        .max();
                    if started.zip(t0).is_some_and(|(st, t0)| st > t0) {
                        jc.cpu_usage_us
                    } else {
                        0
                    }
                }
            };
            deltas.insert(jc.job.clone(), delta);
            now.insert(jc.job.clone(), jc.cpu_usage_us);
        }
        self.job_cpu = now;
        deltas
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deltas::Deltas;
    use crate::testutil::n;
    use nodewatt_wire::Gpu;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const GPUS: u32 = 4;
    const T0: u64 = 1_763_700_000_000;

    /// A job of the schedule: start and end offsets from T0, its GPUs.
    #[derive(Debug, Clone)]
    struct Spec {
        start: u64,
        end: u64,
        gpus: Vec<u32>,
    }

    /// What a sample's registry read returns.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Read {
        Ok,
        Fails,
    }

    /// One sample tick; `restart` before it saves and resumes the ledger and the counters
    /// (the ticks in between are the restart's gap).
    #[derive(Debug, Clone, Copy)]
    struct Tick {
        at: u64,
        read: Read,
        restart: bool,
    }

    fn job(i: usize, s: &Spec, now: u64) -> Job {
        Job {
            id: n(&format!("{}", 100 + i)),
            project: n(&format!("p{}", i % 3)),
            user: n("u"),
            gpus: s.gpus.iter().map(|g| n(&g.to_string())).collect(),
            start_ms: T0 + s.start,
            end_ms: Some(T0 + s.end).filter(|e| *e <= now),
        }
    }

    /// The registry at `now`: a file from the job's start, its end recorded at its end,
    /// removed an hour later.
    fn listing(specs: &[Spec], now: u64) -> Listing {
        let jobs = specs
            .iter()
            .enumerate()
            .filter(|(_, s)| T0 + s.start <= now && now < T0 + s.end + 3_600_000)
            .map(|(i, s)| job(i, s, now))
            .collect();
        Listing {
            jobs,
            rejected: Default::default(),
        }
    }

    /// GPU g draws `watts[g]` all the time: its counter is watts × t (mJ).
    fn sample(at: u64, watts: &[u64]) -> Sample {
        let mut s = crate::testutil::empty_sample();
        s.ts_ms = at;
        s.gpus = (0..GPUS)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{i}"),
                energy_mj: Some(watts[i as usize] * at),
                ..Gpu::default()
            })
            .collect();
        s
    }

    fn schedule() -> impl Strategy<Value = (Vec<u64>, Vec<Spec>, Vec<Tick>)> {
        let spec = (
            0u64..40_000,
            1u64..20_000,
            proptest::collection::btree_set(0..GPUS, 0..3),
        )
            .prop_map(|(start, len, gpus)| Spec {
                start,
                end: start + len,
                gpus: gpus.into_iter().collect(),
            });
        let ticks = proptest::collection::vec(
            (
                prop_oneof![9 => Just(Read::Ok), 1 => Just(Read::Fails)],
                prop_oneof![12 => Just(false), 1 => Just(true)],
                1u64..4,
            ),
            30..70,
        )
        .prop_map(|v| {
            let mut at = T0;
            v.into_iter()
                .map(|(read, restart, step)| {
                    // A restart's gap is several intervals long.
                    at += if restart { step * 1_000 + 337 } else { 1_000 };
                    Tick { at, read, restart }
                })
                .collect::<Vec<_>>()
        });
        // A GPU is held by one job at a time (the scheduler's allocation).
        let specs = proptest::collection::vec(spec, 0..8).prop_map(|mut specs| {
            for i in 0..specs.len() {
                let (before, rest) = specs.split_at_mut(i);
                let s = &mut rest[0];
                s.gpus.retain(|g| {
                    !before
                        .iter()
                        .any(|o| o.gpus.contains(g) && o.start < s.end && s.start < o.end)
                });
            }
            specs
        });
        (
            proptest::collection::vec(50u64..1_500, GPUS as usize),
            specs,
            ticks,
        )
    }

    proptest! {
        /// Through resumed restarts and failed registry reads: every span's energy is
        /// billed exactly once (to jobs, `_idle` or `_unattributed`), each job has one
        /// total, and a job whose start and end were seen by a successful read is billed
        /// exactly its GPUs' power × its time, to the microjoule.
        #[test]
        fn conservation_and_exact_jobs_through_restarts_and_blips(
            (watts, specs, ticks) in schedule()
        ) {
            let mut deltas = Deltas::default();
            let mut ledger = Ledger::new(T0, 10_000);
            let mut first = sample(T0, &watts);
            deltas.apply(&mut first);
            ledger.account(&mut first, Ok(listing(&specs, T0)), super::super::measured);

            let mut billed_uj = 0u64;
            let mut finals: HashMap<String, Vec<JobTotal>> = HashMap::new();
            let mut last_read_ok = T0;
            // Jobs whose start or end fell in a span closed by a failed read.
            let mut blurred = std::collections::HashSet::new();
            for t in &ticks {
                if t.restart {
                    // Stop and start: the state goes through its saved form.
                    let l = serde_json::to_string(&ledger).unwrap();
                    let d = serde_json::to_string(&deltas).unwrap();
                    ledger = serde_json::from_str::<Ledger>(&l).unwrap().resumed(10_000);
                    deltas = serde_json::from_str(&d).unwrap();
                }
                let mut s = sample(t.at, &watts);
                deltas.apply(&mut s);
                let read = match t.read {
                    Read::Ok => Ok(listing(&specs, t.at)),
                    Read::Fails => Err(ReadError::Unreadable("/x".into(), "blip".into())),
                };
                if t.read == Read::Fails {
                    for (i, sp) in specs.iter().enumerate() {
                        let inside = |x: u64| T0 + x > last_read_ok && T0 + x <= t.at;
                        if inside(sp.start) || inside(sp.end) {
                            blurred.insert(format!("{}", 100 + i));
                        }
                    }
                } else {
                    last_read_ok = t.at;
                }
                ledger.account(&mut s, read, super::super::measured);
                let measured: u64 = s.gpus.iter().filter_map(|g| g.energy_delta_mj).sum::<u64>() * 1000;
                let used: u64 = s.usage.iter().map(|u| u.amounts.gpu_uj).sum();
                prop_assert_eq!(used, measured, "conservation at {}", t.at);
                billed_uj += used;
                for jt in s.job_totals.iter().filter(|jt| jt.ended) {
                    finals.entry(jt.job.to_string()).or_default().push(jt.clone());
                }
            }
            // Nothing lost across resumed restarts: all of it, first to last sample.
            let end = ticks.last().map_or(T0, |t| t.at);
            let all: u64 = watts.iter().map(|w| w * (end - T0) * 1000).sum();
            prop_assert_eq!(billed_uj, all);

            for (i, sp) in specs.iter().enumerate() {
                let id = format!("{}", 100 + i);
                let got = finals.get(&id);
                if T0 + sp.end > end || sp.start == 0 {
                    continue; // still running at the end, or started with the ledger
                }
                let got = got.map(|v| v.as_slice()).unwrap_or_default();
                prop_assert!(got.len() <= 1, "one final total per job: {:?}", got);
                if blurred.contains(&id) {
                    continue;
                }
                prop_assert_eq!(got.len(), 1, "job {} ended: its final total", id);
                let power: u64 = sp.gpus.iter().map(|g| watts[*g as usize]).sum();
                prop_assert_eq!(got[0].amounts.gpu_uj, power * (sp.end - sp.start) * 1000, "job {}", id);
                prop_assert_eq!(got[0].amounts.gpu_ms, sp.gpus.len() as u64 * (sp.end - sp.start));
                prop_assert_eq!((got[0].since_ms, got[0].until_ms), (T0 + sp.start, T0 + sp.end));
            }
        }
    }

    #[test]
    fn time_billed_before_a_job_was_seen_is_counted_from_its_start_or_the_origin() {
        assert_eq!(
            late_start_ms(None, 100, 0),
            0,
            "first sample: nothing billed yet"
        );
        assert_eq!(late_start_ms(Some(1_000), 1_000, 0), 0);
        assert_eq!(late_start_ms(Some(1_000), 1_030, 0), 0, "started after t0");
        assert_eq!(late_start_ms(Some(1_000), 913, 0), 87);
        assert_eq!(
            late_start_ms(Some(1_000), 100, 900),
            100,
            "before the origin nothing was billed"
        );
    }

    #[test]
    fn a_job_starting_after_the_sample_instant_waits_for_the_next_sample() {
        // The prolog wrote it 30 ms after the tick, before the (late) registry read.
        let specs = [Spec {
            start: 1_030,
            end: 9_000,
            gpus: vec![0],
        }];
        let watts = [100, 0, 0, 0];
        let mut deltas = Deltas::default();
        let mut ledger = Ledger::new(T0, 1_000);
        let mut s = sample(T0, &watts);
        deltas.apply(&mut s);
        ledger.account(&mut s, Ok(listing(&specs, T0)), super::super::measured);
        let mut s = sample(T0 + 1_000, &watts);
        deltas.apply(&mut s);
        ledger.account(
            &mut s,
            Ok(listing(&specs, T0 + 1_040)),
            super::super::measured,
        );
        assert!(
            s.job_totals.is_empty(),
            "no total dated after its sample: {:?}",
            s.job_totals
        );
        assert!(ledger.jobs().is_empty());
        let mut s = sample(T0 + 2_000, &watts);
        deltas.apply(&mut s);
        ledger.account(
            &mut s,
            Ok(listing(&specs, T0 + 2_000)),
            super::super::measured,
        );
        let u = s.usage.iter().find(|u| u.job.is_some()).unwrap();
        assert_eq!(u.amounts.gpu_uj, 100 * 970 * 1000, "from its start");
        let t = &s.job_totals[0];
        assert!(t.since_ms <= s.ts_ms && t.until_ms == s.ts_ms);
    }

    #[test]
    fn stop_totals_and_resume_continue_one_total() {
        let specs = [Spec {
            start: 500,
            end: 9_000,
            gpus: vec![0],
        }];
        let watts = [100, 0, 0, 0];
        let mut deltas = Deltas::default();
        let mut ledger = Ledger::new(T0, 60_000);
        let step = |ledger: &mut Ledger, deltas: &mut Deltas, at: u64| {
            let mut s = sample(T0 + at, &watts);
            deltas.apply(&mut s);
            ledger.account(&mut s, Ok(listing(&specs, T0 + at)), super::super::measured);
            s
        };
        for at in [0, 1_000, 2_000] {
            step(&mut ledger, &mut deltas, at);
        }
        // Stop at 2_000: the running total goes out.
        let at_stop = ledger.running_totals();
        assert_eq!(at_stop.len(), 1);
        assert_eq!(at_stop[0].amounts.gpu_uj, 100 * 1_500 * 1000);
        assert_eq!(
            (at_stop[0].since_ms, at_stop[0].until_ms),
            (T0 + 500, T0 + 2_000)
        );
        // 4 s later the agent is back: the gap is measured and the same total continues.
        let mut ledger: Ledger =
            serde_json::from_str(&serde_json::to_string(&ledger).unwrap()).unwrap();
        let s = step(&mut ledger, &mut deltas, 6_000);
        assert_eq!(
            s.usage[0].amounts.gpu_uj,
            100 * 4_000 * 1000,
            "the gap, billed to the job"
        );
        let s = step(&mut ledger, &mut deltas, 10_000);
        let t = &s.job_totals[0];
        assert_eq!(
            (t.since_ms, t.until_ms, t.ended),
            (T0 + 500, T0 + 9_000, true)
        );
        assert_eq!(t.amounts.gpu_uj, 100 * 8_500 * 1000);
    }
}
