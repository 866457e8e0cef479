//! The step barrier of step-synchronous jobs: step t is applied once every rank of the job has
//! sent it (or, with partial steps, once its deadline passed), steps are applied in order, and
//! every rank of a step gets the same outcome, so that every worker gets the weights one process
//! would give the global batch.
//!
//! It knows nothing of a job's method: how a step's contributions combine is a [`StepSum`], and
//! a step's outcome an `O`, both the job's to define; what a step does with its sum is a closure
//! the job passes in. It holds no lock and starts no task: the job calls it under its own lock,
//! arms the per-step timers it asks for, and hands the outcomes to the waiting requests
//! ([`Deliveries`]) once its lock is released. Waiting is a oneshot receiver per request.
//!
//! Cost: a contribution is O(1) in the world size W (a hash-map slot, a bit in the step's
//! presence set, a count) plus what its [`StepSum`] does with it; O(W) work happens at most once
//! per step: listing the missing ranks when a step times out or applies partially, walking the
//! ranks in order when it applies, and waking them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How the contributions of a step's ranks combine. A contribution is folded into the step's
/// running sum on arrival, so that a rank's request costs what it takes to undo it (a resend
/// replaces an earlier contribution), not a copy of what it sent.
///
/// A reduction that must run in rank order (a float sum that has to be bit-exact whatever the
/// arrival order, as EQLv2's would be) folds nothing on arrival and keeps the whole contribution
/// as its `Kept`: [`ReadyStep::kept`] hands them back in rank order.
pub trait StepSum: Clone {
    /// What one rank sends.
    type Contribution;
    /// What the barrier keeps of a rank's contribution until its step is applied.
    type Kept;
    /// Adds a contribution to the sum; the result is what [`Self::unfold`] needs to take it out.
    fn fold(&mut self, contribution: Self::Contribution) -> Self::Kept;
    /// Takes out a contribution a resend replaces.
    fn unfold(&mut self, kept: &Self::Kept);
    /// An upper bound of the bytes a contribution will keep once folded, for the job's memory
    /// account; checked before anything changes.
    fn kept_bytes(contribution: &Self::Contribution) -> usize;
    /// The bytes of one step's sum.
    fn sum_bytes(&self) -> usize;
}

/// A change of world size that takes effect at `from_step` (elastic training).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorldSizeChange {
    pub from_step: u64,
    pub world_size: u32,
}

/// Why a waiting request did not get its step.
#[derive(Clone, Debug, PartialEq)]
pub enum StepFailure {
    /// The step timed out with ranks missing; nothing was applied. The list is shared by every
    /// waiting rank: a 65,536-rank step must not copy it 65,536 times.
    TimedOut {
        missing: Arc<[u32]>,
        timeout: Duration,
    },
    /// The step was complete but an earlier step it must follow did not come within its own
    /// step timeout.
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
    /// The step was complete, but the job refused to apply it (its statistic would have left
    /// float32): nothing was applied and the step is not done, so a changed resend may apply.
    /// The reason is shared by every waiting rank.
    Refused { reason: Arc<str> },
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
    /// The job's pending steps would hold more than the bytes it may.
    TooManyBytes {
        pending_bytes: usize,
        needed: usize,
        limit: usize,
    },
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
}

/// A step whose rank contributions are complete (or partial after its deadline), handed to the
/// job to be applied.
pub struct ReadyStep<S: StepSum> {
    /// The step's number.
    pub step: u64,
    pub sum: S,
    /// One per rank present, in rank order, so that a reduction over them is deterministic.
    pub kept: Vec<S::Kept>,
    /// Ranks the step is applied without (partial steps only).
    pub missing_ranks: Vec<u32>,
    /// From the step's first request to its last rank's; `None` for a partial step.
    pub last_rank_wait: Option<Duration>,
}

/// Outcomes for waiting requests, to be handed over once the job's lock is released: waking
/// every rank of a step is O(W), and the job's other requests need not wait for it.
#[must_use = "the waiting requests get nothing until the deliveries are delivered"]
pub struct Deliveries<O> {
    batches: Vec<(Vec<Waiter<O>>, StepResult<O>)>,
}

impl<O: Clone> Deliveries<O> {
    fn new() -> Self {
        Self {
            batches: Vec::new(),
        }
    }

