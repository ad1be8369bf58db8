//! Test harness: private instances of the real servers (Debian's `mosquitto`, `influxd`
//! and `victoria-metrics`) on free loopback ports with their state in temp dirs, the
//! nodewatt binaries as child processes, and small query helpers. Everything started here
//! is killed when its handle is dropped, so a failing test leaves nothing running.
//!
//! The binaries are the workspace's own: run these tests with `cargo test --workspace`
//! (as README says), which builds them first.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// GET `url` with a shared client. The workspace builds reqwest with rustls but no crypto
/// provider of its own (like the binaries), so one is installed first.
pub fn http_get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::blocking::Response> {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| http_client(Duration::from_secs(10)))
        .get(url)
        .send()
}

/// A blocking client with this timeout, after installing the TLS crypto provider.
fn http_client(timeout: Duration) -> reqwest::blocking::Client {
    nodewatt_common::install_tls_provider();
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .build()
        .expect("HTTP client")
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn require(program: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{program} is not installed (.ci/run installs mosquitto, influxdb and victoria-metrics)"
    );
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn signal(&self, sig: i32) {
        if self.child.is_some() {
            // SAFETY: sending a signal to our own child.
            unsafe {
                libc::kill(self.pid(), sig);
            }
        }
    }

    /// SIGKILL: no chance to clean up, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(20))
    }

    /// SIGTERM, and asserts the process exits with success (its log otherwise).
    pub fn stop_cleanly(&mut self) {
        let status = self.stop();
        assert!(
            status.is_some_and(|s| s.success()),
            "{} did not stop cleanly ({status:?}):\n{}",
            self.name,
            self.log()
        );
    }

    /// Waits for the process to exit by itself and asserts it succeeded (its log otherwise).
    pub fn wait_success(&mut self, timeout: Duration) {
        let status = self.wait(timeout);
        assert!(
            status.is_some_and(|s| s.success()),
            "{} failed or did not finish ({status:?}):\n{}",
            self.name,
            self.log()
        );
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            match self.child.as_mut()?.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        None
    }

    /// (CPU seconds, peak RSS in kB) of the running process, from /proc.
    pub fn cpu_and_peak_rss(&self) -> (f64, u64) {
        let pid = self.pid();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let cpu = (ticks(11) + ticks(12)) / hz; // utime, stime
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        (cpu, hwm)
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private mosquitto: its own config, persistence directory and port. `restart` keeps
/// the port and the persisted sessions, like a broker restart in production.
pub struct Mosquitto {
    pub dir: TempDir,
    pub port: u16,
    proc: Option<Proc>,
    extra: String,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// `extra` is appended to the config (more listeners, TLS, passwords, ACLs).
    pub fn start_with(extra: &str) -> Mosquitto {
        let mut m = Mosquitto {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            proc: None,
            extra: extra.to_string(),
        };
        m.launch();
        m
    }

    fn launch(&mut self) {
        let d = self.dir.path();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let conf = format!(
            "per_listener_settings false\n\
             listener {port} 127.0.0.1\n\
             {anonymous}\
             persistence true\n\
             persistence_location {dir}/\n\
             autosave_interval 1\n\
             max_queued_messages 1000000\n\
             max_inflight_messages 1000\n\
             log_dest file {dir}/mosquitto.log\n\
             {user}{extra}\n",
            port = self.port,
            dir = d.display(),
            user = if root { "user root\n" } else { "" },
            anonymous = if self.extra.contains("allow_anonymous") {
                ""
            } else {
                "allow_anonymous true\n"
            },
            extra = self.extra,
        );
        std::fs::write(d.join("mosquitto.conf"), conf).unwrap();
        let proc = Proc::spawn(
            "mosquitto",
            Command::new(require("mosquitto"))
                .arg("-c")
                .arg(d.join("mosquitto.conf")),
            d.join("stdout.log"),
        );
        assert!(
            wait_until(Duration::from_secs(10), || port_open(self.port)),
            "mosquitto did not open port {}: {}",
            self.port,
            std::fs::read_to_string(d.join("mosquitto.log")).unwrap_or_default()
        );
        self.proc = Some(proc);
    }

    /// SIGTERM (mosquitto saves its sessions), then wait for the port to close.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

/// A private InfluxDB 1.x (`influxd`) with its own directories and both of its ports.
pub struct Influxd {
    pub dir: TempDir,
    pub port: u16,
    rpc_port: u16,
    proc: Option<Proc>,
    /// Lines appended to the `[data]` and `[http]` sections of the configuration.
    extra: (String, String),
}

impl Influxd {
    pub fn start() -> Influxd {
        Influxd::start_with("", "")
    }

    /// Like [`Influxd::start`], with `data` appended to the `[data]` section and `http` to
    /// `[http]` of the generated configuration (e.g. `index-version = "tsi1"`,
    /// `max-row-limit = 0`), also when started again.
    pub fn start_with(data: &str, http: &str) -> Influxd {
        let mut i = Influxd {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            rpc_port: free_port(),
            proc: None,
            extra: (data.to_string(), http.to_string()),
        };
        i.launch();
        i
    }

    fn launch(&mut self) {
        let d = self.dir.path();
        let conf = format!(
            "reporting-disabled = true\n\
             bind-address = \"127.0.0.1:{rpc}\"\n\
             [meta]\n  dir = \"{d}/meta\"\n\
             [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n{data}\n\
             [http]\n  enabled = true\n  bind-address = \"127.0.0.1:{port}\"\n  log-enabled = false\n{http}\n\
             [monitor]\n  store-enabled = false\n\
             [subscriber]\n  enabled = false\n\
             [continuous_queries]\n  enabled = false\n",
            rpc = self.rpc_port,
            port = self.port,
            d = d.display(),
            data = self.extra.0,
            http = self.extra.1,
        );
        std::fs::write(d.join("influxdb.conf"), conf).unwrap();
        let proc = Proc::spawn(
            "influxd",
            Command::new(require("influxd"))
                .arg("-config")
                .arg(d.join("influxdb.conf")),
            d.join("influxd.log"),
        );
        let ping = format!("{}/ping", self.url());
        let ok = wait_until(Duration::from_secs(20), || {
            http_get(&ping).is_ok_and(|r| r.status().as_u16() == 204)
        });
        assert!(ok, "influxd did not answer /ping: {}", proc.log());
        self.proc = Some(proc);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn start_again(&mut self) {
        self.launch();
    }

    /// Runs an InfluxQL query; returns the JSON answer (timestamps in ms).
    pub fn query(&self, db: &str, q: &str) -> serde_json::Value {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/query", self.url()),
            &[("db", db), ("q", q), ("epoch", "ms")],
        )
        .unwrap();
        http_get(url)
            .and_then(|r| r.text())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// All rows of the first statement, each as (tags, values) with column names applied.
    pub fn rows(
        &self,
        db: &str,
        q: &str,
    ) -> Vec<(
        serde_json::Value,
        serde_json::Map<String, serde_json::Value>,
    )> {
        let v = self.query(db, q);
        let mut out = Vec::new();
        for series in v["results"][0]["series"].as_array().into_iter().flatten() {
            let cols: Vec<&str> = series["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            for row in series["values"].as_array().into_iter().flatten() {
                let map = cols
                    .iter()
                    .zip(row.as_array().unwrap())
                    .map(|(c, v)| (c.to_string(), v.clone()))
                    .collect();
                out.push((series["tags"].clone(), map));
            }
        }
        out
    }

    /// A single number from a query like `SELECT COUNT(x) FROM m WHERE ...` (0 when empty).
    pub fn scalar(&self, db: &str, q: &str) -> f64 {
        self.rows(db, q)
            .first()
            .and_then(|(_, m)| {
                m.iter()
                    .find(|(k, _)| *k != "time")
                    .and_then(|(_, v)| v.as_f64())
            })
            .unwrap_or(0.0)
    }
}

/// A private VictoriaMetrics, which accepts InfluxDB line protocol on `/api/v2/write`.
pub struct VictoriaMetrics {
    pub dir: TempDir,
    pub port: u16,
    _proc: Proc,
}

impl VictoriaMetrics {
    pub fn start() -> VictoriaMetrics {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let proc = Proc::spawn(
            "victoria-metrics",
            Command::new(require("victoria-metrics"))
                .arg(format!(
                    "-storageDataPath={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
                .arg("-search.latencyOffset=0s"),
            dir.path().join("vm.log"),
        );
        let health = format!("http://127.0.0.1:{port}/health");
        let ok = wait_until(Duration::from_secs(20), || {
            http_get(&health).is_ok_and(|r| r.status().is_success())
        });
        assert!(ok, "victoria-metrics did not start: {}", proc.log());
        VictoriaMetrics {
            dir,
            port,
            _proc: proc,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Number of stored samples of series matching a selector (after a forced flush).
    pub fn count_samples(&self, selector: &str) -> usize {
        let _ = http_get(format!("{}/internal/force_flush", self.url()));
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/export", self.url()),
            &[("match[]", selector)],
        )
        .unwrap();
        let body = http_get(url).and_then(|r| r.text()).unwrap_or_default();
        body.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["values"].as_array().map_or(0, |a| a.len()))
            .sum()
    }
}

fn newest_mtime(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let t = if entry.path().is_dir() {
            newest_mtime(&entry.path())
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(newest)
        };
        newest = newest.max(t);
    }
    newest
}

/// Path of a workspace binary, next to this test executable's `deps/` directory. Refuses
/// a binary older than the workspace's sources: `cargo test -p nodewatt-tests` alone does
/// not rebuild the agent and collector, and a stale binary would test old code.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    let hint = "run the tests with `cargo test --workspace`, which builds it";
    let built = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {hint}", p.display()));
    let root = repo();
    let own = name.trim_start_matches("nodewatt-");
    for krate in [own, "common", "wire"] {
        let src = root.join(krate).join("src");
        assert!(
            newest_mtime(&src) <= built,
            "{} is older than {}: {hint}",
            p.display(),
            src.display()
        );
    }
    p
}

/// A temp dir with a config file written in it.
pub struct ConfigFile {
    pub dir: TempDir,
    pub path: PathBuf,
}

pub fn config_file(name: &str, text: &str) -> ConfigFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap();
    ConfigFile { dir, path }
}

/// Agent config: simulated GPUs at the given constant powers and one RAPL domain at
/// 150 W. `[mqtt]` comes last, so a test can append keys and `[mqtt.tls]` to it.
pub fn agent_config(
    cluster: &str,
    node: &str,
    interval: &str,
    mqtt_port: u16,
    gpu_watts: &[f64],
) -> String {
    let mut s = format!(
        "[agent]\ncluster = \"{cluster}\"\nnode = \"{node}\"\ninterval = \"{interval}\"\n\
         [nvml]\nenabled = false\n[rapl]\nenabled = false\n[hwmon]\nenabled = false\n\
         [thermal]\nenabled = false\n\
         [simulated]\nenabled = true\n\
         [[simulated.rapl]]\nname = \"package-0\"\npower_w = 150.0\n"
    );
    for w in gpu_watts {
        s.push_str(&format!(
            "[[simulated.gpu]]\nmodel = \"Sim H100\"\npower_w = {w:.1}\n"
        ));
    }
    s.push_str(&format!(
        "[mqtt]\nport = {mqtt_port}\nreconnect_initial = \"50ms\"\nreconnect_max = \"500ms\"\n"
    ));
    s
}

/// Collector config for a v1 InfluxDB, with short batching and health intervals.
pub fn collector_config(id: &str, mqtt_port: u16, influx_url: &str, db: &str) -> String {
    format!(
        "[collector]\nid = \"{id}\"\nhealth_interval = \"200ms\"\n\
         [mqtt]\nport = {mqtt_port}\nreconnect_initial = \"50ms\"\nreconnect_max = \"500ms\"\n\
         [influxdb]\nurl = \"{influx_url}\"\ndatabase = \"{db}\"\n\
         [batch]\nflush_interval = \"100ms\"\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n"
    )
}

pub fn start_collector(cfg: &ConfigFile) -> Proc {
    Proc::spawn(
        "collector",
        Command::new(bin("nodewatt-collector"))
            .args(["serve", "--config"])
            .arg(&cfg.path)
            .env("RUST_LOG", "info"),
        cfg.dir
            .path()
            .join(format!("collector-{}.log", rand_suffix())),
    )
}

/// Waits until a collector logged its SubAck: from then on the broker keeps its messages.
pub fn wait_subscribed(c: &Proc) {
    assert!(
        wait_until(Duration::from_secs(20), || c.log().contains("subscribed")),
        "collector did not subscribe:\n{}",
        c.log()
    );
}

/// A broker, an InfluxDB and a subscribed collector: the servers every pipeline test needs.
pub struct Stack {
    pub mq: Mosquitto,
    pub db: Influxd,
    pub collector_cfg: ConfigFile,
    pub collector: Proc,
}

impl Stack {
    pub fn start(collector_id: &str, db_name: &str) -> Stack {
        Self::start_with(collector_id, db_name, "", |text| text)
    }

    /// `broker_extra` goes into mosquitto's config; `edit` adjusts the collector's.
    pub fn start_with(
        collector_id: &str,
        db_name: &str,
        broker_extra: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Stack {
        let mq = Mosquitto::start_with(broker_extra);
        let db = Influxd::start();
        let text = edit(collector_config(collector_id, mq.port, &db.url(), db_name));
        let collector_cfg = config_file("collector.toml", &text);
        let collector = start_collector(&collector_cfg);
        wait_subscribed(&collector);
        Stack {
            mq,
            db,
            collector_cfg,
            collector,
        }
    }
}

/// Runs `nodewatt-collector <args> --config <cfg>` to completion, whatever its exit.
pub fn collector_run(cfg: &ConfigFile, args: &[&str]) -> std::process::Output {
    Command::new(bin("nodewatt-collector"))
        .args(args)
        .arg("--config")
        .arg(&cfg.path)
        .output()
        .expect("nodewatt-collector runs")
}

/// Runs `nodewatt-agent <args> --config <cfg>` to completion.
pub fn agent_run(cfg: &ConfigFile, args: &[&str]) -> std::process::Output {
    Command::new(bin("nodewatt-agent"))
        .args(args)
        .arg("--config")
        .arg(&cfg.path)
        .output()
        .expect("nodewatt-agent runs")
}

/// Runs `nodewatt-collector <args> --config <cfg>` to completion, asserts success, and
/// returns its stdout.
pub fn collector_cli(cfg: &ConfigFile, args: &[&str]) -> String {
    let out = collector_run(cfg, args);
    assert!(
        out.status.success(),
        "nodewatt-collector {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The repository's root, canonical (it is handed to other programs).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository's root")
}

/// Unix ms in RFC 3339 with milliseconds, as `--from` and `--to` take it.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub fn start_agent(cfg: &ConfigFile, count: u64) -> Proc {
    Proc::spawn(
        "agent",
        Command::new(bin("nodewatt-agent"))
            .args(["run", "--count", &count.to_string(), "--config"])
            .arg(&cfg.path)
            .env("RUST_LOG", "info"),
        cfg.dir.path().join(format!("agent-{}.log", rand_suffix())),
    )
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Publishes raw payloads with QoS 1 (as a misbehaving or hostile client would) and waits
/// until the broker acknowledged all of them.
pub fn publish_raw(port: u16, messages: &[(String, Vec<u8>)]) {
    publish_raw_as(port, None, messages)
}

/// `publish_raw` logged in as `login` (user, password).
pub fn publish_raw_as(port: u16, login: Option<(&str, &str)>, messages: &[(String, Vec<u8>)]) {
    publish_raw_with(port, &format!("raw-{}", rand_suffix()), login, messages)
}

/// `publish_raw_as` with this client id (a broker may pin a login to one).
pub fn publish_raw_with(
    port: u16,
    client_id: &str,
    login: Option<(&str, &str)>,
    messages: &[(String, Vec<u8>)],
) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_max_packet_size(16 << 20, 16 << 20);
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut connection) = Client::new(opts, messages.len() + 10);
    for (topic, payload) in messages {
        client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload.clone())
            .unwrap();
    }
    let mut acked = 0;
    for ev in connection.iter() {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked += 1;
                if acked == messages.len() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("raw publish failed: {e}"),
        }
    }
    let _ = client.disconnect();
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made
/// with openssl.
pub struct Certs {
    pub dir: TempDir,
}

