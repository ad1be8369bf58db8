//! The job registry: one small file per running job, written by the scheduler's prolog
//! as root and removed by its epilog (config/slurm/). Billing must not be forgeable by
//! users, so only files owned by the trusted uid (root) in a directory that only it can
//! write are read; anything else is ignored with a log line and counted. User
//! environment variables are never consulted.
//!
//! File format, `<dir>/<job>.job`, one `key=value` per line:
//!
//! ```text
//! job=1234
//! project=proj-a
//! user=alice
//! gpus=0,1
//! cpus=16
//! start_ms=1763700000000
//! ```

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::attribution::Job;

const MAX_FILE_BYTES: u64 = 16 * 1024;

/// Parses one job file. `gpus` and `cpus` may be empty; everything else is required.
pub fn parse_job(text: &str) -> Result<Job, String> {
    let mut job = None;
    let mut project = None;
    let mut user = None;
    let mut gpus = Vec::new();
    let mut start_ms = None;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {line:?} is not key=value"))?;
        let v = v.trim();
        match k.trim() {
            "job" => job = Some(name(v)?),
            "project" => project = Some(name(v)?),
            "user" => user = Some(name(v)?),
            "gpus" => {
                gpus = v
                    .split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(name)
                    .collect::<Result<_, _>>()?
            }
            "start_ms" => {
                start_ms = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("start_ms {v:?} is not a number"))?,
                )
            }
            "cpus" => {}
            other => return Err(format!("unknown key {other:?}")),
        }
    }
    Ok(Job {
        id: job.ok_or("no job=")?,
        project: project.ok_or("no project=")?,
        user: user.ok_or("no user=")?,
        gpus,
        start_ms: start_ms.ok_or("no start_ms=")?,
    })
}

/// Registry names are parsed into the wire's name types here, where they enter: a file
/// with a name that breaks its rule is rejected with the rule, not billed to `_idle`.
fn name<T: std::str::FromStr<Err = nodewatt_wire::NameError>>(v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|e: nodewatt_wire::NameError| e.to_string())
}

/// Why a file or the directory is not trusted, if it is not.
fn distrust(meta: &std::fs::Metadata, owner_uid: u32) -> Option<String> {
    if meta.uid() != owner_uid {
        return Some(format!("owned by uid {}, not {owner_uid}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o777
        ));
    }
    None
}

pub struct Registry {
    dir: PathBuf,
    owner_uid: u32,
    /// The directory's mtime at the last scan: unchanged means the same jobs.
    seen_mtime: Option<SystemTime>,
    jobs: Vec<Job>,
    /// Files already reported, so each problem is logged once.
    reported: HashSet<(PathBuf, String)>,
    pub rejected_files: u64,
}

