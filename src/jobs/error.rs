//! Why the registry refused a request; `api::status` maps each kind to one gRPC code.

use crate::ghm::InputError;
use crate::method::MethodError;

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
    /// Fencing: this copy holds less than the caller saw, so it must not answer.
    #[error(
        "job {id:?}: this copy is stale: it is at generation {generation} with {steps} steps, \
         the request expects at least generation {expected_generation} with \
         {expected_steps} steps; reseed the job (ReseedJob) and send the request again"
    )]
    StaleCopy {
        id: String,
        generation: u64,
        steps: u64,
        expected_generation: u64,
        expected_steps: u64,
    },
    /// Another run still uses the job.
    #[error(
        "job {id:?} belongs to run {run_id:?}, whose last change was {idle:?} ago (less than \
         --run-takeover-after {takeover_after:?}): two live runs cannot share one job; use \
         another job_id, or wait until the other run has stopped"
    )]
    RunActive {
        id: String,
        run_id: String,
        idle: std::time::Duration,
        takeover_after: std::time::Duration,
        generation: u64,
        steps: u64,
    },
    /// The job was taken over by a newer run.
    #[error(
        "job {id:?} now belongs to run {run_id:?} (generation {generation}): this run was \
         replaced and must not reseed it"
    )]
    RunReplaced {
        id: String,
        run_id: String,
        generation: u64,
        steps: u64,
    },
    #[error("job {id:?} already exists with another spec")]
    AlreadyExists { id: String },
    #[error("job {id:?}: {source}")]
    Input {
        id: String,
        #[source]
        source: InputError,
    },
    /// A request or state the job's method refuses; the message names the field and index.
    #[error("job {id:?}: {source}")]
    Method {
        id: String,
        #[source]
        source: MethodError,
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
    /// This server cannot serve the request now (it is shutting down); another replica, or
    /// this one once back, can.
    #[error("job {id:?}: {reason}")]
    Unavailable { id: String, reason: String },
    /// The weights of a batch this large could not be sent back within `--max-send-message-bytes`;
    /// refused before its step is applied.
    #[error("{0}")]
    ResponseTooLarge(String),
    #[error("internal error: {0}")]
    Internal(String),
}
