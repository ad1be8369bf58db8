//! Per-sample cost of each source: reads every source N times and prints the mean, p50,
//! p99 and max read time per source, plus the encoded message size.
//!
//!     cargo run --release -p nodewatt-agent --example sample_cost -- CONFIG [N]
//!
//! See docs/benchmarks.md.

use std::time::Instant;

use nodewatt_agent::config::Config;
use nodewatt_agent::sampler::{build_sources, Sampler};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "config/agent-simulated.toml".into());
    let n: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    let cfg = Config::load(path.as_ref())?;
    let node = cfg.node_name()?;
    let interval = cfg.agent.interval.as_millis() as u64;
    let mut sampler = Sampler::new(
        build_sources(&cfg, &node)?,
        "bench".parse()?,
        node,
        interval,
        0,
    );

    let mut per_source: Vec<(String, Vec<u64>)> = Vec::new();
    let mut totals = Vec::with_capacity(n);
    let mut bytes = 0;
    for i in 0..n {
        let started = Instant::now();
        let s = sampler.sample(1_000_000 + i as u64 * interval);
        let json = s.to_json();
        totals.push(started.elapsed().as_micros() as u64);
        bytes = json.len();
        for src in s.sources {
            match per_source.iter_mut().find(|(name, _)| *name == src.name) {
                Some((_, v)) => v.push(src.read_us),
                None => per_source.push((src.name, vec![src.read_us])),
            }
        }
    }
    println!("config {path}, {n} samples, message {bytes} bytes");
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9}",
        "source", "mean_us", "p50_us", "p99_us", "max_us"
    );
    per_source.push(("total+json".into(), totals));
    for (name, mut v) in per_source {
        v.sort_unstable();
        let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
        let pct = |p: f64| v[((v.len() - 1) as f64 * p) as usize];
        println!(
            "{name:<10} {mean:>9.1} {:>9} {:>9} {:>9}",
            pct(0.5),
            pct(0.99),
            v[v.len() - 1]
        );
    }
    Ok(())
}
