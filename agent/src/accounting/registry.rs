//! The job registry: one small file per job, written by the scheduler's prolog as root
//! when the job starts and rewritten by its epilog with the job's end instant
//! (config/slurm/). Billing must not be forgeable by users, so only files owned by the
//! trusted uid (root) in a directory that only it can write are read; anything else is
//! ignored with a log line and counted. User environment variables are never consulted.
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
//! end_ms=1763700015000      (written by the epilog)
//! ```
//!
//! The directory is listed at every sample: its mtime is not enough (on tmpfs two changes
//! within one timestamp tick leave it unchanged). A file's contents are parsed again only
//! when its inode, size or times change; the prolog and epilog replace files by rename,
//! so every change is a new inode.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::attribution::Job;

const MAX_FILE_BYTES: u64 = 16 * 1024;

/// Parses one job file. `gpus`, `cpus` and `end_ms` may be absent or empty; everything
/// else is required.
pub fn parse_job(text: &str) -> Result<Job, String> {
    let mut job = None;
    let mut project = None;
    let mut user = None;
    let mut gpus = Vec::new();
    let mut start_ms = None;
    let mut end_ms = None;
    let instant = |k: &str, v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{k} {v:?} is not a number"))
    };
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
            "start_ms" => start_ms = Some(instant("start_ms", v)?),
            "end_ms" => end_ms = Some(instant("end_ms", v)?),
            "cpus" => {}
            other => return Err(format!("unknown key {other:?}")),
        }
    }
    let start_ms = start_ms.ok_or("no start_ms=")?;
    // A clock stepped back between prolog and epilog: the job ended, at no time after
    // its start. Rejecting the file would keep billing it.
    let end_ms = end_ms.map(|e: u64| e.max(start_ms));
    Ok(Job {
        id: job.ok_or("no job=")?,
        project: project.ok_or("no project=")?,
        user: user.ok_or("no user=")?,
        gpus,
        start_ms,
        end_ms,
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

/// Why the registry could not be read as a whole. The caller keeps the jobs it knew:
/// a blip must never end running jobs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// No such directory: no scheduler has written it yet (or it was removed).
    #[error("job registry {0} does not exist")]
    Missing(PathBuf),
    #[error("job registry {0} cannot be read: {1}")]
    Unreadable(PathBuf, String),
    #[error("job registry {0} is not trusted: {1}")]
    Untrusted(PathBuf, String),
}

/// One successful read of the registry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    /// Jobs of the trusted, well-formed files, sorted by id.
    pub jobs: Vec<Job>,
    /// Names (`<name>.job`) of files that are there but were rejected: their jobs, if
    /// known, are kept as they were.
    pub rejected: BTreeSet<String>,
}

