//! Collector ingest throughput against InfluxDB's own, in one run on one private influxd.
//!
//! 1. Pipeline: agents fill the broker while the collector is away (two persistent
//!    sessions, so every message is queued twice); a first collector drains its copy into
//!    a database of its own, to warm influxd up, and is not counted; then the collector
//!    drains the backlog into InfluxDB through a relay that keeps a copy of every body it
//!    writes. Timed from the collector's start until its health line (every 10 ms) says
//!    every sample was received and none is unacknowledged, that is every batch holding
//!    one was written. (Polling InfluxDB with `COUNT` queries instead, as this benchmark
//!    did first, costs influxd several ms of CPU per query, taken from the pipeline.)
//! 2. InfluxDB alone: the same bodies (same points, batches and gzip) are written again
//!    from one writer, one request at a time as the collector does, into a fresh database
//!    of the same influxd; timed from the first request to the last answer. Twice, each
//!    into its own database, after influxd went idle.
//!
//! Prints points/s of both, their ratio, and the CPU seconds of the collector and influxd.
//! Real mosquitto and influxd, release binaries:
//!
//!     cargo build --release --workspace --bins
//!     cargo run --release -p nodewatt-tests --example bench_pipeline -- [AGENTS] [SAMPLES]
//!
//! With `NODEWATT_BENCH_PERF="record -F 999 -g -o FILE"`, `perf` with these arguments is
//! attached to the draining collector (its timings are then not representative).
//!
//! See docs/benchmarks.md.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodewatt_tests::*;

const MEASUREMENTS: [(&str, &str); 5] = [
    ("agent", "seq"),
    ("agent_source", "read_us"),
    ("gpu", "power_w"),
    ("cpu", "cores"),
    ("rapl", "energy_uj"),
];

