//! Step-synchronous jobs: step t is applied once every rank of the job has sent it, from the sum
//! of their bin counts, so that every worker gets the weights one process would give the global
//! batch. Waiting is a future per request, never a thread; a per-step timer task enforces
//! `step_timeout` so that a dead rank costs the others one timeout, never a hang.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::JobError;
use super::job::{AppliedStep, Job, JobState, JobUpdate, WorldSizeChange, check_acc_sum};
use crate::ghm::{BatchCounts, Density};

/// Why a waiting request did not get its step.
#[derive(Debug)]
pub(super) enum StepFailure {
    /// The step timed out with ranks missing; nothing was applied.
    TimedOut {
        missing: Vec<u32>,
        timeout: Duration,
    },
    /// The step was complete but an earlier step it must follow never came.
    Blocked { head: u64, timeout: Duration },
    /// The same rank sent the same step again; the newer request carries on.
    Superseded,
    /// RestoreJob put the job back to another state.
    Restored,
    /// The job was deleted.
    Deleted,
}

type StepResult = Result<Arc<AppliedStep>, StepFailure>;

/// How a request joined its step.
pub(super) enum Joined {
    /// The step was applied already (a retry): the stored outcome.
    Applied(Arc<AppliedStep>),
    /// The step is pending; the receiver yields its outcome.
    Waiting(oneshot::Receiver<StepResult>),
}

struct Contribution {
    counts: BatchCounts,
    waiter: oneshot::Sender<StepResult>,
}

struct PendingStep {
    /// Distinguishes this attempt from an earlier, aborted attempt at the same step, so that a
    /// stale timer does nothing.
    generation: u64,
    first_arrival: Instant,
    contributions: BTreeMap<u32, Contribution>,
    /// The deadline passed on a job that allows partial steps: apply with the ranks present.
    partial: bool,
}

pub(super) struct SyncState {
    next_step: u64,
    /// The world size from each step on; the first entry is at or before `next_step`.
    schedule: Vec<WorldSizeChange>,
    pending: BTreeMap<u64, PendingStep>,
    /// The outcomes of the last applied steps, oldest first, for retries.
    recent: VecDeque<(u64, Arc<AppliedStep>)>,
    generations: u64,
}

impl SyncState {
    /// Whether any step is waiting for ranks: such a job is in use, however old its last step.
    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn new(world_size: u32, next_step: u64, schedule: Vec<WorldSizeChange>) -> Self {
        let schedule = if schedule.is_empty() {
            vec![WorldSizeChange {
                from_step: next_step,
                world_size,
            }]
        } else {
            schedule
        };
        Self {
            next_step,
            schedule,
            pending: BTreeMap::new(),
            recent: VecDeque::new(),
            generations: 0,
        }
    }

    pub fn next_step(&self) -> u64 {
        self.next_step
    }

    pub fn schedule(&self) -> &[WorldSizeChange] {
        &self.schedule
    }

    pub fn latest_world_size(&self) -> u32 {
        self.schedule.last().map_or(0, |change| change.world_size)
    }

    fn world_size_at(&self, step: u64) -> u32 {
        self.schedule
            .iter()
            .rev()
            .find(|change| change.from_step <= step)
            .or(self.schedule.first())
            .map_or(0, |change| change.world_size)
    }

    /// Drops the schedule entries no step from `next_step` on can use.
    fn prune_schedule(&mut self) {
        while self.schedule.len() > 1 && self.schedule[1].from_step <= self.next_step {
            self.schedule.remove(0);
        }
    }

    fn missing_ranks(&self, step: u64, pending: &PendingStep) -> Vec<u32> {
        (0..self.world_size_at(step))
            .filter(|rank| !pending.contributions.contains_key(rank))
            .collect()
    }

