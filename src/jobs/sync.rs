//! The step barrier of step-synchronous jobs: step t is applied once every rank of the job has
//! sent it (or, with partial steps, once its deadline passed), steps are applied in order, and
//! every rank of a step gets the same outcome, so that every worker gets the weights one process
//! would give the global batch.
//!
//! It knows nothing of a job's method: a rank's contribution is a `C` and a step's outcome an
//! `O`, both the job's to define; what a step does with its contributions is a closure the job
//! passes in. It holds no lock and starts no task: the job calls it under its own lock, and arms
//! the per-step timers it asks for. Waiting is a oneshot receiver per request, never a thread.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A change of world size that takes effect at `from_step` (elastic training).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorldSizeChange {
    pub from_step: u64,
    pub world_size: u32,
}

/// Why a waiting request did not get its step.
#[derive(Debug, PartialEq)]
pub enum StepFailure {
    /// The step timed out with ranks missing; nothing was applied.
    TimedOut {
        missing: Vec<u32>,
        timeout: Duration,
    },
    /// The step was complete but an earlier step it must follow never came.
    Blocked { head: u64, timeout: Duration },
    /// The same rank sent the same step again; the newer request carries on.
    Superseded,
    /// The job was put back to another state (a restore).
    Restored,
    /// ReseedJob or a new run replaced this copy of the job.
    Replaced,
    /// The server is shutting down: no rank can reach it any more, so the step cannot complete
    /// here.
    Draining,
    /// The job was deleted.
    Deleted,
}

/// What a waiting request receives.
pub type StepResult<O> = Result<O, StepFailure>;

/// How a request joined its step.
#[derive(Debug)]
pub enum Joined<O> {
    /// The step was applied already (a retry): the stored outcome.
    Applied(O),
    /// The step is pending; the receiver yields its outcome.
    Waiting(oneshot::Receiver<StepResult<O>>),
}

/// Why a rank cannot join a step.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinRefusal {
    /// The step was applied and its outcome is no longer kept.
    Expired { next_step: u64 },
    /// `u64::MAX`: the step after it could not be numbered.
    ReservedStep,
    /// The rank is past the step's world size.
    RankOutOfRange { world_size: u32 },
    /// As many steps wait as the job may have.
    TooManyPending { pending: usize, next_step: u64 },
}

/// Why a world-size change cannot be made.
#[derive(Debug, PartialEq, Eq)]
pub enum ScheduleRefusal {
    /// The change would start at a step that was applied already.
    AlreadyApplied { next_step: u64 },
    /// A rank the new world size drops already sent a step from `from_step` on.
    RankAlreadySent { step: u64, rank: u32 },
}

/// What a step's deadline did.
#[derive(Debug, PartialEq, Eq)]
pub enum Deadline {
    /// Nothing to do: the step is no longer pending, or another attempt of it is.
    Nothing,
    /// The step was applied without its missing ranks, or aborted.
    Handled { timed_out: bool },
    /// The step is ready but waits behind an earlier pending step: wait one more timeout.
    Rearm,
}

/// A step whose rank contributions are complete (or partial after its deadline), handed to the
/// job to be applied.
pub struct ReadyStep<C> {
    /// The step's number.
    pub step: u64,
    /// One per rank present, in rank order, so that a reduction over them is deterministic.
    pub contributions: Vec<C>,
    /// Ranks the step is applied without (partial steps only).
    pub missing_ranks: Vec<u32>,
    /// From the step's first request to its last rank's; `None` for a partial step.
    pub last_rank_wait: Option<Duration>,
}

struct Contribution<C, O> {
    data: C,
    waiter: oneshot::Sender<StepResult<O>>,
}

struct PendingStep<C, O> {
    /// Distinguishes this attempt from an earlier, aborted attempt at the same step, so that a
    /// stale timer does nothing.
    generation: u64,
    first_arrival: Instant,
    contributions: BTreeMap<u32, Contribution<C, O>>,
    /// The deadline passed on a job that allows partial steps: apply with the ranks present.
    partial: bool,
}

