//! Per sample: reads the job registry, turns the sample's deltas into per-job usage
//! (`attribution`), keeps running per-job totals, and cross-checks GPU processes against
//! the jobs that own the GPUs.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use nodewatt_wire::{AccountingStats, JobId, Sample, SensorKind};

use crate::attribution::{GpuEnergy, Measured, MigShare};
use ledger::Ledger;
use registry::Registry;

pub mod ledger;
pub mod prolog;
pub mod registry;

pub struct Accountant {
    registry: Registry,
    proc_root: PathBuf,
    ledger: Ledger,
    /// (GPU index, pid) pairs already reported as foreign.
    foreign_seen: HashSet<(u32, u32)>,
    /// The job of each live GPU process (`None`: not in a job). A process never changes
    /// job, so its cgroup file is read once, not on every sample.
    pid_job: HashMap<u32, Option<JobId>>,
    foreign_gpu_processes: u64,
}

/// The job a process belongs to, from its /proc/<pid>/cgroup (`.../job_<id>/...`).
pub fn job_of_cgroup(cgroup_file: &str) -> Option<&str> {
    cgroup_file
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .find_map(|part| part.strip_prefix("job_"))
        .filter(|id| !id.is_empty())
}

/// Energy measured over the span by device class, from the sample's deltas, in µJ:
/// CPU = top-level RAPL packages; DRAM = `dram` domains; other = a node power meter's
/// energy (power × span) minus what GPUs, CPUs and DRAM account for. Subzones such as
/// `core` are inside their package and `psys` overlaps everything, so neither is added.
pub fn measured(s: &Sample, t0: u64) -> Measured {
    let span = s.ts_ms.saturating_sub(t0);
    // Percentages as ‰, within 0..=1000 whatever a driver said (this runs before the
    // sample is checked).
    let permille = |pct: Option<f64>| pct.map(|p| (p * 10.0).round().clamp(0.0, 1000.0) as u32);
    let gpus: Vec<GpuEnergy> = s
        .gpus
        .iter()
        .map(|g| GpuEnergy {
            index: g.index,
            uuid: g.uuid.clone(),
            energy_uj: g.energy_delta_mj.map(|mj| mj.saturating_mul(1000)),
            active_permille: permille(g.gpm.sm_active_pct.or(g.util_pct)),
            tensor_permille: permille(g.gpm.tensor_active_pct),
            capped_ms: g.power_capped_ms.max(g.thermal_capped_ms).unwrap_or(0),
            mig: g
                .mig
                .iter()
                .map(|d| MigShare {
                    uuid: d.uuid.clone(),
                    gpu_instance_id: d.gpu_instance_id,
                    slices: d.slices,
                    active_permille: permille(d.gpm.sm_active_pct),
                    tensor_permille: permille(d.gpm.tensor_active_pct),
                })
                .collect(),
            mig_slices: g.mig_slices,
        })
        .collect();
    // The wire's class rule: the collector checks usage against the same sums.
    let rapl = |pick: fn(&nodewatt_wire::RaplDomain) -> bool| -> u64 {
        s.rapl
            .iter()
            .filter(|d| pick(d))
            .filter_map(|d| d.energy_delta_uj)
            .sum()
    };
    let cpu_uj = rapl(nodewatt_wire::check::is_cpu_package);
    let dram_uj = rapl(nodewatt_wire::check::is_dram);
    let gpu_uj: u64 = gpus.iter().filter_map(|g| g.energy_uj).sum();
    let meter_uj: Option<u64> = s
        .hwmon
        .iter()
        .filter(|h| h.kind == SensorKind::Power && h.chip == "power_meter")
        .filter_map(|h| h.value)
        .map(|w| (w.max(0.0) * span as f64 * 1000.0).round() as u64)
        .reduce(|a, b| a + b);
    let other_uj = meter_uj.map_or(0, |m| m.saturating_sub(gpu_uj + cpu_uj + dram_uj));
    Measured {
        t0,
        t1: s.ts_ms,
        gpus,
        cpu_uj,
        dram_uj,
        other_uj,
        cores: s.cpu.as_ref().map_or(0, |c| c.cores),
        job_cpu_us: HashMap::new(),
    }
}

