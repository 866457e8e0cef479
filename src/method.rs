//! The seam between the job core and a method's math: what every method that keeps one running
//! statistic per job (GHM, Seesaw, EQLv2) has in common, so that the step barrier, timeouts,
//! retries, restore, persistence and metrics can be written once and never ask which method a
//! job runs.
//!
//! A method is four parts (issue 11):
//! 1. a **contribution**: what one rank brings to a step, checked against the job by
//!    [`Method::check`] before any lock is taken;
//! 2. a **reduction**: the ranks' contributions of one step, in rank order, made into the step's
//!    total by [`Method::reduce`]. The total is itself a contribution, that of one process that
//!    saw the global batch, which is what makes W workers share one statistic;
//! 3. a **fold**: the total folded into the job's state by [`Method::fold`], which leaves the
//!    state untouched when it refuses, so that a rejected step changes nothing;
//! 4. a **table**: what the fold hands back for every rank's response.
//!
//! [`MethodSpec`] is the one place that knows every method: a job core written against it (and
//! its `Any*` types) never matches on a method itself, and adding a method is one variant in each
//! of its exhaustive matches.
//!
//! Everything here is pure: no async, no I/O, nothing of gRPC. See docs/methods.md for how the
//! job core, the proto and persistence plug into it.

use bytes::Bytes;

use crate::eqlv2::{self, Eqlv2, Eqlv2State, GradContribution};
use crate::ghm::{self, BatchCounts, BinEdges, BinTable, BinnedBatch, Density, InputField, Loss};
use crate::seesaw::{self, LabelCounts, Seesaw, SeesawState};

pub use crate::engine::{MAX_CLASSES, MAX_RANKS, Method};

/// GHM on the engine, through `ghm`'s public functions only.
///
/// A contribution is a batch's [`BatchCounts`] (from `ghm::bin_batch` or a client's histogram);
/// the per-element weights of pass two stay outside the four parts, since only GHM has elements
/// to weigh: [`JobMethod::prepare`] keeps the `BinnedBatch` in a [`Prepared`] beside the
/// contribution, and [`Prepared::weigh`] weighs it with the step's table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ghm {
    pub spec: ghm::Spec,
}

impl Method for Ghm {
    type Contribution = BatchCounts;
    type State = Density;
    type Table = BinTable;
    type Error = ghm::InputError;

    fn initial_state(&self) -> Density {
        Density::new(self.spec.bins())
    }

    /// The same checks a client's histogram gets: a batch binned by `ghm` passes them by
    /// construction.
    fn check(&self, contribution: &BatchCounts) -> Result<(), ghm::InputError> {
        ghm::validate_histogram(
            self.spec.loss(),
            self.spec.bins(),
            &contribution.counts,
            contribution.tot,
        )
        .map(|_| ())
    }

    /// Integer counts: the total is the same in any order. Saturating, as the job core sums
    /// today, since the number of elements per request is bounded far below 2^64 / 2^16.
    fn reduce(&self, in_rank_order: Vec<BatchCounts>) -> Result<BatchCounts, ghm::InputError> {
        let mut total = BatchCounts::empty(self.spec.bins());
        for counts in &in_rank_order {
            total.add(counts);
        }
        Ok(total)
    }

    /// `Density::step` indexes the density by the total's bins, so a total of another length is
    /// refused here rather than trusted; the density itself is the job's, checked when it was
    /// made or restored ([`MethodSpec::check_state`]).
    fn fold(&self, state: &mut Density, total: &BatchCounts) -> Result<BinTable, ghm::InputError> {
        if total.counts.len() != self.spec.bins() {
            return Err(ghm::InputError::HistogramLength {
                expected: self.spec.bins(),
                got: total.counts.len(),
            });
        }
        Ok(state.step(self.spec.momentum(), total))
    }
}

/// Which method a job runs, for metrics labels and messages: GHM counts as two, since its two
/// losses have always been told apart there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MethodKind {
    GhmC,
    GhmR,
    Seesaw,
    Eqlv2,
}

impl MethodKind {
    /// Every kind, for what must exist per kind before the first job (metrics families).
    pub const ALL: [MethodKind; 4] = [Self::GhmC, Self::GhmR, Self::Seesaw, Self::Eqlv2];

    /// As the metrics' `loss` label and the Python client spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::GhmC => "ghm_c",
            Self::GhmR => "ghm_r",
            Self::Seesaw => "seesaw",
            Self::Eqlv2 => "eqlv2",
        }
    }
}

/// A job's method and its checked parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MethodSpec {
    Ghm(Ghm),
    Seesaw(Seesaw),
    Eqlv2(Eqlv2),
}

/// One rank's contribution to a step of any method.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyContribution {
    Ghm(BatchCounts),
    Seesaw(LabelCounts),
    Eqlv2(GradContribution),
}

impl AnyContribution {
    /// The request field that carries it, for the message of a contribution sent to a job of
    /// another method.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Ghm(_) => "gradient_norms, residuals or histogram",
            Self::Seesaw(_) => "seesaw",
            Self::Eqlv2(_) => "eqlv2",
        }
    }
}

impl AnyContribution {
    /// What the job's `elements` counter adds up: GHM's valid elements, Seesaw's samples; an
    /// EQLv2 contribution is column sums and tells no sample count.
    pub fn samples(&self) -> u64 {
        match self {
            Self::Ghm(counts) => counts.valid_elements(),
            Self::Seesaw(counts) => counts.samples(),
            Self::Eqlv2(_) => 0,
        }
    }
}

/// A job's state between steps, of any method.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyState {
    Ghm(Density),
    Seesaw(SeesawState),
    Eqlv2(Eqlv2State),
}

