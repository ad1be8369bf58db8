use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nodewatt_collector::config::Config;
use nodewatt_wire::Sample;

/// nodewatt collector: subscribes to agent samples over MQTT, validates them, and writes
/// them to InfluxDB, acknowledging each message only once InfluxDB accepted it.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter for stderr (error, warn, info, debug, or a tracing filter); RUST_LOG is
    /// used when this is not given.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the MQTT → InfluxDB pipeline until SIGTERM or SIGINT.
    Serve {
        /// Collector configuration file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Read samples as JSON lines on stdin (e.g. `nodewatt-agent run` without [mqtt]),
    /// report each invalid line with its reason, and print a count per node at the end.
    /// Exits 1 if any line was invalid.
    Validate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    nodewatt_common::init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Validate => Ok(validate(std::io::stdin().lock())),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nodewatt-collector: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn serve(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    nodewatt_common::install_tls_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(nodewatt_collector::ingest::serve(
        cfg,
        nodewatt_common::shutdown_signal(),
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn validate(input: impl BufRead) -> ExitCode {
    let mut per_node: std::collections::BTreeMap<String, u64> = Default::default();
    let mut bad = 0u64;
    for (n, line) in input.split(b'\n').enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                eprintln!("nodewatt-collector: reading stdin: {e}");
                return ExitCode::from(2);
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match Sample::from_json(&line) {
            Ok(s) => {
                *per_node
                    .entry(format!("{}/{}", s.cluster, s.node))
                    .or_default() += 1
            }
            Err(e) => {
                bad += 1;
                eprintln!("line {}: {e}", n + 1);
            }
        }
    }
    for (node, count) in &per_node {
        println!("{node}: {count} valid samples");
    }
    println!("{bad} invalid lines");
    if bad > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
