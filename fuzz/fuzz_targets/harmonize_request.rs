//! Request decode + validate + weigh, through the real service. See `harness/harmonize.rs`.
#![no_main]

#[path = "../harness/harmonize.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run(data);
});
