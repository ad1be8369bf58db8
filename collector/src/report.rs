//! `nodewatt-collector report`: a Markdown energy report for one job or one project over
//! a period, with an SVG chart of power by device class, for documenting a training
//! run's energy use or an allocation's consumption.

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

#[derive(Debug, Clone, Default)]
pub struct ReportData {
    pub title: String,
    pub project: String,
    pub users: Vec<String>,
    pub nodes: Vec<String>,
    /// `node: gpus` of a job.
    pub gpus: Vec<String>,
    pub models: Vec<String>,
    pub from_ms: u64,
    pub to_ms: u64,
    pub sums: Sums,
    /// (bucket end ms, W of gpu, cpu, dram, other)
    pub series: Vec<(u64, [f64; 4])>,
    pub bucket_ms: u64,
    pub efficiency: Efficiency,
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

| | value | share |
|---|---:|---:|
",
    );
    let _ = writeln!(
        m,
        "| Tensor-active GPU-hours | {:.3} | {} of GPU-hours |",
        hours(e.gpu_tensor_us),
        share(e.gpu_tensor_us, s.gpu_ms.saturating_mul(1000))
    );
    let per_tensor_hour = match e.gpu_tensor_us {
        0 => "- (no tensor activity measured)".to_string(),
        us => format!("{:.6}", kwh(s.gpu_uj) / hours(us)),
    };
    let _ = writeln!(
        m,
        "| GPU kWh per tensor-active hour | {per_tensor_hour} | |"
    );
    let _ = writeln!(
        m,
        "| GPU energy while the GPU ran nothing (kWh) | {:.6} | {} of GPU energy |",
        kwh(e.gpu_idle_uj),
        share(e.gpu_idle_uj, s.gpu_uj)
    );
    let _ = writeln!(
        m,
        "| GPU energy while power- or thermal-capped (kWh) | {:.6} | {} of GPU energy |
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

pub fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// Chart buckets: at most about 240 points, whole seconds.
pub fn bucket_ms(from_ms: u64, to_ms: u64) -> u64 {
    let span = to_ms.saturating_sub(from_ms).max(1);
    span.div_ceil(240).div_ceil(1000).max(1) * 1000
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

fn duration(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(ms / 1000)).to_string()
}

/// Mass with a unit that keeps small amounts readable.
fn co2(kg: f64) -> String {
    if kg < 1.0 {
        format!("{:.3} g", kg * 1000.0)
    } else {
        format!("{kg:.3} kg")
    }
}

/// A line chart of power by device class. Pure, so it is tested as a string.
pub fn svg(series: &[(u64, [f64; 4])]) -> String {
    let (w, h, left, bottom, top, right) = (800.0, 320.0, 60.0, 40.0, 20.0, 110.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let t0 = series.first().map_or(0, |p| p.0);
    let t1 = series.last().map_or(1, |p| p.0).max(t0 + 1);
    let ymax = nice_ceiling(
        series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0f64, f64::max),
    );
    let x = |t: u64| left + (t - t0) as f64 / (t1 - t0) as f64 * pw;
    let y = |v: f64| top + ph - v / ymax * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        top + ph,
        left + pw,
        top + ph,
        top + ph
    );
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text><line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
            left - 6.0,
            y(v) + 4.0,
            y(v),
            left + pw,
            y(v)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">power (W)</text>",
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (t, anchor) in [(t0, "start"), (t1, "end")] {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
            x(t),
            top + ph + 18.0,
            fmt_time(t)
        );
    }
    for (c, (name, colour)) in CLASSES.iter().zip(COLOURS).enumerate() {
        let points: Vec<String> = series
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(v[c])))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            points.join(" ")
        );
        let ly = top + 10.0 + c as f64 * 18.0;
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{name}</text>",
            left + pw + 10.0,
            left + pw + 30.0,
            left + pw + 36.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
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
        "| Period | {} to {} ({}) |",
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
    let _ = writeln!(m, "| GPU-hours | {:.3} |", s.gpu_ms as f64 / 3.6e6);
    let _ = writeln!(m, "| CPU core-hours | {:.3} |\n", s.cpu_us as f64 / 3.6e9);

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
        "## Power by device class\n\n![Power by device class]({chart})\n\nMean power per {} s.\n",
        d.bucket_ms / 1000
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
        fmt_time(nodewatt_common::now_ms())
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

