//! Pieces shared by the agent and the collector: configuration loading, MQTT connection
//! settings, retry backoff, logging and shutdown.

pub mod backoff;
pub mod config;
pub mod mqtt;

use std::io::IsTerminal;

/// Selects ring as the process's TLS crypto provider (rumqttc and reqwest are built
/// without one of their own). Call once at start; later calls are no-ops.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Logs to stderr (stdout carries data), without colours unless it is a terminal.
/// `filter` (a level or tracing filter) wins over RUST_LOG; the default is `info`.
pub fn init_logging(filter: Option<&str>) {
    let filter = match filter {
        Some(f) => tracing_subscriber::EnvFilter::new(f),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch for SIGTERM: {e}; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("stopping");
}
