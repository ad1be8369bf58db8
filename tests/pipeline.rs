//! agent → mosquitto → collector → InfluxDB, against the real servers, including broker
//! restarts, a collector crash and an InfluxDB outage. Every sample must arrive exactly
//! once: a redelivered message rewrites the same point, so counts are exact.

use std::time::Duration;

use nodewatt_tests::*;

const DB: &str = "nodewatt_test";

fn count(db: &Influxd, node: &str) -> u64 {
    db.scalar(
        DB,
        &format!("SELECT COUNT(seq) FROM agent WHERE node = '{node}'"),
    ) as u64
}

/// Agents node-a (one GPU at 350 W) and node-b (250 W) sampling every 20 ms, `count`
/// samples each; keep the configs alive while the agents run.
fn node_a_and_b(mqtt_port: u16, count: u64) -> (Vec<ConfigFile>, Vec<Proc>) {
    let configs = vec![
        config_file(
            "a.toml",
            &agent_config("lab", "node-a", "20ms", mqtt_port, &[350.0]),
        ),
        config_file(
            "b.toml",
            &agent_config("lab", "node-b", "20ms", mqtt_port, &[250.0]),
        ),
    ];
    let agents = configs.iter().map(|c| start_agent(c, count)).collect();
    (configs, agents)
}

