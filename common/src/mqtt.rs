//! The `[mqtt]` section shared by agent and collector, and its translation into rumqttc
//! options: TLS (rustls) with a CA file and optional client certificate, and a password
//! read from a file so it never sits in a config file or on a command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "default_host")]
    pub host: String,
    /// 1883, or 8883 when `tls` is set.
    #[serde(default)]
    pub port: Option<u16>,
    /// Stable client id; a default is derived from the node or collector name.
    #[serde(default)]
    pub client_id: Option<String>,
    /// With `password_file` and no `username`, an agent logs in as its node name
    /// ([`MqttConfig::options_as`]), so one config serves a fleet whose per-node password
    /// files differ; other clients must name it.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(with = "humantime_serde", default = "default_keep_alive")]
    pub keep_alive: Duration,
    /// First reconnect delay; doubles per failure (with jitter) up to `reconnect_max`.
    #[serde(with = "humantime_serde", default = "default_reconnect_initial")]
    pub reconnect_initial: Duration,
    #[serde(with = "humantime_serde", default = "default_reconnect_max")]
    pub reconnect_max: Duration,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate and key, for brokers that require client certificates.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: default_host(),
            port: None,
            client_id: None,
            username: None,
            password_file: None,
            keep_alive: default_keep_alive(),
            reconnect_initial: default_reconnect_initial(),
            reconnect_max: default_reconnect_max(),
            tls: None,
        }
    }
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_reconnect_initial() -> Duration {
    Duration::from_millis(500)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, thiserror::Error)]
pub enum MqttConfigError {
    // The cause is in the message, not a `source`: anyhow's `{:#}` would print it twice.
    #[error("cannot read {what} {path}: {err}")]
    Read {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    /// Names the option (`mqtt.…`).
    #[error("{0}")]
    Invalid(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, MqttConfigError> {
    std::fs::read(path).map_err(|err| MqttConfigError::Read {
        what,
        path: path.to_owned(),
        err,
    })
}

impl MqttConfig {
    pub fn port(&self) -> u16 {
        self.port
            .unwrap_or(if self.tls.is_some() { 8883 } else { 1883 })
    }

    /// Checks what can be checked without connecting.
    pub fn validate(&self) -> Result<(), MqttConfigError> {
        self.login_name(None)?;
        self.validate_agent()
    }

    /// Who logs in: `username`, else with a `password_file` the `default` (an agent's
    /// node name), else nobody. A password file with neither is an error.
    pub fn login_name<'a>(
        &'a self,
        default: Option<&'a str>,
    ) -> Result<Option<&'a str>, MqttConfigError> {
        match (&self.username, &self.password_file) {
            (Some(u), _) => Ok(Some(u)),
            (None, Some(_)) => default.map(Some).ok_or_else(|| {
                MqttConfigError::Invalid("mqtt.password_file needs a username".into())
            }),
            (None, None) => Ok(None),
        }
    }

    /// [`MqttConfig::validate`] for an agent, which may leave `username` out: with
    /// `password_file` it logs in as its node name ([`MqttConfig::options_as`]).
    pub fn validate_agent(&self) -> Result<(), MqttConfigError> {
        let bad = |m: &str| Err(MqttConfigError::Invalid(m.to_string()));
        if self.host.is_empty() {
            return bad("mqtt.host is empty");
        }
        let s = Duration::from_secs;
        // MQTT carries the keep-alive as 16-bit seconds.
        let ranges = [
            ("mqtt.keep_alive", self.keep_alive, s(1), s(u16::MAX as u64)),
            (
                "mqtt.reconnect_initial",
                self.reconnect_initial,
                Duration::from_millis(1),
                s(3600),
            ),
            (
                "mqtt.reconnect_max",
                self.reconnect_max,
                self.reconnect_initial,
                s(86_400),
            ),
        ];
        for (name, d, lo, hi) in ranges {
            crate::config::duration_in(name, d, lo, hi).map_err(MqttConfigError::Invalid)?;
        }
        if let Some(t) = &self.tls {
            if t.client_cert_file.is_some() != t.client_key_file.is_some() {
                return bad("mqtt.tls.client_cert_file and mqtt.tls.client_key_file go together");
            }
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > 128 {
                return bad("mqtt.client_id must be 1-128 characters");
            }
        }
        Ok(())
    }

    /// Makes relative file paths relative to the config file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        let tls = self.tls.as_mut();
        let (ca, cert, key) = match tls {
            Some(t) => (
                Some(&mut t.ca_file),
                t.client_cert_file.as_mut(),
                t.client_key_file.as_mut(),
            ),
            None => (None, None, None),
        };
        for p in [self.password_file.as_mut(), ca, cert, key]
            .into_iter()
            .flatten()
        {
            crate::config::resolve(base, p);
        }
    }

