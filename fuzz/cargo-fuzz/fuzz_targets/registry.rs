#![no_main]
//! Any text as a job file.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = nodewatt_fuzz::registry(&text) {
        panic!("{e}");
    }
});