    /// The requests these deliveries wake.
    pub fn waiters(&self) -> usize {
        self.batches.iter().map(|(waiters, _)| waiters.len()).sum()
    }

    pub fn deliver_now(self) {
        for (waiters, result) in self.batches {
            for waiter in waiters {
                let _ = waiter.send(result.clone());
            }
        }
    }

    /// Wakes the requests `batch` at a time, letting other tasks run in between: waking all
    /// 65,536 ranks of a step in one go would queue every one of them ahead of other jobs'
    /// requests.
    pub async fn deliver_in_batches(self, batch: usize) {
        let mut woken = 0;
        for (waiters, result) in self.batches {
            for waiter in waiters {
                let _ = waiter.send(result.clone());
                woken += 1;
                if woken % batch.max(1) == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
    }
}

type Waiter<O> = oneshot::Sender<StepResult<O>>;

/// What a pending step holds per rank besides its [`StepSum::Kept`], for the memory account:
/// the hash-map slot with its share of spare capacity, and the oneshot channel's allocation.
const BYTES_PER_RANK: usize = 160;
/// What a pending step holds besides its sum and its ranks.
const BYTES_PER_STEP: usize = 256;

struct Slot<K, O> {
    kept: K,
    waiter: Waiter<O>,
    /// What this rank adds to the job's memory account.
    bytes: usize,
}

/// The ranks present in a step: one bit each (8 KiB at W = 65,536), so that the missing ones
/// are listed, and the present ones walked in rank order, without a search per rank.
#[derive(Default)]
struct RankSet {
    words: Vec<u64>,
}

impl RankSet {
    fn with_world(world_size: u32) -> Self {
        Self {
            words: vec![0; (world_size as usize).div_ceil(64)],
        }
    }

    fn insert(&mut self, rank: u32) {
        let word = rank as usize / 64;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (rank % 64);
    }

    fn contains(&self, rank: u32) -> bool {
        self.words
            .get(rank as usize / 64)
            .is_some_and(|word| word & (1 << (rank % 64)) != 0)
    }

    /// Present ranks in order.
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(index, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros();
                    rest &= rest - 1;
                    index as u32 * 64 + bit
                })
            })
        })
    }

    fn missing(&self, world_size: u32) -> Vec<u32> {
        (0..world_size)
            .filter(|&rank| !self.contains(rank))
            .collect()
    }

    /// What the set of a step of `world_size` ranks takes.
    fn bytes_for(world_size: u32) -> usize {
        (world_size as usize).div_ceil(64) * 8
    }
}

struct PendingStep<S: StepSum, O> {
    /// Distinguishes this attempt from an earlier, aborted attempt at the same step, so that a
    /// stale timer does nothing.
    generation: u64,
    first_arrival: Instant,
    sum: S,
    present: RankSet,
    slots: HashMap<u32, Slot<S::Kept, O>>,
    /// What this step adds to the job's memory account.
    bytes: usize,
    /// The deadline passed on a job that allows partial steps: apply with the ranks present.
    partial: bool,
}

impl<S: StepSum, O> PendingStep<S, O> {
    fn ranks(&self) -> usize {
        self.slots.len()
    }

    /// Every waiting request, for a failure that ends the step.
    fn into_waiters(self) -> Vec<Waiter<O>> {
        self.slots.into_values().map(|slot| slot.waiter).collect()
    }
}

/// The steps of one step-synchronous job: pending ones with their sums, the world size of each,
/// and the outcomes of the last applied ones for retries.
pub struct StepBarrier<S: StepSum, O> {
    next_step: u64,
    /// The world size from each step on; the first entry is at or before `next_step`.
    schedule: Vec<WorldSizeChange>,
    pending: BTreeMap<u64, PendingStep<S, O>>,
    /// The outcomes of the last applied steps, oldest first, with their world sizes, for
    /// retries.
    recent: VecDeque<(u64, u32, O)>,
    /// Applied steps whose outcomes are kept.
    kept_steps: usize,
    generations: u64,
    /// The sum a new step starts from.
    empty_sum: S,
    /// What the pending steps hold, by the estimates of [`StepSum`] and `BYTES_PER_*`.
    pending_bytes: usize,
}

