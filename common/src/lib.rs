//! Pieces shared by the agent and the collector: MQTT connection settings and retry backoff.

pub mod backoff;
pub mod mqtt;

/// Selects ring as the process's TLS crypto provider (rumqttc and reqwest are built
/// without one of their own). Call once at start; later calls are no-ops.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
