//! The contract beyond syntax: what a sample must satisfy before anything is stored.
//! Names are checked while deserialising (see [`crate::name`]); this module checks what
//! needs the whole message or the receiver's clock: integer ranges, time windows, entry
//! counts, physics (no device delivers more than its class's maximum power over the span)
//! and bookkeeping (the attributed usage sums exactly to the measured deltas). A
//! [`ValidSample`] can only be made here, so code that stores one needs no checks of its own.

use crate::{RaplDomain, Sample, Status, UsageWindow, WireError};

/// Why a message was rejected; `as_str` is the label in logs, counters and health points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Larger than the receiver's size limit.
    TooLarge,
    /// Not JSON, or not the shape of a sample.
    Json,
    /// Another schema version.
    Schema,
    /// Not a nodewatt topic.
    Topic,
    /// The payload's cluster/node differ from its topic's.
    NodeMismatch,
    /// A time outside its window.
    Timestamp,
    /// A number outside its range.
    Range,
    /// A name or label that breaks its rule.
    Name,
    /// More entries in a list than a node can have.
    TooMany,
    /// More energy than the devices' maximum power over the span.
    Physics,
    /// Usage that does not sum to the measured deltas.
    Conservation,
    /// A node creating new series faster than its budget allows.
    SeriesBudget,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::TooLarge,
        Reason::Json,
        Reason::Schema,
        Reason::Topic,
        Reason::NodeMismatch,
        Reason::Timestamp,
        Reason::Range,
        Reason::Name,
        Reason::TooMany,
        Reason::Physics,
        Reason::Conservation,
        Reason::SeriesBudget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::Json => "json",
            Reason::Schema => "schema",
            Reason::Topic => "topic",
            Reason::NodeMismatch => "node_mismatch",
            Reason::Timestamp => "timestamp",
            Reason::Range => "range",
            Reason::Name => "name",
            Reason::TooMany => "too_many",
            Reason::Physics => "physics",
            Reason::Conservation => "conservation",
            Reason::SeriesBudget => "series_budget",
        }
    }
}

/// A rejected message: the reason (counted) and the detail (logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Invalid {
    pub reason: Reason,
    pub detail: String,
}

pub fn invalid(reason: Reason, detail: impl Into<String>) -> Invalid {
    Invalid {
        reason,
        detail: detail.into(),
    }
}

/// Prefix of serde errors raised by name checks (serde errors carry only text).
pub(crate) const NAME_TAG: &str = "invalid name: ";

impl From<WireError> for Invalid {
    fn from(e: WireError) -> Invalid {
        let reason = match &e {
            WireError::Schema { .. } => Reason::Schema,
            WireError::Json(j) if j.is_data() && j.to_string().starts_with(NAME_TAG) => {
                Reason::Name
            }
            WireError::Json(_) => Reason::Json,
        };
        invalid(reason, e.to_string())
    }
}

/// Maximum power per device class, watts: the physics bound on every energy delta.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaxPower {
    /// One GPU (today's largest draw about 1.4 kW).
    pub gpu_w: u64,
    /// One RAPL package (or core, uncore) domain.
    pub cpu_w: u64,
    /// One RAPL DRAM domain.
    pub dram_w: u64,
    /// The rest of the node (power meter minus GPUs, CPUs, DRAM), and RAPL `psys`.
    pub other_w: u64,
    /// A whole node: bounds each job's total.
    pub node_w: u64,
}

impl Default for MaxPower {
    fn default() -> Self {
        MaxPower {
            gpu_w: 2_000,
            cpu_w: 1_000,
            dram_w: 500,
            other_w: 20_000,
            node_w: 100_000,
        }
    }
}

/// The receiver's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// How far ahead of the receiver's clock a sample may be.
    pub max_future_ms: u64,
    /// How old a sample may be (agents hold samples through outages).
    pub max_age_ms: u64,
    pub max_power: MaxPower,
    /// Usage entries and job totals per message.
    pub max_jobs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_future_ms: 300_000,
            max_age_ms: 7 * 86_400_000,
            max_power: MaxPower::default(),
            max_jobs: 4_096,
        }
    }
}

/// 2020-01-01T00:00:00Z: no nodewatt sample, job or agent is older.
pub const MIN_TIME_MS: u64 = 1_577_836_800_000;
/// A sample's span is at most a year, whatever outage it survived.
pub const MAX_SPAN_MS: u64 = 366 * 86_400_000;
/// Devices per node and list, far above any real node.
pub const MAX_GPUS: usize = 64;
pub const MAX_RAPL: usize = 64;
pub const MAX_SENSORS: usize = 1_024;
pub const MAX_SOURCES: usize = 32;
pub const MAX_PIDS: usize = 4_096;
pub use crate::sample::{MAX_GPU_ERRORS, MAX_GPU_EVENTS};
/// MIG devices of one GPU: 7 GPU instances today, each with its compute instances.
pub const MAX_MIG: usize = 64;
pub const MAX_CORES: u64 = 16_384;