/// Reads what a report needs from InfluxDB.
pub async fn gather(
    influx: &Influx,
    subject: &Subject,
    period: Option<(u64, u64)>,
    plan: &Plan,
) -> Result<ReportData, String> {
    let mut d = ReportData::default();
    let filter;
    match subject {
        Subject::Job(job) => {
            let v = influx
                .query(&format!(
                    "SELECT project, \"user\", node, gpus, start_ms, until_ms, energy_gpu_uj, energy_cpu_uj, energy_dram_uj, energy_other_uj, gpu_ms, cpu_us, energy_gpu_idle_uj, energy_gpu_capped_uj, gpu_tensor_us FROM \"job_total\" WHERE {}",
                    eq("job", job)
                ))
                .await?;
            let rows: Vec<serde_json::Value> = v["results"][0]["series"][0]["values"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if rows.is_empty() {
                return Err(format!("no usage recorded for job {job}"));
            }
            let n = |r: &serde_json::Value, i: usize| r[i].as_u64().unwrap_or(0);
            d.from_ms = rows.iter().map(|r| n(r, 5)).min().unwrap_or(0);
            d.to_ms = rows.iter().map(|r| n(r, 6)).max().unwrap_or(0);
            for r in &rows {
                let part = Sums {
                    gpu_uj: n(r, 7),
                    cpu_uj: n(r, 8),
                    dram_uj: n(r, 9),
                    other_uj: n(r, 10),
                    gpu_ms: n(r, 11),
                    cpu_us: n(r, 12),
                };
                d.sums = d
                    .sums
                    .checked_add(&part)
                    .ok_or(format!("job {job}: its totals pass 2^64 µJ"))?;
                let spent = Efficiency {
                    gpu_idle_uj: n(r, 13),
                    gpu_capped_uj: n(r, 14),
                    gpu_tensor_us: n(r, 15),
                };
                d.efficiency = d
                    .efficiency
                    .checked_add(&spent)
                    .ok_or(format!("job {job}: its totals pass 2^64 µJ"))?;
            }
            d.project = rows[0][1].as_str().unwrap_or_default().to_string();
            d.users = strings(&v, 2);
            d.nodes = strings(&v, 3);
            let mut gpus: Vec<String> = rows
                .iter()
                .filter(|r| r[4].as_str().is_some_and(|g| !g.is_empty()))
                .map(|r| {
                    format!(
                        "{}: {}",
                        r[3].as_str().unwrap_or(""),
                        r[4].as_str().unwrap_or("")
                    )
                })
                .collect();
            gpus.sort();
            gpus.dedup();
            d.gpus = gpus;
            d.title = format!("job {job} (project {})", d.project);
            // Names read back from InfluxDB are data, not query text: escaped.
            filter = format!(
                "{} AND {} AND {}",
                eq("project", &d.project),
                any_of("user", &d.users),
                any_of("node", &d.nodes)
            );
        }
        Subject::Project(p) => {
            let (from, to) = period.ok_or("a project report needs --from and --to")?;
            d.from_ms = from;
            d.to_ms = to;
            d.project = p.to_string();
            d.title = format!("project {p}");
            filter = eq("project", p);
            // One grouped query gives the totals, the users and the nodes.
            let detail = crate::billing::project_detail(influx, from, to, p, plan).await?;
            if detail.is_empty() {
                return Err(format!(
                    "no usage recorded for project {p} from {} to {}: check the name \
                     (`nodewatt-collector usage --by project` over the period lists them) \
                     and the period",
                    fmt_time(from),
                    fmt_time(to)
                ));
            }
            for (key, s) in &detail {
                d.sums = d
                    .sums
                    .checked_add(s)
                    .ok_or(format!("project {p}: its totals pass 2^64 µJ"))?;
                d.users.push(key[0].clone());
                d.nodes.push(key[1].clone());
            }
            for v in [&mut d.users, &mut d.nodes] {
                v.sort();
                v.dedup();
            }
            let v = influx
                .query(&format!(
                    "SELECT SUM(energy_gpu_idle_uj), SUM(energy_gpu_capped_uj), SUM(gpu_tensor_us) FROM \"usage\" WHERE {filter} AND time > {from}ms AND time <= {to}ms"
                ))
                .await?;
            let row = &v["results"][0]["series"][0]["values"][0];
            let n = |i: usize| row[i].as_u64().unwrap_or(0);
            d.efficiency = Efficiency {
                gpu_idle_uj: n(1),
                gpu_capped_uj: n(2),
                gpu_tensor_us: n(3),
            };
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

    d.bucket_ms = bucket_ms(d.from_ms, d.to_ms);
    let q = format!(
        "SELECT SUM(energy_gpu_uj), SUM(energy_cpu_uj), SUM(energy_dram_uj), SUM(energy_other_uj) FROM \"usage\" WHERE {filter} AND time > {}ms AND time <= {}ms GROUP BY time({}ms) fill(0)",
        d.from_ms, d.to_ms, d.bucket_ms
    );
    let v = influx.query(&q).await?;
    let b = d.bucket_ms as f64 * 1000.0;
    for row in v["results"][0]["series"][0]["values"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let t = row[0].as_u64().unwrap_or(0);
        let w = |i: usize| row[i].as_f64().unwrap_or(0.0) / b;
        d.series.push((t + d.bucket_ms, [w(1), w(2), w(3), w(4)]));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            series: vec![
                (60_000, [700.0, 100.0, 0.0, 0.0]),
                (120_000, [650.0, 90.0, 0.0, 0.0]),
            ],
            bucket_ms: 60_000,
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
        assert!(m.contains("(1h)"), "{m}");
        assert!(m.contains("| GPU-hours | 2.000 |"));
        assert!(m.contains("| GPU models | NVIDIA H100 80GB HBM3 |"));
        assert!(m.contains("![Power by device class](job-7.svg)"));
        assert!(m.contains("## How this was measured"));
        assert!(
            m.contains("| Tensor-active GPU-hours | 0.500 | 25.0 % of GPU-hours |"),
            "{m}"
        );
        assert!(m.contains("| GPU kWh per tensor-active hour | 1.400000 | |"));
        assert!(m.contains(
            "| GPU energy while the GPU ran nothing (kWh) | 0.070000 | 10.0 % of GPU energy |"
        ));
        assert!(m.contains(
            "| GPU energy while power- or thermal-capped (kWh) | 0.000000 | 0.0 % of GPU energy |"
        ));
        let mut none = data();
        none.efficiency = Efficiency::default();
        none.sums = Sums::default();
        let m = markdown(&none, &p, "c.svg", "nodewatt");
        assert!(
            m.contains("| GPU kWh per tensor-active hour | - (no tensor activity measured) | |")
        );
        assert!(
            m.contains("| Tensor-active GPU-hours | 0.000 | - of GPU-hours |"),
            "{m}"
        );
    }

    #[test]
    fn round_axis_maxima() {
        assert_eq!(nice_ceiling(330.0), 500.0);
        assert_eq!(nice_ceiling(199.0), 200.0);
        assert_eq!(nice_ceiling(2400.0), 2500.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }

    #[test]
    fn svg_draws_every_class() {
        let s = svg(&data().series);
        assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert_eq!(s.matches("<polyline").count(), 4);
        for c in CLASSES {
            assert!(s.contains(&format!(">{c}</text>")), "{c}");
        }
        assert!(s.trim_end().ends_with("</svg>"));
        // An empty series still renders.
        assert!(svg(&[]).contains("</svg>"));
    }
}