fn main() {
    let mut args = std::env::args().skip(1);
    let agents: usize = args.next().map_or(10, |a| a.parse().expect("AGENTS"));
    let samples: u64 = args.next().map_or(1000, |a| a.parse().expect("SAMPLES"));
    let db_name = "bench";
    let total = agents as u64 * samples;

    // The first collector creates the persistent session, then leaves.
    let mq = Mosquitto::start();
    let db = Influxd::start();
    let relay = Relay::start(db.port);
    let ccfg = config_file(
        "collector.toml",
        &fast_health(collector_config("bench", mq.port, &relay.url(), db_name)),
    );
    let mut first = start_collector(&ccfg);
    wait_subscribed(&first);
    first.stop();
    // A second session gets every message too: its drain, into a database of its own,
    // runs first, so the timed drain meets an influxd as warm as the alone runs do (its
    // first large writes after a start are slower: heap growth, new files).
    let warm_cfg = config_file(
        "collector.toml",
        &fast_health(collector_config(
            "warm-up",
            mq.port,
            &relay.url(),
            "warm_up",
        )),
    );
    let mut warm = start_collector(&warm_cfg);
    wait_subscribed(&warm);
    warm.stop();

    let configs: Vec<ConfigFile> = (0..agents)
        .map(|i| {
            let node = format!("bench-{i:03}");
            config_file(
                "a.toml",
                &agent_config(
                    "bench",
                    &node,
                    "10ms",
                    mq.port,
                    &[350.0, 350.0, 350.0, 350.0],
                ),
            )
        })
        .collect();
    let started = Instant::now();
    let mut procs: Vec<Proc> = configs.iter().map(|c| start_agent(c, samples)).collect();
    for p in &mut procs {
        p.wait_success(Duration::from_secs(600));
    }
    let produced = started.elapsed();
    println!(
        "queued {total} samples from {agents} agents in the broker ({:.1} s)",
        produced.as_secs_f64()
    );

    // The pipeline, first on a cold influxd, then timed: the collector drains the backlog.
    settle(&db);
    let mut warm = start_collector(&warm_cfg);
    let t_warm = Instant::now();
    assert!(
        drained(&warm, total),
        "the warm-up collector did not drain:\n{}",
        warm.log()
    );
    let warm_secs = t_warm.elapsed().as_secs_f64();
    warm.stop();
    settle(&db);
    relay.take();
    let influxd_cpu0 = influxd_cpu(&db);
    let broker_cpu = || mq.process().map_or(0.0, |p| p.cpu_and_peak_rss().0);
    let broker_cpu0 = broker_cpu();
    let mut collector = start_collector(&ccfg);
    let t0 = Instant::now();
    let t0_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let perf = std::env::var("NODEWATT_BENCH_PERF").ok().map(|a| {
        std::process::Command::new("perf")
            .args(a.split_whitespace())
            .args(["-p", &collector.pid().to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("perf runs")
    });
    let done = drained(&collector, total);
    let secs = t0.elapsed().as_secs_f64();
    let (cpu, rss) = collector.cpu_and_peak_rss();
    let influxd_pipeline_cpu = influxd_cpu(&db) - influxd_cpu0;
    let broker_pipeline_cpu = broker_cpu() - broker_cpu0;
    // Every body holding a sample was written and recorded when the collector says so.
    let bodies = relay.take();
    if let Some(mut perf) = perf {
        // SAFETY: SIGINT to our own child, which makes perf write its data and exit.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        let _ = perf.wait();
    }
    assert!(done, "the collector did not drain:\n{}", collector.log());
    let arrived = db.scalar(db_name, "SELECT COUNT(seq) FROM agent") as u64;
    assert_eq!(arrived, total, "samples in InfluxDB");
    let points = count_points(&db, db_name);
    // The collector's own health points (every 10 ms) say how long each write took.
    std::thread::sleep(Duration::from_millis(300));
    let writes = db.rows(
        db_name,
        &format!(
            "SELECT batches_written, write_latency_ms FROM nodewatt_collector \
             WHERE collector = 'bench' AND time >= {t0_ms}ms"
        ),
    );
    let mut latency = std::collections::BTreeMap::new();
    for (_, row) in &writes {
        if let (Some(batch), Some(ms)) = (
            row.get("batches_written").and_then(|v| v.as_u64()),
            row.get("write_latency_ms").and_then(|v| v.as_u64()),
        ) {
            latency.insert(batch, ms);
        }
    }
    let write_secs = latency.values().sum::<u64>() as f64 / 1e3;
    let log = collector.log();
    collector.stop();
    settle(&db);
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "bodies            {} gzip bodies written, {bytes} bytes ({} per body)",
        bodies.len(),
        bytes / bodies.len().max(1)
    );

    let alone: Vec<Alone> = ["alone_1", "alone_2"]
        .iter()
        .map(|name| {
            let a = alone(&db, name, &bodies);
            settle(&db);
            assert_eq!(
                a.points, points,
                "InfluxDB alone ({name}) stored other points than the pipeline"
            );
            println!(
                "{name}           {} points in {:.2} s: {:.0} points/s, influxd CPU {:.2} s ({:.2} µs/point)",
                a.points,
                a.secs,
                a.points / a.secs,
                a.influxd_cpu,
                a.influxd_cpu * 1e6 / a.points
            );
            a
        })
        .collect();
    let alone_pps = alone.len() as f64 * points / alone.iter().map(|a| a.secs).sum::<f64>();
    let pipeline_pps = points / secs;
    println!(
        "warm_up           {total} samples drained into a cold influxd in {warm_secs:.2} s ({:.0} points/s, not counted)",
        points / warm_secs
    );
    println!("drained           {total} samples, {points} points in {secs:.2} s");
    println!("messages_per_s    {:.0}", total as f64 / secs);
    println!("points_per_s      {pipeline_pps:.0}");
    println!("alone_points_per_s {alone_pps:.0} (both alone runs together)");
    println!("ratio             {:.2}", pipeline_pps / alone_pps);
    println!("collector_cpu_s   {cpu:.2}");
    println!("collector_us_per_point {:.2}", cpu * 1e6 / points);
    println!(
        "influxd_cpu_s     {influxd_pipeline_cpu:.2} while draining ({:.2} µs/point)",
        influxd_pipeline_cpu * 1e6 / points
    );
    println!("mosquitto_cpu_s   {broker_pipeline_cpu:.2} while draining");
    println!("collector_rss_kb  {rss} (peak)");
    println!(
        "collector_writes  {} batches seen, {write_secs:.2} s in writes ({:.0}% of the drain)",
        latency.len(),
        write_secs * 100.0 / secs
    );
    println!(
        "write_latency_ms  {:?}",
        latency.values().collect::<Vec<_>>()
    );
    for line in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        println!("collector_log     {line}");
    }
}

/// Points stored in `db`, over the sample measurements.
fn count_points(db: &Influxd, name: &str) -> f64 {
    MEASUREMENTS
        .iter()
        .map(|(m, field)| db.scalar(name, &format!("SELECT COUNT({field}) FROM {m}")))
        .sum()
}

/// The test harness's collector config with a health line every 10 ms.
fn fast_health(config: String) -> String {
    let fast = config.replace("health_interval = \"200ms\"", "health_interval = \"10ms\"");
    assert_ne!(fast, config, "the harness's collector config changed");
    fast
}

