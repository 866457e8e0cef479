//! ghmd's integration tests: one crate, so that the harness in `support` is written once and
//! the suite links once. Each module is a topic; `cargo test --test it TOPIC` runs one of them
//! (for example `cargo test --test it hostile::`).

mod support;

mod barrier;
mod bench;
mod concurrency;
mod conformance;
mod discovery;
mod failover;
mod faults;
mod fencing;
mod fuzz_regressions;
mod hardening;
mod health_command;
mod hostile;
mod lifecycle;
mod limits;
mod method_server;
mod methods;
mod metrics;
mod persistence;
mod process;
mod properties;
mod quotas;
mod security;
mod soak;
mod steps;
mod streams;
mod validation;