    /// Ends every pending step with `failure` (restore, delete).
    fn fail_all_pending(&mut self, failure: impl Fn() -> StepFailure) {
        for (_, pending) in std::mem::take(&mut self.pending) {
            for (_, contribution) in pending.contributions {
                let _ = contribution.waiter.send(Err(failure()));
            }
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

impl Job {
    fn sync_error(&self, reason: &str) -> JobError {
        JobError::Internal(format!("job {:?}: {reason}", self.id()))
    }

    pub(super) fn step_failed(&self, step: u64, failure: StepFailure) -> JobError {
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
            StepFailure::Deleted => {
                format!("step {step} aborted: the job was deleted while the step waited")
            }
        };
        JobError::Aborted { id, reason }
    }

    pub(super) fn step_dropped(&self, step: u64) -> JobError {
        self.step_failed(step, StepFailure::Deleted)
    }

    /// Adds one rank's counts to its step, applies every step that is now ready in order, and
    /// tells the caller how to get its step's outcome.
    pub(super) fn contribute(
        self: &Arc<Self>,
        step: u64,
        rank: u32,
        counts: BatchCounts,
    ) -> Result<Joined, JobError> {
        let (receiver, new_attempt) = {
            let mut state = self.state.lock();
            let timeout = state.step_timeout;
            let Some(sync) = state.sync.as_mut() else {
                return Err(self.sync_error("not step-synchronous"));
            };
            if step < sync.next_step {
                return match sync.recent.iter().find(|(kept, _)| *kept == step) {
                    Some((_, applied)) => Ok(Joined::Applied(Arc::clone(applied))),
                    None => Err(JobError::StepExpired {
                        id: self.id().to_owned(),
                        reason: format!(
                            "step {step} was applied, and its table is no longer kept: the job \
                             is at step {next} and keeps the last {kept} (--kept-steps)",
                            next = sync.next_step,
                            kept = self.context.kept_steps
                        ),
                    }),
                };
            }
            if step == u64::MAX {
                return Err(self.invalid_request(
                    "step = 18446744073709551615: the last step number is reserved; steps must \
                     stay below 2^64 - 1",
                ));
            }
            let world_size = sync.world_size_at(step);
            if rank >= world_size {
                return Err(self.invalid_request(format!(
                    "rank = {rank}: step {step} has world_size {world_size}, so ranks are 0 to {}",
                    world_size.saturating_sub(1)
                )));
            }
            if !sync.pending.contains_key(&step)
                && sync.pending.len() >= self.context.max_pending_steps
            {
                return Err(JobError::ResourceExhausted {
                    id: self.id().to_owned(),
                    reason: format!(
                        "{} steps are already pending, the limit (--max-pending-steps {}); \
                         step {next} must complete first",
                        sync.pending.len(),
                        self.context.max_pending_steps,
                        next = sync.next_step
                    ),
                });
            }
            let (sender, receiver) = oneshot::channel();
            let mut new_attempt = None;
            let generations = &mut sync.generations;
            let pending = sync.pending.entry(step).or_insert_with(|| {
                *generations += 1;
                new_attempt = Some((*generations, timeout));
                PendingStep {
                    generation: *generations,
                    first_arrival: Instant::now(),
                    contributions: BTreeMap::new(),
                    partial: false,
                }
            });
            let replaced = pending.contributions.insert(
                rank,
                Contribution {
                    counts,
                    waiter: sender,
                },
            );
            if let Some(earlier) = replaced {
                let _ = earlier.waiter.send(Err(StepFailure::Superseded));
            }
            self.apply_ready_steps(&mut state);
            (receiver, new_attempt)
        };
        if let Some((generation, timeout)) = new_attempt {
            self.arm_deadline(step, generation, timeout);
        }
        Ok(Joined::Waiting(receiver))
    }

    /// Applies the job's next step while it is complete (or partial), then the one after it.
    fn apply_ready_steps(&self, state: &mut JobState) {
        loop {
            let Some(sync) = state.sync.as_mut() else {
                return;
            };
            let head = sync.next_step;
            let Some(pending) = sync.pending.get(&head) else {
                return;
            };
            let missing = sync.missing_ranks(head, pending);
            if !missing.is_empty() && !pending.partial {
                return;
            }
            let Some(pending) = sync.pending.remove(&head) else {
                return;
            };
            let bins = state.density.acc_sum().len();
            let mut total = BatchCounts::empty(bins);
            for contribution in pending.contributions.values() {
                total.add(&contribution.counts);
            }
            if missing.is_empty() {
                self.context
                    .observer
                    .last_rank_wait(pending.first_arrival.elapsed());
            }
            let applied = self.apply_locked(state, &total, pending.contributions.len(), missing);
            let Some(sync) = state.sync.as_mut() else {
                return;
            };
            sync.next_step = head + 1;
            sync.prune_schedule();
            sync.recent.push_back((head, Arc::clone(&applied)));
            while sync.recent.len() > self.context.kept_steps {
                sync.recent.pop_front();
            }
            for (_, contribution) in pending.contributions {
                let _ = contribution.waiter.send(Ok(Arc::clone(&applied)));
            }
        }
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
        let mut rearm = None;
        {
            let mut state = self.state.lock();
            let timeout = state.step_timeout;
            let allow_partial = state.allow_partial_steps;
            let Some(sync) = state.sync.as_mut() else {
                return;
            };
            let Some(pending) = sync.pending.get(&step) else {
                return;
            };
            if pending.generation != generation {
                return;
            }
            let missing = sync.missing_ranks(step, pending);
            let head = sync.next_step;
            if !missing.is_empty() && allow_partial {
                if let Some(pending) = sync.pending.get_mut(&step) {
                    pending.partial = true;
                }
                self.apply_ready_steps(&mut state);
            }
            let Some(sync) = state.sync.as_mut() else {
                return;
            };
            if !sync.pending.contains_key(&step) {
                return;
            }
            // Still pending: either incomplete without partial steps, or ready but queued behind
            // an earlier step. Behind a step that is itself pending, wait for that step's own
            // deadline; behind nothing, give up.
            let blocked_by_pending_head = step > head && sync.pending.contains_key(&head);
            let ready = missing.is_empty() || allow_partial;
            if ready && blocked_by_pending_head {
                rearm = Some(timeout);
            } else if let Some(pending) = sync.pending.remove(&step) {
                let failure = || {
                    if ready {
                        StepFailure::Blocked { head, timeout }
                    } else {
                        StepFailure::TimedOut {
                            missing: missing.clone(),
                            timeout,
                        }
                    }
                };
                for (_, contribution) in pending.contributions {
                    let _ = contribution.waiter.send(Err(failure()));
                }
                self.context.observer.step_timed_out();
            }
        }
        if let Some(timeout) = rearm {
            self.arm_deadline(step, generation, timeout);
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
            if change.from_step < sync.next_step {
                return Err(JobError::FailedPrecondition {
                    id: self.id().to_owned(),
                    reason: format!(
                        "from_step = {}: the job already applied steps up to {}; choose \
                         from_step >= {}",
                        change.from_step,
                        sync.next_step.saturating_sub(1),
                        sync.next_step
                    ),
                });
            }
            if let Some((step, rank)) = sync
                .pending
                .range(change.from_step..)
                .flat_map(|(step, pending)| pending.contributions.keys().map(move |r| (*step, *r)))
                .find(|(_, rank)| *rank >= change.world_size)
            {
                return Err(JobError::FailedPrecondition {
                    id: self.id().to_owned(),
                    reason: format!(
                        "world_size = {}: rank {rank} already sent step {step}, which would be \
                         past the new world size",
                        change.world_size
                    ),
                });
            }
            sync.schedule.retain(|c| c.from_step < change.from_step);
            sync.schedule.push(change);
            sync.prune_schedule();
        }
        if let Some(timeout) = update.step_timeout {
            state.step_timeout = timeout;
        }
        if let Some(allow) = update.allow_partial_steps {
            state.allow_partial_steps = allow;
        }
        state.update_time = std::time::SystemTime::now();
        // A smaller world size may have completed pending steps.
        self.apply_ready_steps(&mut state);
        Ok(())
    }

    /// Puts the job back to a checkpoint: its density, counters and next step. Pending steps
    /// are aborted and the kept tables dropped, since they belong to another history.
    pub(super) fn restore(
        &self,
        acc_sum: Vec<f32>,
        steps: u64,
        elements: u64,
        next_step: u64,
    ) -> Result<(), JobError> {
        check_acc_sum(self.id(), &acc_sum, self.spec_bins())?;
        if next_step == u64::MAX {
            return Err(self.invalid_request(
                "state.next_step = 18446744073709551615: steps must stay below 2^64 - 1",
            ));
        }
        let mut state = self.state.lock();
        match state.sync.as_mut() {
            Some(sync) => {
                sync.fail_all_pending(|| StepFailure::Restored);
                sync.recent.clear();
                sync.next_step = next_step;
                let world_size = sync.world_size_at(next_step);
                sync.schedule.retain(|c| c.from_step > next_step);
                sync.schedule.insert(
                    0,
                    WorldSizeChange {
                        from_step: next_step,
                        world_size,
                    },
                );
            }
            None if next_step != 0 => {
                return Err(self.invalid_request(format!(
                    "state.next_step = {next_step}: only step-synchronous jobs have a next step; \
                     leave it 0"
                )));
            }
            None => {}
        }
        state.density = Density::from_acc_sum(acc_sum);
        state.steps = steps;
        state.elements = elements;
        state.update_time = std::time::SystemTime::now();
        Ok(())
    }

    /// Ends every waiting request of a job that is going away.
    pub(super) fn close(&self) {
        let mut state = self.state.lock();
        if let Some(sync) = state.sync.as_mut() {
            sync.fail_all_pending(|| StepFailure::Deleted);
        }
    }
}
