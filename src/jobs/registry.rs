//! The job registry: every job of the server by id, the limits a request is checked against
//! before it reaches its job, and the background task that deletes idle jobs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::task::JoinHandle;

use super::budget::{self, Budget, JobCharge, Owner, Quota};
use super::job::{Job, JobContext};
use super::lineage::{check_reseed, may_take_over};
use super::{
    BatchInput, Fence, JobError, JobSnapshot, JobSpec, JobUpdate, NoObserver, Reseed,
    ReseedOutcome, StepInput, StepObserver, StepOutcome, check_step_timeout, check_world_size,
    validate_job_id, validate_run_id,
};
use crate::ghm;
use crate::method::StateInput;
use crate::shutdown::Shutdown;

/// Knobs of the registry that come from the server's configuration
/// (`ServeConfig::registry_limits`); `Default` is `ghmd serve`'s defaults.
#[derive(Clone, Debug)]
pub struct RegistryLimits {
    /// Batches with more elements than this are weighed on the blocking pool, so that one
    /// 16M-element batch cannot stall the small requests of other jobs on the async runtime.
    pub offload_elements: usize,
    /// Applied steps of a step-synchronous job whose tables are kept to answer retries.
    pub kept_steps: usize,
    /// Steps a step-synchronous job may have waiting at once; bounds what a runaway rank can
    /// make the server hold.
    pub max_pending_steps: usize,
    /// Jobs the server holds at most; CreateJob beyond is RESOURCE_EXHAUSTED. Jobs restored
    /// from the data dir are never dropped for it.
    pub max_jobs: usize,
    /// Elements (gradient norms or residuals) one request may carry, whatever its size in
    /// bytes: bounds the CPU one request can take.
    pub max_elements_per_request: usize,
    /// The longest `step_timeout` a job may have.
    pub max_step_timeout: Duration,
    /// The bytes one job may hold: its fixed part (bins, kept steps) and its pending steps.
    pub max_job_bytes: usize,
    /// The bytes every job together may hold; with the server's own baseline this is what
    /// keeps its memory inside the deployment's limit (README, "Limits").
    pub max_jobs_bytes: usize,
    /// What a caller may hold unless its token says otherwise.
    pub caller_quota: Quota,
    /// The largest response the server can send (`--max-send-message-bytes`). A response above
    /// it would fail only after its step was applied, so requests whose weights cannot fit are
    /// refused up front.
    pub max_response_bytes: usize,
}

/// An upper bound on what a HarmonizeResponse carries besides its weights: the job id's length
/// is added to it; then every other field with its tag and length, both tables at the largest
/// bin count, and the missing ranks of the largest world.
const RESPONSE_OVERHEAD: usize =
    10 * 11 + 2 * 4 * ghm::MAX_BINS as usize + 5 * super::MAX_WORLD_SIZE as usize;

/// A cheap, cloneable handle to every job of the server.
#[derive(Clone)]
pub struct Registry {
    jobs: Arc<DashMap<String, Arc<Job>>>,
    /// The number of jobs in `jobs`, kept beside it because `DashMap::len` would lock every
    /// shard, the one CreateJob holds included.
    count: Arc<AtomicUsize>,
    max_jobs: usize,
    max_elements_per_request: usize,
    max_step_timeout: Duration,
    max_response_bytes: usize,
    context: Arc<JobContext>,
    budget: Arc<Budget>,
}

/// One page of ListJobs.
pub struct ListPage {
    pub jobs: Vec<JobSnapshot>,
    /// The id to continue after; `None` on the last page.
    pub next_after: Option<String>,
}

impl Registry {
    pub fn new(limits: RegistryLimits) -> Self {
        Self::with_observer(limits, Arc::new(NoObserver))
    }

