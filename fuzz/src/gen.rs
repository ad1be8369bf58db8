//! Input generators: valid inputs as the product makes them (agent samples, prolog job
//! files, the shipped configs), and hostile variants of each (structured mutations that
//! keep most of the input valid, so the checks deep inside are reached).

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};

use nodewatt_wire::{
    Amounts, Gpu, HwmonSensor, JobTotal, Project, RaplDomain, Sample, SensorKind, ThermalZone,
    Usage, TOPIC_ROOT,
};

use crate::NOW_MS;

/// Cluster, node, project and job names: 1-64 of `A-Z a-z 0-9 . _ -`.
pub fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

/// Directory-service user names.
pub fn user() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._@-]{1,128}"
}

/// Hardware labels as sysfs and NVML report them: any printable text but backslash.
pub fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_:-]{1,20}",
        "[^\\p{Cc}\\\\]{1,40}",
        Just("NVIDIA H100 80GB HBM3".to_string()),
        Just("a,b=c d\"e'".to_string()),
    ]
}

fn parse<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("generated names follow the rule")
}

/// Splits `total` into parts proportional to `weights`, summing exactly to `total`.
fn split(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|w| u128::from(*w)).sum::<u128>().max(1);
    let mut parts: Vec<u64> = weights
        .iter()
        .map(|w| (u128::from(total) * u128::from(*w) / sum) as u64)
        .collect();
    let given: u64 = parts.iter().sum();
    if let Some(last) = parts.last_mut() {
        *last += total - given;
    }
    parts
}

#[derive(Debug, Clone)]
struct Shape {
    cluster: String,
    node: String,
    interval_ms: u64,
    merged: u32,
    age_ms: u64,
    uptime_ms: u64,
    gpu_w: Vec<(u64, String)>,
    package_w: u64,
    dram_w: Option<u64>,
    cores: u32,
    jobs: Vec<(String, String, String, u64, u64)>,
    /// Job totals reaching back to 2020: the longest time physics allows energy for.
    old_jobs: bool,
    idle_weight: u64,
    sensors: Vec<(String, String, f64)>,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        (name(), name(), 10u64..=60_000, 0u32..4),
        (0u64..=120_000, 0u64..=10_000_000_000),
        (
            vec((0u64..=1000, label()), 0..8),
            0u64..=1000,
            proptest::option::of(0u64..=500),
            1u32..=256,
        ),
        (
            vec((name(), name(), user(), 1u64..100, 1u64..100), 0..6),
            0u64..100,
            proptest::bool::weighted(0.2),
        ),
        vec((label(), label(), -50.0f64..150.0), 0..4),
    )
        .prop_map(
            |(
                (cluster, node, interval_ms, merged),
                (age_ms, uptime_ms),
                (gpu_w, package_w, dram_w, cores),
                (jobs, idle_weight, old_jobs),
                sensors,
            )| Shape {
                cluster,
                node,
                interval_ms,
                merged,
                age_ms,
                uptime_ms,
                gpu_w,
                package_w,
                dram_w,
                cores,
                jobs,
                idle_weight,
                old_jobs,
                sensors,
            },
        )
}

/// A sample as an agent makes it: GPUs and RAPL within physics, usage that splits the
/// measured energy exactly among jobs and `_idle`, job totals within a node's power.
pub fn valid_sample() -> impl Strategy<Value = Sample> {
    shape().prop_map(build)
}

