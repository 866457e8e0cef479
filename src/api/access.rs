//! The one place that decides whether a caller may use a job. Every job-scoped RPC, and every
//! message of a stream, goes through [`authorize`]; ListJobs filters with [`Access::may_use`].

use tonic::{Request, Status};

use crate::auth::Access;
use crate::jobs::{Owner, validate_job_id};
use crate::share::caller_name;

/// The caller's access, as the authentication interceptor recorded it. A request that did not
/// pass the interceptor is refused rather than treated as open, so that a wiring mistake fails
/// closed.
pub(super) fn access_of<T>(request: &Request<T>) -> Result<Access, Status> {
    request
        .extensions()
        .get::<Access>()
        .cloned()
        .ok_or_else(|| {
            Status::unauthenticated("the request did not pass ghmd's authentication layer")
        })
}

/// INVALID_ARGUMENT for a malformed job id (before anything else, so that a hostile id is
/// never echoed whole), PERMISSION_DENIED for a job outside the caller's prefixes.
pub(super) fn authorize(access: &Access, job_id: &str) -> Result<(), Status> {
    validate_job_id(job_id)?;
    match access {
        Access::Open => Ok(()),
        Access::Caller(caller) if caller.may_use(job_id) => Ok(()),
        Access::Caller(caller) => Err(Status::permission_denied(format!(
            "job_id {job_id:?}: the token {:?} may only use jobs starting with {}",
            caller.name,
            caller
                .prefixes
                .iter()
                .map(|prefix| format!("{prefix:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Who a new job belongs to, for its quotas: the token's caller with the token's quotas, or on
/// an open server the peer's IP address (every port of one machine is one caller).
pub(super) fn owner_of<T>(access: &Access, request: &Request<T>) -> Owner {
    let caller = caller_name(access, request.remote_addr().map(|addr| addr.ip()));
    match access {
        Access::Caller(token) => Owner {
            caller,
            max_jobs: token.max_jobs,
            max_jobs_bytes: token.max_jobs_bytes,
        },
        Access::Open => Owner {
            caller,
            max_jobs: None,
            max_jobs_bytes: None,
        },
    }
}
