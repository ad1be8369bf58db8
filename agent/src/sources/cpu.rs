//! Node CPU and memory from procfs, and per-job CPU time from job cgroups.
//!
//! Job cgroups are found by patterns relative to the cgroup root (Slurm's layouts by
//! default). A job directory is read as cgroup v2 (`cpu.stat`, `usage_usec`) when it has
//! that file, else as cgroup v1 (`cpuacct.usage`, nanoseconds).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nodewatt_wire::{Cpu, CpuTicks, JobCpu, JobId, Sample};
use procfs_core::{ExplicitSystemInfo, FromBufRead, FromBufReadSI, FromRead, KernelStats};

use super::{Inventory, Source, SourceError, TickMs};
use crate::counter;
use crate::sysfs;

pub struct CpuSource {
    stat: ProcFile,
    loadavg: ProcFile,
    meminfo: ProcFile,
    sysinfo: ExplicitSystemInfo,
    cgroup_root: PathBuf,
    job_patterns: Vec<String>,
    last_ticks: Option<CpuTicks>,
    cores: u32,
}

/// A procfs file opened once and re-read with pread into a reused buffer.
struct ProcFile {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
}

impl ProcFile {
    fn open(path: PathBuf) -> io::Result<ProcFile> {
        Ok(ProcFile {
            file: File::open(&path)?,
            path,
            buf: Vec::with_capacity(4096),
        })
    }

    fn read(&mut self) -> Result<&[u8], SourceError> {
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self
                .file
                .read_at(&mut chunk, self.buf.len() as u64)
                .map_err(|e| SourceError(sysfs::describe(&self.path, &e)))?;
            if n == 0 {
                return Ok(&self.buf);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn parse_err(path: &Path, e: impl std::fmt::Display) -> SourceError {
    SourceError(format!("{}: cannot parse: {e}", path.display()))
}

impl CpuSource {
    pub fn open(
        proc_root: &Path,
        cgroup_root: PathBuf,
        job_patterns: Vec<String>,
    ) -> Result<CpuSource, SourceError> {
        let open = |name: &str| {
            let p = proc_root.join(name);
            ProcFile::open(p.clone()).map_err(|e| SourceError(sysfs::describe(&p, &e)))
        };
        // SAFETY: sysconf has no preconditions.
        let tps = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let mut src = CpuSource {
            stat: open("stat")?,
            loadavg: open("loadavg")?,
            meminfo: open("meminfo")?,
            sysinfo: ExplicitSystemInfo {
                boot_time_secs: 0,
                ticks_per_second: if tps > 0 { tps as u64 } else { 100 },
                page_size: 4096,
                is_little_endian: cfg!(target_endian = "little"),
            },
            cgroup_root,
            job_patterns,
            last_ticks: None,
            cores: 0,
        };
        src.cores = src.kernel_stats()?.cpu_time.len() as u32;
        Ok(src)
    }

    fn kernel_stats(&mut self) -> Result<KernelStats, SourceError> {
        let bytes = self.stat.read()?;
        KernelStats::from_buf_read(bytes, &self.sysinfo).map_err(|e| parse_err(&self.stat.path, e))
    }

    fn cgroup_version(&self) -> &'static str {
        if self.cgroup_root.join("cgroup.controllers").exists() {
            "v2"
        } else if self.cgroup_root.is_dir() {
            "v1"
        } else {
            "absent"
        }
    }
}

fn ticks_of(stats: &KernelStats) -> CpuTicks {
    let t = &stats.total;
    CpuTicks {
        user: t.user,
        nice: t.nice,
        system: t.system,
        idle: t.idle,
        iowait: t.iowait.unwrap_or(0),
        irq: t.irq.unwrap_or(0),
        softirq: t.softirq.unwrap_or(0),
        steal: t.steal.unwrap_or(0),
    }
}

/// Busy share of all CPUs between two readings of the /proc/stat totals.
/// Guest time is already inside user/nice, so it is not added again.
pub fn utilisation_pct(prev: &CpuTicks, cur: &CpuTicks) -> Option<f64> {
    let total =
        |t: &CpuTicks| t.user + t.nice + t.system + t.idle + t.iowait + t.irq + t.softirq + t.steal;
    let idle = |t: &CpuTicks| t.idle + t.iowait;
    let d_total = counter::step(total(prev), total(cur), None).delta()?;
    let d_idle = counter::step(idle(prev), idle(cur), None).delta()?;
    if d_total == 0 || d_idle > d_total {
        return None;
    }
    Some((d_total - d_idle) as f64 * 100.0 / d_total as f64)
}

/// Matches one path component against a pattern where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = parts.split_first().expect("split yields at least one part");
    let Some(mut tail) = name.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return tail.is_empty();
    };
    for part in middle {
        match tail.find(part) {
            Some(i) => tail = &tail[i + part.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

/// Directories under `root` matching a `/`-separated pattern.
pub fn expand(root: &Path, pattern: &str) -> Vec<PathBuf> {
    let mut found = vec![root.to_path_buf()];
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for dir in &found {
            if comp.contains('*') {
                if let Ok(entries) = sysfs::sorted_entries(dir) {
                    next.extend(
                        entries
                            .into_iter()
                            .filter(|(name, p)| glob_match(comp, name) && p.is_dir())
                            .map(|(_, p)| p),
                    );
                }
            } else if dir.join(comp).is_dir() {
                next.push(dir.join(comp));
            }
        }
        found = next;
    }
    found
}

/// `job_1234` → `1234`; anything else is not a job cgroup.
fn job_id(dir: &Path) -> Option<JobId> {
    let id = dir.file_name()?.to_str()?.strip_prefix("job_")?;
    JobId::new(id).ok()
}

/// Cumulative CPU time of a cgroup in microseconds, v2 first, then v1.
fn cgroup_cpu_usage_us(dir: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(dir.join("cpu.stat")) {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "cpu.stat has no usage_usec")
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Ok(sysfs::read_u64(&dir.join("cpuacct.usage"))? / 1000)
        }
        Err(e) => Err(e),
    }
}

pub fn job_cgroups(root: &Path, patterns: &[String]) -> Vec<JobCpu> {
    let mut jobs: Vec<JobCpu> = Vec::new();
    for pattern in patterns {
        for dir in expand(root, pattern) {
            let Some(job) = job_id(&dir) else { continue };
            // cpuacct and cpu,cpuacct are often the same hierarchy: first one wins.
            if jobs.iter().any(|j| j.job == job) {
                continue;
            }
            // A job whose cgroup is being torn down between listing and reading is skipped.
            if let Ok(cpu_usage_us) = cgroup_cpu_usage_us(&dir) {
                let cgroup = dir
                    .strip_prefix(root)
                    .unwrap_or(&dir)
                    .to_string_lossy()
                    .into_owned();
                jobs.push(JobCpu {
                    job,
                    cgroup,
                    cpu_usage_us,
                });
            }
        }
    }
    jobs
}

impl Source for CpuSource {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn inventory(&self) -> Inventory {
        let jobs = job_cgroups(&self.cgroup_root, &self.job_patterns).len();
        Inventory {
            devices: 1,
            summary: format!(
                "{} CPUs; cgroup {} at {}, {jobs} job cgroups",
                self.cores,
                self.cgroup_version(),
                self.cgroup_root.display()
            ),
            problems: Vec::new(),
            unavailable: None,
        }
    }

