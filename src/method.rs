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
//! Everything here is pure: no async, no I/O, nothing of gRPC. See docs/methods.md for how the
//! job core, the proto and persistence plug into it.

use crate::ghm::{self, BatchCounts, BinTable, Density};

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
    /// barrier hands them over so). Arrival order must not matter; rank order may, and for
    /// float32 sums it does.
    fn reduce(
        &self,
        in_rank_order: &[Self::Contribution],
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
        in_rank_order: &[Self::Contribution],
    ) -> Result<Self::Table, Self::Error> {
        for contribution in in_rank_order {
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
    fn reduce(&self, in_rank_order: &[BatchCounts]) -> Result<BatchCounts, ghm::InputError> {
        let mut total = BatchCounts::empty(self.spec.bins());
        for counts in in_rank_order {
            total.add(counts);
        }
        Ok(total)
    }

    fn fold(&self, state: &mut Density, total: &BatchCounts) -> Result<BinTable, ghm::InputError> {
        Ok(state.step(self.spec.momentum(), total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ghm::{BinEdges, InputField, Loss, Spec};

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
        let table = method.step(&mut state, &ranks).unwrap();

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
            method.step(&mut state, &[wrong]),
            Err(ghm::InputError::HistogramLength {
                expected: 10,
                got: 9
            })
        );
        assert_eq!(state, before);
    }
}
