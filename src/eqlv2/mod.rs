//! EQLv2's shared statistic, bit for bit as mmdetection's `EQLV2Loss` keeps `pos_grad`,
//! `neg_grad` and `pos_neg` in float32 (tests/data/conformance/README.md, second part).
//!
//! A step's weights come from `pos_neg` *before* the step; after its loss, each worker's column
//! sums of the positive and negative gradients (its contribution) are added to the state and
//! `pos_neg = pos_grad / (neg_grad + 1e-10)` is derived again. With W workers the contributions
//! are summed in float32 in rank order, `((c_0 + c_1) + c_2) + ...`, then added once: what the
//! reference's `all_reduce` does, but with an order fixed by rank instead of by the collective.
//!
//! Pure: no async, no I/O, nothing of gRPC.

use std::fmt;

use crate::engine::{MAX_CLASSES, Method};

/// mmdetection's defaults, for a spec that leaves them out.
pub const DEFAULT_GAMMA: f64 = 12.0;
pub const DEFAULT_MU: f64 = 0.8;
pub const DEFAULT_ALPHA: f64 = 4.0;

/// What `pos_neg` is before the first step: large enough that every class starts with the
/// negative weight 1 and the positive weight 1.
pub const INITIAL_POS_NEG: f32 = 100.0;

/// Keeps a class that was never a negative from dividing by 0, as the reference does.
const NEG_GRAD_FLOOR: f32 = 1e-10;

/// The field an [`Error`] is about, named as clients spell it in the proto (docs/methods.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// A rank's column sums of the positive gradients, C entries.
    PosGrad,
    /// A rank's column sums of the negative gradients, C entries.
    NegGrad,
    /// The job's state, from a restore, a state file or a step.
    StatePosGrad,
    StateNegGrad,
    StatePosNeg,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PosGrad => "eqlv2.pos_grad",
            Self::NegGrad => "eqlv2.neg_grad",
            Self::StatePosGrad => "state.eqlv2.pos_grad",
            Self::StateNegGrad => "state.eqlv2.neg_grad",
            Self::StatePosNeg => "state.eqlv2.pos_neg",
        })
    }
}

/// What an EQLv2 job refuses; every variant leaves the job as it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("spec.eqlv2.num_classes = {num_classes}: must be 1 to {MAX_CLASSES}")]
    NumClasses { num_classes: u32 },
    #[error("spec.eqlv2.{name} = {value}: must be finite")]
    Parameter { name: &'static str, value: f64 },
    #[error(
        "{field} has {got} entries: the job has {expected} classes (the objectness channel has no statistic)"
    )]
    Length {
        field: Field,
        expected: usize,
        got: usize,
    },
    #[error("{field} has {len} bytes, not a multiple of 4: expected little-endian float32")]
    NotFloat32 { field: Field, len: usize },
    #[error("{field}[{index}] = {value:e}: must be finite and >= 0")]
    BadValue {
        field: Field,
        index: usize,
        value: f32,
    },
    #[error("{field}[{index}]: adding rank {rank}'s value makes the step's float32 sum infinite")]
    ReductionOverflow {
        field: Field,
        index: usize,
        rank: usize,
    },
    #[error(
        "state.eqlv2.pos_neg[{index}] = {value:e}: must be pos_grad[{index}] / (neg_grad[{index}] + 1e-10) = {expected:e}"
    )]
    InconsistentPosNeg {
        index: usize,
        value: f32,
        expected: f32,
    },
    #[error("{field}[{index}]: this step would make it {value:e}, outside float32")]
    StateOverflow {
        field: Field,
        index: usize,
        value: f32,
    },
}

/// An EQLv2 job's checked spec. `gamma`, `mu` and `alpha` shape the weights, which the clients
/// compute from `pos_neg` (with torch, for the reference's bits); the job keeps them so that
/// every worker, and a resumed run, uses the same ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Eqlv2 {
    num_classes: u32,
    gamma: f64,
    mu: f64,
    alpha: f64,
}