    /// A registry that reports steps and job counts to `observer` (the metrics).
    pub fn with_observer(limits: RegistryLimits, observer: Arc<dyn StepObserver>) -> Self {
        Self {
            jobs: Arc::new(DashMap::new()),
            count: Arc::new(AtomicUsize::new(0)),
            max_jobs: limits.max_jobs,
            max_elements_per_request: limits.max_elements_per_request,
            max_step_timeout: limits.max_step_timeout,
            max_response_bytes: limits.max_response_bytes,
            budget: Arc::new(Budget::new(
                limits.max_job_bytes,
                limits.max_jobs_bytes,
                limits.caller_quota,
            )),
            context: Arc::new(JobContext {
                observer,
                kept_steps: limits.kept_steps,
                max_pending_steps: limits.max_pending_steps,
                offload_elements: limits.offload_elements,
                draining: AtomicBool::new(false),
            }),
        }
    }

    /// The longest `step_timeout` a job may have, and the one an unset timeout is capped to.
    pub fn max_step_timeout(&self) -> Duration {
        self.max_step_timeout
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes every job is charged (see `budget`): what `--max-jobs-bytes` bounds.
    pub fn jobs_bytes(&self) -> usize {
        self.budget.total_bytes()
    }

    /// Takes one of the `max_jobs` places, or says which limit is reached.
    fn reserve_place(&self, id: &str) -> Result<(), JobError> {
        self.count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |count| {
                (count < self.max_jobs).then_some(count + 1)
            })
            .map(|_| ())
            .map_err(|count| JobError::ResourceExhausted {
                id: id.to_owned(),
                reason: format!(
                    "the server holds {count} jobs, the limit (--max-jobs {}); delete jobs \
                     that are done, or ask the operator to raise it",
                    self.max_jobs
                ),
            })
    }

    /// Creates a job with no owner (an embedding program, a test): only the server-wide
    /// limits apply.
    pub fn create(&self, id: &str, spec: JobSpec) -> Result<(JobSnapshot, bool), JobError> {
        self.create_for_run(id, spec, "", Duration::MAX, None)
    }

    /// Creates a job, or returns the existing one if it has the same spec, so that every rank of
    /// a distributed job may call this at start-up; with a run identity: the same run (or none
    /// on both sides) is idempotent, another run gets RUN_ACTIVE while the job changed less than
    /// `takeover_after` ago, and otherwise takes the job over, empty, at the next generation. The
    /// bool says whether a job was created (or taken over). A new job counts against its
    /// owner's quotas.
    pub fn create_for_run(
        &self,
        id: &str,
        spec: JobSpec,
        run_id: &str,
        takeover_after: Duration,
        owner: Option<&Owner>,
    ) -> Result<(JobSnapshot, bool), JobError> {
        spec.check("spec.", Some(self.max_step_timeout))
            .map_err(JobError::InvalidSpec)?;
        validate_job_id(id)?;
        validate_run_id(id, run_id)?;
        let spec = spec.normalized();
        let job = match self.jobs.entry(id.to_owned()) {
            Entry::Occupied(mut existing) => {
                let job = Arc::clone(existing.get());
                if job.run_id() == run_id {
                    drop(existing);
                    if job.spec() != spec {
                        return Err(JobError::AlreadyExists { id: id.to_owned() });
                    }
                    return Ok((job.snapshot(), false));
                }
                let idle = job.idle_for(SystemTime::now());
                let (generation, steps) = job.lineage();
                if !may_take_over(idle, takeover_after) {
                    return Err(JobError::RunActive {
                        id: id.to_owned(),
                        run_id: job.run_id().to_owned(),
                        idle: idle.unwrap_or(Duration::ZERO),
                        takeover_after,
                        generation,
                        steps,
                    });
                }
                let charge = self.charge(id, &spec, owner, false)?;
                let taken = Arc::new(Job::new(
                    id.to_owned(),
                    spec,
                    run_id.to_owned(),
                    generation.saturating_add(1),
                    Arc::clone(&self.context),
                    charge,
                ));
                existing.insert(Arc::clone(&taken));
                drop(existing);
                self.replaced(&job, &taken);
                self.context.observer.run_taken_over();
                tracing::info!(
                    job_id = id,
                    old_run = job.run_id(),
                    new_run = run_id,
                    "job taken over by a new run"
                );
                return Ok((taken.snapshot(), true));
            }
            Entry::Vacant(slot) => {
                let charge = self.charge(id, &spec, owner, true)?;
                self.reserve_place(id)?;
                let job = Arc::new(Job::new(
                    id.to_owned(),
                    spec,
                    run_id.to_owned(),
                    1,
                    Arc::clone(&self.context),
                    charge,
                ));
                slot.insert(Arc::clone(&job));
                job
            }
        };
        self.context.observer.jobs_changed(job.kind(), 1);
        Ok((job.snapshot(), true))
    }

