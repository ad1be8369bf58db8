//! Billing at scale: NODES nodes × DAYS days of synthetic `usage` points at a 60 s cadence
//! and their `job_total` points, written straight to a private influxd (gzip line
//! protocol on `/write`), then the real `nodewatt-collector usage --by project|user|job`
//! over the whole period, timed, and checked to the microjoule against the totals the
//! generator kept. Release binaries:
//!
//!     cargo build --release -p nodewatt-collector --bins
//!     cargo run --release -p nodewatt-tests --example bench_billing -- [NODES] [DAYS]
//!
//! Each node has two 4-GPU halves; each half runs jobs back to back (20 min to 8 h, the
//! owner drawn from 50 projects of 1 to 4 users, a few more popular than the rest),
//! sometimes with a gap. Per node and minute: `_idle` and one point per (project, user)
//! running, like the agent's usage interval. Amounts vary from minute to minute.
//!
//! Environment:
//! - `NODEWATT_BENCH_SHARD`: shard duration of the database (default `7d`, InfluxDB's);
//! - `NODEWATT_BENCH_INDEX`: `tsi1` (default, as config/influxdb.conf) or `inmem`;
//! - `NODEWATT_BENCH_INTERVAL`: the usage interval in seconds (default 60);
//! - `NODEWATT_BENCH_RUNS`: timed runs of each command (default 2);
//! - `NODEWATT_BENCH_BILLING`: lines for the `[billing]` section of the collector's
//!   config (e.g. `query_parallelism = 1`);
//! - `NODEWATT_BENCH_ALSO`: other `[billing]` lines, timed too with the same binary
//!   (e.g. `query_parallelism = 1` against the default);
//! - `NODEWATT_BENCH_BASELINE`: another `nodewatt-collector` binary (an older build), also
//!   timed, once per command, with a config that has no `[billing]` section;
//! - `NODEWATT_BENCH_VARIANTS=1`: also time alternative InfluxQL forms of the `--by
//!   project` query straight over HTTP (docs/benchmarks.md, "Billing at scale");
//! - `NODEWATT_BENCH_COLLECTOR`: the `nodewatt-collector` binary to time (default: the
//!   workspace's release build, which must be newer than its sources);
//! - `NODEWATT_BENCH_ROLLUP=0`: no hourly rollups (every bill reads `usage`); by
//!   default `nodewatt-collector rollup` rolls up the whole period first, timed;
//! - `NODEWATT_BENCH_HOLD=1`: keep influxd running at the end until stdin closes.
//!
//! See docs/benchmarks.md.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use nodewatt_tests::*;

const DB: &str = "bench";
const MINUTE: u64 = 60_000;
const DAY: u64 = 86_400_000;
/// 2026-01-01T00:00:00Z.
const START_MS: u64 = 1_767_225_600_000;
const PROJECTS: usize = 50;
const LINES_PER_BATCH: usize = 20_000;

/// splitmix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The six integer sums a bill is made of.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Amounts {
    gpu_uj: u64,
    cpu_uj: u64,
    dram_uj: u64,
    other_uj: u64,
    gpu_ms: u64,
    cpu_us: u64,
}

impl Amounts {
    fn add(&mut self, o: &Amounts) {
        self.gpu_uj += o.gpu_uj;
        self.cpu_uj += o.cpu_uj;
        self.dram_uj += o.dram_uj;
        self.other_uj += o.other_uj;
        self.gpu_ms += o.gpu_ms;
        self.cpu_us += o.cpu_us;
    }
    fn energy_uj(&self) -> u64 {
        self.gpu_uj + self.cpu_uj + self.dram_uj + self.other_uj
    }
    fn fields(&self, out: &mut String) {
        let _ = std::fmt::Write::write_fmt(
            out,
            format_args!(
                "energy_gpu_uj={}i,energy_cpu_uj={}i,energy_dram_uj={}i,energy_other_uj={}i,energy_uj={}i,gpu_ms={}i,cpu_us={}i",
                self.gpu_uj,
                self.cpu_uj,
                self.dram_uj,
                self.other_uj,
                self.energy_uj(),
                self.gpu_ms,
                self.cpu_us
            ),
        );
    }
}

