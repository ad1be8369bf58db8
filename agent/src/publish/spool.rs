//! The crash-safe outbox spool: an append-only write-ahead log, on disk, of the samples
//! in the outbox, so that a SIGKILL, an OOM kill or a power loss during a broker outage
//! loses nothing measured before it. The caller appends each sample's bytes when it enters
//! the outbox, acks it on its PubAck, and when [`Spool::needs_rewrite`] says so replaces
//! the whole spool by a snapshot of the (merged) outbox with [`Spool::rewrite`].
//!
//! # Format
//!
//! The directory holds segment files `spool-<number, 10 digits>.seg`, numbered upward
//! (zero-padded so that name order is number order). A segment is a 9-byte header, the
//! magic `NWSPOOL1` then a kind byte, `L` (log) or `S` (snapshot; two values 5 bits apart
//! so that one flipped bit cannot turn a log into a snapshot that deletes older segments),
//! followed by records:
//!
//! ```text
//! len: u32 LE (payload bytes) | crc32: u32 LE over seq bytes + payload | seq: u64 LE | payload
//! ```
//!
//! The length comes first so a reader knows how much to read; a length above
//! [`MAX_RECORD_BYTES`] or past the end of the file is corruption, never an allocation. The
//! CRC catches torn and garbled writes. Records are only ever appended, so a crash can
//! damage only a segment's tail.
//!
//! # Recovery ([`Spool::open`])
//!
//! - Leftover `spool-*.seg.tmp` files (snapshots never renamed into place) are deleted.
//! - Every segment numbered below the newest snapshot is deleted unread: a snapshot is
//!   fsynced before it is renamed into place, so one that exists is complete, and it
//!   supersedes all older segments even if a crash came before they were deleted (reading
//!   them would resurrect data the snapshot had merged).
//! - The other segments are read in number order. At the first bad record (short, bad
//!   CRC, absurd length) the segment is truncated there and reading goes on with the next
//!   segment; each such truncation point counts as one corrupt record. A segment with a
//!   bad header is deleted (counted as corrupt unless it is empty).
//! - A record whose seq was already seen is dropped (the first is kept). Records come back
//!   sorted by seq, i.e. oldest first, and appends continue after the largest seq.
//! - Appends never go after an old, possibly truncated tail: the first append after
//!   `open` starts a new segment, as does one that would make the active segment exceed
//!   `segment_bytes`, and one after a failed write.
//!
//! # Acks and durability
//!
//! A segment file is deleted once all its records are acked and it is not the active
//! segment (a snapshot only once no older segment is left, else they would come back).
//! Acked records whose segment is not deleted yet (or whose deletion a power loss undid)
//! reappear after a restart and are published again: delivery is at least once, and the
//! receiver overwrites duplicates. [`Fsync::Never`] relies on the page cache, which
//! survives the death of the process but not of the machine; a snapshot rewrite always
//! fsyncs its file and the directory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// First bytes of every segment; the digit is the format version.
pub const MAGIC: &[u8; 8] = b"NWSPOOL1";
const KIND_LOG: u8 = b'L';
const KIND_SNAPSHOT: u8 = b'S';
/// Magic and kind byte.
pub const HEADER_BYTES: u64 = 9;
/// len, crc32 and seq in front of each payload.
pub const RECORD_HEADER_BYTES: u64 = 16;
/// Larger payloads are refused on append and taken for corruption when read.
pub const MAX_RECORD_BYTES: u32 = 16 << 20;

