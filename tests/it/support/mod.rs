//! The harness every topic module of the integration tests shares, written once: a server in
//! this process and the real binary as a child process (both on port 0, their addresses read
//! back from what they bound), job specs, status assertions, TLS material, temporary
//! directories, a seeded generator, the conformance vectors, scrapes of `/metrics`, and the raw
//! HTTP/2 and protobuf wire for what a well-behaved client cannot send.

pub mod binary;
pub mod fixture;
pub mod http;
pub mod lineage;
pub mod request;
pub mod rng;
pub mod server;
pub mod spec;
pub mod status;
pub mod temp;
pub mod tls;
pub mod vectors;
pub mod weights;
pub mod wire;

pub use binary::Ghmd;
pub use rng::{Draw, SplitMix};
pub use server::TestServer;
pub use spec::{ghm_c, ghm_r, step_synchronous};
pub use status::assert_status;
pub use temp::TempDir;

/// Floats by their bits, so that comparisons are exact and -0.0 differs from 0.0.
pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Floats as the little-endian bytes the proto's `bytes` fields carry.
pub fn le(values: &[f32]) -> Vec<[u8; 4]> {
    values.iter().map(|v| v.to_le_bytes()).collect()
}
