//! Checks of weights that do not trust the server's bin lookup, and the big batch they check.

use ghmd::client::bytes_to_f32s;
use ghmd::proto::{HarmonizeResponse, Loss};

use super::{Draw, SplitMix};

/// The bin of `g` by scanning the contract's float32 edges, independent of the server's lookup.
pub fn scan_bin(loss: Loss, bins: u32, g: f32) -> Option<usize> {
    let edge = |i: u32| -> f32 {
        match (i == bins, loss) {
            (true, Loss::GhmR) => 1000.0,
            (true, _) => i as f32 / bins as f32 + 1e-6f32,
            (false, _) => i as f32 / bins as f32,
        }
    };
    (0..bins)
        .find(|&i| edge(i) <= g && g < edge(i + 1))
        .map(|i| i as usize)
}

/// 16,000,000 norms spread over [0, 1] with every edge of 30 bins present.
pub fn big_norms(len: usize) -> Vec<f32> {
    let mut rng = SplitMix(16);
    (0..len)
        .map(|i| {
            if i % 1000 == 0 {
                (i / 1000 % 31) as f32 / 30.0
            } else {
                rng.unit_closed()
            }
        })
        .collect()
}

pub fn spot_check_big(norms: &[f32], response: &HarmonizeResponse, bins: u32) {
    let weights = bytes_to_f32s(&response.weights);
    assert_eq!(weights.len(), norms.len());
    assert_eq!(response.tot, norms.len() as f64);
    let mut rng = SplitMix(3);
    let mut indices: Vec<usize> = (0..20_000)
        .map(|_| rng.below(norms.len() as u64) as usize)
        .collect();
    indices.extend((0..norms.len()).step_by(1000).take(31));
    indices.extend([0, norms.len() - 1]);
    for i in indices {
        let bin = scan_bin(Loss::GhmC, bins, norms[i]).expect("in range");
        assert_eq!(
            weights[i].to_bits(),
            response.bin_weights[bin].to_bits(),
            "weights[{i}] (g = {:e})",
            norms[i]
        );
    }
    assert!(response.bin_weights.iter().all(|w| *w > 0.0));
}
