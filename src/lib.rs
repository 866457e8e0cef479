//! ghmd: Gradient Harmonizing Mechanism weights as a service.
//!
//! `ghm` is the math, `jobs` the per-job state, `api` the gRPC surface, `server` the wiring;
//! `metrics`, `persist` and `probes` make it operable; `client` is a typed client. The binary's
//! `bench` and `health` commands are not part of the library (see ARCHITECTURE.md).

// No panic on a request path: a hostile or unlucky request must get a status, never take a
// worker thread (or the process) down. Tests may unwrap.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod allocator;
pub mod api;
pub mod auth;
pub mod client;
mod codec;
pub mod config;
pub mod engine;
pub mod eqlv2;
pub mod ghm;
pub mod jobs;
mod limit;
mod linger;
pub mod method;
mod metrics;
pub mod persist;
mod probes;
pub mod seesaw;
pub mod server;
mod share;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod transport;

#[cfg(test)]
mod synthetic;

/// The generated code of `proto/ghm/v1/ghm.proto`.
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("ghm.v1");

    /// The encoded descriptor set of the contract and its imports, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ghm_descriptor.bin"));
}
