use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use nodewatt_agent::config::Config;
use nodewatt_agent::sampler::{build_sources, Sampler};
use nodewatt_agent::schedule::{self, Clock};

/// nodewatt per-node agent: samples GPU (NVML), CPU, RAPL, hwmon and thermal telemetry at
/// wall-clock-aligned instants and emits one versioned JSON message per sample.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter for stderr (error, warn, info, debug, trace, or a tracing filter such as
    /// "nodewatt_agent=debug"); RUST_LOG is used when this is not given.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample forever at the configured interval, writing one JSON message per line to stdout.
    Run {
        /// Agent configuration file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Take one sample and print it as JSON. Sources are read at two consecutive ticks so
    /// that rates (CPU utilisation, RAPL power) cover one interval.
    Once {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print indented JSON instead of one line.
        #[arg(long)]
        pretty: bool,
        /// For tests and golden files: pretend the wall clock reads this many Unix
        /// milliseconds and do not sleep, so timestamps are deterministic.
        #[arg(long, value_name = "UNIX_MS")]
        fake_time_ms: Option<u64>,
    },
    /// Show which sources were found, how many devices each has, and what is unreadable and why.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Exit with status 1 if any enabled source is unavailable or has unreadable devices.
        #[arg(long)]
        strict: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log_level {
        Some(f) => tracing_subscriber::EnvFilter::new(f),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Once {
            config,
            pretty,
            fake_time_ms,
        } => once(&config, pretty, fake_time_ms),
        Command::Check { config, strict } => check(&config, strict),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nodewatt-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load(path: &Path, clock: &Clock) -> anyhow::Result<(Config, Sampler)> {
    let cfg = Config::load(path)?;
    let node = cfg.node_name()?;
    let sources = build_sources(&cfg, &node)?;
    let sampler = Sampler::new(
        sources,
        cfg.agent.cluster.clone(),
        node,
        cfg.agent.interval.as_millis() as u64,
        clock.now_ms(),
    );
    Ok((cfg, sampler))
}

fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let mut clock = Clock::Real;
    let (cfg, mut sampler) = load(path, &clock)?;
    let interval = cfg.agent.interval.as_millis() as u64;
    for (name, inv) in sampler.inventories() {
        match &inv.unavailable {
            Some(why) => tracing::warn!(source = name, "{why}"),
            None => tracing::info!(source = name, "{}", inv.summary),
        }
        for p in &inv.problems {
            tracing::warn!(source = name, "{p}");
        }
    }
    tracing::info!(interval_ms = interval, "sampling");
    let stdout = std::io::stdout();
    let mut tick = schedule::next_tick(clock.now_ms(), interval);
    loop {
        clock.sleep_until(tick);
        let sample = sampler.sample(tick);
        let mut out = stdout.lock();
        writeln!(out, "{}", sample.to_json())
            .and_then(|_| out.flush())
            .context("writing to stdout")?;
        let skipped;
        (tick, skipped) = schedule::after(tick, clock.now_ms(), interval);
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "sampling took longer than the interval; ticks skipped"
            );
        }
    }
}

fn once(path: &Path, pretty: bool, fake_time_ms: Option<u64>) -> anyhow::Result<ExitCode> {
    let mut clock = match fake_time_ms {
        Some(now_ms) => Clock::Fixed { now_ms },
        None => Clock::Real,
    };
    let (cfg, mut sampler) = load(path, &clock)?;
    let interval = cfg.agent.interval.as_millis() as u64;
    let first = schedule::next_tick(clock.now_ms(), interval);
    clock.sleep_until(first);
    sampler.prime(first);
    clock.sleep_until(first + interval);
    let sample = sampler.sample(first + interval);
    let json = if pretty {
        serde_json::to_string_pretty(&sample)?
    } else {
        sample.to_json()
    };
    println!("{json}");
    Ok(ExitCode::SUCCESS)
}

fn check(path: &Path, strict: bool) -> anyhow::Result<ExitCode> {
    let clock = Clock::Real;
    let (cfg, sampler) = load(path, &clock)?;
    println!(
        "config {}: cluster {}, node {}, interval {}",
        path.display(),
        cfg.agent.cluster,
        cfg.node_name()?,
        humantime::format_duration(cfg.agent.interval)
    );
    let mut bad = 0;
    for (name, inv) in sampler.inventories() {
        match &inv.unavailable {
            Some(why) => {
                bad += 1;
                println!("{name:<10} UNAVAILABLE  {why}");
            }
            None => println!("{name:<10} ok           {}", inv.summary),
        }
        for p in &inv.problems {
            bad += 1;
            println!("{:<10} UNREADABLE   {p}", "");
        }
    }
    Ok(if strict && bad > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
