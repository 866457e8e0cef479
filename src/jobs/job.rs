//! One job: its spec, its EMA density and counters, and how a request becomes a step, at once
//! for an asynchronous job, through the step barrier (`sync`) for a step-synchronous one. The
//! job's lock is held only for the O(bins) fold of a step and the barrier's bookkeeping; the
//! O(elements) passes run outside it, large ones on the blocking pool.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;

use super::budget::{self, JobCharge};
use super::lineage::{Counters, Fence, check_fence};
use super::step_sum::StepTotal;
use super::sync::{
    Deadline, Deliveries, JoinRefusal, Joined, ReadyStep, ScheduleRefusal, StepBarrier,
    StepFailure, StepResult, WorldSizeChange,
};
use super::{JobError, JobSpec, StepObserver, check_world_size};
pub use crate::method::BatchInput;
use crate::method::{
    AnyContribution, AnyState, AnyTable, JobMethod, Method, MethodError, MethodKind, MethodSpec,
    Prepared, StateInput,
};

#[derive(Clone, Debug)]
pub struct StepInput {
    pub step: u64,
    pub rank: u32,
    pub batch: BatchInput,
    /// Little-endian float32 per element; `None` means all 1.
    pub label_weights: Option<Bytes>,
}

/// The outcome of one applied step, the same for every rank that took part in it.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedStep {
    pub table: AnyTable,
    /// GHM's density after the step; empty when the job has no EMA, and for other methods
    /// (whose table is their state).
    pub acc_sum: Vec<f32>,
    /// Ranks the step was applied without (partial steps only).
    pub missing_ranks: Vec<u32>,
    /// The job's counters right after the step, kept with the table so that a retry reports
    /// them as they were.
    pub counters: Counters,
}

/// One request's answer: the shared step outcome plus this request's own element weights.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    pub step: u64,
    /// Little-endian float32 per input element; `None` for a histogram input.
    pub weights: Option<Vec<u8>>,
    pub applied: Arc<AppliedStep>,
}

/// A job's spec and state as of one moment, for GetJob, ListJobs and snapshots.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSnapshot {
    pub id: String,
    /// `spec.world_size` is the latest world size decided (the last entry of the schedule).
    pub spec: JobSpec,
    /// The method's statistic, of the spec's method.
    pub state: AnyState,
    pub steps: u64,
    pub elements: u64,
    /// Step-synchronous jobs: the next step to apply; 0 for asynchronous jobs.
    pub next_step: u64,
    /// Step-synchronous jobs: the world size from each step on, oldest first, starting at or
    /// before `next_step`; empty for asynchronous jobs.
    pub world_size_schedule: Vec<WorldSizeChange>,
    /// The lineage's generation (>= 1): see `lineage`.
    pub generation: u64,
    /// The training run that owns the job; empty if none was given.
    pub run_id: String,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
}

/// The registry-wide things a job needs while it runs, shared by every job.
pub(super) struct JobContext {
    pub observer: Arc<dyn StepObserver>,
    /// Applied steps whose tables are kept for retries.
    pub kept_steps: usize,
    /// Steps a job may have waiting at once.
    pub max_pending_steps: usize,
    /// Batches with more elements than this are weighed on the blocking pool.
    pub offload_elements: usize,
    /// Set once the server drains: no rank may join a step any more (see `Job::drain`).
    pub draining: AtomicBool,
}

/// What `UpdateJob` may change.
#[derive(Clone, Debug, Default)]
pub struct JobUpdate {
    pub world_size: Option<WorldSizeChange>,
    pub step_timeout: Option<Duration>,
    pub allow_partial_steps: Option<bool>,
}

/// The step barrier of a job: each rank's contribution is added to its step's total, every rank
/// of a step gets the step's applied outcome.
type Barrier = StepBarrier<StepTotal, Arc<AppliedStep>>;

/// What the steps of a job have made of it.
struct Progress {
    state: AnyState,
    steps: u64,
    elements: u64,
    /// The lineage's generation: advanced when the state is put in place from outside.
    generation: u64,
    update_time: SystemTime,
}