/// A step's table, of any method.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyTable {
    Ghm(BinTable),
    Seesaw(Vec<f32>),
    Eqlv2(Eqlv2State),
}

/// Any method's refusal, or a contribution or state of one method given to a job of another.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MethodError {
    #[error(transparent)]
    Ghm(#[from] ghm::InputError),
    #[error(transparent)]
    Seesaw(#[from] seesaw::Error),
    #[error(transparent)]
    Eqlv2(#[from] eqlv2::Error),
    #[error("{sent}: the job runs {}, send {}", job.name(), expected_input(*job))]
    WrongMethod { job: MethodKind, sent: &'static str },
    #[error("state.acc_sum has {got} entries: the job has {bins} bins")]
    AccSumLength { bins: usize, got: usize },
    #[error("state.acc_sum[{index}] = {value}: must be finite and >= 0")]
    AccSum { index: usize, value: f32 },
    /// A request that cannot be a contribution of the job's method as sent (the reason names
    /// the field).
    #[error("{0}")]
    Request(String),
    #[error("{sent}: the job runs {}, whose state is {}", job.name(), expected_state(*job))]
    WrongState { job: MethodKind, sent: &'static str },
}

fn expected_state(kind: MethodKind) -> &'static str {
    match kind {
        MethodKind::GhmC | MethodKind::GhmR => "state.acc_sum (with no method_state)",
        MethodKind::Seesaw => "state.seesaw (cum_samples)",
        MethodKind::Eqlv2 => "state.eqlv2 (pos_grad, neg_grad and pos_neg)",
    }
}

fn expected_input(kind: MethodKind) -> &'static str {
    match kind {
        MethodKind::GhmC => "gradient_norms or histogram",
        MethodKind::GhmR => "gradient_norms, residuals or histogram",
        MethodKind::Seesaw => "seesaw (label_counts or labels)",
        MethodKind::Eqlv2 => "eqlv2 (pos_grad and neg_grad)",
    }
}

impl MethodSpec {
    pub fn kind(&self) -> MethodKind {
        match self {
            Self::Ghm(ghm) => match ghm.spec.loss() {
                Loss::GhmC => MethodKind::GhmC,
                Loss::GhmR => MethodKind::GhmR,
            },
            Self::Seesaw(_) => MethodKind::Seesaw,
            Self::Eqlv2(_) => MethodKind::Eqlv2,
        }
    }

    /// Checks a state from a restore or a state file against the job, with the messages the job
    /// core gives today for GHM's `acc_sum`.
    pub fn check_state(&self, state: &AnyState) -> Result<(), MethodError> {
        match (self, state) {
            (Self::Ghm(method), AnyState::Ghm(density)) => {
                let acc_sum = density.acc_sum();
                let bins = method.spec.bins();
                if acc_sum.len() != bins {
                    return Err(MethodError::AccSumLength {
                        bins,
                        got: acc_sum.len(),
                    });
                }
                match acc_sum
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
                {
                    Some((index, &value)) => Err(MethodError::AccSum { index, value }),
                    None => Ok(()),
                }
            }
            (Self::Seesaw(method), AnyState::Seesaw(state)) => Ok(method.check_state(state)?),
            (Self::Eqlv2(method), AnyState::Eqlv2(state)) => Ok(method.check_state(state)?),
            (Self::Ghm(_) | Self::Seesaw(_) | Self::Eqlv2(_), _) => Err(self.wrong_state()),
        }
    }

    fn wrong(&self, sent: &AnyContribution) -> MethodError {
        MethodError::WrongMethod {
            job: self.kind(),
            sent: sent.field(),
        }
    }

    /// The state is the job's own: one of another method is the job core's bug, not the
    /// client's, but it is refused the same way rather than trusted.
    fn wrong_state(&self) -> MethodError {
        MethodError::WrongMethod {
            job: self.kind(),
            sent: "state",
        }
    }
}

/// Moves every contribution out of its variant, or names the first of another method.
fn unwrap_all<C>(
    spec: &MethodSpec,
    in_rank_order: Vec<AnyContribution>,
    unwrap: impl Fn(AnyContribution) -> Result<C, AnyContribution>,
) -> Result<Vec<C>, MethodError> {
    in_rank_order
        .into_iter()
        .map(|contribution| unwrap(contribution).map_err(|other| spec.wrong(&other)))
        .collect()
}

impl Method for MethodSpec {
    type Contribution = AnyContribution;
    type State = AnyState;
    type Table = AnyTable;
    type Error = MethodError;

    fn initial_state(&self) -> AnyState {
        match self {
            Self::Ghm(method) => AnyState::Ghm(method.initial_state()),
            Self::Seesaw(method) => AnyState::Seesaw(method.initial_state()),
            Self::Eqlv2(method) => AnyState::Eqlv2(method.initial_state()),
        }
    }

    fn check(&self, contribution: &AnyContribution) -> Result<(), MethodError> {
        match (self, contribution) {
            (Self::Ghm(method), AnyContribution::Ghm(c)) => Ok(method.check(c)?),
            (Self::Seesaw(method), AnyContribution::Seesaw(c)) => Ok(method.check(c)?),
            (Self::Eqlv2(method), AnyContribution::Eqlv2(c)) => Ok(method.check(c)?),
            (Self::Ghm(_) | Self::Seesaw(_) | Self::Eqlv2(_), other) => Err(self.wrong(other)),
        }
    }

    fn reduce(&self, in_rank_order: Vec<AnyContribution>) -> Result<AnyContribution, MethodError> {
        Ok(match self {
            Self::Ghm(method) => AnyContribution::Ghm(method.reduce(unwrap_all(
                self,
                in_rank_order,
                |c| match c {
                    AnyContribution::Ghm(c) => Ok(c),
                    other => Err(other),
                },
            )?)?),
            Self::Seesaw(method) => AnyContribution::Seesaw(method.reduce(unwrap_all(
                self,
                in_rank_order,
                |c| match c {
                    AnyContribution::Seesaw(c) => Ok(c),
                    other => Err(other),
                },
            )?)?),
            Self::Eqlv2(method) => AnyContribution::Eqlv2(method.reduce(unwrap_all(
                self,
                in_rank_order,
                |c| match c {
                    AnyContribution::Eqlv2(c) => Ok(c),
                    other => Err(other),
                },
            )?)?),
        })
    }

    fn fold(&self, state: &mut AnyState, total: &AnyContribution) -> Result<AnyTable, MethodError> {
        match (self, state, total) {
            (Self::Ghm(method), AnyState::Ghm(state), AnyContribution::Ghm(total)) => {
                Ok(AnyTable::Ghm(method.fold(state, total)?))
            }
            (Self::Seesaw(method), AnyState::Seesaw(state), AnyContribution::Seesaw(total)) => {
                Ok(AnyTable::Seesaw(method.fold(state, total)?))
            }
            (Self::Eqlv2(method), AnyState::Eqlv2(state), AnyContribution::Eqlv2(total)) => {
                Ok(AnyTable::Eqlv2(method.fold(state, total)?))
            }
            (Self::Ghm(_), AnyState::Ghm(_), other)
            | (Self::Seesaw(_), AnyState::Seesaw(_), other)
            | (Self::Eqlv2(_), AnyState::Eqlv2(_), other) => Err(self.wrong(other)),
            (Self::Ghm(_) | Self::Seesaw(_) | Self::Eqlv2(_), _, _) => Err(self.wrong_state()),
        }
    }
}

/// What a request brings to a step, as the API decoded it from the request's `input`.
#[derive(Clone, Debug)]
pub enum BatchInput {
    /// Little-endian float32 g per element (GHM).
    GradientNorms(Bytes),
    /// Little-endian float32 residuals `d = pred - target` (GHM-R only).
    Residuals(Bytes),
    /// Bin counts the client computed itself, with its raw tot (GHM).
    Histogram { counts: Vec<u64>, tot: f64 },
    /// A Seesaw rank's samples per label, C + 1 counts.
    SeesawCounts(Vec<u64>),
    /// A Seesaw rank's labels, one per sample.
    SeesawLabels(Vec<i64>),
    /// An EQLv2 rank's gradient sums, C little-endian float32 each.
    Eqlv2 { pos_grad: Bytes, neg_grad: Bytes },
}

impl BatchInput {
    /// Values the kernels will walk over: what decides whether a batch is worth moving off the
    /// async runtime, and what `--max-elements-per-request` bounds.
    pub fn element_count(&self) -> usize {
        match self {
            Self::GradientNorms(bytes) | Self::Residuals(bytes) => bytes.len() / 4,
            Self::SeesawLabels(labels) => labels.len(),
            Self::Eqlv2 { pos_grad, neg_grad } => (pos_grad.len() + neg_grad.len()) / 4,
            Self::Histogram { .. } | Self::SeesawCounts(_) => 0,
        }
    }

    /// The request field that carries the elements; `None` for counts, which have none.
    pub fn element_field(&self) -> Option<&'static str> {
        match self {
            Self::GradientNorms(_) => Some("gradient_norms"),
            Self::Residuals(_) => Some("residuals"),
            Self::SeesawLabels(_) => Some("seesaw.labels"),
            Self::Eqlv2 { .. } => Some("eqlv2.pos_grad and eqlv2.neg_grad"),
            Self::Histogram { .. } | Self::SeesawCounts(_) => None,
        }
    }

    /// Whether the response carries one weight per element, which bounds the elements by the
    /// largest response a server may send.
    pub fn weighs_elements(&self) -> bool {
        matches!(self, Self::GradientNorms(_) | Self::Residuals(_))
    }

    /// The request field, for the message of an input sent to a job of another method.
    fn field(&self) -> &'static str {
        match self {
            Self::GradientNorms(_) => "gradient_norms",
            Self::Residuals(_) => "residuals",
            Self::Histogram { .. } => "histogram",
            Self::SeesawCounts(_) | Self::SeesawLabels(_) => "seesaw",
            Self::Eqlv2 { .. } => "eqlv2",
        }
    }
}

