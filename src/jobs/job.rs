use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use parking_lot::Mutex;

use super::{JobError, JobSpec, StepObserver};
use crate::ghm::{self, BatchCounts, BinEdges, BinTable, Density, InputField, Loss};

/// What a request brings to a step.
#[derive(Clone, Debug)]
pub enum BatchInput {
    /// Little-endian float32 g per element.
    GradientNorms(Bytes),
    /// Little-endian float32 residuals `d = pred - target` (GHM-R only).
    Residuals(Bytes),
    /// Bin counts the client computed itself, with its raw tot.
    Histogram { counts: Vec<u64>, tot: f64 },
}

impl BatchInput {
    /// Elements the kernels will walk over: what decides whether a batch is worth moving off
    /// the async runtime.
    pub fn element_count(&self) -> usize {
        match self {
            Self::GradientNorms(bytes) | Self::Residuals(bytes) => bytes.len() / 4,
            Self::Histogram { .. } => 0,
        }
    }
}

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
    pub table: BinTable,
    /// The density after the step; empty when the job has no EMA.
    pub acc_sum: Vec<f32>,
    /// Ranks the step was applied without (partial steps only).
    pub missing_ranks: Vec<u32>,
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
    pub spec: JobSpec,
    pub acc_sum: Vec<f32>,
    pub steps: u64,
    pub elements: u64,
    pub next_step: u64,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
}

struct JobState {
    density: Density,
    steps: u64,
    elements: u64,
    update_time: SystemTime,
}

pub struct Job {
    id: String,
    spec: JobSpec,
    edges: BinEdges,
    create_time: SystemTime,
    /// A `parking_lot` mutex and not a tokio one: it is never held across an await, and the
    /// critical section is an O(bins) update, so blocking briefly beats a queue of wakers.
    state: Mutex<JobState>,
}

/// A batch after pass one: validated and counted, ready to be weighed once its step's table
/// is known.
pub(super) struct PreparedBatch {
    norms: PreparedNorms,
    label_weights: Option<Bytes>,
    pub(super) counts: BatchCounts,
}

enum PreparedNorms {
    /// Histogram input: there are no elements to weigh.
    None,
    /// Norms as they came off the wire: no copy.
    Wire(Bytes),
    /// Norms derived from residuals.
    Derived(Vec<[u8; 4]>),
}

impl Job {
    pub fn new(id: String, spec: JobSpec) -> Self {
        let now = SystemTime::now();
        Self {
            edges: BinEdges::new(spec.ghm.loss(), spec.ghm.bins()),
            state: Mutex::new(JobState {
                density: Density::new(spec.ghm.bins()),
                steps: 0,
                elements: 0,
                update_time: now,
            }),
            id,
            spec,
            create_time: now,
        }
    }

