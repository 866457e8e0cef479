//! Deterministic, realistic inputs, written once for every Rust crate of the repo that needs
//! them: the kernel's unit tests, `benches/`, the `ghmd bench` command, the integration tests.
//!
//! Not part of the library's API: each of those crates compiles its own copy of this file
//! (`mod synthetic;` in `lib.rs` under `cfg(test)`, `#[path]` elsewhere), so a user of the
//! crate never sees it and it depends on nothing but `std`.

/// splitmix64: a small deterministic generator, so that every run sees the same batches.
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

/// One g = |sigmoid(x) - y| as a single-stage detector's GHM-C sees it: tiny for the flood of
/// easy negatives (95%), the rest spread over [0, 1] with a few exact 0s and 1s.
pub fn realistic_norm(rng: &mut SplitMix) -> f32 {
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
}

#[cfg(test)]
mod tests {
    // No glob import: a crate that compiles this file with `cfg(test)` but no test harness
    // (a bench) would find it unused.
    #[test]
    fn realistic_norms_are_valid_and_mostly_easy() {
        let mut rng = super::SplitMix(1);
        let norms: Vec<f32> = (0..100_000)
            .map(|_| super::realistic_norm(&mut rng))
            .collect();
        assert!(norms.iter().all(|g| (0.0..=1.0).contains(g)));
        let easy = norms.iter().filter(|&&g| g < 1.0 / 30.0).count();
        assert!(easy > 90_000 && easy < 99_000, "{easy}");
    }
}