struct JobState {
    progress: Progress,
    step_timeout: Duration,
    allow_partial_steps: bool,
    /// Some iff the job is step-synchronous; boxed so that an idle asynchronous job stays small.
    sync: Option<Box<Barrier>>,
}

pub struct Job {
    id: String,
    method: JobMethod,
    run_id: String,
    create_time: SystemTime,
    context: Arc<JobContext>,
    /// The job's bytes, charged to the server and to its owner until the job is dropped.
    charge: JobCharge,
    /// A `parking_lot` mutex and not a tokio one: it is never held across an await, and the
    /// critical sections are O(bins) updates, so blocking briefly beats a queue of wakers.
    state: Mutex<JobState>,
}

impl Job {
    pub(super) fn new(
        id: String,
        spec: JobSpec,
        run_id: String,
        generation: u64,
        context: Arc<JobContext>,
        charge: JobCharge,
    ) -> Self {
        let now = SystemTime::now();
        let sync = spec.is_step_synchronous().then(|| {
            Box::new(Barrier::new(
                spec.world_size,
                0,
                Vec::new(),
                context.kept_steps,
                StepTotal::new(&spec.method),
            ))
        });
        Self {
            state: Mutex::new(JobState {
                progress: Progress {
                    state: spec.method.initial_state(),
                    steps: 0,
                    elements: 0,
                    generation,
                    update_time: now,
                },
                step_timeout: spec.step_timeout,
                allow_partial_steps: spec.allow_partial_steps,
                sync,
            }),
            id,
            method: JobMethod::new(spec.method),
            run_id,
            create_time: now,
            context,
            charge,
        }
    }