/// A request after pass one: checked, its contribution taken out, ready to be weighed once its
/// step's table is known. A GHM batch keeps one byte per element (its bin), not the request's
/// norms and label weights, so that a step waiting for its other ranks holds an eighth of the
/// memory; the other methods keep nothing, since their clients weigh from the state.
pub struct Prepared {
    binned: Option<BinnedBatch>,
}

impl Prepared {
    /// Elements pass two will weigh.
    pub fn element_count(&self) -> usize {
        self.binned.as_ref().map_or(0, BinnedBatch::len)
    }

    /// Pass two: this request's element weights from its step's table, little-endian float32;
    /// `None` when the request had no elements to weigh.
    pub fn weigh(&self, table: &AnyTable) -> Option<Vec<u8>> {
        let binned = self.binned.as_ref()?;
        match table {
            AnyTable::Ghm(table) => Some(binned.write_weights(table)),
            AnyTable::Seesaw(_) | AnyTable::Eqlv2(_) => None,
        }
    }
}

/// The largest raw tot one GHM request may carry. A GHM-R tot is a sum of label weights, which
/// may be anything finite, and a weight is at most tot / ((1 - momentum) * 1) before rounding:
/// past this bound it would overflow float32 and weigh elements by infinity (the fuzzer found
/// it). The 2^17 leaves room for a step summing the tots of 2^16 ranks ([`MAX_RANKS`]) and for
/// float32 rounding; the bound is still far above any real batch's tot.
pub fn max_tot(momentum: f64) -> f64 {
    let floor = if momentum > 0.0 { 1.0 - momentum } else { 1.0 };
    f64::from(f32::MAX) * floor / f64::from(1u32 << 17)
}