impl Certs {
    pub fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        let run = |args: &[&str]| {
            let out = Command::new(require("openssl"))
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=nodewatt test CA",
        ]);
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        // A server certificate for 127.0.0.1 and a client certificate, both signed by the CA.
        for (name, cn, ext) in [
            ("server", "127.0.0.1", "san.ext"),
            ("client", "node-c", "client.ext"),
        ] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let subject = format!("/CN={cn}");
            run(&[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                &subject,
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                ext,
            ]);
        }
        Certs { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for Certs {
    fn default() -> Self {
        Self::new()
    }
}

/// A mosquitto password file with these (user, password) pairs.
pub fn password_file(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let p = dir.join("passwd");
    std::fs::write(&p, "").unwrap();
    for (user, password) in users {
        let out = Command::new(require("mosquitto_passwd"))
            .arg("-b")
            .arg(&p)
            .args([user, password])
            .output()
            .expect("mosquitto_passwd runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    p
}

/// A private single-node Slurm (Debian's slurm-wlm and munge, started without systemd):
/// its own munged socket and key, config, state directories and ports, four fake GPUs
/// (symlinks to /dev/null), and the repository's prolog and epilog writing the job
/// registry in `jobs`. Needs root, as slurmd runs prologs as root.
pub struct Slurm {
    pub dir: TempDir,
    pub jobs: PathBuf,
    _munged: Proc,
    _ctld: Proc,
    _slurmd: Proc,
}

impl Slurm {
    /// The pid of this cluster's slurmd (started with `-f` its slurm.conf).
    pub fn slurmd_pid(&self) -> i32 {
        self._slurmd.pid()
    }

    pub fn start() -> Slurm {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the Slurm tests need root (slurmd runs prologs as root)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let jobs = d.join("jobs");
        for sub in ["state", "spool", "dev"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for i in 0..4 {
            std::os::unix::fs::symlink("/dev/null", d.join(format!("dev/nvidia{i}"))).unwrap();
        }
        let mut key = [0u8; 128];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut key)
            .unwrap();
        std::fs::write(d.join("munge.key"), key).unwrap();
        std::fs::set_permissions(d.join("munge.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let munged = Proc::spawn(
            "munged",
            Command::new(require("munged"))
                .args(["-F", "-f"])
                .arg(format!("--socket={}", d.join("munge.sock").display()))
                .arg(format!("--key-file={}", d.join("munge.key").display()))
                .arg(format!("--log-file={}", d.join("munged.log").display()))
                .arg(format!("--pid-file={}", d.join("munged.pid").display()))
                .arg(format!("--seed-file={}", d.join("munged.seed").display())),
            d.join("munged.out"),
        );
        assert!(
            wait_until(Duration::from_secs(10), || d.join("munge.sock").exists()),
            "munged did not start"
        );

        let repo = repo();
        for script in ["prolog", "epilog"] {
            let wrapper = format!(
                "#!/bin/sh\nNODEWATT_JOBS_DIR={} exec {}\n",
                jobs.display(),
                repo.join("config/slurm")
                    .join(script)
                    .canonicalize()
                    .unwrap()
                    .display()
            );
            std::fs::write(d.join(script), wrapper).unwrap();
            std::fs::set_permissions(d.join(script), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        let conf = format!(
            "ClusterName=nwtest\nSlurmctldHost=localhost\nSlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
             SlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\nAuthInfo=socket={d}/munge.sock\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n\
             SchedulerType=sched/builtin\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
             AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n\
             JobCompType=jobcomp/none\nGresTypes=gpu\nSlurmdParameters=config_overrides\n\
             Prolog={d}/prolog\nEpilog={d}/epilog\nReturnToService=2\n\
             NodeName=localhost CPUs=8 RealMemory=1000 Gres=gpu:4 State=UNKNOWN\n\
             PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n",
            ctld = free_port(),
            slurmd = free_port(),
            d = d.display()
        );
        std::fs::write(d.join("slurm.conf"), conf).unwrap();
        std::fs::write(
            d.join("gres.conf"),
            format!(
                "AutoDetect=off\nName=gpu File={}/dev/nvidia[0-3]\n",
                d.display()
            ),
        )
        .unwrap();
        let ctld = Proc::spawn(
            "slurmctld",
            Command::new(require("slurmctld"))
                .arg("-D")
                .arg("-f")
                .arg(d.join("slurm.conf")),
            d.join("slurmctld.out"),
        );
        let slurmd = Proc::spawn(
            "slurmd",
            Command::new(require("slurmd"))
                .args(["-D", "-N", "localhost", "-f"])
                .arg(d.join("slurm.conf")),
            d.join("slurmd.out"),
        );
        let s = Slurm {
            dir,
            jobs,
            _munged: munged,
            _ctld: ctld,
            _slurmd: slurmd,
        };
        let idle = wait_until(Duration::from_secs(30), || {
            s.command("sinfo", &["-h", "-o", "%T"]).trim() == "idle"
        });
        assert!(
            idle,
            "slurm did not come up: {}",
            std::fs::read_to_string(s.dir.path().join("slurmctld.log")).unwrap_or_default()
        );
        s
    }

    /// Runs a Slurm client command against this cluster; its stdout.
    pub fn command(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(require(program))
            .args(args)
            .env("SLURM_CONF", self.dir.path().join("slurm.conf"))
            .output()
            .expect("slurm command runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The last lines of slurmctld's and slurmd's logs, for a failure message.
    pub fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "{name}:\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            )
        };
        format!("{}\n{}", tail("slurmctld.log"), tail("slurmd.log"))
    }

    /// `sbatch --parsable` with these arguments; the job id.
    pub fn sbatch(&self, args: &[&str]) -> String {
        let mut all = vec!["--parsable", "-o", "/dev/null"];
        all.extend_from_slice(args);
        let id = self.command("sbatch", &all).trim().to_string();
        assert!(
            !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()),
            "sbatch gave {id:?}"
        );
        id
    }
}

impl Influxd {
    /// The running influxd process (for its CPU time), if it runs.
    pub fn process(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }
}

impl Proc {
    /// The file its stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Mosquitto {
    /// The running mosquitto process (for its CPU time), if it runs.
    pub fn process(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }
}

/// POST with a shared client that waits up to 10 minutes (statements that change
/// InfluxDB, `SELECT ... INTO`, writes of large batches).
pub fn http_post(
    url: reqwest::Url,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> reqwest::Result<reqwest::blocking::Response> {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    let mut req = CLIENT
        .get_or_init(|| http_client(Duration::from_secs(600)))
        .post(url)
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send()
}

impl Influxd {
    /// Runs InfluxQL that changes something (CREATE, DROP, ALTER, `SELECT ... INTO`) by
    /// POST, as InfluxDB requires; the JSON answer, or the error InfluxDB gave.
    pub fn execute(&self, db: &str, q: &str) -> Result<serde_json::Value, String> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/query", self.url()),
            &[("db", db), ("q", q), ("epoch", "ms")],
        )
        .unwrap();
        let text = http_post(url, &[], Vec::new())
            .and_then(|r| r.text())
            .map_err(|e| format!("{q}: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{q}: {e}: {text}"))?;
        let errors: Vec<String> = v["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["error"].as_str().map(str::to_string))
            .chain(v["error"].as_str().map(str::to_string))
            .collect();
        if errors.is_empty() {
            Ok(v)
        } else {
            Err(format!("{q}: {}", errors.join("; ")))
        }
    }

    /// Writes a line-protocol body to `db` (and retention policy `rp`) at `precision`
    /// (`ms`, `ns`, ...); `gzipped` says the body is gzip-compressed.
    pub fn write_lines(
        &self,
        db: &str,
        rp: Option<&str>,
        precision: &str,
        body: Vec<u8>,
        gzipped: bool,
    ) -> Result<(), String> {
        write_lines(&self.url(), db, rp, precision, body, gzipped)
    }

    /// Applies a file in `influx -import` format: statements under `# DDL`, one a line,
    /// are executed; line protocol under `# DML` is written (nanosecond timestamps) to
    /// the database and retention policy named by `# CONTEXT-DATABASE:` and
    /// `# CONTEXT-RETENTION-POLICY:`. Other lines starting with `#` are comments.
    pub fn import(&self, text: &str) -> Result<(), String> {
        let (mut dml, mut db, mut rp) = (false, String::new(), None::<String>);
        let mut lines: Vec<&str> = Vec::new();
        let flush = |lines: &mut Vec<&str>, db: &str, rp: &Option<String>| {
            if lines.is_empty() {
                return Ok(());
            }
            let body = lines.join("\n").into_bytes();
            lines.clear();
            self.write_lines(db, rp.as_deref(), "ns", body, false)
        };
        for line in text.lines().map(str::trim) {
            if let Some(c) = line.strip_prefix('#') {
                let c = c.trim();
                if c == "DDL" || c == "DML" {
                    flush(&mut lines, &db, &rp)?;
                    dml = c == "DML";
                } else if let Some(d) = c.strip_prefix("CONTEXT-DATABASE:") {
                    flush(&mut lines, &db, &rp)?;
                    db = d.trim().to_string();
                } else if let Some(r) = c.strip_prefix("CONTEXT-RETENTION-POLICY:") {
                    flush(&mut lines, &db, &rp)?;
                    rp = Some(r.trim().to_string());
                }
            } else if line.is_empty() {
            } else if dml {
                lines.push(line);
            } else {
                self.execute(&db, line)?;
            }
        }
        flush(&mut lines, &db, &rp)
    }

    /// Bytes under this influxd's directory (data, WAL, meta).
    pub fn disk_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(self.dir.path())
    }
}

/// [`Influxd::write_lines`] to the InfluxDB at `url` (for threads that hold no `Influxd`).
pub fn write_lines(
    url: &str,
    db: &str,
    rp: Option<&str>,
    precision: &str,
    body: Vec<u8>,
    gzipped: bool,
) -> Result<(), String> {
    let mut params = vec![("db", db), ("precision", precision)];
    if let Some(rp) = rp {
        params.push(("rp", rp));
    }
    let url = reqwest::Url::parse_with_params(&format!("{url}/write"), &params).unwrap();
    let headers: &[(&str, &str)] = if gzipped {
        &[("Content-Encoding", "gzip")]
    } else {
        &[]
    };
    let resp = http_post(url, headers, body).map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            resp.status(),
            resp.text().unwrap_or_default().trim()
        ))
    }
}

/// The `SELECT ... INTO ...` body of a `CREATE CONTINUOUS QUERY` statement (as `SHOW
/// CONTINUOUS QUERIES` prints it), restricted to `[from_ms, to_ms)`: what the continuous
/// query service runs for that window, to run by hand with [`Influxd::execute`].
pub fn continuous_query_body(create: &str, from_ms: u64, to_ms: u64) -> String {
    let begin = create.find(" BEGIN ").expect("BEGIN in a continuous query") + 7;
    let end = create.rfind(" END").expect("END in a continuous query");
    let body = &create[begin..end];
    let group = body
        .find(" GROUP BY ")
        .expect("GROUP BY in a continuous query");
    let window = format!("time >= {from_ms}ms AND time < {to_ms}ms");
    let (head, tail) = body.split_at(group);
    match head.split_once(" WHERE ") {
        Some((select, cond)) => format!("{select} WHERE ({cond}) AND {window}{tail}"),
        None => format!("{head} WHERE {window}{tail}"),
    }
}

/// mosquitto run from a complete configuration (e.g. the shipped one with its paths and
/// ports adapted), written to `dir`; waits until `port`, one of its listeners, accepts.
/// Runs as root when the tests do (mosquitto would drop to its own user otherwise).
pub fn start_mosquitto_config(dir: &Path, conf: &str, port: u16) -> Proc {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let conf = format!("{conf}\n{}", if root { "user root\n" } else { "" });
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, conf).unwrap();
    let proc = Proc::spawn(
        "mosquitto",
        Command::new(require("mosquitto")).arg("-c").arg(&path),
        dir.join("mosquitto.log"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || port_open(port)),
        "mosquitto did not open port {port}: {}",
        proc.log()
    );
    proc
}

/// A valid sample of `cluster`/`node` with one GPU at 100 W, stamped `seq` seconds before
/// a second fixed for the whole test binary: samples with different `seq` never share a
/// timestamp (InfluxDB would keep one of them), even across a second boundary.
pub fn valid_sample(cluster: &str, node: &str, seq: u64) -> nodewatt_wire::Sample {
    static NOW: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let now = *NOW.get_or_init(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        ms - ms % 1000
    });
    let mut s = nodewatt_wire::Sample::new(
        "raw-test",
        cluster.parse().unwrap(),
        node.parse().unwrap(),
        1000,
        now - 600_000,
    );
    s.ts_ms = now - seq * 1000;
    s.seq = seq;
    s.gpus.push(nodewatt_wire::Gpu {
        index: 0,
        uuid: "GPU-raw".into(),
        pci_bus_id: "0".into(),
        model: "H100".into(),
        power_w: Some(100.0),
        ..Default::default()
    });
    s
}
