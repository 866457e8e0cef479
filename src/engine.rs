//! What a method is to the job core (issue 11): the [`Method`] trait and the bounds every
//! method's math keeps. Apart from `method`, which dispatches over the methods, so that a
//! method's module (`seesaw`, `eqlv2`) can implement the trait without importing the dispatch
//! that imports it: no import circle.
//!
//! Pure: no async, no I/O, nothing of gRPC.

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