/// A job's method with what its requests need prepared once (GHM's bin edges), so that pass one
/// is one call for every method.
#[derive(Clone, Debug)]
pub struct JobMethod {
    spec: MethodSpec,
    /// GHM only: the job's float32 bin edges.
    edges: Option<BinEdges>,
}

impl JobMethod {
    pub fn new(spec: MethodSpec) -> Self {
        let edges = match &spec {
            MethodSpec::Ghm(ghm) => Some(BinEdges::new(ghm.spec.loss(), ghm.spec.bins())),
            MethodSpec::Seesaw(_) | MethodSpec::Eqlv2(_) => None,
        };
        Self { spec, edges }
    }

    pub fn spec(&self) -> &MethodSpec {
        &self.spec
    }

    /// Pass one, outside any lock: checks a request against the job and takes its contribution
    /// out of it. Every refusal names the field (and index) and changes nothing.
    pub fn prepare(
        &self,
        batch: &BatchInput,
        label_weights: Option<&[u8]>,
    ) -> Result<(Prepared, AnyContribution), MethodError> {
        let nothing = Prepared { binned: None };
        match (&self.spec, batch) {
            (MethodSpec::Ghm(method), _) => self.prepare_ghm(method, batch, label_weights),
            (MethodSpec::Seesaw(method), BatchInput::SeesawCounts(counts)) => {
                refuse_label_weights(label_weights, MethodKind::Seesaw)?;
                let counts = LabelCounts {
                    counts: counts.clone(),
                };
                method.check(&counts)?;
                Ok((nothing, AnyContribution::Seesaw(counts)))
            }
            (MethodSpec::Seesaw(method), BatchInput::SeesawLabels(labels)) => {
                refuse_label_weights(label_weights, MethodKind::Seesaw)?;
                let counts = method.count_labels(labels)?;
                Ok((nothing, AnyContribution::Seesaw(counts)))
            }
            (MethodSpec::Eqlv2(method), BatchInput::Eqlv2 { pos_grad, neg_grad }) => {
                refuse_label_weights(label_weights, MethodKind::Eqlv2)?;
                let contribution = GradContribution {
                    pos_grad: eqlv2::floats_from_le_bytes(eqlv2::Field::PosGrad, pos_grad)?,
                    neg_grad: eqlv2::floats_from_le_bytes(eqlv2::Field::NegGrad, neg_grad)?,
                };
                method.check(&contribution)?;
                Ok((nothing, AnyContribution::Eqlv2(contribution)))
            }
            (MethodSpec::Seesaw(_) | MethodSpec::Eqlv2(_), other) => {
                Err(MethodError::WrongMethod {
                    job: self.spec.kind(),
                    sent: other.field(),
                })
            }
        }
    }

    fn prepare_ghm(
        &self,
        method: &Ghm,
        batch: &BatchInput,
        label_weights: Option<&[u8]>,
    ) -> Result<(Prepared, AnyContribution), MethodError> {
        let spec = &method.spec;
        let edges = self.edges.as_ref().ok_or(MethodError::WrongMethod {
            job: self.spec.kind(),
            sent: "a job without bin edges",
        })?;
        let (binned, counts) = match batch {
            BatchInput::Histogram { counts, tot } => {
                if label_weights.is_some() {
                    return Err(MethodError::Request(
                        "label_weights cannot go with a histogram: count only valid elements"
                            .to_owned(),
                    ));
                }
                let counts = ghm::validate_histogram(spec.loss(), spec.bins(), counts, *tot)?;
                (None, counts)
            }
            BatchInput::GradientNorms(bytes) => {
                let (norms, weights) =
                    ghm::float32_views(bytes, InputField::GradientNorms, label_weights)?;
                let binned = ghm::bin_batch(
                    spec.loss(),
                    edges,
                    norms,
                    InputField::GradientNorms,
                    weights,
                )?;
                let counts = binned.counts().clone();
                (Some(binned), counts)
            }
            BatchInput::Residuals(bytes) => {
                if spec.loss() != Loss::GhmR {
                    return Err(MethodError::Request(
                        "residuals are for GHM-R jobs; send gradient_norms for GHM-C".to_owned(),
                    ));
                }
                let (residuals, weights) =
                    ghm::float32_views(bytes, InputField::Residuals, label_weights)?;
                let norms = ghm::norms_from_residuals(residuals, spec.mu())?;
                let binned =
                    ghm::bin_batch(spec.loss(), edges, &norms, InputField::Residuals, weights)?;
                let counts = binned.counts().clone();
                (Some(binned), counts)
            }
            BatchInput::SeesawCounts(_)
            | BatchInput::SeesawLabels(_)
            | BatchInput::Eqlv2 { .. } => {
                return Err(MethodError::WrongMethod {
                    job: self.spec.kind(),
                    sent: batch.field(),
                });
            }
        };
        let max_tot = max_tot(spec.momentum());
        if counts.tot > max_tot {
            let field = match batch {
                BatchInput::Histogram { .. } => "histogram.tot",
                _ => "tot (the sum of label_weights)",
            };
            return Err(MethodError::Request(format!(
                "{field} = {:e}: above {max_tot:e}, the largest tot whose weights stay finite in \
                 float32 with momentum {}",
                counts.tot,
                spec.momentum()
            )));
        }
        Ok((Prepared { binned }, AnyContribution::Ghm(counts)))
    }
}

