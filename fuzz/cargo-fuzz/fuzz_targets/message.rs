#![no_main]
//! Any bytes as a sample message on a node's topic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = nodewatt_fuzz::message("nodewatt/v1/c1/n1/sample", data) {
        panic!("{e}");
    }
});
