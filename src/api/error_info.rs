//! The machine-readable reasons (`google.rpc.ErrorInfo`, domain "ghm.v1") that let a client
//! tell "reseed and resend" from "give up" without parsing messages; the proto lists them.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub const DOMAIN: &str = "ghm.v1";

/// The call's `x-ghmd-job` header names another job than its message (or than its stream's).
pub const JOB_HEADER_MISMATCH: &str = "JOB_HEADER_MISMATCH";
/// `--require-job-header` is set and the call has no `x-ghmd-job` header.
pub const JOB_HEADER_MISSING: &str = "JOB_HEADER_MISSING";
/// This replica has no copy of the job.
pub const JOB_NOT_HERE: &str = "JOB_NOT_HERE";
/// This replica's copy holds less than the caller saw.
pub const STALE_COPY: &str = "STALE_COPY";
/// Another run is using the job.
pub const RUN_ACTIVE: &str = "RUN_ACTIVE";
/// The job now belongs to a newer run.
pub const RUN_REPLACED: &str = "RUN_REPLACED";

/// A status carrying an ErrorInfo with `reason` and `metadata`.
pub fn status_with_reason(
    code: Code,
    message: impl Into<String>,
    reason: &str,
    metadata: &[(&str, String)],
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect();
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, metadata),
    )
}

/// The ErrorInfo reason of a status from ghmd, if it carries one.
pub fn reason_of(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .filter(|info| info.domain == DOMAIN)
        .map(|info| info.reason.clone())
}

/// A metadata value of a status's ErrorInfo (e.g. "generation" of a STALE_COPY).
pub fn metadata_of(status: &Status, key: &str) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .and_then(|info| info.metadata.get(key).cloned())
}