    /// A job as a snapshot recorded it, checked as strictly as a RestoreJob request.
    pub(super) fn from_snapshot(
        snapshot: JobSnapshot,
        context: Arc<JobContext>,
        charge: JobCharge,
    ) -> Result<Self, JobError> {
        snapshot
            .spec
            .method
            .check_state(&snapshot.state)
            .map_err(|source| JobError::Method {
                id: snapshot.id.clone(),
                source,
            })?;
        // A state file is input too: a world size past the API's limit would make every step
        // of the job list billions of missing ranks (the fuzzer found it).
        snapshot
            .spec
            .check("", None)
            .and_then(|()| {
                snapshot
                    .world_size_schedule
                    .iter()
                    .try_for_each(|change| check_world_size("world_size", change.world_size))
            })
            .map_err(|reason| JobError::InvalidRequest {
                id: snapshot.id.clone(),
                reason,
            })?;
        let sync = snapshot.spec.is_step_synchronous().then(|| {
            Box::new(Barrier::new(
                snapshot.spec.world_size,
                snapshot.next_step,
                snapshot.world_size_schedule.clone(),
                context.kept_steps,
                StepTotal::new(&snapshot.spec.method),
            ))
        });
        Ok(Self {
            state: Mutex::new(JobState {
                progress: Progress {
                    state: snapshot.state,
                    steps: snapshot.steps,
                    elements: snapshot.elements,
                    // A state file from before generations holds generation 0: its jobs start
                    // the lineage at 1, as if created.
                    generation: snapshot.generation.max(1),
                    update_time: snapshot.update_time,
                },
                step_timeout: snapshot.spec.step_timeout,
                allow_partial_steps: snapshot.spec.allow_partial_steps,
                sync,
            }),
            id: snapshot.id,
            method: JobMethod::new(snapshot.spec.method),
            run_id: snapshot.run_id,
            create_time: snapshot.create_time,
            context,
            charge,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The bytes the job is charged: its fixed part and its pending steps (see `budget`).
    pub fn memory_bytes(&self) -> usize {
        self.charge.bytes()
    }

    pub fn kind(&self) -> MethodKind {
        self.method.spec().kind()
    }

    pub fn method(&self) -> &MethodSpec {
        self.method.spec()
    }

    pub fn spec(&self) -> JobSpec {
        let state = self.state.lock();
        self.spec_locked(&state)
    }

    fn spec_locked(&self, state: &JobState) -> JobSpec {
        JobSpec {
            method: *self.method.spec(),
            world_size: state
                .sync
                .as_ref()
                .map_or(1, |sync| sync.latest_world_size()),
            step_timeout: state.step_timeout,
            allow_partial_steps: state.allow_partial_steps,
        }
    }

    /// How long the job has gone without a step, an update or a restore at `now`; `None`
    /// while a step-synchronous step waits for ranks, since such a job is in use.
    pub(super) fn idle_for(&self, now: SystemTime) -> Option<Duration> {
        let state = self.state.lock();
        if state.sync.as_ref().is_some_and(|sync| sync.has_pending()) {
            return None;
        }
        // A clock that went back makes the job look fresh, never stale.
        Some(
            now.duration_since(state.progress.update_time)
                .unwrap_or(Duration::ZERO),
        )
    }

    pub fn is_step_synchronous(&self) -> bool {
        self.state.lock().sync.is_some()
    }

    pub fn snapshot(&self) -> JobSnapshot {
        let state = self.state.lock();
        let (next_step, world_size_schedule) = match &state.sync {
            Some(sync) => (sync.next_step(), sync.schedule().to_vec()),
            None => (0, Vec::new()),
        };
        JobSnapshot {
            id: self.id.clone(),
            spec: self.spec_locked(&state),
            state: state.progress.state.clone(),
            steps: state.progress.steps,
            elements: state.progress.elements,
            next_step,
            world_size_schedule,
            generation: state.progress.generation,
            run_id: self.run_id.clone(),
            create_time: self.create_time,
            update_time: state.progress.update_time,
        }
    }

    fn method_error(&self, source: MethodError) -> JobError {
        JobError::Method {
            id: self.id.clone(),
            source,
        }
    }

    fn invalid_request(&self, reason: impl Into<String>) -> JobError {
        JobError::InvalidRequest {
            id: self.id.clone(),
            reason: reason.into(),
        }
    }

    /// Pass one, outside any lock: checks the request against the job and takes out its
    /// contribution.
    fn prepare(&self, input: &StepInput) -> Result<(Prepared, AnyContribution), JobError> {
        self.method
            .prepare(&input.batch, input.label_weights.as_deref())
            .map_err(|e| self.method_error(e))
    }

    /// The one place a job's statistic changes: called with the job's lock held. A total the
    /// method refuses to fold changes nothing.
    fn apply_locked(
        &self,
        progress: &mut Progress,
        total: &AnyContribution,
        ranks: usize,
        missing_ranks: Vec<u32>,
        next_step_after: u64,
    ) -> Result<Arc<AppliedStep>, MethodError> {
        let method = self.method.spec();
        let table = method.fold(&mut progress.state, total)?;
        let samples = total.samples();
        // Saturating like `elements`: a restored or loaded job may start at u64::MAX.
        progress.steps = progress.steps.saturating_add(1);
        progress.elements = progress.elements.saturating_add(samples);
        progress.update_time = SystemTime::now();
        self.context
            .observer
            .step_applied(method.kind(), samples, ranks, missing_ranks.len());
        Ok(Arc::new(AppliedStep {
            table,
            acc_sum: method.reported_acc_sum(&progress.state),
            missing_ranks,
            counters: Counters {
                generation: progress.generation,
                steps: progress.steps,
                elements: progress.elements,
                next_step: next_step_after,
            },
        }))
    }

    /// Pass two, outside any lock: this request's element weights from its step's table.
    fn weigh(&self, batch: &Prepared, table: &AnyTable) -> Option<Vec<u8>> {
        let weights = batch.weigh(table)?;
        self.context
            .observer
            .elements_weighed(self.kind(), batch.element_count() as u64);
        Some(weights)
    }

    /// An asynchronous step: prepared, applied and weighed at once.
    fn run_async_step(&self, input: &StepInput, fence: Fence) -> Result<StepOutcome, JobError> {
        if input.rank != 0 {
            return Err(self.invalid_request(format!(
                "rank = {}: an asynchronous job has only rank 0",
                input.rank
            )));
        }
        // One rank's checked contribution is its step's total: a reduction of one is itself.
        let (batch, total) = self.prepare(input)?;
        let applied = {
            let mut state = self.state.lock();
            self.check_fence(&state.progress, fence)?;
            self.apply_locked(&mut state.progress, &total, 1, Vec::new(), 0)
                .map_err(|e| self.method_error(e))?
        };
        let weights = self.weigh(&batch, &applied.table);
        Ok(StepOutcome {
            step: input.step,
            weights,
            applied,
        })
    }

    /// Weighs one request. Large batches go to the blocking pool; the job's lock is only taken
    /// for the O(bins) density update in the middle, so concurrent requests on one job apply
    /// one after another and never mix.
    pub(super) async fn harmonize(
        self: Arc<Self>,
        input: StepInput,
        fence: Fence,
    ) -> Result<StepOutcome, JobError> {
        // Checked before any work, and again where the request joins its step: a stale copy
        // must not even bin a batch it will never answer.
        self.check_fence(&self.state.lock().progress, fence)?;
        let large = input.batch.element_count() > self.context.offload_elements;
        if !self.is_step_synchronous() {
            if !large {
                return self.run_async_step(&input, fence);
            }
            return offload(move || self.run_async_step(&input, fence)).await?;
        }

        let (step, rank) = (input.step, input.rank);
        let (batch, contribution) = if large {
            let job = Arc::clone(&self);
            offload(move || job.prepare(&input)).await??
        } else {
            let prepared = self.prepare(&input)?;
            // Not held while the step waits: a histogram of 4,096 bins is 32 KiB, and the
            // step's sum already has its counts.
            drop(input);
            prepared
        };
        let applied = match self.contribute(step, rank, contribution, fence)? {
            Joined::Applied(applied) => applied,
            Joined::Waiting(receiver) => receiver
                .await
                .map_err(|_| self.step_dropped(step))?
                .map_err(|failure| self.step_failed(step, failure))?,
        };
        let weights = if batch.element_count() > self.context.offload_elements {
            let job = Arc::clone(&self);
            let table_owner = Arc::clone(&applied);
            offload(move || job.weigh(&batch, &table_owner.table)).await?
        } else {
            self.weigh(&batch, &applied.table)
        };
        Ok(StepOutcome {
            step,
            weights,
            applied,
        })
    }
}

/// Step-synchronous jobs: driving the barrier under the job's lock, its timers, and the
/// changes UpdateJob, RestoreJob and DeleteJob make.
impl Job {
    fn sync_error(&self, reason: &str) -> JobError {
        JobError::Internal(format!("job {:?}: {reason}", self.id()))
    }

    fn step_failed(&self, step: u64, failure: StepFailure) -> JobError {
        let id = self.id().to_owned();
        let reason = match failure {
            StepFailure::TimedOut { missing, timeout } => format!(
                "step {step} aborted: rank(s) {} did not send it within the step_timeout of \
                 {timeout:?}; nothing was applied, send the step again",
                ranks_list(&missing)
            ),
            StepFailure::Blocked { head, timeout } => format!(
                "step {step} aborted: it was complete, but step {head} (the job's next step) did \
                 not complete within the step_timeout of {timeout:?}; nothing was applied, send \
                 step {head} and then this step again"
            ),
            StepFailure::Superseded => format!(
                "step {step}: the same rank sent this step again; the newer request replaced \
                 this one"
            ),
            StepFailure::Restored => {
                format!("step {step} aborted: the job was restored from a checkpoint meanwhile")
            }
            StepFailure::Draining => return self.draining_error(step),
            StepFailure::Replaced => format!(
                "step {step} aborted: this copy of the job was replaced (reseeded, or taken over \
                 by a new run) while the step waited; send it again"
            ),
            StepFailure::Deleted => {
                format!("step {step} aborted: the job was deleted while the step waited")
            }
            StepFailure::Refused { reason } => {
                return JobError::InvalidRequest {
                    id,
                    reason: format!(
                        "step {step} refused, nothing was applied and the step is not done: \
                         {reason}"
                    ),
                };
            }
        };
        JobError::Aborted { id, reason }
    }

    fn step_dropped(&self, step: u64) -> JobError {
        self.step_failed(step, StepFailure::Deleted)
    }

    /// Adds one rank's contribution to its step, applies every step that is now ready in order,
    /// and tells the caller how to get its step's outcome.
    fn contribute(
        self: &Arc<Self>,
        step: u64,
        rank: u32,
        contribution: AnyContribution,
        fence: Fence,
    ) -> Result<Joined<Arc<AppliedStep>>, JobError> {
        let (joined, new_attempt, deliveries) = {
            let mut state = self.state.lock();
            let timeout = state.step_timeout;
            self.check_fence(&state.progress, fence)?;
            // Checked under the lock `drain` takes, so that no rank joins a step after the
            // drain failed the pending ones.
            if self.context.draining.load(Ordering::SeqCst) {
                return Err(self.draining_error(step));
            }
            let JobState { progress, sync, .. } = &mut *state;
            let Some(sync) = sync.as_mut() else {
                return Err(self.sync_error("not step-synchronous"));
            };
            let limit = self.charge.pending_limit();
            let (joined, new_attempt) = sync
                .join(
                    step,
                    rank,
                    contribution,
                    self.context.max_pending_steps,
                    limit.bytes,
                )
                .map_err(|refusal| self.join_refused(step, rank, refusal, &limit.decided_by))?;
            let deliveries = sync.apply_ready(|ready| self.apply_ready_step(progress, ready));
            self.charge.set_pending(sync.pending_bytes());
            (
                joined,
                new_attempt.map(|generation| (generation, timeout)),
                deliveries,
            )
        };
        deliver(deliveries);
        if let Some((generation, timeout)) = new_attempt {
            self.arm_deadline(step, generation, timeout);
        }
        Ok(joined)
    }

    fn join_refused(
        &self,
        step: u64,
        rank: u32,
        refusal: JoinRefusal,
        bytes_decided_by: &str,
    ) -> JobError {
        match refusal {
            JoinRefusal::Expired { next_step } => JobError::StepExpired {
                id: self.id().to_owned(),
                reason: format!(
                    "step {step} was applied, and its table is no longer kept: the job is at \
                     step {next_step} and keeps the last {kept} (--kept-steps)",
                    kept = self.context.kept_steps
                ),
            },
            JoinRefusal::ReservedStep => self.invalid_request(
                "step = 18446744073709551615: the last step number is reserved; steps must stay \
                 below 2^64 - 1",
            ),
            JoinRefusal::RankOutOfRange { world_size } => self.invalid_request(format!(
                "rank = {rank}: step {step} has world_size {world_size}, so ranks are 0 to {}",
                world_size.saturating_sub(1)
            )),
            JoinRefusal::TooManyPending { pending, next_step } => JobError::ResourceExhausted {
                id: self.id().to_owned(),
                reason: format!(
                    "{pending} steps are already pending, the limit (--max-pending-steps {}); \
                     step {next_step} must complete first",
                    self.context.max_pending_steps,
                ),
            },
            JoinRefusal::TooManyBytes {
                pending_bytes,
                needed,
                limit,
            } => JobError::ResourceExhausted {
                id: self.id().to_owned(),
                reason: format!(
                    "rank {rank}'s contribution to step {step} needs {needed} bytes, but the \
                     job's pending steps hold {pending_bytes} of the {limit} they may \
                     ({bytes_decided_by}); pending steps must complete first"
                ),
            },
        }
    }

    /// The job's side of a ready step: the ranks' contributions, reduced in rank order, folded
    /// into the statistic. A step the method refuses fails its ranks and changes nothing.
    fn apply_ready_step(
        &self,
        progress: &mut Progress,
        ready: ReadyStep<StepTotal>,
    ) -> StepResult<Arc<AppliedStep>> {
        let ranks = ready.kept.len();
        let method = self.method.spec();
        let refused = |error: MethodError| StepFailure::Refused {
            reason: error.to_string().into(),
        };
        let total = ready.sum.finish(method, ready.kept).map_err(refused)?;
        if let Some(wait) = ready.last_rank_wait {
            self.context.observer.last_rank_wait(wait);
        }
        self.apply_locked(progress, &total, ranks, ready.missing_ranks, ready.step + 1)
            .map_err(refused)
    }

    /// A timer task per step attempt. It holds the job weakly, so a deleted job is not kept.
    fn arm_deadline(self: &Arc<Self>, step: u64, generation: u64, timeout: Duration) {
        let job: Weak<Job> = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(job) = job.upgrade() {
                job.on_deadline(step, generation);
            }
        });
    }

    fn on_deadline(self: &Arc<Self>, step: u64, generation: u64) {
        let (deadline, deliveries) = {
            let mut state = self.state.lock();
            let timeout = state.step_timeout;
            let allow_partial = state.allow_partial_steps;
            let JobState { progress, sync, .. } = &mut *state;
            let Some(sync) = sync.as_mut() else {
                return;
            };
            let outcome = sync.on_deadline(step, generation, allow_partial, timeout, |ready| {
                self.apply_ready_step(progress, ready)
            });
            self.charge.set_pending(sync.pending_bytes());
            outcome
        };
        deliver(deliveries);
        match deadline {
            Deadline::Handled { timed_out: true } => self.context.observer.step_timed_out(),
            Deadline::Handled { timed_out: false } | Deadline::Nothing => {}
        }
    }

    /// Changes the world size from a step on, the step timeout, or partial steps.
    pub(super) fn update(&self, update: &JobUpdate) -> Result<(), JobError> {
        let mut state = self.state.lock();
        if let Some(change) = update.world_size {
            let Some(sync) = state.sync.as_mut() else {
                return Err(JobError::FailedPrecondition {
                    id: self.id().to_owned(),
                    reason:
                        "world_size: the job is asynchronous (created with world_size 0 or 1); \
                             create a step-synchronous job instead"
                            .to_owned(),
                });
            };
            // The kept outcomes of a larger world may list more missing ranks: charged first,
            // and given back if the change is refused.
            let before = self.charge.fixed();
            let world_size = change.world_size.max(sync.latest_world_size());
            let grown = budget::fixed_bytes(
                self.id(),
                self.method.spec().state_values(),
                world_size,
                self.context.kept_steps,
            );
            self.charge
                .set_fixed(grown)
                .map_err(|refusal| JobError::ResourceExhausted {
                    id: self.id().to_owned(),
                    reason: format!("world_size = {}: {}", change.world_size, refusal.0),
                })?;
            sync.change_world_size(change)
                .inspect_err(|_| {
                    let _ = self.charge.set_fixed(before);
                })
                .map_err(|refusal| JobError::FailedPrecondition {
                    id: self.id().to_owned(),
                    reason: match refusal {
                        ScheduleRefusal::AlreadyApplied { next_step } => format!(
                            "from_step = {}: the job already applied steps up to {}; choose \
                             from_step >= {next_step}",
                            change.from_step,
                            next_step.saturating_sub(1),
                        ),
                        ScheduleRefusal::RankAlreadySent { step, rank } => format!(
                            "world_size = {}: rank {rank} already sent step {step}, which would \
                             be past the new world size",
                            change.world_size
                        ),
                    },
                })?;
        }
        if let Some(timeout) = update.step_timeout {
            state.step_timeout = timeout;
        }
        if let Some(allow) = update.allow_partial_steps {
            state.allow_partial_steps = allow;
        }
        state.progress.update_time = SystemTime::now();
        // A smaller world size may have completed pending steps.
        let JobState { progress, sync, .. } = &mut *state;
        if let Some(sync) = sync.as_mut() {
            let deliveries = sync.apply_ready(|ready| self.apply_ready_step(progress, ready));
            self.charge.set_pending(sync.pending_bytes());
            drop(state);
            deliver(deliveries);
        }
        Ok(())
    }

    /// Puts the job back to a checkpoint: its statistic, counters and next step. Pending steps
    /// are aborted and the kept tables dropped, since they belong to another history.
    pub(super) fn restore(
        &self,
        restored: StateInput,
        steps: u64,
        elements: u64,
        next_step: u64,
    ) -> Result<(), JobError> {
        let restored = self
            .method
            .spec()
            .state_from_input(restored, false)
            .map_err(|e| self.method_error(e))?;
        if next_step == u64::MAX {
            return Err(self.invalid_request(
                "state.next_step = 18446744073709551615: steps must stay below 2^64 - 1",
            ));
        }
        let mut state = self.state.lock();
        match state.sync.as_mut() {
            Some(sync) => {
                sync.restart_at(next_step);
                self.charge.set_pending(sync.pending_bytes());
            }
            None if next_step != 0 => {
                return Err(self.invalid_request(format!(
                    "state.next_step = {next_step}: only step-synchronous jobs have a next step; \
                     leave it 0"
                )));
            }
            None => {}
        }
        state.progress = Progress {
            state: restored,
            steps,
            elements,
            // A restored state is a history of its own: copies from before it are fenced.
            generation: state.progress.generation.saturating_add(1),
            update_time: SystemTime::now(),
        };
        Ok(())
    }

    /// Ends every waiting request of a job that is going away.
    pub(super) fn close(&self) {
        self.fail_pending(StepFailure::Deleted);
    }

    /// Ends every waiting step of a server that is shutting down: no other rank can reach it
    /// any more, so the ranks that wait would wait for their step timeout; they send the step
    /// again where the job goes on. The registry has set `draining` first.
    pub(super) fn drain(&self) {
        self.fail_pending(StepFailure::Draining);
    }

    fn draining_error(&self, step: u64) -> JobError {
        JobError::Unavailable {
            id: self.id().to_owned(),
            reason: format!(
                "step {step}: this server is shutting down and cannot complete the step; \
                 nothing was applied, send it again (to another replica, or to this one once \
                 it is back)"
            ),
        }
    }

    /// Ends every waiting request of a copy that another copy replaces; they may send again.
    pub(super) fn close_replaced(&self) {
        self.fail_pending(StepFailure::Replaced);
    }

    fn fail_pending(&self, failure: StepFailure) {
        let mut state = self.state.lock();
        if let Some(sync) = state.sync.as_mut() {
            let deliveries = sync.fail_all_pending(failure);
            self.charge.set_pending(sync.pending_bytes());
            drop(state);
            deliver(deliveries);
        }
    }
}

/// The lineage's side of a job (the rules are in `lineage`).
impl Job {
    /// The copy's (generation, steps), read together.
    pub(super) fn lineage(&self) -> (u64, u64) {
        let state = self.state.lock();
        (state.progress.generation, state.progress.steps)
    }