    /// ReseedJob, by the rule written at ReseedJobRequest. The decision and the replacement
    /// happen under the job's map shard, so that W ranks racing to reseed converge on one copy.
    pub fn reseed(
        &self,
        id: &str,
        reseed: Reseed,
        owner: Option<&Owner>,
    ) -> Result<(JobSnapshot, ReseedOutcome), JobError> {
        let result = self.reseed_inner(id, reseed, owner);
        self.context.observer.job_reseeded(match &result {
            Ok((_, outcome)) => *outcome,
            Err(_) => ReseedOutcome::Refused,
        });
        result
    }

    fn reseed_inner(
        &self,
        id: &str,
        reseed: Reseed,
        owner: Option<&Owner>,
    ) -> Result<(JobSnapshot, ReseedOutcome), JobError> {
        reseed
            .spec
            .check("spec.", Some(self.max_step_timeout))
            .map_err(JobError::InvalidSpec)?;
        validate_job_id(id)?;
        validate_run_id(id, &reseed.run_id)?;
        let spec = reseed.spec.clone().normalized();
        let seen = &reseed.state;
        // Checked once, before anything changes; the copy is made from what the check gave.
        let checked = check_reseed(id, &spec, seen, reseed.last_step.as_ref())?;
        let seed = |generation: u64, enforce: bool| {
            Job::seeded(
                id,
                spec.clone(),
                &reseed,
                checked,
                generation,
                Arc::clone(&self.context),
                self.charge(id, &spec, owner, enforce)?,
            )
            .map(Arc::new)
        };
        match self.jobs.entry(id.to_owned()) {
            Entry::Vacant(slot) => {
                let job = seed(seen.generation.saturating_add(1), true)?;
                self.reserve_place(id)?;
                slot.insert(Arc::clone(&job));
                self.context.observer.jobs_changed(job.kind(), 1);
                Ok((job.snapshot(), ReseedOutcome::Created))
            }
            Entry::Occupied(mut existing) => {
                let copy = Arc::clone(existing.get());
                let (generation, steps) = copy.lineage();
                // An empty run id differs too: a caller without one is not the run that took the
                // job over, and must not put the old run's state back over it.
                if copy.run_id() != reseed.run_id && generation >= seen.generation {
                    return Err(JobError::RunReplaced {
                        id: id.to_owned(),
                        run_id: copy.run_id().to_owned(),
                        generation,
                        steps,
                    });
                }
                if generation >= seen.generation && steps >= seen.steps {
                    if copy.spec() != spec {
                        return Err(JobError::AlreadyExists { id: id.to_owned() });
                    }
                    return Ok((copy.snapshot(), ReseedOutcome::Unchanged));
                }
                // A stale copy of another kind of job is some other job under this id: it is
                // not this caller's to overwrite.
                if copy.spec().method != spec.method {
                    return Err(JobError::AlreadyExists { id: id.to_owned() });
                }
                let job = seed(generation.max(seen.generation).saturating_add(1), false)?;
                existing.insert(Arc::clone(&job));
                drop(existing);
                self.replaced(&copy, &job);
                Ok((job.snapshot(), ReseedOutcome::Replaced))
            }
        }
    }

    /// The server is shutting down: every step that waits ends UNAVAILABLE, and no rank joins
    /// a step any more (its other ranks could no longer reach this server). Asynchronous
    /// requests in flight still finish.
    pub fn drain(&self) {
        self.context.draining.store(true, Ordering::SeqCst);
        let jobs: Vec<Arc<Job>> = self.jobs.iter().map(|e| Arc::clone(e.value())).collect();
        for job in jobs {
            job.drain();
        }
    }

