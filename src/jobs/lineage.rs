//! A job's lineage and what keeps a stale copy from answering: the generation, fencing,
//! reseeding and run identity (the rules are written in the proto, at ReseedJobRequest and
//! above HarmonizeRequest).
//!
//! A copy of a job can fall behind its clients: a replica that died and came back from an older
//! snapshot, one that was paused while the job moved elsewhere, a crash that lost the steps
//! after the last snapshot. The generation tells such copies apart from the one the clients
//! follow, so that a stale copy refuses instead of answering with weights nobody else would
//! give, and the clients can put the job back where they last saw it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::budget::JobCharge;
use super::job::{AppliedStep, Job, JobContext};
use super::{JobError, JobSnapshot, JobSpec, StepObserver};
use crate::method::{AnyState, GhmStepInput, StateInput};

/// The most characters a run id may have (the same bound as a job id).
pub const MAX_RUN_ID_LEN: usize = 128;

/// A job's counters and lineage right after one step, as every response reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub generation: u64,
    pub steps: u64,
    pub elements: u64,
    pub next_step: u64,
}

/// The lineage a request expects its copy to hold; the default asks for no fencing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fence {
    pub generation: u64,
    pub steps: u64,
}

impl Fence {
    pub fn is_active(self) -> bool {
        self.generation > 0
    }
}

/// The state a client last acknowledged, to reseed a copy with.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedState {
    /// The method's statistic. A GHM `acc_sum` may be empty for a job without EMA (momentum
    /// 0): its responses carry none.
    pub state: StateInput,
    pub steps: u64,
    pub elements: u64,
    pub next_step: u64,
    /// 0: the caller never saw one.
    pub generation: u64,
}

/// The last applied step as a response reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedStep {
    pub step: u64,
    /// GHM's table; empty for the other methods.
    pub ghm: GhmStepInput,
    /// The other methods' state after the step; `None` for GHM.
    pub method_state: Option<StateInput>,
    pub missing_ranks: Vec<u32>,
}

/// Everything a ReseedJob asks for.
#[derive(Clone, Debug)]
pub struct Reseed {
    pub spec: JobSpec,
    pub run_id: String,
    pub state: SeedState,
    pub last_step: Option<SeedStep>,
}

/// What a ReseedJob did, for its log line and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReseedOutcome {
    /// There was no copy: one was created.
    Created,
    /// The copy was stale and was replaced.
    Replaced,
    /// The copy already held everything the caller saw.
    Unchanged,
    /// The request was turned down (another run, another spec, a bad state, no room).
    Refused,
}

impl ReseedOutcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Replaced => "replaced",
            Self::Unchanged => "unchanged",
            Self::Refused => "refused",
        }
    }
}

/// Run ids go into log lines and the state file: the job id's safe alphabet, and may be empty.
pub fn validate_run_id(job_id: &str, run_id: &str) -> Result<(), JobError> {
    let reason = if run_id.len() > MAX_RUN_ID_LEN {
        format!(
            "run_id has {} characters: at most {MAX_RUN_ID_LEN}",
            run_id.len()
        )
    } else if let Some((index, c)) = run_id
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')))
    {
        format!("run_id[{index}] = {c:?}: a run id may only hold the characters [A-Za-z0-9._/-]")
    } else {
        return Ok(());
    };
    Err(JobError::InvalidRequest {
        id: job_id.to_owned(),
        reason,
    })
}

/// Refuses a request whose client saw more than this copy, at `lineage` (generation, steps),
/// holds: such a copy must never answer with weights.
pub(super) fn check_fence(
    id: &str,
    (generation, steps): (u64, u64),
    fence: Fence,
    observer: &dyn StepObserver,
) -> Result<(), JobError> {
    if !fence.is_active() || (generation >= fence.generation && steps >= fence.steps) {
        return Ok(());
    }
    observer.fenced_refusal(false);
    Err(JobError::StaleCopy {
        id: id.to_owned(),
        generation,
        steps,
        expected_generation: fence.generation,
        expected_steps: fence.steps,
    })
}

