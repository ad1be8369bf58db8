use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nodewatt_collector::billing::{self, By, Format, Prices};
use nodewatt_collector::config::Config;
use nodewatt_collector::config::ValidationConfig;
use nodewatt_collector::influx::Influx;
use nodewatt_collector::report;
use nodewatt_collector::validate::Gate;
use nodewatt_wire::{JobId, Project};

/// nodewatt collector: subscribes to agent samples over MQTT, validates them, and writes
/// them to InfluxDB, acknowledging each message only once InfluxDB accepted it.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter for stderr (error, warn, info, debug, or a tracing filter); RUST_LOG is
    /// used when this is not given.
    #[arg(long, global = true, value_name = "FILTER", value_parser = nodewatt_common::log_filter)]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

/// Billing factors; each overrides the config's [billing] value.
#[derive(clap::Args)]
struct PriceArgs {
    /// Price per facility kWh (IT energy x PUE).
    #[arg(long, value_name = "PRICE")]
    price_per_kwh: Option<f64>,
    /// Power usage effectiveness: facility energy = IT energy x PUE.
    #[arg(long, value_name = "FACTOR")]
    pue: Option<f64>,
    /// Grid carbon intensity, g CO2e per kWh.
    #[arg(long, value_name = "GRAMS")]
    co2_g_per_kwh: Option<f64>,
}

/// A billing period (FROM, TO].
#[derive(clap::Args)]
struct PeriodArgs {
    /// Start of the period: a date (2026-11-01, UTC midnight) or RFC 3339.
    #[arg(long, value_name = "TIME")]
    from: String,
    /// End of the period, same forms.
    #[arg(long, value_name = "TIME")]
    to: String,
}

impl PeriodArgs {
    /// (from, to) in ms; `from` before `to`.
    fn ms(&self) -> anyhow::Result<(u64, u64)> {
        let from = billing::parse_time(&self.from).map_err(anyhow::Error::msg)?;
        let to = billing::parse_time(&self.to).map_err(anyhow::Error::msg)?;
        if from >= to {
            anyhow::bail!("--from must be before --to");
        }
        Ok((from, to))
    }
}

/// Where the Debian package installs the configuration.
const DEFAULT_CONFIG: &str = "/etc/nodewatt/collector.toml";

