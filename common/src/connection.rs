//! An MQTT connection whose connect survives the caller's `select!`, and connection
//! errors that say where and what to check.
//!
//! rumqttc's `EventLoop::poll` connects (TCP, TLS, CONNECT and its CONNACK, bounded by its
//! 5 s connection timeout) inside the future it returns. A loop that selects on it beside
//! a one-second sample channel drops that future every second, so a connect that takes
//! longer than the next sample never ends and never fails: an agent pointed at an HTTP
//! port logged nothing at all. [`Connection::poll`] keeps the connect in flight across
//! such drops.

use std::future::Future;
use std::pin::Pin;

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet,
};

type Connecting = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;

pub struct Connection {
    /// The event loop, except while a connect holds it.
    idle: Option<EventLoop>,
    connecting: Option<Connecting>,
}

impl Connection {
    pub fn new(eventloop: EventLoop) -> Connection {
        Connection {
            idle: Some(eventloop),
            connecting: None,
        }
    }

    /// The next event, as `EventLoop::poll`; cancel-safe, a connect included.
    pub async fn poll(&mut self) -> Result<Event, ConnectionError> {
        if self.connecting.is_none() {
            let el = self.idle.as_mut().expect("idle while not connecting");
            if el.network.is_some() {
                return el.poll().await;
            }
            let mut el = self.idle.take().expect("idle while not connecting");
            self.connecting = Some(Box::pin(async move {
                let r = el.poll().await;
                (el, r)
            }));
        }
        let connecting = self.connecting.as_mut().expect("set above");
        let (el, r) = connecting.await;
        self.connecting = None;
        self.idle = Some(el);
        r
    }

    /// A clean DISCONNECT, so the broker sends no will and drops a clean session: what
    /// is queued before it (a status, acks) goes out first. Waits at most `within`.
    pub async fn logout(&mut self, client: &AsyncClient, within: Duration) {
        if client.try_disconnect().is_err() {
            return;
        }
        let flush = async {
            while let Ok(ev) = self.poll().await {
                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(within, flush).await;
    }

    /// The event loop, unless a connect is in flight (then nothing of a connection is
    /// there to inspect).
    pub fn eventloop(&mut self) -> Option<&mut EventLoop> {
        self.idle.as_mut()
    }
}

/// A preflight login: connects with `options` and waits for the CONNACK, at most
/// `within`. The caller goes on with the client (to subscribe, say), then
/// [`Connection::logout`].
pub async fn login(
    options: MqttOptions,
    peer: &Peer,
    within: Duration,
) -> Result<(AsyncClient, Connection), String> {
    let (client, eventloop) = AsyncClient::new(options, 8);
    let mut eventloop = Connection::new(eventloop);
    let connack = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(peer.explain(&e)),
            }
        }
    };
    match tokio::time::timeout(within, connack).await {
        Ok(Ok(())) => Ok((client, eventloop)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "MQTT broker {peer}: no answer within {} s",
            within.as_secs()
        )),
    }
}

/// Where a connection goes: for messages.
#[derive(Debug, Clone)]
pub struct Peer {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: Option<String>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl Peer {
    /// The broker of `cfg` and the user that logs in to it:
    /// [`MqttConfig::login_name`]`(default_username)` (an agent passes its node name).
    ///
    /// [`MqttConfig::login_name`]: crate::mqtt::MqttConfig::login_name
    pub fn of(cfg: &crate::mqtt::MqttConfig, default_username: Option<&str>) -> Peer {
        Peer {
            host: cfg.host.clone(),
            port: cfg.port(),
            tls: cfg.tls.is_some(),
            username: cfg
                .login_name(default_username)
                .ok()
                .flatten()
                .map(str::to_string),
        }
    }

    /// A failed connection, with the broker's address and what to check.
    pub fn explain(&self, e: &ConnectionError) -> String {
        let user = self.username.as_deref().unwrap_or("(none)");
        let hint = match e {
            ConnectionError::Io(io) => match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "nothing listens there: is the broker running, and are [mqtt] host and port right?".to_string()
                }
                std::io::ErrorKind::TimedOut => {
                    "no answer: is the host reachable (firewall, routing)?".into()
                }
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                    if self.tls {
                        "the peer closed the connection: is that port the broker's TLS listener?".into()
                    } else {
                        "the peer closed the connection: is that port an MQTT listener without TLS (a TLS one needs [mqtt.tls])?".into()
                    }
                }
                _ if io.to_string().contains("failed to lookup") => {
                    "the host name does not resolve: check [mqtt] host".into()
                }
                _ => "check [mqtt] host and port".into(),
            },
            ConnectionError::NetworkTimeout => {
                "no MQTT answer within 5 s: is that port an MQTT broker (and not, say, InfluxDB's), and is the host reachable?".into()
            }
            ConnectionError::ConnectionRefused(code) => match code {
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                    format!("the broker refused the login as user {user}: check [mqtt] username and password_file, and the broker's logins (its dynamic-security file, from scripts/broker-users.sh)")
                }
                ConnectReturnCode::BadClientId => {
                    "the broker refused the client id: check [mqtt] client_id".into()
                }
                _ => "the broker refused the connection".into(),
            },
            ConnectionError::Tls(_) => {
                "TLS failed: check [mqtt.tls] ca_file (it must have signed the broker's certificate, issued for this host name) and the client certificate".into()
            }
            ConnectionError::NotConnAck(_) => {
                "the peer does not speak MQTT: is that port an MQTT broker?".into()
            }
            _ => "check the broker's log".into(),
        };
        format!("MQTT broker {self}: {e}; {hint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(tls: bool) -> Peer {
        Peer {
            host: "broker.example".into(),
            port: 8883,
            tls,
            username: Some("node-1".into()),
        }
    }

    #[test]
    fn errors_name_the_broker_and_what_to_check() {
        let refused =
            ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let m = peer(false).explain(&refused);
        assert!(
            m.starts_with("MQTT broker mqtt://broker.example:8883: "),
            "{m}"
        );
        assert!(m.contains("is the broker running"), "{m}");
        let m = peer(true).explain(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized,
        ));
        assert!(m.contains("mqtts://broker.example:8883"), "{m}");
        assert!(m.contains("as user node-1"), "{m}");
        let m = peer(false).explain(&ConnectionError::NetworkTimeout);
        assert!(m.contains("InfluxDB"), "{m}");
    }

    /// A connect to a port that accepts TCP and never answers MQTT fails after rumqttc's
    /// connection timeout, even though the caller drops `poll` every 100 ms.
    #[tokio::test]
    async fn a_connect_survives_dropped_polls_and_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts and holds connections, answering nothing.
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        });
        let mut options = rumqttc::MqttOptions::new("t", "127.0.0.1", port);
        options.set_keep_alive(std::time::Duration::from_secs(5));
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 4);
        eventloop.network_options.set_connection_timeout(1);
        let mut conn = Connection::new(eventloop);
        let started = std::time::Instant::now();
        let failed = loop {
            tokio::select! {
                r = conn.poll() => break r,
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "the connect never ended"
            );
        };
        assert!(
            matches!(failed, Err(ConnectionError::NetworkTimeout)),
            "{failed:?}"
        );
        assert!(conn.eventloop().is_some());
        held.abort();
    }
}
