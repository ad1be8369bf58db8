//! `nodewatt-collector report`: a Markdown energy report for one job or one project over
//! a period, with an SVG chart of power by device class, for documenting a training
//! run's energy use or an allocation's consumption.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use nodewatt_wire::{JobId, Project};

use crate::billing::{Plan, Prices, Sums};
use crate::influx::Influx;
use crate::influxql::{any_of, eq};

/// What the report is about.
#[derive(Debug, Clone)]
pub enum Subject {
    Job(JobId),
    Project(Project),
}

/// Why no report was written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "no usage recorded for job {0}: this database holds no job totals of it; \
         `nodewatt-collector usage --by job --from FROM --to TO` lists the jobs that ran \
         in a period"
    )]
    NoJob(String),
    #[error(
        "no usage recorded for project {project} from {from} to {to}: check the name \
         (`nodewatt-collector usage --by project` over the period lists them) and the period"
    )]
    NoProject {
        project: String,
        from: String,
        to: String,
    },
    #[error("a project report needs --from and --to")]
    NoPeriod,
    #[error("{0}: its totals pass 2^64 µJ")]
    Overflow(String),
    /// InfluxDB's answer, or none.
    #[error("{0}")]
    Query(String),
}

impl From<String> for ReportError {
    fn from(e: String) -> Self {
        ReportError::Query(e)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ReportData {
    pub title: String,
    pub project: String,
    pub users: Vec<String>,
    pub nodes: Vec<String>,
    /// `node: gpus` of a job.
    pub gpus: Vec<String>,
    pub models: Vec<String>,
    /// A job's start and last sample, or the period: (from, to], Unix ms.
    pub from_ms: u64,
    pub to_ms: u64,
    pub sums: Sums,
    /// The chart.
    pub series: Series,
    pub efficiency: Efficiency,
}

/// Whose power a chart draws: `usage` is stored per project, user and node, never per
/// job (docs/schema.md), so a job's own power is known only where its points summed that
/// job alone (their `jobs` count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drawn {
    /// A project over a period: all its users and nodes.
    Project(String),
    /// A job's own attributed power: every point drawn summed this job alone.
    Job(String),
    /// A job's project and user on its nodes during it, which held other jobs of theirs
    /// too: up to `most` at once on a node (`None`: points without a job count, folded
    /// by an agent running hundreds of jobs).
    Owner {
        job: String,
        project: String,
        user: String,
        most: Option<u64>,
    },
    /// A job with no usage points in its span (a retention policy removed them).
    NoUsage(String),
}

impl Default for Drawn {
    fn default() -> Self {
        Drawn::Project(String::new())
    }
}

/// Mean power over one step of a chart, (from, to] in Unix ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub from_ms: u64,
    pub to_ms: u64,
    /// W of GPU, CPU, DRAM, other; `None` where a job's node has no usage point covering
    /// the step (unmeasured or lost: drawn as a gap, not as 0 W).
    pub w: Option<[f64; 4]>,
}

/// A chart of power by device class: steps over (from, to], each the mean power of the
/// usage over it (a point covers the span before its timestamp).
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub drawn: Drawn,
    pub from_ms: u64,
    pub to_ms: u64,
    /// Steps end on multiples of this (UTC, from 1970), like the usage points.
    pub bucket_ms: u64,
    pub steps: Vec<Step>,
}

/// How the GPU energy and time were spent (the agent's `gpu_idle_uj`, `gpu_capped_uj`
/// and `gpu_tensor_us`, parts of the GPU energy and time in `sums`; the last in µs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Efficiency {
    pub gpu_idle_uj: u64,
    pub gpu_capped_uj: u64,
    pub gpu_tensor_us: u64,
}

impl Efficiency {
    fn checked_add(&self, o: &Efficiency) -> Option<Efficiency> {
        Some(Efficiency {
            gpu_idle_uj: self.gpu_idle_uj.checked_add(o.gpu_idle_uj)?,
            gpu_capped_uj: self.gpu_capped_uj.checked_add(o.gpu_capped_uj)?,
            gpu_tensor_us: self.gpu_tensor_us.checked_add(o.gpu_tensor_us)?,
        })
    }
}

/// `part` as a percentage of `whole`, for a table cell.
fn share(part: u64, whole: u64) -> String {
    match whole {
        0 => "-".into(),
        _ => format!("{:.1} %", part as f64 * 100.0 / whole as f64),
    }
}

/// The GPU efficiency section: what the GPU energy bought.
fn efficiency(m: &mut String, s: &Sums, e: &Efficiency) {
    let hours = |us: u64| us as f64 / 3.6e9;
    m.push_str(
        "## GPU efficiency

| measure | value | unit | share |
|---|---:|---|---:|
",
    );
    let _ = writeln!(
        m,
        "| Tensor-active GPU time | {:.3} | GPU-hours | {} of GPU time |",
        hours(e.gpu_tensor_us),
        share(e.gpu_tensor_us, s.gpu_ms.saturating_mul(1000))
    );
    let per_tensor_hour = match e.gpu_tensor_us {
        0 => "- (no tensor activity measured)".to_string(),
        us => format!("{:.6}", kwh(s.gpu_uj) / hours(us)),
    };
    let _ = writeln!(
        m,
        "| GPU energy per tensor-active GPU-hour | {per_tensor_hour} | kWh/GPU-hour | |"
    );
    let _ = writeln!(
        m,
        "| GPU energy while the GPU ran nothing | {:.6} | kWh | {} of GPU energy |",
        kwh(e.gpu_idle_uj),
        share(e.gpu_idle_uj, s.gpu_uj)
    );
    let _ = writeln!(
        m,
        "| GPU energy while power- or thermal-capped | {:.6} | kWh | {} of GPU energy |
",
        kwh(e.gpu_capped_uj),
        share(e.gpu_capped_uj, s.gpu_uj)
    );
}

const CLASSES: [&str; 4] = ["GPU", "CPU", "DRAM", "Other"];
const COLOURS: [&str; 4] = ["#d62728", "#1f77b4", "#2ca02c", "#7f7f7f"];

fn kwh(uj: u64) -> f64 {
    uj as f64 / 3.6e12
}

/// RFC 3339 in UTC, with milliseconds only where there are some.
pub fn fmt_time(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    match ms % 1000 {
        0 => humantime::format_rfc3339_seconds(t).to_string(),
        _ => humantime::format_rfc3339_millis(t).to_string(),
    }
}

/// Chart buckets: at most about 240 points, whole seconds.
pub fn bucket_ms(from_ms: u64, to_ms: u64) -> u64 {
    let span = to_ms.saturating_sub(from_ms).max(1);
    span.div_ceil(240).div_ceil(1000).max(1) * 1000
}

/// A chart's bucket: [`bucket_ms`] rounded up to a multiple of the agents' usage interval
/// (`interval_ms`, when known). Usage points end on that interval's multiples, so each
/// lies whole in one bucket: a bucket shorter than the interval would hold a point in
/// some buckets and none in others.
///
/// A bucket longer than a minute is also a multiple of a minute where the interval
/// divides a minute: agents' intervals usually do, and their points end on its
/// multiples, so in a fleet of mixed intervals a slower agent's points no longer than a
/// bucket lie whole in one too (points longer than a bucket are spread, [`steps`]).
pub fn chart_bucket_ms(from_ms: u64, to_ms: u64, interval_ms: Option<u64>) -> u64 {
    let b = bucket_ms(from_ms, to_ms);
    let b = match interval_ms {
        Some(u) if u > 0 => b.div_ceil(u) * u,
        _ => b,
    };
    const MINUTE: u64 = 60_000;
    match interval_ms {
        Some(u) if u > 0 && MINUTE % u != 0 => b,
        _ if b > MINUTE => b.div_ceil(MINUTE) * MINUTE,
        _ => b,
    }
}

/// The usage interval from a sample of usage points' `span_ms`: the most common span
/// (points at job edges and after restarts cover shorter or longer ones).
pub fn usage_interval(spans: impl IntoIterator<Item = u64>) -> Option<u64> {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for s in spans.into_iter().filter(|s| *s > 0) {
        *counts.entry(s).or_default() += 1;
    }
    // The longest of equally common spans: steps are then never shorter than a point.
    counts
        .into_iter()
        .max_by_key(|(span, n)| (*n, *span))
        .map(|(span, _)| span)
}

/// A usage point longer than a chart's bucket (an agent that was stopped, or could not
/// publish, sends the time since its last point in one): spread over its span rather
/// than heaped into the bucket it ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Long {
    pub end_ms: u64,
    pub span_ms: u64,
    /// µJ of GPU, CPU, DRAM, other.
    pub uj: [u64; 4],
}

