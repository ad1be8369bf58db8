use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use nodewatt_agent::config::Config;
use nodewatt_agent::publish::{self, PublisherSettings, Sampled};
use nodewatt_agent::sampler::{build_sources, Sampler, State};
use nodewatt_agent::schedule::{self, Clock};
use nodewatt_wire::Sample;

/// nodewatt per-node agent: samples GPU (NVML), CPU, RAPL, hwmon and thermal telemetry at
/// wall-clock-aligned instants and emits one versioned JSON message per sample.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter for stderr (error, warn, info, debug, trace, or a tracing filter such as
    /// "nodewatt_agent=debug"); RUST_LOG is used when this is not given.
    #[arg(long, global = true, value_name = "FILTER", value_parser = nodewatt_common::log_filter)]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

/// Where the Debian package installs the configuration.
const DEFAULT_CONFIG: &str = "/etc/nodewatt/agent.toml";

#[derive(clap::Args)]
struct ConfigArg {
    /// Agent configuration file (TOML; every option in docs/configuration.md).
    #[arg(long, short, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Sample at the configured interval and publish to the MQTT broker of the [mqtt]
    /// section (telemetry and usage at their configured cadences), or, without one, write
    /// one JSON message per line to stdout.
    /// Stops on SIGTERM or SIGINT, marking the node offline.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Stop after this many messages, once all of them are acknowledged by the broker
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
        #[command(flatten)]
        config: ConfigArg,
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
        #[command(flatten)]
        config: ConfigArg,
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
        } => run(&config.config, count, stdout),
        Command::Once {
            config,
            pretty,
            fake_time_ms,
        } => once(&config.config, pretty, fake_time_ms),
        Command::Check { config, strict } => check(&config.config, strict),
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
    .with_accounting(&cfg, start_ms)
    .with_cadence(cfg.cadence());
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

/// Samples at aligned ticks until `count` messages were emitted, `emit` returns false, or
/// a stop is asked on `stop`; returns whether a stop was asked.
fn sample_loop(
    sampler: &mut Sampler,
    interval: u64,
    count: Option<u64>,
    stop: Option<&Receiver<()>>,
    mut emit: impl FnMut(Sample, &Sampler) -> bool,
) -> bool {
    let mut clock = Clock::Real;
    let mut tick = schedule::next_tick(clock.now_ms(), interval);
    let mut taken = 0;
    while count.is_none_or(|c| taken < c) {
        if let Some(stop) = stop {
            let wait = tick.saturating_sub(clock.now_ms());
            match stop.recv_timeout(Duration::from_millis(wait)) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return true,
            }
        }
        clock.sleep_until(tick);
        if let Some(m) = sampler.tick(tick) {
            if !emit(m, sampler) {
                return false;
            }
            taken += 1;
        }
        let skipped;
        (tick, skipped) = schedule::after(tick, clock.now_ms(), interval);
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "sampling took longer than the interval; ticks skipped"
            );
        }
    }
    tracing::info!(samples = taken, "--count samples taken");
    false
}

/// Resumes the state an earlier run on this boot left: the one saved at a clean stop, or
/// the one spooled with the newest sample (after a crash), whichever is newer.
fn resume(sampler: &mut Sampler, cfg: &Config, boot_id: Option<&str>, spooled: Option<Vec<u8>>) {
    let Some(file) = &cfg.agent.state_file else {
        return;
    };
    let saved = match nodewatt_agent::state::take(file) {
        Ok(st) => st,
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    };
    let spooled = spooled.and_then(|b| match serde_json::from_slice::<State>(&b) {
        Ok(st) => Some(st),
        Err(e) => {
            tracing::warn!("the state spooled with the newest sample is unreadable: {e}");
            None
        }
    });
    let newest = [saved, spooled]
        .into_iter()
        .flatten()
        .max_by_key(|st| st.deltas.last_ts());
    let Some(st) = newest else {
        return;
    };
    match sampler.resume(st, boot_id, nodewatt_common::now_ms()) {
        Ok(gap_ms) => tracing::info!(
            gap_ms,
            "resumed the previous run: job totals continue, the gap is measured"
        ),
        Err(why) => tracing::warn!("saved state not resumed ({why}); starting afresh"),
    }
}