/// Seesaw counts every sample whatever its weight, as the reference does, and EQLv2's sums
/// already carry the weights: label weights would be silently ignored, so they are refused.
fn refuse_label_weights(label_weights: Option<&[u8]>, kind: MethodKind) -> Result<(), MethodError> {
    match label_weights {
        None => Ok(()),
        Some(_) => Err(MethodError::Request(format!(
            "label_weights is for gradient_norms and residuals, and the job runs {}, whose \
             contribution {}: leave it empty",
            kind.name(),
            match kind {
                MethodKind::Eqlv2 => "already holds the sample weights in its sums",
                MethodKind::GhmC | MethodKind::GhmR | MethodKind::Seesaw => {
                    "counts every sample, whatever its weight, as mmdetection does"
                }
            }
        ))),
    }
}

impl AnyContribution {
    /// The heap bytes it holds, for the memory account of a step that keeps it whole.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Self::Ghm(counts) => 8 * counts.counts.len(),
            Self::Seesaw(counts) => 8 * counts.counts.len(),
            Self::Eqlv2(grads) => 4 * (grads.pos_grad.len() + grads.neg_grad.len()),
        }
    }

    /// Integer counts (and a float tot) that give the same total summed in any order, so that
    /// the step barrier can add them up as they arrive and keep only what a resend needs to
    /// take back out; `None` for a contribution that must be reduced in rank order.
    pub fn counts(&self) -> Option<(&[u64], f64)> {
        match self {
            Self::Ghm(counts) => Some((&counts.counts, counts.tot)),
            Self::Seesaw(counts) => Some((&counts.counts, 0.0)),
            Self::Eqlv2(_) => None,
        }
    }
}

impl AnyState {
    /// GHM's density, for what only a density has (the `--job-metrics` series, the responses'
    /// `acc_sum`).
    pub fn ghm_density(&self) -> Option<&Density> {
        match self {
            Self::Ghm(density) => Some(density),
            Self::Seesaw(_) | Self::Eqlv2(_) => None,
        }
    }
}

impl MethodSpec {
    /// The length of its contributions' counts when they are counts ([`AnyContribution::counts`]).
    pub fn counts_len(&self) -> Option<usize> {
        match self {
            Self::Ghm(method) => Some(method.spec.bins()),
            Self::Seesaw(method) => Some(method.labels()),
            Self::Eqlv2(_) => None,
        }
    }

    /// A step's total from its ranks' counts summed exactly and their tots summed in rank order.
    pub fn total_of_counts(
        &self,
        counts: Vec<u64>,
        tot: f64,
    ) -> Result<AnyContribution, MethodError> {
        match self {
            Self::Ghm(_) => Ok(AnyContribution::Ghm(BatchCounts { counts, tot })),
            Self::Seesaw(_) => Ok(AnyContribution::Seesaw(LabelCounts { counts })),
            Self::Eqlv2(_) => Err(MethodError::WrongMethod {
                job: self.kind(),
                sent: "counts",
            }),
        }
    }

    /// The float32 values its state holds, for the job's memory account.
    pub fn state_values(&self) -> usize {
        match self {
            Self::Ghm(method) => method.spec.bins(),
            Self::Seesaw(method) => method.labels(),
            Self::Eqlv2(method) => 3 * method.num_classes(),
        }
    }

    /// What the responses report as `acc_sum`: GHM's density when it keeps one (momentum > 0),
    /// else nothing.
    pub fn reported_acc_sum(&self, state: &AnyState) -> Vec<f32> {
        match (self, state) {
            (Self::Ghm(method), AnyState::Ghm(density)) if method.spec.uses_ema() => {
                density.acc_sum().to_vec()
            }
            (Self::Ghm(_) | Self::Seesaw(_) | Self::Eqlv2(_), _) => Vec::new(),
        }
    }

    /// GHM's spec, for what only GHM has (its bin edges, the `--job-metrics` density).
    pub fn ghm(&self) -> Option<&ghm::Spec> {
        match self {
            Self::Ghm(method) => Some(&method.spec),
            Self::Seesaw(_) | Self::Eqlv2(_) => None,
        }
    }
}

/// A state as a client sent it (RestoreJob, ReseedJob), before it is checked against the job.
#[derive(Clone, Debug, PartialEq)]
pub enum StateInput {
    Ghm {
        acc_sum: Vec<f32>,
    },
    Seesaw {
        cum_samples: Vec<f32>,
    },
    Eqlv2 {
        pos_grad: Vec<f32>,
        neg_grad: Vec<f32>,
        pos_neg: Vec<f32>,
    },
}

impl StateInput {
    fn field(&self) -> &'static str {
        match self {
            Self::Ghm { .. } => "state.acc_sum",
            Self::Seesaw { .. } => "state.seesaw",
            Self::Eqlv2 { .. } => "state.eqlv2",
        }
    }
}

/// A GHM step's table as a response reported it (ReseedJobRequest.last_step).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GhmStepInput {
    pub bin_weights: Vec<f32>,
    pub tot: f64,
    pub nonempty_bins: u32,
    pub acc_sum: Vec<f32>,
}

fn first_bad(values: &[f32]) -> Option<(usize, f32)> {
    values
        .iter()
        .copied()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && *v >= 0.0))
}

