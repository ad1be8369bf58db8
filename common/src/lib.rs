//! Pieces shared by the agent and the collector: configuration loading, MQTT connection
//! settings, retry backoff, logging, shutdown, and the natural order of names.

pub mod backoff;
pub mod config;
pub mod connection;
pub mod mqtt;
pub mod preflight;

use std::io::IsTerminal;

/// Orders names as people read them: digit runs by their number (of any length), so job
/// 2 comes before job 10, `node-9` before `node-10` and `hwmon2` before `hwmon10`; the
/// rest by character. Equal numbers written differently (`01`, `1`) fall back to the
/// plain order, so the order is total. Allocates nothing.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> impl Iterator<Item = &str> {
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            let (chunk, tail) = rest.split_at(end);
            rest = tail;
            Some(chunk)
        })
    }
    let mut x = chunks(a);
    let mut y = chunks(b);
    loop {
        let (p, q) = match (x.next(), y.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(p), Some(q)) => (p, q),
        };
        let numeric = p.as_bytes()[0].is_ascii_digit() && q.as_bytes()[0].is_ascii_digit();
        let order = match numeric {
            true => {
                let (p, q) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
                p.len().cmp(&q.len()).then_with(|| p.cmp(q))
            }
            false => p.cmp(q),
        };
        if order.is_ne() {
            return order;
        }
    }
}

/// Replaces `path` by `bytes` atomically: a reader (or a start after a crash) sees the
/// old contents or the new, never a mix. With `sync` the data reaches the disk before the
/// rename (a power loss keeps one of the two); without, the page cache suffices (a killed
/// process does).
pub fn write_atomic(path: &std::path::Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Selects ring as the process's TLS crypto provider (rumqttc and reqwest are built
/// without one of their own). Call once at start; later calls are no-ops.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A log filter as `--log-level` and RUST_LOG take it: a level ("info") or per-target
/// levels ("warn,nodewatt_agent=debug"). For clap's `value_parser`, so a typo is an error
/// at start, not silence: a bare word that is not a level ("verbose") would otherwise
/// parse as a target name and turn logging off for everything else.
pub fn log_filter(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let not_a_filter = |why: String| {
        format!("{s:?} is not a log filter (a level such as info, or target=level,...): {why}")
    };
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(not_a_filter(format!("{directive:?} is not a level")));
        }
    }
    s.parse::<tracing_subscriber::filter::Targets>()
        .map(|_| s.to_string())
        .map_err(|e| not_a_filter(e.to_string()))
}

/// Logs to stderr (stdout carries data), without colours unless it is a terminal.
/// `filter` (checked by [`log_filter`]) wins over RUST_LOG; the default is `info`.
/// Targets, not EnvFilter: no regex engine in the binaries (about 0.2 MB of the agent's
/// resident set, docs/benchmarks.md).
pub fn init_logging(filter: Option<&str>) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    // Checked like --log-level, so a RUST_LOG typo is reported, not obeyed.
    let from_env = env
        .as_deref()
        .map(|s| log_filter(s).and_then(|s| s.parse::<Targets>().map_err(|e| e.to_string())));
    let filter = match (filter.map(str::parse::<Targets>), &from_env) {
        (Some(Ok(f)), _) => f,
        (None, Some(Ok(f))) => f.clone(),
        _ => Targets::new().with_default(tracing::Level::INFO),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(filter)
        .init();
    if let Some(Err(e)) = &from_env {
        tracing::warn!("RUST_LOG: {e}; logging at info");
    }
}

/// Wall-clock time in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sleeps until `at`, or forever when there is nothing to wait for: a `select!` branch
/// for an optional deadline.
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
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

#[cfg(test)]
mod tests {
    use super::{log_filter, natural_cmp};

    #[test]
    fn natural_order() {
        let mut ids = [
            "10", "2", "1", "11", "12_3", "12_10", "12+0", "node-10", "node-9", "007", "a",
        ];
        ids.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            ids,
            ["1", "2", "007", "10", "11", "12+0", "12_3", "12_10", "a", "node-9", "node-10"]
        );
        assert_eq!(natural_cmp("01", "1"), "01".cmp("1"), "a total order");
        let mut sysfs = [
            "hwmon10",
            "hwmon2",
            "hwmon1",
            "intel-rapl:0:1",
            "intel-rapl:0",
            "intel-rapl:1",
        ];
        sysfs.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            sysfs,
            [
                "hwmon1",
                "hwmon2",
                "hwmon10",
                "intel-rapl:0",
                "intel-rapl:0:1",
                "intel-rapl:1"
            ]
        );
        // Digit runs past u64 compare by length, then digits.
        assert!(natural_cmp("x99999999999999999999", "x100000000000000000000").is_lt());
    }

    #[test]
    fn log_filters_are_levels_or_targets_and_anything_else_is_an_error() {
        for ok in [
            "info",
            "warn,nodewatt_agent=debug",
            "nodewatt_collector=trace",
        ] {
            assert_eq!(log_filter(ok).as_deref(), Ok(ok));
        }
        for bad in ["verbose", "info,x=loud"] {
            let e = log_filter(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("not a log filter"), "{e}");
        }
    }
}
