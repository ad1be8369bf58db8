//! Strict TOML configuration files: errors name the file and, for unknown or mistyped
//! keys, the key (the config structs use `deny_unknown_fields`).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is in the message, not a `source`: anyhow's `{:#}` would print it twice.
    #[error("cannot read config {path}: {err} (--config names another file)")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("invalid config {path}: {err}")]
    Parse {
        path: PathBuf,
        err: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
    /// A value that parsed but is out of its range: names the file and the option.
    #[error("invalid config {path}: {msg}")]
    Value { path: PathBuf, msg: String },
}

/// Parses `text`; `origin` names it in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, origin: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_owned(),
        err: Box::new(e),
    })
}

pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
        path: path.to_owned(),
        err,
    })?;
    parse_toml(&text, path)
}

/// `name = d` must lie in `lo..=hi`; the error names the option and the range.
pub fn duration_in(
    name: &str,
    d: std::time::Duration,
    lo: std::time::Duration,
    hi: std::time::Duration,
) -> Result<(), String> {
    if (lo..=hi).contains(&d) {
        return Ok(());
    }
    let f = humantime::format_duration;
    Err(format!(
        "{name} = {} is outside {} to {}",
        f(d),
        f(lo),
        f(hi)
    ))
}

/// `name = n` must lie in `lo..=hi`.
pub fn count_in(name: &str, n: usize, lo: usize, hi: usize) -> Result<(), String> {
    if (lo..=hi).contains(&n) {
        Ok(())
    } else {
        Err(format!("{name} = {n} is outside {lo} to {hi}"))
    }
}

/// Makes a relative path relative to `base` (the config file's directory).
pub fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}