    /// rumqttc options with credentials and TLS; reads the password and certificate files.
    /// `password_file` needs a `username` here.
    pub fn options(&self, default_client_id: &str) -> Result<MqttOptions, MqttConfigError> {
        self.login(default_client_id, None)
    }

    /// Like [`MqttConfig::options`], logging in as `default_username` (an agent's node
    /// name) when `password_file` is set and `username` is not.
    pub fn options_as(
        &self,
        default_client_id: &str,
        default_username: &str,
    ) -> Result<MqttOptions, MqttConfigError> {
        self.login(default_client_id, Some(default_username))
    }

    fn login(
        &self,
        default_client_id: &str,
        default_username: Option<&str>,
    ) -> Result<MqttOptions, MqttConfigError> {
        let id = self.client_id.as_deref().unwrap_or(default_client_id);
        let mut o = MqttOptions::new(id, self.host.clone(), self.port());
        o.set_keep_alive(self.keep_alive);
        if let Some(user) = self.login_name(default_username)? {
            let password = match &self.password_file {
                Some(p) => {
                    let raw = read("mqtt password file", p)?;
                    String::from_utf8(raw)
                        .map_err(|_| MqttConfigError::Invalid("password file is not UTF-8".into()))?
                        .trim_end_matches(['\r', '\n'])
                        .to_string()
                }
                None => String::new(),
            };
            o.set_credentials(user, password);
        }
        if let Some(t) = &self.tls {
            let ca = read("mqtt CA file", &t.ca_file)?;
            let client_auth = match (&t.client_cert_file, &t.client_key_file) {
                (Some(c), Some(k)) => {
                    Some((read("client certificate", c)?, read("client key", k)?))
                }
                _ => None,
            };
            o.set_transport(Transport::Tls(TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            }));
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MqttConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_and_ports() {
        let c = parse("").unwrap();
        assert_eq!((c.host.as_str(), c.port()), ("127.0.0.1", 1883));
        let c = parse("[tls]\nca_file = \"ca.pem\"\n").unwrap();
        assert_eq!(c.port(), 8883);
        assert!(parse("hots = \"x\"\n")
            .unwrap_err()
            .to_string()
            .contains("hots"));
    }

    #[test]
    fn validation() {
        let c = parse("password_file = \"p\"\n").unwrap();
        assert!(c.validate().is_err());
        c.validate_agent().unwrap();
        let t = "[tls]\nca_file = \"ca\"\nclient_cert_file = \"c\"\n";
        assert!(parse(t).unwrap().validate().is_err());
        assert!(parse("keep_alive = \"100ms\"\n")
            .unwrap()
            .validate()
            .is_err());
    }

    #[test]
    fn password_comes_from_the_file_without_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let mut c = parse("username = \"agent\"\npassword_file = \"pw\"\n").unwrap();
        c.resolve_paths(dir.path());
        let o = c.options("id").unwrap();
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("agent", "s3cret")
        );
        assert_eq!(o.client_id(), "id");

        let mut c = parse("username = \"a\"\npassword_file = \"missing\"\n").unwrap();
        c.resolve_paths(dir.path());
        let err = c.options("id").unwrap_err().to_string();
        assert!(
            err.contains("mqtt password file") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn an_agent_logs_in_as_its_node_name_unless_a_username_is_set() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let mut c = parse("password_file = \"pw\"\n").unwrap();
        c.resolve_paths(dir.path());
        let login = |o: MqttOptions| {
            let l = o.credentials().unwrap();
            (l.username.clone(), l.password.clone())
        };
        let o = c.options_as("id", "gpu001").unwrap();
        assert_eq!(login(o), ("gpu001".into(), "s3cret".into()));
        // Without a node name (the collector) the user name must be configured.
        let err = c.options("id").unwrap_err().to_string();
        assert!(err.contains("mqtt.password_file needs a username"), "{err}");

        c.username = Some("agent".into());
        let o = c.options_as("id", "gpu001").unwrap();
        assert_eq!(login(o), ("agent".into(), "s3cret".into()));
        // No password file: no login, whatever the node.
        let o = parse("").unwrap().options_as("id", "gpu001").unwrap();
        assert!(o.credentials().is_none());
    }
}