impl Eqlv2 {
    pub fn new(num_classes: u32, gamma: f64, mu: f64, alpha: f64) -> Result<Self, Error> {
        if num_classes == 0 || num_classes > MAX_CLASSES {
            return Err(Error::NumClasses { num_classes });
        }
        for (name, value) in [("gamma", gamma), ("mu", mu), ("alpha", alpha)] {
            if !value.is_finite() {
                return Err(Error::Parameter { name, value });
            }
        }
        Ok(Self {
            num_classes,
            gamma,
            mu,
            alpha,
        })
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes as usize
    }

    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    pub fn mu(&self) -> f64 {
        self.mu
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    fn check_length(&self, field: Field, got: usize) -> Result<(), Error> {
        if got == self.num_classes() {
            Ok(())
        } else {
            Err(Error::Length {
                field,
                expected: self.num_classes(),
                got,
            })
        }
    }

    fn check_values(&self, field: Field, values: &[f32]) -> Result<(), Error> {
        self.check_length(field, values.len())?;
        match values
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            Some((index, &value)) => Err(Error::BadValue {
                field,
                index,
                value,
            }),
            None => Ok(()),
        }
    }

    /// A state restored from a checkpoint (mmdetection's three buffers, or ours).
    pub fn state_from_parts(
        &self,
        pos_grad: Vec<f32>,
        neg_grad: Vec<f32>,
        pos_neg: Vec<f32>,
    ) -> Result<Eqlv2State, Error> {
        let state = Eqlv2State {
            pos_grad,
            neg_grad,
            pos_neg,
        };
        self.check_state(&state)?;
        Ok(state)
    }

    /// Checks a state against this job: what a restore or a state file brings must be a state
    /// of a job with this class count.
    /// `pos_neg` is derived from the two sums, so a state whose `pos_neg` is not what they give
    /// was not made by steps: a mixed-up checkpoint, which would weigh with one statistic and
    /// accumulate another. A class with no gradient yet may hold 0 (stepped) or the initial 100.
    pub fn check_state(&self, state: &Eqlv2State) -> Result<(), Error> {
        self.check_values(Field::StatePosGrad, &state.pos_grad)?;
        self.check_values(Field::StateNegGrad, &state.neg_grad)?;
        self.check_values(Field::StatePosNeg, &state.pos_neg)?;
        let derived = pos_neg_of(&state.pos_grad, &state.neg_grad);
        for (index, (value, expected)) in state.pos_neg.iter().zip(derived).enumerate() {
            let untouched = state.pos_grad[index] == 0.0
                && state.neg_grad[index] == 0.0
                && *value == INITIAL_POS_NEG;
            if value.to_bits() != expected.to_bits() && !untouched {
                return Err(Error::InconsistentPosNeg {
                    index,
                    value: *value,
                    expected,
                });
            }
        }
        Ok(())
    }

    /// The weights of a step from the `pos_neg` before it, in the reference's float32 operations:
    /// `neg_w = 1 / (1 + exp(-gamma * (pos_neg - mu)))` per class and 1 for the objectness
    /// channel, `pos_w = 1 + alpha * (1 - neg_w)`; the scalars are float32, as torch casts them.
    /// `exp` is the one operation not correctly rounded anywhere, so these are within 2 ulp of
    /// torch's; a client that needs the reference's bits computes them with torch.
    pub fn class_weights(&self, pos_neg: &[f32]) -> ClassWeights {
        let (minus_gamma, mu, alpha) = (-self.gamma as f32, self.mu as f32, self.alpha as f32);
        let mut neg_w: Vec<f32> = pos_neg
            .iter()
            .map(|&x| 1.0 / (1.0 + (minus_gamma * (x - mu)).exp()))
            .collect();
        neg_w.push(1.0);
        let pos_w = neg_w.iter().map(|&w| 1.0 + alpha * (1.0 - w)).collect();
        ClassWeights { pos_w, neg_w }
    }
}