/// Waits until InfluxDB holds `n` samples of `node`, then checks each arrived once, in
/// full, with energy equal to power × time to the millijoule.
fn check_node(db: &Influxd, node: &str, n: u64, gpu_watts: &[f64]) {
    let arrived = wait_until(Duration::from_secs(60), || count(db, node) >= n);
    assert!(
        arrived,
        "{node}: {} of {n} samples in InfluxDB",
        count(db, node)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(db, node), n, "{node}: no extra points");

    let mut seqs: Vec<u64> = db
        .rows(DB, &format!("SELECT seq FROM agent WHERE node = '{node}'"))
        .iter()
        .map(|(_, r)| r["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..n).collect::<Vec<_>>(),
        "{node}: every sequence number once"
    );

    for (i, w) in gpu_watts.iter().enumerate() {
        let q = |f: &str| {
            db.scalar(
                DB,
                &format!("SELECT {f} FROM gpu WHERE node = '{node}' AND gpu = '{i}'"),
            )
        };
        assert_eq!(
            q("COUNT(power_w)") as u64,
            n,
            "{node} gpu {i}: one point per sample"
        );
        assert_eq!(q("MAX(power_w)"), *w);
        let span_ms = q("SUM(span_ms)");
        assert!(span_ms >= ((n - 1) * 20) as f64, "{node}: span {span_ms}");
        // W × ms = mJ, exactly: simulated counters advance as power × elapsed time.
        assert_eq!(
            q("SUM(energy_delta_mj)"),
            w * span_ms,
            "{node} gpu {i}: energy"
        );
    }
    let rapl_uj = db.scalar(
        DB,
        &format!("SELECT SUM(energy_delta_uj) FROM rapl WHERE node = '{node}'"),
    );
    let rapl_ms = db.scalar(
        DB,
        &format!("SELECT SUM(span_ms) FROM rapl WHERE node = '{node}'"),
    );
    assert_eq!(
        rapl_uj,
        150.0 * rapl_ms * 1000.0,
        "{node}: RAPL energy through wraps and merges"
    );
}

#[test]
fn every_sample_arrives_once_with_exact_energy() {
    let Stack {
        mq,
        db,
        collector_cfg: _ccfg,
        mut collector,
    } = Stack::start("e2e", DB);

    let a = config_file(
        "a.toml",
        &agent_config("lab", "node-a", "50ms", mq.port, &[350.0, 700.0]),
    );
    let b = config_file(
        "b.toml",
        &agent_config("lab", "node-b", "50ms", mq.port, &[100.0]),
    );
    let (mut pa, mut pb) = (start_agent(&a, 40), start_agent(&b, 40));
    for p in [&mut pa, &mut pb] {
        p.wait_success(Duration::from_secs(60));
    }
    check_node(&db, "node-a", 40, &[350.0, 700.0]);
    check_node(&db, "node-b", 40, &[100.0]);

    // The agents marked themselves offline when they stopped; the status is in InfluxDB.
    let offline = wait_until(Duration::from_secs(10), || {
        let rows = db.rows(
            DB,
            "SELECT LAST(online), reason FROM node_status WHERE node = 'node-a'",
        );
        rows.first()
            .is_some_and(|(_, r)| r["last"] == false && r["reason"] == "stopped")
    });
    assert!(offline, "node-a offline status missing");
    // The collector wrote its own health.
    let health = wait_until(Duration::from_secs(10), || {
        db.scalar(DB, "SELECT LAST(messages_in) FROM nodewatt_collector") >= 80.0
    });
    assert!(health, "collector health point missing");
    assert_eq!(
        db.scalar(DB, "SELECT LAST(rejected) FROM nodewatt_collector"),
        0.0
    );

    collector.stop_cleanly();
}

#[test]
fn broker_restart_and_collector_crash_lose_nothing() {
    let Stack {
        mut mq,
        db,
        collector_cfg: ccfg,
        mut collector,
    } = Stack::start("crashy", DB);

    let (_configs, mut agents) = node_a_and_b(mq.port, 150);

    // Both connected first (else a slow start connects once, after the restart), then
    // some samples flow.
    assert!(
        wait_until(Duration::from_secs(30), || agents
            .iter()
            .all(|p| p.log().contains("connected to the MQTT broker:"))),
        "agents never connected"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !agents
            .iter()
            .any(|p| p.log().contains("--count samples taken")),
        "an agent took all its samples before the broker restart"
    );
    mq.restart(); // agents queue meanwhile; the collector's session survives
    std::thread::sleep(Duration::from_millis(500));
    collector.kill(); // SIGKILL: written but unacknowledged messages come back
    std::thread::sleep(Duration::from_millis(300));
    let mut collector = start_collector(&ccfg);

    for p in &mut agents {
        p.wait_success(Duration::from_secs(60));
        assert!(
            p.log().contains("connected to the MQTT broker again"),
            "{}",
            p.log()
        );
    }
    check_node(&db, "node-a", 150, &[350.0]);
    check_node(&db, "node-b", 150, &[250.0]);
    collector.stop_cleanly();
}

/// The largest `pending=` value the collector logged in its health lines.
fn max_logged_pending(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(" health "))
        .filter_map(|l| {
            l.split("pending=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn influxdb_outage_keeps_messages_unacknowledged_and_bounded() {
    // A small bound, so the collector has to stop reading during the outage.
    let Stack {
        mq,
        mut db,
        collector_cfg: ccfg,
        mut collector,
    } = Stack::start_with("outage", DB, "", |text| {
        text.replace("[batch]\n", "[batch]\nmax_pending_messages = 25\n")
    });

    let a = config_file(
        "a.toml",
        &agent_config("lab", "node-a", "20ms", mq.port, &[300.0]),
    );
    let mut pa = start_agent(&a, 120);
    std::thread::sleep(Duration::from_millis(400));
    db.stop();
    // The broker takes everything from the agent while InfluxDB is down.
    pa.wait_success(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        collector.running(),
        "collector must survive an InfluxDB outage"
    );
    let log = collector.log();
    assert!(log.contains("InfluxDB write failed"), "{log}");
    let pending = max_logged_pending(&log);
    assert!(
        pending > 0 && pending <= 25,
        "pending messages {pending} must stay within the bound:\n{log}"
    );

    // Crash during the outage: whatever it held was never acknowledged, so the broker
    // still has it for the next collector.
    collector.kill();
    db.start_again();
    let mut collector = start_collector(&ccfg);
    check_node(&db, "node-a", 120, &[300.0]);
    collector.stop_cleanly();
}

#[test]
fn sigterm_stops_the_collector_while_influxdb_is_down() {
    let Stack {
        mq,
        mut db,
        collector_cfg: _ccfg,
        mut collector,
    } = Stack::start("downstop", DB);
    let a = config_file(
        "a.toml",
        &agent_config("lab", "node-a", "20ms", mq.port, &[300.0]),
    );
    db.stop();
    let mut pa = start_agent(&a, 50);
    pa.wait_success(Duration::from_secs(60));
    // Writes fail and are retried; batches (samples, health points every 200 ms) queue
    // up behind the failing one.
    assert!(
        wait_until(Duration::from_secs(20), || collector
            .log()
            .contains("InfluxDB write failed")),
        "{}",
        collector.log()
    );
    std::thread::sleep(Duration::from_millis(1500));
    // SIGTERM: the writer stops retrying and the process exits cleanly (stop_cleanly
    // gives it 20 s); the unwritten messages stay with the broker.
    collector.stop_cleanly();
}

/// An InfluxDB that accepts connections and never answers: every request hangs until
/// `influxdb.timeout` (here 10 minutes). The collector still starts, and SIGTERM still
/// ends it within its stop bound while a write hangs.
#[test]
fn sigterm_stops_the_collector_while_influxdb_hangs() {
    let mq = Mosquitto::start();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        // Hold every connection open without a byte of answer.
        let held: Vec<_> = silent.incoming().collect();
        drop(held);
    });
    let text = collector_config("hang", mq.port, &url, DB)
        .replace("[influxdb]\n", "[influxdb]\ntimeout = \"600s\"\n");
    let cfg = config_file("collector.toml", &text);
    let mut collector = start_collector(&cfg);
    wait_subscribed(&collector);
    // Health points every 200 ms: a write starts and hangs.
    std::thread::sleep(Duration::from_millis(1500));
    collector.stop_cleanly();
    assert!(
        collector.log().contains("stop timed out"),
        "{}",
        collector.log()
    );
}

#[test]
fn killed_agent_is_marked_offline_by_its_last_will() {
    let Stack {
        mq,
        db,
        collector_cfg: _ccfg,
        collector,
    } = Stack::start("will", DB);
    let a = config_file(
        "a.toml",
        &agent_config("lab", "node-w", "100ms", mq.port, &[100.0]),
    );
    let mut agent = start_agent(&a, 1_000_000);
    let online = wait_until(Duration::from_secs(20), || {
        db.rows(
            DB,
            "SELECT LAST(online) FROM node_status WHERE node = 'node-w'",
        )
        .first()
        .is_some_and(|(_, r)| r["last"] == true)
    });
    assert!(online, "online status missing:\n{}", agent.log());
    agent.kill();
    let offline = wait_until(Duration::from_secs(20), || {
        db.rows(
            DB,
            "SELECT LAST(online), reason FROM node_status WHERE node = 'node-w'",
        )
        .first()
        .is_some_and(|(_, r)| r["last"] == false && r["reason"] == "connection lost")
    });
    assert!(offline, "last will not recorded:\n{}", collector.log());
}

#[test]
fn v2_write_path_against_a_real_server() {
    let mq = Mosquitto::start();
    let vm = VictoriaMetrics::start();
    let text = format!(
        "[collector]\nid = \"v2\"\n[mqtt]\nport = {}\n\
         [influxdb]\nurl = \"{}\"\napi = \"v2\"\norg = \"lab\"\nbucket = \"nodewatt\"\n\
         [batch]\nflush_interval = \"100ms\"\n",
        mq.port,
        vm.url()
    );
    let ccfg = config_file("collector.toml", &text);
    let collector = start_collector(&ccfg);
    wait_subscribed(&collector);
    let a = config_file(
        "a.toml",
        &agent_config("lab", "node-v", "50ms", mq.port, &[350.0, 350.0]),
    );
    let mut agent = start_agent(&a, 30);
    agent.wait_success(Duration::from_secs(60));
    // VictoriaMetrics names series <measurement>_<field>.
    let ok = wait_until(Duration::from_secs(30), || {
        vm.count_samples(r#"gpu_power_w{node="node-v"}"#) == 60
    });
    assert!(
        ok,
        "{} gpu_power_w samples in VictoriaMetrics\n{}",
        vm.count_samples(r#"gpu_power_w{node="node-v"}"#),
        collector.log()
    );
    assert_eq!(vm.count_samples(r#"agent_seq{node="node-v"}"#), 30);
}

/// A broker outage longer than the agent's outbox: samples are merged, and the energy
/// that reaches InfluxDB still covers the whole run to the millijoule.
#[test]
fn outage_longer_than_the_outbox_merges_but_keeps_every_joule() {
    let Stack {
        mut mq,
        db,
        collector_cfg: _ccfg,
        collector: _collector,
    } = Stack::start("merge", DB);

    mq.stop();
    let text = agent_config("lab", "node-m", "20ms", mq.port, &[400.0])
        + "[outbox]\ncapacity = 16\nmax_in_flight = 4\n";
    let a = config_file("a.toml", &text);
    let mut agent = start_agent(&a, 100);
    // All 100 taken while the broker is down, so the outbox merged them (a fixed sleep
    // was too short on a loaded machine).
    assert!(
        wait_until(Duration::from_secs(60), || agent
            .log()
            .contains("--count samples taken")),
        "the agent never took its 100 samples\n{}",
        agent.log()
    );
    mq.restart();
    agent.wait_success(Duration::from_secs(60));

    // Every sample is accounted for: points + samples merged into them = 100.
    let folded = |db: &Influxd| {
        db.scalar(DB, "SELECT SUM(merged) FROM agent WHERE node = 'node-m'")
            + db.scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'node-m'")
    };
    assert!(
        wait_until(Duration::from_secs(30), || folded(&db) == 100.0),
        "{} of 100 samples accounted for",
        folded(&db)
    );
    assert!(db.scalar(DB, "SELECT MAX(merged) FROM agent WHERE node = 'node-m'") > 0.0);
    let points = db.scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'node-m'");
    assert!(points <= 17.0, "{points} points: the outbox holds 16");

    // The stored points tile time exactly: each one's span is the gap since the
    // previous point (no gap, no overlap), so nothing between them is lost...
    let mut rows: Vec<(u64, u64, u64)> = db
        .rows(
            DB,
            "SELECT span_ms, merged FROM agent WHERE node = 'node-m'",
        )
        .iter()
        .map(|(_, r)| {
            let n = |k: &str| r[k].as_u64().unwrap();
            (n("time"), n("span_ms"), n("merged"))
        })
        .collect();
    rows.sort_unstable();
    for w in rows.windows(2) {
        assert_eq!(
            w[1].0 - w[0].0,
            w[1].1,
            "span of the point at {} ms",
            w[1].0
        );
    }
    // ...the first point covers at least the samples folded into it...
    let (first_ts, first_span, first_merged) = rows[0];
    assert!(first_span >= first_merged * 20, "{rows:?}");
    // ...and within the spans, energy is power x time to the millijoule.
    let covered = (rows.last().unwrap().0 - first_ts + first_span) as f64;
    let q = |f: &str| db.scalar(DB, &format!("SELECT {f} FROM gpu WHERE node = 'node-m'"));
    assert_eq!(q("SUM(span_ms)"), covered);
    assert_eq!(q("SUM(energy_delta_mj)"), 400.0 * covered);
    let rapl = db.scalar(
        DB,
        "SELECT SUM(energy_delta_uj) FROM rapl WHERE node = 'node-m'",
    );
    assert_eq!(rapl, 150.0 * covered * 1000.0);
}

/// Two collectors in one shared-subscription group split the messages: each gets some,
/// and every sample lands exactly once.
#[test]
fn collectors_in_a_share_group_split_the_load() {
    let with_group =
        |t: String| t.replace("[collector]\n", "[collector]\nshare_group = \"pool\"\n");
    let Stack {
        mq,
        db,
        collector_cfg: _a_cfg,
        collector: mut first,
    } = Stack::start_with("pool-a", DB, "", with_group);
    let second_cfg = config_file(
        "collector.toml",
        &with_group(collector_config("pool-b", mq.port, &db.url(), DB)),
    );
    let mut second = start_collector(&second_cfg);
    wait_subscribed(&second);

    let (_configs, mut agents) = node_a_and_b(mq.port, 100);
    for p in &mut agents {
        p.wait_success(Duration::from_secs(60));
    }
    check_node(&db, "node-a", 100, &[350.0]);
    check_node(&db, "node-b", 100, &[250.0]);

    // Both took part; between them they saw every sample once.
    let per_collector = |db: &Influxd| -> Vec<(String, f64)> {
        db.rows(
            DB,
            "SELECT LAST(messages_in) FROM nodewatt_collector GROUP BY collector",
        )
        .iter()
        .map(|(tags, r)| {
            (
                tags["collector"].as_str().unwrap().to_string(),
                r["last"].as_f64().unwrap(),
            )
        })
        .collect()
    };
    let split = wait_until(Duration::from_secs(10), || {
        per_collector(&db).iter().map(|(_, n)| n).sum::<f64>() >= 200.0
    });
    let counts = per_collector(&db);
    assert!(split, "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(
        counts.iter().all(|(_, n)| *n > 0.0),
        "each collector got a share: {counts:?}"
    );
    first.stop_cleanly();
    second.stop_cleanly();
}

/// An agent stopped while the broker is down saves what it could not send; after a
/// restart it sends it, so a restart during an outage loses nothing.
#[test]
fn agent_restart_during_an_outage_loses_nothing_with_a_state_file() {
    let Stack {
        mut mq,
        db,
        collector_cfg: _ccfg,
        collector: _collector,
    } = Stack::start("restart", DB);
    mq.stop();
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("outbox.jsonl");
    let text = agent_config("lab", "node-r", "20ms", mq.port, &[300.0])
        + &format!("[outbox]\nstate_file = {file:?}\n");
    let a = config_file("a.toml", &text);

    let mut first = start_agent(&a, 30);
    // 30 samples taken, none sent.
    assert!(
        wait_until(Duration::from_secs(60), || first
            .log()
            .contains("--count samples taken")),
        "{}",
        first.log()
    );
    first.stop_cleanly();
    assert!(
        first.log().contains("saved unacknowledged samples"),
        "{}",
        first.log()
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 30);

    mq.restart();
    let mut second = start_agent(&a, 5);
    second.wait_success(Duration::from_secs(60));
    assert!(second
        .log()
        .contains("resending samples saved by the previous run"));
    assert!(!file.exists());
    let all = wait_until(Duration::from_secs(30), || {
        db.scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'node-r'") == 35.0
    });
    assert!(
        all,
        "{} of 35",
        db.scalar(DB, "SELECT COUNT(seq) FROM agent WHERE node = 'node-r'")
    );
}
