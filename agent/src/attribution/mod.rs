//! Who used what in one sample's span: pure functions, no I/O.
//!
//! - A GPU's energy and GPU time go to the job that holds it, for the part of the span
//!   between the job's start and end; the rest of the span goes to `_idle`. Within a span
//!   power is taken as uniform: that is the only approximation for whole GPUs.
//! - A GPU in MIG mode is first split among its MIG devices ([`mig`], an estimate: NVML
//!   has no per-instance power); each device's part then goes to the job holding it (by
//!   its `MIG-` UUID, or the whole GPU's index or UUID) as a whole GPU's would.
//! - CPU package, DRAM and other node energy are split by each job's cgroup CPU time
//!   against the node's CPU capacity (cores × span); the unused capacity's share goes to
//!   `_idle`, so a job is billed for the CPUs it used, not for the whole socket.
//! - Every split is integer largest-remainder apportionment: per device class the parts
//!   sum exactly to the measured delta, in microjoules and milliseconds.

use std::collections::HashMap;

use nodewatt_wire::{Amounts, GpuRef, JobId, Project, Usage, User};

pub use mig::MigShare;

pub mod mig;

/// A running job as the registry describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Job {
    pub id: JobId,
    pub project: Project,
    pub user: User,
    /// GPU indices or UUIDs, as the scheduler gave them.
    pub gpus: Vec<GpuRef>,
    pub start_ms: u64,
    /// When it ended, once the epilog recorded it.
    pub end_ms: Option<u64>,
}

impl Job {
    /// How much of the span (t0, t1] the job ran.
    pub fn ran(&self, t0: u64, t1: u64) -> u64 {
        let (from, to) = self.within(t0, t1);
        to - from
    }

    /// The part of (t0, t1] the job ran, as (from, to); empty when it did not.
    pub fn within(&self, t0: u64, t1: u64) -> (u64, u64) {
        let to = self.end_ms.map_or(t1, |e| e.min(t1));
        let from = self.start_ms.max(t0);
        (from, to.max(from))
    }

    pub fn holds(&self, index: u32, uuid: &str) -> bool {
        self.gpus
            .iter()
            .any(|g| g == uuid || g.parse::<u32>() == Ok(index))
    }

    /// Holds a MIG device: by its UUID, or by holding its whole GPU.
    pub fn holds_mig(&self, gpu: &GpuEnergy, mig_uuid: &str) -> bool {
        self.holds(gpu.index, &gpu.uuid) || self.gpus.iter().any(|g| g == mig_uuid)
    }
}

/// One GPU's energy over the span; `None` when the delta is unknown (first sample, reset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuEnergy {
    pub index: u32,
    pub uuid: String,
    pub energy_uj: Option<u64>,
    /// How busy it was over the span, ‰: GPM SM activity, else NVML utilisation.
    pub active_permille: Option<u32>,
    /// Time any tensor core was busy over the span, ‰ (GPM).
    pub tensor_permille: Option<u32>,
    /// Time held back by its power or thermal limit over the span, ms (the longer of the
    /// two: they may overlap).
    pub capped_ms: u64,
    /// Its MIG devices, in MIG mode.
    pub mig: Vec<MigShare>,
    /// Slices of the whole GPU, in MIG mode.
    pub mig_slices: Option<u32>,
}

/// What was measured over the span (t0, t1].
#[derive(Debug, Clone, Default)]
pub struct Measured {
    pub t0: u64,
    pub t1: u64,
    pub gpus: Vec<GpuEnergy>,
    pub cpu_uj: u64,
    pub dram_uj: u64,
    pub other_uj: u64,
    /// Logical CPUs of the node.
    pub cores: u32,
    /// CPU time of each job's cgroup over the span, microseconds.
    pub job_cpu_us: HashMap<JobId, u64>,
}

/// Splits `total` in proportion to `weights` so that the parts sum exactly to `total`:
/// each part is rounded down, and the units left over go to the largest remainders
/// (ties to the earlier weight). All-zero weights give everything to the last part.
pub fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let Some(last) = weights.len().checked_sub(1) else {
        return Vec::new();
    };
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let mut parts = vec![0u64; weights.len()];
    if sum == 0 {
        parts[last] = total;
        return parts;
    }
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (i, &w) in weights.iter().enumerate() {
        let p = u128::from(total) * u128::from(w);
        parts[i] = (p / sum) as u64;
        remainders.push((p % sum, i));
    }
    let left = total - parts.iter().sum::<u64>();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(left as usize) {
        parts[i] += 1;
    }
    parts
}