impl MethodSpec {
    /// The job's state from a client's, checked as strictly as a state file. `from_response`:
    /// the state comes from a response, where a GHM job without EMA reports no `acc_sum` (its
    /// density is all zeros).
    pub fn state_from_input(
        &self,
        input: StateInput,
        from_response: bool,
    ) -> Result<AnyState, MethodError> {
        let state = match (self, input) {
            (Self::Ghm(method), StateInput::Ghm { acc_sum }) => {
                let acc_sum = if acc_sum.is_empty() && from_response && !method.spec.uses_ema() {
                    vec![0.0; method.spec.bins()]
                } else {
                    acc_sum
                };
                AnyState::Ghm(Density::from_acc_sum(acc_sum))
            }
            (Self::Seesaw(method), StateInput::Seesaw { cum_samples }) => {
                AnyState::Seesaw(method.state_from_cum_samples(cum_samples)?)
            }
            (
                Self::Eqlv2(method),
                StateInput::Eqlv2 {
                    pos_grad,
                    neg_grad,
                    pos_neg,
                },
            ) => AnyState::Eqlv2(method.state_from_parts(pos_grad, neg_grad, pos_neg)?),
            (Self::Ghm(_) | Self::Seesaw(_) | Self::Eqlv2(_), other) => {
                return Err(MethodError::WrongState {
                    job: self.kind(),
                    sent: other.field(),
                });
            }
        };
        self.check_state(&state)?;
        Ok(state)
    }

    /// The table of the last applied step as a response reported it, checked to be one this job
    /// could have produced and whose state is `after` (the state a reseed puts in place), with
    /// the `acc_sum` that response reported.
    pub fn last_table(
        &self,
        ghm: &GhmStepInput,
        method_state: Option<StateInput>,
        after: &AnyState,
    ) -> Result<(AnyTable, Vec<f32>), MethodError> {
        let request = |reason: String| MethodError::Request(reason);
        let Self::Ghm(method) = self else {
            let Some(input) = method_state else {
                return Err(MethodError::WrongState {
                    job: self.kind(),
                    sent: "last_step without its state",
                });
            };
            // The method's messages name the fields of a state (`state.seesaw...`): here they
            // are the last step's.
            let state = self.state_from_input(input, true).map_err(|error| {
                let message = error.to_string();
                let field = message.strip_prefix("state.").unwrap_or(&message);
                MethodError::Request(format!("last_step.{field}"))
            })?;
            if &state != after {
                return Err(request(
                    "last_step's state differs from state: the state a step reports is the one \
                     right after it, which the reseed puts in place"
                        .to_owned(),
                ));
            }
            let table = match state {
                AnyState::Seesaw(state) => AnyTable::Seesaw(state.cum_samples().to_vec()),
                AnyState::Eqlv2(state) => AnyTable::Eqlv2(state),
                AnyState::Ghm(_) => return Err(self.wrong_state()),
            };
            return Ok((table, Vec::new()));
        };
        if let Some(input) = method_state {
            return Err(MethodError::WrongState {
                job: self.kind(),
                sent: match input {
                    StateInput::Ghm { .. } => "last_step.acc_sum",
                    StateInput::Seesaw { .. } => "last_step.seesaw",
                    StateInput::Eqlv2 { .. } => "last_step.eqlv2",
                },
            });
        }
        let bins = method.spec.bins();
        let acc_bins = if method.spec.uses_ema() { bins } else { 0 };
        for (field, values, expected, meaning) in [
            (
                "bin_weights",
                &ghm.bin_weights,
                bins,
                format!("the job has {bins} bins"),
            ),
            (
                "acc_sum",
                &ghm.acc_sum,
                acc_bins,
                format!("the job's responses carry {acc_bins}"),
            ),
        ] {
            if values.len() != expected {
                return Err(request(format!(
                    "last_step.{field} has {} entries: {meaning}",
                    values.len()
                )));
            }
            if let Some((index, value)) = first_bad(values) {
                return Err(request(format!(
                    "last_step.{field}[{index}] = {value}: must be finite and >= 0"
                )));
            }
        }
        if !(ghm.tot.is_finite() && ghm.tot >= 0.0) {
            return Err(request(format!(
                "last_step.tot = {}: must be finite and >= 0",
                ghm.tot
            )));
        }
        if ghm.nonempty_bins as usize > bins {
            return Err(request(format!(
                "last_step.nonempty_bins = {}: the job has {bins} bins",
                ghm.nonempty_bins
            )));
        }
        let table = BinTable::from_bin_weights(&ghm.bin_weights, ghm.tot, ghm.nonempty_bins);
        Ok((AnyTable::Ghm(table), ghm.acc_sum.clone()))
    }
}

/// A job's method as a state file records it (`persist::format`, version 3): a code byte, a size
/// (bins or classes), parameters by their f64 bits, then the state as float32 arrays. Written
/// here, beside the methods, so that a new method needs no change to the file format's code.
#[derive(Clone, Debug, PartialEq)]
pub struct MethodRecord {
    pub code: u8,
    pub size: u32,
    pub parameters: Vec<f64>,
}

/// The codes a state file gives the methods, with the parameters each records.
const RECORD_CODES: [(u8, usize); 4] = [(0, 2), (1, 2), (2, 3), (3, 3)];

impl MethodSpec {
    pub fn record(&self) -> MethodRecord {
        let (code, size, parameters) = match self {
            Self::Ghm(ghm) => (
                match ghm.spec.loss() {
                    Loss::GhmC => 0,
                    Loss::GhmR => 1,
                },
                ghm.spec.bins(),
                vec![ghm.spec.momentum(), ghm.spec.mu()],
            ),
            Self::Seesaw(seesaw) => (
                2,
                seesaw.num_classes(),
                vec![seesaw.p(), seesaw.q(), seesaw.eps()],
            ),
            Self::Eqlv2(eqlv2) => (
                3,
                eqlv2.num_classes(),
                vec![eqlv2.gamma(), eqlv2.mu(), eqlv2.alpha()],
            ),
        };
        MethodRecord {
            code,
            size: size as u32,
            parameters,
        }
    }

