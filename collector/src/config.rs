//! Collector configuration: strict TOML; see docs/configuration.md and config/collector.toml.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodewatt_common::mqtt::MqttConfig;
use nodewatt_wire::{MaxPower, NodeName};
use serde::Deserialize;

pub use nodewatt_common::config::ConfigError;
use nodewatt_common::config::{count_in, duration_in, parse_toml, read_toml, resolve};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Needed by `serve` only, so a billing or validation config can do without it.
    #[serde(default)]
    pub collector: Option<CollectorConfig>,
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    #[serde(default)]
    pub influxdb: InfluxConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub validation: ValidationConfig,
    #[serde(default)]
    pub billing: BillingConfig,
}

/// Defaults for `usage` and `report`; command-line options override them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// Price per facility kWh (IT energy × PUE).
    #[serde(default)]
    pub price_per_kwh: Option<f64>,
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Power usage effectiveness of the facility: facility energy = IT energy × PUE.
    #[serde(default = "default_pue")]
    pub pue: f64,
    /// Grid carbon intensity, grams CO2e per kWh.
    #[serde(default)]
    pub co2_g_per_kwh: Option<f64>,
    /// The longest a job runs: `usage --by job` reads `job_total` points (dated at a
    /// job's start) from this long before the period on, not all history.
    #[serde(with = "humantime_serde", default = "default_max_job_length")]
    pub max_job_length: Duration,
    /// How long `usage` and `report` wait for one InfluxDB answer (the write timeout,
    /// `influxdb.timeout`, is far shorter than a month's bill takes).
    #[serde(with = "humantime_serde", default = "default_query_timeout")]
    pub query_timeout: Duration,
    /// Requests a bill's six sums are split into, sent at once (1 to 6).
    #[serde(default = "default_query_parallelism")]
    pub query_parallelism: usize,
    /// `serve` keeps hourly rollups of `usage` and bills read whole hours from them
    /// (docs/billing.md); off: neither.
    #[serde(default = "yes")]
    pub rollups: bool,
    /// How long writes into an hour must have been quiet before its rollup counts: at
    /// least three times `influxdb.timeout` plus a minute, on every collector of the
    /// database.
    /// Default: 10 minutes, or that minimum if larger.
    #[serde(with = "humantime_serde", default)]
    pub rollup_settle: Option<Duration>,
}

fn default_currency() -> String {
    "EUR".into()
}
fn default_pue() -> f64 {
    1.0
}
fn default_max_job_length() -> Duration {
    Duration::from_millis(crate::billing::Plan::default().max_job_ms)
}
fn default_query_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_query_parallelism() -> usize {
    crate::billing::Plan::default().parallel
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            price_per_kwh: None,
            currency: default_currency(),
            pue: default_pue(),
            co2_g_per_kwh: None,
            max_job_length: default_max_job_length(),
            query_timeout: default_query_timeout(),
            query_parallelism: default_query_parallelism(),
            rollups: true,
            rollup_settle: None,
        }
    }
}

impl Config {
    /// How `usage`, `report` and `serve`'s rollups query InfluxDB.
    pub fn plan(&self) -> crate::billing::Plan {
        let b = &self.billing;
        crate::billing::Plan {
            max_job_ms: b.max_job_length.as_millis() as u64,
            parallel: b.query_parallelism,
            rollups: b.rollups,
            settle_ms: self.rollup_settle().as_millis() as u64,
        }
    }