    /// The bytes a job of `spec` is charged to the server and to `owner`. A job that replaces a
    /// copy under the same id (a takeover, a reseed) is not refused for them: the copy it
    /// replaces was charged the same and is given back as it goes.
    fn charge(
        &self,
        id: &str,
        spec: &JobSpec,
        owner: Option<&Owner>,
        enforce: bool,
    ) -> Result<JobCharge, JobError> {
        let bytes = budget::fixed_bytes(
            id,
            spec.method.state_values(),
            spec.world_size,
            self.context.kept_steps,
        );
        self.budget
            .open(owner, bytes, enforce)
            .map_err(|refusal| JobError::ResourceExhausted {
                id: id.to_owned(),
                reason: refusal.0,
            })
    }

    /// Accounts for `old` leaving the map in favour of `new` under the same id.
    fn replaced(&self, old: &Job, new: &Job) {
        old.close_replaced();
        self.context.observer.jobs_changed(old.kind(), -1);
        self.context.observer.jobs_changed(new.kind(), 1);
    }

    /// Puts a job back exactly as a snapshot recorded it (state loaded at start-up), replacing
    /// any job of the same id.
    pub fn insert_snapshot(&self, snapshot: JobSnapshot) -> Result<(), JobError> {
        validate_job_id(&snapshot.id)?;
        let bytes = budget::fixed_bytes(
            &snapshot.id,
            snapshot.spec.method.state_values(),
            snapshot.spec.world_size,
            self.context.kept_steps,
        );
        // Never refused: jobs from the data dir are all kept, as with --max-jobs.
        let charge = self
            .budget
            .open(None, bytes, false)
            .map_err(|refusal| JobError::Internal(refusal.0))?;
        let job = Arc::new(Job::from_snapshot(
            snapshot,
            Arc::clone(&self.context),
            charge,
        )?);
        let kind = job.kind();
        match self.jobs.insert(job.id().to_owned(), job) {
            Some(replaced) => {
                replaced.close();
                self.context.observer.jobs_changed(replaced.kind(), -1);
                self.context.observer.jobs_changed(kind, 1);
            }
            None => {
                self.count.fetch_add(1, Ordering::SeqCst);
                self.context.observer.jobs_changed(kind, 1);
            }
        }
        Ok(())
    }

    /// Every job's snapshot, in no particular order (for persistence).
    pub fn snapshots(&self) -> Vec<JobSnapshot> {
        let jobs: Vec<Arc<Job>> = self.jobs.iter().map(|e| Arc::clone(e.value())).collect();
        jobs.iter().map(|job| job.snapshot()).collect()
    }