    /// How many parameters a record of `code` holds; `None` for a code no method has.
    pub fn record_parameters(code: u8) -> Option<usize> {
        RECORD_CODES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|(_, parameters)| *parameters)
    }

    /// The method a record describes, checked as a CreateJob's spec is.
    pub fn from_record(record: &MethodRecord) -> Result<Self, String> {
        let parameter = |index: usize| record.parameters.get(index).copied().unwrap_or(f64::NAN);
        let (size, p0, p1, p2) = (record.size, parameter(0), parameter(1), parameter(2));
        match record.code {
            0 | 1 => {
                let loss = if record.code == 0 {
                    Loss::GhmC
                } else {
                    Loss::GhmR
                };
                ghm::Spec::new(loss, size, p0, p1)
                    .map(|spec| Self::Ghm(Ghm { spec }))
                    .map_err(|e| e.to_string())
            }
            2 => Seesaw::new(size, p0, p1, p2)
                .map(Self::Seesaw)
                .map_err(|e| e.to_string()),
            3 => Eqlv2::new(size, p0, p1, p2)
                .map(Self::Eqlv2)
                .map_err(|e| e.to_string()),
            other => Err(format!("unknown method code {other}")),
        }
    }

    /// The float32 arrays its state is recorded as.
    pub fn state_arrays(&self) -> usize {
        match self {
            Self::Ghm(_) | Self::Seesaw(_) => 1,
            Self::Eqlv2(_) => 3,
        }
    }

    /// The state recorded as `arrays` ([`AnyState::arrays`]), checked as a restored one is.
    pub fn state_from_arrays(&self, arrays: Vec<Vec<f32>>) -> Result<AnyState, MethodError> {
        let mut arrays = arrays.into_iter();
        let mut next = || arrays.next().unwrap_or_default();
        let input = match self {
            Self::Ghm(_) => StateInput::Ghm { acc_sum: next() },
            Self::Seesaw(_) => StateInput::Seesaw {
                cum_samples: next(),
            },
            Self::Eqlv2(_) => StateInput::Eqlv2 {
                pos_grad: next(),
                neg_grad: next(),
                pos_neg: next(),
            },
        };
        self.state_from_input(input, false)
    }
}

