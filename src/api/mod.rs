//! The gRPC surface: proto messages to domain types and back, and errors to statuses. It knows
//! nothing of bins; the registry and the math below it know nothing of gRPC.

mod access;
mod convert;
mod harmonizer;
mod status;

pub use harmonizer::HarmonizerService;
