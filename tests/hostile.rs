//! Hostile and broken nodes against real mosquitto and influxd: each class of bad message
//! is rejected with its reason counted, the collector stays connected, a good node's
//! samples are still written within seconds, no measurement or tag value comes from the
//! bad input, and `usage` bills exactly the good node afterwards.

use nodewatt_common::now_ms;
use std::time::Duration;

use nodewatt_tests::*;
use nodewatt_wire::{Amounts, Gpu, HwmonSensor, JobTotal, Project, Sample, SensorKind, Usage};

const DB: &str = "nodewatt_hostile";

fn n<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().unwrap()
}

/// A sample as an agent makes it: one GPU at 400 W for 1 s, billed to one job of
/// `proj-a` (user with an `@`) and `_idle`.
fn sample(node: &str, seq: u64) -> Sample {
    let now = now_ms();
    let mut s = Sample::new(
        "nodewatt-agent/test",
        n("lab"),
        n(node),
        1000,
        now - 600_000,
    );
    s.ts_ms = now - now % 1000 - (20 - seq) * 1000;
    s.seq = seq;
    s.span_ms = 1000;
    s.gpus.push(Gpu {
        index: 0,
        uuid: "GPU-0".into(),
        pci_bus_id: "0".into(),
        model: "H100".into(),
        power_w: Some(400.0),
        energy_delta_mj: Some(400_000),
        ..Gpu::default()
    });
    let amounts = |gpu_uj, gpu_ms| Amounts {
        gpu_uj,
        gpu_ms,
        ..Amounts::default()
    };
    s.usage = vec![
        Usage {
            job: Some(n("42")),
            project: n("proj-a"),
            user: Some(n("jane.doe@corp.example")),
            amounts: amounts(300_000_000, 750),
        },
        Usage {
            job: None,
            project: Project::idle(),
            user: None,
            amounts: amounts(100_000_000, 250),
        },
    ];
    s
}

fn topic(node: &str) -> String {
    format!("nodewatt/v1/lab/{node}/sample")
}

/// `sample` as JSON with `f` applied.
fn bad(f: impl FnOnce(&mut Sample)) -> Vec<u8> {
    let mut s = sample("evil", 1);
    f(&mut s);
    s.to_json().into_bytes()
}

