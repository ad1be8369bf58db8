//! Agent configuration: strict TOML (an unknown key is an error that names it).
//! Every option is documented in docs/configuration.md and in config/agent.toml.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodewatt_common::mqtt::MqttConfig;
use nodewatt_wire::NodeName;
use serde::Deserialize;

use crate::publish::outbox::MAX_CAPACITY;

pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);

pub use nodewatt_common::config::ConfigError;
use nodewatt_common::config::{count_in, duration_in, parse_toml, read_toml, resolve};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    #[serde(default)]
    pub nvml: NvmlConfig,
    #[serde(default)]
    pub cpu: CpuConfig,
    #[serde(default)]
    pub rapl: Toggle,
    #[serde(default)]
    pub hwmon: Toggle,
    #[serde(default)]
    pub thermal: Toggle,
    #[serde(default)]
    pub simulated: SimulatedConfig,
    /// Publish to this broker; without it `run` writes JSON lines to stdout.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub jobs: JobsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Attribute energy to jobs from the job registry.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The registry directory the scheduler's prolog writes (config/slurm/).
    #[serde(default = "default_jobs_dir")]
    pub dir: PathBuf,
    /// Only files (and a directory) owned by this uid, and writable by nobody else, are
    /// trusted. 0 (root) in production.
    #[serde(default)]
    pub owner_uid: u32,
    /// How often running jobs' totals are sent (they are also sent when a job ends).
    #[serde(with = "humantime_serde", default = "default_totals_interval")]
    pub totals_interval: Duration,
}

fn default_jobs_dir() -> PathBuf {
    PathBuf::from("/run/nodewatt/jobs")
}
fn default_totals_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            enabled: true,
            dir: default_jobs_dir(),
            owner_uid: 0,
            totals_interval: default_totals_interval(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Samples kept until acknowledged; when full, the oldest are merged (energy kept).
    #[serde(default = "default_outbox_capacity")]
    pub capacity: usize,
    /// Samples published and awaiting their PubAck at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Where unacknowledged samples are saved when the agent stops, to be sent after the
    /// next start (a restart during a broker outage then loses nothing). Not needed with
    /// `spool_dir`.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Every sample is written here before it is published and removed once the broker
    /// acknowledged it, so a killed agent loses nothing measured (a power loss at most
    /// what `fsync` had not forced to disk).
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// Disk the spool may use before it is compacted to the (merged) outbox.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: usize,
    /// When spooled samples are forced to disk: "always", "never" (the page cache, which
    /// survives a killed agent but not a power loss), or at most every given duration.
    #[serde(default)]
    pub fsync: FsyncPolicy,
}

/// Well below the unit's 64 MiB memory limit: the spool is read whole at start.
fn default_spool_max_bytes() -> usize {
    16 << 20
}

/// `[outbox] fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    Always,
    Never,
    Every(Duration),
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::Every(Duration::from_secs(1))
    }
}

impl<'de> Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => humantime::parse_duration(other)
                .map(FsyncPolicy::Every)
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "fsync {other:?} must be \"always\", \"never\" or a duration such as \"1s\""
                    ))
                }),
        }
    }
}