/// Total length covered by the intervals (sorted here).
fn union_len(iv: &mut [(u64, u64)]) -> u64 {
    iv.sort_unstable();
    let mut total = 0;
    let mut reach = 0;
    for &(from, to) in iv.iter() {
        let from = from.max(reach);
        if to > from {
            total += to - from;
            reach = to;
        }
    }
    total
}

/// Each job's share of a span (in the order of `jobs`) and what no job used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Split {
    pub jobs: Vec<Amounts>,
    /// How much of the span each job ran, ms.
    pub ran: Vec<u64>,
    pub idle: Amounts,
}

/// Below this activity (1 %) a device is taken as running nothing.
pub(crate) const IDLE_BELOW_PERMILLE: u32 = 10;

/// How a device spent a span, for the parts of its energy and time that show efficiency.
#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    /// Ran nothing (activity known and under 1 %).
    idle: bool,
    tensor_permille: Option<u32>,
    /// Held back by a power or thermal limit, ms of the span.
    capped_ms: u64,
}

impl Spent {
    fn of(active: Option<u32>, tensor_permille: Option<u32>, capped_ms: u64) -> Spent {
        Spent {
            idle: active.is_some_and(|a| a < IDLE_BELOW_PERMILLE),
            tensor_permille,
            capped_ms,
        }
    }

    /// Adds the efficiency parts of the device's energy (when known) and time to the
    /// recipients of its shares `uj` and `ms`. Capped energy is the device's, rounded to
    /// the nearest µJ, then apportioned like the shares, so no part exceeds its share;
    /// tensor time, in µs, is exact.
    fn add(&self, amounts: &mut [Amounts], uj: Option<&[u64]>, ms: &[u64], span: u64) {
        if let Some(uj) = uj {
            let energy: u64 = uj.iter().sum();
            if self.idle {
                for (a, u) in amounts.iter_mut().zip(uj) {
                    a.gpu_idle_uj += u;
                }
            }
            let capped = scaled(energy, self.capped_ms.min(span), span);
            for (a, c) in amounts.iter_mut().zip(apportion(capped, uj)) {
                a.gpu_capped_uj += c;
            }
        }
        if let Some(t) = self.tensor_permille {
            // ms × ‰ is µs: exact, no rounding.
            let t = u64::from(t.min(1000));
            for (a, ms) in amounts.iter_mut().zip(ms) {
                a.gpu_tensor_us += ms.saturating_mul(t);
            }
        }
    }
}

/// `v × num / den` rounded to the nearest integer (`num <= den`); 0 when `den` is 0.
fn scaled(v: u64, num: u64, den: u64) -> u64 {
    match den {
        0 => 0,
        _ => {
            ((u128::from(v) * u128::from(num) * 2 + u128::from(den)) / (u128::from(den) * 2)) as u64
        }
    }
}

/// Bills one device's energy (µJ, when known) and GPU time (ms) over the span to the
/// jobs in `amounts` that it `held` by, for the part of the span each ran, and the rest
/// to idle (`amounts`' last entry).
fn bill_device(
    jobs: &[Job],
    running: &[u64],
    m: &Measured,
    held: impl Fn(&Job) -> bool,
    (energy_uj, gpu_ms, spent): (Option<u64>, u64, Spent),
    amounts: &mut [Amounts],
) {
    let n = jobs.len();
    let mut w = vec![0u64; n + 1];
    let mut spans = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if held(j) && running[i] > 0 {
            w[i] = running[i];
            spans.push(j.within(m.t0, m.t1));
        }
    }
    // Idle is the time no job held it: jobs one after the other in one span each get
    // their own time; two jobs claiming it at once (a scheduler misconfiguration)
    // share their common time.
    let span = m.t1.saturating_sub(m.t0);
    w[n] = span.saturating_sub(union_len(&mut spans));
    let ms = apportion(gpu_ms, &w);
    let uj = energy_uj.map(|e| apportion(e, &w));
    for (i, a) in amounts.iter_mut().enumerate() {
        a.gpu_ms += ms[i];
        a.gpu_uj += uj.as_ref().map_or(0, |u| u[i]);
    }
    spent.add(amounts, uj.as_deref(), &ms, span);
}