fn build(sh: Shape) -> Sample {
    let ts = NOW_MS - sh.age_ms;
    let span = sh.interval_ms * (u64::from(sh.merged) + 1);
    let start = ts - span - sh.uptime_ms;
    let mut s = Sample::new(
        "nodewatt-agent/fuzz",
        parse(&sh.cluster),
        parse(&sh.node),
        sh.interval_ms,
        start,
    );
    s.ts_ms = ts;
    s.span_ms = span;
    s.merged = sh.merged;
    for (i, (w, model)) in sh.gpu_w.iter().enumerate() {
        s.gpus.push(Gpu {
            index: i as u32,
            uuid: format!("GPU-{i}"),
            pci_bus_id: format!("0000:{i:02x}:00.0"),
            model: model.clone(),
            power_w: Some(*w as f64),
            energy_delta_mj: Some(w * span),
            ..Gpu::default()
        });
    }
    s.cpu = Some(nodewatt_wire::Cpu {
        cores: sh.cores,
        ..Default::default()
    });
    let rapl = |zone: &str, name: &str, parent: Option<&str>, w: u64| RaplDomain {
        zone: zone.into(),
        name: name.into(),
        parent: parent.map(str::to_string),
        energy_uj: Some(1),
        max_energy_range_uj: 262_143_328_850,
        energy_delta_uj: Some(w * span * 1000),
        power_w: Some(w as f64),
        error: None,
    };
    s.rapl
        .push(rapl("intel-rapl:0", "package-0", None, sh.package_w));
    if let Some(w) = sh.dram_w {
        s.rapl
            .push(rapl("intel-rapl:0:0", "dram", Some("intel-rapl:0"), w));
    }
    for (i, (chip, sensor_label, v)) in sh.sensors.iter().enumerate() {
        s.hwmon.push(HwmonSensor {
            chip: chip.clone(),
            device: "platform".into(),
            sensor: format!("temp{i}"),
            label: Some(sensor_label.clone()),
            kind: SensorKind::Temp,
            value: Some(*v),
            energy_uj: None,
            error: None,
        });
        s.thermal.push(ThermalZone {
            zone: format!("thermal_zone{i}"),
            zone_type: chip.clone(),
            temp_c: Some(*v),
            error: None,
        });
    }

    // Usage: one entry per job (distinct ids) and one for `_idle`.
    let m = s.class_energy();
    let mut weights: Vec<u64> = sh.jobs.iter().map(|j| j.3).collect();
    weights.push(sh.idle_weight.max(1));
    let gpu = split(m.gpu_uj as u64, &weights);
    let cpu = split(m.cpu_uj as u64, &weights);
    let dram = split(m.dram_uj as u64, &weights);
    let gpu_ms = split(sh.gpu_w.len() as u64 * span, &weights);
    let cpu_us = split(u64::from(sh.cores) * span * 1000, &weights);
    let amounts = |i: usize| Amounts {
        gpu_uj: gpu[i],
        cpu_uj: cpu[i],
        dram_uj: dram[i],
        other_uj: 0,
        gpu_ms: gpu_ms[i],
        cpu_us: cpu_us[i],
        gpu_idle_uj: gpu[i] / 4,
        gpu_capped_uj: gpu[i] / 3,
        gpu_tensor_us: gpu_ms[i] * 500,
    };
    for (i, (job, project, user, _, k)) in sh.jobs.iter().enumerate() {
        let id: nodewatt_wire::JobId = parse(&format!("{i}{}", &job[..job.len().min(60)]));
        let project: Project = parse(project);
        let user: nodewatt_wire::User = parse(user);
        let a = amounts(i);
        s.usage.push(Usage {
            job: Some(id.clone()),
            project: project.clone(),
            user: Some(user.clone()),
            amounts: a,
        });
        // A total over `k` spans: within what a node can draw in that time.
        let scale = |v: u64| v * k;
        let since = if sh.old_jobs {
            1_577_836_800_000 + k
        } else {
            ts - span * k
        };
        s.job_totals.push(JobTotal {
            job: id,
            project,
            user,
            start_ms: since,
            since_ms: since,
            until_ms: ts,
            ended: k % 2 == 0,
            gpus: vec![parse("0")],
            amounts: Amounts {
                gpu_uj: scale(a.gpu_uj),
                cpu_uj: scale(a.cpu_uj),
                dram_uj: scale(a.dram_uj),
                other_uj: 0,
                gpu_ms: scale(a.gpu_ms),
                cpu_us: scale(a.cpu_us),
                gpu_idle_uj: scale(a.gpu_idle_uj),
                gpu_capped_uj: scale(a.gpu_capped_uj),
                gpu_tensor_us: scale(a.gpu_tensor_us),
            },
        });
    }
    s.usage.push(Usage {
        job: None,
        project: Project::idle(),
        user: None,
        amounts: amounts(sh.jobs.len()),
    });
    // Every other sample as an agent with a coarser usage_interval sends it: the usage
    // covers a window longer than the span, and says so.
    if sh.age_ms.is_multiple_of(2) {
        s.usage_window = s.usage_cover().map(|mut w| {
            w.span_ms += sh.interval_ms;
            w
        });
    }
    s
}