/// Waits (up to 10 minutes) until the collector's health line says it received `total`
/// samples and holds none unacknowledged: all of them were written. Reads only what was
/// appended to its log since the last look.
fn drained(collector: &Proc, total: u64) -> bool {
    let mut log = std::fs::File::open(collector.log_path()).expect("collector log");
    let mut text = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(600) {
        log.read_to_end(&mut text).expect("collector log");
        if let Some(end) = text.iter().rposition(|b| *b == b'\n') {
            let done = String::from_utf8_lossy(&text[..end])
                .lines()
                .rev()
                .find(|l| l.contains(" health"))
                .and_then(health)
                .is_some_and(|(messages, pending)| messages >= total && pending == 0);
            if done {
                return true;
            }
            text.drain(..=end);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// (messages, pending) of a `health` log line.
fn health(line: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let rest = line.split_once(&format!(" {name}="))?.1;
        rest.split(' ').next()?.parse().ok()
    };
    Some((field("messages")?, field("pending")?))
}

fn influxd_cpu(db: &Influxd) -> f64 {
    db.process().map_or(0.0, |p| p.cpu_and_peak_rss().0)
}

/// Waits (up to 30 s) until influxd has finished its background work from the last phase
/// (under 5% of a core over 500 ms), so it does not run into the next one.
fn settle(db: &Influxd) {
    let start = Instant::now();
    let mut last = influxd_cpu(db);
    while start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        let now = influxd_cpu(db);
        if now - last < 0.025 {
            return;
        }
        last = now;
    }
}

struct Alone {
    points: f64,
    secs: f64,
    influxd_cpu: f64,
}

/// Writes the captured bodies into a fresh database from one writer, one at a time.
fn alone(db: &Influxd, name: &str, bodies: &[Vec<u8>]) -> Alone {
    nodewatt_common::install_tls_provider();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client");
    // An error in the answer's JSON too (the HTTP status alone once hid one).
    db.execute("", &format!("CREATE DATABASE \"{name}\""))
        .expect("CREATE DATABASE");
    // Same endpoint and parameters as the collector's v1 writes.
    let url = reqwest::Url::parse_with_params(
        &format!("{}/write", db.url()),
        &[("db", name), ("precision", "ms")],
    )
    .unwrap();
    let cpu0 = influxd_cpu(db);
    let t0 = Instant::now();
    for body in bodies {
        let r = client
            .post(url.clone())
            .header("Content-Type", "text/plain; charset=utf-8")
            .header("Content-Encoding", "gzip")
            .body(body.clone())
            .send()
            .expect("write");
        let status = r.status();
        assert!(
            status.is_success(),
            "InfluxDB refused a captured body: {status} {}",
            r.text().unwrap_or_default()
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    let influxd_cpu = influxd_cpu(db) - cpu0;
    Alone {
        points: count_points(db, name),
        secs,
        influxd_cpu,
    }
}

/// Passes HTTP between the collector and influxd unchanged, keeping a copy of the body of
/// every `/write` request (HTTP/1.1 with Content-Length bodies, as the collector sends
/// them). Answers flow back byte for byte.
struct Relay {
    port: u16,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Relay {
    fn start(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay port");
        let port = listener.local_addr().unwrap().port();
        let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || relay(client, upstream, &kept));
            }
        });
        Relay { port, bodies }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The bodies written since the last call.
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.bodies.lock().unwrap())
    }
}

fn relay(client: TcpStream, upstream: u16, kept: &Mutex<Vec<Vec<u8>>>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut answers, mut back) = (server.try_clone().unwrap(), client.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut answers, &mut back);
        let _ = back.shutdown(std::net::Shutdown::Write);
    });
    let mut to_server = server;
    let mut r = BufReader::new(client);
    loop {
        let mut head = String::new();
        if r.read_line(&mut head).unwrap_or(0) == 0 {
            break;
        }
        let is_write = head.starts_with("POST /write");
        let mut length = 0;
        loop {
            let start = head.len();
            if r.read_line(&mut head).unwrap_or(0) == 0 {
                return;
            }
            let header = head[start..].trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                assert!(
                    !k.eq_ignore_ascii_case("transfer-encoding"),
                    "the relay reads Content-Length bodies only"
                );
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().expect("Content-Length");
                }
            }
        }
        let mut request = head.into_bytes();
        let body_at = request.len();
        request.resize(body_at + length, 0);
        if r.read_exact(&mut request[body_at..]).is_err() {
            break;
        }
        if is_write {
            kept.lock().unwrap().push(request[body_at..].to_vec());
        }
        if to_server.write_all(&request).is_err() {
            break;
        }
    }
    let _ = to_server.shutdown(std::net::Shutdown::Write);
}