fn spool_config(cfg: &Config, dir: &Path) -> publish::spool::SpoolConfig {
    use nodewatt_agent::config::FsyncPolicy;
    use publish::spool::Fsync;
    publish::spool::SpoolConfig {
        dir: dir.to_owned(),
        segment_bytes: 4 << 20,
        max_bytes: cfg.outbox.spool_max_bytes as u64,
        fsync: match cfg.outbox.fsync {
            FsyncPolicy::Always => Fsync::Always,
            FsyncPolicy::Never => Fsync::Never,
            FsyncPolicy::Every(d) => Fsync::Every(d),
        },
    }
}

/// Saves the sampler's state for the next start, if configured.
fn save_state(sampler: &Sampler, cfg: &Config, boot_id: Option<String>) {
    let (Some(file), Some(boot_id)) = (&cfg.agent.state_file, boot_id) else {
        return;
    };
    match nodewatt_agent::state::save(file, &sampler.state(boot_id)) {
        Ok(()) => tracing::info!(file = %file.display(), "saved counters and job totals"),
        Err(e) => {
            tracing::error!(file = %file.display(), "cannot save counters and job totals: {e}")
        }
    }
}

/// The agent's MQTT client id: the broker's login for a node may be pinned to it.
fn agent_client_id(cfg: &Config, node: &nodewatt_wire::NodeName) -> String {
    format!("nodewatt-agent-{}-{node}", cfg.agent.cluster)
}

