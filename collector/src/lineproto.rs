//! Samples to InfluxDB line protocol (millisecond timestamps). The schema, with every
//! measurement, tag and field, is documented in docs/schema.md.
//!
//! High-rate series carry only node and device tags, never a job tag, so series
//! cardinality stays nodes × devices. Integers are written as signed (`i`) fields because
//! InfluxDB 1.x has no unsigned type; validation guarantees they fit.

use std::collections::HashMap;

use nodewatt_wire::{Amounts, SensorKind, Status, ValidSample};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    F(f64),
    I(i64),
    B(bool),
    S(&'a str),
}

/// Collects the fields of one point, skipping absent values.
struct Fields<'a>(Vec<(&'a str, Value<'a>)>);

impl Default for Fields<'_> {
    /// Room for the widest point (`gpu`) at once: no regrowing while fields are added.
    fn default() -> Self {
        Fields(Vec::with_capacity(24))
    }
}

impl<'a> Fields<'a> {
    fn f(&mut self, k: &'a str, v: Option<f64>) -> &mut Self {
        if let Some(v) = v {
            self.0.push((k, Value::F(v)));
        }
        self
    }
    fn i(&mut self, k: &'a str, v: Option<u64>) -> &mut Self {
        if let Some(v) = v {
            self.0.push((k, Value::I(v as i64)));
        }
        self
    }
    fn b(&mut self, k: &'a str, v: bool) -> &mut Self {
        self.0.push((k, Value::B(v)));
        self
    }
    fn s(&mut self, k: &'a str, v: Option<&'a str>) -> &mut Self {
        if let Some(v) = v {
            self.0.push((k, Value::S(v)));
        }
        self
    }
}

/// Appends one line; a point without fields is not valid line protocol and is skipped.
/// Returns whether a line was written.
///
/// Written byte by byte into `out`, with the escaping of the `influxdb-line-protocol`
/// crate's builder (a test compares both on arbitrary input): a backslash before `,` and
/// space in the measurement, before `,`, `=` and space in tag keys, tag values and field
/// keys, before `"` in string values, and before every backslash. Floats as Rust's
/// `Display` writes them, integers with an `i`.
pub fn line(
    out: &mut Vec<u8>,
    measurement: &str,
    tags: &[(&str, &str)],
    fields: &[(&str, Value)],
    ts_ms: u64,
) -> bool {
    if fields.is_empty() {
        return false;
    }
    put_escaped(out, measurement, |b| {
        (b == b',') | (b == b' ') | (b == b'\\')
    });
    for (k, v) in tags {
        out.push(b',');
        put_escaped(out, k, is_key_special);
        out.push(b'=');
        put_escaped(out, v, is_key_special);
    }
    let mut sep = b' ';
    for (k, v) in fields {
        out.push(sep);
        sep = b',';
        put_escaped(out, k, is_key_special);
        out.push(b'=');
        match *v {
            Value::F(x) => put_f64(out, x),
            Value::I(x) => {
                out.extend_from_slice(itoa::Buffer::new().format(x).as_bytes());
                out.push(b'i');
            }
            Value::B(true) => out.extend_from_slice(b"true"),
            Value::B(false) => out.extend_from_slice(b"false"),
            Value::S(x) => {
                out.push(b'"');
                put_escaped(out, x, |b| (b == b'"') | (b == b'\\'));
                out.push(b'"');
            }
        }
    }
    out.push(b' ');
    out.extend_from_slice(itoa::Buffer::new().format(ts_ms as i64).as_bytes());
    out.push(b'\n');
    true
}

/// Tag keys, tag values and field keys.
#[inline(always)]
fn is_key_special(b: u8) -> bool {
    (b == b',') | (b == b'=') | (b == b' ') | (b == b'\\')
}