/// One node's usage (or a project's, all nodes): energy (µJ of GPU, CPU, DRAM, other)
/// and the time covered (`span_ms` summed) per bucket end of the points no longer than
/// a bucket, the longer points, and the fewest and most jobs any point summed
/// (`None` where a point had no count).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets {
    pub uj: BTreeMap<u64, [u64; 4]>,
    pub covered_ms: BTreeMap<u64, u64>,
    pub long: Vec<Long>,
    pub fewest_jobs: Option<Option<u64>>,
    pub most_jobs: u64,
}

/// A row of an answer, read by its series' column names.
struct Row<'a> {
    cols: std::rc::Rc<Vec<&'a str>>,
    values: &'a [serde_json::Value],
    /// Its series' GROUP BY tags.
    tags: &'a serde_json::Value,
}

impl Row<'_> {
    /// A tag of its series, or a text column ("" if neither).
    fn text(&self, name: &str) -> &str {
        self.tags[name]
            .as_str()
            .or_else(|| self.get(name)?.as_str())
            .unwrap_or_default()
    }

    /// A stored count (null is 0), checked as a bill's are: anything else, or a column
    /// the answer lacks, is an error naming `what`, never a 0 in a report.
    fn count(&self, col: &str, what: &dyn Fn() -> String) -> Result<u64, String> {
        let v = self
            .get(col)
            .ok_or_else(|| format!("InfluxDB answer without column {col} ({})", what()))?;
        crate::billing::count(v, col, what)
    }

    /// Its time, in ms.
    fn time(&self) -> Option<u64> {
        self.values.first()?.as_u64()
    }

    fn get(&self, col: &str) -> Option<&serde_json::Value> {
        let i = self.cols.iter().position(|c| *c == col)?;
        self.values.get(i)
    }

    fn u64(&self, col: &str) -> Option<u64> {
        self.get(col)?.as_u64()
    }

    /// Its `gpu`, `cpu`, `dram` and `other` energies (null is 0), from the row at `t`.
    fn energies(&self, t: u64) -> Result<[u64; 4], String> {
        let mut uj = [0; 4];
        for (i, c) in ["gpu", "cpu", "dram", "other"].iter().enumerate() {
            uj[i] = match self.get(c) {
                None | Some(serde_json::Value::Null) => 0,
                Some(v) => v.as_u64().ok_or(format!(
                    "the {c} energy at {} is {v}, not a count",
                    fmt_time(t)
                ))?,
            };
        }
        Ok(uj)
    }
}

/// The rows of one statement's answer.
fn rows(result: &serde_json::Value) -> Result<Vec<Row<'_>>, String> {
    let mut out = Vec::new();
    for series in result["series"].as_array().into_iter().flatten() {
        let cols = std::rc::Rc::new(crate::billing::columns(series)?);
        for row in series["values"].as_array().into_iter().flatten() {
            if let Some(values) = row.as_array() {
                out.push(Row {
                    cols: cols.clone(),
                    values,
                    tags: &series["tags"],
                });
            }
        }
    }
    Ok(out)
}

impl Buckets {
    fn count_jobs(&mut self, fewest: Option<u64>, most: Option<u64>) {
        self.fewest_jobs = Some(match self.fewest_jobs {
            None => fewest,
            Some(f) => f.zip(fewest).map(|(a, b)| a.min(b)),
        });
        self.most_jobs = self.most_jobs.max(most.unwrap_or(0));
    }

    /// Adds one statement's answer to `SELECT SUM(..) AS gpu, cpu, dram, other,
    /// SUM(span_ms) AS covered, MIN(jobs) AS fewest, MAX(jobs) AS most ...
    /// GROUP BY time(b, 1ms)`: InfluxDB dates a bucket (k·b, (k+1)·b] at its first
    /// instant, k·b + 1 ms.
    pub fn add(&mut self, result: &serde_json::Value, bucket_ms: u64) -> Result<(), String> {
        for row in rows(result)? {
            let Some(t) = row.time() else { continue };
            let end = t.saturating_sub(1) + bucket_ms;
            let e = row.energies(t)?;
            let uj = self.uj.entry(end).or_default();
            for (sum, v) in uj.iter_mut().zip(e) {
                *sum = sum.saturating_add(v);
            }
            let covered = self.covered_ms.entry(end).or_default();
            *covered = covered.saturating_add(row.u64("covered").unwrap_or(0));
            self.count_jobs(row.u64("fewest"), row.u64("most"));
        }
        Ok(())
    }

    /// Adds one statement's answer to `SELECT gpu, cpu, dram, other, span_ms, jobs`:
    /// points to spread over their spans.
    pub fn add_long(&mut self, result: &serde_json::Value) -> Result<(), String> {
        for row in rows(result)? {
            let Some(t) = row.time() else { continue };
            self.long.push(Long {
                end_ms: t,
                span_ms: row.u64("span_ms").unwrap_or(0),
                uj: row.energies(t)?,
            });
            self.count_jobs(row.u64("jobs"), row.u64("jobs"));
        }
        Ok(())
    }
}

/// Steps over (from, to]: one per bucket (k·b, (k+1)·b] that meets it, cut to it, with
/// the mean power over the time it shows of `usage` (per node: where the node's usage is
/// expected, its job's span there; `None` for a project's, expected nowhere).
///
/// A point no longer than a bucket counts whole in the bucket it ends in; a longer one
/// is spread evenly over the span it covers (cut to the node's job span: its
/// energy is the job's). Where a node's usage is expected in a step but no point covers
/// any of it, the step is a gap: the nodes' sum is unknown, and 0 W would say the job drew
/// nothing. A node covered over part of its time in a step counts at its mean power over
/// the part covered. Elsewhere (a project's chart) no point means 0 W of it.
pub fn steps(
    from_ms: u64,
    to_ms: u64,
    bucket_ms: u64,
    usage: &[(Option<(u64, u64)>, Buckets)],
) -> Vec<Step> {
    let b = bucket_ms.max(1);
    let mut out = Vec::new();
    if from_ms >= to_ms {
        return out;
    }
    let first = (from_ms / b + 1) * b;
    // The part of each long point in each step (by bucket end), per node: each point
    // costs the buckets it meets, not all of them.
    let spread: Vec<BTreeMap<u64, ([f64; 4], u64)>> = usage
        .iter()
        .map(|(expected, bk)| {
            let (na, nz) = expected.unwrap_or((from_ms, to_ms));
            let mut m: BTreeMap<u64, ([f64; 4], u64)> = BTreeMap::new();
            for p in &bk.long {
                let mut pa = p.end_ms.saturating_sub(p.span_ms);
                let mut pz = p.end_ms;
                if expected.is_some() {
                    (pa, pz) = (pa.max(na), pz.min(nz));
                }
                // Where it meets the chart and the node's expected span.
                let (ca, cz) = (pa.max(from_ms).max(na), pz.min(to_ms).min(nz));
                if pa >= pz || ca >= cz {
                    continue;
                }
                let mut end = (ca / b + 1) * b;
                while end - b < cz {
                    let o = cz.min(end).saturating_sub(ca.max(end - b));
                    if o > 0 {
                        let (e, covered) = m.entry(end).or_default();
                        for (e, v) in e.iter_mut().zip(p.uj) {
                            *e += v as f64 * o as f64 / (pz - pa) as f64;
                        }
                        *covered += o;
                    }
                    end += b;
                }
            }
            m
        })
        .collect();
    let mut end = first;
    while end - b < to_ms {
        let (a, z) = ((end - b).max(from_ms), end.min(to_ms));
        let mut uj = Some([0.0f64; 4]);
        for ((expected, bk), spread) in usage.iter().zip(&spread) {
            let (na, nz) = expected.unwrap_or((from_ms, to_ms));
            let (ea, ez) = (a.max(na), z.min(nz));
            if ea >= ez {
                continue;
            }
            let mut e = bk
                .uj
                .get(&end)
                .copied()
                .unwrap_or_default()
                .map(|v| v as f64);
            let mut covered = bk.covered_ms.get(&end).copied().unwrap_or(0);
            if let Some((le, lc)) = spread.get(&end) {
                for (e, v) in e.iter_mut().zip(le) {
                    *e += v;
                }
                covered += lc;
            }
            if expected.is_some() {
                let want = ez - ea;
                match covered {
                    0 => uj = None,
                    c if c < want => e = e.map(|v| v * want as f64 / c as f64),
                    _ => {}
                }
            }
            if let Some(uj) = &mut uj {
                for (sum, v) in uj.iter_mut().zip(e) {
                    *sum += v;
                }
            }
        }
        out.push(Step {
            from_ms: a,
            to_ms: z,
            // µJ per ms is mW.
            w: uj.map(|uj| uj.map(|v| v / (z - a) as f64 / 1000.0)),
        });
        end += b;
    }
    out
}

