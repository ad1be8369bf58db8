//! The fuzz targets on stable Rust: each runs for `NODEWATT_FUZZ_SECS` seconds (default
//! 2) of generated inputs and prints how many it tried. `.ci/run` runs them longer;
//! a failure prints the smallest input proptest could shrink it to.

use std::time::{Duration, Instant};

use nodewatt_fuzz::gen;
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn budget() -> Duration {
    let secs = std::env::var("NODEWATT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// Runs `target` on inputs from `strategy` until the time budget is spent, in batches of
/// fresh random cases (at least one batch).
fn fuzz<S: Strategy>(name: &str, strategy: S, target: impl Fn(&S::Value) -> Result<(), String>) {
    const BATCH: u32 = 128;
    let started = Instant::now();
    let mut inputs = 0u64;
    loop {
        let mut runner = TestRunner::new(Config {
            cases: BATCH,
            failure_persistence: None,
            ..Config::default()
        });
        if let Err(e) = runner.run(&strategy, |v| target(&v).map_err(TestCaseError::fail)) {
            panic!("fuzz target {name} failed after {inputs} inputs: {e}");
        }
        inputs += u64::from(BATCH);
        if started.elapsed() >= budget() {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzz {name}: {inputs} inputs in {secs:.1} s ({:.0}/s), no failure",
        inputs as f64 / secs
    );
}

#[test]
fn valid_samples_are_admitted_and_encoded_exactly() {
    fuzz("roundtrip", gen::valid_sample(), nodewatt_fuzz::roundtrip);
}

#[test]
fn hostile_messages() {
    fuzz("message", gen::hostile_message(), |(topic, payload)| {
        nodewatt_fuzz::message(topic, payload)
    });
}

#[test]
fn arbitrary_bytes_as_messages() {
    let bytes = proptest::collection::vec(proptest::num::u8::ANY, 0..4096);
    fuzz("message-bytes", bytes, |b| {
        nodewatt_fuzz::message("nodewatt/v1/c/n/sample", b)
    });
}

#[test]
fn registry_files() {
    fuzz("registry", gen::registry_file(), |t| {
        nodewatt_fuzz::registry(t)
    });
}

#[test]
fn agent_configs() {
    let configs =
        proptest::strategy::Union::new(gen::AGENT_CONFIGS.map(|c| gen::mutated_config(c).boxed()));
    fuzz("agent-config", configs, |t| nodewatt_fuzz::agent_config(t));
}

#[test]
fn collector_configs() {
    fuzz(
        "collector-config",
        gen::mutated_config(gen::COLLECTOR_CONFIG),
        |t| nodewatt_fuzz::collector_config(t),
    );
}
