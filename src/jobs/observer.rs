//! The registry's report of what happens to jobs, for the metrics to count without the
//! registry knowing of Prometheus.

use std::time::Duration;

use super::ReseedOutcome;
use crate::method::MethodKind;

/// What the registry reports as steps happen, so that the metrics module can count them without
/// the registry knowing anything of Prometheus. Every method has a no-op default.
pub trait StepObserver: Send + Sync + 'static {
    /// A step was applied to a job's statistic: `samples` were counted into it (GHM's valid
    /// elements, Seesaw's samples, 0 for EQLv2), `missing_ranks` ranks were absent (a partial
    /// step) and `ranks` took part.
    fn step_applied(
        &self,
        _method: MethodKind,
        _samples: u64,
        _ranks: usize,
        _missing_ranks: usize,
    ) {
    }

    /// One request's elements were weighed (the raw path; histogram inputs weigh none).
    fn elements_weighed(&self, _method: MethodKind, _elements: u64) {}

    /// A step-synchronous step became complete: how long it waited, from its first request to
    /// its last rank's.
    fn last_rank_wait(&self, _wait: Duration) {}

    /// A step-synchronous step was aborted because a rank did not send in time.
    fn step_timed_out(&self) {}

    /// The number of jobs of a method changed by `delta` (created, deleted, restored, reaped).
    fn jobs_changed(&self, _method: MethodKind, _delta: i64) {}

    /// `count` jobs were deleted for being idle longer than the job TTL.
    fn jobs_reaped(&self, _count: u64) {}

    /// A ReseedJob ended with `outcome`.
    fn job_reseeded(&self, _outcome: ReseedOutcome) {}

    /// A fenced request was refused: the copy is stale (`not_here` false) or absent (true).
    fn fenced_refusal(&self, _not_here: bool) {}

    /// A new run took a job over from an inactive one.
    fn run_taken_over(&self) {}
}

/// The observer of a registry nobody watches.
pub struct NoObserver;

impl StepObserver for NoObserver {}