/// A sample that passed every check; only [`check_sample`] makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSample(Sample);

impl ValidSample {
    pub fn into_inner(self) -> Sample {
        self.0
    }
}

impl std::ops::Deref for ValidSample {
    type Target = Sample;
    fn deref(&self) -> &Sample {
        &self.0
    }
}

/// RAPL domains whose deltas are the `cpu` class: top-level packages.
pub fn is_cpu_package(d: &RaplDomain) -> bool {
    d.parent.is_none() && d.name.starts_with("package")
}

/// RAPL domains whose deltas are the `dram` class.
pub fn is_dram(d: &RaplDomain) -> bool {
    d.name == "dram"
}

/// Energy measured over a sample's span by class, µJ: what its usage must sum to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassEnergy {
    pub gpu_uj: u128,
    pub cpu_uj: u128,
    pub dram_uj: u128,
}

impl Sample {
    /// The measured deltas by class (the attribution's input, and conservation's target).
    pub fn class_energy(&self) -> ClassEnergy {
        let rapl = |pick: fn(&RaplDomain) -> bool| {
            self.rapl
                .iter()
                .filter(|d| pick(d))
                .filter_map(|d| d.energy_delta_uj)
                .map(u128::from)
                .sum()
        };
        ClassEnergy {
            gpu_uj: self
                .gpus
                .iter()
                .filter_map(|g| g.energy_delta_mj)
                .map(|mj| u128::from(mj) * 1000)
                .sum(),
            cpu_uj: rapl(is_cpu_package),
            dram_uj: rapl(is_dram),
        }
    }
}

impl Sample {
    /// What this message's usage covers and must split: the window it declares (usage
    /// published coarser than telemetry), else its own span's deltas and devices; `None`
    /// for a message without usage.
    pub fn usage_cover(&self) -> Option<UsageWindow> {
        if let Some(w) = self.usage_window {
            return Some(w);
        }
        if self.usage.is_empty() {
            return None;
        }
        let m = self.class_energy();
        let clamp = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
        let n = |k: usize| u32::try_from(k).unwrap_or(u32::MAX);
        Some(UsageWindow {
            span_ms: self.span_ms,
            gpu_uj: clamp(m.gpu_uj),
            cpu_uj: clamp(m.cpu_uj),
            dram_uj: clamp(m.dram_uj),
            gpus: n(self.gpus.len()),
            cpu_packages: n(self.rapl.iter().filter(|d| is_cpu_package(d)).count()),
            dram_domains: n(self.rapl.iter().filter(|d| is_dram(d)).count()),
            cores: self.cpu.as_ref().map_or(0, |c| c.cores),
        })
    }
}

/// A span no longer than the agent has run.
fn span_within(what: &str, span_ms: u64, max_span: u64) -> Result<(), Invalid> {
    if span_ms > max_span {
        return Err(invalid(
            Reason::Range,
            format!("{what} = {span_ms} is longer than the agent has run ({max_span} ms)"),
        ));
    }
    Ok(())
}

fn count(what: &str, v: u64) -> Result<(), Invalid> {
    sum_fits(what, u128::from(v))
}

/// Stored sums (a usage point sums entries; `energy_uj` sums classes) are InfluxDB's
/// signed 64-bit integers too.
fn sum_fits(what: &str, v: u128) -> Result<(), Invalid> {
    if v > i64::MAX as u128 {
        return Err(invalid(
            Reason::Range,
            format!("{what} = {v} exceeds a signed 64-bit integer"),
        ));
    }
    Ok(())
}

fn range(what: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), Invalid> {
    match v {
        Some(x) if !(x.is_finite() && x >= lo && x <= hi) => Err(invalid(
            Reason::Range,
            format!("{what} = {x} is not between {lo} and {hi}"),
        )),
        _ => Ok(()),
    }
}

fn gpm(g: &crate::Gpm) -> Result<(), Invalid> {
    for (what, v) in g.fields() {
        match what.ends_with("_pct") {
            true => range(what, v, 0.0, 100.0)?,
            // 1 TiB/s, above any link of today.
            false => range(what, v, 0.0, 1_048_576.0)?,
        }
    }
    Ok(())
}

fn at_most(what: &str, n: usize, max: usize) -> Result<(), Invalid> {
    if n > max {
        return Err(invalid(
            Reason::TooMany,
            format!("{n} {what}, at most {max}"),
        ));
    }
    Ok(())
}

/// `uj` may come from a device of at most `watts` over `span_ms`.
fn physics(what: &str, uj: u128, watts: u64, span_ms: u64) -> Result<(), Invalid> {
    let max = u128::from(watts) * u128::from(span_ms) * 1000;
    if uj > max {
        return Err(invalid(
            Reason::Physics,
            format!("{what}: {uj} µJ in {span_ms} ms is more than {watts} W can deliver"),
        ));
    }
    Ok(())
}

