//! Deterministic, realistic inputs: what a single-stage detector's GHM-C sees.

use ghmd::ghm::{self, BatchCounts, BinEdges, InputField, Loss};

#[path = "../synthetic.rs"]
mod synthetic;

pub use synthetic::SplitMix;
use synthetic::realistic_norm;

/// `elements` realistic norms (see [`realistic_norm`]) from `seed`.
pub fn realistic_norms(elements: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    (0..elements).map(|_| realistic_norm(&mut rng)).collect()
}

/// The bin counts and raw tot of a realistic batch of `elements`, as a client that bins its own
/// batch sends them.
pub fn realistic_histogram(bins: usize, elements: usize, seed: u64) -> BatchCounts {
    let norms: Vec<[u8; 4]> = realistic_norms(elements, seed)
        .iter()
        .map(|g| g.to_le_bytes())
        .collect();
    let edges = BinEdges::new(Loss::GhmC, bins);
    // Every realistic norm is in [0, 1]; an empty histogram would still be a valid request.
    ghm::count_batch(Loss::GhmC, &edges, &norms, InputField::GradientNorms, None)
        .unwrap_or_else(|_| BatchCounts::empty(bins))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_realistic_histogram_counts_every_element() {
        let histogram = realistic_histogram(30, 100_000, 1);
        assert_eq!(histogram.counts.iter().sum::<u64>(), 100_000);
        assert_eq!(histogram.tot, 100_000.0);
    }
}