impl AnyState {
    /// The state as the float32 arrays a state file records.
    pub fn arrays(&self) -> Vec<&[f32]> {
        match self {
            Self::Ghm(density) => vec![density.acc_sum()],
            Self::Seesaw(state) => vec![state.cum_samples()],
            Self::Eqlv2(state) => vec![state.pos_grad(), state.neg_grad(), state.pos_neg()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ghm::{BinEdges, InputField, Spec};

    #[test]
    fn the_rank_bound_of_the_math_is_the_job_cores() {
        assert_eq!(MAX_RANKS, u64::from(crate::jobs::MAX_WORLD_SIZE));
    }

    fn ghm_c(bins: u32, momentum: f64) -> Ghm {
        Ghm {
            spec: Spec::new(Loss::GhmC, bins, momentum, 0.0).unwrap(),
        }
    }

    fn counts_of(spec: &Spec, norms: &[f32]) -> BatchCounts {
        let bytes: Vec<[u8; 4]> = norms.iter().map(|v| v.to_le_bytes()).collect();
        let edges = BinEdges::new(spec.loss(), spec.bins());
        ghm::count_batch(spec.loss(), &edges, &bytes, InputField::GradientNorms, None).unwrap()
    }

    /// The adapter must give what the job core computes today: the density's own step on the
    /// summed counts of the ranks.
    #[test]
    fn ghm_through_the_engine_is_the_density_step_on_the_summed_counts() {
        let method = ghm_c(10, 0.75);
        let ranks = [
            counts_of(&method.spec, &[0.05, 0.15, 0.95, 1.0]),
            counts_of(&method.spec, &[0.05, 0.55]),
        ];
        let mut state = method.initial_state();
        let table = method.step(&mut state, ranks.to_vec()).unwrap();

        let mut expected_density = Density::new(10);
        let mut summed = ranks[0].clone();
        summed.add(&ranks[1]);
        let expected_table = expected_density.step(0.75, &summed);
        assert_eq!(table, expected_table);
        assert_eq!(state, expected_density);
        assert_eq!(summed.valid_elements(), 6);
    }

    #[test]
    fn a_ghm_contribution_with_the_wrong_bin_count_changes_nothing() {
        let method = ghm_c(10, 0.75);
        let mut state = method.initial_state();
        let before = state.clone();
        let wrong = BatchCounts {
            counts: vec![1; 9],
            tot: 9.0,
        };
        assert_eq!(
            method.step(&mut state, vec![wrong]),
            Err(ghm::InputError::HistogramLength {
                expected: 10,
                got: 9
            })
        );
        assert_eq!(state, before);
        // The fold alone, as the job core may call it with a total it did not check.
        let long = BatchCounts {
            counts: vec![1; 11],
            tot: 11.0,
        };
        assert!(method.fold(&mut state, &long).is_err());
        assert_eq!(state, before);
    }

    fn seesaw(classes: u32) -> MethodSpec {
        MethodSpec::Seesaw(Seesaw::new(classes, 0.8, 2.0, 0.01).unwrap())
    }

    fn eqlv2(classes: u32) -> MethodSpec {
        MethodSpec::Eqlv2(Eqlv2::new(classes, 12.0, 0.8, 4.0).unwrap())
    }

    #[test]
    fn every_kind_is_listed_once_under_its_own_name() {
        let names: std::collections::HashSet<_> =
            MethodKind::ALL.iter().map(|kind| kind.name()).collect();
        assert_eq!(names.len(), MethodKind::ALL.len());
        let ghm_r = MethodSpec::Ghm(Ghm {
            spec: Spec::new(Loss::GhmR, 10, 0.0, 0.0).unwrap(),
        });
        let kinds = [
            MethodSpec::Ghm(ghm_c(10, 0.0)).kind(),
            ghm_r.kind(),
            seesaw(3).kind(),
            eqlv2(3).kind(),
        ];
        assert_eq!(kinds, MethodKind::ALL);
    }

    /// The dispatch adds nothing to a method's own arithmetic.
    #[test]
    fn a_step_through_the_dispatch_is_the_methods_own_step() {
        let spec = Seesaw::new(2, 0.8, 2.0, 0.01).unwrap();
        let ranks = vec![
            spec.count_labels(&[0, 2, 2]).unwrap(),
            spec.count_labels(&[1]).unwrap(),
        ];
        let mut direct = spec.initial_state();
        let table = spec.step(&mut direct, ranks.clone()).unwrap();
        let any = MethodSpec::Seesaw(spec);
        let mut state = any.initial_state();
        let any_table = any
            .step(
                &mut state,
                ranks.into_iter().map(AnyContribution::Seesaw).collect(),
            )
            .unwrap();
        assert_eq!(any_table, AnyTable::Seesaw(table));
        assert_eq!(state, AnyState::Seesaw(direct));
    }

    #[test]
    fn a_contribution_for_another_method_is_refused_and_changes_nothing() {
        let job = eqlv2(3);
        let mut state = job.initial_state();
        let before = state.clone();
        let seesaw_counts = AnyContribution::Seesaw(LabelCounts {
            counts: vec![1, 0, 0, 0],
        });
        let eqlv2_grads = AnyContribution::Eqlv2(GradContribution {
            pos_grad: vec![1.0; 3],
            neg_grad: vec![1.0; 3],
        });
        let err = job
            .step(&mut state, vec![eqlv2_grads.clone(), seesaw_counts.clone()])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "seesaw: the job runs eqlv2, send eqlv2 (pos_grad and neg_grad)"
        );
        // Also where the job core would call the parts itself, without `check` first.
        assert!(
            job.reduce(vec![eqlv2_grads, seesaw_counts.clone()])
                .is_err()
        );
        assert!(job.fold(&mut state, &seesaw_counts).is_err());
        assert_eq!(state, before);

        let mut ghm_state = MethodSpec::Ghm(ghm_c(10, 0.5)).initial_state();
        let ghm_before = ghm_state.clone();
        let total = AnyContribution::Eqlv2(GradContribution {
            pos_grad: vec![1.0; 3],
            neg_grad: vec![1.0; 3],
        });
        assert_eq!(
            job.fold(&mut ghm_state, &total),
            Err(MethodError::WrongMethod {
                job: MethodKind::Eqlv2,
                sent: "state"
            })
        );
        assert_eq!(ghm_state, ghm_before);
    }

    #[test]
    fn a_methods_own_refusal_keeps_its_message() {
        let job = seesaw(2);
        let err = job
            .check(&AnyContribution::Seesaw(LabelCounts { counts: vec![1] }))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("seesaw.label_counts has 1 entries"),
            "{err}"
        );
    }

    #[test]
    fn a_restored_state_is_checked_against_the_job() {
        let ghm = MethodSpec::Ghm(ghm_c(3, 0.5));
        let density = |acc: Vec<f32>| AnyState::Ghm(Density::from_acc_sum(acc));
        assert_eq!(ghm.check_state(&density(vec![0.0, 1.5, 2.0])), Ok(()));
        assert_eq!(
            ghm.check_state(&density(vec![0.0, 1.5]))
                .unwrap_err()
                .to_string(),
            "state.acc_sum has 2 entries: the job has 3 bins"
        );
        let err = ghm
            .check_state(&density(vec![0.0, f32::NAN, 1.0]))
            .unwrap_err();
        assert!(
            matches!(err, MethodError::AccSum { index: 1, value } if value.is_nan()),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "state.acc_sum[1] = NaN: must be finite and >= 0"
        );

        // A state of the same method but another class count.
        let job = seesaw(3);
        let other = seesaw(4).initial_state();
        assert!(matches!(
            job.check_state(&other),
            Err(MethodError::Seesaw(seesaw::Error::Length { got: 5, .. }))
        ));
        assert_eq!(job.check_state(&job.initial_state()), Ok(()));
        assert!(matches!(
            job.check_state(&eqlv2(3).initial_state()),
            Err(MethodError::WrongMethod { sent: "state", .. })
        ));
        let eqlv2_job = eqlv2(2);
        assert_eq!(eqlv2_job.check_state(&eqlv2_job.initial_state()), Ok(()));
        assert!(eqlv2_job.check_state(&eqlv2(3).initial_state()).is_err());
    }

    #[test]
    fn the_elements_counter_adds_up_samples() {
        let counts = AnyContribution::Seesaw(LabelCounts {
            counts: vec![2, 0, 5],
        });
        assert_eq!(counts.samples(), 7);
        let grads = AnyContribution::Eqlv2(GradContribution {
            pos_grad: vec![3.0],
            neg_grad: vec![4.0],
        });
        assert_eq!(grads.samples(), 0);
    }
}