fn time(what: &str, v: u64, lo: u64, hi: u64) -> Result<(), Invalid> {
    if v < lo || v > hi {
        return Err(invalid(
            Reason::Timestamp,
            format!("{what} = {v} is outside the accepted window {lo}..{hi}"),
        ));
    }
    Ok(())
}

/// Checks a parsed sample against the receiver's clock and limits.
pub fn check_sample(s: Sample, now_ms: u64, l: &Limits) -> Result<ValidSample, Invalid> {
    let p = &l.max_power;
    time(
        "ts_ms",
        s.ts_ms,
        now_ms.saturating_sub(l.max_age_ms).max(MIN_TIME_MS),
        now_ms.saturating_add(l.max_future_ms),
    )?;
    // Before anything adds to it.
    if !(10..=3_600_000).contains(&s.interval_ms) {
        return Err(invalid(
            Reason::Range,
            format!(
                "interval_ms = {} is not between 10 and 3600000",
                s.interval_ms
            ),
        ));
    }
    time(
        "agent_start_ms",
        s.agent_start_ms,
        MIN_TIME_MS,
        s.ts_ms + s.interval_ms,
    )?;
    // The span lies after the agent started: no process can cover more.
    let max_span = (s.ts_ms - s.agent_start_ms.min(s.ts_ms) + s.interval_ms).min(MAX_SPAN_MS);
    span_within("span_ms", s.span_ms, max_span)?;
    count("seq", s.seq)?;
    let span = s.span_ms;

    at_most("sources", s.sources.len(), MAX_SOURCES)?;
    at_most("gpus", s.gpus.len(), MAX_GPUS)?;
    at_most("rapl domains", s.rapl.len(), MAX_RAPL)?;
    at_most("hwmon sensors", s.hwmon.len(), MAX_SENSORS)?;
    at_most("thermal zones", s.thermal.len(), MAX_SENSORS)?;
    at_most("usage entries", s.usage.len(), l.max_jobs)?;
    at_most("job totals", s.job_totals.len(), l.max_jobs)?;

    for src in &s.sources {
        count("read_us", src.read_us)?;
    }
    for g in &s.gpus {
        at_most("pids of one GPU", g.pids.len(), MAX_PIDS)?;
        at_most("errors of one GPU", g.errors.len(), MAX_GPU_ERRORS)?;
        range("gpu power_w", g.power_w, 0.0, 10_000.0)?;
        range("gpu power_max_w", g.power_max_w, 0.0, 10_000.0)?;
        range("gpu temp_c", g.temp_c, -100.0, 250.0)?;
        range("gpu temp_max_c", g.temp_max_c, -100.0, 250.0)?;
        range("gpu mem_temp_c", g.mem_temp_c, -100.0, 250.0)?;
        range("gpu util_pct", g.util_pct, 0.0, 100.0)?;
        range("gpu mem_util_pct", g.mem_util_pct, 0.0, 100.0)?;
        range("gpu power_limit_w", g.power_limit_w, 0.0, 10_000.0)?;
        gpm(&g.gpm)?;
        at_most("MIG devices of one GPU", g.mig.len(), MAX_MIG)?;
        if let Some(total) = g.mig_slices {
            at_most("MIG slices of one GPU", total as usize, MAX_MIG)?;
            if let Some(held) = g.mig_slices_held().filter(|h| *h > total) {
                return Err(invalid(
                    Reason::Physics,
                    format!("GPU instances hold {held} slices of a GPU that has {total}"),
                ));
            }
        }
        for m in &g.mig {
            gpm(&m.gpm)?;
            count("mig mem_used_bytes", m.mem_used_bytes.unwrap_or(0))?;
            count("mig mem_total_bytes", m.mem_total_bytes.unwrap_or(0))?;
        }
        for (what, ms) in [
            ("gpu power_capped_ms", g.power_capped_ms),
            ("gpu thermal_capped_ms", g.thermal_capped_ms),
        ] {
            if let Some(ms) = ms.filter(|ms| *ms > span) {
                return Err(invalid(
                    Reason::Physics,
                    format!("{what} = {ms} is longer than the span ({span} ms)"),
                ));
            }
        }
        at_most("event kinds of one GPU", g.events.len(), MAX_GPU_EVENTS)?;
        for e in &g.events {
            count("gpu event count", e.count)?;
        }
        for (what, v) in [
            ("gpu energy_mj", g.energy_mj),
            ("gpu energy_delta_mj", g.energy_delta_mj),
            ("gpu mem_used_bytes", g.mem_used_bytes),
            ("gpu mem_total_bytes", g.mem_total_bytes),
            ("gpu clock_event_reasons", g.clock_event_reasons),
            ("gpu ecc_corrected", g.ecc_corrected),
            ("gpu ecc_uncorrected", g.ecc_uncorrected),
        ] {
            count(what, v.unwrap_or(0))?;
        }
        if let Some(mj) = g.energy_delta_mj {
            physics(
                &format!("gpu {} energy_delta_mj", g.index),
                u128::from(mj) * 1000,
                p.gpu_w,
                span,
            )?;
        }
    }
    if let Some(c) = &s.cpu {
        at_most("job cgroups", c.jobs.len(), l.max_jobs)?;
        range("cpu util_pct", c.util_pct, 0.0, 100.0)?;
        for (what, v) in [("load1", c.load1), ("load5", c.load5), ("load15", c.load15)] {
            range(what, Some(v), 0.0, 1e6)?;
        }
        let t = c.ticks;
        for v in [
            t.user, t.nice, t.system, t.idle, t.iowait, t.irq, t.softirq, t.steal,
        ] {
            count("cpu ticks", v)?;
        }
        count("cpu mem_total_bytes", c.mem_total_bytes)?;
        count(
            "cpu mem_available_bytes",
            c.mem_available_bytes.unwrap_or(0),
        )?;
        if u64::from(c.cores) > MAX_CORES {
            return Err(invalid(Reason::Range, format!("cpu cores = {}", c.cores)));
        }
        for j in &c.jobs {
            count("job cpu_usage_us", j.cpu_usage_us)?;
        }
    }
    for d in &s.rapl {
        range("rapl power_w", d.power_w, 0.0, 100_000.0)?;
        count("rapl energy_uj", d.energy_uj.unwrap_or(0))?;
        count("rapl max_energy_range_uj", d.max_energy_range_uj)?;
        if let Some(uj) = d.energy_delta_uj {
            count("rapl energy_delta_uj", uj)?;
            let watts = if is_dram(d) {
                p.dram_w
            } else if d.name == "psys" {
                p.other_w
            } else {
                p.cpu_w
            };
            physics(
                &format!("rapl {} energy_delta_uj", d.zone),
                u128::from(uj),
                watts,
                span,
            )?;
        }
    }
    for h in &s.hwmon {
        range("hwmon value", h.value, -1e9, 1e9)?;
        count("hwmon energy_uj", h.energy_uj.unwrap_or(0))?;
    }
    for t in &s.thermal {
        range("thermal temp_c", t.temp_c, -273.0, 1_000.0)?;
    }
    check_usage(&s, p, max_span)?;
    check_job_totals(&s, p)?;
    Ok(ValidSample(s))
}