/// Appends `s` with a backslash before each byte `special` names (all ASCII, so never a
/// part of a multi-byte character). Names almost never hold one: a scan without early
/// exit (vectorised) finds that out, and the whole string is copied at once.
#[inline(always)]
fn put_escaped(out: &mut Vec<u8>, s: &str, special: impl Fn(u8) -> bool) {
    let bytes = s.as_bytes();
    if !bytes.iter().fold(false, |any, &b| any | special(b)) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if special(b) {
            out.extend_from_slice(&bytes[start..i]);
            out.push(b'\\');
            start = i;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// `x` as `Display` writes it. A whole number below 2^53 in magnitude is written by
/// `Display` as its integer digits (the shortest representation of such a float is the
/// integer itself), which is what integer formatting writes, much faster; -0 is left to
/// `Display` ("-0").
fn put_f64(out: &mut Vec<u8>, x: f64) {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if x.fract() == 0.0 && x.abs() < EXACT && (x != 0.0 || x.is_sign_positive()) {
        out.extend_from_slice(itoa::Buffer::new().format(x as i64).as_bytes());
    } else {
        struct Append<'a>(&'a mut Vec<u8>);
        impl std::fmt::Write for Append<'_> {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                self.0.extend_from_slice(s.as_bytes());
                Ok(())
            }
        }
        // Appending to a Vec cannot fail.
        let _ = std::fmt::Write::write_fmt(&mut Append(out), format_args!("{x}"));
    }
}

