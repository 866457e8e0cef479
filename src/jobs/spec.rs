//! What a job is created with, the bounds every job keeps (world size, step timeout), and the
//! job id's alphabet: each written once, for every way a spec comes in.

use std::time::Duration;

use super::JobError;
use crate::method::MethodSpec;

/// The most characters a job id may have.
pub const MAX_JOB_ID_LEN: usize = 128;

/// More ranks than any training cluster has; it bounds what one step may hold.
pub const MAX_WORLD_SIZE: u32 = 65536;

/// Everything a job is created with.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    /// What the job computes (GHM, Seesaw, EQLv2) and its parameters; nothing else in the spec
    /// depends on it.
    pub method: MethodSpec,
    /// 0 or 1: asynchronous; each request is a step of its own.
    pub world_size: u32,
    pub step_timeout: Duration,
    pub allow_partial_steps: bool,
}

impl JobSpec {
    /// The bounds every job keeps, checked wherever a spec comes in: `Registry::create` (field
    /// names prefixed `spec.`, with `--max-step-timeout`) and a job read from a state file (no
    /// prefix, and no step-timeout bound: a job saved before the operator lowered
    /// `--max-step-timeout` is kept as it was). The reason names the field.
    pub(super) fn check(
        &self,
        field_prefix: &str,
        max_step_timeout: Option<Duration>,
    ) -> Result<(), String> {
        check_world_size(&format!("{field_prefix}world_size"), self.world_size)?;
        if let Some(max) = max_step_timeout {
            check_step_timeout(
                &format!("{field_prefix}step_timeout"),
                self.step_timeout,
                max,
            )?;
        }
        Ok(())
    }

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

/// The world-size bound, the one place it is written; `field` names the value as the request
/// (or the state file) spells it.
pub fn check_world_size(field: &str, world_size: u32) -> Result<(), String> {
    if world_size > MAX_WORLD_SIZE {
        return Err(format!(
            "{field} = {world_size}: must be at most {MAX_WORLD_SIZE}"
        ));
    }
    Ok(())
}

/// The step-timeout bound: a zero timeout would abort every step at once, and `max` is the
/// operator's `--max-step-timeout`.
pub fn check_step_timeout(field: &str, timeout: Duration, max: Duration) -> Result<(), String> {
    if timeout.is_zero() || timeout > max {
        return Err(format!(
            "{field} = {timeout:?}: must be above 0 and at most {max:?} (--max-step-timeout)"
        ));
    }
    Ok(())
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
