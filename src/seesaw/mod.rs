//! Seesaw loss's shared statistic, bit for bit as mmdetection's `SeesawLoss` keeps its
//! `cum_samples` buffer in float32 (tests/data/conformance/README.md, second part).
//!
//! The reference counts, at every call, the samples of each label `0..=C` (C is the background)
//! whatever their label weight, and adds each nonzero count to `cum_samples` as a float32; the
//! loss of the step then uses `cum_samples` after that update. Nothing in the reference shares
//! the buffer between GPUs: here the counts of a step's ranks are summed exactly (u64) before one
//! update, which is what one process that saw the global batch would have done.
//!
//! Pure: no async, no I/O, nothing of gRPC.

use std::fmt;

use crate::engine::{MAX_CLASSES, MAX_RANKS, Method};

/// The most samples one rank's counts of one step may add up to: with [`MAX_RANKS`] ranks a
/// step's sums stay below 2^63, so the reduction of checked contributions cannot overflow. Far
/// above any batch (2^47 is 1.4e14 samples).
pub const MAX_SAMPLES_PER_CONTRIBUTION: u64 = (1u64 << 63) / MAX_RANKS;

/// mmdetection's defaults, for a spec that leaves them out.
pub const DEFAULT_P: f64 = 0.8;
pub const DEFAULT_Q: f64 = 2.0;
pub const DEFAULT_EPS: f64 = 0.01;

/// The field an [`Error`] is about, named as clients spell it in the proto (docs/methods.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A rank's per-label sample counts, C + 1 entries.
    LabelCounts,
    /// A rank's labels, one per sample, each in `0..=C`.
    Labels,
    /// The job's state: C + 1 cumulative counts, from a restore, a state file or a step.
    CumSamples,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LabelCounts => "seesaw.label_counts",
            Self::Labels => "seesaw.labels",
            Self::CumSamples => "state.seesaw.cum_samples",
        })
    }
}

/// What a Seesaw job refuses; every variant leaves the job as it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("spec.seesaw.num_classes = {num_classes}: must be 1 to {MAX_CLASSES}")]
    NumClasses { num_classes: u32 },
    #[error("spec.seesaw.{name} = {value}: must be {expected}")]
    Parameter {
        name: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error(
        "{field} has {got} entries: the job has {num_classes} classes, so {field} needs {expected} (the last is the background)",
        num_classes = expected - 1
    )]
    Length {
        field: Field,
        expected: usize,
        got: usize,
    },
    #[error(
        "{field}[{index}] = {label}: labels are 0 to {num_classes} ({num_classes} is the background)"
    )]
    Label {
        field: Field,
        index: usize,
        label: i64,
        num_classes: u32,
    },
    #[error(
        "{field}[{index}]: the counts up to here sum past {MAX_SAMPLES_PER_CONTRIBUTION}, the most samples one rank may count in one step"
    )]
    TooManySamples { field: Field, index: usize },
    #[error("{field}[{index}]: rank {rank}'s count makes the step's sum overflow 2^64")]
    ReductionOverflow {
        field: Field,
        index: usize,
        rank: usize,
    },
    #[error("{field}[{index}] = {value:e}: must be {expected}")]
    BadState {
        field: Field,
        index: usize,
        value: f32,
        expected: &'static str,
    },
}

/// A Seesaw job's checked spec. `p`, `q` and `eps` shape the loss, which the clients compute;
/// the job keeps them so that every worker (and a resumed run) uses the same ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seesaw {
    num_classes: u32,
    p: f64,
    q: f64,
    eps: f64,
}

fn check_parameter(name: &'static str, value: f64, positive: bool) -> Result<f64, Error> {
    let ok = value.is_finite() && if positive { value > 0.0 } else { value >= 0.0 };
    if ok {
        Ok(value)
    } else {
        Err(Error::Parameter {
            name,
            value,
            expected: if positive {
                "finite and > 0"
            } else {
                "finite and >= 0"
            },
        })
    }
}