/// Appends all points of a sample; returns how many. Only a checked sample can be
/// encoded: its names are tag-safe and its integers fit InfluxDB's signed fields.
pub fn encode_sample(s: &ValidSample, out: &mut Vec<u8>) -> usize {
    let ts = s.ts_ms;
    let (c, n) = (s.cluster.as_str(), s.node.as_str());
    let span = Some(s.span_ms);
    let mut points = 0;
    let mut put = |out: &mut Vec<u8>, m: &str, tags: &[(&str, &str)], f: &Fields| {
        points += usize::from(line(out, m, tags, &f.0, ts));
    };

    let mut f = Fields::default();
    f.i("seq", Some(s.seq))
        .i("agent_start_ms", Some(s.agent_start_ms))
        .i("interval_ms", Some(s.interval_ms))
        .i("span_ms", span)
        .i("merged", Some(u64::from(s.merged)))
        .s("version", Some(&s.agent));
    if let Some(o) = s.outbox {
        f.i("outbox_len", Some(u64::from(o.len)))
            .i("outbox_merges", Some(o.merges))
            .i("outbox_reconnects", Some(o.reconnects));
    }
    if let Some(a) = s.accounting {
        f.i("registry_jobs", Some(u64::from(a.jobs)))
            .i("registry_rejected_files", Some(a.rejected_files))
            .i("foreign_gpu_processes", Some(a.foreign_gpu_processes))
            .i("registry_errors", Some(a.registry_errors));
    }
    put(out, "agent", &[("cluster", c), ("node", n)], &f);

    for src in &s.sources {
        let mut f = Fields::default();
        f.b("ok", src.ok)
            .i("read_us", Some(src.read_us))
            .i("devices", Some(u64::from(src.devices)));
        put(
            out,
            "agent_source",
            &[("cluster", c), ("node", n), ("source", &src.name)],
            &f,
        );
    }

    for g in &s.gpus {
        let index = g.index.to_string();
        let mut f = Fields::default();
        f.f("power_w", g.power_w)
            .f("power_max_w", g.power_max_w)
            .i("energy_mj", g.energy_mj)
            .i("energy_delta_mj", g.energy_delta_mj)
            .i("span_ms", span)
            .f("temp_c", g.temp_c)
            .f("temp_max_c", g.temp_max_c)
            .f("mem_temp_c", g.mem_temp_c)
            .f("util_pct", g.util_pct)
            .f("mem_util_pct", g.mem_util_pct)
            .i("mem_used_bytes", g.mem_used_bytes)
            .i("mem_total_bytes", g.mem_total_bytes)
            .i("sm_clock_mhz", g.sm_clock_mhz.map(u64::from))
            .i("mem_clock_mhz", g.mem_clock_mhz.map(u64::from))
            .i("clock_event_reasons", g.clock_event_reasons)
            .i("ecc_corrected", g.ecc_corrected)
            .i("ecc_uncorrected", g.ecc_uncorrected)
            .i("processes", Some(g.pids.len() as u64))
            .f("power_limit_w", g.power_limit_w)
            .i("power_capped_ms", g.power_capped_ms)
            .i("thermal_capped_ms", g.thermal_capped_ms)
            .i("answering", Some(u64::from(!(g.lost || g.stalled))))
            .i("lost", g.lost.then_some(1))
            .i("stalled", g.stalled.then_some(1))
            .b("simulated", g.simulated);
        for (name, v) in g.gpm.fields() {
            f.f(name, v);
        }
        let tags = [
            ("cluster", c),
            ("gpu", index.as_str()),
            ("model", &g.model),
            ("node", n),
            ("uuid", &g.uuid),
        ];
        put(out, "gpu", &tags, &f);
        for m in &g.mig {
            let gi = m.gpu_instance_id.to_string();
            let ci = m.compute_instance_id.to_string();
            let mut f = Fields::default();
            f.i("slices", m.slices.map(u64::from))
                .i("mem_used_bytes", m.mem_used_bytes)
                .i("mem_total_bytes", m.mem_total_bytes)
                .i("span_ms", span);
            for (name, v) in m.gpm.fields() {
                f.f(name, v);
            }
            let tags = [
                ("ci", ci.as_str()),
                ("cluster", c),
                ("gi", gi.as_str()),
                ("gpu", index.as_str()),
                ("mig_uuid", &m.uuid),
                ("node", n),
                ("uuid", &g.uuid),
            ];
            put(out, "gpu_mig", &tags, &f);
        }
        // One point per kind and code, counts over the span: SUM() gives events per period.
        for e in &g.events {
            let code = e.code.to_string();
            let mut f = Fields::default();
            f.i("count", Some(e.count)).i("span_ms", span);
            let tags = [
                ("cluster", c),
                ("code", code.as_str()),
                ("gpu", index.as_str()),
                ("kind", e.kind.as_str()),
                ("node", n),
                ("uuid", &g.uuid),
            ];
            put(out, "gpu_event", &tags, &f);
        }
    }

    if let Some(cpu) = &s.cpu {
        let t = cpu.ticks;
        let mut f = Fields::default();
        f.f("util_pct", cpu.util_pct)
            .f("load1", Some(cpu.load1))
            .f("load5", Some(cpu.load5))
            .f("load15", Some(cpu.load15))
            .i("cores", Some(u64::from(cpu.cores)))
            .i("mem_total_bytes", Some(cpu.mem_total_bytes))
            .i("mem_available_bytes", cpu.mem_available_bytes)
            .i("ticks_user", Some(t.user))
            .i("ticks_nice", Some(t.nice))
            .i("ticks_system", Some(t.system))
            .i("ticks_idle", Some(t.idle))
            .i("ticks_iowait", Some(t.iowait))
            .i("ticks_irq", Some(t.irq))
            .i("ticks_softirq", Some(t.softirq))
            .i("ticks_steal", Some(t.steal))
            .i("jobs", Some(cpu.jobs.len() as u64));
        put(out, "cpu", &[("cluster", c), ("node", n)], &f);
    }

    for d in &s.rapl {
        let mut f = Fields::default();
        f.i("energy_uj", d.energy_uj)
            .i("energy_delta_uj", d.energy_delta_uj)
            .i("span_ms", d.energy_uj.and(span))
            .f("power_w", d.power_w);
        let tags = [
            ("cluster", c),
            ("domain", d.name.as_str()),
            ("node", n),
            ("zone", &d.zone),
        ];
        put(out, "rapl", &tags, &f);
    }

    for h in &s.hwmon {
        let kind = match h.kind {
            SensorKind::Temp => "temp",
            SensorKind::Fan => "fan",
            SensorKind::Power => "power",
            SensorKind::Energy => "energy",
        };
        let mut f = Fields::default();
        f.f("value", h.value).i("energy_uj", h.energy_uj);
        let mut tags = vec![
            ("chip", h.chip.as_str()),
            ("cluster", c),
            ("device", &h.device),
            ("kind", kind),
        ];
        if let Some(l) = &h.label {
            tags.push(("label", l));
        }
        tags.extend([("node", n), ("sensor", h.sensor.as_str())]);
        put(out, "hwmon", &tags, &f);
    }

    for z in &s.thermal {
        let mut f = Fields::default();
        f.f("temp_c", z.temp_c);
        put(
            out,
            "thermal",
            &[
                ("cluster", c),
                ("node", n),
                ("type", &z.zone_type),
                ("zone", &z.zone),
            ],
            &f,
        );
    }
    // Usage per (project, user) on this node: jobs are summed, so series stay bounded
    // by projects × users × nodes however many jobs run. Grouping is linear in entries
    // (an index by owner), in order of first appearance.
    let mut by_owner: Vec<(&str, &str, Amounts, u64)> = Vec::new();
    let mut index: HashMap<(&str, &str), usize> = HashMap::with_capacity(s.usage.len());
    for u in &s.usage {
        let owner = (u.project.as_str(), u.user.as_deref().unwrap_or(NO_USER));
        let i = *index.entry(owner).or_insert_with(|| {
            by_owner.push((owner.0, owner.1, Amounts::default(), 0));
            by_owner.len() - 1
        });
        let (_, _, a, jobs) = &mut by_owner[i];
        a.add(&u.amounts);
        *jobs += u64::from(u.job.is_some());
    }
    // The time the usage covers: its own window when published coarser than telemetry.
    let usage_span = Some(s.usage_window.map_or(s.span_ms, |w| w.span_ms));
    for (project, user, a, jobs) in &by_owner {
        let mut f = amount_fields(a);
        f.i("span_ms", usage_span).i("jobs", Some(*jobs));
        let tags = [
            ("cluster", c),
            ("node", n),
            ("project", *project),
            ("user", *user),
        ];
        put(out, "usage", &tags, &f);
    }

    // One point per job, node and agent run (timestamp `since_ms`), overwritten by each
    // newer total: summing a job's points gives its usage across agent restarts.
    for t in &s.job_totals {
        let mut f = amount_fields(&t.amounts);
        let gpus = t
            .gpus
            .iter()
            .map(|g| g.as_str())
            .collect::<Vec<_>>()
            .join(",");
        f.i("start_ms", Some(t.start_ms))
            .i("until_ms", Some(t.until_ms))
            .b("ended", t.ended)
            .s("gpus", Some(&gpus));
        let tags = [
            ("cluster", c),
            ("job", t.job.as_str()),
            ("node", n),
            ("project", &t.project),
            ("user", &t.user),
        ];
        points += usize::from(line(out, "job_total", &tags, &f.0, t.since_ms));
    }
    points
}