    /// `billing.rollup_settle`, or its default for this `influxdb.timeout`.
    pub fn rollup_settle(&self) -> Duration {
        let least = self.influxdb.timeout * 3 + Duration::from_secs(60);
        self.billing
            .rollup_settle
            .unwrap_or(least.max(Duration::from_millis(
                crate::billing::Plan::default().settle_ms,
            )))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// This collector's name: its MQTT client id suffix and the tag of its health points.
    /// Keep it stable: the broker keeps the session (and queued messages) under it.
    pub id: NodeName,
    /// Shared subscription group: collectors with the same group split the messages.
    #[serde(default)]
    pub share_group: Option<NodeName>,
    /// How often the collector writes and logs its own health.
    #[serde(with = "humantime_serde", default = "default_health_interval")]
    pub health_interval: Duration,
}

fn default_health_interval() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// InfluxDB 1.x `/write` and `/query`.
    V1,
    /// InfluxDB 2.x/3.x `/api/v2/write` (also VictoriaMetrics).
    V2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxConfig {
    #[serde(default = "default_influx_url")]
    pub url: String,
    #[serde(default = "default_api")]
    pub api: Api,
    /// v1: database and optional retention policy.
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default)]
    pub retention_policy: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// v1: create the database at start when it is missing.
    #[serde(default = "yes")]
    pub create_database: bool,
    /// v2: organisation, bucket and a file holding the API token.
    #[serde(default)]
    pub org: Option<String>,
    #[serde(default)]
    pub bucket: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM CA file for an https URL signed by a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "yes")]
    pub gzip: bool,
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
}

impl Default for InfluxConfig {
    fn default() -> Self {
        // The serde defaults, from an empty section.
        toml::from_str("").expect("every influxdb option has a default")
    }
}

fn default_influx_url() -> String {
    "http://127.0.0.1:8086".into()
}
fn default_api() -> Api {
    Api::V1
}
fn default_database() -> String {
    "nodewatt".into()
}
fn yes() -> bool {
    true
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is written when it holds this many points...
    #[serde(default = "default_max_points")]
    pub max_points: usize,
    /// ...or this many bytes of line protocol...
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// ...or when its first message is this old.
    #[serde(with = "humantime_serde", default = "default_flush")]
    pub flush_interval: Duration,
    /// Messages held unacknowledged at most; beyond it the collector stops reading from
    /// the broker (which keeps them) until InfluxDB accepts writes again.
    #[serde(default = "default_max_pending")]
    pub max_pending_messages: usize,
    #[serde(with = "humantime_serde", default = "default_retry_initial")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde", default = "default_retry_max")]
    pub retry_max: Duration,
}

fn default_max_points() -> usize {
    5_000
}
fn default_max_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_flush() -> Duration {
    Duration::from_millis(500)
}
fn default_max_pending() -> usize {
    20_000
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(10)
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_points: default_max_points(),
            max_bytes: default_max_bytes(),
            flush_interval: default_flush(),
            max_pending_messages: default_max_pending(),
            retry_initial: default_retry_initial(),
            retry_max: default_retry_max(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// How far in the future a sample may be (clock skew between node and collector).
    #[serde(with = "humantime_serde", default = "default_max_future")]
    pub max_future: Duration,
    /// How old a sample may be (agents hold samples through outages).
    #[serde(with = "humantime_serde", default = "default_max_age")]
    pub max_age: Duration,
    /// Maximum power per device class: an energy delta above it over its span is rejected.
    #[serde(default)]
    pub max_power: MaxPower,
    /// Usage entries and job totals per message.
    #[serde(default = "default_max_jobs")]
    pub max_jobs_per_message: usize,
    /// New series (measurement and tag set) one node may create per `series_window`.
    #[serde(default = "default_max_new_series")]
    pub max_new_series_per_node: usize,
    #[serde(with = "humantime_serde", default = "default_series_window")]
    pub series_window: Duration,
}

fn default_max_jobs() -> usize {
    4_096
}
fn default_max_new_series() -> usize {
    5_000
}
fn default_series_window() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_message() -> usize {
    256 * 1024
}
fn default_max_future() -> Duration {
    Duration::from_secs(300)
}
fn default_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

impl ValidationConfig {
    /// What `serve` and `validate` check messages against.
    pub fn limits(&self) -> crate::validate::Limits {
        crate::validate::Limits {
            max_bytes: self.max_message_bytes,
            wire: nodewatt_wire::Limits {
                max_future_ms: self.max_future.as_millis() as u64,
                max_age_ms: self.max_age.as_millis() as u64,
                max_power: self.max_power,
                max_jobs: self.max_jobs_per_message,
            },
        }
    }
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            max_message_bytes: default_max_message(),
            max_future: default_max_future(),
            max_age: default_max_age(),
            max_power: MaxPower::default(),
            max_jobs_per_message: default_max_jobs(),
            max_new_series_per_node: default_max_new_series(),
            series_window: default_series_window(),
        }
    }
}