/// JSON values a hostile node might put anywhere.
pub fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(u64::MAX)),
        Just(json!(i64::MAX)),
        Just(json!(i64::MAX as u64 + 1)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1e308)),
        Just(json!(null)),
        Just(json!([])),
        Just(json!({})),
        Just(json!(true)),
        Just(json!("x' OR \"project\" =~ /.*/ OR 'y")),
        Just(json!("a,b=c d")),
        Just(json!("_idle")),
        Just(json!("")),
        Just(json!("x".repeat(200))),
        any::<u64>().prop_map(|v| json!(v)),
        any::<i64>().prop_map(|v| json!(v)),
        (0u64..=u64::MAX / 1000).prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
        "[^\\\\]{0,80}".prop_map(|v| json!(v)),
        name().prop_map(|v| json!(v)),
    ]
}

/// One change to a JSON document: at the `Index`-th node (depth first), replace its
/// value, remove it, or duplicate an array element.
#[derive(Debug, Clone)]
pub enum Mutation {
    Replace(Index, Value),
    /// Replace the `Index`-th number only: counters and times are where sums overflow.
    Number(Index, Value),
    /// Replace every amount of the `Index`-th usage entry or job total: bills are sums
    /// of amounts.
    Amounts(Index, Vec<Value>),
    Remove(Index),
    Duplicate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), hostile_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        4 => (any::<Index>(), extreme_number()).prop_map(|(i, v)| Mutation::Number(i, v)),
        2 => (any::<Index>(), vec(extreme_number(), 6)).prop_map(|(i, v)| Mutation::Amounts(i, v)),
        1 => any::<Index>().prop_map(Mutation::Remove),
        1 => any::<Index>().prop_map(Mutation::Duplicate),
    ]
}

fn extreme_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(i64::MAX)),
        Just(json!(i64::MAX / 2 + 1)),
        Just(json!(u64::MAX)),
        Just(json!(0)),
        Just(json!(1_577_836_800_000u64)),
        any::<u64>().prop_map(|v| json!(v)),
        any::<u32>().prop_map(|v| json!(v)),
    ]
}

fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(c, p, out);
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(c, p, out);
            }
        }
        _ => {}
    }
}

pub fn apply(doc: &mut Value, m: &Mutation) {
    let mut all = Vec::new();
    pointers(doc, String::new(), &mut all);
    match m {
        Mutation::Number(..) => all.retain(|p| doc.pointer(p).is_some_and(Value::is_number)),
        Mutation::Amounts(..) => {
            all.retain(|p| doc.pointer(p).is_some_and(|v| v.get("gpu_uj").is_some()))
        }
        _ => {}
    }
    if all.is_empty() {
        return;
    }
    let (Mutation::Replace(i, _)
    | Mutation::Number(i, _)
    | Mutation::Amounts(i, _)
    | Mutation::Remove(i)
    | Mutation::Duplicate(i)) = m;
    let path = &all[i.index(all.len())];
    let (parent, last) = path.rsplit_once('/').expect("pointers start with /");
    match m {
        Mutation::Replace(_, v) | Mutation::Number(_, v) => {
            if let Some(slot) = doc.pointer_mut(path) {
                *slot = v.clone();
            }
        }
        Mutation::Amounts(_, values) => {
            if let Some(Value::Object(a)) = doc.pointer_mut(path) {
                let keys = [
                    "gpu_uj", "cpu_uj", "dram_uj", "other_uj", "gpu_ms", "cpu_us",
                ];
                for (k, v) in keys.iter().zip(values) {
                    a.insert(k.to_string(), v.clone());
                }
            }
        }
        Mutation::Remove(_) | Mutation::Duplicate(_) => match doc.pointer_mut(parent) {
            Some(Value::Object(o)) => {
                let key = last.replace("~1", "/").replace("~0", "~");
                if matches!(m, Mutation::Remove(_)) {
                    o.remove(&key);
                }
            }
            Some(Value::Array(a)) => {
                if let Ok(i) = last.parse::<usize>() {
                    if matches!(m, Mutation::Remove(_)) {
                        a.remove(i);
                    } else {
                        let copy = a[i].clone();
                        a.insert(i, copy);
                    }
                }
            }
            _ => {}
        },
    }
}