fn run(path: &Path, count: Option<u64>, to_stdout: bool) -> anyhow::Result<ExitCode> {
    let (cfg, mut sampler) = load(path, &Clock::Real)?;
    let interval = cfg.agent.interval.as_millis() as u64;
    log_inventory(&sampler);
    let boot_id = nodewatt_agent::state::boot_id(&cfg.agent.proc_root);
    let mqtt = cfg.mqtt.as_ref().filter(|_| !to_stdout);
    let node = cfg.node_name()?;
    // The spool first: a crash leaves the newest state there.
    let spool = match (mqtt, &cfg.outbox.spool_dir) {
        (Some(_), Some(dir)) => {
            publish::spooler::open(spool_config(&cfg, dir), &cfg.agent.cluster, &node)
        }
        _ => None,
    };
    let (spool, spooled_state) = match spool {
        Some((spooler, recovered, state)) => (Some((spooler, recovered)), state),
        None => (None, None),
    };
    resume(&mut sampler, &cfg, boot_id.as_deref(), spooled_state);
    let cadence = cfg.cadence();
    tracing::info!(
        interval_ms = interval,
        telemetry_ms = cadence.telemetry_ms,
        usage_ms = cadence.usage_ms,
        "sampling"
    );
    let Some(mqtt) = mqtt else {
        // Ctrl-C or SIGTERM stops after the current sample and saves the state, as with a
        // broker; the sender stays here too, so a failed watcher never reads as a stop.
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let watcher = stop_tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(nodewatt_common::shutdown_signal());
                    let _ = watcher.send(());
                }
            })
            .context("starting the signal thread")?;
        let stdout = std::io::stdout();
        let print = |s: &Sample| {
            let mut out = stdout.lock();
            writeln!(out, "{}", s.to_json()).and_then(|_| out.flush())
        };
        let mut failed = None;
        let stopped = sample_loop(&mut sampler, interval, count, Some(&stop_rx), |s, _| {
            failed = print(&s).err();
            failed.is_none()
        });
        // The last sample, as to a broker: billed up to the stop, every running job's total.
        if stopped && failed.is_none() {
            failed = print(&sampler.finish(nodewatt_common::now_ms())).err();
        }
        drop(stop_tx);
        save_state(&sampler, &cfg, boot_id);
        return match failed {
            // The reader left (`| head`, or a Ctrl-C that stopped it first): a stop.
            Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
            Some(e) => Err(e).context("writing to stdout"),
            None => Ok(ExitCode::SUCCESS),
        };
    };

    nodewatt_common::install_tls_provider();
    let settings = PublisherSettings {
        options: mqtt.options_as(&agent_client_id(&cfg, &node), &node)?,
        peer: nodewatt_common::connection::Peer::of(mqtt, Some(node.as_str())),
        cluster: cfg.agent.cluster.clone(),
        node,
        outbox_capacity: cfg.outbox.capacity,
        max_in_flight: cfg.outbox.max_in_flight,
        reconnect_initial: mqtt.reconnect_initial,
        reconnect_max: mqtt.reconnect_max,
        state_file: cfg.outbox.state_file.clone(),
        spool,
    };
    // Sampling runs on its own thread and never waits for the network; the
    // single-threaded runtime only moves samples to the broker. At a stop the sampler
    // takes one last sample (billing up to the stop, with every running job's total) and
    // saves its state; the publisher delivers what it can meanwhile.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    let sampling = {
        let cfg = cfg.clone();
        // With a spool, each sample travels with the state after it (see `Sampled`).
        let keep_state = cfg.agent.state_file.is_some() && cfg.outbox.spool_dir.is_some();
        let boot = boot_id.clone().unwrap_or_default();
        let sampled = move |sampler: &Sampler, sample: Sample| Sampled {
            sample,
            state: keep_state
                .then(|| serde_json::to_vec(&sampler.state(boot.clone())).unwrap_or_default()),
        };
        std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                let stopped =
                    sample_loop(&mut sampler, interval, count, Some(&stop_rx), |s, sp| {
                        tx.send(sampled(sp, s)).is_ok()
                    });
                if stopped {
                    let last = sampler.finish(nodewatt_common::now_ms());
                    let _ = tx.send(sampled(&sampler, last));
                }
                drop(tx);
                sampler
            })
            .context("starting the sampling thread")?
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let shutdown = async move {
        nodewatt_common::shutdown_signal().await;
        let _ = stop_tx.send(());
    };
    let stats = runtime.block_on(publish::run(settings, rx, shutdown));
    // The state is saved right after the last sample; wait for it, but not forever (a
    // hung driver call must not hold the stop).
    let saved_by = std::time::Instant::now() + Duration::from_secs(2);
    while !sampling.is_finished() && std::time::Instant::now() < saved_by {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Only a state whose samples all reached the publisher: a newer one would skip the
    // span of a sample that never went out.
    match (sampling.is_finished(), stats.drained) {
        (true, true) => match sampling.join() {
            Ok(sampler) => save_state(&sampler, &cfg, boot_id),
            Err(_) => tracing::error!("the sampling thread failed; state not saved"),
        },
        _ => tracing::warn!(
            "the last sample did not reach the publisher in time; state not saved (the spooled one, if any, is used)"
        ),
    }
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
        "config {}: cluster {}, node {}, interval {}, telemetry every {}, usage every {}",
        path.display(),
        cfg.agent.cluster,
        cfg.node_name()?,
        humantime::format_duration(cfg.agent.interval),
        humantime::format_duration(Duration::from_millis(cfg.cadence().telemetry_ms)),
        humantime::format_duration(Duration::from_millis(cfg.cadence().usage_ms)),
    );
    let mut out = nodewatt_common::preflight::Preflight::default();
    for (name, inv) in sampler.inventories() {
        match &inv.unavailable {
            Some(why) => out.line(name, "UNAVAILABLE", why),
            None => out.line(name, "ok", &inv.summary),
        }
        for p in &inv.problems {
            out.line("", "UNREADABLE", p);
        }
    }
    let mut line = |name: &str, problem: Option<String>, ok: String| match problem {
        Some(p) => out.line(name, "PROBLEM", &p),
        None => out.line(name, "ok", &ok),
    };
    if cfg.agent.cluster.as_str() == "mycluster" {
        line(
            "cluster",
            Some("cluster is the example's placeholder \"mycluster\": set [agent] cluster".into()),
            String::new(),
        );
    }
    if let Some(dir) = sampler.registry_dir() {
        use nodewatt_agent::accounting::prolog::{self, Hook};
        use nodewatt_agent::accounting::registry::{ReadError, Registry};
        // Whether Slurm's prolog and epilog write where the agent reads.
        let mut prolog_ok = false;
        let slurm_conf = std::env::var_os("SLURM_CONF").map(PathBuf::from);
        let slurmd = prolog::slurmd_confs(&cfg.agent.proc_root);
        match prolog::find_conf(slurm_conf.as_deref(), &slurmd) {
            Ok(conf) => {
                for hook in [Hook::Prolog, Hook::Epilog] {
                    let said = prolog::entries(&conf, hook)
                        .and_then(|e| prolog::verdict(hook, &conf, &e, dir));
                    if hook == Hook::Prolog {
                        prolog_ok = said.is_ok();
                    }
                    let name = hook.parameter().to_lowercase();
                    match said {
                        Ok(ok) => line(&name, None, ok),
                        Err(problem) => line(&name, Some(problem), String::new()),
                    }
                }
            }
            Err(e) => line(
                "prolog",
                Some(format!(
                    "{e}: cannot tell whether Slurm's prolog writes to {}; set SLURM_CONF to slurm.conf's path, or [jobs] enabled = false without Slurm",
                    dir.display()
                )),
                String::new(),
            ),
        }
        let mut registry = Registry::new(dir.to_owned(), cfg.jobs.owner_uid);
        match registry.read() {
            Ok(listing) => {
                let rejections = registry.rejections();
                let problem = (!rejections.is_empty()).then(|| {
                    rejections
                        .iter()
                        .map(|(p, why)| format!("{} ignored: {why}", p.display()))
                        .collect::<Vec<_>>()
                        .join("; ")
                });
                line(
                    "jobs",
                    problem,
                    format!("{} jobs in {}", listing.jobs.len(), dir.display()),
                );
            }
            // Created by the prolog at the first job (and again after a reboot: /run).
            Err(ReadError::Missing(_)) if prolog_ok => line(
                "jobs",
                None,
                format!("no jobs yet: the prolog creates {} at the first job", dir.display()),
            ),
            Err(e @ ReadError::Missing(_)) => line(
                "jobs",
                Some(format!("{e}: install the prolog and epilog (docs/slurm.md), or set [jobs] enabled = false")),
                String::new(),
            ),
            Err(e) => line("jobs", Some(e.to_string()), String::new()),
        }
    }
    for (option, file) in [
        ("agent.state_file", &cfg.agent.state_file),
        ("outbox.state_file", &cfg.outbox.state_file),
    ] {
        if let Some(file) = file {
            line(
                "state",
                writable_dir(file).err().map(|e| format!("{option}: {e}")),
                format!("{option} {} can be written", file.display()),
            );
        }
    }
    if let Some(dir) = &cfg.outbox.spool_dir {
        // The agent creates it; its parent must let it.
        let probe = if dir.is_dir() {
            dir.join("probe")
        } else {
            dir.clone()
        };
        line(
            "spool",
            writable_dir(&probe)
                .err()
                .map(|e| format!("outbox.spool_dir: {e}")),
            format!("outbox.spool_dir {} can be written", dir.display()),
        );
    }
    if let Some(mqtt) = &cfg.mqtt {
        nodewatt_common::install_tls_provider();
        let node = cfg.node_name()?;
        let peer = nodewatt_common::connection::Peer::of(mqtt, Some(node.as_str()));
        let user = match &peer.username {
            Some(u) => format!(" as user {u}"),
            None => " without a user name".into(),
        };
        // The broker may pin a node's login to the agent's client id (config/mosquitto.conf),
        // so the probe logs in as the agent. While the agent runs that would take over its
        // session (and fire its last will): then only the connection is tried.
        match running_agent(&cfg.agent.proc_root, &agent_client_id(&cfg, &node)) {
            Some(pid) => line(
                "broker",
                try_reach(mqtt, &node, &peer).err().map(|e| format!("{e:#}")),
                format!(
                    "{peer} accepts connections (login not tried: the agent runs, pid {pid}, and a second login as it would take over its session)"
                ),
            ),
            None => line(
                "broker",
                try_connect(mqtt, &agent_client_id(&cfg, &node), &node, &peer)
                    .err()
                    .map(|e| format!("{e:#}")),
                format!("{peer} accepted the login{user}"),
            ),
        }
    }
    Ok(out.exit_code(strict))
}

