//! Checks every message before anything is written: size, schema, topic against payload,
//! timestamp window, numbers in range, and names that survive line protocol unchanged.
//! A rejected message is counted by reason and never written.

use nodewatt_wire::{parse_topic, Sample, Status, TopicKind, WireError};

/// Why a message was rejected; `as_str` is the label in logs and health points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    TooLarge,
    Json,
    Schema,
    Topic,
    NodeMismatch,
    Timestamp,
    Range,
    Name,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::TooLarge,
        Reason::Json,
        Reason::Schema,
        Reason::Topic,
        Reason::NodeMismatch,
        Reason::Timestamp,
        Reason::Range,
        Reason::Name,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub reason: Reason,
    pub detail: String,
}

fn reject(reason: Reason, detail: impl Into<String>) -> Rejected {
    Rejected {
        reason,
        detail: detail.into(),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_future_ms: u64,
    pub max_age_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Sample(Box<Sample>),
    Status {
        cluster: String,
        node: String,
        status: Status,
    },
}

/// A tag value or string field that round-trips through InfluxDB 1.x line protocol:
/// non-empty, bounded, no control characters (a newline would split the line), and no
/// backslash (1.x does not unescape `\\` in tags, and a trailing one cannot be written).
pub fn check_name(what: &str, v: &str) -> Result<(), Rejected> {
    if v.is_empty() || v.len() > 256 {
        return Err(reject(
            Reason::Name,
            format!("{what}: length {} not in 1..=256", v.len()),
        ));
    }
    if let Some(c) = v.chars().find(|c| c.is_control() || *c == '\\') {
        return Err(reject(Reason::Name, format!("{what} {v:?} contains {c:?}")));
    }
    Ok(())
}

fn in_range(what: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), Rejected> {
    match v {
        Some(x) if !(x.is_finite() && (lo..=hi).contains(&x)) => Err(reject(
            Reason::Range,
            format!("{what} = {x} outside {lo}..={hi}"),
        )),
        _ => Ok(()),
    }
}

/// Integers become signed 64-bit fields in InfluxDB.
fn fits_i64(what: &str, v: Option<u64>) -> Result<(), Rejected> {
    match v {
        Some(x) if x > i64::MAX as u64 => Err(reject(
            Reason::Range,
            format!("{what} = {x} exceeds a signed 64-bit integer"),
        )),
        _ => Ok(()),
    }
}

pub fn validate(
    topic: &str,
    payload: &[u8],
    now_ms: u64,
    limits: &Limits,
) -> Result<Message, Rejected> {
    if payload.len() > limits.max_bytes {
        return Err(reject(
            Reason::TooLarge,
            format!("{} bytes, limit {}", payload.len(), limits.max_bytes),
        ));
    }
    let Some((cluster, node, kind)) = parse_topic(topic) else {
        return Err(reject(
            Reason::Topic,
            format!("not a nodewatt topic: {topic:?}"),
        ));
    };
    check_name("topic cluster", cluster)?;
    check_name("topic node", node)?;
    match kind {
        TopicKind::Status => {
            let status: Status = serde_json::from_slice(payload)
                .map_err(|e| reject(Reason::Json, format!("status: {e}")))?;
            for s in [&status.agent, &status.reason].into_iter().flatten() {
                check_name("status text", s)?;
            }
            Ok(Message::Status {
                cluster: cluster.to_string(),
                node: node.to_string(),
                status,
            })
        }
        TopicKind::Sample => {
            let s = Sample::from_json(payload).map_err(|e| match e {
                WireError::Schema { .. } => reject(Reason::Schema, e.to_string()),
                WireError::Json(_) => reject(Reason::Json, e.to_string()),
            })?;
            if s.cluster != cluster || s.node != node {
                return Err(reject(
                    Reason::NodeMismatch,
                    format!(
                        "topic says {cluster}/{node}, payload says {}/{}",
                        s.cluster, s.node
                    ),
                ));
            }
            if s.ts_ms > now_ms + limits.max_future_ms || s.ts_ms + limits.max_age_ms < now_ms {
                return Err(reject(
                    Reason::Timestamp,
                    format!(
                        "ts_ms {} is outside the accepted window around {now_ms}",
                        s.ts_ms
                    ),
                ));
            }
            check_sample(&s)?;
            Ok(Message::Sample(Box::new(s)))
        }
    }
}

fn check_sample(s: &Sample) -> Result<(), Rejected> {
    check_name("agent", &s.agent)?;
    if !(10..=3_600_000).contains(&s.interval_ms) {
        return Err(reject(
            Reason::Range,
            format!("interval_ms = {}", s.interval_ms),
        ));
    }
    for (what, v) in [
        ("ts_ms", s.ts_ms),
        ("seq", s.seq),
        ("span_ms", s.span_ms),
        ("agent_start_ms", s.agent_start_ms),
    ] {
        fits_i64(what, Some(v))?;
    }
    for src in &s.sources {
        check_name("source name", &src.name)?;
        fits_i64("read_us", Some(src.read_us))?;
    }
    for g in &s.gpus {
        check_name("gpu uuid", &g.uuid)?;
        check_name("gpu model", &g.model)?;
        in_range("gpu power_w", g.power_w, 0.0, 10_000.0)?;
        in_range("gpu temp_c", g.temp_c, -100.0, 250.0)?;
        in_range("gpu mem_temp_c", g.mem_temp_c, -100.0, 250.0)?;
        in_range("gpu util_pct", g.util_pct, 0.0, 100.0)?;
        in_range("gpu mem_util_pct", g.mem_util_pct, 0.0, 100.0)?;
        for (what, v) in [
            ("gpu energy_mj", g.energy_mj),
            ("gpu energy_delta_mj", g.energy_delta_mj),
            ("gpu mem_used_bytes", g.mem_used_bytes),
            ("gpu mem_total_bytes", g.mem_total_bytes),
            ("gpu clock_event_reasons", g.clock_event_reasons),
            ("gpu ecc_corrected", g.ecc_corrected),
            ("gpu ecc_uncorrected", g.ecc_uncorrected),
        ] {
            fits_i64(what, v)?;
        }
    }
    if let Some(c) = &s.cpu {
        in_range("cpu util_pct", c.util_pct, 0.0, 100.0)?;
        for (what, v) in [("load1", c.load1), ("load5", c.load5), ("load15", c.load15)] {
            in_range(what, Some(v), 0.0, 1e6)?;
        }
        let t = c.ticks;
        for v in [
            t.user, t.nice, t.system, t.idle, t.iowait, t.irq, t.softirq, t.steal,
        ] {
            fits_i64("cpu ticks", Some(v))?;
        }
        fits_i64("cpu mem_total_bytes", Some(c.mem_total_bytes))?;
        fits_i64("cpu mem_available_bytes", c.mem_available_bytes)?;
    }
    for d in &s.rapl {
        check_name("rapl zone", &d.zone)?;
        check_name("rapl name", &d.name)?;
        in_range("rapl power_w", d.power_w, 0.0, 100_000.0)?;
        fits_i64("rapl energy_uj", d.energy_uj)?;
        fits_i64("rapl energy_delta_uj", d.energy_delta_uj)?;
        fits_i64("rapl max_energy_range_uj", Some(d.max_energy_range_uj))?;
    }
    for h in &s.hwmon {
        check_name("hwmon chip", &h.chip)?;
        check_name("hwmon device", &h.device)?;
        check_name("hwmon sensor", &h.sensor)?;
        if let Some(l) = &h.label {
            check_name("hwmon label", l)?;
        }
        in_range("hwmon value", h.value, -1e9, 1e9)?;
        fits_i64("hwmon energy_uj", h.energy_uj)?;
    }
    let amounts = |a: &nodewatt_wire::Amounts| {
        for v in [
            a.gpu_uj, a.cpu_uj, a.dram_uj, a.other_uj, a.gpu_ms, a.cpu_us,
        ] {
            fits_i64("usage amount", Some(v))?;
        }
        Ok::<(), Rejected>(())
    };
    for u in &s.usage {
        check_name("usage project", &u.project)?;
        for v in [&u.job, &u.user].into_iter().flatten() {
            check_name("usage job or user", v)?;
        }
        amounts(&u.amounts)?;
    }
    for t in &s.job_totals {
        for v in [&t.job, &t.project, &t.user] {
            check_name("job total name", v)?;
        }
        for g in &t.gpus {
            check_name("job total gpu", g)?;
        }
        for v in [t.start_ms, t.since_ms, t.until_ms] {
            fits_i64("job total time", Some(v))?;
        }
        amounts(&t.amounts)?;
    }
    for t in &s.thermal {
        check_name("thermal zone", &t.zone)?;
        check_name("thermal type", &t.zone_type)?;
        in_range("thermal temp_c", t.temp_c, -273.0, 1_000.0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodewatt_wire::{Gpu, HwmonSensor, SensorKind};

    const NOW: u64 = 1_763_700_000_000;
    const LIMITS: Limits = Limits {
        max_bytes: 64 * 1024,
        max_future_ms: 300_000,
        max_age_ms: 7 * 86_400_000,
    };
    const TOPIC: &str = "nodewatt/v1/c1/n1/sample";

    fn sample() -> Sample {
        let mut s = Sample::new("nodewatt-agent/0.1.0", "c1", "n1", 1000, NOW - 60_000);
        s.ts_ms = NOW;
        s.gpus.push(Gpu {
            index: 0,
            uuid: "GPU-1".into(),
            pci_bus_id: "0".into(),
            model: "H100".into(),
            power_w: Some(300.0),
            ..Gpu::default()
        });
        s
    }

    fn check(s: &Sample) -> Result<Message, Rejected> {
        validate(TOPIC, s.to_json().as_bytes(), NOW, &LIMITS)
    }

    fn reason(s: &Sample) -> Reason {
        check(s).unwrap_err().reason
    }

    #[test]
    fn accepts_a_good_sample() {
        assert!(matches!(check(&sample()), Ok(Message::Sample(_))));
    }

    #[test]
    fn rejects_by_reason() {
        assert_eq!(
            validate(TOPIC, &vec![b' '; 70_000], NOW, &LIMITS)
                .unwrap_err()
                .reason,
            Reason::TooLarge
        );
        assert_eq!(
            validate(TOPIC, b"{nope", NOW, &LIMITS).unwrap_err().reason,
            Reason::Json
        );
        let v2 = sample().to_json().replace("\"schema\":1", "\"schema\":2");
        assert_eq!(
            validate(TOPIC, v2.as_bytes(), NOW, &LIMITS)
                .unwrap_err()
                .reason,
            Reason::Schema
        );
        let payload = sample().to_json();
        assert_eq!(
            validate("other/topic", payload.as_bytes(), NOW, &LIMITS)
                .unwrap_err()
                .reason,
            Reason::Topic
        );
        let err =
            validate("nodewatt/v1/c1/n2/sample", payload.as_bytes(), NOW, &LIMITS).unwrap_err();
        assert_eq!(err.reason, Reason::NodeMismatch);
        assert!(
            err.detail.contains("c1/n2") && err.detail.contains("c1/n1"),
            "{}",
            err.detail
        );

        let mut s = sample();
        s.ts_ms = NOW + 301_000;
        assert_eq!(reason(&s), Reason::Timestamp);
        s.ts_ms = NOW - 8 * 86_400_000;
        assert_eq!(reason(&s), Reason::Timestamp);

        let mut s = sample();
        s.gpus[0].power_w = Some(1e12);
        assert_eq!(reason(&s), Reason::Range);
        let mut s = sample();
        s.gpus[0].util_pct = Some(101.0);
        assert_eq!(reason(&s), Reason::Range);
        let mut s = sample();
        s.gpus[0].energy_mj = Some(u64::MAX);
        assert_eq!(reason(&s), Reason::Range);
        let mut s = sample();
        s.interval_ms = 0;
        assert_eq!(reason(&s), Reason::Range);
    }

    #[test]
    fn old_samples_from_an_outage_are_accepted() {
        let mut s = sample();
        s.ts_ms = NOW - 3 * 86_400_000;
        assert!(check(&s).is_ok());
    }

    #[test]
    fn hostile_names_are_rejected() {
        for bad in [
            "a\nb",
            "tab\there",
            "end\\",
            "mid\\dle",
            "",
            "nul\0",
            &"x".repeat(257),
        ] {
            let mut s = sample();
            s.gpus[0].model = bad.to_string();
            assert_eq!(reason(&s), Reason::Name, "{bad:?}");
        }
        let mut s = sample();
        s.hwmon.push(HwmonSensor {
            chip: "coretemp".into(),
            device: "hwmon1".into(),
            sensor: "temp1".into(),
            label: Some("Core 0\r".into()),
            kind: SensorKind::Temp,
            value: Some(40.0),
            energy_uj: None,
            error: None,
        });
        assert_eq!(reason(&s), Reason::Name);
        // Spaces, commas, equals signs and quotes are fine: the encoder escapes them.
        let mut s = sample();
        s.gpus[0].model = "NVIDIA H100, \"80GB\"=HBM3".into();
        assert!(check(&s).is_ok());
    }

    #[test]
    fn status_messages() {
        let ok = br#"{"online":false,"reason":"connection lost"}"#;
        let m = validate("nodewatt/v1/c1/n1/status", ok, NOW, &LIMITS).unwrap();
        assert!(
            matches!(m, Message::Status { ref node, ref status, .. } if node == "n1" && !status.online)
        );
        let bad = br#"{"online":true,"reason":"x\ny"}"#;
        assert_eq!(
            validate("nodewatt/v1/c1/n1/status", bad, NOW, &LIMITS)
                .unwrap_err()
                .reason,
            Reason::Name
        );
    }
}