/// A message as a broken or hostile node sends it: a valid sample with a few structured
/// changes, sometimes a byte flipped, sometimes on another node's or a status topic.
pub fn hostile_message() -> impl Strategy<Value = (String, Vec<u8>)> {
    (
        valid_sample(),
        vec(mutation(), 0..4),
        proptest::option::weighted(0.1, (any::<Index>(), any::<u8>())),
        0u8..10,
    )
        .prop_map(|(s, muts, flip, topic)| {
            let mut doc = serde_json::to_value(&s).expect("a sample serialises");
            for m in &muts {
                apply(&mut doc, m);
            }
            let mut bytes = serde_json::to_vec(&doc).expect("a value serialises");
            if let Some((i, b)) = flip {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let (cluster, node) = (s.cluster.as_str(), s.node.as_str());
            let topic = match topic {
                0 => format!("{TOPIC_ROOT}/{cluster}/other/sample"),
                1 => format!("{TOPIC_ROOT}/{cluster}/{node}/status"),
                2 => format!("{TOPIC_ROOT}/{cluster}/{node}/sample/x"),
                _ => format!("{TOPIC_ROOT}/{cluster}/{node}/sample"),
            };
            (topic, bytes)
        })
}

/// Job files as a prolog writes them, with lines added, changed or garbled.
pub fn registry_file() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("job"),
        Just("project"),
        Just("user"),
        Just("gpus"),
        Just("cpus"),
        Just("start_ms"),
        Just("end_ms"),
        Just(" job "),
        Just("JOB"),
        Just(""),
    ];
    let value = prop_oneof![
        name(),
        user(),
        "[0-9]{1,25}",
        "[^\\n]{0,40}",
        Just("0, 1,,GPU-a".to_string()),
        Just(String::new()),
    ];
    let line = prop_oneof![
        4 => (key, value).prop_map(|(k, v)| format!("{k}={v}")),
        1 => "[^\\n]{0,40}",
        1 => Just("# comment".to_string()),
    ];
    let valid = (
        name(),
        name(),
        user(),
        1_600_000_000_000u64..2_000_000_000_000,
    )
        .prop_map(|(j, p, u, t)| {
            format!("job={j}\nproject={p}\nuser={u}\ngpus=0,1\ncpus=16\nstart_ms={t}\n")
        });
    (valid, vec(line, 0..6), any::<Index>(), any::<bool>()).prop_map(|(valid, extra, at, crlf)| {
        let mut lines: Vec<String> = valid.lines().map(str::to_string).collect();
        for (n, l) in extra.into_iter().enumerate() {
            let i = (at.index(lines.len() + 1) + n) % (lines.len() + 1);
            lines.insert(i, l);
        }
        lines.join(if crlf { "\r\n" } else { "\n" })
    })
}

pub const AGENT_CONFIGS: [&str; 2] = [
    include_str!("../../config/agent.toml"),
    include_str!("../../config/agent-simulated.toml"),
];
pub const COLLECTOR_CONFIG: &str = include_str!("../../config/collector.toml");

/// A shipped config with values replaced by hostile ones, lines removed or repeated.
pub fn mutated_config(base: &'static str) -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("0"),
        Just("-1"),
        Just("18446744073709551615"),
        Just("9223372036854775807"),
        Just("1e300"),
        Just("nan"),
        Just("inf"),
        Just("\"0s\""),
        Just("\"1ms\""),
        Just("\"100000000000d\""),
        Just("\"\""),
        Just("\"x y\""),
        Just("\"../../etc/passwd\""),
        Just("[]"),
        Just("{}"),
        Just("true"),
    ];
    (vec((any::<Index>(), 0u8..6, value), 1..4), any::<bool>()).prop_map(move |(edits, open)| {
        // Sometimes uncommented, so the options the shipped file only documents are
        // fuzzed too.
        let mut lines: Vec<String> = base
            .lines()
            .map(|l| {
                let documented = l.strip_prefix("# ").filter(|r| open && r.contains(" = "));
                documented.unwrap_or(l).to_string()
            })
            .collect();
        for (at, op, v) in edits {
            let i = at.index(lines.len());
            match op {
                0 => {
                    lines.remove(i);
                }
                1 => {
                    let copy = lines[i].clone();
                    lines.insert(i, copy);
                }
                _ => {
                    if let Some((k, _)) = lines[i].split_once(" = ") {
                        lines[i] = format!("{k} = {v}");
                    }
                }
            }
            if lines.is_empty() {
                break;
            }
        }
        lines.join("\n")
    })
}
