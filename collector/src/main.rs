use std::io::BufRead;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nodewatt_wire::Sample;

/// nodewatt collector: validates agent samples (MQTT ingest into InfluxDB comes next).
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read samples as JSON lines on stdin (e.g. `nodewatt-agent run` piped in), report each
    /// invalid line with its reason, and print a count per node at the end. Exits 1 if any
    /// line was invalid.
    Validate,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Validate => validate(std::io::stdin().lock()),
    }
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