/// The smallest 1, 2, 2.5 or 5 × 10^k at or above `v` (axis maximum with round ticks).
pub fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 1.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

/// A duration to the millisecond below an hour, else to the second.
fn duration(ms: u64) -> String {
    let ms = if ms < 3_600_000 { ms } else { ms / 1000 * 1000 };
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

/// Mass with a unit that keeps small amounts readable.
fn co2(kg: f64) -> String {
    if kg < 1.0 {
        format!("{:.3} g", kg * 1000.0)
    } else {
        format!("{kg:.3} kg")
    }
}

/// Ticks of a time axis over [from, to] (whole multiples of a round step, UTC), their
/// labels, and the axis title: the date is said once, there.
pub fn time_axis(from_ms: u64, to_ms: u64) -> (Vec<(u64, String)>, String) {
    const S: u64 = 1000;
    const STEPS: [u64; 22] = [
        S,
        2 * S,
        5 * S,
        10 * S,
        15 * S,
        30 * S,
        60 * S,
        120 * S,
        300 * S,
        600 * S,
        900 * S,
        1800 * S,
        3600 * S,
        7200 * S,
        10_800 * S,
        21_600 * S,
        43_200 * S,
        86_400 * S,
        2 * 86_400 * S,
        7 * 86_400 * S,
        14 * 86_400 * S,
        28 * 86_400 * S,
    ];
    let span = to_ms.saturating_sub(from_ms);
    let step = STEPS
        .iter()
        .copied()
        .find(|s| span.div_ceil(*s) <= 6)
        .unwrap_or(STEPS[STEPS.len() - 1]);
    let day = |ms: u64| fmt_time(ms / 1000 * 1000)[..10].to_string();
    let one_day = day(from_ms) == day(to_ms);
    let label = |ms: u64| {
        let t = fmt_time(ms / 1000 * 1000);
        match (one_day, step) {
            (true, s) if s < 60 * S => t[11..19].to_string(),
            (true, _) => t[11..16].to_string(),
            (false, s) if s < 86_400 * S => format!("{} {}", &t[5..10], &t[11..16]),
            (false, _) => t[5..10].to_string(),
        }
    };
    let mut ticks = Vec::new();
    let mut t = from_ms.div_ceil(step) * step;
    while t <= to_ms {
        ticks.push((t, label(t)));
        t += step;
    }
    let title = if one_day {
        format!("time (UTC), {}", day(from_ms))
    } else {
        format!("time (UTC), {} to {}", day(from_ms), day(to_ms))
    };
    (ticks, title)
}

/// A power value for an axis label: no more decimals than it has.
fn watts(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// XML text: names in titles come from the database.
fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Series {
    /// The chart's title and the line under it: what exactly is drawn.
    pub fn titles(&self) -> (String, String) {
        let every = format!("mean per {}", duration(self.bucket_ms));
        match &self.drawn {
            Drawn::Project(p) => (
                format!("Project {p}: its attributed power by device class"),
                format!("all its users and nodes; {every}"),
            ),
            Drawn::Job(j) => (
                format!("Job {j}: its attributed power by device class"),
                format!("on its nodes, from its start to its last sample; {every}"),
            ),
            Drawn::Owner {
                job,
                project,
                user,
                most,
            } => (
                format!("Project {project}, user {user}, on the nodes of job {job} while it ran"),
                match most {
                    Some(n) => format!("not job {job} alone: up to {n} of their jobs at once; {every}"),
                    None => format!("not job {job} alone: its usage points there are not counted by job; {every}"),
                },
            ),
            Drawn::NoUsage(j) => (
                format!("Job {j}: no usage points stored for its run"),
                "nothing to draw; the report's totals are the job's own".into(),
            ),
        }
    }
}

/// A step chart of power by device class over the series' span. Pure, so it is tested
/// as a string. The plot area carries its span and scale (`data-from-ms`, `data-to-ms`,
/// `data-max-w`) for readers that check it.
pub fn svg(series: &Series) -> String {
    let (w, h, left, right, top, bottom) = (800.0, 360.0, 64.0, 130.0, 52.0, 56.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let (t0, t1) = (series.from_ms, series.to_ms.max(series.from_ms + 1));
    let ymax = nice_ceiling(
        series
            .steps
            .iter()
            .flat_map(|s| s.w.into_iter().flatten())
            .fold(0.0f64, f64::max),
    );
    let x = |t: u64| left + t.clamp(t0, t1).saturating_sub(t0) as f64 / (t1 - t0) as f64 * pw;
    let y = |v: f64| top + ph - v / ymax * ph;
    let (title, subtitle) = series.titles();
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>\n\
         <text x=\"{left}\" y=\"38\" fill=\"#444\">{}</text>\n\
         <rect class=\"plot\" x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"black\" data-from-ms=\"{t0}\" data-to-ms=\"{t1}\" data-max-w=\"{ymax}\"/>\n",
        xml(&title),
        xml(&subtitle),
    );
    // Round power ticks: quarters of 1 or 2 × 10^k, fifths of 2.5 or 5 × 10^k.
    let mantissa = ymax / 10f64.powf(ymax.log10().floor());
    let parts = if mantissa == 2.5 || mantissa == 5.0 {
        5
    } else {
        4
    };
    for i in 0..=parts {
        let v = ymax * i as f64 / parts as f64;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
            left - 6.0,
            y(v) + 4.0,
            watts(v),
            y(v),
            left + pw,
            y(v)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">power (W)</text>",
        top + ph / 2.0,
        top + ph / 2.0
    );
    let (ticks, axis) = time_axis(t0, t1);
    for (t, label) in ticks {
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            x(t),
            top + ph,
            x(t),
            top + ph + 4.0,
            x(t),
            top + ph + 18.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{axis}</text>",
        left + pw / 2.0,
        h - 10.0
    );
    // Steps without data, shaded behind the lines: a gap, not 0 W.
    let runs = |known: bool| {
        series
            .steps
            .chunk_by(|a, b| a.w.is_some() == b.w.is_some())
            .filter(move |run| run[0].w.is_some() == known)
    };
    for run in runs(false) {
        let (a, z) = (run[0].from_ms, run[run.len() - 1].to_ms);
        let _ = writeln!(
            s,
            "<rect class=\"gap\" x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{ph}\" fill=\"#e8e8e8\"/>",
            x(a),
            x(z) - x(a)
        );
    }
    let drawn: Vec<[f64; 4]> = series.steps.iter().filter_map(|st| st.w).collect();
    for (c, (name, colour)) in CLASSES.iter().zip(COLOURS).enumerate() {
        // Each step is level over the span it covers; one line per run of known steps.
        for run in runs(true) {
            let points: Vec<String> = run
                .iter()
                .filter_map(|st| Some((st.from_ms, st.to_ms, st.w?[c])))
                .flat_map(|(a, z, v)| [(a, v), (z, v)])
                .map(|(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
                .collect();
            let _ = writeln!(
                s,
                "<polyline class=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
                name.to_ascii_lowercase(),
                points.join(" ")
            );
        }
        let ly = top + 10.0 + c as f64 * 18.0;
        // Lines at 0 lie on each other on the axis: the legend says which.
        let zero = !drawn.is_empty() && drawn.iter().all(|w| w[c] == 0.0);
        let label = if zero {
            format!("{name} (0 W)")
        } else {
            name.to_string()
        };
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{label}</text>",
            left + pw + 10.0,
            left + pw + 30.0,
            left + pw + 36.0,
            ly + 4.0
        );
    }
    if runs(false).next().is_some() {
        let ly = top + 10.0 + CLASSES.len() as f64 * 18.0;
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"20\" height=\"10\" fill=\"#e8e8e8\"/><text x=\"{:.1}\" y=\"{:.1}\">no data</text>",
            left + pw + 10.0,
            ly - 5.0,
            left + pw + 36.0,
            ly + 4.0
        );
    }
    if series.steps.is_empty() || matches!(series.drawn, Drawn::NoUsage(_)) {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#444\">no usage points stored for this span</text>",
            left + pw / 2.0,
            top + ph / 2.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// What the chart shows, in words, for the Markdown.
fn chart_text(series: &Series) -> String {
    let every = duration(series.bucket_ms);
    let mut how = format!(
        "Each step is the mean power (W) over each {every} (on the UTC clock) of the usage \
         points that end in it; a point covers the span before its timestamp, so it is drawn \
         over that span, and a point covering more than a step (sent late, after \
         its agent was stopped or could not publish) is spread evenly over it. Times are UTC."
    );
    if series.steps.iter().any(|st| st.w.is_none()) {
        how.push_str(
            " A gap in the chart (shaded, \"no data\") is time on the job's nodes that no \
             usage point covers, on at least one node (e.g. while it rebooted): nothing \
             measured or stored, so it is not drawn as 0 W, and where nodes run together \
             their sum is unknown. A step a node's points cover only in part shows that \
             node's mean power over the part covered.",
        );
    } else if let Drawn::Project(_) = series.drawn {
        how.push_str(" A step with no usage point of the project is drawn at 0 W.");
    }
    match &series.drawn {
        Drawn::Project(p) => format!(
            "The chart shows the power attributed to project {p}, all its users and nodes, \
             by device class. {how}"
        ),
        Drawn::Job(j) => format!(
            "The chart shows the power attributed to job {j} itself, by device class, from \
             its start to its last sample: usage is stored per project and user, and every \
             point drawn (its project and user on its nodes during its run) summed this job \
             alone. {how}"
        ),
        Drawn::Owner {
            job,
            project,
            user,
            most,
        } => {
            let why = match most {
                Some(n) => format!(
                    "other jobs of project {project} and user {user} ran on the same nodes \
                     at the same time (up to {n} at once)"
                ),
                None => format!(
                    "its usage points there carry no job count (an agent running hundreds \
                     of jobs folds them per project and user), so other jobs of project \
                     {project} and user {user} there cannot be told apart from it"
                ),
            };
            format!(
                "**This chart is not job {job} alone**: usage is stored per project and \
                 user, not per job, and {why}. It shows the power attributed to project \
                 {project} and user {user} on the job's nodes from its start to its last \
                 sample; the tables above are job {job}'s own totals. {how}"
            )
        }
        Drawn::NoUsage(j) => format!(
            "No usage points are stored for job {j}'s run (a retention policy may have \
             removed them), so the chart is empty; the tables above are the job's totals."
        ),
    }
}

/// The Markdown report; `chart` is the SVG file's name, linked from it.
pub fn markdown(d: &ReportData, p: &Prices, chart: &str, database: &str) -> String {
    let s = &d.sums;
    let it = kwh(s.energy_uj());
    let facility = it * p.pue;
    let mut m = format!("# Energy report: {}\n\n", d.title);
    let _ = writeln!(m, "| | |\n|---|---|");
    let _ = writeln!(m, "| Project | {} |", d.project);
    if !d.users.is_empty() {
        let _ = writeln!(m, "| Users | {} |", d.users.join(", "));
    }
    let _ = writeln!(
        m,
        "| Period (UTC) | {} to {} ({}) |",
        fmt_time(d.from_ms),
        fmt_time(d.to_ms),
        duration(d.to_ms.saturating_sub(d.from_ms))
    );
    let _ = writeln!(
        m,
        "| Nodes | {} |",
        if d.nodes.is_empty() {
            "none".into()
        } else {
            d.nodes.join(", ")
        }
    );
    if !d.gpus.is_empty() {
        let _ = writeln!(m, "| GPUs | {} |", d.gpus.join("; "));
    }
    let _ = writeln!(
        m,
        "| GPU models | {} |",
        if d.models.is_empty() {
            "none".into()
        } else {
            d.models.join(", ")
        }
    );
    let _ = writeln!(m, "| GPU time | {:.3} GPU-hours |", s.gpu_ms as f64 / 3.6e6);
    let _ = writeln!(
        m,
        "| CPU time | {:.3} core-hours |\n",
        s.cpu_us as f64 / 3.6e9
    );

    m.push_str("## Energy\n\n| device class | energy (kWh) | energy (J) |\n|---|---:|---:|\n");
    for (name, uj) in [
        ("GPU", s.gpu_uj),
        ("CPU (packages)", s.cpu_uj),
        ("DRAM", s.dram_uj),
        ("Other (rest of node)", s.other_uj),
    ] {
        let _ = writeln!(m, "| {name} | {:.6} | {:.3} |", kwh(uj), uj as f64 / 1e6);
    }
    let _ = writeln!(
        m,
        "| **IT equipment, measured** | **{it:.6}** | **{:.3}** |",
        s.energy_uj() as f64 / 1e6
    );
    let _ = writeln!(m, "| Facility (× PUE {}) | {facility:.6} | |", p.pue);
    if let Some(g) = p.co2_g_per_kwh {
        let _ = writeln!(
            m,
            "\nEmissions: {} CO2e (facility energy × {g} g CO2e/kWh).",
            co2(facility * g / 1000.0)
        );
    }
    if let Some(price) = p.price_per_kwh {
        let _ = writeln!(
            m,
            "\nCost: {:.2} {} (facility energy × {price} {}/kWh).",
            facility * price,
            p.currency,
            p.currency
        );
    }
    m.push('\n');
    efficiency(&mut m, s, &d.efficiency);
    let _ = writeln!(
        m,
        "## Power by device class\n\n![Power by device class]({chart})\n\n{}\n",
        chart_text(&d.series)
    );
    m.push_str(
        "## How this was measured\n\n\
         - **GPU**: each GPU's hardware energy counter (NVML total energy, mJ), read every \
         sample; the difference between consecutive samples is the energy of that interval. \
         A GPU's interval belongs to the job the scheduler allocated it to, from the job's \
         start; an interval in which the job ended is not billed to it.\n\
         - **CPU and DRAM**: RAPL energy counters (package and DRAM domains, µJ, corrected \
         for counter wrap-around), split between jobs by the CPU time of each job's cgroup \
         against the node's CPU capacity; unused capacity is not billed to jobs.\n\
         - **Other**: where the node has a power meter, its energy minus the GPU, CPU and \
         DRAM energy, split like CPU energy.\n\
         - **GPU efficiency**: per sample, a GPU's (or MIG instance's) energy counts as \
         *ran nothing* when its activity (GPM SM activity, else NVML utilisation) was under \
         1 %, as *capped* for the share of the interval NVML counted it held back by its \
         power or thermal limit, and its time as *tensor-active* for the share GPM saw any \
         tensor core busy (GPUs without GPM, before Hopper, count none).\n\
         - **MIG**: NVML measures only the whole GPU; a MIG instance's share is estimated by \
         its slices and SM activity (the GPU's total stays exact).\n\
         - Energy that no job used is accounted to the project `_idle`. Per node and \
         interval, the parts add up exactly (integer microjoules) to the counters' deltas.\n\
         - Jobs are known from the scheduler's prolog and epilog (root-owned registry \
         files), never from user-controlled data.\n\
         - Facility energy multiplies measured IT energy by the PUE given above; CO2e \
         multiplies facility energy by the grid intensity given above. Neither is measured.\n",
    );
    let _ = writeln!(
        m,
        "\nSource: InfluxDB database `{database}`, measurements `usage` and `job_total`; \
         generated by nodewatt-collector {} at {}.",
        env!("CARGO_PKG_VERSION"),
        fmt_time(nodewatt_common::now_ms() / 1000 * 1000)
    );
    m
}

fn strings(v: &serde_json::Value, col: usize) -> Vec<String> {
    let mut out: Vec<String> = v["results"][0]["series"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|row| row[col].as_str().map(str::to_string))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Points longer than a chart's bucket a chart reads at most. A series (a node's project
/// and user) has at most one per bucket and one more: its points do not overlap, and
/// each covers more than a bucket; about 240 buckets make a chart.
pub const MAX_LONG_POINTS: usize = 100_000;

/// Statements a request carries at most (two per node of a job).
const STATEMENTS_PER_REQUEST: usize = 50;

/// Whose usage a chart draws.
enum Whose<'a> {
    Project(&'a Project),
    /// A job's project and user on its nodes, each node from the job's start to its last
    /// sample there.
    Job {
        job: &'a JobId,
        project: &'a str,
        user: &'a str,
        spans: &'a BTreeMap<String, (u64, u64)>,
    },
}

/// The two statements a chart reads of the usage matching `filter` and `when` (more
/// conditions, from `AND`), for buckets of `b` ms: the points no longer than a bucket,
/// summed by InfluxDB in the bucket each ends in; the longer ones (an agent's outage or
/// stop, sent in one point) one by one, to be spread over their spans, at most
/// [`MAX_LONG_POINTS`] and one. The bucket, not the usage interval, is the bound: in a
/// fleet of mixed intervals every point of a slower agent is longer than the interval,
/// but rarely than a bucket (at least the interval, about 1/240 of the chart).
fn usage_statements(filter: &str, when: &str, b: u64) -> [String; 2] {
    let whole = b;
    let limit = MAX_LONG_POINTS + 1;
    [
        format!(
            "SELECT SUM(\"energy_gpu_uj\") AS gpu, SUM(\"energy_cpu_uj\") AS cpu, SUM(\"energy_dram_uj\") AS dram, SUM(\"energy_other_uj\") AS other, SUM(\"span_ms\") AS covered, MIN(\"jobs\") AS fewest, MAX(\"jobs\") AS most FROM \"usage\" WHERE {filter} AND \"span_ms\" <= {whole} {when} GROUP BY time({b}ms, 1ms) fill(none)"
        ),
        format!(
            "SELECT \"energy_gpu_uj\" AS gpu, \"energy_cpu_uj\" AS cpu, \"energy_dram_uj\" AS dram, \"energy_other_uj\" AS other, \"span_ms\", \"jobs\" FROM \"usage\" WHERE {filter} AND \"span_ms\" > {whole} {when} LIMIT {limit}"
        ),
    ]
}

/// The chart of the usage matching `filter` over (from, to]. For a job, it is the job's
/// own power where every point drawn summed that job alone (`Drawn`).
async fn chart(
    influx: &Influx,
    filter: &str,
    (from_ms, to_ms): (u64, u64),
    whose: Whose<'_>,
) -> Result<Series, ReportError> {
    let node_filter = match &whose {
        Whose::Job { spans, .. } => {
            let nodes: Vec<String> = spans.keys().cloned().collect();
            format!(" AND {}", any_of("node", &nodes))
        }
        Whose::Project(_) => String::new(),
    };
    let v = influx
        .query(&format!(
            "SELECT \"span_ms\" FROM \"usage\" WHERE {filter}{node_filter} AND time > {from_ms}ms AND time <= {to_ms}ms LIMIT 1000"
        ))
        .await?;
    let spans_seen = v["results"][0]["series"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|row| row[1].as_u64());
    let interval = usage_interval(spans_seen);
    let b = chart_bucket_ms(from_ms, to_ms, interval);
    // Per node where a job's usage is expected (its span there), both statements.
    let parts: Vec<(Option<(u64, u64)>, String)> = match &whose {
        Whose::Job { spans, .. } => spans
            .iter()
            .map(|(node, (a, z))| {
                let node = eq("node", node);
                (
                    Some((*a, *z)),
                    format!("AND {node} AND time > {a}ms AND time <= {z}ms"),
                )
            })
            .collect(),
        Whose::Project(_) => vec![(
            None,
            format!("AND time > {from_ms}ms AND time <= {to_ms}ms"),
        )],
    };
    let statements: Vec<String> = parts
        .iter()
        .flat_map(|(_, w)| usage_statements(filter, w, b))
        .collect();
    let mut results = Vec::new();
    for request in statements.chunks(STATEMENTS_PER_REQUEST) {
        let v = influx.query(&request.join("; ")).await?;
        if crate::influx::has_partial(&v) {
            return Err(ReportError::Query(
                "InfluxDB's answer ended unfinished (partial): the chart would be short; \
                 try again"
                    .into(),
            ));
        }
        results.extend(v["results"].as_array().cloned().unwrap_or_default());
    }
    let mut usage: Vec<(Option<(u64, u64)>, Buckets)> = Vec::new();
    let mut all = Buckets::default();
    let mut long_points = 0;
    for ((expected, _), pair) in parts.iter().zip(results.chunks(2)) {
        let mut bk = Buckets::default();
        bk.add(&pair[0], b)?;
        if let Some(long) = pair.get(1) {
            bk.add_long(long)?;
        }
        long_points += bk.long.len();
        if long_points > MAX_LONG_POINTS {
            return Err(ReportError::Query(format!(
                "more than {MAX_LONG_POINTS} usage points from {} to {} each cover more than \
                 a step of the chart ({}), to be spread over their spans: too many to read \
                 one by one; a longer period has longer steps",
                fmt_time(from_ms),
                fmt_time(to_ms),
                duration(b)
            )));
        }
        // A node without points (none read) has no count to give.
        if let Some(fewest) = bk.fewest_jobs {
            all.count_jobs(fewest, Some(bk.most_jobs));
        }
        usage.push((*expected, bk));
    }
    let drawn = match whose {
        Whose::Project(p) => Drawn::Project(p.to_string()),
        Whose::Job { job, .. } if all.fewest_jobs.is_none() => Drawn::NoUsage(job.to_string()),
        Whose::Job { job, .. } if all.fewest_jobs == Some(Some(1)) && all.most_jobs == 1 => {
            Drawn::Job(job.to_string())
        }
        Whose::Job {
            job, project, user, ..
        } => Drawn::Owner {
            job: job.to_string(),
            project: project.to_string(),
            user: user.to_string(),
            most: match all.fewest_jobs {
                Some(Some(f)) if f >= 1 => Some(all.most_jobs),
                _ => None,
            },
        },
    };
    Ok(Series {
        from_ms,
        to_ms,
        bucket_ms: b,
        steps: match &drawn {
            Drawn::NoUsage(_) => Vec::new(),
            _ => steps(from_ms, to_ms, b, &usage),
        },
        drawn,
    })
}

/// One `job_total` point of a job: a node's totals over one agent run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub node: String,
    /// The job's start (its registry file's), and the last sample the totals reach.
    pub start_ms: u64,
    pub until_ms: u64,
    /// The job's end was seen: `until_ms` is its end.
    pub ended: bool,
}

/// Where a job's usage is expected on each node: (start, end] in Unix ms. A job's points
/// on a node (one per agent run) span its time there, from the job's start. A node none
/// of whose points saw the job's end (its agent died, or the job still runs) is expected
/// to the job's end, or its last sample on any node: the rest of its time there is then
/// a gap in the chart, not a drop. A node that saw the end keeps its own.
pub fn node_spans(records: impl IntoIterator<Item = JobRecord>) -> BTreeMap<String, (u64, u64)> {
    let mut spans: BTreeMap<String, (u64, u64, bool)> = BTreeMap::new();
    for r in records {
        let span = spans
            .entry(r.node)
            .or_insert((r.start_ms, r.until_ms, r.ended));
        *span = (
            span.0.min(r.start_ms),
            span.1.max(r.until_ms),
            span.2 || r.ended,
        );
    }
    let end = spans.values().map(|s| s.1).max().unwrap_or(0);
    spans
        .into_iter()
        .map(|(node, (a, z, ended))| (node, (a, if ended { z } else { end })))
        .collect()
}

/// Reads what a report needs from InfluxDB. A subject with nothing recorded is an error,
/// so that no empty report is written.
pub async fn gather(
    influx: &Influx,
    subject: &Subject,
    period: Option<(u64, u64)>,
    plan: &Plan,
) -> Result<ReportData, ReportError> {
    let mut d = ReportData::default();
    let filter;
    // A job's span per node.
    let mut spans: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    match subject {
        Subject::Job(job) => {
            let v = influx
                .query(&format!(
                    "SELECT project, \"user\", node, gpus, start_ms, until_ms, energy_gpu_uj, energy_cpu_uj, energy_dram_uj, energy_other_uj, gpu_ms, cpu_us, energy_gpu_idle_uj, energy_gpu_capped_uj, gpu_tensor_us, ended FROM \"job_total\" WHERE {}",
                    eq("job", job)
                ))
                .await?;
            crate::billing::complete(&v)?;
            let rows = rows(&v["results"][0])?;
            let Some(first) = rows.first() else {
                return Err(ReportError::NoJob(job.to_string()));
            };
            let overflow = || ReportError::Overflow(format!("job {job}"));
            let mut records = Vec::new();
            for r in &rows {
                let what = || format!("job {job} on node {}", r.text("node"));
                let n = |col: &str| r.count(col, &what);
                let part = Sums {
                    gpu_uj: n("energy_gpu_uj")?,
                    cpu_uj: n("energy_cpu_uj")?,
                    dram_uj: n("energy_dram_uj")?,
                    other_uj: n("energy_other_uj")?,
                    gpu_ms: n("gpu_ms")?,
                    cpu_us: n("cpu_us")?,
                };
                d.sums = d.sums.checked_add(&part).ok_or_else(overflow)?;
                let spent = Efficiency {
                    gpu_idle_uj: n("energy_gpu_idle_uj")?,
                    gpu_capped_uj: n("energy_gpu_capped_uj")?,
                    gpu_tensor_us: n("gpu_tensor_us")?,
                };
                d.efficiency = d.efficiency.checked_add(&spent).ok_or_else(overflow)?;
                records.push(JobRecord {
                    node: r.text("node").to_string(),
                    start_ms: n("start_ms")?,
                    until_ms: n("until_ms")?,
                    ended: r.get("ended").and_then(|e| e.as_bool()).unwrap_or(false),
                });
                let gpus = r.text("gpus");
                if !gpus.is_empty() {
                    d.gpus.push(format!("{}: {gpus}", r.text("node")));
                }
                for (list, tag) in [(&mut d.users, "user"), (&mut d.nodes, "node")] {
                    if !r.text(tag).is_empty() {
                        list.push(r.text(tag).to_string());
                    }
                }
            }
            d.from_ms = records.iter().map(|r| r.start_ms).min().unwrap_or(0);
            d.to_ms = records.iter().map(|r| r.until_ms).max().unwrap_or(0);
            d.project = first.text("project").to_string();
            for v in [&mut d.users, &mut d.nodes, &mut d.gpus] {
                v.sort();
                v.dedup();
            }
            spans = node_spans(records);
            d.title = format!("job {job} (project {})", d.project);
            // Names read back from InfluxDB are data, not query text: escaped.
            filter = format!(
                "{} AND {}",
                eq("project", &d.project),
                any_of("user", &d.users)
            );
        }
        Subject::Project(p) => {
            let (from, to) = period.ok_or(ReportError::NoPeriod)?;
            d.from_ms = from;
            d.to_ms = to;
            d.project = p.to_string();
            d.title = format!("project {p}");
            filter = eq("project", p);
            // One grouped query gives the totals, the users and the nodes.
            let detail = crate::billing::project_detail(influx, from, to, p, plan).await?;
            if detail.is_empty() {
                return Err(ReportError::NoProject {
                    project: p.to_string(),
                    from: fmt_time(from),
                    to: fmt_time(to),
                });
            }
            for (key, s) in &detail {
                d.sums = d
                    .sums
                    .checked_add(s)
                    .ok_or_else(|| ReportError::Overflow(format!("project {p}")))?;
                d.users.push(key[0].clone());
                d.nodes.push(key[1].clone());
            }
            for v in [&mut d.users, &mut d.nodes] {
                v.sort();
                v.dedup();
            }
            // Summed per node, as a bill's sums are: InfluxDB's 64-bit sum wraps silently.
            let v = influx
                .query(&format!(
                    "SELECT SUM(energy_gpu_idle_uj) AS idle, SUM(energy_gpu_capped_uj) AS capped, SUM(gpu_tensor_us) AS tensor FROM \"usage\" WHERE {filter} AND time > {from}ms AND time <= {to}ms GROUP BY node"
                ))
                .await?;
            crate::billing::complete(&v)?;
            for r in rows(&v["results"][0])? {
                let what = || format!("project {p} on node {}", r.text("node"));
                let spent = Efficiency {
                    gpu_idle_uj: r.count("idle", &what)?,
                    gpu_capped_uj: r.count("capped", &what)?,
                    gpu_tensor_us: r.count("tensor", &what)?,
                };
                d.efficiency = d
                    .efficiency
                    .checked_add(&spent)
                    .ok_or_else(|| ReportError::Overflow(format!("project {p}")))?;
            }
        }
    }
    for n in d.nodes.clone() {
        let v = influx
            .query(&format!(
                "SHOW TAG VALUES FROM \"gpu\" WITH KEY = \"model\" WHERE {}",
                eq("node", &n)
            ))
            .await?;
        d.models.extend(strings(&v, 1));
    }
    d.models.sort();
    d.models.dedup();

    let user = d.users.join(", ");
    let whose = match subject {
        Subject::Job(job) => Whose::Job {
            job,
            project: &d.project,
            user: &user,
            spans: &spans,
        },
        Subject::Project(p) => Whose::Project(p),
    };
    d.series = chart(influx, &filter, (d.from_ms, d.to_ms), whose).await?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn data() -> ReportData {
        ReportData {
            title: "job 7 (project proj-a)".into(),
            project: "proj-a".into(),
            users: vec!["alice".into()],
            nodes: vec!["n1".into()],
            gpus: vec!["n1: 0,1".into()],
            models: vec!["NVIDIA H100 80GB HBM3".into()],
            from_ms: 0,
            to_ms: 3_600_000,
            sums: Sums {
                gpu_uj: 2_520_000_000_000,
                cpu_uj: 360_000_000_000,
                gpu_ms: 7_200_000,
                ..Sums::default()
            },
            series: Series {
                drawn: Drawn::Job("7".into()),
                from_ms: 0,
                to_ms: 3_600_000,
                bucket_ms: 60_000,
                steps: vec![
                    Step {
                        from_ms: 0,
                        to_ms: 60_000,
                        w: Some([700.0, 100.0, 0.0, 0.0]),
                    },
                    Step {
                        from_ms: 60_000,
                        to_ms: 120_000,
                        w: Some([650.0, 90.0, 0.0, 0.0]),
                    },
                ],
            },
            efficiency: Efficiency {
                gpu_idle_uj: 252_000_000_000,
                gpu_capped_uj: 0,
                gpu_tensor_us: 1_800_000_000,
            },
        }
    }

    #[test]
    fn buckets_keep_charts_small() {
        assert_eq!(bucket_ms(0, 10_000), 1_000);
        assert_eq!(bucket_ms(0, 3_600_000), 15_000);
        assert_eq!(bucket_ms(0, 30 * 86_400_000), 10_800_000);
        // Never shorter than the usage interval, and a multiple of it.
        assert_eq!(chart_bucket_ms(0, 3_600_000, Some(MIN)), MIN);
        assert_eq!(chart_bucket_ms(0, 3_600_000, Some(50)), 15_000);
        assert_eq!(chart_bucket_ms(0, 3_600_000, Some(7_000)), 21_000);
        assert_eq!(chart_bucket_ms(0, 3_600_000, None), 15_000);
        assert_eq!(chart_bucket_ms(0, 86_400_000, Some(MIN)), 6 * MIN);
        // Over a minute, whole minutes: a fleet at 10 s and 1 min over 5 h (75 s, 80 s
        // at 10 s) has 2 min steps, each holding whole 1 min points; under, no change.
        assert_eq!(chart_bucket_ms(0, 5 * 3_600_000, Some(10_000)), 2 * MIN);
        assert_eq!(chart_bucket_ms(0, 3_600_000, Some(10_000)), 20_000);
        assert_eq!(chart_bucket_ms(0, 5 * 3_600_000, None), 2 * MIN);
        assert_eq!(chart_bucket_ms(0, 5 * 3_600_000, Some(7_000)), 77_000);
        assert_eq!(usage_interval([11_000, MIN, MIN, 21_000, MIN]), Some(MIN));
        assert_eq!(usage_interval([0]), None);
    }

    /// The bug this fixes: InfluxDB groups `time(b)` as [k·b, (k+1)·b), so a point dated
    /// at the end of its span, k·b, was drawn a bucket late. With the 1 ms offset a
    /// bucket is (k·b, (k+1)·b], dated k·b + 1.
    #[test]
    fn each_point_is_drawn_over_the_span_it_covers() {
        let answer = serde_json::json!({"statement_id": 0, "series": [{
            "name": "usage",
            "columns": ["time", "gpu", "cpu", "dram", "other", "covered", "fewest", "most"],
            "values": [
                // (0, 1 min]: the job's first points, from its start at 10 s.
                [1, 20_000_000_000u64, 0, 0, null, 60_000, 1, 1],
                [60_001, 24_000_000_000u64, 6_000_000_000u64, 0, 0, 60_000, 1, 1],
                // Nothing in (2 min, 3 min]; (3 min, 4 min] cut at the job's end.
                [180_001, 8_000_000_000u64, 0, 0, 0, 20_000, 1, 1],
            ]
        }]});
        let mut b = Buckets::default();
        b.add(&answer, MIN).unwrap();
        assert_eq!(
            b.uj.keys().copied().collect::<Vec<_>>(),
            [MIN, 2 * MIN, 4 * MIN]
        );
        assert_eq!((b.fewest_jobs, b.most_jobs), (Some(Some(1)), 1));
        assert_eq!(b.covered_ms[&(4 * MIN)], 20_000);
        // A project's: no point in a step is 0 W of it.
        let s = steps(10_000, 3 * MIN + 20_000, MIN, &[(None, b.clone())]);
        let spans: Vec<(u64, u64)> = s.iter().map(|s| (s.from_ms, s.to_ms)).collect();
        assert_eq!(
            spans,
            [
                (10_000, MIN),
                (MIN, 2 * MIN),
                (2 * MIN, 3 * MIN),
                (3 * MIN, 3 * MIN + 20_000)
            ]
        );
        let w: Vec<Option<[f64; 4]>> = s.iter().map(|s| s.w).collect();
        assert_eq!(
            w,
            [
                Some([400.0, 0.0, 0.0, 0.0]),
                Some([400.0, 100.0, 0.0, 0.0]),
                Some([0.0; 4]),
                Some([400.0, 0.0, 0.0, 0.0])
            ]
        );
        // A job's, expected there: the same, but the step no point covers is a gap.
        let job = steps(
            10_000,
            3 * MIN + 20_000,
            MIN,
            &[(Some((10_000, 3 * MIN + 20_000)), b.clone())],
        );
        assert_eq!(job[2].w, None);
        assert_eq!(job[0].w, w[0]);
        assert_eq!(job[3].w, w[3]);
        // A point without a job count (folded) leaves the count unknown.
        let folded = serde_json::json!({"series": [{
            "columns": ["time", "gpu", "cpu", "dram", "other", "fewest", "most"],
            "values": [[1, 1, 0, 0, 0, null, null]]
        }]});
        b.add(&folded, MIN).unwrap();
        assert_eq!(b.fewest_jobs, Some(None));
        let negative = serde_json::json!({"series": [{
            "columns": ["time", "gpu"], "values": [[1, -5]]
        }]});
        assert!(b.add(&negative, MIN).unwrap_err().contains("not a count"));
    }

    /// A node's points at `w` W over the minutes ending at `ends` (short), as summed by
    /// InfluxDB per minute bucket.
    fn minutes(w: u64, ends: &[u64]) -> Buckets {
        let mut b = Buckets::default();
        for end in ends {
            b.uj.insert(end * MIN, [w * 1000 * MIN, 0, 0, 0]);
            b.covered_ms.insert(end * MIN, MIN);
        }
        b.fewest_jobs = Some(Some(1));
        b.most_jobs = 1;
        b
    }

    fn gpu(s: &[Step]) -> Vec<Option<f64>> {
        s.iter().map(|s| s.w.map(|w| w[0])).collect()
    }

    /// An agent stopped from 3 to 8 min sends those five minutes in one point at 8 min;
    /// a reboot loses 10 to 13 min. Before, the chart showed 0 W from 3 to 7 min, 2 kW
    /// from 7 to 8 min, and 0 W from 10 to 13 min.
    #[test]
    fn a_late_long_point_is_spread_and_time_no_point_covers_is_a_gap() {
        let mut n1 = minutes(400, &[1, 2, 3, 9, 10, 14, 15, 16]);
        let late = serde_json::json!({"series": [{
            "columns": ["time", "gpu", "cpu", "dram", "other", "span_ms", "jobs"],
            "values": [[8 * MIN, 400_000 * 5 * MIN, 0, 0, null, 5 * MIN, 1]]
        }]});
        n1.add_long(&late).unwrap();
        assert_eq!(
            n1.long,
            [Long {
                end_ms: 8 * MIN,
                span_ms: 5 * MIN,
                uj: [400_000 * 5 * MIN, 0, 0, 0]
            }]
        );
        let job = [(Some((0, 16 * MIN)), n1.clone())];
        let mut want = vec![Some(400.0); 16];
        want[10..13].fill(None);
        assert_eq!(gpu(&steps(0, 16 * MIN, MIN, &job)), want);
        // Two-minute steps: (10, 12] no point covers; (12, 14] covered half, at its
        // mean over that half.
        let two = steps(0, 16 * MIN, 2 * MIN, &job);
        let mut want = vec![Some(400.0); 8];
        want[5] = None;
        assert_eq!(gpu(&two), want);
        // A project's chart expects nothing: the lost minutes are 0 W of it, the late
        // point is still spread.
        let project = steps(0, 16 * MIN, MIN, &[(None, n1)]);
        let mut want = vec![Some(400.0); 16];
        want[10..13].fill(Some(0.0));
        assert_eq!(gpu(&project), want);
    }

    #[test]
    fn a_job_on_several_nodes_sums_them_and_a_gap_on_one_is_a_gap() {
        // n1 at 300 W all along; n2 at 500 W from 90 s, its (2, 3 min] lost.
        let n1 = minutes(300, &[1, 2, 3, 4]);
        let mut n2 = minutes(500, &[3, 4]);
        n2.uj.insert(2 * MIN, [500 * 1000 * 30_000, 0, 0, 0]);
        n2.covered_ms.insert(2 * MIN, 30_000);
        let usage = [(Some((0, 4 * MIN)), n1), (Some((90_000, 4 * MIN)), n2)];
        assert_eq!(
            gpu(&steps(0, 4 * MIN, MIN, &usage)),
            [Some(300.0), Some(550.0), Some(800.0), Some(800.0)]
        );
        let mut lost = usage.clone();
        lost[1].1.uj.remove(&(3 * MIN));
        lost[1].1.covered_ms.remove(&(3 * MIN));
        assert_eq!(
            gpu(&steps(0, 4 * MIN, MIN, &lost)),
            [Some(300.0), Some(550.0), None, Some(800.0)]
        );
    }

    /// A long point reaching back before the job's start on the node holds only the
    /// job's energy: it is spread over the job's part of its span.
    #[test]
    fn a_long_point_is_spread_over_the_job_part_of_its_span() {
        let t = 10 * MIN;
        let mut n1 = Buckets::default();
        n1.long.push(Long {
            end_ms: t + 2 * MIN,
            span_ms: 3 * MIN,
            uj: [400_000 * MIN, 0, 0, 0],
        });
        let job = Some((t + MIN, t + 2 * MIN));
        let s = steps(t + MIN, t + 2 * MIN, MIN, &[(job, n1.clone())]);
        assert_eq!(gpu(&s), [Some(400.0)]);
        // A project's point is spread over its whole span, a third of it before the period.
        let s = steps(t, t + 2 * MIN, MIN, &[(None, n1)]);
        assert_eq!(gpu(&s), [Some(400.0 / 3.0), Some(400.0 / 3.0)]);
    }

    /// A fleet of mixed intervals: nodes at 10 s and at 1 min, the interval read as 10 s.
    /// Only points longer than the chart's bucket are read one by one (to be spread); a
    /// point no longer than a bucket is summed by InfluxDB in the bucket it ends in, so a
    /// slower node's every point is not read raw.
    #[test]
    fn only_points_longer_than_a_bucket_are_read_one_by_one() {
        let [sums, longer] = usage_statements("\"project\" = 'p'", "AND time > 0ms", MIN);
        assert!(
            sums.contains("AND \"span_ms\" <= 60000 AND time > 0ms GROUP BY time(60000ms, 1ms)"),
            "{sums}"
        );
        assert!(
            longer.contains("AND \"span_ms\" > 60000 AND time > 0ms"),
            "{longer}"
        );
        // Bounded: more than that many is an error saying why, not an answer cut short.
        assert!(
            longer.ends_with(&format!(" LIMIT {}", MAX_LONG_POINTS + 1)),
            "{longer}"
        );
    }

    /// A job's points on a node, one per agent run: the node's span is the job's start to
    /// its end. An agent that died before the job ended (no record of that node saw the
    /// end) leaves the node expected up to the job's end, seen on another node: the rest
    /// is a gap in the chart, not a drop. A node that saw the end keeps its own.
    #[test]
    fn a_node_whose_agent_died_is_expected_to_the_job_end() {
        let r = |node: &str, start_ms, until_ms, ended| JobRecord {
            node: node.into(),
            start_ms,
            until_ms,
            ended,
        };
        let spans = node_spans([
            r("n1", 0, 10 * MIN, true),
            // n2's agent restarted at 3 min, then died at 6 min.
            r("n2", 0, 3 * MIN, false),
            r("n2", 0, 6 * MIN, false),
            // n3 saw the end, a little earlier than n1.
            r("n3", 0, 10 * MIN - 20, true),
        ]);
        assert_eq!(spans["n1"], (0, 10 * MIN));
        assert_eq!(spans["n2"], (0, 10 * MIN));
        assert_eq!(spans["n3"], (0, 10 * MIN - 20));
        // A job still running (or whose agents all died): the last sample any node saw.
        let spans = node_spans([r("n1", 0, 4 * MIN, false), r("n2", 0, 5 * MIN, false)]);
        assert_eq!(spans["n1"], (0, 5 * MIN));
        assert_eq!(spans["n2"], (0, 5 * MIN));
    }

    #[test]
    fn time_axis_says_the_date_once_in_utc() {
        // 2026-11-22T12:00:10.345Z to 12:03:21Z.
        let t = 1_795_348_800_000;
        let (ticks, title) = time_axis(t + 10_345, t + 3 * MIN + 21_000);
        assert_eq!(title, "time (UTC), 2026-11-22");
        let labels: Vec<&str> = ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["12:01", "12:02", "12:03"]);
        let (ticks, title) = time_axis(t, t + 20_000);
        assert_eq!(title, "time (UTC), 2026-11-22");
        assert_eq!(ticks[1].1, "12:00:05");
        let (ticks, title) = time_axis(t, t + 3 * 86_400_000);
        assert_eq!(title, "time (UTC), 2026-11-22 to 2026-11-25");
        assert_eq!(ticks[0].1, "11-22 12:00");
    }

    #[test]
    fn markdown_has_the_numbers_and_the_method() {
        let p = Prices {
            pue: 1.2,
            price_per_kwh: None,
            currency: "EUR".into(),
            co2_g_per_kwh: Some(250.0),
        };
        let m = markdown(&data(), &p, "job-7.svg", "nodewatt");
        assert!(m.starts_with("# Energy report: job 7 (project proj-a)\n"));
        assert!(m.contains("| GPU | 0.700000 | 2520000.000 |"), "{m}");
        assert!(
            m.contains("| **IT equipment, measured** | **0.800000** |"),
            "{m}"
        );
        assert!(m.contains("| Facility (× PUE 1.2) | 0.960000 |"), "{m}");
        assert!(m.contains("240.000 g CO2e"), "{m}");
        assert!(
            m.contains("| Period (UTC) | 1970-01-01T00:00:00Z to 1970-01-01T01:00:00Z (1h) |"),
            "{m}"
        );
        assert!(m.contains("| GPU time | 2.000 GPU-hours |"), "{m}");
        assert!(m.contains("| CPU time | 0.000 core-hours |"), "{m}");
        assert!(m.contains("| GPU models | NVIDIA H100 80GB HBM3 |"));
        assert!(m.contains("![Power by device class](job-7.svg)"));
        assert!(m.contains("the power attributed to job 7 itself"), "{m}");
        assert!(m.contains("mean power (W) over each 1m"), "{m}");
        assert!(m.contains("## How this was measured"));
        assert!(
            m.contains("| Tensor-active GPU time | 0.500 | GPU-hours | 25.0 % of GPU time |"),
            "{m}"
        );
        assert!(m.contains("| GPU energy per tensor-active GPU-hour | 1.400000 | kWh/GPU-hour | |"));
        assert!(m.contains(
            "| GPU energy while the GPU ran nothing | 0.070000 | kWh | 10.0 % of GPU energy |"
        ));
        assert!(m.contains(
            "| GPU energy while power- or thermal-capped | 0.000000 | kWh | 0.0 % of GPU energy |"
        ));
        let mut none = data();
        none.efficiency = Efficiency::default();
        none.sums = Sums::default();
        let m = markdown(&none, &p, "c.svg", "nodewatt");
        assert!(m.contains(
            "| GPU energy per tensor-active GPU-hour | - (no tensor activity measured) | kWh/GPU-hour | |"
        ));
        assert!(
            m.contains("| Tensor-active GPU time | 0.000 | GPU-hours | - of GPU time |"),
            "{m}"
        );
        // Every table's header names its columns; a table's unit is in its header or
        // its own column.
        for header in m
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| |"))
        {
            let next = m.lines().skip_while(|l| *l != header).nth(1).unwrap_or("");
            if next.starts_with("|---") {
                assert!(
                    header.contains('(') || header.contains("unit"),
                    "no unit: {header}"
                );
            }
        }
    }

    #[test]
    fn a_shared_or_empty_job_chart_says_so() {
        let mut d = data();
        d.series.drawn = Drawn::Owner {
            job: "7".into(),
            project: "proj-a".into(),
            user: "alice".into(),
            most: Some(3),
        };
        let p = Prices {
            pue: 1.0,
            price_per_kwh: None,
            currency: "EUR".into(),
            co2_g_per_kwh: None,
        };
        let m = markdown(&d, &p, "c.svg", "nodewatt");
        assert!(m.contains("**This chart is not job 7 alone**"), "{m}");
        assert!(m.contains("(up to 3 at once)"), "{m}");
        let s = svg(&d.series);
        assert!(
            s.contains("not job 7 alone: up to 3 of their jobs at once"),
            "{s}"
        );
        d.series.drawn = Drawn::Owner {
            job: "7".into(),
            project: "proj-a".into(),
            user: "alice".into(),
            most: None,
        };
        assert!(markdown(&d, &p, "c.svg", "db").contains("cannot be told apart"));
        d.series.drawn = Drawn::NoUsage("7".into());
        d.series.steps.clear();
        assert!(markdown(&d, &p, "c.svg", "db").contains("No usage points are stored"));
        assert!(svg(&d.series).contains("no usage points stored"));
        // Names from the database stay text.
        d.series.drawn = Drawn::Project("a<b&c".into());
        assert!(svg(&d.series).contains("Project a&lt;b&amp;c"));
    }

    #[test]
    fn round_axis_maxima() {
        assert_eq!(nice_ceiling(330.0), 500.0);
        assert_eq!(nice_ceiling(199.0), 200.0);
        assert_eq!(nice_ceiling(2400.0), 2500.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }

    #[test]
    fn svg_draws_every_class_over_the_series_span() {
        let d = data();
        let s = svg(&d.series);
        assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert_eq!(s.matches("<polyline").count(), 4);
        for c in ["GPU", "CPU", "DRAM (0 W)", "Other (0 W)"] {
            assert!(s.contains(&format!(">{c}</text>")), "{c}");
        }
        assert!(s.contains("data-from-ms=\"0\" data-to-ms=\"3600000\" data-max-w=\"1000\""));
        assert!(s.contains(">Job 7: its attributed power by device class</text>"));
        assert!(s.contains(">time (UTC), 1970-01-01</text>"), "{s}");
        assert!(s.contains(">power (W)</text>"));
        // Steps: level over each span, from the span's start (x 64) on.
        let plot_w = 800.0 - 64.0 - 130.0;
        let x = |ms: f64| 64.0 + ms / 3_600_000.0 * plot_w;
        let gpu = format!(
            "points=\"64.0,{:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1}\"",
            52.0 + 252.0 * 0.3,
            x(60_000.0),
            52.0 + 252.0 * 0.3,
            x(60_000.0),
            52.0 + 252.0 * 0.35,
            x(120_000.0),
            52.0 + 252.0 * 0.35
        );
        assert!(s.contains(&gpu), "{gpu}\n{s}");
        assert!(s.trim_end().ends_with("</svg>"));
        // An empty series still renders.
        assert!(svg(&Series::default()).contains("</svg>"));
        // A step without data is a shaded gap between two lines per class, said in the
        // legend, and sets no scale.
        let mut gap = d.series.clone();
        gap.steps.insert(
            1,
            Step {
                from_ms: 60_000,
                to_ms: 90_000,
                w: None,
            },
        );
        gap.steps[2].from_ms = 90_000;
        let s = svg(&gap);
        assert_eq!(s.matches("<polyline").count(), 8, "{s}");
        assert_eq!(s.matches("<rect class=\"gap\"").count(), 1, "{s}");
        assert!(
            s.contains(&format!(
                "<rect class=\"gap\" x=\"{:.1}\" y=\"52\" width=\"{:.1}\"",
                x(60_000.0),
                x(90_000.0) - x(60_000.0)
            )),
            "{s}"
        );
        assert!(s.contains(">no data</text>"), "{s}");
        assert!(s.contains("data-max-w=\"1000\""), "{s}");
        assert!(!svg(&d.series).contains("no data"));
        let p = Prices {
            pue: 1.0,
            price_per_kwh: None,
            currency: "EUR".into(),
            co2_g_per_kwh: None,
        };
        let m = markdown(&ReportData { series: gap, ..d }, &p, "c.svg", "db");
        assert!(
            m.contains("A gap in the chart (shaded, \"no data\")"),
            "{m}"
        );
    }
}