/// One rank's column sums for one step, C entries each (the objectness channel is not
/// collected); also a step's total over its ranks.
/// `pos_neg` as the reference derives it from the two sums, in float32.
fn pos_neg_of<'a>(pos_grad: &'a [f32], neg_grad: &'a [f32]) -> impl Iterator<Item = f32> + 'a {
    pos_grad
        .iter()
        .zip(neg_grad)
        .map(|(pos, neg)| pos / (neg + NEG_GRAD_FLOOR))
}

/// A contribution's values as they travel: little-endian float32 packed in bytes, which may sit
/// at any alignment in the request buffer.
pub fn floats_from_le_bytes(field: Field, bytes: &[u8]) -> Result<Vec<f32>, Error> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::NotFloat32 {
            field,
            len: bytes.len(),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect())
}

#[derive(Clone, Debug, PartialEq)]
pub struct GradContribution {
    pub pos_grad: Vec<f32>,
    pub neg_grad: Vec<f32>,
}

/// mmdetection's `pos_grad`, `neg_grad` and `pos_neg` buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct Eqlv2State {
    pos_grad: Vec<f32>,
    neg_grad: Vec<f32>,
    pos_neg: Vec<f32>,
}

impl Eqlv2State {
    pub fn pos_grad(&self) -> &[f32] {
        &self.pos_grad
    }

    pub fn neg_grad(&self) -> &[f32] {
        &self.neg_grad
    }

    pub fn pos_neg(&self) -> &[f32] {
        &self.pos_neg
    }
}

/// A step's weights per channel, C + 1 entries (the last is objectness).
#[derive(Clone, Debug, PartialEq)]
pub struct ClassWeights {
    pub pos_w: Vec<f32>,
    pub neg_w: Vec<f32>,
}

impl Method for Eqlv2 {
    type Contribution = GradContribution;
    type State = Eqlv2State;
    /// The whole state after the step: the weights of the next step come from its `pos_neg`
    /// (which is why the round trip can overlap the next forward pass), and a client that keeps
    /// it can checkpoint or reseed the job from its last response alone.
    type Table = Eqlv2State;
    type Error = Error;

    fn initial_state(&self) -> Eqlv2State {
        let classes = self.num_classes();
        Eqlv2State {
            pos_grad: vec![0.0; classes],
            neg_grad: vec![0.0; classes],
            pos_neg: vec![INITIAL_POS_NEG; classes],
        }
    }

    fn check(&self, contribution: &GradContribution) -> Result<(), Error> {
        self.check_values(Field::PosGrad, &contribution.pos_grad)?;
        self.check_values(Field::NegGrad, &contribution.neg_grad)
    }

    /// Float32 sums in rank order, starting from rank 0's values: `((c_0 + c_1) + c_2) + ...`.
    /// No ranks at all give zeros, which is what the reference collects from an empty batch.
    fn reduce(&self, in_rank_order: Vec<GradContribution>) -> Result<GradContribution, Error> {
        let mut ranks = in_rank_order.into_iter();
        let Some(mut total) = ranks.next() else {
            return Ok(GradContribution {
                pos_grad: vec![0.0; self.num_classes()],
                neg_grad: vec![0.0; self.num_classes()],
            });
        };
        self.check_length(Field::PosGrad, total.pos_grad.len())?;
        self.check_length(Field::NegGrad, total.neg_grad.len())?;
        for (offset, contribution) in ranks.enumerate() {
            let rank = offset + 1;
            for (field, sums, values) in [
                (Field::PosGrad, &mut total.pos_grad, &contribution.pos_grad),
                (Field::NegGrad, &mut total.neg_grad, &contribution.neg_grad),
            ] {
                self.check_length(field, values.len())?;
                for (index, (sum, &value)) in sums.iter_mut().zip(values).enumerate() {
                    *sum += value;
                    if !sum.is_finite() {
                        return Err(Error::ReductionOverflow { field, index, rank });
                    }
                }
            }
        }
        Ok(total)
    }

