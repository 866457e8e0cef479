//! How a step combines its ranks' contributions in the step barrier, for every method alike.
//!
//! Counts (GHM's bins, Seesaw's labels) give the same total in any order, so each rank's counts
//! are added to the step's sum as they arrive, and a pending step holds one set of counts however
//! many ranks it waits for. Of each rank the barrier keeps only what a resend needs to take it
//! back out (its non-zero counts, packed) and its tot, which is summed in rank order when the
//! step applies: the tot of GHM-R is a float, and its sum must not depend on arrival order.
//! Float sums (EQLv2's gradients) are kept whole and reduced by the method in rank order, since
//! rank order is part of their result.

use super::sync::StepSum;
use crate::method::{AnyContribution, Method, MethodError, MethodSpec};

/// The running total of one step.
#[derive(Clone, Debug)]
pub(super) enum StepTotal {
    /// u128, so that taking a replaced contribution back out is exact: 65,536 ranks of counts
    /// up to 2^64 - 1 cannot overflow it.
    Counts(Vec<u128>),
    /// Nothing is summed before the step applies.
    InRankOrder,
}

/// What the barrier keeps of one rank.
#[derive(Debug)]
pub(super) enum Kept {
    /// A tiny histogram costs a few bytes, not its bins.
    Counts {
        tot: f64,
        /// The non-zero counts as LEB128 pairs (gap since the previous non-zero one, count).
        packed: Box<[u8]>,
    },
    Whole(AnyContribution),
}

impl StepTotal {
    /// The total a step of `method` starts from.
    pub(super) fn new(method: &MethodSpec) -> Self {
        match method.counts_len() {
            Some(len) => Self::Counts(vec![0; len]),
            None => Self::InRankOrder,
        }
    }

    /// The step's total, exactly as adding the ranks' contributions one by one in rank order
    /// would give it: counts saturating at `u64::MAX` (a sum of non-negative counts saturates
    /// at the same value whatever the order), tots from 0.0 in rank order, and float sums as
    /// the method reduces them.
    pub(super) fn finish(
        self,
        method: &MethodSpec,
        kept: Vec<Kept>,
    ) -> Result<AnyContribution, MethodError> {
        match self {
            Self::Counts(counts) => {
                let tot = kept.iter().fold(0.0, |tot, rank| match rank {
                    Kept::Counts { tot: rank_tot, .. } => tot + rank_tot,
                    Kept::Whole(_) => tot,
                });
                let counts = counts
                    .into_iter()
                    .map(|count| u64::try_from(count).unwrap_or(u64::MAX))
                    .collect();
                method.total_of_counts(counts, tot)
            }
            Self::InRankOrder => {
                let whole = kept
                    .into_iter()
                    .filter_map(|rank| match rank {
                        Kept::Whole(contribution) => Some(contribution),
                        Kept::Counts { .. } => None,
                    })
                    .collect();
                method.reduce(whole)
            }
        }
    }
}

fn varint_len(mut value: u64) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(bytes: &mut &[u8]) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    while let Some((&byte, rest)) = bytes.split_first() {
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            break;
        }
        shift += 7;
    }
    value
}

/// The non-zero bins of `counts` with their gaps, in bin order.
fn nonzero_with_gaps(counts: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut next_bin = 0usize;
    counts
        .iter()
        .enumerate()
        .filter(|(_, count)| **count != 0)
        .map(move |(bin, &count)| {
            let gap = (bin - next_bin) as u64;
            next_bin = bin + 1;
            (gap, count)
        })
}

impl StepSum for StepTotal {
    type Contribution = AnyContribution;
    type Kept = Kept;

    fn fold(&mut self, contribution: AnyContribution) -> Kept {
        let Self::Counts(sums) = self else {
            return Kept::Whole(contribution);
        };
        let Some((counts, tot)) = contribution.counts() else {
            return Kept::Whole(contribution);
        };
        let mut packed = Vec::new();
        for (gap, count) in nonzero_with_gaps(counts) {
            write_varint(&mut packed, gap);
            write_varint(&mut packed, count);
        }
        for (sum, &count) in sums.iter_mut().zip(counts) {
            *sum += u128::from(count);
        }
        Kept::Counts {
            tot,
            packed: packed.into_boxed_slice(),
        }
    }

    fn unfold(&mut self, kept: &Kept) {
        let (Self::Counts(sums), Kept::Counts { packed, .. }) = (self, kept) else {
            return;
        };
        let mut bytes = &packed[..];
        let mut index = 0usize;
        while !bytes.is_empty() {
            index += read_varint(&mut bytes) as usize;
            let count = read_varint(&mut bytes);
            if let Some(sum) = sums.get_mut(index) {
                *sum -= u128::from(count);
            }
            index += 1;
        }
    }

