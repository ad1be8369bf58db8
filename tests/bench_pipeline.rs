//! Collector ingest throughput: agents fill the broker while the collector is away, then
//! a collector drains the backlog into InfluxDB; prints messages/s, points/s and the
//! collector's CPU time and peak RSS. Real mosquitto and influxd, release binaries:
//!
//!     cargo build --release --workspace --bins
//!     cargo run --release -p nodewatt-tests --example bench_pipeline -- [AGENTS] [SAMPLES]
//!
//! See docs/benchmarks.md.

use std::time::{Duration, Instant};

use nodewatt_tests::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let agents: usize = args.next().map_or(10, |a| a.parse().expect("AGENTS"));
    let samples: u64 = args.next().map_or(1000, |a| a.parse().expect("SAMPLES"));
    let db_name = "bench";

    // The first collector creates the persistent session, then leaves.
    let Stack {
        mq,
        db,
        collector_cfg: ccfg,
        collector: mut first,
    } = Stack::start("bench", db_name);
    first.stop();

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
    let total = agents as u64 * samples;
    println!(
        "queued {total} samples from {agents} agents in the broker ({:.1} s)",
        produced.as_secs_f64()
    );

    let collector = start_collector(&ccfg);
    let t0 = Instant::now();
    let done = wait_until(Duration::from_secs(600), || {
        db.scalar(db_name, "SELECT COUNT(seq) FROM agent") as u64 >= total
    });
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        done,
        "only {} of {total} arrived",
        db.scalar(db_name, "SELECT COUNT(seq) FROM agent")
    );
    let (cpu, rss) = collector.cpu_and_peak_rss();
    let points: f64 = ["agent", "agent_source", "gpu", "cpu", "rapl"]
        .iter()
        .map(|m| {
            let field = match *m {
                "agent" => "seq",
                "agent_source" => "read_us",
                "gpu" => "power_w",
                "cpu" => "cores",
                _ => "energy_uj",
            };
            db.scalar(db_name, &format!("SELECT COUNT({field}) FROM {m}"))
        })
        .sum();
    println!("drained           {total} samples, {points} points in {secs:.2} s");
    println!("messages_per_s    {:.0}", total as f64 / secs);
    println!("points_per_s      {:.0}", points / secs);
    println!("collector_cpu_s   {cpu:.2}");
    println!("collector_rss_kb  {rss} (peak)");
}