/// When appended records are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// `fdatasync` after every append.
    Always,
    /// From [`Spool::sync_if_due`], at most this often, when there were appends.
    Every(Duration),
    /// Page cache only: survives a killed agent, not a power loss.
    Never,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// A new segment is started when a record would make the active one larger.
    pub segment_bytes: u64,
    /// See [`Spool::needs_rewrite`].
    pub max_bytes: u64,
    pub fsync: Fsync,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What [`Spool::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records not acknowledged, unique seqs, oldest (lowest seq) first.
    pub records: Vec<Record>,
    /// Records acknowledged before the stop (per the ack mark) whose segment was not
    /// deleted yet: not to be sent again, returned for what they carry. Oldest first.
    pub delivered: Vec<Record>,
    /// Truncation points: one per segment cut short or deleted for a bad header.
    pub corrupt_records: u64,
    /// Bytes cut off (or deleted with a bad header).
    pub truncated_bytes: u64,
    /// Segment files deleted: superseded by a snapshot, bad header, or nothing left unacked.
    pub removed_segments: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{op} {}: {error}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{op} {}: a record of {len} bytes exceeds the limit of {MAX_RECORD_BYTES} bytes", path.display())]
    TooLarge {
        op: &'static str,
        path: PathBuf,
        len: usize,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |error| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        error,
    }
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    /// Records in it not acked yet (and not superseded by a later snapshot).
    unacked: u64,
    snapshot: bool,
}

#[derive(Debug)]
struct Active {
    number: u64,
    file: File,
    /// Appended to since its last fsync.
    dirty: bool,
}

#[derive(Debug)]
pub struct Spool {
    cfg: SpoolConfig,
    /// Every segment file on disk, by number.
    segments: BTreeMap<u64, Segment>,
    /// Unacked seq -> number of the segment holding it.
    index: HashMap<u64, u64>,
    /// Created on the first append after open, a roll, a failed write or a rewrite.
    active: Option<Active>,
    next_segment: u64,
    next_seq: u64,
    synced_at: Option<Instant>,
    /// Twice the size of the last snapshot: see [`Spool::needs_rewrite`].
    rewrite_floor: u64,
    /// Acknowledged seqs above the oldest unacknowledged one (acks arrive out of order).
    acked_above: BTreeSet<u64>,
}

/// The ack mark beside the segments: every seq below `below` and those listed are
/// acknowledged. Written (atomically, page cache) by [`Spool::ack_all`], so a start after
/// a crash does not send delivered records again; resent alone they would only be
/// duplicates, but a caller that merges records could count them twice. A missing or
/// unreadable mark means nothing is known to be acknowledged.
const ACK_MARK: &str = "acked";

fn read_ack_mark(dir: &Path) -> (u64, BTreeSet<u64>) {
    let text = fs::read_to_string(dir.join(ACK_MARK)).unwrap_or_default();
    let mut nums = text.split_ascii_whitespace().map(str::parse::<u64>);
    match nums.next() {
        Some(Ok(below)) => match nums.collect::<Result<BTreeSet<u64>, _>>() {
            Ok(above) => (below, above),
            Err(_) => (0, BTreeSet::new()),
        },
        _ => (0, BTreeSet::new()),
    }
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("spool-{number:010}.seg"))
}

fn temp_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("spool-{number:010}.seg.tmp"))
}

/// `spool-<digits>.seg` -> (number, false); `spool-<digits>.seg.tmp` -> (number, true).
fn parse_name(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix("spool-")?;
    let (digits, temp) = match rest.strip_suffix(".seg.tmp") {
        Some(d) => (d, true),
        None => (rest.strip_suffix(".seg")?, false),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, temp))
}

fn header(kind: u8) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0; HEADER_BYTES as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8] = kind;
    h
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The caller checked `payload.len() <= MAX_RECORD_BYTES`.
fn encode_record(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc(seq, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
}

fn record_bytes(payload: &[u8]) -> u64 {
    RECORD_HEADER_BYTES + payload.len() as u64
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

fn remove(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

/// The segment's kind (`Some(snapshot?)`, `None` for a bad or short header) and length.
fn read_kind(path: &Path) -> Result<(Option<bool>, u64), SpoolError> {
    let mut file = File::open(path).map_err(io_err("reading", path))?;
    let len = file.metadata().map_err(io_err("reading", path))?.len();
    let mut h = [0; HEADER_BYTES as usize];
    if len < HEADER_BYTES {
        return Ok((None, len));
    }
    match file.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok((None, len)),
        Err(e) => return Err(io_err("reading", path)(e)),
    }
    let kind = match (&h[..8] == MAGIC, h[8]) {
        (true, KIND_LOG) => Some(false),
        (true, KIND_SNAPSHOT) => Some(true),
        _ => None,
    };
    Ok((kind, len))
}

/// The valid records of a segment whose header is good, and where they end.
struct Scan {
    records: Vec<(u64, Vec<u8>)>,
    end: u64,
    len: u64,
}

/// One record at `pos`, `None` if it is not whole and intact (I/O errors are errors).
fn read_record(r: &mut impl Read, pos: u64, len: u64) -> io::Result<Option<(u64, Vec<u8>)>> {
    if len.saturating_sub(pos) < RECORD_HEADER_BYTES {
        return Ok(None);
    }
    let mut h = [0u8; RECORD_HEADER_BYTES as usize];
    r.read_exact(&mut h)?;
    let [l0, l1, l2, l3, c0, c1, c2, c3, s0, s1, s2, s3, s4, s5, s6, s7] = h;
    let plen = u32::from_le_bytes([l0, l1, l2, l3]);
    let want = u32::from_le_bytes([c0, c1, c2, c3]);
    let seq = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    if plen > MAX_RECORD_BYTES || u64::from(plen) > len - pos - RECORD_HEADER_BYTES {
        return Ok(None);
    }
    let mut payload = vec![0; plen as usize];
    r.read_exact(&mut payload)?;
    Ok((crc(seq, &payload) == want).then_some((seq, payload)))
}

fn scan(path: &Path) -> Result<Scan, SpoolError> {
    let file = File::open(path).map_err(io_err("reading", path))?;
    let len = file.metadata().map_err(io_err("reading", path))?.len();
    let mut r = BufReader::new(file);
    let mut records = Vec::new();
    let mut end = HEADER_BYTES;
    let mut h = [0u8; HEADER_BYTES as usize];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        // The file shrank since its header was checked: nothing in it is valid.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => end = len,
        Err(e) => return Err(io_err("reading", path)(e)),
    }
    while end < len {
        match read_record(&mut r, end, len) {
            Ok(Some((seq, payload))) => {
                end += record_bytes(&payload);
                records.push((seq, payload));
            }
            Ok(None) => break,
            // The file shrank under us: what is left is a torn tail.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io_err("reading", path)(e)),
        }
    }
    Ok(Scan { records, end, len })
}

impl Spool {
    /// Creates the directory if needed (mode 0700) and recovers what an earlier run left
    /// (see the module documentation).
    pub fn open(cfg: SpoolConfig) -> Result<(Spool, Recovered), SpoolError> {
        let dir = cfg.dir.clone();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating directory", &dir))?;
        let mut rec = Recovered::default();
        let mut numbers = Vec::new();
        let mut next_segment = 0u64;
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name();
            let Some((number, temp)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            next_segment = next_segment.max(number.saturating_add(1));
            if temp {
                remove(&entry.path())?;
            } else {
                numbers.push(number);
            }
        }
        numbers.sort_unstable();

        let mut kinds = Vec::with_capacity(numbers.len());
        for &n in &numbers {
            kinds.push((n, read_kind(&segment_path(&dir, n))?));
        }
        let newest_snapshot = kinds
            .iter()
            .filter(|(_, (kind, _))| *kind == Some(true))
            .map(|(n, _)| *n)
            .max();

        let (below, acked_above) = read_ack_mark(&dir);
        let mut segments = BTreeMap::new();
        let mut index = HashMap::new();
        let mut records = Vec::new();
        let mut next_seq = 0u64;
        for (n, (kind, len)) in kinds {
            let path = segment_path(&dir, n);
            if newest_snapshot.is_some_and(|s| n < s) {
                remove(&path)?;
                rec.removed_segments += 1;
                continue;
            }
            let Some(snapshot) = kind else {
                if len > 0 {
                    rec.corrupt_records += 1;
                    rec.truncated_bytes += len;
                }
                remove(&path)?;
                rec.removed_segments += 1;
                continue;
            };
            let scan = scan(&path)?;
            if scan.end < scan.len {
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(scan.end))
                    .map_err(io_err("truncating", &path))?;
                rec.corrupt_records += 1;
                rec.truncated_bytes += scan.len - scan.end;
            }
            let mut unacked = 0;
            for (seq, payload) in scan.records {
                next_seq = next_seq.max(seq.saturating_add(1));
                if index.contains_key(&seq) {
                    continue;
                }
                if seq < below || acked_above.contains(&seq) {
                    rec.delivered.push(Record { seq, payload });
                    continue;
                }
                index.insert(seq, n);
                unacked += 1;
                records.push(Record { seq, payload });
            }
            segments.insert(
                n,
                Segment {
                    path,
                    bytes: scan.end,
                    unacked,
                    snapshot,
                },
            );
        }
        records.sort_by_key(|r| r.seq);
        rec.records = records;
        rec.delivered.sort_by_key(|r| r.seq);
        rec.delivered.dedup_by_key(|r| r.seq);

        let mut spool = Spool {
            cfg,
            segments,
            index,
            active: None,
            next_segment,
            next_seq,
            synced_at: None,
            rewrite_floor: 0,
            acked_above,
        };
        rec.removed_segments += spool.reap()?;
        Ok((spool, rec))
    }

    /// Appends one record and returns its seq, which is larger than any recovered or
    /// appended before. On an error the record is not in the spool.
    pub fn append(&mut self, payload: &[u8], now: Instant) -> Result<u64, SpoolError> {
        if payload.len() > MAX_RECORD_BYTES as usize {
            return Err(SpoolError::TooLarge {
                op: "appending to",
                path: self.cfg.dir.clone(),
                len: payload.len(),
            });
        }
        let size = record_bytes(payload);
        let mut rolled = false;
        if let Some(a) = &self.active {
            let used = self.segments.get(&a.number).map_or(0, |s| s.bytes);
            if used > HEADER_BYTES && used.saturating_add(size) > self.cfg.segment_bytes {
                self.seal()?;
                rolled = true;
            }
        }
        if self.active.is_none() {
            self.start_segment()?;
        }
        let Some(active) = self.active.as_mut() else {
            unreachable!("start_segment sets the active segment");
        };
        let Some(seg) = self.segments.get_mut(&active.number) else {
            unreachable!("the active segment is in the segment map");
        };
        let seq = self.next_seq;
        let mut buf = Vec::with_capacity(size as usize);
        encode_record(&mut buf, seq, payload);
        let written = active
            .file
            .write_all(&buf)
            .map_err(io_err("appending to", &seg.path));
        let synced = written.and_then(|()| match self.cfg.fsync {
            Fsync::Always => active
                .file
                .sync_data()
                .map_err(io_err("syncing", &seg.path)),
            _ => Ok(()),
        });
        if let Err(e) = synced {
            // Cut off what was written, and append to a fresh segment next time so that no
            // later record sits behind a torn one.
            if active.file.set_len(seg.bytes).is_err() {
                if let Ok(m) = active.file.metadata() {
                    seg.bytes = m.len();
                }
            }
            self.active = None;
            return Err(e);
        }
        seg.bytes += size;
        seg.unacked += 1;
        active.dirty = self.cfg.fsync != Fsync::Always;
        self.index.insert(seq, active.number);
        self.next_seq = seq.saturating_add(1);
        if rolled {
            // The sealed segment may be fully acked already; failing to delete it now
            // loses nothing, a later ack tries again.
            if let Err(e) = self.reap() {
                tracing::warn!("spool: {e}");
            }
        }
        if self.synced_at.is_none() {
            // For `Fsync::Every`: the first sync is due an interval after the first append.
            self.synced_at = Some(now);
        }
        Ok(seq)
    }

    /// The broker acknowledged the record with this seq (unknown seqs are ignored).
    /// Deletes the segment files that hold no unacked record any more.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        let Some(n) = self.index.remove(&seq) else {
            return Ok(());
        };
        if let Some(seg) = self.segments.get_mut(&n) {
            seg.unacked = seg.unacked.saturating_sub(1);
            if seg.unacked == 0 {
                self.reap()?;
            }
        }
        Ok(())
    }

    /// [`Spool::ack`] for each, then the ack mark is written once.
    pub fn ack_all(&mut self, seqs: impl IntoIterator<Item = u64>) -> Result<(), SpoolError> {
        for seq in seqs {
            self.ack(seq)?;
            self.acked_above.insert(seq);
        }
        let below = self.index.keys().min().copied().unwrap_or(self.next_seq);
        self.acked_above = self.acked_above.split_off(&below);
        let mut text = below.to_string();
        for seq in &self.acked_above {
            text.push(' ');
            text.push_str(&seq.to_string());
        }
        let path = self.cfg.dir.join(ACK_MARK);
        nodewatt_common::write_atomic(&path, text.as_bytes(), false)
            .map_err(io_err("writing the ack mark", &path))
    }

    /// Bytes on disk of the spool's segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Whether the caller should [`rewrite`](Spool::rewrite) the spool: it is larger than
    /// `max_bytes` and than twice the last snapshot (so that an outbox larger than
    /// `max_bytes` is not rewritten on every append).
    pub fn needs_rewrite(&self) -> bool {
        self.bytes() > self.cfg.max_bytes.max(self.rewrite_floor)
    }

    /// Replaces the whole spool by a snapshot of these records (the caller's merged
    /// outbox; a repeated seq is written once): written to a temporary file, fsynced,
    /// renamed into place as a new snapshot segment, the directory fsynced, then all older
    /// segments deleted. On an error before the rename the spool is unchanged. Later
    /// appends go to a new segment and get seqs above all of these.
    pub fn rewrite<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), SpoolError> {
        let dir = self.cfg.dir.clone();
        let number = self.next_segment;
        self.next_segment = self.next_segment.saturating_add(1);
        let temp = temp_path(&dir, number);
        let path = segment_path(&dir, number);
        let written = match write_snapshot(&temp, records) {
            Ok(w) => w,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&temp, &path) {
            let _ = fs::remove_file(&temp);
            return Err(io_err("renaming", &temp)(e));
        }
        // From here the snapshot supersedes every older segment, on disk as in memory.
        self.active = None;
        for seg in self.segments.values_mut() {
            seg.unacked = 0;
        }
        self.index.clear();
        for &seq in &written.seqs {
            self.index.insert(seq, number);
            self.next_seq = self.next_seq.max(seq.saturating_add(1));
        }
        self.segments.insert(
            number,
            Segment {
                path,
                bytes: written.bytes,
                unacked: written.seqs.len() as u64,
                snapshot: true,
            },
        );
        self.rewrite_floor = written.bytes.saturating_mul(2);
        sync_dir(&dir)?;
        self.reap()?;
        sync_dir(&dir)
    }

    /// For [`Fsync::Every`]: fsyncs the active segment if there were appends and the
    /// interval has passed since the last sync (or the first append). Call it from the
    /// publishing loop.
    pub fn sync_if_due(&mut self, now: Instant) -> Result<(), SpoolError> {
        let Fsync::Every(interval) = self.cfg.fsync else {
            return Ok(());
        };
        let due = self
            .synced_at
            .is_none_or(|t| now.saturating_duration_since(t) >= interval);
        if let Some(a) = self.active.as_mut().filter(|a| a.dirty && due) {
            let path = segment_path(&self.cfg.dir, a.number);
            a.file.sync_data().map_err(io_err("syncing", &path))?;
            a.dirty = false;
            self.synced_at = Some(now);
        }
        Ok(())
    }

    /// Ends the active segment, fsyncing what was appended to it unless `Fsync::Never`.
    fn seal(&mut self) -> Result<(), SpoolError> {
        if let Some(a) = self.active.take() {
            if a.dirty && self.cfg.fsync != Fsync::Never {
                let path = segment_path(&self.cfg.dir, a.number);
                a.file.sync_data().map_err(io_err("syncing", &path))?;
            }
        }
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), SpoolError> {
        let number = self.next_segment;
        // Never reused, even if this fails.
        self.next_segment = self.next_segment.saturating_add(1);
        let path = segment_path(&self.cfg.dir, number);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("creating", &path))?;
        if let Err(e) = file.write_all(&header(KIND_LOG)) {
            let _ = fs::remove_file(&path);
            return Err(io_err("writing the header of", &path)(e));
        }
        self.segments.insert(
            number,
            Segment {
                path,
                bytes: HEADER_BYTES,
                unacked: 0,
                snapshot: false,
            },
        );
        self.active = Some(Active {
            number,
            file,
            dirty: true,
        });
        if self.cfg.fsync != Fsync::Never {
            // Syncing the file's data does not make its directory entry durable.
            sync_dir(&self.cfg.dir)?;
        }
        Ok(())
    }

    /// Deletes the non-active segments without unacked records, oldest first; a snapshot
    /// only once no older segment is left. Returns how many were deleted.
    fn reap(&mut self) -> Result<u64, SpoolError> {
        let active = self.active.as_ref().map(|a| a.number);
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|(n, s)| s.unacked == 0 && Some(**n) != active)
            .map(|(n, _)| *n)
            .collect();
        let mut removed = 0;
        for n in done {
            let oldest = self.segments.keys().next() == Some(&n);
            let Some(seg) = self.segments.get(&n) else {
                continue;
            };
            if seg.snapshot && !oldest {
                continue;
            }
            remove(&seg.path)?;
            self.segments.remove(&n);
            removed += 1;
        }
        Ok(removed)
    }
}

struct Snapshot {
    seqs: Vec<u64>,
    bytes: u64,
}

fn write_snapshot<'a>(
    temp: &Path,
    records: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Result<Snapshot, SpoolError> {
    let file = File::create(temp).map_err(io_err("creating", temp))?;
    let mut w = BufWriter::new(file);
    let write = io_err("writing", temp);
    let mut seen = HashSet::new();
    let mut seqs = Vec::new();
    let mut bytes = HEADER_BYTES;
    let mut buf = Vec::new();
    buf.extend_from_slice(&header(KIND_SNAPSHOT));
    for (seq, payload) in records {
        if payload.len() > MAX_RECORD_BYTES as usize {
            return Err(SpoolError::TooLarge {
                op: "writing the snapshot",
                path: temp.to_path_buf(),
                len: payload.len(),
            });
        }
        if !seen.insert(seq) {
            continue;
        }
        encode_record(&mut buf, seq, payload);
        if let Err(e) = w.write_all(&buf) {
            return Err(write(e));
        }
        buf.clear();
        bytes += record_bytes(payload);
        seqs.push(seq);
    }
    if let Err(e) = w.write_all(&buf) {
        return Err(write(e));
    }
    let file = match w.into_inner() {
        Ok(f) => f,
        Err(e) => return Err(write(e.into_error())),
    };
    file.sync_all().map_err(io_err("syncing", temp))?;
    Ok(Snapshot { seqs, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(dir: &Path, segment_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            segment_bytes,
            max_bytes: 1 << 20,
            fsync: Fsync::Never,
        }
    }

    fn open(dir: &Path, segment_bytes: u64) -> (Spool, Recovered) {
        Spool::open(config(dir, segment_bytes)).unwrap()
    }

    /// Every payload is 15 bytes, so every record is `R` bytes.
    fn payload(i: u64) -> Vec<u8> {
        format!("{{\"sample\":{i:04}}}").into_bytes()
    }
    const R: u64 = RECORD_HEADER_BYTES + 15;

    fn append(spool: &mut Spool, i: u64) -> u64 {
        spool.append(&payload(i), Instant::now()).unwrap()
    }

    fn segs(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_str().unwrap();
                parse_name(name).is_some_and(|(_, temp)| !temp)
            })
            .collect();
        v.sort();
        v
    }

    fn disk_bytes(dir: &Path) -> u64 {
        segs(dir)
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum()
    }

    fn seqs(rec: &Recovered) -> Vec<u64> {
        rec.records.iter().map(|r| r.seq).collect()
    }

    fn file_len(p: &Path) -> u64 {
        fs::metadata(p).unwrap().len()
    }

    /// (seq, start, end) of each record of an intact segment, parsed independently.
    fn layout(bytes: &[u8]) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let mut pos = HEADER_BYTES as usize;
        while pos < bytes.len() {
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            let seq = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().unwrap());
            let end = pos + 16 + len;
            assert!(end <= bytes.len(), "intact segment");
            out.push((seq, pos as u64, end as u64));
            pos = end;
        }
        out
    }

    fn segment_bytes_of(kind: u8, records: &[(u64, &[u8])]) -> Vec<u8> {
        let mut buf = header(kind).to_vec();
        for (seq, p) in records {
            encode_record(&mut buf, *seq, p);
        }
        buf
    }

    #[test]
    fn acknowledged_records_do_not_come_back_as_unacknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path(), 1 << 20);
        for i in 0..5 {
            append(&mut s, i);
        }
        // Out of order, as PubAcks come: 0, 1 and 3.
        s.ack_all([0, 3]).unwrap();
        s.ack_all([1]).unwrap();
        drop(s); // a crash: the active segment still holds all five
        let (mut s, rec) = open(dir.path(), 1 << 20);
        let seqs = |r: &[Record]| r.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&rec.records), [2, 4]);
        assert_eq!(seqs(&rec.delivered), [0, 1, 3]);
        assert_eq!(
            append(&mut s, 5),
            5,
            "seqs continue past delivered ones too"
        );
        // A damaged mark: nothing is known to be acknowledged, all come back.
        std::fs::write(dir.path().join(ACK_MARK), "x y").unwrap();
        drop(s);
        let (_, rec) = open(dir.path(), 1 << 20);
        assert_eq!(seqs(&rec.records), [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn reopen_returns_records_in_order_and_seqs_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, rec) = open(dir.path(), 1 << 20);
        assert_eq!(rec, Recovered::default());
        assert_eq!(
            (append(&mut s, 0), append(&mut s, 1), append(&mut s, 2)),
            (0, 1, 2)
        );
        drop(s);

        let (mut s, rec) = open(dir.path(), 1 << 20);
        let want: Vec<Record> = (0..3)
            .map(|i| Record {
                seq: i,
                payload: payload(i),
            })
            .collect();
        assert_eq!(rec.records, want);
        assert_eq!(
            (
                rec.corrupt_records,
                rec.truncated_bytes,
                rec.removed_segments
            ),
            (0, 0, 0)
        );
        assert_eq!(append(&mut s, 3), 3);
        assert_eq!(segs(dir.path()).len(), 2, "no append after an old tail");
        drop(s);

        let (_, rec) = open(dir.path(), 1 << 20);
        assert_eq!(seqs(&rec), vec![0, 1, 2, 3]);
        assert_eq!(rec.records[3].payload, payload(3));
    }

    #[test]
    fn fully_acked_segment_is_deleted_but_not_the_active_one() {
        let dir = tempfile::tempdir().unwrap();
        // Two records per segment.
        let (mut s, _) = open(dir.path(), HEADER_BYTES + 2 * R);
        for i in 0..5 {
            assert_eq!(append(&mut s, i), i);
        }
        let files = segs(dir.path());
        assert_eq!(files.len(), 3);
        s.ack(0).unwrap();
        assert_eq!(segs(dir.path()), files);
        s.ack(1).unwrap();
        assert_eq!(segs(dir.path()), files[1..]);
        s.ack(1).unwrap(); // a repeated ack is harmless
        s.ack(999).unwrap(); // so is an unknown seq
        s.ack(4).unwrap();
        assert_eq!(segs(dir.path()), files[1..], "the active segment stays");
        s.ack(3).unwrap();
        s.ack(2).unwrap();
        assert_eq!(segs(dir.path()), files[2..]);
        assert_eq!(s.bytes(), disk_bytes(dir.path()));
        drop(s);

        // The acked record in the undeleted segment is delivered again (at least once).
        let (mut s, rec) = open(dir.path(), HEADER_BYTES + 2 * R);
        assert_eq!(seqs(&rec), vec![4]);

        // Not active after a reopen: deleted on its ack.
        s.ack(4).unwrap();
        assert!(segs(dir.path()).is_empty());
        // Acked while active: deleted as soon as the next append rolls past it.
        append(&mut s, 5);
        append(&mut s, 6);
        let active = segs(dir.path());
        s.ack(5).unwrap();
        s.ack(6).unwrap();
        assert_eq!(segs(dir.path()), active);
        append(&mut s, 7);
        let left = segs(dir.path());
        assert_eq!(left.len(), 1);
        assert!(!left.contains(&active[0]));
        assert_eq!(s.bytes(), HEADER_BYTES + R);
    }

    #[test]
    fn torn_tail_loses_only_the_torn_record() {
        let template = tempfile::tempdir().unwrap();
        let (mut s, _) = open(template.path(), 1 << 20);
        for i in 0..5 {
            append(&mut s, i);
        }
        drop(s);
        let [file] = &segs(template.path())[..] else {
            panic!("one segment")
        };
        let name = file.file_name().unwrap().to_owned();
        let bytes = fs::read(file).unwrap();
        let start = HEADER_BYTES + 4 * R;
        assert_eq!(bytes.len() as u64, start + R);

        for cut in start..start + R {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(&name);
            fs::write(&path, &bytes[..cut as usize]).unwrap();
            let (mut s, rec) = open(dir.path(), 1 << 20);
            assert_eq!(seqs(&rec), vec![0, 1, 2, 3], "cut at {cut}");
            assert_eq!(rec.records[3].payload, payload(3));
            assert_eq!(rec.corrupt_records, u64::from(cut > start), "cut at {cut}");
            assert_eq!(rec.truncated_bytes, cut - start);
            assert_eq!(file_len(&path), start, "truncated to the end of record 4");

            assert_eq!(append(&mut s, 100), 4);
            drop(s);
            let (_, rec) = open(dir.path(), 1 << 20);
            assert_eq!(seqs(&rec), vec![0, 1, 2, 3, 4]);
            assert_eq!(rec.records[4].payload, payload(100));
            assert_eq!((rec.corrupt_records, rec.truncated_bytes), (0, 0));
        }
    }

    #[test]
    fn flipped_byte_truncates_its_segment_and_later_segments_survive() {
        let dir = tempfile::tempdir().unwrap();
        // Three records per segment.
        let (mut s, _) = open(dir.path(), HEADER_BYTES + 3 * R);
        for i in 0..9 {
            append(&mut s, i);
        }
        drop(s);
        let files = segs(dir.path());
        assert_eq!(files.len(), 3);
        let mut bytes = fs::read(&files[0]).unwrap();
        let at = (HEADER_BYTES + R + RECORD_HEADER_BYTES + 3) as usize; // record 1's payload
        bytes[at] ^= 0x01;
        fs::write(&files[0], &bytes).unwrap();

        let (s, rec) = open(dir.path(), HEADER_BYTES + 3 * R);
        assert_eq!(seqs(&rec), vec![0, 3, 4, 5, 6, 7, 8]);
        assert_eq!(rec.corrupt_records, 1);
        assert_eq!(rec.truncated_bytes, 2 * R);
        assert_eq!(file_len(&files[0]), HEADER_BYTES + R);
        assert_eq!(s.bytes(), disk_bytes(dir.path()));
    }

    #[test]
    fn snapshot_replaces_everything_even_after_a_crash_before_the_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let seg = HEADER_BYTES + 3 * R;
        let (mut s, _) = open(dir.path(), seg);
        for i in 0..10 {
            append(&mut s, i);
        }
        let old: Vec<(PathBuf, Vec<u8>)> = segs(dir.path())
            .into_iter()
            .map(|p| {
                let b = fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        assert_eq!(old.len(), 4);

        let merged: [(u64, &[u8]); 2] = [(3, b"merged 0..=3"), (9, b"merged 4..=9")];
        s.rewrite(merged).unwrap();
        let files = segs(dir.path());
        assert_eq!(files.len(), 1, "older segments deleted");
        assert!(files[0] > old[3].0, "numbered after them");
        assert_eq!(s.bytes(), HEADER_BYTES + 2 * RECORD_HEADER_BYTES + 24);
        assert_eq!(append(&mut s, 10), 10);
        drop(s);

        let want = vec![
            Record {
                seq: 3,
                payload: b"merged 0..=3".to_vec(),
            },
            Record {
                seq: 9,
                payload: b"merged 4..=9".to_vec(),
            },
            Record {
                seq: 10,
                payload: payload(10),
            },
        ];
        let (s, rec) = open(dir.path(), seg);
        assert_eq!(rec.records, want);
        drop(s);

        // A crash after the rename, before the old segments were deleted; and a
        // temporary file of a later rewrite that never got renamed.
        for (p, b) in &old {
            fs::write(p, b).unwrap();
        }
        let temp = dir.path().join("spool-0000000099.seg.tmp");
        fs::write(&temp, segment_bytes_of(KIND_SNAPSHOT, &[(1, b"stale")])).unwrap();
        let (mut s, rec) = open(dir.path(), seg);
        assert_eq!(rec.records, want);
        assert_eq!(rec.removed_segments, 4);
        assert_eq!(rec.corrupt_records, 0);
        assert!(!temp.exists());
        assert_eq!(append(&mut s, 11), 11);
        assert!(segs(dir.path()).last().unwrap() > &temp.with_extension(""));
        assert_eq!(s.bytes(), disk_bytes(dir.path()));
    }

    #[test]
    fn unrenamed_snapshot_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path(), 1 << 20);
        for i in 0..3 {
            append(&mut s, i);
        }
        drop(s);
        let temp = dir.path().join("spool-0000000001.seg.tmp");
        fs::write(&temp, segment_bytes_of(KIND_SNAPSHOT, &[(2, b"merged")])).unwrap();
        let (_, rec) = open(dir.path(), 1 << 20);
        assert_eq!(seqs(&rec), vec![0, 1, 2]);
        assert_eq!(rec.records[2].payload, payload(2));
        assert!(!temp.exists());
    }

    #[test]
    fn acked_snapshot_is_deleted_and_an_empty_rewrite_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path(), 1 << 20);
        for i in 0..4 {
            append(&mut s, i);
        }
        let (p1, p2) = (payload(1), payload(2));
        s.rewrite([(1, &p1[..]), (2, &p2[..]), (1, &p1[..])])
            .unwrap();
        assert_eq!(
            s.bytes(),
            HEADER_BYTES + 2 * R,
            "a repeated seq is written once"
        );
        s.ack(2).unwrap();
        s.ack(1).unwrap();
        assert!(segs(dir.path()).is_empty());
        assert_eq!(s.bytes(), 0);
        assert_eq!(append(&mut s, 4), 4);
        s.rewrite(std::iter::empty()).unwrap();
        assert!(segs(dir.path()).is_empty());
        assert_eq!(append(&mut s, 5), 5, "seqs go on after a rewrite");
        drop(s);
        let (_, rec) = open(dir.path(), 1 << 20);
        assert_eq!(seqs(&rec), vec![5]);
    }

    #[test]
    fn garbage_segments_are_counted_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let w = |n: u64, b: &[u8]| fs::write(segment_path(d, n), b).unwrap();
        w(0, &segment_bytes_of(KIND_LOG, &[(0, b"a"), (1, b"b")]));
        w(1, b"");
        w(2, b"GARBAGE!GARBAGE!");
        let mut huge = header(KIND_LOG).to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 16]);
        w(3, &huge);
        let mut past_end = segment_bytes_of(KIND_LOG, &[(2, b"c")]);
        past_end.extend_from_slice(&100u32.to_le_bytes());
        past_end.extend_from_slice(&[7; 22]);
        w(4, &past_end);
        w(5, b"NWSPO");
        let mut bad_kind = segment_bytes_of(KIND_LOG, &[(9, b"x")]);
        bad_kind[8] = b'X';
        w(6, &bad_kind);
        w(7, &segment_bytes_of(KIND_LOG, &[(3, b"d"), (1, b"dup")]));
        fs::write(d.join("notes.txt"), b"not ours").unwrap();
        fs::write(d.join("spool-x1.seg"), b"not ours either").unwrap();

        let (mut s, rec) = open(d, 1 << 20);
        assert_eq!(seqs(&rec), vec![0, 1, 2, 3]);
        assert_eq!(
            rec.records[1].payload, b"b",
            "the first of a repeated seq wins"
        );
        // Wrong magic, huge length, length past the end, torn header, bad kind.
        assert_eq!(rec.corrupt_records, 5);
        assert_eq!(
            rec.truncated_bytes,
            16 + 20 + 26 + 5 + bad_kind.len() as u64
        );
        // Bad headers (1, 2, 5, 6) and nothing left in 3.
        assert_eq!(rec.removed_segments, 5);
        let names: Vec<PathBuf> = [0, 4, 7].iter().map(|&n| segment_path(d, n)).collect();
        assert_eq!(segs(d), names);
        assert!(d.join("notes.txt").exists() && d.join("spool-x1.seg").exists());
        assert_eq!(s.bytes(), disk_bytes(d));
        assert_eq!(append(&mut s, 0), 4);
        assert_eq!(segs(d).last().unwrap(), &segment_path(d, 8));
    }

    #[test]
    fn largest_segment_number_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let last = dir.path().join(format!("spool-{}.seg", u64::MAX));
        fs::write(&last, segment_bytes_of(KIND_LOG, &[(7, b"x")])).unwrap();
        let (mut s, rec) = open(dir.path(), 1 << 20);
        assert_eq!(seqs(&rec), vec![7]);
        let e = s.append(b"y", Instant::now()).unwrap_err();
        assert!(e.to_string().starts_with("creating "), "{e}");
        s.ack(7).unwrap();
        assert!(!last.exists());
    }

    #[test]
    fn bytes_shrink_after_acks_and_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), HEADER_BYTES + 2 * R);
        cfg.max_bytes = 3 * (HEADER_BYTES + 2 * R) - 1;
        let (mut s, _) = Spool::open(cfg).unwrap();
        assert_eq!(s.bytes(), 0);
        for i in 0..6 {
            append(&mut s, i);
        }
        let full = s.bytes();
        assert_eq!(full, 3 * (HEADER_BYTES + 2 * R));
        assert_eq!(full, disk_bytes(dir.path()));
        assert!(s.needs_rewrite());
        s.ack(0).unwrap();
        assert_eq!(s.bytes(), full);
        s.ack(1).unwrap();
        assert_eq!(s.bytes(), full - (HEADER_BYTES + 2 * R));
        assert!(!s.needs_rewrite());
        let p = payload(5);
        s.rewrite([(5, &p[..])]).unwrap();
        assert_eq!(s.bytes(), HEADER_BYTES + R);
        assert_eq!(s.bytes(), disk_bytes(dir.path()));
    }

    #[test]
    fn errors_name_the_operation_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = open(dir.path(), 1 << 20);
        let big = vec![0; MAX_RECORD_BYTES as usize + 1];
        let e = s.append(&big, Instant::now()).unwrap_err();
        assert!(matches!(e, SpoolError::TooLarge { .. }));
        assert!(e.to_string().contains(&dir.path().display().to_string()));
        assert_eq!(s.bytes(), 0);
        let e = s.rewrite([(1, &big[..])]).unwrap_err();
        assert!(e.to_string().starts_with("writing the snapshot "), "{e}");
        assert!(
            fs::read_dir(dir.path()).unwrap().next().is_none(),
            "no temp left"
        );

        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let e = Spool::open(config(&file.join("spool"), 1 << 20)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "creating directory {}: ",
                file.join("spool").display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn directory_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/spool");
        open(&sub, 1 << 20);
        assert_eq!(
            fs::metadata(&sub).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn every_fsync_mode_keeps_the_records() {
        for fsync in [
            Fsync::Always,
            Fsync::Every(Duration::ZERO),
            Fsync::Every(Duration::from_secs(3600)),
            Fsync::Never,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(dir.path(), HEADER_BYTES + 2 * R);
            cfg.fsync = fsync;
            let (mut s, _) = Spool::open(cfg.clone()).unwrap();
            let t0 = Instant::now();
            for i in 0..5 {
                s.append(&payload(i), t0).unwrap();
                s.sync_if_due(t0 + Duration::from_millis(i)).unwrap();
            }
            drop(s);
            let (_, rec) = Spool::open(cfg).unwrap();
            assert_eq!(seqs(&rec), vec![0, 1, 2, 3, 4], "{fsync:?}");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<u8>),
        Ack(usize),
        /// Merges each unacked record whose flag is set into the next one.
        Rewrite(Vec<bool>),
        Reopen,
        /// Kill, cut the newest segment file at this offset (modulo its length + 1), reopen.
        Cut(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Op::Append),
            4 => any::<usize>().prop_map(Op::Ack),
            1 => proptest::collection::vec(any::<bool>(), 0..40).prop_map(Op::Rewrite),
            1 => Just(Op::Reopen),
            1 => any::<u64>().prop_map(Op::Cut),
        ]
    }

    type Model = BTreeMap<u64, Vec<u8>>;

    /// Recovered records: unique and in seq order, all ever written, and all unacked ones
    /// except those `lost`, none of which may come back.
    fn check_recovered(
        rec: &Recovered,
        unacked: &Model,
        ever: &HashSet<(u64, Vec<u8>)>,
        lost: &HashSet<u64>,
    ) -> Result<Model, TestCaseError> {
        prop_assert!(rec.records.windows(2).all(|w| w[0].seq < w[1].seq));
        let got: Model = rec
            .records
            .iter()
            .map(|r| (r.seq, r.payload.clone()))
            .collect();
        for (seq, p) in &got {
            prop_assert!(ever.contains(&(*seq, p.clone())), "seq {seq} never written");
            prop_assert!(!lost.contains(seq), "seq {seq} was cut off");
        }
        for (seq, p) in unacked {
            if !lost.contains(seq) {
                prop_assert_eq!(got.get(seq), Some(p), "unacked seq {} lost", seq);
            }
        }
        Ok(got)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn spool_keeps_every_unacked_record(
            segment_bytes in 40u64..300,
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let mut spool = open(d, segment_bytes).0;
            let mut unacked = Model::new();
            let mut ever = HashSet::new();
            let mut last: Option<u64> = None;
            for op in ops {
                match op {
                    Op::Append(p) => {
                        let seq = spool.append(&p, Instant::now()).unwrap();
                        prop_assert!(last.is_none_or(|l| seq > l));
                        prop_assert!(unacked.keys().all(|&k| k < seq));
                        last = Some(seq);
                        unacked.insert(seq, p.clone());
                        ever.insert((seq, p));
                    }
                    Op::Ack(i) => {
                        if let Some(&seq) = unacked.keys().nth(i % unacked.len().max(1)) {
                            spool.ack(seq).unwrap();
                            unacked.remove(&seq);
                        }
                    }
                    Op::Rewrite(mask) => {
                        let n = unacked.len();
                        let mut merged = Model::new();
                        let mut carry = Vec::new();
                        for (i, (seq, p)) in std::mem::take(&mut unacked).into_iter().enumerate() {
                            carry.extend(p);
                            if !(mask.get(i).copied().unwrap_or(false) && i + 1 < n) {
                                merged.insert(seq, std::mem::take(&mut carry));
                            }
                        }
                        spool.rewrite(merged.iter().map(|(s, p)| (*s, &p[..]))).unwrap();
                        for (s, p) in &merged {
                            last = last.max(Some(*s));
                            ever.insert((*s, p.clone()));
                        }
                        unacked = merged;
                    }
                    Op::Reopen => {
                        drop(spool);
                        let (s, rec) = open(d, segment_bytes);
                        spool = s;
                        prop_assert_eq!((rec.corrupt_records, rec.truncated_bytes), (0, 0));
                        unacked = check_recovered(&rec, &unacked, &ever, &HashSet::new())?;
                        last = unacked.keys().next_back().copied();
                    }
                    Op::Cut(at) => {
                        drop(spool);
                        let mut lost = HashSet::new();
                        let mut want = (0, 0);
                        if let Some(newest) = segs(d).pop() {
                            let bytes = fs::read(&newest).unwrap();
                            let cut = at % (bytes.len() as u64 + 1);
                            let records = layout(&bytes);
                            let mut kept_to = HEADER_BYTES;
                            for (seq, _, end) in records {
                                if end <= cut {
                                    kept_to = end;
                                } else {
                                    lost.insert(seq);
                                }
                            }
                            want = if cut == 0 {
                                (0, 0)
                            } else if cut < HEADER_BYTES {
                                (1, cut)
                            } else if cut == kept_to {
                                (0, 0)
                            } else {
                                (1, cut - kept_to)
                            };
                            OpenOptions::new().write(true).open(&newest).unwrap().set_len(cut).unwrap();
                        }
                        let (s, rec) = open(d, segment_bytes);
                        spool = s;
                        prop_assert_eq!((rec.corrupt_records, rec.truncated_bytes), want);
                        unacked = check_recovered(&rec, &unacked, &ever, &lost)?;
                        last = unacked.keys().next_back().copied();
                    }
                }
                prop_assert_eq!(spool.bytes(), disk_bytes(d));
                let no_temp = fs::read_dir(d)
                    .unwrap()
                    .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
                prop_assert!(no_temp);
            }
        }
    }
}
