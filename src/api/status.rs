//! Domain errors to gRPC statuses, in one place, so that every refusal of the same kind has the
//! same code.

use tonic::{Code, Status};

use crate::jobs::JobError;

/// The single place where domain errors become gRPC statuses.
impl From<JobError> for Status {
    fn from(error: JobError) -> Self {
        let code = match &error {
            JobError::InvalidJobId { .. }
            | JobError::InvalidSpec(_)
            | JobError::Input { .. }
            | JobError::InvalidRequest { .. } => Code::InvalidArgument,
            JobError::NotFound { .. } => Code::NotFound,
            JobError::AlreadyExists { .. } => Code::AlreadyExists,
            JobError::Aborted { .. } => Code::Aborted,
            JobError::StepExpired { .. } | JobError::FailedPrecondition { .. } => {
                Code::FailedPrecondition
            }
            JobError::ResourceExhausted { .. } | JobError::ResponseTooLarge(_) => {
                Code::ResourceExhausted
            }
            JobError::Internal(_) => Code::Internal,
        };
        Status::new(code, error.to_string())
    }
}

/// A request field the contract requires but the client left unset.
pub(super) fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}