    /// `pos_grad += total.pos_grad`, `neg_grad += total.neg_grad`,
    /// `pos_neg = pos_grad / (neg_grad + 1e-10)`, all float32.
    fn fold(&self, state: &mut Eqlv2State, total: &GradContribution) -> Result<Eqlv2State, Error> {
        self.check_length(Field::PosGrad, total.pos_grad.len())?;
        self.check_length(Field::NegGrad, total.neg_grad.len())?;
        self.check_length(Field::StatePosGrad, state.pos_grad.len())?;
        let added = |sums: &[f32], values: &[f32]| -> Vec<f32> {
            sums.iter().zip(values).map(|(a, b)| a + b).collect()
        };
        let pos_grad = added(&state.pos_grad, &total.pos_grad);
        let neg_grad = added(&state.neg_grad, &total.neg_grad);
        let pos_neg: Vec<f32> = pos_neg_of(&pos_grad, &neg_grad).collect();
        // Checked before the state is replaced, so that a refused step changes nothing.
        for (field, values) in [
            (Field::StatePosGrad, &pos_grad),
            (Field::StateNegGrad, &neg_grad),
            (Field::StatePosNeg, &pos_neg),
        ] {
            if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::StateOverflow {
                    field,
                    index,
                    value,
                });
            }
        }
        *state = Eqlv2State {
            pos_grad,
            neg_grad,
            pos_neg,
        };
        Ok(state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eqlv2(num_classes: u32) -> Eqlv2 {
        Eqlv2::new(num_classes, DEFAULT_GAMMA, DEFAULT_MU, DEFAULT_ALPHA).unwrap()
    }

    fn contribution(pos_grad: &[f32], neg_grad: &[f32]) -> GradContribution {
        GradContribution {
            pos_grad: pos_grad.to_vec(),
            neg_grad: neg_grad.to_vec(),
        }
    }

    #[test]
    fn a_fresh_job_weighs_every_class_one() {
        let method = eqlv2(3);
        let state = method.initial_state();
        let weights = method.class_weights(state.pos_neg());
        assert_eq!(weights.neg_w, [1.0; 4]);
        assert_eq!(weights.pos_w, [1.0; 4]);
    }

    #[test]
    fn a_spec_names_what_is_wrong() {
        assert_eq!(
            Eqlv2::new(0, 12.0, 0.8, 4.0),
            Err(Error::NumClasses { num_classes: 0 })
        );
        assert_eq!(
            Eqlv2::new(3, 12.0, f64::INFINITY, 4.0)
                .unwrap_err()
                .to_string(),
            "spec.eqlv2.mu = inf: must be finite"
        );
    }

    #[test]
    fn a_bad_contribution_is_named_by_field_and_index_and_changes_nothing() {
        let method = eqlv2(2);
        let mut state = method.initial_state();
        let before = state.clone();
        for (bad, expected) in [
            (
                contribution(&[1.0], &[1.0, 1.0]),
                "eqlv2.pos_grad has 1 entries: the job has 2 classes (the objectness channel has no statistic)",
            ),
            (
                contribution(&[1.0, 1.0], &[1.0, -0.5]),
                "eqlv2.neg_grad[1] = -5e-1: must be finite and >= 0",
            ),
            (
                contribution(&[f32::NAN, 1.0], &[1.0, 1.0]),
                "eqlv2.pos_grad[0] = NaN: must be finite and >= 0",
            ),
        ] {
            let err = method.step(&mut state, vec![bad]).unwrap_err();
            assert_eq!(err.to_string(), expected);
            assert_eq!(state, before);
        }
    }

    #[test]
    fn a_step_that_would_leave_float32_changes_nothing() {
        let method = eqlv2(2);
        let pos_neg = vec![
            1.0 / (1.0 + NEG_GRAD_FLOOR),
            f32::MAX / (1.0 + NEG_GRAD_FLOOR),
        ];
        let mut state = method
            .state_from_parts(vec![1.0, f32::MAX], vec![1.0, 1.0], pos_neg)
            .unwrap();
        let before = state.clone();
        let err = method
            .step(
                &mut state,
                vec![contribution(&[1.0, f32::MAX], &[1.0, 1.0])],
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::StateOverflow {
                    field: Field::StatePosGrad,
                    index: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(state, before);

        // A class never seen as a negative divides by 1e-10: a large pos_grad leaves float32.
        let mut state = method.initial_state();
        let err = method
            .step(&mut state, vec![contribution(&[1e30, 1.0], &[0.0, 1.0])])
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::StateOverflow {
                    field: Field::StatePosNeg,
                    index: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(state, method.initial_state());
    }

    #[test]
    fn a_reduction_to_infinity_names_the_field_index_and_rank() {
        let method = eqlv2(1);
        let big = contribution(&[0.0], &[f32::MAX]);
        assert_eq!(
            method.reduce(vec![big.clone(), contribution(&[0.0], &[0.0]), big]),
            Err(Error::ReductionOverflow {
                field: Field::NegGrad,
                index: 0,
                rank: 2
            })
        );
    }

    /// Float32 addition is not associative: which is why the reduction is fixed by rank and a
    /// different rank order is a different statistic.
    #[test]
    fn the_rank_order_of_a_reduction_is_part_of_its_result() {
        let method = eqlv2(1);
        let ranks = [
            contribution(&[1e8], &[0.0]),
            contribution(&[4.0], &[0.0]),
            contribution(&[4.0], &[0.0]),
        ];
        let in_order = method.reduce(ranks.to_vec()).unwrap();
        let swapped = method
            .reduce(vec![ranks[1].clone(), ranks[2].clone(), ranks[0].clone()])
            .unwrap();
        // 1e8 + 4 is a tie that rounds back to 1e8; 4 + 4 first is exact.
        assert_eq!(in_order.pos_grad, [1e8]);
        assert_eq!(swapped.pos_grad, [100_000_008.0]);
    }

    #[test]
    fn the_table_is_the_state_after_the_step() {
        let method = eqlv2(2);
        let mut state = method.initial_state();
        assert_eq!(state.pos_neg(), [INITIAL_POS_NEG; 2]);
        let table = method
            .step(&mut state, vec![contribution(&[2.0, 0.0], &[4.0, 1.0])])
            .unwrap();
        assert_eq!(table.pos_neg(), [2.0f32 / (4.0 + 1e-10), 0.0]);
        assert_eq!(table, state);
    }

    #[test]
    fn a_restored_pos_neg_must_be_what_its_gradients_give() {
        let method = eqlv2(2);
        let mut stepped = method.initial_state();
        method
            .step(&mut stepped, vec![contribution(&[2.0, 0.0], &[4.0, 0.0])])
            .unwrap();
        let parts = |state: &Eqlv2State| {
            (
                state.pos_grad().to_vec(),
                state.neg_grad().to_vec(),
                state.pos_neg().to_vec(),
            )
        };
        let (pos, neg, pos_neg) = parts(&stepped);
        assert_eq!(
            method.state_from_parts(pos.clone(), neg.clone(), pos_neg.clone()),
            Ok(stepped)
        );
        // A class never seen may keep the initial 100, as a fresh reference buffer does.
        let fresh = parts(&method.initial_state());
        assert!(method.state_from_parts(fresh.0, fresh.1, fresh.2).is_ok());
        let mut wrong = pos_neg;
        wrong[0] = 0.25;
        let refused = method.state_from_parts(pos, neg, wrong).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "state.eqlv2.pos_neg[0] = 2.5e-1: must be pos_grad[0] / (neg_grad[0] + 1e-10) = 5e-1"
        );
    }
}
