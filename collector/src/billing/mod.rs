//! `nodewatt-collector usage`: energy, GPU-hours and CPU core-hours per project, user,
//! node or job over a period, read from InfluxDB with InfluxQL, with cost and CO2e.
//!
//! A period (from, to] sums the additive `usage` records whose timestamp lies in it;
//! each record covers the span just before its timestamp, so consecutive periods bill
//! every joule exactly once. `--by job` reads `job_total`: whole-job totals of jobs that
//! ran during the period.

pub mod rollup;

use std::fmt::Write as _;

use nodewatt_wire::Project;
use serde::Serialize;

use crate::influx::Influx;
use crate::influxql;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    Project,
    User,
    Job,
    Node,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Clone)]
pub struct Prices {
    pub pue: f64,
    pub price_per_kwh: Option<f64>,
    pub currency: String,
    pub co2_g_per_kwh: Option<f64>,
}

/// Integer sums straight from InfluxDB: the audit trail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sums {
    pub gpu_uj: u64,
    pub cpu_uj: u64,
    pub dram_uj: u64,
    pub other_uj: u64,
    pub gpu_ms: u64,
    pub cpu_us: u64,
}

impl Sums {
    /// Saturates only past 5 million kWh in one row, which [`Sums::checked_add`] refuses
    /// first for sums read from InfluxDB.
    pub fn energy_uj(&self) -> u64 {
        self.gpu_uj
            .saturating_add(self.cpu_uj)
            .saturating_add(self.dram_uj)
            .saturating_add(self.other_uj)
    }

    /// The six sums in [`FIELDS`] order, `get(k)` reading the k-th (the first error is
    /// returned): one place that knows which column is which sum.
    fn from_columns(mut get: impl FnMut(usize) -> Result<u64, String>) -> Result<Sums, String> {
        Ok(Sums {
            gpu_uj: get(0)?,
            cpu_uj: get(1)?,
            dram_uj: get(2)?,
            other_uj: get(3)?,
            gpu_ms: get(4)?,
            cpu_us: get(5)?,
        })
    }

    /// `None` if any sum, or the energy total, would pass u64.
    pub fn checked_add(&self, o: &Sums) -> Option<Sums> {
        let s = Sums {
            gpu_uj: self.gpu_uj.checked_add(o.gpu_uj)?,
            cpu_uj: self.cpu_uj.checked_add(o.cpu_uj)?,
            dram_uj: self.dram_uj.checked_add(o.dram_uj)?,
            other_uj: self.other_uj.checked_add(o.other_uj)?,
            gpu_ms: self.gpu_ms.checked_add(o.gpu_ms)?,
            cpu_us: self.cpu_us.checked_add(o.cpu_us)?,
        };
        s.gpu_uj
            .checked_add(s.cpu_uj)?
            .checked_add(s.dram_uj)?
            .checked_add(s.other_uj)?;
        Some(s)
    }
}

/// One line of the bill. CSV and JSON use these field names, in this order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub key: String,
    pub project: String,
    pub user: String,
    pub energy_uj: u64,
    pub energy_kwh: f64,
    pub gpu_kwh: f64,
    pub cpu_kwh: f64,
    pub dram_kwh: f64,
    pub other_kwh: f64,
    pub gpu_hours: f64,
    pub cpu_core_hours: f64,
    pub pue: f64,
    pub facility_kwh: f64,
    pub cost: Option<f64>,
    pub currency: String,
    pub co2e_kg: Option<f64>,
}

pub const CSV_HEADER: &str = "key,project,user,energy_uj,energy_kwh,gpu_kwh,cpu_kwh,dram_kwh,other_kwh,gpu_hours,cpu_core_hours,pue,facility_kwh,cost,currency,co2e_kg";

const UJ_PER_KWH: f64 = 3.6e12;

pub fn row(key: String, project: String, user: String, s: &Sums, p: &Prices) -> Row {
    let kwh = |uj: u64| uj as f64 / UJ_PER_KWH;
    let energy_kwh = kwh(s.energy_uj());
    let facility_kwh = energy_kwh * p.pue;
    Row {
        key,
        project,
        user,
        energy_uj: s.energy_uj(),
        energy_kwh,
        gpu_kwh: kwh(s.gpu_uj),
        cpu_kwh: kwh(s.cpu_uj),
        dram_kwh: kwh(s.dram_uj),
        other_kwh: kwh(s.other_uj),
        gpu_hours: s.gpu_ms as f64 / 3.6e6,
        cpu_core_hours: s.cpu_us as f64 / 3.6e9,
        pue: p.pue,
        facility_kwh,
        cost: p.price_per_kwh.map(|price| facility_kwh * price),
        currency: p.currency.clone(),
        co2e_kg: p.co2_g_per_kwh.map(|g| facility_kwh * g / 1000.0),
    }
}

/// `2026-11-01` (UTC midnight) or RFC 3339 (`2026-11-01T12:00:00Z`, `...+01:00`), as
/// Unix ms.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = |e: &dyn std::fmt::Display| {
        format!("{s:?} is neither a date (2026-11-01) nor RFC 3339: {e}")
    };
    if !s.is_ascii() {
        return Err(bad(&"only ASCII characters belong in a time"));
    }
    // humantime reads UTC only; a numeric offset is applied here.
    let (base, offset_s) = match s.len().checked_sub(6).map(|i| s.split_at(i)) {
        Some((head, off))
            if head.contains('T') && (off.starts_with('+') || off.starts_with('-')) =>
        {
            let h: i64 = off[1..3].parse().map_err(|e| bad(&e))?;
            let m: i64 = off[4..6].parse().map_err(|e| bad(&e))?;
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (format!("{head}Z"), sign * (h * 3600 + m * 60))
        }
        _ if s.len() == 10 && s.as_bytes().get(4) == Some(&b'-') => (format!("{s}T00:00:00Z"), 0),
        _ => (s.to_string(), 0),
    };
    let t = humantime::parse_rfc3339_weak(&base).map_err(|e| bad(&e))?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?
        .as_millis() as i64;
    u64::try_from(ms - offset_s * 1000).map_err(|_| format!("{s:?} is before 1970"))
}

/// The six integer fields a bill sums, and the names their sums get in answers.
const FIELDS: [(&str, &str); 6] = [
    ("energy_gpu_uj", "gpu_uj"),
    ("energy_cpu_uj", "cpu_uj"),
    ("energy_dram_uj", "dram_uj"),
    ("energy_other_uj", "other_uj"),
    ("gpu_ms", "gpu_ms"),
    ("cpu_us", "cpu_us"),
];