/// Whether a file can be written in `file`'s directory (created there and removed).
fn writable_dir(file: &Path) -> Result<(), String> {
    let dir = file.parent().unwrap_or(Path::new("."));
    let probe = dir.join(format!(".nodewatt-check-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write in {}: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A `nodewatt-agent run` on this host (under `proc_root`) with the same client id
/// (cluster and node), if any: its pid. One whose config cannot be read counts too.
fn running_agent(proc_root: &Path, client_id: &str) -> Option<u32> {
    let me = std::process::id();
    nodewatt_agent::procs::list(proc_root)
        .into_iter()
        .find_map(|p| {
            let args = &p.args;
            let is_agent =
                args.first()?.ends_with("nodewatt-agent") && args.iter().any(|a| a == "run");
            if !is_agent || p.pid == me {
                return None;
            }
            let config = args
                .iter()
                .position(|a| a == "--config" || a == "-c")
                .and_then(|i| args.get(i + 1))
                .map(|c| p.dir.join("cwd").join(c))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            let same = Config::load(&config)
                .ok()
                .and_then(|c| Some(agent_client_id(&c, &c.node_name().ok()?)))
                .is_none_or(|id| id == client_id);
            same.then_some(p.pid)
        })
}

/// Opens a TCP connection to the broker (the files TLS needs are read first).
fn try_reach(
    mqtt: &nodewatt_common::mqtt::MqttConfig,
    node: &nodewatt_wire::NodeName,
    peer: &nodewatt_common::connection::Peer,
) -> anyhow::Result<()> {
    use rumqttc::ConnectionError;
    use std::net::ToSocketAddrs;
    // The files a login would read, as the agent logs in (its node name by default).
    mqtt.options_as("probe", node)?;
    // Said as a failed connect is said, with what to check.
    let explain = |e: std::io::Error| anyhow::anyhow!(peer.explain(&ConnectionError::Io(e)));
    let addrs = (mqtt.host.as_str(), mqtt.port())
        .to_socket_addrs()
        .map_err(explain)?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(explain(last))
}

/// Logs in to the broker as the agent would (client id, TLS, credentials), with a clean
/// session and no last will, and disconnects.
fn try_connect(
    mqtt: &nodewatt_common::mqtt::MqttConfig,
    client_id: &str,
    node: &nodewatt_wire::NodeName,
    peer: &nodewatt_common::connection::Peer,
) -> anyhow::Result<()> {
    use nodewatt_common::connection::login;
    let mut options = mqtt.options_as(client_id, node)?;
    options.set_clean_session(true);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (client, mut eventloop) = login(options, peer, Duration::from_secs(10))
            .await
            .map_err(anyhow::Error::msg)?;
        eventloop.logout(&client, Duration::from_secs(2)).await;
        Ok(())
    })
}