impl Seesaw {
    /// The values as given: mmdetection reads `p = 0` and `q = 0` as "no mitigation factor" and
    /// "no compensation factor", so 0 is a setting, not "unset" (the proto's fields are
    /// `optional`; the API fills in [`DEFAULT_P`], [`DEFAULT_Q`], [`DEFAULT_EPS`] when absent).
    pub fn new(num_classes: u32, p: f64, q: f64, eps: f64) -> Result<Self, Error> {
        if num_classes == 0 || num_classes > MAX_CLASSES {
            return Err(Error::NumClasses { num_classes });
        }
        Ok(Self {
            num_classes,
            p: check_parameter("p", p, false)?,
            q: check_parameter("q", q, false)?,
            eps: check_parameter("eps", eps, true)?,
        })
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes as usize
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    pub fn q(&self) -> f64 {
        self.q
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// C + 1: the classes and the background.
    pub fn labels(&self) -> usize {
        self.num_classes() + 1
    }

    fn check_length(&self, field: Field, got: usize) -> Result<(), Error> {
        if got == self.labels() {
            Ok(())
        } else {
            Err(Error::Length {
                field,
                expected: self.labels(),
                got,
            })
        }
    }

    /// A rank's contribution from its samples' labels, as the reference counts them: every
    /// sample, whatever its label weight.
    pub fn count_labels(&self, labels: &[i64]) -> Result<LabelCounts, Error> {
        let mut counts = vec![0u64; self.labels()];
        for (index, &label) in labels.iter().enumerate() {
            let slot = usize::try_from(label)
                .ok()
                .and_then(|label| counts.get_mut(label))
                .ok_or(Error::Label {
                    field: Field::Labels,
                    index,
                    label,
                    num_classes: self.num_classes,
                })?;
            *slot += 1;
        }
        let counts = LabelCounts { counts };
        self.check(&counts)?;
        Ok(counts)
    }

    /// A state restored from a checkpoint (mmdetection's `cum_samples` buffer, or ours): one
    /// count per label, so finite, >= 0 and whole.
    pub fn state_from_cum_samples(&self, cum_samples: Vec<f32>) -> Result<SeesawState, Error> {
        let state = SeesawState { cum_samples };
        self.check_state(&state)?;
        Ok(state)
    }

    /// Checks a state against this job: what a restore or a state file brings must be a state
    /// of a job with this class count.
    pub fn check_state(&self, state: &SeesawState) -> Result<(), Error> {
        let cum_samples = &state.cum_samples;
        self.check_length(Field::CumSamples, cum_samples.len())?;
        match cum_samples
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0 && v.fract() == 0.0))
        {
            Some((index, &value)) => Err(Error::BadState {
                field: Field::CumSamples,
                index,
                value,
                expected: "a whole number of samples, finite and >= 0",
            }),
            None => Ok(()),
        }
    }
}

/// One rank's samples per label for one step, C + 1 entries (the last is the background); also
/// a step's total over its ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelCounts {
    pub counts: Vec<u64>,
}

impl LabelCounts {
    pub fn samples(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |sum, &count| sum.saturating_add(count))
    }
}

/// mmdetection's `cum_samples`: C + 1 float32 counts, starting at 0.
#[derive(Clone, Debug, PartialEq)]
pub struct SeesawState {
    cum_samples: Vec<f32>,
}

impl SeesawState {
    pub fn cum_samples(&self) -> &[f32] {
        &self.cum_samples
    }
}

impl Method for Seesaw {
    type Contribution = LabelCounts;
    type State = SeesawState;
    /// `cum_samples` after the step: the loss of the step uses its first C entries.
    type Table = Vec<f32>;
    type Error = Error;

    fn initial_state(&self) -> SeesawState {
        SeesawState {
            cum_samples: vec![0.0; self.labels()],
        }
    }

    fn check(&self, contribution: &LabelCounts) -> Result<(), Error> {
        self.check_length(Field::LabelCounts, contribution.counts.len())?;
        let mut samples = 0u64;
        for (index, &count) in contribution.counts.iter().enumerate() {
            samples = samples
                .checked_add(count)
                .filter(|&sum| sum <= MAX_SAMPLES_PER_CONTRIBUTION)
                .ok_or(Error::TooManySamples {
                    field: Field::LabelCounts,
                    index,
                })?;
        }
        Ok(())
    }

    /// Exact integer sums, so any order of the ranks gives the same total.
    fn reduce(&self, in_rank_order: Vec<LabelCounts>) -> Result<LabelCounts, Error> {
        let mut total = vec![0u64; self.labels()];
        for (rank, contribution) in in_rank_order.iter().enumerate() {
            self.check_length(Field::LabelCounts, contribution.counts.len())?;
            for (index, (sum, &count)) in total.iter_mut().zip(&contribution.counts).enumerate() {
                *sum = sum.checked_add(count).ok_or(Error::ReductionOverflow {
                    field: Field::LabelCounts,
                    index,
                    rank,
                })?;
            }
        }
        Ok(LabelCounts { counts: total })
    }