    /// The job's handle, with the map's shard already released.
    pub fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        validate_job_id(id)?;
        self.jobs
            .get(id)
            .map(|entry| Arc::clone(entry.value()))
            .ok_or_else(|| JobError::NotFound { id: id.to_owned() })
    }

    /// Deletes a job; its waiting requests end with ABORTED.
    pub fn delete(&self, id: &str) -> Result<(), JobError> {
        validate_job_id(id)?;
        let (_, job) = self
            .jobs
            .remove(id)
            .ok_or_else(|| JobError::NotFound { id: id.to_owned() })?;
        self.removed(&job);
        Ok(())
    }

    fn removed(&self, job: &Job) {
        job.close();
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.context.observer.jobs_changed(job.kind(), -1);
    }

    /// Deletes every job idle for longer than `ttl` at `now` (no step, update or restore; a
    /// step waiting for ranks is activity) and returns their ids. A job that becomes active
    /// while the reaper looks is kept: the check and the removal happen under its map shard.
    pub fn reap_idle(&self, ttl: Duration, now: SystemTime) -> Vec<String> {
        let candidates: Vec<String> = self
            .jobs
            .iter()
            .filter(|entry| entry.value().idle_for(now).is_some_and(|idle| idle > ttl))
            .map(|entry| entry.key().clone())
            .collect();
        let mut reaped = Vec::new();
        for id in candidates {
            let removed = self.jobs.remove_if(&id, |_, job| {
                job.idle_for(now).is_some_and(|idle| idle > ttl)
            });
            if let Some((id, job)) = removed {
                self.removed(&job);
                reaped.push(id);
            }
        }
        if !reaped.is_empty() {
            self.context.observer.jobs_reaped(reaped.len() as u64);
        }
        reaped
    }

    /// Starts the task that deletes jobs idle longer than `ttl` until `shutdown`, looking a few
    /// times per TTL (at most once a minute, at least every 10 ms), so that a job outlives its
    /// TTL by a quarter of it at most.
    pub fn spawn_reaper(&self, ttl: Duration, mut shutdown: Shutdown) -> JoinHandle<()> {
        let registry = self.clone();
        let period = (ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = shutdown.recv() => return,
                }
                let registry = registry.clone();
                let reaped =
                    tokio::task::spawn_blocking(move || registry.reap_idle(ttl, SystemTime::now()))
                        .await;
                match reaped {
                    Ok(ids) => {
                        for id in ids {
                            tracing::info!(
                                job_id = %id,
                                ?ttl,
                                "job deleted: idle longer than --job-ttl"
                            );
                        }
                    }
                    Err(error) => tracing::error!(%error, "the job reaper failed"),
                }
            }
        })
    }

    /// Jobs in id order, starting after `after`, at most `page_size` of them, of those for
    /// which `visible` holds (the caller's own, when tokens are in force).
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        page_size: usize,
        visible: impl Fn(&str) -> bool,
    ) -> ListPage {
        let mut ids: Vec<String> = self
            .jobs
            .iter()
            .filter(|entry| {
                let id = entry.key().as_str();
                id.starts_with(prefix) && after.is_none_or(|after| id > after) && visible(id)
            })
            .map(|entry| entry.key().clone())
            .collect();
        ids.sort_unstable();
        let more = ids.len() > page_size;
        ids.truncate(page_size);
        let jobs: Vec<JobSnapshot> = ids
            .iter()
            .filter_map(|id| self.jobs.get(id).map(|entry| Arc::clone(entry.value())))
            .map(|job| job.snapshot())
            .collect();
        let next_after = if more { ids.last().cloned() } else { None };
        ListPage { jobs, next_after }
    }

    /// Weighs one request: at once for an asynchronous job, once its step is complete for a
    /// step-synchronous one.
    pub async fn harmonize(&self, id: &str, input: StepInput) -> Result<StepOutcome, JobError> {
        self.harmonize_fenced(id, input, Fence::default()).await
    }

    /// Weighs one request if this copy holds the lineage `fence` names (see `lineage`).
    pub async fn harmonize_fenced(
        &self,
        id: &str,
        input: StepInput,
        fence: Fence,
    ) -> Result<StepOutcome, JobError> {
        self.check_request_size(id, &input.batch)?;
        let job = self.get(id).inspect_err(|error| {
            if fence.is_active() && matches!(error, JobError::NotFound { .. }) {
                self.context.observer.fenced_refusal(true);
            }
        })?;
        job.harmonize(input, fence).await
    }

    /// The limits on a Harmonize request's size, before anything else is looked at: the
    /// response its weights need, then the elements it carries.
    fn check_request_size(&self, id: &str, batch: &BatchInput) -> Result<(), JobError> {
        let Some(field) = batch.element_field() else {
            return Ok(());
        };
        let elements = batch.element_count();
        let largest = 4 * elements + id.len() + RESPONSE_OVERHEAD;
        if batch.weighs_elements() && largest > self.max_response_bytes {
            return Err(JobError::ResponseTooLarge(format!(
                "{field} has {elements} elements: their weights need a response of up to \
                 {largest} bytes, above the {} of --max-send-message-bytes; send at most {} \
                 elements per request",
                self.max_response_bytes,
                self.max_response_bytes
                    .saturating_sub(id.len() + RESPONSE_OVERHEAD)
                    / 4
            )));
        }
        if elements > self.max_elements_per_request {
            return Err(JobError::ResourceExhausted {
                id: id.to_owned(),
                reason: format!(
                    "{field} has {elements} elements, above the limit of {} per request \
                     (--max-elements-per-request); split the batch",
                    self.max_elements_per_request
                ),
            });
        }
        Ok(())
    }

    pub fn update(&self, id: &str, update: &JobUpdate) -> Result<JobSnapshot, JobError> {
        if let Some(change) = update.world_size {
            check_world_size("world_size", change.world_size).map_err(JobError::InvalidSpec)?;
        }
        if let Some(timeout) = update.step_timeout {
            check_step_timeout("step_timeout", timeout, self.max_step_timeout)
                .map_err(JobError::InvalidSpec)?;
        }
        let job = self.get(id)?;
        job.update(update)?;
        Ok(job.snapshot())
    }

    /// Puts a job's statistic, counters and next step back to a checkpoint's.
    pub fn restore(
        &self,
        id: &str,
        state: StateInput,
        steps: u64,
        elements: u64,
        next_step: u64,
    ) -> Result<JobSnapshot, JobError> {
        let job = self.get(id)?;
        job.restore(state, steps, elements, next_step)?;
        Ok(job.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::{Ghm, MethodSpec};
    use bytes::Bytes;

    fn spec(world_size: u32, step_timeout: Duration) -> JobSpec {
        JobSpec {
            method: MethodSpec::Ghm(Ghm {
                spec: ghm::Spec::new(ghm::Loss::GhmC, 10, 0.75, 0.0).unwrap(),
            }),
            world_size,
            step_timeout,
            allow_partial_steps: false,
        }
    }

    fn registry() -> Registry {
        Registry::new(RegistryLimits {
            max_step_timeout: Duration::from_secs(5),
            // The weights of 100 elements fit with the id "job", no more.
            max_response_bytes: RESPONSE_OVERHEAD + "job".len() + 4 * 100,
            ..RegistryLimits::default()
        })
    }

    #[test]
    fn create_refuses_a_spec_past_the_bounds_without_the_api() {
        let registry = registry();
        for (spec, message) in [
            (
                spec(1, Duration::from_secs(6)),
                "spec.step_timeout = 6s: must be above 0 and at most 5s (--max-step-timeout)",
            ),
            (
                spec(1, Duration::ZERO),
                "spec.step_timeout = 0ns: must be above 0 and at most 5s (--max-step-timeout)",
            ),
            (
                spec(crate::jobs::MAX_WORLD_SIZE + 1, Duration::from_secs(1)),
                "spec.world_size = 65537: must be at most 65536",
            ),
        ] {
            match registry.create("job", spec) {
                Err(error @ JobError::InvalidSpec(_)) => assert_eq!(error.to_string(), message),
                other => panic!("{message}: {other:?}"),
            }
        }
        assert!(registry.is_empty());
        assert!(
            registry
                .create("job", spec(2, Duration::from_secs(5)))
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_batch_whose_weights_cannot_be_sent_back_is_refused_before_its_step() {
        let registry = registry();
        registry
            .create("job", spec(1, Duration::from_secs(1)))
            .unwrap();
        let input = |elements: usize| StepInput {
            step: 0,
            rank: 0,
            batch: BatchInput::GradientNorms(Bytes::from(vec![0u8; 4 * elements])),
            label_weights: None,
        };
        let refused = registry.harmonize("job", input(101)).await.unwrap_err();
        assert!(
            matches!(refused, JobError::ResponseTooLarge(_)),
            "{refused:?}"
        );
        assert!(
            refused
                .to_string()
                .starts_with("gradient_norms has 101 elements"),
            "{refused}"
        );
        assert_eq!(registry.get("job").unwrap().snapshot().steps, 0);
        registry.harmonize("job", input(100)).await.unwrap();
    }
}
