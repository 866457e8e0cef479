//! How a GHM step combines its ranks' counts in the step barrier: each rank's bin counts are
//! added to the step's sum as they arrive, so that a pending step holds one set of counts
//! however many ranks it waits for. Of each rank the barrier keeps only what a resend needs to
//! take it back out (its non-zero bins, packed) and its tot, which is summed in rank order when
//! the step applies: the tot of GHM-R is a float, and its sum must not depend on arrival order.

use super::sync::StepSum;
use crate::ghm::BatchCounts;

/// The running sum of a step's bin counts. u128, so that taking a replaced contribution back
/// out is exact: 65,536 ranks of counts up to 2^64 - 1 cannot overflow it.
#[derive(Clone, Debug)]
pub(super) struct CountsSum {
    counts: Vec<u128>,
}

/// What the barrier keeps of one rank: a tiny histogram costs a few bytes, not its bins.
#[derive(Debug)]
pub(super) struct KeptCounts {
    tot: f64,
    /// The non-zero bins as LEB128 pairs (gap since the previous non-zero bin, count).
    packed: Box<[u8]>,
}

impl CountsSum {
    pub(super) fn new(bins: usize) -> Self {
        Self {
            counts: vec![0; bins],
        }
    }

    /// The step's counts, exactly as adding the ranks' counts one by one in rank order would
    /// give them: bins saturating at `u64::MAX` (a sum of non-negative counts saturates at the
    /// same value whatever the order), tots from 0.0 in rank order.
    pub(super) fn finish(self, kept: &[KeptCounts]) -> BatchCounts {
        BatchCounts {
            counts: self
                .counts
                .into_iter()
                .map(|count| u64::try_from(count).unwrap_or(u64::MAX))
                .collect(),
            tot: kept.iter().fold(0.0, |tot, rank| tot + rank.tot),
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

impl StepSum for CountsSum {
    type Contribution = BatchCounts;
    type Kept = KeptCounts;

    fn fold(&mut self, contribution: BatchCounts) -> KeptCounts {
        let mut packed = Vec::new();
        for (gap, count) in nonzero_with_gaps(&contribution.counts) {
            write_varint(&mut packed, gap);
            write_varint(&mut packed, count);
        }
        for (sum, &count) in self.counts.iter_mut().zip(&contribution.counts) {
            *sum += u128::from(count);
        }
        KeptCounts {
            tot: contribution.tot,
            packed: packed.into_boxed_slice(),
        }
    }

    fn unfold(&mut self, kept: &KeptCounts) {
        let mut bytes = &kept.packed[..];
        let mut bin = 0usize;
        while !bytes.is_empty() {
            bin += read_varint(&mut bytes) as usize;
            let count = read_varint(&mut bytes);
            if let Some(sum) = self.counts.get_mut(bin) {
                *sum -= u128::from(count);
            }
            bin += 1;
        }
    }

    fn kept_bytes(contribution: &BatchCounts) -> usize {
        std::mem::size_of::<KeptCounts>()
            + nonzero_with_gaps(&contribution.counts)
                .map(|(gap, count)| varint_len(gap) + varint_len(count))
                .sum::<usize>()
    }

    fn sum_bytes(&self) -> usize {
        self.counts.len() * std::mem::size_of::<u128>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(counts: &[u64], tot: f64) -> BatchCounts {
        BatchCounts {
            counts: counts.to_vec(),
            tot,
        }
    }

    #[test]
    fn the_sum_is_what_adding_rank_by_rank_gives_and_a_replaced_rank_leaves_no_trace() {
        let ranks = [
            counts(&[0, 3, 0, 0, u64::MAX], 0.1),
            counts(&[200, 0, 0, 1 << 40, 7], 0.2),
            counts(&[0, 0, 0, 0, 0], 0.0),
        ];
        let mut expected = BatchCounts::empty(5);
        for rank in &ranks {
            expected.add(rank);
        }
        let mut sum = CountsSum::new(5);
        let replaced = sum.fold(counts(&[9, 9, 9, 9, 9], 5.0));
        sum.unfold(&replaced);
        let kept: Vec<KeptCounts> = ranks.iter().cloned().map(|r| sum.fold(r)).collect();
        let total = sum.finish(&kept);
        assert_eq!(total.counts, expected.counts);
        assert_eq!(total.tot.to_bits(), expected.tot.to_bits());
    }

    #[test]
    fn a_tiny_histogram_keeps_bytes_not_its_bins() {
        let mut bins = vec![0u64; 4096];
        bins[4000] = 1;
        let tiny = counts(&bins, 1.0);
        let bound = CountsSum::kept_bytes(&tiny);
        let kept = CountsSum::new(4096).fold(tiny);
        assert_eq!(
            kept.packed.len(),
            3,
            "gap 4000 in two bytes, count 1 in one"
        );
        assert_eq!(bound, std::mem::size_of::<KeptCounts>() + kept.packed.len());
        assert!(bound < 64, "{bound}");
    }
}