#[test]
fn hostile_nodes_cannot_stop_corrupt_or_redirect_billing() {
    // A small series budget, so a flood is visible with a few hundred sensors.
    let Stack {
        mq,
        db,
        collector_cfg: cfg,
        mut collector,
    } = Stack::start_with("hostile", DB, "", |t| {
        t + "[validation]\nmax_new_series_per_node = 100\n"
    });

    // Before: a good node's first sample is written.
    publish_raw(
        mq.port,
        &[(topic("good"), sample("good", 0).to_json().into_bytes())],
    );
    assert!(
        wait_until(Duration::from_secs(20), || db
            .scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'good'")
            == 1.0),
        "{}",
        collector.log()
    );

    let json = |s: &Sample| s.to_json().into_bytes();
    let t = topic("evil");
    let max = i64::MAX as u64;
    let classes: Vec<(&str, Vec<u8>)> = vec![
        // Larger than the collector's old MQTT packet limit (16 x 256 KiB).
        ("too_large", vec![b' '; 5 << 20]),
        ("too_large", vec![b' '; 2 << 20]),
        ("json", b"{\"schema\":1,".to_vec()),
        (
            "schema",
            sample("evil", 1)
                .to_json()
                .replace("\"schema\":1", "\"schema\":2")
                .into_bytes(),
        ),
        // Amounts at i64::MAX for an invented project (made InfluxDB's SUM wrap): the
        // entries' sum no longer fits a stored integer.
        (
            "range",
            bad(|s| {
                s.usage[0].project = n("invented");
                s.usage[0].amounts.gpu_uj = max;
            }),
        ),
        ("range", bad(|s| s.span_ms = max)),
        ("range", bad(|s| s.gpus[0].power_w = Some(1e12))),
        // Found by the fuzzer: an overflow before the range check...
        ("range", bad(|s| s.interval_ms = u64::MAX)),
        // ...and a job total whose classes fit but whose energy_uj was stored as -2.
        (
            "range",
            bad(|s| {
                let mut t = total("10", 1_578_000_000_000);
                t.until_ms = s.ts_ms;
                (t.amounts.gpu_uj, t.amounts.cpu_uj) = (max, max);
                s.job_totals.push(t)
            }),
        ),
        // 10^18 mJ in one second.
        (
            "physics",
            bad(|s| s.gpus[0].energy_delta_mj = Some(1_000_000_000_000_000_000)),
        ),
        // Usage 1000x the measured GPU energy.
        ("conservation", bad(|s| s.usage[0].amounts.gpu_uj *= 1000)),
        ("timestamp", bad(|s| s.ts_ms = 7_258_118_400_000)),
        ("timestamp", bad(|s| s.job_totals.push(total("7", 0)))),
        (
            "timestamp",
            bad(|s| {
                let mut t = total("8", s.ts_ms - 1000);
                t.until_ms = 7_258_118_400_000;
                s.job_totals.push(t)
            }),
        ),
        (
            "physics",
            bad(|s| {
                let mut t = total("9", s.ts_ms - 1000);
                t.amounts.gpu_uj = max;
                s.job_totals.push(t)
            }),
        ),
        // 7,000 usage entries, written compactly (amounts default to 0) so the message
        // stays under the default size limit.
        (
            "too_many",
            String::from_utf8(bad(|_| {}))
                .unwrap()
                .replacen(
                    "\"usage\":[",
                    &format!("\"usage\":[{}", "{\"project\":\"_idle\"},".repeat(7_000)),
                    1,
                )
                .into_bytes(),
        ),
        (
            "series_budget",
            bad(|s| {
                for i in 0..150 {
                    s.hwmon.push(HwmonSensor {
                        chip: "flood".into(),
                        device: format!("hwmon{i}"),
                        sensor: "temp1".into(),
                        label: None,
                        kind: SensorKind::Temp,
                        value: Some(40.0),
                        energy_uj: None,
                        error: None,
                    });
                }
            }),
        ),
        ("node_mismatch", json(&sample("good", 2))),
    ];
    // Names that break their rule, written into the JSON (the types cannot hold them).
    let text = String::from_utf8(json(&sample("evil", 1))).unwrap();
    let names = [
        (
            "\"proj-a\"",
            "\"x' OR \\\"project\\\" =~ /.*/ OR \\\"project\\\" = 'y\"",
        ),
        ("\"proj-a\"", "\"a b,c=d\""),
        ("\"jane.doe@corp.example\"", "\"o'brien\""),
        ("\"H100\"", "\"H100\\nevil,node=good power_w=1\""),
        ("\"GPU-0\"", "\"GPU-0\\\\\""),
    ];
    let mut messages: Vec<(String, Vec<u8>)> = classes
        .iter()
        .map(|(_, p)| (t.clone(), p.clone()))
        .collect();
    for (from, to) in names {
        messages.push((t.clone(), text.replacen(from, to, 1).into_bytes()));
    }
    messages.push((
        "nodewatt/v1/lab/evil/status".into(),
        br#"{"online":true,"ts_ms":1}"#.to_vec(),
    ));
    publish_raw(mq.port, &messages);
    // And the good node goes on.
    publish_raw(
        mq.port,
        &[(topic("good"), sample("good", 1).to_json().into_bytes())],
    );

    let expected: &[(&str, f64)] = &[
        ("too_large", 2.0),
        ("json", 1.0),
        ("schema", 1.0),
        ("range", 5.0),
        ("physics", 2.0),
        ("conservation", 1.0),
        ("timestamp", 4.0),
        ("too_many", 1.0),
        ("series_budget", 1.0),
        ("node_mismatch", 1.0),
        ("name", 5.0),
    ];
    let total: f64 = expected.iter().map(|(_, c)| c).sum();
    let reason = |r: &str| {
        db.scalar(
            DB,
            &format!("SELECT LAST(rejected_{r}) FROM nodewatt_collector"),
        )
    };
    let done = wait_until(Duration::from_secs(30), || {
        db.scalar(DB, "SELECT LAST(rejected) FROM nodewatt_collector") >= total
            && db.scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'good'") == 2.0
    });
    assert!(done, "{}", collector.log());
    for (r, count) in expected {
        assert_eq!(reason(r), *count, "rejected_{r}\n{}", collector.log());
    }
    assert_eq!(
        db.scalar(DB, "SELECT LAST(rejected) FROM nodewatt_collector"),
        total
    );

    // The connection held: one connect, no reconnect loop over the 5 MiB message.
    let log = collector.log();
    assert_eq!(
        log.matches("connected to the MQTT broker").count(),
        1,
        "{log}"
    );
    assert!(collector.running());

    // Nothing of the hostile node was stored: no measurement, series or tag value.
    assert!(db
        .rows(DB, "SELECT * FROM /.*/ WHERE node = 'evil'")
        .is_empty());
    let projects = db.rows(DB, "SHOW TAG VALUES FROM \"usage\" WITH KEY = \"project\"");
    let mut names: Vec<String> = projects
        .iter()
        .map(|(_, m)| m["value"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["_idle", "proj-a"]);
    let measurements: Vec<String> = db
        .rows(DB, "SHOW MEASUREMENTS")
        .iter()
        .map(|(_, m)| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        measurements,
        [
            "agent",
            "gpu",
            "nodewatt_collector",
            "usage",
            "usage_hour_state"
        ]
    );

    // Billing afterwards: exactly the good node's two samples, user with its `@`.
    let csv = collector_cli(
        &cfg,
        &[
            "usage",
            "--from",
            "2020-01-01",
            "--to",
            "2100-01-01",
            "--by",
            "user",
            "--format",
            "csv",
        ],
    );
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert!(
        rows[1].starts_with("jane.doe@corp.example,,jane.doe@corp.example,600000000,"),
        "{csv}"
    );
    let by_project = collector_cli(
        &cfg,
        &[
            "usage",
            "--from",
            "2020-01-01",
            "--to",
            "2100-01-01",
            "--format",
            "csv",
        ],
    );
    assert!(
        by_project.contains("\nproj-a,proj-a,,600000000,"),
        "{by_project}"
    );
    assert!(
        by_project.contains("\n_idle,_idle,,200000000,"),
        "{by_project}"
    );
    collector.stop_cleanly();
}

fn total(job: &str, start_ms: u64) -> JobTotal {
    JobTotal {
        job: n(job),
        project: n("proj-a"),
        user: n("jane.doe@corp.example"),
        start_ms,
        since_ms: start_ms,
        until_ms: start_ms,
        ended: false,
        gpus: vec![],
        amounts: Amounts::default(),
    }
}

#[test]
fn a_line_influxdb_refuses_costs_only_that_line() {
    const DB2: &str = "nodewatt_refuse";
    let Stack {
        mq,
        db,
        collector_cfg: _cfg,
        mut collector,
    } = Stack::start("refuse", DB2);
    // `temp_c` as a string in the current shard: InfluxDB now refuses any float `temp_c`
    // of `thermal` (a field type conflict, answered 400 "partial write").
    let seeded = reqwest::blocking::Client::new()
        .post(format!("{}/write?db={DB2}&precision=ms", db.url()))
        .body(format!(
            "thermal,cluster=lab,node=other temp_c=\"hot\" {}",
            now_ms()
        ))
        .send()
        .unwrap();
    assert!(seeded.status().is_success(), "{:?}", seeded.text());

    let mut hot = sample("hot", 1);
    hot.thermal.push(nodewatt_wire::ThermalZone {
        zone: "thermal_zone0".into(),
        zone_type: "acpitz".into(),
        temp_c: Some(40.0),
        error: None,
    });
    publish_raw(
        mq.port,
        &[
            (topic("hot"), hot.to_json().into_bytes()),
            (topic("cool"), sample("cool", 1).to_json().into_bytes()),
        ],
    );
    let written = wait_until(Duration::from_secs(20), || {
        db.scalar(DB2, "SELECT COUNT(seq) FROM agent") == 2.0
            && db.scalar(DB2, "SELECT LAST(points_refused) FROM nodewatt_collector") >= 1.0
    });
    assert!(written, "{}", collector.log());
    // Only the conflicting line was refused; both nodes' GPUs and usage were written.
    assert_eq!(
        db.scalar(DB2, "SELECT LAST(points_refused) FROM nodewatt_collector"),
        1.0,
        "{}",
        collector.log()
    );
    assert_eq!(db.scalar(DB2, "SELECT COUNT(power_w) FROM gpu"), 2.0);
    assert_eq!(db.scalar(DB2, "SELECT COUNT(energy_uj) FROM usage"), 4.0);
    assert!(collector.running());
    collector.stop_cleanly();
}

/// Usage older than the database's retention policy: InfluxDB refuses the hour's
/// write-ahead mark as well as its points ("points beyond retention policy"); the
/// collector drops and counts those and goes on writing every other node's.
#[test]
fn usage_past_the_retention_policy_is_dropped_and_the_rest_written() {
    const DB3: &str = "nodewatt_retain";
    let Stack {
        mq,
        db,
        collector_cfg: _cfg,
        mut collector,
    } = Stack::start("retain", DB3);
    // A new default retention policy, not `autogen` altered: InfluxDB 1.x still takes
    // points older than the policy into a shard group that covers them, and the
    // collector's first health point may already have made a 7-day one in `autogen`.
    db.execute(
        "",
        &format!(
            "CREATE RETENTION POLICY \"hour\" ON \"{DB3}\" DURATION 1h REPLICATION 1 SHARD DURATION 1h DEFAULT"
        ),
    )
    .unwrap();
    let mut old = sample("old", 1);
    old.ts_ms -= 3 * 3_600_000;
    old.agent_start_ms -= 3 * 3_600_000;
    publish_raw(
        mq.port,
        &[
            (topic("old"), old.to_json().into_bytes()),
            (topic("new"), sample("new", 1).to_json().into_bytes()),
        ],
    );
    let written = wait_until(Duration::from_secs(20), || {
        db.scalar(DB3, "SELECT COUNT(energy_uj) FROM usage") == 2.0
            && db.scalar(DB3, "SELECT LAST(points_refused) FROM nodewatt_collector") >= 1.0
    });
    assert!(written, "{}", collector.log());
    assert_eq!(
        db.scalar(DB3, "SELECT COUNT(energy_uj) FROM usage WHERE node = 'old'"),
        0.0
    );
    assert!(collector.running());
    collector.stop_cleanly();
}