impl Registry {
    pub fn new(dir: PathBuf, owner_uid: u32) -> Registry {
        Registry {
            dir,
            owner_uid,
            seen_mtime: None,
            jobs: Vec::new(),
            reported: HashSet::new(),
            rejected_files: 0,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn reject(&mut self, path: &Path, why: String) {
        if self.reported.insert((path.to_owned(), why.clone())) {
            self.rejected_files += 1;
            tracing::warn!(file = %path.display(), "job registry entry ignored: {why}");
        }
    }

    /// The running jobs, sorted by id. A missing directory means no jobs (no scheduler
    /// on this node yet); an untrusted one is ignored entirely.
    pub fn jobs(&mut self) -> &[Job] {
        let meta = match std::fs::metadata(&self.dir) {
            Ok(m) => m,
            Err(_) => {
                self.jobs.clear();
                self.seen_mtime = None;
                return &self.jobs;
            }
        };
        if let Some(why) = distrust(&meta, self.owner_uid) {
            let dir = self.dir.clone();
            self.reject(&dir, format!("directory {why}"));
            self.jobs.clear();
            self.seen_mtime = None;
            return &self.jobs;
        }
        let mtime = meta.modified().ok();
        if mtime.is_some() && mtime == self.seen_mtime {
            return &self.jobs;
        }
        let mut jobs = Vec::new();
        let entries = std::fs::read_dir(&self.dir).into_iter().flatten().flatten();
        for entry in entries {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("job") {
                continue; // the prolog's temporary files, anything else
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // removed meanwhile
            };
            if !meta.file_type().is_file() {
                self.reject(&path, "not a regular file".into());
                continue;
            }
            if let Some(why) = distrust(&meta, self.owner_uid) {
                self.reject(&path, why);
                continue;
            }
            if meta.len() > MAX_FILE_BYTES {
                self.reject(&path, format!("larger than {MAX_FILE_BYTES} bytes"));
                continue;
            }
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_job(&t))
            {
                Ok(job) => jobs.push(job),
                Err(why) => self.reject(&path, why),
            }
        }
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        jobs.dedup_by(|a, b| a.id == b.id);
        self.jobs = jobs;
        self.seen_mtime = mtime;
        &self.jobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const GOOD: &str = "job=42\nproject=proj-a\nuser=alice\ngpus=0, 1\ncpus=16\nstart_ms=1000\n";

    #[test]
    fn parses_a_job_file() {
        let j = parse_job(GOOD).unwrap();
        assert_eq!(j.id, "42");
        assert_eq!(j.project, "proj-a");
        assert_eq!(j.gpus, ["0", "1"]);
        assert_eq!(j.start_ms, 1000);
        let no_gpus = parse_job(&GOOD.replace("gpus=0, 1", "gpus=")).unwrap();
        assert!(no_gpus.gpus.is_empty());
        let uuids = parse_job(&GOOD.replace("gpus=0, 1", "gpus=GPU-5140a7ed-0000")).unwrap();
        assert_eq!(uuids.gpus, ["GPU-5140a7ed-0000"]);
    }

    #[test]
    fn rejects_malformed_files_with_a_reason() {
        for (bad, why) in [
            (GOOD.replace("project=proj-a\n", ""), "no project"),
            (GOOD.replace("proj-a", "proj a"), "project"),
            (GOOD.replace("alice", "al\\ice"), "user"),
            (GOOD.replace("start_ms=1000", "start_ms=soon"), "start_ms"),
            (GOOD.replace("cpus=16", "colour=blue"), "unknown key"),
            ("garbage".to_string(), "key=value"),
        ] {
            let err = parse_job(&bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    fn registry_dir() -> (tempfile::TempDir, u32) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: geteuid has no preconditions.
        (dir, unsafe { libc::geteuid() })
    }

    #[test]
    fn reads_trusted_files_only() {
        let (dir, me) = registry_dir();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("42.job", GOOD, 0o644);
        write("43.job", &GOOD.replace("job=42", "job=43"), 0o666); // writable by anyone
        write("44.job", "nonsense", 0o644);
        write(".job.tmp123", GOOD, 0o600); // the prolog's temporary file
        std::os::unix::fs::symlink(dir.path().join("42.job"), dir.path().join("45.job")).unwrap();

        let mut r = Registry::new(dir.path().to_owned(), me);
        let ids: Vec<String> = r.jobs().iter().map(|j| j.id.to_string()).collect();
        assert_eq!(ids, ["42"]);
        assert_eq!(r.rejected_files, 3);
        // Each problem is counted once, not on every scan.
        write("46.job", &GOOD.replace("job=42", "job=46"), 0o644);
        assert_eq!(r.jobs().len(), 2);
        assert_eq!(r.rejected_files, 3);

        // Files of another owner are not trusted.
        let mut other = Registry::new(dir.path().to_owned(), me + 1);
        assert!(other.jobs().is_empty());
        assert!(other.rejected_files >= 1);
    }

    #[test]
    fn a_directory_writable_by_others_is_ignored() {
        let (dir, me) = registry_dir();
        std::fs::write(dir.path().join("42.job"), GOOD).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut r = Registry::new(dir.path().to_owned(), me);
        assert!(r.jobs().is_empty());
        assert_eq!(r.rejected_files, 1);
    }

    #[test]
    fn missing_directory_means_no_jobs_and_removal_is_seen() {
        let (dir, me) = registry_dir();
        let mut r = Registry::new(dir.path().join("absent"), me);
        assert!(r.jobs().is_empty());
        assert_eq!(r.rejected_files, 0);
        let mut r = Registry::new(dir.path().to_owned(), me);
        std::fs::write(dir.path().join("42.job"), GOOD).unwrap();
        assert_eq!(r.jobs().len(), 1);
        std::fs::remove_file(dir.path().join("42.job")).unwrap();
        assert!(r.jobs().is_empty(), "the epilog removed it");
    }
}