/// Conservation: the usage of a message splits exactly the energy measured over the time
/// it covers, so no entry can bill energy that was not measured; and that energy is what
/// the devices could deliver in that time.
fn check_usage(s: &Sample, p: &crate::check::MaxPower, max_span: u64) -> Result<(), Invalid> {
    let Some(w) = s.usage_cover() else {
        return Ok(());
    };
    if s.usage_window.is_some() {
        span_within("usage_window span_ms", w.span_ms, max_span)?;
        at_most("usage_window gpus", w.gpus as usize, MAX_GPUS)?;
        at_most(
            "usage_window cpu_packages",
            w.cpu_packages as usize,
            MAX_RAPL,
        )?;
        at_most(
            "usage_window dram_domains",
            w.dram_domains as usize,
            MAX_RAPL,
        )?;
        if u64::from(w.cores) > MAX_CORES {
            return Err(invalid(
                Reason::Range,
                format!("usage_window cores = {}", w.cores),
            ));
        }
        for (class, uj, devices, watts) in [
            ("gpu", w.gpu_uj, w.gpus, p.gpu_w),
            ("cpu", w.cpu_uj, w.cpu_packages, p.cpu_w),
            ("dram", w.dram_uj, w.dram_domains, p.dram_w),
        ] {
            physics(
                &format!("usage_window {class}_uj"),
                u128::from(uj),
                watts.saturating_mul(u64::from(devices)),
                w.span_ms,
            )?;
        }
    }
    let mut sum = [0u128; 6];
    for u in &s.usage {
        let a = &u.amounts;
        for (i, v) in [
            a.gpu_uj, a.cpu_uj, a.dram_uj, a.other_uj, a.gpu_ms, a.cpu_us,
        ]
        .into_iter()
        .enumerate()
        {
            count("usage amount", v)?;
            sum[i] += u128::from(v);
        }
        if let Some(why) = a.part_exceeding() {
            return Err(invalid(
                Reason::Conservation,
                format!("usage of {}: {why}", u.project),
            ));
        }
    }
    // Every stored usage point sums a subset of the entries: if the whole fits, each does.
    for v in sum {
        sum_fits("usage amounts summed", v)?;
    }
    sum_fits("usage energy summed", sum[..4].iter().sum())?;
    for (class, used, measured) in [
        ("gpu", sum[0], u128::from(w.gpu_uj)),
        ("cpu", sum[1], u128::from(w.cpu_uj)),
        ("dram", sum[2], u128::from(w.dram_uj)),
    ] {
        if used != measured {
            return Err(invalid(
                Reason::Conservation,
                format!("usage {class}_uj sums to {used}, the measured deltas to {measured}"),
            ));
        }
    }
    physics("usage other_uj", sum[3], p.other_w, w.span_ms)?;
    let gpus = u128::from(w.gpus);
    let cores = u128::from(w.cores);
    let span = u128::from(w.span_ms);
    for (what, used, max) in [
        ("gpu_ms", sum[4], gpus * span),
        ("cpu_us", sum[5], cores * span * 1000),
    ] {
        if used > max {
            return Err(invalid(
                Reason::Conservation,
                format!("usage {what} sums to {used}, more than the node had ({max})"),
            ));
        }
    }
    Ok(())
}