    fn read(&mut self, _at: TickMs, out: &mut Sample) -> Result<u32, SourceError> {
        let stats = self.kernel_stats()?;
        let ticks = ticks_of(&stats);
        let util_pct = self
            .last_ticks
            .as_ref()
            .and_then(|prev| utilisation_pct(prev, &ticks));
        self.last_ticks = Some(ticks);

        let load = procfs_core::LoadAverage::from_read(self.loadavg.read()?)
            .map_err(|e| parse_err(&self.loadavg.path, e))?;
        let mem = procfs_core::Meminfo::from_buf_read(self.meminfo.read()?)
            .map_err(|e| parse_err(&self.meminfo.path, e))?;

        out.cpu = Some(Cpu {
            cores: stats.cpu_time.len() as u32,
            ticks,
            ticks_per_s: self.sysinfo.ticks_per_second,
            util_pct,
            load1: f64::from(load.one),
            load5: f64::from(load.five),
            load15: f64::from(load.fifteen),
            mem_total_bytes: mem.mem_total,
            mem_available_bytes: mem.mem_available,
            jobs: job_cgroups(&self.cgroup_root, &self.job_patterns),
        });
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::default_job_cgroups;
    use crate::testutil::n;
    use crate::testutil::{empty_sample, fixture_copy, fixture_root};

    fn ticks(user: u64, idle: u64) -> CpuTicks {
        CpuTicks {
            user,
            idle,
            ..Default::default()
        }
    }

    #[test]
    fn utilisation_from_tick_deltas() {
        assert_eq!(
            utilisation_pct(&ticks(100, 100), &ticks(175, 125)),
            Some(75.0)
        );
        assert_eq!(utilisation_pct(&ticks(100, 100), &ticks(100, 100)), None);
        // Counters going back (reboot between reads) give no figure rather than a wrong one.
        assert_eq!(utilisation_pct(&ticks(100, 100), &ticks(10, 10)), None);
        let mut io = ticks(100, 100);
        io.iowait = 50;
        let mut io2 = ticks(100, 100);
        io2.iowait = 150;
        assert_eq!(
            utilisation_pct(&io, &io2),
            Some(0.0),
            "iowait counts as idle"
        );
    }

    #[test]
    fn glob_components() {
        assert!(glob_match("job_*", "job_123"));
        assert!(glob_match("slurm*", "slurm"));
        assert!(glob_match("slurm*", "slurm_node01"));
        assert!(glob_match("uid_*", "uid_1000"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(!glob_match("job_*", "step_0"));
        assert!(!glob_match("abc", "abcd"));
        assert!(glob_match("abc", "abc"));
        assert!(!glob_match("a*a", "a"));
    }

    #[test]
    fn reads_proc_fixture() {
        let fx = fixture_copy();
        let mut cpu = CpuSource::open(
            &fx.proc(),
            fx.sys().join("fs/cgroup"),
            default_job_cgroups(),
        )
        .unwrap();
        let mut s = empty_sample();
        cpu.read(1_000, &mut s).unwrap();
        let c = s.cpu.clone().unwrap();
        assert_eq!(c.cores, 4);
        assert_eq!(c.ticks.user, 1_000_000);
        assert_eq!(c.ticks.steal, 80);
        assert_eq!(c.util_pct, None, "no previous sample");
        assert_eq!((c.load1, c.load5, c.load15), (3.5, 2.25, 1.0));
        assert_eq!(c.mem_total_bytes, 263_840_100 * 1024);
        assert_eq!(c.mem_available_bytes, Some(241_567_000 * 1024));

        // 400 more ticks, 100 of them idle: 75 % busy.
        let stat = std::fs::read_to_string(fx.proc().join("stat"))
            .unwrap()
            .replacen(
                "cpu  1000000 2000 300000 5000000",
                "cpu  1000300 2000 300000 5000100",
                1,
            );
        fx.write("proc/stat", &stat);
        let mut s = empty_sample();
        cpu.read(2_000, &mut s).unwrap();
        assert_eq!(s.cpu.unwrap().util_pct, Some(75.0));
    }

    #[test]
    fn job_cgroups_v2_layout() {
        let root = fixture_root().join("sys/fs/cgroup");
        let jobs = job_cgroups(&root, &default_job_cgroups());
        assert_eq!(
            jobs,
            vec![
                JobCpu {
                    job: n("1001"),
                    cgroup: "system.slice/slurmstepd.scope/job_1001".into(),
                    cpu_usage_us: 7_200_000_000,
                },
                JobCpu {
                    job: n("1002"),
                    cgroup: "system.slice/slurmstepd.scope/job_1002".into(),
                    cpu_usage_us: 1_500_000,
                },
            ]
        );
    }

    #[test]
    fn job_cgroups_v1_layout_deduplicates_cpu_cpuacct() {
        let root = fixture_root().join("../node-cgroup-v1/sys/fs/cgroup");
        let jobs = job_cgroups(&root, &default_job_cgroups());
        let got: Vec<(&str, &str, u64)> = jobs
            .iter()
            .map(|j| (j.job.as_str(), j.cgroup.as_str(), j.cpu_usage_us))
            .collect();
        assert_eq!(
            got,
            [
                ("2001", "cpuacct/slurm/uid_1000/job_2001", 3_000_000),
                ("2002", "cpuacct/slurm/uid_1001/job_2002", 42),
            ]
        );
    }

    #[test]
    fn missing_proc_file_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = CpuSource::open(dir.path(), dir.path().into(), vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("stat: not found"), "{err}");
    }

    #[test]
    fn garbage_proc_stat_is_an_error_not_a_panic() {
        let fx = fixture_copy();
        let mut cpu = CpuSource::open(&fx.proc(), fx.sys(), vec![]).unwrap();
        fx.write("proc/stat", "cpu garbage\n");
        let err = cpu.read(0, &mut empty_sample()).unwrap_err().to_string();
        assert!(err.contains("cannot parse"), "{err}");
    }
}
