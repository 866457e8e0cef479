//! The job registry: every training job's spec and EMA density, and how a request becomes a step.
//!
//! The registry is a cheap handle around `Arc<DashMap<..>>`. A request clones its job's `Arc`
//! out of the map and lets go of the shard at once, so no shard lock is ever held across an
//! await or across the O(elements) kernel passes; a job's own lock is held only while its
//! O(bins) density update runs.
//!
//! `registry` holds the jobs and checks a request's size limits; `job` is one job and how a
//! request becomes its step; `sync` is the step barrier of step-synchronous jobs, which knows
//! nothing of the job, and `step_sum` how a GHM step sums its ranks' counts in it; `budget` what jobs and callers may hold; `spec` holds the bounds every job keeps.

mod budget;
mod error;
mod job;
mod lineage;
mod observer;
mod registry;
mod spec;
mod step_sum;
mod sync;

pub use budget::{Owner, Quota};
pub use error::JobError;
pub use job::{AppliedStep, BatchInput, Job, JobSnapshot, JobUpdate, StepInput, StepOutcome};
pub use lineage::{
    Counters, Fence, MAX_RUN_ID_LEN, Reseed, ReseedOutcome, SeedState, SeedStep, validate_run_id,
};
pub use observer::{NoObserver, StepObserver};
pub use registry::{ListPage, Registry, RegistryLimits};
pub use spec::{
    JobSpec, MAX_JOB_ID_LEN, MAX_WORLD_SIZE, check_step_timeout, check_world_size, validate_job_id,
};
pub use sync::WorldSizeChange;
