use std::time::Duration;

use super::JobError;
use crate::ghm;

/// The most characters a job id may have.
pub const MAX_JOB_ID_LEN: usize = 128;

/// More ranks than any training cluster has; it bounds what one step may hold.
pub const MAX_WORLD_SIZE: u32 = 65536;

/// Everything a job is created with.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    pub ghm: ghm::Spec,
    /// 0 or 1: asynchronous; each request is a step of its own.
    pub world_size: u32,
    pub step_timeout: Duration,
    pub allow_partial_steps: bool,
}

impl JobSpec {
    pub fn is_step_synchronous(&self) -> bool {
        self.world_size > 1
    }

    /// World sizes 0 and 1 mean the same (asynchronous); jobs keep 1, so that CreateJob's
    /// idempotency check does not tell them apart.
    pub fn normalized(mut self) -> Self {
        self.world_size = self.world_size.max(1);
        self
    }
}

/// Job ids appear in metric labels, file names and log lines, so they are kept to a safe
/// alphabet; '/' lets teams namespace their jobs.
pub fn validate_job_id(id: &str) -> Result<(), JobError> {
    let reason = if id.is_empty() {
        "is empty"
    } else if id.len() > MAX_JOB_ID_LEN {
        "is longer than 128 characters"
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
    {
        "may only hold the characters [A-Za-z0-9._/-]"
    } else {
        return Ok(());
    };
    Err(JobError::InvalidJobId {
        id: truncate_for_message(id),
        reason,
    })
}

/// A hostile id may be megabytes long; error messages quote only its start.
fn truncate_for_message(id: &str) -> String {
    const SHOWN: usize = 64;
    match id.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}...", &id[..cut]),
        None => id.to_owned(),
    }
}
