//! The state file loader: decode, round trip, load into a registry, use. See
//! `harness/snapshot.rs`.
#![no_main]

#[path = "../harness/snapshot.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run(data);
});
