//! Fuzz targets for everything that enters nodewatt from outside, shared by the stable
//! property-based runner (`tests/fuzz.rs`, bounded by time, run by `.ci/run`) and the
//! `cargo fuzz` targets (`cargo-fuzz/`, nightly).
//!
//! Each target takes untrusted input and returns `Err` when an invariant breaks; a panic
//! is a failure too. The invariants are what the rest of the system relies on: whatever
//! the collector admits encodes into line protocol InfluxDB parses, with no negative
//! counter and usage that sums to the measured energy; a job file either parses into
//! typed names or is rejected; a config either loads with every value in range or is an
//! error.

pub mod gen;

use std::collections::HashMap;

use influxdb_line_protocol::{parse_lines, FieldValue};
use nodewatt_collector::config::{Config as CollectorConfig, ValidationConfig};
use nodewatt_collector::ingest::pipeline::Pipeline;
use nodewatt_collector::validate::{Admitted, Gate};
use nodewatt_wire::{Sample, ValidSample};

/// The receiver's clock in every target: generated samples are placed around it.
pub const NOW_MS: u64 = 1_763_700_000_000;

const MEASUREMENTS: [&str; 9] = [
    "agent",
    "agent_source",
    "gpu",
    "cpu",
    "rapl",
    "hwmon",
    "thermal",
    "usage",
    "job_total",
];

/// A message as the broker delivers it, through the collector's gate.
pub fn message(topic: &str, payload: &[u8]) -> Result<(), String> {
    let mut gate = Gate::new(&ValidationConfig::default());
    match gate.admit(topic, payload, NOW_MS) {
        Ok(Admitted::Sample { sample, points }) => {
            let lines = check_lines(gate.lines())?;
            if lines != points {
                return Err(format!("{points} points reported, {lines} lines encoded"));
            }
            conserves(&sample)
        }
        Ok(Admitted::Status { .. }) | Err(_) => Ok(()),
    }
}

/// A valid sample (as an agent makes it) must be admitted, and its line protocol must
/// carry exactly its amounts and names.
pub fn roundtrip(sample: &Sample) -> Result<(), String> {
    let topic = format!(
        "{}/{}/{}/sample",
        nodewatt_wire::TOPIC_ROOT,
        sample.cluster,
        sample.node
    );
    let mut gate = Gate::new(&ValidationConfig::default());
    let admitted = gate
        .admit(&topic, sample.to_json().as_bytes(), NOW_MS)
        .map_err(|e| format!("a valid sample was rejected: {e}"))?;
    let Admitted::Sample { points, .. } = admitted else {
        return Err("a sample was admitted as a status".into());
    };
    let text = std::str::from_utf8(gate.lines()).map_err(|e| e.to_string())?;
    if check_lines(gate.lines())? != points {
        return Err("points and lines differ".into());
    }
    // Usage per (project, user): the sum of the sample's entries.
    let mut want: HashMap<(String, String), i64> = HashMap::new();
    for u in &sample.usage {
        let user = u
            .user
            .as_deref()
            .unwrap_or(nodewatt_collector::lineproto::NO_USER);
        *want
            .entry((u.project.to_string(), user.to_string()))
            .or_default() += u.amounts.gpu_uj as i64;
    }
    let mut got: HashMap<(String, String), i64> = HashMap::new();
    let mut totals = 0;
    for line in parse_lines(text) {
        let line = line.map_err(|e| e.to_string())?;
        let tag = |k: &str| {
            line.series
                .tag_set
                .as_ref()
                .and_then(|t| t.iter().find(|(n, _)| n.as_str() == k))
                .map(|(_, v)| v.to_string())
        };
        if tag("cluster").as_deref() != Some(sample.cluster.as_str())
            || tag("node").as_deref() != Some(sample.node.as_str())
        {
            return Err(format!("cluster or node tag changed in {line}"));
        }
        match line.series.measurement.as_str() {
            "usage" => {
                let key = (
                    tag("project").unwrap_or_default(),
                    tag("user").unwrap_or_default(),
                );
                got.insert(key, int_field(&line, "energy_gpu_uj")?);
            }
            "job_total" => {
                let job = tag("job").unwrap_or_default();
                let t = sample
                    .job_totals
                    .iter()
                    .find(|t| t.job.as_str() == job)
                    .ok_or_else(|| format!("job_total for unknown job {job}"))?;
                if int_field(&line, "energy_uj")? != t.amounts.energy_uj() as i64
                    || tag("project").as_deref() != Some(t.project.as_str())
                    || tag("user").as_deref() != Some(t.user.as_str())
                {
                    return Err(format!("job total changed: {line}"));
                }
                totals += 1;
            }
            _ => {}
        }
    }
    if got != want {
        return Err(format!("usage lines {got:?}, sample {want:?}"));
    }
    if totals != sample.job_totals.len() {
        return Err(format!(
            "{totals} job_total lines for {} totals",
            sample.job_totals.len()
        ));
    }
    Ok(())
}