impl<S: StepSum, O: Clone> StepBarrier<S, O> {
    /// A barrier at `next_step`; an empty `schedule` means `world_size` from `next_step` on.
    pub fn new(
        world_size: u32,
        next_step: u64,
        schedule: Vec<WorldSizeChange>,
        kept_steps: usize,
        empty_sum: S,
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
            empty_sum,
            pending_bytes: 0,
        }
    }

    /// Whether any step is waiting for ranks: such a job is in use, however old its last step.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The bytes the pending steps hold (sums, presence sets, ranks' slots and what they keep).
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
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

    /// Adds one rank's contribution to its step. The job then calls [`Self::apply_ready`], and
    /// arms a deadline for the returned generation, if any: a new attempt at the step began.
    /// `max_pending_bytes` bounds [`Self::pending_bytes`] after the contribution.
    pub fn join(
        &mut self,
        step: u64,
        rank: u32,
        contribution: S::Contribution,
        max_pending_steps: usize,
        max_pending_bytes: usize,
    ) -> Result<(Joined<O>, Option<u64>), JoinRefusal> {
        if step < self.next_step {
            // The rank is checked against the world the step had, before a kept outcome is
            // handed out: a rank outside it never took part.
            return match self.recent.iter().find(|(kept, _, _)| *kept == step) {
                Some((_, world_size, _)) if rank >= *world_size => {
                    Err(JoinRefusal::RankOutOfRange {
                        world_size: *world_size,
                    })
                }
                Some((_, _, applied)) => Ok((Joined::Applied(applied.clone()), None)),
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
        let existing = self.pending.get(&step);
        if existing.is_none() && self.pending.len() >= max_pending_steps {
            return Err(JoinRefusal::TooManyPending {
                pending: self.pending.len(),
                next_step: self.next_step,
            });
        }
        let rank_bytes = S::kept_bytes(&contribution) + BYTES_PER_RANK;
        let step_bytes = match existing {
            Some(_) => 0,
            None => BYTES_PER_STEP + self.empty_sum.sum_bytes() + RankSet::bytes_for(world_size),
        };
        let needed = rank_bytes + step_bytes;
        if self.pending_bytes.saturating_add(needed) > max_pending_bytes {
            return Err(JoinRefusal::TooManyBytes {
                pending_bytes: self.pending_bytes,
                needed,
                limit: max_pending_bytes,
            });
        }
        let (sender, receiver) = oneshot::channel();
        let mut new_attempt = None;
        let generations = &mut self.generations;
        let empty_sum = &self.empty_sum;
        let pending = self.pending.entry(step).or_insert_with(|| {
            *generations += 1;
            new_attempt = Some(*generations);
            PendingStep {
                generation: *generations,
                first_arrival: Instant::now(),
                bytes: step_bytes,
                sum: empty_sum.clone(),
                present: RankSet::with_world(world_size),
                slots: HashMap::new(),
                partial: false,
            }
        });
        let kept = pending.sum.fold(contribution);
        pending.present.insert(rank);
        pending.bytes += rank_bytes;
        self.pending_bytes += needed;
        let replaced = pending.slots.insert(
            rank,
            Slot {
                kept,
                waiter: sender,
                bytes: rank_bytes,
            },
        );
        if let Some(earlier) = replaced {
            pending.sum.unfold(&earlier.kept);
            pending.bytes -= earlier.bytes;
            self.pending_bytes -= earlier.bytes;
            let _ = earlier.waiter.send(Err(StepFailure::Superseded));
        }
        Ok((Joined::Waiting(receiver), new_attempt))
    }

    /// Whether the pending step is complete: every rank of its world sent it.
    fn is_complete(&self, step: u64, pending: &PendingStep<S, O>) -> bool {
        pending.ranks() >= self.world_size_at(step) as usize
    }

    /// Applies the next step while it is complete (or partial), then the one after it: `apply`
    /// turns a ready step into the outcome every one of its ranks receives. The outcomes go to
    /// the returned deliveries.
    ///
    /// `apply` may refuse a step: its ranks then get the refusal, the step is dropped without
    /// advancing, and later steps wait for it as before.
    pub fn apply_ready(
        &mut self,
        mut apply: impl FnMut(ReadyStep<S>) -> StepResult<O>,
    ) -> Deliveries<O> {
        let mut deliveries = Deliveries::new();
        loop {
            let head = self.next_step;
            let Some(pending) = self.pending.get(&head) else {
                break;
            };
            let complete = self.is_complete(head, pending);
            if !complete && !pending.partial {
                break;
            }
            let Some(pending) = self.pending.remove(&head) else {
                break;
            };
            self.pending_bytes -= pending.bytes;
            let world_size = self.world_size_at(head);
            let (missing_ranks, last_rank_wait) = if complete {
                (Vec::new(), Some(pending.first_arrival.elapsed()))
            } else {
                (pending.present.missing(world_size), None)
            };
            let PendingStep {
                sum,
                present,
                mut slots,
                ..
            } = pending;
            let mut kept = Vec::with_capacity(slots.len());
            let mut waiters = Vec::with_capacity(slots.len());
            for rank in present.iter() {
                if let Some(slot) = slots.remove(&rank) {
                    kept.push(slot.kept);
                    waiters.push(slot.waiter);
                }
            }
            let applied = match apply(ReadyStep {
                step: head,
                sum,
                kept,
                missing_ranks,
                last_rank_wait,
            }) {
                Ok(applied) => applied,
                Err(refusal) => {
                    deliveries.batches.push((waiters, Err(refusal)));
                    break;
                }
            };
            self.next_step = head + 1;
            self.prune_schedule();
            self.recent.push_back((head, world_size, applied.clone()));
            while self.recent.len() > self.kept_steps {
                self.recent.pop_front();
            }
            deliveries.batches.push((waiters, Ok(applied)));
        }
        deliveries
    }

    /// The deadline of attempt `generation` at `step` passed: apply it without its missing
    /// ranks if `allow_partial`, else abort it. A step that is ready but queued behind an
    /// earlier one is aborted too: it waited its own step timeout, and waiting on for a head
    /// that keeps being retried would make its ranks wait without bound.
    pub fn on_deadline(
        &mut self,
        step: u64,
        generation: u64,
        allow_partial: bool,
        timeout: Duration,
        apply: impl FnMut(ReadyStep<S>) -> StepResult<O>,
    ) -> (Deadline, Deliveries<O>) {
        let Some(pending) = self.pending.get_mut(&step) else {
            return (Deadline::Nothing, Deliveries::new());
        };
        if pending.generation != generation {
            return (Deadline::Nothing, Deliveries::new());
        }
        if allow_partial {
            pending.partial = true;
        }
        let mut deliveries = self.apply_ready(apply);
        let Some(pending) = self.pending.remove(&step) else {
            return (Deadline::Handled { timed_out: false }, deliveries);
        };
        self.pending_bytes -= pending.bytes;
        let head = self.next_step;
        let failure = if self.is_complete(step, &pending) || allow_partial {
            StepFailure::Blocked { head, timeout }
        } else {
            StepFailure::TimedOut {
                missing: pending.present.missing(self.world_size_at(step)).into(),
                timeout,
            }
        };
        deliveries
            .batches
            .push((pending.into_waiters(), Err(failure)));
        (Deadline::Handled { timed_out: true }, deliveries)
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
            .flat_map(|(step, pending)| {
                pending
                    .present
                    .iter()
                    .skip_while(|&rank| rank < change.world_size)
                    .map(move |rank| (*step, rank))
            })
            .next()
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
        self.fail_all_pending(StepFailure::Restored).deliver_now();
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
        let world_size = self.world_size_at(step);
        self.recent.retain(|(kept, _, _)| *kept != step);
        self.recent.push_back((step, world_size, outcome));
        while self.recent.len() > self.kept_steps.max(1) {
            self.recent.pop_front();
        }
    }

    pub fn fail_all_pending(&mut self, failure: StepFailure) -> Deliveries<O> {
        let mut deliveries = Deliveries::new();
        for (_, pending) in std::mem::take(&mut self.pending) {
            deliveries
                .batches
                .push((pending.into_waiters(), Err(failure.clone())));
        }
        self.pending_bytes = 0;
        deliveries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reduction that keeps every contribution and sums them only when the step applies, in
    /// rank order: the shape an order-sensitive float reduction would have, with no job behind
    /// it. Its outcome is the sum with the ranks left out.
    #[derive(Clone)]
    struct InRankOrder;

    impl StepSum for InRankOrder {
        type Contribution = u32;
        type Kept = u32;
        fn fold(&mut self, contribution: u32) -> u32 {
            contribution
        }
        fn unfold(&mut self, _: &u32) {}
        fn kept_bytes(_: &u32) -> usize {
            4
        }
        fn sum_bytes(&self) -> usize {
            0
        }
    }

    type Outcome = (u32, Vec<u32>);
    type Barrier = StepBarrier<InRankOrder, Outcome>;

    const TIMEOUT: Duration = Duration::from_secs(1);

    fn barrier(world_size: u32, kept_steps: usize) -> Barrier {
        Barrier::new(world_size, 0, Vec::new(), kept_steps, InRankOrder)
    }

    fn sum(ready: ReadyStep<InRankOrder>) -> StepResult<Outcome> {
        Ok((ready.kept.iter().sum(), ready.missing_ranks))
    }

    fn join(
        barrier: &mut Barrier,
        step: u64,
        rank: u32,
        value: u32,
    ) -> Result<(Joined<Outcome>, Option<u64>), JoinRefusal> {
        barrier.join(step, rank, value, 8, usize::MAX)
    }

    fn apply(barrier: &mut Barrier) {
        barrier.apply_ready(sum).deliver_now();
    }

    fn deadline(barrier: &mut Barrier, step: u64, generation: u64, partial: bool) -> Deadline {
        let (deadline, deliveries) = barrier.on_deadline(step, generation, partial, TIMEOUT, sum);
        deliveries.deliver_now();
        deadline
    }

    fn waiting(joined: Joined<Outcome>) -> oneshot::Receiver<StepResult<Outcome>> {
        match joined {
            Joined::Waiting(receiver) => receiver,
            Joined::Applied(outcome) => panic!("applied already: {outcome:?}"),
        }
    }

    #[test]
    fn a_step_applies_once_every_rank_sent_it_and_every_rank_gets_the_outcome() {
        let mut barrier = barrier(2, 4);
        let (joined, attempt) = join(&mut barrier, 0, 1, 5).unwrap();
        assert_eq!(attempt, Some(1));
        let mut first = waiting(joined);
        barrier
            .apply_ready(|_| panic!("rank 0 is missing"))
            .deliver_now();
        assert!(first.try_recv().is_err());

        let (joined, attempt) = join(&mut barrier, 0, 0, 7).unwrap();
        assert_eq!(attempt, None, "the same attempt");
        let mut second = waiting(joined);
        let mut order = Vec::new();
        let deliveries = barrier.apply_ready(|ready| {
            order = ready.kept.clone();
            assert!(ready.last_rank_wait.is_some());
            sum(ready)
        });
        assert_eq!(order, [7, 5], "rank order, not arrival order");
        assert!(first.try_recv().is_err(), "nothing is sent before delivery");
        deliveries.deliver_now();
        assert_eq!(first.try_recv().unwrap(), Ok((12, vec![])));
        assert_eq!(second.try_recv().unwrap(), Ok((12, vec![])));
        assert_eq!(barrier.next_step(), 1);
        assert!(!barrier.has_pending());
        assert_eq!(barrier.pending_bytes(), 0, "an applied step holds nothing");

        // A retry of the applied step gets the kept outcome, at once.
        match join(&mut barrier, 0, 1, 99).unwrap() {
            (Joined::Applied(outcome), None) => assert_eq!(outcome, (12, vec![])),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_retry_of_an_applied_step_from_a_rank_outside_its_world_is_refused() {
        let mut barrier = barrier(4, 4);
        for rank in 0..4 {
            join(&mut barrier, 0, rank, 1).unwrap();
        }
        apply(&mut barrier);
        assert_eq!(barrier.next_step(), 1);
        assert_eq!(
            join(&mut barrier, 0, 7, 1).unwrap_err(),
            JoinRefusal::RankOutOfRange { world_size: 4 }
        );
        // The world the step had, not today's: a rank of a grown world did not take part.
        barrier
            .change_world_size(WorldSizeChange {
                from_step: 1,
                world_size: 8,
            })
            .unwrap();
        assert_eq!(
            join(&mut barrier, 0, 7, 1).unwrap_err(),
            JoinRefusal::RankOutOfRange { world_size: 4 }
        );
        assert!(matches!(
            join(&mut barrier, 0, 3, 1).unwrap(),
            (Joined::Applied(_), None)
        ));
    }

    #[test]
    fn a_refused_step_fails_its_ranks_and_is_not_done() {
        let mut barrier = barrier(2, 4);
        let mut first = waiting(join(&mut barrier, 0, 0, 1).unwrap().0);
        let mut second = waiting(join(&mut barrier, 0, 1, 2).unwrap().0);
        let mut later = waiting(join(&mut barrier, 1, 0, 3).unwrap().0);
        let refusal = StepFailure::Refused {
            reason: "too large".into(),
        };
        barrier.apply_ready(|_| Err(refusal.clone())).deliver_now();
        assert_eq!(first.try_recv().unwrap(), Err(refusal.clone()));
        assert_eq!(second.try_recv().unwrap(), Err(refusal));
        assert_eq!(barrier.next_step(), 0, "the step is not done");
        assert!(later.try_recv().is_err(), "later steps still wait for it");
        assert!(barrier.has_pending());

        // The ranks send it again and it applies, then the step behind it.
        let mut first = waiting(join(&mut barrier, 0, 0, 1).unwrap().0);
        join(&mut barrier, 0, 1, 1).unwrap();
        join(&mut barrier, 1, 1, 4).unwrap();
        apply(&mut barrier);
        assert_eq!(first.try_recv().unwrap(), Ok((2, vec![])));
        assert_eq!(later.try_recv().unwrap(), Ok((7, vec![])));
        assert_eq!(barrier.next_step(), 2);
    }

    #[test]
    fn later_steps_wait_for_earlier_ones_and_apply_in_order() {
        let mut barrier = barrier(1, 4);
        let mut later = waiting(join(&mut barrier, 1, 0, 2).unwrap().0);
        barrier
            .apply_ready(|_| panic!("step 0 has not come"))
            .deliver_now();
        let mut earlier = waiting(join(&mut barrier, 0, 0, 1).unwrap().0);
        let mut applied = Vec::new();
        barrier
            .apply_ready(|ready| {
                applied.push(ready.kept.clone());
                sum(ready)
            })
            .deliver_now();
        assert_eq!(applied, [[1], [2]], "step 0, then step 1");
        assert_eq!(earlier.try_recv().unwrap(), Ok((1, vec![])));
        assert_eq!(later.try_recv().unwrap(), Ok((2, vec![])));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let mut barrier = barrier(2, 1);
        assert_eq!(
            join(&mut barrier, 0, 2, 1).unwrap_err(),
            JoinRefusal::RankOutOfRange { world_size: 2 }
        );
        assert_eq!(
            join(&mut barrier, u64::MAX, 0, 1).unwrap_err(),
            JoinRefusal::ReservedStep
        );
        let _pending = barrier.join(5, 0, 1, 1, usize::MAX).unwrap();
        assert_eq!(
            barrier.join(6, 0, 1, 1, usize::MAX).unwrap_err(),
            JoinRefusal::TooManyPending {
                pending: 1,
                next_step: 0
            }
        );
        let held = barrier.pending_bytes();
        assert!(held > 0);
        match barrier.join(5, 1, 1, 8, held + 10) {
            Err(JoinRefusal::TooManyBytes {
                pending_bytes,
                needed,
                limit,
            }) => {
                assert_eq!((pending_bytes, limit), (held, held + 10));
                assert_eq!(needed, BYTES_PER_RANK + 4);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(barrier.pending_bytes(), held, "a refusal changes nothing");
        // One kept outcome: step 0 expires once step 1 is applied.
        let mut barrier = barrier_of_one();
        for step in 0..2 {
            join(&mut barrier, step, 0, 1).unwrap();
            apply(&mut barrier);
        }
        assert_eq!(
            join(&mut barrier, 0, 0, 1).unwrap_err(),
            JoinRefusal::Expired { next_step: 2 }
        );
    }

    fn barrier_of_one() -> Barrier {
        barrier(1, 1)
    }

    #[test]
    fn a_resend_supersedes_the_earlier_request_and_its_contribution() {
        let mut barrier = barrier(2, 4);
        let mut first = waiting(join(&mut barrier, 0, 0, 1).unwrap().0);
        let held = barrier.pending_bytes();
        let mut second = waiting(join(&mut barrier, 0, 0, 3).unwrap().0);
        assert_eq!(first.try_recv().unwrap(), Err(StepFailure::Superseded));
        assert_eq!(
            barrier.pending_bytes(),
            held,
            "the replaced rank is no longer held"
        );
        join(&mut barrier, 0, 1, 10).unwrap();
        apply(&mut barrier);
        assert_eq!(second.try_recv().unwrap(), Ok((13, vec![])));
    }

    #[test]
    fn a_deadline_aborts_an_incomplete_step_or_applies_it_partially() {
        let mut barrier = barrier(3, 4);
        let (joined, attempt) = join(&mut barrier, 0, 1, 4).unwrap();
        let mut receiver = waiting(joined);
        // A stale timer of another attempt does nothing.
        assert_eq!(deadline(&mut barrier, 0, 7, false), Deadline::Nothing);
        assert_eq!(
            deadline(&mut barrier, 0, attempt.unwrap(), false),
            Deadline::Handled { timed_out: true }
        );
        assert_eq!(
            receiver.try_recv().unwrap(),
            Err(StepFailure::TimedOut {
                missing: vec![0, 2].into(),
                timeout: TIMEOUT
            })
        );
        assert_eq!(barrier.next_step(), 0, "nothing was applied");
        assert_eq!(barrier.pending_bytes(), 0);

        let (joined, attempt) = join(&mut barrier, 0, 1, 4).unwrap();
        let mut receiver = waiting(joined);
        assert_eq!(
            deadline(&mut barrier, 0, attempt.unwrap(), true),
            Deadline::Handled { timed_out: false }
        );
        assert_eq!(receiver.try_recv().unwrap(), Ok((4, vec![0, 2])));
    }

    #[test]
    fn a_ready_step_behind_a_retried_head_waits_only_its_own_timeout() {
        let mut barrier = barrier(2, 4);
        // Step 1 completes first; its head, step 0, is still incomplete.
        let (_, head_attempt) = join(&mut barrier, 0, 0, 1).unwrap();
        let (joined, attempt) = join(&mut barrier, 1, 0, 1).unwrap();
        let mut later = waiting(joined);
        join(&mut barrier, 1, 1, 1).unwrap();
        // Step 0 times out and is retried: a new attempt, pending again.
        assert_eq!(
            deadline(&mut barrier, 0, head_attempt.unwrap(), false),
            Deadline::Handled { timed_out: true }
        );
        let (_, retried) = join(&mut barrier, 0, 0, 1).unwrap();
        assert!(retried.is_some());
        // Step 1's own deadline ends it, though the head is pending: no re-arming.
        assert_eq!(
            deadline(&mut barrier, 1, attempt.unwrap(), false),
            Deadline::Handled { timed_out: true }
        );
        assert_eq!(
            later.try_recv().unwrap(),
            Err(StepFailure::Blocked {
                head: 0,
                timeout: TIMEOUT
            })
        );
        assert!(barrier.has_pending(), "the head's new attempt carries on");
    }

    #[test]
    fn the_world_size_changes_from_a_step_on_unless_a_dropped_rank_already_sent() {
        let mut barrier = barrier(4, 4);
        join(&mut barrier, 2, 3, 1).unwrap();
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
        let mut barrier = barrier_of_one();
        join(&mut barrier, 0, 0, 1).unwrap();
        apply(&mut barrier);
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
        let mut barrier = barrier(2, 4);
        let mut waiting_rank = waiting(join(&mut barrier, 3, 0, 1).unwrap().0);
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

    #[test]
    fn the_presence_set_lists_ranks_in_order_and_the_missing_ones() {
        let mut set = RankSet::with_world(130);
        for rank in [129, 0, 64, 63] {
            set.insert(rank);
        }
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 63, 64, 129]);
        assert_eq!(set.missing(5), [1, 2, 3, 4]);
        assert_eq!(RankSet::with_world(65_536).words.len() * 8, 8192);
        assert_eq!(RankSet::bytes_for(65_536), 8192);
    }
}