    /// A job as a snapshot recorded it, checked as strictly as a RestoreJob request.
    pub fn from_snapshot(snapshot: JobSnapshot) -> Result<Self, JobError> {
        let bins = snapshot.spec.ghm.bins();
        if snapshot.acc_sum.len() != bins {
            return Err(JobError::InvalidRequest {
                id: snapshot.id,
                reason: format!(
                    "state.acc_sum has {} entries: the job has {bins} bins",
                    snapshot.acc_sum.len()
                ),
            });
        }
        if let Some((index, value)) = snapshot
            .acc_sum
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(JobError::InvalidRequest {
                id: snapshot.id,
                reason: format!("state.acc_sum[{index}] = {value}: must be finite and >= 0"),
            });
        }
        Ok(Self {
            edges: BinEdges::new(snapshot.spec.ghm.loss(), bins),
            state: Mutex::new(JobState {
                density: Density::from_acc_sum(snapshot.acc_sum),
                steps: snapshot.steps,
                elements: snapshot.elements,
                update_time: snapshot.update_time,
            }),
            id: snapshot.id,
            spec: snapshot.spec,
            create_time: snapshot.create_time,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    pub fn snapshot(&self) -> JobSnapshot {
        let state = self.state.lock();
        JobSnapshot {
            id: self.id.clone(),
            spec: self.spec.clone(),
            acc_sum: state.density.acc_sum().to_vec(),
            steps: state.steps,
            elements: state.elements,
            next_step: 0,
            create_time: self.create_time,
            update_time: state.update_time,
        }
    }

    fn input_error(&self, source: ghm::InputError) -> JobError {
        JobError::Input {
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

    /// Pass one, outside any lock: checks the request against the job and counts its bins.
    pub(super) fn prepare(&self, input: &StepInput) -> Result<PreparedBatch, JobError> {
        let spec = &self.spec.ghm;
        let label_weights = input.label_weights.clone();
        let (norms, counts) = match &input.batch {
            BatchInput::Histogram { counts, tot } => {
                if label_weights.is_some() {
                    return Err(self.invalid_request(
                        "label_weights cannot go with a histogram: count only valid elements",
                    ));
                }
                let counts = ghm::validate_histogram(spec.loss(), spec.bins(), counts, *tot)
                    .map_err(|e| self.input_error(e))?;
                (PreparedNorms::None, counts)
            }
            BatchInput::GradientNorms(bytes) => {
                let (norms, weights) =
                    ghm::float32_views(bytes, InputField::GradientNorms, label_weights.as_deref())
                        .map_err(|e| self.input_error(e))?;
                let counts = ghm::count_batch(
                    spec.loss(),
                    &self.edges,
                    norms,
                    InputField::GradientNorms,
                    weights,
                )
                .map_err(|e| self.input_error(e))?;
                (PreparedNorms::Wire(bytes.clone()), counts)
            }
            BatchInput::Residuals(bytes) => {
                if spec.loss() != Loss::GhmR {
                    return Err(self.invalid_request(
                        "residuals are for GHM-R jobs; send gradient_norms for GHM-C",
                    ));
                }
                let (residuals, weights) =
                    ghm::float32_views(bytes, InputField::Residuals, label_weights.as_deref())
                        .map_err(|e| self.input_error(e))?;
                let norms = ghm::norms_from_residuals(residuals, spec.mu())
                    .map_err(|e| self.input_error(e))?;
                let counts = ghm::count_batch(
                    spec.loss(),
                    &self.edges,
                    &norms,
                    InputField::Residuals,
                    weights,
                )
                .map_err(|e| self.input_error(e))?;
                (PreparedNorms::Derived(norms), counts)
            }
        };
        Ok(PreparedBatch {
            norms,
            label_weights,
            counts,
        })
    }

    /// The one place a job's state changes for a step: the density update under the job's lock.
    pub(super) fn apply(
        &self,
        counts: &BatchCounts,
        ranks: usize,
        missing_ranks: Vec<u32>,
        observer: &dyn StepObserver,
    ) -> AppliedStep {
        let momentum = self.spec.ghm.momentum();
        let mut state = self.state.lock();
        let table = state.density.step(momentum, counts);
        state.steps += 1;
        state.elements = state.elements.saturating_add(counts.valid_elements());
        state.update_time = SystemTime::now();
        let acc_sum = if self.spec.ghm.uses_ema() {
            state.density.acc_sum().to_vec()
        } else {
            Vec::new()
        };
        drop(state);
        observer.step_applied(
            self.spec.ghm.loss(),
            counts.valid_elements(),
            ranks,
            missing_ranks.len(),
        );
        AppliedStep {
            table,
            acc_sum,
            missing_ranks,
        }
    }

    /// Pass two, outside any lock: this request's element weights from its step's table.
    pub(super) fn weigh(
        &self,
        batch: &PreparedBatch,
        table: &BinTable,
        observer: &dyn StepObserver,
    ) -> Option<Vec<u8>> {
        let norms: &[[u8; 4]] = match &batch.norms {
            PreparedNorms::None => return None,
            PreparedNorms::Wire(bytes) => bytes.as_chunks::<4>().0,
            PreparedNorms::Derived(norms) => norms,
        };
        let weights = batch
            .label_weights
            .as_deref()
            .map(|bytes| bytes.as_chunks::<4>().0);
        observer.elements_weighed(self.spec.ghm.loss(), norms.len() as u64);
        Some(ghm::write_weights(&self.edges, table, norms, weights))
    }

    /// An asynchronous step: prepared, applied and weighed at once.
    pub(super) fn run_async_step(
        &self,
        input: &StepInput,
        observer: &dyn StepObserver,
    ) -> Result<StepOutcome, JobError> {
        if input.rank != 0 {
            return Err(self.invalid_request(format!(
                "rank = {}: an asynchronous job (world_size {}) only has rank 0",
                input.rank, self.spec.world_size
            )));
        }
        let batch = self.prepare(input)?;
        let applied = self.apply(&batch.counts, 1, Vec::new(), observer);
        let weights = self.weigh(&batch, &applied.table, observer);
        Ok(StepOutcome {
            step: input.step,
            weights,
            applied: Arc::new(applied),
        })
    }
}
