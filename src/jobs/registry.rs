use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::job::Job;
use super::{
    JobError, JobSnapshot, JobSpec, NoObserver, StepInput, StepObserver, StepOutcome,
    validate_job_id,
};

/// Knobs of the registry that come from the server's configuration.
#[derive(Clone, Debug)]
pub struct RegistryLimits {
    /// Batches with more elements than this are weighed on the blocking pool, so that one
    /// 16M-element batch cannot stall the small requests of other jobs on the async runtime.
    pub offload_elements: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self {
            offload_elements: 1 << 16,
        }
    }
}

/// A cheap, cloneable handle to every job of the server.
#[derive(Clone)]
pub struct Registry {
    jobs: Arc<DashMap<String, Arc<Job>>>,
    limits: Arc<RegistryLimits>,
    observer: Arc<dyn StepObserver>,
}

/// One page of ListJobs.
pub struct ListPage {
    pub jobs: Vec<JobSnapshot>,
    /// The id to continue after; `None` on the last page.
    pub next_after: Option<String>,
}

impl Registry {
    pub fn new(limits: RegistryLimits) -> Self {
        Self {
            jobs: Arc::new(DashMap::new()),
            limits: Arc::new(limits),
            observer: Arc::new(NoObserver),
        }
    }

    /// Reports steps and job counts to `observer` (the metrics) from now on.
    pub fn with_observer(mut self, observer: Arc<dyn StepObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// Puts a job back exactly as a snapshot recorded it (state loaded at start-up), replacing
    /// any job of the same id.
    pub fn insert_snapshot(&self, snapshot: JobSnapshot) -> Result<(), JobError> {
        validate_job_id(&snapshot.id)?;
        let loss = snapshot.spec.ghm.loss();
        let job = Arc::new(Job::from_snapshot(snapshot)?);
        if self.jobs.insert(job.id().to_owned(), job).is_none() {
            self.observer.jobs_changed(loss, 1);
        }
        Ok(())
    }

    /// Every job's snapshot, in no particular order (for persistence).
    pub fn snapshots(&self) -> Vec<JobSnapshot> {
        let jobs: Vec<Arc<Job>> = self.jobs.iter().map(|e| Arc::clone(e.value())).collect();
        jobs.iter().map(|job| job.snapshot()).collect()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Creates a job, or returns the existing one if it has the same spec, so that every rank of
    /// a distributed job may call this at start-up. The bool says whether it was created.
    pub fn create(&self, id: &str, spec: JobSpec) -> Result<(JobSnapshot, bool), JobError> {
        validate_job_id(id)?;
        let job = match self.jobs.entry(id.to_owned()) {
            Entry::Occupied(existing) => {
                if existing.get().spec() != &spec {
                    return Err(JobError::AlreadyExists { id: id.to_owned() });
                }
                let job = Arc::clone(existing.get());
                drop(existing);
                return Ok((job.snapshot(), false));
            }
            Entry::Vacant(slot) => {
                let job = Arc::new(Job::new(id.to_owned(), spec));
                slot.insert(Arc::clone(&job));
                self.observer.jobs_changed(job.spec().ghm.loss(), 1);
                job
            }
        };
        Ok((job.snapshot(), true))
    }

    /// The job's handle, with the map's shard already released.
    pub fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        validate_job_id(id)?;
        self.jobs
            .get(id)
            .map(|entry| Arc::clone(entry.value()))
            .ok_or_else(|| JobError::NotFound { id: id.to_owned() })
    }

    pub fn delete(&self, id: &str) -> Result<(), JobError> {
        validate_job_id(id)?;
        let (_, job) = self
            .jobs
            .remove(id)
            .ok_or_else(|| JobError::NotFound { id: id.to_owned() })?;
        self.observer.jobs_changed(job.spec().ghm.loss(), -1);
        Ok(())
    }

    /// Jobs in id order, starting after `after`, at most `page_size` of them.
    pub fn list(&self, prefix: &str, after: Option<&str>, page_size: usize) -> ListPage {
        let mut ids: Vec<String> = self
            .jobs
            .iter()
            .map(|entry| entry.key().clone())
            .filter(|id| id.starts_with(prefix) && after.is_none_or(|after| id.as_str() > after))
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

    /// Weighs one request. Large batches go to the blocking pool; the job's lock is only taken
    /// for the density update in the middle, so concurrent requests on one job apply one after
    /// another and never mix.
    pub async fn harmonize(&self, id: &str, input: StepInput) -> Result<StepOutcome, JobError> {
        let job = self.get(id)?;
        if job.spec().is_step_synchronous() {
            return Err(JobError::InvalidSpec(format!(
                "job {id:?} is step-synchronous, which this server does not support yet"
            )));
        }
        if input.batch.element_count() <= self.limits.offload_elements {
            return job.run_async_step(&input, &*self.observer);
        }
        let observer = Arc::clone(&self.observer);
        tokio::task::spawn_blocking(move || job.run_async_step(&input, &*observer))
            .await
            .map_err(|e| JobError::Internal(format!("weighing task failed: {e}")))?
    }
}