struct Job {
    id: u64,
    owner: usize,
    start: u64,
    end: u64,
    /// Watts per GPU and of the job's CPU share, around which each minute varies.
    gpu_w: u64,
    cpu_w: u64,
    cores: u64,
    total: Amounts,
}

/// Owners: (project, user); index 0 is `_idle`.
fn owners() -> (Vec<(String, String)>, Vec<Vec<usize>>) {
    let mut owners = vec![("_idle".to_string(), "_none".to_string())];
    let mut by_project = Vec::new();
    for p in 0..PROJECTS {
        let mut ids = Vec::new();
        for u in 0..1 + p % 4 {
            ids.push(owners.len());
            owners.push((format!("proj-{p:02}"), format!("u{p:02}-{u}")));
        }
        by_project.push(ids);
    }
    (owners, by_project)
}

/// Each half of each node: jobs back to back over the period, sometimes a gap.
fn schedule(
    nodes: usize,
    end: u64,
    by_project: &[Vec<usize>],
    rng: &mut Rng,
) -> Vec<[Vec<Job>; 2]> {
    // A few projects run much more than the rest: weight 1 / (p + 1).
    let weights: Vec<f64> = (0..PROJECTS).map(|p| 1.0 / (p as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let mut next_id = 1_000_000u64;
    (0..nodes)
        .map(|_| {
            let mut half = |rng: &mut Rng| {
                let mut jobs = Vec::new();
                let mut t = START_MS + rng.range(0, 2 * 3_600_000);
                while t < end {
                    if rng.range(0, 9) == 0 {
                        t += rng.range(1, 60) * MINUTE;
                    }
                    let mut x = (rng.next() % 1_000_000) as f64 / 1e6 * total;
                    let mut p = 0;
                    while p + 1 < PROJECTS && x >= weights[p] {
                        x -= weights[p];
                        p += 1;
                    }
                    let users = &by_project[p];
                    let start = t + rng.range(0, 59_999);
                    let len = rng.range(20, 480) * MINUTE;
                    next_id += 1;
                    jobs.push(Job {
                        id: next_id,
                        owner: users[rng.next() as usize % users.len()],
                        start,
                        end: start + len,
                        gpu_w: rng.range(200, 650),
                        cpu_w: rng.range(40, 160),
                        cores: rng.range(4, 32),
                        total: Amounts::default(),
                    });
                    t = start + len;
                }
                jobs
            };
            [half(rng), half(rng)]
        })
        .collect()
}

/// An InfluxQL query by POST (no 10 s client timeout), its JSON answer.
fn query(url: &str, q: &str) -> serde_json::Value {
    let url = reqwest::Url::parse_with_params(
        &format!("{url}/query"),
        &[("db", DB), ("q", q), ("epoch", "ms")],
    )
    .unwrap();
    http_post(url, &[], Vec::new())
        .and_then(|r| r.text())
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn rfc3339_seconds(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Sends line-protocol batches, gzip-compressed, from two writer threads.
struct Writer {
    tx: Option<mpsc::SyncSender<Vec<u8>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    lines: usize,
    buf: String,
}

impl Writer {
    fn new(db: &Influxd) -> Writer {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
        let rx = Arc::new(Mutex::new(rx));
        let url = db.url();
        let threads = (0..2)
            .map(|_| {
                let rx = rx.clone();
                let url = url.clone();
                std::thread::spawn(move || loop {
                    let body = match rx.lock().unwrap().recv() {
                        Ok(b) => b,
                        Err(_) => return,
                    };
                    let mut tries = 0;
                    while let Err(e) = write_lines(&url, DB, None, "ms", body.clone(), true) {
                        tries += 1;
                        assert!(tries < 100, "write failed 100 times: {e}");
                        eprintln!("write: {e}; retrying");
                        std::thread::sleep(Duration::from_secs(2));
                    }
                })
            })
            .collect();
        Writer {
            tx: Some(tx),
            threads,
            lines: 0,
            buf: String::with_capacity(LINES_PER_BATCH * 260),
        }
    }

    fn line_done(&mut self) {
        self.buf.push('\n');
        self.lines += 1;
        if self.lines.is_multiple_of(LINES_PER_BATCH) {
            self.send();
        }
    }

    fn send(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut gz = flate2::write::GzEncoder::new(
            Vec::with_capacity(self.buf.len() / 6),
            flate2::Compression::fast(),
        );
        gz.write_all(self.buf.as_bytes()).unwrap();
        self.buf.clear();
        self.tx
            .as_ref()
            .unwrap()
            .send(gz.finish().unwrap())
            .unwrap();
    }

    fn finish(mut self) -> usize {
        self.send();
        drop(self.tx.take());
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.lines
    }
}

/// Ground truth per owner (project, user) and per job.
struct Truth {
    owners: Vec<Amounts>,
    jobs: BTreeMap<String, (usize, Amounts)>,
    usage_points: usize,
    job_points: usize,
}

fn generate(db: &Influxd, nodes: usize, days: u64, iv: u64) -> (Truth, Vec<(String, String)>) {
    let end = START_MS + days * DAY;
    let (owners, by_project) = owners();
    let mut rng = Rng(42);
    let mut sched = schedule(nodes, end, &by_project, &mut rng);
    let mut owner_sums = vec![Amounts::default(); owners.len()];
    let mut w = Writer::new(db);
    let mut next = vec![[0usize; 2]; nodes];
    let started = Instant::now();
    let mut by_owner: Vec<(usize, Amounts, u64)> = Vec::with_capacity(3);
    for day in 0..days {
        for (n, halves) in sched.iter_mut().enumerate() {
            for m in 1..=DAY / iv {
                let t = START_MS + day * DAY + m * iv;
                by_owner.clear();
                let mut busy_gpu_ms = 0;
                let mut busy_cores_us = 0;
                for (h, jobs) in halves.iter_mut().enumerate() {
                    let i = &mut next[n][h];
                    while *i < jobs.len() && jobs[*i].end <= t - iv {
                        *i += 1;
                    }
                    let Some(j) = jobs.get_mut(*i) else { continue };
                    let overlap = j.end.min(t).saturating_sub(j.start.max(t - iv));
                    if overlap == 0 {
                        continue;
                    }
                    let a = Amounts {
                        gpu_uj: 4 * (j.gpu_w + rng.range(0, 40)) * overlap * 1000,
                        cpu_uj: (j.cpu_w + rng.range(0, 20)) * overlap * 1000,
                        dram_uj: rng.range(8, 30) * overlap * 1000,
                        other_uj: rng.range(20, 60) * overlap * 1000,
                        gpu_ms: 4 * overlap,
                        cpu_us: j.cores * overlap * 1000 * rng.range(60, 100) / 100,
                    };
                    busy_gpu_ms += a.gpu_ms;
                    busy_cores_us += j.cores * overlap * 1000;
                    j.total.add(&a);
                    match by_owner.iter_mut().find(|(o, _, _)| *o == j.owner) {
                        Some((_, sum, jobs)) => {
                            sum.add(&a);
                            *jobs += 1;
                        }
                        None => by_owner.push((j.owner, a, 1)),
                    }
                }
                let idle_gpu_ms = 8 * iv - busy_gpu_ms;
                let idle_share = 64 * iv * 1000 - busy_cores_us.min(64 * iv * 1000);
                by_owner.push((
                    0,
                    Amounts {
                        gpu_uj: idle_gpu_ms * rng.range(55, 65) * 1000,
                        cpu_uj: idle_share / 1000 * rng.range(40, 60) / 64 * 1000,
                        dram_uj: idle_share / 1000 * rng.range(3, 6) / 64 * 1000,
                        other_uj: rng.range(80, 120) * iv * 1000,
                        gpu_ms: idle_gpu_ms,
                        cpu_us: 0,
                    },
                    0,
                ));
                for (o, a, jobs) in &by_owner {
                    owner_sums[*o].add(a);
                    let (p, u) = &owners[*o];
                    let b = &mut w.buf;
                    let _ = std::fmt::Write::write_fmt(
                        b,
                        format_args!("usage,cluster=bench,node=n{n:04},project={p},user={u} "),
                    );
                    a.fields(b);
                    let _ = std::fmt::Write::write_fmt(
                        b,
                        format_args!(",span_ms={iv}i,jobs={jobs}i {t}"),
                    );
                    w.line_done();
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "day {}/{days}: {} usage points, {:.0} points/s",
            day + 1,
            w.lines,
            w.lines as f64 / secs
        );
    }
    let usage_points = w.lines;
    // One job_total per job and node at its start, as the collector writes them.
    let mut jobs = BTreeMap::new();
    for (n, halves) in sched.iter().enumerate() {
        for j in halves.iter().flatten() {
            if j.total == Amounts::default() {
                continue;
            }
            let (p, u) = &owners[j.owner];
            let until = j.end.min(end);
            let b = &mut w.buf;
            let _ = std::fmt::Write::write_fmt(
                b,
                format_args!(
                    "job_total,cluster=bench,job={},node=n{n:04},project={p},user={u} ",
                    j.id
                ),
            );
            j.total.fields(b);
            let _ = std::fmt::Write::write_fmt(
                b,
                format_args!(
                    ",start_ms={}i,until_ms={until}i,ended={},gpus=\"{}\" {}",
                    j.start,
                    j.end <= end,
                    if j.gpu_w % 2 == 0 {
                        "0,1,2,3"
                    } else {
                        "4,5,6,7"
                    },
                    j.start
                ),
            );
            w.line_done();
            jobs.insert(j.id.to_string(), (j.owner, j.total));
        }
    }
    let lines = w.finish();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {usage_points} usage and {} job_total points in {secs:.1} s ({:.0} points/s)",
        lines - usage_points,
        lines as f64 / secs
    );
    (
        Truth {
            owners: owner_sums,
            job_points: lines - usage_points,
            jobs,
            usage_points,
        },
        owners,
    )
}

/// Waits until influxd has finished compacting: under 0.2 CPU seconds in 10 s.
fn settle(db: &Influxd) {
    let cpu = || db.process().map_or(0.0, |p| p.cpu_and_peak_rss().0);
    let t0 = Instant::now();
    loop {
        let before = cpu();
        std::thread::sleep(Duration::from_secs(10));
        let used = cpu() - before;
        if used < 0.2 || t0.elapsed() > Duration::from_secs(3600) {
            println!(
                "influxd settled after {:.0} s; {:.2} GB on disk",
                t0.elapsed().as_secs_f64(),
                db.disk_bytes() as f64 / 1e9
            );
            return;
        }
    }
}

fn influxd_cpu(db: &Influxd) -> f64 {
    db.process().map_or(0.0, |p| p.cpu_and_peak_rss().0)
}

/// `NODEWATT_BENCH_COLLECTOR`, or the workspace's release binary (checked to be newer
/// than its sources).
fn collector_binary() -> std::path::PathBuf {
    std::env::var_os("NODEWATT_BENCH_COLLECTOR")
        .map(Into::into)
        .unwrap_or_else(|| bin("nodewatt-collector"))
}

/// Runs `binary <args> --config cfg`, asserting success; (seconds, influxd CPU
/// seconds, stdout).
fn timed(
    binary: &std::path::Path,
    cfg: &ConfigFile,
    db: &Influxd,
    args: &[&str],
) -> (f64, f64, String) {
    let cpu0 = influxd_cpu(db);
    let t0 = Instant::now();
    let out = Command::new(binary)
        .args(args)
        .arg("--config")
        .arg(&cfg.path)
        .output()
        .expect("nodewatt-collector runs");
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        secs,
        influxd_cpu(db) - cpu0,
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// Runs the collector's `usage` over the whole period, timed; (seconds, influxd CPU
/// seconds, CSV).
fn usage(
    binary: &std::path::Path,
    cfg: &ConfigFile,
    db: &Influxd,
    by: &str,
    days: u64,
) -> (f64, f64, String) {
    let (from, to) = (
        rfc3339_seconds(START_MS),
        rfc3339_seconds(START_MS + days * DAY),
    );
    let args = [
        "usage", "--format", "csv", "--by", by, "--from", &from, "--to", &to,
    ];
    timed(binary, cfg, db, &args)
}

/// key → energy_uj from the collector's CSV.
fn energy_by_key(csv: &str) -> BTreeMap<String, u64> {
    csv.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[3].parse().unwrap())
        })
        .collect()
}

/// Times a raw InfluxQL query (one GET); (seconds, influxd CPU seconds, series returned).
fn time_query(db: &Influxd, q: &str) -> (f64, f64, usize) {
    let cpu0 = influxd_cpu(db);
    let t0 = Instant::now();
    let v = query(&db.url(), q);
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        v["results"][0]["error"].is_null() && !v.is_null(),
        "{q}: {}",
        v["results"][0]["error"]
    );
    let series = v["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["series"].as_array().map_or(0, |s| s.len()))
        .sum();
    (secs, influxd_cpu(db) - cpu0, series)
}

/// The same statement over `chunks` slices of the period, `parallel` requests at a time.
fn time_chunked(db: &Influxd, q: &str, days: u64, chunks: u64, parallel: usize) -> (f64, f64) {
    let end = START_MS + days * DAY;
    let step = (days * DAY).div_ceil(chunks);
    let slices: Vec<(u64, u64)> = (0..chunks)
        .map(|i| (START_MS + i * step, (START_MS + (i + 1) * step).min(end)))
        .collect();
    let queue = Arc::new(Mutex::new(slices));
    let cpu0 = influxd_cpu(db);
    let t0 = Instant::now();
    let url = db.url();
    let threads: Vec<_> = (0..parallel)
        .map(|_| {
            let queue = queue.clone();
            let url = url.clone();
            let q = q.to_string();
            std::thread::spawn(move || {
                while let Some((a, b)) = queue.lock().unwrap().pop() {
                    let q = q
                        .replace("$from", &a.to_string())
                        .replace("$to", &b.to_string());
                    let v = query(&url, &q);
                    assert!(v["results"][0]["error"].is_null() && !v.is_null(), "{q}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (t0.elapsed().as_secs_f64(), influxd_cpu(db) - cpu0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let nodes: usize = args.next().map_or(100, |a| a.parse().expect("NODES"));
    let days: u64 = args.next().map_or(7, |a| a.parse().expect("DAYS"));
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let shard = env("NODEWATT_BENCH_SHARD").unwrap_or_else(|| "7d".into());
    let index = env("NODEWATT_BENCH_INDEX").unwrap_or_else(|| "tsi1".into());
    let runs: usize = env("NODEWATT_BENCH_RUNS").map_or(2, |r| r.parse().expect("RUNS"));
    let interval_s: u64 =
        env("NODEWATT_BENCH_INTERVAL").map_or(60, |r| r.parse().expect("INTERVAL"));
    assert!(
        interval_s > 0 && DAY.is_multiple_of(interval_s * 1000),
        "the usage interval divides a day"
    );

    let db = Influxd::start_with(
        &format!(
            "  index-version = \"{index}\"\n  max-series-per-database = 0\n  max-values-per-tag = 0\n  \
             cache-snapshot-write-cold-duration = \"5s\"\n  compact-full-write-cold-duration = \"10s\""
        ),
        "  max-body-size = 0\n  max-row-limit = 0",
    );
    // Release builds abort on panic, so nothing is dropped: stop influxd and remove its
    // directory here, or a failed check would leave them behind.
    let (pid, dir) = (
        db.process().map_or(0, |p| p.pid()),
        db.dir.path().to_path_buf(),
    );
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        // SAFETY: signalling the influxd this program started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = std::fs::remove_dir_all(&dir);
    }));
    db.execute(
        "",
        &format!("CREATE DATABASE \"{DB}\" WITH SHARD DURATION {shard}"),
    )
    .unwrap();
    println!(
        "{nodes} nodes x {days} days, {interval_s} s usage interval, shard duration {shard}, index {index}"
    );
    let (truth, owners) = generate(&db, nodes, days, interval_s * 1000);
    settle(&db);

    // influxdb.timeout: what a build older than [billing] query_timeout waits.
    let base = format!(
        "[collector]\nid = \"bench\"\n[influxdb]\nurl = \"{}\"\ndatabase = \"{DB}\"\ntimeout = \"600s\"\n",
        db.url()
    );
    let billing = env("NODEWATT_BENCH_BILLING").unwrap_or_default();
    let cfg = config_file(
        "collector.toml",
        &format!("{base}[billing]\n{}\n", billing.replace("\\n", "\n")),
    );
    let baseline_cfg = config_file("collector.toml", &base);
    let also = env("NODEWATT_BENCH_ALSO").unwrap_or_default();
    let also_cfg = config_file(
        "collector.toml",
        &format!("{base}[billing]\n{}\n", also.replace("\\n", "\n")),
    );
    let mut binaries: Vec<(String, std::path::PathBuf, &ConfigFile, usize)> =
        vec![(String::new(), collector_binary(), &cfg, runs)];
    if !also.is_empty() {
        binaries.push((format!(" ({also})"), collector_binary(), &also_cfg, runs));
    }
    if let Some(b) = env("NODEWATT_BENCH_BASELINE") {
        binaries.push((" (baseline)".into(), b.into(), &baseline_cfg, 1));
    }

    // Expected energy per key, from the generator's own sums.
    let mut by_project: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_user: BTreeMap<String, u64> = BTreeMap::new();
    for (o, a) in truth.owners.iter().enumerate() {
        if a.energy_uj() > 0 {
            *by_project.entry(owners[o].0.clone()).or_default() += a.energy_uj();
            *by_user.entry(owners[o].1.clone()).or_default() += a.energy_uj();
        }
    }
    let by_job: BTreeMap<String, u64> = truth
        .jobs
        .iter()
        .map(|(k, (_, a))| (k.clone(), a.energy_uj()))
        .collect();

    println!(
        "| command | nodes | days | points | time per query (runs) | points/s | influxd CPU s per query | load |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let rolled = rollup(&cfg, &db, days);
    for (by, expected, points) in [
        ("project", &by_project, truth.usage_points),
        ("user", &by_user, truth.usage_points),
        ("job", &by_job, truth.job_points),
    ] {
        // Runs of the builds and configs alternate, so that neither always goes first.
        let mut times = vec![Vec::new(); binaries.len()];
        let mut cpu = vec![0.0; binaries.len()];
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load = load.split(' ').next().unwrap_or("").to_string();
        for run in 0..runs {
            for (i, (_, binary, cfg, n)) in binaries.iter().enumerate() {
                if run >= *n {
                    continue;
                }
                let (secs, c, csv) = usage(binary, cfg, &db, by, days);
                let got = energy_by_key(&csv);
                assert!(
                    &got == expected,
                    "--by {by}: {} groups, expected {}; first difference: {:?}",
                    got.len(),
                    expected.len(),
                    expected.iter().find(|(k, v)| got.get(*k) != Some(v))
                );
                times[i].push(secs);
                cpu[i] += c / *n as f64;
            }
        }
        for (i, (label, ..)) in binaries.iter().enumerate() {
            let best = times[i].iter().cloned().fold(f64::MAX, f64::min);
            println!(
                "| `usage --by {by}`{label} | {nodes} | {days} | {points} | {} s | {:.0} | {:.1} | {load} |",
                times[i]
                    .iter()
                    .map(|t| format!("{t:.2}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
                points as f64 / best,
                cpu[i]
            );
        }
    }
    println!("every total exact to the microjoule");
    if rolled {
        // A period that does not start or end on an hour: its edges are read from usage.
        let (from, to) = (START_MS + 1_800_000, START_MS + days * DAY - 1_800_000);
        let (secs, cpu, _) = timed(
            &collector_binary(),
            &cfg,
            &db,
            &[
                "usage",
                "--format",
                "csv",
                "--by",
                "project",
                "--from",
                &rfc3339_seconds(from),
                "--to",
                &rfc3339_seconds(to),
            ],
        );
        println!(
            "`usage --by project` from 00:30 to 23:30 (edges from usage): {secs:.2} s, influxd CPU {cpu:.1} s"
        );
    }

    if env("NODEWATT_BENCH_VARIANTS").is_some() {
        variants(&db, days, truth.usage_points);
    }
    if env("NODEWATT_BENCH_HOLD").is_some() {
        println!(
            "influxd at {} (database {DB}); close stdin to stop",
            db.url()
        );
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    }
}

/// Rolls up every hour of the period with `nodewatt-collector rollup`, as `serve` does
/// hour by hour (the generated points carry no markers, so every hour is rolled), and
/// prints what it cost. Skipped with `NODEWATT_BENCH_ROLLUP=0`.
fn rollup(cfg: &ConfigFile, db: &Influxd, days: u64) -> bool {
    if std::env::var("NODEWATT_BENCH_ROLLUP").as_deref() == Ok("0") {
        return false;
    }
    let (from, to) = (
        rfc3339_seconds(START_MS),
        rfc3339_seconds(START_MS + days * DAY),
    );
    let (secs, cpu, out) = timed(
        &collector_binary(),
        cfg,
        db,
        &["rollup", "--from", &from, "--to", &to],
    );
    println!(
        "rollup of {} hours: {secs:.1} s, {:.2} s per hour, influxd CPU {cpu:.1} s ({})",
        days * 24,
        secs / (days * 24) as f64,
        out.trim()
    );
    true
}

/// Alternative InfluxQL forms of the `--by project` query, straight over HTTP.
fn variants(db: &Influxd, days: u64, points: usize) {
    let (from, to) = (START_MS, START_MS + days * DAY);
    let six = "SUM(\"energy_gpu_uj\") AS gpu_uj, SUM(\"energy_cpu_uj\") AS cpu_uj, SUM(\"energy_dram_uj\") AS dram_uj, SUM(\"energy_other_uj\") AS other_uj, SUM(\"gpu_ms\") AS gpu_ms, SUM(\"cpu_us\") AS cpu_us";
    let window = |a: &str, b: &str| format!("time > {a}ms AND time <= {b}ms");
    let whole = window(&from.to_string(), &to.to_string());
    let chunked = window("$from", "$to");
    println!("| variant | time | points/s | influxd CPU s | series |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, (secs, cpu, series): (f64, f64, usize)| {
        println!(
            "| {name} | {secs:.2} s | {:.0} | {cpu:.1} | {series} |",
            points as f64 / secs
        );
    };
    for (name, q) in [
        (
            "6 sums, GROUP BY project, node",
            format!("SELECT {six} FROM \"usage\" WHERE {whole} GROUP BY \"project\", \"node\""),
        ),
        (
            "6 sums, GROUP BY project",
            format!("SELECT {six} FROM \"usage\" WHERE {whole} GROUP BY \"project\""),
        ),
        (
            "6 sums, GROUP BY project, user, node",
            format!(
                "SELECT {six} FROM \"usage\" WHERE {whole} GROUP BY \"project\", \"user\", \"node\""
            ),
        ),
        (
            "1 sum (energy_uj), GROUP BY project, node",
            format!(
                "SELECT SUM(\"energy_uj\") FROM \"usage\" WHERE {whole} GROUP BY \"project\", \"node\""
            ),
        ),
        (
            "COUNT(span_ms), no grouping",
            format!("SELECT COUNT(\"span_ms\") FROM \"usage\" WHERE {whole}"),
        ),
    ] {
        row(name, time_query(db, &q));
    }
    // The six sums as six statements of one request (InfluxDB runs them in turn).
    let one = |f: &str, w: &str| {
        format!("SELECT SUM(\"{f}\") FROM \"usage\" WHERE {w} GROUP BY \"project\", \"node\"")
    };
    let fields = [
        "energy_gpu_uj",
        "energy_cpu_uj",
        "energy_dram_uj",
        "energy_other_uj",
        "gpu_ms",
        "cpu_us",
    ];
    let statements: Vec<String> = fields.iter().map(|f| one(f, &whole)).collect();
    row(
        "6 statements of 1 sum in one request",
        time_query(db, &statements.join("; ")),
    );
    // ... or as six requests, 2 or 6 at a time.
    for parallel in [2, 6] {
        let queue = Arc::new(Mutex::new(statements.clone()));
        let cpu0 = influxd_cpu(db);
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..parallel {
                let queue = queue.clone();
                let url = db.url();
                s.spawn(move || {
                    while let Some(q) = queue.lock().unwrap().pop() {
                        assert!(query(&url, &q)["results"][0]["error"].is_null());
                    }
                });
            }
        });
        row(
            &format!("6 requests of 1 sum, {parallel} at a time"),
            (t0.elapsed().as_secs_f64(), influxd_cpu(db) - cpu0, 0),
        );
    }
    let q = format!("SELECT {six} FROM \"usage\" WHERE {chunked} GROUP BY \"project\", \"node\"");
    for (chunks, parallel) in [(days, 1), (days, 2), (days, 4), (days.div_ceil(7), 2)] {
        let (secs, cpu) = time_chunked(db, &q, days, chunks, parallel);
        row(
            &format!("6 sums by project, node: {chunks} slices, {parallel} at a time"),
            (secs, cpu, 0),
        );
    }
}