/// Job totals: times in order, and no more energy than a whole node can draw over the
/// job's time on it.
fn check_job_totals(s: &Sample, p: &crate::check::MaxPower) -> Result<(), Invalid> {
    for t in &s.job_totals {
        let what = format!("job {} total", t.job);
        time(
            &format!("{what} start_ms"),
            t.start_ms,
            MIN_TIME_MS,
            t.since_ms,
        )?;
        time(
            &format!("{what} since_ms"),
            t.since_ms,
            MIN_TIME_MS,
            s.ts_ms + s.interval_ms,
        )?;
        time(
            &format!("{what} until_ms"),
            t.until_ms,
            MIN_TIME_MS,
            s.ts_ms,
        )?;
        at_most("GPUs of one job", t.gpus.len(), MAX_GPUS)?;
        let a = &t.amounts;
        for v in [
            a.gpu_uj, a.cpu_uj, a.dram_uj, a.other_uj, a.gpu_ms, a.cpu_us,
        ] {
            count("job total amount", v)?;
        }
        if let Some(why) = a.part_exceeding() {
            return Err(invalid(Reason::Conservation, format!("{what}: {why}")));
        }
        let dur = t.until_ms.saturating_sub(t.since_ms) + s.interval_ms;
        let energy = [a.gpu_uj, a.cpu_uj, a.dram_uj, a.other_uj]
            .into_iter()
            .map(u128::from)
            .sum();
        physics(&what, energy, p.node_w, dur)?;
        sum_fits(&format!("{what} energy"), energy)?;
        if u128::from(a.gpu_ms) > MAX_GPUS as u128 * u128::from(dur)
            || u128::from(a.cpu_us) > u128::from(MAX_CORES) * u128::from(dur) * 1000
        {
            return Err(invalid(
                Reason::Physics,
                format!("{what}: more GPU or CPU time than a node has in {dur} ms"),
            ));
        }
    }
    Ok(())
}