/// The steps of one step-synchronous job: pending ones with their contributions, the world size
/// of each, and the outcomes of the last applied ones for retries.
pub struct StepBarrier<C, O> {
    next_step: u64,
    /// The world size from each step on; the first entry is at or before `next_step`.
    schedule: Vec<WorldSizeChange>,
    pending: BTreeMap<u64, PendingStep<C, O>>,
    /// The outcomes of the last applied steps, oldest first, for retries.
    recent: VecDeque<(u64, O)>,
    /// Applied steps whose outcomes are kept.
    kept_steps: usize,
    generations: u64,
}

impl<C, O: Clone> StepBarrier<C, O> {
    /// A barrier at `next_step`; an empty `schedule` means `world_size` from `next_step` on.
    pub fn new(
        world_size: u32,
        next_step: u64,
        schedule: Vec<WorldSizeChange>,
        kept_steps: usize,
    ) -> Self {
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
            kept_steps,
            generations: 0,
        }
    }

    /// Whether any step is waiting for ranks: such a job is in use, however old its last step.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
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

    pub fn world_size_at(&self, step: u64) -> u32 {
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

    fn missing_ranks(&self, step: u64, pending: &PendingStep<C, O>) -> Vec<u32> {
        (0..self.world_size_at(step))
            .filter(|rank| !pending.contributions.contains_key(rank))
            .collect()
    }

    /// Adds one rank's contribution to its step. The job then calls [`Self::apply_ready`], and
    /// arms a deadline for the returned generation, if any: a new attempt at the step began.
    pub fn join(
        &mut self,
        step: u64,
        rank: u32,
        data: C,
        max_pending_steps: usize,
    ) -> Result<(Joined<O>, Option<u64>), JoinRefusal> {
        if step < self.next_step {
            return match self.recent.iter().find(|(kept, _)| *kept == step) {
                Some((_, applied)) => Ok((Joined::Applied(applied.clone()), None)),
                None => Err(JoinRefusal::Expired {
                    next_step: self.next_step,
                }),
            };
        }
        if step == u64::MAX {
            return Err(JoinRefusal::ReservedStep);
        }
        let world_size = self.world_size_at(step);
        if rank >= world_size {
            return Err(JoinRefusal::RankOutOfRange { world_size });
        }
        if !self.pending.contains_key(&step) && self.pending.len() >= max_pending_steps {
            return Err(JoinRefusal::TooManyPending {
                pending: self.pending.len(),
                next_step: self.next_step,
            });
        }
        let (sender, receiver) = oneshot::channel();
        let mut new_attempt = None;
        let generations = &mut self.generations;
        let pending = self.pending.entry(step).or_insert_with(|| {
            *generations += 1;
            new_attempt = Some(*generations);
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
                data,
                waiter: sender,
            },
        );
        if let Some(earlier) = replaced {
            let _ = earlier.waiter.send(Err(StepFailure::Superseded));
        }
        Ok((Joined::Waiting(receiver), new_attempt))
    }

    /// Applies the next step while it is complete (or partial), then the one after it: `apply`
    /// turns a ready step into the outcome every one of its ranks receives.
    pub fn apply_ready(&mut self, mut apply: impl FnMut(ReadyStep<C>) -> O) {
        loop {
            let head = self.next_step;
            let Some(pending) = self.pending.get(&head) else {
                return;
            };
            let missing_ranks = self.missing_ranks(head, pending);
            if !missing_ranks.is_empty() && !pending.partial {
                return;
            }
            let Some(pending) = self.pending.remove(&head) else {
                return;
            };
            let last_rank_wait = missing_ranks
                .is_empty()
                .then(|| pending.first_arrival.elapsed());
            let (contributions, waiters): (Vec<C>, Vec<_>) = pending
                .contributions
                .into_values()
                .map(|contribution| (contribution.data, contribution.waiter))
                .unzip();
            let applied = apply(ReadyStep {
                step: head,
                contributions,
                missing_ranks,
                last_rank_wait,
            });
            self.next_step = head + 1;
            self.prune_schedule();
            self.recent.push_back((head, applied.clone()));
            while self.recent.len() > self.kept_steps {
                self.recent.pop_front();
            }
            for waiter in waiters {
                let _ = waiter.send(Ok(applied.clone()));
            }
        }
    }

    /// The deadline of attempt `generation` at `step` passed: apply it without its missing
    /// ranks if `allow_partial`, else abort it; a ready step queued behind an earlier pending
    /// one waits for that step's own deadline instead.
    pub fn on_deadline(
        &mut self,
        step: u64,
        generation: u64,
        allow_partial: bool,
        timeout: Duration,
        apply: impl FnMut(ReadyStep<C>) -> O,
    ) -> Deadline {
        let Some(pending) = self.pending.get(&step) else {
            return Deadline::Nothing;
        };
        if pending.generation != generation {
            return Deadline::Nothing;
        }
        let missing = self.missing_ranks(step, pending);
        let head = self.next_step;
        if !missing.is_empty() && allow_partial {
            if let Some(pending) = self.pending.get_mut(&step) {
                pending.partial = true;
            }
            self.apply_ready(apply);
        }
        if !self.pending.contains_key(&step) {
            return Deadline::Handled { timed_out: false };
        }
        // Still pending: either incomplete without partial steps, or ready but queued behind
        // an earlier step. Behind a step that is itself pending, wait for that step's own
        // deadline; behind nothing, give up.
        let blocked_by_pending_head = step > head && self.pending.contains_key(&head);
        let ready = missing.is_empty() || allow_partial;
        if ready && blocked_by_pending_head {
            return Deadline::Rearm;
        }
        if let Some(pending) = self.pending.remove(&step) {
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
        }
        Deadline::Handled { timed_out: true }
    }

    /// Makes `change` the world size from its step on. The job then calls
    /// [`Self::apply_ready`]: a smaller world may have completed pending steps.
    pub fn change_world_size(&mut self, change: WorldSizeChange) -> Result<(), ScheduleRefusal> {
        if change.from_step < self.next_step {
            return Err(ScheduleRefusal::AlreadyApplied {
                next_step: self.next_step,
            });
        }
        if let Some((step, rank)) = self
            .pending
            .range(change.from_step..)
            .flat_map(|(step, pending)| pending.contributions.keys().map(move |r| (*step, *r)))
            .find(|(_, rank)| *rank >= change.world_size)
        {
            return Err(ScheduleRefusal::RankAlreadySent { step, rank });
        }
        self.schedule.retain(|c| c.from_step < change.from_step);
        self.schedule.push(change);
        self.prune_schedule();
        Ok(())
    }

    /// Starts again at `next_step` (a restore): pending steps are aborted and the kept
    /// outcomes dropped, since they belong to another history; the world size is the one
    /// `next_step` had.
    pub fn restart_at(&mut self, next_step: u64) {
        self.fail_all_pending(|| StepFailure::Restored);
        self.recent.clear();
        self.next_step = next_step;
        let world_size = self.world_size_at(next_step);
        self.schedule.retain(|c| c.from_step > next_step);
        self.schedule.insert(
            0,
            WorldSizeChange {
                from_step: next_step,
                world_size,
            },
        );
    }

    /// Ends every pending step with `failure` (restore, delete).
    /// Keeps a step's outcome for retries as if it had been applied here (a reseed brings the
    /// last step its clients saw).
    pub fn keep(&mut self, step: u64, outcome: O) {
        self.recent.retain(|(kept, _)| *kept != step);
        self.recent.push_back((step, outcome));
        while self.recent.len() > self.kept_steps.max(1) {
            self.recent.pop_front();
        }
    }

    pub fn fail_all_pending(&mut self, failure: impl Fn() -> StepFailure) {
        for (_, pending) in std::mem::take(&mut self.pending) {
            for (_, contribution) in pending.contributions {
                let _ = contribution.waiter.send(Err(failure()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A barrier whose contributions are numbers and whose outcome is their sum with the ranks
    /// left out: enough to see what the barrier does, with no job behind it.
    type Barrier = StepBarrier<u32, (u32, Vec<u32>)>;

    const TIMEOUT: Duration = Duration::from_secs(1);

    fn sum(ready: ReadyStep<u32>) -> (u32, Vec<u32>) {
        (ready.contributions.iter().sum(), ready.missing_ranks)
    }

    fn waiting(joined: Joined<(u32, Vec<u32>)>) -> oneshot::Receiver<StepResult<(u32, Vec<u32>)>> {
        match joined {
            Joined::Waiting(receiver) => receiver,
            Joined::Applied(outcome) => panic!("applied already: {outcome:?}"),
        }
    }

    #[test]
    fn a_step_applies_once_every_rank_sent_it_and_every_rank_gets_the_outcome() {
        let mut barrier = Barrier::new(2, 0, Vec::new(), 4);
        let (joined, attempt) = barrier.join(0, 1, 5, 8).unwrap();
        assert_eq!(attempt, Some(1));
        let mut first = waiting(joined);
        barrier.apply_ready(|_| panic!("rank 0 is missing"));
        assert!(first.try_recv().is_err());

        let (joined, attempt) = barrier.join(0, 0, 7, 8).unwrap();
        assert_eq!(attempt, None, "the same attempt");
        let mut second = waiting(joined);
        let mut order = Vec::new();
        barrier.apply_ready(|ready| {
            order = ready.contributions.clone();
            assert!(ready.last_rank_wait.is_some());
            sum(ready)
        });
        assert_eq!(order, [7, 5], "rank order, not arrival order");
        assert_eq!(first.try_recv().unwrap(), Ok((12, vec![])));
        assert_eq!(second.try_recv().unwrap(), Ok((12, vec![])));
        assert_eq!(barrier.next_step(), 1);
        assert!(!barrier.has_pending());

        // A retry of the applied step gets the kept outcome, at once.
        match barrier.join(0, 1, 99, 8).unwrap() {
            (Joined::Applied(outcome), None) => assert_eq!(outcome, (12, vec![])),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn later_steps_wait_for_earlier_ones_and_apply_in_order() {
        let mut barrier = Barrier::new(1, 0, Vec::new(), 4);
        let mut later = waiting(barrier.join(1, 0, 2, 8).unwrap().0);
        barrier.apply_ready(|_| panic!("step 0 has not come"));
        let mut earlier = waiting(barrier.join(0, 0, 1, 8).unwrap().0);
        let mut applied = Vec::new();
        barrier.apply_ready(|ready| {
            applied.push(ready.contributions.clone());
            sum(ready)
        });
        assert_eq!(applied, [[1], [2]], "step 0, then step 1");
        assert_eq!(earlier.try_recv().unwrap(), Ok((1, vec![])));
        assert_eq!(later.try_recv().unwrap(), Ok((2, vec![])));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let mut barrier = Barrier::new(2, 0, Vec::new(), 1);
        assert_eq!(
            barrier.join(0, 2, 1, 8).unwrap_err(),
            JoinRefusal::RankOutOfRange { world_size: 2 }
        );
        assert_eq!(
            barrier.join(u64::MAX, 0, 1, 8).unwrap_err(),
            JoinRefusal::ReservedStep
        );
        let _pending = barrier.join(5, 0, 1, 1).unwrap();
        assert_eq!(
            barrier.join(6, 0, 1, 1).unwrap_err(),
            JoinRefusal::TooManyPending {
                pending: 1,
                next_step: 0
            }
        );
        // One kept outcome: step 0 expires once step 1 is applied.
        let mut barrier = Barrier::new(1, 0, Vec::new(), 1);
        for step in 0..2 {
            barrier.join(step, 0, 1, 8).unwrap();
            barrier.apply_ready(sum);
        }
        assert_eq!(
            barrier.join(0, 0, 1, 8).unwrap_err(),
            JoinRefusal::Expired { next_step: 2 }
        );
    }

    #[test]
    fn a_resend_supersedes_the_earlier_request() {
        let mut barrier = Barrier::new(2, 0, Vec::new(), 4);
        let mut first = waiting(barrier.join(0, 0, 1, 8).unwrap().0);
        let _second = waiting(barrier.join(0, 0, 3, 8).unwrap().0);
        assert_eq!(first.try_recv().unwrap(), Err(StepFailure::Superseded));
    }

    #[test]
    fn a_deadline_aborts_an_incomplete_step_or_applies_it_partially() {
        let mut barrier = Barrier::new(3, 0, Vec::new(), 4);
        let (joined, attempt) = barrier.join(0, 1, 4, 8).unwrap();
        let mut receiver = waiting(joined);
        // A stale timer of another attempt does nothing.
        assert_eq!(
            barrier.on_deadline(0, 7, false, TIMEOUT, sum),
            Deadline::Nothing
        );
        assert_eq!(
            barrier.on_deadline(0, attempt.unwrap(), false, TIMEOUT, sum),
            Deadline::Handled { timed_out: true }
        );
        assert_eq!(
            receiver.try_recv().unwrap(),
            Err(StepFailure::TimedOut {
                missing: vec![0, 2],
                timeout: TIMEOUT
            })
        );
        assert_eq!(barrier.next_step(), 0, "nothing was applied");

        let (joined, attempt) = barrier.join(0, 1, 4, 8).unwrap();
        let mut receiver = waiting(joined);
        assert_eq!(
            barrier.on_deadline(0, attempt.unwrap(), true, TIMEOUT, sum),
            Deadline::Handled { timed_out: false }
        );
        assert_eq!(receiver.try_recv().unwrap(), Ok((4, vec![0, 2])));
    }

    #[test]
    fn a_ready_step_behind_a_pending_one_waits_then_reports_what_blocked_it() {
        let mut barrier = Barrier::new(2, 0, Vec::new(), 4);
        let (_, head_attempt) = barrier.join(0, 0, 1, 8).unwrap();
        let (joined, attempt) = barrier.join(1, 0, 1, 8).unwrap();
        let mut later = waiting(joined);
        barrier.join(1, 1, 1, 8).unwrap();
        let attempt = attempt.unwrap();
        assert_eq!(
            barrier.on_deadline(1, attempt, false, TIMEOUT, sum),
            Deadline::Rearm
        );
        assert_eq!(
            barrier.on_deadline(0, head_attempt.unwrap(), false, TIMEOUT, sum),
            Deadline::Handled { timed_out: true }
        );
        assert_eq!(
            barrier.on_deadline(1, attempt, false, TIMEOUT, sum),
            Deadline::Handled { timed_out: true }
        );
        assert_eq!(
            later.try_recv().unwrap(),
            Err(StepFailure::Blocked {
                head: 0,
                timeout: TIMEOUT
            })
        );
    }

    #[test]
    fn the_world_size_changes_from_a_step_on_unless_a_dropped_rank_already_sent() {
        let mut barrier = Barrier::new(4, 0, Vec::new(), 4);
        barrier.join(2, 3, 1, 8).unwrap();
        let shrink = WorldSizeChange {
            from_step: 1,
            world_size: 2,
        };
        assert_eq!(
            barrier.change_world_size(shrink),
            Err(ScheduleRefusal::RankAlreadySent { step: 2, rank: 3 })
        );
        let shrink = WorldSizeChange {
            from_step: 3,
            world_size: 2,
        };
        barrier.change_world_size(shrink).unwrap();
        assert_eq!(barrier.world_size_at(2), 4);
        assert_eq!(barrier.world_size_at(3), 2);
        assert_eq!(barrier.latest_world_size(), 2);

        // Step 0 applied, a change from it is too late.
        let mut barrier = Barrier::new(1, 0, Vec::new(), 4);
        barrier.join(0, 0, 1, 8).unwrap();
        barrier.apply_ready(sum);
        assert_eq!(
            barrier.change_world_size(WorldSizeChange {
                from_step: 0,
                world_size: 2
            }),
            Err(ScheduleRefusal::AlreadyApplied { next_step: 1 })
        );
    }

    #[test]
    fn a_restart_aborts_what_waits_and_forgets_what_was_applied() {
        let mut barrier = Barrier::new(2, 0, Vec::new(), 4);
        let mut waiting_rank = waiting(barrier.join(3, 0, 1, 8).unwrap().0);
        barrier.restart_at(10);
        assert_eq!(waiting_rank.try_recv().unwrap(), Err(StepFailure::Restored));
        assert_eq!(barrier.next_step(), 10);
        assert_eq!(
            barrier.schedule(),
            [WorldSizeChange {
                from_step: 10,
                world_size: 2
            }]
        );
        assert!(!barrier.has_pending());
    }
}
