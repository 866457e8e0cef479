//! Deterministic, realistic inputs: what a single-stage detector's GHM-C sees.

use crate::ghm::{self, BatchCounts, BinEdges, InputField, Loss};

/// splitmix64: a small deterministic generator, so that every run sends the same batches.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// g = |sigmoid(x) - y|: tiny for the flood of easy negatives (95%), the rest spread over
/// [0, 1] with a few exact 0s and 1s.
pub fn realistic_norms(elements: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    (0..elements)
        .map(|_| {
            let pick = rng.unit();
            if pick < 0.95 {
                let logit = -4.0 - 6.0 * rng.unit();
                1.0 / (1.0 + (-logit).exp())
            } else if pick < 0.951 {
                0.0
            } else if pick < 0.952 {
                1.0
            } else {
                rng.unit()
            }
        })
        .collect()
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
    fn realistic_batches_are_valid_and_mostly_easy() {
        let norms = realistic_norms(100_000, 1);
        assert!(norms.iter().all(|g| (0.0..=1.0).contains(g)));
        let easy = norms.iter().filter(|&&g| g < 1.0 / 30.0).count();
        assert!(easy > 90_000 && easy < 99_000, "{easy}");
        let histogram = realistic_histogram(30, 100_000, 1);
        assert_eq!(histogram.counts.iter().sum::<u64>(), 100_000);
        assert_eq!(histogram.tot, 100_000.0);
    }
}