/// What identifies one version of a file: replaced files get a new inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Version {
    fn of(m: &std::fs::Metadata) -> Version {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Version {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

pub struct Registry {
    dir: PathBuf,
    owner_uid: u32,
    /// Each file's last version and what it parsed to (a rejection is remembered too, so
    /// it is logged and counted once).
    files: HashMap<PathBuf, (Version, Result<Job, String>)>,
    /// The directory-level problem last reported, so a lasting one is logged once.
    reported_dir: Option<ReadError>,
    pub rejected_files: u64,
    /// Known files that a listing left out while they were there (see `read`).
    pub missed_by_listing: u64,
}

impl Registry {
    pub fn new(dir: PathBuf, owner_uid: u32) -> Registry {
        Registry {
            dir,
            owner_uid,
            files: HashMap::new(),
            reported_dir: None,
            rejected_files: 0,
            missed_by_listing: 0,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn dir_problem(&mut self, e: ReadError) -> ReadError {
        if self.reported_dir.as_ref() != Some(&e) {
            if !matches!(e, ReadError::Missing(_)) {
                tracing::warn!("{e}; keeping the jobs known so far");
            }
            self.reported_dir = Some(e.clone());
        }
        e
    }

    /// The jobs whose files are in the registry, or why the directory as a whole could
    /// not be read.
    pub fn read(&mut self) -> Result<Listing, ReadError> {
        let meta = match std::fs::metadata(&self.dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(self.dir_problem(ReadError::Missing(self.dir.clone())))
            }
            Err(e) => {
                let e = ReadError::Unreadable(self.dir.clone(), e.to_string());
                return Err(self.dir_problem(e));
            }
        };
        if let Some(why) = distrust(&meta, self.owner_uid) {
            let e = ReadError::Untrusted(self.dir.clone(), format!("directory {why}"));
            return Err(self.dir_problem(e));
        }
        let listing = match std::fs::read_dir(&self.dir) {
            Ok(l) => l,
            Err(e) => {
                let e = ReadError::Unreadable(self.dir.clone(), e.to_string());
                return Err(self.dir_problem(e));
            }
        };
        if self.reported_dir.take().is_some() {
            tracing::info!(dir = %self.dir.display(), "job registry readable again");
        }
        let mut seen = HashMap::with_capacity(self.files.len());
        for entry in listing {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let e = ReadError::Unreadable(self.dir.clone(), e.to_string());
                    return Err(self.dir_problem(e));
                }
            };
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("job") {
                continue; // the prolog's temporary files, anything else
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // removed meanwhile
            };
            self.take_in(path, &meta, &mut seen);
        }
        // A listing that races a rename can miss the renamed file (tmpfs does, measured:
        // an epilog replacing a file while the directory is read). A job ends only when
        // its file is gone, so a file known before and not listed now is looked up by name.
        let unlisted: Vec<PathBuf> = self.files.keys().cloned().collect();
        for path in unlisted {
            match std::fs::symlink_metadata(&path) {
                Ok(meta) => {
                    self.missed_by_listing += 1;
                    tracing::debug!(file = %path.display(), "left out by the directory listing; found by name");
                    self.take_in(path, &meta, &mut seen);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // There, but not readable now: kept as a rejected file keeps its job.
                Err(e) => {
                    let version = self.files[&path].0;
                    seen.insert(path, (version, Err(e.to_string())));
                }
            }
        }
        self.files = seen;
        let mut listing = Listing::default();
        for (path, (_, parsed)) in &self.files {
            match parsed {
                Ok(job) => listing.jobs.push(job.clone()),
                Err(_) => {
                    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                    listing.rejected.insert(stem.to_string());
                }
            }
        }
        listing.jobs.sort_by(|a, b| a.id.cmp(&b.id));
        listing.jobs.dedup_by(|a, b| a.id == b.id);
        Ok(listing)
    }

    /// One file of this read: parsed again only when its version changed.
    fn take_in(
        &mut self,
        path: PathBuf,
        meta: &std::fs::Metadata,
        seen: &mut HashMap<PathBuf, (Version, Result<Job, String>)>,
    ) {
        let version = Version::of(meta);
        let parsed = match self.files.remove(&path) {
            Some((v, parsed)) if v == version => parsed,
            _ => {
                let parsed = self.parse_file(&path, meta);
                if let Err(why) = &parsed {
                    self.rejected_files += 1;
                    tracing::warn!(file = %path.display(), "job registry entry ignored: {why}");
                }
                parsed
            }
        };
        seen.insert(path, (version, parsed));
    }

    /// Files of the last read that were rejected, and why, sorted by path.
    pub fn rejections(&self) -> Vec<(&Path, &str)> {
        let mut r: Vec<(&Path, &str)> = self
            .files
            .iter()
            .filter_map(|(p, (_, parsed))| parsed.as_ref().err().map(|e| (p.as_path(), e.as_str())))
            .collect();
        r.sort();
        r
    }

    fn parse_file(&self, path: &Path, meta: &std::fs::Metadata) -> Result<Job, String> {
        if !meta.file_type().is_file() {
            return Err("not a regular file".into());
        }
        if let Some(why) = distrust(meta, self.owner_uid) {
            return Err(why);
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
        }
        std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| parse_job(&t))
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
        let ids: Vec<String> = r
            .read()
            .unwrap()
            .jobs
            .iter()
            .map(|j| j.id.to_string())
            .collect();
        assert_eq!(ids, ["42"]);
        assert_eq!(r.rejected_files, 3);
        // Each problem is counted once, not on every scan.
        write("46.job", &GOOD.replace("job=42", "job=46"), 0o644);
        assert_eq!(r.read().unwrap().jobs.len(), 2);
        assert_eq!(r.rejected_files, 3);

        // Files of another owner are not trusted.
        let mut other = Registry::new(dir.path().to_owned(), me + 1);
        assert!(matches!(other.read(), Err(ReadError::Untrusted(..))));
    }

    #[test]
    fn a_directory_writable_by_others_is_ignored() {
        let (dir, me) = registry_dir();
        std::fs::write(dir.path().join("42.job"), GOOD).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut r = Registry::new(dir.path().to_owned(), me);
        let err = r.read().unwrap_err();
        assert!(err.to_string().contains("mode 777"), "{err}");
    }

    #[test]
    fn missing_directory_is_its_own_error_and_removal_is_seen() {
        let (dir, me) = registry_dir();
        let mut r = Registry::new(dir.path().join("absent"), me);
        assert!(matches!(r.read(), Err(ReadError::Missing(_))));
        assert_eq!(r.rejected_files, 0);
        let mut r = Registry::new(dir.path().to_owned(), me);
        std::fs::write(dir.path().join("42.job"), GOOD).unwrap();
        assert_eq!(r.read().unwrap().jobs.len(), 1);
        std::fs::remove_file(dir.path().join("42.job")).unwrap();
        assert!(r.read().unwrap().jobs.is_empty(), "removed by hand");
    }

    #[test]
    fn every_change_is_seen_even_within_one_timestamp_tick() {
        let (dir, me) = registry_dir();
        let mut r = Registry::new(dir.path().to_owned(), me);
        let job = |id: &str| GOOD.replace("job=42", &format!("job={id}"));
        let replace = |name: &str, text: &str| {
            let tmp = dir.path().join(".tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.path().join(name)).unwrap();
        };
        replace("1.job", &job("1"));
        replace("2.job", &job("2"));
        assert_eq!(r.read().unwrap().jobs.len(), 2);
        // Two epilogs in a row; the directory's mtime may not change between them.
        let mtime = std::fs::metadata(dir.path()).unwrap().modified().unwrap();
        replace("1.job", &(job("1") + "end_ms=2000\n"));
        replace("2.job", &(job("2") + "end_ms=2000\n"));
        let f = std::fs::File::open(dir.path()).unwrap();
        f.set_modified(mtime).unwrap();
        let ends: Vec<Option<u64>> = r.read().unwrap().jobs.iter().map(|j| j.end_ms).collect();
        assert_eq!(ends, [Some(2000), Some(2000)]);
    }

    /// Epilogs replacing files while the agent lists the directory, on tmpfs as
    /// /run/nodewatt/jobs is: a listing there can leave a replaced file out, yet a job
    /// whose file is there must never look gone (that ends it, billed to `_unattributed`).
    #[test]
    fn files_replaced_during_a_read_are_never_missing() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        const JOBS: usize = 2_000;
        let job = |i: usize| GOOD.replace("job=42", &format!("job={}", 50_000 + i));
        for i in 0..JOBS {
            std::fs::write(dir.path().join(format!("{}.job", 50_000 + i)), job(i)).unwrap();
        }
        let mut r = Registry::new(dir.path().to_owned(), me);
        assert_eq!(r.read().unwrap().jobs.len(), JOBS);

        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // The epilog's way: write aside, rename over the job's file.
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..JOBS {
                        let tmp = dir.path().join(".epilog.tmp");
                        std::fs::write(&tmp, job(i) + "end_ms=2000\n").unwrap();
                        std::fs::rename(&tmp, dir.path().join(format!("{}.job", 50_000 + i)))
                            .unwrap();
                    }
                }
            });
            let mut short = Vec::new();
            for _ in 0..40 {
                match r.read() {
                    Ok(l) if l.jobs.len() == JOBS && l.rejected.is_empty() => {}
                    other => short.push(other.map(|l| (l.jobs.len(), l.rejected.len()))),
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert!(short.is_empty(), "reads with jobs missing: {short:?}");
        });
        eprintln!(
            "{} files left out by a listing were found by name",
            r.missed_by_listing
        );
    }

    #[test]
    fn an_end_before_the_start_ends_the_job_at_its_start() {
        let j = parse_job(&format!("{GOOD}end_ms=999\n")).unwrap();
        assert_eq!(
            j.end_ms,
            Some(1000),
            "a clock stepped back: ended, not rejected"
        );
        let j = parse_job(&format!("{GOOD}end_ms=1500\n")).unwrap();
        assert_eq!(j.end_ms, Some(1500));
    }

    #[test]
    fn user_names_with_a_domain_are_accepted() {
        let j = parse_job(&GOOD.replace("alice", "jane.doe@corp.example")).unwrap();
        assert_eq!(j.user, "jane.doe@corp.example");
    }
}