fn default_outbox_capacity() -> usize {
    1024
}
fn default_max_in_flight() -> usize {
    32
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            capacity: default_outbox_capacity(),
            max_in_flight: default_max_in_flight(),
            state_file: None,
            spool_dir: None,
            spool_max_bytes: default_spool_max_bytes(),
            fsync: FsyncPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Cluster name; part of every message and topic.
    pub cluster: NodeName,
    /// Node name; the host name when absent.
    #[serde(default)]
    pub node: Option<NodeName>,
    /// Sampling interval, e.g. "1s", "100ms", "1m".
    #[serde(with = "humantime_serde", default = "default_interval")]
    pub interval: Duration,
    /// How often device telemetry is published: a multiple of `interval`, every sample
    /// when absent. Samples in between are folded: energy and time summed, power and
    /// utilisation averaged over the span, maxima kept.
    #[serde(with = "humantime_serde", default)]
    pub telemetry_interval: Option<Duration>,
    /// How often usage per job, project and user is published, and at every job start
    /// and end: a multiple of `telemetry_interval` that divides an hour, with telemetry
    /// when absent.
    #[serde(with = "humantime_serde", default)]
    pub usage_interval: Option<Duration>,
    /// Root of the sysfs tree (tests point this at a fixture tree).
    #[serde(default = "default_sys_root")]
    pub sys_root: PathBuf,
    /// Root of the procfs tree.
    #[serde(default = "default_proc_root")]
    pub proc_root: PathBuf,
    /// Counters, jobs and job totals are saved here at stop and resumed at the next start
    /// on the same boot, so job totals continue and the restart's gap is measured.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_sys_root() -> PathBuf {
    PathBuf::from("/sys")
}
fn default_proc_root() -> PathBuf {
    PathBuf::from("/proc")
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toggle {
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for Toggle {
    fn default() -> Self {
        Toggle { enabled: true }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmlConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long one sample waits for the NVML thread before reporting it as stuck.
    /// Defaults to half the interval.
    #[serde(with = "humantime_serde", default)]
    pub timeout: Option<Duration>,
    /// Collect running compute process PIDs per GPU (used for job cross-checks).
    #[serde(default = "yes")]
    pub processes: bool,
    /// The NVML library to load; the dynamic loader's search for `libnvidia-ml.so.1`
    /// when unset.
    #[serde(default)]
    pub library: Option<std::path::PathBuf>,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        NvmlConfig {
            enabled: true,
            timeout: None,
            processes: true,
            library: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Cgroup filesystem root; `<sys_root>/fs/cgroup` when absent.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// Where job cgroups live, relative to the cgroup root; `*` matches within one path
    /// component and the last component must look like `job_<id>`.
    #[serde(default = "default_job_cgroups")]
    pub job_cgroups: Vec<String>,
}

pub fn default_job_cgroups() -> Vec<String> {
    vec![
        // Slurm with cgroup/v2
        "system.slice/slurmstepd.scope/job_*".into(),
        // Slurm with cgroup/v1 (cpuacct mounted alone or together with cpu)
        "cpuacct/slurm*/uid_*/job_*".into(),
        "cpu,cpuacct/slurm*/uid_*/job_*".into(),
    ]
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            enabled: true,
            cgroup_root: None,
            job_cgroups: default_job_cgroups(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedConfig {
    /// Must be set explicitly: simulated devices are never enabled by accident.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub gpu: Vec<SimGpuConfig>,
    #[serde(default)]
    pub rapl: Vec<SimRaplConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimGpuConfig {
    #[serde(default = "one")]
    pub count: u32,
    #[serde(default = "default_sim_model")]
    pub model: String,
    /// Constant power draw, watts. Either this or `profile`.
    #[serde(default)]
    pub power_w: Option<f64>,
    /// Power over time: steps that repeat every `period`.
    #[serde(default)]
    pub profile: Vec<ProfileStep>,
    #[serde(with = "humantime_serde", default)]
    pub period: Option<Duration>,
    /// Memory size reported, bytes.
    #[serde(default = "default_sim_mem")]
    pub mem_total_bytes: u64,
    /// Power at 100 % utilisation (utilisation is reported as power / tdp_w).
    #[serde(default = "default_tdp")]
    pub tdp_w: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileStep {
    /// Offset into the period at which this power starts.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    pub power_w: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimRaplConfig {
    /// Domain name, e.g. "package-0" or "dram".
    pub name: String,
    pub power_w: f64,
    /// Counter range; the simulated counter wraps here like the real one.
    #[serde(default = "default_rapl_range")]
    pub max_energy_range_uj: u64,
}

fn one() -> u32 {
    1
}
fn default_sim_model() -> String {
    "Simulated GPU".into()
}
fn default_sim_mem() -> u64 {
    80 * 1024 * 1024 * 1024
}
fn default_tdp() -> f64 {
    700.0
}
fn default_rapl_range() -> u64 {
    // The range most Intel packages report.
    262_143_328_850
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = read_toml(path)?;
        cfg.check(path)?;
        // Relative paths are relative to the config file, so a config and its fixture
        // tree can travel together.
        let base = path.parent().unwrap_or(Path::new("."));
        resolve(base, &mut cfg.agent.sys_root);
        resolve(base, &mut cfg.agent.proc_root);
        if let Some(p) = cfg.cpu.cgroup_root.as_mut() {
            resolve(base, p);
        }
        if let Some(m) = cfg.mqtt.as_mut() {
            m.resolve_paths(base);
        }
        resolve(base, &mut cfg.jobs.dir);
        if let Some(p) = cfg.agent.state_file.as_mut() {
            resolve(base, p);
        }
        if let Some(p) = cfg.outbox.state_file.as_mut() {
            resolve(base, p);
        }
        if let Some(p) = cfg.outbox.spool_dir.as_mut() {
            resolve(base, p);
        }
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let origin = Path::new("<inline>");
        let cfg: Config = parse_toml(text, origin)?;
        cfg.check(origin)?;
        Ok(cfg)
    }

    /// Checks ranges and combinations; errors name the file and the option.
    fn check(&self, origin: &Path) -> Result<(), ConfigError> {
        self.validate().map_err(|msg| ConfigError::Value {
            path: origin.to_owned(),
            msg,
        })
    }

    fn validate(&self) -> Result<(), String> {
        let bad = |m: String| Err(m);
        let whole_ms = |d: Duration| d.subsec_nanos() % 1_000_000 == 0;
        let i = self.agent.interval;
        duration_in("agent.interval", i, MIN_INTERVAL, MAX_INTERVAL)?;
        if !whole_ms(i) {
            return bad("agent.interval must be a whole number of milliseconds".into());
        }
        let c = self.cadence();
        let ms = |d: u64| humantime::format_duration(Duration::from_millis(d));
        if c.telemetry_ms % i.as_millis() as u64 != 0 || c.telemetry_ms > 3_600_000 {
            return bad(format!(
                "agent.telemetry_interval ({}) must be a multiple of agent.interval ({}), at most 1h",
                ms(c.telemetry_ms),
                ms(i.as_millis() as u64)
            ));
        }
        if c.usage_ms % c.telemetry_ms != 0 || 3_600_000 % c.usage_ms != 0 {
            return bad(format!(
                "agent.usage_interval ({}) must be a multiple of agent.telemetry_interval ({}) \
                 that divides 1h, so that hours and days start on a usage boundary",
                ms(c.usage_ms),
                ms(c.telemetry_ms)
            ));
        }
        if let Some(t) = self.nvml.timeout {
            duration_in("nvml.timeout", t, Duration::from_millis(1), MAX_INTERVAL)?;
        }
        if let Some(m) = &self.mqtt {
            m.validate_agent().map_err(|e| e.to_string())?;
        }
        let t = self.jobs.totals_interval;
        duration_in(
            "jobs.totals_interval",
            t,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )?;
        if !whole_ms(t) {
            return bad("jobs.totals_interval must be a whole number of milliseconds".into());
        }
        let o = &self.outbox;
        count_in("outbox.capacity", o.capacity, 16, MAX_CAPACITY)?;
        count_in("outbox.max_in_flight", o.max_in_flight, 1, o.capacity / 2)?;
        count_in(
            "outbox.spool_max_bytes",
            o.spool_max_bytes,
            1 << 20,
            1 << 40,
        )?;
        if let FsyncPolicy::Every(d) = o.fsync {
            duration_in(
                "outbox.fsync",
                d,
                Duration::from_millis(10),
                Duration::from_secs(3600),
            )?;
        }
        for pattern in &self.cpu.job_cgroups {
            let last = pattern.rsplit('/').next().unwrap_or_default();
            if !last.starts_with("job_") || pattern.starts_with('/') || pattern.contains("..") {
                return bad(format!(
                    "cpu.job_cgroups entry {pattern:?} must be a relative path ending in a job_* component"
                ));
            }
        }
        let sim = &self.simulated;
        if !sim.enabled && (!sim.gpu.is_empty() || !sim.rapl.is_empty()) {
            return bad(
                "[simulated] lists devices but enabled = false; set enabled = true to use them"
                    .into(),
            );
        }
        if sim.enabled {
            if sim.gpu.is_empty() && sim.rapl.is_empty() {
                return bad("[simulated] is enabled but lists no gpu or rapl devices".into());
            }
            if !sim.gpu.is_empty() && self.nvml.enabled {
                return bad("simulated GPUs need [nvml] enabled = false (their indices would collide with real GPUs)".into());
            }
            if !sim.rapl.is_empty() && self.rapl.enabled {
                return bad("simulated RAPL domains need [rapl] enabled = false (their names would collide with real domains)".into());
            }
            for (n, g) in sim.gpu.iter().enumerate() {
                let at = format!("simulated.gpu[{n}]");
                check_label(&format!("{at}.model"), &g.model)?;
                match (g.power_w, g.profile.is_empty()) {
                    (Some(_), false) | (None, true) => {
                        return bad(format!("{at}: give exactly one of power_w or profile"))
                    }
                    _ => {}
                }
                let powers = g
                    .power_w
                    .into_iter()
                    .chain(g.profile.iter().map(|s| s.power_w));
                for p in powers {
                    check_power(&at, p)?;
                }
                if !g.profile.is_empty() {
                    let Some(period) = g.period else {
                        return bad(format!("{at}: a profile needs a period"));
                    };
                    if g.profile[0].at != Duration::ZERO {
                        return bad(format!("{at}: the first profile step must be at \"0s\""));
                    }
                    let ordered = g.profile.windows(2).all(|w| w[0].at < w[1].at);
                    if !ordered || g.profile.last().is_some_and(|s| s.at >= period) {
                        return bad(format!(
                            "{at}: profile steps must be in increasing order and inside the period"
                        ));
                    }
                    if !whole_ms(period) || !g.profile.iter().all(|s| whole_ms(s.at)) {
                        return bad(format!("{at}: profile times must be whole milliseconds"));
                    }
                }
                if !(g.tdp_w.is_finite() && g.tdp_w > 0.0) {
                    return bad(format!("{at}: tdp_w must be a positive number"));
                }
            }
            for (n, r) in sim.rapl.iter().enumerate() {
                let at = format!("simulated.rapl[{n}]");
                check_label(&format!("{at}.name"), &r.name)?;
                check_power(&at, r.power_w)?;
                if r.max_energy_range_uj == 0 {
                    return bad(format!("{at}: max_energy_range_uj must be positive"));
                }
            }
        }
        Ok(())
    }

    /// The node name: configured, or this host's name.
    pub fn node_name(&self) -> Result<NodeName, ConfigError> {
        match &self.agent.node {
            Some(n) => Ok(n.clone()),
            None => {
                let raw = std::fs::read_to_string(self.agent.proc_root.join("sys/kernel/hostname"))
                    .map_err(|e| {
                        ConfigError::Invalid(format!(
                            "agent.node is not set and the host name cannot be read: {e}"
                        ))
                    })?;
                NodeName::new(raw.trim()).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "{e}: set agent.node (the host name does not fit)"
                    ))
                })
            }
        }
    }

    pub fn cgroup_root(&self) -> PathBuf {
        self.cpu
            .cgroup_root
            .clone()
            .unwrap_or_else(|| self.agent.sys_root.join("fs/cgroup"))
    }

    /// When telemetry and usage are published (`agent.telemetry_interval`,
    /// `agent.usage_interval`).
    pub fn cadence(&self) -> crate::cadence::Cadence {
        let ms = |d: Duration| d.as_millis() as u64;
        let telemetry_ms = ms(self.agent.telemetry_interval.unwrap_or(self.agent.interval));
        crate::cadence::Cadence {
            telemetry_ms,
            usage_ms: self.agent.usage_interval.map_or(telemetry_ms, ms),
        }
    }

    pub fn nvml_timeout(&self) -> Duration {
        self.nvml.timeout.unwrap_or(self.agent.interval / 2)
    }
}

/// Free text that becomes a tag downstream: the wire's label rule, so the collector
/// accepts what the config allows.
fn check_label(what: &str, v: &str) -> Result<(), String> {
    nodewatt_wire::name::check_label("label", v).map_err(|e| format!("{what}: {e}"))
}

fn check_power(at: &str, p: f64) -> Result<(), String> {
    if p.is_finite() && (0.0..=100_000.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{at}: power {p} W must be between 0 and 100000"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[agent]\ncluster = \"c1\"\nnode = \"n1\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.agent.interval, Duration::from_secs(1));
        assert_eq!(c.agent.sys_root, PathBuf::from("/sys"));
        assert!(c.nvml.enabled && c.cpu.enabled && c.rapl.enabled);
        assert!(!c.simulated.enabled);
        assert_eq!(c.cgroup_root(), PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(c.nvml_timeout(), Duration::from_millis(500));
        assert_eq!(c.cadence(), crate::cadence::Cadence::every_sample(1_000));
        let c = Config::parse(&format!(
            "{MIN}telemetry_interval = \"10s\"\nusage_interval = \"1m\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.cadence(),
            crate::cadence::Cadence {
                telemetry_ms: 10_000,
                usage_ms: 60_000
            }
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = Config::parse(&format!("{MIN}intervall = \"1s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("intervall"), "{err}");
        let err = Config::parse(&format!("{MIN}[rapl]\nenable = true\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("enable"), "{err}");
    }

    #[test]
    fn durations_and_sizes_name_the_option_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        for (extra, option) in [
            ("interval = \"0s\"\n", "agent.interval"),
            (
                "telemetry_interval = \"1500ms\"\n",
                "agent.telemetry_interval",
            ),
            (
                "telemetry_interval = \"10s\"\nusage_interval = \"25s\"\n",
                "agent.usage_interval",
            ),
            ("usage_interval = \"7m\"\n", "divides 1h"),
            ("[nvml]\ntimeout = \"0s\"\n", "nvml.timeout"),
            (
                "[jobs]\ntotals_interval = \"400d\"\n",
                "jobs.totals_interval",
            ),
            ("[outbox]\ncapacity = 100000\n", "outbox.capacity"),
            ("[outbox]\nmax_in_flight = 0\n", "outbox.max_in_flight"),
            (
                "[outbox]\nspool_max_bytes = 1000\n",
                "outbox.spool_max_bytes",
            ),
            ("[outbox]\nfsync = \"1ms\"\n", "outbox.fsync"),
            ("[outbox]\nfsync = \"sometimes\"\n", "fsync \"sometimes\""),
            (
                "[mqtt]\nhost = \"h\"\nkeep_alive = \"100000s\"\n",
                "mqtt.keep_alive",
            ),
            (
                "[mqtt]\nhost = \"h\"\nreconnect_initial = \"0s\"\n",
                "mqtt.reconnect_initial",
            ),
            (
                "[mqtt]\nhost = \"h\"\nreconnect_initial = \"2s\"\nreconnect_max = \"1s\"\n",
                "mqtt.reconnect_max",
            ),
        ] {
            std::fs::write(&path, format!("{MIN}{extra}")).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(
                err.contains(option) && err.contains("agent.toml"),
                "{extra}: {err}"
            );
        }
    }

    #[test]
    fn interval_bounds() {
        let with =
            |i: &str| Config::parse(&MIN.replace("n1\"\n", &format!("n1\"\ninterval = \"{i}\"\n")));
        assert!(with("10ms").is_ok());
        assert!(with("5m").is_ok());
        assert!(with("9ms").unwrap_err().to_string().contains("outside"));
        assert!(with("2h").is_err());
        assert!(with("10500us")
            .unwrap_err()
            .to_string()
            .contains("milliseconds"));
        assert!(with("fast").is_err());
    }

    #[test]
    fn names_must_be_topic_and_tag_safe() {
        for bad in ["a b", "a/b", "", "a+b", "x\\"] {
            let text = MIN.replace("\"n1\"", &format!("{bad:?}"));
            assert!(Config::parse(&text).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn simulated_needs_explicit_enable_and_no_collision() {
        let gpu = "[[simulated.gpu]]\npower_w = 300.0\n";
        let err = Config::parse(&format!("{MIN}{gpu}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("enabled = false"), "{err}");
        let err = Config::parse(&format!("{MIN}[simulated]\nenabled = true\n{gpu}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[nvml] enabled = false"), "{err}");
        let ok = format!("{MIN}[nvml]\nenabled = false\n[simulated]\nenabled = true\n{gpu}");
        assert!(Config::parse(&ok).is_ok());
    }

    #[test]
    fn simulated_profile_is_checked() {
        let base = format!(
            "{MIN}[nvml]\nenabled = false\n[simulated]\nenabled = true\n[[simulated.gpu]]\n"
        );
        let good = "period = \"60s\"\nprofile = [{ at = \"0s\", power_w = 100.0 }, { at = \"30s\", power_w = 600.0 }]\n";
        assert!(Config::parse(&format!("{base}{good}")).is_ok());
        for bad in [
            "profile = [{ at = \"0s\", power_w = 100.0 }]\n",
            "period = \"60s\"\nprofile = [{ at = \"5s\", power_w = 100.0 }]\n",
            "period = \"60s\"\nprofile = [{ at = \"0s\", power_w = 1.0 }, { at = \"60s\", power_w = 2.0 }]\n",
            "period = \"60s\"\nprofile = [{ at = \"0s\", power_w = -1.0 }]\n",
            "power_w = 1.0\nperiod = \"60s\"\nprofile = [{ at = \"0s\", power_w = 1.0 }]\n",
            "model = \"x\"\n",
            "power_w = 1.0\nmodel = \"a\\\\b\"\n",
            "power_w = 1.0\nmodel = \"\"\n",
        ] {
            assert!(Config::parse(&format!("{base}{bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn mqtt_and_outbox_sections() {
        let c = Config::parse(MIN).unwrap();
        assert!(c.mqtt.is_none());
        assert_eq!((c.outbox.capacity, c.outbox.max_in_flight), (1024, 32));
        let c = Config::parse(&format!("{MIN}[mqtt]\nhost = \"broker\"\n")).unwrap();
        assert_eq!(c.mqtt.unwrap().port(), 1883);
        for bad in [
            "[mqtt]\nprot = 1\n",
            "[outbox]\ncapacity = 8\n",
            "[outbox]\ncapacity = 64\nmax_in_flight = 40\n",
        ] {
            assert!(Config::parse(&format!("{MIN}{bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_cgroup_patterns_are_checked() {
        let err = Config::parse(&format!("{MIN}[cpu]\njob_cgroups = [\"/abs/job_*\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("job_cgroups"), "{err}");
        assert!(Config::parse(&format!("{MIN}[cpu]\njob_cgroups = [\"slurm/uid_*\"]\n")).is_err());
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("agent") && name.ends_with(".toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2, "expected agent.toml and agent-simulated.toml");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden.toml");
        let c = Config::load(&fixture).unwrap();
        assert!(
            c.agent.sys_root.is_absolute(),
            "relative roots resolved against the file"
        );
    }
}
