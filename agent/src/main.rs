use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use nodewatt_agent::config::Config;
use nodewatt_agent::publish::{self, PublisherSettings};
use nodewatt_agent::sampler::{build_sources, Sampler};
use nodewatt_agent::schedule::{self, Clock};
use nodewatt_wire::Sample;

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
    /// Sample at the configured interval and publish each sample to the MQTT broker of the
    /// [mqtt] section, or, without one, write one JSON message per line to stdout.
    /// Stops on SIGTERM or SIGINT, marking the node offline.
    Run {
        /// Agent configuration file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Stop after this many samples, once all of them are acknowledged by the broker
        /// (for tests and benchmarks).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Write JSON lines to stdout even if the config has an [mqtt] section.
        #[arg(long)]
        stdout: bool,
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
    nodewatt_common::init_logging(cli.log_level.as_deref());

    let result = match cli.command {
        Command::Run {
            config,
            count,
            stdout,
        } => run(&config, count, stdout),
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
    let start_ms = clock.now_ms();
    let sampler = Sampler::new(
        sources,
        cfg.agent.cluster.clone(),
        node,
        cfg.agent.interval.as_millis() as u64,
        start_ms,
    )
    .with_accounting(&cfg, start_ms);
    Ok((cfg, sampler))
}

fn log_inventory(sampler: &Sampler) {
    for (name, inv) in sampler.inventories() {
        match &inv.unavailable {
            Some(why) => tracing::warn!(source = name, "{why}"),
            None => tracing::info!(source = name, "{}", inv.summary),
        }
        for p in &inv.problems {
            tracing::warn!(source = name, "{p}");
        }
    }
}

/// Samples at aligned ticks until `count` samples were taken or `emit` returns false.
fn sample_loop(
    mut sampler: Sampler,
    interval: u64,
    count: Option<u64>,
    mut emit: impl FnMut(Sample) -> bool,
) {
    let mut clock = Clock::Real;
    let mut tick = schedule::next_tick(clock.now_ms(), interval);
    let mut taken = 0;
    while count.is_none_or(|c| taken < c) {
        clock.sleep_until(tick);
        if !emit(sampler.sample(tick)) {
            return;
        }
        taken += 1;
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

fn run(path: &Path, count: Option<u64>, to_stdout: bool) -> anyhow::Result<ExitCode> {
    let (cfg, sampler) = load(path, &Clock::Real)?;
    let interval = cfg.agent.interval.as_millis() as u64;
    log_inventory(&sampler);
    tracing::info!(interval_ms = interval, "sampling");
    let Some(mqtt) = cfg.mqtt.as_ref().filter(|_| !to_stdout) else {
        let stdout = std::io::stdout();
        let mut failed = None;
        sample_loop(sampler, interval, count, |s| {
            let mut out = stdout.lock();
            let r = writeln!(out, "{}", s.to_json()).and_then(|_| out.flush());
            failed = r.err();
            failed.is_none()
        });
        return match failed {
            Some(e) => Err(e).context("writing to stdout"),
            None => Ok(ExitCode::SUCCESS),
        };
    };

    nodewatt_common::install_tls_provider();
    let node = cfg.node_name()?;
    let settings = PublisherSettings {
        options: mqtt.options(&format!("nodewatt-agent-{}-{node}", cfg.agent.cluster))?,
        cluster: cfg.agent.cluster.clone(),
        node,
        outbox_capacity: cfg.outbox.capacity,
        max_in_flight: cfg.outbox.max_in_flight,
        reconnect_initial: mqtt.reconnect_initial,
        reconnect_max: mqtt.reconnect_max,
        state_file: cfg.outbox.state_file.clone(),
    };
    // Sampling runs on its own thread and never waits for the network; the
    // single-threaded runtime only moves samples to the broker.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("sampler".into())
        .spawn(move || sample_loop(sampler, interval, count, |s| tx.send(s).is_ok()))
        .context("starting the sampling thread")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let stats = runtime.block_on(publish::run(
        settings,
        rx,
        nodewatt_common::shutdown_signal(),
    ));
    tracing::info!(
        acked = stats.acked,
        merges = stats.merges,
        reconnects = stats.reconnects,
        stray_acks = stats.stray_acks,
        "stopped"
    );
    Ok(ExitCode::SUCCESS)
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
    if let Some(dir) = sampler.registry_dir() {
        let mut registry =
            nodewatt_agent::registry::Registry::new(dir.to_owned(), cfg.jobs.owner_uid);
        let jobs = registry.jobs().len();
        let rejected = registry.rejected_files;
        println!(
            "{:<10} ok           {jobs} jobs in {} ({rejected} files ignored)",
            "jobs",
            dir.display()
        );
        if rejected > 0 {
            bad += 1;
        }
    }
    Ok(if strict && bad > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