fn int_field(line: &influxdb_line_protocol::ParsedLine<'_>, name: &str) -> Result<i64, String> {
    match line.field_value(name) {
        Some(FieldValue::I64(v)) => Ok(*v),
        other => Err(format!("{name} is {other:?} in {line}")),
    }
}

/// Every line parses, in a known measurement, with no negative integer, no non-finite
/// float and a timestamp after 2020. Returns the number of lines.
pub fn check_lines(lines: &[u8]) -> Result<usize, String> {
    let text = std::str::from_utf8(lines).map_err(|e| format!("line protocol: {e}"))?;
    let mut n = 0;
    for line in parse_lines(text) {
        let line = line.map_err(|e| format!("line protocol does not parse: {e}"))?;
        let m = line.series.measurement.as_str();
        if !MEASUREMENTS.contains(&m) {
            return Err(format!("unknown measurement {m:?}"));
        }
        for (k, v) in &line.field_set {
            let bad = match v {
                FieldValue::I64(i) => *i < 0,
                FieldValue::F64(f) => !f.is_finite(),
                _ => false,
            };
            if bad {
                return Err(format!("field {k} = {v:?} in {line}"));
            }
        }
        if line.timestamp.is_none_or(|t| t < 1_577_836_800_000) {
            return Err(format!("timestamp {:?} in {line}", line.timestamp));
        }
        n += 1;
    }
    Ok(n)
}

/// What passes bills exactly the measured energy.
fn conserves(s: &ValidSample) -> Result<(), String> {
    // The measure is the usage window when the message declares one, else its own deltas.
    let Some(m) = s.usage_cover() else {
        return Ok(());
    };
    let sum = |f: fn(&nodewatt_wire::Amounts) -> u64| -> u128 {
        s.usage.iter().map(|u| u128::from(f(&u.amounts))).sum()
    };
    if sum(|a| a.gpu_uj) != u128::from(m.gpu_uj)
        || sum(|a| a.cpu_uj) != u128::from(m.cpu_uj)
        || sum(|a| a.dram_uj) != u128::from(m.dram_uj)
    {
        return Err("admitted usage does not sum to the measured energy".into());
    }
    Ok(())
}

/// A job file from the registry directory.
pub fn registry(text: &str) -> Result<(), String> {
    let Ok(job) = nodewatt_agent::accounting::registry::parse_job(text) else {
        return Ok(());
    };
    // What parsed renders back into a file that parses to the same job.
    let gpus: Vec<&str> = job.gpus.iter().map(|g| g.as_str()).collect();
    let mut again = format!(
        "job={}\nproject={}\nuser={}\ngpus={}\nstart_ms={}\n",
        job.id,
        job.project,
        job.user,
        gpus.join(","),
        job.start_ms
    );
    if let Some(end) = job.end_ms {
        again += &format!("end_ms={end}\n");
    }
    match nodewatt_agent::accounting::registry::parse_job(&again) {
        Ok(j) if j == job => Ok(()),
        other => Err(format!("{job:?} rendered as {again:?} parses to {other:?}")),
    }
}

/// An agent config file: an error, or a config whose parts can all be built.
pub fn agent_config(text: &str) -> Result<(), String> {
    let Ok(cfg) = nodewatt_agent::config::Config::parse(text) else {
        return Ok(());
    };
    let _ = cfg.nvml_timeout();
    let _ =
        nodewatt_agent::publish::outbox::Outbox::new(cfg.outbox.capacity, cfg.outbox.max_in_flight);
    if let Some(m) = &cfg.mqtt {
        let _ = m.options("fuzz");
    }
    Ok(())
}

/// A collector config file: an error, or a config whose parts can all be built.
pub fn collector_config(text: &str) -> Result<(), String> {
    let Ok(cfg) = CollectorConfig::parse(text, std::path::Path::new("fuzz.toml")) else {
        return Ok(());
    };
    let _ = Gate::new(&cfg.validation);
    let _ = Pipeline::new(cfg.batch.clone());
    if let Some(m) = &cfg.mqtt {
        let _ = m.options("fuzz");
    }
    Ok(())
}