    fn kept_bytes(contribution: &AnyContribution) -> usize {
        let own = std::mem::size_of::<Kept>();
        match contribution.counts() {
            Some((counts, _)) => {
                own + nonzero_with_gaps(counts)
                    .map(|(gap, count)| varint_len(gap) + varint_len(count))
                    .sum::<usize>()
            }
            None => own + contribution.heap_bytes(),
        }
    }

    fn sum_bytes(&self) -> usize {
        match self {
            Self::Counts(sums) => sums.len() * std::mem::size_of::<u128>(),
            Self::InRankOrder => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eqlv2::{Eqlv2, GradContribution};
    use crate::ghm::{self, BatchCounts};
    use crate::method::Ghm;
    use crate::seesaw::{LabelCounts, Seesaw};

    fn ghm(bins: u32) -> MethodSpec {
        MethodSpec::Ghm(Ghm {
            spec: ghm::Spec::new(ghm::Loss::GhmR, bins, 0.0, 0.0).unwrap(),
        })
    }

    fn counts(counts: &[u64], tot: f64) -> AnyContribution {
        AnyContribution::Ghm(BatchCounts {
            counts: counts.to_vec(),
            tot,
        })
    }

    /// Folds the ranks in `arrival` order (a replaced contribution first, taken back out), and
    /// finishes with the kept parts in rank order, as the barrier does.
    fn total(method: &MethodSpec, ranks: &[AnyContribution], arrival: &[usize]) -> AnyContribution {
        let mut sum = StepTotal::new(method);
        let replaced = sum.fold(ranks[0].clone());
        sum.unfold(&replaced);
        let mut kept: Vec<(usize, Kept)> = arrival
            .iter()
            .map(|&rank| (rank, sum.fold(ranks[rank].clone())))
            .collect();
        kept.sort_by_key(|(rank, _)| *rank);
        sum.finish(method, kept.into_iter().map(|(_, kept)| kept).collect())
            .unwrap()
    }

    #[test]
    fn the_sum_is_what_adding_rank_by_rank_gives_and_a_replaced_rank_leaves_no_trace() {
        let ranks = [
            counts(&[0, 3, 0, 0, u64::MAX], 0.1),
            counts(&[200, 0, 0, 1 << 40, 7], 0.2),
            counts(&[0, 0, 0, 0, 0], 0.0),
        ];
        let method = ghm(5);
        let expected = method.reduce(ranks.to_vec()).unwrap();
        for arrival in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let total = total(&method, &ranks, &arrival);
            let (AnyContribution::Ghm(total), AnyContribution::Ghm(expected)) = (&total, &expected)
            else {
                panic!("a GHM total");
            };
            assert_eq!(total.counts, expected.counts);
            assert_eq!(total.tot.to_bits(), expected.tot.to_bits());
        }
    }

    #[test]
    fn label_counts_sum_exactly_and_float_sums_in_rank_order_whatever_the_arrival() {
        let seesaw = MethodSpec::Seesaw(Seesaw::new(2, 0.8, 2.0, 0.01).unwrap());
        let labels = |counts: &[u64]| {
            AnyContribution::Seesaw(LabelCounts {
                counts: counts.to_vec(),
            })
        };
        let ranks = [
            labels(&[1, 0, 5]),
            labels(&[0, 0, 0]),
            labels(&[3, 1 << 40, 2]),
        ];
        assert_eq!(total(&seesaw, &ranks, &[2, 0, 1]), labels(&[4, 1 << 40, 7]));

        // 1e8 + 4 + 4 is 1e8 in float32 from the left, 1e8 + 8 with the 4s added first: only
        // rank order may decide it.
        let eqlv2 = MethodSpec::Eqlv2(Eqlv2::new(1, 12.0, 0.8, 4.0).unwrap());
        let grads = |value: f32| {
            AnyContribution::Eqlv2(GradContribution {
                pos_grad: vec![value],
                neg_grad: vec![0.0],
            })
        };
        let ranks = [grads(100_000_000.0), grads(4.0), grads(4.0)];
        let expected = eqlv2.reduce(ranks.to_vec()).unwrap();
        for arrival in [[0, 1, 2], [2, 1, 0], [1, 0, 2]] {
            assert_eq!(total(&eqlv2, &ranks, &arrival), expected);
        }
    }

    #[test]
    fn a_tiny_histogram_keeps_bytes_not_its_bins() {
        let mut bins = vec![0u64; 4096];
        bins[4000] = 1;
        let tiny = counts(&bins, 1.0);
        let bound = StepTotal::kept_bytes(&tiny);
        let Kept::Counts { packed, .. } = StepTotal::new(&ghm(4096)).fold(tiny) else {
            panic!("counts are kept packed");
        };
        assert_eq!(packed.len(), 3, "gap 4000 in two bytes, count 1 in one");
        assert_eq!(bound, std::mem::size_of::<Kept>() + packed.len());
        assert!(bound < 64, "{bound}");
    }
}