/// The `user` tag of `_idle` usage (tags cannot be empty).
pub const NO_USER: &str = "_none";

fn amount_fields(a: &Amounts) -> Fields<'static> {
    let mut f = Fields::default();
    f.i("energy_gpu_uj", Some(a.gpu_uj))
        .i("energy_cpu_uj", Some(a.cpu_uj))
        .i("energy_dram_uj", Some(a.dram_uj))
        .i("energy_other_uj", Some(a.other_uj))
        .i("energy_uj", Some(a.energy_uj()))
        .i("gpu_ms", Some(a.gpu_ms))
        .i("cpu_us", Some(a.cpu_us))
        .i("energy_gpu_idle_uj", Some(a.gpu_idle_uj))
        .i("energy_gpu_capped_uj", Some(a.gpu_capped_uj))
        .i("gpu_tensor_us", Some(a.gpu_tensor_us));
    f
}

/// A node's online/offline status, at the time it was set (or received, for a last will).
pub fn encode_status(
    cluster: &str,
    node: &str,
    st: &Status,
    received_ms: u64,
    out: &mut Vec<u8>,
) -> usize {
    let mut f = Fields::default();
    f.b("online", st.online).s("reason", st.reason.as_deref());
    let ts = st.ts_ms.unwrap_or(received_ms);
    usize::from(line(
        out,
        "node_status",
        &[("cluster", cluster), ("node", node)],
        &f.0,
        ts,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodewatt_wire::{
        check_sample, Cpu, Gpu, HwmonSensor, Limits, RaplDomain, Sample, SourceStatus, ThermalZone,
    };

    const T: u64 = 1_763_700_000_000;

    fn n<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().unwrap()
    }

    fn valid(s: Sample) -> ValidSample {
        let ts = s.ts_ms;
        check_sample(s, ts, &Limits::default()).unwrap()
    }

    fn text(out: &[u8]) -> &str {
        std::str::from_utf8(out).unwrap()
    }

    #[test]
    fn one_line_exactly() {
        let mut out = Vec::new();
        let fields = [
            ("power_w", Value::F(350.0)),
            ("energy_mj", Value::I(12)),
            ("ok", Value::B(true)),
            ("v", Value::S("a\"b\\c")),
        ];
        assert!(line(
            &mut out,
            "gpu",
            &[("node", "n1"), ("gpu", "0")],
            &fields,
            1_700_000_000_123
        ));
        assert_eq!(
            text(&out),
            "gpu,node=n1,gpu=0 power_w=350,energy_mj=12i,ok=true,v=\"a\\\"b\\\\c\" 1700000000123\n"
        );
        assert!(
            !line(&mut out, "empty", &[("node", "n1")], &[], 1),
            "no fields, no line"
        );
    }

    /// The line as the `influxdb-line-protocol` crate's builder writes it.
    fn reference(
        measurement: &str,
        tags: &[(&str, &str)],
        fields: &[(&str, Value)],
        ts: u64,
    ) -> Vec<u8> {
        use influxdb_line_protocol::builder::LineProtocolBuilder;
        let (first, rest) = fields.split_first().unwrap();
        let b = LineProtocolBuilder::new().measurement(measurement);
        let b = tags.iter().fold(b, |b, (k, v)| b.tag(k, v));
        let b = match first.1 {
            Value::F(x) => b.field(first.0, x),
            Value::I(x) => b.field(first.0, x),
            Value::B(x) => b.field(first.0, x),
            Value::S(x) => b.field(first.0, x),
        };
        let b = rest.iter().fold(b, |b, (k, v)| match *v {
            Value::F(x) => b.field(k, x),
            Value::I(x) => b.field(k, x),
            Value::B(x) => b.field(k, x),
            Value::S(x) => b.field(k, x),
        });
        b.timestamp(ts as i64).close_line().build()
    }

    #[test]
    fn floats_exactly_as_display_writes_them() {
        let cases = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            350.0,
            312.5,
            0.000003,
            1e-300,
            f64::MIN_POSITIVE,
            123456789.125,
            9_007_199_254_740_991.0,
            9_007_199_254_740_992.0,
            -9_007_199_254_740_993.0,
            1e15,
            1e16,
            1e22,
            f64::MAX,
            f64::MIN,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        for x in cases {
            let mut out = Vec::new();
            put_f64(&mut out, x);
            assert_eq!(text(&out), format!("{x}"), "{x:e}");
        }
    }

    fn value() -> impl proptest::strategy::Strategy<Value = (String, u8, f64, i64, bool)> {
        use proptest::prelude::*;
        (
            "[a-z\\\\ ,=\"\u{e9}\u{1F600}]{0,12}",
            0u8..4,
            prop_oneof![
                any::<f64>(),
                (-1_000_000i64..1_000_000).prop_map(|i| i as f64),
                (-1_000_000i64..1_000_000).prop_map(|i| i as f64 / 8.0),
            ],
            any::<i64>(),
            any::<bool>(),
        )
    }

    proptest::proptest! {
        /// Byte for byte what the `influxdb-line-protocol` builder writes, whatever the
        /// names and values (validation keeps hostile names out; the encoder must not
        /// depend on it).
        #[test]
        fn same_bytes_as_the_builder(
            measurement in "[a-z\\\\ ,=\"\u{e9}]{1,12}",
            tags in proptest::collection::vec(("[a-z\\\\ ,=\"\u{e9}]{1,8}", "[a-zA-Z0-9\\\\ ,=\"\u{e9}]{1,12}"), 0..4),
            fields in proptest::collection::vec(value(), 1..6),
            ts in 0u64..=i64::MAX as u64,
        ) {
            let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let fields: Vec<(&str, Value)> = fields
                .iter()
                .enumerate()
                .map(|(i, (s, kind, f, n, b))| {
                    let key = ["power_w", "a b", "x,y=z", r#"q"\"#, "\\"][i % 5];
                    let v = match kind {
                        0 => Value::F(*f),
                        1 => Value::I(*n),
                        2 => Value::B(*b),
                        _ => Value::S(s),
                    };
                    (key, v)
                })
                .collect();
            let mut out = b"previous line\n".to_vec();
            proptest::prop_assert!(line(&mut out, &measurement, &tags, &fields, ts));
            let mut expected = b"previous line\n".to_vec();
            expected.extend(reference(&measurement, &tags, &fields, ts));
            proptest::prop_assert_eq!(text(&out), text(&expected));
        }
    }

    #[test]
    fn hostile_but_valid_tag_values_are_escaped() {
        let mut out = Vec::new();
        line(
            &mut out,
            "gpu",
            &[
                ("model", "NVIDIA H100, 80GB=HBM3"),
                ("label", "Package id 0"),
            ],
            &[("x", Value::F(0.5))],
            7,
        );
        assert_eq!(
            text(&out),
            "gpu,model=NVIDIA\\ H100\\,\\ 80GB\\=HBM3,label=Package\\ id\\ 0 x=0.5 7\n"
        );
    }

    fn sample() -> Sample {
        let mut s = Sample::new("nodewatt-agent/0.1.0", n("c1"), n("n1"), 1000, T - 1_000);
        s.ts_ms = T;
        s.seq = 1;
        s.span_ms = 1_000;
        s.sources.push(SourceStatus {
            name: "nvml".into(),
            ok: true,
            read_us: 250,
            devices: 1,
            error: None,
        });
        s.gpus.push(Gpu {
            index: 0,
            uuid: "GPU-1".into(),
            pci_bus_id: "00000000:18:00.0".into(),
            model: "NVIDIA H100 80GB HBM3".into(),
            power_w: Some(312.5),
            energy_mj: Some(1_000_000),
            energy_delta_mj: Some(312_500),
            temp_c: Some(45.0),
            pids: vec![10, 11],
            power_limit_w: Some(700.0),
            power_capped_ms: Some(250),
            gpm: nodewatt_wire::Gpm {
                sm_active_pct: Some(61.5),
                ..Default::default()
            },
            events: vec![nodewatt_wire::GpuEvents {
                kind: nodewatt_wire::GpuEventKind::Xid,
                code: 79,
                count: 2,
            }],
            ..Gpu::default()
        });
        s.cpu = Some(Cpu {
            cores: 2,
            util_pct: Some(12.5),
            mem_total_bytes: 8,
            ..Cpu::default()
        });
        s.rapl.push(RaplDomain {
            zone: "intel-rapl:0".into(),
            name: "package-0".into(),
            parent: None,
            energy_uj: Some(5),
            max_energy_range_uj: 10,
            energy_delta_uj: Some(3),
            power_w: Some(0.000003),
            error: None,
        });
        s.rapl.push(RaplDomain {
            zone: "intel-rapl:1".into(),
            name: "package-1".into(),
            parent: None,
            energy_uj: None,
            max_energy_range_uj: 10,
            energy_delta_uj: None,
            power_w: None,
            error: Some("permission denied".into()),
        });
        s.hwmon.push(HwmonSensor {
            chip: "power_meter".into(),
            device: "hwmon3".into(),
            sensor: "power1".into(),
            label: None,
            kind: SensorKind::Power,
            value: Some(412.5),
            energy_uj: None,
            error: None,
        });
        s.thermal.push(ThermalZone {
            zone: "thermal_zone0".into(),
            zone_type: "acpitz".into(),
            temp_c: Some(27.8),
            error: None,
        });
        s
    }

    #[test]
    fn a_whole_sample_exactly() {
        let mut out = Vec::new();
        let count = encode_sample(&valid(sample()), &mut out);
        let expected = [
            "agent,cluster=c1,node=n1 seq=1i,agent_start_ms=1763699999000i,interval_ms=1000i,span_ms=1000i,merged=0i,version=\"nodewatt-agent/0.1.0\" 1763700000000",
            "agent_source,cluster=c1,node=n1,source=nvml ok=true,read_us=250i,devices=1i 1763700000000",
            "gpu,cluster=c1,gpu=0,model=NVIDIA\\ H100\\ 80GB\\ HBM3,node=n1,uuid=GPU-1 power_w=312.5,energy_mj=1000000i,energy_delta_mj=312500i,span_ms=1000i,temp_c=45,processes=2i,power_limit_w=700,power_capped_ms=250i,answering=1i,simulated=false,sm_active_pct=61.5 1763700000000",
            "gpu_event,cluster=c1,code=79,gpu=0,kind=xid,node=n1,uuid=GPU-1 count=2i,span_ms=1000i 1763700000000",
            "cpu,cluster=c1,node=n1 util_pct=12.5,load1=0,load5=0,load15=0,cores=2i,mem_total_bytes=8i,ticks_user=0i,ticks_nice=0i,ticks_system=0i,ticks_idle=0i,ticks_iowait=0i,ticks_irq=0i,ticks_softirq=0i,ticks_steal=0i,jobs=0i 1763700000000",
            "rapl,cluster=c1,domain=package-0,node=n1,zone=intel-rapl:0 energy_uj=5i,energy_delta_uj=3i,span_ms=1000i,power_w=0.000003 1763700000000",
            "hwmon,chip=power_meter,cluster=c1,device=hwmon3,kind=power,node=n1,sensor=power1 value=412.5 1763700000000",
            "thermal,cluster=c1,node=n1,type=acpitz,zone=thermal_zone0 temp_c=27.8 1763700000000",
        ];
        assert_eq!(text(&out), expected.join("\n") + "\n");
        // The unreadable RAPL domain has no fields and writes nothing.
        assert_eq!(count, expected.len());
    }

    #[test]
    fn a_lost_gpu_and_mig_devices_exactly() {
        let mut s = Sample::new("a", n("c1"), n("n1"), 1000, T - 10_000);
        s.ts_ms = T;
        s.span_ms = 1_000;
        s.gpus.push(Gpu {
            index: 1,
            uuid: "GPU-2".into(),
            model: "H100".into(),
            lost: true,
            ..Gpu::default()
        });
        s.gpus.push(Gpu {
            index: 0,
            uuid: "GPU-1".into(),
            model: "H100".into(),
            mig: vec![nodewatt_wire::MigDevice {
                uuid: "MIG-1".into(),
                gpu_instance_id: 2,
                compute_instance_id: 0,
                slices: Some(3),
                mem_total_bytes: Some(40),
                gpm: nodewatt_wire::Gpm {
                    tensor_active_pct: Some(80.0),
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Gpu::default()
        });
        let mut out = Vec::new();
        encode_sample(&valid(s), &mut out);
        let expected = [
            "agent,cluster=c1,node=n1 seq=0i,agent_start_ms=1763699990000i,interval_ms=1000i,span_ms=1000i,merged=0i,version=\"a\" 1763700000000",
            "gpu,cluster=c1,gpu=1,model=H100,node=n1,uuid=GPU-2 span_ms=1000i,processes=0i,answering=0i,lost=1i,simulated=false 1763700000000",
            "gpu,cluster=c1,gpu=0,model=H100,node=n1,uuid=GPU-1 span_ms=1000i,processes=0i,answering=1i,simulated=false 1763700000000",
            "gpu_mig,ci=0,cluster=c1,gi=2,gpu=0,mig_uuid=MIG-1,node=n1,uuid=GPU-1 slices=3i,mem_total_bytes=40i,span_ms=1000i,tensor_active_pct=80 1763700000000",
        ];
        assert_eq!(text(&out), expected.join("\n") + "\n");
    }

    #[test]
    fn usage_is_summed_per_project_and_user_and_job_totals_keyed_by_start() {
        use nodewatt_wire::{JobTotal, Usage};
        let mut s = Sample::new("a", n("c1"), n("n1"), 1000, T - 10_000);
        s.ts_ms = T;
        s.span_ms = 3_000;
        s.gpus.push(Gpu {
            index: 0,
            uuid: "GPU-1".into(),
            pci_bus_id: "0".into(),
            model: "H100".into(),
            energy_delta_mj: Some(35),
            ..Gpu::default()
        });
        let amounts = |gpu_uj: u64| Amounts {
            gpu_uj,
            gpu_ms: 1_000,
            gpu_idle_uj: gpu_uj / 10,
            gpu_capped_uj: gpu_uj / 5,
            gpu_tensor_us: 300_000,
            ..Amounts::default()
        };
        for (job, user, gpu_uj) in [
            (Some("1"), Some("alice"), 10_000),
            (Some("2"), Some("alice"), 20_000),
        ] {
            s.usage.push(Usage {
                job: job.map(n),
                project: n("p"),
                user: user.map(n),
                amounts: amounts(gpu_uj),
            });
        }
        s.usage.push(Usage {
            job: None,
            project: n("_idle"),
            user: None,
            amounts: amounts(5_000),
        });
        s.job_totals.push(JobTotal {
            job: n("1"),
            project: n("p"),
            user: n("alice"),
            start_ms: T - 4_000,
            since_ms: T - 4_000,
            until_ms: T,
            ended: true,
            gpus: vec![n("0"), n("1")],
            amounts: amounts(40_000),
        });
        let mut out = Vec::new();
        encode_sample(&valid(s), &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("usage") || l.starts_with("job_total"))
            .collect();
        assert_eq!(
            lines,
            [
                "usage,cluster=c1,node=n1,project=p,user=alice energy_gpu_uj=30000i,energy_cpu_uj=0i,energy_dram_uj=0i,energy_other_uj=0i,energy_uj=30000i,gpu_ms=2000i,cpu_us=0i,energy_gpu_idle_uj=3000i,energy_gpu_capped_uj=6000i,gpu_tensor_us=600000i,span_ms=3000i,jobs=2i 1763700000000",
                "usage,cluster=c1,node=n1,project=_idle,user=_none energy_gpu_uj=5000i,energy_cpu_uj=0i,energy_dram_uj=0i,energy_other_uj=0i,energy_uj=5000i,gpu_ms=1000i,cpu_us=0i,energy_gpu_idle_uj=500i,energy_gpu_capped_uj=1000i,gpu_tensor_us=300000i,span_ms=3000i,jobs=0i 1763700000000",
                "job_total,cluster=c1,job=1,node=n1,project=p,user=alice energy_gpu_uj=40000i,energy_cpu_uj=0i,energy_dram_uj=0i,energy_other_uj=0i,energy_uj=40000i,gpu_ms=1000i,cpu_us=0i,energy_gpu_idle_uj=4000i,energy_gpu_capped_uj=8000i,gpu_tensor_us=300000i,start_ms=1763699996000i,until_ms=1763700000000i,ended=true,gpus=\"0,1\" 1763699996000",
            ]
        );
    }

    #[test]
    fn status_lines() {
        let mut out = Vec::new();
        let st = Status {
            online: false,
            agent: None,
            ts_ms: None,
            reason: Some("connection lost".into()),
        };
        encode_status("c1", "n1", &st, 99, &mut out);
        assert_eq!(
            text(&out),
            "node_status,cluster=c1,node=n1 online=false,reason=\"connection lost\" 99\n"
        );
    }
}