/// Splits what was measured over the span among `jobs` and idle.
pub fn split(jobs: &[Job], m: &Measured) -> Split {
    let span = m.t1.saturating_sub(m.t0);
    let n = jobs.len();
    if span == 0 {
        return Split {
            jobs: vec![Amounts::default(); n],
            ran: vec![0; n],
            idle: Amounts::default(),
        };
    }
    let mut amounts = vec![Amounts::default(); n + 1];
    let running: Vec<u64> = jobs.iter().map(|j| j.ran(m.t0, m.t1)).collect();

    for g in &m.gpus {
        if g.mig.is_empty() {
            let holders = |j: &Job| j.holds(g.index, &g.uuid);
            let spent = Spent::of(g.active_permille, g.tensor_permille, g.capped_ms);
            let device = (g.energy_uj, span, spent);
            bill_device(jobs, &running, m, holders, device, &mut amounts);
            continue;
        }
        let parts = mig::split(g.energy_uj.unwrap_or(0), span, &g.mig, g.mig_slices);
        for (d, (uj, ms)) in g.mig.iter().zip(parts.devices) {
            let holders = |j: &Job| j.holds_mig(g, &d.uuid);
            let spent = Spent::of(d.active_permille, d.tensor_permille, g.capped_ms);
            let device = (g.energy_uj.map(|_| uj), ms, spent);
            bill_device(jobs, &running, m, holders, device, &mut amounts);
        }
        // Slices no instance holds: held by no job, and they run nothing.
        let unheld = Spent::of(Some(0), None, g.capped_ms);
        let device = (g.energy_uj.map(|_| parts.idle.0), parts.idle.1, unheld);
        bill_device(jobs, &running, m, |_| false, device, &mut amounts);
    }

    let mut w: Vec<u64> = jobs
        .iter()
        .map(|j| m.job_cpu_us.get(&j.id).copied().unwrap_or(0))
        .collect();
    for (a, us) in amounts.iter_mut().zip(&w) {
        a.cpu_us = *us;
    }
    let capacity_us = u64::from(m.cores) * span * 1000;
    w.push(capacity_us.saturating_sub(w.iter().sum()));
    for (part, uj) in amounts.iter_mut().zip(apportion(m.cpu_uj, &w)) {
        part.cpu_uj += uj;
    }
    for (part, uj) in amounts.iter_mut().zip(apportion(m.dram_uj, &w)) {
        part.dram_uj += uj;
    }
    for (part, uj) in amounts.iter_mut().zip(apportion(m.other_uj, &w)) {
        part.other_uj += uj;
    }
    let idle = amounts.pop().unwrap_or_default();
    Split {
        jobs: amounts,
        ran: running,
        idle,
    }
}

impl Split {
    /// Usage entries: each job that ran in the span (or used something), then `_idle`.
    pub fn usage(&self, jobs: &[Job]) -> Vec<Usage> {
        let mut out: Vec<Usage> = jobs
            .iter()
            .zip(&self.jobs)
            .zip(&self.ran)
            .filter(|((_, a), r)| **r > 0 || **a != Amounts::default())
            .map(|((j, a), _)| Usage {
                job: Some(j.id.clone()),
                project: j.project.clone(),
                user: Some(j.user.clone()),
                amounts: *a,
            })
            .collect();
        if self.idle != Amounts::default() {
            out.push(Usage {
                job: None,
                project: Project::idle(),
                user: None,
                amounts: self.idle,
            });
        }
        out
    }
}