impl Config {
    /// Parses and checks a config that is not in a file (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = parse_toml(text, origin)?;
        cfg.validate().map_err(|msg| ConfigError::Value {
            path: origin.to_owned(),
            msg,
        })?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(m) = cfg.mqtt.as_mut() {
            m.resolve_paths(base);
        }
        let i = &mut cfg.influxdb;
        for p in [&mut i.password_file, &mut i.token_file, &mut i.ca_file]
            .into_iter()
            .flatten()
        {
            resolve(base, p);
        }
        cfg.validate().map_err(|msg| ConfigError::Value {
            path: path.to_owned(),
            msg,
        })?;
        Ok(cfg)
    }

    /// Ranges of every duration and size; the message names the option.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(m) = &self.mqtt {
            m.validate().map_err(|e| e.to_string())?;
        }
        let i = &self.influxdb;
        if !(i.url.starts_with("http://") || i.url.starts_with("https://")) {
            return Err(format!(
                "influxdb.url {:?} must start with http:// or https://",
                i.url
            ));
        }
        match i.api {
            Api::V1 if i.database.is_empty() => return Err("influxdb.database is empty".into()),
            Api::V2 if i.org.is_none() || i.bucket.is_none() => {
                return Err("influxdb api = \"v2\" needs org and bucket".into())
            }
            _ => {}
        }
        if i.password_file.is_some() && i.username.is_none() {
            return Err("influxdb.password_file needs a username".into());
        }
        let (b, v) = (&self.batch, &self.validation);
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        if let Some(c) = &self.collector {
            duration_in(
                "collector.health_interval",
                c.health_interval,
                ms(10),
                s(3600),
            )?;
        }
        for (name, d, lo, hi) in [
            ("influxdb.timeout", i.timeout, ms(100), s(600)),
            ("batch.flush_interval", b.flush_interval, ms(1), s(60)),
            ("batch.retry_initial", b.retry_initial, ms(1), s(60)),
            ("batch.retry_max", b.retry_max, b.retry_initial, s(3600)),
            ("validation.max_future", v.max_future, s(0), s(86_400)),
            ("validation.max_age", v.max_age, s(60), s(366 * 86_400)),
            (
                "validation.series_window",
                v.series_window,
                s(1),
                s(7 * 86_400),
            ),
            (
                "billing.max_job_length",
                self.billing.max_job_length,
                s(60),
                s(3660 * 86_400),
            ),
            (
                "billing.query_timeout",
                self.billing.query_timeout,
                s(1),
                s(86_400),
            ),
            // A marker and its batch each end within the timeout, and a marker can be
            // overwritten by another collector's older one by one request more; a
            // minute for clocks and InfluxDB's own write timeout (docs/billing.md).
            (
                "billing.rollup_settle",
                self.rollup_settle(),
                i.timeout * 3 + s(60),
                s(7 * 86_400),
            ),
        ] {
            duration_in(name, d, lo, hi)?;
        }
        let p = &v.max_power;
        for (name, n, lo, hi) in [
            ("batch.max_points", b.max_points, 1, 1_000_000),
            ("batch.max_bytes", b.max_bytes, 1024, 256 << 20),
            (
                "batch.max_pending_messages",
                b.max_pending_messages,
                1,
                10_000_000,
            ),
            (
                "validation.max_message_bytes",
                v.max_message_bytes,
                1024,
                256 << 20,
            ),
            (
                "validation.max_jobs_per_message",
                v.max_jobs_per_message,
                1,
                1_000_000,
            ),
            (
                "validation.max_new_series_per_node",
                v.max_new_series_per_node,
                1,
                10_000_000,
            ),
            (
                "billing.query_parallelism",
                self.billing.query_parallelism,
                1,
                6,
            ),
            ("validation.max_power.gpu_w", p.gpu_w as usize, 1, 1_000_000),
            ("validation.max_power.cpu_w", p.cpu_w as usize, 1, 1_000_000),
            (
                "validation.max_power.dram_w",
                p.dram_w as usize,
                1,
                1_000_000,
            ),
            (
                "validation.max_power.other_w",
                p.other_w as usize,
                1,
                10_000_000,
            ),
            (
                "validation.max_power.node_w",
                p.node_w as usize,
                1,
                100_000_000,
            ),
        ] {
            count_in(name, n, lo, hi)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(&p)
    }

    const MIN: &str = "[collector]\nid = \"c1\"\n[influxdb]\n";

    #[test]
    fn minimal_and_defaults() {
        let c = load(MIN).unwrap();
        assert_eq!(c.influxdb.url, "http://127.0.0.1:8086");
        assert_eq!(c.influxdb.api, Api::V1);
        assert_eq!(c.influxdb.database, "nodewatt");
        assert!(c.mqtt.is_none());
        assert_eq!(c.batch.max_points, 5_000);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let err = load(&format!("{MIN}databse = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("databse"), "{err}");
        assert!(load(&format!("{MIN}api = \"v2\"\n")).is_err());
        assert!(load(&format!("{MIN}api = \"v3\"\n")).is_err());
        assert!(load(&format!("{MIN}url = \"localhost:8086\"\n")).is_err());
        assert!(load("[collector]\nid = \"a b\"\n[influxdb]\n").is_err());
    }

    #[test]
    fn durations_and_sizes_name_the_option_and_the_file() {
        for (text, option) in [
            (
                "[collector]\nid = \"c1\"\nhealth_interval = \"0s\"\n[influxdb]\n",
                "collector.health_interval",
            ),
            (
                &format!("{MIN}timeout = \"0s\"\n") as &str,
                "influxdb.timeout",
            ),
            (
                &format!("{MIN}[batch]\nmax_points = 0\n"),
                "batch.max_points",
            ),
            (
                &format!("{MIN}[batch]\nretry_initial = \"2s\"\nretry_max = \"1s\"\n"),
                "batch.retry_max",
            ),
            (
                &format!("{MIN}[validation]\nmax_age = \"1s\"\n"),
                "validation.max_age",
            ),
            (
                &format!("{MIN}[validation.max_power]\ngpu_w = 0\n"),
                "validation.max_power.gpu_w",
            ),
            (
                &format!("{MIN}[mqtt]\nhost = \"h\"\nkeep_alive = \"1d\"\n"),
                "mqtt.keep_alive",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(
                err.contains(option) && err.contains("c.toml"),
                "{text}: {err}"
            );
        }
        for (text, option) in [
            (
                format!("{MIN}[billing]\nmax_job_length = \"1s\"\n"),
                "billing.max_job_length",
            ),
            (
                format!("{MIN}[billing]\nquery_parallelism = 7\n"),
                "billing.query_parallelism",
            ),
            (
                format!("{MIN}[billing]\nquery_timeout = \"0s\"\n"),
                "billing.query_timeout",
            ),
            (
                format!("{MIN}[billing]\nrollup_settle = \"60s\"\n"),
                "billing.rollup_settle",
            ),
        ] {
            let err = load(&text).unwrap_err().to_string();
            assert!(err.contains(option), "{text}: {err}");
        }
        let b = load(&format!("{MIN}[billing]\nmax_job_length = \"7days\"\n"))
            .unwrap()
            .billing;
        assert_eq!(b.max_job_length.as_secs(), 7 * 86_400);
        assert_eq!(load(MIN).unwrap().plan(), crate::billing::Plan::default());
        // A long write timeout lengthens the default settle instead of failing.
        let slow = load(&format!("{MIN}timeout = \"600s\"\n")).unwrap();
        assert_eq!(slow.rollup_settle(), Duration::from_secs(1860));
        let c = load(&format!("{MIN}[validation.max_power]\ngpu_w = 1500\n")).unwrap();
        assert_eq!(c.validation.limits().wire.max_power.gpu_w, 1500);
        assert_eq!(
            c.validation.limits().wire.max_power.cpu_w,
            1000,
            "other classes keep defaults"
        );
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("collector") && name.ends_with(".toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                seen += 1;
            }
        }
        assert!(seen >= 1);
    }
}