    /// Fencing, with the job's lock held, so that no step can slip between the check and the
    /// request joining its step.
    fn check_fence(&self, progress: &Progress, fence: Fence) -> Result<(), JobError> {
        check_fence(
            self.id(),
            (progress.generation, progress.steps),
            fence,
            &*self.context.observer,
        )
    }

    /// Keeps an applied step's outcome for retries, as if it had been applied here (a reseed
    /// brings the last step its clients saw).
    pub(super) fn keep_applied(&self, step: u64, applied: AppliedStep) {
        let mut state = self.state.lock();
        if let Some(sync) = state.sync.as_mut() {
            sync.keep(step, Arc::new(applied));
        }
    }
}

/// The missing ranks for a status message, which travels in an HTTP/2 header: a job of 65,536
/// ranks must not make it hundreds of kilobytes long.
fn ranks_list(ranks: &[u32]) -> String {
    const SHOWN: usize = 16;
    let mut text = String::new();
    for (i, rank) in ranks.iter().take(SHOWN).enumerate() {
        let _ = write!(text, "{}{rank}", if i == 0 { "" } else { ", " });
    }
    if ranks.len() > SHOWN {
        let _ = write!(text, " and {} more", ranks.len() - SHOWN);
    }
    text
}

/// Requests a step wakes at once before other tasks get a turn.
const WAKE_BATCH: usize = 512;

/// Hands a step's outcome to its waiting requests, after the job's lock is released. A wide
/// step's are woken from a task of their own, in batches, so that other jobs' requests are
/// served meanwhile; a task, not the caller, so that a request cancelled meanwhile cannot drop
/// the others' outcomes.
fn deliver(deliveries: Deliveries<Arc<AppliedStep>>) {
    if deliveries.waiters() <= WAKE_BATCH {
        return deliveries.deliver_now();
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(deliveries.deliver_in_batches(WAKE_BATCH));
        }
        Err(_) => deliveries.deliver_now(),
    }
}

/// Runs kernel work on the blocking pool, so that a large batch cannot stall the runtime.
async fn offload<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JobError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| JobError::Internal(format!("weighing task failed: {e}")))
}