/// Usage of each job in `jobs` (in order) that ran in the span, then `_idle`.
pub fn attribute(jobs: &[Job], m: &Measured) -> Vec<Usage> {
    split(jobs, m).usage(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;
    use proptest::prelude::*;

    fn job(id: &str, project: &str, gpus: &[&str], start_ms: u64) -> Job {
        Job {
            id: n(id),
            project: n(project),
            user: n("alice"),
            gpus: gpus.iter().map(|g| n(g)).collect(),
            start_ms,
            end_ms: None,
        }
    }

    fn gpu(index: u32, energy_uj: u64) -> GpuEnergy {
        GpuEnergy {
            index,
            uuid: format!("GPU-{index}"),
            energy_uj: Some(energy_uj),
            ..GpuEnergy::default()
        }
    }

    fn total(u: &[Usage]) -> Amounts {
        let mut t = Amounts::default();
        for x in u {
            t.add(&x.amounts);
        }
        t
    }

    fn find<'a>(u: &'a [Usage], project: &str) -> &'a Amounts {
        &u.iter().find(|x| x.project == project).unwrap().amounts
    }

    #[test]
    fn apportion_is_exact_and_fair() {
        assert_eq!(apportion(10, &[1, 1, 1]), [4, 3, 3]);
        assert_eq!(apportion(100, &[1, 3]), [25, 75]);
        assert_eq!(apportion(7, &[0, 0]), [0, 7]);
        assert_eq!(apportion(0, &[5, 5]), [0, 0]);
        assert_eq!(
            apportion(u64::MAX, &[u64::MAX, u64::MAX])
                .iter()
                .map(|&x| x as u128)
                .sum::<u128>(),
            u64::MAX as u128
        );
        assert!(apportion(5, &[]).is_empty());
    }

    #[test]
    fn exclusive_gpus_go_to_their_jobs() {
        let jobs = [
            job("1", "proj-a", &["0", "1"], 0),
            job("2", "proj-b", &["GPU-2"], 0),
        ];
        let m = Measured {
            t0: 1_000,
            t1: 2_000,
            gpus: vec![
                gpu(0, 300_000_000),
                gpu(1, 310_000_000),
                gpu(2, 200_000_000),
                gpu(3, 60_000_000),
            ],
            ..Measured::default()
        };
        let u = attribute(&jobs, &m);
        assert_eq!(find(&u, "proj-a").gpu_uj, 610_000_000);
        assert_eq!(find(&u, "proj-a").gpu_ms, 2_000);
        assert_eq!(find(&u, "proj-b").gpu_uj, 200_000_000, "matched by UUID");
        assert_eq!(find(&u, "_idle").gpu_uj, 60_000_000);
        assert_eq!(find(&u, "_idle").gpu_ms, 1_000);
        assert!(u
            .iter()
            .find(|x| x.project == "_idle")
            .unwrap()
            .job
            .is_none());
    }

    #[test]
    fn no_jobs_everything_is_idle() {
        let m = Measured {
            t0: 0,
            t1: 1_000,
            gpus: vec![gpu(0, 5)],
            cpu_uj: 7,
            dram_uj: 3,
            cores: 4,
            ..Measured::default()
        };
        let u = attribute(&[], &m);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].project, "_idle");
        assert_eq!(u[0].amounts.energy_uj(), 15);
    }

    #[test]
    fn shared_sockets_split_by_cgroup_cpu_time() {
        let jobs = [job("1", "a", &[], 0), job("2", "b", &[], 0)];
        let mut m = Measured {
            t0: 0,
            t1: 1_000,
            cpu_uj: 100_000_000,
            dram_uj: 10_000_000,
            cores: 4, // capacity 4 core-seconds
            ..Measured::default()
        };
        m.job_cpu_us.insert(n("1"), 2_000_000); // two cores busy
        m.job_cpu_us.insert(n("2"), 1_000_000); // one core
        let u = attribute(&jobs, &m);
        assert_eq!(find(&u, "a").cpu_uj, 50_000_000);
        assert_eq!(find(&u, "b").cpu_uj, 25_000_000);
        assert_eq!(find(&u, "_idle").cpu_uj, 25_000_000);
        assert_eq!(find(&u, "a").dram_uj, 5_000_000);
        assert_eq!(find(&u, "a").cpu_us, 2_000_000);
        // More CPU time than capacity (accounting skew): jobs share all of it.
        m.job_cpu_us.insert(n("1"), 9_000_000);
        let u = attribute(&jobs, &m);
        assert!(u
            .iter()
            .all(|x| x.project != "_idle" || x.amounts.cpu_uj == 0));
        assert_eq!(total(&u).cpu_uj, 100_000_000);
    }

    #[test]
    fn a_job_starting_mid_span_gets_its_part() {
        let jobs = [job("1", "a", &["0"], 1_250)];
        let m = Measured {
            t0: 1_000,
            t1: 2_000,
            gpus: vec![gpu(0, 1_000_000)],
            ..Measured::default()
        };
        let u = attribute(&jobs, &m);
        assert_eq!((find(&u, "a").gpu_uj, find(&u, "a").gpu_ms), (750_000, 750));
        assert_eq!(
            (find(&u, "_idle").gpu_uj, find(&u, "_idle").gpu_ms),
            (250_000, 250)
        );
        // A job that starts after the span is not billed for it.
        let later = [job("1", "a", &["0"], 2_000)];
        assert!(attribute(&later, &m).iter().all(|x| x.job.is_none()));
    }

    #[test]
    fn a_job_ending_mid_span_gets_its_part_up_to_the_end() {
        let mut j = job("1", "a", &["0"], 1_250);
        j.end_ms = Some(1_750);
        let m = Measured {
            t0: 1_000,
            t1: 2_000,
            gpus: vec![gpu(0, 1_000_000)],
            ..Measured::default()
        };
        let u = attribute(&[j.clone()], &m);
        assert_eq!((find(&u, "a").gpu_uj, find(&u, "a").gpu_ms), (500_000, 500));
        assert_eq!(find(&u, "_idle").gpu_uj, 500_000);
        // Ended before the span: nothing.
        j.end_ms = Some(1_000);
        assert!(attribute(&[j], &m).iter().all(|x| x.job.is_none()));
    }

    #[test]
    fn jobs_one_after_the_other_on_a_gpu_each_get_their_time() {
        let mut a = job("1", "a", &["0"], 0);
        a.end_ms = Some(1_338);
        let b = job("2", "b", &["0"], 1_338);
        let m = Measured {
            t0: 1_000,
            t1: 2_000,
            gpus: vec![gpu(0, 1_000_000)],
            ..Measured::default()
        };
        let u = attribute(&[a, b], &m);
        assert_eq!(find(&u, "a").gpu_uj, 338_000);
        assert_eq!(find(&u, "b").gpu_uj, 662_000);
        assert!(u.iter().all(|x| x.project != "_idle"));
        assert_eq!(union_len(&mut [(5, 9), (0, 2), (1, 3), (9, 9)]), 7);
    }

    #[test]
    fn a_job_that_ended_gets_nothing_of_the_span() {
        // The registry no longer lists the job: its GPU's span is idle.
        let m = Measured {
            t0: 1_000,
            t1: 2_000,
            gpus: vec![gpu(0, 1_000)],
            ..Measured::default()
        };
        let u = attribute(&[], &m);
        assert_eq!(find(&u, "_idle").gpu_uj, 1_000);
    }

    #[test]
    fn unknown_gpu_delta_still_counts_time() {
        let jobs = [job("1", "a", &["0"], 0)];
        let m = Measured {
            t0: 0,
            t1: 500,
            gpus: vec![GpuEnergy {
                index: 0,
                uuid: "GPU-0".into(),
                energy_uj: None,
                ..GpuEnergy::default()
            }],
            ..Measured::default()
        };
        let u = attribute(&jobs, &m);
        assert_eq!(find(&u, "a").gpu_ms, 500);
        assert_eq!(find(&u, "a").gpu_uj, 0);
    }

    fn mig_gpu(energy_uj: u64) -> GpuEnergy {
        let dev = |gi: u32, slices: u32, active_permille: u32| MigShare {
            uuid: format!("MIG-{gi}"),
            gpu_instance_id: gi,
            slices: Some(slices),
            active_permille: Some(active_permille),
            tensor_permille: None,
        };
        GpuEnergy {
            mig: vec![dev(1, 3, 800), dev(2, 2, 400)],
            mig_slices: Some(7),
            ..gpu(0, energy_uj)
        }
    }

    #[test]
    fn mig_devices_go_to_the_jobs_holding_them() {
        // Instance 1 (3 slices at 80 %) weighs 2400, instance 2 (2 slices at 40 %) 800.
        let jobs = [
            job("1", "a", &["MIG-1"], 0),
            job("2", "b", &["MIG-2"], 1_500),
        ];
        let m = Measured {
            t0: 1_000,
            t1: 2_000,
            gpus: vec![mig_gpu(3_200_000)],
            ..Measured::default()
        };
        let u = attribute(&jobs, &m);
        assert_eq!(
            (find(&u, "a").gpu_uj, find(&u, "a").gpu_ms),
            (2_400_000, 428),
            "3/7 of the GPU's time (428.57, the remainders went to the others)"
        );
        // Job 2 held instance 2 for half the span: half its share; the other half idle.
        assert_eq!((find(&u, "b").gpu_uj, find(&u, "b").gpu_ms), (400_000, 143));
        let idle = find(&u, "_idle");
        assert_eq!(idle.gpu_uj, 400_000);
        assert_eq!(
            idle.gpu_ms,
            143 + 286,
            "half of instance 2, and the 2 unheld slices"
        );
        assert_eq!(total(&u).gpu_uj, 3_200_000);
        assert_eq!(total(&u).gpu_ms, 1_000);
    }

    #[test]
    fn a_job_holding_a_mig_gpu_by_index_holds_all_its_devices() {
        let jobs = [job("1", "a", &["0"], 0)];
        let m = Measured {
            t0: 0,
            t1: 1_000,
            gpus: vec![mig_gpu(3_200_000)],
            ..Measured::default()
        };
        let u = attribute(&jobs, &m);
        assert_eq!(find(&u, "a").gpu_uj, 3_200_000);
        assert_eq!(find(&u, "a").gpu_ms, 714, "its instances' 5 slices of 7");
        assert_eq!(find(&u, "_idle").gpu_ms, 286);
        // The energy of a span with no delta is unknown; the time is still billed.
        let mut m = m;
        m.gpus[0].energy_uj = None;
        let u = attribute(&jobs, &m);
        assert_eq!((total(&u).gpu_uj, find(&u, "a").gpu_ms), (0, 714));
    }

    #[test]
    fn idle_capped_and_tensor_parts_follow_the_device() {
        let mut a = job("1", "a", &["0"], 0);
        a.end_ms = Some(1_500);
        let g = GpuEnergy {
            active_permille: Some(5),
            tensor_permille: Some(250),
            capped_ms: 400,
            ..gpu(0, 1_000_000)
        };
        let m = Measured {
            t0: 1_000,
            t1: 2_000,
            gpus: vec![g.clone(), gpu(1, 2_000_000)],
            ..Measured::default()
        };
        let u = attribute(&[a.clone()], &m);
        let (ja, idle) = (find(&u, "a"), find(&u, "_idle"));
        assert_eq!(
            (ja.gpu_uj, ja.gpu_idle_uj),
            (500_000, 500_000),
            "ran nothing"
        );
        assert_eq!(ja.gpu_capped_uj, 200_000, "capped 40 % of the span");
        assert_eq!((ja.gpu_ms, ja.gpu_tensor_us), (500, 125_000));
        // GPU 1 has no activity, tensor or capping known: no parts.
        assert_eq!(idle.gpu_uj, 2_500_000);
        assert_eq!(
            (idle.gpu_idle_uj, idle.gpu_capped_uj, idle.gpu_tensor_us),
            (500_000, 200_000, 125_000)
        );
        // At 1 % it ran something.
        let busy = GpuEnergy {
            active_permille: Some(10),
            ..g
        };
        let m = Measured {
            gpus: vec![busy],
            ..m
        };
        assert_eq!(find(&attribute(&[a], &m), "a").gpu_idle_uj, 0);
    }

    #[test]
    fn mig_parts_follow_each_instance_and_unheld_slices_are_idle() {
        let mut g = mig_gpu(3_200_000);
        g.mig[1].active_permille = Some(0);
        g.mig[0].tensor_permille = Some(500);
        g.capped_ms = 1_000;
        let jobs = [job("1", "a", &["MIG-1"], 0), job("2", "b", &["MIG-2"], 0)];
        let m = Measured {
            t0: 0,
            t1: 1_000,
            gpus: vec![g],
            ..Measured::default()
        };
        let u = attribute(&jobs, &m);
        let (a, b, idle) = (find(&u, "a"), find(&u, "b"), find(&u, "_idle"));
        // By activity, instance 2 (idle) gets no energy: all of it is instance 1's.
        assert_eq!(
            (a.gpu_uj, a.gpu_idle_uj, a.gpu_tensor_us),
            (3_200_000, 0, 214_000)
        );
        assert_eq!(a.gpu_capped_uj, 3_200_000, "the whole GPU was capped");
        assert_eq!((b.gpu_uj, b.gpu_ms, b.gpu_idle_uj), (0, 286, 0));
        assert_eq!((idle.gpu_ms, idle.gpu_idle_uj), (286, 0));
        // By slices (no activity anywhere), the unheld slices' energy is idle energy.
        let mut m = m;
        m.gpus[0].mig[0].active_permille = Some(0);
        let u = attribute(&jobs, &m);
        let idle = find(&u, "_idle");
        assert_eq!((idle.gpu_uj, idle.gpu_idle_uj), (914_286, 914_286));
        assert_eq!(find(&u, "b").gpu_idle_uj, find(&u, "b").gpu_uj);
    }

    #[test]
    fn first_sample_attributes_nothing() {
        let m = Measured {
            t0: 5,
            t1: 5,
            gpus: vec![gpu(0, 1)],
            ..Measured::default()
        };
        assert!(attribute(&[job("1", "a", &["0"], 0)], &m).is_empty());
    }

    proptest! {
        #[test]
        fn energy_and_gpu_time_are_conserved(
            span in 1u64..120_000,
            gpu_uj in proptest::collection::vec(proptest::option::of(0u64..1_000_000_000_000), 0..9),
            cpu_uj in 0u64..1_000_000_000_000,
            dram_uj in 0u64..100_000_000_000,
            other_uj in 0u64..100_000_000_000,
            cores in 0u32..256,
            jobs_spec in proptest::collection::vec((0u64..200_000, proptest::collection::vec(0u32..12, 0..3), 0u64..100_000_000_000), 0..6),
            mig in proptest::collection::vec((1u32..4, proptest::option::of(1u32..5), proptest::option::of(0u32..=1000)), 0..4),
            spent in (proptest::option::of(0u32..=1000), proptest::option::of(0u32..=1000), 0u64..200_000),
        ) {
            let t0 = 1_000_000u64;
            let t1 = t0 + span;
            let jobs: Vec<Job> = jobs_spec.iter().enumerate().map(|(i, (start, gpus, _))| Job {
                id: n(&i.to_string()),
                project: n(&format!("p{}", i % 3)),
                user: n("u"),
                // 10 and 11 name MIG devices of GPU 0.
                gpus: gpus.iter().map(|&g| n(&match g { 10.. => format!("MIG-{}", g - 9), _ => g.to_string() })).collect(),
                start_ms: t0 - 100_000 + start,
                end_ms: None,
            }).collect();
            let mut m = Measured {
                t0,
                t1,
                gpus: gpu_uj.iter().enumerate().map(|(i, e)| GpuEnergy { index: i as u32, uuid: format!("GPU-{i}"), energy_uj: *e, ..GpuEnergy::default() }).collect(),
                cpu_uj,
                dram_uj,
                other_uj,
                cores,
                job_cpu_us: jobs_spec.iter().enumerate().map(|(i, (_, _, cpu))| (n(&i.to_string()), *cpu)).collect(),
            };
            if let Some(g) = m.gpus.first_mut() {
                g.mig = mig.iter().map(|&(gi, slices, active_permille)| MigShare { uuid: format!("MIG-{gi}"), gpu_instance_id: gi, slices, active_permille, tensor_permille: None }).collect();
                g.mig_slices = Some(7);
            }
            for g in &mut m.gpus {
                (g.active_permille, g.tensor_permille, g.capped_ms) = spent;
            }
            let u = attribute(&jobs, &m);
            let t = total(&u);
            prop_assert_eq!(t.gpu_uj, gpu_uj.iter().flatten().sum::<u64>());
            prop_assert_eq!(t.cpu_uj, cpu_uj);
            prop_assert_eq!(t.dram_uj, dram_uj);
            prop_assert_eq!(t.other_uj, other_uj);
            prop_assert_eq!(t.gpu_ms, span * gpu_uj.len() as u64);
            for x in &u {
                prop_assert_eq!(x.amounts.part_exceeding(), None);
            }
            // Nobody is billed for time before their job started.
            for x in u.iter().filter(|x| x.job.is_some()) {
                let j = jobs.iter().find(|j| Some(&j.id) == x.job.as_ref()).unwrap();
                let ran = t1.saturating_sub(j.start_ms.max(t0));
                prop_assert!(x.amounts.gpu_ms <= ran * j.gpus.len() as u64 * 2);
            }
        }
    }
}
