//! The gRPC surface: proto messages to domain types and back, and errors to statuses. It knows
//! nothing of bins; the registry and the math below it know nothing of gRPC.

mod access;
pub(crate) mod convert;
pub mod error_info;
mod harmonizer;
pub mod routing;
mod status;

pub use harmonizer::{DEFAULT_RUN_TAKEOVER_AFTER, HarmonizerService};
pub use routing::{JOB_HEADER, Routing, RoutingObserver};