/// How `usage` and `report` read InfluxDB: the `[billing]` section of the collector
/// config (`max_job_length`, `query_parallelism`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// `--by job` reads the `job_total` points dated after `from - max_job_ms`. A job's
    /// point is dated at its start (or its agent run's), so a job that ran longer than
    /// this before the period began is not found; everything else is, without reading
    /// all history.
    pub max_job_ms: u64,
    /// The six sums of `--by project|user|node` are asked for in this many requests at
    /// once (1 to 6): InfluxDB 1.x answers one request on one core, so a bill in six
    /// requests can use six.
    pub parallel: usize,
    /// Whole hours are read from hourly rollups where one is usable ([`rollup`]).
    pub rollups: bool,
    /// How long after the last write into an hour its rollup must have been read.
    pub settle_ms: u64,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            max_job_ms: 31 * 86_400_000,
            parallel: 6,
            rollups: true,
            settle_ms: 600_000,
        }
    }
}

fn group_tags(by: By) -> &'static [&'static str] {
    match by {
        By::Project => &["project"],
        By::User => &["user"],
        By::Node => &["node"],
        By::Job => &["job", "project", "user"],
    }
}

/// The tags a usage query groups by: those of the bill, and the node.
fn group_with_node(tags: &[&'static str]) -> Vec<&'static str> {
    let mut all = tags.to_vec();
    if !all.contains(&"node") {
        all.push("node");
    }
    all
}

/// The InfluxQL statements of a bill, to be run concurrently.
///
/// `--by project|user|node` sums `usage` per group and node: InfluxDB sums integers in
/// signed 64 bits and wraps silently, so each series is summed per node (a node draws at
/// most its physics bound, far below 2^63 µJ over any period a bill covers) and the nodes
/// are added here with checked arithmetic. The six sums are split over `plan.parallel`
/// statements (each a request of its own); a statement costs InfluxDB about the same per
/// field whatever else it asks, so the parts add up to one statement's work.
///
/// `--by job` reads the `job_total` points themselves, with their tags as columns, and
/// adds them up here: each point is one job's total on one node. Summing them in InfluxDB
/// grouped by job took it 7 times the CPU time (one group per job and node).
pub fn queries(
    by: By,
    from_ms: u64,
    to_ms: u64,
    project: Option<&Project>,
    plan: &Plan,
) -> Vec<String> {
    let filter = project.map_or(String::new(), |p| {
        format!(" AND {}", influxql::eq("project", p))
    });
    if by == By::Job {
        let columns: Vec<String> = ["job", "project", "user", "node"]
            .iter()
            .chain(FIELDS.iter().map(|(f, _)| f))
            .map(|c| influxql::ident(c))
            .collect();
        let since = from_ms.saturating_sub(plan.max_job_ms);
        return vec![format!(
            "SELECT {} FROM \"job_total\" WHERE time > {since}ms AND time <= {to_ms}ms AND \"until_ms\" > {from_ms}{filter}",
            columns.join(", ")
        )];
    }
    usage_queries(group_tags(by), from_ms, to_ms, &filter, plan.parallel)
}

/// `SELECT SUM(...) ... FROM "usage"` over (from, to], grouped by `tags` and node, the
/// six sums split over `parallel` statements.
fn usage_queries(
    tags: &[&'static str],
    from_ms: u64,
    to_ms: u64,
    filter: &str,
    parallel: usize,
) -> Vec<String> {
    let group = group_with_node(tags)
        .iter()
        .map(|t| influxql::ident(t))
        .collect::<Vec<_>>()
        .join(", ");
    // `parallel` parts of near-equal size (4 parts: 2, 1, 2, 1 sums).
    let parts = parallel.clamp(1, FIELDS.len());
    (0..parts)
        .map(|i| &FIELDS[i * FIELDS.len() / parts..(i + 1) * FIELDS.len() / parts])
        .map(|part| {
            let sums = part
                .iter()
                .map(|(f, alias)| format!("SUM({}) AS {alias}", influxql::ident(f)))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "SELECT {sums} FROM \"usage\" WHERE time > {from_ms}ms AND time <= {to_ms}ms{filter} GROUP BY {group}"
            )
        })
        .collect()
}

/// An answer that ended unfinished would be a wrong bill. A whole answer that says
/// `partial` is asked for again in chunks, which `max-row-limit` does not cut
/// (`Influx::query`); what is still `partial` after that never got its last part.
pub(crate) fn complete(v: &serde_json::Value) -> Result<(), String> {
    let cut = crate::influx::has_partial(v);
    if cut {
        return Err(
            "InfluxDB's answer ended unfinished (partial): a bill from it would be short; \
             try again, or bill a shorter period"
                .into(),
        );
    }
    Ok(())
}

/// The column names of one series of an answer.
pub(crate) fn columns(series: &serde_json::Value) -> Result<Vec<&str>, String> {
    Ok(series["columns"]
        .as_array()
        .ok_or("InfluxDB answer without columns")?
        .iter()
        .filter_map(|c| c.as_str())
        .collect())
}

/// A stored count: a non-negative integer, or null (0).
pub(crate) fn count(
    x: &serde_json::Value,
    col: &str,
    what: &dyn Fn() -> String,
) -> Result<u64, String> {
    match x {
        serde_json::Value::Null => Ok(0),
        x => x.as_u64().ok_or_else(|| {
            format!(
                "{col} for {} is {x}, not a count: a sum past InfluxDB's 64-bit integers \
                 (bill a shorter period), or a value written by something other than the \
                 collector (inspect that series)",
                what()
            )
        }),
    }
}

/// Sums per group from an InfluxQL answer, keyed by the group's tags in `by` order.
/// Series come back in no stable order, so they are sorted. A negative or fractional
/// sum (InfluxDB's 64-bit sum wrapped) and a total past u64 are errors naming the
/// series, never a wrong bill.
pub fn parse_answer(v: &serde_json::Value, by: By) -> Result<Vec<(Vec<String>, Sums)>, String> {
    let mut groups = Default::default();
    add_sums(&mut groups, v, group_tags(by), true)?;
    Ok(groups.into_iter().collect())
}

type Groups = std::collections::BTreeMap<Vec<String>, Sums>;

/// Adds the sums of one answer to `groups`, keyed by `tags`. With `all_columns`, every
/// one of the six sums must be in the answer; otherwise (one part of a split query)
/// those present are added and the others count 0.
fn add_sums(
    groups: &mut Groups,
    v: &serde_json::Value,
    tags: &[&'static str],
    all_columns: bool,
) -> Result<(), String> {
    complete(v)?;
    for series in v["results"][0]["series"].as_array().into_iter().flatten() {
        let cols = columns(series)?;
        let tag = |t: &str| series["tags"][t].as_str().unwrap_or_default().to_string();
        let name = || {
            group_with_node(tags)
                .iter()
                .map(|t| format!("{t}={}", tag(t)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        for row in series["values"].as_array().into_iter().flatten() {
            let get = |col: &str| -> Result<u64, String> {
                match cols.iter().position(|c| *c == col) {
                    Some(i) => count(&row[i], col, &name),
                    None if all_columns => Err(format!("InfluxDB answer without column {col}")),
                    None => Ok(0),
                }
            };
            let sums = Sums::from_columns(|k| get(FIELDS[k].1))?;
            let key: Vec<String> = tags.iter().map(|t| tag(t)).collect();
            add_to(groups, key, &sums)?;
        }
    }
    Ok(())
}

/// Adds `sums` to the group's total; the first row too goes through the check that the
/// energy of its classes together fits.
fn add_to(groups: &mut Groups, key: Vec<String>, sums: &Sums) -> Result<(), String> {
    let total = groups.get(&key).copied().unwrap_or_default();
    let Some(sum) = total.checked_add(sums) else {
        return Err(format!(
            "the total for {} passes 2^64 µJ; bill a shorter period",
            key.join(" ")
        ));
    };
    groups.insert(key, sum);
    Ok(())
}

/// Job totals from the `job_total` points of [`queries`]' `--by job` statement, added up
/// per (job, project, user): a job's points on several nodes, and after agent restarts.
pub fn parse_jobs(v: &serde_json::Value) -> Result<Vec<(Vec<String>, Sums)>, String> {
    complete(v)?;
    let mut groups = Groups::new();
    for series in v["results"][0]["series"].as_array().into_iter().flatten() {
        let cols = columns(series)?;
        let at = |col: &str| {
            cols.iter()
                .position(|c| *c == col)
                .ok_or(format!("InfluxDB answer without column {col}"))
        };
        let tag_cols = [at("job")?, at("project")?, at("user")?, at("node")?];
        let field_cols: Vec<(usize, &str)> = FIELDS
            .iter()
            .map(|(f, _)| at(f).map(|i| (i, *f)))
            .collect::<Result<_, _>>()?;
        for row in series["values"].as_array().into_iter().flatten() {
            let text = |i: usize| row[i].as_str().unwrap_or_default().to_string();
            let name = || {
                format!(
                    "job={} project={} user={} node={}",
                    text(tag_cols[0]),
                    text(tag_cols[1]),
                    text(tag_cols[2]),
                    text(tag_cols[3])
                )
            };
            let sums = Sums::from_columns(|k| {
                let (i, f) = field_cols[k];
                count(&row[i], f, &name)
            })?;
            let key = vec![text(tag_cols[0]), text(tag_cols[1]), text(tag_cols[2])];
            add_to(&mut groups, key, &sums)?;
        }
    }
    Ok(groups.into_iter().collect())
}

/// Table rows of the groups, ordered by their key naturally
/// ([`nodewatt_common::natural_cmp`]).
pub fn rows(groups: &[(Vec<String>, Sums)], by: By, p: &Prices) -> Vec<Row> {
    let mut groups: Vec<&(Vec<String>, Sums)> = groups.iter().collect();
    groups.sort_by(|(a, _), (b, _)| {
        a.iter()
            .zip(b)
            .map(|(a, b)| nodewatt_common::natural_cmp(a, b))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    groups
        .into_iter()
        .map(|(k, s)| {
            let (key, project, user) = match by {
                By::Job => (k[0].clone(), k[1].clone(), k[2].clone()),
                By::Project => (k[0].clone(), k[0].clone(), String::new()),
                By::User => (k[0].clone(), String::new(), k[0].clone()),
                By::Node => (k[0].clone(), String::new(), String::new()),
            };
            row(key, project, user, s, p)
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or(String::new(), |x| format!("{x:.digits$}"))
}

pub fn render(rows: &[Row], by: By, format: Format, p: &Prices) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).expect("rows serialise") + "\n",
        Format::Csv => {
            // Through the csv crate: a name with a comma or quote stays one field.
            let mut w = csv::Writer::from_writer(Vec::new());
            let mut write = |rec: &[String]| w.write_record(rec).expect("writing to memory");
            write(
                &CSV_HEADER
                    .split(',')
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            );
            for r in rows {
                write(&[
                    r.key.clone(),
                    r.project.clone(),
                    r.user.clone(),
                    r.energy_uj.to_string(),
                    format!("{:.9}", r.energy_kwh),
                    format!("{:.9}", r.gpu_kwh),
                    format!("{:.9}", r.cpu_kwh),
                    format!("{:.9}", r.dram_kwh),
                    format!("{:.9}", r.other_kwh),
                    format!("{:.6}", r.gpu_hours),
                    format!("{:.6}", r.cpu_core_hours),
                    r.pue.to_string(),
                    format!("{:.9}", r.facility_kwh),
                    opt(r.cost, 6),
                    r.currency.clone(),
                    opt(r.co2e_kg, 6),
                ]);
            }
            String::from_utf8(w.into_inner().expect("writing to memory")).expect("UTF-8 fields")
        }
        Format::Table => {
            // Two header lines, names then units, so every column says what it counts in.
            let cost_unit = format!("({})", p.currency);
            let head: [(&str, &str, usize); 9] = [
                ("IT energy", "(kWh)", 12),
                ("GPU", "(kWh)", 10),
                ("CPU", "(kWh)", 10),
                ("DRAM", "(kWh)", 10),
                ("other", "(kWh)", 10),
                ("GPU time", "(h)", 10),
                ("CPU time", "(core-h)", 10),
                ("cost", &cost_unit, 12),
                ("CO2e", "(kg)", 10),
            ];
            let mut out = String::new();
            for line in 0..2 {
                let first = if line == 0 { key_name(by) } else { "" };
                let _ = write!(out, "{first:<16}");
                for (name, unit, width) in head {
                    let _ = write!(out, " {:>width$}", if line == 0 { name } else { unit });
                }
                out.push('\n');
            }
            let mut total = Sums::default();
            let total_add = |t: &mut Sums, o: &Sums| *t = t.checked_add(o).unwrap_or(*t);
            let mut line = |name: &str, r: &Row| {
                let _ = writeln!(
                    out,
                    "{name:<16} {:>12.6} {:>10.6} {:>10.6} {:>10.6} {:>10.6} {:>10.3} {:>10.3} {:>12} {:>10}",
                    r.energy_kwh, r.gpu_kwh, r.cpu_kwh, r.dram_kwh, r.other_kwh, r.gpu_hours,
                    r.cpu_core_hours, opt(r.cost, 2), opt(r.co2e_kg, 3)
                );
            };
            for r in rows {
                line(&r.key, r);
            }
            for r in rows {
                total_add(
                    &mut total,
                    &Sums {
                        gpu_uj: (r.gpu_kwh * UJ_PER_KWH).round() as u64,
                        cpu_uj: (r.cpu_kwh * UJ_PER_KWH).round() as u64,
                        dram_uj: (r.dram_kwh * UJ_PER_KWH).round() as u64,
                        other_uj: (r.other_kwh * UJ_PER_KWH).round() as u64,
                        gpu_ms: (r.gpu_hours * 3.6e6).round() as u64,
                        cpu_us: (r.cpu_core_hours * 3.6e9).round() as u64,
                    },
                );
            }
            let t = row("TOTAL".into(), String::new(), String::new(), &total, p);
            line("TOTAL", &t);
            out
        }
    }
}

fn key_name(by: By) -> &'static str {
    match by {
        By::Project => "project",
        By::User => "user",
        By::Node => "node",
        By::Job => "job",
    }
}

/// What a bill covers: printed with it, and all that an empty bill can say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub by: By,
    pub from_ms: u64,
    pub to_ms: u64,
    /// `--project`.
    pub project: Option<Project>,
}

impl Scope {
    pub fn new(by: By, from_ms: u64, to_ms: u64, project: Option<Project>) -> Scope {
        Scope {
            by,
            from_ms,
            to_ms,
            project,
        }
    }

    /// `(from, to] (UTC)`, and the filter.
    fn period(&self) -> String {
        let mut s = format!(
            "({}, {}] (UTC)",
            crate::report::fmt_time(self.from_ms),
            crate::report::fmt_time(self.to_ms)
        );
        if let Some(p) = &self.project {
            let _ = write!(s, " for project {p}");
        }
        s
    }
}

/// A bill as printed: `out` for stdout (the table, CSV or JSON), `note` for stderr (what
/// a person should read beside machine output; empty when there is nothing to say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Printed {
    pub out: String,
    pub note: String,
}

/// The bill of `rows`: an empty one says so and what to check (in the table, or on
/// stderr beside a CSV header or `[]`, which scripts read as an empty bill); a table
/// ends with its period, how cost and CO2e are reckoned, and why a class is 0 for every
/// row charged.
pub fn present(rows: &[Row], format: Format, p: &Prices, scope: &Scope) -> Printed {
    let out = render(rows, scope.by, format, p);
    match (rows.is_empty(), format) {
        (true, Format::Table) => Printed {
            out: empty_hint(scope),
            note: String::new(),
        },
        (true, _) => Printed {
            out,
            note: empty_hint(scope),
        },
        (false, Format::Table) => Printed {
            out: out + &footnotes(rows, p, scope),
            note: String::new(),
        },
        (false, _) => Printed {
            out,
            note: String::new(),
        },
    }
}

/// [`present`] to stdout and stderr.
pub fn print(rows: &[Row], format: Format, p: &Prices, scope: &Scope) {
    let b = present(rows, format, p, scope);
    print!("{}", b.out);
    eprint!("{}", b.note);
}

/// What an empty bill says: nothing recorded, for which period and filter, and where to
/// look. An empty period is a valid bill (a month nothing ran), not an error.
fn empty_hint(scope: &Scope) -> String {
    let what = match scope.by {
        By::Job => "No job totals of jobs that ran in",
        _ => "No usage recorded in",
    };
    let mut s = format!("{what} {}.\nCheck:\n", scope.period());
    s.push_str(
        "- the period: FROM is excluded and TO included, both in UTC (a date is its UTC \
         midnight);\n",
    );
    if scope.project.is_some() {
        s.push_str(
            "- the project's name: `nodewatt-collector usage --by project` over the period \
             lists every project billed;\n",
        );
    }
    if scope.by == By::Job {
        s.push_str(
            "- jobs that started more than [billing] max_job_length before FROM are not \
             found (docs/billing.md);\n",
        );
    }
    s.push_str(
        "- whether any node reported in it: `nodewatt-collector usage --by node` over the \
         period (an empty answer: no agent's usage reached this database).\n",
    );
    s
}

/// The table's footer: the period, how cost and CO2e follow from the energy, and
/// [`zero_notes`].
fn footnotes(rows: &[Row], p: &Prices, scope: &Scope) -> String {
    let mut s = format!("\nPeriod {}", scope.period());
    if scope.by == By::Job {
        s.push_str(": whole-job totals of the jobs that ran in it");
    }
    let _ = write!(
        s,
        ".\nIT energy is measured; facility energy = IT energy x PUE {}",
        p.pue
    );
    match p.price_per_kwh {
        Some(price) => {
            let _ = write!(s, "; cost = facility kWh x {price} {}/kWh", p.currency);
        }
        None => s.push_str("; no price set (--price-per-kwh, [billing] price_per_kwh)"),
    }
    match p.co2_g_per_kwh {
        Some(g) => {
            let _ = write!(s, "; CO2e = facility kWh x {g} g/kWh");
        }
        None => s.push_str("; no grid intensity set (--co2-g-per-kwh)"),
    }
    s.push_str(".\n");
    for note in zero_notes(rows, scope) {
        let _ = writeln!(s, "* {note}");
    }
    s
}

/// Rows that bill nobody: what no job used (`_idle`) or no known job (`_unattributed`);
/// by user both are `_none`.
fn charges_nobody(r: &Row, by: By) -> bool {
    match by {
        By::Project => {
            r.key == nodewatt_wire::IDLE_PROJECT || r.key == nodewatt_wire::UNATTRIBUTED_PROJECT
        }
        By::User => r.key == crate::lineproto::NO_USER,
        By::Job | By::Node => false,
    }
}

/// Why an energy class is 0 for every row that bills someone, as the agent attributes
/// it (docs/billing.md): a GPU's energy goes to the job holding it; CPU package, DRAM and
/// other energy are shared by the jobs' cgroup CPU time (`cpu_us`, 0 for `_idle`), so
/// without any job's CPU time no job gets any.
pub fn zero_notes(rows: &[Row], scope: &Scope) -> Vec<String> {
    let by = scope.by;
    let charged: Vec<&Row> = rows.iter().filter(|r| !charges_nobody(r, by)).collect();
    if charged.is_empty() {
        return Vec::new();
    }
    // Only then is a class 0 in every row 0 on the nodes: nothing was measured.
    let whole = scope.project.is_none() && by != By::Job;
    let class = |r: &Row, c: usize| [r.gpu_kwh, r.cpu_kwh, r.dram_kwh, r.other_kwh][c];
    let zero = |rows: &[&Row], c: usize| rows.iter().all(|r| class(r, c) == 0.0);
    let all: Vec<&Row> = rows.iter().collect();
    let mut others: Vec<&str> = rows
        .iter()
        .filter(|r| charges_nobody(r, by))
        .map(|r| r.key.as_str())
        .collect();
    others.dedup();
    let every = match others.is_empty() {
        true => format!("every {}", key_name(by)),
        false => format!("every {} but {}", key_name(by), others.join(" and ")),
    };
    let mut notes = Vec::new();
    if zero(&charged, 0) {
        let why = if whole && zero(&all, 0) && all.iter().all(|r| r.gpu_hours == 0.0) {
            "no GPU was reported on these nodes (no NVIDIA GPU, or [nvml] off)"
        } else if charged.iter().all(|r| r.gpu_hours == 0.0) {
            "no job held a GPU (no GPUs in the jobs' registry files)"
        } else {
            "the jobs' GPUs gave no energy readings (NVML's energy counter needs Volta or \
             later; `nodewatt-agent check` says why)"
        };
        notes.push(format!("GPU energy is 0 for {every}: {why}."));
    }
    // CPU, DRAM and other: unmeasured where 0 on every node, else unshared for want of
    // CPU time.
    let names = ["", "CPU", "DRAM", "other"];
    let unmeasured = [
        "",
        "no CPU package energy was read (no RAPL counters: none in most virtual machines, \
         and energy_uj is readable by root only since Linux 5.10)",
        "no RAPL dram domain was read (many AMD CPUs and virtual machines have none)",
        "no node power meter reported (an ACPI power_meter in hwmon), so the rest of the \
         node is not measured",
    ];
    let no_cpu_time = charged.iter().all(|r| r.cpu_core_hours == 0.0);
    let mut unshared = Vec::new();
    for c in 1..4 {
        if !zero(&charged, c) {
            continue;
        }
        if (whole && zero(&all, c)) || !no_cpu_time {
            notes.push(format!(
                "{} energy is 0 for {every}: {}.",
                names[c], unmeasured[c]
            ));
        } else {
            unshared.push(names[c]);
        }
    }
    if !unshared.is_empty() {
        let list = match unshared.as_slice() {
            [a] => a.to_string(),
            [a, b] => format!("{a} and {b}"),
            [a, b, c] => format!("{a}, {b} and {c}"),
            _ => unreachable!("three classes at most"),
        };
        notes.push(format!(
            "{list} energy is 0 for {every}: it is shared among jobs by their cgroup CPU \
             time, and no job's CPU time was measured (the agent found no cgroup of these \
             jobs: [cpu] job_cgroups, docs/sources.md), so all of it went to _idle."
        ));
    }
    notes
}

pub async fn usage(
    influx: &Influx,
    by: By,
    from_ms: u64,
    to_ms: u64,
    project: Option<&Project>,
    plan: &Plan,
) -> Result<Vec<(Vec<String>, Sums)>, String> {
    if from_ms >= to_ms {
        return Err("--from must be before --to".into());
    }
    if by == By::Job {
        let statements = queries(by, from_ms, to_ms, project, plan);
        let answers = join_all(statements.iter().map(|q| influx.query_chunked(q))).await;
        let [answer] = <[_; 1]>::try_from(answers).map_err(|_| "one statement per job bill")?;
        return parse_jobs(&answer?);
    }
    let tags = group_tags(by);
    let mut groups = Groups::new();
    // Rollups hold no node per project, so a project's bill by node reads `usage`.
    let table = rollup::table_for(tags)
        .filter(|t| plan.rollups && (project.is_none() || *t == rollup::BY_OWNER));
    let raw = match table {
        Some(table) => {
            let project = project.map(|p| p.as_str());
            from_rollups(
                influx,
                &mut groups,
                table,
                tags,
                from_ms,
                to_ms,
                project,
                plan,
            )
            .await?
        }
        None => vec![(from_ms, to_ms)],
    };
    let filter = project.map_or(String::new(), |p| {
        format!(" AND {}", influxql::eq("project", p))
    });
    let statements: Vec<String> = raw
        .iter()
        .flat_map(|(a, b)| usage_queries(tags, *a, *b, &filter, plan.parallel))
        .collect();
    // At most `parallel` requests at once, however many ranges are read.
    for wave in statements.chunks(plan.parallel.max(1)) {
        for answer in join_all(wave.iter().map(|q| influx.query(q))).await {
            add_sums(&mut groups, &answer?, tags, false)?;
        }
    }
    Ok(groups.into_iter().collect())
}

/// Adds the usable rollups of (from, to] to `groups`; returns the ranges left to read
/// from `usage`.
#[allow(clippy::too_many_arguments)]
async fn from_rollups(
    influx: &Influx,
    groups: &mut Groups,
    table: &str,
    tags: &[&'static str],
    from_ms: u64,
    to_ms: u64,
    project: Option<&str>,
    plan: &Plan,
) -> Result<Vec<(u64, u64)>, String> {
    let states = rollup::parse_states(&influx.query(&rollup::states_query(from_ms, to_ms)).await?)?;
    let split = rollup::split(from_ms, to_ms, &states, plan.settle_ms);
    let (Some(first), Some(last)) = (split.hours.keys().next(), split.hours.keys().last()) else {
        return Ok(split.raw);
    };
    let v = influx
        .query(&rollup::rows_query(table, first - rollup::HOUR_MS, *last))
        .await?;
    let bad = rollup::add_rows(groups, &v, table, tags, project, &split.hours)?;
    if bad.is_empty() {
        return Ok(split.raw);
    }
    tracing::warn!(
        hours = bad.len(),
        "rollups whose rows do not match their state (two rollups at once?); those hours are read from usage"
    );
    let mut all: Vec<(u64, u64)> = split.raw;
    all.extend(bad.iter().map(|h| (h - rollup::HOUR_MS, *h)));
    all.sort_unstable();
    let mut raw = Vec::with_capacity(all.len());
    for (a, b) in all {
        rollup::push_range(&mut raw, a, b);
    }
    Ok(raw)
}

/// Sums of `usage` per (user, node) of one project over (from, to]: a project report's
/// users, nodes and totals from one grouped query.
pub async fn project_detail(
    influx: &Influx,
    from_ms: u64,
    to_ms: u64,
    project: &Project,
    plan: &Plan,
) -> Result<Vec<(Vec<String>, Sums)>, String> {
    if from_ms >= to_ms {
        return Err("--from must be before --to".into());
    }
    let filter = format!(" AND {}", influxql::eq("project", project));
    let tags: &[&'static str] = &["user", "node"];
    let statements = usage_queries(tags, from_ms, to_ms, &filter, plan.parallel);
    let mut groups = Groups::new();
    for answer in join_all(statements.iter().map(|q| influx.query(q))).await {
        add_sums(&mut groups, &answer?, tags, false)?;
    }
    Ok(groups.into_iter().collect())
}

/// Runs futures concurrently on the current task and returns their outputs in order
/// (the requests of one bill; no runtime threads needed).
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_rows_in_natural_order() {
        let key = |id: &str| {
            (
                vec![id.to_string(), "p".into(), "u".into()],
                Sums::default(),
            )
        };
        let groups = [key("10"), key("2"), key("1")];
        let keys: Vec<String> = rows(&groups, By::Job, &prices())
            .into_iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, ["1", "2", "10"], "`usage --by job` in job order");
    }

    fn prices() -> Prices {
        Prices {
            pue: 1.25,
            price_per_kwh: Some(0.2),
            currency: "EUR".into(),
            co2_g_per_kwh: Some(400.0),
        }
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-02").unwrap(), 86_400_000);
        assert_eq!(
            parse_time("2026-11-01T00:00:00Z").unwrap(),
            1_793_491_200_000
        );
        assert_eq!(
            parse_time("2026-11-01T01:00:00+01:00").unwrap(),
            1_793_491_200_000
        );
        assert_eq!(
            parse_time("2026-10-31T19:00:00-05:00").unwrap(),
            1_793_491_200_000
        );
        assert!(parse_time("last month").is_err());
        assert!(parse_time("2026-11-01T00:00:00+xx:00").is_err());
    }

    #[test]
    fn queries_split_the_sums_and_bound_job_totals() {
        let p: Project = "p-1".parse().unwrap();
        let one = Plan {
            parallel: 1,
            ..Plan::default()
        };
        assert_eq!(
            queries(By::Project, 1, 2, Some(&p), &one),
            ["SELECT SUM(\"energy_gpu_uj\") AS gpu_uj, SUM(\"energy_cpu_uj\") AS cpu_uj, SUM(\"energy_dram_uj\") AS dram_uj, SUM(\"energy_other_uj\") AS other_uj, SUM(\"gpu_ms\") AS gpu_ms, SUM(\"cpu_us\") AS cpu_us FROM \"usage\" WHERE time > 1ms AND time <= 2ms AND \"project\" = 'p-1' GROUP BY \"project\", \"node\""]
        );
        let two = queries(
            By::User,
            1,
            2,
            None,
            &Plan {
                parallel: 2,
                ..Plan::default()
            },
        );
        assert_eq!(two.len(), 2);
        assert!(two[0].starts_with("SELECT SUM(\"energy_gpu_uj\") AS gpu_uj, SUM(\"energy_cpu_uj\") AS cpu_uj, SUM(\"energy_dram_uj\") AS dram_uj FROM"));
        assert!(two[1].starts_with("SELECT SUM(\"energy_other_uj\") AS other_uj, SUM(\"gpu_ms\") AS gpu_ms, SUM(\"cpu_us\") AS cpu_us FROM"));
        assert!(two
            .iter()
            .all(|q| q.ends_with("GROUP BY \"user\", \"node\"")));
        // As many requests as asked for, the sums spread evenly over them.
        for (parallel, sizes) in [
            (4, vec![1, 2, 1, 2]),
            (5, vec![1, 1, 1, 1, 2]),
            (3, vec![2, 2, 2]),
        ] {
            let parts = queries(
                By::Project,
                1,
                2,
                None,
                &Plan {
                    parallel,
                    ..Plan::default()
                },
            );
            let got: Vec<usize> = parts.iter().map(|q| q.matches("SUM(").count()).collect();
            assert_eq!(got, sizes, "query_parallelism = {parallel}");
        }
        let six = queries(By::Node, 1, 2, None, &Plan::default());
        assert_eq!(six.len(), 6, "one request per sum by default");
        assert!(six[5].starts_with("SELECT SUM(\"cpu_us\") AS cpu_us FROM"));
        assert!(six[5].ends_with("GROUP BY \"node\""));
        // Jobs: the points themselves, from max_job before the period.
        let day = 86_400_000;
        let jobs = queries(
            By::Job,
            40 * day,
            41 * day,
            Some(&p),
            &Plan {
                max_job_ms: 31 * day,
                parallel: 2,
                ..Plan::default()
            },
        );
        assert_eq!(
            jobs,
            [format!("SELECT \"job\", \"project\", \"user\", \"node\", \"energy_gpu_uj\", \"energy_cpu_uj\", \"energy_dram_uj\", \"energy_other_uj\", \"gpu_ms\", \"cpu_us\" FROM \"job_total\" WHERE time > {}ms AND time <= {}ms AND \"until_ms\" > {} AND \"project\" = 'p-1'", 9 * day, 41 * day, 40 * day)]
        );
        assert!(queries(By::Job, 5, 9, None, &Plan::default())[0].contains("WHERE time > 0ms AND"));
    }

    #[test]
    fn split_answers_add_up_and_job_points_are_summed_per_job() {
        let part = |cols: &str, vals: &str| -> serde_json::Value {
            serde_json::from_str(&format!(r#"{{"results":[{{"statement_id":0,"series":[
                {{"name":"usage","tags":{{"project":"p","node":"n1"}},"columns":["time",{cols}],"values":[[0,{vals}]]}}
            ]}}]}}"#)).unwrap()
        };
        let mut g = Groups::new();
        add_sums(
            &mut g,
            &part(r#""gpu_uj","cpu_uj""#, "5,6"),
            &["project"],
            false,
        )
        .unwrap();
        add_sums(&mut g, &part(r#""gpu_ms""#, "7"), &["project"], false).unwrap();
        assert_eq!(
            g.into_iter().collect::<Vec<_>>(),
            vec![(
                vec!["p".to_string()],
                Sums {
                    gpu_uj: 5,
                    cpu_uj: 6,
                    gpu_ms: 7,
                    ..Sums::default()
                }
            )]
        );
        let cut: serde_json::Value =
            serde_json::from_str(r#"{"results":[{"statement_id":0,"partial":true,"series":[]}]}"#)
                .unwrap();
        assert!(parse_answer(&cut, By::Project)
            .unwrap_err()
            .contains("unfinished"));
        assert!(parse_jobs(&cut).unwrap_err().contains("unfinished"));
        // A series left unfinished, the result not marked.
        let cut: serde_json::Value = serde_json::from_str(
            r#"{"results":[{"statement_id":0,"series":[{"name":"job_total","columns":["time"],"values":[[1]],"partial":true}]}]}"#,
        )
        .unwrap();
        assert!(parse_jobs(&cut).unwrap_err().contains("unfinished"));
        assert!(parse_answer(&cut, By::Project)
            .unwrap_err()
            .contains("unfinished"));

        // A first row whose classes together pass 2^64 µJ is refused like any sum.
        let mut g = Groups::new();
        let big = Sums {
            gpu_uj: u64::MAX / 2 + 1,
            cpu_uj: u64::MAX / 2 + 1,
            ..Sums::default()
        };
        let err = add_to(&mut g, vec!["p".into()], &big).unwrap_err();
        assert!(err.contains("passes 2^64"), "{err}");
        assert!(g.is_empty());

        let cols = r#""columns":["time","job","project","user","node","energy_gpu_uj","energy_cpu_uj","energy_dram_uj","energy_other_uj","gpu_ms","cpu_us"]"#;
        let jobs: serde_json::Value = serde_json::from_str(&format!(
            r#"{{"results":[{{"statement_id":0,"series":[
            {{"name":"job_total",{cols},"values":[
                [1,"7","p","alice","n1",10,1,0,0,100,5],
                [2,"7","p","alice","n2",20,2,0,null,100,5],
                [3,"8","q","bob","n1",1,1,1,1,1,1]
            ]}}]}}]}}"#
        ))
        .unwrap();
        let totals = parse_jobs(&jobs).unwrap();
        assert_eq!(totals.len(), 2);
        assert_eq!(totals[0].0, ["7", "p", "alice"]);
        assert_eq!(
            totals[0].1,
            Sums {
                gpu_uj: 30,
                cpu_uj: 3,
                gpu_ms: 200,
                cpu_us: 10,
                ..Sums::default()
            }
        );
        let bad: serde_json::Value = serde_json::from_str(&format!(
            r#"{{"results":[{{"statement_id":0,"series":[
            {{"name":"job_total",{cols},"values":[[1,"7","p","alice","n1",-1,0,0,0,0,0]]}}]}}]}}"#
        ))
        .unwrap();
        let e = parse_jobs(&bad).unwrap_err();
        assert!(e.contains("job=7 project=p user=alice node=n1"), "{e}");
        // One job's points on two nodes whose sum passes 2^64: an error naming the job.
        let big = i64::MAX;
        let over: serde_json::Value = serde_json::from_str(&format!(
            r#"{{"results":[{{"statement_id":0,"series":[
            {{"name":"job_total",{cols},"values":[
                [1,"7","p","alice","n1",{big},0,0,0,0,0],
                [2,"7","p","alice","n2",{big},0,0,0,0,0],
                [3,"7","p","alice","n3",{big},0,0,0,0,0]
            ]}}]}}]}}"#
        ))
        .unwrap();
        let e = parse_jobs(&over).unwrap_err();
        assert!(e.contains("7 p alice") && e.contains("2^64"), "{e}");
    }

    #[test]
    fn sums_are_added_per_node_and_a_wrapped_sum_is_an_error_naming_the_series() {
        let cols = r#""columns":["time","gpu_uj","cpu_uj","dram_uj","other_uj","gpu_ms","cpu_us"]"#;
        let answer = |a: &str, b: &str| -> serde_json::Value {
            serde_json::from_str(&format!(r#"{{"results":[{{"statement_id":0,"series":[
                {{"name":"usage","tags":{{"project":"p","node":"n1"}},{cols},"values":[[0,{a},0,0,0,0,0]]}},
                {{"name":"usage","tags":{{"project":"p","node":"n2"}},{cols},"values":[[0,{b},0,0,0,0,0]]}}
            ]}}]}}"#)).unwrap()
        };
        let g = parse_answer(&answer("5", "7"), By::Project).unwrap();
        assert_eq!(
            g,
            vec![(
                vec!["p".to_string()],
                Sums {
                    gpu_uj: 12,
                    ..Sums::default()
                }
            )]
        );
        // Two nodes near 2^63 each: exact in u64, where InfluxDB's one sum would wrap.
        let big = (i64::MAX - 1).to_string();
        let g = parse_answer(&answer(&big, &big), By::Project).unwrap();
        assert_eq!(g[0].1.gpu_uj, 2 * (i64::MAX as u64 - 1));
        let e = parse_answer(&answer("-2", "7"), By::Project).unwrap_err();
        assert!(
            e.contains("gpu_uj") && e.contains("project=p node=n1"),
            "{e}"
        );
        let e = parse_answer(&answer(&big, "9223372036854775807"), By::Project);
        assert!(e.is_ok(), "still below 2^64");
        let e = parse_answer(&answer(&u64::MAX.to_string(), "1"), By::Project).unwrap_err();
        assert!(e.contains("2^64"), "{e}");
    }

    #[test]
    fn csv_fields_are_quoted_where_needed() {
        let mut r = row(
            "a,b".into(),
            "a\"b".into(),
            String::new(),
            &Sums::default(),
            &prices(),
        );
        r.currency = "EUR".into();
        let csv = render(&[r], By::Project, Format::Csv, &prices());
        let line = csv.lines().nth(1).unwrap();
        assert!(line.starts_with("\"a,b\",\"a\"\"b\","), "{line}");
    }

    #[test]
    fn times_are_ascii() {
        assert!(parse_time("2026-11-01T00:00:00+01:0é").is_err());
        assert!(parse_time("ééééééééééé").is_err());
    }

    #[test]
    fn answers_to_rows_with_cost_and_co2() {
        let v: serde_json::Value = serde_json::from_str(r#"{"results":[{"statement_id":0,"series":[
            {"name":"usage","tags":{"project":"b"},"columns":["time","gpu_uj","cpu_uj","dram_uj","other_uj","gpu_ms","cpu_us"],"values":[[0,3600000000000,0,0,0,3600000,0]]},
            {"name":"usage","tags":{"project":"a"},"columns":["time","gpu_uj","cpu_uj","dram_uj","other_uj","gpu_ms","cpu_us"],"values":[[0,7200000000000,3600000000000,null,0,7200000,3600000000]]}
        ]}]}"#).unwrap();
        let groups = parse_answer(&v, By::Project).unwrap();
        assert_eq!(groups[0].0, ["a"], "sorted by key");
        let rows = rows(&groups, By::Project, &prices());
        let a = &rows[0];
        assert_eq!(a.energy_uj, 10_800_000_000_000);
        assert_eq!((a.energy_kwh, a.gpu_kwh, a.cpu_kwh), (3.0, 2.0, 1.0));
        assert_eq!((a.gpu_hours, a.cpu_core_hours), (2.0, 1.0));
        assert_eq!(a.facility_kwh, 3.75);
        assert!((a.cost.unwrap() - 0.75).abs() < 1e-12);
        assert!((a.co2e_kg.unwrap() - 1.5).abs() < 1e-12);

        let csv = render(&rows, By::Project, Format::Csv, &prices());
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some(CSV_HEADER));
        assert_eq!(
            lines.next(),
            Some("a,a,,10800000000000,3.000000000,2.000000000,1.000000000,0.000000000,0.000000000,2.000000,1.000000,1.25,3.750000000,0.750000,EUR,1.500000")
        );
        let json: serde_json::Value =
            serde_json::from_str(&render(&rows, By::Project, Format::Json, &prices())).unwrap();
        assert_eq!(json[1]["key"], "b");
        assert_eq!(json[1]["energy_uj"], 3_600_000_000_000u64);
        let table = render(&rows, By::Project, Format::Table, &prices());
        assert!(
            table.lines().last().unwrap().starts_with("TOTAL"),
            "{table}"
        );
        assert!(table.contains("4.000000"), "total energy in kWh:\n{table}");
    }

    fn scope(by: By, project: Option<&str>) -> Scope {
        let p = project.map(|p| p.parse().unwrap());
        Scope::new(by, 1_793_491_200_000, 1_796_083_200_000, p)
    }

    /// A row of `kwh` of GPU, CPU, DRAM, other, with GPU and CPU time.
    fn kwh_row(key: &str, kwh: [f64; 4], gpu_h: f64, core_h: f64) -> Row {
        let uj = kwh.map(|k| (k * UJ_PER_KWH) as u64);
        let s = Sums {
            gpu_uj: uj[0],
            cpu_uj: uj[1],
            dram_uj: uj[2],
            other_uj: uj[3],
            gpu_ms: (gpu_h * 3.6e6) as u64,
            cpu_us: (core_h * 3.6e9) as u64,
        };
        row(key.into(), key.into(), String::new(), &s, &prices())
    }

    #[test]
    fn every_table_column_has_its_unit_and_the_footer_how_it_was_reckoned() {
        let rows = [kwh_row("a", [1.0, 1.0, 1.0, 1.0], 1.0, 1.0)];
        let b = present(&rows, Format::Table, &prices(), &scope(By::Project, None));
        let mut lines = b.out.lines();
        let names = lines.next().unwrap();
        let units = lines.next().unwrap();
        assert_eq!(
            names.split_whitespace().collect::<Vec<_>>(),
            [
                "project", "IT", "energy", "GPU", "CPU", "DRAM", "other", "GPU", "time", "CPU",
                "time", "cost", "CO2e"
            ]
        );
        assert_eq!(
            units.split_whitespace().collect::<Vec<_>>(),
            ["(kWh)", "(kWh)", "(kWh)", "(kWh)", "(kWh)", "(h)", "(core-h)", "(EUR)", "(kg)"]
        );
        // Each unit sits under its column's name.
        for unit in ["(h)", "(EUR)", "(kg)"] {
            let name = ["GPU time", "cost", "CO2e"][["(h)", "(EUR)", "(kg)"]
                .iter()
                .position(|u| *u == unit)
                .unwrap()];
            assert_eq!(
                units.find(unit).unwrap() + unit.len(),
                names.find(name).unwrap() + name.len(),
                "{names}\n{units}"
            );
        }
        assert!(b.out.contains(
            "\nPeriod (2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z] (UTC).\nIT energy is measured; facility energy = IT energy x PUE 1.25; cost = facility kWh x 0.2 EUR/kWh; CO2e = facility kWh x 400 g/kWh.\n"
        ), "{}", b.out);
        assert_eq!(b.note, "");
        // CSV and JSON stay as they were: no footer.
        let csv = present(&rows, Format::Csv, &prices(), &scope(By::Project, None));
        assert_eq!(csv.out, render(&rows, By::Project, Format::Csv, &prices()));
        assert_eq!(csv.note, "");
    }

    #[test]
    fn an_empty_bill_says_what_was_empty_and_what_to_check() {
        let s = scope(By::Project, Some("proj-x"));
        let t = present(&[], Format::Table, &prices(), &s);
        assert!(t.out.starts_with(
            "No usage recorded in (2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z] (UTC) for project proj-x.\n"
        ), "{}", t.out);
        assert!(t
            .out
            .contains("FROM is excluded and TO included, both in UTC"));
        assert!(t.out.contains("`nodewatt-collector usage --by project`"));
        assert!(t.out.contains("`nodewatt-collector usage --by node`"));
        assert!(!t.out.contains("TOTAL") && t.note.is_empty());
        // Machine formats stay valid (a header, `[]`); the hint goes to stderr.
        let csv = present(&[], Format::Csv, &prices(), &s);
        assert_eq!(csv.out, format!("{CSV_HEADER}\n"));
        assert_eq!(csv.note, t.out);
        let json = present(&[], Format::Json, &prices(), &s);
        assert_eq!(json.out, "[]\n");
        assert_eq!(json.note, t.out);
        let jobs = present(&[], Format::Table, &prices(), &scope(By::Job, None));
        assert!(jobs
            .out
            .starts_with("No job totals of jobs that ran in (2026-11-01T00:00:00Z"));
        assert!(jobs.out.contains("max_job_length"));
        assert!(!jobs.out.contains("--by project"), "no project given");
    }

    #[test]
    fn a_class_zero_for_every_charged_row_says_why() {
        let notes = |rows: &[Row], s: &Scope| zero_notes(rows, s);
        let whole = scope(By::Project, None);
        // The demo: jobs hold GPUs, no job cgroup found, no power meter.
        let demo = [
            kwh_row("climate", [2.0, 0.0, 0.0, 0.0], 4.0, 0.0),
            kwh_row("_idle", [1.0, 3.0, 0.5, 0.0], 4.0, 0.0),
        ];
        assert_eq!(
            notes(&demo, &whole),
            [
                "other energy is 0 for every project but _idle: no node power meter reported (an ACPI power_meter in hwmon), so the rest of the node is not measured.",
                "CPU and DRAM energy is 0 for every project but _idle: it is shared among jobs by their cgroup CPU time, and no job's CPU time was measured (the agent found no cgroup of these jobs: [cpu] job_cgroups, docs/sources.md), so all of it went to _idle."
            ]
        );
        let table = present(&demo, Format::Table, &prices(), &whole).out;
        assert!(
            table.ends_with(&format!("* {}\n", notes(&demo, &whole)[1])),
            "{table}"
        );
        // Jobs with CPU time and no CPU energy: no RAPL; no GPU anywhere.
        let no_rapl = [
            kwh_row("a", [0.0, 0.0, 0.0, 0.0], 0.0, 2.0),
            kwh_row("_idle", [0.0, 0.0, 0.0, 0.0], 0.0, 0.0),
        ];
        let n = notes(&no_rapl, &whole);
        assert!(
            n[0].starts_with("GPU energy is 0 for every project but _idle: no GPU was reported"),
            "{n:?}"
        );
        assert!(n[1].starts_with("CPU energy is 0 for every project but _idle: no CPU package energy was read (no RAPL"), "{n:?}");
        assert!(n[2].starts_with("DRAM energy is 0"), "{n:?}");
        assert_eq!(n.len(), 4);
        // GPUs idle all along: measured, held by no job.
        let idle_gpus = [
            kwh_row("a", [0.0, 1.0, 0.0, 0.0], 0.0, 2.0),
            kwh_row("_idle", [5.0, 1.0, 0.0, 0.0], 8.0, 0.0),
        ];
        assert!(notes(&idle_gpus, &whole)[0].contains("no job held a GPU"));
        // By job there is no _idle row: whatever it measured is not known there, so a
        // job bill with no CPU time says that, not "no RAPL".
        let jobs = [kwh_row("7", [1.0, 0.0, 0.0, 0.0], 1.0, 0.0)];
        let n = notes(&jobs, &scope(By::Job, None));
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(
            n[0].starts_with("CPU, DRAM and other energy is 0 for every job: it is shared"),
            "{n:?}"
        );
        // By node every row charges someone; nothing to say when all was measured.
        let nodes = [kwh_row("n1", [1.0, 1.0, 1.0, 1.0], 1.0, 0.0)];
        assert!(notes(&nodes, &scope(By::Node, None)).is_empty());
        // Only _idle: nobody to explain a zero to.
        assert!(notes(&demo[1..], &whole).is_empty());
        // By user, _idle and _unattributed are `_none`.
        let users = [
            kwh_row("alice", [1.0, 0.0, 0.0, 0.0], 1.0, 0.0),
            kwh_row("_none", [1.0, 1.0, 1.0, 1.0], 1.0, 0.0),
        ];
        assert!(notes(&users, &scope(By::User, None))[0]
            .starts_with("CPU, DRAM and other energy is 0 for every user but _none:"));
    }
}
