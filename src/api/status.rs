//! Domain errors to gRPC statuses, in one place, so that every refusal of the same kind has the
//! same code.

use tonic::{Code, Status};

use super::error_info::{JOB_NOT_HERE, RUN_ACTIVE, RUN_REPLACED, STALE_COPY, status_with_reason};
use crate::jobs::JobError;

/// The single place where domain errors become gRPC statuses. The errors a client heals from
/// (or must stop on) carry an ErrorInfo reason, with the copy's lineage where there is one.
impl From<JobError> for Status {
    fn from(error: JobError) -> Self {
        let (code, reason, lineage) = match &error {
            JobError::InvalidJobId { .. }
            | JobError::InvalidSpec(_)
            | JobError::Input { .. }
            | JobError::Method { .. }
            | JobError::InvalidRequest { .. } => (Code::InvalidArgument, None, None),
            JobError::NotFound { .. } => (Code::NotFound, Some(JOB_NOT_HERE), None),
            JobError::AlreadyExists { .. } => (Code::AlreadyExists, None, None),
            JobError::Aborted { .. } => (Code::Aborted, None, None),
            JobError::StepExpired { .. } | JobError::FailedPrecondition { .. } => {
                (Code::FailedPrecondition, None, None)
            }
            JobError::StaleCopy {
                generation, steps, ..
            } => (
                Code::FailedPrecondition,
                Some(STALE_COPY),
                Some((*generation, *steps)),
            ),
            JobError::RunActive {
                generation, steps, ..
            } => (
                Code::FailedPrecondition,
                Some(RUN_ACTIVE),
                Some((*generation, *steps)),
            ),
            JobError::RunReplaced {
                generation, steps, ..
            } => (
                Code::FailedPrecondition,
                Some(RUN_REPLACED),
                Some((*generation, *steps)),
            ),
            JobError::ResourceExhausted { .. } | JobError::ResponseTooLarge(_) => {
                (Code::ResourceExhausted, None, None)
            }
            JobError::Unavailable { .. } => (Code::Unavailable, None, None),
            JobError::Internal(_) => (Code::Internal, None, None),
        };
        let message = error.to_string();
        match reason {
            None => Status::new(code, message),
            Some(reason) => {
                let metadata: Vec<(&str, String)> = lineage
                    .map(|(generation, steps)| {
                        vec![
                            ("generation", generation.to_string()),
                            ("steps", steps.to_string()),
                        ]
                    })
                    .unwrap_or_default();
                status_with_reason(code, message, reason, &metadata)
            }
        }
    }
}

/// A request field the contract requires but the client left unset.
pub(super) fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}
