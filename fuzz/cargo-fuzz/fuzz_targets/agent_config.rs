#![no_main]
//! Any text as an agent config.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = nodewatt_fuzz::agent_config(&text) {
        panic!("{e}");
    }
});