#[derive(clap::Args)]
struct ConfigArg {
    /// Collector configuration file (TOML; every option in docs/configuration.md). Bills
    /// and reports read only its [influxdb] and [billing] sections.
    #[arg(long, short, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the MQTT → InfluxDB pipeline until SIGTERM or SIGINT.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Energy (kWh by device class), GPU-hours and CPU core-hours per project, user, node
    /// or job over a period, with cost and CO2e; for billing scripts use --format csv or
    /// json (columns in docs/billing.md). The period is (FROM, TO]: consecutive periods
    /// bill every joule once.
    Usage {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        period: PeriodArgs,
        /// Group by project, user, node, or job (whole-job totals of jobs that ran in the period).
        #[arg(long, value_enum, default_value = "project")]
        by: By,
        /// Only this project.
        #[arg(long, value_name = "NAME")]
        project: Option<Project>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        #[command(flatten)]
        prices: PriceArgs,
    },
    /// Write an energy report in Markdown, with an SVG chart of power by device class next
    /// to it, for one job (its whole run) or one project over a period.
    Report {
        #[command(flatten)]
        config: ConfigArg,
        /// The job to report on.
        #[arg(
            long,
            value_name = "ID",
            conflicts_with = "project",
            required_unless_present = "project"
        )]
        job: Option<JobId>,
        /// The project to report on (needs --from and --to).
        #[arg(long, value_name = "NAME", requires = "from", requires = "to")]
        project: Option<Project>,
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// Markdown file to write; the chart goes beside it with the extension .svg.
        #[arg(long, short, value_name = "FILE.md")]
        output: PathBuf,
        #[command(flatten)]
        prices: PriceArgs,
    },
    /// Roll up the `usage` of every whole hour in (FROM, TO] that has no usable rollup:
    /// for data written before rollups existed, or more than 400 days ago (`serve` keeps
    /// rolled up the hours collectors marked as written into, whenever rollups are on).
    /// Bills read whole hours from rollups, the rest from `usage`; see docs/billing.md.
    Rollup {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        period: PeriodArgs,
        /// Roll up hours that already have a usable rollup too.
        #[arg(long)]
        all: bool,
    },
    /// Check what `serve` and the bills need, one line each: the broker (reachable, login,
    /// subscriptions allowed), InfluxDB (reachable, database, write and query rights, the
    /// newest stored sample). Exits 1 with --strict if anything is wrong.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Exit with status 1 if any check found a problem.
        #[arg(long)]
        strict: bool,
    },
    /// Read samples as JSON lines on stdin (e.g. `nodewatt-agent run --stdout`), run the
    /// checks `serve` runs on each, report each invalid line with its reason, and print
    /// counts per node and per reason at the end (also on Ctrl-C). Exits 1 if any line
    /// was invalid.
    Validate {
        /// Collector configuration whose [validation] limits apply (defaults otherwise).
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    nodewatt_common::init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Serve { config } => serve(&config.config),
        Command::Check { config, strict } => check(&config.config, strict),
        Command::Validate { config } => (|| {
            let validation = match config {
                Some(path) => Config::load(&path)?.validation,
                None => ValidationConfig::default(),
            };
            Ok(validate(std::io::stdin().lock(), Gate::new(&validation)))
        })(),
        Command::Report {
            config,
            job,
            project,
            from,
            to,
            output,
            prices,
        } => (|| {
            let cfg = Config::load(&config.config)?;
            let prices = resolve_prices(&cfg, &prices)?;
            let period = match (&from, &to) {
                (Some(f), Some(t)) => Some((
                    billing::parse_time(f).map_err(anyhow::Error::msg)?,
                    billing::parse_time(t).map_err(anyhow::Error::msg)?,
                )),
                _ => None,
            };
            let subject = match (job, project) {
                (Some(j), _) => report::Subject::Job(j),
                (None, Some(p)) => report::Subject::Project(p),
                (None, None) => anyhow::bail!("give --job or --project"),
            };
            let plan = cfg.plan();
            let data = block_on(&cfg, |influx| async move {
                report::gather(&influx, &subject, period, &plan).await
            })?
            .map_err(anyhow::Error::msg)?;
            let chart = output.with_extension("svg");
            let chart_name = chart
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            std::fs::write(&chart, report::svg(&data.series))
                .with_context(|| format!("writing {}", chart.display()))?;
            let md = report::markdown(&data, &prices, &chart_name, &cfg.influxdb.database);
            std::fs::write(&output, md).with_context(|| format!("writing {}", output.display()))?;
            println!("wrote {} and {}", output.display(), chart.display());
            Ok(ExitCode::SUCCESS)
        })(),
        Command::Rollup {
            config,
            period,
            all,
        } => (|| {
            let cfg = Config::load(&config.config)?;
            let (from, to) = period.ms()?;
            let settle = cfg.rollup_settle().as_millis() as u64;
            let started = std::time::Instant::now();
            let r = block_on(&cfg, |influx| async move {
                billing::rollup::roll_range(&influx, from, to, settle, all).await
            })?
            .map_err(anyhow::Error::msg)?;
            println!(
                "rolled up {} hours ({} usage points) in {:.1} s; {} already usable; {} written into in the last {} (rolled up by serve once quiet); {} not ended yet",
                r.rolled,
                r.points,
                started.elapsed().as_secs_f64(),
                r.usable,
                r.settling,
                humantime::format_duration(cfg.rollup_settle()),
                r.future
            );
            if !r.failed.is_empty() {
                anyhow::bail!(
                    "hours not rolled up (bills read them from usage until they are):\n{}",
                    r.failed.join("\n")
                );
            }
            Ok(ExitCode::SUCCESS)
        })(),
        Command::Usage {
            config,
            period,
            by,
            project,
            format,
            prices,
        } => (|| {
            let cfg = Config::load(&config.config)?;
            let prices = resolve_prices(&cfg, &prices)?;
            let (from, to) = period.ms()?;
            let plan = cfg.plan();
            let scope = billing::Scope::new(by, from, to, project.clone());
            let groups = block_on(&cfg, |influx| async move {
                billing::usage(&influx, by, from, to, project.as_ref(), &plan).await
            })?
            .map_err(anyhow::Error::msg)?;
            let rows = billing::rows(&groups, by, &prices);
            billing::print(&rows, format, &prices, &scope);
            Ok(ExitCode::SUCCESS)
        })(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nodewatt-collector: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Billing settings: command-line options over the config's [billing] section.
fn resolve_prices(cfg: &Config, args: &PriceArgs) -> anyhow::Result<Prices> {
    let b = &cfg.billing;
    let p = Prices {
        pue: args.pue.unwrap_or(b.pue),
        price_per_kwh: args.price_per_kwh.or(b.price_per_kwh),
        currency: b.currency.clone(),
        co2_g_per_kwh: args.co2_g_per_kwh.or(b.co2_g_per_kwh),
    };
    if !(p.pue.is_finite() && p.pue >= 1.0) {
        anyhow::bail!("pue must be a number >= 1");
    }
    Ok(p)
}

/// Runs `f` with an InfluxDB client on a single-threaded runtime; its requests wait up to
/// `[billing] query_timeout` (a bill reads far more than a write sends).
fn block_on<F, Fut, T>(cfg: &Config, f: F) -> anyhow::Result<T>
where
    F: FnOnce(Influx) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    nodewatt_common::install_tls_provider();
    let mut influx_cfg = cfg.influxdb.clone();
    influx_cfg.timeout = cfg.billing.query_timeout;
    let influx = Influx::new(&influx_cfg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    Ok(runtime.block_on(f(influx)))
}

fn serve(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    let Some(me) = cfg.collector.clone() else {
        anyhow::bail!(
            "{}: serve needs a [collector] section with this collector's id (the broker keeps its session under it)",
            path.display()
        );
    };
    nodewatt_common::install_tls_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(nodewatt_collector::ingest::serve(
        cfg,
        me,
        nodewatt_common::shutdown_signal(),
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn check(path: &std::path::Path, strict: bool) -> anyhow::Result<ExitCode> {
    use nodewatt_collector::check::Finding;
    let cfg = Config::load(path)?;
    nodewatt_common::install_tls_provider();
    let mut findings = vec![Finding {
        name: "config",
        result: Ok(format!("{} read", path.display())),
    }];
    match &cfg.collector {
        Some(c) => findings.push(Finding {
            name: "collector",
            result: Ok(format!(
                "id {}{}",
                c.id,
                c.share_group
                    .as_ref()
                    .map(|g| format!(", shared group {g}"))
                    .unwrap_or_default()
            )),
        }),
        None => findings.push(Finding {
            name: "collector",
            result: Err("no [collector] section: serve needs one (bills do not)".into()),
        }),
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    if let Some(c) = &cfg.collector {
        let mqtt = cfg.mqtt.clone().unwrap_or_default();
        let topics = nodewatt_collector::ingest::subscriptions(None);
        let id = format!("nodewatt-check-{}", c.id);
        findings.push(runtime.block_on(nodewatt_collector::check::broker(&mqtt, &id, &topics)));
    }
    match Influx::new(&cfg.influxdb) {
        Ok(influx) => findings.extend(runtime.block_on(nodewatt_collector::check::influx(
            &influx,
            nodewatt_common::now_ms(),
        ))),
        Err(e) => findings.push(Finding {
            name: "influxdb",
            result: Err(e.to_string()),
        }),
    }
    let mut out = nodewatt_common::preflight::Preflight::default();
    for f in &findings {
        out.finding(f.name, &f.result);
    }
    Ok(out.exit_code(strict))
}

/// What `validate` saw; printed at the end of input or on Ctrl-C.
#[derive(Default)]
struct Tally {
    per_node: std::collections::BTreeMap<String, u64>,
    per_reason: std::collections::BTreeMap<&'static str, u64>,
    bad: u64,
}

impl Tally {
    fn print(&self) -> ExitCode {
        for (node, count) in &self.per_node {
            println!("{node}: {count} valid samples");
        }
        for (reason, count) in &self.per_reason {
            println!("rejected {reason}: {count}");
        }
        println!("{} invalid lines", self.bad);
        if self.bad > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

fn validate(input: impl BufRead, mut gate: Gate) -> ExitCode {
    use std::sync::{Arc, Mutex};
    let tally = Arc::new(Mutex::new(Tally::default()));
    // Ctrl-C (or SIGTERM) while reading a pipe: print what was counted, then leave.
    {
        let tally = tally.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(nodewatt_common::shutdown_signal());
            let code = tally.lock().map(|t| t.print()).unwrap_or(ExitCode::from(2));
            let _ = std::io::Write::flush(&mut std::io::stdout());
            std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
        });
    }
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
        let checked = gate.admit_line(&line, nodewatt_common::now_ms());
        let mut t = tally.lock().expect("tally lock");
        match checked {
            Ok(s) => {
                *t.per_node
                    .entry(format!("{}/{}", s.cluster, s.node))
                    .or_default() += 1
            }
            Err(e) => {
                t.bad += 1;
                *t.per_reason.entry(e.reason.as_str()).or_default() += 1;
                eprintln!("line {}: {e}", n + 1);
            }
        }
    }
    let code = tally.lock().expect("tally lock").print();
    code
}