    /// `cum[u] = cum[u] + (k as f32)` for every label with k > 0, in float32 as the reference
    /// adds an integer count to its float buffer: past 2^24 the sums round. The sum cannot
    /// leave float32: the ulp of `f32::MAX` is 2^104, far past any u64 count, so it rounds back.
    fn fold(&self, state: &mut SeesawState, total: &LabelCounts) -> Result<Vec<f32>, Error> {
        self.check_length(Field::LabelCounts, total.counts.len())?;
        self.check_length(Field::CumSamples, state.cum_samples.len())?;
        for (cum, &count) in state.cum_samples.iter_mut().zip(&total.counts) {
            if count > 0 {
                *cum += count as f32;
            }
        }
        Ok(state.cum_samples.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seesaw(num_classes: u32) -> Seesaw {
        Seesaw::new(num_classes, DEFAULT_P, DEFAULT_Q, DEFAULT_EPS).unwrap()
    }

    #[test]
    fn zero_p_and_q_are_settings_but_eps_must_be_positive() {
        let method = Seesaw::new(3, 0.0, 0.0, 1e-3).unwrap();
        assert_eq!((method.p(), method.q(), method.eps()), (0.0, 0.0, 1e-3));
        assert!(Seesaw::new(3, 0.8, 2.0, 0.0).is_err());
    }

    #[test]
    fn a_spec_names_what_is_wrong() {
        assert_eq!(
            Seesaw::new(0, 0.8, 2.0, 0.01),
            Err(Error::NumClasses { num_classes: 0 })
        );
        assert!(Seesaw::new(MAX_CLASSES + 1, 0.8, 2.0, 0.01).is_err());
        let err = Seesaw::new(3, f64::NAN, 2.0, 0.01).unwrap_err();
        assert!(matches!(err, Error::Parameter { name: "p", .. }), "{err}");
        let err = Seesaw::new(3, 0.8, 2.0, -1.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.seesaw.eps = -1: must be finite and > 0"
        );
    }

    #[test]
    fn labels_are_counted_whatever_their_order_and_a_bad_one_is_named() {
        let method = seesaw(3);
        assert_eq!(
            method.count_labels(&[3, 0, 0, 2, 3, 3]).unwrap().counts,
            [2, 0, 1, 3]
        );
        for (labels, index, label) in [(&[0, 4][..], 1, 4), (&[1, 2, -1][..], 2, -1)] {
            let err = method.count_labels(labels).unwrap_err();
            assert_eq!(
                err,
                Error::Label {
                    field: Field::Labels,
                    index,
                    label,
                    num_classes: 3
                }
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("seesaw.labels[{index}] = {label}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_refused_contribution_or_step_changes_nothing() {
        let method = seesaw(2);
        let mut state = method
            .state_from_cum_samples(vec![f32::MAX, 1.0, 0.0])
            .unwrap();
        let before = state.clone();
        let too_short = LabelCounts { counts: vec![1, 1] };
        let err = method.step(&mut state, vec![too_short]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "seesaw.label_counts has 2 entries: the job has 2 classes, so seesaw.label_counts needs 3 (the last is the background)"
        );
        let too_many = LabelCounts {
            counts: vec![1, MAX_SAMPLES_PER_CONTRIBUTION, 0],
        };
        assert_eq!(
            method.step(&mut state, vec![too_many]),
            Err(Error::TooManySamples {
                field: Field::LabelCounts,
                index: 1
            })
        );
        assert_eq!(state, before);
    }

    #[test]
    fn the_largest_state_absorbs_the_largest_count() {
        let method = seesaw(1);
        let mut state = method.state_from_cum_samples(vec![f32::MAX, 0.0]).unwrap();
        let total = LabelCounts {
            counts: vec![u64::MAX, u64::MAX],
        };
        assert_eq!(
            method.fold(&mut state, &total).unwrap(),
            [f32::MAX, u64::MAX as f32]
        );
    }

    #[test]
    fn a_reduction_past_2_64_names_the_class_and_the_rank() {
        let method = seesaw(1);
        let big = LabelCounts {
            counts: vec![0, u64::MAX / 2 + 1],
        };
        assert_eq!(
            method.reduce(vec![big.clone(), big]),
            Err(Error::ReductionOverflow {
                field: Field::LabelCounts,
                index: 1,
                rank: 1
            })
        );
    }

    #[test]
    fn checked_contributions_of_the_most_ranks_cannot_overflow_the_reduction() {
        assert!(
            MAX_SAMPLES_PER_CONTRIBUTION
                .checked_mul(MAX_RANKS)
                .is_some()
        );
    }

    #[test]
    fn a_restored_state_must_be_counts() {
        let method = seesaw(2);
        for (values, index) in [
            (vec![1.0, 0.5, 0.0], 1),
            (vec![1.0, 0.0, -1.0], 2),
            (vec![f32::INFINITY, 0.0, 0.0], 0),
        ] {
            let err = method.state_from_cum_samples(values).unwrap_err();
            assert!(
                matches!(err, Error::BadState { field: Field::CumSamples, index: i, .. } if i == index),
                "{err}"
            );
        }
        assert!(matches!(
            method.state_from_cum_samples(vec![0.0; 4]),
            Err(Error::Length { got: 4, .. })
        ));
    }
}