impl Accountant {
    pub fn new(dir: PathBuf, owner_uid: u32, proc_root: PathBuf, ledger: Ledger) -> Accountant {
        Accountant {
            registry: Registry::new(dir, owner_uid),
            proc_root,
            ledger,
            foreign_seen: HashSet::new(),
            pid_job: HashMap::new(),
            foreign_gpu_processes: 0,
        }
    }

    pub fn registry_dir(&self) -> &std::path::Path {
        self.registry.dir()
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Continues a saved ledger (its jobs, totals and last instant billed).
    pub fn resume(&mut self, saved: Ledger) {
        let iv = self.ledger.totals_interval_ms();
        self.ledger = saved.resumed(iv);
    }

    /// Fills `usage`, `job_totals` and `accounting` of a sample whose deltas are set.
    pub fn account(&mut self, s: &mut Sample) {
        let read = self.registry.read();
        self.ledger.account(s, read, measured);
        self.cross_check(s);
        s.accounting = Some(AccountingStats {
            jobs: self.ledger.jobs().len() as u32,
            rejected_files: self.registry.rejected_files,
            foreign_gpu_processes: self.foreign_gpu_processes,
            registry_errors: self.ledger.registry_errors,
        });
    }

    /// Running jobs' totals, for the last sample before a stop.
    pub fn running_totals(&mut self) -> Vec<nodewatt_wire::JobTotal> {
        self.ledger.running_totals()
    }

    /// A GPU process that belongs to a job other than the GPU's owner is reported, not
    /// silently billed: the GPU's energy still goes to its owner (or `_idle`).
    fn cross_check(&mut self, s: &Sample) {
        let jobs = self.ledger.jobs();
        let live: HashSet<u32> = s.gpus.iter().flat_map(|g| g.pids.iter().copied()).collect();
        self.pid_job.retain(|pid, _| live.contains(pid));
        self.foreign_seen.retain(|(_, pid)| live.contains(pid));
        for g in &s.gpus {
            let owners: Vec<&str> = jobs
                .iter()
                .filter(|j| j.holds(g.index, &g.uuid))
                .map(|j| j.id.as_str())
                .collect();
            for &pid in &g.pids {
                if self.foreign_seen.contains(&(g.index, pid)) {
                    continue;
                }
                let proc_root = &self.proc_root;
                let job = self.pid_job.entry(pid).or_insert_with(|| {
                    let path = proc_root.join(pid.to_string()).join("cgroup");
                    let text = std::fs::read_to_string(path).ok()?;
                    job_of_cgroup(&text).and_then(|id| JobId::new(id).ok())
                });
                let Some(job) = job.as_deref() else { continue };
                if !owners.contains(&job) {
                    self.foreign_seen.insert((g.index, pid));
                    self.foreign_gpu_processes += 1;
                    tracing::warn!(
                        gpu = g.index,
                        pid,
                        job,
                        owner = ?owners,
                        "a process of job {job} uses GPU {} which that job does not own; not billed to it",
                        g.index
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::n;
    use nodewatt_wire::{Cpu, Gpu, JobCpu, RaplDomain};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn job_from_cgroup_file() {
        let v2 = "0::/system.slice/slurmstepd.scope/job_1234/step_0/user/task_0\n";
        assert_eq!(job_of_cgroup(v2), Some("1234"));
        let v1 =
            "12:cpuacct,cpu:/slurm/uid_1000/job_77/step_batch\n4:memory:/slurm/uid_1000/job_77\n";
        assert_eq!(job_of_cgroup(v1), Some("77"));
        assert_eq!(
            job_of_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n"),
            None
        );
        assert_eq!(job_of_cgroup("garbage"), None);
    }

    fn sample(
        ts: u64,
        gpu_delta_mj: Option<u64>,
        pids: Vec<u32>,
        job_cpu: &[(&str, u64)],
    ) -> Sample {
        let mut s = crate::testutil::empty_sample();
        s.ts_ms = ts;
        s.gpus = (0..2)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{i}"),
                energy_delta_mj: gpu_delta_mj,
                pids: if i == 1 { pids.clone() } else { vec![] },
                ..Gpu::default()
            })
            .collect();
        s.rapl.push(RaplDomain {
            zone: "intel-rapl:0".into(),
            name: "package-0".into(),
            parent: None,
            energy_uj: Some(0),
            max_energy_range_uj: 0,
            energy_delta_uj: gpu_delta_mj.map(|_| 80_000_000),
            power_w: None,
            error: None,
        });
        s.cpu = Some(Cpu {
            cores: 4,
            jobs: job_cpu
                .iter()
                .map(|(j, us)| JobCpu {
                    job: n(j),
                    cgroup: String::new(),
                    cpu_usage_us: *us,
                })
                .collect(),
            ..Cpu::default()
        });
        s
    }

    struct Env {
        dir: tempfile::TempDir,
        proc: tempfile::TempDir,
        acc: Accountant,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let proc = tempfile::tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let acc = Accountant::new(
            dir.path().into(),
            me,
            proc.path().into(),
            Ledger::new(0, 60_000),
        );
        Env { dir, proc, acc }
    }

    fn add_job(e: &Env, id: &str, gpus: &str, start: u64) {
        let text =
            format!("job={id}\nproject=proj-{id}\nuser=u{id}\ngpus={gpus}\nstart_ms={start}\n");
        std::fs::write(e.dir.path().join(format!("{id}.job")), text).unwrap();
    }

    fn end_job(e: &Env, id: &str, end_ms: u64) {
        let path = e.dir.path().join(format!("{id}.job"));
        let text = std::fs::read_to_string(&path).unwrap() + &format!("end_ms={end_ms}\n");
        let tmp = e.dir.path().join(".tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    #[test]
    fn bills_jobs_and_reports_totals_when_they_end() {
        let mut e = env();
        add_job(&e, "7", "0", 500);
        let mut s = sample(1_000, None, vec![], &[("7", 1_000_000)]);
        e.acc.account(&mut s);
        assert!(s.usage.is_empty(), "first sample: no deltas");

        let mut s = sample(2_000, Some(300_000), vec![], &[("7", 3_000_000)]);
        e.acc.account(&mut s);
        let job = s
            .usage
            .iter()
            .find(|u| u.job.as_deref() == Some("7"))
            .unwrap();
        assert_eq!(job.project, "proj-7");
        assert_eq!(job.amounts.gpu_uj, 300_000_000);
        assert_eq!(job.amounts.gpu_ms, 1_000);
        assert_eq!(job.amounts.cpu_us, 2_000_000);
        assert_eq!(job.amounts.cpu_uj, 40_000_000, "2 of 4 core-seconds");
        let idle = s.usage.iter().find(|u| u.project == "_idle").unwrap();
        assert_eq!(idle.amounts.gpu_uj, 300_000_000, "GPU 1 belongs to nobody");
        assert!(s.job_totals.is_empty());

        // The epilog records the end at 2_250: the job gets its quarter of the span.
        end_job(&e, "7", 2_250);
        let mut s = sample(3_000, Some(300_000), vec![], &[]);
        e.acc.account(&mut s);
        assert_eq!(s.job_totals.len(), 1);
        let t = &s.job_totals[0];
        assert!(t.ended);
        assert_eq!((t.job.as_str(), t.since_ms, t.until_ms), ("7", 500, 2_250));
        assert_eq!(t.amounts.gpu_uj, 375_000_000);
        assert_eq!(t.amounts.gpu_ms, 1_250);
        let seven = s
            .usage
            .iter()
            .find(|u| u.job.as_deref() == Some("7"))
            .unwrap();
        assert_eq!(
            (seven.amounts.gpu_uj, seven.amounts.gpu_ms),
            (75_000_000, 250)
        );

        // Its file stays a while (ended files are kept an hour): nothing more is billed.
        let mut s = sample(4_000, Some(300_000), vec![], &[]);
        e.acc.account(&mut s);
        assert!(
            s.usage.iter().all(|u| u.job.is_none()),
            "after its end, nothing"
        );
        assert!(s.job_totals.is_empty(), "the final total went out once");
        assert_eq!(s.accounting.unwrap().jobs, 0);
    }

    #[test]
    fn a_file_removed_without_an_end_bills_its_last_span_to_unattributed() {
        let mut e = env();
        add_job(&e, "7", "0", 500);
        e.acc.account(&mut sample(1_000, None, vec![], &[]));
        e.acc
            .account(&mut sample(2_000, Some(300_000), vec![], &[]));
        std::fs::remove_file(e.dir.path().join("7.job")).unwrap();
        let mut s = sample(3_000, Some(300_000), vec![], &[]);
        e.acc.account(&mut s);
        let t = &s.job_totals[0];
        assert_eq!(
            (t.ended, t.until_ms, t.amounts.gpu_uj),
            (true, 2_000, 300_000_000)
        );
        let un = s
            .usage
            .iter()
            .find(|u| u.project == "_unattributed")
            .unwrap();
        assert_eq!(
            un.amounts.gpu_uj, 300_000_000,
            "GPU 0 was the job's for some of it"
        );
        assert!(s.usage.iter().all(|u| u.job.is_none()));
    }

    #[test]
    fn a_failed_registry_read_keeps_the_jobs() {
        let mut e = env();
        add_job(&e, "7", "0", 500);
        e.acc.account(&mut sample(1_000, None, vec![], &[]));
        // Briefly untrusted (writable by others), then unreadable as a whole.
        std::fs::set_permissions(e.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut s = sample(2_000, Some(300_000), vec![], &[]);
        e.acc.account(&mut s);
        std::fs::set_permissions(e.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(s.job_totals.is_empty(), "no job ended");
        let seven = s
            .usage
            .iter()
            .find(|u| u.job.as_deref() == Some("7"))
            .unwrap();
        assert_eq!(seven.amounts.gpu_uj, 300_000_000);
        assert_eq!(s.accounting.unwrap().registry_errors, 1);
        // The file itself rejected for a moment (rewritten badly): kept as well.
        let path = e.dir.path().join("7.job");
        let good = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, "garbage").unwrap();
        let mut s = sample(3_000, Some(300_000), vec![], &[]);
        e.acc.account(&mut s);
        assert!(s.job_totals.is_empty());
        std::fs::write(&path, good).unwrap();
        end_job(&e, "7", 3_500);
        let mut s = sample(4_000, Some(300_000), vec![], &[]);
        e.acc.account(&mut s);
        let t = &s.job_totals[0];
        assert_eq!(
            (t.since_ms, t.until_ms),
            (500, 3_500),
            "one total, never restarted"
        );
        assert_eq!(t.amounts.gpu_uj, 750_000_000);
    }

    #[test]
    fn a_job_kept_for_a_rejected_file_never_shares_its_gpu_with_the_next_tenant() {
        let mut e = env();
        add_job(&e, "7", "0", 500);
        e.acc.account(&mut sample(1_000, None, vec![], &[]));
        std::fs::write(e.dir.path().join("7.job"), "garbage").unwrap();
        e.acc
            .account(&mut sample(2_000, Some(300_000), vec![], &[]));
        // The scheduler gives GPU 0 to job 8: job 7 must have ended.
        add_job(&e, "8", "0", 2_500);
        let mut s = sample(3_000, Some(300_000), vec![], &[]);
        e.acc.account(&mut s);
        let t = s.job_totals.iter().find(|t| t.job == "7").unwrap();
        assert!(t.ended);
        let eight = s
            .usage
            .iter()
            .find(|u| u.job.as_deref() == Some("8"))
            .unwrap();
        assert_eq!(
            eight.amounts.gpu_uj, 150_000_000,
            "its half of the span, not shared"
        );
        let un = s
            .usage
            .iter()
            .find(|u| u.project == "_unattributed")
            .unwrap();
        assert_eq!(un.amounts.gpu_uj, 150_000_000);
    }

    #[test]
    fn a_missing_directory_ends_nothing() {
        let mut e = env();
        add_job(&e, "7", "0", 500);
        e.acc.account(&mut sample(1_000, None, vec![], &[]));
        let moved = e.dir.path().with_extension("away");
        std::fs::rename(e.dir.path(), &moved).unwrap();
        let mut s = sample(2_000, Some(300_000), vec![], &[]);
        e.acc.account(&mut s);
        std::fs::rename(&moved, e.dir.path()).unwrap();
        assert!(s.job_totals.is_empty());
        assert_eq!(s.accounting.unwrap().registry_errors, 1);
        assert_eq!(s.accounting.unwrap().jobs, 1);
    }

    #[test]
    fn running_totals_go_out_at_each_interval_boundary() {
        let mut e = env();
        add_job(&e, "8", "0,1", 0);
        for ts in [59_000, 60_000, 61_000] {
            let mut s = sample(ts, Some(1), vec![], &[]);
            e.acc.account(&mut s);
            assert_eq!(s.job_totals.len(), usize::from(ts == 60_000), "at {ts}");
        }
    }

    #[test]
    fn foreign_gpu_processes_are_counted_once() {
        let mut e = env();
        add_job(&e, "7", "0", 0);
        add_job(&e, "9", "1", 0);
        let pid_dir = e.proc.path().join("4242");
        std::fs::create_dir(&pid_dir).unwrap();
        // A process of job 7 on GPU 1, which job 9 owns.
        std::fs::write(
            pid_dir.join("cgroup"),
            "0::/system.slice/slurmstepd.scope/job_7/step_0\n",
        )
        .unwrap();
        for ts in [1_000, 2_000] {
            let mut s = sample(ts, Some(5), vec![4242], &[]);
            e.acc.account(&mut s);
            assert_eq!(s.accounting.unwrap().foreign_gpu_processes, 1);
            assert_eq!(s.accounting.unwrap().jobs, 2);
        }
        // Its energy stays with the owner.
        let mut s = sample(3_000, Some(5), vec![4242], &[]);
        e.acc.account(&mut s);
        let nine = s
            .usage
            .iter()
            .find(|u| u.job.as_deref() == Some("9"))
            .unwrap();
        assert_eq!(nine.amounts.gpu_uj, 5_000);
        // A legitimate process of job 9 on GPU 1: its cgroup file is read once and its
        // job remembered while it lives (a process never changes job).
        let legit = e.proc.path().join("4343");
        std::fs::create_dir(&legit).unwrap();
        std::fs::write(
            legit.join("cgroup"),
            "0::/system.slice/slurmstepd.scope/job_9/step_0\n",
        )
        .unwrap();
        e.acc
            .account(&mut sample(4_000, Some(5), vec![4242, 4343], &[]));
        std::fs::write(
            legit.join("cgroup"),
            "0::/system.slice/slurmstepd.scope/job_7/step_0\n",
        )
        .unwrap();
        let mut s = sample(5_000, Some(5), vec![4242, 4343], &[]);
        e.acc.account(&mut s);
        assert_eq!(
            s.accounting.unwrap().foreign_gpu_processes,
            1,
            "not read again"
        );
        // Once gone, the pid is forgotten; a new process with that pid is read afresh.
        e.acc.account(&mut sample(6_000, Some(5), vec![4242], &[]));
        let mut s = sample(7_000, Some(5), vec![4242, 4343], &[]);
        e.acc.account(&mut s);
        assert_eq!(s.accounting.unwrap().foreign_gpu_processes, 2);
    }

    #[test]
    fn measured_classes_from_rapl_and_a_node_meter() {
        let mut s = sample(2_000, Some(100_000), vec![], &[]);
        s.rapl.push(RaplDomain {
            zone: "intel-rapl:0:0".into(),
            name: "core".into(),
            parent: Some("intel-rapl:0".into()),
            energy_uj: Some(0),
            max_energy_range_uj: 0,
            energy_delta_uj: Some(50_000_000),
            power_w: None,
            error: None,
        });
        s.rapl.push(RaplDomain {
            zone: "intel-rapl:0:1".into(),
            name: "dram".into(),
            parent: Some("intel-rapl:0".into()),
            energy_uj: Some(0),
            max_energy_range_uj: 0,
            energy_delta_uj: Some(10_000_000),
            power_w: None,
            error: None,
        });
        s.hwmon.push(nodewatt_wire::HwmonSensor {
            chip: "power_meter".into(),
            device: "hwmon3".into(),
            sensor: "power1".into(),
            label: None,
            kind: SensorKind::Power,
            value: Some(500.0),
            energy_uj: None,
            error: None,
        });
        let m = measured(&s, 1_000);
        assert_eq!(m.cpu_uj, 80_000_000, "core is inside the package");
        assert_eq!(m.dram_uj, 10_000_000);
        assert_eq!(
            m.gpus.iter().filter_map(|g| g.energy_uj).sum::<u64>(),
            200_000_000
        );
        // 500 W for 1 s = 500 J, minus 290 J measured by parts.
        assert_eq!(m.other_uj, 210_000_000);
    }
}