/// Checks a status message's time.
pub fn check_status(st: &Status, now_ms: u64, l: &Limits) -> Result<(), Invalid> {
    if let Some(ts) = st.ts_ms {
        time(
            "status ts_ms",
            ts,
            now_ms.saturating_sub(l.max_age_ms).max(MIN_TIME_MS),
            now_ms.saturating_add(l.max_future_ms),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Amounts, Cpu, Gpu, JobTotal, RaplDomain, Usage};

    const NOW: u64 = 1_763_700_000_000;

    fn n<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().unwrap()
    }

    /// A sample as an agent with one GPU, one package and one job makes it.
    fn sample() -> Sample {
        let mut s = Sample::new("nodewatt-agent/0.1.0", n("c1"), n("n1"), 1000, NOW - 60_000);
        s.ts_ms = NOW;
        s.span_ms = 1000;
        s.gpus.push(Gpu {
            index: 0,
            uuid: "GPU-1".into(),
            pci_bus_id: "0".into(),
            model: "H100".into(),
            power_w: Some(300.0),
            energy_delta_mj: Some(300_000),
            ..Gpu::default()
        });
        s.cpu = Some(Cpu {
            cores: 4,
            ..Cpu::default()
        });
        s.rapl.push(RaplDomain {
            zone: "intel-rapl:0".into(),
            name: "package-0".into(),
            parent: None,
            energy_uj: Some(1),
            max_energy_range_uj: 10,
            energy_delta_uj: Some(100_000_000),
            power_w: Some(100.0),
            error: None,
        });
        let amounts = |gpu_uj, cpu_uj| Amounts {
            gpu_uj,
            cpu_uj,
            gpu_ms: 500,
            cpu_us: 1_000_000,
            ..Amounts::default()
        };
        s.usage = vec![
            Usage {
                job: Some(n("7")),
                project: n("proj-a"),
                user: Some(n("jane.doe@corp.example")),
                amounts: amounts(200_000_000, 25_000_000),
            },
            Usage {
                job: None,
                project: Project::idle(),
                user: None,
                amounts: amounts(100_000_000, 75_000_000),
            },
        ];
        s.job_totals.push(JobTotal {
            job: n("7"),
            project: n("proj-a"),
            user: n("jane.doe@corp.example"),
            start_ms: NOW - 30_000,
            since_ms: NOW - 30_000,
            until_ms: NOW,
            ended: false,
            gpus: vec![n("0")],
            amounts: amounts(6_000_000_000, 750_000_000),
        });
        s
    }

    /// A named change that makes a good sample bad.
    type Case = (&'static str, fn(&mut Sample));

    fn reason(s: Sample) -> Reason {
        check_sample(s, NOW, &Limits::default()).unwrap_err().reason
    }

    use crate::Project;

    /// Found by the fuzzer (nodewatt-fuzz): sums that only overflow once added up.
    #[test]
    fn sums_that_overflow_are_rejected_not_wrapped() {
        // `ts_ms + interval_ms` overflowed (a panic with overflow checks).
        let mut s = sample();
        s.interval_ms = u64::MAX;
        assert_eq!(reason(s), Reason::Range);
        // A job total whose classes each fit but whose energy_uj did not: stored as -2.
        let mut s = sample();
        let t = &mut s.job_totals[0];
        (t.start_ms, t.since_ms) = (1_578_000_000_000, 1_578_000_000_000);
        (t.amounts.gpu_uj, t.amounts.cpu_uj) = (i64::MAX as u64, i64::MAX as u64);
        assert_eq!(reason(s), Reason::Range);
        // Usage entries that each fit but sum past i64 (with a configured power limit
        // high enough for physics to allow it).
        let mut s = sample();
        s.agent_start_ms = NOW - 20_000_000_000;
        s.span_ms = 10_000_000_000;
        s.gpus[0].energy_delta_mj = Some(10_000_000_000_000_000);
        s.usage[0].amounts.gpu_uj = 5_000_000_000_000_000_000;
        s.usage[1].amounts.gpu_uj = 5_000_000_000_000_000_000;
        s.rapl.clear();
        for u in &mut s.usage {
            u.amounts.cpu_uj = 0;
        }
        s.job_totals.clear();
        let mut l = Limits::default();
        l.max_power.gpu_w = 1_000_000;
        assert_eq!(check_sample(s, NOW, &l).unwrap_err().reason, Reason::Range);
    }

    #[test]
    fn an_agents_sample_passes() {
        let v = check_sample(sample(), NOW, &Limits::default()).unwrap();
        assert_eq!(v.into_inner(), sample());
    }

    #[test]
    fn numbers_out_of_range() {
        let cases: [Case; 10] = [
            ("power", |s| s.gpus[0].power_w = Some(1e12)),
            ("nan", |s| s.gpus[0].temp_c = Some(f64::NAN)),
            ("util", |s| s.gpus[0].util_pct = Some(101.0)),
            ("limit", |s| s.gpus[0].power_limit_w = Some(-1.0)),
            ("gpm pct", |s| s.gpus[0].gpm.tensor_active_pct = Some(100.5)),
            ("gpm rate", |s| {
                s.gpus[0].gpm.nvlink_rx_mibps = Some(f64::INFINITY)
            }),
            ("events", |s| {
                s.gpus[0].events = vec![
                    crate::GpuEvents {
                        kind: crate::GpuEventKind::Xid,
                        code: 79,
                        count: u64::MAX,
                    };
                    1
                ]
            }),
            ("counter", |s| s.gpus[0].energy_mj = Some(u64::MAX)),
            ("interval", |s| s.interval_ms = 0),
            ("span", |s| s.span_ms = i64::MAX as u64),
        ];
        for (what, f) in cases {
            let mut s = sample();
            f(&mut s);
            assert_eq!(reason(s), Reason::Range, "{what}");
        }
    }

    #[test]
    fn capped_time_longer_than_the_span_is_physics() {
        let mut s = sample();
        s.gpus[0].power_capped_ms = Some(s.span_ms);
        check_sample(s.clone(), NOW, &Limits::default()).unwrap();
        s.gpus[0].thermal_capped_ms = Some(s.span_ms + 1);
        assert_eq!(reason(s), Reason::Physics);
    }

    #[test]
    fn gpu_instances_cannot_hold_more_slices_than_the_gpu() {
        let mut s = sample();
        let mig = |gi: u32, ci: u32, slices: u32| crate::MigDevice {
            uuid: format!("MIG-{gi}-{ci}"),
            gpu_instance_id: gi,
            compute_instance_id: ci,
            slices: Some(slices),
            ..crate::MigDevice::default()
        };
        // Two compute instances of one 4-slice GPU instance hold 4 slices, not 8.
        s.gpus[0].mig = vec![mig(1, 0, 3), mig(2, 0, 4), mig(2, 1, 4)];
        s.gpus[0].mig_slices = Some(7);
        assert_eq!(s.gpus[0].mig_slices_held(), Some(7));
        check_sample(s.clone(), NOW, &Limits::default()).unwrap();
        s.gpus[0].mig.push(mig(3, 0, 1));
        assert_eq!(reason(s.clone()), Reason::Physics);
        s.gpus[0].mig[3].slices = None;
        assert_eq!(s.gpus[0].mig_slices_held(), None, "unknown, not checked");
        check_sample(s, NOW, &Limits::default()).unwrap();
    }

    #[test]
    fn too_many_event_kinds() {
        let mut s = sample();
        s.gpus[0].events = (0..=MAX_GPU_EVENTS as u64)
            .map(|code| crate::GpuEvents {
                kind: crate::GpuEventKind::Xid,
                code,
                count: 1,
            })
            .collect();
        assert_eq!(reason(s), Reason::TooMany);
    }

    #[test]
    fn times_outside_their_windows() {
        let cases: [Case; 7] = [
            ("future", |s| s.ts_ms = NOW + 301_000),
            ("old", |s| s.ts_ms = NOW - 8 * 86_400_000),
            ("1970 start", |s| s.agent_start_ms = 1),
            ("job 1970", |s| {
                s.job_totals[0].start_ms = 0;
            }),
            ("job 2200", |s| {
                s.job_totals[0].until_ms = 7_258_118_400_000;
            }),
            ("since after now", |s| {
                s.job_totals[0].since_ms = NOW + 86_400_000;
            }),
            ("start after since", |s| {
                s.job_totals[0].start_ms = NOW - 1_000;
            }),
        ];
        for (what, f) in cases {
            let mut s = sample();
            f(&mut s);
            assert_eq!(reason(s), Reason::Timestamp, "{what}");
        }
        let st = |ts| Status {
            online: true,
            agent: None,
            ts_ms: Some(ts),
            reason: None,
        };
        assert!(check_status(&st(NOW), NOW, &Limits::default()).is_ok());
        for ts in [0, 7_258_118_400_000] {
            assert_eq!(
                check_status(&st(ts), NOW, &Limits::default())
                    .unwrap_err()
                    .reason,
                Reason::Timestamp
            );
        }
    }

    #[test]
    fn energy_no_device_can_deliver() {
        let mut s = sample();
        // 10^18 mJ in one second.
        s.gpus[0].energy_delta_mj = Some(1_000_000_000_000_000_000);
        assert_eq!(reason(s), Reason::Physics);
        let mut s = sample();
        s.gpus[0].energy_delta_mj = Some(2_000_001); // 2000.001 W for 1 s
        s.usage[1].amounts.gpu_uj += 1_701_000_000;
        assert_eq!(reason(s), Reason::Physics);
        let mut s = sample();
        s.rapl[0].energy_delta_uj = Some(1_000_000_001);
        assert_eq!(reason(s), Reason::Physics);
        let mut s = sample();
        s.job_totals[0].amounts.gpu_uj = i64::MAX as u64;
        assert_eq!(reason(s), Reason::Physics);
        let mut s = sample();
        s.span_ms = 0;
        assert_eq!(reason(s), Reason::Physics, "energy in no time");
        // Exactly the maximum is fine.
        let mut s = sample();
        s.gpus[0].energy_delta_mj = Some(2_000_000);
        s.usage[1].amounts.gpu_uj += 1_700_000_000;
        assert!(check_sample(s, NOW, &Limits::default()).is_ok());
    }

    #[test]
    fn usage_must_split_exactly_what_was_measured() {
        let mut s = sample();
        s.usage[0].amounts.gpu_uj *= 1000;
        assert_eq!(reason(s), Reason::Conservation);
        let mut s = sample();
        s.usage[1].amounts.cpu_uj -= 1;
        assert_eq!(reason(s), Reason::Conservation);
        let mut s = sample();
        s.usage[0].amounts.gpu_ms = 5_000;
        assert_eq!(reason(s), Reason::Conservation, "more GPU time than GPUs");
        let mut s = sample();
        s.usage[0].amounts.cpu_uj = u64::MAX;
        assert_eq!(reason(s), Reason::Range);
        let mut s = sample();
        s.usage[0].amounts.other_uj = 1_000_000_000_000;
        assert_eq!(reason(s), Reason::Physics);
        // Moving energy between tenants is not detectable here; inventing it is.
        let mut s = sample();
        s.usage[0].amounts.gpu_uj += 1;
        s.usage[1].amounts.gpu_uj -= 1;
        assert!(check_sample(s, NOW, &Limits::default()).is_ok());
    }

    /// Usage published coarser than telemetry: the entries split the window they declare,
    /// and that window holds no more than its devices can deliver in its time.
    #[test]
    fn a_usage_window_is_checked_like_a_span() {
        let windowed = |s: &mut Sample| {
            let m = s.class_energy();
            s.usage_window = Some(UsageWindow {
                span_ms: 3_000,
                gpu_uj: m.gpu_uj as u64,
                cpu_uj: m.cpu_uj as u64,
                dram_uj: m.dram_uj as u64,
                gpus: 1,
                cpu_packages: 1,
                dram_domains: 0,
                cores: 4,
            });
        };
        let mut s = sample();
        windowed(&mut s);
        // Sent over a window, the same entries need not match this message's deltas.
        s.gpus[0].energy_delta_mj = Some(1);
        assert!(check_sample(s.clone(), NOW, &Limits::default()).is_ok());
        // A telemetry-only message: no usage, no window.
        let mut quiet = s.clone();
        quiet.usage.clear();
        quiet.usage_window = None;
        assert!(check_sample(quiet, NOW, &Limits::default()).is_ok());

        type Case = (&'static str, fn(&mut Sample), Reason);
        let cases: [Case; 9] = [
            (
                "entries sum to more than the window",
                |s| s.usage[0].amounts.gpu_uj += 1,
                Reason::Conservation,
            ),
            (
                "a window without its entries",
                |s| s.usage.clear(),
                Reason::Conservation,
            ),
            (
                "energy no GPU delivers in the window",
                |s| {
                    let w = s.usage_window.as_mut().unwrap();
                    w.gpu_uj = 2_000 * 3_000 * 1_000 + 1;
                    s.usage[0].amounts.gpu_uj = w.gpu_uj - s.usage[1].amounts.gpu_uj;
                },
                Reason::Physics,
            ),
            (
                "GPU time beyond the window's GPUs",
                |s| s.usage[0].amounts.gpu_ms = 3_001,
                Reason::Conservation,
            ),
            (
                "idle GPU energy beyond the GPU energy",
                |s| s.usage[0].amounts.gpu_idle_uj = s.usage[0].amounts.gpu_uj + 1,
                Reason::Conservation,
            ),
            (
                "tensor time beyond the GPU time",
                |s| s.usage[0].amounts.gpu_tensor_us = s.usage[0].amounts.gpu_ms * 1000 + 1,
                Reason::Conservation,
            ),
            (
                "capped energy of a job beyond its GPU energy",
                |s| s.job_totals[0].amounts.gpu_capped_uj = s.job_totals[0].amounts.gpu_uj + 1,
                Reason::Conservation,
            ),
            (
                "a window longer than the agent ran",
                |s| s.usage_window.as_mut().unwrap().span_ms = 400 * 86_400_000,
                Reason::Range,
            ),
            (
                "more GPUs than a node has",
                |s| s.usage_window.as_mut().unwrap().gpus = 65,
                Reason::TooMany,
            ),
        ];
        for (what, f, want) in cases {
            let mut bad = s.clone();
            f(&mut bad);
            assert_eq!(reason(bad), want, "{what}");
        }
    }

    #[test]
    fn too_many_entries() {
        let mut s = sample();
        let u = s.usage[1].clone();
        s.usage.extend(std::iter::repeat_n(
            Usage {
                amounts: Amounts::default(),
                ..u
            },
            5_000,
        ));
        assert_eq!(reason(s), Reason::TooMany);
        let mut s = sample();
        let g = s.gpus[0].clone();
        s.gpus = vec![
            Gpu {
                energy_delta_mj: None,
                ..g
            };
            65
        ];
        assert_eq!(reason(s), Reason::TooMany);
    }

    #[test]
    fn names_are_rejected_while_parsing_with_their_reason() {
        let good = sample().to_json();
        assert!(Sample::from_json(good.as_bytes()).is_ok());
        for (from, to) in [
            (
                "\"proj-a\"",
                "\"x' OR \\\"project\\\" =~ /.*/ OR \\\"project\\\" = 'y\"",
            ),
            ("\"proj-a\"", "\"a,b\""),
            ("\"jane.doe@corp.example\"", "\"o'brien\""),
            ("\"n1\"", "\"n 1\""),
            ("\"H100\"", "\"H100\\nevil\""),
            ("\"H100\"", "\"end\\\\\""),
        ] {
            let bad = good.replacen(from, to, 1);
            assert_ne!(bad, good);
            let e = Invalid::from(Sample::from_json(bad.as_bytes()).unwrap_err());
            assert_eq!(e.reason, Reason::Name, "{to}: {e}");
        }
        let e = Invalid::from(Sample::from_json(b"{\"schema\":1,").unwrap_err());
        assert_eq!(e.reason, Reason::Json);
        let e = Invalid::from(
            Sample::from_json(good.replace("\"schema\":1", "\"schema\":2").as_bytes()).unwrap_err(),
        );
        assert_eq!(e.reason, Reason::Schema);
    }

    proptest::proptest! {
        /// Any bytes: parsing and checking return, never panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            if let Ok(s) = Sample::from_json(&bytes) {
                let _ = check_sample(s, NOW, &Limits::default());
            }
        }

        /// A valid sample with one byte changed: parsed or rejected, never a panic, and
        /// whatever passes still conserves energy.
        #[test]
        fn mutated_samples_are_rejected_or_conserve(pos in 0usize..2000, digit in 0u8..10) {
            let json = sample().to_json().into_bytes();
            let mut bytes = json.clone();
            let i = pos % bytes.len();
            if bytes[i].is_ascii_digit() {
                bytes[i] = b'0' + digit;
            } else {
                bytes[i] = b'x';
            }
            if let Ok(s) = Sample::from_json(&bytes) {
                if let Ok(v) = check_sample(s, NOW, &Limits::default()) {
                    let m = v.class_energy();
                    let used: u128 = v.usage.iter().map(|u| u128::from(u.amounts.gpu_uj)).sum();
                    // No usage (a key mangled away) bills nothing; any usage bills exactly.
                    proptest::prop_assert!(v.usage.is_empty() || used == m.gpu_uj);
                }
            }
        }
    }
}
