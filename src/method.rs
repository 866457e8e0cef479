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

use crate::eqlv2::{self, Eqlv2, Eqlv2State, Eqlv2Table, GradContribution};
use crate::ghm::{self, BatchCounts, BinTable, Density, Loss};
use crate::seesaw::{self, LabelCounts, Seesaw, SeesawState};

/// The largest class count a Seesaw or EQLv2 job may have. LVIS has 1203; 2^16 leaves room for
/// larger vocabularies while keeping a job's state and every response a few hundred KiB at most.
pub const MAX_CLASSES: u32 = 1 << 16;

/// The most ranks a step can have (`jobs::MAX_WORLD_SIZE`), restated here because the math may
/// not import the job core: per-rank bounds are chosen so that a step of this many ranks cannot
/// overflow its reduction.
pub const MAX_RANKS: u64 = 1 << 16;

/// One re-weighting method with a per-job statistic shared by every worker.
///
/// A value of the implementing type is a job's checked spec (its class or bin count and its
/// parameters), made once when the job is created, so that the four parts need not check it.
pub trait Method {
    /// What one rank sends for one step; also the step's total after [`Method::reduce`].
    type Contribution: Clone + std::fmt::Debug + PartialEq + Send + Sync + 'static;
    /// What a job keeps between steps and what a checkpoint holds.
    type State: Clone + std::fmt::Debug + PartialEq + Send + 'static;
    /// What every rank of a step gets back.
    type Table: Clone + std::fmt::Debug + PartialEq + Send + Sync + 'static;
    /// A contribution or a step the method refuses, naming the field and the index.
    type Error: std::error::Error + Clone + PartialEq + Send + Sync + 'static;

    /// The state of a job that has applied no step.
    fn initial_state(&self) -> Self::State;

    /// Checks one rank's contribution against the job: the O(size) part of validation, meant to
    /// run outside the job's lock.
    fn check(&self, contribution: &Self::Contribution) -> Result<(), Self::Error>;

    /// The step's total from the contributions of the ranks present, in rank order (the step
    /// barrier hands them over so, and gives them up: taken by value, rank 0's buffers can
    /// become the total and a dispatch over methods can move them without a copy). Arrival
    /// order must not matter; rank order may, and for float32 sums it does.
    fn reduce(
        &self,
        in_rank_order: Vec<Self::Contribution>,
    ) -> Result<Self::Contribution, Self::Error>;

    /// Folds a step's total into the state and returns the step's table. On `Err` the state is
    /// exactly as it was.
    fn fold(
        &self,
        state: &mut Self::State,
        total: &Self::Contribution,
    ) -> Result<Self::Table, Self::Error>;

    /// A whole step as the job core runs it, the four parts in order: what one process does with
    /// `W = 1`, and what the barrier's apply does with the ranks of a step.
    fn step(
        &self,
        state: &mut Self::State,
        in_rank_order: Vec<Self::Contribution>,
    ) -> Result<Self::Table, Self::Error> {
        for contribution in &in_rank_order {
            self.check(contribution)?;
        }
        let total = self.reduce(in_rank_order)?;
        self.fold(state, &total)
    }
}

/// GHM on the engine, through `ghm`'s public functions only, so that the job core can switch
/// over without a change to `ghm`.
///
/// A contribution is a batch's [`BatchCounts`] (from `ghm::bin_batch`, `ghm::count_batch` or a
/// client's histogram); the per-element weights of pass two stay outside the engine, since only
/// GHM has elements to weigh: the job core keeps the `BinnedBatch` beside the contribution and
/// weighs it with the table. What the job core checks today besides `ghm::validate_histogram`
/// (the `max_tot` bound of `jobs/job.rs`) moves into [`Method::check`] here when it switches.
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
    Eqlv2(Eqlv2Table),
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
