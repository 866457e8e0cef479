//! Why the registry refused a request; `api::status` maps each kind to one gRPC code.

use crate::ghm::InputError;

/// Why the registry refused a request. Each variant maps to one gRPC status in `api::status`.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job_id {id:?} {reason}")]
    InvalidJobId { id: String, reason: &'static str },
    /// A spec, or a change to one, past the bounds every job keeps; the message names the field.
    #[error("{0}")]
    InvalidSpec(String),
    #[error("job {id:?} not found")]
    NotFound { id: String },
    #[error("job {id:?} already exists with another spec")]
    AlreadyExists { id: String },
    #[error("job {id:?}: {source}")]
    Input {
        id: String,
        #[source]
        source: InputError,
    },
    #[error("job {id:?}: {reason}")]
    InvalidRequest { id: String, reason: String },
    /// A step-synchronous step did not happen (timeout, a newer resend, restore, delete); the
    /// client may send it again.
    #[error("job {id:?}: {reason}")]
    Aborted { id: String, reason: String },
    /// A retry of a step whose table is no longer kept.
    #[error("job {id:?}: {reason}")]
    StepExpired { id: String, reason: String },
    #[error("job {id:?}: {reason}")]
    FailedPrecondition { id: String, reason: String },
    #[error("job {id:?}: {reason}")]
    ResourceExhausted { id: String, reason: String },
    /// The weights of a batch this large could not be sent back within `--max-send-message-bytes`;
    /// refused before its step is applied.
    #[error("{0}")]
    ResponseTooLarge(String),
    #[error("internal error: {0}")]
    Internal(String),
}