impl Job {
    /// A copy put in place by ReseedJob: the state its caller acknowledged, and the last step
    /// that state came from, kept for retries. `spec` is the reseed's, normalized, and
    /// `checked` what [`check_reseed`] made of the reseed's state and last step.
    pub(super) fn seeded(
        id: &str,
        spec: JobSpec,
        reseed: &Reseed,
        checked: CheckedSeed,
        generation: u64,
        context: Arc<JobContext>,
        charge: JobCharge,
    ) -> Result<Self, JobError> {
        let (run_id, state, last_step) = (&reseed.run_id, &reseed.state, reseed.last_step.as_ref());
        let now = SystemTime::now();
        let (seeded_state, last_table) = checked;
        let job = Self::from_snapshot(
            JobSnapshot {
                id: id.to_owned(),
                world_size_schedule: Vec::new(),
                spec,
                state: seeded_state,
                steps: state.steps,
                elements: state.elements,
                next_step: state.next_step,
                generation,
                run_id: run_id.to_owned(),
                create_time: now,
                update_time: now,
            },
            context,
            charge,
        )?;
        if let (Some(last), Some((table, acc_sum))) = (last_step, last_table) {
            let counters = Counters {
                generation,
                steps: state.steps,
                elements: state.elements,
                next_step: state.next_step,
            };
            job.keep_applied(
                last.step,
                AppliedStep {
                    table,
                    acc_sum,
                    missing_ranks: last.missing_ranks.clone(),
                    counters,
                },
            );
        }
        Ok(job)
    }
}

/// A table of the last step as the job keeps it, with the `acc_sum` its response reported.
type LastTable = (crate::method::AnyTable, Vec<f32>);

/// A reseed's state and last step, checked against the job's spec.
pub(super) type CheckedSeed = (AnyState, Option<LastTable>);

/// Every check of a ReseedJob's state and last step, made before anything changes; gives the
/// state to put in place and the last step's table.
pub(super) fn check_reseed(
    id: &str,
    spec: &JobSpec,
    state: &SeedState,
    last_step: Option<&SeedStep>,
) -> Result<CheckedSeed, JobError> {
    check_seed(id, spec, state)?;
    let method_error = |source| JobError::Method {
        id: id.to_owned(),
        source,
    };
    let seeded = spec
        .method
        .state_from_input(state.state.clone(), true)
        .map_err(method_error)?;
    let last_table = match last_step {
        Some(last) => {
            check_last_step(id, spec, state, last)?;
            Some(
                spec.method
                    .last_table(&last.ghm, last.method_state.clone(), &seeded)
                    .map_err(method_error)?,
            )
        }
        None => None,
    };
    Ok((seeded, last_table))
}

/// The checks RestoreJob makes of a state, with ReseedJob's field names.
fn check_seed(id: &str, spec: &JobSpec, state: &SeedState) -> Result<(), JobError> {
    let invalid = |reason: String| JobError::InvalidRequest {
        id: id.to_owned(),
        reason,
    };
    if state.next_step == u64::MAX {
        return Err(invalid(
            "state.next_step = 18446744073709551615: steps must stay below 2^64 - 1".to_owned(),
        ));
    }
    if !spec.is_step_synchronous() && state.next_step != 0 {
        return Err(invalid(format!(
            "state.next_step = {}: only step-synchronous jobs have a next step; leave it 0",
            state.next_step
        )));
    }
    if state.generation == u64::MAX {
        return Err(invalid(
            "state.generation = 18446744073709551615: no generation can follow it".to_owned(),
        ));
    }
    Ok(())
}

/// The last step must be the one just before `state.next_step`, of a step-synchronous job; its
/// table is the method's to check (`MethodSpec::last_table`). It is what a retry of that step
/// will be answered with.
fn check_last_step(
    id: &str,
    spec: &JobSpec,
    state: &SeedState,
    last: &SeedStep,
) -> Result<(), JobError> {
    let invalid = |reason: String| JobError::InvalidRequest {
        id: id.to_owned(),
        reason,
    };
    if !spec.is_step_synchronous() {
        return Err(invalid(
            "last_step: only step-synchronous jobs answer retries of an applied step; leave it \
             unset"
                .to_owned(),
        ));
    }
    if state.next_step == 0 || last.step != state.next_step - 1 {
        return Err(invalid(format!(
            "last_step.step = {}: must be state.next_step - 1 (state.next_step = {})",
            last.step, state.next_step
        )));
    }
    if let Some((index, rank)) = last
        .missing_ranks
        .iter()
        .enumerate()
        .find(|(_, rank)| **rank >= spec.world_size)
    {
        return Err(invalid(format!(
            "last_step.missing_ranks[{index}] = {rank}: the job has world_size {}",
            spec.world_size
        )));
    }
    Ok(())
}

/// Whether a job whose state last changed `idle` ago (None: a step is waiting) may be taken
/// over by another run.
pub(super) fn may_take_over(idle: Option<Duration>, takeover_after: Duration) -> bool {
    idle.is_some_and(|idle| idle >= takeover_after)
}
